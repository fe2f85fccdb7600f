//! The agent's etcd adapter: registration, liveness lease, the watch of its own assignments,
//! and status reports.
//!
//! One session = connect, register, lease, list, watch. Any error ends the session; the
//! caller starts a new one after a pause, which re-lists (so a compaction or an etcd restart
//! is handled by the same path). Meanwhile the reconcile loop keeps the last known state.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use corral_proto::fleet::{Assignment, ProgramHostStatus};
use corral_proto::keys::Keys;
use corral_proto::resource::{Host, HostSpec, HostStatus, Metadata};
use etcd_client::{EventType, PutOptions, Txn, TxnOp, WatchOptions};

use crate::plan;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// This host's assignments as read from etcd: program -> assignment, and the programs whose
/// assignment does not even parse, with why (refused and reported, never run).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Received {
    pub assignments: BTreeMap<String, Assignment>,
    pub unreadable: BTreeMap<String, String>,
}

/// Desired state as the agent knows it.
pub type Assignments = Arc<Received>;

/// Statuses the reconcile loop wants reported: program -> status.
pub type Statuses = Arc<BTreeMap<String, ProgramHostStatus>>;

/// Why the host is not ready, as the reconcile loop last found it (`None`: ready).
pub type Health = Option<String>;

/// Why an etcd session ended.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error(transparent)]
    Connect(#[from] corral_etcd::ConnectError),
    #[error("etcd: {0} timed out")]
    Timeout(&'static str),
    #[error("etcd: the watch was cancelled (compaction at revision {compact_revision}, reason {reason:?}); re-listing")]
    WatchCancelled { compact_revision: i64, reason: String },
    #[error("etcd: the lease keep-alive stream ended")]
    LeaseLost,
    #[error("etcd: the watch stream ended")]
    WatchEnded,
}

/// How the agent talks to etcd.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    pub etcd: corral_etcd::EtcdOptions,
    pub keys: Keys,
    pub host: String,
    pub labels: BTreeMap<String, String>,
    /// Seconds before a silent agent's liveness key disappears.
    pub lease_ttl: i64,
}

async fn within<T>(what: &'static str, f: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, Error> {
    Ok(tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .map_err(|_| Error::Timeout(what))??)
}

/// What a session exchanges with the rest of the agent.
pub struct Channels {
    /// Every new view of the assignments goes here.
    pub desired: watch::Sender<Assignments>,
    /// Statuses to report; each that differs from what etcd holds is written.
    pub statuses: watch::Receiver<Statuses>,
    /// The host's readiness, written to its host key when it changes.
    pub health: watch::Receiver<Health>,
    /// Whether a session is up.
    pub connected: watch::Sender<bool>,
    /// The session's connection while it is up, for the other users of etcd (log requests).
    pub client: watch::Sender<Option<etcd_client::Client>>,
}

/// Runs one session until an error or `shutdown`.
///
/// # Errors
/// Whatever ended the session; the caller retries.
pub async fn session(
    cfg: &EtcdConfig,
    next_member: &mut usize,
    supervisord_version: Option<String>,
    channels: &mut Channels,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let Channels {
        desired,
        statuses,
        health,
        connected,
        client: shared,
    } = channels;
    // One member at a time; the next session starts with the member after this one, so a
    // dead member is left behind.
    // Members are checked by reading this host's own assignments: under etcd's
    // authentication an agent may read nothing else.
    let keys = &cfg.keys;
    let probing = cfg.etcd.clone().probing(keys.assignments(&cfg.host));
    let (mut client, member) = corral_etcd::connect_from(&probing, *next_member).await?;
    *next_member = member + 1;

    let host_record = |reason: Health| Host {
        status: Some(HostStatus {
            agent_version: Some(env!("CARGO_PKG_VERSION").to_string()),
            supervisord_version: supervisord_version.clone(),
            ready: reason.is_none(),
            reason,
            ..Default::default()
        }),
        ..Host::new(
            Metadata {
                name: cfg.host.clone(),
                labels: cfg.labels.clone(),
                ..Default::default()
            },
            HostSpec::default(),
        )
    };
    let mut reported = health.borrow_and_update().clone();
    let host_json = serde_json::to_vec(&host_record(reported.clone())).unwrap_or_default();
    within("register", client.put(keys.host(&cfg.host), host_json, None)).await?;
    let lease = within("lease grant", client.lease_grant(cfg.lease_ttl, None))
        .await?
        .id();
    within(
        "alive",
        client.put(keys.alive(&cfg.host), "", Some(PutOptions::new().with_lease(lease))),
    )
    .await?;
    let (mut keeper, mut keep_stream) = within("lease keep-alive", client.lease_keep_alive(lease)).await?;

    // List, then watch from the next revision.
    let prefix = keys.assignments(&cfg.host);
    let mut current = Received::default();
    let revision = corral_etcd::read_pages(
        &prefix,
        |key, opts| {
            let mut c = client.clone();
            async move { within("list", c.get(key, Some(opts))).await }
        },
        |kv| {
            apply_put(keys, &mut current, kv.key(), kv.value());
        },
    )
    .await?;
    desired.send_replace(Arc::new(current.clone()));
    let mut stream = within(
        "watch",
        corral_etcd::watch(
            &client,
            prefix.clone(),
            Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1)),
        ),
    )
    .await?;
    connected.send_replace(true);
    shared.send_replace(Some(client.clone()));
    tracing::info!(host = %cfg.host, programs = current.assignments.len(), unreadable = current.unreadable.len(), revision, "etcd session started");

    // Reported statuses: what etcd holds for this host, so only changes are written.
    let mut written: BTreeMap<String, ProgramHostStatus> = BTreeMap::new();
    corral_etcd::read_pages(
        &keys.host_status(&cfg.host),
        |key, opts| {
            let mut c = client.clone();
            async move { within("list status", c.get(key, Some(opts))).await }
        },
        |kv| {
            if let (Ok(key), Ok(s)) = (kv.key_str(), serde_json::from_slice::<ProgramHostStatus>(kv.value()))
                && let Some((_, program)) = keys.host_and_program(key)
            {
                written.insert(program.to_string(), s);
            }
        },
    )
    .await?;
    statuses.mark_changed();
    // Program -> when its status was first seen on its way (held back a moment).
    let mut on_its_way: BTreeMap<String, i64> = BTreeMap::new();
    let mut report_again: Option<tokio::time::Instant> = None;

    let mut keep_alive = tokio::time::interval(Duration::from_secs((cfg.lease_ttl / 3).max(1) as u64));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                // Best effort: a clean stop tells the controller at once.
                let _ = within("lease revoke", client.lease_revoke(lease)).await;
                return Ok(());
            }
            _ = keep_alive.tick() => {
                within("keep-alive", keeper.keep_alive()).await?;
                match tokio::time::timeout(Duration::from_secs(10), keep_stream.message()).await {
                    Ok(Ok(Some(resp))) if resp.ttl() > 0 => {}
                    Ok(Err(e)) => return Err(e.into()),
                    _ => return Err(Error::LeaseLost),
                }
            }
            msg = stream.message() => {
                let Some(resp) = msg? else { return Err(Error::WatchEnded) };
                if resp.canceled() {
                    return Err(Error::WatchCancelled {
                        compact_revision: resp.compact_revision(),
                        reason: resp.cancel_reason().to_string(),
                    });
                }
                let mut changed = false;
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    match ev.event_type() {
                        EventType::Put => changed |= apply_put(keys, &mut current, kv.key(), kv.value()),
                        EventType::Delete => {
                            if let Some((_, program)) = kv.key_str().ok().and_then(|k| keys.host_and_program(k)) {
                                changed |= current.assignments.remove(program).is_some();
                                changed |= current.unreadable.remove(program).is_some();
                            }
                        }
                    }
                }
                if changed {
                    desired.send_replace(Arc::new(current.clone()));
                }
            }
            r = health.changed() => {
                if r.is_err() {
                    return Ok(());
                }
                let now = health.borrow_and_update().clone();
                if now != reported {
                    let v = serde_json::to_vec(&host_record(now.clone())).unwrap_or_default();
                    within("put host", client.put(keys.host(&cfg.host), v, None)).await?;
                    reported = now;
                }
            }
            r = statuses.changed() => {
                if r.is_err() {
                    return Ok(());
                }
                report_again = report(&mut client, cfg, statuses, &mut written, &mut on_its_way).await?;
            }
            _ = sleep_until(report_again) => {
                report_again = report(&mut client, cfg, statuses, &mut written, &mut on_its_way).await?;
            }
        }
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Status operations in one transaction: well under etcd's default `--max-txn-ops` (128).
const REPORT_TXN_OPS: usize = 64;

/// Writes the statuses due (see [`plan::reports_due`]), in transactions of up to
/// [`REPORT_TXN_OPS`]; returns when to look again for one held back.
async fn report(
    client: &mut etcd_client::Client,
    cfg: &EtcdConfig,
    statuses: &watch::Receiver<Statuses>,
    written: &mut BTreeMap<String, ProgramHostStatus>,
    on_its_way: &mut BTreeMap<String, i64>,
) -> Result<Option<tokio::time::Instant>, Error> {
    let wanted = statuses.borrow().clone();
    let due = plan::reports_due(written, &wanted, on_its_way, crate::reconcile::now_ms());
    let keys = &cfg.keys;
    let mut ops: Vec<TxnOp> = Vec::with_capacity(due.put.len() + due.delete.len());
    for s in &due.put {
        let v = serde_json::to_vec(s).unwrap_or_default();
        ops.push(TxnOp::put(keys.status(&cfg.host, &s.program), v, None));
    }
    for program in &due.delete {
        ops.push(TxnOp::delete(keys.status(&cfg.host, program), None));
    }
    for chunk in ops.chunks(REPORT_TXN_OPS) {
        within("write status", client.txn(Txn::new().and_then(chunk.to_vec()))).await?;
    }
    for s in due.put {
        written.insert(s.program.clone(), s);
    }
    for program in &due.delete {
        written.remove(program);
    }
    Ok(due.next.map(|d| tokio::time::Instant::now() + d))
}

/// Applies one assignment value. One that does not parse replaces what was there as
/// unreadable: refused, reported, never run (the controller writes only what it validated, so
/// it is damage, a forgery, or a newer controller's field).
fn apply_put(keys: &Keys, current: &mut Received, key: &[u8], value: &[u8]) -> bool {
    let Some((_, program)) = std::str::from_utf8(key).ok().and_then(|k| keys.host_and_program(k)) else {
        return false;
    };
    match serde_json::from_slice::<Assignment>(value) {
        Ok(a) => {
            let was_unreadable = current.unreadable.remove(program).is_some();
            current.assignments.insert(program.to_string(), a.clone()).as_ref() != Some(&a) || was_unreadable
        }
        Err(e) => {
            tracing::warn!(program, error = %e, "refusing an assignment that does not parse");
            current.assignments.remove(program);
            let why = format!("assignment refused: it does not parse ({e})");
            current.unreadable.insert(program.to_string(), why.clone()) != Some(why)
        }
    }
}

//! Leader election and the placement loop. Every replica serves the API; only the one that
//! holds the etcd election writes assignments.

use std::time::Duration;

use corral_proto::resource::{Group, Program};
use etcd_client::{ResignOptions, WatchOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use std::collections::BTreeMap;

use corral_proto::fleet::ControlPlaneHealth;

use crate::placement::{diff, place, rollout};
use crate::store::{Fence, Store, StoreError};

/// What one placement did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Placed {
    /// Some rollout holds hosts back, waiting for others to report ready.
    pub rollout_waiting: bool,
}

/// Recomputes every assignment (placement, then the rollout's pace) and writes the
/// differences, each write conditioned on `fence` (still the leader). Assignments etcd refuses
/// and values that cannot be read are skipped and recorded in `health`.
///
/// # Errors
/// Store errors; nothing is half-decided (the writes are computed before any is made).
pub async fn place_all(
    store: &Store,
    fence: Option<&Fence>,
    health: &mut ControlPlaneHealth,
) -> Result<Placed, StoreError> {
    // Five reads at once: a placement's latency is one round trip, not five.
    let (programs, groups, hosts, current, reports) = tokio::try_join!(
        store.list::<Program>(),
        store.list::<Group>(),
        store.hosts(),
        store.assignments(),
        store.reports(),
    )?;
    let placed = place(&programs, &groups, &hosts);
    let desired = rollout(placed.clone(), &current, &reports);
    let rollout_waiting = desired != placed;
    let writes = diff(&desired, &current);
    let n = writes.put.len() + writes.delete.len();
    let mut refused = BTreeMap::new();
    if n > 0 {
        let failures = store.write_assignments(&writes, fence).await?;
        tracing::info!(
            put = writes.put.len(),
            deleted = writes.delete.len(),
            refused = failures.0.len(),
            "assignments updated"
        );
        refused = failures
            .0
            .into_iter()
            .map(|((h, p), why)| (format!("{h}/{p}"), why))
            .collect();
    }
    health.unreadable = store.unreadable();
    health.refused_assignments = refused;
    Ok(Placed { rollout_waiting })
}

/// Campaigns, and while leader keeps assignments in line with programs, groups and hosts.
/// Runs until `shutdown`; `is_leader` tells the rest of the controller.
pub async fn run(store: Store, id: String, is_leader: watch::Sender<bool>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        if let Err(e) = lead_once(&store, &id, &is_leader, &shutdown).await {
            tracing::warn!(error = %e, "leadership lost or not acquired; retrying");
            if matches!(&e, StoreError::Timeout(_))
                || matches!(&e, StoreError::Etcd(err) if corral_etcd::Etcd::is_unavailable(err))
            {
                let _ = store.etcd().failover().await;
            }
        }
        is_leader.send_replace(false);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn lead_once(
    store: &Store,
    id: &str,
    is_leader: &watch::Sender<bool>,
    shutdown: &CancellationToken,
) -> Result<(), StoreError> {
    let mut client = store.client().await;
    let lease = client.lease_grant(10, None).await?.id();
    let (mut keeper, mut keep_stream) = client.lease_keep_alive(lease).await?;
    let lost = CancellationToken::new();
    // Stops the keep-alive task whenever this function returns.
    let _guard = lost.clone().drop_guard();
    let lost_signal = lost.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = lost_signal.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(3)) => {}
            }
            let ok = keeper.keep_alive().await.is_ok()
                && matches!(
                    tokio::time::timeout(Duration::from_secs(5), keep_stream.message()).await,
                    Ok(Ok(Some(r))) if r.ttl() > 0
                );
            if !ok {
                lost_signal.cancel();
                return;
            }
        }
    });

    let election = store.keys().election();
    let campaign = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        _ = lost.cancelled() => return Err(StoreError::Timeout("lease keep-alive")),
        r = client.campaign(election.clone(), id.to_string(), lease) => r?,
    };
    let leader_key = campaign.leader().cloned();
    let fence = leader_key.as_ref().map(|k| Fence {
        key: k.key().to_vec(),
        create_revision: k.rev(),
    });
    is_leader.send_replace(true);
    tracing::info!(id, "elected leader");
    let mut health = ControlPlaneHealth {
        leader: id.to_string(),
        ..Default::default()
    };
    let mut written_health: Option<ControlPlaneHealth> = None;

    let prefix = store.keys().prefix().to_string();
    let mut watch = client
        .watch(format!("{prefix}/"), Some(WatchOptions::new().with_prefix()))
        .await?;
    let relevant = [store.keys().programs(), store.keys().groups(), store.keys().hosts()];
    // Status reports matter only while a rollout waits: a host reporting the new generation
    // ready lets it move on. Otherwise a thousand hosts' reports would each cost a placement.
    let status = store.keys().all_status();
    let mut resync = tokio::time::interval(Duration::from_secs(5));
    let mut placed = place_all(store, fence.as_ref(), &mut health).await?;
    report_health(store, &health, &mut written_health).await;
    let mut last_placed = tokio::time::Instant::now();
    loop {
        let dirty = tokio::select! {
            _ = shutdown.cancelled() => {
                if let Some(key) = leader_key {
                    let _ = client.resign(Some(ResignOptions::new().with_leader(key))).await;
                }
                let _ = client.lease_revoke(lease).await;
                return Ok(());
            }
            _ = lost.cancelled() => return Err(StoreError::Timeout("lease keep-alive")),
            _ = resync.tick() => true,
            msg = watch.message() => {
                let Some(resp) = msg? else { return Err(StoreError::Timeout("watch")) };
                if resp.canceled() {
                    return Err(StoreError::Timeout("watch (cancelled)"));
                }
                resp.events().iter().filter_map(|e| e.kv()).any(|kv| {
                    let k = String::from_utf8_lossy(kv.key());
                    relevant.iter().any(|r| k.starts_with(r.as_str()))
                        || (placed.rollout_waiting && k.starts_with(status.as_str()))
                })
            }
        };
        if dirty {
            // Coalesce bursts (a thousand hosts reporting a rollout's progress): at most one
            // placement per 20 ms, taking every event that arrived meanwhile into account.
            tokio::time::sleep_until(last_placed + Duration::from_millis(20)).await;
            while let Ok(Ok(Some(resp))) = tokio::time::timeout(Duration::from_millis(1), watch.message()).await {
                if resp.canceled() {
                    return Err(StoreError::Timeout("watch (cancelled)"));
                }
            }
            placed = place_all(store, fence.as_ref(), &mut health).await?;
            report_health(store, &health, &mut written_health).await;
            last_placed = tokio::time::Instant::now();
        }
    }
}

/// Writes the control plane's health when it changed (best effort: a failure is logged and
/// tried again after the next placement).
async fn report_health(store: &Store, health: &ControlPlaneHealth, written: &mut Option<ControlPlaneHealth>) {
    if written.as_ref() == Some(health) {
        return;
    }
    match store.put_health(health).await {
        Ok(()) => *written = Some(health.clone()),
        Err(e) => tracing::warn!(error = %e, "cannot record the control plane's health"),
    }
    if !health.unreadable.is_empty() || !health.refused_assignments.is_empty() {
        tracing::warn!(
            unreadable = health.unreadable.len(),
            refused = health.refused_assignments.len(),
            "placement skipped objects it cannot read or write"
        );
    }
}

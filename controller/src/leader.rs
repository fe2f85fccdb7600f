//! Leader election and the placement loop. Every replica serves the API; only the one that
//! holds the etcd election writes assignments.

use std::collections::BTreeSet;
use std::time::Duration;

use corral_proto::fleet::{ControlPlaneHealth, FleetStatus};
use etcd_client::{EventType, ResignOptions, WatchOptions};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::index::{Dirty, Index};
use crate::placement::RolloutDecision;
use crate::store::{Fence, Store, StoreError};

/// Places the dirty programs from the index and writes the differences, each write
/// conditioned on `fence` (still the leader). Assignments etcd refuses are skipped (they keep
/// their previous value) and recorded in `health` with the values the index cannot read.
///
/// # Errors
/// Store errors (etcd unreachable, leadership lost); nothing is half-decided: the writes are
/// computed before any is made.
pub async fn place(
    store: &Store,
    index: &mut Index,
    dirty: &Dirty,
    fence: Option<&Fence>,
    health: &mut ControlPlaneHealth,
) -> Result<(), StoreError> {
    let writes = index.plan(dirty);
    let n = writes.put.len() + writes.delete.len();
    if n > 0 {
        let failures = store.write_assignments(&writes, fence).await?;
        let failed: BTreeSet<(String, String)> = failures.0.keys().cloned().collect();
        index.written(&writes, &failed);
        tracing::info!(
            put = writes.put.len(),
            deleted = writes.delete.len(),
            refused = failures.0.len(),
            "assignments updated"
        );
        // A refusal stays on record until a placement of that program writes it.
        for (h, p) in writes.put.iter().map(|(s, _)| s).chain(&writes.delete) {
            health.refused_assignments.remove(&format!("{h}/{p}"));
        }
        health
            .refused_assignments
            .extend(failures.0.into_iter().map(|((h, p), why)| (format!("{h}/{p}"), why)));
    }
    // Assignments of programs that no longer exist are no one's problem.
    health.refused_assignments.retain(|slot, _| {
        slot.split_once('/')
            .is_some_and(|(_, p)| index.programs.contains_key(p))
    });
    health.unreadable = index.unreadable.clone();
    for decision in writes.rollouts {
        match decision {
            // Recorded beside the leader's loop: its etcd round trips never delay a placement.
            RolloutDecision::Completed { .. } => {
                let store = store.clone();
                tokio::spawn(async move { rollout_decided(&store, &decision).await });
            }
            RolloutDecision::Revert { .. } => rollout_decided(store, &decision).await,
        }
    }
    Ok(())
}

/// Records a completed rollout, or reverts a failed one (best effort: what fails is logged,
/// and a revert is recorded even when it cannot be made, so it is never tried in a loop).
async fn rollout_decided(store: &Store, decision: &RolloutDecision) {
    match decision {
        RolloutDecision::Completed { program, generation } => {
            if let Err(e) = store.record_last_good(program, *generation).await {
                tracing::warn!(program, generation, error = %e, "cannot record a completed rollout");
            }
        }
        RolloutDecision::Revert {
            program,
            failed,
            to,
            host,
        } => match store.auto_revert(program, *failed, *to, host).await {
            Ok(Some(generation)) => tracing::warn!(
                program,
                failed,
                host,
                to,
                generation,
                "generation failed: its rollout reverted to the last good spec"
            ),
            Ok(None) => {}
            Err(e) => tracing::warn!(program, failed, host, error = %e, "generation failed and cannot be reverted"),
        },
    }
}

/// A request for the fleet's numbers (see [`Index::numbers`]), answered from the leader's index.
pub type NumbersRequest = oneshot::Sender<(FleetStatus, BTreeSet<String>)>;

/// The leader loop's end of its link with the API.
pub struct LeaderSide {
    is_leader: watch::Sender<bool>,
    numbers: mpsc::Receiver<NumbersRequest>,
}

/// The API's end: whether this replica leads, and the fleet's numbers from its index.
#[derive(Clone)]
pub struct ApiSide {
    is_leader: watch::Receiver<bool>,
    numbers: mpsc::Sender<NumbersRequest>,
}

/// Connects the leader loop and the API.
pub fn link() -> (LeaderSide, ApiSide) {
    let (tx, rx) = watch::channel(false);
    let (ntx, nrx) = mpsc::channel(16);
    (
        LeaderSide {
            is_leader: tx,
            numbers: nrx,
        },
        ApiSide {
            is_leader: rx,
            numbers: ntx,
        },
    )
}

impl ApiSide {
    pub fn is_leader(&self) -> bool {
        *self.is_leader.borrow()
    }

    /// The fleet's numbers from the leader's index; `None` on a replica that does not lead
    /// (or a leader too busy to answer within a second).
    pub async fn numbers(&self) -> Option<(FleetStatus, BTreeSet<String>)> {
        if !self.is_leader() {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        self.numbers.try_send(tx).ok()?;
        tokio::time::timeout(Duration::from_secs(1), rx).await.ok()?.ok()
    }
}

/// Campaigns, and while leader keeps assignments in line with programs, groups and hosts.
/// Runs until `shutdown`; `link` tells the rest of the controller whether it leads, and
/// answers its requests for the fleet's numbers.
pub async fn run(store: Store, id: String, mut link: LeaderSide, shutdown: CancellationToken) {
    let is_leader = link.is_leader.clone();
    while !shutdown.is_cancelled() {
        if let Err(e) = lead_once(&store, &id, &mut link, &shutdown).await {
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
    link: &mut LeaderSide,
    shutdown: &CancellationToken,
) -> Result<(), StoreError> {
    let is_leader = &link.is_leader;
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

    // The index: one paged scan at one revision, then the watch from the next one.
    let prefix = format!("{}/", store.keys().prefix());
    let keys = store.keys().clone();
    let mut index = Index::default();
    let mut dirty = Dirty {
        all: true,
        ..Default::default()
    };
    let revision = store
        .scan(&prefix, |k, v, _| index.apply(&keys, k, Some(v), &mut dirty))
        .await?;
    dirty.all = true;
    let mut watch = corral_etcd::watch(
        &client,
        prefix.clone(),
        Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1)),
    )
    .await?;
    tracing::info!(
        programs = index.programs.len(),
        hosts = index.hosts.len(),
        assignments = index.current.len(),
        revision,
        "index built"
    );
    let mut last_placed = tokio::time::Instant::now();
    loop {
        if !dirty.is_empty() {
            // Coalesce bursts (a thousand hosts reporting a rollout's progress): at most one
            // placement per 20 ms, taking every event that arrived meanwhile into account.
            tokio::time::sleep_until(last_placed + Duration::from_millis(20)).await;
            while let Ok(msg) = tokio::time::timeout(Duration::from_millis(1), watch.message()).await {
                let Some(resp) = msg? else {
                    return Err(StoreError::Timeout("watch"));
                };
                apply_events(&keys, &mut index, &resp, &mut dirty)?;
            }
            place(store, &mut index, &dirty, fence.as_ref(), &mut health).await?;
            report_health(store, &health, &mut written_health).await;
            dirty = Dirty::default();
            last_placed = tokio::time::Instant::now();
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                if let Some(key) = leader_key {
                    let _ = client.resign(Some(ResignOptions::new().with_leader(key))).await;
                }
                let _ = client.lease_revoke(lease).await;
                return Ok(());
            }
            _ = lost.cancelled() => return Err(StoreError::Timeout("lease keep-alive")),
            msg = watch.message() => {
                let Some(resp) = msg? else { return Err(StoreError::Timeout("watch")) };
                apply_events(&keys, &mut index, &resp, &mut dirty)?;
            }
            Some(answer) = link.numbers.recv() => {
                let _ = answer.send(index.numbers(health.problems()));
            }
        }
    }
}

/// Applies one watch response to the index. A cancelled watch (compaction) ends the lead; the
/// next one rebuilds the index from a new scan.
fn apply_events(
    keys: &corral_proto::keys::Keys,
    index: &mut Index,
    resp: &etcd_client::WatchResponse,
    dirty: &mut Dirty,
) -> Result<(), StoreError> {
    if resp.canceled() {
        return Err(StoreError::Timeout("watch (cancelled)"));
    }
    for ev in resp.events() {
        let Some(kv) = ev.kv() else { continue };
        let key = String::from_utf8_lossy(kv.key());
        let value = match ev.event_type() {
            EventType::Put => Some(kv.value()),
            EventType::Delete => None,
        };
        index.apply(keys, &key, value, dirty);
    }
    Ok(())
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

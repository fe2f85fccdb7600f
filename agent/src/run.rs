//! The agent's main loop: keeps the etcd session, the conf dir watcher and the reconcile
//! loop running until shutdown, and serves `/healthz`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::IntoResponse as _;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use prometheus_client::registry::Registry;

use crate::confdir::{self, ConfDir};
use crate::etcd::{self, Assignments, EtcdConfig, Statuses};
use crate::metrics::{AgentMetrics, ProcessHistory};
use crate::plan;
use crate::reconcile::{self, Reconciler};
use crate::supervisor::{self, Client, ClientConfig};

/// Everything the agent needs to run.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub etcd: EtcdConfig,
    pub supervisor: ClientConfig,
    pub conf_dir: PathBuf,
    pub state_dir: PathBuf,
    /// How often a pass runs with no trigger (it also polls supervisord's process states).
    pub resync: Duration,
    /// How often a pass also asks supervisord to re-read its config.
    pub reload_every: Duration,
    pub listen: Option<SocketAddr>,
    /// Watch the conf dir for edits (on by default; a simulation of many agents in one
    /// process turns it off, as each watch takes one of the user's few inotify instances).
    pub watch_conf_dir: bool,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("supervisord client: {0}")]
    Supervisor(#[from] supervisor::Error),
    #[error("state dir {path}: {source}")]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error("watch conf dir {path}: {source}")]
    Watch { path: PathBuf, source: notify::Error },
    #[error("listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
}

const CACHE_FILE: &str = "assignments.json";

fn load_cache(state_dir: &Path) -> etcd::Received {
    let path = state_dir.join(CACHE_FILE);
    let assignments = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable assignment cache");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    };
    etcd::Received {
        assignments,
        unreadable: BTreeMap::new(),
    }
}

/// Runs the agent until `shutdown` is cancelled.
///
/// # Guarantees
/// When etcd is unreachable the agent keeps enforcing the last assignments it saw (from
/// memory, or from `<state-dir>/assignments.json` after a restart).
///
/// # Errors
/// Only start-up problems; everything after is retried and logged.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<(), StartError> {
    let state_err = |source| StartError::StateDir {
        path: cfg.state_dir.clone(),
        source,
    };
    std::fs::create_dir_all(&cfg.state_dir).map_err(state_err)?;
    // Its files hold rendered programs and their environment values: the owner's only, also
    // when an older version made it 0755.
    std::fs::set_permissions(&cfg.state_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(state_err)?;
    let client = Client::new(cfg.supervisor.clone())?;
    let trigger = Arc::new(Notify::new());
    let mut conf = ConfDir::new(&cfg.conf_dir);
    if cfg.watch_conf_dir {
        let t = trigger.clone();
        conf.watch(move || t.notify_one()).map_err(|source| StartError::Watch {
            path: cfg.conf_dir.clone(),
            source,
        })?;
    }
    let mut reconciler =
        Reconciler::new(&cfg.etcd.host, client.clone(), conf, cfg.state_dir.clone()).map_err(state_err)?;

    let (desired_tx, mut desired_rx) = watch::channel::<Assignments>(Arc::new(load_cache(&cfg.state_dir)));
    let (status_tx, status_rx) = watch::channel::<Statuses>(Arc::new(BTreeMap::new()));
    let (connected_tx, connected_rx) = watch::channel(false);
    let (health_tx, health_rx) = watch::channel::<etcd::Health>(None);
    let tracker = TaskTracker::new();

    let mut registry = Registry::default();
    let metrics = AgentMetrics::register(&mut registry, &cfg.etcd.host);
    let registry = Arc::new(registry);
    {
        let (m, mut rx, stop) = (metrics.clone(), connected_rx.clone(), shutdown.clone());
        tracker.spawn(async move {
            loop {
                m.set_etcd_connected(*rx.borrow_and_update());
                tokio::select! {
                    _ = stop.cancelled() => break,
                    r = rx.changed() => if r.is_err() { break },
                }
            }
        });
    }

    if let Some(addr) = cfg.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })?;
        let app = http_router(connected_rx.clone(), registry.clone());
        let stop = shutdown.clone();
        tracker.spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
    }

    // Log requests, answered on the etcd sessions' connection.
    let (etcd_client_tx, etcd_client_rx) = watch::channel(None);
    tracker.spawn(crate::logs::serve(
        cfg.etcd.keys.clone(),
        cfg.etcd.host.clone(),
        etcd_client_rx,
        desired_rx.clone(),
        client.clone(),
        shutdown.clone(),
    ));

    // etcd sessions, retried with backoff.
    {
        let cfg = cfg.etcd.clone();
        let stop = shutdown.clone();
        let client = client.clone();
        let mut channels = etcd::Channels {
            desired: desired_tx,
            statuses: status_rx,
            health: health_rx,
            connected: connected_tx,
            client: etcd_client_tx,
        };
        tracker.spawn(async move {
            let mut pause = Duration::from_millis(500);
            let mut next_member = 0;
            while !stop.is_cancelled() {
                let version = client.get_supervisor_version().await.ok();
                let started = Instant::now();
                match etcd::session(&cfg, &mut next_member, version, &mut channels, &stop).await {
                    Ok(()) => break,
                    Err(e) => tracing::warn!(error = %e, "etcd session ended; keeping the last known state"),
                }
                channels.connected.send_replace(false);
                channels.client.send_replace(None);
                if started.elapsed() > Duration::from_secs(30) {
                    pause = Duration::from_millis(500);
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(10));
            }
        });
    }

    // The reconcile loop.
    let mut tick = tokio::time::interval(cfg.resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_reload = Instant::now();
    // The assignments and environment files last seen, and what they render to: rendered
    // again only when either changes.
    let mut cached: Option<(Assignments, plan::EnvFiles, plan::Desired)> = None;
    let mut env_reader = crate::envfiles::EnvFileReader::default();
    let mut history = ProcessHistory::default();
    let mut recheck: Option<Duration> = None;
    let health_changed = reconciler.health_changed();
    loop {
        // No waiting for bursts to settle: a burst of conf dir events (the agent's own writes
        // among them) leaves one stored wake-up, so at most one more pass, which costs less
        // than the delay would.
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = desired_rx.changed() => { if r.is_err() { break; } }
            _ = trigger.notified() => {}
            _ = health_changed.notified() => {}
            _ = tick.tick() => {}
            _ = tokio::time::sleep(recheck.unwrap_or(Duration::from_secs(3600))), if recheck.is_some() => {}
        }
        let assignments = desired_rx.borrow_and_update().clone();
        let new_assignments = !matches!(&cached, Some((seen, _, _)) if Arc::ptr_eq(seen, &assignments));
        // Read every pass (a few small files, if any): a rotated secret is applied within a
        // resync.
        let env_files = env_reader.read(&plan::environment_files(&assignments.assignments));
        let desired = match &cached {
            Some((_, files, desired)) if !new_assignments && *files == env_files => desired,
            _ => {
                let desired = plan::desired_with(
                    &assignments.assignments,
                    &assignments.unreadable,
                    &env_files,
                    &cfg.etcd.host,
                );
                &cached.insert((assignments.clone(), env_files, desired)).2
            }
        };
        // Cached before acting on it, so an agent restarted while etcd is away never acts on
        // older intent than it last acted on (a `corral stop` it carried out stays carried out).
        if new_assignments {
            let bytes = serde_json::to_vec(&assignments.assignments).unwrap_or_default();
            if let Err(e) = confdir::write_private_off_runtime(cfg.state_dir.join(CACHE_FILE), bytes).await {
                tracing::warn!(error = %e, "cannot cache assignments");
            }
        }
        if last_reload.elapsed() >= cfg.reload_every {
            reconciler.request_reload();
            last_reload = Instant::now();
        }
        let started = Instant::now();
        match reconciler.pass(desired).await {
            Ok(report) => {
                metrics.pass_done(started.elapsed(), desired, &report, &mut history);
                recheck = report.recheck_after;
                if !report.corrections.is_empty() {
                    tracing::info!(corrections = ?report.corrections, "reconciled");
                }
                status_tx.send_replace(Arc::new(report.statuses));
                health_tx.send_if_modified(|h| h.take().is_some());
            }
            Err(e) => {
                // Tried again at the next resync, not at a recheck meant for a pass that worked.
                recheck = None;
                metrics.pass_failed(started.elapsed(), e.metric_label());
                tracing::warn!(error = %e, "reconcile pass failed");
                let reason = match &e {
                    reconcile::PassError::Supervisor(e) => format!("supervisord: {e}"),
                    reconcile::PassError::ConfDir(e) => format!("conf dir: {e}"),
                };
                health_tx.send_if_modified(|h| {
                    let changed = h.as_ref() != Some(&reason);
                    *h = Some(reason);
                    changed
                });
            }
        }
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

fn http_router(connected: watch::Receiver<bool>, registry: Arc<Registry>) -> axum::Router {
    axum::Router::new()
        .route(
            "/healthz",
            axum::routing::get(move || {
                let etcd = *connected.borrow();
                async move { format!("ok\netcd_connected {etcd}\n") }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move { encode_metrics(&registry) }
            }),
        )
}

/// The registry in the OpenMetrics text format.
pub fn encode_metrics(registry: &Registry) -> axum::response::Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

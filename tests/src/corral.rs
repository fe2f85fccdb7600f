//! Corral's own components for tests: the real controller and agent code, run in-process
//! on loopback so tests can stop and restart them at will.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use corral_agent::etcd::EtcdConfig;
use corral_agent::run::AgentConfig;
use corral_agent::supervisor::{ClientConfig, Endpoint};
use corral_cli::client::ApiClient;
use corral_controller::api::{AppState, router};
use corral_controller::store::Store;
use corral_proto::fleet::FleetStatus;
use corral_proto::keys::Keys;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::supervisord::Supervisord;

/// The bearer token test controllers accept: an admin named `admin`.
pub const TOKEN: &str = "test-token";
/// A read-only token (`reader`) and an operator's (`operator`) test controllers also accept.
pub const READ_ONLY_TOKEN: &str = "test-read-only-token";
pub const OPERATOR_TOKEN: &str = "test-operator-token";

fn test_tokens() -> Vec<corral_controller::tokens::Token> {
    use corral_controller::tokens::Token;
    use corral_proto::api::Role;
    let token = |secret: &str, name: &str, role| Token {
        secret: secret.to_string(),
        name: name.to_string(),
        role,
    };
    vec![
        token(TOKEN, "admin", Role::Admin),
        token(READ_ONLY_TOKEN, "reader", Role::ReadOnly),
        token(OPERATOR_TOKEN, "operator", Role::Operator),
    ]
}

/// A controller replica (API + leader election), stopped by [`Controller::stop`] or on drop.
#[derive(Debug)]
pub struct Controller {
    pub url: String,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Controller {
    /// Starts a replica against `etcd_endpoints`, listening on a free loopback port.
    ///
    /// # Errors
    /// If etcd cannot be reached or the port cannot be bound.
    pub async fn start(etcd_endpoints: &[String], id: &str) -> anyhow::Result<Controller> {
        Controller::start_with(&corral_etcd::EtcdOptions::plain(etcd_endpoints), id).await
    }

    /// Like [`Controller::start`], with full etcd options (TLS, authentication).
    ///
    /// # Errors
    /// If etcd cannot be reached or the port cannot be bound.
    pub async fn start_with(etcd_options: &corral_etcd::EtcdOptions, id: &str) -> anyhow::Result<Controller> {
        Controller::start_with_policy(etcd_options, id, corral_controller::policy::Policy::default()).await
    }

    /// Like [`Controller::start_with`], enforcing `policy` at apply.
    ///
    /// # Errors
    /// If etcd cannot be reached or the port cannot be bound.
    pub async fn start_with_policy(
        etcd_options: &corral_etcd::EtcdOptions,
        id: &str,
        policy: corral_controller::policy::Policy,
    ) -> anyhow::Result<Controller> {
        let etcd = corral_etcd::Etcd::connect(etcd_options)
            .await
            .context("controller: connect to etcd")?;
        let store = Store::new(etcd, Keys::default());
        let shutdown = CancellationToken::new();
        let (leader_side, api_side) = corral_controller::leader::link();
        let leading = tokio::spawn(corral_controller::leader::run(
            store.clone(),
            id.to_string(),
            leader_side,
            shutdown.clone(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = router(AppState::new(store, test_tokens(), api_side).with_policy(policy));
        let stop = shutdown.clone();
        let serving = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        Ok(Controller {
            url,
            shutdown,
            tasks: vec![leading, serving],
        })
    }

    /// An API client with the test token.
    ///
    /// # Errors
    /// If the client cannot be built.
    pub fn api(&self) -> anyhow::Result<ApiClient> {
        self.api_as(TOKEN)
    }

    /// An API client with `token` (see [`READ_ONLY_TOKEN`], [`OPERATOR_TOKEN`]).
    ///
    /// # Errors
    /// If the client cannot be built.
    pub fn api_as(&self, token: &str) -> anyhow::Result<ApiClient> {
        Ok(ApiClient::new(&self.url, Some(token.to_string()))?)
    }

    /// Kills the replica as `kill -9` would: its tasks end where they are, it neither resigns
    /// nor revokes its lease, so another replica leads only once that lease expires.
    pub async fn kill(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }

    /// Stops the replica and waits for it (it resigns leadership).
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The configuration a test agent runs with: no labels, no listener, the conf dir watched,
/// and quick timings (3 s lease, 500 ms resync, `reloadConfig` every 30 s).
pub fn agent_config(
    host: &str,
    etcd_options: &corral_etcd::EtcdOptions,
    supervisor: ClientConfig,
    conf_dir: &Path,
    state_dir: &Path,
) -> AgentConfig {
    AgentConfig {
        etcd: EtcdConfig {
            etcd: etcd_options.clone(),
            keys: Keys::default(),
            host: host.to_string(),
            labels: BTreeMap::new(),
            lease_ttl: 3,
        },
        supervisor,
        conf_dir: conf_dir.to_path_buf(),
        state_dir: state_dir.to_path_buf(),
        resync: Duration::from_millis(500),
        reload_every: Duration::from_secs(30),
        listen: None,
        watch_conf_dir: true,
    }
}

/// One host's agent, stopped by [`Agent::stop`] or on drop.
#[derive(Debug)]
pub struct Agent {
    pub host: String,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Agent {
    /// Starts the agent for `host` against `sd`, keeping its state in `state_dir`.
    pub fn start(
        host: &str,
        labels: &[(&str, &str)],
        etcd_endpoints: &[String],
        sd: &Supervisord,
        state_dir: &Path,
    ) -> Agent {
        Agent::start_listening(host, labels, etcd_endpoints, sd, state_dir, None)
    }

    /// Like [`Agent::start`], serving `/metrics` and `/healthz` on `listen`.
    pub fn start_listening(
        host: &str,
        labels: &[(&str, &str)],
        etcd_endpoints: &[String],
        sd: &Supervisord,
        state_dir: &Path,
        listen: Option<std::net::SocketAddr>,
    ) -> Agent {
        Agent::start_with(
            host,
            labels,
            &corral_etcd::EtcdOptions::plain(etcd_endpoints),
            sd,
            state_dir,
            listen,
        )
    }

    /// Like [`Agent::start_listening`], with full etcd options (TLS, authentication).
    pub fn start_with(
        host: &str,
        labels: &[(&str, &str)],
        etcd_options: &corral_etcd::EtcdOptions,
        sd: &Supervisord,
        state_dir: &Path,
        listen: Option<std::net::SocketAddr>,
    ) -> Agent {
        let mut supervisor = ClientConfig::new(Endpoint::Unix(sd.socket.clone()));
        supervisor.credentials = sd.credentials.clone();
        let mut cfg = agent_config(host, etcd_options, supervisor, &sd.conf_dir, state_dir);
        cfg.etcd.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        cfg.listen = listen;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let host_name = host.to_string();
        let task = tokio::spawn(async move {
            if let Err(e) = corral_agent::run::run(cfg, stop).await {
                panic!("agent {host_name} could not start: {e}");
            }
        });
        Agent {
            host: host.to_string(),
            shutdown,
            task: Some(task),
        }
    }

    /// Stops the agent and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Polls the fleet status until `done` says yes, or fails after `timeout` with the last one.
///
/// # Errors
/// On timeout, with the last status seen.
pub async fn wait_for(
    api: &ApiClient,
    timeout: Duration,
    done: impl Fn(&FleetStatus) -> bool,
) -> anyhow::Result<FleetStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = api.status().await;
        if let Ok(s) = &last
            && done(s)
        {
            return Ok(s.clone());
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out; last status: {last:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every program ready everywhere it is assigned, at its current generation.
pub fn converged(s: &FleetStatus) -> bool {
    s.converged() && s.programs.iter().all(|p| p.updated == p.desired)
}

/// The path of one of Corral's binaries (`corral-agent`, `corral-controller`, `corral`),
/// built beside the test binary by `cargo build --bins` (as `scripts/test` does first).
///
/// # Errors
/// If the binary is not there.
pub fn binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe().context("own path")?;
    // target/<profile>/deps/<test> -> target/<profile>/<name>; a binary of this crate sits in
    // target/<profile> itself.
    let dir = exe.parent().context("own directory")?;
    let beside = dir.join(name);
    let path = if beside.exists() {
        beside
    } else {
        dir.parent()
            .context("test binary outside target/<profile>/deps")?
            .join(name)
    };
    anyhow::ensure!(
        path.exists(),
        "{} not built (run cargo build --workspace --bins first)",
        path.display()
    );
    Ok(path)
}

/// The body of a `/metrics` (or any) page.
///
/// # Errors
/// If the request fails or answers other than 2xx.
pub async fn scrape(url: &str) -> anyhow::Result<String> {
    corral_cli::client::ensure_tls_provider();
    let resp = reqwest::get(url).await?;
    anyhow::ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
    Ok(resp.text().await?)
}

/// The sum of every sample of a counter (all label sets) in a Prometheus text exposition.
pub fn counter_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

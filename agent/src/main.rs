//! `corral-agent`: one per host. Parses flags and runs `corral_agent::run::run`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use corral_agent::etcd::EtcdConfig;
use corral_agent::run::{AgentConfig, run};
use corral_agent::supervisor::{ClientConfig, Endpoint};
use corral_proto::keys::Keys;
use tokio_util::sync::CancellationToken;

/// Keeps this host's supervisord programs as Corral declares them.
#[derive(Debug, Parser)]
#[command(name = "corral-agent", version, about)]
struct Args {
    #[command(flatten)]
    etcd: corral_etcd::EtcdFlags,
    /// etcd key prefix.
    #[arg(long, env = "CORRAL_PREFIX", default_value = "/corral")]
    prefix: String,
    /// This host's name (default: the kernel's host name).
    #[arg(long, env = "CORRAL_HOST")]
    host: Option<String>,
    /// Host labels, k=v[,k=v].
    #[arg(long, env = "CORRAL_LABELS", default_value = "")]
    labels: String,
    /// supervisord's XML-RPC endpoint: unix:///path/to/supervisor.sock or http://host:port.
    #[arg(
        long,
        env = "CORRAL_SUPERVISOR_URL",
        default_value = "unix:///var/run/supervisor.sock"
    )]
    supervisor_url: String,
    #[arg(long, env = "CORRAL_SUPERVISOR_USERNAME")]
    supervisor_username: Option<String>,
    /// File holding the supervisord password (never pass secrets on the command line).
    #[arg(long, env = "CORRAL_SUPERVISOR_PASSWORD_FILE")]
    supervisor_password_file: Option<PathBuf>,
    /// The directory supervisord's [include] reads; Corral writes only corral-*.conf there.
    #[arg(long, env = "CORRAL_CONF_DIR", default_value = "/etc/supervisor/conf.d")]
    conf_dir: PathBuf,
    /// Where the agent keeps its cache and state.
    #[arg(long, env = "CORRAL_STATE_DIR", default_value = "/var/lib/corral-agent")]
    state_dir: PathBuf,
    /// Serves /healthz (and /metrics) here.
    #[arg(long, env = "CORRAL_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Seconds between passes without a trigger (also how often supervisord is polled).
    #[arg(long, env = "CORRAL_RESYNC_SECONDS", default_value_t = 2)]
    resync_seconds: u64,
    /// Seconds before the host's liveness key expires when the agent is silent.
    #[arg(long, env = "CORRAL_LEASE_TTL", default_value_t = 10)]
    lease_ttl: i64,
}

fn parse_labels(s: &str) -> anyhow::Result<BTreeMap<String, String>> {
    s.split(',')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--labels: {kv:?} is not k=v"))?;
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        // Colours only for a terminal: a log file or journald gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let host = match args.host {
        Some(h) => h,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("read the host name (or pass --host)")?
            .trim()
            .to_string(),
    };
    corral_proto::validate::check_host_name(&host)
        .map_err(anyhow::Error::msg)
        .context("--host")?;
    let labels = parse_labels(&args.labels)?;
    let host_check = corral_proto::resource::Host::new(
        corral_proto::resource::Metadata {
            name: host.clone(),
            labels: labels.clone(),
            ..Default::default()
        },
        Default::default(),
    );
    corral_proto::validate_host(host_check).context("--host/--labels")?;
    let mut supervisor = ClientConfig::new(Endpoint::parse(&args.supervisor_url)?);
    if let Some(user) = args.supervisor_username {
        let password = match args.supervisor_password_file {
            Some(p) => std::fs::read_to_string(&p)
                .with_context(|| format!("read {}", p.display()))?
                .trim_end_matches('\n')
                .to_string(),
            None => String::new(),
        };
        supervisor.credentials = Some((user, password));
    }
    let cfg = AgentConfig {
        etcd: EtcdConfig {
            etcd: args.etcd.options().context("etcd flags")?,
            keys: Keys::new(&args.prefix),
            host,
            labels,
            lease_ttl: args.lease_ttl,
        },
        supervisor,
        conf_dir: args.conf_dir,
        state_dir: args.state_dir,
        resync: Duration::from_secs(args.resync_seconds.max(1)),
        reload_every: Duration::from_secs(60),
        listen: args.metrics_listen,
        watch_conf_dir: true,
    };
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        stop.cancel();
    });
    run(cfg, shutdown).await?;
    Ok(())
}

//! `corral-controller`: parses flags, connects to etcd, serves the API and campaigns.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use corral_controller::api::{AppState, router};
use corral_controller::leader;
use corral_controller::store::Store;
use corral_proto::keys::Keys;
use tokio_util::sync::CancellationToken;

/// Corral's controller.
#[derive(Debug, Parser)]
#[command(name = "corral-controller", version, about)]
struct Args {
    #[command(flatten)]
    etcd: corral_etcd::EtcdFlags,
    /// Address the HTTP API listens on.
    #[arg(long, env = "CORRAL_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// File of bearer tokens, one per line; every /v1 call needs one.
    #[arg(long, env = "CORRAL_TOKEN_FILE")]
    token_file: PathBuf,
    /// etcd key prefix.
    #[arg(long, env = "CORRAL_PREFIX", default_value = "/corral")]
    prefix: String,
    /// This replica's name in the leader election (default: host name and pid).
    #[arg(long, env = "CORRAL_CONTROLLER_ID")]
    id: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        // Colours only for a terminal: a log file or journald gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let tokens: Vec<String> = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("read {}", args.token_file.display()))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    anyhow::ensure!(!tokens.is_empty(), "{} holds no token", args.token_file.display());
    let etcd = corral_etcd::Etcd::connect(&args.etcd.options().context("etcd flags")?)
        .await
        .context("connect to etcd")?;
    let store = Store::new(etcd, Keys::new(&args.prefix));
    let id = args.id.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });

    let shutdown = CancellationToken::new();
    let (leader_side, api_side) = leader::link();
    let leading = tokio::spawn(leader::run(store.clone(), id, leader_side, shutdown.clone()));
    let app = router(AppState::new(store, tokens, api_side));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, "serving the API");
    let stop = shutdown.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            stop.cancel();
        })
        .await?;
    shutdown.cancel();
    let _ = leading.await;
    Ok(())
}

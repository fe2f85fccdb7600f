//! Connecting to an etcd cluster, one healthy member at a time.
//!
//! etcd-client balances over all endpoints, and a single dead member then fails requests
//! (etcdv3/etcd-client#39). So Corral connects to one member, checked with a linearizable
//! read (which needs a quorum, so a member cut off from the others is skipped), and moves to
//! the next one when that member stops answering.

mod pages;

pub use pages::{PAGE, Pages, prefix_end, read_pages};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use std::path::PathBuf;

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use tokio::sync::RwLock;

/// How to reach and authenticate to the cluster.
#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    /// Client URLs of the members (`https://` with TLS).
    pub endpoints: Vec<String>,
    /// CA bundle that signed the members' certificates.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, for members that require client certificates.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// etcd user name and password (etcd's own authentication).
    pub user: Option<(String, String)>,
    /// The key read to check that a member serves linearizable reads: one this identity may
    /// read under etcd's authentication (an agent reads only its own assignments). Default
    /// `/corral/`.
    pub probe_key: Option<String>,
}

impl EtcdOptions {
    /// Plain endpoints, no TLS, no auth (tests, `corral dev`).
    pub fn plain(endpoints: &[String]) -> EtcdOptions {
        EtcdOptions {
            endpoints: endpoints.to_vec(),
            ..Default::default()
        }
    }

    /// These options, checking members by reading `key`.
    pub fn probing(mut self, key: impl Into<String>) -> EtcdOptions {
        self.probe_key = Some(key.into());
        self
    }

    fn connect_options(&self) -> Result<ConnectOptions, String> {
        let mut o = ConnectOptions::new()
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_connect_timeout(Duration::from_secs(2));
        if self.ca_file.is_some() || self.cert_file.is_some() {
            let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            match (&self.cert_file, &self.key_file) {
                (Some(c), Some(k)) => tls = tls.identity(Identity::from_pem(read(c)?, read(k)?)),
                (None, None) => {}
                _ => return Err("a client certificate needs both --etcd-cert-file and --etcd-key-file".into()),
            }
            o = o.with_tls(tls);
        }
        if let Some((user, password)) = &self.user {
            o = o.with_user(user.clone(), password.clone());
        }
        Ok(o)
    }
}

/// No member answered.
#[derive(Debug, thiserror::Error)]
#[error("no etcd endpoint answered ({})", .tried.join("; "))]
pub struct ConnectError {
    /// `endpoint: why` for each endpoint tried.
    pub tried: Vec<String>,
}

/// Connects to the first member, starting at `start`, that serves a linearizable read.
/// Returns the client and the index of its endpoint.
///
/// Keep-alive pings go no faster than every 10 s (etcd 3.4 drops clients that ping more often
/// than every 5 s); connect timeouts are short so failover is quick.
///
/// # Errors
/// [`ConnectError`] listing why each endpoint was skipped.
pub async fn connect_from(opts: &EtcdOptions, start: usize) -> Result<(Client, usize), ConnectError> {
    let endpoints = &opts.endpoints;
    let options = opts.connect_options().map_err(|e| ConnectError { tried: vec![e] })?;
    let probe = opts.probe_key.as_deref().unwrap_or("/corral/");
    let mut tried = Vec::new();
    for k in 0..endpoints.len() {
        let i = (start + k) % endpoints.len();
        let ep = &endpoints[i];
        let attempt = async {
            let mut c = Client::connect([ep.as_str()], Some(options.clone())).await?;
            c.get(probe, Some(GetOptions::new().with_count_only())).await?;
            Ok::<_, etcd_client::Error>(c)
        };
        match tokio::time::timeout(Duration::from_secs(4), attempt).await {
            Ok(Ok(c)) => return Ok((c, i)),
            Ok(Err(e)) if Etcd::is_unavailable(&e) => tried.push(format!("{ep}: {}", Etcd::short_reason(&e))),
            Ok(Err(e)) => tried.push(format!("{ep}: {e}")),
            Err(_) => tried.push(format!("{ep}: timed out")),
        }
    }
    Err(ConnectError { tried })
}

/// A shared connection that moves to another member when told its member failed.
#[derive(Clone)]
pub struct Etcd {
    opts: Arc<EtcdOptions>,
    current: Arc<RwLock<(Client, usize)>>,
    failovers: Arc<AtomicUsize>,
}

impl Etcd {
    /// Connects to the first healthy member.
    ///
    /// # Errors
    /// [`ConnectError`] when none answers.
    pub async fn connect(opts: &EtcdOptions) -> Result<Etcd, ConnectError> {
        let current = connect_from(opts, 0).await?;
        Ok(Etcd {
            opts: Arc::new(opts.clone()),
            current: Arc::new(RwLock::new(current)),
            failovers: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Connects, waiting for the cluster as long as it takes: every attempt that finds no
    /// member is logged and retried after a pause (1 s, doubling to 30 s). A replica started
    /// while etcd is away (a cluster restart, a network cut) comes up when etcd does.
    ///
    /// # Errors
    /// Only options that can never work (an unreadable certificate file): those are not retried.
    pub async fn connect_patiently(opts: &EtcdOptions) -> Result<Etcd, ConnectError> {
        opts.connect_options().map_err(|e| ConnectError { tried: vec![e] })?;
        let mut pause = Duration::from_secs(1);
        loop {
            match Etcd::connect(opts).await {
                Ok(etcd) => return Ok(etcd),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?pause, "waiting for etcd");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// The current client (cheap to clone; clones share the connection).
    pub async fn client(&self) -> Client {
        self.current.read().await.0.clone()
    }

    /// How many times the connection moved to another member.
    pub fn failovers(&self) -> usize {
        self.failovers.load(Ordering::Relaxed)
    }

    /// Whether `e` means the member is gone or unusable (as opposed to a refused request).
    pub fn is_unavailable(e: &etcd_client::Error) -> bool {
        match e {
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
            etcd_client::Error::GRpcStatus(s) => {
                matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded)
            }
            _ => false,
        }
    }

    /// A one-line reason for an error that means etcd is away (`is_unavailable`): the gRPC
    /// message, not the transport's whole chain.
    pub fn short_reason(e: &etcd_client::Error) -> String {
        match e {
            etcd_client::Error::GRpcStatus(s) if !s.message().is_empty() => s.message().to_string(),
            etcd_client::Error::GRpcStatus(s) => format!("{:?}", s.code()),
            other => other.to_string(),
        }
    }

    /// Moves to the next healthy member after the current one failed. Does nothing if another
    /// task already moved away from `failed_index`.
    ///
    /// # Errors
    /// [`ConnectError`] when no member answers; the old client is kept.
    pub async fn failover(&self) -> Result<(), ConnectError> {
        let failed = self.current.read().await.1;
        let mut guard = self.current.write().await;
        if guard.1 != failed {
            return Ok(());
        }
        let next = connect_from(&self.opts, failed + 1).await?;
        let eps = &self.opts.endpoints;
        tracing::warn!(from = %eps[failed], to = %eps[next.1], "etcd: moved to another member");
        *guard = next;
        self.failovers.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The etcd flags both binaries take (`#[command(flatten)]`).
#[derive(Clone, Debug, clap::Args)]
pub struct EtcdFlags {
    /// etcd client URLs, comma-separated (every member of the cluster).
    #[arg(
        long,
        env = "CORRAL_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    /// CA certificate (PEM) that signed the etcd members' certificates.
    #[arg(long, env = "CORRAL_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for members started with --client-cert-auth.
    #[arg(long, env = "CORRAL_ETCD_CERT_FILE", requires = "etcd_key_file")]
    pub etcd_cert_file: Option<PathBuf>,
    /// Client key (PEM) for --etcd-cert-file.
    #[arg(long, env = "CORRAL_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,
    /// etcd user (with etcd's authentication enabled).
    #[arg(long, env = "CORRAL_ETCD_USERNAME", requires = "etcd_password_file")]
    pub etcd_username: Option<String>,
    /// File holding that user's password (never pass secrets on the command line).
    #[arg(long, env = "CORRAL_ETCD_PASSWORD_FILE", requires = "etcd_username")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdFlags {
    /// The connection options these flags describe.
    ///
    /// # Errors
    /// If the password file cannot be read.
    pub fn options(&self) -> Result<EtcdOptions, std::io::Error> {
        let user = match (&self.etcd_username, &self.etcd_password_file) {
            (Some(u), Some(p)) => {
                let password = std::fs::read_to_string(p)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                Some((u.clone(), password.trim_end_matches('\n').to_string()))
            }
            _ => None,
        };
        Ok(EtcdOptions {
            endpoints: self.etcd_endpoints.clone(),
            ca_file: self.etcd_ca_file.clone(),
            cert_file: self.etcd_cert_file.clone(),
            key_file: self.etcd_key_file.clone(),
            user,
            probe_key: None,
        })
    }
}

/// The largest watch answer Corral accepts. etcd sends the events of up to a thousand
/// revisions in one answer to a watcher catching up, and etcd-client cannot ask for them in
/// fragments: a rollout writing thousands of assignments in 32-operation transactions makes
/// answers far above gRPC's default 4 MiB, which would end the watch (and the controller's
/// lead) in a loop.
pub const MAX_WATCH_MESSAGE: usize = 256 << 20;

/// Opens a watch with [`MAX_WATCH_MESSAGE`] as its message limit.
///
/// # Errors
/// etcd errors.
pub async fn watch(
    client: &Client,
    key: impl Into<Vec<u8>>,
    options: Option<etcd_client::WatchOptions>,
) -> Result<etcd_client::WatchStream, etcd_client::Error> {
    client
        .watch_client()
        .max_decoding_message_size(MAX_WATCH_MESSAGE)
        .watch(key, options)
        .await
}

//! Connecting to an etcd cluster, one healthy member at a time.
//!
//! etcd-client balances over all endpoints, and a single dead member then fails requests
//! (etcdv3/etcd-client#39). So Corral connects to one member, checked with a linearizable
//! read (which needs a quorum, so a member cut off from the others is skipped), and moves to
//! the next one when that member stops answering.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};
use tokio::sync::RwLock;

/// No member answered.
#[derive(Debug, thiserror::Error)]
#[error("no etcd endpoint answered ({})", .tried.join("; "))]
pub struct ConnectError {
    /// `endpoint: why` for each endpoint tried.
    pub tried: Vec<String>,
}

/// Keep-alive pings no faster than every 10 s (etcd 3.4 drops clients that ping more often
/// than every 5 s), and short connect timeouts so failover is quick.
fn options() -> ConnectOptions {
    ConnectOptions::new()
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_connect_timeout(Duration::from_secs(2))
}

/// Connects to the first member, starting at `start`, that serves a linearizable read.
/// Returns the client and the index of its endpoint.
///
/// # Errors
/// [`ConnectError`] listing why each endpoint was skipped.
pub async fn connect_from(endpoints: &[String], start: usize) -> Result<(Client, usize), ConnectError> {
    let mut tried = Vec::new();
    for k in 0..endpoints.len() {
        let i = (start + k) % endpoints.len();
        let ep = &endpoints[i];
        let attempt = async {
            let mut c = Client::connect([ep.as_str()], Some(options())).await?;
            c.get("/", Some(GetOptions::new().with_count_only())).await?;
            Ok::<_, etcd_client::Error>(c)
        };
        match tokio::time::timeout(Duration::from_secs(4), attempt).await {
            Ok(Ok(c)) => return Ok((c, i)),
            Ok(Err(e)) => tried.push(format!("{ep}: {e}")),
            Err(_) => tried.push(format!("{ep}: timed out")),
        }
    }
    Err(ConnectError { tried })
}

/// A shared connection that moves to another member when told its member failed.
#[derive(Clone)]
pub struct Etcd {
    endpoints: Arc<Vec<String>>,
    current: Arc<RwLock<(Client, usize)>>,
    failovers: Arc<AtomicUsize>,
}

impl Etcd {
    /// Connects to the first healthy member.
    ///
    /// # Errors
    /// [`ConnectError`] when none answers.
    pub async fn connect(endpoints: &[String]) -> Result<Etcd, ConnectError> {
        let current = connect_from(endpoints, 0).await?;
        Ok(Etcd {
            endpoints: Arc::new(endpoints.to_vec()),
            current: Arc::new(RwLock::new(current)),
            failovers: Arc::new(AtomicUsize::new(0)),
        })
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
        let next = connect_from(&self.endpoints, failed + 1).await?;
        tracing::warn!(from = %self.endpoints[failed], to = %self.endpoints[next.1], "etcd: moved to another member");
        *guard = next;
        self.failovers.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

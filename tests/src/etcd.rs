//! A single-member etcd (Debian `etcd-server`) on loopback in a temp dir.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::process::ChildGuard;

/// A running etcd, stopped and deleted on drop.
#[derive(Debug)]
pub struct Etcd {
    pub endpoint: String,
    process: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd on free loopback ports and waits until it answers.
    ///
    /// # Errors
    /// If etcd is missing, exits, or does not answer within 20 s.
    pub async fn start() -> anyhow::Result<Etcd> {
        let dir = tempfile::tempdir().context("temp dir for etcd")?;
        let client_port = crate::free_port()?;
        let peer_port = crate::free_port()?;
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}"), "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(dir.path().join("etcd.log"))?));
        let mut process = ChildGuard::spawn("etcd", cmd)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            process
                .check_alive()
                .with_context(|| std::fs::read_to_string(dir.path().join("etcd.log")).unwrap_or_default())?;
            if let Ok(mut c) = etcd_client::Client::connect([client.as_str()], None).await
                && c.status().await.is_ok()
            {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "etcd at {client} did not answer within 20 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Etcd {
            endpoint: client,
            process,
            _dir: dir,
        })
    }

    /// A connected client.
    ///
    /// # Errors
    /// If etcd cannot be reached.
    pub async fn client(&self) -> anyhow::Result<etcd_client::Client> {
        etcd_client::Client::connect([self.endpoint.as_str()], None)
            .await
            .with_context(|| format!("connect to etcd at {}", self.endpoint))
    }

    /// Kills etcd at once (to test outages).
    pub fn kill(&mut self) {
        self.process.kill();
    }
}

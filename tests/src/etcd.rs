//! A single-member etcd (Debian `etcd-server`) on loopback in a temp dir.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::process::ChildGuard;

/// A running etcd, stopped and deleted on drop.
#[derive(Debug)]
pub struct Etcd {
    pub endpoint: String,
    peer: String,
    process: ChildGuard,
    dir: tempfile::TempDir,
}

fn command(dir: &std::path::Path, client: &str, peer: &str) -> anyhow::Result<Command> {
    let mut cmd = Command::new("etcd");
    cmd.args(["--name", "test", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--listen-client-urls", client, "--advertise-client-urls", client])
        .args(["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer])
        .args(["--initial-cluster", &format!("test={peer}"), "--log-level", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("etcd.log"))?,
        ));
    Ok(cmd)
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
        let process = ChildGuard::spawn("etcd", command(dir.path(), &client, &peer)?)?;
        let mut etcd = Etcd {
            endpoint: client,
            peer,
            process,
            dir,
        };
        etcd.wait_ready().await?;
        Ok(etcd)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let dir = self.dir.path();
            self.process
                .check_alive()
                .with_context(|| std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default())?;
            if let Ok(mut c) = etcd_client::Client::connect([self.endpoint.as_str()], None).await
                && c.status().await.is_ok()
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "etcd at {} did not answer within 20 s",
                self.endpoint
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The endpoint list clients take.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint.clone()]
    }

    /// Starts etcd again on the same ports and data (after [`Etcd::kill`]).
    ///
    /// # Errors
    /// If it does not come back within 20 s.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.kill();
        self.process = ChildGuard::spawn("etcd", command(self.dir.path(), &self.endpoint, &self.peer)?)?;
        self.wait_ready().await
    }

    /// Starts etcd again on the same ports and data with extra flags (a lower
    /// `--max-request-bytes`, say), as an operator changing its settings would.
    ///
    /// # Errors
    /// If it does not come back within 20 s.
    pub async fn restart_with(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        self.process.kill();
        let mut cmd = command(self.dir.path(), &self.endpoint, &self.peer)?;
        cmd.args(extra);
        self.process = ChildGuard::spawn("etcd", cmd)?;
        self.wait_ready().await
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

fn member_command(args: &[String], dir: &std::path::Path) -> anyhow::Result<Command> {
    let mut cmd = Command::new("etcd");
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::from(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("etcd.log"))?,
    ));
    Ok(cmd)
}

/// A 3-member (or n-member) etcd cluster on loopback, like production runs it.
#[derive(Debug)]
pub struct EtcdCluster {
    pub endpoints: Vec<String>,
    members: Vec<ChildGuard>,
    /// Each member's command line, to start it again.
    args: Vec<Vec<String>>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers through every endpoint.
    ///
    /// # Errors
    /// If a member exits or the cluster does not form within 30 s.
    pub async fn start(n: usize) -> anyhow::Result<EtcdCluster> {
        let dir = tempfile::tempdir().context("temp dir for etcd cluster")?;
        let mut clients = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..n {
            clients.push(format!("http://127.0.0.1:{}", crate::free_port()?));
            peers.push(format!("http://127.0.0.1:{}", crate::free_port()?));
        }
        let initial: Vec<String> = peers.iter().enumerate().map(|(i, p)| format!("m{i}={p}")).collect();
        let initial = initial.join(",");
        let mut members = Vec::new();
        let mut args = Vec::new();
        for i in 0..n {
            let mdir = dir.path().join(format!("m{i}"));
            std::fs::create_dir_all(&mdir)?;
            let a: Vec<String> = [
                "--name".to_string(),
                format!("m{i}"),
                "--data-dir".to_string(),
                mdir.join("data").display().to_string(),
                "--listen-client-urls".to_string(),
                clients[i].clone(),
                "--advertise-client-urls".to_string(),
                clients[i].clone(),
                "--listen-peer-urls".to_string(),
                peers[i].clone(),
                "--initial-advertise-peer-urls".to_string(),
                peers[i].clone(),
                "--initial-cluster".to_string(),
                initial.clone(),
                "--initial-cluster-state".to_string(),
                "new".to_string(),
                "--log-level".to_string(),
                "error".to_string(),
            ]
            .into();
            members.push(ChildGuard::spawn("etcd member", member_command(&a, &mdir)?)?);
            args.push(a);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for endpoint in &clients {
            loop {
                for m in &mut members {
                    m.check_alive()?;
                }
                if let Ok(mut c) = etcd_client::Client::connect([endpoint.as_str()], None).await
                    && c.get("/", None).await.is_ok()
                {
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "etcd cluster did not form within 30 s");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(EtcdCluster {
            endpoints: clients,
            members,
            args,
            _dir: dir,
        })
    }

    /// Kills member `i` (the others keep quorum).
    pub fn kill_member(&mut self, i: usize) {
        if let Some(m) = self.members.get_mut(i) {
            m.kill();
        }
    }

    /// Starts member `i` again on its data (after [`EtcdCluster::kill_member`]).
    ///
    /// # Errors
    /// If it cannot be started.
    pub fn restart_member(&mut self, i: usize) -> anyhow::Result<()> {
        let (Some(a), Some(m)) = (self.args.get(i), self.members.get_mut(i)) else {
            anyhow::bail!("no member {i}");
        };
        m.kill();
        let dir = self._dir.path().join(format!("m{i}"));
        *m = ChildGuard::spawn("etcd member", member_command(a, &dir)?)?;
        Ok(())
    }
}

/// A single-member etcd that requires TLS client certificates and has authentication on
/// (user `root`), like the production setup in deploy/etcd.
#[derive(Debug)]
pub struct SecureEtcd {
    pub endpoint: String,
    pub ca: std::path::PathBuf,
    pub client_cert: std::path::PathBuf,
    pub client_key: std::path::PathBuf,
    pub password: String,
    _process: ChildGuard,
    pub dir: tempfile::TempDir,
}

impl SecureEtcd {
    /// Makes a CA, a server and a client certificate, starts etcd with them, and enables
    /// authentication with a `root` user.
    ///
    /// # Errors
    /// If openssl or etcd fail, or etcd does not answer within 20 s.
    pub async fn start() -> anyhow::Result<SecureEtcd> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        crate::pki::make_ca(d)?;
        crate::pki::issue(d, "server", "etcd", crate::pki::Usage::Server)?;
        crate::pki::issue(d, "client", "root", crate::pki::Usage::Client)?;
        let endpoint = format!("https://127.0.0.1:{}", crate::free_port()?);
        let peer = format!("http://127.0.0.1:{}", crate::free_port()?);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "secure", "--data-dir"])
            .arg(d.join("data"))
            .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("secure={peer}"), "--log-level", "error"])
            .arg("--cert-file")
            .arg(d.join("server.pem"))
            .arg("--key-file")
            .arg(d.join("server.key"))
            .arg("--trusted-ca-file")
            .arg(d.join("ca.pem"))
            .arg("--client-cert-auth")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(d.join("etcd.log"))?));
        let mut process = ChildGuard::spawn("etcd", cmd)?;
        let password = "s3cret-etcd".to_string();
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(d.join("ca.pem"))?))
            .identity(etcd_client::Identity::from_pem(
                std::fs::read(d.join("client.pem"))?,
                std::fs::read(d.join("client.key"))?,
            ));
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut client = loop {
            process
                .check_alive()
                .with_context(|| std::fs::read_to_string(d.join("etcd.log")).unwrap_or_default())?;
            let opts = etcd_client::ConnectOptions::new().with_tls(tls.clone());
            let last = match etcd_client::Client::connect([endpoint.as_str()], Some(opts)).await {
                Ok(mut c) => match c.status().await {
                    Ok(_) => break c,
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            anyhow::ensure!(
                Instant::now() < deadline,
                "secure etcd did not answer within 20 s: {last}\n{}",
                std::fs::read_to_string(d.join("etcd.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        client.user_add("root", password.clone(), None).await?;
        client.user_grant_role("root", "root").await?;
        client.auth_enable().await?;
        Ok(SecureEtcd {
            ca: d.join("ca.pem"),
            client_cert: d.join("client.pem"),
            client_key: d.join("client.key"),
            endpoint,
            password,
            _process: process,
            dir,
        })
    }
}

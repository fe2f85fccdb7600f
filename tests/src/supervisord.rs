//! A real supervisord (Debian `supervisor`, 4.2) in a temp dir, listening on a UNIX socket
//! and, if asked, on loopback TCP with a username and password.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use corral_agent::supervisor::{Client, ClientConfig, Endpoint};

use crate::process::ChildGuard;

/// How to start supervisord.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Also listen on `127.0.0.1:<free port>`.
    pub tcp: bool,
    /// Username and password for both listeners.
    pub credentials: Option<(String, String)>,
    /// supervisord's `minfds`: each child closes descriptors 3..minfds between its fork and
    /// its exec (in Python), so a large value widens that window.
    pub minfds: Option<u64>,
}

/// A running supervisord whose `[include]` reads `conf_dir/*.conf`; stopped on drop.
#[derive(Debug)]
pub struct Supervisord {
    pub dir: PathBuf,
    pub conf_dir: PathBuf,
    pub socket: PathBuf,
    pub tcp_url: Option<String>,
    pub credentials: Option<(String, String)>,
    process: ChildGuard,
    _tmp: tempfile::TempDir,
}

fn command(dir: &Path) -> anyhow::Result<Command> {
    let mut cmd = Command::new("supervisord");
    cmd.arg("-n")
        .arg("-c")
        .arg(dir.join("supervisord.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("stderr.log"))?,
        ));
    Ok(cmd)
}

impl Supervisord {
    /// Starts supervisord and waits until it answers `getState`.
    ///
    /// # Errors
    /// If supervisord is missing, exits, or does not answer within 20 s.
    pub async fn start(opts: Options) -> anyhow::Result<Supervisord> {
        let tmp = tempfile::tempdir().context("temp dir for supervisord")?;
        let dir = tmp.path().to_path_buf();
        let conf_dir = dir.join("conf.d");
        std::fs::create_dir_all(&conf_dir)?;
        std::fs::create_dir_all(dir.join("logs"))?;
        let socket = dir.join("supervisor.sock");
        let auth = match &opts.credentials {
            // supervisord %-expands the password too: a literal % must be written %%.
            Some((u, p)) => format!("username={u}\npassword={}\n", corral_proto::template::escape_percent(p)),
            None => String::new(),
        };
        let tcp_port = if opts.tcp { Some(crate::free_port()?) } else { None };
        let inet = match tcp_port {
            Some(port) => format!("[inet_http_server]\nport=127.0.0.1:{port}\n{auth}"),
            None => String::new(),
        };
        let conf = format!(
            "[supervisord]\nlogfile={d}/supervisord.log\npidfile={d}/supervisord.pid\nchildlogdir={d}/logs\nnodaemon=true\nuser=root\n{minfds}\
             [unix_http_server]\nfile={sock}\nchmod=0700\n{auth}{inet}\
             [rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\
             [include]\nfiles = {conf_d}/*.conf\n",
            d = dir.display(),
            sock = socket.display(),
            conf_d = conf_dir.display(),
            minfds = opts.minfds.map(|n| format!("minfds={n}\n")).unwrap_or_default(),
        );
        let conf_path = dir.join("supervisord.conf");
        std::fs::write(&conf_path, conf)?;
        let process = ChildGuard::spawn("supervisord", command(&dir)?)?;
        let mut sd = Supervisord {
            dir,
            conf_dir,
            socket,
            tcp_url: tcp_port.map(|p| format!("http://127.0.0.1:{p}")),
            credentials: opts.credentials,
            process,
            _tmp: tmp,
        };
        sd.wait_ready().await?;
        Ok(sd)
    }

    /// `kill -9` of supervisord itself, then a new one on the same config (as systemd would
    /// restart it): the killed one's programs are left running, orphaned, and the new one
    /// starts its own.
    ///
    /// # Errors
    /// If the new supervisord does not answer within 20 s.
    pub async fn kill9_and_restart(&mut self) -> anyhow::Result<()> {
        self.process.kill_alone();
        self.process = ChildGuard::spawn("supervisord", command(&self.dir)?)?;
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.process.check_alive().with_context(|| self.log())?;
            let mut ready = self.client().await?.get_state().await.is_ok();
            if let Some(url) = &self.tcp_url {
                ready &= self.client_at(url).await?.get_state().await.is_ok();
            }
            if ready {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "supervisord did not answer within 20 s\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// supervisord's own log, for failure messages.
    pub fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        format!("{}{}", read("stderr.log"), read("supervisord.log"))
    }

    /// The `unix://` URL of its socket.
    pub fn unix_url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// A client on the UNIX socket, with the configured credentials.
    ///
    /// # Errors
    /// If the client cannot be built.
    pub async fn client(&self) -> anyhow::Result<Client> {
        self.client_at(&self.unix_url()).await
    }

    /// A client on `url`, with the configured credentials.
    ///
    /// # Errors
    /// If the URL is bad or the client cannot be built.
    pub async fn client_at(&self, url: &str) -> anyhow::Result<Client> {
        let mut cfg = ClientConfig::new(Endpoint::parse(url)?);
        cfg.credentials = self.credentials.clone();
        cfg.timeout = Duration::from_secs(30);
        Ok(Client::new(cfg)?)
    }

    /// Writes `conf_dir/<name>` (for hand-made test configs).
    ///
    /// # Errors
    /// If the file cannot be written.
    pub fn write_conf(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let path = self.conf_dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

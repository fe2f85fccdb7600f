//! `corral dev`: a single-host Corral from nothing, in one directory: etcd, supervisord, the
//! controller and one agent, with the example specs applied. Ctrl-C stops everything.

use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use corral_cli::client::ApiClient;
use corral_proto::resource::Resource;
use tokio::process::{Child, Command};

use crate::input::read_resources;

/// A started server, stopped with SIGTERM (then SIGKILL) when the session ends.
struct Server {
    name: &'static str,
    child: Child,
}

impl Server {
    fn spawn(name: &'static str, mut cmd: Command, logs: &Path) -> anyhow::Result<Server> {
        let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
        cmd.stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("start {name}; is it installed?"))?;
        Ok(Server { name, child })
    }

    async fn stop(mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        if tokio::time::timeout(grace, self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("{} exited ({status})", self.name)),
            _ => None,
        }
    }
}

fn free_port(preferred: u16) -> anyhow::Result<u16> {
    if TcpListener::bind(("127.0.0.1", preferred)).is_ok() {
        return Ok(preferred);
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn wait_until(what: &str, timeout: Duration, mut ready: impl AsyncFnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready().await {
        anyhow::ensure!(Instant::now() < deadline, "{what} did not come up within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A sibling binary of this one (same build), else the name on PATH.
fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name(name))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Writes a file only its owner may read (the controller refuses a token file others may).
fn write_private(path: &Path, content: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(content.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

fn fresh_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Runs until Ctrl-C (or SIGTERM), then stops every process it started.
pub async fn dev(dir: &Path, apply: Option<&Path>, port: u16, token: Option<&str>) -> anyhow::Result<ExitCode> {
    let dir = std::path::absolute(dir)?;
    let logs = dir.join("logs");
    let conf_d = dir.join("conf.d");
    for d in [&dir, &logs, &conf_d, &dir.join("agent")] {
        std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    let mut servers: Vec<Server> = Vec::new();
    let result = start_all(&dir, &logs, &conf_d, apply, port, token, &mut servers).await;
    let code = match result {
        Ok(()) => {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let mut check = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break ExitCode::SUCCESS,
                    _ = term.recv() => break ExitCode::SUCCESS,
                    _ = check.tick() => {
                        if let Some(why) = servers.iter_mut().find_map(Server::exited) {
                            eprintln!("error: {why}; see {}", logs.display());
                            break ExitCode::from(1);
                        }
                    }
                }
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}\nlogs are in {}", logs.display());
            ExitCode::from(1)
        }
    };
    outln!("stopping...");
    // Reverse order: the agent first, supervisord (which stops its children) before etcd.
    while let Some(s) = servers.pop() {
        s.stop(Duration::from_secs(20)).await;
    }
    outln!("stopped; state kept in {}", dir.display());
    Ok(code)
}

async fn start_all(
    dir: &Path,
    logs: &Path,
    conf_d: &Path,
    apply: Option<&Path>,
    port: u16,
    token: Option<&str>,
    servers: &mut Vec<Server>,
) -> anyhow::Result<()> {
    // etcd
    let (client_port, peer_port) = (free_port(22379)?, free_port(22380)?);
    let etcd_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut etcd = Command::new("etcd");
    etcd.args(["--name", "dev", "--data-dir"])
        .arg(dir.join("etcd"))
        .args(["--listen-client-urls", &etcd_url, "--advertise-client-urls", &etcd_url])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("dev={peer_url}")]);
    servers.push(Server::spawn("etcd", etcd, logs)?);
    wait_until("etcd", Duration::from_secs(20), async || {
        corral_cli::client::ensure_tls_provider();
        reqwest::get(format!("{etcd_url}/health"))
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await?;

    // supervisord
    let socket = dir.join("supervisor.sock");
    let conf = format!(
        "[supervisord]\nlogfile={d}/logs/supervisord-main.log\npidfile={d}/supervisord.pid\nchildlogdir={d}/logs\nnodaemon=true\n\
         [unix_http_server]\nfile={s}\nchmod=0700\n\
         [supervisorctl]\nserverurl=unix://{s}\n\
         [rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\
         [include]\nfiles = {c}/*.conf\n",
        d = dir.display(),
        s = socket.display(),
        c = conf_d.display()
    );
    let conf_path = dir.join("supervisord.conf");
    std::fs::write(&conf_path, conf)?;
    let mut sd = Command::new("supervisord");
    sd.arg("-n").arg("-c").arg(&conf_path);
    servers.push(Server::spawn("supervisord", sd, logs)?);
    wait_until("supervisord", Duration::from_secs(20), async || socket.exists()).await?;

    // controller
    // The caller's --token/CORRAL_TOKEN if given, else a fresh one.
    let token = match token {
        Some(t) => t.to_string(),
        None => fresh_token()?,
    };
    let token_file = dir.join("token");
    write_private(&token_file, &format!("{token} dev admin\n"))?;
    let api_port = free_port(port)?;
    let server = format!("http://127.0.0.1:{api_port}");
    let mut controller = Command::new(sibling("corral-controller"));
    controller
        .args([
            "--etcd-endpoints",
            &etcd_url,
            "--listen",
            &format!("127.0.0.1:{api_port}"),
            "--token-file",
        ])
        .arg(&token_file);
    servers.push(Server::spawn("controller", controller, logs)?);
    wait_until("the controller", Duration::from_secs(20), async || {
        corral_cli::client::ensure_tls_provider();
        reqwest::get(format!("{server}/healthz"))
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await?;

    // agent
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string();
    let host = if corral_proto::validate::check_host_name(&host).is_ok() {
        host
    } else {
        "local".to_string()
    };
    let metrics = format!("127.0.0.1:{}", free_port(29100)?);
    let mut agent = Command::new(sibling("corral-agent"));
    agent
        .args(["--etcd-endpoints", &etcd_url, "--host", &host, "--labels", "role=app"])
        .args(["--metrics-listen", &metrics])
        .args(["--supervisor-url", &format!("unix://{}", socket.display())])
        .arg("--conf-dir")
        .arg(conf_d)
        .arg("--state-dir")
        .arg(dir.join("agent"));
    servers.push(Server::spawn("agent", agent, logs)?);

    let api = ApiClient::new(&server, Some(token.clone()))?;
    wait_until("the agent", Duration::from_secs(20), async || {
        api.hosts()
            .await
            .is_ok_and(|h| h.iter().any(|h| h.status.as_ref().is_some_and(|s| s.ready)))
    })
    .await?;
    if let Some(apply) = apply {
        let docs = read_resources(&[apply.display().to_string()])?;
        anyhow::ensure!(docs.errors.is_empty(), "{}", docs.errors.join("\n"));
        for (_, r) in docs.resources.iter().filter(|(_, r)| !matches!(r, Resource::Host(_))) {
            let what = format!("{}/{}", r.kind().as_str().to_lowercase(), r.metadata().name);
            // Only what is not there yet: a second run keeps what the user changed since
            // (a `corral stop` stays stopped); delete the dir to start afresh.
            let exists = match r {
                Resource::Program(_) => api.program(&r.metadata().name).await.is_ok(),
                _ => api.group(&r.metadata().name).await.is_ok(),
            };
            if exists {
                outln!("{what} kept as it is");
                continue;
            }
            let v = api.apply(r, false).await.with_context(|| format!("apply {what}"))?;
            outln!("{what} {}", v.result.as_str());
        }
    }
    outln!(
        "\nCorral is running on this host ({host}), everything under {dir}.\n\n  export PATH={bin}:$PATH\n  export CORRAL_SERVER={server}\n  export CORRAL_TOKEN={token}\n\nthen try:\n  corral get programs\n  corral status\n  corral describe program gunicorn\n  supervisorctl -c {conf} status     # what supervisord runs\n  corral stop celery-beat && corral get programs\n  corral restart myapp:\n  curl -s http://{metrics}/metrics | grep corral_program   # the agent's metrics\n\nready. Ctrl-C stops everything.",
        dir = dir.display(),
        conf = conf_path.display(),
        bin = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|p| p.display().to_string()))
            .unwrap_or_else(|| ".".into())
    );
    Ok(())
}

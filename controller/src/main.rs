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
#[command(name = "corral-controller", version, about, subcommand_negates_reqs = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    etcd: corral_etcd::EtcdFlags,
    /// Address the API listens on. Beyond loopback it needs TLS (--tls-cert-file), or
    /// --plain-http-beyond-loopback when a proxy on this host terminates TLS.
    #[arg(long, env = "CORRAL_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Serve HTTPS with this certificate chain (PEM).
    #[arg(long, env = "CORRAL_TLS_CERT_FILE", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// The certificate's private key (PEM; refused if others may read it).
    #[arg(long, env = "CORRAL_TLS_KEY_FILE", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM), besides the bearer token.
    #[arg(long, env = "CORRAL_TLS_CLIENT_CA_FILE", requires = "tls_cert_file")]
    tls_client_ca_file: Option<PathBuf>,
    /// Serve plain HTTP on an address beyond loopback (tokens then cross the network in
    /// clear: only behind a TLS-terminating proxy).
    #[arg(long, env = "CORRAL_PLAIN_HTTP_BEYOND_LOOPBACK")]
    plain_http_beyond_loopback: bool,
    /// File of bearer tokens: `TOKEN NAME ROLE` per line (role read-only, operator or admin;
    /// a token alone is an admin). Every /v1 call needs one; the audit records its name.
    #[arg(long, env = "CORRAL_TOKEN_FILE", required = true)]
    token_file: Option<PathBuf>,
    /// etcd key prefix.
    #[arg(long, env = "CORRAL_PREFIX", default_value = "/corral")]
    prefix: String,
    /// What specs may ask of hosts (users, directories, executables, environment files),
    /// enforced at apply; see deploy/policy.yaml. Without it, anything a spec can say.
    #[arg(long, env = "CORRAL_POLICY_FILE")]
    policy_file: Option<PathBuf>,
    /// This replica's name in the leader election (default: host name and pid).
    #[arg(long, env = "CORRAL_CONTROLLER_ID")]
    id: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// etcd's roles and users for Corral (run with etcd's root credentials): the controller
    /// writes specs and assignments; each host's agent reads only its own assignments and
    /// writes only its own keys.
    #[command(subcommand)]
    Access(AccessCommand),
}

#[derive(Debug, clap::Subcommand)]
enum AccessCommand {
    /// The controller's role and user `corral-controller`: everything under the prefix.
    ///
    /// Example: corral-controller access controller --password-file /etc/corral/etcd-password
    ///   --etcd-endpoints https://etcd-1:2379 --etcd-username root --etcd-password-file root.pw
    Controller {
        #[command(flatten)]
        target: AccessTarget,
        #[command(flatten)]
        login: LoginFlags,
    },
    /// A host's role and user `corral-agent-HOST`: its own assignments, host, alive and status
    /// keys, nothing else. Run again to change its password; `remove-host` undoes it.
    ///
    /// Example: corral-controller access add-host web-1 --new-password-file web-1.pw
    ///   --etcd-endpoints https://etcd-1:2379 --etcd-username root --etcd-password-file root.pw
    ///
    /// Or with a client certificate: ... add-host web-1 --issue-cert-ca ca.pem
    ///   --issue-cert-ca-key ca.key --cert-out web-1  (writes web-1.pem and web-1.key)
    AddHost {
        host: String,
        #[command(flatten)]
        target: AccessTarget,
        #[command(flatten)]
        login: LoginFlags,
    },
    /// Deletes a host's etcd user and role: its agent can no longer read or write anything.
    RemoveHost {
        host: String,
        #[command(flatten)]
        target: AccessTarget,
    },
}

/// Where the roles are made: the cluster (as etcd's root) and Corral's prefix.
#[derive(Debug, clap::Args)]
struct AccessTarget {
    #[command(flatten)]
    etcd: corral_etcd::EtcdFlags,
    /// etcd key prefix.
    #[arg(long, env = "CORRAL_PREFIX", default_value = "/corral")]
    prefix: String,
}

/// How the user logs in; with no password flag, by client certificate (CN = the user's name),
/// which `--issue-cert-ca` makes.
#[derive(Debug, clap::Args)]
struct LoginFlags {
    /// The user's password, read from this file.
    #[arg(long, conflicts_with_all = ["new_password_file", "issue_cert_ca"])]
    password_file: Option<PathBuf>,
    /// Generates a password and writes it to this new file (mode 0600), for the host's
    /// --etcd-password-file.
    #[arg(long, conflicts_with = "issue_cert_ca")]
    new_password_file: Option<PathBuf>,
    /// Issues the user a client certificate signed by this CA certificate (etcd's
    /// --trusted-ca-file), with its key in --issue-cert-ca-key; written to --cert-out.
    #[arg(long, requires_all = ["issue_cert_ca_key", "cert_out"])]
    issue_cert_ca: Option<PathBuf>,
    /// The CA's private key, to sign the certificate.
    #[arg(long, requires = "issue_cert_ca")]
    issue_cert_ca_key: Option<PathBuf>,
    /// Writes the certificate to PREFIX.pem and its new key to PREFIX.key (mode 0600); neither
    /// may exist yet. Give them to the host's --etcd-cert-file and --etcd-key-file.
    #[arg(long, value_name = "PREFIX", requires = "issue_cert_ca")]
    cert_out: Option<PathBuf>,
    /// How long the issued certificate is valid.
    #[arg(long, default_value_t = 365, requires = "issue_cert_ca")]
    cert_days: u32,
}

/// Where an issued certificate and key go: `PREFIX.pem`, `PREFIX.key`.
fn cert_paths(prefix: &std::path::Path) -> (PathBuf, PathBuf) {
    let with = |ext: &str| {
        let mut p = prefix.as_os_str().to_owned();
        p.push(ext);
        PathBuf::from(p)
    };
    (with(".pem"), with(".key"))
}

/// Creates `path` with `contents`; it must not exist yet.
fn create_new(path: &std::path::Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("create {} (it must not exist yet)", path.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("write {}", path.display()))
}

impl LoginFlags {
    /// The certificate to issue `name`, made before etcd is touched (a bad CA changes nothing).
    fn certificate(&self, name: &str) -> anyhow::Result<Option<corral_controller::access::IssuedCert>> {
        let (Some(ca), Some(ca_key), Some(out)) = (&self.issue_cert_ca, &self.issue_cert_ca_key, &self.cert_out) else {
            return Ok(None);
        };
        let (pem, key) = cert_paths(out);
        for p in [&pem, &key] {
            anyhow::ensure!(!p.exists(), "{} exists already; choose another --cert-out", p.display());
        }
        let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()));
        let issued = corral_controller::access::issue_client_cert(&read(ca)?, &read(ca_key)?, name, self.cert_days)?;
        Ok(Some(issued))
    }
}

impl LoginFlags {
    fn login(&self) -> anyhow::Result<corral_controller::access::Login> {
        use corral_controller::access::Login;
        if let Some(p) = &self.password_file {
            let pw = std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
            let pw = pw.trim_end_matches('\n').to_string();
            anyhow::ensure!(!pw.is_empty(), "{} is empty", p.display());
            return Ok(Login::Password(pw));
        }
        if let Some(p) = &self.new_password_file {
            let mut bytes = [0u8; 24];
            std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)
                .context("read /dev/urandom")?;
            let pw: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            create_new(p, &format!("{pw}\n"), 0o600)?;
            return Ok(Login::Password(pw));
        }
        Ok(Login::Certificate)
    }
}

async fn access(command: AccessCommand) -> anyhow::Result<()> {
    use corral_controller::access;
    let connect = |target: &AccessTarget| -> anyhow::Result<corral_etcd::EtcdOptions> {
        Ok(target
            .etcd
            .options()
            .context("etcd flags")?
            .probing(format!("{}/", Keys::new(&target.prefix).prefix())))
    };
    let (target, identity, login) = match command {
        AccessCommand::RemoveHost { host, target } => {
            corral_proto::validate::check_host_name(&host).map_err(anyhow::Error::msg)?;
            let (mut client, _) = corral_etcd::connect_from(&connect(&target)?, 0)
                .await
                .context("connect to etcd")?;
            let name = access::host_user(&host);
            access::remove(&mut client, &name).await?;
            println!("removed etcd user and role {name}");
            return Ok(());
        }
        AccessCommand::Controller { target, login } => {
            let identity = access::controller_grants(&Keys::new(&target.prefix));
            (target, identity, login)
        }
        AccessCommand::AddHost { host, target, login } => {
            let identity = access::host_grants(&Keys::new(&target.prefix), &host).map_err(anyhow::Error::msg)?;
            (target, identity, login)
        }
    };
    let options = connect(&target)?;
    let (mut client, _) = corral_etcd::connect_from(&options, 0)
        .await
        .context("connect to etcd")?;
    let certificate = login.certificate(&identity.name)?;
    let how = login.login()?;
    access::setup(&mut client, &identity, &how).await?;
    println!("etcd user and role {}:", identity.name);
    for g in &identity.grants {
        println!("  {g}");
    }
    if let (Some(issued), Some(out)) = (certificate, &login.cert_out) {
        let (pem, key) = cert_paths(out);
        create_new(&key, &issued.key_pem, 0o600)?;
        create_new(&pem, &issued.cert_pem, 0o644)?;
        println!(
            "client certificate {} (CN {}, valid {} days) and key {}: give them to --etcd-cert-file and --etcd-key-file",
            pem.display(),
            identity.name,
            login.cert_days,
            key.display()
        );
        return Ok(());
    }
    match how {
        access::Login::Password(_) => println!(
            "log in with --etcd-username {} --etcd-password-file {}",
            identity.name,
            login
                .password_file
                .or(login.new_password_file)
                .unwrap_or_default()
                .display()
        ),
        access::Login::Certificate => println!(
            "log in with a client certificate whose CN is {} (no password login)",
            identity.name
        ),
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn terminated() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        // Colours only for a terminal: a log file or journald gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    if let Some(Command::Access(command)) = args.command {
        return access(command).await;
    }
    let token_file = args.token_file.context("--token-file is required")?;
    let tls = match (&args.tls_cert_file, &args.tls_key_file) {
        (Some(cert), Some(key)) => Some(corral_controller::tls::server_config(
            &corral_controller::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca_file.clone(),
            },
        )?),
        _ => None,
    };
    anyhow::ensure!(
        tls.is_some() || args.listen.ip().is_loopback() || args.plain_http_beyond_loopback,
        "--listen {} is beyond loopback without TLS: tokens would cross the network in clear; \
         give --tls-cert-file and --tls-key-file (or --plain-http-beyond-loopback behind a TLS proxy)",
        args.listen
    );
    let tokens = corral_controller::tokens::read_token_file(&token_file)?;
    for t in tokens.iter().filter(|t| t.name.starts_with("token-")) {
        tracing::warn!(
            file = %token_file.display(),
            name = %t.name,
            "a token without a name and role is an admin; write `TOKEN NAME ROLE` so the audit says who"
        );
    }
    let policy = match &args.policy_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
            corral_controller::policy::Policy::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => {
            tracing::warn!(
                "no --policy-file: a token that may write specs may run anything as any user on the hosts they select"
            );
            corral_controller::policy::Policy::default()
        }
    };
    let keys = Keys::new(&args.prefix);
    let etcd_options = args
        .etcd
        .options()
        .context("etcd flags")?
        .probing(format!("{}/", keys.prefix()));
    // Started while etcd is away, the replica waits for it (a SIGTERM still ends it).
    let etcd = tokio::select! {
        etcd = corral_etcd::Etcd::connect_patiently(&etcd_options) => etcd.context("connect to etcd")?,
        () = terminated() => return Ok(()),
    };
    let store = Store::new(etcd, keys);
    let id = args.id.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });

    let shutdown = CancellationToken::new();
    let (leader_side, api_side) = leader::link();
    let leading = tokio::spawn(leader::run(store.clone(), id, leader_side, shutdown.clone()));
    let app = router(AppState::new(store, tokens, api_side).with_policy(policy));
    let stop = shutdown.clone();
    match tls {
        Some(config) => {
            let handle = axum_server::Handle::new();
            let graceful = handle.clone();
            tokio::spawn(async move {
                terminated().await;
                stop.cancel();
                graceful.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
            });
            let config = axum_server::tls_rustls::RustlsConfig::from_config(std::sync::Arc::new(config));
            tracing::info!(listen = %args.listen, "serving the API over HTTPS");
            axum_server::bind_rustls(args.listen, config)
                .handle(handle)
                .serve(app.into_make_service())
                .await
                .with_context(|| format!("serve on {}", args.listen))?;
        }
        None => {
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("listen on {}", args.listen))?;
            tracing::info!(listen = %args.listen, "serving the API over plain HTTP");
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    terminated().await;
                    stop.cancel();
                })
                .await?;
        }
    }
    shutdown.cancel();
    let _ = leading.await;
    Ok(())
}

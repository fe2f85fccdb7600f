//! `scripts/package`: the three .deb packages are built from the built binaries, hold what a
//! host needs (binaries, units whose ExecStart is the packaged binary, /etc/default files as
//! conffiles, completions, maintainer scripts), and what they install starts as the units say:
//! the controller and the agent from their /etc/default files, the CLI talking to them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use corral_tests::corral::binary;
use corral_tests::etcd::Etcd;
use corral_tests::supervisord::{Options, Supervisord};

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The variables an `/etc/default` file sets, as systemd's EnvironmentFile reads them.
fn environment_file(path: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect())
}

#[tokio::test]
async fn debian_packages_hold_what_a_host_needs_and_start_as_their_units_say() -> anyhow::Result<()> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin_dir = binary("corral")?.parent().map(Path::to_path_buf).unwrap_or_default();
    let out = tempfile::tempdir()?;
    let built = run(Command::new(repo.join("scripts/package"))
        .args(["--bin-dir"])
        .arg(&bin_dir)
        .arg("--out")
        .arg(out.path())
        .arg("--fast"))?;
    let debs: Vec<PathBuf> = built.lines().map(PathBuf::from).collect();
    assert_eq!(debs.len(), 3, "{built}");

    // What dpkg would put on disk, in one root.
    let root = tempfile::tempdir()?;
    for deb in &debs {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root.path()))?;
        let control = tempfile::tempdir()?;
        run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(control.path()))?;
        for script in ["postinst", "prerm"] {
            let path = control.path().join(script);
            if path.exists() {
                run(Command::new("sh").arg("-n").arg(&path))?;
            }
        }
        let info = run(Command::new("dpkg-deb").arg("-f").arg(deb).args(["Package", "Version"]))?;
        assert!(
            info.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))),
            "{info}"
        );
        if info.contains("corral-") {
            let conffiles = std::fs::read_to_string(control.path().join("conffiles"))?;
            assert!(conffiles.starts_with("/etc/default/corral-"), "{conffiles}");
        }
    }
    let r = |p: &str| root.path().join(p.trim_start_matches('/'));
    for file in [
        "/usr/bin/corral",
        "/usr/share/bash-completion/completions/corral",
        "/usr/share/zsh/vendor-completions/_corral",
        "/usr/share/fish/vendor_completions.d/corral.fish",
    ] {
        assert!(r(file).exists(), "{file} is not packaged");
    }
    for name in ["corral-controller", "corral-agent"] {
        let unit = std::fs::read_to_string(r(&format!("/lib/systemd/system/{name}.service")))?;
        assert!(unit.contains(&format!("ExecStart=/usr/bin/{name}\n")), "{unit}");
        assert!(
            unit.contains(&format!("EnvironmentFile=/etc/default/{name}\n")),
            "{unit}"
        );
        assert!(r(&format!("/usr/bin/{name}")).exists());
    }

    // Started as the units say: the packaged binary with its /etc/default file, here pointed
    // at a test etcd and supervisord.
    let etcd = Etcd::start().await?;
    let sd = Supervisord::start(Options::default()).await?;
    let state = tempfile::tempdir()?;
    let token = state.path().join("tokens");
    std::fs::write(&token, "pkg-token\n")?;
    let port = corral_tests::free_port()?;
    let start = |name: &str, overrides: &[(&str, String)]| -> anyhow::Result<std::process::Child> {
        let mut env = environment_file(&r(&format!("/etc/default/{name}")))?;
        env.retain(|k, _| !k.starts_with("CORRAL_ETCD_"));
        env.insert("CORRAL_ETCD_ENDPOINTS".into(), etcd.endpoint.clone());
        for (k, v) in overrides {
            env.insert((*k).to_string(), v.clone());
        }
        Ok(Command::new(r(&format!("/usr/bin/{name}")))
            .env_clear()
            .envs(&env)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?)
    };
    let mut controller = start(
        "corral-controller",
        &[
            ("CORRAL_LISTEN", format!("127.0.0.1:{port}")),
            ("CORRAL_TOKEN_FILE", token.display().to_string()),
        ],
    )?;
    let mut agent = start(
        "corral-agent",
        &[
            ("CORRAL_HOST", "pkg-host".into()),
            ("CORRAL_SUPERVISOR_URL", sd.unix_url()),
            ("CORRAL_CONF_DIR", sd.conf_dir.display().to_string()),
            ("CORRAL_STATE_DIR", state.path().join("agent").display().to_string()),
            (
                "CORRAL_METRICS_LISTEN",
                format!("127.0.0.1:{}", corral_tests::free_port()?),
            ),
        ],
    )?;
    let cli = |args: &[&str]| {
        Command::new(r("/usr/bin/corral"))
            .args(["--server", &format!("127.0.0.1:{port}"), "--token", "pkg-token"])
            .args(args)
            .output()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = cli(&["get", "hosts"])?;
        let text = String::from_utf8_lossy(&o.stdout);
        if o.status.success() && text.contains("pkg-host") && text.contains("Ready") {
            break;
        }
        assert!(Instant::now() < deadline, "the packaged daemons never came up: {text}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let version = String::from_utf8_lossy(&cli(&["version"])?.stdout).into_owned();
    assert!(version.contains("server: "), "{version}");
    let _ = agent.kill();
    let _ = controller.kill();
    let _ = agent.wait();
    let _ = controller.wait();
    Ok(())
}

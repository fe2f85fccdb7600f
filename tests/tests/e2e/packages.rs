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
        for script in ["postinst", "prerm", "postrm"] {
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
    std::fs::write(&token, "pkg-token ops admin\n")?;
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o640))?;
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
    // Its /etc/default file serves HTTPS: here with certificates made for the test.
    let ca = corral_tests::pki::make_ca(state.path())?;
    let (cert, key) = corral_tests::pki::issue(
        state.path(),
        "controller",
        "corral-controller",
        corral_tests::pki::Usage::Server,
    )?;
    let mut controller = start(
        "corral-controller",
        &[
            ("CORRAL_LISTEN", format!("127.0.0.1:{port}")),
            ("CORRAL_TOKEN_FILE", token.display().to_string()),
            ("CORRAL_TLS_CERT_FILE", cert.display().to_string()),
            ("CORRAL_TLS_KEY_FILE", key.display().to_string()),
            ("CORRAL_POLICY_FILE", r("/etc/corral/policy.yaml").display().to_string()),
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
            .args([
                "--server",
                &format!("https://127.0.0.1:{port}"),
                "--token",
                "pkg-token",
                "--ca-file",
            ])
            .arg(&ca)
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
    // The packaged policy refuses what a careful operator would: a program run as root, a
    // log written into /etc, a shell; at apply, naming each field, nothing stored.
    let spec = state.path().join("evil.yaml");
    std::fs::write(
        &spec,
        "apiVersion: corral.dev/v1\nkind: Program\nmetadata: {name: evil}\nspec:\n  selector: {}\n  command: /bin/sh -c id\n  stdout_logfile: /etc/cron.d/evil\n",
    )?;
    let o = cli(&["apply", "-f", &spec.display().to_string()])?;
    let said = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{said}");
    for field in ["spec.user", "spec.command", "spec.stdout_logfile"] {
        assert!(said.contains(field) && said.contains("policy"), "{field}: {said}");
    }
    let listed = String::from_utf8_lossy(&cli(&["get", "programs"])?.stdout).into_owned();
    assert!(!listed.contains("evil"), "{listed}");
    std::fs::write(
        &spec,
        "apiVersion: corral.dev/v1\nkind: Program\nmetadata: {name: fine}\nspec:\n  selector: {}\n  user: nobody\n  command: /usr/local/bin/fine\n  stdout_logfile: /var/log/app/fine.log\n",
    )?;
    let o = cli(&["apply", "-f", &spec.display().to_string(), "--dry-run"])?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let version = String::from_utf8_lossy(&cli(&["version"])?.stdout).into_owned();
    assert!(version.contains("server: "), "{version}");
    let _ = agent.kill();
    let _ = controller.kill();
    let _ = agent.wait();
    let _ = controller.wait();
    Ok(())
}

/// `dpkg -i` of the three packages, with their maintainer scripts, then `dpkg -r` and
/// `--purge`, in a throwaway root: an overlay of `/` on a tmpfs in a private mount namespace,
/// so the `corral` user and every file land in the overlay and the machine is untouched.
/// Needs root (mounts, chroot); elsewhere it says so and checks nothing.
#[test]
fn dpkg_installs_configures_and_purges_the_packages_in_a_throwaway_root() -> anyhow::Result<()> {
    if run(Command::new("id").arg("-u"))?.trim() != "0" {
        eprintln!("SKIPPED: installing packages in a throwaway root needs root (mount, chroot)");
        return Ok(());
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin_dir = binary("corral")?.parent().map(Path::to_path_buf).unwrap_or_default();
    let work = tempfile::tempdir()?;
    let out = work.path().join("debs");
    run(Command::new(repo.join("scripts/package"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--out")
        .arg(&out)
        .arg("--fast"))?;
    let root = work.path().join("root");
    std::fs::create_dir(&root)?;
    // In the chroot: install, show what the scripts made, remove, show, purge, show.
    let inside = r#"
        set -eu
        show() { for p in "$@"; do stat -c '%n %a %U:%G' "$p" 2>/dev/null || echo "$p absent"; done; }
        dpkg -i /root/debs/*.deb >/dev/null
        echo "user: $(getent passwd corral | cut -d: -f3,7)"
        show /usr/bin/corral /usr/bin/corral-controller /usr/bin/corral-agent /etc/corral \
          /var/lib/corral-agent /etc/default/corral-controller /etc/default/corral-agent \
          /etc/corral/policy.yaml
        dpkg -r corral corral-controller corral-agent >/dev/null
        echo removed
        show /usr/bin/corral-agent /etc/default/corral-agent
        dpkg --purge corral-controller corral-agent >/dev/null
        echo purged
        show /etc/default/corral-agent /etc/default/corral-controller /var/lib/corral-agent
    "#;
    let outside = r#"
        set -eu
        t=$1
        mount -t tmpfs tmpfs "$t"
        mkdir -p "$t/upper/root" "$t/work" "$t/merged"
        cp -r "$2" "$t/upper/root/debs"
        mount -t overlay overlay -o "lowerdir=/,upperdir=$t/upper,workdir=$t/work" "$t/merged"
        mount -t proc proc "$t/merged/proc"
        mount --rbind /dev "$t/merged/dev"
        chroot "$t/merged" sh -c "$3"
    "#;
    let said = run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", outside, "sh"])
        .arg(&root)
        .arg(&out)
        .arg(inside))?;
    let line = |prefix: &str| {
        said.lines()
            .find(|l| l.starts_with(prefix))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no `{prefix}` in:\n{said}"))
    };
    let (installed, rest) = said.split_once("removed").unwrap_or((&said, ""));
    let (removed, purged) = rest.split_once("purged").unwrap_or((rest, ""));
    // A system user with no login shell.
    let user = line("user: ");
    let uid: u32 = user[6..].split(':').next().unwrap_or("").parse()?;
    assert!(uid < 1000 && user.ends_with("nologin"), "{said}");
    for expected in [
        "/usr/bin/corral 755 root:root",
        "/usr/bin/corral-controller 755 root:root",
        "/usr/bin/corral-agent 755 root:root",
        "/etc/corral 750 root:corral",
        "/var/lib/corral-agent 700 root:root",
        "/etc/default/corral-controller 640 root:corral",
        "/etc/default/corral-agent 640 root:root",
        "/etc/corral/policy.yaml 640 root:corral",
    ] {
        assert!(installed.contains(expected), "{expected} after install:\n{said}");
    }
    // Removed: binaries gone, configuration kept; purged: configuration and state gone.
    assert!(removed.contains("/usr/bin/corral-agent absent"), "{said}");
    assert!(removed.contains("/etc/default/corral-agent 640"), "{said}");
    for gone in [
        "/etc/default/corral-agent absent",
        "/etc/default/corral-controller absent",
        "/var/lib/corral-agent absent",
    ] {
        assert!(purged.contains(gone), "{gone} after purge:\n{said}");
    }
    // And the machine itself has no corral user.
    assert!(!run(Command::new("getent").arg("passwd"))?.contains("\ncorral:"));
    Ok(())
}

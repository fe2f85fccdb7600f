//! The API over HTTPS: the controller serves TLS with rustls, optionally asking for client
//! certificates; `corral` trusts a given CA; plain HTTP beyond loopback and a private key
//! others may read are refused. Certificates are made in the test.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use corral_tests::corral::binary;
use corral_tests::etcd::Etcd;
use corral_tests::pki::{self, Usage};
use corral_tests::process::ChildGuard;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_served_over_https_with_client_certificates() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let ca = pki::make_ca(d)?;
    let (cert, key) = pki::issue(d, "controller", "corral-controller", Usage::Server)?;
    let (client_cert, client_key) = pki::issue(d, "ops", "ops", Usage::Client)?;
    // Another CA and a client certificate it signed: trusted by nobody here.
    let other = d.join("other");
    std::fs::create_dir(&other)?;
    let other_ca = pki::make_ca(&other)?;
    let (stranger_cert, stranger_key) = pki::issue(&other, "stranger", "stranger", Usage::Client)?;
    let tokens = d.join("tokens");
    std::fs::write(&tokens, "t0ken\n")?;
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600))?;
    let port = corral_tests::free_port()?;
    let controller = |listen: &str, tls: &[(&str, &Path)]| -> anyhow::Result<Command> {
        let mut c = Command::new(binary("corral-controller")?);
        c.args(["--etcd-endpoints", &etcd.endpoint, "--listen", listen, "--token-file"])
            .arg(&tokens);
        for (flag, path) in tls {
            c.arg(flag).arg(path);
        }
        Ok(c)
    };
    let refused = |mut c: Command, why: &str| -> anyhow::Result<()> {
        let out = c.output()?;
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && said.contains(why), "{said}");
        Ok(())
    };
    // Plain HTTP beyond loopback: refused, saying why.
    refused(
        controller(&format!("0.0.0.0:{port}"), &[])?,
        "beyond loopback without TLS",
    )?;
    // A private key others may read: refused.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644))?;
    let tls = [("--tls-cert-file", cert.as_path()), ("--tls-key-file", key.as_path())];
    refused(
        controller(&format!("127.0.0.1:{port}"), &tls)?,
        "open to others (mode 0644)",
    )?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;

    let with_clients = [
        ("--tls-cert-file", cert.as_path()),
        ("--tls-key-file", key.as_path()),
        ("--tls-client-ca-file", ca.as_path()),
    ];
    let _replica = ChildGuard::spawn("controller", controller(&format!("127.0.0.1:{port}"), &with_clients)?)?;
    let https = format!("https://127.0.0.1:{port}");
    let corral = |server: &str, flags: &[(&str, &Path)]| -> anyhow::Result<(i32, String)> {
        let mut c = Command::new(binary("corral")?);
        c.args(["--server", server, "--token", "t0ken"]);
        for (flag, path) in flags {
            c.arg(flag).arg(path);
        }
        let o = c.arg("status").output()?;
        Ok((
            o.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ))
    };
    let trusted = [
        ("--ca-file", ca.as_path()),
        ("--cert-file", client_cert.as_path()),
        ("--key-file", client_key.as_path()),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, said) = corral(&https, &trusted)?;
        if code == 0 {
            assert!(said.contains("Hosts: 0/0 ready"), "{said}");
            break;
        }
        assert!(Instant::now() < deadline, "never served over https: {said}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Everything else is refused before a request is read: exit 3.
    for (what, server, flags) in [
        (
            "the system's CAs",
            https.as_str(),
            vec![
                ("--cert-file", client_cert.as_path()),
                ("--key-file", client_key.as_path()),
            ],
        ),
        (
            "another CA",
            https.as_str(),
            vec![
                ("--ca-file", other_ca.as_path()),
                ("--cert-file", client_cert.as_path()),
                ("--key-file", client_key.as_path()),
            ],
        ),
        (
            "no client certificate",
            https.as_str(),
            vec![("--ca-file", ca.as_path())],
        ),
        (
            "a stranger's certificate",
            https.as_str(),
            vec![
                ("--ca-file", ca.as_path()),
                ("--cert-file", stranger_cert.as_path()),
                ("--key-file", stranger_key.as_path()),
            ],
        ),
    ] {
        let (code, said) = corral(server, &flags)?;
        assert_eq!(code, 3, "{what}: {said}");
    }
    let (code, said) = corral(&format!("http://127.0.0.1:{port}"), &[])?;
    assert_eq!(code, 3, "plain http to the https port: {said}");
    Ok(())
}

//! Certificates made in the test, with openssl: a CA, and server or client certificates it
//! signs (X.509 v3 with the extensions rustls wants: it refuses v1 certificates).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("run openssl")?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

const KEY: [&str; 3] = ["-newkey", "rsa:2048", "-nodes"];

/// Makes `ca.pem` and `ca.key` in `dir`.
///
/// # Errors
/// If openssl fails.
pub fn make_ca(dir: &Path) -> anyhow::Result<PathBuf> {
    let subject = [
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=corral-test-ca",
    ];
    openssl(dir, &[&["req", "-x509"], &KEY[..], &subject[..]].concat())?;
    Ok(dir.join("ca.pem"))
}

/// What a certificate is for.
#[derive(Clone, Copy, Debug)]
pub enum Usage {
    /// A server on 127.0.0.1 / localhost.
    Server,
    Client,
}

/// Makes `<name>.pem` and `<name>.key` (mode 0600) in `dir`, signed by its CA, with common
/// name `cn`. Returns the certificate and key paths.
///
/// # Errors
/// If openssl fails.
pub fn issue(dir: &Path, name: &str, cn: &str, usage: Usage) -> anyhow::Result<(PathBuf, PathBuf)> {
    let ext = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext),
        match usage {
            Usage::Server => "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
            Usage::Client => "extendedKeyUsage=clientAuth\n",
        },
    )?;
    let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
    let subject = format!("/CN={cn}");
    openssl(
        dir,
        &[&["req"], &KEY[..], &["-keyout", &key, "-out", &csr, "-subj", &subject]].concat(),
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    )?;
    std::fs::set_permissions(dir.join(&key), std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok((dir.join(pem), dir.join(key)))
}

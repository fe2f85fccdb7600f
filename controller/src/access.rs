//! etcd's authentication for Corral: what each identity may read and write.
//!
//! The controller alone writes programs, groups and assignments; each agent reads only its
//! own assignments and writes only its own host record, liveness key and statuses, so a host
//! whose credentials leak cannot run anything on another host. [`controller_grants`] and
//! [`host_grants`] say which keys (pure, unit-tested); [`setup`] and [`remove`] make the etcd
//! roles and users (run by `corral-controller access` with etcd's root credentials), and
//! [`issue_client_cert`] a host's client certificate when etcd authenticates by certificate.

use corral_proto::keys::Keys;
use etcd_client::{Client, Permission, UserAddOptions};

/// What a grant allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    ReadWrite,
}

/// One permission of a role: a key, or every key under a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub key: String,
    pub prefix: bool,
    pub access: Access,
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let access = match self.access {
            Access::Read => "read",
            Access::ReadWrite => "readwrite",
        };
        write!(f, "{access} {}{}", self.key, if self.prefix { "*" } else { "" })
    }
}

/// An etcd role and the user holding it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The user and its role share this name; with client certificates it is the CN.
    pub name: String,
    pub grants: Vec<Grant>,
}

/// The controller: everything under the prefix (specs, assignments, election, health).
pub fn controller_grants(keys: &Keys) -> Identity {
    Identity {
        name: "corral-controller".into(),
        grants: vec![Grant {
            key: format!("{}/", keys.prefix()),
            prefix: true,
            access: Access::ReadWrite,
        }],
    }
}

/// One host's agent: reads its own assignments; writes its own host record, liveness key
/// and statuses. Nothing of any other host, and no spec.
///
/// # Errors
/// A host name that is not valid (it becomes part of keys and of an etcd user name).
pub fn host_grants(keys: &Keys, host: &str) -> Result<Identity, String> {
    corral_proto::validate::check_host_name(host)?;
    let grant = |key: String, prefix: bool, access: Access| Grant { key, prefix, access };
    Ok(Identity {
        name: host_user(host),
        grants: vec![
            grant(keys.assignments(host), true, Access::Read),
            grant(keys.host(host), false, Access::ReadWrite),
            grant(keys.alive(host), false, Access::ReadWrite),
            grant(keys.host_status(host), true, Access::ReadWrite),
            // `corral logs`: the controller's requests for this host, and the agent's replies.
            grant(keys.log_requests(host), true, Access::Read),
            grant(keys.log_replies(host), true, Access::ReadWrite),
        ],
    })
}

/// The etcd user (and role) of a host's agent.
pub fn host_user(host: &str) -> String {
    format!("corral-agent-{host}")
}

/// How the user logs in.
#[derive(Clone, Debug)]
pub enum Login {
    /// With this password (`--etcd-username`/`--etcd-password-file`).
    Password(String),
    /// With a client certificate whose CN is the user's name (no password login).
    Certificate,
}

/// Makes (or brings up to date) the role and the user of `identity`: the role gets exactly
/// its grants, the user its login and the role. Running it again is harmless; with a new
/// password it changes the password.
///
/// # Errors
/// etcd's refusal, with the step that failed.
pub async fn setup(client: &mut Client, identity: &Identity, login: &Login) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let name = identity.name.as_str();
    if let Err(e) = client.role_add(name).await
        && !already_exists(&e)
    {
        return Err(e).with_context(|| format!("add role {name}"));
    }
    // Exactly these grants: whatever else the role held is revoked.
    let held = client
        .role_get(name)
        .await
        .with_context(|| format!("read role {name}"))?;
    for p in held.permissions() {
        let key = String::from_utf8_lossy(p.key()).into_owned();
        if !identity.grants.iter().any(|g| g.key == key) {
            let mut opts = etcd_client::RoleRevokePermissionOptions::new();
            if !p.range_end().is_empty() {
                opts = opts.with_range_end(p.range_end().to_vec());
            }
            client
                .role_revoke_permission(name, key.clone(), Some(opts))
                .await
                .with_context(|| format!("revoke {key} from role {name}"))?;
        }
    }
    for g in &identity.grants {
        let mut p = match g.access {
            Access::Read => Permission::read(g.key.as_bytes()),
            Access::ReadWrite => Permission::read_write(g.key.as_bytes()),
        };
        if g.prefix {
            p = p.with_prefix();
        }
        client
            .role_grant_permission(name, p)
            .await
            .with_context(|| format!("grant {g} to role {name}"))?;
    }
    let (password, opts) = match login {
        Login::Password(p) => (p.clone(), None),
        Login::Certificate => (String::new(), Some(UserAddOptions::new().with_no_pwd())),
    };
    match client.user_add(name, password.clone(), opts).await {
        Ok(_) => {}
        Err(e) if already_exists(&e) => {
            if let Login::Password(_) = login {
                client
                    .user_change_password(name, password)
                    .await
                    .with_context(|| format!("set the password of user {name}"))?;
            }
        }
        Err(e) => return Err(e).with_context(|| format!("add user {name}")),
    }
    client
        .user_grant_role(name, name)
        .await
        .with_context(|| format!("grant role {name} to user {name}"))?;
    Ok(())
}

/// Deletes the user and the role named `name`; either already gone is fine.
///
/// # Errors
/// etcd's refusal, with the step that failed.
pub async fn remove(client: &mut Client, name: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    if let Err(e) = client.user_delete(name).await
        && !not_found(&e)
    {
        return Err(e).with_context(|| format!("delete user {name}"));
    }
    if let Err(e) = client.role_delete(name).await
        && !not_found(&e)
    {
        return Err(e).with_context(|| format!("delete role {name}"));
    }
    Ok(())
}

/// A client certificate and its new key, in PEM.
#[derive(Debug)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Issues `name` a client certificate signed by etcd's CA: its common name is the user's name
/// (etcd takes the user from it), it serves client authentication only, and it is valid from
/// now for `days` days. The key is a new ECDSA P-256 key.
///
/// # Errors
/// A CA certificate or key that cannot be read, a key that is not the CA certificate's own
/// (what it signed would never verify), or `days` out of range.
pub fn issue_client_cert(ca_cert_pem: &str, ca_key_pem: &str, name: &str, days: u32) -> anyhow::Result<IssuedCert> {
    use anyhow::Context as _;
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose};
    anyhow::ensure!((1..=3650).contains(&days), "--cert-days {days}: from 1 to 3650");
    let ca_key = KeyPair::from_pem(ca_key_pem).context("the CA key (a PEM private key)")?;
    let (_, ca_der) = x509_parser::pem::parse_x509_pem(ca_cert_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("the CA certificate is not PEM: {e}"))?;
    let ca_cert = ca_der
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("the CA certificate cannot be read: {e}"))?;
    anyhow::ensure!(
        *ca_cert.public_key().subject_public_key.data == *rcgen::PublicKeyData::der_bytes(&ca_key),
        "the CA key is not the CA certificate's key: what it signed would never verify"
    );
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).context("the CA certificate")?;
    let mut params = CertificateParams::new(Vec::<String>::new()).context("certificate parameters")?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks a minute apart.
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(i64::from(days));
    let key = KeyPair::generate().context("generate a key")?;
    let cert = params.signed_by(&key, &issuer).context("sign the certificate")?;
    Ok(IssuedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn already_exists(e: &etcd_client::Error) -> bool {
    e.to_string().contains("already exists")
}

fn not_found(e: &etcd_client::Error) -> bool {
    e.to_string().contains("not found")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_reads_its_assignments_and_writes_only_its_own_keys() {
        let keys = Keys::new("/corral");
        let id = host_grants(&keys, "web-1").expect("valid");
        assert_eq!(id.name, "corral-agent-web-1");
        let shown: Vec<String> = id.grants.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "read /corral/assignments/web-1/*",
                "readwrite /corral/hosts/web-1",
                "readwrite /corral/alive/web-1",
                "readwrite /corral/status/web-1/*",
                "read /corral/logs/web-1/requests/*",
                "readwrite /corral/logs/web-1/replies/*",
            ]
        );
        // A prefix ends in '/' after the host, so host "web-1" cannot reach "web-10".
        for g in id.grants.iter().filter(|g| g.prefix) {
            assert!(g.key.ends_with('/') && g.key.contains("/web-1/"), "{g}");
        }
        // Nothing outside what an agent writes, and never a spec or another host's key.
        for g in &id.grants {
            assert!(g.key.contains("web-1"), "{g}");
            assert!(!g.key.contains("/programs") && !g.key.contains("/groups"), "{g}");
        }
        assert!(host_grants(&keys, "../x").is_err());
        assert!(host_grants(&keys, "a/b").is_err());
    }

    #[test]
    fn the_controller_owns_its_prefix_only() {
        let id = controller_grants(&Keys::new("/corral-b/"));
        assert_eq!(id.grants.len(), 1);
        assert_eq!(id.grants[0].to_string(), "readwrite /corral-b/*");
    }

    fn test_ca() -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test etcd CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("self-signed");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_host_certificate_names_its_user_and_is_signed_by_the_ca_for_clients_only() {
        let (ca_pem, ca_key) = test_ca();
        let issued = issue_client_cert(&ca_pem, &ca_key, "corral-agent-web-1", 30).expect("issued");
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.cert_pem.as_bytes()).expect("pem");
        let cert = pem.parse_x509().expect("x509");
        let cn: Vec<&str> = cert
            .subject()
            .iter_common_name()
            .filter_map(|c| c.as_str().ok())
            .collect();
        assert_eq!(cn, ["corral-agent-web-1"]);
        let issuer: Vec<&str> = cert
            .issuer()
            .iter_common_name()
            .filter_map(|c| c.as_str().ok())
            .collect();
        assert_eq!(issuer, ["test etcd CA"]);
        let eku = cert.extended_key_usage().expect("eku").expect("present").value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!cert.is_ca());
        let days = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()) / 86_400;
        assert_eq!(days, 30);
        let key = rcgen::KeyPair::from_pem(&issued.key_pem).expect("key");
        assert_eq!(
            *cert.public_key().subject_public_key.data,
            *rcgen::PublicKeyData::der_bytes(&key)
        );
    }

    #[test]
    fn a_ca_key_that_is_not_the_ca_certificates_own_is_refused() {
        let (ca_pem, _) = test_ca();
        let (_, other_key) = test_ca();
        let e = issue_client_cert(&ca_pem, &other_key, "corral-agent-web-1", 30).expect_err("refused");
        assert!(e.to_string().contains("not the CA certificate's key"), "{e}");
        let (ca_pem, ca_key) = test_ca();
        assert!(issue_client_cert(&ca_pem, &ca_key, "x", 0).is_err());
        assert!(issue_client_cert("not a cert", &ca_key, "x", 1).is_err());
    }
}

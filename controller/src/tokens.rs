//! The API's bearer tokens, from the token file, one per line, `#` comments:
//!
//! ```text
//! # TOKEN                               NAME       ROLE
//! 3f9c0a...                             alice      admin
//! 8d21e7...                             deploy-ci  operator
//! 0b77aa...                             grafana    read-only
//! ```
//!
//! A line with a token alone is an admin named `token-LINE` (the file's older format). The
//! name is what the audit records; the role what the token may do. The file is refused when
//! others may read or write it (it opens the whole fleet).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use anyhow::Context as _;
use corral_proto::api::Role;

/// One token and whose it is.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub secret: String,
    pub name: String,
    pub role: Role,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret (it may end up in a log).
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// An admin token (tests, `corral dev`).
    pub fn admin(secret: &str) -> Token {
        Token {
            secret: secret.to_string(),
            name: "admin".to_string(),
            role: Role::Admin,
        }
    }
}

/// Reads the tokens of `path`.
///
/// # Errors
/// A file that cannot be read, that others may read or write (mode & 007), that holds no
/// token, or a line that is not `TOKEN [NAME ROLE]` (named by its number).
pub fn read_token_file(path: &Path) -> anyhow::Result<Vec<Token>> {
    let meta = std::fs::metadata(path).with_context(|| format!("read {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o7777;
    anyhow::ensure!(
        mode & 0o007 == 0,
        "{} is open to others (mode {mode:04o}): it holds the API's tokens; make it the owner's \
         only (chmod 600), or readable by the controller's group (chmod 640)",
        path.display()
    );
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let tokens = parse_tokens(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    anyhow::ensure!(!tokens.is_empty(), "{} holds no token", path.display());
    Ok(tokens)
}

/// Parses the token file's text.
///
/// # Errors
/// The first line that is not `TOKEN` or `TOKEN NAME ROLE`, a name that is not
/// `[A-Za-z0-9._@-]{1,64}`, or a token or name given twice.
pub fn parse_tokens(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens: Vec<Token> = Vec::new();
    let (mut secrets, mut names) = (BTreeSet::new(), BTreeSet::new());
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let token = match fields[..] {
            [secret] => Token {
                secret: secret.to_string(),
                name: format!("token-{n}"),
                role: Role::Admin,
            },
            [secret, name, role] => {
                let name_ok = !name.is_empty()
                    && name.len() <= 64
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'));
                if !name_ok {
                    return Err(format!(
                        "line {n}: name {name:?}: letters, digits, '.', '_', '@' and '-', at most 64"
                    ));
                }
                Token {
                    secret: secret.to_string(),
                    name: name.to_string(),
                    role: Role::parse(role).map_err(|e| format!("line {n}: role {e}"))?,
                }
            }
            _ => {
                return Err(format!(
                    "line {n}: expected TOKEN NAME ROLE (role read-only, operator or admin), found {} fields",
                    fields.len()
                ));
            }
        };
        if !secrets.insert(token.secret.clone()) {
            return Err(format!("line {n}: this token is on an earlier line too"));
        }
        if !names.insert(token.name.clone()) {
            return Err(format!("line {n}: name {:?} is on an earlier line too", token.name));
        }
        tokens.push(token);
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_others_may_read_is_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# ops\nt0ken-long-enough-123\n\n")?;
        for (mode, ok) in [
            (0o644, false),
            (0o606, false),
            (0o602, false),
            (0o600, true),
            (0o640, true),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            let r = read_token_file(&path);
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(e.to_string().contains(&format!("mode {mode:04o}")), "{e}");
            }
        }
        assert_eq!(
            read_token_file(&path)?,
            [Token {
                secret: "t0ken-long-enough-123".into(),
                name: "token-2".into(),
                role: Role::Admin
            }]
        );
        std::fs::write(&path, "# none\n")?;
        assert!(read_token_file(&path).is_err_and(|e| e.to_string().contains("holds no token")));
        Ok(())
    }

    #[test]
    fn each_token_has_a_name_and_a_role() {
        let t = parse_tokens(
            "# TOKEN NAME ROLE\n\
             aaaaaaaaaaaaaaaa  alice      admin\n\
             bbbbbbbbbbbbbbbb\tdeploy-ci operator\n\
             cccccccccccccccc grafana read-only\n",
        )
        .expect("valid");
        let seen: Vec<(&str, Role)> = t.iter().map(|t| (t.name.as_str(), t.role)).collect();
        assert_eq!(
            seen,
            [
                ("alice", Role::Admin),
                ("deploy-ci", Role::Operator),
                ("grafana", Role::ReadOnly)
            ]
        );
        for (text, says) in [
            ("aaaaaaaaaaaaaaaa alice root\n", "line 1: role \"root\" is not a role"),
            ("aaaaaaaaaaaaaaaa alice\n", "line 1: expected TOKEN NAME ROLE"),
            ("# x\naaaaaaaaaaaaaaaa al/ice admin\n", "line 2: name \"al/ice\""),
            (
                "aaaaaaaaaaaaaaaa alice admin\naaaaaaaaaaaaaaaa bob admin\n",
                "line 2: this token is on an earlier line",
            ),
            (
                "aaaaaaaaaaaaaaaa alice admin\nbbbbbbbbbbbbbbbb alice admin\n",
                "line 2: name \"alice\" is on an earlier line",
            ),
        ] {
            let e = parse_tokens(text).expect_err(text);
            assert!(e.starts_with(says), "{text:?}: {e}");
        }
        // The secret never shows in a debug print.
        assert!(!format!("{:?}", t[0]).contains("aaaa"));
    }
}

//! The API's bearer tokens, from the token file: one per line, `#` comments. The file is
//! refused when others may read or write it (it opens the whole fleet).

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use anyhow::Context as _;

/// Reads the tokens of `path`.
///
/// # Errors
/// A file that cannot be read, that others may read or write (mode & 007), or that holds no
/// token.
pub fn read_token_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let meta = std::fs::metadata(path).with_context(|| format!("read {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o7777;
    anyhow::ensure!(
        mode & 0o007 == 0,
        "{} is open to others (mode {mode:04o}): it holds the API's tokens; make it the owner's \
         only (chmod 600), or readable by the controller's group (chmod 640)",
        path.display()
    );
    let tokens: Vec<String> = std::fs::read_to_string(path)
        .with_context(|| format!("read {}", path.display()))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    anyhow::ensure!(!tokens.is_empty(), "{} holds no token", path.display());
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_others_may_read_is_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# ops\nt0ken\n\n")?;
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
        assert_eq!(read_token_file(&path)?, ["t0ken"]);
        std::fs::write(&path, "# none\n")?;
        assert!(read_token_file(&path).is_err_and(|e| e.to_string().contains("holds no token")));
        Ok(())
    }
}

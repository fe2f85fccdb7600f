//! Reading the environment files programs name (`spec.environment_file`). A file is used
//! only if it is a regular file owned by root (or by the agent's own user) that no one else
//! may write: whoever can write it chooses the environment (`LD_PRELOAD`, `PATH`) of a
//! process supervisord may run as root. One that cannot be read now keeps its last good
//! contents, so a config tool rewriting it never stops a program; the problem is reported.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

use corral_proto::envfile::MAX_ENVIRONMENT_FILE_BYTES;

use crate::plan::{EnvFile, EnvFiles};

/// Reads environment files, remembering each one's last good contents.
#[derive(Debug, Default)]
pub struct EnvFileReader {
    last_good: BTreeMap<String, String>,
}

impl EnvFileReader {
    /// Reads every file in `paths` (forgetting files no longer named).
    pub fn read(&mut self, paths: &BTreeSet<String>) -> EnvFiles {
        self.last_good.retain(|p, _| paths.contains(p));
        paths
            .iter()
            .map(|path| {
                let file = match read_trusted(path) {
                    Ok(text) => {
                        self.last_good.insert(path.clone(), text.clone());
                        EnvFile {
                            contents: Some(text),
                            problem: None,
                        }
                    }
                    Err(problem) => EnvFile {
                        contents: self.last_good.get(path).cloned(),
                        problem: Some(problem),
                    },
                };
                (path.clone(), file)
            })
            .collect()
    }
}

fn read_trusted(path: &str) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read it: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    // The owner of /proc/self is this process's effective user.
    let me = std::fs::metadata("/proc/self").map_or(0, |m| m.uid());
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!(
            "is owned by uid {}, not root: its owner would choose the environment of processes supervisord runs",
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "is writable by its group or others (mode {mode:04o}): they would choose the environment of processes supervisord runs"
        ));
    }
    if meta.len() > MAX_ENVIRONMENT_FILE_BYTES as u64 {
        return Err(format!(
            "is {} bytes, more than the {MAX_ENVIRONMENT_FILE_BYTES}-byte limit",
            meta.len()
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_others_may_write_is_refused_and_the_last_good_one_kept() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("web.env");
        std::fs::write(&path, "A=1\n")?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let key = path.display().to_string();
        let paths = BTreeSet::from([key.clone()]);
        let mut reader = EnvFileReader::default();
        assert_eq!(reader.read(&paths)[&key].contents.as_deref(), Some("A=1\n"));

        // Made writable by others and changed: refused, the last good contents kept.
        std::fs::write(&path, "A=2\n")?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        let read = reader.read(&paths);
        assert_eq!(read[&key].contents.as_deref(), Some("A=1\n"));
        assert!(
            read[&key].problem.as_deref().is_some_and(|p| p.contains("mode 0666")),
            "{read:?}"
        );

        // Gone: still the last good contents, and why.
        std::fs::remove_file(&path)?;
        let read = reader.read(&paths);
        assert_eq!(read[&key].contents.as_deref(), Some("A=1\n"));
        assert!(read[&key].problem.as_deref().is_some_and(|p| p.contains("cannot read")));

        // Never read: nothing to use.
        let other = dir.path().join("other.env").display().to_string();
        let read = EnvFileReader::default().read(&BTreeSet::from([other.clone()]));
        assert_eq!(read[&other].contents, None);
        Ok(())
    }
}

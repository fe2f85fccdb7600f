//! The conf dir adapter: reads and writes only the files Corral owns.
//!
//! Files are written atomically (a temporary name that supervisord's `*.conf` include does not
//! match, fsync, rename), so supervisord never reads half a file.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use corral_proto::render::{HEADER, managed_file_kind};

/// A conf dir operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct Error {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error { action, path, source }
}

/// The directory supervisord's `[include]` reads.
#[derive(Clone, Debug)]
pub struct ConfDir {
    dir: PathBuf,
}

impl ConfDir {
    pub fn new(dir: impl Into<PathBuf>) -> ConfDir {
        ConfDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Corral's files (by name) and their contents. A file with a managed name but without
    /// Corral's header is still reported, so that it is rewritten.
    ///
    /// # Errors
    /// If the directory cannot be listed or a managed file cannot be read.
    pub fn read_managed(&self) -> Result<BTreeMap<String, String>, Error> {
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir).map_err(err("list", &self.dir))? {
            let entry = entry.map_err(err("list", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if managed_file_kind(&name).is_none() {
                continue;
            }
            let path = entry.path();
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    out.insert(name, text);
                }
                // Not UTF-8: certainly not what Corral wrote; an empty string forces a rewrite.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    out.insert(name, String::new());
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(err("read", &path)(e)),
            }
        }
        Ok(out)
    }

    /// Writes `name` atomically.
    ///
    /// # Errors
    /// If the temporary file cannot be written, synced or renamed.
    pub fn write(&self, name: &str, content: &str) -> Result<(), Error> {
        debug_assert!(content.starts_with(HEADER));
        let target = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(err("create", &tmp))?;
        f.write_all(content.as_bytes()).map_err(err("write", &tmp))?;
        f.sync_all().map_err(err("sync", &tmp))?;
        drop(f);
        std::fs::rename(&tmp, &target).map_err(err("rename", &target))
    }

    /// Removes `name`; a file already gone is fine.
    ///
    /// # Errors
    /// Any other removal error.
    pub fn remove(&self, name: &str) -> Result<(), Error> {
        let path = self.dir.join(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(err("remove", &path)(e)),
            _ => Ok(()),
        }
    }
}

/// Writes `content` to `path` atomically (for the agent's own state files).
///
/// # Errors
/// If the temporary file cannot be written, synced or renamed.
pub fn write_atomic(path: &Path, content: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(err("create", &tmp))?;
    f.write_all(content).map_err(err("write", &tmp))?;
    f.sync_all().map_err(err("sync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err("rename", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_only_managed_files_and_writes_atomically() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let cd = ConfDir::new(dir.path());
        std::fs::write(dir.path().join("theirs.conf"), "[program:theirs]\n")?;
        std::fs::write(dir.path().join("corral-program-Bad.conf"), "x")?;
        let content = format!("{HEADER}\n[program:a]\ncommand=x\n");
        cd.write("corral-program-a.conf", &content)?;
        let got = cd.read_managed()?;
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            [("corral-program-a.conf".to_string(), content)]
        );
        assert!(!dir.path().join(".corral-program-a.conf.tmp").exists());
        cd.remove("corral-program-a.conf")?;
        cd.remove("corral-program-a.conf")?;
        assert!(cd.read_managed()?.is_empty());
        assert!(dir.path().join("theirs.conf").exists());
        Ok(())
    }
}

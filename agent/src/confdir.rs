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

/// What identifies a version of a file without reading it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    ino: u64,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt as _;
        Stamp {
            modified: m.modified().ok(),
            len: m.len(),
            ino: m.ino(),
        }
    }
}

/// The directory supervisord's `[include]` reads.
#[derive(Clone, Debug)]
pub struct ConfDir {
    dir: PathBuf,
    /// Contents read before, by name, with the stamp they had: a file whose stamp did not
    /// change is not read again (every pass looks at every managed file).
    cache: BTreeMap<String, (Stamp, String)>,
}

impl ConfDir {
    pub fn new(dir: impl Into<PathBuf>) -> ConfDir {
        ConfDir {
            dir: dir.into(),
            cache: BTreeMap::new(),
        }
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
    pub fn read_managed(&mut self) -> Result<BTreeMap<String, String>, Error> {
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir).map_err(err("list", &self.dir))? {
            let entry = entry.map_err(err("list", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if managed_file_kind(&name).is_none() {
                continue;
            }
            let path = entry.path();
            let stamp = match std::fs::metadata(&path) {
                Ok(m) => Stamp::of(&m),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(err("stat", &path)(e)),
            };
            if let Some((s, text)) = self.cache.get(&name)
                && *s == stamp
            {
                out.insert(name, text.clone());
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    self.cache.insert(name.clone(), (stamp, text.clone()));
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
        self.cache.retain(|name, _| out.contains_key(name));
        Ok(out)
    }

    /// Writes `name` atomically.
    ///
    /// # Errors
    /// If the temporary file cannot be written, synced or renamed.
    pub fn write(&mut self, name: &str, content: &str) -> Result<(), Error> {
        self.cache.remove(name);
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
    pub fn remove(&mut self, name: &str) -> Result<(), Error> {
        self.cache.remove(name);
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
        let mut cd = ConfDir::new(dir.path());
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
        // A cached file edited by hand is read again.
        std::fs::write(dir.path().join("corral-program-a.conf"), "edited")?;
        assert_eq!(cd.read_managed()?["corral-program-a.conf"], "edited");
        cd.remove("corral-program-a.conf")?;
        cd.remove("corral-program-a.conf")?;
        assert!(cd.read_managed()?.is_empty());
        assert!(dir.path().join("theirs.conf").exists());
        Ok(())
    }
}

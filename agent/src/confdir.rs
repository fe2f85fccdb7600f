//! The conf dir adapter: reads and writes only the files Corral owns.
//!
//! Files are written atomically (a temporary name that supervisord's `*.conf` include does not
//! match, fsync, rename), so supervisord never reads half a file.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use corral_proto::render::{HEADER, managed_file_kind};

use crate::plan::Foreign;
use notify::Watcher as _;

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
    /// A chmod is a change too: a managed file opened to others is closed again.
    mode: u32,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt as _;
        Stamp {
            modified: m.modified().ok(),
            len: m.len(),
            ino: m.ino(),
            mode: m.mode(),
        }
    }
}

/// How often a watched directory is listed and stat'ed all the same (inotify sees no change
/// made on another machine, as on NFS).
pub const FULL_SCAN_EVERY: Duration = Duration::from_secs(30);

/// The directory supervisord's `[include]` reads.
#[derive(Debug)]
pub struct ConfDir {
    dir: PathBuf,
    /// The managed files as last read, by name, and the stamps they had then: a file whose
    /// stamp did not change is not read again (every scan looks at every managed file).
    contents: BTreeMap<String, String>,
    stamps: BTreeMap<String, Stamp>,
    /// Other files: managed names without Corral's header, and the sections of the other
    /// `*.conf` files (by name, with the stamp they were read at).
    foreign: Foreign,
    others: BTreeMap<String, (Stamp, Vec<String>)>,
    /// With [`ConfDir::watch`]: set by every change event, so a pass after none can trust
    /// its last reading without a `stat` per file.
    watch: Option<Watch>,
    scans: u64,
}

#[derive(Debug)]
struct Watch {
    changed: Arc<AtomicBool>,
    last_scan: Option<Instant>,
    _watcher: notify::RecommendedWatcher,
}

impl ConfDir {
    pub fn new(dir: impl Into<PathBuf>) -> ConfDir {
        ConfDir {
            dir: dir.into(),
            contents: BTreeMap::new(),
            stamps: BTreeMap::new(),
            foreign: Foreign::default(),
            others: BTreeMap::new(),
            watch: None,
            scans: 0,
        }
    }

    /// Watches the directory (not the files: atomic renames would lose a file's watch) and
    /// calls `on_change` on every change in it. From then on [`ConfDir::read_managed`] lists
    /// and stats the files only after a change event, after the agent's own writes, and every
    /// [`FULL_SCAN_EVERY`]; otherwise its last reading stands.
    ///
    /// # Errors
    /// If the watch cannot be set up (no inotify instance left, directory missing).
    pub fn watch(&mut self, on_change: impl Fn() + Send + 'static) -> Result<(), notify::Error> {
        let changed = Arc::new(AtomicBool::new(true));
        let flag = changed.clone();
        let dir = self.dir.clone();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if relevant(&dir, &event) {
                flag.store(true, Ordering::SeqCst);
                on_change();
            }
        })?;
        watcher.watch(&self.dir, notify::RecursiveMode::NonRecursive)?;
        self.watch = Some(Watch {
            changed,
            last_scan: None,
            _watcher: watcher,
        });
        Ok(())
    }

    /// How many times the directory was listed and stat'ed.
    pub fn scans(&self) -> u64 {
        self.scans
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Corral's files (by name) and their contents: files with a managed name that begin
    /// with Corral's header. A file with a managed name but without the header is someone
    /// else's: it is reported by [`ConfDir::foreign`], never here, so it is never touched.
    ///
    /// # Errors
    /// If the directory cannot be listed or a managed file cannot be read.
    pub fn read_managed(&mut self) -> Result<&BTreeMap<String, String>, Error> {
        if let Some(w) = &mut self.watch {
            let due = w.last_scan.is_none_or(|t| t.elapsed() >= FULL_SCAN_EVERY);
            // Taken before the scan: an event during it leaves the flag set for next time.
            if !w.changed.swap(false, Ordering::SeqCst) && !due {
                return Ok(&self.contents);
            }
            w.last_scan = Some(Instant::now());
        }
        self.scans += 1;
        if let Err(e) = self.scan() {
            // The reading may be half replaced: read every file again, next time for sure.
            self.stamps.clear();
            self.rescan();
            return Err(e);
        }
        Ok(&self.contents)
    }

    /// The managed files as of the last [`ConfDir::read_managed`].
    pub fn managed(&self) -> &BTreeMap<String, String> {
        &self.contents
    }

    /// What other tools put in the conf dir, as of the last [`ConfDir::read_managed`].
    pub fn foreign(&self) -> &Foreign {
        &self.foreign
    }

    /// Lists the directory and reads the managed files whose stamp changed.
    fn scan(&mut self) -> Result<(), Error> {
        let mut contents = BTreeMap::new();
        let mut stamps = BTreeMap::new();
        let mut others = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir).map_err(err("list", &self.dir))? {
            let entry = entry.map_err(err("list", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if managed_file_kind(&name).is_none() {
                if is_other_conf(&name) {
                    self.read_other(&name, &entry.path(), &mut others);
                }
                continue;
            }
            let path = entry.path();
            // Relative to the open directory: no path walk per file. Not following a symlink
            // would differ from what supervisord reads, so a link is looked at through it.
            let meta = match entry.file_type() {
                Ok(t) if t.is_symlink() => std::fs::metadata(&path),
                _ => entry.metadata(),
            };
            let (stamp, open_to_others) = match meta {
                Ok(m) => (
                    Stamp::of(&m),
                    m.is_file() && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o077 != 0,
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(err("stat", &path)(e)),
            };
            if self.stamps.get(&name) == Some(&stamp)
                && let Some(text) = self.contents.remove(&name)
            {
                contents.insert(name.clone(), text);
                stamps.insert(name, stamp);
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    // One of ours readable by others (written by an older version): it holds
                    // environment values, so it becomes the owner's only. Not through a link.
                    let link = entry.file_type().is_ok_and(|t| t.is_symlink());
                    if open_to_others && !link && text.starts_with(HEADER) {
                        let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
                        if let Err(e) = std::fs::set_permissions(&path, private) {
                            tracing::warn!(path = %path.display(), error = %e, "cannot make a managed file private");
                        }
                    }
                    contents.insert(name.clone(), text);
                    stamps.insert(name, stamp);
                }
                // Not UTF-8: certainly not what Corral wrote; an empty string forces a rewrite
                // (no stamp: it is read again next time).
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    contents.insert(name, String::new());
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(err("read", &path)(e)),
            }
        }
        let mut foreign = Foreign::default();
        contents.retain(|name, text| {
            let ours = text.starts_with(HEADER);
            if !ours {
                foreign.files.insert(name.clone());
            }
            ours
        });
        for (file, (_, sections)) in &others {
            for section in sections {
                foreign.sections.insert(section.clone(), file.clone());
            }
        }
        self.contents = contents;
        self.stamps = stamps;
        self.others = others;
        self.foreign = foreign;
        Ok(())
    }

    /// Reads the `[program:x]` and `[group:x]` section names of another tool's conf file
    /// (again only when its stamp changed). A file that cannot be read is skipped: it is not
    /// the agent's to judge, and supervisord will say what it thinks of it.
    fn read_other(&mut self, name: &str, path: &Path, into: &mut BTreeMap<String, (Stamp, Vec<String>)>) {
        let Ok(meta) = std::fs::metadata(path) else { return };
        if !meta.is_file() {
            return;
        }
        let stamp = Stamp::of(&meta);
        if let Some((old, sections)) = self.others.remove(name)
            && old == stamp
        {
            into.insert(name.to_string(), (old, sections));
            return;
        }
        let Ok(text) = std::fs::read(path) else { return };
        let sections = String::from_utf8_lossy(&text)
            .lines()
            .filter_map(|l| {
                let header = l.trim().strip_prefix('[')?.strip_suffix(']')?;
                (header.starts_with("program:") || header.starts_with("group:")).then(|| header.to_string())
            })
            .collect();
        into.insert(name.to_string(), (stamp, sections));
    }

    /// Writes `name` atomically.
    ///
    /// # Errors
    /// If the temporary file cannot be written, synced or renamed.
    pub async fn write(&mut self, name: &str, content: &str) -> Result<(), Error> {
        self.stamps.remove(name);
        self.rescan();
        debug_assert!(content.starts_with(HEADER));
        let path = self.dir.join(name);
        let bytes = content.as_bytes().to_vec();
        off_runtime(&path.clone(), move || write_private(&path, &bytes)).await
    }

    /// The next [`ConfDir::read_managed`] looks at the directory again.
    fn rescan(&mut self) {
        if let Some(w) = &self.watch {
            w.changed.store(true, Ordering::SeqCst);
        }
    }

    /// Removes `name`; a file already gone is fine.
    ///
    /// # Errors
    /// Any other removal error.
    pub async fn remove(&mut self, name: &str) -> Result<(), Error> {
        self.stamps.remove(name);
        self.rescan();
        let path = self.dir.join(name);
        off_runtime(&path.clone(), move || match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(err("remove", &path)(e)),
            _ => Ok(()),
        })
        .await
    }
}

/// Whether a conf dir event can change what the agent reads: a change (not a read: the agent's
/// own reads are events too) to a managed file or to the directory itself. Other files (other
/// tools' configs, editors' swap files, the agent's temporary files) never start a pass, so
/// churn beside Corral's files costs nothing. An error or a rescan flag means events were
/// lost: scan.
fn relevant(dir: &Path, event: &notify::Result<notify::Event>) -> bool {
    let Ok(event) = event else { return true };
    if matches!(event.kind, notify::EventKind::Access(_)) {
        return false;
    }
    event.need_rescan()
        || event.paths.is_empty()
        || event.paths.iter().any(|p| {
            p == dir
                || p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| managed_file_kind(n).is_some() || is_other_conf(n))
        })
}

/// Another tool's conf file, which supervisord's usual `*.conf` include reads too (hidden
/// files, like editors' and the agent's temporary files, are not).
fn is_other_conf(name: &str) -> bool {
    name.ends_with(".conf") && !name.starts_with('.') && managed_file_kind(name).is_none()
}

/// Writes `content` to `path` atomically: to `.<name>.tmp` beside it (a hidden name no
/// `*.conf` include matches), synced, then renamed over `path`; readable and writable by the
/// owner only (0600). For managed files and the agent's own state files alike: both hold
/// rendered programs, and so environment values (supervisord, running as root, reads them).
///
/// # Errors
/// If the temporary file cannot be written, synced or renamed.
pub fn write_private(path: &Path, content: &[u8]) -> Result<(), Error> {
    write_with_mode(path, content, 0o600)
}

/// [`write_private`] on a blocking thread: a write ends in an fsync, which can take
/// milliseconds, and the runtime's threads meanwhile serve etcd's watch and lease.
///
/// # Errors
/// As [`write_private`].
pub async fn write_private_off_runtime(path: PathBuf, content: Vec<u8>) -> Result<(), Error> {
    off_runtime(&path.clone(), move || write_private(&path, &content)).await
}

/// Runs file I/O on tokio's blocking threads rather than a runtime worker.
async fn off_runtime(path: &Path, f: impl FnOnce() -> Result<(), Error> + Send + 'static) -> Result<(), Error> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(Error {
            action: "write",
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        }),
    }
}

fn write_with_mode(path: &Path, content: &[u8], mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err("create", &tmp))?;
    // A temporary file left by an earlier crash keeps its old mode: set it.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err("chmod", &tmp))?;
    f.write_all(content).map_err(err("write", &tmp))?;
    f.sync_all().map_err(err("sync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err("rename", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_only_managed_files_and_writes_atomically() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut cd = ConfDir::new(dir.path());
        std::fs::write(dir.path().join("theirs.conf"), "[program:theirs]\n")?;
        std::fs::write(dir.path().join("corral-program-Bad.conf"), "x")?;
        let content = format!("{HEADER}\n[program:a]\ncommand=x\n");
        cd.write("corral-program-a.conf", &content).await?;
        let got = cd.read_managed()?;
        assert_eq!(
            got.iter().collect::<Vec<_>>(),
            [(&"corral-program-a.conf".to_string(), &content)]
        );
        assert!(!dir.path().join(".corral-program-a.conf.tmp").exists());
        // A cached file edited by hand is read again.
        let edited = format!("{content}autostart=false\n");
        std::fs::write(dir.path().join("corral-program-a.conf"), &edited)?;
        assert_eq!(cd.read_managed()?["corral-program-a.conf"], edited);
        cd.remove("corral-program-a.conf").await?;
        cd.remove("corral-program-a.conf").await?;
        assert!(cd.read_managed()?.is_empty());
        assert!(dir.path().join("theirs.conf").exists());
        Ok(())
    }

    #[test]
    fn files_without_corrals_header_and_other_files_sections_are_foreign() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut cd = ConfDir::new(dir.path());
        std::fs::write(
            dir.path().join("legacy.conf"),
            "[program:p1]\ncommand=x\n  [group:g]  \nprograms=p1\n[supervisord]\n",
        )?;
        // Written by hand under a name Corral would use, without its header.
        std::fs::write(dir.path().join("corral-program-p2.conf"), "[program:p2]\ncommand=y\n")?;
        // Editors' and other hidden files are not read by supervisord's *.conf include.
        std::fs::write(dir.path().join(".hidden.conf"), "[program:p3]\n")?;
        assert!(cd.read_managed()?.is_empty());
        let f = cd.foreign();
        assert_eq!(f.files.iter().collect::<Vec<_>>(), ["corral-program-p2.conf"]);
        assert_eq!(
            f.sections.iter().collect::<Vec<_>>(),
            [
                (&"group:g".to_string(), &"legacy.conf".to_string()),
                (&"program:p1".to_string(), &"legacy.conf".to_string())
            ]
        );
        std::fs::remove_file(dir.path().join("legacy.conf"))?;
        cd.read_managed()?;
        assert!(cd.foreign().sections.is_empty());
        Ok(())
    }

    /// Reads until `check` holds (inotify events arrive on another thread).
    fn read_until(
        cd: &mut ConfDir,
        check: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> Result<BTreeMap<String, String>, Box<dyn std::error::Error>> {
        for _ in 0..500 {
            let got = cd.read_managed()?;
            if check(got) {
                return Ok(got.clone());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err("the change was never seen".into())
    }

    #[tokio::test]
    async fn a_watched_dir_is_scanned_only_after_a_change() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("corral-program-a.conf");
        let events = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut cd = ConfDir::new(dir.path());
        let counter = events.clone();
        cd.watch(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        })?;
        let content = format!("{HEADER}\n[program:a]\ncommand=x\n");
        cd.write("corral-program-a.conf", &content).await?;
        // The agent's own write is seen at once, without waiting for its event.
        assert_eq!(cd.read_managed()?["corral-program-a.conf"], content);
        // Let the write's events arrive and be consumed; then quiet reads do not scan.
        read_until(&mut cd, |_| events.load(Ordering::SeqCst) > 0)?;
        std::thread::sleep(Duration::from_millis(100));
        cd.read_managed()?;
        let scans = cd.scans();
        for _ in 0..5 {
            assert_eq!(cd.read_managed()?["corral-program-a.conf"], content);
        }
        assert_eq!(cd.scans(), scans, "a quiet directory was scanned");

        // Files supervisord does not read are none of the agent's business: no event, no scan.
        let before = events.load(Ordering::SeqCst);
        std::fs::write(dir.path().join("notes.txt"), "[program:theirs]\ncommand=x\n")?;
        std::fs::write(dir.path().join(".corral-program-a.conf.swp"), "x")?;
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            events.load(Ordering::SeqCst),
            before,
            "an unrelated file woke the agent"
        );
        cd.read_managed()?;
        assert_eq!(cd.scans(), scans, "an unrelated file caused a scan");

        // A hand edit, an appended line (no rename, same directory) included, is seen.
        let mut f = std::fs::OpenOptions::new().append(true).open(&file)?;
        f.write_all(b"autostart=false\n")?;
        drop(f);
        let got = read_until(&mut cd, |got| {
            got["corral-program-a.conf"].ends_with("autostart=false\n")
        })?;
        assert!(got["corral-program-a.conf"].starts_with(&content));
        assert!(cd.scans() > scans);
        // So is a deletion by hand.
        std::fs::remove_file(&file)?;
        read_until(&mut cd, BTreeMap::is_empty)?;

        // Without events, the directory is still scanned every FULL_SCAN_EVERY.
        let scans = cd.scans();
        if let Some(w) = &mut cd.watch {
            w.changed.store(false, Ordering::SeqCst);
            w.last_scan = Instant::now().checked_sub(FULL_SCAN_EVERY);
        }
        cd.read_managed()?;
        assert_eq!(cd.scans(), scans + 1);
        Ok(())
    }

    #[test]
    fn an_unwatched_dir_is_scanned_every_time() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut cd = ConfDir::new(dir.path());
        for n in 1..=3 {
            cd.read_managed()?;
            assert_eq!(cd.scans(), n);
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_failed_scan_is_never_trusted_as_a_reading() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut cd = ConfDir::new(dir.path());
        cd.watch(|| {})?;
        cd.write("corral-program-a.conf", &format!("{HEADER}\n[program:a]\ncommand=x\n"))
            .await?;
        // A directory with a managed name cannot be read as a file.
        std::fs::create_dir(dir.path().join("corral-program-d.conf"))?;
        std::thread::sleep(Duration::from_millis(100));
        assert!(cd.read_managed().is_err());
        let scans = cd.scans();
        // No event since: the next read still scans (and fails) instead of returning what
        // the failed scan left.
        assert!(cd.read_managed().is_err());
        assert_eq!(cd.scans(), scans + 1);
        std::fs::remove_dir(dir.path().join("corral-program-d.conf"))?;
        let got = read_until(&mut cd, |got| got.len() == 1)?;
        assert!(got.contains_key("corral-program-a.conf"));
        Ok(())
    }
}

//! Answers the controller's log requests (`corral logs`): which processes a request may read
//! (pure), and the task that watches this host's requests and reads supervisord's logs.
//!
//! Requests come only through etcd, under `logs/<host>/requests/`, which only the controller
//! may write (the host's etcd role may read them and write its replies, nothing else): the
//! agent listens on no port for them. A request names a program; only the processes of that
//! program, as assigned to this host, are read.

use std::collections::BTreeMap;
use std::time::Duration;

use corral_proto::keys::Keys;
use corral_proto::logs::{LogChunk, LogReply, LogRequest, LogStream};
use corral_proto::render;
use etcd_client::{EventType, PutOptions, WatchOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::etcd::Assignments;
use crate::supervisor::Client;

/// The processes a request may read, with the offset to read each from (0: its last bytes):
/// those of the program it names, if that program is assigned to this host and valid.
///
/// # Errors
/// Why the request is refused, for the reply.
pub fn processes_to_read(
    request: &LogRequest,
    assignments: &Assignments,
    host: &str,
) -> Result<Vec<(String, i64)>, String> {
    let name = &request.program;
    let a = assignments
        .assignments
        .get(name)
        .ok_or_else(|| format!("program {name:?} is not assigned to this host"))?;
    let program = crate::plan::accepted(name, a).map_err(|e| format!("program {name:?}: {e}"))?;
    let native = a.native_group.as_ref().map(|g| g.name.as_str());
    let namespecs = render::namespecs(&program, host, native)?;
    Ok(namespecs
        .into_iter()
        .map(|ns| {
            let offset = request.offsets.get(&ns).copied().unwrap_or(0).max(0);
            (ns, offset)
        })
        .collect())
}

/// What of a `tail*Log(offset, length)` answer came after `offset`: supervisord's tail always
/// answers the last `length` bytes (and the log's size as the new offset), so a follower
/// keeps only the bytes past where it was. A log now shorter than `offset` was rotated or
/// truncated: what it holds is new (and what came before the rotation, skipped).
pub fn after_offset(offset: i64, data: Vec<u8>, size: i64, overflow: bool) -> (Vec<u8>, bool) {
    if offset <= 0 || overflow {
        return (data, overflow);
    }
    if size < offset {
        return (data, true);
    }
    let new = usize::try_from(size - offset).unwrap_or(0);
    let start = data.len().saturating_sub(new);
    (data[start..].to_vec(), false)
}

/// Log bytes as text: a character cut at the start dropped (at most three continuation
/// bytes), bytes that are not UTF-8 shown as U+FFFD.
pub fn text_of(data: &[u8]) -> String {
    let cut = data.iter().take(3).take_while(|b| (**b & 0xC0) == 0x80).count();
    String::from_utf8_lossy(&data[cut..]).into_owned()
}

/// How long a reply stays in etcd if the controller does not take it.
const REPLY_TTL_SECS: i64 = 60;

/// Watches this host's log requests on the session's etcd connection (`clients`: the current
/// one, `None` between sessions) and answers each.
pub async fn serve(
    keys: Keys,
    host: String,
    mut clients: watch::Receiver<Option<etcd_client::Client>>,
    assignments: watch::Receiver<Assignments>,
    supervisor: Client,
    shutdown: CancellationToken,
) {
    loop {
        let client = clients.borrow_and_update().clone();
        if let Some(client) = client {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = clients.changed() => continue,
                r = answer_requests(&keys, &host, client, &assignments, &supervisor) => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "log requests: watch ended; waiting for the next session");
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = clients.changed() => if r.is_err() { return },
        }
    }
}

async fn answer_requests(
    keys: &Keys,
    host: &str,
    mut client: etcd_client::Client,
    assignments: &watch::Receiver<Assignments>,
    supervisor: &Client,
) -> Result<(), etcd_client::Error> {
    let prefix = keys.log_requests(host);
    let mut stream = corral_etcd::watch(&client, prefix.clone(), Some(WatchOptions::new().with_prefix())).await?;
    while let Some(resp) = stream.message().await? {
        if resp.canceled() {
            return Ok(());
        }
        for ev in resp.events() {
            let (EventType::Put, Some(kv)) = (ev.event_type(), ev.kv()) else {
                continue;
            };
            let Some(id) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else {
                continue;
            };
            let reply = match serde_json::from_slice::<LogRequest>(kv.value()) {
                Ok(request) => {
                    let current = assignments.borrow().clone();
                    read(&request, processes_to_read(&request, &current, host), host, supervisor).await
                }
                Err(e) => LogReply {
                    chunks: Vec::new(),
                    error: Some(format!("the request does not parse: {e}")),
                },
            };
            let value = serde_json::to_vec(&reply).unwrap_or_default();
            let lease = tokio::time::timeout(Duration::from_secs(10), client.lease_grant(REPLY_TTL_SECS, None))
                .await
                .map_err(|_| etcd_client::Error::InvalidArgs("lease grant timed out".into()))??
                .id();
            let put = client.put(
                keys.log_reply(host, id),
                value,
                Some(PutOptions::new().with_lease(lease)),
            );
            tokio::time::timeout(Duration::from_secs(10), put)
                .await
                .map_err(|_| etcd_client::Error::InvalidArgs("reply timed out".into()))??;
        }
    }
    Ok(())
}

async fn read(
    request: &LogRequest,
    processes: Result<Vec<(String, i64)>, String>,
    host: &str,
    supervisor: &Client,
) -> LogReply {
    let processes = match processes {
        Ok(p) => p,
        Err(e) => {
            return LogReply {
                chunks: Vec::new(),
                error: Some(e),
            };
        }
    };
    let bytes = i64::from(request.bytes_each(processes.len()));
    let first_bytes = i64::from(request.first_bytes_each(processes.len()));
    let mut reply = LogReply::default();
    let mut errors = BTreeMap::new();
    for (ns, offset) in processes {
        let known = request.files.get(&ns).map(String::as_str).filter(|f| !f.is_empty());
        let bytes = if offset > 0 { bytes } else { first_bytes };
        match read_piece(supervisor, &ns, request.stream, offset, known, bytes).await {
            Ok(piece) => reply.chunks.push(LogChunk {
                host: host.to_string(),
                process: ns,
                text: text_of(&piece.data),
                offset: piece.offset,
                overflow: piece.skipped,
                file: piece.file,
            }),
            Err(e) => {
                errors.insert(ns, e);
            }
        }
    }
    if !errors.is_empty() {
        let list: Vec<String> = errors.into_iter().map(|(ns, e)| format!("{ns}: {e}")).collect();
        reply.error = Some(list.join("; "));
    }
    reply
}

/// What one read of a process's log brings: its bytes, where the next read continues, whether
/// some were skipped before or among them, and the file read (empty when supervisord read it).
pub struct Piece {
    pub data: Vec<u8>,
    pub offset: i64,
    pub skipped: bool,
    pub file: String,
}

/// Reads what came after `offset` (0: the last `bytes`) of a process's log, at most `bytes`.
/// The agent reads the file supervisord names itself: any bytes (supervisord cannot send
/// bytes that are not UTF-8: it answers HTTP 500 and logs a traceback), and it knows the
/// file, so a log rotated or cleared since `known` is told from one that grew, and the rest
/// of a rotated one is read from its `.1`. When the agent cannot open the file (supervisord
/// in another mount namespace), supervisord's own tail.
///
/// # Errors
/// Why the log cannot be read, for the reply.
pub async fn read_piece(
    supervisor: &Client,
    ns: &str,
    stream: LogStream,
    offset: i64,
    known: Option<&str>,
    bytes: i64,
) -> Result<Piece, String> {
    let info = supervisor.get_process_info(ns).await.map_err(|e| e.to_string())?;
    let path = match stream {
        LogStream::Stdout => info.stdout_logfile,
        LogStream::Stderr => info.stderr_logfile,
    };
    if path.is_empty() {
        return Err(match stream {
            LogStream::Stderr => "its stderr goes to its stdout log (redirect_stderr): read it without --stderr",
            LogStream::Stdout => "it keeps no stdout log (stdout_logfile NONE)",
        }
        .to_string());
    }
    match read_file_piece(&path, offset, known, bytes).await {
        Ok(piece) => Ok(piece),
        Err(e) => {
            tracing::debug!(path, error = %e, "reading the log through supervisord");
            tail_through_supervisord(supervisor, ns, stream, offset, bytes).await
        }
    }
}

/// A file's identity: device, inode and creation time (supervisord clears a log by removing
/// and creating it again, and the new file often gets the inode just freed). Where the file
/// system keeps no creation time, device and inode.
fn file_id(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let born = meta
        .created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{}:{}:{born}", meta.dev(), meta.ino())
}

/// Which bytes of a log of `size` bytes a reader takes: `(start, length, skipped)`. From
/// `offset` in the same file, what came after it (its last `bytes` when more came); on a
/// first read (`offset` 0) or in another file (rotated, cleared, or truncated below the
/// offset), the last `bytes` (what the old file held past the offset is skipped).
pub fn follow_window(size: i64, offset: i64, bytes: i64, same_file: bool) -> (i64, i64, bool) {
    let bytes = bytes.max(0);
    if offset > 0 && same_file && size >= offset {
        let new = size - offset;
        return if new <= bytes {
            (offset, new, false)
        } else {
            (size - bytes, bytes, true)
        };
    }
    let start = (size - bytes).max(0);
    (start, size - start, start > 0 || offset > 0)
}

async fn read_file_piece(path: &str, offset: i64, known: Option<&str>, bytes: i64) -> std::io::Result<Piece> {
    let f = tokio::fs::File::open(path).await?;
    let meta = f.metadata().await?;
    let file = file_id(&meta);
    let size = i64::try_from(meta.len()).unwrap_or(i64::MAX);
    let same = known.is_none_or(|k| k == file);
    let mut data = Vec::new();
    let mut budget = bytes;
    let mut lost = false;
    if !same && offset > 0 {
        // Rotated: supervisord renamed the file it wrote to PATH.1; the rest is there.
        match read_rest(&format!("{path}.1"), known.unwrap_or_default(), offset, bytes).await {
            Some((rest, complete)) => {
                budget -= i64::try_from(rest.len()).unwrap_or(bytes);
                lost = !complete;
                data = rest;
            }
            None => lost = true,
        }
    }
    let (start, len, skipped) = follow_window(size, if same { offset } else { 0 }, budget, same);
    data.extend(read_range(f, start, len).await?);
    Ok(Piece {
        data,
        offset: size,
        skipped: lost || skipped,
        file,
    })
}

/// What `path` (if it is still the file `known`) holds past `offset`, at most `bytes`, and
/// whether that is all of it.
async fn read_rest(path: &str, known: &str, offset: i64, bytes: i64) -> Option<(Vec<u8>, bool)> {
    let f = tokio::fs::File::open(path).await.ok()?;
    let meta = f.metadata().await.ok()?;
    if file_id(&meta) != known {
        return None;
    }
    let size = i64::try_from(meta.len()).unwrap_or(i64::MAX);
    let len = (size - offset).clamp(0, bytes.max(0));
    let data = read_range(f, offset.min(size), len).await.ok()?;
    Some((data, size - offset <= bytes))
}

async fn read_range(mut f: tokio::fs::File, start: i64, len: i64) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
    f.seek(std::io::SeekFrom::Start(u64::try_from(start).unwrap_or(0)))
        .await?;
    let mut data = Vec::new();
    f.take(u64::try_from(len).unwrap_or(0)).read_to_end(&mut data).await?;
    Ok(data)
}

/// supervisord's `tail*Log`, for a log the agent cannot open: what came after `offset`, and a
/// log now shorter than it (rotated, cleared: supervisord answers nothing past the end)
/// read again from its last bytes.
pub async fn tail_through_supervisord(
    supervisor: &Client,
    ns: &str,
    stream: LogStream,
    offset: i64,
    bytes: i64,
) -> Result<Piece, String> {
    let tail = |offset: i64| async move {
        let (offset, bytes) = (
            i32::try_from(offset).unwrap_or(i32::MAX),
            i32::try_from(bytes).unwrap_or(i32::MAX),
        );
        match stream {
            LogStream::Stdout => supervisor.tail_process_stdout_log(ns, offset, bytes).await,
            LogStream::Stderr => supervisor.tail_process_stderr_log(ns, offset, bytes).await,
        }
        .map_err(|e| e.to_string())
    };
    let mut t = tail(offset).await?;
    if t.offset < offset {
        t = tail(0).await?;
    }
    let data = t.text.into_bytes();
    let (data, skipped) = after_offset(offset, data, t.offset, t.overflow);
    Ok(Piece {
        data,
        offset: t.offset,
        skipped,
        file: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::fleet::Assignment;
    use corral_proto::resource::{Metadata, Program, ProgramSpec};
    use std::sync::Arc;

    fn assigned(list: &[(&str, Option<i64>)]) -> Assignments {
        let mut r = crate::etcd::Received::default();
        for (name, numprocs) in list {
            let spec = ProgramSpec {
                command: "/bin/sleep 1".into(),
                selector: Some(Default::default()),
                numprocs: *numprocs,
                process_name: numprocs.map(|_| "%(program_name)s_%(process_num)d".into()),
                ..Default::default()
            };
            let program = Program::new(
                Metadata {
                    name: name.to_string(),
                    generation: 1,
                    ..Default::default()
                },
                spec,
            );
            r.assignments.insert(
                name.to_string(),
                Assignment {
                    program,
                    native_group: None,
                },
            );
        }
        Arc::new(r)
    }

    #[test]
    fn a_follower_of_supervisords_tail_gets_only_what_came_after_its_offset() {
        let after = |offset, text: &str, size, overflow| {
            let (data, skipped) = after_offset(offset, text.into(), size, overflow);
            (text_of(&data), skipped)
        };
        // The first read: the last bytes as they are.
        assert_eq!(after(0, "abc\n", 4, false), ("abc\n".into(), false));
        // Nothing new: supervisord still answers the last bytes.
        assert_eq!(after(4, "abc\n", 4, false), (String::new(), false));
        assert_eq!(after(4, "abc\ndef\n", 8, false), ("def\n".into(), false));
        // More than asked for came: what supervisord gives, with the skip said.
        assert_eq!(after(4, "xyz", 9000, true), ("xyz".into(), true));
        // Rotated: the new log is all new.
        assert_eq!(after(100, "fresh\n", 6, false), ("fresh\n".into(), true));
        // A multi-byte character cut by the byte count is not split.
        assert_eq!(after(2, "aé\n", 4, false), ("\n".into(), false));
        // Cut at the start of the window, or not UTF-8 at all.
        assert_eq!(text_of(b"\xA9\xE2\x82\xACok\xFF\n"), "€ok\u{FFFD}\n");
    }

    #[test]
    fn a_follower_of_a_file_reads_what_came_after_its_offset_or_the_new_files_end() {
        // The first read: the last bytes, what came before them skipped.
        assert_eq!(follow_window(100, 0, 10, true), (90, 10, true));
        assert_eq!(follow_window(5, 0, 10, true), (0, 5, false));
        assert_eq!(follow_window(0, 0, 10, true), (0, 0, false));
        // Following the same file: from the offset, or its last bytes when more came.
        assert_eq!(follow_window(100, 95, 10, true), (95, 5, false));
        assert_eq!(follow_window(100, 100, 10, true), (100, 0, false));
        assert_eq!(follow_window(1000, 100, 10, true), (990, 10, true));
        // Shorter than the offset (truncated), or another file (rotated, cleared), even one
        // that has grown past the offset: its start or its last bytes, a gap said.
        assert_eq!(follow_window(4, 100, 10, true), (0, 4, true));
        assert_eq!(follow_window(240, 240, 1000, false), (0, 240, true));
        assert_eq!(follow_window(2000, 240, 1000, false), (1000, 1000, true));
    }

    #[test]
    fn a_request_reads_only_the_processes_of_the_program_it_names() {
        let a = assigned(&[("web", Some(2)), ("db", None)]);
        let request = |program: &str, offsets: &[(&str, i64)]| LogRequest {
            program: program.into(),
            bytes: 100,
            offsets: offsets.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ..Default::default()
        };
        assert_eq!(
            processes_to_read(&request("web", &[("web_1", 40), ("db", 7)]), &a, "h1"),
            Ok(vec![("web_0".to_string(), 0), ("web_1".to_string(), 40)]),
            "another program's process named in offsets is not read"
        );
        assert_eq!(
            processes_to_read(&request("db", &[]), &a, "h1"),
            Ok(vec![("db".to_string(), 0)])
        );
        assert!(
            processes_to_read(&request("other", &[]), &a, "h1")
                .expect_err("refused")
                .contains("not assigned to this host")
        );
        assert!(processes_to_read(&request("../web", &[]), &a, "h1").is_err());
    }
}

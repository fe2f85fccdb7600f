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
/// truncated: what it holds is new (and what came before the rotation, skipped). A character
/// cut at the start is dropped; bytes that are not UTF-8 are shown as U+FFFD.
pub fn after_offset(offset: i64, data: Vec<u8>, size: i64, overflow: bool) -> (String, bool) {
    let (data, overflow) = if offset <= 0 || overflow {
        (&data[..], overflow)
    } else if size < offset {
        (&data[..], true)
    } else {
        let new = usize::try_from(size - offset).unwrap_or(0);
        (&data[data.len().saturating_sub(new)..], false)
    };
    // At most three continuation bytes of a character whose first byte was cut off.
    let cut = data.iter().take(3).take_while(|b| (**b & 0xC0) == 0x80).count();
    (String::from_utf8_lossy(&data[cut..]).into_owned(), overflow)
}

/// Which bytes supervisord's `tailFile(offset, length)` answers of a log of `size` bytes:
/// `(start, length, overflow)`, as its code computes them (with `offset` past the end, the
/// last `length` bytes; more than `length` new bytes, the last `length` and overflow).
pub fn tail_window(size: i64, offset: i64, length: i64) -> (i64, i64, bool) {
    let (mut offset, mut length, mut overflow) = (offset, length, false);
    if size > offset.saturating_add(length) {
        overflow = true;
        offset = size - 1;
    }
    if offset.saturating_add(length) > size {
        if offset > size - 1 {
            length = 0;
        }
        offset = size - length;
    }
    let offset = offset.max(0);
    let length = length.max(0).min(size - offset);
    (offset, length, overflow)
}

/// Reads a log file as supervisord's tail would (see [`tail_window`]): the bytes, the
/// file's size, and whether more than `length` were skipped.
async fn read_log_file(path: &str, offset: i64, length: i64) -> std::io::Result<(Vec<u8>, i64, bool)> {
    use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
    let mut f = tokio::fs::File::open(path).await?;
    let size = i64::try_from(f.metadata().await?.len()).unwrap_or(i64::MAX);
    let (start, len, overflow) = tail_window(size, offset, length);
    f.seek(std::io::SeekFrom::Start(u64::try_from(start).unwrap_or(0)))
        .await?;
    let mut data = Vec::new();
    f.take(u64::try_from(len).unwrap_or(0)).read_to_end(&mut data).await?;
    Ok((data, size, overflow))
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
    let bytes = i32::try_from(request.bytes_each(processes.len())).unwrap_or(i32::MAX);
    let mut reply = LogReply::default();
    let mut errors = BTreeMap::new();
    for (ns, offset) in processes {
        let offset = i32::try_from(offset).unwrap_or(i32::MAX);
        let mut tail = tail(supervisor, &ns, request.stream, offset, bytes).await;
        if let Ok((_, size, _)) = &tail
            && *size < i64::from(offset)
        {
            // Rotated or truncated since the last read (supervisord answers nothing past
            // the end): all the log holds is new.
            tail = self::tail(supervisor, &ns, request.stream, 0, bytes).await;
        }
        match tail {
            Ok((data, size, overflow)) => {
                let (text, overflow) = after_offset(i64::from(offset), data, size, overflow);
                reply.chunks.push(LogChunk {
                    host: host.to_string(),
                    process: ns,
                    text,
                    offset: size,
                    overflow,
                });
            }
            Err(e) => {
                errors.insert(ns, e.to_string());
            }
        }
    }
    if !errors.is_empty() {
        let list: Vec<String> = errors.into_iter().map(|(ns, e)| format!("{ns}: {e}")).collect();
        reply.error = Some(list.join("; "));
    }
    reply
}

/// `tail*Log(offset, bytes)` of one process: the bytes, the log's size, whether more were
/// skipped.
pub(crate) async fn tail(
    supervisor: &Client,
    ns: &str,
    stream: LogStream,
    offset: i32,
    bytes: i32,
) -> Result<(Vec<u8>, i64, bool), String> {
    let tail = match stream {
        LogStream::Stdout => supervisor.tail_process_stdout_log(ns, offset, bytes).await,
        LogStream::Stderr => supervisor.tail_process_stderr_log(ns, offset, bytes).await,
    };
    match tail {
        // supervisord answers a tail whose bytes are not UTF-8 (a character cut at the
        // start of the window, a binary log) with HTTP 500: the agent reads the same bytes
        // of the file itself.
        Err(crate::supervisor::Error::Http { status: 500, .. }) => {
            let info = supervisor.get_process_info(ns).await.map_err(|e| e.to_string())?;
            let path = match stream {
                LogStream::Stdout => info.stdout_logfile,
                LogStream::Stderr => info.stderr_logfile,
            };
            if path.is_empty() {
                return Err("supervisord could not read its log, which has no file".to_string());
            }
            read_log_file(&path, i64::from(offset), i64::from(bytes))
                .await
                .map_err(|e| format!("supervisord could not read its log, nor could the agent ({path}: {e})"))
        }
        other => other
            .map(|t| (t.text.into_bytes(), t.offset, t.overflow))
            .map_err(|e| e.to_string()),
    }
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
    fn a_follower_gets_only_what_came_after_its_offset() {
        // The first read: the last bytes as they are.
        assert_eq!(after_offset(0, "abc\n".into(), 4, false), ("abc\n".into(), false));
        // Nothing new: supervisord still answers the last bytes.
        assert_eq!(after_offset(4, "abc\n".into(), 4, false), (String::new(), false));
        assert_eq!(after_offset(4, "abc\ndef\n".into(), 8, false), ("def\n".into(), false));
        // More than asked for came: what supervisord gives, with the skip said.
        assert_eq!(after_offset(4, "xyz".into(), 9000, true), ("xyz".into(), true));
        // Rotated: the new log is all new.
        assert_eq!(after_offset(100, "fresh\n".into(), 6, false), ("fresh\n".into(), true));
        // A multi-byte character cut by the byte count is not split.
        assert_eq!(after_offset(2, "aé\n".into(), 4, false), ("\n".into(), false));
        // Cut at the start of the window, or not UTF-8 at all.
        assert_eq!(
            after_offset(0, b"\xA9\xE2\x82\xACok\xFF\n".to_vec(), 9, false),
            ("€ok\u{FFFD}\n".into(), false)
        );
    }

    #[test]
    fn a_log_file_is_read_as_supervisord_tails_it() {
        // The first read: the last `length` bytes, more before them said as skipped.
        assert_eq!(tail_window(100, 0, 10), (90, 10, true));
        assert_eq!(tail_window(5, 0, 10), (0, 5, false));
        assert_eq!(tail_window(0, 0, 10), (0, 0, false));
        // Following: from the offset when it is all there...
        assert_eq!(tail_window(100, 95, 10), (90, 10, false));
        assert_eq!(tail_window(100, 100, 10), (100, 0, false));
        // ...the last bytes when more came.
        assert_eq!(tail_window(1000, 100, 10), (990, 10, true));
        // Rotated (shorter than the offset): nothing; `read` asks again from the start.
        assert_eq!(tail_window(4, 100, 10), (4, 0, false));
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

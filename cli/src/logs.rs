//! `corral logs NAME|GROUP: [--host H] [-f] [--tail N] [--stderr]`: supervisord's logs of a
//! program's processes on every host, each line prefixed with its host and process.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use corral_cli::client::ApiClient;
use corral_proto::logs::{LogChunk, LogStream, LogsQuery};

use crate::exit;

/// How often `-f` asks for what is new.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// Turns pieces of logs into whole lines: what follows a process's last newline waits for
/// the rest of its line, unless `flush` (nothing more came) or the piece skipped text.
#[derive(Debug, Default)]
pub struct Lines {
    partial: BTreeMap<(String, String), String>,
}

impl Lines {
    /// The lines `chunk` completes, as `(host, process, line)`.
    pub fn take(&mut self, chunk: &LogChunk) -> Vec<(String, String, String)> {
        let key = (chunk.host.clone(), chunk.process.clone());
        let mut out = Vec::new();
        if chunk.overflow {
            if let Some(rest) = self.partial.remove(&key) {
                out.push((key.0.clone(), key.1.clone(), rest));
            }
            out.push((
                key.0.clone(),
                key.1.clone(),
                "[...] (earlier output skipped)".to_string(),
            ));
        }
        let mut text = self.partial.remove(&key).unwrap_or_default();
        text.push_str(&chunk.text);
        let mut parts: Vec<&str> = text.split('\n').collect();
        let rest = parts.pop().unwrap_or_default();
        for line in parts {
            out.push((key.0.clone(), key.1.clone(), line.trim_end_matches('\r').to_string()));
        }
        if !rest.is_empty() {
            self.partial.insert(key, rest.to_string());
        }
        out
    }

    /// Ends every line still waiting (except those in `keep`, which just got text).
    pub fn flush(&mut self, keep: &[(String, String)]) -> Vec<(String, String, String)> {
        let done: Vec<(String, String)> = self.partial.keys().filter(|k| !keep.contains(k)).cloned().collect();
        done.into_iter()
            .filter_map(|k| {
                let line = self.partial.remove(&k)?;
                Some((k.0, k.1, line))
            })
            .collect()
    }
}

/// The programs `name` stands for (`GROUP:` is every member).
async fn programs(api: &ApiClient, name: &str) -> anyhow::Result<Vec<String>> {
    Ok(match name.strip_suffix(':') {
        Some(group) => api.group(group).await?.spec.programs,
        None => vec![name.to_string()],
    })
}

pub struct Options<'a> {
    pub name: &'a str,
    pub host: Option<&'a str>,
    pub follow: bool,
    pub tail_bytes: u32,
    pub stderr: bool,
}

pub async fn logs(api: &ApiClient, o: Options<'_>) -> anyhow::Result<ExitCode> {
    let programs = programs(api, o.name).await?;
    let stream = if o.stderr { LogStream::Stderr } else { LogStream::Stdout };
    let mut offsets: BTreeMap<String, BTreeMap<String, BTreeMap<String, i64>>> = BTreeMap::new();
    let mut lines = Lines::default();
    let mut said: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut worst = exit::Worst::default();
    loop {
        let mut got = Vec::new();
        for program in &programs {
            let query = LogsQuery {
                host: o.host.map(str::to_string),
                stream,
                bytes: o.tail_bytes,
                offsets: offsets.get(program).cloned().unwrap_or_default(),
            };
            let answer = match api.logs(program, &query).await {
                Ok(a) => a,
                Err(e) if o.follow && e.status().is_none() => {
                    // The controller is away for a moment: keep following.
                    eprintln!("{program}: {e}");
                    continue;
                }
                Err(e) => {
                    eprintln!("{program}: {e}");
                    worst.failed(&e);
                    continue;
                }
            };
            for (host, why) in &answer.errors {
                // Said once, not at every poll.
                if said.insert((program.clone(), host.clone()), why.clone()).as_ref() != Some(why) {
                    eprintln!("{program} on {host}: {why}");
                }
                worst.refused();
            }
            for chunk in answer.chunks {
                offsets
                    .entry(program.clone())
                    .or_default()
                    .entry(chunk.host.clone())
                    .or_default()
                    .insert(chunk.process.clone(), chunk.offset);
                if !chunk.text.is_empty() || chunk.overflow {
                    got.push((chunk.host.clone(), chunk.process.clone()));
                }
                print(lines.take(&chunk));
            }
        }
        if !o.follow {
            print(lines.flush(&[]));
            return Ok(worst.code());
        }
        print(lines.flush(&got));
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

fn print(lines: Vec<(String, String, String)>) {
    for (host, process, line) in lines {
        outln!("{host} {process} | {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(text: &str, overflow: bool) -> LogChunk {
        LogChunk {
            host: "h1".into(),
            process: "web".into(),
            text: text.into(),
            offset: 0,
            overflow,
        }
    }

    fn texts(v: Vec<(String, String, String)>) -> Vec<String> {
        v.into_iter().map(|(_, _, l)| l).collect()
    }

    #[test]
    fn pieces_become_whole_lines_and_a_skip_is_said() {
        let mut l = Lines::default();
        assert_eq!(texts(l.take(&chunk("one\ntw", false))), ["one"]);
        assert_eq!(texts(l.take(&chunk("o\r\nthree\n", false))), ["two", "three"]);
        assert_eq!(texts(l.take(&chunk("prompt> ", false))), Vec::<String>::new());
        let me = vec![("h1".to_string(), "web".to_string())];
        assert!(l.flush(&me).is_empty(), "it just got text: it may go on");
        assert_eq!(texts(l.flush(&[])), ["prompt> "]);
        assert_eq!(
            texts(
                l.take(&chunk("half", false))
                    .into_iter()
                    .chain(l.take(&chunk("new\n", true)))
                    .collect()
            ),
            ["half", "[...] (earlier output skipped)", "new"]
        );
    }
}

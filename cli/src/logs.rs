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

/// `--since`: `30s`, `10m`, `2h`, `1d`.
///
/// # Errors
/// What is wrong with it, for clap.
pub fn parse_since(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 30s, 10m, 2h or 1d"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?} is not a duration such as 30s, 10m, 2h or 1d")),
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

/// The time a log line starts with, if it starts with one: `2026-11-27T03:20:18Z`,
/// `2026-11-27 03:20:18,123` (Python's logging), `[2026-11-27 03:20:18.5 +0100]`, with an
/// optional fraction and offset; without an offset the time is taken as UTC.
pub fn line_time(line: &str) -> Option<time::OffsetDateTime> {
    let line = line.trim_start().trim_start_matches('[');
    let head = line.get(..19).filter(|h| h.is_ascii())?;
    let mut normal = head.to_string();
    normal.replace_range(10..11, "T");
    let at = time::PrimitiveDateTime::parse(
        &normal,
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]"),
    )
    .ok()?;
    let rest = &line[19..];
    let rest = rest
        .strip_prefix(['.', ','])
        .map_or(rest, |r| r.trim_start_matches(|c: char| c.is_ascii_digit()));
    let rest = rest.trim_start_matches(' ');
    let offset = if rest.starts_with('Z') {
        time::UtcOffset::UTC
    } else if let Some(sign) = rest.chars().next().filter(|c| *c == '+' || *c == '-') {
        let digits: String = rest[1..].chars().filter(char::is_ascii_digit).take(4).collect();
        let (h, m) = (
            digits.get(..2)?.parse::<i8>().ok()?,
            digits.get(2..4).unwrap_or("00").parse::<i8>().ok()?,
        );
        let (h, m) = if sign == '-' { (-h, -m) } else { (h, m) };
        time::UtcOffset::from_hms(h, m, 0).ok()?
    } else {
        time::UtcOffset::UTC
    };
    Some(at.assume_offset(offset))
}

/// Keeps the lines from `since` on: a line without a time goes with the line before it (a
/// traceback with its message); lines before the first line with a time are of unknown time
/// and left out. Returns the lines kept, and how many were left out for want of a time.
pub fn since_filter(
    lines: Vec<(String, String, String)>,
    since: time::OffsetDateTime,
) -> (Vec<(String, String, String)>, usize) {
    let mut keep: BTreeMap<(String, String), Option<bool>> = BTreeMap::new();
    let mut unknown = 0;
    let mut out = Vec::new();
    for (host, process, line) in lines {
        let state = keep.entry((host.clone(), process.clone())).or_default();
        if let Some(at) = line_time(&line) {
            *state = Some(at >= since);
        }
        match state {
            Some(true) => out.push((host, process, line)),
            Some(false) => {}
            None => unknown += 1,
        }
    }
    (out, unknown)
}

pub struct Options<'a> {
    pub name: &'a str,
    pub host: Option<&'a str>,
    pub follow: bool,
    pub tail_bytes: u32,
    pub stderr: bool,
    /// Only lines from this long ago on (by the time each line starts with).
    pub since: Option<Duration>,
}

pub async fn logs(api: &ApiClient, o: Options<'_>) -> anyhow::Result<ExitCode> {
    let programs = crate::online::targets(api, o.name).await?;
    let stream = if o.stderr { LogStream::Stderr } else { LogStream::Stdout };
    let mut offsets: BTreeMap<String, BTreeMap<String, BTreeMap<String, i64>>> = BTreeMap::new();
    let mut files: BTreeMap<String, BTreeMap<String, BTreeMap<String, String>>> = BTreeMap::new();
    let mut lines = Lines::default();
    let mut said: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut worst = exit::Worst::default();
    let since = o.since.map(|d| {
        time::OffsetDateTime::now_utc() - time::Duration::seconds(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    });
    let mut first = true;
    loop {
        let mut lines_now = Vec::new();
        let mut got = Vec::new();
        for program in &programs {
            let query = LogsQuery {
                host: o.host.map(str::to_string),
                stream,
                // --tail is how far back the first read goes; following, each read takes all
                // that came since the last, up to the most an answer carries (64 KiB a process
                // a second: more is said as skipped).
                bytes: if first {
                    o.tail_bytes
                } else {
                    corral_proto::logs::MAX_LOG_BYTES
                },
                // A process read for the first time later on (its host answers late) starts
                // from --tail too.
                tail: Some(o.tail_bytes),
                offsets: offsets.get(program).cloned().unwrap_or_default(),
                files: files.get(program).cloned().unwrap_or_default(),
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
                let fresh = offsets
                    .entry(program.clone())
                    .or_default()
                    .entry(chunk.host.clone())
                    .or_default()
                    .insert(chunk.process.clone(), chunk.offset)
                    .is_none();
                if !chunk.file.is_empty() {
                    files
                        .entry(program.clone())
                        .or_default()
                        .entry(chunk.host.clone())
                        .or_default()
                        .insert(chunk.process.clone(), chunk.file.clone());
                }
                if !chunk.text.is_empty() || chunk.overflow {
                    got.push((chunk.host.clone(), chunk.process.clone()));
                }
                let taken = lines.take(&chunk);
                match since {
                    // A process first read after the first poll (its host was away) reaches
                    // into the past too: --since applies to it as to the first read.
                    Some(since) if fresh && !first => {
                        let (kept, unknown) = since_filter(taken, since);
                        if unknown > 0 {
                            eprintln!(
                                "note: {unknown} lines of {} on {} before the first line with a time were left out (--since)",
                                chunk.process, chunk.host
                            );
                        }
                        lines_now.extend(kept);
                    }
                    _ => lines_now.extend(taken),
                }
            }
        }
        lines_now.extend(if o.follow { lines.flush(&got) } else { lines.flush(&[]) });
        match since {
            // Only the first read reaches into the past; what follows is new.
            Some(since) if first => {
                let (kept, unknown) = since_filter(lines_now, since);
                if unknown > 0 {
                    eprintln!("note: {unknown} lines before the first line with a time were left out (--since)");
                }
                print(kept);
            }
            _ => print(lines_now),
        }
        first = false;
        if !o.follow {
            return Ok(worst.code());
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

fn print(lines: Vec<(String, String, String)>) {
    use std::io::IsTerminal as _;
    let terminal = std::io::stdout().is_terminal();
    for (host, process, line) in lines {
        if terminal {
            outln!("{host} {process} | {}", visible(&line));
        } else {
            outln!("{host} {process} | {line}");
        }
    }
}

/// A log line as a terminal may show it: control characters (escape sequences that would move
/// the cursor, retitle the window or write the clipboard) written out as `\x1b`, tabs kept.
/// `corral logs` uses it only on a terminal (piped, lines go out as the program wrote them);
/// `describe` always.
pub(crate) fn visible(line: &str) -> std::borrow::Cow<'_, str> {
    if !line.chars().any(|c| c.is_control() && c != '\t') {
        return line.into();
    }
    let mut out = String::with_capacity(line.len() + 8);
    for c in line.chars() {
        if c.is_control() && c != '\t' {
            // Every control character (C0, DEL, C1) is below U+0100.
            out.push_str(&format!("\\x{:02x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out.into()
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
            file: String::new(),
        }
    }

    #[test]
    fn a_terminal_sees_escape_sequences_written_out() {
        assert_eq!(visible("plain\ttext é"), "plain\ttext é");
        assert_eq!(
            visible("\x1b[31mred\x1b[0m \x1b]52;c;ZXZpbA==\x07\r\u{9b}"),
            "\\x1b[31mred\\x1b[0m \\x1b]52;c;ZXZpbA==\\x07\\x0d\\x9b"
        );
    }

    fn texts(v: Vec<(String, String, String)>) -> Vec<String> {
        v.into_iter().map(|(_, _, l)| l).collect()
    }

    #[test]
    fn since_keeps_lines_by_the_time_they_start_with_and_their_continuations() {
        use time::macros::datetime;
        assert_eq!(
            line_time("2026-11-27T03:20:18Z started"),
            Some(datetime!(2026-11-27 03:20:18 UTC))
        );
        assert_eq!(
            line_time("2026-11-27 03:20:18,123 INFO x"),
            Some(datetime!(2026-11-27 03:20:18 UTC))
        );
        assert_eq!(
            line_time("[2026-11-27 04:20:18.5 +0100] x"),
            Some(datetime!(2026-11-27 03:20:18 UTC))
        );
        assert_eq!(
            line_time("2026-11-27T01:20:18-02:00 x"),
            Some(datetime!(2026-11-27 03:20:18 UTC))
        );
        assert_eq!(line_time("GET / 200"), None);
        assert_eq!(line_time("2026-13-27 03:20:18 x"), None);
        assert_eq!(line_time("é"), None);
        assert_eq!(line_time("2026-11-2éé 03:20:18 x"), None);
        let l = |p: &str, s: &str| ("h1".to_string(), p.to_string(), s.to_string());
        let (kept, unknown) = since_filter(
            vec![
                l("web", "no time yet"),
                l("web", "2026-11-27 03:00:00 old"),
                l("web", "  old traceback"),
                l("db", "2026-11-27 03:30:00 db new"),
                l("web", "2026-11-27 03:30:00 new"),
                l("web", "  new traceback"),
            ],
            datetime!(2026-11-27 03:10:00 UTC),
        );
        let texts: Vec<&str> = kept.iter().map(|(_, _, t)| t.as_str()).collect();
        assert_eq!(
            texts,
            [
                "2026-11-27 03:30:00 db new",
                "2026-11-27 03:30:00 new",
                "  new traceback"
            ]
        );
        assert_eq!(unknown, 1);
        assert_eq!(parse_since("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_since("1d"), Ok(Duration::from_secs(86_400)));
        assert!(parse_since("10").is_err() && parse_since("m").is_err() && parse_since("5w").is_err());
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

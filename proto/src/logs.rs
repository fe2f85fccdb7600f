//! Reading processes' logs across the fleet (`corral logs`).
//!
//! The CLI asks the controller (`POST /v1/programs/NAME/logs`, any token); the controller
//! writes one [`LogRequest`] per host under `<prefix>/logs/<host>/requests/<id>` (only the
//! controller may write there; a host's etcd role may only read its own requests) and waits
//! for the agents' [`LogReply`] under `<prefix>/logs/<host>/replies/<id>`. An agent reads
//! supervisord's own log of the processes of the program named, and of no other: it serves
//! no network caller at all.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Which log of a process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    #[default]
    Stdout,
    Stderr,
}

/// The most bytes of one process's log one answer carries.
pub const MAX_LOG_BYTES: u32 = 64 * 1024;
/// The most bytes of log one host's reply carries, whatever its number of processes (etcd
/// refuses values past 1.5 MiB).
pub const MAX_REPLY_BYTES: u32 = 512 * 1024;

/// `POST /v1/programs/NAME/logs`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LogsQuery {
    /// Only this host (else every host the program is assigned to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default)]
    pub stream: LogStream,
    /// The last bytes of each process's log (1 to [`MAX_LOG_BYTES`]); with `offsets`, at
    /// most this much of what came after them.
    pub bytes: u32,
    /// host -> process -> where the previous answer ended: only what came after is sent
    /// (`corral logs -f`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub offsets: BTreeMap<String, BTreeMap<String, i64>>,
    /// host -> process -> the log file the previous answer read (`LogChunk::file`): another
    /// file there now means the log was rotated or cleared since.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, BTreeMap<String, String>>,
    /// The last bytes of a process read for the first time (no offset yet: a host that
    /// answers late, a process that appears), when `bytes` is larger. Default `bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<u32>,
}

/// A piece of one process's log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogChunk {
    pub host: String,
    /// supervisord's `group:name`.
    pub process: String,
    pub text: String,
    /// Where the next read continues.
    pub offset: i64,
    /// More was written than asked for: the start of this piece was skipped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overflow: bool,
    /// The file read (device and inode), when the agent read it itself: sent back with the
    /// offset, it tells a rotated or cleared log from one that grew.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub file: String,
}

/// The answer of `POST /v1/programs/NAME/logs`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Logs {
    pub chunks: Vec<LogChunk>,
    /// host -> why its logs could not be read (the agent is away, the program does not run
    /// there, supervisord refused).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub errors: BTreeMap<String, String>,
}

/// What the controller asks one host's agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LogRequest {
    pub program: String,
    pub stream: LogStream,
    pub bytes: u32,
    /// process -> offset, from the previous answer.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub offsets: BTreeMap<String, i64>,
    /// process -> the file the previous answer read (`LogChunk::file`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
    /// `LogsQuery::tail`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<u32>,
}

/// One agent's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogReply {
    pub chunks: Vec<LogChunk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl LogsQuery {
    /// Refuses what no answer could satisfy, naming the field.
    ///
    /// # Errors
    /// Why, for a 422.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=MAX_LOG_BYTES).contains(&self.bytes) {
            return Err(format!("bytes: {} is out of range (1 to {MAX_LOG_BYTES})", self.bytes));
        }
        if let Some(h) = &self.host {
            crate::validate::check_host_name(h).map_err(|e| format!("host: {e}"))?;
        }
        if self.offsets.values().flat_map(|o| o.values()).any(|o| *o < 0) {
            return Err("offsets: an offset is negative".to_string());
        }
        if let Some(t) = self.tail
            && !(1..=MAX_LOG_BYTES).contains(&t)
        {
            return Err(format!("tail: {t} is out of range (1 to {MAX_LOG_BYTES})"));
        }
        Ok(())
    }
}

impl LogRequest {
    /// How many bytes of each of `processes` processes to read: `bytes`, but no more than
    /// [`MAX_REPLY_BYTES`] together.
    pub fn bytes_each(&self, processes: usize) -> u32 {
        let share = MAX_REPLY_BYTES / u32::try_from(processes.max(1)).unwrap_or(u32::MAX);
        self.bytes.clamp(1, MAX_LOG_BYTES).min(share.max(1))
    }

    /// How many bytes to read of a process with no offset yet: `tail` when it is smaller.
    pub fn first_bytes_each(&self, processes: usize) -> u32 {
        let each = self.bytes_each(processes);
        self.tail.map_or(each, |t| t.clamp(1, each))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_checked_and_a_reply_stays_within_etcds_limits() {
        let q = |bytes| LogsQuery {
            bytes,
            ..Default::default()
        };
        assert!(q(1600).check().is_ok());
        assert!(q(0).check().expect_err("refused").starts_with("bytes:"));
        assert!(q(MAX_LOG_BYTES + 1).check().is_err());
        let bad_host = LogsQuery {
            host: Some("../h".into()),
            ..q(10)
        };
        assert!(bad_host.check().expect_err("refused").starts_with("host:"));
        let r = LogRequest {
            bytes: MAX_LOG_BYTES,
            ..Default::default()
        };
        assert_eq!(r.bytes_each(1), MAX_LOG_BYTES);
        assert_eq!(r.bytes_each(100), MAX_REPLY_BYTES / 100);
        assert!(r.bytes_each(100) * 100 <= MAX_REPLY_BYTES);
        let follower = LogRequest { tail: Some(100), ..r };
        assert_eq!(
            (follower.bytes_each(1), follower.first_bytes_each(1)),
            (MAX_LOG_BYTES, 100)
        );
        let bad_tail = LogsQuery { tail: Some(0), ..q(10) };
        assert!(bad_tail.check().expect_err("refused").starts_with("tail:"));
    }
}

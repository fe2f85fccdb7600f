//! Resource types (`Program`, `Group`, `Host`) and their YAML/JSON documents.
//!
//! Spec keys are supervisord's own option names, so a user who knows supervisor knows Corral.
//! An option left out (`None`) means supervisord's default; the renderer writes that default
//! out explicitly (see `render`).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// The only API version Corral speaks today.
pub const API_VERSION: &str = "corral.dev/v1";

/// The kinds of resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Program,
    Group,
    Host,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Program => "Program",
            Kind::Group => "Group",
            Kind::Host => "Host",
        }
    }

    /// Parses a `kind:` value; the error names the accepted kinds.
    pub fn parse(s: &str) -> Result<Kind, String> {
        match s {
            "Program" => Ok(Kind::Program),
            "Group" => Ok(Kind::Group),
            "Host" => Ok(Kind::Host),
            other => Err(format!("unknown kind {other:?} (expected Program, Group or Host)")),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `metadata` of every resource.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Bumped by the controller whenever the spec changes; 0 until stored.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
    /// The etcd mod revision of the stored object, for optimistic concurrency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Desired runtime state of a program's processes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    #[default]
    Running,
    Stopped,
}

/// supervisord's `autorestart`: `true`, `false` or `unexpected`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AutoRestart {
    Always,
    Never,
    Unexpected,
}

impl AutoRestart {
    /// The INI spelling.
    pub fn as_ini(self) -> &'static str {
        match self {
            AutoRestart::Always => "true",
            AutoRestart::Never => "false",
            AutoRestart::Unexpected => "unexpected",
        }
    }
}

impl Serialize for AutoRestart {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AutoRestart::Always => s.serialize_bool(true),
            AutoRestart::Never => s.serialize_bool(false),
            AutoRestart::Unexpected => s.serialize_str("unexpected"),
        }
    }
}

impl<'de> Deserialize<'de> for AutoRestart {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = AutoRestart;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false or \"unexpected\"")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<AutoRestart, E> {
                Ok(if v { AutoRestart::Always } else { AutoRestart::Never })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<AutoRestart, E> {
                match v {
                    "unexpected" => Ok(AutoRestart::Unexpected),
                    "true" => Ok(AutoRestart::Always),
                    "false" => Ok(AutoRestart::Never),
                    other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A byte count, written as a number or with supervisord's suffixes (`50MB`, `1GB`, `512KB`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses supervisord's `byte_size`: digits with an optional, case-insensitive KB/MB/GB.
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let lower = s.to_ascii_lowercase();
        // By suffix, not by byte offset: a multi-byte character at the end is no suffix (and
        // no char boundary to split at).
        let (digits, mult) = [("kb", 1u64 << 10), ("mb", 1 << 20), ("gb", 1 << 30)]
            .into_iter()
            .find_map(|(suffix, mult)| Some((lower.strip_suffix(suffix)?, mult)))
            .unwrap_or((lower.as_str(), 1));
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "{s:?} is not a byte size (a number, optionally with KB, MB or GB)"
            ));
        }
        digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte count such as 1048576 or \"50MB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A request to signal a program's processes once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// A signal name (HUP, USR1, ...).
    pub signal: String,
    /// Unique per request (the CLI uses a timestamp).
    pub id: String,
}

/// How a spec change rolls out across hosts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// How many hosts may be updating (and so possibly not ready) at once: a count (`5`) or a
    /// share of the hosts the program runs on (`"25%"`, rounded up, at least one). Default
    /// [`RolloutSpec::DEFAULT_MAX_UNAVAILABLE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<HostCount>,
    /// When a host fails the new generation (its file refused by supervisord, a process
    /// FATAL or unhealthy there), put back the spec of the last generation that was running
    /// and ready everywhere, as a new generation, so the hosts already updated go back and
    /// the others are never touched. A revert that fails too is not reverted again. Default
    /// false (the rollout only stops).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_revert: Option<bool>,
}

impl RolloutSpec {
    /// 25%: a change reaches a fleet in four batches whatever its size (10 hosts: 3 at a time;
    /// 1000 hosts: 250), so a rollout to a thousand hosts finishes in seconds when every batch
    /// is healthy, while a bad change that fails its first batch stops there, with three
    /// quarters of the program's hosts still running the previous version. One host at a time
    /// would take a thousand batches; 100% would give a bad change the whole fleet at once.
    pub const DEFAULT_MAX_UNAVAILABLE: HostCount = HostCount::Percent(25);

    /// How many of `hosts` may be updating at once.
    pub fn max_unavailable(spec: Option<&RolloutSpec>, hosts: usize) -> usize {
        spec.and_then(|r| r.max_unavailable)
            .unwrap_or(Self::DEFAULT_MAX_UNAVAILABLE)
            .of(hosts)
    }
}

/// A number of hosts, or a percentage of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostCount {
    Count(i64),
    /// `"25%"`.
    Percent(i64),
}

impl HostCount {
    /// The count this stands for among `total` hosts: a percentage rounded up; at least one.
    pub fn of(self, total: usize) -> usize {
        let n = match self {
            HostCount::Count(n) => usize::try_from(n).unwrap_or(0),
            HostCount::Percent(p) => (total * usize::try_from(p).unwrap_or(0)).div_ceil(100),
        };
        n.max(1)
    }
}

impl Serialize for HostCount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            HostCount::Count(n) => s.serialize_i64(*n),
            HostCount::Percent(p) => s.serialize_str(&format!("{p}%")),
        }
    }
}

impl<'de> Deserialize<'de> for HostCount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = HostCount;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number of hosts (5) or a percentage (\"25%\")")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<HostCount, E> {
                Ok(HostCount::Count(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<HostCount, E> {
                i64::try_from(v)
                    .map(HostCount::Count)
                    .map_err(|_| E::custom("too many hosts"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HostCount, E> {
                let digits = v
                    .trim()
                    .strip_suffix('%')
                    .ok_or_else(|| E::custom(format!("{v:?} is neither a number nor a percentage like \"25%\"")))?;
                digits
                    .trim()
                    .parse::<i64>()
                    .map(HostCount::Percent)
                    .map_err(|_| E::custom(format!("{v:?} is not a percentage like \"25%\"")))
            }
        }
        d.deserialize_any(V)
    }
}

/// Corral's crash-loop policy: what happens after supervisord gives up on a process (FATAL,
/// after `startretries` failed starts). supervisord alone leaves it FATAL for good; Corral by
/// default starts it again after a delay that doubles from `initial_delay_secs` up to
/// `max_delay_secs`, and forgets the count once the process has stayed up for
/// `reset_after_secs`. `restart: false` keeps FATAL final, as supervisord does.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrashLoopSpec {
    /// Start a FATAL process again after the delay. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<bool>,
    /// Delay before the first new start. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay_secs: Option<i64>,
    /// The delay doubles up to this. Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay_secs: Option<i64>,
    /// Once a process has been RUNNING this long, its next FATAL starts from the initial
    /// delay again. Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_after_secs: Option<i64>,
}

/// The crash-loop policy with its defaults filled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrashLoop {
    pub restart: bool,
    pub initial_delay_secs: u64,
    pub max_delay_secs: u64,
    pub reset_after_secs: u64,
}

impl CrashLoopSpec {
    pub const DEFAULT_INITIAL_DELAY_SECS: u64 = 10;
    pub const DEFAULT_MAX_DELAY_SECS: u64 = 300;
    pub const DEFAULT_RESET_AFTER_SECS: u64 = 300;

    /// The policy a (validated) spec asks for.
    pub fn resolve(spec: Option<&CrashLoopSpec>) -> CrashLoop {
        let d = CrashLoopSpec::default();
        let s = spec.unwrap_or(&d);
        let secs = |v: Option<i64>, default: u64| v.map_or(default, |v| v.max(0) as u64);
        let initial = secs(s.initial_delay_secs, Self::DEFAULT_INITIAL_DELAY_SECS);
        CrashLoop {
            restart: s.restart.unwrap_or(true),
            initial_delay_secs: initial,
            max_delay_secs: secs(s.max_delay_secs, Self::DEFAULT_MAX_DELAY_SECS).max(initial),
            reset_after_secs: secs(s.reset_after_secs, Self::DEFAULT_RESET_AFTER_SECS),
        }
    }
}

/// A health check the agent runs against each RUNNING process of a program (`spec.health`):
/// exactly one of `http`, `tcp` or `exec`. A process is healthy once a check passes and
/// unhealthy after `failure_threshold` failures in a row. Readiness waits for healthy (so a
/// rollout's next batch and a dependent's start wait for it); with `restart` (the default) an
/// unhealthy process is restarted, the first time at once and then after the crash-loop
/// delay (`spec.crash_loop`). Checks reach the process on the host's loopback only.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// GET `http://127.0.0.1:PORT/PATH`; healthy when the status is `expect_status` (default:
    /// any 2xx or 3xx). Redirects are not followed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,
    /// A TCP connection to `127.0.0.1:PORT` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpCheck>,
    /// A command (no shell) exits 0, run as the program's `user` with `CORRAL_PROGRAM`,
    /// `CORRAL_PROCESS` and `CORRAL_PID` in its environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecCheck>,
    /// Seconds between checks. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_secs: Option<i64>,
    /// A check that takes longer fails. Default 2, at most `period_secs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<i64>,
    /// Failures in a row that make a process unhealthy. Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<i64>,
    /// Seconds after a process starts before its first check. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay_secs: Option<i64>,
    /// Restart an unhealthy process (liveness). Default true; false only holds back
    /// readiness.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    pub port: i64,
    /// Each process on its own port: `port + process_num` (for `numprocs` processes that
    /// listen on `80%(process_num)02d`, give `port: 8000`). Default false: every process on
    /// `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_per_process: Option<bool>,
    /// Default `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_status: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpCheck {
    pub port: i64,
    /// As for `http`: each process checked on `port + process_num`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_per_process: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecCheck {
    /// The executable (an absolute path) and its arguments.
    pub command: Vec<String>,
}

/// What a health check does, resolved.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Check {
    Http {
        port: u16,
        /// `port` is the base: each process is checked on `port + process_num`.
        per_process: bool,
        path: String,
        expect_status: Option<u16>,
    },
    Tcp {
        port: u16,
        per_process: bool,
    },
    Exec {
        command: Vec<String>,
    },
}

/// A (validated) health check with its defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Health {
    pub check: Check,
    pub period_secs: u64,
    pub timeout_secs: u64,
    pub failure_threshold: u32,
    pub initial_delay_secs: u64,
    pub restart: bool,
}

impl Health {
    /// The check of the process numbered `process_num`: with a port per process, on
    /// `port + process_num` (validation keeps that within 65535; beyond, the port is 0 and
    /// the check fails).
    pub fn for_process(&self, process_num: u32) -> Health {
        let mut h = self.clone();
        let offset = |port: &mut u16, per_process: &mut bool| {
            if std::mem::take(per_process) {
                *port = u16::try_from(u32::from(*port) + process_num).unwrap_or(0);
            }
        };
        match &mut h.check {
            Check::Http { port, per_process, .. } | Check::Tcp { port, per_process } => offset(port, per_process),
            Check::Exec { .. } => {}
        }
        h
    }
}

impl HealthSpec {
    pub const DEFAULT_PERIOD_SECS: u64 = 10;
    pub const DEFAULT_TIMEOUT_SECS: u64 = 2;
    pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;

    /// The check a validated spec asks for; `None` when it names no check.
    pub fn resolve(&self) -> Option<Health> {
        let port = |p: i64| u16::try_from(p).unwrap_or(0);
        let check = match (&self.http, &self.tcp, &self.exec) {
            (Some(h), _, _) => Check::Http {
                port: port(h.port),
                per_process: h.port_per_process.unwrap_or(false),
                path: h.path.clone().unwrap_or_else(|| "/".to_string()),
                expect_status: h.expect_status.and_then(|s| u16::try_from(s).ok()),
            },
            (None, Some(t), _) => Check::Tcp {
                port: port(t.port),
                per_process: t.port_per_process.unwrap_or(false),
            },
            (None, None, Some(x)) => Check::Exec {
                command: x.command.clone(),
            },
            (None, None, None) => return None,
        };
        let secs = |v: Option<i64>, default: u64| v.map_or(default, |v| v.max(0) as u64);
        let period = secs(self.period_secs, Self::DEFAULT_PERIOD_SECS).max(1);
        Some(Health {
            check,
            period_secs: period,
            timeout_secs: secs(self.timeout_secs, Self::DEFAULT_TIMEOUT_SECS).clamp(1, period),
            failure_threshold: self.failure_threshold.map_or(Self::DEFAULT_FAILURE_THRESHOLD, |n| {
                u32::try_from(n).unwrap_or(1).max(1)
            }),
            initial_delay_secs: secs(self.initial_delay_secs, 0),
            restart: self.restart.unwrap_or(true),
        })
    }
}

macro_rules! program_spec {
    ($( $(#[$doc:meta])* $field:ident : $ty:ty ),* $(,)?) => {
        /// `Program.spec`: placement, desired state and every supervisord 4.2 `[program:x]`
        /// option under its own name.
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct ProgramSpec {
            /// Host labels that must all match; `{}` selects every host.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub selector: Option<BTreeMap<String, String>>,
            /// Explicit host names, instead of a selector.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub hosts: Option<Vec<String>>,
            /// Desired runtime state; `running` unless said otherwise.
            #[serde(default, skip_serializing_if = "is_running")]
            pub state: DesiredState,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub rollout: Option<RolloutSpec>,
            /// What to do after supervisord gives up on a process (FATAL); see `CrashLoopSpec`.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub crash_loop: Option<CrashLoopSpec>,
            /// Restart marker: changing it restarts the program everywhere, rolling, without
            /// changing its rendered config (`corral restart` sets it to a timestamp).
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub restarted_at: Option<String>,
            /// One-off signal marker: a new `id` sends `signal` once to every running process
            /// of the program (`corral signal`), without changing its rendered config.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub signal_request: Option<SignalRequest>,
            /// A file on the host whose `KEY=VALUE` lines are added to `environment`
            /// (overriding it), read by the agent: secrets need not be stored in etcd. See
            /// [`crate::envfile`]. It must be owned by root and writable by no one else.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub environment_file: Option<String>,
            /// Programs that must be RUNNING on the same host before this one starts (the
            /// agent starts it, never supervisord on its own); when both are being stopped,
            /// this one stops first. A dependency not placed on the host is not waited for.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub depends_on: Option<Vec<String>>,
            /// A health check run on the host against each process; see `HealthSpec`.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub health: Option<HealthSpec>,
            /// supervisord `command` (required).
            pub command: String,
            $( $(#[$doc])* #[serde(default, skip_serializing_if = "Option::is_none")] pub $field: Option<$ty>, )*
        }

        /// The supervisord option names that `ProgramSpec` carries, `command` first.
        pub const PROGRAM_OPTIONS: &[&str] = &["command", $( stringify!($field) ),*];
    };
}

program_spec! {
    process_name: String,
    numprocs: i64,
    numprocs_start: i64,
    priority: i64,
    autostart: bool,
    autorestart: AutoRestart,
    startsecs: i64,
    startretries: i64,
    exitcodes: Vec<i64>,
    stopsignal: String,
    stopwaitsecs: i64,
    stopasgroup: bool,
    killasgroup: bool,
    user: String,
    redirect_stderr: bool,
    stdout_logfile: String,
    stdout_logfile_maxbytes: ByteSize,
    stdout_logfile_backups: i64,
    stdout_capture_maxbytes: ByteSize,
    stdout_events_enabled: bool,
    stdout_syslog: bool,
    stderr_logfile: String,
    stderr_logfile_maxbytes: ByteSize,
    stderr_logfile_backups: i64,
    stderr_capture_maxbytes: ByteSize,
    stderr_events_enabled: bool,
    stderr_syslog: bool,
    environment: BTreeMap<String, String>,
    directory: String,
    /// Octal, as a string (`"022"`): YAML would read a bare 022 as decimal.
    umask: String,
    serverurl: String,
}

fn is_running(s: &DesiredState) -> bool {
    *s == DesiredState::Running
}

/// `Group.spec`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// Member program names.
    pub programs: Vec<String>,
    /// supervisord group priority (only meaningful for native groups). Default 999.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    /// Render as a supervisord `[group:x]` section. Then a change to one member restarts every
    /// member on that host, as supervisord decides "changed" per group.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub native: bool,
}

/// `Host.spec`: what operators decided for the host (`corral cordon`, `corral drain`); the
/// agent registers it empty and the controller shows its [`HostControl`] here.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    /// Nothing new is placed here; what runs stays and follows its spec.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cordoned: bool,
    /// Cordoned, and every program taken off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drained: bool,
}

/// What operators set on a host, apart from what its agent registers: labels added or
/// changed, labels removed, cordon and drain. Stored by the controller at
/// `<prefix>/hostcontrol/<host>`, so an agent re-registering never undoes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HostControl {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub removed_labels: std::collections::BTreeSet<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cordoned: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drained: bool,
}

impl HostControl {
    /// The host as placement sees it: the agent's labels with the operator's changes, and
    /// the operator's cordon and drain in its spec.
    pub fn effective(&self, registered: &Host) -> Host {
        let mut h = registered.clone();
        h.metadata.labels.retain(|k, _| !self.removed_labels.contains(k));
        h.metadata
            .labels
            .extend(self.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        h.spec.cordoned = self.cordoned || self.drained;
        h.spec.drained = self.drained;
        if let Some(status) = &mut h.status {
            status.operator_labels = self.labels.clone();
            status.removed_labels = self.removed_labels.clone();
        }
        h
    }

    /// Sets (`Some`) or removes (`None`) labels; a removal also hides the agent's label.
    pub fn relabel(&mut self, changes: &BTreeMap<String, Option<String>>) {
        for (k, v) in changes {
            match v {
                Some(v) => {
                    self.removed_labels.remove(k);
                    self.labels.insert(k.clone(), v.clone());
                }
                None => {
                    self.labels.remove(k);
                    self.removed_labels.insert(k.clone());
                }
            }
        }
    }
}

/// `Host.status`: what the agent reports about its host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HostStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisord_version: Option<String>,
    #[serde(default)]
    pub ready: bool,
    /// Why the host is not ready, when the agent knows (supervisord unreachable, refusing
    /// the agent's credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Labels operators set over the agent's (`corral label host`); filled in by the
    /// controller, never by the agent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub operator_labels: BTreeMap<String, String>,
    /// The agent's labels operators removed.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub removed_labels: std::collections::BTreeSet<String>,
}

macro_rules! resource {
    ($(#[$doc:meta])* $name:ident, $kind:expr, $spec:ty, $status:ty) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "camelCase")]
        pub struct $name {
            pub api_version: String,
            pub kind: Kind,
            pub metadata: Metadata,
            pub spec: $spec,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub status: Option<$status>,
        }

        impl $name {
            /// A resource of this kind with the current API version.
            pub fn new(metadata: Metadata, spec: $spec) -> Self {
                $name { api_version: API_VERSION.to_string(), kind: $kind, metadata, spec, status: None }
            }
        }
    };
}

resource!(
    /// A program to run under supervisord on the hosts it selects; its status (filled in by
    /// the API from the agents' reports, never stored) is a `ProgramStatusView`.
    Program, Kind::Program, ProgramSpec, crate::fleet::ProgramStatusView
);
resource!(
    /// A set of programs addressed together (`corral restart myapp:`).
    Group, Kind::Group, GroupSpec, serde_json::Value
);
resource!(
    /// A host running an agent.
    Host, Kind::Host, HostSpec, HostStatus
);

impl Program {
    /// Whether this program runs on `host`: every selector label matches (`{}` selects all),
    /// or the host is named in `hosts`.
    pub fn selects(&self, host: &Host) -> bool {
        match (&self.spec.selector, &self.spec.hosts) {
            (_, Some(hosts)) => hosts.contains(&host.metadata.name),
            (Some(sel), None) => sel.iter().all(|(k, v)| host.metadata.labels.get(k) == Some(v)),
            (None, None) => false,
        }
    }
}

impl Program {
    /// Whether placement gives this program to `host`: it selects the host, the host is not
    /// drained, and a cordoned host only keeps what it `holds` already.
    pub fn placed_on(&self, host: &Host, holds: bool) -> bool {
        self.selects(host) && !host.spec.drained && (!host.spec.cordoned || holds)
    }
}

/// Any resource, as read from a document.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
#[allow(
    clippy::large_enum_variant,
    reason = "a handful of resources per command; boxing would only add noise"
)]
pub enum Resource {
    Program(Program),
    Group(Group),
    Host(Host),
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Program(_) => Kind::Program,
            Resource::Group(_) => Kind::Group,
            Resource::Host(_) => Kind::Host,
        }
    }

    pub fn metadata(&self) -> &Metadata {
        match self {
            Resource::Program(p) => &p.metadata,
            Resource::Group(g) => &g.metadata,
            Resource::Host(h) => &h.metadata,
        }
    }
}

/// Reads a document field by field so that `spec` is parsed straight into the type its `kind`
/// names. Unlike serde's internally tagged enums this keeps line and column in errors; the one
/// cost is that `kind` must come before `spec`, as it does in every kubectl-style document.
impl<'de> Deserialize<'de> for Resource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ResourceVisitor)
    }
}

struct ResourceVisitor;

#[allow(clippy::large_enum_variant, reason = "lives for one document parse")]
enum AnySpec {
    Program(ProgramSpec),
    Group(GroupSpec),
    Host(HostSpec),
}

impl<'de> Visitor<'de> for ResourceVisitor {
    type Value = Resource;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Corral resource (apiVersion, kind, metadata, spec)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Resource, A::Error> {
        let mut api_version: Option<String> = None;
        let mut kind: Option<Kind> = None;
        let mut metadata: Option<Metadata> = None;
        let mut spec: Option<AnySpec> = None;
        let mut status: Option<serde_json::Value> = None;
        let mut host_status: Option<HostStatus> = None;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "apiVersion" => {
                    let v: String = map.next_value()?;
                    if v != API_VERSION {
                        return Err(de::Error::custom(format!(
                            "apiVersion {v:?} is not supported (expected {API_VERSION:?})"
                        )));
                    }
                    api_version = Some(v);
                }
                "kind" => {
                    let v: String = map.next_value()?;
                    kind = Some(Kind::parse(&v).map_err(de::Error::custom)?);
                }
                "metadata" => metadata = Some(map.next_value()?),
                "spec" => {
                    spec = Some(match kind {
                        Some(Kind::Program) => AnySpec::Program(map.next_value()?),
                        Some(Kind::Group) => AnySpec::Group(map.next_value()?),
                        Some(Kind::Host) => AnySpec::Host(map.next_value()?),
                        None => return Err(de::Error::custom("`kind` must come before `spec`")),
                    })
                }
                "status" => match kind {
                    Some(Kind::Host) => host_status = Some(map.next_value()?),
                    Some(_) => status = Some(map.next_value()?),
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                },
                other => {
                    return Err(de::Error::unknown_field(
                        other,
                        &["apiVersion", "kind", "metadata", "spec", "status"],
                    ));
                }
            }
        }
        let api_version = api_version.ok_or_else(|| de::Error::missing_field("apiVersion"))?;
        let kind = kind.ok_or_else(|| de::Error::missing_field("kind"))?;
        let metadata = metadata.ok_or_else(|| de::Error::missing_field("metadata"))?;
        Ok(match (kind, spec) {
            (Kind::Program, Some(AnySpec::Program(spec))) => Resource::Program(Program {
                api_version,
                kind,
                metadata,
                spec,
                // Output only (the API fills it in and ignores it on apply): one that does not
                // read as a status view is left out rather than refused.
                status: status.and_then(|v| serde_json::from_value(v).ok()),
            }),
            (Kind::Group, Some(AnySpec::Group(spec))) => Resource::Group(Group {
                api_version,
                kind,
                metadata,
                spec,
                status,
            }),
            (Kind::Host, spec) => {
                let spec = match spec {
                    Some(AnySpec::Host(s)) => s,
                    _ => HostSpec::default(),
                };
                Resource::Host(Host {
                    api_version,
                    kind,
                    metadata,
                    spec,
                    status: host_status,
                })
            }
            _ => return Err(de::Error::missing_field("spec")),
        })
    }
}

/// A document that could not be read, with where it went wrong.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct ParseError {
    /// File name or `-`.
    pub source_name: String,
    /// The parser's message, which carries line and column.
    pub message: String,
}

/// The most documents one YAML stream may hold.
pub const MAX_DOCUMENTS: usize = 100_000;

/// Parses one YAML stream of `---`-separated documents (JSON is YAML too).
///
/// Empty documents are skipped.
///
/// # Errors
/// The first document that does not parse, with its line and column.
pub fn parse_documents(source_name: &str, text: &str) -> Result<Vec<Resource>, ParseError> {
    // A fleet's programs in one file run to thousands of documents; the parser's default
    // budget stops at 1024. Its other limits (depth, aliases, nodes) still guard the rest.
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: MAX_DOCUMENTS,
        },
    };
    let docs: Vec<Option<OneOrMany>> =
        serde_saphyr::from_multiple_with_options(text, options).map_err(|e| ParseError {
            source_name: source_name.to_string(),
            message: plain_words(&unknown_field_hint(&e.to_string())),
        })?;
    Ok(docs.into_iter().flatten().flat_map(|d| d.0).collect())
}

/// Rewrites the parser's "unknown field `x`, expected one of a, b, ..." (every field name,
/// on the message line and again under the snippet) into one "did you mean `y`?" for a
/// near miss, or the list once when nothing is close.
fn unknown_field_hint(message: &str) -> String {
    const EXPECTED: &str = ", expected one of ";
    let mut said = false;
    let lines: Vec<String> = message
        .lines()
        .map(|line| {
            let (Some(start), Some(cut)) = (line.find("unknown field `"), line.find(EXPECTED)) else {
                return line.to_string();
            };
            let field = line[start + "unknown field `".len()..].split('`').next().unwrap_or("");
            let head = &line[..cut];
            if said {
                return head.to_string();
            }
            said = true;
            let fields: Vec<&str> = line[cut + EXPECTED.len()..]
                .split(", ")
                .map(|f| f.trim_matches('`'))
                .collect();
            match closest(field, &fields) {
                Some(near) => format!("{head} (did you mean `{near}`?)"),
                None => format!("{head}; the fields here are: {}", fields.join(", ")),
            }
        })
        .collect();
    lines.join("\n")
}

/// The parser's words for a wrong scalar, as a user would say them.
fn plain_words(message: &str) -> String {
    let mut out = message.to_string();
    for ty in ["i64", "u64", "i32", "u32", "u16", "u8", "usize"] {
        out = out.replace(&format!("invalid {ty}"), "not a whole number");
    }
    out.replace("invalid boolean", "not true or false")
}

/// The candidate nearest `word` by edit distance, if near enough to be a typo.
fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let distance = |a: &str, b: &str| {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let next = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(row[j + 1] + 1);
                prev = row[j + 1];
                row[j + 1] = next;
            }
        }
        row[b.len()]
    };
    candidates
        .iter()
        .map(|c| (distance(word, c), *c))
        .filter(|(d, _)| *d <= (word.len() / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Like [`parse_documents`], but a stream with bad documents still yields the good ones and
/// an error for every bad one (each with its line in the whole file), not just the first.
pub fn parse_every_document(source_name: &str, text: &str) -> (Vec<Resource>, Vec<ParseError>) {
    match parse_documents(source_name, text) {
        Ok(docs) => return (docs, Vec::new()),
        Err(_) if !text.lines().any(is_document_start) => return (Vec::new(), every_error(source_name, text)),
        Err(_) => {}
    }
    // Each document on its own, preceded by as many empty lines as came before it, so the
    // parser's line numbers stay those of the file.
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    let mut chunk = String::new();
    let mut first_line = 0;
    let mut flush = |chunk: &mut String, first_line: usize| {
        if chunk.trim().is_empty() {
            chunk.clear();
            return;
        }
        let padded = format!("{}{chunk}", "\n".repeat(first_line));
        match parse_documents(source_name, &padded) {
            Ok(d) => docs.extend(d),
            Err(_) => errors.extend(every_error(source_name, &padded)),
        }
        chunk.clear();
    };
    for (i, line) in text.lines().enumerate() {
        if is_document_start(line) {
            flush(&mut chunk, first_line);
            first_line = i;
        }
        chunk.push_str(line);
        chunk.push('\n');
    }
    flush(&mut chunk, first_line);
    (docs, errors)
}

/// The errors of one document that does not parse, as many as can be told apart from
/// echoes: the parser stops at the first, so the entry it names is blanked and the document
/// read again. A one-line `key: value` is blanked alone; anything else (broken structure, a
/// list where a mapping belongs, an unclosed quote or bracket) takes its whole entry, the
/// line and the lines indented under it or continuing its flow. An error that a blanked entry
/// may have caused (earlier in the document, or inside the entry) ends the search; a missing
/// field is told unless its own line was blanked.
fn every_error(source_name: &str, document: &str) -> Vec<ParseError> {
    let mut lines: Vec<String> = document.lines().map(String::from).collect();
    let mut errors: Vec<ParseError> = Vec::new();
    // The last line blanked (1-based), and the keys of blanked lines.
    let mut blanked_to = 0;
    let mut blanked_keys: Vec<String> = Vec::new();
    for _ in 0..50 {
        let Err(e) = parse_documents(source_name, &lines.join("\n")) else {
            break;
        };
        let line = e
            .message
            .split_once("line ")
            .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse::<usize>().ok())
            .filter(|l| (1..=lines.len()).contains(l));
        let Some(line) = line else {
            if errors.is_empty() {
                errors.push(e);
            }
            break;
        };
        let missing = e
            .message
            .split("missing field `")
            .nth(1)
            .and_then(|r| r.split('`').next());
        if let Some(field) = missing {
            // Where the mapping ends; an echo when the field's own line was blanked.
            if !blanked_keys.iter().any(|k| k == field) {
                errors.push(e);
            }
            break;
        }
        if line <= blanked_to || errors.last().is_some_and(|last| last.message == e.message) {
            break;
        }
        errors.push(e);
        let (first, last) = if one_line_value(&lines[line - 1]) && !open_at_start(&lines)[line - 1] {
            (line - 1, line - 1)
        } else {
            entry_around(&lines, line - 1)
        };
        for text in &mut lines[first..=last] {
            if let Some((key, _)) = text.split_once(':') {
                blanked_keys.push(key.trim().trim_start_matches("- ").to_string());
            }
            text.clear();
        }
        blanked_to = blanked_to.max(last + 1);
    }
    errors
}

/// Whether a line is one `key: value` whose blanking cannot change the structure around it.
fn one_line_value(text: &str) -> bool {
    text.split_once(':').is_some_and(|(k, v)| {
        let v = v.trim();
        !k.trim().is_empty()
            && !k.contains(['{', '[', '"', '\''])
            && !v.is_empty()
            && !v.starts_with(['{', '[', '"', '\'', '|', '>'])
    })
}

/// The lines (0-based, inclusive) of the entry that holds line `at`: back to where a flow or
/// quote still open at `at` began, then on over the lines indented deeper than that start.
fn entry_around(lines: &[String], at: usize) -> (usize, usize) {
    let open = open_at_start(lines);
    let mut first = at;
    while first > 0 && (open[first] || lines[first].trim().is_empty()) {
        first -= 1;
    }
    let indent = |l: &str| l.len() - l.trim_start().len();
    let depth = indent(&lines[first]);
    let mut last = first;
    while lines
        .get(last + 1)
        .is_some_and(|next| !next.trim().is_empty() && indent(next) > depth)
    {
        last += 1;
    }
    (first, last)
}

/// For each line, whether a flow (`{`/`[`) or a quoted scalar opened above is still open where
/// it starts (a rough scan: quotes open only where a scalar may begin; `#` after a space
/// starts a comment).
fn open_at_start(lines: &[String]) -> Vec<bool> {
    let (mut depth, mut quote) = (0usize, None::<char>);
    let mut out = Vec::with_capacity(lines.len());
    for line in lines {
        out.push(depth > 0 || quote.is_some());
        let mut prev = None::<char>;
        for c in line.chars() {
            match quote {
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None => match c {
                    '#' if prev.is_none_or(char::is_whitespace) => break,
                    '"' | '\'' if prev.is_none_or(|p| p.is_whitespace() || ":-[{,".contains(p)) => quote = Some(c),
                    '{' | '[' => depth += 1,
                    '}' | ']' => depth = depth.saturating_sub(1),
                    _ => {}
                },
            }
            if !c.is_whitespace() {
                prev = Some(c);
            } else if prev.is_some() {
                prev = Some(' ');
            }
        }
    }
    out
}

fn is_document_start(line: &str) -> bool {
    line == "---" || line.starts_with("--- ")
}

/// A document: one resource, or a list of them (what `corral get programs -o json` prints).
struct OneOrMany(Vec<Resource>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<OneOrMany, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a resource (a mapping with kind, metadata and spec) or a list of them")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<OneOrMany, A::Error> {
                Resource::deserialize(de::value::MapAccessDeserializer::new(map)).map(|r| OneOrMany(vec![r]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<OneOrMany, A::Error> {
                Vec::<Resource>::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(OneOrMany)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses one JSON resource, as the API receives it; the error names the field path.
///
/// # Errors
/// What serde_json says, prefixed with the path of the offending field.
pub fn parse_json(text: &str) -> Result<Resource, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "apiVersion: corral.dev/v1\nkind: Program\nmetadata:\n  name: web\n  labels: {app: shop}\nspec:\n  selector: {role: app}\n  command: /usr/bin/python3 -m http.server\n  numprocs: 2\n  process_name: '%(program_name)s_%(process_num)02d'\n  stdout_logfile_maxbytes: 10MB\n  autorestart: unexpected\n  environment: {PYTHONPATH: /opt/app}\n";

    #[test]
    fn reads_a_program_document() {
        let docs = parse_documents("t.yaml", WEB).expect("parses");
        let [Resource::Program(p)] = docs.as_slice() else {
            panic!("{docs:?}")
        };
        assert_eq!(p.metadata.name, "web");
        assert_eq!(p.spec.numprocs, Some(2));
        assert_eq!(p.spec.stdout_logfile_maxbytes, Some(ByteSize(10 << 20)));
        assert_eq!(p.spec.autorestart, Some(AutoRestart::Unexpected));
        assert_eq!(p.spec.state, DesiredState::Running);
    }

    #[test]
    fn a_file_may_hold_thousands_of_documents() {
        let text = vec![WEB; 2_000].join("---\n");
        assert_eq!(parse_documents("fleet.yaml", &text).expect("parses").len(), 2_000);
    }

    #[test]
    fn an_unknown_field_gets_one_suggestion_not_two_lists() {
        let err = parse_documents(
            "t.yaml",
            "apiVersion: corral.dev/v1\nkind: Program\nmetadata: {name: t}\nspec:\n  command: x\n  autorestrat: true\n",
        )
        .expect_err("refused")
        .to_string();
        assert!(
            err.contains("unknown field `autorestrat` (did you mean `autorestart`?)"),
            "{err}"
        );
        assert!(!err.contains("stderr_syslog"), "the field list is gone: {err}");
        assert!(err.contains("line 6"), "{err}");
        // Nothing close: the list, once.
        let err = parse_documents(
            "t.yaml",
            "apiVersion: corral.dev/v1\nkind: Program\nmetadata: {name: t}\nspec:\n  command: x\n  zzzzzzzz: 1\n",
        )
        .expect_err("refused")
        .to_string();
        assert_eq!(err.matches("stderr_syslog").count(), 1, "{err}");
    }

    #[test]
    fn every_bad_document_is_reported_with_its_line_in_the_file() {
        let bad = |field: &str| {
            format!(
                "apiVersion: corral.dev/v1\nkind: Program\nmetadata: {{name: t}}\nspec:\n  command: x\n  {field}: true\n"
            )
        };
        let text = format!("{}---\n{WEB}---\n{}", bad("autostrat"), bad("stopasgrup"));
        let (docs, errors) = parse_every_document("t.yaml", &text);
        assert_eq!(docs.len(), 1);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].to_string().contains("line 6") && errors[0].to_string().contains("autostart"));
        // The third document starts after 6 + 1 + 13 + 1 lines.
        let third = errors[1].to_string();
        assert!(third.contains("line 27") && third.contains("stopasgroup"), "{third}");
    }

    #[test]
    fn every_bad_field_of_a_document_is_reported_at_once() {
        let text = "apiVersion: corral.dev/v1\nkind: Program\nmetadata: {name: t}\nspec:\n  command: x\n  autostrat: true\n  numprocs: lots\n  stopasgrup: true\n";
        let (docs, errors) = parse_every_document("t.yaml", text);
        assert!(docs.is_empty());
        let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(all.len(), 3, "{all:#?}");
        assert!(all[0].contains("line 6") && all[0].contains("autostart"), "{all:#?}");
        assert!(
            all[1].contains("line 7") && all[1].contains("not a whole number"),
            "{all:#?}"
        );
        assert!(all[2].contains("line 8") && all[2].contains("stopasgroup"), "{all:#?}");
    }

    /// Every error of `spec`'s lines (after a program's head), as "line N: message" firsts.
    fn errors_of(spec: &str) -> Vec<String> {
        let text = format!("apiVersion: corral.dev/v1\nkind: Program\nmetadata: {{name: t}}\nspec:\n{spec}");
        let (docs, errors) = parse_every_document("t.yaml", &text);
        assert!(docs.is_empty(), "{docs:?}");
        errors
            .iter()
            .map(|e| {
                e.to_string()
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .replace("t.yaml: error: ", "")
            })
            .collect()
    }

    #[test]
    fn a_broken_structure_does_not_hide_the_errors_after_it() {
        // An unclosed bracket: the parser notices a line later; the lines after are still read.
        let all = errors_of("  command: x\n  selector: {role: app\n  numprocs: two\n  autorestrat: true\n");
        assert_eq!(all.len(), 3, "{all:#?}");
        assert!(all[0].contains("flow mapping"), "{all:#?}");
        assert!(
            all[1].starts_with("line 7") && all[1].contains("not a whole number"),
            "{all:#?}"
        );
        assert!(
            all[2].starts_with("line 8") && all[2].contains("autorestart"),
            "{all:#?}"
        );
        // An unclosed quote, and no echo of the blanked lines (an empty `spec`).
        let all = errors_of("  command: \"x\n  numprocs: two\n  autorestrat: true\n");
        assert_eq!(all.len(), 3, "{all:#?}");
        assert!(
            all[0].starts_with("line 5") && all[0].contains("unclosed quote"),
            "{all:#?}"
        );
        // A list where a mapping belongs, and a tab.
        let all = errors_of("  command: x\n  environment:\n    - A=1\n    B: 2\n  numprocs: two\n");
        assert_eq!(all.len(), 2, "{all:#?}");
        assert!(all[0].starts_with("line 7") && all[1].starts_with("line 9"), "{all:#?}");
        let all = errors_of("\tcommand: x\n  numprocs: two\n");
        assert_eq!(all.len(), 2, "{all:#?}");
        assert!(all[0].contains("tabs") && all[1].starts_with("line 6"), "{all:#?}");
    }

    #[test]
    fn a_missing_field_is_told_unless_its_line_was_blanked() {
        let all = errors_of("  numprocs: two\n  autostart: true\n");
        assert_eq!(all.len(), 2, "{all:#?}");
        assert!(all[1].contains("missing field `command`"), "{all:#?}");
        let all = errors_of("  command: \"x\n  autostart: true\n");
        assert_eq!(all.len(), 1, "{all:#?}");
    }

    #[test]
    fn a_document_may_be_a_list_of_resources() {
        let json = serde_json::to_string(&[&parse_documents("t.yaml", WEB).expect("parses")[0]; 2]).expect("json");
        let docs = parse_documents("-", &json).expect("a JSON list parses");
        assert_eq!(docs.len(), 2);
        // Errors inside a list still name the field.
        refused(
            "- apiVersion: corral.dev/v1\n  kind: Program\n  metadata: {name: web}\n  spec: {command: x, autorestrat: true}\n",
            "autorestrat",
        );
    }

    #[test]
    fn reads_several_documents_of_several_kinds() {
        let text = format!(
            "{WEB}---\napiVersion: corral.dev/v1\nkind: Group\nmetadata: {{name: shop}}\nspec: {{programs: [web], native: true}}\n---\n"
        );
        let docs = parse_documents("t.yaml", &text).expect("parses");
        assert_eq!(
            docs.iter().map(Resource::kind).collect::<Vec<_>>(),
            [Kind::Program, Kind::Group]
        );
    }

    #[track_caller]
    fn refused(text: &str, needle: &str) {
        let err = parse_documents("t.yaml", text)
            .expect_err("must be refused")
            .to_string();
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    }

    #[test]
    fn unknown_fields_kinds_and_versions_are_errors_with_positions() {
        refused(&WEB.replace("numprocs: 2", "numprocz: 2"), "unknown field `numprocz`");
        refused(&WEB.replace("numprocs: 2", "numprocz: 2"), "line 9");
        refused(&WEB.replace("kind: Program", "kind: Pod"), "unknown kind \"Pod\"");
        refused(
            &WEB.replace("corral.dev/v1", "v1"),
            "apiVersion \"v1\" is not supported",
        );
        refused(
            &WEB.replace("  name: web\n", "  name: web\n  color: red\n"),
            "unknown field `color`",
        );
        refused(
            "apiVersion: corral.dev/v1\nkind: Program\nmetadata: {name: a}\n",
            "missing field `spec`",
        );
        refused(
            "apiVersion: corral.dev/v1\nmetadata: {name: a}\nspec: {command: x}\n",
            "`kind` must come before `spec`",
        );
        refused(&WEB.replace("10MB", "10XB"), "not a byte size");
        refused(
            &WEB.replace("autorestart: unexpected", "autorestart: sometimes"),
            "sometimes",
        );
    }

    #[test]
    fn json_errors_name_the_field_path() {
        let err = parse_json(r#"{"apiVersion":"corral.dev/v1","kind":"Program","metadata":{"name":"a"},"spec":{"command":"x","startsecs":"soon"}}"#)
            .expect_err("refused");
        assert!(err.starts_with("spec.startsecs:"), "{err}");
    }

    #[test]
    fn a_program_round_trips_through_json() {
        let docs = parse_documents("t.yaml", WEB).expect("parses");
        let json = serde_json::to_string(&docs[0]).expect("serializes");
        assert_eq!(parse_json(&json).expect("parses back"), docs[0]);
    }

    #[test]
    fn an_operators_labels_and_cordon_overlay_what_the_agent_registered() {
        let mut registered = Host::new(
            Metadata {
                name: "h1".into(),
                labels: [
                    ("role".to_string(), "web".to_string()),
                    ("zone".to_string(), "a".to_string()),
                ]
                .into(),
                ..Default::default()
            },
            HostSpec::default(),
        );
        registered.status = Some(HostStatus {
            ready: true,
            ..Default::default()
        });
        let mut c = HostControl::default();
        assert_eq!(c.effective(&registered), registered);
        c.relabel(
            &[
                ("tier".to_string(), Some("gold".to_string())),
                ("zone".to_string(), None),
            ]
            .into(),
        );
        c.relabel(&[("role".to_string(), Some("db".to_string()))].into());
        let h = c.effective(&registered);
        let labels: Vec<(&str, &str)> = h
            .metadata
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(labels, [("role", "db"), ("tier", "gold")]);
        // Set again after a removal: back.
        c.relabel(&[("zone".to_string(), Some("b".to_string()))].into());
        assert_eq!(
            c.effective(&registered).metadata.labels.get("zone").map(String::as_str),
            Some("b")
        );
        assert!(!h.spec.cordoned && !h.spec.drained);
        c.drained = true;
        let h = c.effective(&registered);
        assert!(h.spec.cordoned && h.spec.drained, "a drained host is cordoned too");
        // What operators set is shown apart, over the agent's own status.
        let status = h.status.clone().unwrap_or_default();
        assert_eq!(status.ready, registered.status.as_ref().is_some_and(|s| s.ready));
        assert_eq!(status.operator_labels, c.labels);
        assert_eq!(status.removed_labels, c.removed_labels);
    }

    #[test]
    fn byte_sizes_follow_supervisord() {
        assert!(ByteSize::parse("10mb日").is_err() && ByteSize::parse("1日b").is_err());
        assert_eq!(ByteSize::parse("50MB"), Ok(ByteSize(50 << 20)));
        assert_eq!(ByteSize::parse("1kb"), Ok(ByteSize(1024)));
        assert_eq!(ByteSize::parse("0"), Ok(ByteSize(0)));
        assert!(ByteSize::parse("MB").is_err());
        assert!(ByteSize::parse("-1MB").is_err());
        assert!(ByteSize::parse("99999999999999999999GB").is_err());
    }
}

//! Values supervisord returns, and the errors of talking to it.

use std::collections::BTreeMap;

use dxr::{TryFromValue, Value};

/// What went wrong calling supervisord.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The endpoint is not a `unix://` or `http://` URL.
    #[error("invalid supervisord URL {url:?}: {reason}")]
    Endpoint { url: String, reason: String },
    /// Connecting, sending or reading failed, or the call timed out.
    #[error("cannot reach supervisord at {endpoint} ({method}): {source}")]
    Transport {
        endpoint: String,
        method: String,
        #[source]
        source: reqwest::Error,
    },
    /// supervisord refused our credentials (or wants some): HTTP 401.
    #[error("supervisord at {endpoint} refused the credentials (HTTP 401)")]
    Unauthorized { endpoint: String },
    /// Any other non-200 HTTP status.
    #[error("supervisord at {endpoint} answered HTTP {status} to {method}")]
    Http {
        endpoint: String,
        method: String,
        status: u16,
    },
    /// supervisord answered with an XML-RPC fault.
    #[error("{method}: supervisord fault {code}: {message}")]
    Fault {
        method: String,
        code: FaultCode,
        message: String,
    },
    /// The answer was not what the method returns.
    #[error("{method}: unexpected answer from supervisord: {detail}")]
    Decode { method: String, detail: String },
}

impl Error {
    /// The fault code, if supervisord answered with a fault.
    pub fn fault(&self) -> Option<FaultCode> {
        match self {
            Error::Fault { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// A low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Endpoint { .. } => "endpoint",
            Error::Transport { .. } => "transport",
            Error::Unauthorized { .. } => "unauthorized",
            Error::Http { .. } => "http",
            Error::Fault { .. } => "fault",
            Error::Decode { .. } => "decode",
        }
    }
}

macro_rules! fault_codes {
    ($($name:ident = $code:literal => $text:literal),* $(,)?) => {
        /// supervisord's fault codes (`supervisor.xmlrpc.Faults`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum FaultCode {
            $($name,)*
            /// A code this version of Corral does not know.
            Other(i32),
        }

        impl FaultCode {
            pub fn from_code(code: i32) -> FaultCode {
                match code {
                    $($code => FaultCode::$name,)*
                    other => FaultCode::Other(other),
                }
            }

            pub fn code(self) -> i32 {
                match self {
                    $(FaultCode::$name => $code,)*
                    FaultCode::Other(c) => c,
                }
            }

            /// supervisord's name for the code, e.g. `BAD_NAME`.
            pub fn name(self) -> &'static str {
                match self {
                    $(FaultCode::$name => $text,)*
                    FaultCode::Other(_) => "UNKNOWN_FAULT",
                }
            }
        }
    };
}

fault_codes! {
    UnknownMethod = 1 => "UNKNOWN_METHOD",
    IncorrectParameters = 2 => "INCORRECT_PARAMETERS",
    BadArguments = 3 => "BAD_ARGUMENTS",
    SignatureUnsupported = 4 => "SIGNATURE_UNSUPPORTED",
    ShutdownState = 6 => "SHUTDOWN_STATE",
    BadName = 10 => "BAD_NAME",
    BadSignal = 11 => "BAD_SIGNAL",
    NoFile = 20 => "NO_FILE",
    NotExecutable = 21 => "NOT_EXECUTABLE",
    Failed = 30 => "FAILED",
    AbnormalTermination = 40 => "ABNORMAL_TERMINATION",
    SpawnError = 50 => "SPAWN_ERROR",
    AlreadyStarted = 60 => "ALREADY_STARTED",
    NotRunning = 70 => "NOT_RUNNING",
    Success = 80 => "SUCCESS",
    AlreadyAdded = 90 => "ALREADY_ADDED",
    StillRunning = 91 => "STILL_RUNNING",
    CantReread = 92 => "CANT_REREAD",
}

impl std::fmt::Display for FaultCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.code(), self.name())
    }
}

/// A process state (`supervisor.states.ProcessStates`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProcessState {
    Stopped,
    Starting,
    Running,
    Backoff,
    Stopping,
    Exited,
    Fatal,
    Unknown,
}

impl ProcessState {
    pub fn from_code(code: i32) -> ProcessState {
        match code {
            0 => ProcessState::Stopped,
            10 => ProcessState::Starting,
            20 => ProcessState::Running,
            30 => ProcessState::Backoff,
            40 => ProcessState::Stopping,
            100 => ProcessState::Exited,
            200 => ProcessState::Fatal,
            _ => ProcessState::Unknown,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ProcessState::Stopped => "STOPPED",
            ProcessState::Starting => "STARTING",
            ProcessState::Running => "RUNNING",
            ProcessState::Backoff => "BACKOFF",
            ProcessState::Stopping => "STOPPING",
            ProcessState::Exited => "EXITED",
            ProcessState::Fatal => "FATAL",
            ProcessState::Unknown => "UNKNOWN",
        }
    }

    /// supervisord's "running" set: what `stopProcess` acts on and `startProcess` refuses.
    pub fn is_running(self) -> bool {
        matches!(
            self,
            ProcessState::Running | ProcessState::Backoff | ProcessState::Starting
        )
    }
}

/// supervisord's own state (`getState`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SupervisorState {
    /// 2 FATAL, 1 RUNNING, 0 RESTARTING, -1 SHUTDOWN.
    pub code: i32,
    pub name: String,
}

/// One process as `getProcessInfo`/`getAllProcessInfo` describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    pub name: String,
    pub group: String,
    pub state: ProcessState,
    pub statename: String,
    /// Unix time of the last start, 0 if never started.
    pub start: i64,
    pub stop: i64,
    pub now: i64,
    /// 0 when not running.
    pub pid: i64,
    pub exitstatus: i64,
    pub spawnerr: String,
    pub stdout_logfile: String,
    pub stderr_logfile: String,
    pub description: String,
}

impl ProcessInfo {
    /// `group:name`, the name supervisord's process methods take.
    pub fn namespec(&self) -> String {
        corral_proto::render::namespec(&self.group, &self.name)
    }
}

type Struct = BTreeMap<String, Value>;

fn as_struct<'a>(v: &'a Value, what: &str) -> Result<&'a Struct, String> {
    match v {
        Value::Struct(s) => Ok(s),
        other => Err(format!("expected a struct for {what}, got {other:?}")),
    }
}

fn member<T: TryFromValue>(s: &Struct, key: &str) -> Result<T, String> {
    let v = s.get(key).ok_or_else(|| format!("missing member {key:?}"))?;
    T::try_from_value(v).map_err(|e| format!("member {key:?}: {e}"))
}

/// Decoding from an XML-RPC value; the error says what did not fit.
pub(crate) trait Decode: Sized {
    fn decode(v: &Value) -> Result<Self, String>;
}

impl<T: TryFromValue> Decode for T {
    fn decode(v: &Value) -> Result<Self, String> {
        T::try_from_value(v).map_err(|e| e.to_string())
    }
}

pub(crate) fn decode_state(v: &Value) -> Result<SupervisorState, String> {
    let s = as_struct(v, "getState")?;
    Ok(SupervisorState {
        code: member(s, "statecode")?,
        name: member(s, "statename")?,
    })
}

pub(crate) fn decode_process_info(v: &Value) -> Result<ProcessInfo, String> {
    let s = as_struct(v, "process info")?;
    let int = |k: &str| member::<i32>(s, k).map(i64::from);
    Ok(ProcessInfo {
        name: member(s, "name")?,
        group: member(s, "group")?,
        state: ProcessState::from_code(member(s, "state")?),
        statename: member(s, "statename")?,
        start: int("start")?,
        stop: int("stop")?,
        now: int("now")?,
        pid: int("pid")?,
        exitstatus: int("exitstatus")?,
        spawnerr: member(s, "spawnerr")?,
        stdout_logfile: member(s, "stdout_logfile")?,
        stderr_logfile: member(s, "stderr_logfile")?,
        description: member(s, "description")?,
    })
}

/// `getAllProcessInfo`'s answer, decoded from dxr's generic value.
pub(crate) fn decode_process_infos(v: &Value) -> Result<Vec<ProcessInfo>, String> {
    match v {
        Value::Array(items) => items.iter().map(decode_process_info).collect(),
        other => Err(format!("expected an array, got {other:?}")),
    }
}

/// Groups `reloadConfig` found added, changed and removed since the last update.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadResult {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

pub(crate) fn decode_reload(v: &Value) -> Result<ReloadResult, String> {
    let [[added, changed, removed]] = <[[Vec<String>; 3]; 1]>::try_from_value(v).map_err(|e| e.to_string())?;
    Ok(ReloadResult {
        added,
        changed,
        removed,
    })
}

/// One entry of a group start/stop/signal answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessResult {
    pub name: String,
    pub group: String,
    /// A fault code: 80 (SUCCESS) when it worked.
    pub status: FaultCode,
    pub description: String,
}

pub(crate) fn decode_process_results(v: &Value) -> Result<Vec<ProcessResult>, String> {
    let Value::Array(items) = v else {
        return Err(format!("expected an array, got {v:?}"));
    };
    items
        .iter()
        .map(|item| {
            let s = as_struct(item, "process result")?;
            Ok(ProcessResult {
                name: member(s, "name")?,
                group: member(s, "group")?,
                status: FaultCode::from_code(member(s, "status")?),
                description: member(s, "description")?,
            })
        })
        .collect()
}

/// `tailProcessStdoutLog`'s answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogTail {
    pub text: String,
    /// Where to continue from next time.
    pub offset: i64,
    /// True when more was written than `length` since `offset`.
    pub overflow: bool,
}

pub(crate) fn decode_tail(v: &Value) -> Result<LogTail, String> {
    let (text, offset, overflow) = <(String, i32, bool)>::try_from_value(v).map_err(|e| e.to_string())?;
    Ok(LogTail {
        text,
        offset: i64::from(offset),
        overflow,
    })
}

/// A fault struct inside a `system.multicall` answer, if `v` is one.
pub(crate) fn as_fault(v: &Value) -> Option<(i32, String)> {
    let Value::Struct(s) = v else { return None };
    Some((member(s, "faultCode").ok()?, member(s, "faultString").ok()?))
}

//! What flows between controller and agents through etcd: assignments (desired, per host and
//! program) and status reports (observed, per host and program).

use serde::{Deserialize, Serialize};

use crate::resource::{DesiredState, Program};

/// A native group a program belongs to, as the agent needs it to render `[group:x]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NativeGroup {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
}

/// `<prefix>/assignments/<host>/<program>`: the program as this host must run it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Assignment {
    pub program: Program,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native_group: Option<NativeGroup>,
}

/// One supervisord process as the agent last saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProcessStatus {
    /// supervisord's `group:name`.
    pub name: String,
    /// RUNNING, STOPPED, FATAL, ...
    pub state: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pid: i64,
    /// Unix time of the last start, 0 if never started.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub started_at: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub exit_status: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub spawn_error: String,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// `<prefix>/status/<host>/<program>`: what the agent observes of one program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProgramHostStatus {
    pub host: String,
    pub program: String,
    /// The generation of the spec this host runs.
    pub observed_generation: u64,
    pub desired_state: DesiredState,
    pub processes: Vec<ProcessStatus>,
    /// Every process is in its desired state (RUNNING past startsecs, or stopped).
    pub ready: bool,
    /// Why the program could not be applied here, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

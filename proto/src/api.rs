//! Requests and answers of the controller's HTTP API that are not resources themselves.

use serde::{Deserialize, Serialize};

use crate::resource::{DesiredState, Kind, ProgramSpec, SignalRequest};

/// `GET /healthz` (open, no token): the replica answers, whether it leads, its version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub ok: bool,
    pub leader: bool,
    pub version: String,
}

/// Every error answer of the API: what went wrong, and each detail (every field error of a
/// 422, for one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default)]
    pub details: Vec<String>,
}

/// The answer to `DELETE /v1/{programs,groups}/NAME`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deleted {
    pub kind: Kind,
    pub name: String,
    pub dry_run: bool,
}

/// What an apply (or an action) did, as kubectl words it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
        }
    }
}

/// The answer to `PUT /v1/{programs,groups}/NAME`, `POST` of a resource, and
/// `POST /v1/programs/NAME/action`: what was done, and the object as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResult<T> {
    pub result: Outcome,
    pub dry_run: bool,
    pub object: T,
}

/// `POST /v1/programs/NAME/action`: an imperative change the controller makes to the stored
/// spec in one read-modify-write that never loses a race (ten concurrent restarts all
/// succeed). Every host follows, as for any spec change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "lowercase", deny_unknown_fields)]
pub enum ProgramAction {
    /// Desired state running.
    Start,
    /// Desired state stopped.
    Stop,
    /// A new restart marker: every process restarts, rolled out like a spec change.
    Restart,
    /// Every running process receives `signal` once.
    Signal { signal: String },
    /// No host moves to a newer generation until resumed (not a spec change).
    Pause,
    /// The rollout goes on.
    Resume,
}

impl ProgramAction {
    /// The paused state the action sets, for the actions that change the program's control
    /// rather than its spec.
    pub fn control(&self) -> Option<bool> {
        match self {
            ProgramAction::Pause => Some(true),
            ProgramAction::Resume => Some(false),
            _ => None,
        }
    }

    /// The action's name, as the audit records it.
    pub fn verb(&self) -> &'static str {
        match self {
            ProgramAction::Start => "start",
            ProgramAction::Stop => "stop",
            ProgramAction::Restart => "restart",
            ProgramAction::Signal { .. } => "signal",
            ProgramAction::Pause => "pause",
            ProgramAction::Resume => "resume",
        }
    }

    /// Changes `spec` as the action asks; `marker` is unique per request (the restart
    /// marker, the signal request's id).
    ///
    /// # Errors
    /// A signal name that is not a signal.
    pub fn apply_to(&self, spec: &mut ProgramSpec, marker: &str) -> Result<(), String> {
        match self {
            ProgramAction::Start => spec.state = DesiredState::Running,
            ProgramAction::Stop => spec.state = DesiredState::Stopped,
            ProgramAction::Restart => spec.restarted_at = Some(marker.to_string()),
            ProgramAction::Signal { signal } => {
                let sig = crate::signal::canonical(signal)
                    .ok_or_else(|| format!("signal: {signal:?} is not a signal name (HUP, INT, USR1, USR2, ...)"))?;
                spec.signal_request = Some(SignalRequest {
                    signal: sig.to_string(),
                    id: marker.to_string(),
                });
            }
            // Not spec changes: see `ProgramAction::control`.
            ProgramAction::Pause | ProgramAction::Resume => {}
        }
        Ok(())
    }
}

/// `POST /v1/hosts/NAME/action` (operators): cordon (nothing new placed there), drain
/// (cordoned, every program taken off) or uncordon (both undone).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "lowercase", deny_unknown_fields)]
pub enum HostAction {
    Cordon,
    Uncordon,
    Drain,
}

impl HostAction {
    pub fn verb(self) -> &'static str {
        match self {
            HostAction::Cordon => "cordon",
            HostAction::Uncordon => "uncordon",
            HostAction::Drain => "drain",
        }
    }

    /// Changes `control` as the action asks.
    pub fn apply_to(self, control: &mut crate::resource::HostControl) {
        match self {
            HostAction::Cordon => control.cordoned = true,
            HostAction::Drain => {
                control.cordoned = true;
                control.drained = true;
            }
            HostAction::Uncordon => {
                control.cordoned = false;
                control.drained = false;
            }
        }
    }
}

/// `PUT /v1/hosts/NAME/labels` (admins): label -> value to set, or null to remove.
pub type LabelChanges = std::collections::BTreeMap<String, Option<String>>;

/// One generation of a program as it was applied (`GET /v1/programs/NAME/revisions`,
/// `corral rollout history`); the last [`Revision::KEEP`] are kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Revision {
    pub generation: u64,
    /// RFC 3339, UTC.
    pub at: String,
    /// The token's name.
    pub who: String,
    pub spec: ProgramSpec,
}

impl Revision {
    pub const KEEP: u64 = 10;

    /// `current` with this revision's spec put back, keeping its restart and signal markers
    /// (going back restarts only what the spec changes), for `corral rollout undo` and an
    /// automatic revert; to be validated as any spec.
    pub fn applied_to(&self, current: &crate::resource::Program) -> crate::resource::Program {
        let mut next = current.clone();
        next.spec = self.spec.clone();
        next.spec.restarted_at = current.spec.restarted_at.clone();
        next.spec.signal_request = current.spec.signal_request.clone();
        next
    }
}

/// `POST /v1/programs/NAME/rollback`: the spec of `generation` (default: the one before the
/// current) applied again, as a new generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

/// What operators set on a program apart from its spec: a paused rollout (no host moves to a
/// newer generation until resumed). At `<prefix>/programcontrol/<program>`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgramControl {
    #[serde(default)]
    pub paused: bool,
}

/// What the leading controller keeps of a program's rollouts, at
/// `<prefix>/rolloutstate/<program>` (written only by the leader).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RolloutState {
    /// The last generation that ran, ready, on every host it was placed on: what an
    /// automatic revert goes back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_good: Option<u64>,
    /// The last automatic revert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverted: Option<AutoRevert>,
}

/// An automatic revert (`spec.rollout.auto_revert`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AutoRevert {
    /// The generation that failed.
    pub failed_generation: u64,
    /// A host it failed on.
    pub host: String,
    /// The generation whose spec was put back.
    pub to_generation: u64,
    /// The generation the revert wrote (a failure of it is not reverted); 0 when none was.
    pub revert_generation: u64,
    /// Why nothing was put back, when nothing was (the failed generation had the same spec,
    /// as after `corral restart`; the revision is no longer kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_reverted: Option<String>,
    /// RFC 3339.
    pub at: String,
}

/// What a token may do. Each role may do what the one before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Read everything (specs, status, hosts, history) and dry-run.
    ReadOnly,
    /// Also start, stop, restart and signal programs (the actions).
    Operator,
    /// Also apply and delete specs.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::ReadOnly, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::ReadOnly => "read-only",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Parses a role name; the error names the roles.
    pub fn parse(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a role (read-only, operator or admin)"))
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One write to the specs, as the controller records it (`GET /v1/history`): who, when, what.
/// Field paths only: values may be secrets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// RFC 3339, UTC, the controller's clock.
    pub at: String,
    /// The token's name.
    pub who: String,
    pub role: Role,
    /// `create`, `apply`, `delete`, `start`, `stop`, `restart` or `signal`.
    pub verb: String,
    pub kind: Kind,
    pub name: String,
    /// The generation the write made (none for a delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Fields that changed, as paths (`spec.command`, `metadata.labels.tier`).
    #[serde(default)]
    pub changes: Vec<String>,
}

/// Paths of the fields that differ between two JSON values (a field added or removed counts),
/// sorted; objects are compared field by field, anything else as a whole.
pub fn changed_fields(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    fn walk(path: &str, old: Option<&serde_json::Value>, new: Option<&serde_json::Value>, out: &mut Vec<String>) {
        let empty = serde_json::Value::Object(serde_json::Map::new());
        let absent = |v: Option<&serde_json::Value>| v.is_none_or(serde_json::Value::is_null);
        // A map added or removed as a whole is told key by key.
        let (old, new) = match (old, new) {
            (a, Some(b @ serde_json::Value::Object(_))) if absent(a) => (Some(&empty), Some(b)),
            (Some(a @ serde_json::Value::Object(_)), b) if absent(b) => (Some(a), Some(&empty)),
            other => other,
        };
        match (old, new) {
            (Some(serde_json::Value::Object(a)), Some(serde_json::Value::Object(b))) => {
                let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(&p, a.get(k), b.get(k), out);
                }
            }
            (a, b) if a.filter(|v| !v.is_null()) != b.filter(|v| !v.is_null()) => out.push(path.to_string()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", Some(old), Some(new), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_read_and_print_the_same() {
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Ok(r));
            assert_eq!(serde_json::to_value(r).ok(), Some(serde_json::Value::from(r.as_str())));
        }
        assert!(Role::parse("root").is_err_and(|e| e.contains("read-only, operator or admin")));
        assert!(Role::ReadOnly < Role::Operator && Role::Operator < Role::Admin);
    }

    #[test]
    fn changed_fields_name_paths_never_values() {
        let old = serde_json::json!({"spec": {"command": "a", "environment": {"K": "1", "S": "x"}, "numprocs": null}, "metadata": {"labels": {}}});
        let new = serde_json::json!({"spec": {"command": "b", "environment": {"K": "1", "T": "y"}, "hosts": ["h1"], "selector": {"a": "b"}}, "metadata": {"labels": {"tier": "web"}}});
        assert_eq!(
            changed_fields(&old, &new),
            [
                "metadata.labels.tier",
                "spec.command",
                "spec.environment.S",
                "spec.environment.T",
                "spec.hosts",
                "spec.selector.a"
            ]
        );
        assert!(changed_fields(&old, &old).is_empty());
    }

    #[test]
    fn actions_on_the_wire_and_on_a_spec() {
        let a: ProgramAction = serde_json::from_str(r#"{"action":"signal","signal":"usr1"}"#).expect("parses");
        let mut spec = ProgramSpec::default();
        a.apply_to(&mut spec, "m1").expect("a signal");
        assert_eq!(
            spec.signal_request.clone().map(|s| (s.signal, s.id)),
            Some(("USR1".into(), "m1".into()))
        );
        assert!(
            ProgramAction::Signal { signal: "NOPE".into() }
                .apply_to(&mut spec, "m")
                .is_err()
        );
        assert!(serde_json::from_str::<ProgramAction>(r#"{"action":"reboot"}"#).is_err());
        ProgramAction::Stop.apply_to(&mut spec, "m").expect("stop");
        assert_eq!(spec.state, DesiredState::Stopped);
    }
}

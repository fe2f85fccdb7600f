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
}

impl ProgramAction {
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
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

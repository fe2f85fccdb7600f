//! What flows between controller and agents through etcd: assignments (desired, per host and
//! program) and status reports (observed, per host and program).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::resource::{DesiredState, Group, Host, Program};

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
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
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
    /// supervisord's description (`pid 123, uptime 0:01:02`, `Exited too quickly`, ...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// How many times Corral's crash-loop policy has started it again (after FATAL, or after
    /// failing its health check) since it last stayed up.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub crash_restarts: u32,
    /// Unix time of the crash-loop policy's next start, while it waits (FATAL).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub next_retry_at: i64,
    /// The last lines of its stderr log, while it is failing (FATAL, BACKOFF, EXITED).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stderr_tail: String,
    /// Its health check's verdict while it runs: `healthy`, `unhealthy` or `pending` (no
    /// verdict yet); empty without a check (`spec.health`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub health: String,
    /// Why its last check failed, while it is unhealthy; else why its check last restarted it
    /// (until it has stayed up for the crash-loop policy's `reset_after_secs`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub health_error: String,
}

impl ProcessStatus {
    /// Its state with what explains it: supervisord's description, exit status and spawn
    /// error, and the crash-loop policy's restarts (`FATAL, Exited too quickly (process log
    /// may have details), exit status 3, 2 crash-loop restarts`).
    pub fn summary(&self) -> String {
        let mut parts = vec![self.state.clone()];
        if !self.description.is_empty() && !self.description.starts_with("pid ") {
            parts.push(self.description.clone());
        }
        if self.exit_status != 0 {
            parts.push(format!("exit status {}", self.exit_status));
        }
        if !self.spawn_error.is_empty() && !self.description.contains(&self.spawn_error) {
            parts.push(format!("spawn error: {}", self.spawn_error));
        }
        match self.health.as_str() {
            "" => {}
            "unhealthy" if !self.health_error.is_empty() => parts.push(format!("unhealthy: {}", self.health_error)),
            "pending" => parts.push("health check pending".to_string()),
            h => parts.push(h.to_string()),
        }
        if self.health != "unhealthy" && !self.health_error.is_empty() {
            parts.push(format!("restarted after failing its check: {}", self.health_error));
        }
        match self.crash_restarts {
            0 => {}
            1 => parts.push("1 crash-loop restart".to_string()),
            n => parts.push(format!("{n} crash-loop restarts")),
        }
        parts.join(", ")
    }
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// `<prefix>/status/<host>/<program>`: what the agent observes of one program. Fields a newer
/// agent adds are ignored (a fleet is upgraded a host at a time).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
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
    /// Why it is held back by its order here (`depends_on`): waiting for a dependency to
    /// run, or for a dependent to stop. Not an error: it goes on by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// The generation assigned here, when it failed here: its file refused, its assignment
    /// invalid, or (while it runs) a process FATAL or unhealthy. 0: none failed.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub failed_generation: u64,
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// One host's view of one program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostProgramView {
    pub host: String,
    /// The host's agent holds its liveness lease.
    pub host_ready: bool,
    pub observed_generation: u64,
    pub ready: bool,
    pub processes: Vec<ProcessStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Held back by its order here (`depends_on`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// The generation that failed on this host (see `ProgramHostStatus::failed_generation`).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub failed_generation: u64,
}

/// A program's aggregated status (the `status` of `GET /v1/programs/NAME`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgramStatusView {
    /// Hosts the program is assigned to.
    pub desired: usize,
    /// Hosts running the current generation.
    pub updated: usize,
    /// Hosts running the current generation with every process in its desired state.
    pub ready: usize,
    pub hosts: Vec<HostProgramView>,
    /// Its rollout is paused (`corral rollout pause`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// The last generation that ran, ready, everywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_good: Option<u64>,
    /// Its last automatic revert (`spec.rollout.auto_revert`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverted: Option<crate::api::AutoRevert>,
}

/// One line of the fleet summary.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgramSummary {
    pub name: String,
    pub generation: u64,
    pub desired: usize,
    pub updated: usize,
    pub ready: usize,
    /// `host: error` for each host where something is wrong.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// Its rollout is paused (`corral rollout pause`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

/// Programs that select no registered host: accepted (hosts may come later), but they run
/// nowhere, which is rarely what was meant; said at apply and in `corral status`.
pub fn runs_nowhere(programs: &[Program], hosts: &[Host]) -> Vec<String> {
    programs
        .iter()
        .filter(|p| !hosts.iter().any(|h| p.selects(h)))
        .map(|p| {
            let how = match (&p.spec.selector, &p.spec.hosts) {
                (_, Some(h)) => format!("hosts: {}", h.join(", ")),
                (Some(sel), None) => format!(
                    "selector: {}",
                    sel.iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                (None, None) => "no selector".to_string(),
            };
            format!(
                "program {:?} selects no registered host ({how}): it runs nowhere",
                p.metadata.name
            )
        })
        .chain(programs.iter().filter_map(|p| {
            let selected: Vec<&str> = hosts
                .iter()
                .filter(|h| p.selects(h))
                .map(|h| h.metadata.name.as_str())
                .collect();
            let all_closed = !selected.is_empty()
                && hosts
                    .iter()
                    .filter(|h| p.selects(h))
                    .all(|h| h.spec.cordoned || h.spec.drained);
            all_closed.then(|| {
                format!(
                    "program {:?} selects only cordoned or drained hosts ({}): nothing new is placed there (corral uncordon)",
                    p.metadata.name,
                    selected.join(", ")
                )
            })
        }))
        .collect()
}

/// Groups that name programs not in `known`; said at apply and in `corral status`.
pub fn missing_members(groups: &[Group], known: &std::collections::BTreeSet<String>) -> Vec<String> {
    groups
        .iter()
        .filter_map(|g| {
            let missing: Vec<&str> = g
                .spec
                .programs
                .iter()
                .filter(|p| !known.contains(*p))
                .map(String::as_str)
                .collect();
            (!missing.is_empty()).then(|| {
                format!(
                    "group {:?} names programs that do not exist: {}",
                    g.metadata.name,
                    missing.join(", ")
                )
            })
        })
        .collect()
}

/// Programs whose `depends_on` names programs that do not exist; said in `corral status`
/// (they start without waiting for them).
pub fn missing_dependencies(programs: &[Program]) -> Vec<String> {
    let known: std::collections::BTreeSet<&str> = programs.iter().map(|p| p.metadata.name.as_str()).collect();
    programs
        .iter()
        .filter_map(|p| {
            let missing: Vec<&str> = p
                .spec
                .depends_on
                .iter()
                .flatten()
                .map(String::as_str)
                .filter(|d| !known.contains(d))
                .collect();
            (!missing.is_empty()).then(|| {
                format!(
                    "program {:?} depends on programs that do not exist: {}",
                    p.metadata.name,
                    missing.join(", ")
                )
            })
        })
        .collect()
}

/// A cycle in `depends_on` (program -> what it depends on), as the names around it with the
/// first repeated at the end (`a -> b -> a`), or `None`.
pub fn dependency_cycle(deps: &BTreeMap<String, Vec<String>>) -> Option<Vec<String>> {
    deps.keys().find_map(|n| dependency_cycle_through(deps, n))
}

/// A cycle in `depends_on` that goes through `start` (`start -> ... -> start`), or `None`:
/// what applying `start` would close (a cycle elsewhere is not `start`'s to answer for).
pub fn dependency_cycle_through(deps: &BTreeMap<String, Vec<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        n: &str,
        start: &str,
        deps: &BTreeMap<String, Vec<String>>,
        seen: &mut std::collections::BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> bool {
        for d in deps.get(n).into_iter().flatten() {
            path.push(d.clone());
            if d == start || (seen.insert(d.clone()) && walk(d, start, deps, seen, path)) {
                return true;
            }
            path.pop();
        }
        false
    }
    let mut path = vec![start.to_string()];
    walk(start, start, deps, &mut std::collections::BTreeSet::new(), &mut path).then_some(path)
}

/// `GET /v1/status`: what in the fleet is not as declared.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FleetStatus {
    pub hosts: usize,
    pub hosts_ready: usize,
    pub not_ready_hosts: Vec<String>,
    /// What the control plane cannot do: unreadable keys, assignments etcd refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub control_plane: Vec<String>,
    /// Declared, but probably not what was meant ([`runs_nowhere`], [`missing_members`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Why each of them is not ready.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub not_ready_reasons: std::collections::BTreeMap<String, String>,
    /// Hosts operators took out of placement: host -> `cordoned` or `drained`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub unschedulable: std::collections::BTreeMap<String, String>,
    pub programs: Vec<ProgramSummary>,
}

impl FleetStatus {
    /// Everything is as declared.
    pub fn converged(&self) -> bool {
        self.not_ready_hosts.is_empty()
            && self.control_plane.is_empty()
            && self.programs.iter().all(|p| p.ready == p.desired)
    }
}

/// `<prefix>/controller/health`: what the leading controller could not do at its last
/// placement, written when it changes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlPlaneHealth {
    /// Which controller wrote it.
    pub leader: String,
    /// Key -> why its value cannot be read (it is skipped).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub unreadable: std::collections::BTreeMap<String, String>,
    /// `host/program` -> why etcd refused its assignment (it keeps its previous one).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub refused_assignments: std::collections::BTreeMap<String, String>,
}

impl ControlPlaneHealth {
    /// One line per problem, for `corral status`.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .unreadable
            .iter()
            .map(|(k, why)| format!("unreadable value at {k} (skipped): {why}"))
            .collect();
        out.extend(
            self.refused_assignments
                .iter()
                .map(|(slot, why)| format!("etcd refused the assignment {slot}: {why}")),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{GroupSpec, HostSpec, Metadata, ProgramSpec};

    fn meta(name: &str) -> Metadata {
        Metadata {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn programs_that_run_nowhere_and_groups_naming_what_does_not_exist_are_said() {
        let mut web = Host::new(meta("web1"), HostSpec::default());
        web.metadata.labels.insert("role".into(), "web".into());
        let program = |name: &str, role: &str| {
            Program::new(
                meta(name),
                ProgramSpec {
                    selector: Some([("role".to_string(), role.to_string())].into()),
                    ..Default::default()
                },
            )
        };
        let programs = [program("site", "web"), program("batch", "batch")];
        let w = runs_nowhere(&programs, std::slice::from_ref(&web));
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("\"batch\"") && w[0].contains("role=batch"), "{w:?}");
        let g = Group::new(
            meta("g"),
            GroupSpec {
                programs: vec!["site".into(), "ghost".into()],
                ..Default::default()
            },
        );
        let known = programs.iter().map(|p| p.metadata.name.clone()).collect();
        assert_eq!(
            missing_members(&[g], &known),
            vec!["group \"g\" names programs that do not exist: ghost".to_string()]
        );
    }

    #[test]
    fn dependency_cycles_are_found_with_their_path() {
        let deps = |pairs: &[(&str, &[&str])]| -> BTreeMap<String, Vec<String>> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
                .collect()
        };
        assert_eq!(
            dependency_cycle(&deps(&[("web", &["db", "cache"]), ("db", &[]), ("cache", &["db"])])),
            None
        );
        assert_eq!(
            dependency_cycle(&deps(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])])),
            Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
        );
        // A dependency that is not declared ends a path.
        assert_eq!(dependency_cycle(&deps(&[("a", &["ghost"])])), None);
        // Through one program only: a cycle elsewhere is not its to answer for.
        let g = deps(&[
            ("a", &["b"]),
            ("b", &["a"]),
            ("solo", &["db"]),
            ("c", &["d", "e"]),
            ("d", &["x"]),
            ("e", &["c"]),
        ]);
        assert_eq!(dependency_cycle_through(&g, "solo"), None);
        assert_eq!(
            dependency_cycle_through(&g, "c"),
            Some(vec!["c".into(), "e".into(), "c".into()])
        );
        assert_eq!(
            dependency_cycle_through(&g, "a"),
            Some(vec!["a".into(), "b".into(), "a".into()])
        );
    }
}

//! The agent's functional core: desired + observed -> actions, as plain values.
//!
//! A pass runs in three steps, each planned here from what the step before it observed:
//! 1. [`plan_files`]: make the managed conf files on disk equal the rendered ones;
//! 2. [`plan_groups`]: apply supervisord's own verdict (`reloadConfig`'s added/changed/removed)
//!    to the groups Corral manages, and to no other group;
//! 3. [`plan_processes`]: start or stop processes to match each program's desired state, and
//!    restart those whose restart marker moved.
//!
//! Architecture Invariant: a program whose rendered config did not change is never restarted:
//! step 2 only touches groups supervisord itself reports as changed, and step 3 only starts
//! processes that are not running, stops processes that must not run, and restarts on a new
//! restart marker.

use std::collections::{BTreeMap, BTreeSet};

use corral_proto::fleet::Assignment;
use corral_proto::render::{self, namespec};
use corral_proto::resource::{DesiredState, Group, GroupSpec, Metadata};
use corral_proto::{validate_group, validate_program};

use crate::supervisor::{ProcessState, ReloadResult};

/// One program as this host must run it, already rendered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredProgram {
    pub name: String,
    /// The supervisord group: the native group's name, or the program's own.
    pub group: String,
    pub file_name: String,
    pub content: String,
    pub state: DesiredState,
    pub generation: u64,
    pub restarted_at: Option<String>,
    /// `(signal, id)` of the latest signal request.
    pub signal_request: Option<(String, String)>,
    /// `group:process` of every process.
    pub namespecs: Vec<String>,
    /// supervisord's startsecs: how long a process stays STARTING before RUNNING.
    pub startsecs: u64,
}

/// Everything this host must run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub programs: BTreeMap<String, DesiredProgram>,
    /// Managed file name -> content, programs' and native groups' files alike.
    pub files: BTreeMap<String, String>,
    /// Programs that cannot run here, and why (the controller should not have sent them).
    pub invalid: BTreeMap<String, String>,
}

impl Desired {
    /// The supervisord groups Corral wants loaded.
    pub fn groups(&self) -> BTreeSet<String> {
        self.programs.values().map(|p| p.group.clone()).collect()
    }
}

/// Renders this host's assignments. Each program is validated again here: the agent never
/// writes a file from a spec it has not checked itself.
pub fn desired(assignments: &BTreeMap<String, Assignment>, host: &str) -> Desired {
    let mut out = Desired::default();
    let mut native: BTreeMap<String, (Option<i64>, Vec<String>)> = BTreeMap::new();
    for (name, a) in assignments {
        let program = match validate_program(a.program.clone()) {
            Ok(p) => p,
            Err(e) => {
                out.invalid.insert(name.clone(), e.to_string());
                continue;
            }
        };
        let group = a.native_group.as_ref().map_or_else(|| name.clone(), |g| g.name.clone());
        if let Some(g) = &a.native_group {
            let entry = native.entry(g.name.clone()).or_insert((g.priority, Vec::new()));
            entry.1.push(name.clone());
        }
        let namespecs = match render::process_names(&program, host, &group) {
            Ok(names) => names.iter().map(|p| namespec(&group, p)).collect(),
            Err(e) => {
                out.invalid.insert(name.clone(), e);
                continue;
            }
        };
        let file_name = render::program_file_name(name);
        let content = render::render_program(&program);
        out.files.insert(file_name.clone(), content.clone());
        out.programs.insert(
            name.clone(),
            DesiredProgram {
                name: name.clone(),
                group,
                file_name,
                content,
                state: program.spec.state,
                generation: program.metadata.generation,
                restarted_at: program.spec.restarted_at.clone(),
                signal_request: program
                    .spec
                    .signal_request
                    .as_ref()
                    .map(|r| (r.signal.clone(), r.id.clone())),
                namespecs,
                startsecs: program.spec.startsecs.unwrap_or(1).max(0) as u64,
            },
        );
    }
    for (group, (priority, members)) in native {
        // Only the members assigned to this host: naming an absent program would make
        // supervisord refuse every file.
        let g = Group::new(
            Metadata {
                name: group.clone(),
                ..Default::default()
            },
            GroupSpec {
                programs: members.clone(),
                priority,
                native: true,
            },
        );
        match validate_group(g) {
            Ok(g) => {
                out.files
                    .insert(render::group_file_name(&group), render::render_group(&g));
            }
            Err(e) => {
                for m in members {
                    out.programs.remove(&m);
                    out.files.remove(&render::program_file_name(&m));
                    out.invalid.insert(m, e.to_string());
                }
            }
        }
    }
    out
}

/// A change to the conf dir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileAction {
    /// Write (atomically) a managed file that is missing or differs.
    Write { file: String, content: String },
    /// Remove a managed file that is no longer desired.
    Remove { file: String },
}

/// Makes the managed files on disk (`observed`, name -> content) equal the desired ones.
pub fn plan_files(desired: &BTreeMap<String, String>, observed: &BTreeMap<String, String>) -> Vec<FileAction> {
    let mut actions = Vec::new();
    for (file, content) in desired {
        if observed.get(file) != Some(content) {
            actions.push(FileAction::Write {
                file: file.clone(),
                content: content.clone(),
            });
        }
    }
    for file in observed.keys() {
        if !desired.contains_key(file) {
            actions.push(FileAction::Remove { file: file.clone() });
        }
    }
    actions
}

/// What to do to a supervisord group after `reloadConfig`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupAction {
    /// A group Corral managed whose file is gone: stop its processes, remove it.
    Remove(String),
    /// A desired group whose config supervisord says changed: stop, remove, add again.
    Replace(String),
    /// A desired group supervisord does not run yet.
    Add(String),
}

/// Applies supervisord's own verdict to Corral's groups only.
///
/// `managed` is the set of groups Corral managed before this pass (persisted by the agent),
/// so that a group whose file Corral removed is removed from the runtime too, while a group
/// from someone else's conf file is never touched, whatever supervisord reports about it.
pub fn plan_groups(reload: &ReloadResult, desired: &BTreeSet<String>, managed: &BTreeSet<String>) -> Vec<GroupAction> {
    let mut actions = Vec::new();
    for g in &reload.removed {
        if managed.contains(g) && !desired.contains(g) {
            actions.push(GroupAction::Remove(g.clone()));
        }
    }
    for g in &reload.changed {
        if desired.contains(g) {
            actions.push(GroupAction::Replace(g.clone()));
        }
    }
    for g in &reload.added {
        if desired.contains(g) {
            actions.push(GroupAction::Add(g.clone()));
        }
    }
    actions
}

/// The processes supervisord runs: state by `group:name`.
pub type Observed = std::collections::HashMap<String, ProcessState>;

/// A runtime action on one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessAction {
    Start(String),
    Stop(String),
    /// Stop (if running) then start: the restart marker moved.
    Restart(String),
    /// Send a signal (a new signal request).
    Signal(String, String),
}

/// Restart markers and signal requests already acted on, per program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied<'a> {
    pub markers: &'a BTreeMap<String, Option<String>>,
    pub signals: &'a BTreeMap<String, Option<String>>,
}

/// Starts and stops processes to match desired states, restarts the processes of programs
/// whose restart marker differs from the one last applied, and signals running processes of
/// programs with a new signal request.
///
/// A desired program whose processes supervisord does not know yet is skipped: the group
/// step adds them, and the next pass sees them.
pub fn plan_processes(desired: &Desired, observed: &Observed, applied: &Applied<'_>) -> Vec<ProcessAction> {
    let mut actions = Vec::new();
    for p in desired.programs.values() {
        // Only a new marker asks for a restart; a marker that disappears does not.
        let marker_moved = p.state == DesiredState::Running
            && p.restarted_at.is_some()
            && applied.markers.get(&p.name).is_some_and(|a| *a != p.restarted_at);
        // Likewise only a new signal request signals; the first sight of one does not.
        let signal = p.signal_request.as_ref().filter(|(_, id)| {
            applied
                .signals
                .get(&p.name)
                .is_some_and(|a| a.as_deref() != Some(id.as_str()))
        });
        for ns in &p.namespecs {
            let Some(&state) = observed.get(ns) else {
                continue;
            };
            let action = match (p.state, state) {
                (DesiredState::Running, _) if marker_moved => Some(ProcessAction::Restart(ns.clone())),
                (DesiredState::Running, ProcessState::Stopped | ProcessState::Exited | ProcessState::Fatal) => {
                    Some(ProcessAction::Start(ns.clone()))
                }
                (DesiredState::Stopped, s) if s.is_running() => Some(ProcessAction::Stop(ns.clone())),
                (_, s) if s.is_running() => signal.map(|(sig, _)| ProcessAction::Signal(ns.clone(), sig.clone())),
                _ => None,
            };
            actions.extend(action);
        }
    }
    actions
}

/// Whether every process of `p` is in its desired state: RUNNING (past startsecs) when it
/// must run, not running when it must not.
pub fn is_ready(p: &DesiredProgram, observed: &Observed) -> bool {
    p.namespecs.iter().all(|ns| {
        observed.get(ns).is_some_and(|&state| match p.state {
            DesiredState::Running => state == ProcessState::Running,
            DesiredState::Stopped => !state.is_running() && state != ProcessState::Stopping,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::fleet::NativeGroup;
    use corral_proto::resource::{Program, ProgramSpec};

    fn assignment(name: &str, f: impl FnOnce(&mut ProgramSpec)) -> Assignment {
        let mut spec = ProgramSpec {
            command: "/bin/sleep 1000".into(),
            selector: Some(BTreeMap::new()),
            ..Default::default()
        };
        f(&mut spec);
        Assignment {
            program: Program::new(
                Metadata {
                    name: name.into(),
                    generation: 3,
                    ..Default::default()
                },
                spec,
            ),
            native_group: None,
        }
    }

    fn assignments(list: Vec<Assignment>) -> BTreeMap<String, Assignment> {
        list.into_iter().map(|a| (a.program.metadata.name.clone(), a)).collect()
    }

    #[test]
    fn desired_renders_programs_and_native_groups_with_this_hosts_members_only() {
        let mut a = assignment("api", |_| {});
        a.native_group = Some(NativeGroup {
            name: "shop".into(),
            priority: Some(10),
        });
        let w = assignment("w", |s| {
            s.numprocs = Some(2);
            s.process_name = Some("%(program_name)s_%(process_num)d".into());
        });
        let d = desired(&assignments(vec![a, w]), "h1");
        assert_eq!(d.programs["api"].group, "shop");
        assert_eq!(d.programs["api"].namespecs, ["shop:api"]);
        assert_eq!(d.programs["w"].namespecs, ["w:w_0", "w:w_1"]);
        assert_eq!(d.programs["w"].generation, 3);
        assert_eq!(
            d.files.keys().collect::<Vec<_>>(),
            [
                "corral-group-shop.conf",
                "corral-program-api.conf",
                "corral-program-w.conf"
            ]
        );
        assert!(d.files["corral-group-shop.conf"].contains("programs=api\n"));
        assert_eq!(d.groups(), ["shop".to_string(), "w".to_string()].into());
    }

    #[test]
    fn desired_refuses_an_invalid_program_without_rendering_it() {
        let d = desired(
            &assignments(vec![assignment("bad", |s| s.command = "a\nb".into())]),
            "h1",
        );
        assert!(d.programs.is_empty() && d.files.is_empty());
        assert!(d.invalid["bad"].contains("line break"));
    }

    #[track_caller]
    fn check_files(desired: &[(&str, &str)], observed: &[(&str, &str)], expect: &[FileAction]) {
        let m = |l: &[(&str, &str)]| l.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        assert_eq!(plan_files(&m(desired), &m(observed)), expect);
    }

    #[test]
    fn files_are_written_when_missing_or_different_and_removed_when_undesired() {
        let w = |f: &str, c: &str| FileAction::Write {
            file: f.into(),
            content: c.into(),
        };
        check_files(&[("a", "1")], &[("a", "1")], &[]);
        check_files(&[("a", "1")], &[], &[w("a", "1")]);
        check_files(&[("a", "1")], &[("a", "edited by hand")], &[w("a", "1")]);
        check_files(&[], &[("old", "x")], &[FileAction::Remove { file: "old".into() }]);
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn reload(added: &[&str], changed: &[&str], removed: &[&str]) -> ReloadResult {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        ReloadResult {
            added: v(added),
            changed: v(changed),
            removed: v(removed),
        }
    }

    #[test]
    fn groups_follow_supervisords_verdict_for_corrals_groups_only() {
        use GroupAction::*;
        let got = plan_groups(
            &reload(&["new", "theirs-new"], &["web", "theirs"], &["gone", "theirs-gone"]),
            &set(&["new", "web"]),
            &set(&["web", "gone"]),
        );
        assert_eq!(got, [Remove("gone".into()), Replace("web".into()), Add("new".into())]);
        assert_eq!(plan_groups(&reload(&[], &[], &[]), &set(&["web"]), &set(&["web"])), []);
    }

    fn observed(list: &[(&str, ProcessState)]) -> Observed {
        list.iter().map(|(n, s)| (n.to_string(), *s)).collect()
    }

    #[test]
    fn processes_are_started_and_stopped_to_match_the_desired_state() {
        use ProcessAction::*;
        use ProcessState::*;
        let d = desired(
            &assignments(vec![
                assignment("up", |_| {}),
                assignment("down", |s| s.state = DesiredState::Stopped),
                assignment("fine", |_| {}),
                assignment("pending", |_| {}),
            ]),
            "h1",
        );
        let obs = observed(&[("up", Fatal), ("down", Backoff), ("fine", Running), ("other", Stopped)]);
        let none = BTreeMap::new();
        let applied = Applied {
            markers: &none,
            signals: &none,
        };
        assert_eq!(
            plan_processes(&d, &obs, &applied),
            [Stop("down".into()), Start("up".into())]
        );
        let obs = observed(&[("up", Starting), ("down", Stopping), ("fine", Exited)]);
        assert_eq!(plan_processes(&d, &obs, &applied), [Start("fine".into())]);
    }

    type Seen = BTreeMap<String, Option<String>>;

    fn seen(program: &str, value: Option<&str>) -> Seen {
        [(program.to_string(), value.map(String::from))].into()
    }

    #[test]
    fn a_moved_restart_marker_restarts_and_an_unchanged_one_does_not() {
        use ProcessState::*;
        let d = desired(
            &assignments(vec![assignment("web", |s| s.restarted_at = Some("t2".into()))]),
            "h1",
        );
        let obs = observed(&[("web", Running)]);
        let none = Seen::new();
        let (t1, t2) = (seen("web", Some("t1")), seen("web", Some("t2")));
        let with = |m| Applied {
            markers: m,
            signals: &none,
        };
        assert_eq!(
            plan_processes(&d, &obs, &with(&t1)),
            [ProcessAction::Restart("web".into())]
        );
        assert_eq!(plan_processes(&d, &obs, &with(&t2)), []);
        // First sight of a program (nothing applied yet) is not a restart.
        assert_eq!(plan_processes(&d, &obs, &with(&none)), []);
        // Nor is a marker that disappears.
        let d = desired(&assignments(vec![assignment("web", |_| {})]), "h1");
        assert_eq!(plan_processes(&d, &obs, &with(&t1)), []);
    }

    #[test]
    fn a_new_signal_request_signals_running_processes_once() {
        use ProcessState::*;
        let d = desired(
            &assignments(vec![assignment("w", |s| {
                s.numprocs = Some(2);
                s.process_name = Some("%(program_name)s_%(process_num)d".into());
                s.signal_request = Some(corral_proto::SignalRequest {
                    signal: "HUP".into(),
                    id: "2".into(),
                });
            })]),
            "h1",
        );
        let obs = observed(&[("w:w_0", Running), ("w:w_1", Stopped)]);
        let none = Seen::new();
        let (old, same, never) = (seen("w", Some("1")), seen("w", Some("2")), seen("w", None));
        let with = |s| Applied {
            markers: &none,
            signals: s,
        };
        // w_0 runs and is signalled; w_1 must run and is started, not signalled.
        assert_eq!(
            plan_processes(&d, &obs, &with(&old)),
            [
                ProcessAction::Signal("w:w_0".into(), "HUP".into()),
                ProcessAction::Start("w:w_1".into())
            ]
        );
        assert_eq!(plan_processes(&d, &obs, &with(&never)).len(), 2);
        assert_eq!(
            plan_processes(&d, &obs, &with(&same)),
            [ProcessAction::Start("w:w_1".into())]
        );
        assert_eq!(
            plan_processes(&d, &obs, &with(&none)),
            [ProcessAction::Start("w:w_1".into())]
        );
    }

    #[test]
    fn readiness_needs_every_process_in_its_desired_state() {
        use ProcessState::*;
        let d = desired(
            &assignments(vec![assignment("w", |s| {
                s.numprocs = Some(2);
                s.process_name = Some("%(program_name)s_%(process_num)d".into());
            })]),
            "h1",
        );
        let p = &d.programs["w"];
        assert!(is_ready(p, &observed(&[("w:w_0", Running), ("w:w_1", Running)])));
        assert!(!is_ready(p, &observed(&[("w:w_0", Running), ("w:w_1", Starting)])));
        assert!(!is_ready(p, &observed(&[("w:w_0", Running)])));
    }
}

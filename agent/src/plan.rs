//! The agent's functional core: desired + observed -> actions, as plain values.
//!
//! A pass is observe -> plan -> act. This module decides; `reconcile` observes and executes.
//! Nothing here does I/O or imports the XML-RPC adapter: the plan owns its types.
//!
//! 1. [`plan_want`]: which managed file content the conf dir should hold. A file supervisord
//!    refused keeps its last accepted version (or stays away) until its spec changes or its
//!    backoff ends; a program whose name another file also defines is held likewise.
//! 2. [`file_actions`]: make the disk equal that.
//! 3. [`culprit`]: which managed file a `reloadConfig` refusal is about.
//! 4. [`pending_changes`]: supervisord's own verdict (`reloadConfig`'s added/changed/removed),
//!    kept for Corral's groups only until it is carried out.
//! 5. [`plan_runtime`]: group replacements, starts, stops, signals and the crash-loop policy,
//!    never waiting: a stop is asked for, and a later pass (see [`next_look`]) sees it done.
//! 6. [`runs_generation`] and [`statuses`]: what is reported.
//!
//! Architecture Invariant: a program whose rendered config did not change is never restarted:
//! groups are replaced only on supervisord's own "changed" verdict, processes are started only
//! when not running (or by the crash-loop policy once FATAL), stopped only when they must not
//! run, and restarted only on a new restart marker.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use corral_proto::fleet::{Assignment, ProcessStatus, ProgramHostStatus};
use corral_proto::render;
use corral_proto::resource::{CrashLoop, CrashLoopSpec, DesiredState, Group, GroupSpec, Health, Metadata};

pub use crate::health::{Probe, Probes};
use corral_proto::{Valid, validate_group, validate_program};

/// One program as this host must run it, already rendered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredProgram {
    pub name: String,
    /// Its supervisord groups: the native group, or its own name, or with one group per
    /// process (`render::per_process`) each process's name.
    pub groups: Vec<String>,
    /// Its `[program:x]` section names: its own name, or each process's.
    pub sections: Vec<String>,
    pub file_name: String,
    pub content: String,
    pub state: DesiredState,
    pub generation: u64,
    pub restarted_at: Option<String>,
    /// `(signal, id)` of the latest signal request.
    pub signal_request: Option<(String, String)>,
    /// `group:process` of every process, by process number from `numprocs_start`.
    pub namespecs: Vec<String>,
    /// The first process's `process_num` (`numprocs_start`).
    pub numprocs_start: u32,
    /// supervisord's startsecs: how long a process stays STARTING before RUNNING.
    pub startsecs: u64,
    /// How long supervisord waits after SIGTERM before SIGKILL (also for orphans).
    pub stopwaitsecs: u64,
    /// What happens once supervisord gives up on a process.
    pub crash: CrashLoop,
    /// Programs that must be RUNNING here before this one starts (`spec.depends_on`).
    pub depends_on: Vec<String>,
    /// Its health check (`spec.health`).
    pub health: Option<Health>,
    /// supervisord's `user` (an exec health check runs as it).
    pub user: Option<String>,
}

/// A native `[group:x]` this host renders: its priority and its members assigned here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NativeGroup {
    pub priority: Option<i64>,
    pub members: Vec<String>,
}

/// Everything this host must run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub programs: BTreeMap<String, DesiredProgram>,
    /// Native groups by name.
    pub native: BTreeMap<String, NativeGroup>,
    /// Programs that cannot run here, and why (the controller should not have sent them).
    pub invalid: BTreeMap<String, String>,
    /// Programs that run but are not as they should be, and why (an environment file that
    /// cannot be read now: its last good contents are used).
    pub problems: BTreeMap<String, String>,
}

/// An environment file (`spec.environment_file`) as the agent last read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvFile {
    /// Its contents: as just read, or its last good reading when it cannot be read now.
    pub contents: Option<String>,
    /// Why it could not be read just now.
    pub problem: Option<String>,
}

/// Path -> what it held.
pub type EnvFiles = BTreeMap<String, EnvFile>;

/// The environment files this host's assignments name.
pub fn environment_files(assignments: &BTreeMap<String, Assignment>) -> BTreeSet<String> {
    assignments
        .values()
        .filter_map(|a| a.program.spec.environment_file.clone())
        .collect()
}

/// `program` with its environment file's variables added to (and overriding) its
/// environment, validated again; and a problem to report if the file could not be read now.
fn with_environment_file(
    program: Valid<corral_proto::Program>,
    path: &str,
    file: Option<&EnvFile>,
) -> Result<(Valid<corral_proto::Program>, Option<String>), String> {
    let mut program = program.into_inner();
    let why = |e: &dyn std::fmt::Display| format!("environment_file {path}: {e}");
    let Some(contents) = file.and_then(|f| f.contents.as_deref()) else {
        return Err(why(&file.and_then(|f| f.problem.as_deref()).unwrap_or("not read yet")));
    };
    let vars = corral_proto::envfile::parse(contents).map_err(|e| why(&e))?;
    program.spec.environment.get_or_insert_default().extend(vars);
    let program = validate_program(program).map_err(|e| why(&e))?;
    let problem = file
        .and_then(|f| f.problem.as_deref())
        .map(|p| why(&format!("{p}; its last good contents are used")));
    Ok((program, problem))
}

/// Renders this host's assignments. Each program is validated again here: the agent never
/// writes a file from a spec it has not checked itself.
pub fn desired(assignments: &BTreeMap<String, Assignment>, host: &str) -> Desired {
    desired_with(assignments, &BTreeMap::new(), &EnvFiles::new(), host)
}

/// [`desired`], with the programs whose assignment did not parse (`unreadable`: program ->
/// why) refused and reported like any invalid one, and the environment files the programs
/// name as read (`env_files`; a program whose file was never read is not run). An assignment is trusted only as far as
/// the controller could have written it: its program validates, it is stored under that
/// program's own name, and its native group's name is a valid name.
/// The program of the assignment stored under `name`, if this host accepts it: trusted only
/// as far as the controller could have written it (it validates, it is the program its key
/// names, its native group's name is valid); else why it is refused.
///
/// # Errors
/// The refusal, as reported.
pub fn accepted(name: &str, a: &Assignment) -> Result<Valid<corral_proto::resource::Program>, String> {
    let program = validate_program(a.program.clone()).map_err(|e| format!("assignment refused: {e}"))?;
    if program.metadata.name != name {
        return Err(format!(
            "assignment refused: stored as {name:?} but holds program {:?}",
            program.metadata.name
        ));
    }
    if let Some(g) = &a.native_group {
        corral_proto::validate::check_name(&g.name).map_err(|e| format!("assignment refused: native group: {e}"))?;
    }
    Ok(program)
}

pub fn desired_with(
    assignments: &BTreeMap<String, Assignment>,
    unreadable: &BTreeMap<String, String>,
    env_files: &EnvFiles,
    host: &str,
) -> Desired {
    let mut out = Desired::default();
    out.invalid
        .extend(unreadable.iter().map(|(k, v)| (k.clone(), v.clone())));
    for (name, a) in assignments {
        let program = match accepted(name, a) {
            Ok(p) => p,
            Err(why) => {
                out.invalid.insert(name.clone(), why);
                continue;
            }
        };
        let program = match program.spec.environment_file.clone() {
            None => program,
            Some(path) => match with_environment_file(program, &path, env_files.get(&path)) {
                Ok((p, problem)) => {
                    if let Some(problem) = problem {
                        out.problems.insert(name.clone(), problem);
                    }
                    p
                }
                Err(e) => {
                    out.invalid.insert(name.clone(), e);
                    continue;
                }
            },
        };
        let native = a.native_group.as_ref().map(|g| g.name.as_str());
        let rendered = render::namespecs(&program, host, native)
            .and_then(|ns| Ok((ns, render::render_program_in(&program, native)?)));
        let (namespecs, content) = match rendered {
            Ok(r) => r,
            Err(e) => {
                out.invalid.insert(name.clone(), e);
                continue;
            }
        };
        let per_process = render::per_process(&program, native);
        let groups: Vec<String> = match native {
            Some(g) => vec![g.to_string()],
            None if per_process => namespecs.clone(),
            None => vec![name.clone()],
        };
        let sections = if per_process {
            namespecs.clone()
        } else {
            vec![name.clone()]
        };
        if let Some(g) = &a.native_group {
            let entry = out.native.entry(g.name.clone()).or_insert(NativeGroup {
                priority: g.priority,
                members: Vec::new(),
            });
            entry.members.push(name.clone());
        }
        out.programs.insert(
            name.clone(),
            DesiredProgram {
                name: name.clone(),
                groups,
                sections,
                file_name: render::program_file_name(name),
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
                numprocs_start: u32::try_from(program.spec.numprocs_start.unwrap_or(0)).unwrap_or(0),
                startsecs: program.spec.startsecs.unwrap_or(1).max(0) as u64,
                stopwaitsecs: program.spec.stopwaitsecs.unwrap_or(10).max(0) as u64,
                depends_on: program.spec.depends_on.clone().unwrap_or_default(),
                crash: CrashLoopSpec::resolve(program.spec.crash_loop.as_ref()),
                health: program.spec.health.as_ref().and_then(|h| h.resolve()),
                user: program.spec.user.clone(),
            },
        );
    }
    // Two programs defining the same supervisord program or group would be merged by
    // supervisord: the later one (in name order) is refused here.
    let mut claimed: BTreeMap<String, String> = BTreeMap::new();
    let names: Vec<String> = out.programs.keys().cloned().collect();
    for name in names {
        let Some(p) = out.programs.get(&name) else { continue };
        let mine = p.sections.iter().map(|s| format!("program:{s}")).chain(
            p.groups
                .iter()
                .filter(|g| !out.native.contains_key(*g))
                .map(|g| format!("group:{g}")),
        );
        let clash = mine.clone().find_map(|s| Some((s.clone(), claimed.get(&s)?.clone())));
        match clash {
            Some((section, other)) => {
                out.programs.remove(&name);
                out.invalid.insert(
                    name,
                    format!("conflict: [{section}] is also a process of program {other:?} on this host"),
                );
            }
            None => {
                for s in mine {
                    claimed.insert(s, name.clone());
                }
            }
        }
    }
    out
}

/// The `[group:x]` file of a native group listing `members` (those whose files are on disk:
/// naming an absent program would make supervisord refuse every file).
fn group_file(name: &str, group: &NativeGroup, members: Vec<String>) -> Result<String, String> {
    let g = Group::new(
        Metadata {
            name: name.to_string(),
            ..Default::default()
        },
        GroupSpec {
            programs: members,
            priority: group.priority,
            native: true,
        },
    );
    validate_group(g)
        .map(|g| render::render_group(&g))
        .map_err(|e| e.to_string())
}

/// A managed file supervisord refused: not written again until its content changes or
/// [`Refusal::retry_at_ms`] (the host may have changed: a user created, a directory made).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub content: String,
    pub why: String,
    /// Unix ms of the last refusal.
    pub at_ms: i64,
    /// Refusals of this same content in a row.
    pub count: u32,
}

/// The first retry of a refused file comes this long after the refusal, then twice as long
/// each time, up to [`REFUSAL_MAX_BACKOFF`].
pub const REFUSAL_BACKOFF: Duration = Duration::from_secs(30);
pub const REFUSAL_MAX_BACKOFF: Duration = Duration::from_secs(300);

impl Refusal {
    pub fn retry_at_ms(&self) -> i64 {
        let shift = self.count.saturating_sub(1).min(8);
        let wait = (REFUSAL_BACKOFF * (1 << shift)).min(REFUSAL_MAX_BACKOFF);
        self.at_ms + wait.as_millis() as i64
    }
}

/// What the conf dir should hold, and the programs held back from their desired file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Want {
    /// Managed file name -> content.
    pub files: BTreeMap<String, String>,
    /// Program -> why its desired file is not on disk (refused, or a name conflict). It may
    /// still run its last accepted version.
    pub held: BTreeMap<String, String>,
}

/// Decides the conf dir's content: every desired file, except those supervisord refused (the
/// same content, before its retry time) and those of programs in `conflicts`, which keep the
/// version supervisord last accepted (`last_good`) or stay away. Native group files name only
/// the members that are on disk.
pub fn plan_want(
    desired: &Desired,
    last_good: &BTreeMap<String, String>,
    refusals: &BTreeMap<String, Refusal>,
    conflicts: &BTreeMap<String, String>,
    now_ms: i64,
) -> Want {
    let mut want = Want::default();
    for p in desired.programs.values() {
        let file = &p.file_name;
        let hold = if let Some(why) = conflicts.get(&p.name) {
            Some(why.clone())
        } else {
            refusals
                .get(file)
                .filter(|r| r.content == p.content && now_ms < r.retry_at_ms())
                .map(|r| r.why.clone())
        };
        match hold {
            None => {
                want.files.insert(file.clone(), p.content.clone());
            }
            Some(why) => {
                let why = match last_good.get(file) {
                    Some(good) => {
                        want.files.insert(file.clone(), good.clone());
                        format!("{why} (the version supervisord accepted before keeps running)")
                    }
                    None => why,
                };
                want.held.insert(p.name.clone(), why);
            }
        }
    }
    for (name, g) in &desired.native {
        let file = render::group_file_name(name);
        if let Some(why) = conflicts.get(name) {
            if let Some(good) = last_good.get(&file) {
                want.files.insert(file, good.clone());
            }
            for m in &g.members {
                want.held.entry(m.clone()).or_insert_with(|| why.clone());
            }
            continue;
        }
        let present: Vec<String> = g
            .members
            .iter()
            .filter(|m| want.files.contains_key(&render::program_file_name(m)))
            .cloned()
            .collect();
        if present.is_empty() {
            continue;
        }
        let held_group = refusals.get(&file).filter(|r| now_ms < r.retry_at_ms());
        match group_file(name, g, present) {
            Ok(content) if held_group.is_none_or(|r| r.content != content) => {
                want.files.insert(file, content);
            }
            Ok(_) | Err(_) => {
                let why = held_group.map_or_else(|| "native group cannot be rendered".to_string(), |r| r.why.clone());
                if let Some(good) = last_good.get(&file) {
                    want.files.insert(file, good.clone());
                }
                for m in &g.members {
                    want.held.entry(m.clone()).or_insert_with(|| why.clone());
                }
            }
        }
    }
    want
}

/// Files other tools put where Corral's would be: files with Corral's file names but without
/// its header, and the sections (`program:x`, `group:x`) of other conf files in the conf dir.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Foreign {
    pub files: BTreeSet<String>,
    /// Section name -> file defining it.
    pub sections: BTreeMap<String, String>,
}

/// Desired programs whose names another file also defines: supervisord would merge both
/// definitions, so Corral holds its own back and reports the conflict.
pub fn conflicts(desired: &Desired, foreign: &Foreign) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if foreign.files.is_empty() && foreign.sections.is_empty() {
        return out;
    }
    for p in desired.programs.values() {
        if foreign.files.contains(&p.file_name) {
            out.insert(
                p.name.clone(),
                format!(
                    "conflict: {} exists without Corral's header (written by someone else); Corral leaves it alone",
                    p.file_name
                ),
            );
            continue;
        }
        let native = desired.native.values().any(|g| g.members.contains(&p.name));
        let clash = p
            .sections
            .iter()
            .map(|s| format!("program:{s}"))
            .chain(p.groups.iter().filter(|_| !native).map(|g| format!("group:{g}")))
            .find_map(|section| Some((foreign.sections.get(&section)?, section)));
        if let Some((file, section)) = clash {
            out.insert(
                p.name.clone(),
                format!("conflict: [{section}] is also defined in {file}"),
            );
        }
    }
    for name in desired.native.keys() {
        let file = render::group_file_name(name);
        let clash = if foreign.files.contains(&file) {
            Some(format!("conflict: {file} exists without Corral's header"))
        } else {
            foreign
                .sections
                .get(&format!("group:{name}"))
                .map(|f| format!("conflict: [group:{name}] is also defined in {f}"))
        };
        if let Some(why) = clash {
            out.insert(name.clone(), why);
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

/// Makes the managed files on disk (`observed`, name -> content) equal the wanted ones.
pub fn file_actions(want: &BTreeMap<String, String>, observed: &BTreeMap<String, String>) -> Vec<FileAction> {
    let mut actions = Vec::new();
    for (file, content) in want {
        if observed.get(file) != Some(content) {
            actions.push(FileAction::Write {
                file: file.clone(),
                content: content.clone(),
            });
        }
    }
    for file in observed.keys() {
        if !want.contains_key(file) {
            actions.push(FileAction::Remove { file: file.clone() });
        }
    }
    actions
}

/// The managed file a `reloadConfig` refusal (fault CANT_REREAD) names, among `files`
/// (managed file name -> the paths supervisord may print for it: as configured and
/// canonical, through symlinks).
///
/// supervisord names a file (`(file: '/etc/supervisor/conf.d/x.conf')`), a section
/// (`in section 'program:x'`), or for a native group only a member
/// (`[group:g] names unknown program x`).
pub fn culprit(message: &str, files: &BTreeMap<String, Vec<String>>) -> Option<String> {
    let quoted_after = |marker: &str| -> Option<String> {
        let rest = &message[message.find(marker)? + marker.len()..];
        let q = rest.chars().next().filter(|c| *c == '\'' || *c == '"')?;
        let rest = &rest[1..];
        Some(rest[..rest.find(q)?].to_string())
    };
    if let Some(path) = quoted_after("(file: ")
        && let Some((file, _)) = files.iter().find(|(_, paths)| paths.contains(&path))
    {
        return Some(file.clone());
    }
    if let Some(section) = quoted_after("in section ") {
        let file = match section.split_once(':') {
            Some(("program", name)) => Some(render::program_file_name(name)),
            Some(("group", name)) => Some(render::group_file_name(name)),
            _ => None,
        };
        if let Some(f) = file.filter(|f| files.contains_key(f)) {
            return Some(f);
        }
    }
    if let Some(start) = message.find("[group:") {
        let rest = &message[start + 7..];
        let group = &rest[..rest.find(']')?];
        if let Some(member) = rest.split("unknown program or fcgi-program ").nth(1) {
            let member = member.split_whitespace().next().unwrap_or_default();
            let f = render::program_file_name(member);
            if files.contains_key(&f) {
                return Some(f);
            }
        }
        let f = render::group_file_name(group);
        if files.contains_key(&f) {
            return Some(f);
        }
    }
    None
}

/// What supervisord says must happen to a group Corral manages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupChange {
    /// Not loaded yet: add it.
    Add,
    /// Its config changed: stop its processes, then remove it and add it again.
    Replace,
    /// Corral no longer wants it: stop its processes, then remove it.
    Remove,
}

/// Turns `reloadConfig`'s verdict into the changes Corral carries out: only for groups it
/// wants loaded (`desired`), or that it loaded itself and wants no more (`managed`); a group
/// from someone else's conf file is never touched, whatever supervisord reports about it. A
/// changed group in `state_only` is not replaced (see [`state_only_groups`]).
pub fn pending_changes(
    added: &[String],
    changed: &[String],
    removed: &[String],
    desired: &BTreeSet<String>,
    managed: &BTreeSet<String>,
    state_only: &BTreeSet<String>,
) -> BTreeMap<String, GroupChange> {
    let mut out = BTreeMap::new();
    for g in removed {
        if managed.contains(g) && !desired.contains(g) {
            out.insert(g.clone(), GroupChange::Remove);
        }
    }
    for g in changed
        .iter()
        .filter(|g| desired.contains(*g) && !state_only.contains(*g))
    {
        out.insert(g.clone(), GroupChange::Replace);
    }
    for g in added.iter().filter(|g| desired.contains(*g)) {
        out.insert(g.clone(), GroupChange::Add);
    }
    out
}

/// Whether two renderings of a file differ only in their `autostart` lines: what a change of
/// desired state (or of `depends_on`) writes.
pub fn only_autostart_differs(old: &str, new: &str) -> bool {
    let (a, b): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
    a.len() == b.len()
        && a.iter()
            .zip(&b)
            .all(|(x, y)| x == y || (x.starts_with("autostart=") && y.starts_with("autostart=")))
}

/// The groups whose file changed only in `autostart` since supervisord loaded them (`loaded`:
/// group -> the file's content when the agent last added it): not replaced, since the agent
/// starts and stops their processes itself, and `autostart` matters to supervisord only when
/// it loads the group. Replacing them would stop nothing more, but supervisord would give
/// their processes new automatic log files, leaving the old ones (and the output of the run
/// just stopped) behind. A group the agent did not load itself (no `loaded`) is replaced.
pub fn state_only_groups(
    desired: &Desired,
    files: &BTreeMap<String, String>,
    loaded: &BTreeMap<String, String>,
) -> BTreeSet<String> {
    desired
        .programs
        .values()
        .flat_map(|p| p.groups.iter().map(move |g| (g, &p.file_name)))
        // A native group holds several programs' files: always replaced (their state is
        // not in their files anyway).
        .filter(|(g, _)| !desired.native.contains_key(*g))
        .filter(|(g, file)| {
            loaded
                .get(*g)
                .zip(files.get(*file))
                .is_some_and(|(old, new)| old != new && only_autostart_differs(old, new))
        })
        .map(|(g, _)| g.clone())
        .collect()
}

/// supervisord's process states, as the plan sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProcState {
    Stopped,
    Starting,
    Running,
    Backoff,
    Stopping,
    Exited,
    Fatal,
    Unknown,
}

impl ProcState {
    /// supervisord's RUNNING_STATES: what `stopProcess` acts on.
    pub fn is_running(self) -> bool {
        matches!(self, ProcState::Starting | ProcState::Running | ProcState::Backoff)
    }

    /// Running or on its way down: a process that still holds its pid.
    pub fn is_active(self) -> bool {
        self.is_running() || self == ProcState::Stopping
    }
}

/// One supervisord process as observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proc {
    pub group: String,
    pub state: ProcState,
    pub pid: i64,
    /// Unix seconds of the last start (0 if never).
    pub start: i64,
    pub exit_status: i64,
    pub spawn_error: String,
    pub description: String,
    pub statename: String,
    /// Forked by supervisord but not yet running its command: until the child exec's, it
    /// runs supervisord's own signal handlers, so a signal sent now (a stop's SIGTERM) is
    /// lost, and a stop would last `stopwaitsecs` before SIGKILL.
    pub exec_pending: bool,
}

/// The processes supervisord runs, by `group:name`.
pub type Observed = HashMap<String, Proc>;

/// A runtime action. None of them waits for supervisord's main loop.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Load a group supervisord has parsed but does not run.
    AddGroup(String),
    /// Remove a group whose processes are all stopped.
    RemoveGroup(String),
    /// Remove and add again a changed group whose processes are all stopped.
    ReplaceGroup(String),
    /// Ask a process to stop (`stopProcess(wait=false)`).
    Stop(String),
    /// Start a process (`startProcess(wait=false)`).
    Start(String),
    /// Send a signal (a new signal request).
    Signal(String, String),
}

impl Action {
    /// The group or process the action is about.
    pub fn target(&self) -> &str {
        match self {
            Action::AddGroup(t)
            | Action::RemoveGroup(t)
            | Action::ReplaceGroup(t)
            | Action::Stop(t)
            | Action::Start(t)
            | Action::Signal(t, _) => t,
        }
    }
}

/// Why something changed on the host, for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Correction {
    ConfFile,
    Group,
    ProcessStarted,
    ProcessStopped,
    ProcessRestarted,
    ProcessSignalled,
    CrashLoopRestart,
    /// A RUNNING process that failed its health check, restarted.
    HealthRestart,
    /// A process left running by a supervisord that died, stopped.
    OrphanStopped,
}

impl Correction {
    pub fn as_str(self) -> &'static str {
        match self {
            Correction::ConfFile => "conf_file",
            Correction::Group => "group",
            Correction::ProcessStarted => "process_started",
            Correction::ProcessStopped => "process_stopped",
            Correction::ProcessRestarted => "process_restarted",
            Correction::ProcessSignalled => "process_signalled",
            Correction::CrashLoopRestart => "crash_loop_restart",
            Correction::HealthRestart => "health_restart",
            Correction::OrphanStopped => "orphan_stopped",
        }
    }
}

/// Crash-loop bookkeeping of one process.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Crash {
    /// Starts by the policy since the process last stayed up.
    pub attempts: u32,
    /// Unix ms of the next start, once it is FATAL and waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_ms: Option<i64>,
    /// Why its health check failed, when that is what restarted it last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_failure: Option<String>,
    /// The program's generation these restarts happened under: a new generation (a fixed
    /// spec) starts from no restarts.
    #[serde(default)]
    pub generation: u64,
}

/// The delay before crash-loop start number `attempts + 1`.
pub fn crash_delay(policy: &CrashLoop, attempts: u32) -> Duration {
    let secs = policy
        .initial_delay_secs
        .saturating_mul(1u64 << attempts.min(20))
        .min(policy.max_delay_secs);
    Duration::from_secs(secs)
}

/// What the plan remembers from pass to pass. `crash` survives agent restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    pub crash: BTreeMap<String, Crash>,
    /// Processes the agent asked to stop, and since when (unix ms): polled until stopped.
    pub stopping: BTreeMap<String, i64>,
    /// Processes the agent started, and when (unix ms): polled from when they are due
    /// RUNNING (supervisord reports whole seconds; the agent knows the millisecond).
    pub started: BTreeMap<String, i64>,
    /// Each program's `depends_on` as last assigned, kept while supervisord still has the
    /// program, so that a program being removed still stops before what it depends on.
    pub depends: BTreeMap<String, Vec<String>>,
    /// Processes whose stop or signal the last plan held back until they exec: looked at
    /// again in [`EXEC_POLL`].
    pub exec_wait: BTreeSet<String>,
}

/// Restart markers and signal requests already acted on, per program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied<'a> {
    pub markers: &'a BTreeMap<String, Option<String>>,
    pub signals: &'a BTreeMap<String, Option<String>>,
}

/// What [`plan_runtime`] looks at.
#[derive(Clone, Copy, Debug)]
pub struct RuntimeInput<'a> {
    pub desired: &'a Desired,
    /// Programs supervisord has a config for (their file, current or last accepted, is on
    /// disk and was read).
    pub loaded: &'a BTreeSet<String>,
    pub pending: &'a BTreeMap<String, GroupChange>,
    pub observed: &'a Observed,
    pub applied: Applied<'a>,
    /// Health checks' verdicts.
    pub probes: &'a Probes,
    pub now_ms: i64,
}

/// The runtime actions of one pass, each with why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimePlan {
    pub actions: Vec<(Action, Correction)>,
    /// Programs with a stop or signal held back for a process that has not exec'd yet (see
    /// [`Proc::exec_pending`]): their restart markers and signal requests are not applied
    /// yet, and the next pass looks again within milliseconds.
    pub deferred: BTreeSet<String>,
    /// Programs held back by their order, and why: a start waiting for what the program
    /// depends on, a stop waiting for what depends on it.
    pub waiting: BTreeMap<String, String>,
}

/// The verdict of `p`'s health check on process `ns` as it runs now (`None`: no check, or no
/// verdict yet on this pid).
pub fn verdict(p: &DesiredProgram, ns: &str, proc: &Proc, probes: &Probes) -> Option<bool> {
    p.health.as_ref()?;
    probes.get(ns).filter(|pr| pr.pid == proc.pid)?.healthy
}

/// RUNNING, and healthy when the program has a check.
pub fn runs_healthy(p: &DesiredProgram, ns: &str, proc: &Proc, probes: &Probes) -> bool {
    proc.state == ProcState::Running && (p.health.is_none() || verdict(p, ns, proc, probes) == Some(true))
}

/// Whether every process of every dependency of `p` placed here is RUNNING (and healthy, if
/// it has a check); else the first that is not.
fn dependencies_running<'a>(p: &'a DesiredProgram, input: &RuntimeInput<'_>) -> Result<(), &'a str> {
    for d in &p.depends_on {
        let Some(dp) = input.desired.programs.get(d) else {
            continue; // not placed here: not waited for
        };
        let running = !dp.namespecs.is_empty()
            && dp.namespecs.iter().all(|ns| {
                input
                    .observed
                    .get(ns)
                    .is_some_and(|pr| runs_healthy(dp, ns, pr, input.probes))
            });
        if !running {
            return Err(d);
        }
    }
    Ok(())
}

/// A program being stopped or removed here that depends on `program` and still has a process
/// running or stopping: `program` must wait for it.
fn dependent_still_up(program: &str, input: &RuntimeInput<'_>, memory: &Memory) -> Option<String> {
    memory
        .depends
        .iter()
        .filter(|(dependent, deps)| *dependent != program && deps.iter().any(|d| d == program))
        .find(|(dependent, _)| match input.desired.programs.get(*dependent) {
            Some(dp) => {
                dp.state == DesiredState::Stopped
                    && dp
                        .namespecs
                        .iter()
                        .any(|ns| input.observed.get(ns).is_some_and(|pr| pr.state.is_active()))
            }
            None => input
                .observed
                .values()
                .any(|pr| &pr.group == *dependent && pr.state.is_active()),
        })
        .map(|(dependent, _)| dependent.clone())
}

/// Plans group changes and process actions; updates `memory` (crash-loop schedule, stops and
/// starts asked for).
///
/// - A pending group change first stops the group's running processes, and only once none
///   is running or stopping removes (and re-adds) it. Its programs get no other action
///   meanwhile.
/// - A program whose restart marker moved has its running processes stopped; they are then
///   STOPPED, which the next pass starts.
/// - A program that must run: STOPPED processes are started; FATAL ones are started again by
///   the crash-loop policy when their delay is over; EXITED ones are left alone (supervisord's
///   `autorestart` decided that).
/// - A program that must not run: its running processes are stopped.
pub fn plan_runtime(input: &RuntimeInput<'_>, memory: &mut Memory) -> RuntimePlan {
    let now = input.now_ms;
    let mut plan = RuntimePlan::default();
    // What each program depends on: as assigned now, or as last assigned while it is still
    // in supervisord (on its way out).
    for p in input.desired.programs.values() {
        if p.depends_on.is_empty() {
            memory.depends.remove(&p.name);
        } else {
            memory.depends.insert(p.name.clone(), p.depends_on.clone());
        }
    }
    memory.depends.retain(|name, _| {
        input.desired.programs.contains_key(name) || input.observed.values().any(|pr| &pr.group == name)
    });
    let mut busy_groups = BTreeSet::new();
    for (g, change) in input.pending {
        busy_groups.insert(g.as_str());
        if *change == GroupChange::Add {
            plan.actions.push((Action::AddGroup(g.clone()), Correction::Group));
            continue;
        }
        // Removed, or replaced (a state change rewrites the file): what depends on it and is
        // going too stops first.
        if let Some(dependent) = dependent_still_up(g, input, memory) {
            plan.waiting
                .insert(g.clone(), format!("stops after {dependent}, which depends on it"));
            continue;
        }
        let mut procs: Vec<(&String, &Proc)> = input.observed.iter().filter(|(_, p)| &p.group == g).collect();
        procs.sort_by(|a, b| a.0.cmp(b.0));
        let running: Vec<&String> = procs
            .iter()
            .filter(|(_, p)| p.state.is_running())
            .map(|(ns, _)| *ns)
            .collect();
        if !running.is_empty() {
            for ns in running {
                memory.stopping.entry(ns.clone()).or_insert(now);
                plan.actions.push((Action::Stop(ns.clone()), Correction::Group));
            }
        } else if procs.iter().any(|(_, p)| p.state == ProcState::Stopping) {
            // Wait for them: removing now would fail STILL_RUNNING.
        } else {
            let action = match change {
                GroupChange::Replace => Action::ReplaceGroup(g.clone()),
                _ => Action::RemoveGroup(g.clone()),
            };
            plan.actions.push((action, Correction::Group));
        }
    }

    for p in input.desired.programs.values() {
        if !input.loaded.contains(&p.name) {
            continue;
        }
        let marker_moved = p.state == DesiredState::Running
            && p.restarted_at.is_some()
            && input.applied.markers.get(&p.name).is_some_and(|a| *a != p.restarted_at);
        // Only a new signal request signals; the first sight of one does not.
        let signal = p.signal_request.as_ref().filter(|(_, id)| {
            input
                .applied
                .signals
                .get(&p.name)
                .is_some_and(|a| a.as_deref() != Some(id.as_str()))
        });
        for ns in &p.namespecs {
            let Some(proc) = input.observed.get(ns) else {
                continue;
            };
            if busy_groups.contains(group_of(ns)) {
                continue;
            }
            let s = proc.state;
            if memory.crash.get(ns).is_some_and(|c| c.generation != p.generation) {
                // A new spec: its restarts start from none (and one held back starts now).
                memory.crash.remove(ns);
            }
            let action = match p.state {
                DesiredState::Running if marker_moved && s.is_running() => {
                    memory.stopping.entry(ns.clone()).or_insert(now);
                    Some((Action::Stop(ns.clone()), Correction::ProcessRestarted))
                }
                DesiredState::Running
                    if s == ProcState::Running
                        && p.health.as_ref().is_some_and(|h| h.restart)
                        && verdict(p, ns, proc, input.probes) == Some(false) =>
                {
                    // Liveness: stopped now, started again at once the first time, then
                    // after the crash-loop delay (doubling).
                    let crash = memory.crash.entry(ns.clone()).or_insert_with(|| Crash {
                        generation: p.generation,
                        ..Default::default()
                    });
                    crash.next_retry_ms = match crash.attempts {
                        0 => None,
                        n => Some(now + crash_delay(&p.crash, n - 1).as_millis() as i64),
                    };
                    crash.attempts += 1;
                    crash.health_failure = input.probes.get(ns).map(|pr| pr.error.clone());
                    memory.stopping.entry(ns.clone()).or_insert(now);
                    Some((Action::Stop(ns.clone()), Correction::HealthRestart))
                }
                DesiredState::Running
                    if s == ProcState::Stopped
                        && memory
                            .crash
                            .get(ns)
                            .and_then(|c| c.next_retry_ms)
                            .is_some_and(|at| now < at) =>
                {
                    None // stopped for failing its health check: its delay is not over
                }
                DesiredState::Running if s == ProcState::Stopped || (marker_moved && !s.is_active()) => {
                    if let Some(c) = memory.crash.get_mut(ns) {
                        c.next_retry_ms = None;
                    }
                    Some((Action::Start(ns.clone()), Correction::ProcessStarted))
                }
                DesiredState::Running if s == ProcState::Fatal && p.crash.restart => {
                    let crash = memory.crash.entry(ns.clone()).or_insert_with(|| Crash {
                        generation: p.generation,
                        ..Default::default()
                    });
                    match crash.next_retry_ms {
                        None => {
                            let delay = crash_delay(&p.crash, crash.attempts);
                            crash.next_retry_ms = Some(now + delay.as_millis() as i64);
                            None
                        }
                        Some(at) if now >= at => {
                            crash.attempts += 1;
                            crash.next_retry_ms = None;
                            Some((Action::Start(ns.clone()), Correction::CrashLoopRestart))
                        }
                        Some(_) => None,
                    }
                }
                DesiredState::Stopped if s.is_running() => match dependent_still_up(&p.name, input, memory) {
                    Some(dependent) => {
                        plan.waiting
                            .insert(p.name.clone(), format!("stops after {dependent}, which depends on it"));
                        None
                    }
                    None => {
                        memory.stopping.entry(ns.clone()).or_insert(now);
                        Some((Action::Stop(ns.clone()), Correction::ProcessStopped))
                    }
                },
                _ if s.is_running() && s != ProcState::Stopping => {
                    signal.map(|(sig, _)| (Action::Signal(ns.clone(), sig.clone()), Correction::ProcessSignalled))
                }
                _ => None,
            };
            if s == ProcState::Running
                && let Some(c) = memory.crash.get(ns)
                && c.next_retry_ms.is_none()
                && now - proc.start * 1000 >= (p.crash.reset_after_secs * 1000) as i64
            {
                // It stayed up: the next crash starts from the initial delay again.
                memory.crash.remove(ns);
            }
            let action = match action {
                Some((Action::Start(_), _)) if let Err(d) = dependencies_running(p, input) => {
                    plan.waiting.insert(
                        p.name.clone(),
                        format!("waiting for {d} to be RUNNING and healthy (depends_on)"),
                    );
                    None
                }
                other => other,
            };
            if let Some((Action::Start(ns), _)) = &action {
                memory.started.insert(ns.clone(), now);
            }
            plan.actions.extend(action);
        }
    }

    defer_until_exec(&mut plan, input, memory);

    // Forget what no longer needs watching.
    let wanted: BTreeSet<&String> = input
        .desired
        .programs
        .values()
        .filter(|p| {
            p.state == DesiredState::Running && (p.crash.restart || p.health.as_ref().is_some_and(|h| h.restart))
        })
        .flat_map(|p| p.namespecs.iter())
        .collect();
    memory.crash.retain(|ns, _| wanted.contains(ns));
    memory
        .stopping
        .retain(|ns, _| input.observed.get(ns).is_some_and(|p| p.state.is_active()));
    plan
}

/// How long after its start a process may still be between supervisord's fork and its exec
/// (supervisord reports whole seconds; the window itself is milliseconds).
pub const EXEC_WINDOW_SECS: i64 = 2;

fn recently_started(p: &Proc, now_ms: i64) -> bool {
    p.pid > 0
        && matches!(p.state, ProcState::Starting | ProcState::Running)
        && now_ms / 1000 - p.start <= EXEC_WINDOW_SECS
}

/// Whether any process started in the last [`EXEC_WINDOW_SECS`] (only then may a stop or
/// signal need [`Proc::exec_pending`]).
pub fn any_recently_started(observed: &Observed, now_ms: i64) -> bool {
    observed.values().any(|p| recently_started(p, now_ms))
}

/// The processes `plan` stops or signals that started in the last [`EXEC_WINDOW_SECS`]: those
/// whose [`Proc::exec_pending`] the adapter looks up before they are sent anything.
pub fn signalled_recently_started(plan: &RuntimePlan, observed: &Observed, now_ms: i64) -> BTreeSet<String> {
    plan.actions
        .iter()
        .filter_map(|(a, _)| match a {
            Action::Stop(ns) | Action::Signal(ns, _) => Some(ns),
            _ => None,
        })
        .filter(|ns| observed.get(*ns).is_some_and(|p| recently_started(p, now_ms)))
        .cloned()
        .collect()
}

/// Holds back every stop and signal of a process that has not exec'd yet (a signal would
/// reach supervisord's handlers in the child and be lost), and a program's other signals with
/// it, so a signal request reaches all its processes in one pass. The next pass comes in
/// [`EXEC_POLL`].
fn defer_until_exec(plan: &mut RuntimePlan, input: &RuntimeInput, memory: &mut Memory) {
    let pending = |ns: &str| input.observed.get(ns).is_some_and(|p| p.exec_pending);
    let program_of = |ns: &str| {
        input
            .desired
            .programs
            .values()
            .find(|p| p.namespecs.iter().any(|n| n == ns))
            .map(|p| p.name.clone())
    };
    memory.exec_wait.clear();
    let mut signal_held = BTreeSet::new();
    for (action, _) in &plan.actions {
        if let Action::Stop(ns) | Action::Signal(ns, _) = action
            && pending(ns)
        {
            memory.exec_wait.insert(ns.clone());
            // Not asked to stop yet: its stop is timed from when it is.
            memory.stopping.remove(ns);
            plan.deferred.extend(program_of(ns));
            if matches!(action, Action::Signal(..)) {
                signal_held.extend(program_of(ns));
            }
        }
    }
    if plan.deferred.is_empty() {
        return;
    }
    plan.actions.retain(|(action, _)| match action {
        Action::Stop(ns) => !pending(ns),
        Action::Signal(ns, _) => !pending(ns) && !program_of(ns).is_some_and(|p| signal_held.contains(&p)),
        _ => true,
    });
}

/// How soon a pass looks again after acting (supervisord spawns and stops asynchronously).
pub const POLL: Duration = Duration::from_millis(5);
/// How soon a pass looks again at a process whose stop or signal waits for it to exec (a
/// fork-to-exec takes milliseconds; one that hangs there, on a slow `directory` say, is
/// looked at 50 times a second, not spun on).
pub const EXEC_POLL: Duration = Duration::from_millis(20);
/// The longest pause between looks at a process that is still stopping.
pub const STOP_POLL_MAX: Duration = Duration::from_millis(500);
/// How long past its startsecs a process the agent started is still polled for.
pub const SPAWN_GRACE: Duration = Duration::from_secs(5);

/// When the next pass should look, if before the resync: while a process the agent stopped
/// is still stopping (every few ms at first, then less often, so a program that ignores
/// SIGTERM for a minute costs little); when a process the agent started or added is due
/// RUNNING (at once for startsecs 0); when a stop or signal waits for its process to exec
/// (see [`Proc::exec_pending`]); when a crash-loop start or a refused file's retry is
/// due. Acting in itself asks for no look: what was acted on is in one of those.
///
/// Processes supervisord restarts by itself (autorestart) wait for the resync: no polling
/// for a crash loop. Forgets started processes that are no longer pending.
pub fn next_look(
    desired: &Desired,
    observed: &Observed,
    memory: &mut Memory,
    refusal_retries: impl Iterator<Item = i64>,
    now_ms: i64,
) -> Option<Duration> {
    let ms = |d: i64| Duration::from_millis(d.max(0) as u64);
    let mut due: Option<Duration> = None;
    let mut at = |d: Duration| due = Some(due.map_or(d, |x| x.min(d)));
    for since in memory.stopping.values() {
        at(ms((now_ms - since) / 8).clamp(POLL, STOP_POLL_MAX));
    }
    if !memory.exec_wait.is_empty() {
        at(EXEC_POLL);
    }
    let startsecs: HashMap<&str, u64> = desired
        .programs
        .values()
        .flat_map(|p| p.namespecs.iter().map(move |ns| (ns.as_str(), p.startsecs)))
        .collect();
    memory.started.retain(|ns, started| {
        let Some(secs) = startsecs.get(ns.as_str()) else {
            return false;
        };
        let pending = observed
            .get(ns)
            .is_some_and(|p| matches!(p.state, ProcState::Starting | ProcState::Stopped));
        let running_at = *started + (*secs as i64) * 1000;
        let keep = pending && now_ms < running_at + SPAWN_GRACE.as_millis() as i64;
        if keep {
            at(ms(running_at - now_ms).max(POLL));
        }
        keep
    });
    for c in memory.crash.values() {
        if let Some(t) = c.next_retry_ms {
            at(ms(t - now_ms).max(POLL));
        }
    }
    for t in refusal_retries {
        at(ms(t - now_ms).max(POLL));
    }
    due
}

/// Whether supervisord runs `p`'s current generation: its rendered file is what supervisord
/// last read successfully (`last_good`) and no change of its group is pending (a Replace
/// still waiting for the old processes to stop does not count).
pub fn runs_generation(
    p: &DesiredProgram,
    last_good: &BTreeMap<String, String>,
    pending: &BTreeMap<String, GroupChange>,
    held: &BTreeMap<String, String>,
) -> bool {
    !held.contains_key(&p.name)
        && !p.groups.iter().any(|g| pending.contains_key(g))
        && last_good.get(&p.file_name) == Some(&p.content)
}

/// The supervisord group of a `group:process` name.
pub fn group_of(namespec: &str) -> &str {
    namespec.split_once(':').map_or(namespec, |(g, _)| g)
}

/// Whether every process of `p` is in its desired state: RUNNING (past startsecs, and
/// healthy when it has a check) when it must run, not running when it must not.
pub fn is_ready(p: &DesiredProgram, observed: &Observed, probes: &Probes) -> bool {
    p.namespecs.iter().all(|ns| {
        observed.get(ns).is_some_and(|proc| match p.state {
            DesiredState::Running => runs_healthy(p, ns, proc, probes),
            DesiredState::Stopped => !proc.state.is_active(),
        })
    })
}

/// Whether a process is failing, so that its stderr is worth showing.
pub fn is_failing(p: &Proc) -> bool {
    matches!(p.state, ProcState::Fatal | ProcState::Backoff | ProcState::Exited)
}

/// What [`statuses`] reports from.
#[derive(Clone, Copy, Debug)]
pub struct StatusInput<'a> {
    pub host: &'a str,
    pub desired: &'a Desired,
    pub observed: &'a Observed,
    /// Program -> why it is not as desired here.
    pub errors: &'a BTreeMap<String, String>,
    /// Program -> the generation supervisord runs.
    pub generations: &'a BTreeMap<String, u64>,
    pub memory: &'a Memory,
    /// `group:process` -> last lines of its stderr, for failing processes.
    pub stderr_tails: &'a HashMap<String, String>,
    /// Health checks' verdicts.
    pub probes: &'a Probes,
    /// Programs whose current file supervisord refused.
    pub refused: &'a BTreeSet<String>,
    /// Programs held back by their order, and why (`RuntimePlan::waiting`).
    pub waiting: &'a BTreeMap<String, String>,
}

/// The status of every desired (or invalid) program on this host.
pub fn statuses(input: &StatusInput<'_>) -> BTreeMap<String, ProgramHostStatus> {
    let mut out = BTreeMap::new();
    for p in input.desired.programs.values() {
        let processes: Vec<ProcessStatus> = p
            .namespecs
            .iter()
            .filter_map(|ns| Some((ns, input.observed.get(ns)?)))
            .map(|(ns, i)| {
                let crash = input.memory.crash.get(ns);
                let verdict = verdict(p, ns, i, input.probes);
                ProcessStatus {
                    name: ns.clone(),
                    state: i.statename.clone(),
                    pid: i.pid,
                    started_at: i.start,
                    exit_status: i.exit_status,
                    spawn_error: i.spawn_error.clone(),
                    // supervisord's description of a running process is its uptime, which
                    // changes every second: reporting it would rewrite every status in etcd
                    // every pass. Kept where it explains a state (exited, fatal, stopped).
                    description: if i.state.is_active() {
                        String::new()
                    } else {
                        i.description.clone()
                    },
                    crash_restarts: crash.map_or(0, |c| c.attempts),
                    next_retry_at: crash.and_then(|c| c.next_retry_ms).map_or(0, |t| t.div_euclid(1000)),
                    stderr_tail: if is_failing(i) {
                        input.stderr_tails.get(ns).cloned().unwrap_or_default()
                    } else {
                        String::new()
                    },
                    health: match verdict {
                        _ if p.health.is_none() => String::new(),
                        // Restarted for failing its check and not passing again yet: still
                        // unhealthy (its alert keeps counting through the restarts).
                        None if crash.is_some_and(|c| c.health_failure.is_some()) && i.state != ProcState::Fatal => {
                            "unhealthy".to_string()
                        }
                        _ if i.state != ProcState::Running => String::new(),
                        Some(true) => "healthy".to_string(),
                        Some(false) => "unhealthy".to_string(),
                        None => "pending".to_string(),
                    },
                    health_error: match verdict {
                        Some(false) => input.probes.get(ns).map(|pr| pr.error.clone()).unwrap_or_default(),
                        _ => crash.and_then(|c| c.health_failure.clone()).unwrap_or_default(),
                    },
                }
            })
            .collect();
        let error = input.errors.get(&p.name).cloned();
        let observed_generation = input.generations.get(&p.name).copied().unwrap_or(0);
        // What this generation did here (a rollout's auto_revert acts on it): supervisord
        // refused its file, or it runs and a process gave up or fails its check.
        // A process restarted by the policy under this generation (crash loop, or its check
        // failing) failed it too, even while it is started again.
        let restarted = p
            .namespecs
            .iter()
            .filter_map(|ns| input.memory.crash.get(ns))
            .any(|c| c.generation == p.generation && (c.attempts > 0 || c.health_failure.is_some()));
        let failed = input.refused.contains(&p.name)
            || (observed_generation == p.generation
                && p.state == DesiredState::Running
                && (restarted
                    || processes
                        .iter()
                        .any(|pr: &ProcessStatus| pr.state == "FATAL" || pr.health == "unhealthy")));
        out.insert(
            p.name.clone(),
            ProgramHostStatus {
                host: input.host.to_string(),
                program: p.name.clone(),
                observed_generation,
                desired_state: p.state,
                processes,
                ready: error.is_none() && is_ready(p, input.observed, input.probes),
                error,
                failed_generation: if failed { p.generation } else { 0 },
                waiting: input.waiting.get(&p.name).cloned(),
            },
        );
    }
    for (name, why) in &input.desired.invalid {
        out.insert(
            name.clone(),
            ProgramHostStatus {
                host: input.host.to_string(),
                program: name.clone(),
                observed_generation: 0,
                desired_state: Default::default(),
                processes: Vec::new(),
                ready: false,
                error: Some(why.clone()),
                failed_generation: 0,
                waiting: None,
            },
        );
    }
    out
}

/// How long a program may be on its way (stopping, starting, about to be started again)
/// before that is reported. A change of a running program passes through such states for
/// tens of milliseconds; writing each to etcd would double the writes of every fan-out (a
/// thousand hosts, a thousand more writes, while etcd is busiest) for a state no one reads
/// in time: `corral status` and Prometheus look every few seconds. One that lasts is
/// reported like any other; failures (BACKOFF, FATAL, EXITED, errors) go at once.
pub const REPORT_SETTLE: Duration = Duration::from_secs(1);

/// Whether `s` is only on its way to its desired state: not ready, no error, and every
/// process starting, stopping or stopped (about to be started, or stopped for a replacement).
pub fn on_its_way(s: &ProgramHostStatus) -> bool {
    !s.ready
        && s.error.is_none()
        && s.processes
            .iter()
            .all(|p| matches!(p.state.as_str(), "STARTING" | "STOPPING" | "STOPPED"))
}

/// The status writes due now.
#[derive(Debug, Default, PartialEq)]
pub struct Reports {
    pub put: Vec<ProgramHostStatus>,
    pub delete: Vec<String>,
    /// When to look again for a status held back as on its way.
    pub next: Option<Duration>,
}

/// Which statuses to write: those that differ from what etcd holds (`written`), except one
/// [`on_its_way`] for less than [`REPORT_SETTLE`] (`since`: program -> when it was first seen
/// on its way; kept up to date here). Settled statuses (ready, failing, an error) go at once.
pub fn reports_due(
    written: &BTreeMap<String, ProgramHostStatus>,
    wanted: &BTreeMap<String, ProgramHostStatus>,
    since: &mut BTreeMap<String, i64>,
    now_ms: i64,
) -> Reports {
    let mut out = Reports::default();
    since.retain(|p, _| wanted.get(p).is_some_and(on_its_way));
    for (program, s) in wanted {
        if on_its_way(s) {
            let first = *since.entry(program.clone()).or_insert(now_ms);
            let due = first + REPORT_SETTLE.as_millis() as i64;
            if now_ms < due {
                if written.get(program) != Some(s) {
                    let wait = Duration::from_millis((due - now_ms) as u64);
                    out.next = Some(out.next.map_or(wait, |n| n.min(wait)));
                }
                continue;
            }
        }
        if written.get(program) != Some(s) {
            out.put.push(s.clone());
        }
    }
    out.delete = written.keys().filter(|p| !wanted.contains_key(*p)).cloned().collect();
    out
}

#[cfg(test)]
mod tests;

/// A process supervisord reported for one of Corral's programs, as last seen.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SeenProcess {
    pub namespec: String,
    /// supervisord's start time (Unix seconds).
    pub start: i64,
    pub stopwaitsecs: u64,
}

/// An orphan being stopped: SIGTERM sent at `term_at_ms`; SIGKILL once `stopwaitsecs` pass.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reaping {
    pub seen: SeenProcess,
    pub term_at_ms: i64,
    pub killed: bool,
}

/// A signal to an orphan's process group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reap {
    Term(i64),
    Kill(i64),
}

/// How far a process's start time as the kernel has it may be from supervisord's (which
/// takes the time just before it forks).
const SAME_START_SECS: i64 = 2;

/// The processes of Corral's programs that supervisord reports running now: pid -> what it is.
pub fn seen_processes(observed: &Observed, desired: &Desired) -> BTreeMap<i64, SeenProcess> {
    desired
        .programs
        .values()
        .flat_map(|p| p.namespecs.iter().map(move |ns| (ns, p.stopwaitsecs)))
        .filter_map(|(ns, stopwaitsecs)| {
            let proc = observed.get(ns).filter(|proc| proc.pid > 0)?;
            Some((
                proc.pid,
                SeenProcess {
                    namespec: ns.clone(),
                    start: proc.start,
                    stopwaitsecs,
                },
            ))
        })
        .collect()
}

/// Orphans: processes supervisord reported for Corral's programs that are still alive (the
/// same process: its start time matches, so a reused PID is never taken for it) but that
/// supervisord no longer reports. supervisord never lets go of a process it stopped; one it
/// no longer knows outlived a supervisord killed with -9 or crashed, and runs beside the
/// copy the new supervisord started (holding its port, its files, its queue). Each orphan's
/// process group (supervisord makes every child a group leader) gets SIGTERM, then SIGKILL
/// after its program's `stopwaitsecs`, as supervisord itself would have stopped it.
///
/// `seen`: what was reported at the last look; `reported`: every PID supervisord reports
/// now; `alive`: start time (Unix seconds) of each PID of `seen` and `reaping` still alive.
pub fn plan_reaping(
    seen: &BTreeMap<i64, SeenProcess>,
    reaping: &mut BTreeMap<i64, Reaping>,
    reported: &BTreeSet<i64>,
    alive: &BTreeMap<i64, i64>,
    now_ms: i64,
) -> Vec<Reap> {
    let same = |pid: &i64, s: &SeenProcess| {
        alive
            .get(pid)
            .is_some_and(|start| (start - s.start).abs() <= SAME_START_SECS)
    };
    let mut out = Vec::new();
    reaping.retain(|pid, r| same(pid, &r.seen) && !reported.contains(pid));
    for (pid, r) in reaping.iter_mut() {
        if !r.killed && now_ms >= r.term_at_ms + (r.seen.stopwaitsecs as i64) * 1000 {
            r.killed = true;
            out.push(Reap::Kill(*pid));
        }
    }
    for (pid, s) in seen {
        if !reported.contains(pid) && same(pid, s) && !reaping.contains_key(pid) {
            reaping.insert(
                *pid,
                Reaping {
                    seen: s.clone(),
                    term_at_ms: now_ms,
                    killed: false,
                },
            );
            out.push(Reap::Term(*pid));
        }
    }
    out
}

//! The imperative shell around `plan`: one reconcile pass against the conf dir and
//! supervisord, and the agent state that must survive restarts.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use corral_proto::fleet::{ProcessStatus, ProgramHostStatus};
use corral_proto::render::managed_file_kind;
use serde::{Deserialize, Serialize};

use crate::confdir::{self, ConfDir};
use crate::plan::{
    self, Desired, FileAction, GroupAction, Observed, ProcessAction, plan_files, plan_groups, plan_processes,
};
use crate::supervisor::{self, Client, FaultCode, ProcessInfo, ProcessState};

/// What the agent remembers across restarts (`<state-dir>/state.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentState {
    /// supervisord groups Corral loaded; only these are ever removed.
    pub managed_groups: BTreeSet<String>,
    /// Restart marker last applied, per program.
    pub applied_markers: BTreeMap<String, Option<String>>,
    /// Signal request id last applied, per program.
    pub applied_signals: BTreeMap<String, Option<String>>,
    /// Generation whose file supervisord accepted, per program.
    pub applied_generations: BTreeMap<String, u64>,
}

/// Why a pass could not run at all (per-program problems are reported in statuses instead).
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    ConfDir(#[from] confdir::Error),
    #[error(transparent)]
    Supervisor(#[from] supervisor::Error),
}

impl PassError {
    /// A low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            PassError::ConfDir(_) => "conf_dir",
            PassError::Supervisor(e) => e.metric_label(),
        }
    }
}

/// What a pass observed and did.
#[derive(Clone, Debug, Default)]
pub struct PassReport {
    /// Per desired (or invalid) program.
    pub statuses: BTreeMap<String, ProgramHostStatus>,
    /// One entry per correction of drift: `conf_file`, `group`, `process_started`,
    /// `process_stopped`, `process_restarted`.
    pub corrections: Vec<&'static str>,
    /// supervisord's processes, as last seen.
    pub processes: Vec<ProcessInfo>,
    /// `group:process` of every process this pass stopped or restarted on purpose.
    pub stopped_by_agent: BTreeSet<String>,
    /// When to look again because a process should reach RUNNING by then (its startsecs end),
    /// so readiness is reported as soon as supervisord declares it, not at the next resync.
    pub recheck_after: Option<Duration>,
}

/// How soon a pass looks again after acting, and how often while a process it started is
/// due RUNNING.
const POLL: Duration = Duration::from_millis(5);

/// How long past its startsecs a process the agent started is still polled for.
const SPAWN_GRACE: Duration = Duration::from_secs(5);

/// Runs reconcile passes for one host.
pub struct Reconciler {
    host: String,
    client: Client,
    conf: ConfDir,
    state_path: PathBuf,
    state: AgentState,
    /// What `state.json` holds, so it is written only when the state changes.
    saved: AgentState,
    /// Call `reloadConfig` next pass even if no file changed (first pass, periodic check).
    reload_due: bool,
    /// Managed file -> (content, supervisord's complaint) for files supervisord refused.
    rejected: BTreeMap<String, (String, String)>,
    /// Managed file -> content supervisord last accepted.
    last_good: BTreeMap<String, String>,
    /// Processes this agent started (group added, process started), by namespec, and when:
    /// it knows to the millisecond when they are due RUNNING, which supervisord reports only
    /// in whole seconds.
    spawned: HashMap<String, Instant>,
}

impl Reconciler {
    /// Loads the agent state from `state_dir/state.json` (empty if absent).
    ///
    /// # Errors
    /// If the state file exists but cannot be read or parsed.
    pub fn new(host: &str, client: Client, conf: ConfDir, state_dir: PathBuf) -> Result<Reconciler, std::io::Error> {
        let state_path = state_dir.join("state.json");
        let state = match std::fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", state_path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => AgentState::default(),
            Err(e) => return Err(e),
        };
        Ok(Reconciler {
            host: host.to_string(),
            client,
            conf,
            state_path,
            saved: state.clone(),
            state,
            reload_due: true,
            rejected: BTreeMap::new(),
            last_good: BTreeMap::new(),
            spawned: HashMap::new(),
        })
    }

    /// Makes the next pass call `reloadConfig` (to catch runtime config drift) and try
    /// refused files again (the host may have changed: a user created, a directory made).
    pub fn request_reload(&mut self) {
        self.reload_due = true;
        self.rejected.clear();
    }

    pub fn state(&self) -> &AgentState {
        &self.state
    }

    fn save_state(&self) -> Result<(), confdir::Error> {
        let bytes = serde_json::to_vec_pretty(&self.state).unwrap_or_default();
        confdir::write_atomic(&self.state_path, &bytes)
    }

    /// One pass: files, then groups, then processes, then status.
    ///
    /// # Errors
    /// When the conf dir or supervisord cannot be used at all; problems of single programs
    /// are in the returned statuses.
    pub async fn pass(&mut self, desired: &Desired) -> Result<PassReport, PassError> {
        let mut report = PassReport::default();
        let mut errors: BTreeMap<String, String> = desired.invalid.clone();

        // 1. Files. A file supervisord refused is not written again until its content
        // changes; meanwhile the last accepted version (if any) stays.
        let mut want = Cow::Borrowed(&desired.files);
        self.rejected
            .retain(|file, (content, _)| want.get(file) == Some(content));
        for (file, (_, why)) in &self.rejected {
            match self.last_good.get(file) {
                Some(good) => want.to_mut().insert(file.clone(), good.clone()),
                None => want.to_mut().remove(file),
            };
            if let Some(name) = program_of(file) {
                errors.insert(name, why.clone());
            }
        }
        let observed = self.conf.read_managed()?;
        let actions = plan_files(&want, observed);
        // Drift: a file on disk is no longer what supervisord last accepted from us.
        let drifted = actions
            .iter()
            .filter(|a| match a {
                FileAction::Write { file, .. } => self
                    .last_good
                    .get(file)
                    .is_some_and(|good| observed.get(file) != Some(good)),
                FileAction::Remove { .. } => false,
            })
            .count();
        report.corrections.extend(std::iter::repeat_n("conf_file", drifted));
        for a in &actions {
            match a {
                FileAction::Write { file, content } => self.conf.write(file, content)?,
                FileAction::Remove { file } => self.conf.remove(file)?,
            }
        }
        if !actions.is_empty() {
            self.reload_due = true;
        }

        // 2. Groups, by supervisord's own verdict.
        let mut group_error: Option<String> = None;
        if self.reload_due {
            match self.reload(&want, &mut errors).await? {
                Ok(reload) => {
                    let desired_groups = desired.groups();
                    for action in plan_groups(&reload, &desired_groups, &self.state.managed_groups) {
                        report.corrections.push("group");
                        if let GroupAction::Remove(g) | GroupAction::Replace(g) = &action {
                            let members = desired.programs.values().filter(|p| &p.group == g);
                            report
                                .stopped_by_agent
                                .extend(members.flat_map(|p| p.namespecs.iter().cloned()));
                        }
                        let g = match &action {
                            GroupAction::Remove(g) | GroupAction::Replace(g) | GroupAction::Add(g) => g,
                        };
                        let members = desired.programs.values().filter(|p| &p.group == g);
                        match self.apply_group(&action).await {
                            Err(e) => {
                                for p in members {
                                    errors.insert(p.name.clone(), e.to_string());
                                }
                            }
                            Ok(()) if !matches!(action, GroupAction::Remove(_)) => {
                                let now = Instant::now();
                                let started =
                                    members.filter(|p| p.state == corral_proto::resource::DesiredState::Running);
                                self.spawned
                                    .extend(started.flat_map(|p| p.namespecs.iter().map(move |ns| (ns.clone(), now))));
                            }
                            Ok(()) => {}
                        }
                    }
                    self.state.managed_groups = desired_groups;
                    self.last_good = want.clone().into_owned();
                    self.reload_due = false;
                }
                Err(message) => group_error = Some(message),
            }
        }

        // A program runs its current generation once supervisord accepted exactly its rendered
        // file (a spec change that renders the same file, like a restart marker, counts too).
        for p in desired.programs.values() {
            if !errors.contains_key(&p.name)
                && self.last_good.get(&p.file_name) == Some(&p.content)
                && self.state.applied_generations.get(&p.name) != Some(&p.generation)
            {
                self.state.applied_generations.insert(p.name.clone(), p.generation);
            }
        }
        self.state
            .applied_generations
            .retain(|name, _| desired.programs.contains_key(name));

        // 3. Processes.
        let infos = self.client.get_all_process_info().await?;
        let observed = observe(&infos);
        if desired
            .programs
            .values()
            .any(|p| p.namespecs.iter().any(|ns| !observed.contains_key(ns)))
        {
            // A desired group is not loaded (supervisord restarted from older files, or a
            // reload failed): check again next pass.
            self.reload_due = true;
        }
        let applied = plan::Applied {
            markers: &self.state.applied_markers,
            signals: &self.state.applied_signals,
        };
        let actions = plan_processes(desired, &observed, &applied);
        let mut failed_programs = BTreeSet::new();
        for action in &actions {
            let (ns, kind) = match action {
                ProcessAction::Start(ns) => (ns, "process_started"),
                ProcessAction::Stop(ns) => (ns, "process_stopped"),
                ProcessAction::Restart(ns) => (ns, "process_restarted"),
                ProcessAction::Signal(ns, _) => (ns, "process_signalled"),
            };
            report.corrections.push(kind);
            if matches!(action, ProcessAction::Stop(_) | ProcessAction::Restart(_)) {
                report.stopped_by_agent.insert(ns.clone());
            }
            match self.apply_process(action).await {
                Err(e) => {
                    if let Some(p) = desired.programs.values().find(|p| p.namespecs.contains(ns)) {
                        failed_programs.insert(p.name.clone());
                        errors.insert(p.name.clone(), e.to_string());
                    }
                }
                Ok(()) if matches!(action, ProcessAction::Start(_) | ProcessAction::Restart(_)) => {
                    self.spawned.insert(ns.clone(), Instant::now());
                }
                Ok(()) => {}
            }
        }
        for p in desired.programs.values() {
            if !failed_programs.contains(&p.name) {
                // Written only when they differ: a quiet pass allocates nothing here.
                if self.state.applied_markers.get(&p.name) != Some(&p.restarted_at) {
                    self.state
                        .applied_markers
                        .insert(p.name.clone(), p.restarted_at.clone());
                }
                let signal_id = p.signal_request.as_ref().map(|(_, id)| id);
                if self.state.applied_signals.get(&p.name).map(Option::as_ref) != Some(signal_id) {
                    self.state.applied_signals.insert(p.name.clone(), signal_id.cloned());
                }
            }
        }
        self.state
            .applied_markers
            .retain(|name, _| desired.programs.contains_key(name));
        self.state
            .applied_signals
            .retain(|name, _| desired.programs.contains_key(name));
        if self.state != self.saved {
            self.save_state()?;
            self.saved = self.state.clone();
        }

        // 4. Status.
        let (infos, observed) = if actions.is_empty() {
            (infos, observed)
        } else {
            let infos = self.client.get_all_process_info().await?;
            let observed = observe(&infos);
            (infos, observed)
        };
        let by_namespec: HashMap<String, &ProcessInfo> = infos.iter().map(|i| (i.namespec(), i)).collect();
        for p in desired.programs.values() {
            let processes = p
                .namespecs
                .iter()
                .filter_map(|ns| Some((ns, by_namespec.get(ns)?)))
                .map(|(ns, i)| ProcessStatus {
                    name: ns.clone(),
                    state: i.statename.clone(),
                    pid: i.pid,
                    started_at: i.start,
                    exit_status: i.exitstatus,
                    spawn_error: i.spawnerr.clone(),
                })
                .collect();
            let error = errors.get(&p.name).cloned().or_else(|| group_error.clone());
            report.statuses.insert(
                p.name.clone(),
                ProgramHostStatus {
                    host: self.host.clone(),
                    program: p.name.clone(),
                    observed_generation: self.state.applied_generations.get(&p.name).copied().unwrap_or(0),
                    desired_state: p.state,
                    processes,
                    ready: error.is_none() && plan::is_ready(p, &observed),
                    error,
                },
            );
        }
        for (name, why) in &desired.invalid {
            report.statuses.insert(
                name.clone(),
                ProgramHostStatus {
                    host: self.host.clone(),
                    program: name.clone(),
                    observed_generation: 0,
                    desired_state: Default::default(),
                    processes: Vec::new(),
                    ready: false,
                    error: Some(why.clone()),
                },
            );
        }
        // After adding a group or starting a process, look again soon: supervisord spawns
        // asynchronously, and the process's STARTING phase decides the next recheck.
        let acted = report
            .corrections
            .iter()
            .any(|c| matches!(*c, "group" | "process_started" | "process_restarted"));
        let soon = acted.then_some(POLL);
        // Processes this agent started are polled from when they are due RUNNING (supervisord
        // declares it on its own loop, which each call also wakes). Others (autorestarts) are
        // reported by the next resync: no polling for a crash loop.
        let now = Instant::now();
        let mut due: Option<Duration> = None;
        self.spawned.retain(|ns, at| {
            let Some(p) = desired.programs.values().find(|p| p.namespecs.contains(ns)) else {
                return false;
            };
            let pending = by_namespec
                .get(ns)
                .is_some_and(|i| matches!(i.state, ProcessState::Starting | ProcessState::Stopped));
            let running_at = *at + Duration::from_secs(p.startsecs);
            let keep = pending && now < running_at + SPAWN_GRACE;
            if keep {
                let wait = running_at.saturating_duration_since(now).max(POLL);
                due = Some(due.map_or(wait, |d| d.min(wait)));
            }
            keep
        });
        report.recheck_after = due.into_iter().chain(soon).min();
        report.processes = infos;
        Ok(report)
    }

    /// `reloadConfig`, taking out managed files supervisord refuses one by one (restoring
    /// their last accepted version, or removing them), so one bad program never blocks the
    /// others. `Ok(Err(message))` when supervisord refuses a file that is not Corral's.
    async fn reload(
        &mut self,
        want: &BTreeMap<String, String>,
        errors: &mut BTreeMap<String, String>,
    ) -> Result<Result<supervisor::ReloadResult, String>, PassError> {
        let mut attempts = 0;
        loop {
            match self.client.reload_config().await {
                Ok(r) => return Ok(Ok(r)),
                Err(supervisor::Error::Fault {
                    code: FaultCode::CantReread,
                    message,
                    ..
                }) => {
                    attempts += 1;
                    let culprit = want
                        .keys()
                        .find(|f| message.contains(&self.conf.file(f).display().to_string()))
                        .cloned();
                    let Some(file) = culprit.filter(|_| attempts <= want.len()) else {
                        return Ok(Err(format!("supervisord cannot re-read its configuration: {message}")));
                    };
                    let content = want.get(&file).cloned().unwrap_or_default();
                    let why = format!("supervisord refused the rendered config on this host: {message}");
                    tracing::warn!(host = %self.host, file = %file, "supervisord refused a managed file");
                    match self.last_good.get(&file).filter(|good| **good != content) {
                        Some(good) => self.conf.write(&file, good)?,
                        None => self.conf.remove(&file)?,
                    }
                    if let Some(name) = program_of(&file) {
                        errors.insert(name, why.clone());
                    }
                    self.rejected.insert(file, (content, why));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn apply_group(&self, action: &GroupAction) -> Result<(), supervisor::Error> {
        match action {
            GroupAction::Remove(g) | GroupAction::Replace(g) => {
                tolerate(self.client.stop_process_group(g, true).await, FaultCode::BadName)?;
                tolerate(self.client.remove_process_group(g).await, FaultCode::BadName)?;
                if let GroupAction::Replace(g) = action {
                    tolerate(self.client.add_process_group(g).await, FaultCode::AlreadyAdded)?;
                }
                Ok(())
            }
            GroupAction::Add(g) => tolerate(self.client.add_process_group(g).await, FaultCode::AlreadyAdded),
        }
    }

    async fn apply_process(&self, action: &ProcessAction) -> Result<(), supervisor::Error> {
        match action {
            ProcessAction::Start(ns) => tolerate(self.client.start_process(ns, false).await, FaultCode::AlreadyStarted),
            ProcessAction::Stop(ns) => tolerate(self.client.stop_process(ns, true).await, FaultCode::NotRunning),
            ProcessAction::Restart(ns) => {
                tolerate(self.client.stop_process(ns, true).await, FaultCode::NotRunning)?;
                tolerate(self.client.start_process(ns, false).await, FaultCode::AlreadyStarted)
            }
            // A process that stopped meanwhile has nothing to receive the signal.
            ProcessAction::Signal(ns, sig) => {
                tolerate(self.client.signal_process(ns, sig).await, FaultCode::NotRunning)
            }
        }
    }
}

/// Treats the fault `fine` as success: the call's goal already holds (already started,
/// not running, already added, no such group).
fn tolerate<T>(r: Result<T, supervisor::Error>, fine: FaultCode) -> Result<(), supervisor::Error> {
    match r {
        Err(e) if e.fault() == Some(fine) => Ok(()),
        other => other.map(|_| ()),
    }
}

fn observe(infos: &[ProcessInfo]) -> Observed {
    infos.iter().map(|i| (i.namespec(), i.state)).collect()
}

fn program_of(file: &str) -> Option<String> {
    match managed_file_kind(file)? {
        corral_proto::render::ManagedFile::Program(name) => Some(name),
        corral_proto::render::ManagedFile::Group(_) => None,
    }
}

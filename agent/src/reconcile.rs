//! The imperative shell around `plan`: one reconcile pass observes the conf dir and
//! supervisord, asks `plan` what to do, and executes it; plus the agent state that must
//! survive restarts.
//!
//! No call here waits for supervisord's main loop (which answers a waiting stop or start only
//! at its next turn, about once a second): stops and starts are asked for, and a later pass,
//! as soon as `plan::next_look` says, sees them done. So one program's slow stop never delays
//! another's change.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use corral_proto::fleet::ProgramHostStatus;
use corral_proto::logs::LogStream;
use corral_proto::render::managed_file_kind;
use serde::{Deserialize, Serialize};

use crate::confdir::{self, ConfDir};
use crate::plan::{
    self, Action, Correction, Crash, Desired, FileAction, GroupChange, Memory, Observed, Proc, ProcState, Refusal,
    RuntimeInput,
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
    /// Generation supervisord runs, per program.
    pub applied_generations: BTreeMap<String, u64>,
    /// Crash-loop bookkeeping per process, so an agent restart does not reset the backoff.
    pub crash: BTreeMap<String, Crash>,
    /// Managed file -> the content supervisord last read successfully, so an agent killed
    /// between writing a file and `reloadConfig` knows, after a restart, which version to
    /// fall back to if supervisord refuses the one on disk. Holds rendered environment
    /// values: the state file is written readable by its owner only.
    pub accepted: BTreeMap<String, String>,
    /// PID -> the process of Corral's programs supervisord last reported under it, so that
    /// processes a dead supervisord left behind are known after it (and the agent) restart.
    pub seen_pids: BTreeMap<i64, plan::SeenProcess>,
    /// Orphans being stopped, by PID.
    pub reaping: BTreeMap<i64, plan::Reaping>,
    /// Group -> its file's content when the agent last added it to supervisord (what
    /// supervisord holds in memory): a change of that file in `autostart` alone is carried
    /// out by starting and stopping (`plan::state_only_groups`).
    pub loaded: BTreeMap<String, String>,
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
    /// One entry per correction.
    pub corrections: Vec<Correction>,
    /// supervisord's processes, as last seen.
    pub processes: Vec<ProcessInfo>,
    /// `group:process` of every process this pass stopped or restarted on purpose.
    pub stopped_by_agent: BTreeSet<String>,
    /// Programs whose desired file supervisord refused (they may run an older version).
    pub refused: BTreeSet<String>,
    /// When to look again, if before the resync (see `plan::next_look`).
    pub recheck_after: Option<Duration>,
    /// Programs with a stop or signal held back until a process has exec'd (see
    /// `plan::Proc::exec_pending`).
    pub deferred: BTreeSet<String>,
}

/// How many bytes of a failing process's stderr are shown.
const STDERR_TAIL_BYTES: i64 = 2048;

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Each action's result, and the processes right after the actions (`None`: no actions).
type Executed = (Vec<Result<(), supervisor::Error>>, Option<Vec<supervisor::ProcessInfo>>);

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
    /// Managed files supervisord refused, by file.
    refusals: BTreeMap<String, Refusal>,
    /// Whether `state.accepted` is known: a first pass without a recorded one takes what is
    /// on disk (the agent leaves only accepted files there).
    accepted_known: bool,
    /// supervisord's verdict on Corral's groups, until carried out.
    pending: BTreeMap<String, GroupChange>,
    memory: Memory,
    /// A failing process's stderr tail, by namespec, with the start time it was read for.
    tails: HashMap<String, (i64, String, String)>,
    /// Why supervisord refuses to re-read its config as a whole (not a file of Corral's).
    host_error: Option<String>,
    /// The managed files as they were when trying them out showed that supervisord's refusal
    /// is about none of them.
    not_ours: Option<BTreeMap<String, String>>,
    /// Runs the health checks of what runs.
    prober: crate::health::Prober,
}

impl Reconciler {
    /// Loads the agent state from `state_dir/state.json` (empty if absent).
    ///
    /// # Errors
    /// If the state file exists but cannot be read or parsed.
    pub fn new(host: &str, client: Client, conf: ConfDir, state_dir: PathBuf) -> Result<Reconciler, std::io::Error> {
        let state_path = state_dir.join("state.json");
        let state: AgentState = match std::fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", state_path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => AgentState::default(),
            Err(e) => return Err(e),
        };
        let memory = Memory {
            crash: state.crash.clone(),
            ..Default::default()
        };
        let accepted_known = !state.accepted.is_empty();
        Ok(Reconciler {
            host: host.to_string(),
            client,
            conf,
            state_path,
            saved: state.clone(),
            state,
            reload_due: true,
            refusals: BTreeMap::new(),
            accepted_known,
            pending: BTreeMap::new(),
            memory,
            tails: HashMap::new(),
            host_error: None,
            not_ours: None,
            prober: crate::health::Prober::new(),
        })
    }

    /// Notified when a health check's verdict changes (a pass should look).
    pub fn health_changed(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.prober.changed()
    }

    /// Makes the next pass call `reloadConfig` (to catch runtime config drift).
    pub fn request_reload(&mut self) {
        self.reload_due = true;
    }

    pub fn state(&self) -> &AgentState {
        &self.state
    }

    /// Stops what a supervisord that died left running (`plan::plan_reaping`), then records
    /// what supervisord reports now.
    fn stop_orphans(
        &mut self,
        infos: &[ProcessInfo],
        observed: &Observed,
        desired: &Desired,
        now: i64,
        report: &mut PassReport,
    ) {
        let reported: BTreeSet<i64> = infos.iter().filter(|i| i.pid > 0).map(|i| i.pid).collect();
        let pids: BTreeSet<i64> = self
            .state
            .seen_pids
            .keys()
            .chain(self.state.reaping.keys())
            .filter(|pid| !reported.contains(pid))
            .copied()
            .collect();
        // Only PIDs supervisord no longer reports are looked up: a quiet pass reads nothing.
        let alive = crate::procfs::start_times(&pids);
        let steps = plan::plan_reaping(&self.state.seen_pids, &mut self.state.reaping, &reported, &alive, now);
        for step in steps {
            let (pid, signal, name) = match step {
                plan::Reap::Term(pid) => (pid, rustix::process::Signal::TERM, "SIGTERM"),
                plan::Reap::Kill(pid) => (pid, rustix::process::Signal::KILL, "SIGKILL"),
            };
            let namespec = self
                .state
                .reaping
                .get(&pid)
                .map(|r| r.seen.namespec.clone())
                .unwrap_or_default();
            tracing::warn!(host = %self.host, pid, process = %namespec, signal = name, "stopping a process left running by a supervisord that died");
            if let Err(e) = crate::procfs::signal_group(pid, signal) {
                tracing::warn!(pid, error = %e, "cannot signal the orphan");
            } else if name == "SIGTERM" {
                report.corrections.push(Correction::OrphanStopped);
            }
        }
        self.state.seen_pids = plan::seen_processes(observed, desired);
    }

    async fn save_state(&self) -> Result<(), confdir::Error> {
        let bytes = serde_json::to_vec_pretty(&self.state).unwrap_or_default();
        confdir::write_private_off_runtime(self.state_path.clone(), bytes).await
    }

    /// One pass: files, then `reloadConfig`, then groups and processes, then status.
    ///
    /// # Errors
    /// When the conf dir or supervisord cannot be used at all; problems of single programs
    /// are in the returned statuses.
    pub async fn pass(&mut self, desired: &Desired) -> Result<PassReport, PassError> {
        let now = now_ms();
        let mut report = PassReport::default();
        let mut errors: BTreeMap<String, String> = desired.invalid.clone();
        errors.extend(desired.problems.iter().map(|(k, v)| (k.clone(), v.clone())));

        // 1. Files.
        self.conf.read_managed()?;
        let on_disk = self.conf.managed();
        if !self.accepted_known {
            self.state.accepted = on_disk.clone();
            self.accepted_known = true;
        }
        // Taken for the pass (the reload updates it while `self` is borrowed), put back after.
        let mut last_good = std::mem::take(&mut self.state.accepted);
        // A refusal is about one content: a new spec is tried at once.
        self.refusals.retain(|file, r| match managed_file_kind(file) {
            Some(corral_proto::ManagedFile::Program(name)) => {
                desired.programs.get(&name).is_some_and(|p| p.content == r.content)
            }
            Some(corral_proto::ManagedFile::Group(name)) => desired.native.contains_key(&name),
            None => false,
        });
        let conflicts = plan::conflicts(desired, self.conf.foreign());
        let mut want = plan::plan_want(desired, &last_good, &self.refusals, &conflicts, now);
        let actions = plan::file_actions(&want.files, on_disk);
        // Drift: a file on disk is no longer what supervisord last accepted from us.
        let drifted = actions
            .iter()
            .filter(|a| match a {
                FileAction::Write { file, .. } => {
                    last_good.get(file).is_some_and(|good| on_disk.get(file) != Some(good))
                }
                FileAction::Remove { .. } => false,
            })
            .count();
        report
            .corrections
            .extend(std::iter::repeat_n(Correction::ConfFile, drifted));
        self.write_files(&actions).await?;
        if !actions.is_empty() {
            self.reload_due = true;
        }

        // 2. supervisord's verdict, taking out what it refuses.
        if self.reload_due {
            let outcome = self.reload(desired, &mut last_good, &conflicts, now).await;
            want = plan::plan_want(desired, &last_good, &self.refusals, &conflicts, now);
            match outcome {
                Ok(Some(verdict)) => {
                    self.pending = verdict;
                    self.host_error = None;
                    self.reload_due = false;
                }
                Ok(None) => {}
                Err(e) => {
                    self.state.accepted = last_good;
                    return Err(e);
                }
            }
        }
        self.state.accepted = last_good;
        for (name, why) in &want.held {
            errors.insert(name.clone(), why.clone());
            if self.refusals.contains_key(&desired.programs[name].file_name) {
                report.refused.insert(name.clone());
            }
        }
        if let Some(e) = &self.host_error {
            for name in desired.programs.keys() {
                errors.entry(name.clone()).or_insert_with(|| e.clone());
            }
        }

        // 3. Groups and processes (and what their health checks say).
        let probes = self.prober.snapshot();
        let infos = self.client.get_all_process_info().await?;
        let mut observed = observe(&infos);
        self.stop_orphans(&infos, &observed, desired, now, &mut report);
        let loaded: BTreeSet<String> = desired
            .programs
            .values()
            .filter(|p| want.files.contains_key(&p.file_name))
            .map(|p| p.name.clone())
            .collect();
        if desired.programs.values().any(|p| {
            loaded.contains(&p.name)
                && p.namespecs
                    .iter()
                    .any(|ns| !observed.contains_key(ns) && !self.pending.contains_key(plan::group_of(ns)))
        }) {
            // A group Corral wants is not loaded (supervisord restarted from older files):
            // ask supervisord again next pass.
            self.reload_due = true;
        }
        let plan_with = |observed: &Observed, memory: &mut plan::Memory| {
            let input = RuntimeInput {
                desired,
                loaded: &loaded,
                pending: &self.pending,
                observed,
                applied: plan::Applied {
                    markers: &self.state.applied_markers,
                    signals: &self.state.applied_signals,
                },
                probes: &probes,
                now_ms: now,
            };
            plan::plan_runtime(&input, memory)
        };
        // A stop or signal for a process started in the last seconds: has it exec'd yet?
        // Looked up (in /proc) only then, and the pass planned again from the same memory.
        let before = plan::any_recently_started(&observed, now).then(|| self.memory.clone());
        let mut runtime = plan_with(&observed, &mut self.memory);
        if let Some(before) = before {
            let check = plan::signalled_recently_started(&runtime, &observed, now);
            if mark_exec_pending(&mut observed, &check) {
                self.memory = before;
                runtime = plan_with(&observed, &mut self.memory);
            }
        }
        let program_of_target = |target: &str| -> Vec<String> {
            desired
                .programs
                .values()
                .filter(|p| p.groups.iter().any(|g| g == target) || p.namespecs.iter().any(|ns| ns == target))
                .map(|p| p.name.clone())
                .collect()
        };
        let (results, after) = self.execute(&runtime.actions).await?;
        report.deferred.clone_from(&runtime.deferred);
        let mut failed = BTreeSet::new();
        for ((action, why), result) in runtime.actions.iter().zip(results) {
            // Only what was done counts (and asks for a quick look again): an action
            // supervisord keeps refusing waits for the resync, not a tight loop.
            if result.is_ok() {
                report.corrections.push(*why);
            }
            match action {
                Action::Stop(ns) => {
                    report.stopped_by_agent.insert(ns.clone());
                }
                Action::ReplaceGroup(g) | Action::RemoveGroup(g) => {
                    report
                        .stopped_by_agent
                        .extend(observed.iter().filter(|(_, p)| &p.group == g).map(|(ns, _)| ns.clone()));
                }
                _ => {}
            }
            match result {
                Err(e) => {
                    tracing::warn!(host = %self.host, target = action.target(), error = %e, "supervisord refused an action");
                    self.memory.stopping.remove(action.target());
                    for name in program_of_target(action.target()) {
                        failed.insert(name.clone());
                        errors.insert(name, e.to_string());
                    }
                }
                Ok(()) => match action {
                    Action::AddGroup(g) | Action::ReplaceGroup(g) => {
                        self.pending.remove(g);
                        self.state.managed_groups.insert(g.clone());
                        // supervisord loaded the file it last read.
                        match desired
                            .programs
                            .values()
                            .find(|p| p.groups.contains(g))
                            .and_then(|p| self.state.accepted.get(&p.file_name))
                        {
                            Some(content) => {
                                self.state.loaded.insert(g.clone(), content.clone());
                            }
                            None => {
                                self.state.loaded.remove(g);
                            }
                        }
                        // A new config starts its crash-loop count afresh.
                        self.memory.crash.retain(|ns, _| !in_group(ns, g));
                        let running = desired
                            .programs
                            .values()
                            .filter(|p| p.state == corral_proto::resource::DesiredState::Running);
                        for ns in running
                            .flat_map(|p| p.namespecs.iter())
                            .filter(|ns| plan::group_of(ns) == g)
                        {
                            self.memory.started.insert(ns.clone(), now);
                        }
                    }
                    Action::RemoveGroup(g) => {
                        self.pending.remove(g);
                        self.state.managed_groups.remove(g);
                        self.state.loaded.remove(g);
                        self.memory.crash.retain(|ns, _| !in_group(ns, g));
                    }
                    _ => {}
                },
            }
        }
        // Groups Corral wants loaded are its own from now on; removed ones stay its own until
        // they are gone.
        for p in desired.programs.values().filter(|p| loaded.contains(&p.name)) {
            for ns in p.namespecs.iter().filter(|ns| observed.contains_key(*ns)) {
                let g = plan::group_of(ns);
                if !self.state.managed_groups.contains(g) {
                    self.state.managed_groups.insert(g.to_string());
                }
            }
        }
        for p in desired.programs.values() {
            if failed.contains(&p.name) || !loaded.contains(&p.name) || runtime.deferred.contains(&p.name) {
                continue;
            }
            // Written only when they differ: a quiet pass allocates nothing here.
            if self.state.applied_markers.get(&p.name) != Some(&p.restarted_at)
                && !p.groups.iter().any(|g| self.pending.contains_key(g))
            {
                self.state
                    .applied_markers
                    .insert(p.name.clone(), p.restarted_at.clone());
            }
            let signal_id = p.signal_request.as_ref().map(|(_, id)| id);
            if self.state.applied_signals.get(&p.name).map(Option::as_ref) != Some(signal_id) {
                self.state.applied_signals.insert(p.name.clone(), signal_id.cloned());
            }
        }
        // A program runs its current generation once supervisord runs exactly its rendered
        // file (a spec change that renders the same file, like a restart marker, counts too).
        for p in desired.programs.values() {
            if plan::runs_generation(p, &self.state.accepted, &self.pending, &want.held)
                && self.state.applied_generations.get(&p.name) != Some(&p.generation)
            {
                self.state.applied_generations.insert(p.name.clone(), p.generation);
            }
        }
        let keep = |name: &String| desired.programs.contains_key(name);
        self.state.applied_generations.retain(|n, _| keep(n));
        self.state.applied_markers.retain(|n, _| keep(n));
        self.state.applied_signals.retain(|n, _| keep(n));
        if self.state.crash != self.memory.crash {
            self.state.crash = self.memory.crash.clone();
        }
        let (infos, observed) = match after {
            Some(infos) => {
                let observed = observe(&infos);
                (infos, observed)
            }
            None => (infos, observed),
        };
        // What runs after the actions: a process this pass started is known (and saved) even
        // if supervisord dies before the next look.
        self.state.seen_pids = plan::seen_processes(&observed, desired);
        if self.state != self.saved {
            self.save_state().await?;
            self.saved = self.state.clone();
        }

        // 4. Status.
        self.read_stderr_tails(desired, &observed).await;
        let tails: HashMap<String, String> = self
            .tails
            .iter()
            .map(|(ns, (_, _, t))| (ns.clone(), t.clone()))
            .collect();
        report.statuses = plan::statuses(&plan::StatusInput {
            host: &self.host,
            desired,
            observed: &observed,
            errors: &errors,
            generations: &self.state.applied_generations,
            memory: &self.memory,
            stderr_tails: &tails,
            probes: &probes,
            refused: &report.refused,
            waiting: &runtime.waiting,
        });
        // Checked from now on: what runs after this pass's actions.
        self.prober.sync(crate::health::targets(desired, &observed));
        report.recheck_after = plan::next_look(
            desired,
            &observed,
            &mut self.memory,
            self.refusals.values().map(Refusal::retry_at_ms),
            now_ms(),
        );
        report.processes = infos;
        Ok(report)
    }

    async fn write_files(&mut self, actions: &[FileAction]) -> Result<(), confdir::Error> {
        for a in actions {
            match a {
                FileAction::Write { file, content } => self.conf.write(file, content).await?,
                FileAction::Remove { file } => self.conf.remove(file).await?,
            }
        }
        Ok(())
    }

    /// `reloadConfig` until supervisord accepts the conf dir: each managed file it refuses is
    /// found (from its error, or by trying the files this pass changed one at a time), held
    /// back (its last accepted version restored, or removed) and recorded as refused, so one
    /// bad program never blocks the others.
    ///
    /// Returns the pending group changes, or `None` when supervisord refuses something that
    /// is not Corral's (then `host_error` says what, and nothing of Corral's is blamed).
    async fn reload(
        &mut self,
        desired: &Desired,
        last_good: &mut BTreeMap<String, String>,
        conflicts: &BTreeMap<String, String>,
        now: i64,
    ) -> Result<Option<BTreeMap<String, GroupChange>>, PassError> {
        let mut want = plan::plan_want(desired, last_good, &self.refusals, conflicts, now);
        for _ in 0..=want.files.len() + 1 {
            let message = match self.client.reload_config().await {
                Ok(r) => {
                    *last_good = want.files.clone();
                    let loaded: BTreeSet<String> = desired
                        .programs
                        .values()
                        .filter(|p| want.files.contains_key(&p.file_name))
                        .flat_map(|p| p.groups.iter().cloned())
                        .collect();
                    let state_only = plan::state_only_groups(desired, last_good, &self.state.loaded);
                    return Ok(Some(plan::pending_changes(
                        &r.added,
                        &r.changed,
                        &r.removed,
                        &loaded,
                        &self.state.managed_groups,
                        &state_only,
                    )));
                }
                Err(supervisor::Error::Fault {
                    code: FaultCode::CantReread,
                    message,
                    ..
                }) => message,
                Err(e) => return Err(e.into()),
            };
            let paths: BTreeMap<String, Vec<String>> = want
                .files
                .keys()
                .map(|f| {
                    let path = self.conf.file(f);
                    let mut paths = vec![path.display().to_string()];
                    if let Ok(real) = std::fs::canonicalize(&path) {
                        paths.push(real.display().to_string());
                    }
                    (f.clone(), paths)
                })
                .collect();
            let culprit = match plan::culprit(&message, &paths) {
                Some(f) => Some(f),
                // Trying the files out once per content is enough: while the conf dir
                // stays as it is, the answer stays the same.
                None if self.not_ours.as_ref() == Some(&want.files) => None,
                None => {
                    let found = self.isolate(&want.files, last_good).await?;
                    if found.is_none() {
                        self.not_ours = Some(want.files.clone());
                    }
                    found
                }
            };
            let Some(file) = culprit else {
                tracing::warn!(host = %self.host, error = %message, "supervisord cannot re-read its configuration");
                self.host_error = Some(format!("supervisord cannot re-read its configuration: {message}"));
                return Ok(None);
            };
            let content = want.files.get(&file).cloned().unwrap_or_default();
            tracing::warn!(host = %self.host, file = %file, "supervisord refused a managed file");
            let why = format!(
                "supervisord refused the rendered config on this host (the agent took the file out again; tried again when the spec changes or after a backoff): {message}"
            );
            if last_good.get(&file) == Some(&content) {
                // The version it accepted before is refused now (the host changed): nothing
                // of this program's can stay.
                last_good.remove(&file);
            }
            let desired_content = desired
                .programs
                .values()
                .find(|p| p.file_name == file)
                .map_or(content, |p| p.content.clone());
            let count = self
                .refusals
                .get(&file)
                .filter(|r| r.content == desired_content)
                .map_or(1, |r| r.count + 1);
            self.refusals.insert(
                file,
                Refusal {
                    content: desired_content,
                    why,
                    at_ms: now,
                    count,
                },
            );
            want = plan::plan_want(desired, last_good, &self.refusals, conflicts, now);
            let on_disk = self.conf.read_managed()?.clone();
            self.write_files(&plan::file_actions(&want.files, &on_disk)).await?;
        }
        self.host_error = Some("supervisord keeps refusing the configuration".to_string());
        Ok(None)
    }

    /// Finds the file supervisord refuses when its error names none of Corral's: puts back
    /// the last accepted version of every file this pass changed, then tries them one at a
    /// time (native group files last: they name their members). `None` if the conf dir is
    /// refused even without this pass's changes, so the culprit is not Corral's.
    async fn isolate(
        &mut self,
        want: &BTreeMap<String, String>,
        last_good: &BTreeMap<String, String>,
    ) -> Result<Option<String>, PassError> {
        let mut changed: Vec<&String> = want.keys().filter(|f| last_good.get(*f) != want.get(*f)).collect();
        if changed.is_empty() {
            return Ok(None);
        }
        changed.sort_by_key(|f| {
            (
                matches!(managed_file_kind(f), Some(corral_proto::ManagedFile::Group(_))),
                *f,
            )
        });
        async fn revert(
            conf: &mut ConfDir,
            last_good: &BTreeMap<String, String>,
            f: &str,
        ) -> Result<(), confdir::Error> {
            match last_good.get(f) {
                Some(good) => conf.write(f, good).await,
                None => conf.remove(f).await,
            }
        }
        for f in &changed {
            revert(&mut self.conf, last_good, f).await?;
        }
        if self.client.reload_config().await.is_err() {
            // Not this pass's changes: put them back, they are what Corral wants.
            for f in &changed {
                self.conf.write(f, &want[*f]).await?;
            }
            return Ok(None);
        }
        for f in changed {
            self.conf.write(f, &want[f]).await?;
            if self.client.reload_config().await.is_err() {
                revert(&mut self.conf, last_good, f).await?;
                return Ok(Some(f.clone()));
            }
        }
        Ok(None)
    }

    /// Carries out a pass's actions in one `system.multicall` request: supervisord runs them
    /// in order, none of them waits, and one connection serves them all (fifty concurrent
    /// calls would be fifty connections). Each action's result is its own; a fault that means
    /// "already so" is success (already started, not running, already added, no such group).
    /// The same request ends with `getAllProcessInfo`: the processes as the actions left them
    /// (`None` when there was nothing to do).
    ///
    /// # Errors
    /// When the request as a whole fails (supervisord unreachable).
    async fn execute(&self, actions: &[(Action, Correction)]) -> Result<Executed, PassError> {
        use dxr::Value;
        if actions.is_empty() {
            return Ok((Vec::new(), None));
        }
        let s = |v: &str| Value::String(v.to_string());
        // (method, params, the fault that means done) per call; ReplaceGroup makes two.
        let mut calls: Vec<(&str, Vec<Value>, FaultCode)> = Vec::new();
        let mut first_call = Vec::with_capacity(actions.len());
        for (action, _) in actions {
            first_call.push(calls.len());
            match action {
                Action::AddGroup(g) => calls.push(("supervisor.addProcessGroup", vec![s(g)], FaultCode::AlreadyAdded)),
                Action::RemoveGroup(g) => calls.push(("supervisor.removeProcessGroup", vec![s(g)], FaultCode::BadName)),
                Action::ReplaceGroup(g) => {
                    calls.push(("supervisor.removeProcessGroup", vec![s(g)], FaultCode::BadName));
                    calls.push(("supervisor.addProcessGroup", vec![s(g)], FaultCode::AlreadyAdded));
                }
                Action::Stop(ns) => calls.push((
                    "supervisor.stopProcess",
                    vec![s(ns), Value::Boolean(false)],
                    FaultCode::NotRunning,
                )),
                Action::Start(ns) => calls.push((
                    "supervisor.startProcess",
                    vec![s(ns), Value::Boolean(false)],
                    FaultCode::AlreadyStarted,
                )),
                // A process that stopped meanwhile has nothing to receive the signal.
                Action::Signal(ns, sig) => {
                    calls.push(("supervisor.signalProcess", vec![s(ns), s(sig)], FaultCode::NotRunning))
                }
            }
        }
        let request: Vec<(&str, Vec<Value>)> = calls.iter().map(|(m, p, _)| (*m, p.clone())).collect();
        let (answers, after) = self.client.multicall_then_observe(&request).await?;
        let mut answers: Vec<Option<Result<(), supervisor::Error>>> = answers
            .into_iter()
            .zip(&calls)
            .map(|(r, (_, _, fine))| Some(tolerate(r, *fine)))
            .collect();
        let mut take = |i: usize| {
            answers.get_mut(i).and_then(Option::take).unwrap_or_else(|| {
                Err(supervisor::Error::Decode {
                    method: "system.multicall".into(),
                    detail: format!("no answer for call {i}"),
                })
            })
        };
        let mut out = Vec::with_capacity(actions.len());
        for ((action, _), i) in actions.iter().zip(first_call) {
            let r = match action {
                // The add counts only if the removal worked (else it "succeeds" as already
                // added, with the old config still loaded).
                Action::ReplaceGroup(_) => {
                    let removed = take(i);
                    let added = take(i + 1);
                    removed.and(added)
                }
                _ => take(i),
            };
            out.push(r);
        }
        Ok((out, Some(after)))
    }

    /// Reads the stderr tail of each failing process of Corral's once per failure (a new
    /// start time or state), so a crash loop costs one read per crash, not one per pass.
    async fn read_stderr_tails(&mut self, desired: &Desired, observed: &Observed) {
        let failing: Vec<(&String, &Proc)> = desired
            .programs
            .values()
            .flat_map(|p| p.namespecs.iter())
            .filter_map(|ns| Some((ns, observed.get(ns)?)))
            .filter(|(_, p)| plan::is_failing(p))
            .collect();
        self.tails.retain(|ns, _| failing.iter().any(|(f, _)| *f == ns));
        for (ns, p) in failing {
            if self
                .tails
                .get(ns)
                .is_some_and(|(start, state, _)| *start == p.start && *state == p.statename)
            {
                continue;
            }
            let read = |stream| crate::logs::read_piece(&self.client, ns, stream, 0, None, STDERR_TAIL_BYTES);
            // With redirect_stderr, its stderr is in its stdout log.
            let piece = match read(LogStream::Stderr).await {
                Err(_) => read(LogStream::Stdout).await,
                ok => ok,
            };
            let text = match piece {
                Ok(piece) => last_lines(&crate::logs::text_of(&piece.data), 10),
                Err(_) => String::new(),
            };
            self.tails.insert(ns.clone(), (p.start, p.statename.clone(), text));
        }
    }
}

/// The last `n` lines of `text` (a tail read from the middle of a line drops that line).
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    lines[from..].join("\n")
}

fn in_group(ns: &str, group: &str) -> bool {
    ns == group || ns.strip_prefix(group).is_some_and(|r| r.starts_with(':'))
}

/// Treats the fault `fine` as success: the call's goal already holds (already started,
/// not running, already added, no such group).
fn tolerate<T>(r: Result<T, supervisor::Error>, fine: FaultCode) -> Result<(), supervisor::Error> {
    match r {
        Err(e) if e.fault() == Some(fine) => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Marks those of `check` that have not exec'd their command yet: the child still runs
/// supervisord's own code, so its command line is still supervisord's (its parent's). A
/// process whose `/proc` cannot be read (supervisord in another pid namespace) is taken as
/// exec'd, as before this check. Returns whether any was marked.
pub fn mark_exec_pending(observed: &mut Observed, check: &BTreeSet<String>) -> bool {
    let mut any = false;
    for ns in check {
        if let Some(p) = observed.get_mut(ns)
            && p.pid > 0
        {
            p.exec_pending = not_yet_exec(p.pid);
            any |= p.exec_pending;
        }
    }
    any
}

/// Whether `pid` runs its parent's command line (a forked child that has not exec'd).
fn not_yet_exec(pid: i64) -> bool {
    let read = |path: String| std::fs::read(path).ok();
    let Some(stat) = read(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ')' ends it.
    let Some(ppid) = stat
        .iter()
        .rposition(|b| *b == b')')
        .and_then(|end| std::str::from_utf8(&stat[end + 1..]).ok())
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|ppid| ppid.parse::<u32>().ok())
    else {
        return false;
    };
    match (
        read(format!("/proc/{pid}/cmdline")),
        read(format!("/proc/{ppid}/cmdline")),
    ) {
        (Some(child), Some(parent)) => !child.is_empty() && child == parent,
        _ => false,
    }
}

/// supervisord's processes as the plan sees them.
pub fn observe(infos: &[ProcessInfo]) -> Observed {
    infos
        .iter()
        .map(|i| {
            let state = match i.state {
                ProcessState::Stopped => ProcState::Stopped,
                ProcessState::Starting => ProcState::Starting,
                ProcessState::Running => ProcState::Running,
                ProcessState::Backoff => ProcState::Backoff,
                ProcessState::Stopping => ProcState::Stopping,
                ProcessState::Exited => ProcState::Exited,
                ProcessState::Fatal => ProcState::Fatal,
                ProcessState::Unknown => ProcState::Unknown,
            };
            (
                i.namespec(),
                Proc {
                    group: i.group.clone(),
                    state,
                    pid: i.pid,
                    start: i.start,
                    exit_status: i.exitstatus,
                    spawn_error: i.spawnerr.clone(),
                    description: i.description.clone(),
                    statename: i.statename.clone(),
                    exec_pending: false,
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_forked_but_not_yet_exec_d_is_marked_as_such() -> Result<(), Box<dyn std::error::Error>> {
        use std::io::BufRead as _;
        // Python forks twice: one child stays python (as supervisord's child does before its
        // exec), the other exec's sleep. The parent prints both pids.
        let script = "import os, time\n\
                      a = os.fork()\n\
                      if a == 0:\n    time.sleep(20); os._exit(0)\n\
                      b = os.fork()\n\
                      if b == 0:\n    os.execv('/bin/sleep', ['sleep', '20'])\n\
                      time.sleep(0.2); print(a, b, flush=True); time.sleep(20)\n";
        let mut parent = std::process::Command::new("python3")
            .args(["-c", script])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        std::io::BufReader::new(parent.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
        let pids: Vec<i64> = line.split_whitespace().filter_map(|p| p.parse().ok()).collect();
        let proc = |pid: i64, state: ProcState, start: i64| Proc {
            group: "g".into(),
            state,
            pid,
            start,
            exit_status: 0,
            spawn_error: String::new(),
            description: String::new(),
            statename: String::new(),
            exec_pending: false,
        };
        let now = 1_000_000;
        let mut observed: Observed = [
            ("forked".to_string(), proc(pids[0], ProcState::Starting, now)),
            ("exec".to_string(), proc(pids[1], ProcState::Starting, now)),
            ("gone".to_string(), proc(999_999_999, ProcState::Starting, now)),
            // Not asked about.
            ("other".to_string(), proc(pids[0], ProcState::Running, now)),
        ]
        .into();
        let check: BTreeSet<String> = ["forked", "exec", "gone"].map(String::from).into();
        assert!(mark_exec_pending(&mut observed, &check));
        for pid in pids.iter().chain([&i64::from(parent.id())]) {
            let _ = std::process::Command::new("kill").arg(pid.to_string()).status();
        }
        let _ = parent.wait();
        let marked: BTreeMap<&str, bool> = observed.iter().map(|(n, p)| (n.as_str(), p.exec_pending)).collect();
        assert_eq!(
            marked,
            [("exec", false), ("forked", true), ("gone", false), ("other", false)].into()
        );
        Ok(())
    }
}

use super::*;
use corral_proto::fleet::NativeGroup as AssignedGroup;
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

fn in_shop(mut a: Assignment) -> Assignment {
    a.native_group = Some(AssignedGroup {
        name: "shop".into(),
        priority: Some(10),
    });
    a
}

fn two_workers(s: &mut ProgramSpec) {
    s.numprocs = Some(2);
    s.process_name = Some("%(program_name)s_%(process_num)d".into());
}

#[test]
fn desired_renders_programs_and_records_native_groups_with_this_hosts_members_only() {
    let d = desired(
        &assignments(vec![in_shop(assignment("api", |_| {})), assignment("w", two_workers)]),
        "h1",
    );
    assert_eq!(d.programs["api"].groups, ["shop"]);
    assert_eq!(d.programs["api"].namespecs, ["shop:api"]);
    // One supervisord program and group per process, so scaling restarts no other process.
    assert_eq!(d.programs["w"].namespecs, ["w_0", "w_1"]);
    assert_eq!(d.programs["w"].groups, ["w_0", "w_1"]);
    assert_eq!(d.programs["w"].generation, 3);
    assert_eq!(d.native["shop"].members, ["api"]);
    let want = plan_want(&d, &BTreeMap::new(), &BTreeMap::new(), &BTreeMap::new(), 0);
    assert_eq!(
        want.files.keys().collect::<Vec<_>>(),
        [
            "corral-group-shop.conf",
            "corral-program-api.conf",
            "corral-program-w.conf"
        ]
    );
    assert!(want.files["corral-group-shop.conf"].contains("programs=api\n"));
    assert!(want.held.is_empty());
}

#[test]
fn two_programs_claiming_one_supervisord_name_refuse_the_later() {
    let d = desired(
        &assignments(vec![assignment("w", two_workers), assignment("w_1", |_| {})]),
        "h1",
    );
    assert!(d.programs.contains_key("w"));
    assert!(
        d.invalid["w_1"].contains("[program:w_1] is also a process of program \"w\""),
        "{d:#?}"
    );
}

#[test]
fn desired_refuses_an_invalid_program_without_rendering_it() {
    let d = desired(
        &assignments(vec![assignment("bad", |s| s.command = "a\nb".into())]),
        "h1",
    );
    assert!(d.programs.is_empty());
    assert!(d.invalid["bad"].contains("line break"));
}

fn refusal(content: &str, at_ms: i64, count: u32) -> Refusal {
    Refusal {
        content: content.into(),
        why: "refused: bad user".into(),
        at_ms,
        count,
    }
}

#[test]
fn a_refused_file_keeps_its_last_accepted_version_until_its_spec_changes_or_its_backoff_ends() {
    let d = desired(
        &assignments(vec![
            assignment("web", |s| s.user = Some("nosuchuser".into())),
            assignment("new", |s| s.user = Some("nosuchuser".into())),
        ]),
        "h1",
    );
    let (web, new) = (&d.programs["web"], &d.programs["new"]);
    let good: BTreeMap<String, String> = [(web.file_name.clone(), "accepted before".to_string())].into();
    let refusals: BTreeMap<String, Refusal> = [
        (web.file_name.clone(), refusal(&web.content, 1_000, 1)),
        (new.file_name.clone(), refusal(&new.content, 1_000, 1)),
    ]
    .into();
    let none = BTreeMap::new();
    // Within the backoff: web keeps its accepted version, new stays away; both held.
    let want = plan_want(&d, &good, &refusals, &none, 1_000 + 29_999);
    assert_eq!(want.files.len(), 1);
    assert_eq!(want.files[&web.file_name], "accepted before");
    assert_eq!(want.held.keys().collect::<Vec<_>>(), ["new", "web"]);
    assert!(want.held["web"].contains("bad user"));
    // The backoff over, the desired content is tried again.
    let want = plan_want(&d, &good, &refusals, &none, 1_000 + 30_000);
    assert_eq!(want.files[&web.file_name], web.content);
    assert!(want.held.is_empty());
    // A new spec is tried at once.
    let changed: BTreeMap<String, Refusal> = [(web.file_name.clone(), refusal("an older spec", 1_000, 1))].into();
    let want = plan_want(&d, &good, &changed, &none, 1_001);
    assert_eq!(want.files[&web.file_name], web.content);
}

#[test]
fn refusals_back_off_from_30_seconds_doubling_to_5_minutes() {
    let waits: Vec<i64> = (1..=6).map(|n| refusal("x", 0, n).retry_at_ms() / 1000).collect();
    assert_eq!(waits, [30, 60, 120, 240, 300, 300]);
}

#[test]
fn a_native_group_names_only_the_members_on_disk() {
    let d = desired(
        &assignments(vec![
            in_shop(assignment("api", |_| {})),
            in_shop(assignment("bad", |s| s.user = Some("nosuchuser".into()))),
        ]),
        "h1",
    );
    let bad = &d.programs["bad"];
    let refusals: BTreeMap<String, Refusal> = [(bad.file_name.clone(), refusal(&bad.content, 0, 1))].into();
    let want = plan_want(&d, &BTreeMap::new(), &refusals, &BTreeMap::new(), 10);
    assert!(want.files["corral-group-shop.conf"].contains("programs=api\n"));
    assert!(!want.files.contains_key(&bad.file_name));
    // With every member held, no group file at all.
    let refusals: BTreeMap<String, Refusal> = d
        .programs
        .values()
        .map(|p| (p.file_name.clone(), refusal(&p.content, 0, 1)))
        .collect();
    let want = plan_want(&d, &BTreeMap::new(), &refusals, &BTreeMap::new(), 10);
    assert!(want.files.is_empty());
}

#[test]
fn names_defined_by_other_files_are_conflicts_and_held() {
    let d = desired(
        &assignments(vec![
            assignment("p1", |_| {}),
            assignment("p2", |_| {}),
            assignment("p3", |_| {}),
            in_shop(assignment("api", |_| {})),
            assignment("fine", |_| {}),
        ]),
        "h1",
    );
    let foreign = Foreign {
        files: ["corral-program-p2.conf".to_string()].into(),
        sections: [
            ("program:p1".to_string(), "legacy.conf".to_string()),
            ("group:p3".to_string(), "legacy.conf".to_string()),
            ("group:shop".to_string(), "other.conf".to_string()),
            ("program:unrelated".to_string(), "legacy.conf".to_string()),
        ]
        .into(),
    };
    let c = conflicts(&d, &foreign);
    assert_eq!(c.keys().collect::<Vec<_>>(), ["p1", "p2", "p3", "shop"]);
    assert_eq!(c["p1"], "conflict: [program:p1] is also defined in legacy.conf");
    assert!(c["p2"].contains("without Corral's header"));
    let good: BTreeMap<String, String> = [("corral-program-p1.conf".to_string(), "old".to_string())].into();
    let want = plan_want(&d, &good, &BTreeMap::new(), &c, 0);
    assert_eq!(want.files["corral-program-p1.conf"], "old");
    assert!(!want.files.contains_key("corral-program-p2.conf"));
    assert!(!want.files.contains_key("corral-group-shop.conf"));
    assert_eq!(want.held.keys().collect::<Vec<_>>(), ["api", "p1", "p2", "p3"]);
    assert!(want.files.contains_key("corral-program-fine.conf"));
}

#[track_caller]
fn check_files(want: &[(&str, &str)], observed: &[(&str, &str)], expect: &[FileAction]) {
    let m = |l: &[(&str, &str)]| l.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    assert_eq!(file_actions(&m(want), &m(observed)), expect);
}

#[test]
fn files_are_written_when_missing_or_different_and_removed_when_unwanted() {
    let w = |f: &str, c: &str| FileAction::Write {
        file: f.into(),
        content: c.into(),
    };
    check_files(&[("a", "1")], &[("a", "1")], &[]);
    check_files(&[("a", "1")], &[], &[w("a", "1")]);
    check_files(&[("a", "1")], &[("a", "edited by hand")], &[w("a", "1")]);
    check_files(&[], &[("old", "x")], &[FileAction::Remove { file: "old".into() }]);
}

#[track_caller]
fn check_culprit(message: &str, expect: Option<&str>) {
    let files: BTreeMap<String, Vec<String>> = [
        (
            "corral-program-bad.conf",
            vec!["/tmp/link/corral-program-bad.conf", "/tmp/real/corral-program-bad.conf"],
        ),
        ("corral-program-api.conf", vec!["/tmp/link/corral-program-api.conf"]),
        ("corral-group-shop.conf", vec!["/tmp/link/corral-group-shop.conf"]),
    ]
    .into_iter()
    .map(|(f, p)| (f.to_string(), p.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(culprit(message, &files).as_deref(), expect, "{message}");
}

#[test]
fn the_culprit_is_found_by_path_canonical_path_section_or_group_member() {
    check_culprit(
        "Invalid user name nosuchuser in section 'program:bad' (file: '/tmp/link/corral-program-bad.conf')",
        Some("corral-program-bad.conf"),
    );
    // supervisord resolved the conf dir through a symlink.
    check_culprit(
        "The directory named as part of the path /nope/x.log does not exist in section 'program:x' (file: '/tmp/real/corral-program-bad.conf')",
        Some("corral-program-bad.conf"),
    );
    // A path that is none of ours, but a section that is.
    check_culprit(
        "Invalid user name u in section 'program:api' (file: '/elsewhere/api.conf')",
        Some("corral-program-api.conf"),
    );
    // A native group naming a member supervisord does not know: the member is at fault.
    check_culprit(
        "[group:shop] names unknown program or fcgi-program bad",
        Some("corral-program-bad.conf"),
    );
    check_culprit(
        "[group:shop] names unknown program or fcgi-program gone",
        Some("corral-group-shop.conf"),
    );
    check_culprit(
        "File contains no section headers.\nfile: '/etc/other.conf', line: 1",
        None,
    );
    check_culprit(
        "Invalid user name u in section 'program:theirs' (file: '/etc/supervisor/conf.d/theirs.conf')",
        None,
    );
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn pending_changes_follow_supervisords_verdict_for_corrals_groups_only() {
    use GroupChange::*;
    let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let got = pending_changes(
        &v(&["new", "theirs-new"]),
        &v(&["web", "theirs"]),
        &v(&["gone", "theirs-gone"]),
        &set(&["new", "web"]),
        &set(&["web", "gone"]),
        &set(&[]),
    );
    assert_eq!(
        got,
        [
            ("gone".to_string(), Remove),
            ("new".to_string(), Add),
            ("web".to_string(), Replace)
        ]
        .into()
    );
    // A change of state alone is not a replacement.
    let got = pending_changes(&[], &v(&["web"]), &[], &set(&["web"]), &set(&["web"]), &set(&["web"]));
    assert!(got.is_empty(), "{got:?}");
}

#[test]
fn a_change_of_desired_state_alone_replaces_no_group() {
    let render = |state: DesiredState, command: &str| {
        let command = command.to_string();
        desired(
            &assignments(vec![assignment("web", move |s| {
                s.state = state;
                s.command = command;
            })]),
            "h1",
        )
    };
    let running = render(DesiredState::Running, "/bin/sleep 1000");
    let stopped = render(DesiredState::Stopped, "/bin/sleep 1000");
    let changed = render(DesiredState::Stopped, "/bin/sleep 1001");
    let file = |d: &Desired| {
        let p = &d.programs["web"];
        [(p.file_name.clone(), p.content.clone())].into()
    };
    let as_loaded: BTreeMap<String, String> = [("web".to_string(), running.programs["web"].content.clone())].into();
    assert!(only_autostart_differs(
        &running.programs["web"].content,
        &stopped.programs["web"].content
    ));
    assert_eq!(
        state_only_groups(&stopped, &file(&stopped), &as_loaded)
            .iter()
            .collect::<Vec<_>>(),
        ["web"]
    );
    // Anything else changed with it: replaced.
    assert!(state_only_groups(&changed, &file(&changed), &as_loaded).is_empty());
    // Unchanged, or loaded by someone else (not known): not for this rule.
    assert!(state_only_groups(&running, &file(&running), &as_loaded).is_empty());
    assert!(state_only_groups(&stopped, &file(&stopped), &BTreeMap::new()).is_empty());
}

fn proc(group: &str, state: ProcState) -> Proc {
    Proc {
        group: group.into(),
        state,
        pid: if state.is_active() { 42 } else { 0 },
        start: 0,
        exit_status: 0,
        spawn_error: String::new(),
        description: String::new(),
        statename: format!("{state:?}").to_uppercase(),
        exec_pending: false,
    }
}

/// `statuses`' inputs with nothing in them: a test names only what it sets
/// (`StatusInput { probes, ..EMPTY.input(&d, &obs) }`).
#[derive(Default)]
struct Empty {
    errors: BTreeMap<String, String>,
    generations: BTreeMap<String, u64>,
    memory: Memory,
    tails: HashMap<String, String>,
    probes: Probes,
    refused: BTreeSet<String>,
    waiting: BTreeMap<String, String>,
}

static EMPTY: std::sync::LazyLock<Empty> = std::sync::LazyLock::new(Empty::default);

impl Empty {
    fn input<'a>(&'a self, desired: &'a Desired, observed: &'a Observed) -> StatusInput<'a> {
        StatusInput {
            host: "h1",
            desired,
            observed,
            errors: &self.errors,
            generations: &self.generations,
            memory: &self.memory,
            stderr_tails: &self.tails,
            probes: &self.probes,
            refused: &self.refused,
            waiting: &self.waiting,
        }
    }
}

fn observed(list: &[(&str, ProcState)]) -> Observed {
    list.iter()
        .map(|(ns, s)| {
            let group = ns.split(':').next().unwrap_or(ns);
            (ns.to_string(), proc(group, *s))
        })
        .collect()
}

struct World {
    desired: Desired,
    loaded: BTreeSet<String>,
    pending: BTreeMap<String, GroupChange>,
    markers: BTreeMap<String, Option<String>>,
    signals: BTreeMap<String, Option<String>>,
    probes: Probes,
}

impl World {
    fn new(list: Vec<Assignment>) -> World {
        let desired = desired(&assignments(list), "h1");
        let loaded = desired.programs.keys().cloned().collect();
        World {
            desired,
            loaded,
            pending: BTreeMap::new(),
            markers: BTreeMap::new(),
            signals: BTreeMap::new(),
            probes: Probes::new(),
        }
    }

    fn run(&self, observed: &Observed, memory: &mut Memory, now_ms: i64) -> RuntimePlan {
        let input = RuntimeInput {
            desired: &self.desired,
            loaded: &self.loaded,
            pending: &self.pending,
            observed,
            applied: Applied {
                markers: &self.markers,
                signals: &self.signals,
            },
            probes: &self.probes,
            now_ms,
        };
        plan_runtime(&input, memory)
    }

    fn plan(&self, observed: &Observed, memory: &mut Memory, now_ms: i64) -> Vec<Action> {
        self.run(observed, memory, now_ms)
            .actions
            .into_iter()
            .map(|(a, _)| a)
            .collect()
    }
}

#[test]
fn processes_are_started_and_stopped_to_match_the_desired_state() {
    use Action::*;
    use ProcState::*;
    let w = World::new(vec![
        assignment("up", |_| {}),
        assignment("down", |s| s.state = DesiredState::Stopped),
        assignment("fine", |_| {}),
        assignment("done", |_| {}),
        assignment("pending", |_| {}),
    ]);
    let mut m = Memory::default();
    let obs = observed(&[
        ("up", Stopped),
        ("down", Backoff),
        ("fine", Running),
        ("done", Exited),
        ("other", Stopped),
    ]);
    // EXITED is supervisord's autorestart decision: left alone.
    assert_eq!(w.plan(&obs, &mut m, 0), [Stop("down".into()), Start("up".into())]);
    assert_eq!(m.stopping.keys().collect::<Vec<_>>(), ["down"]);
    assert_eq!(m.started.keys().collect::<Vec<_>>(), ["up"]);
    let obs = observed(&[("up", Starting), ("down", Stopping), ("fine", Running)]);
    assert_eq!(w.plan(&obs, &mut m, 5), []);
}

#[test]
fn a_program_not_loaded_gets_no_action() {
    let mut w = World::new(vec![assignment("held", |_| {})]);
    w.loaded.clear();
    let obs = observed(&[("held", ProcState::Stopped)]);
    assert_eq!(w.plan(&obs, &mut Memory::default(), 0), []);
}

#[test]
fn a_changed_group_is_stopped_without_waiting_then_replaced_once_nothing_runs() {
    use Action::*;
    use ProcState::*;
    let mut w = World::new(vec![assignment("w", two_workers), assignment("other", |_| {})]);
    w.pending.insert("w".into(), GroupChange::Replace);
    let mut m = Memory::default();
    let obs = observed(&[("w:w_0", Running), ("w:w_1", Fatal), ("other", Stopped)]);
    // Only the running one is stopped; its FATAL sibling gets no crash-loop start; another
    // program is started in the same pass.
    assert_eq!(w.plan(&obs, &mut m, 0), [Stop("w:w_0".into()), Start("other".into())]);
    let obs = observed(&[("w:w_0", Stopping), ("w:w_1", Fatal), ("other", Starting)]);
    assert_eq!(w.plan(&obs, &mut m, 50), []);
    let obs = observed(&[("w:w_0", Stopped), ("w:w_1", Fatal), ("other", Running)]);
    assert_eq!(w.plan(&obs, &mut m, 100), [ReplaceGroup("w".into())]);
    assert!(m.stopping.is_empty());

    w.pending = [
        ("gone".to_string(), GroupChange::Remove),
        ("new".to_string(), GroupChange::Add),
    ]
    .into();
    let obs = observed(&[("gone", Stopping)]);
    assert_eq!(w.plan(&obs, &mut m, 0), [AddGroup("new".into())]);
    let obs = observed(&[("gone", Exited)]);
    assert_eq!(
        w.plan(&obs, &mut m, 0),
        [RemoveGroup("gone".into()), AddGroup("new".into())]
    );
}

#[test]
fn a_moved_restart_marker_stops_then_the_stopped_processes_start() {
    use Action::*;
    use ProcState::*;
    let mut w = World::new(vec![assignment("web", |s| s.restarted_at = Some("t2".into()))]);
    let mut m = Memory::default();
    let running = observed(&[("web", Running)]);
    // First sight of a program (nothing applied yet) is not a restart.
    assert_eq!(w.plan(&running, &mut m, 0), []);
    w.markers.insert("web".into(), Some("t2".into()));
    assert_eq!(w.plan(&running, &mut m, 0), []);
    w.markers.insert("web".into(), Some("t1".into()));
    assert_eq!(w.plan(&running, &mut m, 0), [Stop("web".into())]);
    // The marker is applied; the stopped process is started by the desired state.
    w.markers.insert("web".into(), Some("t2".into()));
    assert_eq!(w.plan(&observed(&[("web", Stopping)]), &mut m, 10), []);
    assert_eq!(
        w.plan(&observed(&[("web", Stopped)]), &mut m, 20),
        [Start("web".into())]
    );
    // A marker that disappears restarts nothing.
    let w = World {
        markers: [("web".to_string(), Some("t1".to_string()))].into(),
        ..World::new(vec![assignment("web", |_| {})])
    };
    assert_eq!(w.plan(&running, &mut m, 0), []);
}

#[test]
fn a_new_signal_request_signals_running_processes_once() {
    use Action::*;
    use ProcState::*;
    let mut w = World::new(vec![assignment("w", |s| {
        two_workers(s);
        s.signal_request = Some(corral_proto::SignalRequest {
            signal: "HUP".into(),
            id: "2".into(),
        });
    })]);
    let obs = observed(&[("w_0", Running), ("w_1", Stopped)]);
    let mut m = Memory::default();
    w.signals.insert("w".into(), Some("1".into()));
    assert_eq!(
        w.plan(&obs, &mut m, 0),
        [Signal("w_0".into(), "HUP".into()), Start("w_1".into())]
    );
    w.signals.insert("w".into(), Some("2".into()));
    assert_eq!(w.plan(&obs, &mut m, 0), [Start("w_1".into())]);
    w.signals.clear();
    assert_eq!(w.plan(&obs, &mut m, 0), [Start("w_1".into())]);
}

#[test]
fn fatal_processes_are_started_again_with_a_capped_exponential_backoff() {
    use ProcState::*;
    let w = World::new(vec![assignment("crashy", |s| {
        s.crash_loop = Some(corral_proto::CrashLoopSpec {
            initial_delay_secs: Some(10),
            max_delay_secs: Some(35),
            reset_after_secs: Some(60),
            ..Default::default()
        });
    })]);
    let fatal = observed(&[("crashy", Fatal)]);
    let mut m = Memory::default();
    let start = vec![Action::Start("crashy".into())];
    let mut t = 1_000_000;
    let mut starts = Vec::new();
    // Follow the schedule: each FATAL is first seen, then started when its delay is over.
    for _ in 0..4 {
        assert_eq!(w.plan(&fatal, &mut m, t), []);
        let at = m.crash["crashy"].next_retry_ms.expect("scheduled");
        assert_eq!(w.plan(&fatal, &mut m, at - 1), []);
        assert_eq!(w.plan(&fatal, &mut m, at), start);
        starts.push((at - t) / 1000);
        t = at + 2_000;
    }
    assert_eq!(starts, [10, 20, 35, 35]);
    assert_eq!(m.crash["crashy"].attempts, 4);
    // Up for less than reset_after: the count stays.
    let mut up = observed(&[("crashy", Running)]);
    if let Some(p) = up.get_mut("crashy") {
        p.start = t / 1000;
    }
    w.plan(&up, &mut m, t + 59_000);
    assert_eq!(m.crash["crashy"].attempts, 4);
    // Up for reset_after: forgotten, the next FATAL waits the initial delay again.
    w.plan(&up, &mut m, t + 60_000);
    assert!(m.crash.is_empty());
    assert_eq!(w.plan(&fatal, &mut m, t), []);
    assert_eq!(m.crash["crashy"].next_retry_ms, Some(t + 10_000));
}

#[test]
fn fatal_stays_final_when_the_policy_says_so_and_for_stopped_programs() {
    let w = World::new(vec![
        assignment("final", |s| {
            s.crash_loop = Some(corral_proto::CrashLoopSpec {
                restart: Some(false),
                ..Default::default()
            })
        }),
        assignment("off", |s| s.state = DesiredState::Stopped),
    ]);
    let fatal = observed(&[("final", ProcState::Fatal), ("off", ProcState::Fatal)]);
    let mut m = Memory::default();
    for t in [0, 3_600_000, 86_400_000] {
        assert_eq!(w.plan(&fatal, &mut m, t), []);
    }
    assert!(m.crash.is_empty());
}

#[test]
fn stops_are_polled_often_at_first_then_less() {
    let w = World::new(vec![assignment("slow", |_| {})]);
    let stopping = observed(&[("slow", ProcState::Stopping)]);
    let mut m = Memory {
        stopping: [("slow".to_string(), 0)].into(),
        ..Default::default()
    };
    let look = |m: &mut Memory, now| next_look(&w.desired, &stopping, m, std::iter::empty(), now);
    assert_eq!(look(&mut m, 0), Some(POLL));
    assert_eq!(look(&mut m, 800), Some(Duration::from_millis(100)));
    assert_eq!(look(&mut m, 60_000), Some(STOP_POLL_MAX));
    // Nothing to wait for: the resync will do.
    let mut quiet = Memory::default();
    let running = observed(&[("slow", ProcState::Running)]);
    assert_eq!(next_look(&w.desired, &running, &mut quiet, std::iter::empty(), 0), None);
    // A crash-loop start or a refused file's retry is looked at when due.
    quiet.crash.insert(
        "slow".into(),
        Crash {
            attempts: 0,
            next_retry_ms: Some(10_000),
            health_failure: None,
            generation: 3,
        },
    );
    assert_eq!(
        next_look(&w.desired, &running, &mut quiet, [4_000].into_iter(), 0),
        Some(Duration::from_secs(4))
    );
}

#[test]
fn a_started_process_is_looked_at_when_its_startsecs_end() {
    let w = World::new(vec![assignment("slow", |s| s.startsecs = Some(2))]);
    let starting = observed(&[("slow", ProcState::Starting)]);
    let mut m = Memory {
        started: [("slow".to_string(), 1_000)].into(),
        ..Default::default()
    };
    let look = |m: &mut Memory, now| next_look(&w.desired, &starting, m, std::iter::empty(), now);
    assert_eq!(look(&mut m, 1_500), Some(Duration::from_millis(1_500)));
    assert_eq!(look(&mut m, 3_000), Some(POLL));
    // Long past startsecs + grace: given up (supervisord restarts by itself from here).
    assert_eq!(look(&mut m, 9_000), None);
    assert!(m.started.is_empty());
}

#[test]
fn a_generation_runs_only_once_supervisord_runs_its_file_and_no_replacement_is_pending() {
    let d = desired(&assignments(vec![assignment("web", |_| {})]), "h1");
    let p = &d.programs["web"];
    let good: BTreeMap<String, String> = [(p.file_name.clone(), p.content.clone())].into();
    let (none, not_held) = (BTreeMap::new(), BTreeMap::new());
    assert!(runs_generation(p, &good, &none, &not_held));
    let replacing: BTreeMap<String, GroupChange> = [("web".to_string(), GroupChange::Replace)].into();
    assert!(!runs_generation(p, &good, &replacing, &not_held));
    assert!(!runs_generation(p, &BTreeMap::new(), &none, &not_held));
    let held: BTreeMap<String, String> = [("web".to_string(), "refused".to_string())].into();
    assert!(!runs_generation(p, &good, &none, &held));
}

#[test]
fn readiness_needs_every_process_in_its_desired_state() {
    use ProcState::*;
    let d = desired(&assignments(vec![assignment("w", two_workers)]), "h1");
    let p = &d.programs["w"];
    let none = Probes::new();
    assert!(is_ready(p, &observed(&[("w_0", Running), ("w_1", Running)]), &none));
    assert!(!is_ready(p, &observed(&[("w_0", Running), ("w_1", Starting)]), &none));
    assert!(!is_ready(p, &observed(&[("w_0", Running)]), &none));
}

#[test]
fn statuses_carry_crash_loop_details_and_stderr_of_failing_processes_only() {
    let d = desired(&assignments(vec![assignment("w", two_workers)]), "h1");
    let mut obs = observed(&[("w_0", ProcState::Fatal), ("w_1", ProcState::Running)]);
    if let Some(p) = obs.get_mut("w_0") {
        p.exit_status = 3;
        p.spawn_error = "Exited too quickly (process log may have details)".into();
    }
    let memory = Memory {
        crash: [(
            "w_0".to_string(),
            Crash {
                attempts: 2,
                next_retry_ms: Some(41_500),
                health_failure: None,
                generation: 3,
            },
        )]
        .into(),
        ..Default::default()
    };
    let tails: HashMap<String, String> = [
        ("w_0".to_string(), "Traceback\nboom".to_string()),
        ("w_1".to_string(), "old noise".to_string()),
    ]
    .into();
    let s = statuses(&StatusInput {
        generations: &[("w".to_string(), 3)].into(),
        memory: &memory,
        stderr_tails: &tails,
        ..EMPTY.input(&d, &obs)
    });
    let w = &s["w"];
    assert!(!w.ready);
    assert_eq!(w.observed_generation, 3);
    let (f, r) = (&w.processes[0], &w.processes[1]);
    assert_eq!(
        (f.state.as_str(), f.exit_status, f.crash_restarts, f.next_retry_at),
        ("FATAL", 3, 2, 41)
    );
    assert_eq!(f.stderr_tail, "Traceback\nboom");
    assert!(f.summary().contains("2 crash-loop restarts"), "{}", f.summary());
    assert_eq!(r.stderr_tail, "");
}

#[test]
fn a_running_process_reports_the_same_status_every_pass() {
    let d = desired(&assignments(vec![assignment("web", |_| {})]), "h1");
    let report = |uptime: &str| {
        let mut obs = observed(&[("web", ProcState::Running)]);
        if let Some(p) = obs.get_mut("web") {
            p.description = format!("pid 42, uptime {uptime}");
        }
        statuses(&EMPTY.input(&d, &obs))
    };
    // Otherwise every pass would rewrite every status in etcd.
    assert_eq!(report("0:00:01"), report("0:00:03"));
}

fn report(program: &str, states: &[&str], ready: bool) -> ProgramHostStatus {
    ProgramHostStatus {
        host: "h".into(),
        program: program.into(),
        observed_generation: 1,
        desired_state: DesiredState::Running,
        processes: states
            .iter()
            .map(|s| ProcessStatus {
                name: program.into(),
                state: s.to_string(),
                ..Default::default()
            })
            .collect(),
        ready,
        failed_generation: 0,
        waiting: None,
        error: None,
    }
}

#[test]
fn a_status_on_its_way_is_reported_only_when_it_lasts() {
    let running = report("a", &["RUNNING"], true);
    let stopping = report("a", &["STOPPING"], false);
    let written = BTreeMap::from([("a".to_string(), running.clone())]);
    let mut since = BTreeMap::new();

    // A replacement begins: held back, with a time to look again.
    let wanted = BTreeMap::from([("a".to_string(), stopping.clone())]);
    let r = reports_due(&written, &wanted, &mut since, 1_000);
    assert!(r.put.is_empty());
    assert_eq!(r.next, Some(REPORT_SETTLE));
    // It ends before anyone could read it: only the outcome is written.
    let mut next = running.clone();
    next.observed_generation = 2;
    let wanted = BTreeMap::from([("a".to_string(), next.clone())]);
    let r = reports_due(&written, &wanted, &mut since, 1_100);
    assert_eq!(r.put, vec![next]);
    assert_eq!(r.next, None);
    assert!(since.is_empty());

    // One that lasts is reported, once, and every change of it after that.
    let wanted = BTreeMap::from([("a".to_string(), stopping.clone())]);
    assert!(reports_due(&written, &wanted, &mut since, 2_000).put.is_empty());
    let r = reports_due(&written, &wanted, &mut since, 2_000 + REPORT_SETTLE.as_millis() as i64);
    assert_eq!(r.put, vec![stopping.clone()]);
    let stopped = report("a", &["STOPPED"], false);
    let wanted = BTreeMap::from([("a".to_string(), stopped.clone())]);
    let later = 2_010 + REPORT_SETTLE.as_millis() as i64;
    assert_eq!(reports_due(&written, &wanted, &mut since, later).put, vec![stopped]);
}

#[test]
fn failures_errors_and_removals_are_reported_at_once() {
    let written = BTreeMap::from([
        ("a".to_string(), report("a", &["RUNNING"], true)),
        ("gone".to_string(), report("gone", &["RUNNING"], true)),
    ]);
    let mut failed = report("a", &["STOPPED", "BACKOFF"], false);
    let mut refused = report("b", &[], false);
    refused.error = Some("supervisord refused it".into());
    let wanted = BTreeMap::from([("a".to_string(), failed.clone()), ("b".to_string(), refused.clone())]);
    let mut since = BTreeMap::new();
    let r = reports_due(&written, &wanted, &mut since, 0);
    assert_eq!(r.put, vec![failed.clone(), refused]);
    assert_eq!(r.delete, vec!["gone".to_string()]);
    assert_eq!(r.next, None);
    // Nothing written twice.
    failed.processes.truncate(1);
    let written = BTreeMap::from([("a".to_string(), failed.clone())]);
    let wanted = written.clone();
    let r = reports_due(&written, &wanted, &mut since, 10);
    assert_eq!(r, Reports::default());
}

#[test]
fn an_assignment_is_trusted_only_as_far_as_the_controller_could_have_written_it() {
    let mut list = assignments(vec![
        assignment("good", |_| {}),
        assignment("inject", |s| {
            s.command = "/bin/true\n[program:evil]\ncommand=/bin/sh".into()
        }),
        in_shop(assignment("grouped", |_| {})),
    ]);
    // Stored under another program's name.
    list.insert("web".into(), assignment("other", |_| {}));
    // A native group whose name would open a section of its own.
    if let Some(a) = list.get_mut("grouped")
        && let Some(g) = a.native_group.as_mut()
    {
        g.name = "shop]\n[program:evil".into();
    }
    let unreadable = BTreeMap::from([(
        "garbage".to_string(),
        "assignment refused: it does not parse".to_string(),
    )]);
    let d = desired_with(&list, &unreadable, &EnvFiles::new(), "h1");
    assert_eq!(d.programs.keys().collect::<Vec<_>>(), ["good"]);
    assert!(d.native.is_empty());
    for (name, why) in [
        ("garbage", "does not parse"),
        ("inject", "line break"),
        ("web", "stored as \"web\" but holds program \"other\""),
        ("grouped", "native group"),
    ] {
        assert!(
            d.invalid[name].starts_with("assignment refused") && d.invalid[name].contains(why),
            "{name}: {:?}",
            d.invalid
        );
    }
    // Every refusal is reported, never ready.
    let observed = Observed::default();
    let memory = Memory::default();
    let tails = HashMap::new();
    let generations = BTreeMap::new();
    let errors = d.invalid.clone();
    let s = statuses(&StatusInput {
        memory: &memory,
        errors: &errors,
        generations: &generations,
        stderr_tails: &tails,
        ..EMPTY.input(&d, &observed)
    });
    for name in ["garbage", "inject", "web", "grouped"] {
        assert!(!s[name].ready && s[name].error.is_some(), "{name}: {s:?}");
    }
}

#[test]
fn an_environment_file_adds_to_the_environment_and_a_bad_one_is_refused() {
    let list = assignments(vec![assignment("web", |s| {
        s.environment = Some([("A".into(), "inline".into()), ("B".into(), "b".into())].into());
        s.environment_file = Some("/etc/corral/web.env".into());
    })]);
    let file = |contents: Option<&str>, problem: Option<&str>| {
        EnvFiles::from([(
            "/etc/corral/web.env".to_string(),
            EnvFile {
                contents: contents.map(String::from),
                problem: problem.map(String::from),
            },
        )])
    };
    let none = BTreeMap::new();
    // The file's values override the spec's.
    let d = desired_with(&list, &none, &file(Some("A=from-file\nTOKEN=s3cret\n"), None), "h1");
    let content = &d.programs["web"].content;
    assert!(content.contains("A=\"from-file\""), "{content}");
    assert!(
        content.contains("B=\"b\"") && content.contains("TOKEN=\"s3cret\""),
        "{content}"
    );
    assert!(d.problems.is_empty());
    // A new value renders a new file (so the program is restarted with it).
    let rotated = desired_with(&list, &none, &file(Some("A=from-file\nTOKEN=n3w\n"), None), "h1");
    assert_ne!(rotated.programs["web"].content, *content);
    // Unreadable now, read before: runs with what was read, and says why.
    let kept = desired_with(
        &list,
        &none,
        &file(Some("A=from-file\nTOKEN=s3cret\n"), Some("cannot read it: gone")),
        "h1",
    );
    assert_eq!(kept.programs["web"].content, *content);
    assert!(kept.problems["web"].contains("cannot read it: gone; its last good contents are used"));
    // Never read, not KEY=VALUE, or a value supervisord cannot quote: not run, and why.
    for (files, why) in [
        (EnvFiles::new(), "not read yet"),
        (file(None, Some("cannot read it: No such file")), "No such file"),
        (file(Some("just words\n"), None), "line 1: not KEY=VALUE"),
        (file(Some("A=x\"y\n"), None), "spec.environment.A"),
    ] {
        let d = desired_with(&list, &none, &files, "h1");
        assert!(d.programs.is_empty(), "{why}");
        let error = &d.invalid["web"];
        assert!(
            error.starts_with("environment_file /etc/corral/web.env: ") && error.contains(why),
            "{error}"
        );
    }
}

fn seen(ns: &str, start: i64) -> SeenProcess {
    SeenProcess {
        namespec: ns.into(),
        start,
        stopwaitsecs: 5,
    }
}

#[test]
fn an_orphan_of_a_killed_supervisord_is_stopped_as_supervisord_would() {
    let before = BTreeMap::from([(100, seen("web:web", 1_000)), (200, seen("api:api", 1_000))]);
    let mut reaping = BTreeMap::new();
    // supervisord was killed and restarted: it reports new PIDs; 100 still runs (started
    // when supervisord said), 200 is gone.
    let reported = BTreeSet::from([300, 400]);
    let alive = BTreeMap::from([(100, 1_001)]);
    let steps = plan_reaping(&before, &mut reaping, &reported, &alive, 50_000);
    assert_eq!(steps, [Reap::Term(100)]);
    // Next looks: nothing again until stopwaitsecs pass, then SIGKILL once.
    assert!(plan_reaping(&BTreeMap::new(), &mut reaping, &reported, &alive, 54_000).is_empty());
    assert_eq!(
        plan_reaping(&BTreeMap::new(), &mut reaping, &reported, &alive, 55_000),
        [Reap::Kill(100)]
    );
    assert!(plan_reaping(&BTreeMap::new(), &mut reaping, &reported, &alive, 60_000).is_empty());
    // Gone: forgotten.
    assert!(plan_reaping(&BTreeMap::new(), &mut reaping, &reported, &BTreeMap::new(), 61_000).is_empty());
    assert!(reaping.is_empty());
}

#[test]
fn a_reused_pid_or_a_process_supervisord_still_reports_is_never_signalled() {
    let before = BTreeMap::from([(100, seen("web:web", 1_000)), (200, seen("api:api", 1_000))]);
    let mut reaping = BTreeMap::new();
    // 100 is now another process (started much later); 200 is still supervisord's.
    let alive = BTreeMap::from([(100, 5_000), (200, 1_000)]);
    let reported = BTreeSet::from([200]);
    assert!(plan_reaping(&before, &mut reaping, &reported, &alive, 0).is_empty());
    assert!(reaping.is_empty());
}

#[test]
fn only_corral_programs_processes_are_seen() {
    let d = desired(
        &assignments(vec![assignment("web", |s| s.stopwaitsecs = Some(3))]),
        "h1",
    );
    let proc = |pid: i64| Proc {
        group: "g".into(),
        state: ProcState::Running,
        pid,
        start: 10,
        exit_status: 0,
        spawn_error: String::new(),
        description: String::new(),
        statename: "RUNNING".into(),
        exec_pending: false,
    };
    let observed: Observed = [("web".to_string(), proc(7)), ("other".to_string(), proc(8))].into();
    let seen = seen_processes(&observed, &d);
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[&7],
        SeenProcess {
            namespec: "web".into(),
            start: 10,
            stopwaitsecs: 3
        }
    );
}

fn depends_on_db(s: &mut ProgramSpec) {
    s.depends_on = Some(vec!["db".into()]);
}

#[test]
fn a_program_starts_only_once_what_it_depends_on_runs_here() {
    use Action::*;
    use ProcState::*;
    let w = World::new(vec![assignment("db", |_| {}), assignment("web", depends_on_db)]);
    let mut m = Memory::default();
    let obs = observed(&[("db", Stopped), ("web", Stopped)]);
    assert_eq!(w.plan(&obs, &mut m, 0), [Start("db".into())]);
    assert_eq!(
        w.run(&obs, &mut m, 0).waiting.get("web").map(String::as_str),
        Some("waiting for db to be RUNNING and healthy (depends_on)")
    );
    for db in [Starting, Backoff, Fatal] {
        let obs = observed(&[("db", db), ("web", Stopped)]);
        assert!(!w.plan(&obs, &mut m, 10).contains(&Start("web".into())), "db {db:?}");
    }
    let obs = observed(&[("db", Running), ("web", Stopped)]);
    assert_eq!(w.plan(&obs, &mut m, 20), [Start("web".into())]);
    // A dependency not placed on this host is not waited for.
    let w = World::new(vec![assignment("web", depends_on_db)]);
    let obs = observed(&[("web", Stopped)]);
    assert_eq!(w.plan(&obs, &mut Memory::default(), 0), [Start("web".into())]);
    // Nor does supervisord start it on its own.
    let web = &w.desired.programs["web"];
    assert!(web.content.contains("autostart=false"), "{}", web.content);
}

#[test]
fn a_program_stops_before_what_it_depends_on_when_both_stop_or_leave() {
    use Action::*;
    use ProcState::*;
    let stopped = |s: &mut ProgramSpec| s.state = DesiredState::Stopped;
    let w = World::new(vec![
        assignment("db", stopped),
        assignment("web", |s| {
            depends_on_db(s);
            s.state = DesiredState::Stopped;
        }),
    ]);
    let mut m = Memory::default();
    let obs = observed(&[("db", Running), ("web", Running)]);
    assert_eq!(w.plan(&obs, &mut m, 0), [Stop("web".into())]);
    let obs = observed(&[("db", Running), ("web", Stopping)]);
    assert_eq!(w.plan(&obs, &mut m, 5), []);
    let obs = observed(&[("db", Running), ("web", Stopped)]);
    assert_eq!(w.plan(&obs, &mut m, 10), [Stop("db".into())]);

    // Both taken off the host (a drain): the dependent's group goes first.
    let w = World::new(vec![assignment("db", |_| {}), assignment("web", depends_on_db)]);
    let mut m = Memory::default();
    let obs = observed(&[("db", Running), ("web", Running)]);
    assert_eq!(w.plan(&obs, &mut m, 0), []);
    let mut gone = World::new(vec![]);
    gone.pending = [
        ("db".to_string(), GroupChange::Remove),
        ("web".to_string(), GroupChange::Remove),
    ]
    .into();
    assert_eq!(gone.plan(&obs, &mut m, 10), [Stop("web".into())]);
    let obs = observed(&[("db", Running), ("web", Stopped)]);
    assert_eq!(
        gone.plan(&obs, &mut m, 20),
        [Stop("db".into()), RemoveGroup("web".into())]
    );
    // Only when both go: db stopped alone does not wait for a web that stays.
    let w = World::new(vec![assignment("db", stopped), assignment("web", depends_on_db)]);
    let obs = observed(&[("db", Running), ("web", Running)]);
    assert_eq!(w.plan(&obs, &mut Memory::default(), 0), [Stop("db".into())]);
}

fn checked(s: &mut ProgramSpec) {
    s.health = Some(corral_proto::resource::HealthSpec {
        tcp: Some(corral_proto::resource::TcpCheck {
            port: 8080,
            port_per_process: None,
        }),
        ..Default::default()
    });
}

fn probe(pid: i64, healthy: Option<bool>) -> Probe {
    Probe {
        pid,
        healthy,
        failures: if healthy == Some(false) { 3 } else { 0 },
        error: if healthy == Some(false) {
            "tcp 127.0.0.1:8080: connection refused".into()
        } else {
            String::new()
        },
    }
}

#[test]
fn a_checked_program_is_ready_only_once_its_check_passes_for_the_pid_that_runs() {
    let d = desired(&assignments(vec![assignment("web", checked)]), "h1");
    let p = &d.programs["web"];
    let obs = observed(&[("web", ProcState::Running)]);
    let probes = |pr: Probe| -> Probes { [("web".to_string(), pr)].into() };
    assert!(!is_ready(p, &obs, &Probes::new()), "not checked yet");
    assert!(!is_ready(p, &obs, &probes(probe(42, None))), "no verdict yet");
    assert!(is_ready(p, &obs, &probes(probe(42, Some(true)))));
    assert!(
        !is_ready(p, &obs, &probes(probe(41, Some(true)))),
        "a verdict on an older pid"
    );
    assert!(!is_ready(p, &obs, &probes(probe(42, Some(false)))));
    let status = |probes: &Probes| {
        statuses(&StatusInput {
            probes,
            ..EMPTY.input(&d, &obs)
        })["web"]
            .processes[0]
            .clone()
    };
    let sick = status(&probes(probe(42, Some(false))));
    assert_eq!(
        (sick.health.as_str(), sick.health_error.as_str()),
        ("unhealthy", "tcp 127.0.0.1:8080: connection refused")
    );
    assert!(
        sick.summary().contains("unhealthy: tcp 127.0.0.1:8080"),
        "{}",
        sick.summary()
    );
    assert_eq!(status(&probes(probe(42, Some(true)))).health, "healthy");
    assert_eq!(status(&probes(probe(42, None))).health, "pending");
    // A program without a check says nothing of health.
    let plain = desired(&assignments(vec![assignment("web", |_| {})]), "h1");
    let s = statuses(&EMPTY.input(&plain, &obs));
    assert_eq!(s["web"].processes[0].health, "");
    assert!(s["web"].ready);
}

#[test]
fn an_unhealthy_process_is_restarted_at_once_then_after_the_crash_loop_delay() {
    use Action::*;
    use ProcState::*;
    let mut w = World::new(vec![assignment("web", checked)]);
    let mut m = Memory::default();
    w.probes = [("web".to_string(), probe(42, Some(true)))].into();
    assert_eq!(
        w.plan(&observed(&[("web", Running)]), &mut m, 0),
        [],
        "healthy: left alone"
    );
    w.probes = [("web".to_string(), probe(42, Some(false)))].into();
    let plan = w.run(&observed(&[("web", Running)]), &mut m, 1_000);
    assert_eq!(plan.actions, [(Stop("web".into()), Correction::HealthRestart)]);
    assert_eq!(m.crash["web"].attempts, 1);
    // Still STOPPING: asked once only.
    assert_eq!(w.plan(&observed(&[("web", Stopping)]), &mut m, 1_100), []);
    // Stopped: started again at once, the first time.
    assert_eq!(
        w.plan(&observed(&[("web", Stopped)]), &mut m, 1_200),
        [Start("web".into())]
    );
    // Its new pid fails too: stopped, and this time started only after the initial delay.
    let mut obs = observed(&[("web", Running)]);
    if let Some(p) = obs.get_mut("web") {
        p.pid = 43;
    }
    assert_eq!(w.plan(&obs, &mut m, 5_000), [], "the verdict was on the old pid");
    w.probes = [("web".to_string(), probe(43, Some(false)))].into();
    assert_eq!(w.plan(&obs, &mut m, 6_000), [Stop("web".into())]);
    assert_eq!(m.crash["web"].next_retry_ms, Some(16_000));
    assert_eq!(w.plan(&observed(&[("web", Stopped)]), &mut m, 15_999), []);
    let next = next_look(
        &w.desired,
        &observed(&[("web", Stopped)]),
        &mut m,
        std::iter::empty(),
        15_000,
    );
    assert_eq!(
        next,
        Some(Duration::from_secs(1)),
        "the agent looks again when it is due"
    );
    assert_eq!(
        w.plan(&observed(&[("web", Stopped)]), &mut m, 16_000),
        [Start("web".into())]
    );
    assert_eq!(m.crash["web"].attempts, 2);
}

#[test]
fn a_check_without_restart_only_holds_back_readiness() {
    let mut w = World::new(vec![assignment("web", |s| {
        checked(s);
        if let Some(h) = &mut s.health {
            h.restart = Some(false);
        }
    })]);
    w.probes = [("web".to_string(), probe(42, Some(false)))].into();
    let mut m = Memory::default();
    assert_eq!(w.plan(&observed(&[("web", ProcState::Running)]), &mut m, 0), []);
    assert!(!is_ready(
        &w.desired.programs["web"],
        &observed(&[("web", ProcState::Running)]),
        &w.probes
    ));
}

#[test]
fn a_dependent_waits_for_its_dependency_to_be_healthy() {
    use ProcState::*;
    let mut w = World::new(vec![assignment("db", checked), assignment("web", depends_on_db)]);
    let mut m = Memory::default();
    let obs = observed(&[("db", Running), ("web", Stopped)]);
    let plan = w.run(&obs, &mut m, 0);
    assert!(plan.actions.is_empty(), "{plan:?}");
    assert!(plan.waiting["web"].contains("waiting for db"));
    w.probes = [("db".to_string(), probe(42, Some(true)))].into();
    assert_eq!(w.plan(&obs, &mut m, 10), [Action::Start("web".into())]);
}

#[test]
fn a_generation_fails_here_when_its_file_is_refused_or_it_runs_fatal_or_unhealthy() {
    let d = desired(&assignments(vec![assignment("web", checked)]), "h1");
    let generation = d.programs["web"].generation;
    let failed = |state: ProcState, runs: u64, refused: bool, probes: &Probes| {
        let refused: BTreeSet<String> = if refused {
            ["web".to_string()].into()
        } else {
            BTreeSet::new()
        };
        statuses(&StatusInput {
            generations: &[("web".to_string(), runs)].into(),
            probes,
            refused: &refused,
            ..EMPTY.input(&d, &observed(&[("web", state)]))
        })["web"]
            .failed_generation
    };
    let none = Probes::new();
    let healthy: Probes = [("web".to_string(), probe(42, Some(true)))].into();
    let sick: Probes = [("web".to_string(), probe(42, Some(false)))].into();
    assert_eq!(failed(ProcState::Running, generation, false, &healthy), 0);
    assert_eq!(
        failed(ProcState::Running, generation, false, &none),
        0,
        "not checked yet is no failure"
    );
    assert_eq!(failed(ProcState::Fatal, generation, false, &none), generation);
    assert_eq!(failed(ProcState::Running, generation, false, &sick), generation);
    // Supervisord refused the new file: it still runs the old generation, and the new one failed.
    assert_eq!(failed(ProcState::Running, generation - 1, true, &healthy), generation);
    // FATAL under an older generation says nothing of the new one.
    assert_eq!(failed(ProcState::Fatal, generation - 1, false, &none), 0);
}

#[test]
fn a_health_restart_fails_the_generation_and_stays_unhealthy_until_the_check_passes_again() {
    use ProcState::*;
    let mut w = World::new(vec![assignment("web", checked)]);
    let mut m = Memory::default();
    w.probes = [("web".to_string(), probe(42, Some(false)))].into();
    w.plan(&observed(&[("web", Running)]), &mut m, 1_000);
    let generation = w.desired.programs["web"].generation;
    let status = |state: ProcState, probes: &Probes, m: &Memory| {
        statuses(&StatusInput {
            generations: &[("web".to_string(), generation)].into(),
            memory: m,
            probes,
            ..EMPTY.input(&w.desired, &observed(&[("web", state)]))
        })["web"]
            .clone()
    };
    // Stopped for its restart, then started with no verdict yet: unhealthy, and failed.
    for state in [Stopping, Stopped, Running] {
        let s = status(state, &Probes::new(), &m);
        assert_eq!(s.processes[0].health, "unhealthy", "{state:?}");
        assert_eq!(s.failed_generation, generation, "{state:?}");
    }
    // Passing again: healthy (the generation stays failed: it was restarted under it).
    let s = status(Running, &[("web".to_string(), probe(42, Some(true)))].into(), &m);
    assert_eq!(s.processes[0].health, "healthy");
    assert!(s.ready);
}

#[test]
fn a_new_generation_starts_its_restarts_from_none() {
    use Action::*;
    use ProcState::*;
    let mut w = World::new(vec![assignment("web", checked)]);
    let mut m = Memory::default();
    m.crash.insert(
        "web".into(),
        Crash {
            attempts: 5,
            next_retry_ms: Some(900_000),
            health_failure: Some("status 503".into()),
            generation: 3,
        },
    );
    // Still generation 3: its delay holds.
    assert_eq!(w.plan(&observed(&[("web", Stopped)]), &mut m, 1_000), []);
    // The spec was fixed (generation 4): started at once, and a failure restarts at once.
    let mut fixed = assignment("web", checked);
    fixed.program.metadata.generation = 4;
    w = World::new(vec![fixed]);
    assert_eq!(
        w.plan(&observed(&[("web", Stopped)]), &mut m, 2_000),
        [Start("web".into())]
    );
    assert!(!m.crash.contains_key("web"));
    w.probes = [("web".to_string(), probe(42, Some(false)))].into();
    assert_eq!(
        w.plan(&observed(&[("web", Running)]), &mut m, 3_000),
        [Stop("web".into())]
    );
    assert_eq!((m.crash["web"].attempts, m.crash["web"].next_retry_ms), (1, None));
}

#[test]
fn each_running_process_is_checked_on_its_own_port_when_asked() {
    let pool = |per_process: Option<bool>| {
        assignment("pool", move |s| {
            s.numprocs = Some(3);
            s.numprocs_start = Some(5);
            s.process_name = Some("%(program_name)s_%(process_num)d".into());
            s.health = Some(corral_proto::resource::HealthSpec {
                tcp: Some(corral_proto::resource::TcpCheck {
                    port: 8000,
                    port_per_process: per_process,
                }),
                ..Default::default()
            });
        })
    };
    let ports = |per_process: Option<bool>| {
        let d = desired(&assignments(vec![pool(per_process)]), "h1");
        let ns = &d.programs["pool"].namespecs;
        // The second process is not RUNNING: it has nothing to check.
        let obs = observed(&[
            (ns[0].as_str(), ProcState::Running),
            (ns[1].as_str(), ProcState::Starting),
            (ns[2].as_str(), ProcState::Running),
        ]);
        crate::health::targets(&d, &obs)
            .into_iter()
            .map(|t| match t.health.check {
                corral_proto::resource::Check::Tcp { port, .. } => (t.namespec, port),
                other => panic!("{other:?}"),
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ports(Some(true)),
        [("pool_5".to_string(), 8005), ("pool_7".to_string(), 8007)]
    );
    assert_eq!(
        ports(None),
        [("pool_5".to_string(), 8000), ("pool_7".to_string(), 8000)]
    );
}

#[test]
fn a_stop_or_signal_waits_until_the_process_has_exec_d() {
    use Action::*;
    use ProcState::*;
    let forked = |list: &[(&str, ProcState)], pending: &[&str]| {
        let mut o = observed(list);
        for ns in pending {
            if let Some(p) = o.get_mut(*ns) {
                p.exec_pending = true;
            }
        }
        o
    };
    // A process to stop that supervisord has forked but that has not exec'd: held back, its
    // program said deferred, and looked at again soon.
    let w = World::new(vec![assignment("down", |s| s.state = DesiredState::Stopped)]);
    let mut m = Memory::default();
    // Only a stop or signal of a process started in the last seconds is looked up at all.
    let mut just = observed(&[("down", Starting)]);
    if let Some(p) = just.get_mut("down") {
        p.start = 1;
    }
    let first = w.run(&just, &mut m.clone(), 1_000);
    assert!(any_recently_started(&just, 1_000));
    assert_eq!(
        signalled_recently_started(&first, &just, 1_000)
            .iter()
            .collect::<Vec<_>>(),
        ["down"]
    );
    assert!(!any_recently_started(&just, 60_000));
    assert!(signalled_recently_started(&first, &just, 60_000).is_empty());
    let plan = w.run(&forked(&[("down", Starting)], &["down"]), &mut m, 1_000);
    assert_eq!(plan.actions, []);
    assert_eq!(plan.deferred.iter().collect::<Vec<_>>(), ["down"]);
    assert_eq!(
        next_look(
            &w.desired,
            &observed(&[("down", Starting)]),
            &mut m,
            std::iter::empty(),
            1_000
        ),
        Some(EXEC_POLL)
    );
    // Once it has exec'd, it is stopped, and nothing more is waited for.
    let plan = w.run(&forked(&[("down", Starting)], &[]), &mut m, 1_020);
    assert_eq!(
        plan.actions.into_iter().map(|(a, _)| a).collect::<Vec<_>>(),
        [Stop("down".into())]
    );
    assert!(plan.deferred.is_empty() && m.exec_wait.is_empty());

    // A signal request reaches all of a program's processes in one pass: none is signalled
    // while one of them has not exec'd.
    let mut w = World::new(vec![assignment("w", |s| {
        two_workers(s);
        s.signal_request = Some(corral_proto::SignalRequest {
            signal: "HUP".into(),
            id: "2".into(),
        });
    })]);
    w.signals.insert("w".into(), Some("1".into()));
    let mut m = Memory::default();
    let plan = w.run(&forked(&[("w_0", Running), ("w_1", Starting)], &["w_1"]), &mut m, 0);
    assert_eq!(plan.actions, []);
    assert_eq!(plan.deferred.iter().collect::<Vec<_>>(), ["w"]);
    assert_eq!(
        w.plan(&forked(&[("w_0", Running), ("w_1", Starting)], &[]), &mut m, 20),
        [Signal("w_0".into(), "HUP".into()), Signal("w_1".into(), "HUP".into())]
    );
    // Other actions are not held: a start goes ahead beside a held stop.
    let w = World::new(vec![
        assignment("down", |s| s.state = DesiredState::Stopped),
        assignment("up", |_| {}),
    ]);
    assert_eq!(
        w.plan(
            &forked(&[("down", Running), ("up", Stopped)], &["down"]),
            &mut Memory::default(),
            0
        ),
        [Start("up".into())]
    );
}

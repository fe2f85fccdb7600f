//! Rendered files, read back by supervisord's own config loader, give exactly the spec's
//! values: every option, for a table of tricky cases and for generated specs (proptest).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use corral_proto::resource::{AutoRestart, ByteSize, DesiredState, Group, GroupSpec, Metadata, Program, ProgramSpec};
use corral_proto::template::{self, Context, Scope};
use corral_proto::{render_group, signal, validate_group, validate_program};
use corral_tests::loader::{LOADER_ENV, Loader};
use proptest::prelude::*;
use serde_json::{Value, json};

fn host_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn uid_of(user: &str) -> Option<u32> {
    if let Ok(n) = user.parse() {
        return Some(n);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&user)).then(|| f.get(2)?.parse().ok()).flatten()
    })
}

/// What supervisord must report for each process of `p`, computed from the spec alone with
/// supervisord's documented defaults and expansion rules.
fn expected(p: &Program, group: Option<&Group>, here: &str) -> BTreeMap<String, Value> {
    let s = &p.spec;
    let numprocs = s.numprocs.unwrap_or(1) as u32;
    let start = s.numprocs_start.unwrap_or(0) as u32;
    let group_name = group.map_or(p.metadata.name.clone(), |g| g.metadata.name.clone());
    let group_priority = group.map_or(s.priority.unwrap_or(999), |g| g.spec.priority.unwrap_or(999));
    let names = corral_proto::render::process_names(p, &host_node_name(), &group_name).expect("names");
    let mut out = BTreeMap::new();
    for (num, name) in (start..start + numprocs).zip(names) {
        let mut ctx = Context {
            here: here.to_string(),
            program_name: p.metadata.name.clone(),
            host_node_name: host_node_name(),
            group_name: group_name.clone(),
            process_num: num,
            numprocs,
            env: [(LOADER_ENV.0.to_string(), LOADER_ENV.1.to_string())].into(),
        };
        let env: BTreeMap<String, String> = s
            .environment
            .iter()
            .flatten()
            .map(|(k, v)| {
                (
                    k.clone(),
                    template::expand(v, Scope::Process, &ctx).expect("env expands"),
                )
            })
            .collect();
        let program_ctx = ctx.clone();
        ctx.env.extend(env.clone());
        let x = |v: &str| template::expand(v, Scope::Process, &ctx).expect("expands");
        let logfile = |v: &Option<String>| match v.as_deref().map(|v| (v, v.to_ascii_uppercase())) {
            None => json!("AUTO"),
            Some((_, u)) if u == "AUTO" => json!("AUTO"),
            Some((_, u)) if u == "NONE" || u == "OFF" => Value::Null,
            Some((v, _)) => json!(x(v)),
        };
        let redirect = s.redirect_stderr.unwrap_or(false);
        let stopasgroup = s.stopasgroup.unwrap_or(false);
        // With one supervisord program per process, each is its own group, named like it;
        // %(group_name) still means the program's name (Corral expands it).
        let native = group.map(|g| g.metadata.name.as_str());
        let group_field = if corral_proto::render::per_process(p, native) {
            name.clone()
        } else {
            group_name.clone()
        };
        let v = json!({
            "group": group_field,
            "group_priority": group_priority,
            "command": x(&s.command),
            "directory": s.directory.as_deref().map(x),
            "uid": s.user.as_deref().map(|u| uid_of(u).expect("test users exist")),
            "umask": s.umask.as_deref().map(|u| i64::from_str_radix(u, 8).expect("octal")),
            "priority": s.priority.unwrap_or(999),
            "autostart": s.autostart.unwrap_or(true) && (group.is_some() || s.state == DesiredState::Running),
            "autorestart": match s.autorestart.unwrap_or(AutoRestart::Unexpected) {
                AutoRestart::Always => json!(true),
                AutoRestart::Never => json!(false),
                AutoRestart::Unexpected => json!("unexpected"),
            },
            "startsecs": s.startsecs.unwrap_or(1),
            "startretries": s.startretries.unwrap_or(3),
            "stopwaitsecs": s.stopwaitsecs.unwrap_or(10),
            "stopsignal": s.stopsignal.as_deref().map_or(15, |v| signal::number(v).expect("signal")),
            "stopasgroup": stopasgroup,
            "killasgroup": s.killasgroup.unwrap_or(stopasgroup),
            "exitcodes": s.exitcodes.clone().unwrap_or_else(|| vec![0]),
            "redirect_stderr": redirect,
            "environment": env,
            "serverurl": s.serverurl.as_deref().filter(|u| !u.eq_ignore_ascii_case("AUTO"))
                .map(|u| template::expand(u, Scope::Program, &program_ctx).expect("expands")),
            "stdout_logfile": logfile(&s.stdout_logfile),
            "stdout_logfile_maxbytes": s.stdout_logfile_maxbytes.map_or(50 << 20, |b| b.0),
            "stdout_logfile_backups": s.stdout_logfile_backups.unwrap_or(10),
            "stdout_capture_maxbytes": s.stdout_capture_maxbytes.map_or(0, |b| b.0),
            "stdout_events_enabled": s.stdout_events_enabled.unwrap_or(false),
            "stdout_syslog": s.stdout_syslog.unwrap_or(false),
            "stderr_logfile": if redirect { Value::Null } else { logfile(&s.stderr_logfile) },
            "stderr_logfile_maxbytes": s.stderr_logfile_maxbytes.map_or(50 << 20, |b| b.0),
            "stderr_logfile_backups": s.stderr_logfile_backups.unwrap_or(10),
            "stderr_capture_maxbytes": s.stderr_capture_maxbytes.map_or(0, |b| b.0),
            "stderr_events_enabled": s.stderr_events_enabled.unwrap_or(false),
            "stderr_syslog": s.stderr_syslog.unwrap_or(false),
        });
        out.insert(name, v);
    }
    out
}

static LOADER: Mutex<Option<Loader>> = Mutex::new(None);

/// Renders `p` (and its native group), loads the files with supervisord, and returns what it
/// read, or supervisord's refusal.
pub fn load_rendered(p: &Program, group: Option<&Group>, dir: &Path) -> Result<BTreeMap<String, Value>, String> {
    let valid = validate_program(p.clone()).map_err(|e| format!("validation refused a test spec: {e}"))?;
    let native = group.map(|g| g.metadata.name.clone());
    let mut text = corral_proto::render::render_program_in(&valid, native.as_deref())?;
    if let Some(g) = group {
        let g = validate_group(g.clone()).map_err(|e| e.to_string())?;
        text.push_str(&render_group(&g));
    }
    let path = dir.join(format!("{}.conf", p.metadata.name));
    std::fs::write(&path, &text).map_err(|e| e.to_string())?;
    let mut guard = LOADER.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        *guard = Some(Loader::start().map_err(|e| e.to_string())?);
    }
    let loader = guard.as_mut().ok_or("no loader")?;
    let got = loader.load(&path).map_err(|e| e.to_string())?;
    got.map(|m| m.into_iter().collect())
        .map_err(|e| format!("supervisord refused:\n{text}\n{e}"))
}

#[track_caller]
fn round_trip(p: &Program, group: Option<&Group>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let here = dir.path().display().to_string();
    let got = load_rendered(p, group, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let want = expected(p, group, &here);
    assert_eq!(got, want, "spec: {:#?}", p.spec);
}

/// The shared test program, but with supervisord's own startsecs: these tests check defaults.
fn program(name: &str, f: impl FnOnce(&mut ProgramSpec)) -> Program {
    corral_tests::specs::program_object(name, |s| {
        s.startsecs = None;
        f(s);
    })
}

#[test]
fn defaults_round_trip() {
    round_trip(&program("plain", |_| {}), None);
}

#[test]
fn every_option_set_round_trips() {
    round_trip(
        &program("everything", |s| {
            s.command = "/bin/sh -c 'echo \"%(program_name)s_#%(process_num)d;ok\" 50%%'".into();
            s.process_name = Some("%(program_name)s-%(process_num)03d".into());
            s.numprocs = Some(3);
            s.numprocs_start = Some(7);
            s.priority = Some(42);
            s.autostart = Some(false);
            s.autorestart = Some(AutoRestart::Always);
            s.startsecs = Some(0);
            s.startretries = Some(9);
            s.exitcodes = Some(vec![0, 2, 255]);
            s.stopsignal = Some("sigquit".into());
            s.stopwaitsecs = Some(77);
            s.stopasgroup = Some(true);
            s.killasgroup = Some(true);
            s.user = Some("nobody".into());
            s.redirect_stderr = Some(false);
            s.stdout_logfile = Some("/tmp/%(program_name)s-%(process_num)02d.out".into());
            s.stdout_logfile_maxbytes = Some(ByteSize(1234));
            s.stdout_logfile_backups = Some(0);
            s.stdout_capture_maxbytes = Some(ByteSize(1 << 20));
            s.stdout_events_enabled = Some(true);
            s.stdout_syslog = Some(true);
            s.stderr_logfile = Some("off".into());
            s.stderr_logfile_maxbytes = Some(ByteSize(0));
            s.stderr_logfile_backups = Some(3);
            s.stderr_capture_maxbytes = Some(ByteSize(5));
            s.stderr_events_enabled = Some(true);
            s.stderr_syslog = Some(true);
            s.environment = Some(
                [
                    ("DSN", "postgres://u:p@h/db?sslmode=require&x=1,y=2"),
                    ("PCT", "100%% of %(process_num)d"),
                    ("SPACES", "a b  c"),
                    ("FROM_ENV", "%(ENV_CORRAL_RT)s"),
                    ("EMPTY", ""),
                    ("HASH", "a#b;c"),
                    ("UNICODE", "héllo 日本"),
                    ("DOLLAR", "$HOME"),
                ]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
            );
            s.directory = Some("/tmp/%(program_name)s".into());
            s.umask = Some("027".into());
            s.serverurl = Some("http://127.0.0.1:9001/%(program_name)s".into());
        }),
        None,
    );
}

#[test]
fn program_env_feeds_command_expansion_and_stopped_means_no_autostart() {
    round_trip(
        &program("envref", |s| {
            s.command = "/bin/echo %(ENV_GREETING)s %(here)s %(host_node_name)s".into();
            s.environment = Some([("GREETING".to_string(), "hi there".to_string())].into());
            s.state = DesiredState::Stopped;
            s.redirect_stderr = Some(true);
            s.stdout_logfile = Some("NONE".into());
        }),
        None,
    );
}

#[test]
fn native_group_members_keep_their_values_and_take_the_group_priority() {
    let group = Group::new(
        Metadata {
            name: "shop".into(),
            ..Default::default()
        },
        GroupSpec {
            programs: vec!["member".into()],
            priority: Some(5),
            native: true,
        },
    );
    round_trip(
        &program("member", |s| {
            s.command = "/bin/echo %(group_name)s".into();
            s.numprocs = Some(2);
            s.process_name = Some("%(group_name)s_%(program_name)s_%(process_num)d".into());
        }),
        Some(&group),
    );
}

fn text(chars: &'static str, max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(chars.chars().collect::<Vec<_>>()), 0..max)
        .prop_map(|v| v.into_iter().collect())
}

/// Pieces that validation accepts and that stress supervisord's parsing: ';' and '#' without
/// a space before them, '%%', expansions, '=', ',', quotes inside words, non-ASCII.
fn arg() -> impl Strategy<Value = String> {
    prop_oneof![
        text("abcxyzABC019_-./:=,;#@$&?!+*é日", 8)
            .prop_filter("non-empty", |s| !s.is_empty() && !s.starts_with([';', '#'])),
        Just("%%".to_string()),
        Just("%(program_name)s".to_string()),
        Just("%(process_num)02d".to_string()),
        Just("%(ENV_CORRAL_RT)s".to_string()),
        Just("'single quoted;#'".to_string()),
        Just("\"double quoted\"".to_string()),
    ]
}

fn env_value() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            text("abcXYZ09_-./:=,;#@$&?!+*()é日", 6),
            Just(" ".to_string()),
            Just("%%".to_string()),
            Just("%(program_name)s".to_string()),
            Just("%(process_num)d".to_string()),
        ],
        0..5,
    )
    .prop_map(|v| v.concat())
    .prop_filter("edges", |v| {
        !v.starts_with([' ', '\'', ';', '#']) && !v.ends_with([' ', '\'']) && !v.contains(" ;") && !v.contains(" #")
    })
}

fn opt<T: std::fmt::Debug + Clone>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Option<T>> {
    proptest::option::weighted(0.5, s)
}

prop_compose! {
    fn process_options()(
        args in proptest::collection::vec(arg(), 0..4),
        numprocs in opt(1i64..4),
        numprocs_start in opt(0i64..100),
        priority in opt(0i64..2000),
        autostart in opt(any::<bool>()),
        autorestart in opt(prop_oneof![Just(AutoRestart::Always), Just(AutoRestart::Never), Just(AutoRestart::Unexpected)]),
        startsecs in opt(0i64..60),
        startretries in opt(0i64..10),
        exitcodes in opt(proptest::collection::vec(0i64..256, 1..4)),
        stopsignal in opt(prop_oneof![Just("TERM"), Just("int"), Just("SIGQUIT"), Just("HUP"), Just("KILL"), Just("usr2")]),
        stopwaitsecs in opt(0i64..100),
        (stopasgroup, killasgroup) in prop_oneof![Just((None, None)), Just((Some(true), Some(true))), Just((Some(false), Some(true))), Just((Some(true), None)), Just((None, Some(false)))],
        user in opt(prop_oneof![Just("root"), Just("nobody"), Just("0")]),
        stopped in any::<bool>(),
    ) -> ProgramSpec {
        let numprocs_gt1 = numprocs.is_some_and(|n| n > 1);
        ProgramSpec {
            command: std::iter::once("/bin/echo".to_string()).chain(args).collect::<Vec<_>>().join(" "),
            process_name: numprocs_gt1.then(|| "%(program_name)s_%(process_num)02d".to_string()),
            numprocs, numprocs_start, priority, autostart, autorestart, startsecs, startretries, exitcodes,
            stopsignal: stopsignal.map(String::from), stopwaitsecs, stopasgroup, killasgroup,
            user: user.map(String::from),
            state: if stopped { DesiredState::Stopped } else { DesiredState::Running },
            selector: Some(BTreeMap::new()),
            ..Default::default()
        }
    }
}

prop_compose! {
    fn spec()(
        base in process_options(),
        redirect_stderr in opt(any::<bool>()),
        stdout_logfile in opt(prop_oneof![Just("AUTO".to_string()), Just("none".to_string()), Just("/tmp/%(program_name)s-%(process_num)d.log".to_string())]),
        stderr_logfile in opt(prop_oneof![Just("auto".to_string()), Just("OFF".to_string())]),
        maxbytes in opt((0u64..(1 << 30)).prop_map(ByteSize)),
        backups in opt(0i64..50),
        capture in opt((0u64..4096).prop_map(ByteSize)),
        events in opt(any::<bool>()),
        syslog in opt(any::<bool>()),
        env in opt(proptest::collection::btree_map("[A-Z_][A-Z0-9_]{0,6}", env_value(), 0..4)),
        directory in opt(Just("/tmp/%(program_name)s/%(process_num)d".to_string())),
        umask in opt("[0-7]{1,3}"),
        serverurl in opt(prop_oneof![Just("AUTO".to_string()), Just("unix:///run/%(program_name)s.sock".to_string())]),
    ) -> ProgramSpec {
        ProgramSpec {
            redirect_stderr, stdout_logfile,
            stderr_logfile, stdout_logfile_maxbytes: maxbytes, stderr_logfile_maxbytes: maxbytes.map(|b| ByteSize(b.0 / 2)),
            stdout_logfile_backups: backups, stderr_logfile_backups: backups,
            stdout_capture_maxbytes: capture, stderr_capture_maxbytes: capture,
            stdout_events_enabled: events, stderr_events_enabled: events.map(|e| !e),
            stdout_syslog: syslog, stderr_syslog: syslog,
            environment: env, directory, umask, serverurl,
            ..base
        }
    }
}

/// Cases: `CORRAL_FUZZ_CASES` (`scripts/fuzz` asks for more), or 200 in the suite.
fn cases() -> u32 {
    std::env::var("CORRAL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn generated_specs_round_trip_through_supervisord(spec in spec(), name in "[a-z][a-z0-9_-]{0,10}[a-z0-9]") {
        let p = Program::new(Metadata { name, ..Default::default() }, spec);
        prop_assume!(validate_program(p.clone()).is_ok());
        let dir = tempfile::tempdir().expect("tempdir");
        let got = load_rendered(&p, None, dir.path());
        prop_assert!(got.is_ok(), "{:?}", got);
        let want = expected(&p, None, &dir.path().display().to_string());
        prop_assert_eq!(got.ok(), Some(want));
    }
}

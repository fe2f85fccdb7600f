//! Property tests run as a fuzzer: the YAML reader, validation, the renderer, the INI importer
//! and the environment file reader, fed arbitrary and mutated input. None may panic; a spec
//! that validates renders to a file whose sections are only its own, whose keys are only
//! supervisord's program options, and which the importer (Corral's model of supervisord's
//! loader) reads back to the same spec. The suite runs a few thousand cases;
//! `scripts/fuzz` runs millions (`CORRAL_FUZZ_CASES`). supervisord's own loader checks
//! generated specs in `tests/tests/e2e/render_roundtrip.rs`.

use std::collections::BTreeMap;

use corral_proto::import::{Placement, import};
use corral_proto::resource::{AutoRestart, ByteSize, Metadata, PROGRAM_OPTIONS, Program, ProgramSpec, Resource};
use corral_proto::{parse_every_document, render, validate_group, validate_program};
use proptest::prelude::*;

/// Cases per property: `CORRAL_FUZZ_CASES`, or `default` in the suite.
fn cases(default: u32) -> u32 {
    std::env::var("CORRAL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(default: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default),
        // A failure is kept in the test's own regressions file and replayed first.
        ..ProptestConfig::default()
    }
}

/// Characters that mean something to YAML, INI, supervisord or a shell, and some that mean
/// nothing to anyone.
const NASTY: &str = "ab Z09_-./:=,;#%()[]{}\"'\\\n\t\r|>&*!?@$`~^é日\u{0}\u{7f}\u{2028}";

fn soup(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(NASTY.chars().collect::<Vec<_>>()), 0..max)
        .prop_map(|v| v.into_iter().collect())
}

/// Words a real spec has, and hostile pieces between them.
fn value() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            4 => "[a-z0-9_./-]{1,8}",
            1 => Just(" ".to_string()),
            1 => Just("%(program_name)s".to_string()),
            1 => Just("%(process_num)02d".to_string()),
            1 => Just("%(ENV_HOME)s".to_string()),
            1 => Just("%%".to_string()),
            1 => soup(4),
            1 => Just("\n[program:evil]\ncommand=/bin/sh".to_string()),
        ],
        0..5,
    )
    .prop_map(|v| v.concat())
}

fn opt<T: std::fmt::Debug + Clone>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Option<T>> {
    proptest::option::weighted(0.5, s)
}

prop_compose! {
    fn hostile_spec()(
        command in prop_oneof![value(), "/usr/bin/[a-z]{1,6}( [a-z%(){}_0-9-]{1,6}){0,3}"],
        process_name in opt(prop_oneof![value(), Just("%(program_name)s_%(process_num)02d".to_string())]),
        numprocs in opt(-2i64..5),
        priority in opt(-5i64..1000),
        autorestart in opt(prop_oneof![Just(AutoRestart::Always), Just(AutoRestart::Never), Just(AutoRestart::Unexpected)]),
        exitcodes in opt(proptest::collection::vec(-3i64..300, 0..3)),
        stopsignal in opt(prop_oneof![Just("TERM".to_string()), Just("kill".to_string()), soup(6)]),
        user in opt(prop_oneof![Just("app".to_string()), Just("0".to_string()), value()]),
        stdout_logfile in opt(prop_oneof![Just("AUTO".to_string()), value().prop_map(|v| format!("/var/log/{v}"))]),
        stderr_logfile in opt(value()),
        maxbytes in opt((0u64..(1 << 32)).prop_map(ByteSize)),
        environment in opt(proptest::collection::btree_map(prop_oneof!["[A-Z_][A-Z0-9_]{0,5}", soup(4)], value(), 0..4)),
        directory in opt(value()),
        umask in opt(prop_oneof!["[0-7]{1,4}", soup(3)]),
        serverurl in opt(value()),
        environment_file in opt(value()),
        redirect_stderr in opt(any::<bool>()),
        (stopasgroup, killasgroup) in (opt(any::<bool>()), opt(any::<bool>())),
    ) -> ProgramSpec {
        ProgramSpec {
            command, process_name, numprocs, priority, autorestart, exitcodes, stopsignal, user,
            stdout_logfile, stderr_logfile, stdout_logfile_maxbytes: maxbytes, environment, directory,
            umask, serverurl, environment_file, redirect_stderr, stopasgroup, killasgroup,
            selector: Some(BTreeMap::new()),
            ..Default::default()
        }
    }
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![4 => "[a-z][a-z0-9_-]{0,10}[a-z0-9]", 1 => soup(6)]
}

/// The whole pipeline over whatever a file held: read every document, validate, render. It
/// must not panic, and what validates must render.
fn read_validate_render(text: &str) -> Result<(), TestCaseError> {
    let (docs, _errors) = parse_every_document("fuzz.yaml", text);
    for doc in docs {
        match doc {
            Resource::Program(p) => {
                if let Ok(valid) = validate_program(p) {
                    check_rendered(&valid)?;
                }
            }
            Resource::Group(g) => {
                if let Ok(valid) = validate_group(g) {
                    render::render_group(&valid);
                }
            }
            Resource::Host(_) => {}
        }
    }
    Ok(())
}

/// A valid program's file: only its own sections, only program options, and read back by the
/// importer to the same values.
fn check_rendered(valid: &corral_proto::Valid<Program>) -> Result<(), TestCaseError> {
    let text = render::render_program(valid);
    let sections = corral_proto::ini::parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
    let name = &valid.metadata.name;
    let per_process = render::per_process(valid, None);
    for s in &sections {
        let own = match s.name.strip_prefix("program:") {
            Some(section) if per_process => section.starts_with(name.as_str()) || valid.spec.process_name.is_some(),
            Some(section) => section == name,
            None => false,
        };
        prop_assert!(own, "a section that is not the program's own: [{}]\n{}", s.name, text);
        for (key, _, _) in &s.entries {
            prop_assert!(
                PROGRAM_OPTIONS.contains(&key.as_str()),
                "key {key:?} is no program option\n{text}"
            );
        }
    }
    if per_process {
        return Ok(());
    }
    prop_assert_eq!(sections.len(), 1, "{}", text);
    let placement = Placement::Selector(BTreeMap::new());
    let back = import(&text, "/etc/supervisor/conf.d", &placement);
    prop_assert!(
        back.errors.is_empty(),
        "the importer refused a rendered file: {:?}\n{}",
        back.errors,
        text
    );
    let [Resource::Program(p)] = back.resources.as_slice() else {
        return Err(TestCaseError::fail(format!("imported {:?}\n{text}", back.resources)));
    };
    let s = &p.spec;
    let want = &valid.spec;
    prop_assert_eq!(&s.command, &want.command, "{}", text);
    prop_assert_eq!(&s.user, &want.user, "{}", text);
    prop_assert_eq!(&s.directory, &want.directory, "{}", text);
    // Every option is rendered, defaults included: an unset one reads back as its default.
    let log = |l: &Option<String>| l.clone().unwrap_or_else(|| "AUTO".into());
    prop_assert_eq!(log(&s.stdout_logfile), log(&want.stdout_logfile), "{}", text);
    let env = |e: &Option<BTreeMap<String, String>>| e.clone().unwrap_or_default();
    prop_assert_eq!(env(&s.environment), env(&want.environment), "{}", text);
    Ok(())
}

const PROGRAM_DOC: &str = "apiVersion: corral.dev/v1\nkind: Program\nmetadata:\n  name: web\n  labels: {app: shop}\nspec:\n  selector: {role: app}\n  command: /usr/bin/python3 -m http.server 8080\n  numprocs: 2\n  process_name: '%(program_name)s_%(process_num)02d'\n  stdout_logfile: /var/log/web-%(process_num)d.log\n  stdout_logfile_maxbytes: 10MB\n  autorestart: unexpected\n  environment: {PYTHONPATH: /opt/app, MODE: prod}\n  crash_loop: {initial_delay_secs: 10}\n---\napiVersion: corral.dev/v1\nkind: Group\nmetadata: {name: shop}\nspec: {programs: [web], native: true, priority: 10}\n";

/// One edit of a text: insert, delete, replace or duplicate, at a position given as a share.
#[derive(Clone, Debug)]
enum Edit {
    Insert(f64, String),
    Delete(f64, usize),
    Replace(f64, String),
    DuplicateLine(f64),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (0.0..1.0, soup(4)).prop_map(|(at, s)| Edit::Insert(at, s)),
        (0.0..1.0, 1usize..8).prop_map(|(at, n)| Edit::Delete(at, n)),
        (0.0..1.0, soup(2)).prop_map(|(at, s)| Edit::Replace(at, s)),
        (0.0..1.0).prop_map(Edit::DuplicateLine),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for e in edits {
        let at = |share: f64, len: usize| ((share * len as f64) as usize).min(len);
        match e {
            Edit::Insert(s, ins) => {
                let i = at(*s, chars.len());
                chars.splice(i..i, ins.chars());
            }
            Edit::Delete(s, n) => {
                let i = at(*s, chars.len());
                let end = (i + n).min(chars.len());
                chars.drain(i..end);
            }
            Edit::Replace(s, with) => {
                let i = at(*s, chars.len());
                let end = (i + with.chars().count()).min(chars.len());
                chars.splice(i..end, with.chars());
            }
            Edit::DuplicateLine(s) => {
                let text: String = chars.iter().collect();
                let lines: Vec<&str> = text.lines().collect();
                if lines.is_empty() {
                    continue;
                }
                let i = at(*s, lines.len() - 1);
                let mut out = lines.clone();
                out.insert(i, lines[i]);
                chars = (out.join("\n") + "\n").chars().collect();
            }
        }
    }
    chars.into_iter().collect()
}

const CONF: &str = "[program:web]\ncommand=/usr/bin/gunicorn app:wsgi -b 127.0.0.1:%(process_num)d\nprocess_name=%(program_name)s_%(process_num)02d\nnumprocs=2\nenvironment=A=\"1\",B=\"x y\"\nstdout_logfile=/var/log/web.log\nautorestart=unexpected\n\n[group:shop]\nprograms=web\n\n[DEFAULT]\nstartsecs=3\n";

proptest! {
    #![proptest_config(config(2_000))]

    #[test]
    fn any_text_is_read_without_panic(text in soup(200)) {
        read_validate_render(&text)?;
    }

    #[test]
    fn mutated_documents_are_read_without_panic(edits in proptest::collection::vec(edit(), 1..6)) {
        read_validate_render(&apply(PROGRAM_DOC, &edits))?;
    }

    #[test]
    fn a_valid_hostile_spec_renders_only_its_own_program(spec in hostile_spec(), name in name()) {
        let p = Program::new(Metadata { name, ..Default::default() }, spec);
        if let Ok(valid) = validate_program(p) {
            check_rendered(&valid)?;
        }
    }

    #[test]
    fn any_conf_file_is_imported_without_panic(edits in proptest::collection::vec(edit(), 0..6), soup in soup(120)) {
        for text in [apply(CONF, &edits), soup] {
            let imported = import(&text, "/etc/supervisor/conf.d", &Placement::Hosts(vec!["web1".into()]));
            for r in imported.resources {
                if let Resource::Program(p) = r
                    && let Ok(valid) = validate_program(p)
                {
                    render::render_program(&valid);
                }
            }
        }
    }

    #[test]
    fn any_environment_file_is_read_without_panic(text in soup(200)) {
        if let Ok(vars) = corral_proto::envfile::parse(&text) {
            for (k, v) in vars {
                prop_assert!(!k.is_empty() && !k.contains('\n') && !v.contains('\n'));
            }
        }
    }
}

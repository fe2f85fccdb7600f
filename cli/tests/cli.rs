//! The `corral` binary's offline commands, run as a user would, checked against
//! supervisord's own config loader.

use std::collections::BTreeMap;
use std::path::Path;

use assert_cmd::Command;
use corral_tests::loader::Loader;
use serde_json::Value;

fn corral() -> Command {
    Command::new(env!("CARGO_BIN_EXE_corral"))
}

fn repo(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::canonicalize(&p).unwrap_or(p).display().to_string()
}

/// What supervisord makes of `text` written as one conf file.
fn load(text: &str) -> BTreeMap<String, Value> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("all.conf");
    std::fs::write(&path, text).expect("write");
    let mut loader = Loader::start().expect("loader");
    match loader.load(&path).expect("loader runs") {
        Ok(m) => m.into_iter().collect(),
        Err(e) => panic!("supervisord refused:\n{text}\n{e}"),
    }
}

/// `corral render -f -` of `yaml`: the conf text, which must render.
fn render_stdin(yaml: &[u8]) -> Vec<u8> {
    let rendered = corral()
        .args(["render", "-f", "-"])
        .write_stdin(yaml.to_vec())
        .output()
        .expect("runs");
    assert!(
        rendered.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&rendered.stderr),
        String::from_utf8_lossy(yaml)
    );
    rendered.stdout
}

#[test]
fn render_prints_every_example_program_and_supervisord_accepts_it() {
    let out = corral()
        .args(["render", "-f", &repo("deploy/examples")])
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let procs = load(&text);
    let names: Vec<&str> = procs.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["celery-beat", "celery-worker_00", "celery-worker_01", "gunicorn"]
    );
    assert_eq!(procs["gunicorn"]["stopasgroup"], Value::Bool(true));
    assert_eq!(
        procs["celery-worker_01"]["environment"]["CELERY_BROKER_URL"],
        "redis://127.0.0.1:6379/0"
    );
}

#[test]
fn render_reads_stdin() {
    let spec = r#"{"apiVersion":"corral.dev/v1","kind":"Program","metadata":{"name":"x"},"spec":{"command":"/bin/true","selector":{}}}"#;
    let out = corral()
        .args(["render", "-f", "-"])
        .write_stdin(spec)
        .output()
        .expect("runs");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("[program:x]\ncommand=/bin/true\n"));
}

#[test]
fn render_refuses_invalid_input_with_every_error_and_prints_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("a-good.yaml");
    std::fs::write(
        &good,
        "apiVersion: corral.dev/v1\nkind: Program\nmetadata: {name: ok}\nspec: {command: /bin/true, selector: {}}\n",
    )
    .expect("write");
    let bad = dir.path().join("b-bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: corral.dev/v1\nkind: Program\nmetadata: {name: inj}\nspec:\n  selector: {}\n  command: \"/bin/true\\n[program:evil]\\ncommand=/bin/id\"\n  environment: {RATE: \"5%\"}\n---\napiVersion: corral.dev/v1\nkind: Program\nmetadata: {name: Bad}\nspec: {command: /bin/true, selector: {}}\n",
    )
    .expect("write");
    let typo = dir.path().join("c-typo.yaml");
    std::fs::write(&typo, "apiVersion: corral.dev/v1\nkind: Program\nmetadata: {name: t}\nspec:\n  command: /bin/true\n  autostrat: true\n").expect("write");
    let out = corral().args(["render", "-f"]).arg(dir.path()).output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stdout.is_empty(),
        "printed {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "spec.command: contains a line break",
        "spec.environment.RATE: contains a bare '%'",
        "metadata.name: \"Bad\"",
        "c-typo.yaml",
        "unknown field `autostrat`",
        "line 6",
    ] {
        assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    }
}

#[test]
fn import_then_render_gives_supervisord_the_same_values() {
    let fixture = repo("cli/tests/fixtures/ansible-guide.conf");
    let original = load(
        &std::fs::read_to_string(&fixture)
            .expect("fixture")
            .replace("%(here)s", &repo("cli/tests/fixtures")),
    );
    let imported = corral()
        .args(["import", &fixture, "--selector", "role=app"])
        .output()
        .expect("runs");
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    let yaml = String::from_utf8(imported.stdout).expect("utf-8");
    assert!(yaml.contains("kind: Group") && yaml.contains("native: true"), "{yaml}");
    let round_tripped = load(&String::from_utf8(render_stdin(yaml.as_bytes())).expect("utf-8"));
    assert_eq!(original.len(), 4);
    assert_eq!(round_tripped, original);
}

#[test]
fn import_refuses_what_it_cannot_express_and_names_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("x.conf");
    std::fs::write(
        &conf,
        "[program:a]\ncommand=/bin/true\nnumprocs=lots\n[program:b]\ncommand=/bin/true\nstartsecs=1\nbogus=1\n",
    )
    .expect("write");
    let out = corral().arg("import").arg(&conf).output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 3: numprocs") && err.contains("line 7: \"bogus\" is not a [program:x] option"),
        "{err}"
    );
}

/// Realistic conf files (`fixtures/corpus/`): each imports so that supervisord's own loader
/// makes the same of the render as of the original, or is refused with the reason its first
/// line names (`; corpus: refused: NEEDLE`).
#[test]
fn a_corpus_of_real_conf_files_imports_faithfully_or_is_refused_with_the_reason() {
    let dir = repo("cli/tests/fixtures/corpus");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("corpus")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "conf"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "the corpus shrank: {files:?}");
    let mut loader = Loader::start().expect("loader");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        let name = file.display().to_string();
        let imported = corral().args(["import", &name]).output().expect("runs");
        let err = String::from_utf8_lossy(&imported.stderr).into_owned();
        if let Some(needle) = text.lines().next().and_then(|l| l.strip_prefix("; corpus: refused: ")) {
            assert_eq!(imported.status.code(), Some(2), "{name} was not refused:\n{err}");
            assert!(imported.stdout.is_empty(), "{name}");
            assert!(
                err.contains(needle),
                "{name}: the refusal does not say {needle:?}:\n{err}"
            );
            continue;
        }
        assert!(imported.status.success(), "{name} was refused:\n{err}");
        let mut original = match loader.load(&file).expect("loader runs") {
            Ok(m) => m,
            Err(e) => panic!("supervisord refuses the original {name}: {e}"),
        };
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("render.conf");
        std::fs::write(&path, render_stdin(&imported.stdout)).expect("write");
        let mut round_tripped = match loader.load(&path).expect("loader runs") {
            Ok(m) => m,
            Err(e) => panic!("supervisord refuses the render of {name}: {e}"),
        };
        // Continuation lines are line breaks in supervisord's value and spaces in Corral's;
        // its shell-like split makes the same argv of both (`ini::fold_lines` is unit-tested
        // for what it keeps).
        for r in round_tripped.values_mut().chain(original.values_mut()) {
            if let Some(Value::String(c)) = r.get_mut("command") {
                *c = c.split_whitespace().collect::<Vec<_>>().join(" ");
            }
        }
        // Corral's one decision here (ARCHITECTURE, Decisions): a program of several
        // processes is one supervisord program per process, so each process is its own
        // group (`w_00`, not `w:w_00`); everything else must be what it was.
        for (process, r) in round_tripped.iter_mut() {
            if r["group"] == Value::String(process.clone())
                && let Some(o) = original.get_mut(process)
                && o["group"] != r["group"]
            {
                r.as_object_mut().map(|m| m.remove("group"));
                o.as_object_mut().map(|m| m.remove("group"));
            }
        }
        assert_eq!(round_tripped, original, "{name}: supervisord sees something else");
    }
}

#[test]
fn import_names_what_it_cannot_declare_unless_told_to_skip_it() {
    let file = repo("cli/tests/fixtures/corpus/eventlistener.conf");
    let out = corral().args(["import", &file]).output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--skip-unsupported"));
    let out = corral()
        .args(["import", &file, "--skip-unsupported"])
        .output()
        .expect("runs");
    assert!(out.status.success());
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(yaml.contains("name: web") && !yaml.contains("memmon"), "{yaml}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning:"));
}

#[test]
fn every_command_has_examples_and_the_exit_codes_are_in_the_help() {
    let help = |args: &[&str]| {
        let out = corral().args(args).arg("--help").output().expect("runs");
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let top = help(&[]);
    assert!(
        top.contains("Exit codes") && top.contains("3  the controller could not be reached"),
        "{top}"
    );
    for verb in [
        "apply",
        "diff",
        "get",
        "describe",
        "delete",
        "start",
        "stop",
        "restart",
        "signal",
        "status",
        "version",
        "completion",
        "render",
        "import",
        "dev",
        "history",
        "label",
        "cordon",
        "uncordon",
        "drain",
        "rollout",
    ] {
        let text = help(&[verb]);
        assert!(text.contains("Example"), "{verb} --help has no example:\n{text}");
        if text.contains("--filename") {
            assert!(
                text.contains("a directory of them"),
                "{verb}: -f is not described:\n{text}"
            );
        }
        if text.contains("--output") {
            assert!(text.contains("yaml or json"), "{verb}: -o is not described:\n{text}");
        }
    }
}

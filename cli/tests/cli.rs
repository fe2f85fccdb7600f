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
    let rendered = corral()
        .args(["render", "-f", "-"])
        .write_stdin(yaml.clone())
        .output()
        .expect("runs");
    assert!(
        rendered.status.success(),
        "{}\n{yaml}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let round_tripped = load(&String::from_utf8(rendered.stdout).expect("utf-8"));
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
        err.contains("line 3: numprocs") && err.contains("line 7: bogus"),
        "{err}"
    );
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

//! The shared conformance sample (`../shared/conformance`): every `reject/` spec is refused
//! with an error naming the field; every `accept/` spec renders to a file that supervisord's
//! own loader reads back with the expected values.

use std::path::{Path, PathBuf};

use corral_proto::{Resource, parse_documents, validate_program};
use serde_json::Value;

use crate::render_roundtrip::load_rendered;

fn dir(kind: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/conformance")
        .join(kind);
    assert!(
        d.is_dir(),
        "{} is missing: the conformance sample lives in shared/ beside the repository",
        d.display()
    );
    d
}

fn yaml_files(kind: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir(kind))
        .expect("readable")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no {kind} cases");
    files
}

/// Parses and validates every document; the error text if any step refuses.
fn check(path: &Path) -> Result<Vec<corral_proto::Valid<corral_proto::Program>>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let docs = parse_documents(&path.display().to_string(), &text).map_err(|e| e.to_string())?;
    docs.into_iter()
        .map(|d| match d {
            Resource::Program(p) => validate_program(p).map_err(|e| e.to_string()),
            other => Err(format!("unexpected {}", other.kind())),
        })
        .collect()
}

#[test]
fn every_reject_case_is_refused_with_a_reason_naming_the_field() {
    let known = [
        ("bad-signal", "spec.stopsignal"),
        ("bare-percent-in-env", "spec.environment.RATE"),
        ("newline-in-command", "spec.command"),
        ("numprocs-needs-process-num", "spec.process_name"),
        ("quote-in-env-value", "spec.environment.MSG"),
        ("slash-in-name", "metadata.name"),
        ("space-semicolon-in-command", "spec.command"),
        ("unknown-option", "autostrat"),
    ];
    for path in yaml_files("reject") {
        let err = match check(&path) {
            Ok(_) => panic!("{} was accepted", path.display()),
            Err(e) => e,
        };
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        if let Some((_, field)) = known.iter().find(|(k, _)| *k == stem) {
            assert!(err.contains(field), "{stem}: error does not name {field}: {err}");
        }
    }
}

#[test]
fn every_accept_case_renders_to_the_expected_supervisord_values() {
    for path in yaml_files("accept") {
        let programs = check(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let expect: Value = serde_json::from_str(
            &std::fs::read_to_string(path.with_extension("expect.json")).expect("expect.json beside the case"),
        )
        .expect("valid JSON");
        let tmp = tempfile::tempdir().expect("tempdir");
        for p in programs {
            let got = load_rendered(&p, None, tmp.path()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            for (key, want) in expect.as_object().expect("object") {
                if key == "_processes" {
                    let names: Vec<&String> = got.keys().collect();
                    let want: Vec<String> = serde_json::from_value(want.clone()).expect("names");
                    assert_eq!(names, want.iter().collect::<Vec<_>>(), "{}", path.display());
                    continue;
                }
                for (proc_name, values) in &got {
                    assert_eq!(values.get(key), Some(want), "{}: {proc_name}.{key}", path.display());
                }
            }
        }
    }
}

//! Commands that need no server: `render` and `import`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use corral_proto::import::{Placement, import as import_conf};
use corral_proto::render::render_program_in;
use corral_proto::{Resource, group_file_name, program_file_name, render_group, validate_group, validate_program};

use crate::input::read_resources;

/// Prints every error on stderr and returns the exit code for invalid input.
fn refuse(errors: &[String]) -> ExitCode {
    for e in errors {
        eprintln!("{e}");
    }
    crate::exit::code(crate::exit::INVALID)
}

/// Validates everything, then renders; nothing is printed unless all of it is valid.
pub fn render(files: &[String]) -> anyhow::Result<ExitCode> {
    let docs = read_resources(files)?;
    let (resources, mut errors) = (docs.resources, docs.errors);
    // A member of a native group renders as the agent renders it there.
    let native: BTreeMap<String, String> = resources
        .iter()
        .filter_map(|(_, r)| match r {
            Resource::Group(g) if g.spec.native => Some(g),
            _ => None,
        })
        .flat_map(|g| g.spec.programs.iter().map(|p| (p.clone(), g.metadata.name.clone())))
        .collect();
    let mut out = Vec::new();
    for (source, r) in resources {
        match r {
            Resource::Program(p) => match validate_program(p) {
                Ok(p) => match render_program_in(&p, native.get(&p.metadata.name).map(String::as_str)) {
                    Ok(text) => out.push((program_file_name(&p.metadata.name), text)),
                    Err(e) => errors.push(format!("{source}: {e}")),
                },
                Err(e) => errors.push(format!("{source}: {e}")),
            },
            Resource::Group(g) => match validate_group(g) {
                Ok(g) if g.spec.native => out.push((group_file_name(&g.metadata.name), render_group(&g))),
                Ok(_) => {}
                Err(e) => errors.push(format!("{source}: {e}")),
            },
            Resource::Host(_) => {}
        }
    }
    if !errors.is_empty() {
        return Ok(refuse(&errors));
    }
    let text: Vec<String> = out
        .into_iter()
        .map(|(file, body)| format!("; ==> {file} <==\n{body}"))
        .collect();
    out!("{}", text.join("\n"));
    Ok(ExitCode::SUCCESS)
}

fn parse_selector(s: &str) -> anyhow::Result<BTreeMap<String, String>> {
    s.split(',')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--selector: {kv:?} is not key=value"))?;
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

/// Imports conf files and prints the resources as YAML; refuses (exit 1) if any section
/// cannot be expressed or the result does not validate.
pub fn import(
    paths: &[String],
    selector: Option<&str>,
    hosts: Option<&str>,
    skip_unsupported: bool,
) -> anyhow::Result<ExitCode> {
    let placement = match (selector, hosts) {
        (_, Some(h)) => Placement::Hosts(h.split(',').filter(|h| !h.is_empty()).map(String::from).collect()),
        (Some(s), None) => Placement::Selector(parse_selector(s)?),
        (None, None) => {
            eprintln!(
                "note: imported programs select every host (selector: {{}}); use --selector or --hosts to narrow"
            );
            Placement::Selector(BTreeMap::new())
        }
    };
    let mut files = Vec::new();
    for p in paths {
        let path = Path::new(p);
        if path.is_dir() {
            let mut confs: Vec<_> = std::fs::read_dir(path)
                .with_context(|| format!("read directory {p}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|e| e == "conf"))
                .collect();
            confs.sort();
            files.extend(confs);
        } else {
            files.push(path.to_path_buf());
        }
    }
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
        // supervisord's %(here)s is the file's directory as an absolute, normalised path.
        let abs = std::fs::canonicalize(&file).with_context(|| format!("resolve {}", file.display()))?;
        let here = abs
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|| "/".into());
        let imported = import_conf(&text, &here, &placement);
        match imported.errors.is_empty() {
            false => {
                for w in &imported.warnings {
                    eprintln!("warning: {}: {w}", file.display());
                }
                errors.extend(imported.errors.into_iter().map(|e| format!("{}: {e}", file.display())));
            }
            true => {
                for s in imported.skipped {
                    eprintln!("note: {}: skipped {s}", file.display());
                }
                for w in imported.warnings {
                    eprintln!("warning: {}: {w}", file.display());
                }
                for u in imported.unsupported {
                    if skip_unsupported {
                        eprintln!("warning: {}: skipped {u}", file.display());
                    } else {
                        errors.push(format!(
                            "{}: {u} (its processes would not run; --skip-unsupported imports the rest)",
                            file.display()
                        ));
                    }
                }
                for r in imported.resources {
                    let checked = match r {
                        Resource::Program(p) => validate_program(p).map(|p| Resource::Program(p.into_inner())),
                        Resource::Group(g) => validate_group(g).map(|g| Resource::Group(g.into_inner())),
                        host => Ok(host),
                    };
                    match checked {
                        Ok(r) => docs.push(r),
                        Err(e) => errors.push(format!("{}: {e}", file.display())),
                    }
                }
            }
        }
    }
    if !errors.is_empty() {
        return Ok(refuse(&errors));
    }
    let yaml: Vec<String> = docs
        .iter()
        .map(|d| serde_saphyr::to_string(d).context("serialize YAML"))
        .collect::<anyhow::Result<_>>()?;
    out!("{}", yaml.join("---\n"));
    Ok(ExitCode::SUCCESS)
}

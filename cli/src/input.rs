//! Reading resource documents from files, directories and stdin.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use corral_proto::{Resource, parse_every_document};

/// The files a `-f` argument names: the file itself, or a directory's `*.yaml`, `*.yml` and
/// `*.json` files in name order.
fn expand(arg: &str) -> anyhow::Result<Vec<PathBuf>> {
    let path = Path::new(arg);
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).with_context(|| format!("read directory {arg}"))? {
        let p = entry.with_context(|| format!("read directory {arg}"))?.path();
        if p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json") {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// What a set of `-f` arguments holds.
#[derive(Debug, Default)]
pub struct Documents {
    /// Each resource with the name of the file it came from, in order.
    pub resources: Vec<(String, Resource)>,
    /// The parse error of every document that does not parse (all of them, not just the first).
    pub errors: Vec<String>,
}

/// Reads every resource in the given `-f` arguments.
///
/// # Errors
/// A file or directory that cannot be read.
pub fn read_resources(args: &[String]) -> anyhow::Result<Documents> {
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    for arg in args {
        let sources: Vec<(String, String)> = if arg == "-" {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).context("read stdin")?;
            vec![("-".to_string(), text)]
        } else {
            expand(arg)?
                .into_iter()
                .map(|p| {
                    let text = std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
                    Ok((p.display().to_string(), text))
                })
                .collect::<anyhow::Result<_>>()?
        };
        for (name, text) in sources {
            let (docs, bad) = parse_every_document(&name, &text);
            resources.extend(docs.into_iter().map(|d| (name.clone(), d)));
            errors.extend(bad.iter().map(ToString::to_string));
        }
    }
    Ok(Documents { resources, errors })
}

//! `corral import`: existing supervisord conf files -> Corral resources, one to one.
//!
//! `[program:x]` becomes a Program with the same options; `[group:x]` becomes a native Group,
//! which is what such a host runs today. Other sections (`[supervisord]`, `[include]`,
//! `[eventlistener:x]`, ...) are not Corral's business and are reported as skipped.

use std::collections::BTreeMap;

use crate::ini::{self, Section};
use crate::resource::{
    AutoRestart, ByteSize, Group, GroupSpec, Metadata, PROGRAM_OPTIONS, Program, ProgramSpec, Resource,
};
use crate::validate::check_name;

/// Where imported programs should run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    Selector(BTreeMap<String, String>),
    Hosts(Vec<String>),
}

/// What an import produced.
#[derive(Debug, Default)]
pub struct Imported {
    pub resources: Vec<Resource>,
    /// Sections that were not imported, and why.
    pub skipped: Vec<String>,
}

fn truthy(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "yes" | "true" | "on" | "1" => Ok(true),
        "no" | "false" | "off" | "0" => Ok(false),
        _ => Err(format!("{v:?} is not a boolean")),
    }
}

fn int(v: &str) -> Result<i64, String> {
    v.parse().map_err(|_| format!("{v:?} is not an integer"))
}

fn set_option(spec: &mut ProgramSpec, key: &str, v: &str) -> Result<(), String> {
    macro_rules! assign {
        ($($field:ident => $conv:expr),* $(,)?) => {
            match key {
                $( stringify!($field) => spec.$field = Some($conv(v)?), )*
                "command" => spec.command = v.to_string(),
                other => return Err(format!("{other:?} is not a supervisord 4.2 [program:x] option")),
            }
        };
    }
    let text = |v: &str| -> Result<String, String> { Ok(v.to_string()) };
    let bytes = ByteSize::parse;
    let autorestart = |v: &str| match v.to_ascii_lowercase().as_str() {
        "unexpected" => Ok(AutoRestart::Unexpected),
        other => truthy(other).map(|b| if b { AutoRestart::Always } else { AutoRestart::Never }),
    };
    let exitcodes = |v: &str| v.split(',').map(|c| int(c.trim())).collect::<Result<Vec<_>, _>>();
    let environment = |v: &str| ini::environment_pairs(v).map(|p| p.into_iter().collect::<BTreeMap<_, _>>());
    assign! {
        process_name => text, numprocs => int, numprocs_start => int, priority => int,
        autostart => truthy, autorestart => autorestart, startsecs => int, startretries => int,
        exitcodes => exitcodes, stopsignal => text, stopwaitsecs => int, stopasgroup => truthy,
        killasgroup => truthy, user => text, redirect_stderr => truthy,
        stdout_logfile => text, stdout_logfile_maxbytes => bytes, stdout_logfile_backups => int,
        stdout_capture_maxbytes => bytes, stdout_events_enabled => truthy, stdout_syslog => truthy,
        stderr_logfile => text, stderr_logfile_maxbytes => bytes, stderr_logfile_backups => int,
        stderr_capture_maxbytes => bytes, stderr_events_enabled => truthy, stderr_syslog => truthy,
        environment => environment, directory => text, umask => text, serverurl => text,
    }
    debug_assert!(PROGRAM_OPTIONS.contains(&key));
    Ok(())
}

fn program(section: &Section, name: &str, here: &str, placement: &Placement) -> Result<Program, Vec<String>> {
    let mut spec = ProgramSpec::default();
    match placement {
        Placement::Selector(s) => spec.selector = Some(s.clone()),
        Placement::Hosts(h) => spec.hosts = Some(h.clone()),
    }
    let mut errors = Vec::new();
    let mut has_command = false;
    // Later duplicates win, as in supervisord: apply in order.
    for (key, value, line) in &section.entries {
        // supervisord replaces %(here)s with the directory of the file before anything else.
        let value = value.replace("%(here)s", here);
        has_command |= key == "command";
        if let Err(e) = set_option(&mut spec, key, &value) {
            errors.push(format!("[{}] line {line}: {key}: {e}", section.name));
        }
    }
    if !has_command {
        errors.push(format!("[{}]: has no command", section.name));
    }
    if errors.is_empty() {
        Ok(Program::new(
            Metadata {
                name: name.to_string(),
                ..Default::default()
            },
            spec,
        ))
    } else {
        Err(errors)
    }
}

fn group(section: &Section, name: &str) -> Result<Group, Vec<String>> {
    let mut spec = GroupSpec {
        native: true,
        ..Default::default()
    };
    let mut errors = Vec::new();
    for (key, value, line) in &section.entries {
        match key.as_str() {
            "programs" => {
                spec.programs = value
                    .split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(String::from)
                    .collect();
            }
            "priority" => match int(value) {
                Ok(p) => spec.priority = Some(p),
                Err(e) => errors.push(format!("[{}] line {line}: priority: {e}", section.name)),
            },
            other => errors.push(format!(
                "[{}] line {line}: {other:?} is not a [group:x] option",
                section.name
            )),
        }
    }
    if errors.is_empty() {
        Ok(Group::new(
            Metadata {
                name: name.to_string(),
                ..Default::default()
            },
            spec,
        ))
    } else {
        Err(errors)
    }
}

/// Imports the text of one conf file whose directory is `here` (for `%(here)s`).
///
/// The result is not validated: callers run it through `validate` like any other input, so
/// an imported option Corral refuses is reported the same way.
///
/// # Errors
/// Every section that cannot be expressed, with its line.
pub fn import(text: &str, here: &str, placement: &Placement) -> Result<Imported, Vec<String>> {
    let sections = ini::parse(text).map_err(|e| vec![e.to_string()])?;
    let mut out = Imported::default();
    let mut errors = Vec::new();
    for section in &sections {
        let (kind, name) = section.name.split_once(':').unwrap_or((section.name.as_str(), ""));
        let name = name.trim();
        if matches!(kind, "program" | "group")
            && let Err(e) = check_name(name)
        {
            errors.push(format!("[{}] line {}: {e}", section.name, section.line));
            continue;
        }
        let made = match kind {
            "program" => program(section, name, here, placement).map(Resource::Program),
            "group" => group(section, name).map(Resource::Group),
            _ => {
                out.skipped.push(format!("[{}] (not a program or group)", section.name));
                continue;
            }
        };
        match made {
            Ok(r) => out.resources.push(r),
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_programs_and_groups_with_typed_values() {
        let text = "[supervisord]\nlogfile=/tmp/x\n[program:celery-worker]\ncommand=%(here)s/bin/celery worker\nnumprocs=2\nprocess_name=%(program_name)s_%(process_num)02d\nautorestart=true\nstdout_logfile_maxbytes=10MB\nenvironment=A=\"1\",B=\"x,y\"\nstopasgroup=yes\n[group:app]\nprograms=celery-worker, beat\npriority=10\n";
        let got = import(text, "/srv", &Placement::Selector(BTreeMap::new())).expect("imports");
        assert_eq!(got.skipped.len(), 1);
        let [Resource::Program(p), Resource::Group(g)] = got.resources.as_slice() else {
            panic!("{:?}", got.resources)
        };
        assert_eq!(p.spec.command, "/srv/bin/celery worker");
        assert_eq!(p.spec.numprocs, Some(2));
        assert_eq!(p.spec.autorestart, Some(AutoRestart::Always));
        assert_eq!(p.spec.stdout_logfile_maxbytes, Some(ByteSize(10 << 20)));
        assert_eq!(p.spec.stopasgroup, Some(true));
        assert_eq!(
            p.spec.environment.as_ref().and_then(|e| e.get("B")).map(String::as_str),
            Some("x,y")
        );
        assert_eq!(g.spec.programs, ["celery-worker", "beat"]);
        assert_eq!(g.spec.priority, Some(10));
        assert!(g.spec.native);
    }

    #[test]
    fn reports_every_bad_option_with_its_line() {
        let text =
            "[program:a]\ncommand=x\nnumprocs=many\nbogus=1\n[program:Bad.Name]\ncommand=x\n[program:b]\nautostart=1\n";
        let errs = import(text, "/", &Placement::Hosts(vec!["h".into()])).expect_err("refused");
        assert_eq!(errs.len(), 4, "{errs:#?}");
        assert!(errs[0].contains("line 3") && errs[0].contains("not an integer"));
        assert!(errs[1].contains("line 4") && errs[1].contains("\"bogus\""));
        assert!(errs[2].contains("not a valid name"));
        assert!(errs[3].contains("no command"));
    }
}

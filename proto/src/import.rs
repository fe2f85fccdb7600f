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
    /// Sections that are supervisord's own business (`[supervisord]`, `[include]`, ...).
    pub skipped: Vec<String>,
    /// Sections that run processes Corral cannot declare (`[eventlistener:x]`,
    /// `[fcgi-program:x]`): the import is incomplete without them.
    pub unsupported: Vec<String>,
    /// What was dropped or folded, and why: keys supervisord ignores, `[DEFAULT]` and
    /// `[supervisord] environment=` values folded into each program.
    pub warnings: Vec<String>,
    /// What cannot be expressed, with its line: the import is refused when there is any.
    pub errors: Vec<String>,
}

/// Sections that run processes, which an import cannot leave out silently.
const UNSUPPORTED: [&str; 2] = ["eventlistener", "fcgi-program"];

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

/// What every program of the file inherits: `[DEFAULT]` options (Python's ConfigParser
/// gives them to every section) and `[supervisord] environment=` (every child's environment).
#[derive(Debug, Default)]
struct Inherited<'a> {
    defaults: Vec<&'a (String, String, usize)>,
    environment: BTreeMap<String, String>,
}

fn program(
    section: &Section,
    name: &str,
    here: &str,
    placement: &Placement,
    inherited: &Inherited<'_>,
    warnings: &mut Vec<String>,
) -> Result<Program, Vec<String>> {
    let mut spec = ProgramSpec::default();
    match placement {
        Placement::Selector(s) => spec.selector = Some(s.clone()),
        Placement::Hosts(h) => spec.hosts = Some(h.clone()),
    }
    let mut errors = Vec::new();
    let mut has_command = false;
    // [DEFAULT] first, then the section's own options; later duplicates win, as in supervisord.
    let own = section.entries.iter().map(|e| (e, false));
    let entries = inherited.defaults.iter().map(|e| (*e, true)).chain(own);
    for ((key, value, line), from_default) in entries {
        let known = key == "command" || PROGRAM_OPTIONS.contains(&key.as_str());
        if !known {
            // supervisord reads the options it knows and ignores the rest.
            if !from_default {
                warnings.push(format!(
                    "[{}] line {line}: {key:?} is not a [program:x] option; supervisord ignores it, so it is dropped",
                    section.name
                ));
            }
            continue;
        }
        // supervisord replaces %(here)s with the directory of the file before anything else.
        let value = match ini::fold_lines(&value.replace("%(here)s", here)) {
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("[{}] line {line}: {key}: {e}", section.name));
                continue;
            }
        };
        has_command |= key == "command";
        if let Err(e) = set_option(&mut spec, key, &value) {
            errors.push(format!("[{}] line {line}: {key}: {e}", section.name));
        }
    }
    if !has_command {
        errors.push(format!("[{}]: has no command", section.name));
    }
    if spec.redirect_stderr == Some(true) && spec.stderr_logfile.take().is_some() {
        warnings.push(format!(
            "[{}]: stderr_logfile is dropped: with redirect_stderr=true supervisord ignores it",
            section.name
        ));
    }
    if !inherited.environment.is_empty() {
        let own = spec.environment.take().unwrap_or_default();
        let mut env = inherited.environment.clone();
        env.extend(own);
        spec.environment = Some(env);
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

fn group(section: &Section, name: &str, warnings: &mut Vec<String>) -> Result<Group, Vec<String>> {
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
            other => warnings.push(format!(
                "[{}] line {line}: {other:?} is not a [group:x] option; supervisord ignores it, so it is dropped",
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
/// Every section that cannot be expressed is in `errors`, with its line; warnings are kept
/// either way.
pub fn import(text: &str, here: &str, placement: &Placement) -> Imported {
    let mut out = Imported::default();
    let sections = match ini::parse(text) {
        Ok(s) => s,
        Err(e) => {
            out.errors.push(e.to_string());
            return out;
        }
    };
    let mut errors = Vec::new();
    let mut inherited = Inherited::default();
    if let Some(d) = sections.iter().find(|s| s.name == "DEFAULT") {
        for e in &d.entries {
            if e.0 == "command" || PROGRAM_OPTIONS.contains(&e.0.as_str()) {
                inherited.defaults.push(e);
            }
        }
        if !inherited.defaults.is_empty() {
            out.warnings.push(format!(
                "[DEFAULT] line {}: its options ({}) are folded into every program, as supervisord applies them",
                d.line,
                inherited
                    .defaults
                    .iter()
                    .map(|e| e.0.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    if let Some(s) = sections.iter().find(|s| s.name == "supervisord")
        && let Some(env) = s.get("environment")
    {
        match ini::fold_lines(env).and_then(|v| ini::environment_pairs(&v)) {
            Ok(pairs) => {
                inherited.environment = pairs.into_iter().collect();
                out.warnings.push(format!(
                    "[supervisord] environment= ({}) is folded into every program's environment, as its processes inherit it",
                    inherited.environment.keys().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
            Err(e) => errors.push(format!("[supervisord] line {}: environment: {e}", s.line)),
        }
    }
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
            "program" => program(section, name, here, placement, &inherited, &mut out.warnings).map(Resource::Program),
            "group" => group(section, name, &mut out.warnings).map(Resource::Group),
            k if UNSUPPORTED.contains(&k) => {
                out.unsupported.push(format!(
                    "[{}] (line {}): Corral cannot declare a {k} section",
                    section.name, section.line
                ));
                continue;
            }
            "DEFAULT" => continue,
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
    out.errors = errors;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_programs_and_groups_with_typed_values() {
        let text = "[supervisord]\nlogfile=/tmp/x\n[program:celery-worker]\ncommand=%(here)s/bin/celery worker\nnumprocs=2\nprocess_name=%(program_name)s_%(process_num)02d\nautorestart=true\nstdout_logfile_maxbytes=10MB\nenvironment=A=\"1\",B=\"x,y\"\nstopasgroup=yes\n[group:app]\nprograms=celery-worker, beat\npriority=10\n";
        let got = import(text, "/srv", &Placement::Selector(BTreeMap::new()));
        assert!(got.errors.is_empty(), "{:?}", got.errors);
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
        let got = import(text, "/", &Placement::Hosts(vec!["h".into()]));
        let errs = got.errors;
        assert!(
            got.warnings
                .iter()
                .any(|w| w.contains("line 4") && w.contains("\"bogus\""))
        );
        assert_eq!(errs.len(), 3, "{errs:#?}");
        assert!(errs[0].contains("line 3") && errs[0].contains("not an integer"));
        assert!(errs[1].contains("not a valid name"));
        assert!(errs[2].contains("no command"));
    }

    #[test]
    fn what_supervisord_ignores_is_dropped_and_what_it_inherits_is_folded_in() {
        let text = "[DEFAULT]\nautorestart=true\nfoo=1\n\
                    [supervisord]\nenvironment=LANG=\"C.UTF-8\",APP_ENV=\"prod\"\n\
                    [program:web]\ncommand=/usr/bin/gunicorn\n  app:wsgi\n  --workers 4\ngroup=www\nloglevel=debug\n\
                    redirect_stderr=true\nstderr_logfile=/var/log/web.err\nenvironment=APP_ENV=\"staging\"\n\
                    [program:other]\ncommand=/bin/true\nautorestart=false\n\
                    [eventlistener:memmon]\ncommand=memmon -a 200MB\nevents=TICK_60\n";
        let got = import(text, "/", &Placement::Selector(BTreeMap::new()));
        assert!(got.errors.is_empty(), "{:?}", got.errors);
        let [Resource::Program(web), Resource::Program(other)] = got.resources.as_slice() else {
            panic!("{:?}", got.resources)
        };
        // Continuation lines outside quotes are spaces, as supervisord splits them.
        assert_eq!(web.spec.command, "/usr/bin/gunicorn app:wsgi --workers 4");
        // [DEFAULT] applies unless the program sets its own.
        assert_eq!(web.spec.autorestart, Some(AutoRestart::Always));
        assert_eq!(other.spec.autorestart, Some(AutoRestart::Never));
        // [supervisord] environment= is inherited; the program's own value wins.
        let env = web.spec.environment.clone().unwrap_or_default();
        assert_eq!(env.get("LANG").map(String::as_str), Some("C.UTF-8"));
        assert_eq!(env.get("APP_ENV").map(String::as_str), Some("staging"));
        assert_eq!(web.spec.stderr_logfile, None);
        let warnings = got.warnings.join("\n");
        for needle in [
            "\"group\" is not a [program:x] option",
            "\"loglevel\"",
            "stderr_logfile is dropped",
            "[DEFAULT]",
            "[supervisord] environment=",
        ] {
            assert!(warnings.contains(needle), "{needle}: {warnings}");
        }
        assert_eq!(got.unsupported.len(), 1);
        assert!(got.unsupported[0].contains("[eventlistener:memmon]"));

        // A line break inside quotes cannot be carried: refused, with the reason.
        let errs = import(
            "[program:sh]\ncommand=/bin/sh -c 'echo a\n  echo b'\n",
            "/",
            &Placement::Selector(BTreeMap::new()),
        )
        .errors;
        assert!(errs[0].contains("spans lines"), "{errs:?}");
    }
}

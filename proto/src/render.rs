//! The pure renderer: a validated `Program` or native `Group` -> the text of one managed
//! supervisord conf file, plus the names supervisord will give its processes.
//!
//! Every option is written out explicitly, defaults included, so what a host runs never
//! depends on the defaults of the supervisord version installed there, and a file shows the
//! whole truth to whoever opens it. Output is deterministic: the same spec gives the same bytes.
//!
//! Architecture Invariant: only `Valid<_>` values are rendered; validation guarantees that
//! every value is one INI line that supervisord reads back exactly.

use std::fmt::Write as _;

use std::collections::BTreeMap;

use crate::resource::{AutoRestart, DesiredState, Group, Program, ProgramSpec};
use crate::signal;
use crate::template::{self, Context, Scope};
use crate::validate::Valid;

/// supervisord's default `process_name`.
pub const DEFAULT_PROCESS_NAME: &str = "%(program_name)s";

/// First line of every file Corral owns; together with the file name it marks the file as ours.
pub const HEADER: &str = "; Managed by Corral. Do not edit: the agent reverts changes to this file.";

const FILE_PREFIX: &str = "corral-";

/// What a managed conf file holds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ManagedFile {
    Program(String),
    Group(String),
}

/// `corral-program-<name>.conf`.
pub fn program_file_name(name: &str) -> String {
    format!("{FILE_PREFIX}program-{name}.conf")
}

/// `corral-group-<name>.conf`.
pub fn group_file_name(name: &str) -> String {
    format!("{FILE_PREFIX}group-{name}.conf")
}

/// Recognises the name of a file that Corral wrote; anything else in the conf dir is not ours.
pub fn managed_file_kind(file_name: &str) -> Option<ManagedFile> {
    let rest = file_name.strip_prefix(FILE_PREFIX)?.strip_suffix(".conf")?;
    let (kind, name) = rest.split_once('-')?;
    crate::validate::check_name(name).ok()?;
    match kind {
        "program" => Some(ManagedFile::Program(name.to_string())),
        "group" => Some(ManagedFile::Group(name.to_string())),
        _ => None,
    }
}

fn line(out: &mut String, key: &str, value: impl std::fmt::Display) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "{key}={value}");
}

fn bool_str(b: bool) -> &'static str {
    if b { "true" } else { "false" }
}

/// Whether Corral gives each process of `p` its own supervisord program (and so its own
/// group), named by its expanded `process_name` (for `numprocs > 1`, or a `process_name` with
/// `%(process_num)`), with `%(process_num)`, `%(numprocs)`,
/// `%(program_name)` and `%(group_name)` expanded by Corral to what supervisord would have
/// made of them. supervisord cannot add a process to a running group, and decides "changed"
/// per group, so with native `numprocs` scaling 2 -> 4 restarts the first two (supervisor
/// #177); one group per process lets scaling start and stop only the processes that come and
/// go. Not for members of a native group (its members are restarted together anyway), nor for
/// a `process_name` that mentions `%(here)` or `%(host_node_name)` (which supervisord, not
/// Corral, knows).
pub fn per_process(p: &Program, native_group: Option<&str>) -> bool {
    let template = p.spec.process_name.as_deref().unwrap_or(DEFAULT_PROCESS_NAME);
    // A process_name with %(process_num) is a program meant to scale: at numprocs 1 too, so
    // that scaling 1 -> 4 or 4 -> 1 keeps the first process as it is.
    native_group.is_none()
        && (p.spec.numprocs.unwrap_or(1) > 1 || template::mentions_process_num(template))
        && !template.contains("%(here)")
        && !template.contains("%(host_node_name)")
}

/// The `[program:x]` sections `p` renders to, by supervisord program name: one, or one per
/// process (see [`per_process`]).
///
/// # Errors
/// The expansion error, if a value does not expand (validation reports it first).
pub fn sections(p: &Valid<Program>, native_group: Option<&str>) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    if !per_process(p, native_group) {
        let mut text = String::with_capacity(1024);
        write_section(&mut text, &p.metadata.name, &p.spec, native_group.is_none());
        out.insert(p.metadata.name.clone(), text);
        return Ok(out);
    }
    let s = &p.spec;
    let numprocs = u32::try_from(s.numprocs.unwrap_or(1)).map_err(|_| "numprocs out of range".to_string())?;
    let start = u32::try_from(s.numprocs_start.unwrap_or(0)).map_err(|_| "numprocs_start out of range".to_string())?;
    let names = process_names(p, "", &p.metadata.name)?;
    for (process_num, name) in (start..).zip(names) {
        let ctx = Context {
            program_name: p.metadata.name.clone(),
            group_name: p.metadata.name.clone(),
            process_num,
            numprocs,
            ..Default::default()
        };
        let pin = |v: &str, scope: Scope| template::pin(v, scope, &ctx);
        let pin_opt = |v: &Option<String>, scope: Scope| v.as_deref().map(|v| pin(v, scope)).transpose();
        let mut one = s.clone();
        one.command = pin(&s.command, Scope::Process)?;
        one.process_name = None;
        one.numprocs = None;
        one.numprocs_start = None;
        one.stdout_logfile = pin_opt(&s.stdout_logfile, Scope::Process)?;
        one.stderr_logfile = pin_opt(&s.stderr_logfile, Scope::Process)?;
        one.directory = pin_opt(&s.directory, Scope::Process)?;
        one.serverurl = pin_opt(&s.serverurl, Scope::Program)?;
        if let Some(env) = &s.environment {
            one.environment = Some(
                env.iter()
                    .map(|(k, v)| Ok((k.clone(), pin(v, Scope::Process)?)))
                    .collect::<Result<_, String>>()?,
            );
        }
        let mut text = String::with_capacity(1024);
        write_section(&mut text, &name, &one, true);
        out.insert(name, text);
    }
    Ok(out)
}

/// Renders the managed file of `p` (`native_group`: the native group it belongs to on this
/// host, if any): Corral's header, then its section(s) in name order.
///
/// # Errors
/// The expansion error, if a value does not expand (validation reports it first).
pub fn render_program_in(p: &Valid<Program>, native_group: Option<&str>) -> Result<String, String> {
    let mut out = String::with_capacity(1024);
    out.push_str(HEADER);
    out.push('\n');
    for text in sections(p, native_group)?.values() {
        out.push_str(text);
    }
    Ok(out)
}

/// Renders the managed file of a program that is in no native group.
pub fn render_program(p: &Valid<Program>) -> String {
    // Validation made sure every value expands; an error here would be a bug, shown in the
    // file where supervisord will refuse it rather than hidden.
    render_program_in(p, None).unwrap_or_else(|e| format!("{HEADER}\n; cannot render: {e}\n"))
}

/// Writes one `[program:name]` section for spec `s`.
///
/// `autostart` is written as `autostart && state == running` (`follow_state`), so that a
/// supervisord restart never starts, even briefly, a program whose desired state is stopped;
/// and false for a program with `depends_on`: the agent starts it once what it depends on
/// runs (supervisord would start it at once).
/// Not for a member of a native group: there the state would be part of the group's config,
/// and stopping one member would restart its siblings; the agent starts and stops it instead.
fn write_section(out: &mut String, name: &str, s: &ProgramSpec, follow_state: bool) {
    let _ = writeln!(out, "[program:{name}]");
    line(out, "command", &s.command);
    line(
        out,
        "process_name",
        s.process_name.as_deref().unwrap_or(DEFAULT_PROCESS_NAME),
    );
    line(out, "numprocs", s.numprocs.unwrap_or(1));
    line(out, "numprocs_start", s.numprocs_start.unwrap_or(0));
    line(out, "priority", s.priority.unwrap_or(999));
    line(
        out,
        "autostart",
        bool_str(
            s.autostart.unwrap_or(true)
                && (!follow_state || s.state == DesiredState::Running)
                && s.depends_on.as_ref().is_none_or(Vec::is_empty),
        ),
    );
    line(
        out,
        "autorestart",
        s.autorestart.unwrap_or(AutoRestart::Unexpected).as_ini(),
    );
    line(out, "startsecs", s.startsecs.unwrap_or(1));
    line(out, "startretries", s.startretries.unwrap_or(3));
    let codes: Vec<String> = s
        .exitcodes
        .as_deref()
        .unwrap_or(&[0])
        .iter()
        .map(i64::to_string)
        .collect();
    line(out, "exitcodes", codes.join(","));
    let sig = s.stopsignal.as_deref().and_then(signal::canonical).unwrap_or("TERM");
    line(out, "stopsignal", sig);
    line(out, "stopwaitsecs", s.stopwaitsecs.unwrap_or(10));
    let stopasgroup = s.stopasgroup.unwrap_or(false);
    line(out, "stopasgroup", bool_str(stopasgroup));
    line(out, "killasgroup", bool_str(s.killasgroup.unwrap_or(stopasgroup)));
    if let Some(user) = &s.user {
        line(out, "user", user);
    }
    line(out, "redirect_stderr", bool_str(s.redirect_stderr.unwrap_or(false)));
    for (stream, logfile, maxbytes, backups, capture, events, syslog) in [
        (
            "stdout",
            &s.stdout_logfile,
            s.stdout_logfile_maxbytes,
            s.stdout_logfile_backups,
            s.stdout_capture_maxbytes,
            s.stdout_events_enabled,
            s.stdout_syslog,
        ),
        (
            "stderr",
            &s.stderr_logfile,
            s.stderr_logfile_maxbytes,
            s.stderr_logfile_backups,
            s.stderr_capture_maxbytes,
            s.stderr_events_enabled,
            s.stderr_syslog,
        ),
    ] {
        let logfile = match logfile.as_deref() {
            None => "AUTO".to_string(),
            Some(v) if ["AUTO", "NONE", "OFF"].contains(&v.to_ascii_uppercase().as_str()) => v.to_ascii_uppercase(),
            Some(v) => v.to_string(),
        };
        line(out, &format!("{stream}_logfile"), logfile);
        line(
            out,
            &format!("{stream}_logfile_maxbytes"),
            maxbytes.map_or(50 << 20, |b| b.0),
        );
        line(out, &format!("{stream}_logfile_backups"), backups.unwrap_or(10));
        line(out, &format!("{stream}_capture_maxbytes"), capture.map_or(0, |b| b.0));
        line(
            out,
            &format!("{stream}_events_enabled"),
            bool_str(events.unwrap_or(false)),
        );
        line(out, &format!("{stream}_syslog"), bool_str(syslog.unwrap_or(false)));
    }
    if let Some(env) = s.environment.as_ref().filter(|e| !e.is_empty()) {
        // KEY="value": validation refused '"', '\\' and edge single quotes, so supervisord's
        // non-POSIX shlex reads each value back exactly, commas and '=' included.
        let pairs: Vec<String> = env.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        line(out, "environment", pairs.join(","));
    }
    if let Some(dir) = &s.directory {
        line(out, "directory", dir);
    }
    if let Some(umask) = &s.umask {
        line(out, "umask", umask);
    }
    line(out, "serverurl", s.serverurl.as_deref().unwrap_or("AUTO"));
}

/// Renders the `[group:x]` file of a native group.
pub fn render_group(g: &Valid<Group>) -> String {
    let mut out = String::with_capacity(160);
    out.push_str(HEADER);
    out.push('\n');
    let _ = writeln!(out, "[group:{}]", g.metadata.name);
    line(&mut out, "programs", g.spec.programs.join(","));
    line(&mut out, "priority", g.spec.priority.unwrap_or(999));
    out
}

/// The process names supervisord gives `p`'s processes on host `host_node_name` when the
/// program belongs to supervisord group `group_name` (its own name unless in a native group).
///
/// # Errors
/// The expansion error, if `process_name` does not expand (validation reports it).
pub fn process_names(p: &Program, host_node_name: &str, group_name: &str) -> Result<Vec<String>, String> {
    let s = &p.spec;
    let numprocs = u32::try_from(s.numprocs.unwrap_or(1)).map_err(|_| "numprocs out of range".to_string())?;
    let start = u32::try_from(s.numprocs_start.unwrap_or(0)).map_err(|_| "numprocs_start out of range".to_string())?;
    let template = s.process_name.as_deref().unwrap_or(DEFAULT_PROCESS_NAME);
    (start..start.saturating_add(numprocs))
        .map(|process_num| {
            let ctx = Context {
                here: String::new(),
                program_name: p.metadata.name.clone(),
                host_node_name: host_node_name.to_string(),
                group_name: group_name.to_string(),
                process_num,
                numprocs,
                env: Default::default(),
            };
            template::expand(template, Scope::ProcessName, &ctx)
        })
        .collect()
}

/// supervisorctl's names (`group:process`) for the processes of `p` on host
/// `host_node_name`, in native group `native_group` if any.
///
/// # Errors
/// The expansion error, if `process_name` does not expand (validation reports it).
pub fn namespecs(p: &Program, host_node_name: &str, native_group: Option<&str>) -> Result<Vec<String>, String> {
    let group = native_group.unwrap_or(&p.metadata.name);
    let names = process_names(p, host_node_name, group)?;
    Ok(if per_process(p, native_group) {
        // Each process is its own group of one, named like it.
        names
    } else {
        names.iter().map(|n| namespec(group, n)).collect()
    })
}

/// supervisorctl's `group:process` name for a process (just `process` when they are equal).
pub fn namespec(group: &str, process: &str) -> String {
    if group == process {
        process.to_string()
    } else {
        format!("{group}:{process}")
    }
}

/// What a spec change does to a program's processes on a host: which it starts, restarts,
/// stops and leaves alone (by process name; `host_node_name` is what `%(host_node_name)`
/// names would use).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessChanges {
    pub start: Vec<String>,
    pub restart: Vec<String>,
    pub stop: Vec<String>,
    pub keep: Vec<String>,
}

/// The processes a change from `old` (none: a new program) to `new` starts, restarts, stops
/// or keeps, as the agent applies it: supervisord replaces a group whose config changed, so
/// every process of a changed `[program:x]` section restarts, a new section's processes start,
/// and a removed section's stop. With one section per process (see [`per_process`]) scaling
/// touches only the processes that come or go. In a native group, supervisord replaces the
/// whole group: every process of the program restarts (and, on the host, its group siblings).
/// A new restart marker restarts everything; a change of desired state starts or stops.
///
/// # Errors
/// An expansion error (validation reports it first).
pub fn process_changes(
    old: Option<&Valid<Program>>,
    new: &Valid<Program>,
    native_group: Option<&str>,
    host_node_name: &str,
) -> Result<ProcessChanges, String> {
    let group = native_group.unwrap_or(&new.metadata.name).to_string();
    // Section name -> (its text, its process names).
    let layout = |p: &Valid<Program>| -> Result<BTreeMap<String, (String, Vec<String>)>, String> {
        let secs = sections(p, native_group)?;
        if per_process(p, native_group) {
            Ok(secs
                .into_iter()
                .map(|(name, text)| (name.clone(), (text, vec![name])))
                .collect())
        } else {
            let names = process_names(p, host_node_name, &group)?;
            Ok(secs
                .into_iter()
                .map(|(name, text)| (name, (text, names.clone())))
                .collect())
        }
    };
    let mut out = ProcessChanges::default();
    let after = layout(new)?;
    let running = new.spec.state == DesiredState::Running;
    let Some(old) = old else {
        if running {
            out.start = after.values().flat_map(|(_, n)| n.clone()).collect();
        }
        return Ok(out);
    };
    let before = layout(old)?;
    let was_running = old.spec.state == DesiredState::Running;
    let marker = running && new.spec.restarted_at.is_some() && new.spec.restarted_at != old.spec.restarted_at;
    for (section, (text, names)) in &after {
        let list = match before.get(section) {
            _ if !running => &mut out.keep,
            Some(_) if !was_running => &mut out.start,
            Some((t, _)) if t == text && !marker => &mut out.keep,
            Some(_) => &mut out.restart,
            None => &mut out.start,
        };
        list.extend(names.iter().cloned());
    }
    for (section, (_, names)) in &before {
        if !was_running {
            continue;
        }
        if !after.contains_key(section) || !running {
            out.stop.extend(names.iter().cloned());
        }
    }
    if !running {
        out.keep.retain(|n| !out.stop.contains(n));
    }
    // A process in both lists (a section renamed around it) is restarted.
    let restarted: Vec<String> = out.start.iter().filter(|n| out.stop.contains(n)).cloned().collect();
    out.start.retain(|n| !restarted.contains(n));
    out.stop.retain(|n| !restarted.contains(n));
    out.restart.extend(restarted);
    for l in [&mut out.start, &mut out.restart, &mut out.stop, &mut out.keep] {
        l.sort();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{Metadata, ProgramSpec};
    use crate::validate_program;

    fn program(f: impl FnOnce(&mut ProgramSpec)) -> Valid<Program> {
        let mut spec = ProgramSpec {
            command: "/opt/w --n %(process_num)d --of %(numprocs)d".into(),
            selector: Some(Default::default()),
            numprocs: Some(3),
            numprocs_start: Some(1),
            process_name: Some("%(program_name)s_%(process_num)02d".into()),
            stdout_logfile: Some("/var/log/%(group_name)s-%(process_num)d.log".into()),
            environment: Some([("HOME_OF".to_string(), "%(ENV_HOME)s/%(process_num)d".to_string())].into()),
            ..Default::default()
        };
        f(&mut spec);
        let p = Program::new(
            Metadata {
                name: "w".into(),
                ..Default::default()
            },
            spec,
        );
        match validate_program(p) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn numprocs_renders_one_program_per_process_with_corrals_names_expanded() {
        let p = program(|_| {});
        let s = sections(&p, None).expect("renders");
        assert_eq!(s.keys().collect::<Vec<_>>(), ["w_01", "w_02", "w_03"]);
        let two = &s["w_02"];
        assert!(two.starts_with("[program:w_02]\ncommand=/opt/w --n 2 --of 3\nprocess_name=%(program_name)s\nnumprocs=1\nnumprocs_start=0\n"), "{two}");
        assert!(two.contains("stdout_logfile=/var/log/w-2.log\n"), "{two}");
        assert!(two.contains("environment=HOME_OF=\"%(ENV_HOME)s/2\"\n"), "{two}");
        assert_eq!(namespecs(&p, "h1", None).expect("names"), ["w_01", "w_02", "w_03"]);
        let file = render_program(&p);
        assert!(file.starts_with(HEADER) && file.matches("[program:").count() == 3);
        // Scaling up leaves the existing processes' sections as they were: supervisord sees
        // them unchanged and restarts none.
        let more = sections(&program(|s| s.numprocs = Some(5)), None).expect("renders");
        let fixed = |s: &BTreeMap<String, String>, k: &str| s[k].replace("--of 3", "").replace("--of 5", "");
        assert_eq!(fixed(&more, "w_01"), fixed(&s, "w_01"));
        assert_eq!(more.len(), 5);
    }

    #[track_caller]
    fn check_changes(old: Option<Valid<Program>>, new: Valid<Program>, expect: [&[&str]; 4]) {
        let c = process_changes(old.as_ref(), &new, None, "h1").expect("changes");
        assert_eq!(
            [c.start, c.restart, c.stop, c.keep],
            expect.map(|l| l.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        );
    }

    #[test]
    fn process_changes_name_exactly_what_a_change_starts_restarts_and_stops() {
        let n = |n: i64| {
            program(move |s| {
                s.numprocs = Some(n);
                s.command = "/opt/w".into();
            })
        };
        check_changes(None, n(2), [&["w_01", "w_02"], &[], &[], &[]]);
        check_changes(Some(n(2)), n(4), [&["w_03", "w_04"], &[], &[], &["w_01", "w_02"]]);
        check_changes(Some(n(4)), n(2), [&[], &[], &["w_03", "w_04"], &["w_01", "w_02"]]);
        // The count in the command: every process's config changes.
        check_changes(
            Some(program(|_| {})),
            program(|s| s.numprocs = Some(4)),
            [&["w_04"], &["w_01", "w_02", "w_03"], &[], &[]],
        );
        let cmd = |c: &str| {
            let c = c.to_string();
            program(move |s| {
                s.numprocs = Some(2);
                s.command = c;
            })
        };
        check_changes(Some(cmd("/a")), cmd("/b"), [&[], &["w_01", "w_02"], &[], &[]]);
        let marker = program(|s| {
            s.numprocs = Some(2);
            s.command = "/a".into();
            s.restarted_at = Some("t".into());
        });
        check_changes(Some(cmd("/a")), marker, [&[], &["w_01", "w_02"], &[], &[]]);
        let stopped = program(|s| {
            s.numprocs = Some(2);
            s.command = "/a".into();
            s.state = DesiredState::Stopped;
        });
        check_changes(Some(cmd("/a")), stopped.clone(), [&[], &[], &["w_01", "w_02"], &[]]);
        check_changes(Some(stopped), cmd("/a"), [&["w_01", "w_02"], &[], &[], &[]]);
        // A program without %(process_num) in its name that starts to scale: a new layout, its
        // one process is replaced.
        let single = program(|s| {
            s.numprocs = None;
            s.process_name = None;
            s.command = "/a".into();
        });
        check_changes(Some(single), cmd("/a"), [&["w_01", "w_02"], &[], &["w"], &[]]);
    }

    #[test]
    fn native_members_and_host_dependent_names_keep_supervisords_numprocs() {
        let p = program(|_| {});
        assert_eq!(
            sections(&p, Some("shop")).expect("renders").keys().collect::<Vec<_>>(),
            ["w"]
        );
        assert_eq!(
            namespecs(&p, "h1", Some("shop")).expect("names"),
            ["shop:w_01", "shop:w_02", "shop:w_03"]
        );
        let by_host = program(|s| s.process_name = Some("%(host_node_name)s_%(process_num)d".into()));
        assert!(!per_process(&by_host, None));
        assert_eq!(
            namespecs(&by_host, "h1", None).expect("names"),
            ["w:h1_1", "w:h1_2", "w:h1_3"]
        );
        // numprocs 1 with %(process_num) in its name: already one program per process, so
        // scaling from or to one process keeps it.
        let single = program(|s| s.numprocs = None);
        assert_eq!(namespecs(&single, "h1", None).expect("names"), ["w_01"]);
        let plain = program(|s| {
            s.numprocs = None;
            s.process_name = None;
        });
        assert_eq!(namespecs(&plain, "h1", None).expect("names"), ["w"]);
    }
}

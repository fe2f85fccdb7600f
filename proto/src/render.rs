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

use crate::resource::{AutoRestart, DesiredState, Group, Program};
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

/// Renders the `[program:x]` file for `p`.
///
/// `autostart` is written as `autostart && state == running`, so that a supervisord restart
/// never starts, even briefly, a program whose desired state is stopped.
pub fn render_program(p: &Valid<Program>) -> String {
    let s = &p.spec;
    let mut out = String::with_capacity(1024);
    out.push_str(HEADER);
    out.push('\n');
    let _ = writeln!(out, "[program:{}]", p.metadata.name);
    line(&mut out, "command", &s.command);
    line(
        &mut out,
        "process_name",
        s.process_name.as_deref().unwrap_or(DEFAULT_PROCESS_NAME),
    );
    line(&mut out, "numprocs", s.numprocs.unwrap_or(1));
    line(&mut out, "numprocs_start", s.numprocs_start.unwrap_or(0));
    line(&mut out, "priority", s.priority.unwrap_or(999));
    line(
        &mut out,
        "autostart",
        bool_str(s.autostart.unwrap_or(true) && s.state == DesiredState::Running),
    );
    line(
        &mut out,
        "autorestart",
        s.autorestart.unwrap_or(AutoRestart::Unexpected).as_ini(),
    );
    line(&mut out, "startsecs", s.startsecs.unwrap_or(1));
    line(&mut out, "startretries", s.startretries.unwrap_or(3));
    let codes: Vec<String> = s
        .exitcodes
        .as_deref()
        .unwrap_or(&[0])
        .iter()
        .map(i64::to_string)
        .collect();
    line(&mut out, "exitcodes", codes.join(","));
    let sig = s.stopsignal.as_deref().and_then(signal::canonical).unwrap_or("TERM");
    line(&mut out, "stopsignal", sig);
    line(&mut out, "stopwaitsecs", s.stopwaitsecs.unwrap_or(10));
    let stopasgroup = s.stopasgroup.unwrap_or(false);
    line(&mut out, "stopasgroup", bool_str(stopasgroup));
    line(&mut out, "killasgroup", bool_str(s.killasgroup.unwrap_or(stopasgroup)));
    if let Some(user) = &s.user {
        line(&mut out, "user", user);
    }
    line(
        &mut out,
        "redirect_stderr",
        bool_str(s.redirect_stderr.unwrap_or(false)),
    );
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
        line(&mut out, &format!("{stream}_logfile"), logfile);
        line(
            &mut out,
            &format!("{stream}_logfile_maxbytes"),
            maxbytes.map_or(50 << 20, |b| b.0),
        );
        line(&mut out, &format!("{stream}_logfile_backups"), backups.unwrap_or(10));
        line(
            &mut out,
            &format!("{stream}_capture_maxbytes"),
            capture.map_or(0, |b| b.0),
        );
        line(
            &mut out,
            &format!("{stream}_events_enabled"),
            bool_str(events.unwrap_or(false)),
        );
        line(&mut out, &format!("{stream}_syslog"), bool_str(syslog.unwrap_or(false)));
    }
    if let Some(env) = s.environment.as_ref().filter(|e| !e.is_empty()) {
        // KEY="value": validation refused '"', '\\' and edge single quotes, so supervisord's
        // non-POSIX shlex reads each value back exactly, commas and '=' included.
        let pairs: Vec<String> = env.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        line(&mut out, "environment", pairs.join(","));
    }
    if let Some(dir) = &s.directory {
        line(&mut out, "directory", dir);
    }
    if let Some(umask) = &s.umask {
        line(&mut out, "umask", umask);
    }
    line(&mut out, "serverurl", s.serverurl.as_deref().unwrap_or("AUTO"));
    out
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

/// supervisorctl's `group:process` name for a process (just `process` when they are equal).
pub fn namespec(group: &str, process: &str) -> String {
    if group == process {
        process.to_string()
    } else {
        format!("{group}:{process}")
    }
}

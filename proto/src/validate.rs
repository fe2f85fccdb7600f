//! Validation: turns a parsed resource into a `Valid<T>` or into every field error at once.
//!
//! Specs end up as INI text in a file that supervisord runs as root, so the rules here refuse
//! anything that could change the meaning of the rendered file (SUPERVISORD.md): line breaks
//! and other control characters anywhere, a `;` or `#` that supervisord would read as a
//! comment, a `%` that is not a valid expansion, names that could leave the conf dir, values
//! supervisord would silently alter. The renderer only accepts `Valid<Program>`.
//!
//! Architecture Invariant: the controller, the agent and the CLI validate with this module and
//! nothing else, so "valid" means the same everywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Deref;

use crate::render::{self, DEFAULT_PROCESS_NAME};
use crate::resource::{Group, Host, Metadata, Program, ProgramSpec};
use crate::signal;
use crate::template::{self, Scope, is_env_key};

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path, e.g. `spec.environment.DB_URL`.
    pub path: String,
    /// Why the value is refused.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in one resource.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors {
    /// `Program "web"`.
    pub resource: String,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is invalid:", self.resource)?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// A resource that passed validation. Only this module builds one.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(transparent)]
pub struct Valid<T>(T);

impl<T> Valid<T> {
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> Deref for Valid<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Upper bounds well above any real use, so that a typo (an extra zero) is caught.
const MAX_NUMPROCS: i64 = 1000;
const MAX_PRIORITY: i64 = 999_999;
const MAX_BYTES: u64 = 1 << 40;

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn range(&mut self, path: &str, value: Option<i64>, min: i64, max: i64) {
        if let Some(v) = value
            && !(min..=max).contains(&v)
        {
            self.add(path, format!("{v} is out of range ({min} to {max})"));
        }
    }

    fn bytes(&mut self, path: &str, value: Option<crate::ByteSize>) {
        if let Some(v) = value
            && v.0 > MAX_BYTES
        {
            self.add(path, format!("{} bytes is more than the 1 TiB Corral allows", v.0));
        }
    }

    fn finish<T>(self, resource: String, value: T) -> Result<Valid<T>, ValidationErrors> {
        if self.0.is_empty() {
            Ok(Valid(value))
        } else {
            Err(ValidationErrors {
                resource,
                errors: self.0,
            })
        }
    }
}

/// Checks what every INI value must satisfy; returns false (after recording why) if not.
fn ini_value(errs: &mut Errors, path: &str, value: &str) -> bool {
    let before = errs.0.len();
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        let what = match c {
            '\n' | '\r' => "a line break, which would start a new INI line (injection)".to_string(),
            '\0' => "a NUL byte".to_string(),
            '\t' => "a tab".to_string(),
            c => format!("the control character U+{:04X}", c as u32),
        };
        errs.add(
            path,
            format!("contains {what}; supervisord config values must be one plain line"),
        );
    }
    if let Some(c) = value.chars().find(|c| c.is_whitespace() && !c.is_ascii()) {
        errs.add(
            path,
            format!("contains the Unicode whitespace U+{:04X}; use a plain space", c as u32),
        );
    }
    if value.starts_with(' ') || value.ends_with(' ') {
        errs.add(path, "has leading or trailing spaces, which supervisord strips");
    }
    if value.starts_with([';', '#']) {
        errs.add(
            path,
            format!("starts with {:?}, which supervisord reads as a comment", &value[..1]),
        );
    }
    if let Some(i) = value.find(" ;").or_else(|| value.find(" #")) {
        errs.add(
            path,
            format!(
                "contains {:?}: supervisord reads a space followed by ';' or '#' as the start of a comment, whatever the quoting, and has no escape for it (put the command in a wrapper script, or drop the space)",
                &value[i..i + 2]
            ),
        );
    }
    errs.0.len() == before
}

fn templated(errs: &mut Errors, path: &str, value: &str, scope: Scope) -> bool {
    match template::parse(value, scope) {
        Ok(_) => true,
        Err(m) => {
            errs.add(path, m);
            false
        }
    }
}

/// `[a-z0-9]([-a-z0-9_]*[a-z0-9])?`, at most 63 characters: safe as an INI section name, a
/// file name, an etcd key segment and a supervisord process name.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_inner = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
    let ok_edge = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(ok_inner)
        && name.chars().next().is_some_and(ok_edge)
        && name.chars().last().is_some_and(ok_edge);
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name: use 1 to 63 lowercase letters, digits, '-' or '_', starting and ending with a letter or digit"
        ))
    }
}

/// Host names: letters, digits, '-', '_' and '.', starting and ending with a letter or
/// digit, at most 253 characters (never '/', so a host name is one etcd key segment).
pub fn check_host_name(name: &str) -> Result<(), String> {
    let inner = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.chars().all(inner)
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().last().is_some_and(|c| c.is_ascii_alphanumeric());
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid host name: use letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        ))
    }
}

fn label_part_ok(s: &str, max: usize, extra: &[char]) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
}

/// Kubernetes-style label keys (`[prefix/]name`) and values; they become etcd values and
/// metric-free selectors, never INI text, but are kept to a safe alphabet all the same.
fn labels(errs: &mut Errors, path: &str, labels: &BTreeMap<String, String>) {
    for (k, v) in labels {
        let (prefix, name) = match k.split_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, k.as_str()),
        };
        let key_ok =
            label_part_ok(name, 63, &['-', '_', '.']) && prefix.is_none_or(|p| label_part_ok(p, 253, &['-', '.']));
        if !key_ok {
            errs.add(format!("{path}.{k}"), "is not a valid label key: [prefix/]name, where name is 1 to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit");
        }
        if !(v.is_empty() || label_part_ok(v, 63, &['-', '_', '.'])) {
            errs.add(format!("{path}.{k}"), format!("{v:?} is not a valid label value: up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"));
        }
    }
}

/// Validates `corral label host` changes: each key a label key, each value (`None` removes
/// the label) a label value; at least one change.
///
/// # Errors
/// Every bad key or value, by its path `labels.KEY`.
pub fn validate_label_changes(host: &str, changes: &BTreeMap<String, Option<String>>) -> Result<(), ValidationErrors> {
    let mut e = Errors::default();
    if let Err(why) = check_host_name(host) {
        e.add("metadata.name", why);
    }
    if changes.is_empty() {
        e.add("labels", "no label to set or remove");
    }
    let as_set: BTreeMap<String, String> = changes
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default()))
        .collect();
    labels(&mut e, "labels", &as_set);
    e.finish(format!("Host {host:?}"), ()).map(|_| ())
}

fn metadata(errs: &mut Errors, m: &Metadata) {
    if let Err(e) = check_name(&m.name) {
        errs.add("metadata.name", e);
    }
    labels(errs, "metadata.labels", &m.labels);
}

/// An absolute path (or one under `%(here)s`), with no `..` component.
fn path_value(errs: &mut Errors, path: &str, value: &str, scope: Scope) {
    if !ini_value(errs, path, value) || !templated(errs, path, value, scope) {
        return;
    }
    if !(value.starts_with('/') || value.starts_with("%(here)s")) {
        errs.add(
            path,
            format!(
                "{value:?} must be an absolute path (supervisord would resolve it against its own working directory)"
            ),
        );
    }
    if value.split('/').any(|c| c == "..") {
        errs.add(path, format!("{value:?} must not contain '..'"));
    }
}

/// `AUTO`, `NONE`, `OFF` or an absolute path.
fn logfile(errs: &mut Errors, path: &str, value: &str) {
    match value.to_ascii_uppercase().as_str() {
        "AUTO" | "NONE" | "OFF" => {}
        "SYSLOG" => errs.add(
            path,
            "the 'syslog' logfile is deprecated in supervisord 4.2: set stdout_syslog/stderr_syslog: true instead",
        ),
        _ => path_value(errs, path, value, Scope::Process),
    }
}

/// POSIX shell quoting as `shlex.split` reads it at spawn time: refuse what would fail then.
fn command_quoting(value: &str) -> Result<(), &'static str> {
    #[derive(PartialEq)]
    enum St {
        Plain,
        Single,
        Double,
    }
    let mut st = St::Plain;
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match (&st, c) {
            // The guard consumes the escaped character, so the escape never changes state.
            (St::Plain | St::Double, '\\') if chars.next().is_none() => return Err("ends with a lone backslash"),
            (St::Plain, '\'') => st = St::Single,
            (St::Plain, '"') => st = St::Double,
            (St::Single, '\'') | (St::Double, '"') => st = St::Plain,
            _ => {}
        }
    }
    match st {
        St::Plain => Ok(()),
        St::Single => Err("has an unclosed single quote"),
        St::Double => Err("has an unclosed double quote"),
    }
}

/// What the CLI prints in place of an environment value unless asked with `--show-secrets`.
pub const HIDDEN: &str = "(hidden)";
/// The same, for a value that differs from the stored one (`diff`).
pub const HIDDEN_CHANGED: &str = "(hidden, changed)";
const HIDDEN_PLACEHOLDERS: [&str; 2] = [HIDDEN, HIDDEN_CHANGED];

/// An absolute, normalized path of printable characters.
fn environment_file(errs: &mut Errors, path: &str) {
    let field = "spec.environment_file";
    if !path.starts_with('/') {
        errs.add(field, format!("{path:?} is not an absolute path"));
    } else if path.split('/').any(|part| part == ".." || part == ".") || path.contains("//") || path.ends_with('/') {
        errs.add(
            field,
            format!("{path:?} is not a normalized path of a file (no '.', '..', '//' or trailing '/')"),
        );
    } else if path.chars().any(char::is_control) {
        errs.add(field, "contains a control character");
    } else if path.len() > 4096 {
        errs.add(field, "is longer than 4096 bytes");
    }
}

fn environment(errs: &mut Errors, env: &BTreeMap<String, String>) {
    for (k, v) in env {
        let path = format!("spec.environment.{k}");
        if !is_env_key(k) {
            errs.add(
                &path,
                "is not a valid variable name: use letters, digits and '_', not starting with a digit",
            );
            continue;
        }
        if !ini_value(errs, &path, v) {
            continue;
        }
        if HIDDEN_PLACEHOLDERS.contains(&v.as_str()) {
            errs.add(
                &path,
                "is the placeholder `get`, `describe` and `diff` print for a hidden value, not the value: put the real one (they print it with --show-secrets)",
            );
            continue;
        }
        if v.contains('"') {
            errs.add(&path, "value contains '\"', which supervisord 4.2 cannot quote");
        }
        if v.contains('\\') {
            errs.add(
                &path,
                "value contains '\\', which supervisord 4.2 does not read back as written",
            );
        }
        if v.starts_with('\'') || v.ends_with('\'') {
            errs.add(
                &path,
                "value starts or ends with a single quote, which supervisord 4.2 strips",
            );
        }
        templated(errs, &path, v, Scope::Process);
    }
}

/// The largest spec a Program may have, serialized as JSON.
pub const MAX_SPEC_BYTES: usize = 32 * 1024;

/// The largest Program or Group, metadata and all, serialized as JSON: every object is one
/// etcd value, and every host's assignment carries its program.
pub const MAX_OBJECT_BYTES: usize = 64 * 1024;

/// Refuses an object larger than [`MAX_OBJECT_BYTES`].
fn object_size<T: serde::Serialize>(e: &mut Errors, o: &T) {
    let size = serde_json::to_vec(o).map_or(0, |v| v.len());
    if size > MAX_OBJECT_BYTES {
        e.add(
            "metadata",
            format!("the object is {size} bytes, more than the {MAX_OBJECT_BYTES}-byte limit"),
        );
    }
}

/// Validates a Program, collecting every field error.
///
/// # Errors
/// [`ValidationErrors`] listing each field that is wrong and why.
pub fn validate_program(p: Program) -> Result<Valid<Program>, ValidationErrors> {
    let mut e = Errors::default();
    metadata(&mut e, &p.metadata);
    let s: &ProgramSpec = &p.spec;
    match (&s.selector, &s.hosts) {
        (Some(_), Some(_)) => e.add("spec.hosts", "give either selector or hosts, not both"),
        (None, None) => e.add(
            "spec.selector",
            "is required (use {} for every host, or give hosts: [...])",
        ),
        (Some(sel), None) => labels(&mut e, "spec.selector", sel),
        (None, Some(hosts)) => {
            if hosts.is_empty() {
                e.add("spec.hosts", "must name at least one host");
            }
            let mut seen = BTreeSet::new();
            for (i, h) in hosts.iter().enumerate() {
                if let Err(m) = check_host_name(h) {
                    e.add(format!("spec.hosts[{i}]"), m);
                } else if !seen.insert(h) {
                    e.add(format!("spec.hosts[{i}]"), format!("{h:?} is listed twice"));
                }
            }
        }
    }
    match s.rollout.as_ref().and_then(|r| r.max_unavailable) {
        Some(crate::resource::HostCount::Count(n)) => e.range("spec.rollout.max_unavailable", Some(n), 1, 1_000_000),
        Some(crate::resource::HostCount::Percent(p)) if !(1..=100).contains(&p) => e.add(
            "spec.rollout.max_unavailable",
            format!("{p}% is out of range (1% to 100%)"),
        ),
        _ => {}
    }
    // Every host's assignment carries the spec: a huge one would make etcd refuse the
    // controller's writes (its request limit is 1.5 MiB) and slow every read.
    let size = serde_json::to_vec(s).map_or(0, |v| v.len());
    if size > MAX_SPEC_BYTES {
        e.add(
            "spec",
            format!(
                "is {size} bytes, more than the {MAX_SPEC_BYTES}-byte limit (put a long command in a script, long values in an environment file)"
            ),
        );
    }
    if let Some(c) = &s.crash_loop {
        e.range("spec.crash_loop.initial_delay_secs", c.initial_delay_secs, 1, 86_400);
        e.range("spec.crash_loop.max_delay_secs", c.max_delay_secs, 1, 86_400);
        e.range("spec.crash_loop.reset_after_secs", c.reset_after_secs, 1, 86_400);
        if let (Some(i), Some(m)) = (c.initial_delay_secs, c.max_delay_secs)
            && m < i
        {
            e.add(
                "spec.crash_loop.max_delay_secs",
                format!("{m} is below initial_delay_secs ({i})"),
            );
        }
    }
    if let Some(m) = &s.restarted_at
        && (m.is_empty() || m.len() > 64 || m.chars().any(|c| c.is_control()))
    {
        e.add(
            "spec.restarted_at",
            "must be 1 to 64 printable characters (a timestamp)",
        );
    }

    if let Some(r) = &s.signal_request {
        if signal::canonical(&r.signal).is_none() {
            e.add(
                "spec.signal_request.signal",
                format!("{:?} is not a signal name", r.signal),
            );
        }
        if r.id.is_empty() || r.id.len() > 64 || r.id.chars().any(|c| c.is_control()) {
            e.add("spec.signal_request.id", "must be 1 to 64 printable characters");
        }
    }

    if s.command.trim().is_empty() {
        e.add("spec.command", "is required and must not be empty");
    } else if ini_value(&mut e, "spec.command", &s.command)
        && templated(&mut e, "spec.command", &s.command, Scope::Process)
        && let Err(m) = command_quoting(&s.command)
    {
        e.add("spec.command", format!("{m}; supervisord would fail to start it"));
    }

    e.range("spec.numprocs", s.numprocs, 1, MAX_NUMPROCS);
    e.range("spec.numprocs_start", s.numprocs_start, 0, 1_000_000);
    e.range("spec.priority", s.priority, 0, MAX_PRIORITY);
    e.range("spec.startsecs", s.startsecs, 0, 3600);
    e.range("spec.startretries", s.startretries, 0, 1000);
    e.range("spec.stopwaitsecs", s.stopwaitsecs, 0, 86_400);
    e.range("spec.stdout_logfile_backups", s.stdout_logfile_backups, 0, 1000);
    e.range("spec.stderr_logfile_backups", s.stderr_logfile_backups, 0, 1000);
    e.bytes("spec.stdout_logfile_maxbytes", s.stdout_logfile_maxbytes);
    e.bytes("spec.stderr_logfile_maxbytes", s.stderr_logfile_maxbytes);
    e.bytes("spec.stdout_capture_maxbytes", s.stdout_capture_maxbytes);
    e.bytes("spec.stderr_capture_maxbytes", s.stderr_capture_maxbytes);

    process_names(&mut e, &p);

    if let Some(codes) = &s.exitcodes {
        if codes.is_empty() {
            e.add("spec.exitcodes", "must list at least one exit code");
        }
        for (i, c) in codes.iter().enumerate() {
            e.range(&format!("spec.exitcodes[{i}]"), Some(*c), 0, 255);
        }
    }
    if let Some(sig) = &s.stopsignal
        && signal::canonical(sig).is_none()
    {
        e.add(
            "spec.stopsignal",
            format!("{sig:?} is not a signal name (e.g. TERM, INT, QUIT, HUP, KILL, USR1, USR2)"),
        );
    }
    if s.stopasgroup == Some(true) && s.killasgroup == Some(false) {
        e.add(
            "spec.killasgroup",
            "must not be false when stopasgroup is true (supervisord refuses it)",
        );
    }
    if let Some(user) = &s.user {
        let name_ok = !user.is_empty()
            && user.len() <= 32
            && (user.bytes().all(|b| b.is_ascii_digit())
                || (user.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                    && user
                        .trim_end_matches('$')
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')));
        if !name_ok {
            e.add("spec.user", format!("{user:?} is not a valid user name or uid"));
        }
    }
    for (key, value) in [
        ("stdout_logfile", &s.stdout_logfile),
        ("stderr_logfile", &s.stderr_logfile),
    ] {
        if let Some(v) = value {
            logfile(&mut e, &format!("spec.{key}"), v);
        }
    }
    if s.redirect_stderr == Some(true)
        && let Some(v) = &s.stderr_logfile
        && !matches!(v.to_ascii_uppercase().as_str(), "AUTO" | "NONE" | "OFF")
    {
        e.add(
            "spec.stderr_logfile",
            "is ignored by supervisord when redirect_stderr is true: drop one of them",
        );
    }
    if let Some(env) = &s.environment {
        environment(&mut e, env);
    }
    if let Some(path) = &s.environment_file {
        environment_file(&mut e, path);
    }
    if let Some(deps) = &s.depends_on {
        let mut seen = std::collections::BTreeSet::new();
        if deps.len() > 64 {
            e.add("spec.depends_on", format!("{} programs; at most 64", deps.len()));
        }
        for (i, d) in deps.iter().enumerate() {
            let path = format!("spec.depends_on[{i}]");
            if let Err(why) = check_name(d) {
                e.add(path, why);
            } else if d == &p.metadata.name {
                e.add(path, "a program cannot depend on itself");
            } else if !seen.insert(d) {
                e.add(path, format!("{d:?} is listed twice"));
            }
        }
    }
    if let Some(h) = &s.health {
        health(&mut e, h, s);
    }
    if let Some(dir) = &s.directory {
        path_value(&mut e, "spec.directory", dir, Scope::Process);
    }
    if let Some(umask) = &s.umask
        && !(!umask.is_empty() && umask.len() <= 4 && umask.bytes().all(|b| (b'0'..=b'7').contains(&b)))
    {
        e.add("spec.umask", format!("{umask:?} is not an octal umask such as \"022\""));
    }
    if let Some(url) = &s.serverurl
        && ini_value(&mut e, "spec.serverurl", url)
        && templated(&mut e, "spec.serverurl", url, Scope::Program)
        && !(url.eq_ignore_ascii_case("AUTO") || ["http://", "https://", "unix://"].iter().any(|p| url.starts_with(p)))
    {
        e.add("spec.serverurl", "must be AUTO or an http://, https:// or unix:// URL");
    }
    object_size(&mut e, &p);
    let resource = format!("Program {:?}", p.metadata.name);
    e.finish(resource, p)
}

/// process_name must expand to distinct names supervisord accepts for every process.
fn process_names(e: &mut Errors, p: &Program) {
    let s = &p.spec;
    let template = s.process_name.as_deref().unwrap_or(DEFAULT_PROCESS_NAME);
    if s.process_name.is_some() {
        if !ini_value(e, "spec.process_name", template)
            || !templated(e, "spec.process_name", template, Scope::ProcessName)
        {
            return;
        }
        if template.contains(|c: char| !(c.is_ascii_alphanumeric() || "-_.%()".contains(c))) {
            e.add(
                "spec.process_name",
                "may only contain letters, digits, '-', '_', '.' and %(...) expansions",
            );
            return;
        }
    }
    let numprocs = s.numprocs.unwrap_or(1);
    if numprocs > 1 && !template::mentions_process_num(template) {
        e.add(
            "spec.process_name",
            format!(
                "must contain %(process_num) when numprocs is {numprocs} (e.g. \"%(program_name)s_%(process_num)02d\")"
            ),
        );
        return;
    }
    if check_name(&p.metadata.name).is_err() || !(1..=MAX_NUMPROCS).contains(&numprocs) {
        return;
    }
    match render::process_names(p, "host", &p.metadata.name) {
        Ok(names) => {
            let mut seen = BTreeSet::new();
            for n in &names {
                if n.is_empty() {
                    e.add("spec.process_name", "expands to an empty name");
                    return;
                }
                if !seen.insert(n) {
                    e.add("spec.process_name", format!("expands to {n:?} more than once"));
                    return;
                }
            }
        }
        Err(m) => e.add("spec.process_name", m),
    }
}

/// Validates a Group.
///
/// # Errors
/// [`ValidationErrors`] listing each field that is wrong and why.
pub fn validate_group(g: Group) -> Result<Valid<Group>, ValidationErrors> {
    let mut e = Errors::default();
    metadata(&mut e, &g.metadata);
    if g.spec.programs.is_empty() {
        e.add("spec.programs", "must list at least one program");
    }
    let mut seen = BTreeSet::new();
    for (i, p) in g.spec.programs.iter().enumerate() {
        if let Err(m) = check_name(p) {
            e.add(format!("spec.programs[{i}]"), m);
        } else if !seen.insert(p) {
            e.add(format!("spec.programs[{i}]"), format!("{p:?} is listed twice"));
        }
    }
    e.range("spec.priority", g.spec.priority, 0, MAX_PRIORITY);
    object_size(&mut e, &g);
    let resource = format!("Group {:?}", g.metadata.name);
    e.finish(resource, g)
}

/// Validates a Host (its name and labels).
///
/// # Errors
/// [`ValidationErrors`] listing each field that is wrong and why.
pub fn validate_host(h: Host) -> Result<Valid<Host>, ValidationErrors> {
    let mut e = Errors::default();
    if let Err(m) = check_host_name(&h.metadata.name) {
        e.add("metadata.name", m);
    }
    labels(&mut e, "metadata.labels", &h.metadata.labels);
    let resource = format!("Host {:?}", h.metadata.name);
    e.finish(resource, h)
}

/// `spec.health`: one check, sane timings; nothing reaches an INI file, but the agent runs
/// it as root (exec) or on the host's loopback (http, tcp).
fn health(e: &mut Errors, h: &crate::resource::HealthSpec, s: &crate::resource::ProgramSpec) {
    // With a port per process, the last process's port must be one too.
    let last_port = |field: &str, e: &mut Errors, port: i64, per_process: Option<bool>| {
        if per_process != Some(true) || !(1..=65_535).contains(&port) {
            return;
        }
        let last = s.numprocs_start.unwrap_or(0).max(0) + s.numprocs.unwrap_or(1).max(1) - 1;
        if port.saturating_add(last) > 65_535 {
            e.add(
                field,
                format!("{port} + process_num up to {last} exceeds 65535 (port_per_process)"),
            );
        }
    };
    let checks = [h.http.is_some(), h.tcp.is_some(), h.exec.is_some()]
        .iter()
        .filter(|c| **c)
        .count();
    if checks != 1 {
        e.add(
            "spec.health",
            format!("names {checks} checks; give exactly one of http, tcp or exec"),
        );
    }
    if let Some(c) = &h.http {
        e.range("spec.health.http.port", Some(c.port), 1, 65_535);
        last_port("spec.health.http.port", e, c.port, c.port_per_process);
        e.range("spec.health.http.expect_status", c.expect_status, 100, 599);
        if let Some(path) = &c.path {
            let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b);
            // Each % starts an escape of two hex digits.
            let escapes_ok = path
                .split('%')
                .skip(1)
                .all(|rest| rest.len() >= 2 && rest.as_bytes()[..2].iter().all(u8::is_ascii_hexdigit));
            if !path.starts_with('/') || path.len() > 1024 || !path.bytes().all(allowed) || !escapes_ok {
                e.add(
                    "spec.health.http.path",
                    format!("{path:?} is not a URL path (it starts with /, at most 1024 characters of a URL, no spaces or #, % only as %XX)"),
                );
            }
        }
    }
    if let Some(c) = &h.tcp {
        e.range("spec.health.tcp.port", Some(c.port), 1, 65_535);
        last_port("spec.health.tcp.port", e, c.port, c.port_per_process);
    }
    if let Some(c) = &h.exec {
        if c.command.is_empty() || c.command.len() > 64 {
            e.add(
                "spec.health.exec.command",
                format!(
                    "has {} words; give the executable and at most 63 arguments",
                    c.command.len()
                ),
            );
        }
        if let Some(exe) = c.command.first()
            && (!exe.starts_with('/') || exe.split('/').any(|c| c == ".."))
        {
            e.add(
                "spec.health.exec.command[0]",
                format!("{exe:?} is not an absolute path to an executable (no .. components)"),
            );
        }
        for (i, arg) in c.command.iter().enumerate() {
            if arg.len() > 4096 || arg.chars().any(|c| c.is_control()) {
                e.add(
                    format!("spec.health.exec.command[{i}]"),
                    "must be at most 4096 characters without control characters",
                );
            }
        }
    }
    e.range("spec.health.period_secs", h.period_secs, 1, 3600);
    e.range("spec.health.timeout_secs", h.timeout_secs, 1, 3600);
    e.range("spec.health.failure_threshold", h.failure_threshold, 1, 100);
    e.range("spec.health.initial_delay_secs", h.initial_delay_secs, 0, 3600);
    let period = h
        .period_secs
        .unwrap_or(crate::resource::HealthSpec::DEFAULT_PERIOD_SECS as i64);
    if let Some(t) = h.timeout_secs
        && t > period
    {
        e.add(
            "spec.health.timeout_secs",
            format!("{t} is longer than period_secs ({period})"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{AutoRestart, ByteSize};

    fn program(f: impl FnOnce(&mut ProgramSpec)) -> Program {
        let mut spec = ProgramSpec {
            command: "/bin/sleep 1000".into(),
            selector: Some(BTreeMap::new()),
            ..Default::default()
        };
        f(&mut spec);
        Program::new(
            Metadata {
                name: "web".into(),
                ..Default::default()
            },
            spec,
        )
    }

    /// Asserts that validation refuses `p` with an error at `path` whose text contains `needle`.
    #[track_caller]
    fn refused(p: Program, path: &str, needle: &str) {
        let errs = validate_program(p).expect_err("must be refused").errors;
        assert!(
            errs.iter().any(|e| e.path == path && e.message.contains(needle)),
            "no {path}: ..{needle}.. in {errs:#?}"
        );
    }

    #[track_caller]
    fn accepted(p: Program) {
        if let Err(e) = validate_program(p) {
            panic!("refused: {e}");
        }
    }

    #[test]
    fn accepts_a_full_spec() {
        accepted(program(|s| {
            s.numprocs = Some(4);
            s.process_name = Some("%(program_name)s_%(process_num)02d".into());
            s.directory = Some("/opt/app".into());
            s.user = Some("www-data".into());
            s.autorestart = Some(AutoRestart::Always);
            s.stopsignal = Some("SIGQUIT".into());
            s.stopasgroup = Some(true);
            s.killasgroup = Some(true);
            s.stdout_logfile = Some("/var/log/%(program_name)s-%(process_num)d.log".into());
            s.stdout_logfile_maxbytes = Some(ByteSize(1 << 20));
            s.stderr_logfile = Some("none".into());
            s.environment = Some(
                [
                    ("DSN".into(), "a=1,b=2".into()),
                    ("PATH".into(), "/opt/bin:%(ENV_PATH)s".into()),
                ]
                .into(),
            );
            s.umask = Some("022".into());
            s.serverurl = Some("unix:///run/supervisor.sock".into());
            s.exitcodes = Some(vec![0, 2]);
            s.command = "/bin/sh -c 'exec worker --name \"a b\";true' 50%%".into();
        }));
    }

    #[test]
    fn a_health_check_is_one_check_with_sane_timings() {
        use crate::resource::{Check, ExecCheck, HealthSpec, HttpCheck, TcpCheck};
        let http = |path: &str| HealthSpec {
            http: Some(HttpCheck {
                port: 8080,
                path: Some(path.into()),
                expect_status: Some(204),
                ..Default::default()
            }),
            ..Default::default()
        };
        accepted(program(|s| s.health = Some(http("/healthz?deep=1"))));
        let resolved = http("/h").resolve().expect("a check");
        assert_eq!(
            resolved.check,
            Check::Http {
                port: 8080,
                per_process: false,
                path: "/h".into(),
                expect_status: Some(204)
            }
        );
        assert_eq!(
            (
                resolved.period_secs,
                resolved.timeout_secs,
                resolved.failure_threshold,
                resolved.restart
            ),
            (10, 2, 3, true)
        );
        refused(
            program(|s| s.health = Some(http("healthz"))),
            "spec.health.http.path",
            "URL path",
        );
        accepted(program(|s| s.health = Some(http("/a%20b?q=%2Fx"))));
        for bad in ["/a%2", "/100%", "/a%zz"] {
            refused(
                program(|s| s.health = Some(http(bad))),
                "spec.health.http.path",
                "% only as %XX",
            );
        }
        refused(
            program(|s| s.health = Some(http("/a b"))),
            "spec.health.http.path",
            "URL path",
        );
        refused(
            program(|s| s.health = Some(http("/a\r\nHost: x"))),
            "spec.health.http.path",
            "URL path",
        );
        refused(
            program(|s| s.health = Some(HealthSpec::default())),
            "spec.health",
            "names 0 checks",
        );
        let two = HealthSpec {
            tcp: Some(TcpCheck {
                port: 1,
                ..Default::default()
            }),
            exec: Some(ExecCheck {
                command: vec!["/bin/true".into()],
            }),
            ..Default::default()
        };
        refused(program(|s| s.health = Some(two)), "spec.health", "names 2 checks");
        let tcp = |port, period, timeout| HealthSpec {
            tcp: Some(TcpCheck {
                port,
                ..Default::default()
            }),
            period_secs: period,
            timeout_secs: timeout,
            ..Default::default()
        };
        refused(
            program(|s| s.health = Some(tcp(0, None, None))),
            "spec.health.tcp.port",
            "out of range",
        );
        refused(
            program(|s| s.health = Some(tcp(70_000, None, None))),
            "spec.health.tcp.port",
            "out of range",
        );
        // A port per process: the last process's port must exist too.
        let per_process = |port| HealthSpec {
            tcp: Some(TcpCheck {
                port,
                port_per_process: Some(true),
            }),
            ..Default::default()
        };
        let numbered = |s: &mut crate::resource::ProgramSpec| {
            s.numprocs = Some(4);
            s.numprocs_start = Some(10);
            s.process_name = Some("%(program_name)s_%(process_num)d".into());
        };
        accepted(program(|s| {
            numbered(s);
            s.health = Some(per_process(65_522));
        }));
        refused(
            program(|s| {
                numbered(s);
                s.health = Some(per_process(65_523));
            }),
            "spec.health.tcp.port",
            "65523 + process_num up to 13 exceeds 65535",
        );
        let resolved = per_process(8000).resolve().expect("a check");
        assert_eq!(
            resolved.for_process(13).check,
            Check::Tcp {
                port: 8013,
                per_process: false
            }
        );
        // One port for all: every process on it.
        let shared = tcp(8000, None, None).resolve().expect("a check");
        assert_eq!(shared.for_process(13), shared);
        refused(
            program(|s| s.health = Some(tcp(80, Some(5), Some(6)))),
            "spec.health.timeout_secs",
            "longer than period_secs (5)",
        );
        refused(
            program(|s| s.health = Some(tcp(80, Some(0), None))),
            "spec.health.period_secs",
            "out of range",
        );
        let exec = |command: Vec<&str>| HealthSpec {
            exec: Some(ExecCheck {
                command: command.into_iter().map(String::from).collect(),
            }),
            ..Default::default()
        };
        accepted(program(|s| {
            s.health = Some(exec(vec!["/usr/bin/curl", "-fs", "http://127.0.0.1/"]))
        }));
        refused(
            program(|s| s.health = Some(exec(vec![]))),
            "spec.health.exec.command",
            "has 0 words",
        );
        refused(
            program(|s| s.health = Some(exec(vec!["curl"]))),
            "spec.health.exec.command[0]",
            "absolute path",
        );
        refused(
            program(|s| s.health = Some(exec(vec!["/srv/../bin/sh"]))),
            "spec.health.exec.command[0]",
            "absolute path",
        );
        refused(
            program(|s| s.health = Some(exec(vec!["/bin/echo", "a\nb"]))),
            "spec.health.exec.command[1]",
            "control",
        );
    }

    #[test]
    fn refuses_ini_injection_in_every_string_field() {
        refused(
            program(|s| s.command = "/bin/true\n[program:x]\ncommand=/bin/id".into()),
            "spec.command",
            "line break",
        );
        refused(
            program(|s| s.command = "/bin/true\r".into()),
            "spec.command",
            "line break",
        );
        refused(program(|s| s.command = "/bin/true\0".into()), "spec.command", "NUL");
        refused(
            program(|s| s.command = "/bin/sh -c 'true ; id'".into()),
            "spec.command",
            "comment",
        );
        refused(
            program(|s| s.command = "/bin/echo #x".into()),
            "spec.command",
            "comment",
        );
        refused(program(|s| s.command = ";/bin/id".into()), "spec.command", "comment");
        refused(
            program(|s| s.command = "/bin/echo\u{a0};x".into()),
            "spec.command",
            "Unicode whitespace",
        );
        refused(
            program(|s| s.command = " /bin/true".into()),
            "spec.command",
            "leading or trailing",
        );
        refused(
            program(|s| s.directory = Some("/opt\n[x]".into())),
            "spec.directory",
            "line break",
        );
        refused(
            program(|s| s.stdout_logfile = Some("/var/log/a ;b".into())),
            "spec.stdout_logfile",
            "comment",
        );
        refused(
            program(|s| s.user = Some("root\nx=1".into())),
            "spec.user",
            "not a valid user",
        );
        refused(
            program(|s| s.serverurl = Some("http://h/\n[x]".into())),
            "spec.serverurl",
            "line break",
        );
        refused(
            program(|s| s.process_name = Some("a\nb".into())),
            "spec.process_name",
            "line break",
        );
        refused(
            program(|s| s.environment = Some([("A".into(), "x\ny=1".into())].into())),
            "spec.environment.A",
            "line break",
        );
        refused(
            program(|s| s.environment = Some([("A".into(), HIDDEN.into())].into())),
            "spec.environment.A",
            "placeholder",
        );
        refused(
            program(|s| s.environment = Some([("A".into(), "x #y".into())].into())),
            "spec.environment.A",
            "comment",
        );
    }

    #[test]
    fn refuses_bad_percent_expansions() {
        refused(
            program(|s| s.command = "/bin/echo 5%".into()),
            "spec.command",
            "bare '%'",
        );
        refused(
            program(|s| s.command = "/bin/echo %(nope)s".into()),
            "spec.command",
            "not a name",
        );
        refused(
            program(|s| s.environment = Some([("RATE".into(), "5%".into())].into())),
            "spec.environment.RATE",
            "bare '%'",
        );
        refused(
            program(|s| s.serverurl = Some("http://%(process_num)d".into())),
            "spec.serverurl",
            "not available",
        );
        refused(
            program(|s| s.process_name = Some("%(ENV_HOME)s".into())),
            "spec.process_name",
            "not allowed",
        );
    }

    #[test]
    fn refuses_environment_supervisord_cannot_quote() {
        let env = |k: &str, v: &str| program(|s| s.environment = Some([(k.to_string(), v.to_string())].into()));
        refused(env("MSG", "a\"b"), "spec.environment.MSG", "cannot quote");
        refused(env("MSG", "a\\b"), "spec.environment.MSG", "'\\'");
        refused(env("MSG", "'quoted'"), "spec.environment.MSG", "single quote");
        refused(env("1BAD", "x"), "spec.environment.1BAD", "not a valid variable name");
        refused(env("A-B", "x"), "spec.environment.A-B", "not a valid variable name");
    }

    #[test]
    fn an_environment_file_is_an_absolute_normalized_path() {
        let file = |p: &str| program(|s| s.environment_file = Some(p.to_string()));
        refused(file("app.env"), "spec.environment_file", "not an absolute path");
        refused(file("/etc/corral/../shadow"), "spec.environment_file", "normalized");
        refused(file("/etc//x"), "spec.environment_file", "normalized");
        refused(
            file("/etc/x\n[program:y]"),
            "spec.environment_file",
            "control character",
        );
        assert!(validate_program(file("/etc/corral/env/web.env")).is_ok());
    }

    #[test]
    fn refuses_names_that_could_leave_the_conf_dir() {
        for name in [
            "x/../../y",
            "../etc",
            "a.b",
            "A",
            "",
            "-a",
            "a-",
            "a:b",
            "a b",
            &"a".repeat(64),
        ] {
            let mut p = program(|_| {});
            p.metadata.name = name.to_string();
            refused(p, "metadata.name", "not a valid name");
        }
    }

    #[test]
    fn refuses_out_of_range_numbers_and_bad_enums() {
        refused(program(|s| s.numprocs = Some(0)), "spec.numprocs", "out of range");
        refused(program(|s| s.startsecs = Some(-1)), "spec.startsecs", "out of range");
        refused(
            program(|s| s.exitcodes = Some(vec![0, 256])),
            "spec.exitcodes[1]",
            "out of range",
        );
        refused(
            program(|s| s.exitcodes = Some(vec![])),
            "spec.exitcodes",
            "at least one",
        );
        refused(
            program(|s| s.stdout_logfile_maxbytes = Some(ByteSize(1 << 41))),
            "spec.stdout_logfile_maxbytes",
            "1 TiB",
        );
        refused(
            program(|s| s.stopsignal = Some("SIGNOPE".into())),
            "spec.stopsignal",
            "not a signal",
        );
        refused(program(|s| s.umask = Some("099".into())), "spec.umask", "octal");
    }

    #[test]
    fn refuses_what_supervisord_would_refuse_on_the_host() {
        refused(program(|s| s.numprocs = Some(3)), "spec.process_name", "%(process_num)");
        refused(
            program(|s| {
                s.stopasgroup = Some(true);
                s.killasgroup = Some(false);
            }),
            "spec.killasgroup",
            "stopasgroup",
        );
        refused(
            program(|s| s.directory = Some("opt/app".into())),
            "spec.directory",
            "absolute",
        );
        refused(
            program(|s| s.directory = Some("/opt/../etc".into())),
            "spec.directory",
            "'..'",
        );
        refused(
            program(|s| s.stdout_logfile = Some("app.log".into())),
            "spec.stdout_logfile",
            "absolute",
        );
        refused(
            program(|s| s.stdout_logfile = Some("syslog".into())),
            "spec.stdout_logfile",
            "deprecated",
        );
        refused(
            program(|s| {
                s.redirect_stderr = Some(true);
                s.stderr_logfile = Some("/tmp/e.log".into());
            }),
            "spec.stderr_logfile",
            "ignored",
        );
        refused(
            program(|s| s.command = "/bin/sh -c 'unclosed".into()),
            "spec.command",
            "unclosed single quote",
        );
        refused(
            program(|s| s.process_name = Some("%(program_name)s:x".into())),
            "spec.process_name",
            "may only contain",
        );
        refused(
            program(|s| {
                s.numprocs = Some(2);
                s.process_name = Some("x%%(process_num)d".into());
            }),
            "spec.process_name",
            "more than once",
        );
    }

    #[test]
    fn placement_needs_exactly_one_of_selector_or_hosts() {
        refused(program(|s| s.selector = None), "spec.selector", "required");
        refused(program(|s| s.hosts = Some(vec!["h1".into()])), "spec.hosts", "not both");
        refused(
            program(|s| {
                s.selector = None;
                s.hosts = Some(vec!["h1".into(), "h1".into()]);
            }),
            "spec.hosts[1]",
            "twice",
        );
        refused(
            program(|s| {
                s.selector = None;
                s.hosts = Some(vec!["h/1".into()]);
            }),
            "spec.hosts[0]",
            "host name",
        );
        refused(
            program(|s| s.selector = Some([("role".into(), "a b".into())].into())),
            "spec.selector.role",
            "label value",
        );
    }

    #[test]
    fn collects_every_error_at_once() {
        let errs = validate_program(program(|s| {
            s.command = String::new();
            s.numprocs = Some(0);
            s.stopsignal = Some("NOPE".into());
        }))
        .expect_err("refused");
        assert_eq!(errs.errors.len(), 3, "{errs}");
        assert!(
            errs.to_string()
                .starts_with("Program \"web\" is invalid:\n  spec.command:"),
            "{errs}"
        );
    }

    #[test]
    fn groups_need_valid_unique_members() {
        let g = |programs: &[&str]| {
            Group::new(
                Metadata {
                    name: "app".into(),
                    ..Default::default()
                },
                crate::GroupSpec {
                    programs: programs.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                },
            )
        };
        assert!(validate_group(g(&["a", "b"])).is_ok());
        let errs = validate_group(g(&["a", "a", "B/x"])).expect_err("refused").errors;
        assert_eq!(
            errs.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(),
            ["spec.programs[1]", "spec.programs[2]"]
        );
        assert!(validate_group(g(&[])).is_err());
    }
}

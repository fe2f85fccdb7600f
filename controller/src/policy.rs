//! What a spec may ask of a host. A token that may write specs runs commands as root on every
//! host it selects; the controller's policy (`--policy-file`) narrows that at apply: which
//! users programs run as, which directories their logs and working directory may be in,
//! which executables they may start, where their environment files may be. Each rule is
//! optional: one left out allows anything. Pure: the caller reads the file.

use std::path::Path;

use corral_proto::resource::ProgramSpec;
use corral_proto::validate::FieldError;
use serde::Deserialize;

/// `--policy-file`, YAML.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// `spec.user` must be one of these. A program without `user` runs as supervisord's user
    /// (root), so it passes only if `root` is listed.
    #[serde(default)]
    pub users: Option<Vec<String>>,
    /// `stdout_logfile`, `stderr_logfile` and `directory` must be inside one of these
    /// directories (`AUTO`/`NONE` logs, in supervisord's own log directory, always pass).
    #[serde(default)]
    pub directories: Option<Vec<String>>,
    /// A command's executable (its first word) must start with one of these: a directory
    /// ending in `/` (everything in it) or one executable's full path.
    #[serde(default)]
    pub commands: Option<Vec<String>>,
    /// `environment_file` must be inside one of these directories.
    #[serde(default)]
    pub environment_files: Option<Vec<String>>,
}

/// The expansions a path or executable may use under a policy: each is a name or a number
/// Corral validated, never a `/` or `..`. `%(ENV_X)s` (which a spec's own environment sets)
/// and `%(here)s` could lead anywhere.
const SAFE_EXPANSIONS: [&str; 4] = [
    "%(program_name)s",
    "%(group_name)s",
    "%(host_node_name)s",
    "%(process_num)",
];

fn has_unsafe_expansion(value: &str) -> bool {
    let mut rest = value;
    while let Some(at) = rest.find("%(") {
        let tail = &rest[at..];
        if !SAFE_EXPANSIONS.iter().any(|safe| tail.starts_with(safe)) {
            return true;
        }
        rest = &tail[2..];
    }
    false
}

fn inside(path: &str, dirs: &[String]) -> bool {
    dirs.iter().any(|d| Path::new(path).starts_with(d))
}

impl Policy {
    /// Parses and checks a policy file's text.
    ///
    /// # Errors
    /// YAML errors, unknown keys, and rules that cannot mean anything (relative directories).
    pub fn parse(text: &str) -> Result<Policy, String> {
        let policy: Policy = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
        for (key, list) in [
            ("directories", &policy.directories),
            ("commands", &policy.commands),
            ("environment_files", &policy.environment_files),
        ] {
            for entry in list.iter().flatten() {
                if !entry.starts_with('/') || entry.split('/').any(|c| c == "..") {
                    return Err(format!("{key}: {entry:?} is not an absolute path"));
                }
            }
        }
        Ok(policy)
    }

    /// Whether any rule is set.
    pub fn is_restrictive(&self) -> bool {
        *self != Policy::default()
    }

    /// Every field of `spec` this policy refuses, with why.
    pub fn check(&self, spec: &ProgramSpec) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut refuse = |path: &str, message: String| {
            errors.push(FieldError {
                path: path.to_string(),
                message: format!("{message} (the controller's policy)"),
            });
        };
        if let Some(users) = &self.users {
            let user = spec.user.as_deref().unwrap_or("root");
            if !users.iter().any(|u| u == user) {
                let what = match &spec.user {
                    Some(u) => format!("{u:?} is not an allowed user"),
                    None => "is not set, so the program would run as root, which is not allowed".to_string(),
                };
                refuse("spec.user", format!("{what}; allowed: {}", users.join(", ")));
            }
        }
        if let Some(dirs) = &self.directories {
            let logs = [
                ("spec.stdout_logfile", &spec.stdout_logfile),
                ("spec.stderr_logfile", &spec.stderr_logfile),
            ];
            for (field, value) in logs {
                let Some(v) = value else { continue };
                if matches!(v.to_ascii_uppercase().as_str(), "AUTO" | "NONE" | "OFF") {
                    continue;
                }
                if has_unsafe_expansion(v) {
                    refuse(
                        field,
                        format!(
                            "{v:?} uses an expansion that could lead anywhere; only %(program_name)s, %(group_name)s, %(host_node_name)s and %(process_num)d are allowed"
                        ),
                    );
                } else if !inside(v, dirs) {
                    refuse(
                        field,
                        format!("{v:?} is outside the allowed directories: {}", dirs.join(", ")),
                    );
                }
            }
            if let Some(v) = &spec.directory {
                if has_unsafe_expansion(v) {
                    refuse(
                        "spec.directory",
                        format!("{v:?} uses an expansion that could lead anywhere"),
                    );
                } else if !inside(v, dirs) {
                    refuse(
                        "spec.directory",
                        format!("{v:?} is outside the allowed directories: {}", dirs.join(", ")),
                    );
                }
            }
        }
        if let Some(prefixes) = &self.commands {
            let executable = spec.command.split_whitespace().next().unwrap_or_default();
            let mut executables = vec![("spec.command", executable)];
            // An exec health check runs on the host too (as the program's user, or root).
            if let Some(exe) = spec
                .health
                .as_ref()
                .and_then(|h| h.exec.as_ref())
                .and_then(|x| x.command.first())
            {
                executables.push(("spec.health.exec.command[0]", exe.as_str()));
            }
            for (field, executable) in executables {
                let allowed = prefixes.iter().any(|p| {
                    if p.ends_with('/') {
                        executable.starts_with(p.as_str())
                    } else {
                        executable == p
                    }
                });
                if has_unsafe_expansion(executable) || executable.contains(['\'', '"', '\\']) {
                    refuse(
                        field,
                        format!("the executable {executable:?} uses quoting or an expansion; name it plainly"),
                    );
                } else if !executable.starts_with('/') || executable.split('/').any(|c| c == "..") {
                    refuse(
                        field,
                        format!("the executable {executable:?} is not a plain absolute path"),
                    );
                } else if !allowed {
                    refuse(
                        field,
                        format!(
                            "the executable {executable:?} is not allowed; allowed: {}",
                            prefixes.join(", ")
                        ),
                    );
                }
            }
        }
        if let (Some(dirs), Some(file)) = (&self.environment_files, &spec.environment_file)
            && !inside(file, dirs)
        {
            refuse(
                "spec.environment_file",
                format!("{file:?} is outside the allowed directories: {}", dirs.join(", ")),
            );
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAREFUL: &str = "users: [app, www-data]\ndirectories: [/srv, /var/log/corral]\ncommands: [/srv/, /usr/bin/python3]\nenvironment_files: [/etc/corral/env]\n";

    fn spec(f: impl FnOnce(&mut ProgramSpec)) -> ProgramSpec {
        let mut s = ProgramSpec {
            command: "/srv/app/bin/web --port 80".into(),
            user: Some("app".into()),
            ..Default::default()
        };
        f(&mut s);
        s
    }

    fn refused(policy: &Policy, s: ProgramSpec, field: &str, why: &str) {
        let errors = policy.check(&s);
        assert!(
            errors
                .iter()
                .any(|e| e.path == field && e.message.contains(why) && e.message.contains("policy")),
            "{field} / {why}: {errors:?}"
        );
    }

    #[test]
    fn a_careful_policy_refuses_root_foreign_paths_and_other_executables() {
        let p = Policy::parse(CAREFUL).expect("parses");
        assert!(p.check(&spec(|_| {})).is_empty());
        assert!(
            p.check(&spec(
                |s| s.stdout_logfile = Some("/var/log/corral/%(program_name)s-%(process_num)02d.log".into())
            ))
            .is_empty()
        );
        assert!(p.check(&spec(|s| s.stdout_logfile = Some("AUTO".into()))).is_empty());
        assert!(
            p.check(&spec(|s| s.command = "/usr/bin/python3 -m http.server".into()))
                .is_empty()
        );

        refused(
            &p,
            spec(|s| s.user = Some("root".into())),
            "spec.user",
            "\"root\" is not an allowed user",
        );
        refused(&p, spec(|s| s.user = None), "spec.user", "would run as root");
        refused(
            &p,
            spec(|s| s.stdout_logfile = Some("/etc/cron.d/evil".into())),
            "spec.stdout_logfile",
            "outside",
        );
        // Component-wise: /srv-other is not inside /srv.
        refused(
            &p,
            spec(|s| s.directory = Some("/srv-other".into())),
            "spec.directory",
            "outside",
        );
        refused(
            &p,
            spec(|s| s.stderr_logfile = Some("/srv/%(ENV_X)s/x.log".into())),
            "spec.stderr_logfile",
            "expansion",
        );
        refused(
            &p,
            spec(|s| s.command = "/bin/sh -c 'id'".into()),
            "spec.command",
            "not allowed",
        );
        refused(
            &p,
            spec(|s| s.command = "/usr/bin/python3.11 x".into()),
            "spec.command",
            "not allowed",
        );
        refused(
            &p,
            spec(|s| s.command = "/srv/../bin/sh".into()),
            "spec.command",
            "not a plain absolute path",
        );
        refused(
            &p,
            spec(|s| s.command = "sh -c id".into()),
            "spec.command",
            "not a plain absolute path",
        );
        refused(
            &p,
            spec(|s| s.command = "%(ENV_BIN)s/x".into()),
            "spec.command",
            "expansion",
        );
        refused(
            &p,
            spec(|s| s.environment_file = Some("/root/.env".into())),
            "spec.environment_file",
            "outside",
        );
        // An exec health check runs on the host as well: the same rule.
        let check = |exe: &str| {
            spec(|s| {
                s.health = Some(corral_proto::resource::HealthSpec {
                    exec: Some(corral_proto::resource::ExecCheck {
                        command: vec![exe.into(), "-c".into(), "id".into()],
                    }),
                    ..Default::default()
                })
            })
        };
        refused(&p, check("/bin/sh"), "spec.health.exec.command[0]", "not allowed");
        assert!(p.check(&check("/srv/app/bin/check")).is_empty());
    }

    #[test]
    fn no_policy_allows_anything_and_a_bad_policy_file_is_refused() {
        let p = Policy::default();
        assert!(!p.is_restrictive());
        assert!(p.check(&spec(|s| s.user = Some("root".into()))).is_empty());
        assert!(Policy::parse("users: [app]\nusres: [x]\n").is_err());
        assert!(Policy::parse("directories: [var/log]\n").is_err_and(|e| e.contains("not an absolute path")));
    }
}

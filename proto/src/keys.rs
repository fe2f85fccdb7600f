//! The etcd key schema. Values are JSON.
//!
//! ```text
//! <prefix>/programs/<name>               Program                       controller writes
//! <prefix>/groups/<name>                 Group                         controller writes
//! <prefix>/hosts/<host>                  Host: labels, versions        agent registers
//! <prefix>/alive/<host>                  liveness, on the agent's lease
//! <prefix>/hostcontrol/<host>            HostControl: labels, cordon   controller writes
//! <prefix>/assignments/<host>/<program>  Assignment                    controller writes
//! <prefix>/status/<host>/<program>       ProgramHostStatus             agent writes on change
//! <prefix>/election/controller           leader election
//! <prefix>/audit/<micros>                AuditEntry: who changed what  controller writes
//! <prefix>/revisions/<program>/<gen>     Revision: a spec as applied   controller writes
//! <prefix>/programcontrol/<program>      ProgramControl: paused        controller writes
//! ```
//!
//! Names are validated (`check_name`, `check_host_name`) before they become key segments, so
//! a key never has more segments than its pattern.

/// Builds the keys under one prefix (default `/corral`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Keys::new("/corral")
    }
}

impl Keys {
    /// `prefix` without a trailing slash (one is removed if given).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn programs(&self) -> String {
        format!("{}/programs/", self.prefix)
    }
    pub fn program(&self, name: &str) -> String {
        format!("{}/programs/{name}", self.prefix)
    }
    pub fn groups(&self) -> String {
        format!("{}/groups/", self.prefix)
    }
    pub fn group(&self, name: &str) -> String {
        format!("{}/groups/{name}", self.prefix)
    }
    pub fn hosts(&self) -> String {
        format!("{}/hosts/", self.prefix)
    }
    pub fn host(&self, host: &str) -> String {
        format!("{}/hosts/{host}", self.prefix)
    }
    pub fn host_controls(&self) -> String {
        format!("{}/hostcontrol/", self.prefix)
    }
    pub fn host_control(&self, host: &str) -> String {
        format!("{}/hostcontrol/{host}", self.prefix)
    }
    pub fn alive_prefix(&self) -> String {
        format!("{}/alive/", self.prefix)
    }
    pub fn alive(&self, host: &str) -> String {
        format!("{}/alive/{host}", self.prefix)
    }
    pub fn all_assignments(&self) -> String {
        format!("{}/assignments/", self.prefix)
    }
    /// The prefix an agent watches: only its own assignments.
    pub fn assignments(&self, host: &str) -> String {
        format!("{}/assignments/{host}/", self.prefix)
    }
    pub fn assignment(&self, host: &str, program: &str) -> String {
        format!("{}/assignments/{host}/{program}", self.prefix)
    }
    pub fn all_status(&self) -> String {
        format!("{}/status/", self.prefix)
    }
    pub fn host_status(&self, host: &str) -> String {
        format!("{}/status/{host}/", self.prefix)
    }
    pub fn status(&self, host: &str, program: &str) -> String {
        format!("{}/status/{host}/{program}", self.prefix)
    }
    pub fn election(&self) -> String {
        format!("{}/election/controller", self.prefix)
    }
    /// A program's revisions, oldest first.
    pub fn revisions(&self, program: &str) -> String {
        format!("{}/revisions/{program}/", self.prefix)
    }
    /// Generation `generation` of `program` (zero-padded: key order is generation order).
    pub fn revision(&self, program: &str, generation: u64) -> String {
        format!("{}/revisions/{program}/{generation:020}", self.prefix)
    }
    pub fn program_controls(&self) -> String {
        format!("{}/programcontrol/", self.prefix)
    }
    pub fn program_control(&self, program: &str) -> String {
        format!("{}/programcontrol/{program}", self.prefix)
    }
    /// Every audit entry (`AuditEntry`), oldest first.
    pub fn audit(&self) -> String {
        format!("{}/audit/", self.prefix)
    }
    /// The audit entry of a write at `micros` (Unix microseconds): zero-padded, so key order
    /// is time order.
    pub fn audit_entry(&self, micros: u64) -> String {
        format!("{}/audit/{micros:020}", self.prefix)
    }
    /// What the leader keeps of each program's rollouts (`RolloutState`).
    pub fn rollout_states(&self) -> String {
        format!("{}/rolloutstate/", self.prefix)
    }
    pub fn rollout_state(&self, program: &str) -> String {
        format!("{}{program}", self.rollout_states())
    }
    /// Every host's log requests and replies.
    pub fn all_logs(&self) -> String {
        format!("{}/logs/", self.prefix)
    }
    /// The log requests a host's agent watches (only the controller writes them).
    pub fn log_requests(&self, host: &str) -> String {
        format!("{}/logs/{host}/requests/", self.prefix)
    }
    pub fn log_request(&self, host: &str, id: &str) -> String {
        format!("{}{id}", self.log_requests(host))
    }
    /// Where a host's agent answers.
    pub fn log_replies(&self, host: &str) -> String {
        format!("{}/logs/{host}/replies/", self.prefix)
    }
    pub fn log_reply(&self, host: &str, id: &str) -> String {
        format!("{}{id}", self.log_replies(host))
    }
    /// The leading controller's account of what it could not do (`ControlPlaneHealth`).
    pub fn controller_health(&self) -> String {
        format!("{}/controller/health", self.prefix)
    }

    /// The last segment of a key under `collection` (e.g. the program of an assignment key).
    pub fn last_segment<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(&self.prefix)?
            .rsplit('/')
            .next()
            .filter(|s| !s.is_empty())
    }

    /// `(host, program)` of an assignment or status key.
    pub fn host_and_program<'a>(&self, key: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let (_, rest) = rest.split_once('/')?;
        let (host, program) = rest.split_once('/')?;
        (!host.is_empty() && !program.is_empty() && !program.contains('/')).then_some((host, program))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_schema() {
        let k = Keys::new("/corral/");
        assert_eq!(k.program("web"), "/corral/programs/web");
        assert_eq!(k.assignments("h1"), "/corral/assignments/h1/");
        assert_eq!(k.assignment("h1", "web"), "/corral/assignments/h1/web");
        assert_eq!(k.host_and_program("/corral/assignments/h1/web"), Some(("h1", "web")));
        assert_eq!(k.host_and_program("/corral/status/h1/web"), Some(("h1", "web")));
        assert_eq!(k.host_and_program("/corral/assignments/h1/"), None);
        assert_eq!(k.host_and_program("/other/assignments/h1/web"), None);
        assert_eq!(k.last_segment("/corral/programs/web"), Some("web"));
    }
}

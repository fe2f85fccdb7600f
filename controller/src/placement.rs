//! Placement's vocabulary: the writes that make etcd's assignments match (decided per
//! program by `index::Index::plan`; which hosts a program selects is `Program::selects`). Pure.

use std::sync::Arc;

use corral_proto::fleet::Assignment;

/// `(host, program)`.
pub type Slot = (String, String);

/// The writes that bring etcd's assignments where they should be. A program's assignment is
/// the same for every host: one `Arc` serves them all (50,000 copies would be ~65 MB).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AssignmentWrites {
    pub put: Vec<(Slot, Arc<Assignment>)>,
    pub delete: Vec<Slot>,
    /// What the rollouts came to (recorded, or acted on, by the leader).
    pub rollouts: Vec<RolloutDecision>,
}

/// What a program's rollout came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RolloutDecision {
    /// Every host it is placed on runs `generation`, ready: the generation an automatic
    /// revert would go back to.
    Completed { program: String, generation: u64 },
    /// `failed` failed on `host`: put back the spec of `to` (`spec.rollout.auto_revert`).
    Revert {
        program: String,
        failed: u64,
        to: u64,
        host: String,
    },
}

#[cfg(test)]
mod tests {
    use corral_proto::resource::{Group, Host, Program};
    use corral_proto::resource::{GroupSpec, HostSpec, Metadata, ProgramSpec};

    fn host(name: &str, labels: &[(&str, &str)]) -> Host {
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Host::new(
            Metadata {
                name: name.into(),
                labels,
                ..Default::default()
            },
            HostSpec::default(),
        )
    }

    fn program(name: &str, selector: Option<&[(&str, &str)]>, hosts: Option<&[&str]>) -> Program {
        let spec = ProgramSpec {
            command: "/bin/true".into(),
            selector: selector.map(|s| s.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            hosts: hosts.map(|h| h.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        };
        Program::new(
            Metadata {
                name: name.into(),
                generation: 1,
                ..Default::default()
            },
            spec,
        )
    }

    #[track_caller]
    fn check(programs: &[Program], groups: &[Group], hosts: &[Host], expect: &[(&str, &str, Option<&str>)]) {
        let index = crate::index::Index {
            programs: programs.iter().map(|p| (p.metadata.name.clone(), p.clone())).collect(),
            groups: groups.iter().map(|g| (g.metadata.name.clone(), g.clone())).collect(),
            hosts: hosts.iter().map(|h| (h.metadata.name.clone(), h.clone())).collect(),
            ..Default::default()
        };
        let mut writes = index.clone().plan(&crate::index::Dirty {
            all: true,
            ..Default::default()
        });
        writes.put.sort_by(|a, b| a.0.cmp(&b.0));
        let got: Vec<(String, String, Option<String>)> = writes
            .put
            .into_iter()
            .map(|((h, p), a)| (h, p, a.native_group.as_ref().map(|g| g.name.clone())))
            .collect();
        let expect: Vec<(String, String, Option<String>)> = expect
            .iter()
            .map(|(h, p, g)| (h.to_string(), p.to_string(), g.map(String::from)))
            .collect();
        assert_eq!(got, expect);
    }

    #[test]
    fn selectors_and_host_lists_choose_hosts() {
        let hosts = [
            host("a1", &[("role", "app")]),
            host("a2", &[("role", "app"), ("zone", "b")]),
            host("db", &[("role", "db")]),
        ];
        check(
            &[program("all", Some(&[]), None)],
            &[],
            &hosts,
            &[("a1", "all", None), ("a2", "all", None), ("db", "all", None)],
        );
        check(
            &[program("app", Some(&[("role", "app")]), None)],
            &[],
            &hosts,
            &[("a1", "app", None), ("a2", "app", None)],
        );
        check(
            &[program("zb", Some(&[("role", "app"), ("zone", "b")]), None)],
            &[],
            &hosts,
            &[("a2", "zb", None)],
        );
        check(
            &[program("named", None, Some(&["db", "gone"]))],
            &[],
            &hosts,
            &[("db", "named", None)],
        );
        check(&[program("none", Some(&[("role", "cache")]), None)], &[], &hosts, &[]);
    }

    #[test]
    fn native_groups_travel_with_their_members() {
        let g = Group::new(
            Metadata {
                name: "shop".into(),
                ..Default::default()
            },
            GroupSpec {
                programs: vec!["api".into()],
                priority: Some(5),
                native: true,
            },
        );
        let plain = Group::new(
            Metadata {
                name: "loose".into(),
                ..Default::default()
            },
            GroupSpec {
                programs: vec!["job".into()],
                priority: None,
                native: false,
            },
        );
        let hosts = [host("h", &[])];
        let programs = [program("api", Some(&[]), None), program("job", Some(&[]), None)];
        check(
            &programs,
            &[g, plain],
            &hosts,
            &[("h", "api", Some("shop")), ("h", "job", None)],
        );
    }
}

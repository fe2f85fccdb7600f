//! Placement: programs x hosts -> assignments, and the writes that make etcd match. Pure.

use std::collections::BTreeMap;

use corral_proto::fleet::{Assignment, NativeGroup, ProgramHostStatus};
use corral_proto::resource::{Group, Host, Program, RolloutSpec};

/// `(host, program)`.
pub type Slot = (String, String);

/// Whether `program` selects `host`: every selector label matches (`{}` selects all), or the
/// host is named in `hosts`.
pub fn selects(program: &Program, host: &Host) -> bool {
    match (&program.spec.selector, &program.spec.hosts) {
        (_, Some(hosts)) => hosts.contains(&host.metadata.name),
        (Some(sel), None) => sel.iter().all(|(k, v)| host.metadata.labels.get(k) == Some(v)),
        (None, None) => false,
    }
}

/// Every assignment the fleet should have. Hosts are the registered ones, ready or not: a
/// host that is down keeps its assignments, so nothing moves or restarts because of it.
pub fn place(programs: &[Program], groups: &[Group], hosts: &[Host]) -> BTreeMap<Slot, Assignment> {
    let mut native: BTreeMap<&str, NativeGroup> = BTreeMap::new();
    for g in groups.iter().filter(|g| g.spec.native) {
        for member in &g.spec.programs {
            // The API refuses a program in two native groups; keep the first by name if one
            // slipped through.
            native.entry(member.as_str()).or_insert_with(|| NativeGroup {
                name: g.metadata.name.clone(),
                priority: g.spec.priority,
            });
        }
    }
    let mut out = BTreeMap::new();
    for p in programs {
        let mut program = p.clone();
        program.status = None;
        program.metadata.resource_version = None;
        let assignment = Assignment {
            program,
            native_group: native.get(p.metadata.name.as_str()).cloned(),
        };
        for h in hosts.iter().filter(|h| selects(p, h)) {
            out.insert((h.metadata.name.clone(), p.metadata.name.clone()), assignment.clone());
        }
    }
    out
}

/// Holds spec changes back so that a program updates at most `rollout.max_unavailable`
/// hosts at a time (a count, or a share of the hosts it runs on; default 25%, at least one).
///
/// A host is *in flight* when it was given the program's current generation but has not yet
/// reported it ready. While `max_unavailable` hosts are in flight, hosts running an older
/// generation keep their current assignment; as in-flight hosts report ready, the next ones
/// (in host name order) get the new one. A batch that fails (a host that never gets ready)
/// therefore pauses the rollout, and the older version keeps running everywhere else.
/// New hosts and removals are not held back: they replace nothing that runs.
pub fn rollout(
    desired: BTreeMap<Slot, Assignment>,
    current: &BTreeMap<Slot, Assignment>,
    reports: &BTreeMap<Slot, ProgramHostStatus>,
) -> BTreeMap<Slot, Assignment> {
    let mut out = BTreeMap::new();
    // program -> (in flight, hosts waiting for the new generation)
    let mut waiting: BTreeMap<String, (usize, Vec<Slot>)> = BTreeMap::new();
    for (slot, want) in &desired {
        let generation = want.program.metadata.generation;
        let entry = waiting.entry(slot.1.clone()).or_default();
        match current.get(slot) {
            Some(cur) if cur.program.metadata.generation < generation => {
                entry.1.push(slot.clone());
                out.insert(slot.clone(), cur.clone());
            }
            Some(cur) => {
                let ready = reports
                    .get(slot)
                    .is_some_and(|r| r.observed_generation >= generation && r.ready);
                if cur.program.metadata.generation == generation && !ready {
                    entry.0 += 1;
                }
                out.insert(slot.clone(), want.clone());
            }
            None => {
                out.insert(slot.clone(), want.clone());
            }
        }
    }
    let mut hosts_of: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, program) in desired.keys() {
        *hosts_of.entry(program.as_str()).or_default() += 1;
    }
    for (in_flight, hosts) in waiting.into_values() {
        let Some(first) = hosts.first() else { continue };
        let total = hosts_of.get(first.1.as_str()).copied().unwrap_or(1);
        let max = RolloutSpec::max_unavailable(desired.get(first).and_then(|a| a.program.spec.rollout.as_ref()), total);
        for slot in hosts.into_iter().take(max.saturating_sub(in_flight)) {
            if let Some(want) = desired.get(&slot) {
                out.insert(slot, want.clone());
            }
        }
    }
    out
}

/// The writes that turn `current` into `desired`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AssignmentWrites {
    pub put: Vec<(Slot, Assignment)>,
    pub delete: Vec<Slot>,
}

/// Only what differs is written.
pub fn diff(desired: &BTreeMap<Slot, Assignment>, current: &BTreeMap<Slot, Assignment>) -> AssignmentWrites {
    let mut w = AssignmentWrites::default();
    for (slot, a) in desired {
        if current.get(slot) != Some(a) {
            w.put.push((slot.clone(), a.clone()));
        }
    }
    for slot in current.keys() {
        if !desired.contains_key(slot) {
            w.delete.push(slot.clone());
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::resource::{GroupSpec, HostSpec, Metadata, ProgramSpec};

    fn host(name: &str, labels: &[(&str, &str)]) -> Host {
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Host::new(
            Metadata {
                name: name.into(),
                labels,
                ..Default::default()
            },
            HostSpec {},
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
        let got: Vec<(String, String, Option<String>)> = place(programs, groups, hosts)
            .into_iter()
            .map(|((h, p), a)| (h, p, a.native_group.map(|g| g.name)))
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

    fn report(host: &str, program: &str, generation: u64, ready: bool) -> (Slot, ProgramHostStatus) {
        (
            (host.to_string(), program.to_string()),
            ProgramHostStatus {
                host: host.into(),
                program: program.into(),
                observed_generation: generation,
                desired_state: Default::default(),
                processes: vec![],
                ready,
                error: None,
            },
        )
    }

    fn generation_of(a: &BTreeMap<Slot, Assignment>) -> Vec<(String, u64)> {
        a.iter()
            .map(|((h, _), a)| (h.clone(), a.program.metadata.generation))
            .collect()
    }

    #[test]
    fn a_spec_change_rolls_out_max_unavailable_hosts_at_a_time() {
        let hosts = [host("h1", &[]), host("h2", &[]), host("h3", &[])];
        let v1 = place(&[program("p", Some(&[]), None)], &[], &hosts);
        let mut p2 = program("p", Some(&[]), None);
        p2.metadata.generation = 2;
        let v2 = place(&[p2.clone()], &[], &hosts);
        let g = |v: &[(&str, u64)]| v.iter().map(|(h, g)| (h.to_string(), *g)).collect::<Vec<_>>();

        // Everyone runs 1: the first host gets 2.
        let ready1: BTreeMap<_, _> = ["h1", "h2", "h3"].map(|h| report(h, "p", 1, true)).into();
        let step = rollout(v2.clone(), &v1, &ready1);
        assert_eq!(generation_of(&step), g(&[("h1", 2), ("h2", 1), ("h3", 1)]));
        // h1 not ready yet: nothing more moves (the same answer, so no write).
        assert_eq!(rollout(v2.clone(), &step, &ready1), step);
        // h1 ready at 2: h2 goes.
        let mut reports = ready1.clone();
        reports.extend([report("h1", "p", 2, true)]);
        let step = rollout(v2.clone(), &step, &reports);
        assert_eq!(generation_of(&step), g(&[("h1", 2), ("h2", 2), ("h3", 1)]));
        // h2 fails at 2: the rollout pauses, h3 keeps 1.
        reports.extend([report("h2", "p", 2, false)]);
        assert_eq!(
            generation_of(&rollout(v2.clone(), &step, &reports)),
            g(&[("h1", 2), ("h2", 2), ("h3", 1)])
        );

        // max_unavailable 2 moves two at once; new hosts are not held back.
        p2.spec.rollout = Some(corral_proto::RolloutSpec {
            max_unavailable: Some(corral_proto::HostCount::Count(2)),
        });
        let v2 = place(
            &[p2],
            &[],
            &[host("h1", &[]), host("h2", &[]), host("h3", &[]), host("h4", &[])],
        );
        assert_eq!(
            generation_of(&rollout(v2, &v1, &ready1)),
            g(&[("h1", 2), ("h2", 2), ("h3", 1), ("h4", 2)])
        );
    }

    #[test]
    fn max_unavailable_is_a_count_or_a_share_of_the_programs_hosts_default_a_quarter() {
        let hosts: Vec<Host> = (0..10).map(|i| host(&format!("h{i:02}"), &[])).collect();
        let v1 = place(&[program("p", Some(&[]), None)], &[], &hosts);
        let ready: BTreeMap<_, _> = hosts.iter().map(|h| report(&h.metadata.name, "p", 1, true)).collect();
        let moved = |rollout_spec: Option<corral_proto::HostCount>| {
            let mut p2 = program("p", Some(&[]), None);
            p2.metadata.generation = 2;
            p2.spec.rollout = rollout_spec.map(|m| corral_proto::RolloutSpec {
                max_unavailable: Some(m),
            });
            let v2 = place(&[p2], &[], &hosts);
            rollout(v2, &v1, &ready)
                .values()
                .filter(|a| a.program.metadata.generation == 2)
                .count()
        };
        use corral_proto::HostCount::*;
        assert_eq!(moved(None), 3, "default 25% of 10, rounded up");
        assert_eq!(moved(Some(Percent(100))), 10);
        assert_eq!(moved(Some(Percent(1))), 1);
        assert_eq!(moved(Some(Count(4))), 4);
        assert_eq!(RolloutSpec::max_unavailable(None, 1000), 250);
        // Read from YAML either way.
        let spec: corral_proto::RolloutSpec = serde_json::from_str(r#"{"max_unavailable": "30%"}"#).expect("parses");
        assert_eq!(spec.max_unavailable, Some(Percent(30)));
        let spec: corral_proto::RolloutSpec = serde_json::from_str(r#"{"max_unavailable": 7}"#).expect("parses");
        assert_eq!(spec.max_unavailable, Some(Count(7)));
        assert!(serde_json::from_str::<corral_proto::RolloutSpec>(r#"{"max_unavailable": "lots"}"#).is_err());
    }

    #[test]
    fn only_differences_are_written() {
        let hosts = [host("h1", &[]), host("h2", &[])];
        let desired = place(&[program("p", Some(&[]), None)], &[], &hosts);
        let mut current = desired.clone();
        assert_eq!(diff(&desired, &current), AssignmentWrites::default());
        current.remove(&("h2".to_string(), "p".to_string()));
        let stale = place(&[program("old", Some(&[]), None)], &[], &hosts[..1]);
        current.extend(stale);
        let w = diff(&desired, &current);
        assert_eq!(
            w.put.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>(),
            [("h2".to_string(), "p".to_string())]
        );
        assert_eq!(w.delete, [("h1".to_string(), "old".to_string())]);
    }
}

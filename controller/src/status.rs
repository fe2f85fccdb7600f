//! Status aggregation: what the agents report, summed up per program and for the fleet. Pure.

use std::collections::{BTreeMap, BTreeSet};

use corral_proto::fleet::{FleetStatus, HostProgramView, ProgramHostStatus, ProgramStatusView, ProgramSummary};
use corral_proto::resource::{Host, Program};

/// Aggregates the reports of the hosts `p` is assigned to.
pub fn program_status(
    p: &Program,
    assigned: &BTreeSet<String>,
    reports: &BTreeMap<(String, String), ProgramHostStatus>,
    alive: &BTreeSet<String>,
) -> ProgramStatusView {
    let mut view = ProgramStatusView {
        desired: assigned.len(),
        ..Default::default()
    };
    for host in assigned {
        let report = reports.get(&(host.clone(), p.metadata.name.clone()));
        let host_ready = alive.contains(host);
        let observed_generation = report.map_or(0, |r| r.observed_generation);
        let updated = observed_generation >= p.metadata.generation;
        let ready = updated && host_ready && report.is_some_and(|r| r.ready);
        view.updated += usize::from(updated);
        view.ready += usize::from(ready);
        view.hosts.push(HostProgramView {
            host: host.clone(),
            host_ready,
            observed_generation,
            ready,
            processes: report.map(|r| r.processes.clone()).unwrap_or_default(),
            error: report
                .and_then(|r| r.error.clone())
                .or_else(|| (!host_ready).then(|| "host not ready: its agent is not reporting".to_string())),
        });
    }
    view
}

/// Summarises the fleet.
pub fn fleet_status(
    programs: &[Program],
    assigned: &BTreeMap<String, BTreeSet<String>>,
    reports: &BTreeMap<(String, String), ProgramHostStatus>,
    hosts: &[Host],
    alive: &BTreeSet<String>,
) -> FleetStatus {
    let empty = BTreeSet::new();
    let not_ready_hosts: Vec<String> = hosts
        .iter()
        .map(|h| h.metadata.name.clone())
        .filter(|h| !alive.contains(h))
        .collect();
    let programs = programs
        .iter()
        .map(|p| {
            let view = program_status(p, assigned.get(&p.metadata.name).unwrap_or(&empty), reports, alive);
            ProgramSummary {
                name: p.metadata.name.clone(),
                generation: p.metadata.generation,
                desired: view.desired,
                updated: view.updated,
                ready: view.ready,
                problems: view
                    .hosts
                    .iter()
                    .filter(|h| !h.ready)
                    .map(|h| match &h.error {
                        Some(e) => format!("{}: {e}", h.host),
                        None if h.observed_generation < p.metadata.generation => {
                            format!(
                                "{}: runs generation {} of {}",
                                h.host, h.observed_generation, p.metadata.generation
                            )
                        }
                        None => format!(
                            "{}: {}",
                            h.host,
                            h.processes
                                .iter()
                                .map(|pr| format!("{} {}", pr.name, pr.state))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    })
                    .collect(),
            }
        })
        .collect();
    FleetStatus {
        hosts: hosts.len(),
        hosts_ready: hosts.len() - not_ready_hosts.len(),
        not_ready_hosts,
        programs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::resource::{DesiredState, Metadata, ProgramSpec};

    fn report(host: &str, generation: u64, ready: bool, error: Option<&str>) -> ((String, String), ProgramHostStatus) {
        (
            (host.to_string(), "web".to_string()),
            ProgramHostStatus {
                host: host.into(),
                program: "web".into(),
                observed_generation: generation,
                desired_state: DesiredState::Running,
                processes: vec![],
                ready,
                error: error.map(String::from),
            },
        )
    }

    #[test]
    fn counts_desired_updated_and_ready_hosts() {
        let p = Program::new(
            Metadata {
                name: "web".into(),
                generation: 2,
                ..Default::default()
            },
            ProgramSpec {
                command: "x".into(),
                ..Default::default()
            },
        );
        let assigned: BTreeSet<String> = ["h1", "h2", "h3", "h4"].map(String::from).into();
        let reports = [
            report("h1", 2, true, None),
            report("h2", 1, true, None),
            report("h3", 2, false, Some("FATAL")),
            report("h4", 2, true, None),
        ]
        .into();
        let alive: BTreeSet<String> = ["h1", "h2", "h3"].map(String::from).into();
        let v = program_status(&p, &assigned, &reports, &alive);
        assert_eq!((v.desired, v.updated, v.ready), (4, 3, 1));
        assert_eq!(
            v.hosts[3].error.as_deref(),
            Some("host not ready: its agent is not reporting")
        );

        let hosts: Vec<Host> = ["h1", "h2", "h3", "h4"]
            .iter()
            .map(|h| {
                Host::new(
                    Metadata {
                        name: h.to_string(),
                        ..Default::default()
                    },
                    Default::default(),
                )
            })
            .collect();
        let f = fleet_status(&[p], &[("web".to_string(), assigned)].into(), &reports, &hosts, &alive);
        assert_eq!(f.not_ready_hosts, ["h4"]);
        assert!(!f.converged());
        assert_eq!(f.programs[0].problems.len(), 3);
        assert!(f.programs[0].problems[0].starts_with("h2: runs generation 1 of 2"));
    }
}

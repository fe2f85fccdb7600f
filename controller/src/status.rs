//! Status aggregation: what the agents report, summed up per program and for the fleet. Pure.

use std::collections::{BTreeMap, BTreeSet};

use corral_proto::fleet::{FleetStatus, HostProgramView, ProgramHostStatus, ProgramStatusView, ProgramSummary};
use corral_proto::resource::{Host, Program};

/// Each registered host's readiness: `None` when ready, else why not. A host is ready when
/// its agent holds its liveness lease and does not report itself unready (supervisord
/// unreachable or refusing its credentials).
pub fn host_readiness(hosts: &[Host], alive: &BTreeSet<String>) -> Readiness {
    hosts
        .iter()
        .map(|h| {
            let name = h.metadata.name.clone();
            let why = if !alive.contains(&name) {
                Some(AGENT_SILENT.to_string())
            } else {
                h.status.as_ref().filter(|s| !s.ready).map(|s| {
                    s.reason
                        .clone()
                        .unwrap_or_else(|| "the agent reports it not ready".to_string())
                })
            };
            (name, why)
        })
        .collect()
}

/// The hosts `p` may be on, before knowing what cordoned hosts hold: every host placement
/// gives it to, counting a cordoned one as holding it (whose reports then tell).
pub fn placement_candidates<'a>(p: &Program, hosts: &'a [Host]) -> Vec<&'a Host> {
    hosts.iter().filter(|h| p.placed_on(h, true)).collect()
}

/// Where a log read of `p` goes: the hosts it is placed on (a cordoned host only when it
/// `holding`s the program already), narrowed to `only` when given. Those whose agent holds no
/// liveness lease are `away`, answered at once instead of waited for.
pub fn log_hosts(
    p: &Program,
    hosts: &[Host],
    holding: &BTreeSet<String>,
    alive: &BTreeSet<String>,
    only: Option<&str>,
) -> LogHosts {
    let mut out = LogHosts::default();
    for h in placement_candidates(p, hosts) {
        let name = &h.metadata.name;
        if !p.placed_on(h, holding.contains(name)) || only.is_some_and(|o| o != name) {
            continue;
        }
        if alive.contains(name) {
            out.ask.push(name.clone());
        } else {
            out.away.push(name.clone());
        }
    }
    out
}

/// See [`log_hosts`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LogHosts {
    /// Hosts whose agents are asked.
    pub ask: Vec<String>,
    /// Hosts the program is placed on whose agents are away.
    pub away: Vec<String>,
}

impl LogHosts {
    /// Whether the read concerns no host at all.
    pub fn is_empty(&self) -> bool {
        self.ask.is_empty() && self.away.is_empty()
    }
}

/// Why a host whose agent is away is not read.
pub const AGENT_AWAY_FOR_LOGS: &str = "its agent is not connected to etcd (no liveness lease): its logs cannot be read";

/// Host -> why it is not ready (`None`: ready).
pub type Readiness = BTreeMap<String, Option<String>>;

const AGENT_SILENT: &str = "its agent is not reporting";

/// Aggregates the reports of the hosts `p` is assigned to.
pub fn program_status(
    p: &Program,
    assigned: &BTreeSet<String>,
    reports: &BTreeMap<(String, String), ProgramHostStatus>,
    readiness: &Readiness,
) -> ProgramStatusView {
    let mut view = ProgramStatusView {
        desired: assigned.len(),
        ..Default::default()
    };
    for host in assigned {
        let report = reports.get(&(host.clone(), p.metadata.name.clone()));
        let not_ready = match readiness.get(host) {
            Some(why) => why.clone(),
            None => Some(AGENT_SILENT.to_string()),
        };
        let host_ready = not_ready.is_none();
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
                .or_else(|| not_ready.map(|why| format!("host not ready: {why}"))),
            waiting: report.and_then(|r| r.waiting.clone()),
            failed_generation: report.map_or(0, |r| r.failed_generation),
        });
    }
    view
}

/// Summarises the fleet.
pub fn fleet_status(
    programs: &[Program],
    assigned: &BTreeMap<String, BTreeSet<String>>,
    reports: &BTreeMap<(String, String), ProgramHostStatus>,
    readiness: &Readiness,
) -> FleetStatus {
    let empty = BTreeSet::new();
    let programs = programs
        .iter()
        .map(|p| {
            let view = program_status(p, assigned.get(&p.metadata.name).unwrap_or(&empty), reports, readiness);
            ProgramSummary {
                name: p.metadata.name.clone(),
                generation: p.metadata.generation,
                desired: view.desired,
                updated: view.updated,
                ready: view.ready,
                paused: false,
                problems: view
                    .hosts
                    .iter()
                    .filter(|h| !h.ready)
                    .map(|h| match (&h.error, &h.waiting) {
                        (Some(e), _) => format!("{}: {e}", h.host),
                        (None, Some(w)) => format!("{}: {w}", h.host),
                        (None, None) if h.observed_generation < p.metadata.generation => {
                            format!(
                                "{}: runs generation {} of {}",
                                h.host, h.observed_generation, p.metadata.generation
                            )
                        }
                        (None, None) => format!(
                            "{}: {}",
                            h.host,
                            h.processes
                                .iter()
                                .map(|pr| format!("{} {}", pr.name, pr.summary()))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    })
                    .collect(),
            }
        })
        .collect();
    fleet_of(readiness, programs)
}

/// A fleet status with the hosts' part counted from `readiness` and the given programs
/// (control plane problems and warnings are the caller's to add).
pub fn fleet_of(readiness: &Readiness, programs: Vec<ProgramSummary>) -> FleetStatus {
    let not_ready_reasons: BTreeMap<String, String> = readiness
        .iter()
        .filter_map(|(h, why)| Some((h.clone(), why.clone()?)))
        .collect();
    FleetStatus {
        hosts: readiness.len(),
        hosts_ready: readiness.len() - not_ready_reasons.len(),
        not_ready_hosts: not_ready_reasons.keys().cloned().collect(),
        not_ready_reasons,
        control_plane: Vec::new(),
        warnings: Vec::new(),
        unschedulable: Default::default(),
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
                failed_generation: 0,
                waiting: None,
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
        let readiness = host_readiness(&hosts, &alive);
        let v = program_status(&p, &assigned, &reports, &readiness);
        assert_eq!((v.desired, v.updated, v.ready), (4, 3, 1));
        assert_eq!(
            v.hosts[3].error.as_deref(),
            Some("host not ready: its agent is not reporting")
        );
        let f = fleet_status(&[p], &[("web".to_string(), assigned)].into(), &reports, &readiness);
        assert_eq!(f.not_ready_hosts, ["h4"]);
        assert!(!f.converged());
        assert_eq!(f.programs[0].problems.len(), 3);
        assert!(f.programs[0].problems[0].starts_with("h2: runs generation 1 of 2"));
    }

    #[test]
    fn a_log_read_asks_the_hosts_holding_the_program_and_answers_for_those_away() {
        let host = |name: &str, labels: &[(&str, &str)], cordoned: bool, drained: bool| {
            Host::new(
                Metadata {
                    name: name.into(),
                    labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                    ..Default::default()
                },
                corral_proto::resource::HostSpec { cordoned, drained },
            )
        };
        let hosts = [
            host("a", &[("role", "web")], false, false),
            host("b", &[("role", "web")], false, false),
            host("c", &[("role", "db")], false, false),
            host("d", &[("role", "web")], true, false),
            host("e", &[("role", "web")], true, false),
            host("f", &[("role", "web")], false, true),
        ];
        let p = Program::new(
            Metadata {
                name: "web".into(),
                ..Default::default()
            },
            ProgramSpec {
                command: "x".into(),
                selector: Some([("role".to_string(), "web".to_string())].into()),
                ..Default::default()
            },
        );
        let names = |v: Vec<&Host>| v.iter().map(|h| h.metadata.name.clone()).collect::<Vec<_>>();
        // Only cordoned candidates need a look at what they hold.
        assert_eq!(names(placement_candidates(&p, &hosts)), ["a", "b", "d", "e"]);
        let holding: BTreeSet<String> = ["d".to_string()].into();
        let alive: BTreeSet<String> = ["a", "d", "e"].map(String::from).into();
        let all = log_hosts(&p, &hosts, &holding, &alive, None);
        assert_eq!(all.ask, ["a", "d"]);
        assert_eq!(all.away, ["b"]);
        let one = log_hosts(&p, &hosts, &holding, &alive, Some("b"));
        assert_eq!((one.ask.len(), one.away.as_slice()), (0, ["b".to_string()].as_slice()));
        // A host the program is not placed on is neither.
        assert!(log_hosts(&p, &hosts, &holding, &alive, Some("c")).is_empty());
        assert!(log_hosts(&p, &hosts, &holding, &alive, Some("e")).is_empty());
    }

    #[test]
    fn a_host_whose_agent_reports_it_unready_is_not_ready_with_the_reason() {
        let mut host = Host::new(
            Metadata {
                name: "h1".into(),
                ..Default::default()
            },
            Default::default(),
        );
        host.status = Some(corral_proto::resource::HostStatus {
            ready: false,
            reason: Some("supervisord refused the credentials".into()),
            ..Default::default()
        });
        let alive: BTreeSet<String> = ["h1".to_string()].into();
        let r = host_readiness(&[host.clone()], &alive);
        assert_eq!(r["h1"].as_deref(), Some("supervisord refused the credentials"));
        host.status = Some(corral_proto::resource::HostStatus {
            ready: true,
            ..Default::default()
        });
        assert_eq!(host_readiness(&[host.clone()], &alive)["h1"], None);
        // Without its lease, whatever it last said.
        assert_eq!(
            host_readiness(&[host], &BTreeSet::new())["h1"].as_deref(),
            Some("its agent is not reporting")
        );
    }
}

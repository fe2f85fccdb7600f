//! The agent's Prometheus metrics: desired vs observed per process, reconcile runs, drift
//! corrections, and the health of its two dependencies.
//!
//! Labels are program, process, state, result and kind only: never a pid, an environment
//! value or an error text, so cardinality stays bounded by the declared programs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use corral_proto::resource::DesiredState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::plan::Desired;
use crate::supervisor::{ProcessInfo, ProcessState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ProcessLabels {
    pub program: String,
    pub process: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub program: String,
    pub process: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ProgramLabels {
    pub program: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    version: String,
    host: String,
}

const STATES: [ProcessState; 8] = [
    ProcessState::Stopped,
    ProcessState::Starting,
    ProcessState::Running,
    ProcessState::Backoff,
    ProcessState::Stopping,
    ProcessState::Exited,
    ProcessState::Fatal,
    ProcessState::Unknown,
];

/// Every metric the agent exports.
#[derive(Clone)]
pub struct AgentMetrics {
    process_state: Family<StateLabels, Gauge>,
    process_up: Family<ProcessLabels, Gauge>,
    process_start_time: Family<ProcessLabels, Gauge>,
    process_restarts: Family<ProcessLabels, Counter>,
    process_unexpected_exits: Family<ProcessLabels, Counter>,
    process_healthy: Family<ProcessLabels, Gauge>,
    program_desired_running: Family<ProgramLabels, Gauge>,
    program_desired_generation: Family<ProgramLabels, Gauge>,
    program_applied_generation: Family<ProgramLabels, Gauge>,
    program_error: Family<ProgramLabels, Gauge>,
    program_refused: Family<ProgramLabels, Gauge>,
    reconcile: Family<ResultLabels, Counter>,
    reconcile_duration: Histogram,
    drift: Family<KindLabels, Counter>,
    supervisord_up: Gauge,
    etcd_connected: Gauge,
    desired_programs: Gauge,
}

/// What the previous pass saw of each process, to derive restarts (supervisord has no counter).
#[derive(Clone, Debug, Default)]
pub struct ProcessHistory {
    /// Last non-zero pid and last stop time of each process.
    last: BTreeMap<ProcessLabels, (i64, i64)>,
    programs: BTreeSet<ProgramLabels>,
    /// Processes the agent asked to stop whose stop is not seen yet (a stop takes time: the
    /// exit it causes shows in a later pass, and is not unexpected).
    stopped_by_agent: BTreeSet<ProcessLabels>,
}

impl AgentMetrics {
    /// Creates and registers every metric.
    pub fn register(registry: &mut Registry, host: &str) -> AgentMetrics {
        let info = Info::new(InfoLabels {
            version: env!("CARGO_PKG_VERSION").to_string(),
            host: host.to_string(),
        });
        registry.register("corral_agent", "The agent's version and host", info);
        let m = AgentMetrics {
            process_state: Family::default(),
            process_up: Family::default(),
            process_start_time: Family::default(),
            process_restarts: Family::default(),
            process_unexpected_exits: Family::default(),
            process_healthy: Family::default(),
            program_desired_running: Family::default(),
            program_desired_generation: Family::default(),
            program_applied_generation: Family::default(),
            program_error: Family::default(),
            program_refused: Family::default(),
            reconcile: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            drift: Family::default(),
            supervisord_up: Gauge::default(),
            etcd_connected: Gauge::default(),
            desired_programs: Gauge::default(),
        };
        registry.register(
            "corral_process_state",
            "1 for the supervisord state each managed process is in, 0 for the others",
            m.process_state.clone(),
        );
        registry.register("corral_process_up", "1 if the process is RUNNING", m.process_up.clone());
        registry.register(
            "corral_process_start_time_seconds",
            "Unix time the process last started",
            m.process_start_time.clone(),
        );
        registry.register(
            "corral_process_restarts",
            "Times the process came back with a new pid (seen at each resync)",
            m.process_restarts.clone(),
        );
        registry.register(
            "corral_process_unexpected_exits",
            "Times the process ended while it should run, without Corral stopping it",
            m.process_unexpected_exits.clone(),
        );
        registry.register(
            "corral_process_healthy",
            "1 if the process passes its health check, 0 if it fails it (spec.health); absent without a check or before a verdict",
            m.process_healthy.clone(),
        );
        registry.register(
            "corral_program_desired_running",
            "1 if the program's desired state is running",
            m.program_desired_running.clone(),
        );
        registry.register(
            "corral_program_desired_generation",
            "The generation of the program's spec assigned to this host",
            m.program_desired_generation.clone(),
        );
        registry.register(
            "corral_program_applied_generation",
            "The generation of the program's spec this host runs",
            m.program_applied_generation.clone(),
        );
        registry.register(
            "corral_program_error",
            "1 if the program could not be applied or driven on this host",
            m.program_error.clone(),
        );
        registry.register(
            "corral_program_refused",
            "1 if supervisord refused the program's current config on this host (it keeps its last accepted one, if any, until the spec changes or the retry backoff ends)",
            m.program_refused.clone(),
        );
        registry.register("corral_reconcile", "Reconcile passes by result", m.reconcile.clone());
        registry.register(
            "corral_reconcile_duration_seconds",
            "Time one reconcile pass took",
            m.reconcile_duration.clone(),
        );
        registry.register("corral_drift_corrections", "Drift corrected, by kind", m.drift.clone());
        registry.register(
            "corral_supervisord_up",
            "1 if supervisord answered the last pass",
            m.supervisord_up.clone(),
        );
        registry.register(
            "corral_etcd_connected",
            "1 while the agent has an etcd session",
            m.etcd_connected.clone(),
        );
        registry.register(
            "corral_desired_programs",
            "Programs assigned to this host",
            m.desired_programs.clone(),
        );
        m
    }

    pub fn set_etcd_connected(&self, connected: bool) {
        self.etcd_connected.set(i64::from(connected));
    }

    /// Records a pass that could not run (supervisord or the conf dir unusable).
    pub fn pass_failed(&self, took: Duration, label: &str) {
        self.reconcile
            .get_or_create(&ResultLabels { result: "error".into() })
            .inc();
        self.reconcile_duration.observe(took.as_secs_f64());
        if label != "conf_dir" {
            self.supervisord_up.set(0);
        }
    }

    /// Records a pass: its result, what it corrected, and every process it saw.
    pub fn pass_done(
        &self,
        took: Duration,
        desired: &Desired,
        report: &crate::reconcile::PassReport,
        history: &mut ProcessHistory,
    ) {
        let any_error = report.statuses.values().any(|s| s.error.is_some());
        let result = if any_error { "partial" } else { "ok" };
        self.reconcile
            .get_or_create(&ResultLabels { result: result.into() })
            .inc();
        self.reconcile_duration.observe(took.as_secs_f64());
        self.supervisord_up.set(1);
        for kind in &report.corrections {
            self.drift
                .get_or_create(&KindLabels {
                    kind: kind.as_str().to_string(),
                })
                .inc();
        }
        self.desired_programs.set(desired.programs.len() as i64);

        let programs: BTreeSet<ProgramLabels> = desired
            .programs
            .keys()
            .chain(desired.invalid.keys())
            .map(|p| ProgramLabels { program: p.clone() })
            .collect();
        for (name, p) in &desired.programs {
            let l = ProgramLabels { program: name.clone() };
            self.program_desired_running
                .get_or_create(&l)
                .set(i64::from(p.state == DesiredState::Running));
            self.program_desired_generation
                .get_or_create(&l)
                .set(p.generation as i64);
        }
        for (name, s) in &report.statuses {
            let l = ProgramLabels { program: name.clone() };
            self.program_applied_generation
                .get_or_create(&l)
                .set(s.observed_generation as i64);
            self.program_error.get_or_create(&l).set(i64::from(s.error.is_some()));
            self.program_refused
                .get_or_create(&l)
                .set(i64::from(report.refused.contains(name)));
            for proc in &s.processes {
                let l = ProcessLabels {
                    program: name.clone(),
                    process: proc.name.clone(),
                };
                match proc.health.as_str() {
                    "healthy" => self.process_healthy.get_or_create(&l).set(1),
                    "unhealthy" => self.process_healthy.get_or_create(&l).set(0),
                    _ => {
                        self.process_healthy.remove(&l);
                        0
                    }
                };
            }
        }

        // Processes of managed programs only, labelled by program and group:process.
        let mut seen = BTreeSet::new();
        for p in desired.programs.values() {
            for info in report.processes.iter().filter(|i| p.namespecs.contains(&i.namespec())) {
                let l = ProcessLabels {
                    program: p.name.clone(),
                    process: info.namespec(),
                };
                let touched = report.stopped_by_agent.contains(&info.namespec());
                self.observe_process(&l, info, p.state == DesiredState::Running, touched, history);
                seen.insert(l);
            }
        }
        // Forget what is no longer managed, so its series disappear.
        let gone: Vec<ProcessLabels> = history.last.keys().filter(|l| !seen.contains(*l)).cloned().collect();
        for l in gone {
            history.last.remove(&l);
            history.stopped_by_agent.remove(&l);
            self.process_up.remove(&l);
            self.process_start_time.remove(&l);
            self.process_restarts.remove(&l);
            self.process_unexpected_exits.remove(&l);
            self.process_healthy.remove(&l);
            for s in STATES {
                self.process_state.remove(&StateLabels {
                    program: l.program.clone(),
                    process: l.process.clone(),
                    state: s.name().to_string(),
                });
            }
        }
        let stale: Vec<ProgramLabels> = history
            .programs
            .iter()
            .filter(|p| !programs.contains(*p))
            .cloned()
            .collect();
        for l in stale {
            self.program_desired_running.remove(&l);
            self.program_desired_generation.remove(&l);
            self.program_applied_generation.remove(&l);
            self.program_error.remove(&l);
            self.program_refused.remove(&l);
        }
        history.programs = programs;
    }

    fn observe_process(
        &self,
        l: &ProcessLabels,
        info: &ProcessInfo,
        should_run: bool,
        touched: bool,
        history: &mut ProcessHistory,
    ) {
        for s in STATES {
            let labels = StateLabels {
                program: l.program.clone(),
                process: l.process.clone(),
                state: s.name().to_string(),
            };
            self.process_state
                .get_or_create(&labels)
                .set(i64::from(info.state == s));
        }
        self.process_up
            .get_or_create(l)
            .set(i64::from(info.state == ProcessState::Running));
        self.process_start_time.get_or_create(l).set(info.start);
        // Touch the counters so they exist (at 0) from the first scrape.
        let restarts = self.process_restarts.get_or_create_owned(l);
        let exits = self.process_unexpected_exits.get_or_create_owned(l);
        if touched {
            history.stopped_by_agent.insert(l.clone());
        }
        if let Some(&(last_pid, last_stop)) = history.last.get(l) {
            if info.pid != 0 && last_pid != 0 && info.pid != last_pid {
                restarts.inc();
            }
            // supervisord stamps `stop` whenever the process ends; one Corral did not cause,
            // while it should run, is an unexpected exit (a crash, or someone's stop).
            if info.stop != last_stop && info.stop > 0 {
                let caused_by_agent = history.stopped_by_agent.remove(l);
                if should_run && !caused_by_agent {
                    exits.inc();
                }
            }
        }
        let pid = if info.pid != 0 {
            info.pid
        } else {
            history.last.get(l).map_or(0, |(p, _)| *p)
        };
        history.last.insert(l.clone(), (pid, info.stop));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pid: i64, stop: i64) -> ProcessInfo {
        ProcessInfo {
            name: "web".into(),
            group: "web".into(),
            state: if pid > 0 {
                ProcessState::Running
            } else {
                ProcessState::Stopped
            },
            statename: String::new(),
            start: 0,
            stop,
            now: 0,
            pid,
            exitstatus: 0,
            spawnerr: String::new(),
            stdout_logfile: String::new(),
            stderr_logfile: String::new(),
            description: String::new(),
        }
    }

    fn counted(m: &AgentMetrics, l: &ProcessLabels) -> (u64, u64) {
        (
            m.process_restarts.get_or_create(l).get(),
            m.process_unexpected_exits.get_or_create(l).get(),
        )
    }

    #[test]
    fn a_stop_the_agent_asked_for_is_not_an_unexpected_exit_even_when_it_ends_later() {
        let m = AgentMetrics::register(&mut Registry::default(), "h1");
        let mut h = ProcessHistory::default();
        let l = ProcessLabels {
            program: "web".into(),
            process: "web".into(),
        };
        m.observe_process(&l, &info(10, 0), true, false, &mut h);
        // The agent asks it to stop (a health restart); it ends two passes later.
        m.observe_process(&l, &info(10, 0), true, true, &mut h);
        m.observe_process(&l, &info(10, 0), true, false, &mut h);
        m.observe_process(&l, &info(0, 100), true, false, &mut h);
        m.observe_process(&l, &info(11, 100), true, false, &mut h);
        assert_eq!(counted(&m, &l), (1, 0), "one restart, no unexpected exit");
        // It crashes on its own: that one counts.
        m.observe_process(&l, &info(0, 200), true, false, &mut h);
        assert_eq!(counted(&m, &l), (1, 1));
    }
}

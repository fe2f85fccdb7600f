//! The controller's Prometheus metrics: fleet and program readiness (counted from the
//! leader's index at each scrape; only the leading replica exports them), API traffic, and
//! leadership.

use std::collections::BTreeSet;
use std::time::Duration;

use corral_proto::fleet::FleetStatus;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadyLabels {
    pub ready: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabels {
    pub host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgramKindLabels {
    pub program: String,
    /// desired | updated | ready
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgramLabels {
    pub program: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteCodeLabels {
    pub route: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

/// Every metric the controller exports.
#[derive(Clone)]
pub struct ControllerMetrics {
    hosts: Family<ReadyLabels, Gauge>,
    host_ready: Family<HostLabels, Gauge>,
    program_hosts: Family<ProgramKindLabels, Gauge>,
    rollout_in_progress: Family<ProgramLabels, Gauge>,
    api_requests: Family<RouteCodeLabels, Counter>,
    api_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    leader: Gauge,
    control_plane_problems: Gauge,
}

impl ControllerMetrics {
    /// Creates and registers every metric.
    pub fn register(registry: &mut Registry) -> ControllerMetrics {
        let m = ControllerMetrics {
            hosts: Family::default(),
            host_ready: Family::default(),
            program_hosts: Family::default(),
            rollout_in_progress: Family::default(),
            api_requests: Family::default(),
            api_duration: Family::new_with_constructor(latency),
            leader: Gauge::default(),
            control_plane_problems: Gauge::default(),
        };
        registry.register(
            "corral_control_plane_problems",
            "Objects the control plane skips: values it cannot read, assignments etcd refused",
            m.control_plane_problems.clone(),
        );
        registry.register("corral_hosts", "Registered hosts, by readiness", m.hosts.clone());
        registry.register(
            "corral_host_ready",
            "1 if the host is ready: its agent holds its liveness lease and reaches supervisord",
            m.host_ready.clone(),
        );
        registry.register(
            "corral_program_hosts",
            "Hosts per program: desired (assigned), updated (current generation), ready",
            m.program_hosts.clone(),
        );
        registry.register(
            "corral_rollout_in_progress",
            "1 while some assigned host does not run the program's current generation",
            m.rollout_in_progress.clone(),
        );
        registry.register(
            "corral_api_requests",
            "API requests by route and status code",
            m.api_requests.clone(),
        );
        registry.register(
            "corral_api_request_duration_seconds",
            "API request latency",
            m.api_duration.clone(),
        );
        registry.register(
            "corral_controller_leader",
            "1 if this replica leads (writes assignments)",
            m.leader.clone(),
        );
        m
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Records one API request.
    pub fn request(&self, route: &str, code: u16, took: Duration) {
        self.api_requests
            .get_or_create(&RouteCodeLabels {
                route: route.to_string(),
                code: code.to_string(),
            })
            .inc();
        self.api_duration
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Removes the fleet gauges (a replica that does not lead has no index to count from).
    pub fn clear_fleet(&self) {
        self.control_plane_problems.set(0);
        self.hosts.clear();
        self.host_ready.clear();
        self.program_hosts.clear();
        self.rollout_in_progress.clear();
    }

    /// Replaces the fleet gauges with `status` (series of deleted programs and hosts go).
    pub fn set_fleet(&self, status: &FleetStatus, hosts: &BTreeSet<String>) {
        self.control_plane_problems.set(status.control_plane.len() as i64);
        self.hosts.clear();
        self.hosts
            .get_or_create(&ReadyLabels { ready: "true".into() })
            .set(status.hosts_ready as i64);
        self.hosts
            .get_or_create(&ReadyLabels { ready: "false".into() })
            .set(status.not_ready_hosts.len() as i64);
        self.host_ready.clear();
        for h in hosts {
            let ready = !status.not_ready_hosts.contains(h);
            self.host_ready
                .get_or_create(&HostLabels { host: h.clone() })
                .set(i64::from(ready));
        }
        self.program_hosts.clear();
        self.rollout_in_progress.clear();
        for p in &status.programs {
            for (kind, n) in [("desired", p.desired), ("updated", p.updated), ("ready", p.ready)] {
                let l = ProgramKindLabels {
                    program: p.name.clone(),
                    kind: kind.to_string(),
                };
                self.program_hosts.get_or_create(&l).set(n as i64);
            }
            let l = ProgramLabels {
                program: p.name.clone(),
            };
            self.rollout_in_progress
                .get_or_create(&l)
                .set(i64::from(p.updated < p.desired));
        }
    }
}

//! End-to-end tests against real servers, one module per area.

mod agent_process;
mod alerting;
mod audit;
mod chaos;
mod cluster;
mod conformance;
mod control_plane;
mod deploy;
mod etcd_kit;
mod fleet;
mod isolation;
mod metrics;
mod packages;
mod reconcile;
mod render_roundtrip;
mod secrets;
mod supervisor_rpc;
mod tls;

//! Corral's per-host agent. Today: the supervisord XML-RPC driver that reconciliation uses.

pub mod confdir;
pub mod envfiles;
pub mod etcd;
pub mod health;
pub mod logs;
pub mod metrics;
pub mod plan;
pub mod procfs;
pub mod reconcile;
pub mod run;
pub mod supervisor;

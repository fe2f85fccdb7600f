//! Corral's per-host agent. Today: the supervisord XML-RPC driver that reconciliation uses.

pub mod plan;
pub mod supervisor;

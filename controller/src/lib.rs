//! Corral's controller: validates and stores specs in etcd, places programs on hosts,
//! aggregates status, and serves the HTTP API. Several replicas may run; one leads.

pub mod access;
pub mod api;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod placement;
pub mod policy;
pub mod status;
pub mod store;
pub mod tls;
pub mod tokens;

//! supervisord's XML-RPC interface (POST `/RPC2`), over a UNIX socket or TCP, with Basic auth.
//!
//! A thin adapter: typed methods over [`Client::call`], faults turned into [`Error::Fault`]
//! with supervisord's codes, no decisions. `dxr` encodes and decodes; `reqwest` carries the
//! bytes, because `dxr_client` ignores the HTTP status (a 401 would look like a parse error)
//! and cannot decode supervisord's `system.multicall` answers. The answer every pass asks
//! for, `getAllProcessInfo`, is read by a fast decoder (`scan.rs`) instead of dxr's
//! generic value tree, which cost more than the rest of a quiet pass.

mod client;
mod scan;
mod types;

pub use client::{Client, ClientConfig, Endpoint};
pub use types::{Error, FaultCode, LogTail, ProcessInfo, ProcessResult, ProcessState, ReloadResult, SupervisorState};

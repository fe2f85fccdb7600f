//! supervisord's XML-RPC interface (POST `/RPC2`), over a UNIX socket or TCP, with Basic auth.
//!
//! A thin adapter: typed methods over [`Client::call`], faults turned into [`Error::Fault`]
//! with supervisord's codes, no decisions. `dxr` encodes and decodes; `reqwest` carries the
//! bytes, because `dxr_client` ignores the HTTP status (a 401 would look like a parse error)
//! and cannot decode supervisord's `system.multicall` answers.

mod client;
mod types;

pub use client::{Client, ClientConfig, Endpoint};
pub use types::{Error, FaultCode, LogTail, ProcessInfo, ProcessResult, ProcessState, ReloadResult, SupervisorState};

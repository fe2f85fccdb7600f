//! Corral's contract: resource types, validation, the etcd key schema and the pure renderer
//! from a `Program` to supervisord INI text.
//!
//! Architecture Invariant: this crate does no I/O. Everything here is a function of its
//! arguments, so the agent, the controller and the CLI agree on what a spec means.

pub mod api;
pub mod envfile;
pub mod fleet;
pub mod import;
pub mod ini;
pub mod keys;
pub mod logs;
pub mod render;
pub mod resource;
pub mod signal;
pub mod template;
pub mod validate;

pub use render::{ManagedFile, group_file_name, managed_file_kind, program_file_name, render_group, render_program};
pub use resource::{
    API_VERSION, AutoRestart, ByteSize, CrashLoop, CrashLoopSpec, DesiredState, Group, GroupSpec, Host, HostCount,
    HostSpec, HostStatus, Kind, Metadata, ParseError, Program, ProgramSpec, Resource, RolloutSpec, SignalRequest,
    parse_documents, parse_every_document, parse_json,
};
pub use validate::{FieldError, Valid, ValidationErrors, validate_group, validate_host, validate_program};

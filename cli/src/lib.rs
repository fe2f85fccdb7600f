//! The `corral` CLI's library part: the controller API client, shared with the test kit.

pub mod client;

//! Corral's test kit: real etcd and supervisord started on loopback, on free ports, in temp
//! dirs, and stopped when dropped; and supervisord's own config loader as an oracle.
//!
//! Every server is a real Debian-packaged binary (`etcd`, `supervisord`); nothing is mocked.

pub mod corral;
pub mod etcd;
pub mod loader;
pub mod process;
pub mod specs;
pub mod supervisord;

/// A free TCP port on 127.0.0.1 (the OS picks it; it is free when this returns).
///
/// # Errors
/// If no socket can be bound.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

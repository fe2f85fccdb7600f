//! Corral's test kit: real etcd and supervisord started on loopback, on free ports, in temp
//! dirs, and stopped when dropped; and supervisord's own config loader as an oracle.
//!
//! Every server is a real Debian-packaged binary (`etcd`, `supervisord`); nothing is mocked.

pub mod chaos;
pub mod corral;
pub mod etcd;
pub mod loader;
pub mod netns;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod specs;
pub mod supervisord;

/// A free TCP port on 127.0.0.1, free when this returns.
///
/// Taken below the kernel's ephemeral range (32768 and up on Linux) and never twice in one
/// test binary: a port the OS hands out for an outgoing connection, or to another test of the
/// same binary, could be taken between this call and the server binding it (etcd then exits
/// with "address already in use").
///
/// # Errors
/// If no port in the range can be bound.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    // Binaries run one after another, but start each at its own place in the range.
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() * 97) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN;
        let port = u16::try_from(port).map_err(std::io::Error::other)?;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free port in 20000-31999",
    ))
}

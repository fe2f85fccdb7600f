//! A network namespace joined to the machine by a veth pair: a host of its own on the network,
//! whose link can be taken down (a real partition: packets vanish both ways, open connections
//! hang until keep-alive notices, nothing answers with a reset).
//!
//! Needs root and `ip` (iproute2); [`Netns::create`] says why when the machine does not allow
//! it, and callers fall back to [`crate::proxy::Proxy`].

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::Context as _;

/// One namespace and its link; removed on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    /// The machine's end of the link (in the machine's namespace).
    host_if: String,
    /// The machine's address on the link: what a process inside reaches the machine at.
    pub host_addr: Ipv4Addr,
    /// The namespace's own address on the link.
    pub ns_addr: Ipv4Addr,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("ip {}", args.join(" ")))?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Netns {
    /// Creates namespace number `index` of this process, on its own /30 in 198.18.0.0/15
    /// (the range set aside for network tests).
    ///
    /// # Errors
    /// If the machine does not allow it (not root, no `ip`, no namespaces), with `ip`'s reason.
    pub fn create(index: u8) -> anyhow::Result<Netns> {
        anyhow::ensure!(index < 64, "at most 64 namespaces per process");
        let pid = std::process::id();
        let name = format!("corral-{pid}-{index}");
        let host_if = format!("cr{pid}h{index}");
        let ns_if = format!("cr{pid}n{index}");
        // A /30 per namespace: the third octet from the process, the fourth from the index.
        let octet = (pid % 256) as u8;
        let base = index * 4;
        let host_addr = Ipv4Addr::new(198, 18 + (pid / 256 % 2) as u8, octet, base + 1);
        let ns_addr = Ipv4Addr::new(198, 18 + (pid / 256 % 2) as u8, octet, base + 2);
        // Left over by a run of the same PID that was killed.
        let _ = ip(&["link", "del", &host_if]);
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let made = Netns {
            name,
            host_if,
            host_addr,
            ns_addr,
        };
        let host = format!("{host_addr}/30");
        let ns = format!("{ns_addr}/30");
        let n = made.name.as_str();
        ip(&["link", "add", &made.host_if, "type", "veth", "peer", "name", &ns_if])?;
        ip(&["link", "set", &ns_if, "netns", n])?;
        ip(&["addr", "add", &host, "dev", &made.host_if])?;
        ip(&["link", "set", &made.host_if, "up"])?;
        ip(&["-n", n, "addr", "add", &ns, "dev", &ns_if])?;
        ip(&["-n", n, "link", "set", &ns_if, "up"])?;
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        Ok(made)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec` execs it: the
    /// child's PID is the program's own).
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Takes the link down (`false`) or up again (`true`).
    ///
    /// # Errors
    /// If `ip` fails.
    pub fn set_link(&self, up: bool) -> anyhow::Result<()> {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both.
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

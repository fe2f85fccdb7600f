//! The chaos scenario, short enough for the suite: every kind of fault at least once (kill -9
//! of an agent, the leader, an etcd member, a supervisord; a host cut off from etcd), each
//! with a spec change made while it lasts. Nothing may be lost, restarted needlessly, left
//! unconverged or left running outside supervisord. `scripts/chaos` runs it for as long as
//! asked, with a seed.

use std::time::Duration;

use corral_tests::chaos::{FAULTS, Options, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_is_lost_or_restarted_needlessly_under_faults() -> anyhow::Result<()> {
    let report = run(&Options {
        seed: 7,
        steps: Some(FAULTS.len() * 2),
        duration: None,
        converge_timeout: Duration::from_secs(60),
        verbose: true,
        in_turn: true,
    })
    .await?;
    eprintln!("{report}");
    for fault in FAULTS.iter().filter(|f| **f != "none") {
        assert!(
            report.faults.get(fault).is_some_and(|n| *n >= 2),
            "{fault} never injected: {report}"
        );
    }
    assert!(report.ok(), "{report}");
    Ok(())
}

/// The partition the scenario uses where the machine allows: a process in the namespace
/// reaches the machine over the link while it is up, and nothing gets through once it is down.
#[tokio::test]
async fn a_namespace_whose_link_is_down_is_cut_off() -> anyhow::Result<()> {
    let ns = match corral_tests::netns::Netns::create(63) {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("SKIPPED: this machine allows no network namespace: {e:#}");
            return Ok(());
        }
    };
    let listener = tokio::net::TcpListener::bind((ns.host_addr, 0)).await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    let connects = || {
        let mut cmd = ns.command(std::path::Path::new("/usr/bin/timeout"));
        cmd.args(["2", "bash", "-c", &format!("</dev/tcp/{}/{port}", ns.host_addr)])
            .stderr(std::process::Stdio::null());
        cmd.status().map(|s| s.success())
    };
    assert!(connects()?, "the namespace cannot reach the machine over its link");
    ns.set_link(false)?;
    assert!(!connects()?, "the namespace reaches the machine with its link down");
    ns.set_link(true)?;
    assert!(connects()?, "the link did not come back");
    Ok(())
}

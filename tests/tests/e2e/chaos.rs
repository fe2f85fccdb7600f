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

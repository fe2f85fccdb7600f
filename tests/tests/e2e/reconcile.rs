//! One agent's reconcile passes against a real supervisord (no etcd): new, changed, removed
//! programs, desired state, drift, isolation of a bad program, and the no-restart invariant.

use std::collections::BTreeMap;
use std::time::Duration;

use corral_agent::confdir::ConfDir;
use corral_agent::plan::desired;
use corral_agent::reconcile::{PassReport, Reconciler};
use corral_agent::supervisor::{Client, ProcessState};
use corral_proto::fleet::Assignment;
use corral_proto::resource::{DesiredState, ProgramSpec};
use corral_tests::supervisord::{Options, Supervisord};

fn assignment(name: &str, generation: u64, f: impl FnOnce(&mut ProgramSpec)) -> (String, Assignment) {
    (name.to_string(), corral_tests::specs::assignment(name, generation, f))
}

struct Host {
    sd: Supervisord,
    client: Client,
    state_dir: tempfile::TempDir,
}

impl Host {
    async fn start() -> anyhow::Result<Host> {
        let sd = Supervisord::start(Options::default()).await?;
        let client = sd.client().await?;
        Ok(Host {
            sd,
            client,
            state_dir: tempfile::tempdir()?,
        })
    }

    fn reconciler(&self) -> anyhow::Result<Reconciler> {
        Ok(Reconciler::new(
            "h1",
            self.client.clone(),
            ConfDir::new(&self.sd.conf_dir),
            self.state_dir.path().into(),
        )?)
    }

    async fn pids(&self) -> anyhow::Result<BTreeMap<String, i64>> {
        Ok(self
            .client
            .get_all_process_info()
            .await?
            .into_iter()
            .map(|p| (p.namespec(), p.pid))
            .collect())
    }
}

/// Runs passes until every program is ready (or 10 s pass).
async fn converge(r: &mut Reconciler, a: &BTreeMap<String, Assignment>) -> anyhow::Result<PassReport> {
    let d = desired(a, "h1");
    let mut last = r.pass(&d).await?;
    for _ in 0..100 {
        if last.statuses.values().all(|s| s.ready || s.error.is_some()) {
            return Ok(last);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = r.pass(&d).await?;
    }
    anyhow::bail!("did not converge: {:#?}", last.statuses)
}

#[tokio::test]
async fn programs_are_added_changed_and_removed_without_touching_the_others() -> anyhow::Result<()> {
    let host = Host::start().await?;
    host.sd
        .write_conf("theirs.conf", "[program:theirs]\ncommand=/bin/sleep 1000\n")?;
    host.client.reload_config().await?;
    host.client.add_process_group("theirs").await?;
    let mut r = host.reconciler()?;
    let mut a: BTreeMap<_, _> = [
        assignment("web", 1, |_| {}),
        assignment("worker", 1, |s| {
            s.numprocs = Some(2);
            s.process_name = Some("%(program_name)s_%(process_num)d".into());
        }),
    ]
    .into();
    let report = converge(&mut r, &a).await?;
    assert!(
        report.statuses.values().all(|s| s.ready && s.observed_generation == 1),
        "{report:#?}"
    );
    let before = host.pids().await?;
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        ["theirs", "web", "worker:worker_0", "worker:worker_1"]
    );

    // Change one program: only it restarts.
    a.insert(
        "web".into(),
        assignment("web", 2, |s| s.command = "/bin/sleep 2000".into()).1,
    );
    let report = converge(&mut r, &a).await?;
    assert_eq!(report.statuses["web"].observed_generation, 2);
    let after = host.pids().await?;
    assert_ne!(before["web"], after["web"]);
    for p in ["theirs", "worker:worker_0", "worker:worker_1"] {
        assert_eq!(before[p], after[p], "{p} was restarted");
    }

    // Remove one: its file and processes go; the unmanaged program stays.
    a.remove("worker");
    converge(&mut r, &a).await?;
    assert_eq!(host.pids().await?.keys().collect::<Vec<_>>(), ["theirs", "web"]);
    assert!(!host.sd.conf_dir.join("corral-program-worker.conf").exists());
    assert!(host.sd.conf_dir.join("theirs.conf").exists());
    assert_eq!(host.pids().await?["theirs"], before["theirs"]);
    Ok(())
}

#[tokio::test]
async fn drift_is_corrected_and_an_agent_restart_restarts_nothing() -> anyhow::Result<()> {
    let host = Host::start().await?;
    let mut r = host.reconciler()?;
    let a: BTreeMap<_, _> = [
        assignment("web", 1, |_| {}),
        assignment("idle", 1, |s| s.state = DesiredState::Stopped),
    ]
    .into();
    converge(&mut r, &a).await?;
    let info = host.client.get_process_info("idle").await?;
    assert_eq!(info.state, ProcessState::Stopped);
    let pid = host.pids().await?["web"];

    // Someone runs `supervisorctl stop web` and starts `idle`.
    host.client.stop_process("web", true).await?;
    host.client.start_process("idle", true).await?;
    let report = converge(&mut r, &a).await?;
    assert!(report.corrections.contains(&"process_started") && report.corrections.contains(&"process_stopped"));
    assert_eq!(host.client.get_process_info("idle").await?.state, ProcessState::Stopped);
    let pid = {
        let now = host.pids().await?["web"];
        assert_ne!(now, pid);
        now
    };

    // Someone edits, then deletes, a managed file: restored, nothing restarted.
    let file = host.sd.conf_dir.join("corral-program-web.conf");
    let original = std::fs::read_to_string(&file)?;
    std::fs::write(&file, original.replace("startsecs=0", "startsecs=9"))?;
    let report = converge(&mut r, &a).await?;
    assert_eq!(std::fs::read_to_string(&file)?, original);
    assert!(report.corrections.contains(&"conf_file"));
    std::fs::remove_file(&file)?;
    converge(&mut r, &a).await?;
    assert_eq!(std::fs::read_to_string(&file)?, original);
    assert_eq!(host.pids().await?["web"], pid);

    // A new agent process (fresh reconciler, same state dir): zero restarts.
    drop(r);
    let mut r = host.reconciler()?;
    let report = converge(&mut r, &a).await?;
    assert!(report.corrections.is_empty(), "{:?}", report.corrections);
    assert_eq!(host.pids().await?["web"], pid);
    Ok(())
}

#[tokio::test]
async fn a_program_that_cannot_apply_here_is_reported_and_blocks_nothing() -> anyhow::Result<()> {
    let host = Host::start().await?;
    let mut r = host.reconciler()?;
    let mut a: BTreeMap<_, _> = [
        assignment("good", 1, |_| {}),
        assignment("baduser", 1, |s| s.user = Some("no-such-user-here".into())),
        assignment("badlog", 1, |s| {
            s.stdout_logfile = Some("/nonexistent/dir/x.log".into())
        }),
    ]
    .into();
    let report = converge(&mut r, &a).await?;
    assert!(report.statuses["good"].ready);
    for bad in ["baduser", "badlog"] {
        let err = report.statuses[bad].error.as_deref().unwrap_or_default();
        assert!(err.contains("refused"), "{bad}: {err:?}");
        assert!(
            !host.sd.conf_dir.join(format!("corral-program-{bad}.conf")).exists(),
            "{bad} left in conf dir"
        );
    }
    // supervisord still re-reads its config: another program can be added meanwhile.
    a.insert("later".into(), assignment("later", 1, |_| {}).1);
    let report = converge(&mut r, &a).await?;
    assert!(report.statuses["later"].ready, "{report:#?}");
    assert!(host.client.reload_config().await.is_ok());

    // A good program whose update is refused keeps running its last good version.
    let pid = host.pids().await?["good"];
    a.insert(
        "good".into(),
        assignment("good", 2, |s| s.user = Some("no-such-user-here".into())).1,
    );
    let report = converge(&mut r, &a).await?;
    assert!(report.statuses["good"].error.is_some());
    assert_eq!(report.statuses["good"].observed_generation, 1);
    assert_eq!(host.pids().await?["good"], pid);
    assert!(
        std::fs::read_to_string(host.sd.conf_dir.join("corral-program-good.conf"))?.contains("command=/bin/sleep 1000")
    );
    Ok(())
}

#[tokio::test]
async fn a_signal_request_signals_running_processes_once() -> anyhow::Result<()> {
    let host = Host::start().await?;
    let mut r = host.reconciler()?;
    let trapper = |generation, id: Option<&str>| {
        assignment("trapper", generation, |s| {
            s.command = "/bin/sh -c 'trap \"echo got-hup\" HUP; while :; do sleep 0.1; done'".into();
            s.signal_request = id.map(|id| corral_proto::SignalRequest {
                signal: "HUP".into(),
                id: id.into(),
            });
        })
    };
    // A request already there when the agent first sees the program is history, not news.
    let mut a: BTreeMap<_, _> = [trapper(1, Some("old"))].into();
    converge(&mut r, &a).await?;
    let log = || async { host.client.read_process_stdout_log("trapper", 0, 10_000).await };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(log().await?, "");
    let pid = host.pids().await?["trapper"];

    a.insert("trapper".into(), trapper(2, Some("new")).1);
    let report = converge(&mut r, &a).await?;
    assert!(
        report.corrections.contains(&"process_signalled"),
        "{:?}",
        report.corrections
    );
    let mut out = String::new();
    for _ in 0..50 {
        out = log().await?;
        if !out.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(out, "got-hup\n");
    // Once only, and the process kept running.
    converge(&mut r, &a).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(log().await?, "got-hup\n");
    assert_eq!(host.pids().await?["trapper"], pid);
    Ok(())
}

#[tokio::test]
async fn a_restart_marker_restarts_once() -> anyhow::Result<()> {
    let host = Host::start().await?;
    let mut r = host.reconciler()?;
    let mut a: BTreeMap<_, _> = [assignment("web", 1, |_| {})].into();
    converge(&mut r, &a).await?;
    let pid = host.pids().await?["web"];
    a.insert(
        "web".into(),
        assignment("web", 2, |s| s.restarted_at = Some("2026-11-25T12:00:00Z".into())).1,
    );
    let report = converge(&mut r, &a).await?;
    assert!(report.corrections.contains(&"process_restarted"));
    // The file did not change, yet the host runs the new generation.
    assert_eq!(report.statuses["web"].observed_generation, 2);
    let restarted = host.pids().await?["web"];
    assert_ne!(restarted, pid);
    converge(&mut r, &a).await?;
    assert_eq!(host.pids().await?["web"], restarted);
    // A spec without the marker (a file applied again) does not restart it.
    a.insert("web".into(), assignment("web", 3, |_| {}).1);
    converge(&mut r, &a).await?;
    assert_eq!(host.pids().await?["web"], restarted);
    Ok(())
}

#[tokio::test]
async fn a_starting_process_asks_for_a_recheck_when_its_startsecs_end() -> anyhow::Result<()> {
    let host = Host::start().await?;
    let mut r = host.reconciler()?;
    let a: BTreeMap<_, _> = [assignment("slow", 1, |s| s.startsecs = Some(2))].into();
    let d = desired(&a, "h1");
    let added = std::time::Instant::now();
    r.pass(&d).await?;
    // The group was just added: the next pass sees it STARTING.
    let mut report = r.pass(&d).await?;
    for _ in 0..20 {
        if report.recheck_after.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        report = r.pass(&d).await?;
    }
    let wait = report.recheck_after.expect("a recheck is asked for while STARTING");
    assert!(!report.statuses["slow"].ready);
    assert!(
        wait >= Duration::from_millis(100) && wait <= Duration::from_secs(2),
        "{wait:?}"
    );
    // Following the rechecks reaches ready once startsecs are over, from when the agent added
    // the group (supervisord's whole-second times would leave up to a second of doubt), and
    // without polling all along.
    let mut passes = 0;
    while let Some(wait) = report.recheck_after {
        tokio::time::sleep(wait).await;
        report = r.pass(&d).await?;
        passes += 1;
    }
    assert!(report.statuses["slow"].ready, "{report:#?}");
    let took = added.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    assert!(passes < 40, "{passes} passes to see it RUNNING");
    Ok(())
}

#[tokio::test]
async fn a_process_supervisord_restarts_on_its_own_is_left_to_the_resync() -> anyhow::Result<()> {
    let host = Host::start().await?;
    let mut r = host.reconciler()?;
    let a: BTreeMap<_, _> = [assignment("flaky", 1, |s| {
        s.command = "/bin/sh -c 'sleep 0.3; exit 3'".into();
        s.startsecs = Some(1);
        s.startretries = Some(100);
    })]
    .into();
    let d = desired(&a, "h1");
    let state = |report: &corral_agent::reconcile::PassReport| {
        report.statuses["flaky"].processes.first().map(|p| p.state.clone())
    };
    let mut seen_backoff = false;
    let mut checked = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while checked < 2 && std::time::Instant::now() < deadline {
        let report = r.pass(&d).await?;
        match state(&report).as_deref() {
            Some("BACKOFF") => seen_backoff = true,
            // Started again by supervisord, not by the agent: no polling for it.
            Some("STARTING") if seen_backoff && report.corrections.is_empty() => {
                assert_eq!(report.recheck_after, None, "{report:#?}");
                checked += 1;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert_eq!(checked, 2, "never saw supervisord restart it");
    Ok(())
}

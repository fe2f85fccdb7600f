//! One agent's reconcile passes against a real supervisord (no etcd): new, changed, removed
//! programs, desired state, drift, isolation of a bad program, and the no-restart invariant.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;

use corral_agent::confdir::ConfDir;
use corral_agent::plan::{Correction, desired};
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

/// Runs passes, as the agent's loop does (at once when a recheck is asked for), until every
/// program is ready or has an error and nothing is left to recheck (or 10 s pass). The
/// report returned is the last one, with the corrections of every pass.
async fn converge(r: &mut Reconciler, a: &BTreeMap<String, Assignment>) -> anyhow::Result<PassReport> {
    let d = desired(a, "h1");
    let mut corrections = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut last = r.pass(&d).await?;
        corrections.extend(last.corrections.iter().copied());
        let settled = last.statuses.values().all(|s| s.ready || s.error.is_some());
        if settled && last.recheck_after.is_none_or(|w| w > Duration::from_secs(1)) {
            last.corrections = corrections;
            return Ok(last);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "did not converge: {:#?}",
            last.statuses
        );
        let wait = last.recheck_after.unwrap_or(Duration::from_millis(100));
        tokio::time::sleep(wait.min(Duration::from_millis(100))).await;
    }
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
        ["theirs", "web", "worker_0", "worker_1"]
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
    for p in ["theirs", "worker_0", "worker_1"] {
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
    // `idle` is stopped by the agent within milliseconds of someone starting it below: the
    // agent waits until the process has exec'd (a SIGTERM before that would be lost), so the
    // stop ends well within a convergence (see
    // a_stop_asked_for_before_the_process_has_exec_d_is_not_lost).
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
    assert!(
        report.corrections.contains(&Correction::ProcessStarted)
            && report.corrections.contains(&Correction::ProcessStopped)
    );
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
    assert!(report.corrections.contains(&Correction::ConfFile));
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
        report.corrections.contains(&Correction::ProcessSignalled),
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
    assert!(report.corrections.contains(&Correction::ProcessRestarted));
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

// ---- Faithful to supervisord's real behaviour ----

/// Passes as the agent's loop runs them (at each recheck, else every `resync`) for `how_long`;
/// returns every report.
async fn run_for(
    r: &mut Reconciler,
    a: &BTreeMap<String, Assignment>,
    how_long: Duration,
    resync: Duration,
) -> anyhow::Result<Vec<PassReport>> {
    let d = desired(a, "h1");
    let end = std::time::Instant::now() + how_long;
    let mut reports = Vec::new();
    while std::time::Instant::now() < end {
        let report = r.pass(&d).await?;
        let wait = report.recheck_after.unwrap_or(resync).min(resync);
        reports.push(report);
        tokio::time::sleep(wait).await;
    }
    Ok(reports)
}

fn config_names(host: &Host) -> anyhow::Result<Vec<String>> {
    let dir = &host.sd.conf_dir;
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

#[tokio::test]
async fn a_refused_update_keeps_the_accepted_version_running_and_is_not_retried_in_a_loop() -> anyhow::Result<()> {
    let host = Host::start().await?;
    let mut r = host.reconciler()?;
    let mut a: BTreeMap<_, _> = [assignment("web", 1, |_| {}), assignment("other", 1, |_| {})].into();
    converge(&mut r, &a).await?;
    let pid = host.pids().await?["web"];
    let file = host.sd.conf_dir.join("corral-program-web.conf");
    let accepted = std::fs::read_to_string(&file)?;

    a.insert(
        "web".into(),
        assignment("web", 2, |s| s.user = Some("nosuchuser".into())).1,
    );
    a.insert(
        "new".into(),
        assignment("new", 1, |s| s.user = Some("nosuchuser".into())).1,
    );
    let reports = run_for(&mut r, &a, Duration::from_secs(3), Duration::from_millis(500)).await?;
    let last = reports.last().context("no pass")?;
    // Reported, with the old generation still the one running.
    let web = &last.statuses["web"];
    assert!(
        web.error.as_deref().unwrap_or_default().contains("nosuchuser"),
        "{web:#?}"
    );
    assert_eq!(web.observed_generation, 1);
    assert!(!web.ready);
    assert_eq!(last.refused, ["new".to_string(), "web".to_string()].into());
    // The accepted version stays on disk, loaded and running.
    assert_eq!(std::fs::read_to_string(&file)?, accepted);
    assert_eq!(host.pids().await?["web"], pid);
    // Still in supervisord's parsed config (`supervisorctl avail`), unchanged.
    let reread = host.client.reload_config().await?;
    assert!(
        !reread.removed.contains(&"web".to_string()) && !reread.changed.contains(&"web".to_string()),
        "{reread:?}"
    );
    assert!(!host.sd.conf_dir.join("corral-program-new.conf").exists());
    // No hot loop: after the first passes, nothing is written and nothing asks for a look
    // before the refusal's backoff (30 s).
    let later = &reports[reports.len() / 2..];
    assert!(later.iter().all(|r| r.corrections.is_empty()), "{later:#?}");
    assert!(
        later
            .iter()
            .all(|r| r.recheck_after.is_none_or(|w| w >= Duration::from_secs(25))),
        "{:?}",
        later.iter().map(|r| r.recheck_after).collect::<Vec<_>>()
    );
    assert!(reports.len() <= 3 * 2 + 4, "{} passes in 3 s", reports.len());

    // A new spec is tried at once, and runs.
    a.insert(
        "web".into(),
        assignment("web", 3, |s| s.command = "/bin/sleep 1001".into()).1,
    );
    let report = converge(&mut r, &a).await?;
    assert!(report.statuses["web"].ready && report.statuses["web"].observed_generation == 3);
    assert!(report.statuses["other"].ready);
    Ok(())
}

#[tokio::test]
async fn a_refused_member_of_a_native_group_blocks_nothing() -> anyhow::Result<()> {
    let host = Host::start().await?;
    let mut r = host.reconciler()?;
    let shop = |a: (String, Assignment)| {
        let (n, mut a) = a;
        a.native_group = Some(corral_proto::fleet::NativeGroup {
            name: "shop".into(),
            priority: None,
        });
        (n, a)
    };
    let mut a: BTreeMap<_, _> = [
        shop(assignment("api", 1, |_| {})),
        shop(assignment("bad", 1, |s| s.user = Some("nosuchuser".into()))),
        assignment("alone", 1, |_| {}),
    ]
    .into();
    let report = converge(&mut r, &a).await?;
    assert!(report.statuses["api"].ready, "{report:#?}");
    assert!(report.statuses["alone"].ready, "{report:#?}");
    assert!(report.statuses["bad"].error.is_some());
    assert!(host.pids().await?.contains_key("shop:api"));
    // The host still takes changes.
    a.insert("later".into(), assignment("later", 1, |_| {}).1);
    let report = converge(&mut r, &a).await?;
    assert!(report.statuses["later"].ready, "{report:#?}");
    // The member fixed: it joins the group.
    a.insert("bad".into(), shop(assignment("bad", 2, |_| {})).1);
    let report = converge(&mut r, &a).await?;
    assert!(report.statuses["bad"].ready, "{report:#?}");
    assert!(host.pids().await?.contains_key("shop:bad"));
    Ok(())
}

#[tokio::test]
async fn a_conf_dir_reached_through_a_symlink_blocks_nothing() -> anyhow::Result<()> {
    let host = Host::start().await?;
    let links = tempfile::tempdir()?;
    let link = links.path().join("conf.d");
    std::os::unix::fs::symlink(&host.sd.conf_dir, &link)?;
    let mut r = Reconciler::new(
        "h1",
        host.client.clone(),
        ConfDir::new(&link),
        host.state_dir.path().into(),
    )?;
    let mut a: BTreeMap<_, _> = [
        assignment("good", 1, |_| {}),
        assignment("bad", 1, |s| s.user = Some("nosuchuser".into())),
    ]
    .into();
    let report = converge(&mut r, &a).await?;
    assert!(report.statuses["good"].ready, "{report:#?}");
    assert!(report.statuses["bad"].error.is_some());
    a.insert("later".into(), assignment("later", 1, |_| {}).1);
    assert!(converge(&mut r, &a).await?.statuses["later"].ready);
    Ok(())
}

#[tokio::test]
async fn fatal_is_restarted_with_backoff_not_fought_and_reported_with_its_stderr() -> anyhow::Result<()> {
    let host = Host::start().await?;
    let mut r = host.reconciler()?;
    let count = host.state_dir.path().join("spawns");
    let final_count = host.state_dir.path().join("final-spawns");
    let crashy = |name: &str, counter: &std::path::Path, restart: bool| {
        // Over 2 KiB of stderr, two bytes a character after an odd one: the last 2 KiB start
        // inside a character, which supervisord cannot send (HTTP 500).
        let command = format!(
            "/usr/bin/python3 -c \"import sys; open('{}', 'a').write('x\\n'); sys.stderr.write('x' + 'é' * 1500 + '\\nboom-{name}\\n'); sys.exit(3)\"",
            counter.display()
        );
        assignment(name, 1, move |s| {
            s.command = command;
            s.startsecs = Some(1);
            s.startretries = Some(1);
            s.crash_loop = Some(corral_proto::CrashLoopSpec {
                restart: Some(restart),
                initial_delay_secs: Some(2),
                max_delay_secs: Some(4),
                ..Default::default()
            });
        })
    };
    let a: BTreeMap<_, _> = [crashy("crashy", &count, true), crashy("final", &final_count, false)].into();
    let started = std::time::Instant::now();
    let reports = run_for(&mut r, &a, Duration::from_secs(9), Duration::from_millis(500)).await?;
    let spawns = |f: &std::path::Path| std::fs::read_to_string(f).map(|t| t.lines().count()).unwrap_or(0);
    // supervisord: a start and one retry, then FATAL after ~1 s. Corral: again 2 s later, and
    // 4 s after the next FATAL: three rounds of two spawns in 9 s (fighting FATAL at once
    // made ~18).
    let n = spawns(&count);
    assert!((4..=7).contains(&n), "{n} spawns in {:?}", started.elapsed());
    // FATAL kept final where asked: supervisord's own two spawns only.
    assert_eq!(spawns(&final_count), 2);

    let fatal_seen = reports.iter().rev().find_map(|r| {
        let p = r.statuses["crashy"].processes.first()?;
        (p.state == "FATAL" && p.next_retry_at > 0).then(|| p.clone())
    });
    let p = fatal_seen.context("never saw crashy FATAL waiting for its next start")?;
    // supervisord keeps no exit status for a start that failed (it says why instead).
    assert!(p.spawn_error.contains("Exited too quickly"), "{p:#?}");
    assert!(p.crash_restarts >= 1, "{p:#?}");
    assert!(p.stderr_tail.contains("boom-crashy"), "{p:#?}");
    assert!(p.summary().contains("crash-loop restart"), "{}", p.summary());
    let f = &reports.last().context("no pass")?.statuses["final"].processes[0];
    assert_eq!((f.state.as_str(), f.crash_restarts, f.next_retry_at), ("FATAL", 0, 0));
    assert!(f.stderr_tail.contains("boom-final"), "{f:#?}");
    Ok(())
}

/// A program that ignores SIGTERM: its stop lasts `stopwaitsecs`, then SIGKILL.
fn stubborn(name: &str, generation: u64, stopwaitsecs: i64, tag: &str) -> (String, Assignment) {
    let command = format!("/bin/sh -c 'trap \"\" TERM; while :; do sleep 0.1; done; echo {tag}'");
    assignment(name, generation, move |s| {
        s.command = command;
        s.stopwaitsecs = Some(stopwaitsecs);
    })
}

#[tokio::test]
async fn stops_do_not_wait_and_a_slow_stop_delays_no_other_program() -> anyhow::Result<()> {
    let host = Host::start().await?;
    let mut r = host.reconciler()?;
    let names = ["a", "b", "c"];
    let mut a: BTreeMap<_, _> = names.iter().map(|n| assignment(n, 1, |_| {})).collect();
    a.extend([stubborn("slow", 1, 30, "v1")]);
    converge(&mut r, &a).await?;
    let before = host.pids().await?;

    // Change all four at once.
    for n in names {
        a.insert(n.into(), assignment(n, 2, |s| s.command = "/bin/sleep 2000".into()).1);
    }
    a.extend([stubborn("slow", 2, 30, "v2")]);
    let d = desired(&a, "h1");
    let t = std::time::Instant::now();
    let report = loop {
        let report = r.pass(&d).await?;
        if names
            .iter()
            .all(|n| report.statuses[*n].ready && report.statuses[*n].observed_generation == 2)
        {
            break report;
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(10), "{report:#?}");
        tokio::time::sleep(report.recheck_after.unwrap_or(Duration::from_millis(100))).await;
    };
    let took = t.elapsed();
    // ~1 s each, one after another, before; and the stubborn one held them all 30 s.
    assert!(took < Duration::from_millis(900), "3 changes took {took:?}");
    let after = host.pids().await?;
    for n in names {
        assert_ne!(before[n], after[n], "{n} not restarted");
    }
    // The stubborn one is still stopping, and is not reported as running its new spec.
    let slow = &report.statuses["slow"];
    assert_eq!(slow.processes[0].state, "STOPPING");
    assert_eq!(slow.observed_generation, 1);
    assert!(!slow.ready);

    // Deleting three running programs is as quick.
    for n in names {
        a.remove(n);
    }
    let d = desired(&a, "h1");
    let t = std::time::Instant::now();
    loop {
        r.pass(&d).await?;
        let pids = host.pids().await?;
        if names.iter().all(|n| !pids.contains_key(*n)) {
            break;
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(10), "not removed: {pids:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "3 deletions took {:?}",
        t.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn a_program_still_stopping_is_reported_at_its_new_generation_only_once_it_runs() -> anyhow::Result<()> {
    let host = Host::start().await?;
    let mut r = host.reconciler()?;
    let mut a: BTreeMap<_, _> = [stubborn("slow", 1, 3, "v1")].into();
    converge(&mut r, &a).await?;
    let old = host.pids().await?["slow"];
    a.extend([stubborn("slow", 2, 3, "v2")]);
    let d = desired(&a, "h1");
    let t = std::time::Instant::now();
    let mut seen_stopping = false;
    loop {
        let report = r.pass(&d).await?;
        let s = &report.statuses["slow"];
        let info = host.client.get_process_info("slow").await?;
        if info.pid == old || info.state == ProcessState::Stopping {
            seen_stopping |= info.state == ProcessState::Stopping;
            // The old process still runs: neither the new generation nor ready.
            assert_eq!(s.observed_generation, 1, "{s:#?}");
            assert!(!s.ready);
        }
        if s.observed_generation == 2 && s.ready {
            assert_ne!(info.pid, old);
            assert!(std::fs::read_to_string(host.sd.conf_dir.join("corral-program-slow.conf"))?.contains("v2"));
            break;
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(15), "{report:#?}");
        tokio::time::sleep(report.recheck_after.unwrap_or(Duration::from_millis(100))).await;
    }
    assert!(seen_stopping);
    // Its stop lasted stopwaitsecs (SIGTERM ignored), not less.
    assert!(t.elapsed() >= Duration::from_secs(3), "{:?}", t.elapsed());
    Ok(())
}

#[tokio::test]
async fn files_corral_did_not_write_are_never_touched_and_a_name_clash_is_a_conflict() -> anyhow::Result<()> {
    let host = Host::start().await?;
    // Hand-written under a name Corral would use, but without Corral's header.
    let hand = "[program:x]\ncommand=/bin/sleep 1000\n";
    host.sd.write_conf("corral-program-x.conf", hand)?;
    // Another tool's file defining a program Corral will be asked to run.
    host.sd
        .write_conf("legacy.conf", "[program:p1]\ncommand=/bin/sleep 1000\n")?;
    host.client.reload_config().await?;
    host.client.add_process_group("x").await?;
    host.client.add_process_group("p1").await?;
    let theirs = host.pids().await?;
    let mut r = host.reconciler()?;

    // Nothing assigned: nothing of theirs is removed or stopped.
    let mut a: BTreeMap<_, _> = [assignment("mine", 1, |_| {})].into();
    converge(&mut r, &a).await?;
    assert_eq!(
        std::fs::read_to_string(host.sd.conf_dir.join("corral-program-x.conf"))?,
        hand
    );
    assert_eq!(host.pids().await?["x"], theirs["x"]);

    // Assigned programs by those names: conflicts, reported, and theirs untouched.
    a.insert(
        "x".into(),
        assignment("x", 1, |s| s.command = "/bin/sleep 2000".into()).1,
    );
    a.insert(
        "p1".into(),
        assignment("p1", 1, |s| s.command = "/bin/sleep 2000".into()).1,
    );
    let report = converge(&mut r, &a).await?;
    for (name, says) in [("x", "without Corral's header"), ("p1", "also defined in legacy.conf")] {
        let s = &report.statuses[name];
        assert!(!s.ready, "{s:#?}");
        assert!(s.error.as_deref().unwrap_or_default().contains(says), "{s:#?}");
    }
    assert!(report.statuses["mine"].ready);
    assert_eq!(
        std::fs::read_to_string(host.sd.conf_dir.join("corral-program-x.conf"))?,
        hand
    );
    assert!(!host.sd.conf_dir.join("corral-program-p1.conf").exists());
    let now = host.pids().await?;
    assert_eq!((now["x"], now["p1"]), (theirs["x"], theirs["p1"]));
    assert_eq!(
        config_names(&host)?,
        ["corral-program-mine.conf", "corral-program-x.conf", "legacy.conf"]
    );
    Ok(())
}

/// Applies `new` over `old` and checks that exactly the processes `render::process_changes`
/// names were started, restarted, stopped and kept (pids compared).
async fn check_changes(
    host: &Host,
    r: &mut Reconciler,
    a: &mut BTreeMap<String, Assignment>,
    new: (String, Assignment),
) -> anyhow::Result<corral_proto::render::ProcessChanges> {
    let valid = |a: &Assignment| corral_proto::validate_program(a.program.clone()).map_err(|e| anyhow::anyhow!("{e}"));
    let native = new.1.native_group.as_ref().map(|g| g.name.clone());
    let old = a.get(&new.0).map(valid).transpose()?;
    let changes = corral_proto::render::process_changes(old.as_ref(), &valid(&new.1)?, native.as_deref(), "h1")
        .map_err(anyhow::Error::msg)?;
    let group = native.map(|g| format!("{g}:")).unwrap_or_default();
    let before = host.pids().await?;
    a.insert(new.0, new.1);
    converge(r, a).await?;
    let after = host.pids().await?;
    let pid = |m: &BTreeMap<String, i64>, n: &str| m.get(&format!("{group}{n}")).copied().unwrap_or(0);
    for n in &changes.keep {
        assert!(
            pid(&before, n) > 0 && pid(&before, n) == pid(&after, n),
            "{n} was to keep its pid: {changes:?}"
        );
    }
    for n in &changes.restart {
        assert!(
            pid(&before, n) > 0 && pid(&after, n) > 0 && pid(&before, n) != pid(&after, n),
            "{n} was to restart"
        );
    }
    for n in &changes.start {
        assert!(pid(&before, n) == 0 && pid(&after, n) > 0, "{n} was to start");
    }
    for n in &changes.stop {
        assert!(pid(&before, n) > 0 && pid(&after, n) == 0, "{n} was to stop");
    }
    Ok(changes)
}

#[tokio::test]
async fn scaling_numprocs_starts_and_stops_only_the_processes_that_come_and_go() -> anyhow::Result<()> {
    let host = Host::start().await?;
    let mut r = host.reconciler()?;
    let w = |generation, n, command: &str| {
        let command = command.to_string();
        assignment("w", generation, move |s| {
            s.numprocs = Some(n);
            s.process_name = Some("%(program_name)s_%(process_num)02d".into());
            s.command = command;
        })
    };
    let mut a: BTreeMap<_, _> = [w(1, 2, "/bin/sleep 1000"), assignment("other", 1, |_| {})].into();
    converge(&mut r, &a).await?;
    let other = host.pids().await?["other"];
    let s = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let c = check_changes(&host, &mut r, &mut a, w(2, 4, "/bin/sleep 1000")).await?;
    assert_eq!(
        (c.start, c.keep, c.restart),
        (s(&["w_02", "w_03"]), s(&["w_00", "w_01"]), vec![])
    );
    let c = check_changes(&host, &mut r, &mut a, w(3, 3, "/bin/sleep 1000")).await?;
    assert_eq!((c.stop, c.keep.len(), c.restart), (s(&["w_03"]), 3, vec![]));
    let c = check_changes(&host, &mut r, &mut a, w(4, 3, "/bin/sleep 1001")).await?;
    assert_eq!(c.restart, s(&["w_00", "w_01", "w_02"]));
    // Down to one process and back: the first one stays.
    let c = check_changes(&host, &mut r, &mut a, w(5, 1, "/bin/sleep 1001")).await?;
    assert_eq!((c.stop, c.keep), (s(&["w_01", "w_02"]), s(&["w_00"])));
    let c = check_changes(&host, &mut r, &mut a, w(6, 3, "/bin/sleep 1001")).await?;
    assert_eq!((c.start, c.keep), (s(&["w_01", "w_02"]), s(&["w_00"])));
    // In supervisorctl each process is a group of its own.
    assert_eq!(
        host.pids().await?.keys().collect::<Vec<_>>(),
        ["other", "w_00", "w_01", "w_02"]
    );
    assert_eq!(host.pids().await?["other"], other);
    Ok(())
}

#[tokio::test]
async fn stopping_or_starting_a_native_group_member_restarts_no_sibling() -> anyhow::Result<()> {
    let host = Host::start().await?;
    let mut r = host.reconciler()?;
    let shop = |name: &str, generation, state| {
        let (n, mut a) = assignment(name, generation, move |s| s.state = state);
        a.native_group = Some(corral_proto::fleet::NativeGroup {
            name: "shop".into(),
            priority: None,
        });
        (n, a)
    };
    let mut a: BTreeMap<_, _> = [
        shop("api", 1, DesiredState::Running),
        shop("beat", 1, DesiredState::Running),
    ]
    .into();
    converge(&mut r, &a).await?;
    let api = host.pids().await?["shop:api"];
    let c = check_changes(&host, &mut r, &mut a, shop("beat", 2, DesiredState::Stopped)).await?;
    assert_eq!(c.stop, ["beat"]);
    assert_eq!(
        host.client.get_process_info("shop:beat").await?.state,
        ProcessState::Stopped
    );
    let c = check_changes(&host, &mut r, &mut a, shop("beat", 3, DesiredState::Running)).await?;
    assert_eq!(c.start, ["beat"]);
    assert_eq!(host.pids().await?["shop:api"], api);
    Ok(())
}

#[tokio::test]
async fn an_agent_killed_between_writing_a_refused_file_and_rereading_keeps_the_accepted_one() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let host = Host::start().await?;
    let mut r = host.reconciler()?;
    let mut a: BTreeMap<_, _> = [assignment("web", 1, |s| {
        s.environment = Some([("TOKEN".to_string(), "s3cret".to_string())].into())
    })]
    .into();
    converge(&mut r, &a).await?;
    let pid = host.pids().await?["web"];
    let file = host.sd.conf_dir.join("corral-program-web.conf");
    let accepted = std::fs::read_to_string(&file)?;
    // The state file holds rendered configs (environment values): owner only.
    let state = host.state_dir.path().join("state.json");
    assert_eq!(std::fs::metadata(&state)?.permissions().mode() & 0o777, 0o600);

    // The next spec is refused here; the agent wrote it and was killed before reloadConfig.
    a.insert(
        "web".into(),
        assignment("web", 2, |s| s.user = Some("nosuchuser".into())).1,
    );
    let refused = desired(&a, "h1").programs["web"].content.clone();
    drop(r);
    std::fs::write(&file, &refused)?;
    let mut r = host.reconciler()?;
    let report = converge(&mut r, &a).await?;
    assert!(report.statuses["web"].error.is_some(), "{report:#?}");
    assert_eq!(report.statuses["web"].observed_generation, 1);
    assert_eq!(std::fs::read_to_string(&file)?, accepted);
    assert_eq!(host.pids().await?["web"], pid, "the running version was stopped");
    Ok(())
}

#[tokio::test]
async fn a_broken_file_of_someone_elses_blames_nothing_of_corrals_and_changes_apply_once_it_is_fixed()
-> anyhow::Result<()> {
    let host = Host::start().await?;
    let mut r = host.reconciler()?;
    let mut a: BTreeMap<_, _> = [assignment("web", 1, |_| {})].into();
    converge(&mut r, &a).await?;
    let pid = host.pids().await?["web"];
    // Another tool's file that supervisord refuses: no re-read works until it is fixed.
    let broken = host
        .sd
        .write_conf("broken.conf", "[program:broken]\nautostart=false\n")?;
    a.insert(
        "web".into(),
        assignment("web", 2, |s| s.command = "/bin/sleep 2000".into()).1,
    );
    a.insert("new".into(), assignment("new", 1, |_| {}).1);
    let reports = run_for(&mut r, &a, Duration::from_secs(2), Duration::from_millis(200)).await?;
    let last = reports.last().context("no pass")?;
    for name in ["web", "new"] {
        let e = last.statuses[name].error.as_deref().unwrap_or_default();
        assert!(e.contains("cannot re-read") && e.contains("broken.conf"), "{name}: {e}");
    }
    assert!(
        last.refused.is_empty(),
        "Corral's files were blamed: {:?}",
        last.refused
    );
    // What Corral wants stays on disk, the running version keeps running, and trying the
    // files out happens once, not every pass.
    let d = desired(&a, "h1");
    for p in d.programs.values() {
        assert_eq!(std::fs::read_to_string(host.sd.conf_dir.join(&p.file_name))?, p.content);
    }
    assert_eq!(host.pids().await?["web"], pid);
    assert!(
        reports[1..].iter().all(|r| r.recheck_after.is_none()),
        "{:?}",
        reports.iter().map(|r| r.recheck_after).collect::<Vec<_>>()
    );

    std::fs::remove_file(broken)?;
    let report = converge(&mut r, &a).await?;
    assert!(
        report.statuses.values().all(|s| s.ready && s.error.is_none()),
        "{report:#?}"
    );
    assert_eq!(report.statuses["web"].observed_generation, 2);
    Ok(())
}

/// `depends_on` against supervisord: the dependent starts once what it depends on is RUNNING
/// (past its startsecs), and when both stop it stops first, however long it takes.
#[tokio::test]
async fn a_program_starts_after_and_stops_before_what_it_depends_on() -> anyhow::Result<()> {
    let host = Host::start().await?;
    let mut r = host.reconciler()?;
    let marks = tempfile::tempdir()?;
    // Each writes the time it is done stopping; web takes two seconds after SIGTERM.
    let command = |name: &str, linger: &str| {
        format!(
            "/bin/sh -c 'trap \"sleep {linger}; date +%%s%%N > {}/{name}; exit 0\" TERM; while :; do sleep 0.1; done'",
            marks.path().display()
        )
    };
    let (web_cmd, db_cmd) = (command("web", "2"), command("db", "0"));
    let web = |state: DesiredState| {
        let c = web_cmd.clone();
        move |s: &mut ProgramSpec| {
            s.depends_on = Some(vec!["db".into()]);
            s.command = c;
            s.stopwaitsecs = Some(10);
            s.state = state;
        }
    };
    let db = |state: DesiredState| {
        let c = db_cmd.clone();
        move |s: &mut ProgramSpec| {
            s.command = c;
            s.startsecs = Some(2);
            s.state = state;
        }
    };
    let a: BTreeMap<_, _> = [
        assignment("web", 1, web(DesiredState::Running)),
        assignment("db", 1, db(DesiredState::Running)),
    ]
    .into();
    // While db starts, web waits: said as waiting, not as an error.
    let reports = pass_until(&mut r, &a, Duration::from_secs(5), |rep| {
        rep.statuses["web"].waiting.is_some()
    })
    .await?;
    let w = &reports.last().context("no pass")?.statuses["web"];
    assert!(w.error.is_none() && !w.ready, "{w:#?}");
    assert_eq!(
        w.waiting.as_deref(),
        Some("waiting for db to be RUNNING and healthy (depends_on)")
    );
    let report = converge(&mut r, &a).await?;
    assert!(
        report.statuses["web"].ready && report.statuses["db"].ready,
        "{report:#?}"
    );
    let (d, w) = (
        host.client.get_process_info("db").await?,
        host.client.get_process_info("web").await?,
    );
    assert!(
        w.start >= d.start + 2,
        "web started at {}, db at {} with startsecs 2",
        w.start,
        d.start
    );

    let a: BTreeMap<_, _> = [
        assignment("web", 1, web(DesiredState::Stopped)),
        assignment("db", 1, db(DesiredState::Stopped)),
    ]
    .into();
    converge(&mut r, &a).await?;
    let (d, w) = (
        host.client.get_process_info("db").await?,
        host.client.get_process_info("web").await?,
    );
    assert_eq!((d.state, w.state), (ProcessState::Stopped, ProcessState::Stopped));
    let done = |name: &str| -> anyhow::Result<u128> {
        let text = std::fs::read_to_string(marks.path().join(name)).with_context(|| format!("{name} never stopped"))?;
        Ok(text.trim().parse()?)
    };
    let (db_done, web_done) = (done("db")?, done("web")?);
    assert!(
        db_done >= web_done,
        "db was done stopping {} ms before web",
        (web_done - db_done) / 1_000_000
    );
    Ok(())
}

/// Runs passes as the agent's loop does (a recheck, or the next verdict of a health check,
/// or `resync`) until `done` holds for a report, or `within` passes. Every report is kept.
async fn pass_until(
    r: &mut Reconciler,
    a: &BTreeMap<String, Assignment>,
    within: Duration,
    done: impl Fn(&PassReport) -> bool,
) -> anyhow::Result<Vec<PassReport>> {
    let d = desired(a, "h1");
    let end = std::time::Instant::now() + within;
    let changed = r.health_changed();
    let mut reports = Vec::new();
    loop {
        let report = r.pass(&d).await?;
        let finished = done(&report);
        let wait = report
            .recheck_after
            .unwrap_or(Duration::from_millis(500))
            .min(Duration::from_millis(500));
        reports.push(report);
        if finished {
            return Ok(reports);
        }
        anyhow::ensure!(
            std::time::Instant::now() < end,
            "not reached within {within:?}: {:#?}",
            reports.last().map(|r| &r.statuses)
        );
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

fn process<'a>(r: &'a PassReport, program: &str) -> Option<&'a corral_proto::fleet::ProcessStatus> {
    r.statuses.get(program)?.processes.first()
}

#[tokio::test]
async fn health_checks_gate_readiness_and_an_unhealthy_process_is_restarted_with_backoff() -> anyhow::Result<()> {
    let host = Host::start().await?;
    let mut r = host.reconciler()?;
    let docroot = host.state_dir.path().join("www");
    std::fs::create_dir_all(&docroot)?;
    std::fs::write(docroot.join("ok"), "fine")?;
    let port = corral_tests::free_port()?;
    let closed = corral_tests::free_port()?;
    let flag = host.state_dir.path().join("flag");
    let check = |f: &dyn Fn(&mut corral_proto::resource::HealthSpec)| {
        let mut h = corral_proto::resource::HealthSpec {
            period_secs: Some(1),
            timeout_secs: Some(1),
            failure_threshold: Some(2),
            ..Default::default()
        };
        f(&mut h);
        h
    };
    let web = {
        let docroot = docroot.display().to_string();
        let health = check(&|h| {
            h.http = Some(corral_proto::resource::HttpCheck {
                port: i64::from(port),
                path: Some("/ok".into()),
                expect_status: None,
                port_per_process: None,
            })
        });
        assignment("web", 1, move |s| {
            s.command = format!("/usr/bin/python3 -m http.server {port} --bind 127.0.0.1 --directory {docroot}");
            s.startsecs = Some(0);
            s.health = Some(health);
            s.crash_loop = Some(corral_proto::CrashLoopSpec {
                initial_delay_secs: Some(3),
                ..Default::default()
            });
        })
    };
    // Nothing listens there: RUNNING, never ready, and (restart: false) left running.
    let deaf = assignment("deaf", 1, |s| {
        s.command = "/bin/sleep 1000".into();
        s.startsecs = Some(0);
        s.health = Some(check(&|h| {
            h.tcp = Some(corral_proto::resource::TcpCheck {
                port: i64::from(closed),
                port_per_process: None,
            });
            h.restart = Some(false);
        }));
    });
    // An exec check sees its process's pid; one that hangs is killed at its timeout.
    let execd = {
        let script = format!(
            "test \"$CORRAL_PID\" -gt 1 && test \"$CORRAL_PROGRAM\" = execd && test -e {}",
            flag.display()
        );
        assignment("execd", 1, move |s| {
            s.command = "/bin/sleep 1001".into();
            s.startsecs = Some(0);
            s.health = Some(check(&|h| {
                h.exec = Some(corral_proto::resource::ExecCheck {
                    command: vec!["/bin/sh".into(), "-c".into(), script.clone()],
                });
                h.restart = Some(false);
            }));
        })
    };
    let hangs = assignment("hangs", 1, |s| {
        s.command = "/bin/sleep 1002".into();
        s.startsecs = Some(0);
        s.health = Some(check(&|h| {
            h.exec = Some(corral_proto::resource::ExecCheck {
                command: vec!["/bin/sleep".into(), "7.123".into()],
            });
            h.restart = Some(false);
        }));
    });
    std::fs::write(&flag, "")?;
    let a: BTreeMap<_, _> = [web, deaf, execd, hangs].into();

    let reports = pass_until(&mut r, &a, Duration::from_secs(15), |rep| {
        rep.statuses["web"].ready
            && rep.statuses["execd"].ready
            && process(rep, "hangs").is_some_and(|p| p.health == "unhealthy")
    })
    .await?;
    // RUNNING is not ready until the check has passed.
    assert!(
        reports.iter().any(|rep| {
            process(rep, "web").is_some_and(|p| p.state == "RUNNING" && p.health == "pending")
                && !rep.statuses["web"].ready
        }),
        "web was never seen RUNNING with its check pending"
    );
    let last = reports.last().context("no pass")?;
    let deaf = &last.statuses["deaf"];
    assert!(!deaf.ready && deaf.processes[0].state == "RUNNING", "{deaf:#?}");
    assert_eq!(deaf.processes[0].health, "unhealthy");
    assert_eq!(
        deaf.processes[0].health_error,
        format!("tcp 127.0.0.1:{closed}: connection refused")
    );
    let hung = process(last, "hangs").context("hangs")?;
    assert_eq!(hung.health_error, "no answer within 1s");
    assert_eq!(process(last, "web").map(|p| p.health.as_str()), Some("healthy"));
    // The hung check was killed at its timeout, not left behind.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let leftover = std::fs::read_dir("/proc")?
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| c.windows(5).any(|w| w == b"7.123"))
        .count();
    assert!(leftover <= 1, "{leftover} hung checks still run");

    // The file goes: 404 twice, then a liveness restart at once.
    let pid = host.pids().await?["web"];
    std::fs::remove_file(docroot.join("ok"))?;
    let reports = pass_until(&mut r, &a, Duration::from_secs(15), |rep| {
        rep.corrections.contains(&Correction::HealthRestart)
    })
    .await?;
    let sick = process(reports.last().context("no pass")?, "web").context("web")?;
    assert_eq!(sick.crash_restarts, 1);
    assert!(
        sick.health_error.contains("status 404, expected 2xx or 3xx"),
        "{sick:#?}"
    );
    assert!(
        sick.summary().contains("restarted after failing its check: GET"),
        "{}",
        sick.summary()
    );
    assert!(!reports.last().context("no pass")?.statuses["web"].ready);
    // It fails again after its restart: this time its next start waits for the delay.
    let reports = pass_until(&mut r, &a, Duration::from_secs(20), |rep| {
        process(rep, "web").is_some_and(|p| p.state == "STOPPED" && p.crash_restarts == 2)
    })
    .await?;
    let waiting_since = std::time::Instant::now();
    assert_ne!(host.pids().await?["web"], pid, "restarted: a new pid");
    let _ = reports;
    std::fs::write(docroot.join("ok"), "fine")?;
    pass_until(&mut r, &a, Duration::from_secs(15), |rep| rep.statuses["web"].ready).await?;
    assert!(
        waiting_since.elapsed() >= Duration::from_millis(2000),
        "the second restart waited only {:?}",
        waiting_since.elapsed()
    );
    // Nothing else was touched: the checks that fail without restart left their processes.
    let after = host.pids().await?;
    assert!(after["deaf"] > 0 && after["hangs"] > 0);
    Ok(())
}

#[tokio::test]
async fn a_port_per_process_checks_each_process_on_its_own_port() -> anyhow::Result<()> {
    let host = Host::start().await?;
    let mut r = host.reconciler()?;
    // Two free ports in a row: process 0 would listen on the first, process 1 on the second.
    let base = loop {
        let p = corral_tests::free_port()?;
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            break p;
        }
    };
    // Only process 1 listens (on base + 1); process 0 does not listen at all.
    let a: BTreeMap<_, _> = [assignment("pool", 1, |s| {
        s.command = format!(
            "/bin/sh -c 'if [ %(process_num)d = 1 ]; then exec /usr/bin/python3 -m http.server {} --bind 127.0.0.1; else exec /bin/sleep 1000; fi'",
            base + 1
        );
        s.numprocs = Some(2);
        s.process_name = Some("%(program_name)s_%(process_num)d".into());
        s.startsecs = Some(0);
        s.health = Some(corral_proto::resource::HealthSpec {
            tcp: Some(corral_proto::resource::TcpCheck {
                port: i64::from(base),
                port_per_process: Some(true),
            }),
            period_secs: Some(1),
            timeout_secs: Some(1),
            failure_threshold: Some(1),
            restart: Some(false),
            ..Default::default()
        });
    })]
    .into();
    // (Process 1 fails its first checks while python starts: it turns healthy once it listens.)
    let reports = pass_until(&mut r, &a, Duration::from_secs(15), |rep| {
        let ps = &rep.statuses["pool"].processes;
        ps.len() == 2 && ps[0].health == "unhealthy" && ps[1].health == "healthy"
    })
    .await?;
    let last = reports.last().context("no pass")?;
    let health: BTreeMap<&str, (&str, &str)> = last.statuses["pool"]
        .processes
        .iter()
        .map(|p| (p.name.as_str(), (p.health.as_str(), p.health_error.as_str())))
        .collect();
    let refused = format!("tcp 127.0.0.1:{base}: connection refused");
    assert_eq!(
        health,
        [("pool_0", ("unhealthy", refused.as_str())), ("pool_1", ("healthy", "")),].into(),
        "each process is checked on base + process_num"
    );
    assert!(!last.statuses["pool"].ready);
    Ok(())
}

#[tokio::test]
async fn a_stop_asked_for_before_the_process_has_exec_d_is_not_lost() -> anyhow::Result<()> {
    // supervisord's child closes descriptors 3..minfds in Python between its fork and its
    // exec; a SIGTERM that arrives then reaches supervisord's handlers, not the program, and
    // the stop would last stopwaitsecs (30 s here). The largest minfds this process may have
    // widens that window to milliseconds.
    let hard = std::process::Command::new("sh").args(["-c", "ulimit -Hn"]).output()?;
    let hard = String::from_utf8_lossy(&hard.stdout)
        .trim()
        .parse::<u64>()
        .unwrap_or(65_536);
    let sd = Supervisord::start(Options {
        minfds: Some(hard.min(65_536)),
        ..Default::default()
    })
    .await?;
    let client = sd.client().await?;
    let state_dir = tempfile::tempdir()?;
    let mut r = Reconciler::new(
        "h1",
        client.clone(),
        ConfDir::new(&sd.conf_dir),
        state_dir.path().into(),
    )?;
    let a: BTreeMap<_, _> = [assignment("idle", 1, |s| {
        s.command = "/bin/sleep 1000".into();
        s.state = DesiredState::Stopped;
        s.startsecs = Some(0);
        s.stopwaitsecs = Some(30);
    })]
    .into();
    let stopped = |rep: &PassReport| {
        rep.processes
            .iter()
            .any(|p| p.name == "idle" && matches!(p.state, ProcessState::Stopped))
    };
    pass_until(&mut r, &a, Duration::from_secs(10), stopped).await?;
    // Started by hand, behind Corral's back; the agent stops it at once, whether or not it
    // has exec'd yet. Several times, until the window has been hit a few times.
    let (mut tries, mut held) = (0, 0);
    while tries < 30 && held < 3 {
        tries += 1;
        client.start_process("idle", false).await?;
        let reports = pass_until(&mut r, &a, Duration::from_secs(10), stopped)
            .await
            .with_context(|| format!("try {tries}: the stop was lost"))?;
        if reports.iter().any(|rep| rep.deferred.contains("idle")) {
            held += 1;
        }
    }
    anyhow::ensure!(
        held > 0,
        "no stop was ever asked for before the process exec'd in {tries} tries (minfds {hard}): this test showed nothing"
    );
    Ok(())
}

#[tokio::test]
async fn stopping_and_starting_keeps_the_program_loaded_and_its_log() -> anyhow::Result<()> {
    // A change of desired state rewrites autostart in the file; supervisord would replace the
    // group for it, giving the processes new automatic log files and leaving the old ones
    // (with the output of the run just stopped) behind. The agent stops and starts instead.
    let host = Host::start().await?;
    let mut r = host.reconciler()?;
    let web = |generation, state| {
        assignment("web", generation, move |s| {
            s.command = "/bin/sh -c 'echo run-started; exec sleep 1000'".into();
            s.startsecs = Some(0);
            s.state = state;
        })
    };
    let log_files = || -> anyhow::Result<usize> { Ok(std::fs::read_dir(host.sd.dir.join("logs"))?.count()) };
    converge(&mut r, &[web(1, DesiredState::Running)].into()).await?;
    let before = host.client.get_process_info("web").await?;
    let files = log_files()?;

    let stopped = converge(&mut r, &[web(2, DesiredState::Stopped)].into()).await?;
    let info = host.client.get_process_info("web").await?;
    assert!(matches!(info.state, ProcessState::Stopped), "{info:?}");
    assert_eq!(info.stdout_logfile, before.stdout_logfile, "the same log file");
    assert_eq!(stopped.statuses["web"].observed_generation, 2);
    assert!(std::fs::read_to_string(&info.stdout_logfile)?.contains("run-started"));

    let started = converge(&mut r, &[web(3, DesiredState::Running)].into()).await?;
    let info = host.client.get_process_info("web").await?;
    assert!(
        matches!(info.state, ProcessState::Running) && info.pid != before.pid,
        "{info:?}"
    );
    assert_eq!(info.stdout_logfile, before.stdout_logfile, "the same log file");
    assert_eq!(started.statuses["web"].observed_generation, 3);
    // (supervisord writes a child's output as its loop reads it: wait a moment for it.)
    let runs = || std::fs::read_to_string(&info.stdout_logfile).map(|t| t.matches("run-started").count());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while runs()? < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(runs()?, 2, "both runs in one log");
    assert_eq!(log_files()?, files, "no log file left behind");

    // The file on disk says stopped: a supervisord restarted from it would not start it.
    converge(&mut r, &[web(4, DesiredState::Stopped)].into()).await?;
    let conf = std::fs::read_to_string(host.sd.conf_dir.join(corral_proto::render::program_file_name("web")))?;
    assert!(conf.contains("autostart=false"), "{conf}");

    // Any other change still replaces the group.
    let changed = assignment("web", 5, |s| {
        s.command = "/bin/sh -c 'echo v2; exec sleep 1001'".into();
        s.startsecs = Some(0);
    });
    converge(&mut r, &[changed].into()).await?;
    let info = host.client.get_process_info("web").await?;
    assert!(matches!(info.state, ProcessState::Running), "{info:?}");
    let conf = std::fs::read_to_string(host.sd.conf_dir.join(corral_proto::render::program_file_name("web")))?;
    assert!(conf.contains("sleep 1001"), "{conf}");
    Ok(())
}

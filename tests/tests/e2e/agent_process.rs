//! The agent as a whole (its loop, its host record, its cache): how many passes a refused
//! program costs, readiness when supervisord will not talk to it, a `kill -9` between
//! acting and caching, and the programs a supervisord killed with -9 leaves running.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use corral_agent::supervisor::{ClientConfig, Endpoint, ProcessState};
use corral_proto::resource::DesiredState;
use corral_tests::corral::{Agent, Controller, agent_config, binary, counter_sum, scrape, wait_for};
use corral_tests::etcd::Etcd;
use corral_tests::process::ChildGuard;
use corral_tests::specs::program;
use corral_tests::supervisord::{Options, Supervisord};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_program_costs_no_more_passes_than_the_resync_asks_for() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let controller = Controller::start(&etcd.endpoints(), "c1").await?;
    let api = controller.api()?;
    let sd = Supervisord::start(Options::default()).await?;
    let state = tempfile::tempdir()?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", corral_tests::free_port()?).parse()?;
    let _agent = Agent::start_listening("h1", &[], &etcd.endpoints(), &sd, state.path(), Some(addr));
    api.apply(&program("good", |_| {}), false).await?;
    api.apply(&program("bad", |s| s.user = Some("nosuchuser".into())), false)
        .await?;
    wait_for(&api, WAIT, |s| {
        s.programs
            .iter()
            .any(|p| p.name == "bad" && p.problems.iter().any(|e| e.contains("nosuchuser")))
            && s.programs.iter().any(|p| p.name == "good" && p.ready == 1)
    })
    .await?;
    let url = format!("http://{addr}/metrics");
    let first = scrape(&url).await?;
    assert!(first.contains("corral_program_refused{program=\"bad\"} 1"), "{first}");
    let before = counter_sum(&first, "corral_reconcile_total");
    let window = Duration::from_secs(5);
    tokio::time::sleep(window).await;
    let passes = counter_sum(&scrape(&url).await?, "corral_reconcile_total") - before;
    // The test agent resyncs every 500 ms: 10 passes in 5 s, and a few for slack. Fighting the
    // refusal cost ~130 passes a second.
    assert!(passes <= 14.0, "{passes} passes in {window:?}");
    let file = sd.conf_dir.join("corral-program-bad.conf");
    assert!(!file.exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_whose_supervisord_refuses_the_agent_is_not_ready_with_the_reason() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let controller = Controller::start(&etcd.endpoints(), "c1").await?;
    let api = controller.api()?;
    let sd = Supervisord::start(Options {
        credentials: Some(("corral".into(), "right".into())),
        ..Default::default()
    })
    .await?;
    let state = tempfile::tempdir()?;
    let run = |password: &str| {
        let mut supervisor = ClientConfig::new(Endpoint::Unix(sd.socket.clone()));
        supervisor.credentials = Some(("corral".into(), password.into()));
        let cfg = agent_config(
            "h1",
            &corral_etcd::EtcdOptions::plain(&etcd.endpoints()),
            supervisor,
            &sd.conf_dir,
            state.path(),
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(corral_agent::run::run(cfg, stop.clone()));
        (stop, task)
    };
    let (stop, task) = run("wrong");
    // (Until its first pass the host may be unready only because its lease is not there yet.)
    let status = wait_for(&api, WAIT, |s| {
        s.not_ready_reasons
            .get("h1")
            .is_some_and(|why| why.contains("401") || why.contains("credentials"))
    })
    .await?;
    let why = &status.not_ready_reasons["h1"];
    assert!(why.contains("401") || why.contains("credentials"), "{why}");
    let hosts = api.hosts().await?;
    let h = hosts[0].status.clone().context("host status")?;
    assert!(!h.ready);
    assert_eq!(h.reason.as_deref(), Some(why.as_str()));
    // `corral get hosts` / `describe host` show it.
    let out = Command::new(binary("corral")?)
        .args([
            "--server",
            &controller.url,
            "--token",
            corral_tests::corral::TOKEN,
            "describe",
            "host",
            "h1",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("NotReady") && text.contains("credentials"), "{text}");

    stop.cancel();
    let _ = task.await;
    let (stop, task) = run("right");
    wait_for(&api, WAIT, |s| s.hosts == 1 && s.not_ready_hosts.is_empty()).await?;
    stop.cancel();
    let _ = task.await;
    Ok(())
}

fn agent_process(etcd: &[String], sd: &Supervisord, state: &std::path::Path) -> anyhow::Result<ChildGuard> {
    let mut cmd = Command::new(binary("corral-agent")?);
    cmd.args(["--etcd-endpoints", &etcd.join(","), "--host", "h1", "--lease-ttl", "3"])
        .arg("--supervisor-url")
        .arg(sd.unix_url())
        .arg("--conf-dir")
        .arg(&sd.conf_dir)
        .arg("--state-dir")
        .arg(state)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    ChildGuard::spawn("corral-agent", cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_killed_right_after_a_stop_keeps_it_stopped_when_it_restarts_without_etcd() -> anyhow::Result<()> {
    let mut etcd = Etcd::start().await?;
    let controller = Controller::start(&etcd.endpoints(), "c1").await?;
    let api = controller.api()?;
    let sd = Supervisord::start(Options::default()).await?;
    let state = tempfile::tempdir()?;
    let mut agent = agent_process(&etcd.endpoints(), &sd, state.path())?;
    api.apply(&program("web", |_| {}), false).await?;
    wait_for(&api, WAIT, |s| s.programs.iter().any(|p| p.ready == 1)).await?;
    let client = sd.client().await?;

    // `corral stop web`, and kill -9 of the agent the moment supervisord is told.
    api.update_program("web", |p| p.spec.state = DesiredState::Stopped)
        .await?;
    let deadline = Instant::now() + WAIT;
    loop {
        // Gone for a moment (the group replaced) means stopped too.
        let stopped = match client.get_process_info("web").await {
            Ok(info) => !info.state.is_running(),
            Err(e) if e.fault() == Some(corral_agent::supervisor::FaultCode::BadName) => true,
            Err(e) => return Err(e.into()),
        };
        if stopped {
            agent.kill();
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "web never stopped");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // etcd is gone too: the restarted agent has only its cache.
    etcd.kill();
    let _agent = agent_process(&etcd.endpoints(), &sd, state.path())?;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        // The restarted agent replaces the group (its file now says autostart=false): for a
        // moment supervisord does not know it.
        match client.get_process_info("web").await {
            Ok(info) => assert!(
                matches!(info.state, ProcessState::Stopped | ProcessState::Stopping),
                "the restarted agent started web again: {info:?}"
            ),
            Err(e) if e.fault() == Some(corral_agent::supervisor::FaultCode::BadName) => {}
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(client.get_process_info("web").await?.state, ProcessState::Stopped);
    Ok(())
}

/// supervisord killed with -9 leaves its programs running, and the new supervisord starts
/// its own copies beside them. The agent stops the orphans as supervisord would have
/// (SIGTERM, then SIGKILL after stopwaitsecs), also when the agent itself was restarted in
/// between, and touches no other process.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processes_a_killed_supervisord_left_running_are_stopped() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let controller = Controller::start(&etcd.endpoints(), "c1").await?;
    let api = controller.api()?;
    let mut sd = Supervisord::start(Options::default()).await?;
    let state = tempfile::tempdir()?;
    let agent = corral_tests::corral::Agent::start("h1", &[], &etcd.endpoints(), &sd, state.path());
    // One that dies on SIGTERM, one that ignores it (SIGKILL after stopwaitsecs).
    api.apply(&program("web", |s| s.command = "/bin/sleep 4242".into()), false)
        .await?;
    api.apply(
        &program("stubborn", |s| {
            s.command = "/bin/sh -c \"trap '' TERM; while true; do sleep 1; done\"".into();
            s.stopwaitsecs = Some(2);
        }),
        false,
    )
    .await?;
    wait_for(&api, WAIT, |s| {
        corral_tests::corral::converged(s) && s.programs.len() == 2 && s.programs.iter().all(|p| p.ready == 1)
    })
    .await?;
    let client = sd.client().await?;
    let old_web = client.get_process_info("web").await?.pid;
    let old_stubborn = client.get_process_info("stubborn").await?.pid;
    // A process that is no program's: never touched.
    let mut bystander = Command::new("/bin/sleep").arg("4243").spawn()?;
    // The agent restarts too (its memory of PIDs is in its state file).
    agent.stop().await;
    let _agent = corral_tests::corral::Agent::start("h1", &[], &etcd.endpoints(), &sd, state.path());
    tokio::time::sleep(Duration::from_secs(1)).await;

    sd.kill9_and_restart().await?;
    let alive = |pid: i64| std::path::Path::new(&format!("/proc/{pid}")).exists();
    let deadline = Instant::now() + WAIT;
    while alive(old_web) || alive(old_stubborn) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "orphans still running: web {} stubborn {}",
            alive(old_web),
            alive(old_stubborn)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The new supervisord's copies run; the bystander too.
    wait_for(&api, WAIT, |s| {
        corral_tests::corral::converged(s) && s.programs.iter().all(|p| p.ready == 1)
    })
    .await?;
    let client = sd.client().await?;
    assert_eq!(client.get_process_info("web").await?.statename, "RUNNING");
    assert!(
        bystander.try_wait()?.is_none(),
        "a process that is no program's was signalled"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
    Ok(())
}

//! The XML-RPC driver against a real supervisord 4.2: every method, faults, auth, transports.

use std::time::Duration;

use corral_agent::supervisor::{Client, ClientConfig, Endpoint, Error, FaultCode, ProcessState};
use corral_tests::supervisord::{Options, Supervisord};

const TRAPPER: &str = "[program:trapper]\ncommand=/bin/sh -c 'trap \"echo got-usr1; echo oops >&2\" USR1; echo hello; while :; do sleep 0.1; done'\nautostart=false\nstartsecs=1\nstopwaitsecs=2\n";
const WORKERS: &str = "[program:w]\ncommand=/bin/sleep 1000\nnumprocs=2\nprocess_name=%(program_name)s_%(process_num)02d\nautostart=false\nstartsecs=0\n";

async fn add(c: &Client, sd: &Supervisord, file: &str, text: &str) -> anyhow::Result<()> {
    sd.write_conf(file, text)?;
    let r = c.reload_config().await?;
    for g in r.added {
        assert!(c.add_process_group(&g).await?);
    }
    Ok(())
}

#[track_caller]
fn assert_fault<T: std::fmt::Debug>(r: Result<T, Error>, code: FaultCode) {
    match r {
        Err(Error::Fault { code: got, .. }) if got == code => {}
        other => panic!("expected fault {code}, got {other:?}"),
    }
}

#[tokio::test]
async fn process_lifecycle_logs_and_signals_over_the_unix_socket() -> anyhow::Result<()> {
    let sd = Supervisord::start(Options::default()).await?;
    let c = sd.client().await?;
    let state = c.get_state().await?;
    assert_eq!((state.code, state.name.as_str()), (1, "RUNNING"));
    assert!(c.get_supervisor_version().await?.starts_with("4.2"));

    sd.write_conf("trapper.conf", TRAPPER)?;
    let reload = c.reload_config().await?;
    assert_eq!(reload.added, ["trapper"]);
    assert!(reload.changed.is_empty() && reload.removed.is_empty());
    assert!(c.add_process_group("trapper").await?);
    assert_fault(c.add_process_group("trapper").await, FaultCode::AlreadyAdded);
    assert_eq!(c.get_process_info("trapper").await?.state, ProcessState::Stopped);

    assert!(c.start_process("trapper", true).await?);
    let info = c.get_process_info("trapper").await?;
    assert_eq!(
        (info.state, info.statename.as_str()),
        (ProcessState::Running, "RUNNING")
    );
    assert!(info.pid > 0 && info.start > 0);
    assert_eq!(info.namespec(), "trapper");
    assert_fault(c.start_process("trapper", true).await, FaultCode::AlreadyStarted);
    let all = c.get_all_process_info().await?;
    assert_eq!(all.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["trapper"]);

    assert!(c.signal_process("trapper", "USR1").await?);
    assert_fault(c.signal_process("trapper", "NOPE").await, FaultCode::BadSignal);
    let mut out = String::new();
    for _ in 0..100 {
        out = c.read_process_stdout_log("trapper", 0, 10_000).await?;
        if out.contains("got-usr1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(out.starts_with("hello\n") && out.contains("got-usr1"), "{out:?}");
    let tail = c.tail_process_stdout_log("trapper", 0, 6).await?;
    assert_eq!(tail.text, "-usr1\n");
    assert!(tail.overflow);
    assert_eq!(tail.offset as usize, out.len());
    let err = c.read_process_stderr_log("trapper", 0, 1000).await?;
    assert_eq!(err, "oops\n");
    let etail = c.tail_process_stderr_log("trapper", 0, 100).await?;
    assert_eq!((etail.text.as_str(), etail.overflow), ("oops\n", false));

    assert_fault(c.remove_process_group("trapper").await, FaultCode::StillRunning);
    assert!(c.stop_process("trapper", true).await?);
    assert_eq!(c.get_process_info("trapper").await?.state, ProcessState::Stopped);
    assert_fault(c.stop_process("trapper", true).await, FaultCode::NotRunning);
    assert!(c.remove_process_group("trapper").await?);
    assert_fault(c.get_process_info("trapper").await, FaultCode::BadName);
    Ok(())
}

#[tokio::test]
async fn group_calls_and_multicall_address_every_process() -> anyhow::Result<()> {
    let sd = Supervisord::start(Options::default()).await?;
    let c = sd.client().await?;
    add(&c, &sd, "w.conf", WORKERS).await?;
    let started = c.start_process_group("w", true).await?;
    let mut names: Vec<_> = started
        .iter()
        .map(|r| (r.group.as_str(), r.name.as_str(), r.status))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [("w", "w_00", FaultCode::Success), ("w", "w_01", FaultCode::Success)]
    );
    // A numprocs program is addressed group:process, never by the program name alone.
    assert_fault(c.get_process_info("w").await, FaultCode::BadName);
    assert_eq!(c.get_process_info("w:w_01").await?.state, ProcessState::Running);

    let signalled = c.signal_process_group("w", "CONT").await?;
    assert!(signalled.iter().all(|r| r.status == FaultCode::Success) && signalled.len() == 2);

    let answers = c
        .multicall(&[
            ("supervisor.getState", vec![]),
            ("supervisor.getProcessInfo", vec![dxr::Value::String("nope".into())]),
            ("supervisor.getProcessInfo", vec![dxr::Value::String("w:w_00".into())]),
        ])
        .await?;
    assert_eq!(answers.len(), 3);
    assert!(answers[0].is_ok());
    assert_eq!(
        answers[1].as_ref().err().and_then(Error::fault),
        Some(FaultCode::BadName)
    );
    assert!(matches!(&answers[2], Ok(dxr::Value::Struct(s)) if s.contains_key("pid")));

    let stopped = c.stop_process_group("w", true).await?;
    assert_eq!(stopped.len(), 2);
    assert!(
        c.get_all_process_info()
            .await?
            .iter()
            .all(|p| p.state == ProcessState::Stopped)
    );
    Ok(())
}

#[tokio::test]
async fn reload_reports_changes_and_refuses_a_broken_file() -> anyhow::Result<()> {
    let sd = Supervisord::start(Options::default()).await?;
    let c = sd.client().await?;
    add(&c, &sd, "w.conf", WORKERS).await?;
    sd.write_conf("w.conf", &WORKERS.replace("numprocs=2", "numprocs=3"))?;
    assert_eq!(c.reload_config().await?.changed, ["w"]);
    sd.write_conf("broken.conf", "[program:b]\nnumprocs=x\n")?;
    assert_fault(c.reload_config().await, FaultCode::CantReread);
    std::fs::remove_file(sd.conf_dir.join("w.conf"))?;
    std::fs::remove_file(sd.conf_dir.join("broken.conf"))?;
    assert_eq!(c.reload_config().await?.removed, ["w"]);
    Ok(())
}

#[tokio::test]
async fn tcp_with_basic_auth_and_a_401_is_an_auth_error() -> anyhow::Result<()> {
    let creds = Some(("corral".to_string(), "s3cr%t".to_string()));
    let sd = Supervisord::start(Options {
        tcp: true,
        credentials: creds,
        ..Default::default()
    })
    .await?;
    let url = sd.tcp_url.clone().expect("tcp");
    assert_eq!(sd.client_at(&url).await?.get_state().await?.name, "RUNNING");
    assert_eq!(sd.client().await?.get_state().await?.name, "RUNNING");

    for creds in [None, Some(("corral".to_string(), "wrong".to_string()))] {
        let mut cfg = ClientConfig::new(Endpoint::parse(&url)?);
        cfg.credentials = creds;
        let r = Client::new(cfg)?.get_state().await;
        assert!(matches!(r, Err(Error::Unauthorized { .. })), "{r:?}");
    }
    Ok(())
}

#[tokio::test]
async fn an_absent_supervisord_is_a_transport_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cfg = ClientConfig::new(Endpoint::Unix(dir.path().join("none.sock")));
    cfg.timeout = Duration::from_secs(2);
    let r = Client::new(cfg)?.get_state().await;
    assert!(matches!(r, Err(Error::Transport { .. })), "{r:?}");
    let port = corral_tests::free_port()?;
    let r = Client::new(ClientConfig::new(Endpoint::parse(&format!("http://127.0.0.1:{port}"))?))?
        .get_state()
        .await;
    assert!(matches!(r, Err(Error::Transport { .. })), "{r:?}");
    Ok(())
}

/// `getAllProcessInfo` goes through the streaming decoder, `getProcessInfo` through dxr: on
/// supervisord's own answers, with markup and non-ASCII in the strings, they must agree.
#[tokio::test]
async fn all_process_info_reads_what_each_process_info_reads() -> anyhow::Result<()> {
    let sd = Supervisord::start(Options::default()).await?;
    let c = sd.client().await?;
    add(&c, &sd, "w.conf", WORKERS).await?;
    add(
        &c,
        &sd,
        "odd.conf",
        "[program:odd]\ncommand=/nonexistent/a&b<c>\"d\"/caf\u{e9}\nstartretries=0\n",
    )
    .await?;
    add(
        &c,
        &sd,
        "up.conf",
        "[program:up]\ncommand=/bin/sleep 1000\nstartsecs=0\n",
    )
    .await?;
    assert!(c.start_process("w:w_01", true).await?);
    let mut all = Vec::new();
    for _ in 0..100 {
        all = c.get_all_process_info().await?;
        let settled = |name: &str, state| all.iter().any(|p| p.name == name && p.state == state);
        if settled("odd", ProcessState::Fatal) && settled("up", ProcessState::Running) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let names: Vec<_> = all.iter().map(|p| (p.namespec(), p.state)).collect();
    assert_eq!(
        names,
        [
            ("odd".to_string(), ProcessState::Fatal),
            ("up".to_string(), ProcessState::Running),
            ("w:w_00".to_string(), ProcessState::Stopped),
            ("w:w_01".to_string(), ProcessState::Running),
        ]
    );
    let odd = &all[0];
    // supervisord splits the command like a shell, so the quotes are gone.
    assert_eq!(odd.spawnerr, "can't find command '/nonexistent/a&b<c>d/caf\u{e9}'");
    for from_all in &all {
        let mut one = c.get_process_info(&from_all.namespec()).await?;
        // Only the clock may move between the two calls.
        one.now = from_all.now;
        if one.state == ProcessState::Running {
            one.description.clone_from(&from_all.description);
        }
        assert_eq!(&one, from_all);
    }
    Ok(())
}

//! The controller against a real etcd when objects are many, large or broken: paged reads,
//! unreadable keys and refused writes skipped and reported, writes fenced on leadership.

use std::time::Duration;

use corral_controller::placement::AssignmentWrites;
use corral_controller::store::{Fence, Store, StoreError};
use corral_proto::keys::Keys;
use corral_tests::corral::{Agent, Controller, converged, wait_for};
use corral_tests::etcd::Etcd;
use corral_tests::specs::{self, program};
use corral_tests::supervisord::{Options, Supervisord};
use etcd_client::GetOptions;

const WAIT: Duration = Duration::from_secs(30);

async fn store(etcd: &Etcd) -> anyhow::Result<Store> {
    let e = corral_etcd::Etcd::connect(&corral_etcd::EtcdOptions::plain(&etcd.endpoints())).await?;
    Ok(Store::new(e, Keys::default()))
}

#[tokio::test]
async fn reads_larger_than_a_grpc_message_are_paged() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let store = store(&etcd).await?;
    // 300 assignments of ~20 kB: 6 MB, past gRPC's 4 MiB answer if read at once.
    let big = "x".repeat(20_000);
    let put: Vec<_> = (0..300)
        .map(|i| {
            let a = specs::assignment(&format!("p{i:03}"), 1, |s| {
                s.environment = Some([("PAD".to_string(), big.clone())].into())
            });
            (("h1".to_string(), format!("p{i:03}")), std::sync::Arc::new(a))
        })
        .collect();
    let failures = store
        .write_assignments(
            &AssignmentWrites {
                put,
                ..Default::default()
            },
            None,
        )
        .await?;
    assert!(failures.0.is_empty(), "{failures:?}");
    let mut c = etcd.client().await?;
    let all = c
        .get(Keys::default().all_assignments(), Some(GetOptions::new().with_prefix()))
        .await;
    assert!(
        all.is_err(),
        "one unpaged read was expected to exceed the message limit"
    );
    let read = store.assignments().await?;
    assert_eq!(read.len(), 300);
    assert!(read.keys().all(|(h, _)| h == "h1"));

    // The agent of h1 lists its assignments in pages too: its session starts and hands on
    // all 300.
    let (desired, mut seen) = tokio::sync::watch::channel(std::sync::Arc::default());
    let (_statuses_tx, statuses) = tokio::sync::watch::channel(std::sync::Arc::default());
    let (_health_tx, health) = tokio::sync::watch::channel(None);
    let (connected, _) = tokio::sync::watch::channel(false);
    let mut channels = corral_agent::etcd::Channels {
        desired,
        statuses,
        health,
        connected,
        client: tokio::sync::watch::channel(None).0,
    };
    let cfg = corral_agent::etcd::EtcdConfig {
        etcd: corral_etcd::EtcdOptions::plain(&etcd.endpoints()),
        keys: Keys::default(),
        host: "h1".into(),
        labels: Default::default(),
        lease_ttl: 10,
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let session = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut member = 0;
            corral_agent::etcd::session(&cfg, &mut member, None, &mut channels, &stop).await
        })
    };
    tokio::time::timeout(WAIT, seen.wait_for(|a| a.assignments.len() == 300)).await??;
    stop.cancel();
    session.await??;
    Ok(())
}

#[tokio::test]
async fn a_write_from_a_controller_that_no_longer_leads_is_refused() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let store = store(&etcd).await?;
    let mut c = etcd.client().await?;
    let election = Keys::default().election();
    let old_lease = c.lease_grant(10, None).await?.id();
    let old = c.campaign(election.clone(), "old", old_lease).await?;
    let old = old.leader().cloned().ok_or_else(|| anyhow::anyhow!("no leader key"))?;
    let fence = Fence {
        key: old.key().to_vec(),
        create_revision: old.rev(),
    };
    let write = |name: &str| AssignmentWrites {
        put: vec![(
            ("h1".to_string(), name.to_string()),
            std::sync::Arc::new(specs::assignment(name, 1, |_| {})),
        )],
        ..Default::default()
    };
    store.write_assignments(&write("while-leading"), Some(&fence)).await?;
    // The old leader pauses past its lease; another controller is elected.
    c.lease_revoke(old_lease).await?;
    let new_lease = c.lease_grant(10, None).await?.id();
    c.campaign(election, "new", new_lease).await?;
    let stale = store.write_assignments(&write("after-losing"), Some(&fence)).await;
    assert!(matches!(stale, Err(StoreError::Conflict(_))), "{stale:?}");
    let keys: Vec<_> = store.assignments().await?.into_keys().map(|(_, p)| p).collect();
    assert_eq!(keys, ["while-leading"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreadable_key_or_a_refused_assignment_stops_nothing_else() -> anyhow::Result<()> {
    let mut etcd = Etcd::start().await?;
    let keys = Keys::default();
    let mut c = etcd.client().await?;
    // A program stored by something other than the API (an old version, a hand edit), larger
    // than etcd will accept once its request limit is lowered below.
    let mut huge = specs::program_object("huge", |s| s.command = format!("/bin/echo {}", "y".repeat(100_000)));
    huge.metadata.generation = 1;
    c.put(keys.program("huge"), serde_json::to_vec(&huge)?, None).await?;
    c.put(keys.program("garbage"), "{not json", None).await?;
    etcd.restart_with(&["--max-request-bytes", "65536"]).await?;

    let controller = Controller::start(&etcd.endpoints(), "c1").await?;
    let api = controller.api()?;
    let sd = Supervisord::start(Options::default()).await?;
    let state = tempfile::tempdir()?;
    let _agent = Agent::start("h1", &[], &etcd.endpoints(), &sd, state.path());
    // Both are reported; every other program is listed, placed and run.
    api.apply(&program("web", |_| {}), false).await?;
    let status = wait_for(&api, WAIT, |s| {
        s.control_plane.iter().any(|p| p.contains("/corral/programs/garbage"))
            && s.control_plane.iter().any(|p| p.contains("h1/huge"))
            && s.programs.iter().any(|p| p.name == "web" && p.ready == 1)
    })
    .await?;
    assert!(
        !converged(&status),
        "problems must keep the fleet from looking converged"
    );
    let names: Vec<String> = api.programs().await?.into_iter().map(|p| p.metadata.name).collect();
    assert_eq!(names, ["huge", "web"]);
    assert!(sd.client().await?.get_process_info("web").await.is_ok());
    // Size is checked at apply, with the limit in the message.
    let err = api
        .apply(
            &program("big", |s| s.command = format!("/bin/echo {}", "z".repeat(40_000))),
            false,
        )
        .await
        .expect_err("a 40 kB spec is refused");
    assert_eq!(err.status(), Some(422));
    assert!(err.to_string().contains("32768-byte limit"), "{err}");
    Ok(())
}

/// Degraded modes, as an operator meets them: a replica started while etcd is away waits for
/// it; `corral status` during an outage says so in one line and exits 3; a token file others
/// may read is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_waits_for_etcd_and_an_outage_is_said_in_one_line() -> anyhow::Result<()> {
    use corral_tests::corral::binary;
    use corral_tests::process::ChildGuard;
    use std::os::unix::fs::PermissionsExt as _;
    let mut etcd = Etcd::start().await?;
    etcd.kill();
    let dir = tempfile::tempdir()?;
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "t0ken\n")?;
    let port = corral_tests::free_port()?;
    let controller = |tokens: &std::path::Path| -> anyhow::Result<std::process::Command> {
        let mut c = std::process::Command::new(binary("corral-controller")?);
        c.args([
            "--etcd-endpoints",
            &etcd.endpoint,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--token-file",
        ])
        .arg(tokens);
        Ok(c)
    };
    // Others may read the token file: refused, saying why.
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644))?;
    let out = controller(&tokens)?.output()?;
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("open to others (mode 0644)"), "{said}");
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600))?;

    let status = || -> anyhow::Result<(i32, String, String)> {
        let o = std::process::Command::new(binary("corral")?)
            .args(["--server", &format!("127.0.0.1:{port}"), "--token", "t0ken", "status"])
            .output()?;
        Ok((
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ))
    };
    let until_status = |want: i32| async move {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let s = status()?;
            if s.0 == want {
                return anyhow::Ok(s);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "status never exited {want}: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    // Started with etcd away: it waits (alive, not serving) and comes up with etcd.
    let mut replica = ChildGuard::spawn("controller", controller(&tokens)?)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    replica.check_alive()?;
    assert_eq!(status()?.0, 3, "nothing serves yet");
    etcd.restart().await?;
    until_status(0).await?;

    // etcd gone under a running replica: one line, exit 3, and it recovers with etcd.
    etcd.kill();
    let (_, stdout, stderr) = until_status(3).await?;
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("etcd is unreachable") && stderr.contains("keeps retrying"),
        "{stderr}"
    );
    replica.check_alive()?;
    etcd.restart().await?;
    until_status(0).await?;
    Ok(())
}

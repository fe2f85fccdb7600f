//! What the agent and the controller export on /metrics, scraped over HTTP.

use std::time::{Duration, Instant};

use corral_tests::corral::{Agent, Controller, scrape, wait_for};
use corral_tests::etcd::Etcd;
use corral_tests::specs::program;
use corral_tests::supervisord::{Options, Supervisord};

/// The value of the first sample whose line starts with `series`.
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_and_controller_export_desired_vs_observed() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let controller = Controller::start(&etcd.endpoints(), "c1").await?;
    let sd = Supervisord::start(Options::default()).await?;
    let state = tempfile::tempdir()?;
    let port = corral_tests::free_port()?;
    let listen = format!("127.0.0.1:{port}").parse()?;
    let _agent = Agent::start_listening("h1", &[], &etcd.endpoints(), &sd, state.path(), Some(listen));
    let api = controller.api()?;
    api.apply(
        &program("good", |s| {
            s.environment = Some([("API_KEY".into(), "hunter2-secret".into())].into())
        }),
        false,
    )
    .await?;
    api.apply(
        &program("crashy", |s| {
            s.command = "/bin/sh -c 'sleep 0.4; exit 3'".into();
            s.autorestart = Some(corral_proto::AutoRestart::Always);
            s.startretries = Some(100);
        }),
        false,
    )
    .await?;
    // Health checks: one that passes, one that fails (and only holds back readiness).
    for (name, exe) in [("checked", "/bin/true"), ("sick", "/bin/false")] {
        api.apply(
            &program(name, |s| {
                s.health = Some(corral_proto::resource::HealthSpec {
                    exec: Some(corral_proto::resource::ExecCheck {
                        command: vec![exe.into()],
                    }),
                    period_secs: Some(1),
                    failure_threshold: Some(1),
                    restart: Some(false),
                    ..Default::default()
                });
            }),
            false,
        )
        .await?;
    }
    wait_for(&api, Duration::from_secs(30), |s| {
        s.programs.len() == 4 && s.programs.iter().all(|p| p.updated == 1)
    })
    .await?;

    let agent_url = format!("http://127.0.0.1:{port}/metrics");
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let body = scrape(&agent_url).await?;
        if value(&body, "corral_process_restarts_total{program=\"crashy\"").is_some_and(|v| v >= 2.0)
            && body.contains("corral_process_healthy{program=\"sick\"")
            && body.contains("corral_process_healthy{program=\"checked\"")
        {
            break body;
        }
        anyhow::ensure!(Instant::now() < deadline, "restarts never counted:\n{body}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(
        value(&body, "corral_process_up{program=\"good\",process=\"good\"}"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(
            &body,
            "corral_process_state{program=\"good\",process=\"good\",state=\"RUNNING\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &body,
            "corral_process_state{program=\"good\",process=\"good\",state=\"FATAL\"}"
        ),
        Some(0.0)
    );
    assert!(
        value(&body, "corral_process_unexpected_exits_total{program=\"crashy\"").is_some_and(|v| v >= 1.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "corral_process_healthy{program=\"checked\",process=\"checked\"}"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "corral_process_healthy{program=\"sick\",process=\"sick\"}"),
        Some(0.0),
        "{body}"
    );
    assert!(
        !body.contains("corral_process_healthy{program=\"good\""),
        "no check, no series"
    );
    assert_eq!(
        value(&body, "corral_process_restarts_total{program=\"good\""),
        Some(0.0)
    );
    assert_eq!(
        value(&body, "corral_program_desired_generation{program=\"good\"}"),
        Some(1.0)
    );
    assert_eq!(
        value(&body, "corral_program_applied_generation{program=\"good\"}"),
        Some(1.0)
    );
    assert_eq!(value(&body, "corral_supervisord_up"), Some(1.0));
    assert_eq!(value(&body, "corral_etcd_connected"), Some(1.0));
    assert_eq!(value(&body, "corral_desired_programs"), Some(4.0));
    assert!(value(&body, "corral_reconcile_total{result=\"ok\"}").is_some_and(|v| v >= 1.0));
    assert!(body.contains("corral_reconcile_duration_seconds_bucket"));
    assert!(body.contains("corral_agent_info{version="));
    assert!(!body.contains("hunter2-secret"), "a secret leaked into metrics");

    // A deleted program's series go away.
    api.delete(corral_proto::Kind::Program, "crashy", false).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while scrape(&agent_url).await?.contains("program=\"crashy\"") {
        anyhow::ensure!(Instant::now() < deadline, "crashy series stayed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let body = scrape(&format!("{}/metrics", controller.url)).await?;
    assert_eq!(value(&body, "corral_hosts{ready=\"true\"}"), Some(1.0), "{body}");
    assert_eq!(value(&body, "corral_host_ready{host=\"h1\"}"), Some(1.0));
    assert_eq!(
        value(&body, "corral_program_hosts{program=\"good\",kind=\"desired\"}"),
        Some(1.0)
    );
    assert_eq!(
        value(&body, "corral_program_hosts{program=\"good\",kind=\"ready\"}"),
        Some(1.0)
    );
    assert_eq!(value(&body, "corral_rollout_in_progress{program=\"good\"}"), Some(0.0));
    assert_eq!(value(&body, "corral_controller_leader"), Some(1.0));
    assert!(
        value(
            &body,
            "corral_api_requests_total{route=\"PUT /v1/programs/{name}\",code=\"200\"}"
        )
        .is_some_and(|v| v >= 2.0),
        "{body}"
    );
    assert!(!body.contains("hunter2-secret"));

    // The fleet's numbers come from the leader's index: scrapes read nothing from etcd (its
    // count of range reads stays where it was), and a replica that does not lead exports
    // none rather than numbers of its own.
    let follower = Controller::start(&etcd.endpoints(), "c2").await?;
    let ranges = || async {
        let etcd_metrics = scrape(&format!("{}/metrics", etcd.endpoint)).await?;
        Ok::<f64, anyhow::Error>(corral_tests::corral::counter_sum(
            etcd_metrics
                .lines()
                .filter(|l| l.contains("grpc_method=\"Range\""))
                .collect::<Vec<_>>()
                .join("\n")
                .as_str(),
            "grpc_server_handled_total",
        ))
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ranges().await?;
    assert!(
        before > 0.0,
        "etcd counts no range reads: the check below would prove nothing"
    );
    for _ in 0..5 {
        let body = scrape(&format!("{}/metrics", controller.url)).await?;
        assert_eq!(
            value(&body, "corral_program_hosts{program=\"good\",kind=\"ready\"}"),
            Some(1.0),
            "{body}"
        );
        let body = scrape(&format!("{}/metrics", follower.url)).await?;
        assert_eq!(value(&body, "corral_controller_leader"), Some(0.0));
        assert!(!body.contains("corral_program_hosts{"), "{body}");
    }
    assert_eq!(ranges().await?, before, "a scrape read from etcd");
    Ok(())
}

//! A real Prometheus scraping a real agent and controller, with Corral's alert rules (their
//! `for:` shortened): a program that ends FATAL raises CorralProcessNotRunning.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use corral_proto::resource::{Metadata, Program, ProgramSpec, Resource};
use corral_tests::corral::{Agent, Controller, wait_for};
use corral_tests::etcd::Etcd;
use corral_tests::process::ChildGuard;
use corral_tests::supervisord::{Options, Supervisord};
use serde_json::Value;

fn program(name: &str, command: &str) -> Resource {
    let spec = ProgramSpec {
        command: command.into(),
        selector: Some(BTreeMap::new()),
        startsecs: Some(1),
        startretries: Some(0),
        ..Default::default()
    };
    Resource::Program(Program::new(
        Metadata {
            name: name.into(),
            ..Default::default()
        },
        spec,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fatal_program_raises_the_not_running_alert_in_prometheus() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let controller = Controller::start(&etcd.endpoints(), "c1").await?;
    let sd = Supervisord::start(Options::default()).await?;
    let state = tempfile::tempdir()?;
    let agent_port = corral_tests::free_port()?;
    let _agent = Agent::start_listening(
        "h1",
        &[],
        &etcd.endpoints(),
        &sd,
        state.path(),
        Some(format!("127.0.0.1:{agent_port}").parse()?),
    );
    let api = controller.api()?;
    api.apply(&program("good", "/bin/sleep 1000"), false).await?;
    api.apply(&program("broken", "/bin/false"), false).await?;
    wait_for(&api, Duration::from_secs(30), |s| {
        s.programs.len() == 2 && s.programs.iter().all(|p| p.updated == 1)
    })
    .await?;

    // Prometheus, with the shipped rules and every `for:` cut to 2 s.
    let dir = tempfile::tempdir()?;
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/prometheus/corral-alerts.yml"
    ))?;
    let rules: String = rules
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("for: ") {
                format!("{}for: 2s", &l[..l.len() - l.trim_start().len()])
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.path().join("rules.yml"), rules)?;
    let controller_addr = controller.url.trim_start_matches("http://");
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [rules.yml]\nscrape_configs:\n  - job_name: corral-agent\n    static_configs: [{{targets: ['127.0.0.1:{agent_port}']}}]\n  - job_name: corral-controller\n    static_configs: [{{targets: ['{controller_addr}']}}]\n"
        ),
    )?;
    let prom_port = corral_tests::free_port()?;
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(dir.path().join("prometheus.log"))?));
    let mut prometheus = ChildGuard::spawn("prometheus", cmd)?;

    let alerts_url = format!("http://127.0.0.1:{prom_port}/api/v1/alerts");
    let deadline = Instant::now() + Duration::from_secs(90);
    let alerts = loop {
        prometheus.check_alive()?;
        corral_cli::client::ensure_tls_provider();
        if let Ok(resp) = reqwest::get(&alerts_url).await
            && let Ok(v) = resp.json::<Value>().await
        {
            let alerts = v["data"]["alerts"].as_array().cloned().unwrap_or_default();
            let hit = alerts.iter().any(|a| {
                a["labels"]["alertname"] == "CorralProcessNotRunning"
                    && a["labels"]["program"] == "broken"
                    && (a["state"] == "pending" || a["state"] == "firing")
            });
            if hit {
                break alerts;
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the alert never came:\n{}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // The healthy program raises nothing; the agent itself is fine.
    for a in &alerts {
        assert_ne!(a["labels"]["program"], "good", "{a}");
        assert_ne!(a["labels"]["alertname"], "CorralAgentDown", "{a}");
        assert_ne!(a["labels"]["alertname"], "CorralSupervisordDown", "{a}");
    }
    Ok(())
}

//! Corral on a 3-member etcd cluster: it keeps working when one member dies.

use std::time::Duration;

use corral_proto::resource::Resource;
use corral_tests::corral::{Agent, Controller, converged, wait_for};
use corral_tests::etcd::EtcdCluster;
use corral_tests::supervisord::{Options, Supervisord};

fn program(command: &str) -> Resource {
    corral_tests::specs::program("web", |s| s.command = command.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_three_member_cluster_survives_losing_a_member() -> anyhow::Result<()> {
    let mut cluster = EtcdCluster::start(3).await?;
    let controller = Controller::start(&cluster.endpoints, "c1").await?;
    let sd = Supervisord::start(Options::default()).await?;
    let state = tempfile::tempdir()?;
    let _agent = Agent::start("h1", &[], &cluster.endpoints, &sd, state.path());
    let api = controller.api()?;
    api.apply(&program("/bin/sleep 1000"), false).await?;
    wait_for(&api, Duration::from_secs(30), |s| converged(s) && s.programs.len() == 1).await?;

    cluster.kill_member(0);
    let r = api.apply(&program("/bin/sleep 2000"), false).await?;
    assert_eq!(r.result.as_str(), "configured");
    wait_for(&api, Duration::from_secs(60), |s| {
        converged(s) && s.programs[0].generation == 2
    })
    .await?;
    let info = sd.client().await?.get_process_info("web").await?;
    assert!(info.pid > 0);
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", info.pid))?;
    assert_eq!(cmdline, "/bin/sleep\u{0}2000\u{0}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corral_runs_on_etcd_with_tls_client_certificates_and_authentication() -> anyhow::Result<()> {
    let etcd = corral_tests::etcd::SecureEtcd::start().await?;
    let opts = corral_etcd::EtcdOptions {
        endpoints: vec![etcd.endpoint.clone()],
        ca_file: Some(etcd.ca.clone()),
        cert_file: Some(etcd.client_cert.clone()),
        key_file: Some(etcd.client_key.clone()),
        user: Some(("root".into(), etcd.password.clone())),
        probe_key: None,
    };
    // Without the client certificate, or with a wrong password, nothing connects.
    let no_cert = corral_etcd::EtcdOptions {
        cert_file: None,
        key_file: None,
        ..opts.clone()
    };
    assert!(corral_etcd::Etcd::connect(&no_cert).await.is_err());
    let wrong = corral_etcd::EtcdOptions {
        user: Some(("root".into(), "nope".into())),
        ..opts.clone()
    };
    assert!(corral_etcd::Etcd::connect(&wrong).await.is_err());

    let controller = Controller::start_with(&opts, "c1").await?;
    let sd = Supervisord::start(Options::default()).await?;
    let state = tempfile::tempdir()?;
    let _agent = Agent::start_with("h1", &[], &opts, &sd, state.path(), None);
    let api = controller.api()?;
    api.apply(&program("/bin/sleep 1000"), false).await?;
    wait_for(&api, Duration::from_secs(30), |s| {
        converged(s) && s.programs.len() == 1 && s.programs[0].ready == 1
    })
    .await?;
    Ok(())
}

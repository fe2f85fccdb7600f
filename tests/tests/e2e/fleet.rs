//! The whole system: etcd, a controller, and two hosts, each with its own supervisord and
//! agent. Specs go in through the API; processes come out on the right hosts.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;

use corral_agent::supervisor::ProcessState;
use corral_cli::client::ApiClient;
use corral_proto::resource::{DesiredState, Group, GroupSpec, Metadata, Resource};
use corral_tests::corral::{Agent, Controller, converged, wait_for};
use corral_tests::etcd::Etcd;
use corral_tests::specs::program;
use corral_tests::supervisord::{Options, Supervisord};

const WAIT: Duration = Duration::from_secs(30);

struct Node {
    sd: Supervisord,
    agent: Option<Agent>,
    state: tempfile::TempDir,
    labels: Vec<(&'static str, &'static str)>,
    name: &'static str,
}

impl Node {
    async fn start(name: &'static str, labels: &[(&'static str, &'static str)], etcd: &Etcd) -> anyhow::Result<Node> {
        let sd = Supervisord::start(Options::default()).await?;
        let state = tempfile::tempdir()?;
        let agent = Agent::start(name, labels, &etcd.endpoints(), &sd, state.path());
        Ok(Node {
            sd,
            agent: Some(agent),
            state,
            labels: labels.to_vec(),
            name,
        })
    }

    async fn restart_agent(&mut self, etcd: &Etcd) {
        if let Some(a) = self.agent.take() {
            a.stop().await;
        }
        self.agent = Some(Agent::start(
            self.name,
            &self.labels,
            &etcd.endpoints(),
            &self.sd,
            self.state.path(),
        ));
    }

    async fn pids(&self) -> anyhow::Result<BTreeMap<String, (i64, ProcessState)>> {
        let c = self.sd.client().await?;
        Ok(c.get_all_process_info()
            .await?
            .into_iter()
            .map(|p| (p.namespec(), (p.pid, p.state)))
            .collect())
    }
}

struct Fleet {
    etcd: Etcd,
    controller: Option<Controller>,
    nodes: Vec<Node>,
}

impl Fleet {
    async fn start() -> anyhow::Result<Fleet> {
        let etcd = Etcd::start().await?;
        let controller = Controller::start(&etcd.endpoints(), "c1").await?;
        let nodes = vec![
            Node::start("h1", &[("role", "app")], &etcd).await?,
            Node::start("h2", &[("role", "db")], &etcd).await?,
        ];
        Ok(Fleet {
            etcd,
            controller: Some(controller),
            nodes,
        })
    }

    fn api(&self) -> anyhow::Result<ApiClient> {
        self.controller
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no controller"))?
            .api()
    }
}

fn role(r: &str) -> Option<BTreeMap<String, String>> {
    Some([("role".to_string(), r.to_string())].into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn specs_are_placed_by_selector_and_enforced_on_each_host() -> anyhow::Result<()> {
    let fleet = Fleet::start().await?;
    let api = fleet.api()?;
    let r = api.apply(&program("web", |s| s.selector = role("app")), false).await?;
    assert_eq!(r.result.as_str(), "created");
    api.apply(&program("everywhere", |_| {}), false).await?;
    api.apply(
        &program("pinned", |s| {
            s.selector = None;
            s.hosts = Some(vec!["h2".into()]);
        }),
        false,
    )
    .await?;
    let status = wait_for(&api, WAIT, |s| converged(s) && s.programs.len() == 3).await?;
    let desired: BTreeMap<&str, usize> = status.programs.iter().map(|p| (p.name.as_str(), p.desired)).collect();
    assert_eq!(desired, [("everywhere", 2), ("pinned", 1), ("web", 1)].into());
    let h1 = fleet.nodes[0].pids().await?;
    let h2 = fleet.nodes[1].pids().await?;
    assert_eq!(h1.keys().collect::<Vec<_>>(), ["everywhere", "web"]);
    assert_eq!(h2.keys().collect::<Vec<_>>(), ["everywhere", "pinned"]);
    assert!(h1.values().chain(h2.values()).all(|(_, s)| *s == ProcessState::Running));

    // Per-host view of one program.
    let p = api.program("everywhere").await?;
    let view = p.status.expect("status");
    assert_eq!(view.ready, 2);
    assert_eq!(view.hosts[0].processes[0].state, "RUNNING");

    // The same spec again: unchanged, generation stays.
    let r = api.apply(&program("web", |s| s.selector = role("app")), false).await?;
    assert_eq!((r.result.as_str(), r.object.metadata().generation), ("unchanged", 1));

    // A change to one program restarts only it, on every host it runs on.
    let r = api
        .apply(&program("everywhere", |s| s.command = "/bin/sleep 1001".into()), false)
        .await?;
    assert_eq!((r.result.as_str(), r.object.metadata().generation), ("configured", 2));
    wait_for(&api, WAIT, |s| {
        converged(s) && s.programs.iter().all(|p| p.generation == 1 || p.updated == p.desired)
    })
    .await?;
    let h1b = fleet.nodes[0].pids().await?;
    let h2b = fleet.nodes[1].pids().await?;
    assert_ne!(h1["everywhere"].0, h1b["everywhere"].0);
    assert_ne!(h2["everywhere"].0, h2b["everywhere"].0);
    assert_eq!(h1["web"].0, h1b["web"].0, "web restarted by another program's change");
    assert_eq!(
        h2["pinned"].0, h2b["pinned"].0,
        "pinned restarted by another program's change"
    );

    // A restart bumps the marker: web restarts once, reaches the new generation, and
    // applying the file again (without the marker) neither undoes nor repeats it.
    let web_pid = fleet.nodes[0].pids().await?["web"].0;
    api.update_program("web", |p| p.spec.restarted_at = Some("1".into()))
        .await?;
    wait_for(&api, WAIT, |s| {
        converged(s) && s.programs.iter().all(|p| p.name != "web" || p.generation == 2)
    })
    .await?;
    let restarted = fleet.nodes[0].pids().await?["web"].0;
    assert_ne!(restarted, web_pid);
    let r = api.apply(&program("web", |s| s.selector = role("app")), false).await?;
    assert_eq!(r.result.as_str(), "unchanged");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fleet.nodes[0].pids().await?["web"].0, restarted);

    // Desired state: stopped, then deleted.
    api.update_program("web", |p| p.spec.state = DesiredState::Stopped)
        .await?;
    wait_for(&api, WAIT, converged).await?;
    assert_eq!(fleet.nodes[0].pids().await?["web"].1, ProcessState::Stopped);
    api.delete(corral_proto::Kind::Program, "everywhere", false).await?;
    wait_for(&api, WAIT, |s| converged(s) && s.programs.len() == 2).await?;
    for _ in 0..100 {
        let (a, b) = (fleet.nodes[0].pids().await?, fleet.nodes[1].pids().await?);
        if !a.contains_key("everywhere") && !b.contains_key("everywhere") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(fleet.nodes[1].pids().await?.keys().collect::<Vec<_>>(), ["pinned"]);
    assert_eq!(fleet.nodes[0].pids().await?.keys().collect::<Vec<_>>(), ["web"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_validates_authenticates_and_refuses_stale_writes() -> anyhow::Result<()> {
    let fleet = Fleet::start().await?;
    let api = fleet.api()?;
    let bad = program("bad", |s| {
        s.command = "/bin/true\n[program:evil]".into();
        s.environment = Some([("RATE".to_string(), "5%".to_string())].into());
    });
    let err = api.apply(&bad, false).await.expect_err("refused");
    assert_eq!(err.status(), Some(422));
    let text = err.to_string();
    assert!(
        text.contains("spec.command") && text.contains("spec.environment.RATE"),
        "{text}"
    );
    assert_eq!(
        api.program("bad").await.expect_err("nothing written").status(),
        Some(404)
    );

    // Dry run writes nothing.
    let r = api.apply(&program("dry", |_| {}), true).await?;
    assert_eq!(r.result.as_str(), "created");
    assert_eq!(api.program("dry").await.expect_err("dry run").status(), Some(404));

    // Stale resourceVersion: 409.
    api.apply(&program("web", |_| {}), false).await?;
    let mut stale = api.program("web").await?;
    stale.status = None;
    api.update_program("web", |p| p.spec.startsecs = Some(1)).await?;
    stale.spec.startsecs = Some(2);
    let err = api.apply(&Resource::Program(stale), false).await.expect_err("stale");
    assert_eq!(err.status(), Some(409), "{err}");

    // A program may be in at most one native group.
    let group = |name: &str| {
        Resource::Group(Group::new(
            Metadata {
                name: name.into(),
                ..Default::default()
            },
            GroupSpec {
                programs: vec!["web".into()],
                priority: None,
                native: true,
            },
        ))
    };
    api.apply(&group("g1"), false).await?;
    assert_eq!(
        api.apply(&group("g2"), false)
            .await
            .expect_err("second native group")
            .status(),
        Some(422)
    );

    // No token, wrong token: 401; health is open.
    let anonymous = ApiClient::new(&fleet.controller.as_ref().expect("controller").url, None)?;
    assert_eq!(anonymous.programs().await.expect_err("401").status(), Some(401));
    let wrong = ApiClient::new(&fleet.controller.as_ref().expect("controller").url, Some("nope".into()))?;
    assert_eq!(wrong.hosts().await.expect_err("401").status(), Some(401));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarts_and_outages_restart_no_workload() -> anyhow::Result<()> {
    let mut fleet = Fleet::start().await?;
    let api = fleet.api()?;
    api.apply(&program("web", |_| {}), false).await?;
    wait_for(&api, WAIT, |s| {
        converged(s) && s.programs.len() == 1 && s.programs[0].ready == 2
    })
    .await?;
    let before = (fleet.nodes[0].pids().await?, fleet.nodes[1].pids().await?);

    // Agent restart.
    fleet.nodes[0].restart_agent(&fleet.etcd).await;
    // Controller restart (a new replica takes over the election).
    if let Some(c) = fleet.controller.take() {
        c.stop().await;
    }
    fleet.controller = Some(Controller::start(&fleet.etcd.endpoints(), "c2").await?);
    let api = fleet.api()?;
    wait_for(&api, WAIT, |s| converged(s) && s.programs[0].ready == 2).await?;

    // etcd outage: the agents keep enforcing what they know.
    fleet.etcd.kill();
    let c = fleet.nodes[0].sd.client().await?;
    c.stop_process("web", true).await?;
    let mut restarted = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if c.get_process_info("web").await?.state == ProcessState::Running {
            restarted = true;
            break;
        }
    }
    assert!(restarted, "the agent did not restart web while etcd was down");
    let pid_after_drift = fleet.nodes[0].pids().await?["web"].0;
    // An agent restart during the outage works from its cache.
    fleet.nodes[1].restart_agent(&fleet.etcd).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.etcd.restart().await?;
    wait_for(&api, WAIT, |s| converged(s) && s.programs[0].ready == 2).await?;

    let after = (fleet.nodes[0].pids().await?, fleet.nodes[1].pids().await?);
    assert_eq!(after.0["web"].0, pid_after_drift, "h1 restarted web again");
    assert_eq!(after.1["web"].0, before.1["web"].0, "h2 restarted web");

    // etcd compacts its history: the agents keep following changes.
    let mut c = fleet.etcd.client().await?;
    let rev = c.get("/", None).await?.header().map_or(0, |h| h.revision());
    c.compact(rev, None).await?;
    api.apply(&program("web", |s| s.command = "/bin/sleep 1002".into()), false)
        .await?;
    wait_for(&api, WAIT, |s| {
        converged(s) && s.programs[0].generation == 2 && s.programs[0].ready == 2
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_host_goes_not_ready_and_keeps_its_programs() -> anyhow::Result<()> {
    let mut fleet = Fleet::start().await?;
    let api = fleet.api()?;
    api.apply(&program("web", |_| {}), false).await?;
    wait_for(&api, WAIT, |s| {
        converged(s) && s.programs.len() == 1 && s.programs[0].ready == 2
    })
    .await?;
    let pid = fleet.nodes[1].pids().await?["web"].0;
    // The agent stops (its liveness lease ends with it); supervisord keeps running.
    if let Some(a) = fleet.nodes[1].agent.take() {
        a.stop().await;
    }
    let status = wait_for(&api, WAIT, |s| !s.not_ready_hosts.is_empty()).await?;
    assert_eq!(status.not_ready_hosts, ["h2"]);
    let hosts = api.hosts().await?;
    assert!(
        hosts
            .iter()
            .any(|h| h.metadata.name == "h2" && h.status.as_ref().is_some_and(|s| !s.ready))
    );
    // Its assignment stays, so nothing moved or stopped.
    assert_eq!(fleet.nodes[1].pids().await?["web"].0, pid);
    assert_eq!(status.programs[0].desired, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollout_updates_one_host_at_a_time_and_a_failing_batch_pauses_it() -> anyhow::Result<()> {
    let fleet = Fleet::start().await?;
    let api = fleet.api()?;
    api.apply(&program("web", |_| {}), false).await?;
    wait_for(&api, WAIT, |s| {
        converged(s) && s.programs.len() == 1 && s.programs[0].ready == 2
    })
    .await?;
    let before = (
        fleet.nodes[0].pids().await?["web"].0,
        fleet.nodes[1].pids().await?["web"].0,
    );

    // A broken new version: the first host (h1) gets it and fails (it never lasts its
    // startsecs); h2 keeps the old one.
    api.apply(
        &program("web", |s| {
            s.command = "/bin/false".into();
            s.startsecs = Some(1);
        }),
        false,
    )
    .await?;
    let status = wait_for(&api, WAIT, |s| {
        s.programs[0].updated == 1
            && s.programs[0]
                .problems
                .iter()
                .any(|p| p.starts_with("h2: runs generation 1 of 2"))
    })
    .await?;
    assert_eq!(status.programs[0].ready, 0, "{status:#?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let h2 = fleet.nodes[1].pids().await?;
    assert_eq!(
        h2["web"],
        (before.1, ProcessState::Running),
        "h2 was touched by a paused rollout"
    );
    let p = api.program("web").await?;
    assert_eq!(p.status.expect("status").updated, 1);

    // A good version: the rollout goes on, host by host, and finishes.
    api.apply(&program("web", |s| s.command = "/bin/sleep 1003".into()), false)
        .await?;
    wait_for(&api, WAIT, |s| {
        converged(s) && s.programs[0].generation == 3 && s.programs[0].ready == 2
    })
    .await?;
    assert_ne!(fleet.nodes[1].pids().await?["web"].0, before.1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollout_survives_the_leaders_death_with_no_host_updated_twice_or_skipped() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let c1 = Controller::start(&etcd.endpoints(), "c1").await?;
    // c1 leads (it campaigned first); c2 stands by.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c2 = Controller::start(&etcd.endpoints(), "c2").await?;
    let api = c2.api()?;
    let mut nodes = Vec::new();
    for name in ["h1", "h2", "h3", "h4"] {
        nodes.push(Node::start(name, &[("role", "app")], &etcd).await?);
    }
    let web = |command: &str| {
        let command = command.to_string();
        program("web", move |s| {
            s.selector = role("app");
            s.command = command;
            s.startsecs = Some(2);
            s.rollout = Some(corral_proto::RolloutSpec {
                max_unavailable: Some(corral_proto::HostCount::Count(1)),
                auto_revert: None,
            });
        })
    };
    api.apply(&web("/bin/sleep 1000"), false).await?;
    wait_for(&api, Duration::from_secs(60), |s| {
        converged(s) && s.programs[0].ready == 4
    })
    .await?;

    // Every pid each host's web ever had, sampled throughout.
    let mut clients = Vec::new();
    for n in &nodes {
        clients.push(n.sd.client().await?);
    }
    let mut seen: Vec<std::collections::BTreeSet<i64>> = vec![Default::default(); nodes.len()];
    let sample = async |seen: &mut Vec<std::collections::BTreeSet<i64>>| -> anyhow::Result<()> {
        for (i, c) in clients.iter().enumerate() {
            if let Ok(info) = c.get_process_info("web").await
                && info.pid > 0
            {
                seen[i].insert(info.pid);
            }
        }
        Ok(())
    };
    sample(&mut seen).await?;

    api.apply(&web("/bin/sleep 2000"), false).await?;
    // The first host updated: kill the leader mid-rollout.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        sample(&mut seen).await?;
        let s = api.status().await?;
        if s.programs[0].updated >= 1 {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the rollout never started: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leader = etcd
        .client()
        .await?
        .leader(corral_proto::keys::Keys::default().election())
        .await?;
    let leader = leader.kv().map(|kv| kv.value().to_vec()).unwrap_or_default();
    assert_eq!(leader, b"c1", "c1 was to lead");
    c1.kill().await;
    // c2 takes over once c1's lease expires, and finishes the rollout from etcd.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        sample(&mut seen).await?;
        let s = api.status().await?;
        if converged(&s) && s.programs[0].ready == 4 && s.programs[0].generation == 2 {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the rollout never finished: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sample(&mut seen).await?;
    for (n, pids) in nodes.iter().zip(&seen) {
        // Exactly the old process and one new one: updated once, not twice, not skipped.
        assert_eq!(pids.len(), 2, "{}: pids {pids:?}", n.name);
    }
    Ok(())
}

/// The controller's policy at apply: a spec that breaks it is refused with every field that
/// does (dry run too), nothing stored; a program stored before the policy came in is still
/// run, and `status` says it breaks the policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_refuses_at_apply_and_status_names_programs_stored_before_it() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let opts = corral_etcd::EtcdOptions::plain(&etcd.endpoints());
    let before = Controller::start(&etcd.endpoints(), "c1").await?;
    before.api()?.apply(&program("legacy", |_| {}), false).await?;
    before.stop().await;

    let policy =
        corral_controller::policy::Policy::parse("users: [app]\ncommands: [/srv/]\n").map_err(anyhow::Error::msg)?;
    let controller = Controller::start_with_policy(&opts, "c2", policy).await?;
    let api = controller.api()?;
    for dry_run in [true, false] {
        let err = api
            .apply(&program("rooted", |s| s.command = "/bin/sh -c id".into()), dry_run)
            .await
            .expect_err("refused by the policy");
        assert_eq!(err.status(), Some(422), "{err}");
        let said = err.to_string();
        assert!(
            said.contains("spec.user") && said.contains("spec.command") && said.contains("policy"),
            "{said}"
        );
    }
    assert!(api.programs().await?.iter().all(|p| p.metadata.name != "rooted"));
    let fine = program("fine", |s| {
        s.user = Some("app".into());
        s.command = "/srv/fine/run".into();
    });
    api.apply(&fine, true).await?;
    let status = api.status().await?;
    assert!(
        status
            .warnings
            .iter()
            .any(|w| w.contains("legacy breaks the policy") && w.contains("spec.user")),
        "{:?}",
        status.warnings
    );
    Ok(())
}

/// Operating hosts: an operator's labels place programs (and survive the agent registering
/// again), cordon places nothing new while what runs stays and follows its spec, drain takes
/// everything off, uncordon brings it back; operators cordon, only admins label; each change
/// is in the history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hosts_are_labeled_cordoned_drained_and_uncordoned() -> anyhow::Result<()> {
    use corral_proto::api::HostAction;
    use corral_tests::corral::{OPERATOR_TOKEN, READ_ONLY_TOKEN};
    let mut fleet = Fleet::start().await?;
    let api = fleet.api()?;
    let controller = fleet
        .controller
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no controller"))?;
    let (operator, reader) = (controller.api_as(OPERATOR_TOKEN)?, controller.api_as(READ_ONLY_TOKEN)?);
    let summary = |s: &corral_proto::fleet::FleetStatus, name: &str| {
        s.programs
            .iter()
            .find(|p| p.name == name)
            .map(|p| (p.generation, p.desired, p.ready))
    };
    api.apply(&program("web", |_| {}), false).await?;
    wait_for(&api, WAIT, |s| converged(s) && summary(s, "web") == Some((1, 2, 2))).await?;

    // Cordon h2: a new program goes to h1 only; web stays on h2 and still follows its spec.
    let h = operator.host_action("h2", HostAction::Cordon).await?;
    assert!(h.spec.cordoned && !h.spec.drained);
    api.apply(&program("fresh", |_| {}), false).await?;
    wait_for(&api, WAIT, |s| converged(s) && summary(s, "fresh") == Some((1, 1, 1))).await?;
    assert!(!fleet.nodes[1].pids().await?.contains_key("fresh"));
    let before = fleet.nodes[1].pids().await?["web"].0;
    api.apply(&program("web", |s| s.command = "/bin/sleep 2000".into()), false)
        .await?;
    wait_for(&api, WAIT, |s| converged(s) && summary(s, "web") == Some((2, 2, 2))).await?;
    assert_ne!(
        fleet.nodes[1].pids().await?["web"].0,
        before,
        "the change reached the cordoned host"
    );

    // Drain h2: its supervisord runs nothing of Corral's.
    operator.host_action("h2", HostAction::Drain).await?;
    wait_for(&api, WAIT, |s| converged(s) && summary(s, "web") == Some((2, 1, 1))).await?;
    let deadline = std::time::Instant::now() + WAIT;
    while !fleet.nodes[1].pids().await?.is_empty() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "h2 still runs {:?}",
            fleet.nodes[1].pids().await?
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hosts = api.hosts().await?;
    assert!(hosts.iter().any(|h| h.metadata.name == "h2" && h.spec.drained));

    // Uncordon: both programs come back to h2.
    operator.host_action("h2", HostAction::Uncordon).await?;
    wait_for(&api, WAIT, |s| {
        converged(s) && summary(s, "web") == Some((2, 2, 2)) && summary(s, "fresh") == Some((1, 2, 2))
    })
    .await?;

    // An operator's label places a program, and outlives the agent registering again.
    api.label_host("h1", &[("tier".to_string(), Some("gold".to_string()))].into())
        .await?;
    api.apply(
        &program("gold", |s| {
            s.selector = Some([("tier".to_string(), "gold".to_string())].into())
        }),
        false,
    )
    .await?;
    wait_for(&api, WAIT, |s| converged(s) && summary(s, "gold") == Some((1, 1, 1))).await?;
    assert!(fleet.nodes[0].pids().await?.contains_key("gold"));
    let etcd = &fleet.etcd;
    fleet.nodes[0].restart_agent(etcd).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let h1 = api
        .hosts()
        .await?
        .into_iter()
        .find(|h| h.metadata.name == "h1")
        .ok_or_else(|| anyhow::anyhow!("h1 gone"))?;
    assert_eq!(h1.metadata.labels.get("tier").map(String::as_str), Some("gold"));
    // Removed (the agent's own label can be hidden too): gold leaves h1.
    api.label_host("h1", &[("tier".to_string(), None), ("role".to_string(), None)].into())
        .await?;
    wait_for(&api, WAIT, |s| converged(s) && summary(s, "gold") == Some((1, 0, 0))).await?;
    let deadline = std::time::Instant::now() + WAIT;
    while fleet.nodes[0].pids().await?.contains_key("gold") {
        anyhow::ensure!(std::time::Instant::now() < deadline, "gold still on h1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Roles, unknown hosts and bad labels.
    let status =
        |r: Result<corral_proto::resource::Host, corral_cli::client::ClientError>| r.err().and_then(|e| e.status());
    assert_eq!(status(reader.host_action("h2", HostAction::Cordon).await), Some(403));
    assert_eq!(
        status(
            operator
                .label_host("h2", &[("x".to_string(), Some("y".to_string()))].into())
                .await
        ),
        Some(403)
    );
    assert_eq!(
        status(operator.host_action("nosuchhost", HostAction::Cordon).await),
        Some(404)
    );
    assert!(
        api.label_host("h2", &[("bad key!".to_string(), Some("y".to_string()))].into())
            .await
            .is_err_and(|e| e.to_string().contains("labels.bad key!"))
    );

    // A change that changes nothing is neither written nor audited; a refusal names what.
    let before = reader.history(None, None, 100).await?.len();
    api.label_host("h2", &[("nosuchkey".to_string(), None)].into()).await?;
    operator.host_action("h2", HostAction::Uncordon).await?;
    assert_eq!(reader.history(None, None, 100).await?.len(), before);
    let e = operator
        .label_host("h2", &[("x".to_string(), Some("y".to_string()))].into())
        .await
        .expect_err("operator");
    assert!(
        e.to_string().contains("may not label hosts (that needs role admin)"),
        "{e}"
    );
    let e = reader
        .host_action("h2", HostAction::Drain)
        .await
        .expect_err("read-only");
    assert!(e.to_string().contains("may not cordon, uncordon or drain hosts"), "{e}");
    // A program that selects only cordoned hosts is said to run nowhere; status lists them.
    operator.host_action("h2", HostAction::Cordon).await?;
    api.apply(
        &program("pinned", |s| {
            s.selector = None;
            s.hosts = Some(vec!["h2".into()]);
        }),
        false,
    )
    .await?;
    let s = api.status().await?;
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("\"pinned\" selects only cordoned or drained hosts (h2)")),
        "{:?}",
        s.warnings
    );
    assert_eq!(s.unschedulable.get("h2").map(String::as_str), Some("cordoned"));
    operator.host_action("h2", HostAction::Uncordon).await?;
    api.delete(corral_proto::resource::Kind::Program, "pinned", false)
        .await?;

    // Who did it.
    let h = reader
        .history(Some(corral_proto::resource::Kind::Host), Some("h2"), 10)
        .await?;
    let seen: Vec<(&str, &str)> = h.iter().map(|e| (e.verb.as_str(), e.who.as_str())).collect();
    assert_eq!(
        seen,
        [
            ("uncordon", "operator"),
            ("cordon", "operator"),
            ("uncordon", "operator"),
            ("drain", "operator"),
            ("cordon", "operator")
        ]
    );
    assert_eq!(h[3].changes, ["spec.drained"]);
    let h = reader
        .history(Some(corral_proto::resource::Kind::Host), Some("h1"), 10)
        .await?;
    assert_eq!(h[0].changes, ["metadata.labels.role", "metadata.labels.tier"]);
    Ok(())
}

/// `depends_on` at apply: a dependency that does not exist is said in status; a cycle is
/// refused with its path (none of its programs could ever start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependency_cycle_is_refused_and_a_missing_dependency_is_said() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let controller = Controller::start(&etcd.endpoints(), "c1").await?;
    let api = controller.api()?;
    let deps = |d: &[&str]| Some(d.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    api.apply(&program("web", |s| s.depends_on = deps(&["db"])), false)
        .await?;
    let s = api.status().await?;
    assert!(
        s.warnings
            .iter()
            .any(|w| w == "program \"web\" depends on programs that do not exist: db"),
        "{:?}",
        s.warnings
    );
    api.apply(&program("db", |s| s.depends_on = deps(&["cache"])), false)
        .await?;
    let err = api
        .apply(&program("cache", |s| s.depends_on = deps(&["web"])), false)
        .await
        .expect_err("a cycle");
    assert_eq!(err.status(), Some(422));
    assert!(
        err.to_string().contains("cache -> web -> db -> cache is a cycle"),
        "{err}"
    );
    assert!(api.program("cache").await.is_err(), "nothing was written");
    // The two halves of a cycle applied at the same moment: one of them is refused.
    for round in 0..5 {
        let (a, b) = (format!("ca{round}"), format!("cb{round}"));
        let (pa, pb) = (
            program(&a, |s| s.depends_on = deps(&[&b])),
            program(&b, |s| s.depends_on = deps(&[&a])),
        );
        let (ra, rb) = tokio::join!(api.apply(&pa, false), api.apply(&pb, false));
        let refused = [&ra, &rb]
            .iter()
            .filter(|r| r.as_ref().is_err_and(|e| e.status() == Some(422)))
            .count();
        assert_eq!(
            (refused, ra.is_ok() || rb.is_ok()),
            (1, true),
            "round {round}: {ra:?} {rb:?}"
        );
    }
    // A cycle stored by other means (an older version) is not another program's to answer for.
    let mut c = etcd.client().await?;
    let keys = corral_proto::keys::Keys::default();
    for (n, d) in [("x", "y"), ("y", "x")] {
        let mut p = corral_tests::specs::program_object(n, |s| s.depends_on = deps(&[d]));
        p.metadata.generation = 1;
        c.put(keys.program(n), serde_json::to_vec(&p)?, None).await?;
    }
    api.apply(&program("solo2", |s| s.depends_on = deps(&["db"])), false)
        .await?;
    // Itself, twice, and a bad name: named by field.
    let err = api
        .apply(
            &program("solo", |s| s.depends_on = deps(&["solo", "x", "x", "../y"])),
            false,
        )
        .await
        .expect_err("invalid");
    let text = err.to_string();
    for part in [
        "spec.depends_on[0]: a program cannot depend on itself",
        "spec.depends_on[2]: \"x\" is listed twice",
        "spec.depends_on[3]:",
    ] {
        assert!(text.contains(part), "{part}: {text}");
    }
    Ok(())
}

/// Rollout control: revisions kept (bounded) with who applied them, a paused rollout moves no
/// host until resumed, undo applies a kept revision again, and `apply --wait` / `rollout
/// status` follow a rollout to its end or say it is paused or stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollouts_are_kept_paused_resumed_undone_and_followed() -> anyhow::Result<()> {
    use corral_proto::api::ProgramAction;
    use corral_tests::corral::{OPERATOR_TOKEN, READ_ONLY_TOKEN, TOKEN, binary};
    let fleet = Fleet::start().await?;
    let api = fleet.api()?;
    let controller = fleet
        .controller
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no controller"))?;
    let (operator, reader) = (controller.api_as(OPERATOR_TOKEN)?, controller.api_as(READ_ONLY_TOKEN)?);
    let web = |n: u64| {
        program("web", move |s| {
            s.command = format!("/bin/sleep {}", 3000 + n);
            s.rollout = Some(corral_proto::resource::RolloutSpec {
                max_unavailable: Some(corral_proto::resource::HostCount::Count(1)),
                auto_revert: None,
            });
        })
    };
    let at = |s: &corral_proto::fleet::FleetStatus, generation: u64| {
        s.programs
            .iter()
            .any(|p| p.name == "web" && p.generation == generation && p.ready == 2 && p.updated == 2)
    };
    api.apply(&web(1), false).await?;
    api.apply(&web(2), false).await?;
    wait_for(&api, WAIT, |s| converged(s) && at(s, 2)).await?;
    let revs = reader.revisions("web").await?;
    assert_eq!(revs.iter().map(|r| r.generation).collect::<Vec<_>>(), [2, 1]);
    assert_eq!(revs[1].spec.command, "/bin/sleep 3001");
    assert!(revs.iter().all(|r| r.who == "admin"));

    // Paused: a new generation reaches no host until resumed.
    operator.act("web", &ProgramAction::Pause).await?;
    let nodes = &fleet.nodes;
    let pids = |n: usize| async move { nodes[n].pids().await.map(|p| p.get("web").map_or(0, |w| w.0)) };
    let before = (pids(0).await?, pids(1).await?);
    api.apply(&web(3), false).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!((pids(0).await?, pids(1).await?), before, "a paused rollout moved");
    let p = api.program("web").await?;
    let view = p.status.clone().unwrap_or_default();
    assert!(view.paused && view.updated == 0, "{view:?}");
    let corral = |token: &str, args: &[&str]| -> anyhow::Result<std::process::Output> {
        Ok(std::process::Command::new(binary("corral")?)
            .args(["--server", &controller.url, "--token", token])
            .args(args)
            .output()?)
    };
    let o = corral(READ_ONLY_TOKEN, &["rollout", "status", "web"])?;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("web: rollout paused"),
        "{o:?}"
    );
    for (args, says) in [
        (&["get", "programs"][..], "running (rollout paused)"),
        (&["describe", "program", "web"][..], "Rollout:     paused"),
        (&["status"][..], "(rollout paused)"),
    ] {
        let o = corral(READ_ONLY_TOKEN, args)?;
        assert!(String::from_utf8_lossy(&o.stdout).contains(says), "{args:?}: {o:?}");
    }
    operator.act("web", &ProgramAction::Resume).await?;
    let o = corral(READ_ONLY_TOKEN, &["rollout", "status", "web", "--timeout-secs", "30"])?;
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("web: rollout complete: 2 hosts at generation 3"), "{out}");

    // Undo: the spec before, as a new generation; then a chosen one.
    forbidden_undo(&reader).await;
    let r = operator.rollback("web", None).await?;
    assert_eq!(
        (r.object.metadata.generation, r.object.spec.command.as_str()),
        (4, "/bin/sleep 3002")
    );
    let r = operator.rollback("web", Some(1)).await?;
    assert_eq!(
        (r.object.metadata.generation, r.object.spec.command.as_str()),
        (5, "/bin/sleep 3001")
    );
    wait_for(&api, WAIT, |s| converged(s) && at(s, 5)).await?;
    let h = reader.history(None, Some("web"), 3).await?;
    assert_eq!(
        h.iter().map(|e| (e.verb.as_str(), e.who.as_str())).collect::<Vec<_>>(),
        [("undo", "operator"), ("undo", "operator"), ("resume", "operator")]
    );
    // Bounded: the last ten.
    for n in 6..=14 {
        api.apply(&web(n), false).await?;
    }
    let revs = api.revisions("web").await?;
    assert_eq!(revs.len(), 10);
    assert_eq!((revs[0].generation, revs[9].generation), (14, 5));
    let err = operator.rollback("web", Some(2)).await.expect_err("pruned");
    assert_eq!(err.status(), Some(404));
    assert!(err.to_string().contains("no revision 2 (kept: 14, 13"), "{err}");

    // apply --wait: to the end; and a change that cannot run stalls and says so.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("web.yaml");
    let yaml = |command: &str| {
        format!(
            "apiVersion: corral.dev/v1\nkind: Program\nmetadata: {{name: web}}\nspec:\n  selector: {{}}\n  command: {command}\n  startsecs: 0\n  startretries: 0\n  rollout: {{max_unavailable: 1}}\n"
        )
    };
    std::fs::write(&file, yaml("/bin/sleep 4000"))?;
    let f = file.display().to_string();
    let o = corral(TOKEN, &["apply", "-f", &f, "--wait", "--timeout-secs", "60"])?;
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("rollout complete"), "{out}");
    std::fs::write(&file, yaml("/nonexistent/server"))?;
    let o = corral(
        TOKEN,
        &["apply", "-f", &f, "--wait", "--timeout-secs", "60", "--stall-secs", "3"],
    )?;
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("rollout stalled") && out.contains("failing: h"), "{out}");
    // Only one host took the bad change (max_unavailable 1); the other still runs the last
    // good one.
    let running: usize = [pids(0).await.is_ok_and(|p| p > 0), pids(1).await.is_ok_and(|p| p > 0)]
        .into_iter()
        .map(usize::from)
        .sum();
    assert_eq!(running, 1, "the bad change went past its first batch");
    Ok(())
}

async fn forbidden_undo(reader: &ApiClient) {
    let e = reader.rollback("web", None).await.expect_err("read-only");
    assert_eq!(e.status(), Some(403), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollout_waits_for_healthy_not_just_running() -> anyhow::Result<()> {
    let fleet = Fleet::start().await?;
    let api = fleet.api()?;
    let dir = tempfile::tempdir()?;
    let (ok, later) = (dir.path().join("ok"), dir.path().join("later"));
    std::fs::write(&ok, "")?;
    // The check of each version looks for its own file: version 2's is not there yet.
    let web = |version: &str, file: &std::path::Path| {
        let (version, file) = (version.to_string(), file.display().to_string());
        program("web", move |s| {
            s.command = format!("/bin/sleep 100{version}");
            s.startsecs = Some(0);
            s.rollout = Some(corral_proto::resource::RolloutSpec {
                max_unavailable: Some(corral_proto::HostCount::Count(1)),
                auto_revert: None,
            });
            s.health = Some(corral_proto::resource::HealthSpec {
                exec: Some(corral_proto::resource::ExecCheck {
                    command: vec!["/usr/bin/test".into(), "-e".into(), file],
                }),
                period_secs: Some(1),
                failure_threshold: Some(1),
                restart: Some(false),
                ..Default::default()
            });
        })
    };
    api.apply(&web("1", &ok), false).await?;
    wait_for(&api, WAIT, |s| converged(s) && s.programs[0].ready == 2).await?;
    let h2_before = fleet.nodes[1].pids().await?["web"];

    api.apply(&web("2", &later), false).await?;
    let status = wait_for(&api, WAIT, |s| {
        s.programs[0].updated == 1 && s.programs[0].problems.iter().any(|p| p.contains("unhealthy"))
    })
    .await?;
    assert_eq!(
        status.programs[0].ready, 0,
        "ready counts hosts at the new generation: {status:#?}"
    );
    // The updated host runs version 2 (RUNNING) but is not healthy: the rollout waits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let p = api.program("web").await?;
    let view = p.status.expect("status");
    assert_eq!(view.updated, 1, "{view:#?}");
    assert_eq!(
        fleet.nodes[1].pids().await?["web"],
        h2_before,
        "the next host was updated"
    );
    let sick = view
        .hosts
        .iter()
        .find(|h| h.observed_generation == 2)
        .and_then(|h| h.processes.first())
        .expect("the updated host's process");
    assert_eq!((sick.state.as_str(), sick.health.as_str()), ("RUNNING", "unhealthy"));
    assert!(sick.health_error.contains("/usr/bin/test: exit status 1"), "{sick:#?}");

    // Once it is healthy the rollout goes on and finishes.
    std::fs::write(&later, "")?;
    wait_for(&api, WAIT, |s| {
        converged(s) && s.programs[0].updated == 2 && s.programs[0].ready == 2
    })
    .await?;
    assert_ne!(fleet.nodes[1].pids().await?["web"].0, h2_before.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logs_are_read_through_the_agents_of_every_host_and_followed() -> anyhow::Result<()> {
    let mut fleet = Fleet::start().await?;
    let api = fleet.api()?;
    api.apply(
        &program("talker", |s| {
            s.command = "/bin/sh -c 'echo hello-out; echo hello-err >&2; i=0; while :; do i=$((i+1)); echo tick-$i; sleep 0.2; done'".into();
            s.startsecs = Some(0);
        }),
        false,
    )
    .await?;
    api.apply(
        &program("quiet", |s| {
            s.command = "/bin/sh -c 'echo secret-of-quiet; exec sleep 1000'".into();
            s.startsecs = Some(0);
            s.redirect_stderr = Some(true);
        }),
        false,
    )
    .await?;
    // Rotated every second or two (1 KiB, one backup): a follower loses no line.
    api.apply(
        &program("rotor", |s| {
            s.command = r#"/usr/bin/python3 -u -c "import time; [(print(f'{i:05d}'), time.sleep(0.01)) for i in range(1000000)]""#.into();
            s.startsecs = Some(0);
            s.stdout_logfile_maxbytes = Some(corral_proto::ByteSize(1024));
            s.stdout_logfile_backups = Some(1);
        }),
        false,
    )
    .await?;
    // Not UTF-8, and a character cut by the byte count: supervisord cannot answer those.
    api.apply(
        &program("accents", |s| {
            s.command = r#"/bin/sh -c 'printf "caf\303\251\n\377bin\n"; exec sleep 1000'"#.into();
            s.startsecs = Some(0);
        }),
        false,
    )
    .await?;
    wait_for(&api, WAIT, |s| converged(s) && s.programs.iter().all(|p| p.ready == 2)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let query = |bytes, stream| corral_proto::logs::LogsQuery {
        bytes,
        stream,
        ..Default::default()
    };
    use corral_proto::logs::LogStream::{Stderr, Stdout};

    // Every host, each process named; read with a read-only token.
    let reader = fleet
        .controller
        .as_ref()
        .context("controller")?
        .api_as(corral_tests::corral::READ_ONLY_TOKEN)?;
    let logs = reader.logs("talker", &query(4096, Stdout)).await?;
    assert!(logs.errors.is_empty(), "{logs:#?}");
    let hosts: Vec<&str> = logs.chunks.iter().map(|c| c.host.as_str()).collect();
    assert_eq!(hosts, ["h1", "h2"]);
    for c in &logs.chunks {
        assert_eq!(c.process, "talker");
        assert!(c.text.starts_with("hello-out\ntick-1\n"), "{c:#?}");
        assert!(!c.text.contains("secret-of-quiet") && !c.text.contains("hello-err"));
    }
    let err = api.logs("talker", &query(4096, Stderr)).await?;
    assert!(err.chunks.iter().all(|c| c.text == "hello-err\n"), "{err:#?}");
    // No stderr log of its own: said, not an empty answer.
    let merged = api.logs("quiet", &query(4096, Stderr)).await?;
    assert!(
        merged.chunks.is_empty() && merged.errors.values().all(|e| e.contains("redirect_stderr")),
        "{merged:#?}"
    );
    assert_eq!(merged.errors.len(), 2, "{merged:#?}");
    // The last bytes only.
    let tail = api.logs("talker", &query(8, Stdout)).await?;
    assert!(tail.chunks.iter().all(|c| c.text.len() <= 8 && c.overflow), "{tail:#?}");

    // Following: from where the last answer ended, only what is new.
    let following = |answer: &corral_proto::logs::Logs| {
        let mut next = query(4096, Stdout);
        for c in &answer.chunks {
            next.offsets
                .entry(c.host.clone())
                .or_default()
                .insert(c.process.clone(), c.offset);
            next.files
                .entry(c.host.clone())
                .or_default()
                .insert(c.process.clone(), c.file.clone());
        }
        next
    };
    let next = following(&logs);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let more = api.logs("talker", &next).await?;
    for c in &more.chunks {
        assert!(c.text.starts_with("tick-") && !c.text.contains("hello-out"), "{c:#?}");
        assert!(c.offset > next.offsets[&c.host]["talker"]);
    }

    // Bytes that are not UTF-8 are shown as U+FFFD; a cut character is left out.
    let accents = api.logs("accents", &query(4096, Stdout)).await?;
    assert!(accents.errors.is_empty(), "{accents:#?}");
    assert!(
        accents.chunks.iter().all(|c| c.text == "café\n\u{FFFD}bin\n"),
        "{accents:#?}"
    );
    let cut = api.logs("accents", &query(7, Stdout)).await?;
    assert!(
        cut.errors.is_empty() && cut.chunks.iter().all(|c| c.text == "\n\u{FFFD}bin\n"),
        "{cut:#?}"
    );

    // A log cleared (or rotated) under a follower: what it holds now is shown, the gap said.
    let next = following(&more);
    let socket = format!("unix://{}", fleet.nodes[0].sd.socket.display());
    let cleared = std::process::Command::new("supervisorctl")
        .args(["-s", &socket, "clear", "talker"])
        .output()?;
    anyhow::ensure!(cleared.status.success(), "supervisorctl clear: {cleared:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_clear = api.logs("talker", &next).await?;
    let h1 = after_clear
        .chunks
        .iter()
        .find(|c| c.host == "h1")
        .context("h1 answers")?;
    assert!(
        h1.offset < next.offsets["h1"]["talker"] && h1.overflow && h1.text.starts_with("tick-"),
        "{h1:#?}"
    );
    // Cleared again, and grown past the follower's offset before it asks: still told apart
    // by its file, and read from its start (by size alone, its first lines were lost).
    let next = following(&after_clear);
    let was = next.offsets["h1"]["talker"];
    let h1_sd = fleet.nodes[0].sd.client().await?;
    let path = h1_sd.get_process_info("talker").await?.stdout_logfile;
    let cleared = std::process::Command::new("supervisorctl")
        .args(["-s", &socket, "clear", "talker"])
        .output()?;
    anyhow::ensure!(cleared.status.success(), "supervisorctl clear: {cleared:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&path).map_or(0, |m| m.len()) <= u64::try_from(was)? + 20 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the log never grew back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let regrown = api.logs("talker", &next).await?;
    let h1 = regrown.chunks.iter().find(|c| c.host == "h1").context("h1 answers")?;
    let on_disk = std::fs::read_to_string(&path)?;
    assert_eq!(
        h1.text.lines().next(),
        on_disk.lines().next(),
        "the new file from its start: {h1:#?}"
    );
    assert!(h1.overflow, "the gap is said: {h1:#?}");

    // Following a log rotated under it, every second or so: the rest of the old file is read
    // from its .1, so the numbers it prints come without a gap.
    let mut next = query(4096, Stdout);
    next.host = Some("h1".into());
    let (mut seen, mut rotations) = (String::new(), 0);
    let mut last_offset = 0;
    let until = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < until {
        let answer = api.logs("rotor", &next).await?;
        let c = answer.chunks.first().context("rotor answers")?;
        if c.offset < last_offset {
            rotations += 1;
        }
        last_offset = c.offset;
        seen.push_str(&c.text);
        next = corral_proto::logs::LogsQuery {
            host: Some("h1".into()),
            ..following(&answer)
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let numbers: Vec<u64> = seen.lines().filter_map(|l| l.parse().ok()).collect();
    let gaps: Vec<(u64, u64)> = numbers
        .windows(2)
        .filter(|w| w[1] != w[0] + 1)
        .map(|w| (w[0], w[1]))
        .collect();
    assert!(rotations >= 2, "{rotations} rotations in 6 s");
    assert!(
        gaps.is_empty() && numbers.len() > 200,
        "gaps {gaps:?} in {} lines",
        numbers.len()
    );

    // A host first read while following (it was away) gets --tail, not everything.
    let mut late = following(&regrown);
    late.bytes = corral_proto::logs::MAX_LOG_BYTES;
    late.tail = Some(8);
    late.offsets.remove("h2");
    late.files.remove("h2");
    let late = api.logs("talker", &late).await?;
    let h2 = late.chunks.iter().find(|c| c.host == "h2").context("h2 answers")?;
    assert!(h2.text.len() <= 8 && h2.overflow, "{h2:#?}");

    // Where the agent cannot open the file, supervisord's tail: what it can send...
    let piece = corral_agent::logs::tail_through_supervisord(&h1_sd, "talker", Stdout, 0, 100).await;
    assert!(
        piece
            .as_ref()
            .is_ok_and(|p| corral_agent::logs::text_of(&p.data).contains("tick-")),
        "{:?}",
        piece.map(|p| p.offset)
    );
    // ...and bytes that are not UTF-8, which it answers with HTTP 500 (said, not hidden).
    let refused = corral_agent::logs::tail_through_supervisord(&h1_sd, "accents", Stdout, 0, 4096)
        .await
        .map(|p| p.offset);
    assert!(refused.as_ref().is_err_and(|e| e.contains("HTTP 500")), "{refused:?}");

    // One host, and a host it does not run on.
    let one = api
        .logs(
            "talker",
            &corral_proto::logs::LogsQuery {
                host: Some("h2".into()),
                ..query(100, Stdout)
            },
        )
        .await?;
    assert_eq!(one.chunks.iter().map(|c| c.host.as_str()).collect::<Vec<_>>(), ["h2"]);
    let nowhere = api
        .logs(
            "talker",
            &corral_proto::logs::LogsQuery {
                host: Some("h9".into()),
                ..query(100, Stdout)
            },
        )
        .await;
    assert_eq!(nowhere.map(|_| ()).map_err(|e| e.status()), Err(Some(404)));
    let bad = api.logs("talker", &query(0, Stdout)).await;
    assert_eq!(bad.map(|_| ()).map_err(|e| e.status()), Err(Some(422)));

    // A host whose agent is away (no liveness lease) is named at once; the others still
    // answer.
    if let Some(a) = fleet.nodes[1].agent.take() {
        a.stop().await;
    }
    let partial = api.logs("talker", &query(100, Stdout)).await?;
    assert_eq!(
        partial.chunks.iter().map(|c| c.host.as_str()).collect::<Vec<_>>(),
        ["h1"]
    );
    assert!(
        partial.errors["h2"].contains("its agent is not connected to etcd"),
        "{partial:#?}"
    );
    // An agent killed with -9 holds its lease until it expires: it is asked, and named when
    // it does not answer.
    let keys = corral_proto::keys::Keys::default();
    let mut c = fleet.etcd.client().await?;
    let lease = c.lease_grant(30, None).await?.id();
    c.put(
        keys.alive("h2"),
        "",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await?;
    let silent = api.logs("talker", &query(100, Stdout)).await?;
    assert!(silent.errors["h2"].contains("no answer from its agent"), "{silent:#?}");
    assert!(silent.chunks.iter().any(|c| c.host == "h1"), "{silent:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_generation_that_fails_is_reverted_automatically_and_the_revert_is_not_reverted() -> anyhow::Result<()> {
    let fleet = Fleet::start().await?;
    let api = fleet.api()?;
    let web = |command: &str| {
        let command = command.to_string();
        program("web", move |s| {
            s.command = command;
            s.startsecs = Some(1);
            s.startretries = Some(0);
            s.rollout = Some(corral_proto::resource::RolloutSpec {
                max_unavailable: Some(corral_proto::HostCount::Count(1)),
                auto_revert: Some(true),
            });
        })
    };
    api.apply(&web("/bin/sleep 1001"), false).await?;
    wait_for(&api, WAIT, |s| converged(s) && s.programs[0].ready == 2).await?;
    // The controller records generation 1 as good once it runs, ready, everywhere.
    recorded_good(&api, "web", 1).await?;
    let before: Vec<(i64, ProcessState)> =
        vec![fleet.nodes[0].pids().await?["web"], fleet.nodes[1].pids().await?["web"]];

    // Generation 2 exits at once: FATAL on the first host, reverted to generation 1's spec
    // as generation 3; the second host never gets generation 2.
    api.apply(&web("/bin/sh -c 'echo broken >&2; exit 3'"), false).await?;
    let status = wait_for(&api, WAIT, |s| {
        converged(s) && s.programs[0].generation == 3 && s.programs[0].ready == 2
    })
    .await?;
    assert_eq!(status.programs[0].updated, 2);
    let p = api.program("web").await?;
    assert_eq!(p.spec.command, "/bin/sleep 1001", "generation 1's spec is back");
    let r = p
        .status
        .as_ref()
        .and_then(|s| s.reverted.clone())
        .context("no revert recorded")?;
    assert_eq!((r.failed_generation, r.to_generation, r.revert_generation), (2, 1, 3));
    let updated_first = r.host.clone();
    let untouched = if updated_first == "h1" { 1 } else { 0 };
    assert_eq!(
        fleet.nodes[untouched].pids().await?["web"],
        before[untouched],
        "a host that never got the failed generation was restarted"
    );
    // The revert is in the history, by the controller.
    let history = api.history(None, Some("web"), 10).await?;
    assert!(
        history
            .iter()
            .any(|e| e.verb == "auto-revert" && e.who == "controller" && e.generation == Some(3)),
        "{history:#?}"
    );
    // `apply --wait` of a generation that gets reverted says so and fails.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("web.yaml");
    std::fs::write(
        &file,
        "apiVersion: corral.dev/v1\nkind: Program\nmetadata: {name: web}\nspec:\n  selector: {}\n  command: /bin/false\n  startsecs: 1\n  startretries: 0\n  rollout: {max_unavailable: 1, auto_revert: true}\n",
    )?;
    let o = std::process::Command::new(super::deploy::built_binary("corral"))
        .args(["--server", &fleet.controller.as_ref().context("controller")?.url])
        .args([
            "--token",
            corral_tests::corral::TOKEN,
            "apply",
            "--wait",
            "--timeout-secs",
            "60",
            "-f",
        ])
        .arg(&file)
        .output()?;
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("generation 4 failed on") && out.contains("reverted automatically to the spec of generation 3"),
        "{out}"
    );
    wait_for(&api, WAIT, |s| {
        converged(s) && s.programs[0].generation == 5 && s.programs[0].ready == 2
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_generation_whose_health_check_fails_is_reverted_while_its_process_is_restarted() -> anyhow::Result<()> {
    let fleet = Fleet::start().await?;
    let api = fleet.api()?;
    let dir = tempfile::tempdir()?;
    let (ok, missing) = (dir.path().join("ok"), dir.path().join("missing"));
    std::fs::write(&ok, "")?;
    // restart: true (the default): the failing process is restarted, and that counts as the
    // generation failing there.
    let web = |file: &std::path::Path| {
        let file = file.display().to_string();
        program("web", move |s| {
            s.command = format!("/bin/sleep 100{}", file.len());
            s.startsecs = Some(0);
            s.rollout = Some(corral_proto::resource::RolloutSpec {
                max_unavailable: Some(corral_proto::HostCount::Count(1)),
                auto_revert: Some(true),
            });
            s.health = Some(corral_proto::resource::HealthSpec {
                exec: Some(corral_proto::resource::ExecCheck {
                    command: vec!["/usr/bin/test".into(), "-e".into(), file],
                }),
                period_secs: Some(1),
                failure_threshold: Some(1),
                ..Default::default()
            });
        })
    };
    api.apply(&web(&ok), false).await?;
    wait_for(&api, WAIT, |s| converged(s) && s.programs[0].ready == 2).await?;
    recorded_good(&api, "web", 1).await?;
    let pids = (fleet.nodes[0].pids().await?["web"], fleet.nodes[1].pids().await?["web"]);
    api.apply(&web(&missing), false).await?;
    wait_for(&api, WAIT, |s| {
        converged(s) && s.programs[0].generation == 3 && s.programs[0].ready == 2
    })
    .await?;
    let p = api.program("web").await?;
    let r = p
        .status
        .as_ref()
        .and_then(|s| s.reverted.clone())
        .context("no revert")?;
    assert_eq!((r.failed_generation, r.to_generation, r.revert_generation), (2, 1, 3));
    let untouched = if r.host == "h1" { (1, pids.1) } else { (0, pids.0) };
    assert_eq!(fleet.nodes[untouched.0].pids().await?["web"], untouched.1);
    Ok(())
}

/// Waits until the controller records `generation` of `program` as the last that ran, ready,
/// everywhere (what an automatic revert goes back to).
async fn recorded_good(api: &ApiClient, program: &str, generation: u64) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + WAIT;
    while api.program(program).await?.status.and_then(|s| s.last_good) != Some(generation) {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "generation {generation} of {program} never recorded as good"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

//! Hosts isolated from each other in etcd: with etcd's authentication on and the roles
//! `corral-controller access` makes, Corral works under least privilege, and one host's
//! credentials can neither read nor write another host's keys, nor any spec.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use corral_tests::corral::{Agent, Controller, binary, converged, wait_for};
use corral_tests::etcd::Etcd;
use corral_tests::supervisord::{Options, Supervisord};
use etcd_client::{Client, ConnectOptions, GetOptions};

const ROOT_PASSWORD: &str = "root-secret";

/// `corral-controller access ARGS` as etcd's root.
fn access(etcd: &Etcd, dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let root_pw = dir.join("root.pw");
    std::fs::write(&root_pw, ROOT_PASSWORD)?;
    let out = Command::new(binary("corral-controller")?)
        .arg("access")
        .args(args)
        .args([
            "--etcd-endpoints",
            &etcd.endpoint,
            "--etcd-username",
            "root",
            "--etcd-password-file",
        ])
        .arg(&root_pw)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "access {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn login(etcd: &Etcd, user: &str, password_file: &Path) -> anyhow::Result<corral_etcd::EtcdOptions> {
    let password = std::fs::read_to_string(password_file)?.trim().to_string();
    Ok(corral_etcd::EtcdOptions {
        user: Some((user.to_string(), password)),
        ..corral_etcd::EtcdOptions::plain(std::slice::from_ref(&etcd.endpoint))
    })
}

async fn client_as(etcd: &Etcd, user: &str, password_file: &Path) -> anyhow::Result<Client> {
    let password = std::fs::read_to_string(password_file)?.trim().to_string();
    Ok(Client::connect(
        [etcd.endpoint.as_str()],
        Some(ConnectOptions::new().with_user(user, password)),
    )
    .await?)
}

fn denied<T: std::fmt::Debug>(what: &str, r: Result<T, etcd_client::Error>) {
    match r {
        Err(e) => assert!(e.to_string().contains("permission denied"), "{what}: {e}"),
        Ok(v) => panic!("{what} was allowed: {v:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_can_touch_only_its_own_keys_and_corral_works_under_least_privilege() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let dir = tempfile::tempdir()?;
    {
        let mut root = Client::connect([etcd.endpoint.as_str()], None).await?;
        root.user_add("root", ROOT_PASSWORD, None).await?;
        root.user_grant_role("root", "root").await?;
        root.auth_enable().await?;
    }
    let pw = |name: &str| dir.path().join(format!("{name}.pw"));
    let said = access(
        &etcd,
        dir.path(),
        &[
            "controller",
            "--new-password-file",
            pw("controller").to_str().unwrap_or_default(),
        ],
    )?;
    assert!(said.contains("readwrite /corral/*"), "{said}");
    for host in ["h1", "h2"] {
        let said = access(
            &etcd,
            dir.path(),
            &[
                "add-host",
                host,
                "--new-password-file",
                pw(host).to_str().unwrap_or_default(),
            ],
        )?;
        assert!(said.contains(&format!("read /corral/assignments/{host}/*")), "{said}");
    }
    // The generated passwords are the owner's only.
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(pw("h1"))?.permissions());
    assert_eq!(mode & 0o777, 0o600);
    // A host name that is no host name is refused before etcd is touched.
    assert!(access(&etcd, dir.path(), &["add-host", "../h1"]).is_err());

    // Everything works with these identities: placement, two agents, a change of the spec.
    let controller = Controller::start_with(&login(&etcd, "corral-controller", &pw("controller"))?, "c1").await?;
    let (sd1, sd2) = (
        Supervisord::start(Options::default()).await?,
        Supervisord::start(Options::default()).await?,
    );
    let (s1, s2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let _a1 = Agent::start_with(
        "h1",
        &[],
        &login(&etcd, "corral-agent-h1", &pw("h1"))?,
        &sd1,
        s1.path(),
        None,
    );
    let _a2 = Agent::start_with(
        "h2",
        &[],
        &login(&etcd, "corral-agent-h2", &pw("h2"))?,
        &sd2,
        s2.path(),
        None,
    );
    let api = controller.api()?;
    api.apply(&corral_tests::specs::program("web", |_| {}), false).await?;
    wait_for(&api, Duration::from_secs(30), |s| {
        converged(s) && s.programs.len() == 1 && s.programs[0].ready == 2
    })
    .await?;
    api.apply(
        &corral_tests::specs::program("web", |s| s.command = "/bin/sleep 2000".into()),
        false,
    )
    .await?;
    wait_for(&api, Duration::from_secs(30), |s| {
        converged(s) && s.programs[0].generation == 2 && s.programs[0].ready == 2
    })
    .await?;
    assert!(sd2.client().await?.get_process_info("web").await?.pid > 0);
    // Logs are asked and answered under least privilege too.
    let logs = api
        .logs(
            "web",
            &corral_proto::logs::LogsQuery {
                bytes: 100,
                ..Default::default()
            },
        )
        .await?;
    assert!(logs.errors.is_empty(), "{logs:#?}");
    assert_eq!(
        logs.chunks.iter().map(|c| c.host.as_str()).collect::<Vec<_>>(),
        ["h1", "h2"]
    );

    // h1's credentials, as a thief would use them.
    let mut h1 = client_as(&etcd, "corral-agent-h1", &pw("h1")).await?;
    let forged = br#"{"program":"evil"}"#.to_vec();
    denied(
        "write another host's assignment",
        h1.put("/corral/assignments/h2/evil", forged.clone(), None).await,
    );
    denied(
        "write its own assignment",
        h1.put("/corral/assignments/h1/evil", forged.clone(), None).await,
    );
    denied(
        "write a program",
        h1.put("/corral/programs/evil", forged.clone(), None).await,
    );
    denied(
        "write a group",
        h1.put("/corral/groups/evil", forged.clone(), None).await,
    );
    denied(
        "write another host's status",
        h1.put("/corral/status/h2/web", forged.clone(), None).await,
    );
    denied(
        "write another host's record",
        h1.put("/corral/hosts/h2", forged.clone(), None).await,
    );
    denied(
        "write another host's liveness",
        h1.put("/corral/alive/h2", "", None).await,
    );
    denied(
        "delete another host's keys",
        h1.delete(
            "/corral/status/h2/",
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await,
    );
    denied(
        "read another host's assignments",
        h1.get("/corral/assignments/h2/", Some(GetOptions::new().with_prefix()))
            .await,
    );
    denied(
        "read the specs",
        h1.get("/corral/programs/", Some(GetOptions::new().with_prefix())).await,
    );
    denied("write outside the prefix", h1.put("/other", "x", None).await);
    denied(
        "ask another host for logs",
        h1.put("/corral/logs/h2/requests/x", br#"{"program":"web"}"#.to_vec(), None)
            .await,
    );
    denied(
        "ask itself for logs (only the controller may)",
        h1.put("/corral/logs/h1/requests/x", br#"{"program":"web"}"#.to_vec(), None)
            .await,
    );
    denied(
        "answer for another host",
        h1.put("/corral/logs/h2/replies/x", "{}", None).await,
    );
    // What it may do: read its own assignments, write its own status.
    let own = h1
        .get("/corral/assignments/h1/", Some(GetOptions::new().with_prefix()))
        .await?;
    assert_eq!(own.kvs().len(), 1);
    h1.put("/corral/status/h1/probe", "{}", None).await?;
    h1.delete("/corral/status/h1/probe", None).await?;

    // Removing a host's access ends its logins.
    access(&etcd, dir.path(), &["remove-host", "h2"])?;
    assert!(client_as(&etcd, "corral-agent-h2", &pw("h2")).await.is_err());
    // Removing again is harmless.
    access(&etcd, dir.path(), &["remove-host", "h2"])?;
    Ok(())
}

/// An agent trusts only what the controller could have written: assignments written straight
/// into etcd that do not parse, do not validate, sit under another program's name or name an
/// injecting native group are refused and reported, never written or run; a good one beside
/// them runs, and a refused one mended runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_refuses_and_reports_assignments_the_controller_could_not_have_written() -> anyhow::Result<()> {
    use corral_proto::fleet::{Assignment, NativeGroup, ProgramHostStatus};
    let etcd = Etcd::start().await?;
    let mut c = Client::connect([etcd.endpoint.as_str()], None).await?;
    let assignment = |name: &str, f: &dyn Fn(&mut corral_proto::resource::ProgramSpec)| Assignment {
        program: corral_tests::specs::program_object(name, |s| f(s)),
        native_group: None,
    };
    let json = |a: &Assignment| serde_json::to_vec(a).unwrap_or_default();
    let put = |name: &str| format!("/corral/assignments/h1/{name}");
    c.put(put("good"), json(&assignment("good", &|_| {})), None).await?;
    c.put(put("garbage"), "{not json", None).await?;
    c.put(
        put("inject"),
        json(&assignment("inject", &|s| {
            s.command = "/bin/sleep 1\n[program:evil]\ncommand=/bin/touch /tmp/corral-pwned".into()
        })),
        None,
    )
    .await?;
    c.put(put("web"), json(&assignment("other", &|_| {})), None).await?;
    let mut grouped = assignment("grouped", &|_| {});
    grouped.native_group = Some(NativeGroup {
        name: "g]\n[program:evil2".into(),
        priority: None,
    });
    c.put(put("grouped"), json(&grouped), None).await?;

    let sd = Supervisord::start(Options::default()).await?;
    let state = tempfile::tempdir()?;
    let _agent = Agent::start("h1", &[], &etcd.endpoints(), &sd, state.path());
    let status = |c: &mut Client| {
        let mut c = c.clone();
        async move {
            let r = c
                .get("/corral/status/h1/", Some(GetOptions::new().with_prefix()))
                .await?;
            let mut out = std::collections::BTreeMap::new();
            for kv in r.kvs() {
                let s: ProgramHostStatus = serde_json::from_slice(kv.value())?;
                out.insert(s.program.clone(), s);
            }
            anyhow::Ok(out)
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let s = status(&mut c).await?;
        if s.len() == 5 && s.get("good").is_some_and(|g| g.ready) {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "never reported: {s:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (name, why) in [
        ("garbage", "does not parse"),
        ("inject", "line break"),
        ("web", "holds program \"other\""),
        ("grouped", "native group"),
    ] {
        let error = seen[name].error.clone().unwrap_or_default();
        assert!(
            error.starts_with("assignment refused") && error.contains(why),
            "{name}: {error}"
        );
        assert!(!seen[name].ready);
    }
    // Nothing of them on disk or in supervisord.
    let mut files: Vec<String> = std::fs::read_dir(&sd.conf_dir)?
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["corral-program-good.conf"],
        "conf dir holds only the good program"
    );
    let names: Vec<String> = sd
        .client()
        .await?
        .get_all_process_info()
        .await?
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["good"]);
    assert!(!Path::new("/tmp/corral-pwned").exists());

    // Mended, it runs.
    c.put(put("garbage"), json(&assignment("garbage", &|_| {})), None)
        .await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(&mut c).await?;
        if s.get("garbage").is_some_and(|g| g.ready && g.error.is_none()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the mended one never ran: {s:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// With etcd authenticating by client certificate (deploy/etcd's production setup),
/// `access add-host --issue-cert-ca` makes the host's role and user and issues its certificate
/// in one command; Corral runs on those identities, and a host's certificate opens only its
/// own keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn access_issues_certificates_a_host_logs_in_with_and_they_open_only_its_keys() -> anyhow::Result<()> {
    let etcd = corral_tests::etcd::SecureEtcd::start().await?;
    let d = etcd.dir.path();
    let out = tempfile::tempdir()?;
    let issue = |args: &[&str], prefix: &str| -> anyhow::Result<std::process::Output> {
        Ok(Command::new(binary("corral-controller")?)
            .arg("access")
            .args(args)
            .arg("--issue-cert-ca")
            .arg(d.join("ca.pem"))
            .arg("--issue-cert-ca-key")
            .arg(d.join("ca.key"))
            .arg("--cert-out")
            .arg(out.path().join(prefix))
            .args(["--etcd-endpoints", &etcd.endpoint, "--etcd-ca-file"])
            .arg(&etcd.ca)
            .arg("--etcd-cert-file")
            .arg(&etcd.client_cert)
            .arg("--etcd-key-file")
            .arg(&etcd.client_key)
            .output()?)
    };
    for (args, prefix) in [
        (&["controller"][..], "controller"),
        (&["add-host", "web-1"][..], "web-1"),
        (&["add-host", "web-2"][..], "web-2"),
    ] {
        let o = issue(args, prefix)?;
        let said = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{said}{}", String::from_utf8_lossy(&o.stderr));
        assert!(said.contains("client certificate"), "{said}");
        let key = out.path().join(format!("{prefix}.key"));
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key)?.permissions());
        assert_eq!(mode & 0o777, 0o600, "{prefix}.key");
    }
    // An issued certificate is never overwritten.
    let again = issue(&["add-host", "web-1"], "web-1")?;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));

    let as_user = |prefix: &str| corral_etcd::EtcdOptions {
        ca_file: Some(etcd.ca.clone()),
        cert_file: Some(out.path().join(format!("{prefix}.pem"))),
        key_file: Some(out.path().join(format!("{prefix}.key"))),
        ..corral_etcd::EtcdOptions::plain(std::slice::from_ref(&etcd.endpoint))
    };
    // Corral runs on these identities.
    let controller = Controller::start_with(&as_user("controller"), "c1").await?;
    let sd = Supervisord::start(Options::default()).await?;
    let state = tempfile::tempdir()?;
    let _agent = Agent::start_with("web-1", &[], &as_user("web-1"), &sd, state.path(), None);
    let api = controller.api()?;
    api.apply(&corral_tests::specs::program("web", |_| {}), false).await?;
    wait_for(&api, Duration::from_secs(30), |s| {
        converged(s) && s.programs.len() == 1 && s.programs[0].ready == 1
    })
    .await?;

    // web-1's certificate: its own keys only.
    let (mut web1, _) = corral_etcd::connect_from(&as_user("web-1").probing("/corral/assignments/web-1/"), 0).await?;
    web1.get("/corral/assignments/web-1/", Some(GetOptions::new().with_prefix()))
        .await?;
    denied(
        "write web-2's host key",
        web1.put("/corral/hosts/web-2", "{}", None).await,
    );
    denied(
        "write web-2's assignment",
        web1.put("/corral/assignments/web-2/evil", "{}", None).await,
    );
    denied("write a spec", web1.put("/corral/programs/evil", "{}", None).await);
    denied(
        "read web-2's assignments",
        web1.get("/corral/assignments/web-2/", Some(GetOptions::new().with_prefix()))
            .await,
    );
    Ok(())
}

//! The `corral` binary against a live Corral (real etcd, supervisord, controller, agent),
//! and `corral dev` from nothing to Ctrl-C.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use corral_agent::supervisor::ProcessState;
use corral_tests::corral::{Agent, Controller, TOKEN};
use corral_tests::etcd::Etcd;
use corral_tests::supervisord::{Options, Supervisord};

fn corral(server: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["--server", server, "--token", TOKEN])
        .args(args)
        .output()
        .expect("corral runs")
}

/// `corral` with `input` on its stdin.
fn corral_stdin(server: &str, args: &[&str], input: &[u8]) -> anyhow::Result<Output> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["--server", server, "--token", TOKEN])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    {
        use std::io::Write as _;
        child.stdin.take().context("stdin")?.write_all(input)?;
    }
    Ok(child.wait_with_output()?)
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
        .display()
        .to_string()
}

/// Runs `corral status` until it exits 0.
async fn until_converged(server: &str) {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let o = corral(server, &["status"]);
        if o.status.success() {
            return;
        }
        assert!(Instant::now() < deadline, "never converged: {:?}", text(&o));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_drives_a_live_corral() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let controller = Controller::start(&etcd.endpoints(), "c1").await?;
    let sd = Supervisord::start(Options::default()).await?;
    let state = tempfile::tempdir()?;
    let _agent = Agent::start("h1", &[("role", "app")], &etcd.endpoints(), &sd, state.path());
    let s = controller.url.as_str();
    let examples = repo("deploy/examples");

    // Invalid input: every error, nothing stored.
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: corral.dev/v1\nkind: Program\nmetadata: {name: bad}\nspec:\n  selector: {}\n  command: \"/bin/true ; id\"\n  numprocs: 0\n",
    )?;
    let o = corral(s, &["apply", "-f", &bad.display().to_string()]);
    assert_eq!(o.status.code(), Some(2), "invalid input");
    let (_, err) = text(&o);
    assert!(err.contains("spec.command") && err.contains("spec.numprocs"), "{err}");

    let o = corral(s, &["apply", "-f", &examples]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(text(&o).0.contains("program/gunicorn created"));
    until_converged(s).await;

    let (out, _) = text(&corral(s, &["get", "programs"]));
    assert!(out.contains("celery-worker") && out.contains("gunicorn"), "{out}");
    // gunicorn has a health check (1 of 1 processes passing); the others have none.
    let gunicorn = out
        .lines()
        .find(|l| l.trim_start().starts_with("gunicorn"))
        .unwrap_or_default();
    assert!(out.contains("HEALTHY") && gunicorn.contains(" 1/1 "), "{out}");
    let o = corral(s, &["get", "programs", "gunicorn", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(v["status"]["ready"], 1);
    let (out, _) = text(&corral(s, &["describe", "program", "celery-worker"]));
    assert!(out.contains(" celery-worker_01 ") && out.contains("RUNNING"), "{out}");
    // Environment values are secrets until asked for.
    assert!(
        !out.contains("redis://127.0.0.1:6379/0") && out.contains("CELERY_BROKER_URL: (hidden)"),
        "{out}"
    );
    let (out, _) = text(&corral(s, &["describe", "program", "celery-worker", "--show-secrets"]));
    assert!(out.contains("redis://127.0.0.1:6379/0"), "{out}");
    let (out, _) = text(&corral(s, &["get", "hosts"]));
    assert!(
        out.contains("h1") && out.contains("Ready") && out.contains("role=app"),
        "{out}"
    );
    // Hosts: label, select by label, cordon and describe, uncordon.
    let (out, err) = text(&corral(s, &["label", "host", "h1", "tier=gold"]));
    assert!(out.contains("host/h1 labeled: role=app,tier=gold"), "{out}{err}");
    let (out, _) = text(&corral(s, &["get", "hosts", "-l", "tier=gold"]));
    assert!(out.contains("h1"), "{out}");
    let (out, _) = text(&corral(s, &["get", "hosts", "-l", "tier=silver"]));
    assert!(!out.contains("h1"), "{out}");
    let (out, _) = text(&corral(s, &["cordon", "h1"]));
    assert!(out.contains("host/h1 cordoned"), "{out}");
    let (out, _) = text(&corral(s, &["get", "hosts"]));
    assert!(out.contains("Ready,Cordoned"), "{out}");
    let (out, _) = text(&corral(s, &["describe", "host", "h1"]));
    assert!(
        out.contains("Placement:    cordoned") && out.contains("celery-worker_01 RUNNING"),
        "{out}"
    );
    assert!(out.contains("  set by operators: tier=gold"), "{out}");
    assert!(corral(s, &["uncordon", "h1"]).status.success());
    assert!(corral(s, &["label", "host", "h1", "tier-"]).status.success());
    // A removal stays on record: should the agent register tier, it stays hidden.
    let (out, _) = text(&corral(s, &["describe", "host", "h1"]));
    assert!(
        out.contains("Labels:       role=app\n  set by operators: tier-"),
        "{out}"
    );
    let bad = corral(s, &["label", "host", "h1", "tier"]);
    assert_eq!(bad.status.code(), Some(2), "{:?}", text(&bad));
    // A cycle within one file is refused before anything is sent; a typo in depends_on warned.
    let cyc = dir.path().join("cycle.yaml");
    let doc = |name: &str, dep: &str| {
        format!(
            "apiVersion: corral.dev/v1\nkind: Program\nmetadata: {{name: {name}}}\nspec: {{selector: {{}}, command: /bin/sleep 9, depends_on: [{dep}]}}\n"
        )
    };
    std::fs::write(&cyc, format!("{}---\n{}", doc("ping", "pong"), doc("pong", "ping")))?;
    let o = corral(s, &["apply", "-f", &cyc.display().to_string()]);
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
    assert!(text(&o).1.contains("ping -> pong -> ping is a cycle"), "{:?}", text(&o));
    assert_eq!(
        corral(s, &["get", "program", "ping"]).status.code(),
        Some(1),
        "nothing was sent"
    );
    std::fs::write(&cyc, doc("typo", "celery-wroker"))?;
    let o = corral(s, &["apply", "-f", &cyc.display().to_string()]);
    assert!(
        text(&o)
            .1
            .contains("warning: program \"typo\" depends on programs that do not exist: celery-wroker"),
        "{:?}",
        text(&o)
    );
    assert!(corral(s, &["delete", "program", "typo"]).status.success());
    assert_eq!(corral(s, &["label", "host", "h1", "k=1", "k-"]).status.code(), Some(2));
    assert_eq!(corral(s, &["history", "--limit", "0"]).status.code(), Some(2));
    let (out, _) = text(&corral(s, &["history", "h1", "--kind", "host"]));
    assert!(
        out.contains("uncordon") && out.contains("cordon") && out.contains("label"),
        "{out}"
    );

    // diff: nothing, then a change.
    assert_eq!(corral(s, &["diff", "-f", &examples]).status.code(), Some(0));
    let changed = dir.path().join("changed.yaml");
    std::fs::write(
        &changed,
        std::fs::read_to_string(Path::new(&examples).join("myapp.yaml"))?.replace("sleep 30", "sleep 31"),
    )?;
    let o = corral(s, &["diff", "-f", &changed.display().to_string()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o)
            .0
            .contains("+command: /bin/sh -c 'while true; do date; sleep 31; done'"),
        "{:?}",
        text(&o)
    );
    assert!(
        text(&o).0.contains("  processes on each host: restart celery-beat\n"),
        "{:?}",
        text(&o)
    );
    // Scaling names the processes it starts and the ones it leaves alone.
    let scaled = dir.path().join("scaled.yaml");
    std::fs::write(
        &scaled,
        std::fs::read_to_string(Path::new(&examples).join("myapp.yaml"))?.replace("numprocs: 2", "numprocs: 4"),
    )?;
    let o = corral(s, &["diff", "-f", &scaled.display().to_string()]);
    assert!(
        text(&o)
            .0
            .contains("  processes on each host: start celery-worker_02, celery-worker_03; keep celery-worker_00, celery-worker_01\n"),
        "{:?}",
        text(&o)
    );
    // A changed secret shows as changed, never in clear.
    let secret = dir.path().join("secret.yaml");
    let with_password = std::fs::read_to_string(Path::new(&examples).join("myapp.yaml"))?
        .replace("redis://127.0.0.1:6379/0", "redis://:hunter2@db:6379/0");
    std::fs::write(&secret, with_password)?;
    let o = corral(s, &["diff", "-f", &secret.display().to_string()]);
    assert_eq!(o.status.code(), Some(1));
    let (out, _) = text(&o);
    assert!(
        out.contains("+  CELERY_BROKER_URL: (hidden, changed)") && !out.contains("hunter2"),
        "{out}"
    );

    // stop, start, restart a group.
    let client = sd.client().await?;
    assert!(corral(s, &["stop", "celery-beat"]).status.success());
    until_converged(s).await;
    assert_eq!(
        client.get_process_info("celery-beat").await?.state,
        ProcessState::Stopped
    );
    assert!(corral(s, &["start", "celery-beat"]).status.success());
    until_converged(s).await;
    let before = client.get_process_info("gunicorn").await?.pid;
    let o = corral(s, &["restart", "myapp:"]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(text(&o).0.contains("program/celery-worker restarting"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get_process_info("gunicorn").await?.pid == before {
        assert!(Instant::now() < deadline, "gunicorn never restarted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    until_converged(s).await;

    // A program that crashes at once: describe and status say how, with its stderr, and when
    // the crash-loop policy starts it next.
    let crashy = dir.path().join("crashy.yaml");
    std::fs::write(
        &crashy,
        "apiVersion: corral.dev/v1\nkind: Program\nmetadata: {name: crashy}\nspec:\n  selector: {role: app}\n  \
         command: /bin/sh -c 'echo cannot-open-db >&2; exit 4'\n  startsecs: 1\n  startretries: 0\n  \
         crash_loop: {initial_delay_secs: 60}\n",
    )?;
    assert!(
        corral(s, &["apply", "-f", &crashy.display().to_string()])
            .status
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
        let (out, _) = text(&corral(s, &["describe", "program", "crashy"]));
        if out.contains("next start in") {
            break out;
        }
        assert!(Instant::now() < deadline, "never saw crashy waiting: {out}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(out.contains("Failing processes:") && out.contains("FATAL"), "{out}");
    assert!(out.contains("| cannot-open-db"), "{out}");
    let (status, _) = text(&corral(s, &["status"]));
    assert!(status.contains("crashy FATAL"), "{status}");
    // Logs, read by the host's agent: each line with its host and process.
    let (out, err) = text(&corral(s, &["logs", "crashy", "--stderr"]));
    assert!(out.lines().any(|l| l == "h1 crashy | cannot-open-db"), "{out}{err}");
    let (out, _) = text(&corral(s, &["logs", "celery-worker", "--tail", "100"]));
    assert!(
        out.contains("h1 celery-worker_00 | worker 0 ready") && out.contains("h1 celery-worker_01 | worker 1 ready"),
        "{out}"
    );
    // Lines without a time cannot be placed after --since: left out, and said.
    let (out, err) = text(&corral(s, &["logs", "crashy", "--stderr", "--since", "1h"]));
    assert!(out.is_empty() && err.contains("left out (--since)"), "{out}{err}");
    let o = corral(s, &["logs", "crashy", "--since", "1w"]);
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
    let o = corral(s, &["logs", "nosuch"]);
    assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
    // -f prints what there is, then follows until interrupted.
    let mut follow = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["--server", s, "--token", TOKEN, "logs", "crashy", "--stderr", "-f"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = follow.stdout.take().context("stdout")?;
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map(|_| line)
    });
    let first = tokio::time::timeout(Duration::from_secs(10), first).await???;
    assert_eq!(first, "h1 crashy | cannot-open-db\n");
    assert!(follow.try_wait()?.is_none(), "-f ended on its own");
    follow.kill()?;
    follow.wait()?;
    assert!(corral(s, &["delete", "program", "crashy"]).status.success());

    // delete -f removes everything the file declares, from supervisord too.
    assert!(corral(s, &["delete", "-f", &examples]).status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client.get_all_process_info().await?.is_empty() {
        assert!(Instant::now() < deadline, "processes left behind");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Without a token: a one-line error; the controller refused (exit 1).
    let o = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["--server", s, "get", "programs"])
        .env_remove("CORRAL_TOKEN")
        .output()?;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("missing or invalid bearer token"));
    Ok(())
}

/// Starts `corral dev` in `dir` and waits for "ready."; returns it and what it printed.
fn start_dev(dir: &Path, port: u16, token: &str) -> (std::process::Child, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["--token", token, "dev", "--dir"])
        .arg(dir)
        .args(["--apply", &repo("deploy/examples"), "--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("corral dev starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut printed = Vec::new();
    while !printed.iter().any(|l: &String| l.starts_with("ready.")) {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(l) => printed.push(l),
            Err(_) => assert!(Instant::now() < deadline, "corral dev never got ready: {printed:#?}"),
        }
    }
    (child, printed)
}

/// Ctrl-C, then waits for `corral dev` to stop; nothing of `dir` may keep running.
async fn stop_dev(mut child: std::process::Child, dir: &Path) -> anyhow::Result<()> {
    Command::new("kill").args(["-INT", &child.id().to_string()]).status()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait()?.is_none() {
        assert!(Instant::now() < deadline, "corral dev did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = Command::new("pgrep").arg("-f").arg(dir).output()?;
    assert!(
        left.stdout.is_empty(),
        "processes left behind: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corral_dev_runs_the_examples_and_leaves_nothing_behind() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = corral_tests::free_port()?;
    let token = "my-dev-token";
    let (child, printed) = start_dev(dir.path(), port, token);
    // The caller's token is the one in use.
    assert!(
        printed
            .iter()
            .any(|l| l.trim() == format!("export CORRAL_TOKEN={token}")),
        "{printed:#?}"
    );
    let server = format!("http://127.0.0.1:{port}");
    assert!(printed.iter().any(|l| l.contains(&server)), "{printed:#?}");
    let dev = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_corral"))
            .args(["--server", &server, "--token", token])
            .args(args)
            .output()
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let o = dev(&["status"])?;
        if o.status.success() {
            assert!(String::from_utf8_lossy(&o.stdout).contains("Programs: 3 declared, 0 not as declared"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "examples never ran: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The agent's metrics, where dev says they are.
    let url = printed
        .iter()
        .find_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with("http://") && w.ends_with("/metrics"))
        })
        .context("no metrics URL printed")?
        .to_string();
    corral_cli::client::ensure_tls_provider();
    assert!(reqwest::get(&url).await?.text().await?.contains("corral_reconcile"));
    assert!(dev(&["stop", "celery-beat"])?.status.success());
    stop_dev(child, dir.path()).await?;
    // Logs in files are plain text.
    for log in ["agent.log", "controller.log"] {
        let text = std::fs::read_to_string(dir.path().join("logs").join(log))?;
        assert!(!text.is_empty() && !text.contains('\u{1b}'), "{log} has escape codes");
    }

    // Again in the same dir: what the user changed stays as it is.
    let (child, printed) = start_dev(dir.path(), port, token);
    assert!(
        printed.iter().any(|l| l == "program/celery-beat kept as it is"),
        "{printed:#?}"
    );
    let o = dev(&["get", "program", "celery-beat", "-o", "json"])?;
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("\"state\": \"stopped\""),
        "{:?}",
        text(&o)
    );
    stop_dev(child, dir.path()).await
}

/// The CLI's sharp edges, against a live controller (no agent needed): one exit-code table
/// for every verb, names that cannot reach a URL unchecked (in the CLI and again in the API),
/// closed pipes, JSON lists, a server without a scheme, a body past the API's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_names_pipes_and_limits() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let controller = Controller::start(&etcd.endpoints(), "c1").await?;
    let s = controller.url.as_str();
    let dir = tempfile::tempdir()?;
    let path = |name: &str, text: &str| -> anyhow::Result<String> {
        let p = dir.path().join(name);
        std::fs::write(&p, text)?;
        Ok(p.display().to_string())
    };
    let shop = path(
        "shop.yaml",
        "apiVersion: corral.dev/v1\nkind: Program\nmetadata: {name: web}\nspec: {command: /bin/sleep 1000, selector: {role: nowhere}}\n\
         ---\napiVersion: corral.dev/v1\nkind: Group\nmetadata: {name: tmpg}\nspec: {programs: [web]}\n",
    )?;
    // Accepted, with a warning each: a program that runs nowhere, a group naming a program
    // that does not exist; `status` says so too.
    let o = corral(s, &["apply", "-f", &shop]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(
        text(&o)
            .1
            .contains("warning: program \"web\" selects no registered host (selector: role=nowhere)"),
        "{:?}",
        text(&o)
    );
    let lost = path(
        "lost.yaml",
        "apiVersion: corral.dev/v1\nkind: Group\nmetadata: {name: lost}\nspec: {programs: [web, ghost]}\n",
    )?;
    let o = corral(s, &["apply", "-f", &lost]);
    assert!(o.status.success());
    assert!(
        text(&o)
            .1
            .contains("warning: group \"lost\" names programs that do not exist: ghost"),
        "{:?}",
        text(&o)
    );
    let (status, _) = text(&corral(s, &["status"]));
    assert!(
        status.contains("Warnings: 2") && status.contains("ghost") && status.contains("runs nowhere"),
        "{status}"
    );
    assert!(corral(s, &["delete", "group", "lost"]).status.success());

    // 2: invalid input, nothing sent. diff of an invalid file shows no diff.
    let invalid = path(
        "invalid.yaml",
        "apiVersion: corral.dev/v1\nkind: Program\nmetadata: {name: web}\nspec: {command: '/bin/true ; id', selector: {}}\n",
    )?;
    for verb in ["apply", "diff"] {
        let o = corral(s, &[verb, "-f", &invalid]);
        assert_eq!(o.status.code(), Some(2), "{verb}: {:?}", text(&o));
        assert!(o.stdout.is_empty(), "{verb} printed {:?}", text(&o).0);
        assert!(text(&o).1.contains("spec.command"), "{:?}", text(&o));
    }
    // Names that would change the URL are refused by the CLI (2) and never reach the API.
    for args in [
        &["delete", "program", "../groups/tmpg"][..],
        &["get", "program", "web?x=1"],
        &["describe", "program", "a/b"],
        &["stop", "web%2F.."],
    ] {
        let o = corral(s, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {:?}", text(&o));
        assert!(text(&o).1.contains("is not a valid name"), "{args:?}: {:?}", text(&o));
    }
    let o = corral(s, &["get", "groups"]);
    assert!(text(&o).0.contains("tmpg"), "the group survived: {:?}", text(&o));
    // The API refuses them too, whatever a client sends.
    corral_cli::client::ensure_tls_provider();
    let http = reqwest::Client::new();
    for raw in [
        "/v1/programs/..%2Fgroups%2Ftmpg",
        "/v1/groups/TMPG",
        "/v1/programs/web%3Fx%3D1",
    ] {
        let r = http.delete(format!("{s}{raw}")).bearer_auth(TOKEN).send().await?;
        assert_eq!(r.status().as_u16(), 400, "{raw}");
        let body: serde_json::Value = r.json().await?;
        assert!(
            body["details"][0]
                .as_str()
                .unwrap_or_default()
                .contains("metadata.name"),
            "{raw}: {body}"
        );
    }
    assert!(text(&corral(s, &["get", "groups"])).0.contains("tmpg"));

    // 1: the controller refused (not found), with a hint when a group was meant.
    assert_eq!(corral(s, &["get", "program", "nope"]).status.code(), Some(1));
    assert_eq!(corral(s, &["delete", "program", "nope"]).status.code(), Some(1));
    let o = corral(s, &["stop", "tmpg"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("write `tmpg:`"), "{:?}", text(&o));

    // Ten restarts at once all succeed: each is one atomic change on the controller.
    let before = controller.api()?.program("web").await?;
    let restarts: Vec<_> = (0..10)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_corral"))
                .args(["--server", s, "--token", TOKEN, "restart", "web"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    for child in restarts {
        let o = child.wait_with_output()?;
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let after = controller.api()?.program("web").await?;
    assert!(after.metadata.generation > before.metadata.generation);
    assert_ne!(after.spec.restarted_at, before.spec.restarted_at);
    // The API checks an action as it checks a spec.
    let r = http
        .post(format!("{s}/v1/programs/web/action"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"action": "signal", "signal": "NOPE"}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 422);

    // 3: the controller cannot be reached, for every verb.
    let nobody = format!("http://127.0.0.1:{}", corral_tests::free_port()?);
    for args in [
        &["get", "programs"][..],
        &["status"],
        &["apply", "-f", &shop],
        &["diff", "-f", &shop],
        &["delete", "program", "web"],
        &["stop", "web"],
        &["describe", "program", "web"],
        &["version"],
    ] {
        let o = corral(&nobody, args);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {:?}", text(&o));
        assert!(
            text(&o).1.contains("cannot reach the controller"),
            "{args:?}: {:?}",
            text(&o)
        );
    }

    // Versions of both sides; completion scripts that the shell reads.
    let (out, _) = text(&corral(s, &["version"]));
    let v = env!("CARGO_PKG_VERSION");
    assert!(
        out.contains(&format!("client: {v}")) && out.contains(&format!("server: {v}")),
        "{out}"
    );
    let script = dir.path().join("corral.bash");
    std::fs::write(&script, &corral(s, &["completion", "bash"]).stdout)?;
    assert!(Command::new("bash").arg("-n").arg(&script).status()?.success());
    assert!(String::from_utf8_lossy(&corral(s, &["completion", "bash"]).stdout).contains("describe"));
    for shell in ["zsh", "fish"] {
        assert!(!corral(s, &["completion", shell]).stdout.is_empty(), "{shell}");
    }

    // A server without a scheme is plain HTTP; one that is no URL says so (2).
    let bare = s.trim_start_matches("http://");
    assert!(corral(bare, &["get", "programs"]).status.success());
    let o = corral("not a url", &["get", "programs"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("is not the controller's URL"), "{:?}", text(&o));

    // What `get -o json` prints applies as it is.
    let listed = corral(s, &["get", "programs", "-o", "json"]);
    assert!(listed.status.success());
    let o = corral_stdin(s, &["apply", "-f", "-"], &listed.stdout)?;
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(text(&o).0.contains("program/web unchanged"), "{:?}", text(&o));

    // Environment values: hidden by `get -o yaml|json` as by describe and diff, unless
    // --show-secrets; what get printed with them hidden cannot be applied back by mistake.
    let sec = path(
        "sec.yaml",
        "apiVersion: corral.dev/v1\nkind: Program\nmetadata: {name: sec}\nspec: {command: /bin/true, selector: {role: nowhere}, environment: {TOKEN: hunter2}}\n",
    )?;
    assert!(corral(s, &["apply", "-f", &sec]).status.success());
    let (hidden, _) = text(&corral(s, &["get", "program", "sec", "-o", "yaml"]));
    assert!(
        hidden.contains("TOKEN: (hidden)") && !hidden.contains("hunter2"),
        "{hidden}"
    );
    let (shown, _) = text(&corral(s, &["get", "program", "sec", "-o", "yaml", "--show-secrets"]));
    assert!(shown.contains("hunter2"), "{shown}");
    let o = corral_stdin(s, &["apply", "-f", "-"], hidden.as_bytes())?;
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
    assert!(text(&o).1.contains("placeholder"), "{:?}", text(&o));
    let o = corral_stdin(s, &["apply", "-f", "-"], shown.as_bytes())?;
    assert!(
        o.status.success() && text(&o).0.contains("program/sec unchanged"),
        "{:?}",
        text(&o)
    );

    // A reader that closes the pipe ends the CLI quietly, not with a panic.
    for args in [
        &["describe", "program", "web"][..],
        &["get", "programs", "-o", "yaml"],
        &["render", "-f", &shop],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_corral"))
            .args(["--server", s, "--token", TOKEN])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        drop(child.stdout.take());
        let o = child.wait_with_output()?;
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
    }

    // A body past the API's limit: 413, with the limit, as JSON.
    let r = http
        .put(format!("{s}/v1/programs/web"))
        .bearer_auth(TOKEN)
        .body(vec![b' '; 2 << 20])
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 413);
    let body: serde_json::Value = r.json().await?;
    assert!(
        body["error"].as_str().unwrap_or_default().contains("1048576 bytes"),
        "{body}"
    );
    // A file with one object past the object limit is refused by the CLI, naming the limit.
    let huge = path(
        "huge.yaml",
        &format!(
            "apiVersion: corral.dev/v1\nkind: Group\nmetadata: {{name: huge}}\nspec: {{programs: [{}]}}\n",
            (0..8000).map(|i| format!("p{i:05}")).collect::<Vec<_>>().join(", ")
        ),
    )?;
    let o = corral(s, &["apply", "-f", &huge]);
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
    assert!(text(&o).1.contains("65536-byte limit"), "{:?}", text(&o));
    Ok(())
}

//! Secrets at rest: rendered conf files and the agent's state are the owner's only, and a
//! program's environment can come from a file on the host (never stored in etcd), rotated by
//! rewriting the file, refused while others may write it.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use corral_tests::corral::{Agent, Controller, converged, wait_for};
use corral_tests::etcd::Etcd;
use corral_tests::supervisord::{Options, Supervisord};
use etcd_client::GetOptions;

const WAIT: Duration = Duration::from_secs(30);

fn mode(path: &Path) -> anyhow::Result<u32> {
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o7777)
}

fn environ(pid: i64) -> anyhow::Result<Vec<String>> {
    Ok(std::fs::read(format!("/proc/{pid}/environ"))?
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect())
}

async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> anyhow::Result<Option<T>>) -> anyhow::Result<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secrets_stay_on_the_host_in_files_only_root_reads() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let controller = Controller::start(&etcd.endpoints(), "c1").await?;
    let api = controller.api()?;
    let sd = Supervisord::start(Options::default()).await?;
    let state = tempfile::tempdir()?;
    // A state dir an older version made 0755 is made the owner's only.
    let state_dir = state.path().join("agent");
    std::fs::create_dir(&state_dir)?;
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o755))?;
    let _agent = Agent::start("h1", &[], &etcd.endpoints(), &sd, &state_dir);

    let secrets = tempfile::tempdir()?;
    let env_file = secrets.path().join("web.env");
    std::fs::write(&env_file, "# rotated by the vault agent\nTOKEN=s3cret\n")?;
    std::fs::set_permissions(&env_file, std::fs::Permissions::from_mode(0o600))?;
    let web = corral_tests::specs::program("web", |s| {
        s.environment = Some([("MODE".into(), "inline".into())].into());
        s.environment_file = Some(env_file.display().to_string());
    });
    api.apply(&web, false).await?;
    wait_for(&api, WAIT, |s| {
        converged(s) && s.programs.len() == 1 && s.programs[0].ready == 1
    })
    .await?;
    let client = sd.client().await?;
    let pid = client.get_process_info("web").await?.pid;
    let env = environ(pid)?;
    assert!(
        env.contains(&"TOKEN=s3cret".to_string()) && env.contains(&"MODE=inline".to_string()),
        "{env:?}"
    );

    // At rest: the conf file, the state dir and its cache are the owner's only; etcd holds
    // the file's path, never its values.
    let conf = sd.conf_dir.join("corral-program-web.conf");
    assert_eq!(mode(&conf)?, 0o600);
    assert_eq!(mode(&state_dir)?, 0o700);
    assert_eq!(mode(&state_dir.join("assignments.json"))?, 0o600);
    let all = etcd
        .client()
        .await?
        .get("/", Some(GetOptions::new().with_prefix()))
        .await?;
    assert!(
        all.kvs()
            .iter()
            .all(|kv| !String::from_utf8_lossy(kv.value()).contains("s3cret"))
    );
    // A managed file someone opened up is closed again.
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644))?;
    until("the conf file to be private again", async || {
        Ok((mode(&conf)? == 0o600).then_some(()))
    })
    .await?;

    // Rotated: the program restarts with the new value.
    std::fs::write(&env_file, "TOKEN=n3w\n")?;
    let new_pid = until("a restart with the new token", async || {
        let p = client.get_process_info("web").await?.pid;
        Ok((p > 0 && p != pid && environ(p)?.contains(&"TOKEN=n3w".to_string())).then_some(p))
    })
    .await?;

    // Others may write it: refused and reported; the program keeps running as it was.
    std::fs::write(&env_file, "TOKEN=evil\n")?;
    std::fs::set_permissions(&env_file, std::fs::Permissions::from_mode(0o666))?;
    let status = wait_for(&api, WAIT, |s| {
        s.programs[0]
            .problems
            .iter()
            .any(|e| e.contains("writable by its group or others") && e.contains("last good contents"))
    })
    .await?;
    assert_eq!(status.programs[0].ready, 0, "a host with a problem is not ready");
    assert_eq!(client.get_process_info("web").await?.pid, new_pid);
    assert!(environ(new_pid)?.contains(&"TOKEN=n3w".to_string()));

    // Closed again: applied, and the problem gone.
    std::fs::set_permissions(&env_file, std::fs::Permissions::from_mode(0o600))?;
    wait_for(&api, WAIT, |s| converged(s) && s.programs[0].ready == 1).await?;
    let pid = client.get_process_info("web").await?.pid;
    assert!(environ(pid)?.contains(&"TOKEN=evil".to_string()));
    Ok(())
}

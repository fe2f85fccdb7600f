//! `corral-bench`: Corral's figures, measured on real etcd and real supervisord (the 1000-host
//! fan-out and the idle-writes figures replace each host's supervisord with the in-memory
//! STAND-IN of `standin.rs`, the only place one is used). Prints each figure next to its target.

mod standin;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use corral_agent::supervisor::{ClientConfig, Endpoint};
use corral_cli::client::ApiClient;
use corral_proto::fleet::{Assignment, ProgramHostStatus};
use corral_proto::keys::Keys;
use corral_proto::resource::{ProgramSpec, Resource};
use corral_tests::corral::{Controller, agent_config};
use corral_tests::etcd::Etcd;
use corral_tests::specs;
use corral_tests::supervisord::{Options, Supervisord};
use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "corral-bench", about = "Corral's benchmarks")]
struct Args {
    /// Which figures to measure.
    #[arg(value_enum, default_value = "all")]
    what: What,
    /// Simulated hosts for the fan-out figure.
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    /// Samples per figure-1 latency on one host (10 hosts take a tenth as many).
    #[arg(long, default_value_t = 200)]
    reps: usize,
    /// Seconds to observe idle CPU and idle etcd writes.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// Print only the figures (used for the figures `all` runs, each in its own process).
    #[arg(long, hide = true)]
    quiet_header: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum What {
    All,
    Latency,
    Drift,
    Footprint,
    Fanout,
    /// The controller alone with 1000 hosts x 50 programs.
    Scale,
    IdleWrites,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<u64>().unwrap_or(0))
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), {:.1} GiB RAM, Linux {}",
        mem as f64 / (1 << 20) as f64,
        kernel.trim()
    )
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// Set when any figure misses its target: the run then exits non-zero.
static MISSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn line(figure: &str, value: String, target: &str, ok: Option<bool>) {
    let verdict = match ok {
        Some(true) => "meets",
        Some(false) => {
            MISSED.store(true, std::sync::atomic::Ordering::Relaxed);
            "MISSES"
        }
        None => "",
    };
    println!("{figure:<72} {value:<34} target {target:<22} {verdict}");
}

/// The shared test program, living longer than any run and with supervisord's own startsecs.
fn program(name: &str, f: impl FnOnce(&mut ProgramSpec)) -> Resource {
    specs::program(name, |s| {
        s.command = "/bin/sleep 100000".into();
        s.startsecs = None;
        f(s);
    })
}

/// A program as a real fleet has them: a command with arguments, an environment, log
/// settings, a rollout policy (about 1 kB of spec), changed by `version`.
fn realistic(name: &str, version: &str) -> Resource {
    program(name, |s| {
        s.command = format!("/opt/{name}/venv/bin/python -m {name}.server --port 8000 --workers 4 --release {version}");
        s.directory = Some(format!("/opt/{name}"));
        s.environment = Some(
            [
                ("APP_ENV", "production"),
                ("DATABASE_URL", "postgres://app@db.internal:5432/app"),
                ("REDIS_URL", "redis://cache.internal:6379/0"),
                ("LOG_LEVEL", "info"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        );
        s.stopasgroup = Some(true);
        s.stopwaitsecs = Some(30);
        s.startsecs = Some(0);
        s.stdout_logfile_maxbytes = Some(corral_proto::ByteSize(50 << 20));
        s.rollout = Some(corral_proto::RolloutSpec {
            max_unavailable: Some(corral_proto::HostCount::Percent(100)),
            auto_revert: None,
        });
    })
}

/// Starts the real agent code for one host, as the binary does (2 s resync).
fn spawn_agent(
    host: &str,
    etcd: &[String],
    supervisor: ClientConfig,
    conf_dir: &Path,
    state_dir: &Path,
    watch_conf_dir: bool,
) -> CancellationToken {
    let mut cfg = agent_config(
        host,
        &corral_etcd::EtcdOptions::plain(etcd),
        supervisor,
        conf_dir,
        state_dir,
    );
    // The binary's timings, not the test kit's quick ones.
    cfg.etcd.lease_ttl = 10;
    cfg.resync = Duration::from_secs(2);
    cfg.reload_every = Duration::from_secs(3600);
    cfg.watch_conf_dir = watch_conf_dir;
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        if let Err(e) = corral_agent::run::run(cfg, token).await {
            eprintln!("agent failed to start: {e}");
        }
    });
    stop
}

/// The status reports for `program`, by host.
async fn reports(etcd: &mut etcd_client::Client, program: &str) -> anyhow::Result<BTreeMap<String, ProgramHostStatus>> {
    let keys = Keys::default();
    let r = etcd
        .get(keys.all_status(), Some(GetOptions::new().with_prefix()))
        .await?;
    let mut out = BTreeMap::new();
    for kv in r.kvs() {
        if let Some((h, p)) = keys.host_and_program(kv.key_str()?)
            && p == program
        {
            out.insert(h.to_string(), serde_json::from_slice(kv.value())?);
        }
    }
    Ok(out)
}

/// What a timed watch waits for under each (host, program).
#[derive(Clone, Copy, Debug)]
enum Mark {
    /// The agent reports the program at this generation (or later) and ready.
    Ready(u64),
    /// The controller wrote the program's assignment at this generation (or later).
    Written(u64),
}

/// Writes for some programs as etcd delivers them: a watch opened before the apply, so each
/// (host, program) is timed when its key is written, not when a poll happens to find it.
struct SlotWatch {
    stream: etcd_client::WatchStream,
    programs: BTreeSet<String>,
    is_status: bool,
}

impl SlotWatch {
    /// Watches the agents' status reports.
    async fn reports(etcd: &mut etcd_client::Client, programs: &[impl AsRef<str>]) -> anyhow::Result<SlotWatch> {
        SlotWatch::open(etcd, Keys::default().all_status(), programs, true).await
    }

    /// Watches the controller's assignments.
    async fn assignments(etcd: &mut etcd_client::Client, programs: &[impl AsRef<str>]) -> anyhow::Result<SlotWatch> {
        SlotWatch::open(etcd, Keys::default().all_assignments(), programs, false).await
    }

    async fn open(
        etcd: &mut etcd_client::Client,
        prefix: String,
        programs: &[impl AsRef<str>],
        is_status: bool,
    ) -> anyhow::Result<SlotWatch> {
        let stream = corral_etcd::watch(etcd, prefix, Some(WatchOptions::new().with_prefix())).await?;
        Ok(SlotWatch {
            stream,
            programs: programs.iter().map(|p| p.as_ref().to_string()).collect(),
            is_status,
        })
    }

    /// Waits until `hosts` reach `mark` for every program; returns when each (host, program)
    /// did, measured from `t0`.
    async fn wait(mut self, mark: Mark, hosts: usize, t0: Instant, timeout: Duration) -> anyhow::Result<Vec<f64>> {
        let keys = Keys::default();
        let want = hosts * self.programs.len();
        let mut done: BTreeMap<(String, String), f64> = BTreeMap::new();
        while done.len() < want {
            let late = || {
                anyhow::anyhow!(
                    "{:?}: only {}/{want} {mark:?} after {timeout:?}",
                    self.programs,
                    done.len()
                )
            };
            let left = timeout.checked_sub(t0.elapsed()).ok_or_else(late)?;
            let resp = tokio::time::timeout(left, self.stream.message())
                .await
                .map_err(|_| late())??
                .ok_or_else(|| anyhow::anyhow!("the watch ended"))?;
            for kv in resp
                .events()
                .iter()
                .filter(|e| e.event_type() == EventType::Put)
                .filter_map(|e| e.kv())
            {
                let Some((h, p)) = keys.host_and_program(kv.key_str()?) else {
                    continue;
                };
                if !self.programs.contains(p) {
                    continue;
                }
                let reached = match (mark, self.is_status) {
                    (Mark::Ready(generation), true) => {
                        let status: ProgramHostStatus = serde_json::from_slice(kv.value())?;
                        status.observed_generation >= generation && status.ready
                    }
                    (Mark::Written(generation), false) => {
                        let a: Assignment = serde_json::from_slice(kv.value())?;
                        a.program.metadata.generation >= generation
                    }
                    _ => anyhow::bail!("{mark:?} is not on this watch"),
                };
                if reached {
                    done.entry((h.to_string(), p.to_string()))
                        .or_insert_with(|| t0.elapsed().as_secs_f64());
                }
            }
        }
        // Dropping the stream ends the watch.
        Ok(done.into_values().collect())
    }
}

async fn wait_gone(etcd: &mut etcd_client::Client, program: &str) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while !reports(etcd, program).await?.is_empty() {
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(60), "{program} never went away");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Prints a latency figure: p50/p99 of `samples` (seconds), and the overhead above
/// `own_ms` (what the processes themselves take) against `target_ms` when there is one.
fn latency_line(what: &str, samples: Vec<f64>, own_ms: f64, target_ms: Option<f64>) {
    let s = sorted(samples);
    let ms: Vec<f64> = s.iter().map(|x| x * 1000.0 - own_ms).collect();
    let (p50, p99) = (pct(&ms, 50.0), pct(&ms, 99.0));
    line(
        &format!("{what} ({} samples)", s.len()),
        format!(
            "p50 {:.0} ms, p99 {:.0} ms",
            pct(&s, 50.0) * 1000.0,
            pct(&s, 99.0) * 1000.0
        ),
        "",
        None,
    );
    line(
        "   overhead above the processes' own start/stop time",
        format!("p50 {p50:.0} ms, p99 {p99:.0} ms"),
        &target_ms.map_or("(reported)".to_string(), |t| format!("p99 <= {t:.0} ms")),
        target_ms.map(|t| p99 <= t),
    );
}

/// Prints p50/p99 of `samples` (seconds) against a p99 target.
fn p99_line(what: &str, samples: Vec<f64>, target_ms: f64) {
    let s = sorted(samples);
    let (p50, p99) = (pct(&s, 50.0) * 1e3, pct(&s, 99.0) * 1e3);
    line(
        what,
        format!("p50 {p50:.0} ms, p99 {p99:.0} ms"),
        &format!("p99 <= {target_ms:.0} ms"),
        Some(p99 <= target_ms),
    );
}

/// The latest of some times.
fn last(times: Vec<f64>) -> f64 {
    times.into_iter().fold(0.0, f64::max)
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Figure 1: what a user feels on real supervisords. Creating a program until it is RUNNING
/// and reported; changing three running programs at once until all run the new spec (each
/// is stopped, removed and added again); deleting three running programs until supervisord
/// no longer has them. Targets hold for one host.
async fn latency(hosts: usize, reps: usize) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let controller = Controller::start(&etcd.endpoints(), "bench").await?;
    let api = controller.api()?;
    let mut sds = Vec::new();
    let mut stops = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..hosts {
        let sd = Supervisord::start(Options::default()).await?;
        let state = tempfile::tempdir()?;
        stops.push(spawn_agent(
            &format!("h{i}"),
            &etcd.endpoints(),
            ClientConfig::new(Endpoint::Unix(sd.socket.clone())),
            &sd.conf_dir,
            state.path(),
            true,
        ));
        sds.push(sd);
        dirs.push(state);
    }
    let one = hosts == 1;
    let mut client = etcd.client().await?;
    // Every host at once: the figure is the agent's work, not a paced rollout.
    let unpaced = |s: &mut ProgramSpec| {
        s.rollout = Some(corral_proto::RolloutSpec {
            max_unavailable: Some(corral_proto::HostCount::Percent(100)),
            auto_revert: None,
        })
    };

    for startsecs in [0i64, 1] {
        let mut samples = Vec::new();
        for rep in 0..reps {
            let name = format!("lat-{startsecs}-{rep}");
            let ready = SlotWatch::reports(&mut client, std::slice::from_ref(&name)).await?;
            api.apply(
                &program(&name, |s| {
                    s.startsecs = Some(startsecs);
                    unpaced(s);
                }),
                false,
            )
            .await?;
            let t0 = Instant::now();
            samples.push(last(
                ready.wait(Mark::Ready(1), hosts, t0, Duration::from_secs(60)).await?,
            ));
            api.delete(corral_proto::Kind::Program, &name, false).await?;
            wait_gone(&mut client, &name).await?;
        }
        latency_line(
            &format!("1a. create -> RUNNING, {hosts} host(s), startsecs={startsecs}"),
            samples,
            startsecs as f64 * 1000.0,
            one.then_some(50.0),
        );
    }

    // 1b. Three running programs changed at once (a new command each).
    let three = names("chg", 3);
    let ready = SlotWatch::reports(&mut client, &three).await?;
    for n in &three {
        api.apply(
            &program(n, |s| {
                s.startsecs = Some(0);
                unpaced(s);
            }),
            false,
        )
        .await?;
    }
    ready
        .wait(Mark::Ready(1), hosts, Instant::now(), Duration::from_secs(60))
        .await?;
    let mut samples = Vec::new();
    for rep in 0..reps {
        let ready = SlotWatch::reports(&mut client, &three).await?;
        let t0 = Instant::now();
        for n in &three {
            api.apply(
                &program(n, |s| {
                    s.startsecs = Some(0);
                    s.command = format!("/bin/sleep {}", 200_000 + rep);
                    unpaced(s);
                }),
                false,
            )
            .await?;
        }
        samples.push(last(
            ready
                .wait(Mark::Ready(rep as u64 + 2), hosts, t0, Duration::from_secs(60))
                .await?,
        ));
    }
    // `sleep` exits at once on SIGTERM and startsecs is 0: the processes' own time is ~0.
    latency_line(
        &format!("1b. change 3 running programs -> all RUNNING again, {hosts} host(s)"),
        samples,
        0.0,
        one.then_some(100.0),
    );
    for n in &three {
        api.delete(corral_proto::Kind::Program, n, false).await?;
        wait_gone(&mut client, n).await?;
    }

    // 1c. Three running programs deleted at once, until no supervisord has them.
    let clients = futures_util::future::try_join_all(sds.iter().map(|sd| sd.client())).await?;
    let mut samples = Vec::new();
    for rep in 0..reps {
        let three = names(&format!("del{rep}"), 3);
        let ready = SlotWatch::reports(&mut client, &three).await?;
        for n in &three {
            api.apply(
                &program(n, |s| {
                    s.startsecs = Some(0);
                    unpaced(s);
                }),
                false,
            )
            .await?;
        }
        ready
            .wait(Mark::Ready(1), hosts, Instant::now(), Duration::from_secs(60))
            .await?;
        let t0 = Instant::now();
        for n in &three {
            api.delete(corral_proto::Kind::Program, n, false).await?;
        }
        loop {
            let mut left = false;
            for c in &clients {
                left |= c.get_all_process_info().await?.iter().any(|p| three.contains(&p.group));
            }
            if !left {
                break;
            }
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(60), "{three:?} never went away");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        samples.push(t0.elapsed().as_secs_f64());
        for n in &three {
            wait_gone(&mut client, n).await?;
        }
    }
    latency_line(
        &format!("1c. delete 3 running programs -> gone from supervisord, {hosts} host(s)"),
        samples,
        0.0,
        one.then_some(100.0),
    );

    // 1d. A change rolled out with the default pace (25% of the hosts a batch, each batch
    // waiting for the last to report ready), on every host.
    if hosts > 1 {
        let name = "rolled".to_string();
        let ready = SlotWatch::reports(&mut client, std::slice::from_ref(&name)).await?;
        api.apply(&program(&name, |s| s.startsecs = Some(0)), false).await?;
        ready
            .wait(Mark::Ready(1), hosts, Instant::now(), Duration::from_secs(60))
            .await?;
        let mut worst: f64 = 0.0;
        for rep in 0..5u64 {
            let ready = SlotWatch::reports(&mut client, std::slice::from_ref(&name)).await?;
            let t0 = Instant::now();
            api.apply(
                &program(&name, |s| {
                    s.startsecs = Some(0);
                    s.command = format!("/bin/sleep {}", 300_000 + rep);
                }),
                false,
            )
            .await?;
            worst = worst.max(last(
                ready
                    .wait(Mark::Ready(rep + 2), hosts, t0, Duration::from_secs(60))
                    .await?,
            ));
        }
        line(
            &format!("1d. change rolled out with the default pace to {hosts} hosts (worst of 5)"),
            format!("{worst:.2} s"),
            "<= 5 s",
            Some(worst <= 5.0),
        );
    }
    for s in stops {
        s.cancel();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

/// CPU time this thread has used, in nanoseconds (`CLOCK_THREAD_CPUTIME_ID`, exact; the
/// kernel's schedstat counters only move at scheduler ticks).
fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

fn assignments(n: usize) -> BTreeMap<String, Assignment> {
    (0..n)
        .map(|i| {
            let name = format!("p{i:03}");
            let a = specs::assignment(&name, 1, |s| s.command = "/bin/sleep 100000".into());
            (name, a)
        })
        .collect()
}

/// The pause before each measured pass of figure 2a.
const PASS_GAP: Duration = Duration::from_millis(50);

/// Figure 2a: CPU time of one pass with 100 programs and nothing to do (one thread, so the
/// whole pass, I/O included, is on the measured thread).
fn drift(programs: usize, passes: usize) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let sd = Supervisord::start(Options::default()).await?;
        let state = tempfile::tempdir()?;
        // As the agent runs it: the conf dir watched, so a quiet pass trusts its last reading.
        let mut conf = corral_agent::confdir::ConfDir::new(&sd.conf_dir);
        conf.watch(|| {})?;
        let mut r = corral_agent::reconcile::Reconciler::new("bench", sd.client().await?, conf, state.path().into())?;
        let desired = corral_agent::plan::desired(&assignments(programs), "bench");
        let t0 = Instant::now();
        loop {
            let report = r.pass(&desired).await?;
            if report.statuses.values().all(|s| s.ready) {
                break;
            }
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(120),
                "{programs} programs never all ran"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut cpu = Vec::new();
        let mut wall = Vec::new();
        // Resync passes come seconds apart, not back to back; a pause before each one keeps
        // the measurement to what a pass costs when it runs (back to back, supervisord is
        // still busy with the previous answer and each pass pays for more wake-ups).
        for _ in 0..passes {
            tokio::time::sleep(PASS_GAP).await;
            let (c0, w0) = (thread_cpu_ns(), Instant::now());
            let report = r.pass(&desired).await?;
            cpu.push((thread_cpu_ns() - c0) as f64 / 1e6);
            wall.push(w0.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(
                report.corrections.is_empty(),
                "a pass with nothing to do acted: {:?}",
                report.corrections
            );
        }
        // Where the time goes: the one XML-RPC call a quiet pass makes.
        let client = sd.client().await?;
        let mut rpc = Vec::new();
        for _ in 0..passes {
            tokio::time::sleep(PASS_GAP).await;
            let c0 = thread_cpu_ns();
            client.get_all_process_info().await?;
            rpc.push((thread_cpu_ns() - c0) as f64 / 1e6);
        }
        let rpc = sorted(rpc);
        let (cpu, wall) = (sorted(cpu), sorted(wall));
        let p50 = pct(&cpu, 50.0);
        line(
            &format!("2. drift check: one pass, {programs} programs, nothing to do"),
            format!("CPU p50 {p50:.2} ms, p99 {:.2} ms", pct(&cpu, 99.0)),
            "<= 2 ms per pass",
            Some(p50 <= 2.0),
        );
        line(
            "   of which getAllProcessInfo (HTTP + XML decoding)",
            format!("CPU p50 {:.2} ms", pct(&rpc, 50.0)),
            "",
            None,
        );
        line(
            "   (wall time of that pass, supervisord answering)",
            format!("p50 {:.2} ms, p99 {:.2} ms", pct(&wall, 50.0), pct(&wall, 99.0)),
            "",
            None,
        );
        Ok(())
    })
}

fn proc_stat(pid: u32) -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((ticks, rss_kb))
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let p = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(
        p.exists(),
        "{} not found: build the workspace binaries first (scripts/bench does)",
        p.display()
    );
    Ok(p)
}

/// Starts the real controller binary against `etcd_endpoint` (its token file in `dir`) and
/// waits until its API answers. Killed when the child is dropped.
async fn spawn_controller(etcd_endpoint: &str, dir: &Path) -> anyhow::Result<(tokio::process::Child, ApiClient)> {
    std::fs::write(dir.join("tokens"), "bench-token bench admin\n")?;
    std::fs::set_permissions(dir.join("tokens"), std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let port = corral_tests::free_port()?;
    let child = tokio::process::Command::new(sibling("corral-controller")?)
        .args([
            "--etcd-endpoints",
            etcd_endpoint,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--token-file",
        ])
        .arg(dir.join("tokens"))
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let api = ApiClient::new(&format!("http://127.0.0.1:{port}"), Some("bench-token".into()))?;
    let t0 = Instant::now();
    while api.status().await.is_err() {
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(20), "controller never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((child, api))
}

/// Figures 2b and 3: the real binaries, as processes, with 100 programs.
async fn footprint(programs: usize, idle: Duration) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let sd = Supervisord::start(Options::default()).await?;
    let dir = tempfile::tempdir()?;
    let (mut controller, api) = spawn_controller(&etcd.endpoint, dir.path()).await?;
    let metrics_port = corral_tests::free_port()?;
    let mut agent = tokio::process::Command::new(sibling("corral-agent")?)
        .args([
            "--etcd-endpoints",
            &etcd.endpoint,
            "--host",
            "bench",
            "--supervisor-url",
            &sd.unix_url(),
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
            "--conf-dir",
        ])
        .arg(&sd.conf_dir)
        .arg("--state-dir")
        .arg(dir.path().join("agent"))
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    for (_, a) in assignments(programs) {
        api.apply(&Resource::Program(a.program), false).await?;
    }
    let t0 = Instant::now();
    loop {
        let s = api.status().await?;
        if s.programs.len() == programs && s.programs.iter().all(|p| p.ready == 1) {
            break;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(180),
            "the {programs} programs never all ran"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (agent_pid, controller_pid) = (
        agent.id().context("agent pid")?,
        controller.id().context("controller pid")?,
    );
    let metrics = format!("http://127.0.0.1:{metrics_port}/metrics");
    let passes = || async {
        let text = corral_tests::corral::scrape(&metrics).await?;
        anyhow::Ok(corral_tests::corral::counter_sum(&text, "corral_reconcile_total"))
    };
    let p0 = passes().await?;
    let (t_start, _) = proc_stat(agent_pid)?;
    let w0 = Instant::now();
    tokio::time::sleep(idle).await;
    let (t_end, agent_rss) = proc_stat(agent_pid)?;
    let idle_passes = passes().await? - p0;
    let (_, controller_rss) = proc_stat(controller_pid)?;
    let tck = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    let cpu_s = (t_end - t_start) as f64 / tck;
    line(
        &format!(
            "2. agent idle CPU over {}s ({programs} programs, 2 s resync)",
            idle.as_secs()
        ),
        format!(
            "{:.2}% of one core ({cpu_s:.2} s, {idle_passes:.0} passes)",
            100.0 * cpu_s / w0.elapsed().as_secs_f64()
        ),
        "(reported)",
        None,
    );
    line(
        &format!("3. agent RSS with {programs} programs"),
        format!("{:.1} MB", agent_rss as f64 / 1024.0),
        "<= 15 MB",
        Some(agent_rss <= 15 * 1024),
    );
    line(
        &format!("3. controller RSS with {programs} programs"),
        format!("{:.1} MB", controller_rss as f64 / 1024.0),
        "(reported)",
        None,
    );
    let _ = agent.kill().await;
    let _ = controller.kill().await;
    Ok(())
}

/// A fleet of simulated hosts: the real agent code against STAND-IN supervisords.
struct Sim {
    etcd: Etcd,
    /// The real controller binary, in its own process as in production (in the bench's
    /// process it would share two cores' worth of scheduler with a thousand agents).
    controller: tokio::process::Child,
    api: ApiClient,
    standins: Vec<standin::StandIn>,
    stops: Vec<CancellationToken>,
    _dirs: Vec<tempfile::TempDir>,
}

/// Where the simulated hosts keep their conf dirs and agent state: memory (`/dev/shm`) where
/// the machine has it. A fleet has a disk per host; a thousand agents writing and syncing
/// their files on this machine's one disk would measure that disk's queue, not Corral (etcd,
/// shared by the fleet in reality too, stays on disk).
fn host_disks() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if tempfile::tempdir_in(&shm).is_ok() {
        shm
    } else {
        std::env::temp_dir()
    }
}

async fn simulate(hosts: usize, dir: &Path) -> anyhow::Result<Sim> {
    let etcd = Etcd::start().await?;
    let (controller, api) = spawn_controller(&etcd.endpoint, dir).await?;
    let pids = Arc::new(AtomicI64::new(1000));
    let mut standins = Vec::new();
    let mut stops = Vec::new();
    let mut dirs = Vec::new();
    let disks = host_disks();
    println!("   (simulated hosts' files in {})", disks.display());
    for i in 0..hosts {
        let dir = tempfile::tempdir_in(&disks)?;
        std::fs::create_dir_all(dir.path().join("conf.d"))?;
        let s = standin::StandIn::new(dir.path().join("conf.d"), pids.clone());
        let url = s.clone().serve().await?;
        stops.push(spawn_agent(
            &format!("h-{i:04}"),
            &etcd.endpoints(),
            ClientConfig::new(Endpoint::parse(&url)?),
            &dir.path().join("conf.d"),
            &dir.path().join("state"),
            false,
        ));
        standins.push(s);
        dirs.push(dir);
    }
    let t0 = Instant::now();
    loop {
        let hs = api.hosts().await?;
        if hs.iter().filter(|h| h.status.as_ref().is_some_and(|s| s.ready)).count() == hosts {
            break;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(120),
            "only {} of {hosts} hosts registered",
            hs.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(Sim {
        etcd,
        controller,
        api,
        standins,
        stops,
        _dirs: dirs,
    })
}

/// Figure 4: one change to 1000 hosts, and a change to one host.
async fn fanout(hosts: usize) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;
    let mut sim = simulate(hosts, dir.path()).await?;
    println!(
        "   ({hosts} simulated hosts registered in {:.1} s)",
        t0.elapsed().as_secs_f64()
    );
    let mut client = sim.etcd.client().await?;
    let ready = SlotWatch::reports(&mut client, &["everywhere".to_string()]).await?;
    sim.api.apply(&program("everywhere", |_| {}), false).await?;
    let first = Instant::now();
    ready
        .wait(Mark::Ready(1), hosts, first, Duration::from_secs(300))
        .await?;
    // Three changes of the running program, all hosts at once (the figure is the fan-out,
    // not a paced rollout): p99 over every host of every change.
    const CHANGES: u64 = 3;
    let mut each = Vec::new();
    let mut written_all = Vec::new();
    for change in 0..CHANGES {
        let generation = 2 + change;
        let ready = SlotWatch::reports(&mut client, &["everywhere".to_string()]).await?;
        let written = SlotWatch::assignments(&mut client, &["everywhere"]).await?;
        // Timed from the user's apply, not from its answer.
        let t0 = Instant::now();
        sim.api
            .apply(
                &program("everywhere", |s| {
                    s.command = format!("/bin/sleep {}", 200000 + generation);
                    s.rollout = Some(corral_proto::RolloutSpec {
                        max_unavailable: Some(corral_proto::HostCount::Percent(100)),
                        auto_revert: None,
                    });
                }),
                false,
            )
            .await?;
        let (written, ready) = tokio::try_join!(
            written.wait(Mark::Written(generation), hosts, t0, Duration::from_secs(300)),
            ready.wait(Mark::Ready(generation), hosts, t0, Duration::from_secs(300))
        )?;
        written_all.push(last(written));
        each.extend(ready);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    line(
        &format!("4. one spec change to {hosts} hosts, written to etcd (all; worst of {CHANGES})"),
        format!("{:.0} ms", last(written_all) * 1e3),
        "(reported; 4c has the target)",
        None,
    );
    let each = sorted(each);
    let p99 = pct(&each, 99.0);
    line(
        &format!(
            "4. fan-out: one spec change to {hosts} hosts, applied and reported ({} samples)",
            each.len()
        ),
        format!(
            "p50 {:.0} ms, p99 {:.0} ms, all {:.0} ms",
            pct(&each, 50.0) * 1e3,
            p99 * 1e3,
            each.last().copied().unwrap_or(0.0) * 1e3
        ),
        "p99 <= 1000 ms",
        Some(p99 <= 1.0),
    );
    // The same with the default rollout (25% at a time, each batch waiting for the last).
    let ready = SlotWatch::reports(&mut client, &["everywhere".to_string()]).await?;
    let t0 = Instant::now();
    sim.api
        .apply(
            &program("everywhere", |s| s.command = "/bin/sleep 300000".into()),
            false,
        )
        .await?;
    let done = last(
        ready
            .wait(Mark::Ready(2 + CHANGES), hosts, t0, Duration::from_secs(300))
            .await?,
    );
    line(
        &format!("4. rollout with defaults (25% a batch) to {hosts} healthy hosts"),
        format!("{:.1} s", done),
        "<= 60 s",
        Some(done <= 60.0),
    );
    // A change that targets one host: only that host's agent sees an assignment change and
    // re-reads its config (reloadConfig is the only trace an agent leaves when it acts).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before: Vec<usize> = sim.standins.iter().map(|s| s.reloads.load(Ordering::Relaxed)).collect();
    let target = format!("h-{:04}", hosts / 2);
    let ready = SlotWatch::reports(&mut client, &["solo".to_string()]).await?;
    sim.api
        .apply(
            &program("solo", |s| {
                s.selector = None;
                s.hosts = Some(vec![target.clone()]);
            }),
            false,
        )
        .await?;
    ready
        .wait(Mark::Ready(1), 1, Instant::now(), Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let woke: BTreeSet<usize> = sim
        .standins
        .iter()
        .enumerate()
        .filter(|(i, s)| s.reloads.load(Ordering::Relaxed) > before[*i])
        .map(|(i, _)| i)
        .collect();
    line(
        "4. agents that acted on a change targeting one host",
        format!("{} of {hosts}", woke.len()),
        "only that one",
        Some(woke.len() == 1 && woke.contains(&(hosts / 2))),
    );

    for s in &sim.stops {
        s.cancel();
    }
    // Before etcd goes: a controller that loses etcd says so at length.
    let _ = sim.controller.kill().await;
    Ok(())
}

async fn etcd_counters(endpoint: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    corral_cli::client::ensure_tls_provider();
    let text = reqwest::get(format!("{endpoint}/metrics")).await?.text().await?;
    let mut out = BTreeMap::new();
    for name in [
        "etcd_mvcc_put_total",
        "etcd_mvcc_delete_total",
        "etcd_mvcc_txn_total",
        "etcd_server_proposals_committed_total",
    ] {
        let v = text
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        out.insert(name.to_string(), v);
    }
    Ok(out)
}

/// Figure 4c: the controller alone at fleet scale (no agents competing for the CPU): 1000
/// registered hosts, 50 realistic programs on each (50,000 assignments) placed, then one
/// program changed everywhere; its RSS and etcd's database size.
async fn controller_scale(hosts: usize, programs: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let etcd = Etcd::start().await?;
    let (mut controller, api) = spawn_controller(&etcd.endpoint, dir.path()).await?;
    // Hosts as agents register them (host record and liveness), without the agents.
    let mut client = etcd.client().await?;
    let keys = Keys::default();
    let lease = client.lease_grant(600, None).await?.id();
    for i in 0..hosts {
        let name = format!("h-{i:04}");
        let host = corral_proto::Host::new(
            corral_proto::Metadata {
                name: name.clone(),
                ..Default::default()
            },
            Default::default(),
        );
        client.put(keys.host(&name), serde_json::to_vec(&host)?, None).await?;
        client
            .put(
                keys.alive(&name),
                "",
                Some(etcd_client::PutOptions::new().with_lease(lease)),
            )
            .await?;
    }
    let names: Vec<String> = (0..programs).map(|i| format!("svc-{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let written = SlotWatch::assignments(&mut client, &refs).await?;
    let t0 = Instant::now();
    for n in &names {
        api.apply(&realistic(n, "v1"), false).await?;
    }
    let placed = last(
        written
            .wait(Mark::Written(1), hosts, t0, Duration::from_secs(600))
            .await?,
    );
    line(
        &format!(
            "4c. {programs} programs x {hosts} hosts ({} assignments) applied and written",
            programs * hosts
        ),
        format!("{placed:.1} s"),
        "(reported)",
        None,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut samples = Vec::new();
    for rep in 0..20 {
        let written = SlotWatch::assignments(&mut client, &[refs[rep % programs]]).await?;
        let t0 = Instant::now();
        api.apply(&realistic(&names[rep % programs], &format!("v{}", rep + 2)), false)
            .await?;
        samples.push(last(
            written
                .wait(Mark::Written(2), hosts, t0, Duration::from_secs(120))
                .await?,
        ));
    }
    p99_line(
        &format!(
            "4c. one program changed on {hosts} hosts, among {} assignments, written (20 changes)",
            programs * hosts
        ),
        samples,
        200.0,
    );
    if let Some(pid) = controller.id() {
        let (_, rss) = proc_stat(pid)?;
        line(
            &format!("4c. controller RSS with {} assignments", programs * hosts),
            format!("{:.1} MB", rss as f64 / 1024.0),
            "<= 150 MB",
            Some(rss <= 150 * 1024),
        );
    }
    // What `corral rollout status` and `apply --wait` ask every second: one program's status,
    // with every host's agent reporting on all its programs (a report per assignment).
    let mut puts = Vec::with_capacity(128);
    for i in 0..hosts {
        let host = format!("h-{i:04}");
        for n in &names {
            let report = ProgramHostStatus {
                host: host.clone(),
                program: n.clone(),
                observed_generation: 2,
                desired_state: corral_proto::resource::DesiredState::Running,
                processes: vec![corral_proto::fleet::ProcessStatus {
                    name: n.clone(),
                    state: "RUNNING".into(),
                    pid: 4242,
                    started_at: 1_790_000_000,
                    ..Default::default()
                }],
                ready: true,
                ..Default::default()
            };
            puts.push(etcd_client::TxnOp::put(
                keys.status(&host, n),
                serde_json::to_vec(&report)?,
                None,
            ));
            if puts.len() == 128 {
                client
                    .txn(etcd_client::Txn::new().and_then(std::mem::take(&mut puts)))
                    .await?;
            }
        }
    }
    if !puts.is_empty() {
        client.txn(etcd_client::Txn::new().and_then(puts)).await?;
    }
    let mut samples = Vec::new();
    for rep in 0..100 {
        let t0 = Instant::now();
        let p = api.program(&names[rep % programs]).await?;
        samples.push(t0.elapsed().as_secs_f64());
        let desired = p.status.map_or(0, |s| s.desired);
        anyhow::ensure!(
            desired == hosts,
            "status of {}: {desired} hosts, not {hosts}",
            names[rep % programs]
        );
    }
    p99_line(
        &format!(
            "4c. one program's status (rollout status), {} reports stored (100 reads)",
            programs * hosts
        ),
        samples,
        150.0,
    );
    let t0 = Instant::now();
    let all = api.programs().await?;
    line(
        &format!(
            "4c. every program's status (get programs), {} reports",
            programs * hosts
        ),
        format!("{:.0} ms ({} programs)", t0.elapsed().as_secs_f64() * 1e3, all.len()),
        "(reported)",
        None,
    );
    apply_file(&api, dir.path(), hosts, 2000).await?;
    let status = client.status().await?;
    line(
        "4c. etcd database size",
        format!("{:.1} MB", status.db_size() as f64 / 1e6),
        "(reported)",
        None,
    );
    let _ = controller.kill().await;
    Ok(())
}

/// Figure 4d: `corral apply -f` (the real CLI binary) of a file of `docs` realistic programs,
/// each on one host, as a fleet's repository of specs is: created, changed, and unchanged.
async fn apply_file(api: &ApiClient, dir: &Path, hosts: usize, docs: usize) -> anyhow::Result<()> {
    let file = dir.join("fleet.yaml");
    let write = |version: &str| -> anyhow::Result<()> {
        let mut text = String::new();
        for i in 0..docs {
            let mut r = realistic(&format!("app-{i:04}"), version);
            if let Resource::Program(p) = &mut r {
                p.spec.selector = None;
                p.spec.hosts = Some(vec![format!("h-{:04}", i % hosts)]);
            }
            text.push_str("---\n");
            text.push_str(&serde_saphyr::to_string(&r)?);
        }
        std::fs::write(&file, text)?;
        Ok(())
    };
    let apply = || async {
        let t0 = Instant::now();
        let out = tokio::process::Command::new(sibling("corral")?)
            .arg("--server")
            .arg(api.base())
            .args(["--token", "bench-token", "apply", "-f"])
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .output()
            .await?;
        anyhow::ensure!(
            out.status.success(),
            "corral apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok::<f64, anyhow::Error>(t0.elapsed().as_secs_f64())
    };
    write("v1")?;
    let created = apply().await?;
    write("v2")?;
    let changed = apply().await?;
    let unchanged = apply().await?;
    let worst = created.max(changed);
    line(
        &format!("4d. `corral apply -f` of {docs} programs: created / changed / unchanged"),
        format!("{created:.2} s / {changed:.2} s / {unchanged:.2} s"),
        "<= 2 s",
        Some(worst <= 2.0 && unchanged <= 2.0),
    );
    Ok(())
}

/// Figure 5: etcd writes with 100 idle hosts.
async fn idle_writes(hosts: usize, idle: Duration) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut sim = simulate(hosts, dir.path()).await?;
    let mut client = sim.etcd.client().await?;
    let ready = SlotWatch::reports(&mut client, &["everywhere".to_string()]).await?;
    sim.api.apply(&program("everywhere", |_| {}), false).await?;
    ready
        .wait(Mark::Ready(1), hosts, Instant::now(), Duration::from_secs(120))
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let a = etcd_counters(&sim.etcd.endpoint).await?;
    tokio::time::sleep(idle).await;
    let b = etcd_counters(&sim.etcd.endpoint).await?;
    let per_min = |k: &str| (b[k] - a[k]) * 60.0 / idle.as_secs_f64();
    let writes = per_min("etcd_mvcc_put_total") + per_min("etcd_mvcc_delete_total");
    line(
        &format!("5. idle etcd writes, {hosts} hosts, no changes"),
        format!("{writes:.0} puts+deletes/min"),
        "keep-alives only (0)",
        Some(writes == 0.0),
    );
    line(
        "   raft proposals committed (lease keep-alives are not)",
        format!("{:.0}/min", per_min("etcd_server_proposals_committed_total")),
        "(reported)",
        None,
    );
    for s in &sim.stops {
        s.cancel();
    }
    // Before etcd goes: a controller that loses etcd says so at length.
    let _ = sim.controller.kill().await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // The simulated hosts share one runtime: their file writes (each agent's, on blocking
    // threads as on a real host) would otherwise grow tokio's blocking pool to hundreds of
    // threads on two cores in a fan-out.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(8)
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    if args.what == What::All {
        // Each figure in its own process: what one leaves behind (a thousand simulated
        // hosts' tasks, servers, allocations) must not weigh on the next.
        println!("corral-bench {} on {}", env!("CARGO_PKG_VERSION"), machine());
        println!("{:-<144}", "");
        let me = std::env::current_exe()?;
        let mut missed = false;
        for what in ["latency", "drift", "footprint", "idle-writes", "fanout", "scale"] {
            let status = tokio::process::Command::new(&me)
                .arg(what)
                .arg("--quiet-header")
                .args(["--hosts", &args.hosts.to_string(), "--reps", &args.reps.to_string()])
                .args(["--idle-seconds", &args.idle_seconds.to_string()])
                .status()
                .await?;
            missed |= !status.success();
        }
        println!("{:-<144}", "");
        println!("done in {:.0} s", started.elapsed().as_secs_f64());
        anyhow::ensure!(!missed, "a figure missed its target");
        return Ok(());
    }
    if !args.quiet_header {
        println!("corral-bench {} on {}", env!("CARGO_PKG_VERSION"), machine());
        println!("{:-<144}", "");
    }
    let idle = Duration::from_secs(args.idle_seconds);
    match args.what {
        What::All => {}
        What::Latency => {
            latency(1, args.reps).await?;
            latency(10, (args.reps / 10).max(1)).await?;
        }
        What::Drift => tokio::task::spawn_blocking(|| drift(100, 200)).await??,
        What::Footprint => footprint(100, idle).await?,
        What::IdleWrites => idle_writes(100, idle).await?,
        What::Fanout => fanout(args.hosts).await?,
        What::Scale => controller_scale(args.hosts, 50).await?,
    }
    if !args.quiet_header {
        println!("{:-<144}", "");
        println!("done in {:.0} s", started.elapsed().as_secs_f64());
    }
    if MISSED.load(std::sync::atomic::Ordering::Relaxed) {
        if args.quiet_header {
            // One figure of `all`: its line says MISSES already.
            std::process::exit(1);
        }
        anyhow::bail!("a figure missed its target");
    }
    Ok(())
}

//! Health checks (`spec.health`): which processes are checked and how a run of results
//! becomes a verdict (pure), and the prober that runs the checks (the adapter).
//!
//! A check runs in its own task per RUNNING process, every `period_secs` from
//! `initial_delay_secs` after the process started, and records its result here. A pass reads
//! the verdicts as one more observation ([`Prober::snapshot`]); what follows from them
//! (readiness, a liveness restart) is `plan`'s decision. A verdict that changes wakes the
//! agent's loop, so an unhealthy process is acted on at once, not at the next resync.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_proto::resource::{Check, DesiredState, Health};
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::plan::{Desired, Observed, ProcState};

/// A check's verdict on one process (one pid).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Probe {
    pub pid: i64,
    /// `None` until a check passed or `failure_threshold` failed in a row.
    pub healthy: Option<bool>,
    /// Failures in a row.
    pub failures: u32,
    /// Why the last check failed, while it fails.
    pub error: String,
}

impl Probe {
    pub fn new(pid: i64) -> Probe {
        Probe {
            pid,
            ..Default::default()
        }
    }

    /// Records one check's result; returns whether the verdict changed. One pass makes a
    /// process healthy; `threshold` failures in a row make it unhealthy (fewer leave the
    /// verdict as it was: one slow answer does not restart a busy server).
    pub fn record(&mut self, result: Result<(), String>, threshold: u32) -> bool {
        let before = self.healthy;
        match result {
            Ok(()) => {
                self.failures = 0;
                self.error.clear();
                self.healthy = Some(true);
            }
            Err(why) => {
                self.failures = self.failures.saturating_add(1);
                self.error = why;
                if self.failures >= threshold.max(1) {
                    self.healthy = Some(false);
                }
            }
        }
        self.healthy != before
    }
}

/// Verdicts by `group:process`.
pub type Probes = HashMap<String, Probe>;

/// One process to check.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub namespec: String,
    pub program: String,
    pub pid: i64,
    /// Unix seconds of its start (supervisord's).
    pub started: i64,
    pub health: Health,
    /// The program's `user` (the exec check runs as it).
    pub user: Option<String>,
}

/// The processes to check: every RUNNING process of a program that must run and has a check.
pub fn targets(desired: &Desired, observed: &Observed) -> Vec<Target> {
    let mut out = Vec::new();
    for p in desired.programs.values() {
        let Some(health) = &p.health else { continue };
        if p.state != DesiredState::Running {
            continue;
        }
        for (process_num, ns) in (p.numprocs_start..).zip(&p.namespecs) {
            if let Some(proc) = observed.get(ns)
                && proc.state == ProcState::Running
                && proc.pid > 0
            {
                out.push(Target {
                    namespec: ns.clone(),
                    program: p.name.clone(),
                    pid: proc.pid,
                    started: proc.start,
                    health: health.for_process(process_num),
                    user: p.user.clone(),
                });
            }
        }
    }
    out
}

/// The most of a failing exec check's output kept in its error.
const EXEC_OUTPUT_BYTES: usize = 200;

/// Runs the checks: one task per target, replaced when its pid or its check changes.
pub struct Prober {
    probes: Arc<Mutex<Probes>>,
    tasks: HashMap<String, (Target, JoinHandle<()>)>,
    changed: Arc<Notify>,
    /// Built for the first http check (most agents never need one: it costs memory).
    http: Option<Option<reqwest::Client>>,
}

impl Default for Prober {
    fn default() -> Self {
        Prober::new()
    }
}

impl Prober {
    pub fn new() -> Prober {
        Prober {
            probes: Arc::default(),
            tasks: HashMap::new(),
            changed: Arc::new(Notify::new()),
            http: None,
        }
    }

    /// The client of http checks: loopback only, never through a proxy from the
    /// environment, no redirects.
    fn http(&mut self) -> Option<reqwest::Client> {
        self.http
            .get_or_insert_with(|| {
                reqwest::Client::builder()
                    .no_proxy()
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .map_err(|e| tracing::warn!(error = %e, "http health checks unavailable"))
                    .ok()
            })
            .clone()
    }

    /// Notified whenever a verdict changes.
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// The verdicts now.
    pub fn snapshot(&self) -> Probes {
        self.probes.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Checks exactly `targets`: new ones start (from no verdict), gone or changed ones stop.
    pub fn sync(&mut self, targets: Vec<Target>) {
        let mut wanted: HashMap<String, Target> = targets.into_iter().map(|t| (t.namespec.clone(), t)).collect();
        self.tasks.retain(|ns, (t, task)| {
            let keep = wanted.get(ns) == Some(t);
            if keep {
                wanted.remove(ns);
            } else {
                task.abort();
            }
            keep
        });
        if let Ok(mut probes) = self.probes.lock() {
            probes.retain(|ns, _| self.tasks.contains_key(ns));
            for t in wanted.values() {
                probes.insert(t.namespec.clone(), Probe::new(t.pid));
            }
        }
        for (ns, t) in wanted {
            let http = match t.health.check {
                Check::Http { .. } => self.http(),
                _ => None,
            };
            let task = tokio::spawn(probe_loop(t.clone(), self.probes.clone(), self.changed.clone(), http));
            self.tasks.insert(ns, (t, task));
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        for (_, task) in self.tasks.values() {
            task.abort();
        }
    }
}

async fn probe_loop(t: Target, probes: Arc<Mutex<Probes>>, changed: Arc<Notify>, http: Option<reqwest::Client>) {
    let first_ms = (t.started + t.health.initial_delay_secs as i64) * 1000;
    let wait = first_ms - crate::reconcile::now_ms();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
    let period = Duration::from_secs(t.health.period_secs);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let timeout = Duration::from_secs(t.health.timeout_secs);
        let result = match tokio::time::timeout(timeout, check(&t, http.as_ref())).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {}s", t.health.timeout_secs)),
        };
        let flipped = match probes.lock() {
            Ok(mut probes) => match probes.get_mut(&t.namespec) {
                Some(p) if p.pid == t.pid => p.record(result, t.health.failure_threshold),
                _ => return,
            },
            Err(_) => return,
        };
        if flipped {
            changed.notify_one();
        }
    }
}

/// One check. Its error says what failed in words that stay the same from one failure to the
/// next (a status is written to etcd only when it changes).
async fn check(t: &Target, http: Option<&reqwest::Client>) -> Result<(), String> {
    match &t.health.check {
        Check::Tcp { port, .. } => tokio::net::TcpStream::connect(("127.0.0.1", *port))
            .await
            .map(drop)
            .map_err(|e| format!("tcp 127.0.0.1:{port}: {}", io_reason(&e))),
        Check::Http {
            port,
            path,
            expect_status,
            ..
        } => {
            let client = http.ok_or("http checks are unavailable on this agent")?;
            let url = format!("http://127.0.0.1:{port}{path}");
            let answer = client.get(&url).send().await.map_err(|e| {
                let why = if e.is_connect() {
                    "connection refused".to_string()
                } else {
                    "no valid HTTP answer".to_string()
                };
                format!("GET {url}: {why}")
            })?;
            let status = answer.status().as_u16();
            let good = match expect_status {
                Some(want) => status == *want,
                None => (200..400).contains(&status),
            };
            if good {
                Ok(())
            } else {
                let want = expect_status.map_or("2xx or 3xx".to_string(), |s| s.to_string());
                Err(format!("GET {url}: status {status}, expected {want}"))
            }
        }
        Check::Exec { command } => exec(t, command).await,
    }
}

async fn exec(t: &Target, command: &[String]) -> Result<(), String> {
    let (program, args) = command.split_first().ok_or("empty command")?;
    let as_other_user = t
        .user
        .as_deref()
        .filter(|u| *u != "root" && rustix::process::geteuid().is_root());
    let mut cmd = match as_other_user {
        Some(user) => {
            let mut c = tokio::process::Command::new("runuser");
            c.arg("-u").arg(user).arg("--").arg(program);
            c
        }
        None => tokio::process::Command::new(program),
    };
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CORRAL_PROGRAM", &t.program)
        .env("CORRAL_PROCESS", &t.namespec)
        .env("CORRAL_PID", t.pid.to_string())
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| format!("{program}: {}", io_reason(&e)))?;
    // Killed with its process group when the check times out (this future is dropped).
    let mut guard = GroupKill(child.id());
    let (err, out) = tokio::join!(first_bytes(child.stderr.take()), first_bytes(child.stdout.take()));
    let status = child.wait().await;
    guard.0 = None;
    let status = status.map_err(|e| format!("{program}: {}", io_reason(&e)))?;
    let output = if err.iter().all(u8::is_ascii_whitespace) {
        out
    } else {
        err
    };
    if status.success() {
        return Ok(());
    }
    let how = match status.code() {
        Some(code) => format!("exit status {code}"),
        None => "killed by a signal".to_string(),
    };
    let text = String::from_utf8_lossy(&output);
    let first = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default();
    let first: String = first.chars().take(EXEC_OUTPUT_BYTES).collect();
    Err(if first.is_empty() {
        format!("{program}: {how}")
    } else {
        format!("{program}: {how}: {first}")
    })
}

/// The first bytes a check writes to a pipe; the rest is read and dropped, so a talkative
/// check neither blocks on a full pipe nor fills the agent's memory.
async fn first_bytes(pipe: Option<impl tokio::io::AsyncRead + Unpin>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(mut pipe) = pipe {
        let _ = (&mut pipe)
            .take(EXEC_OUTPUT_BYTES as u64 * 4)
            .read_to_end(&mut buf)
            .await;
        let _ = tokio::io::copy(&mut pipe, &mut tokio::io::sink()).await;
    }
    buf
}

/// Kills a check's process group when dropped (a check that timed out).
struct GroupKill(Option<u32>);

impl Drop for GroupKill {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = crate::procfs::signal_group(i64::from(pid), rustix::process::Signal::KILL);
        }
    }
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
        std::io::ErrorKind::NotFound => "not found".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_makes_healthy_and_only_a_run_of_failures_unhealthy() {
        let mut p = Probe::new(7);
        assert_eq!(p.healthy, None);
        assert!(!p.record(Err("refused".into()), 3), "no verdict after one failure");
        assert!(!p.record(Err("refused".into()), 3));
        assert_eq!(p.healthy, None);
        assert!(p.record(Ok(()), 3), "one pass is healthy");
        assert_eq!((p.healthy, p.failures), (Some(true), 0));
        assert!(!p.record(Err("slow".into()), 3), "one failure leaves it healthy");
        assert!(!p.record(Err("slow".into()), 3));
        assert_eq!(p.healthy, Some(true));
        assert!(p.record(Err("status 500".into()), 3), "the third failure in a row");
        assert_eq!((p.healthy, p.error.as_str()), (Some(false), "status 500"));
        assert!(!p.record(Err("status 500".into()), 3), "still unhealthy: no change");
        assert!(p.record(Ok(()), 3), "healthy again");
        assert!(p.error.is_empty());
        let mut q = Probe::new(1);
        assert!(q.record(Err("x".into()), 1), "a threshold of one");
        assert_eq!(q.healthy, Some(false));
    }
}

//! Chaos: a whole Corral (3-member etcd, 2 controller processes, 3 hosts each with its own
//! supervisord and agent process) under faults, with spec changes between them, checked
//! after every step.
//!
//! Faults: `kill -9` of an agent, of the leading controller, of an etcd member and of a
//! supervisord (its programs are left running, orphaned), and a network partition of one
//! host from etcd. Where the machine allows network namespaces (root, `ip`), each host's
//! agent runs in its own namespace, reaching etcd over a veth link, and a partition takes
//! that link down ([`crate::netns`]); elsewhere the agent reaches etcd through proxies that
//! cut its connections ([`crate::proxy`]). The report says which. Each fault comes with a spec change made
//! while it lasts. After each step the run waits for convergence: the API says everything
//! is as declared, and each host's supervisord runs exactly what the model says, with the
//! model's command lines. It then compares every process's PID with the step before: a PID
//! that moved although neither its program's spec nor its supervisord changed is a needless
//! restart. At the end, every spec the model holds must be stored unchanged (specs lost),
//! and no process of the run may be running outside its supervisord (orphans).
//!
//! Deterministic in its choices for a seed (the timing of the machine is not).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use corral_cli::client::ApiClient;
use corral_proto::api::ProgramAction;
use corral_proto::resource::{DesiredState, Metadata, Program, ProgramSpec, Resource};

use crate::corral::binary;
use crate::etcd::EtcdCluster;
use crate::netns::Netns;
use crate::process::ChildGuard;
use crate::proxy::Proxy;
use crate::supervisord::{Options as SupervisordOptions, Supervisord};

/// How long and how hard.
#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    /// Stop after this many steps ...
    pub steps: Option<usize>,
    /// ... or once this much time has passed.
    pub duration: Option<Duration>,
    /// The longest a step may take to converge before it counts as a failure.
    pub converge_timeout: Duration,
    /// Print each step as it happens.
    pub verbose: bool,
    /// Take the faults in turn (every kind within the first six steps) instead of at random.
    pub in_turn: bool,
}

/// Every step's fault, in the order `in_turn` takes them.
pub const FAULTS: [&str; 6] = [
    "kill -9 agent",
    "kill -9 leader",
    "kill -9 etcd member",
    "kill -9 supervisord",
    "partition",
    "none",
];

/// What a run saw.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub steps: usize,
    /// Fault kind -> how many.
    pub faults: BTreeMap<&'static str, usize>,
    pub changes: usize,
    /// Programs whose stored spec is missing or differs from the last one applied.
    pub specs_lost: Vec<String>,
    /// `host/program: pid A -> B after <step>` for PIDs that moved with no reason to.
    pub needless_restarts: Vec<String>,
    /// Steps that did not converge in time, with what was still wrong.
    pub mismatches: Vec<String>,
    /// Processes of the run running outside any supervisord at the end (while a step waits
    /// for convergence, an orphan the agents have not stopped yet is a mismatch).
    pub orphans: Vec<String>,
    /// Time to converge after each step.
    pub converge: Vec<Duration>,
    pub elapsed: Duration,
    /// How a host was cut off: a network namespace's link taken down, or proxies (and why).
    pub partition_by: String,
}

impl Report {
    /// Nothing lost, nothing restarted needlessly, everything converged, no orphan.
    pub fn ok(&self) -> bool {
        self.specs_lost.is_empty()
            && self.needless_restarts.is_empty()
            && self.mismatches.is_empty()
            && self.orphans.is_empty()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut sorted = self.converge.clone();
        sorted.sort();
        let at = |q: f64| {
            sorted
                .get(((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or_default()
        };
        let faults: usize = self.faults.values().sum();
        writeln!(f, "seed {}: {} steps in {:.0?}", self.seed, self.steps, self.elapsed)?;
        writeln!(f, "partition by: {}", self.partition_by)?;
        writeln!(
            f,
            "faults injected: {faults} ({})",
            self.faults
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        writeln!(f, "changes made: {}", self.changes)?;
        writeln!(f, "specs lost: {}", self.specs_lost.len())?;
        writeln!(f, "needless restarts: {}", self.needless_restarts.len())?;
        writeln!(f, "final mismatches: {}", self.mismatches.len())?;
        writeln!(f, "orphaned processes: {}", self.orphans.len())?;
        writeln!(
            f,
            "time to converge: p50 {:.1?}, p99 {:.1?}, max {:.1?}",
            at(0.5),
            at(0.99),
            at(1.0)
        )?;
        for (what, list) in [
            ("lost", &self.specs_lost),
            ("needless restart", &self.needless_restarts),
            ("mismatch", &self.mismatches),
            ("orphan", &self.orphans),
        ] {
            for item in list {
                writeln!(f, "  {what}: {item}")?;
            }
        }
        Ok(())
    }
}

/// splitmix64: a seeded sequence, enough to choose faults reproducibly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const TOKEN: &str = "chaos-token";
const HOSTS: [(&str, &str); 3] = [("h0", "web"), ("h1", "web"), ("h2", "worker")];

struct Host {
    name: String,
    labels: BTreeMap<String, String>,
    sd: Supervisord,
    agent: Option<ChildGuard>,
    state: PathBuf,
    /// The agent's way to etcd members: through its namespace's link, or cuttable.
    proxies: Vec<Proxy>,
    /// Its own network namespace, where the machine allows.
    netns: Option<Netns>,
}

struct World {
    etcd: EtcdCluster,
    controllers: Vec<Option<ChildGuard>>,
    ports: Vec<u16>,
    dir: tempfile::TempDir,
    hosts: Vec<Host>,
    /// What was applied last, per program.
    model: BTreeMap<String, ProgramSpec>,
    /// This run's sleep arguments start here, so its processes are told from any other.
    base: u64,
    next_arg: u64,
    verbose: bool,
    partition_by: String,
}

fn log_file(path: &Path) -> anyhow::Result<Stdio> {
    Ok(Stdio::from(
        std::fs::OpenOptions::new().create(true).append(true).open(path)?,
    ))
}

impl World {
    async fn start(seed: u64, verbose: bool) -> anyhow::Result<World> {
        let etcd = EtcdCluster::start(3).await?;
        let dir = tempfile::tempdir()?;
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, format!("{TOKEN} chaos admin\n"))?;
        std::fs::set_permissions(&tokens, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let ports = vec![crate::free_port()?, crate::free_port()?];
        let mut world = World {
            etcd,
            controllers: vec![None, None],
            ports,
            hosts: Vec::new(),
            model: BTreeMap::new(),
            base: 10_000_000 + (u64::from(std::process::id()) % 500) * 10_000 + seed % 100 * 100_000,
            next_arg: 0,
            dir,
            verbose,
            partition_by: "network namespaces (veth link down)".to_string(),
        };
        for i in 0..2 {
            world.start_controller(i)?;
        }
        let mut use_netns = true;
        for (index, (name, role)) in HOSTS.into_iter().enumerate() {
            let sd = Supervisord::start(SupervisordOptions::default()).await?;
            let state = world.dir.path().join(name);
            std::fs::create_dir_all(&state)?;
            let netns = if use_netns {
                match Netns::create(index as u8) {
                    Ok(n) => Some(n),
                    Err(e) => {
                        use_netns = false;
                        world.partition_by = format!("proxies (no network namespace: {e:#})");
                        None
                    }
                }
            } else {
                None
            };
            let bind = netns.as_ref().map_or(std::net::Ipv4Addr::LOCALHOST, |n| n.host_addr);
            let mut proxies = Vec::new();
            for ep in &world.etcd.endpoints {
                let addr = ep.trim_start_matches("http://").parse()?;
                proxies.push(Proxy::start_on(bind.into(), addr).await?);
            }
            world.hosts.push(Host {
                name: name.to_string(),
                labels: BTreeMap::from([("role".to_string(), role.to_string())]),
                sd,
                agent: None,
                state,
                proxies,
                netns,
            });
        }
        for h in 0..world.hosts.len() {
            world.start_agent(h)?;
        }
        // The programs: everywhere, by role, by host list.
        /// Program name, label selector, host list.
        type Placement<'a> = (&'a str, Option<(&'a str, &'a str)>, Option<&'a [&'a str]>);
        let selectors: [Placement; 5] = [
            ("p0", None, None),
            ("p1", Some(("role", "web")), None),
            ("p2", Some(("role", "worker")), None),
            ("p3", None, None),
            ("p4", None, Some(&["h0", "h2"])),
        ];
        for (name, selector, hosts) in selectors {
            let spec = ProgramSpec {
                command: world.next_command(),
                selector: match (selector, hosts) {
                    (_, Some(_)) => None,
                    (Some((k, v)), None) => Some(BTreeMap::from([(k.to_string(), v.to_string())])),
                    (None, None) => Some(BTreeMap::new()),
                },
                hosts: hosts.map(|h| h.iter().map(|s| s.to_string()).collect()),
                startsecs: Some(0),
                stopwaitsecs: Some(2),
                ..Default::default()
            };
            world.apply(name, spec).await?;
        }
        Ok(world)
    }

    fn say(&self, what: &str) {
        if self.verbose {
            eprintln!("chaos: {what}");
        }
    }

    fn next_command(&mut self) -> String {
        self.next_arg += 1;
        format!("/bin/sleep {}", self.base + self.next_arg)
    }

    fn start_controller(&mut self, i: usize) -> anyhow::Result<()> {
        let mut cmd = Command::new(binary("corral-controller")?);
        cmd.args(["--etcd-endpoints", &self.etcd.endpoints.join(",")])
            .args(["--listen", &format!("127.0.0.1:{}", self.ports[i])])
            .arg("--token-file")
            .arg(self.dir.path().join("tokens"))
            .args(["--id", &format!("c{i}")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir.path().join(format!("controller-{i}.log")))?);
        self.controllers[i] = Some(ChildGuard::spawn("controller", cmd)?);
        Ok(())
    }

    fn start_agent(&mut self, h: usize) -> anyhow::Result<()> {
        let host = &self.hosts[h];
        let labels: Vec<String> = host.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let endpoints: Vec<String> = host.proxies.iter().map(Proxy::url).collect();
        let agent = binary("corral-agent")?;
        let mut cmd = match &host.netns {
            Some(n) => n.command(&agent),
            None => Command::new(agent),
        };
        cmd.args(["--etcd-endpoints", &endpoints.join(",")])
            .args(["--host", &host.name, "--labels", &labels.join(",")])
            .args(["--supervisor-url", &host.sd.unix_url()])
            .arg("--conf-dir")
            .arg(&host.sd.conf_dir)
            .arg("--state-dir")
            .arg(&host.state)
            .args(["--resync-seconds", "1", "--lease-ttl", "3"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log_file(&host.state.join("agent.log"))?);
        let child = ChildGuard::spawn("agent", cmd)?;
        self.hosts[h].agent = Some(child);
        Ok(())
    }

    /// Cuts host `h` off from etcd (`true`) or joins it again.
    fn cut(&self, h: usize, cut: bool) -> anyhow::Result<()> {
        let host = &self.hosts[h];
        match &host.netns {
            Some(n) => n.set_link(!cut)?,
            None => {
                for p in &host.proxies {
                    p.set_cut(cut);
                }
            }
        }
        Ok(())
    }

    /// A client of a controller that is running (the API is served by every replica).
    fn api(&self) -> anyhow::Result<ApiClient> {
        let i = self
            .controllers
            .iter()
            .position(Option::is_some)
            .context("no controller runs")?;
        Ok(ApiClient::new(
            &format!("http://127.0.0.1:{}", self.ports[i]),
            Some(TOKEN.into()),
        )?)
    }

    /// Applies a spec, retrying while the control plane recovers from a fault.
    async fn apply(&mut self, name: &str, spec: ProgramSpec) -> anyhow::Result<()> {
        let program = Resource::Program(Program::new(
            Metadata {
                name: name.to_string(),
                ..Default::default()
            },
            spec.clone(),
        ));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.api()?.apply(&program, false).await {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    self.say(&format!("apply {name}: {e}; retrying"));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e).with_context(|| format!("apply {name}")),
            }
        }
        self.model.insert(name.to_string(), spec);
        Ok(())
    }

    /// One spec change of a random program; returns the program (whose PIDs may move).
    async fn change(&mut self, rng: &mut Rng) -> anyhow::Result<String> {
        let names: Vec<String> = self.model.keys().cloned().collect();
        let name = names[rng.below(names.len())].clone();
        let mut spec = self.model[&name].clone();
        match rng.below(4) {
            0 | 1 => spec.command = self.next_command(),
            2 => {
                spec.state = match spec.state {
                    DesiredState::Running => DesiredState::Stopped,
                    DesiredState::Stopped => DesiredState::Running,
                };
            }
            _ => {
                // `corral restart`: the server sets the marker; the model takes what it stored.
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    match self.api()?.act(&name, &ProgramAction::Restart).await {
                        Ok(r) => {
                            self.say(&format!("restart {name}"));
                            self.model.insert(name.clone(), r.object.spec);
                            return Ok(name);
                        }
                        Err(e) if Instant::now() < deadline => {
                            self.say(&format!("restart {name}: {e}; retrying"));
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Err(e) => return Err(e).with_context(|| format!("restart {name}")),
                    }
                }
            }
        }
        self.say(&format!("change {name}"));
        self.apply(&name, spec).await?;
        Ok(name)
    }

    async fn leader(&self) -> Option<usize> {
        for (i, c) in self.controllers.iter().enumerate() {
            if c.is_none() {
                continue;
            }
            let url = format!("http://127.0.0.1:{}/metrics", self.ports[i]);
            if let Ok(text) = crate::corral::scrape(&url).await
                && text.lines().any(|l| l == "corral_controller_leader 1")
            {
                return Some(i);
            }
        }
        None
    }

    /// What each host should run: program -> (state, command) for the programs it selects.
    fn expected(&self, host: &Host) -> BTreeMap<String, (DesiredState, String)> {
        self.model
            .iter()
            .filter(|(_, s)| match (&s.hosts, &s.selector) {
                (Some(hosts), _) => hosts.contains(&host.name),
                (None, Some(sel)) => sel.iter().all(|(k, v)| host.labels.get(k) == Some(v)),
                (None, None) => false,
            })
            .map(|(n, s)| (n.clone(), (s.state, s.command.clone())))
            .collect()
    }

    /// What is still not as declared (empty: converged), and each process's PID.
    async fn observe(&self) -> (Vec<String>, BTreeMap<String, i64>) {
        let mut wrong = Vec::new();
        let mut pids = BTreeMap::new();
        match self.api() {
            Ok(api) => match api.status().await {
                Ok(s) if crate::corral::converged(&s) && s.hosts_ready == self.hosts.len() => {}
                Ok(s) => wrong.push(format!(
                    "status: {} of {} hosts ready, programs {:?}",
                    s.hosts_ready,
                    s.hosts,
                    s.programs
                        .iter()
                        .map(|p| (&p.name, p.ready, p.desired, p.problems.clone()))
                        .collect::<Vec<_>>()
                )),
                Err(e) => wrong.push(format!("status: {e}")),
            },
            Err(e) => wrong.push(e.to_string()),
        }
        for host in &self.hosts {
            let infos = match host.sd.client().await {
                Ok(c) => c.get_all_process_info().await,
                Err(e) => {
                    wrong.push(format!("{}: {e}", host.name));
                    continue;
                }
            };
            let infos = match infos {
                Ok(i) => i,
                Err(e) => {
                    wrong.push(format!("{}: supervisord: {e}", host.name));
                    continue;
                }
            };
            let want = self.expected(host);
            let have: BTreeSet<&str> = infos.iter().map(|p| p.name.as_str()).collect();
            for name in have.iter().filter(|n| !want.contains_key(**n)) {
                wrong.push(format!("{}/{name}: runs but is not declared there", host.name));
            }
            for (name, (state, command)) in &want {
                let Some(p) = infos.iter().find(|p| &p.name == name) else {
                    wrong.push(format!("{}/{name}: missing", host.name));
                    continue;
                };
                let running = p.statename == "RUNNING";
                match state {
                    DesiredState::Running if !running => {
                        wrong.push(format!("{}/{name}: {}", host.name, p.statename));
                    }
                    DesiredState::Stopped if running || p.statename == "STOPPING" => {
                        wrong.push(format!("{}/{name}: {} (declared stopped)", host.name, p.statename));
                    }
                    DesiredState::Running => {
                        let cmdline = std::fs::read(format!("/proc/{}/cmdline", p.pid)).unwrap_or_default();
                        let cmdline: Vec<String> = cmdline
                            .split(|b| *b == 0)
                            .filter(|a| !a.is_empty())
                            .map(|a| String::from_utf8_lossy(a).into_owned())
                            .collect();
                        if cmdline.join(" ") != *command {
                            wrong.push(format!("{}/{name}: runs {cmdline:?}, declared {command:?}", host.name));
                        }
                        pids.insert(format!("{}/{name}", host.name), p.pid);
                    }
                    DesiredState::Stopped => {}
                }
            }
        }
        // A supervisord killed with -9 leaves its programs running: converged means the agent
        // has stopped them too.
        wrong.extend(self.orphans().await.into_iter().map(|o| format!("orphan {o}")));
        (wrong, pids)
    }

    /// Waits for convergence; returns how long it took, or what was still wrong.
    async fn converge(&self, timeout: Duration) -> (Duration, Result<BTreeMap<String, i64>, Vec<String>>) {
        let start = Instant::now();
        loop {
            let (wrong, pids) = self.observe().await;
            if wrong.is_empty() {
                return (start.elapsed(), Ok(pids));
            }
            if start.elapsed() > timeout {
                return (start.elapsed(), Err(wrong));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Processes of this run that no supervisord of the run reports.
    async fn orphans(&self) -> Vec<String> {
        let mut known = BTreeSet::new();
        for host in &self.hosts {
            if let Ok(c) = host.sd.client().await
                && let Ok(infos) = c.get_all_process_info().await
            {
                known.extend(infos.iter().filter(|p| p.pid > 0).map(|p| p.pid));
            }
        }
        let mut out = Vec::new();
        for (pid, arg) in sleeps() {
            if arg > self.base && arg <= self.base + self.next_arg && !known.contains(&pid) {
                out.push(format!("pid {pid}: /bin/sleep {arg}"));
            }
        }
        out
    }

    /// Kills what the run left behind outside supervisord (orphans of killed supervisords).
    fn kill_orphans(&self) {
        for (pid, arg) in sleeps() {
            if arg > self.base && arg <= self.base + self.next_arg {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// Every `sleep N` process on the machine: (pid, N).
fn sleeps() -> Vec<(i64, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: i64 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let mut args = cmdline.split(|b| *b == 0);
        let exe = args.next()?;
        if !exe.ends_with(b"sleep") {
            return None;
        }
        let n: u64 = std::str::from_utf8(args.next()?).ok()?.parse().ok()?;
        Some((pid, n))
    })
    .collect()
}

/// Runs a chaos scenario and reports what it saw.
///
/// # Errors
/// Only when the world cannot be set up or a spec cannot be applied for a minute; what goes
/// wrong under the faults is in the report.
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    corral_cli::client::ensure_tls_provider();
    let started = Instant::now();
    let mut rng = Rng(opts.seed);
    let mut world = World::start(opts.seed, opts.verbose).await?;
    let mut report = Report {
        seed: opts.seed,
        partition_by: world.partition_by.clone(),
        ..Report::default()
    };
    let result = steps(&mut world, &mut rng, opts, &mut report, started).await;
    report.elapsed = started.elapsed();
    world.kill_orphans();
    result?;
    Ok(report)
}

async fn steps(
    world: &mut World,
    rng: &mut Rng,
    opts: &Options,
    report: &mut Report,
    started: Instant,
) -> anyhow::Result<()> {
    let (took, first) = world.converge(opts.converge_timeout).await;
    report.converge.push(took);
    let mut pids = first.map_err(|w| anyhow::anyhow!("the initial fleet never converged: {w:?}"))?;
    loop {
        let done_steps = opts.steps.is_some_and(|n| report.steps >= n);
        let done_time = opts.duration.is_some_and(|d| started.elapsed() >= d);
        if done_steps || done_time {
            break;
        }
        report.steps += 1;
        // PIDs that may move in this step: the changed program's everywhere, and every
        // process of a host whose supervisord is killed.
        let mut may_move_programs = BTreeSet::new();
        let mut may_move_hosts = BTreeSet::new();
        let fault: &'static str = if opts.in_turn {
            FAULTS[(report.steps - 1) % FAULTS.len()]
        } else {
            FAULTS[rng.below(FAULTS.len())]
        };
        let h = rng.below(world.hosts.len());
        match fault {
            "none" => {}
            "kill -9 agent" => {
                world.say(&format!("kill -9 agent {}", world.hosts[h].name));
                if let Some(mut a) = world.hosts[h].agent.take() {
                    a.kill();
                }
            }
            "kill -9 leader" => {
                let leader = world.leader().await;
                world.say(&format!("kill -9 leader {leader:?}"));
                if let Some(i) = leader
                    && let Some(mut c) = world.controllers[i].take()
                {
                    c.kill();
                }
            }
            "kill -9 etcd member" => {
                let m = rng.below(3);
                world.say(&format!("kill -9 etcd member {m}"));
                world.etcd.kill_member(m);
                // Restarted after the change below.
                may_move_hosts.insert(usize::MAX - m);
            }
            "kill -9 supervisord" => {
                world.say(&format!("kill -9 supervisord {}", world.hosts[h].name));
                world.hosts[h].sd.kill9_and_restart().await?;
                may_move_hosts.insert(h);
            }
            _ => {
                world.say(&format!("partition {}", world.hosts[h].name));
                world.cut(h, true)?;
            }
        }
        if fault != "none" {
            *report.faults.entry(fault).or_default() += 1;
        }
        // A spec change while the fault lasts (every step changes something).
        may_move_programs.insert(world.change(rng).await?);
        report.changes += 1;
        if fault == "partition" {
            // Long enough for the host's lease to expire: it is NotReady meanwhile.
            tokio::time::sleep(Duration::from_secs(5)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(300 + rng.below(1500) as u64)).await;
        }
        // Heal.
        for host in 0..world.hosts.len() {
            if world.hosts[host].agent.is_none() {
                world.start_agent(host)?;
            }
            world.cut(host, false)?;
        }
        for i in 0..world.controllers.len() {
            if world.controllers[i].is_none() {
                world.start_controller(i)?;
            }
        }
        for m in 0..3 {
            if may_move_hosts.remove(&(usize::MAX - m)) {
                world.etcd.restart_member(m)?;
            }
        }
        let (took, now) = world.converge(opts.converge_timeout).await;
        report.converge.push(took);
        world.say(&format!("step {} ({fault}) converged in {took:.1?}", report.steps));
        let now = match now {
            Ok(now) => now,
            Err(wrong) => {
                report
                    .mismatches
                    .push(format!("after step {} ({fault}): {}", report.steps, wrong.join("; ")));
                // Go on from whatever runs now.
                world.observe().await.1
            }
        };
        for (key, pid) in &now {
            let Some(before) = pids.get(key) else { continue };
            let (host, program) = key.split_once('/').unwrap_or_default();
            let host_index = world.hosts.iter().position(|x| x.name == host).unwrap_or(usize::MAX);
            if before != pid && !may_move_programs.contains(program) && !may_move_hosts.contains(&host_index) {
                report.needless_restarts.push(format!(
                    "{key}: pid {before} -> {pid} after step {} ({fault})",
                    report.steps
                ));
            }
        }
        pids = now;
    }
    // Specs: what the model applied last is what is stored.
    let stored = world.api()?.programs().await?;
    for (name, spec) in &world.model {
        match stored.iter().find(|p| &p.metadata.name == name) {
            None => report.specs_lost.push(format!("{name}: missing")),
            Some(p) if p.spec.command != spec.command || p.spec.state != spec.state => {
                report.specs_lost.push(format!(
                    "{name}: stored {:?} {:?}, applied {:?} {:?}",
                    p.spec.command, p.spec.state, spec.command, spec.state
                ));
            }
            Some(_) => {}
        }
    }
    report.orphans = world.orphans().await;
    Ok(())
}

//! Commands that talk to the controller.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use comfy_table::{Table, presets::NOTHING};
use corral_cli::client::{ApiClient, ClientError};
use corral_proto::api::{ApplyResult, Outcome, ProgramAction};
use corral_proto::fleet::{FleetStatus, ProgramStatusView};
use corral_proto::resource::{DesiredState, Group, Kind, Program, ProgramSpec, Resource};
use corral_proto::validate::{HIDDEN, HIDDEN_CHANGED};
use corral_proto::{validate_group, validate_program};
use futures_util::StreamExt as _;
use serde::Serialize;

use crate::exit;
use crate::input::read_resources;

/// `-o` formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Wide,
    Yaml,
    Json,
}

/// What `get` lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    #[value(alias = "program")]
    Programs,
    #[value(alias = "group")]
    Groups,
    #[value(alias = "host")]
    Hosts,
}

/// A single kind, for `delete` and `describe`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KindArg {
    Program,
    Group,
}

/// What `describe` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DescribeKind {
    Program,
    Group,
    Host,
}

impl KindArg {
    fn kind(self) -> Kind {
        match self {
            KindArg::Program => Kind::Program,
            KindArg::Group => Kind::Group,
        }
    }
}

pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(NOTHING).set_header(header.to_vec());
    t
}

fn print_structured<T: Serialize>(items: &[T], single: bool, out: Output) -> anyhow::Result<()> {
    match out {
        Output::Json if single => outln!("{}", serde_json::to_string_pretty(&items[0])?),
        Output::Json => outln!("{}", serde_json::to_string_pretty(items)?),
        _ => {
            let docs: Vec<String> = items.iter().map(serde_saphyr::to_string).collect::<Result<_, _>>()?;
            out!("{}", docs.join("---\n"));
        }
    }
    Ok(())
}

/// Validates locally (early, complete errors), then applies each resource in order.
/// `apply --wait`: how long to follow each program's rollout.
#[derive(Clone, Copy, Debug)]
pub struct Wait {
    pub timeout: std::time::Duration,
    pub stall: std::time::Duration,
}

pub async fn apply(api: &ApiClient, files: &[String], dry_run: bool, wait: Option<Wait>) -> anyhow::Result<ExitCode> {
    let docs = read_resources(files)?;
    let mut errors = docs.errors;
    errors.extend(invalid_resources(&docs.resources));
    let valid: Vec<Resource> = docs.resources.into_iter().map(|(_, r)| r).collect();
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("{e}");
        }
        return Ok(exit::code(exit::INVALID));
    }
    // Programs first, several requests in flight (a fleet's file has thousands); then groups,
    // one at a time, so that they find the programs they name and the controller's check that
    // a program is in one native group at most sees each group before the next.
    let (programs, groups): (Vec<&Resource>, Vec<&Resource>) =
        valid.iter().partition(|r| matches!(r, Resource::Program(_)));
    let apply_one = |r: &Resource| {
        let what = format!("{}/{}", r.kind().as_str().to_lowercase(), r.metadata().name);
        let r = r.clone();
        async move { (what, api.apply(&r, dry_run).await) }
    };
    let mut results = futures_util::stream::iter(programs.into_iter().map(apply_one)).buffered(APPLY_IN_FLIGHT);
    let mut worst = exit::Worst::default();
    let mut applied_programs = Vec::new();
    let mut show = |what: String, result: Result<ApplyResult<Resource>, ClientError>| match result {
        Ok(v) => {
            let result = v.result.as_str();
            outln!("{what} {result}{}", if dry_run { " (dry run)" } else { "" });
            if let Resource::Program(p) = &v.object {
                applied_programs.push(p.metadata.name.clone());
            }
        }
        Err(e) => {
            eprintln!("{what}: {e}");
            worst.failed(&e);
        }
    };
    while let Some((what, result)) = results.next().await {
        show(what, result);
    }
    for r in groups {
        let (what, result) = apply_one(r).await;
        show(what, result);
    }
    if !dry_run {
        warn_applied(api, &valid).await;
    }
    let mut code = worst.code();
    if let (Some(w), false) = (wait, dry_run) {
        let mut failed = false;
        for name in &applied_programs {
            failed |= crate::rollout::follow(api, name, true, w.timeout, w.stall).await? != exit::OK;
        }
        if failed {
            code = exit::code(exit::REFUSED);
        }
    }
    Ok(code)
}

/// Says what of the applied resources is probably not what was meant (a program that runs
/// nowhere, a group naming a program that does not exist); best effort, exit code unchanged.
async fn warn_applied(api: &ApiClient, applied: &[Resource]) {
    let (mut programs, mut groups): (Vec<Program>, Vec<Group>) = (Vec::new(), Vec::new());
    for r in applied {
        match r {
            Resource::Program(p) => programs.push(p.clone()),
            Resource::Group(g) => groups.push(g.clone()),
            Resource::Host(_) => {}
        }
    }
    let mut warnings = Vec::new();
    if !programs.is_empty()
        && let Ok(hosts) = api.hosts().await
    {
        warnings.extend(corral_proto::fleet::runs_nowhere(&programs, &hosts));
    }
    let mut known: std::collections::BTreeSet<String> = programs.iter().map(|p| p.metadata.name.clone()).collect();
    // The stored programs only when a group or a depends_on names one the file does not hold.
    let named = groups
        .iter()
        .flat_map(|g| &g.spec.programs)
        .chain(programs.iter().flat_map(|p| p.spec.depends_on.iter().flatten()));
    let mut stored_programs = Vec::new();
    if named.clone().any(|p| !known.contains(p))
        && let Ok(stored) = api.programs().await
    {
        known.extend(stored.iter().map(|p| p.metadata.name.clone()));
        stored_programs = stored;
    }
    warnings.extend(corral_proto::fleet::missing_members(&groups, &known));
    // A depends_on that names no program: it starts without waiting (likely a typo).
    let all: Vec<Program> = programs
        .iter()
        .cloned()
        .chain(
            stored_programs
                .into_iter()
                .filter(|s| !programs.iter().any(|p| p.metadata.name == s.metadata.name)),
        )
        .collect();
    warnings.extend(corral_proto::fleet::missing_dependencies(&all).into_iter().filter(|w| {
        programs
            .iter()
            .any(|p| w.starts_with(&format!("program {:?} ", p.metadata.name)))
    }));
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

/// What the controller would refuse in `resources` (validated as it validates them), each
/// with its source file.
fn invalid_resources(resources: &[(String, Resource)]) -> Vec<String> {
    let mut errors = Vec::new();
    for (source, r) in resources {
        let checked = match r {
            Resource::Program(p) => validate_program(p.clone()).map(|_| ()),
            Resource::Group(g) => validate_group(g.clone()).map(|_| ()),
            Resource::Host(h) => {
                errors.push(format!(
                    "{source}: Host {:?}: hosts register themselves",
                    h.metadata.name
                ));
                continue;
            }
        };
        if let Err(e) = checked {
            errors.push(format!("{source}: {e}"));
        }
    }
    // A dependency cycle among the programs given (the controller refuses one that closes a
    // cycle with what it stores; within one file, say it before anything is sent).
    let deps: BTreeMap<String, Vec<String>> = resources
        .iter()
        .filter_map(|(_, r)| match r {
            Resource::Program(p) => Some((p.metadata.name.clone(), p.spec.depends_on.clone().unwrap_or_default())),
            _ => None,
        })
        .collect();
    if let Some(cycle) = corral_proto::fleet::dependency_cycle(&deps) {
        errors.push(format!(
            "spec.depends_on: {} is a cycle: none of them could ever start",
            cycle.join(" -> ")
        ));
    }
    errors
}

/// Programs applied at once by `corral apply`: enough to keep the controller busy, few
/// enough not to crowd it.
const APPLY_IN_FLIGHT: usize = 16;

/// A spec for display with environment values hidden (they are often secrets): each reads
/// `(hidden)`, or `(hidden, changed)` where it differs from `compare`'s.
fn redacted(spec: &ProgramSpec, compare: Option<&ProgramSpec>, show: bool) -> ProgramSpec {
    let mut out = spec.clone();
    if show {
        return out;
    }
    if let Some(env) = out.environment.as_mut() {
        for (k, v) in env.iter_mut() {
            let other = compare.and_then(|c| c.environment.as_ref()).and_then(|e| e.get(k));
            *v = match (compare, other) {
                (Some(_), Some(o)) if o == v => HIDDEN.to_string(),
                (Some(_), _) => HIDDEN_CHANGED.to_string(),
                (None, _) => HIDDEN.to_string(),
            };
        }
    }
    out
}

fn yaml_of<T: Serialize>(v: &T) -> String {
    serde_saphyr::to_string(v).unwrap_or_default()
}

/// Prints what `apply` would change. Exit 0: nothing; 1: changes; 2: errors.
pub async fn diff(api: &ApiClient, files: &[String], show_secrets: bool) -> anyhow::Result<ExitCode> {
    let docs = read_resources(files)?;
    if !docs.errors.is_empty() {
        for e in &docs.errors {
            eprintln!("{e}");
        }
        return Ok(exit::code(exit::INVALID));
    }
    let invalid = invalid_resources(&docs.resources);
    if !invalid.is_empty() {
        for e in &invalid {
            eprintln!("{e}");
        }
        return Ok(exit::code(exit::INVALID));
    }
    let groups = api.groups().await?;
    let mut changed = false;
    for (_, r) in docs.resources {
        let name = r.metadata().name.clone();
        let mut effects = None;
        let (current, wanted, native_note) = match &r {
            Resource::Program(p) => {
                let live = match api.program(&name).await {
                    Ok(c) => Some(c.spec),
                    Err(e) if e.status() == Some(404) => None,
                    Err(e) => return Err(e.into()),
                };
                // As the controller does on apply: markers the file leaves out are kept.
                let mut wanted = p.spec.clone();
                if let Some(l) = &live {
                    wanted.restarted_at = wanted.restarted_at.or_else(|| l.restarted_at.clone());
                    wanted.signal_request = wanted.signal_request.or_else(|| l.signal_request.clone());
                }
                let native = groups.iter().find(|g| g.spec.native && g.spec.programs.contains(&name));
                effects = process_effects(p, live.as_ref(), &wanted, native.map(|g| g.metadata.name.as_str()));
                let current = live.as_ref().map(|l| yaml_of(&redacted(l, None, show_secrets)));
                let wanted = yaml_of(&redacted(&wanted, live.as_ref(), show_secrets));
                let note = native.map(|g| {
                    format!(
                        "note: {name} is in native group {:?}: supervisord restarts every member of the group on each host when this changes",
                        g.metadata.name
                    )
                });
                (current, wanted, note)
            }
            Resource::Group(g) => {
                let current = match api.group(&name).await {
                    Ok(c) => Some(yaml_of(&c.spec)),
                    Err(e) if e.status() == Some(404) => None,
                    Err(e) => return Err(e.into()),
                };
                (current, yaml_of(&g.spec), None)
            }
            Resource::Host(_) => continue,
        };
        let what = format!("{}/{name}", r.kind().as_str().to_lowercase());
        match current {
            None => {
                changed = true;
                outln!("+ {what} (new)");
                for l in wanted.lines() {
                    outln!("+   {l}");
                }
                if let Some(e) = &effects {
                    outln!("{e}");
                }
            }
            Some(cur) if cur != wanted => {
                changed = true;
                let d = similar::TextDiff::from_lines(&cur, &wanted);
                out!(
                    "{}",
                    d.unified_diff()
                        .header(&format!("{what} (live)"), &format!("{what} (file)"))
                );
                if let Some(e) = &effects {
                    outln!("{e}");
                }
                if let Some(n) = native_note {
                    outln!("{n}");
                }
            }
            Some(_) => {}
        }
    }
    Ok(exit::code(if changed { exit::REFUSED } else { exit::OK }))
}

/// `processes on each host: restart a, b; start c`: what the change does to the program's
/// processes, from the specs alone (`render::process_changes`). `None` when a spec does not
/// validate (apply would say why).
fn process_effects(
    file: &Program,
    live: Option<&corral_proto::ProgramSpec>,
    wanted: &corral_proto::ProgramSpec,
    native_group: Option<&str>,
) -> Option<String> {
    let with = |spec: &corral_proto::ProgramSpec| {
        let mut p = file.clone();
        p.spec = spec.clone();
        corral_proto::validate_program(p).ok()
    };
    let new = with(wanted)?;
    let old = match live {
        Some(l) => Some(with(l)?),
        None => None,
    };
    let c = corral_proto::render::process_changes(old.as_ref(), &new, native_group, "<host>").ok()?;
    let parts: Vec<String> = [
        ("restart", &c.restart),
        ("start", &c.start),
        ("stop", &c.stop),
        ("keep", &c.keep),
    ]
    .iter()
    .filter(|(_, l)| !l.is_empty())
    .map(|(verb, l)| format!("{verb} {}", l.join(", ")))
    .collect();
    Some(format!("  processes on each host: {}", parts.join("; ")))
}

fn status_view(p: &Program) -> ProgramStatusView {
    p.status.clone().unwrap_or_default()
}

fn placement(p: &Program) -> String {
    match (&p.spec.selector, &p.spec.hosts) {
        (_, Some(h)) => format!("hosts={}", h.join(",")),
        (Some(s), None) if s.is_empty() => "all hosts".to_string(),
        (Some(s), None) => s.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
        (None, None) => String::new(),
    }
}

fn state_str(s: DesiredState) -> &'static str {
    match s {
        DesiredState::Running => "running",
        DesiredState::Stopped => "stopped",
    }
}

/// `get programs|groups|hosts [NAME]`.
/// `-l k=v,k2=v2`: the labels every object listed must have.
fn parse_selector(selector: Option<&str>) -> anyhow::Result<BTreeMap<String, String>> {
    let Some(s) = selector else {
        return Ok(BTreeMap::new());
    };
    s.split(',')
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("-l {s}: {kv:?} is not K=V"))?;
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

fn matches(labels: &BTreeMap<String, String>, selector: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// What `corral label` labels.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LabelKind {
    Host,
}

/// `corral label host NAME K=V K-`.
pub async fn label(api: &ApiClient, kind: LabelKind, name: &str, labels: &[String]) -> anyhow::Result<ExitCode> {
    let LabelKind::Host = kind;
    let mut changes = corral_proto::api::LabelChanges::new();
    for l in labels {
        let (k, v) = match (l.split_once('='), l.strip_suffix('-')) {
            (Some((k, v)), _) => (k, Some(v.to_string())),
            (None, Some(k)) => (k, None),
            (None, None) => anyhow::bail!("{l:?}: K=V sets a label, K- removes it"),
        };
        anyhow::ensure!(
            changes.insert(k.to_string(), v).is_none(),
            "label {k:?} is given twice: set or remove each label once"
        );
    }
    let h = api.label_host(name, &changes).await?;
    let now: Vec<String> = h.metadata.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    outln!("host/{name} labeled: {}", now.join(","));
    Ok(ExitCode::SUCCESS)
}

/// `corral cordon|uncordon|drain HOST`.
pub async fn host_action(
    api: &ApiClient,
    host: &str,
    action: corral_proto::api::HostAction,
) -> anyhow::Result<ExitCode> {
    use corral_proto::api::HostAction;
    api.host_action(host, action).await?;
    let said = match action {
        HostAction::Cordon => "cordoned: nothing new is placed there; what runs stays",
        HostAction::Uncordon => "uncordoned: it gets its programs again",
        HostAction::Drain => "drained: every program is taken off it (its agent stops them)",
    };
    outln!("host/{host} {said}");
    Ok(ExitCode::SUCCESS)
}

/// How a host's readiness and placement read in a table: `Ready`, `NotReady,Cordoned`.
fn host_state(h: &corral_proto::resource::Host) -> String {
    let ready = h.status.as_ref().is_some_and(|s| s.ready);
    let mut out = if ready { "Ready" } else { "NotReady" }.to_string();
    if h.spec.drained {
        out.push_str(",Drained");
    } else if h.spec.cordoned {
        out.push_str(",Cordoned");
    }
    out
}

pub async fn get(
    api: &ApiClient,
    what: What,
    name: Option<&str>,
    out: Option<Output>,
    show_secrets: bool,
    selector: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let selector = parse_selector(selector)?;
    match what {
        What::Programs => {
            let mut programs = match name {
                Some(n) => vec![api.program(n).await?],
                None => api.programs().await?,
            };
            programs.retain(|p| matches(&p.metadata.labels, &selector));
            if let Some(o @ (Output::Yaml | Output::Json)) = out {
                // One rule everywhere: environment values only with --show-secrets.
                let programs: Vec<Program> = programs
                    .into_iter()
                    .map(|mut p| {
                        p.spec = redacted(&p.spec, None, show_secrets);
                        p
                    })
                    .collect();
                print_structured(&programs, name.is_some(), o)?;
                return Ok(ExitCode::SUCCESS);
            }
            let wide = out == Some(Output::Wide);
            let mut header = vec!["NAME", "STATE", "DESIRED", "UPDATED", "READY", "HEALTHY", "GENERATION"];
            if wide {
                header.extend(["PLACEMENT", "COMMAND"]);
            }
            let mut t = table(&header);
            for p in &programs {
                let v = status_view(p);
                let mut row = vec![
                    p.metadata.name.clone(),
                    if v.paused {
                        format!("{} (rollout paused)", state_str(p.spec.state))
                    } else {
                        state_str(p.spec.state).to_string()
                    },
                    v.desired.to_string(),
                    v.updated.to_string(),
                    v.ready.to_string(),
                    healthy_of(p.spec.health.is_some(), &v),
                    p.metadata.generation.to_string(),
                ];
                if wide {
                    row.extend([placement(p), p.spec.command.clone()]);
                }
                t.add_row(row);
            }
            outln!("{t}");
        }
        What::Groups => {
            let mut groups = match name {
                Some(n) => vec![api.group(n).await?],
                None => api.groups().await?,
            };
            groups.retain(|g| matches(&g.metadata.labels, &selector));
            if let Some(o @ (Output::Yaml | Output::Json)) = out {
                print_structured(&groups, name.is_some(), o)?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = table(&["NAME", "PROGRAMS", "NATIVE", "PRIORITY"]);
            for g in &groups {
                t.add_row(vec![
                    g.metadata.name.clone(),
                    g.spec.programs.join(","),
                    g.spec.native.to_string(),
                    g.spec.priority.unwrap_or(999).to_string(),
                ]);
            }
            outln!("{t}");
        }
        What::Hosts => {
            let mut hosts = api.hosts().await?;
            if let Some(n) = name {
                hosts.retain(|h| h.metadata.name == n);
                anyhow::ensure!(!hosts.is_empty(), "host {n:?} not found");
            }
            hosts.retain(|h| matches(&h.metadata.labels, &selector));
            if let Some(o @ (Output::Yaml | Output::Json)) = out {
                print_structured(&hosts, name.is_some(), o)?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = table(&["NAME", "READY", "LABELS", "AGENT", "SUPERVISORD", "REASON"]);
            for h in &hosts {
                let s = h.status.clone().unwrap_or_default();
                t.add_row(vec![
                    h.metadata.name.clone(),
                    host_state(h),
                    h.metadata
                        .labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(","),
                    s.agent_version.unwrap_or_default(),
                    s.supervisord_version.unwrap_or_default(),
                    s.reason.unwrap_or_default(),
                ]);
            }
            outln!("{t}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `describe program NAME`: spec, then per-host status and errors.
pub async fn describe(api: &ApiClient, kind: DescribeKind, name: &str, show_secrets: bool) -> anyhow::Result<ExitCode> {
    match kind {
        DescribeKind::Group => {
            let g: Group = api.group(name).await?;
            out!("{}", yaml_of(&g));
        }
        DescribeKind::Host => {
            let h = api
                .hosts()
                .await?
                .into_iter()
                .find(|h| h.metadata.name == name)
                .ok_or_else(|| anyhow::anyhow!("host {name:?} not found"))?;
            let s = h.status.clone().unwrap_or_default();
            outln!("Name:         {}", h.metadata.name);
            outln!("Ready:        {}", if s.ready { "Ready" } else { "NotReady" });
            if let Some(why) = &s.reason {
                outln!("Reason:       {why}");
            }
            let placement = if h.spec.drained {
                "drained (every program taken off; `corral uncordon` undoes it)"
            } else if h.spec.cordoned {
                "cordoned (nothing new placed; what runs stays)"
            } else {
                "schedulable"
            };
            outln!("Placement:    {placement}");
            let labels: Vec<String> = h.metadata.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            outln!("Labels:       {}", labels.join(","));
            // Which of them operators set (kept when the agent registers again).
            if !s.operator_labels.is_empty() || !s.removed_labels.is_empty() {
                let mut by_operators: Vec<String> = s.operator_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                by_operators.extend(s.removed_labels.iter().map(|k| format!("{k}-")));
                outln!("  set by operators: {}", by_operators.join(","));
            }
            outln!("Agent:        {}", s.agent_version.unwrap_or_default());
            outln!("Supervisord:  {}", s.supervisord_version.unwrap_or_default());
            // Its programs and their processes, as its agent last reported them.
            let mut t = table(&["PROGRAM", "GENERATION", "READY", "PROCESSES", "ERROR"]);
            let mut any = false;
            for p in api.programs().await? {
                let Some(view) = p
                    .status
                    .as_ref()
                    .and_then(|st| st.hosts.iter().find(|v| v.host == name))
                else {
                    continue;
                };
                any = true;
                let procs: Vec<String> = view
                    .processes
                    .iter()
                    .map(|pr| match pr.health.as_str() {
                        "" => format!("{} {}", pr.name, pr.state),
                        h => format!("{} {} ({h})", pr.name, pr.state),
                    })
                    .collect();
                t.add_row(vec![
                    p.metadata.name.clone(),
                    view.observed_generation.to_string(),
                    view.ready.to_string(),
                    procs.join(", "),
                    view.error
                        .clone()
                        .or_else(|| view.waiting.as_ref().map(|w| format!("(not an error) {w}")))
                        .unwrap_or_default(),
                ]);
            }
            if any {
                outln!("Programs:");
                outln!("{t}");
            } else {
                outln!("Programs:     none");
            }
        }
        DescribeKind::Program => {
            let p = api.program(name).await?;
            let v = status_view(&p);
            outln!("Name:        {}", p.metadata.name);
            outln!("Generation:  {}", p.metadata.generation);
            outln!("State:       {}", state_str(p.spec.state));
            if v.paused {
                outln!(
                    "Rollout:     paused: no host moves to generation {} until `corral rollout resume {name}`",
                    p.metadata.generation
                );
            }
            match &v.reverted {
                Some(r) if r.revert_generation > 0 => outln!(
                    "Reverted:    generation {} failed on {} at {}: the spec of generation {} was put back (generation {})",
                    r.failed_generation,
                    r.host,
                    r.at,
                    r.to_generation,
                    r.revert_generation
                ),
                Some(r) => outln!(
                    "Reverted:    generation {} failed on {} at {} and was not reverted: {}",
                    r.failed_generation,
                    r.host,
                    r.at,
                    r.not_reverted.as_deref().unwrap_or("no reason recorded")
                ),
                None => {}
            }
            outln!("Placement:   {}", placement(&p));
            outln!(
                "Hosts:       {} desired, {} up to date, {} ready",
                v.desired,
                v.updated,
                v.ready
            );
            outln!("Spec:");
            for l in yaml_of(&redacted(&p.spec, None, show_secrets)).lines() {
                outln!("  {l}");
            }
            let mut t = table(&[
                "HOST",
                "HOST READY",
                "GENERATION",
                "READY",
                "PROCESS",
                "STATE",
                "HEALTH",
                "PID",
                "UPTIME",
            ]);
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            for h in &v.hosts {
                let rows: Vec<_> = if h.processes.is_empty() {
                    vec![None]
                } else {
                    h.processes.iter().map(Some).collect()
                };
                for pr in rows {
                    t.add_row(vec![
                        h.host.clone(),
                        h.host_ready.to_string(),
                        h.observed_generation.to_string(),
                        h.ready.to_string(),
                        pr.map(|p| p.name.clone()).unwrap_or_default(),
                        pr.map(|p| p.state.clone()).unwrap_or_default(),
                        pr.map(|p| p.health.clone()).unwrap_or_default(),
                        pr.filter(|p| p.pid > 0).map(|p| p.pid.to_string()).unwrap_or_default(),
                        pr.filter(|p| p.pid > 0 && p.started_at > 0)
                            .map(|p| format!("{}s", now - p.started_at))
                            .unwrap_or_default(),
                    ]);
                }
            }
            outln!("Status:\n{t}");
            let errors: Vec<_> = v
                .hosts
                .iter()
                .filter_map(|h| h.error.as_ref().map(|e| (h.host.clone(), e)))
                .collect();
            if !errors.is_empty() {
                outln!("Errors:");
                for (h, e) in errors {
                    outln!("  {h}: {e}");
                }
            }
            let waiting: Vec<_> = v
                .hosts
                .iter()
                .filter_map(|h| h.waiting.as_ref().map(|w| (h.host.clone(), w)))
                .collect();
            if !waiting.is_empty() {
                outln!("Waiting (depends_on):");
                for (h, w) in waiting {
                    outln!("  {h}: {w}");
                }
            }
            let failing: Vec<_> = v
                .hosts
                .iter()
                .flat_map(|h| h.processes.iter().map(move |p| (h.host.as_str(), p)))
                .filter(|(_, p)| {
                    // Restarted by the policy and not back RUNNING (and healthy) yet.
                    matches!(p.state.as_str(), "FATAL" | "BACKOFF" | "EXITED")
                        || (p.crash_restarts > 0 && p.state != "RUNNING")
                        || p.health == "unhealthy"
                })
                .collect();
            if !failing.is_empty() {
                outln!("Failing processes:");
                for (host, p) in failing {
                    outln!("  {host} {}: {}", p.name, process_problem(p, now));
                    for l in p.stderr_tail.lines() {
                        outln!("    | {}", crate::logs::visible(l));
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `delete program|group NAME` or `delete -f FILE`.
pub async fn delete(
    api: &ApiClient,
    target: Option<(KindArg, String)>,
    files: &[String],
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let mut targets: Vec<(Kind, String)> = Vec::new();
    if let Some((k, n)) = target {
        targets.push((k.kind(), n));
    }
    if !files.is_empty() {
        let docs = read_resources(files)?;
        anyhow::ensure!(docs.errors.is_empty(), "{}", docs.errors.join("\n"));
        targets.extend(
            docs.resources
                .iter()
                .map(|(_, r)| (r.kind(), r.metadata().name.clone())),
        );
    }
    anyhow::ensure!(!targets.is_empty(), "name a program or group, or give -f FILE");
    let mut worst = exit::Worst::default();
    for (kind, name) in targets {
        let what = format!("{}/{name}", kind.as_str().to_lowercase());
        match api.delete(kind, &name, dry_run).await {
            Ok(_) => outln!("{what} deleted{}", if dry_run { " (dry run)" } else { "" }),
            Err(e) => {
                eprintln!("{what}: {e}");
                worst.failed(&e);
            }
        }
    }
    Ok(worst.code())
}

/// The programs `NAME` or `GROUP:` stands for.
pub async fn targets(api: &ApiClient, name: &str) -> Result<Vec<String>, ClientError> {
    match name.strip_suffix(':') {
        Some(group) => Ok(api.group(group).await?.spec.programs),
        None => Ok(vec![name.to_string()]),
    }
}

/// `start|stop|restart|signal NAME|GROUP:`: an action on each program, carried out by the
/// controller as one atomic spec change (so every host follows, a stopped program stays
/// stopped across supervisord restarts, and concurrent actions never lose a race).
pub async fn change(api: &ApiClient, name: &str, action: ProgramAction) -> anyhow::Result<ExitCode> {
    let mut worst = exit::Worst::default();
    for program in targets(api, name).await.with_context(|| format!("resolve {name}"))? {
        match api.act(&program, &action).await {
            Ok(r) => {
                let verb = match action {
                    ProgramAction::Start => "started",
                    ProgramAction::Stop => "stopped",
                    ProgramAction::Restart => "restarting",
                    ProgramAction::Signal { .. } => "signalled",
                    ProgramAction::Pause => "rollout paused",
                    ProgramAction::Resume => "rollout resumed",
                };
                let note = if r.result == Outcome::Unchanged {
                    " (already)"
                } else {
                    ""
                };
                outln!("program/{program} {verb}{note}");
            }
            Err(e) => {
                eprintln!("program/{program}: {e}");
                if e.status() == Some(404) && !name.ends_with(':') && api.group(name).await.is_ok() {
                    eprintln!("hint: {name:?} is a group: write `{name}:` for its programs");
                }
                worst.failed(&e);
            }
        }
    }
    Ok(worst.code())
}

/// `status`: what in the fleet is not as declared. Exit 0 when all is, 1 otherwise.
pub async fn status(api: &ApiClient, out: Option<Output>) -> anyhow::Result<ExitCode> {
    let s: FleetStatus = api.status().await?;
    if let Some(o @ (Output::Yaml | Output::Json)) = out {
        print_structured(&[&s], true, o)?;
    } else {
        if !s.control_plane.is_empty() {
            outln!("Control plane: {} problem(s)", s.control_plane.len());
            for p in &s.control_plane {
                outln!("  {p}");
            }
        }
        if !s.warnings.is_empty() {
            outln!("Warnings: {}", s.warnings.len());
            for w in &s.warnings {
                outln!("  {w}");
            }
        }
        outln!("Hosts: {}/{} ready", s.hosts_ready, s.hosts);
        for (h, how) in &s.unschedulable {
            outln!("  {h}: {how} (corral uncordon {h})");
        }
        for h in &s.not_ready_hosts {
            let why = s.not_ready_reasons.get(h).map_or("agent not reporting", String::as_str);
            outln!("  {h}: NotReady ({why})");
        }
        let off: BTreeMap<&str, _> = s
            .programs
            .iter()
            .filter(|p| p.ready != p.desired)
            .map(|p| (p.name.as_str(), p))
            .collect();
        outln!("Programs: {} declared, {} not as declared", s.programs.len(), off.len());
        for (name, p) in off {
            outln!(
                "  {name}: {}/{} ready, {}/{} up to date{}",
                p.ready,
                p.desired,
                p.updated,
                p.desired,
                if p.paused { " (rollout paused)" } else { "" }
            );
            for problem in &p.problems {
                outln!("    {problem}");
            }
        }
    }
    Ok(exit::code(if s.converged() { exit::OK } else { exit::REFUSED }))
}

/// One line on a failing process, with when the crash-loop policy starts it next.
/// `get programs`' HEALTHY column: processes passing their check of those checked (`-`
/// without a check).
fn healthy_of(checked: bool, v: &ProgramStatusView) -> String {
    if !checked {
        return "-".to_string();
    }
    let procs = v
        .hosts
        .iter()
        .flat_map(|h| h.processes.iter())
        .filter(|p| !p.health.is_empty());
    let (healthy, all) = procs.fold((0, 0), |(h, a), p| (h + usize::from(p.health == "healthy"), a + 1));
    format!("{healthy}/{all}")
}

fn process_problem(p: &corral_proto::fleet::ProcessStatus, now: i64) -> String {
    let mut line = p.summary();
    if p.next_retry_at > 0 {
        line.push_str(&format!(", next start in {}s", (p.next_retry_at - now).max(0)));
    }
    line
}

/// `version`: this client's, then the controller's (exit 3 when it cannot be reached).
pub async fn version(api: &ApiClient) -> anyhow::Result<ExitCode> {
    outln!("client: {}", env!("CARGO_PKG_VERSION"));
    match api.server_version().await {
        Ok(v) => {
            outln!("server: {v} ({})", api.base());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("server: {e}");
            Ok(exit::code(exit::of_client(&e)))
        }
    }
}

/// What `corral history --kind` narrows to.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum HistoryKind {
    Program,
    Group,
    Host,
}

/// `corral history [NAME]`: who changed what, newest first.
pub async fn history(
    api: &ApiClient,
    kind: Option<HistoryKind>,
    name: Option<&str>,
    limit: usize,
    out: Option<Output>,
) -> anyhow::Result<ExitCode> {
    let kind = kind.map(|k| match k {
        HistoryKind::Program => Kind::Program,
        HistoryKind::Group => Kind::Group,
        HistoryKind::Host => Kind::Host,
    });
    let entries = api.history(kind, name, limit).await?;
    if let Some(o @ (Output::Yaml | Output::Json)) = out {
        print_structured(&entries, false, o)?;
        return Ok(ExitCode::SUCCESS);
    }
    if entries.is_empty() {
        outln!(
            "No changes recorded{}.",
            name.map(|n| format!(" for {n}")).unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = table(&["TIME", "WHO", "VERB", "OBJECT", "GENERATION", "CHANGED"]);
    for e in &entries {
        t.add_row(vec![
            e.at.clone(),
            format!("{} ({})", e.who, e.role),
            e.verb.clone(),
            format!("{}/{}", e.kind.as_str().to_lowercase(), e.name),
            e.generation.map_or_else(|| "-".to_string(), |g| g.to_string()),
            if e.changes.is_empty() {
                "-".to_string()
            } else {
                e.changes.join(", ")
            },
        ]);
    }
    outln!("{t}");
    Ok(ExitCode::SUCCESS)
}

//! `corral rollout status|history|undo|pause|resume` and `apply --wait`: following a
//! program's rollout until it is complete, paused or stalled. What a rollout's state is, is
//! decided by [`state_of`] (pure); the loop only polls and prints.

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use corral_cli::client::ApiClient;
use corral_proto::api::ProgramAction;
use corral_proto::resource::Program;

use crate::exit;

/// Where a rollout stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Every host runs the current generation and is ready.
    Complete,
    /// Hosts are moving on.
    Progressing,
    /// `corral rollout pause`: no host moves on until resumed.
    Paused,
    /// The generation followed failed and `spec.rollout.auto_revert` put back an older spec.
    Reverted(corral_proto::api::AutoRevert),
}

/// One look at a rollout: its state, its numbers, and the hosts failing at the current
/// generation (`host: why`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Look {
    pub state: State,
    pub generation: u64,
    pub desired: usize,
    pub updated: usize,
    pub ready: usize,
    pub failing: Vec<String>,
}

/// Decides a rollout's state from the program as the API shows it, following generation
/// `following` (or a later one): one that was automatically reverted is over.
pub fn state_of(p: &Program, following: u64) -> Look {
    let view = p.status.clone().unwrap_or_default();
    let generation = p.metadata.generation;
    let complete = view.updated == view.desired && view.ready == view.desired;
    let reverted = view.reverted.clone().filter(|r| r.failed_generation >= following);
    let state = match (reverted, complete, view.paused) {
        (Some(r), _, _) => State::Reverted(r),
        (None, true, _) => State::Complete,
        (None, false, true) => State::Paused,
        (None, false, false) => State::Progressing,
    };
    // Failing at this generation: it failed there (refused, a process FATAL, unhealthy or
    // restarted by the crash-loop policy), or it runs it with an error.
    let failing = view
        .hosts
        .iter()
        .filter(|h| !h.ready)
        .filter(|h| h.failed_generation >= generation || (h.observed_generation >= generation && h.error.is_some()))
        .map(|h| {
            let why = h.error.clone().unwrap_or_else(|| {
                h.processes
                    .iter()
                    .map(|p| format!("{} {}", p.name, p.summary()))
                    .collect::<Vec<_>>()
                    .join(", ")
            });
            format!("{}: {why}", h.host)
        })
        .collect();
    Look {
        state,
        generation,
        desired: view.desired,
        updated: view.updated,
        ready: view.ready,
        failing,
    }
}

fn line(name: &str, l: &Look) -> String {
    format!(
        "{name}: generation {}: {}/{} hosts updated, {}/{} ready",
        l.generation, l.updated, l.desired, l.ready, l.desired
    )
}

fn bar(name: &str, l: &Look) -> String {
    const WIDTH: usize = 30;
    let filled = (l.ready * WIDTH).checked_div(l.desired).unwrap_or(WIDTH);
    format!(
        "\r{name} [{}{}] {}/{} ready, {}/{} updated (generation {})",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        l.ready,
        l.desired,
        l.updated,
        l.desired,
        l.generation
    )
}

/// Follows `name`'s rollout: prints progress (a bar on a terminal, a line per change
/// otherwise) until it is complete (exit 0), paused, stalled (hosts failing at the new
/// generation and no progress for `stall`) or `timeout` passes (exit 1). With `wait` false,
/// one look.
///
/// # Errors
/// The controller's errors.
pub async fn follow(api: &ApiClient, name: &str, wait: bool, timeout: Duration, stall: Duration) -> anyhow::Result<u8> {
    let terminal = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut last: Option<Look> = None;
    let mut progress_at = Instant::now();
    let mut following = None;
    loop {
        let program = api.program(name).await?;
        let following = *following.get_or_insert(program.metadata.generation);
        let look = state_of(&program, following);
        let moved = last
            .as_ref()
            .is_none_or(|l| (l.generation, l.updated, l.ready) != (look.generation, look.updated, look.ready));
        if moved {
            progress_at = Instant::now();
        }
        if terminal {
            out!("{}", bar(name, &look));
        } else if moved || last.as_ref().is_some_and(|l| l.failing != look.failing) {
            outln!("{}", line(name, &look));
            for f in &look.failing {
                outln!("  failing: {f}");
            }
        }
        let end = |said: String, code: u8| {
            if terminal {
                outln!();
                for f in &look.failing {
                    outln!("  failing: {f}");
                }
            }
            outln!("{said}");
            code
        };
        match look.state {
            State::Complete => {
                return Ok(end(
                    format!(
                        "{name}: rollout complete: {} hosts at generation {}",
                        look.desired, look.generation
                    ),
                    exit::OK,
                ));
            }
            State::Reverted(r) if r.revert_generation > 0 => {
                return Ok(end(
                    format!(
                        "{name}: generation {} failed on {}: reverted automatically to the spec of generation {} (now generation {})",
                        r.failed_generation, r.host, r.to_generation, r.revert_generation
                    ),
                    exit::REFUSED,
                ));
            }
            State::Reverted(r) => {
                return Ok(end(
                    format!(
                        "{name}: generation {} failed on {} and was not reverted: {}",
                        r.failed_generation,
                        r.host,
                        r.not_reverted.as_deref().unwrap_or("no reason recorded")
                    ),
                    exit::REFUSED,
                ));
            }
            State::Paused => {
                return Ok(end(
                    format!("{name}: rollout paused (corral rollout resume {name})"),
                    exit::REFUSED,
                ));
            }
            State::Progressing if !wait => {
                return Ok(end(format!("{name}: rollout in progress"), exit::REFUSED));
            }
            State::Progressing if !look.failing.is_empty() && progress_at.elapsed() >= stall => {
                return Ok(end(
                    format!(
                        "{name}: rollout stalled: no progress for {}s with hosts failing (corral describe program {name}; corral rollout undo {name})",
                        stall.as_secs()
                    ),
                    exit::REFUSED,
                ));
            }
            State::Progressing if started.elapsed() >= timeout => {
                return Ok(end(
                    format!("{name}: rollout not complete after {}s", timeout.as_secs()),
                    exit::REFUSED,
                ));
            }
            State::Progressing => {}
        }
        last = Some(look);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `corral rollout history NAME`: the kept generations, what each changed and who applied it.
pub async fn history(api: &ApiClient, name: &str) -> anyhow::Result<ExitCode> {
    let revisions = api.revisions(name).await?;
    let current = api.program(name).await?.metadata.generation;
    let mut t = crate::online::table(&["GENERATION", "TIME", "WHO", "CHANGED"]);
    for (i, r) in revisions.iter().enumerate() {
        let changed = match revisions.get(i + 1) {
            Some(before) => {
                let v = |s| serde_json::to_value(s).unwrap_or_default();
                let fields = corral_proto::api::changed_fields(&v(&before.spec), &v(&r.spec));
                if fields.is_empty() {
                    "-".to_string()
                } else {
                    fields.join(", ")
                }
            }
            None => "(oldest kept)".to_string(),
        };
        let g = if r.generation == current {
            format!("{} (current)", r.generation)
        } else {
            r.generation.to_string()
        };
        t.add_row(vec![g, r.at.clone(), r.who.clone(), changed]);
    }
    outln!("{t}");
    Ok(ExitCode::SUCCESS)
}

/// `corral rollout undo NAME [--to-revision N]`.
pub async fn undo(api: &ApiClient, name: &str, to: Option<u64>) -> anyhow::Result<ExitCode> {
    let r = api.rollback(name, to).await?;
    outln!(
        "program/{name} rolled back: generation {} has the spec of {}",
        r.object.metadata.generation,
        to.map_or_else(|| "the one before".to_string(), |g| format!("generation {g}"))
    );
    Ok(ExitCode::SUCCESS)
}

/// `corral rollout pause|resume NAME`.
pub async fn pause(api: &ApiClient, name: &str, paused: bool) -> anyhow::Result<ExitCode> {
    let action = if paused {
        ProgramAction::Pause
    } else {
        ProgramAction::Resume
    };
    api.act(name, &action).await?;
    outln!(
        "program/{name} {}",
        if paused {
            "rollout paused: no host moves to a newer generation until resumed"
        } else {
            "rollout resumed"
        }
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::fleet::{HostProgramView, ProgramStatusView};
    use corral_proto::resource::{Metadata, ProgramSpec};

    fn program(generation: u64, view: ProgramStatusView) -> Program {
        let mut p = Program::new(
            Metadata {
                name: "web".into(),
                generation,
                ..Default::default()
            },
            ProgramSpec::default(),
        );
        p.status = Some(view);
        p
    }

    fn host(name: &str, generation: u64, ready: bool, error: Option<&str>) -> HostProgramView {
        HostProgramView {
            host: name.into(),
            host_ready: true,
            observed_generation: generation,
            ready,
            processes: vec![],
            error: error.map(String::from),
            waiting: None,
            failed_generation: 0,
        }
    }

    #[test]
    fn a_rollout_is_complete_paused_or_progressing_with_the_hosts_failing_at_its_generation() {
        let view = |updated, ready, paused, hosts| ProgramStatusView {
            desired: 3,
            updated,
            ready,
            hosts,
            paused,
            ..Default::default()
        };
        assert_eq!(
            state_of(&program(2, view(3, 3, false, vec![])), 2).state,
            State::Complete
        );
        assert_eq!(
            state_of(&program(2, view(3, 3, true, vec![])), 2).state,
            State::Complete
        );
        assert_eq!(state_of(&program(2, view(1, 1, true, vec![])), 2).state, State::Paused);
        let l = state_of(
            &program(
                2,
                view(
                    2,
                    1,
                    false,
                    vec![
                        host("h1", 2, true, None),
                        host("h2", 2, false, Some("FATAL: exited too quickly")),
                        host("h3", 1, false, Some("an old error")),
                    ],
                ),
            ),
            2,
        );
        assert_eq!(l.state, State::Progressing);
        assert_eq!(l.failing, ["h2: FATAL: exited too quickly"]);
        // A host where the generation failed (supervisord refused it: it still runs the old
        // one), or whose process is FATAL with no error, is failing too.
        let mut refused = host("h3", 1, false, Some("supervisord refused the file"));
        refused.failed_generation = 2;
        let mut fatal = host("h1", 2, false, None);
        fatal.failed_generation = 2;
        fatal.processes = vec![corral_proto::fleet::ProcessStatus {
            name: "web".into(),
            state: "FATAL".into(),
            ..Default::default()
        }];
        let both = state_of(&program(2, view(2, 0, false, vec![fatal, refused])), 2);
        assert_eq!(both.failing, ["h1: web FATAL", "h3: supervisord refused the file"]);
        assert_eq!((l.updated, l.ready, l.desired), (2, 1, 3));
        // Placed nowhere: nothing to wait for.
        let none = ProgramStatusView::default();
        assert_eq!(state_of(&program(1, none), 1).state, State::Complete);
        // Generation 2 followed, failed, and reverted as generation 3, which is complete:
        // the rollout followed is over, and not a success.
        let revert = corral_proto::api::AutoRevert {
            failed_generation: 2,
            host: "h2".into(),
            to_generation: 1,
            revert_generation: 3,
            at: String::new(),
            not_reverted: None,
        };
        let mut reverted = view(3, 3, false, vec![]);
        reverted.reverted = Some(revert.clone());
        assert_eq!(
            state_of(&program(3, reverted.clone()), 2).state,
            State::Reverted(revert)
        );
        // Following generation 3 (the revert itself, or later) it is just complete.
        assert_eq!(state_of(&program(3, reverted), 3).state, State::Complete);
    }
}

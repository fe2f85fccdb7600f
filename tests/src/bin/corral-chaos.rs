//! `corral-chaos`: the chaos scenario of the test suite, as long as asked (`scripts/chaos`).
//! Prints faults injected, changes made, specs lost, needless restarts, final mismatches,
//! orphaned processes and time to converge; exits 1 if anything was lost, restarted
//! needlessly, left running outside supervisord or never converged.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use corral_tests::chaos::{Options, run};

/// Chaos against a whole local Corral: 3-member etcd, 2 controllers, 3 hosts.
#[derive(Debug, Parser)]
struct Args {
    /// Seed of the faults and changes chosen (the same seed makes the same choices).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run for this many seconds ...
    #[arg(long, default_value_t = 600)]
    duration_secs: u64,
    /// ... or this many steps, whichever comes first.
    #[arg(long)]
    steps: Option<usize>,
    /// Print each step.
    #[arg(long)]
    verbose: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let opts = Options {
        seed: args.seed,
        steps: args.steps,
        duration: Some(Duration::from_secs(args.duration_secs)),
        converge_timeout: Duration::from_secs(90),
        verbose: args.verbose,
        in_turn: false,
    };
    match run(&opts).await {
        Ok(report) => {
            print!("{report}");
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}

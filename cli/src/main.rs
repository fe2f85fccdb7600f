//! `corral`: Corral's command line. `main` parses arguments and hands off to one function per
//! command; offline commands use `corral-proto`, online ones the controller's API.

#[macro_use]
mod output;

mod dev;
mod exit;
mod input;
mod offline;
mod online;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use corral_cli::client::ApiClient;
use corral_proto::api::ProgramAction;

use crate::online::{DescribeKind, KindArg, Output, What};

/// Declarative, continuously reconciled supervisord across a fleet.
#[derive(Debug, Parser)]
#[command(name = "corral", version, about)]
struct Cli {
    /// The controller's URL.
    #[arg(long, global = true, env = "CORRAL_SERVER", default_value = "http://127.0.0.1:7070")]
    server: String,
    /// Bearer token for the controller.
    #[arg(long, global = true, env = "CORRAL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update Programs and Groups from files.
    Apply {
        /// A YAML/JSON file, a directory of them, or - for stdin. Repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
        /// Validate and show the result without writing anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show what apply would change. Exit 0: nothing, 1: changes, 2: errors.
    Diff {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
        /// Show environment values (hidden by default: they are often secrets).
        #[arg(long)]
        show_secrets: bool,
    },
    /// List programs, groups or hosts.
    Get {
        what: What,
        name: Option<String>,
        #[arg(short = 'o', long = "output")]
        output: Option<Output>,
        /// Show environment values in -o yaml|json (hidden by default: they are often secrets).
        #[arg(long)]
        show_secrets: bool,
    },
    /// Show a program's spec, per-host status and errors; a group; a host and why it is not ready.
    Describe {
        kind: DescribeKind,
        name: String,
        /// Show environment values (hidden by default: they are often secrets).
        #[arg(long)]
        show_secrets: bool,
    },
    /// Delete a program or group (or everything in -f FILE).
    Delete {
        kind: Option<KindArg>,
        name: Option<String>,
        #[arg(short = 'f', long = "filename")]
        files: Vec<String>,
        #[arg(long)]
        dry_run: bool,
    },
    /// Set a program's (or a group's programs', with NAME:) desired state to running.
    Start { name: String },
    /// Set a program's (or a group's programs', with NAME:) desired state to stopped.
    Stop { name: String },
    /// Restart a program (or a group's programs, with NAME:) on every host.
    Restart { name: String },
    /// Send a signal (HUP, USR1, ...) once to every running process of a program (or of a
    /// group's programs, with NAME:), on every host.
    Signal { signal: String, name: String },
    /// What in the fleet is not as declared. Exit 0 when everything is.
    Status {
        #[arg(short = 'o', long = "output")]
        output: Option<Output>,
    },
    /// This client's version and the controller's.
    Version,
    /// A completion script for your shell, e.g. `corral completion bash > /etc/bash_completion.d/corral`.
    Completion { shell: clap_complete::Shell },
    /// Print the supervisord conf file each Program (and native Group) renders to.
    ///
    /// Every document is validated first; if any is invalid, every error is printed on
    /// stderr, nothing on stdout, and the exit code is 2.
    Render {
        /// A YAML/JSON file, a directory of them, or - for stdin. Repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
    },
    /// Turn existing supervisord conf files into Corral YAML on stdout.
    ///
    /// `[program:x]` becomes a Program with the same options, `[group:x]` a native Group.
    Import {
        /// Conf files, or directories whose *.conf files are read.
        #[arg(required = true)]
        paths: Vec<String>,
        /// Host labels the imported programs select, e.g. role=app,env=prod (default: every host).
        #[arg(long, value_name = "K=V[,K=V]", conflicts_with = "hosts")]
        selector: Option<String>,
        /// Explicit hosts for the imported programs, e.g. web1,web2.
        #[arg(long, value_name = "HOST[,HOST]")]
        hosts: Option<String>,
    },
    /// Run a single-host Corral here (etcd, supervisord, controller, agent) until Ctrl-C.
    Dev {
        /// Where everything lives (data, logs, sockets).
        #[arg(long, default_value = ".corral-dev")]
        dir: PathBuf,
        /// Specs to apply once it is up.
        #[arg(long, default_value = "deploy/examples")]
        apply: PathBuf,
        /// Port for the controller's API (another is picked if it is taken).
        #[arg(long, default_value_t = 7070)]
        port: u16,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let api = || ApiClient::new(&cli.server, cli.token.clone());
    let result = async {
        match &cli.command {
            Command::Render { files } => offline::render(files),
            Command::Import { paths, selector, hosts } => offline::import(paths, selector.as_deref(), hosts.as_deref()),
            Command::Dev { dir, apply, port } => {
                let apply = if apply.exists() {
                    Some(apply.as_path())
                } else {
                    eprintln!("note: {} does not exist: nothing will be applied", apply.display());
                    None
                };
                dev::dev(dir, apply, *port, cli.token.as_deref()).await
            }
            Command::Apply { files, dry_run } => online::apply(&api()?, files, *dry_run).await,
            Command::Diff { files, show_secrets } => online::diff(&api()?, files, *show_secrets).await,
            Command::Get {
                what,
                name,
                output,
                show_secrets,
            } => online::get(&api()?, *what, name.as_deref(), *output, *show_secrets).await,
            Command::Describe {
                kind,
                name,
                show_secrets,
            } => online::describe(&api()?, *kind, name, *show_secrets).await,
            Command::Delete {
                kind,
                name,
                files,
                dry_run,
            } => {
                let target = match (kind, name) {
                    (Some(k), Some(n)) => Some((*k, n.clone())),
                    (None, None) => None,
                    _ => anyhow::bail!("delete takes KIND NAME (program web) or -f FILE"),
                };
                online::delete(&api()?, target, files, *dry_run).await
            }
            Command::Start { name } => online::change(&api()?, name, ProgramAction::Start).await,
            Command::Stop { name } => online::change(&api()?, name, ProgramAction::Stop).await,
            Command::Restart { name } => online::change(&api()?, name, ProgramAction::Restart).await,
            Command::Signal { signal, name } => {
                let sig = corral_proto::signal::canonical(signal)
                    .ok_or_else(|| anyhow::anyhow!("{signal:?} is not a signal name (HUP, INT, USR1, USR2, ...)"))?;
                online::change(
                    &api()?,
                    name,
                    ProgramAction::Signal {
                        signal: sig.to_string(),
                    },
                )
                .await
            }
            Command::Status { output } => online::status(&api()?, *output).await,
            Command::Version => online::version(&api()?).await,
            Command::Completion { shell } => {
                use clap::CommandFactory as _;
                let mut out = Vec::new();
                clap_complete::generate(*shell, &mut Cli::command(), "corral", &mut out);
                out!("{}", String::from_utf8_lossy(&out));
                Ok(ExitCode::SUCCESS)
            }
        }
    }
    .await;
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit::code(exit::of_error(&e))
        }
    }
}

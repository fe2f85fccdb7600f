//! `corral`: Corral's command line. `main` parses arguments and hands off to one function per
//! command; offline commands use `corral-proto`, online ones the controller's API.

#[macro_use]
mod output;

mod dev;
mod exit;
mod input;
mod logs;
mod offline;
mod online;
mod rollout;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use corral_cli::client::ApiClient;
use corral_proto::api::ProgramAction;

use crate::online::{DescribeKind, KindArg, Output, What};

/// Declarative, continuously reconciled supervisord across a fleet.
#[derive(Debug, Parser)]
#[command(
    name = "corral",
    version,
    about,
    after_help = "Exit codes (every command):\n  0  done; diff: nothing would change; status: everything is as declared\n  1  diff: something would change; status: something is not as declared;\n     otherwise: the controller refused something (the rest was done)\n  2  invalid input or usage; nothing was sent\n  3  the controller could not be reached, or it could not reach etcd"
)]
struct Cli {
    /// The controller's URL.
    #[arg(long, global = true, env = "CORRAL_SERVER", default_value = "http://127.0.0.1:7070")]
    server: String,
    /// Bearer token for the controller.
    #[arg(long, global = true, env = "CORRAL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) that signed an https controller's certificate (default: the
    /// system's CAs).
    #[arg(long, global = true, env = "CORRAL_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for a controller that asks for one.
    #[arg(long, global = true, env = "CORRAL_CERT_FILE", requires = "key_file")]
    cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, global = true, env = "CORRAL_KEY_FILE", requires = "cert_file")]
    key_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update Programs and Groups from files.
    #[command(
        after_help = "Examples:\n  corral apply -f deploy/examples/\n  corral apply -f web.yaml --wait\n  corral apply -f web.yaml --dry-run\n  corral get programs -o json --show-secrets | corral apply -f -"
    )]
    Apply {
        /// A YAML/JSON file, a directory of them (*.yaml, *.yml, *.json), or - for stdin. Repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
        /// Validate and show the result without writing anything.
        #[arg(long)]
        dry_run: bool,
        /// Follow each applied program's rollout until it is complete; exit 1 if one is
        /// paused, stalls or is not complete within --timeout-secs.
        #[arg(long)]
        wait: bool,
        /// With --wait: the longest to wait for each program.
        #[arg(long, default_value_t = 300, requires = "wait")]
        timeout_secs: u64,
        /// With --wait: give up on a rollout whose hosts fail at the new generation and that
        /// made no progress for this long.
        #[arg(long, default_value_t = 60, requires = "wait")]
        stall_secs: u64,
    },
    /// Show what apply would change, and which processes it would start, restart or stop.
    /// Exit 0: nothing, 1: changes, 2: invalid input.
    #[command(
        after_help = "Examples:\n  corral diff -f web.yaml\n  corral diff -f deploy/examples/ && echo nothing to apply"
    )]
    Diff {
        /// A YAML/JSON file, a directory of them (*.yaml, *.yml, *.json), or - for stdin. Repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
        /// Show environment values (hidden by default: they are often secrets).
        #[arg(long)]
        show_secrets: bool,
    },
    /// List programs, groups or hosts.
    #[command(
        after_help = "Examples:\n  corral get programs\n  corral get hosts -l role=web\n  corral get program web -o yaml"
    )]
    Get {
        what: What,
        name: Option<String>,
        /// wide: more columns; yaml or json: whole objects.
        #[arg(short = 'o', long = "output")]
        output: Option<Output>,
        /// Show environment values in -o yaml|json (hidden by default: they are often secrets).
        #[arg(long)]
        show_secrets: bool,
        /// Only those whose labels match, e.g. -l role=web,zone=a.
        #[arg(short = 'l', long = "selector", value_name = "K=V[,K=V]")]
        selector: Option<String>,
    },
    /// Show a program's spec, per-host status and errors; a group; a host and why it is not ready.
    #[command(after_help = "Examples:\n  corral describe program web\n  corral describe host web1")]
    Describe {
        kind: DescribeKind,
        name: String,
        /// Show environment values (hidden by default: they are often secrets).
        #[arg(long)]
        show_secrets: bool,
    },
    /// Delete a program or group (or everything in -f FILE).
    #[command(after_help = "Examples:\n  corral delete program web\n  corral delete -f deploy/examples/ --dry-run")]
    Delete {
        kind: Option<KindArg>,
        name: Option<String>,
        /// A YAML/JSON file, a directory of them (*.yaml, *.yml, *.json), or - for stdin. Repeatable.
        #[arg(short = 'f', long = "filename")]
        files: Vec<String>,
        /// Say what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Set a program's (or a group's programs', with NAME:) desired state to running.
    #[command(after_help = "Examples:\n  corral start celery-beat\n  corral start myapp:")]
    Start { name: String },
    /// Set a program's (or a group's programs', with NAME:) desired state to stopped.
    #[command(after_help = "Examples:\n  corral stop celery-beat\n  corral stop myapp:")]
    Stop { name: String },
    /// Restart a program (or a group's programs, with NAME:) on every host.
    #[command(after_help = "Examples:\n  corral restart web\n  corral restart myapp:")]
    Restart { name: String },
    /// Send a signal (HUP, USR1, ...) once to every running process of a program (or of a
    /// group's programs, with NAME:), on every host.
    #[command(after_help = "Examples:\n  corral signal HUP gunicorn\n  corral signal USR1 myapp:")]
    Signal { signal: String, name: String },
    /// A program's rollout: follow it, list its kept revisions, go back to one, pause or
    /// resume it.
    #[command(
        subcommand,
        after_help = "Examples:\n  corral rollout status web\n  corral rollout history web\n  corral rollout undo web --to-revision 3\n  corral rollout pause web"
    )]
    Rollout(RolloutCommand),
    /// Set or remove a host's labels (over what its agent registered): K=V sets, K- removes.
    /// Labels place programs, so this needs an admin token.
    #[command(after_help = "Examples:\n  corral label host web1 tier=gold\n  corral label host web1 tier- zone=b")]
    Label {
        kind: online::LabelKind,
        name: String,
        #[arg(required = true, value_name = "K=V|K-")]
        labels: Vec<String>,
    },
    /// Place nothing new on a host; what runs there stays and follows its spec.
    #[command(after_help = "Example:\n  corral cordon web1")]
    Cordon { host: String },
    /// Undo cordon and drain: the host gets its programs again.
    #[command(after_help = "Example:\n  corral uncordon web1")]
    Uncordon { host: String },
    /// Cordon a host and take every program off it (its agent stops them).
    #[command(after_help = "Example:\n  corral drain web1 && corral describe host web1")]
    Drain { host: String },
    /// What in the fleet is not as declared. Exit 0 when everything is.
    #[command(after_help = "Examples:\n  corral status\n  corral status -o json")]
    Status {
        /// yaml or json: the whole fleet status.
        #[arg(short = 'o', long = "output")]
        output: Option<Output>,
    },
    /// Who changed what, newest first: every apply, delete, start, stop, restart, signal,
    /// rollout pause, resume and undo, host label, cordon, uncordon and drain, with the token's
    /// name and role and the fields that changed (never their values).
    #[command(
        after_help = "Examples:\n  corral history\n  corral history web --limit 10\n  corral history web1 --kind host -o json"
    )]
    History {
        /// Only the changes of what has this name (a program, a group or, with --kind host, a
        /// host).
        name: Option<String>,
        /// Only programs, groups or hosts.
        #[arg(long)]
        kind: Option<online::HistoryKind>,
        /// How many entries, newest first (1 to 10000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=10000))]
        limit: u16,
        /// yaml or json: the entries as objects.
        #[arg(short = 'o', long = "output")]
        output: Option<Output>,
    },
    /// supervisord's log of every process of a program (or of each program of `GROUP:`) on
    /// every host it runs on, each line prefixed with its host and process. Read by each
    /// host's agent, asked through the controller: any token may read logs.
    #[command(
        after_help = "Examples:\n  corral logs web\n  corral logs web --host web1 -f\n  corral logs myapp: --stderr --tail 10000"
    )]
    Logs {
        /// A program, or GROUP: for each of its programs.
        name: String,
        /// Only this host.
        #[arg(long)]
        host: Option<String>,
        /// Keep printing what is written, until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// How many of the last bytes of each process's log (1 to 65536; default 4096, and
        /// 65536 with --since, which looks only within them).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65536))]
        tail: Option<u32>,
        /// The stderr log instead of stdout (with redirect_stderr, stderr is in stdout's).
        #[arg(long)]
        stderr: bool,
        /// Only lines from this long ago on (30s, 10m, 2h, 1d), by the time each line starts
        /// with (supervisord keeps none; a line without one goes with the line before it).
        #[arg(long, value_parser = logs::parse_since)]
        since: Option<std::time::Duration>,
    },
    /// This client's version and the controller's.
    #[command(after_help = "Example:\n  corral version")]
    Version,
    /// A completion script for your shell.
    #[command(
        after_help = "Examples:\n  corral completion bash > /etc/bash_completion.d/corral\n  corral completion zsh > \"${fpath[1]}/_corral\""
    )]
    Completion { shell: clap_complete::Shell },
    /// Print the supervisord conf file each Program (and native Group) renders to.
    ///
    /// Every document is validated first; if any is invalid, every error is printed on
    /// stderr, nothing on stdout, and the exit code is 2.
    #[command(after_help = "Examples:\n  corral render -f web.yaml\n  corral render -f deploy/examples/")]
    Render {
        /// A YAML/JSON file, a directory of them (*.yaml, *.yml, *.json), or - for stdin. Repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
    },
    /// Turn existing supervisord conf files into Corral YAML on stdout.
    ///
    /// `[program:x]` becomes a Program with the same options, `[group:x]` a native Group.
    #[command(
        after_help = "Examples:\n  corral import /etc/supervisor/conf.d/ --selector role=app > app.yaml\n  corral import worker.conf --hosts web1,web2"
    )]
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
        /// Import the rest when a file has [eventlistener:x] or [fcgi-program:x] sections
        /// (refused by default: their processes would not run).
        #[arg(long)]
        skip_unsupported: bool,
    },
    /// Run a single-host Corral here (etcd, supervisord, controller, agent) until Ctrl-C.
    #[command(after_help = "Examples:\n  corral dev\n  corral dev --dir /tmp/corral --apply my-specs/ --port 7171")]
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

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// Follow the rollout until every host runs the current generation, ready (exit 0); exit
    /// 1 if it is paused, stalls or takes longer than --timeout-secs.
    #[command(after_help = "Examples:\n  corral rollout status web\n  corral rollout status web --no-wait")]
    Status {
        name: String,
        /// Look once instead of following.
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
        /// Give up when hosts fail at the new generation and nothing moved for this long.
        #[arg(long, default_value_t = 60)]
        stall_secs: u64,
    },
    /// The kept generations (the last 10), when, by whom and what each changed.
    #[command(after_help = "Example:\n  corral rollout history web")]
    History { name: String },
    /// Apply a kept generation's spec again as a new generation (default: the one before).
    #[command(after_help = "Examples:\n  corral rollout undo web\n  corral rollout undo web --to-revision 3")]
    Undo {
        name: String,
        #[arg(long)]
        to_revision: Option<u64>,
    },
    /// No host moves to a newer generation until resumed (hosts already updated stay).
    #[command(after_help = "Example:\n  corral rollout pause web")]
    Pause { name: String },
    /// Let a paused rollout go on.
    #[command(after_help = "Example:\n  corral rollout resume web")]
    Resume { name: String },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let tls = corral_cli::client::TlsOptions {
        ca_file: cli.ca_file.clone(),
        cert_file: cli.cert_file.clone(),
        key_file: cli.key_file.clone(),
    };
    let api = || ApiClient::with_tls(&cli.server, cli.token.clone(), &tls);
    let result = async {
        match &cli.command {
            Command::Render { files } => offline::render(files),
            Command::Import {
                paths,
                selector,
                hosts,
                skip_unsupported,
            } => offline::import(paths, selector.as_deref(), hosts.as_deref(), *skip_unsupported),
            Command::Dev { dir, apply, port } => {
                let apply = if apply.exists() {
                    Some(apply.as_path())
                } else {
                    eprintln!("note: {} does not exist: nothing will be applied", apply.display());
                    None
                };
                dev::dev(dir, apply, *port, cli.token.as_deref()).await
            }
            Command::Apply {
                files,
                dry_run,
                wait,
                timeout_secs,
                stall_secs,
            } => {
                let wait = wait.then_some(online::Wait {
                    timeout: std::time::Duration::from_secs(*timeout_secs),
                    stall: std::time::Duration::from_secs(*stall_secs),
                });
                online::apply(&api()?, files, *dry_run, wait).await
            }
            Command::Rollout(command) => match command {
                RolloutCommand::Status {
                    name,
                    no_wait,
                    timeout_secs,
                    stall_secs,
                } => rollout::follow(
                    &api()?,
                    name,
                    !no_wait,
                    std::time::Duration::from_secs(*timeout_secs),
                    std::time::Duration::from_secs(*stall_secs),
                )
                .await
                .map(exit::code),
                RolloutCommand::History { name } => rollout::history(&api()?, name).await,
                RolloutCommand::Undo { name, to_revision } => rollout::undo(&api()?, name, *to_revision).await,
                RolloutCommand::Pause { name } => rollout::pause(&api()?, name, true).await,
                RolloutCommand::Resume { name } => rollout::pause(&api()?, name, false).await,
            },
            Command::Diff { files, show_secrets } => online::diff(&api()?, files, *show_secrets).await,
            Command::Get {
                what,
                name,
                output,
                show_secrets,
                selector,
            } => {
                online::get(
                    &api()?,
                    *what,
                    name.as_deref(),
                    *output,
                    *show_secrets,
                    selector.as_deref(),
                )
                .await
            }
            Command::Label { kind, name, labels } => online::label(&api()?, *kind, name, labels).await,
            Command::Cordon { host } => online::host_action(&api()?, host, corral_proto::api::HostAction::Cordon).await,
            Command::Uncordon { host } => {
                online::host_action(&api()?, host, corral_proto::api::HostAction::Uncordon).await
            }
            Command::Drain { host } => online::host_action(&api()?, host, corral_proto::api::HostAction::Drain).await,
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
            Command::History {
                name,
                kind,
                limit,
                output,
            } => online::history(&api()?, *kind, name.as_deref(), usize::from(*limit), *output).await,
            Command::Logs {
                name,
                host,
                follow,
                tail,
                stderr,
                since,
            } => {
                logs::logs(
                    &api()?,
                    logs::Options {
                        name,
                        host: host.as_deref(),
                        follow: *follow,
                        tail_bytes: tail.unwrap_or(if since.is_some() {
                            corral_proto::logs::MAX_LOG_BYTES
                        } else {
                            4096
                        }),
                        stderr: *stderr,
                        since: *since,
                    },
                )
                .await
            }
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

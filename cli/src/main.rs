//! `corral`: Corral's command line. `main` parses arguments and hands off to one function per
//! command; the work is done by `corral-proto`.

mod input;
mod offline;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Declarative, continuously reconciled supervisord across a fleet.
#[derive(Debug, Parser)]
#[command(name = "corral", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the supervisord conf file each Program (and native Group) renders to.
    ///
    /// Every document is validated first; if any is invalid, every error is printed on
    /// stderr, nothing on stdout, and the exit code is 1.
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Render { files } => offline::render(&files),
        Command::Import { paths, selector, hosts } => offline::import(&paths, selector.as_deref(), hosts.as_deref()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

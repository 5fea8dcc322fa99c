//! `thawd`: the restore-on-invoke daemon. It serves AWS Lambda's Invoke API for the functions
//! in its config file, restoring an execution environment from each function's snapshot when
//! an invocation finds none idle. Each environment's VMM runs in a worker process: this same
//! binary started as `thawd worker`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// thawd: restore-on-invoke daemon with AWS Lambda's Invoke API.
#[derive(Parser)]
#[command(name = "thawd", version, about, long_about = None)]
struct Cli {
    /// The config file (TOML): the daemon's address and limits, and each function's snapshot,
    /// memory size, timeout, reserved concurrency and key file. See docs/thawd.md.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Internal: one execution environment's worker process, started by thawd. It reads
    /// requests on stdin and writes replies on stdout (docs/thawd.md).
    #[command(hide = true)]
    Worker,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("THAW_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Worker) => restore_daemon::worker::process::main(),
        None => {
            eprintln!("thawd: error: the daemon is not built yet (worker mode only)");
            let _ = cli.config;
            ExitCode::from(2)
        }
    }
}

//! `thawd`: the restore-on-invoke daemon. It serves AWS Lambda's Invoke API for the functions
//! in its config file, restoring an execution environment from each function's snapshot when
//! an invocation finds none idle. Each environment's VMM runs in a worker process: this same
//! binary started as `thawd worker`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use restore_daemon::daemon::{config, service};
use restore_daemon::worker::handle::WorkerCommand;

/// thawd: restore-on-invoke daemon with AWS Lambda's Invoke API.
///
/// Every function's snapshot is verified completely when thawd starts (a snapshot that fails
/// stops it). Invocations: `POST /2015-03-31/functions/NAME/invocations` (RequestResponse,
/// Event, DryRun; `X-Amz-Log-Type: Tail`), metrics at `GET /metrics`. It prints
/// `thawd: listening on ADDRESS` on stdout once it accepts requests, and shuts down idle
/// environments and spare workers on SIGINT or SIGTERM.
#[derive(Parser)]
#[command(name = "thawd", version, about, long_about)]
struct Cli {
    /// The config file (TOML): the daemon's address and limits, and each function's snapshot,
    /// memory size, timeout, reserved concurrency and key file. See docs/thawd.md.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen here instead of the config's `listen` (e.g. 127.0.0.1:0 for any free port).
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Internal: one execution environment's worker process, started by thawd. It reads
    /// requests on stdin and writes replies on stdout (docs/thawd.md).
    #[command(hide = true)]
    Worker {
        /// Jail the worker first (thawd passes these when it jails its workers).
        #[command(flatten)]
        jail: restore_daemon::worker::jail::JailArgs,
    },
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
    if let Some(Command::Worker { jail }) = cli.command {
        let jail = match jail.spec() {
            Ok(jail) => jail,
            Err(e) => {
                eprintln!("thawd worker: error: {e}");
                return ExitCode::from(2);
            }
        };
        let config = restore_daemon::worker::process::WorkerConfig {
            // A jailed worker is always told its key (it cannot see the host's).
            host_key_file: snapshot::host_key::default_key_file().filter(|_| jail.is_none()),
            // Taken from fd 3 by main_with.
            copy_channel: None,
            jail,
        };
        return restore_daemon::worker::process::main_with(&config);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("thawd: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let path = cli.config.context("--config is required")?;
    let mut config = config::load(&path)?;
    if let Some(addr) = cli.listen {
        config.listen = config::Listen::Tcp(addr);
    }
    // Functions without a key file use the host key, as `thaw restore` does; workers get the
    // resolved path.
    let host_key = snapshot::host_key::default_key_file().filter(|p| p.exists());
    for f in config.functions.values_mut() {
        if f.key_file.is_none() {
            f.key_file.clone_from(&host_key);
        }
    }
    // Before the snapshots are verified (which may take a while): a start-up that will fail
    // anyway fails at once.
    service::check_dead_letter_dir(&config.dead_letter_dir)?;
    let descriptors = service::check_descriptors(&config.front)?;
    tracing::debug!(descriptors, "RLIMIT_NOFILE");
    let registered = service::register_all(&config)?;
    let worker = WorkerCommand {
        program: std::env::current_exe().context("cannot find thawd's own executable")?,
        args: vec!["worker".into()],
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let bound = service::bind(&config.listen).await?;
        let thawd = Arc::new(service::Thawd::start(&config, &registered, worker)?);
        println!("thawd: listening on {}", bound.describe());
        service::serve(thawd, bound, shutdown_signal()).await?;
        tracing::info!("thawd stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}

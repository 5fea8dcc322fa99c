//! `thaw-init`: Thaw's Linux guest agent. As PID 1 in a guest it mounts the API filesystems,
//! loads the vsock modules, brings up the loopback interface, runs the agent and ends the
//! machine; with `--host-mode` it runs the same
//! agent as a normal process against a Unix socket (how Thaw tests it without a VM). See
//! `docs/runtime-api.md`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use hooks_sdk::agent::config::{
    self, AgentConfig, Cmdline, DEFAULT_FUNCTION_FILE, FunctionSettings, ResolveInput, Transport,
};
use hooks_sdk::agent::{self, pid1};
use hooks_sdk::protocol::AGENT_PORT;

/// Thaw's guest agent: serves Lambda's Runtime API to the function's runtime and connects it
/// to the Thaw host.
#[derive(Debug, Default, Parser)]
#[command(name = "thaw-init", version)]
struct Cli {
    /// Run as a normal host process: no mounts, modules, loopback or reboot, no RNG reseed or
    /// clock set after a restore, and a Unix socket (--agent-uds) instead of vsock.
    #[arg(long)]
    host_mode: bool,
    /// The host's Unix socket (host mode).
    #[arg(long, value_name = "PATH")]
    agent_uds: Option<PathBuf>,
    /// vsock port on the host (CID 2).
    #[arg(long, value_name = "PORT")]
    vsock_port: Option<u32>,
    /// Runtime API address (port 0: any free port) [default: 127.0.0.1:9001].
    #[arg(long, value_name = "ADDR")]
    runtime_api: Option<std::net::SocketAddr>,
    /// Function file [default: /etc/thaw/function.json].
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// on-demand or snap-start [default: on-demand].
    #[arg(long, value_name = "TYPE")]
    init_type: Option<String>,
    /// AWS_LAMBDA_FUNCTION_NAME.
    #[arg(long)]
    function_name: Option<String>,
    /// _HANDLER.
    #[arg(long)]
    handler: Option<String>,
    /// LAMBDA_TASK_ROOT [default: /var/task].
    #[arg(long, value_name = "DIR")]
    task_root: Option<String>,
    /// The runtime's working directory.
    #[arg(long, value_name = "DIR")]
    working_dir: Option<String>,
    /// Extra environment for the runtime (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Grace period between SIGTERM and SIGKILL when stopping the runtime.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    stop_timeout_ms: u64,
    /// The runtime command [default: the first of /var/runtime/bootstrap, /var/task/bootstrap,
    /// /opt/bootstrap that exists].
    #[arg(last = true, value_name = "RUNTIME")]
    runtime: Vec<String>,
}

fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // As PID 1 the arguments come from the kernel command line; exiting would panic the
        // kernel, so unknown words are reported and ignored.
        Err(e) if pid1 => {
            let _ = e.print();
            eprintln!("thaw-init: ignoring the arguments");
            Cli::default()
        }
        Err(e) => e.exit(),
    };
    if !cli.host_mode && !pid1 {
        eprintln!("thaw-init: not PID 1; pass --host-mode to run as a normal process");
        return ExitCode::from(2);
    }
    let guest = !cli.host_mode;
    if guest {
        // /proc first: logging reads its filter from the kernel command line.
        if let Err(e) = pid1::mount_filesystems() {
            eprintln!("thaw-init: {e:#}");
        }
    }
    let cmdline = if guest {
        config::parse_cmdline(&pid1::kernel_cmdline()).unwrap_or_else(|e| {
            eprintln!("thaw-init: kernel command line: {e}");
            Cmdline::default()
        })
    } else {
        Cmdline::default()
    };
    init_logging(cmdline.log.as_deref());
    let result = run(cli, cmdline, guest);
    if let Err(e) = &result {
        tracing::error!("{e:#}");
    }
    if guest {
        let e = pid1::end_machine();
        tracing::error!("reboot failed: {e}");
        // PID 1 must not exit (the kernel would panic); wait for someone to stop the VM.
        loop {
            std::thread::park();
        }
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

fn init_logging(cmdline_filter: Option<&str>) {
    let filter = std::env::var("THAW_LOG")
        .ok()
        .or_else(|| cmdline_filter.map(str::to_owned))
        .unwrap_or_else(|| "info".to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn run(cli: Cli, cmdline: Cmdline, guest: bool) -> anyhow::Result<()> {
    if guest {
        pid1::load_modules().context("loading kernel modules")?;
        // Not fatal: the runtime then fails to reach the Runtime API, which the host hears.
        if let Err(e) = pid1::bring_up_loopback() {
            tracing::error!("{e:#}");
        }
    }
    let file = cli
        .config
        .clone()
        .or(cmdline.config.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_FUNCTION_FILE));
    let from_file = FunctionSettings::from_file(&file)?;
    let mut env = std::collections::BTreeMap::new();
    for setting in &cli.env {
        let (k, v) = config::parse_env_setting(setting)?;
        env.insert(k, v);
    }
    let from_cli = FunctionSettings {
        runtime: (!cli.runtime.is_empty()).then(|| cli.runtime.clone()),
        init_type: cli.init_type.clone(),
        function_name: cli.function_name.clone(),
        handler: cli.handler.clone(),
        task_root: cli.task_root.clone(),
        working_dir: cli.working_dir.clone(),
        runtime_api: cli.runtime_api,
        env,
        ..FunctionSettings::default()
    };
    let transport = match (&cli.agent_uds, guest) {
        (Some(path), _) => Some(Transport::Unix(path.clone())),
        (None, true) => Some(Transport::Vsock {
            cid: config::HOST_CID,
            port: cli.vsock_port.or(cmdline.vsock_port).unwrap_or(AGENT_PORT),
        }),
        (None, false) => None,
    };
    let config = AgentConfig::resolve(ResolveInput {
        host_mode: cli.host_mode,
        transport,
        settings: from_cli.or(cmdline.settings).or(from_file),
        stop_timeout: Duration::from_millis(cli.stop_timeout_ms),
    })?;
    tracing::debug!(?config, "configuration");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(agent::run(config))?;
    Ok(())
}

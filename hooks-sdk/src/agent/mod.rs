//! `thaw-init`, the Linux guest agent: it serves Lambda's Runtime API to the function's runtime
//! and speaks the host protocol (`docs/guest-protocol.md`) to Thaw, joining the two with one
//! state machine. `docs/runtime-api.md` documents the mapping and the configuration.
//!
//! ```text
//!   runtime ──HTTP──▶ api ──┐                 ┌──▶ link ──vsock/UDS──▶ host
//!                           ├─▶ Agent/machine ┤
//!   reaper (SIGCHLD) ───────┘                 └── frames from link ◀──
//! ```
//!
//! Tasks (one tokio runtime on one thread): the Runtime API server (a task per connection),
//! the host link (connects, writes the outbox; a reader task per connection), the reaper, and
//! `run` itself, which waits for `Shutdown` (or, in host mode, SIGTERM/SIGINT) and stops the
//! runtime. The machine sits behind a mutex that is never held across an await.
//!
//! In host-process mode the same code runs as a normal process: the transport is a Unix socket,
//! and the guest-only steps in [`pid1`] are skipped (and logged as skipped).

pub mod api;
pub mod config;
pub mod invoke_frame;
mod lambda;
pub mod link;
pub mod machine;
pub mod pid1;
pub mod process;
pub mod transport;

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};

use self::config::AgentConfig;
use self::machine::{InvokeFrame, Machine, RestoreOutcome};
use crate::protocol::io::Frame;
use crate::protocol::{InitType, Message};

/// The agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The Runtime API address is taken or invalid.
    #[error("cannot listen for the Runtime API on {addr}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Child-process supervision could not be set up.
    #[error(transparent)]
    Process(#[from] process::ProcessError),
    /// Signal handling could not be set up.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
}

/// State shared by the agent's tasks.
#[derive(Debug)]
pub struct Agent {
    machine: Mutex<Machine>,
    host_mode: bool,
    shutdown: Notify,
}

impl Agent {
    /// An agent whose machine queues host frames on `outbox`.
    pub fn new(
        init_type: InitType,
        host_mode: bool,
        outbox: mpsc::UnboundedSender<lambda::ToHost>,
    ) -> Agent {
        Agent {
            machine: Mutex::new(Machine::new(init_type, outbox)),
            host_mode,
            shutdown: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Machine> {
        // A panic while holding the lock cannot leave the machine half-updated in a way that
        // matters more than stopping would; keep serving.
        self.machine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the machine.
    pub fn with_machine<T>(&self, f: impl FnOnce(&mut Machine) -> T) -> T {
        f(&mut self.lock())
    }

    /// How the environment is initialized.
    pub fn init_type(&self) -> InitType {
        self.lock().init_type()
    }

    /// Handles one well-formed frame from the host.
    pub fn host_frame(&self, frame: Frame) {
        let message = match frame.message() {
            Ok(m) => m,
            // `read_frame` already decoded it once; this cannot fail.
            Err(e) => {
                tracing::error!("undecodable frame: {e}");
                return;
            }
        };
        tracing::debug!(kind = ?frame.kind, "host frame");
        match message {
            Message::Checkpoint => self.lock().checkpoint(),
            Message::Restored(r) => {
                // Order matters: the guest is made unique before any runtime code resumes.
                self.after_restore(r.entropy, r.wall_clock_ns);
                match self.lock().restored() {
                    RestoreOutcome::Unexpected(state) => tracing::warn!(
                        restore_id = r.restore_id,
                        state = state.name(),
                        "Restored, but no runtime was waiting for a restore"
                    ),
                    outcome => tracing::info!(restore_id = r.restore_id, ?outcome, "restored"),
                }
            }
            Message::Invoke(_) => match InvokeFrame::new(frame) {
                Some(event) => self.lock().invoke(event),
                None => tracing::error!("undecodable Invoke frame"),
            },
            Message::Shutdown => {
                tracing::info!("host asked for shutdown");
                self.shutdown.notify_one();
            }
            other => tracing::error!(kind = ?other.kind(), "guest-to-host frame from the host"),
        }
    }

    /// The privileged steps after a restore; host-process mode only says it skipped them.
    fn after_restore(&self, entropy: &[u8], wall_clock_ns: u64) {
        if self.host_mode {
            tracing::info!(
                entropy_bytes = entropy.len(),
                wall_clock_ns,
                "host mode: skipped RNG reseed and clock set"
            );
            return;
        }
        match pid1::reseed_rng(entropy) {
            Ok(()) => tracing::info!(bytes = entropy.len(), "kernel RNG reseeded"),
            Err(e) => tracing::error!("RNG reseed failed: {e}"),
        }
        match pid1::set_wall_clock(wall_clock_ns) {
            Ok(()) => tracing::info!(wall_clock_ns, "wall clock set"),
            Err(e) => tracing::error!("setting the wall clock failed: {e}"),
        }
    }
}

/// Runs the agent until the host says `Shutdown` (or, in host mode, SIGTERM/SIGINT), then
/// stops the runtime. PID-1 duties before and after are the caller's.
pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    let listener = TcpListener::bind(config.runtime_api)
        .await
        .map_err(|source| AgentError::Listen {
            addr: config.runtime_api,
            source,
        })?;
    let api_addr = listener.local_addr().map_err(|source| AgentError::Listen {
        addr: config.runtime_api,
        source,
    })?;
    tracing::info!(%api_addr, init_type = config::init_type_name(config.init_type), "Runtime API listening");
    let (outbox_tx, outbox_rx) = mpsc::unbounded_channel();
    let agent = Arc::new(Agent::new(config.init_type, config.host_mode, outbox_tx));
    tokio::spawn(api::serve(listener, agent.clone()));
    tokio::spawn(link::run(
        config.transport.clone(),
        config.init_type,
        outbox_rx,
        agent.clone(),
    ));

    let mut term = None;
    let mut int = None;
    if config.host_mode {
        use tokio::signal::unix::{SignalKind, signal};
        term = Some(signal(SignalKind::terminate()).map_err(AgentError::Signals)?);
        int = Some(signal(SignalKind::interrupt()).map_err(AgentError::Signals)?);
    }

    // The reaper must watch before the runtime can exit.
    let reaper = process::Reaper::new()?;
    let (exit_tx, mut exit_rx) = watch::channel(None);
    let runtime = match process::spawn(&config, api_addr) {
        Ok(pid) => {
            tokio::spawn(reaper.run(pid, exit_tx));
            let watcher = agent.clone();
            let mut exits = exit_rx.clone();
            tokio::spawn(async move {
                if let Ok(reason) = exits.wait_for(Option::is_some).await {
                    let reason = reason.clone().unwrap_or_default();
                    watcher.with_machine(|m| m.runtime_exited(&reason));
                }
            });
            Some(pid)
        }
        Err(e) => {
            let why = match std::error::Error::source(&e) {
                Some(source) => format!("{e}: {source}"),
                None => e.to_string(),
            };
            tracing::error!("{why}");
            agent.with_machine(|m| m.runtime_failed_to_start(&why));
            // Still reap (PID 1 inherits orphans) even without a runtime.
            tokio::spawn(reaper.run(nix::unistd::Pid::from_raw(0), exit_tx));
            None
        }
    };

    let signal_received = async {
        match (&mut term, &mut int) {
            (Some(t), Some(i)) => {
                tokio::select! {
                    _ = t.recv() => "SIGTERM",
                    _ = i.recv() => "SIGINT",
                }
            }
            _ => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = agent.shutdown.notified() => {}
        sig = signal_received => tracing::info!("{sig}: shutting down"),
    }
    if let Some(pid) = runtime {
        process::stop(pid, config.stop_timeout, &mut exit_rx).await;
    }
    tracing::info!("agent stopped");
    Ok(())
}

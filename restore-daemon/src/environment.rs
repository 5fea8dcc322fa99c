//! An execution environment, as Lambda calls it: a guest restored from a snapshot, running on
//! its own thread, whose agent has reconnected and run its after-restore hooks, ready to be
//! invoked. This is what `thaw restore` drives from the command line and what `thawd` keeps per
//! function.

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_core::devices::serial::ConsoleOutput;
use vmm_core::exit::{ExitReason, ExitSignal};
use vmm_core::machine::MachineController;

use crate::pager::PageServer;
use crate::restore::{RestoreError, RestoreOptions, RestoreTimings, Restored, RunOutcome};
use crate::startup_set::StartupLearning;
use hooks_sdk::host::{
    AFTER_RESTORE_BUDGET, AfterRestoreError, AgentConnection, InvokeError, InvokeOutcome,
    Uniqueness,
};
use hooks_sdk::protocol::Invoke;
use snapshot::KeyChoice;

/// How long the restored agent may take to reconnect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest may take to end after `Shutdown` before it is stopped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The environment could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum EnvironmentError {
    /// The restore failed (before or while the guest ran).
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// The agent did not get through its after-restore step.
    #[error(transparent)]
    AfterRestore(#[from] AfterRestoreError),
    /// An invocation got no answer.
    #[error(transparent)]
    Invoke(#[from] InvokeError),
    /// The snapshot's guest has no vsock device, so no agent can talk to the host.
    #[error("the snapshot's guest has no vsock device, so it has no agent to invoke")]
    NoAgent,
    /// The agent's socket could not be set up.
    #[error("cannot set up the agent's socket")]
    Socket(#[source] std::io::Error),
    /// The guest's thread could not start or panicked.
    #[error("the guest's thread failed: {0}")]
    Thread(String),
}

/// Budgets and memory options of an environment.
#[derive(Clone, Debug)]
pub struct EnvironmentOptions {
    /// How to restore.
    pub restore: RestoreOptions,
    /// How long the agent may take to reconnect.
    pub connect_timeout: Duration,
    /// How long after-restore hooks may take (Lambda: 10 s).
    pub after_restore_budget: Duration,
}

impl Default for EnvironmentOptions {
    fn default() -> Self {
        Self {
            restore: RestoreOptions::default(),
            connect_timeout: CONNECT_TIMEOUT,
            after_restore_budget: AFTER_RESTORE_BUDGET,
        }
    }
}

/// Where an environment's start-up time went.
#[derive(Clone, Copy, Debug)]
pub struct EnvironmentTimings {
    /// The restore itself, until the machine could run.
    pub restore: RestoreTimings,
    /// From the start until the agent's `RestoreDone`: the environment is ready.
    pub ready: Duration,
    /// The after-restore hooks (from `Restored` sent to `RestoreDone`).
    pub hooks: Duration,
    /// From the start until the agent's `Hello`: the restored guest's first sign of life.
    pub hello: Duration,
}

/// A restored guest, ready for invocations.
pub struct Environment {
    agent: AgentConnection,
    exit: Arc<ExitSignal>,
    controller: MachineController,
    pager: Option<Arc<PageServer>>,
    vm: Option<JoinHandle<Result<RunOutcome, RestoreError>>>,
    // Last: the sockets' directory goes once the VM no longer uses them.
    _sockets: tempfile::TempDir,
    /// Where the start-up time went.
    pub timings: EnvironmentTimings,
}

fn join(vm: JoinHandle<Result<RunOutcome, RestoreError>>) -> Result<RunOutcome, EnvironmentError> {
    match vm.join() {
        Ok(outcome) => Ok(outcome?),
        Err(_) => Err(EnvironmentError::Thread("it panicked".into())),
    }
}

/// A restored guest whose agent has not been contacted yet: the first half of
/// [`Environment::start`], for callers that decide what to do by whether it has an agent.
pub struct Prepared {
    restored: Restored,
    listener: UnixListener,
    sockets: tempfile::TempDir,
    started: Instant,
}

impl Prepared {
    /// Restores the snapshot at `dir`, with the guest's vsock device (if any) connected to a
    /// private socket this side listens on.
    pub fn restore(
        dir: &Path,
        key: &KeyChoice,
        options: &RestoreOptions,
        console: ConsoleOutput,
    ) -> Result<Prepared, EnvironmentError> {
        Self::restore_from(crate::restore::SnapshotAt::Dir(dir), key, options, console)
    }

    /// [`Prepared::restore`] of a snapshot wherever it is.
    pub fn restore_from(
        at: crate::restore::SnapshotAt<'_>,
        key: &KeyChoice,
        options: &RestoreOptions,
        console: ConsoleOutput,
    ) -> Result<Prepared, EnvironmentError> {
        let started = Instant::now();
        let sockets = tempfile::Builder::new()
            .prefix("thaw-env-")
            .tempdir()
            .map_err(EnvironmentError::Socket)?;
        let uds = sockets.path().join("vsock.sock");
        let listener = UnixListener::bind(format!(
            "{}_{}",
            uds.display(),
            hooks_sdk::protocol::AGENT_PORT
        ))
        .map_err(EnvironmentError::Socket)?;
        let mut restore_options = options.clone();
        restore_options.vsock_uds = Some(uds);
        let restored = crate::restore::restore_from(at, key, &restore_options, console)?;
        Ok(Prepared {
            restored,
            listener,
            sockets,
            started,
        })
    }

    /// Whether the guest has a vsock device, and so an agent to talk to.
    pub fn has_agent(&self) -> bool {
        self.restored.has_vsock()
    }

    /// The restored machine, not yet running.
    pub fn restored(&self) -> &Restored {
        &self.restored
    }

    /// Counts the environment's start-up time from now on, for a restore prepared ahead of
    /// the request that starts it: what the request waits for is what follows.
    pub fn start_clock_now(&mut self) {
        self.started = Instant::now();
    }

    /// The restored machine, to run without an agent.
    pub fn into_restored(self) -> Restored {
        self.restored
    }

    /// Runs the guest and waits until its agent has run its after-restore hooks.
    pub fn start(self, options: &EnvironmentOptions) -> Result<Environment, EnvironmentError> {
        let Prepared {
            restored,
            listener,
            sockets,
            started,
        } = self;
        if !restored.has_vsock() {
            return Err(EnvironmentError::NoAgent);
        }
        let unique = Uniqueness::generate()
            .map_err(|e| EnvironmentError::Socket(std::io::Error::other(e.to_string())))?;
        let exit = restored.exit_signal();
        let controller = restored.controller();
        let pager = restored.pager();
        let startup = restored.startup_learning();
        let restore_timings = restored.timings;
        // Started before the guest runs (see FrameReader).
        let reader = hooks_sdk::host::FrameReader::spawn().map_err(EnvironmentError::Socket)?;
        let vm = std::thread::Builder::new()
            .name("thaw-vm".into())
            .spawn(move || restored.run(None))
            .map_err(|e| EnvironmentError::Thread(e.to_string()))?;
        let guest_ended = {
            let exit = exit.clone();
            move || exit.is_set()
        };
        let agent = match hooks_sdk::host::after_restore_with(
            &listener,
            reader,
            &unique,
            options.connect_timeout,
            options.after_restore_budget,
            &guest_ended,
        ) {
            Ok(agent) => agent,
            Err(e) => {
                controller.stop();
                // A page-server failure is the real cause of whatever the agent did.
                return Err(match join(vm) {
                    Err(vm_error @ EnvironmentError::Restore(RestoreError::PagerFailed(_))) => {
                        vm_error
                    }
                    _ => e.into(),
                });
            }
        };
        let hooks = agent.hooks;
        let hello = agent.hello_at.saturating_duration_since(started);
        let ready = started.elapsed();
        if let (Some(startup), Some(pager)) = (startup, &pager) {
            learn_startup(&startup, &pager.recorded_before(agent.hello_at));
        }
        Ok(Environment {
            agent,
            exit,
            controller,
            pager,
            vm: Some(vm),
            _sockets: sockets,
            timings: EnvironmentTimings {
                restore: restore_timings,
                ready,
                hooks,
                hello,
            },
        })
    }
}

impl Environment {
    /// Restores the snapshot at `dir` and waits until its agent is ready.
    pub fn start(
        dir: &Path,
        key: &KeyChoice,
        options: &EnvironmentOptions,
        console: ConsoleOutput,
    ) -> Result<Environment, EnvironmentError> {
        Prepared::restore(dir, key, &options.restore, console)?.start(options)
    }

    /// The restore id the guest was given.
    pub fn restore_id(&self) -> &str {
        &self.agent.restore_id
    }

    /// The agent's name and version.
    pub fn agent(&self) -> &str {
        &self.agent.agent
    }

    /// The page server of a lazily restored guest.
    pub fn pager(&self) -> Option<&Arc<PageServer>> {
        self.pager.as_ref()
    }

    /// Controls the machine: pause (into a guard that saves and resumes it) and stop.
    pub fn controller(&self) -> &MachineController {
        &self.controller
    }

    /// Why the machine stopped, once it has: after a failed invocation, whether the guest
    /// ended by itself (and with which exit code) or was stopped by the host.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.exit.reason()
    }

    /// Invokes the function and waits up to `timeout` for its answer. A guest that stops or a
    /// page server that fails meanwhile is the error.
    pub fn invoke(
        &mut self,
        invoke: &Invoke<'_>,
        timeout: Duration,
    ) -> Result<InvokeOutcome, EnvironmentError> {
        let exit = self.exit.clone();
        match self.agent.invoke(invoke, timeout, &move || exit.is_set()) {
            Ok(outcome) => Ok(outcome),
            Err(e) => {
                if self.exit.is_set() {
                    if let Some(vm) = self.vm.take() {
                        join(vm)?;
                    }
                }
                Err(e.into())
            }
        }
    }

    /// Asks the guest to shut down and waits for its machine to stop (stopping it if it does
    /// not end within a few seconds).
    pub fn shutdown(mut self) -> Result<RunOutcome, EnvironmentError> {
        if let Err(e) = self.agent.shutdown() {
            tracing::debug!(error = %e, "the agent could not be told to shut down");
        }
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while !self.exit.is_set() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.finish()
    }

    /// Waits until the guest ends by itself.
    pub fn wait(mut self) -> Result<RunOutcome, EnvironmentError> {
        match self.vm.take() {
            Some(vm) => join(vm),
            None => Err(EnvironmentError::Thread("the guest already stopped".into())),
        }
    }

    /// Stops the machine at once and waits for it.
    pub fn kill(mut self) -> Result<RunOutcome, EnvironmentError> {
        self.controller.stop();
        self.finish()
    }

    fn finish(&mut self) -> Result<RunOutcome, EnvironmentError> {
        self.controller.stop();
        match self.vm.take() {
            Some(vm) => join(vm),
            None => Err(EnvironmentError::Thread("the guest already stopped".into())),
        }
    }
}

impl Drop for Environment {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            self.controller.stop();
            let _ = vm.join();
        }
    }
}

/// Stores what the guest still faulted on before its `Hello` in the host's startup set, so the
/// next restore of this snapshot has it in place first. A set that cannot be written only
/// means the next restore faults as this one did.
fn learn_startup(startup: &StartupLearning, faulted: &[u32]) {
    match startup.learn(faulted) {
        Ok(true) => tracing::debug!(
            known = startup.known().len(),
            faulted = faulted.len(),
            "startup set updated"
        ),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "startup set not stored"),
    }
}

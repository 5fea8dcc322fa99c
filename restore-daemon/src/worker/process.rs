//! The worker's side: requests on stdin, one reply each on stdout, until `Shutdown` or until
//! stdin ends (the daemon died or dropped this worker). The worker holds at most one
//! execution environment: a machine shell may be prepared for it, then it is restored, invoked,
//! frozen and thawed, and finally shut down. Once the environment has failed it is discarded
//! (its VM stopped) and only `Shutdown` is still served; requests that come in the wrong state
//! are refused with `BadRequest` and change nothing.

use std::collections::VecDeque;
use std::error::Error;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_core::devices::serial::ConsoleOutput;
use vmm_core::exit::ExitReason;
use vmm_core::machine::{ControlError, Paused, ShellSpec};

use super::copy_channel;
use super::protocol::{
    FailureKind, FrameError, Invoke, Reply, Request, WireMemoryMode, read_frame, write_frame,
};
use crate::decoded_copy::{CopyTicket, DecodedCopy};
use crate::environment::{Environment, EnvironmentError, EnvironmentOptions, Prepared};
use crate::restore::{ChunkCheck, RestoreOptions};
use crate::shells::ShellPool;
use hooks_sdk::host::{AfterRestoreError, InvokeError};
use snapshot::KeyChoice;

/// The guest console kept in memory: the end of it, for `Invoked` and failures.
const CONSOLE_KEEP: usize = 64 << 10;
/// The console tail a `Failed` reply carries.
const FAILURE_CONSOLE: usize = 4 << 10;
/// How long `Prepare` waits for its shell.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often `Prepare` looks whether the shell is built or failed.
const PREPARE_POLL: Duration = Duration::from_millis(5);
/// Lambda's error type when the runtime exits; here, when the guest ends during its restore.
/// Lambda's error type for a runtime failure it cannot name; here, an agent that broke the
/// protocol or its connection during the restore.
const UNKNOWN_ERROR: &str = "Runtime.Unknown";

/// What the worker knows from its parent besides the requests.
#[derive(Clone, Debug, Default)]
pub struct WorkerConfig {
    /// The host's master key file, used for a `Restore` that names no key file (if the file
    /// exists; a plaintext snapshot needs none). `None`: such restores use no key, so only
    /// plaintext snapshots open without a key file.
    pub host_key_file: Option<PathBuf>,
    /// The descriptor channel from the daemon (fd 3), over which a decoded copy's memfd
    /// arrives; `None`: restores from a shared copy fail.
    pub copy_channel: Option<Arc<UnixStream>>,
    /// Jail the worker before it serves (`super::jail`): its requests then name the snapshot
    /// and key by their places inside.
    pub jail: Option<super::jail::JailSpec>,
}

/// The worker could not go on talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A request could not be read (garbage, a truncated or oversized frame, a read error).
    #[error("cannot read the daemon's request")]
    Read(#[source] FrameError),
    /// A reply could not be written (the daemon went away).
    #[error("cannot write the reply")]
    Write(#[source] FrameError),
}

/// How serving ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The daemon asked for it; `ShutDown` was the last reply.
    Shutdown,
    /// Stdin ended before a request, or the reply stream was closed: the daemon died or
    /// dropped this worker.
    InputClosed,
}

/// The worker process's entry point (`thawd worker`), with no host key.
pub fn main() -> ExitCode {
    main_with(&WorkerConfig::default())
}

/// The worker process's entry point, with what its parent knows (e.g. the host key file).
pub fn main_with(config: &WorkerConfig) -> ExitCode {
    let mut config = config.clone();
    config.copy_channel = copy_channel::inherited().map(Arc::new);
    let config = &config;
    if let Err(e) = die_with_parent() {
        tracing::error!(error = %e, "cannot tie the worker's life to the daemon's; exiting");
        return ExitCode::FAILURE;
    }
    if let Some(spec) = &config.jail {
        // Still one thread: nothing has started another yet.
        if let Err(e) = super::jail::enter(spec) {
            tracing::error!(error = %chain(&e), "worker not started");
            return ExitCode::FAILURE;
        }
    }
    let output = match take_stdout() {
        Ok(out) => out,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up the worker's reply stream");
            return ExitCode::FAILURE;
        }
    };
    if config.jail.is_some() {
        // Last: every later thread inherits it, and nothing from here on needs more.
        if let Err(e) = super::seccomp::install() {
            tracing::error!(error = %chain(&e), "worker not started");
            return ExitCode::FAILURE;
        }
    }
    // While it waits for its first request: the restore then finds the host check's answer.
    crate::verify::learn_host_facts_ahead();
    match serve(std::io::stdin().lock(), output, config) {
        Ok(ended) => {
            tracing::debug!(?ended, "worker done");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %chain(&e), "worker stopped");
            ExitCode::FAILURE
        }
    }
}

/// A worker must never outlive the daemon, which alone can stop its VM.
fn die_with_parent() -> std::io::Result<()> {
    let parent = nix::unistd::getppid();
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    // The parent may have died before the signal was armed: the worker was reparented. Had it
    // died even before the first getppid, stdin (whose writer only the daemon held) is already
    // at its end, and serving stops at once.
    if nix::unistd::getppid() != parent {
        return Err(std::io::Error::other("reparented before PR_SET_PDEATHSIG"));
    }
    Ok(())
}

/// A private handle on stdout for the frames, with fd 1 itself pointed at stderr: whatever
/// else prints to stdout (a stray `println!`, a library) ends up in the log instead of
/// corrupting the reply stream.
fn take_stdout() -> std::io::Result<File> {
    let replies = std::io::stdout().as_fd().try_clone_to_owned()?;
    nix::unistd::dup2_stdout(std::io::stderr())?;
    Ok(File::from(replies))
}

/// Serves requests from `input` with replies on `output` until `Shutdown` or the end of
/// `input`. Whatever environment is left is stopped before this returns.
pub fn serve<R: Read, W: Write>(
    mut input: R,
    mut output: W,
    config: &WorkerConfig,
) -> Result<Ended, ServeError> {
    let mut session = Session::new(config);
    loop {
        let request = match read_frame::<_, Request>(&mut input) {
            Ok(request) => request,
            Err(FrameError::Closed) => return Ok(Ended::InputClosed),
            Err(e) => return Err(ServeError::Read(e)),
        };
        let shutdown = request == Request::Shutdown;
        let reply = session.handle(request);
        match send(&mut output, &reply, &session.console) {
            // The daemon closed the reply stream: it died or dropped this worker, as when its
            // input ends (a jailed worker, one hop further from the daemon's death than its
            // parent, sees this first).
            Err(ServeError::Write(FrameError::Io(e)))
                if e.kind() == std::io::ErrorKind::BrokenPipe =>
            {
                return Ok(Ended::InputClosed);
            }
            sent => sent?,
        }
        if shutdown {
            return Ok(Ended::Shutdown);
        }
    }
}

/// Writes `reply`; one too large for a frame becomes a failure, so the daemon still gets one
/// reply per request.
fn send<W: Write>(output: &mut W, reply: &Reply, console: &ConsoleTail) -> Result<(), ServeError> {
    match write_frame(output, reply) {
        Err(FrameError::TooLarge { len }) => {
            let failure = Reply::Failed {
                kind: FailureKind::Internal,
                message: format!("the reply ({len} bytes) does not fit in a frame"),
                console: console.tail(FAILURE_CONSOLE),
            };
            write_frame(output, &failure).map_err(ServeError::Write)
        }
        other => other.map_err(ServeError::Write),
    }
}

/// An error and its causes, as one line.
pub(crate) fn chain(e: &dyn Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

/// The end of the guest's console, shared with the VMM's serial device.
#[derive(Clone, Default)]
struct ConsoleTail(Arc<Mutex<VecDeque<u8>>>);

impl ConsoleTail {
    fn lock(&self) -> MutexGuard<'_, VecDeque<u8>> {
        match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn output(&self) -> ConsoleOutput {
        Box::new(self.clone())
    }

    /// Everything kept so far, emptying the buffer.
    fn take(&self) -> Vec<u8> {
        self.lock().drain(..).collect()
    }

    /// The last `n` bytes kept.
    fn tail(&self, n: usize) -> Vec<u8> {
        let kept = self.lock();
        kept.range(kept.len().saturating_sub(n)..)
            .copied()
            .collect()
    }
}

impl Write for ConsoleTail {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut kept = self.lock();
        let new = &buf[buf.len().saturating_sub(CONSOLE_KEEP)..];
        let excess = (kept.len() + new.len()).saturating_sub(CONSOLE_KEEP);
        kept.drain(..excess);
        kept.extend(new);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the worker holds.
enum State {
    /// Nothing restored yet; perhaps a shell prepared for the restore.
    Empty { shells: Option<Arc<ShellPool>> },
    /// Restored ahead (`PrepareRestore`), not running yet.
    Ahead {
        prepared: Box<Prepared>,
        snapshot: PathBuf,
    },
    /// A restored environment; frozen while the worker holds its pause guard.
    Running {
        env: Box<Environment>,
        frozen: Option<Paused>,
    },
    /// The environment failed (or could not be made) and was discarded.
    Discarded,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Empty { shells: None } => "nothing restored yet",
            State::Empty { shells: Some(_) } => "a shell is prepared, nothing restored yet",
            State::Ahead { .. } => "a restore is prepared, not running yet",
            State::Running { frozen: None, .. } => "an environment is running",
            State::Running {
                frozen: Some(_), ..
            } => "an environment is frozen",
            State::Discarded => "the environment failed and was discarded",
        }
    }
}

struct Session<'c> {
    config: &'c WorkerConfig,
    console: ConsoleTail,
    state: State,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl<'c> Session<'c> {
    fn new(config: &'c WorkerConfig) -> Self {
        Session {
            config,
            console: ConsoleTail::default(),
            state: State::Empty { shells: None },
        }
    }

    fn handle(&mut self, request: Request) -> Reply {
        match request {
            Request::Prepare { mem_bytes, vcpus } => self.prepare(ShellSpec { mem_bytes, vcpus }),
            Request::PrepareRestore {
                snapshot,
                key_file,
                shared_copy,
            } => self.prepare_restore(snapshot, key_file.as_deref(), shared_copy),
            Request::Restore {
                snapshot,
                key_file,
                memory,
                after_restore_timeout_ms,
                verified,
                shared_copy,
            } => self.restore(
                &snapshot,
                key_file.as_deref(),
                memory,
                Duration::from_millis(after_restore_timeout_ms),
                verified.map(snapshot::SnapshotId),
                shared_copy,
            ),
            Request::Invoke(invoke) => self.invoke(&invoke),
            Request::Freeze => self.freeze(),
            Request::Thaw => self.thaw(),
            Request::Shutdown => self.shutdown(),
        }
    }

    fn bad_request(&self, request: &str) -> Reply {
        Reply::Failed {
            kind: FailureKind::BadRequest,
            message: format!("{request} is not possible now: {}", self.state.name()),
            console: Vec::new(),
        }
    }

    /// Discards the environment (stopping its VM) and reports the failure.
    fn fail(&mut self, kind: FailureKind, message: String) -> Reply {
        self.state = State::Discarded;
        tracing::warn!(?kind, error = %message, "worker request failed");
        Reply::Failed {
            kind,
            message,
            console: self.console.tail(FAILURE_CONSOLE),
        }
    }

    fn prepare(&mut self, spec: ShellSpec) -> Reply {
        if !matches!(self.state, State::Empty { shells: None }) {
            return self.bad_request("Prepare");
        }
        let started = Instant::now();
        match build_shell(spec) {
            Ok(pool) => {
                self.state = State::Empty {
                    shells: Some(Arc::new(pool)),
                };
                Reply::Prepared {
                    shell_us: micros(started.elapsed()),
                }
            }
            Err(message) => self.fail(FailureKind::Internal, message),
        }
    }

    fn restore(
        &mut self,
        snapshot: &Path,
        key_file: Option<&Path>,
        memory: WireMemoryMode,
        after_restore_budget: Duration,
        verified: Option<snapshot::SnapshotId>,
        shared_copy: Option<CopyTicket>,
    ) -> Reply {
        if let State::Ahead {
            snapshot: ahead, ..
        } = &self.state
        {
            if ahead != snapshot {
                return self.bad_request("Restore of another snapshot than the one prepared");
            }
            let State::Ahead { prepared, .. } =
                std::mem::replace(&mut self.state, State::Discarded)
            else {
                return self.bad_request("Restore");
            };
            let mut prepared = *prepared;
            prepared.start_clock_now();
            let options = EnvironmentOptions {
                after_restore_budget,
                ..EnvironmentOptions::default()
            };
            return self.started(snapshot, prepared.start(&options), true);
        }
        let shells = match &mut self.state {
            State::Empty { shells } => shells.take(),
            _ => return self.bad_request("Restore"),
        };
        let shared_copy = match shared_copy.map(|ticket| self.receive_copy(ticket)) {
            None => None,
            Some(Ok(copy)) => Some(Arc::new(copy)),
            Some(Err(message)) => return self.fail(FailureKind::Restore, message),
        };
        let key = match key_choice(key_file, self.config.host_key_file.as_deref()) {
            Ok(key) => key,
            Err(message) => return self.fail(FailureKind::Restore, message),
        };
        let options = EnvironmentOptions {
            restore: RestoreOptions {
                memory: memory.into(),
                chunk_check: if verified.is_some() {
                    ChunkCheck::OnInstall
                } else {
                    ChunkCheck::UpFront
                },
                expected_snapshot: verified,
                shells,
                shared_copy,
                ..RestoreOptions::default()
            },
            after_restore_budget,
            ..EnvironmentOptions::default()
        };
        let started = Environment::start(snapshot, &key, &options, self.console.output());
        self.started(snapshot, started, false)
    }

    /// Restores `snapshot` up to a machine that could run, into the prepared shell, with memory
    /// from the shared copy the daemon sent; the guest starts with the next `Restore`.
    fn prepare_restore(
        &mut self,
        snapshot: PathBuf,
        key_file: Option<&Path>,
        ticket: CopyTicket,
    ) -> Reply {
        let shells = match &mut self.state {
            State::Empty { shells } => shells.take(),
            _ => return self.bad_request("PrepareRestore"),
        };
        let began = Instant::now();
        let copy = match self.receive_copy(ticket) {
            Ok(copy) => Arc::new(copy),
            Err(message) => return self.fail(FailureKind::Restore, message),
        };
        let key = match key_choice(key_file, self.config.host_key_file.as_deref()) {
            Ok(key) => key,
            Err(message) => return self.fail(FailureKind::Restore, message),
        };
        let options = RestoreOptions {
            shells,
            shared_copy: Some(copy),
            ..RestoreOptions::default()
        };
        match Prepared::restore(&snapshot, &key, &options, self.console.output()) {
            Ok(prepared) if prepared.has_agent() => {
                tracing::info!(
                    snapshot = %snapshot.display(),
                    timings = ?prepared.restored().timings,
                    "restore prepared ahead"
                );
                self.state = State::Ahead {
                    prepared: Box::new(prepared),
                    snapshot,
                };
                Reply::Prepared {
                    shell_us: micros(began.elapsed()),
                }
            }
            Ok(_) => self.fail(FailureKind::Restore, chain(&EnvironmentError::NoAgent)),
            Err(e) => self.fail(restore_failure(&e), chain(&e)),
        }
    }

    /// Records an environment that started (or reports why it did not).
    fn started(
        &mut self,
        snapshot: &Path,
        started: Result<Environment, EnvironmentError>,
        ahead: bool,
    ) -> Reply {
        match started {
            Ok(env) => {
                let timings = env.timings;
                tracing::info!(
                    snapshot = %snapshot.display(),
                    restore_id = env.restore_id(),
                    ?timings,
                    "environment ready"
                );
                self.state = State::Running {
                    env: Box::new(env),
                    frozen: None,
                };
                Reply::Restored {
                    // Restored ahead, the machine could run as soon as the request came.
                    restore_us: if ahead {
                        0
                    } else {
                        micros(timings.restore.total())
                    },
                    ready_us: micros(timings.ready),
                    hello_us: micros(timings.hello),
                    shell_was_ready: timings.restore.shell_was_ready,
                }
            }
            Err(e) => self.fail(restore_failure(&e), chain(&e)),
        }
    }

    /// Takes the decoded copy the daemon sent for this restore and checks it is sealed and of
    /// the ticket's size (its snapshot id is checked against the snapshot by the restore).
    fn receive_copy(&self, ticket: CopyTicket) -> Result<DecodedCopy, String> {
        let channel = self
            .config
            .copy_channel
            .as_deref()
            .ok_or_else(|| chain(&copy_channel::ChannelError::Missing))?;
        let fd = copy_channel::receive(channel).map_err(|e| chain(&e))?;
        DecodedCopy::adopt(fd, ticket).map_err(|e| chain(&e))
    }

    fn invoke(&mut self, invoke: &Invoke) -> Reply {
        let State::Running { env, .. } = &mut self.state else {
            return self.bad_request("Invoke");
        };
        if let Some(reply) = super::self_test::answer(invoke) {
            return reply;
        }
        // Only what the guest prints for this invocation goes with its answer.
        self.console.take();
        let started = Instant::now();
        let result = env.invoke(&invoke.wire(), Duration::from_millis(invoke.timeout_ms));
        let duration = started.elapsed();
        match result {
            Ok(outcome) => Reply::Invoked {
                outcome: outcome.into(),
                duration_us: micros(duration),
                console: self.console.take(),
                max_memory_used_bytes: peak_resident_bytes(),
            },
            Err(e) => {
                let kind = invoke_failure(&e, env.exit_reason());
                self.fail(kind, chain(&e))
            }
        }
    }

    fn freeze(&mut self) -> Reply {
        let State::Running { env, frozen } = &mut self.state else {
            return self.bad_request("Freeze");
        };
        // Freezing a frozen environment is a no-op (but not once its guest has ended).
        let result = if frozen.is_some() {
            env.controller().check_alive()
        } else {
            env.controller().pause().map(|guard| *frozen = Some(guard))
        };
        match result {
            Ok(()) => Reply::Frozen,
            Err(e) => self.fail(control_failure(&e), chain(&e)),
        }
    }

    fn thaw(&mut self) -> Reply {
        let State::Running { env, frozen } = &mut self.state else {
            return self.bad_request("Thaw");
        };
        let result = match frozen.take() {
            Some(guard) => guard.resume(),
            None => env.controller().check_alive(),
        };
        match result {
            Ok(()) => Reply::Thawed,
            Err(e) => self.fail(control_failure(&e), chain(&e)),
        }
    }

    fn shutdown(&mut self) -> Reply {
        if let State::Running { env, frozen } = std::mem::replace(&mut self.state, State::Discarded)
        {
            // A frozen guest could not hear the request and would only be stopped after the
            // grace period.
            if let Some(guard) = frozen
                && let Err(e) = guard.resume()
            {
                tracing::debug!(error = %e, "cannot resume the guest to shut it down");
            }
            match env.shutdown() {
                Ok(outcome) => tracing::info!(reason = %outcome.reason, "environment shut down"),
                Err(e) => tracing::warn!(error = %chain(&e), "environment shut down with an error"),
            }
        }
        Reply::ShutDown
    }
}

/// A pool holding one ready shell of `spec`, and building no more.
fn build_shell(spec: ShellSpec) -> Result<ShellPool, String> {
    let pool = ShellPool::new().map_err(|e| format!("cannot start the shell builder: {e}"))?;
    pool.keep_ready(spec, 1);
    let deadline = Instant::now() + PREPARE_TIMEOUT;
    // Waiting in steps sees a failed build at once instead of the builder's retries.
    while !pool.wait_ready(spec, 1, PREPARE_POLL) {
        if pool.stats().build_failures > 0 {
            return Err(format!(
                "cannot build a machine shell of {} bytes and {} vCPUs (the worker's log has why)",
                spec.mem_bytes, spec.vcpus
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!("no machine shell within {PREPARE_TIMEOUT:?}"));
        }
    }
    // The restore takes this one; a replacement would only be torn down unused.
    pool.keep_ready(spec, 0);
    Ok(pool)
}

/// The key for a restore: the named file, else the host key if there is one.
fn key_choice(key_file: Option<&Path>, host_key_file: Option<&Path>) -> Result<KeyChoice, String> {
    let load = |path: &Path| {
        snapshot::MasterKey::load(path)
            .map_err(|e| format!("key file {}: {}", path.display(), chain(&e)))
    };
    Ok(match (key_file, host_key_file) {
        (Some(path), _) => KeyChoice::Given(load(path)?),
        (None, Some(path)) if path.exists() => KeyChoice::HostDefault(load(path)?),
        (None, _) => KeyChoice::None,
    })
}

fn restore_failure(e: &EnvironmentError) -> FailureKind {
    match e {
        EnvironmentError::Restore(_) | EnvironmentError::NoAgent => FailureKind::Restore,
        // Reconnecting is part of the after-restore step's time, as Lambda counts it.
        EnvironmentError::AfterRestore(
            AfterRestoreError::HookTimeout(_) | AfterRestoreError::ConnectTimeout(_),
        ) => FailureKind::AfterRestoreTimeout,
        EnvironmentError::AfterRestore(AfterRestoreError::Hook { error_type, .. }) => {
            FailureKind::AfterRestore {
                error_type: error_type.clone(),
            }
        }
        EnvironmentError::AfterRestore(AfterRestoreError::GuestEnded { .. }) => {
            FailureKind::AfterRestore {
                error_type: hooks_sdk::protocol::RUNTIME_EXIT_ERROR.into(),
            }
        }
        EnvironmentError::AfterRestore(
            AfterRestoreError::Protocol(_) | AfterRestoreError::Socket(_),
        ) => FailureKind::AfterRestore {
            error_type: UNKNOWN_ERROR.into(),
        },
        EnvironmentError::Invoke(_) | EnvironmentError::Socket(_) | EnvironmentError::Thread(_) => {
            FailureKind::Internal
        }
    }
}

/// The guest's own exit code, when it ended through the debug-exit port.
fn guest_exit_code(reason: &ExitReason) -> Option<i32> {
    match reason {
        ExitReason::GuestExit(code) => Some(i32::from(*code)),
        _ => None,
    }
}

/// A failed invocation's kind. The agent's connection may report the guest's end (a closed
/// socket) before the machine's exit is seen, so the exit reason decides, not the error alone.
fn invoke_failure(e: &EnvironmentError, exit: Option<ExitReason>) -> FailureKind {
    if matches!(e, EnvironmentError::Invoke(InvokeError::Timeout(_))) {
        return FailureKind::InvokeTimeout;
    }
    match exit {
        // The host stopped it: the page server failed, say.
        Some(ExitReason::Stopped) => FailureKind::Internal,
        Some(reason) => FailureKind::GuestEnded {
            exit_code: guest_exit_code(&reason),
        },
        None if matches!(e, EnvironmentError::Invoke(InvokeError::GuestEnded)) => {
            FailureKind::GuestEnded { exit_code: None }
        }
        None => FailureKind::Internal,
    }
}

fn control_failure(e: &ControlError) -> FailureKind {
    match e {
        ControlError::Exited {
            reason: Some(reason),
        } if *reason != ExitReason::Stopped => FailureKind::GuestEnded {
            exit_code: guest_exit_code(reason),
        },
        _ => FailureKind::Internal,
    }
}

/// This process's peak resident memory (`VmHWM`), bytes; 0 if it cannot be read.
fn peak_resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
            kib.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
        })
        .map_or(0, |kib| kib.saturating_mul(1024))
}

#[cfg(test)]
#[path = "process_tests.rs"]
mod tests;

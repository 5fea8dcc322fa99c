//! The daemon's side of a worker process: spawn it, ask it one thing at a time, kill and reap
//! it. Every request has a deadline; a worker that misses it, answers with a failure, breaks
//! the protocol or dies is poisoned: every later request is refused with
//! [`WorkerError::Poisoned`], and the caller's only move left is [`Worker::kill`] or
//! [`Worker::shutdown`]. A request whose future is dropped half-way poisons it too, since its
//! reply may still be on the way.
//!
//! The worker asks the kernel to kill it when the thread that spawned it exits
//! (`PR_SET_PDEATHSIG` follows the parent thread, not the process): spawn workers from threads
//! that live as long as the daemon (a runtime's worker threads, not `spawn_blocking`).

use std::ffi::OsString;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::copy_channel::{self, ChannelError};
use super::jail::{JailSpec, KEY_IN_JAIL, SNAPSHOT_IN_JAIL};
use super::protocol::{
    FailureKind, FrameError, Invoke, Reply, Request, WireOutcome, read_frame_async,
    write_frame_async,
};
use crate::decoded_copy::DecodedCopy;
use crate::restore::MemoryMode;

/// How much longer than the function's timeout the daemon waits for an invocation's reply:
/// the worker itself reports the timeout within this.
pub const INVOKE_GRACE: Duration = Duration::from_secs(2);
/// How long a worker whose stdout closed may take to exit before it counts as alive but
/// broken.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// How to start a worker: `thawd` and `["worker"]`.
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
}

impl WorkerCommand {
    /// `program worker`: the worker mode of a `thawd` binary.
    pub fn thawd(program: PathBuf) -> Self {
        Self {
            program,
            args: vec!["worker".into()],
        }
    }
}

/// A restore for a worker to run.
#[derive(Clone, Debug)]
pub struct RestoreSpec {
    /// The snapshot directory.
    pub snapshot: PathBuf,
    /// The master key file; `None` for the worker's host key (or a plaintext snapshot).
    pub key_file: Option<PathBuf>,
    /// How memory comes back.
    pub memory: MemoryMode,
    /// The snapshot registered, its every chunk authenticated then (see
    /// `Request::Restore::verified`): another file at `snapshot` is refused.
    pub verified: Option<snapshot::SnapshotId>,
    /// The after-restore hooks' budget (Lambda: 10 s).
    pub after_restore_timeout: Duration,
}

/// A decoded copy of a function's snapshot, granted to that function's workers only.
#[derive(Clone, Debug)]
pub struct CopyGrant {
    /// The function whose snapshot it was decoded from.
    pub function: String,
    /// The copy.
    pub copy: Arc<DecodedCopy>,
}

/// A worker's environment is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoredInfo {
    /// From the start of the restore until the machine could run.
    pub restore: Duration,
    /// From the start until the after-restore hooks finished.
    pub ready: Duration,
    /// From the start until the agent's `Hello`, the guest's first sign of life.
    pub hello: Duration,
    /// Whether the restore found a prepared shell.
    pub shell_was_ready: bool,
}

/// An invocation's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invoked {
    /// The function's answer.
    pub outcome: WireOutcome,
    /// From sending the event to the answer.
    pub duration: Duration,
    /// What the guest printed during the invocation (at most its last 64 KiB).
    pub console: Vec<u8>,
    /// The worker's peak resident memory so far, bytes.
    pub max_memory_used_bytes: u64,
}

/// A request to a worker failed. After any of these the worker is poisoned.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The process could not be started.
    #[error("cannot start the worker process")]
    Spawn(#[source] std::io::Error),
    /// The process died (or closed its stdout and exited).
    #[error("the worker process died: {status}")]
    Died {
        /// Its exit status, as the OS reports it (e.g. `signal: 9 (SIGKILL)`).
        status: String,
    },
    /// No reply in time; the worker may still be busy with the request.
    #[error("the worker did not answer {request} within {after:?}")]
    Timeout {
        /// The request.
        request: &'static str,
        /// How long the daemon waited.
        after: Duration,
    },
    /// The worker said something that is not the reply to the request.
    #[error("the worker broke the protocol: {0}")]
    Protocol(String),
    /// The worker could not do what was asked.
    #[error("the worker failed ({kind:?}): {message}")]
    Failed {
        /// What failed.
        kind: FailureKind,
        /// The error, with its causes.
        message: String,
        /// The end of the guest's console.
        console: Vec<u8>,
    },
    /// An earlier request failed, so this worker's state is unknown.
    #[error("the worker is unusable after an earlier error")]
    Poisoned,
    /// A decoded copy was offered to a worker of another function; nothing was sent.
    #[error(
        "the decoded copy of function {copy_of}'s snapshot is refused to a worker of function {worker_of}"
    )]
    ForeignCopy {
        /// Whose copy it is.
        copy_of: String,
        /// Whose worker this is.
        worker_of: String,
    },
    /// The decoded copy's descriptor could not be passed.
    #[error("cannot hand the decoded copy to the worker")]
    Channel(#[source] ChannelError),
}

/// A running worker process, started for one function.
pub struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    /// Set while a request is out and after any error: the stream may hold a stray reply.
    poisoned: bool,
    /// The function it serves: only that function's decoded copy is handed to it.
    function: String,
    /// The descriptor channel (the worker's fd 3).
    channel: UnixStream,
    /// The decoded copy its guest maps, kept until the worker is gone so the copy is never
    /// counted as unused while a guest still maps it.
    copy: Option<Arc<DecodedCopy>>,
    /// Jailed: its snapshot and key are at their places inside the jail.
    jailed: bool,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("function", &self.function)
            .field("pid", &self.child.id())
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

/// The name of a reply, for errors (a reply may carry megabytes).
fn reply_name(reply: &Reply) -> &'static str {
    match reply {
        Reply::Prepared { .. } => "Prepared",
        Reply::Restored { .. } => "Restored",
        Reply::Invoked { .. } => "Invoked",
        Reply::Frozen => "Frozen",
        Reply::Thawed => "Thawed",
        Reply::ShutDown => "ShutDown",
        Reply::Failed { .. } => "Failed",
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Worker {
    /// Starts a worker process for `function`: stdin and stdout are its request and reply
    /// streams, stderr (its log) is the daemon's, fd 3 its descriptor channel. The process is
    /// killed if the `Worker` is dropped.
    pub async fn spawn(cmd: &WorkerCommand, function: &str) -> Result<Worker, WorkerError> {
        Self::start(cmd, function, None).await
    }

    /// [`Worker::spawn`], jailed as `jail` says (`super::jail`): the worker sees only
    /// `jail.snapshot` and `jail.key_file`, and every restore asked of it must name those.
    pub async fn spawn_jailed(
        cmd: &WorkerCommand,
        function: &str,
        jail: &JailSpec,
    ) -> Result<Worker, WorkerError> {
        Self::start(cmd, function, Some(jail)).await
    }

    async fn start(
        cmd: &WorkerCommand,
        function: &str,
        jail: Option<&JailSpec>,
    ) -> Result<Worker, WorkerError> {
        let (channel, child_end) = copy_channel::pair().map_err(|e| match e {
            ChannelError::Io(io) => WorkerError::Spawn(io),
            other => WorkerError::Spawn(std::io::Error::other(other)),
        })?;
        let mut command = Command::new(&cmd.program);
        command
            .args(&cmd.args)
            .args(jail.map(JailSpec::to_args).unwrap_or_default())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        copy_channel::install(&mut command, child_end);
        let mut child = command.spawn().map_err(WorkerError::Spawn)?;
        // The child's end lives in the closure, which goes with the command: drop it now so a
        // worker that exits closes the channel.
        drop(command);
        let pipes = child.stdin.take().zip(child.stdout.take());
        let Some((stdin, stdout)) = pipes else {
            return Err(WorkerError::Spawn(std::io::Error::other(
                "the worker's pipes were not set up",
            )));
        };
        tracing::debug!(pid = ?child.id(), "worker started");
        Ok(Worker {
            child,
            stdin,
            stdout,
            poisoned: false,
            function: function.to_owned(),
            channel,
            copy: None,
            jailed: jail.is_some(),
        })
    }

    /// The process id, until the process has been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether an earlier error left this worker unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Has the worker build a machine shell for a guest of this size; how long that took.
    pub async fn prepare(
        &mut self,
        mem_bytes: u64,
        vcpus: u8,
        timeout: Duration,
    ) -> Result<Duration, WorkerError> {
        let request = Request::Prepare { mem_bytes, vcpus };
        match self.ask(&request, "Prepare", timeout).await? {
            Reply::Prepared { shell_us } => Ok(Duration::from_micros(shell_us)),
            other => Err(self.unexpected("Prepare", &other)),
        }
    }

    /// The function this worker serves.
    pub fn function(&self) -> &str {
        &self.function
    }

    /// Has the worker restore `spec`'s snapshot ahead, with memory from `copy` (its function's,
    /// or [`WorkerError::ForeignCopy`]), up to a machine that could run; the next
    /// [`Worker::restore`] of that snapshot only starts it. How long the preparation took.
    pub async fn prepare_restore(
        &mut self,
        spec: &RestoreSpec,
        copy: &CopyGrant,
        timeout: Duration,
    ) -> Result<Duration, WorkerError> {
        self.send_copy(copy)?;
        let (snapshot, key_file) = self.paths(spec);
        let request = Request::PrepareRestore {
            snapshot,
            key_file,
            shared_copy: copy.copy.ticket(),
        };
        match self.ask(&request, "PrepareRestore", timeout).await? {
            Reply::Prepared { shell_us } => Ok(Duration::from_micros(shell_us)),
            other => Err(self.unexpected("PrepareRestore", &other)),
        }
    }

    /// Where the worker finds `spec`'s snapshot and key: inside a jail, the places its jail
    /// mounted them (the jail holds this function's files only).
    fn paths(&self, spec: &RestoreSpec) -> (PathBuf, Option<PathBuf>) {
        if self.jailed {
            let key = spec.key_file.as_ref().map(|_| PathBuf::from(KEY_IN_JAIL));
            (PathBuf::from(SNAPSHOT_IN_JAIL), key)
        } else {
            (spec.snapshot.clone(), spec.key_file.clone())
        }
    }

    /// Sends `grant`'s descriptor ahead of the request that names it, after checking it is
    /// this worker's function's; the worker keeps the copy from then on.
    fn send_copy(&mut self, grant: &CopyGrant) -> Result<(), WorkerError> {
        if grant.function != self.function {
            return Err(WorkerError::ForeignCopy {
                copy_of: grant.function.clone(),
                worker_of: self.function.clone(),
            });
        }
        if self.poisoned {
            return Err(WorkerError::Poisoned);
        }
        if let Err(e) = copy_channel::send(&self.channel, grant.copy.fd()) {
            self.poisoned = true;
            return Err(WorkerError::Channel(e));
        }
        self.copy = Some(grant.copy.clone());
        Ok(())
    }

    /// Restores a snapshot in the worker and waits until its after-restore hooks are done.
    /// With `copy`, guest memory is mapped from that decoded copy, which must be this worker's
    /// function's ([`WorkerError::ForeignCopy`] otherwise, before anything is sent).
    pub async fn restore(
        &mut self,
        spec: RestoreSpec,
        copy: Option<&CopyGrant>,
        timeout: Duration,
    ) -> Result<RestoredInfo, WorkerError> {
        if let Some(grant) = copy {
            // Sent before the request, which tells the worker to take it.
            self.send_copy(grant)?;
        }
        let (snapshot, key_file) = self.paths(&spec);
        let request = Request::Restore {
            snapshot,
            key_file,
            memory: spec.memory.into(),
            after_restore_timeout_ms: millis(spec.after_restore_timeout),
            verified: spec.verified.map(|id| id.0),
            shared_copy: copy.map(|g| g.copy.ticket()),
        };
        match self.ask(&request, "Restore", timeout).await? {
            Reply::Restored {
                restore_us,
                ready_us,
                hello_us,
                shell_was_ready,
            } => Ok(RestoredInfo {
                restore: Duration::from_micros(restore_us),
                ready: Duration::from_micros(ready_us),
                hello: Duration::from_micros(hello_us),
                shell_was_ready,
            }),
            other => Err(self.unexpected("Restore", &other)),
        }
    }

    /// Runs one invocation that may take up to its `timeout_ms` (the function's timeout). The
    /// worker reports a function that runs longer as [`FailureKind::InvokeTimeout`]; a worker
    /// that does not even do that within [`INVOKE_GRACE`] more is a [`WorkerError::Timeout`].
    pub async fn invoke(&mut self, invoke: Invoke) -> Result<Invoked, WorkerError> {
        let timeout = Duration::from_millis(invoke.timeout_ms);
        let request = Request::Invoke(invoke);
        match self
            .ask(&request, "Invoke", timeout.saturating_add(INVOKE_GRACE))
            .await?
        {
            Reply::Invoked {
                outcome,
                duration_us,
                console,
                max_memory_used_bytes,
            } => Ok(Invoked {
                outcome,
                duration: Duration::from_micros(duration_us),
                console,
                max_memory_used_bytes,
            }),
            other => Err(self.unexpected("Invoke", &other)),
        }
    }

    /// Pauses the environment's vCPUs.
    pub async fn freeze(&mut self, timeout: Duration) -> Result<(), WorkerError> {
        match self.ask(&Request::Freeze, "Freeze", timeout).await? {
            Reply::Frozen => Ok(()),
            other => Err(self.unexpected("Freeze", &other)),
        }
    }

    /// Resumes them.
    pub async fn thaw(&mut self, timeout: Duration) -> Result<(), WorkerError> {
        match self.ask(&Request::Thaw, "Thaw", timeout).await? {
            Reply::Thawed => Ok(()),
            other => Err(self.unexpected("Thaw", &other)),
        }
    }

    /// Asks the worker to shut its guest down and exit; kills it if it has not exited within
    /// `grace`. The worker itself gives its guest up to 5 s to power off before stopping it, so
    /// a `grace` shorter than that may kill a worker that was about to exit cleanly. Always
    /// reaps the process; its exit status, unless waiting for it failed.
    pub async fn shutdown(self, grace: Duration) -> Option<ExitStatus> {
        let Worker {
            mut child,
            mut stdin,
            mut stdout,
            poisoned,
            function: _,
            channel: _channel,
            copy: _copy,
            jailed: _,
        } = self;
        let polite = async {
            if let Err(e) = write_frame_async(&mut stdin, &Request::Shutdown).await {
                tracing::debug!(error = %e, "cannot send Shutdown to the worker");
            }
            drop(stdin);
            // A poisoned worker may first finish an earlier reply: read until the end, so a
            // full pipe cannot keep it from exiting.
            if let Err(e) = tokio::io::copy(&mut stdout, &mut tokio::io::sink()).await {
                tracing::debug!(error = %e, "reading the worker's last replies failed");
            }
            child.wait().await
        };
        let politely = tokio::time::timeout(grace, polite).await;
        match politely {
            Ok(Ok(status)) => {
                if !status.success() || poisoned {
                    tracing::debug!(%status, poisoned, "worker shut down");
                }
                Some(status)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot wait for the worker");
                None
            }
            Err(_) => {
                tracing::warn!(?grace, "the worker did not shut down in time; killing it");
                kill_and_reap(&mut child).await
            }
        }
    }

    /// Kills the worker (SIGKILL) and reaps it; its exit status, unless waiting for it failed.
    pub async fn kill(mut self) -> Option<ExitStatus> {
        kill_and_reap(&mut self.child).await
    }

    /// Sends `request` and reads its reply within `timeout`. The worker stays poisoned unless a
    /// reply that is not a failure arrives.
    async fn ask(
        &mut self,
        request: &Request,
        name: &'static str,
        timeout: Duration,
    ) -> Result<Reply, WorkerError> {
        if self.poisoned {
            return Err(WorkerError::Poisoned);
        }
        self.poisoned = true;
        let reply = match tokio::time::timeout(timeout, self.round_trip(request)).await {
            Ok(reply) => reply?,
            Err(_) => {
                return Err(WorkerError::Timeout {
                    request: name,
                    after: timeout,
                });
            }
        };
        if let Reply::Failed {
            kind,
            message,
            console,
        } = reply
        {
            return Err(WorkerError::Failed {
                kind,
                message,
                console,
            });
        }
        self.poisoned = false;
        Ok(reply)
    }

    async fn round_trip(&mut self, request: &Request) -> Result<Reply, WorkerError> {
        if let Err(e) = write_frame_async(&mut self.stdin, request).await {
            return Err(self.broken(e).await);
        }
        match read_frame_async(&mut self.stdout).await {
            Ok(reply) => Ok(reply),
            Err(e) => Err(self.broken(e).await),
        }
    }

    /// What a failed read or write means: a stream that ended or failed is a worker that died
    /// (its status, once it has exited); bytes that are no reply are a protocol error.
    async fn broken(&mut self, e: FrameError) -> WorkerError {
        match e {
            FrameError::Closed | FrameError::Truncated { .. } | FrameError::Io(_) => {
                match tokio::time::timeout(EXIT_WAIT, self.child.wait()).await {
                    Ok(Ok(status)) => WorkerError::Died {
                        status: status.to_string(),
                    },
                    Ok(Err(wait)) => WorkerError::Died {
                        status: format!("unknown ({wait})"),
                    },
                    Err(_) => {
                        WorkerError::Protocol(format!("{e}, but the worker process still runs"))
                    }
                }
            }
            FrameError::TooLarge { .. }
            | FrameError::Decode(_)
            | FrameError::TrailingBytes { .. }
            | FrameError::Encode(_) => WorkerError::Protocol(e.to_string()),
        }
    }

    fn unexpected(&mut self, request: &str, reply: &Reply) -> WorkerError {
        self.poisoned = true;
        WorkerError::Protocol(format!("{request} was answered with {}", reply_name(reply)))
    }
}

async fn kill_and_reap(child: &mut Child) -> Option<ExitStatus> {
    // Fails only if the process was already reaped; wait() then returns its status.
    if let Err(e) = child.start_kill() {
        tracing::debug!(error = %e, "cannot signal the worker");
    }
    match child.wait().await {
        Ok(status) => Some(status),
        Err(e) => {
            tracing::warn!(error = %e, "cannot reap the worker");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::protocol::encode_frame;
    use super::*;

    /// A fake worker: a shell script.
    fn sh(script: &str) -> WorkerCommand {
        WorkerCommand {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
        }
    }

    /// A fake worker that reads one request, answers with `replies` (written to a file first),
    /// then runs `then`.
    fn answering(dir: &tempfile::TempDir, replies: &[Reply], then: &str) -> WorkerCommand {
        let path = dir.path().join("replies");
        let bytes: Vec<u8> = replies
            .iter()
            .flat_map(|r| encode_frame(r).unwrap())
            .collect();
        std::fs::write(&path, bytes).unwrap();
        // `head -c1` waits for the request to start arriving before answering.
        sh(&format!(
            "head -c1 >/dev/null; cat '{}'; {then}",
            path.display()
        ))
    }

    const SHORT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_worker_that_exits_is_reported_dead_with_its_status() {
        let mut worker = Worker::spawn(&sh("exit 3"), "f").await.unwrap();
        let err = worker.freeze(SHORT).await.unwrap_err();
        assert!(
            matches!(&err, WorkerError::Died { status } if status.contains('3')),
            "{err:?}"
        );
        assert!(matches!(
            worker.freeze(SHORT).await,
            Err(WorkerError::Poisoned)
        ));
        let status = worker.kill().await.unwrap();
        assert_eq!(status.code(), Some(3));
    }

    #[tokio::test]
    async fn a_silent_worker_times_out_and_is_poisoned() {
        let mut worker = Worker::spawn(&sh("exec sleep 30"), "f").await.unwrap();
        let pid = worker.pid().unwrap();
        let err = worker
            .prepare(1 << 20, 1, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(
            matches!(err, WorkerError::Timeout { request: "Prepare", after }
                if after == Duration::from_millis(100)),
            "{err:?}"
        );
        assert!(worker.is_poisoned());
        assert!(matches!(
            worker.thaw(SHORT).await,
            Err(WorkerError::Poisoned)
        ));
        let status = worker.kill().await.unwrap();
        assert!(!status.success());
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "reaped"
        );
    }

    #[tokio::test]
    async fn a_worker_that_ignores_shutdown_is_killed_after_the_grace() {
        let worker = Worker::spawn(&sh("exec sleep 30"), "f").await.unwrap();
        let started = std::time::Instant::now();
        let status = worker.shutdown(Duration::from_millis(200)).await.unwrap();
        assert!(!status.success(), "{status}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn garbage_is_a_protocol_error() {
        let mut worker = Worker::spawn(&sh("head -c1 >/dev/null; printf '\\005\\000\\000\\000\\377\\377\\377\\377\\377'; exec sleep 30"), "f")
            .await
            .unwrap();
        let err = worker.freeze(SHORT).await.unwrap_err();
        assert!(matches!(err, WorkerError::Protocol(_)), "{err:?}");
        worker.kill().await;
    }

    #[tokio::test]
    async fn replies_are_matched_to_their_requests() {
        let dir = tempfile::tempdir().unwrap();
        let mut worker = Worker::spawn(&answering(&dir, &[Reply::Frozen], "exec sleep 30"), "f")
            .await
            .unwrap();
        worker.freeze(SHORT).await.unwrap();
        assert!(!worker.is_poisoned());
        worker.kill().await;

        // The wrong reply.
        let mut worker = Worker::spawn(&answering(&dir, &[Reply::Thawed], "exec sleep 30"), "f")
            .await
            .unwrap();
        let err = worker.freeze(SHORT).await.unwrap_err();
        assert!(
            matches!(&err, WorkerError::Protocol(m) if m.contains("Freeze was answered with Thawed")),
            "{err:?}"
        );
        assert!(worker.is_poisoned());
        worker.kill().await;
    }

    #[tokio::test]
    async fn a_failure_reply_is_a_typed_error_and_poisons_the_worker() {
        let dir = tempfile::tempdir().unwrap();
        let failed = Reply::Failed {
            kind: FailureKind::GuestEnded { exit_code: Some(4) },
            message: "the guest stopped".into(),
            console: b"panic".to_vec(),
        };
        let mut worker = Worker::spawn(&answering(&dir, &[failed], "exec sleep 30"), "f")
            .await
            .unwrap();
        let err = worker
            .invoke(Invoke {
                timeout_ms: 1000,
                ..Invoke::default()
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, WorkerError::Failed { kind: FailureKind::GuestEnded { exit_code: Some(4) }, console, .. }
                if console == b"panic"),
            "{err:?}"
        );
        assert!(matches!(
            worker.freeze(SHORT).await,
            Err(WorkerError::Poisoned)
        ));
        worker.kill().await;
    }

    #[tokio::test]
    async fn a_worker_that_shuts_down_is_reaped_with_its_status() {
        let dir = tempfile::tempdir().unwrap();
        let worker = Worker::spawn(&answering(&dir, &[Reply::ShutDown], "exit 0"), "f")
            .await
            .unwrap();
        let status = worker.shutdown(SHORT).await.unwrap();
        assert!(status.success(), "{status}");
    }

    #[tokio::test]
    async fn a_copy_of_another_function_is_refused_before_anything_is_sent() {
        use nix::fcntl::{FcntlArg, SealFlag, fcntl};
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let fd = memfd_create("t", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(4096).unwrap();
        let seals = SealFlag::F_SEAL_WRITE
            | SealFlag::F_SEAL_GROW
            | SealFlag::F_SEAL_SHRINK
            | SealFlag::F_SEAL_SEAL;
        fcntl(&file, FcntlArg::F_ADD_SEALS(seals)).unwrap();
        let ticket = crate::decoded_copy::CopyTicket {
            snapshot_id: [1; 16],
            mem_bytes: 4096,
        };
        let grant = CopyGrant {
            function: "other".into(),
            copy: Arc::new(DecodedCopy::adopt(file.into(), ticket).unwrap()),
        };
        // A worker that would die on any byte: nothing may reach it.
        let mut worker = Worker::spawn(&sh("exec sleep 30"), "mine").await.unwrap();
        assert_eq!(worker.function(), "mine");
        let spec = RestoreSpec {
            snapshot: "/s".into(),
            key_file: None,
            memory: MemoryMode::Lazy,
            verified: Some(snapshot::SnapshotId([7; 16])),
            after_restore_timeout: Duration::from_secs(1),
        };
        let e = worker
            .restore(spec, Some(&grant), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, WorkerError::ForeignCopy { copy_of, worker_of } if copy_of == "other" && worker_of == "mine"),
            "{e}"
        );
        assert!(!worker.is_poisoned(), "nothing was sent");
        assert!(
            Arc::strong_count(&grant.copy) == 1,
            "the worker kept no reference"
        );
        worker.kill().await;
    }

    #[tokio::test]
    async fn the_worker_gets_its_descriptor_channel_at_fd_3() {
        // The fake worker reports what fd 3 is.
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("fd3");
        let script = format!(
            "readlink /proc/self/fd/3 > {}; exec sleep 30",
            out.display()
        );
        let worker = Worker::spawn(&sh(&script), "f").await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let link = loop {
            if let Ok(text) = std::fs::read_to_string(&out)
                && !text.is_empty()
            {
                break text;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the worker never wrote"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(link.starts_with("socket:"), "{link}");
        worker.kill().await;
    }

    #[tokio::test]
    async fn a_missing_program_cannot_be_spawned() {
        let cmd = WorkerCommand::thawd("/nonexistent/thawd".into());
        assert!(matches!(
            Worker::spawn(&cmd, "f").await,
            Err(WorkerError::Spawn(_))
        ));
    }
}

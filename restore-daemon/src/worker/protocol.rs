//! What `thawd` and a worker process say to each other over the worker's stdin and stdout:
//! one request, then its one reply, in order. Each message is a frame: a 4-byte little-endian
//! length, then that many bytes of bincode (serde, standard config, little-endian, fixed-width
//! integers). Frames over [`MAX_FRAME`] are refused by both sides.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The largest frame either side accepts: a 6 MB payload plus its envelope and console bytes.
pub const MAX_FRAME: usize = 16 << 20;

/// Memory mode of a restore, as `restore_daemon::restore::MemoryMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireMemoryMode {
    /// All memory decoded before the guest runs.
    Eager,
    /// Memory paged in through userfaultfd (working set first, then prefetch).
    Lazy,
}

/// The daemon's requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Build a machine shell of this size now, so a later `Restore` finds it ready. Sent to
    /// spare workers before any invocation needs them.
    Prepare {
        /// Guest memory in bytes.
        mem_bytes: u64,
        /// vCPUs.
        vcpus: u8,
    },
    /// Restore the snapshot and run the after-restore handshake; answered `Restored` once the
    /// environment is ready for invocations.
    Restore {
        /// The snapshot directory.
        snapshot: PathBuf,
        /// The master key file; `None` for the host key (or an unencrypted snapshot).
        key_file: Option<PathBuf>,
        /// How memory comes back.
        memory: WireMemoryMode,
        /// Budget for the after-restore hooks, ms (Lambda: 10 000).
        after_restore_timeout_ms: u64,
    },
    /// Run one invocation; answered `Invoked`, or `Failed` if it got no answer.
    Invoke {
        /// Lambda's request id.
        request_id: String,
        /// The deadline, Unix milliseconds.
        deadline_ms: u64,
        /// The function's ARN.
        function_arn: String,
        /// Client context, or empty.
        client_context: String,
        /// The event.
        payload: Vec<u8>,
        /// How long the function may run, ms; past it the worker answers `Failed` with
        /// `FailureKind::InvokeTimeout`.
        timeout_ms: u64,
    },
    /// Pause every vCPU (Lambda's freeze of an idle environment); answered `Frozen`.
    Freeze,
    /// Resume them; answered `Thawed`.
    Thaw,
    /// Ask the guest to power off, stop the VM and exit; answered `ShutDown` just before the
    /// worker exits.
    Shutdown,
}

/// The function's answer to one invocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireOutcome {
    /// The response payload.
    Response(Vec<u8>),
    /// The function reported an error: its error type and error document.
    FunctionError {
        /// E.g. `Runtime.ExitError` or the runtime's own type.
        error_type: String,
        /// The error document (JSON).
        body: Vec<u8>,
    },
}

/// What failed in a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// The snapshot could not be restored (refused, tampered, wrong key, host mismatch...).
    Restore,
    /// The after-restore hooks failed (`Runtime.AfterRestoreError`) or the agent misbehaved
    /// after the restore.
    AfterRestore {
        /// Lambda's error type.
        error_type: String,
    },
    /// The after-restore hooks did not finish within their budget.
    AfterRestoreTimeout,
    /// The invocation ran past its timeout.
    InvokeTimeout,
    /// The guest stopped (crashed, powered off) during the invocation.
    GuestEnded {
        /// Its exit code, if it exited through the debug-exit port.
        exit_code: Option<i32>,
    },
    /// The request came in the wrong state (e.g. `Invoke` before `Restore`).
    BadRequest,
    /// Anything else inside the worker.
    Internal,
}

/// The worker's replies, one per request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The shell is built.
    Prepared {
        /// How long it took, µs.
        shell_us: u64,
    },
    /// The environment is ready.
    Restored {
        /// From the start of the restore until the machine could run, µs.
        restore_us: u64,
        /// From the start until the after-restore hooks finished, µs.
        ready_us: u64,
        /// Whether the restore found a prepared shell.
        shell_was_ready: bool,
    },
    /// The invocation was answered.
    Invoked {
        /// The answer.
        outcome: WireOutcome,
        /// From sending the event to the answer, µs.
        duration_us: u64,
        /// What the guest printed on its console during the invocation (at most 64 KiB: the
        /// end of it).
        console: Vec<u8>,
        /// The worker's peak resident memory so far (`VmHWM`), bytes.
        max_memory_used_bytes: u64,
    },
    /// The vCPUs are paused.
    Frozen,
    /// The vCPUs run again.
    Thawed,
    /// The worker is about to exit.
    ShutDown,
    /// The request failed. After a failure of an environment (anything but `BadRequest`) the
    /// worker holds no usable guest: the daemon discards it.
    Failed {
        /// What failed.
        kind: FailureKind,
        /// The error, with its causes.
        message: String,
        /// The end of the guest's console (at most 4 KiB), for the caller's log.
        console: Vec<u8>,
    },
}

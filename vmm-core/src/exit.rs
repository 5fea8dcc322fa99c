//! Why a machine stopped, and the one place that records it: the first reason wins, later ones
//! (other vCPUs noticing the stop) are ignored, and the VMM's event loop is woken through an
//! eventfd.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// Why the guest stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest wrote its exit code to the debug-exit port.
    GuestExit(u8),
    /// The guest reset the machine through the i8042 controller (Linux `reboot`).
    Reset,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN): the guest crashed or forced a reset that way.
    TripleFault {
        /// The vCPU.
        vcpu: u8,
    },
    /// KVM asked for a shutdown or reset on the guest's behalf (KVM_EXIT_SYSTEM_EVENT).
    SystemEvent {
        /// KVM_SYSTEM_EVENT_* type.
        kind: u32,
    },
    /// A vCPU could not run (KVM error, failed entry, internal error).
    VcpuFailed {
        /// The vCPU.
        vcpu: u8,
        /// What went wrong.
        message: String,
    },
    /// The host asked the machine to stop.
    Stopped,
}

impl ExitReason {
    /// The process exit code `thaw run` reports for this reason: the guest's own code, 0 for a
    /// guest-initiated reset or shutdown, and non-zero for crashes and failures.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestExit(code) => i32::from(*code),
            ExitReason::Reset | ExitReason::SystemEvent { .. } | ExitReason::Stopped => 0,
            ExitReason::TripleFault { .. } => 125,
            ExitReason::VcpuFailed { .. } => 126,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestExit(code) => write!(f, "guest exited with code {code}"),
            ExitReason::Reset => write!(f, "guest reset the machine"),
            ExitReason::TripleFault { vcpu } => write!(f, "vCPU {vcpu} triple-faulted"),
            ExitReason::SystemEvent { kind } => write!(f, "KVM system event {kind}"),
            ExitReason::VcpuFailed { vcpu, message } => write!(f, "vCPU {vcpu} failed: {message}"),
            ExitReason::Stopped => write!(f, "stopped by the host"),
        }
    }
}

/// Records the first exit reason and wakes whoever waits for it.
#[derive(Debug)]
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    /// Mirrors `reason.is_some()` so vCPUs can check it on every exit without locking.
    requested: AtomicBool,
    event: EventFd,
}

impl ExitSignal {
    /// A signal with no reason recorded yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            requested: AtomicBool::new(false),
            event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    /// Records `reason` unless one is already recorded, and wakes the event loop.
    pub fn request(&self, reason: ExitReason) {
        let mut slot = match self.reason.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if slot.is_none() {
            tracing::debug!(%reason, "machine exit requested");
            *slot = Some(reason);
            self.requested.store(true, Ordering::SeqCst);
        }
        drop(slot);
        // A full eventfd counter still wakes the reader, so a failed write loses nothing.
        let _ = self.event.write(1);
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        match self.reason.lock() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether an exit was requested.
    pub fn is_set(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
}

impl AsRawFd for ExitSignal {
    fn as_raw_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let signal = ExitSignal::new().unwrap();
        assert!(!signal.is_set());
        signal.request(ExitReason::GuestExit(3));
        signal.request(ExitReason::Reset);
        assert_eq!(signal.reason(), Some(ExitReason::GuestExit(3)));
        assert_eq!(signal.reason().unwrap().exit_code(), 3);
    }

    #[test]
    fn crashes_map_to_nonzero_exit_codes() {
        assert_eq!(ExitReason::Reset.exit_code(), 0);
        assert_ne!(ExitReason::TripleFault { vcpu: 0 }.exit_code(), 0);
        let failed = ExitReason::VcpuFailed {
            vcpu: 1,
            message: "x".into(),
        };
        assert_ne!(failed.exit_code(), 0);
    }
}

//! Controlling a running machine from other threads: pause, resume, save and stop.
//!
//! A [`MachineController`] queues a request and wakes the VMM thread's event loop through an
//! eventfd; the loop, which owns the devices, carries the request out and answers on a one-shot
//! channel. When the machine ends, the queue is closed and every request still in it is
//! dropped, which drops its reply sender: a waiting caller gets [`ControlError::Exited`] instead
//! of waiting forever, and so does any later request.

use std::collections::VecDeque;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::state::MachineState;
use crate::devices::serial::SerialStateError;
use crate::devices::virtio::mmio::MmioStateError;
use crate::exit::{ExitReason, ExitSignal};
use crate::vcpu::state::VcpuStateError;
use crate::vm_state::VmStateError;

/// A request to a running machine could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The machine has stopped (or stopped while the request was served).
    #[error("the machine is not running (exit: {reason:?})")]
    Exited {
        /// Why it stopped, if it has.
        reason: Option<ExitReason>,
    },
    /// Saving needs a paused machine.
    #[error("the machine must be paused to save it")]
    NotPaused,
    /// A vCPU did not leave the guest in time; the machine was resumed.
    #[error("vCPU {vcpu} did not pause within {timeout:?}")]
    PauseTimeout {
        /// The vCPU.
        vcpu: u8,
        /// How long it was given.
        timeout: Duration,
    },
    /// Saving failed; the machine stays paused.
    #[error("saving the machine failed")]
    Save(#[source] SaveError),
    /// The event loop could not be woken.
    #[error("cannot wake the VMM event loop")]
    Wake(#[source] std::io::Error),
}

/// A part of the machine's state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// A vCPU's state.
    #[error(transparent)]
    Vcpu(#[from] VcpuStateError),
    /// The VM's in-kernel devices.
    #[error(transparent)]
    Vm(#[from] VmStateError),
    /// COM1.
    #[error("serial console state")]
    Serial(#[source] SerialStateError),
    /// The vsock device.
    #[error("vsock device state")]
    Vsock(#[source] MmioStateError),
}

/// What the event loop is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RequestKind {
    Pause,
    Resume,
    Save,
}

/// What the event loop answers.
pub(super) enum Response {
    Done,
    Saved(Box<MachineState>),
}

/// A queued request with its one-shot reply channel.
pub(super) struct Request {
    pub kind: RequestKind,
    pub reply: SyncSender<Result<Response, ControlError>>,
}

struct Queue {
    open: bool,
    requests: VecDeque<Request>,
}

/// The queue shared by controllers and the event loop.
pub(super) struct ControlShared {
    queue: Mutex<Queue>,
    wake: EventFd,
    exit: Arc<ExitSignal>,
}

impl ControlShared {
    pub fn new(exit: Arc<ExitSignal>) -> std::io::Result<Self> {
        Ok(Self {
            queue: Mutex::new(Queue {
                open: true,
                requests: VecDeque::new(),
            }),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            exit,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        match self.queue.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn exited(&self) -> ControlError {
        ControlError::Exited {
            reason: self.exit.reason(),
        }
    }

    /// The eventfd the event loop polls.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Takes every queued request (the event loop, when woken).
    pub fn take(&self) -> Vec<Request> {
        // Consume the wakeup first: a request queued after this read wakes the loop again.
        let _ = self.wake.read();
        self.lock().requests.drain(..).collect()
    }

    /// Refuses further requests and drops the queued ones, so their callers get an error.
    pub fn close(&self) {
        let dropped: Vec<Request> = {
            let mut q = self.lock();
            q.open = false;
            q.requests.drain(..).collect()
        };
        if !dropped.is_empty() {
            tracing::debug!(
                requests = dropped.len(),
                "machine ended with control requests pending"
            );
        }
    }

    fn submit(&self, kind: RequestKind) -> Result<Response, ControlError> {
        let (reply, answer) = sync_channel(1);
        {
            let mut q = self.lock();
            if !q.open {
                return Err(self.exited());
            }
            q.requests.push_back(Request { kind, reply });
        }
        self.wake.write(1).map_err(ControlError::Wake)?;
        match answer.recv() {
            Ok(result) => result,
            // The request was dropped unanswered: the machine ended.
            Err(_) => Err(self.exited()),
        }
    }
}

/// Pauses, resumes, saves or stops a machine from any thread. Get one with
/// [`Machine::controller`](super::Machine::controller) before [`Machine::run`](super::Machine::run);
/// requests made before `run` starts wait until it does.
#[derive(Clone)]
pub struct MachineController {
    shared: Arc<ControlShared>,
}

impl MachineController {
    pub(super) fn new(shared: Arc<ControlShared>) -> Self {
        Self { shared }
    }

    /// Stops every vCPU (each leaves `KVM_RUN`, finishes half-done I/O and parks) and the
    /// device work of the event loop (virtio queues, vsock sockets, console input). Returns once
    /// all are parked. Pausing a paused machine does nothing.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.shared.submit(RequestKind::Pause).map(|_| ())
    }

    /// Lets a paused machine run again. Resuming a running machine does nothing.
    pub fn resume(&self) -> Result<(), ControlError> {
        self.shared.submit(RequestKind::Resume).map(|_| ())
    }

    /// Captures the whole machine's state except guest memory (which the caller copies while
    /// the machine is paused). Only while paused.
    pub fn save(&self) -> Result<MachineState, ControlError> {
        match self.shared.submit(RequestKind::Save)? {
            Response::Saved(state) => Ok(*state),
            Response::Done => Err(ControlError::NotPaused),
        }
    }

    /// Ends the machine: [`Machine::run`](super::Machine::run) returns
    /// [`ExitReason::Stopped`] (unless the guest exited first). Works paused or running.
    pub fn stop(&self) {
        self.shared.exit.request(ExitReason::Stopped);
    }
}

//! Controlling a running machine from other threads: pause, which yields the [`Paused`] guard
//! that saves the machine, reads its memory and resumes it, and stop.
//!
//! A [`MachineController`] queues a request and wakes the VMM thread's event loop through an
//! eventfd; the loop, which owns the devices, carries the request out and answers on a one-shot
//! channel. When the machine ends, the queue is closed and every request still in it is
//! dropped, which drops its reply sender: a waiting caller gets [`ControlError::Exited`] instead
//! of waiting forever, and so does any later request.
//!
//! The guard is what makes "only while paused" a type instead of a promise. At most one exists
//! per machine: [`MachineController::pause`] refuses with [`ControlError::AlreadyPaused`] while
//! one lives (or another pause is under way), and only a guard asks the event loop to resume —
//! [`Paused::resume`], or dropping it. So while a guard lives the machine stays paused, and a
//! borrow of the guard is enough to read guest memory in place ([`Paused::memory`]). The
//! resume request is queued in the same critical section that releases the guard, so a pause
//! asked for afterwards is served after it and never undone by it.
//!
//! The event loop's own requests are unchanged: pausing a paused machine or resuming a running
//! one does nothing there; the guard just never asks for either.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::state::MachineState;
use crate::devices::serial::SerialStateError;
use crate::devices::virtio::mmio::MmioStateError;
use crate::exit::{ExitReason, ExitSignal};
use crate::memory::{self, GuestMemory};
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
    /// Saving needs a paused machine (the event loop's own check; a [`Paused`] guard always
    /// meets it).
    #[error("the machine must be paused to save it")]
    NotPaused,
    /// A [`Paused`] guard of this machine is alive, or another pause is under way: there is at
    /// most one guard per machine, and whoever holds it decides when the machine resumes.
    #[error("the machine is already paused by someone else")]
    AlreadyPaused,
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
    /// A block device.
    #[error("block device state")]
    Block(#[source] MmioStateError),
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
    /// A [`Paused`] guard exists, or a pause that would make one is under way.
    guarded: bool,
    /// The machine's memory, cloned into each guard. Dropped when the queue closes, so that a
    /// controller outliving its machine does not keep the machine's memory mapped.
    memory: Option<GuestMemory>,
}

type Answer = Receiver<Result<Response, ControlError>>;

/// Queues a request on the locked queue; the caller wakes the loop and waits for the answer.
fn push(q: &mut Queue, kind: RequestKind) -> Answer {
    let (reply, answer) = sync_channel(1);
    q.requests.push_back(Request { kind, reply });
    answer
}

/// The queue shared by controllers and the event loop.
pub(super) struct ControlShared {
    queue: Mutex<Queue>,
    wake: EventFd,
    exit: Arc<ExitSignal>,
}

impl ControlShared {
    pub fn new(exit: Arc<ExitSignal>, memory: GuestMemory) -> std::io::Result<Self> {
        Ok(Self {
            queue: Mutex::new(Queue {
                open: true,
                requests: VecDeque::new(),
                guarded: false,
                memory: Some(memory),
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
            q.memory = None;
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
        let answer = {
            let mut q = self.lock();
            if !q.open {
                return Err(self.exited());
            }
            push(&mut q, kind)
        };
        self.wake_and_wait(answer)
    }

    fn wake_and_wait(&self, answer: Answer) -> Result<Response, ControlError> {
        self.wake.write(1).map_err(ControlError::Wake)?;
        match answer.recv() {
            Ok(result) => result,
            // The request was dropped unanswered: the machine ended.
            Err(_) => Err(self.exited()),
        }
    }

    /// Pauses the machine for a new guard, unless one exists.
    fn pause(self: &Arc<Self>) -> Result<Paused, ControlError> {
        let (answer, memory) = {
            let mut q = self.lock();
            let memory = match (&q.memory, q.open) {
                (Some(memory), true) => memory.clone(),
                _ => return Err(self.exited()),
            };
            if q.guarded {
                return Err(ControlError::AlreadyPaused);
            }
            q.guarded = true;
            (push(&mut q, RequestKind::Pause), memory)
        };
        match self.wake_and_wait(answer) {
            Ok(_) => Ok(Paused {
                shared: self.clone(),
                memory,
                released: false,
            }),
            Err(e) => {
                // No guard came of it (a failed pause leaves the machine running, or ended).
                self.lock().guarded = false;
                Err(e)
            }
        }
    }

    /// Gives up the guard and queues the resume in one step, so that any pause asked for
    /// afterwards is served after the resume. `None` if the machine has ended.
    fn release(&self) -> Option<Answer> {
        let mut q = self.lock();
        q.guarded = false;
        q.open.then(|| push(&mut q, RequestKind::Resume))
    }

    fn check_alive(&self) -> Result<(), ControlError> {
        let open = self.lock().open;
        if open && !self.exit.is_set() {
            Ok(())
        } else {
            Err(self.exited())
        }
    }
}

/// Pauses or stops a machine from any thread; resuming and saving go through the [`Paused`]
/// guard a pause returns. Get one with [`Machine::controller`](super::Machine::controller)
/// before [`Machine::run`](super::Machine::run); requests made before `run` starts wait until it
/// does.
#[derive(Clone)]
pub struct MachineController {
    shared: Arc<ControlShared>,
}

impl MachineController {
    pub(super) fn new(shared: Arc<ControlShared>) -> Self {
        Self { shared }
    }

    /// Stops every vCPU (each leaves `KVM_RUN`, finishes half-done I/O and parks) and the
    /// device work of the event loop (virtio queues, vsock sockets, console input), and returns
    /// once all are parked, with the guard that keeps them so. The machine runs again when the
    /// guard is resumed or dropped.
    ///
    /// Refused with [`ControlError::AlreadyPaused`] while another guard of this machine lives
    /// (or another pause is under way): one guard per machine, so that no one resumes a
    /// machine someone else is reading. A machine that has ended (or ends meanwhile) gives
    /// [`ControlError::Exited`]; a vCPU that does not park in time gives
    /// [`ControlError::PauseTimeout`], with the machine running again.
    pub fn pause(&self) -> Result<Paused, ControlError> {
        self.shared.pause()
    }

    /// `Ok` while the machine runs or is paused; [`ControlError::Exited`] once it has ended or
    /// been asked to stop. What a request with nothing to do (pausing a machine one already
    /// holds paused) answers, without asking the event loop.
    pub fn check_alive(&self) -> Result<(), ControlError> {
        self.shared.check_alive()
    }

    /// Ends the machine: [`Machine::run`](super::Machine::run) returns
    /// [`ExitReason::Stopped`] (unless the guest exited first). Works paused or running; a
    /// guard that outlives the machine still reads its memory and resumes nothing.
    pub fn stop(&self) {
        self.shared.exit.request(ExitReason::Stopped);
    }
}

/// A paused machine, and the proof that it stays paused: while this guard lives no vCPU runs
/// and the event loop does no device work, because only the guard can resume the machine and
/// there is at most one per machine. Made by [`MachineController::pause`].
///
/// Dropping the guard resumes the machine, best effort and without waiting (a machine that has
/// ended ignores it); [`Paused::resume`] resumes it and reports whether that worked. Whoever
/// wants a paused machine stopped rather than resumed calls [`MachineController::stop`] before
/// dropping the guard.
///
/// The guard owns what it needs (the control queue and a handle on guest memory), so it can be
/// kept across requests, and it keeps the memory mapped even if the machine ends meanwhile.
pub struct Paused {
    shared: Arc<ControlShared>,
    memory: GuestMemory,
    /// Set once the resume has been queued (by [`Paused::resume`]), so that drop does not
    /// queue another.
    released: bool,
}

impl Paused {
    /// Captures the whole machine's state except guest memory, which [`Paused::memory`] reads.
    pub fn save(&self) -> Result<MachineState, ControlError> {
        match self.shared.submit(RequestKind::Save)? {
            Response::Saved(state) => Ok(*state),
            Response::Done => Err(ControlError::NotPaused),
        }
    }

    /// Each RAM region as `(guest address, the host bytes that back it)`, read in place, for as
    /// long as the guard is borrowed: copying a 10 GiB guest's memory to snapshot it would take
    /// 10 GiB more.
    ///
    /// The machine writes none of it meanwhile. What the guard cannot stop is host code driving
    /// a device itself from another thread through the handle
    /// [`Machine::vsock`](super::Machine::vsock) gives out (tests do, to reset the vsock
    /// transport): that bypasses the event loop, paused or not, and must not happen while these
    /// slices are read. Nothing in Thaw does it while holding a guard.
    pub fn memory(&self) -> Vec<(u64, &[u8])> {
        memory::raw_regions(&self.memory)
            .map(|(guest_addr, host, len)| {
                // SAFETY: `host` maps `len` bytes for as long as `self.memory` — and so the borrow
                // of `self` the slice carries — lives, even if the machine ends meanwhile.
                // Nothing writes them while that borrow lives:
                // - the machine: this guard exists only once the event loop has parked every
                //   vCPU outside KVM_RUN and taken its device set out of its epoll (no virtio
                //   queue or backend work), and only a guard asks it to resume — this one, the
                //   only one (`ControlShared::pause` refuses a second), through `resume` (which
                //   takes it by value) or drop (which needs it unborrowed). A machine that ends
                //   stops its vCPUs and event loop for good.
                // - other host code: a machine's memory is mapped by vmm-core itself
                //   (`MachineShell::create`/`from_file`), and the crate hands no handle on it
                //   out (`Machine::memory` is crate-private; `MappingHold` gives no access), but
                //   for the device handle of `Machine::vsock`, documented above as not to be
                //   driven while a guard is borrowed.
                // - a lazy restore's page server writes only pages not yet present (UFFDIO_COPY
                //   refuses the others), and a read of such a page waits until it is installed,
                //   so no byte these slices can observe changes under them.
                let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
                (guest_addr, bytes)
            })
            .collect()
    }

    /// Lets the machine run again and waits until it does. [`ControlError::Exited`] if it has
    /// ended meanwhile.
    pub fn resume(mut self) -> Result<(), ControlError> {
        self.released = true;
        match self.shared.release() {
            Some(answer) => self.shared.wake_and_wait(answer).map(|_| ()),
            None => Err(self.shared.exited()),
        }
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        // Queued, not waited for: the loop's answer goes nowhere. A pause asked for after this
        // is queued after the resume.
        if self.shared.release().is_some() {
            if let Err(e) = self.shared.wake.write(1) {
                tracing::warn!(error = %e, "cannot wake the VMM event loop to resume the machine");
            }
        }
    }
}

impl std::fmt::Debug for Paused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Paused")
            .field("mem_bytes", &memory::total_bytes(&self.memory))
            .finish_non_exhaustive()
    }
}

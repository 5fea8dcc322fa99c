//! vCPUs: one host thread each, running `KVM_RUN` and routing port I/O and MMIO exits to the
//! device buses.
//!
//! Stopping a vCPU that may be blocked inside `KVM_RUN` (a halted guest sits there forever) uses
//! the kernel's `immediate_exit` protocol: the host sets `kvm_run.immediate_exit` and then
//! signals the vCPU thread. If the thread is inside `KVM_RUN` the signal makes it return
//! `EINTR`; if it is about to enter, `immediate_exit` makes the next `KVM_RUN` return at once.
//! Either way the thread sees the request, so there is no window where a kick is lost.
//!
//! Pausing uses the same kick: the VMM thread queues a [`VcpuRequest::Pause`] and kicks; the
//! vCPU thread finishes any half-done I/O (see `park`), acknowledges, and then only serves
//! requests (save its state, resume) until told to resume or the machine stops.

pub mod setup;
pub mod state;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::devices::bus::Bus;
use crate::exit::{ExitReason, ExitSignal};
use crate::persist::Persist;
use state::{Vcpu, VcpuState, VcpuStateError};

/// Offset from SIGRTMIN of the signal that kicks vCPU threads out of `KVM_RUN`.
const KICK_SIGNAL_OFFSET: i32 = 0;

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// The buses a vCPU routes its exits to.
#[derive(Clone)]
pub struct Buses {
    /// Port I/O.
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
}

/// A vCPU thread could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The thread could not be created.
    #[error("cannot start the thread for vCPU {vcpu}")]
    Thread {
        /// The vCPU.
        vcpu: u8,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the point is to interrupt KVM_RUN with EINTR.
}

fn install_kick_handler() -> Result<(), SpawnError> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick).map_err(SpawnError::Signal);
    });
    result
}

/// The `immediate_exit` byte inside a vCPU's `kvm_run` mapping, shared with its handle.
struct ImmediateExit {
    /// Points into the `kvm_run` page of `_owner`.
    flag: *const AtomicU8,
    /// Keeps the `VcpuFd`, and so the `kvm_run` mapping, alive as long as this exists.
    _owner: Arc<Mutex<Vcpu>>,
}

// SAFETY: `flag` points into a mapping kept alive by `_owner`; it is only accessed through
// `AtomicU8`, which is safe to use from any thread, and the kernel only reads the byte.
unsafe impl Send for ImmediateExit {}
// SAFETY: as above; all accesses are atomic.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    fn new(fd: Arc<Mutex<Vcpu>>) -> Self {
        let flag = {
            let mut guard = match fd.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            let run = guard.fd_mut().get_kvm_run();
            std::ptr::addr_of_mut!(run.immediate_exit).cast::<AtomicU8>() as *const AtomicU8
        };
        Self { flag, _owner: fd }
    }

    fn set(&self, value: u8) {
        // SAFETY: `flag` is valid for the life of `_owner` (see the struct) and a `u8` has the
        // size and alignment of an `AtomicU8`.
        unsafe { &*self.flag }.store(value, Ordering::SeqCst);
    }
}

/// What the VMM thread asks of a vCPU thread.
pub enum VcpuRequest {
    /// Leave `KVM_RUN`, finish half-done I/O, acknowledge, and wait for further requests.
    Pause(SyncSender<()>),
    /// Read this vCPU's state (only served while paused; otherwise answered with an error).
    Save(SyncSender<Result<VcpuState, VcpuStateError>>),
    /// Run the guest again.
    Resume,
}

/// A running vCPU, as seen from the VMM thread.
pub struct VcpuHandle {
    index: u8,
    thread: JoinHandle<()>,
    immediate_exit: Arc<ImmediateExit>,
    requests: Sender<VcpuRequest>,
}

impl VcpuHandle {
    /// The vCPU's index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Forces the vCPU out of `KVM_RUN` so it notices a pending stop or request.
    pub fn kick(&self) {
        self.immediate_exit.set(1);
        if let Err(e) = self.thread.kill(kick_signal()) {
            // The thread has already finished; nothing to interrupt.
            tracing::trace!(vcpu = self.index, error = %e, "kick after vCPU thread ended");
        }
    }

    /// Queues `request` and kicks the vCPU so it sees it. Returns false if the thread is gone
    /// (the machine is stopping).
    pub fn request(&self, request: VcpuRequest) -> bool {
        if self.requests.send(request).is_err() {
            return false;
        }
        self.kick();
        true
    }

    /// Waits for the vCPU thread to finish. Dropping the request channel first wakes a paused
    /// thread, which then ends.
    pub fn join(self) {
        drop(self.requests);
        if self.thread.join().is_err() {
            tracing::error!(vcpu = self.index, "vCPU thread panicked");
        }
    }
}

/// Starts `vcpu` on its own thread. It runs until `exit` is set (by itself, another vCPU, a
/// device, or the host) and then returns.
pub fn spawn(vcpu: Vcpu, buses: Buses, exit: Arc<ExitSignal>) -> Result<VcpuHandle, SpawnError> {
    install_kick_handler()?;
    let index = vcpu.index();
    let vcpu = Arc::new(Mutex::new(vcpu));
    let immediate_exit = Arc::new(ImmediateExit::new(vcpu.clone()));
    let thread_exit_flag = immediate_exit.clone();
    let (requests, inbox) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            let ctx = ThreadContext {
                index,
                immediate_exit: &thread_exit_flag,
                buses: &buses,
                exit: &exit,
                inbox: &inbox,
            };
            run_loop(&ctx, &vcpu)
        })
        .map_err(|source| SpawnError::Thread {
            vcpu: index,
            source,
        })?;
    Ok(VcpuHandle {
        index,
        thread,
        immediate_exit,
        requests,
    })
}

/// What a vCPU thread works with.
struct ThreadContext<'a> {
    index: u8,
    immediate_exit: &'a ImmediateExit,
    buses: &'a Buses,
    exit: &'a ExitSignal,
    inbox: &'a Receiver<VcpuRequest>,
}

fn run_loop(ctx: &ThreadContext<'_>, vcpu: &Mutex<Vcpu>) {
    let _span = tracing::debug_span!("vcpu", index = ctx.index).entered();
    let mut vcpu = match vcpu.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    while !ctx.exit.is_set() {
        match ctx.inbox.try_recv() {
            Ok(VcpuRequest::Pause(ack)) => {
                if park(ctx, &mut vcpu, ack) == Parked::Stop {
                    break;
                }
                continue;
            }
            Ok(VcpuRequest::Save(reply)) => {
                let _ = reply.send(Err(VcpuStateError::Invalid {
                    vcpu: ctx.index,
                    reason: "state requested while the vCPU runs".into(),
                }));
            }
            Ok(VcpuRequest::Resume) | Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => break,
        }
        if let RunOutcome::Exit(reason) =
            run_once(ctx.index, vcpu.fd_mut(), ctx.immediate_exit, ctx.buses)
        {
            ctx.exit.request(reason);
        }
    }
    tracing::debug!("vCPU stopped");
}

/// How a pause ended.
#[derive(Debug, PartialEq, Eq)]
enum Parked {
    Resume,
    Stop,
}

/// Pauses this vCPU: completes half-done I/O, acknowledges with `ack`, then serves requests
/// until [`VcpuRequest::Resume`] or the machine stops.
///
/// After an I/O or MMIO exit, KVM finishes the instruction (stores an `in` result into RAX,
/// advances RIP) only on the next `KVM_RUN`; state read before that would be mid-instruction.
/// So the pause first enters `KVM_RUN` with `immediate_exit` set, which completes pending I/O
/// and returns at once without running guest code (KVM's documented way to quiesce a vCPU
/// before saving it).
fn park(ctx: &ThreadContext<'_>, vcpu: &mut Vcpu, ack: SyncSender<()>) -> Parked {
    for _ in 0..16 {
        ctx.immediate_exit.set(1);
        match run_once(ctx.index, vcpu.fd_mut(), ctx.immediate_exit, ctx.buses) {
            RunOutcome::Interrupted => break,
            RunOutcome::Exit(reason) => {
                // The guest ended while pausing (its last I/O was the debug-exit port, say).
                ctx.exit.request(reason);
                return Parked::Stop;
            }
            // A string I/O instruction can need another round trip through userspace.
            RunOutcome::Continue => {}
        }
    }
    ctx.immediate_exit.set(0);
    if ctx.exit.is_set() {
        return Parked::Stop;
    }
    let _ = ack.send(());
    tracing::debug!("vCPU paused");
    loop {
        match ctx.inbox.recv() {
            Ok(VcpuRequest::Pause(ack)) => {
                let _ = ack.send(());
            }
            Ok(VcpuRequest::Save(reply)) => {
                let _ = reply.send(vcpu.save());
            }
            Ok(VcpuRequest::Resume) => {
                tracing::debug!("vCPU resumed");
                return Parked::Resume;
            }
            Err(_) => return Parked::Stop,
        }
    }
}

/// What one `KVM_RUN` led to.
enum RunOutcome {
    /// An exit that was handled; run again.
    Continue,
    /// `KVM_RUN` returned because of a kick (`EINTR`): nothing of the guest is half done.
    Interrupted,
    /// The machine must stop.
    Exit(ExitReason),
}

/// Describes a KVM_EXIT_INTERNAL_ERROR with its suberror (1: emulation failure, 2: simultaneous
/// exceptions, 3: delivery event, ...), the guest rip, and KVM's extra data words.
fn internal_error_details(fd: &mut VcpuFd) -> String {
    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel has filled the `internal` member of the
    // exit union, so reading it reads initialized plain data.
    let internal = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal };
    let words = (internal.ndata as usize).min(internal.data.len());
    let rip = fd.get_regs().map(|r| r.rip).unwrap_or_default();
    format!(
        "KVM_EXIT_INTERNAL_ERROR (suberror {}, rip {rip:#x}, data {:x?})",
        internal.suberror,
        &internal.data[..words]
    )
}

/// Runs the guest until its next exit and handles it.
fn run_once(
    index: u8,
    fd: &mut VcpuFd,
    immediate_exit: &ImmediateExit,
    buses: &Buses,
) -> RunOutcome {
    match handle_exit(index, fd, immediate_exit, buses) {
        Ok(true) => RunOutcome::Interrupted,
        Ok(false) => RunOutcome::Continue,
        Err(reason) => RunOutcome::Exit(reason),
    }
}

/// Runs `KVM_RUN` once and handles its exit: `Ok(true)` if it was interrupted by a kick,
/// `Ok(false)` for a handled exit, `Err` with the reason if the machine must stop.
fn handle_exit(
    index: u8,
    fd: &mut VcpuFd,
    immediate_exit: &ImmediateExit,
    buses: &Buses,
) -> Result<bool, ExitReason> {
    let failed = |message: String| {
        Err(ExitReason::VcpuFailed {
            vcpu: index,
            message,
        })
    };
    match fd.run() {
        Ok(VcpuExit::IoIn(port, data)) => {
            if !buses.pio.read(u64::from(port), data) {
                tracing::trace!(port, "read from unclaimed port");
                data.fill(0xff);
            }
            Ok(false)
        }
        Ok(VcpuExit::IoOut(port, data)) => {
            if !buses.pio.write(u64::from(port), data) {
                tracing::trace!(port, ?data, "write to unclaimed port");
            }
            Ok(false)
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            if !buses.mmio.read(addr, data) {
                tracing::trace!(addr, "read from unclaimed MMIO");
                data.fill(0xff);
            }
            Ok(false)
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            if !buses.mmio.write(addr, data) {
                tracing::trace!(addr, ?data, "write to unclaimed MMIO");
            }
            Ok(false)
        }
        Ok(VcpuExit::Shutdown) => Err(ExitReason::TripleFault { vcpu: index }),
        Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => {
                Err(ExitReason::SystemEvent { kind })
            }
            other => failed(format!("unexpected KVM system event {other}")),
        },
        Ok(VcpuExit::FailEntry(reason, cpu)) => failed(format!(
            "KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, host cpu {cpu})"
        )),
        Ok(VcpuExit::InternalError) => failed(internal_error_details(fd)),
        Ok(VcpuExit::Intr) => Ok(false),
        Ok(other) => failed(format!("unexpected exit {other:?}")),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            // A kick: clear the flag so the next KVM_RUN really runs; the caller checks why.
            immediate_exit.set(0);
            Ok(false)
        }
        Err(e) => failed(format!("KVM_RUN failed: {e}")),
    }
}

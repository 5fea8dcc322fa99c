//! vCPUs: one host thread each, running `KVM_RUN` and routing port I/O and MMIO exits to the
//! device buses.
//!
//! Stopping a vCPU that may be blocked inside `KVM_RUN` (a halted guest sits there forever) uses
//! the kernel's `immediate_exit` protocol: the host sets `kvm_run.immediate_exit` and then
//! signals the vCPU thread. If the thread is inside `KVM_RUN` the signal makes it return
//! `EINTR`; if it is about to enter, `immediate_exit` makes the next `KVM_RUN` return at once.
//! Either way the thread sees the request, so there is no window where a kick is lost.

pub mod setup;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::devices::bus::Bus;
use crate::exit::{ExitReason, ExitSignal};

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
    _owner: Arc<Mutex<VcpuFd>>,
}

// SAFETY: `flag` points into a mapping kept alive by `_owner`; it is only accessed through
// `AtomicU8`, which is safe to use from any thread, and the kernel only reads the byte.
unsafe impl Send for ImmediateExit {}
// SAFETY: as above; all accesses are atomic.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    fn new(fd: Arc<Mutex<VcpuFd>>) -> Self {
        let flag = {
            let mut guard = match fd.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            let run = guard.get_kvm_run();
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

/// A running vCPU, as seen from the VMM thread.
pub struct VcpuHandle {
    index: u8,
    thread: JoinHandle<()>,
    immediate_exit: Arc<ImmediateExit>,
}

impl VcpuHandle {
    /// Forces the vCPU out of `KVM_RUN` so it notices a pending stop.
    pub fn kick(&self) {
        self.immediate_exit.set(1);
        if let Err(e) = self.thread.kill(kick_signal()) {
            // The thread has already finished; nothing to interrupt.
            tracing::trace!(vcpu = self.index, error = %e, "kick after vCPU thread ended");
        }
    }

    /// Waits for the vCPU thread to finish.
    pub fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!(vcpu = self.index, "vCPU thread panicked");
        }
    }
}

/// Starts vCPU `index` on its own thread. It runs until `exit` is set (by itself, another vCPU,
/// a device, or the host) and then returns.
pub fn spawn(
    index: u8,
    fd: VcpuFd,
    buses: Buses,
    exit: Arc<ExitSignal>,
) -> Result<VcpuHandle, SpawnError> {
    install_kick_handler()?;
    let fd = Arc::new(Mutex::new(fd));
    let immediate_exit = Arc::new(ImmediateExit::new(fd.clone()));
    let thread_exit_flag = immediate_exit.clone();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || run_loop(index, &fd, &thread_exit_flag, &buses, &exit))
        .map_err(|source| SpawnError::Thread {
            vcpu: index,
            source,
        })?;
    Ok(VcpuHandle {
        index,
        thread,
        immediate_exit,
    })
}

fn run_loop(
    index: u8,
    fd: &Mutex<VcpuFd>,
    immediate_exit: &ImmediateExit,
    buses: &Buses,
    exit: &ExitSignal,
) {
    let _span = tracing::debug_span!("vcpu", index).entered();
    let mut fd = match fd.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    while !exit.is_set() {
        if let Some(reason) = run_once(index, &mut fd, immediate_exit, buses) {
            exit.request(reason);
        }
    }
    tracing::debug!("vCPU stopped");
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

/// Runs the guest until its next exit and handles it; returns a reason if the machine must stop.
fn run_once(
    index: u8,
    fd: &mut VcpuFd,
    immediate_exit: &ImmediateExit,
    buses: &Buses,
) -> Option<ExitReason> {
    let failed = |message: String| {
        Some(ExitReason::VcpuFailed {
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
            None
        }
        Ok(VcpuExit::IoOut(port, data)) => {
            if !buses.pio.write(u64::from(port), data) {
                tracing::trace!(port, ?data, "write to unclaimed port");
            }
            None
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            if !buses.mmio.read(addr, data) {
                tracing::trace!(addr, "read from unclaimed MMIO");
                data.fill(0xff);
            }
            None
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            if !buses.mmio.write(addr, data) {
                tracing::trace!(addr, ?data, "write to unclaimed MMIO");
            }
            None
        }
        Ok(VcpuExit::Shutdown) => Some(ExitReason::TripleFault { vcpu: index }),
        Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => {
                Some(ExitReason::SystemEvent { kind })
            }
            other => failed(format!("unexpected KVM system event {other}")),
        },
        Ok(VcpuExit::FailEntry(reason, cpu)) => failed(format!(
            "KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, host cpu {cpu})"
        )),
        Ok(VcpuExit::InternalError) => failed(internal_error_details(fd)),
        Ok(VcpuExit::Intr) => None,
        Ok(other) => failed(format!("unexpected exit {other:?}")),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            // A kick: clear the flag so the next KVM_RUN really runs; the caller checks why.
            immediate_exit.set(0);
            None
        }
        Err(e) => failed(format!("KVM_RUN failed: {e}")),
    }
}

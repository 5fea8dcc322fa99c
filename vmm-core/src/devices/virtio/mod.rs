//! What every virtio device shares: the [`VirtioDevice`] trait a device implements, the
//! [`DeviceContext`] through which it reaches its queues, guest memory and interrupt, and the
//! constants of the virtio 1.x specification that Thaw uses. The transport that exposes a device
//! to the guest is [`mmio::MmioTransport`].
//!
//! Threading: the guest's register accesses arrive on vCPU threads, and queue and backend work
//! runs on the VMM thread; both go through the one mutex around a transport, so a device is plain
//! single-threaded code. Queue notifications reach the VMM thread through one eventfd per queue
//! (a KVM ioeventfd, so a notify does not exit to userspace) and interrupts leave through an
//! eventfd registered as a KVM irqfd.

pub mod mmio;

use std::os::fd::RawFd;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

/// Feature bit: the device and driver follow virtio 1.x (not legacy 0.9.5). Thaw's transport
/// requires it.
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER;
    /// Feature negotiation is complete (the device may refuse by leaving it clear).
    pub const FEATURES_OK: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The driver is ready: the device may use its queues.
    pub const DRIVER_OK: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
    /// The device hit an error the driver must reset it to recover from.
    pub const DEVICE_NEEDS_RESET: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FAILED;
}

/// InterruptStatus bit: the device used buffers in one of its queues.
pub const INTERRUPT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the device's configuration changed.
pub const INTERRUPT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// A device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A queue the device needs was not set up by the driver, or lies outside guest memory.
    #[error("queue {queue} is not ready or not inside guest memory")]
    QueueNotUsable {
        /// The queue.
        queue: usize,
    },
}

/// A virtio device behind a transport: what it is, what it offers, and how it processes its
/// queues. Everything here runs with the transport's lock held.
pub trait VirtioDevice: Send {
    /// The virtio device id (19 for vsock).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers; the transport adds nothing, but refuses drivers that
    /// do not accept [`VIRTIO_F_VERSION_1`], so devices must offer it.
    fn device_features(&self) -> u64;
    /// The guest reads `data.len()` bytes of configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The guest writes configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: every queue is ready and valid. The device starts using them.
    fn activate(&mut self, ctx: &mut DeviceContext<'_>) -> Result<(), ActivateError>;
    /// The driver reset the device (or is about to set it up again): forget all guest state.
    fn reset(&mut self);
    /// The driver notified queue `queue`.
    fn process_queue(&mut self, queue: usize, ctx: &mut DeviceContext<'_>);
    /// A file descriptor the VMM thread should poll for the device's host-side work, if any.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// The backend fd is readable; `ctx` may be inactive (no driver yet).
    fn process_backend(&mut self, _ctx: &mut DeviceContext<'_>) {}
}

/// What a device may touch while it runs: guest memory, its queues, its notification eventfds
/// and its interrupt. Queues are only handed out once the driver activated the device.
pub struct DeviceContext<'a> {
    mem: &'a GuestMemory,
    queues: &'a mut [Queue],
    queue_events: &'a [EventFd],
    irq: &'a EventFd,
    interrupt_status: &'a mut u32,
    active: bool,
}

impl<'a> DeviceContext<'a> {
    /// A context over the given parts; `active` says whether the driver set DRIVER_OK.
    pub fn new(
        mem: &'a GuestMemory,
        queues: &'a mut [Queue],
        queue_events: &'a [EventFd],
        irq: &'a EventFd,
        interrupt_status: &'a mut u32,
        active: bool,
    ) -> Self {
        Self {
            mem,
            queues,
            queue_events,
            irq,
            interrupt_status,
            active,
        }
    }

    /// Whether the driver activated the device (its queues may be used).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Guest memory.
    pub fn memory(&self) -> &'a GuestMemory {
        self.mem
    }

    /// Queue `index` and guest memory, if the device is active and the queue exists.
    pub fn queue(&mut self, index: usize) -> Option<(&mut Queue, &'a GuestMemory)> {
        if !self.active {
            return None;
        }
        let mem = self.mem;
        self.queues.get_mut(index).map(|q| (q, mem))
    }

    /// Tells the guest that queue buffers were used: sets the VRING bit of InterruptStatus and
    /// raises the interrupt (one edge through the irqfd; see `mmio` for why edges are right).
    pub fn signal_used_queue(&mut self) {
        self.raise(INTERRUPT_VRING);
    }

    /// Tells the guest that the configuration space changed.
    pub fn signal_config_change(&mut self) {
        self.raise(INTERRUPT_CONFIG);
    }

    fn raise(&mut self, bit: u32) {
        *self.interrupt_status |= bit;
        if let Err(e) = self.irq.write(1) {
            tracing::warn!(error = %e, "cannot raise virtio interrupt");
        }
    }

    /// Asks the VMM thread to call [`VirtioDevice::process_queue`] for `index` again, after other
    /// pending events: how a device that stopped early (a work budget, backpressure) resumes
    /// without starving the rest of the VMM.
    pub fn requeue(&self, index: usize) {
        if let Some(evt) = self.queue_events.get(index) {
            if let Err(e) = evt.write(1) {
                tracing::warn!(queue = index, error = %e, "cannot requeue virtio queue work");
            }
        }
    }
}

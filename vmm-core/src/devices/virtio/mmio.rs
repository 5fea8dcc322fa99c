//! The virtio-mmio transport, virtio 1.x only (register layout version 2), generic over a
//! [`VirtioDevice`]. It owns the registers, the feature negotiation, the queues and the
//! interrupt, and hands the device a [`DeviceContext`] once the driver is ready.
//!
//! ```text
//! 0x000 MagicValue "virt"  0x004 Version (2)     0x008 DeviceID      0x00c VendorID
//! 0x010 DeviceFeatures     0x014 DeviceFeaturesSel
//! 0x020 DriverFeatures     0x024 DriverFeaturesSel
//! 0x030 QueueSel           0x034 QueueNumMax     0x038 QueueNum      0x044 QueueReady
//! 0x050 QueueNotify        0x060 InterruptStatus 0x064 InterruptACK  0x070 Status
//! 0x080 QueueDesc lo/hi    0x090 QueueDriver (avail) lo/hi   0x0a0 QueueDevice (used) lo/hi
//! 0x0ac SHMSel (no shared memory: lengths read as ~0)        0x0fc ConfigGeneration
//! 0x100 device configuration space
//! ```
//!
//! **Modern only.** A driver must accept `VIRTIO_F_VERSION_1`; if it does not (a legacy
//! driver), FEATURES_OK stays clear when it tries to set it, which is how virtio tells a driver
//! its features were refused, and DRIVER_OK without FEATURES_OK sets DEVICE_NEEDS_RESET instead
//! of starting the device. Legacy-only registers (GuestPageSize, QueueAlign, QueuePFN) are
//! ignored with a log.
//!
//! **Interrupts are edges, status is a level.** The device raises its interrupt by writing its
//! irqfd, which KVM turns into a pulse (assert then deassert) on the GSI: an edge, as the DSDT
//! and the ISA defaults say (edge, active high). The level the driver cares about is
//! InterruptStatus: bits stay set until the driver writes them to InterruptACK. Linux's
//! `vm_interrupt` reads InterruptStatus, acknowledges it and only then walks the used rings, so
//! a buffer used after its read raises a new edge and nothing is lost. A true level line would
//! need KVM's resample irqfd (`KVM_IRQFD_FLAG_RESAMPLE`), an IOAPIC pin programmed
//! level-triggered, and a VMM round trip on every EOI, for no gain with this driver; Firecracker
//! makes the same choice. A spurious edge (status already acknowledged) is harmless: the handler
//! finds nothing and returns.

use std::os::fd::{AsRawFd, RawFd};

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, DeviceContext, VIRTIO_F_VERSION_1, VirtioDevice, status};
use crate::devices::bus::BusDevice;
use crate::memory::GuestMemory;

/// "virt" in little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The register layout of virtio 1.x (version 1 is the legacy layout).
pub const MMIO_VERSION: u32 = 2;
/// VendorID: "THAW" in little-endian. Drivers do not interpret it.
pub const MMIO_VENDOR_ID: u32 = u32::from_le_bytes(*b"THAW");
/// Where the device's configuration space starts.
pub const MMIO_CONFIG_START: u64 = 0x100;

/// Register offsets (virtio 1.2, 4.2.2).
#[allow(missing_docs)]
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const LEGACY_GUEST_PAGE_SIZE: u64 = 0x028;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const LEGACY_QUEUE_ALIGN: u64 = 0x03c;
    pub const LEGACY_QUEUE_PFN: u64 = 0x040;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// The transport's registers as plain data: with [`Queue::state`] for each queue, everything a
/// snapshot needs to recreate the transport as the guest left it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioRegisters {
    /// Device status (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK, ...).
    pub status: u32,
    /// Which 32-bit word DeviceFeatures shows.
    pub device_features_sel: u32,
    /// Which 32-bit word a DriverFeatures write sets.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// The queue the Queue* registers address.
    pub queue_sel: u32,
    /// InterruptStatus: VRING and CONFIG bits not yet acknowledged.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Whether the device was activated (DRIVER_OK accepted).
    pub activated: bool,
}

/// The transport's whole state as plain data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmioState {
    /// The registers.
    pub registers: MmioRegisters,
    /// Each queue's configuration and ring positions.
    pub queues: Vec<QueueState>,
}

/// The transport could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// An eventfd could not be created.
    #[error("cannot create a virtio-mmio eventfd")]
    EventFd(#[source] std::io::Error),
    /// The device asked for a queue size virtio does not allow (a power of two up to 32768).
    #[error("virtio queue {queue} cannot have maximum size {size}")]
    QueueSize {
        /// The queue.
        queue: usize,
        /// The size.
        size: u16,
    },
}

/// What the VMM thread's event loop needs from a virtio-mmio device, independent of the device
/// type.
pub trait VirtioMmioEvents: Send {
    /// The notification eventfd of each queue, by queue index.
    fn queue_event_fds(&self) -> Vec<RawFd>;
    /// The device's backend fd, if it has host-side work to poll.
    fn backend_fd(&self) -> Option<RawFd>;
    /// Queue `queue`'s eventfd is readable.
    fn process_queue_event(&mut self, queue: usize);
    /// The backend fd is readable.
    fn process_backend_event(&mut self);
}

/// A virtio device on the virtio-mmio transport.
pub struct MmioTransport<D> {
    device: D,
    mem: GuestMemory,
    regs: MmioRegisters,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    irq: EventFd,
}

fn new_eventfd() -> Result<EventFd, MmioError> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(MmioError::EventFd)
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device` over guest memory `mem`, with fresh queue and interrupt eventfds.
    pub fn new(device: D, mem: GuestMemory) -> Result<Self, MmioError> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for (queue, &size) in device.queue_max_sizes().iter().enumerate() {
            queues.push(Queue::new(size).map_err(|_| MmioError::QueueSize { queue, size })?);
            queue_events.push(new_eventfd()?);
        }
        Ok(Self {
            device,
            mem,
            regs: MmioRegisters::default(),
            queues,
            queue_events,
            irq: new_eventfd()?,
        })
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The eventfd KVM must signal for a QueueNotify of queue `index` (ioeventfd, datamatch =
    /// `index`).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The eventfd to register as the device's irqfd.
    pub fn irq_event(&self) -> &EventFd {
        &self.irq
    }

    /// The registers and queues as plain data.
    pub fn state(&self) -> MmioState {
        MmioState {
            registers: self.regs,
            queues: self.queues.iter().map(Queue::state).collect(),
        }
    }

    /// Runs `f` on the device with a context over its queues and interrupt.
    pub fn with_context<R>(&mut self, f: impl FnOnce(&mut D, &mut DeviceContext<'_>) -> R) -> R {
        let mut ctx = DeviceContext::new(
            &self.mem,
            &mut self.queues,
            &self.queue_events,
            &self.irq,
            &mut self.regs.interrupt_status,
            self.regs.activated,
        );
        f(&mut self.device, &mut ctx)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.regs.queue_sel as usize)
    }

    /// Queue registers may change only while features are negotiated and the driver is not yet
    /// running, and only for a queue that is not ready (virtio 1.2, 4.2.3.2).
    fn queue_config_allowed(&self) -> bool {
        let s = self.regs.status;
        let open = s & status::FEATURES_OK != 0 && s & status::DRIVER_OK == 0;
        let queue_ready = self
            .queues
            .get(self.regs.queue_sel as usize)
            .is_some_and(|q| q.ready());
        open && !queue_ready
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        for evt in &self.queue_events {
            // Drop notifications that arrived for the old queues.
            let _ = evt.read();
        }
        let generation = self.regs.config_generation;
        self.regs = MmioRegisters {
            config_generation: generation,
            ..MmioRegisters::default()
        };
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            tracing::debug!("virtio-mmio: driver reset the device");
            self.reset();
            return;
        }
        let old = self.regs.status;
        let removed = old & !value;
        if removed != 0 {
            tracing::warn!(
                old,
                value,
                "virtio-mmio: driver cleared status bits without a reset"
            );
            return;
        }
        let added = value & !old;
        let mut new = old | (added & (status::ACKNOWLEDGE | status::DRIVER | status::FAILED));
        if added & status::FEATURES_OK != 0 && self.features_acceptable(new) {
            new |= status::FEATURES_OK;
        }
        if added & status::DRIVER_OK != 0 {
            if new & status::FEATURES_OK == 0 {
                tracing::warn!(
                    "virtio-mmio: DRIVER_OK without FEATURES_OK (a legacy driver?); this device is \
                     virtio 1.x only and needs a reset"
                );
                new |= status::DEVICE_NEEDS_RESET;
            } else {
                self.regs.status = new | status::DRIVER_OK;
                if let Err(e) = self.activate() {
                    tracing::warn!(error = %e, "virtio-mmio: device cannot start");
                    self.regs.status |= status::DEVICE_NEEDS_RESET;
                }
                return;
            }
        }
        self.regs.status = new;
    }

    fn features_acceptable(&self, status: u32) -> bool {
        let driver = self.regs.driver_features;
        let offered = self.device.device_features();
        if status & status::DRIVER == 0 {
            tracing::warn!("virtio-mmio: FEATURES_OK before DRIVER; refused");
            false
        } else if driver & (1 << VIRTIO_F_VERSION_1) == 0 {
            tracing::warn!(
                driver_features = format_args!("{driver:#x}"),
                "virtio-mmio: driver did not accept VIRTIO_F_VERSION_1 (a legacy driver); this \
                 device is virtio 1.x only, FEATURES_OK refused"
            );
            false
        } else if driver & !offered != 0 {
            tracing::warn!(
                driver_features = format_args!("{driver:#x}"),
                offered = format_args!("{offered:#x}"),
                "virtio-mmio: driver accepted features the device does not offer; refused"
            );
            false
        } else {
            true
        }
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        for (queue, q) in self.queues.iter().enumerate() {
            if !q.is_valid(&self.mem) {
                return Err(ActivateError::QueueNotUsable { queue });
            }
        }
        self.regs.activated = true;
        let result = self.with_context(|device, ctx| device.activate(ctx));
        if result.is_err() {
            self.regs.activated = false;
        }
        result
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.regs.queue_sel as usize);
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => MMIO_VENDOR_ID,
            reg::DEVICE_FEATURES => match self.regs.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_NUM => queue.map_or(0, |q| u32::from(q.size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::QUEUE_DESC_LOW => queue.map_or(0, |q| q.desc_table() as u32),
            reg::QUEUE_DESC_HIGH => queue.map_or(0, |q| (q.desc_table() >> 32) as u32),
            reg::QUEUE_AVAIL_LOW => queue.map_or(0, |q| q.avail_ring() as u32),
            reg::QUEUE_AVAIL_HIGH => queue.map_or(0, |q| (q.avail_ring() >> 32) as u32),
            reg::QUEUE_USED_LOW => queue.map_or(0, |q| q.used_ring() as u32),
            reg::QUEUE_USED_HIGH => queue.map_or(0, |q| (q.used_ring() >> 32) as u32),
            reg::INTERRUPT_STATUS => self.regs.interrupt_status,
            reg::STATUS => self.regs.status,
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.regs.config_generation,
            _ => {
                tracing::debug!(
                    offset,
                    "virtio-mmio: read of a write-only or unknown register"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.regs.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.regs.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.regs.queue_sel = value,
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH => self.write_queue_register(offset, value),
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.regs.interrupt_status &= !value,
            reg::STATUS => self.write_status(value),
            reg::LEGACY_GUEST_PAGE_SIZE | reg::LEGACY_QUEUE_ALIGN | reg::LEGACY_QUEUE_PFN => {
                tracing::warn!(
                    offset,
                    "virtio-mmio: legacy register written; this device is virtio 1.x only"
                );
            }
            reg::SHM_SEL => {}
            _ => tracing::debug!(
                offset,
                value,
                "virtio-mmio: write to a read-only or unknown register"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let s = self.regs.status;
        if s & status::DRIVER == 0 || s & status::FEATURES_OK != 0 {
            tracing::warn!("virtio-mmio: DriverFeatures written outside feature negotiation");
            return;
        }
        let word = u64::from(value);
        match self.regs.driver_features_sel {
            0 => self.regs.driver_features = (self.regs.driver_features & !0xffff_ffff) | word,
            1 => {
                self.regs.driver_features = (self.regs.driver_features & 0xffff_ffff) | (word << 32)
            }
            // Feature words past 64 bits: nothing is offered there, so only zero is valid.
            _ if value == 0 => {}
            sel => {
                tracing::warn!(
                    sel,
                    value,
                    "virtio-mmio: driver accepted unoffered feature bits"
                );
                // Remembered as an unoffered bit so that FEATURES_OK is refused.
                self.regs.driver_features |= 1 << 63;
            }
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if !self.queue_config_allowed() {
            tracing::warn!(
                offset,
                queue = self.regs.queue_sel,
                status = self.regs.status,
                "virtio-mmio: queue register written while it may not change; ignored"
            );
            return;
        }
        let sel = self.regs.queue_sel;
        let Some(q) = self.selected_queue() else {
            tracing::warn!(
                queue = sel,
                "virtio-mmio: queue register of a queue that does not exist"
            );
            return;
        };
        let set_low = |old: u64| GuestAddress((old & !0xffff_ffff) | u64::from(value));
        let set_high = |old: u64| GuestAddress((old & 0xffff_ffff) | (u64::from(value) << 32));
        let result = match offset {
            reg::QUEUE_NUM => u16::try_from(value)
                .map_err(|_| virtio_queue::Error::InvalidSize)
                .and_then(|size| q.try_set_size(size)),
            reg::QUEUE_READY => {
                q.set_ready(value == 1);
                Ok(())
            }
            reg::QUEUE_DESC_LOW => q.try_set_desc_table_address(set_low(q.desc_table())),
            reg::QUEUE_DESC_HIGH => q.try_set_desc_table_address(set_high(q.desc_table())),
            reg::QUEUE_AVAIL_LOW => q.try_set_avail_ring_address(set_low(q.avail_ring())),
            reg::QUEUE_AVAIL_HIGH => q.try_set_avail_ring_address(set_high(q.avail_ring())),
            reg::QUEUE_USED_LOW => q.try_set_used_ring_address(set_low(q.used_ring())),
            reg::QUEUE_USED_HIGH => q.try_set_used_ring_address(set_high(q.used_ring())),
            _ => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(offset, value, queue = sel, error = %e, "virtio-mmio: bad queue setting ignored");
        }
    }

    /// A QueueNotify that reached userspace (no ioeventfd registered, or a write of another
    /// width): handled like the ioeventfd, on the VMM thread.
    fn notify(&mut self, queue: u32) {
        match self.queue_events.get(queue as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    tracing::warn!(queue, error = %e, "virtio-mmio: cannot signal queue notify");
                }
            }
            None => tracing::debug!(queue, "virtio-mmio: notify of a queue that does not exist"),
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= MMIO_CONFIG_START {
            self.device.read_config(offset - MMIO_CONFIG_START, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: register read not 32-bit aligned"
            );
            data.fill(0xff);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= MMIO_CONFIG_START {
            self.device.write_config(offset - MMIO_CONFIG_START, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: register write not 32 bits wide"
            );
            return;
        };
        if offset % 4 != 0 {
            tracing::debug!(offset, "virtio-mmio: unaligned register write");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

impl<D: VirtioDevice> VirtioMmioEvents for MmioTransport<D> {
    fn queue_event_fds(&self) -> Vec<RawFd> {
        self.queue_events.iter().map(AsRawFd::as_raw_fd).collect()
    }

    fn backend_fd(&self) -> Option<RawFd> {
        self.device.backend_fd()
    }

    fn process_queue_event(&mut self, queue: usize) {
        let Some(evt) = self.queue_events.get(queue) else {
            return;
        };
        // Consume the notification; a failure means there was none (spurious wakeup).
        let _ = evt.read();
        if !self.regs.activated {
            // The device scans every queue when it starts, so nothing is lost.
            return;
        }
        self.with_context(|device, ctx| device.process_queue(queue, ctx));
    }

    fn process_backend_event(&mut self) {
        self.with_context(|device, ctx| device.process_backend(ctx));
    }
}

#[path = "mmio_persist.rs"]
mod persist;
pub use persist::{MmioArgs, MmioStateError, QueueSnapshot, VirtioMmioState};

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;

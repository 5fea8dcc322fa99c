//! Wiring devices into a VM: the legacy port-I/O devices (COM1, i8042, debug exit) and the
//! virtio-mmio devices, each at its MMIO window with its irqfd and queue ioeventfds. Used both
//! when a machine is created and when one is restored (then from saved state, at the saved
//! places).

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::{BlockHandle, MachineError, VsockHandle, vm_step};
use crate::boot::acpi::VirtioMmioDevice;
use crate::devices::bus::Bus;
use crate::devices::legacy::{DEBUG_EXIT_PORT, DebugExit, I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{COM1_BASE, COM1_IRQ, COM1_LEN, SerialConsole};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::mmio::{MmioTransport, reg};
use crate::exit::ExitSignal;
use crate::layout::{VIRTIO_IRQ_FIRST, VIRTIO_IRQ_LAST, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::machine::VirtioHandle;
use crate::vcpu::Buses;

/// Virtio-mmio devices being placed: their bus, their descriptions for ACPI and the command line.
pub(super) struct VirtioDevices {
    pub mmio: Bus,
    pub described: Vec<VirtioMmioDevice>,
    pub handles: Vec<VirtioHandle>,
}

impl VirtioDevices {
    pub fn new() -> Self {
        Self {
            mmio: Bus::new(),
            described: Vec::new(),
            handles: Vec::new(),
        }
    }

    /// Where the next device goes: device *n* at `VIRTIO_MMIO_START + n × 4 KiB`, IRQ `5 + n`.
    pub fn next_placement(&self) -> Result<VirtioMmioDevice, MachineError> {
        let index = self.described.len() as u32;
        let irq = VIRTIO_IRQ_FIRST + index;
        if irq > VIRTIO_IRQ_LAST {
            return Err(MachineError::TooManyVirtioDevices);
        }
        Ok(VirtioMmioDevice {
            base: VIRTIO_MMIO_START + u64::from(index) * VIRTIO_MMIO_SIZE,
            size: VIRTIO_MMIO_SIZE,
            irq,
        })
    }

    /// Puts `transport` at the next MMIO window and IRQ: wires its irqfd and one ioeventfd per
    /// queue (QueueNotify with datamatch = queue index, so a notify does not leave KVM).
    pub fn add<D: VirtioDevice + 'static>(
        &mut self,
        vm: &VmFd,
        transport: MmioTransport<D>,
    ) -> Result<Arc<Mutex<MmioTransport<D>>>, MachineError> {
        let place = self.next_placement()?;
        vm.register_irqfd(transport.irq_event(), place.irq)
            .map_err(vm_step("KVM_IRQFD (virtio)"))?;
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(place.base + reg::QUEUE_NOTIFY),
                queue as u32,
            )
            .map_err(vm_step("KVM_IOEVENTFD (virtio)"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(place.base, place.size, transport.clone())
            .map_err(|e| MachineError::Device {
                device: "virtio-mmio bus",
                source: std::io::Error::other(e),
            })?;
        self.described.push(place);
        self.handles.push(transport.clone());
        Ok(transport)
    }

    /// The command line with a `virtio_mmio.device=<size>@<base>:<irq>` word per device, for
    /// kernels that take devices from there (Debian's does not; it reads the DSDT).
    pub fn cmdline(&self, cmdline: &str) -> String {
        let mut out = cmdline.to_string();
        for d in &self.described {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&format!(
                "virtio_mmio.device={}K@{:#x}:{}",
                d.size >> 10,
                d.base,
                d.irq
            ));
        }
        out
    }
}

/// The vsock device and where it sits.
#[derive(Clone)]
pub(super) struct PlacedVsock {
    pub handle: VsockHandle,
    pub place: VirtioMmioDevice,
}

/// A block device and where it sits.
#[derive(Clone)]
pub(super) struct PlacedBlock {
    pub handle: BlockHandle,
    pub place: VirtioMmioDevice,
}

/// The legacy devices, as the machine keeps them.
pub(super) struct LegacyDevices {
    pub buses: Buses,
    pub serial: Arc<Mutex<SerialConsole>>,
    pub i8042: Arc<Mutex<I8042>>,
}

/// COM1's interrupt eventfd, registered as the irqfd of its GSI.
pub(super) fn serial_irq(vm: &VmFd) -> Result<EventFd, MachineError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
        MachineError::Device {
            device: "serial interrupt",
            source,
        }
    })?;
    vm.register_irqfd(&irq, COM1_IRQ)
        .map_err(vm_step("KVM_IRQFD (COM1)"))?;
    Ok(irq)
}

/// Puts COM1, the i8042 and the debug-exit port on a port-I/O bus.
pub(super) fn legacy_devices(
    serial: SerialConsole,
    i8042: I8042,
    exit: &Arc<ExitSignal>,
) -> Result<LegacyDevices, MachineError> {
    let serial = Arc::new(Mutex::new(serial));
    let i8042 = Arc::new(Mutex::new(i8042));
    let mut pio = Bus::new();
    let conflict = |e: crate::devices::bus::BusConflict| MachineError::Device {
        device: "port I/O bus",
        source: std::io::Error::other(e),
    };
    pio.insert(COM1_BASE, COM1_LEN, serial.clone())
        .map_err(conflict)?;
    pio.insert(I8042_BASE, I8042_LEN, i8042.clone())
        .map_err(conflict)?;
    pio.insert(
        DEBUG_EXIT_PORT,
        1,
        Arc::new(Mutex::new(DebugExit(exit.clone()))),
    )
    .map_err(conflict)?;
    Ok(LegacyDevices {
        buses: Buses {
            pio,
            mmio: Bus::new(),
        },
        serial,
        i8042,
    })
}

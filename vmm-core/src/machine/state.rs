//! The whole machine's saved state, guest memory aside: every vCPU, the VM's in-kernel devices,
//! the emulated devices, and what restore needs to rebuild the machine without the guest
//! loader (memory size, vCPU count, where each virtio device sits, the boot record).
//!
//! A state comes back from a file: the snapshot layer authenticates it, and
//! [`MachineState::validate`] still checks everything restore relies on before anything reaches
//! KVM.

use serde::{Deserialize, Serialize};

use crate::boot::acpi::VirtioMmioDevice;
use crate::boot::{BootInfo, KernelFormat};
use crate::config::MAX_DISKS;
use crate::devices::block::persist::BlockState;
use crate::devices::legacy::I8042State;
use crate::devices::serial::SerialConsoleState;
use crate::devices::virtio::mmio::VirtioMmioState;
use crate::devices::vsock::persist::VsockState;
use crate::layout::{VIRTIO_IRQ_FIRST, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::vcpu::state::{VcpuState, VcpuStateError};
use crate::vm_state::VmState;

/// The version of [`MachineState`]'s layout; a state of another version is refused.
pub const MACHINE_STATE_VERSION: u32 = 2;
/// Most vCPUs a state may describe (the vCPU index is a `u8`).
pub const MAX_VCPUS: usize = 255;
/// Serial receive FIFO size of the 16550A.
const SERIAL_FIFO_MAX: usize = 64;

/// Where the guest was loaded (a serde copy of [`BootInfo`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootState {
    /// Entry point.
    pub entry: u64,
    /// Image format.
    pub format: KernelFormat,
    /// Initrd address and size.
    pub initrd: Option<(u64, u64)>,
}

impl From<BootInfo> for BootState {
    fn from(b: BootInfo) -> Self {
        Self {
            entry: b.entry.0,
            format: b.format,
            initrd: b.initrd.map(|(a, n)| (a.0, n)),
        }
    }
}

impl From<BootState> for BootInfo {
    fn from(b: BootState) -> Self {
        Self {
            entry: vm_memory::GuestAddress(b.entry),
            format: b.format,
            initrd: b.initrd.map(|(a, n)| (vm_memory::GuestAddress(a), n)),
        }
    }
}

/// A virtio-mmio device's place: its register window and IRQ, which the guest learned at boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPlacement {
    /// Guest-physical base of its registers.
    pub base: u64,
    /// Its GSI.
    pub irq: u32,
}

impl From<VirtioMmioDevice> for VirtioPlacement {
    fn from(d: VirtioMmioDevice) -> Self {
        Self {
            base: d.base,
            irq: d.irq,
        }
    }
}

/// The vsock device's state and place.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockDeviceState {
    /// Where it sits.
    pub placement: VirtioPlacement,
    /// Transport and device state.
    pub state: VirtioMmioState<VsockState>,
}

/// A block device's state and place.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDeviceState {
    /// Where it sits.
    pub placement: VirtioPlacement,
    /// Transport and device state.
    pub state: VirtioMmioState<BlockState>,
}

/// Every emulated device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialConsoleState,
    /// The i8042.
    pub i8042: I8042State,
    /// The vsock device, if the machine has one (virtio device 0).
    pub vsock: Option<VsockDeviceState>,
    /// The block devices, in the guest's order, after the vsock device (if any).
    pub blocks: Vec<BlockDeviceState>,
}

/// A machine's state, guest memory aside.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// [`MACHINE_STATE_VERSION`].
    pub version: u32,
    /// Guest RAM in bytes (the memory given to restore must have this size).
    pub mem_bytes: u64,
    /// Where the guest was loaded.
    pub boot: BootState,
    /// How many vCPUs the guest was told of (MP table, ACPI); `vcpus` has one state for each.
    pub vcpu_count: u8,
    /// Each vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// The VM's in-kernel devices.
    pub vm: VmState,
    /// Emulated devices.
    pub devices: DevicesState,
}

/// A saved state that restore cannot use.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Another layout version.
    #[error(
        "machine state version {found} is not supported (this build reads {MACHINE_STATE_VERSION})"
    )]
    Version {
        /// In the state.
        found: u32,
    },
    /// The memory handed to restore has another size than the saved machine.
    #[error("the machine had {state} bytes of memory, the memory given has {given}")]
    MemorySize {
        /// In the state.
        state: u64,
        /// Given to restore.
        given: u64,
    },
    /// The memory handed to restore is not laid out as a machine of this size.
    #[error("the memory given is not laid out as guest RAM of {mem_bytes} bytes")]
    MemoryLayout {
        /// In the state.
        mem_bytes: u64,
    },
    /// No vCPU, or more than a machine can have.
    #[error("the state has {count} vCPUs (1 to {MAX_VCPUS} allowed)")]
    VcpuCount {
        /// How many.
        count: usize,
    },
    /// The state carries another number of vCPU states than the machine had vCPUs.
    #[error("the machine had {expected} vCPUs but the state carries {found}")]
    VcpuMismatch {
        /// Expected.
        expected: usize,
        /// In the state.
        found: usize,
    },
    /// A vCPU's state is invalid.
    #[error(transparent)]
    Vcpu(#[from] VcpuStateError),
    /// The serial FIFO holds more than the UART can.
    #[error("serial receive FIFO holds {len} bytes (at most {SERIAL_FIFO_MAX})")]
    SerialFifo {
        /// Its length.
        len: usize,
    },
    /// A virtio device is not where this build puts it.
    /// More block devices than a machine can have.
    #[error("{count} block devices: a machine has at most {MAX_DISKS}")]
    TooManyDisks {
        /// In the state.
        count: usize,
    },
    #[error("virtio device {device} saved at {saved:?}; it must be at {expected:?}")]
    VirtioPlacement {
        /// Which.
        device: &'static str,
        /// In the state.
        saved: VirtioPlacement,
        /// Where it belongs.
        expected: VirtioPlacement,
    },
}

/// Where virtio device `n` sits.
pub fn virtio_placement(n: u32) -> VirtioPlacement {
    VirtioPlacement {
        base: VIRTIO_MMIO_START + u64::from(n) * VIRTIO_MMIO_SIZE,
        irq: VIRTIO_IRQ_FIRST + n,
    }
}

impl MachineState {
    /// Checks everything restore relies on, against the memory (`ram`: its regions as
    /// `(start, size)`) it will be restored into.
    pub fn validate(&self, ram: &[(u64, u64)]) -> Result<(), StateError> {
        if self.version != MACHINE_STATE_VERSION {
            return Err(StateError::Version {
                found: self.version,
            });
        }
        let given: u64 = ram.iter().map(|r| r.1).sum();
        if given != self.mem_bytes {
            return Err(StateError::MemorySize {
                state: self.mem_bytes,
                given,
            });
        }
        let expected: Vec<(u64, u64)> = crate::memory::ram_ranges(self.mem_bytes)
            .into_iter()
            .map(|(a, n)| (a.0, n))
            .collect();
        if ram != expected.as_slice() {
            return Err(StateError::MemoryLayout {
                mem_bytes: self.mem_bytes,
            });
        }
        let count = self.vcpus.len();
        if count == 0 || count > MAX_VCPUS {
            return Err(StateError::VcpuCount { count });
        }
        if count != usize::from(self.vcpu_count) {
            return Err(StateError::VcpuMismatch {
                expected: usize::from(self.vcpu_count),
                found: count,
            });
        }
        for (index, vcpu) in self.vcpus.iter().enumerate() {
            vcpu.validate(index as u8)?;
        }
        let fifo = self.devices.serial.rx_fifo.len();
        if fifo > SERIAL_FIFO_MAX {
            return Err(StateError::SerialFifo { len: fifo });
        }
        if let Some(vsock) = &self.devices.vsock {
            let expected = virtio_placement(0);
            if vsock.placement != expected {
                return Err(StateError::VirtioPlacement {
                    device: "vsock",
                    saved: vsock.placement,
                    expected,
                });
            }
        }
        if self.devices.blocks.len() > MAX_DISKS {
            return Err(StateError::TooManyDisks {
                count: self.devices.blocks.len(),
            });
        }
        let first = u32::from(self.devices.vsock.is_some());
        for (block, n) in self.devices.blocks.iter().zip(first..) {
            let expected = virtio_placement(n);
            if block.placement != expected {
                return Err(StateError::VirtioPlacement {
                    device: "block",
                    saved: block.placement,
                    expected,
                });
            }
        }
        Ok(())
    }
}

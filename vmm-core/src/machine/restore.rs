//! Rebuilding a machine from a [`MachineState`] in a [`MachineShell`] whose memory the caller
//! filled (or a page server fills lazily).
//!
//! Order, and why:
//!
//! 1. Check the state against the memory before touching KVM (a state file is untrusted).
//! 2. The shell (possibly built long before): the VM as [`Machine::create`] makes it
//!    (`KVM_CREATE_VM`, TSS, irqchip, PIT), the guest memory slots (filled through
//!    [`MachineShell::ram_mut`], or by a page server) and the vCPUs, created but not written.
//! 3. Devices from their saved state, at their saved places, each with fresh irqfd and
//!    ioeventfds; no guest loader runs.
//! 4. Each vCPU's state, written in `vcpu::state`'s order.
//! 5. The VM's in-kernel devices (PIT, kvmclock, PIC, IOAPIC) after the vCPUs, so interrupts the
//!    IOAPIC re-injects reach restored LAPICs (see `vm_state`).
//! 6. The vsock transport reset, last: it writes an event into guest memory and raises the
//!    device's interrupt, which must land in the restored irqchip rather than be overwritten by
//!    it.
//!
//! The returned machine runs nothing until [`Machine::run`].

use std::path::PathBuf;

use super::devices::{self, PlacedBlock, PlacedVsock, VirtioDevices};
use super::shell::{MachineShell, ShellSpec};
use super::state::{MachineState, StateError};
use super::{Machine, MachineError, lock, new_exit_signal};
use crate::devices::block::{BlockDevice, Disk};
use crate::devices::legacy::I8042;
use crate::devices::serial::{ConsoleOutput, SerialArgs, SerialConsole, SerialStateError};
use crate::devices::virtio::mmio::{MmioArgs, MmioStateError, MmioTransport};
use crate::devices::vsock::VsockDevice;
use crate::memory::GuestMemory;
use crate::persist::Persist;
use crate::vcpu::state::{Vcpu, VcpuArgs, VcpuStateError};
use crate::vm_state::{InKernelDevices, VmStateError};

/// What a restored machine gets that is not part of its state: host resources.
#[derive(Default)]
pub struct RestoreConfig {
    /// The Unix socket for the vsock device's host side, if the saved machine has one (it
    /// cannot reuse the original's path while that machine lives).
    pub vsock_uds_path: Option<PathBuf>,
    /// One disk per saved block device, in their order, each as large as the saved one: the
    /// disk as it was when the machine was saved (a code image, or this clone's copy-on-write
    /// view of a captured disk).
    pub disks: Vec<Box<dyn Disk>>,
}

impl std::fmt::Debug for RestoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreConfig")
            .field("vsock_uds_path", &self.vsock_uds_path)
            .field("disks", &self.disks.len())
            .finish()
    }
}

/// A machine could not be restored; the variant names the step.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The state does not fit the memory given, or is invalid.
    #[error("invalid machine state")]
    Invalid(#[from] StateError),
    /// The state has a vsock device but no socket path was given.
    #[error("the saved machine has a vsock device: RestoreConfig::vsock_uds_path is required")]
    VsockPathMissing,
    /// A vCPU's state could not be written.
    #[error("restoring a vCPU failed")]
    Vcpu(#[from] VcpuStateError),
    /// The VM's in-kernel devices could not be written.
    #[error("restoring the VM's irqchip, PIT or clock failed")]
    Vm(#[from] VmStateError),
    /// COM1 could not be restored.
    #[error("restoring the serial console failed")]
    Serial(#[source] SerialStateError),
    /// The vsock device could not be restored.
    #[error("restoring the vsock device failed")]
    Vsock(#[source] MmioStateError),
    /// The state has another number of block devices than disks were given.
    #[error("the saved machine has {saved} block devices, {given} disks were given")]
    DiskCount {
        /// In the state.
        saved: usize,
        /// In the config.
        given: usize,
    },
    /// A block device could not be restored.
    #[error("restoring block device {index} failed")]
    Block {
        /// Its index.
        index: usize,
        /// Why.
        #[source]
        source: MmioStateError,
    },
    /// The shell was built for another machine.
    #[error(
        "the machine shell was built for {} vCPUs and {} bytes of RAM, but the state has \
         {state_vcpus} vCPUs and {state_mem_bytes} bytes",
        shell.vcpus, shell.mem_bytes
    )]
    ShellMismatch {
        /// What the shell was built for.
        shell: ShellSpec,
        /// The state's vCPU count.
        state_vcpus: usize,
        /// The state's memory size.
        state_mem_bytes: u64,
    },
}

/// Checks what can be checked before KVM is touched: the state is valid and describes this
/// memory, and the host resources it needs were given.
fn check_fits(
    config: &RestoreConfig,
    state: &MachineState,
    memory: &GuestMemory,
) -> Result<(), RestoreError> {
    state.validate(&ram_regions(memory))?;
    if state.devices.vsock.is_some() && config.vsock_uds_path.is_none() {
        return Err(RestoreError::VsockPathMissing);
    }
    if state.devices.blocks.len() != config.disks.len() {
        return Err(RestoreError::DiskCount {
            saved: state.devices.blocks.len(),
            given: config.disks.len(),
        });
    }
    Ok(())
}

/// The guest-physical `(start, size)` of each memory region.
fn ram_regions(memory: &GuestMemory) -> Vec<(u64, u64)> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    memory.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

impl Machine {
    /// Builds a machine from `state` in `shell`, built ahead of time for the state's memory
    /// size and vCPU count; the shell's memory holds the saved guest memory (or is served
    /// lazily). A shell of another size is refused, as is an invalid state, before anything is
    /// written to KVM.
    pub fn restore_in(
        shell: MachineShell,
        config: RestoreConfig,
        console: ConsoleOutput,
        state: &MachineState,
    ) -> Result<Self, MachineError> {
        check_fits(&config, state, &shell.memory)?;
        if state.vcpus.len() != shell.vcpus.len() {
            return Err(RestoreError::ShellMismatch {
                shell: shell.spec(),
                state_vcpus: state.vcpus.len(),
                state_mem_bytes: state.mem_bytes,
            }
            .into());
        }
        let MachineShell {
            vcpus: vcpu_fds,
            vm,
            memory,
            caps,
            ..
        } = shell;

        let mut virtio = VirtioDevices::new();
        let vsock = match (&state.devices.vsock, &config.vsock_uds_path) {
            (Some(saved), Some(path)) => {
                let args = MmioArgs {
                    device: path.clone(),
                    mem: memory.clone(),
                };
                let transport = MmioTransport::<VsockDevice>::restore(args, &saved.state)
                    .map_err(RestoreError::Vsock)?;
                let handle = virtio.add(&vm, transport)?;
                let place = virtio.described[virtio.described.len() - 1];
                Some(PlacedVsock { handle, place })
            }
            _ => None,
        };
        let mut blocks = Vec::with_capacity(config.disks.len());
        for (index, (saved, disk)) in state.devices.blocks.iter().zip(config.disks).enumerate() {
            let args = MmioArgs {
                device: disk,
                mem: memory.clone(),
            };
            let transport = MmioTransport::<BlockDevice>::restore(args, &saved.state)
                .map_err(|source| RestoreError::Block { index, source })?;
            let handle = virtio.add(&vm, transport)?;
            let place = virtio.described[virtio.described.len() - 1];
            blocks.push(PlacedBlock { handle, place });
        }

        let (exit, control) = new_exit_signal(&memory)?;
        let serial_args = SerialArgs {
            irq: devices::serial_irq(&vm)?,
            output: console,
        };
        let serial = SerialConsole::restore(serial_args, &state.devices.serial)
            .map_err(RestoreError::Serial)?;
        let i8042 = match I8042::restore(exit.clone(), &state.devices.i8042) {
            Ok(d) => d,
            Err(never) => match never {},
        };
        let mut legacy = devices::legacy_devices(serial, i8042, &exit)?;
        legacy.buses.mmio = virtio.mmio;

        let mut vcpus = Vec::with_capacity(vcpu_fds.len());
        for ((index, fd), saved) in vcpu_fds.into_iter().enumerate().zip(&state.vcpus) {
            let args = VcpuArgs {
                fd,
                index: index as u8,
                caps: caps.clone(),
            };
            vcpus.push(Vcpu::restore(args, saved).map_err(RestoreError::from)?);
        }
        InKernelDevices::restore(&vm, &state.vm).map_err(RestoreError::from)?;
        for vcpu in &vcpus {
            // Tell a guest that uses kvmclock it was stopped, so its watchdogs do not take the
            // gap for a hang. A guest without kvmclock makes KVM refuse this; that is fine.
            if let Err(e) = vcpu.fd().kvmclock_ctrl() {
                tracing::debug!(vcpu = vcpu.index(), error = %e, "KVM_KVMCLOCK_CTRL not applied");
            }
        }
        if let Some(v) = &vsock {
            let mut transport = lock(&v.handle);
            if transport.state().registers.activated {
                // No host connection survived: the guest must drop its side too.
                transport.reset_vsock_transport();
            }
        }
        tracing::info!(
            vcpus = vcpus.len(),
            mem_bytes = state.mem_bytes,
            vsock = vsock.is_some(),
            disks = blocks.len(),
            "machine restored"
        );
        Ok(Self {
            vcpus,
            vm,
            memory,
            legacy,
            virtio: virtio.handles,
            vsock,
            blocks,
            exit,
            control,
            boot: state.boot.into(),
        })
    }
}

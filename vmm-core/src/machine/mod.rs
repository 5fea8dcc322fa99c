//! A whole machine: KVM VM, memory, devices and vCPUs, built from a [`MachineConfig`] (or
//! restored from a [`MachineState`]) and run until the guest exits. The order of creation below
//! is the order KVM requires.
//!
//! Submodules: `devices` wires devices into the VM, `event_loop` is the VMM thread, `control`
//! the [`MachineController`] that pauses a running machine (into the [`Paused`] guard that
//! saves it, reads its memory and resumes it) or stops it, `state` the saved machine, `shell`
//! the KVM resources a restore fills in, and `restore` rebuilding a machine from a saved one.
//!
//! A machine's guest memory never leaves this crate as a `GuestMemory` handle: it is read in
//! place through a [`Paused`] guard, or filled through a [`MachineShell`] before anything runs
//! on it, which is what lets both hand out plain slices safely.

mod control;
mod devices;
mod event_loop;
mod restore;
mod shell;
mod state;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use kvm_bindings::{CpuId, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VmFd};

use crate::boot::{self, BootInfo, mptable::CpuSignature};
use crate::config::{ConfigError, DiskConfig, MachineConfig, VsockConfig};
use crate::devices::block::{BlockDevice, BlockError};
use crate::devices::legacy::I8042;
use crate::devices::serial::{ConsoleOutput, SerialConsole};
use crate::devices::virtio::mmio::{MmioTransport, VirtioMmioEvents};
use crate::devices::vsock::{VsockDevice, VsockError};
use crate::exit::{ExitReason, ExitSignal};
use crate::layout::{KVM_TSS_ADDRESS, VIRTIO_IRQ_FIRST, VIRTIO_IRQ_LAST};
use crate::memory::{self, GuestMemory, MemoryError};
use crate::vcpu::state::Vcpu;
use crate::vcpu::{self, SpawnError, VcpuHandle, setup::SetupError};
use crate::{cpuid, kvm};
use control::ControlShared;
use devices::{LegacyDevices, PlacedBlock, PlacedVsock, VirtioDevices};

pub use control::{ControlError, MachineController, Paused, SaveError};
pub use restore::{RestoreConfig, RestoreError};
pub use shell::{MachineShell, ShellMemory, ShellSpec};
pub use state::{
    BootState, DevicesState, MACHINE_STATE_VERSION, MachineState, StateError, VirtioPlacement,
    VsockDeviceState,
};

/// The machine could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// /dev/kvm cannot be used.
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
    /// A VM-level KVM call failed.
    #[error("{step} failed")]
    VmSetup {
        /// The ioctl.
        step: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The guest image could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// CPUID could not be read.
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    /// A vCPU could not be configured.
    #[error(transparent)]
    VcpuSetup(#[from] SetupError),
    /// A vCPU thread could not be started.
    #[error(transparent)]
    VcpuSpawn(#[from] SpawnError),
    /// A device could not be created.
    #[error("cannot create device {device}")]
    Device {
        /// The device.
        device: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The event loop failed.
    #[error("VMM event loop failed")]
    EventLoop(#[source] std::io::Error),
    /// The vsock device could not be created.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// A disk could not be attached.
    #[error("disk {}", path.display())]
    Disk {
        /// Its image.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: BlockError,
    },
    /// A virtio transport could not be created.
    #[error(transparent)]
    VirtioMmio(#[from] crate::devices::virtio::mmio::MmioError),
    /// More virtio devices than IRQs set aside for them.
    #[error("too many virtio devices: IRQs {VIRTIO_IRQ_FIRST} to {VIRTIO_IRQ_LAST} are all taken")]
    TooManyVirtioDevices,
    /// The machine could not be restored.
    #[error(transparent)]
    Restore(#[from] RestoreError),
}

fn vm_step(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MachineError {
    move |source| MachineError::VmSetup { step, source }
}

/// Where the guest's console input comes from (stdin for `thaw run`).
pub type ConsoleInput = Box<dyn ReadFd + Send>;

/// A readable file descriptor.
pub trait ReadFd: Read + AsRawFd {}
impl<T: Read + AsRawFd> ReadFd for T {}

/// A virtio device as the VMM thread's event loop sees it.
pub type VirtioHandle = Arc<Mutex<dyn VirtioMmioEvents>>;
/// The vsock device with its transport.
pub type VsockHandle = Arc<Mutex<MmioTransport<VsockDevice>>>;
/// A block device with its transport.
pub type BlockHandle = Arc<Mutex<MmioTransport<BlockDevice>>>;

/// A built machine, ready to run.
pub struct Machine {
    // Field order is drop order: vCPU fds and the VM go before the memory KVM maps.
    vcpus: Vec<Vcpu>,
    vm: VmFd,
    memory: GuestMemory,
    legacy: LegacyDevices,
    virtio: Vec<VirtioHandle>,
    vsock: Option<PlacedVsock>,
    blocks: Vec<PlacedBlock>,
    exit: Arc<ExitSignal>,
    control: Arc<ControlShared>,
    boot: BootInfo,
}

/// Creates the VM with its memory and what must exist before any vCPU, in KVM's order: the TSS
/// address must be set before vCPUs exist (Intel), and the irqchip must exist before the PIT
/// and before any vCPU, so each vCPU gets an in-kernel local APIC.
///
/// Memory comes first, before the irqchip and the PIT: a memory-slot change waits for an SRCU
/// grace period, which is quick while the VM has no in-kernel devices and slow once it has
/// them. Measured on the project's PVM host: 0.3 ms registering 128 MiB first, 7–8 ms after
/// the PIT (it was most of a machine's creation time).
fn create_vm(kvm: &Kvm, memory: &GuestMemory) -> Result<VmFd, MachineError> {
    let vm = kvm.create_vm().map_err(vm_step("KVM_CREATE_VM"))?;
    memory::register_with_kvm(&vm, memory)?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(vm_step("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(vm_step("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(vm_step("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

fn new_exit_signal(
    memory: &GuestMemory,
) -> Result<(Arc<ExitSignal>, Arc<ControlShared>), MachineError> {
    let device_err = |device| move |source| MachineError::Device { device, source };
    let exit = Arc::new(ExitSignal::new().map_err(device_err("exit signal"))?);
    let control = Arc::new(
        ControlShared::new(exit.clone(), memory.clone()).map_err(device_err("control eventfd"))?,
    );
    Ok((exit, control))
}

fn create_vsock(
    devices: &mut VirtioDevices,
    vm: &VmFd,
    memory: &GuestMemory,
    config: &VsockConfig,
) -> Result<PlacedVsock, MachineError> {
    let device = VsockDevice::new(config.guest_cid, config.uds_path.clone())?;
    let handle = devices.add(vm, MmioTransport::new(device, memory.clone())?)?;
    let place = devices.described[devices.described.len() - 1];
    tracing::info!(
        guest_cid = config.guest_cid,
        uds_path = %config.uds_path.display(),
        "vsock device ready"
    );
    Ok(PlacedVsock { handle, place })
}

/// The machine's disks, after its vsock device (if any), in their configured order.
fn create_disks(
    devices: &mut VirtioDevices,
    vm: &VmFd,
    memory: &GuestMemory,
    disks: &[DiskConfig],
) -> Result<Vec<PlacedBlock>, MachineError> {
    let mut placed = Vec::with_capacity(disks.len());
    for config in disks {
        let device = BlockDevice::open(config).map_err(|source| MachineError::Disk {
            path: config.path.clone(),
            source,
        })?;
        let sectors = device.capacity_sectors();
        let handle = devices.add(vm, MmioTransport::new(device, memory.clone())?)?;
        let place = devices.described[devices.described.len() - 1];
        tracing::info!(path = %config.path.display(), read_only = config.read_only, sectors,
            "block device ready");
        placed.push(PlacedBlock { handle, place });
    }
    Ok(placed)
}

impl Machine {
    /// Creates the VM, loads the guest and configures every vCPU, without running anything.
    pub fn create(config: &MachineConfig, console: ConsoleOutput) -> Result<Self, MachineError> {
        config.validate()?;
        let shell = MachineShell::create(ShellSpec {
            mem_bytes: config.mem_bytes(),
            vcpus: config.vcpus,
        })?;
        let MachineShell {
            vcpus: vcpu_fds,
            vm,
            memory,
            caps,
            ..
        } = shell;

        // Virtio devices come before the boot tables, which describe them.
        let mut virtio = VirtioDevices::new();
        let vsock = match &config.vsock {
            Some(vsock) => Some(create_vsock(&mut virtio, &vm, &memory, vsock)?),
            None => None,
        };
        let blocks = create_disks(&mut virtio, &vm, &memory, &config.disks)?;

        let base_cpuid = cpuid::supported(&kvm::open()?)?;
        let boot = boot::load(
            &memory,
            &config.kernel,
            config.initrd.as_deref(),
            &virtio.cmdline(&config.cmdline),
            config.vcpus,
            cpu_signature(&base_cpuid),
            &virtio.described,
        )?;

        let (exit, control) = new_exit_signal(&memory)?;
        let serial = SerialConsole::new(devices::serial_irq(&vm)?, console).map_err(|source| {
            MachineError::Device {
                device: "serial console",
                source,
            }
        })?;
        let mut legacy = devices::legacy_devices(serial, I8042::new(exit.clone()), &exit)?;
        legacy.buses.mmio = virtio.mmio;

        let mut vcpus = Vec::with_capacity(vcpu_fds.len());
        for (index, fd) in (0..config.vcpus).zip(vcpu_fds) {
            let cpuid = cpuid::for_vcpu(&base_cpuid, index, config.vcpus);
            vcpu::setup::configure(&fd, index, &cpuid, boot.entry.0)?;
            vcpus.push(Vcpu::new(index, fd, caps.clone()));
        }
        tracing::info!(
            kernel = %config.kernel,
            format = ?boot.format,
            entry = format_args!("{:#x}", boot.entry.0),
            mem_mib = config.mem_mib,
            vcpus = config.vcpus,
            "machine created"
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
            boot,
        })
    }

    /// The vsock device, if the machine has one, to inspect it. (A restored machine has already
    /// reset its transport: [`MmioTransport::reset_vsock_transport`].) Driving the device
    /// through this handle bypasses the event loop, and with it a pause: not while a
    /// [`Paused`] guard's memory is read.
    pub fn vsock(&self) -> Option<VsockHandle> {
        self.vsock.as_ref().map(|v| v.handle.clone())
    }

    /// Whether the machine has a vsock device.
    pub fn has_vsock(&self) -> bool {
        self.vsock.is_some()
    }

    /// The signal that stops the machine; `request(ExitReason::Stopped)` from any thread ends
    /// [`Machine::run`].
    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.exit.clone()
    }

    /// A handle that pauses (into a [`Paused`] guard, which saves and resumes) and stops this
    /// machine while [`Machine::run`] runs it, from any thread.
    pub fn controller(&self) -> MachineController {
        MachineController::new(self.control.clone())
    }

    /// Guest memory, for tests. Outside them it is read through a [`Paused`] guard, which can
    /// promise that nothing writes it meanwhile.
    #[cfg(test)]
    pub(crate) fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Where the guest was loaded.
    pub fn boot_info(&self) -> BootInfo {
        self.boot
    }

    /// Runs every vCPU until the machine exits, forwarding `input` to the console, and returns
    /// why it stopped. Controller requests are served meanwhile.
    pub fn run(mut self, input: Option<ConsoleInput>) -> Result<ExitReason, MachineError> {
        let mut handles = Vec::with_capacity(self.vcpus.len());
        let mut spawn_error = None;
        for vcpu in self.vcpus.drain(..) {
            match vcpu::spawn(vcpu, self.legacy.buses.clone(), self.exit.clone()) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    spawn_error = Some(e);
                    self.exit.request(ExitReason::Stopped);
                    break;
                }
            }
        }
        let loop_result = match spawn_error {
            Some(_) => Ok(()),
            None => {
                let ctx = event_loop::LoopContext {
                    exit: &self.exit,
                    control: &self.control,
                    serial: &self.legacy.serial,
                    i8042: &self.legacy.i8042,
                    virtio: &self.virtio,
                    vsock: self.vsock.as_ref(),
                    blocks: &self.blocks,
                    vm: &self.vm,
                    vcpus: &handles,
                    mem_bytes: memory::total_bytes(&self.memory),
                    boot: self.boot.into(),
                };
                event_loop::run(ctx, input)
            }
        };
        if loop_result.is_err() {
            self.exit.request(ExitReason::Stopped);
        }
        // No request is served from here on: later ones, and any still queued, fail.
        self.control.close();
        stop_vcpus(handles);
        if let Some(e) = spawn_error {
            return Err(e.into());
        }
        loop_result?;
        Ok(self.exit.reason().unwrap_or(ExitReason::Stopped))
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // A machine dropped without running answers pending controller requests with an error.
        self.control.close();
    }
}

fn cpu_signature(cpuid: &CpuId) -> CpuSignature {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 1)
        .map(|e| CpuSignature {
            signature: e.eax,
            features: e.edx,
        })
        .unwrap_or_default()
}

fn stop_vcpus(handles: Vec<VcpuHandle>) {
    for h in &handles {
        h.kick();
    }
    for h in handles {
        h.join();
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[cfg(test)]
mod golden_tests;
#[cfg(test)]
mod persist_tests;
#[cfg(test)]
mod round_trip_tests;
#[cfg(test)]
mod state_diff;
#[cfg(test)]
mod tests;

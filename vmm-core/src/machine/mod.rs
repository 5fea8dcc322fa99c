//! A whole machine: KVM VM, memory, devices and vCPUs, built from a [`MachineConfig`] and run
//! until the guest exits. The order of creation below is the order KVM requires.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use kvm_bindings::{CpuId, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{IoEventAddress, VcpuFd, VmFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::acpi::VirtioMmioDevice;
use crate::boot::{self, BootInfo, mptable::CpuSignature};
use crate::config::{ConfigError, MachineConfig, VsockConfig};
use crate::devices::bus::Bus;
use crate::devices::legacy::{DEBUG_EXIT_PORT, DebugExit, I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{COM1_BASE, COM1_IRQ, COM1_LEN, ConsoleOutput, SerialConsole};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::mmio::{MmioTransport, VirtioMmioEvents, reg};
use crate::devices::vsock::{VsockDevice, VsockError};
use crate::exit::{ExitReason, ExitSignal};
use crate::layout::{
    KVM_TSS_ADDRESS, VIRTIO_IRQ_FIRST, VIRTIO_IRQ_LAST, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::memory::{self, GuestMemory, MemoryError};
use crate::vcpu::{self, Buses, SpawnError, VcpuHandle, setup::SetupError};
use crate::{cpuid, kvm};

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
    /// A virtio transport could not be created.
    #[error(transparent)]
    VirtioMmio(#[from] crate::devices::virtio::mmio::MmioError),
    /// More virtio devices than IRQs set aside for them.
    #[error("too many virtio devices: IRQs {VIRTIO_IRQ_FIRST} to {VIRTIO_IRQ_LAST} are all taken")]
    TooManyVirtioDevices,
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

/// A built machine, ready to run.
pub struct Machine {
    // Field order is drop order: vCPU fds and the VM go before the memory KVM maps.
    vcpus: Vec<VcpuFd>,
    _vm: VmFd,
    memory: GuestMemory,
    buses: Buses,
    serial: Arc<Mutex<SerialConsole>>,
    virtio: Vec<VirtioHandle>,
    vsock: Option<VsockHandle>,
    exit: Arc<ExitSignal>,
    boot: BootInfo,
}

/// Virtio-mmio devices being placed: their bus, their descriptions for ACPI and the command line.
struct VirtioDevices {
    mmio: Bus,
    described: Vec<VirtioMmioDevice>,
    handles: Vec<VirtioHandle>,
}

impl VirtioDevices {
    /// Puts `device` at the next MMIO window and IRQ: wires its irqfd and one ioeventfd per
    /// queue (QueueNotify with datamatch = queue index, so a notify does not leave KVM).
    fn add<D: VirtioDevice + 'static>(
        &mut self,
        vm: &VmFd,
        memory: &GuestMemory,
        device: D,
    ) -> Result<Arc<Mutex<MmioTransport<D>>>, MachineError> {
        let index = self.described.len() as u32;
        let irq = VIRTIO_IRQ_FIRST + index;
        if irq > VIRTIO_IRQ_LAST {
            return Err(MachineError::TooManyVirtioDevices);
        }
        let base = VIRTIO_MMIO_START + u64::from(index) * VIRTIO_MMIO_SIZE;
        let transport = MmioTransport::new(device, memory.clone())?;
        vm.register_irqfd(transport.irq_event(), irq)
            .map_err(vm_step("KVM_IRQFD (virtio)"))?;
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + reg::QUEUE_NOTIFY),
                queue as u32,
            )
            .map_err(vm_step("KVM_IOEVENTFD (virtio)"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(base, VIRTIO_MMIO_SIZE, transport.clone())
            .map_err(|e| MachineError::Device {
                device: "virtio-mmio bus",
                source: std::io::Error::other(e),
            })?;
        self.described.push(VirtioMmioDevice {
            base,
            size: VIRTIO_MMIO_SIZE,
            irq,
        });
        self.handles.push(transport.clone());
        Ok(transport)
    }

    /// The command line with a `virtio_mmio.device=<size>@<base>:<irq>` word per device, for
    /// kernels that take devices from there (Debian's does not; it reads the DSDT).
    fn cmdline(&self, cmdline: &str) -> String {
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

fn create_vsock(
    devices: &mut VirtioDevices,
    vm: &VmFd,
    memory: &GuestMemory,
    config: &VsockConfig,
) -> Result<VsockHandle, MachineError> {
    let device = VsockDevice::new(config.guest_cid, config.uds_path.clone())?;
    let handle = devices.add(vm, memory, device)?;
    tracing::info!(
        guest_cid = config.guest_cid,
        uds_path = %config.uds_path.display(),
        "vsock device ready"
    );
    Ok(handle)
}

impl Machine {
    /// Creates the VM, loads the guest and configures every vCPU, without running anything.
    pub fn create(config: &MachineConfig, console: ConsoleOutput) -> Result<Self, MachineError> {
        config.validate()?;
        let kvm = kvm::open()?;

        // Order matters: the TSS address must be set before vCPUs exist (Intel), and the
        // irqchip must exist before the PIT and before any vCPU, so each vCPU gets an
        // in-kernel local APIC.
        let vm = kvm.create_vm().map_err(vm_step("KVM_CREATE_VM"))?;
        vm.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(vm_step("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(vm_step("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(vm_step("KVM_CREATE_PIT2"))?;

        let memory = memory::create_guest_memory(config.mem_bytes())?;
        memory::register_with_kvm(&vm, &memory)?;

        // Virtio devices come before the boot tables, which describe them.
        let mut virtio = VirtioDevices {
            mmio: Bus::new(),
            described: Vec::new(),
            handles: Vec::new(),
        };
        let vsock = match &config.vsock {
            Some(vsock) => Some(create_vsock(&mut virtio, &vm, &memory, vsock)?),
            None => None,
        };

        let base_cpuid = cpuid::supported(&kvm)?;
        let boot = boot::load(
            &memory,
            &config.kernel,
            config.initrd.as_deref(),
            &virtio.cmdline(&config.cmdline),
            config.vcpus,
            cpu_signature(&base_cpuid),
            &virtio.described,
        )?;

        let exit = Arc::new(ExitSignal::new().map_err(|source| MachineError::Device {
            device: "exit signal",
            source,
        })?);
        let (mut buses, serial) = create_devices(&vm, console, &exit)?;
        buses.mmio = virtio.mmio;

        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for index in 0..config.vcpus {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(vm_step("KVM_CREATE_VCPU"))?;
            let cpuid = cpuid::for_vcpu(&base_cpuid, index, config.vcpus);
            vcpu::setup::configure(&fd, index, &cpuid, boot.entry.0)?;
            vcpus.push(fd);
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
            _vm: vm,
            memory,
            buses,
            serial,
            virtio: virtio.handles,
            vsock,
            exit,
            boot,
        })
    }

    /// The vsock device, if the machine has one: for a transport reset after a restore
    /// ([`MmioTransport::reset_vsock_transport`]) or to inspect its state.
    pub fn vsock(&self) -> Option<VsockHandle> {
        self.vsock.clone()
    }

    /// The signal that stops the machine; `request(ExitReason::Stopped)` from any thread ends
    /// [`Machine::run`].
    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.exit.clone()
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Where the guest was loaded.
    pub fn boot_info(&self) -> BootInfo {
        self.boot
    }

    /// Runs every vCPU until the machine exits, forwarding `input` to the console, and returns
    /// why it stopped.
    pub fn run(mut self, input: Option<ConsoleInput>) -> Result<ExitReason, MachineError> {
        let mut handles = Vec::with_capacity(self.vcpus.len());
        let mut spawn_error = None;
        for (index, fd) in self.vcpus.drain(..).enumerate() {
            match vcpu::spawn(index as u8, fd, self.buses.clone(), self.exit.clone()) {
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
            None => event_loop(&self.exit, &self.serial, &self.virtio, input),
        };
        if loop_result.is_err() {
            self.exit.request(ExitReason::Stopped);
        }
        stop_vcpus(handles);
        if let Some(e) = spawn_error {
            return Err(e.into());
        }
        loop_result?;
        Ok(self.exit.reason().unwrap_or(ExitReason::Stopped))
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

fn create_devices(
    vm: &VmFd,
    console: ConsoleOutput,
    exit: &Arc<ExitSignal>,
) -> Result<(Buses, Arc<Mutex<SerialConsole>>), MachineError> {
    let device_err = |device| move |source| MachineError::Device { device, source };
    let irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(device_err("serial interrupt"))?;
    vm.register_irqfd(&irq, COM1_IRQ)
        .map_err(vm_step("KVM_IRQFD (COM1)"))?;
    let serial = Arc::new(Mutex::new(
        SerialConsole::new(irq, console).map_err(device_err("serial console"))?,
    ));

    let mut pio = Bus::new();
    let conflict = |e: crate::devices::bus::BusConflict| MachineError::Device {
        device: "port I/O bus",
        source: std::io::Error::other(e),
    };
    pio.insert(COM1_BASE, COM1_LEN, serial.clone())
        .map_err(conflict)?;
    pio.insert(
        I8042_BASE,
        I8042_LEN,
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
    )
    .map_err(conflict)?;
    pio.insert(
        DEBUG_EXIT_PORT,
        1,
        Arc::new(Mutex::new(DebugExit(exit.clone()))),
    )
    .map_err(conflict)?;
    let buses = Buses {
        pio,
        mmio: Bus::new(),
    };
    Ok((buses, serial))
}

fn stop_vcpus(handles: Vec<VcpuHandle>) {
    for h in &handles {
        h.kick();
    }
    for h in handles {
        h.join();
    }
}

const TOKEN_EXIT: u64 = 0;
const TOKEN_INPUT: u64 = 1;
const TOKEN_INPUT_DRAINED: u64 = 2;
/// Virtio device `d` owns tokens `TOKEN_VIRTIO + d * VIRTIO_TOKENS ..`: one per queue, and the
/// last one for its backend.
const TOKEN_VIRTIO: u64 = 16;
const VIRTIO_TOKENS: u64 = 16;
const VIRTIO_BACKEND_SLOT: u64 = VIRTIO_TOKENS - 1;

/// Waits for the machine to exit while moving console input into the UART and running the
/// virtio devices' queue and backend work.
fn event_loop(
    exit: &ExitSignal,
    serial: &Mutex<SerialConsole>,
    virtio: &[VirtioHandle],
    mut input: Option<ConsoleInput>,
) -> Result<(), MachineError> {
    let epoll = Epoll::new().map_err(MachineError::EventLoop)?;
    let add = |fd: RawFd, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    add(exit.as_raw_fd(), TOKEN_EXIT).map_err(MachineError::EventLoop)?;
    let drained_fd = lock(serial).input_drained_fd();
    add(drained_fd, TOKEN_INPUT_DRAINED).map_err(MachineError::EventLoop)?;
    if let Some(fd) = input.as_ref().map(|i| i.as_raw_fd()) {
        if let Err(e) = add(fd, TOKEN_INPUT) {
            // Regular files and /dev/null cannot be polled; such input is simply not forwarded.
            tracing::debug!(error = %e, "console input is not pollable; ignoring it");
            input = None;
        }
    }
    for (d, device) in virtio.iter().enumerate() {
        let base = TOKEN_VIRTIO + d as u64 * VIRTIO_TOKENS;
        let device = lock(device);
        for (q, fd) in device.queue_event_fds().into_iter().enumerate() {
            if q as u64 >= VIRTIO_BACKEND_SLOT {
                break;
            }
            add(fd, base + q as u64).map_err(MachineError::EventLoop)?;
        }
        if let Some(fd) = device.backend_fd() {
            add(fd, base + VIRTIO_BACKEND_SLOT).map_err(MachineError::EventLoop)?;
        }
    }
    let mut input_paused = false;
    let mut events = vec![EpollEvent::default(); 16];
    while !exit.is_set() {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(MachineError::EventLoop(e)),
        };
        for event in &events[..n] {
            match event.data() {
                TOKEN_INPUT => {
                    let Some(source) = input.as_mut() else {
                        continue;
                    };
                    let mut uart = lock(serial);
                    let room = uart.input_capacity();
                    if room == 0 {
                        // Stop polling input until the guest drains its FIFO.
                        let _ = epoll.ctl(
                            ControlOperation::Delete,
                            source.as_raw_fd(),
                            EpollEvent::default(),
                        );
                        input_paused = true;
                        continue;
                    }
                    let mut buf = vec![0u8; room];
                    match source.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            let _ = epoll.ctl(
                                ControlOperation::Delete,
                                source.as_raw_fd(),
                                EpollEvent::default(),
                            );
                            input = None;
                        }
                        Ok(n) => {
                            uart.push_input(&buf[..n]);
                        }
                    }
                }
                TOKEN_INPUT_DRAINED => {
                    lock(serial).clear_input_drained();
                    if input_paused {
                        if let Some(fd) = input.as_ref().map(|i| i.as_raw_fd()) {
                            add(fd, TOKEN_INPUT).map_err(MachineError::EventLoop)?;
                        }
                        input_paused = false;
                    }
                }
                token if token >= TOKEN_VIRTIO => {
                    let d = ((token - TOKEN_VIRTIO) / VIRTIO_TOKENS) as usize;
                    let slot = (token - TOKEN_VIRTIO) % VIRTIO_TOKENS;
                    let Some(device) = virtio.get(d) else {
                        continue;
                    };
                    let mut device = lock(device);
                    if slot == VIRTIO_BACKEND_SLOT {
                        device.process_backend_event();
                    } else {
                        device.process_queue_event(slot as usize);
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KernelSource;
    use crate::test_support::{Capture, require_kvm, tiny_elf};

    /// `out` "OK" to COM1, then `code` to the debug-exit port.
    fn print_ok_and_exit(code: u8) -> Vec<u8> {
        vec![
            0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xb0, b'O', 0xee, // mov al, 'O'; out dx, al
            0xb0, b'K', 0xee, // mov al, 'K'; out dx, al
            0x66, 0xba, 0x01, 0x05, // mov dx, 0x501
            0xb0, code, 0xee, // mov al, code; out dx, al
            0xf4, // hlt
        ]
    }

    fn config(image: Vec<u8>, vcpus: u8) -> MachineConfig {
        MachineConfig {
            mem_mib: 128,
            vcpus,
            kernel: KernelSource::Bytes {
                name: "tiny".into(),
                image: image.into(),
            },
            initrd: None,
            cmdline: String::new(),
            vsock: None,
        }
    }

    #[test]
    fn boots_elf_in_long_mode_and_exits_with_guest_code() {
        if !require_kvm() {
            return;
        }
        let out = Capture::default();
        let elf = tiny_elf(0x10_0000, &print_ok_and_exit(7));
        let machine = Machine::create(&config(elf, 1), Box::new(out.clone())).unwrap();
        let reason = machine.run(None).unwrap();
        assert_eq!(reason, ExitReason::GuestExit(7));
        assert_eq!(out.text(), "OK");
    }

    #[test]
    fn host_stop_ends_a_halted_guest() {
        if !require_kvm() {
            return;
        }
        // cli; hlt: the vCPU sleeps inside KVM_RUN until kicked.
        let elf = tiny_elf(0x10_0000, &[0xfa, 0xf4, 0xeb, 0xfd]);
        let machine = Machine::create(&config(elf, 1), Box::new(std::io::sink())).unwrap();
        let exit = machine.exit_signal();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            exit.request(ExitReason::Stopped);
        });
        assert_eq!(machine.run(None).unwrap(), ExitReason::Stopped);
        stopper.join().unwrap();
    }

    #[test]
    fn vsock_device_is_on_the_cmdline_in_acpi_and_its_socket_goes_with_the_machine() {
        if !require_kvm() {
            return;
        }
        use crate::config::VsockConfig;
        use crate::layout::{ACPI_END, CMDLINE_START, RSDP_START};
        use vm_memory::{Bytes, GuestAddress};

        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mut cfg = config(tiny_elf(0x10_0000, &print_ok_and_exit(3)), 1);
        cfg.cmdline = "console=ttyS0".into();
        cfg.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: uds.clone(),
        });
        let machine = Machine::create(&cfg, Box::new(std::io::sink())).unwrap();
        assert!(uds.exists(), "the host socket is listening");
        let mut cmdline = vec![0u8; 128];
        machine
            .memory()
            .read_slice(&mut cmdline, GuestAddress(CMDLINE_START))
            .unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(
            cmdline.starts_with("console=ttyS0 virtio_mmio.device=4K@0xd0000000:5\0"),
            "{cmdline}"
        );
        let mut acpi = vec![0u8; (ACPI_END - RSDP_START) as usize];
        machine
            .memory()
            .read_slice(&mut acpi, GuestAddress(RSDP_START))
            .unwrap();
        assert!(
            acpi.windows(8).any(|w| w == b"LNRO0005"),
            "no virtio-mmio device in the DSDT"
        );
        let vsock = machine.vsock().unwrap();
        assert_eq!(lock(&vsock).device().config().guest_cid, 3);
        drop(vsock);
        assert_eq!(machine.run(None).unwrap(), ExitReason::GuestExit(3));
        assert!(!uds.exists(), "the host socket is removed with the machine");
        // A socket path that exists is refused, not stolen.
        std::fs::write(&uds, b"").unwrap();
        assert!(matches!(
            Machine::create(&cfg, Box::new(std::io::sink())),
            Err(MachineError::Vsock(_))
        ));
    }
}

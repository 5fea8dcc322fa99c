//! A whole machine: KVM VM, memory, devices and vCPUs, built from a [`MachineConfig`] and run
//! until the guest exits. The order of creation below is the order KVM requires.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use kvm_bindings::{CpuId, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootInfo, mptable::CpuSignature};
use crate::config::{ConfigError, MachineConfig};
use crate::devices::bus::Bus;
use crate::devices::legacy::{DEBUG_EXIT_PORT, DebugExit, I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{COM1_BASE, COM1_IRQ, COM1_LEN, ConsoleOutput, SerialConsole};
use crate::exit::{ExitReason, ExitSignal};
use crate::layout::KVM_TSS_ADDRESS;
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
}

fn vm_step(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MachineError {
    move |source| MachineError::VmSetup { step, source }
}

/// Where the guest's console input comes from (stdin for `thaw run`).
pub type ConsoleInput = Box<dyn ReadFd + Send>;

/// A readable file descriptor.
pub trait ReadFd: Read + AsRawFd {}
impl<T: Read + AsRawFd> ReadFd for T {}

/// A built machine, ready to run.
pub struct Machine {
    // Field order is drop order: vCPU fds and the VM go before the memory KVM maps.
    vcpus: Vec<VcpuFd>,
    _vm: VmFd,
    memory: GuestMemory,
    buses: Buses,
    serial: Arc<Mutex<SerialConsole>>,
    exit: Arc<ExitSignal>,
    boot: BootInfo,
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

        let base_cpuid = cpuid::supported(&kvm)?;
        let boot = boot::load(
            &memory,
            &config.kernel,
            config.initrd.as_deref(),
            &config.cmdline,
            config.vcpus,
            cpu_signature(&base_cpuid),
        )?;

        let exit = Arc::new(ExitSignal::new().map_err(|source| MachineError::Device {
            device: "exit signal",
            source,
        })?);
        let (buses, serial) = create_devices(&vm, console, &exit)?;

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
            exit,
            boot,
        })
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
            None => event_loop(&self.exit, &self.serial, input),
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

/// Waits for the machine to exit while moving console input into the UART.
fn event_loop(
    exit: &ExitSignal,
    serial: &Mutex<SerialConsole>,
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
    let mut input_paused = false;
    let mut events = vec![EpollEvent::default(); 4];
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
}

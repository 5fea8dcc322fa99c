//! The VMM thread's event loop: it waits for the machine to exit while moving console input
//! into the UART, running the virtio devices' queue and backend work, and serving controller
//! requests (pause, resume, save).
//!
//! Two epoll sets: the main one holds the exit eventfd, the control eventfd and the device set;
//! the device set holds console input, the UART's "drained" eventfd and every virtio queue and
//! backend fd. Pausing takes the device set out of the main one, so while paused nothing polls a
//! device, nothing reads console input, and nothing touches guest memory; resuming puts it back
//! (events that arrived meanwhile are level-triggered and still there).

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError, sync_channel};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::control::{ControlError, ControlShared, Request, RequestKind, Response, SaveError};
use super::devices::{PlacedBlock, PlacedVsock};
use super::state::{
    BlockDeviceState, BootState, DevicesState, MACHINE_STATE_VERSION, MachineState,
    VsockDeviceState,
};
use super::{ConsoleInput, MachineError, VirtioHandle, lock};
use crate::devices::legacy::I8042;
use crate::devices::serial::SerialConsole;
use crate::exit::ExitSignal;
use crate::persist::Persist;
use crate::vcpu::{VcpuHandle, VcpuRequest};
use crate::vm_state::InKernelDevices;

const TOKEN_EXIT: u64 = 0;
const TOKEN_CONTROL: u64 = 1;
const TOKEN_DEVICES: u64 = 2;

const TOKEN_INPUT: u64 = 1;
const TOKEN_INPUT_DRAINED: u64 = 2;
/// Virtio device `d` owns tokens `TOKEN_VIRTIO + d * VIRTIO_TOKENS ..` of the device set: one
/// per queue, and the last one for its backend.
const TOKEN_VIRTIO: u64 = 16;
const VIRTIO_TOKENS: u64 = 16;
const VIRTIO_BACKEND_SLOT: u64 = VIRTIO_TOKENS - 1;

/// How long a vCPU may take to leave the guest when pausing.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a pause waiting for vCPUs checks whether the machine ended meanwhile.
const PAUSE_POLL: Duration = Duration::from_millis(20);

/// What the loop works with; the machine lends it.
pub(super) struct LoopContext<'a> {
    pub exit: &'a ExitSignal,
    pub control: &'a ControlShared,
    pub serial: &'a Mutex<SerialConsole>,
    pub i8042: &'a Mutex<I8042>,
    pub virtio: &'a [VirtioHandle],
    pub vsock: Option<&'a PlacedVsock>,
    pub blocks: &'a [PlacedBlock],
    pub vm: &'a VmFd,
    pub vcpus: &'a [VcpuHandle],
    pub mem_bytes: u64,
    pub boot: BootState,
}

fn loop_err(e: std::io::Error) -> MachineError {
    MachineError::EventLoop(e)
}

struct EventLoop<'a> {
    ctx: LoopContext<'a>,
    main: Epoll,
    devices: Epoll,
    input: Option<ConsoleInput>,
    input_paused: bool,
    paused: bool,
}

/// Runs until the machine exits.
pub(super) fn run(ctx: LoopContext<'_>, input: Option<ConsoleInput>) -> Result<(), MachineError> {
    let main = Epoll::new().map_err(loop_err)?;
    let devices = Epoll::new().map_err(loop_err)?;
    let mut this = EventLoop {
        ctx,
        main,
        devices,
        input,
        input_paused: false,
        paused: false,
    };
    this.register()?;
    this.serve()
}

fn add(epoll: &Epoll, fd: RawFd, token: u64) -> std::io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, token),
    )
}

impl EventLoop<'_> {
    fn register(&mut self) -> Result<(), MachineError> {
        add(&self.main, self.ctx.exit.as_raw_fd(), TOKEN_EXIT).map_err(loop_err)?;
        add(
            &self.main,
            self.ctx.control.wake_fd().as_raw_fd(),
            TOKEN_CONTROL,
        )
        .map_err(loop_err)?;
        add(&self.main, self.devices.as_raw_fd(), TOKEN_DEVICES).map_err(loop_err)?;
        let drained_fd = lock(self.ctx.serial).input_drained_fd();
        add(&self.devices, drained_fd, TOKEN_INPUT_DRAINED).map_err(loop_err)?;
        if let Some(fd) = self.input.as_ref().map(|i| i.as_raw_fd()) {
            if let Err(e) = add(&self.devices, fd, TOKEN_INPUT) {
                // Regular files and /dev/null cannot be polled; such input is simply not
                // forwarded.
                tracing::debug!(error = %e, "console input is not pollable; ignoring it");
                self.input = None;
            }
        }
        for (d, device) in self.ctx.virtio.iter().enumerate() {
            let base = TOKEN_VIRTIO + d as u64 * VIRTIO_TOKENS;
            let device = lock(device);
            for (q, fd) in device.queue_event_fds().into_iter().enumerate() {
                if q as u64 >= VIRTIO_BACKEND_SLOT {
                    break;
                }
                add(&self.devices, fd, base + q as u64).map_err(loop_err)?;
            }
            if let Some(fd) = device.backend_fd() {
                add(&self.devices, fd, base + VIRTIO_BACKEND_SLOT).map_err(loop_err)?;
            }
        }
        Ok(())
    }

    fn serve(&mut self) -> Result<(), MachineError> {
        let mut events = vec![EpollEvent::default(); 4];
        while !self.ctx.exit.is_set() {
            let n = match self.main.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(loop_err(e)),
            };
            for event in &events[..n] {
                match event.data() {
                    TOKEN_CONTROL => self.serve_requests(),
                    TOKEN_DEVICES if !self.paused => self.device_events()?,
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn serve_requests(&mut self) {
        for Request { kind, reply } in self.ctx.control.take() {
            let result = match kind {
                RequestKind::Pause => self.pause().map(|()| Response::Done),
                RequestKind::Resume => {
                    self.resume();
                    Ok(Response::Done)
                }
                RequestKind::Save => self.save().map(|s| Response::Saved(Box::new(s))),
            };
            // The caller may have given up; nothing to do then.
            let _ = reply.send(result);
        }
    }

    fn exited(&self) -> ControlError {
        ControlError::Exited {
            reason: self.ctx.exit.reason(),
        }
    }

    fn pause(&mut self) -> Result<(), ControlError> {
        if self.paused {
            return Ok(());
        }
        // Device work stops first, so that from here on only parked vCPUs remain.
        if let Err(e) = self.main.ctl(
            ControlOperation::Delete,
            self.devices.as_raw_fd(),
            EpollEvent::default(),
        ) {
            tracing::warn!(error = %e, "cannot stop polling devices for a pause");
        }
        self.paused = true;
        let mut acks = Vec::with_capacity(self.ctx.vcpus.len());
        for vcpu in self.ctx.vcpus {
            let (ack, parked) = sync_channel(1);
            if !vcpu.request(VcpuRequest::Pause(ack)) {
                return Err(self.exited());
            }
            acks.push((vcpu.index(), parked));
        }
        for (vcpu, parked) in acks {
            if let Err(e) = self.wait_parked(vcpu, &parked) {
                if !self.ctx.exit.is_set() {
                    // Do not leave a machine half paused: those that parked run again.
                    self.resume();
                }
                return Err(e);
            }
        }
        tracing::info!("machine paused");
        Ok(())
    }

    fn wait_parked(&self, vcpu: u8, parked: &Receiver<()>) -> Result<(), ControlError> {
        let start = Instant::now();
        loop {
            match parked.recv_timeout(PAUSE_POLL) {
                Ok(()) => return Ok(()),
                Err(RecvTimeoutError::Disconnected) => return Err(self.exited()),
                Err(RecvTimeoutError::Timeout) => {
                    if self.ctx.exit.is_set() {
                        return Err(self.exited());
                    }
                    if start.elapsed() >= PAUSE_TIMEOUT {
                        return Err(ControlError::PauseTimeout {
                            vcpu,
                            timeout: PAUSE_TIMEOUT,
                        });
                    }
                }
            }
        }
    }

    fn resume(&mut self) {
        if !self.paused {
            return;
        }
        for vcpu in self.ctx.vcpus {
            vcpu.request(VcpuRequest::Resume);
        }
        if let Err(e) = add(&self.main, self.devices.as_raw_fd(), TOKEN_DEVICES) {
            tracing::error!(error = %e, "cannot poll devices again after a pause");
        }
        self.paused = false;
        tracing::info!("machine resumed");
    }

    /// Captures the paused machine. The VM's in-kernel devices are read before the vCPUs (see
    /// `vm_state` for why), and each vCPU is read on its own thread.
    fn save(&mut self) -> Result<MachineState, ControlError> {
        if !self.paused {
            return Err(ControlError::NotPaused);
        }
        let vm = InKernelDevices(self.ctx.vm)
            .save()
            .map_err(|e| ControlError::Save(e.into()))?;
        let mut replies = Vec::with_capacity(self.ctx.vcpus.len());
        for vcpu in self.ctx.vcpus {
            let (reply, answer) = sync_channel(1);
            if !vcpu.request(VcpuRequest::Save(reply)) {
                return Err(self.exited());
            }
            replies.push(answer);
        }
        let mut vcpus = Vec::with_capacity(replies.len());
        for answer in replies {
            match answer.recv() {
                Ok(state) => vcpus.push(state.map_err(|e| ControlError::Save(e.into()))?),
                Err(_) => return Err(self.exited()),
            }
        }
        let devices = self.save_devices().map_err(ControlError::Save)?;
        tracing::info!(vcpus = vcpus.len(), "machine state saved");
        Ok(MachineState {
            version: MACHINE_STATE_VERSION,
            mem_bytes: self.ctx.mem_bytes,
            boot: self.ctx.boot,
            vcpu_count: self.ctx.vcpus.len() as u8,
            vcpus,
            vm,
            devices,
        })
    }

    fn save_devices(&self) -> Result<DevicesState, SaveError> {
        let serial = lock(self.ctx.serial).save().map_err(SaveError::Serial)?;
        let i8042 = match lock(self.ctx.i8042).save() {
            Ok(s) => s,
            Err(never) => match never {},
        };
        let vsock = match self.ctx.vsock {
            Some(v) => Some(VsockDeviceState {
                placement: v.place.into(),
                state: lock(&v.handle).save().map_err(SaveError::Vsock)?,
            }),
            None => None,
        };
        let blocks = self
            .ctx
            .blocks
            .iter()
            .map(|b| {
                Ok(BlockDeviceState {
                    placement: b.place.into(),
                    state: lock(&b.handle).save().map_err(SaveError::Block)?,
                })
            })
            .collect::<Result<Vec<_>, SaveError>>()?;
        Ok(DevicesState {
            serial,
            i8042,
            vsock,
            blocks,
        })
    }

    fn device_events(&mut self) -> Result<(), MachineError> {
        let mut events = vec![EpollEvent::default(); 16];
        let n = match self.devices.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(loop_err(e)),
        };
        for event in &events[..n] {
            match event.data() {
                TOKEN_INPUT => self.console_input(),
                TOKEN_INPUT_DRAINED => {
                    lock(self.ctx.serial).clear_input_drained();
                    if self.input_paused {
                        if let Some(fd) = self.input.as_ref().map(|i| i.as_raw_fd()) {
                            add(&self.devices, fd, TOKEN_INPUT).map_err(loop_err)?;
                        }
                        self.input_paused = false;
                    }
                }
                token if token >= TOKEN_VIRTIO => {
                    let d = ((token - TOKEN_VIRTIO) / VIRTIO_TOKENS) as usize;
                    let slot = (token - TOKEN_VIRTIO) % VIRTIO_TOKENS;
                    let Some(device) = self.ctx.virtio.get(d) else {
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
        Ok(())
    }

    fn console_input(&mut self) {
        let Some(source) = self.input.as_mut() else {
            return;
        };
        let mut uart = lock(self.ctx.serial);
        let room = uart.input_capacity();
        let fd = source.as_raw_fd();
        if room == 0 {
            // Stop polling input until the guest drains its FIFO.
            let _ = self
                .devices
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.input_paused = true;
            return;
        }
        let mut buf = vec![0u8; room];
        match source.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = self
                    .devices
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                self.input = None;
            }
            Ok(n) => {
                uart.push_input(&buf[..n]);
            }
        }
    }
}

//! Machine-level restore → save → compare on real KVM: a machine saved while paused (state S1),
//! restored into a fresh shell and saved again before its guest can change anything (S2), gives
//! the same state-blob encoding, clocks aside. The guest sets registers, programs COM1, writes
//! memory and halts with interrupts off; console input waits in the UART's receive FIFO; a vsock
//! device sits unconfigured; the second vCPU waits for a SIPI. So every part of the state holds
//! something of its own, and a part that restore or save loses shows up by name.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::state_diff::differences;
use super::*;
use crate::persist_conformance::{decode, encode};
use crate::test_support::{
    MSR_IA32_TSC, fill_shell, mask_vcpu_clock, mask_vm_clock, require_kvm, tiny_config, tiny_elf,
};

/// What the guest puts in r12 and at [`MARK_ADDR`].
const MARK: u64 = 0x1122_3344_5566_7788;
const MARK_ADDR: u64 = 0x20_0000;
/// The console input that waits in the receive FIFO.
const INPUT: &[u8] = b"thaw";

/// Sets r12 and rbx, stores r12 in memory, programs COM1 (scratch 0x5a, divisor 3, 8E1,
/// DTR and RTS), then `cli; hlt` forever: once halted, only the clocks move.
fn settling_guest() -> Vec<u8> {
    let mut code = vec![0x49, 0xbc]; // mov r12, MARK
    code.extend_from_slice(&MARK.to_le_bytes());
    code.extend_from_slice(&[0x48, 0xbb]); // mov rbx, imm64
    code.extend_from_slice(&0x0123_4567_89ab_cdef_u64.to_le_bytes());
    code.extend_from_slice(&[0x4c, 0x89, 0x24, 0x25]); // mov [MARK_ADDR], r12
    code.extend_from_slice(&(MARK_ADDR as u32).to_le_bytes());
    for (port, value) in [
        (0x3ffu16, 0x5au8), // scratch
        (0x3fb, 0x80),      // LCR: DLAB on
        (0x3f8, 0x03),      // divisor low
        (0x3f9, 0x00),      // divisor high
        (0x3fb, 0x1b),      // LCR: 8 data bits, even parity, DLAB off
        (0x3fc, 0x03),      // MCR: DTR, RTS
    ] {
        code.extend_from_slice(&[0x66, 0xba]); // mov dx, port
        code.extend_from_slice(&port.to_le_bytes());
        code.extend_from_slice(&[0xb0, value, 0xee]); // mov al, value; out dx, al
    }
    code.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]); // cli; hlt; jmp back to hlt
    code
}

/// A machine running on its own thread. Every controller call of this file is a method here,
/// so a change of the controller's API changes this block only.
struct Running {
    mem: GuestMemory,
    control: MachineController,
    paused: Option<Paused>,
    thread: JoinHandle<Result<ExitReason, MachineError>>,
}

impl Running {
    fn start(machine: Machine, input: Option<ConsoleInput>) -> Self {
        let mem = machine.memory().clone();
        let control = machine.controller();
        let thread = std::thread::spawn(move || machine.run(input));
        Self {
            mem,
            control,
            paused: None,
            thread,
        }
    }

    /// Pauses the machine and saves it; it stays paused.
    fn pause_and_save(&mut self) -> MachineState {
        let paused = self.control.pause().unwrap();
        let state = paused.save().unwrap();
        self.paused = Some(paused);
        state
    }

    fn resume(&mut self) {
        if let Some(paused) = self.paused.take() {
            paused.resume().unwrap();
        }
    }

    fn stop(mut self) {
        self.control.stop();
        drop(self.paused.take());
        assert_eq!(self.thread.join().unwrap().unwrap(), ExitReason::Stopped);
    }
}

/// Saves `run` once its guest sits in `hlt` with the console input received.
fn settled_state(run: &mut Running) -> MachineState {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = run.pause_and_save();
        let halted = state.vcpus[0].mp_state.mp_state == kvm_bindings::KVM_MP_STATE_HALTED;
        if halted && state.devices.serial.rx_fifo == INPUT {
            return state;
        }
        assert!(Instant::now() < deadline, "the guest never settled");
        run.resume();
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn tsc(state: &MachineState, vcpu: usize) -> u64 {
    let msrs = &state.vcpus[vcpu].msrs;
    msrs.iter()
        .find(|m| m.index == MSR_IA32_TSC)
        .map_or(0, |m| m.data)
}

/// A copy of `state` without what moves by itself, after checking that it moved forward only.
fn without_clocks(state: &MachineState, earlier: Option<&MachineState>) -> MachineState {
    if let Some(earlier) = earlier {
        let ns = state.vm.clock.clock.wrapping_sub(earlier.vm.clock.clock);
        assert!(ns < 60_000_000_000, "kvmclock moved by {ns} ns");
        for vcpu in 0..state.vcpus.len() {
            let (before, now) = (tsc(earlier, vcpu), tsc(state, vcpu));
            assert!(
                now >= before,
                "vCPU {vcpu}'s TSC went back: {before} to {now}"
            );
        }
    }
    let mut copy: MachineState = decode(&encode(state));
    copy.vcpus.iter_mut().for_each(mask_vcpu_clock);
    mask_vm_clock(&mut copy.vm);
    copy
}

#[test]
fn restored_machine_saves_the_state_it_was_restored_from() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(tiny_elf(0x10_0000, &settling_guest()), 2);
    config.vsock = Some(VsockConfig {
        guest_cid: 9,
        uds_path: dir.path().join("first.sock"),
    });
    let (input, mut feed) = UnixStream::pair().unwrap();
    feed.write_all(INPUT).unwrap();
    let machine = Machine::create(&config, Box::new(std::io::sink())).unwrap();
    let mut first = Running::start(machine, Some(Box::new(input)));
    let s1 = settled_state(&mut first);
    // What is compared below is not a blank machine.
    assert_eq!(s1.vcpus[0].regs.r12, MARK, "r12 as the guest set it");
    assert_eq!(s1.devices.serial.scratch, 0x5a, "COM1's scratch register");
    assert_eq!(s1.devices.serial.line_control, 0x1b, "COM1's LCR");
    let vsock = s1.devices.vsock.as_ref().expect("a vsock device state");
    assert_eq!(vsock.state.device.guest_cid, 9, "the vsock CID");
    assert_eq!(
        s1.vcpus[1].mp_state.mp_state,
        kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
        "vCPU 1 waits for a SIPI"
    );

    // S1 travels as the snapshot's state section would; memory as the snapshot's chunks would.
    let s1_bytes = encode(&s1);
    let mut shell = MachineShell::create(ShellSpec {
        mem_bytes: s1.mem_bytes,
        vcpus: s1.vcpu_count,
    })
    .unwrap();
    fill_shell(&mut shell, &first.mem);
    first.stop();
    let restore_config = RestoreConfig {
        vsock_uds_path: Some(dir.path().join("restored.sock")),
        disks: Vec::new(),
    };
    let restored = Machine::restore_in(
        shell,
        restore_config,
        Box::new(std::io::sink()),
        &decode(&s1_bytes),
    )
    .unwrap();
    let mut second = Running::start(restored, None);
    let s2 = second.pause_and_save();
    second.stop();

    let (s1, s2) = (without_clocks(&s1, None), without_clocks(&s2, Some(&s1)));
    let found = differences(&s1, &s2);
    assert!(
        found.is_empty(),
        "restore → save changed the machine state (S1 vs S2):\n  {}",
        found.join("\n  ")
    );
    assert!(encode(&s1) == encode(&s2));
}

//! Pause, save, resume and restore of whole machines on real KVM, with a tiny guest that counts:
//! the proof that a restored machine continues where the saved one stopped, and that a
//! [`Paused`] guard keeps it paused (one guard at a time; dropping it resumes).

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::test_support::{Capture, fill_shell, require_kvm, tiny_elf};

/// The guest's memory counter.
const COUNTER: u64 = 0x20_0000;
/// The count at which the guest stops; the host sets it.
const TARGET: u64 = 0x20_0008;
/// What the guest exits with when its register and memory counters agree.
const AGREE: u8 = 42;

/// Counts in r12 and in memory at [`COUNTER`] until r12 reaches the value at [`TARGET`],
/// printing a '.' to COM1 every 1024 steps, then exits with [`AGREE`] if both counts are equal
/// (1 otherwise). A restore that lost registers or memory shows up as exit code 1.
fn counting_guest() -> Vec<u8> {
    vec![
        0x45, 0x31, 0xe4, // xor r12d, r12d
        // loop:
        0x49, 0xff, 0xc4, // inc r12
        0x48, 0xff, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, // inc qword [0x200000]
        0x41, 0xf7, 0xc4, 0xff, 0x03, 0x00, 0x00, // test r12d, 0x3ff
        0x75, 0x07, // jnz check
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'.', 0xee, // mov al, '.'; out dx, al
        // check:
        0x4c, 0x3b, 0x24, 0x25, 0x08, 0x00, 0x20, 0x00, // cmp r12, [0x200008]
        0x72, 0xdb, // jb loop
        0xb0, 0x01, // mov al, 1
        0x4c, 0x3b, 0x24, 0x25, 0x00, 0x00, 0x20, 0x00, // cmp r12, [0x200000]
        0x75, 0x02, // jne done
        0xb0, AGREE, // mov al, 42
        // done:
        0x66, 0xba, 0x01, 0x05, // mov dx, 0x501
        0xee, // out dx, al
        0xf4, // hlt
    ]
}

fn config(image: Vec<u8>, vcpus: u8) -> MachineConfig {
    crate::test_support::tiny_config(image, vcpus)
}

fn read_u64(mem: &GuestMemory, addr: u64) -> u64 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn write_u64(mem: &GuestMemory, addr: u64, value: u64) {
    mem.write_obj(value, GuestAddress(addr)).unwrap();
}

struct Running {
    mem: GuestMemory,
    control: MachineController,
    thread: JoinHandle<Result<ExitReason, MachineError>>,
}

fn start(machine: Machine) -> Running {
    let mem = machine.memory().clone();
    let control = machine.controller();
    let thread = std::thread::spawn(move || machine.run(None));
    Running {
        mem,
        control,
        thread,
    }
}

/// Waits until the guest's counter passes `value`.
fn wait_for_count(mem: &GuestMemory, value: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = read_u64(mem, COUNTER);
        if now > value {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "guest stuck at {now}, waiting for {value}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The value at guest address `addr` as guest memory slices show it.
fn read_u64_in(regions: &[(u64, &[u8])], addr: u64) -> u64 {
    let (start, bytes) = regions
        .iter()
        .find(|(start, bytes)| addr >= *start && addr + 8 <= start + bytes.len() as u64)
        .unwrap();
    let at = (addr - start) as usize;
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// Guest memory is copied in chunks of this size; chunks of zeros are left out, so untouched
/// memory stays unallocated in the copy too.
const CHUNK: usize = 1 << 20;

/// A copy of the paused machine's memory, read in place through its guard, in fresh guest
/// memory (as a snapshot's memory file would provide it).
fn copy_paused(paused: &Paused) -> GuestMemory {
    let regions = paused.memory();
    let mem_bytes = regions.iter().map(|(_, b)| b.len() as u64).sum();
    let copy = memory::create_guest_memory(mem_bytes).unwrap();
    for (addr, bytes) in &regions {
        for (n, part) in bytes.chunks(CHUNK).enumerate() {
            if part.iter().any(|&b| b != 0) {
                let at = addr + (n * CHUNK) as u64;
                copy.write_slice(part, GuestAddress(at)).unwrap();
            }
        }
    }
    copy
}

/// A fresh shell of `vcpus` vCPUs whose memory holds what `mem` holds, filled in place.
fn shell_holding(mem: &GuestMemory, vcpus: u8) -> MachineShell {
    let mut shell = MachineShell::create(ShellSpec {
        mem_bytes: memory::total_bytes(mem),
        vcpus,
    })
    .unwrap();
    fill_shell(&mut shell, mem);
    shell
}

/// Writes `value` at guest address `addr` of `shell`'s memory.
fn write_u64_in(shell: &mut MachineShell, addr: u64, value: u64) {
    let (start, bytes) = shell
        .ram_mut()
        .into_iter()
        .find(|(start, bytes)| addr >= *start && addr + 8 <= start + bytes.len() as u64)
        .unwrap();
    let at = (addr - start) as usize;
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

#[test]
fn restored_machine_continues_counting_where_the_saved_one_stopped() {
    if !require_kvm() {
        return;
    }
    // Two vCPUs: the boot CPU counts, the other waits for a SIPI that never comes, which puts
    // a second run state through save and restore.
    let machine = Machine::create(
        &config(tiny_elf(0x10_0000, &counting_guest()), 2),
        Box::new(std::io::sink()),
    )
    .unwrap();
    write_u64(machine.memory(), TARGET, u64::MAX);
    let first = start(machine);
    wait_for_count(&first.mem, 3000);

    let paused = first.control.pause().unwrap();
    let paused_at = read_u64(&first.mem, COUNTER);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        read_u64(&first.mem, COUNTER),
        paused_at,
        "a paused guest does not run"
    );
    let state = paused.save().unwrap();
    // Memory read in place through the guard, as a snapshot reads it.
    assert_eq!(read_u64_in(&paused.memory(), COUNTER), paused_at);
    let saved_memory = copy_paused(&paused);
    // Stopped while paused: the guard outlives the machine, still reads its memory, and
    // resumes nothing.
    first.control.stop();
    assert_eq!(first.thread.join().unwrap().unwrap(), ExitReason::Stopped);
    assert_eq!(read_u64_in(&paused.memory(), COUNTER), paused_at);
    assert!(matches!(
        paused.resume(),
        Err(ControlError::Exited {
            reason: Some(ExitReason::Stopped)
        })
    ));
    assert_eq!(state.vcpus.len(), 2);
    // The pause can fall between the two increments: r12 may be one ahead, never more.
    let r12 = state.vcpus[0].regs.r12;
    assert!(
        r12 == paused_at || r12 == paused_at + 1,
        "r12 {r12}, memory {paused_at}"
    );

    // Through the snapshot's state encoding, as the snapshot file carries it.
    let state: MachineState =
        crate::persist_conformance::decode(&crate::persist_conformance::encode(&state));

    // Restored into a shell built before its memory was filled, as a platform builds them
    // ahead of restores. Shells of another size are refused first.
    let spec = ShellSpec {
        mem_bytes: state.mem_bytes,
        vcpus: 2,
    };
    for wrong in [
        ShellSpec { vcpus: 1, ..spec },
        ShellSpec {
            mem_bytes: spec.mem_bytes * 2,
            ..spec
        },
    ] {
        let refused = Machine::restore_in(
            MachineShell::create(wrong).unwrap(),
            RestoreConfig::default(),
            Box::new(std::io::sink()),
            &state,
        );
        assert!(
            matches!(
                refused,
                Err(MachineError::Restore(
                    RestoreError::ShellMismatch { .. }
                        | RestoreError::Invalid(StateError::MemorySize { .. })
                ))
            ),
            "{wrong:?}: {:?}",
            refused.err()
        );
    }
    // Filled in place, as an eager restore fills it.
    let mut shell = MachineShell::create(spec).unwrap();
    fill_shell(&mut shell, &saved_memory);
    // Asked what the host offers first, as a process's first restore asks (its host check):
    // the same answer as a scratch VM's, and the restored vCPU still runs the saved CPUID.
    let offered = shell.effective_cpuid().unwrap();
    let scratch = crate::cpuid::effective(&crate::kvm::open().unwrap()).unwrap();
    let fields = |c: &kvm_bindings::CpuId| -> Vec<_> {
        c.as_slice().iter().map(crate::cpuid::fields).collect()
    };
    assert_eq!(fields(&offered), fields(&scratch));
    let steps = 2048;
    write_u64_in(&mut shell, TARGET, paused_at + steps);
    let out = Capture::default();
    let restored = Machine::restore_in(
        shell,
        RestoreConfig::default(),
        Box::new(out.clone()),
        &state,
    )
    .unwrap();
    let second = start(restored);
    let reason = second.thread.join().unwrap().unwrap();
    assert_eq!(
        reason,
        ExitReason::GuestExit(AGREE),
        "register and memory counts disagree"
    );
    assert_eq!(read_u64(&second.mem, COUNTER), paused_at + steps);
    // The restored guest printed its progress for the steps it took after the restore.
    let dots = out.text().chars().filter(|&c| c == '.').count() as u64;
    let expected = (paused_at + steps) / 1024 - paused_at / 1024;
    // (One more if the pause fell between a step's increments and its '.'.)
    assert!(
        dots == expected || dots == expected + 1,
        "{dots} dots, expected {expected}: {:?}",
        out.text()
    );
}

#[test]
fn many_pauses_and_resumes_lose_no_progress() {
    if !require_kvm() {
        return;
    }
    let machine = Machine::create(
        &config(tiny_elf(0x10_0000, &counting_guest()), 1),
        Box::new(std::io::sink()),
    )
    .unwrap();
    write_u64(machine.memory(), TARGET, u64::MAX);
    let run = start(machine);
    wait_for_count(&run.mem, 100);
    for round in 0..20 {
        let paused = run.control.pause().unwrap();
        let at = read_u64(&run.mem, COUNTER);
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(read_u64(&run.mem, COUNTER), at);
        let state = paused.save().unwrap();
        let r12 = state.vcpus[0].regs.r12;
        assert!(r12 == at || r12 == at + 1, "r12 {r12}, memory {at}");
        assert_eq!(read_u64_in(&paused.memory(), COUNTER), at);
        // Resumed either way: explicitly, or by dropping the guard.
        if round % 2 == 0 {
            paused.resume().unwrap();
        } else {
            drop(paused);
        }
        wait_for_count(&run.mem, at + 10);
    }
    let now = read_u64(&run.mem, COUNTER);
    write_u64(&run.mem, TARGET, now + 100);
    assert_eq!(
        run.thread.join().unwrap().unwrap(),
        ExitReason::GuestExit(AGREE)
    );
}

#[test]
fn a_second_pause_is_refused_while_a_guard_lives_and_dropping_the_guard_resumes() {
    if !require_kvm() {
        return;
    }
    let machine = Machine::create(
        &config(tiny_elf(0x10_0000, &counting_guest()), 1),
        Box::new(std::io::sink()),
    )
    .unwrap();
    write_u64(machine.memory(), TARGET, u64::MAX);
    let run = start(machine);
    wait_for_count(&run.mem, 100);

    let paused = run.control.pause().unwrap();
    // Refused from this controller and from a clone on another thread alike, without asking
    // the event loop (which would answer a pause of a paused machine with success).
    assert!(matches!(
        run.control.pause(),
        Err(ControlError::AlreadyPaused)
    ));
    let other = run.control.clone();
    let refused = within_seconds(move || other.pause().map(drop));
    assert!(
        matches!(refused, Err(ControlError::AlreadyPaused)),
        "{refused:?}"
    );
    run.control.check_alive().unwrap();
    // The refusals resumed nothing.
    let at = read_u64(&run.mem, COUNTER);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(read_u64(&run.mem, COUNTER), at, "the guest stays paused");
    paused.save().unwrap();

    // Dropping the guard resumes the guest, and a new pause is allowed.
    drop(paused);
    wait_for_count(&run.mem, at + 10);
    let again = run.control.pause().unwrap();
    let now = read_u64(&run.mem, COUNTER);
    write_u64(&run.mem, TARGET, now + 100);
    drop(again);
    assert_eq!(
        run.thread.join().unwrap().unwrap(),
        ExitReason::GuestExit(AGREE)
    );
}

/// Runs `f` on another thread and fails if it takes longer than a few seconds (a hang).
fn within_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("a controller request hung")
}

#[test]
fn requests_after_the_machine_exited_fail_instead_of_hanging() {
    if !require_kvm() {
        return;
    }
    // out 7 to the debug-exit port right away.
    let exit_now = vec![0x66, 0xba, 0x01, 0x05, 0xb0, 7, 0xee, 0xf4];
    let machine = Machine::create(
        &config(tiny_elf(0x10_0000, &exit_now), 1),
        Box::new(std::io::sink()),
    )
    .unwrap();
    let control = machine.controller();
    assert_eq!(machine.run(None).unwrap(), ExitReason::GuestExit(7));
    let c = control.clone();
    let paused = within_seconds(move || c.pause());
    assert!(
        matches!(
            paused,
            Err(ControlError::Exited {
                reason: Some(ExitReason::GuestExit(7))
            })
        ),
        "{paused:?}"
    );
    assert!(matches!(
        control.check_alive(),
        Err(ControlError::Exited { .. })
    ));

    // A guard whose machine ends: saving fails instead of hanging, its memory stays readable,
    // and dropping it does nothing. (Resuming one fails too: see the first test.)
    let machine = Machine::create(
        &config(tiny_elf(0x10_0000, &counting_guest()), 1),
        Box::new(std::io::sink()),
    )
    .unwrap();
    write_u64(machine.memory(), TARGET, u64::MAX);
    let run = start(machine);
    wait_for_count(&run.mem, 100);
    let paused = run.control.pause().unwrap();
    let at = read_u64(&run.mem, COUNTER);
    run.control.stop();
    assert_eq!(run.thread.join().unwrap().unwrap(), ExitReason::Stopped);
    let (paused, saved) = within_seconds(move || {
        let saved = paused.save();
        (paused, saved)
    });
    assert!(
        matches!(saved, Err(ControlError::Exited { .. })),
        "{saved:?}"
    );
    assert_eq!(read_u64_in(&paused.memory(), COUNTER), at);
    within_seconds(move || drop(paused));
    let c = run.control.clone();
    assert!(matches!(
        within_seconds(move || c.pause()),
        Err(ControlError::Exited { .. })
    ));

    // A machine dropped without running answers too.
    let machine = Machine::create(
        &config(tiny_elf(0x10_0000, &exit_now), 1),
        Box::new(std::io::sink()),
    )
    .unwrap();
    let control = machine.controller();
    let waiting = std::thread::spawn(move || control.pause());
    std::thread::sleep(Duration::from_millis(50));
    drop(machine);
    assert!(matches!(
        waiting.join().unwrap(),
        Err(ControlError::Exited { .. })
    ));
}

#[test]
fn a_guest_exiting_while_pausing_is_an_exit_not_a_hang() {
    if !require_kvm() {
        return;
    }
    let machine = Machine::create(
        &config(tiny_elf(0x10_0000, &counting_guest()), 1),
        Box::new(std::io::sink()),
    )
    .unwrap();
    write_u64(machine.memory(), TARGET, 1 << 14);
    let run = start(machine);
    // Pause over and over while the guest runs to its end: each pause either parks it or
    // reports that it exited; none hangs.
    let mut exited = false;
    for _ in 0..100_000 {
        match run.control.pause() {
            Ok(paused) => paused.resume().unwrap(),
            Err(ControlError::Exited { reason }) => {
                assert_eq!(reason, Some(ExitReason::GuestExit(AGREE)));
                exited = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(exited);
    assert_eq!(
        run.thread.join().unwrap().unwrap(),
        ExitReason::GuestExit(AGREE)
    );
}

/// A saved state of a halted single-vCPU machine with a vsock device.
fn saved_vsock_machine(dir: &std::path::Path) -> (MachineState, GuestMemory) {
    let mut cfg = config(tiny_elf(0x10_0000, &[0xfa, 0xf4, 0xeb, 0xfd]), 1);
    cfg.vsock = Some(crate::config::VsockConfig {
        guest_cid: 5,
        uds_path: dir.join("first.sock"),
    });
    let run = start(Machine::create(&cfg, Box::new(std::io::sink())).unwrap());
    // Saved once the guest sits in its `hlt`, so a restored copy has nothing left to run and
    // saves the same registers again.
    let (state, mem) = loop {
        let paused = run.control.pause().unwrap();
        let state = paused.save().unwrap();
        if state.vcpus[0].mp_state.mp_state == kvm_bindings::KVM_MP_STATE_HALTED {
            break (state, copy_paused(&paused));
        }
        paused.resume().unwrap();
        std::thread::sleep(Duration::from_millis(10));
    };
    run.control.stop();
    assert_eq!(run.thread.join().unwrap().unwrap(), ExitReason::Stopped);
    (state, mem)
}

#[test]
fn restore_checks_the_state_against_the_memory_and_config() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (state, mem) = saved_vsock_machine(dir.path());
    let vsock = state.devices.vsock.as_ref().unwrap();
    assert_eq!(vsock.state.device.guest_cid, 5);
    assert_eq!(vsock.placement, state::virtio_placement(0));
    let config = || RestoreConfig {
        vsock_uds_path: Some(dir.path().join("restored.sock")),
        disks: Vec::new(),
    };
    let restore = |state: &MachineState, shell: MachineShell, config: RestoreConfig| {
        Machine::restore_in(shell, config, Box::new(std::io::sink()), state).err()
    };
    let copy = || shell_holding(&mem, 1);
    let invalid = |e: Option<MachineError>| match e {
        Some(MachineError::Restore(RestoreError::Invalid(e))) => e,
        other => panic!("expected an invalid state, got {other:?}"),
    };

    let mut two = state.clone();
    two.vcpu_count = 2;
    assert!(matches!(
        invalid(restore(&two, copy(), config())),
        StateError::VcpuMismatch {
            expected: 2,
            found: 1
        }
    ));
    let mut extra = state.clone();
    extra.vcpus.push(extra.vcpus[0].clone());
    assert!(matches!(
        invalid(restore(&extra, copy(), config())),
        StateError::VcpuMismatch { .. }
    ));
    let mut none = state.clone();
    none.vcpus.clear();
    assert!(matches!(
        invalid(restore(&none, copy(), config())),
        StateError::VcpuCount { count: 0 }
    ));
    let bigger = MachineShell::create(ShellSpec {
        mem_bytes: 256 << 20,
        vcpus: 1,
    })
    .unwrap();
    assert!(matches!(
        invalid(restore(&state, bigger, config())),
        StateError::MemorySize { .. }
    ));
    let mut version = state.clone();
    version.version += 1;
    assert!(matches!(
        invalid(restore(&version, copy(), config())),
        StateError::Version { .. }
    ));
    let mut moved = state.clone();
    if let Some(v) = moved.devices.vsock.as_mut() {
        v.placement.irq = 9;
    }
    assert!(matches!(
        invalid(restore(&moved, copy(), config())),
        StateError::VirtioPlacement { .. }
    ));
    assert!(matches!(
        restore(&state, copy(), RestoreConfig::default()),
        Some(MachineError::Restore(RestoreError::VsockPathMissing))
    ));

    // The untouched state restores, with the vsock device listening on its new path.
    let restored =
        Machine::restore_in(copy(), config(), Box::new(std::io::sink()), &state).unwrap();
    assert!(dir.path().join("restored.sock").exists());
    let vsock = restored.vsock().unwrap();
    assert_eq!(lock(&vsock).device().config().guest_cid, 5);
    drop(vsock);
    let run = start(restored);
    let paused = run.control.pause().unwrap();
    let again = paused.save().unwrap();
    assert_eq!(again.devices, state.devices);
    assert_eq!(again.vcpus[0].regs, state.vcpus[0].regs);
    assert_eq!(again.vcpus[0].sregs, state.vcpus[0].sregs);
    run.control.stop();
    assert_eq!(run.thread.join().unwrap().unwrap(), ExitReason::Stopped);
}

/// A machine with a vsock device and two disks saves them at their places (vsock first), and
/// restores only with one disk of the right size per saved block device: a clone restored
/// onto a copy-on-write view of the disk saves the same devices again.
#[test]
fn disks_are_saved_in_order_and_restored_onto_disks_of_their_size() {
    use crate::config::DiskConfig;
    use crate::devices::block::{CowDisk, Disk, RawDisk};

    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let code = dir.path().join("code.img");
    let scratch = dir.path().join("tmp.img");
    std::fs::write(&code, vec![7u8; 1 << 20]).unwrap();
    std::fs::File::create(&scratch)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let mut cfg = config(tiny_elf(0x10_0000, &[0xfa, 0xf4, 0xeb, 0xfd]), 1);
    cfg.vsock = Some(crate::config::VsockConfig {
        guest_cid: 5,
        uds_path: dir.path().join("first.sock"),
    });
    cfg.disks = vec![
        DiskConfig {
            path: code.clone(),
            read_only: true,
            id: "code".into(),
        },
        DiskConfig {
            path: scratch.clone(),
            read_only: false,
            id: "tmp".into(),
        },
    ];
    let run = start(Machine::create(&cfg, Box::new(std::io::sink())).unwrap());
    let paused = run.control.pause().unwrap();
    let state = paused.save().unwrap();
    let mem = copy_paused(&paused);
    run.control.stop();
    assert_eq!(run.thread.join().unwrap().unwrap(), ExitReason::Stopped);

    let blocks = &state.devices.blocks;
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0].placement, state::virtio_placement(1));
    assert_eq!(blocks[1].placement, state::virtio_placement(2));
    assert_eq!(blocks[0].state.device.capacity_sectors, 2048);
    assert!(blocks[0].state.device.read_only);
    assert_eq!(blocks[1].state.device.capacity_sectors, 8192);
    assert_eq!(&blocks[1].state.device.id[..4], b"tmp\0");

    let open = |path: &std::path::Path| std::fs::File::open(path).unwrap();
    // The code disk as it is; the scratch disk behind this clone's own overlay.
    let disks = || -> Vec<Box<dyn Disk>> {
        vec![
            Box::new(RawDisk::new(open(&code)).unwrap()),
            Box::new(CowDisk::with_private_overlay(open(&scratch), dir.path()).unwrap()),
        ]
    };
    let restore = |disks: Vec<Box<dyn Disk>>| {
        Machine::restore_in(
            shell_holding(&mem, 1),
            RestoreConfig {
                vsock_uds_path: Some(dir.path().join(format!("r{}.sock", disks.len()))),
                disks,
            },
            Box::new(std::io::sink()),
            &state,
        )
    };
    // One disk short, and a disk of another size, are refused before anything runs.
    let mut one = disks();
    one.pop();
    assert!(matches!(
        restore(one).err(),
        Some(MachineError::Restore(RestoreError::DiskCount {
            saved: 2,
            given: 1
        }))
    ));
    let mut wrong = disks();
    wrong[1] = Box::new(RawDisk::new(open(&code)).unwrap());
    assert!(matches!(
        restore(wrong).err(),
        Some(MachineError::Restore(RestoreError::Block { index: 1, .. }))
    ));

    let restored = restore(disks()).unwrap();
    let run = start(restored);
    let paused = run.control.pause().unwrap();
    let again = paused.save().unwrap();
    assert_eq!(again.devices, state.devices);
    run.control.stop();
    assert_eq!(run.thread.join().unwrap().unwrap(), ExitReason::Stopped);
}

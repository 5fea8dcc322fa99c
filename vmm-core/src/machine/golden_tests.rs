//! Golden bytes of the machine state: a [`MachineState`] built here from fixed values (every
//! vCPU part, the VM's in-kernel devices and every device, with distinctive non-zero fields;
//! each `Option` and `FpuState` form present once), encoded with the snapshot's state-blob
//! encoding (`snapshot::state_blob`, what the state section of a snapshot holds), is compared
//! byte for byte with `vmm-core/tests/golden/machine-state-v<MACHINE_STATE_VERSION>.bin`, and the
//! golden file decodes to the same value.
//!
//! Within one `MACHINE_STATE_VERSION` these bytes must not change (docs/snapshot-format.md,
//! "Compatibility"). A layout change bumps the version, and `THAW_BLESS=1` then writes the new
//! version's golden next to the old ones; `THAW_BLESS=overwrite` rewrites an existing golden
//! and is only for changes to the fixed values below, never to the layout.

use std::path::{Path, PathBuf};

use kvm_bindings::{
    KVM_MP_STATE_HALTED, KVM_MP_STATE_UNINITIALIZED, kvm_clock_data, kvm_cpuid_entry2,
    kvm_debugregs, kvm_dtable, kvm_ioapic_state, kvm_ioapic_state__bindgen_ty_1, kvm_irqchip,
    kvm_lapic_state, kvm_mp_state, kvm_pic_state, kvm_pit_state2, kvm_regs, kvm_segment, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs,
};

use super::state::{
    BlockDeviceState, BootState, DevicesState, MACHINE_STATE_VERSION, MachineState,
    VsockDeviceState, virtio_placement,
};
use super::state_diff::differences;
use crate::boot::KernelFormat;
use crate::devices::block::persist::BlockState;
use crate::devices::legacy::I8042State;
use crate::devices::serial::SerialConsoleState;
use crate::devices::virtio::mmio::{MmioRegisters, QueueSnapshot, VirtioMmioState};
use crate::devices::vsock::persist::VsockState;
use crate::persist_conformance::{encode, first_difference};
use crate::vcpu::state::{FpuRegs, FpuState, MsrValue, VcpuState, XSAVE_LEGACY_WORDS};
use crate::vm_state::VmState;

/// A distinctive non-zero 64-bit value for field number `n`.
fn v(n: u64) -> u64 {
    0x5100_0000_0000_0000 | (n << 40) | (n << 8) | n
}

fn segment(n: u64) -> kvm_segment {
    kvm_segment {
        base: v(n),
        limit: 0xffff_f000 | n as u32,
        selector: 0x08 * n as u16,
        type_: 0xb,
        present: 1,
        dpl: 3,
        db: 1,
        s: 1,
        l: 1,
        g: 1,
        avl: 1,
        unusable: 0,
        padding: 0,
    }
}

fn regs(i: u64) -> kvm_regs {
    kvm_regs {
        rax: v(i + 1),
        rbx: v(i + 2),
        rcx: v(i + 3),
        rdx: v(i + 4),
        rsi: v(i + 5),
        rdi: v(i + 6),
        rsp: v(i + 7),
        rbp: v(i + 8),
        r8: v(i + 9),
        r9: v(i + 10),
        r10: v(i + 11),
        r11: v(i + 12),
        r12: v(i + 13),
        r13: v(i + 14),
        r14: v(i + 15),
        r15: v(i + 16),
        rip: 0x10_0000 + i,
        rflags: 0x246,
    }
}

fn sregs(i: u64) -> kvm_sregs {
    let table = |n: u64| kvm_dtable {
        base: v(n),
        limit: 0x7ff,
        padding: [0; 3],
    };
    kvm_sregs {
        cs: segment(i + 20),
        ds: segment(i + 21),
        es: segment(i + 22),
        fs: segment(i + 23),
        gs: segment(i + 24),
        ss: segment(i + 25),
        tr: segment(i + 26),
        ldt: segment(i + 27),
        gdt: table(i + 28),
        idt: table(i + 29),
        cr0: 0x8005_0033,
        cr2: v(i + 30),
        cr3: 0x9000 + (i << 12),
        cr4: 0x0036_06a0,
        cr8: 2,
        efer: 0xd01,
        apic_base: 0xfee0_0900,
        interrupt_bitmap: [0, 1 << 3, 0, v(i + 31)],
    }
}

fn cpuid(i: u32) -> Vec<kvm_cpuid_entry2> {
    (0..2)
        .map(|n| kvm_cpuid_entry2 {
            function: n,
            index: i,
            flags: 1,
            eax: 0x0d + n,
            ebx: 0x6874_7541 ^ i,
            ecx: 0x444d_4163,
            edx: 0x6974_6e65,
            padding: [0; 3],
        })
        .collect()
}

fn lapic(i: u8) -> kvm_lapic_state {
    let mut lapic = kvm_lapic_state { regs: [0; 1024] };
    for (n, reg) in lapic.regs.iter_mut().enumerate() {
        *reg = (n as u8).wrapping_mul(7).wrapping_add(i) as std::os::raw::c_char;
    }
    lapic.regs[0x23] = i as std::os::raw::c_char; // APIC id, bits 31:24
    lapic
}

fn msrs(i: u64) -> Vec<MsrValue> {
    [
        0x10,
        0x6e0,
        0xc000_0081,
        0xc000_0082,
        0xc000_0102,
        0x4b56_4d01,
    ]
    .into_iter()
    .enumerate()
    .map(|(n, index)| MsrValue {
        index,
        data: v(i + 40 + n as u64),
    })
    .collect()
}

/// vCPU 0: XSAVE2 form and every optional part present.
fn vcpu0() -> VcpuState {
    let mut events = kvm_vcpu_events::default();
    events.exception.injected = 1;
    events.exception.nr = 14;
    events.exception.has_error_code = 1;
    events.exception.error_code = 0x6;
    events.interrupt.nr = 0x31;
    events.interrupt.shadow = 1;
    events.nmi.pending = 1;
    events.nmi.masked = 1;
    events.sipi_vector = 0x9a;
    events.flags = 0x1f;
    events.smi.latched_init = 1;
    events.exception_has_payload = 1;
    events.exception_payload = v(60);
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].value = 0x7;
    let words = XSAVE_LEGACY_WORDS + 16;
    VcpuState {
        index: 0,
        cpuid: cpuid(0),
        tsc_khz: Some(2_345_678),
        regs: regs(0),
        sregs: sregs(0),
        fpu: FpuState::Xsave2 {
            region: (0..words as u32)
                .map(|w| w.wrapping_mul(0x0101_0101) ^ 0xa5a5_0000)
                .collect(),
        },
        xcrs: Some(xcrs),
        debugregs: Some(kvm_debugregs {
            db: [v(61), v(62), v(63), v(64)],
            dr6: 0xffff_0ff0,
            dr7: 0x400,
            flags: 0,
            reserved: [0; 9],
        }),
        lapic: lapic(0),
        msrs: msrs(0),
        vcpu_events: Some(events),
        mp_state: kvm_mp_state {
            mp_state: KVM_MP_STATE_HALTED,
        },
    }
}

/// vCPU 1: the legacy FPU form, and none of the optional parts.
fn vcpu1() -> VcpuState {
    let mut fpu = FpuRegs {
        fcw: 0x37f,
        fsw: 0x3800,
        ftwx: 0x81,
        last_opcode: 0x7d9,
        last_ip: v(70),
        last_dp: v(71),
        mxcsr: 0x1f80,
        ..Default::default()
    };
    for (n, reg) in fpu.fpr.iter_mut().chain(fpu.xmm.iter_mut()).enumerate() {
        *reg = [n as u8 + 1; 16];
    }
    VcpuState {
        index: 1,
        cpuid: cpuid(1),
        tsc_khz: None,
        regs: regs(100),
        sregs: sregs(100),
        fpu: FpuState::Fpu(Box::new(fpu)),
        xcrs: None,
        debugregs: None,
        lapic: lapic(1),
        msrs: msrs(100),
        vcpu_events: None,
        mp_state: kvm_mp_state {
            mp_state: KVM_MP_STATE_UNINITIALIZED,
        },
    }
}

fn pic(n: u8) -> kvm_pic_state {
    kvm_pic_state {
        last_irr: n,
        irr: n + 1,
        imr: 0xf0 | n,
        isr: n + 2,
        priority_add: n + 3,
        irq_base: 0x20 + 8 * n,
        read_reg_select: 1,
        poll: 0,
        special_mask: 1,
        init_state: 0,
        auto_eoi: 1,
        rotate_on_auto_eoi: 0,
        special_fully_nested_mode: 1,
        init4: 1,
        elcr: 0x0c | n,
        elcr_mask: 0xf8,
    }
}

fn vm() -> VmState {
    let mut pit = kvm_pit_state2 {
        flags: 1,
        ..Default::default()
    };
    for (n, c) in pit.channels.iter_mut().enumerate() {
        let n = n as u8;
        c.count = 0x1_0000 - u32::from(n);
        c.latched_count = 0x1234 + u16::from(n);
        c.count_latched = 1;
        c.status_latched = n & 1;
        c.status = 0x30 | n;
        c.read_state = 3;
        c.write_state = 3;
        c.write_latch = 0x5a ^ n;
        c.rw_mode = 3;
        c.mode = 2 + n;
        c.bcd = 0;
        c.gate = 1;
        c.count_load_time = 0x0102_0304_0506_0708 + i64::from(n);
    }
    let clock = kvm_clock_data {
        clock: v(80),
        flags: 0x6,
        realtime: v(81),
        host_tsc: v(82),
        ..Default::default()
    };
    let mut ioapic = kvm_ioapic_state {
        base_address: 0xfec0_0000,
        ioregsel: 0x10,
        id: 0x0200_0000,
        irr: 1 << 4,
        ..Default::default()
    };
    for (n, entry) in ioapic.redirtbl.iter_mut().enumerate() {
        *entry = kvm_ioapic_state__bindgen_ty_1 {
            bits: 0x0001_0000_0000_0020 + n as u64,
        };
    }
    let mut chips = [0, 1, 2].map(|chip_id| kvm_irqchip {
        chip_id,
        ..Default::default()
    });
    chips[0].chip.pic = pic(0);
    chips[1].chip.pic = pic(1);
    chips[2].chip.ioapic = ioapic;
    let [pic_master, pic_slave, ioapic] = chips;
    VmState {
        pit,
        clock,
        pic_master,
        pic_slave,
        ioapic,
    }
}

fn devices() -> DevicesState {
    let queue = |n: u64| QueueSnapshot {
        max_size: 256,
        size: 128 >> n,
        ready: true,
        desc_table: 0x10_0000 + (n << 16),
        avail_ring: 0x10_1000 + (n << 16),
        used_ring: 0x10_2000 + (n << 16),
        next_avail: 17 + n as u16,
        next_used: 11 + n as u16,
        event_idx_enabled: n == 1,
    };
    DevicesState {
        serial: SerialConsoleState {
            baud_divisor_low: 0x0c,
            baud_divisor_high: 0x01,
            interrupt_enable: 0x05,
            interrupt_identification: 0xc4,
            line_control: 0x1b,
            line_status: 0x61,
            modem_control: 0x0b,
            modem_status: 0xb0,
            scratch: 0x5a,
            rx_fifo: b"golden".to_vec(),
        },
        i8042: I8042State {},
        vsock: Some(VsockDeviceState {
            placement: virtio_placement(0),
            state: VirtioMmioState {
                registers: MmioRegisters {
                    status: 0xf,
                    device_features_sel: 1,
                    driver_features_sel: 1,
                    driver_features: (1 << 32) | (1 << 29),
                    queue_sel: 2,
                    interrupt_status: 1,
                    config_generation: 3,
                    activated: true,
                },
                queues: (0..3).map(queue).collect(),
                device: VsockState { guest_cid: 0x1234 },
            },
        }),
        blocks: vec![BlockDeviceState {
            placement: virtio_placement(1),
            state: VirtioMmioState {
                registers: MmioRegisters {
                    status: 0xf,
                    device_features_sel: 1,
                    driver_features_sel: 0,
                    driver_features: (1 << 32) | (1 << 9) | (1 << 5),
                    queue_sel: 0,
                    interrupt_status: 1,
                    config_generation: 2,
                    activated: true,
                },
                queues: vec![queue(0)],
                device: BlockState {
                    capacity_sectors: 0x0020_0000,
                    read_only: true,
                    id: *b"golden-code-disk-v2\0",
                },
            },
        }],
    }
}

/// The machine state the golden file holds.
pub(crate) fn golden_state() -> MachineState {
    MachineState {
        version: MACHINE_STATE_VERSION,
        mem_bytes: 128 << 20,
        boot: BootState {
            entry: 0x100_01c0,
            format: KernelFormat::BzImage,
            initrd: Some((0x7f0_0000, 0x12_3000)),
        },
        vcpu_count: 2,
        vcpus: vec![vcpu0(), vcpu1()],
        vm: vm(),
        devices: devices(),
    }
}

fn golden_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("machine-state-v{MACHINE_STATE_VERSION}.bin"))
}

const RULE: &str = "Within a MACHINE_STATE_VERSION these bytes must not change \
    (docs/snapshot-format.md, \"Compatibility\"): adding, removing, reordering or retyping a \
    field of any saved state needs a version bump (and a reader for the old version if its \
    snapshots must still restore); then `THAW_BLESS=1 cargo test -p vmm-core golden` writes the \
    new version's golden.";

/// Compares `actual` with the golden file at `path`, or writes it when blessing: `THAW_BLESS=1`
/// writes a golden that does not exist yet, `THAW_BLESS=overwrite` also replaces one.
fn check_golden(path: &Path, actual: &[u8], explain: impl FnOnce(&[u8]) -> String) {
    let bless = std::env::var("THAW_BLESS").unwrap_or_default();
    let write = || {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, actual).unwrap();
        println!("blessed {} ({} bytes)", path.display(), actual.len());
    };
    match std::fs::read(path) {
        Ok(golden) if golden == actual => {}
        Ok(_) if bless == "overwrite" => write(),
        Ok(golden) => panic!(
            "{} no longer matches: {}\n{}\n{RULE}",
            path.display(),
            first_difference(&golden, actual),
            explain(&golden)
        ),
        Err(_) if bless == "1" || bless == "overwrite" => write(),
        Err(e) => panic!(
            "{}: {e}; run with THAW_BLESS=1 to write this version's golden",
            path.display()
        ),
    }
}

/// What the golden holds, field by field, against this build's value.
fn explain(golden: &[u8]) -> String {
    match snapshot::state_blob::decode::<MachineState>(golden) {
        Ok(old) => format!(
            "The golden decodes with this build's types; fields that differ (golden vs now):\n  {}",
            differences(&old, &golden_state()).join("\n  ")
        ),
        Err(e) => format!("The golden does not decode with this build's types: {e}"),
    }
}

#[test]
fn machine_state_encoding_matches_its_golden_bytes() {
    let state = golden_state();
    let ram: Vec<(u64, u64)> = crate::memory::ram_ranges(state.mem_bytes)
        .into_iter()
        .map(|(a, n)| (a.0, n))
        .collect();
    state
        .validate(&ram)
        .expect("the golden state is one restore accepts");
    check_golden(&golden_path(), &encode(&state), explain);
}

#[test]
fn golden_machine_state_decodes_to_the_same_value() {
    let blessing = std::env::var_os("THAW_BLESS").is_some();
    let golden = match std::fs::read(golden_path()) {
        Ok(golden) => golden,
        // The other test is writing it.
        Err(_) if blessing => return,
        Err(e) => panic!("{}: {e}", golden_path().display()),
    };
    let decoded: MachineState = snapshot::state_blob::decode(&golden)
        .unwrap_or_else(|e| panic!("the golden no longer decodes: {e}\n{RULE}"));
    let found = differences(&decoded, &golden_state());
    assert!(
        found.is_empty(),
        "the golden decodes to another state:\n  {}\n{RULE}",
        found.join("\n  ")
    );
    assert!(
        encode(&decoded) == golden,
        "decoding then encoding changes the golden"
    );
}

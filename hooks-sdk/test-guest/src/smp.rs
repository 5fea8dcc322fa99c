//! Starting the application processors the way Linux does: INIT, then SIPI pointing at a
//! real-mode trampoline below 1 MiB. Everything here runs at CPL3: the local APIC's registers
//! are plain (trapped) memory accesses to its MMIO page.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::arch::{TRAMPOLINE_BASE, trampoline};

const LAPIC_BASE: u64 = 0xfee0_0000;
const ID: u64 = LAPIC_BASE + 0x20;
const ICR_LOW: u64 = LAPIC_BASE + 0x300;
const ICR_HIGH: u64 = LAPIC_BASE + 0x310;
const ICR_INIT: u32 = 0x0000_4500; // INIT, level assert
const ICR_STARTUP: u32 = 0x0000_4600; // Start-up IPI, level assert
const ICR_BUSY: u32 = 1 << 12;

/// CPUs that have reached CPL3 (the BSP counts itself).
pub static ONLINE: AtomicU32 = AtomicU32::new(1);

fn lapic_write(reg: u64, value: u32) {
    // SAFETY: the local APIC's MMIO page is identity-mapped; KVM emulates the access.
    unsafe { core::ptr::write_volatile(reg as *mut u32, value) }
}

fn lapic_read(reg: u64) -> u32 {
    // SAFETY: as for `lapic_write`.
    unsafe { core::ptr::read_volatile(reg as *const u32) }
}

fn send_ipi(apic_id: u8, command: u32) {
    lapic_write(ICR_HIGH, u32::from(apic_id) << 24);
    lapic_write(ICR_LOW, command);
    while lapic_read(ICR_LOW) & ICR_BUSY != 0 {
        core::hint::spin_loop();
    }
}

/// This CPU's local APIC id.
pub fn local_apic_id() -> u8 {
    (lapic_read(ID) >> 24) as u8
}

/// Copies the trampoline into low memory and sends INIT and SIPI to each of `apic_ids`.
pub fn start_aps(apic_ids: &[u8]) {
    let code = trampoline();
    // SAFETY: TRAMPOLINE_BASE is free low RAM (see the VMM's memory layout) that nothing else
    // uses, and no AP runs yet.
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), TRAMPOLINE_BASE as *mut u8, code.len());
    }
    let vector = (TRAMPOLINE_BASE >> 12) as u32;
    for id in apic_ids {
        send_ipi(*id, ICR_INIT);
        // Hardware wants 10 ms between INIT and SIPI; a virtual CPU does not, so Thaw does not
        // wait (Linux skips the delay under a hypervisor too).
        send_ipi(*id, ICR_STARTUP | vector);
    }
}

/// Waits until `expected` CPUs are online or `spins` polls have passed; returns how many are.
pub fn wait_online(expected: u32, spins: u64) -> u32 {
    for _ in 0..spins {
        let n = ONLINE.load(Ordering::Acquire);
        if n >= expected {
            return n;
        }
        core::hint::spin_loop();
    }
    ONLINE.load(Ordering::Acquire)
}

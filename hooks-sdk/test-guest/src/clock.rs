//! Time for timeouts: the TSC, calibrated once against the PIT (KVM's in-kernel i8254), all at
//! CPL3. CPUID's TSC-frequency leaves are no help: on PVM, CPUID at CPL3 reports the host and
//! may say nothing about the TSC. `rdtsc` at CPL3 is allowed (CR4.TSD is clear) and, on PVM,
//! not even trapped.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::io::{inb, outb};

const PIT_HZ: u64 = 1_193_182;
/// Calibration window: 10 ms of PIT channel 2.
const CALIBRATION_TICKS: u16 = 11_932;
const CALIBRATION_NS: u64 = CALIBRATION_TICKS as u64 * 1_000_000_000 / PIT_HZ;
/// Used when calibration fails (no PIT): a plausible 2 GHz.
const FALLBACK_KHZ: u64 = 2_000_000;

/// TSC ticks per millisecond (0 until calibrated).
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the counter.
    unsafe { core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nostack, nomem)) };
    u64::from(lo) | u64::from(hi) << 32
}

/// Measures the TSC frequency with PIT channel 2 in one-shot mode, as Linux's
/// `pit_calibrate_tsc` does; returns kHz and whether the measurement looked sane.
pub fn calibrate() -> (u64, bool) {
    // Speaker off, channel 2 gate on; channel 2, lobyte/hibyte, mode 0 (count down once).
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0xb0);
    outb(0x42, CALIBRATION_TICKS as u8);
    outb(0x42, (CALIBRATION_TICKS >> 8) as u8);
    let start = rdtsc();
    let mut polls = 0u64;
    // OUT2 (port 0x61 bit 5) goes high when the count reaches zero. Give up after ~1 s worth
    // of a 10 GHz TSC, in case nothing emulates the PIT.
    while inb(0x61) & 0x20 == 0 && rdtsc().wrapping_sub(start) < 10_000_000_000 {
        polls += 1;
    }
    let ticks = rdtsc().wrapping_sub(start);
    let khz = ticks * 1_000_000 / CALIBRATION_NS; // ticks per ms
    // Between 100 MHz and 10 GHz, and the PIT was actually polled, or it is nonsense.
    let sane = polls > 0 && (100_000..=10_000_000).contains(&khz);
    let khz = if sane { khz } else { FALLBACK_KHZ };
    TSC_KHZ.store(khz, Ordering::Relaxed);
    (khz, sane)
}

/// Nanoseconds on the TSC's time line (calibrates first if needed).
pub fn now_ns() -> u64 {
    let mut khz = TSC_KHZ.load(Ordering::Relaxed);
    if khz == 0 {
        khz = calibrate().0;
    }
    (u128::from(rdtsc()) * 1_000_000 / u128::from(khz)) as u64
}

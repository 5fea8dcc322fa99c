//! Thaw's test guest: a bare-metal x86_64 program that boots through the same path as a Linux
//! `vmlinux` (64-bit entry, `rsi` = zero page), spends as little time at CPL0 as it can (on PVM
//! every CPL0 instruction is emulated), and does its real work at CPL3 with IOPL=3.
//!
//! After its CPU checks it can talk to the host over virtio-vsock with a polling driver that
//! runs entirely at CPL3 (`virtio_mmio`, and the driver core in the library crate), as Thaw's
//! agent, as a bench responder, or as a deliberately misbehaving client; or test its
//! virtio-block disks with another polling driver.
//!
//! Command line (`thaw run --cmdline`), space-separated; unknown `thaw.*` keys are an error:
//! - `thaw.exit=N`  exit status to report when everything succeeded (default 0)
//! - `thaw.agent=1`  run the Thaw agent over vsock (host CID 2, port 9000); see `agent`
//! - `thaw.init=on-demand|snap-start`  the init type the agent's `Hello` reports (default
//!   on-demand, which also sends `Ready`)
//! - `thaw.vsock-bench=1`  serve the vsock bench (echo, upload, download); see `bench_mode`
//! - `thaw.vsock-misbehave=KIND`  send the device bad input of KIND (`bad-addr`, `bad-len`,
//!   `bad-op`, `no-conn`, `flood`, `all`), then run the agent; see `misbehave`
//! - `thaw.fill-mib=N`  first fill N MiB at `FILL_BASE` with the memory workload and print its
//!   checksum (see the library's `workload`)
//! - `thaw.idle=1`  say `idle` on the console and count at CPL3 until the host stops the VM
//! - `thaw.disk-test=1`  read, write and check every virtio-block disk, print what was found,
//!   and exit; see `disk_mode`
//! - `thaw.fail=init|exit|checkpoint|restore`  the agent fails that step on purpose
//! - `thaw.keeper=1`  cpu1 runs the register keeper (x87, MXCSR, xmm/ymm patterns and a
//!   counter, checked in a loop) instead of halting; see `keeper_cpu`
//! - `thaw.restore-hook-ms=N`  the agent's after-restore hook busy-waits N ms before finishing
//! - `virtio_mmio.device=SIZE@BASE:IRQ`  a virtio-mmio device (the VMM appends these)
//!
//! Exit statuses: 0 (or `thaw.exit`) success (the agent: `Shutdown`; the bench: quit),
//! 1 a check failed, 2 bad command line, 3 CPU exception, 4 panic, 5 no usable vsock device,
//! 6 no usable block device (the disk test).

#![no_std]
#![no_main]

mod agent;
mod arch;
mod bench_mode;
mod boot;
mod clock;
mod disk_mode;
mod io;
mod keeper_cpu;
mod mem;
mod misbehave;
mod smp;
mod traps;
mod virtio_mmio;

use core::sync::atomic::{AtomicU32, Ordering};

use thaw_test_guest::cmdline::{self, Mode};
use thaw_test_guest::workload;

const EXIT_CHECK_FAILED: u8 = 1;
const EXIT_BAD_CMDLINE: u8 = 2;
const EXIT_PANIC: u8 = 4;
/// No vsock device, or it cannot be initialized or recovered.
pub const EXIT_VSOCK: u8 = 5;

/// Where `thaw.fill-mib` memory starts: above the image, the zero page and an initrd's usual
/// place, inside the identity map.
const FILL_BASE: u64 = 64 << 20;

/// How long the BSP waits for APs to come online, in spin-loop iterations (seconds, not
/// milliseconds: APs normally arrive within a few hundred microseconds).
const AP_WAIT_SPINS: u64 = 400_000_000;

/// Per-CPU reports written by each CPU once it runs at CPL3: bit 31 set when valid,
/// bits 9:8 the CPL, bits 7:0 the APIC id.
static REPORTS: [AtomicU32; arch::MAX_CPUS] = [const { AtomicU32::new(0) }; arch::MAX_CPUS];

fn apic_id() -> u8 {
    // Not CPUID: on PVM, CPUID at CPL3 is not trapped and reports the host CPU the vCPU thread
    // happens to run on. The local APIC's ID register is the vCPU's own.
    smp::local_apic_id()
}

fn report_self(cpu: usize) {
    let value = (1 << 31) | u32::from(arch::current_privilege_level()) << 8 | u32::from(apic_id());
    REPORTS[cpu].store(value, Ordering::Release);
}

/// The boot CPU at CPL3.
pub extern "C" fn bsp_main(boot_params: u64) -> ! {
    arch::fill_idt();
    io::mask_legacy_pics();
    println!(
        "thaw-test-guest {}: banner from CPL{}",
        env!("CARGO_PKG_VERSION"),
        arch::current_privilege_level()
    );
    report_self(0);

    let cmdline = boot::cmdline(boot_params);
    let options = match cmdline::parse(cmdline) {
        Ok(o) => o,
        Err(bad) => {
            println!("thaw-test-guest: unknown or invalid option {bad:?}");
            io::exit(EXIT_BAD_CMDLINE);
        }
    };
    io::set_quiet(options.quiet);

    let Some(cpus) = boot::cpus() else {
        println!("thaw-test-guest: no valid MP table; cannot find the CPUs");
        io::exit(EXIT_CHECK_FAILED);
    };
    if cpus.dropped > 0 {
        println!(
            "thaw-test-guest: {} CPUs beyond the supported {} are ignored",
            cpus.dropped,
            arch::MAX_CPUS
        );
    }
    let expected = cpus.count as u32;
    keeper_cpu::WANTED.store(options.keeper, Ordering::Release);
    smp::start_aps(&cpus.apic_ids[1..cpus.count]);
    let online = smp::wait_online(expected, AP_WAIT_SPINS);
    for (cpu, report) in REPORTS.iter().enumerate().take(online as usize) {
        let r = report.load(Ordering::Acquire);
        if r & (1 << 31) != 0 {
            println!(
                "cpu{cpu}: apic id {}, running at CPL{}",
                r & 0xff,
                (r >> 8) & 3
            );
        }
    }
    println!("cpus online: {online}/{expected}");
    if online != expected {
        io::exit(EXIT_CHECK_FAILED);
    }
    if options.keeper {
        announce_keeper();
    }
    if let Some(mib) = options.restore_read_mib {
        RESTORE_READ_MIB.store(mib, Ordering::Release);
    }
    if options.fill_mib > 0 {
        fill_memory(boot_params, options.fill_mib);
    }
    match options.mode {
        Mode::Checks => io::exit(options.exit_code),
        Mode::Idle => idle(),
        Mode::DiskTest => {
            calibrate_clock();
            disk_mode::run(&options)
        }
        _ => vsock_main(&options),
    }
}

/// Says what the register keeper keeps, or why there is none.
fn announce_keeper() {
    let bits = keeper_cpu::report().vector_bits;
    if bits == 0 {
        println!("keeper: thaw.keeper=1 needs a second CPU; no register keeper runs");
        return;
    }
    let xcr0 = if arch::avx_enabled(0) {
        arch::xcr0()
    } else {
        0
    };
    println!(
        "keeper: cpu{} keeps x87, MXCSR and {bits}-bit xmm/ymm0-15 (cpu0 XCR0 {xcr0:#x})",
        keeper_cpu::KEEPER_CPU
    );
}

/// Fills `mib` MiB at [`FILL_BASE`] with the workload and prints the mix and checksum.
fn fill_memory(boot_params: u64, mib: u32) {
    let len = u64::from(mib) << 20;
    if !boot::is_ram(boot_params, FILL_BASE, len) {
        println!(
            "thaw-test-guest: thaw.fill-mib={mib} needs RAM at {FILL_BASE:#x}..{:#x}; give the VM \
             at least {} MiB",
            FILL_BASE + len,
            (FILL_BASE + len) >> 20
        );
        io::exit(EXIT_BAD_CMDLINE);
    }
    // SAFETY: the e820 map says this range is RAM, it is identity-mapped and user-accessible,
    // and nothing else in the guest uses memory above FILL_BASE.
    let buf = unsafe { core::slice::from_raw_parts_mut(FILL_BASE as *mut u8, len as usize) };
    let start = clock::rdtsc();
    let mix = workload::fill(buf);
    let sum = workload::checksum(buf);
    FILLED_MIB.store(mib, Ordering::Release);
    println!(
        "fill: {mib} MiB at {FILL_BASE:#x}: {} zero, {} text, {} random pages; checksum {sum:#018x} \
         ({} M TSC ticks)",
        mix.zero,
        mix.text,
        mix.random,
        clock::rdtsc().wrapping_sub(start) / 1_000_000
    );
}

/// MiB at [`FILL_BASE`] the workload filled (0: none), for the after-restore check.
static FILLED_MIB: AtomicU32 = AtomicU32::new(0);

/// MiB of the workload the after-restore hook reads (`thaw.restore-read-mib`; all by default),
/// so that a restore can be made to need only part of what the snapshot holds.
static RESTORE_READ_MIB: AtomicU32 = AtomicU32::new(u32::MAX);

/// The checksum of the filled workload now (of its first `thaw.restore-read-mib` MiB), if
/// there is one: after a restore it must equal the one printed at fill time when it covers all.
pub fn workload_checksum() -> Option<(u32, u64)> {
    let mib = FILLED_MIB
        .load(Ordering::Acquire)
        .min(RESTORE_READ_MIB.load(Ordering::Acquire));
    if mib == 0 {
        return None;
    }
    // SAFETY: `fill_memory` checked this range is RAM and filled it; only this boot CPU reads
    // it afterwards, and nothing writes it.
    let buf = unsafe {
        core::slice::from_raw_parts(FILL_BASE as *const u8, (u64::from(mib) << 20) as usize)
    };
    Some((mib, workload::checksum(buf)))
}

/// Counts forever at CPL3 (the count lives in memory, so a snapshot holds it).
fn idle() -> ! {
    static COUNTER: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
    println!("thaw-test-guest: idle");
    loop {
        COUNTER.fetch_add(1, Ordering::Relaxed);
        core::hint::spin_loop();
    }
}

/// Calibrates the TSC clock (the drivers' timeouts run on it) and says how fast it runs.
fn calibrate_clock() {
    let (khz, sane) = clock::calibrate();
    println!(
        "clock: TSC at {}.{:03} MHz{}",
        khz / 1000,
        khz % 1000,
        if sane {
            ""
        } else {
            " (PIT calibration failed; assumed)"
        }
    );
}

/// The vsock modes, on the boot CPU.
fn vsock_main(options: &cmdline::Options) -> ! {
    arch::paint_user_stack(0);
    calibrate_clock();
    let Some(mut vsock) = virtio_mmio::Vsock::open(options.devices()) else {
        println!(
            "thaw-test-guest: no usable virtio-mmio vsock device among {} on the command line",
            options.device_count
        );
        io::exit(EXIT_VSOCK);
    };
    match options.mode {
        Mode::Agent => agent::run(&mut vsock, options),
        Mode::Bench => bench_mode::run(&mut vsock),
        Mode::Misbehave(kind) => {
            let mut scratch = [0u8; 64];
            if misbehave::run(&mut vsock, kind, &mut scratch).is_none() {
                println!("misbehave {}: the device did not recover", kind.name());
                io::exit(EXIT_CHECK_FAILED);
            }
            agent::run(&mut vsock, options)
        }
        Mode::Checks | Mode::Idle | Mode::DiskTest => io::exit(options.exit_code),
    }
}

/// An application processor at CPL3.
pub extern "C" fn ap_main(cpu: u64) -> ! {
    let cpu = cpu as usize;
    report_self(cpu);
    let keeper = cpu == keeper_cpu::KEEPER_CPU && keeper_cpu::WANTED.load(Ordering::Acquire);
    let avx = arch::avx_enabled(cpu);
    if keeper {
        keeper_cpu::announce(avx);
    }
    smp::ONLINE.fetch_add(1, Ordering::AcqRel);
    if keeper {
        keeper_cpu::run(avx);
    }
    traps::syscall(arch::SYS_HALT_FOREVER, 0);
    unreachable!("the halt syscall never returns")
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    io::print_failure(format_args!("thaw-test-guest: panic: {info}\n"));
    io::exit(EXIT_PANIC)
}

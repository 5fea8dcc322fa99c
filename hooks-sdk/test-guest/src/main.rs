//! Thaw's test guest: a bare-metal x86_64 program that boots through the same path as a Linux
//! `vmlinux` (64-bit entry, `rsi` = zero page), spends as little time at CPL0 as it can (on PVM
//! every CPL0 instruction is emulated), and does its real work at CPL3 with IOPL=3.
//!
//! Command line (`thaw run --cmdline`), space-separated; unknown `thaw.*` keys are an error:
//! - `thaw.exit=N`  exit status to report when everything succeeded (default 0)
//!
//! Exit statuses: 0 (or `thaw.exit`) success, 1 a check failed, 2 bad command line,
//! 3 CPU exception, 4 panic.

#![no_std]
#![no_main]

mod arch;
mod boot;
mod io;
mod mem;
mod smp;

use core::sync::atomic::{AtomicU32, Ordering};

const EXIT_CHECK_FAILED: u8 = 1;
const EXIT_BAD_CMDLINE: u8 = 2;
const EXIT_PANIC: u8 = 4;

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

struct Options {
    exit_code: u8,
}

fn parse_cmdline(cmdline: &str) -> Result<Options, &str> {
    let mut options = Options { exit_code: 0 };
    for word in cmdline.split_ascii_whitespace() {
        let Some(setting) = word.strip_prefix("thaw.") else {
            continue; // options for other programs (console=, ...) are not ours
        };
        match setting.split_once('=') {
            Some(("exit", value)) => {
                options.exit_code = value.parse().map_err(|_| word)?;
            }
            _ => return Err(word),
        }
    }
    Ok(options)
}

/// The boot CPU at CPL3.
pub extern "C" fn bsp_main(boot_params: u64) -> ! {
    arch::fill_idt();
    println!(
        "thaw-test-guest {}: banner from CPL{}",
        env!("CARGO_PKG_VERSION"),
        arch::current_privilege_level()
    );
    report_self(0);

    let cmdline = boot::cmdline(boot_params);
    let options = match parse_cmdline(cmdline) {
        Ok(o) => o,
        Err(bad) => {
            println!("thaw-test-guest: unknown or invalid option {bad:?}");
            io::exit(EXIT_BAD_CMDLINE);
        }
    };

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
    io::exit(options.exit_code)
}

/// An application processor at CPL3.
pub extern "C" fn ap_main(cpu: u64) -> ! {
    report_self(cpu as usize);
    smp::ONLINE.fetch_add(1, Ordering::AcqRel);
    arch::syscall(arch::SYS_HALT_FOREVER, 0);
    unreachable!("the halt syscall never returns")
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("thaw-test-guest: panic: {info}");
    io::exit(EXIT_PANIC)
}

//! Port I/O and the devices the guest talks to through it: the COM1 console, Thaw's debug-exit
//! port and the legacy PICs. Port I/O works at CPL3 through the TSS I/O permission bitmap.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;
/// Thaw's debug-exit port: writing N ends the VM with exit status N.
const DEBUG_EXIT: u16 = 0x501;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects; the TSS I/O bitmap allows the guest's ports at CPL3.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nostack, nomem))
    }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`; the ports the guest reads (PIT, speaker) have no memory effects.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nostack, nomem))
    };
    value
}

/// Initializes both 8259 PICs with their vectors at 32-47 (clear of the CPU exceptions), then
/// masks every line. The guest polls and wants no interrupts, but on PVM user code always runs
/// with IF=1, and the VMM's devices raise their lines (COM1: 4, virtio-mmio: 5 and up) through
/// KVM's PIC and the local APIC's LINT0 (ExtINT): unmasked and unprogrammed, the PIC would
/// deliver IRQ 5 as vector 5, a CPU exception. Anything that still arrives is counted by
/// `traps`.
pub fn mask_legacy_pics() {
    const ICW1_INIT_ICW4: u8 = 0x11;
    for (cmd, data, base, cascade) in [(0x20, 0x21, 32, 1 << 2), (0xa0, 0xa1, 40, 2)] {
        outb(cmd, ICW1_INIT_ICW4);
        outb(data, base); // ICW2: vector base
        outb(data, cascade); // ICW3: the slave hangs off the master's IRQ 2
        outb(data, 0x01); // ICW4: 8086 mode
        outb(data, 0xff); // OCW1: every line masked
    }
}

/// Serializes console output from several CPUs.
static CONSOLE_LOCK: AtomicBool = AtomicBool::new(false);
/// `thaw.quiet=1`: ordinary output is dropped. On PVM every console byte is an exit to the
/// VMM (tens of µs), so a chatty guest's restore is measured in its console, not in Thaw.
static QUIET: AtomicBool = AtomicBool::new(false);

/// Drops (or, with `false`, restores) ordinary console output; failures call
/// [`print_failure`], which always prints.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Prints even when quiet: for panics and CPU exceptions, the last words before the exit.
pub fn print_failure(args: fmt::Arguments) {
    set_quiet(false);
    print(args);
}

/// The console. Bytes go straight to the UART's transmit register: VMM UARTs transmit
/// instantly, so polling the line status first would only double the number of VM exits.
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                outb(COM1, b'\r');
            }
            outb(COM1, b);
        }
        Ok(())
    }
}

/// Prints formatted text atomically with respect to other CPUs, unless quiet.
pub fn print(args: fmt::Arguments) {
    if QUIET.load(Ordering::Relaxed) {
        return;
    }
    print_output(args);
}

/// Prints even when quiet, without ending quiet: the function's own output (`thaw:log` lines,
/// a crash's last words), which a host shows in its invocation logs. Quiet only silences the
/// guest's own chatter.
pub fn print_output(args: fmt::Arguments) {
    while CONSOLE_LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    let _ = Console.write_fmt(args);
    CONSOLE_LOCK.store(false, Ordering::Release);
}

/// `print!` for the guest console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::io::print(format_args!($($arg)*)) };
}

/// `println!` for the guest console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::io::print(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Ends the VM with `code` as `thaw run`'s exit status.
pub fn exit(code: u8) -> ! {
    outb(DEBUG_EXIT, code);
    // The VMM stops every vCPU on the write above; nothing runs past it.
    loop {
        core::hint::spin_loop();
    }
}

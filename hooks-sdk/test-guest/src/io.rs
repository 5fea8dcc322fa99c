//! Port I/O and the two devices the guest talks to through it: the COM1 console and Thaw's
//! debug-exit port. Both work at CPL3 because the guest runs with IOPL=3.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;
/// Thaw's debug-exit port: writing N ends the VM with exit status N.
const DEBUG_EXIT: u16 = 0x501;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects; the guest runs with IOPL=3 so this never faults.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nostack, nomem))
    }
}

/// Serializes console output from several CPUs.
static CONSOLE_LOCK: AtomicBool = AtomicBool::new(false);

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

/// Prints formatted text atomically with respect to other CPUs.
pub fn print(args: fmt::Arguments) {
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

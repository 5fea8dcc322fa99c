//! The disk test (`thaw.disk-test=1`): every virtio-block device on the command line is brought
//! up in turn and put through the library's disk test (`block::check`), which prints what it
//! finds; then the guest says how it went and exits.

use core::fmt;

use thaw_test_guest::block::check;
use thaw_test_guest::cmdline::Options;

use crate::arch::Shared;
use crate::virtio_mmio::{self, DiskError};
use crate::{EXIT_CHECK_FAILED, io, println};

/// No virtio-mmio block device could be used.
pub const EXIT_NO_DISK: u8 = 6;

/// Data for the test's reads and writes: a MiB, so the checksum's reads are 16 requests in
/// flight at once.
static SCRATCH: Shared<[u8; 1 << 20]> = Shared::new([0; 1 << 20]);

/// The console as a `fmt::Write`, for the library's report (quiet drops it, as any output).
struct ConsoleOut;

impl fmt::Write for ConsoleOut {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        io::print(format_args!("{s}"));
        Ok(())
    }
}

/// Runs the disk test on every block device, then exits: `options.exit_code` if nothing
/// failed, 1 if something did, [`EXIT_NO_DISK`] if there was no disk to test.
pub fn run(options: &Options) -> ! {
    // SAFETY: only this mode uses the scratch buffer, on the boot CPU, and it runs once (it
    // ends the VM); no device holds any of it between the driver's calls.
    let scratch: &mut [u8] = unsafe { &mut *SCRATCH.get() };
    let devices = options.devices();
    let (mut disks, mut failures) = (0u32, 0u32);
    for (index, device) in devices.iter().enumerate() {
        let mut disk = match virtio_mmio::open_disk(devices, index) {
            Ok(disk) => disk,
            Err(e @ (DiskError::NotVirtio | DiskError::NotBlock(_))) => {
                println!("disk-test: {:#x}: {e}; skipped", device.base);
                continue;
            }
            Err(e) => {
                println!("disk-test: {:#x}: {e}", device.base);
                failures += 1;
                continue;
            }
        };
        // vda, vdb, ...: the names Linux gives the same disks in the same order.
        let letter = [b'v', b'd', b'a' + disks as u8];
        let name = core::str::from_utf8(&letter).unwrap_or("vd?");
        println!(
            "disk-test: {name}: virtio-mmio block device at {:#x} (irq {}, vendor {:#x}), queue {}, \
             up to {} requests in flight, polled",
            device.base,
            device.irq,
            disk.vendor,
            disk.driver.queue_size(),
            disk.driver.slots()
        );
        failures += check::check_disk(name, &mut disk.driver, scratch, &mut ConsoleOut);
        disks += 1;
    }
    if disks == 0 {
        println!(
            "disk-test: no usable virtio-mmio block device among {} on the command line",
            options.device_count
        );
        io::exit(EXIT_NO_DISK);
    }
    let plural = |n: u32| if n == 1 { "" } else { "s" };
    println!(
        "disk-test: done: {disks} disk{}, {failures} failure{}",
        plural(disks),
        plural(failures)
    );
    io::exit(if failures == 0 {
        options.exit_code
    } else {
        EXIT_CHECK_FAILED
    })
}

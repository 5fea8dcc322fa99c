//! The disk test (`thaw.disk-test=1`) on one disk: what the guest reads, writes and prints, so
//! that a host test can check the VMM's block device against the image files it gave it.
//!
//! Each line starts with `disk-test: NAME: `. In order:
//!
//! - the id (`GET_ID`), the capacity, and whether the device said the disk is read-only;
//! - the [`Checksum`] of the first [`CHECKSUM_SECTORS`] sectors (fewer if the disk is smaller);
//! - sectors `WRITE_FIRST..WRITE_FIRST + WRITE_COUNT` written with [`pattern_byte`]: on a
//!   writable disk they are flushed and read back, and must match; a read-only disk must refuse
//!   the write (`IOERR`) and keep its sectors as they were;
//! - a read of the last sector and the one after it, which the device must refuse.
//!
//! Anything else is a failure: reported in a line, counted, never a panic.

use core::fmt::{self, Write};

use super::{BlockDriver, BlockTransport, Error, F_FLUSH, SECTOR_SIZE, id_bytes};
use crate::workload::Checksum;

/// Sectors at the start of each disk whose checksum is printed.
pub const CHECKSUM_SECTORS: u64 = 2048;
/// The first sector the test writes.
pub const WRITE_FIRST: u64 = 8;
/// Sectors the test writes.
pub const WRITE_COUNT: u64 = 8;
/// The scratch buffer `check_disk` needs at least: the written sectors three times (what was
/// there, what is written, what is read back).
pub const MIN_SCRATCH: usize = 3 * WRITE_COUNT as usize * SECTOR_SIZE;

/// The byte the test writes at byte `offset` of a disk: the top byte of a multiplicative hash
/// of the offset, so a sector that lands in the wrong place does not match.
pub fn pattern_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

/// Fills `buf` with the pattern of the disk's bytes from `offset`.
pub fn fill_pattern(offset: u64, buf: &mut [u8]) {
    for (at, b) in (offset..).zip(buf.iter_mut()) {
        *b = pattern_byte(at);
    }
}

/// A disk's id as printed: printable ASCII as it is, anything else (and `"`, `\`) escaped.
pub struct ShownId<'a>(pub &'a [u8]);

impl fmt::Display for ShownId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            if (b.is_ascii_graphic() || b == b' ') && b != b'"' && b != b'\\' {
                f.write_char(char::from(b))?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

/// Lines about one disk, and the failures among them.
struct Report<'a, W: Write> {
    name: &'a str,
    out: &'a mut W,
    failures: u32,
}

impl<W: Write> Report<'_, W> {
    fn say(&mut self, args: fmt::Arguments) {
        // The console cannot fail; a test's String neither.
        let _ = writeln!(self.out, "disk-test: {}: {args}", self.name);
    }

    fn fail(&mut self, args: fmt::Arguments) {
        self.failures += 1;
        self.say(args);
    }
}

/// Runs the disk test on `d` (called `name` in the lines it prints to `out`), using `scratch`
/// (at least [`MIN_SCRATCH`] bytes; more makes the checksum's reads larger) for data. Returns
/// the failures found.
pub fn check_disk<T: BlockTransport>(
    name: &str,
    d: &mut BlockDriver<T>,
    scratch: &mut [u8],
    out: &mut impl Write,
) -> u32 {
    let mut r = Report {
        name,
        out,
        failures: 0,
    };
    let whole = scratch.len() / SECTOR_SIZE * SECTOR_SIZE;
    let scratch = &mut scratch[..whole];
    if scratch.len() < MIN_SCRATCH {
        r.fail(format_args!(
            "a scratch buffer of {} bytes is too small (at least {MIN_SCRATCH})",
            scratch.len()
        ));
        return r.failures;
    }
    identify(&mut r, d);
    checksum(&mut r, d, scratch);
    write_test(&mut r, d, scratch);
    past_the_end(&mut r, d, scratch);
    r.failures
}

fn identify<T: BlockTransport, W: Write>(r: &mut Report<W>, d: &mut BlockDriver<T>) {
    let capacity = d.capacity_sectors();
    let access = if d.read_only() {
        "read-only"
    } else {
        "writable"
    };
    let flush = if d.features() & F_FLUSH != 0 {
        ", flush"
    } else {
        ""
    };
    match d.get_id() {
        Ok(id) => r.say(format_args!(
            "id \"{}\", {capacity} sectors, {access}{flush}",
            ShownId(id_bytes(&id))
        )),
        Err(e) => r.fail(format_args!(
            "id unreadable ({e}); {capacity} sectors, {access}{flush}"
        )),
    }
}

fn checksum<T: BlockTransport, W: Write>(
    r: &mut Report<W>,
    d: &mut BlockDriver<T>,
    scratch: &mut [u8],
) {
    let sectors = d.capacity_sectors().min(CHECKSUM_SECTORS);
    let per_read = (scratch.len() / SECTOR_SIZE) as u64;
    let mut sum = Checksum::new();
    let start_ns = d.transport().now_ns();
    let mut sector = 0;
    while sector < sectors {
        let count = (sectors - sector).min(per_read);
        let buf = &mut scratch[..count as usize * SECTOR_SIZE];
        if let Err(e) = d.read(sector, buf) {
            r.fail(format_args!(
                "read of sectors {sector}..{} for the checksum failed: {e}",
                sector + count
            ));
            return;
        }
        sum.update(buf);
        sector += count;
    }
    let us = d.transport().now_ns().saturating_sub(start_ns) / 1000;
    r.say(format_args!(
        "sectors 0..{sectors} checksum {:#018x} ({} KiB read in {us} us)",
        sum.value(),
        sectors * SECTOR_SIZE as u64 / 1024
    ));
}

fn write_test<T: BlockTransport, W: Write>(
    r: &mut Report<W>,
    d: &mut BlockDriver<T>,
    scratch: &mut [u8],
) {
    let (first, end) = (WRITE_FIRST, WRITE_FIRST + WRITE_COUNT);
    if d.capacity_sectors() < end {
        r.say(format_args!(
            "too small for the write test (sectors {first}..{end})"
        ));
        return;
    }
    let len = WRITE_COUNT as usize * SECTOR_SIZE;
    let (before, rest) = scratch.split_at_mut(len);
    let (data, rest) = rest.split_at_mut(len);
    let back = &mut rest[..len];
    if let Err(e) = d.read(first, before) {
        r.fail(format_args!(
            "read of sectors {first}..{end} before writing failed: {e}"
        ));
        return;
    }
    fill_pattern(first * SECTOR_SIZE as u64, data);
    let written = d.write(first, data);
    let flushed = match written {
        Err(Error::IoErr { .. }) if d.read_only() => None,
        Err(e) => {
            r.fail(format_args!("write to sectors {first}..{end} failed: {e}"));
            return;
        }
        Ok(()) if d.read_only() => {
            r.fail(format_args!(
                "write to sectors {first}..{end} ACCEPTED by a read-only disk"
            ));
            return;
        }
        Ok(()) => Some(match d.flush() {
            Ok(()) => "flushed",
            Err(Error::FlushNotOffered) => "not flushed (no flush offered)",
            Err(e) => {
                r.fail(format_args!("flush after the write failed: {e}"));
                return;
            }
        }),
    };
    if let Err(e) = d.read(first, back) {
        r.fail(format_args!(
            "read back of sectors {first}..{end} failed: {e}"
        ));
        return;
    }
    let expected: &[u8] = if flushed.is_some() { data } else { before };
    let mismatch = expected.iter().zip(back.iter()).position(|(a, b)| a != b);
    match (flushed, mismatch) {
        (Some(flushed), None) => r.say(format_args!(
            "wrote sectors {first}..{end}, {flushed}, read back: match"
        )),
        (Some(flushed), Some(at)) => r.fail(format_args!(
            "wrote sectors {first}..{end}, {flushed}, read back: MISMATCH at byte {at}"
        )),
        (None, None) => r.say(format_args!(
            "write to sectors {first}..{end} refused (IOERR), as a read-only disk should; \
             sectors unchanged"
        )),
        (None, Some(at)) => r.fail(format_args!(
            "write to sectors {first}..{end} refused (IOERR), but the sectors CHANGED (byte {at})"
        )),
    }
}

fn past_the_end<T: BlockTransport, W: Write>(
    r: &mut Report<W>,
    d: &mut BlockDriver<T>,
    scratch: &mut [u8],
) {
    let first = d.capacity_sectors().saturating_sub(1);
    let end = first + 2;
    match d.read(first, &mut scratch[..2 * SECTOR_SIZE]) {
        Err(Error::IoErr { .. }) => r.say(format_args!(
            "read of sectors {first}..{end} (past the end) refused (IOERR)"
        )),
        Ok(()) => r.fail(format_args!(
            "read of sectors {first}..{end} (past the end) ACCEPTED"
        )),
        Err(e) => r.fail(format_args!(
            "read of sectors {first}..{end} (past the end) failed, but not as refused: {e}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeDisk;
    use super::super::{BlockMemory, F_RO, ID_BYTES};
    use super::*;
    use crate::workload::checksum;

    const MIB: usize = 1 << 20;

    fn disk(data: Vec<u8>, features: u64) -> BlockDriver<FakeDisk> {
        let mem: *mut BlockMemory = Box::into_raw(Box::<BlockMemory>::new_zeroed()).cast();
        let capacity = (data.len() / SECTOR_SIZE) as u64;
        let dev = FakeDisk::new(mem, 128, data);
        // SAFETY: fresh, leaked memory used by this driver and its device only.
        unsafe { BlockDriver::new(dev, mem, 128, features, capacity) }.unwrap()
    }

    fn contents(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn run(d: &mut BlockDriver<FakeDisk>, scratch: usize) -> (u32, String) {
        let mut out = String::new();
        let failures = check_disk("vda", d, &mut vec![0u8; scratch], &mut out);
        (failures, out)
    }

    #[test]
    fn a_writable_disk_takes_the_pattern() {
        let image = contents(3 * MIB);
        let mut d = disk(image.clone(), F_FLUSH);
        let (failures, out) = run(&mut d, 64 * 1024);
        assert_eq!(failures, 0, "{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "disk-test: vda: id \"fake-disk\", 6144 sectors, writable, flush"
        );
        let sum = checksum(&image[..MIB]);
        assert!(
            lines[1].starts_with(&format!(
                "disk-test: vda: sectors 0..2048 checksum {sum:#018x} (1024 KiB read in "
            )),
            "{out}"
        );
        assert_eq!(
            lines[2],
            "disk-test: vda: wrote sectors 8..16, flushed, read back: match"
        );
        assert_eq!(
            lines[3],
            "disk-test: vda: read of sectors 6143..6145 (past the end) refused (IOERR)"
        );
        assert_eq!(lines.len(), 4);
        let data = &d.transport().data;
        for (i, b) in data.iter().enumerate() {
            let want = if (8 * 512..16 * 512).contains(&i) {
                pattern_byte(i as u64)
            } else {
                image[i]
            };
            assert_eq!(*b, want, "byte {i}");
        }
        assert_eq!(d.transport().flushes, 1);
    }

    #[test]
    fn a_read_only_disk_refuses_and_keeps_its_sectors() {
        let image = contents(MIB / 2);
        let mut d = disk(image.clone(), F_FLUSH | F_RO);
        d.transport().read_only = true;
        let (failures, out) = run(&mut d, MIN_SCRATCH);
        assert_eq!(failures, 0, "{out}");
        assert!(out.contains("vda: id \"fake-disk\", 1024 sectors, read-only, flush\n"));
        assert!(out.contains(&format!(
            "sectors 0..1024 checksum {:#018x} (512 KiB read in",
            checksum(&image)
        )));
        assert!(out.contains(
            "write to sectors 8..16 refused (IOERR), as a read-only disk should; sectors unchanged"
        ));
        assert_eq!(d.transport().data, image);
        assert_eq!(d.transport().flushes, 0);
    }

    #[test]
    fn what_a_wrong_device_does_is_reported() {
        // It says read-only but takes writes.
        let mut d = disk(contents(MIB), F_FLUSH | F_RO);
        let (failures, out) = run(&mut d, MIN_SCRATCH);
        assert_eq!(failures, 1, "{out}");
        assert!(out.contains("write to sectors 8..16 ACCEPTED by a read-only disk"));
        // It refuses writes it should take.
        let mut d = disk(contents(MIB), F_FLUSH);
        d.transport().read_only = true;
        let (failures, out) = run(&mut d, MIN_SCRATCH);
        assert_eq!(failures, 1, "{out}");
        assert!(out.contains("write to sectors 8..16 failed: IOERR at sector 8"));
        // It gets stuck: every step after says so.
        let mut d = disk(contents(MIB), F_FLUSH);
        d.transport().tick = 10_000_000;
        d.transport().stall = true;
        let (failures, out) = run(&mut d, MIN_SCRATCH);
        assert_eq!(failures, 4, "{out}");
        assert!(out.contains("id unreadable (the device stalled and was reset)"));
        assert!(out.contains("the driver is out of service after a stall"));
    }

    #[test]
    fn small_disks_odd_ids_and_no_flush() {
        let mut d = disk(contents(8 * 512), F_RO);
        let mut id = [0u8; ID_BYTES];
        id[..9].copy_from_slice(b"a\"b\\c\x01\xff  ");
        d.transport().id = id;
        d.transport().read_only = true;
        let (failures, out) = run(&mut d, MIN_SCRATCH + 100);
        assert_eq!(failures, 0, "{out}");
        assert!(out.contains("id \"a\\x22b\\x5cc\\x01\\xff  \", 8 sectors, read-only\n"));
        assert!(out.contains("too small for the write test (sectors 8..16)"));
        assert!(out.contains("read of sectors 7..9 (past the end) refused (IOERR)"));
        let mut d = disk(contents(64 * 512), 0);
        let (failures, out) = run(&mut d, MIN_SCRATCH);
        assert_eq!(failures, 0, "{out}");
        assert!(
            out.contains("wrote sectors 8..16, not flushed (no flush offered), read back: match")
        );
        let (failures, out) = run(&mut d, MIN_SCRATCH - 512);
        assert_eq!(failures, 1, "{out}");
        assert!(out.contains("too small (at least 12288)"));
    }
}

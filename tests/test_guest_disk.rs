//! The test guest's polling virtio-block driver against the VMM's block device, on real KVM:
//! with `thaw.disk-test=1` the guest reads, checksums, writes (or tries to) and reads back each
//! disk and prints what it found; the host checks that against the image files it gave the
//! machine, and checks the files afterwards. See docs/test-guest.md, "The disk test".

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;

use std::path::{Path, PathBuf};
use std::time::Duration;

use fixture::{TestVm, VmRun, pattern, require_kvm};
use vmm_core::config::{DiskConfig, VsockConfig};
use vmm_core::{ExitReason, MachineConfig};

const SECTOR: usize = 512;
/// Sectors at the start of a disk the guest checksums.
const CHECKSUM_SECTORS: usize = 2048;
/// Sectors the guest writes.
const WRITTEN: std::ops::Range<usize> = 8..16;
/// What the guest's disk test exits with when a window holds no usable block device.
const EXIT_NO_DISK: u8 = 6;

/// The guest's checksum, written again here from its description (FNV-1a over little-endian
/// 64-bit words, each xored with its index rotated by 32 bits), so the two are checked against
/// each other rather than sharing a mistake.
fn checksum(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, word) in data.chunks_exact(8).enumerate() {
        let w = u64::from_le_bytes(word.try_into().unwrap());
        h ^= w ^ (i as u64).rotate_left(32);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The byte the guest writes at byte `offset` of a disk.
fn pattern_byte(offset: usize) -> u8 {
    ((offset as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

fn machine(cmdline: &str, disks: Vec<DiskConfig>, vsock: Option<VsockConfig>) -> MachineConfig {
    MachineConfig {
        mem_mib: 128,
        vcpus: 1,
        kernel: thaw::test_guest::kernel(),
        initrd: None,
        cmdline: cmdline.into(),
        vsock,
        disks,
    }
}

fn run(config: MachineConfig) -> VmRun {
    TestVm::new(config).timeout(Duration::from_secs(60)).run()
}

fn disk(path: &Path, read_only: bool, id: &str) -> DiskConfig {
    DiskConfig {
        path: path.to_owned(),
        read_only,
        id: id.into(),
    }
}

/// A sparse image of `len` bytes.
fn sparse_image(path: &Path, len: u64) -> PathBuf {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
    path.to_owned()
}

/// Asserts that every line in `lines` is a whole line of the console output; one that ends in a
/// space is the start of a line (what follows it varies: timings, the vendor id).
fn assert_lines(run: &VmRun, lines: &[String]) {
    let output = run.output.replace('\r', "");
    for line in lines {
        let found = if line.ends_with(' ') {
            output.lines().any(|l| l.starts_with(line.as_str()))
        } else {
            output.lines().any(|l| l == line)
        };
        assert!(found, "no line {line:?} in:\n{}", run.output);
    }
}

#[test]
fn disk_test_reads_and_writes_and_the_device_refuses_what_it_must() {
    if !require_kvm("disk_test_reads_and_writes_and_the_device_refuses_what_it_must") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A read-only image of 3 MiB and 7 sectors of pseudo-random bytes (longer than the guest's
    // checksum covers, and no round size), and an 8 MiB writable one that is all hole.
    let ro_bytes = pattern((3 << 20) + 7 * SECTOR, 16);
    let ro_path = dir.path().join("ro.img");
    std::fs::write(&ro_path, &ro_bytes).unwrap();
    let rw_len = 8 << 20;
    let rw_path = sparse_image(&dir.path().join("rw.img"), rw_len as u64);
    let (ro_sectors, rw_sectors) = (ro_bytes.len() / SECTOR, rw_len / SECTOR);

    let run = run(machine(
        "thaw.disk-test=1",
        vec![
            disk(&ro_path, true, "thaw-ro-disk"),
            disk(&rw_path, false, "thaw-rw-disk"),
        ],
        None,
    ));
    assert_eq!(run.reason, ExitReason::GuestExit(0), "{}", run.output);
    let ro_sum = checksum(&ro_bytes[..CHECKSUM_SECTORS * SECTOR]);
    let zeros_sum = checksum(&vec![0u8; CHECKSUM_SECTORS * SECTOR]);
    assert_lines(
        &run,
        &[
            // Without vsock the disks are the first two virtio-mmio devices.
            "disk-test: vda: virtio-mmio block device at 0xd0000000 (irq 5, ".into(),
            format!("disk-test: vda: id \"thaw-ro-disk\", {ro_sectors} sectors, read-only, flush"),
            format!("disk-test: vda: sectors 0..2048 checksum {ro_sum:#018x} (1024 KiB read in "),
            "disk-test: vda: write to sectors 8..16 refused (IOERR), as a read-only disk should; \
             sectors unchanged"
                .into(),
            format!(
                "disk-test: vda: read of sectors {}..{} (past the end) refused (IOERR)",
                ro_sectors - 1,
                ro_sectors + 1
            ),
            "disk-test: vdb: virtio-mmio block device at 0xd0001000 (irq 6, ".into(),
            format!("disk-test: vdb: id \"thaw-rw-disk\", {rw_sectors} sectors, writable, flush"),
            format!(
                "disk-test: vdb: sectors 0..2048 checksum {zeros_sum:#018x} (1024 KiB read in "
            ),
            "disk-test: vdb: wrote sectors 8..16, flushed, read back: match".into(),
            format!(
                "disk-test: vdb: read of sectors {}..{} (past the end) refused (IOERR)",
                rw_sectors - 1,
                rw_sectors + 1
            ),
            "disk-test: done: 2 disks, 0 failures".into(),
        ],
    );

    // The read-only image is as it was; the writable one holds the pattern where the guest
    // wrote it and nothing anywhere else.
    assert!(
        std::fs::read(&ro_path).unwrap() == ro_bytes,
        "the read-only image changed"
    );
    let rw_after = std::fs::read(&rw_path).unwrap();
    assert_eq!(rw_after.len(), rw_len, "the writable image changed size");
    let written = WRITTEN.start * SECTOR..WRITTEN.end * SECTOR;
    for (offset, byte) in rw_after.iter().enumerate() {
        let expected = if written.contains(&offset) {
            pattern_byte(offset)
        } else {
            0
        };
        assert_eq!(*byte, expected, "byte {offset} of the writable image");
    }
}

#[test]
fn disk_test_skips_the_vsock_device_and_exits_with_thaw_exit() {
    if !require_kvm("disk_test_skips_the_vsock_device_and_exits_with_thaw_exit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rw_path = sparse_image(&dir.path().join("rw.img"), 64 * SECTOR as u64);
    let vsock = VsockConfig {
        guest_cid: 3,
        uds_path: dir.path().join("vsock.sock"),
    };
    let run = run(machine(
        "thaw.disk-test=1 thaw.exit=9",
        vec![disk(&rw_path, false, "only")],
        Some(vsock),
    ));
    assert_eq!(run.reason, ExitReason::GuestExit(9), "{}", run.output);
    assert_lines(
        &run,
        &[
            "disk-test: 0xd0000000: virtio device 19, not a block device; skipped".into(),
            "disk-test: vda: virtio-mmio block device at 0xd0001000 (irq 6, ".into(),
            "disk-test: vda: id \"only\", 64 sectors, writable, flush".into(),
            "disk-test: vda: wrote sectors 8..16, flushed, read back: match".into(),
            "disk-test: done: 1 disk, 0 failures".into(),
        ],
    );
}

#[test]
fn disk_test_without_disks_says_so() {
    if !require_kvm("disk_test_without_disks_says_so") {
        return;
    }
    let run = run(machine("thaw.disk-test=1", Vec::new(), None));
    assert_eq!(
        run.reason,
        ExitReason::GuestExit(EXIT_NO_DISK),
        "{}",
        run.output
    );
    assert_lines(
        &run,
        &["disk-test: no usable virtio-mmio block device among 0 on the command line".into()],
    );
}

//! Test memory and snapshot helpers shared by the round-trip and tamper suites.
#![allow(dead_code)]

use std::path::Path;

use snapshot::{
    CpuIdentity, CpuidEntry, Fingerprint, MasterKey, MemoryRegion, Protection, ReadError, Snapshot,
    SnapshotMeta, VerifySummary, WriteOptions, WriteSummary,
};

pub const PAGE: usize = 4096;
/// Small chunks keep the tests fast while exercising every chunk kind.
pub const CHUNK: usize = 16 * PAGE;
pub const HIGH_ADDR: u64 = 0x1_0000_0000;

pub fn xorshift(seed: u64, out: &mut [u8]) {
    let mut x = seed | 1;
    for b in out {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 32) as u8;
    }
}

pub fn text(out: &mut [u8]) {
    let words = b"the quick thaw restores microVMs lazily from encrypted chunks; ";
    for (i, b) in out.iter_mut().enumerate() {
        *b = words[(i * 7 + i / 97) % words.len()];
    }
}

/// Two regions of mixed memory. Region 0 (at 0, 5 chunks + 3 pages):
/// chunk 0 all zero, 1 text, 2 random, 3 half zero pages, 4 random, tail 3 pages with a
/// single non-zero byte in the middle page. Region 1 (at 4 GiB, 2 chunks): text, zero.
/// Chunks 2 and 4 are incompressible, so both are stored raw with equal lengths.
pub fn mixed_memory() -> (Vec<u8>, Vec<u8>) {
    let mut a = vec![0u8; 5 * CHUNK + 3 * PAGE];
    text(&mut a[CHUNK..2 * CHUNK]);
    xorshift(1, &mut a[2 * CHUNK..3 * CHUNK]);
    for p in (0..16).step_by(2) {
        let start = 3 * CHUNK + p * PAGE;
        xorshift(p as u64 + 10, &mut a[start..start + PAGE]);
    }
    xorshift(2, &mut a[4 * CHUNK..5 * CHUNK]);
    a[5 * CHUNK + PAGE + 1234] = 0x7f;
    let mut b = vec![0u8; 2 * CHUNK];
    text(&mut b[..CHUNK]);
    (a, b)
}

pub fn regions<'a>(a: &'a [u8], b: &'a [u8]) -> Vec<MemoryRegion<'a>> {
    vec![
        MemoryRegion {
            guest_addr: 0,
            bytes: a,
        },
        MemoryRegion {
            guest_addr: HIGH_ADDR,
            bytes: b,
        },
    ]
}

pub fn meta() -> SnapshotMeta {
    let cpuid = vec![CpuidEntry {
        function: 7,
        index: 0,
        flags: 1,
        eax: 0,
        ebx: 1 << 5,
        ecx: 0,
        edx: 0,
    }];
    SnapshotMeta {
        fingerprint: Fingerprint {
            cpu: CpuIdentity {
                vendor: "AuthenticAMD".into(),
                family: 0x19,
                model: 1,
                stepping: 1,
            },
            guest_cpuid: cpuid,
            kvm_flavor: "pvm-flavor-marker".into(),
            host_page_size: 4096,
        },
        vcpus: 2,
    }
}

pub fn options() -> WriteOptions {
    WriteOptions {
        chunk_size: CHUNK as u32,
        threads: 2,
        ..WriteOptions::default()
    }
}

pub const STATE: &[u8] = b"opaque vCPU and device state, serialized by the caller with bincode";

pub fn key() -> MasterKey {
    MasterKey::from_bytes([0x11; 32])
}

pub fn write_mixed(dir: &Path, protection: &Protection<'_>) -> WriteSummary {
    let (a, b) = mixed_memory();
    snapshot::write(
        dir,
        &meta(),
        STATE,
        &regions(&a, &b),
        protection,
        &options(),
    )
    .unwrap()
}

/// Opens and verifies every chunk: the way a caller would check a snapshot end to end.
pub fn open_and_verify(dir: &Path, key: Option<&MasterKey>) -> Result<VerifySummary, ReadError> {
    Snapshot::open(dir, key)?.verify(2)
}

pub fn file(dir: &Path) -> std::path::PathBuf {
    dir.join(snapshot::SNAPSHOT_FILE)
}

pub fn flip(dir: &Path, offset: u64) {
    let mut bytes = std::fs::read(file(dir)).unwrap();
    bytes[offset as usize] ^= 0x01;
    std::fs::write(file(dir), bytes).unwrap();
}

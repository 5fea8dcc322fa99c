//! Round trips: mixed memory written and read back byte-exact, encrypted and plaintext, with
//! the accounting `Info` reports.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

mod common;

use common::*;
use snapshot::{ChunkKind, Protection, Snapshot, WriteOptions};

fn read_all(snap: &Snapshot) -> Vec<(u64, Vec<u8>)> {
    snap.chunks()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut out = vec![0xaa; c.len as usize];
            snap.read_chunk(i, &mut out).unwrap();
            (c.guest_addr, out)
        })
        .collect()
}

fn assert_matches_memory(snap: &Snapshot) {
    let (a, b) = mixed_memory();
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    for (addr, bytes) in read_all(snap) {
        if addr >= HIGH_ADDR {
            assert_eq!(addr - HIGH_ADDR, got_b.len() as u64);
            got_b.extend_from_slice(&bytes);
        } else {
            assert_eq!(addr, got_a.len() as u64);
            got_a.extend_from_slice(&bytes);
        }
    }
    assert!(got_a == a, "region 0 differs");
    assert!(got_b == b, "region 1 differs");
}

#[test]
fn encrypted_mixed_memory_round_trips_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("snap");
    let key = key();
    let summary = write_mixed(&target, &Protection::Encrypted(&key));
    let snap = Snapshot::open(&target, Some(&key)).unwrap();
    assert_eq!(snap.state(), STATE);
    let checked = snap.authenticate_chunks().unwrap();
    assert_eq!(checked.stored_bytes, snap.info().memory_payload_bytes);
    assert_matches_memory(&snap);

    let kinds: Vec<_> = snap.chunks().iter().map(|c| c.kind).collect();
    use ChunkKind::{Data, Zero};
    assert_eq!(kinds, [Zero, Data, Data, Data, Data, Data, Data, Zero]);
    assert_eq!(snap.chunks()[5].len as usize, 3 * PAGE);
    assert_eq!(snap.chunks()[6].guest_addr, HIGH_ADDR);

    let info = snap.info();
    assert!(info.encrypted);
    assert!(info.warning.is_none());
    assert_eq!(info.key_id, Some(key.id().to_string()));
    assert_eq!(info.snapshot_id, summary.snapshot_id);
    assert_eq!(info.chunk_count, 8);
    assert_eq!(info.zero_chunks, 2);
    assert_eq!(info.memory_bytes, (7 * CHUNK + 3 * PAGE) as u64);
    // Zero pages: chunks 0 and 7 (32), 8 in chunk 3, 2 in the tail.
    assert_eq!(info.zero_pages, 42);
    assert_eq!(summary.zero_pages, 42);
    assert_eq!(
        info.file_bytes,
        std::fs::metadata(file(&target)).unwrap().len()
    );
    assert_eq!(info.file_bytes, summary.file_bytes);
    assert_eq!(info.memory_payload_bytes, summary.memory_payload_bytes);
    let ratio = info.compression_ratio.unwrap();
    assert!(ratio > 0.3 && ratio < 1.0, "ratio {ratio}");
    assert_eq!(info.fingerprint, meta().fingerprint);
    assert_eq!(info.vcpus, 2);
    assert_eq!((snap.vcpus(), snap.id()), (2, summary.snapshot_id));
    assert_eq!(snap.fingerprint(), &meta().fingerprint);
    assert_eq!(snap.regions().len(), 2);

    let verified = snap.verify(2).unwrap();
    assert_eq!(verified.chunks_checked, 8);
    assert_eq!(verified.data_chunks, 6);
    assert_eq!(verified.stored_bytes, info.memory_payload_bytes);
}

#[test]
fn encrypted_snapshot_does_not_contain_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("snap");
    write_mixed(&target, &Protection::Encrypted(&key()));
    let bytes = std::fs::read(file(&target)).unwrap();
    let needle = &STATE[..24];
    assert!(!bytes.windows(needle.len()).any(|w| w == needle));
    let (a, _) = mixed_memory();
    let random_page = &a[2 * CHUNK..2 * CHUNK + 64];
    assert!(!bytes.windows(64).any(|w| w == random_page));
}

#[test]
fn plaintext_mode_round_trips_and_reports_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("snap");
    write_mixed(&target, &Protection::InsecurePlaintext);
    let snap = Snapshot::open(&target, None).unwrap();
    assert_eq!(snap.state(), STATE);
    assert_matches_memory(&snap);
    snap.verify(1).unwrap();
    let info = snap.info();
    assert!(!info.encrypted);
    assert_eq!(info.protection, "insecure-plaintext");
    assert!(info.warning.unwrap().contains("NOT encrypted"));
    assert!(info.to_string().starts_with("!!! INSECURE PLAINTEXT"));
    assert_eq!(info.key_id, None);
}

#[test]
fn default_chunk_size_round_trips_and_reads_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("snap");
    let mut mem = vec![0u8; 2 * snapshot::DEFAULT_CHUNK_SIZE as usize + 5 * PAGE];
    text(&mut mem[PAGE..40 * PAGE]);
    xorshift(5, &mut mem[70 * PAGE..130 * PAGE]);
    let region = [snapshot::MemoryRegion {
        guest_addr: 0x10_0000,
        bytes: &mem,
    }];
    let key = key();
    let options = WriteOptions {
        threads: 0,
        ..WriteOptions::default()
    };
    snapshot::write(
        &target,
        &meta(),
        b"",
        &region,
        &Protection::Encrypted(&key),
        &options,
    )
    .unwrap();
    let snap = Snapshot::open(&target, Some(&key)).unwrap();
    assert_eq!(snap.state(), b"");
    assert_eq!(snap.chunk_size(), snapshot::DEFAULT_CHUNK_SIZE);
    let chunks = snap.chunks().to_vec();
    std::thread::scope(|s| {
        for t in 0..3 {
            let (snap, chunks, mem) = (&snap, &chunks, &mem);
            s.spawn(move || {
                for (i, c) in chunks.iter().enumerate().skip(t % 2) {
                    let mut out = vec![1u8; c.len as usize];
                    snap.read_chunk(i, &mut out).unwrap();
                    let start = (c.guest_addr - 0x10_0000) as usize;
                    assert!(out == mem[start..start + out.len()]);
                }
            });
        }
    });
}

#[test]
fn info_serializes_to_json_friendly_fields() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("snap");
    write_mixed(&target, &Protection::InsecurePlaintext);
    let info = Snapshot::open(&target, None).unwrap().info();
    // bincode is the only serializer at hand; it proves Serialize works without a JSON dep.
    let bytes = bincode::serde::encode_to_vec(&info, bincode::config::standard()).unwrap();
    assert!(!bytes.is_empty());
    let id = info.snapshot_id.to_string();
    assert_eq!(id.len(), 32);
    assert!(bytes.windows(32).any(|w| w == id.as_bytes()));
}

#[test]
fn read_chunk_rejects_bad_index_and_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("snap");
    write_mixed(&target, &Protection::InsecurePlaintext);
    let snap = Snapshot::open(&target, None).unwrap();
    let mut out = vec![0u8; CHUNK];
    assert!(matches!(
        snap.read_chunk(99, &mut out),
        Err(snapshot::ReadError::NoSuchChunk {
            index: 99,
            count: 8
        })
    ));
    assert!(matches!(
        snap.read_chunk(5, &mut out),
        Err(snapshot::ReadError::OutputLength { index: 5, .. })
    ));
}

//! Tests of the reader's parsers: preamble edge cases and the sanity checks an authenticated
//! but inconsistent header or manifest must still fail.

use super::*;

#[test]
fn snapshot_is_send_and_sync() {
    fn assert_sync<T: Send + Sync>() {}
    assert_sync::<Snapshot>();
}

#[test]
fn refuses_a_directory_without_a_snapshot_file() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Snapshot::open(dir.path(), None),
        Err(ReadError::Io { .. })
    ));
}

#[test]
fn refuses_a_file_that_is_not_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(SNAPSHOT_FILE), b"#!/bin/sh\necho hello\n").unwrap();
    assert!(matches!(
        Snapshot::open(dir.path(), None),
        Err(ReadError::NotASnapshot)
    ));
    std::fs::write(dir.path().join(SNAPSHOT_FILE), b"THA").unwrap();
    assert!(matches!(
        Snapshot::open(dir.path(), None),
        Err(ReadError::Truncated {
            expected: 112,
            found: 3
        })
    ));
}

use crate::fingerprint::{CpuIdentity, Fingerprint};
use crate::format::{DataChunk, RegionDesc, SectionRef};

const TAG: u64 = 16;

fn header(chunks_offset: u64) -> Header {
    Header {
        snapshot_id: [1; 16],
        created_unix_nanos: 0,
        chunk_size: 4 * 4096,
        page_size: 4096,
        vcpus: 1,
        zstd_level: 1,
        // Two chunks: 16 KiB and 8 KiB.
        regions: vec![RegionDesc {
            guest_addr: 0,
            size: 6 * 4096,
        }],
        fingerprint: Fingerprint {
            cpu: CpuIdentity {
                vendor: "x".into(),
                family: 0,
                model: 0,
                stepping: 0,
            },
            guest_cpuid: vec![],
            kvm_flavor: "pvm".into(),
            host_page_size: 4096,
        },
        chunk_count: 2,
        chunks: SectionRef {
            offset: chunks_offset,
            len: 10_000,
        },
        state: SectionRef {
            offset: chunks_offset + 10_000,
            len: TAG,
        },
        manifest: SectionRef {
            offset: chunks_offset + 10_000 + TAG,
            len: 100,
        },
    }
}

/// The preamble of a file laid out as `header(1000)` says.
fn preamble() -> Preamble {
    Preamble {
        version: 1,
        protection: PROTECTION_AES_256_GCM,
        file_len: 1000 + 10_000 + TAG + 100,
        header_len: 0,
        key_id: crate::keys::KeyId::default(),
        wrap_nonce: [0; 12],
        wrapped_key: [0; 48],
    }
}

fn raw_chunk(offset: u64, bitmap: u8) -> ChunkEntry {
    let pages = u64::from(bitmap.count_ones());
    ChunkEntry::Data(DataChunk {
        offset,
        stored_len: (pages * 4096 + TAG) as u32,
        raw: true,
        page_bitmap: vec![bitmap],
        hash: [0; 32],
    })
}

fn manifest_reason(h: &Header, m: &[ChunkEntry]) -> String {
    match check_manifest(h, m, TAG) {
        Err(ReadError::ManifestInvalid { reason }) => reason,
        other => panic!("expected ManifestInvalid, got {other:?}"),
    }
}

#[test]
fn accepts_a_consistent_manifest() {
    let h = header(1000);
    let infos = check_manifest(&h, &[raw_chunk(1000, 0b0001), ChunkEntry::Zero], TAG).unwrap();
    assert_eq!(infos.len(), 2);
    assert_eq!((infos[1].guest_addr, infos[1].len), (4 * 4096, 2 * 4096));
    assert_eq!(infos[1].kind, ChunkKind::Zero);
}

#[test]
fn rejects_manifest_with_wrong_entry_count() {
    let r = manifest_reason(&header(1000), &[ChunkEntry::Zero]);
    assert!(r.contains("1 entries for 2 chunks"), "{r}");
}

#[test]
fn rejects_overlapping_or_out_of_area_chunks() {
    let h = header(1000);
    let r = manifest_reason(&h, &[raw_chunk(1000, 1), raw_chunk(1000 + 4096, 1)]);
    assert!(r.contains("chunk 1: overlaps"), "{r}");
    let r = manifest_reason(&h, &[raw_chunk(999, 1), ChunkEntry::Zero]);
    assert!(r.contains("chunk 0: overlaps"), "{r}");
    let r = manifest_reason(&h, &[ChunkEntry::Zero, raw_chunk(8000, 1)]);
    assert!(r.contains("outside the chunk area"), "{r}");
}

#[test]
fn rejects_bitmaps_that_do_not_fit_the_chunk() {
    let h = header(1000);
    // Chunk 1 has two pages; bit 2 lies past its end.
    let r = manifest_reason(&h, &[ChunkEntry::Zero, raw_chunk(1000, 0b0100)]);
    assert!(r.contains("bitmap"), "{r}");
    let r = manifest_reason(&h, &[ChunkEntry::Zero, raw_chunk(1000, 0)]);
    assert!(r.contains("bitmap"), "{r}");
    let ChunkEntry::Data(mut long) = raw_chunk(1000, 1) else {
        unreachable!()
    };
    long.page_bitmap = vec![1, 0];
    let r = manifest_reason(&h, &[ChunkEntry::Data(long), ChunkEntry::Zero]);
    assert!(r.contains("bitmap length"), "{r}");
}

#[test]
fn rejects_stored_lengths_that_do_not_fit_the_pages() {
    let h = header(1000);
    let ChunkEntry::Data(mut raw) = raw_chunk(1000, 1) else {
        unreachable!()
    };
    raw.stored_len += 1;
    let r = manifest_reason(&h, &[ChunkEntry::Data(raw.clone()), ChunkEntry::Zero]);
    assert!(r.contains("stored length"), "{r}");
    raw.raw = false;
    raw.stored_len = 4096 + TAG as u32;
    let r = manifest_reason(&h, &[ChunkEntry::Data(raw.clone()), ChunkEntry::Zero]);
    assert!(r.contains("stored length"), "{r}");
    raw.stored_len = 4;
    let r = manifest_reason(&h, &[ChunkEntry::Data(raw), ChunkEntry::Zero]);
    assert!(r.contains("shorter than its tag"), "{r}");
}

/// A validly sealed header may still describe more memory than its manifest could: 1 TiB in
/// 4 KiB chunks is refused from the header's numbers, before any layout is built.
#[test]
fn rejects_more_chunks_than_the_manifest_can_describe() {
    let mut h = header(1000);
    h.chunk_size = 4096;
    h.regions = vec![RegionDesc {
        guest_addr: 0,
        size: 1 << 40,
    }];
    h.chunk_count = (1u64 << 40) / 4096;
    let p = preamble();
    match check_header(&h, &p, 1000, TAG) {
        Err(ReadError::HeaderInvalid { reason }) => {
            assert!(reason.contains("more chunks than the manifest"), "{reason}")
        }
        other => panic!("expected HeaderInvalid, got {other:?}"),
    }
    // And a manifest of the wrong length is told so before the layout is built.
    let r = manifest_reason(&h, &[ChunkEntry::Zero]);
    assert!(r.contains("1 entries for 268435456 chunks"), "{r}");
}

#[test]
fn rejects_headers_whose_sections_do_not_tile_the_file() {
    let h = header(1000);
    let p = preamble();
    assert!(check_header(&h, &p, 1000, TAG).is_ok());
    assert!(matches!(
        check_header(&h, &p, 999, TAG),
        Err(ReadError::HeaderInvalid { .. })
    ));
    let mut bad = h.clone();
    bad.chunk_count = 3;
    assert!(matches!(
        check_header(&bad, &p, 1000, TAG),
        Err(ReadError::HeaderInvalid { .. })
    ));
    let mut bad = h.clone();
    bad.chunk_size = 5000;
    assert!(matches!(
        check_header(&bad, &p, 1000, TAG),
        Err(ReadError::HeaderInvalid { .. })
    ));
    let mut bad = h;
    bad.state.len = 1;
    bad.manifest.offset = bad.state.offset + 1;
    bad.manifest.len += TAG - 1;
    assert!(matches!(
        check_header(&bad, &p, 1000, TAG),
        Err(ReadError::HeaderInvalid { .. })
    ));
}

//! The tamper suite: every kind of damage to a snapshot is caught, and named by the specific
//! error of the step that caught it, whether the caller only opens or also verifies.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use snapshot::{MasterKey, Protection, ReadError, Snapshot, VerifySummary};

fn fresh(protection: &Protection<'_>) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("snap");
    write_mixed(&target, protection);
    (dir, target)
}

fn layout(target: &Path, key: Option<&MasterKey>) -> snapshot::FileLayout {
    Snapshot::open(target, key).unwrap().layout().unwrap()
}

fn mid(r: &std::ops::Range<u64>) -> u64 {
    r.start + (r.end - r.start) / 2
}

/// `open` alone and `open` + `verify` must both fail with the expected error.
fn assert_rejected(
    target: &Path,
    key: Option<&MasterKey>,
    check: impl Fn(&ReadError) -> bool,
) -> ReadError {
    let opened = Snapshot::open(target, key).map(|_| ());
    let err = opened.expect_err("open accepted a damaged snapshot");
    assert!(check(&err), "open: unexpected error {err:?}");
    let verified: Result<VerifySummary, ReadError> = open_and_verify(target, key);
    let err = verified.expect_err("verify accepted a damaged snapshot");
    assert!(check(&err), "verify: unexpected error {err:?}");
    err
}

#[test]
fn flipped_header_byte_is_header_tampered() {
    let key = key();
    for pick in [0u64, 1, 2] {
        let (_d, target) = fresh(&Protection::Encrypted(&key));
        let l = layout(&target, Some(&key));
        let at = match pick {
            0 => l.header.start,
            1 => mid(&l.header),
            _ => l.header_tag.start,
        };
        flip(&target, at);
        assert_rejected(&target, Some(&key), |e| {
            matches!(e, ReadError::HeaderTampered)
        });
    }
}

#[test]
fn flipped_kvm_flavor_in_header_is_header_tampered() {
    let key = key();
    let (_d, target) = fresh(&Protection::Encrypted(&key));
    let bytes = fs::read(file(&target)).unwrap();
    let at = bytes.windows(10).position(|w| w == b"pvm-flavor").unwrap();
    flip(&target, at as u64);
    assert_rejected(&target, Some(&key), |e| {
        matches!(e, ReadError::HeaderTampered)
    });
}

#[test]
fn flipped_state_byte_is_state_tampered() {
    let key = key();
    let (_d, target) = fresh(&Protection::Encrypted(&key));
    flip(&target, mid(&layout(&target, Some(&key)).state));
    assert_rejected(&target, Some(&key), |e| {
        matches!(e, ReadError::StateTampered)
    });
}

#[test]
fn flipped_manifest_byte_is_manifest_tampered() {
    let key = key();
    let (_d, target) = fresh(&Protection::Encrypted(&key));
    flip(&target, mid(&layout(&target, Some(&key)).manifest));
    assert_rejected(&target, Some(&key), |e| {
        matches!(e, ReadError::ManifestTampered)
    });
}

#[test]
fn flipped_chunk_byte_is_chunk_tampered_on_read_and_verify() {
    let key = key();
    let (_d, target) = fresh(&Protection::Encrypted(&key));
    let l = layout(&target, Some(&key));
    let (index, range) = l.data_chunks[2].clone();
    flip(&target, mid(&range));
    let snap = Snapshot::open(&target, Some(&key)).expect("chunks are checked when read");
    let mut out = vec![0u8; snap.chunks()[index].len as usize];
    assert!(matches!(
        snap.read_chunk(index, &mut out),
        Err(ReadError::ChunkTampered { index: i }) if i == index
    ));
    let err = snap.verify(2).unwrap_err();
    assert!(
        matches!(err, ReadError::ChunkTampered { index: i } if i == index),
        "{err:?}"
    );
    // The lazy restore's up-front check, which does not decompress, finds it too.
    let err = snap.authenticate_chunks().unwrap_err();
    assert!(
        matches!(err, ReadError::ChunkTampered { index: i } if i == index),
        "{err:?}"
    );
    // Other chunks still read.
    let (other, _) = l.data_chunks[0];
    let mut out = vec![0u8; snap.chunks()[other].len as usize];
    snap.read_chunk(other, &mut out).unwrap();
}

#[test]
fn truncation_anywhere_is_truncated() {
    let key = key();
    let (_d, target) = fresh(&Protection::Encrypted(&key));
    let l = layout(&target, Some(&key));
    let full = fs::read(file(&target)).unwrap();
    let cuts = [
        (0, 112),
        (5, 112),
        (20, 112),
        (50, l.file_len),
        (l.header.start + 10, l.file_len),
        (mid(&l.chunks), l.file_len),
        (l.file_len - 1, l.file_len),
    ];
    for (cut, expected) in cuts {
        fs::write(file(&target), &full[..cut as usize]).unwrap();
        assert_rejected(
            &target,
            Some(&key),
            |e| matches!(e, ReadError::Truncated { expected: x, found } if *x == expected && *found == cut),
        );
    }
}

#[test]
fn appended_bytes_are_trailing_data() {
    let key = key();
    let (_d, target) = fresh(&Protection::Encrypted(&key));
    let mut bytes = fs::read(file(&target)).unwrap();
    bytes.push(0);
    fs::write(file(&target), &bytes).unwrap();
    assert_rejected(&target, Some(&key), |e| {
        matches!(e, ReadError::TrailingData { .. })
    });
}

#[test]
fn wrong_master_key_is_named_with_both_ids() {
    let key = key();
    let other = MasterKey::from_bytes([0x22; 32]);
    let (_d, target) = fresh(&Protection::Encrypted(&key));
    let err = assert_rejected(&target, Some(&other), |e| {
        matches!(e, ReadError::WrongKey { sealed_with, given }
            if *sealed_with == key.id() && *given == other.id())
    });
    let msg = err.to_string();
    assert!(msg.contains(&key.id().to_string()) && msg.contains(&other.id().to_string()));
}

#[test]
fn missing_key_is_key_required_and_plaintext_refuses_a_key() {
    let key = key();
    let (_d, target) = fresh(&Protection::Encrypted(&key));
    assert_rejected(
        &target,
        None,
        |e| matches!(e, ReadError::KeyRequired { key_id } if *key_id == key.id()),
    );
    let (_d2, plain) = fresh(&Protection::InsecurePlaintext);
    assert_rejected(&plain, Some(&key), |e| {
        matches!(e, ReadError::PlaintextWithKey)
    });
}

#[test]
fn corrupt_wrapped_key_or_its_nonce_is_key_unwrap() {
    let key = key();
    for at in [48u64, 59, 60, 90, 107] {
        let (_d, target) = fresh(&Protection::Encrypted(&key));
        flip(&target, at);
        assert_rejected(&target, Some(&key), |e| matches!(e, ReadError::KeyUnwrap));
    }
}

#[test]
fn flipped_key_id_is_wrong_key() {
    let key = key();
    let (_d, target) = fresh(&Protection::Encrypted(&key));
    flip(&target, 40);
    assert_rejected(&target, Some(&key), |e| {
        matches!(e, ReadError::WrongKey { .. })
    });
}

#[test]
fn swapped_chunks_of_equal_length_are_chunk_tampered() {
    let key = key();
    let (_d, target) = fresh(&Protection::Encrypted(&key));
    let l = layout(&target, Some(&key));
    // Chunks 2 and 4 are random, stored raw: same length by construction.
    let find = |i: usize| {
        l.data_chunks
            .iter()
            .find(|(j, _)| *j == i)
            .unwrap()
            .1
            .clone()
    };
    let (r2, r4) = (find(2), find(4));
    assert_eq!(r2.end - r2.start, r4.end - r4.start);
    let mut bytes = fs::read(file(&target)).unwrap();
    let c2 = bytes[r2.start as usize..r2.end as usize].to_vec();
    let c4 = bytes[r4.start as usize..r4.end as usize].to_vec();
    bytes[r2.start as usize..r2.end as usize].copy_from_slice(&c4);
    bytes[r4.start as usize..r4.end as usize].copy_from_slice(&c2);
    fs::write(file(&target), &bytes).unwrap();
    let snap = Snapshot::open(&target, Some(&key)).unwrap();
    let mut out = vec![0u8; CHUNK];
    assert!(matches!(
        snap.read_chunk(2, &mut out),
        Err(ReadError::ChunkTampered { index: 2 })
    ));
    assert!(matches!(
        snap.read_chunk(4, &mut out),
        Err(ReadError::ChunkTampered { index: 4 })
    ));
    assert!(matches!(
        snap.verify(2),
        Err(ReadError::ChunkTampered { .. })
    ));
    assert!(matches!(
        snap.authenticate_chunks(),
        Err(ReadError::ChunkTampered { .. })
    ));
}

#[test]
fn chunk_or_state_spliced_from_another_snapshot_is_tampered() {
    let key = key();
    let (_d, target) = fresh(&Protection::Encrypted(&key));
    let (_d2, donor) = fresh(&Protection::Encrypted(&key));
    let (lt, ld) = (layout(&target, Some(&key)), layout(&donor, Some(&key)));
    assert_eq!(lt.data_chunks, ld.data_chunks, "same memory, same layout");
    let donor_bytes = fs::read(file(&donor)).unwrap();
    let mut bytes = fs::read(file(&target)).unwrap();
    let (index, r) = lt.data_chunks[1].clone();
    let r = r.start as usize..r.end as usize;
    bytes[r.clone()].copy_from_slice(&donor_bytes[r]);
    fs::write(file(&target), &bytes).unwrap();
    let snap = Snapshot::open(&target, Some(&key)).unwrap();
    let err = snap.verify(2).unwrap_err();
    assert!(
        matches!(err, ReadError::ChunkTampered { index: i } if i == index),
        "{err:?}"
    );

    let s = lt.state.start as usize..lt.state.end as usize;
    assert_eq!(lt.state, ld.state);
    bytes[s.clone()].copy_from_slice(&donor_bytes[s]);
    fs::write(file(&target), &bytes).unwrap();
    assert_rejected(&target, Some(&key), |e| {
        matches!(e, ReadError::StateTampered)
    });
}

#[test]
fn bad_magic_is_not_a_snapshot() {
    let key = key();
    let (_d, target) = fresh(&Protection::Encrypted(&key));
    flip(&target, 3);
    assert_rejected(&target, Some(&key), |e| {
        matches!(e, ReadError::NotASnapshot)
    });
}

#[test]
fn future_version_is_unsupported() {
    let key = key();
    let (_d, target) = fresh(&Protection::Encrypted(&key));
    let mut bytes = fs::read(file(&target)).unwrap();
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    fs::write(file(&target), &bytes).unwrap();
    assert_rejected(&target, Some(&key), |e| {
        matches!(
            e,
            ReadError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        )
    });
}

#[test]
fn plaintext_snapshot_still_detects_damage() {
    for part in ["header", "state", "manifest", "chunk"] {
        let (_d, target) = fresh(&Protection::InsecurePlaintext);
        let l = layout(&target, None);
        let at = match part {
            "header" => mid(&l.header),
            "state" => mid(&l.state),
            "manifest" => mid(&l.manifest),
            _ => mid(&l.data_chunks[0].1),
        };
        flip(&target, at);
        let err = open_and_verify(&target, None).unwrap_err();
        let ok = match part {
            "header" => matches!(err, ReadError::HeaderTampered),
            "state" => matches!(err, ReadError::StateTampered),
            "manifest" => matches!(err, ReadError::ManifestTampered),
            _ => matches!(err, ReadError::ChunkTampered { .. }),
        };
        assert!(ok, "{part}: {err:?}");
    }
}

#[test]
fn plaintext_flag_cannot_downgrade_an_encrypted_snapshot() {
    let key = key();
    let (_d, target) = fresh(&Protection::Encrypted(&key));
    let mut bytes = fs::read(file(&target)).unwrap();
    bytes[12..16].copy_from_slice(&2u32.to_le_bytes());
    fs::write(file(&target), &bytes).unwrap();
    assert_rejected(&target, Some(&key), |e| {
        matches!(e, ReadError::PlaintextWithKey)
    });
    assert_rejected(&target, None, |e| matches!(e, ReadError::HeaderTampered));
}

#[test]
fn garbage_header_length_is_rejected_before_reading() {
    let key = key();
    let (_d, target) = fresh(&Protection::Encrypted(&key));
    let mut bytes = fs::read(file(&target)).unwrap();
    bytes[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
    fs::write(file(&target), &bytes).unwrap();
    assert_rejected(&target, Some(&key), |e| {
        matches!(e, ReadError::HeaderLength { .. })
    });
}

/// What `open_observing` tells before the rest of the file is read is the authenticated
/// header's: never told for a header that does not authenticate or a wrong key, and told (the
/// size the opened snapshot has) when a later section is what gets the file refused.
#[test]
fn the_machine_size_is_told_only_from_an_authenticated_header() {
    let key = key();
    let told = |target: &Path, key: &MasterKey| {
        let mut seen = Vec::new();
        let opened = Snapshot::open_observing(target, Some(key), &mut |size| seen.push(size));
        (opened, seen)
    };

    let (_d, target) = fresh(&Protection::Encrypted(&key));
    let (opened, seen) = told(&target, &key);
    let info = opened.unwrap().info();
    let expected = snapshot::MachineSize {
        vcpus: info.vcpus,
        memory_bytes: info.memory_bytes,
    };
    assert_eq!(seen, vec![expected]);

    let (_d, target) = fresh(&Protection::Encrypted(&key));
    flip(&target, mid(&layout(&target, Some(&key)).header));
    let (opened, seen) = told(&target, &key);
    assert!(matches!(opened, Err(ReadError::HeaderTampered)));
    assert!(seen.is_empty(), "told {seen:?} from a tampered header");

    let (_d, target) = fresh(&Protection::Encrypted(&key));
    let (opened, seen) = told(&target, &MasterKey::generate().unwrap());
    assert!(matches!(opened, Err(ReadError::WrongKey { .. })));
    assert!(seen.is_empty(), "told {seen:?} with the wrong key");

    let (_d, target) = fresh(&Protection::Encrypted(&key));
    flip(&target, mid(&layout(&target, Some(&key)).manifest));
    let (opened, seen) = told(&target, &key);
    assert!(matches!(opened, Err(ReadError::ManifestTampered)));
    assert_eq!(seen, vec![expected], "the header itself was intact");
}

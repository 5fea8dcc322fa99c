//! The working-set file: round trips in both protection modes, replaces atomically, and every
//! kind of damage (flipped byte, truncation, a file from another snapshot, bad indices, a
//! downgraded protection) fails `Snapshot::open` with its own error.

use std::path::{Path, PathBuf};

use super::*;
use crate::fingerprint::{CpuIdentity, Fingerprint};
use crate::keys::MasterKey;
use crate::reader::Snapshot;
use crate::writer::{MemoryRegion, Protection, SnapshotMeta, WriteOptions};

const CHUNK: usize = 16 * 4096;
const CHUNKS: u32 = 8;

fn key() -> MasterKey {
    MasterKey::from_bytes([0x42; 32])
}

fn write_snapshot(parent: &Path, name: &str, protection: &Protection<'_>) -> PathBuf {
    let mut memory = vec![0u8; CHUNKS as usize * CHUNK];
    for (i, b) in memory.iter_mut().enumerate() {
        if (i / CHUNK) % 2 == 1 {
            *b = (i % 251) as u8;
        }
    }
    let dir = parent.join(name);
    crate::writer::write(
        &dir,
        &SnapshotMeta {
            fingerprint: Fingerprint {
                cpu: CpuIdentity {
                    vendor: "AuthenticAMD".into(),
                    family: 0x19,
                    model: 1,
                    stepping: 1,
                },
                guest_cpuid: Vec::new(),
                kvm_flavor: "pvm".into(),
                host_page_size: 4096,
            },
            vcpus: 1,
        },
        b"state",
        &[MemoryRegion {
            guest_addr: 0,
            bytes: &memory,
        }],
        protection,
        &WriteOptions {
            chunk_size: CHUNK as u32,
            threads: 1,
            ..WriteOptions::default()
        },
    )
    .unwrap();
    dir
}

fn set() -> WorkingSet {
    WorkingSet {
        recorded_unix_nanos: 1_700_000_000_000_000_000,
        ..WorkingSet::new(vec![5, 1, 7, 0], 9, RecordingEnd::FirstResponse)
    }
}

fn ws_path(dir: &Path) -> PathBuf {
    dir.join(WORKING_SET_FILE)
}

fn open_err(dir: &Path, key: Option<&MasterKey>) -> WorkingSetError {
    match Snapshot::open(dir, key) {
        Err(ReadError::WorkingSet { source, path }) => {
            assert_eq!(path, ws_path(dir));
            source
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a damaged working set was accepted"),
    }
}

/// An encrypted snapshot with `set()` recorded.
fn recorded(parent: &Path) -> PathBuf {
    let dir = write_snapshot(parent, "snap", &Protection::Encrypted(&key()));
    let snap = Snapshot::open(&dir, Some(&key())).unwrap();
    assert!(snap.working_set().is_none());
    snap.write_working_set(&dir, &set()).unwrap();
    dir
}

#[test]
fn round_trips_and_shows_in_info() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = recorded(tmp.path());
    let snap = Snapshot::open(&dir, Some(&key())).unwrap();
    assert_eq!(snap.working_set(), Some(&set()));
    let info = snap.info();
    assert_eq!(info.working_set_chunks, Some(4));
    assert_eq!(info.working_set_bytes, Some(4 * CHUNK as u64));
    assert!(
        info.to_string().contains("working set: 4 chunks (256 KiB"),
        "{info}"
    );
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    // The body is encrypted: the chunk list does not appear in the clear.
    let bytes = std::fs::read(ws_path(&dir)).unwrap();
    assert!(
        !bytes
            .windows(16)
            .any(|w| w == [5, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0])
    );
    assert_eq!(&bytes[..8], b"THAWWSET");
    assert_eq!(&bytes[32..36], &[5, 0, 0, 0], "nonce domain 5");
}

#[test]
fn a_snapshot_without_one_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_snapshot(tmp.path(), "snap", &Protection::Encrypted(&key()));
    let info = Snapshot::open(&dir, Some(&key())).unwrap().info();
    assert_eq!(info.working_set_chunks, None);
    assert!(info.to_string().contains("working set: none recorded"));
}

fn mkfifo(path: &Path) {
    let c =
        std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str())).unwrap();
    // SAFETY: a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Present but not a working set: a symlink to nothing, a FIFO (which must not hang the
/// reader), a device. Each is refused, none taken as "no working set".
#[test]
fn a_dangling_symlink_a_fifo_or_a_device_as_the_working_set_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_snapshot(tmp.path(), "snap", &Protection::Encrypted(&key()));
    let ws = ws_path(&dir);
    std::os::unix::fs::symlink(tmp.path().join("nothing-here"), &ws).unwrap();
    assert!(matches!(
        open_err(&dir, Some(&key())),
        WorkingSetError::Io(_)
    ));
    std::fs::remove_file(&ws).unwrap();
    mkfifo(&ws);
    let started = std::time::Instant::now();
    let WorkingSetError::Io(e) = open_err(&dir, Some(&key())) else {
        panic!("a FIFO is an I/O error")
    };
    assert!(e.to_string().contains("a FIFO"), "{e}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    std::fs::remove_file(&ws).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &ws).unwrap();
    let WorkingSetError::Io(e) = open_err(&dir, Some(&key())) else {
        panic!("a device is an I/O error")
    };
    assert!(e.to_string().contains("a character device"), "{e}");
}

/// A FIFO in the snapshot file's place fails at once instead of waiting for a writer.
#[test]
fn a_fifo_as_the_snapshot_file_is_refused_without_blocking() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snap");
    std::fs::create_dir(&dir).unwrap();
    mkfifo(&dir.join(crate::format::SNAPSHOT_FILE));
    match Snapshot::open(&dir, Some(&key())) {
        Err(ReadError::Io { source, .. }) => {
            assert!(source.to_string().contains("a FIFO"), "{source}")
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a FIFO was opened as a snapshot"),
    }
}

#[test]
fn replacing_and_removing_are_atomic_and_use_fresh_nonces() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = recorded(tmp.path());
    let first = std::fs::read(ws_path(&dir)).unwrap();
    let snap = Snapshot::open(&dir, Some(&key())).unwrap();
    let other = WorkingSet::new(vec![3, 2], 2, RecordingEnd::Timeout);
    snap.write_working_set(&dir, &other).unwrap();
    // The opened snapshot keeps what it loaded; a new open sees the replacement.
    assert_eq!(snap.working_set(), Some(&set()));
    let again = Snapshot::open(&dir, Some(&key())).unwrap();
    assert_eq!(again.working_set(), Some(&other));
    // Rewriting the same set seals it under another nonce.
    snap.write_working_set(&dir, &set()).unwrap();
    let second = std::fs::read(ws_path(&dir)).unwrap();
    assert_eq!(first.len(), second.len());
    assert_ne!(first[32..44], second[32..44]);
    assert!(Snapshot::remove_working_set(&dir).unwrap());
    assert!(!Snapshot::remove_working_set(&dir).unwrap());
    assert!(
        Snapshot::open(&dir, Some(&key()))
            .unwrap()
            .working_set()
            .is_none()
    );
}

#[test]
fn plaintext_snapshots_carry_a_digest_bound_to_the_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_snapshot(tmp.path(), "plain", &Protection::InsecurePlaintext);
    let snap = Snapshot::open(&dir, None).unwrap();
    snap.write_working_set(&dir, &set()).unwrap();
    assert_eq!(
        Snapshot::open(&dir, None).unwrap().working_set(),
        Some(&set())
    );
    // The body is readable, and a flipped byte in it is caught.
    let path = ws_path(&dir);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = WORKING_SET_PREAMBLE_LEN + BODY_FIXED_LEN;
    assert_eq!(bytes[at], 5);
    bytes[at] = 6;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(open_err(&dir, None), WorkingSetError::Tampered));
}

#[test]
fn a_flipped_byte_anywhere_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = recorded(tmp.path());
    let path = ws_path(&dir);
    let good = std::fs::read(&path).unwrap();
    for at in 0..good.len() {
        let mut bytes = good.clone();
        bytes[at] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let err = open_err(&dir, Some(&key()));
        let expected = match at {
            0..8 => matches!(err, WorkingSetError::NotAWorkingSet),
            8..12 => matches!(err, WorkingSetError::UnsupportedVersion { .. }),
            12..16 => matches!(err, WorkingSetError::ProtectionMismatch { .. }),
            16..32 => matches!(err, WorkingSetError::Foreign { .. }),
            32..36 => matches!(err, WorkingSetError::Malformed { .. }),
            44..48 => matches!(
                err,
                WorkingSetError::Truncated { .. } | WorkingSetError::TrailingData { .. }
            ),
            _ => matches!(err, WorkingSetError::Tampered),
        };
        assert!(expected, "byte {at}: {err:?}");
    }
}

#[test]
fn a_truncated_or_extended_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = recorded(tmp.path());
    let path = ws_path(&dir);
    let good = std::fs::read(&path).unwrap();
    for len in [0, 3, 20, WORKING_SET_PREAMBLE_LEN, good.len() - 1] {
        std::fs::write(&path, &good[..len]).unwrap();
        let err = open_err(&dir, Some(&key()));
        assert!(
            matches!(err, WorkingSetError::Truncated { found, .. } if found == len as u64),
            "{len}: {err:?}"
        );
    }
    let mut longer = good.clone();
    longer.push(0);
    std::fs::write(&path, &longer).unwrap();
    assert!(matches!(
        open_err(&dir, Some(&key())),
        WorkingSetError::TrailingData { .. }
    ));
    // Longer than any working set of this snapshot can be: refused before it is read.
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    assert!(matches!(
        open_err(&dir, Some(&key())),
        WorkingSetError::TooLarge {
            found: 4096,
            max: 120
        }
    ));
    std::fs::write(&path, b"#!/bin/sh\n").unwrap();
    assert!(matches!(
        open_err(&dir, Some(&key())),
        WorkingSetError::NotAWorkingSet
    ));
}

#[test]
fn a_working_set_from_another_snapshot_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = recorded(tmp.path());
    let other = write_snapshot(tmp.path(), "other", &Protection::Encrypted(&key()));
    std::fs::copy(ws_path(&dir), ws_path(&other)).unwrap();
    assert!(matches!(
        open_err(&other, Some(&key())),
        WorkingSetError::Foreign { .. }
    ));
    // Rewriting the id to the other snapshot's does not help: its data key differs.
    let other_id = Snapshot::open(&dir, Some(&key())).unwrap().id();
    let target_id = {
        std::fs::remove_file(ws_path(&other)).unwrap();
        Snapshot::open(&other, Some(&key())).unwrap().id()
    };
    assert_ne!(other_id, target_id);
    let mut bytes = std::fs::read(ws_path(&dir)).unwrap();
    bytes[16..32].copy_from_slice(&target_id.0);
    std::fs::write(ws_path(&other), &bytes).unwrap();
    assert!(matches!(
        open_err(&other, Some(&key())),
        WorkingSetError::Tampered
    ));
    // Writing one snapshot's set into another's directory is refused up front.
    let snap = Snapshot::open(&dir, Some(&key())).unwrap();
    std::fs::remove_file(ws_path(&other)).unwrap();
    assert!(matches!(
        snap.write_working_set(&other, &set()),
        Err(WriteError::NotThisSnapshot { .. })
    ));
}

#[test]
fn a_plaintext_working_set_beside_an_encrypted_snapshot_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = recorded(tmp.path());
    let plain = write_snapshot(tmp.path(), "plain", &Protection::InsecurePlaintext);
    Snapshot::open(&plain, None)
        .unwrap()
        .write_working_set(&plain, &set())
        .unwrap();
    // A downgrade forged from the plaintext one: right id, plaintext digest.
    let id = Snapshot::open(&dir, Some(&key())).unwrap().id();
    let mut bytes = std::fs::read(ws_path(&plain)).unwrap();
    bytes[16..32].copy_from_slice(&id.0);
    std::fs::write(ws_path(&dir), &bytes).unwrap();
    assert!(matches!(
        open_err(&dir, Some(&key())),
        WorkingSetError::ProtectionMismatch {
            snapshot: 1,
            file: 2
        }
    ));
}

#[test]
fn authentic_sets_with_bad_indices_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_snapshot(tmp.path(), "snap", &Protection::Encrypted(&key()));
    let snap = Snapshot::open(&dir, Some(&key())).unwrap();
    let out_of_range = WorkingSet::new(vec![1, CHUNKS], 2, RecordingEnd::Stopped);
    assert!(matches!(
        snap.write_working_set(&dir, &out_of_range),
        Err(WriteError::WorkingSet {
            source: WorkingSetError::ChunkOutOfRange { .. }
        })
    ));
    snap.write_working_set_unchecked(&dir, &out_of_range)
        .unwrap();
    assert!(matches!(
        open_err(&dir, Some(&key())),
        WorkingSetError::ChunkOutOfRange {
            position: 1,
            chunk: CHUNKS,
            count: 8
        }
    ));
    let duplicate = WorkingSet::new(vec![4, 2, 4], 3, RecordingEnd::Stopped);
    assert!(matches!(
        snap.write_working_set(&dir, &duplicate),
        Err(WriteError::WorkingSet {
            source: WorkingSetError::Duplicate { .. }
        })
    ));
    snap.write_working_set_unchecked(&dir, &duplicate).unwrap();
    assert!(matches!(
        open_err(&dir, Some(&key())),
        WorkingSetError::Duplicate {
            position: 2,
            chunk: 4
        }
    ));
}

#[test]
fn an_empty_set_is_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_snapshot(tmp.path(), "snap", &Protection::Encrypted(&key()));
    let snap = Snapshot::open(&dir, Some(&key())).unwrap();
    let empty = WorkingSet::new(Vec::new(), 0, RecordingEnd::Timeout);
    snap.write_working_set(&dir, &empty).unwrap();
    assert_eq!(
        Snapshot::open(&dir, Some(&key())).unwrap().working_set(),
        Some(&empty)
    );
}

#[test]
fn body_layout_is_pinned() {
    let ws = WorkingSet {
        chunks: vec![2, 0x0102_0304],
        recorded_unix_nanos: 0x1122,
        faults: 7,
        ended_by: RecordingEnd::Timeout,
    };
    let body = ws.encode_body().unwrap();
    let mut expected = vec![0x22, 0x11, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0];
    expected.extend_from_slice(&[2, 0, 0, 0, 2, 0, 0, 0]);
    expected.extend_from_slice(&[2, 0, 0, 0, 4, 3, 2, 1]);
    assert_eq!(body, expected);
    assert_eq!(WorkingSet::decode_body(&body).unwrap(), ws);
}

//! A host's records that it authenticated every chunk of a snapshot file: honoured only for
//! the same, unchanged file sealed with the key that made them; anything else means a full
//! pass, so a tampered file is still refused up front.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use snapshot::verified::RECENT;
use snapshot::{AuthenticatedOnce, MasterKey, Protection, ReadError, Snapshot, VerifiedRecords};

/// An encrypted snapshot old enough to be recorded, and an empty record directory.
fn aged_snapshot(key: &MasterKey) -> (tempfile::TempDir, PathBuf, VerifiedRecords) {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("snap");
    write_mixed(&target, &Protection::Encrypted(key));
    std::thread::sleep(RECENT + Duration::from_millis(100));
    let records = VerifiedRecords::new(dir.path().join("state/verified"));
    (dir, target, records)
}

fn once(target: &Path, key: &MasterKey, records: &VerifiedRecords) -> AuthenticatedOnce {
    Snapshot::open(target, Some(key))
        .unwrap()
        .authenticate_chunks_once(records)
        .unwrap()
}

fn is_checked(a: &AuthenticatedOnce) -> bool {
    matches!(a, AuthenticatedOnce::Checked(s) if s.stored_bytes > 0)
}

#[test]
fn a_full_pass_is_recorded_and_the_unchanged_file_is_not_read_again() {
    let key = key();
    let (_d, target, records) = aged_snapshot(&key);
    assert!(is_checked(&once(&target, &key, &records)));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(records.dir()), 0o700);
    let files: Vec<_> = std::fs::read_dir(records.dir()).unwrap().collect();
    assert_eq!(files.len(), 1, "one record, no temporary file left");
    assert_eq!(mode(&files[0].as_ref().unwrap().path()), 0o600);
    for _ in 0..2 {
        assert!(matches!(
            once(&target, &key, &records),
            AuthenticatedOnce::Recorded
        ));
    }
}

#[test]
fn a_chunk_changed_after_the_record_is_still_refused_up_front() {
    let key = key();
    let (_d, target, records) = aged_snapshot(&key);
    assert!(is_checked(&once(&target, &key, &records)));
    let layout = Snapshot::open(&target, Some(&key))
        .unwrap()
        .layout()
        .unwrap();
    let (index, range) = layout.data_chunks[1].clone();
    flip(&target, range.start + 5);
    let snap = Snapshot::open(&target, Some(&key)).unwrap();
    let err = snap.authenticate_chunks_once(&records).unwrap_err();
    assert!(
        matches!(err, ReadError::ChunkTampered { index: i } if i == index),
        "{err:?}"
    );
    // Put back as it was: the content is right again, but the file's status changed since
    // the record, so it is checked in full (and recorded anew once it has aged).
    flip(&target, range.start + 5);
    assert!(!records.holds(&Snapshot::open(&target, Some(&key)).unwrap()));
}

#[test]
fn a_forged_or_foreign_record_is_ignored() {
    let key = key();
    let (d, target, records) = aged_snapshot(&key);
    let snap = Snapshot::open(&target, Some(&key)).unwrap();
    let record = records.dir().join(snap.id().to_string());

    // Bytes that are not a record, then a record of the right length made without the key.
    std::fs::create_dir_all(records.dir()).unwrap();
    for forged in [b"not a record".to_vec(), vec![0u8; 32]] {
        std::fs::write(&record, forged).unwrap();
        assert!(!records.holds(&snap));
    }

    // Not a regular file: a FIFO is refused without blocking, a directory too.
    std::fs::remove_file(&record).unwrap();
    let fifo = std::ffi::CString::new(record.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) reads the NUL-terminated path and nothing else.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    assert!(!records.holds(&snap));
    std::fs::remove_file(&record).unwrap();
    std::fs::create_dir(&record).unwrap();
    assert!(!records.holds(&snap));
    std::fs::remove_dir(&record).unwrap();

    // A genuine record of another snapshot (same key), put in this one's place.
    let other = d.path().join("other");
    write_mixed(&other, &Protection::Encrypted(&key));
    std::thread::sleep(RECENT + Duration::from_millis(100));
    let other_snap = Snapshot::open(&other, Some(&key)).unwrap();
    assert!(is_checked(
        &other_snap.authenticate_chunks_once(&records).unwrap()
    ));
    let other_record = records.dir().join(other_snap.id().to_string());
    std::fs::copy(&other_record, &record).unwrap();
    assert!(!records.holds(&snap));

    // A full pass replaces what was there.
    assert!(is_checked(
        &snap.authenticate_chunks_once(&records).unwrap()
    ));
    assert!(records.holds(&snap));
}

#[test]
fn a_copy_of_the_file_is_checked_in_full() {
    let key = key();
    let (d, target, records) = aged_snapshot(&key);
    assert!(is_checked(&once(&target, &key, &records)));
    // Same snapshot id and bytes, another inode.
    let copy = d.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    std::fs::copy(file(&target), file(&copy)).unwrap();
    assert!(!records.holds(&Snapshot::open(&copy, Some(&key)).unwrap()));
}

#[test]
fn new_files_and_plaintext_snapshots_are_never_recorded() {
    let key = key();
    let dir = tempfile::tempdir().unwrap();
    let records = VerifiedRecords::new(dir.path().join("verified"));

    // Just written: its timestamps could still miss a change in the same clock tick.
    let fresh = dir.path().join("fresh");
    write_mixed(&fresh, &Protection::Encrypted(&key));
    assert!(is_checked(&once(&fresh, &key, &records)));
    assert!(is_checked(&once(&fresh, &key, &records)));

    // No secret to key a record with.
    let plain = dir.path().join("plain");
    write_mixed(&plain, &Protection::InsecurePlaintext);
    std::thread::sleep(RECENT + Duration::from_millis(100));
    let snap = Snapshot::open(&plain, None).unwrap();
    for _ in 0..2 {
        assert!(is_checked(
            &snap.authenticate_chunks_once(&records).unwrap()
        ));
    }
    assert!(!records.dir().exists());
}

#[test]
fn an_unwritable_record_directory_does_not_fail_the_pass() {
    let key = key();
    let (d, target, _) = aged_snapshot(&key);
    let blocker = d.path().join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    let records = VerifiedRecords::new(blocker.join("verified"));
    assert!(is_checked(&once(&target, &key, &records)));
    assert!(is_checked(&once(&target, &key, &records)));
}

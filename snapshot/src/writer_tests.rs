//! Tests of the atomic writer: publishing, refusing, replacing, and what a crash leaves.

use super::*;
use crate::error::ReadError;
use crate::fingerprint::{CpuIdentity, Fingerprint};
use crate::reader::Snapshot;

fn meta() -> SnapshotMeta {
    SnapshotMeta {
        fingerprint: Fingerprint {
            cpu: CpuIdentity {
                vendor: "GenuineIntel".into(),
                family: 6,
                model: 0x55,
                stepping: 4,
            },
            guest_cpuid: Vec::new(),
            kvm_flavor: "hardware".into(),
            host_page_size: 4096,
        },
        vcpus: 1,
    }
}

fn memory(fill: u8) -> Vec<u8> {
    let mut m = vec![0u8; 8 * PAGE_SIZE];
    m[PAGE_SIZE..3 * PAGE_SIZE].fill(fill);
    m
}

fn opts(replace: bool) -> WriteOptions {
    WriteOptions {
        chunk_size: 4 * PAGE_SIZE as u32,
        threads: 2,
        replace,
        ..Default::default()
    }
}

fn write_at(target: &Path, fill: u8, replace: bool) -> Result<WriteSummary, WriteError> {
    let mem = memory(fill);
    let region = [MemoryRegion {
        guest_addr: 0,
        bytes: &mem,
    }];
    write(
        target,
        &meta(),
        &[fill],
        &region,
        &Protection::InsecurePlaintext,
        &opts(replace),
    )
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn publishes_the_snapshot_and_leaves_no_temp_dir() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("snap");
    let summary = write_at(&target, 1, false).unwrap();
    assert_eq!(summary.path, target);
    assert_eq!(entries(dir.path()), ["snap"]);
    assert_eq!(entries(&target), [SNAPSHOT_FILE]);
    let snap = Snapshot::open(&target, None).unwrap();
    assert_eq!(snap.state(), [1]);
    assert_eq!(snap.info().snapshot_id, summary.snapshot_id);
}

#[test]
fn existing_target_without_replace_is_refused_and_left_intact() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("snap");
    let old = write_at(&target, 1, false).unwrap();
    let err = write_at(&target, 2, false).unwrap_err();
    assert!(matches!(err, WriteError::TargetExists { .. }), "{err}");
    assert_eq!(
        Snapshot::open(&target, None).unwrap().info().snapshot_id,
        old.snapshot_id
    );
    assert_eq!(entries(dir.path()), ["snap"]);

    // Even an empty directory is not overwritten (plain rename(2) would replace it).
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    assert!(matches!(
        write_at(&empty, 2, false),
        Err(WriteError::TargetExists { .. })
    ));
}

#[test]
fn replace_swaps_in_the_new_snapshot_and_removes_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("snap");
    let old = write_at(&target, 1, false).unwrap();
    let new = write_at(&target, 2, true).unwrap();
    assert_ne!(old.snapshot_id, new.snapshot_id);
    let snap = Snapshot::open(&target, None).unwrap();
    assert_eq!(snap.info().snapshot_id, new.snapshot_id);
    assert_eq!(snap.state(), [2]);
    assert_eq!(entries(dir.path()), ["snap"]);
    // replace also works when there is nothing to replace.
    write_at(&dir.path().join("fresh"), 3, true).unwrap();
}

/// Replacing deletes the old directory, so only a snapshot is replaced: a directory of other
/// files, an empty one, a regular file, a symlink or a directory whose snapshot file is not one
/// is refused and left exactly as it was.
#[test]
fn replace_refuses_anything_but_a_snapshot_and_leaves_it_intact() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    fs::create_dir(&photos).unwrap();
    fs::write(photos.join("cat.jpg"), b"meow").unwrap();
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let file = dir.path().join("notes.txt");
    fs::write(&file, b"keep me").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&photos, &link).unwrap();
    let fake = dir.path().join("fake");
    fs::create_dir(&fake).unwrap();
    fs::write(fake.join(SNAPSHOT_FILE), b"not a snapshot at all").unwrap();
    let snap = dir.path().join("snap");
    write_at(&snap, 1, false).unwrap();
    fs::write(snap.join("extra"), b"user data").unwrap();
    for (target, needle) in [
        (&photos, "cat.jpg"),
        (&empty, "no snapshot.thaw"),
        (&file, "not a directory"),
        (&link, "not a directory"),
        (&fake, "not a Thaw snapshot"),
        (&snap, "extra"),
    ] {
        let err = write_at(target, 2, true).unwrap_err();
        assert!(
            matches!(err, WriteError::NotASnapshot { .. }) && err.to_string().contains(needle),
            "{}: {err}",
            target.display()
        );
    }
    assert_eq!(fs::read(photos.join("cat.jpg")).unwrap(), b"meow");
    assert!(empty.is_dir());
    assert_eq!(fs::read(&file).unwrap(), b"keep me");
    assert_eq!(fs::read(snap.join("extra")).unwrap(), b"user data");
    assert_eq!(
        entries(dir.path()),
        ["empty", "fake", "link", "notes.txt", "photos", "snap"]
    );
}

#[test]
fn race_at_publish_time_is_refused_by_rename_noreplace() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("snap");
    let mem = memory(1);
    let region = [MemoryRegion {
        guest_addr: 0,
        bytes: &mem,
    }];
    let (tmp, _) = write_unpublished(
        &target,
        None,
        &meta(),
        b"",
        &region,
        &Protection::InsecurePlaintext,
        &opts(false),
    )
    .unwrap();
    fs::create_dir(&target).unwrap();
    let err = publish(&tmp, &target, dir.path(), false).unwrap_err();
    assert!(matches!(err, WriteError::TargetExists { .. }), "{err}");
    assert!(entries(&target).is_empty());
}

#[test]
fn crash_before_rename_leaves_no_target_and_the_temp_dir_does_not_open() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("snap");
    let mem = memory(1);
    let region = [MemoryRegion {
        guest_addr: 0,
        bytes: &mem,
    }];
    let (tmp, _) = write_unpublished(
        &target,
        None,
        &meta(),
        b"",
        &region,
        &Protection::InsecurePlaintext,
        &opts(false),
    )
    .unwrap();
    assert!(!target.exists());
    assert_eq!(tmp.parent(), Some(dir.path()));
    assert!(tmp.join(SNAPSHOT_FILE).exists());
    assert!(matches!(
        Snapshot::open(&tmp, None),
        Err(ReadError::UnpublishedTemp { .. })
    ));
    assert!(matches!(
        Snapshot::open(&target, None),
        Err(ReadError::Io { .. })
    ));
}

#[test]
fn partially_written_file_is_not_a_snapshot() {
    // The preamble is written last, so a file cut short during the chunk writes starts with
    // zeros, whatever name it ends up under.
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("snap");
    write_at(&target, 1, false).unwrap();
    let path = target.join(SNAPSHOT_FILE);
    let mut bytes = fs::read(&path).unwrap();
    bytes[..PREAMBLE_LEN].fill(0);
    fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        Snapshot::open(&target, None),
        Err(ReadError::NotASnapshot)
    ));
}

#[test]
fn invalid_input_is_refused_before_any_temp_dir_exists() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("snap");
    let mem = memory(1);
    let region = [MemoryRegion {
        guest_addr: 0,
        bytes: &mem,
    }];
    let p = Protection::InsecurePlaintext;
    let bad_chunk = WriteOptions {
        chunk_size: 3 * 4096,
        ..opts(false)
    };
    let err = write(&target, &meta(), b"", &region, &p, &bad_chunk).unwrap_err();
    assert!(matches!(err, WriteError::Layout { .. }), "{err}");
    let bad_level = WriteOptions {
        zstd_level: 99,
        ..opts(false)
    };
    let err = write(&target, &meta(), b"", &region, &p, &bad_level).unwrap_err();
    assert!(matches!(err, WriteError::Options { .. }), "{err}");
    let odd = [MemoryRegion {
        guest_addr: 0,
        bytes: &mem[..100],
    }];
    assert!(matches!(
        write(&target, &meta(), b"", &odd, &p, &opts(false)),
        Err(WriteError::Layout { .. })
    ));
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn recognises_only_our_temp_names() {
    use std::ffi::OsStr;
    assert!(is_temp_name(OsStr::new(".snap.tmp-0123456789abcdef")));
    assert!(is_temp_name(OsStr::new(".my.snap.tmp-0123456789abcdef")));
    assert!(!is_temp_name(OsStr::new("snap.tmp-0123456789abcdef")));
    assert!(!is_temp_name(OsStr::new(".snap.tmp-0123")));
    assert!(!is_temp_name(OsStr::new(".snap")));
    assert!(!is_temp_name(OsStr::new("..tmp-0123456789abcdef")));
}

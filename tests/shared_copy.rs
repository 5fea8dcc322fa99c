//! Clones restored from one decoded copy of a snapshot's memory (`DecodedCopy`), as `thawd`'s
//! workers restore them: each clone sees its own writes and never another's, no clone's write
//! reaches the shared copy, and a copy is refused for any snapshot but its own. The test guest's
//! `thaw:note=TEXT` writes one guest page (stored as data in the snapshot, so it comes from
//! the copy) and answers what was there before.
//!
//! Only one clone runs at a time (the others are paused, as `thawd` freezes idle
//! environments): the test guest spins while it waits, and the test run caps busy VMs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fixture::{Console, require_kvm, vm_slot};
use hooks_sdk::host::{InvokeOutcome, deadline_after};
use hooks_sdk::protocol::Invoke;
use restore_daemon::decoded_copy::{CopyBacking, DecodedCopy};
use restore_daemon::environment::{Environment, EnvironmentError, EnvironmentOptions};
use restore_daemon::restore::{RestoreError, RestoreOptions};
use sha2::{Digest, Sha256};
use snapshot::KeyChoice;

const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
const ORIGINAL_NOTE: &[u8] = b"from the snapshot";

struct Snapshots {
    _dir: tempfile::TempDir,
    first: PathBuf,
    second: PathBuf,
    key: PathBuf,
}

/// Two snapshots of the quiet agent (two ids, same guest), made once.
fn snapshots() -> &'static Snapshots {
    static SNAPSHOTS: OnceLock<Snapshots> = OnceLock::new();
    SNAPSHOTS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        let _slot = vm_slot();
        let first = fixture::agent_snapshot(dir.path(), "one", &key, "thaw.quiet=1", 128);
        let second = fixture::agent_snapshot(dir.path(), "two", &key, "thaw.quiet=1", 128);
        Snapshots {
            _dir: dir,
            first,
            second,
            key,
        }
    })
}

fn key(path: &Path) -> KeyChoice {
    KeyChoice::Given(snapshot::MasterKey::load(path).unwrap())
}

fn decode(dir: &Path, key_file: &Path, backing: &CopyBacking) -> Arc<DecodedCopy> {
    let snap = restore_daemon::verify::open(dir, &key(key_file)).unwrap();
    Arc::new(DecodedCopy::decode(&snap, backing).unwrap())
}

/// Both backings: sealed memfds, and huge pages where this process may mount a tmpfs (as root).
fn backings() -> Vec<CopyBacking> {
    let huge = CopyBacking::detect(1 << 30);
    if huge.huge() {
        vec![CopyBacking::Memfd, huge]
    } else {
        println!("no private tmpfs mount here (not root?): testing memfd copies only");
        vec![CopyBacking::Memfd]
    }
}

fn clone_of(dir: &Path, copy: &Arc<DecodedCopy>, console: &Console) -> Environment {
    let options = EnvironmentOptions {
        restore: RestoreOptions {
            shared_copy: Some(copy.clone()),
            ..RestoreOptions::default()
        },
        ..EnvironmentOptions::default()
    };
    Environment::start(
        dir,
        &key(&snapshots().key),
        &options,
        Box::new(console.clone()),
    )
    .unwrap_or_else(|e| panic!("restore from the shared copy: {e}\n{}", console.text()))
}

/// Sets the clone's note to `text`; returns the note it replaced.
fn swap_note(env: &mut Environment, console: &Console, text: &str) -> Vec<u8> {
    let payload = format!("thaw:note={text}");
    let invoke = Invoke {
        request_id: "note",
        deadline_ms: deadline_after(ANSWER_TIMEOUT),
        function_arn: "arn:aws:lambda:us-east-1:123456789012:function:note",
        payload: payload.as_bytes(),
        ..Invoke::default()
    };
    match env.invoke(&invoke, ANSWER_TIMEOUT) {
        Ok(InvokeOutcome::Response(previous)) => previous,
        other => panic!("{payload}: {other:?}\n{}", console.text()),
    }
}

fn digest(copy: &DecodedCopy) -> [u8; 32] {
    let len = copy.ticket().mem_bytes as usize;
    let mut bytes = vec![0u8; len];
    copy.file().read_exact_at(&mut bytes, 0).unwrap();
    Sha256::digest(&bytes).into()
}

#[test]
fn clones_of_one_copy_each_see_only_their_own_writes() {
    if !require_kvm("clones_of_one_copy_each_see_only_their_own_writes") {
        return;
    }
    let snaps = snapshots();
    for backing in backings() {
        clones_see_only_their_own_writes(&decode(&snaps.first, &snaps.key, &backing));
    }
}

fn clones_see_only_their_own_writes(copy: &Arc<DecodedCopy>) {
    let snaps = snapshots();
    let before = digest(copy);
    let _slot = vm_slot();

    let (console_a, console_b) = (Console::default(), Console::default());
    let mut a = clone_of(&snaps.first, copy, &console_a);
    assert_eq!(swap_note(&mut a, &console_a, "written by A"), ORIGINAL_NOTE);
    let frozen_a = a.controller().pause().unwrap();

    let mut b = clone_of(&snaps.first, copy, &console_b);
    assert_eq!(
        swap_note(&mut b, &console_b, "written by B"),
        ORIGINAL_NOTE,
        "B saw A's write"
    );
    let frozen_b = b.controller().pause().unwrap();

    frozen_a.resume().unwrap();
    assert_eq!(swap_note(&mut a, &console_a, ""), b"written by A");
    a.shutdown().unwrap();
    frozen_b.resume().unwrap();
    assert_eq!(swap_note(&mut b, &console_b, ""), b"written by B");
    b.shutdown().unwrap();

    // A clone restored after both wrote starts from the snapshot, and the copy is unchanged.
    let console_c = Console::default();
    let mut c = clone_of(&snaps.first, copy, &console_c);
    assert_eq!(swap_note(&mut c, &console_c, "C"), ORIGINAL_NOTE);
    c.shutdown().unwrap();
    assert_eq!(
        digest(copy),
        before,
        "a clone's write reached the shared copy"
    );
}

#[test]
fn a_copy_of_another_snapshot_is_refused_before_the_guest_runs() {
    if !require_kvm("a_copy_of_another_snapshot_is_refused_before_the_guest_runs") {
        return;
    }
    let snaps = snapshots();
    let copy = decode(&snaps.second, &snaps.key, &CopyBacking::Memfd);
    let console = Console::default();
    let options = EnvironmentOptions {
        restore: RestoreOptions {
            shared_copy: Some(copy),
            ..RestoreOptions::default()
        },
        ..EnvironmentOptions::default()
    };
    let _slot = vm_slot();
    let e = Environment::start(
        &snaps.first,
        &key(&snaps.key),
        &options,
        Box::new(console.clone()),
    )
    .err()
    .expect("a foreign copy must be refused");
    assert!(
        matches!(
            e,
            EnvironmentError::Restore(RestoreError::SharedCopy { .. })
        ),
        "{e}"
    );
    assert!(
        console.text().is_empty(),
        "the guest ran: {}",
        console.text()
    );
}

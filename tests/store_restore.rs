//! Restoring straight from an S3-compatible store (`thaw restore --store`), as users run it:
//! the real `thaw` binary, real KVM, the test guest's agent, and `s3s-fs` on loopback. The
//! snapshot's working set travels with it, chunks come from the store on first touch and from
//! the host cache on the next run, and an object altered in the store stops the restore with a
//! clear error instead of reaching the guest.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

mod fixture;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use fixture::{require_kvm, thaw_bin, vm_slot};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// "N fetched from the store (X MiB), M from the host cache" → (N, M).
fn fetch_counts(err: &str) -> (u64, u64) {
    let line = err
        .lines()
        .find(|l| l.contains("chunk objects:"))
        .unwrap_or_else(|| panic!("no chunk object counts in:\n{err}"));
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    (numbers[0], *numbers.last().unwrap())
}

#[test]
fn a_snapshot_restores_lazily_from_the_store_then_from_the_host_cache() {
    if !require_kvm("a_snapshot_restores_lazily_from_the_store_then_from_the_host_cache") {
        return;
    }
    let server = store::test_servers::s3s_fs();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    let snap = dir.path().join("snap");
    let thaw = |args: &[&str]| {
        let _slot = vm_slot();
        thaw_bin()
            .env("THAW_KEY_FILE", &key_file)
            .env("XDG_STATE_HOME", dir.path())
            .envs(server.env())
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let snap_arg = snap.to_str().unwrap();
    let created = thaw(&["snapshot", "create", "--out", snap_arg]);
    assert!(created.status.success(), "{}", stderr(&created));
    let recorded = thaw(&["snapshot", "record-ws", snap_arg]);
    assert!(recorded.status.success(), "{}", stderr(&recorded));
    let key = snapshot::MasterKey::load(&key_file).unwrap();
    let local = snapshot::Snapshot::open(&snap, Some(&key)).unwrap();
    let id = local.id().to_string();
    let ws = local
        .working_set()
        .expect("a recorded working set")
        .chunks
        .len() as u64;
    assert!(ws > 0);
    let url = format!("s3://{}/fns", store::test_servers::BUCKET);
    let pushed = thaw(&["snapshot", "push", snap_arg, &url]);
    assert!(pushed.status.success(), "{}", stderr(&pushed));

    let cache = dir.path().join("chunk-cache");
    let restore = |cache: &Path| {
        thaw(&[
            "restore",
            "--store",
            &url,
            "--snapshot-id",
            &id,
            "--chunk-cache",
            cache.to_str().unwrap(),
            "--invoke",
            "{}",
        ])
    };
    // Cold cache: the manifest, the working set and what else the guest touches come from
    // the store; nothing else does.
    let cold = restore(&cache);
    let err = stderr(&cold);
    assert!(cold.status.success(), "{err}");
    assert!(err.contains("first sign of life"), "{err}");
    assert!(!err.contains(store::test_servers::SECRET_KEY));
    eprintln!("cold cache:\n{err}");
    let (fetched, hits) = fetch_counts(&err);
    let data_chunks = local
        .chunks()
        .iter()
        .filter(|c| c.kind == snapshot::ChunkKind::Data)
        .count() as u64;
    assert!(fetched >= 1 && hits == 0, "{err}");
    assert!(
        fetched <= data_chunks,
        "fetched {fetched} objects of {data_chunks} data chunks"
    );
    // A new process (a restarted host) finds every object it needs in the cache.
    let warm = restore(&cache);
    let err = stderr(&warm);
    assert!(warm.status.success(), "{err}");
    eprintln!("warm cache:\n{err}");
    let (fetched_again, hits) = fetch_counts(&err);
    assert_eq!(fetched_again, 0, "{err}");
    assert!(hits >= 1, "{err}");
    assert_eq!(cold.stdout, warm.stdout, "the same answer both times");

    // Every chunk object altered in the store, the cache empty: the restore stops with a clear
    // error, and in good time, rather than run the guest on memory that is not the snapshot's.
    for file in store::test_servers::chunk_files(&server, "fns") {
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&file, bytes).unwrap();
    }
    let started = Instant::now();
    let refused = restore(&dir.path().join("another-cache"));
    let err = stderr(&refused);
    eprintln!("altered objects ({:.1?}):\n{err}", started.elapsed());
    assert!(!refused.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("authentication") || err.contains("tampered"),
        "no clear reason in: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(
        refused.stdout.is_empty(),
        "the guest answered on altered memory"
    );
}

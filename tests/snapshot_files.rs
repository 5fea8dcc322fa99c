//! Snapshots of a real VM, made by the `thaw` binary, refused when they are not what was
//! written: `thaw snapshot verify` and `thaw restore` (and `inspect`) on copies with a flipped
//! byte in each section, truncated at several points, with two chunks swapped, with a chunk
//! spliced in from another snapshot, and opened with the wrong key — each with its specific
//! error, never a panic, and restore before any VM exists. And `thaw snapshot create` killed
//! with SIGKILL at many points never leaves a directory that verifies but is incomplete.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Instant;

use fixture::{output_text, require_kvm, thaw_bin, thaw_output, vm_slot};

const SNAP_CMDLINE: &str = "thaw.agent=1 thaw.init=snap-start thaw.fill-mib=16";

fn create(out: &Path, key: &Path, cmdline: &str) -> Output {
    let _slot = vm_slot();
    thaw_output(&[
        "snapshot",
        "create",
        "--mem-mib",
        "128",
        "--cmdline",
        cmdline,
        "--key-file",
        key.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

fn verify(dir: &Path, key: &Path) -> Output {
    thaw_output(&[
        "snapshot",
        "verify",
        dir.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
    ])
}

/// Fails unless `out` is a clean refusal naming `needle`.
fn assert_refused(out: &Output, needle: &str, case: &str) {
    let all = output_text(out);
    assert!(!out.status.success(), "{case}: accepted\n{all}");
    assert!(out.status.code().is_some(), "{case}: killed by a signal");
    assert!(!all.contains("panicked"), "{case}: panicked\n{all}");
    assert!(all.contains(needle), "{case}: no {needle:?} in\n{all}");
}

fn new_key(path: &Path) {
    snapshot::MasterKey::load_or_create(path).unwrap();
}

/// A copy of the snapshot directory `src` at `dst`, with `edit` applied to its file.
fn tampered(src: &Path, dst: &Path, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    fs::create_dir_all(dst).unwrap();
    let mut bytes = fs::read(src.join(snapshot::SNAPSHOT_FILE)).unwrap();
    edit(&mut bytes);
    fs::write(dst.join(snapshot::SNAPSHOT_FILE), bytes).unwrap();
    dst.to_path_buf()
}

fn mid(r: &std::ops::Range<u64>) -> usize {
    (r.start + (r.end - r.start) / 2) as usize
}

#[test]
fn tampered_truncated_swapped_spliced_and_wrong_key_snapshots_are_refused() {
    if !require_kvm("tampered_truncated_swapped_spliced_and_wrong_key_snapshots_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let other_key = dir.path().join("other");
    new_key(&key);
    new_key(&other_key);
    let good = dir.path().join("good");
    let second = dir.path().join("second");
    for out in [&good, &second] {
        let made = create(out, &key, SNAP_CMDLINE);
        assert!(made.status.success(), "{}", output_text(&made));
        // Lambda's line at the end of a SnapStart function's init phase.
        let text = output_text(&made);
        assert!(
            text.lines()
                .any(|l| l.starts_with("INIT_REPORT Init Duration: ")
                    && l.ends_with(" ms\tPhase: init\tStatus: success")),
            "{text}"
        );
    }
    let ok = verify(&good, &key);
    assert!(ok.status.success(), "{}", output_text(&ok));

    let snap =
        snapshot::Snapshot::open(&good, Some(&snapshot::MasterKey::load(&key).unwrap())).unwrap();
    let layout = snap.layout().unwrap();
    let other_snap =
        snapshot::Snapshot::open(&second, Some(&snapshot::MasterKey::load(&key).unwrap())).unwrap();
    let other_layout = other_snap.layout().unwrap();
    let other_bytes = fs::read(second.join(snapshot::SNAPSHOT_FILE)).unwrap();
    assert!(
        layout.data_chunks.len() > 4,
        "{:?}",
        layout.data_chunks.len()
    );

    let t = |name: &str| dir.path().join(name);
    let flip = |at: usize| move |b: &mut Vec<u8>| b[at] ^= 0x01;
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "header byte",
            tampered(&good, &t("h"), flip(mid(&layout.header))),
            "header failed authentication",
        ),
        (
            "state byte",
            tampered(&good, &t("s"), flip(mid(&layout.state))),
            "VM state failed authentication",
        ),
        (
            "manifest byte",
            tampered(&good, &t("m"), flip(mid(&layout.manifest))),
            "manifest failed authentication",
        ),
        (
            "chunk byte",
            tampered(&good, &t("c"), flip(mid(&layout.data_chunks[2].1))),
            "failed authentication (tampered, swapped",
        ),
        (
            "magic",
            tampered(&good, &t("g"), flip(0)),
            "not a Thaw snapshot",
        ),
        (
            "truncated to 0",
            tampered(&good, &t("t0"), |b| b.clear()),
            "truncated",
        ),
        (
            "truncated in the preamble",
            tampered(&good, &t("t1"), |b| b.truncate(40)),
            "truncated",
        ),
        (
            "truncated in the header",
            tampered(&good, &t("t2"), |b| b.truncate(mid(&layout.header))),
            "truncated",
        ),
        (
            "truncated in the chunks",
            tampered(&good, &t("t3"), |b| b.truncate(mid(&layout.chunks))),
            "truncated",
        ),
        (
            "truncated by one byte",
            tampered(&good, &t("t4"), |b| {
                b.pop();
            }),
            "truncated",
        ),
        (
            "two chunks swapped",
            tampered(&good, &t("w"), |b| {
                // Two neighbouring data chunks exchanged: the bytes of A then B become B then
                // A (lengths may differ, so each lands where the manifest expects the other).
                let (a, c) = (&layout.data_chunks[3].1, &layout.data_chunks[4].1);
                assert_eq!(a.end, c.start, "data chunks are stored back to back");
                let (a, c) = (
                    a.start as usize..a.end as usize,
                    c.start as usize..c.end as usize,
                );
                let swapped = [&b[c.clone()], &b[a.clone()]].concat();
                b[a.start..c.end].copy_from_slice(&swapped);
            }),
            "failed authentication (tampered, swapped",
        ),
        (
            "chunk spliced from another snapshot",
            tampered(&good, &t("x"), |b| {
                // A chunk of the other snapshot (same key, same guest workload) at the same
                // index and of the same length: the workload's random pages are the same in
                // both, so their chunks are.
                let (range, theirs) = layout
                    .data_chunks
                    .iter()
                    .find_map(|(index, range)| {
                        other_layout
                            .data_chunks
                            .iter()
                            .find(|(i, r)| i == index && r.end - r.start == range.end - range.start)
                            .map(|(_, r)| (range.clone(), r.clone()))
                    })
                    .expect("a chunk of the same index and length in the other snapshot");
                b[range.start as usize..range.end as usize]
                    .copy_from_slice(&other_bytes[theirs.start as usize..theirs.end as usize]);
            }),
            "failed authentication (tampered, swapped",
        ),
    ];
    // Refused by verify, and by restore before any VM exists (no vsock socket appears, the
    // guest prints nothing).
    let uds = t("restore.sock");
    for (case, path, needle) in &cases {
        assert_refused(&verify(path, &key), needle, case);
        let restore = thaw_output(&[
            "restore",
            path.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
            "--vsock-uds",
            uds.to_str().unwrap(),
        ]);
        assert_refused(&restore, needle, case);
        assert!(restore.stdout.is_empty(), "{case}: the guest ran");
        assert!(!uds.exists(), "{case}: a VM was created");
    }
    // inspect authenticates header, state and manifest too.
    for (case, path, needle) in cases.iter().take(3) {
        let out = thaw_output(&[
            "snapshot",
            "inspect",
            path.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
        ]);
        assert_refused(&out, needle, case);
    }
    assert_refused(
        &verify(&good, &other_key),
        "the key given has id",
        "wrong key",
    );
    // A key file that does not exist is not silently replaced by a new key.
    assert_refused(
        &verify(&good, &t("missing.key")),
        "missing.key",
        "missing key file",
    );
}

#[test]
fn sigkill_during_create_never_leaves_an_incomplete_snapshot_that_verifies() {
    if !require_kvm("sigkill_during_create_never_leaves_an_incomplete_snapshot_that_verifies") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    new_key(&key);
    let cmdline = "thaw.agent=1 thaw.init=snap-start thaw.fill-mib=128";
    let spawn = |out: &Path| {
        thaw_bin()
            .args([
                "snapshot",
                "create",
                "--mem-mib",
                "256",
                "--cmdline",
                cmdline,
                "--key-file",
                key.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start thaw")
    };
    // How long a whole create takes here, to spread the kills over it.
    let _slot = vm_slot();
    let started = Instant::now();
    let full = spawn(&dir.path().join("full")).wait_with_output().unwrap();
    assert!(full.status.success());
    let whole = started.elapsed();
    let (mut absent, mut complete) = (0, 0);
    for (n, fraction) in [
        0.1, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.96, 0.99, 1.02,
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path().join(format!("killed-{n}"));
        let mut child = spawn(&out);
        std::thread::sleep(whole.mul_f64(fraction));
        let _ = child.kill(); // SIGKILL
        child.wait().unwrap();
        if out.exists() {
            let v = verify(&out, &key);
            assert!(
                v.status.success(),
                "kill at {fraction}: a target that does not verify:\n{}",
                output_text(&v)
            );
            complete += 1;
        } else {
            absent += 1;
        }
        // Whatever a killed writer left next to the target is refused.
        for entry in fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with(&format!(".killed-{n}.tmp-")) {
                assert_refused(
                    &verify(&path, &key),
                    "unpublished temporary",
                    "leftover temp dir",
                );
            }
        }
    }
    println!(
        "SIGKILL during create (whole create {whole:.1?}): {absent} kills left no snapshot, \
         {complete} left a complete one that verifies"
    );
    assert!(
        absent > 0,
        "no kill landed before the snapshot was published"
    );
}

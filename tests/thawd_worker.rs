//! `thawd worker` end to end, driven through the daemon's handle (`restore_daemon::worker::
//! handle::Worker`) on real KVM: a worker prepares a shell, restores the test guest's snapshot
//! into it, answers invocations (the guest answers the SHA-256 of the payload), freezes, thaws
//! and shuts down, exiting 0; a tampered snapshot is refused; failing and slow after-restore
//! hooks fail the restore with their kinds; a frozen guest's invocation times out in the
//! worker; a worker that misses the handle's deadline (a restore too slow for it, an invocation
//! of a stopped worker) is reported and killed; a worker killed with SIGKILL is reported dead,
//! not waited for; a worker dies with the thread that spawned it; and workers restored from
//! one shared decoded copy (its memfd passed over the descriptor channel) each see only their
//! own writes. Spoken to directly (the handle gives up on a worker after any failure), a worker
//! refuses requests that come in the wrong state without harming its guest, and stops its guest
//! and exits when its stdin closes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fixture::{pattern, require_kvm, vm_slot};
use hooks_sdk::host::deadline_after;
use restore_daemon::decoded_copy::{CopyBacking, DecodedCopy};
use restore_daemon::restore::MemoryMode;
use restore_daemon::worker::handle::{
    CopyGrant, INVOKE_GRACE, Invoked, RestoreSpec, Worker, WorkerCommand, WorkerError,
};
use restore_daemon::worker::protocol::{
    FailureKind, Invoke, Reply, Request, WireMemoryMode, WireOutcome, read_frame, write_frame,
};
use sha2::{Digest, Sha256};

const MEM_BYTES: u64 = 128 << 20;
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);
const SHORT: Duration = Duration::from_secs(10);
/// Bounds every test, so a hang fails instead of blocking the run.
const TEST_LIMIT: Duration = Duration::from_secs(300);

/// A snapshot of the test guest with its agent, sealed with its own key.
struct Snap {
    dir: tempfile::TempDir,
    path: PathBuf,
    key: PathBuf,
}

fn snapshot_of_test_guest() -> Snap {
    snapshot_with("")
}

/// A snapshot of the test guest with its agent and `options` on its command line.
fn snapshot_with(options: &str) -> Snap {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let _slot = vm_slot();
    let path = fixture::agent_snapshot(
        dir.path(),
        "snap",
        &key,
        &format!("thaw.fill-mib=8 {options}"),
        MEM_BYTES >> 20,
    );
    Snap { dir, path, key }
}

/// A new worker with `snap` restored in it (its shell built by the restore), and its pid.
async fn restored_worker(snap: &Snap) -> (Worker, u32) {
    let mut worker = Worker::spawn(&thawd(), "f").await.unwrap();
    let pid = worker.pid().unwrap();
    worker
        .restore(restore_spec(&snap.path, &snap.key), None, RESTORE_TIMEOUT)
        .await
        .unwrap();
    (worker, pid)
}

fn thawd() -> WorkerCommand {
    WorkerCommand::thawd(fixture::thawd_bin::thawd_bin())
}

fn restore_spec(snapshot: &Path, key: &Path) -> RestoreSpec {
    RestoreSpec {
        snapshot: snapshot.to_owned(),
        key_file: Some(key.to_owned()),
        memory: MemoryMode::Lazy,
        after_restore_timeout: Duration::from_secs(10),
        verified: None,
    }
}

fn invocation(id: &str, payload: Vec<u8>, timeout: Duration) -> Invoke {
    Invoke {
        request_id: id.into(),
        deadline_ms: deadline_after(timeout),
        function_arn: "arn:aws:lambda:us-east-1:123456789012:function:f".into(),
        client_context: String::new(),
        payload,
        timeout_ms: timeout.as_millis() as u64,
    }
}

/// Invokes with `payload` and checks the guest's answer is its SHA-256.
async fn invoke_and_check(worker: &mut Worker, id: &str, payload: Vec<u8>) -> Invoked {
    let want: [u8; 32] = Sha256::digest(&payload).into();
    let timeout = Duration::from_secs(30);
    let invoked = worker
        .invoke(invocation(id, payload, timeout))
        .await
        .unwrap_or_else(|e| panic!("invoke {id}: {e}"));
    assert_eq!(
        invoked.outcome,
        WireOutcome::Response(want.to_vec()),
        "{id}"
    );
    invoked
}

fn reaped(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

async fn limited(test: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(TEST_LIMIT, test)
        .await
        .expect("the test hung");
}

/// `snap`'s memory decoded once (on huge pages where this process may mount a tmpfs), granted
/// to function `f`'s workers.
fn copy_grant(snap: &Snap) -> CopyGrant {
    let key = snapshot::KeyChoice::Given(snapshot::MasterKey::load(&snap.key).unwrap());
    let opened = restore_daemon::verify::open(&snap.path, &key).unwrap();
    CopyGrant {
        function: "f".into(),
        copy: Arc::new(DecodedCopy::decode(&opened, &CopyBacking::detect(1 << 30)).unwrap()),
    }
}

/// Sets the guest's note (`thaw:note=TEXT`); the note it replaced.
async fn swap_note(worker: &mut Worker, text: &str) -> Vec<u8> {
    let timeout = Duration::from_secs(30);
    let payload = format!("thaw:note={text}").into_bytes();
    match worker.invoke(invocation("note", payload, timeout)).await {
        Ok(Invoked {
            outcome: WireOutcome::Response(previous),
            ..
        }) => previous,
        other => panic!("thaw:note={text}: {other:?}"),
    }
}

#[tokio::test]
async fn workers_restore_from_one_shared_copy_and_each_sees_only_its_own_writes() {
    if !require_kvm("workers_restore_from_one_shared_copy_and_each_sees_only_its_own_writes") {
        return;
    }
    let snap = snapshot_of_test_guest();
    let grant = copy_grant(&snap);
    limited(async {
        let _slot = vm_slot();
        let mut workers = Vec::new();
        for text in ["one", "two"] {
            let mut worker = Worker::spawn(&thawd(), "f").await.unwrap();
            worker
                .restore(
                    restore_spec(&snap.path, &snap.key),
                    Some(&grant),
                    RESTORE_TIMEOUT,
                )
                .await
                .unwrap();
            assert_eq!(swap_note(&mut worker, text).await, b"from the snapshot");
            invoke_and_check(&mut worker, "digest", b"still a function".to_vec()).await;
            // Frozen, as thawd keeps idle environments: only one guest spins at a time.
            worker.freeze(SHORT).await.unwrap();
            workers.push(worker);
        }
        for (worker, text) in workers.iter_mut().zip(["one", "two"]) {
            worker.thaw(SHORT).await.unwrap();
            assert_eq!(swap_note(worker, "").await, text.as_bytes());
            worker.freeze(SHORT).await.unwrap();
        }
        assert_eq!(
            Arc::strong_count(&grant.copy),
            3,
            "each worker holds the copy while its guest maps it"
        );
        for worker in workers {
            assert!(worker.shutdown(SHORT).await.unwrap().success());
        }
        assert_eq!(Arc::strong_count(&grant.copy), 1);
    })
    .await;
}

#[tokio::test]
async fn a_spare_restored_ahead_only_starts_its_guest_and_refuses_another_snapshot() {
    if !require_kvm("a_spare_restored_ahead_only_starts_its_guest_and_refuses_another_snapshot") {
        return;
    }
    let snap = snapshot_of_test_guest();
    let grant = copy_grant(&snap);
    limited(async {
        let _slot = vm_slot();
        let spec = restore_spec(&snap.path, &snap.key);
        let mut worker = Worker::spawn(&thawd(), "f").await.unwrap();
        worker.prepare_restore(&spec, &grant, SHORT).await.unwrap();
        let info = worker
            .restore(spec.clone(), None, RESTORE_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(info.restore, Duration::ZERO, "nothing was left to restore");
        assert!(info.hello <= info.ready, "{info:?}");
        assert_eq!(swap_note(&mut worker, "ahead").await, b"from the snapshot");
        invoke_and_check(&mut worker, "after", b"ahead".to_vec()).await;
        assert!(worker.shutdown(SHORT).await.unwrap().success());

        // Restored ahead for one snapshot, asked for another: refused, guest never started.
        let mut worker = Worker::spawn(&thawd(), "f").await.unwrap();
        worker.prepare_restore(&spec, &grant, SHORT).await.unwrap();
        let other = restore_spec(&snap.dir.path().join("other"), &snap.key);
        let err = worker
            .restore(other, None, RESTORE_TIMEOUT)
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                WorkerError::Failed {
                    kind: FailureKind::BadRequest,
                    ..
                }
            ),
            "{err}"
        );
        worker.kill().await;

        // A copy of another function is refused before anything reaches the worker.
        let mut worker = Worker::spawn(&thawd(), "g").await.unwrap();
        let err = worker
            .prepare_restore(&spec, &grant, SHORT)
            .await
            .unwrap_err();
        assert!(matches!(err, WorkerError::ForeignCopy { .. }), "{err}");
        assert!(!worker.is_poisoned());
        worker.kill().await;
    })
    .await;
}

#[tokio::test]
async fn a_worker_prepares_restores_invokes_freezes_thaws_and_shuts_down() {
    if !require_kvm("a_worker_prepares_restores_invokes_freezes_thaws_and_shuts_down") {
        return;
    }
    let snap = snapshot_of_test_guest();
    limited(async {
        let _slot = vm_slot();
        let started = Instant::now();
        let mut worker = Worker::spawn(&thawd(), "f").await.unwrap();
        let pid = worker.pid().unwrap();
        let shell = worker.prepare(MEM_BYTES, 1, SHORT).await.unwrap();
        let restored = worker
            .restore(restore_spec(&snap.path, &snap.key), None, RESTORE_TIMEOUT)
            .await
            .unwrap();
        assert!(restored.shell_was_ready, "{restored:?}");
        assert!(restored.restore <= restored.ready, "{restored:?}");

        let first = invoke_and_check(&mut worker, "first", pattern(1000, 5)).await;
        // The console of this invocation only: not the hooks' lines from the restore.
        let console = String::from_utf8_lossy(&first.console);
        assert!(console.contains("invoke #1 \"first\""), "{console}");
        assert!(!console.contains("after-restore"), "{console}");
        assert!(
            first.max_memory_used_bytes > 1 << 20,
            "{}",
            first.max_memory_used_bytes
        );
        let freeze = Instant::now();
        worker.freeze(SHORT).await.unwrap();
        worker.thaw(SHORT).await.unwrap();
        let freeze_thaw = freeze.elapsed();
        let second = invoke_and_check(&mut worker, "second", pattern(100_000, 7)).await;
        let console = String::from_utf8_lossy(&second.console);
        assert!(console.contains("invoke #2 \"second\""), "{console}");
        assert!(!console.contains("invoke #1"), "{console}");
        assert!(second.max_memory_used_bytes >= first.max_memory_used_bytes);

        let shutdown = Instant::now();
        let status = worker.shutdown(SHORT).await.unwrap();
        assert!(status.success(), "{status}");
        assert!(reaped(pid));
        println!(
            "prepare {shell:?}, restore {:?} (ready {:?}), invocations {:?} and {:?}, freeze+thaw \
             {freeze_thaw:?}, shutdown {:?}, peak RSS {} MiB, all {:?}",
            restored.restore,
            restored.ready,
            first.duration,
            second.duration,
            shutdown.elapsed(),
            second.max_memory_used_bytes >> 20,
            started.elapsed()
        );
    })
    .await;
    drop(snap.dir);
}

#[tokio::test]
async fn invoking_a_frozen_environment_times_out_in_the_worker() {
    if !require_kvm("invoking_a_frozen_environment_times_out_in_the_worker") {
        return;
    }
    let snap = snapshot_of_test_guest();
    limited(async {
        let _slot = vm_slot();
        let mut worker = Worker::spawn(&thawd(), "f").await.unwrap();
        let pid = worker.pid().unwrap();
        // Without Prepare the restore builds its own shell.
        let restored = worker
            .restore(restore_spec(&snap.path, &snap.key), None, RESTORE_TIMEOUT)
            .await
            .unwrap();
        assert!(!restored.shell_was_ready);
        worker.freeze(SHORT).await.unwrap();
        let timeout = Duration::from_millis(500);
        let started = Instant::now();
        let err = worker
            .invoke(invocation("frozen", b"{}".to_vec(), timeout))
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(
                err,
                WorkerError::Failed {
                    kind: FailureKind::InvokeTimeout,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            took >= timeout && took < timeout + Duration::from_secs(2),
            "{took:?}"
        );
        assert!(matches!(
            worker.thaw(SHORT).await,
            Err(WorkerError::Poisoned)
        ));
        // The worker discarded its guest but still shuts down cleanly.
        let status = worker.shutdown(SHORT).await.unwrap();
        assert!(status.success(), "{status}");
        assert!(reaped(pid));
        println!("the frozen invocation failed after {took:?}");
    })
    .await;
    drop(snap.dir);
}

#[tokio::test]
async fn a_tampered_snapshot_is_refused_and_a_late_worker_is_killed() {
    if !require_kvm("a_tampered_snapshot_is_refused_and_a_late_worker_is_killed") {
        return;
    }
    let snap = snapshot_of_test_guest();
    let key = snapshot::MasterKey::load(&snap.key).unwrap();
    let layout = snapshot::Snapshot::open(&snap.path, Some(&key))
        .unwrap()
        .layout()
        .unwrap();
    let chunk = &layout.data_chunks[layout.data_chunks.len() / 2].1;
    let tampered = snap.dir.path().join("tampered");
    std::fs::create_dir(&tampered).unwrap();
    let mut bytes = std::fs::read(snap.path.join(snapshot::SNAPSHOT_FILE)).unwrap();
    bytes[(chunk.start + (chunk.end - chunk.start) / 2) as usize] ^= 0x01;
    std::fs::write(tampered.join(snapshot::SNAPSHOT_FILE), bytes).unwrap();

    limited(async {
        let _slot = vm_slot();
        let mut worker = Worker::spawn(&thawd(), "f").await.unwrap();
        let pid = worker.pid().unwrap();
        let err = worker
            .restore(restore_spec(&tampered, &snap.key), None, RESTORE_TIMEOUT)
            .await
            .unwrap_err();
        let WorkerError::Failed { kind, message, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(kind, &FailureKind::Restore);
        assert!(message.contains("authentication"), "{message}");
        let status = worker.shutdown(SHORT).await.unwrap();
        assert!(status.success(), "{status}");
        assert!(reaped(pid));

        // A deadline no restore can meet: the handle gives up, the caller kills the worker.
        let mut worker = Worker::spawn(&thawd(), "f").await.unwrap();
        let pid = worker.pid().unwrap();
        let err = worker
            .restore(
                restore_spec(&snap.path, &snap.key),
                None,
                Duration::from_millis(1),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                WorkerError::Timeout {
                    request: "Restore",
                    ..
                }
            ),
            "{err:?}"
        );
        let status = worker.kill().await.unwrap();
        assert!(!status.success(), "{status}");
        assert!(reaped(pid));
    })
    .await;
    drop(snap.dir);
}

/// Issue 14, defect 13: thawd compared a snapshot's memory size with its config only when it
/// registered it, so a snapshot of another size put in its place later was served. Workers are
/// now told the id of the snapshot registered, and refuse any other file, for every memory
/// mode, before anything is built.
#[tokio::test]
async fn a_snapshot_replaced_after_registration_is_refused() {
    if !require_kvm("a_snapshot_replaced_after_registration_is_refused") {
        return;
    }
    let registered = snapshot_of_test_guest();
    let key = snapshot::MasterKey::load(&registered.key).unwrap();
    let registered_id = snapshot::Snapshot::open(&registered.path, Some(&key))
        .unwrap()
        .id();
    // What is at the path now: another snapshot (of the same guest, another size would do).
    let replacement = snapshot_with("thaw.keeper=1");
    limited(async {
        let _slot = vm_slot();
        for memory in [MemoryMode::Lazy, MemoryMode::Eager] {
            let mut worker = Worker::spawn(&thawd(), "f").await.unwrap();
            let spec = RestoreSpec {
                memory,
                verified: Some(registered_id),
                ..restore_spec(&replacement.path, &replacement.key)
            };
            let err = worker
                .restore(spec, None, RESTORE_TIMEOUT)
                .await
                .unwrap_err();
            let WorkerError::Failed { kind, message, .. } = &err else {
                panic!("{err:?}")
            };
            assert_eq!(kind, &FailureKind::Restore);
            assert!(message.contains("it was replaced"), "{message}");
            assert!(message.contains(&registered_id.to_string()), "{message}");
            let status = worker.shutdown(SHORT).await.unwrap();
            assert!(status.success(), "{status}");
        }
        // The snapshot registered is still restored.
        let mut worker = Worker::spawn(&thawd(), "f").await.unwrap();
        let spec = RestoreSpec {
            verified: Some(registered_id),
            ..restore_spec(&registered.path, &registered.key)
        };
        worker.restore(spec, None, RESTORE_TIMEOUT).await.unwrap();
        worker.shutdown(SHORT).await.unwrap();
    })
    .await;
    drop((registered.dir, replacement.dir));
}

#[tokio::test]
async fn a_worker_killed_mid_life_is_reported_dead() {
    if !require_kvm("a_worker_killed_mid_life_is_reported_dead") {
        return;
    }
    let snap = snapshot_of_test_guest();
    limited(async {
        let _slot = vm_slot();
        let (mut worker, pid) = restored_worker(&snap).await;
        invoke_and_check(&mut worker, "before", b"alive".to_vec()).await;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let started = Instant::now();
        let err = worker
            .invoke(Invoke {
                timeout_ms: 30_000,
                ..invocation("after", b"dead".to_vec(), SHORT)
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, WorkerError::Died { status } if status.contains("SIGKILL")),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(reaped(pid), "Died means reaped");
        assert!(matches!(
            worker.freeze(SHORT).await,
            Err(WorkerError::Poisoned)
        ));
        worker.kill().await;
    })
    .await;
    drop(snap.dir);
}

#[tokio::test]
async fn failing_and_slow_after_restore_hooks_fail_the_restore() {
    if !require_kvm("failing_and_slow_after_restore_hooks_fail_the_restore") {
        return;
    }
    let failing = snapshot_with("thaw.fail=restore");
    let slow = snapshot_with("thaw.restore-hook-ms=3000");
    limited(async {
        let _slot = vm_slot();
        let mut worker = Worker::spawn(&thawd(), "f").await.unwrap();
        let err = worker
            .restore(
                restore_spec(&failing.path, &failing.key),
                None,
                RESTORE_TIMEOUT,
            )
            .await
            .unwrap_err();
        let WorkerError::Failed { kind, console, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(
            kind,
            &FailureKind::AfterRestore {
                error_type: "Runtime.AfterRestoreError".into()
            }
        );
        let console = String::from_utf8_lossy(console);
        assert!(console.contains("failing as asked"), "{console}");
        assert!(worker.shutdown(SHORT).await.unwrap().success());

        let mut worker = Worker::spawn(&thawd(), "f").await.unwrap();
        let mut spec = restore_spec(&slow.path, &slow.key);
        spec.after_restore_timeout = Duration::from_millis(300);
        let started = Instant::now();
        let err = worker
            .restore(spec, None, RESTORE_TIMEOUT)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                WorkerError::Failed {
                    kind: FailureKind::AfterRestoreTimeout,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert!(worker.shutdown(SHORT).await.unwrap().success());
    })
    .await;
    drop((failing.dir, slow.dir));
}

#[tokio::test]
async fn a_worker_that_cannot_answer_in_time_is_given_up_and_killed() {
    if !require_kvm("a_worker_that_cannot_answer_in_time_is_given_up_and_killed") {
        return;
    }
    let snap = snapshot_of_test_guest();
    limited(async {
        let _slot = vm_slot();
        let (mut worker, pid) = restored_worker(&snap).await;
        // Stopped, the worker cannot even report the function's timeout: the handle gives up
        // after the timeout and its grace.
        let stopped = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(stopped, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let timeout = Duration::from_millis(200);
        let started = Instant::now();
        let err = worker
            .invoke(invocation("stuck", b"{}".to_vec(), timeout))
            .await
            .unwrap_err();
        let waited = started.elapsed();
        assert!(
            matches!(err, WorkerError::Timeout { request: "Invoke", after }
                if after == timeout + INVOKE_GRACE),
            "{err:?}"
        );
        assert!(
            waited < timeout + INVOKE_GRACE + Duration::from_secs(1),
            "{waited:?}"
        );
        assert!(matches!(
            worker.freeze(SHORT).await,
            Err(WorkerError::Poisoned)
        ));
        // SIGKILL ends it even while it is stopped.
        let status = worker.kill().await.unwrap();
        assert!(status.to_string().contains("SIGKILL"), "{status}");
        assert!(reaped(pid));
        println!("a stopped worker's invocation was given up after {waited:?}");
    })
    .await;
    drop(snap.dir);
}

/// A worker spoken to without the handle, one blocking request at a time.
struct RawWorker {
    child: std::process::Child,
}

impl RawWorker {
    fn spawn() -> RawWorker {
        use std::process::{Command, Stdio};
        let child = Command::new(fixture::thawd_bin::thawd_bin())
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        RawWorker { child }
    }

    fn ask(&mut self, request: &Request) -> Reply {
        write_frame(self.child.stdin.as_mut().unwrap(), request).unwrap();
        read_frame(self.child.stdout.as_mut().unwrap()).unwrap()
    }

    /// Waits up to `limit` for the process to end.
    fn exit_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < limit, "the worker did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn bad_request(reply: &Reply) -> bool {
    matches!(
        reply,
        Reply::Failed {
            kind: FailureKind::BadRequest,
            ..
        }
    )
}

#[test]
fn requests_in_the_wrong_state_leave_the_guest_alone_and_closing_stdin_stops_it() {
    if !require_kvm("requests_in_the_wrong_state_leave_the_guest_alone_and_closing_stdin_stops_it")
    {
        return;
    }
    let snap = snapshot_of_test_guest();
    let _slot = vm_slot();
    let mut worker = RawWorker::spawn();
    let restore = Request::Restore {
        snapshot: snap.path.clone(),
        key_file: Some(snap.key.clone()),
        memory: WireMemoryMode::Eager,
        after_restore_timeout_ms: 10_000,
        shared_copy: None,
        verified: None,
    };
    let reply = worker.ask(&restore);
    assert!(matches!(reply, Reply::Restored { .. }), "{reply:?}");
    for wrong in [
        restore,
        Request::Prepare {
            mem_bytes: MEM_BYTES,
            vcpus: 1,
        },
    ] {
        let reply = worker.ask(&wrong);
        assert!(bad_request(&reply), "{wrong:?}: {reply:?}");
    }
    let payload = pattern(5000, 11);
    let reply = worker.ask(&Request::Invoke(Invoke {
        request_id: "still-alive".into(),
        deadline_ms: 0,
        function_arn: "f".into(),
        client_context: String::new(),
        payload: payload.clone(),
        timeout_ms: 30_000,
    }));
    let want: [u8; 32] = Sha256::digest(&payload).into();
    assert!(
        matches!(&reply, Reply::Invoked { outcome: WireOutcome::Response(r), .. } if r == &want),
        "{reply:?}"
    );
    // The daemon went away: the worker stops its guest and exits on its own.
    drop(worker.child.stdin.take());
    let status = worker.exit_within(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    drop(snap.dir);
}

/// `PR_SET_PDEATHSIG` follows the thread that spawned the worker: when it ends, the worker is
/// killed even though its stdin is still open.
#[test]
fn a_worker_dies_with_the_thread_that_spawned_it() {
    use std::os::unix::process::ExitStatusExt;

    let spawner = std::thread::spawn(|| {
        let mut worker = RawWorker::spawn();
        // One answered request: the worker has armed its parent-death signal by then.
        let reply = worker.ask(&Request::Thaw);
        assert!(bad_request(&reply), "{reply:?}");
        worker
    });
    let mut worker = spawner.join().unwrap();
    // Its stdin stays open: only the signal can end it.
    let status = worker.exit_within(Duration::from_secs(10));
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
}

//! A snapshot written by `thaw snapshot create` comes back with `thaw restore`: the test guest's
//! agent, snapshotted at its checkpoint after filling memory, reconnects over the reset vsock
//! transport, runs its after-restore hook with the host's entropy and clock, answers an
//! invocation and shuts down cleanly. And a snapshot that is tampered with, or sealed with
//! another key, is refused before any guest runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;

use std::os::unix::net::UnixListener;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fixture::{Console, pattern, require_kvm, thaw_bin, vm_slot};
use hooks_sdk::host::{AfterRestoreError, InvokeOutcome, deadline_after};
use hooks_sdk::protocol::io::{self, Frame};
use hooks_sdk::protocol::{InitType, Invoke, Kind, Message, Restored};
use restore_daemon::environment::{Environment, EnvironmentError, EnvironmentOptions};
use restore_daemon::restore::{ChunkCheck, MemoryMode, RestoreError, RestoreOptions};
use restore_daemon::shells::ShellPool;
use restore_daemon::startup_set::StartupSets;
use sha2::{Digest, Sha256};
use snapshot::KeyChoice;
use thaw::capture::Sealing;
use thaw::commands::run::RunOptions;
use thaw::commands::snapshot_create::{self, CreateOptions, Readiness};
use vmm_core::config::VsockConfig;
use vmm_core::machine::ShellSpec;

/// The guest's workload: 256 MiB of mixed memory, checksummed before and after.
const FILL_MIB: u64 = 256;

fn make_snapshot(dir: &std::path::Path, key: &std::path::Path) -> (std::path::PathBuf, String) {
    make_snapshot_with(dir, key, "")
}

/// A snapshot of the agent after a `FILL_MIB` fill, with `extra` on the guest's command line.
fn make_snapshot_with(
    dir: &std::path::Path,
    key: &std::path::Path,
    extra: &str,
) -> (std::path::PathBuf, String) {
    make_snapshot_sized(dir, key, FILL_MIB, extra)
}

/// A snapshot of the agent after a `fill_mib` fill, with `extra` on the guest's command line.
fn make_snapshot_sized(
    dir: &std::path::Path,
    key: &std::path::Path,
    fill_mib: u64,
    extra: &str,
) -> (std::path::PathBuf, String) {
    let out = dir.join("snap");
    let options = CreateOptions {
        boot: RunOptions {
            cmdline: Some(format!(
                "thaw.agent=1 thaw.init=snap-start thaw.fill-mib={fill_mib} {extra}"
            )),
            mem_mib: 64 + fill_mib + 64,
            vcpus: 1,
            vsock: Some(VsockConfig {
                guest_cid: 3,
                uds_path: dir.join("create.sock"),
            }),
            ..RunOptions::default()
        },
        out: out.clone(),
        replace: false,
        ready: Readiness::Agent,
        init_timeout: Duration::from_secs(60),
        sealing: Sealing::Encrypted(snapshot::MasterKey::load_or_create(key).unwrap()),
    };
    let console = Console::default();
    let _slot = vm_slot();
    snapshot_create::create(options, Box::new(console.clone()))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", console.text()));
    (out, console.text())
}

fn expect(s: &mut std::os::unix::net::UnixStream, kind: Kind) -> Frame {
    let frame = io::read_frame(s).unwrap_or_else(|e| panic!("expected {kind:?}: {e}"));
    assert_eq!(frame.kind, kind, "{:?}", frame.message());
    frame
}

#[test]
fn restored_agent_reconnects_runs_its_hook_and_answers() {
    if !require_kvm("restored_agent_reconnects_runs_its_hook_and_answers") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let (snap, created_console) = make_snapshot(dir.path(), &key);
    let checksum = created_console
        .lines()
        .find_map(|l| l.strip_prefix("fill: ")?.split("checksum ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no fill line:\n{created_console}"))
        .to_string();

    let uds = dir.path().join("restore.sock");
    let listener = UnixListener::bind(format!("{}_9000", uds.display())).unwrap();
    let _slot = vm_slot();
    let started = Instant::now();
    let mut child = thaw_bin()
        .args([
            "restore",
            snap.to_str().unwrap(),
            "--memory",
            "eager",
            "--key-file",
            key.to_str().unwrap(),
            "--vsock-uds",
            uds.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The restored agent's connection; if thaw restore ends first, say why.
    listener.set_nonblocking(true).unwrap();
    let mut s = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if child.try_wait().unwrap().is_some()
                    || started.elapsed() > Duration::from_secs(60)
                {
                    let _ = child.kill();
                    let out = child.wait_with_output().unwrap();
                    panic!(
                        "the restored agent did not connect:\n{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let reconnected = started.elapsed();
    let hello = expect(&mut s, Kind::Hello);
    assert!(matches!(
        hello.message(),
        Ok(Message::Hello {
            init_type: InitType::SnapStart,
            ..
        })
    ));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let entropy = pattern(64, 7);
    io::write_message(
        &mut s,
        &Message::Restored(Restored {
            entropy: &entropy,
            wall_clock_ns: now,
            restore_id: "restore-1",
        }),
    )
    .unwrap();
    expect(&mut s, Kind::RestoreDone);
    let payload = pattern(100_000, 3);
    io::write_message(
        &mut s,
        &Message::Invoke(Invoke {
            request_id: "after-restore",
            deadline_ms: now / 1_000_000 + 60_000,
            function_arn: "arn:aws:lambda:us-east-1:123456789012:function:f",
            trace_id: "",
            client_context: "",
            cognito_identity: "",
            payload: &payload,
        }),
    )
    .unwrap();
    let response = expect(&mut s, Kind::Response);
    let want: [u8; 32] = Sha256::digest(&payload).into();
    match response.message().unwrap() {
        Message::Response {
            request_id,
            payload,
        } => {
            assert_eq!(request_id, "after-restore");
            assert_eq!(payload, want);
        }
        other => panic!("{other:?}"),
    }
    io::write_message(&mut s, &Message::Shutdown).unwrap();
    let out = child.wait_with_output().unwrap();
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{console}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The restored guest continues the snapshotted one: no new boot banner, the hook ran with
    // the values the host sent, and the marker set before the checkpoint was kept.
    assert!(!console.contains("banner from CPL3"), "{console}");
    assert!(console.contains("restore id \"restore-1\""), "{console}");
    assert!(console.contains(" kept"), "{console}");
    // Every byte of the workload came back in its place.
    let after = format!("workload of {FILL_MIB} MiB has checksum {checksum}");
    assert!(console.contains(&after), "want {after:?} in\n{console}");
    println!(
        "restored (eager, {} MiB, {FILL_MIB} MiB workload, checksum {checksum} before and \
         after); agent reconnected {reconnected:.1?} after thaw restore started",
        64 + FILL_MIB + 64
    );
}

fn restore(args: &[&str]) -> Output {
    thaw_bin()
        .arg("restore")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn tampered_or_wrong_key_snapshots_are_refused_before_the_guest_runs() {
    if !require_kvm("tampered_or_wrong_key_snapshots_are_refused_before_the_guest_runs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let (snap, _) = make_snapshot(dir.path(), &key);
    let master = snapshot::MasterKey::load(&key).unwrap();
    let layout = snapshot::Snapshot::open(&snap, Some(&master))
        .unwrap()
        .layout()
        .unwrap();
    let file = std::fs::read(snap.join(snapshot::SNAPSHOT_FILE)).unwrap();
    let other_key = dir.path().join("other");
    snapshot::MasterKey::load_or_create(&other_key).unwrap();
    let mid = |r: &std::ops::Range<u64>| (r.start + (r.end - r.start) / 2) as usize;
    let cases = [
        (
            "header",
            mid(&layout.header),
            "header failed authentication",
        ),
        (
            "state",
            mid(&layout.state),
            "VM state failed authentication",
        ),
        (
            "manifest",
            mid(&layout.manifest),
            "manifest failed authentication",
        ),
        (
            "chunk",
            mid(&layout.data_chunks[1].1),
            "failed authentication (tampered, swapped",
        ),
    ];
    let uds = dir.path().join("r.sock");
    for (case, at, needle) in cases {
        let copy = dir.path().join(format!("t-{case}"));
        std::fs::create_dir(&copy).unwrap();
        let mut bytes = file.clone();
        bytes[at] ^= 0x80;
        std::fs::write(copy.join(snapshot::SNAPSHOT_FILE), bytes).unwrap();
        let out = restore(&[
            copy.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
            "--vsock-uds",
            uds.to_str().unwrap(),
        ]);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(1), "{case}: {stderr}");
        assert!(stderr.contains(needle), "{case}: {stderr}");
        assert!(stdout.is_empty(), "{case}: the guest printed {stdout}");
        assert!(!uds.exists(), "{case}: a VM was created");
    }
    let out = restore(&[
        snap.to_str().unwrap(),
        "--key-file",
        other_key.to_str().unwrap(),
        "--vsock-uds",
        uds.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the key given has id"), "{stderr}");
    assert!(out.stdout.is_empty());
}

/// The checksum the guest printed after its fill.
/// `snap` written again at `out` with `change` made to what the writer records about the
/// machine (its host fingerprint, its vCPU count): the same guest, sealed with the same key.
fn rewritten(
    snap: &std::path::Path,
    master: &snapshot::MasterKey,
    out: &std::path::Path,
    change: impl FnOnce(&mut snapshot::SnapshotMeta),
) {
    let opened = snapshot::Snapshot::open(snap, Some(master)).unwrap();
    let mut memory: Vec<Vec<u8>> = opened
        .regions()
        .iter()
        .map(|r| vec![0u8; r.size as usize])
        .collect();
    for (index, chunk) in opened.chunks().iter().enumerate() {
        if chunk.kind != snapshot::ChunkKind::Data {
            continue;
        }
        let (region, bytes) = opened
            .regions()
            .iter()
            .zip(memory.iter_mut())
            .find(|(r, _)| {
                chunk.guest_addr >= r.guest_addr && chunk.guest_addr < r.guest_addr + r.size
            })
            .unwrap();
        let at = (chunk.guest_addr - region.guest_addr) as usize;
        opened
            .read_chunk_authenticated(index, &mut bytes[at..at + chunk.len as usize])
            .unwrap();
    }
    let mut meta = snapshot::SnapshotMeta {
        fingerprint: opened.fingerprint().clone(),
        vcpus: opened.vcpus(),
    };
    change(&mut meta);
    let regions: Vec<snapshot::MemoryRegion> = opened
        .regions()
        .iter()
        .zip(&memory)
        .map(|(r, bytes)| snapshot::MemoryRegion {
            guest_addr: r.guest_addr,
            bytes,
        })
        .collect();
    snapshot::write(
        out,
        &meta,
        opened.state(),
        &regions,
        &snapshot::Protection::Encrypted(master),
        &snapshot::WriteOptions::default(),
    )
    .unwrap();
}

/// `thaw restore` of `snap` (under each chunk check) fails with `needles` in its message, and
/// no VM was created.
fn assert_refused_before_the_guest_runs(
    dir: &std::path::Path,
    snap: &std::path::Path,
    key: &std::path::Path,
    needles: &[&str],
) {
    let uds = dir.join("r.sock");
    for check in ["once", "upfront", "on-install"] {
        let out = restore(&[
            snap.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
            "--chunk-check",
            check,
            "--vsock-uds",
            uds.to_str().unwrap(),
        ]);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(1), "{check}: {stderr}");
        for needle in needles {
            assert!(stderr.contains(needle), "{check}: {stderr}");
        }
        assert!(stdout.is_empty(), "{check}: the guest printed {stdout}");
        assert!(!uds.exists(), "{check}: a VM was created");
    }
}

/// The host check asks the shell's vCPU what the host offers (no scratch VM on the path), but
/// its verdict still comes before any of the machine is restored.
#[test]
fn a_snapshot_made_on_another_cpu_vendor_is_refused_before_the_guest_runs() {
    if !require_kvm("a_snapshot_made_on_another_cpu_vendor_is_refused_before_the_guest_runs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let (snap, _) = make_snapshot_sized(dir.path(), &key, 0, "");
    let master = snapshot::MasterKey::load(&key).unwrap();
    let foreign = dir.path().join("foreign");
    let mut other_vendor = String::new();
    rewritten(&snap, &master, &foreign, |meta| {
        other_vendor = if meta.fingerprint.cpu.vendor == "AuthenticAMD" {
            "GenuineIntel".into()
        } else {
            "AuthenticAMD".into()
        };
        meta.fingerprint.cpu.vendor = other_vendor.clone();
    });
    assert_refused_before_the_guest_runs(
        dir.path(),
        &foreign,
        &key,
        &[
            "cannot be restored on this host",
            &format!("taken on a {other_vendor} CPU"),
        ],
    );
}

/// Issue 14, defect 9: `verify` refused a header whose vCPU count disagrees with the saved
/// state, but `restore` restored it.
#[test]
fn a_header_and_state_that_disagree_on_vcpus_are_refused_before_the_guest_runs() {
    if !require_kvm("a_header_and_state_that_disagree_on_vcpus_are_refused_before_the_guest_runs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let (snap, _) = make_snapshot_sized(dir.path(), &key, 0, "");
    let master = snapshot::MasterKey::load(&key).unwrap();
    let two = dir.path().join("two");
    rewritten(&snap, &master, &two, |meta| meta.vcpus = 2);
    assert_refused_before_the_guest_runs(
        dir.path(),
        &two,
        &key,
        &["its header says 2 vCPUs, its machine state holds 1"],
    );
}

fn fill_checksum(console: &str) -> String {
    console
        .lines()
        .find_map(|l| l.strip_prefix("fill: ")?.split("checksum ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no fill line:\n{console}"))
        .to_string()
}

fn invoke_request<'a>(id: &'a str, payload: &'a [u8]) -> Invoke<'a> {
    Invoke {
        request_id: id,
        deadline_ms: deadline_after(Duration::from_secs(60)),
        function_arn: "arn:aws:lambda:us-east-1:123456789012:function:f",
        payload,
        ..Invoke::default()
    }
}

#[test]
fn every_memory_mode_gives_back_the_same_256_mib() {
    if !require_kvm("every_memory_mode_gives_back_the_same_256_mib") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let (snap, created_console) = make_snapshot(dir.path(), &key);
    let checksum = fill_checksum(&created_console);
    // The same modes into machine shells built ahead of time, as thawd builds them.
    let shells = Arc::new(ShellPool::new().unwrap());
    let spec = ShellSpec {
        mem_bytes: (64 + FILL_MIB + 64) << 20,
        vcpus: 1,
    };
    shells.keep_ready(spec, 1);
    let modes = [
        ("eager", MemoryMode::Eager, false, false),
        ("lazy", MemoryMode::Lazy, false, false),
        ("lazy+prefetch", MemoryMode::Lazy, true, false),
        ("eager in a pre-built shell", MemoryMode::Eager, false, true),
        ("lazy in a pre-built shell", MemoryMode::Lazy, false, true),
    ];
    for (name, memory, prefetch, prebuilt) in modes {
        if prebuilt {
            assert!(shells.wait_ready(spec, 1, Duration::from_secs(60)));
        }
        let options = EnvironmentOptions {
            restore: RestoreOptions {
                memory,
                prefetch,
                shells: prebuilt.then(|| shells.clone()),
                ..RestoreOptions::default()
            },
            ..EnvironmentOptions::default()
        };
        let console = Console::default();
        let _slot = vm_slot();
        let key = KeyChoice::Given(snapshot::MasterKey::load(&key).unwrap());
        let mut env = Environment::start(&snap, &key, &options, Box::new(console.clone()))
            .unwrap_or_else(|e| panic!("{name}: {e:#}\n{}", console.text()));
        let payload = pattern(10_000, 11);
        let answer = env
            .invoke(&invoke_request("r1", &payload), Duration::from_secs(30))
            .unwrap();
        let want: [u8; 32] = Sha256::digest(&payload).into();
        assert_eq!(answer, InvokeOutcome::Response(want.to_vec()), "{name}");
        let pager = env.pager().map(|p| p.stats());
        let timings = env.timings;
        assert_eq!(timings.restore.shell_was_ready, prebuilt, "{name}");
        let outcome = env.shutdown().unwrap();
        let text = console.text();
        assert_eq!(
            outcome.reason.exit_code(),
            0,
            "{name}: {:?}\n{text}",
            outcome.reason
        );
        let after = format!("workload of {FILL_MIB} MiB has checksum {checksum}");
        assert!(text.contains(&after), "{name}: want {after:?} in\n{text}");
        match (memory, prefetch) {
            (MemoryMode::Eager, _) => assert!(pager.is_none()),
            (MemoryMode::Lazy, false) => {
                let stats = outcome.pager.unwrap();
                assert!(stats.faults > 0, "{name}: {stats:?}");
                assert_eq!(stats.prefetched, 0, "{name}: {stats:?}");
            }
            (MemoryMode::Lazy, true) => assert!(outcome.pager.is_some()),
        }
        println!(
            "{name}: checksum {checksum} before and after; restore {:.1?}, ready {:.1?} \
             (hooks {:.1?}); pager {:?}",
            timings.restore.total(),
            timings.ready,
            timings.hooks,
            outcome.pager
        );
    }
}

#[test]
fn a_failing_after_restore_hook_fails_the_restore() {
    if !require_kvm("a_failing_after_restore_hook_fails_the_restore") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let (snap, _) = make_snapshot_with(dir.path(), &key, "thaw.fail=restore");
    let _slot = vm_slot();
    let console = Console::default();
    let key_choice = KeyChoice::Given(snapshot::MasterKey::load(&key).unwrap());
    let err = Environment::start(
        &snap,
        &key_choice,
        &EnvironmentOptions::default(),
        Box::new(console.clone()),
    )
    .err()
    .expect("the restore must fail");
    match &err {
        EnvironmentError::AfterRestore(AfterRestoreError::Hook {
            error_type,
            message,
        }) => {
            assert_eq!(error_type, "Runtime.AfterRestoreError");
            assert!(message.contains("failed on purpose"), "{message}");
        }
        other => panic!("{other:?}\n{}", console.text()),
    }
    // The command line says the same and fails.
    let out = thaw_bin()
        .args([
            "restore",
            snap.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
            "--invoke",
            "never answered",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Runtime.AfterRestoreError"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// An error with all its sources, as `anyhow` would print it.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

fn key_choice(key: &std::path::Path) -> KeyChoice {
    KeyChoice::Given(snapshot::MasterKey::load(key).unwrap())
}

#[test]
fn a_slow_after_restore_hook_times_out() {
    if !require_kvm("a_slow_after_restore_hook_times_out") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let (snap, _) = make_snapshot_sized(dir.path(), &key, 8, "thaw.restore-hook-ms=4000");
    let _slot = vm_slot();
    let console = Console::default();
    let options = EnvironmentOptions {
        after_restore_budget: Duration::from_secs(1),
        ..EnvironmentOptions::default()
    };
    let started = Instant::now();
    let err = Environment::start(
        &snap,
        &key_choice(&key),
        &options,
        Box::new(console.clone()),
    )
    .err()
    .expect("the restore must time out");
    assert!(
        matches!(
            err,
            EnvironmentError::AfterRestore(AfterRestoreError::HookTimeout(t)) if t == Duration::from_secs(1)
        ),
        "{err:?}\n{}",
        console.text()
    );
    assert!(
        err.to_string().contains("did not finish within 1s"),
        "{err}"
    );
    // The budget, not the hook, decided: the environment was given up after about 1 s.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(
        console.text().contains("busy-waiting 4000 ms"),
        "{}",
        console.text()
    );
}

/// Flips one byte in every sealed data chunk of the snapshot at `snap`, in place.
fn corrupt_every_chunk(snap: &std::path::Path, key: &std::path::Path) {
    let master = snapshot::MasterKey::load(key).unwrap();
    let layout = snapshot::Snapshot::open(snap, Some(&master))
        .unwrap()
        .layout()
        .unwrap();
    let path = snap.join(snapshot::SNAPSHOT_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    for (_, range) in &layout.data_chunks {
        bytes[(range.start + (range.end - range.start) / 2) as usize] ^= 0x01;
    }
    // In place, as a disk error or an attacker would: the open snapshot sees it.
    use std::io::{Seek, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(std::io::SeekFrom::Start(0)).unwrap();
    f.write_all(&bytes).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn an_unchanged_snapshot_is_authenticated_in_full_once_per_host() {
    if !require_kvm("an_unchanged_snapshot_is_authenticated_in_full_once_per_host") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let (snap, _) = make_snapshot_sized(dir.path(), &key, 16, "");
    // A file changed within the last second is never recorded (coarse timestamps).
    std::thread::sleep(snapshot::verified::RECENT + Duration::from_millis(100));
    let records = snapshot::VerifiedRecords::new(dir.path().join("verified"));
    let options = RestoreOptions {
        chunk_check: ChunkCheck::Once,
        verified_records: Some(records.clone()),
        vsock_uds: Some(dir.path().join("r.sock")),
        ..RestoreOptions::default()
    };
    let before = |check: ChunkCheck| {
        let options = RestoreOptions {
            chunk_check: check,
            ..options.clone()
        };
        let restored = restore_daemon::restore::restore(
            &snap,
            &key_choice(&key),
            &options,
            Box::new(Console::default()),
        )
        .unwrap();
        restored.timings.authenticated_before
    };
    assert!(
        !before(ChunkCheck::Once),
        "the first restore checks every chunk"
    );
    assert!(before(ChunkCheck::Once), "the second finds the record");
    assert!(!before(ChunkCheck::UpFront), "upfront always checks");

    // The command line's default is `once`, with records under $XDG_STATE_HOME.
    let state = dir.path().join("state");
    let cli_restore = || {
        thaw_bin()
            .args([
                "restore",
                snap.to_str().unwrap(),
                "--key-file",
                key.to_str().unwrap(),
                "--invoke",
                "x",
            ])
            .env("XDG_STATE_HOME", &state)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let _slot = vm_slot();
    let out = cli_restore();
    assert!(out.status.success(), "{}", fixture::output_text(&out));
    let id = snapshot::Snapshot::open(&snap, Some(&snapshot::MasterKey::load(&key).unwrap()))
        .unwrap()
        .id();
    assert!(state.join(format!("thaw/verified/{id}")).is_file());
    // It also learned what the guest needed before its Hello.
    assert!(state.join(format!("thaw/startup/{id}")).is_file());

    // Damaged in place after the record: the file's ctime moved, so the record no longer
    // matches, every chunk is checked again and the snapshot is refused before the guest runs.
    corrupt_every_chunk(&snap, &key);
    let out = cli_restore();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("failed authentication"), "{stderr}");
    assert!(
        !stderr.contains("vsock: connected"),
        "the guest ran: {stderr}"
    );
}

#[test]
fn a_failing_page_server_stops_the_guest_instead_of_hanging_it() {
    if !require_kvm("a_failing_page_server_stops_the_guest_instead_of_hanging_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let (snap, _) = make_snapshot_sized(dir.path(), &key, 16, "");
    let _slot = vm_slot();
    let console = Console::default();
    let options = EnvironmentOptions::default();
    // The snapshot is sound when restored (every chunk is authenticated up front) and goes bad
    // before the guest runs: the page server meets the damage at the guest's first fault.
    let prepared = restore_daemon::environment::Prepared::restore(
        &snap,
        &key_choice(&key),
        &options.restore,
        Box::new(console.clone()),
    )
    .unwrap();
    corrupt_every_chunk(&snap, &key);
    let started = Instant::now();
    let err = prepared
        .start(&options)
        .err()
        .expect("the restore must fail");
    let text = err.to_string();
    assert!(
        matches!(err, EnvironmentError::Restore(RestoreError::PagerFailed(_))),
        "{err:?}\n{}",
        console.text()
    );
    assert!(text.contains("page server failed"), "{text}");
    assert!(text.contains("could not be read"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // From the command line, with chunks checked only on install, the same: an error, no hang.
    let out = thaw_bin()
        .args([
            "restore",
            snap.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
            "--chunk-check",
            "on-install",
            "--invoke",
            "x",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("page server failed"), "{stderr}");
    // And checked up front (the default), it is refused before the guest runs.
    let out = thaw_bin()
        .args([
            "restore",
            snap.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
            "--invoke",
            "x",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("failed authentication"), "{stderr}");
    assert!(
        !stderr.contains("vsock: connected"),
        "the guest ran: {stderr}"
    );
}

#[test]
fn a_recorded_working_set_is_installed_first_on_later_restores() {
    if !require_kvm("a_recorded_working_set_is_installed_first_on_later_restores") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let (snap, created) = make_snapshot_sized(dir.path(), &key, 32, "");
    let checksum = fill_checksum(&created);
    let _slot = vm_slot();
    let recorded = thaw::commands::snapshot_record_ws::record(
        &snap,
        &key_choice(&key),
        b"{}",
        Duration::from_secs(30),
        Box::new(Console::default()),
    )
    .unwrap();
    let ws = &recorded.working_set;
    // The after-restore hook reads the whole 32 MiB workload: at least its 128 chunks.
    assert!(ws.chunks.len() >= 128, "{ws:?}");
    assert!(ws.chunks.len() < recorded.chunks, "{ws:?}");
    assert_eq!(ws.ended_by, snapshot::RecordingEnd::FirstResponse);
    let inspect = fixture::thaw_output(&[
        "snapshot",
        "inspect",
        snap.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
        "--json",
    ]);
    let info: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(info["working_set_chunks"], ws.chunks.len() as u64, "{info}");

    // A later restore installs it first (prefetch off: only the working set and faults).
    let console = Console::default();
    let options = EnvironmentOptions {
        restore: RestoreOptions {
            prefetch: false,
            ..RestoreOptions::default()
        },
        ..EnvironmentOptions::default()
    };
    let env = Environment::start(
        &snap,
        &key_choice(&key),
        &options,
        Box::new(console.clone()),
    )
    .unwrap();
    let outcome = env.shutdown().unwrap();
    let stats = outcome.pager.unwrap();
    assert!(
        stats.working_set >= ws.chunks.len() as u64 / 2,
        "the working set should have been installed mostly ahead of faults: {stats:?}"
    );
    let after = format!("workload of 32 MiB has checksum {checksum}");
    assert!(console.text().contains(&after), "{}", console.text());

    // A tampered working set makes the snapshot unusable: refused, not ignored.
    let ws_file = snap.join(snapshot::WORKING_SET_FILE);
    let mut bytes = std::fs::read(&ws_file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&ws_file, bytes).unwrap();
    let err = Environment::start(
        &snap,
        &key_choice(&key),
        &EnvironmentOptions::default(),
        Box::new(Console::default()),
    )
    .err()
    .expect("a tampered working set must be refused");
    let chain = error_chain(&err);
    assert!(chain.contains("working set"), "{chain}");
}

#[test]
fn a_restore_learns_its_startup_set_and_the_next_has_it_in_place_before_the_guest_asks() {
    if !require_kvm(
        "a_restore_learns_its_startup_set_and_the_next_has_it_in_place_before_the_guest_asks",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let (snap, created) = make_snapshot_sized(dir.path(), &key, 16, "");
    let checksum = fill_checksum(&created);
    let master = snapshot::MasterKey::load(&key).unwrap();
    let opened = snapshot::Snapshot::open(&snap, Some(&master)).unwrap();
    let (id, chunks) = (opened.id(), opened.chunks().len());
    let sets = StartupSets::new(dir.path().join("startup"));
    // Whatever sits in a set's place is a hint at most: garbage is ignored, then replaced.
    std::fs::create_dir_all(sets.dir()).unwrap();
    std::fs::write(sets.dir().join(id.to_string()), b"not a startup set").unwrap();
    let options = EnvironmentOptions {
        restore: RestoreOptions {
            // Nothing installed in the background: what the guest needs, it faults on.
            prefetch: false,
            startup_sets: Some(sets.clone()),
            ..RestoreOptions::default()
        },
        ..EnvironmentOptions::default()
    };
    let _slot = vm_slot();
    let run = || {
        let console = Console::default();
        let env = Environment::start(
            &snap,
            &key_choice(&key),
            &options,
            Box::new(console.clone()),
        )
        .unwrap_or_else(|e| panic!("{}\n{}", error_chain(&e), console.text()));
        let faulted = env.pager().unwrap().recorded();
        let stats = env.shutdown().unwrap().pager.unwrap();
        let after = format!("workload of 16 MiB has checksum {checksum}");
        assert!(console.text().contains(&after), "{}", console.text());
        (stats, faulted)
    };

    let (first, _) = run();
    assert_eq!(first.startup, 0, "nothing learned yet: {first:?}");
    let learned = sets
        .load(id, chunks)
        .unwrap()
        .expect("the first restore learned a set");
    assert!(!learned.is_empty());
    assert!(
        learned.len() <= first.fault_installs as usize,
        "{learned:?} {first:?}"
    );

    let (second, faulted) = run();
    // Each chunk of the set went in before the guest asked for it, unless a fault came first
    // (the server serves a fault before its next startup chunk): never both, never neither.
    let asked = learned.iter().filter(|c| faulted.contains(c)).count();
    assert!(second.startup >= 1, "{second:?}");
    assert_eq!(
        second.startup as usize + asked,
        learned.len(),
        "{second:?} {faulted:?}"
    );
    // What the second still faulted on before Hello only adds to the set.
    let now = sets.load(id, chunks).unwrap().unwrap();
    assert_eq!(now[..learned.len()], learned[..]);
}

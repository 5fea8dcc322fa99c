//! `thaw snapshot create` end to end on real KVM with the test guest: readiness through the
//! agent and through a console line, the runtime failures that must leave no snapshot, and
//! `inspect` / `verify` of what was written — including tampered, truncated and wrong-key
//! copies, and `create` killed with SIGKILL at several points.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fixture::{Console, output_text, require_kvm, thaw_output, vm_slot};
use thaw::capture::Sealing;
use thaw::commands::run::RunOptions;
use thaw::commands::snapshot_create::agent_checkpoint::CheckpointError;
use thaw::commands::snapshot_create::{self, CreateError, CreateOptions, Readiness};

/// The workload size the issue asks for, and a VM big enough to hold it above 64 MiB.
const FILL_MIB: u64 = 256;
const MEM_MIB: u64 = 384;

fn boot(cmdline: &str, mem_mib: u64) -> RunOptions {
    RunOptions {
        cmdline: Some(cmdline.into()),
        mem_mib,
        vcpus: 1,
        ..RunOptions::default()
    }
}

fn key(dir: &Path) -> (PathBuf, snapshot::MasterKey) {
    let path = dir.join("master.key");
    let key = snapshot::MasterKey::load_or_create(&path).unwrap();
    (path, key)
}

fn options(
    boot: RunOptions,
    out: &Path,
    ready: Readiness,
    key: snapshot::MasterKey,
) -> CreateOptions {
    CreateOptions {
        boot,
        out: out.to_path_buf(),
        replace: false,
        ready,
        init_timeout: Duration::from_secs(60),
        sealing: Sealing::Encrypted(key),
    }
}

/// Runs `create` with a VM slot held, the console captured.
fn create(options: CreateOptions) -> (Result<snapshot_create::Created, CreateError>, String) {
    let _slot = vm_slot();
    let console = Console::default();
    let result = snapshot_create::create(options, Box::new(console.clone()));
    (result, console.text())
}

/// The console's `fill:` line's checksum.
fn fill_checksum(console: &str) -> String {
    console
        .lines()
        .find_map(|l| {
            l.strip_prefix("fill: ")
                .and_then(|l| l.split("checksum ").nth(1))
        })
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no fill line in:\n{console}"))
        .to_string()
}

#[test]
fn agent_ready_test_guest_with_256_mib_is_snapshotted_and_verifies() {
    if !require_kvm("agent_ready_test_guest_with_256_mib_is_snapshotted_and_verifies") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("snap");
    let (key_path, key) = key(dir.path());
    let cmdline = format!("thaw.agent=1 thaw.init=snap-start thaw.fill-mib={FILL_MIB}");
    let (result, console) = create(options(
        boot(&cmdline, MEM_MIB),
        &out,
        Readiness::Agent,
        key,
    ));
    let created = result.unwrap_or_else(|e| panic!("{e:#}\nconsole:\n{console}"));
    fill_checksum(&console);
    assert!(
        console.contains("hook before-checkpoint: checkpoint #1"),
        "{console}"
    );
    assert_eq!(created.agent.as_deref(), Some("thaw-test-guest/0.1.0"));
    assert_eq!(created.summary.memory_bytes, MEM_MIB << 20);

    let key_arg = key_path.to_str().unwrap();
    let out_arg = out.to_str().unwrap();
    let verified = thaw_output(&["snapshot", "verify", out_arg, "--key-file", key_arg]);
    assert!(verified.status.success(), "{}", output_text(&verified));
    assert!(
        output_text(&verified).contains("is intact"),
        "{}",
        output_text(&verified)
    );

    let inspected = thaw_output(&[
        "snapshot",
        "inspect",
        out_arg,
        "--key-file",
        key_arg,
        "--json",
    ]);
    assert!(inspected.status.success(), "{}", output_text(&inspected));
    let info: serde_json::Value = serde_json::from_slice(&inspected.stdout).unwrap();
    let share = info["zero_page_share"].as_f64().unwrap();
    let ratio = info["compression_ratio"].as_f64().unwrap();
    // A third of the workload is zero pages, and so is the memory it did not touch (128 of
    // 384 MiB, less the guest image): zero pages are about half of all.
    assert!((0.4..0.75).contains(&share), "zero-page share {share}");
    // Half the non-zero pages are text (compresses several times), half random (does not).
    assert!((0.4..0.8).contains(&ratio), "compression ratio {ratio}");
    assert!(info["file_bytes"].as_u64().unwrap() < (MEM_MIB << 20) / 2);
    assert_eq!(info["vcpus"], 1);
    assert_eq!(info["protection"], "aes-256-gcm");
    println!(
        "256 MiB workload: init {:.1?}, capture {:.1?}, write {:.1?}; zero-page share {share:.3}, \
         stored/non-zero {ratio:.3}, file {} bytes",
        created.init, created.capture, created.summary.elapsed, info["file_bytes"]
    );
}

#[test]
fn serial_ready_idle_guest_is_snapshotted() {
    if !require_kvm("serial_ready_idle_guest_is_snapshotted") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("snap");
    let (_, key) = key(dir.path());
    let ready = Readiness::Serial("thaw-test-guest: idle".into());
    let (result, console) = create(options(
        boot("thaw.idle=1 thaw.fill-mib=8", 128),
        &out,
        ready,
        key,
    ));
    let created = result.unwrap_or_else(|e| panic!("{e:#}\nconsole:\n{console}"));
    assert_eq!(created.agent, None);
    assert!(out.join(snapshot::SNAPSHOT_FILE).is_file());
}

/// Runs a create that must fail; checks nothing was left at the target.
fn create_fails(cmdline: &str, ready: Readiness, timeout: Duration) -> (CreateError, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("snap");
    let (_, key) = key(dir.path());
    let mut opts = options(boot(cmdline, 128), &out, ready, key);
    opts.init_timeout = timeout;
    let (result, console) = create(opts);
    let err = match result {
        Ok(_) => panic!("create succeeded for {cmdline:?}\n{console}"),
        Err(e) => e,
    };
    assert!(!out.exists(), "a failed create left {}", out.display());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "master.key")
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    (err, console)
}

#[test]
fn init_error_leaves_no_snapshot_and_carries_the_runtime_message() {
    if !require_kvm("init_error_leaves_no_snapshot_and_carries_the_runtime_message") {
        return;
    }
    let (err, _) = create_fails(
        "thaw.agent=1 thaw.init=snap-start thaw.fail=init",
        Readiness::Agent,
        Duration::from_secs(60),
    );
    match &err {
        CreateError::NotReady {
            source:
                CheckpointError::Init {
                    error_type,
                    message,
                },
            ..
        } => {
            assert_eq!(error_type, "Runtime.InitError");
            assert_eq!(message, "init failed on purpose (thaw.fail=init)");
        }
        other => panic!("wrong error: {other:#}"),
    }
    assert!(err.to_string().contains("no snapshot was taken"));
}

#[test]
fn failing_before_checkpoint_hook_aborts_with_its_error() {
    if !require_kvm("failing_before_checkpoint_hook_aborts_with_its_error") {
        return;
    }
    let (err, console) = create_fails(
        "thaw.agent=1 thaw.init=snap-start thaw.fail=checkpoint",
        Readiness::Agent,
        Duration::from_secs(60),
    );
    match &err {
        CreateError::NotReady {
            source:
                CheckpointError::BeforeCheckpoint {
                    error_type,
                    message,
                },
            ..
        } => {
            assert_eq!(error_type, "Runtime.BeforeCheckpointError");
            assert!(message.contains("thaw.fail=checkpoint"), "{message}");
        }
        other => panic!("wrong error: {other:#}\n{console}"),
    }
}

#[test]
fn runtime_dying_during_init_leaves_no_snapshot() {
    if !require_kvm("runtime_dying_during_init_leaves_no_snapshot") {
        return;
    }
    let (err, _) = create_fails(
        "thaw.agent=1 thaw.init=snap-start thaw.fail=exit",
        Readiness::Agent,
        Duration::from_secs(60),
    );
    assert!(
        matches!(
            err,
            CreateError::NotReady {
                source: CheckpointError::GuestEnded { .. },
                ..
            }
        ),
        "{err:#}"
    );
    assert!(err.to_string().contains("exits during init"), "{err:#}");
}

#[test]
fn init_timeout_and_missing_marker_and_on_demand_agents_are_refused() {
    if !require_kvm("init_timeout_and_missing_marker_and_on_demand_agents_are_refused") {
        return;
    }
    // An idle guest has no agent: nobody connects.
    let started = Instant::now();
    let (err, _) = create_fails("thaw.idle=1", Readiness::Agent, Duration::from_secs(2));
    assert!(
        matches!(
            err,
            CreateError::NotReady {
                source: CheckpointError::InitTimeout { .. },
                ..
            }
        ),
        "{err:#}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    // The marker never appears.
    let (err, _) = create_fails(
        "thaw.idle=1",
        Readiness::Serial("never printed".into()),
        Duration::from_secs(2),
    );
    assert!(matches!(err, CreateError::MarkerTimeout { .. }), "{err:#}");
    // The guest exits before printing it.
    let (err, _) = create_fails(
        "thaw.exit=7",
        Readiness::Serial("never printed".into()),
        Duration::from_secs(30),
    );
    assert!(
        matches!(err, CreateError::MarkerNeverPrinted { .. }),
        "{err:#}"
    );
    assert!(err.to_string().contains("exit"), "{err:#}");
    // An on-demand runtime cannot be checkpointed.
    let (err, _) = create_fails("thaw.agent=1", Readiness::Agent, Duration::from_secs(60));
    assert!(
        matches!(
            err,
            CreateError::NotReady {
                source: CheckpointError::OnDemand { .. },
                ..
            }
        ),
        "{err:#}"
    );
}

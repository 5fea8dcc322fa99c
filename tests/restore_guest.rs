//! What a restored guest must find, checked from inside the test guest (issue 5):
//!
//! - continuity: the register keeper on cpu1 (`thaw.keeper=1`) keeps counting after a restore,
//!   and the x87, MXCSR, xmm and (with AVX) ymm registers it loaded before the snapshot still
//!   hold their pattern;
//! - uniqueness: two clones of one snapshot, given different entropy, draw different random
//!   values, and both know the current wall-clock time, not the snapshot's;
//! - a slow after-restore hook (`thaw.restore-hook-ms`) really delays `RestoreDone`, so the
//!   host's hook budget can be tested against it.
//!
//! The test plays the host side of the agent protocol over `thaw restore`'s vsock socket.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fixture::{Console, pattern, require_kvm, thaw_bin, vm_slot};
use hooks_sdk::protocol::io::{self, Frame};
use hooks_sdk::protocol::{InitType, Invoke, Kind, Message, Restored};
use thaw::capture::Sealing;
use thaw::commands::run::RunOptions;
use thaw::commands::snapshot_create::{self, CreateOptions, Readiness};
use vmm_core::config::VsockConfig;

/// The vector width the keeper must report on this project's hosts: the VMM hands guests the
/// host CPU's AVX and XSAVE (also on PVM), and the test guest enables them.
const VECTOR_BITS: u64 = 256;

/// Unix time now, in nanoseconds.
fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Snapshots the test guest's agent booted with `cmdline`; returns the snapshot's directory
/// and the console of the VM it came from.
fn make_snapshot(dir: &Path, key: &Path, cmdline: &str, vcpus: u8) -> (PathBuf, String) {
    let out = dir.join("snap");
    let options = CreateOptions {
        boot: RunOptions {
            cmdline: Some(cmdline.to_string()),
            mem_mib: 128,
            vcpus,
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

fn expect(s: &mut UnixStream, kind: Kind) -> Frame {
    let frame = io::read_frame(s).unwrap_or_else(|e| panic!("expected {kind:?}: {e}"));
    assert_eq!(frame.kind, kind, "{:?}", frame.message());
    frame
}

/// A running `thaw restore` and the agent connection of its guest.
struct RestoredVm {
    child: Child,
    agent: UnixStream,
}

/// Starts `thaw restore` of `snap` with its vsock socket at `uds`, and waits for the restored
/// agent to connect and say `Hello`.
fn start_clone(snap: &Path, key: &Path, uds: &Path) -> RestoredVm {
    let listener = UnixListener::bind(format!("{}_9000", uds.display())).unwrap();
    listener.set_nonblocking(true).unwrap();
    let started = Instant::now();
    let mut child = thaw_bin()
        .args(["restore", snap.to_str().unwrap(), "--key-file"])
        .arg(key)
        .arg("--vsock-uds")
        .arg(uds)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut agent = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let gone = child.try_wait().unwrap().is_some();
                if gone || started.elapsed() > Duration::from_secs(60) {
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
    agent.set_nonblocking(false).unwrap();
    agent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let hello = expect(&mut agent, Kind::Hello);
    assert!(matches!(
        hello.message(),
        Ok(Message::Hello {
            init_type: InitType::SnapStart,
            ..
        })
    ));
    RestoredVm { child, agent }
}

impl RestoredVm {
    /// Sends `Restored` with the host's current wall clock; returns how long `RestoreDone`
    /// took to come back.
    fn restored(&mut self, entropy: &[u8], restore_id: &str) -> Duration {
        let sent = Instant::now();
        io::write_message(
            &mut self.agent,
            &Message::Restored(Restored {
                entropy,
                wall_clock_ns: unix_ns(),
                restore_id,
            }),
        )
        .unwrap();
        expect(&mut self.agent, Kind::RestoreDone);
        sent.elapsed()
    }

    /// Invokes `thaw:status`; returns the document and the host's Unix time when it arrived.
    fn status(&mut self, request_id: &str) -> (serde_json::Value, u64) {
        io::write_message(
            &mut self.agent,
            &Message::Invoke(Invoke {
                request_id,
                deadline_ms: unix_ns() / 1_000_000 + 60_000,
                function_arn: "arn:aws:lambda:us-east-1:123456789012:function:f",
                trace_id: "",
                client_context: "",
                cognito_identity: "",
                payload: b"thaw:status",
            }),
        )
        .unwrap();
        let frame = expect(&mut self.agent, Kind::Response);
        let now = unix_ns();
        match frame.message().unwrap() {
            Message::Response {
                request_id: id,
                payload,
            } => {
                assert_eq!(id, request_id);
                let doc = serde_json::from_slice(payload).unwrap_or_else(|e| {
                    panic!(
                        "status is not JSON ({e}): {}",
                        String::from_utf8_lossy(payload)
                    )
                });
                (doc, now)
            }
            other => panic!("{other:?}"),
        }
    }

    /// Shuts the guest down; returns its console.
    fn shutdown(mut self) -> String {
        io::write_message(&mut self.agent, &Message::Shutdown).unwrap();
        let out = self.child.wait_with_output().unwrap();
        let console = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{console}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        console
    }
}

fn u64_field(doc: &serde_json::Value, name: &str) -> u64 {
    doc[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {name:?} in {doc}"))
}

fn str_field<'a>(doc: &'a serde_json::Value, name: &str) -> &'a str {
    doc[name]
        .as_str()
        .unwrap_or_else(|| panic!("no string {name:?} in {doc}"))
}

/// What one clone reported.
struct CloneReport {
    randoms: [String; 2],
}

#[test]
fn clones_continue_the_registers_and_counter_but_differ_in_randomness_and_time() {
    if !require_kvm("clones_continue_the_registers_and_counter_but_differ_in_randomness_and_time") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let (snap, created) = make_snapshot(
        dir.path(),
        &key,
        "thaw.agent=1 thaw.init=snap-start thaw.keeper=1",
        2,
    );
    let snapshot_ns = unix_ns();
    // The keeper's counter when the before-checkpoint hook ran: the snapshot's is at least that.
    let before: u64 = created
        .lines()
        .find_map(|l| l.strip_prefix("hook before-checkpoint: keeper counter "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no keeper line at the checkpoint:\n{created}"));
    assert!(
        created.contains(&format!("registers intact, {VECTOR_BITS}-bit vectors")),
        "{created}"
    );
    // Let the host's clock move well away from the snapshot's.
    std::thread::sleep(Duration::from_millis(1500));

    let mut reports = Vec::new();
    for (n, seed) in [(1, 11), (2, 12)] {
        let _slot = vm_slot();
        let started = Instant::now();
        let mut clone = start_clone(&snap, &key, &dir.path().join(format!("r{n}.sock")));
        let restore_id = format!("clone-{n}");
        clone.restored(&pattern(64, seed), &restore_id);
        let (first, first_now) = clone.status("status-1");
        std::thread::sleep(Duration::from_millis(200));
        let (second, second_now) = clone.status("status-2");
        let console = clone.shutdown();
        for (doc, host_ns) in [(&first, first_now), (&second, second_now)] {
            assert_eq!(str_field(doc, "registers"), "intact", "clone {n}: {doc}");
            assert_eq!(
                u64_field(doc, "vector_bits"),
                VECTOR_BITS,
                "clone {n}: {doc}"
            );
            assert!(u64_field(doc, "checks") > 0, "clone {n}: {doc}");
            assert_eq!(u64_field(doc, "restores"), 1, "clone {n}: {doc}");
            assert_eq!(str_field(doc, "restore_id"), restore_id, "clone {n}: {doc}");
            let wall = u64_field(doc, "wall_clock_ns");
            assert!(
                wall.abs_diff(host_ns) < 1_000_000_000,
                "clone {n}: guest clock {wall} vs host {host_ns}: {doc}"
            );
            assert!(
                wall > snapshot_ns + 1_000_000_000,
                "clone {n}: guest clock {wall} is not past the snapshot's {snapshot_ns}"
            );
            let random = str_field(doc, "random");
            assert!(
                random.len() == 32 && random.bytes().all(|b| b.is_ascii_hexdigit()),
                "{random}"
            );
        }
        let (c1, c2) = (u64_field(&first, "counter"), u64_field(&second, "counter"));
        assert!(
            c1 >= before,
            "clone {n}: counter {c1} went back from {before}"
        );
        assert!(
            c2 > c1,
            "clone {n}: the keeper stopped counting ({c1}, {c2})"
        );
        assert!(
            u64_field(&second, "checks") > u64_field(&first, "checks"),
            "clone {n}: the keeper stopped checking"
        );
        assert_ne!(str_field(&first, "random"), str_field(&second, "random"));
        assert!(
            console.contains("hook after-restore: keeper counter ")
                && console.contains("registers intact"),
            "{console}"
        );
        assert!(!console.contains("banner from CPL3"), "{console}");
        println!(
            "clone {n}: restored and answered in {:.1?}; keeper counter {before} at the \
             checkpoint, {c1} then {c2} after the restore; {} checks; {VECTOR_BITS}-bit \
             registers intact; guest clock {} ms off the host's",
            started.elapsed(),
            u64_field(&second, "checks"),
            (u64_field(&second, "wall_clock_ns") as i64 - second_now as i64) / 1_000_000,
        );
        reports.push(CloneReport {
            randoms: [
                str_field(&first, "random").to_string(),
                str_field(&second, "random").to_string(),
            ],
        });
    }
    for i in 0..2 {
        assert_ne!(
            reports[0].randoms[i], reports[1].randoms[i],
            "the clones drew the same random value"
        );
    }
}

#[test]
fn a_slow_after_restore_hook_delays_restore_done() {
    if !require_kvm("a_slow_after_restore_hook_delays_restore_done") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let (snap, _) = make_snapshot(
        dir.path(),
        &key,
        "thaw.agent=1 thaw.init=snap-start thaw.restore-hook-ms=1500",
        1,
    );
    let _slot = vm_slot();
    let mut clone = start_clone(&snap, &key, &dir.path().join("r.sock"));
    let took = clone.restored(&pattern(32, 5), "slow");
    let (status, _) = clone.status("status");
    let console = clone.shutdown();
    assert!(
        took >= Duration::from_millis(1500),
        "RestoreDone after {took:?}"
    );
    assert!(took < Duration::from_secs(10), "RestoreDone after {took:?}");
    assert_eq!(str_field(&status, "registers"), "no keeper");
    assert_eq!(u64_field(&status, "vector_bits"), 0);
    assert!(
        console.contains("busy-waiting 1500 ms as asked (thaw.restore-hook-ms)"),
        "{console}"
    );
    println!("thaw.restore-hook-ms=1500: RestoreDone {took:.1?} after Restored");
}

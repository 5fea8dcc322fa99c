//! The test guest's polling virtio-vsock driver and Thaw agent, end to end over the VMM's
//! virtio-mmio vsock device: the host side listens on `<uds>_9000` (Firecracker's hybrid vsock)
//! and drives the host↔guest protocol of docs/guest-protocol.md with `hooks_sdk::protocol`.
//! Also: 6 MiB payloads, a malformed frame (the guest resets the
//! connection and reconnects), each `thaw.vsock-misbehave` kind (the VMM survives and keeps
//! serving), the bench responder, and a guest with no vsock device.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fixture::{TestVm, VmRun, pattern, require_kvm};
use hooks_sdk::protocol::io::{self, Frame};
use hooks_sdk::protocol::{self, InitType, Invoke, Kind, Message, Restored};
use sha2::{Digest, Sha256};
use vmm_core::config::VsockConfig;
use vmm_core::{ExitReason, MachineConfig};

// ----- the protocol, host side --------------------------------------------------------------

const MAX_PAYLOAD: usize = protocol::MAX_PAYLOAD;
const AGENT_PORT: u32 = protocol::AGENT_PORT;

fn encode(message: &Message) -> Vec<u8> {
    message.encode().expect("a valid message")
}

fn invoke<'a>(request_id: &'a str, payload: &'a [u8]) -> Message<'a> {
    Message::Invoke(Invoke {
        request_id,
        deadline_ms: 1_795_000_000_000,
        function_arn: "arn:aws:lambda:us-east-1:123456789012:function:f",
        trace_id: "Root=1-5e1b4151-5ac6c58f5b5daa6532e4f9f3",
        client_context: "",
        cognito_identity: "",
        payload,
    })
}

fn restored<'a>(entropy: &'a [u8], wall_clock_ns: u64, restore_id: &'a str) -> Message<'a> {
    Message::Restored(Restored {
        entropy,
        wall_clock_ns,
        restore_id,
    })
}

fn send(s: &mut UnixStream, message: &Message) {
    io::write_message(s, message).expect("write a frame to the guest");
}

// ----- a guest and its host side ------------------------------------------------------------

/// A booted test guest with a vsock device, and the host's listener on the agent port.
struct Guest {
    _dir: tempfile::TempDir,
    uds: PathBuf,
    listener: UnixListener,
    vm: Option<JoinHandle<VmRun>>,
}

impl Guest {
    fn boot(cmdline: &str, timeout: Duration) -> Guest {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let uds = dir.path().join("v.sock");
        let listener = UnixListener::bind(format!("{}_{AGENT_PORT}", uds.display()))
            .expect("listen on the agent port's socket");
        listener.set_nonblocking(true).unwrap();
        let config = MachineConfig {
            mem_mib: 128,
            vcpus: 1,
            kernel: thaw::test_guest::kernel(),
            initrd: None,
            cmdline: cmdline.into(),
            vsock: Some(VsockConfig {
                guest_cid: 3,
                uds_path: uds.clone(),
            }),
            disks: Vec::new(),
        };
        let vm = std::thread::spawn(move || TestVm::new(config).timeout(timeout).run());
        Guest {
            _dir: dir,
            uds,
            listener,
            vm: Some(vm),
        }
    }

    /// The next connection from the guest to the agent port.
    fn accept(&self, within: Duration) -> Result<UnixStream, String> {
        let deadline = Instant::now() + within;
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    return Ok(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(format!("no connection from the guest within {within:?}"));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(format!("accept failed: {e}")),
            }
        }
    }

    /// Accepts connections until one starts with `Hello`; returns it, the Hello frame and how
    /// many other connections reached the host. Others (a misbehaving guest's throwaway
    /// connections) must not carry a frame. Each is read on its own thread: a flooding guest
    /// may drop its RST for some of them when its control queue is full, and those stay open
    /// until the VM ends, so reading them one after another would stall behind each timeout.
    fn accept_hello(&self) -> Result<(UnixStream, Frame, usize), String> {
        let (tx, rx) = mpsc::channel::<(UnixStream, Result<Frame, io::FrameError>)>();
        let mut accepted = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            while let Ok((s, read)) = rx.try_recv() {
                match read {
                    Ok(frame) if frame.kind == Kind::Hello => {
                        return Ok((s, frame, accepted - 1));
                    }
                    Ok(frame) => {
                        return Err(format!("first frame is {:?}, not Hello", frame.kind));
                    }
                    Err(_) => {} // a throwaway connection ended without a frame
                }
            }
            match self.listener.accept() {
                Ok((s, _)) => {
                    accepted += 1;
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let tx = tx.clone();
                    std::thread::spawn(move || {
                        let mut s = s;
                        let read = io::read_frame(&mut s);
                        let _ = tx.send((s, read));
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(format!(
                            "no Hello from the guest within 60 s ({accepted} connections)"
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(format!("accept failed: {e}")),
            }
        }
    }

    /// Waits for the VM to end and returns its run.
    fn finish(mut self) -> VmRun {
        self.vm.take().unwrap().join().expect("the VM thread")
    }

    /// Runs `drive` against the guest; on failure, shows the console (after the VM times out).
    fn drive(self, drive: impl FnOnce(&Guest) -> Result<(), String>) -> VmRun {
        let result = drive(&self);
        let uds = self.uds.clone();
        let run = self.finish();
        if let Err(e) = result {
            panic!(
                "{e}\n(vsock socket {})\nconsole:\n{}",
                uds.display(),
                run.output
            );
        }
        run
    }
}

fn expect_frame(s: &mut UnixStream, kind: Kind) -> Result<Frame, String> {
    match io::read_frame(s) {
        Ok(frame) if frame.kind == kind => Ok(frame),
        Ok(frame) => Err(format!(
            "expected {kind:?}, got {:?} ({} bytes)",
            frame.kind,
            frame.body.len()
        )),
        Err(e) => Err(format!("expected {kind:?}: {e}")),
    }
}

/// Invokes with `payload` and checks the response is its SHA-256.
fn check_invoke(s: &mut UnixStream, id: &str, payload: &[u8]) -> Result<(), String> {
    io::write_message(s, &invoke(id, payload)).map_err(|e| e.to_string())?;
    let frame = expect_frame(s, Kind::Response)?;
    let want: [u8; 32] = Sha256::digest(payload).into();
    match frame.message() {
        Ok(Message::Response {
            request_id,
            payload,
        }) if request_id == id && payload == want => Ok(()),
        other => Err(format!("bad Response to {id}: {other:?}")),
    }
}

fn assert_clean_exit(run: &VmRun) {
    assert_eq!(run.reason, ExitReason::GuestExit(0), "{}", run.output);
    assert!(!run.output.contains("CPU exception"), "{}", run.output);
}

// ----- the agent ----------------------------------------------------------------------------

#[test]
fn agent_serves_invokes_checkpoint_restore_and_shutdown() {
    if !require_kvm("agent_serves_invokes_checkpoint_restore_and_shutdown") {
        return;
    }
    let guest = Guest::boot("thaw.agent=1", Duration::from_secs(60));
    let run = guest.drive(|g| {
        let (mut s, hello, _) = g.accept_hello()?;
        match hello.message() {
            Ok(Message::Hello {
                agent: "thaw-test-guest/0.1.0",
                init_type: InitType::OnDemand,
            }) => {}
            other => return Err(format!("bad Hello: {other:?}")),
        }
        expect_frame(&mut s, Kind::Ready)?;
        check_invoke(&mut s, "req-empty", b"")?;
        check_invoke(&mut s, "req-small", b"{\"hello\":\"world\"}")?;
        check_invoke(&mut s, "req-64k", &pattern(64 * 1024 + 7, 1))?;
        send(&mut s, &Message::Checkpoint);
        expect_frame(&mut s, Kind::SnapshotReady)?;
        let entropy = pattern(48, 2);
        send(
            &mut s,
            &restored(&entropy, 1_795_123_456_789_000_000, "restore-42"),
        );
        expect_frame(&mut s, Kind::RestoreDone)?;
        check_invoke(&mut s, "req-after-restore", b"still here")?;
        send(&mut s, &Message::Shutdown);
        Ok(())
    });
    assert_clean_exit(&run);
    let out = &run.output;
    let before = out.find("hook before-checkpoint: checkpoint #1, marker 0x");
    let after = out.find("hook after-restore: restore id \"restore-42\", wall clock 1795123456789000000 ns, 48 entropy bytes mixed");
    assert!(
        before.is_some() && after.is_some() && before < after,
        "{out}"
    );
    assert!(
        out.contains("agent: invoke #3 \"req-64k\": 65543 payload bytes"),
        "{out}"
    );
    assert!(
        out.contains("agent: shutdown requested after 4 invocations (stray interrupts: 0"),
        "{out}"
    );
}

#[test]
fn agent_hashes_a_six_mib_payload() {
    if !require_kvm("agent_hashes_a_six_mib_payload") {
        return;
    }
    let guest = Guest::boot("thaw.agent=1", Duration::from_secs(60));
    let run = guest.drive(|g| {
        let (mut s, _, _) = g.accept_hello()?;
        expect_frame(&mut s, Kind::Ready)?;
        check_invoke(&mut s, "six-mib", &pattern(MAX_PAYLOAD, 3))?;
        check_invoke(&mut s, "six-mib-again", &pattern(MAX_PAYLOAD, 4))?;
        send(&mut s, &Message::Shutdown);
        Ok(())
    });
    assert_clean_exit(&run);
    assert!(
        run.output.contains("\"six-mib\": 6291456 payload bytes"),
        "{}",
        run.output
    );
}

#[test]
fn snap_start_agent_says_so_and_waits_for_the_checkpoint() {
    if !require_kvm("snap_start_agent_says_so_and_waits_for_the_checkpoint") {
        return;
    }
    let guest = Guest::boot("thaw.agent=1 thaw.init=snap-start", Duration::from_secs(60));
    let run = guest.drive(|g| {
        let (mut s, hello, _) = g.accept_hello()?;
        if !matches!(
            hello.message(),
            Ok(Message::Hello {
                init_type: InitType::SnapStart,
                ..
            })
        ) {
            return Err(format!("Hello does not say snap-start: {hello:?}"));
        }
        // No Ready: the host's next step is the checkpoint.
        send(&mut s, &Message::Checkpoint);
        expect_frame(&mut s, Kind::SnapshotReady)?;
        send(&mut s, &restored(&[7; 32], 1, "r-1"));
        expect_frame(&mut s, Kind::RestoreDone)?;
        send(&mut s, &Message::Shutdown);
        Ok(())
    });
    assert_clean_exit(&run);
}

#[test]
fn malformed_frames_reset_the_connection_and_the_agent_reconnects() {
    if !require_kvm("malformed_frames_reset_the_connection_and_the_agent_reconnects") {
        return;
    }
    let guest = Guest::boot("thaw.agent=1", Duration::from_secs(60));
    let mut bad_magic = encode(&invoke("magic", b"abc"));
    bad_magic[..4].copy_from_slice(b"WAHT");
    let mut trailing = encode(&invoke("cut", b"abc"));
    trailing[8] += 1; // the header claims one byte more than the body's fields use
    trailing.push(0);
    let guest_kind = encode(&Message::Hello {
        agent: "x",
        init_type: InitType::OnDemand,
    });
    let malformed: [(&str, Vec<u8>); 3] = [
        ("bad magic", bad_magic),
        ("trailing bytes", trailing),
        ("a guest-to-host kind", guest_kind),
    ];
    let run = guest.drive(|g| {
        for (what, bytes) in &malformed {
            let (mut s, _, _) = g.accept_hello()?;
            expect_frame(&mut s, Kind::Ready)?;
            s.write_all(bytes).unwrap();
            // The guest resets the connection: the host sees it end, with no answer.
            match io::read_frame(&mut s) {
                Err(io::FrameError::Io(e)) if e.kind() != std::io::ErrorKind::WouldBlock => {}
                other => return Err(format!("after {what}: connection not reset: {other:?}")),
            }
        }
        let (mut s, _, _) = g.accept_hello()?;
        expect_frame(&mut s, Kind::Ready)?;
        check_invoke(&mut s, "after-all-that", b"ok")?;
        send(&mut s, &Message::Shutdown);
        Ok(())
    });
    assert_clean_exit(&run);
    for reason in [
        "bad frame magic",
        "1 bytes after the last field",
        "unexpected kind Hello",
    ] {
        assert!(
            run.output
                .contains(&format!("agent: malformed frame from the host: {reason}")),
            "{reason}: {}",
            run.output
        );
    }
}

#[test]
fn host_connections_to_the_guest_are_refused_while_the_agent_serves() {
    if !require_kvm("host_connections_to_the_guest_are_refused_while_the_agent_serves") {
        return;
    }
    let guest = Guest::boot("thaw.agent=1", Duration::from_secs(60));
    let run = guest.drive(|g| {
        let (mut s, _, _) = g.accept_hello()?;
        expect_frame(&mut s, Kind::Ready)?;
        // The guest listens on no port: the device's REQUEST is answered with RST, and the
        // host's connection is closed without an "OK".
        for port in [5000, AGENT_PORT] {
            let mut host = UnixStream::connect(&g.uds).map_err(|e| e.to_string())?;
            host.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            host.write_all(format!("CONNECT {port}\n").as_bytes())
                .unwrap();
            let mut answer = Vec::new();
            match host.read_to_end(&mut answer) {
                Ok(_) if answer.is_empty() => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                other => return Err(format!("CONNECT {port}: {other:?} {answer:?}")),
            }
        }
        check_invoke(&mut s, "still-serving", b"x")?;
        send(&mut s, &Message::Shutdown);
        Ok(())
    });
    assert_clean_exit(&run);
}

#[test]
fn without_a_vsock_device_the_agent_exits_5() {
    if !require_kvm("without_a_vsock_device_the_agent_exits_5") {
        return;
    }
    let run = TestVm::test_guest(1, "thaw.agent=1").run();
    assert_eq!(run.reason, ExitReason::GuestExit(5), "{}", run.output);
    assert!(
        run.output.contains("no usable virtio-mmio vsock device"),
        "{}",
        run.output
    );
}

// ----- a misbehaving guest ------------------------------------------------------------------

fn misbehave(kind: &str) {
    if !require_kvm(&format!("misbehaving_guest_{kind}")) {
        return;
    }
    let guest = Guest::boot(
        &format!("thaw.vsock-misbehave={kind}"),
        Duration::from_secs(90),
    );
    let mut junk_connections = 0;
    let run = guest.drive(|g| {
        let (mut s, _, junk) = g.accept_hello()?;
        junk_connections = junk;
        expect_frame(&mut s, Kind::Ready)?;
        check_invoke(&mut s, "after-misbehaving", &pattern(100_000, 5))?;
        send(&mut s, &Message::Shutdown);
        Ok(())
    });
    assert_clean_exit(&run);
    let done = format!("misbehave {kind}: done; checking a good connection");
    assert!(run.output.contains(&done), "{}", run.output);
    // The report line, for the record (visible with --nocapture).
    for line in run.output.lines().filter(|l| l.contains("misbehave")) {
        println!("{kind}: {line}");
    }
    println!("{kind}: {junk_connections} throwaway connections reached the host");
}

#[test]
fn misbehaving_guest_bad_addr() {
    misbehave("bad-addr");
}

#[test]
fn misbehaving_guest_bad_len() {
    misbehave("bad-len");
}

#[test]
fn misbehaving_guest_bad_op() {
    misbehave("bad-op");
}

#[test]
fn misbehaving_guest_no_conn() {
    misbehave("no-conn");
}

#[test]
fn misbehaving_guest_flood() {
    misbehave("flood");
}

#[test]
fn misbehaving_guest_all_kinds_in_one_boot() {
    misbehave("all");
}

// ----- the bench responder ------------------------------------------------------------------

fn bench_command(op: u8, len: u64) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[8..].copy_from_slice(&len.to_le_bytes());
    c
}

#[test]
fn bench_responder_echoes_and_checksums_both_ways() {
    if !require_kvm("bench_responder_echoes_and_checksums_both_ways") {
        return;
    }
    let guest = Guest::boot("thaw.vsock-bench=1", Duration::from_secs(60));
    let run = guest.drive(|g| {
        let mut s = g.accept(Duration::from_secs(30))?;
        let mut greeting = [0u8; 16];
        s.read_exact(&mut greeting).map_err(|e| e.to_string())?;
        if &greeting != b"thaw-vsock-bench" {
            return Err(format!("bad greeting {greeting:02x?}"));
        }
        let msg = pattern(64, 6);
        s.write_all(&bench_command(b'E', 64)).unwrap();
        s.write_all(&msg).unwrap();
        let mut back = [0u8; 64];
        s.read_exact(&mut back).map_err(|e| e.to_string())?;
        if back[..] != msg[..] {
            return Err("echo differs".into());
        }
        let data = pattern(1 << 20, 7);
        s.write_all(&bench_command(b'U', data.len() as u64))
            .unwrap();
        s.write_all(&data).unwrap();
        let mut digest = [0u8; 32];
        s.read_exact(&mut digest).map_err(|e| e.to_string())?;
        if digest[..] != Sha256::digest(&data)[..] {
            return Err("upload checksum differs".into());
        }
        s.write_all(&bench_command(b'D', 1 << 20)).unwrap();
        let mut down = vec![0u8; (1 << 20) + 32];
        s.read_exact(&mut down).map_err(|e| e.to_string())?;
        if down[1 << 20..] != Sha256::digest(&down[..1 << 20])[..] {
            return Err("download checksum differs".into());
        }
        s.write_all(&bench_command(b'Q', 0)).unwrap();
        Ok(())
    });
    assert_clean_exit(&run);
}

// ----- the driver's own unit tests ----------------------------------------------------------

include!("../build_support/test_guest_cargo.rs");

/// The test guest is not a workspace member (it is a freestanding image), so `cargo test
/// --workspace` would not run the unit tests of its driver core (virtqueues, credit, the
/// connection state machine, against a simulated device). This runs them on the host, with
/// the same isolation from the workspace's flags as build.rs's guest build.
#[test]
fn guest_driver_unit_tests_pass_on_the_host() {
    let guest_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks-sdk/test-guest");
    let out = test_guest_cargo(&guest_dir)
        .args(["test", "--lib", "--locked", "--target-dir"])
        .arg(Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-guest-unit"))
        .output()
        .expect("run cargo test in hooks-sdk/test-guest");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the test guest's unit tests failed:\n{text}"
    );
    for line in text.lines().filter(|l| l.starts_with("test result:")) {
        println!("test guest unit tests: {line}");
    }
}

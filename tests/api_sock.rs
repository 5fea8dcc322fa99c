//! `thaw run --api-sock`: a guest without an agent (the test guest counting at CPL3) paused,
//! snapshotted and resumed over the control socket, the snapshot verified, and every bad
//! request answered with a clear status and message.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use fixture::{require_kvm, thaw_bin, vm_slot};

/// One request over a new connection; returns (status, body).
fn request(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(sock).expect("connect to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {reply:?}"));
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn wait_for_socket(sock: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(child.try_wait().unwrap().is_none(), "thaw run exited early");
        assert!(Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `thaw run --cmdline CMDLINE --api-sock DIR/api.sock --key-file DIR/k EXTRA...` (the key
/// made first), its console on a pipe, once its socket is there; the child and the socket.
fn run_with_api(dir: &Path, cmdline: &str, extra: &[&str]) -> (Child, std::path::PathBuf) {
    let sock = dir.join("api.sock");
    let key = dir.join("k");
    snapshot::MasterKey::load_or_create(&key).unwrap();
    let mut child = thaw_bin()
        .args(["run", "--cmdline", cmdline, "--api-sock"])
        .arg(&sock)
        .arg("--key-file")
        .arg(&key)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&sock, &mut child);
    (child, sock)
}

#[test]
fn pause_snapshot_resume_and_stop_over_the_api_socket() {
    if !require_kvm("pause_snapshot_resume_and_stop_over_the_api_socket") {
        return;
    }
    let _slot = vm_slot();
    let dir = tempfile::tempdir().unwrap();
    let (mut child, sock) = run_with_api(dir.path(), "thaw.idle=1 thaw.fill-mib=8", &[]);
    let key = dir.path().join("k");
    // The console, collected as it comes: the guest is snapshotted once it is idle.
    let console = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut stdout = child.stdout.take().unwrap();
    let reader = {
        let console = console.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                console
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "only this user may use the control socket"
    );
    let (status, body) = request(&sock, "GET", "/", "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"state\":\"Running\""), "{body}");
    let snap = dir.path().join("snap");
    let create = format!("{{\"snapshot_path\": \"{}\"}}", snap.display());
    // Not paused yet.
    let (status, body) = request(&sock, "PUT", "/snapshot/create", &create);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("must be paused"), "{body}");
    assert!(!snap.exists());

    assert_eq!(
        request(&sock, "PATCH", "/vm", r#"{"state":"Paused"}"#).0,
        204
    );
    assert!(request(&sock, "GET", "/", "").1.contains("Paused"));
    let (status, body) = request(&sock, "PUT", "/snapshot/create", &create);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("snapshot_id"), "{body}");
    // A second one to the same place is refused; nothing is lost.
    let (status, body) = request(&sock, "PUT", "/snapshot/create", &create);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("exists"), "{body}");
    assert_eq!(
        request(&sock, "PATCH", "/vm", r#"{"state":"Resumed"}"#).0,
        204
    );

    // Bad requests.
    let bad = [
        (
            "PATCH",
            "/vm",
            r#"{"state":"Sleeping"}"#,
            400,
            "\\\"Paused\\\" or",
        ),
        (
            "PATCH",
            "/vm",
            r#"{"state":"Paused","extra":1}"#,
            400,
            "unknown field",
        ),
        ("PATCH", "/vm", "not json", 400, "invalid JSON"),
        ("GET", "/vm", "", 405, "takes PATCH"),
        ("GET", "/nowhere", "", 404, "no such resource"),
        (
            "PUT",
            "/actions",
            r#"{"action_type":"Explode"}"#,
            400,
            "unknown action_type",
        ),
    ];
    for (method, path, body, want, needle) in bad {
        let (status, reply) = request(&sock, method, path, body);
        assert_eq!(status, want, "{method} {path} {body}: {reply}");
        assert!(reply.contains(needle), "{method} {path}: {reply}");
    }
    let huge = format!("{{\"state\":\"{}\"}}", "x".repeat(20_000));
    assert_eq!(request(&sock, "PATCH", "/vm", &huge).0, 413);

    assert_eq!(
        request(&sock, "PUT", "/actions", r#"{"action_type":"Stop"}"#).0,
        204
    );
    let status = child.wait().unwrap();
    reader.join().unwrap();
    assert!(status.code().is_some(), "{status:?}");
    assert!(!sock.exists(), "the socket is removed on exit");

    let verified = thaw_bin()
        .args([
            "snapshot",
            "verify",
            snap.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
}

#[test]
fn an_existing_path_is_not_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    std::fs::write(&sock, b"mine").unwrap();
    let out = thaw_bin()
        .args([
            "run",
            "--api-sock",
            sock.to_str().unwrap(),
            "--insecure-plaintext",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&sock).unwrap(), b"mine");
}

/// The value after `checksum ` on the console line that starts with `prefix`.
fn checksum_after(text: &str, prefix: &str) -> String {
    text.lines()
        .find_map(|l| l.split(prefix).nth(1)?.split("checksum ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {prefix:?} line in\n{text}"))
        .to_string()
}

#[test]
fn a_lazily_restored_guest_snapshotted_again_keeps_all_its_memory() {
    if !require_kvm("a_lazily_restored_guest_snapshotted_again_keeps_all_its_memory") {
        return;
    }
    let _slot = vm_slot();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    snapshot::MasterKey::load_or_create(&key).unwrap();
    let first = dir.path().join("first");
    let created = fixture::thaw_output(&[
        "snapshot",
        "create",
        "--cmdline",
        "thaw.agent=1 thaw.init=snap-start thaw.fill-mib=32",
        "--mem-mib",
        "160",
        "--key-file",
        key.to_str().unwrap(),
        "--out",
        first.to_str().unwrap(),
    ]);
    let created_text = fixture::output_text(&created);
    assert!(created.status.success(), "{created_text}");
    let checksum = checksum_after(&created_text, "fill: ");

    // Restored lazily without prefetching: much of its memory is still in the snapshot file
    // when it is paused and snapshotted again through the control socket.
    let sock = dir.path().join("api.sock");
    let mut child = thaw_bin()
        .args([
            "restore",
            first.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
            "--no-prefetch",
            "--api-sock",
            sock.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&sock, &mut child);
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads stderr to its end (a closed pipe would make thaw's next message fail), handing
    // over the text once the restore is reported.
    std::thread::spawn(move || {
        let mut text = String::new();
        let mut buf = [0u8; 1024];
        let mut sent = false;
        loop {
            match stderr.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
            if !sent && text.contains("thaw: restored") {
                sent = tx.send(text.clone()).is_ok();
            }
        }
        if !sent {
            let _ = tx.send(text);
        }
    });
    let text = rx.recv().unwrap();
    assert!(text.contains("thaw: restored"), "{text}");
    let second = dir.path().join("second");
    let (status, body) = request(&sock, "PATCH", "/vm", r#"{"state":"Paused"}"#);
    assert_eq!(status, 204, "pausing the restored guest: {body}");
    let (status, body) = request(
        &sock,
        "PUT",
        "/snapshot/create",
        &format!(r#"{{"snapshot_path":"{}"}}"#, second.display()),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        request(&sock, "PUT", "/actions", r#"{"action_type":"Stop"}"#).0,
        204
    );
    child.wait().unwrap();

    // The second snapshot holds all of the guest: restored eagerly, its workload is intact
    // and its agent answers.
    let verify = fixture::thaw_output(&[
        "snapshot",
        "verify",
        second.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
    ]);
    assert!(verify.status.success(), "{}", fixture::output_text(&verify));
    // Memory the second guest never touched is still the first snapshot's, not zeros: the
    // second snapshot has no more zero pages than the first, but for what the guest cleared.
    let zero_pages = |snap: &Path| -> u64 {
        let out = fixture::thaw_output(&[
            "snapshot",
            "inspect",
            snap.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
            "--json",
        ]);
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        info["zero_pages"].as_u64().unwrap()
    };
    let (before, after) = (zero_pages(&first), zero_pages(&second));
    println!("zero pages: {before} in the first snapshot, {after} in the second");
    assert!(
        after <= before + 2,
        "{before} zero pages before, {after} after"
    );
    let restored = fixture::thaw_output(&[
        "restore",
        second.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
        "--memory",
        "eager",
        "--invoke",
        "again",
    ]);
    let restored_text = fixture::output_text(&restored);
    assert!(restored.status.success(), "{restored_text}");
    assert_eq!(
        checksum_after(&restored_text, "workload of 32 MiB has "),
        checksum,
        "{restored_text}"
    );
}

/// A machine with a disk cannot be snapshotted yet (a snapshot does not hold the disk's
/// bytes, so a restore could not give the guest what it saw): the request is refused with the
/// reason, nothing is written, and the guest goes on.
#[test]
fn a_machine_with_a_disk_is_not_snapshotted() {
    if !require_kvm("a_machine_with_a_disk_is_not_snapshotted") {
        return;
    }
    let _slot = vm_slot();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("tmp.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let disk = format!("path={}", disk.display());
    let (mut child, sock) = run_with_api(dir.path(), "thaw.idle=1", &["--disk", &disk]);
    let (status, _) = request(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(status, 204);
    let out = dir.path().join("snap");
    let (status, body) = request(
        &sock,
        "PUT",
        "/snapshot/create",
        &format!(r#"{{"snapshot_path": "{}"}}"#, out.display()),
    );
    assert!((400..600).contains(&status), "{status} {body}");
    assert!(body.contains("disks are not supported yet"), "{body}");
    assert!(!out.exists());
    let (status, _) = request(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert_eq!(status, 204);
    let (status, _) = request(&sock, "PUT", "/actions", r#"{"action_type": "Stop"}"#);
    assert_eq!(status, 204);
    assert!(child.wait().unwrap().code().is_some());
}

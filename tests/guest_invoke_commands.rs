//! The test guest's invocation commands (`thaw:error`, `thaw:crash`, `thaw:hang`,
//! `thaw:sleep=MS`, `thaw:log=N`, `thaw:echo=TEXT`, `thaw:note=TEXT`, and malformed ones),
//! invoked through a restored execution environment as `thawd` invokes functions: a function
//! error arrives with its type and document, a crash ends the guest with status 1, a hang runs
//! into the host's timeout, a sleep takes its time, log lines reach the console although the
//! guest is quiet, the note starts as the snapshot's and then is what the clone last wrote.
//! One snapshot serves every test; everything that leaves the guest running shares one
//! restore.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fixture::{Console, pattern, require_kvm, vm_slot};
use hooks_sdk::host::{InvokeError, InvokeOutcome, deadline_after};
use hooks_sdk::protocol::Invoke;
use restore_daemon::environment::{Environment, EnvironmentError, EnvironmentOptions, Prepared};
use sha2::{Digest, Sha256};
use snapshot::KeyChoice;
use vmm_core::ExitReason;

const ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:commands";
/// Long enough for any command that answers; a hang is given far less.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest payload a host may send (Lambda's 6 MiB).
const MAX_PAYLOAD: usize = hooks_sdk::protocol::MAX_PAYLOAD;

struct Snapshot {
    _dir: tempfile::TempDir,
    path: PathBuf,
    key: PathBuf,
}

/// The quiet agent, snapshotted at its checkpoint; made once for every test here.
fn snapshot() -> &'static Snapshot {
    static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        let path = {
            let _slot = vm_slot();
            fixture::agent_snapshot(dir.path(), "snap", &key, "thaw.quiet=1", 128)
        };
        Snapshot {
            _dir: dir,
            path,
            key,
        }
    })
}

fn key_choice(key: &Path) -> KeyChoice {
    KeyChoice::Given(snapshot::MasterKey::load(key).unwrap())
}

fn request<'a>(id: &'a str, payload: &'a [u8]) -> Invoke<'a> {
    Invoke {
        request_id: id,
        deadline_ms: deadline_after(ANSWER_TIMEOUT),
        function_arn: ARN,
        payload,
        ..Invoke::default()
    }
}

/// Invokes `payload`; the function must answer with a response.
fn response(env: &mut Environment, console: &Console, id: &str, payload: &[u8]) -> Vec<u8> {
    match env.invoke(&request(id, payload), ANSWER_TIMEOUT) {
        Ok(InvokeOutcome::Response(answer)) => answer,
        other => panic!(
            "{id}: expected a response, got {other:?}\n{}",
            console.text()
        ),
    }
}

/// Invokes `payload`; the function must fail with a function error. Returns its type and its
/// error document.
fn function_error(
    env: &mut Environment,
    console: &Console,
    id: &str,
    payload: &[u8],
) -> (String, serde_json::Value) {
    match env.invoke(&request(id, payload), ANSWER_TIMEOUT) {
        Ok(InvokeOutcome::Error { error_type, body }) => {
            let doc = serde_json::from_slice(&body).unwrap_or_else(|e| {
                panic!(
                    "{id}: the error document is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(&body)
                )
            });
            (error_type, doc)
        }
        other => panic!(
            "{id}: expected a function error, got {other:?}\n{}",
            console.text()
        ),
    }
}

/// The answer is unchanged for payloads that are no command, and for `thaw:status`.
fn check_old_answers(env: &mut Environment, console: &Console) {
    for (id, payload) in [
        ("digest-empty", Vec::new()),
        ("digest-thaw", b"thaw".to_vec()),
        ("digest-pattern", pattern(10_000, 7)),
    ] {
        let want: [u8; 32] = Sha256::digest(&payload).into();
        assert_eq!(response(env, console, id, &payload), want, "{id}");
    }
    let status = response(env, console, "status", b"thaw:status");
    let status: serde_json::Value = serde_json::from_slice(&status).unwrap();
    assert_eq!(status["restores"], 1, "{status}");
    assert_eq!(status["registers"], "no keeper", "{status}");
}

fn check_error(env: &mut Environment, console: &Console) {
    let (error_type, doc) = function_error(env, console, "error", b"thaw:error");
    assert_eq!(error_type, "TestGuest.InvokeError");
    assert_eq!(
        doc,
        serde_json::json!({
            "errorMessage": "invocation failed on purpose (thaw:error)",
            "errorType": "TestGuest.InvokeError",
            "stackTrace": [],
        })
    );
}

fn check_echo(env: &mut Environment, console: &Console) {
    let largest = pattern(MAX_PAYLOAD - "thaw:echo=".len(), 11);
    for (id, text) in [
        ("echo-text", b"hello, thaw".to_vec()),
        ("echo-empty", Vec::new()),
        ("echo-command", b"thaw:crash".to_vec()),
        ("echo-binary", vec![0, 0xff, b'=', b'\n', 0x80]),
        ("echo-largest", largest),
    ] {
        let mut payload = b"thaw:echo=".to_vec();
        payload.extend_from_slice(&text);
        let answer = response(env, console, id, &payload);
        assert!(answer == text, "{id}: {} bytes back", answer.len());
    }
}

/// The note page comes back from the snapshot, then holds what this clone wrote.
fn check_note(env: &mut Environment, console: &Console) {
    assert_eq!(
        response(env, console, "note-abc", b"thaw:note=abc"),
        b"from the snapshot"
    );
    assert_eq!(response(env, console, "note-xyz", b"thaw:note=xyz"), b"abc");
}

fn check_sleep(env: &mut Environment, console: &Console) {
    for ms in [0u64, 300, 1200] {
        let id = format!("sleep-{ms}");
        let started = Instant::now();
        let answer = response(env, console, &id, format!("thaw:sleep={ms}").as_bytes());
        let took = started.elapsed();
        assert_eq!(answer, format!("slept {ms} ms").as_bytes());
        assert!(took >= Duration::from_millis(ms), "{id} took {took:?}");
        // Milliseconds, not some other unit: the answer comes soon after.
        assert!(
            took < Duration::from_millis(ms) + Duration::from_secs(10),
            "{id} took {took:?}"
        );
    }
}

fn check_log(env: &mut Environment, console: &Console) {
    assert_eq!(
        response(env, console, "log-5", b"thaw:log=5"),
        b"logged 5 lines"
    );
    assert_eq!(
        response(env, console, "log-0", b"thaw:log=0"),
        b"logged 0 lines"
    );
    let text = console.text();
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| l.starts_with("log line "))
        .collect();
    let want: Vec<String> = (1..=5)
        .map(|i| format!("log line {i} of 5 for request log-5"))
        .collect();
    assert_eq!(lines, want, "{text}");
    // Quiet still silences the agent's own chatter.
    assert!(!text.contains("agent: "), "{text}");
    assert!(!text.contains("hook after-restore"), "{text}");
}

fn check_bad_commands(env: &mut Environment, console: &Console) {
    for (payload, says) in [
        (
            &b"thaw:sleep=abc"[..],
            r#"thaw:sleep=MS: "abc" is not a decimal number"#,
        ),
        (
            b"thaw:sleep=",
            "thaw:sleep=MS needs a decimal number of milliseconds",
        ),
        (
            b"thaw:sleep",
            "thaw:sleep=MS needs a decimal number of milliseconds",
        ),
        (
            b"thaw:sleep=600001",
            "600001 milliseconds is out of range (0 to 600000)",
        ),
        (b"thaw:sleep=-5", r#""-5" is not a decimal number"#),
        (
            b"thaw:log=10001",
            "10001 lines is out of range (0 to 10000)",
        ),
        (
            b"thaw:log=many",
            r#"thaw:log=N: "many" is not a decimal number of lines"#,
        ),
        (b"thaw:echo", r#"thaw:echo needs its text after "=""#),
        (b"thaw:note", r#"thaw:note needs its text after "=""#),
        (b"thaw:xyz", r#"unknown command "thaw:xyz""#),
        (b"thaw:", r#"unknown command "thaw:""#),
        (b"thaw:crash=1", "thaw:crash takes no value"),
        (b"thaw:hang=forever", "thaw:hang takes no value"),
        (b"thaw:status=1", "thaw:status takes no value"),
        (
            b"thaw:sleep=\"\\\n\xff",
            "thaw:sleep=MS: \"\"\\\n\u{fffd}\" is not a decimal number",
        ),
    ] {
        let id = format!("bad-{}", String::from_utf8_lossy(payload).escape_debug());
        let (error_type, doc) = function_error(env, console, &id, payload);
        assert_eq!(error_type, "TestGuest.BadCommand", "{id}");
        assert_eq!(doc["errorType"], "TestGuest.BadCommand", "{id}");
        assert_eq!(doc["stackTrace"], serde_json::json!([]), "{id}");
        let message = doc["errorMessage"].as_str().unwrap();
        assert!(message.contains(says), "{id}: {message:?}");
    }
}

#[test]
fn commands_that_answer_then_a_hang_in_one_environment() {
    if !require_kvm("commands_that_answer_then_a_hang_in_one_environment") {
        return;
    }
    let snap = snapshot();
    let _slot = vm_slot();
    let console = Console::default();
    let mut env = Environment::start(
        &snap.path,
        &key_choice(&snap.key),
        &EnvironmentOptions::default(),
        Box::new(console.clone()),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", console.text()));
    check_old_answers(&mut env, &console);
    // No invocation before this one wrote the note: it is still the snapshot's.
    check_note(&mut env, &console);
    check_error(&mut env, &console);
    check_echo(&mut env, &console);
    check_sleep(&mut env, &console);
    check_log(&mut env, &console);
    check_bad_commands(&mut env, &console);
    // Still answering after all of that.
    assert_eq!(
        response(&mut env, &console, "after", b"thaw:echo=alive"),
        b"alive"
    );

    // Last, since nothing comes after a hang: the host's timeout decides, promptly.
    let timeout = Duration::from_secs(1);
    let hang = Invoke {
        deadline_ms: deadline_after(timeout),
        ..request("hang", b"thaw:hang")
    };
    let started = Instant::now();
    let err = env.invoke(&hang, timeout).unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(err, EnvironmentError::Invoke(InvokeError::Timeout(t)) if t == timeout),
        "{err:?}\n{}",
        console.text()
    );
    assert!(
        (timeout..timeout + Duration::from_secs(2)).contains(&took),
        "{took:?}"
    );
    let outcome = env.kill().unwrap();
    assert_eq!(outcome.reason, ExitReason::Stopped);
}

#[test]
fn a_crash_ends_the_guest_with_status_1() {
    if !require_kvm("a_crash_ends_the_guest_with_status_1") {
        return;
    }
    let snap = snapshot();
    let _slot = vm_slot();
    let console = Console::default();
    let options = EnvironmentOptions::default();
    let prepared = Prepared::restore(
        &snap.path,
        &key_choice(&snap.key),
        &options.restore,
        Box::new(console.clone()),
    )
    .unwrap();
    // The environment keeps how its machine ended to itself; the machine's signal tells.
    let exit = prepared.restored().exit_signal();
    let mut env = prepared
        .start(&options)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", console.text()));
    assert_eq!(
        response(&mut env, &console, "before", b"thaw:echo=ok"),
        b"ok"
    );
    let started = Instant::now();
    let err = env
        .invoke(&request("crash-1", b"thaw:crash"), ANSWER_TIMEOUT)
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(err, EnvironmentError::Invoke(InvokeError::GuestEnded)),
        "{err:?}\n{}",
        console.text()
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(exit.reason(), Some(ExitReason::GuestExit(1)));
    // The crash's last words are output too: printed although the guest is quiet.
    let text = console.text();
    assert!(
        text.contains("thaw:crash: the runtime dies during request \"crash-1\" as asked"),
        "{text}"
    );
    assert!(!text.contains("agent: "), "{text}");
}

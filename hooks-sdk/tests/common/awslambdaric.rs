//! The SnapStart scenario run against AWS's own Python runtime interface client (`awslambdaric`
//! with `snapshot-restore-py`, unmodified, from PyPI): the function module, and the host's steps
//! with their checks. Init, before-snapshot hooks (reverse order), the restore, after-restore
//! hooks (in order), invocations, a raising handler; or an after-restore hook that raises.
//!
//! Shared, as source, by hooks-sdk's `python_awslambdaric.rs` (`thaw-init` in host mode) and the
//! root package's `linux_agent.rs` (the same function in a chroot and in a Linux guest): each
//! says through [`ScenarioHost`] how it reaches the agent and what a restore does to the channel.

use std::thread;
use std::time::{Duration, Instant};

use hooks_sdk::protocol::{InitType, Message};

use super::protocol_host::{Diagnostics, Got, HostConn, STEP, TEST_FUNCTION_ARN, json};

/// The function module (`app.py`). Every step is an event: kept in memory (the handler returns
/// them all, so a host that cannot read the guest's files still sees their order), printed as a
/// `thaw-test-event:` line, and appended to `$THAW_TEST_LOG` when that is set.
pub const APP: &str = r#"
import os
from snapshot_restore_py import register_before_snapshot, register_after_restore

EVENTS = []

def log(line):
    EVENTS.append(line)
    # One write(2), so that a line cannot be split by what the agent logs to the same console.
    os.write(1, ("thaw-test-event: " + line + "\n").encode())
    path = os.environ.get("THAW_TEST_LOG")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")

log("init:" + os.environ["AWS_LAMBDA_INITIALIZATION_TYPE"])

def before_first():
    log("before:first")
    if os.environ.get("THAW_TEST_FAIL_BEFORE"):
        raise RuntimeError("before-snapshot hook failed on purpose")

def before_second():
    log("before:second")

def after_first():
    log("after:first")

def after_second():
    log("after:second")
    if os.environ.get("THAW_TEST_FAIL_AFTER"):
        raise RuntimeError("after-restore hook failed on purpose")

# Registration order: first, then second. Lambda runs before-snapshot hooks in reverse.
register_before_snapshot(before_first)
register_before_snapshot(before_second)
register_after_restore(after_first)
register_after_restore(after_second)

def handler(event, context):
    log("invoke:" + context.aws_request_id)
    if "raise" in event:
        raise ValueError(event["raise"])
    return {
        "echo": event,
        "request_id": context.aws_request_id,
        "function_name": context.function_name,
        "arn": context.invoked_function_arn,
        "time_left": context.get_remaining_time_in_millis() > 0,
        "custom": context.client_context.custom if context.client_context else None,
        "identity": context.identity.cognito_identity_id,
        "events": EVENTS,
    }
"#;

/// The module's file name.
pub const APP_FILE: &str = "app.py";
/// The handler (`_HANDLER`, and awslambdaric's argument).
pub const HANDLER: &str = "app.handler";
/// The function name the scenario's responses must carry.
pub const FUNCTION_NAME: &str = "thaw-python";
/// The environment variable that makes the second after-restore hook raise.
pub const FAIL_AFTER_ENV: &str = "THAW_TEST_FAIL_AFTER";
/// What starts each event line the function prints.
pub const EVENT_PREFIX: &str = "thaw-test-event: ";
/// The PyPI packages the scenario needs, as pinned for the tests.
pub const PIP_PACKAGES: &str = "awslambdaric==4.2.2 snapshot-restore-py==1.0.0";

/// Events up to `SnapshotReady`: init, then the before-snapshot hooks in reverse order.
pub const SNAPSHOT_EVENTS: [&str; 3] = ["init:snap-start", "before:second", "before:first"];
/// Events up to `RestoreDone`: then the after-restore hooks in registration order.
pub const RESTORE_EVENTS: [&str; 5] = [
    "init:snap-start",
    "before:second",
    "before:first",
    "after:first",
    "after:second",
];

/// How a test reaches the agent running the scenario's function.
pub trait ScenarioHost: Diagnostics {
    /// Waits for the agent's next connection and checks its `Hello`.
    fn accept(&mut self, init_type: InitType) -> HostConn;

    /// Does to the agent's channel what a restore does: `conn` goes away and the agent
    /// reconnects (to be accepted next).
    fn reset_channel(&mut self, conn: HostConn);

    /// Everything the agent and the runtime printed so far.
    fn output(&self) -> String;

    /// The function's events so far, once there are at least `at_least` of them (or `STEP`
    /// passed). By default they are read from [`ScenarioHost::output`], which may lag behind
    /// the protocol (a VM's console); a host that can read the function's log file reads that.
    fn events(&self, at_least: usize) -> Vec<String> {
        let deadline = Instant::now() + STEP;
        loop {
            let events = events_in(&self.output());
            if events.len() >= at_least || Instant::now() > deadline {
                return events;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The entropy sent in `Restored`. An agent that feeds a real kernel RNG gets real random
    /// bytes.
    fn entropy(&self) -> Vec<u8> {
        vec![0x5a; 64]
    }
}

/// The `thaw-test-event:` lines in `output`, in order (a console may end lines with `\r`).
pub fn events_in(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| {
            let at = line.find(EVENT_PREFIX)?;
            Some(line[at + EVENT_PREFIX.len()..].trim_end().to_owned())
        })
        .collect()
}

/// Waits until the host's output contains `needle`.
pub fn wait_for_output(host: &impl ScenarioHost, needle: &str) {
    let deadline = Instant::now() + STEP;
    while !host.output().contains(needle) {
        if Instant::now() > deadline {
            panic!(
                "the agent never printed {needle:?}; log:\n{}",
                host.diagnostics()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Init, snapshot (hooks in reverse), restore (hooks in order): returns the connection the
/// agent made after the restore, `Restored` already sent on it.
pub fn snapshot_and_restore(host: &mut impl ScenarioHost) -> HostConn {
    let mut conn = host.accept(InitType::SnapStart);
    conn.send(&Message::Checkpoint);
    assert_eq!(conn.recv(&*host), Got::SnapshotReady);
    assert_eq!(
        host.events(SNAPSHOT_EVENTS.len()),
        SNAPSHOT_EVENTS,
        "before-snapshot hooks run in reverse registration order, before SnapshotReady"
    );
    // The snapshot is taken; restoring resets the connection.
    host.reset_channel(conn);
    let mut conn = host.accept(InitType::SnapStart);
    let entropy = host.entropy();
    conn.restored_with_entropy("restore-1", &entropy);
    conn
}

/// After [`snapshot_and_restore`]: `RestoreDone` once the after-restore hooks ran, three
/// invocations answered with everything Lambda's context carries, a handler that raises
/// (`InvokeError`), and one more invocation that shows the runtime carries on.
pub fn restore_done_and_invocations(host: &impl ScenarioHost, conn: &mut HostConn) {
    assert_eq!(conn.recv(host), Got::RestoreDone);
    assert_eq!(
        host.events(RESTORE_EVENTS.len()),
        RESTORE_EVENTS,
        "after-restore hooks run in registration order, before RestoreDone"
    );
    let mut expected: Vec<String> = RESTORE_EVENTS.iter().map(|e| e.to_string()).collect();
    for i in 1..=3 {
        let id = format!("req-{i}");
        let event = format!(r#"{{"n":{i}}}"#);
        conn.invoke_with(
            &id,
            event.as_bytes(),
            r#"{"custom":{"tenant":"t1"}}"#,
            r#"{"cognitoIdentityId":"id-7","cognitoIdentityPoolId":"pool-7"}"#,
        );
        expected.push(format!("invoke:{id}"));
        match conn.recv(host) {
            Got::Response(rid, payload) => {
                assert_eq!(rid, id);
                let doc = json(&payload);
                assert_eq!(doc["echo"]["n"], i);
                assert_eq!(doc["request_id"], id.as_str());
                assert_eq!(doc["function_name"], FUNCTION_NAME);
                assert_eq!(doc["arn"], TEST_FUNCTION_ARN);
                assert_eq!(doc["time_left"], true);
                assert_eq!(doc["custom"]["tenant"], "t1");
                assert_eq!(doc["identity"], "id-7");
                // The function's own record: every hook ran once, in order, before this.
                assert_eq!(doc["events"], serde_json::json!(expected), "{doc}");
            }
            other => panic!("invocation {i}: {other:?}"),
        }
    }

    conn.invoke("req-boom", br#"{"raise":"handler failed on purpose"}"#);
    match conn.recv(host) {
        Got::InvokeError(id, error_type, body) => {
            assert_eq!(id, "req-boom");
            // awslambdaric sends no error-type header; Lambda records Runtime.Unknown and the
            // exception's own type is in the document.
            assert_eq!(error_type, "Runtime.Unknown");
            let doc = json(&body);
            assert_eq!(doc["errorType"], "ValueError");
            assert_eq!(doc["errorMessage"], "handler failed on purpose");
            assert_eq!(doc["requestId"], "req-boom");
            assert!(
                doc["stackTrace"].as_array().is_some_and(|t| !t.is_empty()),
                "{doc}"
            );
        }
        other => panic!("{other:?}"),
    }
    expected.push("invoke:req-boom".into());
    // The runtime carries on after an unhandled error.
    conn.invoke("req-after", br#"{"n":4}"#);
    expected.push("invoke:req-after".into());
    match conn.recv(host) {
        Got::Response(id, payload) => {
            assert_eq!(id, "req-after");
            assert_eq!(json(&payload)["events"], serde_json::json!(expected));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(host.events(expected.len()), expected);
}

/// After [`snapshot_and_restore`] with [`FAIL_AFTER_ENV`] set: the second after-restore hook
/// raises, the host hears `RestoreError` (`Runtime.AfterRestoreError`), awslambdaric exits, and
/// later invocations get the restore error.
pub fn after_restore_hook_fails(host: &impl ScenarioHost, conn: &mut HostConn) {
    match conn.recv(host) {
        Got::RestoreError(error_type, body) => {
            assert_eq!(error_type, "Runtime.AfterRestoreError");
            let doc = json(&body);
            assert_eq!(doc["errorType"], "RuntimeError");
            assert_eq!(doc["errorMessage"], "after-restore hook failed on purpose");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        host.events(RESTORE_EVENTS.len()),
        RESTORE_EVENTS,
        "the failing hook ran after the first one"
    );
    // awslambdaric exits (status 65) after reporting; invocations then get the restore error.
    wait_for_output(host, "exit status 65");
    conn.invoke("req-x", b"{}");
    match conn.recv(host) {
        Got::InvokeError(id, error_type, _) => {
            assert_eq!(
                (id.as_str(), error_type.as_str()),
                ("req-x", "Runtime.AfterRestoreError")
            )
        }
        other => panic!("{other:?}"),
    }
}

//! AWS's own Python runtime interface client, unmodified (`awslambdaric` with
//! `snapshot-restore-py`, from PyPI), against `thaw-init` in host-process mode. The test is the
//! Thaw host: it speaks the guest protocol on a Unix socket and "restores" by closing the
//! agent's connection and answering the reconnection's `Hello` with `Restored` (no VM). The
//! handler and hooks append to a log file, which is how their order is checked.
//!
//! Needs `python3 -m pip install awslambdaric==4.2.2 snapshot-restore-py==1.0.0`; the tests
//! fail (they do not skip) when those are missing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use hooks_sdk::protocol::{InitType, Message};

const APP: &str = r#"
import os
from snapshot_restore_py import register_before_snapshot, register_after_restore

LOG = os.environ["THAW_TEST_LOG"]

def log(line):
    with open(LOG, "a") as f:
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
    }
"#;

/// Fails with the install command when the Python packages are missing.
fn require_python_packages() {
    let check = Command::new("python3")
        .args(["-c", "import awslambdaric, snapshot_restore_py"])
        .output();
    match check {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "awslambdaric / snapshot-restore-py are not installed for python3 ({}); install them \
             with: python3 -m pip install awslambdaric==4.2.2 snapshot-restore-py==1.0.0",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!("python3 is needed for this test and cannot be run: {e}"),
    }
}

struct PyFunction {
    host: FakeHost,
    agent: AgentProcess,
    log: PathBuf,
}

impl PyFunction {
    fn start(init_type: InitType, extra_env: &[&str], handler: &str) -> PyFunction {
        require_python_packages();
        let host = FakeHost::new();
        let dir = host.dir.path();
        std::fs::write(dir.join("app.py"), APP).unwrap();
        let log = dir.join("events.log");
        let log_env = format!("THAW_TEST_LOG={}", log.display());
        let init = match init_type {
            InitType::OnDemand => "on-demand",
            InitType::SnapStart => "snap-start",
        };
        let mut args = vec![
            "--init-type",
            init,
            "--function-name",
            "thaw-python",
            "--handler",
            handler,
            "--env",
            &log_env,
            "--env",
            "PYTHONUNBUFFERED=1",
        ];
        for e in extra_env {
            args.extend(["--env", e]);
        }
        let runtime = ["python3", "-m", "awslambdaric", handler];
        let agent = AgentProcess::start(&host, &args, &runtime, dir);
        PyFunction { host, agent, log }
    }

    fn events(&self) -> Vec<String> {
        read_lines(&self.log)
    }
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Init, snapshot (hooks in reverse), restore (hooks in order), returning the new connection.
fn snapshot_and_restore(f: &PyFunction) -> HostConn {
    let mut conn = f.host.accept(&f.agent, InitType::SnapStart);
    conn.send(&Message::Checkpoint);
    assert_eq!(conn.recv(&f.agent), Got::SnapshotReady);
    assert_eq!(
        f.events(),
        ["init:snap-start", "before:second", "before:first"],
        "before-snapshot hooks run in reverse registration order, before SnapshotReady"
    );
    // The "snapshot" is taken; restoring resets the connection.
    drop(conn);
    let mut conn = f.host.accept(&f.agent, InitType::SnapStart);
    conn.restored("restore-1");
    conn
}

#[test]
fn awslambdaric_snap_start_hooks_invocations_and_errors() {
    let f = PyFunction::start(InitType::SnapStart, &[], "app.handler");
    let mut conn = snapshot_and_restore(&f);
    assert_eq!(conn.recv(&f.agent), Got::RestoreDone);
    assert_eq!(
        f.events(),
        [
            "init:snap-start",
            "before:second",
            "before:first",
            "after:first",
            "after:second"
        ],
        "after-restore hooks run in registration order, before RestoreDone"
    );
    f.agent
        .wait_for_log("host mode: skipped RNG reseed and clock set");

    for i in 1..=3 {
        let id = format!("req-{i}");
        let event = format!(r#"{{"n":{i}}}"#);
        conn.invoke_with(
            &id,
            event.as_bytes(),
            r#"{"custom":{"tenant":"t1"}}"#,
            r#"{"cognitoIdentityId":"id-7","cognitoIdentityPoolId":"pool-7"}"#,
        );
        match conn.recv(&f.agent) {
            Got::Response(rid, payload) => {
                assert_eq!(rid, id);
                let doc = json(&payload);
                assert_eq!(doc["echo"]["n"], i);
                assert_eq!(doc["request_id"], id.as_str());
                assert_eq!(doc["function_name"], "thaw-python");
                assert_eq!(
                    doc["arn"],
                    "arn:aws:lambda:us-east-1:123456789012:function:thaw-test"
                );
                assert_eq!(doc["time_left"], true);
                assert_eq!(doc["custom"]["tenant"], "t1");
                assert_eq!(doc["identity"], "id-7");
            }
            other => panic!("invocation {i}: {other:?}"),
        }
    }

    conn.invoke("req-boom", br#"{"raise":"handler failed on purpose"}"#);
    match conn.recv(&f.agent) {
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
    // The runtime carries on after an unhandled error.
    conn.invoke("req-after", br#"{"n":4}"#);
    assert!(matches!(conn.recv(&f.agent), Got::Response(id, _) if id == "req-after"));
    let events = f.events();
    assert_eq!(
        &events[5..],
        [
            "invoke:req-1",
            "invoke:req-2",
            "invoke:req-3",
            "invoke:req-boom",
            "invoke:req-after"
        ]
    );
    f.agent.shutdown(&mut conn);
}

#[test]
fn awslambdaric_after_restore_hook_failure_is_restore_error() {
    let f = PyFunction::start(
        InitType::SnapStart,
        &["THAW_TEST_FAIL_AFTER=1"],
        "app.handler",
    );
    let mut conn = snapshot_and_restore(&f);
    match conn.recv(&f.agent) {
        Got::RestoreError(error_type, body) => {
            assert_eq!(error_type, "Runtime.AfterRestoreError");
            let doc = json(&body);
            assert_eq!(doc["errorType"], "RuntimeError");
            assert_eq!(doc["errorMessage"], "after-restore hook failed on purpose");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        f.events().last().map(String::as_str),
        Some("after:second"),
        "the failing hook ran after the first one"
    );
    // awslambdaric exits (status 65) after reporting; invocations then get the restore error.
    f.agent.wait_for_log("exit status 65");
    conn.invoke("req-x", b"{}");
    match conn.recv(&f.agent) {
        Got::InvokeError(id, error_type, _) => {
            assert_eq!(
                (id.as_str(), error_type.as_str()),
                ("req-x", "Runtime.AfterRestoreError")
            )
        }
        other => panic!("{other:?}"),
    }
    f.agent.shutdown(&mut conn);
}

#[test]
fn awslambdaric_before_snapshot_hook_failure_is_checkpoint_error() {
    let f = PyFunction::start(
        InitType::SnapStart,
        &["THAW_TEST_FAIL_BEFORE=1"],
        "app.handler",
    );
    let mut conn = f.host.accept(&f.agent, InitType::SnapStart);
    conn.send(&Message::Checkpoint);
    match conn.recv(&f.agent) {
        Got::CheckpointError(error_type, body) => {
            assert_eq!(error_type, "Runtime.BeforeSnapshotError");
            assert_eq!(
                json(&body)["errorMessage"],
                "before-snapshot hook failed on purpose"
            );
        }
        other => panic!("{other:?}"),
    }
    f.agent.shutdown(&mut conn);
}

#[test]
fn awslambdaric_on_demand_import_error_is_init_error() {
    let f = PyFunction::start(InitType::OnDemand, &[], "missing_module.handler");
    let mut conn = f.host.accept(&f.agent, InitType::OnDemand);
    match conn.recv(&f.agent) {
        Got::InitError(error_type, body) => {
            assert_eq!(error_type, "Runtime.ImportModuleError");
            let doc = json(&body);
            assert_eq!(doc["errorType"], "Runtime.ImportModuleError");
            assert!(
                doc["errorMessage"]
                    .as_str()
                    .is_some_and(|m| m.contains("missing_module")),
                "{doc}"
            );
        }
        other => panic!("{other:?}"),
    }
    f.agent.shutdown(&mut conn);
}

#[test]
fn awslambdaric_on_demand_serves_invocations() {
    let f = PyFunction::start(InitType::OnDemand, &[], "app.handler");
    let mut conn = f.host.accept(&f.agent, InitType::OnDemand);
    assert_eq!(conn.recv(&f.agent), Got::Ready);
    conn.invoke("od-1", br#"{"n":1}"#);
    assert!(matches!(conn.recv(&f.agent), Got::Response(id, _) if id == "od-1"));
    assert_eq!(
        f.events(),
        ["init:on-demand", "invoke:od-1"],
        "no hooks run on demand"
    );
    f.agent.shutdown(&mut conn);
}

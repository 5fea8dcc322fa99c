//! The hooks SDK's runtime loop (`hooks_sdk::sdk::Runtime`) as a function's runtime under
//! `thaw-init` in host-process mode: hook order (before-checkpoint in reverse, after-restore in
//! order), invocations, handler errors, and hook failures reported to init/error and
//! restore/error. The function is this test binary run again by the agent (`function_process`
//! does nothing unless `THAW_TEST_ROLE` says so).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

mod common;

use std::path::{Path, PathBuf};

use common::*;
use hooks_sdk::protocol::{InitType, Message};
use hooks_sdk::sdk::{FunctionError, Runtime};

const ROLE: &str = "sdk_function";

fn hook(name: &'static str) -> impl FnMut() -> Result<(), FunctionError> + Send + 'static {
    move || {
        test_log(name);
        if std::env::var("THAW_TEST_FAIL").as_deref() == Ok(name) {
            return Err(FunctionError::new(
                "HookError",
                format!("{name} failed on purpose"),
            ));
        }
        Ok(())
    }
}

/// The function's entry point when the agent runs this binary as its runtime.
#[test]
fn function_process() {
    if std::env::var("THAW_TEST_ROLE").as_deref() != Ok(ROLE) {
        return;
    }
    let mut runtime = Runtime::from_env().unwrap();
    runtime
        .register_before_checkpoint(hook("before:first"))
        .register_before_checkpoint(hook("before:second"))
        .register_after_restore(hook("after:first"))
        .register_after_restore(hook("after:second"));
    let result = runtime.run(|inv| {
        test_log(&format!("invoke:{}", inv.request_id));
        let event: serde_json::Value = serde_json::from_slice(&inv.payload)?;
        if let Some(msg) = event.get("fail").and_then(|m| m.as_str()) {
            return Err(FunctionError::new("Function.Failed", msg));
        }
        Ok(serde_json::to_vec(&serde_json::json!({
            "echo": event,
            "client_context": inv.client_context,
        }))?)
    });
    // Exit like a runtime would, so the agent sees the process end.
    eprintln!("sdk function stopped: {result:?}");
    std::process::exit(1);
}

fn start(init_type: InitType, fail: Option<&str>) -> (FakeHost, AgentProcess, PathBuf) {
    let host = FakeHost::new();
    let log = host.dir.path().join("events.log");
    let exe = std::env::current_exe().unwrap().display().to_string();
    let role = format!("THAW_TEST_ROLE={ROLE}");
    let log_env = format!("THAW_TEST_LOG={}", log.display());
    let fail_env = format!("THAW_TEST_FAIL={}", fail.unwrap_or(""));
    let init = match init_type {
        InitType::OnDemand => "on-demand",
        InitType::SnapStart => "snap-start",
    };
    let args = [
        "--init-type",
        init,
        "--env",
        &role,
        "--env",
        &log_env,
        "--env",
        &fail_env,
    ];
    let runtime = [
        exe.as_str(),
        "--exact",
        "function_process",
        "--test-threads=1",
    ];
    let agent = AgentProcess::start(&host, &args, &runtime, host.dir.path());
    (host, agent, log)
}

fn events(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn checkpoint_and_restore(host: &FakeHost, agent: &AgentProcess) -> HostConn {
    let mut conn = host.accept(agent, InitType::SnapStart);
    conn.send(&Message::Checkpoint);
    assert_eq!(conn.recv(agent), Got::SnapshotReady);
    drop(conn);
    let mut conn = host.accept(agent, InitType::SnapStart);
    conn.restored("restore-sdk");
    conn
}

#[test]
fn sdk_snap_start_runs_hooks_in_lambdas_order_and_serves() {
    let (host, agent, log) = start(InitType::SnapStart, None);
    let mut conn = checkpoint_and_restore(&host, &agent);
    assert_eq!(conn.recv(&agent), Got::RestoreDone);
    assert_eq!(
        events(&log),
        [
            "before:second",
            "before:first",
            "after:first",
            "after:second"
        ]
    );
    for i in 1..=3 {
        let id = format!("sdk-{i}");
        conn.invoke_with(&id, format!(r#"{{"n":{i}}}"#).as_bytes(), r#"{"c":1}"#, "");
        match conn.recv(&agent) {
            Got::Response(rid, payload) => {
                assert_eq!(rid, id);
                let doc = json(&payload);
                assert_eq!(doc["echo"]["n"], i);
                assert_eq!(doc["client_context"], r#"{"c":1}"#);
            }
            other => panic!("{other:?}"),
        }
    }
    conn.invoke("sdk-fail", br#"{"fail":"nope"}"#);
    match conn.recv(&agent) {
        Got::InvokeError(id, ty, body) => {
            assert_eq!((id.as_str(), ty.as_str()), ("sdk-fail", "Function.Failed"));
            let doc = json(&body);
            assert_eq!(doc["errorType"], "Function.Failed");
            assert_eq!(doc["errorMessage"], "nope");
        }
        other => panic!("{other:?}"),
    }
    agent.shutdown(&mut conn);
}

#[test]
fn sdk_after_restore_failure_is_reported_to_restore_error() {
    let (host, agent, log) = start(InitType::SnapStart, Some("after:first"));
    let mut conn = checkpoint_and_restore(&host, &agent);
    match conn.recv(&agent) {
        Got::RestoreError(ty, body) => {
            assert_eq!(ty, "Runtime.AfterRestoreError");
            let doc = json(&body);
            assert_eq!(doc["errorType"], "HookError");
            assert_eq!(doc["errorMessage"], "after:first failed on purpose");
        }
        other => panic!("{other:?}"),
    }
    // The failing hook stops the rest.
    assert_eq!(
        events(&log),
        ["before:second", "before:first", "after:first"]
    );
    agent.shutdown(&mut conn);
}

#[test]
fn sdk_before_checkpoint_failure_is_a_checkpoint_error() {
    let (host, agent, log) = start(InitType::SnapStart, Some("before:second"));
    let mut conn = host.accept(&agent, InitType::SnapStart);
    match conn.recv(&agent) {
        Got::CheckpointError(ty, body) => {
            assert_eq!(ty, "Runtime.BeforeCheckpointError");
            assert_eq!(
                json(&body)["errorMessage"],
                "before:second failed on purpose"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(events(&log), ["before:second"]);
    agent.shutdown(&mut conn);
}

#[test]
fn sdk_on_demand_runs_no_hooks() {
    let (host, agent, log) = start(InitType::OnDemand, None);
    let mut conn = host.accept(&agent, InitType::OnDemand);
    assert_eq!(conn.recv(&agent), Got::Ready);
    conn.invoke("od", br#"{"n":0}"#);
    assert!(matches!(conn.recv(&agent), Got::Response(id, _) if id == "od"));
    assert_eq!(events(&log), ["invoke:od"]);
    agent.shutdown(&mut conn);
}

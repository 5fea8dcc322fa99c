//! The real Rust client, the `lambda_runtime` crate (crates.io), serving invocations through
//! `thaw-init` in host-process mode, on demand and snap-starting with its `SnapStartResource`
//! hooks. The function is this test binary run again by the agent as its runtime (it runs only
//! `function_process`, which does nothing unless `THAW_TEST_ROLE` says so), so it gets exactly
//! the environment `thaw-init` gives a runtime.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

mod common;

use std::sync::Arc;

use common::*;
use hooks_sdk::protocol::{InitType, Message};
use lambda_runtime::{BoxFuture, Error, LambdaEvent, Runtime, SnapStartResource, service_fn};
use serde_json::{Value, json};

const ROLE: &str = "lambda_runtime_function";

/// A SnapStart resource that logs its hooks to `THAW_TEST_LOG`.
struct Logged(&'static str);

impl SnapStartResource for Logged {
    fn before_snapshot(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            test_log(&format!("before:{}", self.0));
            Ok(())
        })
    }

    fn after_restore(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            test_log(&format!("after:{}", self.0));
            Ok(())
        })
    }
}

async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    test_log(&format!("invoke:{}", event.context.request_id));
    if let Some(msg) = event.payload.get("fail").and_then(Value::as_str) {
        return Err(msg.to_owned().into());
    }
    Ok(json!({
        "echo": event.payload,
        "request_id": event.context.request_id,
        "function_name": event.context.env_config.function_name,
        "deadline": event.context.deadline,
    }))
}

/// The function's entry point when the agent runs this binary as its runtime.
#[test]
fn function_process() {
    if std::env::var("THAW_TEST_ROLE").as_deref() != Ok(ROLE) {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = rt.block_on(
        Runtime::new(service_fn(handler))
            .register_snapstart_resource(Arc::new(Logged("first")))
            .register_snapstart_resource(Arc::new(Logged("second")))
            .run(),
    );
    panic!("lambda_runtime stopped: {result:?}");
}

fn start(init_type: InitType) -> (FakeHost, AgentProcess, std::path::PathBuf) {
    let host = FakeHost::new();
    let log = host.dir.path().join("events.log");
    let exe = std::env::current_exe().unwrap().display().to_string();
    let role = format!("THAW_TEST_ROLE={ROLE}");
    let log_env = format!("THAW_TEST_LOG={}", log.display());
    let init = match init_type {
        InitType::OnDemand => "on-demand",
        InitType::SnapStart => "snap-start",
    };
    let args = [
        "--init-type",
        init,
        "--function-name",
        "thaw-rust",
        "--env",
        &role,
        "--env",
        &log_env,
    ];
    let runtime = [
        exe.as_str(),
        "--exact",
        "function_process",
        "--nocapture",
        "--test-threads=1",
    ];
    let agent = AgentProcess::start(&host, &args, &runtime, host.dir.path());
    (host, agent, log)
}

fn events(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn serve_three_and_a_failure(conn: &mut HostConn, agent: &AgentProcess) {
    for i in 1..=3 {
        let id = format!("rs-{i}");
        conn.invoke(&id, format!(r#"{{"n":{i}}}"#).as_bytes());
        match conn.recv(agent) {
            Got::Response(rid, payload) => {
                assert_eq!(rid, id);
                let doc = json(&payload);
                assert_eq!(doc["echo"]["n"], i);
                assert_eq!(doc["request_id"], id.as_str());
                assert_eq!(doc["function_name"], "thaw-rust");
                assert!(doc["deadline"].as_u64().is_some_and(|d| d > now_ms()));
            }
            other => panic!("{other:?}"),
        }
    }
    conn.invoke("rs-fail", br#"{"fail":"no luck"}"#);
    match conn.recv(agent) {
        Got::InvokeError(id, error_type, body) => {
            assert_eq!(id, "rs-fail");
            // lambda_runtime's header is "unhandled", which Lambda records as Runtime.Unknown.
            assert_eq!(error_type, "Runtime.Unknown");
            assert_eq!(json(&body)["errorMessage"], "no luck");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn lambda_runtime_on_demand() {
    let (host, agent, log) = start(InitType::OnDemand);
    let mut conn = host.accept(&agent, InitType::OnDemand);
    assert_eq!(conn.recv(&agent), Got::Ready);
    serve_three_and_a_failure(&mut conn, &agent);
    assert_eq!(
        events(&log),
        [
            "invoke:rs-1",
            "invoke:rs-2",
            "invoke:rs-3",
            "invoke:rs-fail"
        ]
    );
    agent.shutdown(&mut conn);
}

#[test]
fn lambda_runtime_snap_start_with_snapstart_resources() {
    let (host, agent, log) = start(InitType::SnapStart);
    let mut conn = host.accept(&agent, InitType::SnapStart);
    conn.send(&Message::Checkpoint);
    assert_eq!(conn.recv(&agent), Got::SnapshotReady);
    assert_eq!(events(&log), ["before:second", "before:first"]);
    drop(conn);
    let mut conn = host.accept(&agent, InitType::SnapStart);
    conn.restored("restore-rs");
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
    serve_three_and_a_failure(&mut conn, &agent);
    agent.shutdown(&mut conn);
}

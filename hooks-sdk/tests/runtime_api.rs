//! The Runtime API of `thaw-init` (host-process mode) against Lambda's behaviour, with the test
//! playing both the runtime (plain HTTP requests) and the Thaw host (the Unix socket): status
//! codes and error documents, `Lambda-Runtime-*` headers, the 6 MiB limit in both directions,
//! busy invokes, and runtime exits.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

mod common;

use bytes::Bytes;
use common::*;
use hooks_sdk::protocol::{InitType, MAX_PAYLOAD};
use hooks_sdk::sdk::ApiClient;
use hyper::{Method, StatusCode};

const NEXT: &str = "/2018-06-01/runtime/invocation/next";

fn post(client: &mut ApiClient, path: &str, body: Vec<u8>) -> (StatusCode, serde_json::Value) {
    let resp = client
        .request(Method::POST, path, &[], Bytes::from(body))
        .unwrap();
    (resp.status, json(&resp.body))
}

fn response_path(id: &str) -> String {
    format!("/2018-06-01/runtime/invocation/{id}/response")
}

#[test]
fn runtime_api_statuses_headers_and_limits_match_lambda() {
    let host = FakeHost::new();
    let (agent, mut conn, api) = agent_with_test_as_runtime(&host);
    let mut client = ApiClient::new(api).unwrap();

    // Unknown path: Go's 404; known path, wrong method: 405 with Allow.
    let resp = client
        .request(Method::GET, "/2018-06-01/runtime/bogus", &[], Bytes::new())
        .unwrap();
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert_eq!(&resp.body[..], b"404 page not found\n");
    let resp = client
        .request(Method::POST, NEXT, &[], Bytes::new())
        .unwrap();
    assert_eq!(resp.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(resp.headers["allow"], "GET");
    // The SnapStart routes do not exist in an on-demand environment.
    let resp = client
        .request(
            Method::GET,
            "/2018-06-01/runtime/restore/next",
            &[],
            Bytes::new(),
        )
        .unwrap();
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    // No invocation yet: any request id is unknown.
    let (status, doc) = post(&mut client, &response_path("nope"), b"{}".to_vec());
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(doc["errorType"], "InvalidRequestID");
    assert_eq!(doc["errorMessage"], "Invalid request ID");

    // An invocation with every Lambda-Runtime-* header.
    conn.invoke_with(
        "req-1",
        br#"{"n":1}"#,
        r#"{"custom":{"k":"v"}}"#,
        r#"{"cognitoIdentityId":"id-1","cognitoIdentityPoolId":"pool-1"}"#,
    );
    let resp = client
        .request(Method::GET, NEXT, &[], Bytes::new())
        .unwrap();
    assert_eq!(conn.recv(&agent), Got::Ready, "Ready on the first next");
    assert_eq!(resp.status, StatusCode::OK);
    let h = &resp.headers;
    assert_eq!(h["lambda-runtime-aws-request-id"], "req-1");
    assert_eq!(
        h["lambda-runtime-invoked-function-arn"],
        "arn:aws:lambda:us-east-1:123456789012:function:thaw-test"
    );
    assert!(
        h["lambda-runtime-trace-id"]
            .to_str()
            .unwrap()
            .starts_with("Root=1-")
    );
    assert_eq!(
        h["lambda-runtime-client-context"],
        r#"{"custom":{"k":"v"}}"#
    );
    assert_eq!(
        h["lambda-runtime-cognito-identity"],
        r#"{"cognitoIdentityId":"id-1","cognitoIdentityPoolId":"pool-1"}"#
    );
    let deadline: u64 = h["lambda-runtime-deadline-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(deadline > now_ms());
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(&resp.body[..], br#"{"n":1}"#);

    // Wrong id while running: 400. Oversized response: Lambda's 413, and the host hears
    // Function.ResponseSizeTooLarge.
    let (status, _) = post(&mut client, &response_path("req-0"), b"{}".to_vec());
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, doc) = post(
        &mut client,
        &response_path("req-1"),
        vec![b'x'; MAX_PAYLOAD + 1],
    );
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(doc["errorType"], "RequestEntityTooLarge");
    assert_eq!(
        doc["errorMessage"],
        format!("Exceeded maximum allowed payload size ({MAX_PAYLOAD} bytes).")
    );
    match conn.recv(&agent) {
        Got::InvokeError(id, ty, body) => {
            assert_eq!(id, "req-1");
            assert_eq!(ty, "Function.ResponseSizeTooLarge");
            let doc = json(&body);
            assert_eq!(doc["errorType"], "Function.ResponseSizeTooLarge");
            assert_eq!(
                doc["errorMessage"],
                format!(
                    "Response payload size ({} bytes) exceeded maximum allowed payload size ({MAX_PAYLOAD} bytes).",
                    MAX_PAYLOAD + 1
                )
            );
        }
        other => panic!("{other:?}"),
    }
    // Answering twice is an invalid state transition.
    let (status, doc) = post(&mut client, &response_path("req-1"), b"{}".to_vec());
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(doc["errorType"], "InvalidStateTransition");
    assert_eq!(
        doc["errorMessage"],
        "State transition from RuntimeResponseSentState to InvocationResponse failed for runtime. Error: State transition is not allowed"
    );

    // Exactly 6 MiB is fine, both ways.
    let big = vec![b'y'; MAX_PAYLOAD];
    conn.invoke("req-2", &big);
    let resp = client
        .request(Method::GET, NEXT, &[], Bytes::new())
        .unwrap();
    assert_eq!(resp.body.len(), MAX_PAYLOAD);
    let (status, doc) = post(&mut client, &response_path("req-2"), big.clone());
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(doc["status"], "OK");
    assert_eq!(conn.recv(&agent), Got::Response("req-2".into(), big));

    // An error with the runtime's type header; a second invoke while one runs is refused.
    conn.invoke("req-3", b"{}");
    conn.invoke("req-4", b"{}");
    match conn.recv(&agent) {
        Got::InvokeError(id, ty, _) => {
            assert_eq!((id.as_str(), ty.as_str()), ("req-4", "Thaw.AgentBusy"))
        }
        other => panic!("{other:?}"),
    }
    let resp = client
        .request(Method::GET, NEXT, &[], Bytes::new())
        .unwrap();
    assert_eq!(resp.headers["lambda-runtime-aws-request-id"], "req-3");
    let error_doc = br#"{"errorMessage":"bad","errorType":"MyError","stackTrace":[]}"#;
    let resp = client
        .request(
            Method::POST,
            "/2018-06-01/runtime/invocation/req-3/error",
            &[("Lambda-Runtime-Function-Error-Type", "Function.MyError")],
            Bytes::from_static(error_doc),
        )
        .unwrap();
    assert_eq!(resp.status, StatusCode::ACCEPTED);
    assert_eq!(
        conn.recv(&agent),
        Got::InvokeError(
            "req-3".into(),
            "Function.MyError".into(),
            error_doc.to_vec()
        )
    );
    // init/error after init is an invalid transition.
    let (status, doc) = post(
        &mut client,
        "/2018-06-01/runtime/init/error",
        b"{}".to_vec(),
    );
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        doc["errorMessage"],
        "State transition from RuntimeResponseSentState to InitError failed for runtime. Error: State transition is not allowed"
    );
    agent.shutdown(&mut conn);
}

#[test]
fn runtime_exit_during_init_is_runtime_exit_error() {
    let host = FakeHost::new();
    let agent = AgentProcess::start(&host, &[], &["/bin/sh", "-c", "exit 3"], host.dir.path());
    let mut conn = host.accept(&agent, InitType::OnDemand);
    match conn.recv(&agent) {
        Got::InitError(ty, body) => {
            assert_eq!(ty, "Runtime.ExitError");
            assert_eq!(
                json(&body)["errorMessage"],
                "Runtime exited with error: exit status 3"
            );
        }
        other => panic!("{other:?}"),
    }
    // Later invocations are answered with the failure instead of hanging.
    conn.invoke("late", b"{}");
    match conn.recv(&agent) {
        Got::InvokeError(id, ty, _) => {
            assert_eq!((id.as_str(), ty.as_str()), ("late", "Runtime.ExitError"))
        }
        other => panic!("{other:?}"),
    }
    agent.shutdown(&mut conn);
}

#[test]
fn missing_runtime_is_invalid_entrypoint() {
    // A command that cannot be executed, and no command at all (no default bootstrap here).
    let commands: [&[&str]; 2] = [&["/nonexistent/bootstrap"], &[]];
    for runtime in commands {
        let host = FakeHost::new();
        let agent = AgentProcess::start(&host, &[], runtime, host.dir.path());
        let mut conn = host.accept(&agent, InitType::OnDemand);
        match conn.recv(&agent) {
            Got::InitError(ty, body) => {
                assert_eq!(ty, "Runtime.InvalidEntrypoint");
                assert_eq!(json(&body)["errorType"], "Runtime.InvalidEntrypoint");
            }
            other => panic!("{runtime:?}: {other:?}"),
        }
        agent.shutdown(&mut conn);
    }
}

#[test]
fn runtime_exit_during_invocation_fails_that_invocation() {
    let host = FakeHost::new();
    let addr_file = host.dir.path().join("api-addr");
    let script = format!(
        "echo \"$AWS_LAMBDA_RUNTIME_API\" > {0}.tmp && mv {0}.tmp {0}; \
         while [ ! -e {0}.exit ]; do sleep 0.02; done; exit 7",
        addr_file.display()
    );
    let agent = AgentProcess::start(&host, &[], &["/bin/sh", "-c", &script], host.dir.path());
    let mut conn = host.accept(&agent, InitType::OnDemand);
    let mut client = ApiClient::new(read_address(&addr_file)).unwrap();
    conn.invoke("doomed", b"{}");
    let resp = client
        .request(Method::GET, NEXT, &[], Bytes::new())
        .unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(conn.recv(&agent), Got::Ready);
    std::fs::write(format!("{}.exit", addr_file.display()), b"").unwrap();
    match conn.recv(&agent) {
        Got::InvokeError(id, ty, body) => {
            assert_eq!((id.as_str(), ty.as_str()), ("doomed", "Runtime.ExitError"));
            assert_eq!(
                json(&body)["errorMessage"],
                "RequestId: doomed Error: Runtime exited with error: exit status 7"
            );
        }
        other => panic!("{other:?}"),
    }
    agent.shutdown(&mut conn);
}

#[test]
fn function_file_configures_the_runtime_and_its_lambda_environment() {
    let host = FakeHost::new();
    let env_file = host.dir.path().join("runtime.env");
    let config = host.dir.path().join("function.json");
    let doc = serde_json::json!({
        "runtime": ["/bin/sh", "-c", "env > \"$0.tmp\" && mv \"$0.tmp\" \"$0\" && exec sleep 600",
                    env_file.display().to_string()],
        "init_type": "snap-start",
        "function_name": "from-file",
        "handler": "index.handler",
        "memory_mb": 512,
        "env": { "CUSTOM": "yes", "AWS_REGION": "eu-north-1" }
    });
    std::fs::write(&config, doc.to_string()).unwrap();
    let config_arg = config.display().to_string();
    // The command line overrides the file's function name.
    let args = ["--config", &config_arg, "--function-name", "from-cli"];
    let agent = AgentProcess::start(&host, &args, &[], host.dir.path());
    let mut conn = host.accept(&agent, InitType::SnapStart);
    let env = read_address(&env_file);
    let var = |name: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .map(str::to_owned)
    };
    assert_eq!(
        var("AWS_LAMBDA_INITIALIZATION_TYPE").as_deref(),
        Some("snap-start")
    );
    assert_eq!(var("AWS_LAMBDA_FUNCTION_NAME").as_deref(), Some("from-cli"));
    assert_eq!(var("_HANDLER").as_deref(), Some("index.handler"));
    assert_eq!(
        var("AWS_LAMBDA_FUNCTION_MEMORY_SIZE").as_deref(),
        Some("512")
    );
    assert_eq!(
        var("AWS_LAMBDA_FUNCTION_VERSION").as_deref(),
        Some("$LATEST")
    );
    assert_eq!(var("LAMBDA_TASK_ROOT").as_deref(), Some("/var/task"));
    assert_eq!(var("CUSTOM").as_deref(), Some("yes"));
    assert_eq!(var("AWS_REGION").as_deref(), Some("eu-north-1"));
    let api = var("AWS_LAMBDA_RUNTIME_API").unwrap();
    assert!(
        api.starts_with("127.0.0.1:") && !api.ends_with(":0"),
        "{api}"
    );
    agent.shutdown(&mut conn);
}

//! The host connection of `thaw-init` (host-process mode): malformed frames from the host close
//! the connection with a logged reason, the agent reconnects (saying `Hello` again) and keeps
//! serving; an invocation payload over 6 MiB is such a malformed frame. The runtime here is the
//! hooks SDK's own loop, echoing each event.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

mod common;

use std::thread;

use common::*;
use hooks_sdk::protocol::{Header, InitType, Kind, MAX_PAYLOAD, Message};
use hooks_sdk::sdk::{FunctionError, Runtime};

/// A frame of `kind` with `body`, bypassing the encoder's checks.
fn raw_frame(kind: Kind, body: &[u8]) -> Vec<u8> {
    let mut frame = Header {
        kind,
        length: body.len() as u32,
    }
    .encode()
    .to_vec();
    frame.extend_from_slice(body);
    frame
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// An `Invoke` whose payload is one byte over the limit.
fn oversized_invoke() -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, "too-big");
    body.extend_from_slice(&(now_ms() + 60_000).to_le_bytes());
    for field in ["arn:aws:lambda:us-east-1:1:function:f", "", "", ""] {
        string(&mut body, field);
    }
    body.extend_from_slice(&((MAX_PAYLOAD + 1) as u32).to_le_bytes());
    body.resize(body.len() + MAX_PAYLOAD + 1, b'z');
    raw_frame(Kind::Invoke, &body)
}

fn echo_once(conn: &mut HostConn, agent: &AgentProcess, id: &str) {
    conn.invoke(id, id.as_bytes());
    assert_eq!(
        conn.recv(agent),
        Got::Response(id.to_owned(), id.as_bytes().to_vec())
    );
}

#[test]
fn malformed_frames_close_the_connection_and_the_agent_keeps_serving() {
    let host = FakeHost::new();
    let (agent, mut conn, api) = agent_with_test_as_runtime(&host);
    thread::spawn(move || {
        let runtime = Runtime::new(api, false).unwrap();
        let _ = runtime.run(|inv| Ok::<_, FunctionError>(inv.payload));
    });
    assert_eq!(conn.recv(&agent), Got::Ready);
    echo_once(&mut conn, &agent, "first");

    let mut bad_magic = Message::Checkpoint.encode().unwrap();
    bad_magic[0] = b'X';
    let mut unknown_kind = Message::Checkpoint.encode().unwrap();
    unknown_kind[6] = 0x7f;
    let mut flags = Message::Checkpoint.encode().unwrap();
    flags[12] = 1;
    let mut hello_body = Vec::new();
    string(&mut hello_body, "an-impostor");
    hello_body.push(0);
    let mut trailing = Message::Checkpoint.encode().unwrap();
    trailing[8] = 1;
    trailing.push(0);
    let weak_restore = {
        let mut body = Vec::new();
        string(&mut body, "tiny"); // 4 bytes of entropy, fewer than 32
        body.extend_from_slice(&0u64.to_le_bytes());
        string(&mut body, "r");
        raw_frame(Kind::Restored, &body)
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad magic", bad_magic, "bad frame magic"),
        ("unknown kind", unknown_kind, "unknown frame kind"),
        ("reserved flags", flags, "reserved flag bits set"),
        ("trailing bytes", trailing, "bytes after the last field"),
        (
            "oversized payload",
            oversized_invoke(),
            "payload of 6291457 bytes exceeds",
        ),
        ("too little entropy", weak_restore, "undefined value"),
        (
            "guest-to-host kind",
            raw_frame(Kind::Hello, &hello_body),
            "the host sent a guest-to-host frame",
        ),
    ];
    for (i, (what, frame, logged)) in cases.into_iter().enumerate() {
        conn.send_raw(&frame);
        assert!(conn.closed_by_agent(), "{what}: connection not closed");
        agent.wait_for_log(logged);
        conn = host.accept(&agent, InitType::OnDemand);
        echo_once(&mut conn, &agent, &format!("after-{i}"));
    }
    let log = agent.log();
    assert!(log.contains("closing the host connection"), "{log}");
    agent.shutdown(&mut conn);
}

#[test]
fn frames_produced_while_disconnected_are_sent_after_the_next_hello() {
    let mut host = FakeHost::new();
    let (agent, conn, api) = agent_with_test_as_runtime(&host);
    // The host goes away before the runtime is ready, and stays away while it gets ready.
    host.go_away();
    drop(conn);
    agent.wait_for_log("the host closed the connection");
    thread::spawn(move || {
        let runtime = Runtime::new(api, false).unwrap();
        let _ = runtime.run(|inv| Ok::<_, FunctionError>(inv.payload));
    });
    agent.wait_for_log("runtime initialized: Ready");
    agent.wait_for_log("retrying");
    host.come_back();
    let mut conn = host.accept(&agent, InitType::OnDemand);
    assert_eq!(conn.recv(&agent), Got::Ready);
    echo_once(&mut conn, &agent, "x");
    agent.shutdown(&mut conn);
}

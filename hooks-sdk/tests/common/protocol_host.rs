//! The host's side of the guest protocol for tests, over a Unix stream: accepting the agent's
//! connection and checking its `Hello`, sending frames, receiving them as owned values.
//!
//! Shared, as source, by hooks-sdk's tests (`thaw-init` in host mode on a Unix socket) and by
//! the root package's tests (`tests/fixture/mod.rs` includes this file): the same code drives an
//! agent in a chroot and one in a VM, whose vsock connections arrive on a Unix socket too.

use std::io::ErrorKind;
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hooks_sdk::protocol::io::{Frame, FrameError, read_frame, write_message};
use hooks_sdk::protocol::{InitType, Invoke, Message, Restored};

/// How long any single step may take before the test fails.
pub const STEP: Duration = Duration::from_secs(30);

/// The function ARN every test invocation carries.
pub const TEST_FUNCTION_ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:thaw-test";

/// What a failing assertion shows about the agent: its log, a VM's console...
pub trait Diagnostics {
    /// Everything worth showing when a step fails.
    fn diagnostics(&self) -> String;
}

/// A frame from the agent, owned, for assertions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Got {
    Hello(String, InitType),
    Ready,
    SnapshotReady,
    RestoreDone,
    Response(String, Vec<u8>),
    InvokeError(String, String, Vec<u8>),
    InitError(String, Vec<u8>),
    RestoreError(String, Vec<u8>),
    CheckpointError(String, Vec<u8>),
}

impl Got {
    fn from_frame(frame: &Frame) -> Got {
        match frame.message().expect("agent sent a malformed frame") {
            Message::Hello { agent, init_type } => Got::Hello(agent.to_owned(), init_type),
            Message::Ready => Got::Ready,
            Message::SnapshotReady => Got::SnapshotReady,
            Message::RestoreDone => Got::RestoreDone,
            Message::Response {
                request_id,
                payload,
            } => Got::Response(request_id.to_owned(), payload.to_vec()),
            Message::InvokeError {
                request_id,
                failure,
            } => Got::InvokeError(
                request_id.to_owned(),
                failure.error_type.to_owned(),
                failure.body.to_vec(),
            ),
            Message::InitError(f) => Got::InitError(f.error_type.to_owned(), f.body.to_vec()),
            Message::RestoreError(f) => Got::RestoreError(f.error_type.to_owned(), f.body.to_vec()),
            Message::CheckpointError(f) => {
                Got::CheckpointError(f.error_type.to_owned(), f.body.to_vec())
            }
            other => panic!("agent sent a host-to-guest frame: {other:?}"),
        }
    }
}

/// Waits up to `timeout` for the agent to connect on `listener` (non-blocking) and checks that
/// its first frame is a `Hello` from `thaw-init` with `init_type`. A connection that ends
/// before any frame is skipped, as thaw's own host does (`hooks_sdk::host::after_restore`): a
/// connection the agent made just before a transport reset reached it dies with the reset, and
/// the agent connects again.
pub fn accept_agent(
    listener: &UnixListener,
    init_type: InitType,
    timeout: Duration,
    agent: &impl Diagnostics,
) -> HostConn {
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                stream.set_read_timeout(Some(STEP)).unwrap();
                let mut conn = HostConn { stream };
                let first = match read_frame(&mut conn.stream) {
                    Ok(frame) => Got::from_frame(&frame),
                    Err(FrameError::Io(e)) if e.kind() == ErrorKind::UnexpectedEof => {
                        eprintln!(
                            "the agent's connection ended before Hello; waiting for the next"
                        );
                        continue;
                    }
                    Err(e) => panic!(
                        "reading from the agent: {e}; agent log:\n{}",
                        agent.diagnostics()
                    ),
                };
                match first {
                    Got::Hello(name, t) => {
                        assert!(name.starts_with("thaw-init/"), "agent name {name}");
                        assert_eq!(t, init_type, "Hello's init type");
                    }
                    other => panic!("first frame was {other:?}, not Hello"),
                }
                return conn;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    panic!(
                        "agent did not connect within {timeout:?}; log:\n{}",
                        agent.diagnostics()
                    );
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// One connection from the agent.
pub struct HostConn {
    pub stream: UnixStream,
}

impl HostConn {
    pub fn recv(&mut self, agent: &impl Diagnostics) -> Got {
        match read_frame(&mut self.stream) {
            Ok(frame) => Got::from_frame(&frame),
            Err(e) => panic!(
                "reading from the agent: {e}; agent log:\n{}",
                agent.diagnostics()
            ),
        }
    }

    pub fn send(&mut self, message: &Message) {
        write_message(&mut self.stream, message).unwrap();
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.stream.write_all(bytes).unwrap();
    }

    /// Whether the agent closed this connection (EOF or a reset within `STEP`).
    pub fn closed_by_agent(&mut self) -> bool {
        use std::io::Read;
        let mut buf = [0u8; 1];
        match self.stream.read(&mut buf) {
            Ok(0) => true,
            Err(e) => e.kind() == ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }

    pub fn invoke(&mut self, request_id: &str, payload: &[u8]) {
        self.invoke_with(request_id, payload, "", "");
    }

    pub fn invoke_with(
        &mut self,
        request_id: &str,
        payload: &[u8],
        client_context: &str,
        cognito_identity: &str,
    ) {
        let deadline_ms = now_ms() + 60_000;
        self.send(&Message::Invoke(Invoke {
            request_id,
            deadline_ms,
            function_arn: TEST_FUNCTION_ARN,
            trace_id: "Root=1-5e1b4151-5ac6c58f5b5daa6532e4f9f3;Parent=1;Sampled=1",
            client_context,
            cognito_identity,
            payload,
        }));
    }

    /// `Restored` with fixed entropy (for agents in host mode, which do not use it).
    pub fn restored(&mut self, restore_id: &str) {
        self.restored_with_entropy(restore_id, &[0x5a; 64]);
    }

    /// `Restored` with the given entropy and the host's current time.
    pub fn restored_with_entropy(&mut self, restore_id: &str, entropy: &[u8]) {
        let now_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        self.send(&Message::Restored(Restored {
            entropy,
            wall_clock_ns: now_ns,
            restore_id,
        }));
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Parses a JSON document.
pub fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

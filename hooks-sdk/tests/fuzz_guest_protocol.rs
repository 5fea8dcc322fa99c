//! Fuzzing the host↔guest protocol's decoders with proptest on the stable toolchain
//! (docs/fuzzing.md): `hooks_sdk::protocol` (`Header::decode`, `Message::decode`,
//! `io::read_frame`) and, with the `host` feature, what the host does with a guest's bytes
//! (`host::after_restore` and `AgentConnection::invoke` against a fake agent that sends them,
//! `host::quote` on error documents).
//!
//! The seed corpus is generated: every message kind with arbitrary fields within the limits.
//! Properties:
//!
//! - valid messages round-trip (`encode` → `Header::decode` + `Message::decode`, and a stream
//!   through `io::read_frame`);
//! - `Header::decode` accepts exactly the headers the spec allows (an oracle written from
//!   docs/guest-protocol.md);
//! - arbitrary and mutated bodies of every kind, and mutated whole frames, never panic; what
//!   decodes is canonical (it encodes to the very bytes read); errors are the decoder's own;
//!   `read_frame` holds at most one maximal body in memory;
//! - with `host`: a fake agent sending fuzzed bytes gets from `after_restore` and `invoke`
//!   exactly the answer an oracle derives from the same bytes read as frames (Hello then
//!   RestoreDone makes a connection, a request id must match, anything else is the specific
//!   error), never a panic or a hang; `quote` returns the runtime's `errorMessage` or the body,
//!   cut to 2048 characters.
//!
//! Cases per property: `PROPTEST_CASES` (default: the short CI run).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

use hooks_sdk::protocol::io::{self, FrameError};
use hooks_sdk::protocol::{
    Failure, HEADER_LEN, Header, InitType, Invoke, Kind, MAGIC, MAX_BODY, MAX_PAYLOAD, MAX_STRING,
    MIN_ENTROPY, Message, ProtocolError, Restored, VERSION,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

#[macro_use]
#[path = "../../tests/fuzz_harness/mod.rs"]
mod fuzz_harness;

use fuzz_harness::{Measured, exclusive, label};

/// Cases per property in the short run (`cargo test`).
const CASES: u32 = 1000;

// ---------------------------------------------------------------------------------------------
// The seed corpus: every message kind, owned, with arbitrary fields within the limits.

#[derive(Clone, Debug)]
enum Owned {
    Hello(String, bool),
    Ready,
    SnapshotReady,
    RestoreDone,
    Response(String, Vec<u8>),
    InvokeError(String, String, Vec<u8>),
    InitError(String, Vec<u8>),
    RestoreError(String, Vec<u8>),
    CheckpointError(String, Vec<u8>),
    Checkpoint,
    Restored(Vec<u8>, u64, String),
    Invoke([String; 5], u64, Vec<u8>),
    Shutdown,
}

fn failure<'a>(error_type: &'a str, body: &'a [u8]) -> Failure<'a> {
    Failure { error_type, body }
}

impl Owned {
    fn message(&self) -> Message<'_> {
        match self {
            Owned::Hello(agent, snap) => Message::Hello {
                agent,
                init_type: if *snap {
                    InitType::SnapStart
                } else {
                    InitType::OnDemand
                },
            },
            Owned::Ready => Message::Ready,
            Owned::SnapshotReady => Message::SnapshotReady,
            Owned::RestoreDone => Message::RestoreDone,
            Owned::Response(request_id, payload) => Message::Response {
                request_id,
                payload,
            },
            Owned::InvokeError(request_id, t, b) => Message::InvokeError {
                request_id,
                failure: failure(t, b),
            },
            Owned::InitError(t, b) => Message::InitError(failure(t, b)),
            Owned::RestoreError(t, b) => Message::RestoreError(failure(t, b)),
            Owned::CheckpointError(t, b) => Message::CheckpointError(failure(t, b)),
            Owned::Checkpoint => Message::Checkpoint,
            Owned::Restored(entropy, wall_clock_ns, restore_id) => Message::Restored(Restored {
                entropy,
                wall_clock_ns: *wall_clock_ns,
                restore_id,
            }),
            Owned::Invoke(
                [request_id, function_arn, trace_id, client_context, cognito],
                deadline_ms,
                payload,
            ) => Message::Invoke(Invoke {
                request_id,
                deadline_ms: *deadline_ms,
                function_arn,
                trace_id,
                client_context,
                cognito_identity: cognito,
                payload,
            }),
            Owned::Shutdown => Message::Shutdown,
        }
    }

    fn frame(&self) -> Vec<u8> {
        self.message().encode().unwrap()
    }
}

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "\\PC{0,16}",
        1 => Just(String::new()),
        1 => Just("req-1".to_owned()),
        1 => (MAX_STRING / 2 - 4..=MAX_STRING / 2).prop_map(|n| "é".repeat(n)),
    ]
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => proptest::collection::vec(any::<u8>(), 0..48),
        1 => Just(br#"{"errorMessage":"boom","errorType":"Exception"}"#.to_vec()),
        1 => (0usize..100_000).prop_map(|n| vec![b'7'; n]),
    ]
}

fn owned() -> impl Strategy<Value = Owned> {
    let entropy = prop_oneof![
        proptest::collection::vec(any::<u8>(), MIN_ENTROPY..96),
        Just(vec![0xee; MAX_STRING]),
    ];
    prop_oneof![
        3 => (string(), any::<bool>()).prop_map(|(a, s)| Owned::Hello(a, s)),
        1 => Just(Owned::Ready),
        1 => Just(Owned::SnapshotReady),
        3 => Just(Owned::RestoreDone),
        3 => (string(), payload()).prop_map(|(r, p)| Owned::Response(r, p)),
        2 => (string(), string(), payload()).prop_map(|(r, t, b)| Owned::InvokeError(r, t, b)),
        1 => (string(), payload()).prop_map(|(t, b)| Owned::InitError(t, b)),
        2 => (string(), payload()).prop_map(|(t, b)| Owned::RestoreError(t, b)),
        1 => (string(), payload()).prop_map(|(t, b)| Owned::CheckpointError(t, b)),
        1 => Just(Owned::Checkpoint),
        1 => (entropy, any::<u64>(), string()).prop_map(|(e, w, r)| Owned::Restored(e, w, r)),
        1 => (
            [string(), string(), string(), string(), string()],
            any::<u64>(),
            payload()
        )
            .prop_map(|(s, d, p)| Owned::Invoke(s, d, p)),
        1 => Just(Owned::Shutdown),
    ]
}

const KINDS: [Kind; 13] = [
    Kind::Hello,
    Kind::Ready,
    Kind::SnapshotReady,
    Kind::RestoreDone,
    Kind::Response,
    Kind::InvokeError,
    Kind::InitError,
    Kind::RestoreError,
    Kind::CheckpointError,
    Kind::Checkpoint,
    Kind::Restored,
    Kind::Invoke,
    Kind::Shutdown,
];

// ---------------------------------------------------------------------------------------------
// Mutations.

#[derive(Clone, Debug)]
enum Edit {
    Flip {
        at: u64,
        bit: u8,
    },
    Set {
        at: u64,
        byte: u8,
    },
    Truncate {
        to: u64,
    },
    Append(Vec<u8>),
    Insert {
        at: u64,
        bytes: Vec<u8>,
    },
    Remove {
        at: u64,
        len: usize,
    },
    /// A u32 (the header's length, a field's length) set to `value`.
    Length {
        at: u64,
        value: u32,
    },
}

fn position(at: u64, n: usize) -> usize {
    ((n as u128 * u128::from(at)) >> 64) as usize
}

fn edit() -> impl Strategy<Value = Edit> {
    let value = prop_oneof![
        Just(0u32),
        Just(u32::MAX),
        Just(MAX_BODY as u32),
        Just(MAX_BODY as u32 + 1),
        Just(MAX_PAYLOAD as u32 + 1),
        Just(MAX_STRING as u32 + 1),
        0u32..64,
        any::<u32>(),
    ];
    prop_oneof![
        4 => (any::<u64>(), 0u8..8).prop_map(|(at, bit)| Edit::Flip { at, bit }),
        2 => (any::<u64>(), any::<u8>()).prop_map(|(at, byte)| Edit::Set { at, byte }),
        2 => any::<u64>().prop_map(|to| Edit::Truncate { to }),
        1 => proptest::collection::vec(any::<u8>(), 1..16).prop_map(Edit::Append),
        1 => (any::<u64>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
        1 => (any::<u64>(), 1usize..8).prop_map(|(at, len)| Edit::Remove { at, len }),
        3 => (any::<u64>(), value).prop_map(|(at, value)| Edit::Length { at, value }),
    ]
}

fn apply(bytes: &mut Vec<u8>, edits: &[Edit]) {
    for e in edits {
        let len = bytes.len();
        match e {
            Edit::Flip { at, bit } if len > 0 => bytes[position(*at, len)] ^= 1 << bit,
            Edit::Set { at, byte } if len > 0 => bytes[position(*at, len)] = *byte,
            Edit::Truncate { to } => bytes.truncate(position(*to, len + 1)),
            Edit::Append(tail) => bytes.extend_from_slice(tail),
            Edit::Insert { at, bytes: new } => {
                let at = position(*at, len + 1);
                bytes.splice(at..at, new.iter().copied());
            }
            Edit::Remove { at, len: n } if len > 0 => {
                let start = position(*at, len);
                bytes.drain(start..(start + n).min(len));
            }
            Edit::Length { at, value } if len >= 4 => {
                let start = position(*at, len - 3);
                bytes[start..start + 4].copy_from_slice(&value.to_le_bytes());
            }
            _ => {}
        }
    }
}

/// A frame header for `kind` announcing `body`'s length.
fn header(kind: Kind, body: &[u8]) -> [u8; HEADER_LEN] {
    Header {
        kind,
        length: body.len() as u32,
    }
    .encode()
}

// ---------------------------------------------------------------------------------------------
// Checks.

/// The spec's rule for a header (docs/guest-protocol.md, "Frames").
fn header_oracle(b: &[u8; HEADER_LEN]) -> Option<(u16, u32)> {
    let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let kind = u16_at(6);
    let known = (0x01..=0x09).contains(&kind) || (0x10..=0x13).contains(&kind);
    (&b[..4] == b"THAW"
        && u16_at(4) == 1
        && known
        && u32_at(8) as usize <= 6 * 1024 * 1024 + 64 * 1024
        && u32_at(12) == 0)
        .then_some((kind, u32_at(8)))
}

/// Decodes `body` as a `kind` frame's: a body that decodes must encode to exactly itself
/// (under the same kind), and a refusal must be one of the body decoder's own errors.
fn check_body(kind: Kind, body: &[u8]) -> String {
    match Message::decode(kind, body) {
        Ok(message) => {
            assert_eq!(message.kind(), kind);
            let frame = message.encode().expect("a decoded message re-encodes");
            assert!(
                frame[..HEADER_LEN] == header(kind, body) && frame[HEADER_LEN..] == *body,
                "{message:?} decoded from a body it does not encode to"
            );
            "decoded".to_owned()
        }
        Err(
            e @ (ProtocolError::Truncated
            | ProtocolError::TrailingBytes(_)
            | ProtocolError::NotUtf8
            | ProtocolError::StringTooLong(_)
            | ProtocolError::PayloadTooLarge(_)
            | ProtocolError::BadValue),
        ) => label(&e),
        Err(e) => panic!("the body decoder answered {e:?}"),
    }
}

/// Reads one frame from `bytes` with `io::read_frame`: it agrees with the header and body
/// decoders, what it returns is canonical, and it holds at most one maximal body.
fn check_stream(bytes: &[u8], measured: &Measured) -> String {
    let mut reader = bytes;
    let result = io::read_frame(&mut reader);
    let consumed = bytes.len() - reader.len();
    assert!(
        measured.growth() <= MAX_BODY + (64 << 10),
        "{} bytes in memory for a frame",
        measured.growth()
    );
    match result {
        Ok(frame) => {
            let message = frame
                .message()
                .expect("read_frame returned an undecodable frame");
            let again = message.encode().unwrap();
            assert!(
                again == bytes[..consumed],
                "{message:?} is not the frame read"
            );
            format!("{:?}", frame.kind)
        }
        Err(FrameError::Io(e)) => {
            // Only the stream ending early: a header or body cut short.
            assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e:?}");
            let complete_header = bytes.len() >= HEADER_LEN
                && header_oracle(bytes[..HEADER_LEN].try_into().unwrap())
                    .is_some_and(|(_, len)| bytes.len() >= HEADER_LEN + len as usize);
            assert!(!complete_header, "a whole frame was reported cut short");
            "Io".to_owned()
        }
        Err(FrameError::Protocol(e)) => {
            if let Ok(h) = bytes[..HEADER_LEN.min(bytes.len())].try_into() {
                let h: &[u8; HEADER_LEN] = h;
                match header_oracle(h) {
                    None => assert!(
                        matches!(
                            e,
                            ProtocolError::BadMagic(_)
                                | ProtocolError::UnsupportedVersion(_)
                                | ProtocolError::UnknownKind(_)
                                | ProtocolError::BodyTooLarge(_)
                                | ProtocolError::UnknownFlags(_)
                        ),
                        "{e:?}"
                    ),
                    Some((kind, len)) => {
                        let kind = Kind::from_u16(kind).unwrap();
                        let body = &bytes[HEADER_LEN..HEADER_LEN + len as usize];
                        assert_eq!(Message::decode(kind, body), Err(e));
                    }
                }
            }
            label(&e)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The properties of the protocol module.

#[test]
fn valid_messages_round_trip() {
    fuzz!(
        "valid messages",
        (CASES, 1),
        proptest::collection::vec(owned(), 1..4),
        |messages| {
            let _measured = Measured::start();
            let mut stream = Vec::new();
            for m in &messages {
                let frame = m.frame();
                prop_assert_eq!(frame.len(), m.message().frame_len());
                let h = Header::decode(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
                prop_assert_eq!(h.kind, m.message().kind());
                prop_assert_eq!(h.length as usize, frame.len() - HEADER_LEN);
                prop_assert_eq!(
                    Message::decode(h.kind, &frame[HEADER_LEN..]),
                    Ok(m.message())
                );
                stream.extend_from_slice(&frame);
            }
            let mut reader = stream.as_slice();
            for m in &messages {
                let frame = io::read_frame(&mut reader).unwrap();
                prop_assert_eq!(frame.message(), Ok(m.message()));
            }
            prop_assert!(reader.is_empty());
            Ok(format!("{:?}", messages[0].message().kind()))
        },
    );
}

#[test]
fn headers_are_accepted_exactly_as_the_spec_says() {
    let near_valid = (any::<u16>(), any::<u32>(), any::<u32>(), any::<bool>()).prop_map(
        |(kind, length, flags, clean)| {
            let mut h = [0u8; HEADER_LEN];
            h[..4].copy_from_slice(&MAGIC.to_le_bytes());
            h[4..6].copy_from_slice(&VERSION.to_le_bytes());
            h[6..8].copy_from_slice(&(kind % 0x20).to_le_bytes());
            let length = if clean {
                length % (MAX_BODY as u32 + 2)
            } else {
                length
            };
            h[8..12].copy_from_slice(&length.to_le_bytes());
            if !clean {
                h[12..].copy_from_slice(&flags.to_le_bytes());
            }
            h
        },
    );
    fuzz!(
        "headers",
        (CASES, 1),
        prop_oneof![any::<[u8; HEADER_LEN]>(), near_valid],
        |h| {
            let decoded = Header::decode(&h);
            match (decoded, header_oracle(&h)) {
                (Ok(got), Some((kind, length))) => {
                    prop_assert_eq!(got.kind as u16, kind);
                    prop_assert_eq!(got.length, length);
                    prop_assert_eq!(got.encode(), h);
                    Ok("accepted".to_owned())
                }
                (Err(e), None) => Ok(label(&e)),
                (got, expected) => Err(TestCaseError::fail(format!(
                    "{h:?}: decoded {got:?}, the spec says {expected:?}"
                ))),
            }
        },
    );
}

#[test]
fn arbitrary_bodies_of_every_kind() {
    let body = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..80),
        // Length-prefixed fields with small lengths, so that decoding gets further.
        proptest::collection::vec(
            prop_oneof![
                (0u32..12).prop_map(|n| n.to_le_bytes().to_vec()),
                proptest::collection::vec(any::<u8>(), 0..12),
                "\\PC{0,6}".prop_map(String::into_bytes),
            ],
            0..8
        )
        .prop_map(|parts| parts.concat()),
    ];
    fuzz!(
        "arbitrary bodies",
        (CASES, 1),
        (0..KINDS.len(), body),
        |(kind, body)| {
            let _measured = Measured::start();
            let kind = KINDS[kind];
            Ok(format!("{kind:?}: {}", check_body(kind, &body)))
        },
    );
}

#[test]
fn mutated_bodies_and_frames() {
    fuzz!(
        "mutated frames",
        (CASES, 1),
        (
            owned(),
            proptest::collection::vec(edit(), 1..4),
            any::<bool>(),
        ),
        |(message, edits, whole_frame)| {
            let measured = Measured::start();
            let frame = message.frame();
            if whole_frame {
                let mut bytes = frame;
                apply(&mut bytes, &edits);
                Ok(format!("frame: {}", check_stream(&bytes, &measured)))
            } else {
                let mut body = frame[HEADER_LEN..].to_vec();
                apply(&mut body, &edits);
                let kind = message.message().kind();
                let outcome = check_body(kind, &body);
                // The same body behind a header that fits it, through the stream reader.
                let mut bytes = header(kind, &body).to_vec();
                bytes.extend_from_slice(&body);
                if body.len() <= MAX_BODY {
                    check_stream(&bytes, &measured);
                }
                Ok(format!("body: {outcome}"))
            }
        },
    );
}

/// A header announcing the largest body, and more, with nothing after it.
#[test]
fn the_largest_announced_body_is_the_most_read_frame_holds() {
    let _run = exclusive();
    for length in [MAX_BODY as u32, MAX_BODY as u32 + 1, u32::MAX] {
        let measured = Measured::start();
        let h = Header {
            kind: Kind::Response,
            length: 0,
        }
        .encode();
        let mut bytes = h.to_vec();
        bytes[8..12].copy_from_slice(&length.to_le_bytes());
        let outcome = check_stream(&bytes, &measured);
        if length as usize > MAX_BODY {
            assert_eq!(outcome, "BodyTooLarge");
            assert!(measured.growth() < 64 << 10, "{}", measured.growth());
        } else {
            assert_eq!(outcome, "Io");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The host's side: what it does with a guest's bytes.

#[cfg(feature = "host")]
mod host_side {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::Duration;

    use hooks_sdk::host::{self, AfterRestoreError, InvokeError, InvokeOutcome, Uniqueness};

    use super::*;

    /// How long the host waits for the agent to connect (again): a script that ends inside
    /// its first frame makes the host wait for a reconnection this long.
    const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
    /// Budgets long enough never to be reached: a script is written whole, then the agent
    /// stops writing.
    const BUDGET: Duration = Duration::from_secs(20);

    /// What the host must answer to a fake agent that sends `script` and then stops writing.
    #[derive(Debug)]
    enum Expected {
        ConnectTimeout,
        Protocol,
        Socket,
        Hook {
            error_type: String,
            message: String,
        },
        Connected {
            agent: String,
            invoke: ExpectedInvoke,
        },
    }

    #[derive(Debug)]
    enum ExpectedInvoke {
        Answer(InvokeOutcome),
        Protocol,
        Socket,
    }

    const REQUEST_ID: &str = "req-1";

    /// The oracle: the script read as frames with the same reader over a byte slice.
    fn expected(script: &[u8]) -> Expected {
        let mut reader = script;
        let hello = match io::read_frame(&mut reader) {
            Err(FrameError::Io(_)) => return Expected::ConnectTimeout,
            Err(FrameError::Protocol(_)) => return Expected::Protocol,
            Ok(frame) => frame,
        };
        let agent = match hello.message() {
            Ok(Message::Hello { agent, .. }) => agent.to_owned(),
            _ => return Expected::Protocol,
        };
        match io::read_frame(&mut reader) {
            Err(FrameError::Io(_)) => return Expected::Socket,
            Err(FrameError::Protocol(_)) => return Expected::Protocol,
            Ok(frame) => match frame.message() {
                Ok(Message::RestoreDone) => {}
                Ok(Message::RestoreError(f)) => {
                    return Expected::Hook {
                        error_type: f.error_type.to_owned(),
                        message: host::quote(f.body),
                    };
                }
                _ => return Expected::Protocol,
            },
        }
        let invoke = match io::read_frame(&mut reader) {
            Err(FrameError::Io(_)) => ExpectedInvoke::Socket,
            Err(FrameError::Protocol(_)) => ExpectedInvoke::Protocol,
            Ok(frame) => match frame.message() {
                Ok(Message::Response {
                    request_id,
                    payload,
                }) if request_id == REQUEST_ID => {
                    ExpectedInvoke::Answer(InvokeOutcome::Response(payload.to_vec()))
                }
                Ok(Message::InvokeError {
                    request_id,
                    failure,
                }) if request_id == REQUEST_ID => ExpectedInvoke::Answer(InvokeOutcome::Error {
                    error_type: failure.error_type.to_owned(),
                    body: failure.body.to_vec(),
                }),
                _ => ExpectedInvoke::Protocol,
            },
        };
        Expected::Connected { agent, invoke }
    }

    /// Runs the host's after-restore handshake, and an invocation if it connects, against a
    /// fake agent that writes `script`, stops writing, and reads whatever the host sends.
    fn session(
        script: Vec<u8>,
    ) -> (
        Result<(), AfterRestoreError>,
        Option<Result<InvokeOutcome, InvokeError>>,
        String,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let agent = std::thread::spawn(move || {
            let mut s = UnixStream::connect(&path).unwrap();
            // The host may close first (on a protocol error): a failed write ends the script.
            let _ = s.write_all(&script);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
        let unique = Uniqueness::generate().unwrap();
        let connected = host::after_restore(&listener, &unique, CONNECT_TIMEOUT, BUDGET, &|| false);
        let (result, invoked, name) = match connected {
            Err(e) => (Err(e), None, String::new()),
            Ok(mut connection) => {
                let payload = b"{}";
                let invoke = Invoke {
                    request_id: REQUEST_ID,
                    deadline_ms: host::deadline_after(BUDGET),
                    function_arn: "arn:aws:lambda:us-east-1:123456789012:function:f",
                    payload,
                    ..Default::default()
                };
                let outcome = connection.invoke(&invoke, BUDGET, &|| false);
                let name = connection.agent.clone();
                drop(connection);
                (Ok(()), Some(outcome), name)
            }
        };
        drop(listener);
        agent.join().unwrap();
        (result, invoked, name)
    }

    /// Scripts: mostly the frames a session needs (a Hello, then RestoreDone or an error, then
    /// an answer), each possibly mutated, sometimes with garbage between or instead.
    fn script() -> impl Strategy<Value = Vec<u8>> {
        let hello = (string(), any::<bool>()).prop_map(|(a, s)| Owned::Hello(a, s));
        let done = prop_oneof![
            4 => Just(Owned::RestoreDone),
            1 => (string(), payload()).prop_map(|(t, b)| Owned::RestoreError(t, b)),
            1 => owned(),
        ];
        let answer = prop_oneof![
            3 => payload().prop_map(|p| Owned::Response(REQUEST_ID.to_owned(), p)),
            2 => (string(), payload())
                .prop_map(|(t, b)| Owned::InvokeError(REQUEST_ID.to_owned(), t, b)),
            1 => owned(),
        ];
        let piece = |m: BoxedStrategy<Owned>| {
            (
                m,
                prop_oneof![
                    4 => Just(Vec::new()),
                    1 => proptest::collection::vec(edit(), 1..3)
                ],
            )
                .prop_map(|(m, edits)| {
                    let mut frame = m.frame();
                    apply(&mut frame, &edits);
                    frame
                })
        };
        (
            piece(hello.boxed()),
            piece(done.boxed()),
            piece(answer.boxed()),
            proptest::collection::vec(any::<u8>(), 0..8),
            // Few scripts end inside their first frame: each costs the host's connect timeout.
            prop_oneof![1 => Just(0usize), 2 => Just(1), 3 => Just(2), 10 => Just(3)],
        )
            .prop_map(|(a, b, c, garbage, pieces)| {
                let mut script = Vec::new();
                for (i, p) in [a, b, c].into_iter().enumerate() {
                    if i < pieces {
                        script.extend_from_slice(&p);
                    }
                }
                script.extend_from_slice(&garbage);
                script
            })
    }

    #[test]
    fn a_fuzzed_agent_gets_exactly_the_answer_its_bytes_call_for() {
        fuzz!(
            "fuzzed agent sessions",
            (CASES / 10, 200),
            script(),
            |script| {
                let measured = Measured::start();
                let expected = expected(&script);
                let (connected, invoked, agent) = session(script);
                prop_assert!(measured.growth() < 4 * MAX_BODY, "{}", measured.growth());
                let ok = match (&expected, &connected, &invoked) {
                    (Expected::ConnectTimeout, Err(AfterRestoreError::ConnectTimeout(_)), _) => {
                        true
                    }
                    (Expected::Protocol, Err(AfterRestoreError::Protocol(_)), _) => true,
                    (Expected::Socket, Err(AfterRestoreError::Socket(_)), _) => true,
                    (
                        Expected::Hook {
                            error_type,
                            message,
                        },
                        Err(AfterRestoreError::Hook {
                            error_type: t,
                            message: m,
                        }),
                        _,
                    ) => error_type == t && message == m,
                    (Expected::Connected { agent: a, invoke }, Ok(()), Some(got)) => {
                        *a == agent
                            && match (invoke, got) {
                                (ExpectedInvoke::Answer(e), Ok(g)) => e == g,
                                (ExpectedInvoke::Protocol, Err(InvokeError::Protocol(_))) => true,
                                (ExpectedInvoke::Socket, Err(InvokeError::Socket(_))) => true,
                                _ => false,
                            }
                    }
                    _ => false,
                };
                prop_assert!(
                    ok,
                    "expected {expected:?}; after_restore gave {connected:?}, invoke {invoked:?}"
                );
                Ok(label(&expected))
            },
        );
    }

    /// `quote` gives the runtime's `errorMessage` when the body is a JSON object holding one as
    /// a string, else the body as text; cut to 2048 characters and an ellipsis.
    #[test]
    fn quote_takes_the_error_message_or_the_body_and_cuts_it() {
        let doc = ("\\PC{0,40}|\\PC{2040,2060}", any::<bool>()).prop_map(|(m, json)| {
            if json {
                serde_json::json!({ "errorMessage": m, "errorType": "E", "stackTrace": [] })
                    .to_string()
                    .into_bytes()
            } else {
                m.into_bytes()
            }
        });
        let input = prop_oneof![proptest::collection::vec(any::<u8>(), 0..64), doc];
        fuzz!("quote", (CASES, 1), input, |body| {
            let _measured = Measured::start();
            let quoted = host::quote(&body);
            let whole = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("errorMessage")?.as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            let expected = if whole.chars().count() > 2048 {
                format!("{}…", whole.chars().take(2048).collect::<String>())
            } else {
                whole
            };
            prop_assert_eq!(&quoted, &expected);
            Ok(if quoted.ends_with('…') {
                "cut"
            } else {
                "whole"
            }
            .to_owned())
        });
    }
}

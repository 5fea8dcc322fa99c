//! Fuzzing the worker protocol (`restore_daemon::worker::protocol`) with proptest on the
//! stable toolchain (docs/fuzzing.md): the frames thawd and its worker processes exchange,
//! in both directions (requests thawd → worker, replies worker → thawd), through both readers
//! (the worker's blocking `read_frame`, thawd's `read_frame_async`).
//!
//! The seed corpus is generated: every `Request` and `Reply` variant with arbitrary fields.
//! Properties:
//!
//! - valid messages round-trip, alone and as a stream that then ends `Closed`; a valid frame
//!   cut anywhere is `Truncated` with the right counts;
//! - arbitrary bytes, and valid frames mutated (bit flips, byte runs, changed length prefixes
//!   and inner lengths, truncation, insertion, garbage appended), never make a reader panic;
//!   both readers give the same answer; whatever decodes is canonical (encoding it again gives
//!   the very frame that was read); a frame over `MAX_FRAME` is refused without allocating its
//!   body; and no case holds more than two frames' worth of memory at once (the body, and what
//!   the lengths inside it may claim under the decoder's limit).
//!
//! Cases per property: `PROPTEST_CASES` (default: the short CI run, [`CASES`]).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

use std::path::PathBuf;

use proptest::prelude::*;
use restore_daemon::decoded_copy::CopyTicket;
use restore_daemon::worker::protocol::{
    FailureKind, FrameError, Invoke, MAX_FRAME, Reply, Request, WireMemoryMode, WireOutcome,
    encode_frame, read_frame, read_frame_async,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[macro_use]
#[path = "../../tests/fuzz_harness/mod.rs"]
mod fuzz_harness;

use fuzz_harness::{Measured, exclusive, label};

/// Cases per property in the short run (`cargo test`).
const CASES: u32 = 2000;

// ---------------------------------------------------------------------------------------------
// The seed corpus: every message variant with arbitrary fields.

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "\\PC{0,24}",
        1 => Just(String::new()),
        1 => Just("Runtime.ExitError".to_owned()),
        1 => (0usize..3000).prop_map(|n| "é".repeat(n)),
    ]
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => proptest::collection::vec(any::<u8>(), 0..64),
        1 => (0usize..70_000).prop_map(|n| vec![0x5a; n]),
    ]
}

fn path() -> impl Strategy<Value = PathBuf> {
    "(/[a-z0-9.-]{0,12}){0,4}".prop_map(PathBuf::from)
}

fn ticket() -> impl Strategy<Value = CopyTicket> {
    (any::<[u8; 16]>(), any::<u64>()).prop_map(|(snapshot_id, mem_bytes)| CopyTicket {
        snapshot_id,
        mem_bytes,
    })
}

fn memory() -> impl Strategy<Value = WireMemoryMode> {
    prop_oneof![Just(WireMemoryMode::Eager), Just(WireMemoryMode::Lazy)]
}

fn invoke() -> impl Strategy<Value = Invoke> {
    (text(), any::<u64>(), text(), text(), bytes(), any::<u64>()).prop_map(
        |(request_id, deadline_ms, function_arn, client_context, payload, timeout_ms)| Invoke {
            request_id,
            deadline_ms,
            function_arn,
            client_context,
            payload,
            timeout_ms,
        },
    )
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<u64>(), any::<u8>())
            .prop_map(|(mem_bytes, vcpus)| Request::Prepare { mem_bytes, vcpus }),
        (path(), proptest::option::of(path()), ticket()).prop_map(
            |(snapshot, key_file, shared_copy)| Request::PrepareRestore {
                snapshot,
                key_file,
                shared_copy,
            }
        ),
        (
            path(),
            proptest::option::of(path()),
            memory(),
            any::<u64>(),
            proptest::option::of(any::<[u8; 16]>()),
            proptest::option::of(ticket()),
        )
            .prop_map(
                |(snapshot, key_file, memory, after_restore_timeout_ms, verified, shared_copy)| {
                    Request::Restore {
                        snapshot,
                        key_file,
                        memory,
                        after_restore_timeout_ms,
                        verified,
                        shared_copy,
                    }
                }
            ),
        invoke().prop_map(Request::Invoke),
        Just(Request::Freeze),
        Just(Request::Thaw),
        Just(Request::Shutdown),
    ]
}

fn failure_kind() -> impl Strategy<Value = FailureKind> {
    prop_oneof![
        Just(FailureKind::Restore),
        text().prop_map(|error_type| FailureKind::AfterRestore { error_type }),
        Just(FailureKind::AfterRestoreTimeout),
        Just(FailureKind::InvokeTimeout),
        proptest::option::of(any::<i32>())
            .prop_map(|exit_code| FailureKind::GuestEnded { exit_code }),
        Just(FailureKind::BadRequest),
        Just(FailureKind::Internal),
    ]
}

fn outcome() -> impl Strategy<Value = WireOutcome> {
    prop_oneof![
        bytes().prop_map(WireOutcome::Response),
        (text(), bytes())
            .prop_map(|(error_type, body)| WireOutcome::FunctionError { error_type, body }),
    ]
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        any::<u64>().prop_map(|shell_us| Reply::Prepared { shell_us }),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
            |(restore_us, ready_us, hello_us, shell_was_ready)| Reply::Restored {
                restore_us,
                ready_us,
                hello_us,
                shell_was_ready,
            }
        ),
        (outcome(), any::<u64>(), bytes(), any::<u64>()).prop_map(
            |(outcome, duration_us, console, max_memory_used_bytes)| Reply::Invoked {
                outcome,
                duration_us,
                console,
                max_memory_used_bytes,
            }
        ),
        Just(Reply::Frozen),
        Just(Reply::Thawed),
        Just(Reply::ShutDown),
        (failure_kind(), text(), bytes()).prop_map(|(kind, message, console)| Reply::Failed {
            kind,
            message,
            console,
        }),
    ]
}

#[derive(Clone, Debug)]
enum Message {
    Request(Request),
    Reply(Reply),
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        request().prop_map(Message::Request),
        reply().prop_map(Message::Reply),
    ]
}

impl Message {
    fn frame(&self) -> Vec<u8> {
        match self {
            Message::Request(m) => encode_frame(m).unwrap(),
            Message::Reply(m) => encode_frame(m).unwrap(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading.

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    })
}

/// What the blocking and the async reader make of the start of `bytes`, which must be the same;
/// and how many bytes the blocking one consumed.
fn read_both<T>(bytes: &[u8]) -> (Result<T, FrameError>, usize)
where
    T: DeserializeOwned + std::fmt::Debug + PartialEq,
{
    let mut sync_reader = bytes;
    let sync = read_frame::<_, T>(&mut sync_reader);
    let consumed = bytes.len() - sync_reader.len();
    let mut async_reader = bytes;
    let asynchronous = runtime().block_on(read_frame_async::<_, T>(&mut async_reader));
    assert_eq!(
        format!("{sync:?}"),
        format!("{asynchronous:?}"),
        "the blocking and the async reader disagree"
    );
    assert_eq!(
        sync_reader.len(),
        async_reader.len(),
        "they consumed differently"
    );
    (sync, consumed)
}

/// Reads the first frame of `bytes` as a `T`: checks what must hold of any input and returns a
/// label of the outcome.
fn check_any<T>(bytes: &[u8], measured: &Measured) -> String
where
    T: DeserializeOwned + Serialize + std::fmt::Debug + PartialEq,
{
    let (result, consumed) = read_both::<T>(bytes);
    let growth = measured.growth();
    // The body buffer (at most MAX_FRAME), and what lengths inside may claim (the decoder's
    // limit, MAX_FRAME), plus change.
    assert!(
        growth <= 2 * MAX_FRAME + (1 << 20),
        "a frame of {} bytes held {growth} bytes",
        bytes.len()
    );
    match &result {
        Ok(message) => {
            // Canonical: the message is exactly the frame that was read.
            let again = encode_frame(message).unwrap();
            assert!(
                again == bytes[..consumed],
                "decoded {message:?} from a frame it does not encode to"
            );
        }
        Err(FrameError::TooLarge { len }) => {
            assert!(*len > MAX_FRAME);
            assert_eq!(consumed, 4, "a refused frame's body was read");
            assert!(
                growth < 1 << 20,
                "a refused frame's body was allocated: {growth}"
            );
        }
        Err(FrameError::Closed) => assert!(bytes.is_empty()),
        Err(FrameError::Truncated { expected, got }) => {
            assert!(got < expected);
            assert_eq!(*got, bytes.len());
        }
        Err(FrameError::Decode(_) | FrameError::TrailingBytes { .. }) => {}
        Err(e @ (FrameError::Io(_) | FrameError::Encode(_))) => {
            panic!("reading a byte slice failed with {e:?}")
        }
    }
    match result {
        Ok(_) => "decoded".to_owned(),
        Err(e) => label(&e),
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations of valid frames.

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
    Run {
        at: u64,
        len: usize,
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
    /// The length prefix, or a u64 length or count inside the body, set to `value`.
    Length {
        at: u64,
        value: u64,
    },
}

fn position(at: u64, n: usize) -> usize {
    ((n as u128 * u128::from(at)) >> 64) as usize
}

fn edit() -> impl Strategy<Value = Edit> {
    let value = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::from(u32::MAX)),
        Just(u64::MAX),
        Just(MAX_FRAME as u64),
        Just(MAX_FRAME as u64 + 1),
        0u64..300,
        any::<u64>(),
    ];
    prop_oneof![
        4 => (any::<u64>(), 0u8..8).prop_map(|(at, bit)| Edit::Flip { at, bit }),
        2 => (any::<u64>(), any::<u8>()).prop_map(|(at, byte)| Edit::Set { at, byte }),
        1 => (any::<u64>(), 1usize..16, any::<u8>())
            .prop_map(|(at, len, byte)| Edit::Run { at, len, byte }),
        2 => any::<u64>().prop_map(|to| Edit::Truncate { to }),
        1 => proptest::collection::vec(any::<u8>(), 1..16).prop_map(Edit::Append),
        1 => (any::<u64>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
        1 => (any::<u64>(), 1usize..8).prop_map(|(at, len)| Edit::Remove { at, len }),
        3 => (any::<u64>(), value).prop_map(|(at, value)| Edit::Length { at, value }),
    ]
}

fn apply(frame: &mut Vec<u8>, edits: &[Edit]) {
    for e in edits {
        let len = frame.len();
        match e {
            Edit::Flip { at, bit } if len > 0 => frame[position(*at, len)] ^= 1 << bit,
            Edit::Set { at, byte } if len > 0 => frame[position(*at, len)] = *byte,
            Edit::Run { at, len: n, byte } if len > 0 => {
                let start = position(*at, len);
                frame[start..(start + n).min(len)].fill(*byte);
            }
            Edit::Truncate { to } => frame.truncate(position(*to, len + 1)),
            Edit::Append(tail) => frame.extend_from_slice(tail),
            Edit::Insert { at, bytes } => {
                let at = position(*at, len + 1);
                frame.splice(at..at, bytes.iter().copied());
            }
            Edit::Remove { at, len: n } if len > 0 => {
                let start = position(*at, len);
                frame.drain(start..(start + n).min(len));
            }
            Edit::Length { at, value } if len >= 4 => {
                // Position 0 is the prefix (u32); others are taken as a u64 in the body.
                let start = position(*at, len);
                if start < 4 {
                    frame[..4].copy_from_slice(&(*value as u32).to_le_bytes());
                } else if start + 8 <= len {
                    frame[start..start + 8].copy_from_slice(&value.to_le_bytes());
                }
            }
            _ => {}
        }
    }
}

/// After the edits, the prefix may be made to announce the body that follows again, so the
/// decoder (not only the framing) sees the damage.
fn refit(frame: &mut [u8]) {
    if frame.len() >= 4 {
        let body = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&body.to_le_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// The properties.

#[test]
fn valid_messages_round_trip_through_both_readers() {
    fuzz!(
        "valid messages",
        CASES,
        proptest::collection::vec(message(), 1..4),
        |messages| {
            let _measured = Measured::start();
            let mut stream = Vec::new();
            for m in &messages {
                stream.extend_from_slice(&m.frame());
            }
            let mut rest = stream.as_slice();
            for m in &messages {
                match m {
                    Message::Request(expected) => {
                        let (got, used) = read_both::<Request>(rest);
                        prop_assert_eq!(&got.unwrap(), expected);
                        rest = &rest[used..];
                    }
                    Message::Reply(expected) => {
                        let (got, used) = read_both::<Reply>(rest);
                        prop_assert_eq!(&got.unwrap(), expected);
                        rest = &rest[used..];
                    }
                }
            }
            let (end, _) = read_both::<Request>(rest);
            prop_assert!(matches!(end, Err(FrameError::Closed)), "{end:?}");
            Ok(format!("{} messages", messages.len()))
        },
    );
}

#[test]
fn a_valid_frame_cut_anywhere_is_truncated() {
    fuzz!("cut frames", CASES, (message(), any::<u64>()), |(
        message,
        at,
    )| {
        let _measured = Measured::start();
        let frame = message.frame();
        let cut = position(at, frame.len());
        let (result, _) = read_both::<Request>(&frame[..cut]);
        match result {
            Err(FrameError::Closed) => prop_assert_eq!(cut, 0),
            Err(FrameError::Truncated { expected, got }) => {
                prop_assert_eq!(got, cut);
                prop_assert_eq!(expected, if cut < 4 { 4 } else { frame.len() });
            }
            other => prop_assert!(false, "cut at {cut} of {}: {other:?}", frame.len()),
        }
        Ok(if cut < 4 {
            "in the prefix"
        } else {
            "in the body"
        }
        .to_owned())
    },);
}

#[test]
fn arbitrary_bytes_are_refused_or_decoded_canonically() {
    let input = prop_oneof![
        // Anything at all.
        proptest::collection::vec(any::<u8>(), 0..96),
        // A prefix that fits what follows, so the body reaches the decoder.
        proptest::collection::vec(any::<u8>(), 0..96).prop_map(|body| {
            let mut frame = (body.len() as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(&body);
            frame
        }),
        // A variant index that exists, then anything.
        (0u32..8, proptest::collection::vec(any::<u8>(), 0..96)).prop_map(|(variant, rest)| {
            let mut body = variant.to_le_bytes().to_vec();
            body.extend_from_slice(&rest);
            let mut frame = (body.len() as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(&body);
            frame
        }),
    ];
    fuzz!("arbitrary bytes", CASES, (input, any::<bool>()), |(
        bytes,
        as_request,
    )| {
        let measured = Measured::start();
        let outcome = if as_request {
            check_any::<Request>(&bytes, &measured)
        } else {
            check_any::<Reply>(&bytes, &measured)
        };
        Ok(format!(
            "{}: {outcome}",
            if as_request { "request" } else { "reply" }
        ))
    },);
}

#[test]
fn mutated_valid_frames_are_refused_or_decoded_canonically() {
    fuzz!(
        "mutated frames",
        CASES,
        (
            message(),
            proptest::collection::vec(edit(), 1..4),
            any::<bool>(),
            any::<bool>(),
        ),
        |(message, edits, refit_prefix, other_direction)| {
            let measured = Measured::start();
            let mut frame = message.frame();
            apply(&mut frame, &edits);
            if refit_prefix {
                refit(&mut frame);
            }
            // Read as the type it was (the usual case) or as the other direction's.
            let as_request = matches!(message, Message::Request(_)) != other_direction;
            let outcome = if as_request {
                check_any::<Request>(&frame, &measured)
            } else {
                check_any::<Reply>(&frame, &measured)
            };
            Ok(outcome)
        },
    );
}

/// The largest frame and lengths claiming more than any frame holds, one by one.
#[test]
fn extreme_lengths_stay_within_two_frames_of_memory() {
    let _run = exclusive();
    let measured = Measured::start();
    // A prefix announcing exactly MAX_FRAME, then nothing: the body is allocated (the limit is
    // what bounds it) and the frame is truncated.
    let (result, _) = read_both::<Request>(&(MAX_FRAME as u32).to_le_bytes());
    assert!(
        matches!(result, Err(FrameError::Truncated { got: 4, .. })),
        "{result:?}"
    );
    assert!(measured.growth() <= MAX_FRAME + (1 << 20));
    // An Invoke whose string and payload lengths claim up to the decoder's limit.
    for claim in [MAX_FRAME as u64 - 64, MAX_FRAME as u64, u64::MAX / 2] {
        for field in 0..4 {
            let measured = Measured::start();
            let mut body = 3u32.to_le_bytes().to_vec(); // Invoke
            for i in 0..4 {
                // request_id, (deadline), function_arn, client_context, payload
                if i == 1 {
                    body.extend_from_slice(&0u64.to_le_bytes());
                }
                let len = if i == field { claim } else { 0 };
                body.extend_from_slice(&len.to_le_bytes());
            }
            let mut frame = (body.len() as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(&body);
            let outcome = check_any::<Request>(&frame, &measured);
            assert!(
                outcome.starts_with("Decode"),
                "{claim} in field {field}: {outcome}"
            );
        }
    }
}

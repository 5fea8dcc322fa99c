//! Tests of `protocol.rs`, kept apart so the module itself stays short.

use super::*;

fn all_messages() -> Vec<Message<'static>> {
    let failure = Failure {
        error_type: "Runtime.AfterRestoreError",
        body: br#"{"errorMessage":"boom","errorType":"Exception"}"#,
    };
    vec![
        Message::Hello {
            agent: "thaw-init/0.1.0",
            init_type: InitType::SnapStart,
        },
        Message::Ready,
        Message::SnapshotReady,
        Message::RestoreDone,
        Message::Response {
            request_id: "req-1",
            payload: b"{\"ok\":true}",
        },
        Message::InvokeError {
            request_id: "req-2",
            failure,
        },
        Message::InitError(failure),
        Message::RestoreError(failure),
        Message::CheckpointError(failure),
        Message::Checkpoint,
        Message::Restored(Restored {
            entropy: &[7u8; 64],
            wall_clock_ns: 1_795_000_000_000_000_000,
            restore_id: "r-42",
        }),
        Message::Invoke(Invoke {
            request_id: "req-3",
            deadline_ms: 1_795_000_000_123,
            function_arn: "arn:aws:lambda:us-east-1:123456789012:function:f",
            trace_id: "Root=1-5e1b4151-5ac6c58f5b5daa6532e4f9f3",
            client_context: "",
            cognito_identity: "",
            payload: b"hello",
        }),
        Message::Shutdown,
    ]
}

fn round_trip(m: &Message) -> Vec<u8> {
    let frame = m.encode().unwrap();
    assert_eq!(frame.len(), m.frame_len());
    let header = Header::decode(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
    assert_eq!(header.kind, m.kind());
    assert_eq!(header.length as usize, frame.len() - HEADER_LEN);
    assert_eq!(
        &Message::decode(header.kind, &frame[HEADER_LEN..]).unwrap(),
        m
    );
    frame
}

#[test]
fn every_message_round_trips() {
    for m in all_messages() {
        round_trip(&m);
    }
}

#[test]
fn header_layout_is_pinned() {
    let frame = round_trip(&Message::Ready);
    assert_eq!(
        frame,
        [b'T', b'H', b'A', b'W', 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    let frame = round_trip(&Message::Response {
        request_id: "a",
        payload: b"xy",
    });
    assert_eq!(&frame[8..12], &11u32.to_le_bytes());
    assert_eq!(&frame[16..], &[1, 0, 0, 0, b'a', 2, 0, 0, 0, b'x', b'y']);
}

#[test]
fn rejects_bad_headers() {
    let good = Message::Ready.encode().unwrap();
    let header = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut h = good.clone();
        f(&mut h);
        Header::decode(h[..HEADER_LEN].try_into().unwrap())
    };
    assert!(matches!(
        header(&|h| h[0] = b'X'),
        Err(ProtocolError::BadMagic(_))
    ));
    assert_eq!(
        header(&|h| h[4] = 2),
        Err(ProtocolError::UnsupportedVersion(2))
    );
    assert_eq!(
        header(&|h| h[6] = 0x7f),
        Err(ProtocolError::UnknownKind(0x7f))
    );
    assert_eq!(header(&|h| h[12] = 1), Err(ProtocolError::UnknownFlags(1)));
    assert!(matches!(
        header(&|h| h[8..12].copy_from_slice(&u32::MAX.to_le_bytes())),
        Err(ProtocolError::BodyTooLarge(_))
    ));
}

#[test]
fn rejects_truncated_and_overlong_bodies() {
    for m in all_messages() {
        let frame = m.encode().unwrap();
        let body = &frame[HEADER_LEN..];
        for cut in 0..body.len() {
            assert!(
                Message::decode(m.kind(), &body[..cut]).is_err(),
                "{m:?} cut at {cut}"
            );
        }
        let mut longer = body.to_vec();
        longer.push(0);
        assert_eq!(
            Message::decode(m.kind(), &longer),
            Err(ProtocolError::TrailingBytes(1))
        );
    }
}

#[test]
fn refuses_payloads_over_six_mib() {
    let big = vec![0u8; MAX_PAYLOAD + 1];
    let m = Message::Response {
        request_id: "r",
        payload: &big,
    };
    assert_eq!(
        m.encode(),
        Err(ProtocolError::PayloadTooLarge(MAX_PAYLOAD + 1))
    );
    // A peer that ignores the limit is caught on decode.
    let mut body = vec![1, 0, 0, 0, b'r'];
    body.extend_from_slice(&((MAX_PAYLOAD + 1) as u32).to_le_bytes());
    assert_eq!(
        Message::decode(Kind::Response, &body),
        Err(ProtocolError::PayloadTooLarge(MAX_PAYLOAD + 1))
    );
    let exact = vec![0u8; MAX_PAYLOAD];
    round_trip(&Message::Response {
        request_id: "r",
        payload: &exact,
    });
}

#[test]
fn rejects_bad_strings_and_values() {
    assert_eq!(
        Message::decode(Kind::Hello, &[2, 0, 0, 0, 0xff, 0xfe, 0]),
        Err(ProtocolError::NotUtf8)
    );
    assert_eq!(
        Message::decode(Kind::Hello, &[1, 0, 0, 0, b'a', 9]),
        Err(ProtocolError::BadValue)
    );
    let weak = Message::Restored(Restored {
        entropy: &[1; 8],
        wall_clock_ns: 0,
        restore_id: "x",
    });
    assert_eq!(weak.encode(), Err(ProtocolError::BadValue));
}

#[test]
fn encode_into_reports_the_size_it_needs() {
    let m = Message::Response {
        request_id: "id",
        payload: b"abc",
    };
    let mut small = [0u8; 8];
    assert_eq!(
        m.encode_into(&mut small),
        Err(ProtocolError::BufferTooSmall {
            needed: m.frame_len()
        })
    );
}

#[test]
fn frames_cross_a_stream_and_malformed_ones_are_refused() {
    use super::io::{FrameError, read_frame, write_message};
    let mut wire = Vec::new();
    for m in all_messages() {
        write_message(&mut wire, &m).unwrap();
    }
    let mut reader = &wire[..];
    for m in all_messages() {
        assert_eq!(read_frame(&mut reader).unwrap().message().unwrap(), m);
    }
    assert!(matches!(read_frame(&mut reader), Err(FrameError::Io(_))));

    let mut bad = Message::Ready.encode().unwrap();
    bad[0] = 0;
    assert!(matches!(
        read_frame(&mut &bad[..]),
        Err(FrameError::Protocol(ProtocolError::BadMagic(_)))
    ));
    // A Response whose body is cut short is refused before anyone sees it.
    let mut short = Message::Response {
        request_id: "r",
        payload: b"abc",
    }
    .encode()
    .unwrap();
    short[8] -= 1;
    short.pop();
    assert!(matches!(
        read_frame(&mut &short[..]),
        Err(FrameError::Protocol(_))
    ));
}

#[test]
fn direction_follows_the_kind_value() {
    assert!(Kind::Hello.from_guest());
    assert!(Kind::CheckpointError.from_guest());
    assert!(!Kind::Invoke.from_guest());
    for v in 0..0x100u16 {
        if let Some(k) = Kind::from_u16(v) {
            assert_eq!(k as u16, v);
        }
    }
}

//! The host↔guest protocol, version 1: length-prefixed binary frames over a vsock stream.
//!
//! This module is the single definition both sides use: the host (`thaw`, `thawd`), the Linux
//! agent (`thaw-init`) and the `no_std` test guest. It never allocates, so it works without a
//! heap: encoding writes into a caller's buffer and decoding borrows from one. The layout below
//! is normative and repeated in `docs/guest-protocol.md`.
//!
//! ```text
//! frame   = header body
//! header  = magic:u32 ("THAW" = 54 48 41 57) version:u16 (1) kind:u16 length:u32 flags:u32 (0)
//! body    = the fields of `kind`, in order, `length` bytes in all
//! u8/u16/u32/u64: little-endian;  bytes = len:u32 data[len];  string = bytes, UTF-8
//! ```

use core::fmt;

/// `"THAW"` as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"THAW");
/// The protocol version this module speaks.
pub const VERSION: u16 = 1;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 16;
/// Largest invocation request or response payload, as AWS Lambda's synchronous invoke (6 MiB).
pub const MAX_PAYLOAD: usize = 6 * 1024 * 1024;
/// Largest frame body: a maximal payload plus room for the other fields.
pub const MAX_BODY: usize = MAX_PAYLOAD + 64 * 1024;
/// Largest string field (request ids, ARNs, error types, contexts).
pub const MAX_STRING: usize = 32 * 1024;
/// The vsock port on the host (CID 2) that guest agents connect to.
pub const AGENT_PORT: u32 = 9000;
/// The error type of an `InvokeError` whose runtime process exited (Lambda's wording). Such an
/// environment cannot answer again: the host discards it, as Lambda resets an execution
/// environment whose runtime exited.
pub const RUNTIME_EXIT_ERROR: &str = "Runtime.ExitError";

/// A frame kind. Guest-to-host kinds are below 0x10, host-to-guest kinds from 0x10.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// G→H: the agent is connected (first frame on every connection).
    Hello = 0x01,
    /// G→H: the function's init finished; invocations may be sent.
    Ready = 0x02,
    /// G→H: before-checkpoint hooks ran; the guest is quiescent and may be snapshotted.
    SnapshotReady = 0x03,
    /// G→H: after-restore hooks ran; invocations may be sent.
    RestoreDone = 0x04,
    /// G→H: an invocation's result.
    Response = 0x05,
    /// G→H: an invocation failed.
    InvokeError = 0x06,
    /// G→H: the function's init failed.
    InitError = 0x07,
    /// G→H: after-restore hooks failed.
    RestoreError = 0x08,
    /// G→H: before-checkpoint hooks failed.
    CheckpointError = 0x09,
    /// H→G: prepare for a snapshot (run before-checkpoint hooks).
    Checkpoint = 0x10,
    /// H→G: this guest was restored from a snapshot; make it unique again.
    Restored = 0x11,
    /// H→G: run one invocation.
    Invoke = 0x12,
    /// H→G: stop the runtime and end the VM.
    Shutdown = 0x13,
}

impl Kind {
    /// The kind with wire value `value`.
    pub fn from_u16(value: u16) -> Option<Self> {
        Some(match value {
            0x01 => Kind::Hello,
            0x02 => Kind::Ready,
            0x03 => Kind::SnapshotReady,
            0x04 => Kind::RestoreDone,
            0x05 => Kind::Response,
            0x06 => Kind::InvokeError,
            0x07 => Kind::InitError,
            0x08 => Kind::RestoreError,
            0x09 => Kind::CheckpointError,
            0x10 => Kind::Checkpoint,
            0x11 => Kind::Restored,
            0x12 => Kind::Invoke,
            0x13 => Kind::Shutdown,
            _ => return None,
        })
    }

    /// Whether the guest sends this kind (the host sends the others).
    pub fn from_guest(self) -> bool {
        (self as u16) < 0x10
    }
}

/// How the function's environment was initialized (Lambda's `AWS_LAMBDA_INITIALIZATION_TYPE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum InitType {
    /// Booted for immediate use.
    OnDemand = 0,
    /// Booted to be snapshotted.
    SnapStart = 1,
}

/// A frame could not be decoded or encoded. Whoever receives a malformed frame closes the
/// connection (after logging this), since the stream can no longer be trusted to be in sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// The header does not start with `"THAW"`.
    BadMagic(u32),
    /// A version this side does not speak.
    UnsupportedVersion(u16),
    /// A kind this version does not define.
    UnknownKind(u16),
    /// Reserved flag bits are set.
    UnknownFlags(u32),
    /// The body is longer than `MAX_BODY`.
    BodyTooLarge(u32),
    /// A field runs past the end of the body.
    Truncated,
    /// Bytes remain after the last field.
    TrailingBytes(usize),
    /// A string field is not UTF-8.
    NotUtf8,
    /// A string field is longer than `MAX_STRING`.
    StringTooLong(usize),
    /// A payload is longer than `MAX_PAYLOAD`.
    PayloadTooLarge(usize),
    /// An enumerated field has an undefined value.
    BadValue,
    /// The output buffer is too small for the frame.
    BufferTooSmall {
        /// Bytes the frame needs.
        needed: usize,
    },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::BadMagic(m) => write!(f, "bad frame magic {m:#010x}"),
            ProtocolError::UnsupportedVersion(v) => write!(f, "unsupported protocol version {v}"),
            ProtocolError::UnknownKind(k) => write!(f, "unknown frame kind {k:#06x}"),
            ProtocolError::UnknownFlags(x) => write!(f, "reserved flag bits set: {x:#x}"),
            ProtocolError::BodyTooLarge(n) => {
                write!(
                    f,
                    "frame body of {n} bytes exceeds the {MAX_BODY}-byte limit"
                )
            }
            ProtocolError::Truncated => write!(f, "a field runs past the end of the frame"),
            ProtocolError::TrailingBytes(n) => write!(f, "{n} bytes after the last field"),
            ProtocolError::NotUtf8 => write!(f, "a string field is not UTF-8"),
            ProtocolError::StringTooLong(n) => {
                write!(f, "a string field of {n} bytes exceeds {MAX_STRING}")
            }
            ProtocolError::PayloadTooLarge(n) => {
                write!(
                    f,
                    "payload of {n} bytes exceeds the {MAX_PAYLOAD}-byte limit"
                )
            }
            ProtocolError::BadValue => write!(f, "an enumerated field has an undefined value"),
            ProtocolError::BufferTooSmall { needed } => {
                write!(f, "output buffer too small: {needed} bytes needed")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ProtocolError {}

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The frame's kind.
    pub kind: Kind,
    /// Its body length.
    pub length: u32,
}

impl Header {
    /// Checks and decodes a frame header.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, ProtocolError> {
        let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
        let u32_at =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let version = u16_at(4);
        if version != VERSION {
            return Err(ProtocolError::UnsupportedVersion(version));
        }
        let kind = Kind::from_u16(u16_at(6)).ok_or(ProtocolError::UnknownKind(u16_at(6)))?;
        let length = u32_at(8);
        if length as usize > MAX_BODY {
            return Err(ProtocolError::BodyTooLarge(length));
        }
        let flags = u32_at(12);
        if flags != 0 {
            return Err(ProtocolError::UnknownFlags(flags));
        }
        Ok(Header { kind, length })
    }

    /// Encodes this header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        out[8..12].copy_from_slice(&self.length.to_le_bytes());
        out
    }
}

/// An invocation request (H→G `Invoke`), with Lambda's `Lambda-Runtime-*` values. The one
/// type an invocation has on the guest wire: the host builds it from borrowed parts
/// (`host::AgentConnection::invoke`), and the agent keeps the frame it came in and reads it
/// back through this type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Invoke<'a> {
    /// `Lambda-Runtime-Aws-Request-Id`.
    pub request_id: &'a str,
    /// `Lambda-Runtime-Deadline-Ms`: Unix time in milliseconds.
    pub deadline_ms: u64,
    /// `Lambda-Runtime-Invoked-Function-Arn`.
    pub function_arn: &'a str,
    /// `Lambda-Runtime-Trace-Id` (empty when absent).
    pub trace_id: &'a str,
    /// `Lambda-Runtime-Client-Context` (empty when absent).
    pub client_context: &'a str,
    /// `Lambda-Runtime-Cognito-Identity` (empty when absent).
    pub cognito_identity: &'a str,
    /// The event.
    pub payload: &'a [u8],
}

/// What the host hands a restored guest (H→G `Restored`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Restored<'a> {
    /// Fresh random bytes for the guest's RNG (at least 32).
    pub entropy: &'a [u8],
    /// The host's wall-clock time, Unix nanoseconds.
    pub wall_clock_ns: u64,
    /// A new id, unique to this restore.
    pub restore_id: &'a str,
}

/// Fewest entropy bytes a `Restored` frame may carry.
pub const MIN_ENTROPY: usize = 32;

/// A failure reported by the guest: Lambda's `errorType` and the error document (Lambda's
/// `{"errorMessage": ..., "errorType": ..., "stackTrace": [...]}` JSON, as the runtime sent it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure<'a> {
    /// e.g. `Runtime.Unknown`, `Runtime.AfterRestoreError`, or the runtime's own type.
    pub error_type: &'a str,
    /// The error document.
    pub body: &'a [u8],
}

/// One frame, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// G→H: `agent:string init_type:u8`.
    Hello {
        /// Agent name and version, e.g. `thaw-init/0.1.0`.
        agent: &'a str,
        /// How the environment is being initialized.
        init_type: InitType,
    },
    /// G→H: empty.
    Ready,
    /// G→H: empty.
    SnapshotReady,
    /// G→H: empty.
    RestoreDone,
    /// G→H: `request_id:string payload:bytes`.
    Response {
        /// The invocation.
        request_id: &'a str,
        /// Its result.
        payload: &'a [u8],
    },
    /// G→H: `request_id:string error_type:string body:bytes`.
    InvokeError {
        /// The invocation.
        request_id: &'a str,
        /// What went wrong.
        failure: Failure<'a>,
    },
    /// G→H: `error_type:string body:bytes`.
    InitError(Failure<'a>),
    /// G→H: `error_type:string body:bytes`.
    RestoreError(Failure<'a>),
    /// G→H: `error_type:string body:bytes`.
    CheckpointError(Failure<'a>),
    /// H→G: empty.
    Checkpoint,
    /// H→G: `entropy:bytes wall_clock_ns:u64 restore_id:string`.
    Restored(Restored<'a>),
    /// H→G: `request_id:string deadline_ms:u64 function_arn:string trace_id:string
    /// client_context:string cognito_identity:string payload:bytes`.
    Invoke(Invoke<'a>),
    /// H→G: empty.
    Shutdown,
}

/// Reads fields from a body.
struct Reader<'a> {
    body: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.body.len() < n {
            return Err(ProtocolError::Truncated);
        }
        let (head, rest) = self.body.split_at(n);
        self.body = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, ProtocolError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn bytes(&mut self, max: usize) -> Result<&'a [u8], ProtocolError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(if max == MAX_STRING {
                ProtocolError::StringTooLong(len)
            } else {
                ProtocolError::PayloadTooLarge(len)
            });
        }
        self.take(len)
    }

    fn string(&mut self) -> Result<&'a str, ProtocolError> {
        core::str::from_utf8(self.bytes(MAX_STRING)?).map_err(|_| ProtocolError::NotUtf8)
    }

    fn failure(&mut self) -> Result<Failure<'a>, ProtocolError> {
        Ok(Failure {
            error_type: self.string()?,
            body: self.bytes(MAX_PAYLOAD)?,
        })
    }

    fn finish(self) -> Result<(), ProtocolError> {
        match self.body.len() {
            0 => Ok(()),
            n => Err(ProtocolError::TrailingBytes(n)),
        }
    }
}

/// Writes fields into a buffer, or only counts them when the buffer is `None`.
struct Writer<'b> {
    out: Option<&'b mut [u8]>,
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, data: &[u8]) {
        if let Some(out) = self.out.as_deref_mut() {
            if let Some(dest) = out.get_mut(self.at..self.at + data.len()) {
                dest.copy_from_slice(data);
            }
        }
        self.at += data.len();
    }

    fn u8(&mut self, v: u8) {
        self.put(&[v]);
    }

    fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }

    fn bytes(&mut self, data: &[u8]) {
        self.put(&(data.len() as u32).to_le_bytes());
        self.put(data);
    }

    fn failure(&mut self, f: &Failure) {
        self.bytes(f.error_type.as_bytes());
        self.bytes(f.body);
    }
}

impl<'a> Message<'a> {
    /// The frame kind of this message.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello { .. } => Kind::Hello,
            Message::Ready => Kind::Ready,
            Message::SnapshotReady => Kind::SnapshotReady,
            Message::RestoreDone => Kind::RestoreDone,
            Message::Response { .. } => Kind::Response,
            Message::InvokeError { .. } => Kind::InvokeError,
            Message::InitError(_) => Kind::InitError,
            Message::RestoreError(_) => Kind::RestoreError,
            Message::CheckpointError(_) => Kind::CheckpointError,
            Message::Checkpoint => Kind::Checkpoint,
            Message::Restored(_) => Kind::Restored,
            Message::Invoke(_) => Kind::Invoke,
            Message::Shutdown => Kind::Shutdown,
        }
    }

    /// Decodes the body of a frame of `kind`.
    pub fn decode(kind: Kind, body: &'a [u8]) -> Result<Self, ProtocolError> {
        if body.len() > MAX_BODY {
            return Err(ProtocolError::BodyTooLarge(body.len() as u32));
        }
        let mut r = Reader { body };
        let message = match kind {
            Kind::Hello => Message::Hello {
                agent: r.string()?,
                init_type: match r.u8()? {
                    0 => InitType::OnDemand,
                    1 => InitType::SnapStart,
                    _ => return Err(ProtocolError::BadValue),
                },
            },
            Kind::Ready => Message::Ready,
            Kind::SnapshotReady => Message::SnapshotReady,
            Kind::RestoreDone => Message::RestoreDone,
            Kind::Response => Message::Response {
                request_id: r.string()?,
                payload: r.bytes(MAX_PAYLOAD)?,
            },
            Kind::InvokeError => Message::InvokeError {
                request_id: r.string()?,
                failure: r.failure()?,
            },
            Kind::InitError => Message::InitError(r.failure()?),
            Kind::RestoreError => Message::RestoreError(r.failure()?),
            Kind::CheckpointError => Message::CheckpointError(r.failure()?),
            Kind::Checkpoint => Message::Checkpoint,
            Kind::Restored => {
                let restored = Restored {
                    entropy: r.bytes(MAX_STRING)?,
                    wall_clock_ns: r.u64()?,
                    restore_id: r.string()?,
                };
                if restored.entropy.len() < MIN_ENTROPY {
                    return Err(ProtocolError::BadValue);
                }
                Message::Restored(restored)
            }
            Kind::Invoke => Message::Invoke(Invoke {
                request_id: r.string()?,
                deadline_ms: r.u64()?,
                function_arn: r.string()?,
                trace_id: r.string()?,
                client_context: r.string()?,
                cognito_identity: r.string()?,
                payload: r.bytes(MAX_PAYLOAD)?,
            }),
            Kind::Shutdown => Message::Shutdown,
        };
        r.finish()?;
        Ok(message)
    }

    fn write_body(&self, w: &mut Writer) {
        match self {
            Message::Hello { agent, init_type } => {
                w.bytes(agent.as_bytes());
                w.u8(*init_type as u8);
            }
            Message::Response {
                request_id,
                payload,
            } => {
                w.bytes(request_id.as_bytes());
                w.bytes(payload);
            }
            Message::InvokeError {
                request_id,
                failure,
            } => {
                w.bytes(request_id.as_bytes());
                w.failure(failure);
            }
            Message::InitError(f) | Message::RestoreError(f) | Message::CheckpointError(f) => {
                w.failure(f)
            }
            Message::Restored(r) => {
                w.bytes(r.entropy);
                w.u64(r.wall_clock_ns);
                w.bytes(r.restore_id.as_bytes());
            }
            Message::Invoke(i) => {
                w.bytes(i.request_id.as_bytes());
                w.u64(i.deadline_ms);
                w.bytes(i.function_arn.as_bytes());
                w.bytes(i.trace_id.as_bytes());
                w.bytes(i.client_context.as_bytes());
                w.bytes(i.cognito_identity.as_bytes());
                w.bytes(i.payload);
            }
            Message::Ready
            | Message::SnapshotReady
            | Message::RestoreDone
            | Message::Checkpoint
            | Message::Shutdown => {}
        }
    }

    /// Checks the limits a sender must respect (string and payload sizes).
    fn check_limits(&self) -> Result<(), ProtocolError> {
        let string = |s: &str| {
            if s.len() > MAX_STRING {
                Err(ProtocolError::StringTooLong(s.len()))
            } else {
                Ok(())
            }
        };
        let payload = |p: &[u8]| {
            if p.len() > MAX_PAYLOAD {
                Err(ProtocolError::PayloadTooLarge(p.len()))
            } else {
                Ok(())
            }
        };
        match self {
            Message::Hello { agent, .. } => string(agent),
            Message::Response {
                request_id,
                payload: p,
            } => string(request_id).and(payload(p)),
            Message::InvokeError {
                request_id,
                failure,
            } => string(request_id)
                .and(string(failure.error_type))
                .and(payload(failure.body)),
            Message::InitError(f) | Message::RestoreError(f) | Message::CheckpointError(f) => {
                string(f.error_type).and(payload(f.body))
            }
            Message::Restored(r) => {
                if r.entropy.len() < MIN_ENTROPY || r.entropy.len() > MAX_STRING {
                    return Err(ProtocolError::BadValue);
                }
                string(r.restore_id)
            }
            Message::Invoke(i) => string(i.request_id)
                .and(string(i.function_arn))
                .and(string(i.trace_id))
                .and(string(i.client_context))
                .and(string(i.cognito_identity))
                .and(payload(i.payload)),
            _ => Ok(()),
        }
    }

    /// Bytes the whole frame (header and body) takes.
    pub fn frame_len(&self) -> usize {
        let mut w = Writer { out: None, at: 0 };
        self.write_body(&mut w);
        HEADER_LEN + w.at
    }

    /// Encodes the whole frame into `out`; returns its length.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<usize, ProtocolError> {
        self.check_limits()?;
        let needed = self.frame_len();
        if out.len() < needed {
            return Err(ProtocolError::BufferTooSmall { needed });
        }
        let header = Header {
            kind: self.kind(),
            length: (needed - HEADER_LEN) as u32,
        };
        out[..HEADER_LEN].copy_from_slice(&header.encode());
        let mut w = Writer {
            out: Some(&mut out[HEADER_LEN..needed]),
            at: 0,
        };
        self.write_body(&mut w);
        Ok(needed)
    }

    /// Encodes the whole frame.
    #[cfg(feature = "std")]
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let mut out = vec![0u8; self.frame_len()];
        self.encode_into(&mut out)?;
        Ok(out)
    }
}

/// Blocking frame I/O over any byte stream (vsock, Unix socket, TCP).
#[cfg(feature = "std")]
pub mod io {
    use std::io::{Read, Write};

    use super::{HEADER_LEN, Header, Kind, Message, ProtocolError};

    /// Reading or writing a frame failed.
    #[derive(Debug)]
    pub enum FrameError {
        /// The stream failed or ended.
        Io(std::io::Error),
        /// The peer sent a malformed frame; the connection must be closed.
        Protocol(ProtocolError),
    }

    impl std::fmt::Display for FrameError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                FrameError::Io(e) => write!(f, "frame I/O failed: {e}"),
                FrameError::Protocol(e) => write!(f, "malformed frame: {e}"),
            }
        }
    }

    impl std::error::Error for FrameError {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            match self {
                FrameError::Io(e) => Some(e),
                FrameError::Protocol(e) => Some(e),
            }
        }
    }

    impl From<std::io::Error> for FrameError {
        fn from(e: std::io::Error) -> Self {
            FrameError::Io(e)
        }
    }

    impl From<ProtocolError> for FrameError {
        fn from(e: ProtocolError) -> Self {
            FrameError::Protocol(e)
        }
    }

    /// A received frame: its kind and body. Decode it with [`Frame::message`].
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Frame {
        /// The frame kind.
        pub kind: Kind,
        /// The body bytes.
        pub body: Vec<u8>,
    }

    impl Frame {
        /// Decodes the body.
        pub fn message(&self) -> Result<Message<'_>, ProtocolError> {
            Message::decode(self.kind, &self.body)
        }
    }

    /// Reads one frame. The header is checked before the body is allocated, so a peer cannot
    /// make this allocate more than `MAX_BODY` bytes.
    pub fn read_frame(stream: &mut impl Read) -> Result<Frame, FrameError> {
        let mut header = [0u8; HEADER_LEN];
        stream.read_exact(&mut header)?;
        let header = Header::decode(&header)?;
        let mut body = vec![0u8; header.length as usize];
        stream.read_exact(&mut body)?;
        // Decode once so a malformed body is reported here, not later by the consumer.
        Message::decode(header.kind, &body)?;
        Ok(Frame {
            kind: header.kind,
            body,
        })
    }

    /// Writes one message as a frame.
    pub fn write_message(stream: &mut impl Write, message: &Message) -> Result<(), FrameError> {
        let frame = message.encode()?;
        stream.write_all(&frame)?;
        stream.flush()?;
        Ok(())
    }
}

#[cfg(test)]
#[path = "protocol_tests.rs"]
mod tests;

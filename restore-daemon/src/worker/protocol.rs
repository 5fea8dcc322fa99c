//! What `thawd` and a worker process say to each other over the worker's stdin and stdout:
//! one request, then its one reply, in order. Each message is a frame: a 4-byte little-endian
//! length, then that many bytes of bincode (serde, standard config, little-endian, fixed-width
//! integers). Frames over [`MAX_FRAME`] are refused by both sides.
//!
//! The worker reads and writes frames with blocking I/O ([`read_frame`], [`write_frame`]); the
//! daemon with tokio ([`read_frame_async`], [`write_frame_async`]). Both share the checks, so
//! they accept and refuse exactly the same bytes.

use std::io::{Read, Write};
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::decoded_copy::CopyTicket;
use crate::restore::MemoryMode;
use hooks_sdk::host::InvokeOutcome;

/// `Vec<u8>` fields as one byte string. On the wire this is what serde's default gives (a u64
/// length, then the bytes), but encoded and decoded in one copy instead of one call per byte,
/// which costs about 30 ms each way for a 6 MB payload in a release build.
mod bulk {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::ser::Serializer;

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_byte_buf(Bytes)
    }

    struct Bytes;

    impl<'de> Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        // Formats without a bytes type send a sequence.
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(b) = seq.next_element()? {
                v.push(b);
            }
            Ok(v)
        }
    }
}

/// The largest frame either side accepts: a 6 MB payload plus its envelope and console bytes.
pub const MAX_FRAME: usize = 16 << 20;

/// Memory mode of a restore, as `restore_daemon::restore::MemoryMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireMemoryMode {
    /// All memory decoded before the guest runs.
    Eager,
    /// Memory paged in through userfaultfd (working set first, then prefetch).
    Lazy,
}

/// The daemon's requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Build a machine shell of this size now, so a later `Restore` finds it ready. Sent to
    /// spare workers before any invocation needs them.
    Prepare {
        /// Guest memory in bytes.
        mem_bytes: u64,
        /// vCPUs.
        vcpus: u8,
    },
    /// Restore the snapshot now, up to a machine that could run, with memory mapped from the
    /// function's shared decoded copy (its memfd sent on the descriptor channel just before),
    /// but do not run it: the `Restore` that follows only starts the guest and waits for its
    /// agent. Answered `Prepared`. Sent to spare workers, so an invocation's restore skips
    /// opening the snapshot, the shell and the state.
    PrepareRestore {
        /// The snapshot directory.
        snapshot: PathBuf,
        /// The master key file; `None` for the host key (or an unencrypted snapshot).
        key_file: Option<PathBuf>,
        /// The decoded copy on the descriptor channel.
        shared_copy: CopyTicket,
    },
    /// Restore the snapshot and run the after-restore handshake; answered `Restored` once the
    /// environment is ready for invocations. After `PrepareRestore` of the same snapshot, only
    /// the guest is started (the other fields are not used again).
    Restore {
        /// The snapshot directory.
        snapshot: PathBuf,
        /// The master key file; `None` for the host key (or an unencrypted snapshot).
        key_file: Option<PathBuf>,
        /// How memory comes back.
        memory: WireMemoryMode,
        /// Budget for the after-restore hooks, ms (Lambda: 10 000).
        after_restore_timeout_ms: u64,
        /// The id of the snapshot whose every chunk the daemon authenticated when it
        /// registered the function: a lazy restore then checks each chunk only as it installs
        /// it (`ChunkCheck::OnInstall`) instead of reading the whole file again first, and a
        /// file with another id (replaced since) is refused.
        verified: Option<[u8; 16]>,
        /// Guest memory comes from a decoded copy of the snapshot shared by the function's
        /// environments: its sealed memfd was sent on the descriptor channel just before this
        /// request (`super::copy_channel`), and `memory` applies only if it cannot be used.
        shared_copy: Option<CopyTicket>,
    },
    /// Run one invocation; answered `Invoked`, or `Failed` if it got no answer.
    Invoke(Invoke),
    /// Pause every vCPU (Lambda's freeze of an idle environment); answered `Frozen`.
    Freeze,
    /// Resume them; answered `Thawed`.
    Thaw,
    /// Ask the guest to power off, stop the VM and exit; answered `ShutDown` just before the
    /// worker exits.
    Shutdown,
}

/// One invocation on the worker pipe: the daemon's [`Invocation`](crate::daemon::Invocation)
/// with what the daemon adds (deadline, ARN, time limit). The worker hands the guest the same
/// values as the guest wire's [`hooks_sdk::protocol::Invoke`] ([`Invoke::wire`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoke {
    /// Lambda's request id.
    pub request_id: String,
    /// The deadline, Unix milliseconds.
    pub deadline_ms: u64,
    /// The function's ARN.
    pub function_arn: String,
    /// Client context, or empty.
    pub client_context: String,
    /// The event.
    #[serde(with = "bulk")]
    pub payload: Vec<u8>,
    /// How long the function may run, ms; past it the worker answers `Failed` with
    /// `FailureKind::InvokeTimeout`.
    pub timeout_ms: u64,
}

impl Invoke {
    /// The invocation as the guest wire carries it.
    pub fn wire(&self) -> hooks_sdk::protocol::Invoke<'_> {
        hooks_sdk::protocol::Invoke {
            request_id: &self.request_id,
            deadline_ms: self.deadline_ms,
            function_arn: &self.function_arn,
            client_context: &self.client_context,
            payload: &self.payload,
            ..Default::default()
        }
    }
}

/// The function's answer to one invocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireOutcome {
    /// The response payload.
    Response(#[serde(with = "bulk")] Vec<u8>),
    /// The function reported an error: its error type and error document.
    FunctionError {
        /// E.g. `Runtime.ExitError` or the runtime's own type.
        error_type: String,
        /// The error document (JSON).
        #[serde(with = "bulk")]
        body: Vec<u8>,
    },
}

impl WireOutcome {
    /// Whether the runtime process exited while answering: the environment cannot answer
    /// again.
    pub fn runtime_exited(&self) -> bool {
        matches!(self, WireOutcome::FunctionError { error_type, .. }
            if error_type == hooks_sdk::protocol::RUNTIME_EXIT_ERROR)
    }
}

/// What failed in a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// The snapshot could not be restored (refused, tampered, wrong key, host mismatch...).
    Restore,
    /// The after-restore hooks failed (`Runtime.AfterRestoreError`) or the agent misbehaved
    /// after the restore.
    AfterRestore {
        /// Lambda's error type.
        error_type: String,
    },
    /// The after-restore hooks did not finish within their budget.
    AfterRestoreTimeout,
    /// The invocation ran past its timeout.
    InvokeTimeout,
    /// The guest stopped (crashed, powered off) during the invocation.
    GuestEnded {
        /// Its exit code, if it exited through the debug-exit port.
        exit_code: Option<i32>,
    },
    /// The request came in the wrong state (e.g. `Invoke` before `Restore`).
    BadRequest,
    /// Anything else inside the worker.
    Internal,
}

/// The worker's replies, one per request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The shell is built.
    Prepared {
        /// How long it took, µs.
        shell_us: u64,
    },
    /// The environment is ready.
    Restored {
        /// From the start of the restore until the machine could run, µs.
        restore_us: u64,
        /// From the start until the after-restore hooks finished, µs.
        ready_us: u64,
        /// From the start until the agent's `Hello` (the guest's first sign of life), µs.
        hello_us: u64,
        /// Whether the restore found a prepared shell.
        shell_was_ready: bool,
    },
    /// The invocation was answered.
    Invoked {
        /// The answer.
        outcome: WireOutcome,
        /// From sending the event to the answer, µs.
        duration_us: u64,
        /// What the guest printed on its console during the invocation (at most 64 KiB: the
        /// end of it).
        #[serde(with = "bulk")]
        console: Vec<u8>,
        /// The worker's peak resident memory so far (`VmHWM`), bytes.
        max_memory_used_bytes: u64,
    },
    /// The vCPUs are paused.
    Frozen,
    /// The vCPUs run again.
    Thawed,
    /// The worker is about to exit.
    ShutDown,
    /// The request failed. After a failure of an environment (anything but `BadRequest`) the
    /// worker holds no usable guest: the daemon discards it.
    Failed {
        /// What failed.
        kind: FailureKind,
        /// The error, with its causes.
        message: String,
        /// The end of the guest's console (at most 4 KiB), for the caller's log.
        #[serde(with = "bulk")]
        console: Vec<u8>,
    },
}

impl From<MemoryMode> for WireMemoryMode {
    fn from(mode: MemoryMode) -> Self {
        match mode {
            MemoryMode::Eager => WireMemoryMode::Eager,
            MemoryMode::Lazy => WireMemoryMode::Lazy,
        }
    }
}

impl From<WireMemoryMode> for MemoryMode {
    fn from(mode: WireMemoryMode) -> Self {
        match mode {
            WireMemoryMode::Eager => MemoryMode::Eager,
            WireMemoryMode::Lazy => MemoryMode::Lazy,
        }
    }
}

impl From<InvokeOutcome> for WireOutcome {
    fn from(outcome: InvokeOutcome) -> Self {
        match outcome {
            InvokeOutcome::Response(payload) => WireOutcome::Response(payload),
            InvokeOutcome::Error { error_type, body } => {
                WireOutcome::FunctionError { error_type, body }
            }
        }
    }
}

/// Bytes of the length prefix.
const HEADER: usize = 4;

/// A frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended cleanly before a frame began: the peer went away.
    #[error("the peer closed the stream")]
    Closed,
    /// The stream ended inside a frame.
    #[error("the stream ended inside a frame: {got} of {expected} bytes")]
    Truncated {
        /// Bytes the frame should have had so far (the length prefix, or prefix and body).
        expected: usize,
        /// Bytes that came.
        got: usize,
    },
    /// The frame is longer than [`MAX_FRAME`]; nothing was allocated for it (when reading) or
    /// sent (when writing).
    #[error("a frame of {len} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// The frame's bytes are not a message of the expected type.
    #[error("the frame does not decode")]
    Decode(#[source] bincode::error::DecodeError),
    /// The message ended before its frame did.
    #[error("{extra} bytes follow the message in its frame")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// The message could not be encoded.
    #[error("the message does not encode")]
    Encode(#[source] bincode::error::EncodeError),
    /// Reading or writing the stream failed.
    #[error("the stream failed")]
    Io(#[from] std::io::Error),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        // Bounds what a length inside the message may make the decoder allocate.
        .with_limit::<MAX_FRAME>()
}

/// `message` as a whole frame: its length prefix, then its bytes.
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let body = bincode::serde::encode_to_vec(message, config()).map_err(FrameError::Encode)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge { len: body.len() });
    }
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge { len: body.len() })?;
    let mut frame = Vec::with_capacity(HEADER + body.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// The body length a complete header announces; `got` is how many header bytes came.
fn body_len(header: [u8; HEADER], got: usize) -> Result<usize, FrameError> {
    match got {
        0 => return Err(FrameError::Closed),
        HEADER => {}
        _ => {
            return Err(FrameError::Truncated {
                expected: HEADER,
                got,
            });
        }
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { len });
    }
    Ok(len)
}

fn decode_body<T: DeserializeOwned>(body: &[u8], got: usize) -> Result<T, FrameError> {
    if got < body.len() {
        return Err(FrameError::Truncated {
            expected: HEADER + body.len(),
            got: HEADER + got,
        });
    }
    let (message, used) =
        bincode::serde::decode_from_slice(body, config()).map_err(FrameError::Decode)?;
    match body.len() - used {
        0 => Ok(message),
        extra => Err(FrameError::TrailingBytes { extra }),
    }
}

/// Reads into `buf` until it is full or the stream ends; how many bytes came.
fn fill<R: Read + ?Sized>(reader: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

async fn fill_async<R: AsyncRead + Unpin + ?Sized>(
    reader: &mut R,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]).await {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads one frame and decodes its message (blocking).
pub fn read_frame<R: Read + ?Sized, T: DeserializeOwned>(reader: &mut R) -> Result<T, FrameError> {
    let mut header = [0; HEADER];
    let got = fill(reader, &mut header)?;
    let mut body = vec![0; body_len(header, got)?];
    let got = fill(reader, &mut body)?;
    decode_body(&body, got)
}

/// Writes `message` as one frame and flushes it (blocking).
pub fn write_frame<W: Write + ?Sized, T: Serialize>(
    writer: &mut W,
    message: &T,
) -> Result<(), FrameError> {
    writer.write_all(&encode_frame(message)?)?;
    writer.flush()?;
    Ok(())
}

/// Reads one frame and decodes its message.
pub async fn read_frame_async<R: AsyncRead + Unpin + ?Sized, T: DeserializeOwned>(
    reader: &mut R,
) -> Result<T, FrameError> {
    let mut header = [0; HEADER];
    let got = fill_async(reader, &mut header).await?;
    let mut body = vec![0; body_len(header, got)?];
    let got = fill_async(reader, &mut body).await?;
    decode_body(&body, got)
}

/// Writes `message` as one frame and flushes it.
pub async fn write_frame_async<W: AsyncWrite + Unpin + ?Sized, T: Serialize>(
    writer: &mut W,
    message: &T,
) -> Result<(), FrameError> {
    writer.write_all(&encode_frame(message)?).await?;
    writer.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_runtime_exit_error_means_the_runtime_is_gone() {
        let error = |error_type: &str| WireOutcome::FunctionError {
            error_type: error_type.into(),
            body: b"{}".to_vec(),
        };
        assert!(error("Runtime.ExitError").runtime_exited());
        assert!(!error("Exception").runtime_exited());
        assert!(!error("Runtime.Unknown").runtime_exited());
        assert!(!WireOutcome::Response(b"Runtime.ExitError".to_vec()).runtime_exited());
    }

    fn every_request() -> Vec<Request> {
        vec![
            Request::Prepare {
                mem_bytes: 128 << 20,
                vcpus: 2,
            },
            Request::Restore {
                snapshot: "/var/lib/thaw/f".into(),
                key_file: Some("/etc/thaw/k".into()),
                memory: WireMemoryMode::Lazy,
                after_restore_timeout_ms: 10_000,
                verified: Some([7; 16]),
                shared_copy: Some(CopyTicket {
                    snapshot_id: [7; 16],
                    mem_bytes: 128 << 20,
                }),
            },
            Request::Restore {
                snapshot: "s".into(),
                key_file: None,
                memory: WireMemoryMode::Eager,
                after_restore_timeout_ms: 0,
                verified: None,
                shared_copy: None,
            },
            Request::Invoke(Invoke {
                request_id: "5b1c".into(),
                deadline_ms: u64::MAX,
                function_arn: "arn:aws:lambda:us-east-1:123456789012:function:f".into(),
                client_context: String::new(),
                payload: (0..=255).collect(),
                timeout_ms: 3000,
            }),
            Request::Freeze,
            Request::Thaw,
            Request::Shutdown,
        ]
    }

    fn every_reply() -> Vec<Reply> {
        let failed = |kind| Reply::Failed {
            kind,
            message: "it broke: because".into(),
            console: b"last words\n".to_vec(),
        };
        vec![
            Reply::Prepared { shell_us: 8000 },
            Reply::Restored {
                restore_us: 1,
                ready_us: 2,
                hello_us: 4,
                shell_was_ready: true,
            },
            Reply::Invoked {
                outcome: WireOutcome::Response(b"{}".to_vec()),
                duration_us: 3,
                console: vec![0xff, 0],
                max_memory_used_bytes: 1 << 30,
            },
            Reply::Invoked {
                outcome: WireOutcome::FunctionError {
                    error_type: "Runtime.ExitError".into(),
                    body: b"{\"errorMessage\":\"x\"}".to_vec(),
                },
                duration_us: 0,
                console: Vec::new(),
                max_memory_used_bytes: 0,
            },
            Reply::Frozen,
            Reply::Thawed,
            Reply::ShutDown,
            failed(FailureKind::Restore),
            failed(FailureKind::AfterRestore {
                error_type: "Runtime.AfterRestoreError".into(),
            }),
            failed(FailureKind::AfterRestoreTimeout),
            failed(FailureKind::InvokeTimeout),
            failed(FailureKind::GuestEnded { exit_code: Some(3) }),
            failed(FailureKind::GuestEnded { exit_code: None }),
            failed(FailureKind::BadRequest),
            failed(FailureKind::Internal),
        ]
    }

    fn frames<T: Serialize>(messages: &[T]) -> Vec<u8> {
        messages
            .iter()
            .flat_map(|m| encode_frame(m).unwrap())
            .collect()
    }

    /// A frame with this length prefix and body, whatever they say.
    fn raw_frame(len: u32, body: &[u8]) -> Vec<u8> {
        let mut frame = len.to_le_bytes().to_vec();
        frame.extend_from_slice(body);
        frame
    }

    fn read_all<T: DeserializeOwned>(mut bytes: &[u8]) -> (Vec<T>, FrameError) {
        let mut got = Vec::new();
        loop {
            match read_frame(&mut bytes) {
                Ok(m) => got.push(m),
                Err(e) => return (got, e),
            }
        }
    }

    #[test]
    fn every_message_round_trips_and_the_stream_then_ends_cleanly() {
        let requests = every_request();
        let (back, end) = read_all::<Request>(&frames(&requests));
        assert_eq!(back, requests);
        assert!(matches!(end, FrameError::Closed), "{end:?}");

        let replies = every_reply();
        let mut stream = Vec::new();
        for reply in &replies {
            write_frame(&mut stream, reply).unwrap();
        }
        let (back, end) = read_all::<Reply>(&stream);
        assert_eq!(back, replies);
        assert!(matches!(end, FrameError::Closed), "{end:?}");
    }

    #[tokio::test]
    async fn the_async_side_reads_and_writes_the_same_frames() {
        let replies = every_reply();
        let mut stream = Vec::new();
        for reply in &replies {
            write_frame_async(&mut stream, reply).await.unwrap();
        }
        assert_eq!(stream, frames(&replies), "same bytes as the blocking side");
        let mut reader = stream.as_slice();
        for reply in &replies {
            let back: Reply = read_frame_async(&mut reader).await.unwrap();
            assert_eq!(&back, reply);
        }
        let end = read_frame_async::<_, Reply>(&mut reader).await.unwrap_err();
        assert!(matches!(end, FrameError::Closed), "{end:?}");

        let requests = every_request();
        let bytes = frames(&requests);
        let mut reader = bytes.as_slice();
        for request in &requests {
            let back: Request = read_frame_async(&mut reader).await.unwrap();
            assert_eq!(&back, request);
        }
    }

    #[test]
    fn byte_fields_are_on_the_wire_as_serde_would_put_a_plain_vec() {
        #[derive(Serialize)]
        enum Plain {
            Response(Vec<u8>),
        }
        let payload: Vec<u8> = (0..=255).collect();
        assert_eq!(
            encode_frame(&WireOutcome::Response(payload.clone())).unwrap(),
            encode_frame(&Plain::Response(payload)).unwrap()
        );
    }

    #[test]
    fn the_encoding_is_little_endian_with_fixed_width_integers() {
        let frame = encode_frame(&Request::Prepare {
            mem_bytes: 1,
            vcpus: 2,
        })
        .unwrap();
        // Length 13: variant index (u32 0), mem_bytes (u64 1), vcpus (u8 2).
        assert_eq!(frame, [13, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2]);
    }

    /// What both readers say about `bytes`, which must be the same.
    fn refusal(bytes: &[u8]) -> FrameError {
        let sync = read_frame::<_, Request>(&mut &bytes[..]).unwrap_err();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let asynchronous = runtime
            .block_on(read_frame_async::<_, Request>(&mut &bytes[..]))
            .unwrap_err();
        assert_eq!(
            format!("{sync:?}"),
            format!("{asynchronous:?}"),
            "the two sides disagree"
        );
        sync
    }

    #[test]
    fn a_stream_that_ends_inside_a_frame_is_truncated_not_closed() {
        let frame = encode_frame(&every_request()[3]).unwrap();
        assert!(matches!(
            refusal(&frame[..2]),
            FrameError::Truncated {
                expected: 4,
                got: 2
            }
        ));
        let cut = frame.len() - 1;
        let err = refusal(&frame[..cut]);
        assert!(
            matches!(err, FrameError::Truncated { expected, got }
                if expected == frame.len() && got == cut),
            "{err:?}"
        );
        // The prefix alone, announcing a body that never comes.
        assert!(matches!(
            refusal(&frame[..4]),
            FrameError::Truncated { got: 4, .. }
        ));
        assert!(matches!(refusal(&[]), FrameError::Closed));
    }

    #[test]
    fn an_oversized_frame_is_refused_before_its_body_is_read_or_allocated() {
        // No body follows: a reader that tried to allocate and read it would report truncation.
        for len in [MAX_FRAME as u32 + 1, u32::MAX] {
            let err = refusal(&len.to_le_bytes());
            assert!(
                matches!(err, FrameError::TooLarge { len: l } if l == len as usize),
                "{err:?}"
            );
        }
        // Exactly the limit is a frame (here a truncated one).
        assert!(matches!(
            refusal(&(MAX_FRAME as u32).to_le_bytes()),
            FrameError::Truncated { .. }
        ));
    }

    #[test]
    fn a_message_too_large_to_send_is_refused_before_anything_is_written() {
        // A string rather than the payload: serde encodes it in one piece, the payload byte by
        // byte, which takes seconds in a debug build.
        let request = Request::Invoke(Invoke {
            client_context: "x".repeat(MAX_FRAME),
            ..Invoke::default()
        });
        let mut out = Vec::new();
        let err = write_frame(&mut out, &request).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len } if len > MAX_FRAME),
            "{err:?}"
        );
        assert!(out.is_empty());
    }

    #[test]
    fn bytes_that_are_no_message_do_not_decode() {
        // Variant 200 of Request does not exist.
        let err = refusal(&raw_frame(4, &200u32.to_le_bytes()));
        assert!(matches!(err, FrameError::Decode(_)), "{err:?}");
        // A payload whose length says more than the frame holds.
        let mut body = 2u32.to_le_bytes().to_vec(); // Invoke
        body.extend_from_slice(&u64::MAX.to_le_bytes()); // request_id's length
        let err = refusal(&raw_frame(body.len() as u32, &body));
        assert!(matches!(err, FrameError::Decode(_)), "{err:?}");
        // A payload claiming more bytes than any frame holds: refused, not allocated.
        let mut body = encode_frame(&Request::Invoke(Invoke::default())).unwrap()[4..].to_vec();
        // Variant, three string lengths and the deadline come first.
        body[36..44].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = refusal(&raw_frame(body.len() as u32, &body));
        assert!(matches!(err, FrameError::Decode(_)), "{err:?}");
        // An empty frame.
        let err = refusal(&raw_frame(0, &[]));
        assert!(matches!(err, FrameError::Decode(_)), "{err:?}");
    }

    #[test]
    fn bytes_after_the_message_in_its_frame_are_refused() {
        let mut body = encode_frame(&Request::Freeze).unwrap()[4..].to_vec();
        body.extend_from_slice(&[0, 0, 7]);
        let err = refusal(&raw_frame(body.len() as u32, &body));
        assert!(
            matches!(err, FrameError::TrailingBytes { extra: 3 }),
            "{err:?}"
        );
    }
}

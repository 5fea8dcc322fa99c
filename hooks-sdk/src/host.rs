//! The host's half of the guest protocol (docs/guest-protocol.md) once a guest is restored:
//! accept the agent's new connection, send it `Restored` (fresh entropy, the host's wall clock,
//! a new restore id), give its after-restore hooks their budget, then invoke it. Shared pieces
//! — reading frames on a helper thread so every wait can also watch the clock and the guest —
//! are used by snapshot creation too.

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::protocol::io::{self, Frame, FrameError};
use crate::protocol::{Failure, InitType, Invoke, Message, Restored};

/// How often waits look at the clock and at whether the guest is still running.
const POLL: Duration = Duration::from_millis(1);
/// How long a wait whose connection ended still watches for the guest ending: a guest that
/// stops (a crash, a power-off) closes its connection a moment before its VM has exited, and
/// that is a guest that ended, not a broken socket.
const END_GRACE: Duration = Duration::from_millis(250);
/// Longest runtime error message quoted in an error.
const MAX_QUOTED: usize = 2048;
/// Bytes of entropy sent with `Restored` (the protocol asks for at least 32).
pub const ENTROPY_BYTES: usize = 64;
/// Lambda's budget for after-restore hooks.
pub const AFTER_RESTORE_BUDGET: Duration = Duration::from_secs(10);

/// Frames read on a helper thread, so that waiting can also watch the clock and the guest.
pub struct Frames {
    rx: mpsc::Receiver<Result<Frame, FrameError>>,
}

/// A frame-reading thread started before its connection exists: [`FrameReader::start`] hands
/// it the connection. A host starts one before its guest runs, because starting a thread maps
/// memory (its stack, its allocator's arena), which in the process of a running VM waits for
/// the address space's lock behind the guest's page faults: measured on this 2-CPU PVM host,
/// a reader started when the restored agent connected was held up to 4 ms, and the agent's
/// `Hello` with it.
pub struct FrameReader {
    connection: mpsc::Sender<UnixStream>,
    rx: mpsc::Receiver<Result<Frame, FrameError>>,
}

/// What a reader allocates up front: a frame of this size is read without mapping memory.
const READER_WARM_BYTES: usize = 64 << 10;

impl FrameReader {
    /// Starts the thread; it waits for [`FrameReader::start`], or ends when this is dropped.
    pub fn spawn() -> std::io::Result<Self> {
        let (connection, connected) = mpsc::channel::<UnixStream>();
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("agent-frames".into())
            .spawn(move || {
                // The thread's first allocation maps its arena: now, not when frames arrive.
                drop(std::hint::black_box(Vec::<u8>::with_capacity(
                    READER_WARM_BYTES,
                )));
                let Ok(mut reader) = connected.recv() else {
                    return;
                };
                loop {
                    let frame = io::read_frame(&mut reader);
                    let failed = frame.is_err();
                    if tx.send(frame).is_err() || failed {
                        return;
                    }
                }
            })?;
        Ok(Self { connection, rx })
    }

    /// Reads `stream` (a clone of it) until it fails or the [`Frames`] are dropped.
    pub fn start(self, stream: &UnixStream) -> std::io::Result<Frames> {
        let reader = stream.try_clone()?;
        self.connection
            .send(reader)
            .map_err(|_| std::io::Error::other("the frame-reading thread ended"))?;
        Ok(Frames { rx: self.rx })
    }
}

impl Frames {
    /// Starts reading `stream` (a clone of it) until it fails or the receiver is dropped.
    pub fn start(stream: &UnixStream) -> std::io::Result<Self> {
        FrameReader::spawn()?.start(stream)
    }

    /// The next frame by `deadline`: `Got(None)` when the connection ended. Wakes as soon as
    /// the frame arrives; looks at the guest every [`POLL`] meanwhile.
    pub fn next(
        &self,
        deadline: Instant,
        guest_ended: &dyn Fn() -> bool,
    ) -> Waited<Option<Result<Frame, FrameError>>> {
        loop {
            let slice = deadline.saturating_duration_since(Instant::now()).min(POLL);
            match self.rx.recv_timeout(slice) {
                Ok(Err(FrameError::Io(e))) => {
                    return settle(Waited::Got(Some(Err(FrameError::Io(e)))), guest_ended);
                }
                Ok(f) => return Waited::Got(Some(f)),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return settle(Waited::Got(None), guest_ended);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if guest_ended() {
                return Waited::GuestEnded;
            }
            if Instant::now() >= deadline {
                return Waited::TimedOut;
            }
        }
    }
}

/// `ended`, the connection's end, unless the guest turns out to have ended within
/// [`END_GRACE`]: then that is what happened.
fn settle<T>(ended: Waited<T>, guest_ended: &dyn Fn() -> bool) -> Waited<T> {
    let until = Instant::now() + END_GRACE;
    loop {
        if guest_ended() {
            return Waited::GuestEnded;
        }
        if Instant::now() >= until {
            return ended;
        }
        std::thread::sleep(POLL);
    }
}

/// What a wait produced.
pub enum Waited<T> {
    /// The value.
    Got(T),
    /// The deadline passed first.
    TimedOut,
    /// The guest stopped first.
    GuestEnded,
}

/// Accepts the agent's connection on `listener` by `deadline`.
pub fn accept(
    listener: &UnixListener,
    deadline: Instant,
    guest_ended: &dyn Fn() -> bool,
) -> Waited<std::io::Result<UnixStream>> {
    use std::os::fd::AsFd;
    if let Err(e) = listener.set_nonblocking(true) {
        return Waited::Got(Err(e));
    }
    // Sleep in poll(2) on the listener, not in a timer: the connection wakes it and is accepted
    // at once. (A back-off pause after each poll cost a restored guest up to 1 ms of its first
    // sign of life.)
    let accepted = loop {
        match listener.accept() {
            Ok((s, _)) => break Waited::Got(Ok(s)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => break Waited::Got(Err(e)),
        }
        if guest_ended() {
            break Waited::GuestEnded;
        }
        let now = Instant::now();
        if now >= deadline {
            break Waited::TimedOut;
        }
        let slice = deadline.saturating_duration_since(now).min(POLL);
        let timeout =
            nix::poll::PollTimeout::try_from(slice).unwrap_or(nix::poll::PollTimeout::ZERO);
        let mut fds = [nix::poll::PollFd::new(
            listener.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => break Waited::Got(Err(e.into())),
        }
    };
    match accepted {
        Waited::Got(Ok(s)) => Waited::Got(s.set_nonblocking(false).map(|()| s)),
        other => other,
    }
}

/// The runtime's message from a Lambda error document (`errorMessage`), else the body itself;
/// cut to a readable length.
pub fn quote(body: &[u8]) -> String {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("errorMessage")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    match message.char_indices().nth(MAX_QUOTED) {
        Some((cut, _)) => format!("{}…", &message[..cut]),
        None => message,
    }
}

/// A failure frame's error type and quoted message.
pub fn failure(f: &Failure) -> (String, String) {
    (f.error_type.to_owned(), quote(f.body))
}

/// The restored guest's agent did not get through its after-restore step.
#[derive(Debug, thiserror::Error)]
pub enum AfterRestoreError {
    /// The agent did not reconnect in time.
    #[error("the restored guest's agent did not reconnect within {0:?}")]
    ConnectTimeout(Duration),
    /// The after-restore hooks ran out of time.
    #[error(
        "the after-restore hooks did not finish within {0:?} (Lambda's limit is 10 s); the \
         restore failed"
    )]
    HookTimeout(Duration),
    /// An after-restore hook failed: `Runtime.AfterRestoreError` (or the runtime's own type).
    #[error("an after-restore hook failed with {error_type}: {message}; the restore failed")]
    Hook {
        /// Lambda's error type.
        error_type: String,
        /// The runtime's message.
        message: String,
    },
    /// The guest stopped while we waited.
    #[error("the restored guest stopped {stage}")]
    GuestEnded {
        /// How far it got.
        stage: &'static str,
    },
    /// The agent broke the protocol.
    #[error("the restored guest's agent broke the protocol: {0}")]
    Protocol(String),
    /// The host side of the agent's socket failed.
    #[error("the agent's socket failed")]
    Socket(#[source] std::io::Error),
}

/// What the host tells a restored guest: everything that must differ between clones.
#[derive(Clone, Debug)]
pub struct Uniqueness {
    /// Fresh random bytes for the guest's RNG.
    pub entropy: [u8; ENTROPY_BYTES],
    /// Unique to this restore.
    pub restore_id: String,
}

impl Uniqueness {
    /// Draws fresh entropy and a restore id from the host's CSPRNG.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut entropy = [0u8; ENTROPY_BYTES];
        getrandom::fill(&mut entropy)?;
        let mut id = [0u8; 16];
        getrandom::fill(&mut id)?;
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self {
            entropy,
            restore_id: format!(
                "{}-{}-{}-{}-{}",
                &hex[..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..]
            ),
        })
    }
}

fn unix_nanos_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A restored agent, past its after-restore hooks, ready for invocations.
pub struct AgentConnection {
    stream: UnixStream,
    frames: Frames,
    /// The agent's name from its `Hello`.
    pub agent: String,
    /// The id sent with `Restored`.
    pub restore_id: String,
    /// From `Restored` sent to `RestoreDone` received: the hooks' time.
    pub hooks: Duration,
    /// When the agent's `Hello` arrived: the restored guest's first sign of life.
    pub hello_at: Instant,
}

/// Waits for the restored guest's agent on `listener`, sends it `Restored` with `unique` and
/// the wall clock, and waits up to `budget` for its after-restore hooks. `connect_timeout`
/// bounds the reconnection; `guest_ended` says whether the VM has stopped.
pub fn after_restore(
    listener: &UnixListener,
    unique: &Uniqueness,
    connect_timeout: Duration,
    budget: Duration,
    guest_ended: &dyn Fn() -> bool,
) -> Result<AgentConnection, AfterRestoreError> {
    let reader = FrameReader::spawn().map_err(AfterRestoreError::Socket)?;
    after_restore_with(
        listener,
        reader,
        unique,
        connect_timeout,
        budget,
        guest_ended,
    )
}

/// [`after_restore`], reading the agent's first connection with `reader`, which the caller
/// started before the guest ran (see [`FrameReader`]).
pub fn after_restore_with(
    listener: &UnixListener,
    reader: FrameReader,
    unique: &Uniqueness,
    connect_timeout: Duration,
    budget: Duration,
    guest_ended: &dyn Fn() -> bool,
) -> Result<AgentConnection, AfterRestoreError> {
    let deadline = Instant::now() + connect_timeout;
    let mut hello_at;
    let mut reader = Some(reader);
    loop {
        let mut stream = match accept(listener, deadline, guest_ended) {
            Waited::Got(Ok(s)) => s,
            Waited::Got(Err(e)) => return Err(AfterRestoreError::Socket(e)),
            Waited::TimedOut => return Err(AfterRestoreError::ConnectTimeout(connect_timeout)),
            Waited::GuestEnded => {
                return Err(AfterRestoreError::GuestEnded {
                    stage: "before its agent reconnected",
                });
            }
        };
        // A reconnection (the first connection ended before Hello) gets a reader of its own.
        let frames = match reader.take() {
            Some(reader) => reader.start(&stream),
            None => Frames::start(&stream),
        }
        .map_err(AfterRestoreError::Socket)?;
        let agent = match frames.next(deadline, guest_ended) {
            Waited::Got(Some(Ok(frame))) => match frame.message() {
                Ok(Message::Hello { agent, init_type }) => {
                    hello_at = Instant::now();
                    if init_type != InitType::SnapStart {
                        tracing::warn!(agent, "a restored agent said it started on-demand");
                    }
                    agent.to_owned()
                }
                Ok(other) => {
                    return Err(AfterRestoreError::Protocol(format!(
                        "the first frame was {:?}, not Hello",
                        other.kind()
                    )));
                }
                Err(e) => {
                    return Err(AfterRestoreError::Protocol(format!("malformed frame: {e}")));
                }
            },
            Waited::Got(Some(Err(FrameError::Protocol(e)))) => {
                return Err(AfterRestoreError::Protocol(format!("malformed frame: {e}")));
            }
            // The connection ended before Hello: the agent reconnects.
            Waited::Got(Some(Err(FrameError::Io(_)))) | Waited::Got(None) => continue,
            Waited::TimedOut => return Err(AfterRestoreError::ConnectTimeout(connect_timeout)),
            Waited::GuestEnded => {
                return Err(AfterRestoreError::GuestEnded {
                    stage: "before its agent said Hello",
                });
            }
        };
        let restored = Message::Restored(Restored {
            entropy: &unique.entropy,
            wall_clock_ns: unix_nanos_now(),
            restore_id: &unique.restore_id,
        });
        let sent = Instant::now();
        match io::write_message(&mut stream, &restored) {
            Ok(()) => {}
            Err(FrameError::Io(e)) => {
                tracing::info!(error = %e, "the agent's connection closed; waiting for it again");
                continue;
            }
            Err(FrameError::Protocol(e)) => return Err(AfterRestoreError::Protocol(e.to_string())),
        }
        let hooks_deadline = sent + budget;
        let frame = match frames.next(hooks_deadline, guest_ended) {
            Waited::Got(Some(Ok(frame))) => frame,
            Waited::Got(Some(Err(FrameError::Protocol(e)))) => {
                return Err(AfterRestoreError::Protocol(format!("malformed frame: {e}")));
            }
            Waited::Got(Some(Err(FrameError::Io(e)))) => {
                return Err(AfterRestoreError::Socket(e));
            }
            Waited::Got(None) => {
                return Err(AfterRestoreError::Protocol(
                    "the connection closed during the after-restore hooks".into(),
                ));
            }
            Waited::TimedOut => return Err(AfterRestoreError::HookTimeout(budget)),
            Waited::GuestEnded => {
                return Err(AfterRestoreError::GuestEnded {
                    stage: "during its after-restore hooks",
                });
            }
        };
        return match frame.message() {
            Ok(Message::RestoreDone) => Ok(AgentConnection {
                stream,
                frames,
                agent,
                restore_id: unique.restore_id.clone(),
                hooks: sent.elapsed(),
                hello_at,
            }),
            Ok(Message::RestoreError(f)) => {
                let (error_type, message) = failure(&f);
                Err(AfterRestoreError::Hook {
                    error_type,
                    message,
                })
            }
            Ok(other) => Err(AfterRestoreError::Protocol(format!(
                "expected RestoreDone, got {:?}",
                other.kind()
            ))),
            Err(e) => Err(AfterRestoreError::Protocol(format!("malformed frame: {e}"))),
        };
    }
}

/// The `deadline_ms` of an invocation that may run for `timeout` from now (Unix ms).
pub fn deadline_after(timeout: Duration) -> u64 {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    now_ms.saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX))
}

/// What the function answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InvokeOutcome {
    /// Its response payload.
    Response(Vec<u8>),
    /// A function error: Lambda's error type and the runtime's error document.
    Error {
        /// E.g. `Function.ResponseSizeTooLarge` or the runtime's own type.
        error_type: String,
        /// The error document.
        body: Vec<u8>,
    },
}

/// An invocation got no answer.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The deadline passed.
    #[error("the function did not answer within {0:?}")]
    Timeout(Duration),
    /// The guest stopped.
    #[error("the guest stopped during the invocation")]
    GuestEnded,
    /// The connection closed or failed.
    #[error("the agent's connection failed during the invocation")]
    Socket(#[source] std::io::Error),
    /// The agent broke the protocol.
    #[error("the agent broke the protocol: {0}")]
    Protocol(String),
}

impl AgentConnection {
    /// Sends `invoke` and waits up to `timeout` for its answer.
    pub fn invoke(
        &mut self,
        invoke: &Invoke<'_>,
        timeout: Duration,
        guest_ended: &dyn Fn() -> bool,
    ) -> Result<InvokeOutcome, InvokeError> {
        let message = Message::Invoke(*invoke);
        let deadline = Instant::now() + timeout;
        match io::write_message(&mut self.stream, &message) {
            Ok(()) => {}
            Err(FrameError::Io(e)) => return Err(InvokeError::Socket(e)),
            Err(FrameError::Protocol(e)) => return Err(InvokeError::Protocol(e.to_string())),
        }
        let frame = match self.frames.next(deadline, guest_ended) {
            Waited::Got(Some(Ok(frame))) => frame,
            Waited::Got(Some(Err(FrameError::Io(e)))) => return Err(InvokeError::Socket(e)),
            Waited::Got(Some(Err(FrameError::Protocol(e)))) => {
                return Err(InvokeError::Protocol(format!("malformed frame: {e}")));
            }
            Waited::Got(None) => {
                return Err(InvokeError::Socket(
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            Waited::TimedOut => return Err(InvokeError::Timeout(timeout)),
            Waited::GuestEnded => return Err(InvokeError::GuestEnded),
        };
        let answer = frame
            .message()
            .map_err(|e| InvokeError::Protocol(format!("malformed frame: {e}")))?;
        let (request_id, outcome) = match answer {
            Message::Response {
                request_id,
                payload,
            } => (request_id, InvokeOutcome::Response(payload.to_vec())),
            Message::InvokeError {
                request_id,
                failure: f,
            } => (
                request_id,
                InvokeOutcome::Error {
                    error_type: f.error_type.to_owned(),
                    body: f.body.to_vec(),
                },
            ),
            other => {
                return Err(InvokeError::Protocol(format!(
                    "expected the invocation's answer, got {:?}",
                    other.kind()
                )));
            }
        };
        if request_id != invoke.request_id {
            return Err(InvokeError::Protocol(format!(
                "answer for request {request_id:?}, expected {:?}",
                invoke.request_id
            )));
        }
        Ok(outcome)
    }

    /// Asks the agent to stop its runtime and end the VM.
    pub fn shutdown(&mut self) -> Result<(), InvokeError> {
        match io::write_message(&mut self.stream, &Message::Shutdown) {
            Ok(()) => Ok(()),
            Err(FrameError::Io(e)) => Err(InvokeError::Socket(e)),
            Err(FrameError::Protocol(e)) => Err(InvokeError::Protocol(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest that crashes closes its connection a moment before its VM exits: the wait
    /// reports the guest's end, not a socket error (a crash was now and then reported as an
    /// unexpected end of file). A connection that ends while the guest runs on is still an end.
    #[test]
    fn a_connection_that_ends_just_before_the_guest_does_is_the_guest_ending() {
        let (host, agent) = UnixStream::pair().unwrap();
        let frames = Frames::start(&host).unwrap();
        drop(agent);
        let ended_at = Instant::now() + Duration::from_millis(20);
        let deadline = Instant::now() + Duration::from_secs(5);
        let waited = frames.next(deadline, &|| Instant::now() >= ended_at);
        assert!(matches!(waited, Waited::GuestEnded));

        let (host, agent) = UnixStream::pair().unwrap();
        let frames = Frames::start(&host).unwrap();
        drop(agent);
        let started = Instant::now();
        let waited = frames.next(deadline, &|| false);
        assert!(matches!(
            waited,
            Waited::Got(None) | Waited::Got(Some(Err(_)))
        ));
        assert!(started.elapsed() >= END_GRACE);
    }

    /// A reader started before its connection reads it once handed it, frame by frame, and
    /// sees its end; one never handed a connection ends with its owner.
    #[test]
    fn a_reader_started_ahead_reads_the_connection_it_is_handed() {
        let reader = FrameReader::spawn().unwrap();
        let (host, mut agent) = UnixStream::pair().unwrap();
        let hello = Message::Hello {
            agent: "early-reader-test",
            init_type: InitType::SnapStart,
        };
        io::write_message(&mut agent, &hello).unwrap();
        let frames = reader.start(&host).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        match frames.next(deadline, &|| false) {
            Waited::Got(Some(Ok(frame))) => match frame.message().unwrap() {
                Message::Hello { agent, init_type } => {
                    assert_eq!(
                        (agent, init_type),
                        ("early-reader-test", InitType::SnapStart)
                    );
                }
                other => panic!("read {:?}, not Hello", other.kind()),
            },
            _ => panic!("no frame"),
        }
        drop(agent);
        assert!(matches!(
            frames.next(deadline, &|| false),
            Waited::Got(None) | Waited::Got(Some(Err(_)))
        ));

        drop(FrameReader::spawn().unwrap());
    }

    #[test]
    fn quotes_the_error_message_of_a_lambda_error_document() {
        let doc =
            br#"{"errorMessage":"no module named x","errorType":"Runtime.ImportModuleError"}"#;
        assert_eq!(quote(doc), "no module named x");
        assert_eq!(quote(b"plain text"), "plain text");
        let long = "x".repeat(MAX_QUOTED + 10);
        assert_eq!(quote(long.as_bytes()).chars().count(), MAX_QUOTED + 1);
    }

    /// Runs `after_restore` against a fake agent that plays `script` on its connection.
    fn handshake(
        budget: Duration,
        script: impl FnOnce(UnixStream) + Send + 'static,
    ) -> Result<AgentConnection, AfterRestoreError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let agent = std::thread::spawn(move || script(UnixStream::connect(&path).unwrap()));
        let unique = Uniqueness::generate().unwrap();
        let result = after_restore(&listener, &unique, Duration::from_secs(5), budget, &|| {
            false
        });
        agent.join().unwrap();
        result
    }

    fn hello(s: &mut UnixStream) {
        io::write_message(
            s,
            &Message::Hello {
                agent: "fake/1",
                init_type: InitType::SnapStart,
            },
        )
        .unwrap();
    }

    /// Reads `Restored` and checks what the host sent.
    fn restored(s: &mut UnixStream) {
        let frame = io::read_frame(s).unwrap();
        let Ok(Message::Restored(r)) = frame.message() else {
            panic!("expected Restored, got {:?}", frame.kind);
        };
        assert_eq!(r.entropy.len(), ENTROPY_BYTES);
        let now = unix_nanos_now();
        assert!(
            now.abs_diff(r.wall_clock_ns) < 5_000_000_000,
            "{}",
            r.wall_clock_ns
        );
        assert_eq!(r.restore_id.len(), 36);
    }

    #[test]
    fn a_well_behaved_agent_is_ready_after_restore_done() {
        let agent = handshake(Duration::from_secs(5), |mut s| {
            hello(&mut s);
            restored(&mut s);
            // Closing right after is fine: the host reads RestoreDone before the end.
            io::write_message(&mut s, &Message::RestoreDone).unwrap();
        })
        .unwrap();
        assert_eq!(agent.agent, "fake/1");
    }

    #[test]
    fn misbehaving_agents_get_typed_errors() {
        let err = handshake(Duration::from_secs(5), |mut s| {
            hello(&mut s);
            restored(&mut s);
            let body = br#"{"errorMessage":"no db","errorType":"X"}"#;
            io::write_message(
                &mut s,
                &Message::RestoreError(Failure {
                    error_type: "Runtime.AfterRestoreError",
                    body,
                }),
            )
            .unwrap();
        })
        .err()
        .unwrap();
        assert!(
            matches!(&err, AfterRestoreError::Hook { error_type, message }
                if error_type == "Runtime.AfterRestoreError" && message == "no db"),
            "{err:?}"
        );

        let err = handshake(Duration::from_millis(200), |mut s| {
            hello(&mut s);
            restored(&mut s);
            std::thread::sleep(Duration::from_millis(600));
        })
        .err()
        .unwrap();
        assert!(matches!(err, AfterRestoreError::HookTimeout(_)), "{err:?}");

        let err = handshake(Duration::from_secs(5), |mut s| {
            io::write_message(&mut s, &Message::Ready).unwrap();
        })
        .err()
        .unwrap();
        assert!(
            matches!(&err, AfterRestoreError::Protocol(m) if m.contains("not Hello")),
            "{err:?}"
        );

        // Garbage instead of a frame.
        let err = handshake(Duration::from_secs(5), |mut s| {
            use std::io::Write;
            s.write_all(&[0xff; 64]).unwrap();
        })
        .err()
        .unwrap();
        assert!(
            matches!(&err, AfterRestoreError::Protocol(m) if m.contains("malformed")),
            "{err:?}"
        );

        // The wrong answer to Restored, then the connection closing during the hooks.
        let err = handshake(Duration::from_secs(5), |mut s| {
            hello(&mut s);
            restored(&mut s);
            io::write_message(&mut s, &Message::SnapshotReady).unwrap();
        })
        .err()
        .unwrap();
        assert!(
            matches!(&err, AfterRestoreError::Protocol(m) if m.contains("expected RestoreDone")),
            "{err:?}"
        );
        let err = handshake(Duration::from_secs(5), |mut s| {
            hello(&mut s);
            restored(&mut s);
        })
        .err()
        .unwrap();
        assert!(
            matches!(&err, AfterRestoreError::Protocol(m) if m.contains("closed"))
                || matches!(err, AfterRestoreError::Socket(_)),
            "{err:?}"
        );
    }

    #[test]
    fn every_restore_gets_its_own_entropy_and_id() {
        let a = Uniqueness::generate().unwrap();
        let b = Uniqueness::generate().unwrap();
        assert_ne!(a.entropy, b.entropy);
        assert_ne!(a.restore_id, b.restore_id);
        assert_eq!(a.restore_id.len(), 36);
    }
}

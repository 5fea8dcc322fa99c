//! The host's half of taking a guest to its checkpoint through the agent
//! (docs/guest-protocol.md, "Snap-start boot, then snapshot"): wait for the agent's `Hello`,
//! ask for a `Checkpoint`, and wait for `SnapshotReady` — or for the failure that means there
//! must be no snapshot (init failed, a before-checkpoint hook failed, the guest ended, time ran
//! out).

use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use hooks_sdk::host::{Frames, Waited, accept, failure};
use hooks_sdk::protocol::io::{self, FrameError};
use hooks_sdk::protocol::{InitType, Message};

/// The guest did not reach its checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Init took longer than allowed.
    #[error("the guest's init did not finish within {timeout:?} ({stage}); no snapshot was taken")]
    InitTimeout {
        /// The limit.
        timeout: Duration,
        /// How far it got.
        stage: &'static str,
    },
    /// The runtime reported an init error (or died during init).
    #[error("the function's init failed with {error_type}: {message}; no snapshot was taken")]
    Init {
        /// Lambda's error type, e.g. `Runtime.ExitError`.
        error_type: String,
        /// The runtime's message.
        message: String,
    },
    /// A before-checkpoint hook failed.
    #[error("a before-checkpoint hook failed ({error_type}): {message}; no snapshot was taken")]
    BeforeCheckpoint {
        /// `Runtime.BeforeCheckpointError`, or the runtime's own name for it.
        error_type: String,
        /// The runtime's message.
        message: String,
    },
    /// The agent started its runtime on-demand, so there is nothing to checkpoint.
    #[error(
        "the guest's agent ({agent}) started its runtime on-demand; a snapshot needs a snap-start \
         init (thaw-init: AWS_LAMBDA_INITIALIZATION_TYPE=snap-start; test guest: \
         thaw.init=snap-start)"
    )]
    OnDemand {
        /// The agent's name.
        agent: String,
    },
    /// The guest stopped while we waited.
    #[error("the guest stopped during init ({stage}); no snapshot was taken")]
    GuestEnded {
        /// How far it got.
        stage: &'static str,
    },
    /// The agent broke the protocol.
    #[error("the guest's agent broke the protocol: {0}")]
    Protocol(String),
    /// The host side of the agent's socket failed.
    #[error("the agent's socket failed")]
    Socket(#[source] std::io::Error),
}

/// The agent, ready to be snapshotted: its connection stays open until the VM is gone.
pub struct ReadyAgent {
    /// The agent's name from its `Hello`.
    pub agent: String,
    /// The connection (reset for the guest by the restore; kept so the guest does not see it
    /// close before the snapshot is taken).
    pub connection: UnixStream,
}

/// Waits on `listener` (the host side of the agent port) for the agent, asks it to checkpoint
/// and waits until it is ready. `timeout` is the init timeout, counted from `started`;
/// `guest_ended` says whether the VM has stopped.
pub fn checkpoint(
    listener: &UnixListener,
    started: Instant,
    timeout: Duration,
    guest_ended: &dyn Fn() -> bool,
) -> Result<ReadyAgent, CheckpointError> {
    let deadline = started + timeout;
    loop {
        let stage = "waiting for the agent to connect";
        let stream = match accept(listener, deadline, guest_ended) {
            Waited::Got(Ok(s)) => s,
            Waited::Got(Err(e)) => return Err(CheckpointError::Socket(e)),
            Waited::TimedOut => return Err(CheckpointError::InitTimeout { timeout, stage }),
            Waited::GuestEnded => return Err(CheckpointError::GuestEnded { stage }),
        };
        match session(stream, deadline, timeout, guest_ended)? {
            Some(ready) => return Ok(ready),
            None => tracing::info!("the agent's connection ended; waiting for it to reconnect"),
        }
    }
}

/// One connection: `Some` when the agent is ready, `None` if the connection ended first (the
/// agent reconnects after a transport error).
fn session(
    mut stream: UnixStream,
    deadline: Instant,
    timeout: Duration,
    guest_ended: &dyn Fn() -> bool,
) -> Result<Option<ReadyAgent>, CheckpointError> {
    let frames = Frames::start(&stream).map_err(CheckpointError::Socket)?;
    let mut agent: Option<String> = None;
    loop {
        let stage = match agent {
            None => "waiting for the agent's Hello",
            Some(_) => "waiting for the runtime to reach its checkpoint",
        };
        let frame = match frames.next(deadline, guest_ended) {
            Waited::Got(Some(Ok(frame))) => frame,
            Waited::Got(Some(Err(FrameError::Protocol(e)))) => {
                return Err(CheckpointError::Protocol(format!("malformed frame: {e}")));
            }
            Waited::Got(Some(Err(FrameError::Io(_)))) | Waited::Got(None) => return Ok(None),
            Waited::TimedOut => return Err(CheckpointError::InitTimeout { timeout, stage }),
            Waited::GuestEnded => return Err(CheckpointError::GuestEnded { stage }),
        };
        let message = frame
            .message()
            .map_err(|e| CheckpointError::Protocol(format!("malformed frame: {e}")))?;
        match (&agent, message) {
            (
                None,
                Message::Hello {
                    agent: name,
                    init_type,
                },
            ) => {
                if init_type == InitType::OnDemand {
                    return Err(CheckpointError::OnDemand {
                        agent: name.to_owned(),
                    });
                }
                tracing::info!(agent = name, "agent connected; asking for a checkpoint");
                match io::write_message(&mut stream, &Message::Checkpoint) {
                    Ok(()) => {}
                    // The guest closed the connection (it may be ending): see what follows.
                    Err(FrameError::Io(e)) => {
                        tracing::info!(error = %e, "the agent's connection closed");
                        return Ok(None);
                    }
                    Err(FrameError::Protocol(e)) => {
                        return Err(CheckpointError::Protocol(e.to_string()));
                    }
                }
                agent = Some(name.to_owned());
            }
            (None, other) => {
                return Err(CheckpointError::Protocol(format!(
                    "the first frame was {:?}, not Hello",
                    other.kind()
                )));
            }
            (Some(name), Message::SnapshotReady) => {
                tracing::info!(agent = %name, "the runtime is at its checkpoint");
                return Ok(Some(ReadyAgent {
                    agent: name.clone(),
                    connection: stream,
                }));
            }
            (Some(_), Message::InitError(f)) => {
                let (error_type, message) = failure(&f);
                return Err(CheckpointError::Init {
                    error_type,
                    message,
                });
            }
            (Some(_), Message::CheckpointError(f)) => {
                let (error_type, message) = failure(&f);
                return Err(CheckpointError::BeforeCheckpoint {
                    error_type,
                    message,
                });
            }
            (Some(_), other) => {
                return Err(CheckpointError::Protocol(format!(
                    "expected SnapshotReady, got {:?}",
                    other.kind()
                )));
            }
        }
    }
}

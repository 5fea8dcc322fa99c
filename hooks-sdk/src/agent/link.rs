//! The agent's side of the host connection: connect (retrying with backoff), say `Hello`, then
//! run a reader task that hands each host frame to the agent while this task writes queued
//! frames. Any failure ends the connection and starts a new one; that is also how a restore
//! looks from inside the guest (the vsock transport is reset and the host answers the new
//! `Hello` with `Restored`). A malformed frame from the host is logged with its reason and
//! closes the connection, since the stream can no longer be trusted to be in sync.
//!
//! Frames the agent produces while disconnected wait in the outbox and go out, in order, after
//! the next `Hello`; a frame whose write failed is sent again on the next connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::Agent;
use super::lambda::ToHost;
use super::transport::Transport;
use crate::protocol::io::{Frame, FrameError};
use crate::protocol::{HEADER_LEN, Header, InitType, Message};

/// First retry delay after a failed connect; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
/// Longest delay between connection attempts.
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// Reads one frame, checking the header before allocating the body (so at most `MAX_BODY`).
pub async fn read_frame<R: AsyncRead + Unpin>(stream: &mut R) -> Result<Frame, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    stream.read_exact(&mut header).await?;
    let header = Header::decode(&header)?;
    let mut body = vec![0u8; header.length as usize];
    stream.read_exact(&mut body).await?;
    Message::decode(header.kind, &body)?;
    Ok(Frame {
        kind: header.kind,
        body,
    })
}

/// Runs the link for the agent's whole life; returns when the outbox closes.
pub async fn run(
    transport: Transport,
    init_type: InitType,
    mut outbox: mpsc::UnboundedReceiver<ToHost>,
    agent: Arc<Agent>,
) {
    let agent_name = concat!("thaw-init/", env!("CARGO_PKG_VERSION"));
    let hello = match (Message::Hello {
        agent: agent_name,
        init_type,
    })
    .encode()
    {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("cannot encode Hello: {e}");
            return;
        }
    };
    // A frame whose write failed, sent first on the next connection.
    let mut unsent: Option<Vec<u8>> = None;
    let mut connection = 0u64;
    loop {
        let stream = connect(&transport).await;
        connection += 1;
        let (mut rd, mut wr) = tokio::io::split(stream);
        if let Err(e) = write_all(&mut wr, &hello).await {
            tracing::warn!(connection, "sending Hello failed: {e}");
            continue;
        }
        tracing::info!(connection, %transport, "connected to the host");
        let (closed_tx, mut closed_rx) = oneshot::channel::<()>();
        let reader_agent = agent.clone();
        let reader = tokio::spawn(async move {
            read_loop(&mut rd, &reader_agent, connection).await;
            let _ = closed_tx.send(());
        });
        loop {
            let frame = match unsent.take() {
                Some(f) => f,
                None => {
                    tokio::select! {
                        next = outbox.recv() => match next {
                            Some(m) => match m.message().encode() {
                                Ok(f) => f,
                                Err(e) => {
                                    // The machine keeps to the limits; this is a bug, not input.
                                    tracing::error!("dropping a frame that cannot be encoded: {e}");
                                    continue;
                                }
                            },
                            None => {
                                reader.abort();
                                return;
                            }
                        },
                        _ = &mut closed_rx => break,
                    }
                }
            };
            if let Err(e) = write_all(&mut wr, &frame).await {
                tracing::warn!(connection, "writing to the host failed: {e}");
                unsent = Some(frame);
                break;
            }
        }
        reader.abort();
    }
}

async fn write_all<W: AsyncWrite + Unpin>(wr: &mut W, frame: &[u8]) -> std::io::Result<()> {
    wr.write_all(frame).await?;
    wr.flush().await
}

/// Connects, retrying with exponential backoff until it works.
async fn connect(transport: &Transport) -> Box<dyn super::transport::HostStream> {
    let mut delay = FIRST_BACKOFF;
    let mut attempts = 0u32;
    loop {
        match transport.connect().await {
            Ok(s) => return s,
            Err(e) => {
                attempts += 1;
                // The first failures are expected (the host may not listen yet, or a restore is
                // under way); say so once, then quietly keep trying.
                if attempts == 1 || attempts.is_power_of_two() {
                    tracing::warn!(attempts, "{e}; retrying");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Hands frames to the agent until the connection fails or the host breaks the protocol.
async fn read_loop<R: AsyncRead + Unpin>(rd: &mut R, agent: &Agent, connection: u64) {
    loop {
        match read_frame(rd).await {
            Ok(frame) if frame.kind.from_guest() => {
                tracing::error!(
                    connection,
                    kind = ?frame.kind,
                    "closing the host connection: the host sent a guest-to-host frame"
                );
                return;
            }
            Ok(frame) => agent.host_frame(frame),
            Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                tracing::info!(connection, "the host closed the connection");
                return;
            }
            Err(FrameError::Io(e)) => {
                tracing::info!(connection, "host connection lost: {e}");
                return;
            }
            Err(FrameError::Protocol(e)) => {
                tracing::error!(
                    connection,
                    "closing the host connection: malformed frame from the host: {e}"
                );
                return;
            }
        }
    }
}

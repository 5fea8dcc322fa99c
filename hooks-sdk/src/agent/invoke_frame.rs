//! An invocation inside the agent: the host's `Invoke` frame, kept whole while it waits for the
//! runtime, read back through the wire type.

use bytes::Bytes;

use crate::protocol::io::Frame;
use crate::protocol::{HEADER_LEN, Invoke, Kind, Message};

/// An `Invoke` frame as the host sent it, kept whole so it can wait for the runtime and be
/// shared by the Runtime API's handlers: its fields are read back through the wire type
/// [`Invoke`] (the only type an invocation has in the guest before the function's own SDK), and
/// the payload is a slice of the frame's buffer, not a copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvokeFrame {
    body: Bytes,
}

impl InvokeFrame {
    /// The frame, if it holds a well-formed `Invoke`.
    pub fn new(frame: Frame) -> Option<Self> {
        matches!(frame.message(), Ok(Message::Invoke(_))).then(|| InvokeFrame {
            body: Bytes::from(frame.body),
        })
    }

    /// The frame that carries `invoke` (or `None` if it breaks the protocol's limits).
    pub fn encode(invoke: &Invoke<'_>) -> Option<Self> {
        let message = Message::Invoke(*invoke);
        let mut frame = vec![0u8; message.frame_len()];
        message.encode_into(&mut frame).ok()?;
        Some(InvokeFrame {
            body: Bytes::from(frame).slice(HEADER_LEN..),
        })
    }

    /// The invocation.
    pub fn invoke(&self) -> Invoke<'_> {
        match Message::decode(Kind::Invoke, &self.body) {
            Ok(Message::Invoke(invoke)) => invoke,
            // Unreachable: the body decoded as an `Invoke` when this was made, and is immutable.
            _ => Invoke::default(),
        }
    }

    /// The event, sharing the frame's buffer.
    pub fn payload(&self) -> Bytes {
        self.body.slice_ref(self.invoke().payload)
    }
}

//! One vsock stream connection between a guest port and a host Unix socket: its state machine
//! and its credit accounting in both directions. It owns the host stream and the only host-side
//! buffer of a connection (guest data the host socket has not taken yet), so every byte the
//! device holds for a connection is bounded here.
//!
//! Credit (virtio 1.2, 5.10.6.3): each side tells the other its receive buffer size
//! (`buf_alloc`) and how many bytes it has consumed so far (`fwd_cnt`, wrapping). A sender may
//! have at most `buf_alloc - (sent - fwd_cnt)` bytes in flight.
//!
//! - Guest to host: Thaw advertises [`CONN_BUF_ALLOC`] and counts in `fwd_cnt` only the bytes the
//!   host socket accepted. When the host reader is slow, the socket fills, `fwd_cnt` stops, and
//!   the guest runs out of credit for this connection (and only this one): that is the
//!   backpressure. Bytes the guest sent within its credit but the socket did not take wait in
//!   `to_host`, which therefore never exceeds `CONN_BUF_ALLOC`; a guest sending past its credit is
//!   reset instead of buffered.
//! - Host to guest: the muxer reads a host socket only while the guest has credit, at most that
//!   much, straight into a guest RX buffer. With no credit, the socket is not read (its data
//!   stays in the kernel and the host writer blocks) until the guest's next credit update.
//!
//! States: `Connecting` (host-initiated, REQUEST sent, waiting for the guest's RESPONSE, with a
//! deadline) → `Established` → `Closing` (the guest shut down both directions; the last guest
//! data is being flushed to the host, with a deadline, then RST). Any error, RST or timeout ends
//! the connection; the muxer then drops it, which closes the host socket.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::packet::{Header, Op, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::{CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD, HOST_CID};

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows.
    Established,
    /// The guest shut down both directions; flushing its last data to the host before RST.
    Closing,
}

/// Which end of the connection is the guest's and which the host's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    /// The host-side port (the port the guest connected to, or the one Thaw picked for a
    /// host-initiated connection).
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
}

/// Control packets a connection still owes the guest, sent in this order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingOps {
    /// REQUEST (host-initiated connect).
    pub request: bool,
    /// RESPONSE (guest-initiated connect accepted).
    pub response: bool,
    /// SHUTDOWN with these flags (0: none).
    pub shutdown: u32,
    /// CREDIT_UPDATE.
    pub credit_update: bool,
    /// CREDIT_REQUEST.
    pub credit_request: bool,
}

impl PendingOps {
    /// Whether nothing is owed.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Takes the next owed operation and its flags.
    pub fn take(&mut self) -> Option<(Op, u32)> {
        if std::mem::take(&mut self.request) {
            Some((Op::Request, 0))
        } else if std::mem::take(&mut self.response) {
            Some((Op::Response, 0))
        } else if self.shutdown != 0 {
            Some((Op::Shutdown, std::mem::take(&mut self.shutdown)))
        } else if std::mem::take(&mut self.credit_update) {
            Some((Op::CreditUpdate, 0))
        } else if std::mem::take(&mut self.credit_request) {
            Some((Op::CreditRequest, 0))
        } else {
            None
        }
    }
}

/// Why a connection must be reset.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The guest sent more than its credit allowed.
    #[error(
        "guest sent {len} bytes with {buffered} already buffered, over its {CONN_BUF_ALLOC}-byte credit"
    )]
    CreditExceeded {
        /// Bytes in the packet.
        len: usize,
        /// Bytes already waiting for the host.
        buffered: usize,
    },
    /// Writing to the host socket failed.
    #[error("host socket write failed: {0}")]
    HostWrite(std::io::Error),
    /// Reading from the host socket failed.
    #[error("host socket read failed: {0}")]
    HostRead(std::io::Error),
}

/// What reading the host socket gave.
#[derive(Debug)]
pub enum HostRead {
    /// `n` bytes (already counted as sent to the guest).
    Data(usize),
    /// Nothing now.
    WouldBlock,
    /// The host closed its sending side.
    Eof,
}

/// A connection.
pub struct Connection {
    /// The host end.
    pub stream: UnixStream,
    /// Where it is in its life.
    pub state: ConnState,
    /// When `Connecting` or `Closing` gives up.
    pub deadline: Option<Instant>,
    /// Control packets owed to the guest.
    pub pending: PendingOps,
    /// Whether the key is in the muxer's control queue.
    pub in_control_queue: bool,
    /// Whether the key is in the muxer's readable queue (its socket has data to move).
    pub in_read_queue: bool,
    /// Whether the muxer sent a CREDIT_REQUEST that the guest has not answered.
    pub credit_requested: bool,
    /// Shutdown flags the guest sent.
    pub guest_shutdown: u32,
    /// The host closed its sending side (EOF read).
    pub host_eof: bool,
    /// The epoll token of the stream.
    pub token: u64,
    /// The events the stream is registered for in the muxer's epoll (empty: not registered).
    pub registered: u32,
    to_host: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    fwd_cnt_told: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    sent_to_guest: Wrapping<u32>,
}

impl Connection {
    /// A connection over `stream` in `state`.
    pub fn new(stream: UnixStream, state: ConnState, token: u64) -> Self {
        Self {
            stream,
            state,
            deadline: None,
            pending: PendingOps::default(),
            in_control_queue: false,
            in_read_queue: false,
            credit_requested: false,
            guest_shutdown: 0,
            host_eof: false,
            token,
            registered: 0,
            to_host: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            sent_to_guest: Wrapping(0),
        }
    }

    /// Takes the guest's credit from any packet it sent on this connection.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Bytes the guest can still receive. A guest whose counters make no sense (more in flight
    /// than its buffer) has none.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.sent_to_guest - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes from the guest waiting for the host socket.
    pub fn buffered_to_host(&self) -> usize {
        self.to_host.len()
    }

    /// Whether the muxer should poll the host socket for reading.
    pub fn wants_read(&self) -> bool {
        self.state == ConnState::Established
            && !self.host_eof
            && self.guest_shutdown & SHUTDOWN_RCV == 0
            && !self.in_read_queue
            && self.peer_credit() > 0
    }

    /// Whether the muxer should poll the host socket for writing.
    pub fn wants_write(&self) -> bool {
        !self.to_host.is_empty()
    }

    /// Whether the guest should be told about freed buffer space now.
    pub fn should_send_credit_update(&self) -> bool {
        (self.fwd_cnt - self.fwd_cnt_told).0 >= CREDIT_UPDATE_THRESHOLD
    }

    /// A header for a packet to the guest, carrying this side's current credit.
    pub fn header(&mut self, key: ConnKey, guest_cid: u64, op: Op, flags: u32) -> Header {
        self.fwd_cnt_told = self.fwd_cnt;
        if op == Op::CreditRequest {
            self.credit_requested = true;
        }
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Guest data for the host: written to the socket now as far as it takes it, the rest kept
    /// (within the credit the guest was given).
    pub fn send_to_host(&mut self, data: &[u8]) -> Result<(), ConnError> {
        if self.to_host.len() + data.len() > CONN_BUF_ALLOC as usize {
            return Err(ConnError::CreditExceeded {
                len: data.len(),
                buffered: self.to_host.len(),
            });
        }
        let mut written = 0;
        if self.to_host.is_empty() {
            written = write_some(&mut self.stream, data).map_err(ConnError::HostWrite)?;
            self.fwd_cnt += Wrapping(written as u32);
        }
        self.to_host.extend(&data[written..]);
        Ok(())
    }

    /// Writes buffered guest data to the host socket; returns whether everything went.
    pub fn flush_to_host(&mut self) -> Result<bool, ConnError> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            let n = write_some(&mut self.stream, front).map_err(ConnError::HostWrite)?;
            if n == 0 {
                return Ok(false);
            }
            self.to_host.drain(..n);
            self.fwd_cnt += Wrapping(n as u32);
        }
        Ok(true)
    }

    /// Reads at most `buf.len()` bytes of host data for the guest (the caller bounds it by the
    /// guest's credit and RX buffer).
    pub fn read_from_host(&mut self, buf: &mut [u8]) -> Result<HostRead, ConnError> {
        loop {
            match self.stream.read(buf) {
                Ok(0) if !buf.is_empty() => return Ok(HostRead::Eof),
                Ok(n) => {
                    self.sent_to_guest += Wrapping(n as u32);
                    return Ok(HostRead::Data(n));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(HostRead::WouldBlock),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(ConnError::HostRead(e)),
            }
        }
    }

    /// Applies the guest's SHUTDOWN flags; returns true when both directions are now shut.
    pub fn guest_shut_down(&mut self, flags: u32) -> bool {
        self.guest_shutdown |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
        self.guest_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND
    }

    /// Closes the host socket's write side once the guest will send nothing more and all it
    /// sent has been written.
    pub fn propagate_guest_eof(&mut self) {
        if self.guest_shutdown & SHUTDOWN_SEND != 0 && self.to_host.is_empty() {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
    }
}

/// Writes what the socket takes now; 0 when it is full.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> std::io::Result<usize> {
    loop {
        match stream.write(data) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::new(a, ConnState::Established, 1), b)
    }

    #[test]
    fn peer_credit_follows_counters_and_distrusts_nonsense() {
        let (mut c, _peer) = pair();
        let mut h = Header {
            buf_alloc: 1000,
            fwd_cnt: 0,
            ..Header::default()
        };
        c.update_peer_credit(&h);
        assert_eq!(c.peer_credit(), 1000);
        c.sent_to_guest = Wrapping(600);
        assert_eq!(c.peer_credit(), 400);
        h.fwd_cnt = 500;
        c.update_peer_credit(&h);
        assert_eq!(c.peer_credit(), 900);
        // fwd_cnt ahead of what was sent: the guest claims to have consumed unsent bytes.
        h.fwd_cnt = 700;
        c.update_peer_credit(&h);
        assert_eq!(c.peer_credit(), 0);
        // Wrapping counters.
        c.sent_to_guest = Wrapping(5);
        h.fwd_cnt = u32::MAX - 4;
        c.update_peer_credit(&h);
        assert_eq!(c.peer_credit(), 990);
    }

    #[test]
    fn guest_data_beyond_credit_is_refused_not_buffered() {
        let (mut c, _peer) = pair();
        // Fill the host socket so nothing more is written.
        let chunk = vec![7u8; 64 * 1024];
        while write_some(&mut c.stream, &chunk).unwrap() > 0 {}
        c.send_to_host(&vec![1u8; CONN_BUF_ALLOC as usize]).unwrap();
        assert_eq!(c.buffered_to_host(), CONN_BUF_ALLOC as usize);
        assert!(matches!(
            c.send_to_host(&[1]),
            Err(ConnError::CreditExceeded { .. })
        ));
        assert_eq!(c.buffered_to_host(), CONN_BUF_ALLOC as usize);
    }

    #[test]
    fn pending_ops_come_out_in_order() {
        let mut p = PendingOps {
            request: false,
            response: true,
            shutdown: SHUTDOWN_SEND,
            credit_update: true,
            credit_request: true,
        };
        assert_eq!(p.take(), Some((Op::Response, 0)));
        assert_eq!(p.take(), Some((Op::Shutdown, SHUTDOWN_SEND)));
        assert_eq!(p.take(), Some((Op::CreditUpdate, 0)));
        assert_eq!(p.take(), Some((Op::CreditRequest, 0)));
        assert_eq!(p.take(), None);
        assert!(p.is_empty());
    }
}

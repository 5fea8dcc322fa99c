//! One vsock stream connection from the guest to the host: its state machine and both
//! directions of credit-based flow control (virtio 1.2, section 5.10.6.3).
//!
//! Credit: each side advertises `buf_alloc` (its receive buffer) and `fwd_cnt` (bytes its
//! application has consumed) in every header. A sender may have at most
//! `peer.buf_alloc - (tx_cnt - peer.fwd_cnt)` bytes unconsumed at the peer. This module is pure
//! bookkeeping; the driver moves the packets.

use crate::vsock::{HOST_CID, PacketHeader, TYPE_STREAM, op};

/// Where a connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// No connection.
    Closed,
    /// REQUEST sent, waiting for RESPONSE.
    Connecting,
    /// Open both ways.
    Connected,
    /// The peer shut down or reset it: received data can still be read, nothing sent.
    PeerClosed,
}

/// Why a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The host answered the REQUEST with RST (nobody listens on that port).
    Refused,
    /// The host reset the connection.
    Reset,
    /// The host shut the connection down.
    Shutdown,
    /// The transport was reset (the VM was restored from a snapshot).
    TransportReset,
    /// The host broke the protocol (overran its credit, unexpected operation).
    Violation,
    /// This side closed it (or gave up waiting).
    Local,
}

/// What the driver must do with a received packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxAction {
    /// Nothing (not ours, or needs no answer).
    Ignore,
    /// Answer the sender with RST: there is no such connection, or the packet is invalid.
    RstSender,
    /// Stream data for this connection; it fits in the receive buffer.
    Data,
    /// Answer with a CREDIT_UPDATE.
    SendCredit,
    /// The connection's state changed; nothing to send.
    Updated,
    /// The peer shut down: answer with RST to complete the close.
    AckShutdown,
    /// Abort the connection: RST to the peer (this side already forgot it).
    Abort,
}

/// A connection and its credit counters. Counters wrap, as the spec's u32 fields do.
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    /// Current state.
    pub state: State,
    /// Why it is no longer `Connected`, once it is not.
    pub ended: Option<Ended>,
    /// The guest's CID.
    pub local_cid: u64,
    /// This connection's guest port.
    pub local_port: u32,
    /// The host port.
    pub peer_port: u32,
    /// Our receive buffer size.
    buf_alloc: u32,
    /// Bytes our application has consumed.
    fwd_cnt: u32,
    /// The `fwd_cnt` last sent to the peer.
    advertised_fwd: u32,
    /// The peer's receive buffer size.
    peer_buf_alloc: u32,
    /// Bytes the peer has consumed.
    peer_fwd_cnt: u32,
    /// Bytes we have sent.
    tx_cnt: u32,
    /// A CREDIT_REQUEST is outstanding.
    pub credit_requested: bool,
}

impl Conn {
    /// A closed connection whose receive buffer holds `buf_alloc` bytes.
    pub fn new(buf_alloc: u32) -> Self {
        Conn {
            state: State::Closed,
            ended: None,
            local_cid: 0,
            local_port: 0,
            peer_port: 0,
            buf_alloc,
            fwd_cnt: 0,
            advertised_fwd: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            credit_requested: false,
        }
    }

    /// Starts a new connection (the caller sends the REQUEST built by [`Self::header`]).
    pub fn open(&mut self, local_cid: u64, local_port: u32, peer_port: u32) {
        *self = Conn {
            state: State::Connecting,
            local_cid,
            local_port,
            peer_port,
            ..Conn::new(self.buf_alloc)
        };
    }

    /// Ends the connection locally.
    pub fn close(&mut self, why: Ended) {
        self.state = State::Closed;
        self.ended.get_or_insert(why);
    }

    /// A header from us to the peer, stamped with our credit.
    pub fn header(&mut self, op: u16, len: u32, flags: u32) -> PacketHeader {
        self.advertised_fwd = self.fwd_cnt;
        PacketHeader {
            src_cid: self.local_cid,
            dst_cid: HOST_CID,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Bytes we may send now.
    pub fn peer_credit(&self) -> u32 {
        let unconsumed = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(unconsumed)
    }

    /// Records `n` bytes sent.
    pub fn sent(&mut self, n: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
    }

    /// Records `n` bytes consumed by the application; true when a CREDIT_UPDATE is due
    /// (a quarter of the window was consumed since the peer last heard our `fwd_cnt`).
    pub fn consumed(&mut self, n: u32) -> bool {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
        self.fwd_cnt.wrapping_sub(self.advertised_fwd) >= self.buf_alloc / 4
    }

    /// Whether `h` belongs to this connection.
    pub fn owns(&self, h: &PacketHeader) -> bool {
        self.state != State::Closed
            && h.src_cid == HOST_CID
            && h.dst_cid == self.local_cid
            && h.src_port == self.peer_port
            && h.dst_port == self.local_port
    }

    /// Handles a received header (`ring_free`: room in our receive buffer for RW data).
    pub fn receive(&mut self, h: &PacketHeader, ring_free: usize) -> RxAction {
        if h.kind != TYPE_STREAM {
            return if h.op == op::RST {
                RxAction::Ignore
            } else {
                RxAction::RstSender
            };
        }
        if !self.owns(h) {
            // No such connection (a stale one, or a host bug): reset it, but never answer RST.
            return if h.op == op::RST {
                RxAction::Ignore
            } else {
                RxAction::RstSender
            };
        }
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
        self.credit_requested = false;
        match (self.state, h.op) {
            (State::Connecting, op::RESPONSE) => {
                self.state = State::Connected;
                RxAction::Updated
            }
            (State::Connecting, op::RST) => {
                self.close(Ended::Refused);
                RxAction::Updated
            }
            (State::Connected, op::RW) if h.len as usize > ring_free => {
                self.close(Ended::Violation);
                RxAction::Abort
            }
            (State::Connected, op::RW) => RxAction::Data,
            (State::Connected, op::CREDIT_UPDATE) => RxAction::Updated,
            (State::Connected, op::CREDIT_REQUEST) => RxAction::SendCredit,
            (State::Connected, op::SHUTDOWN) => {
                self.state = State::PeerClosed;
                self.ended = Some(Ended::Shutdown);
                RxAction::AckShutdown
            }
            (State::Connected, op::RST) => {
                self.state = State::PeerClosed;
                self.ended = Some(Ended::Reset);
                RxAction::Updated
            }
            // After the peer closed, anything more is noise; we already answered.
            (State::PeerClosed, _) => RxAction::Ignore,
            _ => {
                self.close(Ended::Violation);
                RxAction::Abort
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_host(c: &Conn, op: u16, len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: c.local_cid,
            src_port: c.peer_port,
            dst_port: c.local_port,
            len,
            kind: TYPE_STREAM,
            op,
            buf_alloc: 1000,
            ..Default::default()
        }
    }

    fn connected() -> Conn {
        let mut c = Conn::new(4096);
        c.open(3, 50000, 9000);
        let req = c.header(op::REQUEST, 0, 0);
        assert_eq!((req.src_cid, req.dst_cid, req.dst_port), (3, 2, 9000));
        assert_eq!((req.buf_alloc, req.fwd_cnt), (4096, 0));
        assert_eq!(
            c.receive(&from_host(&c, op::RESPONSE, 0), 4096),
            RxAction::Updated
        );
        assert_eq!(c.state, State::Connected);
        c
    }

    #[test]
    fn handshake_and_refusal() {
        connected();
        let mut c = Conn::new(4096);
        c.open(3, 50001, 9000);
        assert_eq!(
            c.receive(&from_host(&c, op::RST, 0), 4096),
            RxAction::Updated
        );
        assert_eq!((c.state, c.ended), (State::Closed, Some(Ended::Refused)));
        // Data before the handshake completes is a violation.
        c.open(3, 50002, 9000);
        assert_eq!(c.receive(&from_host(&c, op::RW, 1), 4096), RxAction::Abort);
        assert_eq!(c.ended, Some(Ended::Violation));
    }

    #[test]
    fn send_credit_follows_the_peer() {
        let mut c = connected();
        assert_eq!(c.peer_credit(), 1000);
        c.sent(600);
        assert_eq!(c.peer_credit(), 400);
        c.sent(400);
        assert_eq!(c.peer_credit(), 0);
        let mut upd = from_host(&c, op::CREDIT_UPDATE, 0);
        upd.fwd_cnt = 700;
        assert_eq!(c.receive(&upd, 4096), RxAction::Updated);
        assert_eq!(c.peer_credit(), 700);
        // Counters wrap.
        c.tx_cnt = 5;
        c.peer_fwd_cnt = u32::MAX - 4;
        assert_eq!(c.peer_credit(), 990);
        // A peer that shrinks its buffer below what is in flight gives zero credit.
        c.peer_buf_alloc = 3;
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn receive_credit_is_advertised_after_a_quarter() {
        let mut c = connected();
        assert_eq!(
            c.receive(&from_host(&c, op::RW, 4096), 4096),
            RxAction::Data
        );
        assert!(!c.consumed(1000));
        assert!(c.consumed(24)); // 1024 = 4096 / 4
        let h = c.header(op::CREDIT_UPDATE, 0, 0);
        assert_eq!(h.fwd_cnt, 1024);
        assert!(!c.consumed(1));
        // The host may not overrun what we advertised.
        assert_eq!(c.receive(&from_host(&c, op::RW, 10), 9), RxAction::Abort);
        assert_eq!((c.state, c.ended), (State::Closed, Some(Ended::Violation)));
    }

    #[test]
    fn control_operations() {
        let mut c = connected();
        assert_eq!(
            c.receive(&from_host(&c, op::CREDIT_REQUEST, 0), 1),
            RxAction::SendCredit
        );
        assert_eq!(c.receive(&from_host(&c, 99, 0), 1), RxAction::Abort);
        let mut c = connected();
        assert_eq!(
            c.receive(&from_host(&c, op::SHUTDOWN, 0), 1),
            RxAction::AckShutdown
        );
        assert_eq!(
            (c.state, c.ended),
            (State::PeerClosed, Some(Ended::Shutdown))
        );
        assert_eq!(c.receive(&from_host(&c, op::RW, 1), 1), RxAction::Ignore);
        let mut c = connected();
        assert_eq!(c.receive(&from_host(&c, op::RST, 0), 1), RxAction::Updated);
        assert_eq!(c.ended, Some(Ended::Reset));
    }

    #[test]
    fn strangers_get_rst_but_rst_gets_nothing() {
        let mut c = connected();
        let mut other = from_host(&c, op::RW, 4);
        other.dst_port = 12345;
        assert_eq!(c.receive(&other, 4096), RxAction::RstSender);
        other.op = op::RST;
        assert_eq!(c.receive(&other, 4096), RxAction::Ignore);
        let mut dgram = from_host(&c, op::RW, 4);
        dgram.kind = 3;
        assert_eq!(c.receive(&dgram, 4096), RxAction::RstSender);
        let mut wrong_cid = from_host(&c, op::RW, 4);
        wrong_cid.dst_cid = 77;
        assert_eq!(c.receive(&wrong_cid, 4096), RxAction::RstSender);
        assert_eq!(c.state, State::Connected);
        c.close(Ended::Local);
        assert_eq!(c.receive(&from_host(&c, op::RW, 1), 1), RxAction::RstSender);
    }
}

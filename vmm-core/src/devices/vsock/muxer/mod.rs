//! The connection multiplexer: every vsock connection and pending host handshake, the epoll set
//! of their host sockets, their timeouts, and the queues of packets waiting for guest RX
//! buffers. The device feeds it guest packets and RX buffers; the VMM thread calls
//! [`Muxer::process_events`] when its epoll fd is readable.
//!
//! What waits for the guest, all bounded:
//!
//! - `resets`: RST packets for connections that no longer exist (at most [`MAX_PENDING_RESETS`];
//!   when half full the device stops taking guest TX, whose packets are what make most of
//!   them, until the guest gives RX buffers again);
//! - `control`: connections owing a control packet, each at most once (so at most
//!   [`MAX_CONNECTIONS`]); the packet itself is built when sent, with fresh credit;
//! - `readable`: connections whose host socket has data and the guest credit to take it, each
//!   at most once. Data is read from the socket straight into the guest's RX buffer, so no host
//!   memory holds it.
//!
//! Sockets are registered in epoll only for what the connection can act on (read while the
//! guest has credit, write while guest data waits), so a stalled connection costs no wakeups.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnError, ConnKey, ConnState, Connection, HostRead};
use super::packet::{
    Header, MAX_PKT_LEN, Op, PacketError, RejectedPacket, RxBuffer, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::unix::{self, Handshake};
use super::{CLOSE_TIMEOUT, HOST_CID, MAX_CONNECTIONS, MAX_PENDING_RESETS, VsockError};

mod host;

const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const FIRST_TOKEN: u64 = 2;
/// Host-initiated connections get host ports from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Most host connections accepted per listener wakeup.
const ACCEPT_BUDGET: usize = 64;

/// All connections of one vsock device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    conns: HashMap<ConnKey, Connection>,
    tokens: HashMap<u64, ConnKey>,
    handshakes: HashMap<u64, Handshake>,
    next_token: u64,
    next_local_port: u32,
    resets: VecDeque<Header>,
    control: VecDeque<ConnKey>,
    readable: VecDeque<ConnKey>,
}

fn epoll_err(source: std::io::Error) -> VsockError {
    VsockError::Epoll(source)
}

impl Muxer {
    /// Listens on `uds_path` for host connections to a guest with CID `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        let listener = unix::listen(&uds_path).map_err(|source| VsockError::Listen {
            path: uds_path.clone(),
            source,
        })?;
        let muxer = Self {
            guest_cid,
            uds_path,
            listener,
            epoll: Epoll::new().map_err(epoll_err)?,
            timer: TimerFd::new().map_err(|e| VsockError::Timer(e.into()))?,
            timer_deadline: None,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            handshakes: HashMap::new(),
            next_token: FIRST_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            resets: VecDeque::new(),
            control: VecDeque::new(),
            readable: VecDeque::new(),
        };
        set_nonblocking(muxer.timer.as_raw_fd()).map_err(VsockError::Timer)?;
        let listener_fd = muxer.listener.as_raw_fd();
        muxer.ctl(
            ControlOperation::Add,
            listener_fd,
            EventSet::IN,
            TOKEN_LISTENER,
        )?;
        let timer_fd = muxer.timer.as_raw_fd();
        muxer.ctl(ControlOperation::Add, timer_fd, EventSet::IN, TOKEN_TIMER)?;
        Ok(muxer)
    }

    fn ctl(
        &self,
        op: ControlOperation,
        fd: RawFd,
        set: EventSet,
        token: u64,
    ) -> Result<(), VsockError> {
        self.epoll
            .ctl(op, fd, EpollEvent::new(set, token))
            .map_err(epoll_err)
    }

    /// The fd the VMM thread polls: readable when a host socket, the listener or a timeout needs
    /// attention.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Live connections (any state).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether packets wait for guest RX buffers.
    pub fn has_rx_work(&self) -> bool {
        !self.resets.is_empty() || !self.control.is_empty() || !self.readable.is_empty()
    }

    /// Whether guest TX must wait: too many resets are queued for the guest already.
    pub fn tx_blocked(&self) -> bool {
        self.resets.len() >= MAX_PENDING_RESETS / 2
    }

    /// Closes every connection and handshake without telling the guest (its driver was reset,
    /// or the transport is being reset, which tells it).
    pub fn reset_all(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        let tokens: Vec<u64> = self.handshakes.keys().copied().collect();
        for token in tokens {
            self.drop_handshake(token);
        }
        self.resets.clear();
        self.control.clear();
        self.readable.clear();
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    // ---- Packets from the guest. ----

    /// Handles a well-formed packet from the guest's TX queue.
    pub fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        let op = hdr.op();
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.src_cid != self.guest_cid {
            guest_warn!(
                src_cid = hdr.src_cid,
                "vsock: packet with a source CID not the guest's; dropped"
            );
            return;
        }
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            tracing::debug!(
                dst_cid = hdr.dst_cid,
                type_ = hdr.type_,
                "vsock: packet not for a host stream; reset"
            );
            if op != Some(Op::Rst) {
                self.reset(key);
            }
            return;
        }
        let Some(op) = op else {
            guest_warn!(
                op = hdr.op,
                ?key,
                "vsock: unknown operation; connection reset"
            );
            self.reset(key);
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            match op {
                Op::Request => self.guest_connect(key, hdr),
                Op::Rst => {}
                _ => {
                    tracing::debug!(?op, ?key, "vsock: packet for no connection; reset");
                    self.push_rst(key);
                }
            }
            return;
        };
        conn.update_peer_credit(hdr);
        conn.credit_requested = false;
        match (conn.state, op) {
            (_, Op::Rst) => {
                tracing::debug!(?key, "vsock: guest reset the connection");
                self.remove(key);
                return;
            }
            (_, Op::Request) => {
                guest_warn!(?key, "vsock: REQUEST for a connection that exists; reset");
                self.reset(key);
                return;
            }
            (ConnState::Connecting, Op::Response) => {
                if let Err(e) = conn_accepted(conn, key) {
                    tracing::warn!(?key, error = %e, "vsock: cannot tell the host program the guest accepted");
                    self.reset(key);
                    return;
                }
            }
            (ConnState::Connecting, _) | (_, Op::Response) => {
                guest_warn!(?op, ?key, state = ?conn.state, "vsock: operation out of sequence; reset");
                self.reset(key);
                return;
            }
            (state, Op::Rw) => {
                if state == ConnState::Closing || conn.guest_shutdown & SHUTDOWN_SEND != 0 {
                    guest_warn!(?key, "vsock: guest sent data after shutting down; reset");
                    self.reset(key);
                    return;
                }
                if let Err(e) = conn.send_to_host(payload) {
                    log_conn_error(key, &e);
                    self.reset(key);
                    return;
                }
                if conn.should_send_credit_update() {
                    conn.pending.credit_update = true;
                }
            }
            (_, Op::CreditUpdate) => {}
            (_, Op::CreditRequest) => conn.pending.credit_update = true,
            (_, Op::Shutdown) => {
                if conn.guest_shut_down(hdr.flags) {
                    if conn.buffered_to_host() == 0 {
                        self.finish(key);
                        return;
                    }
                    conn.state = ConnState::Closing;
                    let deadline = Instant::now() + CLOSE_TIMEOUT;
                    conn.deadline = Some(deadline);
                    self.arm_timer(deadline);
                } else {
                    conn.propagate_guest_eof();
                }
            }
        }
        self.enqueue_control(key);
        self.update_interest(key);
    }

    /// Handles a packet that failed its checks: the connection its header names (if any) is
    /// reset, so the guest learns of it instead of waiting forever.
    pub fn handle_rejected(&mut self, rejected: &RejectedPacket) {
        let Some(hdr) = rejected.header else {
            guest_warn!(reason = %rejected.error, "vsock: unreadable TX packet dropped");
            return;
        };
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        guest_warn!(reason = %rejected.error, ?key, "vsock: bad TX packet; connection reset");
        if hdr.src_cid == self.guest_cid && hdr.op() != Some(Op::Rst) {
            self.reset(key);
        }
    }

    fn guest_connect(&mut self, key: ConnKey, hdr: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            guest_warn!(
                ?key,
                limit = MAX_CONNECTIONS,
                "vsock: connection limit reached; guest connect refused"
            );
            self.push_rst(key);
            return;
        }
        let path = unix::port_path(&self.uds_path, key.local_port);
        let stream = match unix::connect(&path) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "vsock: guest connect refused by the host");
                self.push_rst(key);
                return;
            }
        };
        let token = self.token();
        let mut conn = Connection::new(stream, ConnState::Established, token);
        conn.update_peer_credit(hdr);
        conn.pending.response = true;
        self.conns.insert(key, conn);
        self.tokens.insert(token, key);
        tracing::debug!(?key, "vsock: guest connected to the host");
        self.enqueue_control(key);
        self.update_interest(key);
    }

    // ---- Packets to the guest. ----

    /// Writes the next waiting packet into `buf`; returns its length, or `None` when nothing
    /// could be sent (the caller returns the buffer to the ring). `scratch` holds host data on
    /// its way into the buffer.
    pub fn fill_rx(
        &mut self,
        buf: RxBuffer<'_>,
        scratch: &mut [u8],
    ) -> Result<Option<u32>, PacketError> {
        loop {
            if let Some(hdr) = self.resets.pop_front() {
                return buf.write(hdr, &[]).map(Some);
            }
            while let Some(key) = self.control.pop_front() {
                let Some(conn) = self.conns.get_mut(&key) else {
                    continue;
                };
                conn.in_control_queue = false;
                let Some((op, flags)) = conn.pending.take() else {
                    continue;
                };
                if !conn.pending.is_empty() {
                    conn.in_control_queue = true;
                    self.control.push_front(key);
                }
                let hdr = conn.header(key, self.guest_cid, op, flags);
                return buf.write(hdr, &[]).map(Some);
            }
            while let Some(key) = self.readable.pop_front() {
                let Some(conn) = self.conns.get_mut(&key) else {
                    continue;
                };
                conn.in_read_queue = false;
                if conn.state != ConnState::Established || conn.host_eof {
                    self.update_interest(key);
                    continue;
                }
                let credit = conn.peer_credit() as usize;
                if credit == 0 {
                    if !conn.credit_requested {
                        conn.pending.credit_request = true;
                        self.enqueue_control(key);
                    }
                    self.update_interest(key);
                    continue;
                }
                let max = credit
                    .min(buf.capacity())
                    .min(MAX_PKT_LEN as usize)
                    .min(scratch.len());
                if max == 0 {
                    // A header-only RX buffer cannot carry data; try again with the next one.
                    conn.in_read_queue = true;
                    self.readable.push_front(key);
                    return Ok(None);
                }
                match conn.read_from_host(&mut scratch[..max]) {
                    Ok(HostRead::Data(n)) => {
                        let hdr = conn.header(key, self.guest_cid, Op::Rw, 0);
                        conn.in_read_queue = true;
                        self.readable.push_back(key);
                        return buf.write(hdr, &scratch[..n]).map(Some);
                    }
                    Ok(HostRead::WouldBlock) => self.update_interest(key),
                    Ok(HostRead::Eof) => {
                        conn.host_eof = true;
                        conn.pending.shutdown |= SHUTDOWN_SEND;
                        self.enqueue_control(key);
                        self.update_interest(key);
                    }
                    Err(e) => {
                        log_conn_error(key, &e);
                        self.reset(key);
                    }
                }
            }
            // Reading may have queued a SHUTDOWN or a RST: send those before giving up.
            if self.resets.is_empty() && self.control.is_empty() {
                return Ok(None);
            }
        }
    }

    // ---- Bookkeeping. ----

    fn enqueue_control(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.pending.is_empty() && !conn.in_control_queue {
                conn.in_control_queue = true;
                self.control.push_back(key);
            }
        }
    }

    /// Registers the connection's socket for exactly what it can act on now.
    fn update_interest(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let mut want = EventSet::empty();
        if conn.wants_read() {
            want |= EventSet::IN;
        }
        if conn.wants_write() {
            want |= EventSet::OUT;
        }
        let (old, token, fd) = (conn.registered, conn.token, conn.stream.as_raw_fd());
        if want.bits() == old {
            return;
        }
        let op = match (old, want.is_empty()) {
            (0, _) => ControlOperation::Add,
            (_, true) => ControlOperation::Delete,
            _ => ControlOperation::Modify,
        };
        conn.registered = want.bits();
        if let Err(e) = self.ctl(op, fd, want, token) {
            tracing::warn!(?key, error = %e, "vsock: cannot poll a host socket; reset");
            self.reset(key);
        }
    }

    /// Drops a connection, closing its host socket, without telling the guest.
    fn remove(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        if conn.registered != 0 {
            let _ = self.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EventSet::empty(),
                conn.token,
            );
        }
        self.tokens.remove(&conn.token);
        if conn.in_control_queue {
            self.control.retain(|k| *k != key);
        }
        if conn.in_read_queue {
            self.readable.retain(|k| *k != key);
        }
    }

    /// Drops a connection and sends the guest a RST for it.
    fn reset(&mut self, key: ConnKey) {
        self.remove(key);
        self.push_rst(key);
    }

    /// The guest shut the connection down and everything it sent reached the host: close the
    /// host socket and confirm with RST, as Linux expects.
    fn finish(&mut self, key: ConnKey) {
        tracing::debug!(?key, "vsock: connection closed by the guest");
        self.reset(key);
    }

    fn push_rst(&mut self, key: ConnKey) {
        if self.resets.len() >= MAX_PENDING_RESETS {
            guest_warn!(
                ?key,
                "vsock: too many resets waiting for the guest; one dropped"
            );
            return;
        }
        self.resets.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            type_: TYPE_STREAM,
            op: Op::Rst as u16,
            ..Header::default()
        });
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The listener is this device's; leave no stale socket behind.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

/// The guest accepted a host-initiated connection: tell the host program which port it got.
fn conn_accepted(conn: &mut Connection, key: ConnKey) -> std::io::Result<()> {
    use std::io::Write;
    let line = format!("OK {}\n", key.local_port);
    // A fresh socket's send buffer is empty, so this small write goes through whole or fails.
    let n = conn.stream.write(line.as_bytes())?;
    if n != line.len() {
        return Err(std::io::Error::other("short write of the OK line"));
    }
    conn.state = ConnState::Established;
    conn.deadline = None;
    tracing::debug!(?key, "vsock: guest accepted a host connection");
    Ok(())
}

fn log_conn_error(key: ConnKey, e: &ConnError) {
    match e {
        ConnError::CreditExceeded { .. } => {
            guest_warn!(?key, error = %e, "vsock: guest ignored flow control; reset")
        }
        _ => tracing::debug!(?key, error = %e, "vsock: host socket failed; reset"),
    }
}

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL on an fd this process owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above, setting flags only.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

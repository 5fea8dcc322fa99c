//! The host side of the multiplexer: the listener and the `CONNECT P` handshakes of host
//! programs, readiness of host sockets, and the timeouts of half-open connections. Split from
//! [`super`] so each file stays readable; the state is the same `Muxer`.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::{ACCEPT_BUDGET, FIRST_LOCAL_PORT, Muxer, TOKEN_LISTENER, TOKEN_TIMER, log_conn_error};
use crate::devices::vsock::connection::{ConnKey, ConnState, Connection};
use crate::devices::vsock::unix::{Handshake, HandshakeStep};
use crate::devices::vsock::{CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT, MAX_CONNECTIONS, MAX_HANDSHAKES};

impl Muxer {
    // ---- Host events. ----

    /// Handles whatever the host sockets, the listener and the timer have ready.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "vsock: epoll_wait failed");
                return;
            }
        };
        for event in &events[..n] {
            match event.data() {
                TOKEN_LISTENER => self.accept_host_connections(),
                TOKEN_TIMER => self.expire(),
                token => {
                    if let Some(key) = self.tokens.get(&token).copied() {
                        self.connection_event(key, event.event_set());
                    } else if self.handshakes.contains_key(&token) {
                        self.handshake_event(token);
                    }
                }
            }
        }
    }

    fn connection_event(&mut self, key: ConnKey, events: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if events.contains(EventSet::ERROR) {
            tracing::debug!(?key, "vsock: host socket error; reset");
            self.reset(key);
            return;
        }
        let hangup = events.contains(EventSet::HANG_UP);
        if events.contains(EventSet::OUT) || (hangup && conn.wants_write()) {
            match conn.flush_to_host() {
                Ok(drained) => {
                    if conn.should_send_credit_update() {
                        conn.pending.credit_update = true;
                    }
                    if drained {
                        conn.propagate_guest_eof();
                        if conn.state == ConnState::Closing {
                            self.finish(key);
                            return;
                        }
                    }
                }
                Err(e) => {
                    log_conn_error(key, &e);
                    self.reset(key);
                    return;
                }
            }
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let registered_in = conn.registered & EventSet::IN.bits() != 0;
        if registered_in && (events.contains(EventSet::IN) || hangup) && !conn.in_read_queue {
            conn.in_read_queue = true;
            self.readable.push_back(key);
        }
        self.enqueue_control(key);
        self.update_interest(key);
    }

    fn accept_host_connections(&mut self) {
        for _ in 0..ACCEPT_BUDGET {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: accept on the host socket failed");
                    return;
                }
            };
            if self.handshakes.len() >= MAX_HANDSHAKES || self.conns.len() >= MAX_CONNECTIONS {
                tracing::warn!("vsock: too many host connections; one closed");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                tracing::warn!(error = %e, "vsock: host connection unusable");
                continue;
            }
            let token = self.token();
            if let Err(e) = self.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EventSet::IN,
                token,
            ) {
                tracing::warn!(error = %e, "vsock: cannot poll a host connection");
                continue;
            }
            let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
            self.handshakes
                .insert(token, Handshake::new(stream, deadline));
            self.arm_timer(deadline);
        }
    }

    fn handshake_event(&mut self, token: u64) {
        let Some(handshake) = self.handshakes.get_mut(&token) else {
            return;
        };
        let port = match handshake.read() {
            HandshakeStep::Incomplete => return,
            HandshakeStep::Invalid(reason) => {
                tracing::warn!(reason, "vsock: bad host connection request; closed");
                self.drop_handshake(token);
                return;
            }
            HandshakeStep::Connect(port) => port,
        };
        let Some(handshake) = self.drop_handshake(token) else {
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!(
                port,
                "vsock: connection limit reached; host connect refused"
            );
            return;
        }
        let Some(local_port) = self.allocate_local_port(port) else {
            tracing::warn!(port, "vsock: no free host port; host connect refused");
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let token = self.token();
        let mut conn = Connection::new(handshake.stream, ConnState::Connecting, token);
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        conn.deadline = Some(deadline);
        conn.pending.request = true;
        self.conns.insert(key, conn);
        self.tokens.insert(token, key);
        self.arm_timer(deadline);
        self.enqueue_control(key);
        tracing::debug!(?key, "vsock: host connecting to the guest");
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = match port.checked_add(1) {
                Some(p) if p != u32::MAX => p,
                _ => FIRST_LOCAL_PORT,
            };
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    pub(super) fn drop_handshake(&mut self, token: u64) -> Option<Handshake> {
        let handshake = self.handshakes.remove(&token)?;
        let fd = handshake.stream.as_raw_fd();
        let _ = self.ctl(ControlOperation::Delete, fd, EventSet::empty(), token);
        Some(handshake)
    }

    // ---- Timeouts. ----

    pub(super) fn arm_timer(&mut self, deadline: Instant) {
        if self.timer_deadline.is_some_and(|armed| armed <= deadline) {
            return;
        }
        let delay = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match self.timer.reset(delay, None) {
            Ok(()) => self.timer_deadline = Some(deadline),
            Err(e) => tracing::warn!(error = %e, "vsock: cannot arm the timeout timer"),
        }
    }

    fn expire(&mut self) {
        // Non-blocking: nothing to read just means the timer was re-armed meanwhile.
        let _ = self.timer.wait();
        self.timer_deadline = None;
        let now = Instant::now();
        let late: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in late {
            tracing::warn!("vsock: host connection sent no CONNECT line in time; closed");
            self.drop_handshake(token);
        }
        let late: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in late {
            tracing::warn!(
                ?key,
                "vsock: connection did not open or close in time; reset"
            );
            self.reset(key);
        }
        let next = self
            .handshakes
            .values()
            .map(|h| h.deadline)
            .chain(self.conns.values().filter_map(|c| c.deadline))
            .min();
        if let Some(next) = next {
            self.arm_timer(next);
        }
    }
}

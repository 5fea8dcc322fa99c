//! The connection's blocking calls: connect, send (within the host's credit), receive, close.

use super::{Driver, Error, FIRST_PORT, MAX_PKT, STALL_NS, Slot, TX, Transport};
use crate::conn::{Ended, State};
use crate::virtq::Desc;
use crate::vsock::op;

impl<T: Transport> Driver<T> {
    /// Polls once; if nothing happened, idles. Fails if a tx chain is overdue.
    fn wait_step(&mut self) -> Result<(), Error> {
        if self.poll() {
            return Ok(());
        }
        let now = self.tick();
        let overdue = self.slots.iter().any(
            |s| matches!(s, Slot::Busy { since, .. } if now.saturating_sub(*since) > STALL_NS),
        );
        if overdue {
            return Err(Error::Stalled);
        }
        self.t.idle();
        Ok(())
    }

    /// A fresh local port.
    pub fn next_local_port(&mut self) -> u32 {
        let port = self.next_port;
        self.next_port = if port == u32::from(u16::MAX) {
            FIRST_PORT
        } else {
            port + 1
        };
        port
    }

    /// Opens a connection to host port `port` (closing any open one first).
    pub fn connect(&mut self, port: u32, timeout_ns: u64) -> Result<(), Error> {
        self.close();
        let local = self.next_local_port();
        self.conn.open(self.guest_cid, local, port);
        self.ring.clear();
        let req = self.conn.header(op::REQUEST, 0, 0);
        self.queue_ctrl(req);
        let deadline = self.t.now_ns().saturating_add(timeout_ns);
        while self.conn.state == State::Connecting {
            if self.t.now_ns() > deadline {
                self.close();
                return Err(Error::Timeout);
            }
            self.wait_step()?;
        }
        match self.conn.state {
            State::Connected => Ok(()),
            _ => Err(Error::Closed(self.conn.ended.unwrap_or(Ended::Local))),
        }
    }

    /// Aborts the connection with RST (nothing happens if there is none).
    pub fn close(&mut self) {
        if matches!(self.conn.state, State::Connecting | State::Connected) {
            let rst = self.conn.header(op::RST, 0, 0);
            self.queue_ctrl(rst);
            self.flush_ctrl();
        }
        self.conn.close(Ended::Local);
    }

    fn closed_error(&self) -> Error {
        Error::Closed(self.conn.ended.unwrap_or(Ended::Local))
    }

    /// Sends all of `data`, respecting the host's credit; returns once the device has read it.
    pub fn send(&mut self, data: &[u8]) -> Result<(), Error> {
        let mut off = 0;
        let mut queued = false;
        while off < data.len() {
            if self.conn.state != State::Connected {
                return Err(self.closed_error());
            }
            let credit = self.conn.peer_credit() as usize;
            let slot = if credit > 0 { self.take_slot() } else { None };
            if let Some(s) = slot {
                let n = credit.min(MAX_PKT).min(data.len() - off);
                let h = self.conn.header(op::RW, n as u32, 0);
                let addr = data[off..].as_ptr() as u64;
                let d = Desc {
                    addr,
                    len: n as u32,
                    flags: 0,
                    next: 0,
                };
                self.fill_slot(s, &h, None, Some(d), true);
                self.conn.sent(n as u32);
                off += n;
                queued = true;
                continue;
            }
            if credit == 0 && !self.conn.credit_requested {
                self.conn.credit_requested = true;
                let req = self.conn.header(op::CREDIT_REQUEST, 0, 0);
                self.queue_ctrl(req);
            }
            if queued {
                self.kick(TX);
                queued = false;
            }
            self.wait_step()?;
        }
        if queued {
            self.kick(TX);
        }
        // The device reads `data` until it returns the chains; only then may the caller reuse it.
        while self
            .slots
            .iter()
            .any(|s| matches!(s, Slot::Busy { data: true, .. }))
        {
            self.wait_step()?;
        }
        Ok(())
    }

    /// Receives at least one byte into `buf` (unless it is empty); fails once the connection
    /// has ended and everything it delivered was read.
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<usize, Error> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.ring.is_empty() && self.conn.state != State::Closed {
                let n = self.ring.pop(buf);
                if self.conn.consumed(n as u32) && self.conn.state == State::Connected {
                    self.credit_update_due = true;
                    self.flush_ctrl();
                }
                return Ok(n);
            }
            if self.conn.state != State::Connected {
                return Err(self.closed_error());
            }
            self.wait_step()?;
        }
    }

    /// Fills all of `buf`.
    pub fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), Error> {
        let mut at = 0;
        while at < buf.len() {
            at += self.recv(&mut buf[at..])?;
        }
        Ok(())
    }

    /// Polls for `ns` nanoseconds.
    pub fn poll_for(&mut self, ns: u64) {
        let deadline = self.t.now_ns().saturating_add(ns);
        while self.t.now_ns() < deadline {
            if !self.poll() {
                self.t.idle();
            }
        }
    }
}

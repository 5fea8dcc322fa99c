//! A polling virtio-vsock driver for one stream connection to the host, over the three split
//! virtqueues (rx = 0, tx = 1, event = 2). No interrupts: every blocking call polls the used
//! rings. The transport (virtio-mmio in the guest, a simulated device in tests) only notifies
//! queues, reads the guest CID and tells the time.
//!
//! - **rx**: `RX_BUFFERS` chains of a 44-byte header buffer and a 64 KiB data buffer, always
//!   posted. Data is copied into the connection's receive ring (`BUF_ALLOC` bytes, the
//!   `buf_alloc` advertised) and the chain reposted at once.
//! - **tx**: `TX_SLOTS` slots of two descriptors (header, data); data descriptors point straight
//!   into the caller's buffer (zero copy), so `send` returns only once the device has
//!   returned them. Packets carry at most 64 KiB and never more than the host's credit.
//! - **event**: `EVENT_BUFFERS` 4-byte buffers; a transport reset ends the connection.
//!
//! Credit: our `fwd_cnt` goes out in every header, and a CREDIT_UPDATE once a quarter of
//! `BUF_ALLOC` was consumed unannounced or when the host sends CREDIT_REQUEST; when the host's
//! credit is exhausted the driver sends one CREDIT_REQUEST and waits.

use crate::conn::{Conn, Ended, RxAction, State};
use crate::ring::ByteRing;
use crate::virtq::{
    DESC_F_NEXT, DESC_F_WRITE, Desc, QueueMem, QueueTransport, RunClock, Virtqueue,
};

mod raw;
mod stream;
use crate::vsock::{EVENT_LEN, EVENT_TRANSPORT_RESET, HDR_LEN, PacketHeader, op};

/// rx chains posted.
pub const RX_BUFFERS: usize = 32;
/// Data bytes per rx chain.
pub const RX_BUF_SIZE: usize = 64 * 1024;
/// tx packets in flight at most.
pub const TX_SLOTS: usize = 64;
/// Event buffers posted.
pub const EVENT_BUFFERS: usize = 4;
/// Largest data packet sent (the usual device limit).
pub const MAX_PKT: usize = 64 * 1024;
/// The connection's receive buffer (`buf_alloc`).
pub const BUF_ALLOC: usize = 1024 * 1024;
/// Queue indexes.
pub const RX: usize = 0;
/// The transmit queue.
pub const TX: usize = 1;
/// The event queue.
pub const EVENT: usize = 2;
/// Fewest descriptors a queue must offer.
pub const MIN_QUEUE: u16 = 4;
/// A tx chain the device has not returned after this long means the device is stuck. Measured
/// on a clock that advances at most `MAX_TICK_NS` between two readings, so time the whole VM
/// spends paused (a snapshot and restore, a long host preemption) does not count.
pub const STALL_NS: u64 = 5_000_000_000;
/// Largest step of the stall clock.
const MAX_TICK_NS: u64 = 10_000_000;
/// First local port; ports count up from here (so stale packets never match a new connection).
const FIRST_PORT: u32 = 49152;
/// Control packets waiting for a tx slot.
const CTRL_QUEUE: usize = 128;
const HDR_SLOT: usize = 64;

/// The memory the driver shares with the device. All zeroes is a valid initial value, so a
/// `static` of it lives in .bss.
#[repr(C, align(4096))]
pub struct DriverMemory {
    queues: [QueueMem; 3],
    rx_hdrs: [[u8; HDR_SLOT]; RX_BUFFERS],
    tx_hdrs: [[u8; HDR_SLOT]; TX_SLOTS],
    events: [[u8; HDR_SLOT]; EVENT_BUFFERS],
    rx_data: [[u8; RX_BUF_SIZE]; RX_BUFFERS],
    /// Control packets waiting for a tx slot (the driver's alone; here to keep `Driver` small).
    ctrl: [PacketHeader; CTRL_QUEUE],
}

/// What the driver needs from the transport: what every queue driver needs, and the guest CID.
pub trait Transport: QueueTransport {
    /// Reads the guest CID from the device's configuration space.
    fn guest_cid(&mut self) -> u64;
}

/// Why a driver call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The connection ended (or never opened).
    Closed(Ended),
    /// No answer in time.
    Timeout,
    /// The device kept a tx buffer for longer than `STALL_NS`: it must be reset.
    Stalled,
    /// The device offers queues smaller than `MIN_QUEUE`.
    QueueTooSmall,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Free,
    /// In the device's hands since the given time; `data` when it points at caller data.
    Busy {
        since: u64,
        data: bool,
    },
    /// Given up on (sent by `send_raw` and not returned); freed if it ever comes back.
    Abandoned,
}

/// Counters, for logs and the misbehaviour checks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Transport resets seen on the event queue.
    pub transport_resets: u32,
    /// Packets received and sent.
    pub rx_packets: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Received packets not for the open connection, by operation (index 0: unknown ops).
    pub foreign: [u32; 8],
    /// rx chains the device returned malformed (short header, data longer than written).
    pub bad_rx: u32,
    /// Used entries naming a chain the driver never offered.
    pub bad_used: u32,
    /// Control packets dropped because the control queue was full.
    pub ctrl_dropped: u32,
}

/// The driver.
pub struct Driver<T: Transport> {
    t: T,
    mem: *mut DriverMemory,
    queues: [Virtqueue; 3],
    rx_count: u16,
    ev_count: u16,
    ring: ByteRing,
    conn: Conn,
    guest_cid: u64,
    slots: [Slot; TX_SLOTS],
    slot_count: usize,
    ctrl_len: usize,
    credit_update_due: bool,
    next_port: u32,
    /// The stall clock (see `STALL_NS`).
    run_clock: RunClock,
    /// Counters.
    pub stats: Stats,
}

impl<T: Transport> Driver<T> {
    /// Sets up the queues in `mem` with `sizes` descriptors (rx, tx, event; each rounded down
    /// to a power of two) and posts the rx and event buffers, without notifying: the caller
    /// tells the device the queue addresses, sets DRIVER_OK, then calls [`Self::start`].
    ///
    /// # Safety
    /// `mem` must be valid memory that only this driver and the device use from now on.
    pub unsafe fn new(
        mut t: T,
        mem: *mut DriverMemory,
        ring: &'static mut [u8],
        sizes: [u16; 3],
    ) -> Result<Self, Error> {
        if sizes.iter().any(|s| *s < MIN_QUEUE) {
            return Err(Error::QueueTooSmall);
        }
        // SAFETY: the queue memories are disjoint parts of `mem`, which the caller hands over.
        let queues =
            unsafe { [0, 1, 2].map(|i| Virtqueue::new(&raw mut (*mem).queues[i], sizes[i])) };
        let guest_cid = t.guest_cid();
        let run_clock = RunClock::new(t.now_ns(), MAX_TICK_NS);
        let ring = ByteRing::new(ring);
        let mut d = Driver {
            rx_count: 0,
            ev_count: 0,
            slot_count: 0,
            t,
            mem,
            queues,
            conn: Conn::new(ring.capacity() as u32),
            ring,
            guest_cid,
            slots: [Slot::Free; TX_SLOTS],
            ctrl_len: 0,
            credit_update_due: false,
            next_port: FIRST_PORT,
            run_clock,
            stats: Stats::default(),
        };
        d.post_all();
        Ok(d)
    }

    /// Starts over on queues of `sizes` after the device was reset: every buffer is the
    /// driver's again, the connection is gone; the port counter and the statistics remain.
    pub fn reinit(&mut self, sizes: [u16; 3]) -> Result<(), Error> {
        if sizes.iter().any(|s| *s < MIN_QUEUE) {
            return Err(Error::QueueTooSmall);
        }
        let m = self.mem;
        // SAFETY: as in `new`: the caller of `new` handed `mem` over for good, and the device
        // was reset, so it no longer uses the old queues.
        self.queues =
            unsafe { [0, 1, 2].map(|i| Virtqueue::new(&raw mut (*m).queues[i], sizes[i])) };
        self.conn = Conn::new(self.ring.capacity() as u32);
        self.conn.ended = Some(Ended::Local);
        self.ring.clear();
        self.slots = [Slot::Free; TX_SLOTS];
        self.ctrl_len = 0;
        self.credit_update_due = false;
        self.guest_cid = self.t.guest_cid();
        self.post_all();
        Ok(())
    }

    /// Posts every rx and event buffer (not yet notified).
    fn post_all(&mut self) {
        self.rx_count = (self.queues[RX].size() / 2).min(RX_BUFFERS as u16);
        self.ev_count = self.queues[EVENT].size().min(EVENT_BUFFERS as u16);
        self.slot_count = usize::from(self.queues[TX].size() / 2).min(TX_SLOTS);
        for i in 0..self.rx_count {
            self.post_rx(i);
        }
        for i in 0..self.ev_count {
            self.post_event(i);
        }
        self.queues[RX].publish();
        self.queues[EVENT].publish();
    }

    /// Descriptor table, available ring and used ring addresses of queue `q`.
    pub fn queue_addresses(&self, q: usize) -> (u64, u64, u64) {
        self.queues[q].addresses()
    }

    /// Descriptors in queue `q`.
    pub fn queue_size(&self, q: usize) -> u16 {
        self.queues[q].size()
    }

    /// Tells the device about the posted rx and event buffers (after DRIVER_OK).
    pub fn start(&mut self) {
        self.t.notify(RX as u16);
        self.t.notify(EVENT as u16);
    }

    /// The transport.
    pub fn transport(&mut self) -> &mut T {
        &mut self.t
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The connection's state and, once it ended, why.
    pub fn state(&self) -> (State, Option<Ended>) {
        (self.conn.state, self.conn.ended)
    }

    /// The connection's local port.
    pub fn local_port(&self) -> u32 {
        self.conn.local_port
    }

    fn post_rx(&mut self, i: u16) {
        // SAFETY: computing addresses inside `mem`, which outlives the driver.
        let (hdr, data) = unsafe {
            let m = self.mem;
            (
                (&raw mut (*m).rx_hdrs[usize::from(i)]) as u64,
                (&raw mut (*m).rx_data[usize::from(i)]) as u64,
            )
        };
        let q = &mut self.queues[RX];
        let head = 2 * i;
        let next = head + 1;
        let flags = DESC_F_WRITE | DESC_F_NEXT;
        let (len, data_len) = (HDR_LEN as u32, RX_BUF_SIZE as u32);
        q.set_desc(
            head,
            Desc {
                addr: hdr,
                len,
                flags,
                next,
            },
        );
        let flags = DESC_F_WRITE;
        q.set_desc(
            next,
            Desc {
                addr: data,
                len: data_len,
                flags,
                next: 0,
            },
        );
        q.push(head);
    }

    fn post_event(&mut self, i: u16) {
        // SAFETY: as in `post_rx`.
        let addr = unsafe { (&raw mut (*self.mem).events[usize::from(i)]) as u64 };
        let len = EVENT_LEN as u32;
        self.queues[EVENT].set_desc(
            i,
            Desc {
                addr,
                len,
                flags: DESC_F_WRITE,
                next: 0,
            },
        );
        self.queues[EVENT].push(i);
    }

    fn kick(&mut self, q: usize) {
        self.queues[q].kick(&mut self.t, q as u16);
    }

    /// Handles everything the device returned; true if anything was.
    pub fn poll(&mut self) -> bool {
        let mut progress = false;
        while let Some(u) = self.queues[TX].pop_used() {
            progress = true;
            let slot = (u.id / 2) as usize;
            if u.id % 2 != 0 || slot >= self.slot_count || self.slots[slot] == Slot::Free {
                self.stats.bad_used += 1;
                continue;
            }
            self.slots[slot] = Slot::Free;
        }
        let mut reposted = false;
        while let Some(u) = self.queues[EVENT].pop_used() {
            progress = true;
            let Some(i) = u16::try_from(u.id).ok().filter(|i| *i < self.ev_count) else {
                self.stats.bad_used += 1;
                continue;
            };
            // SAFETY: the device returned event buffer `i`; it is ours until reposted.
            let event =
                unsafe { core::ptr::read_volatile(&raw const (*self.mem).events[usize::from(i)]) };
            if u32::from_le_bytes([event[0], event[1], event[2], event[3]]) == EVENT_TRANSPORT_RESET
            {
                self.transport_reset();
            }
            self.post_event(i);
            reposted = true;
        }
        if reposted {
            self.kick(EVENT);
        }
        let mut reposted = false;
        while let Some(u) = self.queues[RX].pop_used() {
            progress = true;
            let Some(i) = u16::try_from(u.id / 2)
                .ok()
                .filter(|i| *i < self.rx_count && u.id % 2 == 0)
            else {
                self.stats.bad_used += 1;
                continue;
            };
            self.receive(i, u.len);
            self.post_rx(i);
            reposted = true;
        }
        if reposted {
            self.kick(RX);
        }
        self.flush_ctrl();
        progress
    }

    fn receive(&mut self, i: u16, written: u32) {
        let i = usize::from(i);
        // SAFETY: the device returned chain `i`; its buffers are ours until reposted.
        let raw = unsafe { core::ptr::read_volatile(&raw const (*self.mem).rx_hdrs[i]) };
        let mut hdr = [0u8; HDR_LEN];
        hdr.copy_from_slice(&raw[..HDR_LEN]);
        let h = PacketHeader::decode(&hdr);
        let len = h.len as usize;
        if (written as usize) < HDR_LEN || len > RX_BUF_SIZE || len > written as usize - HDR_LEN {
            self.stats.bad_rx += 1;
            return;
        }
        self.stats.rx_packets += 1;
        if !self.conn.owns(&h) {
            self.stats.foreign[if h.op < 8 { usize::from(h.op) } else { 0 }] += 1;
        }
        match self.conn.receive(&h, self.ring.free()) {
            RxAction::Ignore | RxAction::Updated => {}
            RxAction::Data => {
                // SAFETY: as above; `len <= RX_BUF_SIZE` was checked.
                let data = unsafe {
                    core::slice::from_raw_parts(
                        (&raw const (*self.mem).rx_data[i]).cast::<u8>(),
                        len,
                    )
                };
                self.ring.push(data);
            }
            RxAction::RstSender => {
                let mut rst = h.reply(op::RST);
                rst.src_cid = self.guest_cid;
                self.queue_ctrl(rst);
            }
            RxAction::SendCredit => self.credit_update_due = true,
            RxAction::AckShutdown => {
                let rst = self.conn.header(op::RST, 0, 0);
                self.queue_ctrl(rst);
            }
            RxAction::Abort => {
                self.ring.clear();
                let rst = self.conn.header(op::RST, 0, 0);
                self.queue_ctrl(rst);
            }
        }
    }

    fn transport_reset(&mut self) {
        self.stats.transport_resets += 1;
        if self.conn.state != State::Closed {
            self.conn.close(Ended::TransportReset);
        }
        // A reset after the connection already ended still ends the next wait.
        self.conn.ended = Some(Ended::TransportReset);
        self.conn.state = State::Closed;
        self.ring.clear();
        self.ctrl_len = 0;
        self.credit_update_due = false;
        self.guest_cid = self.t.guest_cid();
    }

    /// Advances and reads the stall clock.
    fn tick(&mut self) -> u64 {
        let now = self.t.now_ns();
        self.run_clock.tick(now)
    }

    fn queue_ctrl(&mut self, h: PacketHeader) {
        if self.ctrl_len == CTRL_QUEUE {
            self.stats.ctrl_dropped += 1;
            return;
        }
        // SAFETY: the control queue is part of `mem` that the device never sees.
        unsafe { (*self.mem).ctrl[self.ctrl_len] = h };
        self.ctrl_len += 1;
    }

    fn take_slot(&mut self) -> Option<usize> {
        self.slots[..self.slot_count]
            .iter()
            .position(|s| *s == Slot::Free)
    }

    /// Puts a packet in slot `s`: `h` in the slot's header buffer (or `hdr_desc` instead), and
    /// optionally a data descriptor (`callers_data`: it points at a `send` caller's buffer).
    /// Not yet published.
    fn fill_slot(
        &mut self,
        s: usize,
        h: &PacketHeader,
        hdr_desc: Option<Desc>,
        data: Option<Desc>,
        callers_data: bool,
    ) {
        let now = self.tick();
        let head = (2 * s) as u16;
        let mut first = hdr_desc.unwrap_or_else(|| {
            // SAFETY: slot `s` is free, so its header buffer is not in the device's hands.
            let addr = unsafe {
                let b = &raw mut (*self.mem).tx_hdrs[s];
                let mut buf = [0u8; HDR_SLOT];
                buf[..HDR_LEN].copy_from_slice(&h.encode());
                core::ptr::write_volatile(b, buf);
                b as u64
            };
            Desc {
                addr,
                len: HDR_LEN as u32,
                flags: 0,
                next: 0,
            }
        });
        if let Some(d) = data {
            first.flags |= DESC_F_NEXT;
            first.next = head + 1;
            self.queues[TX].set_desc(
                head + 1,
                Desc {
                    flags: d.flags & !DESC_F_NEXT,
                    ..d
                },
            );
        }
        self.queues[TX].set_desc(head, first);
        self.queues[TX].push(head);
        self.slots[s] = Slot::Busy {
            since: now,
            data: callers_data,
        };
        self.stats.tx_packets += 1;
    }

    fn flush_ctrl(&mut self) {
        let mut queued = false;
        loop {
            let h = if self.ctrl_len > 0 {
                // SAFETY: as in `queue_ctrl`.
                unsafe { (*self.mem).ctrl[0] }
            } else if self.credit_update_due && self.conn.state == State::Connected {
                self.conn.header(op::CREDIT_UPDATE, 0, 0)
            } else {
                self.credit_update_due = false;
                break;
            };
            let Some(s) = self.take_slot() else { break };
            if self.ctrl_len > 0 {
                // SAFETY: as in `queue_ctrl`; nothing else borrows the control queue.
                unsafe { (*self.mem).ctrl.copy_within(1..self.ctrl_len, 0) };
                self.ctrl_len -= 1;
            } else {
                self.credit_update_due = false;
            }
            self.fill_slot(s, &h, None, None, false);
            queued = true;
        }
        if queued {
            self.kick(TX);
        }
    }
}

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

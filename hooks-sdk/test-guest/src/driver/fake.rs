//! A simulated virtio-vsock device and host side, for testing the driver on the host: it reads
//! the driver's queues as a device would, keeps host-side connections (echoing, or just
//! collecting what the guest sends), honours the guest's credit, and can misbehave on request.
//! Descriptor addresses are host pointers here; absurd ones are refused instead of followed.

use std::collections::{HashMap, VecDeque};

use super::{DriverMemory, EVENT, RX, TX, Transport};
use crate::virtq::device::DeviceQueue;
use crate::virtq::{DESC_F_WRITE, Desc, QueueTransport};
use crate::vsock::{HDR_LEN, HOST_CID, PacketHeader, TYPE_STREAM, op};

/// One host-side connection, keyed by (guest port, host port).
#[derive(Default)]
pub struct HostConn {
    /// Everything the guest sent on it.
    pub received: Vec<u8>,
    /// Bytes waiting to go to the guest.
    pub outbox: VecDeque<u8>,
    guest_buf_alloc: u32,
    guest_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes the host consumed.
    fwd_cnt: u32,
    advertised_fwd: u32,
}

/// The simulated device and host.
pub struct FakeDevice {
    queues: [DeviceQueue; 3],
    /// Guest CID in config space.
    pub cid: u64,
    /// Host ports with a listener.
    pub listening: Vec<u32>,
    /// Whether host connections echo what they receive.
    pub echo: bool,
    /// The host's receive buffer per connection.
    pub host_buf_alloc: u32,
    /// While set, the host consumes nothing (the guest runs out of credit).
    pub host_paused: bool,
    /// Idle calls after which `host_paused` clears.
    pub unpause_after: u32,
    /// While set, tx chains are not processed.
    pub stall_tx: bool,
    /// Host connections.
    pub conns: HashMap<(u32, u32), HostConn>,
    /// Packets queued for the guest.
    pub to_guest: VecDeque<(PacketHeader, Vec<u8>)>,
    /// Every packet header the guest sent.
    pub from_guest: Vec<PacketHeader>,
    /// Events to deliver.
    pub events: VecDeque<u32>,
    /// tx chains refused as malformed.
    pub bad_tx: u32,
    /// Fake clock, advanced `tick` per reading.
    pub clock: u64,
    /// Nanoseconds per clock reading.
    pub tick: u64,
    notifies: u32,
}

fn valid(d: &Desc) -> bool {
    d.addr >= 0x1_0000 && d.addr < 0x7fff_0000_0000
}

impl FakeDevice {
    /// A device over the driver memory `mem` with queue `sizes` (powers of two).
    pub fn new(mem: *mut DriverMemory, sizes: [u16; 3]) -> Self {
        // SAFETY: only computes the addresses of the queue memories.
        let q = |i: usize| DeviceQueue::new(unsafe { &raw mut (*mem).queues[i] }, sizes[i]);
        FakeDevice {
            queues: [q(0), q(1), q(2)],
            cid: 3,
            listening: vec![9000],
            echo: true,
            host_buf_alloc: 256 * 1024,
            host_paused: false,
            unpause_after: 0,
            stall_tx: false,
            conns: HashMap::new(),
            to_guest: VecDeque::new(),
            from_guest: Vec::new(),
            events: VecDeque::new(),
            bad_tx: 0,
            clock: 0,
            tick: 1000,
            notifies: 0,
        }
    }

    /// A packet from host port `host_port` to guest port `guest_port`.
    pub fn header(&self, host_port: u32, guest_port: u32, op: u16, len: u32) -> PacketHeader {
        let (buf_alloc, fwd_cnt) = self
            .conns
            .get(&(guest_port, host_port))
            .map_or((self.host_buf_alloc, 0), |c| {
                (self.host_buf_alloc, c.fwd_cnt)
            });
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: host_port,
            dst_port: guest_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn reply(&mut self, h: &PacketHeader, op: u16) {
        let r = self.header(h.dst_port, h.src_port, op, 0);
        self.to_guest.push_back((r, Vec::new()));
    }

    /// Reads a chain's bytes (device-readable descriptors only); `None` if any is invalid.
    fn read_chain(chain: &[Desc]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        for d in chain {
            if !valid(d) || d.flags & DESC_F_WRITE != 0 {
                return None;
            }
            // SAFETY: the driver under test points descriptors at live host memory.
            out.extend_from_slice(unsafe {
                std::slice::from_raw_parts(d.addr as *const u8, d.len as usize)
            });
        }
        Some(out)
    }

    fn process_tx(&mut self) {
        while let Some((head, chain)) = self.queues[TX].pop_avail() {
            let bytes = Self::read_chain(&chain).filter(|b| b.len() >= HDR_LEN);
            let Some(bytes) = bytes else {
                self.bad_tx += 1;
                self.queues[TX].push_used(head, 0);
                continue;
            };
            let mut hdr = [0u8; HDR_LEN];
            hdr.copy_from_slice(&bytes[..HDR_LEN]);
            let h = PacketHeader::decode(&hdr);
            self.queues[TX].push_used(head, 0);
            let data = &bytes[HDR_LEN..];
            if h.len as usize > data.len() || h.src_cid != self.cid || h.dst_cid != HOST_CID {
                self.bad_tx += 1;
                continue;
            }
            self.from_guest.push(h);
            self.host_packet(&h, &data[..h.len as usize]);
        }
    }

    fn host_packet(&mut self, h: &PacketHeader, data: &[u8]) {
        let key = (h.src_port, h.dst_port);
        if h.op == op::REQUEST {
            if self.listening.contains(&h.dst_port) && !self.conns.contains_key(&key) {
                self.conns.insert(key, HostConn::default());
                self.update_credit(h);
                self.reply(h, op::RESPONSE);
            } else {
                self.reply(h, op::RST);
            }
            return;
        }
        if !self.conns.contains_key(&key) {
            if h.op != op::RST {
                self.reply(h, op::RST);
            }
            return;
        }
        self.update_credit(h);
        match h.op {
            op::RW => {
                let echo = self.echo;
                let limit = self.host_buf_alloc as usize;
                let c = self.conns.get_mut(&key).expect("checked above");
                c.received.extend_from_slice(data);
                let unconsumed = c.received.len() - c.fwd_cnt as usize;
                assert!(unconsumed <= limit, "the guest overran the host's credit");
                if echo {
                    c.outbox.extend(data);
                }
            }
            op::CREDIT_REQUEST => self.reply(h, op::CREDIT_UPDATE),
            op::CREDIT_UPDATE => {}
            op::RST => {
                self.conns.remove(&key);
            }
            _ => {
                self.conns.remove(&key);
                self.reply(h, op::RST);
            }
        }
    }

    fn update_credit(&mut self, h: &PacketHeader) {
        if let Some(c) = self.conns.get_mut(&(h.src_port, h.dst_port)) {
            c.guest_buf_alloc = h.buf_alloc;
            c.guest_fwd_cnt = h.fwd_cnt;
        }
    }

    /// The host consumes what it received (unless paused) and sends what it has.
    fn host_work(&mut self) {
        let keys: Vec<_> = self.conns.keys().copied().collect();
        for key in keys {
            let paused = self.host_paused;
            let half = self.host_buf_alloc / 2;
            let c = self.conns.get_mut(&key).expect("listed above");
            if !paused {
                c.fwd_cnt = c.received.len() as u32;
            }
            let credit_due = c.fwd_cnt.wrapping_sub(c.advertised_fwd) >= half;
            let credit = c
                .guest_buf_alloc
                .saturating_sub(c.tx_cnt.wrapping_sub(c.guest_fwd_cnt));
            let n = (credit as usize)
                .min(c.outbox.len())
                .min(super::RX_BUF_SIZE);
            let data: Vec<u8> = c.outbox.drain(..n).collect();
            c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
            if n > 0 || credit_due {
                c.advertised_fwd = c.fwd_cnt;
                let op = if n > 0 { op::RW } else { op::CREDIT_UPDATE };
                let h = self.header(key.1, key.0, op, n as u32);
                self.to_guest.push_back((h, data));
            }
        }
    }

    fn deliver(&mut self) {
        while let Some((h, data)) = self.to_guest.front() {
            let Some((head, chain)) = self.queues[RX].pop_avail() else {
                return;
            };
            assert_eq!(chain.len(), 2, "rx chains are header + data");
            assert!(chain.iter().all(|d| d.flags & DESC_F_WRITE != 0));
            assert!(chain[0].len as usize >= HDR_LEN && data.len() <= chain[1].len as usize);
            // SAFETY: the driver's rx buffers are live host memory of the stated lengths.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    h.encode().as_ptr(),
                    chain[0].addr as *mut u8,
                    HDR_LEN,
                );
                std::ptr::copy_nonoverlapping(data.as_ptr(), chain[1].addr as *mut u8, data.len());
            }
            self.queues[RX].push_used(head, (HDR_LEN + data.len()) as u32);
            self.to_guest.pop_front();
        }
        while !self.events.is_empty() {
            let Some((head, chain)) = self.queues[EVENT].pop_avail() else {
                return;
            };
            let id = self.events.pop_front().expect("not empty");
            // SAFETY: event buffers are live, 4 bytes or more.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    id.to_le_bytes().as_ptr(),
                    chain[0].addr as *mut u8,
                    4,
                )
            };
            self.queues[EVENT].push_used(head, 4);
        }
    }

    /// Runs the device and host once.
    pub fn step(&mut self) {
        if !self.stall_tx {
            self.process_tx();
        }
        self.host_work();
        self.deliver();
    }

    /// Delivers an arbitrary packet to the guest.
    pub fn inject(&mut self, h: PacketHeader, data: &[u8]) {
        self.to_guest.push_back((h, data.to_vec()));
        self.deliver();
    }

    /// The only host connection's data from the guest.
    pub fn received(&self) -> Vec<u8> {
        self.conns
            .values()
            .next()
            .map(|c| c.received.clone())
            .unwrap_or_default()
    }

    /// Queue notifications received.
    pub fn notifies(&self) -> u32 {
        self.notifies
    }
}

impl Transport for FakeDevice {
    fn guest_cid(&mut self) -> u64 {
        self.cid
    }
}

impl QueueTransport for FakeDevice {
    fn notify(&mut self, _queue: u16) {
        self.notifies += 1;
        self.step();
    }

    fn now_ns(&mut self) -> u64 {
        self.clock += self.tick;
        self.clock
    }

    fn idle(&mut self) {
        if self.host_paused && self.unpause_after > 0 {
            self.unpause_after -= 1;
            if self.unpause_after == 0 {
                self.host_paused = false;
            }
        }
        self.step();
    }
}

//! Tests that drive the vsock device the way a guest driver does: real guest memory with split
//! virtqueues in it, the transport's registers for setup, descriptor chains written by hand
//! (good and bad), queue notifications, and real Unix sockets on the host side. [`Guest`] is
//! that driver.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod flows;
mod persist;
mod robustness;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vm_memory::{Address, Bytes, GuestAddress};

use super::packet::{HDR_LEN, Header, Op, TYPE_STREAM};
use super::{EVQ, HOST_CID, QUEUE_SIZE, RXQ, TXQ, VsockDevice};
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::{MmioTransport, VirtioMmioEvents, reg};
use crate::devices::virtio::{VIRTIO_F_VERSION_1, status};
use crate::memory::{self, GuestMemory};

pub const GUEST_CID: u64 = 3;
const MEM_SIZE: u64 = 64 << 20;
const RINGS: u64 = 0x10_0000;
const BUFFERS: u64 = 0x40_0000;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// One descriptor as the test writes it: address, length, flags, next.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

/// A guest driver with its own memory, and the device under test.
pub struct Guest {
    pub mem: GuestMemory,
    pub dev: MmioTransport<VsockDevice>,
    pub dir: tempfile::TempDir,
    rings: Vec<Ring>,
    /// Descriptor index → buffer, for the RX and event queues.
    buffers: Vec<HashMap<u16, (u64, u32)>>,
    next_buffer: u64,
    checks: u32,
}

impl Guest {
    /// A guest whose driver set the device up fully.
    pub fn new() -> Self {
        let mut g = Self::unconfigured();
        g.setup_driver();
        g
    }

    /// A device nobody has set up yet.
    pub fn unconfigured() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mem = memory::create_guest_memory(MEM_SIZE).unwrap();
        let device = VsockDevice::new(GUEST_CID as u32, dir.path().join("v.sock")).unwrap();
        let dev = MmioTransport::new(device, mem.clone()).unwrap();
        let rings = (0..3u64)
            .map(|q| {
                let base = RINGS + q * 0x1_0000;
                Ring {
                    desc: base,
                    avail: base + 0x1000,
                    used: base + 0x2000,
                    next_desc: 0,
                    avail_idx: 0,
                    used_seen: 0,
                }
            })
            .collect();
        Self {
            mem,
            dev,
            dir,
            rings,
            buffers: vec![HashMap::new(); 3],
            next_buffer: BUFFERS,
            checks: 0,
        }
    }

    pub fn uds(&self) -> PathBuf {
        self.dir.path().join("v.sock")
    }

    pub fn port_path(&self, port: u32) -> PathBuf {
        self.dir.path().join(format!("v.sock_{port}"))
    }

    pub fn read_reg(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write_reg(&mut self, offset: u64, value: u32) {
        self.dev.write(offset, &value.to_le_bytes());
    }

    /// The Linux driver's sequence: reset, ACK, DRIVER, features, FEATURES_OK, queues,
    /// DRIVER_OK.
    fn setup_driver(&mut self) {
        self.write_reg(reg::STATUS, 0);
        self.write_reg(reg::STATUS, status::ACKNOWLEDGE);
        self.write_reg(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.write_reg(reg::DRIVER_FEATURES_SEL, 1);
        self.write_reg(reg::DRIVER_FEATURES, 1 << (VIRTIO_F_VERSION_1 - 32));
        self.write_reg(reg::DRIVER_FEATURES_SEL, 0);
        self.write_reg(reg::DRIVER_FEATURES, 0);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write_reg(reg::STATUS, s);
        assert_eq!(
            self.read_reg(reg::STATUS) & status::FEATURES_OK,
            status::FEATURES_OK
        );
        for q in 0..3 {
            let (desc, avail, used) = {
                let r = &self.rings[q];
                (r.desc, r.avail, r.used)
            };
            self.write_reg(reg::QUEUE_SEL, q as u32);
            assert_eq!(self.read_reg(reg::QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
            self.write_reg(reg::QUEUE_NUM, u32::from(QUEUE_SIZE));
            self.write_reg(reg::QUEUE_DESC_LOW, desc as u32);
            self.write_reg(reg::QUEUE_DESC_HIGH, 0);
            self.write_reg(reg::QUEUE_AVAIL_LOW, avail as u32);
            self.write_reg(reg::QUEUE_AVAIL_HIGH, 0);
            self.write_reg(reg::QUEUE_USED_LOW, used as u32);
            self.write_reg(reg::QUEUE_USED_HIGH, 0);
            self.write_reg(reg::QUEUE_READY, 1);
        }
        self.write_reg(reg::STATUS, s | status::DRIVER_OK);
        assert_eq!(self.read_reg(reg::STATUS), s | status::DRIVER_OK);
    }

    /// Guest memory for a buffer of `len` bytes.
    pub fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer += u64::from(len).next_multiple_of(64);
        assert!(
            self.next_buffer < MEM_SIZE,
            "test guest ran out of buffer memory"
        );
        addr
    }

    /// Writes `descs` as a chain into queue `q`'s table (next fields as given, relative indices
    /// rewritten to absolute ones when `link` is set) and makes its head available. Returns the
    /// head index.
    pub fn add_chain(&mut self, q: usize, descs: &[Desc], link: bool) -> u16 {
        let ring = &mut self.rings[q];
        let first = ring.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = (first + i as u16) % QUEUE_SIZE;
            let next = if link {
                (first + d.next) % QUEUE_SIZE
            } else {
                d.next
            };
            let at = GuestAddress(ring.desc + u64::from(index) * 16);
            self.mem.write_obj(d.addr, at).unwrap();
            self.mem.write_obj(d.len, at.unchecked_add(8)).unwrap();
            self.mem.write_obj(d.flags, at.unchecked_add(12)).unwrap();
            self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
        }
        ring.next_desc = (first + descs.len() as u16) % QUEUE_SIZE;
        self.make_available(q, first);
        first
    }

    /// Puts `head` in queue `q`'s available ring.
    pub fn make_available(&mut self, q: usize, head: u16) {
        let ring = &mut self.rings[q];
        let slot = GuestAddress(ring.avail + 4 + u64::from(ring.avail_idx % QUEUE_SIZE) * 2);
        self.mem.write_obj(head, slot).unwrap();
        ring.avail_idx = ring.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(ring.avail_idx, GuestAddress(ring.avail + 2))
            .unwrap();
    }

    /// Sets the available index directly (for a corrupt-ring test).
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        let avail = self.rings[q].avail;
        self.mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
    }

    /// Notifies queue `q` as the guest would (a QueueNotify write), then lets the VMM thread
    /// run the notification.
    pub fn kick(&mut self, q: usize) {
        self.write_reg(reg::QUEUE_NOTIFY, q as u32);
        self.dev.process_queue_event(q);
    }

    /// Sends a packet on TX: header (with `len` set) and payload in two descriptors, as Linux
    /// does.
    pub fn send(&mut self, mut hdr: Header, payload: &[u8]) {
        hdr.len = payload.len() as u32;
        self.send_raw(hdr, payload);
    }

    /// Sends a packet whose header is taken as given, whatever its `len` says.
    pub fn send_raw(&mut self, hdr: Header, payload: &[u8]) {
        let hdr_addr = self.alloc(HDR_LEN as u32);
        self.mem
            .write_slice(&hdr.encode(), GuestAddress(hdr_addr))
            .unwrap();
        let mut descs = vec![Desc {
            addr: hdr_addr,
            len: HDR_LEN as u32,
            flags: 0,
            next: 1,
        }];
        if !payload.is_empty() {
            let data = self.alloc(payload.len() as u32);
            self.mem.write_slice(payload, GuestAddress(data)).unwrap();
            descs[0].flags = F_NEXT;
            descs.push(Desc {
                addr: data,
                len: payload.len() as u32,
                flags: 0,
                next: 0,
            });
        }
        self.add_chain(TXQ, &descs, true);
        self.kick(TXQ);
    }

    /// A packet from the guest's side of connection (guest port, host port).
    pub fn hdr(&self, op: Op, guest_port: u32, host_port: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: guest_port,
            dst_port: host_port,
            len: 0,
            type_: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0,
        }
    }

    /// Offers `n` RX buffers of `size` bytes (one writable descriptor each, as Linux does).
    pub fn post_rx(&mut self, n: usize, size: u32) {
        assert!(
            self.buffers[RXQ].len() + n <= usize::from(QUEUE_SIZE),
            "the test driver would overfill its RX ring"
        );
        for _ in 0..n {
            self.post_buffer(RXQ, size);
        }
        self.kick(RXQ);
    }

    /// Tops the RX ring up to full with buffers of `size` bytes.
    pub fn refill_rx(&mut self, size: u32) {
        let missing = usize::from(QUEUE_SIZE) - self.buffers[RXQ].len();
        self.post_rx(missing, size);
    }

    fn post_buffer(&mut self, q: usize, size: u32) {
        let addr = self.alloc(size);
        let head = self.add_chain(
            q,
            &[Desc {
                addr,
                len: size,
                flags: F_WRITE,
                next: 0,
            }],
            true,
        );
        self.buffers[q].insert(head, (addr, size));
    }

    /// Offers an event buffer.
    pub fn post_event_buffer(&mut self) {
        self.post_buffer(EVQ, 4);
        self.kick(EVQ);
    }

    /// New entries of queue `q`'s used ring: (descriptor id, length).
    pub fn used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let ring = &mut self.rings[q];
        let idx: u16 = self.mem.read_obj(GuestAddress(ring.used + 2)).unwrap();
        let mut out = Vec::new();
        while ring.used_seen != idx {
            let at = GuestAddress(ring.used + 4 + u64::from(ring.used_seen % QUEUE_SIZE) * 8);
            let id: u32 = self.mem.read_obj(at).unwrap();
            let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
            out.push((id as u16, len));
            ring.used_seen = ring.used_seen.wrapping_add(1);
        }
        out
    }

    /// Packets the device put in RX buffers since the last call.
    pub fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        for (id, len) in self.used(RXQ) {
            let (addr, size) = self.buffers[RXQ]
                .remove(&id)
                .expect("used an RX buffer never posted");
            assert!(
                len <= size,
                "device wrote {len} bytes into a {size}-byte buffer"
            );
            if len == 0 {
                continue;
            }
            let mut raw = [0u8; HDR_LEN];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let hdr = Header::decode(&raw);
            assert_eq!(
                len as usize,
                HDR_LEN + hdr.len as usize,
                "used length and header disagree"
            );
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + HDR_LEN as u64))
                .unwrap();
            out.push((hdr, data));
        }
        out
    }

    /// Events the device wrote since the last call.
    pub fn events(&mut self) -> Vec<u32> {
        let mut out = Vec::new();
        for (id, len) in self.used(EVQ) {
            let (addr, _) = self.buffers[EVQ].remove(&id).unwrap();
            assert_eq!(len, 4);
            out.push(self.mem.read_obj(GuestAddress(addr)).unwrap());
        }
        out
    }

    /// Runs the device's host-side work until `done` holds for the packets received so far
    /// (collected into the returned list), or panics after a few seconds.
    pub fn pump_until(
        &mut self,
        what: &str,
        mut done: impl FnMut(&[(Header, Vec<u8>)]) -> bool,
    ) -> Vec<(Header, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = self.recv();
        while !done(&got) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; got {got:?}"
            );
            self.pump(Duration::from_millis(50));
            got.extend(self.recv());
        }
        got
    }

    /// Waits up to `timeout` for the device's backend fd and runs its work.
    pub fn pump(&mut self, timeout: Duration) {
        let fd = self.dev.backend_fd().unwrap();
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        self.dev.process_backend_event();
    }

    /// Opens a guest connection from `guest_port` to host port `host_port`, whose listener the
    /// caller made; returns the accepted host stream.
    pub fn connect(
        &mut self,
        listener: &UnixListener,
        guest_port: u32,
        host_port: u32,
    ) -> UnixStream {
        let hdr = self.hdr(Op::Request, guest_port, host_port);
        self.send(hdr, &[]);
        let is_response = |h: &Header| {
            (h.src_port, h.dst_port) == (host_port, guest_port)
                && (h.op == Op::Response as u16 || h.op == Op::Rst as u16)
        };
        let got = self.pump_until("RESPONSE", |p| p.iter().any(|(h, _)| is_response(h)));
        let (answer, _) = got.iter().find(|(h, _)| is_response(h)).unwrap();
        assert_eq!(answer.op, Op::Response as u16, "{got:?}");
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
    }

    /// Checks that a fresh guest connection still works end to end: the device survived
    /// whatever the test did before.
    pub fn assert_good_connection_still_works(&mut self) {
        self.checks += 1;
        let port = 7000 + self.checks;
        let listener = UnixListener::bind(self.port_path(port)).unwrap();
        let free = usize::from(QUEUE_SIZE) - self.buffers[RXQ].len();
        self.post_rx(free.min(8), 4096);
        let guest_port = 60_000 + self.checks;
        let mut host = self.connect(&listener, guest_port, port);
        let hdr = self.hdr(Op::Rw, guest_port, port);
        self.send(hdr, b"still alive");
        let mut buf = [0u8; 11];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"still alive");
        host.write_all(b"pong").unwrap();
        let got = self.pump_until("data from the host", |p| {
            p.iter().any(|(h, _)| h.op == Op::Rw as u16)
        });
        let (_, data) = got.iter().find(|(h, _)| h.op == Op::Rw as u16).unwrap();
        assert_eq!(data, b"pong");
        let rst = self.hdr(Op::Rst, guest_port, port);
        self.send(rst, &[]);
    }

    /// The host-side socket is closed (reads EOF or fails).
    pub fn assert_closed(stream: &mut UnixStream) {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 64];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    }

    /// Whether the interrupt eventfd fired since the last call.
    pub fn interrupted(&self) -> bool {
        let fd = self.dev.irq_event().as_raw_fd();
        let mut buf = [0u8; 8];
        // SAFETY: reads 8 bytes into a local buffer from an eventfd the device owns.
        unsafe { libc::read(fd, buf.as_mut_ptr().cast(), 8) == 8 }
    }
}

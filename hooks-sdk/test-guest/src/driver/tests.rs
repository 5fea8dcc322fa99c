//! The driver against the simulated device: handshake, data both ways within credit, credit
//! requests, refusals, transport resets, shutdowns, strangers, malformed packets, stalls.

use super::fake::FakeDevice;
use super::*;
use crate::vsock::op;

const SIZES: [u16; 3] = [128, 128, 8];

fn driver_with(sizes: [u16; 3]) -> Driver<FakeDevice> {
    let mem: *mut DriverMemory = Box::into_raw(Box::<DriverMemory>::new_zeroed()).cast();
    let ring = Vec::leak(vec![0u8; BUF_ALLOC]);
    let dev = FakeDevice::new(mem, sizes);
    // SAFETY: fresh, leaked memory used by this driver and its device only.
    let mut d = unsafe { Driver::new(dev, mem, ring, sizes) }.unwrap();
    d.start();
    d
}

fn driver() -> Driver<FakeDevice> {
    driver_with(SIZES)
}

fn ops_sent(d: &mut Driver<FakeDevice>, op: u16) -> usize {
    d.transport()
        .from_guest
        .iter()
        .filter(|h| h.op == op)
        .count()
}

fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn connects_and_echoes_a_message() {
    let mut d = driver();
    d.connect(9000, 1_000_000_000).unwrap();
    assert_eq!(d.state().0, State::Connected);
    let req = d.transport().from_guest[0];
    assert_eq!((req.op, req.dst_port, req.src_cid), (op::REQUEST, 9000, 3));
    assert_eq!(req.buf_alloc as usize, BUF_ALLOC);
    d.send(b"hello").unwrap();
    let mut buf = [0u8; 5];
    d.recv_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    assert_eq!(d.transport().received(), b"hello");
    assert_eq!(d.stats.bad_rx + d.stats.bad_used, 0);
}

#[test]
fn six_mib_each_way_within_credit() {
    let mut d = driver();
    d.connect(9000, 1_000_000_000).unwrap();
    let data = pattern(6 * 1024 * 1024);
    // The echo fills our 1 MiB receive ring while we still send; the host must stop at our
    // credit and the fake asserts we never overrun its 256 KiB.
    d.send(&data).unwrap();
    let mut back = vec![0u8; data.len()];
    d.recv_exact(&mut back).unwrap();
    assert!(back == data, "echoed data differs");
    assert!(d.transport().received() == data);
    let largest = d
        .transport()
        .from_guest
        .iter()
        .map(|h| h.len)
        .max()
        .unwrap();
    assert_eq!(largest as usize, MAX_PKT);
    // The host could only send 6 MiB through our 1 MiB window because we told it, at least
    // once per MiB, what we had consumed.
    assert!(ops_sent(&mut d, op::CREDIT_UPDATE) >= 5);
}

#[test]
fn small_queues_still_work() {
    let mut d = driver_with([4, 4, 4]);
    d.connect(9000, 1_000_000_000).unwrap();
    let data = pattern(300_000);
    d.send(&data).unwrap();
    let mut back = vec![0u8; data.len()];
    d.recv_exact(&mut back).unwrap();
    assert!(back == data);
    let mem: *mut DriverMemory = Box::into_raw(Box::<DriverMemory>::new_zeroed()).cast();
    let dev = FakeDevice::new(mem, [2, 4, 4]);
    // SAFETY: fresh, leaked memory.
    let r = unsafe { Driver::new(dev, mem, Vec::leak(vec![0u8; 16]), [2, 4, 4]) };
    assert_eq!(r.err(), Some(Error::QueueTooSmall));
    assert!(d.transport().notifies() > 0);
}

#[test]
fn waits_for_credit_and_asks_for_it() {
    let mut d = driver();
    d.transport().echo = false;
    d.connect(9000, 1_000_000_000).unwrap();
    d.transport().host_paused = true;
    d.transport().unpause_after = 200;
    let data = pattern(512 * 1024);
    d.send(&data).unwrap();
    assert!(d.transport().received() == data);
    assert!(ops_sent(&mut d, op::CREDIT_REQUEST) >= 1);
}

#[test]
fn refused_without_a_listener() {
    let mut d = driver();
    assert_eq!(
        d.connect(9999, 1_000_000_000),
        Err(Error::Closed(Ended::Refused))
    );
    assert_eq!(d.send(b"x"), Err(Error::Closed(Ended::Refused)));
    // A host that never answers: the driver gives up and resets the attempt.
    d.transport().listening.clear();
    d.transport().stall_tx = true;
    assert_eq!(d.connect(9000, 1_000_000), Err(Error::Timeout));
}

#[test]
fn transport_reset_ends_the_connection_and_a_new_one_works() {
    let mut d = driver();
    d.connect(9000, 1_000_000_000).unwrap();
    let first_port = d.local_port();
    d.transport().cid = 5;
    d.transport()
        .events
        .push_back(crate::vsock::EVENT_TRANSPORT_RESET);
    let mut buf = [0u8; 4];
    assert_eq!(d.recv(&mut buf), Err(Error::Closed(Ended::TransportReset)));
    assert_eq!((d.guest_cid(), d.stats.transport_resets), (5, 1));
    d.connect(9000, 1_000_000_000).unwrap();
    assert_ne!(d.local_port(), first_port);
    d.send(b"ping").unwrap();
    d.recv_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    assert_eq!(d.transport().from_guest.last().unwrap().src_cid, 5);
    // Event buffers are reposted: a second reset is seen too.
    for _ in 0..10 {
        d.transport()
            .events
            .push_back(crate::vsock::EVENT_TRANSPORT_RESET);
        d.poll_for(10_000);
    }
    assert_eq!(d.stats.transport_resets, 11);
}

#[test]
fn host_shutdown_drains_then_ends_and_is_answered_with_rst() {
    let mut d = driver();
    d.connect(9000, 1_000_000_000).unwrap();
    let port = d.local_port();
    let dev = d.transport();
    dev.conns.clear(); // the host forgets it; the guest's RST then meets no connection
    let rw = dev.header(9000, port, op::RW, 3);
    dev.inject(rw, b"abc");
    let shut = dev.header(9000, port, op::SHUTDOWN, 0);
    dev.inject(PacketHeader { flags: 3, ..shut }, &[]);
    let mut buf = [0u8; 8];
    assert_eq!(d.recv(&mut buf), Ok(3));
    assert_eq!(&buf[..3], b"abc");
    assert_eq!(d.recv(&mut buf), Err(Error::Closed(Ended::Shutdown)));
    let last = *d.transport().from_guest.last().unwrap();
    assert_eq!(
        (last.op, last.src_port, last.dst_port),
        (op::RST, port, 9000)
    );
}

#[test]
fn strangers_get_rst_and_credit_requests_get_answers() {
    let mut d = driver();
    d.connect(9000, 1_000_000_000).unwrap();
    let port = d.local_port();
    let dev = d.transport();
    let stranger = dev.header(9000, 1234, op::RW, 2);
    dev.inject(stranger, b"zz");
    let ask = dev.header(9000, port, op::CREDIT_REQUEST, 0);
    dev.inject(ask, &[]);
    d.poll_for(100_000);
    let sent = &d.transport().from_guest;
    assert!(sent.iter().any(|h| h.op == op::RST && h.src_port == 1234));
    assert!(
        sent.iter()
            .any(|h| h.op == op::CREDIT_UPDATE && h.src_port == port)
    );
    assert_eq!(d.stats.foreign[usize::from(op::RW)], 1);
    assert_eq!(d.state().0, State::Connected);
    // Many strangers at once: every one is answered.
    for p in 0..300 {
        let h = d.transport().header(9000, 2000 + p, op::RW, 0);
        d.transport().to_guest.push_back((h, Vec::new()));
    }
    d.poll_for(10_000_000);
    let rsts = d
        .transport()
        .from_guest
        .iter()
        .filter(|h| h.op == op::RST)
        .count();
    assert_eq!(rsts as u32 + d.stats.ctrl_dropped, 301);
}

#[test]
fn malformed_packets_from_the_device_are_dropped() {
    let mut d = driver();
    d.connect(9000, 1_000_000_000).unwrap();
    let port = d.local_port();
    let dev = d.transport();
    let lying = dev.header(9000, port, op::RW, 100);
    dev.inject(lying, b"only ten b");
    d.poll_for(10_000);
    assert_eq!(d.stats.bad_rx, 1);
    // An overrun of the credit we advertised aborts the connection.
    let dev = d.transport();
    let huge = dev.header(9000, port, op::RW, RX_BUF_SIZE as u32);
    for _ in 0..(BUF_ALLOC / RX_BUF_SIZE + 1) {
        dev.to_guest.push_back((huge, vec![0; RX_BUF_SIZE]));
    }
    d.poll_for(10_000_000);
    assert_eq!(d.state(), (State::Closed, Some(Ended::Violation)));
}

#[test]
fn a_stalled_device_is_detected() {
    let mut d = driver();
    d.connect(9000, 1_000_000_000).unwrap();
    d.transport().stall_tx = true;
    d.transport().tick = 1_000_000;
    assert_eq!(d.send(b"never read"), Err(Error::Stalled));
}

#[test]
fn a_paused_vm_is_no_stall() {
    let mut d = driver();
    d.connect(9000, 1_000_000_000).unwrap();
    d.transport().stall_tx = true;
    let h = d.conn_header(op::CREDIT_UPDATE, 0);
    let slot = d.send_raw(&h, None, None, 1_000_000).unwrap();
    // The VM is restored much later: the clock jumps past the stall limit before the device
    // has even delivered its transport reset.
    d.transport().clock += 2 * STALL_NS;
    d.transport()
        .events
        .push_back(crate::vsock::EVENT_TRANSPORT_RESET);
    let mut buf = [0u8; 1];
    assert_eq!(d.recv(&mut buf), Err(Error::Closed(Ended::TransportReset)));
    // The packet is still in the device's hands, and that is not (yet) a stall.
    assert!(!d.raw_done(slot));
    assert_eq!(d.connect(9000, 1_000_000), Err(Error::Timeout));
}

#[test]
fn raw_packets_go_out_as_given() {
    let mut d = driver();
    let h = d.raw_header(40000, 9000, op::RW, 4096);
    let bad = Desc {
        addr: 0x10,
        len: 4096,
        flags: 0,
        next: 0,
    };
    let slot = d.send_raw(&h, None, Some(bad), 1_000_000).unwrap();
    d.poll_for(10_000);
    assert!(d.raw_done(slot));
    assert_eq!(d.transport().bad_tx, 1);
    d.transport().stall_tx = true;
    let slot = d.send_raw(&h, Some(bad), None, 1_000_000).unwrap();
    assert!(!d.raw_done(slot));
    d.abandon(slot);
    d.transport().stall_tx = false;
    d.transport().tick = 10_000_000; // abandoned slots never count as a stall
    d.connect(9000, u64::MAX / 2).unwrap();
    d.send(b"ok").unwrap();
    assert_eq!(d.transport().bad_tx, 2);
}

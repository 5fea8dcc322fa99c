//! Connections as they should go: guest to host, host to guest, data and credit both ways,
//! shutdown, reset, timeouts and the transport reset.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use super::Guest;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::MMIO_CONFIG_START;
use crate::devices::vsock::packet::{HDR_LEN, Op, SHUTDOWN_RCV, SHUTDOWN_SEND};
use crate::devices::vsock::{CONN_BUF_ALLOC, EVENT_TRANSPORT_RESET, HOST_CID};

#[test]
fn config_space_holds_the_guest_cid() {
    let mut g = Guest::new();
    let mut cid = [0u8; 8];
    g.dev.read(MMIO_CONFIG_START, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), super::GUEST_CID);
    let mut high = [0u8; 4];
    g.dev.read(MMIO_CONFIG_START + 4, &mut high);
    assert_eq!(high, [0; 4]);
    let mut past = [0xaau8; 4];
    g.dev.read(MMIO_CONFIG_START + 64, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn guest_connect_reaches_host_listener_and_data_flows_both_ways() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(g.port_path(52)).unwrap();
    g.post_rx(16, 4096);
    let mut host = g.connect(&listener, 1024, 52);
    assert!(g.interrupted(), "the RESPONSE raised no interrupt");

    g.send(g.hdr(Op::Rw, 1024, 52), b"hello host");
    let mut buf = [0u8; 10];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");

    host.write_all(b"hello guest").unwrap();
    let got = g.pump_until("data", |p| !p.is_empty());
    let (h, data) = &got[0];
    assert_eq!(h.op, Op::Rw as u16);
    assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, super::GUEST_CID));
    assert_eq!((h.src_port, h.dst_port), (52, 1024));
    assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
    assert_eq!(
        h.fwd_cnt, 10,
        "fwd_cnt counts the bytes the host socket took"
    );
    assert_eq!(data, b"hello guest");
}

#[test]
fn guest_connect_without_host_listener_gets_rst() {
    let mut g = Guest::new();
    g.post_rx(4, 4096);
    g.send(g.hdr(Op::Request, 1024, 4242), &[]);
    let got = g.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, Op::Rst as u16);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (4242, 1024));
    assert_eq!(g.dev.device().connection_count(), 0);
}

#[test]
fn host_connect_gets_request_then_ok_after_response() {
    let mut g = Guest::new();
    g.post_rx(8, 4096);
    let mut host = UnixStream::connect(g.uds()).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 5000\nearly").unwrap();
    let got = g.pump_until("REQUEST", |p| !p.is_empty());
    let req = got[0].0;
    assert_eq!(req.op, Op::Request as u16);
    assert_eq!(
        (req.src_cid, req.dst_cid, req.dst_port),
        (HOST_CID, super::GUEST_CID, 5000)
    );
    let host_port = req.src_port;

    let mut resp = g.hdr(Op::Response, 5000, host_port);
    resp.buf_alloc = 4096;
    g.send(resp, &[]);
    let mut line = [0u8; 64];
    let n = host.read(&mut line).unwrap();
    assert_eq!(
        std::str::from_utf8(&line[..n]).unwrap(),
        format!("OK {host_port}\n")
    );

    // Bytes written after the CONNECT line arrive as data once the guest accepted.
    let got = g.pump_until("early data", |p| !p.is_empty());
    assert_eq!(got[0].0.op, Op::Rw as u16);
    assert_eq!(got[0].1, b"early");
    g.send(g.hdr(Op::Rw, 5000, host_port), b"reply");
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"reply");
}

#[test]
fn host_connect_refused_by_guest_closes_host_socket() {
    let mut g = Guest::new();
    g.post_rx(4, 4096);
    let mut host = UnixStream::connect(g.uds()).unwrap();
    host.write_all(b"CONNECT 6000\n").unwrap();
    let got = g.pump_until("REQUEST", |p| !p.is_empty());
    let host_port = got[0].0.src_port;
    g.send(g.hdr(Op::Rst, 6000, host_port), &[]);
    Guest::assert_closed(&mut host);
    assert_eq!(g.dev.device().connection_count(), 0);
}

#[test]
fn host_connect_times_out_when_the_guest_never_answers() {
    let mut g = Guest::new();
    g.post_rx(4, 4096);
    let mut host = UnixStream::connect(g.uds()).unwrap();
    host.write_all(b"CONNECT 6001\n").unwrap();
    let got = g.pump_until("REQUEST", |p| !p.is_empty());
    let host_port = got[0].0.src_port;
    // The guest stays silent; after CONNECT_TIMEOUT the device gives up and tells both sides.
    let got = g.pump_until("RST after the timeout", |p| !p.is_empty());
    assert_eq!(got[0].0.op, Op::Rst as u16);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (host_port, 6001));
    Guest::assert_closed(&mut host);
}

#[test]
fn guest_shutdown_closes_host_side_and_gets_rst() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(g.port_path(53)).unwrap();
    g.post_rx(8, 4096);
    let mut host = g.connect(&listener, 2000, 53);
    g.send(g.hdr(Op::Rw, 2000, 53), b"last words");
    let mut shutdown = g.hdr(Op::Shutdown, 2000, 53);
    shutdown.flags = SHUTDOWN_SEND;
    g.send(shutdown, &[]);
    let mut all = Vec::new();
    host.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"last words", "the host reads the data, then EOF");
    shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(shutdown, &[]);
    let got = g.recv();
    assert!(got.iter().any(|(h, _)| h.op == Op::Rst as u16), "{got:?}");
    assert_eq!(g.dev.device().connection_count(), 0);
    Guest::assert_closed(&mut host);
}

#[test]
fn host_close_sends_shutdown_to_guest() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(g.port_path(54)).unwrap();
    g.post_rx(8, 4096);
    let host = g.connect(&listener, 2001, 54);
    drop(host);
    let got = g.pump_until("SHUTDOWN", |p| {
        p.iter().any(|(h, _)| h.op == Op::Shutdown as u16)
    });
    let (h, _) = got
        .iter()
        .find(|(h, _)| h.op == Op::Shutdown as u16)
        .unwrap();
    assert_eq!(h.flags & SHUTDOWN_SEND, SHUTDOWN_SEND);
    // The guest closes its end too; the device confirms with RST and forgets the connection.
    let mut shutdown = g.hdr(Op::Shutdown, 2001, 54);
    shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(shutdown, &[]);
    assert!(g.recv().iter().any(|(h, _)| h.op == Op::Rst as u16));
    assert_eq!(g.dev.device().connection_count(), 0);
}

#[test]
fn guest_rst_closes_host_socket() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(g.port_path(55)).unwrap();
    g.post_rx(8, 4096);
    let mut host = g.connect(&listener, 2002, 55);
    g.send(g.hdr(Op::Rst, 2002, 55), &[]);
    Guest::assert_closed(&mut host);
    assert_eq!(g.dev.device().connection_count(), 0);
    assert!(g.recv().is_empty(), "a RST is not answered");
}

#[test]
fn credit_request_gets_credit_update() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(g.port_path(56)).unwrap();
    g.post_rx(8, 4096);
    let _host = g.connect(&listener, 2003, 56);
    g.send(g.hdr(Op::Rw, 2003, 56), b"12345");
    g.send(g.hdr(Op::CreditRequest, 2003, 56), &[]);
    let got = g.recv();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0.op, Op::CreditUpdate as u16);
    assert_eq!(got[0].0.fwd_cnt, 5);
    assert_eq!(got[0].0.buf_alloc, CONN_BUF_ALLOC);
}

#[test]
fn guest_credit_limits_what_the_host_socket_gives_it() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(g.port_path(57)).unwrap();
    g.post_rx(64, 4096);
    let mut req = g.hdr(Op::Request, 2004, 57);
    req.buf_alloc = 6000;
    g.send(req, &[]);
    let got = g.pump_until("RESPONSE", |p| !p.is_empty());
    assert_eq!(got[0].0.op, Op::Response as u16);
    let (mut host, _) = listener.accept().unwrap();
    host.set_nonblocking(true).unwrap();
    // The host writes far more than the guest's 6000-byte buffer.
    let mut written = 0;
    let chunk = [0x5au8; 4096];
    while written < 200_000 {
        match host.write(&chunk) {
            Ok(n) => written += n,
            Err(_) => break,
        }
    }
    let got = g.pump_until("a CREDIT_REQUEST once the credit is used up", |p| {
        p.iter().any(|(h, _)| h.op == Op::CreditRequest as u16)
    });
    let data: usize = got
        .iter()
        .filter(|(h, _)| h.op == Op::Rw as u16)
        .map(|(_, d)| d.len())
        .sum();
    assert_eq!(data, 6000, "exactly the guest's credit was sent");
    // No more data while the guest has no credit, however long the host waits.
    g.pump(Duration::from_millis(200));
    assert!(g.recv().is_empty());
    // The guest consumed 4000 bytes: 4000 more may come.
    let mut update = g.hdr(Op::CreditUpdate, 2004, 57);
    update.buf_alloc = 6000;
    update.fwd_cnt = 4000;
    g.send(update, &[]);
    let mut got = g.pump_until("more data", |p| {
        p.iter()
            .filter(|(h, _)| h.op == Op::Rw as u16)
            .map(|(_, d)| d.len())
            .sum::<usize>()
            >= 4000
    });
    g.pump(Duration::from_millis(100));
    got.extend(g.recv());
    let data: usize = got
        .iter()
        .filter(|(h, _)| h.op == Op::Rw as u16)
        .map(|(_, d)| d.len())
        .sum();
    assert_eq!(data, 4000);
}

#[test]
fn slow_host_reader_backpressures_the_guest_through_credit() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(g.port_path(58)).unwrap();
    g.post_rx(64, 4096);
    let mut host = g.connect(&listener, 2005, 58);
    // The host does not read: the guest sends exactly its credit, in 64 KiB packets.
    let packet = vec![0x42u8; 64 * 1024];
    for _ in 0..(CONN_BUF_ALLOC as usize / packet.len()) {
        g.send(g.hdr(Op::Rw, 2005, 58), &packet);
    }
    assert_eq!(
        g.dev.device().connection_count(),
        1,
        "within credit, nothing is reset"
    );
    // Whatever the socket did not take is buffered, and the guest was not told it was consumed.
    let got = g.recv();
    assert!(got.iter().all(|(h, _)| h.op != Op::Rst as u16), "{got:?}");
    // Now the host reads everything; the device flushes and tells the guest.
    let mut total = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while total < CONN_BUF_ALLOC as usize {
        assert!(
            std::time::Instant::now() < deadline,
            "host got only {total} bytes"
        );
        g.pump(Duration::from_millis(10));
        host.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        if let Ok(n) = host.read(&mut buf) {
            total += n;
        }
    }
    assert_eq!(total, CONN_BUF_ALLOC as usize);
    let got = g.pump_until("CREDIT_UPDATE", |p| {
        p.iter()
            .any(|(h, _)| h.op == Op::CreditUpdate as u16 && h.fwd_cnt == CONN_BUF_ALLOC)
    });
    assert!(got.iter().all(|(h, _)| h.op != Op::Rst as u16));
}

#[test]
fn transport_reset_drops_connections_and_sends_event() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(g.port_path(59)).unwrap();
    g.post_rx(8, 4096);
    let mut host = g.connect(&listener, 2006, 59);
    g.dev.reset_vsock_transport();
    Guest::assert_closed(&mut host);
    assert_eq!(g.dev.device().connection_count(), 0);
    // No event buffer yet: the event waits for one.
    assert!(g.events().is_empty());
    g.post_event_buffer();
    assert_eq!(g.events(), vec![EVENT_TRANSPORT_RESET]);
    g.post_event_buffer();
    assert!(g.events().is_empty(), "one reset, one event");
    g.assert_good_connection_still_works();
}

#[test]
fn driver_reset_closes_connections() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(g.port_path(60)).unwrap();
    g.post_rx(8, 4096);
    let mut host = g.connect(&listener, 2007, 60);
    g.write_reg(crate::devices::virtio::mmio::reg::STATUS, 0);
    Guest::assert_closed(&mut host);
    assert_eq!(g.dev.device().connection_count(), 0);
}

#[test]
fn packets_are_whole_in_a_single_descriptor_too() {
    // Newer Linux puts header and payload in one descriptor.
    let mut g = Guest::new();
    let listener = UnixListener::bind(g.port_path(61)).unwrap();
    g.post_rx(8, 4096);
    let mut host = g.connect(&listener, 2008, 61);
    let mut hdr = g.hdr(Op::Rw, 2008, 61);
    hdr.len = 3;
    let addr = g.alloc(HDR_LEN as u32 + 3);
    let mut bytes = hdr.encode().to_vec();
    bytes.extend_from_slice(b"one");
    vm_memory::Bytes::write_slice(&g.mem, &bytes, vm_memory::GuestAddress(addr)).unwrap();
    g.add_chain(
        crate::devices::vsock::TXQ,
        &[super::Desc {
            addr,
            len: bytes.len() as u32,
            flags: 0,
            next: 0,
        }],
        true,
    );
    g.kick(crate::devices::vsock::TXQ);
    let mut buf = [0u8; 3];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"one");
}

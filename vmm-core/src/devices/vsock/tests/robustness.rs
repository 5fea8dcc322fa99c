//! A misbehaving guest: bad descriptors, bad lengths, unknown operations and types, packets for
//! connections that do not exist, floods. Each test checks that the bad input is dropped or its
//! connection reset, and that a good connection works afterwards.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::{Desc, F_NEXT, F_WRITE, Guest};
use crate::devices::virtio::mmio::VirtioMmioEvents;
use crate::devices::vsock::packet::{HDR_LEN, MAX_PKT_LEN, Op};
use crate::devices::vsock::{CONN_BUF_ALLOC, MAX_CONNECTIONS, MAX_HANDSHAKES, RXQ, TXQ};

/// A header in guest memory, for hand-made chains.
fn header_at(g: &mut Guest, op: Op, guest_port: u32, host_port: u32, len: u32) -> u64 {
    let mut hdr = g.hdr(op, guest_port, host_port);
    hdr.len = len;
    let addr = g.alloc(HDR_LEN as u32);
    g.mem
        .write_slice(&hdr.encode(), GuestAddress(addr))
        .unwrap();
    addr
}

fn established(g: &mut Guest, host_port: u32, guest_port: u32) -> (UnixListener, UnixStream) {
    let listener = UnixListener::bind(g.port_path(host_port)).unwrap();
    g.post_rx(32, 4096);
    let host = g.connect(&listener, guest_port, host_port);
    (listener, host)
}

fn expect_rst(g: &mut Guest, guest_port: u32, host_port: u32) {
    let got = g.recv();
    assert!(
        got.iter().any(|(h, _)| h.op == Op::Rst as u16
            && h.dst_port == guest_port
            && h.src_port == host_port),
        "expected a RST for {guest_port}->{host_port}: {got:?}"
    );
}

#[test]
fn rejects_descriptor_outside_guest_memory() {
    let mut g = Guest::new();
    let (_l, mut host) = established(&mut g, 100, 3000);
    let hdr = header_at(&mut g, Op::Rw, 3000, 100, 16);
    let descs = [
        Desc {
            addr: hdr,
            len: HDR_LEN as u32,
            flags: F_NEXT,
            next: 1,
        },
        Desc {
            addr: 1 << 40,
            len: 16,
            flags: 0,
            next: 0,
        },
    ];
    g.add_chain(TXQ, &descs, true);
    g.kick(TXQ);
    assert_eq!(
        g.used(TXQ).last().map(|u| u.1),
        Some(0),
        "the chain is returned unused"
    );
    expect_rst(&mut g, 3000, 100);
    Guest::assert_closed(&mut host);
    // A header descriptor itself outside memory: nothing to reset, the chain is just dropped.
    g.add_chain(
        TXQ,
        &[Desc {
            addr: u64::MAX - 8,
            len: 44,
            flags: 0,
            next: 0,
        }],
        true,
    );
    g.kick(TXQ);
    assert!(g.recv().is_empty());
    g.assert_good_connection_still_works();
}

#[test]
fn rejects_writable_descriptor_in_tx_chain() {
    let mut g = Guest::new();
    let (_l, mut host) = established(&mut g, 101, 3001);
    let hdr = header_at(&mut g, Op::Rw, 3001, 101, 4);
    let data = g.alloc(4);
    let descs = [
        Desc {
            addr: hdr,
            len: HDR_LEN as u32,
            flags: F_NEXT,
            next: 1,
        },
        Desc {
            addr: data,
            len: 4,
            flags: F_WRITE,
            next: 0,
        },
    ];
    g.add_chain(TXQ, &descs, true);
    g.kick(TXQ);
    expect_rst(&mut g, 3001, 101);
    Guest::assert_closed(&mut host);
    g.assert_good_connection_still_works();
}

#[test]
fn rejects_readable_descriptor_in_rx_chain() {
    let mut g = Guest::new();
    let buf = g.alloc(4096);
    g.add_chain(
        RXQ,
        &[Desc {
            addr: buf,
            len: 4096,
            flags: 0,
            next: 0,
        }],
        true,
    );
    g.kick(RXQ);
    // Something to send makes the device look at the buffer: a RST for an unknown connection.
    g.send(g.hdr(Op::Rw, 1, 2), b"x");
    let used = g.used(RXQ);
    assert_eq!(used.len(), 1);
    assert_eq!(
        used[0].1, 0,
        "a device-readable RX buffer is returned unwritten"
    );
    g.assert_good_connection_still_works();
}

#[test]
fn rejects_descriptor_chain_loop() {
    let mut g = Guest::new();
    let (_l, _host) = established(&mut g, 102, 3002);
    let hdr = header_at(&mut g, Op::Rw, 3002, 102, 8);
    // Two descriptors pointing at each other forever.
    let descs = [
        Desc {
            addr: hdr,
            len: HDR_LEN as u32,
            flags: F_NEXT,
            next: 1,
        },
        Desc {
            addr: hdr,
            len: 8,
            flags: F_NEXT,
            next: 0,
        },
    ];
    g.add_chain(TXQ, &descs, true);
    g.kick(TXQ);
    assert_eq!(g.used(TXQ).last().map(|u| u.1), Some(0));
    expect_rst(&mut g, 3002, 102);
    g.assert_good_connection_still_works();
}

#[test]
fn rejects_overlong_descriptor_chain() {
    let mut g = Guest::new();
    let (_l, _host) = established(&mut g, 103, 3003);
    let hdr = header_at(&mut g, Op::Rw, 3003, 103, 100);
    let data = g.alloc(100);
    let mut descs = vec![Desc {
        addr: hdr,
        len: HDR_LEN as u32,
        flags: F_NEXT,
        next: 1,
    }];
    for i in 0..100u16 {
        let last = i == 99;
        descs.push(Desc {
            addr: data + u64::from(i),
            len: 1,
            flags: if last { 0 } else { F_NEXT },
            next: i + 2,
        });
    }
    g.add_chain(TXQ, &descs, true);
    g.kick(TXQ);
    expect_rst(&mut g, 3003, 103);
    g.assert_good_connection_still_works();
}

#[test]
fn rejects_next_index_outside_the_table() {
    let mut g = Guest::new();
    let hdr = header_at(&mut g, Op::Request, 3004, 104, 0);
    g.add_chain(
        TXQ,
        &[Desc {
            addr: hdr,
            len: HDR_LEN as u32,
            flags: F_NEXT,
            next: 999,
        }],
        false,
    );
    g.kick(TXQ);
    assert_eq!(g.used(TXQ).len(), 1);
    assert_eq!(
        g.dev.device().connection_count(),
        0,
        "the broken REQUEST opened nothing"
    );
    g.assert_good_connection_still_works();
}

#[test]
fn resets_connection_on_oversized_len() {
    let mut g = Guest::new();
    let (_l, mut host) = established(&mut g, 105, 3005);
    let mut hdr = g.hdr(Op::Rw, 3005, 105);
    hdr.len = MAX_PKT_LEN + 1;
    g.send_raw(hdr, &vec![0u8; MAX_PKT_LEN as usize + 1]);
    expect_rst(&mut g, 3005, 105);
    Guest::assert_closed(&mut host);
    hdr.len = u32::MAX;
    g.send_raw(hdr, b"tiny");
    g.assert_good_connection_still_works();
}

#[test]
fn resets_connection_when_len_exceeds_buffer() {
    let mut g = Guest::new();
    let (_l, mut host) = established(&mut g, 106, 3006);
    let mut hdr = g.hdr(Op::Rw, 3006, 106);
    hdr.len = 1000;
    g.send_raw(hdr, b"only ten b");
    expect_rst(&mut g, 3006, 106);
    Guest::assert_closed(&mut host);
    g.assert_good_connection_still_works();
}

#[test]
fn drops_packet_shorter_than_header() {
    let mut g = Guest::new();
    let addr = g.alloc(20);
    g.add_chain(
        TXQ,
        &[Desc {
            addr,
            len: 20,
            flags: 0,
            next: 0,
        }],
        true,
    );
    g.kick(TXQ);
    assert_eq!(g.used(TXQ).len(), 1);
    g.post_rx(2, 4096);
    assert!(g.recv().is_empty(), "nothing to answer: no header");
    g.assert_good_connection_still_works();
}

#[test]
fn resets_connection_on_unknown_op() {
    let mut g = Guest::new();
    let (_l, mut host) = established(&mut g, 107, 3007);
    let mut hdr = g.hdr(Op::Rw, 3007, 107);
    hdr.op = 99;
    g.send(hdr, &[]);
    expect_rst(&mut g, 3007, 107);
    Guest::assert_closed(&mut host);
    g.assert_good_connection_still_works();
}

#[test]
fn resets_on_unknown_socket_type() {
    let mut g = Guest::new();
    g.post_rx(4, 4096);
    let listener = UnixListener::bind(g.port_path(108)).unwrap();
    let mut hdr = g.hdr(Op::Request, 3008, 108);
    hdr.type_ = 2; // SEQPACKET, not offered
    g.send(hdr, &[]);
    expect_rst(&mut g, 3008, 108);
    listener.set_nonblocking(true).unwrap();
    assert!(
        listener.accept().is_err(),
        "no host connection for a refused type"
    );
    g.assert_good_connection_still_works();
}

#[test]
fn answers_packets_for_unknown_connections_with_rst() {
    let mut g = Guest::new();
    g.post_rx(8, 4096);
    for op in [
        Op::Rw,
        Op::Response,
        Op::Shutdown,
        Op::CreditUpdate,
        Op::CreditRequest,
    ] {
        g.send(g.hdr(op, 3009, 109), b"");
        expect_rst(&mut g, 3009, 109);
    }
    // A RST for an unknown connection is not answered.
    g.send(g.hdr(Op::Rst, 3009, 109), &[]);
    assert!(g.recv().is_empty());
    // Nor are packets to other CIDs served: they get a RST.
    let mut hdr = g.hdr(Op::Request, 3009, 109);
    hdr.dst_cid = 7;
    g.send(hdr, &[]);
    expect_rst(&mut g, 3009, 109);
    g.assert_good_connection_still_works();
}

#[test]
fn drops_packets_with_spoofed_source_cid() {
    let mut g = Guest::new();
    g.post_rx(4, 4096);
    let _listener = UnixListener::bind(g.port_path(110)).unwrap();
    let mut hdr = g.hdr(Op::Request, 3010, 110);
    hdr.src_cid = 1234;
    g.send(hdr, &[]);
    assert!(g.recv().is_empty());
    assert_eq!(g.dev.device().connection_count(), 0);
    g.assert_good_connection_still_works();
}

#[test]
fn resets_duplicate_request_and_out_of_sequence_packets() {
    let mut g = Guest::new();
    let (_l, mut host) = established(&mut g, 111, 3011);
    g.send(g.hdr(Op::Request, 3011, 111), &[]);
    expect_rst(&mut g, 3011, 111);
    Guest::assert_closed(&mut host);
    let (_l2, mut host) = established(&mut g, 112, 3012);
    g.send(g.hdr(Op::Response, 3012, 112), &[]);
    expect_rst(&mut g, 3012, 112);
    Guest::assert_closed(&mut host);
    g.assert_good_connection_still_works();
}

#[test]
fn resets_guest_that_ignores_credit() {
    let mut g = Guest::new();
    let (_l, mut host) = established(&mut g, 113, 3013);
    // The host never reads; the guest sends far past the 256 KiB it was allowed.
    let packet = vec![1u8; MAX_PKT_LEN as usize];
    let mut sent = 0;
    while g.dev.device().connection_count() == 1 {
        g.send(g.hdr(Op::Rw, 3013, 113), &packet);
        sent += packet.len();
        assert!(
            sent <= 2 * 1024 * 1024,
            "still connected after {sent} bytes"
        );
    }
    assert!(sent > CONN_BUF_ALLOC as usize);
    expect_rst(&mut g, 3013, 113);
    Guest::assert_closed(&mut host);
    g.assert_good_connection_still_works();
}

#[test]
fn survives_connection_flood() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(g.port_path(114)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut accepted = Vec::new();
    // The guest opens connections past the limit; the host accepts them all.
    let total = MAX_CONNECTIONS as u32 + 200;
    let mut answers = Vec::new();
    for port in 0..total {
        g.send(g.hdr(Op::Request, 10_000 + port, 114), &[]);
        if port % 32 == 31 {
            g.refill_rx(256);
            answers.extend(g.recv());
            while let Ok((s, _)) = listener.accept() {
                accepted.push(s);
            }
        }
    }
    g.refill_rx(256);
    answers.extend(g.recv());
    while let Ok((s, _)) = listener.accept() {
        accepted.push(s);
    }
    assert_eq!(g.dev.device().connection_count(), MAX_CONNECTIONS);
    assert_eq!(accepted.len(), MAX_CONNECTIONS);
    let responses = answers
        .iter()
        .filter(|(h, _)| h.op == Op::Response as u16)
        .count();
    let resets = answers
        .iter()
        .filter(|(h, _)| h.op == Op::Rst as u16)
        .count();
    assert_eq!(responses, MAX_CONNECTIONS);
    assert_eq!(
        resets,
        total as usize - MAX_CONNECTIONS,
        "every request over the limit is refused"
    );
    // The guest resets them all; the host sockets close.
    for port in 0..total {
        g.send(g.hdr(Op::Rst, 10_000 + port, 114), &[]);
    }
    assert_eq!(g.dev.device().connection_count(), 0);
    Guest::assert_closed(&mut accepted[0]);
    g.assert_good_connection_still_works();
}

#[test]
fn survives_reset_flood_without_rx_buffers() {
    let mut g = Guest::new();
    // No RX buffers, and packets for unknown connections, each owed a RST: the device stops
    // taking TX once its bounded RST queue is half full, instead of queueing without end.
    let mut consumed = 0;
    let mut stalled = false;
    for i in 0..2000u32 {
        g.send(g.hdr(Op::Rw, 20_000 + i, 115), &[]);
        let used = g.used(TXQ).len();
        consumed += used;
        if used == 0 {
            stalled = true;
            break;
        }
    }
    assert!(stalled, "TX was consumed without bound: {consumed} packets");
    assert_eq!(consumed, crate::devices::vsock::MAX_PENDING_RESETS / 2);
    // RX buffers arrive: RSTs flow to the guest, and TX resumes by itself.
    g.refill_rx(256);
    let got = g.recv();
    assert_eq!(got.len(), 256);
    assert!(got.iter().all(|(h, _)| h.op == Op::Rst as u16));
    g.dev.process_queue_event(TXQ);
    assert_eq!(g.used(TXQ).len(), 1, "the waiting TX packet was taken");
    for _ in 0..4 {
        g.refill_rx(256);
        g.recv();
    }
    g.assert_good_connection_still_works();
}

#[test]
fn survives_host_handshake_garbage_and_floods() {
    let mut g = Guest::new();
    g.post_rx(8, 4096);
    let mut bad = UnixStream::connect(g.uds()).unwrap();
    bad.write_all(b"HELLO THERE\n").unwrap();
    let mut long = UnixStream::connect(g.uds()).unwrap();
    long.write_all(&[b'C'; 200]).unwrap();
    let mut hung = Vec::new();
    for _ in 0..MAX_HANDSHAKES + 10 {
        if let Ok(s) = UnixStream::connect(g.uds()) {
            hung.push(s);
        }
    }
    for _ in 0..10 {
        g.pump(Duration::from_millis(20));
    }
    Guest::assert_closed(&mut bad);
    Guest::assert_closed(&mut long);
    assert!(g.recv().is_empty(), "no REQUEST for garbage");
    drop(hung);
    g.pump(Duration::from_millis(20));
    // A proper host connection still gets through.
    let mut host = UnixStream::connect(g.uds()).unwrap();
    host.write_all(b"CONNECT 77\n").unwrap();
    let got = g.pump_until("REQUEST", |p| {
        p.iter().any(|(h, _)| h.op == Op::Request as u16)
    });
    let req = got
        .iter()
        .find(|(h, _)| h.op == Op::Request as u16)
        .unwrap()
        .0;
    g.send(g.hdr(Op::Response, 77, req.src_port), &[]);
    let mut line = [0u8; 32];
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = host.read(&mut line).unwrap();
    assert!(line[..n].starts_with(b"OK "));
    g.assert_good_connection_still_works();
}

#[test]
fn survives_bad_avail_index_and_bad_queue_setup() {
    let mut g = Guest::new();
    // An available index far ahead of the ring: virtio-queue refuses to walk it.
    g.set_avail_idx(TXQ, 60_000);
    g.kick(TXQ);
    assert!(g.used(TXQ).is_empty());
    // A fresh driver setup makes the device usable again.
    let mut g = Guest::new();
    g.assert_good_connection_still_works();
}

//! `thaw.vsock-misbehave=KIND`: sends the vsock device deliberately bad input, reports on the
//! console what came back, checks the device still works (status register, a fresh connection
//! and a full agent session afterwards), so a host test can show the VMM survives a hostile
//! guest. Kinds:
//!
//! - `bad-addr`: descriptors outside guest memory (a header at 1 TiB, one whose address wraps
//!   past 2^64, data at 1 TiB on a live connection);
//! - `bad-len`: a header `len` over the 64 KiB packet limit, one longer than its buffer, one of
//!   4 GiB with no buffer, a 8-byte header descriptor;
//! - `bad-op`: unknown operation 0x99 and INVALID (0) on a live connection, a SEQPACKET-type
//!   request, an unsolicited RESPONSE;
//! - `no-conn`: RW, CREDIT_UPDATE, CREDIT_REQUEST, SHUTDOWN and RST for connections that do not
//!   exist, and data to a host port nobody listens on;
//! - `flood`: 256 connection requests to the agent port and 256 to port 9001, in bursts;
//! - `all`: each of the above in turn.

use hooks_sdk::protocol::AGENT_PORT;
use thaw_test_guest::cmdline::Misbehavior;
use thaw_test_guest::driver::TX_SLOTS;
use thaw_test_guest::virtq::Desc;
use thaw_test_guest::vsock::{HDR_LEN, PacketHeader, op};

use crate::println;
use crate::virtio_mmio::{STATUS_NEEDS_RESET, Vsock};

/// Far outside any guest's memory.
const NOWHERE: u64 = 0x100_0000_0000;
/// An address whose buffer wraps past the end of the address space.
const WRAPS: u64 = u64::MAX - 15;
/// How long to wait for the device to return a bad packet.
const RETURN_WAIT_NS: u64 = 1_000_000_000;
/// How long to wait for the answers to a flood.
const FLOOD_WAIT_NS: u64 = 10_000_000_000;
const FLOOD_EACH: u32 = 256;
const SLOT_WAIT_NS: u64 = 5_000_000_000;

fn desc(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        flags: 0,
        next: 0,
    }
}

/// Tallies what the device did with a round of bad packets.
#[derive(Default)]
struct Round {
    sent: u32,
    returned: u32,
    lost: u32,
}

impl Round {
    fn send(&mut self, v: &mut Vsock, h: PacketHeader, hdr: Option<Desc>, data: Option<Desc>) {
        match v.driver.send_raw(&h, hdr, data, SLOT_WAIT_NS) {
            Ok(slot) => {
                self.sent += 1;
                let deadline = crate::clock::now_ns() + RETURN_WAIT_NS;
                while !v.driver.raw_done(slot) && crate::clock::now_ns() < deadline {
                    v.driver.poll();
                }
                if v.driver.raw_done(slot) {
                    self.returned += 1;
                } else {
                    self.lost += 1;
                    v.driver.abandon(slot);
                }
            }
            Err(e) => println!("misbehave: no tx slot for a bad packet ({e:?})"),
        }
    }
}

/// Opens a live connection to the agent port for bad packets that need one.
fn live(v: &mut Vsock) -> Option<()> {
    v.connect(AGENT_PORT).then_some(())
}

fn bad_addr(v: &mut Vsock, r: &mut Round) -> Option<()> {
    let port = v.driver.next_local_port();
    let h = v.driver.raw_header(port, AGENT_PORT, op::REQUEST, 0);
    r.send(v, h, Some(desc(NOWHERE, HDR_LEN as u32)), None);
    r.send(v, h, Some(desc(WRAPS, HDR_LEN as u32)), None);
    live(v)?;
    let h = v.driver.conn_header(op::RW, 4096);
    r.send(v, h, None, Some(desc(NOWHERE, 4096)));
    let h = v.driver.conn_header(op::RW, 16);
    r.send(v, h, None, Some(desc(WRAPS, 16)));
    Some(())
}

fn bad_len(v: &mut Vsock, r: &mut Round, scratch: u64) -> Option<()> {
    live(v)?;
    let h = v.driver.conn_header(op::RW, 1 << 20);
    r.send(v, h, None, Some(desc(scratch, 64)));
    let h = v.driver.conn_header(op::RW, 4096);
    r.send(v, h, None, Some(desc(scratch, 64)));
    let h = v.driver.conn_header(op::RW, u32::MAX);
    r.send(v, h, None, None);
    let port = v.driver.next_local_port();
    let h = v.driver.raw_header(port, AGENT_PORT, op::REQUEST, 0);
    r.send(v, h, Some(desc(scratch, 8)), None);
    Some(())
}

fn bad_op(v: &mut Vsock, r: &mut Round) -> Option<()> {
    live(v)?;
    let h = v.driver.conn_header(0x99, 0);
    r.send(v, h, None, None);
    live(v)?;
    let h = v.driver.conn_header(op::INVALID, 0);
    r.send(v, h, None, None);
    let port = v.driver.next_local_port();
    let h = v.driver.raw_header(port, AGENT_PORT, op::REQUEST, 0);
    r.send(v, PacketHeader { kind: 2, ..h }, None, None);
    let port = v.driver.next_local_port();
    let h = v.driver.raw_header(port, AGENT_PORT, op::RESPONSE, 0);
    r.send(v, h, None, None);
    Some(())
}

fn no_conn(v: &mut Vsock, r: &mut Round, scratch: u64) -> Option<()> {
    for (op, len) in [
        (op::RW, 64),
        (op::CREDIT_UPDATE, 0),
        (op::CREDIT_REQUEST, 0),
        (op::SHUTDOWN, 0),
        (op::RST, 0),
    ] {
        let port = v.driver.next_local_port();
        let h = v.driver.raw_header(port, AGENT_PORT, op, len);
        let data = (len > 0).then(|| desc(scratch, len));
        r.send(
            v,
            PacketHeader {
                flags: 3 * u32::from(op == op::SHUTDOWN),
                ..h
            },
            None,
            data,
        );
    }
    let port = v.driver.next_local_port();
    let h = v.driver.raw_header(port, 9999, op::RW, 64);
    r.send(v, h, None, Some(desc(scratch, 64)));
    Some(())
}

fn flood(v: &mut Vsock, r: &mut Round) -> Option<()> {
    let before = v.driver.stats;
    let burst = (TX_SLOTS / 2) as u32;
    for host_port in [AGENT_PORT, AGENT_PORT + 1] {
        let mut sent = 0;
        while sent < FLOOD_EACH {
            for _ in 0..burst.min(FLOOD_EACH - sent) {
                let port = v.driver.next_local_port();
                let h = v.driver.raw_header(port, host_port, op::REQUEST, 0);
                match v.driver.send_raw(&h, None, None, SLOT_WAIT_NS) {
                    Ok(_) => r.sent += 1,
                    Err(e) => println!("misbehave: flood stalled ({e:?})"),
                }
                sent += 1;
            }
            v.driver.poll_for(2_000_000);
        }
    }
    let answered = |v: &Vsock| {
        let s = v.driver.stats;
        (s.foreign[op::RESPONSE as usize] - before.foreign[op::RESPONSE as usize])
            + (s.foreign[op::RST as usize] - before.foreign[op::RST as usize])
    };
    let deadline = crate::clock::now_ns() + FLOOD_WAIT_NS;
    while answered(v) < r.sent && crate::clock::now_ns() < deadline {
        v.driver.poll_for(1_000_000);
    }
    v.driver.poll_for(50_000_000); // let the RSTs for accepted ones go out
    r.returned = answered(v);
    r.lost = r.sent.saturating_sub(r.returned);
    Some(())
}

/// Runs one kind (or all); returns the device handle if it is still usable.
pub fn run(v: &mut Vsock, kind: Misbehavior, scratch: &mut [u8; 64]) -> Option<()> {
    scratch.fill(0x5a);
    let scratch = scratch.as_ptr() as u64;
    let kinds: &[Misbehavior] = match kind {
        Misbehavior::All => &Misbehavior::EACH,
        _ => core::slice::from_ref(&kind),
    };
    for k in kinds {
        let before = v.driver.stats;
        let mut r = Round::default();
        match k {
            Misbehavior::BadAddr => bad_addr(v, &mut r),
            Misbehavior::BadLen => bad_len(v, &mut r, scratch),
            Misbehavior::BadOp => bad_op(v, &mut r),
            Misbehavior::NoConn => no_conn(v, &mut r, scratch),
            Misbehavior::Flood => flood(v, &mut r),
            Misbehavior::All => Some(()),
        }?;
        v.driver.poll_for(100_000_000); // collect late answers
        let (live_state, live_ended) = v.driver.state();
        v.driver.close();
        let s = v.driver.stats;
        let got = |op: u16| s.foreign[usize::from(op)] - before.foreign[usize::from(op)];
        let status = v.status();
        if *k == Misbehavior::Flood {
            println!(
                "misbehave flood: {} requests sent, {} answered ({} RESPONSE, each reset again; \
                 {} RST), {} control packets dropped; device status {:#x}",
                r.sent,
                r.returned,
                got(op::RESPONSE),
                got(op::RST),
                s.ctrl_dropped - before.ctrl_dropped,
                status
            );
        } else {
            println!(
                "misbehave {}: {} bad packets sent, {} returned by the device, {} kept; \
                 answers: {} RST, {} RESPONSE, {} other; malformed rx {}; live connection \
                 {:?} ({:?}); device status {:#x}",
                k.name(),
                r.sent,
                r.returned,
                r.lost,
                got(op::RST),
                got(op::RESPONSE),
                got(op::RW) + got(op::CREDIT_UPDATE) + got(op::SHUTDOWN) + got(0),
                s.bad_rx - before.bad_rx,
                live_state,
                live_ended,
                status
            );
        }
        if status & STATUS_NEEDS_RESET != 0 {
            println!("misbehave {}: the device asks for a reset", k.name());
            v.reset().then_some(())?;
        }
    }
    // Does a well-behaved connection still work? The agent session that follows opens one and
    // exchanges frames on it.
    println!(
        "misbehave {}: done; checking a good connection with an agent session",
        kind.name()
    );
    Some(())
}

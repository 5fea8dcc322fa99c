//! vsock bench: host ↔ test guest over the VMM's virtio-mmio vsock device, with the guest's
//! polling driver at CPL3. Measures the round trip of a small message (the guest's bench
//! responder echoing 64 bytes; and the agent answering a 64-byte `Invoke` with its SHA-256),
//! and 6 MiB each way with a SHA-256 checksum (host → guest: the guest hashes what it got and
//! answers with the hash; guest → host: the guest sends pseudo-random bytes and their hash).
//! Prints a Markdown table of medians with min and max; with `--write` it also replaces the
//! vsock section of docs/BENCHMARKS.md.
//!
//! Run: `cargo bench --bench vsock [-- --write] [-- --iterations N]`
//! (N transfers each way; round trips are 100 × N).

#![allow(clippy::expect_used, clippy::unwrap_used)] // a bench: failing loudly is the point

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hooks_sdk::protocol::io::{read_frame, write_message};
use hooks_sdk::protocol::{Invoke, Kind, Message};
use sha2::{Digest, Sha256};
use vmm_core::config::VsockConfig;
use vmm_core::{ExitReason, Machine, MachineConfig};

mod support;
use support::{stats, us};

#[path = "../tests/fixture/mod.rs"]
mod fixture;
use fixture::pattern;

const SIX_MIB: usize = hooks_sdk::protocol::MAX_PAYLOAD;

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn mib_s(d: Duration) -> String {
    format!("{:.0} MiB/s", 6.0 / d.as_secs_f64())
}

/// A test guest with a vsock device, and its connection to the host's agent-port listener.
struct Guest {
    _dir: tempfile::TempDir,
    stream: UnixStream,
    vm: JoinHandle<ExitReason>,
}

fn boot(cmdline: &str) -> Guest {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let uds = dir.path().join("v.sock");
    let listener = UnixListener::bind(format!("{}_9000", uds.display())).expect("listen");
    let config = MachineConfig {
        mem_mib: 128,
        vcpus: 1,
        kernel: thaw::test_guest::kernel(),
        initrd: None,
        cmdline: cmdline.into(),
        vsock: Some(VsockConfig {
            guest_cid: 3,
            uds_path: uds,
        }),
        disks: Vec::new(),
    };
    let machine = Machine::create(&config, Box::new(std::io::sink())).expect("create the VM");
    let vm = std::thread::spawn(move || machine.run(None).expect("run the VM"));
    let (stream, _) = listener.accept().expect("the guest connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    Guest {
        _dir: dir,
        stream,
        vm,
    }
}

fn command(op: u8, len: u64) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[8..].copy_from_slice(&len.to_le_bytes());
    c
}

/// Echo round trips of 64 bytes, and 6 MiB each way.
fn bench_responder(round_trips: usize, transfers: usize) -> [Vec<Duration>; 3] {
    let mut g = boot("thaw.vsock-bench=1");
    let s = &mut g.stream;
    let mut greeting = [0u8; 16];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"thaw-vsock-bench");
    let msg = pattern(64, 1);
    let mut request = command(b'E', 64).to_vec();
    request.extend_from_slice(&msg);
    let mut back = [0u8; 64];
    let mut rtt = Vec::new();
    for i in 0..round_trips + round_trips / 10 {
        let t = Instant::now();
        s.write_all(&request).unwrap();
        s.read_exact(&mut back).unwrap();
        if i >= round_trips / 10 {
            rtt.push(t.elapsed()); // the first tenth warms up
        }
        assert_eq!(back[..], msg[..]);
    }
    let mut up = Vec::new();
    let mut down = Vec::new();
    let mut digest = [0u8; 32];
    let mut data = vec![0u8; SIX_MIB + 32];
    // One transfer each way to warm up (the guest hashes its download data on the first
    // request, and first touches of buffers fault memory in on the host).
    for i in 0..=transfers {
        let payload = pattern(SIX_MIB, i as u64 + 2);
        let t = Instant::now();
        s.write_all(&command(b'U', SIX_MIB as u64)).unwrap();
        s.write_all(&payload).unwrap();
        s.read_exact(&mut digest).unwrap();
        if i > 0 {
            up.push(t.elapsed());
        }
        assert_eq!(digest[..], Sha256::digest(&payload)[..], "upload checksum");

        let t = Instant::now();
        s.write_all(&command(b'D', SIX_MIB as u64)).unwrap();
        s.read_exact(&mut data).unwrap();
        if i > 0 {
            down.push(t.elapsed());
        }
        let sum = Sha256::digest(&data[..SIX_MIB]);
        assert_eq!(data[SIX_MIB..], sum[..], "download checksum");
    }
    s.write_all(&command(b'Q', 0)).unwrap();
    assert_eq!(g.vm.join().unwrap(), ExitReason::GuestExit(0));
    [rtt, up, down]
}

/// `Invoke` (64-byte payload) → `Response` round trips through the agent.
fn agent_invokes(round_trips: usize) -> Vec<Duration> {
    let mut g = boot("thaw.agent=1");
    let s = &mut g.stream;
    assert_eq!(read_frame(s).unwrap().kind, Kind::Hello);
    assert_eq!(read_frame(s).unwrap().kind, Kind::Ready);
    let payload = pattern(64, 9);
    let invoke = Message::Invoke(Invoke {
        request_id: "req",
        deadline_ms: 0,
        function_arn: "arn",
        trace_id: "",
        client_context: "",
        cognito_identity: "",
        payload: &payload,
    })
    .encode()
    .unwrap();
    let want = Sha256::digest(&payload);
    let mut samples = Vec::new();
    for i in 0..round_trips + round_trips / 10 {
        let t = Instant::now();
        s.write_all(&invoke).unwrap();
        let response = read_frame(s).unwrap();
        if i >= round_trips / 10 {
            samples.push(t.elapsed());
        }
        match response.message().unwrap() {
            Message::Response { payload, .. } => assert_eq!(payload, &want[..]),
            other => panic!("expected a Response, got {other:?}"),
        }
    }
    write_message(s, &Message::Shutdown).unwrap();
    assert_eq!(g.vm.join().unwrap(), ExitReason::GuestExit(0));
    samples
}

fn main() {
    let support::Args {
        write,
        iterations: transfers,
    } = support::args(20);
    let round_trips = 100 * transfers;

    let [rtt, up, down] = bench_responder(round_trips, transfers);
    let invokes = agent_invokes(round_trips);
    let mut rows = Vec::new();
    for (what, samples) in [
        ("echo, 64 bytes (bench responder)", rtt),
        ("`Invoke` (64-byte payload) → `Response` (agent)", invokes),
    ] {
        let s = stats(samples);
        rows.push(format!(
            "| round trip | {what} | {} | {} | {} |",
            us(s.median),
            us(s.min),
            us(s.max)
        ));
    }
    for (what, samples) in [
        ("host → guest, guest answers the SHA-256", up),
        ("guest → host, data then its SHA-256", down),
    ] {
        let s = stats(samples);
        rows.push(format!(
            "| 6 MiB | {what} | {} ({}) | {} ({}) | {} ({}) |",
            ms(s.median),
            mib_s(s.median),
            ms(s.min),
            mib_s(s.min),
            ms(s.max),
            mib_s(s.max)
        ));
    }
    let mut table = format!(
        "{}; test guest with 1 vCPU and 128 MiB, release build; {round_trips} round trips of \
         each kind (after {} warm-up ones), {transfers} transfers each way (after one \
         warm-up).\n\n\
         | what | measured | median | min | max |\n|---|---|---|---|---|\n",
        support::machine(),
        round_trips / 10
    );
    for row in &rows {
        table.push_str(row);
        table.push('\n');
    }
    print!("{table}");
    if write {
        support::write_section("vsock", &table).expect("update docs/BENCHMARKS.md");
    }
}

//! End-to-end boot bench: how long the built-in test guest takes from "create the VM" to its
//! first console byte and to its exit, in-process and as a `thaw run` process (what a user
//! waits for). Prints a Markdown table of medians with min and max; with `--write` it also
//! replaces the boot section of docs/BENCHMARKS.md.
//!
//! Run: `cargo bench --bench boot [-- --write] [-- --iterations N]`

#![allow(clippy::expect_used, clippy::unwrap_used)] // a bench: failing loudly is the point

use std::io::Write;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_core::{ExitReason, Machine, MachineConfig};

mod support;
use support::{ms, stats};

/// Records when the first console byte arrived.
#[derive(Clone)]
struct FirstByte(Arc<Mutex<Option<Instant>>>);

impl Write for FirstByte {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut first = self
            .0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        if first.is_none() && !buf.is_empty() {
            *first = Some(Instant::now());
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Waits until `fd` (the exit eventfd) is readable and returns when that happened.
fn wait_readable(fd: std::os::fd::RawFd) -> Instant {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid descriptor owned by the machine, which outlives this call (the
    // machine's run returns only after the exit this waits for).
    while unsafe { libc::poll(&mut pfd, 1, -1) } < 1 {}
    Instant::now()
}

/// Times one boot: (first output, exit requested by the guest, run() returned with the VM torn
/// down), each from before the VM is created.
fn boot_in_process(vcpus: u8) -> (Duration, Duration, Duration) {
    let config = MachineConfig {
        mem_mib: 128,
        vcpus,
        kernel: thaw::test_guest::kernel(),
        initrd: None,
        cmdline: String::new(),
        vsock: None,
        disks: Vec::new(),
    };
    let first = FirstByte(Arc::new(Mutex::new(None)));
    let start = Instant::now();
    let machine = Machine::create(&config, Box::new(first.clone())).expect("create the VM");
    let exit = machine.exit_signal();
    let exit_fd = std::os::fd::AsRawFd::as_raw_fd(&*exit);
    let watcher = std::thread::spawn(move || wait_readable(exit_fd));
    let reason = machine.run(None).expect("run the VM");
    let torn_down = start.elapsed();
    let exit_requested = watcher.join().expect("watcher").duration_since(start);
    drop(exit);
    assert_eq!(reason, ExitReason::GuestExit(0));
    let first_output = first
        .0
        .lock()
        .expect("first-byte lock")
        .expect("the guest printed")
        .duration_since(start);
    (first_output, exit_requested, torn_down)
}

fn thaw_run_process(vcpus: u8) -> Duration {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(["run", "--vcpus", &vcpus.to_string()])
        .output()
        .expect("spawn thaw");
    let elapsed = start.elapsed();
    assert!(out.status.success(), "thaw run failed");
    elapsed
}

fn main() {
    let support::Args { write, iterations } = support::args(30);

    let max_vcpus = vmm_core::config::host_cpus().min(2) as u8;
    let mut rows = Vec::new();
    for vcpus in 1..=max_vcpus {
        let mut first = Vec::new();
        let mut exit = Vec::new();
        let mut teardown = Vec::new();
        let mut process = Vec::new();
        boot_in_process(vcpus); // warm-up: page cache, KVM module state
        for _ in 0..iterations {
            let (f, e, t) = boot_in_process(vcpus);
            first.push(f);
            exit.push(e);
            teardown.push(t);
            process.push(thaw_run_process(vcpus));
        }
        for (what, samples) in [
            ("create VM → first guest output", first),
            ("create VM → guest writes its exit code", exit),
            ("create VM → VM stopped and torn down", teardown),
            ("`thaw run` process, start → exit", process),
        ] {
            let s = stats(samples);
            rows.push(format!(
                "| test guest, {vcpus} vCPU{} | {what} | {} | {} | {} |",
                if vcpus > 1 { "s" } else { "" },
                ms(s.median),
                ms(s.min),
                ms(s.max)
            ));
        }
    }
    let mut table = format!(
        "{}; {iterations} runs each, 128 MiB guest, release build.\n\n\
         | guest | measured | median | min | max |\n|---|---|---|---|---|\n",
        support::machine()
    );
    for row in &rows {
        table.push_str(row);
        table.push('\n');
    }
    print!("{table}");
    if write {
        support::write_section("boot", &table).expect("update docs/BENCHMARKS.md");
    }
}

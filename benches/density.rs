//! Density: host memory per idle execution environment, with memory mapped from one shared
//! decoded copy of the snapshot (thawd's default) against private memory per clone (the lazy
//! restore). The function is the test guest's agent with a 64 MiB workload in a 192 MiB guest;
//! its after-restore hook reads (checksums) the whole workload, and it writes little. Each
//! environment is what thawd keeps idle: a `thawd worker` process whose guest was restored,
//! invoked once and frozen. They are made one at a time (only one guest runs at once), all kept,
//! then measured together:
//!
//! - per worker, `/proc/PID/smaps_rollup`: PSS split into shmem (its share of the decoded copy,
//!   which the copy's own size already counts), anonymous (its own pages: what it wrote, its
//!   heap) and file (the binary's share); and the process's page tables (`VmPTE`);
//! - the host: memory in use (`MemTotal - MemAvailable`) before the first environment and with
//!   all of them, which also counts what no process shows (KVM's shadow page tables, kernel
//!   objects of each VM).
//!
//! Run: `cargo bench --bench density [-- --iterations N] [-- --write]`; `--iterations` does
//! not apply (each count is measured once); under `cargo test --benches` it makes 2 of each.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a bench: failing loudly is the point

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use restore_daemon::decoded_copy::{CopyBacking, DecodedCopy};
use restore_daemon::restore::MemoryMode;
use restore_daemon::worker::handle::{CopyGrant, RestoreSpec, Worker, WorkerCommand};
use restore_daemon::worker::protocol::{Invoke, WireOutcome};
use sha2::{Digest, Sha256};

mod support;
#[path = "../tests/fixture/thawd_bin.rs"]
mod thawd_bin;
use support::ms;

const MIB: f64 = 1024.0 * 1024.0;
const WORKLOAD_MIB: u64 = 64;
const GUEST_MIB: u64 = 192;

/// One worker's memory, bytes.
#[derive(Clone, Copy, Default)]
struct Usage {
    pss: u64,
    shmem: u64,
    anon: u64,
    file: u64,
    page_tables: u64,
}

fn kib_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .unwrap_or(0)
        * 1024
}

fn usage(pid: u32) -> Usage {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    Usage {
        pss: kib_field(&rollup, "Pss"),
        shmem: kib_field(&rollup, "Pss_Shmem"),
        anon: kib_field(&rollup, "Pss_Anon"),
        file: kib_field(&rollup, "Pss_File"),
        page_tables: kib_field(&status, "VmPTE"),
    }
}

/// Host memory in use: `MemTotal - MemAvailable`.
fn host_used() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    kib_field(&info, "MemTotal") - kib_field(&info, "MemAvailable")
}

fn snapshot(dir: &Path) -> (PathBuf, PathBuf) {
    let key = dir.join("key");
    let snap = support::agent_snapshot(dir, &key, WORKLOAD_MIB, GUEST_MIB);
    (snap, key)
}

/// Restores one environment in a new worker, invokes it once (checking the answer) and
/// freezes it, as thawd parks an idle environment.
async fn idle_environment(snap: &Path, key: &Path, copy: Option<&CopyGrant>) -> (Worker, Duration) {
    let command = WorkerCommand::thawd(thawd_bin::thawd_bin());
    let mut worker = Worker::spawn(&command, "density").await.unwrap();
    let spec = RestoreSpec {
        snapshot: snap.to_owned(),
        key_file: Some(key.to_owned()),
        memory: MemoryMode::Lazy,
        verified: Some(support::snapshot_id(snap, key)),
        after_restore_timeout: Duration::from_secs(60),
    };
    let info = worker
        .restore(spec, copy, Duration::from_secs(120))
        .await
        .unwrap();
    let payload = b"{\"density\":1}".to_vec();
    let want: [u8; 32] = Sha256::digest(&payload).into();
    let invoked = worker
        .invoke(Invoke {
            request_id: "density".into(),
            deadline_ms: hooks_sdk::host::deadline_after(Duration::from_secs(60)),
            function_arn: "arn:aws:lambda:us-east-1:000000000000:function:density".into(),
            payload,
            timeout_ms: 60_000,
            ..Invoke::default()
        })
        .await
        .unwrap();
    assert_eq!(invoked.outcome, WireOutcome::Response(want.to_vec()));
    worker.freeze(Duration::from_secs(10)).await.unwrap();
    (worker, info.ready)
}

struct Row {
    mode: &'static str,
    n: usize,
    per_env_total: f64,
    per_env_beyond_copy: f64,
    anon: f64,
    shmem: f64,
    file: f64,
    page_tables: f64,
    host_delta: f64,
    ready: Duration,
}

async fn measure(
    mode: &'static str,
    n: usize,
    snap: &Path,
    key: &Path,
    copy: Option<&CopyGrant>,
) -> Row {
    let before = host_used();
    let mut workers = Vec::with_capacity(n);
    let mut ready = Vec::with_capacity(n);
    for _ in 0..n {
        let (w, r) = idle_environment(snap, key, copy).await;
        workers.push(w);
        ready.push(r);
    }
    // Let background installs (a private lazy restore's prefetch) finish before measuring.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = host_used();
    let usages: Vec<Usage> = workers.iter().map(|w| usage(w.pid().unwrap())).collect();
    let sum = |f: fn(&Usage) -> u64| usages.iter().map(f).sum::<u64>() as f64 / MIB;
    let copy_mib = copy.map_or(0.0, |g| g.copy.resident_bytes() as f64 / MIB);
    // The shmem share of each PSS is the copy, split among the workers that map it; the copy
    // is counted once, whole, instead.
    let beyond = sum(|u| u.pss - u.shmem) + sum(|u| u.page_tables);
    let nf = n as f64;
    for w in workers {
        w.kill().await;
    }
    Row {
        mode,
        n,
        per_env_total: (beyond + copy_mib) / nf,
        per_env_beyond_copy: beyond / nf,
        anon: sum(|u| u.anon) / nf,
        shmem: sum(|u| u.shmem) / nf,
        file: sum(|u| u.file) / nf,
        page_tables: sum(|u| u.page_tables) / nf,
        host_delta: after.saturating_sub(before) as f64 / MIB / nf,
        ready: support::stats(ready).median,
    }
}

/// What a clone's write costs: the first write of each page of a private mapping of the copy
/// (copy-on-write), per 4 KiB page, and the memory it adds.
fn write_cost(copy: &DecodedCopy) -> (Duration, u64) {
    use std::os::fd::AsRawFd;
    let len = 16usize << 20;
    // SAFETY: a fresh private mapping of the copy, only used (and unmapped) here.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            copy.file().as_raw_fd(),
            (64 << 20) as libc::off_t,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let bytes = p.cast::<u8>();
    // Read first, as a clone does: the pages are mapped shared, the write then copies.
    for i in (0..len).step_by(4096) {
        // SAFETY: i < len, inside the mapping.
        unsafe { std::ptr::read_volatile(bytes.add(i)) };
    }
    let before = usage(std::process::id()).anon;
    let t = Instant::now();
    for i in (0..len).step_by(4096) {
        // SAFETY: i < len, inside the private mapping; the write goes to this process's copy.
        unsafe { std::ptr::write_volatile(bytes.add(i), 1) };
    }
    let took = t.elapsed() / (len / 4096) as u32;
    let added = usage(std::process::id()).anon - before;
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(p, len) };
    (took, added / (len as u64 / 4096))
}

fn main() {
    let args = support::args(1);
    let argv: Vec<String> = std::env::args().collect();
    let smoke = !argv.iter().any(|a| a == "--bench");
    // `--counts 10,50`: other counts of environments than 10, 50 and 100.
    let counts: Vec<usize> = match argv.iter().position(|a| a == "--counts") {
        Some(i) => argv[i + 1].split(',').map(|n| n.parse().unwrap()).collect(),
        None if smoke => vec![2],
        None => vec![10, 50, 100],
    };
    let few = counts[0];
    let dir = tempfile::tempdir().unwrap();
    let (snap, key) = snapshot(dir.path());
    let opened = restore_daemon::verify::open(
        &snap,
        &snapshot::KeyChoice::Given(snapshot::MasterKey::load(&key).unwrap()),
    )
    .unwrap();
    let huge = CopyBacking::detect(4 << 30);
    assert!(
        huge.huge(),
        "the density bench needs a private tmpfs on huge pages (run it as root)"
    );
    let mut copies = Vec::new();
    for (name, backing) in [
        ("shared copy, huge pages", huge),
        ("shared copy, 4 KiB pages (memfd)", CopyBacking::Memfd),
    ] {
        let t = Instant::now();
        let copy = Arc::new(DecodedCopy::decode(&opened, &backing).unwrap());
        let decode = t.elapsed();
        let (write_time, write_bytes) = write_cost(&copy);
        copies.push((name, backing, copy, decode, write_time, write_bytes));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rows: Vec<Row> = runtime.block_on(async {
        let mut rows = Vec::new();
        for (i, (name, _, copy, ..)) in copies.iter().enumerate() {
            let grant = CopyGrant {
                function: "density".into(),
                copy: copy.clone(),
            };
            // Every count with the preferred backing; the fewest with the other.
            let these = if i == 0 { &counts[..] } else { &counts[..1] };
            for &n in these {
                rows.push(measure(name, n, &snap, &key, Some(&grant)).await);
            }
        }
        rows.push(measure("private (lazy restore)", few, &snap, &key, None).await);
        rows
    });

    let mut table = String::from(
        "| memory | idle environments | per environment: total (copy ÷ N + own) | own memory beyond the copy | of which anonymous | page tables | file (binary) | its share of the copy (PSS) | host memory in use ÷ N | restore → ready (median) |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.2} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} |\n",
            r.mode,
            r.n,
            r.per_env_total,
            r.per_env_beyond_copy,
            r.anon,
            r.page_tables,
            r.file,
            r.shmem,
            r.host_delta,
            ms(r.ready),
        ));
    }
    let mut copies_text = String::new();
    for (name, _, copy, decode, write_time, write_bytes) in &copies {
        copies_text.push_str(&format!(
            "- {name}: the copy holds {:.1} MiB, decoded once in {}; each 4 KiB page a clone \
             first writes becomes its own: {:.1} KiB more memory and {:.2} µs (measured on a \
             private mapping of the copy, after reading it).\n",
            copy.resident_bytes() as f64 / MIB,
            ms(*decode),
            *write_bytes as f64 / 1024.0,
            write_time.as_secs_f64() * 1e6,
        ));
    }
    let body = format!(
        "{}; test guest agent, {GUEST_MIB} MiB guest with a {WORKLOAD_MIB} MiB workload its \
         after-restore hook reads whole, encrypted snapshot; each environment a `thawd worker` \
         process restored, invoked once and frozen; one run.\n\n{copies_text}\n{table}",
        support::machine(),
    );
    println!("{body}");
    if args.write {
        support::write_section("density", &body).expect("update docs/BENCHMARKS.md");
    }
}

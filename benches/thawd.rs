//! thawd end to end: invoke latency through the HTTP Invoke API for restore-on-invoke versus a
//! warm (thawed) environment, and restores per second at concurrency 2. The function is the
//! test guest's agent (128 MiB, 1 vCPU, quiet), snapshotted encrypted; each invocation sends
//! a small JSON event and gets its SHA-256 back (checked). Two daemons serve the snapshot: one
//! keeps its environment idle (frozen) between invocations, the other keeps none
//! (`max_idle_per_function = 0`), so every invocation restores a fresh environment — from a
//! spare worker whose machine shell is already built, when one is ready.
//!
//! Run: `cargo bench --bench thawd [-- --iterations N] [-- --write]`

#![allow(clippy::expect_used, clippy::unwrap_used)] // a bench: failing loudly is the point

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use thaw::capture::Sealing;
use thaw::commands::invoke::{InvocationType, InvokeArgs, invoke};
use thaw::commands::run::RunOptions;
use thaw::commands::snapshot_create::{self, CreateOptions, Readiness};
use vmm_core::config::VsockConfig;

mod support;
#[path = "support/thawd_daemon.rs"]
mod thawd_daemon;

/// Invocations in one burst.
const BURST: usize = 50;
use support::ms;
use thawd_daemon::start as start_daemon;

fn call(endpoint: &str, function: &str, i: usize) -> Duration {
    let payload = format!("{{\"bench\":{i}}}").into_bytes();
    let args = InvokeArgs {
        endpoint: endpoint.into(),
        function: function.into(),
        payload: payload.clone(),
        invocation_type: InvocationType::RequestResponse,
        tail: false,
        timeout: Duration::from_secs(60),
    };
    let t = Instant::now();
    let r = invoke(&args).unwrap();
    let took = t.elapsed();
    let want: [u8; 32] = Sha256::digest(&payload).into();
    assert!(
        r.status == 200 && r.function_error.is_none() && r.body == want,
        "{r:?}"
    );
    took
}

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration, Duration, Duration) {
    v.sort();
    let at = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    (at(0.5), at(0.99), v[0], v[v.len() - 1])
}

fn main() {
    let args = support::args(200);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let snap = dir.path().join("snap");
    snapshot_create::create(
        CreateOptions {
            boot: RunOptions {
                cmdline: Some("thaw.agent=1 thaw.init=snap-start thaw.quiet=1".into()),
                mem_mib: 128,
                vcpus: 1,
                vsock: Some(VsockConfig {
                    guest_cid: 3,
                    uds_path: dir.path().join("create.sock"),
                }),
                ..RunOptions::default()
            },
            out: snap.clone(),
            replace: false,
            ready: Readiness::Agent,
            init_timeout: Duration::from_secs(60),
            sealing: Sealing::Encrypted(snapshot::MasterKey::load_or_create(&key).unwrap()),
        },
        Box::new(std::io::sink()),
    )
    .unwrap();
    let function = |name: &str| {
        format!(
            "[functions.{name}]\nsnapshot = {:?}\nmemory_mib = 128\ntimeout_secs = 30\n\
             key_file = {:?}\n",
            snap.display().to_string(),
            key.display().to_string()
        )
    };
    let iterations = args.iterations.max(2);

    // Warm: one environment, thawed for each invocation.
    let warm = start_daemon(
        dir.path(),
        "warm",
        &format!(
            "max_concurrency = 2\nspare_workers = 1\n{}",
            function("warm")
        ),
    );
    let first = call(&warm.endpoint, "warm", 0);
    let warm_samples: Vec<Duration> = (1..=iterations)
        .map(|i| call(&warm.endpoint, "warm", i))
        .collect();
    drop(warm);

    // Restore on every invocation; a spare worker with its shell built is waited for, so each
    // sample is a restore from a prepared worker (the case thawd aims for).
    let cold = start_daemon(
        dir.path(),
        "cold",
        &format!(
            "max_concurrency = 2\nspare_workers = 2\nmax_idle_per_function = 0\n{}",
            function("cold")
        ),
    );
    std::thread::sleep(Duration::from_secs(2));
    let mut cold_samples = Vec::new();
    for i in 0..iterations.min(100) {
        cold_samples.push(call(&cold.endpoint, "cold", i));
        // Let the spare pool refill, as it would between invocations spread over time.
        std::thread::sleep(Duration::from_millis(150));
    }

    // Restores per second at concurrency 2, back to back: spares cannot keep up, so this
    // includes starting workers and building shells on the invoke path.
    let window = Duration::from_secs(if args.iterations > 1 { 20 } else { 3 });
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let endpoint = cold.endpoint.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let mut i = 0;
                while started.elapsed() < window {
                    call(&endpoint, "cold", 1_000_000 * (t + 1) + i);
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    drop(cold);

    // Bursts: BURST invocations at once, none with an environment to reuse, so every one
    // restores (from the shared copy once it is decoded; spare workers run out after the first
    // few, so most also start their worker and build its shell).
    let burst_daemon = start_daemon(
        dir.path(),
        "burst",
        &format!(
            "max_concurrency = {BURST}\nspare_workers = 2\nmax_idle_per_function = 0\n{}",
            function("burst")
        ),
    );
    std::thread::sleep(Duration::from_secs(2));
    let bursts = if args.iterations > 1 { 5 } else { 1 };
    let mut burst_latencies = Vec::new();
    let mut burst_walls = Vec::new();
    for b in 0..bursts {
        let gate = Arc::new(std::sync::Barrier::new(BURST));
        let started = Arc::new(std::sync::OnceLock::new());
        let threads: Vec<_> = (0..BURST)
            .map(|i| {
                let endpoint = burst_daemon.endpoint.clone();
                let gate = gate.clone();
                let started = started.clone();
                std::thread::spawn(move || {
                    gate.wait();
                    started.get_or_init(Instant::now);
                    call(&endpoint, "burst", 10_000_000 * (b + 1) + i)
                })
            })
            .collect();
        let latencies: Vec<Duration> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let wall = started.get().unwrap().elapsed();
        burst_latencies.extend(latencies);
        burst_walls.push(wall);
        // Let the spares come back between bursts.
        std::thread::sleep(Duration::from_secs(1));
    }
    drop(burst_daemon);

    let (bp50, bp99, bmin, bmax) = percentiles(burst_latencies.clone());
    let wall = support::stats(burst_walls.clone());
    let per_restore = |d: Duration| d / BURST as u32;
    let (wp50, wp99, wmin, wmax) = percentiles(warm_samples);
    let (cp50, cp99, cmin, cmax) = percentiles(cold_samples.clone());
    let body = format!(
        "{}; thawd and the client in one host, HTTP over loopback (`thaw invoke`'s client), test \
         guest function (128 MiB, 1 vCPU, encrypted snapshot, memory `shared`: mapped from the \
         function's decoded copy on huge pages, spare workers restored ahead), one run.\n\n\
         | invocation | samples | p50 | p99 | min | max |\n|---|---|---|---|---|---|\n\
         | first (restore, no spare ready yet) | 1 | {} | | | |\n\
         | warm: idle environment thawed | {} | {} | {} | {} | {} |\n\
         | restore on invoke (from a prepared spare worker) | {} | {} | {} | {} | {} |\n\n\
         Restores per second at concurrency 2, back to back for {:.0?}: **{rate:.1}/s** (every \
         invocation restores; spares run out, so most restores also start a worker process and \
         build its machine shell).\n\n\
         Bursts of {BURST} simultaneous invocations, none with an idle environment to reuse \
         (`max_idle_per_function = 0`, 2 spare workers), {} bursts: every invocation answered \
         (each answer checked); latency p50 {}, p99 {} (p99 ÷ p50 = {:.2}), min {}, max {}; \
         the whole burst took {} (median; {}–{}), **{} per restore amortized** (median; \
         {}–{}).\n",
        support::machine(),
        ms(first),
        iterations,
        ms(wp50),
        ms(wp99),
        ms(wmin),
        ms(wmax),
        cold_samples.len(),
        ms(cp50),
        ms(cp99),
        ms(cmin),
        ms(cmax),
        window,
        bursts,
        ms(bp50),
        ms(bp99),
        bp99.as_secs_f64() / bp50.as_secs_f64(),
        ms(bmin),
        ms(bmax),
        ms(wall.median),
        ms(wall.min),
        ms(wall.max),
        ms(per_restore(wall.median)),
        ms(per_restore(wall.min)),
        ms(per_restore(wall.max)),
    );
    println!("{body}");
    if args.write {
        support::write_section("thawd", &body).expect("update docs/BENCHMARKS.md");
    }
}

//! Soak: 2,000 invocations at concurrency 4 against two functions served by one thawd, in
//! bursts separated by pauses longer than the idle TTL, so environments are reaped and
//! restored again and again. Every answer is checked (the test guest answers the SHA-256 of
//! each unique payload); afterwards thawd's descriptors and resident memory are compared with
//! their values after the first burst, and once thawd has stopped no worker process is left.
//! This file holds one test so that nothing else runs in its process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fixture::thawd::{Thawd, children, fds_and_rss, function_snapshot};
use fixture::{all_vm_slots, require_kvm};
use sha2::{Digest, Sha256};
use thaw::commands::invoke::{InvocationType, InvokeArgs, invoke};

const INVOCATIONS: usize = 2000;
const CONCURRENCY: usize = 4;
const BURSTS: usize = 8;
/// Longer than the idle TTL (1 s) plus the reaper's period.
const PAUSE: Duration = Duration::from_millis(1600);
/// Resident memory may move by allocator caching, not by leaked environments.
const RSS_SLACK_KIB: u64 = 16 * 1024;
/// Descriptors may differ by a few sockets still closing.
const FD_SLACK: usize = 4;

fn metric(endpoint: &str, name: &str) -> f64 {
    let url = format!("{endpoint}/metrics");
    let text = ureq::get(&url)
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn two_thousand_invocations_with_forced_restores_lose_nothing_and_leak_nothing() {
    if !require_kvm("two_thousand_invocations_with_forced_restores_lose_nothing_and_leak_nothing") {
        return;
    }
    let _slots = all_vm_slots();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let snap = function_snapshot(dir.path(), "f", &key);
    let config = format!(
        "max_concurrency = {CONCURRENCY}\nidle_ttl_secs = 1\nspare_workers = 1\n\
         [functions.alpha]\nsnapshot = {snap:?}\nmemory_mib = 128\ntimeout_secs = 10\n\
         key_file = {key:?}\n\
         [functions.beta]\nsnapshot = {snap:?}\nmemory_mib = 128\ntimeout_secs = 10\n\
         key_file = {key:?}\n",
        snap = snap.display().to_string(),
        key = key.display().to_string(),
    );
    let thawd = Thawd::start(dir.path(), &config);
    let endpoint = Arc::new(thawd.endpoint.clone());
    let wrong = Arc::new(AtomicUsize::new(0));
    let per_burst = INVOCATIONS / BURSTS;
    let started = Instant::now();
    let mut baseline = None;
    let mut latencies = Vec::with_capacity(INVOCATIONS);
    for burst in 0..BURSTS {
        let next = Arc::new(AtomicUsize::new(burst * per_burst));
        let end = (burst + 1) * per_burst;
        let threads: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                let (next, endpoint, wrong) = (next.clone(), endpoint.clone(), wrong.clone());
                std::thread::spawn(move || {
                    let mut took = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= end {
                            return took;
                        }
                        let payload = format!("{{\"soak\":{i}}}").into_bytes();
                        let args = InvokeArgs {
                            endpoint: endpoint.to_string(),
                            function: if i % 2 == 0 { "alpha" } else { "beta" }.into(),
                            payload: payload.clone(),
                            invocation_type: InvocationType::RequestResponse,
                            tail: false,
                            timeout: Duration::from_secs(60),
                        };
                        let t = Instant::now();
                        let answer = invoke(&args);
                        took.push(t.elapsed());
                        let want: [u8; 32] = Sha256::digest(&payload).into();
                        match answer {
                            Ok(r)
                                if r.status == 200
                                    && r.function_error.is_none()
                                    && r.body == want => {}
                            other => {
                                eprintln!("invocation {i}: {other:?}");
                                wrong.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            latencies.extend(t.join().unwrap());
        }
        std::thread::sleep(PAUSE);
        if burst == 0 {
            baseline = Some(fds_and_rss(thawd.pid()));
        }
    }
    let elapsed = started.elapsed();
    let (fds_before, rss_before) = baseline.unwrap();
    let (fds_after, rss_after) = fds_and_rss(thawd.pid());
    let restores = metric(&thawd.endpoint, "thawd_restores_total");
    let warm = metric(&thawd.endpoint, "thawd_warm_hits_total");
    // Reaped environments' workers exit in the background; give them a moment.
    let settle = Instant::now() + Duration::from_secs(10);
    let mut workers_while_idle = children(thawd.pid()).len();
    while workers_while_idle > 2 && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(50));
        workers_while_idle = children(thawd.pid()).len();
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "{INVOCATIONS} invocations at concurrency {CONCURRENCY} in {elapsed:.1?}: wrong or lost \
         {}, restores {restores}, warm hits {warm}; latency p50 {:.1?} p99 {:.1?} max {:.1?}; \
         thawd fds {fds_before} → {fds_after}, RSS {rss_before} → {rss_after} KiB; worker \
         processes while idle {workers_while_idle}",
        wrong.load(Ordering::Relaxed),
        pct(0.5),
        pct(0.99),
        latencies[latencies.len() - 1],
    );
    assert_eq!(wrong.load(Ordering::Relaxed), 0, "lost or wrong responses");
    assert!(
        restores >= BURSTS as f64,
        "each burst should restore: {restores}"
    );
    assert!(fds_after <= fds_before + FD_SLACK, "descriptors grew");
    // After the pause only the spare workers (one per function) are left: idle environments
    // were reaped.
    assert!(
        workers_while_idle <= 2,
        "{workers_while_idle} worker processes while idle"
    );
    assert!(
        rss_after <= rss_before + RSS_SLACK_KIB,
        "resident memory grew"
    );
    let pid = thawd.pid();
    assert!(thawd.stop().success());
    assert!(children(pid).is_empty(), "workers outlived thawd");
}

//! 200 restore-and-discard cycles in one process leak nothing: each cycle restores a snapshot
//! lazily (page server, prefetcher, vCPU and device threads, KVM and userfaultfd descriptors,
//! guest memory), runs the agent through its after-restore hooks, invokes it once, and then
//! either shuts it down or kills it. Half the cycles take a machine shell built ahead by a
//! shell pool, which keeps one ready throughout. Afterwards this process has the same
//! descriptors, threads and mappings as after the warm-up, and its resident memory has not
//! grown by more than a little allocator slack. This file holds one test so that nothing else runs in its process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fixture::{Console, pattern, require_kvm, vm_slot};
use hooks_sdk::host::{InvokeOutcome, deadline_after};
use hooks_sdk::protocol::Invoke;
use restore_daemon::environment::{Environment, EnvironmentOptions};
use restore_daemon::restore::{MemoryMode, RestoreOptions};
use restore_daemon::shells::ShellPool;
use sha2::{Digest, Sha256};
use snapshot::KeyChoice;
use vmm_core::machine::ShellSpec;

const CYCLES: usize = 200;
const WARM_UP: usize = 10;
/// Resident memory may move by allocator caching, not by a guest's worth of memory.
const RSS_SLACK_KIB: u64 = 24 * 1024;

#[derive(Debug, PartialEq, Eq)]
struct Resources {
    fds: usize,
    threads: usize,
    mappings: usize,
}

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

fn resources() -> Resources {
    Resources {
        fds: count("/proc/self/fd"),
        threads: count("/proc/self/task"),
        mappings: std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .count(),
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Threads of this process may take a moment to be reaped after they are joined.
fn settled() -> Resources {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut last = resources();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let now = resources();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

#[test]
fn two_hundred_restore_and_discard_cycles_leak_nothing() {
    if !require_kvm("two_hundred_restore_and_discard_cycles_leak_nothing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("k");
    let snap = {
        let _slot = vm_slot();
        fixture::agent_snapshot(dir.path(), "snap", &key_path, "thaw.fill-mib=8", 128)
    };
    let key = KeyChoice::Given(snapshot::MasterKey::load(&key_path).unwrap());
    let payload = pattern(1000, 5);
    let want: [u8; 32] = Sha256::digest(&payload).into();
    let _slot = vm_slot();
    let spec = ShellSpec {
        mem_bytes: 128 << 20,
        vcpus: 1,
    };
    let shells = Arc::new(ShellPool::new().unwrap());
    shells.keep_ready(spec, 1);
    // The pool holds one ready shell whenever this process is measured.
    let pool_full = || assert!(shells.wait_ready(spec, 1, Duration::from_secs(30)));
    let mut baseline = None;
    let started = Instant::now();
    for cycle in 0..CYCLES {
        if cycle == WARM_UP {
            pool_full();
            baseline = Some((settled(), rss_kib()));
        }
        let options = EnvironmentOptions {
            restore: RestoreOptions {
                memory: MemoryMode::Lazy,
                // Half the cycles end while the prefetcher may still be running.
                prefetch: cycle % 2 == 0,
                shells: (cycle % 4 < 2).then(|| shells.clone()),
                ..RestoreOptions::default()
            },
            ..EnvironmentOptions::default()
        };
        let console = Console::default();
        let mut env = Environment::start(&snap, &key, &options, Box::new(console.clone()))
            .unwrap_or_else(|e| panic!("cycle {cycle}: {e:#}\n{}", console.text()));
        let request_id = format!("cycle-{cycle}");
        let request = Invoke {
            request_id: &request_id,
            deadline_ms: deadline_after(Duration::from_secs(60)),
            function_arn: "arn:aws:lambda:us-east-1:123456789012:function:f",
            payload: &payload,
            ..Invoke::default()
        };
        let answer = env.invoke(&request, Duration::from_secs(30)).unwrap();
        assert_eq!(
            answer,
            InvokeOutcome::Response(want.to_vec()),
            "cycle {cycle}"
        );
        // Discard: alternately the polite way and the abrupt one.
        let outcome = if cycle % 3 == 0 {
            env.kill().unwrap()
        } else {
            env.shutdown().unwrap()
        };
        drop(outcome);
    }
    let elapsed = started.elapsed();
    pool_full();
    let pool = shells.stats();
    assert_eq!(pool.hits + pool.misses, CYCLES as u64 / 2, "{pool:?}");
    assert!(pool.hits > 0, "no restore found a shell ready: {pool:?}");
    let (before, rss_before) = baseline.unwrap();
    let after = settled();
    let rss_after = rss_kib();
    println!(
        "{CYCLES} cycles in {elapsed:.1?} ({:.1?} each): after warm-up {before:?}, RSS {rss_before} \
         KiB; at the end {after:?}, RSS {rss_after} KiB; shells {pool:?}",
        elapsed / CYCLES as u32
    );
    assert_eq!(after, before, "descriptors, threads or mappings leaked");
    assert!(
        rss_after <= rss_before + RSS_SLACK_KIB,
        "resident memory grew from {rss_before} KiB to {rss_after} KiB"
    );
}

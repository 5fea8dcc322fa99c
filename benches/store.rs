//! Restoring from an S3-compatible store in another zone: `s3s-fs` on loopback behind a proxy
//! that holds every request back 20 ms (`store::test_servers::delay_proxy`), against the same
//! snapshot restored from its local directory. Each sample is a fresh `thaw restore --invoke`
//! process, timed from its start to the first answer on its stdout.
//!
//! The snapshot: the test guest's agent with a 64 MiB workload in a 192 MiB guest, whose
//! after-restore hook reads only the first 16 MiB of it (`thaw.restore-read-mib=16`), with its
//! working set recorded (`thaw snapshot record-ws`) before it is pushed. So a restore needs a
//! quarter of what the snapshot holds, and the rest must not be fetched.
//!
//! Rows: the local snapshot (this host's records: chunks authenticated before, startup set
//! learned); the store with a cold host cache (a new cache directory per sample); the store
//! with a warm one (every object the restore needs already cached). Bytes fetched are what the
//! process fetched from the store by its first answer (it prints them after the answer, and
//! restores from a store do not fill memory in the background).
//!
//! Run: `cargo bench --bench store [-- --iterations N] [-- --write]`

#![allow(clippy::expect_used, clippy::unwrap_used)] // a bench: failing loudly is the point

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapshot::ChunkKind;
use store::test_servers::{BUCKET, delay_proxy, s3s_fs};

mod support;
use support::{ms, stats};

/// What a store in another zone adds to each request.
const DELAY: Duration = Duration::from_millis(20);
const FILL_MIB: u64 = 64;
const READ_MIB: u64 = 16;
const MEM_MIB: u64 = 192;

/// One `thaw restore --invoke {}`: time from its start to its answer, and what it says it
/// fetched from the store (bytes), if it restored from one.
fn restore_once(args: &[&str], env: &[(&str, String)], state: &Path) -> (Duration, Option<u64>) {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .arg("restore")
        .args(args)
        .args(["--invoke", "{}"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("XDG_STATE_HOME", state)
        .env_remove("THAW_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut answer = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut answer)
        .unwrap();
    let elapsed = started.elapsed();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !answer.is_empty(),
        "thaw restore failed: {stderr}"
    );
    // "thaw: chunk objects: N fetched from the store (X MiB), M from the host cache"
    let fetched = stderr
        .lines()
        .find(|l| l.contains("chunk objects:"))
        .map(|l| {
            let mib: f64 = l
                .split('(')
                .nth(1)
                .and_then(|rest| rest.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no MiB in {l:?}"));
            (mib * 1024.0 * 1024.0) as u64
        });
    (elapsed, fetched)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn main() {
    let args = support::args(15);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let state = dir.path().join("state");
    let snap = support::agent_snapshot_with(
        dir.path(),
        &key,
        FILL_MIB,
        MEM_MIB,
        &format!("thaw.restore-read-mib={READ_MIB}"),
    );
    let recorded = thaw::commands::snapshot_record_ws::record(
        &snap,
        &snapshot::KeyChoice::Given(snapshot::MasterKey::load(&key).unwrap()),
        b"{}",
        Duration::from_secs(60),
        Box::new(std::io::sink()),
    );
    recorded.expect("record the working set");
    let master = snapshot::MasterKey::load(&key).unwrap();
    let local = snapshot::Snapshot::open(&snap, Some(&master)).unwrap();
    let id = local.id();
    let ws: Vec<u32> = local.working_set().unwrap().chunks.clone();

    let server = s3s_fs();
    let url: store::StoreUrl = format!("s3://{BUCKET}/bench").parse().unwrap();
    let pushed = store::Store::connect(&url, &server.options())
        .unwrap()
        .push(&snap, &master)
        .unwrap();
    // Dedup: a second function on the same guest (another workload size, so other memory
    // contents) pushed to the same prefix uploads only the objects the first lacks.
    let other_dir = dir.path().join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let other = support::agent_snapshot_with(&other_dir, &key, FILL_MIB / 2, MEM_MIB, "");
    let second = store::Store::connect(&url, &server.options())
        .unwrap()
        .push(&other, &master)
        .unwrap();
    let proxy = delay_proxy(&server, DELAY);
    // The working set's share of the store: its distinct objects' bytes.
    let ws_bytes = {
        let store = store::Store::connect(&url, &proxy.options(&server)).unwrap();
        let (remote, objects) = store.open_snapshot(id, &master, None).unwrap();
        let remote = Arc::new(remote);
        remote.prefetch_chunks(&ws);
        for &c in &ws {
            let info = remote.chunks()[c as usize];
            if info.kind == ChunkKind::Data {
                let mut buf = vec![0u8; info.len as usize];
                remote
                    .read_chunk_authenticated(c as usize, &mut buf)
                    .unwrap();
            }
        }
        objects.stats().fetched_bytes
    };

    let env: Vec<(&str, String)> = proxy.env(&server).into_iter().collect();
    let key_arg = key.to_str().unwrap().to_owned();
    let local_args = [snap.to_str().unwrap(), "--key-file", &key_arg];
    let url_arg = url.to_string();
    let id_arg = id.to_string();
    let warm_cache = dir.path().join("warm-cache");
    let store_args = |cache: &Path| -> Vec<String> {
        [
            "--store",
            &url_arg,
            "--snapshot-id",
            &id_arg,
            "--key-file",
            &key_arg,
            "--chunk-cache",
            cache.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    // The host has restored the snapshot before: its local records, its startup set, and a
    // cache that holds what a restore needs.
    restore_once(&local_args, &env, &state);
    let warm_args = store_args(&warm_cache);
    let warm_refs: Vec<&str> = warm_args.iter().map(String::as_str).collect();
    restore_once(&warm_refs, &env, &state);

    let (mut local_t, mut cold_t, mut warm_t) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cold_bytes, mut warm_bytes) = (Vec::new(), Vec::new());
    // Round robin: the host's slow spells fall on every row alike.
    for i in 0..args.iterations {
        local_t.push(restore_once(&local_args, &env, &state).0);
        let cold_cache = dir.path().join(format!("cold-{i}"));
        let cold_args = store_args(&cold_cache);
        let cold_refs: Vec<&str> = cold_args.iter().map(String::as_str).collect();
        let (t, bytes) = restore_once(&cold_refs, &env, &state);
        cold_t.push(t);
        cold_bytes.push(Duration::from_nanos(bytes.unwrap()));
        let _ = std::fs::remove_dir_all(&cold_cache);
        let (t, bytes) = restore_once(&warm_refs, &env, &state);
        warm_t.push(t);
        warm_bytes.push(Duration::from_nanos(bytes.unwrap()));
    }
    let (local_s, cold_s, warm_s) = (stats(local_t), stats(cold_t), stats(warm_t));
    let cold_b = stats(cold_bytes).median.as_nanos() as u64;
    let warm_b = stats(warm_bytes).median.as_nanos() as u64;
    let cell = |s: &support::Stats| format!("{} ({}–{})", ms(s.median), ms(s.min), ms(s.max));
    let ratio = |s: &support::Stats| {
        format!(
            "{:.2}×",
            s.median.as_secs_f64() / local_s.median.as_secs_f64()
        )
    };
    let shared = second.objects - second.uploaded;
    let dedup = format!(
        "Dedup: a second snapshot of the same guest with a {} MiB workload, pushed after it, \
         names {} objects ({} data chunks), of which {} ({:.0} %) the store already held: it \
         uploaded {} objects, {}. Both snapshots together: {} chunk references, {} objects \
         stored ({:.2}× fewer).\n",
        FILL_MIB / 2,
        second.objects,
        second.data_chunks,
        shared,
        100.0 * shared as f64 / second.objects.max(1) as f64,
        second.uploaded,
        mib(second.uploaded_bytes),
        pushed.data_chunks + second.data_chunks,
        pushed.objects + second.uploaded,
        (pushed.data_chunks + second.data_chunks) as f64
            / (pushed.objects + second.uploaded).max(1) as f64,
    );
    let table = format!(
        "{}; {} samples per row, round robin. The store: s3s-fs on loopback behind a proxy \
         that holds each request back {} ms. Snapshot: {} MiB guest, {} MiB workload of which \
         the after-restore hook reads {} MiB; {} chunks, {} data chunks in {} objects \
         ({} in the store); recorded working set {} chunks, {} of objects.\n\n\
         | restore from | `thaw restore` start → first answer | ÷ local | fetched from the store by the first answer (median) | ÷ working set | ÷ snapshot |\n\
         |---|---|---|---|---|---|\n\
         | local snapshot directory | {} | 1.00× | — | — | — |\n\
         | store, cold host cache | {} | {} | {} | {:.2}× | {:.2}× |\n\
         | store, warm host cache | {} | {} | {} | — | — |\n\n{}",
        support::machine(),
        args.iterations,
        DELAY.as_millis(),
        MEM_MIB,
        FILL_MIB,
        READ_MIB,
        local.chunks().len(),
        pushed.data_chunks,
        pushed.objects,
        mib(pushed.uploaded_bytes),
        ws.len(),
        mib(ws_bytes),
        cell(&local_s),
        cell(&cold_s),
        ratio(&cold_s),
        mib(cold_b),
        cold_b as f64 / ws_bytes.max(1) as f64,
        cold_b as f64 / pushed.uploaded_bytes.max(1) as f64,
        cell(&warm_s),
        ratio(&warm_s),
        mib(warm_b),
        dedup,
    );
    println!("{table}");
    if args.write {
        support::write_section("store", &table).unwrap();
    }
}

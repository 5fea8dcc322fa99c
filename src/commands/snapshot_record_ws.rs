//! `thaw snapshot record-ws`: learn which memory a function needs to answer (REAP, ASPLOS'21).
//! The snapshot is restored once, lazily, with no prefetching, while the page server records
//! the order in which chunks are first faulted — through the agent's reconnection, its
//! after-restore hooks and the first invocation — until that invocation answers. The order is
//! stored, sealed and authenticated, beside the snapshot; later lazy restores install those
//! chunks first, in that order, in parallel with the guest.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use hooks_sdk::host::{InvokeOutcome, deadline_after};
use hooks_sdk::protocol::Invoke;
use restore_daemon::environment::{EnvironmentOptions, Prepared};
use restore_daemon::restore::{ChunkCheck, MemoryMode, RestoreOptions};
use snapshot::KeyChoice;
use snapshot::{RecordingEnd, WorkingSet};

/// What was recorded and stored.
#[derive(Debug)]
pub struct Recorded {
    /// The stored working set.
    pub working_set: WorkingSet,
    /// Chunks in the snapshot.
    pub chunks: usize,
    /// Bytes of guest memory the working set covers.
    pub bytes: u64,
    /// From the start of the restore to the first answer, while recording.
    pub first_answer: Duration,
}

/// Records the working set of the snapshot at `dir` by invoking it once with `payload`, and
/// stores it in the snapshot (replacing any earlier one).
pub fn record(
    dir: &Path,
    key: &KeyChoice,
    payload: &[u8],
    invoke_timeout: Duration,
    console: vmm_core::devices::serial::ConsoleOutput,
) -> anyhow::Result<Recorded> {
    let started = Instant::now();
    let options = EnvironmentOptions {
        restore: RestoreOptions {
            memory: MemoryMode::Lazy,
            chunk_check: ChunkCheck::Once,
            verified_records: None,
            // Only what the guest faults is recorded: no background installs may hide it.
            prefetch: false,
            use_working_set: false,
            record_working_set: true,
            vsock_uds: None,
            baseline_memory_file: None,
            shells: None,
            shared_copy: None,
            expected_snapshot: None,
            // Installed first, the startup set would be missing from the recording.
            startup_sets: None,
        },
        ..EnvironmentOptions::default()
    };
    let prepared = Prepared::restore(dir, key, &options.restore, console)
        .context("the snapshot could not be restored for recording")?;
    anyhow::ensure!(
        prepared.has_agent(),
        "the snapshot's guest has no vsock device, so it has no agent to invoke"
    );
    let mut env = prepared
        .start(&options)
        .context("the restored guest did not become ready")?;
    let pager = env
        .pager()
        .cloned()
        .context("a lazy restore has a page server")?;
    let request_id = format!("{}-record-ws", env.restore_id());
    let invoke = Invoke {
        request_id: &request_id,
        deadline_ms: deadline_after(invoke_timeout),
        function_arn: "arn:aws:lambda:local:000000000000:function:thaw-record-ws",
        payload,
        ..Invoke::default()
    };
    let answer = env.invoke(&invoke, invoke_timeout);
    pager.stop_recording();
    let first_answer = started.elapsed();
    let chunks = pager.recorded();
    let faults = pager.stats().faults;
    let ended_by = match &answer {
        Ok(_) => RecordingEnd::FirstResponse,
        Err(_) => RecordingEnd::Stopped,
    };
    // A function error still touched what an invocation touches; no answer at all is a failure.
    match answer.context("the recording invocation got no answer")? {
        InvokeOutcome::Response(_) => {}
        InvokeOutcome::Error { error_type, .. } => {
            tracing::warn!(%error_type, "the recording invocation answered with a function error");
        }
    }
    let outcome = env
        .shutdown()
        .context("the recording guest did not end cleanly")?;
    tracing::debug!(reason = %outcome.reason, "recording guest ended");
    let snap = restore_daemon::verify::open(dir, key)?;
    let bytes = chunks
        .iter()
        .filter_map(|&c| snap.chunks().get(c as usize))
        .map(|c| u64::from(c.len))
        .sum();
    let working_set = WorkingSet::new(chunks, faults, ended_by);
    snap.write_working_set(dir, &working_set)
        .context("cannot store the working set")?;
    Ok(Recorded {
        working_set,
        chunks: snap.chunks().len(),
        bytes,
        first_answer,
    })
}

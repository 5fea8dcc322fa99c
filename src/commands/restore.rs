//! `thaw restore`: restore a snapshot, drive its agent through the after-restore step, invoke
//! it if asked, and report where the time went.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hooks_sdk::host::{InvokeOutcome, deadline_after};
use hooks_sdk::protocol::Invoke;
use restore_daemon::environment::{EnvironmentOptions, Prepared};
use restore_daemon::restore::{RestoreOptions, RunOutcome, SnapshotAt};
use snapshot::KeyChoice;
use vmm_core::exit::ExitReason;

/// How long one `--invoke` may take.
const INVOKE_TIMEOUT: Duration = Duration::from_secs(60);

/// The control socket for the restored machine (`--api-sock`).
pub struct RestoreApi {
    /// Where it listens.
    pub path: std::path::PathBuf,
    /// How snapshots made through it are sealed.
    pub sealing: crate::capture::Sealing,
}

/// Serves the control API for `restored` at `api`, if asked for.
fn serve_api(
    api: Option<RestoreApi>,
    restored: &restore_daemon::restore::Restored,
) -> anyhow::Result<Option<crate::control_api::ApiServer>> {
    let Some(api) = api else {
        return Ok(None);
    };
    let server = crate::control_api::start(
        &api.path,
        crate::control_api::ApiContext {
            controller: restored.controller(),
            sealing: api.sealing,
            pager: restored.pager(),
        },
    )?;
    Ok(Some(server))
}

/// What to do with the restored guest's agent.
pub struct AgentUse {
    /// Payloads to invoke the function with, in order.
    pub invoke: Vec<String>,
    /// The after-restore hooks' budget (default: Lambda's 10 s).
    pub after_restore_timeout: Option<Duration>,
}

fn exit_code(reason: &ExitReason) -> ExitCode {
    if reason.exit_code() != 0 {
        eprintln!("thaw: {reason}");
    }
    ExitCode::from(reason.exit_code().clamp(0, 255) as u8)
}

fn report(outcome: &RunOutcome) {
    if let Some(stats) = &outcome.pager {
        tracing::info!(?stats, "page server");
    }
}

/// What a restore from a store fetched, and what its host cache had.
fn report_store(objects: Option<&store::StoreObjects>) {
    let Some(objects) = objects else {
        return;
    };
    let stats = objects.stats();
    eprintln!(
        "thaw: chunk objects: {} fetched from the store ({:.1} MiB), {} from the host cache",
        stats.fetched,
        stats.fetched_bytes as f64 / (1024.0 * 1024.0),
        stats.cache_hits
    );
}

/// Runs a restored guest nobody here talks to, with this terminal's input, until it ends.
fn run_without_agent(
    restored: restore_daemon::restore::Restored,
    api: Option<RestoreApi>,
) -> anyhow::Result<ExitCode> {
    tracing::info!(timings = ?restored.timings, "snapshot restored");
    let _api = serve_api(api, &restored)?;
    let outcome = restored.run(Some(Box::new(std::io::stdin())))?;
    report(&outcome);
    Ok(exit_code(&outcome.reason))
}

/// Where `thaw restore`'s snapshot is.
pub enum RestoreFrom {
    /// A snapshot directory.
    Dir(PathBuf),
    /// A snapshot in an S3-compatible store, read lazily through this host's chunk cache.
    Store {
        url: store::StoreUrl,
        id: snapshot::SnapshotId,
        /// The host cache of chunk objects and its budget in bytes; `None`: no cache.
        cache: Option<(PathBuf, u64)>,
    },
}

/// Why a store's snapshot cannot be opened without a master key.
pub const NO_STORE_KEY: &str = "no master key: pass --key-file (a store's objects are sealed \
                                with the key of the snapshots pushed to it)";

/// Opens a snapshot in a store (its manifest now, its chunks as they are installed).
fn open_in_store(
    url: &store::StoreUrl,
    id: snapshot::SnapshotId,
    cache: Option<&(PathBuf, u64)>,
    key: &KeyChoice,
) -> anyhow::Result<(snapshot::Snapshot, Arc<store::StoreObjects>)> {
    let master = key.master().context(NO_STORE_KEY)?;
    let cache = match cache {
        Some((dir, budget)) => Some(Arc::new(store::ObjectCache::open(dir, *budget)?)),
        None => None,
    };
    let client = store::Store::connect(url, &store::StoreOptions::default())?;
    client
        .open_snapshot(id, master, cache)
        .with_context(|| format!("cannot open snapshot {id} in {url}"))
}

/// Restores the snapshot `from` and runs it as `agent` says.
pub fn run(
    from: &RestoreFrom,
    key: &KeyChoice,
    mut options: RestoreOptions,
    agent: AgentUse,
    api: Option<RestoreApi>,
) -> anyhow::Result<ExitCode> {
    if let Some(api) = &api {
        crate::control_api::check_path(&api.path)?;
    }
    let (at, objects) = match from {
        RestoreFrom::Dir(dir) => (SnapshotAt::Dir(dir), None),
        RestoreFrom::Store { url, id, cache } => {
            let (snap, objects) = open_in_store(url, *id, cache.as_ref(), key)?;
            // Only what the guest touches, and its working set, comes from the store.
            options.prefetch = false;
            (SnapshotAt::Opened(Box::new(snap)), Some(objects))
        }
    };
    let name = match from {
        RestoreFrom::Dir(dir) => dir.display().to_string(),
        RestoreFrom::Store { url, id, .. } => format!("{url} snapshot {id}"),
    };
    if options.vsock_uds.is_some() {
        // Someone else drives the agent: restore and run, with the console on this terminal.
        let restored =
            restore_daemon::restore::restore_from(at, key, &options, Box::new(std::io::stdout()))
                .context("nothing was restored")?;
        return run_without_agent(restored, api);
    }
    // Responses go to stdout; so, when there are any, the console goes to stderr.
    let console: vmm_core::devices::serial::ConsoleOutput = if agent.invoke.is_empty() {
        Box::new(std::io::stdout())
    } else {
        Box::new(std::io::stderr())
    };
    let prepared =
        Prepared::restore_from(at, key, &options, console).context("nothing was restored")?;
    if !prepared.has_agent() {
        anyhow::ensure!(
            agent.invoke.is_empty(),
            "the snapshot's guest has no vsock device, so it has no agent to invoke"
        );
        return run_without_agent(prepared.into_restored(), api);
    }
    let env_options = EnvironmentOptions {
        restore: options,
        after_restore_budget: agent
            .after_restore_timeout
            .unwrap_or(hooks_sdk::host::AFTER_RESTORE_BUDGET),
        ..EnvironmentOptions::default()
    };
    let _api = serve_api(api, prepared.restored())?;
    let mut env = prepared
        .start(&env_options)
        .context("the restored guest did not become ready")?;
    tracing::info!(
        restore_id = env.restore_id(),
        agent = env.agent(),
        timings = ?env.timings,
        "restored guest ready"
    );
    eprintln!(
        "thaw: restored {name} in {:.2?}: first sign of life (the agent's Hello) {:.2?} and ready \
         (after-restore hooks done) {:.1?} after start; restore id {}",
        env.timings.restore.total(),
        env.timings.hello,
        env.timings.ready,
        env.restore_id()
    );
    if agent.invoke.is_empty() {
        let outcome = env.wait()?;
        report(&outcome);
        report_store(objects.as_deref());
        return Ok(exit_code(&outcome.reason));
    }
    let mut stdout = std::io::stdout().lock();
    let mut failed = false;
    for (n, payload) in agent.invoke.iter().enumerate() {
        let request_id = format!("{}-{n}", env.restore_id());
        let invoke = Invoke {
            request_id: &request_id,
            deadline_ms: deadline_after(INVOKE_TIMEOUT),
            function_arn: "arn:aws:lambda:local:000000000000:function:thaw-restore",
            payload: payload.as_bytes(),
            ..Invoke::default()
        };
        match env.invoke(&invoke, INVOKE_TIMEOUT)? {
            InvokeOutcome::Response(bytes) => match std::str::from_utf8(&bytes) {
                Ok(text) => writeln!(stdout, "{text}")?,
                // Binary responses are shown in hex, so the terminal stays usable.
                Err(_) => {
                    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    writeln!(stdout, "{hex}")?;
                }
            },
            InvokeOutcome::Error { error_type, body } => {
                failed = true;
                eprintln!(
                    "thaw: invocation {n} failed with {error_type}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
        }
    }
    stdout.flush()?;
    report_store(objects.as_deref());
    let outcome = env.shutdown()?;
    report(&outcome);
    if failed {
        return Ok(ExitCode::FAILURE);
    }
    Ok(exit_code(&outcome.reason))
}

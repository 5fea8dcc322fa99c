//! Execution environments: restored on invoke when none is idle, frozen (vCPUs paused) while
//! idle and thawed for the next invocation, discarded after the idle TTL or on any failure.
//! Each environment is a worker process (`crate::worker`); a few spare workers per function
//! are started ahead with their machine shell built, so a restore skips process start-up and
//! VM creation.
//!
//! Concurrency: an invocation holds a permit of the daemon's global semaphore and, for a
//! function with reserved concurrency, one of the function's, from admission until its answer;
//! either being used up is Lambda's 429.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::restore::MemoryMode;
use crate::worker::handle::{
    Invoked, RestoreSpec, RestoredInfo, Worker, WorkerCommand, WorkerError,
};
use crate::worker::protocol::{FailureKind, Invoke, WireOutcome};

use super::config::{Config, FunctionConfig, MemoryChoice};
use super::copies::{CopyCache, CopySource};
use super::logs::{self, LogSink, Report};
use super::metrics::Metrics;
use super::registry::{self, SnapshotShape};
use super::{Completed, Invocation, InvokeFailure, LATEST, ThrottleReason};

/// How long a restore (with its after-restore hooks) may take before thawd gives up on it.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);
/// Lambda's budget for after-restore hooks.
const AFTER_RESTORE_BUDGET: Duration = Duration::from_secs(10);
/// Preparing a spare worker (process start and machine shell).
const PREPARE_TIMEOUT: Duration = Duration::from_secs(30);
/// Freezing or thawing an environment.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a discarded environment may take to exit before it is killed (the worker gives its
/// guest 5 s to power off).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(7);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A restored environment.
struct Env {
    worker: Worker,
    /// Peak memory the worker reported last.
    max_memory_used_bytes: u64,
}

struct Idle {
    env: Env,
    since: Instant,
}

/// A worker started ahead of any invocation, with its machine shell built, or, when the
/// function's shared copy was ready, its restore prepared up to a machine that could run.
struct Spare {
    worker: Worker,
    restored_ahead: bool,
}

/// One registered function and its environments.
pub struct Function {
    config: FunctionConfig,
    arn: String,
    shape: SnapshotShape,
    /// For a function whose memory is `shared`: where its decoded copy comes from.
    copy_source: Option<CopySource>,
    reserved: Option<Arc<Semaphore>>,
    idle: Mutex<Vec<Idle>>,
    spares: Mutex<Vec<Spare>>,
    busy: std::sync::atomic::AtomicI64,
}

impl Function {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    fn take_idle(&self) -> Option<Env> {
        lock(&self.idle).pop().map(|i| i.env)
    }

    fn take_spare(&self) -> Option<Spare> {
        lock(&self.spares).pop()
    }
}

/// The daemon: its functions, limits, metrics and logs.
pub struct Pool {
    functions: BTreeMap<String, Arc<Function>>,
    global: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    copies: Arc<CopyCache>,
    logs: LogSink,
    worker: WorkerCommand,
    /// How workers are jailed (`None`: they are not).
    jail: Option<super::jail::Jails>,
    spare_workers: usize,
    max_idle: usize,
    idle_ttl: Duration,
    /// `arn:aws:lambda:REGION:ACCOUNT:function:`, for naming functions that do not exist.
    arn_prefix: String,
}

/// Where `f`'s decoded copy comes from, if its memory is `shared`. Its key was loaded when it
/// was registered; should loading it again fail, its restores stay private.
fn copy_source(f: &FunctionConfig, shape: &SnapshotShape) -> Option<CopySource> {
    if f.memory != MemoryChoice::Shared {
        return None;
    }
    match registry::key_for(f) {
        Ok(key) => Some(CopySource {
            function: f.name.clone(),
            snapshot: f.snapshot.clone(),
            key: Arc::new(key),
            sizes: shape.copy_sizes,
        }),
        Err(e) => {
            tracing::warn!(function = f.name, error = %e, "no decoded copy: its restores stay private");
            None
        }
    }
}

/// Holds an invocation's concurrency permits until it is answered.
struct Admission {
    _global: OwnedSemaphorePermit,
    _reserved: Option<OwnedSemaphorePermit>,
}

/// How one invocation ended, for its answer, its log and its metrics.
enum Ending {
    Answered(Invoked),
    TimedOut,
    GuestEnded(Option<i32>),
}

/// One finished invocation, as its answer and log need it.
struct Finished<'a> {
    ending: &'a Ending,
    /// What the guest printed meanwhile.
    console: &'a [u8],
    duration: Duration,
    /// The restore that preceded it, if it was the first after one.
    restore: Option<Duration>,
    max_memory_used_bytes: u64,
}

impl Pool {
    /// A pool for the functions of `config`, each with its verified snapshot's shape.
    pub fn new(
        config: &Config,
        shapes: &BTreeMap<String, SnapshotShape>,
        worker: WorkerCommand,
        jail: Option<super::jail::Jails>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let functions = config
            .functions
            .values()
            .filter_map(|f| {
                let shape = *shapes.get(&f.name)?;
                let function = Function {
                    config: f.clone(),
                    arn: config.arn(&f.name),
                    shape,
                    copy_source: copy_source(f, &shape),
                    reserved: f
                        .reserved_concurrency
                        .map(|n| Arc::new(Semaphore::new(n as usize))),
                    idle: Mutex::new(Vec::new()),
                    spares: Mutex::new(Vec::new()),
                    busy: std::sync::atomic::AtomicI64::new(0),
                };
                Some((f.name.clone(), Arc::new(function)))
            })
            .collect();
        let copies = CopyCache::new(config.decoded_copy_budget, metrics.clone());
        Ok(Self {
            functions,
            global: Arc::new(Semaphore::new(config.max_concurrency as usize)),
            metrics,
            copies,
            logs: LogSink::new(&config.log_dir)?,
            worker,
            jail,
            spare_workers: config.spare_workers as usize,
            max_idle: config.max_idle_per_function as usize,
            idle_ttl: config.idle_ttl,
            arn_prefix: config.arn(""),
        })
    }

    /// The metrics this pool records.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The function an invocation names, if it exists and the qualifier is `$LATEST`.
    pub fn function(
        &self,
        name: &str,
        qualifier: Option<&str>,
    ) -> Result<&Arc<Function>, InvokeFailure> {
        let found = self.functions.get(name);
        match (found, qualifier) {
            (Some(f), None) => Ok(f),
            (Some(f), Some(q)) if q == LATEST => Ok(f),
            (Some(f), Some(q)) => Err(InvokeFailure::NotFound {
                arn: format!("{}:{q}", f.arn),
            }),
            (None, _) => Err(InvokeFailure::NotFound {
                arn: format!("{}{name}", self.arn_prefix),
            }),
        }
    }

    /// Starts a worker for `f`, jailed unless the config says otherwise.
    async fn spawn_worker(&self, f: &Function) -> Result<Worker, WorkerError> {
        let name = &f.config.name;
        match &self.jail {
            Some(jail) => {
                let spec = jail.spec_for(&f.config);
                Worker::spawn_jailed(&self.worker, name, &spec).await
            }
            None => Worker::spawn(&self.worker, name).await,
        }
    }

    /// Whether an invocation of `f` would be admitted now: asked before its body is read, it
    /// takes nothing (a throttle is counted as one).
    pub fn has_room(&self, f: &Function) -> Result<(), InvokeFailure> {
        let throttled = |reason| {
            self.metrics.throttle(&f.config.name);
            Err(InvokeFailure::Throttled { reason })
        };
        if f.reserved
            .as_ref()
            .is_some_and(|s| s.available_permits() == 0)
        {
            return throttled(ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded);
        }
        if self.global.available_permits() == 0 {
            return throttled(ThrottleReason::ConcurrentInvocationLimitExceeded);
        }
        Ok(())
    }

    fn admit(&self, f: &Function) -> Result<Admission, InvokeFailure> {
        let throttled = |reason| {
            self.metrics.throttle(&f.config.name);
            InvokeFailure::Throttled { reason }
        };
        let reserved = match &f.reserved {
            Some(s) => Some(s.clone().try_acquire_owned().map_err(|_| {
                throttled(ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded)
            })?),
            None => None,
        };
        let global = self
            .global
            .clone()
            .try_acquire_owned()
            .map_err(|_| throttled(ThrottleReason::ConcurrentInvocationLimitExceeded))?;
        Ok(Admission {
            _global: global,
            _reserved: reserved,
        })
    }

    /// Runs one invocation to its end: admission, an environment (thawed or restored), the
    /// invocation, its log; then the environment is frozen for reuse or discarded.
    pub async fn invoke(self: &Arc<Self>, inv: &Invocation) -> Result<Completed, InvokeFailure> {
        let f = self
            .function(&inv.function, inv.qualifier.as_deref())?
            .clone();
        let admission = self.admit(&f)?;
        let name = f.config.name.as_str();
        self.metrics.invocation(name);
        f.busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let result = self.invoke_admitted(&f, inv).await;
        f.busy.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        drop(admission);
        self.publish_environments(&f);
        result
    }

    async fn invoke_admitted(
        self: &Arc<Self>,
        f: &Arc<Function>,
        inv: &Invocation,
    ) -> Result<Completed, InvokeFailure> {
        let name = f.config.name.as_str();
        let (mut env, restore) = match self.thawed(f).await {
            Some(env) => {
                self.metrics.warm_hit(name);
                (env, None)
            }
            None => {
                let (env, info) = self.restore(f).await?;
                (env, Some(info.ready))
            }
        };
        let timeout = f.config.timeout;
        let deadline_ms = SystemTime::now()
            .checked_add(timeout)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let invoke = Invoke {
            request_id: inv.request_id.clone(),
            deadline_ms,
            function_arn: f.arn.clone(),
            client_context: inv.client_context.clone().unwrap_or_default(),
            payload: inv.payload.to_vec(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        let started = Instant::now();
        let result = env.worker.invoke(invoke).await;
        let duration = started.elapsed();
        let (ending, console) = match result {
            Ok(invoked) => {
                env.max_memory_used_bytes = invoked.max_memory_used_bytes;
                let console = invoked.console.clone();
                (Ending::Answered(invoked), console)
            }
            Err(WorkerError::Failed {
                kind: FailureKind::InvokeTimeout,
                console,
                ..
            }) => (Ending::TimedOut, console),
            // Not even the worker answered in time: it is killed below.
            Err(WorkerError::Timeout { .. }) => (Ending::TimedOut, Vec::new()),
            Err(WorkerError::Failed {
                kind: FailureKind::GuestEnded { exit_code },
                console,
                ..
            }) => (Ending::GuestEnded(exit_code), console),
            Err(other) => {
                self.metrics.error(name);
                self.discard(env.worker);
                return Err(InvokeFailure::Service {
                    message: format!("the execution environment failed: {other}"),
                });
            }
        };
        let finished = Finished {
            ending: &ending,
            console: &console,
            duration,
            restore,
            max_memory_used_bytes: env.max_memory_used_bytes,
        };
        let completed = self.answer(f, inv, &finished);
        match ending {
            // A runtime that exited leaves a guest that cannot answer again: Lambda resets such
            // an environment, and so does this pool.
            Ending::Answered(invoked) if invoked.outcome.runtime_exited() => {
                self.discard(env.worker)
            }
            Ending::Answered(_) => self.park(f, env),
            Ending::TimedOut | Ending::GuestEnded(_) => self.discard(env.worker),
        }
        Ok(completed)
    }

    /// Builds the caller's answer and writes the invocation's log.
    fn answer(&self, f: &Function, inv: &Invocation, done: &Finished<'_>) -> Completed {
        let name = f.config.name.as_str();
        let id = inv.request_id.as_str();
        let mut log = logs::start_line(id);
        log.push_str(&logs::console_text(done.console));
        let (payload, function_error) = match done.ending {
            Ending::Answered(invoked) => match &invoked.outcome {
                WireOutcome::Response(body) => (body.clone(), false),
                WireOutcome::FunctionError { body, .. } => (body.clone(), true),
            },
            Ending::TimedOut => {
                self.metrics.timeout(name);
                let secs = f.config.timeout.as_secs_f64();
                log.push_str(&format!(
                    "{} {id} Task timed out after {secs:.2} seconds\n",
                    rfc3339_now()
                ));
                (
                    error_document(
                        "Sandbox.Timedout",
                        &format!("RequestId: {id} Error: Task timed out after {secs:.2} seconds"),
                    ),
                    true,
                )
            }
            Ending::GuestEnded(code) => {
                let why = match code {
                    Some(c) => format!("Runtime exited with error: exit status {c}"),
                    None => "Runtime exited without providing a reason".to_owned(),
                };
                log.push_str(&format!(
                    "RequestId: {id} Error: {why}\nRuntime.ExitError\n"
                ));
                (
                    error_document(
                        "Runtime.ExitError",
                        &format!("RequestId: {id} Error: {why}"),
                    ),
                    true,
                )
            }
        };
        if function_error {
            self.metrics.error(name);
        }
        log.push_str(&logs::end_line(id));
        log.push_str(&logs::report_line(&Report {
            request_id: id.to_owned(),
            duration: done.duration,
            memory_mib: f.config.memory_mib,
            max_memory_used_bytes: done.max_memory_used_bytes,
            restore: done.restore,
        }));
        self.logs.append(name, log.as_bytes());
        Completed {
            payload,
            function_error,
            log_tail: inv.tail_logs.then(|| logs::tail(log.as_bytes()).to_vec()),
        }
    }

    /// An idle environment, thawed; one that fails to thaw is discarded.
    async fn thawed(&self, f: &Function) -> Option<Env> {
        while let Some(mut env) = f.take_idle() {
            match env.worker.thaw(FREEZE_TIMEOUT).await {
                Ok(()) => return Some(env),
                Err(e) => {
                    tracing::warn!(function = f.config.name, error = %e, "an idle environment did not thaw; discarding it");
                    self.discard(env.worker);
                }
            }
        }
        None
    }

    /// A new environment: a spare worker (or a new one) restores the function's snapshot.
    async fn restore(
        self: &Arc<Self>,
        f: &Arc<Function>,
    ) -> Result<(Env, RestoredInfo), InvokeFailure> {
        let name = f.config.name.as_str();
        let service = |what: &str, e: &dyn std::fmt::Display| InvokeFailure::Service {
            message: format!("function {name}: {what}: {e}"),
        };
        // The spare taken is replaced once this restore is done (below): starting a worker
        // now would compete with this restore for the CPUs.
        let spare = match f.take_spare() {
            Some(spare) => spare,
            None => Spare {
                worker: self
                    .spawn_worker(f)
                    .await
                    .map_err(|e| service("cannot start a worker", &e))?,
                restored_ahead: false,
            },
        };
        let Spare {
            mut worker,
            restored_ahead,
        } = spare;
        let spec = RestoreSpec {
            snapshot: f.config.snapshot.clone(),
            key_file: f.config.key_file.clone(),
            memory: match f.config.memory {
                // Without the copy (still decoding, no room), the private path is lazy.
                MemoryChoice::Shared | MemoryChoice::Lazy => MemoryMode::Lazy,
                MemoryChoice::Eager => MemoryMode::Eager,
            },
            after_restore_timeout: AFTER_RESTORE_BUDGET,
            // The registry authenticated every chunk of this very file at start.
            verified: Some(f.shape.id),
        };
        // A spare restored ahead already maps the copy; otherwise the copy, if it is ready.
        let grant = match (&f.copy_source, restored_ahead) {
            (Some(source), false) => match self.copies.grant(source) {
                Ok(grant) => Some(grant),
                Err(miss) => {
                    self.metrics.shared_copy_miss(name, miss);
                    None
                }
            },
            _ => None,
        };
        let restored = worker.restore(spec, grant.as_ref(), RESTORE_TIMEOUT).await;
        self.refill_spares(f);
        match restored {
            Ok(info) => {
                self.metrics.restore(name, info.ready);
                if grant.is_some() || restored_ahead {
                    self.metrics.shared_copy_restore(name);
                }
                Ok((
                    Env {
                        worker,
                        max_memory_used_bytes: 0,
                    },
                    info,
                ))
            }
            Err(e) => {
                self.metrics.error(name);
                self.discard(worker);
                Err(service("the snapshot could not be restored", &e))
            }
        }
    }

    /// Starts workers in the background until `f` has its spares again.
    fn refill_spares(self: &Arc<Self>, f: &Arc<Function>) {
        let missing = self.spare_workers.saturating_sub(lock(&f.spares).len());
        for _ in 0..missing {
            let pool = self.clone();
            let f = f.clone();
            tokio::spawn(async move { pool.add_spare(&f).await });
        }
    }

    /// Starts a spare worker for `f`: its restore prepared ahead when the function's shared copy
    /// is ready (an invocation then only starts the guest), else its shell built.
    async fn add_spare(&self, f: &Function) {
        let grant = f
            .copy_source
            .as_ref()
            .and_then(|source| self.copies.grant(source).ok());
        let prepared = async {
            let mut worker = self.spawn_worker(f).await?;
            let w = &mut worker;
            match &grant {
                Some(grant) => {
                    let spec = RestoreSpec {
                        snapshot: f.config.snapshot.clone(),
                        key_file: f.config.key_file.clone(),
                        memory: MemoryMode::Lazy,
                        after_restore_timeout: AFTER_RESTORE_BUDGET,
                        verified: Some(f.shape.id),
                    };
                    w.prepare_restore(&spec, grant, PREPARE_TIMEOUT).await?;
                }
                None => {
                    w.prepare(f.shape.mem_bytes, f.shape.vcpus, PREPARE_TIMEOUT)
                        .await?;
                }
            }
            Ok::<_, WorkerError>(worker)
        };
        match prepared.await {
            Ok(worker) => {
                let mut spares = lock(&f.spares);
                if spares.len() < self.spare_workers {
                    spares.push(Spare {
                        worker,
                        restored_ahead: grant.is_some(),
                    });
                    return;
                }
                drop(spares);
                self.discard(worker);
            }
            Err(e) => {
                tracing::warn!(function = f.config.name, error = %e, "cannot prepare a spare worker");
            }
        }
    }

    /// Starts every function's spare workers, and decoding the copies of those whose memory
    /// is shared (at daemon start).
    pub fn fill_spares(self: &Arc<Self>) {
        for f in self.functions.values() {
            if let Some(source) = &f.copy_source
                && let Err(miss) = self.copies.prepare(source)
            {
                tracing::info!(
                    function = f.config.name,
                    reason = miss.as_str(),
                    "no decoded copy for now"
                );
            }
            self.refill_spares(f);
        }
    }

    /// The decoded copies.
    pub fn copies(&self) -> &Arc<CopyCache> {
        &self.copies
    }

    /// Freezes an environment that answered and keeps it for the next invocation (unless the
    /// function already has as many idle ones as allowed).
    fn park(self: &Arc<Self>, f: &Arc<Function>, env: Env) {
        if lock(&f.idle).len() >= self.max_idle {
            self.discard(env.worker);
            return;
        }
        let pool = self.clone();
        let f = f.clone();
        tokio::spawn(async move {
            let mut env = env;
            match env.worker.freeze(FREEZE_TIMEOUT).await {
                Ok(()) => {
                    lock(&f.idle).push(Idle {
                        env,
                        since: Instant::now(),
                    });
                    pool.publish_environments(&f);
                }
                Err(e) => {
                    tracing::warn!(function = f.config.name, error = %e, "an environment did not freeze; discarding it");
                    pool.discard(env.worker);
                }
            }
        });
    }

    /// Shuts a worker down in the background (killing it after a grace).
    fn discard(&self, worker: Worker) {
        tokio::spawn(worker.shutdown(SHUTDOWN_GRACE));
    }

    fn publish_environments(&self, f: &Function) {
        let idle = lock(&f.idle).len() as i64;
        let busy = f.busy.load(std::sync::atomic::Ordering::Relaxed);
        self.metrics.set_environments(&f.config.name, idle, busy);
    }

    /// Discards environments idle for longer than the TTL; runs until the pool is dropped.
    pub async fn reap_idle(self: Arc<Self>) {
        let period = (self.idle_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let weak = Arc::downgrade(&self);
        drop(self);
        loop {
            tokio::time::sleep(period).await;
            let Some(pool) = weak.upgrade() else { return };
            // A copy no environment has mapped for an idle TTL goes, as the environments do.
            pool.copies.evict_unused(pool.idle_ttl);
            if let Some(jail) = &pool.jail {
                jail.sweep();
            }
            for f in pool.functions.values() {
                let expired: Vec<Idle> = {
                    let mut idle = lock(&f.idle);
                    let (old, keep): (Vec<Idle>, Vec<Idle>) = idle
                        .drain(..)
                        .partition(|i| i.since.elapsed() >= pool.idle_ttl);
                    *idle = keep;
                    old
                };
                if !expired.is_empty() {
                    tracing::debug!(
                        function = f.config.name,
                        count = expired.len(),
                        "idle environments expired"
                    );
                    for i in expired {
                        pool.discard(i.env.worker);
                    }
                    pool.publish_environments(f);
                }
            }
        }
    }

    /// Shuts down every idle environment and spare worker (at daemon exit).
    pub async fn shutdown(&self) {
        let mut workers = Vec::new();
        for f in self.functions.values() {
            workers.extend(lock(&f.idle).drain(..).map(|i| i.env.worker));
            workers.extend(lock(&f.spares).drain(..).map(|s| s.worker));
        }
        let tasks: Vec<_> = workers
            .into_iter()
            .map(|w| tokio::spawn(w.shutdown(SHUTDOWN_GRACE)))
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }

    /// `(idle, spare)` environment counts of `function`, for tests and status.
    pub fn counts(&self, function: &str) -> Option<(usize, usize)> {
        let f = self.functions.get(function)?;
        Some((lock(&f.idle).len(), lock(&f.spares).len()))
    }
}

/// Lambda's error document.
fn error_document(error_type: &str, message: &str) -> Vec<u8> {
    serde_json::json!({ "errorType": error_type, "errorMessage": message })
        .to_string()
        .into_bytes()
}

/// The current UTC time as `2026-11-24T01:02:03.456Z`, as Lambda's log lines print it.
fn rfc3339_now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// A pool for `config` whose workers cannot start (every restore fails at once), as the
/// daemon's unit tests need one.
#[cfg(test)]
pub(super) fn pool_for_tests(config: &str) -> (Pool, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = super::config::parse(config, "t.toml".as_ref(), dir.path()).unwrap();
    let shapes = config
        .functions
        .keys()
        .map(|name| {
            let shape = SnapshotShape {
                id: snapshot::SnapshotId([1; 16]),
                mem_bytes: 128 << 20,
                vcpus: 1,
                copy_sizes: Default::default(),
            };
            (name.clone(), shape)
        })
        .collect();
    let worker = WorkerCommand {
        program: "/nonexistent".into(),
        args: Vec::new(),
    };
    let pool = Pool::new(&config, &shapes, worker, None, Arc::new(Metrics::new())).unwrap();
    (pool, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_timestamps() {
        let now = rfc3339_now();
        assert_eq!(now.len(), 24, "{now}");
        assert!(now.ends_with('Z'));
    }

    fn pool(config: &str) -> (Pool, tempfile::TempDir) {
        pool_for_tests(config)
    }

    #[test]
    fn global_and_reserved_limits_throttle_with_lambdas_reasons() {
        let (pool, _dir) = pool(
            "max_concurrency = 2\n\
             [functions.a]\nsnapshot = \"s\"\nmemory_mib = 128\nreserved_concurrency = 1\n\
             [functions.b]\nsnapshot = \"s\"\nmemory_mib = 128\n\
             [functions.off]\nsnapshot = \"s\"\nmemory_mib = 128\nreserved_concurrency = 0\n",
        );
        let f = |name: &str| pool.function(name, None).unwrap().clone();
        let reason = |r: Result<Admission, InvokeFailure>| match r {
            Err(InvokeFailure::Throttled { reason }) => reason,
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("admitted"),
        };
        let a1 = pool.admit(&f("a")).unwrap();
        assert_eq!(
            reason(pool.admit(&f("a"))),
            ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded
        );
        let b1 = pool.admit(&f("b")).unwrap();
        assert_eq!(
            reason(pool.admit(&f("b"))),
            ThrottleReason::ConcurrentInvocationLimitExceeded
        );
        // Reserved concurrency 0 turns a function off.
        assert_eq!(
            reason(pool.admit(&f("off"))),
            ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded
        );
        // Permits come back when invocations end.
        drop((a1, b1));
        let _a = pool.admit(&f("a")).unwrap();
        let _b = pool.admit(&f("b")).unwrap();
        assert!(pool.metrics().render().contains("thawd_throttles_total"));
    }

    #[test]
    fn unknown_functions_and_qualifiers_are_not_found() {
        let (pool, _dir) = pool("[functions.a]\nsnapshot = \"s\"\nmemory_mib = 128\n");
        assert!(pool.function("a", Some("$LATEST")).is_ok());
        let arn = |r: Result<&Arc<Function>, InvokeFailure>| match r {
            Err(InvokeFailure::NotFound { arn }) => arn,
            _ => panic!("found"),
        };
        assert_eq!(
            arn(pool.function("a", Some("7"))),
            "arn:aws:lambda:us-east-1:000000000000:function:a:7"
        );
        assert_eq!(
            arn(pool.function("b", None)),
            "arn:aws:lambda:us-east-1:000000000000:function:b"
        );
    }

    #[test]
    fn error_documents_are_lambdas() {
        let doc: serde_json::Value =
            serde_json::from_slice(&error_document("Sandbox.Timedout", "m")).unwrap();
        assert_eq!(doc["errorType"], "Sandbox.Timedout");
        assert_eq!(doc["errorMessage"], "m");
    }
}

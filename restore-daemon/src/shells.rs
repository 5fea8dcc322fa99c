//! A pool of machine shells built ahead of restores (see `vmm_core::machine::MachineShell`).
//!
//! A restore's VM, memory slots and vCPUs depend only on the guest's memory size and vCPU
//! count, and on PVM building them costs about 8 ms of KVM memory-slot bookkeeping, more than
//! all the rest of a small restore. A platform that knows which functions it serves keeps a
//! few shells of each size ready: [`ShellPool::keep_ready`] sets how many, one builder thread
//! keeps that many built, and [`ShellPool::take`] hands one to a restore at once, or `None`
//! when none is ready (the restore then builds its own, as it would without a pool).
//!
//! Shells are never reused: a restored machine's VM carries the guest's state until it is torn
//! down, so each restore takes a fresh one and the builder replaces it.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_core::machine::{MachineShell, ShellSpec};

/// How long the builder waits before trying again after a shell could not be built.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// What the pool has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShellPoolStats {
    /// Restores that found a shell ready.
    pub hits: u64,
    /// Restores that found none and built their own.
    pub misses: u64,
    /// Shells the builder built.
    pub built: u64,
    /// Builds that failed (the builder retries after [`RETRY_AFTER_FAILURE`]).
    pub build_failures: u64,
}

#[derive(Default)]
struct PoolState {
    wanted: HashMap<ShellSpec, usize>,
    ready: HashMap<ShellSpec, Vec<MachineShell>>,
    /// Specs whose last build failed, and when to try them again.
    retry_at: HashMap<ShellSpec, Instant>,
    stats: ShellPoolStats,
    closed: bool,
}

/// What the builder should do next.
enum Next {
    Build(ShellSpec),
    /// Nothing until woken, or until this time (a failed spec's retry).
    Wait(Option<Instant>),
}

impl PoolState {
    /// A spec that has fewer shells ready than wanted and is not waiting to be retried.
    fn next(&self, now: Instant) -> Next {
        let mut earliest_retry: Option<Instant> = None;
        for (spec, &want) in &self.wanted {
            if self.ready.get(spec).map_or(0, Vec::len) >= want {
                continue;
            }
            match self.retry_at.get(spec) {
                Some(&at) if at > now => {
                    earliest_retry = Some(earliest_retry.map_or(at, |e| e.min(at)));
                }
                _ => return Next::Build(*spec),
            }
        }
        Next::Wait(earliest_retry)
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<PoolState>,
    /// Signalled when the builder has work (a shell taken, a count raised, the pool closed).
    work: Condvar,
    /// Signalled when a shell is ready.
    built: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// Machine shells kept ready per memory size and vCPU count, refilled by a builder thread.
pub struct ShellPool {
    shared: Arc<Shared>,
    builder: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ShellPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShellPool")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl ShellPool {
    /// An empty pool and its builder thread; nothing is built until [`ShellPool::keep_ready`].
    pub fn new() -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let for_builder = shared.clone();
        let builder = std::thread::Builder::new()
            .name("thaw-shells".into())
            .spawn(move || build_loop(&for_builder))?;
        Ok(Self {
            shared,
            builder: Some(builder),
        })
    }

    /// Keeps `count` shells of `spec` ready from now on (0 stops building them; ready ones
    /// stay until taken or the pool is dropped).
    pub fn keep_ready(&self, spec: ShellSpec, count: usize) {
        let mut state = self.shared.lock();
        if count == 0 {
            state.wanted.remove(&spec);
        } else {
            state.wanted.insert(spec, count);
        }
        self.shared.work.notify_all();
    }

    /// A ready shell of `spec`, if there is one; the builder then replaces it.
    pub fn take(&self, spec: ShellSpec) -> Option<MachineShell> {
        let mut state = self.shared.lock();
        let shell = state.ready.get_mut(&spec).and_then(Vec::pop);
        match shell {
            Some(_) => state.stats.hits += 1,
            None => state.stats.misses += 1,
        }
        self.shared.work.notify_all();
        shell
    }

    /// How many shells of `spec` are ready.
    pub fn ready(&self, spec: ShellSpec) -> usize {
        self.shared.lock().ready.get(&spec).map_or(0, Vec::len)
    }

    /// Waits until at least `count` shells of `spec` are ready; false if `timeout` passed first.
    pub fn wait_ready(&self, spec: ShellSpec, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if state.ready.get(&spec).map_or(0, Vec::len) >= count {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = match self.shared.built.wait_timeout(state, left) {
                Ok((g, _)) => g,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// What the pool has done so far.
    pub fn stats(&self) -> ShellPoolStats {
        self.shared.lock().stats
    }
}

impl Drop for ShellPool {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.work.notify_all();
        if let Some(builder) = self.builder.take()
            && builder.join().is_err()
        {
            tracing::error!("the shell builder thread panicked");
        }
        // Ready shells are torn down here, with the pool.
    }
}

fn build_loop(shared: &Shared) {
    let mut state = shared.lock();
    loop {
        if state.closed {
            return;
        }
        let spec = match state.next(Instant::now()) {
            Next::Build(spec) => spec,
            Next::Wait(until) => {
                state = match until {
                    None => match shared.work.wait(state) {
                        Ok(g) => g,
                        Err(poisoned) => poisoned.into_inner(),
                    },
                    Some(at) => {
                        let left = at.saturating_duration_since(Instant::now());
                        match shared.work.wait_timeout(state, left) {
                            Ok((g, _)) => g,
                            Err(poisoned) => poisoned.into_inner().0,
                        }
                    }
                };
                continue;
            }
        };
        drop(state);
        let started = Instant::now();
        let built = MachineShell::create(spec);
        state = shared.lock();
        match built {
            Ok(shell) => {
                tracing::debug!(?spec, elapsed = ?started.elapsed(), "machine shell ready");
                state.stats.built += 1;
                state.retry_at.remove(&spec);
                state.ready.entry(spec).or_default().push(shell);
                shared.built.notify_all();
            }
            Err(e) => {
                tracing::warn!(?spec, error = %e, "cannot build a machine shell; retrying later");
                state.stats.build_failures += 1;
                state
                    .retry_at
                    .insert(spec, Instant::now() + RETRY_AFTER_FAILURE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvm_present() -> bool {
        if std::path::Path::new("/dev/kvm").exists() {
            return true;
        }
        assert!(
            std::env::var_os("THAW_SKIP_KVM").is_some(),
            "/dev/kvm is missing; set THAW_SKIP_KVM=1 to skip KVM tests"
        );
        eprintln!("SKIPPED: /dev/kvm is missing and THAW_SKIP_KVM is set");
        false
    }

    const SMALL: ShellSpec = ShellSpec {
        mem_bytes: 32 << 20,
        vcpus: 1,
    };

    #[test]
    fn shells_are_kept_ready_and_replaced_when_taken() {
        if !kvm_present() {
            return;
        }
        let pool = ShellPool::new().unwrap();
        assert!(
            pool.take(SMALL).is_none(),
            "nothing is built before keep_ready"
        );
        pool.keep_ready(SMALL, 2);
        assert!(pool.wait_ready(SMALL, 2, Duration::from_secs(30)));
        let shell = pool.take(SMALL).unwrap();
        assert_eq!(shell.spec(), SMALL);
        // Another size is not served from these.
        let other = ShellSpec { vcpus: 2, ..SMALL };
        assert!(pool.take(other).is_none());
        assert!(
            pool.wait_ready(SMALL, 2, Duration::from_secs(30)),
            "refilled"
        );
        let stats = pool.stats();
        assert_eq!((stats.hits, stats.misses), (1, 2));
        assert_eq!(stats.built, 3);
        // Asking for none stops the building, not the ready ones.
        pool.keep_ready(SMALL, 0);
        drop(pool.take(SMALL));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(pool.ready(SMALL), 1);
    }

    #[test]
    fn a_shell_that_cannot_be_built_is_counted_and_retried_not_fatal() {
        if !kvm_present() {
            return;
        }
        let pool = ShellPool::new().unwrap();
        let impossible = ShellSpec {
            mem_bytes: 16 << 20,
            vcpus: 0,
        };
        pool.keep_ready(impossible, 1);
        assert!(!pool.wait_ready(impossible, 1, Duration::from_millis(300)));
        assert!(pool.stats().build_failures >= 1);
        // The builder still serves other sizes.
        pool.keep_ready(SMALL, 1);
        assert!(pool.wait_ready(SMALL, 1, Duration::from_secs(30)));
        drop(pool); // joins the builder without hanging
    }
}

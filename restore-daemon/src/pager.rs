//! The userfaultfd page server: guest memory starts empty and registered with userfaultfd
//! (missing mode); the first touch of any page — by a vCPU through KVM or by the VMM itself —
//! stops the toucher until the server installs the whole chunk around it (`UFFDIO_COPY`), or
//! maps zeros for a chunk the source elided (`UFFDIO_ZEROPAGE`). A background thread installs
//! the working set first (the chunks a recorded restore touched, in that order) and, once the
//! guest's first burst of faults is over, every other chunk, so the guest runs while its memory
//! arrives.
//!
//! The bytes come from a [`PageSource`], which also lays memory out in chunks: a sealed local
//! snapshot ([`SnapshotSource`], every chunk authenticated as it is read) or plaintext memory
//! in this process ([`MemorySource`]). The server owns when chunks are installed; the source,
//! what they hold.
//!
//! Each chunk is installed once: a per-chunk state (missing → installing → installed) decides
//! who installs it. Whoever loses that race, or gets `EEXIST` from the kernel, only wakes the
//! range, since the winner's copy wakes the waiters too.
//!
//! **Discarded memory.** The uffd is opened with `UFFD_FEATURE_EVENT_REMOVE`: when anyone
//! `madvise(MADV_DONTNEED)`s registered memory (a balloon, the VMM dropping pages) the kernel
//! reports the range before zapping it. Those pages must read as zeros from then on, as
//! anonymous memory does, never as snapshot contents again, so the server keeps a per-4 KiB
//! "removed" bit: a fault in a removed page gets a zero page, and a chunk installed later skips
//! its removed pages. Installers on other threads copy only while holding a shared gate that
//! the fault thread takes exclusively to read events, so no copy can start between the kernel
//! handing over a remove event and the removed bits being set (a copy landing after the zap
//! would resurrect snapshot data).
//!
//! **Accounting.** When the full prefetch (or `install_all`) has passed over every chunk, the
//! server checks that every chunk is installed and that its counts add up
//! ([`PageServer::check_complete`]); if not, that is a failure like any other.
//!
//! **Failure.** If the server cannot go on (a chunk does not authenticate, an ioctl fails, a
//! fault lands outside guest memory, a server thread panics) it records the error, calls
//! [`PagerOptions::on_failure`] once and unregisters all guest memory, which wakes every blocked
//! faulter: from then on untouched pages are ordinary anonymous memory (zeros), so **guest memory
//! is no longer the snapshot's and the VM must not run on**. The owner stops it from
//! `on_failure`; the server only guarantees nothing hangs.

mod accounting;
mod error;
mod serve;
mod shared;
mod source;

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests_discard;
#[cfg(test)]
mod tests_failure;
#[cfg(test)]
mod tests_serving;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use userfaultfd::{FeatureFlags, UffdBuilder};
/// Where a region of guest memory lives in this process (what the server registers).
pub use vmm_core::memory::HostRange;

pub use accounting::PagerStats;
pub use error::{BoxError, InstallOp, LayoutError, PagerError, SourceError, Tally, UffdError};
use shared::Shared;
pub use source::{
    ChunkLayout, Fill, MemorySource, PageSource, SnapshotSource, SourceChunk, SourceRegion,
};

/// After the guest's first fault, the full prefetch waits until no fault has arrived for this
/// long. A restored guest first touches the pages its next instructions need, in a dense burst;
/// prefetching the whole snapshot during it would compete with those faults for the CPU and the
/// disk (this host has two cores), while a few milliseconds of silence mean the guest is running
/// on what it has.
pub const PREFETCH_QUIET: Duration = Duration::from_millis(2);
/// The full prefetch starts at the latest this long after the server starts, burst or not: a
/// guest that keeps faulting steadily (or never faults) must still get its memory in the
/// background instead of paying a fault per chunk for ever.
pub const PREFETCH_DEADLINE: Duration = Duration::from_millis(50);

/// Called once, from the server thread that failed, with the error.
pub type FailureHook = Box<dyn Fn(&PagerError) + Send + Sync>;

/// How the server fills memory besides answering faults.
pub struct PagerOptions {
    /// Install every chunk not yet installed in the background, starting after the guest's
    /// first burst of faults ([`PREFETCH_QUIET`], [`PREFETCH_DEADLINE`]).
    pub prefetch: bool,
    /// Chunk indices to install first, in this order, starting at once and in parallel with
    /// the guest; installed even if `prefetch` is false. Typically the snapshot's recorded
    /// working set. Each must be below the source's chunk count.
    pub working_set: Vec<u32>,
    /// Chunk indices the fault thread installs as soon as the server starts, in this order,
    /// before it waits for faults (one that arrives meanwhile is served before the next of
    /// them): the chunks a restore of this snapshot needed before its first sign of life (see
    /// `startup_set`), so that they are in place before the guest runs instead of each
    /// stopping it for a fault. Each must be below the source's chunk count.
    pub startup: Vec<u32>,
    /// Record the order in which the fault thread first installs chunks for faults (see
    /// [`PageServer::recorded`]). Chunks installed by the background thread are not recorded,
    /// so record with `prefetch` off and an empty `working_set` to capture everything the guest
    /// touches.
    pub record: bool,
    /// Called once when the server fails, from the failing server thread, before faulting
    /// threads are released. It must stop the VM (kick the vCPUs and make them exit) and must
    /// not wait for vCPU threads: they may be blocked in faults that are released only after
    /// it returns.
    pub on_failure: Option<FailureHook>,
}

impl Default for PagerOptions {
    fn default() -> Self {
        PagerOptions {
            prefetch: true,
            working_set: Vec::new(),
            startup: Vec::new(),
            record: false,
            on_failure: None,
        }
    }
}

impl std::fmt::Debug for PagerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagerOptions")
            .field("prefetch", &self.prefetch)
            .field("working_set", &self.working_set.len())
            .field("startup", &self.startup.len())
            .field("record", &self.record)
            .field("on_failure", &self.on_failure.is_some())
            .finish()
    }
}

/// A running page server. Dropping it stops its threads and closes the userfaultfd, which
/// unregisters the memory: pages not installed by then read as zeros, so drop it only after the
/// VM has stopped (or once [`PageServer::complete`]).
pub struct PageServer {
    shared: Arc<Shared>,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl PageServer {
    /// Registers `regions` (empty, private anonymous memory laid out as the source's regions)
    /// with userfaultfd and starts serving faults from `source`, filling memory in the
    /// background as `options` say.
    pub fn start(
        source: Arc<dyn PageSource>,
        regions: Vec<HostRange>,
        options: PagerOptions,
    ) -> Result<PageServer, PagerError> {
        let layout = source.layout();
        let described: Vec<(u64, u64)> = layout
            .regions()
            .iter()
            .map(|r| (r.guest_addr, r.len))
            .collect();
        let given: Vec<(u64, u64)> = regions
            .iter()
            .map(|r| (r.guest_addr, r.len as u64))
            .collect();
        if described != given {
            return Err(LayoutError::Regions { described, given }.into());
        }
        let chunks = layout.chunks().len();
        let beyond = |set: &[u32]| set.iter().copied().find(|&i| i as usize >= chunks);
        if let Some(index) = beyond(&options.working_set) {
            return Err(PagerError::WorkingSet { index, chunks });
        }
        if let Some(index) = beyond(&options.startup) {
            return Err(PagerError::StartupSet { index, chunks });
        }
        // With UFFDIO_MOVE (Linux 6.8) background installs move whole huge pages; a kernel
        // without it refuses the feature, and installs go chunk by chunk.
        let open = |features: FeatureFlags| {
            UffdBuilder::new()
                .close_on_exec(true)
                .non_blocking(true)
                .user_mode_only(false)
                .require_features(features)
                .create()
        };
        let with_move =
            FeatureFlags::EVENT_REMOVE | FeatureFlags::from_bits_retain(shared::FEATURE_MOVE);
        let (uffd, can_move) = match open(with_move) {
            Ok(uffd) => (uffd, true),
            Err(_) => (
                open(FeatureFlags::EVENT_REMOVE).map_err(|e| PagerError::Open(e.into()))?,
                false,
            ),
        };
        for r in &regions {
            // Registration failing half-way needs no undo: dropping the uffd unregisters.
            uffd.register(r.host_addr as *mut libc::c_void, r.len)
                .map_err(|e| PagerError::Register {
                    host_addr: r.host_addr,
                    len: r.len,
                    source: e.into(),
                })?;
        }
        let PagerOptions {
            prefetch,
            working_set,
            startup,
            record,
            on_failure,
        } = options;
        let shared = Arc::new(Shared::new(
            source, uffd, &regions, record, can_move, on_failure,
        )?);
        let server = PageServer {
            shared: shared.clone(),
            threads: std::sync::Mutex::new(Vec::new()),
        };
        // On a spawn error `server` is dropped, which stops the threads already started.
        let faults = shared.clone();
        server.adopt(
            std::thread::Builder::new()
                .name("uffd-faults".into())
                .spawn(move || serve::fault_thread(&faults, &startup))
                .map_err(PagerError::Thread)?,
        );
        let plan = Arc::new(serve::WorkingSetPlan::new(&shared, working_set));
        let helper = plan.wants_helper();
        if !plan.is_empty() {
            // Faults may hand blocks to the working set's installers (`shared::urgent`).
            shared.open_urgent(plan.whole().to_vec(), 1 + usize::from(helper));
        }
        if helper {
            let (shared, plan) = (shared.clone(), plan.clone());
            server.adopt(
                std::thread::Builder::new()
                    .name("uffd-working-set".into())
                    .spawn(move || serve::working_set_helper(&shared, &plan))
                    .map_err(PagerError::Thread)?,
            );
        }
        if prefetch && vmm_core::config::host_cpus() > 1 {
            let shared = shared.clone();
            server.adopt(
                std::thread::Builder::new()
                    .name("uffd-stream".into())
                    .spawn(move || serve::stream_follower(&shared))
                    .map_err(PagerError::Thread)?,
            );
        }
        if prefetch || !plan.is_empty() {
            server.adopt(
                std::thread::Builder::new()
                    .name("uffd-prefetch".into())
                    .spawn(move || serve::background_thread(&shared, &plan, prefetch))
                    .map_err(PagerError::Thread)?,
            );
        }
        Ok(server)
    }

    /// What the server has done so far.
    pub fn stats(&self) -> PagerStats {
        self.shared.stats()
    }

    /// Whether every chunk has been installed (nothing left to fault).
    pub fn complete(&self) -> bool {
        self.shared.complete()
    }

    /// The final accounting: the stats, once every chunk is installed and the counts add up
    /// (see [`PagerStats::check_totals`]); otherwise [`PagerError::Incomplete`] or
    /// [`PagerError::Unaccounted`]. The background thread runs it when its full prefetch ends,
    /// and `install_all` before it returns; either fails the server if it does not hold.
    pub fn check_complete(&self) -> Result<PagerStats, PagerError> {
        self.shared.check_complete()
    }

    /// Waits until every chunk is installed, the server fails, or `timeout` passes; returns
    /// whether every chunk is installed. For benchmarks and tests.
    pub fn wait_complete(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.complete() {
                return true;
            }
            let now = Instant::now();
            if self.shared.failed() || now >= deadline {
                return false;
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(1)));
        }
    }

    /// The error that stopped the server, if one did.
    pub fn failure(&self) -> Option<Arc<PagerError>> {
        self.shared.failure()
    }

    /// The chunks the fault thread installed for faults so far, in order, each once (empty
    /// unless [`PagerOptions::record`]).
    pub fn recorded(&self) -> Vec<u32> {
        self.shared.recorded()
    }

    fn threads(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        match self.threads.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn adopt(&self, thread: JoinHandle<()>) {
        self.threads().push(thread);
    }

    /// Stops the server's threads and waits for them; memory stays registered until the server
    /// is dropped. Owners that share the server call this once the VM has stopped, so no
    /// background copy races the unmapping of guest memory.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.stream.wake_follower();
        let threads: Vec<_> = self.threads().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }

    /// Installs every chunk not yet installed, from the calling thread, and returns once all
    /// memory is the source's and accounted for: for callers about to read all of guest
    /// memory themselves (a new snapshot of a lazily restored guest). Fails if the server has
    /// failed (or fails it, if the final accounting does not hold).
    pub fn install_all(&self) -> Result<(), Arc<PagerError>> {
        serve::install_all(&self.shared);
        match self.shared.failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// What [`PageServer::recorded`] holds of the chunks taken on before `until`: with a
    /// restored guest's first sign of life, what its start-up needed.
    pub fn recorded_before(&self, until: Instant) -> Vec<u32> {
        self.shared.recorded_before(until)
    }

    /// Stops recording; [`PageServer::recorded`] keeps what was recorded until now.
    pub fn stop_recording(&self) {
        self.shared.recording.store(false, Ordering::Release);
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.stop();
    }
}

//! The state every server thread shares: where each chunk lives, who has installed it, which
//! pages were discarded, the events and faults, the final accounting and failing; installing
//! itself is in `install`.

mod block;
mod install;
mod stream;
mod urgent;

#[cfg(test)]
pub(super) use stream::RUN;

pub(super) use block::{FEATURE_MOVE, Staging};
pub(super) use stream::Stream;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use userfaultfd::{Event, Uffd};

use super::accounting::Counters;
use super::error::{LayoutError, PagerError};
use super::source::PageSource;
use super::{FailureHook, HostRange, PagerStats};

pub(super) use super::source::PAGE;

const MISSING: u8 = 0;
const INSTALLING: u8 = 1;
const INSTALLED: u8 = 2;

/// How often the final accounting looks whether installs in flight have finished.
const SETTLE_WAIT: Duration = Duration::from_micros(100);

struct Region {
    host: usize,
    len: usize,
    first_chunk: usize,
    first_page: usize,
}

struct Chunk {
    host: usize,
    len: usize,
    first_page: usize,
    /// Elided by the source: zero pages, without asking it.
    zero: bool,
}

/// Why an install stopped short.
pub(super) enum Halt {
    /// The server is stopping or has already failed; not an error of this install.
    Stopped,
    Failed(PagerError),
}

/// Who is installing: the fault thread must read events itself to get past an `EAGAIN` (the
/// kernel holds installs off until the remove event is read), and queues the faults it reads
/// meanwhile; other threads wait for it.
pub(super) enum Role<'q> {
    Faults(&'q mut VecDeque<usize>),
    Background,
}

pub(super) enum Outcome {
    /// This call installed the chunk.
    Installed,
    /// Someone else has installed it or is installing it.
    Skipped,
}

pub(super) struct Shared {
    source: Arc<dyn PageSource>,
    uffd: Uffd,
    regions: Vec<Region>,
    chunk_size: usize,
    chunks: Vec<Chunk>,
    state: Vec<AtomicU8>,
    /// One bit per 4 KiB page of guest memory (pages numbered across regions in order): set
    /// once the page was discarded, never cleared. Written only by the fault thread with `gate`
    /// held exclusively; read by background installers with it held shared.
    removed: Vec<AtomicU64>,
    pages: usize,
    gate: RwLock<()>,
    started: Instant,
    pub stop: AtomicBool,
    failed: AtomicBool,
    /// Nanoseconds after `started` of the fault thread's last fault activity.
    last_fault_ns: AtomicU64,
    /// Whether the fault thread has faults queued or in hand.
    pub busy: AtomicBool,
    pub counters: Counters,
    /// Whether background installers move whole blocks (`UFFDIO_MOVE`); cleared when the
    /// kernel refuses a move for good.
    can_move: AtomicBool,
    pub recording: AtomicBool,
    /// Each chunk first installed for a fault, when the fault thread took it on.
    recorded: Mutex<Vec<(u32, Instant)>>,
    failure: Mutex<Option<Arc<PagerError>>>,
    on_failure: Mutex<Option<FailureHook>>,
    /// Blocks faults handed to the working set's installers (see `urgent`).
    urgent: Mutex<urgent::Urgent>,
    /// The guest reading memory in order, for the prefetch to follow (see `stream`).
    pub stream: stream::Stream,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// `host_regions` must be the source's regions (the caller checked their guest addresses
    /// and lengths).
    pub fn new(
        source: Arc<dyn PageSource>,
        uffd: Uffd,
        host_regions: &[HostRange],
        record: bool,
        can_move: bool,
        on_failure: Option<FailureHook>,
    ) -> Result<Shared, PagerError> {
        let layout = source.layout();
        let chunk_size = layout.chunk_size();
        let mut regions = Vec::with_capacity(host_regions.len());
        let mut chunks = Vec::with_capacity(layout.chunks().len());
        let expected: usize = host_regions
            .iter()
            .map(|r| r.len.div_ceil(chunk_size))
            .sum();
        if expected != layout.chunks().len() {
            return Err(LayoutError::ChunkCount {
                chunks: layout.chunks().len(),
                expected,
            }
            .into());
        }
        let mut first_page = 0;
        for r in host_regions {
            let first_chunk = chunks.len();
            // The layout cuts each region into chunk_size pieces from its start (checked by
            // `ChunkLayout::new`); `locate` relies on it.
            for (off, info) in (0..r.len)
                .step_by(chunk_size)
                .zip(layout.chunks().iter().skip(first_chunk))
            {
                chunks.push(Chunk {
                    host: r.host_addr + off,
                    len: info.len,
                    first_page: first_page + off / PAGE,
                    zero: info.zero,
                });
            }
            regions.push(Region {
                host: r.host_addr,
                len: r.len,
                first_chunk,
                first_page,
            });
            first_page += r.len.div_ceil(PAGE);
        }
        Ok(Shared {
            source,
            uffd,
            regions,
            chunk_size,
            state: chunks.iter().map(|_| AtomicU8::new(MISSING)).collect(),
            chunks,
            removed: (0..first_page.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            pages: first_page,
            gate: RwLock::new(()),
            started: Instant::now(),
            stop: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            last_fault_ns: AtomicU64::new(0),
            stream: stream::Stream::default(),
            busy: AtomicBool::new(false),
            counters: Counters::default(),
            can_move: AtomicBool::new(can_move),
            recording: AtomicBool::new(record),
            recorded: Mutex::new(Vec::new()),
            failure: Mutex::new(None),
            on_failure: Mutex::new(on_failure),
            urgent: Mutex::new(urgent::Urgent::default()),
        })
    }

    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Allocates the calling server thread's decoding state and returns a buffer for one
    /// chunk, before the guest runs. In a running VM's process, anything that maps memory
    /// (a buffer's first allocation, a thread's malloc arena) waits for the address space's
    /// lock behind the guest's page faults, and the faults after it wait behind it: measured
    /// on this 2-CPU PVM host, a server thread mapping its buffers just after the guest
    /// started held the vCPU up to 1 ms on that lock.
    pub fn prepare_thread(&self) -> Vec<u8> {
        self.source.prepare_thread();
        Vec::with_capacity(self.chunk_size)
    }

    /// Whether whole blocks may still be moved in (`UFFDIO_MOVE`; see `block`).
    pub fn can_move(&self) -> bool {
        self.can_move.load(Ordering::Relaxed)
    }

    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    fn uffd_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.uffd.as_raw_fd()
    }

    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Whether installs should give up: the server is stopping or has failed.
    fn halted(&self) -> bool {
        self.stop.load(Ordering::Acquire) || self.failed()
    }

    pub fn since_start(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn note_fault_activity(&self) {
        let ns = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_fault_ns.store(ns, Ordering::Release);
    }

    pub fn last_fault_activity(&self) -> Duration {
        Duration::from_nanos(self.last_fault_ns.load(Ordering::Acquire))
    }

    pub fn stats(&self) -> PagerStats {
        self.counters.stats(self.chunks.len(), self.pages)
    }

    pub fn complete(&self) -> bool {
        self.state
            .iter()
            .all(|s| s.load(Ordering::Acquire) == INSTALLED)
    }

    /// The final accounting: every chunk installed and the counts adding up.
    pub fn check_complete(&self) -> Result<PagerStats, PagerError> {
        let (mut missing, mut installing, mut first) = (0, 0, None);
        for (index, s) in self.state.iter().enumerate() {
            match s.load(Ordering::Acquire) {
                INSTALLED => continue,
                MISSING => missing += 1,
                _ => installing += 1,
            }
            first.get_or_insert(index);
        }
        if let Some(first) = first {
            return Err(PagerError::Incomplete {
                chunks: self.chunks.len(),
                missing,
                installing,
                first,
            });
        }
        // Every install counted itself before marking its chunk installed (Release), and the
        // loads above saw every mark (Acquire), so the counts below include every install.
        let stats = self.stats();
        stats.check_totals()?;
        Ok(stats)
    }

    /// Waits until no chunk is being installed, for the final accounting after a full pass
    /// (a chunk the pass skipped because the fault thread was installing it may still be in
    /// flight); false if the server stops or fails first.
    pub fn settle(&self) -> bool {
        loop {
            if self.halted() {
                return false;
            }
            if !self
                .state
                .iter()
                .any(|s| s.load(Ordering::Acquire) == INSTALLING)
            {
                return true;
            }
            std::thread::sleep(SETTLE_WAIT);
        }
    }

    /// Test hook: marks chunk `index` as never installed, as a bookkeeping bug would.
    #[cfg(test)]
    pub fn forget_install(&self, index: usize) {
        if let Some(s) = self.state.get(index) {
            s.store(MISSING, Ordering::Release);
        }
    }

    pub fn failure(&self) -> Option<Arc<PagerError>> {
        lock(&self.failure).clone()
    }

    pub fn recorded(&self) -> Vec<u32> {
        lock(&self.recorded)
            .iter()
            .map(|&(index, _)| index)
            .collect()
    }

    pub fn recorded_before(&self, until: Instant) -> Vec<u32> {
        let recorded = lock(&self.recorded);
        let taken = recorded.partition_point(|&(_, at)| at < until);
        recorded[..taken].iter().map(|&(index, _)| index).collect()
    }

    /// The chunk and the global page number of host address `addr`.
    fn locate(&self, addr: usize) -> Option<(usize, usize)> {
        let r = self
            .regions
            .iter()
            .find(|r| addr >= r.host && addr - r.host < r.len)?;
        let off = addr - r.host;
        Some((
            r.first_chunk + off / self.chunk_size,
            r.first_page + off / PAGE,
        ))
    }

    fn is_removed(&self, page: usize) -> bool {
        self.removed
            .get(page / 64)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (page % 64)) != 0)
    }

    /// Marks the pages of host range [start, end) removed; returns how many were not already.
    fn mark_removed(&self, start: usize, end: usize) -> u64 {
        let mut newly = 0;
        for r in &self.regions {
            let (s, e) = (start.max(r.host), end.min(r.host + r.len));
            if s >= e {
                continue;
            }
            let first = r.first_page + (s - r.host) / PAGE;
            let last = r.first_page + (e - r.host).div_ceil(PAGE);
            for page in first..last {
                let bit = 1u64 << (page % 64);
                if let Some(word) = self.removed.get(page / 64) {
                    if word.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
                        newly += 1;
                    }
                }
            }
        }
        newly
    }

    fn wake(&self, host: usize, len: usize) {
        if let Err(e) = self.uffd.wake(host as *mut libc::c_void, len) {
            tracing::debug!(error = %e, "UFFDIO_WAKE failed");
        }
    }

    /// Reads every pending event with the gate held exclusively, so no background copy runs
    /// between the kernel handing over a remove event (after which it zaps the range) and the
    /// removed bits being set. Faults are queued on `pending` for the caller.
    pub fn drain_events(&self, pending: &mut VecDeque<usize>) -> Result<usize, PagerError> {
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let mut read = 0;
        loop {
            match self.uffd.read_event() {
                Ok(Some(Event::Pagefault { addr, .. })) => {
                    self.counters.faults.fetch_add(1, Ordering::Relaxed);
                    self.busy.store(true, Ordering::Release);
                    self.note_fault_activity();
                    pending.push_back(addr as usize);
                }
                Ok(Some(Event::Remove { start, end })) => {
                    let newly = self.mark_removed(start as usize, end as usize);
                    self.counters.removes.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .removed_pages
                        .fetch_add(newly, Ordering::Relaxed);
                    tracing::debug!(start = ?start, end = ?end, newly, "guest memory removed");
                }
                Ok(Some(other)) => tracing::debug!(?other, "userfaultfd event ignored"),
                Ok(None) => return Ok(read),
                Err(e) => return Err(PagerError::Events(e.into())),
            }
            read += 1;
        }
    }

    /// Serves one fault at `addr`: a zero page if the page was removed, else the chunk around
    /// it. `seen` marks chunks already recorded.
    pub fn handle_fault(
        &self,
        addr: usize,
        buf: &mut Vec<u8>,
        pending: &mut VecDeque<usize>,
        seen: &mut [bool],
    ) -> Result<(), Halt> {
        let Some((index, page)) = self.locate(addr) else {
            return Err(Halt::Failed(PagerError::StrayFault { addr }));
        };
        if self.is_removed(page) {
            self.counters
                .zero_page_faults
                .fetch_add(1, Ordering::Relaxed);
            return self.zero_removed_page(addr & !(PAGE - 1), pending);
        }
        // Counted and recorded when claimed, before the copy wakes the faulter, so whoever
        // the fault released already sees its chunk in `recorded`.
        let record = || {
            Counters::add(&self.counters.fault_installs, 1);
            if self.recording.load(Ordering::Acquire) {
                if let Some(seen) = seen.get_mut(index).filter(|s| !**s) {
                    *seen = true;
                    lock(&self.recorded).push((index as u32, Instant::now()));
                }
            }
        };
        if self.hand_over_block(index) {
            return Ok(());
        }
        self.install(index, buf, &mut Role::Faults(pending), record)?;
        self.stream.faulted(index);
        Ok(())
    }

    /// Records the first failure, tells the owner, and releases every faulting thread by
    /// unregistering all guest memory. Later failures are only logged.
    pub fn fail(&self, e: PagerError) {
        let e = Arc::new(e);
        {
            let mut failure = lock(&self.failure);
            if failure.is_some() {
                tracing::debug!(error = %e, "page server already failed");
                return;
            }
            *failure = Some(e.clone());
        }
        self.failed.store(true, Ordering::Release);
        tracing::error!(error = %e, "page server failed; releasing guest memory, whose contents are no longer the snapshot's");
        let hook = lock(&self.on_failure).take();
        if let Some(hook) = hook {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(&e))).is_err() {
                tracing::error!("the page server's on_failure hook panicked");
            }
        }
        for r in &self.regions {
            // Unregistering wakes every thread blocked on a fault in the range; they retry as
            // ordinary anonymous faults.
            if let Err(err) = self.uffd.unregister(r.host as *mut libc::c_void, r.len) {
                tracing::error!(error = %err, host = r.host, "cannot unregister guest memory");
            }
        }
    }
}

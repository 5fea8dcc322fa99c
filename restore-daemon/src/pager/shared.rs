//! The state every server thread shares: where each chunk lives, who has installed it, which
//! pages were discarded, and the installing itself.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use snapshot::{ChunkKind, Snapshot};
use userfaultfd::{Event, Uffd};

use super::{FailureHook, HostRegion, PagerError, PagerStats};

/// The granularity of userfaultfd installs and of the removed record (the format's elision page
/// and the host page are both 4 KiB).
pub(super) const PAGE: usize = 4096;

const MISSING: u8 = 0;
const INSTALLING: u8 = 1;
const INSTALLED: u8 = 2;

/// How long a background installer waits for the fault thread to read a pending remove event
/// before it tries again.
const AGAIN_WAIT: Duration = Duration::from_micros(50);

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
    kind: ChunkKind,
}

#[derive(Default)]
pub(super) struct Counters {
    pub faults: AtomicU64,
    pub data_chunks: AtomicU64,
    pub zero_chunks: AtomicU64,
    pub working_set: AtomicU64,
    pub prefetched: AtomicU64,
    pub lost_races: AtomicU64,
    pub removes: AtomicU64,
    pub removed_pages: AtomicU64,
    pub zero_page_faults: AtomicU64,
    pub retries: AtomicU64,
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

enum Placed {
    Bytes(usize),
    /// The first page of the range is present already.
    Exists,
    /// The kernel is processing a remove event (`mmap_changing`); retry after it is read.
    Again,
}

pub(super) struct Shared {
    snapshot: Arc<Snapshot>,
    uffd: Uffd,
    regions: Vec<Region>,
    chunk_size: usize,
    chunks: Vec<Chunk>,
    state: Vec<AtomicU8>,
    /// One bit per 4 KiB page of guest memory (pages numbered across regions in order): set
    /// once the page was discarded, never cleared. Written only by the fault thread with `gate`
    /// held exclusively; read by background installers with it held shared.
    removed: Vec<AtomicU64>,
    gate: RwLock<()>,
    started: Instant,
    pub stop: AtomicBool,
    failed: AtomicBool,
    /// Nanoseconds after `started` of the fault thread's last fault activity.
    last_fault_ns: AtomicU64,
    /// Whether the fault thread has faults queued or in hand.
    pub busy: AtomicBool,
    pub counters: Counters,
    pub recording: AtomicBool,
    recorded: Mutex<Vec<u32>>,
    failure: Mutex<Option<Arc<PagerError>>>,
    on_failure: Mutex<Option<FailureHook>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub fn new(
        snapshot: Arc<Snapshot>,
        uffd: Uffd,
        host_regions: &[HostRegion],
        record: bool,
        on_failure: Option<FailureHook>,
    ) -> Result<Shared, PagerError> {
        let chunk_size = snapshot.chunk_size() as usize;
        let mut regions = Vec::with_capacity(host_regions.len());
        let mut chunks = Vec::with_capacity(snapshot.chunks().len());
        let mut first_page = 0;
        for r in host_regions {
            let first_chunk = chunks.len();
            // The snapshot cuts each region into chunk_size pieces from its start, the last
            // possibly shorter; `locate` relies on that, so check it against the manifest.
            for (k, info) in snapshot
                .chunks()
                .iter()
                .skip(first_chunk)
                .take(r.len.div_ceil(chunk_size))
                .enumerate()
            {
                let off = k * chunk_size;
                if info.guest_addr != r.guest_addr + off as u64
                    || info.len as usize != chunk_size.min(r.len - off)
                {
                    return Err(PagerError::Layout(format!(
                        "chunk {} at {:#x} is not where its region's layout puts it",
                        first_chunk + k,
                        info.guest_addr
                    )));
                }
                chunks.push(Chunk {
                    host: r.host_addr + off,
                    len: info.len as usize,
                    first_page: first_page + off / PAGE,
                    kind: info.kind,
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
        if chunks.len() != snapshot.chunks().len() {
            return Err(PagerError::Layout(format!(
                "{} chunks in guest memory, {} in the snapshot",
                chunks.len(),
                snapshot.chunks().len()
            )));
        }
        Ok(Shared {
            snapshot,
            uffd,
            regions,
            chunk_size,
            state: chunks.iter().map(|_| AtomicU8::new(MISSING)).collect(),
            chunks,
            removed: (0..first_page.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            gate: RwLock::new(()),
            started: Instant::now(),
            stop: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            last_fault_ns: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            counters: Counters::default(),
            recording: AtomicBool::new(record),
            recorded: Mutex::new(Vec::new()),
            failure: Mutex::new(None),
            on_failure: Mutex::new(on_failure),
        })
    }

    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    pub fn uffd(&self) -> &Uffd {
        &self.uffd
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
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PagerStats {
            faults: get(&c.faults),
            data_chunks: get(&c.data_chunks),
            zero_chunks: get(&c.zero_chunks),
            working_set: get(&c.working_set),
            prefetched: get(&c.prefetched),
            lost_races: get(&c.lost_races),
            removes: get(&c.removes),
            removed_pages: get(&c.removed_pages),
            zero_page_faults: get(&c.zero_page_faults),
            retries: get(&c.retries),
            chunks: self.chunks.len() as u64,
        }
    }

    pub fn complete(&self) -> bool {
        self.state
            .iter()
            .all(|s| s.load(Ordering::Acquire) == INSTALLED)
    }

    pub fn failure(&self) -> Option<Arc<PagerError>> {
        lock(&self.failure).clone()
    }

    pub fn recorded(&self) -> Vec<u32> {
        lock(&self.recorded).clone()
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
                Err(e) => return Err(PagerError::Events(e.to_string())),
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
        // Recorded when claimed, before the copy wakes the faulter, so whoever the fault
        // released already sees its chunk in `recorded`.
        let record = || {
            if self.recording.load(Ordering::Acquire) {
                if let Some(seen) = seen.get_mut(index).filter(|s| !**s) {
                    *seen = true;
                    lock(&self.recorded).push(index as u32);
                }
            }
        };
        self.install(index, buf, &mut Role::Faults(pending), record)?;
        Ok(())
    }

    fn zero_removed_page(&self, host: usize, pending: &mut VecDeque<usize>) -> Result<(), Halt> {
        loop {
            match self.place(host, None, PAGE, true) {
                Ok(Placed::Bytes(_)) => return Ok(()),
                Ok(Placed::Exists) => {
                    self.wake(host, PAGE);
                    return Ok(());
                }
                Ok(Placed::Again) => self.wait_for_events(&mut Role::Faults(&mut *pending))?,
                Err(reason) => {
                    let index = self.locate(host).map_or(0, |(c, _)| c);
                    return Err(Halt::Failed(PagerError::Install { index, reason }));
                }
            }
        }
    }

    /// Installs chunk `index` unless someone else has or is, calling `claimed` once this call
    /// has taken it on; `buf` is scratch.
    pub fn install(
        &self,
        index: usize,
        buf: &mut Vec<u8>,
        role: &mut Role,
        claimed: impl FnOnce(),
    ) -> Result<Outcome, Halt> {
        let (Some(chunk), Some(state)) = (self.chunks.get(index), self.state.get(index)) else {
            return Err(Halt::Failed(PagerError::Layout(format!(
                "chunk {index} is outside guest memory"
            ))));
        };
        if state
            .compare_exchange(MISSING, INSTALLING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Installed: its copy woke the waiters, but a fault may have been queued after
            // that; waking again is harmless. Installing: the installer's copy wakes them.
            if matches!(role, Role::Faults(_)) && state.load(Ordering::Acquire) == INSTALLED {
                self.wake(chunk.host, chunk.len);
            }
            return Ok(Outcome::Skipped);
        }
        claimed();
        let data = match chunk.kind {
            ChunkKind::Zero => None,
            ChunkKind::Data => {
                buf.resize(chunk.len, 0);
                self.snapshot
                    .read_chunk_authenticated(index, buf)
                    .map_err(|source| Halt::Failed(PagerError::Chunk { index, source }))?;
                Some(&buf[..])
            }
        };
        self.write_chunk(index, chunk, data, role)?;
        // Accounted before anyone waiting on the chunk is woken, so a thread its fault
        // released already finds the chunk installed and counted.
        match chunk.kind {
            ChunkKind::Zero => self.counters.zero_chunks.fetch_add(1, Ordering::Relaxed),
            ChunkKind::Data => self.counters.data_chunks.fetch_add(1, Ordering::Relaxed),
        };
        state.store(INSTALLED, Ordering::Release);
        self.wake(chunk.host, chunk.len);
        Ok(Outcome::Installed)
    }

    /// Copies `data` (or zero pages, for `None`) into every page of the chunk that was not
    /// removed, run by run, resuming after partial copies and `EAGAIN`. Nobody is woken yet;
    /// the caller wakes the whole chunk once it is accounted.
    fn write_chunk(
        &self,
        index: usize,
        chunk: &Chunk,
        data: Option<&[u8]>,
        role: &mut Role,
    ) -> Result<(), Halt> {
        let pages = chunk.len / PAGE;
        let mut cursor = 0;
        loop {
            let gate = match role {
                Role::Background => Some(self.read_gate()),
                // The fault thread is the only writer of the removed bits.
                Role::Faults(_) => None,
            };
            let again = loop {
                while cursor < pages && self.is_removed(chunk.first_page + cursor) {
                    cursor += 1;
                }
                if cursor == pages {
                    break false;
                }
                let mut end = cursor + 1;
                while end < pages && !self.is_removed(chunk.first_page + end) {
                    end += 1;
                }
                let host = chunk.host + cursor * PAGE;
                let src = match data {
                    Some(d) => Some(d.get(cursor * PAGE..end * PAGE).ok_or_else(|| {
                        Halt::Failed(PagerError::Install {
                            index,
                            reason: "chunk data shorter than the chunk".into(),
                        })
                    })?),
                    None => None,
                };
                match self.place(host, src, (end - cursor) * PAGE, false) {
                    Ok(Placed::Bytes(n)) if n >= PAGE => cursor += n / PAGE,
                    Ok(Placed::Bytes(_)) | Ok(Placed::Again) => break true,
                    Ok(Placed::Exists) => {
                        self.counters.lost_races.fetch_add(1, Ordering::Relaxed);
                        self.wake(host, PAGE);
                        cursor += 1;
                    }
                    Err(reason) => return Err(Halt::Failed(PagerError::Install { index, reason })),
                }
            };
            drop(gate);
            if !again {
                return Ok(());
            }
            self.wait_for_events(role)?;
        }
    }

    /// After an `EAGAIN`: lets the pending remove event be read, by reading it ourselves on the
    /// fault thread or by stepping aside elsewhere. Gives up when the server stops or fails, so
    /// a retry loop cannot outlive the server.
    fn wait_for_events(&self, role: &mut Role) -> Result<(), Halt> {
        self.counters.retries.fetch_add(1, Ordering::Relaxed);
        if self.halted() {
            return Err(Halt::Stopped);
        }
        match role {
            Role::Faults(pending) => {
                // The kernel raises mmap_changing just before it queues the event.
                if self.drain_events(pending).map_err(Halt::Failed)? == 0 {
                    std::thread::yield_now();
                }
            }
            Role::Background => std::thread::sleep(AGAIN_WAIT),
        }
        Ok(())
    }

    fn read_gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// One `UFFDIO_COPY` of `src` (or `UFFDIO_ZEROPAGE` for `None`) to [host, host + len).
    fn place(
        &self,
        host: usize,
        src: Option<&[u8]>,
        len: usize,
        wake: bool,
    ) -> Result<Placed, String> {
        let dst = host as *mut libc::c_void;
        let result = match src {
            // SAFETY: `src` is a live buffer of `len` bytes, and [host, host + len) is inside a
            // registered region of guest memory (chunk and page ranges come from the region
            // table); UFFDIO_COPY only fills pages that are not present, so nothing of ours is
            // overwritten.
            Some(data) => unsafe { self.uffd.copy(data.as_ptr().cast(), dst, len, wake) },
            // SAFETY: as above; UFFDIO_ZEROPAGE only maps zero pages where none are present.
            None => unsafe { self.uffd.zeropage(dst, len, wake) },
        };
        use userfaultfd::Error as E;
        match result {
            Ok(n) => Ok(Placed::Bytes(n)),
            // The crate reports a copy's EAGAIN as PartiallyCopied with the kernel's count,
            // which is the negated errno when nothing was copied.
            Err(E::PartiallyCopied(n)) if (n as isize) > 0 => Ok(Placed::Bytes(n)),
            Err(E::PartiallyCopied(_)) => Ok(Placed::Again),
            Err(E::CopyFailed(errno) | E::ZeropageFailed(errno)) => match errno as i32 {
                libc::EEXIST => Ok(Placed::Exists),
                // A zeropage's EAGAIN may also follow partial progress; the retry then meets
                // the pages already done as EEXIST and steps over them.
                libc::EAGAIN => Ok(Placed::Again),
                _ => Err(format!("{errno}")),
            },
            Err(other) => Err(other.to_string()),
        }
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

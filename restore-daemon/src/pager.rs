//! The userfaultfd page server: guest memory starts empty and registered with userfaultfd
//! (missing mode); the first touch of any page — by a vCPU through KVM or by the VMM itself —
//! stops the toucher until the server installs the whole snapshot chunk around it, decrypted
//! and decompressed (`UFFDIO_COPY`), or maps zeros for a chunk the snapshot elided
//! (`UFFDIO_ZEROPAGE`). A prefetcher installs every other chunk in the background, so the
//! guest runs while its memory arrives.
//!
//! Each chunk is installed once: a per-chunk state (missing → installing → installed) decides
//! who installs it. Whoever loses that race, or gets `EEXIST` from the kernel, only wakes the
//! range, since the winner's copy wakes the waiters too.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::thread::JoinHandle;

use snapshot::{ChunkKind, Snapshot};
use userfaultfd::{Event, Uffd, UffdBuilder};

const MISSING: u8 = 0;
const INSTALLING: u8 = 1;
const INSTALLED: u8 = 2;

/// How long the fault thread sleeps in `poll` before it looks at the stop flag.
const POLL_MS: i32 = 50;

/// The page server could not start or failed.
#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    /// userfaultfd could not be opened or the memory registered.
    #[error("userfaultfd setup failed: {0}")]
    Setup(String),
    /// A region of guest memory is not what the snapshot describes.
    #[error("guest memory does not match the snapshot: {0}")]
    Layout(String),
    /// A chunk could not be read from the snapshot.
    #[error("chunk {index} could not be read")]
    Chunk {
        /// The chunk.
        index: usize,
        /// Why.
        #[source]
        source: snapshot::ReadError,
    },
    /// Installing a chunk failed.
    #[error("installing chunk {index} failed: {reason}")]
    Install {
        /// The chunk.
        index: usize,
        /// The ioctl's error.
        reason: String,
    },
    /// A fault outside every registered region.
    #[error("page fault at {addr:#x}, outside guest memory")]
    StrayFault {
        /// Host address.
        addr: usize,
    },
    /// A server thread could not start.
    #[error("cannot start the page server's threads")]
    Thread(#[source] std::io::Error),
}

/// Where a region of guest memory lives in this process.
#[derive(Clone, Copy, Debug)]
pub struct HostRegion {
    /// Its guest-physical start.
    pub guest_addr: u64,
    /// Its host address (the mapping's start).
    pub host_addr: usize,
    /// Its length in bytes.
    pub len: usize,
}

/// Counts of what the server did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagerStats {
    /// Page faults received.
    pub faults: u64,
    /// Chunks installed with data.
    pub data_chunks: u64,
    /// Chunks answered with zero pages.
    pub zero_chunks: u64,
    /// Chunks installed by the prefetcher.
    pub prefetched: u64,
    /// Installs the kernel answered with `EEXIST` (lost races).
    pub lost_races: u64,
    /// Chunks in the snapshot.
    pub chunks: u64,
}

/// Why the kernel did not install a range.
enum Refused {
    /// A page in it is already present: someone else installed it.
    Exists,
    /// Anything else.
    Other(String),
}

impl From<userfaultfd::Error> for Refused {
    fn from(e: userfaultfd::Error) -> Self {
        match e {
            userfaultfd::Error::CopyFailed(errno) | userfaultfd::Error::ZeropageFailed(errno)
                if errno as i32 == libc::EEXIST =>
            {
                Refused::Exists
            }
            other => Refused::Other(other.to_string()),
        }
    }
}

struct Shared {
    snapshot: Arc<Snapshot>,
    uffd: Uffd,
    regions: Vec<HostRegion>,
    state: Vec<AtomicU8>,
    stop: AtomicBool,
    faults: AtomicU64,
    data_chunks: AtomicU64,
    zero_chunks: AtomicU64,
    prefetched: AtomicU64,
    lost_races: AtomicU64,
    failure: std::sync::Mutex<Option<PagerError>>,
}

/// A running page server. Dropping it stops its threads; the memory stays registered until it
/// is unmapped (any page not yet installed then faults forever, so drop the VM first).
pub struct PageServer {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Shared {
    /// The host range of chunk `index`.
    fn host_range(&self, index: usize) -> Option<(usize, usize)> {
        let chunk = self.snapshot.chunks().get(index)?;
        let region = self.regions.iter().find(|r| {
            chunk.guest_addr >= r.guest_addr
                && chunk.guest_addr + u64::from(chunk.len) <= r.guest_addr + r.len as u64
        })?;
        let host = region.host_addr + (chunk.guest_addr - region.guest_addr) as usize;
        Some((host, chunk.len as usize))
    }

    /// The chunk holding host address `addr`.
    fn chunk_at(&self, addr: usize) -> Option<usize> {
        let region = self
            .regions
            .iter()
            .find(|r| addr >= r.host_addr && addr < r.host_addr + r.len)?;
        let guest = region.guest_addr + (addr - region.host_addr) as u64;
        let chunks = self.snapshot.chunks();
        let after = chunks.partition_point(|c| c.guest_addr <= guest);
        let index = after.checked_sub(1)?;
        let c = chunks.get(index)?;
        (guest < c.guest_addr + u64::from(c.len)).then_some(index)
    }

    fn wake(&self, host: usize, len: usize) {
        if let Err(e) = self.uffd.wake(host as *mut libc::c_void, len) {
            tracing::debug!(error = %e, "UFFDIO_WAKE failed");
        }
    }

    /// Installs chunk `index` unless someone else has or is; `buf` is scratch.
    fn install(&self, index: usize, buf: &mut Vec<u8>) -> Result<bool, PagerError> {
        let Some((host, len)) = self.host_range(index) else {
            return Err(PagerError::Layout(format!(
                "chunk {index} is outside guest memory"
            )));
        };
        let Some(state) = self.state.get(index) else {
            return Ok(false);
        };
        if state
            .compare_exchange(MISSING, INSTALLING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Installed: its copy woke the waiters, but a fault may have been queued after
            // that; waking again is harmless. Installing: the installer's copy wakes them.
            if state.load(Ordering::Acquire) == INSTALLED {
                self.wake(host, len);
            }
            return Ok(false);
        }
        let kind = self.snapshot.chunks()[index].kind;
        let result = match kind {
            // SAFETY: [host, host + len) is registered guest memory of this process, and
            // UFFDIO_ZEROPAGE only maps zero pages where none are present.
            ChunkKind::Zero => unsafe { self.uffd.zeropage(host as *mut libc::c_void, len, true) }
                .map(|_| ())
                .map_err(Refused::from),
            ChunkKind::Data => {
                buf.resize(len, 0);
                self.snapshot
                    .read_chunk(index, buf)
                    .map_err(|source| PagerError::Chunk { index, source })?;
                self.copy_all(host, buf)
            }
        };
        match result {
            Ok(()) => {}
            Err(Refused::Exists) => {
                self.lost_races.fetch_add(1, Ordering::Relaxed);
                self.wake(host, len);
            }
            Err(Refused::Other(reason)) => {
                return Err(PagerError::Install { index, reason });
            }
        }
        state.store(INSTALLED, Ordering::Release);
        match kind {
            ChunkKind::Zero => self.zero_chunks.fetch_add(1, Ordering::Relaxed),
            ChunkKind::Data => self.data_chunks.fetch_add(1, Ordering::Relaxed),
        };
        Ok(true)
    }

    /// UFFDIO_COPY of `data` to `host`, resuming after a partial copy (`EAGAIN`).
    fn copy_all(&self, host: usize, data: &[u8]) -> Result<(), Refused> {
        let mut done = 0;
        while done < data.len() {
            // SAFETY: `data` is a live buffer of the chunk's length and [host, host + len) is
            // registered guest memory; UFFDIO_COPY only fills pages that are not present.
            let copied = unsafe {
                self.uffd.copy(
                    data[done..].as_ptr().cast(),
                    (host + done) as *mut libc::c_void,
                    data.len() - done,
                    true,
                )
            };
            match copied {
                Ok(n) | Err(userfaultfd::Error::PartiallyCopied(n)) if n > 0 => done += n,
                Ok(_) | Err(userfaultfd::Error::PartiallyCopied(_)) => {
                    return Err(Refused::Other("UFFDIO_COPY made no progress".into()));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn fail(&self, e: PagerError) {
        tracing::error!(error = %e, "page server failed");
        let mut failure = match self.failure.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        failure.get_or_insert(e);
        self.stop.store(true, Ordering::Release);
    }
}

impl PageServer {
    /// Registers `regions` (empty, private anonymous memory laid out as the snapshot's regions)
    /// with userfaultfd and starts serving faults from `snapshot`; with `prefetch`, also installs
    /// every chunk in the background.
    pub fn start(
        snapshot: Arc<Snapshot>,
        regions: Vec<HostRegion>,
        prefetch: bool,
    ) -> Result<PageServer, PagerError> {
        let described: Vec<(u64, u64)> = snapshot
            .regions()
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect();
        let given: Vec<(u64, u64)> = regions
            .iter()
            .map(|r| (r.guest_addr, r.len as u64))
            .collect();
        if described != given {
            return Err(PagerError::Layout(format!(
                "snapshot regions {described:x?}, guest memory {given:x?}"
            )));
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(|e| PagerError::Setup(format!("cannot open userfaultfd: {e}")))?;
        for r in &regions {
            uffd.register(r.host_addr as *mut libc::c_void, r.len)
                .map_err(|e| PagerError::Setup(format!("cannot register guest memory: {e}")))?;
        }
        let chunks = snapshot.chunks().len();
        let shared = Arc::new(Shared {
            snapshot,
            uffd,
            regions,
            state: (0..chunks).map(|_| AtomicU8::new(MISSING)).collect(),
            stop: AtomicBool::new(false),
            faults: AtomicU64::new(0),
            data_chunks: AtomicU64::new(0),
            zero_chunks: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
            lost_races: AtomicU64::new(0),
            failure: std::sync::Mutex::new(None),
        });
        let mut threads = Vec::new();
        let faults = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("uffd-faults".into())
                .spawn(move || serve_faults(&faults))
                .map_err(PagerError::Thread)?,
        );
        if prefetch {
            let pre = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("uffd-prefetch".into())
                    .spawn(move || prefetch_all(&pre))
                    .map_err(PagerError::Thread)?,
            );
        }
        Ok(PageServer { shared, threads })
    }

    /// What the server has done so far.
    pub fn stats(&self) -> PagerStats {
        let s = &self.shared;
        PagerStats {
            faults: s.faults.load(Ordering::Relaxed),
            data_chunks: s.data_chunks.load(Ordering::Relaxed),
            zero_chunks: s.zero_chunks.load(Ordering::Relaxed),
            prefetched: s.prefetched.load(Ordering::Relaxed),
            lost_races: s.lost_races.load(Ordering::Relaxed),
            chunks: s.state.len() as u64,
        }
    }

    /// Whether every chunk has been installed (the final accounting: nothing left to fault).
    pub fn complete(&self) -> bool {
        self.shared
            .state
            .iter()
            .all(|s| s.load(Ordering::Acquire) == INSTALLED)
    }

    /// The error that stopped the server, if one did.
    pub fn failure(&self) -> Option<String> {
        let failure = match self.shared.failure.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        failure.as_ref().map(|e| e.to_string())
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_faults(shared: &Shared) {
    let mut buf = Vec::new();
    let mut pfd = libc::pollfd {
        fd: shared.uffd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !shared.stop.load(Ordering::Acquire) {
        // SAFETY: polls one descriptor owned by `shared`, which outlives this call.
        let ready = unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
        if ready <= 0 {
            continue;
        }
        loop {
            match shared.uffd.read_event() {
                Ok(Some(Event::Pagefault { addr, .. })) => {
                    shared.faults.fetch_add(1, Ordering::Relaxed);
                    let addr = addr as usize;
                    let Some(index) = shared.chunk_at(addr) else {
                        shared.fail(PagerError::StrayFault { addr });
                        return;
                    };
                    if let Err(e) = shared.install(index, &mut buf) {
                        shared.fail(e);
                        return;
                    }
                }
                Ok(Some(other)) => tracing::debug!(?other, "userfaultfd event ignored"),
                Ok(None) => break,
                Err(e) => {
                    shared.fail(PagerError::Setup(format!(
                        "reading userfaultfd events: {e}"
                    )));
                    return;
                }
            }
        }
    }
}

fn prefetch_all(shared: &Shared) {
    let mut buf = Vec::new();
    for index in 0..shared.state.len() {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        match shared.install(index, &mut buf) {
            Ok(true) => {
                shared.prefetched.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(e) => {
                shared.fail(e);
                return;
            }
        }
    }
    tracing::debug!("prefetch complete");
}

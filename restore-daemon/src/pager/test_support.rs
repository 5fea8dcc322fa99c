//! What the pager's unit tests share: guest-memory mappings, a test memory image, a scripted
//! page source over it (counting, failing, panicking or reporting zeros on chosen chunks), and
//! a watchdog so a blocked faulting thread fails the test instead of hanging it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use super::{
    ChunkLayout, Fill, HostRange, MemorySource, PageServer, PageSource, PagerOptions, SourceError,
};

pub const PAGE: usize = 4096;
pub const CHUNK: usize = 64 * 1024;
pub const LEN: usize = 8 << 20;
pub const CHUNKS: usize = LEN / CHUNK;
pub const PAGES_PER_CHUNK: usize = CHUNK / PAGE;

/// A private anonymous mapping, as guest memory is.
pub struct Mapping {
    pub ptr: *mut u8,
    pub len: usize,
}

impl Mapping {
    pub fn new(len: usize) -> Self {
        // SAFETY: a fresh private anonymous mapping, unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Mapping {
            ptr: ptr.cast(),
            len,
        }
    }

    /// This mapping as guest memory at guest address 0.
    pub fn region(&self) -> HostRange {
        self.region_at(0)
    }

    pub fn region_at(&self, guest_addr: u64) -> HostRange {
        HostRange {
            guest_addr,
            host_addr: self.ptr as usize,
            len: self.len,
        }
    }

    /// Discards pages [page, page + pages) as a balloon would.
    pub fn discard(&self, page: usize, pages: usize) {
        assert!((page + pages) * PAGE <= self.len);
        // SAFETY: a page-aligned range inside the mapping; after MADV_DONTNEED it reads as
        // zeros, which is what the tests check.
        let rc = unsafe {
            libc::madvise(
                self.ptr.add(page * PAGE).cast(),
                pages * PAGE,
                libc::MADV_DONTNEED,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }

    /// Reads page `page` (faulting it in if needed) into `out`.
    pub fn read_page(&self, page: usize, out: &mut [u8]) {
        assert!((page + 1) * PAGE <= self.len && out.len() <= PAGE);
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: inside the mapping (checked above); volatile so every read happens.
            *b = unsafe { self.ptr.add(page * PAGE + i).read_volatile() };
        }
    }

    /// Writes `byte` at the start of page `page`.
    pub fn write_byte(&self, page: usize, byte: u8) {
        assert!((page + 1) * PAGE <= self.len);
        // SAFETY: inside the mapping (checked above).
        unsafe { self.ptr.add(page * PAGE).write_volatile(byte) };
    }
}

// SAFETY: the mapping is only accessed through raw volatile reads and writes, from any thread.
unsafe impl Sync for Mapping {}
// SAFETY: as above.
unsafe impl Send for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// `LEN` bytes of memory whose 64 KiB chunks cycle through zeros, text, random bytes and
/// mostly-zero pages.
pub fn memory() -> Vec<u8> {
    let mut m = vec![0u8; LEN];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (i, page) in m.chunks_mut(PAGE).enumerate() {
        match (i / 16) % 4 {
            0 => {}
            1 => page
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = b"thaw pages "[j % 11]),
            2 => page.iter_mut().for_each(|b| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }),
            _ if i % 2 == 0 => page[100] = i as u8,
            _ => {}
        }
    }
    m
}

/// What a [`Scripted`] source does on chunk `index` besides serving it.
/// Called outside the source's lock, so a hook that waits does not hold up other threads'
/// fills.
pub type FillHook = Arc<dyn Fn(usize) + Send + Sync>;

/// A [`MemorySource`] that counts how often each chunk is asked for and misbehaves as told.
pub struct Scripted {
    inner: MemorySource,
    pub fills: Vec<AtomicU32>,
    /// This chunk fails authentication.
    pub unauthentic: Option<usize>,
    /// Asking for this chunk panics.
    pub panics: Option<usize>,
    /// This chunk is reported all zeros.
    pub zeros: Option<usize>,
    /// Called before each chunk is served.
    pub hook: Mutex<Option<FillHook>>,
}

impl Scripted {
    pub fn new(memory: &[u8]) -> Self {
        Self::with_regions(vec![(0, memory.to_vec())])
    }

    pub fn with_regions(regions: Vec<(u64, Vec<u8>)>) -> Self {
        let inner = MemorySource::new(CHUNK, regions).unwrap();
        Scripted {
            fills: (0..inner.layout().chunks().len())
                .map(|_| AtomicU32::new(0))
                .collect(),
            inner,
            unauthentic: None,
            panics: None,
            zeros: None,
            hook: Mutex::new(None),
        }
    }

    /// How often each chunk was asked for.
    pub fn fill_counts(&self) -> Vec<u32> {
        self.fills
            .iter()
            .map(|f| f.load(Ordering::SeqCst))
            .collect()
    }

    /// The chunks the layout elides.
    pub fn zero_chunks(&self) -> Vec<bool> {
        self.inner
            .layout()
            .chunks()
            .iter()
            .map(|c| c.zero)
            .collect()
    }
}

impl PageSource for Scripted {
    fn layout(&self) -> &ChunkLayout {
        self.inner.layout()
    }

    fn fill_chunk(&self, index: usize, buf: &mut [u8]) -> Result<Fill, SourceError> {
        self.fills[index].fetch_add(1, Ordering::SeqCst);
        let hook = self.hook.lock().unwrap().clone();
        if let Some(hook) = hook {
            hook(index);
        }
        if self.panics == Some(index) {
            panic!("scripted panic on chunk {index}");
        }
        if self.unauthentic == Some(index) {
            return Err(SourceError::Unauthentic(
                format!("chunk {index}'s tag does not match").into(),
            ));
        }
        if self.zeros == Some(index) {
            return Ok(Fill::Zero);
        }
        self.inner.fill_chunk(index, buf)
    }
}

pub fn check_all_pages(m: &Mapping, want: &[u8]) {
    let mut page = vec![0u8; PAGE];
    for (i, expected) in want.chunks(PAGE).enumerate() {
        m.read_page(i, &mut page);
        assert_eq!(&page[..], expected, "page {i}");
    }
}

/// Checks the pages of chunk `chunk` against `want`.
pub fn check_chunk(m: &Mapping, chunk: usize, want: &[u8]) {
    let mut page = vec![0u8; PAGE];
    for p in chunk * PAGES_PER_CHUNK..(chunk + 1) * PAGES_PER_CHUNK {
        m.read_page(p, &mut page);
        assert_eq!(&page[..], &want[p * PAGE..(p + 1) * PAGE], "page {p}");
    }
}

/// Runs `test` on its own thread and fails if it takes longer than a minute: a page server bug
/// usually shows as a thread blocked in a fault for ever.
pub fn within_a_minute(test: impl FnOnce() + Send + 'static) {
    let (done, finished) = mpsc::channel();
    let runner = std::thread::spawn(move || {
        test();
        let _ = done.send(());
    });
    match finished.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => runner.join().unwrap(),
        // The test panicked: join to report its message.
        Err(mpsc::RecvTimeoutError::Disconnected) => runner.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test hung (a faulting thread blocked?)"),
    }
}

pub fn options(prefetch: bool) -> PagerOptions {
    PagerOptions {
        prefetch,
        ..PagerOptions::default()
    }
}

/// Starts a server on one mapping from `source`.
pub fn serve(source: &Arc<Scripted>, m: &Mapping, options: PagerOptions) -> PageServer {
    PageServer::start(source.clone(), vec![m.region()], options).unwrap()
}

pub fn wait_complete(server: &PageServer) {
    assert!(
        server.wait_complete(Duration::from_secs(30)),
        "prefetch did not finish: {:?}, failure {:?}",
        server.stats(),
        server.failure()
    );
}

/// Waits until `done` holds of the server's stats.
pub fn wait_for(server: &PageServer, done: impl Fn(&super::PagerStats) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !done(&server.stats()) {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}, failure {:?}",
            server.stats(),
            server.failure()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn touch_chunk(m: &Mapping, chunk: usize) {
    let mut page = vec![0u8; PAGE];
    m.read_page(chunk * PAGES_PER_CHUNK, &mut page);
}

/// Expected contents after discarding `removed` pages: zeros there, the source elsewhere.
pub fn with_removed(want: &[u8], removed: &[(usize, usize)]) -> Vec<u8> {
    let mut out = want.to_vec();
    for &(page, pages) in removed {
        out[page * PAGE..(page + pages) * PAGE].fill(0);
    }
    out
}

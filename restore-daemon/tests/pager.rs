//! The page server on real userfaultfd: memory registered empty comes back byte-exact from an
//! encrypted snapshot, by faults alone, by the prefetcher alone, by both racing and by the
//! working set; the first-fault order is recorded; discarded memory (MADV_DONTNEED) reads as
//! zeros afterwards whether its chunk was installed before, after or during the discard; a
//! chunk that fails to authenticate releases the faulting thread instead of hanging it; and a
//! memory layout that is not the snapshot's is refused. Every test runs under a watchdog so a
//! regression that blocks a faulting thread fails instead of hanging the suite.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use restore_daemon::pager::{HostRegion, PageServer, PagerError, PagerOptions};
use snapshot::{
    Fingerprint, MasterKey, MemoryRegion, Protection, Snapshot, SnapshotMeta, WriteOptions,
};

const PAGE: usize = 4096;
const CHUNK: usize = 64 * 1024;
const LEN: usize = 8 << 20;

/// A private anonymous mapping, as guest memory is.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> Self {
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

    fn region(&self) -> HostRegion {
        HostRegion {
            guest_addr: 0,
            host_addr: self.ptr as usize,
            len: self.len,
        }
    }

    /// Discards pages [page, page + pages) as a balloon would.
    fn discard(&self, page: usize, pages: usize) {
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
    fn read_page(&self, page: usize, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: inside the mapping; volatile so every read really happens.
            *b = unsafe { self.ptr.add(page * PAGE + i).read_volatile() };
        }
    }
}

// SAFETY: the mapping is only read through raw volatile reads, from any thread.
unsafe impl Sync for Mapping {}
// SAFETY: as above.
unsafe impl Send for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Memory with zero chunks, text, random and partly zero chunks.
fn memory() -> Vec<u8> {
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

const PAGES_PER_CHUNK: usize = CHUNK / PAGE;

fn snapshot(dir: &std::path::Path, memory: &[u8]) -> Arc<Snapshot> {
    let key = MasterKey::generate().unwrap();
    let out = dir.join("snap");
    let meta = SnapshotMeta {
        fingerprint: Fingerprint::of_this_host(Vec::new(), "pvm"),
        vcpus: 1,
    };
    snapshot::write(
        &out,
        &meta,
        b"state",
        &[MemoryRegion {
            guest_addr: 0,
            bytes: memory,
        }],
        &Protection::Encrypted(&key),
        &WriteOptions {
            chunk_size: CHUNK as u32,
            ..WriteOptions::default()
        },
    )
    .unwrap();
    Arc::new(Snapshot::open(&out, Some(&key)).unwrap())
}

fn check_all_pages(m: &Mapping, want: &[u8]) {
    let mut page = vec![0u8; PAGE];
    for (i, expected) in want.chunks(PAGE).enumerate() {
        m.read_page(i, &mut page);
        assert_eq!(&page[..], expected, "page {i}");
    }
}

/// Runs `test` on its own thread and fails if it takes longer than a minute: a page server bug
/// usually shows as a thread blocked in a fault for ever.
fn within_a_minute(test: impl FnOnce() + Send + 'static) {
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

fn options(prefetch: bool) -> PagerOptions {
    PagerOptions {
        prefetch,
        ..PagerOptions::default()
    }
}

fn wait_complete(server: &PageServer) {
    assert!(
        server.wait_complete(Duration::from_secs(30)),
        "prefetch did not finish: {:?}, failure {:?}",
        server.stats(),
        server.failure()
    );
}

fn touch_chunk(m: &Mapping, chunk: usize) {
    let mut page = vec![0u8; PAGE];
    m.read_page(chunk * PAGES_PER_CHUNK, &mut page);
}

#[test]
fn faults_alone_bring_every_page_back() {
    within_a_minute(|| {
        let dir = tempfile::tempdir().unwrap();
        let want = memory();
        let snap = snapshot(dir.path(), &want);
        let m = Mapping::new(LEN);
        let server = PageServer::start(snap.clone(), vec![m.region()], options(false)).unwrap();
        check_all_pages(&m, &want);
        let stats = server.stats();
        assert!(server.complete(), "{stats:?}");
        assert_eq!(stats.chunks, (LEN / CHUNK) as u64);
        assert_eq!(stats.data_chunks + stats.zero_chunks, stats.chunks);
        assert!(stats.zero_chunks >= stats.chunks / 4, "{stats:?}");
        // One fault per chunk: the whole chunk is installed at the first touch.
        assert_eq!(stats.faults, stats.chunks, "{stats:?}");
        assert_eq!(stats.prefetched, 0);
        assert_eq!(stats.working_set, 0);
        assert!(server.failure().is_none());
        assert!(server.recorded().is_empty(), "not recording");
    });
}

#[test]
fn the_prefetcher_alone_brings_every_page_back() {
    within_a_minute(|| {
        let dir = tempfile::tempdir().unwrap();
        let want = memory();
        let snap = snapshot(dir.path(), &want);
        let m = Mapping::new(LEN);
        let server = PageServer::start(snap, vec![m.region()], options(true)).unwrap();
        wait_complete(&server);
        let stats = server.stats();
        assert_eq!(stats.faults, 0, "{stats:?}");
        assert_eq!(stats.prefetched, stats.chunks);
        check_all_pages(&m, &want);
        assert_eq!(server.stats().faults, 0, "installed memory faults no more");
    });
}

#[test]
fn faults_racing_the_prefetcher_are_served_once_each() {
    within_a_minute(|| {
        let dir = tempfile::tempdir().unwrap();
        let want = memory();
        let snap = snapshot(dir.path(), &want);
        let m = Arc::new(Mapping::new(LEN));
        let server = PageServer::start(
            snap,
            vec![m.region()],
            PagerOptions {
                working_set: (0..(LEN / CHUNK) as u32).rev().step_by(3).collect(),
                ..options(true)
            },
        )
        .unwrap();
        // Two readers walk memory from both ends while the working set goes back to front and
        // the prefetcher front to back.
        let readers: Vec<_> = [false, true]
            .into_iter()
            .map(|backwards| {
                let m = m.clone();
                let want = want.clone();
                std::thread::spawn(move || {
                    let mut page = vec![0u8; PAGE];
                    let pages = LEN / PAGE;
                    for k in 0..pages {
                        let i = if backwards { pages - 1 - k } else { k };
                        m.read_page(i, &mut page);
                        assert_eq!(&page[..], &want[i * PAGE..(i + 1) * PAGE], "page {i}");
                    }
                })
            })
            .collect();
        for r in readers {
            r.join().unwrap();
        }
        wait_complete(&server);
        let stats = server.stats();
        assert_eq!(
            stats.data_chunks + stats.zero_chunks,
            stats.chunks,
            "{stats:?}"
        );
        assert!(stats.prefetched + stats.working_set <= stats.chunks);
    });
}

#[test]
fn the_working_set_is_installed_at_once_without_prefetch() {
    within_a_minute(|| {
        let dir = tempfile::tempdir().unwrap();
        let want = memory();
        let snap = snapshot(dir.path(), &want);
        let m = Mapping::new(LEN);
        let set = vec![9u32, 3, 77, 3, 120];
        let server = PageServer::start(
            snap,
            vec![m.region()],
            PagerOptions {
                working_set: set.clone(),
                ..options(false)
            },
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while server.stats().working_set < 4 {
            assert!(std::time::Instant::now() < deadline, "{:?}", server.stats());
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut page = vec![0u8; PAGE];
        for &c in &set {
            for p in c as usize * PAGES_PER_CHUNK..(c as usize + 1) * PAGES_PER_CHUNK {
                m.read_page(p, &mut page);
                assert_eq!(&page[..], &want[p * PAGE..(p + 1) * PAGE], "page {p}");
            }
        }
        let stats = server.stats();
        assert_eq!(
            stats.faults, 0,
            "the working set was installed before the touch"
        );
        assert_eq!(
            stats.working_set, 4,
            "duplicates are installed once: {stats:?}"
        );
        assert_eq!(stats.prefetched, 0);
        assert!(
            !server.complete(),
            "nothing but the working set without prefetch"
        );
        // The rest still comes by faults.
        check_all_pages(&m, &want);
        assert!(server.complete());
    });
}

#[test]
fn a_working_set_naming_a_missing_chunk_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let want = memory();
    let snap = snapshot(dir.path(), &want);
    let m = Mapping::new(LEN);
    let opts = PagerOptions {
        working_set: vec![1, 128],
        ..options(false)
    };
    match PageServer::start(snap, vec![m.region()], opts) {
        Err(PagerError::WorkingSet {
            index: 128,
            chunks: 128,
        }) => {}
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a chunk past the end was accepted"),
    }
}

#[test]
fn the_first_fault_order_is_recorded_once_per_chunk() {
    within_a_minute(|| {
        let dir = tempfile::tempdir().unwrap();
        let want = memory();
        let snap = snapshot(dir.path(), &want);
        let m = Mapping::new(LEN);
        let server = PageServer::start(
            snap,
            vec![m.region()],
            PagerOptions {
                record: true,
                working_set: vec![40],
                ..options(false)
            },
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while server.stats().working_set < 1 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        for c in [7, 2, 7, 40, 12, 2] {
            touch_chunk(&m, c);
        }
        // A later page of an installed chunk faults no more and records nothing.
        let mut page = vec![0u8; PAGE];
        m.read_page(7 * PAGES_PER_CHUNK + 5, &mut page);
        assert_eq!(
            server.recorded(),
            vec![7, 2, 12],
            "working-set chunk 40 is not a fault"
        );
        server.stop_recording();
        touch_chunk(&m, 3);
        assert_eq!(server.recorded(), vec![7, 2, 12]);
        assert_eq!(server.stats().faults, 4);
    });
}

/// Expected contents after discarding `removed` pages: zeros there, the snapshot elsewhere.
fn with_removed(want: &[u8], removed: &[(usize, usize)]) -> Vec<u8> {
    let mut out = want.to_vec();
    for &(page, pages) in removed {
        out[page * PAGE..(page + pages) * PAGE].fill(0);
    }
    out
}

#[test]
fn discarded_pages_of_an_installed_chunk_read_as_zeros() {
    within_a_minute(|| {
        let dir = tempfile::tempdir().unwrap();
        let want = memory();
        let snap = snapshot(dir.path(), &want);
        let m = Mapping::new(LEN);
        let server = PageServer::start(snap, vec![m.region()], options(false)).unwrap();
        // Chunk 5 is text, chunk 6 random: install both, then discard across them.
        touch_chunk(&m, 5);
        touch_chunk(&m, 6);
        let first = 5 * PAGES_PER_CHUNK + 10;
        m.discard(first, 9);
        let expect = with_removed(&want, &[(first, 9)]);
        let mut page = vec![0u8; PAGE];
        for p in 5 * PAGES_PER_CHUNK..7 * PAGES_PER_CHUNK {
            m.read_page(p, &mut page);
            assert_eq!(&page[..], &expect[p * PAGE..(p + 1) * PAGE], "page {p}");
        }
        // Discarding again, after the zero pages were written, still yields zeros.
        // SAFETY: inside the mapping, whose page `first` is installed.
        unsafe { m.ptr.add(first * PAGE).write_volatile(0x5a) };
        m.discard(first, 1);
        m.read_page(first, &mut page);
        assert!(page.iter().all(|b| *b == 0));
        let stats = server.stats();
        assert_eq!(stats.removes, 2, "{stats:?}");
        assert_eq!(stats.removed_pages, 9, "{stats:?}");
        assert_eq!(stats.zero_page_faults, 10, "{stats:?}");
        assert!(server.failure().is_none());
    });
}

#[test]
fn discarded_pages_of_a_chunk_not_yet_installed_stay_zero() {
    within_a_minute(|| {
        let dir = tempfile::tempdir().unwrap();
        let want = memory();
        let snap = snapshot(dir.path(), &want);
        let m = Mapping::new(LEN);
        let server = PageServer::start(snap, vec![m.region()], options(false)).unwrap();
        // Chunk 9 (text): discard its first pages and two in the middle, then fault it in from
        // a page that was not discarded; chunk 10 (random): fault it in from a discarded page.
        let removed = [
            (9 * PAGES_PER_CHUNK, 3),
            (9 * PAGES_PER_CHUNK + 7, 2),
            (10 * PAGES_PER_CHUNK + 4, 4),
            // a zero chunk
            (12 * PAGES_PER_CHUNK + 1, 1),
        ];
        for &(p, n) in &removed {
            m.discard(p, n);
        }
        let expect = with_removed(&want, &removed);
        let mut page = vec![0u8; PAGE];
        let mut check = |p: usize| {
            m.read_page(p, &mut page);
            assert_eq!(&page[..], &expect[p * PAGE..(p + 1) * PAGE], "page {p}");
        };
        check(9 * PAGES_PER_CHUNK + 5);
        check(10 * PAGES_PER_CHUNK + 5);
        for p in 8 * PAGES_PER_CHUNK..13 * PAGES_PER_CHUNK {
            check(p);
        }
        let stats = server.stats();
        assert_eq!(stats.removed_pages, 10, "{stats:?}");
        assert!(server.failure().is_none());
        // Everything else is untouched by the discards.
        check_all_pages(&m, &expect);
        assert!(server.complete());
    });
}

#[test]
fn discards_while_the_prefetcher_runs_read_as_zeros() {
    within_a_minute(|| {
        let dir = tempfile::tempdir().unwrap();
        let want = memory();
        let snap = snapshot(dir.path(), &want);
        let m = Arc::new(Mapping::new(LEN));
        let chunks = (LEN / CHUNK) as u32;
        let server = PageServer::start(
            snap,
            vec![m.region()],
            PagerOptions {
                working_set: (0..chunks).rev().collect(),
                ..options(true)
            },
        )
        .unwrap();
        // Discard a run in every third chunk, straddling chunk boundaries, while the working
        // set installs everything from the back and a reader faults from the front.
        let removed: Vec<(usize, usize)> = (0..chunks as usize)
            .step_by(3)
            .map(|c| (c * PAGES_PER_CHUNK + (c % PAGES_PER_CHUNK), 5 + c % 13))
            .filter(|(p, n)| (p + n) * PAGE <= LEN)
            .collect();
        let reader = {
            let m = m.clone();
            std::thread::spawn(move || {
                let mut page = vec![0u8; PAGE];
                for p in (0..LEN / PAGE).step_by(7) {
                    m.read_page(p, &mut page);
                }
            })
        };
        for &(p, n) in &removed {
            m.discard(p, n);
        }
        reader.join().unwrap();
        wait_complete(&server);
        check_all_pages(&m, &with_removed(&want, &removed));
        let stats = server.stats();
        assert_eq!(stats.removes, removed.len() as u64, "{stats:?}");
        assert!(server.failure().is_none());
    });
}

#[test]
fn a_chunk_corrupted_after_open_fails_the_server_without_hanging_the_guest() {
    within_a_minute(|| {
        let dir = tempfile::tempdir().unwrap();
        let want = memory();
        let snap = snapshot(dir.path(), &want);
        // Chunk 6 is random data; damage it in place, after `open` verified the file.
        let (_, range) = snap
            .layout()
            .data_chunks
            .into_iter()
            .find(|(i, _)| *i == 6)
            .unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.path().join("snap").join(snapshot::SNAPSHOT_FILE))
            .unwrap();
        let at = range.start + (range.end - range.start) / 2;
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 0x40], at).unwrap();

        let m = Arc::new(Mapping::new(LEN));
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(String::new()));
        let hook = {
            let (calls, seen) = (calls.clone(), seen.clone());
            Box::new(move |e: &PagerError| {
                calls.fetch_add(1, Ordering::SeqCst);
                assert!(matches!(e, PagerError::Chunk { index: 6, .. }), "{e}");
                *seen.lock().unwrap() = e.to_string();
            })
        };
        let server = PageServer::start(
            snap,
            vec![m.region()],
            PagerOptions {
                on_failure: Some(hook),
                ..options(false)
            },
        )
        .unwrap();
        touch_chunk(&m, 5);
        let (tx, rx) = mpsc::channel();
        {
            let m = m.clone();
            std::thread::spawn(move || {
                let mut page = vec![0u8; PAGE];
                m.read_page(6 * PAGES_PER_CHUNK + 1, &mut page);
                let _ = tx.send(page);
            });
        }
        let page = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a thread faulting on the damaged chunk was left blocked");
        assert!(page.iter().all(|b| *b == 0), "released as anonymous memory");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(seen.lock().unwrap().contains("chunk 6"));
        let failure = server.failure().expect("failure recorded");
        match &*failure {
            PagerError::Chunk {
                index: 6,
                source: snapshot::ReadError::ChunkTampered { index: 6 },
            } => {}
            other => panic!("wrong failure: {other:?}"),
        }
        // Installed memory keeps its contents; the rest is plain anonymous memory now and
        // faults no longer reach the dead server.
        let mut page = vec![0u8; PAGE];
        m.read_page(5 * PAGES_PER_CHUNK + 3, &mut page);
        let p = 5 * PAGES_PER_CHUNK + 3;
        assert_eq!(&page[..], &want[p * PAGE..(p + 1) * PAGE]);
        touch_chunk(&m, 100);
        m.discard(50 * PAGES_PER_CHUNK, 3);
        assert!(!server.wait_complete(Duration::from_millis(10)));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "on_failure is called once");
    });
}

#[test]
fn memory_laid_out_otherwise_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let want = memory();
    let snap = snapshot(dir.path(), &want);
    let m = Mapping::new(LEN / 2);
    match PageServer::start(snap, vec![m.region()], options(false)) {
        Err(PagerError::Layout(reason)) => assert!(reason.contains("snapshot regions")),
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a half-size memory was accepted"),
    }
}

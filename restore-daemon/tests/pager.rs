//! The page server end to end from a sealed, encrypted snapshot file on real userfaultfd:
//! the snapshot source lays memory out as the snapshot does and hands over exactly what
//! `read_chunk` decodes; memory registered empty comes back byte-exact with faults racing the
//! working set and the prefetcher, and the final accounting holds; a chunk damaged after the
//! snapshot was opened fails authentication, which releases the faulting thread instead of
//! hanging it; and a memory layout that is not the snapshot's is refused. The pager's
//! mechanics (discards, recording, ordering, failures) are unit-tested in `src/pager/` from an
//! in-memory source. Every test runs under a watchdog so a regression that blocks a faulting
//! thread fails instead of hanging the suite.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use restore_daemon::pager::{
    Fill, HostRange, LayoutError, PageServer, PageSource, PagerError, PagerOptions, SnapshotSource,
    SourceError,
};
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

    fn region(&self) -> HostRange {
        HostRange {
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

/// The page source over a sealed snapshot.
fn source(snap: &Arc<Snapshot>) -> Arc<SnapshotSource> {
    Arc::new(SnapshotSource::new(snap.clone()).unwrap())
}

#[test]
fn the_snapshot_source_serves_the_snapshot_as_read_chunk_decodes_it() {
    let dir = tempfile::tempdir().unwrap();
    let want = memory();
    let snap = snapshot(dir.path(), &want);
    let src = source(&snap);
    let layout = src.layout();
    assert_eq!(layout.chunk_size(), CHUNK);
    assert_eq!(layout.chunks().len(), snap.chunks().len());
    let mut got = vec![0u8; CHUNK];
    let mut read = vec![0u8; CHUNK];
    for (index, (c, info)) in layout.chunks().iter().zip(snap.chunks()).enumerate() {
        assert_eq!((c.guest_addr, c.len), (info.guest_addr, info.len as usize));
        assert_eq!(
            c.zero,
            info.kind == snapshot::ChunkKind::Zero,
            "chunk {index}"
        );
        let fill = src.fill_chunk(index, &mut got).unwrap();
        assert_eq!(fill, if c.zero { Fill::Zero } else { Fill::Data });
        snap.read_chunk(index, &mut read).unwrap();
        if fill == Fill::Data {
            assert_eq!(got, read, "chunk {index}");
        } else {
            assert!(read.iter().all(|b| *b == 0), "chunk {index}");
        }
    }
}

#[test]
fn a_sealed_snapshot_comes_back_byte_exact_with_faults_racing_the_prefetcher() {
    within_a_minute(|| {
        let dir = tempfile::tempdir().unwrap();
        let want = memory();
        let snap = snapshot(dir.path(), &want);
        let m = Arc::new(Mapping::new(LEN));
        let server = PageServer::start(
            source(&snap),
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
        let stats = server.check_complete().unwrap();
        assert_eq!(stats.chunks, (LEN / CHUNK) as u64);
        assert_eq!(stats.data_chunks + stats.zero_chunks, stats.chunks);
        assert!(stats.zero_chunks >= stats.chunks / 4, "{stats:?}");
        assert_eq!(stats.installed_pages, (LEN / PAGE) as u64, "{stats:?}");
        assert!(server.failure().is_none());
        check_all_pages(&m, &want);
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
            .unwrap()
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
                *seen.lock().unwrap() = e.full_message();
            })
        };
        let server = PageServer::start(
            source(&snap),
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
        let message = seen.lock().unwrap().clone();
        assert!(
            message.contains("chunk 6") && message.contains("failed authentication"),
            "{message}"
        );
        let failure = server.failure().expect("failure recorded");
        match &*failure {
            PagerError::Chunk {
                index: 6,
                source: SourceError::Unauthentic(cause),
            } => assert!(
                matches!(
                    cause.downcast_ref::<snapshot::ReadError>(),
                    Some(snapshot::ReadError::ChunkTampered { index: 6 })
                ),
                "{cause:?}"
            ),
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
fn memory_laid_out_otherwise_than_the_snapshot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let want = memory();
    let snap = snapshot(dir.path(), &want);
    let m = Mapping::new(LEN / 2);
    match PageServer::start(source(&snap), vec![m.region()], options(false)) {
        Err(PagerError::Layout(LayoutError::Regions { described, given })) => {
            assert_eq!(described, vec![(0, LEN as u64)]);
            assert_eq!(given, vec![(0, LEN as u64 / 2)]);
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a half-size memory was accepted"),
    }
}

//! The page server on real userfaultfd: memory registered empty comes back byte-exact from an
//! encrypted snapshot, by faults alone, by the prefetcher alone, and by both racing; and a
//! memory layout that is not the snapshot's is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use restore_daemon::pager::{HostRegion, PageServer, PagerError};
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

fn wait_complete(server: &PageServer) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.complete() {
        assert!(server.failure().is_none(), "{:?}", server.failure());
        assert!(
            Instant::now() < deadline,
            "prefetch did not finish: {:?}",
            server.stats()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn faults_alone_bring_every_page_back() {
    let dir = tempfile::tempdir().unwrap();
    let want = memory();
    let snap = snapshot(dir.path(), &want);
    let m = Mapping::new(LEN);
    let server = PageServer::start(snap.clone(), vec![m.region()], false).unwrap();
    check_all_pages(&m, &want);
    let stats = server.stats();
    assert!(server.complete(), "{stats:?}");
    assert_eq!(stats.chunks, (LEN / CHUNK) as u64);
    assert_eq!(stats.data_chunks + stats.zero_chunks, stats.chunks);
    assert!(stats.zero_chunks >= stats.chunks / 4, "{stats:?}");
    // One fault per chunk: the whole chunk is installed at the first touch.
    assert_eq!(stats.faults, stats.chunks, "{stats:?}");
    assert_eq!(stats.prefetched, 0);
    assert_eq!(server.failure(), None);
}

#[test]
fn the_prefetcher_alone_brings_every_page_back() {
    let dir = tempfile::tempdir().unwrap();
    let want = memory();
    let snap = snapshot(dir.path(), &want);
    let m = Mapping::new(LEN);
    let server = PageServer::start(snap, vec![m.region()], true).unwrap();
    wait_complete(&server);
    let stats = server.stats();
    assert_eq!(stats.faults, 0, "{stats:?}");
    assert_eq!(stats.prefetched, stats.chunks);
    check_all_pages(&m, &want);
    assert_eq!(server.stats().faults, 0, "installed memory faults no more");
}

#[test]
fn faults_racing_the_prefetcher_are_served_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let want = memory();
    let snap = snapshot(dir.path(), &want);
    let m = Arc::new(Mapping::new(LEN));
    let server = PageServer::start(snap, vec![m.region()], true).unwrap();
    // Two readers walk memory from both ends while the prefetcher goes front to back.
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
    assert!(stats.prefetched <= stats.chunks);
}

#[test]
fn memory_laid_out_otherwise_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let want = memory();
    let snap = snapshot(dir.path(), &want);
    let m = Mapping::new(LEN / 2);
    match PageServer::start(snap, vec![m.region()], false) {
        Err(PagerError::Layout(reason)) => assert!(reason.contains("snapshot regions")),
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a half-size memory was accepted"),
    }
}

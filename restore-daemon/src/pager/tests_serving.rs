//! The page server's mechanics on real userfaultfd, from an in-memory source: memory comes
//! back byte-exact by faults alone, by the prefetcher alone, by both racing, by the working set,
//! by the startup set and by `install_all`; each chunk is asked of the source once; the first-fault order is
//! recorded; several regions are served; zeros reported by the source become zero pages; and
//! memory laid out otherwise than the source is refused.

use std::sync::Arc;

use super::test_support::*;
use super::{LayoutError, PageServer, PagerError, PagerOptions};

/// Every data chunk was asked of the source exactly once, and no elided chunk was.
fn each_data_chunk_filled_once(source: &Scripted) {
    for (index, (fills, zero)) in source
        .fill_counts()
        .into_iter()
        .zip(source.zero_chunks())
        .enumerate()
    {
        assert_eq!(fills, u32::from(!zero), "chunk {index} (zero: {zero})");
    }
}

#[test]
fn faults_alone_bring_every_page_back() {
    within_a_minute(|| {
        let want = memory();
        let source = Arc::new(Scripted::new(&want));
        let m = Mapping::new(LEN);
        let server = serve(&source, &m, options(false));
        check_all_pages(&m, &want);
        let stats = server.check_complete().unwrap();
        assert_eq!(stats.chunks, CHUNKS as u64);
        assert!(stats.zero_chunks >= stats.chunks / 4, "{stats:?}");
        // One fault per chunk: the whole chunk is installed at the first touch.
        assert_eq!(stats.faults, stats.chunks, "{stats:?}");
        assert_eq!(stats.huge_blocks, 0, "faults install chunks, not blocks");
        assert_eq!(stats.fault_installs, stats.chunks, "{stats:?}");
        assert_eq!((stats.prefetched, stats.working_set), (0, 0));
        assert_eq!(stats.installed_pages, (LEN / PAGE) as u64);
        assert!(server.failure().is_none());
        assert!(server.recorded().is_empty(), "not recording");
        each_data_chunk_filled_once(&source);
    });
}

#[test]
fn the_prefetcher_alone_brings_every_page_back() {
    within_a_minute(|| {
        let want = memory();
        let source = Arc::new(Scripted::new(&want));
        let m = Mapping::new(LEN);
        let server = serve(&source, &m, options(true));
        wait_complete(&server);
        let stats = server.check_complete().unwrap();
        assert_eq!(stats.faults, 0, "{stats:?}");
        assert_eq!(stats.prefetched, stats.chunks);
        check_all_pages(&m, &want);
        assert_eq!(server.stats().faults, 0, "installed memory faults no more");
        each_data_chunk_filled_once(&source);
    });
}

/// Whether this kernel moves pages between mappings (`UFFDIO_MOVE`, Linux 6.8).
fn kernel_moves_pages() -> bool {
    userfaultfd::UffdBuilder::new()
        .require_features(userfaultfd::FeatureFlags::from_bits_retain(
            super::shared::FEATURE_MOVE,
        ))
        .create()
        .is_ok()
}

/// Every 2 MiB block of `m` was moved in whole where this kernel moves pages and `m` is
/// block-aligned (the test memory is three quarters data: every block qualifies); none was on
/// a kernel without `UFFDIO_MOVE`.
fn every_block_went_whole_where_it_can(m: &Mapping, stats: &super::PagerStats) {
    let aligned = (m.ptr as usize) % (2 << 20) == 0;
    if !kernel_moves_pages() {
        assert_eq!(stats.huge_blocks, 0, "{stats:?}");
    } else if aligned {
        assert_eq!(stats.huge_blocks, (LEN / (2 << 20)) as u64, "{stats:?}");
    }
}

#[test]
fn a_dense_working_set_moves_whole_blocks_as_huge_pages_where_it_can() {
    within_a_minute(|| {
        let want = memory();
        let source = Arc::new(Scripted::new(&want));
        let m = Mapping::new(LEN);
        let server = serve(
            &source,
            &m,
            PagerOptions {
                working_set: (0..CHUNKS as u32).collect(),
                ..options(false)
            },
        );
        wait_complete(&server);
        let stats = server.check_complete().unwrap();
        check_all_pages(&m, &want);
        each_data_chunk_filled_once(&source);
        assert_eq!(stats.working_set, stats.chunks, "{stats:?}");
        assert_eq!(stats.installed_pages, (LEN / PAGE) as u64, "{stats:?}");
        every_block_went_whole_where_it_can(&m, &stats);
    });
}

#[test]
fn a_reader_ahead_of_the_installers_still_gets_whole_blocks() {
    within_a_minute(|| {
        let want = memory();
        let source = Arc::new(Scripted::new(&want));
        // Slow installs: the reader below overtakes the installers at once.
        *source.hook.lock().unwrap() = Some(Arc::new(|_| {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }));
        let m = Mapping::new(LEN);
        let server = serve(
            &source,
            &m,
            PagerOptions {
                working_set: (0..CHUNKS as u32).collect(),
                ..options(false)
            },
        );
        // From the far end: every fault lands in a block no installer has reached.
        let mut page = vec![0u8; PAGE];
        for i in (0..LEN / PAGE).rev() {
            m.read_page(i, &mut page);
            assert_eq!(&page[..], &want[i * PAGE..(i + 1) * PAGE], "page {i}");
        }
        wait_complete(&server);
        let stats = server.check_complete().unwrap();
        check_all_pages(&m, &want);
        each_data_chunk_filled_once(&source);
        assert_eq!(
            stats.fault_installs, 0,
            "faults handed their blocks over: {stats:?}"
        );
        every_block_went_whole_where_it_can(&m, &stats);
    });
}

#[test]
fn a_large_working_set_is_installed_by_two_threads_in_its_order() {
    within_a_minute(|| {
        let want = memory();
        let source = Arc::new(Scripted::new(&want));
        let two_cpus = vmm_core::config::host_cpus() > 1;
        let fillers = Arc::new((std::sync::Mutex::new(Vec::new()), std::sync::Condvar::new()));
        *source.hook.lock().unwrap() = Some({
            let fillers = fillers.clone();
            Arc::new(move |index| {
                let name = std::thread::current().name().unwrap_or("").to_owned();
                let (list, changed) = &*fillers;
                let mut list = list.lock().unwrap();
                list.push((index, name));
                changed.notify_all();
                // The first chunk waits until another thread asks for one: on a test this
                // small, the first installer could otherwise take the whole set alone.
                if two_cpus {
                    let _ = changed
                        .wait_timeout_while(list, std::time::Duration::from_secs(10), |l| {
                            l.iter().all(|(_, n)| *n == l[0].1)
                        })
                        .unwrap();
                }
            })
        });
        let m = Mapping::new(LEN);
        // Back to front, chunk by chunk (every third chunk: no block is dense enough to go
        // whole, so each chunk is one claim).
        let set: Vec<u32> = (0..CHUNKS as u32).rev().step_by(3).collect();
        let server = serve(
            &source,
            &m,
            PagerOptions {
                working_set: set.clone(),
                ..options(false)
            },
        );
        wait_for(&server, |s| s.working_set >= set.len() as u64);
        for &c in &set {
            check_chunk(&m, c as usize, &want);
        }
        let fillers = fillers.0.lock().unwrap().clone();
        let threads: std::collections::BTreeSet<&str> =
            fillers.iter().map(|(_, name)| name.as_str()).collect();
        if two_cpus {
            assert_eq!(
                threads,
                ["uffd-prefetch", "uffd-working-set"].into_iter().collect(),
                "{fillers:?}"
            );
        }
        // Each takes the next chunk of the one order: neither runs far ahead of the other.
        // (The source is asked only for chunks that hold data.)
        let zero = source.zero_chunks();
        let data: Vec<u32> = set.iter().copied().filter(|&c| !zero[c as usize]).collect();
        let position = |index: usize| data.iter().position(|&c| c as usize == index).unwrap();
        for (asked, (index, _)) in fillers.iter().enumerate() {
            let at = position(*index);
            assert!(
                at.abs_diff(asked) <= 4,
                "chunk {index} asked {asked}th, {at}th in the set"
            );
        }
        check_all_pages(&m, &want);
        server.check_complete().unwrap();
        each_data_chunk_filled_once(&source);
    });
}

#[test]
fn the_full_prefetch_installs_chunk_by_chunk_from_the_top_of_memory_down() {
    within_a_minute(|| {
        let want = memory();
        let source = Arc::new(Scripted::new(&want));
        // The policy of each thread that asked for a chunk: the full prefetch is idle-time
        // work and must not compete with the guest for a CPU.
        let policies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        *source.hook.lock().unwrap() = Some({
            let (policies, order) = (policies.clone(), order.clone());
            Arc::new(move |index| {
                // SAFETY: asks about the calling thread; no memory is passed.
                let policy = unsafe { libc::sched_getscheduler(0) };
                policies.lock().unwrap().push(policy);
                order.lock().unwrap().push(index);
            })
        });
        let m = Mapping::new(LEN);
        let server = serve(&source, &m, options(true));
        wait_complete(&server);
        let stats = server.check_complete().unwrap();
        check_all_pages(&m, &want);
        assert_eq!(stats.huge_blocks, 0, "{stats:?}");
        // Guests read upwards: a pass going up could run ahead of such a read and keep it on
        // 4 KiB pages (serve.rs, `fill_in_background`).
        let order = order.lock().unwrap();
        assert!(order.len() > 1, "{order:?}");
        assert!(order.windows(2).all(|w| w[0] > w[1]), "{order:?}");
        let policies = policies.lock().unwrap();
        assert!(!policies.is_empty());
        assert!(
            policies.iter().all(|&p| p == libc::SCHED_IDLE),
            "{policies:?}"
        );
    });
}

/// A guest reading in order is followed: the prefetch (and the follower, with a second CPU)
/// starts at once, from just ahead of the guest's latest fault, not from the bottom of memory
/// after the burst.
#[test]
fn the_prefetch_follows_a_guest_reading_in_order() {
    within_a_minute(|| {
        let want = memory();
        let source = Arc::new(Scripted::new(&want));
        let prefetched = Arc::new(std::sync::Mutex::new(Vec::new()));
        *source.hook.lock().unwrap() = Some({
            let prefetched = prefetched.clone();
            Arc::new(move |index| {
                let name = std::thread::current().name().unwrap_or("").to_owned();
                if name == "uffd-prefetch" || name == "uffd-stream" {
                    // SAFETY: asks about the calling thread; no memory is passed.
                    let policy = unsafe { libc::sched_getscheduler(0) };
                    prefetched.lock().unwrap().push((index, policy));
                }
            })
        });
        let m = Mapping::new(LEN);
        let server = serve(&source, &m, options(true));
        let first = 40;
        for chunk in first..first + 2 * super::shared::RUN {
            touch_chunk(&m, chunk);
        }
        wait_complete(&server);
        check_all_pages(&m, &want);
        server.check_complete().unwrap();
        each_data_chunk_filled_once(&source);
        let prefetched = prefetched.lock().unwrap();
        let after_run = first + super::shared::RUN;
        assert!(
            prefetched.first().is_some_and(|&(i, _)| i >= after_run),
            "the prefetch began at {:?}, not after the run at {after_run}",
            prefetched.first()
        );
        // The guest waits for what follows it: installed at normal priority, not idle.
        assert_eq!(prefetched.first().map(|&(_, p)| p), Some(libc::SCHED_OTHER));
    });
}

#[test]
fn faults_racing_the_prefetcher_are_served_once_each() {
    within_a_minute(|| {
        let want = memory();
        let source = Arc::new(Scripted::new(&want));
        let m = Arc::new(Mapping::new(LEN));
        let server = serve(
            &source,
            &m,
            PagerOptions {
                working_set: (0..CHUNKS as u32).rev().step_by(3).collect(),
                ..options(true)
            },
        );
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
        assert_eq!(
            stats.fault_installs + stats.working_set + stats.prefetched,
            stats.chunks,
            "{stats:?}"
        );
        each_data_chunk_filled_once(&source);
    });
}

#[test]
fn the_working_set_is_installed_at_once_and_in_order_without_prefetch() {
    within_a_minute(|| {
        let want = memory();
        let source = Arc::new(Scripted::new(&want));
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        *source.hook.lock().unwrap() = Some({
            let order = order.clone();
            Arc::new(move |index| order.lock().unwrap().push(index))
        });
        let m = Mapping::new(LEN);
        // Chunks 9, 77 and 121 hold text or random bytes; 3 mostly zeros; 120 is elided.
        let set = vec![9u32, 3, 77, 3, 120, 121];
        let server = serve(
            &source,
            &m,
            PagerOptions {
                working_set: set.clone(),
                ..options(false)
            },
        );
        wait_for(&server, |s| s.working_set >= 5);
        assert_eq!(
            *order.lock().unwrap(),
            vec![9, 3, 77, 121],
            "the source is asked in working-set order (elided chunk 120 not at all)"
        );
        for &c in &set {
            check_chunk(&m, c as usize, &want);
        }
        let stats = server.stats();
        assert_eq!(stats.faults, 0, "installed before the touch: {stats:?}");
        assert_eq!(
            stats.working_set, 5,
            "duplicates are installed once: {stats:?}"
        );
        assert_eq!(stats.prefetched, 0);
        assert!(!server.complete(), "only the working set without prefetch");
        // The rest still comes by faults.
        check_all_pages(&m, &want);
        server.check_complete().unwrap();
    });
}

#[test]
fn a_working_set_naming_a_missing_chunk_is_refused() {
    let source = Arc::new(Scripted::new(&memory()));
    let m = Mapping::new(LEN);
    let opts = PagerOptions {
        working_set: vec![1, CHUNKS as u32],
        ..options(false)
    };
    match PageServer::start(source, vec![m.region()], opts) {
        Err(PagerError::WorkingSet { index, chunks }) => {
            assert_eq!((index as usize, chunks), (CHUNKS, CHUNKS));
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a chunk past the end was accepted"),
    }
}

#[test]
fn the_first_fault_order_is_recorded_once_per_chunk() {
    within_a_minute(|| {
        let want = memory();
        let source = Arc::new(Scripted::new(&want));
        let m = Mapping::new(LEN);
        let server = serve(
            &source,
            &m,
            PagerOptions {
                record: true,
                working_set: vec![40],
                ..options(false)
            },
        );
        wait_for(&server, |s| s.working_set >= 1);
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
        let stats = server.stats();
        assert_eq!((stats.faults, stats.fault_installs), (4, 4), "{stats:?}");
    });
}

#[test]
fn memory_in_several_regions_is_served_region_by_region() {
    within_a_minute(|| {
        let want = memory();
        // Two regions with a hole between them, the second not a whole number of chunks.
        let (low, high) = want.split_at(LEN / 2 + 3 * PAGE);
        let source = Arc::new(Scripted::with_regions(vec![
            (0, low.to_vec()),
            (1 << 32, high.to_vec()),
        ]));
        let (a, b) = (Mapping::new(low.len()), Mapping::new(high.len()));
        let server = PageServer::start(
            source.clone(),
            vec![a.region_at(0), b.region_at(1 << 32)],
            PagerOptions {
                working_set: vec![CHUNKS as u32 / 2],
                ..options(true)
            },
        )
        .unwrap();
        check_all_pages(&b, high);
        check_all_pages(&a, low);
        wait_complete(&server);
        let stats = server.check_complete().unwrap();
        assert_eq!(
            stats.chunks,
            CHUNKS as u64 + 1,
            "a short chunk ends each region"
        );
        assert_eq!(stats.pages, (LEN / PAGE) as u64);
        each_data_chunk_filled_once(&source);
    });
}

#[test]
fn a_chunk_the_source_reports_as_zeros_is_installed_as_zero_pages() {
    within_a_minute(|| {
        let want = memory();
        let mut scripted = Scripted::new(&want);
        // Chunk 6 holds random bytes, but the source says it is all zeros.
        scripted.zeros = Some(6);
        let source = Arc::new(scripted);
        let m = Mapping::new(LEN);
        let server = serve(&source, &m, options(false));
        let mut expect = want.clone();
        expect[6 * CHUNK..7 * CHUNK].fill(0);
        check_all_pages(&m, &expect);
        let stats = server.check_complete().unwrap();
        let elided = source.zero_chunks().iter().filter(|z| **z).count() as u64;
        assert_eq!(stats.zero_chunks, elided + 1, "{stats:?}");
    });
}

#[test]
fn install_all_installs_every_chunk_and_accounts_for_it() {
    within_a_minute(|| {
        let want = memory();
        let source = Arc::new(Scripted::new(&want));
        let m = Mapping::new(LEN);
        let server = serve(&source, &m, options(false));
        touch_chunk(&m, 5);
        server.install_all().unwrap();
        assert!(server.complete());
        let stats = server.check_complete().unwrap();
        assert_eq!(
            (stats.fault_installs, stats.prefetched),
            (1, stats.chunks - 1)
        );
        check_all_pages(&m, &want);
        assert_eq!(server.stats().faults, 1, "nothing was left to fault");
    });
}

#[test]
fn memory_laid_out_otherwise_is_refused() {
    let source = Arc::new(Scripted::new(&memory()));
    let m = Mapping::new(LEN / 2);
    match PageServer::start(source, vec![m.region_at(0x1000)], options(false)) {
        Err(PagerError::Layout(LayoutError::Regions { described, given })) => {
            assert_eq!(described, vec![(0, LEN as u64)]);
            assert_eq!(given, vec![(0x1000, LEN as u64 / 2)]);
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a half-size memory was accepted"),
    }
}

#[test]
fn the_startup_set_is_in_place_before_the_guest_asks_and_counted_apart() {
    within_a_minute(|| {
        let want = memory();
        let source = Arc::new(Scripted::new(&want));
        let m = Mapping::new(LEN);
        let startup = vec![9, 3, 30];
        let server = serve(
            &source,
            &m,
            PagerOptions {
                record: true,
                startup: startup.clone(),
                ..options(false)
            },
        );
        wait_for(&server, |s| s.startup == 3);
        for &c in &startup {
            check_chunk(&m, c as usize, &want);
        }
        let stats = server.stats();
        assert_eq!(
            stats.faults, 0,
            "installed before anything faulted: {stats:?}"
        );
        // What the guest still faults on is what a restore learns from; the set is not.
        touch_chunk(&m, 5);
        let before = std::time::Instant::now();
        touch_chunk(&m, 6);
        assert_eq!(server.recorded(), vec![5, 6]);
        assert_eq!(server.recorded_before(before), vec![5]);
        check_all_pages(&m, &want);
        let stats = server.check_complete().unwrap();
        assert_eq!(stats.startup, 3, "{stats:?}");
        assert_eq!(stats.fault_installs, stats.chunks - 3, "{stats:?}");
        each_data_chunk_filled_once(&source);
    });
}

#[test]
fn a_startup_set_naming_a_missing_chunk_is_refused() {
    let source = Arc::new(Scripted::new(&memory()));
    let m = Mapping::new(LEN);
    let opts = PagerOptions {
        startup: vec![CHUNKS as u32 + 4],
        ..options(false)
    };
    match PageServer::start(source, vec![m.region()], opts) {
        Err(PagerError::StartupSet { index, chunks }) => {
            assert_eq!((index as usize, chunks), (CHUNKS + 4, CHUNKS));
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a chunk past the end was accepted"),
    }
}

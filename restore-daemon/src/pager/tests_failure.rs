//! Failures: a chunk the source cannot authenticate, or a source that panics, fails the server
//! without hanging the faulting thread, and `on_failure` runs once; kernel refusals carry
//! their errno; and the final accounting turns a chunk left uninstalled after a full pass into
//! a failure instead of silence.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak, mpsc};
use std::time::Duration;

use nix::errno::Errno;

use super::test_support::*;
use super::{PageServer, PagerError, PagerOptions, SourceError, UffdError};

/// Options whose `on_failure` counts its calls and keeps the error's full message.
fn counting_failures(prefetch: bool) -> (PagerOptions, Arc<AtomicUsize>, Arc<Mutex<String>>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(String::new()));
    let hook = {
        let (calls, seen) = (calls.clone(), seen.clone());
        Box::new(move |e: &PagerError| {
            calls.fetch_add(1, Ordering::SeqCst);
            *seen.lock().unwrap() = e.full_message();
        })
    };
    let options = PagerOptions {
        on_failure: Some(hook),
        ..options(prefetch)
    };
    (options, calls, seen)
}

/// Faults on a page of `chunk` from another thread and returns what it read, failing if the
/// thread stays blocked.
fn fault_from_another_thread(m: &Arc<Mapping>, chunk: usize) -> Vec<u8> {
    let (tx, rx) = mpsc::channel();
    let m = m.clone();
    std::thread::spawn(move || {
        let mut page = vec![0u8; PAGE];
        m.read_page(chunk * PAGES_PER_CHUNK + 1, &mut page);
        let _ = tx.send(page);
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("a thread faulting on the failed chunk was left blocked")
}

#[test]
fn a_chunk_that_fails_authentication_fails_the_server_without_hanging_the_guest() {
    within_a_minute(|| {
        let want = memory();
        let mut scripted = Scripted::new(&want);
        scripted.unauthentic = Some(6);
        let source = Arc::new(scripted);
        let m = Arc::new(Mapping::new(LEN));
        let (opts, calls, seen) = counting_failures(false);
        let server = serve(&source, &m, opts);
        touch_chunk(&m, 5);
        let page = fault_from_another_thread(&m, 6);
        assert!(page.iter().all(|b| *b == 0), "released as anonymous memory");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let message = seen.lock().unwrap().clone();
        assert!(
            message.contains("chunk 6") && message.contains("tag does not match"),
            "the full message names the chunk and the cause: {message}"
        );
        let failure = server.failure().expect("failure recorded");
        assert!(
            matches!(
                &*failure,
                PagerError::Chunk {
                    index: 6,
                    source: SourceError::Unauthentic(_)
                }
            ),
            "{failure:?}"
        );
        // Installed memory keeps its contents; the rest is plain anonymous memory now and
        // faults no longer reach the dead server.
        check_chunk(&m, 5, &want);
        touch_chunk(&m, 100);
        m.discard(50 * PAGES_PER_CHUNK, 3);
        assert!(!server.wait_complete(Duration::from_millis(10)));
        assert!(matches!(
            server.check_complete(),
            Err(PagerError::Incomplete { installing: 1, .. })
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "on_failure is called once");
        assert_eq!(
            source.fill_counts()[100],
            0,
            "nothing is asked after a failure"
        );
    });
}

#[test]
fn a_panicking_source_is_a_recorded_failure_that_releases_the_guest() {
    within_a_minute(|| {
        let want = memory();
        let mut scripted = Scripted::new(&want);
        scripted.panics = Some(10);
        let source = Arc::new(scripted);
        let m = Arc::new(Mapping::new(LEN));
        let (opts, calls, seen) = counting_failures(false);
        let server = serve(&source, &m, opts);
        let page = fault_from_another_thread(&m, 10);
        assert!(page.iter().all(|b| *b == 0), "released as anonymous memory");
        match server.failure().as_deref() {
            Some(PagerError::Panic {
                thread: "uffd-faults",
                message,
            }) => assert!(message.contains("chunk 10"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(seen.lock().unwrap().contains("panicked"));
    });
}

#[test]
fn registering_memory_that_is_not_page_aligned_reports_the_errno() {
    let source = Arc::new(Scripted::new(&memory()));
    let m = Mapping::new(LEN + PAGE);
    let mut region = m.region();
    region.host_addr += 8;
    region.len = LEN;
    match PageServer::start(source, vec![region], options(false)) {
        Err(PagerError::Register {
            host_addr,
            source: UffdError::Errno(Errno::EINVAL),
            ..
        }) => assert_eq!(host_addr, m.ptr as usize + 8),
        Err(other) => panic!("wrong error: {}", other.full_message()),
        Ok(_) => panic!("unaligned memory was registered"),
    }
}

#[test]
fn check_complete_names_the_chunks_not_yet_installed() {
    within_a_minute(|| {
        let source = Arc::new(Scripted::new(&memory()));
        let m = Mapping::new(LEN);
        let server = serve(&source, &m, options(false));
        touch_chunk(&m, 0);
        touch_chunk(&m, 2);
        match server.check_complete() {
            Err(PagerError::Incomplete {
                chunks,
                missing,
                installing: 0,
                first: 1,
            }) => assert_eq!((chunks, missing), (CHUNKS, CHUNKS - 2)),
            other => panic!("{other:?}"),
        }
        assert!(server.failure().is_none(), "asking is not failing");
    });
}

#[test]
fn a_chunk_left_uninstalled_after_the_full_prefetch_fails_the_server() {
    within_a_minute(|| {
        let want = memory();
        let source = Arc::new(Scripted::new(&want));
        // The pass goes down memory: the lowest data chunk is its last, and the top chunk was
        // among its first.
        let last_data = (0..CHUNKS).find(|&c| !source.zero_chunks()[c]).unwrap();
        let top = CHUNKS - 1;
        assert!(top > last_data);
        // While the prefetch pass serves its last data chunk, the top chunk (long installed)
        // is marked missing again, as a bookkeeping bug would leave it.
        let server_slot: Arc<OnceLock<Weak<PageServer>>> = Arc::new(OnceLock::new());
        *source.hook.lock().unwrap() = Some({
            let slot = server_slot.clone();
            Arc::new(move |index| {
                if index != last_data {
                    return;
                }
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                let server = loop {
                    if let Some(s) = slot.get() {
                        break s.upgrade();
                    }
                    assert!(std::time::Instant::now() < deadline);
                    std::thread::sleep(Duration::from_millis(1));
                };
                if let Some(server) = server {
                    server.shared.forget_install(top);
                }
            })
        });
        let m = Mapping::new(LEN);
        let (opts, calls, seen) = counting_failures(true);
        let server = Arc::new(serve(&source, &m, opts));
        server_slot.set(Arc::downgrade(&server)).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while server.failure().is_none() {
            assert!(std::time::Instant::now() < deadline, "{:?}", server.stats());
            std::thread::sleep(Duration::from_millis(1));
        }
        match server.failure().as_deref() {
            Some(PagerError::Incomplete {
                missing: 1,
                installing: 0,
                first,
                ..
            }) if *first == top => {}
            other => panic!("{other:?}"),
        }
        // The failure is recorded before the owner is told, on the failing thread.
        while calls.load(Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the owner was never told"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(seen.lock().unwrap().contains("never installed"));
        server.stop();
    });
}

//! Discarded memory (`MADV_DONTNEED`, a balloon) reads as zeros afterwards, never as the
//! source's bytes again, whether its chunk was installed before, after or during the discard;
//! and the final accounting counts the pages an install left out because they were discarded.

use std::sync::Arc;

use super::PagerOptions;
use super::test_support::*;

#[test]
fn discarded_pages_of_an_installed_chunk_read_as_zeros() {
    within_a_minute(|| {
        let want = memory();
        let source = Arc::new(Scripted::new(&want));
        let m = Mapping::new(LEN);
        let server = serve(&source, &m, options(false));
        // Chunk 5 is text, chunk 6 random: install both, then discard across them.
        touch_chunk(&m, 5);
        touch_chunk(&m, 6);
        let first = 5 * PAGES_PER_CHUNK + 10;
        m.discard(first, 9);
        let expect = with_removed(&want, &[(first, 9)]);
        check_chunk(&m, 5, &expect);
        check_chunk(&m, 6, &expect);
        // Discarding again, after the zero pages were written, still yields zeros.
        m.write_byte(first, 0x5a);
        m.discard(first, 1);
        let mut page = vec![0u8; PAGE];
        m.read_page(first, &mut page);
        assert!(page.iter().all(|b| *b == 0));
        let stats = server.stats();
        assert_eq!(stats.removes, 2, "{stats:?}");
        assert_eq!(stats.removed_pages, 9, "{stats:?}");
        assert_eq!(stats.zero_page_faults, 10, "{stats:?}");
        assert!(server.failure().is_none());
        // Installed before the discard: no page of theirs was skipped.
        check_all_pages(&m, &expect);
        let stats = server.check_complete().unwrap();
        assert_eq!(stats.skipped_pages, 0, "{stats:?}");
        assert_eq!(stats.installed_pages, stats.pages, "{stats:?}");
    });
}

#[test]
fn discarded_pages_of_a_chunk_not_yet_installed_stay_zero_and_are_accounted() {
    within_a_minute(|| {
        let want = memory();
        let source = Arc::new(Scripted::new(&want));
        let m = Mapping::new(LEN);
        let server = serve(&source, &m, options(false));
        // Chunk 9 (text): discard its first pages and two in the middle, then fault it in from
        // a page that was not discarded; chunk 10 (random): fault it in from a discarded page.
        let removed = [
            (9 * PAGES_PER_CHUNK, 3),
            (9 * PAGES_PER_CHUNK + 7, 2),
            (10 * PAGES_PER_CHUNK + 4, 4),
            // an elided chunk
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
        let stats = server.check_complete().unwrap();
        assert_eq!(
            stats.skipped_pages, 10,
            "every discarded page was left out: {stats:?}"
        );
        assert_eq!(stats.installed_pages + 10, stats.pages, "{stats:?}");
    });
}

#[test]
fn discards_while_the_prefetcher_runs_read_as_zeros() {
    within_a_minute(|| {
        let want = memory();
        let source = Arc::new(Scripted::new(&want));
        let m = Arc::new(Mapping::new(LEN));
        let server = serve(
            &source,
            &m,
            PagerOptions {
                working_set: (0..CHUNKS as u32).rev().collect(),
                ..options(true)
            },
        );
        // Discard a run in every third chunk, straddling chunk boundaries, while the working
        // set installs everything from the back and a reader faults from the front.
        let removed: Vec<(usize, usize)> = (0..CHUNKS)
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
        let stats = server.check_complete().unwrap();
        assert_eq!(stats.removes, removed.len() as u64, "{stats:?}");
        assert!(stats.skipped_pages <= stats.removed_pages, "{stats:?}");
        assert!(server.failure().is_none());
    });
}

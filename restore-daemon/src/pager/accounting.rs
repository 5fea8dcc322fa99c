//! What the page server counts ([`PagerStats`]) and the final accounting: once every chunk is
//! installed, the chunks by installer, the chunks by kind and the pages all add up.

use std::sync::atomic::{AtomicU64, Ordering};

use super::error::{PagerError, Tally};

/// Counts of what the server did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagerStats {
    /// Page faults received.
    pub faults: u64,
    /// Chunks installed with data.
    pub data_chunks: u64,
    /// Chunks installed as zero pages (elided by the source, or reported all zeros).
    pub zero_chunks: u64,
    /// Chunks installed by the fault thread, for faults.
    pub fault_installs: u64,
    /// Chunks installed by the fault thread from the startup set, before the guest asked.
    pub startup: u64,
    /// Chunks installed by the background thread from the working set.
    pub working_set: u64,
    /// Chunks installed by the background thread's full prefetch (or `install_all`).
    pub prefetched: u64,
    /// Pages the kernel refused as already present (`EEXIST`).
    pub lost_races: u64,
    /// Remove events (memory discarded with `MADV_DONTNEED` and the like).
    pub removes: u64,
    /// Pages newly marked removed by those events.
    pub removed_pages: u64,
    /// Faults in removed pages, answered with a zero page.
    pub zero_page_faults: u64,
    /// Installs retried because the kernel answered `EAGAIN` while it processed a remove.
    pub retries: u64,
    /// Pages of installed chunks made present by their install (copied, zeroed, or found
    /// present).
    pub installed_pages: u64,
    /// Pages of installed chunks their install left out because they had been removed.
    pub skipped_pages: u64,
    /// 2 MiB blocks the background installers moved whole, as huge pages.
    pub huge_blocks: u64,
    /// Chunks in the source.
    pub chunks: u64,
    /// Pages of guest memory.
    pub pages: u64,
}

impl PagerStats {
    /// The final accounting of a complete server: every chunk was installed exactly once by
    /// someone, as data or zeros, and every page of guest memory was either installed by its
    /// chunk or left out because it had been discarded.
    pub fn check_totals(&self) -> Result<(), PagerError> {
        let unaccounted = |tally, counted, expected| PagerError::Unaccounted {
            tally,
            counted,
            expected,
        };
        let by_installer = self.fault_installs + self.startup + self.working_set + self.prefetched;
        if by_installer != self.chunks {
            return Err(unaccounted(
                Tally::ChunksByInstaller,
                by_installer,
                self.chunks,
            ));
        }
        let by_kind = self.data_chunks + self.zero_chunks;
        if by_kind != self.chunks {
            return Err(unaccounted(Tally::ChunksByKind, by_kind, self.chunks));
        }
        let pages = self.installed_pages + self.skipped_pages;
        if pages != self.pages {
            return Err(unaccounted(Tally::Pages, pages, self.pages));
        }
        if self.skipped_pages > self.removed_pages {
            return Err(unaccounted(
                Tally::SkippedPages,
                self.skipped_pages,
                self.removed_pages,
            ));
        }
        Ok(())
    }
}

/// The live counters behind [`PagerStats`].
#[derive(Default)]
pub(super) struct Counters {
    pub faults: AtomicU64,
    pub data_chunks: AtomicU64,
    pub zero_chunks: AtomicU64,
    pub fault_installs: AtomicU64,
    pub startup: AtomicU64,
    pub working_set: AtomicU64,
    pub prefetched: AtomicU64,
    pub lost_races: AtomicU64,
    pub removes: AtomicU64,
    pub removed_pages: AtomicU64,
    pub zero_page_faults: AtomicU64,
    pub retries: AtomicU64,
    pub installed_pages: AtomicU64,
    pub skipped_pages: AtomicU64,
    pub huge_blocks: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn stats(&self, chunks: usize, pages: usize) -> PagerStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PagerStats {
            faults: get(&self.faults),
            data_chunks: get(&self.data_chunks),
            zero_chunks: get(&self.zero_chunks),
            fault_installs: get(&self.fault_installs),
            startup: get(&self.startup),
            working_set: get(&self.working_set),
            prefetched: get(&self.prefetched),
            lost_races: get(&self.lost_races),
            removes: get(&self.removes),
            removed_pages: get(&self.removed_pages),
            zero_page_faults: get(&self.zero_page_faults),
            retries: get(&self.retries),
            installed_pages: get(&self.installed_pages),
            skipped_pages: get(&self.skipped_pages),
            huge_blocks: get(&self.huge_blocks),
            chunks: chunks as u64,
            pages: pages as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete() -> PagerStats {
        PagerStats {
            data_chunks: 6,
            zero_chunks: 4,
            fault_installs: 2,
            startup: 1,
            working_set: 2,
            prefetched: 5,
            removed_pages: 9,
            installed_pages: 155,
            skipped_pages: 5,
            chunks: 10,
            pages: 160,
            ..PagerStats::default()
        }
    }

    #[test]
    fn a_complete_tally_adds_up() {
        complete().check_totals().unwrap();
    }

    /// Breaks one sum of a complete tally.
    type Breakage = fn(&mut PagerStats);

    #[test]
    fn each_sum_that_does_not_add_up_is_named() {
        let cases: [(Breakage, Tally); 5] = [
            (|s| s.prefetched -= 1, Tally::ChunksByInstaller),
            (|s| s.startup += 1, Tally::ChunksByInstaller),
            (|s| s.zero_chunks += 1, Tally::ChunksByKind),
            (|s| s.installed_pages -= 1, Tally::Pages),
            (
                |s| {
                    s.skipped_pages += 10;
                    s.installed_pages -= 10;
                },
                Tally::SkippedPages,
            ),
        ];
        for (break_it, want) in cases {
            let mut stats = complete();
            break_it(&mut stats);
            match stats.check_totals() {
                Err(PagerError::Unaccounted { tally, .. }) => assert_eq!(tally, want),
                other => panic!("{want:?}: {other:?}"),
            }
        }
    }
}

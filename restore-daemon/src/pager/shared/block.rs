//! Installing a whole 2 MiB block of chunks as one transparent huge page: a background
//! installer decodes the block's chunks into a staging huge page of its own and moves it into
//! guest memory with `UFFDIO_MOVE`, which moves the huge page's page-table entry instead of
//! copying. The guest then reaches that memory through one large mapping, as it reaches an
//! eager restore's memory, instead of 512 small ones: `UFFDIO_COPY` only ever installs 4 KiB
//! pages, and on PVM each of those costs the guest a fault of its own.
//!
//! Only the working set's installers move blocks, where the working set covers at least half
//! of one, including blocks a guest fault handed them (`urgent`; docs/ARCHITECTURE.md, page
//! server, has the measurements). Everything else goes chunk by chunk as before: a block cut
//! by a region's edge or not aligned, one mostly of zeros, with a discarded page or a chunk
//! someone else has claimed, a kernel without `UFFDIO_MOVE`, the full prefetch, and the fault
//! thread itself (it must keep reading events).

use std::sync::atomic::Ordering;
use std::sync::{PoisonError, RwLockReadGuard};

use crate::pager::accounting::Counters;
use crate::pager::error::PagerError;
use crate::pager::source::Fill;

use super::{Halt, INSTALLED, INSTALLING, MISSING, Outcome, PAGE, Role, Shared};

/// A huge page, and the block a background installer moves whole.
pub(in crate::pager) const BLOCK: usize = 2 << 20;

/// `struct uffdio_move` (Linux 6.8, `linux/userfaultfd.h`).
#[repr(C)]
struct UffdioMove {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    moved: i64,
}

// `_IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)`, UFFDIO being 0xAA and _UFFDIO_MOVE 0x05.
nix::ioctl_readwrite!(uffdio_move, 0xAA, 0x05, UffdioMove);

/// `UFFD_FEATURE_MOVE`: asked for when the userfaultfd is opened.
pub(in crate::pager) const FEATURE_MOVE: u64 = 1 << 16;

/// Where a background installer assembles a block: a 2 MiB-aligned private anonymous mapping
/// advised `MADV_HUGEPAGE`. Each move takes its pages away, so each block gets fresh ones.
pub(in crate::pager) struct Staging {
    map: *mut libc::c_void,
    map_len: usize,
    block: *mut u8,
}

impl Staging {
    pub fn new() -> std::io::Result<Self> {
        let map_len = 2 * BLOCK;
        // SAFETY: a fresh private anonymous mapping, owned here and unmapped in Drop.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let block = (map as usize).next_multiple_of(BLOCK) as *mut u8;
        // SAFETY: [block, block + BLOCK) lies inside the mapping just made (it is 2 BLOCKs
        // long); the advice changes only how the kernel backs it.
        unsafe { libc::madvise(block.cast(), BLOCK, libc::MADV_HUGEPAGE) };
        Ok(Self {
            map,
            map_len,
            block,
        })
    }

    /// The block's bytes, every page present (a huge page when the kernel has one): a move
    /// must find no hole in its source, or it would leave guest pages missing.
    fn populated(&mut self) -> std::io::Result<&mut [u8]> {
        // SAFETY: the range is this mapping's; MADV_POPULATE_WRITE only faults its pages in.
        let rc = unsafe { libc::madvise(self.block.cast(), BLOCK, libc::MADV_POPULATE_WRITE) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: BLOCK writable bytes this struct owns, borrowed mutably through `&mut self`;
        // nothing else maps or touches them.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.block, BLOCK) })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; no slice of it outlives `&mut self`.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

impl Shared {
    /// The chunks of the 2 MiB block holding chunk `index`, if the block can be moved whole:
    /// aligned, inside one region, cut into whole chunks, no page of it discarded, and at
    /// least half of it data. A huge page costs 2 MiB however much of it is zeros, where zero
    /// chunks installed one by one map the shared zero page and cost nothing: a block of
    /// mostly elided chunks stays small.
    pub fn block_of(&self, index: usize) -> Option<std::ops::Range<usize>> {
        let range = self.movable_block(index)?;
        let first_page = self.chunks.get(range.start)?.first_page;
        let discarded = (first_page..first_page + BLOCK / PAGE).any(|p| self.is_removed(p));
        (!discarded).then_some(range)
    }

    /// [`Shared::block_of`] as the memory's layout decides it, whatever has been discarded
    /// since: what a plan made before the guest runs may count on.
    pub fn movable_block(&self, index: usize) -> Option<std::ops::Range<usize>> {
        let chunk = self.chunks.get(index)?;
        let start = chunk.host - chunk.host % BLOCK;
        let region = self
            .regions
            .iter()
            .find(|r| chunk.host >= r.host && chunk.host - r.host < r.len)?;
        if self.chunk_size > BLOCK
            || BLOCK % self.chunk_size != 0
            || start < region.host
            || start + BLOCK > region.host + region.len
        {
            return None;
        }
        let first = index - (chunk.host - start) / self.chunk_size;
        let range = first..first + BLOCK / self.chunk_size;
        let chunks = self.chunks.get(range.clone())?;
        let whole = chunks
            .iter()
            .enumerate()
            .all(|(i, c)| c.host == start + i * self.chunk_size && c.len == self.chunk_size);
        let mostly_data = 2 * chunks.iter().filter(|c| !c.zero).count() >= chunks.len();
        (whole && mostly_data).then_some(range)
    }

    /// Installs the whole 2 MiB block holding chunk `index` with one move when `whole` and it
    /// can (see the module docs), calling `claimed` once per chunk this call takes on;
    /// otherwise installs chunk `index` alone.
    pub fn install_block(
        &self,
        index: usize,
        whole: bool,
        staging: &mut Option<Staging>,
        buf: &mut Vec<u8>,
        mut claimed: impl FnMut(),
    ) -> Result<Outcome, Halt> {
        if whole && let Some(outcome) = self.try_block(index, staging, &mut claimed)? {
            return Ok(outcome);
        }
        self.install(index, buf, &mut Role::Background, claimed)
    }

    /// `None`: the block cannot go whole; nothing was claimed.
    fn try_block(
        &self,
        index: usize,
        staging: &mut Option<Staging>,
        claimed: &mut impl FnMut(),
    ) -> Result<Option<Outcome>, Halt> {
        if !self.can_move.load(Ordering::Relaxed) {
            return Ok(None);
        }
        // Held until the move is done: no remove event is read (and no page discarded under
        // us) between the check for discarded pages and the move.
        let gate = self.read_gate();
        let Some(range) = self.block_of(index) else {
            return Ok(None);
        };
        if !self.claim_all(range.clone()) {
            return Ok(None);
        }
        let stage = match staging {
            Some(s) => s,
            None => match Staging::new() {
                Ok(s) => staging.insert(s),
                Err(e) => return Ok(self.give_back(range, &e)),
            },
        };
        let bytes = match stage.populated() {
            Ok(b) => b,
            Err(e) => return Ok(self.give_back(range, &e)),
        };
        let start = self.chunks[range.start].host;
        let mut data_chunks = 0;
        for i in range.clone() {
            claimed();
            let chunk = &self.chunks[i];
            let out = &mut bytes[chunk.host - start..chunk.host - start + chunk.len];
            let data = !chunk.zero
                && match self.source.fill_chunk(i, out) {
                    Ok(Fill::Data) => true,
                    Ok(Fill::Zero) => false,
                    Err(source) => {
                        return Err(Halt::Failed(PagerError::Chunk { index: i, source }));
                    }
                };
            if !data {
                // The staging page may hold an earlier block that fell back to copies.
                out.fill(0);
            }
            data_chunks += u64::from(data);
        }
        let mut request = UffdioMove {
            dst: start as u64,
            src: bytes.as_ptr() as u64,
            len: BLOCK as u64,
            mode: 0,
            moved: 0,
        };
        // SAFETY: `request` names the staging block (ours, every page present) and a guest
        // block registered with this userfaultfd whose chunks we claimed, so no page of it is
        // present (only an install makes one present, and none ran); the kernel moves the
        // pages' entries from one to the other in this process and touches nothing else.
        let moved = unsafe { uffdio_move(self.uffd_fd(), &mut request) };
        let whole = moved.is_ok() && request.moved == BLOCK as i64;
        drop(gate);
        let (pages, skipped) = if whole {
            Counters::add(&self.counters.huge_blocks, 1);
            ((BLOCK / PAGE) as u64, 0)
        } else {
            if let Err(e) = moved
                && request.moved <= 0
                && !matches!(e, nix::errno::Errno::EAGAIN | nix::errno::Errno::EEXIST)
            {
                // Not a passing condition: this kernel or this memory cannot move pages.
                tracing::debug!(error = %e, "UFFDIO_MOVE refused; installing chunk by chunk");
                self.can_move.store(false, Ordering::Relaxed);
            }
            // Copy what was not moved from the staging page; moved pages are present and are
            // stepped over, pages discarded meanwhile are left out.
            let (mut pages, mut skipped) = (0, 0);
            for i in range.clone() {
                let chunk = &self.chunks[i];
                let src = &bytes[chunk.host - start..chunk.host - start + chunk.len];
                let tally = self.write_chunk(i, chunk, Some(src), &mut Role::Background)?;
                pages += tally.installed;
                skipped += tally.skipped;
            }
            (pages, skipped)
        };
        let c = &self.counters;
        Counters::add(&c.data_chunks, data_chunks);
        Counters::add(&c.zero_chunks, range.len() as u64 - data_chunks);
        Counters::add(&c.installed_pages, pages);
        Counters::add(&c.skipped_pages, skipped);
        for i in range {
            self.state[i].store(INSTALLED, Ordering::Release);
        }
        self.wake(start, BLOCK);
        Ok(Some(Outcome::Installed))
    }

    /// Claims every chunk of `range`, or none: false (with nothing claimed) if any is taken.
    fn claim_all(&self, range: std::ops::Range<usize>) -> bool {
        for i in range.clone() {
            if self.state[i]
                .compare_exchange(MISSING, INSTALLING, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                self.release(range.start..i);
                return false;
            }
        }
        true
    }

    /// Hands claimed chunks back: a fault that found one claimed waits to be woken, and then
    /// faults again and installs it itself.
    fn release(&self, range: std::ops::Range<usize>) {
        for i in range {
            self.state[i].store(MISSING, Ordering::Release);
            self.wake(self.chunks[i].host, self.chunks[i].len);
        }
    }

    fn give_back(&self, range: std::ops::Range<usize>, e: &std::io::Error) -> Option<Outcome> {
        tracing::debug!(error = %e, "no staging huge page; installing chunk by chunk");
        self.release(range);
        None
    }

    pub(super) fn read_gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }
}

//! Blocks a guest fault asked for before the working set's installers reached them.
//!
//! A guest that reads faster than the installers decode catches up with them and faults on
//! chunks of blocks nobody has claimed yet. Installed alone, such a chunk goes in as 4 KiB
//! pages and its block can no longer be moved in whole as a huge page: each such block the
//! guest then faults into KVM page by page. Measured with a guest reading 256 MiB: restores
//! that lost 10–16 of 128 blocks this way took 315–380 ms, those that lost none 120–165 ms.
//! So while working-set installers run, a fault on a block the plan moves whole hands the block
//! to them, ahead of the rest of the working set, and the faulting thread waits for the block's
//! wake. The fault thread cannot move blocks itself: it is the only reader of userfaultfd
//! events, which a move may have to wait for.
//!
//! No handed-over block can be left behind: the queue accepts blocks only while an installer
//! serves it, and the last installer to leave closes it and installs what is queued.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use super::{MISSING, Shared, lock};

/// The queue and who serves it.
#[derive(Default)]
pub(in crate::pager) struct Urgent {
    /// A chunk of each block handed over, in the order the faults came.
    blocks: VecDeque<usize>,
    /// Installers serving the queue; it accepts blocks only while there are some.
    servers: usize,
    /// Per chunk: the plan installs its block whole.
    whole: Vec<bool>,
}

impl Shared {
    /// Opens the queue for `servers` installers, for the blocks of the chunks `whole` marks.
    pub fn open_urgent(&self, whole: Vec<bool>, servers: usize) {
        let mut urgent = lock(&self.urgent);
        urgent.whole = whole;
        urgent.servers = servers;
    }

    /// From the fault thread: hands the block of chunk `index` to the installers if the plan
    /// moves it whole, none of its chunks is claimed yet and an installer serves the queue.
    /// True if the block is (or already was) handed over: the faulter then waits for its wake.
    pub fn hand_over_block(&self, index: usize) -> bool {
        let mut urgent = lock(&self.urgent);
        if urgent.servers == 0
            || !self.can_move.load(Ordering::Relaxed)
            || !urgent.whole.get(index).copied().unwrap_or(false)
        {
            return false;
        }
        let Some(block) = self.movable_block(index) else {
            return false;
        };
        if urgent.blocks.iter().any(|queued| block.contains(queued)) {
            return true;
        }
        let untouched = self
            .state
            .get(block.clone())
            .is_some_and(|s| s.iter().all(|s| s.load(Ordering::Acquire) == MISSING));
        if untouched {
            urgent.blocks.push_back(index);
        }
        untouched
    }

    /// From an installer: the next block handed over, if any.
    pub fn next_urgent(&self) -> Option<usize> {
        lock(&self.urgent).blocks.pop_front()
    }

    /// From an installer that stops serving the queue: what it must still install (all that
    /// is queued if it was the last server, which closes the queue; nothing otherwise).
    pub fn leave_urgent(&self) -> Vec<usize> {
        let mut urgent = lock(&self.urgent);
        urgent.servers = urgent.servers.saturating_sub(1);
        if urgent.servers == 0 {
            urgent.blocks.drain(..).collect()
        } else {
            Vec::new()
        }
    }
}

impl Shared {
    /// Wakes every thread waiting on the block of chunk `index` (after an installer served it:
    /// if the block could not go whole after all, only one chunk went in, and the faults
    /// waiting on the others are sent back to fault again, which then installs them alone).
    pub fn wake_block(&self, index: usize) {
        if let Some(block) = self.movable_block(index) {
            let start = self.chunks[block.start].host;
            let end = self.chunks[block.end - 1].host + self.chunks[block.end - 1].len;
            self.wake(start, end - start);
        }
    }
}

//! Installing: one chunk (claimed once, filled by the source, copied page run by page run
//! around discarded pages, then accounted and woken) or one zero page for a discarded page,
//! with the `EAGAIN` retries a pending remove event forces.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nix::errno::Errno;

use crate::pager::accounting::Counters;
use crate::pager::error::{InstallOp, PagerError, UffdError};
use crate::pager::source::Fill;

use super::{Chunk, Halt, INSTALLED, INSTALLING, MISSING, Outcome, PAGE, Role, Shared};

/// How long a background installer waits for the fault thread to read a pending remove event
/// before it tries again.
const AGAIN_WAIT: Duration = Duration::from_micros(50);

enum Placed {
    Bytes(usize),
    /// The first page of the range is present already.
    Exists,
    /// The kernel is processing a remove event (`mmap_changing`); retry after it is read.
    Again,
}

/// What one chunk install did with the chunk's pages.
#[derive(Default)]
pub(super) struct PageTally {
    pub installed: u64,
    pub skipped: u64,
}

impl Shared {
    /// Answers a fault in a discarded page with one zero page (it must read as zeros, never
    /// as the source's bytes), waking the faulter.
    pub(super) fn zero_removed_page(
        &self,
        host: usize,
        pending: &mut VecDeque<usize>,
    ) -> Result<(), Halt> {
        loop {
            match self.place(host, None, PAGE, true) {
                Ok(Placed::Bytes(_)) => return Ok(()),
                Ok(Placed::Exists) => {
                    self.wake(host, PAGE);
                    return Ok(());
                }
                Ok(Placed::Again) => self.wait_for_events(&mut Role::Faults(&mut *pending))?,
                Err(source) => {
                    let index = self.locate(host).map_or(0, |(c, _)| c);
                    return Err(Halt::Failed(PagerError::Install {
                        index,
                        op: InstallOp::ZeroPage,
                        host_addr: host,
                        len: PAGE,
                        source,
                    }));
                }
            }
        }
    }

    /// Installs chunk `index` unless someone else has or is, calling `claimed` once this call
    /// has taken it on; `buf` is scratch.
    pub fn install(
        &self,
        index: usize,
        buf: &mut Vec<u8>,
        role: &mut Role,
        claimed: impl FnOnce(),
    ) -> Result<Outcome, Halt> {
        let (Some(chunk), Some(state)) = (self.chunks.get(index), self.state.get(index)) else {
            return Err(Halt::Failed(PagerError::NoSuchChunk {
                index,
                chunks: self.chunks.len(),
            }));
        };
        if state
            .compare_exchange(MISSING, INSTALLING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Installed: its copy woke the waiters, but a fault may have been queued after
            // that; waking again is harmless. Installing: the installer's copy wakes them.
            if matches!(role, Role::Faults(_)) && state.load(Ordering::Acquire) == INSTALLED {
                self.wake(chunk.host, chunk.len);
            }
            return Ok(Outcome::Skipped);
        }
        claimed();
        let data = if chunk.zero {
            None
        } else {
            buf.resize(chunk.len, 0);
            match self.source.fill_chunk(index, buf) {
                Ok(Fill::Data) => Some(&buf[..]),
                Ok(Fill::Zero) => None,
                Err(source) => return Err(Halt::Failed(PagerError::Chunk { index, source })),
            }
        };
        let pages = self.write_chunk(index, chunk, data, role)?;
        // Accounted before anyone waiting on the chunk is woken, so a thread its fault
        // released already finds the chunk installed and counted.
        let c = &self.counters;
        let kind = if data.is_some() {
            &c.data_chunks
        } else {
            &c.zero_chunks
        };
        Counters::add(kind, 1);
        Counters::add(&c.installed_pages, pages.installed);
        Counters::add(&c.skipped_pages, pages.skipped);
        state.store(INSTALLED, Ordering::Release);
        self.wake(chunk.host, chunk.len);
        Ok(Outcome::Installed)
    }

    /// Copies `data` (or zero pages, for `None`) into every page of the chunk that was not
    /// removed, run by run, resuming after partial copies and `EAGAIN`. Nobody is woken yet;
    /// the caller wakes the whole chunk once it is accounted.
    pub(super) fn write_chunk(
        &self,
        index: usize,
        chunk: &Chunk,
        data: Option<&[u8]>,
        role: &mut Role,
    ) -> Result<PageTally, Halt> {
        let pages = chunk.len / PAGE;
        let mut tally = PageTally::default();
        let mut cursor = 0;
        loop {
            let gate = match role {
                Role::Background => Some(self.read_gate()),
                // The fault thread is the only writer of the removed bits.
                Role::Faults(_) => None,
            };
            let again = loop {
                while cursor < pages && self.is_removed(chunk.first_page + cursor) {
                    tally.skipped += 1;
                    cursor += 1;
                }
                if cursor == pages {
                    break false;
                }
                let mut end = cursor + 1;
                while end < pages && !self.is_removed(chunk.first_page + end) {
                    end += 1;
                }
                let host = chunk.host + cursor * PAGE;
                let len = (end - cursor) * PAGE;
                // `data` is the whole chunk (the buffer was sized to it), so this always holds.
                let src = match data {
                    Some(d) => Some(d.get(cursor * PAGE..end * PAGE).ok_or_else(|| {
                        Halt::Failed(PagerError::ChunkLength {
                            index,
                            expected: chunk.len,
                            found: d.len(),
                        })
                    })?),
                    None => None,
                };
                match self.place(host, src, len, false) {
                    Ok(Placed::Bytes(n)) if n >= PAGE => {
                        tally.installed += (n / PAGE) as u64;
                        cursor += n / PAGE;
                    }
                    Ok(Placed::Bytes(_)) | Ok(Placed::Again) => break true,
                    Ok(Placed::Exists) => {
                        Counters::add(&self.counters.lost_races, 1);
                        self.wake(host, PAGE);
                        tally.installed += 1;
                        cursor += 1;
                    }
                    Err(source) => {
                        return Err(Halt::Failed(PagerError::Install {
                            index,
                            op: if src.is_some() {
                                InstallOp::Copy
                            } else {
                                InstallOp::ZeroPage
                            },
                            host_addr: host,
                            len,
                            source,
                        }));
                    }
                }
            };
            drop(gate);
            if !again {
                return Ok(tally);
            }
            self.wait_for_events(role)?;
        }
    }

    /// After an `EAGAIN`: lets the pending remove event be read, by reading it ourselves on the
    /// fault thread or by stepping aside elsewhere. Gives up when the server stops or fails, so
    /// a retry loop cannot outlive the server.
    fn wait_for_events(&self, role: &mut Role) -> Result<(), Halt> {
        self.counters.retries.fetch_add(1, Ordering::Relaxed);
        if self.halted() {
            return Err(Halt::Stopped);
        }
        match role {
            Role::Faults(pending) => {
                // The kernel raises mmap_changing just before it queues the event.
                if self.drain_events(pending).map_err(Halt::Failed)? == 0 {
                    std::thread::yield_now();
                }
            }
            Role::Background => std::thread::sleep(AGAIN_WAIT),
        }
        Ok(())
    }

    /// One `UFFDIO_COPY` of `src` (or `UFFDIO_ZEROPAGE` for `None`) to [host, host + len).
    fn place(
        &self,
        host: usize,
        src: Option<&[u8]>,
        len: usize,
        wake: bool,
    ) -> Result<Placed, UffdError> {
        let dst = host as *mut libc::c_void;
        let result = match src {
            // SAFETY: `src` is a live buffer of `len` bytes, and [host, host + len) is inside a
            // registered region of guest memory (chunk and page ranges come from the region
            // table); UFFDIO_COPY only fills pages that are not present, so nothing of ours is
            // overwritten.
            Some(data) => unsafe { self.uffd.copy(data.as_ptr().cast(), dst, len, wake) },
            // SAFETY: as above; UFFDIO_ZEROPAGE only maps zero pages where none are present.
            None => unsafe { self.uffd.zeropage(dst, len, wake) },
        };
        use userfaultfd::Error as E;
        match result {
            Ok(n) => Ok(Placed::Bytes(n)),
            // The crate reports a copy's EAGAIN as PartiallyCopied with the kernel's count,
            // which is the negated errno when nothing was copied.
            Err(E::PartiallyCopied(n)) if (n as isize) > 0 => Ok(Placed::Bytes(n)),
            Err(E::PartiallyCopied(_)) => Ok(Placed::Again),
            Err(e) => match UffdError::from(e) {
                UffdError::Errno(Errno::EEXIST) => Ok(Placed::Exists),
                // A zeropage's EAGAIN may also follow partial progress; the retry then meets
                // the pages already done as EEXIST and steps over them.
                UffdError::Errno(Errno::EAGAIN) => Ok(Placed::Again),
                other => Err(other),
            },
        }
    }
}

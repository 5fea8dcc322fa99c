//! A guest reading its memory in order.
//!
//! A function that loads a model or a hook that reads a buffer faults chunk after chunk. Each
//! fault then waits for one chunk's decode on the fault thread, while the full prefetch waits
//! for the guest's first burst of faults to end — which it does not while the read goes on —
//! and, once it starts, begins at the bottom of memory. Measured with a guest reading 256 MiB
//! without a recorded working set: ready 260 ms, against 137 ms eager.
//!
//! So the fault thread watches for runs: after [`RUN`] faults on consecutive chunks, the guest
//! is streaming. The full prefetch then starts at once, at the chunk after the latest fault,
//! and goes on from there, ahead of the guest, to the end of memory; a new run moves it again.
//! It installs whole blocks there, as huge pages where it can: a chunk installed alone leaves
//! its block on 4 KiB pages, each one a KVM fault when the guest reaches it. Where the host
//! has a second CPU a follower thread takes blocks from the same cursor, as a large working
//! set has a second installer: an eager restore decodes on every core. Afterwards the prefetch
//! goes back to its pass down memory, so every chunk is still installed.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread::Thread;

/// Consecutive chunks faulted in order that make a stream.
pub(in crate::pager) const RUN: usize = 4;

const NONE: usize = usize::MAX;

pub(in crate::pager) struct Stream {
    /// The chunk of the latest fault (the fault thread's alone).
    last: AtomicUsize,
    /// How many faults in a row were on consecutive chunks, up to `last`.
    run: AtomicUsize,
    /// Where the followers should go next, set while a run lasts; `NONE` once taken.
    ahead: AtomicUsize,
    /// The next chunk a follower takes.
    cursor: AtomicUsize,
    /// The full prefetch has passed over every chunk: nothing is left to follow.
    done: AtomicBool,
    /// The follower thread, woken when there is something to follow or to stop for.
    follower: Mutex<Option<Thread>>,
    /// The prefetch thread's id while its pass down memory runs at `SCHED_IDLE`; taken by
    /// the run that moves it back to normal priority.
    idle_prefetcher: Mutex<Option<libc::pid_t>>,
}

impl Default for Stream {
    fn default() -> Self {
        Self {
            last: AtomicUsize::new(NONE),
            run: AtomicUsize::new(0),
            ahead: AtomicUsize::new(NONE),
            cursor: AtomicUsize::new(NONE),
            done: AtomicBool::new(false),
            follower: Mutex::new(None),
            idle_prefetcher: Mutex::new(None),
        }
    }
}

impl Stream {
    /// The fault thread installed chunk `index` for a fault.
    pub fn faulted(&self, index: usize) {
        let last = self.last.swap(index, Ordering::Relaxed);
        let run = if last.checked_add(1) == Some(index) {
            self.run.load(Ordering::Relaxed).saturating_add(1)
        } else {
            1
        };
        self.run.store(run, Ordering::Relaxed);
        if run >= RUN {
            self.ahead.store(index.saturating_add(1), Ordering::Release);
            self.wake_follower();
            self.hurry_prefetcher();
        }
    }

    /// The calling thread, the prefetch thread, now runs its pass down memory at
    /// `SCHED_IDLE`.
    pub fn prefetcher_idles(&self) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        *self.idle_prefetcher() = Some(tid);
    }

    /// The prefetch thread is back at normal priority, or ends: no run may move it from now.
    pub fn prefetcher_hurries(&self) {
        *self.idle_prefetcher() = None;
    }

    /// Whether the prefetch thread still runs at `SCHED_IDLE` as far as this knows (no run has
    /// moved it since it went idle).
    pub fn prefetcher_is_idle(&self) -> bool {
        self.idle_prefetcher().is_some()
    }

    /// Moves an idle prefetch thread back to normal priority now, from the thread that saw the
    /// run. It would do so itself between two installs, but at `SCHED_IDLE` on a host whose
    /// CPUs the vCPU, the fault thread and the follower keep busy it may not run again until
    /// the read is over: measured at 256 MiB, a third of the restores then followed the read
    /// with one thread instead of two and were ready in 210–260 ms instead of 125–145 ms. A
    /// chunk it had claimed also waited for it meanwhile.
    fn hurry_prefetcher(&self) {
        // Held across the call: the prefetch thread clears the slot under this lock before it
        // ends (`prefetcher_hurries`), so `tid` still names it, never a reused id.
        let mut idle = self.idle_prefetcher();
        let Some(tid) = idle.take() else {
            return;
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `tid` is the running prefetch thread of this process (above), and `param`
        // is a valid sched_param for the call.
        let moved = unsafe { libc::sched_setscheduler(tid, libc::SCHED_OTHER, &param) };
        drop(idle);
        if moved != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "the idle prefetch keeps its scheduling class until it sees the run"
            );
        }
    }

    fn idle_prefetcher(&self) -> std::sync::MutexGuard<'_, Option<libc::pid_t>> {
        self.idle_prefetcher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The calling thread is the follower: `wake_follower` wakes it.
    pub fn register_follower(&self) {
        *self.follower.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(std::thread::current());
    }

    /// Wakes the follower (a run to follow, the prefetch over, the server stopping).
    pub fn wake_follower(&self) {
        if let Some(t) = &*self.follower.lock().unwrap_or_else(PoisonError::into_inner) {
            t.unpark();
        }
    }

    /// Whether a run is waiting for the prefetch to follow it.
    pub fn streaming(&self) -> bool {
        self.ahead.load(Ordering::Acquire) != NONE
    }

    /// The next chunk for a follower, below `count`: the chunk after the latest run's, then
    /// onwards; `None` when no run is being followed.
    pub fn next(&self, count: usize) -> Option<usize> {
        let ahead = self.ahead.swap(NONE, Ordering::AcqRel);
        if ahead != NONE {
            self.cursor.store(ahead, Ordering::Release);
        }
        let at = self.cursor.load(Ordering::Acquire);
        if at >= count {
            return None;
        }
        let at = self.cursor.fetch_add(1, Ordering::AcqRel);
        (at < count).then_some(at)
    }

    /// The full prefetch is over.
    pub fn finish(&self) {
        self.done.store(true, Ordering::Release);
        self.wake_follower();
    }

    pub fn finished(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_consecutive_faults_points_ahead_of_the_latest() {
        let s = Stream::default();
        for index in [7, 3, 4, 5] {
            s.faulted(index);
            assert!(!s.streaming(), "no run yet at {index}");
        }
        assert_eq!(s.next(50), None, "nothing to follow");
        s.faulted(6);
        assert_eq!(s.next(50), Some(7));
        assert_eq!(s.next(50), Some(8), "onwards");
        s.faulted(100);
        s.faulted(101);
        assert!(!s.streaming(), "a jump starts a new run");
        assert_eq!(s.next(50), Some(9), "the old run is still followed");
        for index in 102..106 {
            s.faulted(index);
        }
        assert_eq!(s.next(200), Some(106), "a new run moves the followers");
        assert_eq!(s.next(107), None, "to the end of memory");
    }

    #[test]
    fn a_run_moves_an_idle_prefetch_back_to_normal_priority_at_once() {
        let s = std::sync::Arc::new(Stream::default());
        let (idle, went_idle) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let prefetcher = {
            let s = s.clone();
            std::thread::spawn(move || {
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: pid 0 is the calling thread; `param` is valid for the call.
                let set = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
                assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
                s.prefetcher_idles();
                // SAFETY: gettid has no preconditions.
                idle.send(unsafe { libc::gettid() }).unwrap();
                released.recv().unwrap();
            })
        };
        let tid = went_idle.recv().unwrap();
        // SAFETY: `tid` is the live thread above, blocked until released.
        let policy = || unsafe { libc::sched_getscheduler(tid) };
        assert_eq!(policy(), libc::SCHED_IDLE);
        assert!(s.prefetcher_is_idle());
        for index in 10..10 + RUN - 1 {
            s.faulted(index);
        }
        assert_eq!(policy(), libc::SCHED_IDLE, "no run yet");
        s.faulted(10 + RUN - 1);
        assert_eq!(policy(), libc::SCHED_OTHER, "the run moved it");
        assert!(!s.prefetcher_is_idle(), "it must go idle again itself");
        release.send(()).unwrap();
        prefetcher.join().unwrap();
    }
}

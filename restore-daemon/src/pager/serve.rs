//! The server's two threads: the fault thread (reads every userfaultfd event and serves faults)
//! and the background thread (working set, then the full prefetch). Each runs under
//! `catch_unwind` so that a panic becomes a recorded failure that releases the guest instead
//! of a dead thread leaving faulters blocked for ever.

use std::any::Any;
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use super::accounting::Counters;
use super::shared::{Halt, Outcome, Role, Shared, Staging, Stream};
use super::{PREFETCH_DEADLINE, PREFETCH_QUIET, PagerError};

/// How long the fault thread sleeps in `poll` before it looks at the stop flag.
const POLL_MS: i32 = 50;

/// How often the background thread looks whether the first fault burst is over.
const BURST_CHECK: Duration = Duration::from_micros(500);

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

pub(super) fn fault_thread(shared: &Shared, startup: &[u32]) {
    match catch_unwind(AssertUnwindSafe(|| serve_faults(shared, startup))) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => shared.fail(e),
        Err(panic) => shared.fail(PagerError::Panic {
            thread: "uffd-faults",
            message: panic_message(&*panic),
        }),
    }
    if shared.failed() {
        drain_until_stopped(shared);
    }
}

fn poll_events(shared: &Shared, timeout_ms: libc::c_int) -> bool {
    let mut pfd = libc::pollfd {
        fd: shared.uffd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one descriptor owned by `shared`, which outlives this call.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) > 0 }
}

/// The fault thread's state.
struct FaultServer<'s> {
    shared: &'s Shared,
    buf: Vec<u8>,
    pending: VecDeque<usize>,
    /// Chunks already recorded.
    seen: Vec<bool>,
}

impl FaultServer<'_> {
    /// Reads the events waiting and serves every fault among them. Stopped means the server
    /// is stopping.
    fn serve_waiting(&mut self) -> Result<(), Halt> {
        self.shared
            .drain_events(&mut self.pending)
            .map_err(Halt::Failed)?;
        while let Some(addr) = self.pending.pop_front() {
            self.shared
                .handle_fault(addr, &mut self.buf, &mut self.pending, &mut self.seen)?;
            self.shared.note_fault_activity();
        }
        self.shared.busy.store(false, Ordering::Release);
        Ok(())
    }

    /// Installs the startup set, in order, before the guest asks for it. Nothing is faulting
    /// yet but the VMM restoring its devices (the vsock reset writes into guest memory), and a
    /// fault is never kept waiting behind more than the chunk in hand.
    fn install_startup(&mut self, startup: &[u32]) -> Result<(), Halt> {
        for &index in startup {
            if self.shared.stop.load(Ordering::Acquire) || self.shared.failed() {
                return Err(Halt::Stopped);
            }
            if poll_events(self.shared, 0) {
                self.serve_waiting()?;
            }
            let counted = || Counters::add(&self.shared.counters.startup, 1);
            self.shared.install(
                index as usize,
                &mut self.buf,
                &mut Role::Faults(&mut self.pending),
                counted,
            )?;
        }
        Ok(())
    }
}

fn serve_faults(shared: &Shared, startup: &[u32]) -> Result<(), PagerError> {
    let mut server = FaultServer {
        shared,
        buf: shared.prepare_thread(),
        pending: VecDeque::new(),
        seen: vec![false; shared.chunk_count()],
    };
    let halted = |halt| match halt {
        Halt::Stopped => Ok(()),
        Halt::Failed(e) => Err(e),
    };
    if let Err(halt) = server.install_startup(startup) {
        return halted(halt);
    }
    loop {
        if shared.stop.load(Ordering::Acquire) || shared.failed() {
            return Ok(());
        }
        if !poll_events(shared, POLL_MS) {
            continue;
        }
        if let Err(halt) = server.serve_waiting() {
            return halted(halt);
        }
    }
}

/// After a failure memory is unregistered, but a thread that discarded memory just before may
/// still wait for its remove event to be read; keep reading (and ignoring) events until the
/// server is dropped, which closes the uffd.
fn drain_until_stopped(shared: &Shared) {
    while !shared.stop.load(Ordering::Acquire) {
        if !poll_events(shared, POLL_MS) {
            continue;
        }
        loop {
            match shared.uffd().read_event() {
                Ok(Some(event)) => tracing::debug!(?event, "event after failure ignored"),
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "reading events after failure");
                    std::thread::sleep(Duration::from_millis(POLL_MS as u64));
                    break;
                }
            }
        }
    }
}

pub(super) fn background_thread(shared: &Shared, plan: &WorkingSetPlan, prefetch: bool) {
    run_caught(shared, "uffd-prefetch", || {
        fill_in_background(shared, Some(plan), prefetch, true)
    });
}

/// A second installer of a large working set, beside the background thread: it takes the
/// next chunks of the same order and stops at its end (the prefetch stays with one thread).
pub(super) fn working_set_helper(shared: &Shared, plan: &WorkingSetPlan) {
    run_caught(shared, "uffd-working-set", || {
        install_working_set(shared, plan, &mut Installer::prepared(shared)).map(|_| ())
    });
}

fn run_caught(
    shared: &Shared,
    thread: &'static str,
    work: impl FnOnce() -> Result<(), PagerError>,
) {
    match catch_unwind(AssertUnwindSafe(work)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => shared.fail(e),
        Err(panic) => shared.fail(PagerError::Panic {
            thread,
            message: panic_message(&*panic),
        }),
    }
}

/// Where the host has a second CPU: a second installer for a guest reading in order (see
/// `shared::stream`), until the full prefetch is over. Started with the server, so that every
/// restore starts the same threads; it sleeps until a run wakes it (nothing polls).
pub(super) fn stream_follower(shared: &Shared) {
    run_caught(shared, "uffd-stream", || {
        let mut installer = Installer::prepared(shared);
        shared.stream.register_follower();
        let count = shared.chunk_count();
        loop {
            if shared.stop.load(Ordering::Acquire) || shared.failed() || shared.stream.finished() {
                return Ok(());
            }
            match shared.stream.next(count) {
                Some(index) => {
                    if !installer.install(shared, index, true, &shared.counters.prefetched)? {
                        return Ok(());
                    }
                }
                // Woken by a run, the end of the prefetch or the server stopping; the timeout
                // only bounds a wake-up that went missing.
                None => std::thread::park_timeout(FOLLOWER_NAP),
            }
        }
    });
}

/// The longest the stream follower sleeps without being woken.
const FOLLOWER_NAP: Duration = Duration::from_millis(100);

/// A working set of at least this many chunks gets a second installer where the host has a
/// second CPU. An eager restore decodes on every core before the guest runs; a lazy one that
/// installed a large working set from one thread took about twice as long to be ready for a
/// guest reading 256 MiB (the decoding, not the guest, was the bottleneck: the guest waits in
/// its faults meanwhile).
const HELPER_MIN_CHUNKS: usize = 32;

/// The working set and where its installers are in it: each takes the next chunk in the
/// recorded order, so with two of them the guest's next chunks still come first.
pub(super) struct WorkingSetPlan {
    order: Vec<u32>,
    /// Per chunk: install its whole 2 MiB block as a huge page (see `install_block`).
    whole: Vec<bool>,
    next: AtomicUsize,
}

impl WorkingSetPlan {
    /// A working set is installed by whole blocks (huge pages) where it covers at least half
    /// of one (a function reading a large buffer), else chunk by chunk (a few scattered chunks:
    /// decoding their whole blocks would delay them). The full prefetch goes chunk by chunk:
    /// measured with ten restored VMs on the host, allocating a huge page per block made a
    /// private restore that read 64 MiB ready in 195 ms instead of 105 ms.
    pub(super) fn new(shared: &Shared, order: Vec<u32>) -> Self {
        let chunks = shared.chunk_count();
        let mut wanted = vec![false; chunks];
        for &index in &order {
            if let Some(w) = wanted.get_mut(index as usize) {
                *w = true;
            }
        }
        // Decided once per block, for the blocks the working set touches: this runs on the
        // restore's path, before the guest does (a check per chunk of every chunk's block cost
        // 0.4 ms for a 384 MiB guest).
        let mut whole = vec![false; chunks];
        let mut decided = vec![false; chunks];
        for &index in &order {
            let index = index as usize;
            if decided.get(index).copied().unwrap_or(true) {
                continue;
            }
            match shared.movable_block(index) {
                Some(block) => {
                    let n = block.len();
                    let dense = wanted
                        .get(block.clone())
                        .is_some_and(|w| 2 * w.iter().filter(|&&x| x).count() >= n);
                    for i in block {
                        if let (Some(d), Some(w)) = (decided.get_mut(i), whole.get_mut(i)) {
                            *d = true;
                            *w = dense;
                        }
                    }
                }
                None => {
                    if let Some(d) = decided.get_mut(index) {
                        *d = true;
                    }
                }
            }
        }
        Self {
            order,
            whole,
            next: AtomicUsize::new(0),
        }
    }

    /// Whether a second installer would pay off here.
    pub(super) fn wants_helper(&self) -> bool {
        self.order.len() >= HELPER_MIN_CHUNKS && vmm_core::config::host_cpus() > 1
    }

    pub(super) fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Per chunk: whether its block goes in whole.
    pub(super) fn whole(&self) -> &[bool] {
        &self.whole
    }
}

/// One installing thread's buffers.
#[derive(Default)]
struct Installer {
    buf: Vec<u8>,
    staging: Option<Staging>,
}

impl Installer {
    /// An installer whose buffers are allocated now, when its thread starts, before the guest
    /// runs (see [`Shared::prepare_thread`]): a chunk buffer and, where whole blocks can move,
    /// the staging huge page's mapping (its pages come with each block).
    fn prepared(shared: &Shared) -> Self {
        let buf = shared.prepare_thread();
        let staging = if shared.can_move() {
            Staging::new()
                .map_err(|e| tracing::debug!(error = %e, "no staging mapping yet"))
                .ok()
        } else {
            None
        };
        Self { buf, staging }
    }

    /// Installs chunk `index` (its whole block with `whole`, where it can be moved as a huge
    /// page); false once the server stops. A chunk is counted in `counter` when claimed,
    /// before it is marked installed, so that once `complete()` holds the counters add up too.
    fn install(
        &mut self,
        shared: &Shared,
        index: usize,
        whole: bool,
        counter: &AtomicU64,
    ) -> Result<bool, PagerError> {
        let claimed = || {
            counter.fetch_add(1, Ordering::Relaxed);
        };
        match shared.install_block(index, whole, &mut self.staging, &mut self.buf, claimed) {
            Ok(Outcome::Installed | Outcome::Skipped) => Ok(true),
            Err(Halt::Stopped) => Ok(false),
            Err(Halt::Failed(e)) => Err(e),
        }
    }
}

/// Installs the working set's chunks this thread takes; false once the server stops.
fn install_working_set(
    shared: &Shared,
    plan: &WorkingSetPlan,
    installer: &mut Installer,
) -> Result<bool, PagerError> {
    loop {
        if let Some(index) = shared.next_urgent() {
            if !install_urgent(shared, index, installer)? {
                return Ok(false);
            }
            continue;
        }
        let at = plan.next.fetch_add(1, Ordering::Relaxed);
        let Some(&index) = plan.order.get(at) else {
            for index in shared.leave_urgent() {
                if !install_urgent(shared, index, installer)? {
                    return Ok(false);
                }
            }
            return Ok(true);
        };
        let index = index as usize;
        let whole = plan.whole.get(index).copied().unwrap_or(false);
        if !installer.install(shared, index, whole, &shared.counters.working_set)? {
            return Ok(false);
        }
    }
}

/// Installs the block a fault handed over (see `shared::urgent`) and wakes all of it.
fn install_urgent(
    shared: &Shared,
    index: usize,
    installer: &mut Installer,
) -> Result<bool, PagerError> {
    let go_on = installer.install(shared, index, true, &shared.counters.working_set)?;
    shared.wake_block(index);
    Ok(go_on)
}

/// Installs `plan`'s working set, then with `prefetch` every other chunk — after the guest's
/// first burst of faults if `after_burst` — and then runs the final accounting: once installs
/// still in flight (this thread's, a helper's, the fault thread's) have finished, every chunk
/// must be installed and the counts must add up.
fn fill_in_background(
    shared: &Shared,
    plan: Option<&WorkingSetPlan>,
    prefetch: bool,
    after_burst: bool,
) -> Result<(), PagerError> {
    // However this ends, a run must not move the thread once it has left (its id may be
    // reused).
    let _leaves = after_burst.then(|| LeavesIdle(&shared.stream));
    let mut installer = Installer::prepared(shared);
    if let Some(plan) = plan {
        if !install_working_set(shared, plan, &mut installer)? {
            return Ok(());
        }
        tracing::debug!(chunks = plan.order.len(), "working set taken");
    }
    if !prefetch || (after_burst && !wait_for_first_burst(shared)) {
        return Ok(());
    }
    // From the top of memory down, chunk by chunk, except while the guest reads in order: then
    // from just ahead of it, by whole blocks where they can go in as huge pages (a guest
    // reading densely is what they are for, as for a dense working set; and a chunk installed
    // alone would leave its block on 4 KiB pages, each one a KVM fault when the guest gets
    // there). Downwards because guests read upwards: a pass going up that got ahead of a guest
    // reading 256 MiB kept it there (the guest read 4 KiB pages, slower than the pass installed
    // them, so it never faulted again and was never followed) and a quarter of those restores
    // were ready in 300–310 ms instead of 130–180. Going down, the pass meets such a read
    // instead of running ahead of it. (Moving whole blocks in this pass avoided that too, but
    // it held blocks a guest was about to read while it assembled them at idle priority: ten
    // private restores in the density bench were ready in 160–200 ms instead of 85–135.)
    // Following the guest is demand and keeps normal priority; the pass down memory is
    // speculation and yields the CPU to everything else (after the burst, when it runs in the
    // background of a guest that has what it needs).
    let count = shared.chunk_count();
    let mut scan = 0;
    let mut priority = Priority::Normal;
    loop {
        let (index, whole) = match shared.stream.next(count) {
            Some(index) => {
                priority.set(Priority::Normal, &shared.stream);
                (index, true)
            }
            None if scan < count => {
                if after_burst {
                    priority.set(Priority::Idle, &shared.stream);
                }
                scan += 1;
                (count - scan, false)
            }
            None => break,
        };
        if !installer.install(shared, index, whole, &shared.counters.prefetched)? {
            return Ok(());
        }
    }
    shared.stream.finish();
    if !shared.settle() {
        return Ok(());
    }
    let stats = shared.check_complete()?;
    tracing::debug!(?stats, "prefetch complete, every chunk accounted for");
    Ok(())
}

/// Unregisters the prefetch thread from being moved back to normal priority when dropped.
struct LeavesIdle<'s>(&'s Stream);

impl Drop for LeavesIdle<'_> {
    fn drop(&mut self) {
        self.0.prefetcher_hurries();
    }
}

/// The calling thread's scheduling class while it installs chunks.
///
/// The full prefetch's pass down memory installs what nobody asked for yet, so it runs at
/// `SCHED_IDLE`: it must not take a CPU from the guest's vCPUs, the fault thread or the VMM's
/// device thread. On this 2-CPU host a prefetch at normal priority sat on one CPU while the
/// test guest's vCPU, which polls, held the other, and the device thread and the host's agent
/// connection waited for a time slice: 4 restores in 20 reached the agent's `Hello`
/// 7–11 ms late (median over 40 restores at 256 MiB 5.6 ms; 4.7 ms with this). Any CPU
/// the others leave idle still runs it. Installs the guest is waiting for (a working set, a
/// guest reading in order) keep normal priority: at idle priority they stalled whenever
/// anything else on the host ran, and a guest reading 256 MiB was ready in 150–420 ms.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Priority {
    Normal,
    Idle,
}

impl Priority {
    /// Moves the calling thread to `to` (Linux schedules threads, so this is per thread). A run
    /// the guest starts moves an idle prefetch back to normal priority from the fault thread
    /// (`Stream::faulted`), so going idle again is checked against `stream`.
    fn set(&mut self, to: Priority, stream: &Stream) {
        let hurried = to == Priority::Idle && !stream.prefetcher_is_idle();
        if *self == to && !hurried {
            return;
        }
        let policy = match to {
            Priority::Normal => libc::SCHED_OTHER,
            Priority::Idle => libc::SCHED_IDLE,
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 names the calling thread, and `param` is a valid sched_param that
        // outlives the call.
        if unsafe { libc::sched_setscheduler(0, policy, &param) } == 0 {
            *self = to;
            match to {
                Priority::Idle => stream.prefetcher_idles(),
                Priority::Normal => stream.prefetcher_hurries(),
            }
        } else {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "the prefetch keeps its scheduling class"
            );
        }
    }
}

/// Installs every chunk still missing from the calling thread (counted as prefetched).
pub(super) fn install_all(shared: &Shared) {
    if let Err(e) = fill_in_background(shared, None, true, false) {
        shared.fail(e);
    }
}

/// Waits until the guest's first burst of faults is over (see `PREFETCH_QUIET`) or the deadline
/// passes; false if the server stops first.
fn wait_for_first_burst(shared: &Shared) -> bool {
    loop {
        if shared.stop.load(Ordering::Acquire) || shared.failed() {
            return false;
        }
        let now = shared.since_start();
        if now >= PREFETCH_DEADLINE {
            return true;
        }
        let faulted = shared.counters.faults.load(Ordering::Relaxed) > 0;
        let idle = !shared.busy.load(Ordering::Acquire)
            && now.saturating_sub(shared.last_fault_activity()) >= PREFETCH_QUIET;
        // A guest reading in order is a burst that does not end: follow it now.
        if (faulted && idle) || shared.stream.streaming() {
            return true;
        }
        std::thread::sleep(BURST_CHECK);
    }
}

//! The driver's side of a split virtqueue (virtio 1.2, section 2.7): a descriptor table, the
//! available ring the driver writes and the used ring the device writes, in memory shared with
//! the device. Addresses handed to the device are the memory's addresses: the test guest
//! identity-maps RAM, so guest-virtual equals guest-physical.
//!
//! Every access to the shared memory is volatile; fences order the driver's ring writes
//! against the device (x86 is TSO, so they cost nothing but keep the compiler honest).

use core::sync::atomic::{Ordering, fence};

/// Most descriptors a queue of this driver has (the device may offer fewer).
pub const QUEUE_MAX: usize = 128;
/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer (otherwise it reads it).
pub const DESC_F_WRITE: u16 = 2;
/// Available-ring flag: the driver does not want interrupts (it polls).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used-ring flag: the device does not need notifications now.
pub const USED_F_NO_NOTIFY: u16 = 1;

/// What every driver needs from the transport under its queues: the vsock driver's
/// (`driver::Transport`) and the block driver's (`block::BlockTransport`) build on it.
pub trait QueueTransport {
    /// Tells the device that queue `queue` has new buffers.
    fn notify(&mut self, queue: u16);
    /// A monotonic clock, in nanoseconds.
    fn now_ns(&mut self) -> u64;
    /// Called while waiting with nothing to do.
    fn idle(&mut self) {
        core::hint::spin_loop();
    }
}

/// A clock for telling a stuck device from a slow one: it follows the transport's clock but
/// advances at most `max_step_ns` between two readings, so time the whole VM spends paused (a
/// snapshot and restore, a long host preemption) does not make a request look stuck.
#[derive(Clone, Copy, Debug)]
pub struct RunClock {
    run_ns: u64,
    last_now: u64,
    max_step_ns: u64,
}

impl RunClock {
    /// A clock at 0 that starts following the transport's clock at `now`.
    pub fn new(now: u64, max_step_ns: u64) -> Self {
        RunClock {
            run_ns: 0,
            last_now: now,
            max_step_ns,
        }
    }

    /// Advances to the transport's time `now`; the run time.
    pub fn tick(&mut self, now: u64) -> u64 {
        self.run_ns += now.saturating_sub(self.last_now).min(self.max_step_ns);
        self.last_now = now;
        self.run_ns
    }
}

/// One descriptor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, align(16))]
pub struct Desc {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u32,
    /// `DESC_F_*`.
    pub flags: u16,
    /// Next descriptor of the chain when `DESC_F_NEXT` is set.
    pub next: u16,
}

/// The available ring (the driver's).
#[repr(C, align(2))]
struct AvailRing {
    flags: u16,
    idx: u16,
    ring: [u16; QUEUE_MAX],
    used_event: u16,
}

/// One used-ring entry: the head of a chain the device finished, and bytes it wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct UsedElem {
    /// Head descriptor index of the chain.
    pub id: u32,
    /// Bytes the device wrote into the chain's device-writable buffers.
    pub len: u32,
}

/// The used ring (the device's).
#[repr(C, align(4))]
struct UsedRing {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QUEUE_MAX],
    avail_event: u16,
}

/// The memory of one queue, shared with the device. Zeroed memory is a valid initial state.
#[repr(C, align(4096))]
pub struct QueueMem {
    desc: [Desc; QUEUE_MAX],
    avail: AvailRing,
    used: UsedRing,
}

/// The driver's handle on one queue.
pub struct Virtqueue {
    mem: *mut QueueMem,
    size: u16,
    /// The available index the driver will publish next.
    next_avail: u16,
    /// The used index up to which the driver has consumed entries.
    last_used: u16,
}

impl Virtqueue {
    /// Takes over `mem` for a queue of `size` descriptors (a power of two, at most
    /// [`QUEUE_MAX`]; anything else is rounded down), clearing it.
    ///
    /// # Safety
    /// `mem` must be valid, suitably aligned memory that nothing but this queue and the device
    /// uses for as long as the queue is used.
    pub unsafe fn new(mem: *mut QueueMem, size: u16) -> Self {
        let size = round_down_pow2(size.min(QUEUE_MAX as u16));
        // SAFETY: the caller gives us `mem` exclusively; all-zero is a valid `QueueMem`.
        unsafe {
            core::ptr::write_bytes(mem, 0, 1);
            core::ptr::write_volatile(&raw mut (*mem).avail.flags, AVAIL_F_NO_INTERRUPT);
        }
        Virtqueue {
            mem,
            size,
            next_avail: 0,
            last_used: 0,
        }
    }

    /// Descriptors in this queue.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self) -> (u64, u64, u64) {
        // SAFETY: only computes field addresses inside `mem`, which is valid (see `new`).
        unsafe {
            (
                (&raw const (*self.mem).desc) as u64,
                (&raw const (*self.mem).avail) as u64,
                (&raw const (*self.mem).used) as u64,
            )
        }
    }

    /// Writes descriptor `index` (ignored if out of range).
    pub fn set_desc(&mut self, index: u16, desc: Desc) {
        if index >= self.size {
            return;
        }
        // SAFETY: `index < size <= QUEUE_MAX`; the descriptor is not in the device's hands
        // (the caller only rewrites descriptors of chains the device has returned).
        unsafe {
            core::ptr::write_volatile(&raw mut (*self.mem).desc[usize::from(index)], desc);
        }
    }

    /// Offers the chain starting at `head` to the device; it sees it after [`Self::publish`].
    pub fn push(&mut self, head: u16) {
        let slot = usize::from(self.next_avail & (self.size - 1));
        // SAFETY: `slot < size <= QUEUE_MAX`; ring slots past the published index belong to
        // the driver.
        unsafe { core::ptr::write_volatile(&raw mut (*self.mem).avail.ring[slot], head) };
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Makes every pushed chain visible to the device.
    pub fn publish(&mut self) {
        // The descriptors and ring entries must be visible before the index that exposes them.
        fence(Ordering::Release);
        // SAFETY: the available index is the driver's to write.
        unsafe { core::ptr::write_volatile(&raw mut (*self.mem).avail.idx, self.next_avail) };
    }

    /// Publishes what was pushed and notifies the device as queue `index` if it wants to be.
    pub fn kick(&mut self, t: &mut impl QueueTransport, index: u16) {
        self.publish();
        if self.notify_needed() {
            t.notify(index);
        }
    }

    /// Whether the device wants a notification for what was just published.
    pub fn notify_needed(&self) -> bool {
        // The index store must be globally visible before the flag is read (a store-load
        // ordering, the one thing x86 reorders).
        fence(Ordering::SeqCst);
        // SAFETY: reading the device's flags field of valid shared memory.
        let flags = unsafe { core::ptr::read_volatile(&raw const (*self.mem).used.flags) };
        flags & USED_F_NO_NOTIFY == 0
    }

    /// The next chain the device has finished with, if any.
    pub fn pop_used(&mut self) -> Option<UsedElem> {
        // SAFETY: reading the device's index field of valid shared memory.
        let idx = unsafe { core::ptr::read_volatile(&raw const (*self.mem).used.idx) };
        if idx == self.last_used {
            return None;
        }
        // The entry (and the buffers it names) must be read after the index that exposed it.
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used & (self.size - 1));
        // SAFETY: `slot < size <= QUEUE_MAX`; the device wrote this entry before the index.
        let elem = unsafe { core::ptr::read_volatile(&raw const (*self.mem).used.ring[slot]) };
        self.last_used = self.last_used.wrapping_add(1);
        Some(elem)
    }

    /// Chains published and not yet returned.
    pub fn outstanding(&self) -> u16 {
        self.next_avail.wrapping_sub(self.last_used)
    }
}

fn round_down_pow2(n: u16) -> u16 {
    if n == 0 {
        0
    } else {
        1 << (15 - n.leading_zeros())
    }
}

/// What a device does with the queue memory: the test's side of the contract.
#[cfg(test)]
pub mod device {
    use super::*;

    /// A device's view of one queue.
    pub struct DeviceQueue {
        mem: *mut QueueMem,
        size: u16,
        next_avail: u16,
        used_idx: u16,
    }

    impl DeviceQueue {
        /// The device's view of `q`.
        pub fn of(q: &Virtqueue) -> Self {
            Self::new(q.mem, q.size)
        }

        /// The device's view of the queue in `mem` with `size` descriptors.
        pub fn new(mem: *mut QueueMem, size: u16) -> Self {
            DeviceQueue {
                mem,
                size,
                next_avail: 0,
                used_idx: 0,
            }
        }

        /// The next chain the driver made available: its descriptors, in order.
        pub fn pop_avail(&mut self) -> Option<(u16, Vec<Desc>)> {
            // SAFETY: the test keeps the queue memory alive; reads are volatile.
            unsafe {
                let idx = core::ptr::read_volatile(&raw const (*self.mem).avail.idx);
                if idx == self.next_avail {
                    return None;
                }
                let slot = usize::from(self.next_avail & (self.size - 1));
                let head = core::ptr::read_volatile(&raw const (*self.mem).avail.ring[slot]);
                self.next_avail = self.next_avail.wrapping_add(1);
                let mut chain = Vec::new();
                let mut i = head;
                loop {
                    let d = core::ptr::read_volatile(&raw const (*self.mem).desc[usize::from(i)]);
                    chain.push(d);
                    if d.flags & DESC_F_NEXT == 0 || chain.len() > usize::from(self.size) {
                        break;
                    }
                    i = d.next;
                }
                Some((head, chain))
            }
        }

        /// Returns chain `head` with `len` bytes written.
        pub fn push_used(&mut self, head: u16, len: u32) {
            let slot = usize::from(self.used_idx & (self.size - 1));
            self.used_idx = self.used_idx.wrapping_add(1);
            // SAFETY: as for `pop_avail`.
            unsafe {
                let elem = UsedElem {
                    id: u32::from(head),
                    len,
                };
                core::ptr::write_volatile(&raw mut (*self.mem).used.ring[slot], elem);
                fence(Ordering::Release);
                core::ptr::write_volatile(&raw mut (*self.mem).used.idx, self.used_idx);
            }
        }

        /// Sets or clears `USED_F_NO_NOTIFY`.
        pub fn set_no_notify(&mut self, on: bool) {
            // SAFETY: as for `pop_avail`.
            unsafe { core::ptr::write_volatile(&raw mut (*self.mem).used.flags, u16::from(on)) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::device::DeviceQueue;
    use super::*;

    fn queue(size: u16) -> Virtqueue {
        let mem = Box::into_raw(Box::new(QueueMem {
            desc: [Desc::default(); QUEUE_MAX],
            avail: AvailRing {
                flags: 0,
                idx: 0,
                ring: [0; QUEUE_MAX],
                used_event: 0,
            },
            used: UsedRing {
                flags: 0,
                idx: 0,
                ring: [UsedElem::default(); QUEUE_MAX],
                avail_event: 0,
            },
        }));
        // SAFETY: a fresh, leaked allocation used by this queue only.
        unsafe { Virtqueue::new(mem, size) }
    }

    #[test]
    fn layout_matches_the_spec() {
        assert_eq!(core::mem::size_of::<Desc>(), 16);
        assert_eq!(core::mem::size_of::<UsedElem>(), 8);
        let q = queue(128);
        let (desc, avail, used) = q.addresses();
        assert_eq!(desc % 16, 0);
        assert_eq!(avail, desc + 16 * QUEUE_MAX as u64);
        assert_eq!(used % 4, 0);
        assert!(used >= avail + 4 + 2 * QUEUE_MAX as u64 + 2);
        assert_eq!(round_down_pow2(100), 64);
        assert_eq!(queue(1000).size(), 128);
        assert_eq!(queue(3).size(), 2);
    }

    #[test]
    fn chains_go_round_and_come_back_across_index_wrap() {
        let mut q = queue(4);
        let mut dev = DeviceQueue::of(&q);
        assert!(q.pop_used().is_none());
        for round in 0..70_000u32 {
            let head = (round % 2 * 2) as u16;
            q.set_desc(
                head,
                Desc {
                    addr: u64::from(round),
                    len: 1,
                    flags: DESC_F_NEXT,
                    next: head + 1,
                },
            );
            q.set_desc(
                head + 1,
                Desc {
                    addr: 7,
                    len: 2,
                    flags: DESC_F_WRITE,
                    next: 0,
                },
            );
            q.push(head);
            q.publish();
            assert_eq!(q.outstanding(), 1);
            let (h, chain) = dev.pop_avail().unwrap();
            assert_eq!((h, chain.len(), chain[0].addr), (head, 2, u64::from(round)));
            dev.push_used(h, 2);
            assert_eq!(
                q.pop_used(),
                Some(UsedElem {
                    id: h.into(),
                    len: 2
                })
            );
            assert_eq!(q.outstanding(), 0);
        }
        assert!(q.notify_needed());
        dev.set_no_notify(true);
        assert!(!q.notify_needed());
        q.set_desc(4, Desc::default()); // out of range: ignored
    }

    #[test]
    fn the_run_clock_skips_long_gaps() {
        let mut clock = RunClock::new(1_000, 10);
        assert_eq!(clock.tick(1_004), 4);
        assert_eq!(clock.tick(9_999_999), 14); // a paused VM: counted as one step
        assert_eq!(clock.tick(10_000_002), 17);
        assert_eq!(clock.tick(5), 17); // a clock that went back counts nothing
    }
}

//! A polling virtio-block driver (virtio 1.2, section 5.2) over one split request queue. No
//! interrupts: every call submits its requests, notifies the device once per batch and polls the
//! used ring until all of them are back. The transport (virtio-mmio in the guest, a simulated
//! disk in tests) notifies the queue, tells the time and can reset the device.
//!
//! A request is three descriptors, as the specification lays it out: a 16-byte header the device
//! reads (type, reserved, sector), the data (the device writes it for a read, reads it for a
//! write; none for a flush), and one status byte the device writes last. Data descriptors point
//! straight into the caller's buffer (zero copy: the guest maps memory 1:1), so every call
//! returns only once the device has given back every buffer it was handed, or has been reset.
//!
//! Reads and writes are cut into requests of at most [`MAX_REQUEST_BYTES`], up to [`SLOTS`] of
//! them in flight at once, so a large transfer costs one notification per batch rather than one
//! per request. The driver does not check requests against the disk's capacity or read-only
//! flag: the device must refuse what is wrong, and the test guest sends such requests on
//! purpose to see it do so (virtio says a driver must not write to a read-only disk; this one
//! is a test).

use core::fmt;

use crate::virtq::{
    DESC_F_NEXT, DESC_F_WRITE, Desc, QUEUE_MAX, QueueMem, QueueTransport, RunClock, Virtqueue,
};

pub mod check;

/// virtio device id of a block device.
pub const DEVICE_ID: u32 = 2;
/// The unit of a request's sector and of the disk's capacity.
pub const SECTOR_SIZE: usize = 512;
/// Bytes of a disk's id (`VIRTIO_BLK_T_GET_ID`); a shorter id is padded with NULs.
pub const ID_BYTES: usize = 20;
/// Feature bit: the disk is read-only.
pub const F_RO: u64 = 1 << 5;
/// Feature bit: the device takes flush requests.
pub const F_FLUSH: u64 = 1 << 9;
/// The features the driver accepts when the device offers them (besides `VIRTIO_F_VERSION_1`,
/// which it requires). Not `SEG_MAX` and the like: a request has one data descriptor.
pub const FEATURES: u64 = F_RO | F_FLUSH;

/// Request types.
pub mod kind {
    /// Read sectors.
    pub const IN: u32 = 0;
    /// Write sectors.
    pub const OUT: u32 = 1;
    /// Make written sectors durable.
    pub const FLUSH: u32 = 4;
    /// Read the disk's id.
    pub const GET_ID: u32 = 8;
}

/// Status bytes.
pub mod status {
    /// Done.
    pub const OK: u8 = 0;
    /// Refused or failed.
    pub const IOERR: u8 = 1;
    /// An unsupported request type.
    pub const UNSUPP: u8 = 2;
}

/// Most data bytes in one request: small enough for any device (Thaw's takes up to 1 MiB) and
/// for the queue to keep many in flight, large enough that a MiB is a handful of requests.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Requests in flight at most: three descriptors each.
pub const SLOTS: usize = QUEUE_MAX / 3;
/// Fewest descriptors the queue must offer: one request (rounded to a power of two).
pub const MIN_QUEUE: u16 = 4;
/// A request the device has not answered after this long means the device is stuck. Generous:
/// a flush is an `fsync` of the host's image, which a busy host can take seconds over. Measured
/// on a clock that advances at most `MAX_TICK_NS` between two readings (see [`RunClock`]).
pub const STALL_NS: u64 = 20_000_000_000;
/// Largest step of the stall clock.
const MAX_TICK_NS: u64 = 10_000_000;
const HEADER_LEN: usize = 16;
/// What a status byte holds until the device writes it: no status virtio defines.
const NO_STATUS: u8 = 0xff;

/// The memory the driver shares with the device. All zeroes is a valid initial value, so a
/// `static` of it lives in .bss.
#[repr(C, align(4096))]
pub struct BlockMemory {
    queue: QueueMem,
    headers: [[u8; HEADER_LEN]; SLOTS],
    status: [u8; SLOTS],
}

/// What the block driver needs from the transport.
pub trait BlockTransport: QueueTransport {
    /// Resets the device (status 0, until it reads back 0), after which it touches none of the
    /// buffers it was given.
    fn reset_device(&mut self);
}

/// Why a driver call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The device answered `VIRTIO_BLK_S_IOERR` to the request starting at `sector`: outside
    /// the disk, a write to a read-only disk, or an I/O error on the host.
    IoErr {
        /// The request's first sector.
        sector: u64,
    },
    /// The device answered `VIRTIO_BLK_S_UNSUPP`.
    Unsupported {
        /// The request's first sector.
        sector: u64,
    },
    /// The device answered with a status virtio does not define.
    BadStatus {
        /// The request's first sector.
        sector: u64,
        /// What it answered.
        status: u8,
    },
    /// The device gave the request back without writing its status.
    NoStatus {
        /// The request's first sector.
        sector: u64,
    },
    /// The buffer is not whole sectors.
    NotWholeSectors {
        /// Its length.
        len: usize,
    },
    /// The sectors run past the last one a `u64` can name.
    SectorOverflow {
        /// The first sector.
        sector: u64,
    },
    /// A flush, and the device did not offer `VIRTIO_BLK_F_FLUSH`.
    FlushNotOffered,
    /// A request went unanswered for [`STALL_NS`]: the device was reset and the driver is out
    /// of service.
    Stalled,
    /// An earlier stall put the driver out of service.
    OutOfService,
    /// The device's queue is smaller than [`MIN_QUEUE`].
    QueueTooSmall,
}

impl Error {
    /// The first sector of the request the device refused, for errors that are the device's
    /// answer to one request.
    fn answered_sector(&self) -> Option<u64> {
        match *self {
            Error::IoErr { sector }
            | Error::Unsupported { sector }
            | Error::BadStatus { sector, .. }
            | Error::NoStatus { sector } => Some(sector),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::IoErr { sector } => write!(f, "IOERR at sector {sector}"),
            Error::Unsupported { sector } => write!(f, "UNSUPP at sector {sector}"),
            Error::BadStatus { sector, status } => {
                write!(f, "undefined status {status:#x} at sector {sector}")
            }
            Error::NoStatus { sector } => {
                write!(
                    f,
                    "the request at sector {sector} came back without a status"
                )
            }
            Error::NotWholeSectors { len } => {
                write!(f, "{len} bytes is not whole {SECTOR_SIZE}-byte sectors")
            }
            Error::SectorOverflow { sector } => {
                write!(f, "the sectors from {sector} run past the last sector")
            }
            Error::FlushNotOffered => write!(f, "the device does not offer flush"),
            Error::Stalled => write!(f, "the device stalled and was reset"),
            Error::OutOfService => write!(f, "the driver is out of service after a stall"),
            Error::QueueTooSmall => write!(f, "the request queue is too small"),
        }
    }
}

/// Counters, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Requests sent.
    pub requests: u64,
    /// Used entries naming a chain the driver never offered (or already had back).
    pub bad_used: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Free,
    /// In the device's hands since the given time (stall clock).
    Busy {
        since: u64,
        sector: u64,
    },
}

/// One request to send.
#[derive(Clone, Copy, Debug)]
struct Request {
    kind: u32,
    sector: u64,
    /// The data buffer: address, length, and whether the device writes it.
    data: Option<(u64, u32, bool)>,
}

/// The driver.
pub struct BlockDriver<T: BlockTransport> {
    t: T,
    mem: *mut BlockMemory,
    queue: Virtqueue,
    slots: [Slot; SLOTS],
    slot_count: usize,
    features: u64,
    capacity_sectors: u64,
    clock: RunClock,
    out_of_service: bool,
    /// Counters.
    pub stats: BlockStats,
}

impl<T: BlockTransport> BlockDriver<T> {
    /// Sets up the request queue in `mem` with `queue_size` descriptors (rounded down to a power
    /// of two) for a device that negotiated `features` and said it holds `capacity_sectors`.
    /// The caller then tells the device the queue's addresses and sets DRIVER_OK.
    ///
    /// # Safety
    /// `mem` must be valid memory that only this driver and the device use from now on.
    pub unsafe fn new(
        mut t: T,
        mem: *mut BlockMemory,
        queue_size: u16,
        features: u64,
        capacity_sectors: u64,
    ) -> Result<Self, Error> {
        if queue_size < MIN_QUEUE {
            return Err(Error::QueueTooSmall);
        }
        // SAFETY: the queue memory is part of `mem`, which the caller hands over.
        let queue = unsafe { Virtqueue::new(&raw mut (*mem).queue, queue_size) };
        let slot_count = usize::from(queue.size() / 3).min(SLOTS);
        let clock = RunClock::new(t.now_ns(), MAX_TICK_NS);
        Ok(BlockDriver {
            t,
            mem,
            queue,
            slots: [Slot::Free; SLOTS],
            slot_count,
            features,
            capacity_sectors,
            clock,
            out_of_service: false,
            stats: BlockStats::default(),
        })
    }

    /// The request queue's descriptor table, available ring and used ring addresses.
    pub fn queue_addresses(&self) -> (u64, u64, u64) {
        self.queue.addresses()
    }

    /// Descriptors in the request queue.
    pub fn queue_size(&self) -> u16 {
        self.queue.size()
    }

    /// Requests the driver keeps in flight at most.
    pub fn slots(&self) -> usize {
        self.slot_count
    }

    /// The disk's size in sectors, as the device's config space said.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// The features negotiated (besides `VIRTIO_F_VERSION_1`).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether the device said the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.features & F_RO != 0
    }

    /// The transport.
    pub fn transport(&mut self) -> &mut T {
        &mut self.t
    }

    /// Reads the sectors from `sector` into `buf` (whole sectors).
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.transfer(kind::IN, sector, buf.as_mut_ptr() as u64, buf.len(), true)
    }

    /// Writes `buf` (whole sectors) to the sectors from `sector`.
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), Error> {
        self.transfer(kind::OUT, sector, buf.as_ptr() as u64, buf.len(), false)
    }

    /// Asks the device to make what was written durable.
    pub fn flush(&mut self) -> Result<(), Error> {
        if self.features & F_FLUSH == 0 {
            return Err(Error::FlushNotOffered);
        }
        let mut once = Some(Request {
            kind: kind::FLUSH,
            sector: 0,
            data: None,
        });
        self.run(|| once.take())
    }

    /// The disk's id: [`ID_BYTES`] bytes, NUL-padded when shorter (see [`id_bytes`]).
    pub fn get_id(&mut self) -> Result<[u8; ID_BYTES], Error> {
        let mut id = [0u8; ID_BYTES];
        let mut once = Some(Request {
            kind: kind::GET_ID,
            sector: 0,
            data: Some((id.as_mut_ptr() as u64, ID_BYTES as u32, true)),
        });
        self.run(|| once.take())?;
        Ok(id)
    }

    /// Reads or writes `len` bytes at `addr` from `sector`, a request per
    /// [`MAX_REQUEST_BYTES`].
    fn transfer(
        &mut self,
        kind: u32,
        sector: u64,
        addr: u64,
        len: usize,
        device_writes: bool,
    ) -> Result<(), Error> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(Error::NotWholeSectors { len });
        }
        if sector.checked_add((len / SECTOR_SIZE) as u64).is_none() {
            return Err(Error::SectorOverflow { sector });
        }
        let mut offset = 0;
        self.run(|| {
            if offset >= len {
                return None;
            }
            let n = (len - offset).min(MAX_REQUEST_BYTES);
            let r = Request {
                kind,
                sector: sector + (offset / SECTOR_SIZE) as u64,
                data: Some((addr + offset as u64, n as u32, device_writes)),
            };
            offset += n;
            Some(r)
        })
    }

    /// Sends the requests `next` yields, as many at a time as there are slots, and waits until
    /// every one sent is back. Once one fails no more are sent; the error is the failed request
    /// with the lowest sector.
    fn run(&mut self, mut next: impl FnMut() -> Option<Request>) -> Result<(), Error> {
        if self.out_of_service {
            return Err(Error::OutOfService);
        }
        let mut failed: Option<Error> = None;
        let mut pending = next();
        loop {
            let mut submitted = false;
            while failed.is_none() {
                let (Some(r), Some(s)) = (pending, self.free_slot()) else {
                    break;
                };
                self.submit(s, r);
                submitted = true;
                pending = next();
            }
            if submitted {
                self.queue.kick(&mut self.t, 0);
            }
            let busy = self.slots.iter().any(|s| *s != Slot::Free);
            if !busy && (pending.is_none() || failed.is_some()) {
                return failed.map_or(Ok(()), Err);
            }
            if self.reap(&mut failed) {
                continue;
            }
            if self.stalled() {
                // The device still holds buffers that may be the caller's: only a reset makes
                // it let go of them before this call returns.
                self.t.reset_device();
                self.slots = [Slot::Free; SLOTS];
                self.out_of_service = true;
                return Err(Error::Stalled);
            }
            self.t.idle();
        }
    }

    fn free_slot(&self) -> Option<usize> {
        self.slots[..self.slot_count]
            .iter()
            .position(|s| *s == Slot::Free)
    }

    /// Puts request `r` in slot `s` (descriptors `3s`, `3s + 1`, `3s + 2`); not yet published.
    fn submit(&mut self, s: usize, r: Request) {
        let since = self.clock.tick(self.t.now_ns());
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&r.kind.to_le_bytes());
        header[8..].copy_from_slice(&r.sector.to_le_bytes());
        // SAFETY: slot `s` is free, so the device does not hold its header or status byte;
        // both lie inside `mem`, which outlives the driver.
        let (header_addr, status_addr) = unsafe {
            let m = self.mem;
            core::ptr::write_volatile(&raw mut (*m).headers[s], header);
            core::ptr::write_volatile(&raw mut (*m).status[s], NO_STATUS);
            (
                (&raw const (*m).headers[s]) as u64,
                (&raw const (*m).status[s]) as u64,
            )
        };
        let head = (3 * s) as u16;
        self.queue.set_desc(
            head,
            Desc {
                addr: header_addr,
                len: HEADER_LEN as u32,
                flags: DESC_F_NEXT,
                next: head + 1,
            },
        );
        let mut status_desc = head + 1;
        if let Some((addr, len, device_writes)) = r.data {
            let write = if device_writes { DESC_F_WRITE } else { 0 };
            self.queue.set_desc(
                head + 1,
                Desc {
                    addr,
                    len,
                    flags: DESC_F_NEXT | write,
                    next: head + 2,
                },
            );
            status_desc = head + 2;
        }
        self.queue.set_desc(
            status_desc,
            Desc {
                addr: status_addr,
                len: 1,
                flags: DESC_F_WRITE,
                next: 0,
            },
        );
        self.queue.push(head);
        self.slots[s] = Slot::Busy {
            since,
            sector: r.sector,
        };
        self.stats.requests += 1;
    }

    /// Takes every answered request off the used ring, keeping in `failed` the failure with the
    /// lowest sector; true if anything came back.
    fn reap(&mut self, failed: &mut Option<Error>) -> bool {
        let mut progress = false;
        while let Some(u) = self.queue.pop_used() {
            progress = true;
            let s = (u.id / 3) as usize;
            let Some(Slot::Busy { sector, .. }) = self.slots[..self.slot_count].get(s).copied()
            else {
                self.stats.bad_used += 1;
                continue;
            };
            if u.id % 3 != 0 {
                self.stats.bad_used += 1;
                continue;
            }
            self.slots[s] = Slot::Free;
            // SAFETY: the device gave slot `s` back, so its status byte is the driver's again.
            let answer = unsafe { core::ptr::read_volatile(&raw const (*self.mem).status[s]) };
            let error = match answer {
                status::OK => continue,
                status::IOERR => Error::IoErr { sector },
                status::UNSUPP => Error::Unsupported { sector },
                NO_STATUS => Error::NoStatus { sector },
                other => Error::BadStatus {
                    sector,
                    status: other,
                },
            };
            let earlier = match failed.and_then(|f| f.answered_sector()) {
                Some(first) => sector < first,
                None => true,
            };
            if earlier {
                *failed = Some(error);
            }
        }
        progress
    }

    /// Whether a request has been in the device's hands for longer than [`STALL_NS`].
    fn stalled(&mut self) -> bool {
        let now = self.clock.tick(self.t.now_ns());
        self.slots.iter().any(|s| match s {
            Slot::Busy { since, .. } => now.saturating_sub(*since) > STALL_NS,
            Slot::Free => false,
        })
    }
}

/// A disk id's bytes without the NUL padding.
pub fn id_bytes(id: &[u8; ID_BYTES]) -> &[u8] {
    let end = id.iter().position(|b| *b == 0).unwrap_or(ID_BYTES);
    &id[..end]
}

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

//! A simulated virtio-block device over a byte vector, for testing the driver on the host: it
//! reads the request queue as a device would, checks each request as Thaw's device does (inside
//! the disk, whole sectors, no writes to a read-only disk), and can misbehave on request.
//! Descriptor addresses are host pointers here; absurd ones are refused instead of followed.

use super::{BlockMemory, BlockTransport, HEADER_LEN, ID_BYTES, SECTOR_SIZE, kind, status};
use crate::virtq::device::DeviceQueue;
use crate::virtq::{DESC_F_WRITE, Desc, QueueTransport};

/// The simulated device.
pub struct FakeDisk {
    queue: DeviceQueue,
    /// The disk's bytes.
    pub data: Vec<u8>,
    /// Whether the device refuses writes.
    pub read_only: bool,
    /// What `GET_ID` answers.
    pub id: [u8; ID_BYTES],
    /// While set, requests are taken but never answered.
    pub stall: bool,
    /// Answer the requests taken in one step last first.
    pub reverse: bool,
    /// Give requests back without writing their status.
    pub drop_status: bool,
    /// The status to answer instead of the right one.
    pub force_status: Option<u8>,
    /// Before answering, put a used entry naming a chain never offered.
    pub bogus_used: bool,
    /// Every request seen: type, sector, data bytes.
    pub requests: Vec<(u32, u64, usize)>,
    /// Flush requests answered.
    pub flushes: u32,
    /// Notifications received.
    pub notifies: u32,
    /// Device resets.
    pub resets: u32,
    /// Most requests taken in one step (how many the driver had in flight at once).
    pub most_at_once: usize,
    /// Fake clock, advanced `tick` per reading.
    pub clock: u64,
    /// Nanoseconds per clock reading.
    pub tick: u64,
}

fn valid(d: &Desc) -> bool {
    d.addr >= 0x1_0000 && d.addr < 0x7fff_0000_0000
}

impl FakeDisk {
    /// A device over the driver memory `mem` with a queue of `size` (a power of two) and the
    /// disk `data`.
    pub fn new(mem: *mut BlockMemory, size: u16, data: Vec<u8>) -> Self {
        // SAFETY: only computes the address of the queue memory.
        let queue = DeviceQueue::new(unsafe { &raw mut (*mem).queue }, size);
        let mut id = [0u8; ID_BYTES];
        id[..9].copy_from_slice(b"fake-disk");
        FakeDisk {
            queue,
            data,
            read_only: false,
            id,
            stall: false,
            reverse: false,
            drop_status: false,
            force_status: None,
            bogus_used: false,
            requests: Vec::new(),
            flushes: 0,
            notifies: 0,
            resets: 0,
            most_at_once: 0,
            clock: 0,
            tick: 1000,
        }
    }

    /// Takes every request the driver made available and answers them (unless stalled).
    pub fn step(&mut self) {
        if self.stall {
            return;
        }
        let mut taken = Vec::new();
        while let Some(chain) = self.queue.pop_avail() {
            taken.push(chain);
        }
        self.most_at_once = self.most_at_once.max(taken.len());
        if self.reverse {
            taken.reverse();
        }
        if self.bogus_used && !taken.is_empty() {
            self.queue.push_used(1, 1);
        }
        for (head, chain) in taken {
            let len = self.serve(&chain);
            self.queue.push_used(head, len);
        }
    }

    /// Serves one chain; the bytes written into it.
    fn serve(&mut self, chain: &[Desc]) -> u32 {
        assert!(
            chain.iter().all(valid),
            "descriptor outside memory: {chain:?}"
        );
        let (first, rest) = chain.split_first().expect("a chain has a descriptor");
        let (last, data) = rest
            .split_last()
            .expect("a request has a status descriptor");
        assert_eq!(first.len as usize, HEADER_LEN);
        assert_eq!(
            first.flags & DESC_F_WRITE,
            0,
            "the header is the device's to read"
        );
        assert_eq!((last.len, last.flags & DESC_F_WRITE), (1, DESC_F_WRITE));
        assert!(
            data.len() <= 1,
            "one data descriptor per request: {chain:?}"
        );
        // SAFETY: the driver under test points descriptors at live host memory.
        let header = unsafe { std::slice::from_raw_parts(first.addr as *const u8, HEADER_LEN) };
        let kind = u32::from_le_bytes(header[..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..].try_into().unwrap());
        let data = data.first().copied();
        let len = data.map_or(0, |d| d.len as usize);
        self.requests.push((kind, sector, len));
        let in_disk = len.is_multiple_of(SECTOR_SIZE)
            && (sector as usize)
                .checked_mul(SECTOR_SIZE)
                .and_then(|start| start.checked_add(len))
                .is_some_and(|end| end <= self.data.len());
        let start = (sector as usize).wrapping_mul(SECTOR_SIZE);
        let (answer, written) = match (kind, data) {
            (kind::IN, Some(d)) if d.flags & DESC_F_WRITE != 0 && in_disk => {
                // SAFETY: as above; the driver gave a buffer of `len` bytes to write.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.data[start..].as_ptr(),
                        d.addr as *mut u8,
                        len,
                    )
                };
                (status::OK, len)
            }
            (kind::OUT, Some(d)) if d.flags & DESC_F_WRITE == 0 && in_disk && !self.read_only => {
                // SAFETY: as above; the driver gave `len` bytes to read.
                let bytes = unsafe { std::slice::from_raw_parts(d.addr as *const u8, len) };
                self.data[start..start + len].copy_from_slice(bytes);
                (status::OK, 0)
            }
            (kind::FLUSH, None) => {
                self.flushes += 1;
                (status::OK, 0)
            }
            (kind::GET_ID, Some(d)) if d.flags & DESC_F_WRITE != 0 => {
                let n = len.min(ID_BYTES);
                // SAFETY: as above.
                unsafe { std::ptr::copy_nonoverlapping(self.id.as_ptr(), d.addr as *mut u8, n) };
                (status::OK, n)
            }
            (kind::IN | kind::OUT | kind::FLUSH | kind::GET_ID, _) => (status::IOERR, 0),
            _ => (status::UNSUPP, 0),
        };
        if self.drop_status {
            return 0;
        }
        let answer = self.force_status.unwrap_or(answer);
        // SAFETY: as above: the status descriptor is one writable byte.
        unsafe { *(last.addr as *mut u8) = answer };
        written as u32 + 1
    }
}

impl QueueTransport for FakeDisk {
    fn notify(&mut self, queue: u16) {
        assert_eq!(queue, 0, "a block device has one queue");
        self.notifies += 1;
        self.step();
    }

    fn now_ns(&mut self) -> u64 {
        self.clock += self.tick;
        self.clock
    }

    fn idle(&mut self) {
        self.step();
    }
}

impl BlockTransport for FakeDisk {
    fn reset_device(&mut self) {
        self.resets += 1;
        // A reset device forgets its queue: nothing taken is ever answered.
        self.stall = true;
    }
}

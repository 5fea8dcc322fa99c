//! virtio-block (virtio 1.2, section 5.2) over a host file: the guest's code disk (read-only)
//! or its `/tmp` (writable), one request queue, served on the VMM thread.
//!
//! Requests are read, written, flushed and identified as the specification lays them out: a
//! 16-byte header the device reads (type, reserved, sector), the data (read by the device for a
//! write, written by it for a read) and one status byte the device writes last. Every request
//! is checked before the disk is touched: its sectors lie inside the disk, its data is whole
//! sectors and at most [`MAX_REQUEST_BYTES`], a write to a read-only disk is refused. A request
//! that fails a check or whose I/O fails gets `VIRTIO_BLK_S_IOERR`; an unknown type gets
//! `VIRTIO_BLK_S_UNSUPP`; a chain with no byte for the status cannot be answered and is
//! returned unused (length 0). A guest cannot make the device read or write outside its disk,
//! nor make it allocate more than one request's bounded buffer.
//!
//! The bytes come from a [`Disk`]: a file as it is, or a shared base with this environment's
//! writes kept in its own overlay (`disk`).

pub mod disk;
pub mod persist;

pub use disk::{CowDisk, Disk, RawDisk};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};

use super::virtio::{ActivateError, DeviceContext, VIRTIO_F_VERSION_1, VirtioDevice};
use crate::memory::GuestMemory;

/// The virtio device id of a block device.
pub const BLOCK_DEVICE_ID: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// The unit of `sector` and of the disk's capacity, whatever the disk's own block size.
pub const SECTOR_SIZE: u64 = 512;
/// Descriptors in the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data descriptors per request the guest may use (`seg_max`): a request is a header, its data
/// and a status, so its chain fits the queue.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The largest request's data: 1 MiB, what Linux sends at most with its default
/// `max_sectors_kb` of 1280 rounded to what the queue's segments hold in 4 KiB pages. Bigger
/// requests are refused, so one request's buffer is bounded.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Requests served per notification before the queue yields to the rest of the VMM.
const PROCESS_BUDGET: usize = 256;
/// The request header's length.
const HEADER_LEN: usize = 16;

/// A disk could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Its size is not whole sectors.
    #[error("the disk image is {len} bytes, not a multiple of {SECTOR_SIZE}")]
    NotWholeSectors {
        /// Its length.
        len: u64,
    },
    /// It is empty.
    #[error("the disk image is empty")]
    Empty,
    /// It could not be opened.
    #[error("cannot open the disk image")]
    Open(#[source] std::io::Error),
    /// Its id is longer than the device can report.
    #[error("a disk id is at most {VIRTIO_BLK_ID_BYTES} bytes, not {len}")]
    IdTooLong {
        /// Its length.
        len: usize,
    },
}

/// What requests did, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Requests answered OK, by kind, and the bytes read and written.
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    /// Requests answered with an error status, or returned unanswered.
    pub refused: u64,
}

/// A virtio-block device over a [`Disk`].
pub struct BlockDevice {
    disk: Box<dyn Disk>,
    read_only: bool,
    capacity_sectors: u64,
    /// Reported by `VIRTIO_BLK_T_GET_ID` (Linux shows it as the disk's serial).
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// One request's data.
    buf: Vec<u8>,
    stats: BlockStats,
}

impl std::fmt::Debug for BlockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDevice")
            .field("read_only", &self.read_only)
            .field("capacity_sectors", &self.capacity_sectors)
            .finish_non_exhaustive()
    }
}

/// Why a request got an error status.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("sectors {sector}.. ({len} bytes) lie outside the disk ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        len: usize,
        capacity: u64,
    },
    #[error("{len} bytes of data is not whole sectors")]
    NotWholeSectors { len: usize },
    #[error("{len} bytes of data is more than a request may carry ({MAX_REQUEST_BYTES})")]
    TooLarge { len: usize },
    #[error("a write to a read-only disk")]
    ReadOnly,
    #[error("the disk: {0}")]
    Io(#[source] std::io::Error),
    #[error("guest memory: {0}")]
    Memory(String),
}

impl BlockDevice {
    /// A device over `disk`, whose length (whole sectors, not empty) is the disk's capacity;
    /// `read_only` refuses the guest's writes and tells it so (`VIRTIO_BLK_F_RO`). `id` is the
    /// serial the guest reads (at most 20 bytes).
    pub fn new(disk: Box<dyn Disk>, read_only: bool, id: &str) -> Result<Self, BlockError> {
        let len = disk.size();
        if len == 0 {
            return Err(BlockError::Empty);
        }
        if len % SECTOR_SIZE != 0 {
            return Err(BlockError::NotWholeSectors { len });
        }
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let bytes = id.as_bytes();
        if bytes.len() > serial.len() {
            return Err(BlockError::IdTooLong { len: bytes.len() });
        }
        serial[..bytes.len()].copy_from_slice(bytes);
        Ok(Self {
            disk,
            read_only,
            capacity_sectors: len / SECTOR_SIZE,
            id: serial,
            buf: Vec::new(),
            stats: BlockStats::default(),
        })
    }

    /// The device for a machine's disk as configured: its file opened read-only or for
    /// reading and writing, used in place.
    pub fn open(config: &crate::config::DiskConfig) -> Result<Self, BlockError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&config.path)
            .map_err(BlockError::Open)?;
        let disk = RawDisk::new(file).map_err(BlockError::Open)?;
        Self::new(Box::new(disk), config.read_only, &config.id)
    }

    /// The disk's size in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// What requests did so far.
    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    /// The config space (virtio 1.2, 5.2.4) up to `blk_size`: capacity, size_max (not
    /// offered), seg_max, geometry (not offered), blk_size (not offered).
    fn config_space(&self) -> [u8; 24] {
        let mut config = [0u8; 24];
        config[..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config
    }

    /// Serves one request; returns the bytes written into the chain, for the used ring.
    fn serve(&mut self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
        let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
            (Ok(r), Ok(w)) => (r, w),
            _ => {
                self.stats.refused += 1;
                return 0;
            }
        };
        // The status is the chain's last device-writable byte; what precedes it is the data a
        // read fills.
        let writable = writer.available_bytes();
        let Some(data_len) = writable.checked_sub(1) else {
            tracing::debug!("virtio-block: a request with no status byte, returned unused");
            self.stats.refused += 1;
            return 0;
        };
        let Ok(mut status_writer) = writer.split_at(data_len) else {
            self.stats.refused += 1;
            return 0;
        };
        let mut header = [0u8; HEADER_LEN];
        let (status, written) = if reader.available_bytes() < HEADER_LEN
            || std::io::Read::read_exact(&mut reader, &mut header).is_err()
        {
            (VIRTIO_BLK_S_IOERR, 0)
        } else {
            let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let mut sector_bytes = [0u8; 8];
            sector_bytes.copy_from_slice(&header[8..16]);
            let sector = u64::from_le_bytes(sector_bytes);
            let result = match kind {
                VIRTIO_BLK_T_IN => self.read(sector, data_len, &mut writer),
                VIRTIO_BLK_T_OUT => self.write(sector, &mut reader),
                VIRTIO_BLK_T_FLUSH => self.flush(),
                VIRTIO_BLK_T_GET_ID => {
                    let n = data_len.min(self.id.len());
                    std::io::Write::write_all(&mut writer, &self.id[..n])
                        .map(|()| n)
                        .map_err(|e| RequestError::Memory(e.to_string()))
                }
                other => {
                    tracing::debug!(kind = other, "virtio-block: unsupported request type");
                    self.stats.refused += 1;
                    return self.finish(&mut status_writer, VIRTIO_BLK_S_UNSUPP, 0);
                }
            };
            match result {
                Ok(written) => (VIRTIO_BLK_S_OK, written),
                Err(e) => {
                    tracing::debug!(error = %e, kind, sector, "virtio-block: request failed");
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            }
        };
        if status != VIRTIO_BLK_S_OK {
            self.stats.refused += 1;
        }
        self.finish(&mut status_writer, status, written)
    }

    /// Writes the status byte; the length for the used ring: the data written, and the status.
    fn finish(
        &self,
        status_writer: &mut virtio_queue::Writer<'_>,
        status: u32,
        data: usize,
    ) -> u32 {
        // `status` is one of the VIRTIO_BLK_S_* values, all below 256.
        match std::io::Write::write_all(status_writer, &[status as u8]) {
            Ok(()) => u32::try_from(data + 1).unwrap_or(u32::MAX),
            Err(_) => u32::try_from(data).unwrap_or(u32::MAX),
        }
    }

    /// Checks that `len` bytes at `sector` are whole sectors inside the disk and a request's
    /// worth at most; their offset in the disk.
    fn checked(&self, sector: u64, len: usize) -> Result<u64, RequestError> {
        if len % SECTOR_SIZE as usize != 0 {
            return Err(RequestError::NotWholeSectors { len });
        }
        if len > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge { len });
        }
        let sectors = len as u64 / SECTOR_SIZE;
        match sector.checked_add(sectors) {
            Some(end) if end <= self.capacity_sectors => Ok(sector * SECTOR_SIZE),
            _ => Err(RequestError::OutOfRange {
                sector,
                len,
                capacity: self.capacity_sectors,
            }),
        }
    }

    fn read(
        &mut self,
        sector: u64,
        len: usize,
        writer: &mut virtio_queue::Writer<'_>,
    ) -> Result<usize, RequestError> {
        let offset = self.checked(sector, len)?;
        self.buf.resize(len, 0);
        self.disk
            .read_at(&mut self.buf, offset)
            .map_err(RequestError::Io)?;
        std::io::Write::write_all(writer, &self.buf)
            .map_err(|e| RequestError::Memory(e.to_string()))?;
        self.stats.reads += 1;
        self.stats.read_bytes += len as u64;
        Ok(len)
    }

    fn write(
        &mut self,
        sector: u64,
        reader: &mut virtio_queue::Reader<'_>,
    ) -> Result<usize, RequestError> {
        if self.read_only {
            return Err(RequestError::ReadOnly);
        }
        let len = reader.available_bytes();
        let offset = self.checked(sector, len)?;
        self.buf.resize(len, 0);
        std::io::Read::read_exact(reader, &mut self.buf)
            .map_err(|e| RequestError::Memory(e.to_string()))?;
        self.disk
            .write_at(&self.buf, offset)
            .map_err(RequestError::Io)?;
        self.stats.writes += 1;
        self.stats.written_bytes += len as u64;
        Ok(0)
    }

    fn flush(&mut self) -> Result<usize, RequestError> {
        if !self.read_only {
            self.disk.flush().map_err(RequestError::Io)?;
        }
        self.stats.flushes += 1;
        Ok(0)
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        BLOCK_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX);
        if self.read_only {
            features |= 1u64 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_space();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| config.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Only `writeback` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE, not offered.
    }

    fn activate(&mut self, ctx: &mut DeviceContext<'_>) -> Result<(), ActivateError> {
        if ctx.queue(0).is_none() {
            return Err(ActivateError::QueueNotUsable { queue: 0 });
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.buf = Vec::new();
    }

    fn process_queue(&mut self, queue: usize, ctx: &mut DeviceContext<'_>) {
        if queue != 0 {
            return;
        }
        let Some((q, mem)) = ctx.queue(0) else {
            return;
        };
        let mut used = false;
        let mut requeue = false;
        for budget in (0..=PROCESS_BUDGET).rev() {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            if budget == 0 {
                q.go_to_previous_position();
                requeue = true;
                break;
            }
            let head = chain.head_index();
            let len = self.serve(mem, chain);
            if let Err(e) = q.add_used(mem, head, len) {
                tracing::warn!(error = %e, "virtio-block: cannot return a request");
            }
            used = true;
        }
        if used {
            ctx.signal_used_queue();
        }
        if requeue {
            ctx.requeue(0);
        }
    }
}

#[cfg(test)]
mod tests;

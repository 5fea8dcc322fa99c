//! The block device driven as a guest driver drives it: real guest memory with a split
//! virtqueue, the transport's registers for setup, request chains written by hand (good and
//! bad), and a real file as the disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;

use vm_memory::{Address, Bytes, GuestAddress};

use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::{MMIO_CONFIG_START, MmioTransport, VirtioMmioEvents, reg};
use crate::devices::virtio::status;
use crate::memory::{self};

const MEM_SIZE: u64 = 16 << 20;
const DESC: u64 = 0x1_0000;
const AVAIL: u64 = 0x2_0000;
const USED: u64 = 0x3_0000;
const BUFFERS: u64 = 0x10_0000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const DISK_SECTORS: u64 = 64;

/// A driver with one request queue, and the device under test over a temporary file.
struct Driver {
    mem: GuestMemory,
    dev: MmioTransport<BlockDevice>,
    disk: tempfile::NamedTempFile,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    next_buffer: u64,
}

/// One descriptor: guest address, length, device-writable.
#[derive(Clone, Copy)]
struct Seg {
    addr: u64,
    len: u32,
    write: bool,
}

impl Driver {
    /// A disk of `DISK_SECTORS` sectors, each filled with its own index, set up as Linux does.
    fn new(read_only: bool) -> Self {
        let mut disk = tempfile::NamedTempFile::new().unwrap();
        for s in 0..DISK_SECTORS {
            disk.write_all(&[s as u8; SECTOR_SIZE as usize]).unwrap();
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(disk.path())
            .unwrap();
        let device = BlockDevice::new(
            Box::new(RawDisk::new(file).unwrap()),
            read_only,
            "thaw-test-disk",
        )
        .unwrap();
        Self::with_device(device, disk, read_only)
    }

    /// A driver that set `device` up; `disk` is the file the tests read back.
    fn with_device(device: BlockDevice, disk: tempfile::NamedTempFile, read_only: bool) -> Self {
        let mem = memory::create_guest_memory(MEM_SIZE).unwrap();
        let dev = MmioTransport::new(device, mem.clone()).unwrap();
        let mut d = Self {
            mem,
            dev,
            disk,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            next_buffer: BUFFERS,
        };
        d.setup(read_only);
        d
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        self.dev.write(offset, &value.to_le_bytes());
    }

    fn setup(&mut self, read_only: bool) {
        assert_eq!(self.read_reg(reg::DEVICE_ID), BLOCK_DEVICE_ID);
        self.write_reg(reg::STATUS, 0);
        self.write_reg(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.write_reg(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.read_reg(reg::DEVICE_FEATURES);
        assert_eq!(low & (1 << VIRTIO_BLK_F_RO) != 0, read_only);
        assert_ne!(low & (1 << VIRTIO_BLK_F_FLUSH), 0);
        self.write_reg(reg::DRIVER_FEATURES_SEL, 1);
        self.write_reg(reg::DRIVER_FEATURES, 1 << (VIRTIO_F_VERSION_1 - 32));
        self.write_reg(reg::DRIVER_FEATURES_SEL, 0);
        self.write_reg(reg::DRIVER_FEATURES, low);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write_reg(reg::STATUS, s);
        self.write_reg(reg::QUEUE_SEL, 0);
        assert_eq!(self.read_reg(reg::QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
        self.write_reg(reg::QUEUE_NUM, u32::from(QUEUE_SIZE));
        for (low_reg, high_reg, addr) in [
            (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, DESC),
            (reg::QUEUE_AVAIL_LOW, reg::QUEUE_AVAIL_HIGH, AVAIL),
            (reg::QUEUE_USED_LOW, reg::QUEUE_USED_HIGH, USED),
        ] {
            self.write_reg(low_reg, addr as u32);
            self.write_reg(high_reg, 0);
        }
        self.write_reg(reg::QUEUE_READY, 1);
        self.write_reg(reg::STATUS, s | status::DRIVER_OK);
        assert_eq!(self.read_reg(reg::STATUS), s | status::DRIVER_OK);
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer += u64::from(len).next_multiple_of(64);
        assert!(self.next_buffer < MEM_SIZE);
        addr
    }

    /// Submits `segs` as one chain and kicks; returns the used length of the request, from the
    /// used ring.
    fn submit(&mut self, segs: &[Seg]) -> u32 {
        let first = self.next_desc;
        for (i, seg) in segs.iter().enumerate() {
            let index = (first + i as u16) % QUEUE_SIZE;
            let last = i + 1 == segs.len();
            let flags = if last { 0 } else { F_NEXT } | if seg.write { F_WRITE } else { 0 };
            let next = (index + 1) % QUEUE_SIZE;
            let at = GuestAddress(DESC + u64::from(index) * 16);
            self.mem.write_obj(seg.addr, at).unwrap();
            self.mem.write_obj(seg.len, at.unchecked_add(8)).unwrap();
            self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
        }
        self.next_desc = (first + segs.len() as u16) % QUEUE_SIZE;
        let slot = GuestAddress(AVAIL + 4 + u64::from(self.avail_idx % QUEUE_SIZE) * 2);
        self.mem.write_obj(first, slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        self.write_reg(reg::QUEUE_NOTIFY, 0);
        self.dev.process_queue_event(0);
        let used_idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used_idx, self.used_seen.wrapping_add(1), "one request used");
        let elem = USED + 4 + u64::from(self.used_seen % QUEUE_SIZE) * 8;
        self.used_seen = used_idx;
        let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
        assert_eq!(id, u32::from(first));
        self.mem.read_obj(GuestAddress(elem + 4)).unwrap()
    }

    /// A request of `kind` at `sector`: header, `data` (device-writable for a read) and
    /// status. Returns (status, used length, the data buffer's address).
    fn request(&mut self, kind: u32, sector: u64, data: Option<(&[u8], bool)>) -> (u8, u32, u64) {
        let header = self.alloc(16);
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&kind.to_le_bytes());
        bytes[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&bytes, GuestAddress(header)).unwrap();
        let mut segs = vec![Seg {
            addr: header,
            len: 16,
            write: false,
        }];
        let mut data_addr = 0;
        if let Some((data, write)) = data {
            data_addr = self.alloc(data.len() as u32);
            self.mem.write_slice(data, GuestAddress(data_addr)).unwrap();
            segs.push(Seg {
                addr: data_addr,
                len: data.len() as u32,
                write,
            });
        }
        let status = self.alloc(1);
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        segs.push(Seg {
            addr: status,
            len: 1,
            write: true,
        });
        let used = self.submit(&segs);
        let status: u8 = self.mem.read_obj(GuestAddress(status)).unwrap();
        (status, used, data_addr)
    }

    fn read_sectors(&mut self, sector: u64, count: usize) -> (u8, Vec<u8>) {
        let len = count * SECTOR_SIZE as usize;
        let (status, used, addr) =
            self.request(VIRTIO_BLK_T_IN, sector, Some((&vec![0xee; len], true)));
        let mut out = vec![0u8; len];
        self.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
        if status == VIRTIO_BLK_S_OK as u8 {
            assert_eq!(used as usize, len + 1);
        }
        (status, out)
    }

    fn disk_bytes(&self) -> Vec<u8> {
        std::fs::read(self.disk.path()).unwrap()
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

#[test]
fn the_config_space_says_the_capacity_and_segments() {
    let mut d = Driver::new(false);
    let mut capacity = [0u8; 8];
    d.dev.read(MMIO_CONFIG_START, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), DISK_SECTORS);
    let seg_max = d.read_reg(MMIO_CONFIG_START + 12);
    assert_eq!(seg_max, SEG_MAX);
    // Past the fields the device knows: zeros, never a panic.
    assert_eq!(d.read_reg(0xffc), 0);
}

#[test]
fn reads_writes_flushes_and_the_id_reach_the_file() {
    let mut d = Driver::new(false);
    let (status, data) = d.read_sectors(3, 2);
    assert_eq!(status, OK);
    assert_eq!(&data[..512], &[3u8; 512][..]);
    assert_eq!(&data[512..], &[4u8; 512][..]);

    let payload = vec![0xab; 3 * SECTOR_SIZE as usize];
    let (status, used, _) = d.request(VIRTIO_BLK_T_OUT, 10, Some((&payload, false)));
    assert_eq!((status, used), (OK, 1));
    let disk = d.disk_bytes();
    assert_eq!(&disk[10 * 512..13 * 512], &payload[..]);
    assert_eq!(
        &disk[13 * 512..14 * 512],
        &[13u8; 512][..],
        "nothing beyond"
    );
    assert_eq!(d.read_sectors(11, 1).1, vec![0xab; 512]);

    let (status, used, _) = d.request(VIRTIO_BLK_T_FLUSH, 0, None);
    assert_eq!((status, used), (OK, 1));

    let (status, used, addr) = d.request(VIRTIO_BLK_T_GET_ID, 0, Some((&[0u8; 20], true)));
    assert_eq!((status, used), (OK, 21));
    let mut id = [0u8; 20];
    d.mem.read_slice(&mut id, GuestAddress(addr)).unwrap();
    assert_eq!(&id[..14], b"thaw-test-disk");

    let stats = d.dev.device().stats();
    assert_eq!((stats.reads, stats.writes, stats.flushes), (2, 1, 1));
    assert_eq!(stats.refused, 0);
}

#[test]
fn a_read_only_disk_refuses_writes_and_keeps_its_bytes() {
    let mut d = Driver::new(true);
    let before = d.disk_bytes();
    let (status, used, _) = d.request(VIRTIO_BLK_T_OUT, 0, Some((&[0x55; 512], false)));
    assert_eq!((status, used), (IOERR, 1));
    assert_eq!(d.disk_bytes(), before);
    // Reading and flushing still work.
    assert_eq!(d.read_sectors(1, 1), (OK, vec![1u8; 512]));
    assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, None).0, OK);
}

#[test]
fn requests_outside_the_disk_or_of_partial_sectors_are_refused() {
    let mut d = Driver::new(false);
    let before = d.disk_bytes();
    // The last sector reads; one past it does not; a sector number that would overflow does
    // not either.
    assert_eq!(d.read_sectors(DISK_SECTORS - 1, 1).0, OK);
    assert_eq!(d.read_sectors(DISK_SECTORS - 1, 2).0, IOERR);
    assert_eq!(d.read_sectors(DISK_SECTORS, 1).0, IOERR);
    assert_eq!(d.read_sectors(u64::MAX, 1).0, IOERR);
    assert_eq!(d.read_sectors(u64::MAX / 512, 1).0, IOERR);
    let (status, _, _) = d.request(VIRTIO_BLK_T_OUT, DISK_SECTORS, Some((&[1; 512], false)));
    assert_eq!(status, IOERR);
    let (status, _, _) = d.request(VIRTIO_BLK_T_OUT, 0, Some((&[1; 100], false)));
    assert_eq!(status, IOERR, "not whole sectors");
    let (status, _, _) = d.request(VIRTIO_BLK_T_IN, 0, Some((&[0; 700], true)));
    assert_eq!(status, IOERR, "not whole sectors");
    assert_eq!(d.disk_bytes(), before, "no refused write reached the disk");
    assert_eq!(d.dev.device().stats().refused, 7);
}

#[test]
fn unknown_types_and_broken_chains_are_answered_without_harm() {
    let mut d = Driver::new(false);
    // An unknown request type.
    let (status, used, _) = d.request(42, 0, None);
    assert_eq!((status, used), (VIRTIO_BLK_S_UNSUPP as u8, 1));
    // A header cut short: IOERR.
    let header = d.alloc(8);
    let status_at = d.alloc(1);
    let used = d.submit(&[
        Seg {
            addr: header,
            len: 8,
            write: false,
        },
        Seg {
            addr: status_at,
            len: 1,
            write: true,
        },
    ]);
    assert_eq!(used, 1);
    assert_eq!(
        d.mem.read_obj::<u8>(GuestAddress(status_at)).unwrap(),
        IOERR
    );
    // No status byte at all: returned unused.
    let header = d.alloc(16);
    let used = d.submit(&[Seg {
        addr: header,
        len: 16,
        write: false,
    }]);
    assert_eq!(used, 0);
    // A descriptor outside guest memory: returned unused, nothing read or written.
    let status_at = d.alloc(1);
    let used = d.submit(&[
        Seg {
            addr: MEM_SIZE + 4096,
            len: 16,
            write: false,
        },
        Seg {
            addr: status_at,
            len: 1,
            write: true,
        },
    ]);
    assert_eq!(used, 0);
    // A request larger than the device takes.
    let big = vec![0u8; MAX_REQUEST_BYTES + 512];
    let (status, _, _) = d.request(VIRTIO_BLK_T_IN, 0, Some((&big, true)));
    assert_eq!(status, IOERR);
    // And the device still serves.
    assert_eq!(d.read_sectors(5, 1), (OK, vec![5u8; 512]));
}

#[test]
fn bad_disk_images_are_refused() {
    let disk = |len: u64| {
        let file = tempfile::tempfile().unwrap();
        file.set_len(len).unwrap();
        Box::new(RawDisk::new(file).unwrap())
    };
    assert!(matches!(
        BlockDevice::new(disk(0), true, "x"),
        Err(BlockError::Empty)
    ));
    assert!(matches!(
        BlockDevice::new(disk(1000), true, "x"),
        Err(BlockError::NotWholeSectors { len: 1000 })
    ));
    assert!(matches!(
        BlockDevice::new(disk(4096), true, "an id longer than twenty bytes"),
        Err(BlockError::IdTooLong { len: 30 })
    ));
}

/// Two devices over one base image, each with its own overlay: a clone's writes reach neither
/// the base nor the other clone, through the whole request path.
#[test]
fn clones_over_one_base_keep_their_writes_apart() {
    let base = Driver::new(true);
    let overlays = tempfile::tempdir().unwrap();
    let clone = |id: &str| {
        let disk = CowDisk::with_private_overlay(
            std::fs::File::open(base.disk.path()).unwrap(),
            overlays.path(),
        )
        .unwrap();
        let device = BlockDevice::new(Box::new(disk), false, id).unwrap();
        // Its disk file is the overlay, unnamed: the test reads the base instead.
        Driver::with_device(device, tempfile::NamedTempFile::new().unwrap(), false)
    };
    let (mut a, mut b) = (clone("a"), clone("b"));
    let before = base.disk_bytes();
    assert_eq!(
        a.request(VIRTIO_BLK_T_OUT, 2, Some((&[0xa0; 1024], false)))
            .0,
        OK
    );
    assert_eq!(a.read_sectors(2, 3).1[..1024], [0xa0; 1024]);
    assert_eq!(a.read_sectors(4, 1).1, vec![4u8; 512]);
    assert_eq!(b.read_sectors(2, 1).1, vec![2u8; 512]);
    assert_eq!(b.request(VIRTIO_BLK_T_FLUSH, 0, None).0, OK);
    assert_eq!(base.disk_bytes(), before);
}

/// The disk file at `path`, opened again as a restore would.
fn reopen(path: &std::path::Path) -> Box<dyn Disk> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    Box::new(RawDisk::new(file).unwrap())
}

#[test]
fn block_device_passes_persist_conformance() {
    use crate::persist_conformance::{self, Spec};

    let d = Driver::new(false);
    let path = d.disk.path().to_owned();
    let spec = Spec::of::<BlockDevice>()
        .carries("the id", |s| s.id = *b"another-disk-id-0000")
        .carries("read-only", |s| s.read_only = true)
        .refuses("another disk size", |s| s.capacity_sectors += 1)
        .refuses("a size that overflows", |s| s.capacity_sectors = u64::MAX);
    let saved = persist_conformance::check::<BlockDevice>(d.dev.device(), || reopen(&path), &spec);
    assert_eq!(saved.capacity_sectors, DISK_SECTORS);
}

/// The transport with its queue in use goes through the conformance check, and a device
/// restored onto the same disk serves the guest's next request on the same ring, with the
/// guest's view of the disk (size, read-only, id) the saved one.
#[test]
fn a_saved_device_restores_onto_its_disk_and_serves_on() {
    use crate::devices::virtio::mmio::MmioArgs;
    use crate::persist::Persist;
    use crate::persist_conformance::{self, Spec};

    let mut d = Driver::new(false);
    assert_eq!(
        d.request(VIRTIO_BLK_T_OUT, 7, Some((&[0x77; 512], false)))
            .0,
        OK
    );
    let (path, mem) = (d.disk.path().to_owned(), d.mem.clone());
    let fresh = || MmioArgs {
        device: reopen(&path),
        mem: mem.clone(),
    };
    let spec = Spec::of::<MmioTransport<BlockDevice>>()
        .carries("ring positions", |s| {
            s.queues[0].next_avail = s.queues[0].next_avail.wrapping_add(3);
            s.queues[0].next_used = s.queues[0].next_used.wrapping_add(3);
        })
        .carries("the id", |s| s.device.id = [b'z'; 20])
        .refuses("another disk size", |s| s.device.capacity_sectors -= 1)
        .refuses("features the device does not offer", |s| {
            s.registers.driver_features |= 1 << 20
        });
    let saved = persist_conformance::check::<MmioTransport<BlockDevice>>(&d.dev, fresh, &spec);
    assert!(saved.registers.activated);
    assert_eq!(saved.queues[0].next_used, 1);

    d.dev = MmioTransport::<BlockDevice>::restore(
        MmioArgs {
            device: reopen(&path),
            mem: d.mem.clone(),
        },
        &saved,
    )
    .unwrap();
    assert_eq!(d.read_sectors(7, 1), (OK, vec![0x77; 512]));
    let (status, _, addr) = d.request(VIRTIO_BLK_T_GET_ID, 0, Some((&[0u8; 20], true)));
    assert_eq!(status, OK);
    let mut id = [0u8; 14];
    d.mem.read_slice(&mut id, GuestAddress(addr)).unwrap();
    assert_eq!(&id, b"thaw-test-disk");
}

//! The block driver against the simulated disk: transfers cut into requests and kept in
//! flight, answers in any order, the device's refusals (read-only, outside the disk), flush and
//! id, buffers refused before anything is sent, a stuck device, and devices that answer wrong.

use super::fake::FakeDisk;
use super::*;

const MIB: usize = 1 << 20;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn driver_with(size: u16, data: Vec<u8>, features: u64) -> BlockDriver<FakeDisk> {
    let mem: *mut BlockMemory = Box::into_raw(Box::<BlockMemory>::new_zeroed()).cast();
    let capacity = (data.len() / SECTOR_SIZE) as u64;
    let dev = FakeDisk::new(mem, size, data);
    // SAFETY: fresh, leaked memory used by this driver and its device only.
    unsafe { BlockDriver::new(dev, mem, size, features, capacity) }.unwrap()
}

fn driver(data: Vec<u8>) -> BlockDriver<FakeDisk> {
    driver_with(128, data, F_FLUSH)
}

#[test]
fn reads_and_writes_round_trip_many_requests_in_flight() {
    let disk = pattern(8 * MIB, 1);
    let mut d = driver(disk.clone());
    assert_eq!(
        (d.queue_size(), d.slots(), d.capacity_sectors()),
        (128, 42, 16384)
    );
    let mut buf = vec![0u8; 3 * MIB + 512];
    d.read(5, &mut buf).unwrap();
    assert_eq!(buf, disk[5 * 512..5 * 512 + buf.len()]);
    // 3 MiB + 512 in 64 KiB requests: 49, 42 of them at once, in two notifications.
    assert_eq!(d.transport().requests.len(), 49);
    assert_eq!(d.transport().most_at_once, 42);
    assert_eq!(d.transport().notifies, 2);
    let last = d.transport().requests[48];
    assert_eq!(last, (kind::IN, 5 + 48 * 128, 512));

    let new = pattern(2 * MIB, 2);
    d.write(100, &new).unwrap();
    assert_eq!(
        d.transport().data[100 * 512..100 * 512 + new.len()],
        new[..]
    );
    let mut back = vec![0u8; new.len()];
    d.read(100, &mut back).unwrap();
    assert_eq!(back, new);
    assert_eq!(d.stats.bad_used, 0);
}

#[test]
fn a_small_queue_sends_one_request_at_a_time() {
    let disk = pattern(MIB, 3);
    let mut d = driver_with(4, disk.clone(), F_FLUSH);
    assert_eq!(d.slots(), 1);
    let mut buf = vec![0u8; 256 * 1024];
    d.read(0, &mut buf).unwrap();
    assert_eq!(buf, disk[..buf.len()]);
    assert_eq!(d.transport().most_at_once, 1);
    assert_eq!(d.transport().notifies, 4);
    let mem: *mut BlockMemory = Box::into_raw(Box::<BlockMemory>::new_zeroed()).cast();
    let dev = FakeDisk::new(mem, 2, Vec::new());
    // SAFETY: fresh, leaked memory.
    let small = unsafe { BlockDriver::new(dev, mem, 3, F_FLUSH, 0) };
    assert_eq!(small.err(), Some(Error::QueueTooSmall));
}

#[test]
fn answers_in_any_order_reach_their_requests() {
    let disk = pattern(4 * MIB, 4);
    let mut d = driver(disk.clone());
    d.transport().reverse = true;
    let mut buf = vec![0u8; 4 * MIB];
    d.read(0, &mut buf).unwrap();
    assert_eq!(buf, disk);
}

#[test]
fn a_read_only_disk_refuses_writes_and_stays_usable() {
    let disk = pattern(MIB, 5);
    let mut d = driver_with(128, disk.clone(), F_FLUSH | F_RO);
    d.transport().read_only = true;
    assert!(d.read_only());
    assert_eq!(d.write(8, &[0xaa; 4096]), Err(Error::IoErr { sector: 8 }));
    assert_eq!(d.transport().data, disk);
    let mut buf = vec![0u8; 4096];
    d.read(8, &mut buf).unwrap();
    assert_eq!(buf, disk[8 * 512..8 * 512 + 4096]);
    // A flush of a read-only disk is answered (there is nothing to flush).
    d.flush().unwrap();
}

#[test]
fn the_device_refuses_what_lies_outside_the_disk() {
    let disk = pattern(MIB, 6);
    let capacity = 2048;
    let mut d = driver(disk);
    let mut two = [0u8; 1024];
    assert_eq!(
        d.read(capacity - 1, &mut two),
        Err(Error::IoErr {
            sector: capacity - 1
        })
    );
    // A read of eight requests whose last six fall outside: the error names the first refused
    // one, whatever order the answers come in.
    let mut buf = vec![0u8; 512 * 1024];
    let start = capacity - 256;
    d.transport().reverse = true;
    assert_eq!(
        d.read(start, &mut buf),
        Err(Error::IoErr {
            sector: start + 256
        })
    );
    // With one slot, nothing is sent after the first refusal came back.
    let mut d = driver_with(4, pattern(MIB, 6), F_FLUSH);
    assert_eq!(
        d.read(start, &mut buf),
        Err(Error::IoErr {
            sector: start + 256
        })
    );
    assert_eq!(d.transport().requests.len(), 3);
}

#[test]
fn flush_and_id() {
    let mut d = driver(vec![0; 4096]);
    d.flush().unwrap();
    assert_eq!(d.transport().flushes, 1);
    let id = d.get_id().unwrap();
    assert_eq!(id_bytes(&id), b"fake-disk");
    d.transport().id = *b"exactly-twenty-bytes";
    assert_eq!(id_bytes(&d.get_id().unwrap()), b"exactly-twenty-bytes");
    assert_eq!(
        d.transport().requests[..],
        [
            (kind::FLUSH, 0, 0),
            (kind::GET_ID, 0, 20),
            (kind::GET_ID, 0, 20)
        ]
    );
    let mut no_flush = driver_with(128, vec![0; 4096], F_RO);
    assert_eq!(no_flush.flush(), Err(Error::FlushNotOffered));
    assert!(no_flush.transport().requests.is_empty());
}

#[test]
fn bad_buffers_are_refused_before_anything_is_sent() {
    let mut d = driver(vec![0; 4096]);
    let mut odd = [0u8; 100];
    assert_eq!(
        d.read(0, &mut odd),
        Err(Error::NotWholeSectors { len: 100 })
    );
    assert_eq!(
        d.write(u64::MAX - 1, &[0; 2048]),
        Err(Error::SectorOverflow {
            sector: u64::MAX - 1
        })
    );
    d.read(0, &mut []).unwrap();
    assert!(d.transport().requests.is_empty());
    // The last sector a u64 names is the device's to refuse.
    let mut one = [0u8; 512];
    assert_eq!(
        d.read(u64::MAX - 1, &mut one),
        Err(Error::IoErr {
            sector: u64::MAX - 1
        })
    );
}

#[test]
fn a_stuck_device_is_reset_and_the_driver_retires() {
    let mut d = driver(vec![0; 4096]);
    d.transport().tick = 10_000_000;
    d.transport().stall = true;
    let mut buf = [0u8; 512];
    assert_eq!(d.read(0, &mut buf), Err(Error::Stalled));
    assert_eq!(d.transport().resets, 1);
    // At least STALL_NS passed on the run clock before the driver gave up.
    assert!(d.transport().clock >= STALL_NS);
    assert_eq!(d.read(0, &mut buf), Err(Error::OutOfService));
    assert_eq!(d.flush(), Err(Error::OutOfService));
    assert_eq!(d.transport().requests.len(), 0);
}

#[test]
fn wrong_answers_are_reported_not_believed() {
    let mut d = driver(pattern(MIB, 7));
    d.transport().drop_status = true;
    let mut buf = [0u8; 1024];
    assert_eq!(d.read(3, &mut buf), Err(Error::NoStatus { sector: 3 }));
    d.transport().drop_status = false;
    d.transport().force_status = Some(status::UNSUPP);
    assert_eq!(d.flush(), Err(Error::Unsupported { sector: 0 }));
    d.transport().force_status = Some(7);
    assert_eq!(
        d.read(9, &mut buf),
        Err(Error::BadStatus {
            sector: 9,
            status: 7
        })
    );
    d.transport().force_status = None;
    d.transport().bogus_used = true;
    d.read(0, &mut buf).unwrap();
    assert_eq!(d.stats.bad_used, 1);
    assert_eq!(Error::IoErr { sector: 8 }.to_string(), "IOERR at sector 8");
}

//! An address bus for port I/O or MMIO: maps non-overlapping ranges to devices and routes each
//! guest access to the device that owns it, with the offset into its range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable over a bus. Accesses arrive from vCPU threads, so devices are `Send` and
/// sit behind a mutex.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device whose registers are single bytes, like the legacy ISA devices: a wider access reads
/// as all ones and a wider write is ignored, as on a real 8-bit bus.
pub trait ByteRegisters: Send {
    /// The guest reads register `offset`.
    fn read_register(&mut self, offset: u8) -> u8;
    /// The guest writes `value` to register `offset`.
    fn write_register(&mut self, offset: u8, value: u8);
}

impl<T: ByteRegisters> BusDevice for T {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (data, u8::try_from(offset)) {
            ([byte], Ok(offset)) => *byte = self.read_register(offset),
            (data, _) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            self.write_register(offset, *byte);
        }
    }
}

/// A shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Range {
    len: u64,
    device: SharedDevice,
}

/// A device range overlaps one already on the bus, or is empty.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bus range {base:#x}+{len:#x} is empty or overlaps a device already on the bus")]
pub struct BusConflict {
    /// Start of the rejected range.
    pub base: u64,
    /// Its length.
    pub len: u64,
}

/// The devices of one address space.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusConflict> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusConflict { base, len });
        };
        let overlaps_before = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(b, r)| b + r.len > base);
        if overlaps_before {
            return Err(BusConflict { base, len });
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset + size as u64 <= range.len).then_some((offset, &range.device))
    }

    /// Routes a read; returns false (and leaves `data` untouched) if no device owns `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((offset, device)) = self.find(addr, data.len()) else {
            return false;
        };
        match device.lock() {
            Ok(mut d) => d.read(offset, data),
            Err(poisoned) => poisoned.into_inner().read(offset, data),
        }
        true
    }

    /// Routes a write; returns false if no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((offset, device)) = self.find(addr, data.len()) else {
            return false;
        };
        match device.lock() {
            Ok(mut d) => d.write(offset, data),
            Err(poisoned) => poisoned.into_inner().write(offset, data),
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_accesses_with_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f8, b"x"));
        assert_eq!(dev.lock().unwrap().last, Some((0, vec![b'x'])));
        assert!(!bus.read(0x400, &mut data));
        assert!(!bus.write(0x3f7, &[0]));
        // An access that runs past the end of the range belongs to no device.
        assert!(!bus.read(0x3ff, &mut [0u8; 2]));
    }

    struct Latch(u8);

    impl ByteRegisters for Latch {
        fn read_register(&mut self, offset: u8) -> u8 {
            self.0 + offset
        }
        fn write_register(&mut self, _offset: u8, value: u8) {
            self.0 = value;
        }
    }

    #[test]
    fn byte_registers_ignore_wide_accesses() {
        let mut latch = Latch(7);
        let mut wide = [0u8; 2];
        latch.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        latch.write(0, &[1, 2]);
        let mut byte = [0u8];
        latch.read(1, &mut byte);
        assert_eq!(byte, [8]);
        latch.write(0, &[3]);
        latch.read(0, &mut byte);
        assert_eq!(byte, [3]);
    }

    #[test]
    fn rejects_overlapping_and_empty_ranges() {
        let mut bus = Bus::new();
        let dev = || -> SharedDevice { Arc::new(Mutex::new(Recorder::default())) };
        bus.insert(0x60, 5, dev()).unwrap();
        assert!(bus.insert(0x64, 1, dev()).is_err());
        assert!(bus.insert(0x5f, 2, dev()).is_err());
        assert!(bus.insert(0x70, 0, dev()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev()).is_err());
        bus.insert(0x65, 1, dev()).unwrap();
    }
}

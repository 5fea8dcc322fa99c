//! The virtio-mmio transport (virtio 1.2, section 4.2, modern "version 2" only) for the vsock
//! and block devices, all at CPL3: probing the `virtio_mmio.device=` windows from the command
//! line, the initialization sequence (any device's: the features and queues are the caller's),
//! queue notification, the config space (guest CID, disk capacity), the [`Vsock`] handle that
//! owns the vsock device and its driver and can reset both, and [`open_disk`] for block devices.

use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, Ordering};

use thaw_test_guest::block::{self, BlockDriver, BlockMemory, BlockTransport};
use thaw_test_guest::cmdline::{MAX_DEVICES, MmioDevice};
use thaw_test_guest::driver::{BUF_ALLOC, Driver, DriverMemory, Error, Transport};
use thaw_test_guest::virtq::{QUEUE_MAX, QueueTransport};

use crate::arch::Shared;
use crate::{clock, println};

const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR_ID: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

/// "virt" in little-endian.
const MAGIC: u32 = 0x7472_6976;
/// The modern virtio-mmio interface.
const MODERN: u32 = 2;
/// virtio device id of a socket device.
pub const DEVICE_ID_VSOCK: u32 = 19;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
/// The device hit an error it cannot recover from without a reset.
pub const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;
/// VIRTIO_F_VERSION_1 is feature bit 32: bit 0 of the high feature word.
const F_VERSION_1_HIGH: u32 = 1;

/// How long `connect` waits for the host's answer.
const CONNECT_TIMEOUT_NS: u64 = 3_000_000_000;

/// One virtio-mmio register window.
#[derive(Clone, Copy)]
pub struct Mmio {
    base: u64,
}

impl Mmio {
    fn read(&self, reg: u64) -> u32 {
        // SAFETY: the window comes from the VMM's command line and lies in the MMIO hole,
        // which the guest's page tables identity-map; the access traps to the VMM.
        unsafe { core::ptr::read_volatile((self.base + reg) as *const u32) }
    }

    fn write(&self, reg: u64, value: u32) {
        // SAFETY: as for `read`.
        unsafe { core::ptr::write_volatile((self.base + reg) as *mut u32, value) }
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.read(STATUS)
    }

    /// Resets the device and waits until it says it is reset: from then on it uses none of the
    /// memory it was given.
    fn reset(&self) {
        self.write(STATUS, 0);
        while self.read(STATUS) != 0 {
            core::hint::spin_loop();
        }
    }

    fn read_config_u64(&self, offset: u64) -> u64 {
        loop {
            let generation = self.read(CONFIG_GENERATION);
            let low = self.read(CONFIG + offset);
            let high = self.read(CONFIG + offset + 4);
            if self.read(CONFIG_GENERATION) == generation {
                return u64::from(low) | u64::from(high) << 32;
            }
        }
    }
}

impl QueueTransport for Mmio {
    fn notify(&mut self, queue: u16) {
        // With ioeventfd behind it, this write is one cheap exit.
        self.write(QUEUE_NOTIFY, u32::from(queue));
    }

    fn now_ns(&mut self) -> u64 {
        clock::now_ns()
    }
}

impl Transport for Mmio {
    fn guest_cid(&mut self) -> u64 {
        self.read_config_u64(0)
    }
}

impl BlockTransport for Mmio {
    fn reset_device(&mut self) {
        self.reset();
    }
}

/// The device id in one window (0 for a placeholder), or `None` if it holds no modern virtio
/// device (or is too small for the registers and the 8 bytes of config space the drivers read:
/// a socket device's CID, a block device's capacity).
pub fn probe(device: MmioDevice) -> Option<u32> {
    let m = Mmio { base: device.base };
    let ok = device.size >= CONFIG + 8 && m.read(MAGIC_VALUE) == MAGIC && m.read(VERSION) == MODERN;
    ok.then(|| m.read(DEVICE_ID))
}

/// Driver memory and the connection's receive ring, in .bss.
static DRIVER_MEMORY: Shared<MaybeUninit<DriverMemory>> = Shared::new(MaybeUninit::zeroed());
static RECEIVE_RING: Shared<[u8; BUF_ALLOC]> = Shared::new([0; BUF_ALLOC]);

/// Why the device could not be set up.
#[derive(Clone, Copy)]
pub enum InitError {
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1,
    /// The device refused our features.
    FeaturesRefused,
    /// A queue is missing, already live, or too small.
    BadQueue(u32),
}

impl core::fmt::Display for InitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            InitError::NoVersion1 => write!(f, "the device does not offer VIRTIO_F_VERSION_1"),
            InitError::FeaturesRefused => write!(f, "the device refused FEATURES_OK"),
            InitError::BadQueue(q) => write!(f, "queue {q} is missing, already live or too small"),
        }
    }
}

/// Resets the device and negotiates up to FEATURES_OK: VIRTIO_F_VERSION_1, which it must offer,
/// and those of the device-specific `optional` features (bits 0 to 31) it offers. Fills `sizes`
/// with the size to use for each of the device's first `sizes.len()` queues; returns the
/// optional features accepted.
fn negotiate(m: Mmio, optional: u32, sizes: &mut [u16]) -> Result<u32, InitError> {
    m.reset();
    let mut status = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
    m.write(STATUS, STATUS_ACKNOWLEDGE);
    m.write(STATUS, status);
    m.write(DEVICE_FEATURES_SEL, 1);
    let high = m.read(DEVICE_FEATURES);
    if high & F_VERSION_1_HIGH == 0 {
        m.write(STATUS, status | STATUS_FAILED);
        return Err(InitError::NoVersion1);
    }
    // Each register access is an exit (microseconds on PVM): the low word is only read when
    // there is something in it to accept.
    let accepted = if optional == 0 {
        0
    } else {
        m.write(DEVICE_FEATURES_SEL, 0);
        m.read(DEVICE_FEATURES) & optional
    };
    // Nothing else of the transport's: no event index, no packed rings.
    m.write(DRIVER_FEATURES_SEL, 0);
    m.write(DRIVER_FEATURES, accepted);
    m.write(DRIVER_FEATURES_SEL, 1);
    m.write(DRIVER_FEATURES, F_VERSION_1_HIGH);
    status |= STATUS_FEATURES_OK;
    m.write(STATUS, status);
    if m.read(STATUS) & STATUS_FEATURES_OK == 0 {
        m.write(STATUS, status | STATUS_FAILED);
        return Err(InitError::FeaturesRefused);
    }
    for (q, size) in sizes.iter_mut().enumerate() {
        m.write(QUEUE_SEL, q as u32);
        let max = m.read(QUEUE_NUM_MAX);
        if m.read(QUEUE_READY) != 0 || max == 0 {
            m.write(STATUS, status | STATUS_FAILED);
            return Err(InitError::BadQueue(q as u32));
        }
        *size = max.min(QUEUE_MAX as u32) as u16;
    }
    Ok(accepted)
}

/// Tells the device where the driver's queues are (each queue's size, and its descriptor
/// table, available ring and used ring addresses, in queue order), and sets DRIVER_OK.
fn activate(m: Mmio, queues: impl IntoIterator<Item = (u16, (u64, u64, u64))>) {
    for (q, (size, (desc, avail, used))) in queues.into_iter().enumerate() {
        m.write(QUEUE_SEL, q as u32);
        m.write(QUEUE_NUM, u32::from(size));
        for (low, addr) in [
            (QUEUE_DESC_LOW, desc),
            (QUEUE_DRIVER_LOW, avail),
            (QUEUE_DEVICE_LOW, used),
        ] {
            m.write(low, addr as u32);
            m.write(low + 4, (addr >> 32) as u32);
        }
        m.write(QUEUE_READY, 1);
    }
    const _: () = assert!(QUEUE_DESC_HIGH == QUEUE_DESC_LOW + 4);
    const _: () = assert!(QUEUE_DRIVER_HIGH == QUEUE_DRIVER_LOW + 4);
    const _: () = assert!(QUEUE_DEVICE_HIGH == QUEUE_DEVICE_LOW + 4);
    let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
    m.write(STATUS, status);
}

/// The vsock driver's three queues, for [`activate`].
fn vsock_queues(driver: &Driver<Mmio>) -> [(u16, (u64, u64, u64)); 3] {
    [0, 1, 2].map(|q| (driver.queue_size(q), driver.queue_addresses(q)))
}

/// The vsock device and its driver. There is one, made once.
pub struct Vsock {
    /// The driver.
    pub driver: Driver<Mmio>,
    mmio: Mmio,
}

impl Vsock {
    /// Finds the first vsock device among `devices`, prints what it finds, and brings it up.
    /// Call at most once: the driver takes over static memory.
    pub fn open(devices: &[MmioDevice]) -> Option<Vsock> {
        for d in devices {
            let Some(id) = probe(*d) else {
                println!("vsock: no modern virtio-mmio device at {:#x}", d.base);
                continue;
            };
            if id != DEVICE_ID_VSOCK {
                println!(
                    "vsock: virtio device {id} at {:#x} is not a socket device",
                    d.base
                );
                continue;
            }
            let mmio = Mmio { base: d.base };
            let vendor = mmio.read(VENDOR_ID);
            let mut sizes = [0u16; 3];
            if let Err(e) = negotiate(mmio, 0, &mut sizes) {
                println!("vsock: cannot initialize the device at {:#x}: {e}", d.base);
                continue;
            }
            // SAFETY: the device was reset by `negotiate`, so it does not touch this memory;
            // `open` runs once (see above), so the driver is the only user of the memory and
            // the ring from now on.
            let driver = unsafe {
                let ring: &'static mut [u8] = &mut *RECEIVE_RING.get();
                Driver::new(mmio, DRIVER_MEMORY.get().cast(), ring, sizes)
            };
            let Ok(mut driver) = driver else {
                println!(
                    "vsock: the device at {:#x} has queues that are too small",
                    d.base
                );
                continue;
            };
            activate(mmio, vsock_queues(&driver));
            driver.start();
            println!(
                "vsock: virtio-mmio socket device at {:#x} (irq {}, vendor {vendor:#x}), \
                 guest cid {}, queues {}/{}/{}, polled",
                d.base,
                d.irq,
                driver.guest_cid(),
                driver.queue_size(0),
                driver.queue_size(1),
                driver.queue_size(2),
            );
            return Some(Vsock { driver, mmio });
        }
        None
    }

    /// Resets the device and starts the driver over (after a stall); false if that fails.
    pub fn reset(&mut self) -> bool {
        println!(
            "vsock: device status {:#x}; resetting the device",
            self.mmio.status()
        );
        let mut sizes = [0u16; 3];
        if let Err(e) = negotiate(self.mmio, 0, &mut sizes) {
            println!("vsock: cannot initialize the device again: {e}");
            return false;
        }
        if self.driver.reinit(sizes).is_err() {
            println!("vsock: the device's queues are too small now");
            return false;
        }
        activate(self.mmio, vsock_queues(&self.driver));
        self.driver.start();
        true
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.mmio.status()
    }

    /// Connects to host port `port`, retrying (quietly after the first report) until it works;
    /// resets the device if it stalls. False if the device cannot be recovered.
    pub fn connect(&mut self, port: u32) -> bool {
        let mut delay_ms = 10;
        let mut reported = false;
        loop {
            match self.driver.connect(port, CONNECT_TIMEOUT_NS) {
                Ok(()) => {
                    println!(
                        "vsock: connected to host port {port} from port {}",
                        self.driver.local_port()
                    );
                    return true;
                }
                Err(Error::Stalled) => {
                    if !self.reset() {
                        return false;
                    }
                }
                Err(e) => {
                    if !reported {
                        println!("vsock: cannot connect to host port {port} ({e:?}); retrying");
                        reported = true;
                    }
                    self.driver.poll_for(delay_ms * 1_000_000);
                    delay_ms = (delay_ms * 2).min(500);
                }
            }
        }
    }
}

/// Driver memory for a block device in each window the command line can name, in .bss.
static BLOCK_MEMORY: Shared<[MaybeUninit<BlockMemory>; MAX_DEVICES]> =
    Shared::new([const { MaybeUninit::zeroed() }; MAX_DEVICES]);
/// Which of [`BLOCK_MEMORY`] a driver has taken.
static BLOCK_MEMORY_TAKEN: [AtomicBool; MAX_DEVICES] =
    [const { AtomicBool::new(false) }; MAX_DEVICES];

// The block driver's features are all in the low word `negotiate` accepts.
const _: () = assert!(block::FEATURES >> 32 == 0);

/// A block device and its driver.
pub struct Disk {
    /// The driver.
    pub driver: BlockDriver<Mmio>,
    /// Its vendor id.
    pub vendor: u32,
}

/// Why a window holds no usable block device.
#[derive(Clone, Copy)]
pub enum DiskError {
    /// No modern virtio-mmio device there.
    NotVirtio,
    /// Another kind of virtio device (its id).
    NotBlock(u32),
    /// A block device that cannot be initialized.
    Init(InitError),
    /// A block device whose queue is too small.
    QueueTooSmall,
    /// No such window, or its driver was made already.
    Taken,
}

impl core::fmt::Display for DiskError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DiskError::NotVirtio => write!(f, "no modern virtio-mmio device"),
            DiskError::NotBlock(id) => write!(f, "virtio device {id}, not a block device"),
            DiskError::Init(e) => write!(f, "cannot initialize the block device: {e}"),
            DiskError::QueueTooSmall => write!(f, "the block device's queue is too small"),
            DiskError::Taken => write!(f, "the block device's driver exists already"),
        }
    }
}

/// Brings up the block device in `devices[index]`: VIRTIO_F_VERSION_1, and read-only and flush
/// when offered, one request queue. Each window's device can be opened once.
pub fn open_disk(devices: &[MmioDevice], index: usize) -> Result<Disk, DiskError> {
    let (Some(d), Some(taken)) = (devices.get(index), BLOCK_MEMORY_TAKEN.get(index)) else {
        return Err(DiskError::Taken);
    };
    match probe(*d) {
        None => return Err(DiskError::NotVirtio),
        Some(block::DEVICE_ID) => {}
        Some(id) => return Err(DiskError::NotBlock(id)),
    }
    if taken.swap(true, Ordering::AcqRel) {
        return Err(DiskError::Taken);
    }
    let mmio = Mmio { base: d.base };
    let vendor = mmio.read(VENDOR_ID);
    let mut size = [0u16; 1];
    let features = negotiate(mmio, block::FEATURES as u32, &mut size).map_err(DiskError::Init)?;
    // Config space is read once the features are settled (virtio 1.2, 3.1.1, step 7).
    let capacity = mmio.read_config_u64(0);
    // SAFETY: `negotiate` reset the device, so it does not touch this memory; the flag taken
    // above makes this driver its only user from now on. The element pointer is in bounds:
    // `taken` exists, so `index < MAX_DEVICES`.
    let driver = unsafe {
        let mem = BLOCK_MEMORY.get().cast::<BlockMemory>().add(index);
        BlockDriver::new(mmio, mem, size[0], u64::from(features), capacity)
    };
    let Ok(driver) = driver else {
        mmio.write(STATUS, mmio.status() | STATUS_FAILED);
        return Err(DiskError::QueueTooSmall);
    };
    activate(mmio, [(driver.queue_size(), driver.queue_addresses())]);
    Ok(Disk { driver, vendor })
}

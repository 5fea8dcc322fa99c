//! The transport's register semantics, driven as a guest driver would, with a device that only
//! records what happens to it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use super::*;
use crate::devices::virtio::{ActivateError, DeviceContext, INTERRUPT_VRING};
use crate::memory;

#[derive(Default)]
struct Log {
    activated: usize,
    resets: usize,
    notified: Vec<usize>,
}

struct Recorder {
    log: Arc<Mutex<Log>>,
    config: [u8; 8],
}

const DEVICE_ID: u32 = 42;
const FEATURE_X: u64 = 1 << 3;

impl VirtioDevice for Recorder {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn device_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | FEATURE_X
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = self.config.get_mut(offset as usize + i) {
                *slot = *b;
            }
        }
    }
    fn activate(&mut self, ctx: &mut DeviceContext<'_>) -> Result<(), ActivateError> {
        assert!(ctx.is_active());
        self.log.lock().unwrap().activated += 1;
        Ok(())
    }
    fn reset(&mut self) {
        self.log.lock().unwrap().resets += 1;
    }
    fn process_queue(&mut self, queue: usize, ctx: &mut DeviceContext<'_>) {
        self.log.lock().unwrap().notified.push(queue);
        ctx.signal_used_queue();
    }
}

struct Driver {
    t: MmioTransport<Recorder>,
    log: Arc<Mutex<Log>>,
}

impl Driver {
    fn new() -> Self {
        let log = Arc::new(Mutex::new(Log::default()));
        let device = Recorder {
            log: log.clone(),
            config: *b"config!!",
        };
        let mem = memory::create_guest_memory(16 << 20).unwrap();
        Self {
            t: MmioTransport::new(device, mem).unwrap(),
            log,
        }
    }
    fn r(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(&mut self, offset: u64, value: u32) {
        self.t.write(offset, &value.to_le_bytes());
    }
    fn negotiate(&mut self, features: u64) -> u32 {
        self.w(reg::STATUS, status::ACKNOWLEDGE);
        self.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.w(reg::DRIVER_FEATURES_SEL, 0);
        self.w(reg::DRIVER_FEATURES, features as u32);
        self.w(reg::DRIVER_FEATURES_SEL, 1);
        self.w(reg::DRIVER_FEATURES, (features >> 32) as u32);
        self.w(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        self.r(reg::STATUS)
    }
    fn setup_queues(&mut self) {
        for q in 0..2u32 {
            self.w(reg::QUEUE_SEL, q);
            self.w(reg::QUEUE_NUM, 8);
            let base = 0x10_0000 + u64::from(q) * 0x1_0000;
            self.w(reg::QUEUE_DESC_LOW, base as u32);
            self.w(reg::QUEUE_AVAIL_LOW, (base + 0x1000) as u32);
            self.w(reg::QUEUE_USED_LOW, (base + 0x2000) as u32);
            self.w(reg::QUEUE_READY, 1);
        }
    }
    fn full_setup(&mut self) {
        let s = self.negotiate((1 << VIRTIO_F_VERSION_1) | FEATURE_X);
        assert_eq!(s & status::FEATURES_OK, status::FEATURES_OK);
        self.setup_queues();
        self.w(reg::STATUS, s | status::DRIVER_OK);
    }
}

#[test]
fn registers_identify_a_virtio_1_device() {
    let mut d = Driver::new();
    assert_eq!(d.r(reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(d.r(reg::VERSION), 2);
    assert_eq!(d.r(reg::DEVICE_ID), DEVICE_ID);
    assert_eq!(d.r(reg::VENDOR_ID), MMIO_VENDOR_ID);
    d.w(reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(d.r(reg::DEVICE_FEATURES), FEATURE_X as u32);
    d.w(reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(d.r(reg::DEVICE_FEATURES), 1 << (VIRTIO_F_VERSION_1 - 32));
    d.w(reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(d.r(reg::DEVICE_FEATURES), 0);
    d.w(reg::QUEUE_SEL, 1);
    assert_eq!(d.r(reg::QUEUE_NUM_MAX), 8);
    d.w(reg::QUEUE_SEL, 2);
    assert_eq!(d.r(reg::QUEUE_NUM_MAX), 0, "no third queue");
    assert_eq!(d.r(reg::SHM_LEN_LOW), u32::MAX, "no shared memory regions");
    assert_eq!(d.r(reg::STATUS), 0);
}

#[test]
fn feature_negotiation_and_driver_ok_activate_the_device() {
    let mut d = Driver::new();
    d.full_setup();
    assert_eq!(
        d.r(reg::STATUS),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
    );
    assert_eq!(d.log.lock().unwrap().activated, 1);
    assert_eq!(
        d.t.state().registers.driver_features,
        (1 << VIRTIO_F_VERSION_1) | FEATURE_X
    );
    assert!(d.t.state().queues.iter().all(|q| q.ready && q.size == 8));
}

#[test]
fn legacy_driver_without_version_1_is_refused() {
    let mut d = Driver::new();
    // A legacy driver accepts only low feature bits: FEATURES_OK must stay clear.
    let s = d.negotiate(FEATURE_X);
    assert_eq!(s & status::FEATURES_OK, 0);
    // Legacy drivers then use QueuePFN and go straight to DRIVER_OK: nothing starts.
    d.w(reg::QUEUE_SEL, 0);
    d.w(reg::LEGACY_GUEST_PAGE_SIZE, 4096);
    d.w(reg::LEGACY_QUEUE_PFN, 0x100);
    d.w(reg::STATUS, s | status::DRIVER_OK);
    let s = d.r(reg::STATUS);
    assert_eq!(s & status::DRIVER_OK, 0);
    assert_eq!(s & status::DEVICE_NEEDS_RESET, status::DEVICE_NEEDS_RESET);
    assert_eq!(d.log.lock().unwrap().activated, 0);
    // A reset and a modern driver make it usable.
    d.w(reg::STATUS, 0);
    d.full_setup();
    assert_eq!(d.log.lock().unwrap().activated, 1);
}

#[test]
fn refuses_features_the_device_did_not_offer() {
    let mut d = Driver::new();
    let s = d.negotiate((1 << VIRTIO_F_VERSION_1) | (1 << 7));
    assert_eq!(s & status::FEATURES_OK, 0);
}

#[test]
fn driver_ok_with_a_queue_outside_memory_sets_needs_reset() {
    let mut d = Driver::new();
    let s = d.negotiate((1 << VIRTIO_F_VERSION_1) | FEATURE_X);
    d.w(reg::QUEUE_SEL, 0);
    d.w(reg::QUEUE_NUM, 8);
    d.w(reg::QUEUE_DESC_LOW, 0x10_0000);
    d.w(reg::QUEUE_AVAIL_LOW, 0x11_0000);
    d.w(reg::QUEUE_USED_LOW, 0x12_0000);
    d.w(reg::QUEUE_READY, 1);
    d.w(reg::QUEUE_SEL, 1);
    d.w(reg::QUEUE_NUM, 8);
    d.w(reg::QUEUE_DESC_LOW, 0x13_0000);
    d.w(reg::QUEUE_AVAIL_LOW, 0x14_0000);
    d.w(reg::QUEUE_USED_HIGH, 0x10); // 64 GiB up: not guest memory
    d.w(reg::QUEUE_READY, 1);
    // Once ready, a queue's registers no longer change.
    d.w(reg::QUEUE_USED_HIGH, 0);
    assert_eq!(d.r(reg::QUEUE_USED_HIGH), 0x10);
    d.w(reg::STATUS, s | status::DRIVER_OK);
    assert_ne!(d.r(reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(d.log.lock().unwrap().activated, 0);
}

#[test]
fn queue_registers_are_frozen_after_driver_ok_and_checked_before() {
    let mut d = Driver::new();
    d.negotiate(1 << VIRTIO_F_VERSION_1);
    d.w(reg::QUEUE_SEL, 0);
    d.w(reg::QUEUE_NUM, 3); // not a power of two
    assert_eq!(d.r(reg::QUEUE_NUM), 16, "invalid size ignored");
    d.w(reg::QUEUE_NUM, 64); // over the maximum
    assert_eq!(d.r(reg::QUEUE_NUM), 16);
    d.w(reg::QUEUE_DESC_LOW, 0x1001); // misaligned
    assert_eq!(d.r(reg::QUEUE_DESC_LOW), 0);
    d.setup_queues();
    let s = d.r(reg::STATUS);
    d.w(reg::STATUS, s | status::DRIVER_OK);
    d.w(reg::QUEUE_SEL, 0);
    d.w(reg::QUEUE_NUM, 4);
    assert_eq!(d.r(reg::QUEUE_NUM), 8, "frozen while running");
}

#[test]
fn writing_zero_to_status_resets_device_and_queues() {
    let mut d = Driver::new();
    d.full_setup();
    d.w(reg::STATUS, 0);
    assert_eq!(d.r(reg::STATUS), 0);
    assert_eq!(d.log.lock().unwrap().resets, 1);
    let state = d.t.state();
    assert!(!state.registers.activated);
    assert_eq!(state.registers.driver_features, 0);
    assert!(state.queues.iter().all(|q| !q.ready && q.desc_table == 0));
}

#[test]
fn notify_reaches_the_device_and_interrupt_status_holds_until_acked() {
    let mut d = Driver::new();
    // Before DRIVER_OK a notify is consumed but not delivered.
    d.w(reg::QUEUE_NOTIFY, 1);
    d.t.process_queue_event(1);
    assert!(d.log.lock().unwrap().notified.is_empty());
    d.full_setup();
    d.w(reg::QUEUE_NOTIFY, 1);
    d.w(reg::QUEUE_NOTIFY, 9); // no such queue: ignored
    let fds = d.t.queue_event_fds();
    assert_eq!(fds.len(), 2);
    assert_eq!(fds[1], d.t.queue_events()[1].as_raw_fd());
    d.t.process_queue_event(1);
    assert_eq!(d.log.lock().unwrap().notified, vec![1]);
    assert_eq!(d.t.irq_event().read().unwrap(), 1, "one edge on the irqfd");
    assert_eq!(d.r(reg::INTERRUPT_STATUS), INTERRUPT_VRING);
    assert_eq!(
        d.r(reg::INTERRUPT_STATUS),
        INTERRUPT_VRING,
        "a level until acknowledged"
    );
    d.w(reg::INTERRUPT_ACK, INTERRUPT_VRING);
    assert_eq!(d.r(reg::INTERRUPT_STATUS), 0);
}

#[test]
fn config_space_reads_and_writes_reach_the_device() {
    let mut d = Driver::new();
    let mut b = [0u8; 2];
    d.t.read(MMIO_CONFIG_START + 2, &mut b);
    assert_eq!(&b, b"nf");
    d.t.write(MMIO_CONFIG_START, b"X");
    let mut b = [0u8; 1];
    d.t.read(MMIO_CONFIG_START, &mut b);
    assert_eq!(&b, b"X");
}

#[test]
fn odd_register_accesses_are_harmless() {
    let mut d = Driver::new();
    let mut b = [0u8; 2];
    d.t.read(reg::MAGIC_VALUE, &mut b);
    assert_eq!(b, [0xff, 0xff], "16-bit register reads are not served");
    let mut b = [0u8; 4];
    d.t.read(reg::MAGIC_VALUE + 1, &mut b);
    assert_eq!(b, [0xff; 4]);
    d.t.write(reg::STATUS, &[1, 0]);
    d.t.write(reg::STATUS + 2, &[1, 0, 0, 0]);
    assert_eq!(d.r(reg::STATUS), 0);
    d.w(0x0f0, 7); // unknown register
    d.w(reg::MAGIC_VALUE, 0); // read-only
    assert_eq!(d.r(reg::MAGIC_VALUE), MMIO_MAGIC);
    // Status bits cleared without a reset are ignored.
    d.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    d.w(reg::STATUS, status::ACKNOWLEDGE);
    assert_eq!(d.r(reg::STATUS), status::ACKNOWLEDGE | status::DRIVER);
}

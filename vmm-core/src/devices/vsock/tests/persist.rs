//! The vsock device on its virtio-mmio transport through save and restore: registers, queue
//! positions and the guest CID survive, connections do not, and the guest hears of it.

use std::os::unix::net::UnixListener;

use super::*;
use crate::devices::virtio::mmio::{MmioArgs, MmioStateError};
use crate::devices::vsock::EVENT_TRANSPORT_RESET;
use crate::devices::vsock::persist::VsockStateError;
use crate::persist::Persist;
use crate::persist_conformance::{self, Spec};

#[test]
fn vsock_device_passes_persist_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let device = VsockDevice::new(GUEST_CID as u32, dir.path().join("v.sock")).unwrap();
    let mut n = 0;
    let fresh = || {
        n += 1;
        dir.path().join(format!("restored-{n}.sock"))
    };
    let spec = Spec::of::<VsockDevice>()
        .carries("the guest CID", |s| s.guest_cid = 1000)
        .refuses("reserved CID 2", |s| s.guest_cid = 2)
        .refuses("CID 2^32-1", |s| s.guest_cid = u64::from(u32::MAX))
        .refuses("a CID above 32 bits", |s| s.guest_cid = 1 << 32);
    let saved = persist_conformance::check::<VsockDevice>(&device, fresh, &spec);
    assert_eq!(saved.guest_cid, GUEST_CID);
}

#[test]
fn transport_passes_persist_conformance_and_the_restored_guest_is_told_of_the_reset() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(g.port_path(70)).unwrap();
    g.post_rx(8, 4096);
    let _host = g.connect(&listener, 3001, 70);
    let (dir, mem) = (g.dir.path().to_owned(), g.mem.clone());
    let mut n = 0;
    let fresh = || {
        n += 1;
        MmioArgs {
            device: dir.join(format!("conformance-{n}.sock")),
            mem: mem.clone(),
        }
    };
    let spec = Spec::of::<MmioTransport<VsockDevice>>()
        .carries("ring positions", |s| {
            s.queues[RXQ].next_avail = s.queues[RXQ].next_avail.wrapping_add(3);
            s.queues[RXQ].next_used = s.queues[RXQ].next_used.wrapping_add(2);
        })
        .carries("interrupt status, selectors and config generation", |s| {
            s.registers.interrupt_status = 3;
            s.registers.queue_sel = 2;
            s.registers.device_features_sel = 1;
            s.registers.config_generation = 9;
        })
        .carries("the guest CID", |s| s.device.guest_cid = 7)
        .refuses("a queue size that is not a power of two", |s| {
            s.queues[0].size = 3
        })
        .refuses("features the device does not offer", |s| {
            s.registers.driver_features |= 1 << 20
        })
        .refuses("reserved CID 2", |s| s.device.guest_cid = 2);
    let saved = persist_conformance::check::<MmioTransport<VsockDevice>>(&g.dev, fresh, &spec);
    assert!(saved.registers.activated);
    assert_eq!(saved.device.guest_cid, GUEST_CID);
    assert_eq!(saved.queues.len(), 3);
    assert!(
        saved.queues[TXQ].next_avail > 0,
        "the connection moved the TX ring"
    );

    let restored_path = g.dir.path().join("restored.sock");
    let args = MmioArgs {
        device: restored_path.clone(),
        mem: g.mem.clone(),
    };
    let restored = MmioTransport::<VsockDevice>::restore(args, &saved).unwrap();
    assert!(
        restored_path.exists(),
        "the restored device listens on its new path"
    );
    assert_eq!(
        restored.device().connection_count(),
        0,
        "connections are not restored"
    );

    // The restored transport carries on with the same rings: the guest learns of the reset.
    g.dev = restored;
    g.dev.reset_vsock_transport();
    g.post_event_buffer();
    assert_eq!(g.events(), vec![EVENT_TRANSPORT_RESET]);
    // New connections reach host programs through the restored device's socket path.
    let listener = UnixListener::bind(g.dir.path().join("restored.sock_71")).unwrap();
    g.post_rx(8, 4096);
    let _host = g.connect(&listener, 3002, 71);
}

#[test]
fn restore_refuses_states_the_transport_would_never_reach() {
    let g = Guest::new();
    let saved = g.dev.save().unwrap();
    let restore = |state: &crate::devices::virtio::mmio::VirtioMmioState<_>, name: &str| {
        let args = MmioArgs {
            device: g.dir.path().join(name),
            mem: g.mem.clone(),
        };
        MmioTransport::<VsockDevice>::restore(args, state).err()
    };
    let mut s = saved.clone();
    s.queues.pop();
    assert!(matches!(
        restore(&s, "a"),
        Some(MmioStateError::QueueCount { .. })
    ));
    let mut s = saved.clone();
    s.queues[0].size = 3;
    assert!(matches!(
        restore(&s, "b"),
        Some(MmioStateError::Queue { queue: 0, .. })
    ));
    let mut s = saved.clone();
    s.queues[1].desc_table = u64::MAX - 0xf;
    assert!(matches!(
        restore(&s, "c"),
        Some(MmioStateError::Queue { queue: 1, .. })
    ));
    let mut s = saved.clone();
    s.registers.driver_features |= 1 << 20;
    assert!(matches!(
        restore(&s, "d"),
        Some(MmioStateError::Registers(_))
    ));
    let mut s = saved.clone();
    s.device.guest_cid = 2;
    match restore(&s, "e") {
        Some(MmioStateError::Device(e)) => {
            assert!(matches!(
                e.downcast_ref::<VsockStateError>(),
                Some(VsockStateError::InvalidCid(2))
            ));
        }
        other => panic!("expected a device error, got {other:?}"),
    }
}

//! Saving and restoring a virtio-mmio transport together with its device: the registers, each
//! queue's configuration and ring positions (virtio-queue's `QueueState`, mirrored here because
//! it is not serde), and the device's own [`Persist`] state.
//!
//! A restored transport gets fresh eventfds (the machine registers them with the new VM), and
//! every queue of an active device is marked as notified, so that buffers the guest offered
//! just before the save (whose notification the old VMM had not yet handled) are looked at.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{MmioError, MmioRegisters, MmioTransport};
use crate::devices::virtio::{VIRTIO_F_VERSION_1, VirtioDevice, status};
use crate::memory::GuestMemory;
use crate::persist::Persist;

/// One queue's configuration and ring positions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// The largest size the device offers.
    pub max_size: u16,
    /// The driver's chosen size.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest-physical address of the used (device) ring.
    pub used_ring: u64,
    /// The next available-ring entry the device will read.
    pub next_avail: u16,
    /// The next used-ring entry the device will write.
    pub next_used: u16,
    /// Whether VIRTIO_F_EVENT_IDX was negotiated for this queue.
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

/// A virtio-mmio device's whole state: transport registers, queues, and the device's state `S`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMmioState<S> {
    /// The transport's registers (status, features, selectors, interrupt status, ...).
    pub registers: MmioRegisters,
    /// Each queue, by index.
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state.
    pub device: S,
}

/// What a restored transport is built on.
pub struct MmioArgs<A> {
    /// What the device's own restore needs.
    pub device: A,
    /// Guest memory.
    pub mem: GuestMemory,
}

/// A transport state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum MmioStateError {
    /// The device's own state failed.
    #[error("virtio device state")]
    Device(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The transport could not be created.
    #[error(transparent)]
    Transport(#[from] MmioError),
    /// The state has another number of queues than the device.
    #[error("saved state has {saved} queues, the device has {device}")]
    QueueCount {
        /// In the state.
        saved: usize,
        /// On the device.
        device: usize,
    },
    /// A queue's saved configuration is invalid.
    #[error("virtio queue {queue}: {reason}")]
    Queue {
        /// The queue.
        queue: usize,
        /// What is wrong.
        reason: String,
    },
    /// The registers contradict each other or the device.
    #[error("virtio-mmio registers are inconsistent: {0}")]
    Registers(&'static str),
}

impl<D: VirtioDevice + Persist> Persist for MmioTransport<D> {
    type State = VirtioMmioState<D::State>;
    type ConstructorArgs<'a> = MmioArgs<D::ConstructorArgs<'a>>;
    type Error = MmioStateError;

    fn save(&self) -> Result<Self::State, MmioStateError> {
        Ok(VirtioMmioState {
            registers: self.regs,
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnapshot::from(q.state()))
                .collect(),
            device: self
                .device
                .save()
                .map_err(|e| MmioStateError::Device(Box::new(e)))?,
        })
    }

    fn restore(
        args: MmioArgs<D::ConstructorArgs<'_>>,
        state: &Self::State,
    ) -> Result<Self, MmioStateError> {
        let device = D::restore(args.device, &state.device)
            .map_err(|e| MmioStateError::Device(Box::new(e)))?;
        let mut transport = MmioTransport::new(device, args.mem)?;
        let max_sizes = transport.device.queue_max_sizes().to_vec();
        if state.queues.len() != max_sizes.len() {
            return Err(MmioStateError::QueueCount {
                saved: state.queues.len(),
                device: max_sizes.len(),
            });
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (queue, (saved, &max)) in state.queues.iter().zip(&max_sizes).enumerate() {
            if saved.max_size != max {
                return Err(MmioStateError::Queue {
                    queue,
                    reason: format!("maximum size {} saved, device offers {max}", saved.max_size),
                });
            }
            let q =
                Queue::try_from(QueueState::from(*saved)).map_err(|e| MmioStateError::Queue {
                    queue,
                    reason: e.to_string(),
                })?;
            queues.push(q);
        }
        let regs = state.registers;
        check_registers(&regs, transport.device.device_features())?;
        if regs.activated {
            for (queue, q) in queues.iter().enumerate() {
                if !q.is_valid(&transport.mem) {
                    return Err(MmioStateError::Queue {
                        queue,
                        reason: "an active device's queue lies outside guest memory".into(),
                    });
                }
            }
        }
        transport.queues = queues;
        transport.regs = regs;
        if regs.activated {
            for queue in 0..transport.queue_events.len() {
                transport.with_context(|_, ctx| ctx.requeue(queue));
            }
        }
        Ok(transport)
    }
}

/// What the transport itself never lets happen must not come from a file either.
fn check_registers(regs: &MmioRegisters, offered: u64) -> Result<(), MmioStateError> {
    let s = regs.status;
    if s & status::FEATURES_OK != 0 {
        if regs.driver_features & !offered != 0 {
            return Err(MmioStateError::Registers(
                "accepted features the device does not offer",
            ));
        }
        if regs.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(MmioStateError::Registers(
                "FEATURES_OK without VIRTIO_F_VERSION_1",
            ));
        }
    }
    if regs.activated && (s & status::DRIVER_OK == 0 || s & status::FEATURES_OK == 0) {
        return Err(MmioStateError::Registers(
            "activated without DRIVER_OK and FEATURES_OK",
        ));
    }
    Ok(())
}

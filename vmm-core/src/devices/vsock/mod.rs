//! The virtio-vsock device (device id 19) with Firecracker-style hybrid vsock on the host: guest
//! sockets reach host programs through Unix sockets (see [`unix`]).
//!
//! This module owns the virtio side: the configuration space (the guest's CID), the three
//! queues (RX 0, TX 1, event 2) and moving packets between them and the [`muxer::Muxer`], which
//! owns the connections. Packets are checked in [`packet`], connections and their credit live in
//! [`connection`].
//!
//! Events on the VMM thread: a TX notify reads every TX chain (bounded per call) into the muxer,
//! then fills RX; an RX notify fills RX; a readable muxer epoll fd processes host sockets, the
//! listener and timeouts, then fills RX. Filling RX stops when the guest has no RX buffer left;
//! its next RX notify resumes it. Work beyond a per-call budget is re-queued through the queue's
//! eventfd, so one busy guest cannot starve the rest of the VMM.
//!
//! Snapshots: the device's own state is its configuration ([`VsockConfigSpace`]); connections
//! are host state that cannot survive a restore. [`VsockDevice::reset_transport`] drops them all
//! and sends the guest `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, after which the guest's sockets
//! reconnect.

/// A warning the guest can cause, rate-limited (see [`guest_warn_allowed`]) so that a hostile
/// guest cannot flood the host's logs.
macro_rules! guest_warn {
    ($($arg:tt)+) => {
        if $crate::devices::vsock::guest_warn_allowed() {
            tracing::warn!($($arg)+);
        }
    };
}

pub mod connection;
pub mod muxer;
pub mod packet;
pub mod persist;
pub mod unix;

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use virtio_queue::{QueueOwnedT, QueueT};

use super::virtio::mmio::MmioTransport;
use super::virtio::{ActivateError, DeviceContext, VIRTIO_F_VERSION_1, VirtioDevice};
use muxer::Muxer;
use packet::{MAX_PKT_LEN, RxBuffer};

/// The virtio device id of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The host's CID (VMADDR_CID_HOST).
pub const HOST_CID: u64 = 2;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The RX queue (device to guest).
pub const RXQ: usize = 0;
/// The TX queue (guest to device).
pub const TXQ: usize = 1;
/// The event queue.
pub const EVQ: usize = 2;
/// Event id: the transport was reset; every connection is gone.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Most connections at once (any state); more are refused with RST.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host programs connected to the device socket but not yet done with `CONNECT P\n`.
pub const MAX_HANDSHAKES: usize = 64;
/// Receive buffer Thaw advertises per connection (`buf_alloc`): the most guest data it ever
/// holds for one connection.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Freed buffer space that makes Thaw send a CREDIT_UPDATE on its own.
pub const CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;
/// Most RST packets waiting for guest RX buffers.
pub const MAX_PENDING_RESETS: usize = 1024;
/// How long the guest has to accept (or refuse) a host-initiated connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a host program has to send its `CONNECT P\n` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the last guest data of a closed connection may take to reach the host.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Chains handled per queue per call before yielding to the rest of the VMM.
pub const PROCESS_BUDGET: usize = 256;

/// Most guest-caused warnings logged per second (per process); the rest are counted and the
/// count logged once the second is over.
pub const GUEST_WARNINGS_PER_SECOND: u32 = 20;

/// (window start, warnings logged in it, warnings suppressed in it).
static GUEST_WARNINGS: Mutex<(Option<Instant>, u32, u64)> = Mutex::new((None, 0, 0));

/// Whether one more guest-caused warning may be logged now.
pub fn guest_warn_allowed() -> bool {
    let mut w = match GUEST_WARNINGS.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    let now = Instant::now();
    let window_over =
        w.0.is_none_or(|start| now.duration_since(start) >= Duration::from_secs(1));
    if window_over {
        if w.2 > 0 {
            tracing::warn!(
                suppressed = w.2,
                "vsock: more guest-caused warnings were not logged"
            );
        }
        *w = (Some(now), 0, 0);
    }
    if w.1 < GUEST_WARNINGS_PER_SECOND {
        w.1 += 1;
        true
    } else {
        w.2 += 1;
        false
    }
}

/// The vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The host socket could not be created.
    #[error("cannot listen on vsock socket {path} (remove it if no other VM uses it)")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The epoll set could not be created or changed.
    #[error("vsock epoll failed")]
    Epoll(#[source] std::io::Error),
    /// The timeout timer could not be created.
    #[error("cannot create the vsock timer")]
    Timer(#[source] std::io::Error),
}

/// The device's configuration space, as the guest reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VsockConfigSpace {
    /// The guest's context id.
    pub guest_cid: u64,
}

/// A virtio-vsock device.
pub struct VsockDevice {
    config: VsockConfigSpace,
    muxer: Muxer,
    /// Payload of the TX packet being handled.
    tx_payload: Vec<u8>,
    /// Host data on its way into an RX buffer.
    rx_scratch: Box<[u8]>,
    /// TX processing stopped because too many resets wait for RX buffers.
    tx_paused: bool,
    /// A transport-reset event waits for an event-queue buffer.
    pending_transport_reset: bool,
}

impl VsockDevice {
    /// A device for a guest with CID `guest_cid`, listening for host programs on `uds_path`.
    pub fn new(guest_cid: u32, uds_path: PathBuf) -> Result<Self, VsockError> {
        let guest_cid = u64::from(guest_cid);
        Ok(Self {
            config: VsockConfigSpace { guest_cid },
            muxer: Muxer::new(guest_cid, uds_path)?,
            tx_payload: Vec::with_capacity(MAX_PKT_LEN as usize),
            rx_scratch: vec![0u8; MAX_PKT_LEN as usize].into_boxed_slice(),
            tx_paused: false,
            pending_transport_reset: false,
        })
    }

    /// The configuration space.
    pub fn config(&self) -> VsockConfigSpace {
        self.config
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Drops every connection (closing the host sockets) and tells the guest with a
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` event, sent now or as soon as the guest gives an
    /// event buffer. What a restore does, since no connection survives one.
    pub fn reset_transport(&mut self, ctx: &mut DeviceContext<'_>) {
        tracing::info!("vsock: transport reset; all connections dropped");
        self.muxer.reset_all();
        self.tx_paused = false;
        self.pending_transport_reset = true;
        self.process_event_queue(ctx);
    }

    fn process_tx(&mut self, ctx: &mut DeviceContext<'_>) {
        self.tx_paused = false;
        let Some((queue, mem)) = ctx.queue(TXQ) else {
            return;
        };
        let mut used = false;
        let mut requeue = false;
        for budget in (0..=PROCESS_BUDGET).rev() {
            if self.muxer.tx_blocked() {
                self.tx_paused = true;
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            if budget == 0 {
                queue.go_to_previous_position();
                requeue = true;
                break;
            }
            let head = chain.head_index();
            let result = packet::read_tx(mem, chain, &mut self.tx_payload);
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::warn!(error = %e, "vsock: cannot return a TX buffer");
            }
            used = true;
            match result {
                Ok(hdr) => self.muxer.handle_guest_packet(&hdr, &self.tx_payload),
                Err(rejected) => self.muxer.handle_rejected(&rejected),
            }
        }
        if used {
            ctx.signal_used_queue();
        }
        if requeue {
            ctx.requeue(TXQ);
        }
    }

    fn process_rx(&mut self, ctx: &mut DeviceContext<'_>) {
        let Some((queue, mem)) = ctx.queue(RXQ) else {
            return;
        };
        let mut used = false;
        let mut requeue = false;
        let mut budget = PROCESS_BUDGET;
        while self.muxer.has_rx_work() {
            if budget == 0 {
                requeue = true;
                break;
            }
            budget -= 1;
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = match RxBuffer::new(mem, chain) {
                Ok(buf) => match self.muxer.fill_rx(buf, &mut self.rx_scratch) {
                    Ok(Some(len)) => len,
                    Ok(None) => {
                        queue.go_to_previous_position();
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "vsock: cannot write an RX buffer");
                        0
                    }
                },
                Err(e) => {
                    guest_warn!(error = %e, "vsock: bad RX buffer returned unused");
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!(error = %e, "vsock: cannot return an RX buffer");
            }
            used = true;
        }
        if used {
            ctx.signal_used_queue();
        }
        if requeue {
            ctx.requeue(RXQ);
        }
        if self.tx_paused && !self.muxer.tx_blocked() {
            ctx.requeue(TXQ);
        }
    }

    fn process_event_queue(&mut self, ctx: &mut DeviceContext<'_>) {
        if !self.pending_transport_reset {
            return;
        }
        let Some((queue, mem)) = ctx.queue(EVQ) else {
            return;
        };
        let mut used = false;
        for _ in 0..PROCESS_BUDGET {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let result = packet::write_event(mem, chain, EVENT_TRANSPORT_RESET);
            let len = *result.as_ref().unwrap_or(&0);
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!(error = %e, "vsock: cannot return an event buffer");
            }
            used = true;
            match result {
                Ok(_) => {
                    self.pending_transport_reset = false;
                    break;
                }
                Err(e) => guest_warn!(error = %e, "vsock: bad event buffer returned unused"),
            }
        }
        if used {
            ctx.signal_used_queue();
        }
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn device_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.config.guest_cid.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *byte = usize::try_from(at)
                .ok()
                .and_then(|at| bytes.get(at).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::warn!(
            offset,
            len = data.len(),
            "vsock: configuration space is read-only"
        );
    }

    fn activate(&mut self, ctx: &mut DeviceContext<'_>) -> Result<(), ActivateError> {
        tracing::debug!(guest_cid = self.config.guest_cid, "vsock: driver ready");
        // Buffers the driver offered before DRIVER_OK were not acted on: look at every queue.
        self.process_tx(ctx);
        self.process_rx(ctx);
        self.process_event_queue(ctx);
        Ok(())
    }

    fn reset(&mut self) {
        self.muxer.reset_all();
        self.tx_paused = false;
        self.pending_transport_reset = false;
    }

    fn process_queue(&mut self, queue: usize, ctx: &mut DeviceContext<'_>) {
        match queue {
            TXQ => {
                self.process_tx(ctx);
                self.process_rx(ctx);
            }
            RXQ => self.process_rx(ctx),
            EVQ => self.process_event_queue(ctx),
            _ => {}
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn process_backend(&mut self, ctx: &mut DeviceContext<'_>) {
        self.muxer.process_events();
        self.process_rx(ctx);
    }
}

impl MmioTransport<VsockDevice> {
    /// Resets the vsock transport: see [`VsockDevice::reset_transport`].
    pub fn reset_vsock_transport(&mut self) {
        self.with_context(|device, ctx| device.reset_transport(ctx));
    }
}

#[cfg(test)]
mod tests;

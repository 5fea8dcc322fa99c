//! Devices the guest sees: the buses that route its port and MMIO accesses, the COM1 console,
//! the i8042 controller, the debug-exit port, and virtio devices on the virtio-mmio transport
//! (vsock).

pub mod block;
pub mod bus;
pub mod legacy;
pub mod serial;
pub mod virtio;
pub mod vsock;

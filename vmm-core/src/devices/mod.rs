//! Devices the guest sees: the buses that route its port and MMIO accesses, the COM1 console,
//! the i8042 controller and the debug-exit port.

pub mod bus;
pub mod legacy;
pub mod serial;

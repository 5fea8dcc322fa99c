//! The test guest's logic that touches no hardware directly: command-line parsing, the
//! virtqueue, the vsock and block driver cores and the disk test, the connection's credit
//! accounting, the hook registry, the bench wire format, the MP table parser, the memory
//! workload, the register keeper's pattern, the agent's status document and its invocation
//! commands. The guest image links it; `cargo test` runs its tests on the host, where simulated
//! vsock and block devices stand in for the VMM's.

#![cfg_attr(not(test), no_std)]

pub mod bench;
pub mod block;
pub mod cmdline;
pub mod conn;
pub mod driver;
pub mod hooks;
pub mod invoke_cmd;
pub mod keeper;
pub mod mptable;
pub mod ring;
pub mod status;
pub mod text;
pub mod virtq;
pub mod vsock;
pub mod workload;

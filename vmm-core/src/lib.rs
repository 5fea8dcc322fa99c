//! Thaw's virtual machine monitor core: KVM, guest memory, boot, vCPUs and devices. It knows
//! nothing of snapshot files, crypto, hooks or HTTP, and depends on no other workspace crate.

pub mod boot;
pub mod config;
pub mod cpuid;
pub mod devices;
pub mod exit;
pub mod kvm;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod persist;
pub mod vcpu;
pub mod vm_state;

#[cfg(test)]
pub(crate) mod persist_conformance;
#[cfg(test)]
pub(crate) mod test_support;

pub use config::{KernelSource, MachineConfig};
pub use exit::{ExitReason, ExitSignal};
pub use machine::{
    ControlError, Machine, MachineController, MachineError, MachineState, RestoreConfig,
    RestoreError,
};
pub use persist::Persist;

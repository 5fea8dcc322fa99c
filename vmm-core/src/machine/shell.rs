//! A machine's KVM resources without a guest in them: the VM with its TSS, irqchip and PIT,
//! guest memory registered as KVM memory slots, and the vCPUs, all created but never written.
//! A restore fills one in with a saved state ([`Machine::restore_in`](super::Machine::restore_in)).
//!
//! Why this is a separate step: building these costs most of a restore on some hosts and none
//! of it depends on the snapshot, only on the memory size and vCPU count. On this project's PVM
//! host each KVM memory-slot change waits for an SRCU grace period, so the first slot alone
//! takes 5–7 ms and a shell about 8 ms, against well under 1 ms of actual state to write. A
//! platform that expects restores (`thawd`) builds shells ahead of time, off the invoke path.
//!
//! A shell's memory is untouched: it can still be handed to a userfaultfd page server (lazy
//! restore) or filled in place (eager restore) before the machine is rebuilt on it.

use std::sync::Arc;

use kvm_ioctls::{VcpuFd, VmFd};

use super::{MachineError, create_vm, vm_step};
use crate::kvm;
use crate::memory::{self, GuestMemory};
use crate::vcpu::state::VcpuCaps;

/// What a shell is built for: the machine's memory size and vCPU count. A saved machine fits a
/// shell only if both are the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShellSpec {
    /// Bytes of guest RAM, laid out as [`memory::ram_ranges`] lays them out.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
}

/// An empty machine: KVM VM, memory slots and vCPUs, nothing loaded and nothing written.
pub struct MachineShell {
    // Field order is drop order: vCPU fds and the VM go before the memory KVM maps.
    pub(super) vcpus: Vec<VcpuFd>,
    pub(super) vm: VmFd,
    pub(super) memory: GuestMemory,
    pub(super) caps: Arc<VcpuCaps>,
    spec: ShellSpec,
}

impl MachineShell {
    /// Builds a shell over fresh anonymous guest memory (`MAP_NORESERVE`, nothing touched).
    pub fn create(spec: ShellSpec) -> Result<Self, MachineError> {
        let memory = memory::create_guest_memory(spec.mem_bytes)?;
        Self::with_memory(memory, spec.vcpus)
    }

    /// Builds a shell over `memory`, which the caller mapped (a restore's memory may come from
    /// elsewhere, such as a file). `memory` must be laid out as [`memory::ram_ranges`] lays out
    /// its size.
    pub fn with_memory(memory: GuestMemory, vcpus: u8) -> Result<Self, MachineError> {
        if vcpus == 0 {
            return Err(crate::config::ConfigError::NoVcpus.into());
        }
        let kvm = kvm::open()?;
        let vm = create_vm(&kvm)?;
        memory::register_with_kvm(&vm, &memory)?;
        let caps = Arc::new(VcpuCaps::probe(&kvm, &vm).map_err(vm_step("KVM_GET_MSR_INDEX_LIST"))?);
        let mut fds = Vec::with_capacity(usize::from(vcpus));
        for index in 0..vcpus {
            fds.push(
                vm.create_vcpu(u64::from(index))
                    .map_err(vm_step("KVM_CREATE_VCPU"))?,
            );
        }
        let spec = ShellSpec {
            mem_bytes: memory::total_bytes(&memory),
            vcpus,
        };
        Ok(Self {
            vcpus: fds,
            vm,
            memory,
            caps,
            spec,
        })
    }

    /// What the shell was built for.
    pub fn spec(&self) -> ShellSpec {
        self.spec
    }

    /// Its guest memory (shared with the machine later built on it).
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Its guest memory, to fill in place before a machine is built on it (no vCPU has run,
    /// so nothing else uses it yet).
    pub fn memory_mut(&mut self) -> &mut GuestMemory {
        &mut self.memory
    }
}

impl std::fmt::Debug for MachineShell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineShell")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

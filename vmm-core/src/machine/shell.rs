//! A machine's KVM resources without a guest in them: the VM with its TSS, irqchip and PIT,
//! guest memory registered as KVM memory slots, and the vCPUs, all created but never written.
//! A restore fills one in with a saved state ([`Machine::restore_in`](super::Machine::restore_in)).
//!
//! Why this is a separate step: none of it depends on the snapshot, only on the memory size and
//! vCPU count, so a platform that expects restores (`thawd`) builds shells ahead of time, off
//! the invoke path. On this project's PVM host a shell costs about 1 ms, as much as writing a
//! saved state into it; it cost 8 ms while memory was registered after the irqchip and PIT,
//! when each memory-slot change waited 5–7 ms for an SRCU grace period (see `create_vm`).
//!
//! A shell's memory is untouched: it can still be handed to a userfaultfd page server (lazy
//! restore, through [`MachineShell::host_ranges`]) or filled in place (eager restore, through
//! [`MachineShell::ram_mut`]) before the machine is rebuilt on it.
//!
//! Filling in place is a safe `&mut` borrow because the shell's memory has exactly one handle,
//! the shell's own, until a machine is built on it: the shell maps it itself ([`create`],
//! [`from_file`]; it never takes memory a caller could have kept a clone of), no method hands
//! out a `GuestMemory` (only addresses, and [`MappingHold`], which gives no access), and
//! [`Machine::restore_in`](super::Machine::restore_in), which gives the memory to devices and
//! vCPUs, consumes the shell. Its vCPUs cannot run before that either. [`ShellMemory`], the
//! memory of a shell still being built, holds that one handle until the shell takes it over.
//!
//! [`create`]: MachineShell::create
//! [`from_file`]: MachineShell::from_file

use std::fs::File;
use std::sync::Arc;

use kvm_ioctls::{VcpuFd, VmFd};

use super::{MachineError, create_vm, vm_step};
use crate::kvm;
use crate::memory::{self, FileRun, GuestMemory, HostRange, MappingHold};
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

/// Fresh guest memory for a shell not built yet ([`ShellMemory::build`] builds it). Mapping the
/// memory takes microseconds and building the rest of the shell about 1 ms on PVM: a lazy
/// restore maps the memory first, so that its page server can register the memory and start
/// installing while another thread builds the VM (the memory still has one handle, this one,
/// until the shell takes it).
pub struct ShellMemory {
    memory: GuestMemory,
    spec: ShellSpec,
}

impl ShellMemory {
    /// Maps fresh anonymous guest memory for `spec` (`MAP_NORESERVE`, nothing touched).
    pub fn create(spec: ShellSpec) -> Result<Self, MachineError> {
        if spec.vcpus == 0 {
            return Err(crate::config::ConfigError::NoVcpus.into());
        }
        let memory = memory::create_guest_memory(spec.mem_bytes)?;
        Ok(Self { memory, spec })
    }

    /// Where its RAM regions are mapped (see [`MachineShell::host_ranges`]).
    pub fn host_ranges(&self) -> Vec<HostRange> {
        memory::host_ranges(&self.memory)
    }

    /// Keeps the memory mapped, without access to it (see [`MachineShell::hold_mapping`]).
    pub fn hold_mapping(&self) -> MappingHold {
        MappingHold::new(self.memory.clone())
    }

    /// Builds the shell on this memory.
    pub fn build(self) -> Result<MachineShell, MachineError> {
        MachineShell::with_memory(self.memory, self.spec.vcpus)
    }
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
        ShellMemory::create(spec)?.build()
    }

    /// Builds a shell over `file` — guest memory laid out flat, region after region — mapped
    /// privately ([`memory::map_file_private`]: read on first touch, copied on first write,
    /// never written back). A benchmark baseline, Firecracker's `File` memory backend.
    pub fn from_file(file: &File, spec: ShellSpec) -> Result<Self, MachineError> {
        let memory = memory::map_file_private(file, spec.mem_bytes)?;
        Self::with_memory(memory, spec.vcpus)
    }

    /// Builds a shell over `memory`, which must be laid out as [`memory::ram_ranges`] lays out
    /// its size. Private: the shell must hold the only handle on its memory (see the module
    /// docs), so callers outside this module get shells whose memory the shell mapped.
    fn with_memory(memory: GuestMemory, vcpus: u8) -> Result<Self, MachineError> {
        if vcpus == 0 {
            return Err(crate::config::ConfigError::NoVcpus.into());
        }
        let kvm = kvm::open()?;
        let vm = create_vm(&kvm, &memory)?;
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

    /// The CPUID this host's vCPUs present ([`crate::cpuid::effective`]), asked of this
    /// shell's first vCPU, which has never run: no scratch VM (1.4–1.8 ms on PVM). Restoring a
    /// machine into the shell sets the vCPU's CPUID again.
    pub fn effective_cpuid(&self) -> Result<kvm_bindings::CpuId, MachineError> {
        let supported = crate::cpuid::supported(&kvm::open()?)?;
        self.effective_cpuid_given(&supported)
    }

    /// [`MachineShell::effective_cpuid`] with KVM's supported CPUID already read
    /// ([`crate::cpuid::supported`]).
    pub fn effective_cpuid_given(
        &self,
        supported: &kvm_bindings::CpuId,
    ) -> Result<kvm_bindings::CpuId, MachineError> {
        let vcpu = self
            .vcpus
            .first()
            .ok_or(crate::config::ConfigError::NoVcpus)?;
        Ok(crate::cpuid::effective_given(supported, vcpu)?)
    }

    /// Where its RAM regions are mapped, to register them with userfaultfd (a lazy restore's
    /// page server, the alternative to [`MachineShell::ram_mut`]).
    pub fn host_ranges(&self) -> Vec<HostRange> {
        memory::host_ranges(&self.memory)
    }

    /// Keeps its memory mapped, without access to it, past the machine built on it (for a page
    /// server, which writes it through raw addresses and must stop before it is unmapped).
    pub fn hold_mapping(&self) -> MappingHold {
        MappingHold::new(self.memory.clone())
    }

    /// Takes the stretches of guest RAM named in `runs` from `file`, mapped privately: read
    /// from the file on first touch, copied on the guest's first write, never written back
    /// (see [`memory::overlay_private`]). Machines restored from one decoded copy of a snapshot
    /// this way share every page none of them writes. The rest of the memory stays fresh (it
    /// reads as zero).
    ///
    /// `&mut self` is what makes replacing the pages sound: no slice of this memory can be
    /// alive ([`MachineShell::ram_mut`]'s borrow has ended), and the shell has never run.
    pub fn overlay_private(&mut self, file: &File, runs: &[FileRun]) -> Result<(), MachineError> {
        Ok(memory::overlay_private(&self.memory, file, runs)?)
    }

    /// Each RAM region as `(guest address, its bytes)`, writable: to fill the memory in place
    /// (an eager restore) before a machine is built on it. Fresh anonymous memory reads as
    /// zero.
    pub fn ram_mut(&mut self) -> Vec<(u64, &mut [u8])> {
        memory::raw_regions(&self.memory)
            .map(|(guest_addr, host, len)| {
                // SAFETY: `host` maps `len` writable bytes for as long as `self.memory`, and so
                // the `&mut self` borrow the slice carries, lives; regions do not overlap (the
                // collection refuses overlapping ones), so the slices are disjoint. Nothing else
                // reads or writes the bytes while the borrow lives: `self.memory` is the only
                // handle on this mapping (the shell mapped it and hands none out, see the module
                // docs) and is borrowed exclusively here; the shell's vCPUs have never run and
                // cannot until `Machine::restore_in` consumes it, and no device exists on it.
                // `host_ranges` gives only addresses; a page server registered through them
                // installs only pages not yet present, and a write here to such a page waits
                // for it, so it never changes a byte under these slices (restore does not do
                // both anyway). A file-backed shell (`from_file`, the benchmark baseline) maps
                // its file privately: pages written here are this process's own; pages not yet
                // written would show a change to the file, as any file mapping does, and the
                // baseline file is not written while it is mapped.
                let bytes = unsafe { std::slice::from_raw_parts_mut(host, len) };
                (guest_addr, bytes)
            })
            .collect()
    }
}

impl std::fmt::Debug for MachineShell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineShell")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

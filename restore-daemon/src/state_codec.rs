//! The bridge between the VMM's machine state and the snapshot file: the state blob's encoding
//! (bincode, bounded on decode) and the host fingerprint a snapshot records. Kept here, between
//! `vmm-core` (which knows no file format) and `snapshot` (which knows no KVM).

use snapshot::{CpuidEntry, Fingerprint, HostFacts};
use vmm_core::kvm::KvmFlavor;
use vmm_core::machine::MachineState;

/// The largest state blob a snapshot may carry. A machine's state is some tens of KiB per
/// vCPU (registers, xsave, the local APIC page, a few hundred MSRs); this leaves room for
/// every vCPU Lambda allows while refusing absurd lengths before allocating them.
pub const MAX_STATE_BYTES: usize = 16 << 20;

/// The machine state blob could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum StateCodecError {
    /// Encoding failed (a bug, not bad input).
    #[error("cannot encode the machine state")]
    Encode(#[source] bincode::error::EncodeError),
    /// The blob is not a machine state this build can read.
    #[error("the snapshot's machine state cannot be decoded")]
    Decode(#[source] bincode::error::DecodeError),
    /// Bytes are left over after the state.
    #[error("the snapshot's machine state has {0} trailing bytes")]
    Trailing(usize),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<MAX_STATE_BYTES>()
}

/// Encodes `state` for the snapshot.
pub fn encode(state: &MachineState) -> Result<Vec<u8>, StateCodecError> {
    bincode::serde::encode_to_vec(state, config()).map_err(StateCodecError::Encode)
}

/// Decodes a state blob (already authenticated by the snapshot reader; still bounded).
pub fn decode(bytes: &[u8]) -> Result<MachineState, StateCodecError> {
    let (state, used) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(StateCodecError::Decode)?;
    match bytes.len() - used.min(bytes.len()) {
        0 => Ok(state),
        extra => Err(StateCodecError::Trailing(extra)),
    }
}

/// The KVM flavor as the snapshot header names it: a snapshot taken on one flavor is only
/// restored on the same one (PVM and hardware KVM keep different vCPU state).
pub fn flavor_id(flavor: KvmFlavor) -> &'static str {
    match flavor {
        KvmFlavor::HardwareVmx => "hardware-vmx",
        KvmFlavor::HardwareSvm => "hardware-svm",
        KvmFlavor::Pvm => "pvm",
        KvmFlavor::Unknown => "unknown",
    }
}

fn entries(cpuid: &[kvm_bindings::kvm_cpuid_entry2]) -> Vec<CpuidEntry> {
    cpuid
        .iter()
        .map(|e| CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect()
}

/// This host's fingerprint, with the CPUID the saved guest's boot vCPU saw.
pub fn fingerprint(state: &MachineState) -> Fingerprint {
    let guest_cpuid = state
        .vcpus
        .first()
        .map(|v| entries(&v.cpuid))
        .unwrap_or_default();
    Fingerprint::of_this_host(guest_cpuid, flavor_id(vmm_core::kvm::flavor()))
}

/// What this host offers, to check a snapshot's fingerprint against before restoring it: the
/// CPUID its vCPUs really present (see [`vmm_core::cpuid::effective`]).
pub fn host_facts(kvm: &kvm_ioctls::Kvm) -> Result<HostFacts, vmm_core::cpuid::CpuidError> {
    let offered = vmm_core::cpuid::effective(kvm)?;
    Ok(HostFacts::of_this_host(
        flavor_id(vmm_core::kvm::flavor()),
        entries(offered.as_slice()),
    ))
}

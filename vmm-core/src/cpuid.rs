//! The CPUID each vCPU sees: what KVM supports on this host, with the topology rewritten per
//! vCPU so the guest finds one package of `vcpus` cores, one thread each, APIC ids 0..n.
//!
//! KVM reports host values for the topology leaves; left alone, every vCPU would claim the
//! host's APIC id and core count. Leaves that describe features are passed through unchanged,
//! so a snapshot's fingerprint can compare them.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2};
use kvm_ioctls::Kvm;

/// CPU vendor, from leaf 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Vendor {
    /// "GenuineIntel"
    Intel,
    /// "AuthenticAMD" (or "HygonGenuine", which follows AMD's leaves)
    Amd,
    /// Anything else.
    Other,
}

const LEAF_STD_BASIC: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// CPUID could not be read from KVM.
#[derive(Debug, thiserror::Error)]
#[error("cannot read CPUID from KVM")]
pub struct CpuidError(#[source] pub kvm_ioctls::Error);

/// An entry's fields in `kvm_cpuid_entry2` order (function, index, flags, eax, ebx, ecx, edx),
/// without the padding: what a snapshot's fingerprint records.
pub fn fields(e: &kvm_cpuid_entry2) -> [u32; 7] {
    [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx]
}

/// Reads the CPUID KVM supports on this host.
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError)
}

/// The CPUID a vCPU of this host actually presents to its guest: set on a scratch vCPU as
/// [`Machine::create`](crate::Machine::create) sets it, then read back. This, not
/// `KVM_GET_SUPPORTED_CPUID`, is what a snapshot's guest must find again: on PVM, KVM hands
/// guests the host CPU's own feature bits (its user mode runs natively), many more than it
/// lists as supported.
pub fn effective(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    let vm = kvm.create_vm().map_err(CpuidError)?;
    let vcpu = vm.create_vcpu(0).map_err(CpuidError)?;
    effective_on(kvm, &vcpu)
}

/// [`effective`], asked of `vcpu` instead of a scratch vCPU: it must never have run (KVM takes
/// a new CPUID only before a vCPU's first run), and whoever runs it sets its CPUID again.
pub fn effective_on(kvm: &Kvm, vcpu: &kvm_ioctls::VcpuFd) -> Result<CpuId, CpuidError> {
    effective_given(&supported(kvm)?, vcpu)
}

/// [`effective_on`] with KVM's supported CPUID already read (`supported`): reading it needs no
/// VM, so a caller can read it while the VM is still being built.
pub fn effective_given(supported: &CpuId, vcpu: &kvm_ioctls::VcpuFd) -> Result<CpuId, CpuidError> {
    vcpu.set_cpuid2(&for_vcpu(supported, 0, 1))
        .map_err(CpuidError)?;
    vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(CpuidError)
}

/// The vendor named in leaf 0 of `cpuid`.
pub fn vendor(cpuid: &CpuId) -> Vendor {
    let Some(leaf0) = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == LEAF_STD_BASIC)
    else {
        return Vendor::Other;
    };
    let mut id = [0u8; 12];
    id[0..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    id[8..12].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &id {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Bits needed to number `count` items (ceil(log2(count))).
fn id_bits(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

/// Returns `base` rewritten for vCPU `index` of a machine with `vcpus` vCPUs.
pub fn for_vcpu(base: &CpuId, index: u8, vcpus: u8) -> CpuId {
    let mut cpuid = base.clone();
    let vendor = vendor(base);
    let apic_id = u32::from(index);
    let count = u32::from(vcpus.max(1));
    let core_bits = id_bits(count);
    for entry in cpuid.as_mut_slice() {
        normalize_entry(entry, vendor, apic_id, count, core_bits);
    }
    cpuid
}

fn normalize_entry(
    entry: &mut kvm_cpuid_entry2,
    vendor: Vendor,
    apic_id: u32,
    count: u32,
    core_bits: u32,
) {
    match entry.function {
        LEAF_FEATURES => {
            // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
            entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
            if count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
            entry.ecx |= ECX_HYPERVISOR;
        }
        LEAF_CACHE_PARAMS if vendor == Vendor::Intel => {
            // EAX[31:26] cores per package - 1; EAX[25:14] threads sharing this cache - 1.
            let cache_level = (entry.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 { count - 1 } else { 0 };
            entry.eax = (entry.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
        }
        LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
            // Level 0: SMT (one thread per core). Level 1: cores. Higher levels: invalid.
            entry.edx = apic_id;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = 1 << 8;
                }
                1 => {
                    entry.eax = core_bits;
                    entry.ebx = count;
                    entry.ecx = (2 << 8) | 1;
                }
                other => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = other & 0xff;
                }
            }
        }
        LEAF_AMD_SIZE_IDS if vendor == Vendor::Amd => {
            // ECX[7:0] cores per package - 1; ECX[15:12] APIC id bits for cores.
            entry.ecx = (entry.ecx & !0xf0ff) | (core_bits << 12) | ((count - 1) & 0xff);
        }
        LEAF_AMD_EXT_APIC_ID if vendor == Vendor::Amd => {
            // EAX extended APIC id; EBX[7:0] core id, EBX[15:8] threads per core - 1 (zero);
            // ECX node 0 with one node per package.
            entry.eax = apic_id;
            entry.ebx = apic_id & 0xff;
            entry.ecx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn intel_leaf0() -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function: 0,
            eax: 0x1f,
            ebx: u32::from_le_bytes(*b"Genu"),
            edx: u32::from_le_bytes(*b"ineI"),
            ecx: u32::from_le_bytes(*b"ntel"),
            ..Default::default()
        }
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn detects_vendor_from_leaf0() {
        let cpuid = CpuId::from_entries(&[intel_leaf0()]).unwrap();
        assert_eq!(vendor(&cpuid), Vendor::Intel);
        let cpuid = CpuId::from_entries(&[entry(1, 0)]).unwrap();
        assert_eq!(vendor(&cpuid), Vendor::Other);
    }

    #[test]
    fn each_vcpu_gets_its_own_apic_id_and_topology() {
        let mut leaf1 = entry(1, 0);
        leaf1.ebx = 0x0708_0800; // host APIC id 7, 8 logical CPUs, CLFLUSH 8
        let base = CpuId::from_entries(&[
            intel_leaf0(),
            leaf1,
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
        ])
        .unwrap();
        let cpu1 = for_vcpu(&base, 1, 2);
        let l1 = find(&cpu1, 1, 0);
        assert_eq!(l1.ebx >> 24, 1);
        assert_eq!((l1.ebx >> 16) & 0xff, 2);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        let smt = find(&cpu1, 0xb, 0);
        assert_eq!((smt.ebx, smt.ecx >> 8, smt.edx), (1, 1, 1));
        let core = find(&cpu1, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (1, 2, 2, 1));
        let invalid = find(&cpu1, 0xb, 2);
        assert_eq!((invalid.ebx, invalid.ecx >> 8), (0, 0));
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut leaf1 = entry(1, 0);
        leaf1.edx = EDX_HTT;
        let base = CpuId::from_entries(&[intel_leaf0(), leaf1]).unwrap();
        let cpu0 = for_vcpu(&base, 0, 1);
        assert_eq!(find(&cpu0, 1, 0).edx & EDX_HTT, 0);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(8), 3);
    }

    #[test]
    fn effective_cpuid_keeps_what_a_vcpu_is_given() {
        if !crate::test_support::require_kvm() {
            return;
        }
        let kvm = crate::kvm::open().unwrap();
        let supported = supported(&kvm).unwrap();
        let effective = effective(&kvm).unwrap();
        let leaf = |c: &CpuId, f: u32| c.as_slice().iter().find(|e| e.function == f).copied();
        let (s1, e1) = (leaf(&supported, 1).unwrap(), leaf(&effective, 1).unwrap());
        // Whatever KVM adds, every supported feature a vCPU was given is still there.
        assert_eq!(e1.edx & s1.edx & !EDX_HTT, s1.edx & !EDX_HTT);
        assert_ne!(e1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(vendor(&effective), vendor(&supported));
    }
}

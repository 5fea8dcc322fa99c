//! The host fingerprint a snapshot records (CPU identity, the CPUID the guest saw, KVM flavor,
//! page size) and the check that a restoring host can run what the guest was promised: a guest
//! that saw a CPU feature will use it, and faults if the new host's KVM cannot offer it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One CPUID entry as KVM reports it (`kvm_cpuid_entry2` without padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl CpuidEntry {
    /// An entry from its fields in `kvm_cpuid_entry2` order (function, index, flags, eax, ebx,
    /// ecx, edx).
    pub fn from_fields([function, index, flags, eax, ebx, ecx, edx]: [u32; 7]) -> Self {
        CpuidEntry {
            function,
            index,
            flags,
            eax,
            ebx,
            ecx,
            edx,
        }
    }
}

/// KVM's `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`: the entry applies only to its `index`.
const SIGNIFICANT_INDEX: u32 = 1;

/// Vendor string and signature of a CPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuIdentity {
    /// "GenuineIntel", "AuthenticAMD", ... ("unknown" off x86_64).
    pub vendor: String,
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
}

impl CpuIdentity {
    /// The CPU this process runs on.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use core::arch::x86_64::__cpuid;
            // `__cpuid` is a safe function on x86_64: CPUID exists on every x86_64 CPU.
            let leaf0 = __cpuid(0);
            let mut vendor = [0u8; 12];
            vendor[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
            vendor[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
            vendor[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
            let eax = __cpuid(1).eax;
            let (family, model, stepping) = decode_signature(eax);
            CpuIdentity {
                vendor: String::from_utf8_lossy(&vendor).into_owned(),
                family,
                model,
                stepping,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            CpuIdentity {
                vendor: "unknown".into(),
                family: 0,
                model: 0,
                stepping: 0,
            }
        }
    }
}

/// Family, model and stepping from CPUID.01H:EAX, with the extended fields applied as both
/// vendors define them.
pub fn decode_signature(eax: u32) -> (u32, u32, u32) {
    let stepping = eax & 0xf;
    let base_model = (eax >> 4) & 0xf;
    let base_family = (eax >> 8) & 0xf;
    let ext_model = (eax >> 16) & 0xf;
    let ext_family = (eax >> 20) & 0xff;
    let family = if base_family == 0xf {
        base_family + ext_family
    } else {
        base_family
    };
    let model = if base_family == 0x6 || base_family == 0xf {
        (ext_model << 4) | base_model
    } else {
        base_model
    };
    (family, model, stepping)
}

/// What a snapshot records about the host and guest CPU it was taken on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub cpu: CpuIdentity,
    /// The CPUID entries the guest was given (`KVM_SET_CPUID2`).
    pub guest_cpuid: Vec<CpuidEntry>,
    /// "hardware", "pvm", ... as the caller names it.
    pub kvm_flavor: String,
    pub host_page_size: u32,
}

impl Fingerprint {
    /// A made-up fingerprint (an AMD host on PVM, no guest CPUID) for tests and fixtures that
    /// write snapshots no VM will restore.
    #[doc(hidden)]
    pub fn made_up() -> Fingerprint {
        Fingerprint {
            cpu: CpuIdentity {
                vendor: "AuthenticAMD".into(),
                family: 25,
                model: 1,
                stepping: 1,
            },
            guest_cpuid: Vec::new(),
            kvm_flavor: "pvm".into(),
            host_page_size: 4096,
        }
    }

    /// A fingerprint of this host with the guest's CPUID.
    pub fn of_this_host(guest_cpuid: Vec<CpuidEntry>, kvm_flavor: &str) -> Self {
        Fingerprint {
            cpu: CpuIdentity::detect(),
            guest_cpuid,
            kvm_flavor: kvm_flavor.to_owned(),
            host_page_size: host_page_size(),
        }
    }

    /// Refuses a host that differs in what a running guest can notice: vendor, KVM flavor, page
    /// size, or a CPU feature the guest saw that the host's KVM does not offer. A different
    /// family or model alone is allowed (the features decide) but logged.
    pub fn check_compatible(&self, host: &HostFacts) -> Result<(), Incompatibility> {
        if self.cpu.vendor != host.cpu.vendor {
            return Err(Incompatibility::CpuVendor {
                snapshot: self.cpu.vendor.clone(),
                host: host.cpu.vendor.clone(),
            });
        }
        if self.kvm_flavor != host.kvm_flavor {
            return Err(Incompatibility::KvmFlavor {
                snapshot: self.kvm_flavor.clone(),
                host: host.kvm_flavor.clone(),
            });
        }
        if self.host_page_size != host.page_size {
            return Err(Incompatibility::PageSize {
                snapshot: self.host_page_size,
                host: host.page_size,
            });
        }
        let mut missing = Vec::new();
        for reg in FEATURE_REGISTERS {
            let Some(guest) = lookup(&self.guest_cpuid, reg.function, reg.index) else {
                continue;
            };
            let seen = reg.reg.get(guest) & !reg.ignored;
            let offered = lookup(&host.supported_cpuid, reg.function, reg.index)
                .map_or(0, |e| reg.reg.get(e));
            let lacking = seen & !offered;
            for bit in (0..32u8).filter(|b| lacking & (1 << b) != 0) {
                missing.push(MissingFeature {
                    register: reg.clone(),
                    bit,
                });
            }
        }
        if !missing.is_empty() {
            return Err(Incompatibility::MissingFeatures(missing));
        }
        if (self.cpu.family, self.cpu.model) != (host.cpu.family, host.cpu.model) {
            tracing::warn!(
                snapshot_family = self.cpu.family,
                snapshot_model = self.cpu.model,
                host_family = host.cpu.family,
                host_model = host.cpu.model,
                "snapshot was taken on a different CPU family/model; allowed because every CPU \
                 feature the guest saw is offered here"
            );
        }
        Ok(())
    }
}

/// The restoring host, as the caller (who owns /dev/kvm) describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFacts {
    pub cpu: CpuIdentity,
    pub kvm_flavor: String,
    pub page_size: u32,
    /// `KVM_GET_SUPPORTED_CPUID` of the host's KVM.
    pub supported_cpuid: Vec<CpuidEntry>,
}

impl HostFacts {
    /// This host's CPU and page size, with the KVM facts the caller read.
    pub fn of_this_host(kvm_flavor: &str, supported_cpuid: Vec<CpuidEntry>) -> Self {
        HostFacts {
            cpu: CpuIdentity::detect(),
            kvm_flavor: kvm_flavor.to_owned(),
            page_size: host_page_size(),
            supported_cpuid,
        }
    }
}

pub fn host_page_size() -> u32 {
    // SAFETY: sysconf only reads a system constant; it has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

fn lookup(entries: &[CpuidEntry], function: u32, index: u32) -> Option<&CpuidEntry> {
    entries
        .iter()
        .find(|e| e.function == function && (e.index == index || e.flags & SIGNIFICANT_INDEX == 0))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Reg {
    fn get(self, e: &CpuidEntry) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }
}

/// A CPUID register whose bits are features.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureRegister {
    pub function: u32,
    pub index: u32,
    pub reg: Reg,
    /// Bits that are not host features: set by the guest OS at run time (OSXSAVE, OSPKE) or by
    /// the VMM for topology or emulation (HTT, APIC, TSC deadline, hypervisor).
    ignored: u32,
    names: &'static [(u8, &'static str)],
}

const LEAF1_ECX: &[(u8, &str)] = &[
    (0, "sse3"),
    (1, "pclmulqdq"),
    (3, "monitor"),
    (5, "vmx"),
    (9, "ssse3"),
    (12, "fma"),
    (13, "cx16"),
    (17, "pcid"),
    (19, "sse4.1"),
    (20, "sse4.2"),
    (21, "x2apic"),
    (22, "movbe"),
    (23, "popcnt"),
    (25, "aes"),
    (26, "xsave"),
    (28, "avx"),
    (29, "f16c"),
    (30, "rdrand"),
];
const LEAF1_EDX: &[(u8, &str)] = &[
    (0, "fpu"),
    (4, "tsc"),
    (5, "msr"),
    (6, "pae"),
    (8, "cx8"),
    (11, "sep"),
    (12, "mtrr"),
    (13, "pge"),
    (15, "cmov"),
    (16, "pat"),
    (19, "clflush"),
    (23, "mmx"),
    (24, "fxsr"),
    (25, "sse"),
    (26, "sse2"),
];
const LEAF7_EBX: &[(u8, &str)] = &[
    (0, "fsgsbase"),
    (3, "bmi1"),
    (4, "hle"),
    (5, "avx2"),
    (7, "smep"),
    (8, "bmi2"),
    (9, "erms"),
    (10, "invpcid"),
    (11, "rtm"),
    (16, "avx512f"),
    (17, "avx512dq"),
    (18, "rdseed"),
    (19, "adx"),
    (20, "smap"),
    (21, "avx512ifma"),
    (23, "clflushopt"),
    (24, "clwb"),
    (28, "avx512cd"),
    (29, "sha"),
    (30, "avx512bw"),
    (31, "avx512vl"),
];
const LEAF7_ECX: &[(u8, &str)] = &[
    (1, "avx512vbmi"),
    (2, "umip"),
    (3, "pku"),
    (5, "waitpkg"),
    (6, "avx512vbmi2"),
    (8, "gfni"),
    (9, "vaes"),
    (10, "vpclmulqdq"),
    (11, "avx512vnni"),
    (12, "avx512bitalg"),
    (14, "avx512vpopcntdq"),
    (16, "la57"),
    (22, "rdpid"),
    (25, "cldemote"),
    (27, "movdiri"),
    (28, "movdir64b"),
];
const LEAF7_EDX: &[(u8, &str)] = &[
    (4, "fsrm"),
    (8, "avx512vp2intersect"),
    (10, "md-clear"),
    (14, "serialize"),
    (22, "amx-bf16"),
    (24, "amx-tile"),
    (25, "amx-int8"),
    (26, "spec-ctrl"),
    (27, "stibp"),
    (29, "arch-capabilities"),
    (31, "ssbd"),
];
const EXT1_ECX: &[(u8, &str)] = &[
    (0, "lahf_lm"),
    (2, "svm"),
    (5, "abm"),
    (6, "sse4a"),
    (8, "3dnowprefetch"),
    (11, "xop"),
    (16, "fma4"),
    (21, "tbm"),
];
const EXT1_EDX: &[(u8, &str)] = &[
    (11, "syscall"),
    (20, "nx"),
    (22, "mmxext"),
    (26, "pdpe1gb"),
    (27, "rdtscp"),
    (29, "lm"),
];
const XSAVE1_EAX: &[(u8, &str)] = &[
    (0, "xsaveopt"),
    (1, "xsavec"),
    (2, "xgetbv1"),
    (3, "xsaves"),
];

const fn fr(
    function: u32,
    index: u32,
    reg: Reg,
    ignored: u32,
    names: &'static [(u8, &'static str)],
) -> FeatureRegister {
    FeatureRegister {
        function,
        index,
        reg,
        ignored,
        names,
    }
}

/// The registers whose bits are compared, in the order errors list them.
const FEATURE_REGISTERS: &[FeatureRegister] = &[
    // ECX: 24 TSC-deadline (emulated by KVM, advertised through a capability), 27 OSXSAVE,
    // 31 hypervisor.
    fr(1, 0, Reg::Ecx, (1 << 24) | (1 << 27) | (1 << 31), LEAF1_ECX),
    // EDX: 9 APIC (follows the APIC base MSR), 28 HTT (topology the VMM sets per vCPU count).
    fr(1, 0, Reg::Edx, (1 << 9) | (1 << 28), LEAF1_EDX),
    fr(7, 0, Reg::Ebx, 0, LEAF7_EBX),
    // ECX 4: OSPKE mirrors CR4.PKE.
    fr(7, 0, Reg::Ecx, 1 << 4, LEAF7_ECX),
    fr(7, 0, Reg::Edx, 0, LEAF7_EDX),
    fr(0x8000_0001, 0, Reg::Ecx, 0, EXT1_ECX),
    fr(0x8000_0001, 0, Reg::Edx, 0, EXT1_EDX),
    fr(0xd, 1, Reg::Eax, 0, XSAVE1_EAX),
];

/// A feature bit the guest saw and the host cannot offer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingFeature {
    pub register: FeatureRegister,
    pub bit: u8,
}

impl MissingFeature {
    pub fn name(&self) -> Option<&'static str> {
        self.register
            .names
            .iter()
            .find(|(b, _)| *b == self.bit)
            .map(|(_, n)| *n)
    }
}

impl fmt::Display for MissingFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.register;
        let reg = match r.reg {
            Reg::Eax => "EAX",
            Reg::Ebx => "EBX",
            Reg::Ecx => "ECX",
            Reg::Edx => "EDX",
        };
        if r.index != 0 {
            write!(
                f,
                "CPUID.{:02X}H.{}:{reg} bit {}",
                r.function, r.index, self.bit
            )?;
        } else {
            write!(f, "CPUID.{:02X}H:{reg} bit {}", r.function, self.bit)?;
        }
        if let Some(name) = self.name() {
            write!(f, " ({name})")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Incompatibility {
    #[error("snapshot was taken on a {snapshot} CPU; this host's CPU is {host}")]
    CpuVendor { snapshot: String, host: String },
    #[error("snapshot was taken under {snapshot} KVM; this host's KVM is {host}")]
    KvmFlavor { snapshot: String, host: String },
    #[error(
        "snapshot was taken on a host with {snapshot}-byte pages; this host's are {host} bytes"
    )]
    PageSize { snapshot: u32, host: u32 },
    #[error("{}", describe_missing(.0))]
    MissingFeatures(Vec<MissingFeature>),
}

fn describe_missing(missing: &[MissingFeature]) -> String {
    let list: Vec<String> = missing.iter().map(|m| format!("guest saw {m}")).collect();
    let them = if missing.len() == 1 { "it" } else { "them" };
    format!("{}; this host's KVM does not offer {them}", list.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
        let flags = if function == 7 || function == 0xd {
            SIGNIFICANT_INDEX
        } else {
            0
        };
        CpuidEntry {
            function,
            index,
            flags,
            eax: 0,
            ebx,
            ecx,
            edx,
        }
    }

    fn fingerprint(cpuid: Vec<CpuidEntry>) -> Fingerprint {
        Fingerprint {
            cpu: CpuIdentity {
                vendor: "AuthenticAMD".into(),
                family: 25,
                model: 1,
                stepping: 1,
            },
            guest_cpuid: cpuid,
            kvm_flavor: "pvm".into(),
            host_page_size: 4096,
        }
    }

    fn host(cpuid: Vec<CpuidEntry>) -> HostFacts {
        HostFacts {
            cpu: CpuIdentity {
                vendor: "AuthenticAMD".into(),
                family: 25,
                model: 1,
                stepping: 1,
            },
            kvm_flavor: "pvm".into(),
            page_size: 4096,
            supported_cpuid: cpuid,
        }
    }

    #[test]
    fn accepts_host_offering_every_feature() {
        let guest = vec![entry(1, 0, 0, 1 << 28, 1 << 26), entry(7, 0, 1 << 5, 0, 0)];
        let offered = vec![entry(1, 0, 0, !0, !0), entry(7, 0, !0, 0, 0)];
        assert_eq!(fingerprint(guest).check_compatible(&host(offered)), Ok(()));
    }

    #[test]
    fn names_a_missing_feature() {
        let guest = vec![entry(7, 0, 1 << 5, 0, 0)];
        let err = fingerprint(guest).check_compatible(&host(vec![entry(7, 0, 0, 0, 0)]));
        let err = err.unwrap_err();
        assert_eq!(
            err.to_string(),
            "guest saw CPUID.07H:EBX bit 5 (avx2); this host's KVM does not offer it"
        );
        let missing_leaf = fingerprint(vec![entry(0x8000_0001, 0, 0, 1 << 30, 0)])
            .check_compatible(&host(vec![]))
            .unwrap_err();
        assert_eq!(
            missing_leaf.to_string(),
            "guest saw CPUID.80000001H:ECX bit 30; this host's KVM does not offer it"
        );
    }

    #[test]
    fn ignores_os_and_vmm_owned_bits() {
        let guest = vec![entry(1, 0, 0, (1 << 27) | (1 << 31), 1 << 28)];
        assert_eq!(
            fingerprint(guest).check_compatible(&host(vec![entry(1, 0, 0, 0, 0)])),
            Ok(())
        );
    }

    #[test]
    fn respects_subleaf_index() {
        let mut xsave1 = entry(0xd, 1, 0, 0, 0);
        xsave1.eax = 1 << 3;
        let mut host_xsave0 = entry(0xd, 0, 0, 0, 0);
        host_xsave0.eax = !0;
        let err = fingerprint(vec![xsave1]).check_compatible(&host(vec![host_xsave0]));
        assert!(
            err.unwrap_err()
                .to_string()
                .contains("CPUID.0DH.1:EAX bit 3 (xsaves)"),
        );
    }

    #[test]
    fn refuses_other_vendor_flavor_or_page_size() {
        let f = fingerprint(vec![]);
        let mut h = host(vec![]);
        h.cpu.vendor = "GenuineIntel".into();
        assert!(matches!(
            f.check_compatible(&h),
            Err(Incompatibility::CpuVendor { .. })
        ));
        let mut h = host(vec![]);
        h.kvm_flavor = "hardware".into();
        assert!(matches!(
            f.check_compatible(&h),
            Err(Incompatibility::KvmFlavor { .. })
        ));
        let mut h = host(vec![]);
        h.page_size = 16384;
        assert!(matches!(
            f.check_compatible(&h),
            Err(Incompatibility::PageSize { .. })
        ));
        let mut h = host(vec![]);
        h.cpu.model = 99;
        assert_eq!(f.check_compatible(&h), Ok(()));
    }

    #[test]
    fn decodes_cpu_signatures() {
        // AMD Zen 3 (family 19h, model 01h, stepping 1) and Intel Skylake-SP (6, 0x55, 4).
        assert_eq!(decode_signature(0x00a0_0f11), (0x19, 0x01, 1));
        assert_eq!(decode_signature(0x0005_0654), (6, 0x55, 4));
    }

    #[test]
    fn detects_this_cpu() {
        let cpu = CpuIdentity::detect();
        assert!(!cpu.vendor.is_empty());
        assert!(host_page_size().is_power_of_two());
    }
}

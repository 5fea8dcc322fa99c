//! Opening `/dev/kvm` with a clear error when it cannot be used, and telling what kind of KVM
//! this host has. Thaw runs on hardware KVM (VMX/SVM) and on PVM, the software nested
//! virtualization of cloud microVMs, where guest CPL0 is emulated one instruction at a time
//! while guest CPL3 runs natively; what runs fast differs a lot, so the host must know which.

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// The KVM API version every current kernel reports.
pub const KVM_API_VERSION: i32 = 12;

/// /dev/kvm cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// There is no /dev/kvm.
    #[error(
        "/dev/kvm does not exist: this host has no KVM (load kvm_intel, kvm_amd or kvm_pvm, or run \
         on a machine with virtualization enabled)"
    )]
    Missing,
    /// /dev/kvm exists but cannot be opened.
    #[error("cannot open /dev/kvm (is this user in the kvm group?)")]
    Open(#[source] kvm_ioctls::Error),
    /// The kernel speaks another KVM API.
    #[error("KVM API version {found} is not supported (need {KVM_API_VERSION})")]
    ApiVersion {
        /// What the kernel reports.
        found: i32,
    },
    /// A capability Thaw needs is missing.
    #[error("KVM lacks a capability Thaw needs: {0}")]
    MissingCapability(&'static str),
}

/// Capabilities every Thaw VM relies on.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
];

/// Opens /dev/kvm and checks the API version and required capabilities.
pub fn open() -> Result<Kvm, KvmError> {
    if !Path::new("/dev/kvm").exists() {
        return Err(KvmError::Missing);
    }
    let kvm = Kvm::new().map_err(KvmError::Open)?;
    let found = kvm.get_api_version();
    if found != KVM_API_VERSION {
        return Err(KvmError::ApiVersion { found });
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(KvmError::MissingCapability(name));
        }
    }
    Ok(kvm)
}

/// What kind of KVM this host has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KvmFlavor {
    /// Hardware-assisted KVM on Intel VT-x.
    HardwareVmx,
    /// Hardware-assisted KVM on AMD-V.
    HardwareSvm,
    /// PVM: software nested virtualization (module `kvm_pvm`).
    Pvm,
    /// KVM is present but none of the above could be identified.
    Unknown,
}

impl KvmFlavor {
    /// The flavor as a snapshot's fingerprint names it: a snapshot taken on one flavor is only
    /// restored on the same one (PVM and hardware KVM keep different vCPU state).
    pub fn id(self) -> &'static str {
        match self {
            KvmFlavor::HardwareVmx => "hardware-vmx",
            KvmFlavor::HardwareSvm => "hardware-svm",
            KvmFlavor::Pvm => "pvm",
            KvmFlavor::Unknown => "unknown",
        }
    }

    /// Whether guest kernel (CPL0) code runs at hardware speed.
    pub fn runs_guest_kernels_natively(self) -> bool {
        matches!(self, KvmFlavor::HardwareVmx | KvmFlavor::HardwareSvm)
    }
}

impl std::fmt::Display for KvmFlavor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvmFlavor::HardwareVmx => "hardware KVM (Intel VT-x)",
            KvmFlavor::HardwareSvm => "hardware KVM (AMD-V)",
            KvmFlavor::Pvm => "PVM (software nested virtualization, module kvm_pvm)",
            KvmFlavor::Unknown => "unknown KVM flavor",
        })
    }
}

/// Host CPU virtualization features, from CPUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostCpuVirt {
    /// CPUID.1:ECX.VMX
    pub vmx: bool,
    /// CPUID.80000001h:ECX.SVM
    pub svm: bool,
    /// CPUID.1:ECX.hypervisor: this host is itself a VM.
    pub under_hypervisor: bool,
}

/// Reads the host's virtualization-related CPUID bits.
pub fn host_cpu_virt() -> HostCpuVirt {
    use std::arch::x86_64::__cpuid;
    let leaf1 = __cpuid(1);
    let max_ext = __cpuid(0x8000_0000).eax;
    let svm = max_ext >= 0x8000_0001 && (__cpuid(0x8000_0001).ecx & (1 << 2)) != 0;
    HostCpuVirt {
        vmx: leaf1.ecx & (1 << 5) != 0,
        svm,
        under_hypervisor: leaf1.ecx & (1 << 31) != 0,
    }
}

/// Decides the flavor from which KVM modules are loaded and the CPU's features.
pub fn classify(modules_dir: &Path, cpu: HostCpuVirt) -> KvmFlavor {
    let loaded = |name: &str| modules_dir.join(name).exists();
    if loaded("kvm_pvm") {
        KvmFlavor::Pvm
    } else if loaded("kvm_intel") && cpu.vmx {
        KvmFlavor::HardwareVmx
    } else if loaded("kvm_amd") && cpu.svm {
        KvmFlavor::HardwareSvm
    } else {
        KvmFlavor::Unknown
    }
}

/// This host's KVM flavor, learned once per process: the modules do not change under a
/// running VMM, and a jailed worker, which learns it before it loses sight of `/sys`, must
/// still know it.
pub fn flavor() -> KvmFlavor {
    static FLAVOR: std::sync::OnceLock<KvmFlavor> = std::sync::OnceLock::new();
    *FLAVOR.get_or_init(|| classify(Path::new("/sys/module"), host_cpu_virt()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules(names: &[&str]) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        for n in names {
            std::fs::create_dir(dir.0.join(n)).unwrap();
        }
        dir
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "thaw-kvm-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::SeqCst)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    const NO_VIRT: HostCpuVirt = HostCpuVirt {
        vmx: false,
        svm: false,
        under_hypervisor: true,
    };

    #[test]
    fn pvm_module_means_pvm() {
        let dir = modules(&["kvm", "kvm_pvm"]);
        assert_eq!(classify(&dir.0, NO_VIRT), KvmFlavor::Pvm);
        assert!(!KvmFlavor::Pvm.runs_guest_kernels_natively());
    }

    #[test]
    fn hardware_needs_module_and_cpu_feature() {
        let dir = modules(&["kvm", "kvm_intel"]);
        assert_eq!(classify(&dir.0, NO_VIRT), KvmFlavor::Unknown);
        let vmx = HostCpuVirt {
            vmx: true,
            ..NO_VIRT
        };
        assert_eq!(classify(&dir.0, vmx), KvmFlavor::HardwareVmx);
        let dir = modules(&["kvm", "kvm_amd"]);
        let svm = HostCpuVirt {
            svm: true,
            ..NO_VIRT
        };
        assert_eq!(classify(&dir.0, svm), KvmFlavor::HardwareSvm);
    }

    #[test]
    fn this_host_kvm_opens() {
        crate::test_support::require_kvm();
        let kvm = open().unwrap();
        assert_eq!(kvm.get_api_version(), KVM_API_VERSION);
    }
}

//! `thaw host-check`: what this host offers Thaw (KVM and its flavor, userfaultfd and its
//! features) and what that means for running guests here.

use std::path::Path;

use serde::Serialize;
use userfaultfd::{FeatureFlags, UffdBuilder};
use vmm_core::kvm::{self, KvmFlavor};

/// Everything `host-check` found.
#[derive(Debug, Serialize)]
pub struct HostReport {
    /// Whether /dev/kvm exists.
    pub kvm_present: bool,
    /// The KVM API version, if /dev/kvm could be opened.
    pub kvm_api_version: Option<i32>,
    /// Why KVM cannot be used, if it cannot.
    pub kvm_error: Option<String>,
    /// Hardware KVM, PVM or unknown.
    pub kvm_flavor: Option<KvmFlavor>,
    /// Host CPU vendor string.
    pub cpu_vendor: String,
    /// The host is itself a virtual machine.
    pub under_hypervisor: bool,
    /// CPUID reports VT-x.
    pub cpu_vmx: bool,
    /// CPUID reports AMD-V.
    pub cpu_svm: bool,
    /// Online host CPUs (the most vCPUs a guest may have).
    pub host_cpus: u64,
    /// userfaultfd as Thaw needs it (kernel-mode faults, for memory KVM touches).
    pub userfaultfd: UffdReport,
    /// Running as root: thawd can jail its workers.
    pub root: bool,
    /// cgroup v2 is mounted at /sys/fs/cgroup: jailed workers get memory.max and cpu.max.
    pub cgroup2: bool,
}

/// What userfaultfd offers.
#[derive(Debug, Serialize)]
pub struct UffdReport {
    /// Whether /dev/userfaultfd exists.
    pub dev_node: bool,
    /// Whether a userfaultfd that handles kernel-mode faults could be created.
    pub available: bool,
    /// Why not, if not.
    pub error: Option<String>,
    /// Optional features this kernel supports.
    pub features: Vec<&'static str>,
}

const UFFD_FEATURES: &[(FeatureFlags, &str)] = &[
    (FeatureFlags::EVENT_REMOVE, "EVENT_REMOVE"),
    (FeatureFlags::EVENT_UNMAP, "EVENT_UNMAP"),
    (FeatureFlags::EVENT_REMAP, "EVENT_REMAP"),
    (FeatureFlags::EVENT_FORK, "EVENT_FORK"),
    (FeatureFlags::MISSING_SHMEM, "MISSING_SHMEM"),
    (FeatureFlags::MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
    (FeatureFlags::PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
    (FeatureFlags::SIGBUS, "SIGBUS"),
    (FeatureFlags::THREAD_ID, "THREAD_ID"),
];

fn uffd_builder(features: FeatureFlags) -> UffdBuilder {
    let mut builder = UffdBuilder::new();
    // KVM reads guest memory from the kernel, so Thaw's page server must see kernel-mode faults.
    builder
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(features);
    builder
}

fn probe_uffd() -> UffdReport {
    let dev_node = Path::new("/dev/userfaultfd").exists();
    match uffd_builder(FeatureFlags::empty()).create() {
        Ok(_) => UffdReport {
            dev_node,
            available: true,
            error: None,
            features: UFFD_FEATURES
                .iter()
                .filter(|(flag, _)| uffd_builder(*flag).create().is_ok())
                .map(|(_, name)| *name)
                .collect(),
        },
        Err(e) => UffdReport {
            dev_node,
            available: false,
            error: Some(e.to_string()),
            features: Vec::new(),
        },
    }
}

fn cpu_vendor() -> String {
    let leaf0 = std::arch::x86_64::__cpuid(0);
    let mut id = Vec::with_capacity(12);
    for reg in [leaf0.ebx, leaf0.edx, leaf0.ecx] {
        id.extend_from_slice(&reg.to_le_bytes());
    }
    String::from_utf8_lossy(&id).into_owned()
}

/// Looks at this host.
pub fn check() -> HostReport {
    let kvm_present = Path::new("/dev/kvm").exists();
    let (kvm_api_version, kvm_error) = match kvm::open() {
        Ok(k) => (Some(k.get_api_version()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let cpu = kvm::host_cpu_virt();
    HostReport {
        kvm_present,
        kvm_api_version,
        kvm_error,
        kvm_flavor: kvm_present.then(kvm::flavor),
        cpu_vendor: cpu_vendor(),
        under_hypervisor: cpu.under_hypervisor,
        cpu_vmx: cpu.vmx,
        cpu_svm: cpu.svm,
        host_cpus: vmm_core::config::host_cpus(),
        userfaultfd: probe_uffd(),
        root: nix::unistd::geteuid().is_root(),
        cgroup2: restore_daemon::worker::jail::cgroup2_root().is_some(),
    }
}

impl HostReport {
    /// Whether Thaw can run guests here at all.
    pub fn usable(&self) -> bool {
        self.kvm_api_version.is_some()
    }

    /// What the findings mean for the user, one sentence each.
    pub fn advice(&self) -> Vec<String> {
        let mut advice = Vec::new();
        match (&self.kvm_error, self.kvm_flavor) {
            (Some(e), _) => advice.push(format!("Thaw cannot run guests here: {e}.")),
            (None, Some(KvmFlavor::Pvm)) => advice.push(
                "KVM is PVM: guest code at CPL3 runs natively but guest kernel (CPL0) code is \
                 emulated one instruction at a time, so a stock Linux kernel barely gets through \
                 early boot. Use the built-in test guest (`thaw run`) here; Linux guests need a \
                 host with hardware KVM (VT-x or AMD-V)."
                    .into(),
            ),
            (None, Some(f)) if f.runs_guest_kernels_natively() => advice.push(format!(
                "{f}: Linux guests and the test guest both run at full speed."
            )),
            (None, _) => advice.push(
                "KVM works but its flavor is unknown; expect guest kernels to run, but check \
                 their speed."
                    .into(),
            ),
        }
        if self.userfaultfd.available {
            if !self.userfaultfd.features.contains(&"EVENT_REMOVE") {
                advice.push(
                    "userfaultfd lacks EVENT_REMOVE: lazy restore cannot see the guest's balloon \
                     or madvise frees."
                        .into(),
                );
            } else {
                advice.push("userfaultfd is ready for lazy (on-demand) memory restore.".into());
            }
        } else {
            advice.push(format!(
                "userfaultfd for kernel faults is unavailable ({}): restores must load memory \
                 eagerly (--memory eager). Run as root, give access to /dev/userfaultfd, or set \
                 vm.unprivileged_userfaultfd=1.",
                self.userfaultfd
                    .error
                    .as_deref()
                    .unwrap_or("unknown reason")
            ));
        }
        match (self.root, self.cgroup2) {
            (false, _) => advice.push(
                "Not root: thawd cannot jail its workers here (it refuses to start unless its \
                 config sets jail = false)."
                    .into(),
            ),
            (true, false) => advice.push(
                "cgroup v2 is not mounted at /sys/fs/cgroup: thawd's jailed workers get no \
                 memory.max or cpu.max (namespaces, pivot_root, the unprivileged user, \
                 capabilities, rlimits and the seccomp filter still apply)."
                    .into(),
            ),
            (true, true) => advice.push(
                "thawd can jail its workers, each with its own cgroup (memory.max, cpu.max)."
                    .into(),
            ),
        }
        advice
    }
}

impl std::fmt::Display for HostReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        writeln!(f, "KVM")?;
        writeln!(f, "  /dev/kvm:          {}", yes_no(self.kvm_present))?;
        match self.kvm_api_version {
            Some(v) => writeln!(f, "  API version:       {v}")?,
            None => writeln!(
                f,
                "  API version:       unavailable ({})",
                self.kvm_error.as_deref().unwrap_or("unknown")
            )?,
        }
        if let Some(flavor) = self.kvm_flavor {
            writeln!(f, "  flavor:            {flavor}")?;
        }
        writeln!(f, "CPU")?;
        writeln!(f, "  vendor:            {}", self.cpu_vendor)?;
        writeln!(f, "  online CPUs:       {}", self.host_cpus)?;
        writeln!(f, "  under hypervisor:  {}", yes_no(self.under_hypervisor))?;
        writeln!(
            f,
            "  VT-x / AMD-V:      {} / {}",
            yes_no(self.cpu_vmx),
            yes_no(self.cpu_svm)
        )?;
        writeln!(f, "userfaultfd")?;
        writeln!(
            f,
            "  /dev/userfaultfd:  {}",
            yes_no(self.userfaultfd.dev_node)
        )?;
        match &self.userfaultfd.error {
            None => writeln!(f, "  kernel faults:     yes")?,
            Some(e) => writeln!(f, "  kernel faults:     no ({e})")?,
        }
        if self.userfaultfd.available {
            writeln!(
                f,
                "  features:          {}",
                self.userfaultfd.features.join(" ")
            )?;
        }
        writeln!(f, "thawd's worker jail")?;
        writeln!(f, "  running as root:   {}", yes_no(self.root))?;
        writeln!(f, "  cgroup v2:         {}", yes_no(self.cgroup2))?;
        writeln!(f, "What this means")?;
        for line in self.advice() {
            writeln!(f, "  - {line}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_this_host() {
        let report = check();
        assert!(!report.cpu_vendor.is_empty());
        assert!(report.host_cpus >= 1);
        let text = report.to_string();
        assert!(text.contains("KVM") && text.contains("userfaultfd"));
        assert!(!report.advice().is_empty());
        if report.kvm_present {
            assert!(report.usable(), "{:?}", report.kvm_error);
            assert_eq!(report.kvm_api_version, Some(12));
        }
    }
}

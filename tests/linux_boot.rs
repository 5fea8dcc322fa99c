//! Debian's cloud kernel (bzImage, fetched with apt) boots under Thaw. On hardware KVM it boots
//! to the initramfs's /init. On PVM, where guest kernel code is emulated one instruction at a
//! time, the tests check that the kernel gets through its decompressor to its first console
//! lines ("Linux version ...") and on to counting its CPUs from Thaw's ACPI tables, and say
//! plainly that the full boot was skipped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;

use std::time::Duration;

use fixture::{INIT_MARKER, TestVm, debian_kernel, hardware_kvm, require_kvm, test_initramfs};
use vmm_core::config::DEFAULT_LINUX_CMDLINE;
use vmm_core::{ExitReason, KernelSource, MachineConfig};

/// How long the kernel may take to print its banner. On hardware KVM it takes well under a
/// second; on PVM the in-guest LZ4 decompressor alone runs for minutes.
fn banner_timeout() -> Duration {
    if hardware_kvm() {
        Duration::from_secs(30)
    } else {
        Duration::from_secs(900)
    }
}

fn linux(kernel: &thaw::guest_image::DebianKernel, initrd: std::path::PathBuf) -> MachineConfig {
    MachineConfig {
        mem_mib: 512,
        vcpus: 1,
        kernel: KernelSource::Path(kernel.bzimage.clone()),
        initrd: Some(initrd),
        // earlyprintk makes the decompressor and early kernel print before the real console.
        cmdline: format!("{DEFAULT_LINUX_CMDLINE} earlyprintk=serial,ttyS0,115200 nokaslr"),
        vsock: None,
    }
}

/// The kernel's line once it has counted its CPUs. Debian's kernel has no MP-table parser, so it
/// gets the count from the ACPI MADT; without one it says "Allowing 1 CPUs".
fn cpus_line(vcpus: u8) -> String {
    format!("smpboot: Allowing {vcpus} CPUs")
}

/// One boot checks both the banner and the vCPU count: on PVM each boot costs minutes.
#[test]
fn debian_kernel_prints_linux_version_then_sees_every_vcpu_through_acpi() {
    const TEST: &str = "debian_kernel_prints_linux_version_then_sees_every_vcpu_through_acpi";
    if !require_kvm(TEST) {
        return;
    }
    let vcpus: u8 = if vmm_core::config::host_cpus() >= 2 {
        2
    } else {
        1
    };
    let cpus = cpus_line(vcpus);
    let stop_at = if vcpus >= 2 {
        cpus.as_str()
    } else {
        "Linux version"
    };
    let kernel = debian_kernel();
    let dir = tempfile::tempdir().unwrap();
    let initrd = test_initramfs(dir.path(), &kernel);
    let run = TestVm::new(MachineConfig {
        vcpus,
        ..linux(&kernel, initrd)
    })
    .timeout(banner_timeout())
    .stop_when(stop_at)
    .run();
    assert!(
        run.output.contains("Linux version"),
        "no \"Linux version\" within {:?} (reason: {}); console:\n{}",
        banner_timeout(),
        run.reason,
        run.output
    );
    assert!(run.output.contains(&kernel.release), "{}", run.output);
    if vcpus < 2 {
        println!("SKIPPED {TEST} (the vCPU count): host has fewer than 2 CPUs");
        return;
    }
    assert!(
        run.matched,
        "no \"{cpus}\" within {:?} (reason: {}); console:\n{}",
        banner_timeout(),
        run.reason,
        run.output
    );
    for complaint in [
        "ACPI BIOS Error",
        "ACPI BIOS Warning",
        "ACPI Error",
        "Incorrect checksum",
    ] {
        assert!(
            !run.output.contains(complaint),
            "the kernel complains about the ACPI tables ({complaint:?}); console:\n{}",
            run.output
        );
    }
}

#[test]
fn debian_kernel_boots_to_init() {
    if !require_kvm("debian_kernel_boots_to_init") {
        return;
    }
    if !hardware_kvm() {
        println!(
            "SKIPPED debian_kernel_boots_to_init: this host's KVM is {} — guest kernel code is \
             emulated instruction by instruction, so a full Linux boot does not finish here; it \
             runs on hosts with hardware KVM (VT-x or AMD-V)",
            vmm_core::kvm::flavor()
        );
        return;
    }
    let kernel = debian_kernel();
    let dir = tempfile::tempdir().unwrap();
    let initrd = test_initramfs(dir.path(), &kernel);
    let run = TestVm::new(linux(&kernel, initrd))
        .timeout(Duration::from_secs(60))
        .run();
    assert!(run.output.contains(INIT_MARKER), "console:\n{}", run.output);
    // The /init reboots; with reboot=k that is an i8042 reset, which ends the VM cleanly.
    assert_eq!(run.reason, ExitReason::Reset, "console:\n{}", run.output);
}

#[test]
fn test_init_runs_on_the_host_without_rebooting_it() {
    // The /init only reboots when it is PID 1, so its build and output can be checked here.
    let dir = tempfile::tempdir().unwrap();
    let init = fixture::build_test_init(dir.path());
    let out = std::process::Command::new(init).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("not PID 1"));
}

//! Debian's cloud kernel (bzImage, fetched with apt) boots under Thaw. On hardware KVM it boots
//! to the initramfs's /init. On PVM, where guest kernel code is emulated one instruction at a
//! time, the test checks that the kernel gets through its decompressor to its first console
//! lines ("Linux version ..."), and says plainly that the full boot was skipped.

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
    }
}

#[test]
fn debian_kernel_prints_linux_version() {
    if !require_kvm("debian_kernel_prints_linux_version") {
        return;
    }
    let kernel = debian_kernel();
    let dir = tempfile::tempdir().unwrap();
    let initrd = test_initramfs(dir.path(), &kernel);
    let run = TestVm::new(linux(&kernel, initrd))
        .timeout(banner_timeout())
        .stop_when("Linux version")
        .run();
    assert!(
        run.matched,
        "no \"Linux version\" within {:?} (reason: {}); console:\n{}",
        banner_timeout(),
        run.reason,
        run.output
    );
    assert!(run.output.contains(&kernel.release), "{}", run.output);
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

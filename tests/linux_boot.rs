//! Debian's cloud kernel (bzImage, fetched with apt) boots under Thaw to the initramfs's /init
//! on 1 and 2 vCPUs, with every vCPU online, a console user space can write to, and no
//! complaint about Thaw's ACPI tables. Where Linux guests cannot boot at speed (PVM), the test
//! runs in the nested-KVM host (`fixture::nested`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;

use std::time::Duration;

use fixture::nested::{Group, Verdict, verdict};
use fixture::{INIT_MARKER, TestVm, debian_kernel, test_initramfs};
use vmm_core::config::DEFAULT_LINUX_CMDLINE;
use vmm_core::{ExitReason, KernelSource, MachineConfig};

const BOOTS: &str = "debian_kernel_boots_to_init_with_every_vcpu_online";

/// The Linux tests of this binary, and what they need built beforehand. Two CPUs: the test
/// boots a guest with two vCPUs (a short run, so the two-CPU hazards of the nested host, see
/// `fixture::nested`, rarely meet it).
static LINUX: Group = Group::new(&[BOOTS], prepare).with_cpus(2);

/// Builds the kernel cache and the test initramfs on the host (the nested host finds both).
fn prepare() -> Vec<(String, String)> {
    test_initramfs(&debian_kernel());
    Vec::new()
}

fn linux(vcpus: u8, cmdline: String) -> MachineConfig {
    let kernel = debian_kernel();
    MachineConfig {
        mem_mib: 256,
        vcpus,
        initrd: Some(test_initramfs(&kernel)),
        kernel: KernelSource::Path(kernel.bzimage),
        cmdline,
        vsock: None,
        disks: Vec::new(),
    }
}

#[test]
fn debian_kernel_boots_to_init_with_every_vcpu_online() {
    if !LINUX.runs_here(BOOTS) {
        return;
    }
    let kernel = debian_kernel();
    // Each console byte is an exit to the VMM, costly in the nested host: the second boot shows
    // only warnings and errors (which still include any complaint about the ACPI tables).
    for (vcpus, cmdline) in [
        (1u8, DEFAULT_LINUX_CMDLINE.to_owned()),
        (2, format!("{DEFAULT_LINUX_CMDLINE} loglevel=5")),
    ] {
        let run = TestVm::new(linux(vcpus, cmdline))
            .timeout(Duration::from_secs(120))
            .run();
        let console = &run.output;
        if vcpus == 1 {
            assert!(console.contains(&kernel.release), "{console}");
            // Debian's kernel has no MP-table parser: it counts CPUs from the ACPI MADT.
            assert!(console.contains("smpboot: Allowing 1 CPUs"), "{console}");
        }
        // Written by /init to /dev/console: user space has a console (COM1's IRQ 4 is mapped).
        assert!(console.contains(INIT_MARKER), "{console}");
        let online = if vcpus == 1 { "0" } else { "0-1" };
        assert!(
            console.contains(&format!("thaw-test-init: cpus online {online}\r\n")),
            "{vcpus} vCPUs: expected CPUs {online} online; console:\n{console}"
        );
        for complaint in [
            "ACPI BIOS Error",
            "ACPI BIOS Warning",
            "ACPI Error",
            "Incorrect checksum",
        ] {
            assert!(
                !console.contains(complaint),
                "the kernel complains about the ACPI tables ({complaint:?}); console:\n{console}"
            );
        }
        // The /init reboots; with reboot=k that is an i8042 reset, which ends the VM cleanly.
        assert_eq!(run.reason, ExitReason::Reset, "console:\n{console}");
        println!("{BOOTS}: {vcpus} vCPU(s): /init ran with CPUs {online} online");
    }
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

#[test]
fn nested_verdicts_come_from_the_libtest_summary() {
    let ok = "running 2 tests\ntest a ... ok\ntest b ... \nsome output\nok\n\n\
              test result: ok. 2 passed; 0 failed\n";
    assert_eq!(verdict(ok, "a"), Verdict::Passed);
    assert_eq!(verdict(ok, "b"), Verdict::Passed);
    assert_eq!(verdict(ok, "c"), Verdict::DidNotRun);
    let failed = "test a ... ok\ntest b ... FAILED\n\nfailures:\n\n---- b stdout ----\n\
                  panicked\n\nfailures:\n    b\n\ntest result: FAILED. 1 passed; 1 failed\n";
    assert_eq!(verdict(failed, "a"), Verdict::Passed);
    assert_eq!(verdict(failed, "b"), Verdict::Failed);
    assert_eq!(verdict("test a ... ", "a"), Verdict::DidNotRun);
    // As a serial console prints it.
    let console = failed.replace('\n', "\r\n");
    assert_eq!(verdict(&console, "a"), Verdict::Passed);
    assert_eq!(verdict(&console, "b"), Verdict::Failed);
}

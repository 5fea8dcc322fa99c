//! The built-in test guest boots on real KVM through the Linux 64-bit boot path and does its
//! work at CPL3.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;

use fixture::{TestVm, require_kvm};
use vmm_core::ExitReason;

#[test]
fn prints_banner_from_cpl3_and_exits_zero() {
    if !require_kvm("prints_banner_from_cpl3_and_exits_zero") {
        return;
    }
    let run = TestVm::test_guest(1, "").run();
    assert_eq!(run.reason, ExitReason::GuestExit(0), "{}", run.output);
    assert!(
        run.output.contains("banner from CPL3"),
        "no CPL3 banner in: {}",
        run.output
    );
    assert!(run.output.contains("cpus online: 1/1"), "{}", run.output);
}

#[test]
fn both_vcpus_run_guest_code() {
    if !require_kvm("both_vcpus_run_guest_code") {
        return;
    }
    if vmm_core::config::host_cpus() < 2 {
        println!("SKIPPED both_vcpus_run_guest_code: this host has one CPU; --vcpus 2 needs two");
        return;
    }
    let run = TestVm::test_guest(2, "").run();
    assert_eq!(run.reason, ExitReason::GuestExit(0), "{}", run.output);
    assert!(run.output.contains("cpus online: 2/2"), "{}", run.output);
    // Each CPU reports its own local APIC id from CPL3.
    assert!(
        run.output.contains("cpu0: apic id 0, running at CPL3"),
        "{}",
        run.output
    );
    assert!(
        run.output.contains("cpu1: apic id 1, running at CPL3"),
        "{}",
        run.output
    );
}

#[test]
fn guest_exit_code_reaches_the_host() {
    if !require_kvm("guest_exit_code_reaches_the_host") {
        return;
    }
    let run = TestVm::test_guest(1, "console=ttyS0 thaw.exit=42").run();
    assert_eq!(run.reason, ExitReason::GuestExit(42), "{}", run.output);
}

#[test]
fn guest_rejects_unknown_option() {
    if !require_kvm("guest_rejects_unknown_option") {
        return;
    }
    let run = TestVm::test_guest(1, "thaw.no-such-option=1").run();
    assert_eq!(run.reason, ExitReason::GuestExit(2), "{}", run.output);
    assert!(
        run.output.contains("thaw.no-such-option=1"),
        "{}",
        run.output
    );
}

#[test]
fn boots_with_memory_above_the_mmio_gap() {
    if !require_kvm("boots_with_memory_above_the_mmio_gap") {
        return;
    }
    let mut vm = vmm_core::MachineConfig {
        mem_mib: 4096,
        vcpus: 1,
        kernel: thaw::test_guest::kernel(),
        initrd: None,
        cmdline: String::new(),
        vsock: None,
        disks: Vec::new(),
    };
    let run = TestVm::new(vm.clone()).run();
    assert_eq!(run.reason, ExitReason::GuestExit(0), "{}", run.output);
    vm.mem_mib = vmm_core::config::MAX_MEM_MIB;
    let run = TestVm::new(vm).run();
    assert_eq!(run.reason, ExitReason::GuestExit(0), "{}", run.output);
}

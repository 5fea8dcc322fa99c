//! Machine tests on real KVM: booting, stopping, devices on the command line and in ACPI.

use super::*;
use crate::test_support::{Capture, require_kvm, tiny_elf};

/// `out` "OK" to COM1, then `code` to the debug-exit port.
fn print_ok_and_exit(code: u8) -> Vec<u8> {
    vec![
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'O', 0xee, // mov al, 'O'; out dx, al
        0xb0, b'K', 0xee, // mov al, 'K'; out dx, al
        0x66, 0xba, 0x01, 0x05, // mov dx, 0x501
        0xb0, code, 0xee, // mov al, code; out dx, al
        0xf4, // hlt
    ]
}

fn config(image: Vec<u8>, vcpus: u8) -> MachineConfig {
    crate::test_support::tiny_config(image, vcpus)
}

#[test]
fn boots_elf_in_long_mode_and_exits_with_guest_code() {
    if !require_kvm() {
        return;
    }
    let out = Capture::default();
    let elf = tiny_elf(0x10_0000, &print_ok_and_exit(7));
    let machine = Machine::create(&config(elf, 1), Box::new(out.clone())).unwrap();
    let reason = machine.run(None).unwrap();
    assert_eq!(reason, ExitReason::GuestExit(7));
    assert_eq!(out.text(), "OK");
}

#[test]
fn host_stop_ends_a_halted_guest() {
    if !require_kvm() {
        return;
    }
    // cli; hlt: the vCPU sleeps inside KVM_RUN until kicked.
    let elf = tiny_elf(0x10_0000, &[0xfa, 0xf4, 0xeb, 0xfd]);
    let machine = Machine::create(&config(elf, 1), Box::new(std::io::sink())).unwrap();
    let exit = machine.exit_signal();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        exit.request(ExitReason::Stopped);
    });
    assert_eq!(machine.run(None).unwrap(), ExitReason::Stopped);
    stopper.join().unwrap();
}

#[test]
fn vsock_device_is_on_the_cmdline_in_acpi_and_its_socket_goes_with_the_machine() {
    if !require_kvm() {
        return;
    }
    use crate::config::VsockConfig;
    use crate::layout::{ACPI_END, CMDLINE_START, RSDP_START};
    use vm_memory::{Bytes, GuestAddress};

    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let mut cfg = config(tiny_elf(0x10_0000, &print_ok_and_exit(3)), 1);
    cfg.cmdline = "console=ttyS0".into();
    cfg.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: uds.clone(),
    });
    let machine = Machine::create(&cfg, Box::new(std::io::sink())).unwrap();
    assert!(uds.exists(), "the host socket is listening");
    let mut cmdline = vec![0u8; 128];
    machine
        .memory()
        .read_slice(&mut cmdline, GuestAddress(CMDLINE_START))
        .unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(
        cmdline.starts_with("console=ttyS0 virtio_mmio.device=4K@0xd0000000:5\0"),
        "{cmdline}"
    );
    let mut acpi = vec![0u8; (ACPI_END - RSDP_START) as usize];
    machine
        .memory()
        .read_slice(&mut acpi, GuestAddress(RSDP_START))
        .unwrap();
    assert!(
        acpi.windows(8).any(|w| w == b"LNRO0005"),
        "no virtio-mmio device in the DSDT"
    );
    let vsock = machine.vsock().unwrap();
    assert_eq!(lock(&vsock).device().config().guest_cid, 3);
    drop(vsock);
    assert_eq!(machine.run(None).unwrap(), ExitReason::GuestExit(3));
    assert!(!uds.exists(), "the host socket is removed with the machine");
    // A socket path that exists is refused, not stolen.
    std::fs::write(&uds, b"").unwrap();
    assert!(matches!(
        Machine::create(&cfg, Box::new(std::io::sink())),
        Err(MachineError::Vsock(_))
    ));
}

#[test]
fn a_disk_that_cannot_be_used_is_named_in_the_error() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, [0u8; 1000]).unwrap();
    for (path, want) in [
        (dir.path().join("missing.img"), "cannot open the disk image"),
        (odd, "not a multiple of 512"),
    ] {
        let mut cfg = config(tiny_elf(0x10_0000, &[0xf4]), 1);
        cfg.disks = vec![crate::config::DiskConfig {
            path: path.clone(),
            read_only: true,
            id: "x".into(),
        }];
        let err = match Machine::create(&cfg, Box::new(std::io::sink())) {
            Err(e) => e,
            Ok(_) => panic!("{} was accepted", path.display()),
        };
        let text = format!("{err}: {:?}", std::error::Error::source(&err));
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(
            matches!(&err, MachineError::Disk { source, .. } if source.to_string().contains(want)),
            "{text}"
        );
    }
}

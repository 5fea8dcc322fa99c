//! Tests of `acpi.rs`, kept apart so the module itself stays short.

use super::*;
use crate::memory;

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap())
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// Guest memory holding the tables, read back the way the kernel finds them.
struct Guest {
    mem: GuestMemory,
}

impl Guest {
    fn with_tables(vcpus: u8, devices: &[VirtioMmioDevice]) -> Self {
        let mem = memory::create_guest_memory(128 << 20).unwrap();
        let rsdp = write(&mem, vcpus, devices).unwrap();
        assert_eq!(rsdp, GuestAddress(RSDP_START));
        Self { mem }
    }

    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn rsdp(&self) -> Vec<u8> {
        self.bytes(RSDP_START, 36)
    }

    /// A system description table: its header's length says how much to read.
    fn table(&self, addr: u64) -> Vec<u8> {
        let header = self.bytes(addr, 36);
        let len = u32_at(&header, 4) as usize;
        assert!(len >= 36, "table at {addr:#x} is {len} bytes long");
        let table = self.bytes(addr, len);
        assert_eq!(sum(&table), 0, "checksum of {:?}", sig(&table));
        table
    }

    fn xsdt(&self) -> Vec<u8> {
        self.table(u64_at(&self.rsdp(), 24))
    }

    /// The tables the XSDT lists, by signature.
    fn listed(&self) -> Vec<([u8; 4], u64)> {
        let xsdt = self.xsdt();
        (36..xsdt.len())
            .step_by(8)
            .map(|at| u64_at(&xsdt, at))
            .map(|addr| (sig(&self.table(addr)), addr))
            .collect()
    }

    fn listed_table(&self, signature: &[u8; 4]) -> Vec<u8> {
        let (_, addr) = self
            .listed()
            .into_iter()
            .find(|(s, _)| s == signature)
            .unwrap_or_else(|| panic!("the XSDT does not list {signature:?}"));
        self.table(addr)
    }

    fn dsdt(&self) -> Vec<u8> {
        let fadt = self.listed_table(b"FACP");
        let x_dsdt = u64_at(&fadt, 140);
        let dsdt32 = u64::from(u32_at(&fadt, 40));
        let addr = if x_dsdt != 0 { x_dsdt } else { dsdt32 };
        self.table(addr)
    }
}

fn sig(table: &[u8]) -> [u8; 4] {
    table[..4].try_into().unwrap()
}

/// MADT interrupt controller structures as (type, bytes).
fn madt_entries(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut entries = Vec::new();
    let mut at = 44;
    while at < madt.len() {
        let (kind, len) = (madt[at], usize::from(madt[at + 1]));
        assert!(len >= 2 && at + len <= madt.len(), "bad MADT entry at {at}");
        entries.push((kind, madt[at..at + len].to_vec()));
        at += len;
    }
    entries
}

#[test]
fn rsdp_checksums_are_valid_and_it_points_to_the_xsdt() {
    let guest = Guest::with_tables(1, &[]);
    let rsdp = guest.rsdp();
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
    assert_eq!(rsdp[15], 2, "revision 2: the XSDT address is valid");
    assert_eq!(u32_at(&rsdp, 20), 36, "length");
    assert_eq!(sum(&rsdp), 0, "extended checksum");
    assert_eq!(&guest.xsdt()[..4], b"XSDT");
}

#[test]
fn xsdt_lists_fadt_and_madt_and_fadt_points_at_the_dsdt() {
    let guest = Guest::with_tables(2, &[]);
    let mut listed: Vec<[u8; 4]> = guest.listed().into_iter().map(|(s, _)| s).collect();
    listed.sort();
    assert_eq!(listed, [*b"APIC", *b"FACP"]);
    let dsdt = guest.dsdt();
    assert_eq!(&dsdt[..4], b"DSDT");
    assert!(dsdt[8] >= 2, "DSDT revision 2+ for 64-bit AML integers");
}

#[test]
fn every_table_checksum_is_valid_and_tables_do_not_overlap() {
    let tables = AcpiTables::build(4, &[]).unwrap();
    let mut previous_end = RSDP_START;
    for (addr, bytes) in tables.tables() {
        assert!(addr.0 >= previous_end, "table at {:#x} overlaps", addr.0);
        previous_end = addr.0 + bytes.len() as u64;
        if &bytes[..8] == b"RSD PTR " {
            assert_eq!(sum(&bytes[..20]), 0);
        } else {
            assert_eq!(u32_at(bytes, 4) as usize, bytes.len(), "{:?}", sig(bytes));
        }
        assert_eq!(sum(bytes), 0, "{:?}", sig(bytes));
    }
    assert_eq!(tables.end().0, previous_end);
    assert!(tables.end().0 <= ACPI_END);
}

#[test]
fn fadt_is_hardware_reduced_and_declares_no_8042_vga_or_rtc() {
    let fadt = Guest::with_tables(1, &[]).listed_table(b"FACP");
    assert_eq!(fadt.len(), 276, "an ACPI 6 FADT");
    assert_eq!(fadt[8], 6, "major revision");
    assert_ne!(u32_at(&fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
    // Bit 1 (8042) clear: Linux then skips its i8042 probe.
    assert_eq!(
        u16_at(&fadt, 109),
        0b10_0100,
        "no 8042, no VGA, no CMOS RTC"
    );
    // No legacy fixed-hardware blocks: PM1a event/control, PM timer, GPE0.
    for offset in [56, 64, 76, 80] {
        assert_eq!(u32_at(&fadt, offset), 0, "FADT offset {offset}");
    }
}

#[test]
fn madt_has_an_enabled_local_apic_per_vcpu_and_the_ioapic() {
    for vcpus in [1u8, 2, 7] {
        let madt = Guest::with_tables(vcpus, &[]).listed_table(b"APIC");
        assert_eq!(u32_at(&madt, 36), APIC_START as u32);
        assert_eq!(u32_at(&madt, 40) & 1, 1, "PCAT_COMPAT");
        let entries = madt_entries(&madt);
        let apic_ids: Vec<u8> = entries
            .iter()
            .filter(|(kind, _)| *kind == 0)
            .map(|(_, e)| {
                assert_eq!(e.len(), 8);
                assert_eq!(u32_at(e, 4) & 1, 1, "enabled");
                assert_eq!(e[2], e[3], "processor UID = APIC id");
                e[3]
            })
            .collect();
        assert_eq!(apic_ids, (0..vcpus).collect::<Vec<_>>());

        let ioapics: Vec<&Vec<u8>> = entries
            .iter()
            .filter(|(kind, _)| *kind == 1)
            .map(|(_, e)| e)
            .collect();
        assert_eq!(ioapics.len(), 1);
        let ioapic = ioapics[0];
        assert_eq!(ioapic[2], ioapic_id(vcpus));
        assert_eq!(u32_at(ioapic, 4), IOAPIC_START as u32);
        assert_eq!(u32_at(ioapic, 8), 0, "GSI base");
    }
}

#[test]
fn madt_keeps_identity_irq_routing_and_wires_nmi_to_lint1() {
    let madt = Guest::with_tables(2, &[]).listed_table(b"APIC");
    let entries = madt_entries(&madt);
    // No Interrupt Source Override (type 2): ISA IRQ n is GSI n, as KVM routes it.
    assert!(entries.iter().all(|(k, _)| *k != 2), "{entries:?}");

    let nmis: Vec<&Vec<u8>> = entries
        .iter()
        .filter(|(k, _)| *k == 4)
        .map(|(_, e)| e)
        .collect();
    assert_eq!(nmis.len(), 1);
    let nmi = nmis[0];
    assert_eq!((nmi.len(), nmi[2], nmi[5]), (6, 0xff, 1), "all CPUs, LINT1");
}

#[test]
fn dsdt_without_virtio_devices_holds_only_com1() {
    let dsdt = Guest::with_tables(1, &[]).dsdt();
    let aml = &dsdt[36..];
    // ScopeOp, a one-byte PkgLength, "\_SB_", then COM1 (ExtOpPrefix, DeviceOp).
    assert_eq!(&aml[..1], &[0x10]);
    assert_eq!(
        usize::from(aml[1]),
        aml.len() - 1,
        "the scope holds everything"
    );
    assert_eq!(&aml[2..7], b"\\_SB_");
    assert_eq!(&aml[7..9], &[0x5b, 0x82]);
    assert_eq!(&aml[10..14], b"COM1");
    let find = |needle: &[u8]| aml.windows(needle.len()).filter(|w| *w == needle).count();
    // _HID EisaId("PNP0501"): DWordPrefix, the compressed id 0x0105d041.
    assert_eq!(
        find(&[b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x05, 0x01]),
        1
    );
    // IO(Decode16, 0x3f8, 0x3f8, 1, 8) and Interrupt(Consumer, Edge, ActiveHigh, Exclusive){4}.
    assert_eq!(find(&[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 1, 8]), 1);
    assert_eq!(find(&[0x89, 6, 0, 0b0011, 1, 4, 0, 0, 0]), 1);
    assert_eq!(find(b"LNRO0005"), 0);
}

#[test]
fn dsdt_describes_each_virtio_mmio_device_with_memory_and_interrupt() {
    let devices = [
        VirtioMmioDevice {
            base: 0xd000_0000,
            size: 0x1000,
            irq: 5,
        },
        VirtioMmioDevice {
            base: 0xd000_1000,
            size: 0x1000,
            irq: 6,
        },
    ];
    let dsdt = Guest::with_tables(1, &devices).dsdt();
    let find = |needle: &[u8]| dsdt.windows(needle.len()).filter(|w| *w == needle).count();
    assert_eq!(find(b"LNRO0005\0"), 2);
    assert_eq!(find(b"V000"), 1);
    assert_eq!(find(b"V001"), 1);
    for device in devices {
        // Memory32Fixed: tag 0x86, length 9, read-write, base, size.
        let mut memory = vec![0x86, 9, 0, 1];
        memory.extend_from_slice(&(device.base as u32).to_le_bytes());
        memory.extend_from_slice(&(device.size as u32).to_le_bytes());
        assert_eq!(find(&memory), 1, "{device:?}");
        // Extended interrupt: tag 0x89, length 6, consumer + edge, one interrupt.
        let mut irq = vec![0x89, 6, 0, 0b0011, 1];
        irq.extend_from_slice(&device.irq.to_le_bytes());
        assert_eq!(find(&irq), 1, "{device:?}");
    }
}

#[test]
fn rejects_devices_it_cannot_describe() {
    let high = VirtioMmioDevice {
        base: 1 << 32,
        size: 0x1000,
        irq: 5,
    };
    assert!(matches!(
        AcpiTables::build(1, &[high]),
        Err(AcpiError::DeviceAddress { index: 0, .. })
    ));
    let last_page = VirtioMmioDevice {
        base: 0xffff_f000,
        size: 0x1000,
        irq: 5,
    };
    assert!(AcpiTables::build(1, &[last_page]).is_ok());
    let straddling = VirtioMmioDevice {
        size: 0x2000,
        ..last_page
    };
    assert!(matches!(
        AcpiTables::build(1, &[last_page, straddling]),
        Err(AcpiError::DeviceAddress { index: 1, .. })
    ));
    let low = VirtioMmioDevice {
        base: 0xd000_0000,
        size: 0x1000,
        irq: 5,
    };
    let too_many = vec![low; MAX_VIRTIO_MMIO_DEVICES + 1];
    assert!(matches!(
        AcpiTables::build(1, &too_many),
        Err(AcpiError::TooManyDevices { .. })
    ));
}

#[test]
fn rejects_vcpu_counts_without_xapic_ids() {
    assert!(matches!(
        AcpiTables::build(0, &[]),
        Err(AcpiError::VcpuCount { vcpus: 0 })
    ));
    assert!(matches!(
        AcpiTables::build(u8::MAX, &[]),
        Err(AcpiError::VcpuCount { vcpus: 255 })
    ));
    assert!(AcpiTables::build(MAX_VCPUS, &[]).is_ok());
}

#[test]
fn too_many_vcpus_for_the_space_is_a_typed_error() {
    // A window that holds the tables for one vCPU exactly has no room for a second.
    let one = AcpiTables::build(1, &[]).unwrap();
    let end = one.end().0;
    assert!(AcpiTables::build_within(RSDP_START, end, 1, &[]).is_ok());
    let err = AcpiTables::build_within(RSDP_START, end, 2, &[]).unwrap_err();
    match err {
        AcpiError::TooLarge {
            vcpus: 2,
            needed,
            available,
            ..
        } => assert!(needed > available, "{needed} > {available}"),
        other => panic!("{other}"),
    }
}

#[test]
fn too_many_devices_for_the_bios_area_is_a_typed_error() {
    let device = VirtioMmioDevice {
        base: 0xd000_0000,
        size: 0x1000,
        irq: 5,
    };
    let err = AcpiTables::build(2, &vec![device; MAX_VIRTIO_MMIO_DEVICES]).unwrap_err();
    assert!(matches!(err, AcpiError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("bytes"), "{err}");
}

#[test]
fn tables_sit_where_the_e820_map_offers_no_ram() {
    let mem = memory::create_guest_memory(128 << 20).unwrap();
    let params = super::super::zero_page(&mem, None, 1, None);
    let tables = AcpiTables::build(2, &[]).unwrap();
    let (start, end) = (tables.rsdp().0, tables.end().0);
    for entry in &params.e820_table[..usize::from(params.e820_entries)] {
        let (addr, size) = (entry.addr, entry.size);
        assert!(
            addr + size <= start || addr >= end,
            "e820 RAM {addr:#x}+{size:#x} covers the ACPI tables {start:#x}..{end:#x}"
        );
    }
}

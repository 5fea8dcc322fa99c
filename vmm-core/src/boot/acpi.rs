//! The ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) that tell a Linux guest its CPUs, interrupt
//! controllers, its serial port and its virtio-mmio devices. Debian's cloud kernel has no MP-table parser
//! (`CONFIG_X86_MPPARSE` is off) and no virtio-mmio command-line devices, so ACPI is the only way
//! it learns about more than its boot CPU.
//!
//! ```text
//! RSDP_START  RSDP "RSD PTR " (36 bytes, revision 2)                    -> XSDT
//!             DSDT (36 + AML: \_SB_ with COM1 (PNP0501), one LNRO0005 device per virtio-mmio
//!                   transport)
//!             MADT "APIC" (44 + 8 per vCPU + IOAPIC 12 + NMI 6)
//!             FADT "FACP" (276, hardware-reduced)                       -> DSDT
//!             XSDT (36 + 8 per table)                                   -> FADT, MADT
//!             free up to ACPI_END
//! ```
//!
//! Each table is placed after the ones it points to, so every address is known when a table is
//! built and no size has to be predicted; only the RSDP, which Linux looks for at a fixed place,
//! is reserved first. The area is RAM in Thaw's guest memory but not usable RAM in the e820 map,
//! so the kernel leaves the tables alone.
//!
//! rust-vmm's `acpi_tables` builds everything except two MADT pieces it has no way to express:
//! its `MADT` type always writes zero flags (Thaw needs `PCAT_COMPAT`) and has no Local APIC NMI
//! structure (and its `add_structure` takes only `zerocopy` types). So the MADT is the crate's
//! generic `Sdt` (header, length and checksum) holding the crate's Local APIC and IOAPIC
//! structures plus the NMI structure, written here.
//!
//! COM1 must be in the DSDT. A hardware-reduced FADT makes Linux drop the legacy PIC, and with
//! it the ISA IRQs it would otherwise map by default: the 8250 driver's legacy probe then finds
//! the UART but cannot have IRQ 4, so every write to `/dev/console` from user space fails with
//! EIO. Described as a PNP0501 device with its ports and interrupt, the UART is bound by
//! `8250_pnp` with IRQ 4 mapped through ACPI, as on Firecracker.
//!
//! There is no Interrupt Source Override: Thaw keeps KVM's default GSI routing, where ISA IRQ n
//! (the PIT's IRQ 0 included) reaches IOAPIC input n, which is what the absence of overrides
//! means, and what the MP table says too.

use acpi_tables::Aml;
use acpi_tables::aml::{
    Device, EISAName, IO, Interrupt, Memory32Fixed, Name, Path, ResourceTemplate, Scope,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use vm_memory::{Bytes, GuestAddress};

use super::mptable::ioapic_id;
use crate::devices::serial::{COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::layout::{
    ACPI_END, APIC_START, EBDA_END, FIRST_ADDR_PAST_32BITS, HIMEM_START, IOAPIC_START, RSDP_START,
};
use crate::memory::GuestMemory;

// The tables must stay in the legacy BIOS area: above the MP table, below the kernel.
const _: () = assert!(RSDP_START >= EBDA_END && RSDP_START < ACPI_END && ACPI_END <= HIMEM_START);
// Linux's fallback scan for "RSD PTR " only looks at 16-byte boundaries of 0xe0000-0xfffff.
const _: () = assert!(RSDP_START % 16 == 0 && RSDP_START >= 0xe_0000);

const OEM_ID: [u8; 6] = *b"THAW  ";
const OEM_TABLE_ID: [u8; 8] = *b"MICROVM ";
const OEM_REVISION: u32 = 1;

const SDT_HEADER_LEN: u32 = 36;
/// DSDT revision 2 and up gives AML 64-bit integers.
const DSDT_REVISION: u8 = 2;
/// MADT revision 5 is ACPI 6.3's, the first with the Online Capable flag; every CPU here is
/// simply Enabled, which all revisions read the same way.
const MADT_REVISION: u8 = 5;
/// The MADT header: the SDT header, the local APIC address and the flags.
const MADT_HEADER_LEN: u32 = SDT_HEADER_LEN + 8;
const MADT_LOCAL_APIC_ADDRESS_OFFSET: usize = 36;
const MADT_FLAGS_OFFSET: usize = 40;
/// The machine also has dual 8259 PICs (KVM's irqchip), wired to ISA IRQs as on a PC.
const MADT_PCAT_COMPAT: u32 = 1 << 0;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const LOCAL_APIC_NMI_LEN: u8 = 6;

/// MPS INTI flags active high (bits 1:0 = 01), edge-triggered (bits 3:2 = 01), as an NMI is.
const MPS_INTI_ACTIVE_HIGH_EDGE: u16 = 0b0101;
/// ACPI processor UID meaning every processor.
const ALL_PROCESSORS: u8 = 0xff;
/// The local APIC input the NMI is wired to, as in the MP table and in each vCPU's LVT.
const NMI_LINT: u8 = 1;

/// FADT IAPC_BOOT_ARCH: no VGA and no CMOS RTC, so Linux must not probe for them. The 8042 bit
/// stays clear although Thaw emulates an i8042: it is there only for its reset line, which
/// `reboot=k` pulls with a plain port write whatever this says, and a controller that answers
/// no commands costs a Linux boot seconds of probe timeouts unless it is declared absent (as
/// QEMU's microvm machine does). "Legacy devices" stays clear: COM1 is an ISA device.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
const IAPC_BOOT_ARCH: u16 = IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT;

/// ACPI asks no alignment of these tables (only of the FACS, which a hardware-reduced machine
/// need not have); 8 bytes puts each on a natural boundary, as firmware does.
const TABLE_ALIGN: u64 = 8;

/// Most vCPUs the tables can describe: xAPIC ids are 8 bits and 0xff means "all" (both as an
/// APIC id and as the processor UID of the NMI entry).
pub const MAX_VCPUS: u8 = u8::MAX - 1;
/// Most virtio-mmio devices the DSDT can name (`V000` to `VFFF`).
pub const MAX_VIRTIO_MMIO_DEVICES: usize = 0x1000;
/// The ACPI id Linux's virtio-mmio driver matches.
const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// The EISA id of a 16550A-compatible UART, which Linux's `8250_pnp` driver binds.
const UART_16550A_EISA_ID: &str = "PNP0501";
/// COM1's `_UID`: the first (and only) UART.
const COM1_UID: u32 = 0;

/// A virtio-mmio transport as the DSDT describes it to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Guest-physical address of its registers (below 4 GiB).
    pub base: u64,
    /// Size of its register window.
    pub size: u64,
    /// The GSI (IOAPIC input) it raises; edge-triggered, active high, as an irqfd delivers it.
    pub irq: u32,
}

/// The ACPI tables cannot be built or written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The vCPU count cannot be described with xAPIC ids.
    #[error("ACPI tables describe 1 to {MAX_VCPUS} vCPUs, not {vcpus}")]
    VcpuCount {
        /// vCPUs asked for.
        vcpus: u8,
    },
    /// More virtio-mmio devices than the DSDT has names for.
    #[error("the DSDT names at most {MAX_VIRTIO_MMIO_DEVICES} virtio-mmio devices, not {devices}")]
    TooManyDevices {
        /// Devices asked for.
        devices: usize,
    },
    /// A virtio-mmio device outside the 32-bit space its DSDT resource can express.
    #[error(
        "virtio-mmio device {index} at {base:#x} (size {size:#x}) does not fit below 4 GiB, \
         where the DSDT describes it"
    )]
    DeviceAddress {
        /// Its position in the list.
        index: usize,
        /// Its base.
        base: u64,
        /// Its size.
        size: u64,
    },
    /// The tables do not fit in the legacy BIOS area.
    #[error(
        "ACPI tables for {vcpus} vCPUs and {devices} virtio-mmio devices need {needed} bytes \
         from {start:#x}; only {available} fit below {end:#x}"
    )]
    TooLarge {
        /// vCPUs asked for.
        vcpus: u8,
        /// Devices asked for.
        devices: usize,
        /// Bytes the tables take from `start`, alignment included.
        needed: u64,
        /// Bytes between `start` and `end`.
        available: u64,
        /// Where the RSDP goes.
        start: u64,
        /// The first address the tables may not use.
        end: u64,
    },
    /// Guest memory does not cover the BIOS area.
    #[error("cannot write the ACPI tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The tables, built and placed, ready to be written into guest memory.
#[derive(Clone, Debug)]
pub struct AcpiTables {
    /// Each table's address and bytes; the RSDP comes first.
    tables: Vec<(GuestAddress, Vec<u8>)>,
    rsdp: GuestAddress,
    end: u64,
}

impl AcpiTables {
    /// Builds the tables for `vcpus` vCPUs and `devices`, with the RSDP at `RSDP_START` and
    /// everything below `ACPI_END`.
    pub fn build(vcpus: u8, devices: &[VirtioMmioDevice]) -> Result<Self, AcpiError> {
        Self::build_within(RSDP_START, ACPI_END, vcpus, devices)
    }

    fn build_within(
        start: u64,
        end: u64,
        vcpus: u8,
        devices: &[VirtioMmioDevice],
    ) -> Result<Self, AcpiError> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(AcpiError::VcpuCount { vcpus });
        }
        let mut placer = Placer {
            next: start + rsdp_len(),
            tables: Vec::new(),
        };
        let dsdt = placer.place(dsdt(devices)?);
        let madt = placer.place(madt(vcpus));
        let fadt = placer.place(fadt(dsdt));
        let xsdt = placer.place(xsdt(&[fadt, madt]));
        if placer.next > end {
            return Err(AcpiError::TooLarge {
                vcpus,
                devices: devices.len(),
                needed: placer.next - start,
                available: end.saturating_sub(start),
                start,
                end,
            });
        }
        let mut tables = vec![(GuestAddress(start), to_bytes(&Rsdp::new(OEM_ID, xsdt)))];
        tables.append(&mut placer.tables);
        Ok(Self {
            tables,
            rsdp: GuestAddress(start),
            end: placer.next,
        })
    }

    /// Where the RSDP is: what `boot_params.acpi_rsdp_addr` must say.
    pub fn rsdp(&self) -> GuestAddress {
        self.rsdp
    }

    /// The first address past the last table.
    pub fn end(&self) -> GuestAddress {
        GuestAddress(self.end)
    }

    /// Each table's address and bytes, the RSDP first.
    pub fn tables(&self) -> &[(GuestAddress, Vec<u8>)] {
        &self.tables
    }

    /// Writes every table into guest memory.
    pub fn write(&self, mem: &GuestMemory) -> Result<(), AcpiError> {
        for (addr, bytes) in &self.tables {
            mem.write_slice(bytes, *addr).map_err(AcpiError::Write)?;
        }
        Ok(())
    }
}

/// Builds and writes the tables for `vcpus` vCPUs and `devices`; returns the RSDP's address.
pub fn write(
    mem: &GuestMemory,
    vcpus: u8,
    devices: &[VirtioMmioDevice],
) -> Result<GuestAddress, AcpiError> {
    let tables = AcpiTables::build(vcpus, devices)?;
    tables.write(mem)?;
    Ok(tables.rsdp())
}

/// Lays tables out one after another.
struct Placer {
    next: u64,
    tables: Vec<(GuestAddress, Vec<u8>)>,
}

impl Placer {
    fn place(&mut self, bytes: Vec<u8>) -> u64 {
        let addr = self.next.next_multiple_of(TABLE_ALIGN);
        self.next = addr + bytes.len() as u64;
        self.tables.push((GuestAddress(addr), bytes));
        addr
    }
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn rsdp_len() -> u64 {
    Rsdp::len() as u64
}

fn sdt(signature: [u8; 4], len: u32, revision: u8) -> Sdt {
    Sdt::new(signature, len, revision, OEM_ID, OEM_TABLE_ID, OEM_REVISION)
}

fn xsdt(tables: &[u64]) -> Vec<u8> {
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for table in tables {
        xsdt.add_entry(*table);
    }
    to_bytes(&xsdt)
}

/// A hardware-reduced FADT: no PM1/GPE blocks, no SCI, no FACS; power and sleep are not
/// offered (a microVM is stopped from the host).
fn fadt(dsdt: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    to_bytes(&fadt.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    for id in 0..vcpus {
        // APIC id = vCPU index, as the CPUID leaves and the MP table say.
        ProcessorLocalApic::new(id, id, EnabledStatus::Enabled).to_aml_bytes(&mut entries);
    }
    IoApic::new(ioapic_id(vcpus), IOAPIC_START as u32, 0).to_aml_bytes(&mut entries);
    entries.extend_from_slice(&local_apic_nmi(
        ALL_PROCESSORS,
        MPS_INTI_ACTIVE_HIGH_EDGE,
        NMI_LINT,
    ));

    let mut madt = sdt(*b"APIC", MADT_HEADER_LEN, MADT_REVISION);
    madt.write_u32(MADT_LOCAL_APIC_ADDRESS_OFFSET, APIC_START as u32);
    madt.write_u32(MADT_FLAGS_OFFSET, MADT_PCAT_COMPAT);
    madt.append_slice(&entries);
    madt.as_slice().to_vec()
}

/// Which local APIC input carries NMIs (MADT structure type 4).
fn local_apic_nmi(processor_uid: u8, flags: u16, lint: u8) -> [u8; 6] {
    let [flags_lo, flags_hi] = flags.to_le_bytes();
    [
        MADT_LOCAL_APIC_NMI,
        LOCAL_APIC_NMI_LEN,
        processor_uid,
        flags_lo,
        flags_hi,
        lint,
    ]
}

/// The DSDT: the `\_SB_` scope with COM1 and one device per virtio-mmio transport.
fn dsdt(devices: &[VirtioMmioDevice]) -> Result<Vec<u8>, AcpiError> {
    if devices.len() > MAX_VIRTIO_MMIO_DEVICES {
        return Err(AcpiError::TooManyDevices {
            devices: devices.len(),
        });
    }
    let described = devices
        .iter()
        .enumerate()
        .map(|(index, device)| VirtioMmioAml::new(index, device))
        .collect::<Result<Vec<_>, _>>()?;
    let com1 = Com1Aml::new();
    let mut aml_devices = vec![com1.device()];
    aml_devices.extend(described.iter().map(VirtioMmioAml::device));
    let children: Vec<&dyn Aml> = aml_devices.iter().map(|d| d as &dyn Aml).collect();
    let scope = Scope::new(Path::new("\\_SB_"), children);

    let mut dsdt = sdt(*b"DSDT", SDT_HEADER_LEN, DSDT_REVISION);
    dsdt.append_slice(&to_bytes(&scope));
    Ok(dsdt.as_slice().to_vec())
}

/// COM1's named objects: a 16550A at its legacy ports, raising GSI 4 (edge-triggered, active
/// high, as its irqfd delivers it).
struct Com1Aml {
    hid: Name,
    uid: Name,
    crs: Name,
}

impl Com1Aml {
    fn new() -> Self {
        // The legacy ports are constants far below 64 KiB.
        let base = COM1_BASE as u16;
        let len = COM1_LEN as u8;
        let ports = IO::new(base, base, 1, len);
        let interrupt = Interrupt::new(true, true, false, false, COM1_IRQ);
        Self {
            hid: Name::new(Path::new("_HID"), &EISAName::new(UART_16550A_EISA_ID)),
            uid: Name::new(Path::new("_UID"), &COM1_UID),
            crs: Name::new(
                Path::new("_CRS"),
                &ResourceTemplate::new(vec![&ports, &interrupt]),
            ),
        }
    }

    fn device(&self) -> Device<'_> {
        Device::new(Path::new("COM1"), vec![&self.hid, &self.uid, &self.crs])
    }
}

/// The named objects of one virtio-mmio device, which its `Device` object borrows.
struct VirtioMmioAml {
    name: String,
    hid: Name,
    uid: Name,
    crs: Name,
}

impl VirtioMmioAml {
    fn new(index: usize, device: &VirtioMmioDevice) -> Result<Self, AcpiError> {
        let out_of_range = || AcpiError::DeviceAddress {
            index,
            base: device.base,
            size: device.size,
        };
        let end = device.base.checked_add(device.size);
        if end.is_none_or(|end| end > FIRST_ADDR_PAST_32BITS) {
            return Err(out_of_range());
        }
        let base = u32::try_from(device.base).map_err(|_| out_of_range())?;
        let size = u32::try_from(device.size).map_err(|_| out_of_range())?;
        // `dsdt` caps the count, so the index has at most three hex digits.
        let uid = index as u32;
        let memory = Memory32Fixed::new(true, base, size);
        let interrupt = Interrupt::new(true, true, false, false, device.irq);
        Ok(Self {
            name: format!("V{index:03X}"),
            hid: Name::new(Path::new("_HID"), &VIRTIO_MMIO_HID),
            uid: Name::new(Path::new("_UID"), &uid),
            crs: Name::new(
                Path::new("_CRS"),
                &ResourceTemplate::new(vec![&memory, &interrupt]),
            ),
        })
    }

    fn device(&self) -> Device<'_> {
        Device::new(Path::new(&self.name), vec![&self.hid, &self.uid, &self.crs])
    }
}

#[cfg(test)]
#[path = "acpi_tests.rs"]
mod tests;

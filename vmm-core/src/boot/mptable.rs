//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns its CPUs,
//! its IOAPIC and how legacy IRQs reach it. Linux reads it when booted without ACPI tables, and
//! the test guest reads it to find the vCPUs to start.
//!
//! ```text
//! EBDA_START        floating pointer "_MP_" (16 bytes) ─┐ physptr
//! EBDA_START + 16   config table "PCMP" header (44) <───┘
//!                   processor entries (20 each, APIC id = vCPU index, 0 is the BSP)
//!                   bus "ISA" (8), IOAPIC (8), 24 I/O interrupt entries (8 each),
//!                   LINT0 = ExtINT, LINT1 = NMI (8 each)
//! ```

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{APIC_START, EBDA_END, EBDA_START, IOAPIC_START};
use crate::memory::GuestMemory;

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_ENTRY_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;
/// IOAPIC pins the in-kernel IOAPIC has.
pub const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REVISION: u8 = 4;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const IRQ_INT: u8 = 0;
const IRQ_NMI: u8 = 1;
const IRQ_EXTINT: u8 = 3;

/// The MP table does not fit where it must go.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// Too many vCPUs for the EBDA.
    #[error("an MP table for {vcpus} vCPUs needs {needed} bytes; the EBDA has {available}")]
    TooManyCpus {
        /// vCPUs asked for.
        vcpus: u8,
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// Guest memory does not cover the EBDA.
    #[error("cannot write the MP table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The CPU identification copied into each processor entry (CPUID leaf 1 EAX and EDX).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSignature {
    /// Family, model, stepping (CPUID.1:EAX).
    pub signature: u32,
    /// Feature flags (CPUID.1:EDX).
    pub features: u32,
}

/// The IOAPIC's id in the table: after every local APIC id.
pub fn ioapic_id(vcpus: u8) -> u8 {
    vcpus.saturating_add(1)
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

/// Builds the floating pointer and the configuration table, as one blob to be written at
/// `EBDA_START`.
pub fn build(vcpus: u8, cpu: CpuSignature) -> Result<Vec<u8>, MpTableError> {
    let entry_count = usize::from(vcpus) + 1 + 1 + usize::from(IOAPIC_PINS) + 2;
    let table_len = HEADER_LEN
        + usize::from(vcpus) * PROCESSOR_ENTRY_LEN
        + (entry_count - usize::from(vcpus)) * SMALL_ENTRY_LEN;
    let needed = FLOATING_POINTER_LEN + table_len;
    let available = (EBDA_END - EBDA_START) as usize;
    if needed > available || vcpus == 0 {
        return Err(MpTableError::TooManyCpus {
            vcpus,
            needed,
            available,
        });
    }
    let table_addr = EBDA_START as u32 + FLOATING_POINTER_LEN as u32;

    let mut fp = Vec::with_capacity(FLOATING_POINTER_LEN);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(SPEC_REVISION);
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]); // a configuration table is present; no IMCR
    fp[10] = checksum(&fp);

    let mut t = Vec::with_capacity(table_len);
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&(table_len as u16).to_le_bytes());
    t.push(SPEC_REVISION);
    t.push(0); // checksum, below
    t.extend_from_slice(b"THAW    ");
    t.extend_from_slice(b"MICROVM     ");
    t.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    t.extend_from_slice(&0u16.to_le_bytes());
    t.extend_from_slice(&(entry_count as u16).to_le_bytes());
    t.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    t.extend_from_slice(&[0; 4]); // no extended table
    for id in 0..vcpus {
        t.push(ENTRY_PROCESSOR);
        t.push(id);
        t.push(APIC_VERSION);
        t.push(CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 });
        t.extend_from_slice(&cpu.signature.to_le_bytes());
        t.extend_from_slice(&cpu.features.to_le_bytes());
        t.extend_from_slice(&[0; 8]);
    }
    t.extend_from_slice(&[ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    let ioapic = ioapic_id(vcpus);
    t.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    t.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    for pin in 0..IOAPIC_PINS {
        // ISA IRQ n is wired to IOAPIC pin n, with the bus's default polarity and trigger.
        t.extend_from_slice(&[ENTRY_IO_INTERRUPT, IRQ_INT, 0, 0, 0, pin, ioapic, pin]);
    }
    t.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, IRQ_EXTINT, 0, 0, 0, 0, 0, 0]);
    t.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    debug_assert_eq!(t.len(), table_len);
    t[7] = checksum(&t);

    fp.extend_from_slice(&t);
    Ok(fp)
}

/// Writes the MP table for `vcpus` vCPUs at `EBDA_START`.
pub fn write(mem: &GuestMemory, vcpus: u8, cpu: CpuSignature) -> Result<(), MpTableError> {
    let blob = build(vcpus, cpu)?;
    mem.write_slice(&blob, GuestAddress(EBDA_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_counts_are_valid() {
        let blob = build(2, CpuSignature::default()).unwrap();
        assert_eq!(&blob[0..4], b"_MP_");
        assert_eq!(sum(&blob[..16]), 0);
        let table = &blob[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 2 + 1 + 1 + 24 + 2);
        // First processor is the enabled BSP with APIC id 0; the second is enabled, not BSP.
        assert_eq!(&table[44..48], &[0, 0, APIC_VERSION, 3]);
        assert_eq!(&table[64..68], &[0, 1, APIC_VERSION, 1]);
    }

    #[test]
    fn rejects_more_cpus_than_fit_in_ebda() {
        assert!(build(36, CpuSignature::default()).is_ok());
        assert!(matches!(
            build(64, CpuSignature::default()),
            Err(MpTableError::TooManyCpus { vcpus: 64, .. })
        ));
        assert!(build(0, CpuSignature::default()).is_err());
    }
}

//! The CPU state a kernel finds at its 64-bit entry point, as Firecracker sets it up on x86_64:
//! long mode with paging on, the first 1 GiB identity-mapped with 2 MiB pages, a flat GDT,
//! `rip` at the entry, `rsi` at the zero page, interrupts off.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};
use crate::memory::GuestMemory;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;

/// GDT access/flags words (flags nibble in bits 15:12, access byte in bits 7:0).
const GDT_CODE64: u16 = 0xa09b; // G, L, present, DPL0, code, execute/read, accessed
const GDT_DATA: u16 = 0xc093; // G, D/B, present, DPL0, data, read/write, accessed
const GDT_TSS: u16 = 0x808b; // G, present, DPL0, 64-bit busy TSS

/// Selectors of the boot GDT.
const CODE_INDEX: u8 = 1;
const DATA_INDEX: u8 = 2;
const TSS_INDEX: u8 = 3;

/// Writing the boot tables into guest memory failed (memory too small for the layout).
#[derive(Debug, thiserror::Error)]
#[error("cannot write the boot {what} at guest address {addr:#x}")]
pub struct TableWriteError {
    /// Which table.
    pub what: &'static str,
    /// Where.
    pub addr: u64,
    /// Why.
    #[source]
    pub source: vm_memory::GuestMemoryError,
}

/// Encodes one GDT descriptor.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The KVM view of the descriptor `entry` loaded from GDT slot `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry >> 32) & 0x000f_0000) | (entry & 0xffff);
    let granular = bit(55) == 1;
    let limit = if granular {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bit(47);
    kvm_segment {
        base,
        limit: limit as u32,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn boot_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(GDT_CODE64, 0, 0xfffff),
        gdt_entry(GDT_DATA, 0, 0xfffff),
        gdt_entry(GDT_TSS, 0, 0xfffff),
    ]
}

fn write(
    mem: &GuestMemory,
    what: &'static str,
    addr: u64,
    value: u64,
) -> Result<(), TableWriteError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| TableWriteError { what, addr, source })
}

/// Writes the GDT, the empty IDT and the identity-mapping page tables into guest memory.
pub fn write_boot_tables(mem: &GuestMemory) -> Result<(), TableWriteError> {
    for (i, entry) in boot_gdt().iter().enumerate() {
        write(mem, "GDT", BOOT_GDT_START + 8 * i as u64, *entry)?;
    }
    write(mem, "IDT", BOOT_IDT_START, 0)?;
    write(
        mem,
        "PML4",
        PML4_START,
        PDPTE_START | PTE_PRESENT | PTE_WRITABLE,
    )?;
    write(
        mem,
        "PDPT",
        PDPTE_START,
        PDE_START | PTE_PRESENT | PTE_WRITABLE,
    )?;
    for i in 0..512u64 {
        let entry = (i << 21) | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE;
        write(mem, "page directory", PDE_START + i * 8, entry)?;
    }
    Ok(())
}

/// Rewrites `sregs` (as read from a fresh vCPU) into the 64-bit boot state.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    let gdt = boot_gdt();
    let code = segment_from_gdt(gdt[usize::from(CODE_INDEX)], CODE_INDEX);
    let data = segment_from_gdt(gdt[usize::from(DATA_INDEX)], DATA_INDEX);
    let tss = segment_from_gdt(gdt[usize::from(TSS_INDEX)], TSS_INDEX);

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    // A fresh vCPU has caching disabled (CD, NW); firmware would have enabled it before handing
    // over, so the kernel sees what it would on real hardware.
    sregs.cr0 = (sregs.cr0 & !(CR0_CD | CR0_NW)) | CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// General registers at the kernel's 64-bit entry point.
pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set; interrupts off
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// x87 and SSE control words as after `FNINIT` with all SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs the boot protocol expects: syscall and sysenter MSRs cleared, TSC at zero, fast string
/// operations on, MTRRs enabled with write-back as the default memory type.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MTRR_ENABLE: u64 = 1 << 11;
    const MTRR_TYPE_WRBACK: u64 = 6;
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_round_trip_through_segments() {
        let code = segment_from_gdt(gdt_entry(GDT_CODE64, 0, 0xfffff), CODE_INDEX);
        assert_eq!(code.selector, 8);
        assert_eq!(
            (code.l, code.db, code.g, code.present, code.s),
            (1, 0, 1, 1, 1)
        );
        assert_eq!(code.type_, 0xb);
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.dpl, 0);

        let data = segment_from_gdt(gdt_entry(GDT_DATA, 0, 0xfffff), DATA_INDEX);
        assert_eq!(data.selector, 16);
        assert_eq!((data.l, data.db, data.type_), (0, 1, 3));

        let null = segment_from_gdt(gdt_entry(0, 0, 0), 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn gdt_entry_splits_base_and_limit() {
        let entry = gdt_entry(0x808b, 0x1234_5678, 0xabcde);
        let seg = segment_from_gdt(entry, 3);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcd_efff);
        assert_eq!(seg.type_, 0xb);
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = crate::memory::create_guest_memory(128 << 20).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        let pde_last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(pde_last & !0xfff, 511 << 21);
        assert_ne!(pde_last & PTE_HUGE, 0);
    }
}

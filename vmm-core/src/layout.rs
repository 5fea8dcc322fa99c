//! Where things live in guest-physical memory on x86_64.
//!
//! The low-memory layout is the one Firecracker uses for the Linux 64-bit boot protocol, so an
//! ELF `vmlinux` (or any image built for Firecracker) finds the GDT, page tables, zero page and
//! command line where it expects them.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries: null, code64, data, tss)
//! 0x0000_0520  IDT (empty; the guest installs its own)
//! 0x0000_7000  zero page (struct boot_params); rsi points here at entry
//! 0x0000_8ff0  initial stack pointer (grows down)
//! 0x0000_9000  PML4  ┐
//! 0x0000_a000  PDPT  ├ identity map of the first 1 GiB with 2 MiB pages
//! 0x0000_b000  PD    ┘
//! 0x0002_0000  kernel command line (up to 2 KiB, NUL-terminated)
//! 0x0009_fc00  EBDA: MP table (the guest's CPU and interrupt topology)
//! 0x000e_0000  ACPI: RSDP, then DSDT, MADT, FADT, XSDT, up to 0x10_0000 (not RAM in e820)
//! 0x0010_0000  kernel image (HIMEM_START); initrd goes to the top of low RAM
//! 0xd000_0000  32-bit MMIO gap: virtio-mmio devices first (4 KiB each), IOAPIC, LAPIC; to 4 GiB
//! 0x1_0000_0000 RAM above 4 GiB when the guest has more than 3.25 GiB
//! ```

/// The GDT written for the boot vCPU.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT; the guest installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// `struct boot_params` (the "zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial `rsp`/`rbp` of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table (CR3).
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table referenced by the PML4's first entry.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory mapping the first 1 GiB with 2 MiB pages.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line, including its NUL (Linux's x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area, where the MP table is written.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional low memory (the legacy VGA hole starts here).
pub const EBDA_END: u64 = 0xa0000;
/// First address of "high" memory: kernels load at or above this.
pub const HIMEM_START: u64 = 0x10_0000;
/// The ACPI RSDP, followed by the other ACPI tables. Linux without EFI or `acpi_rsdp=` scans
/// 0xe0000–0xfffff for it (Thaw also passes the address in the zero page).
pub const RSDP_START: u64 = 0xe_0000;
/// The first address past the room for ACPI tables: the legacy BIOS area ends where high memory
/// starts, and the e820 map lists none of it as RAM, so the kernel leaves the tables alone.
pub const ACPI_END: u64 = HIMEM_START;

/// Size of the 32-bit MMIO hole below 4 GiB.
pub const MMIO_GAP_SIZE: u64 = 768 << 20;
/// First address past 32 bits.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// Start of the 32-bit MMIO hole; RAM stops here and resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = FIRST_ADDR_PAST_32BITS - MMIO_GAP_SIZE;
/// The first virtio-mmio device's registers; the next ones follow every [`VIRTIO_MMIO_SIZE`].
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio device's register window (registers and configuration space).
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The first virtio-mmio device's IRQ (GSI): the first legacy ISA line no PC device uses
/// (0 PIT, 1 keyboard, 2 cascade, 3-4 COM ports). ISA lines reach both the in-kernel PIC and
/// IOAPIC through KVM's default routing, and are edge-triggered, active high, as the irqfd
/// delivers them.
pub const VIRTIO_IRQ_FIRST: u32 = 5;
/// The last IRQ for virtio-mmio devices: the last ISA line (the PIC has 16 inputs).
pub const VIRTIO_IRQ_LAST: u32 = 15;

/// Default IOAPIC base, inside the MMIO gap.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Default local APIC base, inside the MMIO gap.
pub const APIC_START: u64 = 0xfee0_0000;

/// Address KVM needs for the three pages of its real-mode TSS (Intel only), kept in the MMIO
/// gap where no RAM lives.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

// The virtio-mmio windows must stay clear of the IOAPIC for every IRQ they can have.
const _: () = assert!(
    VIRTIO_MMIO_START + (VIRTIO_IRQ_LAST - VIRTIO_IRQ_FIRST + 1) as u64 * VIRTIO_MMIO_SIZE
        <= IOAPIC_START
);

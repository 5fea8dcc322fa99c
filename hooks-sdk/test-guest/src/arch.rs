//! The guest's CPL0 side, kept as small as possible because on PVM every CPL0 instruction is
//! emulated: static page tables (built at compile time, user-accessible), a GDT with user
//! segments and one TSS per CPU, the IDT (its stubs and handler are in `traps`), the entry
//! points (the boot CPU's 64-bit entry and the application processors' real-mode trampoline),
//! and the drop to CPL3 with IOPL=3.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Most CPUs the guest can run.
pub const MAX_CPUS: usize = 64;
/// Where the linker script puts the page tables (`PAGE_TABLES_BASE` in link.ld).
pub const PAGE_TABLES_BASE: u64 = 0x20_0000;
/// Where the AP trampoline is copied; the SIPI vector is its page number.
pub const TRAMPOLINE_BASE: u64 = 0x1_0000;
/// Guest-physical memory identity-mapped (and user-accessible), in GiB.
const MAPPED_GIB: usize = 16;

const KERNEL_STACK_SIZE: usize = 16 * 1024;
const USER_STACK_SIZE: usize = 64 * 1024;

// Selectors as Linux lays them out on x86_64; PVM expects Linux's user selectors in user mode.
const KERNEL_CS: u16 = 0x10;
const KERNEL_DS: u16 = 0x18;
const USER32_CS: u16 = 0x20 | 3;
const USER_DS: u16 = 0x28 | 3;
const USER_CS: u16 = 0x30 | 3;
const FIRST_TSS_SLOT: usize = 8;
const FIRST_TSS_SELECTOR: u16 = (FIRST_TSS_SLOT * 8) as u16;
/// GDT slots: the segments above, then a 16-byte TSS descriptor (two slots) per CPU.
const GDT_SLOTS: usize = FIRST_TSS_SLOT + 2 * MAX_CPUS;

/// RFLAGS for CPL3: IOPL=3 (port I/O allowed), bit 1 (reserved, set), interrupts off.
const USER_RFLAGS: u64 = (3 << 12) | 0x2;

/// Syscall numbers (see [`syscall`]).
pub const SYS_HALT_FOREVER: u64 = 1;

/// Memory the hardware or several CPUs write outside Rust's view.
#[repr(transparent)]
pub struct Shared<T>(UnsafeCell<T>);

// SAFETY: every access goes through raw pointers with the discipline documented at each use
// (one writer at a time: the owning CPU, or the BSP before other CPUs start).
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// Wraps `v`.
    pub const fn new(v: T) -> Self {
        Self(UnsafeCell::new(v))
    }

    /// A raw pointer to the contents.
    pub fn get(&self) -> *mut T {
        self.0.get()
    }
}

// ----- page tables -------------------------------------------------------------------------

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;
const PTE_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER;

/// PML4, one PDPT and `MAPPED_GIB` page directories of 2 MiB pages, every level user-accessible.
#[repr(C, align(4096))]
pub struct PageTables {
    pml4: [u64; 512],
    pdpt: [u64; 512],
    pd: [[u64; 512]; MAPPED_GIB],
}

impl PageTables {
    const fn identity() -> Self {
        let mut t = PageTables {
            pml4: [0; 512],
            pdpt: [0; 512],
            pd: [[0; 512]; MAPPED_GIB],
        };
        let pdpt_addr = PAGE_TABLES_BASE + 4096;
        let pd_addr = PAGE_TABLES_BASE + 2 * 4096;
        t.pml4[0] = pdpt_addr | PTE_FLAGS;
        let mut gib = 0;
        while gib < MAPPED_GIB {
            t.pdpt[gib] = (pd_addr + gib as u64 * 4096) | PTE_FLAGS;
            let mut i = 0;
            while i < 512 {
                let addr = ((gib as u64) << 30) | ((i as u64) << 21);
                t.pd[gib][i] = addr | PTE_FLAGS | PTE_HUGE;
                i += 1;
            }
            gib += 1;
        }
        t
    }
}

/// The page tables, placed at `PAGE_TABLES_BASE` by the linker script. The CPU writes their
/// accessed/dirty bits, hence `Shared`.
#[unsafe(link_section = ".pagetables")]
#[unsafe(no_mangle)]
pub static PAGE_TABLES: Shared<PageTables> = Shared::new(PageTables::identity());

// ----- GDT, TSS, IDT -----------------------------------------------------------------------

/// Ports covered by the TSS I/O permission bitmap (COM1 at 0x3f8 and debug-exit at 0x501 are
/// below this; ports above it are denied).
const IO_BITMAP_PORTS: usize = 8192;

/// A 64-bit task-state segment: `rsp0` (the stack for traps from CPL3) and an I/O permission
/// bitmap that allows every port it covers.
///
/// IOPL=3 alone would do on hardware KVM, but PVM does not keep the IOPL an `iretq` to CPL3
/// asks for; it traps user-mode port I/O into KVM's instruction emulator, which then consults
/// this bitmap, as a CPU does when IOPL < CPL.
#[repr(C, packed)]
pub struct Tss {
    _reserved0: u32,
    rsp0: u64,
    _rsp1_2: [u64; 2],
    _reserved1: u64,
    _ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
    io_bitmap: [u8; IO_BITMAP_PORTS / 8],
    /// The CPU reads two bitmap bytes per check; the byte past the bitmap must be all ones.
    io_bitmap_end: u8,
}

const TSS_HEADER_SIZE: usize = 104;
const TSS_SIZE: usize = core::mem::size_of::<Tss>();

const EMPTY_TSS: Tss = Tss {
    _reserved0: 0,
    rsp0: 0,
    _rsp1_2: [0; 2],
    _reserved1: 0,
    _ist: [0; 7],
    _reserved2: 0,
    _reserved3: 0,
    iomap_base: TSS_HEADER_SIZE as u16,
    io_bitmap: [0; IO_BITMAP_PORTS / 8],
    io_bitmap_end: 0xff,
};

static TSS: Shared<[Tss; MAX_CPUS]> = Shared::new([EMPTY_TSS; MAX_CPUS]);

static GDT: Shared<[u64; GDT_SLOTS]> = Shared::new({
    let mut gdt = [0u64; GDT_SLOTS];
    gdt[1] = 0x00cf_9a00_0000_ffff; // kernel code, 32-bit (unused)
    gdt[(KERNEL_CS / 8) as usize] = 0x00af_9a00_0000_ffff; // kernel code, 64-bit
    gdt[(KERNEL_DS / 8) as usize] = 0x00cf_9200_0000_ffff; // kernel data
    gdt[(USER32_CS / 8) as usize] = 0x00cf_fa00_0000_ffff; // user code, 32-bit (unused)
    gdt[(USER_DS / 8) as usize] = 0x00cf_f200_0000_ffff; // user data, DPL3
    gdt[(USER_CS / 8) as usize] = 0x00af_fa00_0000_ffff; // user code, 64-bit, DPL3
    gdt
});

/// One IDT gate.
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    _reserved: u32,
}

const EMPTY_GATE: Gate = Gate {
    offset_low: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_high: 0,
    _reserved: 0,
};

static IDT: Shared<[Gate; 256]> = Shared::new([EMPTY_GATE; 256]);

#[repr(C, packed)]
struct TablePointer {
    limit: u16,
    base: u64,
}

/// Stacks, one per CPU, for CPL0 (traps) and CPL3 (everything else).
#[repr(C, align(4096))]
struct Stacks<const N: usize>([[u8; N]; MAX_CPUS]);

#[unsafe(no_mangle)]
static KERNEL_STACKS: Shared<Stacks<KERNEL_STACK_SIZE>> =
    Shared::new(Stacks([[0; KERNEL_STACK_SIZE]; MAX_CPUS]));
static USER_STACKS: Shared<Stacks<USER_STACK_SIZE>> =
    Shared::new(Stacks([[0; USER_STACK_SIZE]; MAX_CPUS]));

/// Index the next application processor takes (the BSP is CPU 0).
#[unsafe(no_mangle)]
static NEXT_CPU: AtomicU32 = AtomicU32::new(1);

fn kernel_stack_top(cpu: usize) -> u64 {
    KERNEL_STACKS.get() as u64 + ((cpu + 1) * KERNEL_STACK_SIZE) as u64
}

fn user_stack_top(cpu: usize) -> u64 {
    USER_STACKS.get() as u64 + ((cpu + 1) * USER_STACK_SIZE) as u64
}

const STACK_PAINT: u64 = 0x57a1_c0de_57a1_c0de;

/// Fills the unused part of CPU `cpu`'s user stack (below the caller's frame) with a pattern,
/// so [`user_stack_used`] can tell how deep it got. Call on CPU `cpu`.
pub fn paint_user_stack(cpu: usize) {
    let rsp: u64;
    // SAFETY: reads the stack pointer.
    unsafe { core::arch::asm!("mov {}, rsp", out(reg) rsp, options(nostack, nomem)) };
    let bottom = user_stack_top(cpu) - USER_STACK_SIZE as u64;
    // Stay clear of the red zone and of this function's own frame.
    let mut at = bottom;
    while at + 8 <= rsp.saturating_sub(512) {
        // SAFETY: between the bottom of this CPU's stack and below the live part of it; only
        // this CPU uses its stack.
        unsafe { core::ptr::write_volatile(at as *mut u64, STACK_PAINT) };
        at += 8;
    }
}

/// How many bytes of CPU `cpu`'s user stack were ever used (after [`paint_user_stack`]).
pub fn user_stack_used(cpu: usize) -> usize {
    let top = user_stack_top(cpu);
    let mut at = top - USER_STACK_SIZE as u64;
    while at < top {
        // SAFETY: reads within this CPU's stack, below the live part of it.
        let word = unsafe { core::ptr::read_volatile(at as *const u64) };
        if word != STACK_PAINT {
            break;
        }
        at += 8;
    }
    (top - at) as usize
}

/// Bytes in each CPU's user stack.
pub const USER_STACK_BYTES: usize = USER_STACK_SIZE;

// ----- entry points --------------------------------------------------------------------------

core::arch::global_asm!(
    // The boot CPU, entered by the VMM in 64-bit mode at CPL0 with rsi = boot_params.
    ".section .text.boot, \"ax\"",
    ".global _start",
    "_start:",
    "    cli",
    "    lea rsp, [rip + KERNEL_STACKS + {kstack}]",
    "    mov rdi, rsi",
    "    call {bsp_kernel_main}",
    "    ud2",
    // An application processor, arriving from the trampoline in 64-bit mode.
    ".text",
    ".global ap_entry64",
    "ap_entry64:",
    "    mov eax, 1",
    "    lock xadd dword ptr [rip + NEXT_CPU], eax",
    "    cmp eax, {max_cpus}",
    "    jae 2f",
    "    lea rsp, [rip + KERNEL_STACKS]",
    "    lea ecx, [eax + 1]",
    "    imul rcx, rcx, {kstack}",
    "    add rsp, rcx",
    "    mov edi, eax",
    "    call {ap_kernel_main}",
    "2:  cli",
    "    hlt",
    "    jmp 2b",
    kstack = const KERNEL_STACK_SIZE,
    max_cpus = const MAX_CPUS,
    bsp_kernel_main = sym bsp_kernel_main,
    ap_kernel_main = sym ap_kernel_main,
);

// The AP trampoline: copied to TRAMPOLINE_BASE and started by a SIPI in real mode with
// CS = TRAMPOLINE_BASE >> 4, IP = 0. It switches straight to long mode (PAE, LME, then PE and PG
// together) with the guest's own page tables and a three-entry GDT of its own, then jumps to
// `ap_entry64` in the image.
core::arch::global_asm!(
    ".section .text.trampoline, \"ax\"",
    ".global ap_trampoline_start",
    ".global ap_trampoline_end",
    ".code16",
    "ap_trampoline_start:",
    "    cli",
    "    cld",
    "    mov ax, cs",
    "    mov ds, ax",
    // lgdt [disp16]: the assembler cannot take a symbol difference as a 16-bit displacement.
    "    .byte 0x0f, 0x01, 0x16",
    "    .word tramp_gdtr - ap_trampoline_start",
    "    mov eax, cr4",
    "    or eax, 0x20",                // PAE
    "    mov cr4, eax",
    "    mov eax, {page_tables}",
    "    mov cr3, eax",
    "    mov ecx, 0xc0000080",         // EFER
    "    rdmsr",
    "    or eax, 0x100",               // LME
    "    wrmsr",
    "    mov eax, cr0",
    "    or eax, 0x80000001",          // PG | PE
    "    mov cr0, eax",
    // ljmp 0x08:tramp64 with a 32-bit offset (operand-size prefix in 16-bit code).
    "    .byte 0x66, 0xea",
    "    .long {base} + (tramp64 - ap_trampoline_start)",
    "    .word 0x08",
    ".code64",
    "tramp64:",
    "    mov ax, 0x10",
    "    mov ds, ax",
    "    mov es, ax",
    "    mov ss, ax",
    "    movabs rax, offset ap_entry64",
    "    jmp rax",
    ".balign 8",
    "tramp_gdt:",
    "    .quad 0",
    "    .quad 0x00af9a000000ffff",
    "    .quad 0x00cf92000000ffff",
    "tramp_gdtr:",
    "    .word 23",
    "    .long {base} + (tramp_gdt - ap_trampoline_start)",
    "ap_trampoline_end:",
    ".text",
    base = const TRAMPOLINE_BASE,
    page_tables = const PAGE_TABLES_BASE,
);

unsafe extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
}

/// The trampoline's code, to be copied to `TRAMPOLINE_BASE`.
pub fn trampoline() -> &'static [u8] {
    // SAFETY: both symbols bound one contiguous, read-only range of the image's text.
    unsafe {
        let start = &raw const ap_trampoline_start;
        let end = &raw const ap_trampoline_end;
        core::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

/// Boot CPU at CPL0: set up, then continue at CPL3 in `crate::bsp_main(boot_params)`.
extern "C" fn bsp_kernel_main(boot_params: u64) -> ! {
    // SAFETY: runs once, on CPU 0, before any other CPU exists.
    unsafe {
        cpu_init(0);
        enter_user(
            crate::bsp_main as *const () as u64,
            boot_params,
            user_stack_top(0),
        )
    }
}

/// An application processor at CPL0: set up, then continue at CPL3 in `crate::ap_main(cpu)`.
extern "C" fn ap_kernel_main(cpu: u32) -> ! {
    let cpu = cpu as usize;
    // SAFETY: `cpu` is unique to this processor (from NEXT_CPU) and below MAX_CPUS.
    unsafe {
        cpu_init(cpu);
        enter_user(
            crate::ap_main as *const () as u64,
            cpu as u64,
            user_stack_top(cpu),
        )
    }
}

const CR4_OSXSAVE: u64 = 1 << 18;
const CPUID_1_ECX_XSAVE: u32 = 1 << 26;
const CPUID_1_ECX_AVX: u32 = 1 << 28;
/// XCR0's x87, SSE and AVX state components.
const XCR0_X87_SSE_AVX: u32 = 0b111;

/// CPUs (bit per CPU index) whose `cpu_init` enabled AVX: CR4.OSXSAVE set, XCR0 = x87|SSE|AVX.
static AVX_CPUS: AtomicU64 = AtomicU64::new(0);

/// Whether CPU `cpu` may use AVX registers (see `cpu_init`).
pub fn avx_enabled(cpu: usize) -> bool {
    cpu < MAX_CPUS && AVX_CPUS.load(Ordering::Relaxed) & (1 << cpu) != 0
}

/// XCR0, read at CPL3. Only on a CPU where [`avx_enabled`] holds: without CR4.OSXSAVE,
/// `xgetbv` raises #UD.
pub fn xcr0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller checked CR4.OSXSAVE is set, so xgetbv only reads XCR0.
    unsafe {
        core::arch::asm!(
            "xgetbv",
            in("ecx") 0,
            out("eax") lo,
            out("edx") hi,
            options(nostack, nomem, preserves_flags),
        );
    }
    u64::from(lo) | u64::from(hi) << 32
}

/// CPUID leaf `leaf`, subleaf 0: (eax, ecx).
fn cpuid(leaf: u32) -> (u32, u32) {
    let (eax, ecx): (u32, u32);
    // SAFETY: CPUID only reads; rbx, which it also writes, is saved and restored around it
    // because LLVM reserves it.
    unsafe {
        core::arch::asm!(
            "mov {rbx_save}, rbx",
            "cpuid",
            "mov rbx, {rbx_save}",
            rbx_save = out(reg) _,
            inout("eax") leaf => eax,
            inout("ecx") 0 => ecx,
            out("edx") _,
            options(nostack, nomem, preserves_flags),
        );
    }
    (eax, ecx)
}

/// Whether the guest's CPUID allows XSAVE with the AVX state in XCR0. Call at CPL0.
fn avx_usable() -> bool {
    let wanted = CPUID_1_ECX_XSAVE | CPUID_1_ECX_AVX;
    // Leaf 0xd's EAX lists the XCR0 bits the hypervisor lets the guest set.
    cpuid(1).1 & wanted == wanted && cpuid(0xd).0 & XCR0_X87_SSE_AVX == XCR0_X87_SSE_AVX
}

/// Loads this CPU's control registers, GDT, TSS and IDT.
///
/// # Safety
/// Must run at CPL0 on CPU `cpu`, once, with `cpu < MAX_CPUS` unique to this processor.
unsafe fn cpu_init(cpu: usize) {
    // SAFETY: (whole block) CPL0 with interrupts off; the tables are statics that live forever;
    // CPU `cpu` alone writes its TSS and its two GDT slots.
    unsafe {
        core::arch::asm!("mov cr3, {}", in(reg) PAGE_TABLES_BASE, options(nostack));
        let mut cr0: u64;
        core::arch::asm!("mov {}, cr0", out(reg) cr0, options(nostack, nomem));
        cr0 |= (1 << 1) | (1 << 5) | (1 << 16); // MP, NE, WP
        cr0 &= !((1 << 2) | (1 << 3)); // EM, TS: let SSE run
        core::arch::asm!("mov cr0, {}", in(reg) cr0, options(nostack, nomem));
        let mut cr4: u64;
        core::arch::asm!("mov {}, cr4", out(reg) cr4, options(nostack, nomem));
        cr4 |= (1 << 9) | (1 << 10); // OSFXSR, OSXMMEXCPT
        // CPUID here, not at CPL3: at CPL0 KVM answers with the guest's CPUID, which is what
        // decides whether CR4.OSXSAVE and XCR0 may be set (at CPL3 PVM shows the host CPU's).
        let avx = avx_usable();
        if avx {
            cr4 |= CR4_OSXSAVE;
        }
        core::arch::asm!("mov cr4, {}", in(reg) cr4, options(nostack, nomem));
        if avx {
            // XCR0 may only be written once CR4.OSXSAVE is set.
            core::arch::asm!(
                "xsetbv",
                in("ecx") 0,
                in("eax") XCR0_X87_SSE_AVX,
                in("edx") 0,
                options(nostack, nomem),
            );
            AVX_CPUS.fetch_or(1 << cpu, Ordering::Relaxed);
        }

        let tss = &raw mut (*TSS.get())[cpu];
        (*tss).rsp0 = kernel_stack_top(cpu);
        let base = tss as u64;
        let limit = (TSS_SIZE - 1) as u64;
        let gdt = GDT.get();
        let slot = FIRST_TSS_SLOT + 2 * cpu;
        (*gdt)[slot] = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40) // present, DPL0, available 64-bit TSS
            | ((base >> 24 & 0xff) << 56);
        (*gdt)[slot + 1] = base >> 32;

        let gdtr = TablePointer {
            limit: (core::mem::size_of::<[u64; GDT_SLOTS]>() - 1) as u16,
            base: gdt as u64,
        };
        let idtr = TablePointer {
            limit: (core::mem::size_of::<[Gate; 256]>() - 1) as u16,
            base: IDT.get() as u64,
        };
        core::arch::asm!(
            "lgdt [{gdtr}]",
            "push {kcs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ss, {kds:x}",
            "xor {tmp:e}, {tmp:e}",
            "mov ds, {tmp:x}",
            "mov es, {tmp:x}",
            "mov fs, {tmp:x}",
            "mov gs, {tmp:x}",
            "ltr {tss:x}",
            "lidt [{idtr}]",
            gdtr = in(reg) &raw const gdtr,
            idtr = in(reg) &raw const idtr,
            kcs = const KERNEL_CS as u64,
            kds = in(reg) u64::from(KERNEL_DS),
            tss = in(reg) u64::from(FIRST_TSS_SELECTOR) + 16 * cpu as u64,
            tmp = out(reg) _,
        );
    }
}

/// Leaves CPL0 for good: `iretq` to `entry(arg)` at CPL3 on `stack_top`, with IOPL=3.
///
/// # Safety
/// `entry` must be an `extern "C" fn(u64) -> !` and `stack_top` the top of a free stack.
unsafe fn enter_user(entry: u64, arg: u64, stack_top: u64) -> ! {
    // SAFETY: builds a valid iretq frame for a 64-bit CPL3 code segment and a user stack; the
    // function entered never returns. The stack is offset by 8 as if a call had pushed a return
    // address, which is what the ABI expects at function entry.
    unsafe {
        core::arch::asm!(
            "push {uds}",
            "push {rsp3}",
            "push {rflags}",
            "push {ucs}",
            "push {rip}",
            "iretq",
            uds = in(reg) u64::from(USER_DS),
            rsp3 = in(reg) stack_top - 8,
            rflags = in(reg) USER_RFLAGS,
            ucs = in(reg) u64::from(USER_CS),
            rip = in(reg) entry,
            in("rdi") arg,
            options(noreturn),
        )
    }
}

// ----- IDT ----------------------------------------------------------------------------------

unsafe extern "C" {
    /// The exception stubs (vectors 0-31), in `traps`.
    static trap_table: [u64; 32];
    /// The stub for every other vector, in `traps`.
    fn trap_255();
}

fn gate(handler: u64) -> Gate {
    Gate {
        offset_low: handler as u16,
        selector: KERNEL_CS,
        ist: 0,
        type_attr: 0x8e, // present, DPL0, 64-bit interrupt gate
        offset_mid: (handler >> 16) as u16,
        offset_high: (handler >> 32) as u32,
        _reserved: 0,
    }
}

/// Fills the IDT. Runs at CPL3 (all memory is user-accessible) so it costs nothing on PVM;
/// `cpu_init` has already pointed IDTR at it.
pub fn fill_idt() {
    // SAFETY: `trap_table` is an immutable table of 32 stub addresses in the image.
    let exceptions = unsafe { &trap_table };
    let unexpected = trap_255 as *const () as u64;
    // SAFETY: only the BSP writes the IDT, before any other CPU starts and before traps are
    // expected, so nothing else accesses it concurrently.
    let idt = unsafe { &mut *IDT.get() };
    for (vector, entry) in idt.iter_mut().enumerate() {
        let handler = exceptions.get(vector).copied().unwrap_or(unexpected);
        *entry = gate(handler);
    }
}

/// The current privilege level, from CS.
pub fn current_privilege_level() -> u8 {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { core::arch::asm!("mov {:x}, cs", out(reg) cs, options(nostack, nomem)) };
    (cs & 3) as u8
}

//! Traps: the exception and interrupt stubs, the CPL0 handler, and the `ud2` syscall path.
//! Exceptions end the VM with a message; a stray interrupt (vector 32 and up, which should not
//! happen with the PICs masked and the IOAPIC untouched, but PVM runs user code with IF=1) is
//! acknowledged, counted and otherwise ignored.

use core::sync::atomic::{AtomicU32, Ordering};

/// Interrupts that arrived although none are expected.
pub static STRAY_INTERRUPTS: AtomicU32 = AtomicU32::new(0);

/// What the trap stubs push, lowest address first.
#[repr(C)]
pub struct TrapFrame {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// Vectors 0-31 are CPU exceptions; those marked `err` push an error code themselves.
// Vector 255 stands for any unexpected interrupt.
core::arch::global_asm!(
    ".macro TRAP vector, has_error",
    ".global trap_\\vector",
    "trap_\\vector:",
    ".if \\has_error == 0",
    "    push 0",
    ".endif",
    "    push \\vector",
    "    jmp trap_common",
    ".endm",
    "TRAP 0,0", "TRAP 1,0", "TRAP 2,0", "TRAP 3,0", "TRAP 4,0", "TRAP 5,0", "TRAP 6,0",
    "TRAP 7,0", "TRAP 8,1", "TRAP 9,0", "TRAP 10,1", "TRAP 11,1", "TRAP 12,1", "TRAP 13,1",
    "TRAP 14,1", "TRAP 15,0", "TRAP 16,0", "TRAP 17,1", "TRAP 18,0", "TRAP 19,0", "TRAP 20,0",
    "TRAP 21,1", "TRAP 22,0", "TRAP 23,0", "TRAP 24,0", "TRAP 25,0", "TRAP 26,0", "TRAP 27,0",
    "TRAP 28,0", "TRAP 29,1", "TRAP 30,1", "TRAP 31,0", "TRAP 255,0",
    ".balign 8",
    ".global trap_table",
    "trap_table:",
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "    .quad trap_\\v",
    ".endr",
    // Saves the registers as a `TrapFrame`, calls the handler, and returns to the trapped code
    // if the handler returns (it does for syscalls and stray interrupts).
    "trap_common:",
    "    push r15", "push r14", "push r13", "push r12", "push r11", "push r10",
    "    push r9", "push r8", "push rbp", "push rdi", "push rsi", "push rdx",
    "    push rcx", "push rbx", "push rax",
    "    mov rdi, rsp",
    "    mov rbx, rsp",
    "    and rsp, -16",
    "    call {handler}",
    "    mov rsp, rbx",
    "    pop rax", "pop rbx", "pop rcx", "pop rdx", "pop rsi", "pop rdi", "pop rbp",
    "    pop r8", "pop r9", "pop r10", "pop r11", "pop r12", "pop r13", "pop r14", "pop r15",
    "    add rsp, 16",
    "    iretq",
    // The user side of a syscall: `extern "C" fn(number, arg) -> u64`. The `ud2` traps to CPL0,
    // where `trap_handler` recognizes its address. (On PVM, `int N` at CPL3 raises #UD anyway
    // and `syscall` does not reliably switch to CPL0, but exceptions are delivered faithfully.)
    ".global user_syscall",
    "user_syscall:",
    "    mov rax, rdi",
    "    mov rdi, rsi",
    ".global user_syscall_trap",
    "user_syscall_trap:",
    "    ud2",
    "    ret",
    handler = sym trap_handler,
);

unsafe extern "C" {
    fn user_syscall(number: u64, arg: u64) -> u64;
    fn user_syscall_trap();
}

fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "divide error",
        1 => "debug",
        2 => "NMI",
        3 => "breakpoint",
        4 => "overflow",
        5 => "bound range",
        6 => "invalid opcode",
        7 => "device not available",
        8 => "double fault",
        10 => "invalid TSS",
        11 => "segment not present",
        12 => "stack fault",
        13 => "general protection",
        14 => "page fault",
        16 => "x87 floating point",
        17 => "alignment check",
        18 => "machine check",
        19 => "SIMD floating point",
        255 => "unexpected interrupt",
        _ => "reserved exception",
    }
}

/// Guest exit status for a CPU exception.
pub const EXIT_EXCEPTION: u8 = 3;

const VECTOR_INVALID_OPCODE: u64 = 6;

/// The stubs' vector number for "any vector from 32 up".
const VECTOR_INTERRUPT: u64 = 255;
const LAPIC_EOI: u64 = 0xfee0_00b0;
const PIC_MASTER_CMD: u16 = 0x20;
const PIC_SLAVE_CMD: u16 = 0xa0;
const PIC_EOI: u8 = 0x20;

extern "C" fn trap_handler(frame: &mut TrapFrame) {
    if frame.vector == VECTOR_INVALID_OPCODE && frame.rip == user_syscall_trap as *const () as u64 {
        frame.rax = syscall_handler(frame.rax, frame.rdi);
        frame.rip += 2; // past the ud2
        return;
    }
    if frame.vector == VECTOR_INTERRUPT {
        // Not printed: the interrupted code may hold the console lock. Whoever delivered it (the
        // local APIC for IOAPIC/MSI interrupts, the 8259s for ExtINT) gets its end-of-interrupt;
        // an EOI with nothing in service is ignored by both.
        STRAY_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the local APIC's EOI register is identity-mapped MMIO; writing 0 acknowledges
        // the highest-priority interrupt in service, if any.
        unsafe { core::ptr::write_volatile(LAPIC_EOI as *mut u32, 0) };
        crate::io::outb(PIC_SLAVE_CMD, PIC_EOI);
        crate::io::outb(PIC_MASTER_CMD, PIC_EOI);
        return;
    }
    let cr2: u64;
    // SAFETY: reading CR2 at CPL0 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nostack, nomem)) };
    crate::io::print_failure(format_args!(
        "thaw-test-guest: CPU exception: {} (vector {}) error {:#x} at rip {:#x} cs {:#x} \
         rsp {:#x} cr2 {:#x}\n",
        exception_name(frame.vector),
        frame.vector,
        frame.error,
        frame.rip,
        frame.cs,
        frame.rsp,
        cr2
    ));
    crate::io::exit(EXIT_EXCEPTION)
}

fn syscall_handler(number: u64, _arg: u64) -> u64 {
    match number {
        crate::arch::SYS_HALT_FOREVER => loop {
            // SAFETY: CPL0; with interrupts off this CPU sleeps until the VMM stops the VM.
            unsafe { core::arch::asm!("cli", "hlt", options(nostack, nomem)) };
        },
        _ => u64::MAX,
    }
}

/// Asks CPL0 to perform `number` with `arg`; returns its result (`u64::MAX` if unknown).
pub fn syscall(number: u64, arg: u64) -> u64 {
    // SAFETY: `user_syscall` is an ordinary C-ABI function whose trap returns right after the
    // `ud2` with rax set; the trap switches to the CPU's kernel stack, so the user stack is
    // untouched.
    unsafe { user_syscall(number, arg) }
}

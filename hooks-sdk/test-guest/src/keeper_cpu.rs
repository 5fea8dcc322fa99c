//! The register keeper (`thaw.keeper=1`): cpu1 loads a known pattern into its x87 stack, x87
//! control word, MXCSR and xmm0-15 (ymm0-15 when AVX is enabled), then counts forever in
//! hand-written assembly, checking every `CHECK_EVERY` iterations that the registers still hold
//! the pattern. A snapshot catches it at an arbitrary point of that loop, so a restore that
//! loses any of that state shows up as a mismatch, and a counter that did not go on shows the
//! vCPU did not either.
//!
//! The loop is pure assembly so that no compiler-generated code ever touches those registers;
//! the pattern and the dump layout are in the library (`thaw_test_guest::keeper`).

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use thaw_test_guest::keeper::{self as layout, FCW_OFFSET, MXCSR_OFFSET, PATTERN_LEN, X87_OFFSET};
use thaw_test_guest::status::Registers;

use crate::arch::Shared;

/// The CPU that keeps the registers.
pub const KEEPER_CPU: usize = 1;

/// Loop iterations between two register checks (a check takes about as long as a few hundred
/// iterations, so this keeps the loop mostly counting while still checking thousands of times
/// a second).
const CHECK_EVERY: u32 = 1 << 16;

/// Set by the boot CPU before it starts the others when `thaw.keeper=1`.
pub static WANTED: AtomicBool = AtomicBool::new(false);
/// Loop iterations so far.
static COUNTER: AtomicU64 = AtomicU64::new(0);
/// Register checks completed.
static CHECKS: AtomicU64 = AtomicU64::new(0);
/// 0 while every check passed; else 1 + the offset in the dump of the first byte that differed
/// (recorded once).
static MISMATCH: AtomicU64 = AtomicU64::new(0);
/// 256 or 128 once the keeper runs (its vector width), 0 before.
static VECTOR_BITS: AtomicU32 = AtomicU32::new(0);

#[repr(C, align(64))]
struct Dump([u8; PATTERN_LEN]);

static EXPECTED: Dump = Dump(layout::PATTERN);
/// Where each check dumps the registers. It starts as a copy of the pattern: with 128-bit
/// vectors only the low half of each 32-byte slot is ever written, and the upper halves must
/// then compare equal.
static DUMP: Shared<Dump> = Shared::new(Dump(layout::PATTERN));

/// What the keeper reports.
pub struct Report {
    /// Loop iterations so far.
    pub counter: u64,
    /// Checks completed.
    pub checks: u64,
    /// What they found.
    pub registers: Registers,
    /// The keeper's vector width (0: no keeper).
    pub vector_bits: u32,
}

/// The keeper's counters now.
pub fn report() -> Report {
    let vector_bits = VECTOR_BITS.load(Ordering::Acquire);
    let registers = match MISMATCH.load(Ordering::Relaxed) {
        _ if vector_bits == 0 => Registers::NoKeeper,
        0 => Registers::Intact,
        at => layout::Mismatch::at(at as usize - 1).map_or(Registers::Intact, Registers::Changed),
    };
    Report {
        counter: COUNTER.load(Ordering::Relaxed),
        checks: CHECKS.load(Ordering::Relaxed),
        registers,
        vector_bits,
    }
}

impl core::fmt::Display for Report {
    /// "keeper counter N (checks M), registers intact, 256-bit vectors", or "no register
    /// keeper".
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let (counter, checks, bits) = (self.counter, self.checks, self.vector_bits);
        match self.registers {
            Registers::NoKeeper => f.write_str("no register keeper"),
            Registers::Intact => write!(
                f,
                "keeper counter {counter} (checks {checks}), registers intact, {bits}-bit vectors"
            ),
            Registers::Changed(m) => write!(
                f,
                "keeper counter {counter} (checks {checks}), registers CHANGED ({m}), \
                 {bits}-bit vectors"
            ),
        }
    }
}

/// Publishes the keeper's vector width before the CPU reports itself online, so the boot CPU
/// can say what is kept.
pub fn announce(avx: bool) {
    VECTOR_BITS.store(if avx { 256 } else { 128 }, Ordering::Release);
}

/// Runs the keeper on this CPU forever. `avx`: whether this CPU's XCR0 enables AVX.
pub fn run(avx: bool) -> ! {
    let expected = EXPECTED.0.as_ptr();
    let dump = DUMP.get() as *mut u8;
    // SAFETY: the assembly only touches this CPU's registers, reads EXPECTED (immutable) and
    // writes DUMP (this CPU's alone) and the three counters, which it alone writes: plain
    // aligned 64-bit stores, which other CPUs read atomically. It uses AVX only when `avx`
    // says this CPU's XCR0 enables it, and leaves every x87/SSE exception masked, so it cannot
    // fault. It never returns, so it may clobber any register.
    unsafe {
        core::arch::asm!(
            // Load the pattern. The x87 values go in last first, so st(i) is value i.
            "fninit",
            "fldcw word ptr [r8 + {fcw}]",
            "ldmxcsr dword ptr [r8 + {mxcsr}]",
            "fld tbyte ptr [r8 + {x87} + 30]",
            "fld tbyte ptr [r8 + {x87} + 20]",
            "fld tbyte ptr [r8 + {x87} + 10]",
            "fld tbyte ptr [r8 + {x87}]",
            "test r13, r13",
            "jz 3f",
            "vmovdqu ymm0, [r8]",
            "vmovdqu ymm1, [r8 + 32]",
            "vmovdqu ymm2, [r8 + 64]",
            "vmovdqu ymm3, [r8 + 96]",
            "vmovdqu ymm4, [r8 + 128]",
            "vmovdqu ymm5, [r8 + 160]",
            "vmovdqu ymm6, [r8 + 192]",
            "vmovdqu ymm7, [r8 + 224]",
            "vmovdqu ymm8, [r8 + 256]",
            "vmovdqu ymm9, [r8 + 288]",
            "vmovdqu ymm10, [r8 + 320]",
            "vmovdqu ymm11, [r8 + 352]",
            "vmovdqu ymm12, [r8 + 384]",
            "vmovdqu ymm13, [r8 + 416]",
            "vmovdqu ymm14, [r8 + 448]",
            "vmovdqu ymm15, [r8 + 480]",
            "jmp 4f",
            "3:",
            "movdqu xmm0, [r8]",
            "movdqu xmm1, [r8 + 32]",
            "movdqu xmm2, [r8 + 64]",
            "movdqu xmm3, [r8 + 96]",
            "movdqu xmm4, [r8 + 128]",
            "movdqu xmm5, [r8 + 160]",
            "movdqu xmm6, [r8 + 192]",
            "movdqu xmm7, [r8 + 224]",
            "movdqu xmm8, [r8 + 256]",
            "movdqu xmm9, [r8 + 288]",
            "movdqu xmm10, [r8 + 320]",
            "movdqu xmm11, [r8 + 352]",
            "movdqu xmm12, [r8 + 384]",
            "movdqu xmm13, [r8 + 416]",
            "movdqu xmm14, [r8 + 448]",
            "movdqu xmm15, [r8 + 480]",
            // Count.
            "4:",
            "mov r14d, {every}",
            "5:",
            "add qword ptr [r10], 1",
            "dec r14d",
            "jnz 5b",
            // Check: dump everything in the pattern's layout, then compare byte by byte.
            "test r13, r13",
            "jz 6f",
            "vmovdqu [r9], ymm0",
            "vmovdqu [r9 + 32], ymm1",
            "vmovdqu [r9 + 64], ymm2",
            "vmovdqu [r9 + 96], ymm3",
            "vmovdqu [r9 + 128], ymm4",
            "vmovdqu [r9 + 160], ymm5",
            "vmovdqu [r9 + 192], ymm6",
            "vmovdqu [r9 + 224], ymm7",
            "vmovdqu [r9 + 256], ymm8",
            "vmovdqu [r9 + 288], ymm9",
            "vmovdqu [r9 + 320], ymm10",
            "vmovdqu [r9 + 352], ymm11",
            "vmovdqu [r9 + 384], ymm12",
            "vmovdqu [r9 + 416], ymm13",
            "vmovdqu [r9 + 448], ymm14",
            "vmovdqu [r9 + 480], ymm15",
            "jmp 7f",
            "6:",
            "movdqu [r9], xmm0",
            "movdqu [r9 + 32], xmm1",
            "movdqu [r9 + 64], xmm2",
            "movdqu [r9 + 96], xmm3",
            "movdqu [r9 + 128], xmm4",
            "movdqu [r9 + 160], xmm5",
            "movdqu [r9 + 192], xmm6",
            "movdqu [r9 + 224], xmm7",
            "movdqu [r9 + 256], xmm8",
            "movdqu [r9 + 288], xmm9",
            "movdqu [r9 + 320], xmm10",
            "movdqu [r9 + 352], xmm11",
            "movdqu [r9 + 384], xmm12",
            "movdqu [r9 + 416], xmm13",
            "movdqu [r9 + 448], xmm14",
            "movdqu [r9 + 480], xmm15",
            "7:",
            // Copy st(i) to the top and store-and-pop it: the stack is left as it was (four
            // of its eight slots are free for the copy).
            "fld st(0)",
            "fstp tbyte ptr [r9 + {x87}]",
            "fld st(1)",
            "fstp tbyte ptr [r9 + {x87} + 10]",
            "fld st(2)",
            "fstp tbyte ptr [r9 + {x87} + 20]",
            "fld st(3)",
            "fstp tbyte ptr [r9 + {x87} + 30]",
            "stmxcsr dword ptr [r9 + {mxcsr}]",
            "fnstcw word ptr [r9 + {fcw}]",
            "mov rsi, r9",
            "mov rdi, r8",
            "mov ecx, {len}",
            "cld",
            "repe cmpsb",
            "je 8f",
            // rsi is one past the first differing byte: record 1 + its offset, once.
            "cmp qword ptr [r12], 0",
            "jne 8f",
            "sub rsi, r9",
            "mov qword ptr [r12], rsi",
            "8:",
            "add qword ptr [r11], 1",
            "jmp 4b",
            fcw = const FCW_OFFSET,
            mxcsr = const MXCSR_OFFSET,
            x87 = const X87_OFFSET,
            len = const PATTERN_LEN,
            every = const CHECK_EVERY,
            in("r8") expected,
            in("r9") dump,
            in("r10") COUNTER.as_ptr(),
            in("r11") CHECKS.as_ptr(),
            in("r12") MISMATCH.as_ptr(),
            in("r13") u64::from(avx),
            options(noreturn),
        )
    }
}

const _: () = assert!(
    layout::VECTOR_SLOT == 32 && layout::X87_BYTES == 10 && layout::X87_VALUES == 4,
    "the assembly hard-codes the dump's strides"
);

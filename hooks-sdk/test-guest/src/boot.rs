//! What the VMM hands the guest: the Linux zero page (`struct boot_params`) with the command
//! line, and the MP table that lists the CPUs.

use thaw_test_guest::mptable;

/// Offsets in `struct boot_params` (Linux's Documentation/arch/x86/zero-page.rst).
const CMD_LINE_PTR: usize = 0x228;
const EXT_CMD_LINE_PTR: usize = 0x0c8;
const MAX_CMDLINE: usize = 2048;
const E820_ENTRIES: usize = 0x1e8;
const E820_TABLE: usize = 0x2d0;
const E820_MAX: usize = 128;
const E820_ENTRY_SIZE: u64 = 20;
const E820_RAM: u32 = 1;

fn read_u32(addr: u64) -> u32 {
    // SAFETY: `addr` lies in identity-mapped guest RAM (the zero page or the MP table), which
    // nothing else writes while the guest reads it.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn read_u8(addr: u64) -> u8 {
    // SAFETY: as for `read_u32`.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

fn read_u64(addr: u64) -> u64 {
    u64::from(read_u32(addr)) | u64::from(read_u32(addr + 4)) << 32
}

/// Whether the zero page's e820 map has RAM covering `[start, start + len)`.
pub fn is_ram(boot_params: u64, start: u64, len: u64) -> bool {
    let entries = usize::from(read_u8(boot_params + E820_ENTRIES as u64)).min(E820_MAX);
    let Some(end) = start.checked_add(len) else {
        return false;
    };
    (0..entries as u64).any(|i| {
        let entry = boot_params + E820_TABLE as u64 + i * E820_ENTRY_SIZE;
        let (addr, size, kind) = (read_u64(entry), read_u64(entry + 8), read_u32(entry + 16));
        kind == E820_RAM && addr <= start && addr.saturating_add(size) >= end
    })
}

/// The kernel command line named by the zero page at `boot_params`.
pub fn cmdline(boot_params: u64) -> &'static str {
    let low = u64::from(read_u32(boot_params + CMD_LINE_PTR as u64));
    let high = u64::from(read_u32(boot_params + EXT_CMD_LINE_PTR as u64));
    let ptr = low | (high << 32);
    if ptr == 0 {
        return "";
    }
    let mut len = 0;
    while len < MAX_CMDLINE && read_u8(ptr + len as u64) != 0 {
        len += 1;
    }
    // SAFETY: `len` bytes from `ptr` are identity-mapped RAM the VMM wrote and nobody changes.
    let bytes = unsafe { core::slice::from_raw_parts(ptr as *const u8, len) };
    core::str::from_utf8(bytes).unwrap_or("")
}

/// The processors the MP table lists.
pub type CpuList = mptable::CpuList<{ crate::arch::MAX_CPUS }>;

fn checksum_ok(addr: u64, len: usize) -> bool {
    (0..len as u64).fold(0u8, |s, i| s.wrapping_add(read_u8(addr + i))) == 0
}

fn find_floating_pointer() -> Option<u64> {
    // Where the MP spec says to look: the first KiB of the EBDA, then the BIOS ROM area.
    let ranges = [(0x9_fc00u64, 0xa_0000u64), (0xf_0000, 0x10_0000)];
    for (start, end) in ranges {
        let mut addr = start;
        while addr + 16 <= end {
            if read_u32(addr) == u32::from_le_bytes(*b"_MP_") && checksum_ok(addr, 16) {
                return Some(addr);
            }
            addr += 16;
        }
    }
    None
}

/// Reads the MP table; `None` if there is none or it is corrupt.
pub fn cpus() -> Option<CpuList> {
    let fp = find_floating_pointer()?;
    let table = u64::from(read_u32(fp + 4));
    if table == 0 || read_u32(table) != u32::from_le_bytes(*b"PCMP") {
        return None;
    }
    let len = usize::from(read_u8(table + 4)) | usize::from(read_u8(table + 5)) << 8;
    // SAFETY: the table's `len` bytes lie in identity-mapped RAM the VMM wrote below 1 MiB,
    // which nothing changes while the guest reads it.
    let bytes = unsafe { core::slice::from_raw_parts(table as *const u8, len) };
    mptable::parse(bytes)
}

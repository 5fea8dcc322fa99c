//! What the VMM hands the guest: the Linux zero page (`struct boot_params`) with the command
//! line, and the MP table that lists the CPUs.

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

/// Local APIC ids of the enabled processors in the MP table, BSP first.
pub struct CpuList {
    /// APIC ids.
    pub apic_ids: [u8; crate::arch::MAX_CPUS],
    /// How many are valid.
    pub count: usize,
    /// Processors listed beyond `MAX_CPUS`.
    pub dropped: usize,
}

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
    if !checksum_ok(table, len) {
        return None;
    }
    let entries = u16::from(read_u8(table + 34)) | u16::from(read_u8(table + 35)) << 8;
    let mut list = CpuList {
        apic_ids: [0; crate::arch::MAX_CPUS],
        count: 0,
        dropped: 0,
    };
    let mut bsp = None;
    let mut at = table + 44;
    for _ in 0..entries {
        if at >= table + len as u64 {
            return None;
        }
        match read_u8(at) {
            0 => {
                let apic_id = read_u8(at + 1);
                let flags = read_u8(at + 3);
                if flags & 1 != 0 {
                    if flags & 2 != 0 {
                        bsp = Some(apic_id);
                    }
                    if list.count < list.apic_ids.len() {
                        list.apic_ids[list.count] = apic_id;
                        list.count += 1;
                    } else {
                        list.dropped += 1;
                    }
                }
                at += 20;
            }
            1..=4 => at += 8,
            _ => return None,
        }
    }
    // Keep the BSP first so index 0 is always the CPU already running.
    if let Some(pos) = bsp.and_then(|b| list.apic_ids[..list.count].iter().position(|id| *id == b))
    {
        list.apic_ids.swap(0, pos);
    }
    Some(list)
}

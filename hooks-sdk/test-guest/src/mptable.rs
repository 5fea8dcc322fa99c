//! The MP configuration table (Intel MP spec 1.4) as far as the test guest reads it: the
//! enabled processors and which one boots. Pure parsing, so it is tested on the host; the guest
//! finds the table in memory (`boot.rs`).

/// Local APIC ids of the enabled processors in the MP table, BSP first.
pub struct CpuList<const N: usize> {
    /// APIC ids.
    pub apic_ids: [u8; N],
    /// How many are valid.
    pub count: usize,
    /// Processors listed beyond `N`.
    pub dropped: usize,
}

/// The enabled processors of an MP configuration table (`PCMP` header and entries), checksum
/// checked. Entries are walked by the table's length, as Linux does: the entry count is only an
/// upper bound (Firecracker's tables declare more entries than they hold).
pub fn parse<const N: usize>(table: &[u8]) -> Option<CpuList<N>> {
    const HEADER_LEN: usize = 44;
    if table.len() < HEADER_LEN
        || table[..4] != *b"PCMP"
        || usize::from(u16::from_le_bytes([table[4], table[5]])) != table.len()
        || table.iter().fold(0u8, |s, b| s.wrapping_add(*b)) != 0
    {
        return None;
    }
    let entries = u16::from_le_bytes([table[34], table[35]]);
    let mut list = CpuList {
        apic_ids: [0; N],
        count: 0,
        dropped: 0,
    };
    let mut bsp = None;
    let mut rest = &table[HEADER_LEN..];
    for _ in 0..entries {
        let Some(&kind) = rest.first() else {
            break;
        };
        let size = match kind {
            0 => 20,
            1..=4 => 8,
            _ => return None,
        };
        // An entry cut off by the table's end is corrupt, not merely beyond the count.
        let entry = rest.get(..size)?;
        if kind == 0 {
            let (apic_id, flags) = (entry[1], entry[3]);
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
        }
        rest = &rest[size..];
    }
    // Keep the BSP first so index 0 is always the CPU already running.
    if let Some(pos) = bsp.and_then(|b| list.apic_ids[..list.count].iter().position(|id| *id == b))
    {
        list.apic_ids.swap(0, pos);
    }
    Some(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table with `cpus` processors (the BSP last) and one bus, ISA interrupt and local
    /// interrupt entry each, declaring `declared` entries (the real count when `None`).
    fn table(cpus: u8, declared: Option<u16>) -> [u8; 512] {
        let mut t = [0u8; 512];
        let mut len = 44;
        let mut count = 0u16;
        for id in 0..cpus {
            let flags = if id + 1 == cpus { 3 } else { 1 };
            t[len..len + 4].copy_from_slice(&[0, id, 0x14, flags]);
            len += 20;
            count += 1;
        }
        for kind in [1u8, 3, 4] {
            t[len] = kind;
            len += 8;
            count += 1;
        }
        t[..4].copy_from_slice(b"PCMP");
        t[4..6].copy_from_slice(&(len as u16).to_le_bytes());
        t[34..36].copy_from_slice(&declared.unwrap_or(count).to_le_bytes());
        let sum = t[..len].iter().fold(0u8, |s, b| s.wrapping_add(*b));
        t[7] = 0u8.wrapping_sub(sum);
        t
    }

    fn len_of(t: &[u8]) -> usize {
        usize::from(u16::from_le_bytes([t[4], t[5]]))
    }

    #[test]
    fn lists_enabled_processors_bsp_first() {
        let t = table(3, None);
        let list = parse::<64>(&t[..len_of(&t)]).unwrap();
        assert_eq!((list.count, list.dropped), (3, 0));
        assert_eq!(&list.apic_ids[..3], &[2, 1, 0]);
    }

    #[test]
    fn an_entry_count_beyond_the_length_is_walked_by_length() {
        // Firecracker declares more entries than its table holds; Linux walks by length.
        let t = table(2, Some(200));
        let list = parse::<64>(&t[..len_of(&t)]).unwrap();
        assert_eq!(list.count, 2);
    }

    #[test]
    fn a_count_below_the_entries_stops_early() {
        let t = table(3, Some(1));
        assert_eq!(parse::<64>(&t[..len_of(&t)]).unwrap().count, 1);
    }

    #[test]
    fn rejects_corrupt_tables() {
        let t = table(2, None);
        let len = len_of(&t);
        let mut bad_sum = t;
        bad_sum[40] ^= 1;
        assert!(parse::<64>(&bad_sum[..len]).is_none());
        let mut bad_kind = t;
        bad_kind[44] = 9;
        bad_kind[7] = bad_kind[7].wrapping_sub(9);
        assert!(parse::<64>(&bad_kind[..len]).is_none());
        assert!(parse::<64>(&t[..len - 1]).is_none(), "length mismatch");
        assert!(parse::<64>(&t[..20]).is_none(), "shorter than a header");
        // An entry cut by the table's end: the last 8-byte entry made a 20-byte processor.
        let mut cut = t;
        cut[len - 8] = 0;
        cut[7] = cut[7].wrapping_add(4);
        assert!(parse::<64>(&cut[..len]).is_none());
    }
}

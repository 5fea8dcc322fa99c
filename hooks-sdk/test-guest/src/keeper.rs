//! The register keeper's pattern (`thaw.keeper=1`): what cpu1 loads into its x87, SSE and AVX
//! registers, laid out exactly as its check loop dumps them, so one byte comparison of the dump
//! against [`PATTERN`] checks everything and the offset of the first differing byte names the
//! register. The loop itself is hand-written assembly in the guest image; this is the part the
//! host can test.

use core::fmt;

/// Vector registers the keeper fills (xmm0-15 / ymm0-15).
pub const VECTOR_REGS: usize = 16;
/// Bytes per vector register in the pattern: room for a ymm register, whichever width is used.
pub const VECTOR_SLOT: usize = 32;
/// The bytes of a slot an xmm register covers; the rest is the ymm register's upper half.
pub const XMM_BYTES: usize = 16;
/// Where the x87 values start: `X87_VALUES` 80-bit values, `st(0)` first.
pub const X87_OFFSET: usize = VECTOR_REGS * VECTOR_SLOT;
/// Values the keeper pushes on the x87 stack (half of it, so the check can push a copy).
pub const X87_VALUES: usize = 4;
/// Bytes in an x87 value as `fstp tbyte` stores it.
pub const X87_BYTES: usize = 10;
/// Where MXCSR sits (4 bytes).
pub const MXCSR_OFFSET: usize = X87_OFFSET + X87_VALUES * X87_BYTES;
/// Where the x87 control word sits (2 bytes).
pub const FCW_OFFSET: usize = MXCSR_OFFSET + 4;
/// The whole pattern.
pub const PATTERN_LEN: usize = FCW_OFFSET + 2;

/// MXCSR: every exception masked (a fault would end the guest), rounding toward +infinity and
/// flush-to-zero, so a register file reset to its defaults (0x1f80) cannot pass for it.
pub const MXCSR: u32 = 0x1f80 | (0b10 << 13) | (1 << 15);
/// x87 control word: every exception masked, 64-bit precision, rounding toward +infinity
/// (the default is 0x037f, round to nearest).
pub const FCW: u16 = 0x037f | (0b10 << 10);

/// splitmix64, so that no two registers (nor two x87 values) share bytes in a pattern a
/// swapped or shifted register file could reproduce.
const fn mix(i: u64) -> u64 {
    let mut z = i
        .wrapping_add(0x9e37_79b9_7f4a_7c15)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const fn build() -> [u8; PATTERN_LEN] {
    let mut p = [0u8; PATTERN_LEN];
    let mut word = 0;
    while word < X87_OFFSET / 8 {
        let bytes = mix(word as u64).to_le_bytes();
        let mut b = 0;
        while b < 8 {
            p[word * 8 + b] = bytes[b];
            b += 1;
        }
        word += 1;
    }
    // Normal extended-precision numbers (explicit integer bit set, exponent near the bias,
    // alternating signs): `fld tbyte` / `fstp tbyte` carry them bit for bit.
    let mut v = 0;
    while v < X87_VALUES {
        let significand = (mix(1000 + v as u64) | (1 << 63)).to_le_bytes();
        let sign_exponent = ((v as u16 & 1) << 15 | (0x3fff + v as u16)).to_le_bytes();
        let at = X87_OFFSET + v * X87_BYTES;
        let mut b = 0;
        while b < 8 {
            p[at + b] = significand[b];
            b += 1;
        }
        p[at + 8] = sign_exponent[0];
        p[at + 9] = sign_exponent[1];
        v += 1;
    }
    let mxcsr = MXCSR.to_le_bytes();
    let mut b = 0;
    while b < 4 {
        p[MXCSR_OFFSET + b] = mxcsr[b];
        b += 1;
    }
    let fcw = FCW.to_le_bytes();
    p[FCW_OFFSET] = fcw[0];
    p[FCW_OFFSET + 1] = fcw[1];
    p
}

/// The pattern, in the layout of the keeper's register dump.
pub const PATTERN: [u8; PATTERN_LEN] = build();

/// The first register found not holding its pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// xmm`n` (the low 128 bits of ymm`n`).
    Xmm(u8),
    /// The upper 128 bits of ymm`n`.
    YmmUpper(u8),
    /// x87 `st(n)`.
    X87(u8),
    /// MXCSR.
    Mxcsr,
    /// The x87 control word.
    Fcw,
}

impl Mismatch {
    /// The register holding byte `offset` of the dump; `None` past its end.
    pub fn at(offset: usize) -> Option<Self> {
        Some(match offset {
            o if o < X87_OFFSET => {
                let reg = (o / VECTOR_SLOT) as u8;
                if o % VECTOR_SLOT < XMM_BYTES {
                    Mismatch::Xmm(reg)
                } else {
                    Mismatch::YmmUpper(reg)
                }
            }
            o if o < MXCSR_OFFSET => Mismatch::X87(((o - X87_OFFSET) / X87_BYTES) as u8),
            o if o < FCW_OFFSET => Mismatch::Mxcsr,
            o if o < PATTERN_LEN => Mismatch::Fcw,
            _ => return None,
        })
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Xmm(n) => write!(f, "xmm{n} differs"),
            Mismatch::YmmUpper(n) => write!(f, "ymm{n} upper half differs"),
            Mismatch::X87(n) => write!(f, "st({n}) differs"),
            Mismatch::Mxcsr => f.write_str("mxcsr differs"),
            Mismatch::Fcw => f.write_str("x87 control word differs"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_contiguous_and_registers_are_distinct() {
        assert_eq!(PATTERN_LEN, 558);
        assert_eq!(&PATTERN[MXCSR_OFFSET..FCW_OFFSET], &0xdf80u32.to_le_bytes());
        assert_eq!(&PATTERN[FCW_OFFSET..], &0x0b7fu16.to_le_bytes());
        let slots: Vec<&[u8]> = PATTERN[..X87_OFFSET].chunks(XMM_BYTES).collect();
        for (i, a) in slots.iter().enumerate() {
            assert!(a.iter().any(|b| *b != 0));
            for b in &slots[i + 1..] {
                assert_ne!(a, b, "two register halves share a pattern");
            }
        }
    }

    #[test]
    fn x87_values_are_normal_extended_numbers() {
        for v in 0..X87_VALUES {
            let at = X87_OFFSET + v * X87_BYTES;
            let significand = u64::from_le_bytes(PATTERN[at..at + 8].try_into().unwrap());
            let se = u16::from_le_bytes([PATTERN[at + 8], PATTERN[at + 9]]);
            assert_ne!(significand >> 63, 0, "integer bit");
            let exponent = se & 0x7fff;
            assert!(exponent != 0 && exponent != 0x7fff, "{exponent:#x}");
        }
    }

    #[test]
    fn offsets_name_their_register() {
        assert_eq!(Mismatch::at(0), Some(Mismatch::Xmm(0)));
        assert_eq!(Mismatch::at(15), Some(Mismatch::Xmm(0)));
        assert_eq!(Mismatch::at(16), Some(Mismatch::YmmUpper(0)));
        assert_eq!(Mismatch::at(3 * 32 + 5), Some(Mismatch::Xmm(3)));
        assert_eq!(Mismatch::at(511), Some(Mismatch::YmmUpper(15)));
        assert_eq!(Mismatch::at(512), Some(Mismatch::X87(0)));
        assert_eq!(Mismatch::at(551), Some(Mismatch::X87(3)));
        assert_eq!(Mismatch::at(552), Some(Mismatch::Mxcsr));
        assert_eq!(Mismatch::at(556), Some(Mismatch::Fcw));
        assert_eq!(Mismatch::at(557), Some(Mismatch::Fcw));
        assert_eq!(Mismatch::at(558), None);
        assert_eq!(Mismatch::YmmUpper(7).to_string(), "ymm7 upper half differs");
        assert_eq!(Mismatch::X87(2).to_string(), "st(2) differs");
    }
}

//! The agent's `thaw:status` answer: a small JSON document about what survived a restore (the
//! register keeper's counter and registers) and what must differ between clones (a random
//! value, the wall clock, the restore id), formatted into a caller's buffer without allocating.

use core::fmt::{self, Write};

use crate::keeper::Mismatch;
use crate::text::{JsonStr, SliceWriter};

/// The invocation payload that asks for the status instead of a SHA-256.
pub const STATUS_PAYLOAD: &[u8] = b"thaw:status";

/// Most bytes of a restore id the guest keeps (ids are UUID-sized in practice).
pub const MAX_RESTORE_ID: usize = 256;

/// A buffer big enough for any status document: the fixed fields plus a restore id of
/// `MAX_RESTORE_ID` bytes that all need `\u00XX` escapes.
pub const MAX_STATUS_JSON: usize = 512 + 6 * MAX_RESTORE_ID;

/// What the register keeper found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registers {
    /// Every check so far found the pattern.
    Intact,
    /// The first register a check found changed.
    Changed(Mismatch),
    /// No keeper runs (`thaw.keeper` off, or a single CPU).
    NoKeeper,
}

/// The status document's fields.
#[derive(Clone, Copy, Debug)]
pub struct Status<'a> {
    /// The keeper's loop counter.
    pub counter: u64,
    /// Register checks the keeper completed.
    pub checks: u64,
    /// What they found.
    pub registers: Registers,
    /// The width of the vector registers the keeper keeps: 256 (AVX), 128 (SSE), 0 (none).
    pub vector_bits: u32,
    /// A value drawn from the guest's random source.
    pub random: [u8; 16],
    /// The guest's idea of the Unix time in nanoseconds (0 before any restore).
    pub wall_clock_ns: u64,
    /// Restores the guest went through.
    pub restores: u32,
    /// The last restore's id (empty before any).
    pub restore_id: &'a str,
}

impl Status<'_> {
    /// Formats the document into `out`; returns its length, or `None` if `out` is too small.
    pub fn write_json(&self, out: &mut [u8]) -> Option<usize> {
        let mut w = SliceWriter::new(out);
        self.write_to(&mut w).ok()?;
        Some(w.len())
    }

    fn write_to(&self, w: &mut SliceWriter<'_>) -> fmt::Result {
        write!(
            w,
            "{{\"counter\":{},\"checks\":{},\"registers\":\"",
            self.counter, self.checks
        )?;
        match self.registers {
            Registers::Intact => w.write_str("intact")?,
            Registers::Changed(m) => write!(w, "{m}")?,
            Registers::NoKeeper => w.write_str("no keeper")?,
        }
        write!(w, "\",\"vector_bits\":{},\"random\":\"", self.vector_bits)?;
        for b in self.random {
            write!(w, "{b:02x}")?;
        }
        write!(
            w,
            "\",\"wall_clock_ns\":{},\"restores\":{},\"restore_id\":\"{}\"}}",
            self.wall_clock_ns,
            self.restores,
            JsonStr(self.restore_id)
        )
    }
}

/// A restore id kept in a fixed buffer: the first `MAX_RESTORE_ID` bytes of the host's, cut at
/// a character boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoreId {
    bytes: [u8; MAX_RESTORE_ID],
    len: usize,
}

impl Default for RestoreId {
    fn default() -> Self {
        RestoreId {
            bytes: [0; MAX_RESTORE_ID],
            len: 0,
        }
    }
}

impl RestoreId {
    /// Keeps (the start of) `id`.
    pub fn set(&mut self, id: &str) {
        let mut len = id.len().min(MAX_RESTORE_ID);
        while !id.is_char_boundary(len) {
            len -= 1;
        }
        self.bytes[..len].copy_from_slice(&id.as_bytes()[..len]);
        self.len = len;
    }

    /// The id kept.
    pub fn as_str(&self) -> &str {
        // Only whole characters of a `str` are ever stored, so this cannot fail.
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(restore_id: &str) -> Status<'_> {
        Status {
            counter: 123_456_789,
            checks: 42,
            registers: Registers::Intact,
            vector_bits: 256,
            random: [
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff,
            ],
            wall_clock_ns: 1_795_000_000_123_456_789,
            restores: 2,
            restore_id,
        }
    }

    fn json(s: &Status<'_>) -> String {
        let mut buf = [0u8; MAX_STATUS_JSON];
        let n = s.write_json(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn formats_every_field() {
        assert_eq!(
            json(&status("restore-1")),
            r#"{"counter":123456789,"checks":42,"registers":"intact","vector_bits":256,"random":"00112233445566778899aabbccddeeff","wall_clock_ns":1795000000123456789,"restores":2,"restore_id":"restore-1"}"#
        );
        let mut s = status("");
        s.registers = Registers::Changed(Mismatch::YmmUpper(9));
        s.vector_bits = 128;
        assert!(json(&s).contains(r#""registers":"ymm9 upper half differs","vector_bits":128,"#));
        s.registers = Registers::NoKeeper;
        assert!(json(&s).contains(r#""registers":"no keeper""#));
        assert!(json(&s).ends_with(r#""restore_id":""}"#));
    }

    #[test]
    fn escapes_the_restore_id_and_reports_overflow() {
        let id = "a\"b\\c\nd\u{1}é";
        assert!(json(&status(id)).contains(r#""restore_id":"a\"b\\c\u000ad\u0001é"}"#));
        let worst = "\u{1}".repeat(MAX_RESTORE_ID);
        assert!(json(&status(&worst)).len() <= MAX_STATUS_JSON);
        let mut small = [0u8; 40];
        assert_eq!(status("x").write_json(&mut small), None);
    }

    #[test]
    fn restore_ids_are_kept_up_to_the_limit_on_a_char_boundary() {
        let mut id = RestoreId::default();
        assert_eq!(id.as_str(), "");
        id.set("restore-42");
        assert_eq!(id.as_str(), "restore-42");
        let long = format!("{}é", "x".repeat(MAX_RESTORE_ID - 1));
        id.set(&long);
        assert_eq!(id.as_str(), "x".repeat(MAX_RESTORE_ID - 1));
    }
}

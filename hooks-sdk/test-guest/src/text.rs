//! Text formatted into caller buffers without allocating (the guest has no heap): a writer over
//! a byte slice, JSON string escaping, and the guest's own bytes shown as text.

use core::fmt::{self, Write};

/// Writes into a byte slice, failing once it is full.
pub struct SliceWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> SliceWriter<'a> {
    /// A writer that fills `buf` from its start.
    pub fn new(buf: &'a mut [u8]) -> Self {
        SliceWriter { buf, len: 0 }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Write for SliceWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(fmt::Error)?;
        let dest = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        dest.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Formats `args` into `out`; returns the length, or `None` if it does not fit.
pub fn format_into(out: &mut [u8], args: fmt::Arguments) -> Option<usize> {
    let mut w = SliceWriter::new(out);
    w.write_fmt(args).ok()?;
    Some(w.len())
}

/// Escapes everything written through it for the inside of a JSON string (RFC 8259, section
/// 7), so any `Display` can be put in a JSON document as it is formatted.
pub struct JsonEscape<W>(pub W);

impl<W: Write> Write for JsonEscape<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            match c {
                '"' => self.0.write_str("\\\"")?,
                '\\' => self.0.write_str("\\\\")?,
                c if u32::from(c) < 0x20 => write!(self.0, "\\u{:04x}", u32::from(c))?,
                c => self.0.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// `s` as the inside of a JSON string.
pub struct JsonStr<'a>(pub &'a str);

impl fmt::Display for JsonStr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        JsonEscape(f).write_str(self.0)
    }
}

/// Bytes from outside (a payload) shown as text: at most `MAX_SHOWN_BYTES` of them, invalid
/// UTF-8 as U+FFFD, and `…` when cut, so a message about them stays short and printable.
pub struct Lossy<'a>(pub &'a [u8]);

/// Most bytes of a `Lossy` value shown.
pub const MAX_SHOWN_BYTES: usize = 64;

impl fmt::Display for Lossy<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = &self.0[..self.0.len().min(MAX_SHOWN_BYTES)];
        for chunk in shown.utf8_chunks() {
            f.write_str(chunk.valid())?;
            if !chunk.invalid().is_empty() {
                f.write_char(char::REPLACEMENT_CHARACTER)?;
            }
        }
        if shown.len() < self.0.len() {
            f.write_char('…')?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format(args: fmt::Arguments) -> String {
        let mut buf = [0u8; 1024];
        let n = format_into(&mut buf, args).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn formats_until_the_buffer_is_full() {
        let mut small = [0u8; 5];
        assert_eq!(format_into(&mut small, format_args!("{}", 12345)), Some(5));
        assert_eq!(&small, b"12345");
        assert_eq!(format_into(&mut small, format_args!("{}", 123456)), None);
        let mut empty = [0u8; 0];
        assert_eq!(format_into(&mut empty, format_args!("")), Some(0));
    }

    #[test]
    fn escapes_json_strings() {
        assert_eq!(
            format(format_args!("{}", JsonStr("a\"b\\c\nd\u{1}é"))),
            r#"a\"b\\c\u000ad\u0001é"#
        );
        let mut out = String::new();
        write!(JsonEscape(&mut out), "say {:?}", "hi").unwrap();
        assert_eq!(out, r#"say \"hi\""#);
    }

    #[test]
    fn shows_outside_bytes_short_and_valid() {
        assert_eq!(format(format_args!("{}", Lossy(b"abc"))), "abc");
        assert_eq!(format(format_args!("{}", Lossy(b"a\xffb"))), "a\u{fffd}b");
        let long = [b'x'; MAX_SHOWN_BYTES + 1];
        let shown = format(format_args!("{}", Lossy(&long)));
        assert_eq!(shown, format!("{}…", "x".repeat(MAX_SHOWN_BYTES)));
        // A character cut at the limit shows as U+FFFD, never as broken UTF-8.
        let mut cut = [b'y'; MAX_SHOWN_BYTES + 1];
        cut[MAX_SHOWN_BYTES - 1..].copy_from_slice("é".as_bytes());
        let shown = format(format_args!("{}", Lossy(&cut)));
        assert!(shown.ends_with("y\u{fffd}…"), "{shown}");
    }
}

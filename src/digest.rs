//! SHA-256 as lowercase hex: what apt's index records for a package, what a function image's
//! manifest records for its initramfs, and what names a cached package set.

use std::io::{self, Read};

use sha2::{Digest, Sha256};

/// SHA-256 (lowercase hex) and length of everything `reader` yields.
pub fn sha256_of(mut reader: impl Read) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        match reader.read(&mut buf)? {
            0 => break,
            n => {
                hasher.update(&buf[..n]);
                len += n as u64;
            }
        }
    }
    Ok((hex(&hasher.finalize()), len))
}

/// SHA-256 of `data`, lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn known_input_streamed_or_whole() {
        assert_eq!(sha256_of(&b"abc"[..]).unwrap(), (ABC.to_owned(), 3));
        assert_eq!(sha256_hex(b"abc"), ABC);
        assert_eq!(hex(&[0, 0xab, 0xff]), "00abff");
    }
}

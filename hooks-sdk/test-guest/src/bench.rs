//! The vsock bench's wire format (`thaw.vsock-bench=1`), shared by the guest and, written out
//! again, by the host's bench and tests (`benches/vsock.rs`, `tests/vsock_guest.rs`).
//!
//! On connecting, the guest sends [`GREETING`]. The host then sends 16-byte commands:
//! `op:u8, 7 zero bytes, len:u64 (little-endian)`:
//! - `E` echo: `len` bytes follow (at most [`MAX_ECHO`]); the guest sends them back.
//! - `U` upload: `len` bytes follow; the guest answers with their SHA-256 (32 bytes), which it
//!   computes as the data arrives.
//! - `D` download: the guest sends `len` (at most [`MAX_DOWNLOAD`]) pseudo-random bytes, then
//!   their SHA-256. The bytes are generated once at start-up and the hash computed on the
//!   first request for each length, so repeated downloads time the transfer itself.
//! - `Q` quit: the guest powers off with status 0.
//!
//! A malformed command (or one over the limits) makes the guest reset the connection.

/// What the guest says first.
pub const GREETING: &[u8; 16] = b"thaw-vsock-bench";
/// Bytes in a command.
pub const COMMAND_LEN: usize = 16;
/// Longest echo.
pub const MAX_ECHO: usize = 64 * 1024 - COMMAND_LEN;
/// Longest download: the protocol's largest payload, 6 MiB.
pub const MAX_DOWNLOAD: usize = hooks_sdk::protocol::MAX_PAYLOAD;

/// A bench command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Send back the `len` bytes that follow.
    Echo(u64),
    /// Hash the `len` bytes that follow.
    Upload(u64),
    /// Send `len` pseudo-random bytes and their hash.
    Download(u64),
    /// Power off.
    Quit,
}

impl Command {
    /// Decodes a command; `None` if malformed.
    pub fn decode(b: &[u8; COMMAND_LEN]) -> Option<Self> {
        if b[1..8].iter().any(|x| *x != 0) {
            return None;
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&b[8..]);
        let len = u64::from_le_bytes(len);
        Some(match b[0] {
            b'E' => Command::Echo(len),
            b'U' => Command::Upload(len),
            b'D' => Command::Download(len),
            b'Q' if len == 0 => Command::Quit,
            _ => return None,
        })
    }

    /// Encodes this command.
    pub fn encode(&self) -> [u8; COMMAND_LEN] {
        let (op, len) = match *self {
            Command::Echo(n) => (b'E', n),
            Command::Upload(n) => (b'U', n),
            Command::Download(n) => (b'D', n),
            Command::Quit => (b'Q', 0),
        };
        let mut b = [0u8; COMMAND_LEN];
        b[0] = op;
        b[8..].copy_from_slice(&len.to_le_bytes());
        b
    }
}

/// xorshift64: cheap pseudo-random bytes for downloads.
pub struct XorShift(pub u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Fills `out` with pseudo-random bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut words = out.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.next().to_le_bytes());
        }
        let tail = words.into_remainder();
        let last = self.next().to_le_bytes();
        tail.copy_from_slice(&last[..tail.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_and_junk_is_refused() {
        for c in [
            Command::Echo(64),
            Command::Upload(6 << 20),
            Command::Download(1),
            Command::Quit,
        ] {
            assert_eq!(Command::decode(&c.encode()), Some(c));
        }
        let mut b = Command::Echo(1).encode();
        b[3] = 1;
        assert_eq!(Command::decode(&b), None);
        assert_eq!(Command::decode(&[b'X'; 16]), None);
        let mut q = Command::Quit.encode();
        q[8] = 1;
        assert_eq!(Command::decode(&q), None);
        assert_eq!(
            Command::Echo(5).encode()[..9],
            [b'E', 0, 0, 0, 0, 0, 0, 0, 5]
        );
    }

    #[test]
    fn xorshift_fills_any_length() {
        let mut a = [0u8; 13];
        XorShift(1).fill(&mut a);
        assert!(a.iter().any(|x| *x != 0));
        let mut b = [0u8; 13];
        XorShift(1).fill(&mut b);
        assert_eq!(a, b);
    }
}

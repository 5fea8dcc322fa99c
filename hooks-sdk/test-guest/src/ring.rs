//! A byte ring buffer: a vsock connection's receive buffer. Its capacity is the `buf_alloc`
//! the driver advertises, so a peer that respects its credit can never overflow it.

/// A fixed-capacity FIFO of bytes over a borrowed buffer.
pub struct ByteRing {
    buf: &'static mut [u8],
    /// Index of the oldest byte.
    head: usize,
    /// Bytes stored.
    len: usize,
}

impl ByteRing {
    /// A ring over `buf` (its whole length is the capacity).
    pub fn new(buf: &'static mut [u8]) -> Self {
        ByteRing {
            buf,
            head: 0,
            len: 0,
        }
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Bytes stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room left.
    pub fn free(&self) -> usize {
        self.buf.len() - self.len
    }

    /// Forgets everything stored.
    pub fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
    }

    /// Appends all of `data`, or nothing (returning false) if it does not fit.
    pub fn push(&mut self, data: &[u8]) -> bool {
        if data.len() > self.free() {
            return false;
        }
        let cap = self.buf.len();
        let tail = (self.head + self.len) % cap.max(1);
        let first = data.len().min(cap - tail);
        self.buf[tail..tail + first].copy_from_slice(&data[..first]);
        self.buf[..data.len() - first].copy_from_slice(&data[first..]);
        self.len += data.len();
        true
    }

    /// Moves up to `out.len()` of the oldest bytes into `out`; returns how many.
    pub fn pop(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.len);
        let cap = self.buf.len();
        let first = n.min(cap - self.head);
        out[..first].copy_from_slice(&self.buf[self.head..self.head + first]);
        out[first..n].copy_from_slice(&self.buf[..n - first]);
        self.len -= n;
        self.head = if self.len == 0 {
            0
        } else {
            (self.head + n) % cap
        };
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(cap: usize) -> ByteRing {
        ByteRing::new(Vec::leak(vec![0u8; cap]))
    }

    #[test]
    fn fifo_across_the_wrap() {
        let mut r = ring(8);
        assert!(r.push(b"abcdef"));
        let mut out = [0u8; 4];
        assert_eq!(r.pop(&mut out), 4);
        assert_eq!(&out, b"abcd");
        assert!(r.push(b"ghijkl")); // wraps
        assert!(!r.push(b"x")); // full
        assert_eq!(r.free(), 0);
        let mut out = [0u8; 16];
        assert_eq!(r.pop(&mut out), 8);
        assert_eq!(&out[..8], b"efghijkl");
        assert!(r.is_empty());
        assert_eq!(r.pop(&mut out), 0);
    }

    #[test]
    fn refuses_what_does_not_fit_and_keeps_order_under_load() {
        let mut r = ring(1000);
        let mut expect = 0u8;
        let mut next = 0u8;
        for round in 0..500usize {
            let chunk: Vec<u8> = (0..(round * 7) % 300)
                .map(|_| {
                    next = next.wrapping_add(1);
                    next
                })
                .collect();
            if !r.push(&chunk) {
                // Not stored: rewind the generator.
                next = next.wrapping_sub(chunk.len() as u8);
            }
            let mut out = vec![0u8; (round * 13) % 257];
            let n = r.pop(&mut out);
            for b in &out[..n] {
                expect = expect.wrapping_add(1);
                assert_eq!(*b, expect);
            }
        }
        r.clear();
        assert_eq!((r.len(), r.capacity()), (0, 1000));
    }
}

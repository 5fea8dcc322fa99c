//! The chunk codec: zero-page elision, zstd, and sealing with the chunk's identity as AAD.
//! Encoding runs on many threads at once and decoding sits on the restore fault path, so both
//! reuse their buffers and zstd contexts.
//!
//! ```text
//! chunk plaintext (chunk_size bytes, last chunk of a region may be shorter)
//!   │ split into 4 KiB pages; bitmap bit i = page i is not all zero
//!   ▼
//! packed = the non-zero pages, in order          (all zero → Zero entry, nothing stored)
//!   │ zstd level N; kept only if strictly smaller (else raw = true)
//!   ▼
//! payload ──seal(nonce = 4 || index, AAD = snapshot id || index || guest addr)──► stored bytes
//! ```

use std::cell::RefCell;

use crate::format::{DataChunk, PAGE_SIZE};
use crate::seal::{Domain, SealFailed, Sealer, chunk_aad, nonce_bytes};

/// True when every byte is zero. Compares 16-byte words OR-ed over 256-byte blocks: the
/// compiler turns that into vector code, and most non-zero pages exit in the first block.
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(256);
    for block in &mut blocks {
        let acc = block.chunks_exact(16).fold(0u128, |acc, w| {
            acc | u128::from_ne_bytes(w.try_into().unwrap_or([0xff; 16]))
        });
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|b| *b == 0)
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// A chunk ready to be written. The writer fills in the file offset.
pub(crate) enum Encoded {
    Zero,
    Data {
        chunk: DataChunk,
        sealed: Vec<u8>,
        nonzero_pages: u32,
    },
}

/// Per-thread encoder state: a zstd context and the packing buffer.
pub(crate) struct Encoder {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    packed: Vec<u8>,
}

impl Encoder {
    pub fn new(level: i32) -> Self {
        // Without a context every chunk is stored raw, which is still a valid snapshot.
        let compressor = zstd::bulk::Compressor::new(level).ok();
        Encoder {
            compressor,
            packed: Vec::new(),
        }
    }

    pub fn encode(
        &mut self,
        sealer: &Sealer,
        snapshot_id: &[u8; 16],
        index: u64,
        guest_addr: u64,
        plain: &[u8],
    ) -> Result<Encoded, SealFailed> {
        self.encode_resident(sealer, snapshot_id, index, guest_addr, plain, &[])
    }

    /// [`encode`](Self::encode), told which pages may hold data (`populated`, one flag per
    /// page; empty: all may). Pages flagged false are never read: they are zero.
    pub fn encode_resident(
        &mut self,
        sealer: &Sealer,
        snapshot_id: &[u8; 16],
        index: u64,
        guest_addr: u64,
        plain: &[u8],
        populated: &[bool],
    ) -> Result<Encoded, SealFailed> {
        let may_hold_data = |i: usize| populated.get(i).copied().unwrap_or(true);
        let pages = plain.len().div_ceil(PAGE_SIZE);
        if (0..pages).all(|i| !may_hold_data(i)) {
            return Ok(Encoded::Zero);
        }
        let mut bitmap = vec![0u8; pages.div_ceil(8)];
        self.packed.clear();
        let mut nonzero_pages = 0u32;
        // The hash covers the whole chunk as a reader will see it; never-populated pages are
        // hashed as the zeros they are, without being read.
        let mut hasher = blake3::Hasher::new();
        for (i, page) in plain.chunks(PAGE_SIZE).enumerate() {
            if !may_hold_data(i) {
                hasher.update(&ZERO_PAGE[..page.len()]);
                continue;
            }
            hasher.update(page);
            if !is_zero(page) {
                if let Some(byte) = bitmap.get_mut(i / 8) {
                    *byte |= 1 << (i % 8);
                }
                self.packed.extend_from_slice(page);
                nonzero_pages += 1;
            }
        }
        if nonzero_pages == 0 {
            return Ok(Encoded::Zero);
        }
        let tag_len = sealer.tag_len();
        let mut out = Vec::with_capacity(self.packed.len() + tag_len);
        // zstd writes at most the Vec's capacity, so output that would not shrink fails here
        // instead of growing; either way the chunk is then stored raw.
        let compressed = self
            .compressor
            .as_mut()
            .and_then(|c| c.compress_to_buffer(&self.packed, &mut out).ok())
            .is_some_and(|n| n < self.packed.len());
        if !compressed {
            out.clear();
            out.extend_from_slice(&self.packed);
        }
        sealer.seal(
            nonce_bytes(Domain::Chunk, index),
            &chunk_aad(snapshot_id, index, guest_addr),
            &mut out,
        )?;
        let chunk = DataChunk {
            offset: 0,
            stored_len: u32::try_from(out.len()).map_err(|_| SealFailed)?,
            raw: !compressed,
            page_bitmap: bitmap,
            hash: *hasher.finalize().as_bytes(),
        };
        Ok(Encoded::Data {
            chunk,
            sealed: out,
            nonzero_pages,
        })
    }
}

/// Why a stored chunk did not decode.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// The AEAD tag (or plaintext-mode digest) did not verify.
    Tampered,
    /// Authentic bytes that still do not make the chunk: a writer bug or a broken manifest.
    Corrupt(String),
}

thread_local! {
    /// Decoding runs on pager and verify threads; one zstd context and packing buffer each.
    static SCRATCH: RefCell<(Option<zstd::bulk::Decompressor<'static>>, Vec<u8>)> =
        const { RefCell::new((None, Vec::new())) };
}

/// Allocates the calling thread's decoding state (zstd context, packing buffer for chunks of
/// `chunk_len` bytes) now rather than on its first chunk (see
/// [`crate::Snapshot::prepare_decoding_thread`]).
pub(crate) fn prepare_decoding(chunk_len: usize) {
    SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        let (dctx, packed) = &mut *scratch;
        if dctx.is_none() {
            // Without one now, the first chunk makes it (and says why if it cannot).
            *dctx = zstd::bulk::Decompressor::new().ok();
        }
        packed.reserve(chunk_len);
    });
}

/// Number of pages the bitmap marks present among the first `pages`.
pub(crate) fn count_present(bitmap: &[u8], pages: usize) -> usize {
    (0..pages).filter(|i| page_present(bitmap, *i)).count()
}

fn page_present(bitmap: &[u8], i: usize) -> bool {
    bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// Checks `sealed` (decrypting it in place, then discarding it) without decompressing: what a
/// lazy restore does for every chunk before the guest runs.
pub(crate) fn authenticate(
    sealer: &Sealer,
    snapshot_id: &[u8; 16],
    index: u64,
    guest_addr: u64,
    sealed: &mut [u8],
) -> Result<(), DecodeError> {
    sealer
        .open(
            nonce_bytes(Domain::Chunk, index),
            &chunk_aad(snapshot_id, index, guest_addr),
            sealed,
        )
        .map(|_| ())
        .map_err(|_| DecodeError::Tampered)
}

/// Whether decoding checks the writer's BLAKE3 hash of the plaintext.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HashCheck {
    Yes,
    No,
}

/// Opens `sealed` (decrypting in place) and rebuilds the chunk into `out`, whose length is the
/// chunk's length; `(index, guest_addr)` is where the chunk belongs, bound into its AAD.
pub(crate) fn decode(
    sealer: &Sealer,
    snapshot_id: &[u8; 16],
    (index, guest_addr): (u64, u64),
    chunk: &DataChunk,
    sealed: &mut [u8],
    out: &mut [u8],
    hash: HashCheck,
) -> Result<(), DecodeError> {
    let payload = sealer
        .open(
            nonce_bytes(Domain::Chunk, index),
            &chunk_aad(snapshot_id, index, guest_addr),
            sealed,
        )
        .map_err(|_| DecodeError::Tampered)?;
    let pages = out.len().div_ceil(PAGE_SIZE);
    let present = count_present(&chunk.page_bitmap, pages);
    let packed_len = present * PAGE_SIZE;
    SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        let (dctx, packed) = &mut *scratch;
        // A chunk with every page present decodes straight into `out`.
        let all_present = present == pages && out.len() % PAGE_SIZE == 0;
        if all_present {
            unpack_into(chunk.raw, payload, dctx, out)?;
        } else {
            packed.clear();
            packed.resize(packed_len, 0);
            unpack_into(chunk.raw, payload, dctx, packed)?;
            let mut src = packed.chunks(PAGE_SIZE);
            for (i, page) in out.chunks_mut(PAGE_SIZE).enumerate() {
                if page_present(&chunk.page_bitmap, i) {
                    let data = src
                        .next()
                        .filter(|d| d.len() == page.len())
                        .ok_or_else(|| DecodeError::Corrupt("packed pages too short".into()))?;
                    page.copy_from_slice(data);
                } else {
                    page.fill(0);
                }
            }
        }
        Ok::<(), DecodeError>(())
    })?;
    if hash == HashCheck::Yes && blake3::hash(out) != blake3::Hash::from(chunk.hash) {
        return Err(DecodeError::Corrupt(
            "BLAKE3 of the decoded chunk does not match".into(),
        ));
    }
    Ok(())
}

/// Copies or decompresses `payload` into exactly `dst.len()` bytes; decompression is bounded by
/// `dst`, so a hostile payload cannot make it allocate.
fn unpack_into(
    raw: bool,
    payload: &[u8],
    dctx: &mut Option<zstd::bulk::Decompressor<'static>>,
    dst: &mut [u8],
) -> Result<(), DecodeError> {
    if raw {
        if payload.len() != dst.len() {
            return Err(DecodeError::Corrupt(format!(
                "raw payload is {} bytes, expected {}",
                payload.len(),
                dst.len()
            )));
        }
        dst.copy_from_slice(payload);
        return Ok(());
    }
    if dctx.is_none() {
        *dctx = Some(
            zstd::bulk::Decompressor::new()
                .map_err(|e| DecodeError::Corrupt(format!("zstd context: {e}")))?,
        );
    }
    let d = dctx
        .as_mut()
        .ok_or_else(|| DecodeError::Corrupt("zstd context missing".into()))?;
    let n = d
        .decompress_to_buffer(payload, dst)
        .map_err(|e| DecodeError::Corrupt(format!("zstd: {e}")))?;
    if n != dst.len() {
        return Err(DecodeError::Corrupt(format!(
            "decompressed to {n} bytes, expected {}",
            dst.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::DataKey;

    const ID: [u8; 16] = [7; 16];

    fn sealer() -> Sealer {
        Sealer::aead(&DataKey::generate().unwrap()).unwrap()
    }

    fn text_page(seed: u8) -> Vec<u8> {
        (0..PAGE_SIZE)
            .map(|i| b"thaw snapshot "[(i + usize::from(seed)) % 14])
            .collect()
    }

    fn decode_to_vec(s: &Sealer, idx: u64, addr: u64, enc: Encoded, len: usize) -> Vec<u8> {
        let mut out = vec![0xee; len];
        match enc {
            Encoded::Zero => out.fill(0),
            Encoded::Data {
                chunk, mut sealed, ..
            } => decode(
                s,
                &ID,
                (idx, addr),
                &chunk,
                &mut sealed,
                &mut out,
                HashCheck::Yes,
            )
            .unwrap(),
        }
        out
    }

    #[test]
    fn detects_zero_and_nonzero_bytes_anywhere() {
        let mut page = vec![0u8; PAGE_SIZE + 7];
        assert!(is_zero(&page));
        for pos in [0, 15, 255, 256, 4095, PAGE_SIZE + 6] {
            page[pos] = 1;
            assert!(!is_zero(&page), "byte {pos}");
            page[pos] = 0;
        }
    }

    #[test]
    fn all_zero_chunk_stores_nothing() {
        let mut enc = Encoder::new(1);
        let out = enc
            .encode(&sealer(), &ID, 0, 0, &[0u8; 4 * PAGE_SIZE])
            .unwrap();
        assert!(matches!(out, Encoded::Zero));
    }

    #[test]
    fn partial_zero_chunk_round_trips_with_bitmap() {
        let s = sealer();
        let mut plain = vec![0u8; 10 * PAGE_SIZE];
        plain[2 * PAGE_SIZE..3 * PAGE_SIZE].copy_from_slice(&text_page(1));
        plain[9 * PAGE_SIZE + 100] = 9;
        let mut enc = Encoder::new(1);
        let encoded = enc.encode(&s, &ID, 3, 0x4000, &plain).unwrap();
        let Encoded::Data {
            chunk,
            nonzero_pages,
            ..
        } = &encoded
        else {
            panic!("zero")
        };
        assert_eq!(*nonzero_pages, 2);
        assert_eq!(chunk.page_bitmap, vec![0b0000_0100, 0b0000_0010]);
        assert!(!chunk.raw);
        assert_eq!(decode_to_vec(&s, 3, 0x4000, encoded, plain.len()), plain);
    }

    #[test]
    fn incompressible_chunk_is_stored_raw() {
        let s = sealer();
        let mut plain = vec![0u8; 4 * PAGE_SIZE];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in plain.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8;
        }
        let encoded = Encoder::new(1).encode(&s, &ID, 0, 0, &plain).unwrap();
        let Encoded::Data { chunk, sealed, .. } = &encoded else {
            panic!("zero")
        };
        assert!(chunk.raw);
        assert_eq!(sealed.len(), plain.len() + 16);
        assert_eq!(decode_to_vec(&s, 0, 0, encoded, plain.len()), plain);
    }

    #[test]
    fn chunk_does_not_open_under_another_index_or_address() {
        let s = sealer();
        let plain = text_page(3);
        for (idx, addr) in [(1, 0), (0, 4096)] {
            let Ok(Encoded::Data {
                chunk, mut sealed, ..
            }) = Encoder::new(1).encode(&s, &ID, 0, 0, &plain)
            else {
                panic!("encode")
            };
            let mut out = vec![0; PAGE_SIZE];
            let r = decode(
                &s,
                &ID,
                (idx, addr),
                &chunk,
                &mut sealed,
                &mut out,
                HashCheck::Yes,
            );
            assert_eq!(r, Err(DecodeError::Tampered));
        }
    }

    #[test]
    fn wrong_hash_is_corrupt_not_tampered() {
        let s = Sealer::Plaintext;
        let Ok(Encoded::Data {
            mut chunk,
            mut sealed,
            ..
        }) = Encoder::new(1).encode(&s, &ID, 0, 0, &text_page(0))
        else {
            panic!("encode")
        };
        chunk.hash[0] ^= 1;
        let mut out = vec![0; PAGE_SIZE];
        let stored = sealed.clone();
        let r = decode(
            &s,
            &ID,
            (0, 0),
            &chunk,
            &mut sealed,
            &mut out,
            HashCheck::Yes,
        );
        assert!(matches!(r, Err(DecodeError::Corrupt(_))));
        // The restore path trusts authentication alone: the same bytes decode without the check.
        let mut sealed = stored;
        let r = decode(
            &s,
            &ID,
            (0, 0),
            &chunk,
            &mut sealed,
            &mut out,
            HashCheck::No,
        );
        assert_eq!(r, Ok(()));
        assert_eq!(out, text_page(0));
    }
}

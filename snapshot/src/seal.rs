//! Sealing of every byte range of a snapshot (header, state, manifest, chunks): AES-256-GCM
//! under the snapshot's data key, or, in insecure-plaintext mode, a BLAKE3 digest that only
//! detects accidents. One type so every caller gets the same nonce and AAD discipline.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

use crate::format::{BLAKE3_TAG_LEN, GCM_TAG_LEN, NONCE_LEN};
use crate::keys::DataKey;

/// What a nonce is for. The data key is fresh for every snapshot, so a nonce only has to be
/// unique within one snapshot: `domain (u32 LE) || counter (u64 LE)` is, and needs no
/// randomness per chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Domain {
    Header = 1,
    State = 2,
    Manifest = 3,
    Chunk = 4,
    /// `working-set.thaw`. Its counter half is random instead (see `working_set.rs`).
    WorkingSet = 5,
}

pub(crate) fn nonce_bytes(domain: Domain, counter: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[..4].copy_from_slice(&(domain as u32).to_le_bytes());
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n
}

/// The AAD of a section: its label, the snapshot id and, for chunks, index and guest address,
/// so a sealed blob verifies only in the place it was written for.
pub(crate) fn section_aad(domain: Domain, snapshot_id: &[u8; 16]) -> Vec<u8> {
    let label: &[u8] = match domain {
        Domain::Header => b"thaw/header",
        Domain::State => b"thaw/state",
        Domain::Manifest => b"thaw/manifest",
        Domain::Chunk => b"thaw/chunk",
        Domain::WorkingSet => b"thaw/working-set",
    };
    let mut aad = Vec::with_capacity(label.len() + 16);
    aad.extend_from_slice(label);
    aad.extend_from_slice(snapshot_id);
    aad
}

pub(crate) fn chunk_aad(snapshot_id: &[u8; 16], index: u64, guest_addr: u64) -> [u8; 32] {
    let mut aad = [0u8; 32];
    aad[..16].copy_from_slice(snapshot_id);
    aad[16..24].copy_from_slice(&index.to_le_bytes());
    aad[24..].copy_from_slice(&guest_addr.to_le_bytes());
    aad
}

/// Authentication failed; the caller knows which section, so it names the error.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Unauthentic;

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct SealFailed;

pub(crate) enum Sealer {
    Aead(Box<LessSafeKey>),
    /// Integrity only: anyone can recompute the digest.
    Plaintext,
}

impl Sealer {
    pub fn aead(key: &DataKey) -> Option<Self> {
        UnboundKey::new(&AES_256_GCM, key.bytes())
            .ok()
            .map(|k| Sealer::Aead(Box::new(LessSafeKey::new(k))))
    }

    pub fn tag_len(&self) -> usize {
        match self {
            Sealer::Aead(_) => GCM_TAG_LEN,
            Sealer::Plaintext => BLAKE3_TAG_LEN,
        }
    }

    pub fn is_encrypted(&self) -> bool {
        matches!(self, Sealer::Aead(_))
    }

    /// Encrypts `buf` in place (AEAD) and appends the tag. ring refuses only inputs beyond
    /// GCM's 64 GiB limit, far above every cap here; the error still reaches the caller so
    /// plaintext can never be written by mistake.
    pub fn seal(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut Vec<u8>,
    ) -> Result<(), SealFailed> {
        match self {
            Sealer::Aead(key) => key
                .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), buf)
                .map_err(|_| SealFailed),
            Sealer::Plaintext => {
                let digest = plaintext_digest(nonce, aad, buf);
                buf.extend_from_slice(&digest);
                Ok(())
            }
        }
    }

    /// Checks the tag at the end of `buf` and returns the plaintext (decrypted in place).
    pub fn open<'a>(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        buf: &'a mut [u8],
    ) -> Result<&'a mut [u8], Unauthentic> {
        match self {
            Sealer::Aead(key) => key
                .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), buf)
                .map_err(|_| Unauthentic),
            Sealer::Plaintext => {
                let body_len = buf.len().checked_sub(BLAKE3_TAG_LEN).ok_or(Unauthentic)?;
                let (body, tag) = buf.split_at_mut(body_len);
                let digest = plaintext_digest(nonce, aad, body);
                // blake3::Hash compares in constant time; not needed without a secret, but free.
                if blake3::Hash::from(digest)
                    == blake3::Hash::from_slice(tag).map_err(|_| Unauthentic)?
                {
                    Ok(body)
                } else {
                    Err(Unauthentic)
                }
            }
        }
    }
}

/// The plaintext-mode tag: BLAKE3 over nonce, AAD length, AAD and data, so the same position
/// and context rules hold as in encrypted mode.
fn plaintext_digest(nonce: [u8; NONCE_LEN], aad: &[u8], data: &[u8]) -> [u8; BLAKE3_TAG_LEN] {
    let mut h = blake3::Hasher::new();
    h.update(&nonce);
    h.update(&(aad.len() as u64).to_le_bytes());
    h.update(aad);
    h.update(data);
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealers() -> Vec<Sealer> {
        let key = DataKey::generate().unwrap();
        vec![Sealer::aead(&key).unwrap(), Sealer::Plaintext]
    }

    #[test]
    fn seal_open_round_trip_and_detects_changes() {
        for s in sealers() {
            let nonce = nonce_bytes(Domain::Chunk, 7);
            let mut buf = b"guest memory".to_vec();
            s.seal(nonce, b"aad", &mut buf).unwrap();
            assert_eq!(buf.len(), 12 + s.tag_len());
            assert_eq!(
                s.open(nonce, b"aad", &mut buf.clone()).unwrap(),
                b"guest memory"
            );
            assert_eq!(s.open(nonce, b"aaD", &mut buf.clone()), Err(Unauthentic));
            let other = nonce_bytes(Domain::Chunk, 8);
            assert_eq!(s.open(other, b"aad", &mut buf.clone()), Err(Unauthentic));
            let mut flipped = buf.clone();
            flipped[3] ^= 0x10;
            assert_eq!(s.open(nonce, b"aad", &mut flipped), Err(Unauthentic));
            assert_eq!(
                s.open(nonce, b"aad", &mut buf[..5].to_vec()),
                Err(Unauthentic)
            );
        }
    }

    #[test]
    fn encrypted_mode_hides_the_plaintext() {
        let s = Sealer::aead(&DataKey::generate().unwrap()).unwrap();
        let mut buf = vec![0x41u8; 64];
        s.seal(nonce_bytes(Domain::State, 0), b"", &mut buf)
            .unwrap();
        assert!(!buf.windows(8).any(|w| w == [0x41; 8]));
    }

    #[test]
    fn nonces_differ_by_domain_and_counter() {
        assert_ne!(
            nonce_bytes(Domain::State, 0),
            nonce_bytes(Domain::Manifest, 0)
        );
        assert_ne!(nonce_bytes(Domain::Chunk, 1), nonce_bytes(Domain::Chunk, 2));
        assert_eq!(
            nonce_bytes(Domain::Chunk, 1),
            [4, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
        );
    }
}

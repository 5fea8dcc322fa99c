//! A snapshot chunk as an object of a content-addressed store (docs/store.md): named by a
//! hash of its plaintext keyed per master key, sealed so that only holders of that key can
//! read it, and verified against its name before its bytes are used.
//!
//! ```text
//! name   = BLAKE3-keyed(name key, plaintext)                       32 bytes, hex in the store
//! object = "THAWOB01" ‖ codec (1) ‖ plaintext length (u32 LE) ‖ nonce (12) ‖ ciphertext ‖ tag
//!          key   = BLAKE3-keyed(seal key, name)                    one AES-256-GCM key per name
//!          nonce = BLAKE3-keyed(nonce key, codec ‖ payload)[..12]  synthetic, from what is sealed
//!          AAD   = "THAWOB01" ‖ codec ‖ plaintext length ‖ name
//! ```
//!
//! Why this shape:
//! - **Keyed names.** Identical chunks under one master key get one name, so snapshots of
//!   functions on the same runtime share their objects; under another master key the same
//!   bytes get another name, so a store shared by tenants does not tell one tenant that
//!   another holds a page it can guess.
//! - **Deterministic objects.** Sealing the same plaintext with the same codec gives the same
//!   bytes, so two hosts that upload one chunk at once write the same object and "write once,
//!   never overwrite" needs no coordination. One key per name means a key only ever seals one
//!   plaintext; the nonce still comes from the payload, so two different encodings of that
//!   plaintext (another zstd level, a raw fallback) never share a nonce under one key.
//! - **Verified twice.** Opening checks the tag (the object was sealed for this name by a
//!   holder of the key, and has not changed since) and then the name itself (the plaintext
//!   hashes to it): an object moved under another name, cut short, or altered fails before a
//!   byte of it is returned.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use zeroize::Zeroizing;

use crate::format::{GCM_TAG_LEN, MAX_CHUNK_SIZE, NONCE_LEN};
use crate::keys::{KEY_LEN, MasterKey};

/// The first bytes of every chunk object, and its format version.
pub const OBJECT_MAGIC: &[u8; 8] = b"THAWOB01";
/// Magic, codec, plaintext length, nonce.
pub const OBJECT_HEADER_LEN: usize = 8 + 1 + 4 + NONCE_LEN;
/// The largest chunk an object may hold: the largest chunk size a snapshot allows.
pub const MAX_OBJECT_PLAINTEXT: usize = MAX_CHUNK_SIZE as usize;

const NAME_CONTEXT: &str = "thaw store 2026 chunk name v1";
const SEAL_CONTEXT: &str = "thaw store 2026 chunk seal v1";
const NONCE_CONTEXT: &str = "thaw store 2026 chunk nonce v1";

/// How an object's payload encodes its plaintext.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Codec {
    Raw = 0,
    Zstd = 1,
}

/// zstd level of chunk objects: what `thaw snapshot create` uses for snapshot files.
pub const OBJECT_ZSTD_LEVEL: i32 = 1;

/// A chunk object's name: the keyed hash of its plaintext.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ObjectName(pub [u8; 32]);

impl std::fmt::Display for ObjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::keys::hex(&self.0))
    }
}

impl std::fmt::Debug for ObjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjectName({self})")
    }
}

impl std::str::FromStr for ObjectName {
    type Err = ObjectError;

    /// 64 lowercase hex digits, as [`Display`](std::fmt::Display) writes them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::keys::unhex(s)
            .map(ObjectName)
            .ok_or_else(|| ObjectError::BadName { name: s.into() })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ObjectError {
    #[error("{name:?} is not a chunk object name (64 lowercase hex digits)")]
    BadName { name: String },
    #[error("a chunk of {len} bytes is larger than an object may hold ({MAX_OBJECT_PLAINTEXT})")]
    TooLarge { len: usize },
    #[error("chunk object {name} is {len} bytes, too short to be one")]
    Truncated { name: ObjectName, len: usize },
    #[error("chunk object {name} does not start with a Thaw object header")]
    NotAnObject { name: ObjectName },
    #[error("chunk object {name} uses codec {codec}, which this version does not know")]
    UnknownCodec { name: ObjectName, codec: u8 },
    #[error("chunk object {name} holds {found} bytes, the manifest expects {expected}")]
    WrongLength {
        name: ObjectName,
        found: usize,
        expected: usize,
    },
    #[error(
        "chunk object {name} fails authentication: altered, cut, moved from another name, or sealed with another master key"
    )]
    Unauthentic { name: ObjectName },
    #[error("chunk object {name} decodes to bytes that do not hash to its name")]
    NameMismatch { name: ObjectName },
    #[error("chunk object {name} does not decompress: {reason}")]
    Corrupt { name: ObjectName, reason: String },
    #[error("AES-256-GCM refused to seal a chunk object")]
    Seal,
}

/// The keys a master key derives for the store. Zeroized on drop.
pub struct StoreKeys {
    name: Zeroizing<[u8; KEY_LEN]>,
    seal: Zeroizing<[u8; KEY_LEN]>,
    nonce: Zeroizing<[u8; KEY_LEN]>,
}

impl std::fmt::Debug for StoreKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKeys(<redacted>)")
    }
}

impl StoreKeys {
    pub fn derive(master: &MasterKey) -> Self {
        let from = |context| Zeroizing::new(blake3::derive_key(context, master.secret()));
        Self {
            name: from(NAME_CONTEXT),
            seal: from(SEAL_CONTEXT),
            nonce: from(NONCE_CONTEXT),
        }
    }

    /// The name the chunk `plain` is stored under.
    pub fn name_of(&self, plain: &[u8]) -> ObjectName {
        ObjectName(*blake3::keyed_hash(&self.name, plain).as_bytes())
    }

    /// The object holding `plain`, and its name: zstd at `level` where that makes it smaller,
    /// else the plaintext as is.
    pub fn seal(&self, plain: &[u8], level: i32) -> Result<(ObjectName, Vec<u8>), ObjectError> {
        if plain.len() > MAX_OBJECT_PLAINTEXT {
            return Err(ObjectError::TooLarge { len: plain.len() });
        }
        let name = self.name_of(plain);
        let compressed = zstd::bulk::compress(plain, level)
            .ok()
            .filter(|c| c.len() < plain.len());
        let (codec, payload) = match &compressed {
            Some(c) => (Codec::Zstd, c.as_slice()),
            None => (Codec::Raw, plain),
        };
        let len =
            u32::try_from(plain.len()).map_err(|_| ObjectError::TooLarge { len: plain.len() })?;
        let mut nonce_hash = blake3::Hasher::new_keyed(&self.nonce);
        nonce_hash.update(&[codec as u8]);
        nonce_hash.update(payload);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&nonce_hash.finalize().as_bytes()[..NONCE_LEN]);

        let mut object = Vec::with_capacity(OBJECT_HEADER_LEN + payload.len() + GCM_TAG_LEN);
        object.extend_from_slice(OBJECT_MAGIC);
        object.push(codec as u8);
        object.extend_from_slice(&len.to_le_bytes());
        object.extend_from_slice(&nonce);
        let aad = aad(codec as u8, len, &name);
        let mut sealed = payload.to_vec();
        let tag = self
            .object_key(&name)
            .ok_or(ObjectError::Seal)?
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut sealed,
            )
            .map_err(|_| ObjectError::Seal)?;
        object.extend_from_slice(&sealed);
        object.extend_from_slice(tag.as_ref());
        Ok((name, object))
    }

    /// Opens `object`, which the manifest says is `name` and holds `out.len()` bytes, into
    /// `out`. Nothing is written to `out` unless every check passes but the last (the name);
    /// on any error `out` must not be used.
    pub fn open(
        &self,
        name: &ObjectName,
        object: &[u8],
        out: &mut [u8],
    ) -> Result<(), ObjectError> {
        self.open_checking(name, object, out, true)
    }

    /// [`StoreKeys::open`] without hashing the plaintext back to its name: the restore path.
    /// The tag still authenticates every byte under the key `name` derives, which only the
    /// master key's holder can seal with, so a store cannot alter, cut or swap an object
    /// unseen; the name's hash would only catch a writer that sealed a chunk under another
    /// chunk's name, and costs a BLAKE3 pass over every chunk (about 5 ms of a 6 MiB working
    /// set here, a fifth of a warm restore). `verify` and `pull` check it.
    pub fn open_authenticated(
        &self,
        name: &ObjectName,
        object: &[u8],
        out: &mut [u8],
    ) -> Result<(), ObjectError> {
        self.open_checking(name, object, out, false)
    }

    fn open_checking(
        &self,
        name: &ObjectName,
        object: &[u8],
        out: &mut [u8],
        check_name: bool,
    ) -> Result<(), ObjectError> {
        let truncated = || ObjectError::Truncated {
            name: *name,
            len: object.len(),
        };
        if object.len() < OBJECT_HEADER_LEN + GCM_TAG_LEN {
            return Err(truncated());
        }
        let (header, sealed) = object.split_at(OBJECT_HEADER_LEN);
        if &header[..8] != OBJECT_MAGIC {
            return Err(ObjectError::NotAnObject { name: *name });
        }
        let codec = match header[8] {
            0 => Codec::Raw,
            1 => Codec::Zstd,
            other => {
                return Err(ObjectError::UnknownCodec {
                    name: *name,
                    codec: other,
                });
            }
        };
        let mut len_bytes = [0u8; 4];
        len_bytes.copy_from_slice(&header[9..13]);
        let len = u32::from_le_bytes(len_bytes);
        if len as usize != out.len() {
            return Err(ObjectError::WrongLength {
                name: *name,
                found: len as usize,
                expected: out.len(),
            });
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&header[13..OBJECT_HEADER_LEN]);
        let unauthentic = || ObjectError::Unauthentic { name: *name };
        let mut payload = sealed.to_vec();
        let plain = self
            .object_key(name)
            .ok_or_else(unauthentic)?
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(codec as u8, len, name)),
                &mut payload,
            )
            .map_err(|_| unauthentic())?;
        match codec {
            Codec::Raw if plain.len() == out.len() => out.copy_from_slice(plain),
            Codec::Raw => {
                return Err(ObjectError::WrongLength {
                    name: *name,
                    found: plain.len(),
                    expected: out.len(),
                });
            }
            Codec::Zstd => {
                // Bounded by `out`: a payload cannot make this allocate or write past it. One
                // context per thread: making one per object cost more than some objects'
                // decompression.
                let n = DECOMPRESSOR
                    .with(|cell| {
                        let mut slot = cell.borrow_mut();
                        let d = match slot.as_mut() {
                            Some(d) => d,
                            None => slot.insert(zstd::bulk::Decompressor::new()?),
                        };
                        d.decompress_to_buffer(plain, out)
                    })
                    .map_err(|e| ObjectError::Corrupt {
                        name: *name,
                        reason: e.to_string(),
                    })?;
                if n != out.len() {
                    return Err(ObjectError::WrongLength {
                        name: *name,
                        found: n,
                        expected: out.len(),
                    });
                }
            }
        }
        if check_name && self.name_of(out) != *name {
            return Err(ObjectError::NameMismatch { name: *name });
        }
        Ok(())
    }

    fn object_key(&self, name: &ObjectName) -> Option<LessSafeKey> {
        let key = Zeroizing::new(*blake3::keyed_hash(&self.seal, &name.0).as_bytes());
        UnboundKey::new(&AES_256_GCM, &*key)
            .ok()
            .map(LessSafeKey::new)
    }
}

fn aad(codec: u8, len: u32, name: &ObjectName) -> [u8; 8 + 1 + 4 + 32] {
    let mut aad = [0u8; 45];
    aad[..8].copy_from_slice(OBJECT_MAGIC);
    aad[8] = codec;
    aad[9..13].copy_from_slice(&len.to_le_bytes());
    aad[13..].copy_from_slice(&name.0);
    aad
}

thread_local! {
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(seed: u8) -> StoreKeys {
        StoreKeys::derive(&MasterKey::from_bytes([seed; KEY_LEN]))
    }

    /// A chunk that compresses: a repeating pattern with some noise.
    fn chunk(seed: u8) -> Vec<u8> {
        (0..256 * 1024usize)
            .map(|i| {
                if i % 97 == 0 {
                    seed ^ (i as u8)
                } else {
                    (i % 7) as u8
                }
            })
            .collect()
    }

    fn open(
        k: &StoreKeys,
        name: &ObjectName,
        object: &[u8],
        len: usize,
    ) -> Result<Vec<u8>, ObjectError> {
        let mut out = vec![0u8; len];
        k.open(name, object, &mut out).map(|()| out)
    }

    #[test]
    fn a_chunk_comes_back_from_its_object_under_its_name() {
        let k = keys(1);
        for plain in [
            chunk(1),
            (0..4096u32)
                .flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes())
                .collect(),
        ] {
            let (name, object) = k.seal(&plain, 3).unwrap();
            assert_eq!(name, k.name_of(&plain));
            assert_eq!(open(&k, &name, &object, plain.len()).unwrap(), plain);
        }
    }

    #[test]
    fn the_same_chunk_seals_to_the_same_object_and_another_key_names_it_differently() {
        let (a, b) = (keys(1), keys(2));
        let plain = chunk(7);
        let (name, object) = a.seal(&plain, 3).unwrap();
        assert_eq!(
            a.seal(&plain, 3).unwrap(),
            (name, object.clone()),
            "deterministic"
        );
        // Another zstd level encodes differently, and so gets another nonce under the same key.
        let (name9, object9) = a.seal(&plain, 9).unwrap();
        assert_eq!(name9, name);
        if object9 != object {
            assert_ne!(
                object9[13..OBJECT_HEADER_LEN],
                object[13..OBJECT_HEADER_LEN]
            );
        }
        let (other_name, _) = b.seal(&plain, 3).unwrap();
        assert_ne!(other_name, name, "names are keyed per master key");
        assert_eq!(
            open(&b, &name, &object, plain.len()),
            Err(ObjectError::Unauthentic { name })
        );
    }

    #[test]
    fn an_object_that_was_changed_cut_or_moved_is_refused() {
        let k = keys(3);
        let plain = chunk(3);
        let (name, object) = k.seal(&plain, 3).unwrap();
        let len = plain.len();
        for at in [
            0,
            8,
            9,
            13,
            OBJECT_HEADER_LEN,
            object.len() / 2,
            object.len() - 1,
        ] {
            let mut bad = object.clone();
            bad[at] ^= 0x01;
            assert!(
                open(&k, &name, &bad, len).is_err(),
                "flipped byte {at} accepted"
            );
        }
        for cut in [0, 5, OBJECT_HEADER_LEN + GCM_TAG_LEN - 1, object.len() - 1] {
            assert!(
                open(&k, &name, &object[..cut], len).is_err(),
                "cut to {cut} accepted"
            );
        }
        let (other, other_object) = k.seal(&chunk(4), 3).unwrap();
        assert_eq!(
            open(&k, &name, &other_object, len),
            Err(ObjectError::Unauthentic { name }),
            "an object moved under another name"
        );
        assert_eq!(open(&k, &other, &other_object, len).unwrap(), chunk(4));
        assert!(matches!(
            open(&k, &name, &object, len - 4096),
            Err(ObjectError::WrongLength { .. })
        ));

        // Without the name's hash (the restore path) the tag alone refuses all of it.
        let opened = |object: &[u8], name: &ObjectName| {
            let mut out = vec![0u8; len];
            k.open_authenticated(name, object, &mut out).map(|()| out)
        };
        assert_eq!(opened(&object, &name).unwrap(), plain);
        for at in [0, 9, 13, OBJECT_HEADER_LEN, object.len() - 1] {
            let mut bad = object.clone();
            bad[at] ^= 0x01;
            assert!(opened(&bad, &name).is_err(), "flipped byte {at} accepted");
        }
        assert!(
            opened(&other_object, &name).is_err(),
            "moved object accepted"
        );
    }

    #[test]
    fn names_print_as_hex_and_parse_back_and_bad_ones_are_refused() {
        let name = keys(5).name_of(b"thaw");
        let text = name.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<ObjectName>().unwrap(), name);
        for bad in [
            "",
            "00",
            &text.to_uppercase(),
            &format!("{text}0"),
            &text.replace(&text[..1], "g"),
        ] {
            assert!(bad.parse::<ObjectName>().is_err(), "{bad:?}");
        }
        assert!(format!("{:?}", keys(5)).contains("redacted"));
    }

    #[test]
    fn a_chunk_larger_than_an_object_may_hold_is_refused() {
        let big = vec![1u8; MAX_OBJECT_PLAINTEXT + 1];
        assert!(matches!(
            keys(6).seal(&big, 1),
            Err(ObjectError::TooLarge { .. })
        ));
    }
}

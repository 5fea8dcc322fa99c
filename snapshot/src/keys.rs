//! Envelope keys: the long-lived master key (its file, its id) and the per-snapshot data key it
//! wraps. Secrets live only in zeroize-on-drop buffers and never reach `Debug` output.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

/// Length of a master key and of a data key.
pub const KEY_LEN: usize = 32;
/// Length of an AES-256-GCM tag.
pub const GCM_TAG_LEN: usize = 16;
/// Length of an AES-256-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// A data key wrapped by the master key: its ciphertext and a GCM tag.
pub const WRAPPED_KEY_LEN: usize = KEY_LEN + GCM_TAG_LEN;
/// The key file: this prefix, 64 lowercase hex digits, a newline. Text so operators can move it
/// through secret stores; a prefix so a stray 32-byte file is not taken for a key.
const KEY_FILE_PREFIX: &str = "thaw-master-key-v1 ";
pub const KEY_FILE_LEN: usize = KEY_FILE_PREFIX.len() + 2 * KEY_LEN + 1;

/// Context for BLAKE3's key derivation: the key id is a hash of the key that cannot be turned
/// back into it and that no other use of the key shares.
const KEY_ID_CONTEXT: &str = "thaw snapshot 2026 master key id v1";
/// Associated data of the key wrap, so a wrapped key cannot pass for any other sealed blob.
const WRAP_AAD_LABEL: &[u8] = b"thaw snapshot v1 data key wrap";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the master key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "master key file {path} has mode {mode:04o}: it must not be readable or writable by group or others (chmod 600)"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("master key file {path} is {found} bytes; a Thaw key file is exactly {expected}")]
    Size {
        path: PathBuf,
        found: u64,
        expected: usize,
    },
    #[error("master key file {path} is not a Thaw key file: {reason}")]
    Format { path: PathBuf, reason: &'static str },
    #[error("master key file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("cannot create the master key file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the system random number generator failed")]
    Random,
    #[error("AES-256-GCM refused to wrap the data key")]
    Wrap,
}

/// Identifies a master key without revealing it: the first 16 bytes of a BLAKE3 derived key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct KeyId(pub [u8; 16]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// The 256-bit key that wraps every snapshot's data key. Zeroized on drop.
pub struct MasterKey {
    bytes: Zeroizing<[u8; KEY_LEN]>,
    id: KeyId,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey(<redacted>, id {})", self.id)
    }
}

impl MasterKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self::from_secret(Zeroizing::new(bytes))
    }

    /// Takes ownership of an already-zeroizing buffer, so loading and generating leave no
    /// unzeroized copy behind.
    fn from_secret(bytes: Zeroizing<[u8; KEY_LEN]>) -> Self {
        let derived = Zeroizing::new(blake3::derive_key(KEY_ID_CONTEXT, &*bytes));
        let mut id = [0u8; 16];
        id.copy_from_slice(&derived[..16]);
        MasterKey {
            bytes,
            id: KeyId(id),
        }
    }

    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        random(&mut *bytes)?;
        Ok(Self::from_secret(bytes))
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The key itself, for deriving the keys of other uses from it (`store_object`).
    pub(crate) fn secret(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }

    /// Loads an existing key file, refusing one others could read or one of the wrong shape.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let read_err = |source| KeyError::Read {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(KeyError::NotAFile {
                path: path.to_owned(),
            });
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        if meta.len() != KEY_FILE_LEN as u64 {
            return Err(KeyError::Size {
                path: path.to_owned(),
                found: meta.len(),
                expected: KEY_FILE_LEN,
            });
        }
        let mut text = Zeroizing::new(Vec::with_capacity(KEY_FILE_LEN + 1));
        // One byte more than expected, so a file that grew since `metadata` is still caught.
        (&mut file)
            .take(KEY_FILE_LEN as u64 + 1)
            .read_to_end(&mut text)
            .map_err(read_err)?;
        let bytes = parse_key_file(&text).map_err(|reason| match reason {
            ParseError::Size(found) => KeyError::Size {
                path: path.to_owned(),
                found,
                expected: KEY_FILE_LEN,
            },
            ParseError::Format(reason) => KeyError::Format {
                path: path.to_owned(),
                reason,
            },
        })?;
        Ok(Self::from_secret(bytes))
    }

    /// Loads the key file, or creates it with a fresh random key (mode 0600) if it does not
    /// exist. Creation is atomic: the key is written and synced under a temporary name and then
    /// hard-linked into place, which fails instead of overwriting if another process won the
    /// race (its key is then loaded).
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        match fs::symlink_metadata(path) {
            Ok(_) => return Self::load(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(KeyError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        }
        let key = Self::generate()?;
        let create_err = |source| KeyError::Create {
            path: path.to_owned(),
            source,
        };
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let name = path.file_name().ok_or_else(|| {
            create_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "key path has no file name",
            ))
        })?;
        let mut suffix = [0u8; 8];
        random(&mut suffix)?;
        let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), hex(&suffix)));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            let mut text = Zeroizing::new(String::with_capacity(KEY_FILE_LEN));
            text.push_str(KEY_FILE_PREFIX);
            text.push_str(&hex(&*key.bytes));
            text.push('\n');
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::hard_link(&tmp, path)
        })();
        let _ = fs::remove_file(&tmp);
        match result {
            Ok(()) => {
                File::open(&dir)
                    .and_then(|d| d.sync_all())
                    .map_err(create_err)?;
                Ok(key)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load(path),
            Err(e) => Err(create_err(e)),
        }
    }

    fn aead(&self) -> Option<LessSafeKey> {
        UnboundKey::new(&AES_256_GCM, &*self.bytes)
            .ok()
            .map(LessSafeKey::new)
    }
}

enum ParseError {
    Size(u64),
    Format(&'static str),
}

fn parse_key_file(text: &[u8]) -> Result<Zeroizing<[u8; KEY_LEN]>, ParseError> {
    if text.len() != KEY_FILE_LEN {
        return Err(ParseError::Size(text.len() as u64));
    }
    let rest = text
        .strip_prefix(KEY_FILE_PREFIX.as_bytes())
        .ok_or(ParseError::Format(
            "missing the \"thaw-master-key-v1 \" prefix",
        ))?;
    let digits = rest
        .strip_suffix(b"\n")
        .ok_or(ParseError::Format("does not end with a newline"))?;
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    for (out, pair) in key.iter_mut().zip(digits.chunks_exact(2)) {
        let (Some(hi), Some(lo)) = (
            pair.first().and_then(|c| hex_value(*c)),
            pair.get(1).and_then(|c| hex_value(*c)),
        ) else {
            return Err(ParseError::Format("key is not 64 lowercase hex digits"));
        };
        *out = hi << 4 | lo;
    }
    Ok(key)
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// The `N` bytes that `hex` writes as `s`: exactly `2 * N` lowercase hex digits, else `None`.
pub(crate) fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digits = s.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

pub(crate) fn random(out: &mut [u8]) -> Result<(), KeyError> {
    SystemRandom::new().fill(out).map_err(|_| KeyError::Random)
}

/// A snapshot's own key. It never leaves the process unwrapped.
pub(crate) struct DataKey(Zeroizing<[u8; KEY_LEN]>);

/// A data key sealed by a master key, as stored in the preamble.
pub(crate) struct WrappedKey {
    pub nonce: [u8; NONCE_LEN],
    pub sealed: [u8; WRAPPED_KEY_LEN],
}

/// Why a wrapped key could not be opened. Distinct from a wrong key, which the key id catches
/// before any decryption is tried.
#[derive(Debug)]
pub(crate) struct UnwrapFailed;

impl DataKey {
    pub fn generate() -> Result<Self, KeyError> {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        random(&mut *k)?;
        Ok(DataKey(k))
    }

    pub fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Seals the data key under the master key with a random nonce: the master key seals many
    /// keys over its life, so a counter would need state kept across processes.
    pub fn wrap(&self, master: &MasterKey) -> Result<WrappedKey, KeyError> {
        let aead = master.aead().ok_or(KeyError::Wrap)?;
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut nonce)?;
        let mut buf = Zeroizing::new(self.0.to_vec());
        aead.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(wrap_aad(master.id())),
            &mut *buf,
        )
        .map_err(|_| KeyError::Wrap)?;
        let mut sealed = [0u8; WRAPPED_KEY_LEN];
        if buf.len() != WRAPPED_KEY_LEN {
            return Err(KeyError::Wrap);
        }
        sealed.copy_from_slice(&buf);
        Ok(WrappedKey { nonce, sealed })
    }

    pub fn unwrap_with(master: &MasterKey, wrapped: &WrappedKey) -> Result<Self, UnwrapFailed> {
        let aead = master.aead().ok_or(UnwrapFailed)?;
        let mut buf = Zeroizing::new(wrapped.sealed);
        let plain = aead
            .open_in_place(
                Nonce::assume_unique_for_key(wrapped.nonce),
                Aad::from(wrap_aad(master.id())),
                &mut *buf,
            )
            .map_err(|_| UnwrapFailed)?;
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        if plain.len() != KEY_LEN {
            return Err(UnwrapFailed);
        }
        k.copy_from_slice(plain);
        plain.zeroize();
        Ok(DataKey(k))
    }
}

fn wrap_aad(id: KeyId) -> Vec<u8> {
    let mut aad = WRAP_AAD_LABEL.to_vec();
    aad.extend_from_slice(&id.0);
    aad
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn creates_key_file_with_mode_0600_and_loads_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let created = MasterKey::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::metadata(&path).unwrap().len(), KEY_FILE_LEN as u64);
        let loaded = MasterKey::load(&path).unwrap();
        assert_eq!(loaded.id(), created.id());
        assert_eq!(*loaded.bytes, *created.bytes);
        let again = MasterKey::load_or_create(&path).unwrap();
        assert_eq!(again.id(), created.id());
        // No temporary file left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn refuses_group_or_world_readable_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        MasterKey::load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = MasterKey::load(&path).unwrap_err();
        assert!(
            matches!(err, KeyError::Permissions { mode: 0o644, .. }),
            "{err}"
        );
        let err = MasterKey::load_or_create(&path).unwrap_err();
        assert!(matches!(err, KeyError::Permissions { .. }), "{err}");
    }

    #[test]
    fn refuses_key_file_of_wrong_size_or_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let write = |bytes: &[u8]| {
            fs::write(&path, bytes).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        };
        write(&[7u8; 32]);
        assert!(matches!(
            MasterKey::load(&path),
            Err(KeyError::Size { found: 32, .. })
        ));
        let mut text = format!("{KEY_FILE_PREFIX}{}\n", "ab".repeat(32));
        write(text.as_bytes());
        assert!(MasterKey::load(&path).is_ok());
        text = format!("{KEY_FILE_PREFIX}{}\n", "AB".repeat(32));
        write(text.as_bytes());
        assert!(matches!(
            MasterKey::load(&path),
            Err(KeyError::Format { .. })
        ));
        text = format!("thaw-master-key-v2 {}\n", "ab".repeat(32));
        write(text.as_bytes());
        assert!(matches!(
            MasterKey::load(&path),
            Err(KeyError::Format { .. })
        ));
        text = format!("{KEY_FILE_PREFIX}{} ", "ab".repeat(32));
        write(text.as_bytes());
        assert!(matches!(
            MasterKey::load(&path),
            Err(KeyError::Format { .. })
        ));
    }

    #[test]
    fn debug_redacts_the_key() {
        let key = MasterKey::from_bytes([0x42; 32]);
        let shown = format!("{key:?}");
        assert!(shown.starts_with("MasterKey(<redacted>, id "), "{shown}");
        assert!(!shown.contains("4242"), "{shown}");
        assert!(shown.contains(&key.id().to_string()));
    }

    #[test]
    fn key_ids_differ_between_keys() {
        let a = MasterKey::from_bytes([1; 32]);
        let b = MasterKey::from_bytes([2; 32]);
        assert_ne!(a.id(), b.id());
        assert_eq!(a.id(), MasterKey::from_bytes([1; 32]).id());
    }

    #[test]
    fn wrapped_key_opens_only_with_its_master_and_intact() {
        let master = MasterKey::from_bytes([9; 32]);
        let data = DataKey::generate().unwrap();
        let mut wrapped = data.wrap(&master).unwrap();
        let back = DataKey::unwrap_with(&master, &wrapped).unwrap();
        assert_eq!(back.bytes(), data.bytes());
        assert!(DataKey::unwrap_with(&MasterKey::from_bytes([8; 32]), &wrapped).is_err());
        wrapped.sealed[3] ^= 1;
        assert!(DataKey::unwrap_with(&master, &wrapped).is_err());
    }
}

//! A snapshot as a content-addressed store holds it: one sealed manifest object that carries
//! everything but the memory (layout, vCPU state, host fingerprint) and names the chunk object
//! of every data chunk (`store_object`). docs/store.md has the layout.
//!
//! ```text
//! object = "THAWMF01" (8) ‖ master key id (16) ‖ nonce (12, random)
//!        ‖ AES-256-GCM(manifest key, nonce, AAD = magic ‖ key id ‖ snapshot id,
//!                      bincode(StoreManifest)) ‖ tag (16)
//! manifest key = BLAKE3-derive-key("thaw store 2026 manifest v1", master key)
//! ```
//!
//! The snapshot id is in the AAD, so a manifest moved under another snapshot's name fails to
//! open; the key id is in the clear, so a reader with the wrong master key is told so instead
//! of "tampered". Everything decoded is checked (layout, chunk count, sizes) before a caller
//! sees it.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::fingerprint::Fingerprint;
use crate::format::{
    GCM_TAG_LEN, MAX_STATE_LEN, NONCE_LEN, RegionDesc, SnapshotId, bincode_config, check_layout,
    chunk_count, chunk_layout,
};
use crate::keys::{KeyId, MasterKey, random};
use crate::store_object::ObjectName;
use crate::working_set::{RecordingEnd, WorkingSet};

/// The first bytes of every manifest object, and its format version.
pub const MANIFEST_MAGIC: &[u8; 8] = b"THAWMF01";
/// Magic, key id, nonce.
pub const MANIFEST_HEADER_LEN: usize = 8 + 16 + NONCE_LEN;
/// The largest manifest a reader decodes: the state's limit plus 40 bytes per chunk of a
/// 1 TiB guest in 256 KiB chunks, with room to spare.
pub const MAX_MANIFEST_OBJECT_LEN: usize = 256 << 20;

const MANIFEST_CONTEXT: &str = "thaw store 2026 manifest v1";

/// One chunk of guest memory, in chunk order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreChunk {
    /// Every page is zero; no object.
    Zero,
    /// The chunk object with this name holds it.
    Data(ObjectName),
}

/// Everything a store holds of a snapshot besides its chunk objects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreManifest {
    #[serde(with = "id_bytes")]
    pub snapshot_id: SnapshotId,
    /// When the snapshot was made, nanoseconds since the Unix epoch (UTC).
    pub created_unix_nanos: u64,
    pub chunk_size: u32,
    pub vcpus: u8,
    pub regions: Vec<RegionDesc>,
    pub fingerprint: Fingerprint,
    /// One entry per chunk, in the order `chunk_layout` gives.
    pub chunks: Vec<StoreChunk>,
    /// The VM state section, as the snapshot file holds it decrypted.
    pub state: Vec<u8>,
    /// The recorded working set (`thaw snapshot record-ws`), if the snapshot had one when it
    /// was pushed: a restore from the store fetches these chunks first, in this order.
    pub working_set: Option<StoreWorkingSet>,
}

/// A snapshot's recorded working set as its manifest carries it (the fields of
/// [`crate::WorkingSet`]; `ended_by` as its file code).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreWorkingSet {
    pub chunks: Vec<u32>,
    pub recorded_unix_nanos: u64,
    pub faults: u64,
    pub ended_by: u32,
}

impl StoreWorkingSet {
    pub fn from_working_set(ws: &WorkingSet) -> Self {
        StoreWorkingSet {
            chunks: ws.chunks.clone(),
            recorded_unix_nanos: ws.recorded_unix_nanos,
            faults: ws.faults,
            ended_by: ws.ended_by.code(),
        }
    }

    /// The working set, or `None` for an end code this version does not know.
    pub fn to_working_set(&self) -> Option<WorkingSet> {
        Some(WorkingSet {
            chunks: self.chunks.clone(),
            recorded_unix_nanos: self.recorded_unix_nanos,
            faults: self.faults,
            ended_by: RecordingEnd::from_code(self.ended_by)?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("snapshot manifest object is {len} bytes, too short to be one")]
    Truncated { len: usize },
    #[error(
        "snapshot manifest object is {len} bytes, more than the {MAX_MANIFEST_OBJECT_LEN} a reader accepts"
    )]
    TooLarge { len: usize },
    #[error("this is not a Thaw snapshot manifest object")]
    NotAManifest,
    #[error("snapshot manifest was sealed with master key {found}, not this one ({expected})")]
    WrongKey { found: KeyId, expected: KeyId },
    #[error(
        "snapshot manifest for {snapshot} fails authentication: altered, cut, or moved from another snapshot"
    )]
    Unauthentic { snapshot: SnapshotId },
    #[error("snapshot manifest is for {found}, not {expected}")]
    WrongSnapshot {
        found: SnapshotId,
        expected: SnapshotId,
    },
    #[error("snapshot manifest for {snapshot} is inconsistent: {reason}")]
    Invalid {
        snapshot: SnapshotId,
        reason: String,
    },
    #[error("cannot encode the snapshot manifest")]
    Encode(#[source] bincode::error::EncodeError),
    #[error("cannot draw a nonce")]
    Random,
    #[error("AES-256-GCM refused to seal the snapshot manifest")]
    Seal,
}

impl StoreManifest {
    /// Checks what the manifest's readers rely on: a layout the snapshot format allows, one
    /// entry per chunk of it, a state within the format's limit.
    pub fn check(&self) -> Result<(), ManifestError> {
        let invalid = |reason: String| ManifestError::Invalid {
            snapshot: self.snapshot_id,
            reason,
        };
        check_layout(&self.regions, self.chunk_size).map_err(invalid)?;
        let count = chunk_count(&self.regions, self.chunk_size)
            .ok_or_else(|| invalid("chunk count overflows".into()))?;
        if self.chunks.len() as u64 != count {
            return Err(invalid(format!(
                "{} chunk entries for a layout of {count} chunks",
                self.chunks.len()
            )));
        }
        if self.state.len() as u64 > MAX_STATE_LEN {
            return Err(invalid(format!(
                "VM state of {} bytes (at most {MAX_STATE_LEN})",
                self.state.len()
            )));
        }
        if self.vcpus == 0 {
            return Err(invalid("no vCPUs".into()));
        }
        if let Some(ws) = &self.working_set {
            let set = ws
                .to_working_set()
                .ok_or_else(|| invalid(format!("working set ended by code {}", ws.ended_by)))?;
            set.check(count)
                .map_err(|e| invalid(format!("working set: {e}")))?;
        }
        Ok(())
    }

    /// Each chunk's guest address and length, with its entry, in chunk order.
    pub fn layout(&self) -> impl Iterator<Item = ((u64, u32), StoreChunk)> + '_ {
        chunk_layout(&self.regions, self.chunk_size)
            .unwrap_or_default()
            .into_iter()
            .zip(self.chunks.iter().copied())
    }

    /// The manifest object, sealed under `master`.
    pub fn seal(&self, master: &MasterKey) -> Result<Vec<u8>, ManifestError> {
        self.check()?;
        let mut body =
            bincode::serde::encode_to_vec(self, bincode_config::<MAX_MANIFEST_OBJECT_LEN>())
                .map_err(ManifestError::Encode)?;
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut nonce).map_err(|_| ManifestError::Random)?;
        let key_id = master.id();
        let tag = manifest_key(master)
            .ok_or(ManifestError::Seal)?
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(&key_id, &self.snapshot_id)),
                &mut body,
            )
            .map_err(|_| ManifestError::Seal)?;
        let mut object = Vec::with_capacity(MANIFEST_HEADER_LEN + body.len() + GCM_TAG_LEN);
        object.extend_from_slice(MANIFEST_MAGIC);
        object.extend_from_slice(&key_id.0);
        object.extend_from_slice(&nonce);
        object.extend_from_slice(&body);
        object.extend_from_slice(tag.as_ref());
        Ok(object)
    }

    /// Opens the manifest object that the store holds for snapshot `expected`, checking it.
    pub fn open(
        master: &MasterKey,
        expected: SnapshotId,
        object: &[u8],
    ) -> Result<Self, ManifestError> {
        if object.len() > MAX_MANIFEST_OBJECT_LEN {
            return Err(ManifestError::TooLarge { len: object.len() });
        }
        if object.len() < MANIFEST_HEADER_LEN + GCM_TAG_LEN {
            return Err(ManifestError::Truncated { len: object.len() });
        }
        let (header, sealed) = object.split_at(MANIFEST_HEADER_LEN);
        if &header[..8] != MANIFEST_MAGIC {
            return Err(ManifestError::NotAManifest);
        }
        let mut found = [0u8; 16];
        found.copy_from_slice(&header[8..24]);
        if KeyId(found) != master.id() {
            return Err(ManifestError::WrongKey {
                found: KeyId(found),
                expected: master.id(),
            });
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&header[24..MANIFEST_HEADER_LEN]);
        let unauthentic = || ManifestError::Unauthentic { snapshot: expected };
        let mut body = Zeroizing::new(sealed.to_vec());
        let plain = manifest_key(master)
            .ok_or_else(unauthentic)?
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(&master.id(), &expected)),
                &mut body,
            )
            .map_err(|_| unauthentic())?;
        let invalid = |reason: String| ManifestError::Invalid {
            snapshot: expected,
            reason,
        };
        let (manifest, used): (StoreManifest, usize) =
            bincode::serde::decode_from_slice(plain, bincode_config::<MAX_MANIFEST_OBJECT_LEN>())
                .map_err(|e| invalid(format!("does not decode: {e}")))?;
        if used != plain.len() {
            return Err(invalid(format!(
                "{} bytes left over after the manifest",
                plain.len() - used
            )));
        }
        if manifest.snapshot_id != expected {
            return Err(ManifestError::WrongSnapshot {
                found: manifest.snapshot_id,
                expected,
            });
        }
        manifest.check()?;
        Ok(manifest)
    }
}

/// The snapshot id as its 16 bytes (its own serde form is hex, for JSON).
mod id_bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::format::SnapshotId;

    pub fn serialize<S: Serializer>(id: &SnapshotId, s: S) -> Result<S::Ok, S::Error> {
        id.0.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SnapshotId, D::Error> {
        <[u8; 16]>::deserialize(d).map(SnapshotId)
    }
}

fn manifest_key(master: &MasterKey) -> Option<LessSafeKey> {
    let key = Zeroizing::new(blake3::derive_key(MANIFEST_CONTEXT, master.secret()));
    UnboundKey::new(&AES_256_GCM, &*key)
        .ok()
        .map(LessSafeKey::new)
}

fn aad(key_id: &KeyId, snapshot: &SnapshotId) -> [u8; 8 + 16 + 16] {
    let mut aad = [0u8; 40];
    aad[..8].copy_from_slice(MANIFEST_MAGIC);
    aad[8..24].copy_from_slice(&key_id.0);
    aad[24..].copy_from_slice(&snapshot.0);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::{CpuIdentity, CpuidEntry};
    use crate::keys::KEY_LEN;

    fn master(seed: u8) -> MasterKey {
        MasterKey::from_bytes([seed; KEY_LEN])
    }

    fn manifest() -> StoreManifest {
        let regions = vec![
            RegionDesc {
                guest_addr: 0,
                size: 1 << 20,
            },
            RegionDesc {
                guest_addr: 1 << 32,
                size: 300 << 10,
            },
        ];
        let chunk_size = 256 << 10;
        let count = chunk_count(&regions, chunk_size).unwrap() as usize;
        StoreManifest {
            snapshot_id: SnapshotId([7; 16]),
            created_unix_nanos: 1_796_516_834_000_000_000,
            chunk_size,
            vcpus: 2,
            regions,
            fingerprint: Fingerprint {
                cpu: CpuIdentity {
                    vendor: "AuthenticAMD".into(),
                    family: 25,
                    model: 1,
                    stepping: 1,
                },
                guest_cpuid: vec![CpuidEntry {
                    function: 1,
                    index: 0,
                    flags: 0,
                    eax: 0xa00f11,
                    ebx: 0,
                    ecx: 0,
                    edx: 0,
                }],
                kvm_flavor: "pvm".into(),
                host_page_size: 4096,
            },
            chunks: (0..count)
                .map(|i| {
                    if i % 3 == 0 {
                        StoreChunk::Zero
                    } else {
                        StoreChunk::Data(ObjectName([i as u8; 32]))
                    }
                })
                .collect(),
            state: b"vcpu and device state".to_vec(),
            working_set: None,
        }
    }

    #[test]
    fn a_manifest_comes_back_from_its_object() {
        let m = manifest();
        let key = master(1);
        let object = m.seal(&key).unwrap();
        let back = StoreManifest::open(&key, m.snapshot_id, &object).unwrap();
        assert_eq!(back, m);
        let layout: Vec<_> = back.layout().collect();
        assert_eq!(
            layout.len(),
            6,
            "4 chunks of the first region, 2 of the second"
        );
        assert_eq!(layout[4].0, (1 << 32, 256 << 10));
        assert_eq!(layout[5].0, ((1 << 32) + (256 << 10), 44 << 10));
        // Random nonces: two seals of one manifest differ, and both open.
        let again = m.seal(&key).unwrap();
        assert_ne!(again, object);
        assert_eq!(StoreManifest::open(&key, m.snapshot_id, &again).unwrap(), m);
    }

    #[test]
    fn another_key_another_snapshot_or_a_changed_byte_is_refused() {
        let m = manifest();
        let key = master(1);
        let object = m.seal(&key).unwrap();
        assert!(matches!(
            StoreManifest::open(&master(2), m.snapshot_id, &object),
            Err(ManifestError::WrongKey { .. })
        ));
        assert!(matches!(
            StoreManifest::open(&key, SnapshotId([8; 16]), &object),
            Err(ManifestError::Unauthentic { .. })
        ));
        for at in [
            0,
            8,
            24,
            MANIFEST_HEADER_LEN,
            object.len() / 2,
            object.len() - 1,
        ] {
            let mut bad = object.clone();
            bad[at] ^= 0x80;
            assert!(
                StoreManifest::open(&key, m.snapshot_id, &bad).is_err(),
                "flipped byte {at} accepted"
            );
        }
        for cut in [
            0,
            7,
            MANIFEST_HEADER_LEN + GCM_TAG_LEN - 1,
            object.len() - 1,
        ] {
            assert!(
                StoreManifest::open(&key, m.snapshot_id, &object[..cut]).is_err(),
                "cut to {cut} accepted"
            );
        }
    }

    #[test]
    fn an_inconsistent_manifest_is_neither_sealed_nor_accepted() {
        let key = master(1);
        let mut short = manifest();
        short.chunks.pop();
        assert!(matches!(
            short.seal(&key),
            Err(ManifestError::Invalid { .. })
        ));
        let mut no_vcpus = manifest();
        no_vcpus.vcpus = 0;
        assert!(matches!(
            no_vcpus.seal(&key),
            Err(ManifestError::Invalid { .. })
        ));
        let mut bad_chunk_size = manifest();
        bad_chunk_size.chunk_size = 3000;
        assert!(matches!(
            bad_chunk_size.seal(&key),
            Err(ManifestError::Invalid { .. })
        ));
        // A holder of the key who seals a bad manifest anyway (bypassing `seal`'s check) is
        // still refused when it is opened.
        let m = manifest();
        let mut body =
            bincode::serde::encode_to_vec(&short, bincode_config::<MAX_MANIFEST_OBJECT_LEN>())
                .unwrap();
        let nonce = [3u8; NONCE_LEN];
        let tag = manifest_key(&key)
            .unwrap()
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(&key.id(), &m.snapshot_id)),
                &mut body,
            )
            .unwrap();
        let mut object = MANIFEST_MAGIC.to_vec();
        object.extend_from_slice(&key.id().0);
        object.extend_from_slice(&nonce);
        object.extend_from_slice(&body);
        object.extend_from_slice(tag.as_ref());
        assert!(matches!(
            StoreManifest::open(&key, m.snapshot_id, &object),
            Err(ManifestError::Invalid { .. })
        ));
    }

    #[test]
    fn an_object_that_is_not_a_manifest_is_told_apart() {
        let key = master(1);
        let id = SnapshotId([7; 16]);
        let (_, chunk_object) = crate::store_object::StoreKeys::derive(&key)
            .seal(&[5u8; 4096], 1)
            .unwrap();
        assert!(matches!(
            StoreManifest::open(&key, id, &chunk_object),
            Err(ManifestError::NotAManifest)
        ));
        assert!(matches!(
            StoreManifest::open(&key, id, &vec![0u8; MAX_MANIFEST_OBJECT_LEN + 1]),
            Err(ManifestError::TooLarge { .. })
        ));
    }
}

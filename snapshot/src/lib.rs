//! Thaw's snapshot file format and its crypto: memory in zero-elided, zstd-compressed,
//! AES-256-GCM-sealed chunks, an opaque VM state blob, a manifest, and an authenticated header
//! with the host fingerprint, written atomically and verified before anything is trusted. It
//! knows nothing of KVM: memory arrives as byte slices and state as bytes.
//!
//! A snapshot is a directory holding `snapshot.thaw` and, once one is recorded, its working set
//! `working-set.thaw` (docs/snapshot-format.md has every field):
//!
//! ```text
//! offset 0  ┌──────────────────────────────┐
//!           │ preamble (112 bytes, fixed)  │ magic, version, protection, file length,
//!           │                              │ header length, key id, wrapped data key
//!       112 ├──────────────────────────────┤
//!           │ header (bincode, fixint LE)  │ id, time, chunk size, regions, vCPUs,
//!           │                              │ fingerprint, section offsets
//!           ├──────────────────────────────┤
//!           │ header tag (16 / 32 bytes)   │ GCM tag over preamble ‖ header
//!           ├──────────────────────────────┤
//!           │ chunk 0 payload ‖ tag        │ only Data chunks, in chunk order
//!           │ chunk 3 payload ‖ tag        │
//!           │ …                            │
//!           ├──────────────────────────────┤
//!           │ state ciphertext ‖ tag       │
//!           ├──────────────────────────────┤
//!           │ manifest ciphertext ‖ tag    │ per chunk: Zero | Data{offset, len,
//!  file_len └──────────────────────────────┘   raw, page bitmap, BLAKE3}
//! ```
//!
//! Keys: a random data key per snapshot seals everything; only its wrapping by the master key
//! is stored. In insecure-plaintext mode BLAKE3 digests take the tags' place.

mod chunk;
mod error;
mod fingerprint;
mod format;
pub mod host_files;
pub mod host_key;
mod info;
mod keys;
mod reader;
mod regular_file;
mod residency;
mod seal;
pub mod state_blob;
pub mod store_manifest;
pub mod store_object;
pub mod store_snapshot;
pub mod store_transfer;
pub mod verified;
mod working_set;
mod writer;
pub mod xdg;

pub use chunk::is_zero;
pub use regular_file::{open_regular, provide_opened};

/// The chunk codec alone, for `benches/codec.rs`; not part of the API.
#[doc(hidden)]
pub mod bench_support {
    use crate::chunk::{Encoded, Encoder, HashCheck, decode};
    use crate::format::DataChunk;
    use crate::keys::DataKey;
    use crate::seal::Sealer;

    pub struct ChunkCodec {
        sealer: Sealer,
        encoder: Encoder,
        scratch: Vec<u8>,
    }

    pub struct EncodedChunk(DataChunk, Vec<u8>);

    impl EncodedChunk {
        pub fn stored_len(&self) -> usize {
            self.1.len()
        }
    }

    const ID: [u8; 16] = [0x42; 16];

    impl ChunkCodec {
        /// A codec with a fresh random data key (AES-256-GCM), as a snapshot writer has.
        pub fn new(zstd_level: i32) -> Option<Self> {
            let key = DataKey::generate().ok()?;
            Some(ChunkCodec {
                sealer: Sealer::aead(&key)?,
                encoder: Encoder::new(zstd_level),
                scratch: Vec::new(),
            })
        }

        /// Zero elision, compression and sealing of one chunk; `None` for an all-zero chunk.
        pub fn encode(&mut self, plain: &[u8]) -> Option<EncodedChunk> {
            match self
                .encoder
                .encode(&self.sealer, &ID, 1, 0x10_0000, plain)
                .ok()?
            {
                Encoded::Zero => None,
                Encoded::Data { chunk, sealed, .. } => Some(EncodedChunk(chunk, sealed)),
            }
        }

        /// The read path from the stored bytes (copied first, as `pread` would) to `out`.
        pub fn decode(&mut self, chunk: &EncodedChunk, out: &mut [u8]) -> bool {
            self.scratch.clear();
            self.scratch.extend_from_slice(&chunk.1);
            decode(
                &self.sealer,
                &ID,
                (1, 0x10_0000),
                &chunk.0,
                &mut self.scratch,
                out,
                HashCheck::Yes,
            )
            .is_ok()
        }
    }
}
pub use error::{ReadError, WorkingSetError, WriteError};
pub use fingerprint::{
    CpuIdentity, CpuidEntry, FeatureRegister, Fingerprint, HostFacts, Incompatibility,
    MissingFeature, Reg, decode_signature, host_page_size,
};
pub use format::{
    BadSnapshotId, ChunkInfo, ChunkKind, DEFAULT_CHUNK_SIZE, FORMAT_VERSION, MAGIC, MAX_CHUNK_SIZE,
    MAX_STATE_LEN, MIN_CHUNK_SIZE, PAGE_SIZE, PREAMBLE_LEN, RegionDesc, SNAPSHOT_FILE, SnapshotId,
};
pub use host_key::KeyChoice;
pub use info::Info;
pub use keys::{KEY_FILE_LEN, KEY_LEN, KeyError, KeyId, MasterKey};
pub use reader::{
    AuthenticateSummary, AuthenticatedOnce, FileLayout, MachineSize, Snapshot, VerifySummary,
};
pub use verified::VerifiedRecords;
pub use working_set::{
    RecordingEnd, WORKING_SET_FILE, WORKING_SET_MAGIC, WORKING_SET_PREAMBLE_LEN,
    WORKING_SET_VERSION, WorkingSet,
};
pub use writer::{
    MemoryRegion, Protection, SnapshotMeta, WriteOptions, WriteSummary, check_replaceable, write,
};

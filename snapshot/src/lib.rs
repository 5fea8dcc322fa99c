//! Thaw's snapshot file format and its crypto: memory in zero-elided, zstd-compressed,
//! AES-256-GCM-sealed chunks, an opaque VM state blob, a manifest, and an authenticated header
//! with the host fingerprint, written atomically and verified before anything is trusted. It
//! knows nothing of KVM: memory arrives as byte slices and state as bytes.
//!
//! A snapshot is a directory holding one file, `snapshot.thaw` (docs/snapshot-format.md has
//! every field):
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
mod info;
mod keys;
mod reader;
mod seal;
mod writer;

pub use chunk::is_zero;
pub use error::{ReadError, WriteError};
pub use fingerprint::{
    CpuIdentity, CpuidEntry, FeatureRegister, Fingerprint, HostFacts, Incompatibility,
    MissingFeature, Reg, decode_signature, host_page_size,
};
pub use format::{
    ChunkInfo, ChunkKind, DEFAULT_CHUNK_SIZE, FORMAT_VERSION, MAGIC, MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE, PAGE_SIZE, PREAMBLE_LEN, RegionDesc, SNAPSHOT_FILE, SnapshotId,
};
pub use info::Info;
pub use keys::{KEY_FILE_LEN, KEY_LEN, KeyError, KeyId, MasterKey};
pub use reader::{FileLayout, Snapshot, VerifySummary};
pub use writer::{MemoryRegion, Protection, SnapshotMeta, WriteOptions, WriteSummary, write};

//! The writer's and the reader's errors, one variant per step that can fail, so callers (and
//! the tamper tests) can tell a wrong key from a tampered header from a truncated file.

use std::path::PathBuf;

use crate::format::SnapshotId;
use crate::keys::{KeyError, KeyId};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot snapshot this memory layout: {reason}")]
    Layout { reason: String },
    #[error("invalid write options: {reason}")]
    Options { reason: String },
    #[error("VM state is {len} bytes; the format allows at most {max}")]
    StateTooLarge { len: usize, max: u64 },
    #[error("{path}: a snapshot read from an object store has no file to write beside")]
    NotLocal { path: PathBuf },
    #[error("snapshot target {path} has no parent directory or file name")]
    TargetName { path: PathBuf },
    #[error("{path} already exists; pass replace to overwrite it")]
    TargetExists { path: PathBuf },
    #[error("refusing to replace {path}: {reason}; only a snapshot directory is replaced")]
    NotASnapshot { path: PathBuf, reason: String },
    #[error("key handling failed")]
    Key(#[from] KeyError),
    #[error("AES-256-GCM refused to seal {what}")]
    Seal { what: &'static str },
    #[error("cannot encode the snapshot {what}")]
    Encode {
        what: &'static str,
        #[source]
        source: bincode::error::EncodeError,
    },
    #[error("encoded header changed size from {planned} to {actual} bytes (a writer bug)")]
    HeaderSize { planned: usize, actual: usize },
    #[error("cannot create temporary snapshot directory {path}")]
    CreateTemp {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot fsync {path}")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot move {from} into place as {to}")]
    Publish {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {threads} encoder threads")]
    ThreadPool {
        threads: usize,
        #[source]
        source: rayon::ThreadPoolBuildError,
    },
    #[error("invalid working set")]
    WorkingSet {
        #[source]
        source: WorkingSetError,
    },
    #[error("{dir} does not hold the snapshot this working set is for")]
    NotThisSnapshot { dir: PathBuf },
}

/// What is wrong with a working-set file (or a working set about to be written).
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    #[error("cannot read it")]
    Io(#[source] std::io::Error),
    #[error("it is {found} bytes; a working set of this snapshot is at most {max}")]
    TooLarge { found: u64, max: u64 },
    #[error("it is truncated: expected {expected} bytes, found {found}")]
    Truncated { expected: u64, found: u64 },
    #[error("it has trailing data: expected {expected} bytes, found {found}")]
    TrailingData { expected: u64, found: u64 },
    #[error("not a Thaw working-set file (bad magic)")]
    NotAWorkingSet,
    #[error("working-set format version {found} is not supported (this build reads {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("it is sealed with protection {file}; the snapshot uses {snapshot}")]
    ProtectionMismatch { snapshot: u32, file: u32 },
    #[error("it belongs to snapshot {found}, not {expected}")]
    Foreign {
        expected: SnapshotId,
        found: SnapshotId,
    },
    #[error("it failed authentication (tampered or corrupt)")]
    Tampered,
    #[error("it is malformed: {reason}")]
    Malformed { reason: String },
    #[error("entry {position} names chunk {chunk}; the snapshot has {count}")]
    ChunkOutOfRange {
        position: usize,
        chunk: u32,
        count: u64,
    },
    #[error("entry {position} names chunk {chunk} a second time")]
    Duplicate { position: usize, chunk: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read snapshot {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is an unpublished temporary snapshot directory (left by an interrupted write)")]
    UnpublishedTemp { path: PathBuf },
    #[error("snapshot file is {found} bytes; the format allows at most {max}")]
    TooLarge { found: u64, max: u64 },
    #[error("snapshot file is truncated: expected {expected} bytes, found {found}")]
    Truncated { expected: u64, found: u64 },
    #[error("snapshot file has trailing data: expected {expected} bytes, found {found}")]
    TrailingData { expected: u64, found: u64 },
    #[error("not a Thaw snapshot (bad magic)")]
    NotASnapshot,
    #[error("snapshot format version {found} is not supported (this build reads {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("unknown protection scheme {found} in the preamble")]
    UnknownProtection { found: u32 },
    #[error("header length {len} is out of bounds (at most {max}, and inside the file)")]
    HeaderLength { len: u32, max: u32 },
    #[error("snapshot was sealed with key id {key_id}; a master key is required to open it")]
    KeyRequired { key_id: KeyId },
    #[error(
        "snapshot is INSECURE PLAINTEXT (not encrypted, not authenticated) but a master key was \
         given; open it without a key to accept it"
    )]
    PlaintextWithKey,
    #[error("snapshot was sealed with key id {sealed_with}; the key given has id {given}")]
    WrongKey { sealed_with: KeyId, given: KeyId },
    #[error("the wrapped data key does not open with the master key (tampered or corrupt)")]
    KeyUnwrap,
    #[error("snapshot header failed authentication (tampered or corrupt)")]
    HeaderTampered,
    #[error("authenticated header does not decode")]
    HeaderMalformed {
        #[source]
        source: bincode::error::DecodeError,
    },
    #[error("authenticated header is inconsistent: {reason}")]
    HeaderInvalid { reason: String },
    #[error("VM state failed authentication (tampered or corrupt)")]
    StateTampered,
    #[error("chunk manifest failed authentication (tampered or corrupt)")]
    ManifestTampered,
    #[error("chunk manifest is invalid: {reason}")]
    ManifestInvalid { reason: String },
    #[error("chunk {index} does not exist (the snapshot has {count})")]
    NoSuchChunk { index: usize, count: usize },
    #[error("chunk {index} is {expected} bytes; the output buffer is {found}")]
    OutputLength {
        index: usize,
        expected: usize,
        found: usize,
    },
    #[error("chunk {index} failed authentication (tampered, swapped or from another snapshot)")]
    ChunkTampered { index: usize },
    #[error("chunk {index} is corrupt: {reason}")]
    ChunkCorrupt { index: usize, reason: String },
    #[error("chunk {index}'s object {name} cannot be had from {origin}")]
    ObjectUnavailable {
        index: usize,
        name: crate::store_object::ObjectName,
        origin: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot start {threads} verifier threads")]
    ThreadPool {
        threads: usize,
        #[source]
        source: rayon::ThreadPoolBuildError,
    },
    #[error("working set {path} is refused: {source}")]
    WorkingSet {
        path: PathBuf,
        #[source]
        source: WorkingSetError,
    },
}

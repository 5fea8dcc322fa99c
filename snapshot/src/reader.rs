//! Opening a snapshot: every check (sizes, magic, version, key, header, state, manifest) runs in
//! `open` before anything is returned, and nothing is deserialized before it is authenticated.
//! Chunks are then read on demand with `pread`, from any number of threads.

use std::cell::RefCell;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::chunk::{self, DecodeError};
use crate::error::{ReadError, WriteError};
use crate::format::{
    self, ChunkEntry, ChunkInfo, ChunkKind, FORMAT_VERSION, Header, MAGIC, MAX_FILE_LEN,
    MAX_HEADER_LEN, MAX_MANIFEST_LEN, MAX_STATE_LEN, PAGE_SIZE, PREAMBLE_LEN,
    PROTECTION_AES_256_GCM, PROTECTION_INSECURE_PLAINTEXT, Preamble, SNAPSHOT_FILE,
};
use crate::info::Info;
use crate::keys::{DataKey, MasterKey, WrappedKey};
use crate::seal::{Domain, Sealer, nonce_bytes, section_aad};
use crate::verified::{self, FileIdentity, VerifiedRecords};
use crate::working_set::{self, WorkingSet};
use crate::writer::is_temp_name;

/// An opened, verified snapshot. `Sync`: chunks can be read from many threads at once.
///
/// Its memory is in its file (`Snapshot::open`) or in an object store's chunk objects
/// (`Snapshot::from_store`, `crate::store_snapshot`); either way each chunk is authenticated
/// as it is read, and everything else was authenticated when it was opened.
pub struct Snapshot {
    /// The snapshot file; for a snapshot in a store, where it lies there (for messages).
    path: PathBuf,
    header: Header,
    state: Vec<u8>,
    chunks: Vec<ChunkInfo>,
    working_set: Option<WorkingSet>,
    memory: Memory,
}

/// Where a snapshot's chunks are read from.
pub(crate) enum Memory {
    File(FileMemory),
    Store(Box<dyn RemoteChunks>),
}

/// The chunks of a snapshot that lives elsewhere (an object store: `crate::store_snapshot`),
/// each checked as it is read.
pub(crate) trait RemoteChunks: Send + Sync {
    /// The master key that seals them.
    fn key_id(&self) -> crate::keys::KeyId;
    /// Chunk `index`, authenticated, into `out` (its length); with `hash`, also checked
    /// against the writer's hash of its plaintext (as `Snapshot::read_chunk` does).
    fn read_chunk(
        &self,
        index: usize,
        out: &mut [u8],
        hash: chunk::HashCheck,
    ) -> Result<(), ReadError>;
    /// These chunks will be read soon, in this order.
    fn prefetch(&self, chunks: &[u32]);
    /// Reads and authenticates every data chunk of `chunks`; the bytes read.
    fn authenticate_all(&self, chunks: &[ChunkInfo]) -> Result<u64, ReadError>;
}

/// A snapshot file's chunk area and what reads it.
pub(crate) struct FileMemory {
    file: File,
    file_len: u64,
    preamble: Preamble,
    sealer: Sealer,
    manifest: Vec<ChunkEntry>,
    /// Keys this host's records that it authenticated every chunk of this file (encrypted
    /// snapshots only: see [`crate::verified`]).
    record_key: Option<verified::RecordKey>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("path", &self.path)
            .field("snapshot_id", &format::SnapshotId(self.header.snapshot_id))
            .field("chunks", &self.chunks.len())
            .finish_non_exhaustive()
    }
}

/// Where each part of `snapshot.thaw` lies (byte ranges), for inspection tools and tests.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FileLayout {
    pub file_len: u64,
    pub preamble: Range<u64>,
    pub header: Range<u64>,
    pub header_tag: Range<u64>,
    pub chunks: Range<u64>,
    pub state: Range<u64>,
    pub manifest: Range<u64>,
    /// (chunk index, sealed bytes) of every Data chunk, in file order.
    pub data_chunks: Vec<(usize, Range<u64>)>,
}

/// What `verify` checked.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VerifySummary {
    pub chunks_checked: u64,
    pub data_chunks: u64,
    pub memory_bytes: u64,
    pub stored_bytes: u64,
    pub elapsed: Duration,
}

/// What `authenticate_chunks` checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthenticateSummary {
    /// Sealed bytes read and authenticated.
    pub stored_bytes: u64,
    /// How long it took.
    pub elapsed: Duration,
}

/// The parts of [`VerifiedRecords`] that take a snapshot (here, so that `verified` does not
/// depend on the reader).
impl VerifiedRecords {
    /// Whether this host recorded that it authenticated every chunk of `snap`'s file, and the
    /// file is still as it was then. Anything unreadable or not matching counts as no record.
    pub fn holds(&self, snap: &Snapshot) -> bool {
        let record_key = match &snap.memory {
            Memory::File(file) => file.record_key.as_ref(),
            Memory::Store(_) => None,
        };
        match (record_key, snap.file_identity()) {
            (Some(key), Ok(identity)) => self.holds_for(snap.id(), key, &identity),
            _ => false,
        }
    }

    /// Records that every chunk of `snap` was authenticated while its file had the identity
    /// `checked` (taken before the pass began). Refused if the file is not as it was then, or
    /// changed too recently ([`verified::RECENT`]). The record is written to a temporary file
    /// and renamed into place, so a reader sees the old record, the new one or none.
    pub(crate) fn record(
        &self,
        snap: &Snapshot,
        checked: &FileIdentity,
    ) -> Result<(), verified::RecordError> {
        let key = match &snap.memory {
            Memory::File(file) => file.record_key.as_ref(),
            Memory::Store(_) => None,
        }
        .ok_or(verified::RecordError::Plaintext)?;
        let now = snap
            .file_identity()
            .map_err(|source| verified::RecordError::Io {
                path: snap.path.clone(),
                source,
            })?;
        self.record_for(snap.id(), key, checked, &now)
    }
}

/// What [`Snapshot::authenticate_chunks_once`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthenticatedOnce {
    /// This host had already authenticated every chunk of this unchanged file: nothing read.
    Recorded,
    /// Every chunk was authenticated now.
    Checked(AuthenticateSummary),
}

thread_local! {
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The machine an authenticated header describes, known before the rest of the file is read:
/// all a restore needs to start building its VM while the state and manifest are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MachineSize {
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory, all regions together.
    pub memory_bytes: u64,
}

impl Snapshot {
    /// Opens and verifies the snapshot directory `dir`. An encrypted snapshot needs its master
    /// key; a plaintext one must be opened without a key (a caller holding a key expects the
    /// guarantees only encryption gives).
    pub fn open(dir: &Path, key: Option<&MasterKey>) -> Result<Snapshot, ReadError> {
        Self::open_observing(dir, key, &mut |_| {})
    }

    /// [`Snapshot::open`], telling `on_header` the machine's size as soon as the header is
    /// authenticated (and checked against the file), before the state and the manifest are read.
    /// A restore starts building the VM then. Called at most once; not at all when the file is
    /// refused before that point. What follows may still refuse the file: whatever the caller
    /// started must then be dropped.
    pub fn open_observing(
        dir: &Path,
        key: Option<&MasterKey>,
        on_header: &mut dyn FnMut(MachineSize),
    ) -> Result<Snapshot, ReadError> {
        if dir.file_name().is_some_and(is_temp_name) {
            return Err(ReadError::UnpublishedTemp {
                path: dir.to_owned(),
            });
        }
        let path = dir.join(SNAPSHOT_FILE);
        let io = |source| ReadError::Io {
            path: path.clone(),
            source,
        };
        let file = crate::open_regular(&path).map_err(io)?;
        let found = file.metadata().map_err(io)?.len();
        if found > MAX_FILE_LEN {
            return Err(ReadError::TooLarge {
                found,
                max: MAX_FILE_LEN,
            });
        }

        // 1. Preamble: magic, version, then the length it promises.
        let mut pre = [0u8; PREAMBLE_LEN];
        let avail = usize::try_from(found).map_or(PREAMBLE_LEN, |f| f.min(PREAMBLE_LEN));
        let got = pre.get_mut(..avail).unwrap_or_default();
        file.read_exact_at(got, 0).map_err(io)?;
        let magic_len = avail.min(MAGIC.len());
        if pre.get(..magic_len) != MAGIC.get(..magic_len) {
            return Err(ReadError::NotASnapshot);
        }
        if avail >= 12 {
            let version = format::le_u32(&pre, 8);
            if version != FORMAT_VERSION {
                return Err(ReadError::UnsupportedVersion {
                    found: version,
                    supported: FORMAT_VERSION,
                });
            }
        }
        if avail < PREAMBLE_LEN {
            let promised = if avail >= 24 {
                format::le_u64(&pre, 16)
            } else {
                0
            };
            let expected = promised.max(PREAMBLE_LEN as u64);
            return Err(ReadError::Truncated { expected, found });
        }
        let preamble = Preamble::from_bytes(&pre);
        if found < preamble.file_len {
            return Err(ReadError::Truncated {
                expected: preamble.file_len,
                found,
            });
        }
        if found > preamble.file_len {
            return Err(ReadError::TrailingData {
                expected: preamble.file_len,
                found,
            });
        }

        // 2. Key: the id is compared first so a wrong key is named as such, not as tampering.
        let mut record_key = None;
        let sealer = match (preamble.protection, key) {
            (PROTECTION_AES_256_GCM, None) => {
                return Err(ReadError::KeyRequired {
                    key_id: preamble.key_id,
                });
            }
            (PROTECTION_AES_256_GCM, Some(master)) => {
                if master.id() != preamble.key_id {
                    return Err(ReadError::WrongKey {
                        sealed_with: preamble.key_id,
                        given: master.id(),
                    });
                }
                let wrapped = WrappedKey {
                    nonce: preamble.wrap_nonce,
                    sealed: preamble.wrapped_key,
                };
                let data_key =
                    DataKey::unwrap_with(master, &wrapped).map_err(|_| ReadError::KeyUnwrap)?;
                record_key = Some(verified::record_key(&data_key));
                Sealer::aead(&data_key).ok_or(ReadError::KeyUnwrap)?
            }
            (PROTECTION_INSECURE_PLAINTEXT, None) => Sealer::Plaintext,
            (PROTECTION_INSECURE_PLAINTEXT, Some(_)) => return Err(ReadError::PlaintextWithKey),
            (other, _) => return Err(ReadError::UnknownProtection { found: other }),
        };
        let tag_len = sealer.tag_len() as u64;

        // 3. Header: authenticated over the preamble and the header bytes, then decoded.
        let header_len = preamble.header_len;
        let front_len = (PREAMBLE_LEN as u64) + u64::from(header_len);
        if header_len > MAX_HEADER_LEN || front_len + tag_len > preamble.file_len {
            return Err(ReadError::HeaderLength {
                len: header_len,
                max: MAX_HEADER_LEN,
            });
        }
        let mut front = vec![0u8; (front_len + tag_len) as usize];
        file.read_exact_at(&mut front, 0).map_err(io)?;
        let (aad, tag) = front.split_at_mut(front_len as usize);
        sealer
            .open(nonce_bytes(Domain::Header, 0), aad, tag)
            .map_err(|_| ReadError::HeaderTampered)?;
        let header_bytes = aad.get(PREAMBLE_LEN..).unwrap_or_default();
        let (header, used): (Header, usize) = bincode::serde::decode_from_slice(
            header_bytes,
            format::bincode_config::<{ MAX_HEADER_LEN as usize }>(),
        )
        .map_err(|source| ReadError::HeaderMalformed { source })?;
        if used != header_bytes.len() {
            return Err(invalid_header("bytes left after the header"));
        }
        check_header(&header, &preamble, front_len + tag_len, tag_len)?;
        on_header(MachineSize {
            vcpus: header.vcpus,
            memory_bytes: header
                .regions
                .iter()
                .fold(0u64, |sum, r| sum.saturating_add(r.size)),
        });

        // 4. State and manifest, each authenticated before use.
        let mut state = read_section(&file, header.state).map_err(io)?;
        let state_len = sealer
            .open(
                nonce_bytes(Domain::State, 0),
                &section_aad(Domain::State, &header.snapshot_id),
                &mut state,
            )
            .map_err(|_| ReadError::StateTampered)?
            .len();
        state.truncate(state_len);

        let mut manifest_bytes = read_section(&file, header.manifest).map_err(io)?;
        let manifest_plain = sealer
            .open(
                nonce_bytes(Domain::Manifest, 0),
                &section_aad(Domain::Manifest, &header.snapshot_id),
                &mut manifest_bytes,
            )
            .map_err(|_| ReadError::ManifestTampered)?;
        let manifest = decode_manifest(manifest_plain, header.chunk_count)?;
        let chunks = check_manifest(&header, &manifest, tag_len)?;

        // 5. The working set, if one was recorded: verified like the sections above.
        let working_set = working_set::load(
            dir,
            &working_set::Context {
                snapshot_id: &header.snapshot_id,
                protection: preamble.protection,
                sealer: &sealer,
                chunk_count: chunks.len() as u64,
            },
        )?;

        let encrypted = sealer.is_encrypted();
        let snapshot = Snapshot {
            path,
            header,
            state,
            chunks,
            working_set,
            memory: Memory::File(FileMemory {
                file,
                file_len: found,
                preamble,
                sealer,
                manifest,
                record_key,
            }),
        };
        if !encrypted {
            tracing::warn!(path = %dir.display(), "opened an INSECURE PLAINTEXT snapshot: not encrypted, not authenticated");
        }
        Ok(snapshot)
    }

    /// A snapshot from its checked parts (`crate::store_snapshot`).
    pub(crate) fn from_parts(
        path: PathBuf,
        header: Header,
        state: Vec<u8>,
        chunks: Vec<ChunkInfo>,
        working_set: Option<WorkingSet>,
        memory: Memory,
    ) -> Snapshot {
        Snapshot {
            path,
            header,
            state,
            chunks,
            working_set,
            memory,
        }
    }

    /// Whether its chunks come from an object store rather than a file on this host.
    pub fn in_store(&self) -> bool {
        matches!(self.memory, Memory::Store(_))
    }

    /// Tells the snapshot that these chunks will be read soon, in this order: a snapshot in a
    /// store starts fetching their objects, many at once; a file ignores it.
    pub fn prefetch_chunks(&self, chunks: &[u32]) {
        if let Memory::Store(store) = &self.memory {
            store.prefetch(chunks);
        }
    }

    /// The snapshot file, or where a snapshot read from a store lies there.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The VM state blob the writer was given.
    pub fn state(&self) -> &[u8] {
        &self.state
    }

    pub fn chunks(&self) -> &[ChunkInfo] {
        &self.chunks
    }

    pub fn id(&self) -> format::SnapshotId {
        format::SnapshotId(self.header.snapshot_id)
    }

    /// The host and guest CPU facts to check with `Fingerprint::check_compatible` before restoring.
    pub fn fingerprint(&self) -> &crate::fingerprint::Fingerprint {
        &self.header.fingerprint
    }

    pub fn regions(&self) -> &[format::RegionDesc] {
        &self.header.regions
    }

    pub fn vcpus(&self) -> u8 {
        self.header.vcpus
    }

    pub fn chunk_size(&self) -> u32 {
        self.header.chunk_size
    }

    /// Where each part of the snapshot file lies; `None` for a snapshot read from a store.
    pub fn layout(&self) -> Option<FileLayout> {
        let Memory::File(file) = &self.memory else {
            return None;
        };
        let header_end = PREAMBLE_LEN as u64 + u64::from(file.preamble.header_len);
        let range = |s: format::SectionRef| s.offset..s.offset + s.len;
        Some(FileLayout {
            file_len: file.file_len,
            preamble: 0..PREAMBLE_LEN as u64,
            header: PREAMBLE_LEN as u64..header_end,
            header_tag: header_end..self.header.chunks.offset,
            chunks: range(self.header.chunks),
            state: range(self.header.state),
            manifest: range(self.header.manifest),
            data_chunks: file
                .manifest
                .iter()
                .enumerate()
                .filter_map(|(i, e)| match e {
                    ChunkEntry::Data(d) => Some((i, d.offset..d.offset + u64::from(d.stored_len))),
                    ChunkEntry::Zero => None,
                })
                .collect(),
        })
    }

    /// What `thaw snapshot inspect` shows.
    pub fn info(&self) -> Info {
        let working_set = self.working_set.as_ref().map(|ws| {
            let bytes = ws
                .chunks
                .iter()
                .filter_map(|&c| self.chunks.get(c as usize))
                .map(|c| u64::from(c.len))
                .sum();
            (ws.chunks.len() as u64, bytes)
        });
        match &self.memory {
            Memory::File(file) => {
                let max_pages = self.header.chunk_size as usize / PAGE_SIZE;
                Info::new(
                    file.preamble.version,
                    &self.header,
                    file.manifest.iter().map(|entry| match entry {
                        ChunkEntry::Zero => None,
                        ChunkEntry::Data(d) => Some((
                            chunk::count_present(&d.page_bitmap, max_pages) as u64,
                            u64::from(d.stored_len),
                        )),
                    }),
                    file.file_len,
                    file.sealer.is_encrypted().then_some(file.preamble.key_id),
                    working_set,
                )
            }
            // A store's manifest does not say which pages of a data chunk are zero, nor how
            // large its object is: every page of a data chunk counts as present.
            Memory::Store(store) => Info::new(
                FORMAT_VERSION,
                &self.header,
                self.chunks.iter().map(|c| match c.kind {
                    ChunkKind::Zero => None,
                    ChunkKind::Data => Some(((c.len as usize).div_ceil(PAGE_SIZE) as u64, 0)),
                }),
                0,
                Some(store.key_id()),
                working_set,
            ),
        }
    }

    /// The working set recorded for this snapshot, as loaded and verified by `open`.
    pub fn working_set(&self) -> Option<&WorkingSet> {
        self.working_set.as_ref()
    }

    /// Seals `ws` for this snapshot and writes it into `dir` (the directory this snapshot was
    /// opened from; anything else is refused), atomically replacing any previous working set.
    /// This `Snapshot` keeps the working set it was opened with; open again to use the new one.
    pub fn write_working_set(&self, dir: &Path, ws: &WorkingSet) -> Result<(), WriteError> {
        let (file, context) = self.working_set_target(dir)?;
        working_set::write(dir, &file.file, ws, &context, true)
    }

    /// Seals `ws` without checking its indices, so tests can make an authentic but invalid set.
    #[cfg(test)]
    pub(crate) fn write_working_set_unchecked(
        &self,
        dir: &Path,
        ws: &WorkingSet,
    ) -> Result<(), WriteError> {
        let (file, context) = self.working_set_target(dir)?;
        working_set::write(dir, &file.file, ws, &context, false)
    }

    /// Removes the working set of the snapshot in `dir`, atomically; whether there was one.
    pub fn remove_working_set(dir: &Path) -> Result<bool, WriteError> {
        working_set::remove(dir)
    }

    /// The file a working set is written beside, and how it is sealed: only a snapshot file
    /// has one.
    fn working_set_target(
        &self,
        dir: &Path,
    ) -> Result<(&FileMemory, working_set::Context<'_>), WriteError> {
        let Memory::File(file) = &self.memory else {
            return Err(WriteError::NotLocal {
                path: dir.to_owned(),
            });
        };
        Ok((
            file,
            working_set::Context {
                snapshot_id: &self.header.snapshot_id,
                protection: file.preamble.protection,
                sealer: &file.sealer,
                chunk_count: self.chunks.len() as u64,
            },
        ))
    }

    /// Decrypts, authenticates, decompresses and checks chunk `index` into `out`, whose length
    /// must be the chunk's. The check is the BLAKE3 hash the writer took of the chunk before
    /// compressing it: on top of authentication, it proves the writer and decompressor
    /// round-tripped the bytes (what `verify` is for).
    pub fn read_chunk(&self, index: usize, out: &mut [u8]) -> Result<(), ReadError> {
        self.decode_chunk(index, out, chunk::HashCheck::Yes)
    }

    /// As [`Snapshot::read_chunk`], without the writer's plaintext hash: the restore path.
    /// Every stored byte is still authenticated (AEAD tag, or the plaintext mode's BLAKE3 tag)
    /// before it reaches the bounded decompressor; the plaintext hash would only catch a
    /// writer or decompressor bug, and costs about 30 % of decoding (zstd 45 %, AES-GCM 7 %,
    /// measured with perf on a 256 MiB snapshot). `thaw snapshot verify` checks it.
    pub fn read_chunk_authenticated(&self, index: usize, out: &mut [u8]) -> Result<(), ReadError> {
        self.decode_chunk(index, out, chunk::HashCheck::No)
    }

    fn decode_chunk(
        &self,
        index: usize,
        out: &mut [u8],
        hash: chunk::HashCheck,
    ) -> Result<(), ReadError> {
        let count = self.chunks.len();
        let Some(info) = self.chunks.get(index) else {
            return Err(ReadError::NoSuchChunk { index, count });
        };
        if out.len() != info.len as usize {
            return Err(ReadError::OutputLength {
                index,
                expected: info.len as usize,
                found: out.len(),
            });
        }
        let file = match &self.memory {
            Memory::File(file) => file,
            // An object's name is a keyed hash of its plaintext: checking it is the writer's
            // hash check.
            Memory::Store(store) => return store.read_chunk(index, out, hash),
        };
        let Some(entry) = file.manifest.get(index) else {
            return Err(ReadError::NoSuchChunk { index, count });
        };
        let data = match entry {
            ChunkEntry::Zero => {
                out.fill(0);
                return Ok(());
            }
            ChunkEntry::Data(data) => data,
        };
        READ_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            self.read_sealed(file, data, &mut buf)?;
            chunk::decode(
                &file.sealer,
                &self.header.snapshot_id,
                (index as u64, info.guest_addr),
                data,
                &mut buf,
                out,
                hash,
            )
            .map_err(|e| match e {
                DecodeError::Tampered => ReadError::ChunkTampered { index },
                DecodeError::Corrupt(reason) => ReadError::ChunkCorrupt { index, reason },
            })
        })
    }

    /// Allocates what reading and decoding this snapshot's chunks takes on the calling thread
    /// (its read buffer, zstd context and packing buffer), which would otherwise be allocated by
    /// its first chunk. A page server's threads call it before the guest runs: in the process
    /// of a running VM, an allocation that maps memory waits for the address space's lock
    /// behind the guest's page faults and holds up the faults that come after it.
    pub fn prepare_decoding_thread(&self) {
        let Memory::File(file) = &self.memory else {
            chunk::prepare_decoding(self.header.chunk_size as usize);
            return;
        };
        let largest = file
            .manifest
            .iter()
            .map(|entry| match entry {
                ChunkEntry::Data(data) => data.stored_len as usize,
                ChunkEntry::Zero => 0,
            })
            .max()
            .unwrap_or(0);
        READ_BUF.with(|cell| cell.borrow_mut().reserve(largest));
        chunk::prepare_decoding(self.header.chunk_size as usize);
    }

    /// Reads a data chunk's sealed bytes into `buf`.
    fn read_sealed(
        &self,
        file: &FileMemory,
        data: &crate::format::DataChunk,
        buf: &mut Vec<u8>,
    ) -> Result<(), ReadError> {
        buf.clear();
        buf.resize(data.stored_len as usize, 0);
        file.file
            .read_exact_at(buf, data.offset)
            .map_err(|source| ReadError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Authenticates every data chunk as stored — reads it and checks its AEAD tag (or, for a
    /// plaintext snapshot, its BLAKE3 tag) — without decompressing, on all cores. A lazy
    /// restore runs this before the guest does, so a tampered chunk is refused up front; the
    /// page server still checks each chunk again as it installs it.
    ///
    /// For a snapshot in a store this fetches and opens every chunk object.
    pub fn authenticate_chunks(&self) -> Result<AuthenticateSummary, ReadError> {
        use rayon::prelude::*;
        let started = Instant::now();
        let file = match &self.memory {
            Memory::File(file) => file,
            Memory::Store(store) => {
                return store.authenticate_all(&self.chunks).map(|stored_bytes| {
                    AuthenticateSummary {
                        stored_bytes,
                        elapsed: started.elapsed(),
                    }
                });
            }
        };
        let stored: u64 = file
            .manifest
            .par_iter()
            .enumerate()
            .try_fold(
                || (Vec::new(), 0u64),
                |(mut buf, total), (index, entry)| {
                    let ChunkEntry::Data(data) = entry else {
                        return Ok((buf, total));
                    };
                    let guest_addr = self.chunks.get(index).map(|c| c.guest_addr).ok_or(
                        ReadError::NoSuchChunk {
                            index,
                            count: self.chunks.len(),
                        },
                    )?;
                    self.read_sealed(file, data, &mut buf)?;
                    chunk::authenticate(
                        &file.sealer,
                        &self.header.snapshot_id,
                        index as u64,
                        guest_addr,
                        &mut buf,
                    )
                    .map_err(|_| ReadError::ChunkTampered { index })?;
                    Ok((buf, total + u64::from(data.stored_len)))
                },
            )
            .map(|r: Result<(Vec<u8>, u64), ReadError>| r.map(|(_, total)| total))
            .try_reduce(|| 0, |a, b| Ok(a + b))?;
        Ok(AuthenticateSummary {
            stored_bytes: stored,
            elapsed: started.elapsed(),
        })
    }

    /// [`Snapshot::authenticate_chunks`], once per host and file: skipped if `records` hold
    /// that this host already authenticated every chunk of this very file, unchanged since
    /// (see [`crate::verified`]); otherwise run, and recorded when it passes. Failing to write
    /// the record is logged, not an error: the next restore then checks every chunk again.
    pub fn authenticate_chunks_once(
        &self,
        records: &VerifiedRecords,
    ) -> Result<AuthenticatedOnce, ReadError> {
        if records.holds(self) {
            return Ok(AuthenticatedOnce::Recorded);
        }
        let before = self.file_identity().map_err(|source| ReadError::Io {
            path: self.path.clone(),
            source,
        })?;
        let summary = self.authenticate_chunks()?;
        match records.record(self, &before) {
            Ok(()) => {}
            Err(e @ (verified::RecordError::Plaintext | verified::RecordError::TooRecent)) => {
                tracing::debug!(snapshot = %self.path.display(), "not recorded as verified: {e}");
            }
            Err(e) => tracing::warn!(
                snapshot = %self.path.display(),
                records = %records.dir().display(),
                error = ?e,
                "could not record the snapshot as verified: the next restore checks every chunk \
                 again"
            ),
        }
        Ok(AuthenticatedOnce::Checked(summary))
    }

    /// The identity of the snapshot file as opened (see [`crate::verified::FileIdentity`]).
    fn file_identity(&self) -> std::io::Result<FileIdentity> {
        match &self.memory {
            Memory::File(file) => FileIdentity::of(&file.file),
            Memory::Store(_) => Err(std::io::Error::other("a snapshot in a store has no file")),
        }
    }

    /// Reads and checks every chunk on `threads` threads (0: one per CPU), keeping one chunk
    /// buffer per thread. Returns the first error found.
    pub fn verify(&self, threads: usize) -> Result<VerifySummary, ReadError> {
        use rayon::prelude::*;
        let started = Instant::now();
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|source| ReadError::ThreadPool { threads, source })?;
        let chunk_size = self.header.chunk_size as usize;
        pool.install(|| {
            (0..self.chunks.len()).into_par_iter().try_for_each_init(
                || vec![0u8; chunk_size],
                |buf, index| {
                    let len = self.chunks.get(index).map_or(0, |c| c.len as usize);
                    let out = buf
                        .get_mut(..len)
                        .ok_or(ReadError::NoSuchChunk { index, count: 0 })?;
                    self.read_chunk(index, out)
                },
            )
        })?;
        let data: Vec<u64> = match &self.memory {
            Memory::File(file) => file
                .manifest
                .iter()
                .filter_map(|e| match e {
                    ChunkEntry::Data(d) => Some(u64::from(d.stored_len)),
                    ChunkEntry::Zero => None,
                })
                .collect(),
            Memory::Store(_) => self
                .chunks
                .iter()
                .filter(|c| c.kind == ChunkKind::Data)
                .map(|_| 0)
                .collect(),
        };
        Ok(VerifySummary {
            chunks_checked: self.chunks.len() as u64,
            data_chunks: data.len() as u64,
            memory_bytes: self.chunks.iter().map(|c| u64::from(c.len)).sum(),
            stored_bytes: data.iter().sum(),
            elapsed: started.elapsed(),
        })
    }
}

fn read_section(file: &File, section: format::SectionRef) -> Result<Vec<u8>, std::io::Error> {
    // Lengths were checked against the caps and the file length by `check_header`.
    let mut buf = vec![0u8; section.len as usize];
    file.read_exact_at(&mut buf, section.offset)?;
    Ok(buf)
}

fn invalid_header(reason: &str) -> ReadError {
    ReadError::HeaderInvalid {
        reason: reason.to_owned(),
    }
}

fn invalid_manifest(reason: String) -> ReadError {
    ReadError::ManifestInvalid { reason }
}

/// The most one manifest entry's decoding may claim: its page bitmap, which is at most
/// `MAX_CHUNK_SIZE / PAGE_SIZE / 8` = 64 bytes in a valid file.
const MAX_ENTRY_CLAIM: usize = 4096;

/// Decodes the manifest (a u64 entry count, then the entries) one entry at a time, after
/// comparing the count with the header's, so that no length inside it makes the decoder
/// allocate more than the header's chunks and [`MAX_ENTRY_CLAIM`] bytes per bitmap. Decoded
/// whole under the manifest's cap, an entry count or a bitmap length could claim up to 512 MiB
/// from a manifest of a few bytes (found by `tests/fuzz_reader.rs`).
fn decode_manifest(plain: &[u8], chunk_count: u64) -> Result<Vec<ChunkEntry>, ReadError> {
    if plain.len() < 8 {
        return Err(invalid_manifest("does not decode: no entry count".into()));
    }
    let count = format::le_u64(plain, 0);
    if count != chunk_count {
        return Err(invalid_manifest(format!(
            "{count} entries for {chunk_count} chunks"
        )));
    }
    // `check_header` bounded the chunk count by the manifest section's length.
    let mut entries = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let mut rest = plain.get(8..).unwrap_or_default();
    for _ in 0..count {
        let (entry, used): (ChunkEntry, usize) =
            bincode::decode_from_slice(rest, format::bincode_config::<MAX_ENTRY_CLAIM>())
                .map_err(|e| invalid_manifest(format!("does not decode: {e}")))?;
        rest = rest.get(used..).unwrap_or_default();
        entries.push(entry);
    }
    if !rest.is_empty() {
        return Err(invalid_manifest("bytes left after the manifest".into()));
    }
    Ok(entries)
}

/// An authenticated header can still be wrong (a writer bug); check every number the reader
/// will use as a size or offset.
fn check_header(
    h: &Header,
    p: &Preamble,
    chunks_start: u64,
    tag_len: u64,
) -> Result<(), ReadError> {
    if h.page_size as usize != PAGE_SIZE {
        return Err(invalid_header("zero-elision page size is not 4096"));
    }
    format::check_layout(&h.regions, h.chunk_size)
        .map_err(|reason| ReadError::HeaderInvalid { reason })?;
    if format::chunk_count(&h.regions, h.chunk_size) != Some(h.chunk_count) {
        return Err(invalid_header(
            "chunk count does not match the memory regions",
        ));
    }
    let in_order = h.chunks.offset == chunks_start
        && h.chunks.end() == Some(h.state.offset)
        && h.state.end() == Some(h.manifest.offset)
        && h.manifest.end() == Some(p.file_len);
    if !in_order {
        return Err(invalid_header("sections do not tile the file"));
    }
    if !(tag_len..=MAX_STATE_LEN + tag_len).contains(&h.state.len) {
        return Err(invalid_header("state section length out of bounds"));
    }
    if !(tag_len..=MAX_MANIFEST_LEN).contains(&h.manifest.len) {
        return Err(invalid_header("manifest section length out of bounds"));
    }
    // Each entry takes at least its 4-byte kind, after the list's 8-byte length: more chunks
    // than that cannot be described, and their layout is never built (1 TiB in 4 KiB chunks
    // is 4 GiB of it).
    let most = h.manifest.len.saturating_sub(tag_len + 8) / 4;
    if h.chunk_count > most {
        return Err(invalid_header(
            "more chunks than the manifest section can describe",
        ));
    }
    Ok(())
}

/// The manifest must describe exactly the header's chunks, each stored inside the chunk area,
/// in order, without overlaps, with a bitmap and length consistent with its pages.
fn check_manifest(
    h: &Header,
    manifest: &[ChunkEntry],
    tag_len: u64,
) -> Result<Vec<ChunkInfo>, ReadError> {
    if manifest.len() as u64 != h.chunk_count {
        return Err(invalid_manifest(format!(
            "{} entries for {} chunks",
            manifest.len(),
            h.chunk_count
        )));
    }
    let layout = format::chunk_layout(&h.regions, h.chunk_size)
        .ok_or_else(|| invalid_manifest("chunk layout overflows".into()))?;
    if layout.len() != manifest.len() {
        return Err(invalid_manifest(format!(
            "{} entries for {} chunks",
            manifest.len(),
            layout.len()
        )));
    }
    let area_end = h.chunks.end().unwrap_or(0);
    let mut next_free = h.chunks.offset;
    let mut infos = Vec::with_capacity(layout.len());
    for (index, ((guest_addr, len), entry)) in layout.iter().zip(manifest).enumerate() {
        let bad = |what: &str| invalid_manifest(format!("chunk {index}: {what}"));
        let kind = match entry {
            ChunkEntry::Zero => ChunkKind::Zero,
            ChunkEntry::Data(d) => {
                let pages = (*len as usize).div_ceil(PAGE_SIZE);
                if d.page_bitmap.len() != pages.div_ceil(8) {
                    return Err(bad("bitmap length does not match its pages"));
                }
                let present = chunk::count_present(&d.page_bitmap, pages);
                let all_bits: usize = d.page_bitmap.iter().map(|b| b.count_ones() as usize).sum();
                if present == 0 || all_bits != present {
                    return Err(bad("bitmap marks no pages, or pages past the chunk's end"));
                }
                let packed = (present * PAGE_SIZE) as u64;
                let stored = u64::from(d.stored_len);
                let payload = stored
                    .checked_sub(tag_len)
                    .ok_or_else(|| bad("shorter than its tag"))?;
                if (d.raw && payload != packed) || (!d.raw && (payload == 0 || payload >= packed)) {
                    return Err(bad("stored length does not fit its pages"));
                }
                let end = d
                    .offset
                    .checked_add(stored)
                    .ok_or_else(|| bad("offset overflows"))?;
                if d.offset < next_free || end > area_end {
                    return Err(bad("overlaps another chunk or lies outside the chunk area"));
                }
                next_free = end;
                ChunkKind::Data
            }
        };
        infos.push(ChunkInfo {
            guest_addr: *guest_addr,
            len: *len,
            kind,
        });
    }
    Ok(infos)
}

#[cfg(test)]
#[path = "reader_tests.rs"]
mod tests;

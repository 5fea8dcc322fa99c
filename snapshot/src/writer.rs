//! Writing a snapshot: chunks are encoded in parallel batches on a rayon pool while the previous
//! batch is written in order, then state, manifest and finally the preamble and header go in,
//! everything inside a temporary directory that is fsynced and renamed into place. A crash at
//! any point leaves the old target (or none), never a partial snapshot under the target name.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::chunk::{Encoded, Encoder};
use crate::error::WriteError;
use crate::fingerprint::Fingerprint;
use crate::format::{
    self, ChunkEntry, DEFAULT_CHUNK_SIZE, FORMAT_VERSION, Header, MAGIC, MAX_HEADER_LEN,
    MAX_MANIFEST_LEN, MAX_STATE_LEN, NONCE_LEN, PAGE_SIZE, PREAMBLE_LEN, PROTECTION_AES_256_GCM,
    PROTECTION_INSECURE_PLAINTEXT, Preamble, RegionDesc, SNAPSHOT_FILE, SectionRef, SnapshotId,
    WRAPPED_KEY_LEN,
};
use crate::keys::{DataKey, KeyId, MasterKey, hex, random};
use crate::residency::Residency;
use crate::seal::{Domain, Sealer, nonce_bytes, section_aad};

/// Guest memory to capture: a guest-physical address and the bytes mapped there.
#[derive(Clone, Copy, Debug)]
pub struct MemoryRegion<'a> {
    pub guest_addr: u64,
    pub bytes: &'a [u8],
}

/// How the snapshot is protected.
#[derive(Debug)]
pub enum Protection<'k> {
    /// AES-256-GCM under a fresh data key wrapped by this master key.
    Encrypted(&'k MasterKey),
    /// No encryption and no authentication, only BLAKE3 digests against accidents. For
    /// benchmarking; readers and `Info` say so loudly.
    InsecurePlaintext,
}

#[derive(Clone, Debug)]
pub struct WriteOptions {
    /// Power of two in 4 KiB..=2 MiB.
    pub chunk_size: u32,
    pub zstd_level: i32,
    /// Encoder threads; 0 means one per available CPU.
    pub threads: usize,
    /// Replace an existing snapshot at the target (atomically) instead of refusing.
    pub replace: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            zstd_level: 1,
            threads: 0,
            replace: false,
        }
    }
}

/// What the caller knows about the VM that the format records.
#[derive(Clone, Debug)]
pub struct SnapshotMeta {
    pub fingerprint: Fingerprint,
    pub vcpus: u8,
}

/// Sizes and timings of one write.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WriteSummary {
    pub snapshot_id: SnapshotId,
    pub path: PathBuf,
    pub memory_bytes: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
    pub zero_pages: u64,
    /// Sealed chunk bytes (the memory payload).
    pub memory_payload_bytes: u64,
    pub file_bytes: u64,
    /// Encoding and writing, before the fsyncs.
    pub encode_elapsed: Duration,
    pub elapsed: Duration,
}

/// Writes a snapshot directory at `dir` (see the crate docs for the layout).
pub fn write(
    dir: &Path,
    meta: &SnapshotMeta,
    state: &[u8],
    memory: &[MemoryRegion<'_>],
    protection: &Protection<'_>,
    options: &WriteOptions,
) -> Result<WriteSummary, WriteError> {
    write_as(dir, None, meta, state, memory, protection, options)
}

/// Which snapshot a write records: its id and when it was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Identity {
    pub id: SnapshotId,
    pub created_unix_nanos: u64,
}

/// [`write`], for a snapshot that already exists elsewhere (`identity`: one pulled from a
/// store keeps its id and creation time); `None` makes a new one.
pub(crate) fn write_as(
    dir: &Path,
    identity: Option<Identity>,
    meta: &SnapshotMeta,
    state: &[u8],
    memory: &[MemoryRegion<'_>],
    protection: &Protection<'_>,
    options: &WriteOptions,
) -> Result<WriteSummary, WriteError> {
    let (parent, name) = split_target(dir)?;
    if fs::symlink_metadata(dir).is_ok() {
        if !options.replace {
            return Err(WriteError::TargetExists {
                path: dir.to_owned(),
            });
        }
        check_replaceable(dir)?;
    }
    let (tmp, mut summary) =
        write_unpublished(dir, identity, meta, state, memory, protection, options)?;
    let mut guard = TempGuard(Some(tmp.clone()));
    publish(&tmp, dir, &parent, options.replace)?;
    guard.0 = None;
    tracing::debug!(snapshot = %summary.snapshot_id, ?name, "snapshot published");
    summary.path = dir.to_owned();
    Ok(summary)
}

/// Everything up to (not including) the rename: returns the synced temporary directory. Split
/// out so tests can stop where a crash would.
pub(crate) fn write_unpublished(
    dir: &Path,
    identity: Option<Identity>,
    meta: &SnapshotMeta,
    state: &[u8],
    memory: &[MemoryRegion<'_>],
    protection: &Protection<'_>,
    options: &WriteOptions,
) -> Result<(PathBuf, WriteSummary), WriteError> {
    let started = Instant::now();
    let (parent, name) = split_target(dir)?;
    let regions: Vec<RegionDesc> = memory
        .iter()
        .map(|m| RegionDesc {
            guest_addr: m.guest_addr,
            size: m.bytes.len() as u64,
        })
        .collect();
    let memory_bytes = format::check_layout(&regions, options.chunk_size)
        .map_err(|reason| WriteError::Layout { reason })?;
    check_options(options)?;
    if state.len() as u64 > MAX_STATE_LEN {
        return Err(WriteError::StateTooLarge {
            len: state.len(),
            max: MAX_STATE_LEN,
        });
    }
    let threads = match options.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };

    let mut id = [0u8; 16];
    match identity {
        Some(known) => id = known.id.0,
        None => random(&mut id)?,
    }
    let snapshot_id = SnapshotId(id);
    let span = tracing::info_span!("snapshot_write", snapshot = %snapshot_id);
    let _enter = span.enter();

    let (sealer, protection_code, key_id, wrap_nonce, wrapped_key) = match protection {
        Protection::Encrypted(master) => {
            let data_key = DataKey::generate()?;
            let wrapped = data_key.wrap(master)?;
            let sealer = Sealer::aead(&data_key).ok_or(WriteError::Seal {
                what: "the data key",
            })?;
            (
                sealer,
                PROTECTION_AES_256_GCM,
                master.id(),
                wrapped.nonce,
                wrapped.sealed,
            )
        }
        Protection::InsecurePlaintext => {
            tracing::warn!(
                "writing an INSECURE PLAINTEXT snapshot: not encrypted, not authenticated"
            );
            let zero = ([0u8; NONCE_LEN], [0u8; WRAPPED_KEY_LEN]);
            (
                Sealer::Plaintext,
                PROTECTION_INSECURE_PLAINTEXT,
                KeyId::default(),
                zero.0,
                zero.1,
            )
        }
    };
    let tag_len = sealer.tag_len() as u64;

    let created_unix_nanos = identity.map_or_else(
        || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        },
        |known| known.created_unix_nanos,
    );
    let chunk_count =
        format::chunk_count(&regions, options.chunk_size).ok_or_else(|| WriteError::Layout {
            reason: "too many chunks".into(),
        })?;
    let mut header = Header {
        snapshot_id: id,
        created_unix_nanos,
        chunk_size: options.chunk_size,
        page_size: PAGE_SIZE as u32,
        vcpus: meta.vcpus,
        zstd_level: options.zstd_level,
        regions,
        fingerprint: meta.fingerprint.clone(),
        chunk_count,
        chunks: SectionRef::default(),
        state: SectionRef::default(),
        manifest: SectionRef::default(),
    };
    // Fixed-width integers make the header's size independent of the offsets filled in at the
    // end, so chunks can be written right after the space it will take.
    let planned_len = encode_header(&header)?.len();
    let chunks_offset = PREAMBLE_LEN as u64 + planned_len as u64 + tag_len;

    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        hex(&random_suffix()?)
    ));
    DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(|source| WriteError::CreateTemp {
            path: tmp.clone(),
            source,
        })?;
    let mut guard = TempGuard(Some(tmp.clone()));
    let file_path = tmp.join(SNAPSHOT_FILE);
    let write_err = |source| WriteError::WriteFile {
        path: file_path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file_path)
        .map_err(write_err)?;

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("thaw-snap-enc-{i}"))
        .build()
        .map_err(|source| WriteError::ThreadPool { threads, source })?;
    let jobs = chunk_jobs(memory, options.chunk_size);
    let residency = Residency::open();
    let mut writer = ChunkWriter {
        file: &file,
        offset: chunks_offset,
        entries: Vec::new(),
        stats: Stats::default(),
    };
    let batch = (threads * 4).max(8);
    pool.install(|| -> Result<(), WriteError> {
        let mut pending: Option<Vec<Result<Encoded, WriteError>>> = None;
        for jobs in jobs.chunks(batch) {
            // Write the previous batch on this thread while the pool encodes the next one.
            let (written, encoded) = rayon::join(
                || writer.write_batch(pending.take()),
                || encode_batch(&sealer, &id, options.zstd_level, &residency, jobs),
            );
            written.map_err(write_err)?;
            pending = Some(encoded);
        }
        writer.write_batch(pending.take()).map_err(write_err)
    })?;
    let ChunkWriter {
        offset: chunks_end,
        entries,
        stats,
        ..
    } = writer;
    header.chunks = SectionRef {
        offset: chunks_offset,
        len: chunks_end - chunks_offset,
    };

    // State, then manifest: each sealed under its own domain and written where the last ended.
    let seal_at = |domain, mut bytes: Vec<u8>, what, offset| -> Result<SectionRef, WriteError> {
        sealer
            .seal(
                nonce_bytes(domain, 0),
                &section_aad(domain, &id),
                &mut bytes,
            )
            .map_err(|_| WriteError::Seal { what })?;
        file.write_all_at(&bytes, offset).map_err(write_err)?;
        Ok(SectionRef {
            offset,
            len: bytes.len() as u64,
        })
    };
    header.state = seal_at(Domain::State, state.to_vec(), "the VM state", chunks_end)?;

    let manifest = bincode::encode_to_vec(&entries, format::encode_config()).map_err(|source| {
        WriteError::Encode {
            what: "manifest",
            source,
        }
    })?;
    if manifest.len() as u64 + tag_len > MAX_MANIFEST_LEN {
        return Err(WriteError::Layout {
            reason: "manifest exceeds the format's cap".into(),
        });
    }
    let manifest_offset = header.state.offset + header.state.len;
    header.manifest = seal_at(Domain::Manifest, manifest, "the manifest", manifest_offset)?;
    let file_len = manifest_offset + header.manifest.len;

    // Preamble and header go last: until now offset 0 holds zeros, so a file cut short by a
    // crash is not even recognised as a snapshot.
    let header_bytes = encode_header(&header)?;
    if header_bytes.len() != planned_len {
        return Err(WriteError::HeaderSize {
            planned: planned_len,
            actual: header_bytes.len(),
        });
    }
    let preamble = Preamble {
        version: FORMAT_VERSION,
        protection: protection_code,
        file_len,
        header_len: planned_len as u32,
        key_id,
        wrap_nonce,
        wrapped_key,
    };
    let mut front = preamble.to_bytes().to_vec();
    front.extend_from_slice(&header_bytes);
    let mut tag = Vec::new();
    sealer
        .seal(nonce_bytes(Domain::Header, 0), &front, &mut tag)
        .map_err(|_| WriteError::Seal { what: "the header" })?;
    front.extend_from_slice(&tag);
    file.write_all_at(&front, 0).map_err(write_err)?;
    let encode_elapsed = started.elapsed();

    file.sync_all().map_err(|source| WriteError::Sync {
        path: file_path.clone(),
        source,
    })?;
    sync_dir(&tmp)?;
    guard.0 = None;
    let summary = WriteSummary {
        snapshot_id,
        path: tmp.clone(),
        memory_bytes,
        chunks: chunk_count,
        zero_chunks: stats.zero_chunks,
        zero_pages: memory_bytes / PAGE_SIZE as u64 - stats.nonzero_pages,
        memory_payload_bytes: stats.payload_bytes,
        file_bytes: file_len,
        encode_elapsed,
        elapsed: started.elapsed(),
    };
    tracing::debug!(?summary, "snapshot written");
    Ok((tmp, summary))
}

fn encode_header(header: &Header) -> Result<Vec<u8>, WriteError> {
    let bytes =
        bincode::serde::encode_to_vec(header, format::encode_config()).map_err(|source| {
            WriteError::Encode {
                what: "header",
                source,
            }
        })?;
    if bytes.len() > MAX_HEADER_LEN as usize {
        return Err(WriteError::Layout {
            reason: format!("header of {} bytes exceeds the format's cap", bytes.len()),
        });
    }
    Ok(bytes)
}

fn check_options(options: &WriteOptions) -> Result<(), WriteError> {
    let levels = zstd::compression_level_range();
    if !levels.contains(&options.zstd_level) {
        return Err(WriteError::Options {
            reason: format!("zstd level {} is outside {levels:?}", options.zstd_level),
        });
    }
    if options.threads > 1024 {
        return Err(WriteError::Options {
            reason: format!("{} threads", options.threads),
        });
    }
    Ok(())
}

/// (index, guest address, bytes) of every chunk, in manifest order: regions in the order given,
/// each cut into `chunk_size` pieces (the last may be shorter), as `format::chunk_layout` does.
fn chunk_jobs<'a>(memory: &[MemoryRegion<'a>], chunk_size: u32) -> Vec<(u64, u64, &'a [u8])> {
    let mut jobs = Vec::new();
    for region in memory {
        let mut addr = region.guest_addr;
        for piece in region.bytes.chunks(chunk_size as usize) {
            jobs.push((jobs.len() as u64, addr, piece));
            addr += piece.len() as u64;
        }
    }
    jobs
}

fn encode_batch(
    sealer: &Sealer,
    id: &[u8; 16],
    level: i32,
    residency: &Residency,
    jobs: &[(u64, u64, &[u8])],
) -> Vec<Result<Encoded, WriteError>> {
    use rayon::prelude::*;
    jobs.par_iter()
        .map_init(
            || (Encoder::new(level), Vec::new()),
            |(enc, populated), (index, addr, bytes)| {
                residency.populated(bytes, populated);
                enc.encode_resident(sealer, id, *index, *addr, bytes, populated)
                    .map_err(|_| WriteError::Seal {
                        what: "a memory chunk",
                    })
            },
        )
        .collect()
}

#[derive(Default)]
struct Stats {
    zero_chunks: u64,
    nonzero_pages: u64,
    payload_bytes: u64,
}

struct ChunkWriter<'f> {
    file: &'f File,
    offset: u64,
    entries: Vec<ChunkEntry>,
    stats: Stats,
}

impl ChunkWriter<'_> {
    /// Appends encoded chunks in order. An encoding error is reported as an I/O error of kind
    /// Other carrying its text; encoding errors are sealing failures, which never happen.
    fn write_batch(
        &mut self,
        batch: Option<Vec<Result<Encoded, WriteError>>>,
    ) -> Result<(), std::io::Error> {
        for encoded in batch.into_iter().flatten() {
            match encoded.map_err(std::io::Error::other)? {
                Encoded::Zero => {
                    self.stats.zero_chunks += 1;
                    self.entries.push(ChunkEntry::Zero);
                }
                Encoded::Data {
                    mut chunk,
                    sealed,
                    nonzero_pages,
                } => {
                    self.file.write_all_at(&sealed, self.offset)?;
                    chunk.offset = self.offset;
                    self.offset += sealed.len() as u64;
                    self.stats.nonzero_pages += u64::from(nonzero_pages);
                    self.stats.payload_bytes += sealed.len() as u64;
                    self.entries.push(ChunkEntry::Data(chunk));
                }
            }
        }
        Ok(())
    }
}

/// Whether `dir`, which exists, may be replaced by a new snapshot: only a snapshot directory
/// may — a real directory (not a symlink) holding a snapshot file that starts with the format's
/// magic, and nothing else a snapshot does not hold. Replacing deletes the old directory, so
/// anything else at the target (a directory of other files, a regular file) is refused.
pub fn check_replaceable(dir: &Path) -> Result<(), WriteError> {
    let refuse = |reason: String| WriteError::NotASnapshot {
        path: dir.to_owned(),
        reason,
    };
    let meta = fs::symlink_metadata(dir).map_err(|e| refuse(e.to_string()))?;
    if !meta.file_type().is_dir() {
        return Err(refuse("it is not a directory".into()));
    }
    let entries = fs::read_dir(dir).map_err(|e| refuse(e.to_string()))?;
    let mut has_snapshot = false;
    for entry in entries {
        let entry = entry.map_err(|e| refuse(e.to_string()))?;
        let name = entry.file_name();
        if name == SNAPSHOT_FILE {
            has_snapshot = true;
        } else if name != format::WORKING_SET_FILE {
            return Err(refuse(format!(
                "it holds {}, which is not part of a snapshot",
                name.to_string_lossy()
            )));
        }
    }
    if !has_snapshot {
        return Err(refuse(format!("it holds no {SNAPSHOT_FILE}")));
    }
    let mut magic = [0u8; MAGIC.len()];
    let read = crate::open_regular(&dir.join(SNAPSHOT_FILE))
        .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut magic, 0));
    match read {
        Ok(()) if magic == MAGIC => Ok(()),
        Ok(()) => Err(refuse(format!(
            "its {SNAPSHOT_FILE} is not a Thaw snapshot"
        ))),
        Err(e) => Err(refuse(format!("its {SNAPSHOT_FILE}: {e}"))),
    }
}

fn split_target(dir: &Path) -> Result<(PathBuf, std::ffi::OsString), WriteError> {
    let name = dir
        .file_name()
        .ok_or_else(|| WriteError::TargetName {
            path: dir.to_owned(),
        })?
        .to_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

fn random_suffix() -> Result<[u8; 8], WriteError> {
    let mut s = [0u8; 8];
    random(&mut s)?;
    Ok(s)
}

/// Is `name` one of our temporary directory names (`.<target>.tmp-<16 hex>`)?
pub(crate) fn is_temp_name(name: &std::ffi::OsStr) -> bool {
    let b = name.as_bytes();
    let Some(rest) = b.strip_prefix(b".") else {
        return false;
    };
    let Some(pos) = rest.windows(5).rposition(|w| w == b".tmp-") else {
        return false;
    };
    let suffix = rest.get(pos + 5..).unwrap_or_default();
    pos > 0 && suffix.len() == 16 && suffix.iter().all(|c| c.is_ascii_hexdigit())
}

pub(crate) fn sync_dir(path: &Path) -> Result<(), WriteError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|source| WriteError::Sync {
            path: path.to_owned(),
            source,
        })
}

/// Removes a temporary directory unless disarmed (set to `None`).
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            if let Err(e) = fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove temporary snapshot directory");
            }
        }
    }
}

/// Moves the finished temporary directory to `target`: `RENAME_NOREPLACE` when nothing may be
/// overwritten (plain rename would silently replace an empty directory), `RENAME_EXCHANGE` to
/// replace, so at every instant the target name holds a complete snapshot.
fn publish(tmp: &Path, target: &Path, parent: &Path, replace: bool) -> Result<(), WriteError> {
    let publish_err = |source| WriteError::Publish {
        from: tmp.to_owned(),
        to: target.to_owned(),
        source,
    };
    match rename2(tmp, target, libc::RENAME_NOREPLACE) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            if !replace {
                return Err(WriteError::TargetExists {
                    path: target.to_owned(),
                });
            }
            rename2(tmp, target, libc::RENAME_EXCHANGE).map_err(publish_err)?;
            // `tmp` now names the old snapshot; it is already out of the target's place, so a
            // failure to delete it only leaves a temp directory readers refuse.
            if let Err(e) = fs::remove_dir_all(tmp) {
                tracing::warn!(path = %tmp.display(), error = %e, "cannot remove the replaced snapshot");
            }
        }
        Err(e) => return Err(publish_err(e)),
    }
    sync_dir(parent)
}

fn rename2(from: &Path, to: &Path, flags: libc::c_uint) -> Result<(), std::io::Error> {
    let cstr = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (from, to) = (cstr(from)?, cstr(to)?);
    // SAFETY: both pointers are NUL-terminated strings that outlive the call; renameat2 only
    // reads them, and AT_FDCWD makes relative paths resolve as std's would.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
#[path = "writer_tests.rs"]
mod tests;

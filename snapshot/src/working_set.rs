//! The working set: the chunks a restored guest touched first, in first-touch order, recorded
//! once (`thaw snapshot record-ws`) so later restores can install them before the guest asks
//! (the REAP idea, ASPLOS '21). `snapshot.thaw` is immutable, so the set lives next to it as
//! `working-set.thaw`, replaced atomically, and sealed like the snapshot's own sections: under
//! the snapshot's data key (or a BLAKE3 digest for plaintext snapshots) with a nonce domain of
//! its own and AAD binding the snapshot id, so it verifies only beside the snapshot it was
//! recorded for. `Snapshot::open` loads and checks it; a damaged one fails the open instead of
//! being ignored, or a tampered snapshot would quietly "work". docs/snapshot-format.md has the
//! layout.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::error::{ReadError, WorkingSetError, WriteError};
use crate::format::{self, NONCE_LEN, SNAPSHOT_FILE, SnapshotId};
use crate::keys::{hex, random};
use crate::seal::{Domain, Sealer, section_aad};

pub use crate::format::WORKING_SET_FILE;
/// First eight bytes of a working-set file.
pub const WORKING_SET_MAGIC: [u8; 8] = *b"THAWWSET";
/// The working-set format version this crate writes and the only one it reads.
pub const WORKING_SET_VERSION: u32 = 1;
/// The fixed, unsealed (but authenticated, as AAD) front of the file.
pub const WORKING_SET_PREAMBLE_LEN: usize = 48;
/// The body's fixed fields before the chunk list.
const BODY_FIXED_LEN: usize = 24;

/// Why recording stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum RecordingEnd {
    /// The guest answered its first invocation: the set is what a cold start touches.
    FirstResponse,
    /// The recording hit its time limit first.
    Timeout,
    /// The recording was stopped otherwise (by the operator, the VM exiting).
    Stopped,
}

impl RecordingEnd {
    pub(crate) fn code(self) -> u32 {
        match self {
            RecordingEnd::FirstResponse => 1,
            RecordingEnd::Timeout => 2,
            RecordingEnd::Stopped => 3,
        }
    }

    pub(crate) fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(RecordingEnd::FirstResponse),
            2 => Some(RecordingEnd::Timeout),
            3 => Some(RecordingEnd::Stopped),
            _ => None,
        }
    }
}

/// A recorded working set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WorkingSet {
    /// Chunk indices in first-fault order: each below the snapshot's chunk count, none twice.
    pub chunks: Vec<u32>,
    /// When it was recorded, nanoseconds since the Unix epoch (UTC).
    pub recorded_unix_nanos: u64,
    /// Page faults the recording restore saw (at least one per chunk here; more when the same
    /// chunk was touched again in a race, or zero pages were faulted).
    pub faults: u64,
    pub ended_by: RecordingEnd,
}

impl WorkingSet {
    /// A working set recorded now.
    pub fn new(chunks: Vec<u32>, faults: u64, ended_by: RecordingEnd) -> Self {
        let recorded_unix_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        WorkingSet {
            chunks,
            recorded_unix_nanos,
            faults,
            ended_by,
        }
    }

    /// Checks the indices against a snapshot of `count` chunks.
    pub fn check(&self, count: u64) -> Result<(), WorkingSetError> {
        let mut seen = HashSet::with_capacity(self.chunks.len());
        for (position, &chunk) in self.chunks.iter().enumerate() {
            if u64::from(chunk) >= count {
                return Err(WorkingSetError::ChunkOutOfRange {
                    position,
                    chunk,
                    count,
                });
            }
            if !seen.insert(chunk) {
                return Err(WorkingSetError::Duplicate { position, chunk });
            }
        }
        Ok(())
    }

    fn encode_body(&self) -> Result<Vec<u8>, WorkingSetError> {
        let count = u32::try_from(self.chunks.len()).map_err(|_| WorkingSetError::Malformed {
            reason: "more than 2^32 chunks".into(),
        })?;
        let mut body = Vec::with_capacity(BODY_FIXED_LEN + 4 * self.chunks.len());
        body.extend_from_slice(&self.recorded_unix_nanos.to_le_bytes());
        body.extend_from_slice(&self.faults.to_le_bytes());
        body.extend_from_slice(&self.ended_by.code().to_le_bytes());
        body.extend_from_slice(&count.to_le_bytes());
        for c in &self.chunks {
            body.extend_from_slice(&c.to_le_bytes());
        }
        Ok(body)
    }

    fn decode_body(body: &[u8]) -> Result<Self, WorkingSetError> {
        let malformed = |reason: &str| WorkingSetError::Malformed {
            reason: reason.to_owned(),
        };
        if body.len() < BODY_FIXED_LEN {
            return Err(malformed("body shorter than its fixed fields"));
        }
        let count = format::le_u32(body, 20) as usize;
        let list = body.get(BODY_FIXED_LEN..).unwrap_or_default();
        if count.checked_mul(4) != Some(list.len()) {
            return Err(malformed("chunk count does not match the body's length"));
        }
        let ended_by = RecordingEnd::from_code(format::le_u32(body, 16))
            .ok_or_else(|| malformed("unknown recording end"))?;
        Ok(WorkingSet {
            recorded_unix_nanos: format::le_u64(body, 0),
            faults: format::le_u64(body, 8),
            ended_by,
            chunks: list.chunks_exact(4).map(|c| format::le_u32(c, 0)).collect(),
        })
    }
}

/// What the reader knows of the snapshot beside the file.
pub(crate) struct Context<'a> {
    pub snapshot_id: &'a [u8; 16],
    pub protection: u32,
    pub sealer: &'a Sealer,
    pub chunk_count: u64,
}

/// `domain ‖ 8 random bytes`: the domain keeps it apart from every counter nonce of the
/// snapshot; randomness keeps successive working sets (the file can be replaced any number of
/// times under the same data key) apart from each other, with no counter to keep anywhere.
fn fresh_nonce() -> Result<[u8; NONCE_LEN], WriteError> {
    let mut nonce = [0u8; NONCE_LEN];
    nonce[..4].copy_from_slice(&(Domain::WorkingSet as u32).to_le_bytes());
    random(&mut nonce[4..])?;
    Ok(nonce)
}

fn aad(snapshot_id: &[u8; 16], preamble: &[u8]) -> Vec<u8> {
    let mut aad = section_aad(Domain::WorkingSet, snapshot_id);
    aad.extend_from_slice(preamble);
    aad
}

/// Loads and verifies the working set of the snapshot in `dir`; `None` when there is none.
pub(crate) fn load(dir: &Path, cx: &Context<'_>) -> Result<Option<WorkingSet>, ReadError> {
    let path = dir.join(WORKING_SET_FILE);
    let fail = |source| ReadError::WorkingSet {
        path: path.clone(),
        source,
    };
    let file = match crate::open_regular(&path) {
        Ok(f) => f,
        // Absent means no working set; a symlink to nothing is present and bad, and a present
        // but bad working set is never ignored.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && std::fs::symlink_metadata(&path).is_err() =>
        {
            return Ok(None);
        }
        Err(e) => return Err(fail(WorkingSetError::Io(e))),
    };
    // Bounded before reading: a full set names every chunk once.
    let max = (WORKING_SET_PREAMBLE_LEN + BODY_FIXED_LEN + cx.sealer.tag_len()) as u64
        + 4 * cx.chunk_count;
    let found = file
        .metadata()
        .map_err(|e| fail(WorkingSetError::Io(e)))?
        .len();
    if found > max {
        return Err(fail(WorkingSetError::TooLarge { found, max }));
    }
    let mut bytes = Vec::with_capacity(found as usize);
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(WorkingSetError::Io(e)))?;
    parse(&bytes, cx).map(Some).map_err(fail)
}

fn parse(bytes: &[u8], cx: &Context<'_>) -> Result<WorkingSet, WorkingSetError> {
    let found = bytes.len() as u64;
    let magic_len = bytes.len().min(WORKING_SET_MAGIC.len());
    if bytes.get(..magic_len) != WORKING_SET_MAGIC.get(..magic_len) {
        return Err(WorkingSetError::NotAWorkingSet);
    }
    let Some((pre, sealed)) = bytes.split_at_checked(WORKING_SET_PREAMBLE_LEN) else {
        return Err(WorkingSetError::Truncated {
            expected: WORKING_SET_PREAMBLE_LEN as u64,
            found,
        });
    };
    let version = format::le_u32(pre, 8);
    if version != WORKING_SET_VERSION {
        return Err(WorkingSetError::UnsupportedVersion {
            found: version,
            supported: WORKING_SET_VERSION,
        });
    }
    let protection = format::le_u32(pre, 12);
    if protection != cx.protection {
        return Err(WorkingSetError::ProtectionMismatch {
            snapshot: cx.protection,
            file: protection,
        });
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(pre.get(16..32).unwrap_or(&[0; 16]));
    if &id != cx.snapshot_id {
        return Err(WorkingSetError::Foreign {
            expected: SnapshotId(*cx.snapshot_id),
            found: SnapshotId(id),
        });
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(pre.get(32..44).unwrap_or(&[0; NONCE_LEN]));
    if format::le_u32(&nonce, 0) != Domain::WorkingSet as u32 {
        return Err(WorkingSetError::Malformed {
            reason: "nonce is not in the working-set domain".into(),
        });
    }
    let expected = WORKING_SET_PREAMBLE_LEN as u64 + u64::from(format::le_u32(pre, 44));
    if found < expected {
        return Err(WorkingSetError::Truncated { expected, found });
    }
    if found > expected {
        return Err(WorkingSetError::TrailingData { expected, found });
    }
    let mut sealed = sealed.to_vec();
    let body = cx
        .sealer
        .open(nonce, &aad(cx.snapshot_id, pre), &mut sealed)
        .map_err(|_| WorkingSetError::Tampered)?;
    let ws = WorkingSet::decode_body(body)?;
    ws.check(cx.chunk_count)?;
    Ok(ws)
}

/// Seals `ws` into the bytes of a working-set file.
fn seal(ws: &WorkingSet, cx: &Context<'_>) -> Result<Vec<u8>, WriteError> {
    let mut body = ws
        .encode_body()
        .map_err(|source| WriteError::WorkingSet { source })?;
    let sealed_len = body.len() + cx.sealer.tag_len();
    let sealed_len = u32::try_from(sealed_len).map_err(|_| WriteError::WorkingSet {
        source: WorkingSetError::Malformed {
            reason: "working set larger than 4 GiB".into(),
        },
    })?;
    let nonce = fresh_nonce()?;
    let mut out = Vec::with_capacity(WORKING_SET_PREAMBLE_LEN + sealed_len as usize);
    out.extend_from_slice(&WORKING_SET_MAGIC);
    out.extend_from_slice(&WORKING_SET_VERSION.to_le_bytes());
    out.extend_from_slice(&cx.protection.to_le_bytes());
    out.extend_from_slice(cx.snapshot_id);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed_len.to_le_bytes());
    cx.sealer
        .seal(nonce, &aad(cx.snapshot_id, &out), &mut body)
        .map_err(|_| WriteError::Seal {
            what: "the working set",
        })?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Writes `ws` as the working set of the snapshot opened from `file` in `dir`, replacing any
/// previous one atomically: a temporary file, fsynced, renamed over the old one, then the
/// directory fsynced. `check` is false only in tests that need a sealed but invalid set.
pub(crate) fn write(
    dir: &Path,
    snapshot_file: &File,
    ws: &WorkingSet,
    cx: &Context<'_>,
    check: bool,
) -> Result<(), WriteError> {
    // Sealed for one snapshot, the file would make any other snapshot's open fail; make sure
    // `dir` holds the very file this snapshot was opened from.
    let target = dir.join(SNAPSHOT_FILE);
    let ours = snapshot_file.metadata();
    let theirs = fs::metadata(&target);
    let same = match (&ours, &theirs) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    };
    if !same {
        return Err(WriteError::NotThisSnapshot {
            dir: dir.to_owned(),
        });
    }
    if check {
        ws.check(cx.chunk_count)
            .map_err(|source| WriteError::WorkingSet { source })?;
    }
    let bytes = seal(ws, cx)?;
    let mut suffix = [0u8; 8];
    random(&mut suffix)?;
    let tmp = dir.join(format!(".{WORKING_SET_FILE}.tmp-{}", hex(&suffix)));
    let path = dir.join(WORKING_SET_FILE);
    let write_err = |source| WriteError::WriteFile {
        path: tmp.clone(),
        source,
    };
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(write_err)?;
        f.write_all(&bytes).map_err(write_err)?;
        f.sync_all().map_err(|source| WriteError::Sync {
            path: tmp.clone(),
            source,
        })?;
        fs::rename(&tmp, &path).map_err(|source| WriteError::Publish {
            from: tmp.clone(),
            to: path.clone(),
            source,
        })
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    crate::writer::sync_dir(dir)?;
    tracing::debug!(dir = %dir.display(), chunks = ws.chunks.len(), "working set written");
    Ok(())
}

/// Removes the working set of the snapshot in `dir`; whether there was one.
pub(crate) fn remove(dir: &Path) -> Result<bool, WriteError> {
    let path = dir.join(WORKING_SET_FILE);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => return Err(WriteError::WriteFile { path, source }),
    }
    crate::writer::sync_dir(dir)?;
    Ok(true)
}

#[cfg(test)]
#[path = "working_set_tests.rs"]
mod tests;

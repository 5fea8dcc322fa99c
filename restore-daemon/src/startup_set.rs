//! A host's startup sets: for each snapshot it restored lazily, the chunks of memory the guest
//! faulted on before its agent's `Hello`, in the order it did. The next lazy restore of that
//! snapshot on this host has its page server install them as soon as it starts, while the VMM
//! is still restoring devices, so the guest finds them in place instead of stopping for each.
//!
//! Why: on this 2-CPU PVM host, a restored test guest faulted on 6 chunks before `Hello`, one
//! after the other (the guest cannot go on until each is in). Decoding them is quick (4–200 µs
//! each), but every fault also waits for a 2 MiB huge page to be zeroed before it reaches the
//! page server (a write to an empty, huge-page-advised block), for the server to be woken, for
//! `UFFDIO_COPY` (about 0.1 ms for a chunk) and for the vCPU to be woken again: 1.5–2 ms in
//! all, more than half of a fresh `thaw restore`'s time to `Hello` (docs/ARCHITECTURE.md, first
//! sign of life).
//!
//! Learned, not recorded ahead: the first lazy restore of a snapshot on a host (which also
//! authenticates every chunk once, `--chunk-check once`) notes its faults; each later one adds
//! any chunk it still had to fault on, so a set follows the guest without a separate step. A
//! recorded working set (`thaw snapshot record-ws`) is a different thing: everything a function
//! touched until it answered, installed in the background while the guest runs.
//!
//! **A set is a hint, and is not authenticated.** It only says which chunks to install first:
//! each is still decrypted and authenticated against the snapshot's manifest as it is
//! installed, exactly as if the guest had faulted on it. A set someone else wrote can at worst
//! make a restore install up to [`MAX_CHUNKS`] chunks early. A file that is not a valid set for
//! this snapshot (wrong layout, a chunk the snapshot does not have, too long) is ignored, and
//! replaced by the next restore that learns something.

use std::path::{Path, PathBuf};

use snapshot::SnapshotId;
use snapshot::host_files::{HostFileError, HostFiles};

/// The most chunks a set holds (128 MiB of 256 KiB chunks): what a guest needs before its
/// first sign of life is a small part of its memory, and a set installed before the guest runs
/// must not grow into an eager restore.
pub const MAX_CHUNKS: usize = 512;

const MAGIC: &[u8; 8] = b"THAWSU01";
/// Magic, the snapshot's chunk count, the set's length.
const HEADER: usize = 16;

/// Why a set could not be read or written. Never fatal to a restore: without a set, the guest
/// faults on what it needs, as it did before any set was learned.
#[derive(Debug, thiserror::Error)]
pub enum StartupSetError {
    /// Reading or writing the file failed, or it is not a regular file of a set's size.
    #[error(transparent)]
    File(#[from] HostFileError),
    /// The file is not a startup set for this snapshot.
    #[error("{}: not a startup set for this snapshot: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// The directory of a host's startup sets, one file per snapshot id ([`HostFiles`]: written
/// whole by rename, read without blocking or following a link).
#[derive(Clone, Debug)]
pub struct StartupSets {
    files: HostFiles,
}

impl StartupSets {
    /// Sets kept in `dir` (made when the first set is written, mode 0700).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            files: HostFiles::new(dir),
        }
    }

    /// `$XDG_STATE_HOME/thaw/startup`, else `~/.local/state/thaw/startup`; `None` if neither
    /// says where.
    pub fn default_location() -> Option<Self> {
        HostFiles::in_state_dir("startup").map(|files| Self { files })
    }

    /// Where the sets are.
    pub fn dir(&self) -> &Path {
        self.files.dir()
    }

    /// The set learned for snapshot `id`, which has `chunks` chunks: `None` if there is none.
    pub fn load(&self, id: SnapshotId, chunks: usize) -> Result<Option<Vec<u32>>, StartupSetError> {
        let Some(bytes) = self.files.read(id, (HEADER + 4 * MAX_CHUNKS) as u64)? else {
            return Ok(None);
        };
        decode(&bytes, chunks)
            .map(Some)
            .map_err(|reason| StartupSetError::Invalid {
                path: self.files.path_for(id),
                reason,
            })
    }

    /// Replaces the set of snapshot `id` (which has `chunks` chunks) with `set`. Not synced: a
    /// crash can at most lose a hint, and an empty or short file left by one is invalid, hence
    /// ignored.
    pub fn store(&self, id: SnapshotId, chunks: usize, set: &[u32]) -> Result<(), StartupSetError> {
        let bytes = encode(set, chunks).map_err(|reason| StartupSetError::Invalid {
            path: self.files.path_for(id),
            reason,
        })?;
        Ok(self.files.write(id, &bytes)?)
    }
}

fn encode(set: &[u32], chunks: usize) -> Result<Vec<u8>, &'static str> {
    check(set, chunks)?;
    let count = u32::try_from(chunks).map_err(|_| "the snapshot has too many chunks")?;
    let mut out = Vec::with_capacity(HEADER + 4 * set.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&count.to_le_bytes());
    // check() bounded the length by MAX_CHUNKS.
    out.extend_from_slice(&(set.len() as u32).to_le_bytes());
    for index in set {
        out.extend_from_slice(&index.to_le_bytes());
    }
    Ok(out)
}

fn decode(bytes: &[u8], chunks: usize) -> Result<Vec<u32>, &'static str> {
    let word = |at: usize| -> Option<u32> {
        let b = bytes.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if bytes.get(..MAGIC.len()) != Some(&MAGIC[..]) {
        return Err("no startup set header");
    }
    let (Some(count), Some(len)) = (word(8), word(12)) else {
        return Err("truncated header");
    };
    if count as usize != chunks {
        return Err("made for a snapshot with another number of chunks");
    }
    let len = len as usize;
    if len > MAX_CHUNKS {
        return Err("longer than the longest set");
    }
    if bytes.len() != HEADER + 4 * len {
        return Err("its length does not match the count it gives");
    }
    let set: Vec<u32> = bytes[HEADER..]
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    check(&set, chunks)?;
    Ok(set)
}

fn check(set: &[u32], chunks: usize) -> Result<(), &'static str> {
    if set.len() > MAX_CHUNKS {
        return Err("longer than the longest set");
    }
    let mut seen = vec![false; chunks];
    for &index in set {
        match seen.get_mut(index as usize) {
            None => return Err("names a chunk the snapshot does not have"),
            Some(true) => return Err("names a chunk twice"),
            Some(s) => *s = true,
        }
    }
    Ok(())
}

/// What a lazy restore learns from: where the host keeps its sets, and the set this restore
/// was given (empty the first time).
#[derive(Clone, Debug)]
pub struct StartupLearning {
    sets: StartupSets,
    id: SnapshotId,
    chunks: usize,
    known: Vec<u32>,
}

impl StartupLearning {
    /// Reads the set of snapshot `id` (with `chunks` chunks) from `sets`; a missing or invalid
    /// one counts as empty (an invalid one is logged, and replaced once something is learned).
    pub fn load(sets: StartupSets, id: SnapshotId, chunks: usize) -> Self {
        let known = match sets.load(id, chunks) {
            Ok(known) => known.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "startup set ignored");
                Vec::new()
            }
        };
        Self {
            sets,
            id,
            chunks,
            known,
        }
    }

    /// The chunks to install first, in order.
    pub fn known(&self) -> &[u32] {
        &self.known
    }

    /// Adds the chunks the guest still faulted on before its first sign of life (`faulted`, in
    /// fault order) to the set and stores it; returns whether it changed. The known chunks
    /// stay first: a guest faults on them before the new ones only because they were in place.
    pub fn learn(&self, faulted: &[u32]) -> Result<bool, StartupSetError> {
        let mut seen = vec![false; self.chunks];
        let mut set = Vec::with_capacity(self.known.len() + faulted.len());
        for &index in self.known.iter().chain(faulted) {
            if set.len() == MAX_CHUNKS {
                break;
            }
            if let Some(s) = seen.get_mut(index as usize).filter(|s| !**s) {
                *s = true;
                set.push(index);
            }
        }
        if set == self.known {
            return Ok(false);
        }
        self.sets.store(self.id, self.chunks, &set)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> SnapshotId {
        SnapshotId([n; 16])
    }

    fn sets() -> (tempfile::TempDir, StartupSets) {
        let dir = tempfile::tempdir().unwrap();
        let sets = StartupSets::new(dir.path().join("state/startup"));
        (dir, sets)
    }

    #[test]
    fn a_stored_set_loads_back_for_its_snapshot_only() {
        let (_dir, sets) = sets();
        assert_eq!(sets.load(id(1), 100).unwrap(), None, "nothing learned yet");
        sets.store(id(1), 100, &[17, 8, 25, 99]).unwrap();
        assert_eq!(sets.load(id(1), 100).unwrap(), Some(vec![17, 8, 25, 99]));
        assert_eq!(sets.load(id(2), 100).unwrap(), None);
        sets.store(id(1), 100, &[3]).unwrap();
        assert_eq!(sets.load(id(1), 100).unwrap(), Some(vec![3]), "replaced");
        let names: Vec<_> = std::fs::read_dir(sets.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    }

    #[test]
    fn a_file_that_is_not_a_valid_set_for_the_snapshot_is_refused_with_its_reason() {
        let (_dir, sets) = sets();
        let good = encode(&[1, 2, 3], 10).unwrap();
        let mut cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "no startup set header"),
            (b"THAWSU02xxxxxxxx".to_vec(), "no startup set header"),
            (good[..12].to_vec(), "truncated header"),
            (good[..good.len() - 1].to_vec(), "its length does not match"),
            ([&good[..], &[0u8; 4]].concat(), "its length does not match"),
            (encode(&[1, 2, 3], 11).unwrap(), "another number of chunks"),
        ];
        let mut out_of_range = good.clone();
        out_of_range[HEADER..HEADER + 4].copy_from_slice(&10u32.to_le_bytes());
        cases.push((out_of_range, "a chunk the snapshot does not have"));
        let mut twice = good.clone();
        twice[HEADER..HEADER + 4].copy_from_slice(&2u32.to_le_bytes());
        cases.push((twice, "names a chunk twice"));
        let mut claims_long = good[..HEADER].to_vec();
        claims_long[12..16].copy_from_slice(&(MAX_CHUNKS as u32 + 1).to_le_bytes());
        cases.push((claims_long, "longer than the longest set"));
        std::fs::create_dir_all(sets.dir()).unwrap();
        for (bytes, want) in cases {
            std::fs::write(sets.files.path_for(id(1)), &bytes).unwrap();
            match sets.load(id(1), 10) {
                Err(StartupSetError::Invalid { reason, .. }) => {
                    assert!(reason.contains(want), "{reason} / {want}")
                }
                other => panic!("{want}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_fifo_or_a_link_in_a_sets_place_is_refused_without_blocking() {
        let (dir, sets) = sets();
        std::fs::create_dir_all(sets.dir()).unwrap();
        let fifo = sets.files.path_for(id(1));
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let refused_as_no_file = |result| match result {
            Err(StartupSetError::File(e)) => e.source.kind() == std::io::ErrorKind::InvalidData,
            _ => false,
        };
        assert!(refused_as_no_file(sets.load(id(1), 10)));
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, encode(&[1], 10).unwrap()).unwrap();
        std::os::unix::fs::symlink(&target, sets.files.path_for(id(2))).unwrap();
        assert!(matches!(
            sets.load(id(2), 10),
            Err(StartupSetError::File(_))
        ));
        std::fs::write(
            sets.files.path_for(id(3)),
            vec![0u8; HEADER + 4 * MAX_CHUNKS + 1],
        )
        .unwrap();
        assert!(refused_as_no_file(sets.load(id(3), 10)), "too long to read");
    }

    #[test]
    fn a_set_that_cannot_be_encoded_is_not_written() {
        let (_dir, sets) = sets();
        let long: Vec<u32> = (0..MAX_CHUNKS as u32 + 1).collect();
        assert!(sets.store(id(1), MAX_CHUNKS + 1, &long).is_err());
        assert!(sets.store(id(1), 10, &[10]).is_err());
        assert!(sets.store(id(1), 10, &[1, 1]).is_err());
        assert!(!sets.dir().exists(), "nothing written");
    }

    #[test]
    fn learning_keeps_the_known_chunks_first_and_adds_new_faults_in_order() {
        let (_dir, sets) = sets();
        let first = StartupLearning::load(sets.clone(), id(1), 100);
        assert!(first.known().is_empty());
        assert!(
            !first.learn(&[]).unwrap(),
            "nothing faulted, nothing stored"
        );
        assert_eq!(sets.load(id(1), 100).unwrap(), None);
        assert!(first.learn(&[17, 8, 25]).unwrap());

        let second = StartupLearning::load(sets.clone(), id(1), 100);
        assert_eq!(second.known(), [17, 8, 25]);
        assert!(!second.learn(&[]).unwrap(), "every chunk was in place");
        assert!(!second.learn(&[8]).unwrap(), "already known");
        assert!(second.learn(&[9, 8, 9, 65]).unwrap());
        assert_eq!(sets.load(id(1), 100).unwrap(), Some(vec![17, 8, 25, 9, 65]));
    }

    #[test]
    fn a_set_stops_growing_at_its_limit() {
        let (_dir, sets) = sets();
        let chunks = 2 * MAX_CHUNKS;
        let all: Vec<u32> = (0..chunks as u32).collect();
        let learning = StartupLearning::load(sets.clone(), id(1), chunks);
        assert!(learning.learn(&all).unwrap());
        let full = StartupLearning::load(sets.clone(), id(1), chunks);
        assert_eq!(full.known(), &all[..MAX_CHUNKS]);
        assert!(!full.learn(&all[MAX_CHUNKS..]).unwrap(), "full: unchanged");
    }

    #[test]
    fn an_invalid_set_counts_as_empty_and_is_replaced_by_what_is_learned() {
        let (_dir, sets) = sets();
        std::fs::create_dir_all(sets.dir()).unwrap();
        std::fs::write(sets.files.path_for(id(1)), b"garbage").unwrap();
        let learning = StartupLearning::load(sets.clone(), id(1), 10);
        assert!(learning.known().is_empty());
        assert!(learning.learn(&[4]).unwrap());
        assert_eq!(sets.load(id(1), 10).unwrap(), Some(vec![4]));
    }
}

//! A host's records that it has authenticated every chunk of a snapshot file, so that later
//! restores of the same, unchanged file can skip the up-front pass over all of its chunks (the
//! one part of opening a large snapshot that grows with its size).
//!
//! What "the same, unchanged file" means: the open file's device, inode, size, modification
//! time and status-change time (ctime), as `fstat` gives them. Any write to the file through
//! its filesystem, any truncation, any file renamed into its place changes at least one of
//! them, and no unprivileged process can set a ctime. A record is a keyed BLAKE3 hash of those
//! fields and the snapshot's id, keyed by a key derived from the snapshot's own data key: only
//! a holder of the master key can make one, and a record copied to another file, another
//! snapshot or another key does not match.
//!
//! What a record does not cover, by design: bytes changed behind the filesystem's back (a raw
//! write to the block device, which needs root). Those are still caught, as every chunk is
//! authenticated again as it is installed; the guest then stops with an error instead of being
//! refused before it starts.
//!
//! Plaintext snapshots have no secret to key a record with: they are never recorded, and their
//! chunks are checked up front every time.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use zeroize::Zeroizing;

use crate::format::SnapshotId;
use crate::host_files::{HostFileError, HostFiles};
use crate::keys::DataKey;

/// A file changed less than this long ago is not recorded. Filesystems stamp changes with a
/// coarse clock (one tick is up to 10 ms), so a change made within the same tick as an earlier
/// one can leave every timestamp as it was: a record made that soon could then outlive a
/// change. The first restore of a new snapshot is therefore checked in full again next time.
pub const RECENT: Duration = Duration::from_secs(1);

const RECORD_KEY_CONTEXT: &str = "thaw snapshot 2026 host verification record v1";

/// The key a snapshot's records are made with, derived from its data key.
pub(crate) struct RecordKey(Zeroizing<[u8; 32]>);

pub(crate) fn record_key(data_key: &DataKey) -> RecordKey {
    RecordKey(Zeroizing::new(blake3::derive_key(
        RECORD_KEY_CONTEXT,
        data_key.bytes(),
    )))
}

/// Who a file is and what state it is in, as far as the filesystem says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileIdentity {
    /// The identity of an open file.
    pub fn of(file: &File) -> std::io::Result<Self> {
        let meta = file.metadata()?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        })
    }

    /// Whether the file's content or status changed less than `window` before `now` (or
    /// claims a time after it).
    fn changed_within(&self, window: Duration, now: SystemTime) -> bool {
        let at = |(secs, nanos): (i64, i64)| {
            let secs = u64::try_from(secs).ok()?;
            let nanos = u32::try_from(nanos).ok()?;
            UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
        };
        [self.mtime, self.ctime].into_iter().any(|t| match at(t) {
            Some(t) => now.duration_since(t).map_or(true, |age| age < window),
            None => true,
        })
    }

    fn encode(&self, snapshot_id: &[u8; 16]) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + 8 * 7);
        out.extend_from_slice(snapshot_id);
        for v in [self.dev, self.ino, self.size] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [self.mtime.0, self.mtime.1, self.ctime.0, self.ctime.1] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }
}

/// Why a record could not be written. Never fatal to a restore: without a record the next
/// restore checks every chunk again.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The snapshot is not encrypted: there is no key to make a record with.
    #[error("plaintext snapshots are never recorded as verified")]
    Plaintext,
    /// The file changed while its chunks were being authenticated.
    #[error("the snapshot file changed while its chunks were authenticated")]
    Changed,
    /// The file changed too recently for its timestamps to tell a later change apart (see
    /// [`RECENT`]).
    #[error("the snapshot file changed less than {RECENT:?} ago")]
    TooRecent,
    /// The record directory or file could not be written.
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The directory of a host's records, one file per snapshot id ([`HostFiles`]).
#[derive(Clone, Debug)]
pub struct VerifiedRecords {
    files: HostFiles,
}

impl VerifiedRecords {
    /// Records kept in `dir` (made when the first record is written, mode 0700).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            files: HostFiles::new(dir),
        }
    }

    /// `$XDG_STATE_HOME/thaw/verified`, else `~/.local/state/thaw/verified`; `None` if neither
    /// says where.
    pub fn default_location() -> Option<Self> {
        HostFiles::in_state_dir("verified").map(|files| Self { files })
    }

    /// Where the records are.
    pub fn dir(&self) -> &Path {
        self.files.dir()
    }

    /// Whether a record for snapshot `id` matches `identity` under `key` (see
    /// `VerifiedRecords::holds`, beside `Snapshot`). Anything but a regular file of exactly a
    /// record's length is no record.
    pub(crate) fn holds_for(
        &self,
        id: SnapshotId,
        key: &RecordKey,
        identity: &FileIdentity,
    ) -> bool {
        let stored = self.files.read(id, blake3::OUT_LEN as u64).ok().flatten();
        let Some(stored) = stored.and_then(|b| <[u8; blake3::OUT_LEN]>::try_from(b).ok()) else {
            return false;
        };
        // blake3::Hash compares in constant time.
        mac(key, &id.0, identity) == blake3::Hash::from(stored)
    }

    /// Writes the record for snapshot `id` whose file had the identity `checked` when its pass
    /// began and has `now` after it (see `VerifiedRecords::record`, beside `Snapshot`).
    pub(crate) fn record_for(
        &self,
        id: SnapshotId,
        key: &RecordKey,
        checked: &FileIdentity,
        now: &FileIdentity,
    ) -> Result<(), RecordError> {
        if now != checked {
            return Err(RecordError::Changed);
        }
        if checked.changed_within(RECENT, SystemTime::now()) {
            return Err(RecordError::TooRecent);
        }
        self.files
            .write(id, mac(key, &id.0, checked).as_bytes())
            .map_err(|HostFileError { path, source }| RecordError::Io { path, source })
    }
}

fn mac(key: &RecordKey, snapshot_id: &[u8; 16], identity: &FileIdentity) -> blake3::Hash {
    blake3::keyed_hash(&key.0, &identity.encode(snapshot_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_encoding_names_every_field() {
        let base = FileIdentity {
            dev: 1,
            ino: 2,
            size: 3,
            mtime: (4, 5),
            ctime: (6, 7),
        };
        let id = [9u8; 16];
        let changed = [
            FileIdentity { dev: 10, ..base },
            FileIdentity { ino: 10, ..base },
            FileIdentity { size: 10, ..base },
            FileIdentity {
                mtime: (4, 10),
                ..base
            },
            FileIdentity {
                ctime: (10, 7),
                ..base
            },
        ];
        for other in changed {
            assert_ne!(base.encode(&id), other.encode(&id), "{other:?}");
        }
        assert_ne!(base.encode(&id), base.encode(&[8u8; 16]));
    }

    #[test]
    fn a_file_changed_within_the_window_or_in_the_future_is_too_recent() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |secs: i64| FileIdentity {
            dev: 1,
            ino: 2,
            size: 3,
            mtime: (secs, 0),
            ctime: (secs, 0),
        };
        assert!(!at(999_998).changed_within(RECENT, now));
        assert!(at(999_999).changed_within(Duration::from_secs(2), now));
        assert!(at(1_000_000).changed_within(RECENT, now));
        assert!(at(1_000_100).changed_within(RECENT, now));
        assert!(at(-5).changed_within(RECENT, now));
        let ctime_only = FileIdentity {
            ctime: (1_000_000, 0),
            ..at(10)
        };
        assert!(ctime_only.changed_within(RECENT, now));
    }
}

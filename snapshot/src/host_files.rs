//! A directory of small files a host keeps about the snapshots it restored, one per snapshot
//! id: its records that a file was authenticated in full (`verified`) and the startup sets the
//! restore library learns. Both are written whole and read back whole, and neither may hang or
//! be redirected by what someone else put in their place.
//!
//! The directory is made on the first write (mode 0700) and each file is written to a
//! temporary file beside its place (mode 0600) and renamed into it, so a reader finds the old
//! file or the new one, never a torn one. Reads open without blocking (a FIFO put in a file's
//! place is refused instead of hanging a restore) and without following a link.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::format::SnapshotId;

/// A file could not be read or written, at `path`.
#[derive(Debug, thiserror::Error)]
#[error("{}", path.display())]
pub struct HostFileError {
    /// The file or directory.
    pub path: PathBuf,
    /// What the system said (`InvalidData` for a file that is not a regular file or is too
    /// long).
    #[source]
    pub source: std::io::Error,
}

/// A host's directory of per-snapshot files.
#[derive(Clone, Debug)]
pub struct HostFiles {
    dir: PathBuf,
}

impl HostFiles {
    /// Files kept in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// `name` in Thaw's state directory ([`crate::xdg::state_dir`]); `None` if it has none.
    pub fn in_state_dir(name: &str) -> Option<Self> {
        crate::xdg::state_dir().map(|base| Self::new(base.join(name)))
    }

    /// Where the files are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the file of snapshot `id` is.
    pub fn path_for(&self, id: SnapshotId) -> PathBuf {
        self.dir.join(id.to_string())
    }

    /// The file of snapshot `id`, if there is one: it must be a regular file of at most `max`
    /// bytes.
    pub fn read(&self, id: SnapshotId, max: u64) -> Result<Option<Vec<u8>>, HostFileError> {
        let path = self.path_for(id);
        let failed = |source| HostFileError {
            path: path.clone(),
            source,
        };
        let invalid =
            |what: &str| failed(std::io::Error::new(std::io::ErrorKind::InvalidData, what));
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(failed(e)),
        };
        let meta = file.metadata().map_err(failed)?;
        if !meta.is_file() {
            return Err(invalid("not a regular file"));
        }
        if meta.len() > max {
            return Err(invalid("longer than such a file can be"));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        (&file)
            .take(max.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(failed)?;
        if bytes.len() as u64 > max {
            return Err(invalid("longer than such a file can be"));
        }
        Ok(Some(bytes))
    }

    /// Replaces the file of snapshot `id` with `bytes` (see the module docs). Not synced: these
    /// files are what a host learned, and one lost in a crash is learned again.
    pub fn write(&self, id: SnapshotId, bytes: &[u8]) -> Result<(), HostFileError> {
        let failed = |path: &Path| {
            let path = path.to_owned();
            move |source| HostFileError { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(failed(&self.dir))?;
        let path = self.path_for(id);
        let temp = self.dir.join(format!(".{id}.{}.tmp", std::process::id()));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp)
            .and_then(|mut file| file.write_all(bytes))
            .and_then(|()| std::fs::rename(&temp, &path));
        if let Err(source) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(HostFileError { path, source });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_written_reads_back_and_replaces_the_old_one_whole() {
        let dir = tempfile::tempdir().unwrap();
        let files = HostFiles::new(dir.path().join("a/b"));
        let id = SnapshotId([3; 16]);
        assert!(files.read(id, 10).unwrap().is_none());
        files.write(id, b"first").unwrap();
        files.write(id, b"second").unwrap();
        assert_eq!(files.read(id, 10).unwrap().unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(files.dir()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left");
        let err = files.read(id, 5).unwrap_err();
        assert_eq!(err.source.kind(), std::io::ErrorKind::InvalidData);
    }
}

//! Opening files that must be regular files (a snapshot, its working set, a config file).
//!
//! `open(2)` on a FIFO blocks until a writer appears, and reading a character device such as
//! `/dev/zero` never ends: a FIFO named `snapshot.thaw` hung `verify`, `restore` and thawd's
//! start-up with no output. So such files are opened without blocking and refused unless they
//! are regular files, before any byte is read.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// Files opened ahead, by the path this process will ask for (`None`: known to be absent).
static PROVIDED: Mutex<Vec<(PathBuf, Option<File>)>> = Mutex::new(Vec::new());

/// Makes [`open_regular`] of `path` give (a duplicate of) `file`, or `NotFound` for `None`,
/// instead of opening the path: a jailed worker opens its snapshot's files (root's, mode 0600)
/// while it still may, then asks for them by their place inside its jail, where it may not
/// open them. `file` must be one [`open_regular`] returned.
pub fn provide_opened(path: &Path, file: Option<File>) {
    let mut provided = PROVIDED.lock().unwrap_or_else(PoisonError::into_inner);
    provided.retain(|(p, _)| p != path);
    provided.push((path.to_owned(), file));
}

fn provided(path: &Path) -> Option<io::Result<File>> {
    let provided = PROVIDED.lock().unwrap_or_else(PoisonError::into_inner);
    let (_, file) = provided.iter().find(|(p, _)| p == path)?;
    Some(match file {
        Some(file) => file.try_clone(),
        None => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} does not exist", path.display()),
        )),
    })
}

/// Opens `path` for reading if it is a regular file (following symlinks); anything else is an
/// `InvalidInput` error that names what was found.
pub fn open_regular(path: &Path) -> io::Result<File> {
    if let Some(file) = provided(path) {
        return file;
    }
    let file = OpenOptions::new()
        .read(true)
        // O_NONBLOCK: a FIFO opens at once instead of waiting for a writer. It changes nothing
        // for regular files, which are all that get past the check below.
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if kind.is_file() {
        return Ok(file);
    }
    let what = if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{} is {what}, not a regular file", path.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_are_opened_and_nothing_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(open_regular(&file).is_ok());
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(open_regular(&link).is_ok(), "symlinks are followed");

        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(fifo.as_os_str()))
            .unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_regular(&fifo).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("a FIFO"), "{e}");

        let e = open_regular(Path::new("/dev/zero")).unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");
        let e = open_regular(dir.path()).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let e = open_regular(&dir.path().join("missing")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}

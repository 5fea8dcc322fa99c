//! The host files an image carries, collected by guest path before anything is written. Two
//! sources may want the same guest path (the function's code and a requirement pip installed,
//! or two extension modules needing one library); that is fine when both are the same file or
//! hold the same bytes, and an error naming both otherwise, never a silent pick.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::guest_image::{InitramfsBuilder, InitramfsError};

use super::elf_deps::Library;

/// A bundle that cannot be assembled.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Two different files for one guest path.
    #[error(
        "{guest} would hold both {} and {}, which differ",
        existing.display(),
        new.display()
    )]
    Conflict {
        /// The guest path.
        guest: String,
        /// The file already there.
        existing: PathBuf,
        /// The other one.
        new: PathBuf,
    },
    /// A file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The archive refused an entry.
    #[error(transparent)]
    Archive(#[from] InitramfsError),
}

/// Host files and symlinks by guest path, and the shared libraries among them.
#[derive(Debug, Default)]
pub struct Bundle {
    files: BTreeMap<String, PathBuf>,
    symlinks: BTreeMap<String, String>,
    libraries: BTreeMap<String, String>,
}

impl Bundle {
    /// Adds `host` at `guest`; the same file (or the same bytes) twice is one entry.
    pub fn add_file(&mut self, guest: String, host: PathBuf) -> Result<(), BundleError> {
        if let Some(existing) = self.files.get(&guest) {
            if same_content(existing, &host)? {
                return Ok(());
            }
            return Err(BundleError::Conflict {
                guest,
                existing: existing.clone(),
                new: host,
            });
        }
        self.files.insert(guest, host);
        Ok(())
    }

    /// Whether a file is already at `guest`.
    pub fn has_file(&self, guest: &str) -> bool {
        self.files.contains_key(guest)
    }

    /// Takes the file at `guest` out again (an extension module that cannot load).
    pub fn remove_file(&mut self, guest: &str) {
        self.files.remove(guest);
    }

    /// Adds a symbolic link.
    pub fn add_symlink(&mut self, guest: String, target: String) {
        self.symlinks.insert(guest, target);
    }

    /// Adds shared libraries found by the resolver, remembering each by its `DT_NEEDED` name.
    pub fn add_libraries(&mut self, libraries: Vec<Library>) -> Result<(), BundleError> {
        for lib in libraries {
            self.libraries
                .entry(lib.needed)
                .or_insert_with(|| lib.guest.clone());
            self.add_file(lib.guest, lib.host)?;
        }
        Ok(())
    }

    /// Files: guest path → host file.
    pub fn files(&self) -> &BTreeMap<String, PathBuf> {
        &self.files
    }

    /// Symlinks: guest path → target.
    pub fn symlinks(&self) -> &BTreeMap<String, String> {
        &self.symlinks
    }

    /// Shared libraries: `DT_NEEDED` name → guest path.
    pub fn libraries(&self) -> &BTreeMap<String, String> {
        &self.libraries
    }

    /// Adds every file (with its host permission bits) and symlink to `builder`; returns the
    /// files' total size in bytes.
    pub fn write_into(&self, builder: &mut InitramfsBuilder) -> Result<u64, BundleError> {
        let mut bytes = 0;
        for (guest, host) in &self.files {
            let meta = std::fs::metadata(host).map_err(|source| BundleError::Read {
                path: host.clone(),
                source,
            })?;
            bytes += meta.len();
            builder.add_file_from_host(host, guest, meta.permissions().mode() & 0o7777)?;
        }
        for (guest, target) in &self.symlinks {
            builder.add_symlink(guest, target)?;
        }
        Ok(bytes)
    }
}

/// The same file, or two files with the same bytes.
fn same_content(a: &Path, b: &Path) -> Result<bool, BundleError> {
    if a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y) {
        return Ok(true);
    }
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| BundleError::Read {
            path: path.to_owned(),
            source,
        })
    };
    Ok(read(a)? == read(b)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn same_bytes_are_one_entry_and_different_bytes_a_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        std::fs::write(&a, "same").unwrap();
        std::fs::write(&b, "same").unwrap();
        std::fs::write(&c, "other").unwrap();
        let mut bundle = Bundle::default();
        bundle.add_file("/var/task/x.py".into(), a.clone()).unwrap();
        bundle.add_file("/var/task/x.py".into(), a.clone()).unwrap();
        bundle.add_file("/var/task/x.py".into(), b).unwrap();
        assert_eq!(bundle.files()["/var/task/x.py"], a);
        let err = bundle.add_file("/var/task/x.py".into(), c).unwrap_err();
        assert!(matches!(err, BundleError::Conflict { .. }), "{err}");
        assert!(err.to_string().contains("/var/task/x.py"), "{err}");
    }
}

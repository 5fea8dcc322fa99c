//! Putting an image directory in place atomically: everything is written into a temporary
//! directory beside it (`.NAME.tmp-*`, same file system), synced, then renamed into place with
//! `RENAME_NOREPLACE`, or swapped with the old image by `RENAME_EXCHANGE` when replacing, so
//! the name holds a complete image, the old one or the new one, at every instant, and a
//! failure leaves nothing behind.
//!
//! Replacing is refused unless the existing directory is a function image (a valid manifest)
//! holding nothing but the image's own files: `--replace` must never delete anything else.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};

use super::manifest::{MANIFEST_FILE, Manifest, ManifestError};

/// The image directory cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// Something exists at the target and `--replace` was not given.
    #[error("{} already exists; pass --replace to replace a function image", path.display())]
    Exists {
        /// The target.
        path: PathBuf,
    },
    /// `--replace`, but the target is not a function image.
    #[error(
        "{} is not a function image, so --replace will not delete it ({reason}); choose \
         another --out",
        path.display()
    )]
    NotAnImage {
        /// The target.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// `--replace`, but the image directory holds files of someone else's.
    #[error(
        "{} holds files that are not part of its function image ({}), so --replace will not \
         delete it; move them away first",
        path.display(),
        files.join(", ")
    )]
    ForeignFiles {
        /// The target.
        path: PathBuf,
        /// The other entries' names.
        files: Vec<String>,
    },
    /// The target's parent directory does not exist.
    #[error("{} does not exist (the parent of --out {})", parent.display(), path.display())]
    NoParent {
        /// The target.
        path: PathBuf,
        /// Its parent.
        parent: PathBuf,
    },
    /// A file system operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> OutputError {
    let path = path.to_owned();
    move |source| OutputError::Io {
        action,
        path,
        source,
    }
}

/// Whether an image may be written to `out`: nothing there, or (with `replace`) a function
/// image and nothing else. Returns the image being replaced.
pub fn check_target(out: &Path, replace: bool) -> Result<Option<Manifest>, OutputError> {
    let parent = parent_of(out);
    if !parent.is_dir() {
        return Err(OutputError::NoParent {
            path: out.to_owned(),
            parent,
        });
    }
    let meta = match std::fs::symlink_metadata(out) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("inspect", out)(e)),
    };
    if !replace {
        return Err(OutputError::Exists {
            path: out.to_owned(),
        });
    }
    let not_an_image = |reason: String| OutputError::NotAnImage {
        path: out.to_owned(),
        reason,
    };
    if !meta.is_dir() {
        return Err(not_an_image(if meta.file_type().is_symlink() {
            "it is a symlink".into()
        } else {
            "it is not a directory".into()
        }));
    }
    let manifest = Manifest::read(out).map_err(|e| match e {
        ManifestError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            not_an_image(format!("it has no {MANIFEST_FILE}"))
        }
        e => not_an_image(e.to_string()),
    })?;
    let mut foreign = Vec::new();
    for entry in std::fs::read_dir(out).map_err(io_err("list", out))? {
        let entry = entry.map_err(io_err("list", out))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let own = name == MANIFEST_FILE || name == manifest.initramfs.file;
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if !own || !is_file {
            foreign.push(name);
        }
    }
    if !foreign.is_empty() {
        foreign.sort();
        return Err(OutputError::ForeignFiles {
            path: out.to_owned(),
            files: foreign,
        });
    }
    Ok(Some(manifest))
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// An image being written beside its target; removed when dropped unless published.
#[derive(Debug)]
pub struct Staged {
    dir: Option<tempfile::TempDir>,
    out: PathBuf,
}

impl Staged {
    /// A fresh temporary directory beside `out`.
    pub fn new(out: &Path) -> Result<Self, OutputError> {
        let parent = parent_of(out);
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let dir = tempfile::Builder::new()
            .prefix(&format!(".{name}.tmp-"))
            .tempdir_in(&parent)
            .map_err(io_err("create a temporary directory in", &parent))?;
        Ok(Self {
            dir: Some(dir),
            out: out.to_owned(),
        })
    }

    /// The temporary directory.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new(""), |d| d.path())
    }

    /// Writes `name` in the temporary directory and syncs it.
    pub fn write_file(&self, name: &str, data: &[u8]) -> Result<(), OutputError> {
        let path = self.path().join(name);
        let mut file = File::create(&path).map_err(io_err("create", &path))?;
        file.write_all(data).map_err(io_err("write", &path))?;
        file.sync_all().map_err(io_err("sync", &path))
    }

    /// Moves the finished image into place (see the module documentation); checks the target
    /// again first, since time has passed since the build began.
    pub fn publish(mut self, replace: bool) -> Result<(), OutputError> {
        let Some(dir) = self.dir.take() else {
            return Ok(());
        };
        let tmp = dir.path().to_owned();
        // From here on `dir` must not delete `tmp` when dropped: after an exchange it names the
        // old image, whose files are removed one by one below.
        let guard = Cleanup(Some(dir));
        sync_dir(&tmp)?;
        let old = check_target(&self.out, replace)?;
        let rename = |flags| {
            renameat2(AT_FDCWD, &tmp, AT_FDCWD, &self.out, flags)
                .map_err(|e| io_err("move the new image to", &self.out)(e.into()))
        };
        match old {
            None => match renameat2(
                AT_FDCWD,
                &tmp,
                AT_FDCWD,
                &self.out,
                RenameFlags::RENAME_NOREPLACE,
            ) {
                Ok(()) => guard.disarm(),
                Err(Errno::EEXIST) => {
                    return Err(OutputError::Exists {
                        path: self.out.clone(),
                    });
                }
                Err(e) => return Err(io_err("move the new image to", &self.out)(e.into())),
            },
            Some(old) => {
                rename(RenameFlags::RENAME_EXCHANGE)?;
                guard.disarm();
                // `tmp` now holds the old image, which was checked to hold only these files.
                remove_old_image(&tmp, &old);
            }
        }
        sync_dir(&parent_of(&self.out))
    }
}

/// Deletes the temporary directory unless disarmed.
struct Cleanup(Option<tempfile::TempDir>);

impl Cleanup {
    fn disarm(mut self) {
        if let Some(dir) = self.0.take() {
            let _ = dir.keep();
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            if let Err(e) = dir.close() {
                tracing::warn!(error = %e, "cannot remove the temporary image directory");
            }
        }
    }
}

/// Removes a replaced image's own files, then its directory if that is now empty (anything
/// that appeared meanwhile stays, with a warning).
fn remove_old_image(dir: &Path, old: &Manifest) {
    for name in [old.initramfs.file.as_str(), MANIFEST_FILE] {
        let path = dir.join(name);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the replaced image's file");
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        tracing::warn!(path = %dir.display(), error = %e, "cannot remove the replaced image's directory");
    }
}

fn sync_dir(path: &Path) -> Result<(), OutputError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", path))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::function_image::manifest::tests::sample;

    /// An image directory as a build leaves it.
    fn image(dir: &Path, initramfs: &[u8]) {
        std::fs::create_dir(dir).unwrap();
        std::fs::write(dir.join("initramfs.cpio.zst"), initramfs).unwrap();
        std::fs::write(dir.join(MANIFEST_FILE), sample(initramfs).to_json()).unwrap();
    }

    fn publish(out: &Path, initramfs: &[u8], replace: bool) -> Result<(), OutputError> {
        let staged = Staged::new(out)?;
        staged.write_file("initramfs.cpio.zst", initramfs)?;
        staged.write_file(MANIFEST_FILE, sample(initramfs).to_json().as_bytes())?;
        staged.publish(replace)
    }

    /// Names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_new_image_appears_whole_and_nothing_else_is_left() {
        let parent = tempfile::tempdir().unwrap();
        let out = parent.path().join("img");
        publish(&out, b"new", false).unwrap();
        assert_eq!(names(&out), ["function-image.json", "initramfs.cpio.zst"]);
        assert_eq!(names(parent.path()), ["img"]);
        assert!(Manifest::read(&out).is_ok());
    }

    #[test]
    fn an_unpublished_image_leaves_nothing() {
        let parent = tempfile::tempdir().unwrap();
        let staged = Staged::new(&parent.path().join("img")).unwrap();
        staged.write_file("partial", b"x").unwrap();
        drop(staged);
        assert!(names(parent.path()).is_empty());
    }

    #[test]
    fn an_existing_target_needs_replace() {
        let parent = tempfile::tempdir().unwrap();
        let out = parent.path().join("img");
        image(&out, b"old");
        assert!(matches!(
            publish(&out, b"new", false),
            Err(OutputError::Exists { .. })
        ));
        assert_eq!(
            std::fs::read(out.join("initramfs.cpio.zst")).unwrap(),
            b"old"
        );
        // An empty directory too: rename(2) alone would replace it.
        let empty = parent.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(matches!(
            check_target(&empty, false),
            Err(OutputError::Exists { .. })
        ));
        assert_eq!(names(parent.path()), ["empty", "img"]);
    }

    #[test]
    fn replace_swaps_an_image_for_the_new_one() {
        let parent = tempfile::tempdir().unwrap();
        let out = parent.path().join("img");
        image(&out, b"old");
        publish(&out, b"new", true).unwrap();
        assert_eq!(
            std::fs::read(out.join("initramfs.cpio.zst")).unwrap(),
            b"new"
        );
        assert_eq!(names(parent.path()), ["img"]);
    }

    #[test]
    fn replace_refuses_anything_that_is_not_an_image_and_touches_nothing() {
        let parent = tempfile::tempdir().unwrap();
        let p = parent.path();
        // A directory of someone's files.
        let docs = p.join("docs");
        std::fs::create_dir(&docs).unwrap();
        std::fs::write(docs.join("thesis.tex"), "years of work").unwrap();
        // A plain file, and a symlink to an image.
        std::fs::write(p.join("file"), "data").unwrap();
        image(&p.join("real"), b"old");
        std::os::unix::fs::symlink(p.join("real"), p.join("link")).unwrap();
        // An image with an extra file in it, and one with a broken manifest.
        image(&p.join("extra"), b"old");
        std::fs::write(p.join("extra/notes.txt"), "keep me").unwrap();
        std::fs::create_dir(p.join("broken")).unwrap();
        std::fs::write(p.join("broken/function-image.json"), "{").unwrap();
        std::fs::write(p.join("broken/data"), "keep me").unwrap();

        for name in ["docs", "file", "link", "broken"] {
            let err = publish(&p.join(name), b"new", true).unwrap_err();
            assert!(
                matches!(err, OutputError::NotAnImage { .. }),
                "{name}: {err}"
            );
        }
        let err = publish(&p.join("extra"), b"new", true).unwrap_err();
        assert!(matches!(err, OutputError::ForeignFiles { .. }), "{err}");
        assert!(err.to_string().contains("notes.txt"), "{err}");

        assert_eq!(
            std::fs::read(docs.join("thesis.tex")).unwrap(),
            b"years of work"
        );
        assert_eq!(std::fs::read(p.join("file")).unwrap(), b"data");
        assert_eq!(
            std::fs::read(p.join("extra/notes.txt")).unwrap(),
            b"keep me"
        );
        assert_eq!(std::fs::read(p.join("broken/data")).unwrap(), b"keep me");
        assert!(
            std::fs::symlink_metadata(p.join("link"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            names(p),
            ["broken", "docs", "extra", "file", "link", "real"]
        );
    }

    #[test]
    fn a_missing_parent_is_an_error() {
        let parent = tempfile::tempdir().unwrap();
        let out = parent.path().join("no/such/img");
        assert!(matches!(
            check_target(&out, false),
            Err(OutputError::NoParent { .. })
        ));
    }
}

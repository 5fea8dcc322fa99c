//! The function's code for `/var/task`: every file under `--code`, as Lambda unpacks a
//! deployment package, minus what is never code (`__pycache__`, `*.pyc`, `.git`, and the image
//! being built when it lives inside the code directory). Symlinks stay symlinks when they point
//! inside the code directory and are refused when they escape it: the guest has none of the
//! host's other files, and following them would quietly copy anything the link reaches.

use std::path::{Component, Path, PathBuf};

/// Lambda's task root, where the function's code and its requirements go.
pub const TASK_ROOT: &str = "/var/task";
/// Lambda's limit on a function's unzipped deployment package (code and dependencies), 250 MB.
pub const MAX_TASK_BYTES: u64 = 250 * 1024 * 1024;

/// Names never carried: bytecode caches and version control.
const SKIPPED_DIRS: &[&str] = &["__pycache__", ".git"];

/// The code directory cannot be packaged.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    /// `--code` is not a directory.
    #[error("--code {}: not a directory", path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// A file or directory could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A symlink that leads outside the code directory.
    #[error(
        "{} is a symlink to {}, outside the code directory {}; copy what it points to into the \
         code directory instead",
        link.display(),
        target.display(),
        root.display()
    )]
    SymlinkEscapes {
        /// The link.
        link: PathBuf,
        /// Where it leads.
        target: PathBuf,
        /// The code directory.
        root: PathBuf,
    },
    /// A symlink to nothing.
    #[error("{} is a symlink to {}, which does not exist", link.display(), target.display())]
    DanglingSymlink {
        /// The link.
        link: PathBuf,
        /// Its target as written.
        target: PathBuf,
    },
    /// A FIFO, socket or device node.
    #[error("{} is not a regular file, directory or symlink", path.display())]
    SpecialFile {
        /// The path.
        path: PathBuf,
    },
    /// More than Lambda's limit.
    #[error(
        "the function's code and requirements are {bytes} bytes unzipped, more than Lambda's \
         limit of {MAX_TASK_BYTES} bytes (250 MB)"
    )]
    TooLarge {
        /// Their size.
        bytes: u64,
    },
}

/// The code directory's files, relative to it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CodeFiles {
    /// The canonical code directory.
    pub root: PathBuf,
    /// Regular files: path relative to the root, host path.
    pub files: Vec<(String, PathBuf)>,
    /// Symlinks inside the root: path relative to the root, relative target.
    pub symlinks: Vec<(String, String)>,
    /// The regular files' total size.
    pub bytes: u64,
}

/// Something under the code directory not to carry: the image directory `name` in `parent`
/// (canonical), and its temporary siblings `.name.*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exclude {
    /// The image directory's canonical parent.
    pub parent: PathBuf,
    /// The image directory's name.
    pub name: String,
}

impl Exclude {
    fn matches(&self, path: &Path) -> bool {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return false;
        };
        let name = name.to_string_lossy();
        parent == self.parent
            && (name == self.name.as_str() || name.starts_with(&format!(".{}.", self.name)))
    }
}

/// Lists the code directory `dir`, sorted; fails past [`MAX_TASK_BYTES`].
pub fn collect(dir: &Path, exclude: Option<&Exclude>) -> Result<CodeFiles, CodeError> {
    let meta = std::fs::metadata(dir).map_err(|source| CodeError::Read {
        path: dir.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(CodeError::NotADirectory {
            path: dir.to_owned(),
        });
    }
    let root = dir.canonicalize().map_err(|source| CodeError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut code = CodeFiles {
        root: root.clone(),
        ..CodeFiles::default()
    };
    let mut stack = vec![root.clone()];
    while let Some(current) = stack.pop() {
        let read_err = |source| CodeError::Read {
            path: current.clone(),
            source,
        };
        let mut entries = std::fs::read_dir(&current)
            .map_err(read_err)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_err)?;
        entries.sort();
        for path in entries {
            if exclude.is_some_and(|x| x.matches(&path)) {
                continue;
            }
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let meta = std::fs::symlink_metadata(&path).map_err(|source| CodeError::Read {
                path: path.clone(),
                source,
            })?;
            let rel = relative(&root, &path);
            let kind = meta.file_type();
            if kind.is_dir() {
                if !SKIPPED_DIRS.contains(&name.as_ref()) {
                    stack.push(path);
                }
            } else if kind.is_symlink() {
                if name != ".git" {
                    let target = link_inside(&root, &path, &rel)?;
                    code.symlinks.push((rel, target));
                }
            } else if kind.is_file() {
                if name.ends_with(".pyc") || name == ".git" {
                    continue;
                }
                code.bytes += meta.len();
                check_size(code.bytes)?;
                code.files.push((rel, path));
            } else {
                return Err(CodeError::SpecialFile { path });
            }
        }
    }
    code.files.sort();
    code.symlinks.sort();
    Ok(code)
}

/// Fails when `bytes` is past Lambda's limit.
pub fn check_size(bytes: u64) -> Result<(), CodeError> {
    if bytes > MAX_TASK_BYTES {
        return Err(CodeError::TooLarge { bytes });
    }
    Ok(())
}

/// `path` relative to `root`, with `/` separators.
fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// The target of the symlink at `link` (`rel` from the root), rewritten relative to the link's
/// own directory, when it resolves inside `root`.
fn link_inside(root: &Path, link: &Path, rel: &str) -> Result<String, CodeError> {
    let written = std::fs::read_link(link).map_err(|source| CodeError::Read {
        path: link.to_owned(),
        source,
    })?;
    let target = link
        .canonicalize()
        .map_err(|_| CodeError::DanglingSymlink {
            link: link.to_owned(),
            target: written.clone(),
        })?;
    let Ok(inside) = target.strip_prefix(root) else {
        return Err(CodeError::SymlinkEscapes {
            link: link.to_owned(),
            target,
            root: root.to_owned(),
        });
    };
    let depth = Path::new(rel)
        .parent()
        .map_or(0, |p| p.components().count());
    let mut out = PathBuf::new();
    for _ in 0..depth {
        out.push(Component::ParentDir);
    }
    out.push(inside);
    if out.as_os_str().is_empty() {
        out.push(Component::CurDir);
    }
    Ok(out.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::symlink;

    use super::*;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["pkg/sub", "__pycache__", ".git/objects", "pkg/__pycache__"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        for (file, text) in [
            ("app.py", "print('hi')\n"),
            ("pkg/__init__.py", ""),
            ("pkg/sub/data.json", "{}"),
            ("pkg/mod.pyc", "bytecode"),
            ("pkg/__pycache__/mod.cpython-311.pyc", "bytecode"),
            ("__pycache__/app.cpython-311.pyc", "bytecode"),
            (".git/HEAD", "ref"),
            (".env", "A=1"),
        ] {
            std::fs::write(d.join(file), text).unwrap();
        }
        dir
    }

    #[test]
    fn code_is_listed_without_caches_or_git() {
        let dir = tree();
        let code = collect(dir.path(), None).unwrap();
        let files: Vec<&str> = code.files.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(
            files,
            [".env", "app.py", "pkg/__init__.py", "pkg/sub/data.json"]
        );
        assert_eq!(code.bytes, 3 + 12 + 2);
    }

    #[test]
    fn symlinks_inside_are_kept_relative_and_escaping_ones_refused() {
        let dir = tree();
        let d = dir.path();
        symlink("../../app.py", d.join("pkg/sub/app_link.py")).unwrap();
        symlink(d.join("pkg"), d.join("pkg_abs")).unwrap();
        let code = collect(d, None).unwrap();
        assert_eq!(
            code.symlinks,
            [
                ("pkg/sub/app_link.py".to_owned(), "../../app.py".to_owned()),
                ("pkg_abs".to_owned(), "pkg".to_owned()),
            ]
        );

        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "x").unwrap();
        symlink(outside.path().join("secret"), d.join("leak")).unwrap();
        let err = collect(d, None).unwrap_err();
        assert!(matches!(err, CodeError::SymlinkEscapes { .. }), "{err}");
        std::fs::remove_file(d.join("leak")).unwrap();

        symlink("../../../../../../../../etc/passwd", d.join("pkg/up")).unwrap();
        assert!(matches!(
            collect(d, None),
            Err(CodeError::SymlinkEscapes { .. })
        ));
        std::fs::remove_file(d.join("pkg/up")).unwrap();

        symlink("nowhere", d.join("dangling")).unwrap();
        assert!(matches!(
            collect(d, None),
            Err(CodeError::DanglingSymlink { .. })
        ));
    }

    #[test]
    fn the_image_directory_inside_the_code_is_left_out() {
        let dir = tree();
        let d = dir.path();
        std::fs::create_dir(d.join("image")).unwrap();
        std::fs::write(d.join("image/initramfs.cpio.zst"), "old").unwrap();
        std::fs::create_dir(d.join(".image.tmp-1234")).unwrap();
        std::fs::write(d.join(".image.tmp-1234/x"), "partial").unwrap();
        let exclude = Exclude {
            parent: d.canonicalize().unwrap(),
            name: "image".into(),
        };
        let code = collect(d, Some(&exclude)).unwrap();
        assert!(code.files.iter().all(|(r, _)| !r.contains("image")));
    }

    #[test]
    fn not_a_directory_and_special_files_are_refused() {
        let dir = tree();
        let file = dir.path().join("app.py");
        assert!(matches!(
            collect(&file, None),
            Err(CodeError::NotADirectory { .. })
        ));
        assert!(matches!(
            collect(&dir.path().join("missing"), None),
            Err(CodeError::Read { .. })
        ));
        nix::unistd::mkfifo(
            &dir.path().join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        assert!(matches!(
            collect(dir.path(), None),
            Err(CodeError::SpecialFile { .. })
        ));
    }

    #[test]
    fn size_is_capped_at_lambdas_limit() {
        assert!(check_size(MAX_TASK_BYTES).is_ok());
        let err = check_size(MAX_TASK_BYTES + 1).unwrap_err();
        assert!(err.to_string().contains("250 MB"), "{err}");
        // A sparse file is as large as Lambda counts it.
        let dir = tree();
        let big = std::fs::File::create(dir.path().join("big.bin")).unwrap();
        big.set_len(MAX_TASK_BYTES + 1).unwrap();
        assert!(matches!(
            collect(dir.path(), None),
            Err(CodeError::TooLarge { .. })
        ));
    }
}

//! Building a guest's initramfs: a `newc` cpio archive (what the kernel unpacks into its rootfs),
//! optionally gzip- or zstd-compressed, holding the guest's init, its files, device nodes the
//! kernel needs before devtmpfs, and kernel modules with a load-order list for the guest agent.
//! Output is deterministic: the same inputs give the same bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cpio::newc::{Builder as NewcBuilder, ModeFileType};
use tracing::{debug, info};

use super::debian_kernel::DebianKernel;
use super::kconfig::{KernelConfig, KernelConfigError};
use super::modules::{ModuleCompression, ModuleIndexError, decompress_module};

/// The file, in `/lib/modules/<release>/`, listing the modules to load, one path (relative to
/// that directory) per line, every module after its dependencies.
pub const MODULES_LOAD_FILE: &str = "thaw-modules.load";
/// Where the kernel looks for the program to run as PID 1 in an initramfs.
pub const INIT_PATH: &str = "/init";
/// The permission bits a mode may hold (type bits come from the kind of entry).
const PERMISSION_BITS: u32 = 0o7777;
/// Mode of directories created implicitly as parents.
const IMPLICIT_DIR_MODE: u32 = 0o755;
// The tools' default levels: an initramfs may carry a whole language runtime (100 MB and more),
// and the kernel unpacks any level equally fast, so the highest levels would only slow builds.
const GZIP_LEVEL: u32 = 6;
const ZSTD_LEVEL: i32 = 3;

/// How the archive is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Compression {
    /// A plain cpio archive (every kernel with initramfs support unpacks it).
    None,
    /// gzip (`CONFIG_RD_GZIP`).
    Gzip,
    /// zstd (`CONFIG_RD_ZSTD`).
    Zstd,
}

impl Compression {
    /// All compressions, most preferred (smallest output) first.
    pub const PREFERENCE: [Self; 3] = [Self::Zstd, Self::Gzip, Self::None];

    /// The kernel option that lets the kernel unpack an initramfs compressed this way.
    pub fn config_option(self) -> Option<&'static str> {
        match self {
            Self::None => None,
            Self::Gzip => Some("CONFIG_RD_GZIP"),
            Self::Zstd => Some("CONFIG_RD_ZSTD"),
        }
    }

    /// Compresses `data`.
    pub fn compress(self, data: Vec<u8>) -> Result<Vec<u8>, InitramfsError> {
        let compress_err = |source| InitramfsError::Compress {
            compression: self,
            source,
        };
        match self {
            Self::None => Ok(data),
            Self::Gzip => {
                let mut encoder = flate2::GzBuilder::new().mtime(0).write(
                    Vec::with_capacity(data.len() / 2),
                    flate2::Compression::new(GZIP_LEVEL),
                );
                encoder.write_all(&data).map_err(compress_err)?;
                encoder.finish().map_err(compress_err)
            }
            Self::Zstd => zstd::encode_all(data.as_slice(), ZSTD_LEVEL).map_err(compress_err),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
        })
    }
}

impl FromStr for Compression {
    type Err = InitramfsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(Self::None),
            "gzip" | "gz" => Ok(Self::Gzip),
            "zstd" | "zst" => Ok(Self::Zstd),
            _ => Err(InitramfsError::UnknownCompression { name: s.to_owned() }),
        }
    }
}

/// The initramfs compressions the kernel built with `config` can unpack, most preferred first.
pub fn supported_compressions(config: &Path) -> Result<Vec<Compression>, InitramfsError> {
    Ok(supported_compressions_in(&KernelConfig::load(config)?))
}

/// [`supported_compressions`] for an already parsed config.
pub fn supported_compressions_in(config: &KernelConfig) -> Vec<Compression> {
    Compression::PREFERENCE
        .into_iter()
        .filter(|c| {
            c.config_option()
                .is_none_or(|option| config.is_builtin(option))
        })
        .collect()
}

/// Why an initramfs could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// A guest path that does not start with `/`.
    #[error("guest path {path:?} is not absolute")]
    RelativeGuestPath {
        /// The path.
        path: String,
    },
    /// A guest path with a `..` component.
    #[error("guest path {path:?} contains `..`")]
    ParentDirInGuestPath {
        /// The path.
        path: String,
    },
    /// A guest path that is otherwise unusable.
    #[error("guest path {path:?} is invalid: {reason}")]
    InvalidGuestPath {
        /// The path.
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// A mode with bits other than permission bits (`0o7777`).
    #[error("mode {mode:#o} for {path:?} has bits outside 0o7777")]
    InvalidMode {
        /// The guest path.
        path: String,
        /// The mode given.
        mode: u32,
    },
    /// A path added twice with different content, mode or kind.
    #[error("guest path {path:?} was already added with different content")]
    DuplicatePath {
        /// The path.
        path: String,
    },
    /// A path whose parent was added as something other than a directory.
    #[error("cannot add {path:?}: {parent:?} is not a directory")]
    ParentNotDirectory {
        /// The path being added.
        path: String,
        /// Its parent.
        parent: String,
    },
    /// A host file that could not be read.
    #[error("cannot read host file {}", path.display())]
    HostFileRead {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file too large for a newc archive (4 GiB).
    #[error("{path:?} is {size} bytes; a cpio newc entry holds at most 4 GiB")]
    FileTooLarge {
        /// The guest path.
        path: String,
        /// Its size.
        size: usize,
    },
    /// A module name that is neither a module of the kernel nor built in.
    #[error("kernel module {name:?} is neither in {}/modules.dep nor built in", modules_dir.display())]
    ModuleNotFound {
        /// The name asked for.
        name: String,
        /// The kernel's modules directory.
        modules_dir: PathBuf,
    },
    /// The kernel's modules could not be indexed or resolved.
    #[error("cannot resolve kernel modules")]
    Modules(#[source] ModuleIndexError),
    /// Modules of two different kernels in one initramfs.
    #[error("modules for kernel {new} cannot join those already added for kernel {existing}")]
    ModuleReleaseMismatch {
        /// The release already in the archive.
        existing: String,
        /// The release of the kernel now given.
        new: String,
    },
    /// The kernel config could not be read.
    #[error(transparent)]
    KernelConfig(#[from] KernelConfigError),
    /// A `HOST:GUEST[:MODE]` spec that does not parse.
    #[error("bad file spec {spec:?} (want HOST:GUEST[:MODE]): {reason}")]
    FileSpec {
        /// The spec.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A compression name that is not `zstd`, `gzip` or `none`.
    #[error("unknown compression {name:?} (want zstd, gzip or none)")]
    UnknownCompression {
        /// The name given.
        name: String,
    },
    /// Writing the cpio archive failed.
    #[error("cannot write the cpio archive")]
    Archive(#[source] io::Error),
    /// Compressing the archive failed.
    #[error("cannot {compression}-compress the archive")]
    Compress {
        /// The compression.
        compression: Compression,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the output file failed.
    #[error("cannot write {}", path.display())]
    Write {
        /// The output file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// One archive entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir { mode: u32, explicit: bool },
    File { data: Vec<u8>, mode: u32 },
    Symlink { target: String },
    CharDevice { major: u32, minor: u32, mode: u32 },
}

impl Node {
    fn is_dir(&self) -> bool {
        matches!(self, Self::Dir { .. })
    }
}

/// Modules added so far, for `/lib/modules/<release>/thaw-modules.load`.
#[derive(Debug, Clone)]
struct ModuleLoadList {
    release: String,
    modules: Vec<String>,
}

/// What [`InitramfsBuilder::add_kernel_modules`] added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelModulesAdded {
    /// The kernel release (`/lib/modules/<release>`).
    pub release: String,
    /// Module paths added, relative to `/lib/modules/<release>`, in load order.
    pub modules: Vec<String>,
    /// Requested modules the kernel has built in (normalized names), so not added.
    pub builtin: Vec<String>,
}

/// A `HOST:GUEST[:MODE]` file to copy into the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// The file on the host.
    pub host: PathBuf,
    /// The absolute path in the guest.
    pub guest: String,
    /// Permission bits; `None` keeps the host file's.
    pub mode: Option<u32>,
}

/// Parses `HOST:GUEST[:MODE]` (MODE in octal, e.g. `755` or `0o755`). HOST may itself contain
/// `:`; GUEST is the part from the last `:/`. Whatever follows a last `:` that has no `/` after it
/// is taken for MODE, so a GUEST ending in `:name` is refused rather than misread.
pub fn parse_file_spec(spec: &str) -> Result<FileSpec, InitramfsError> {
    let bad = |reason: &str| InitramfsError::FileSpec {
        spec: spec.to_owned(),
        reason: reason.to_owned(),
    };
    let (rest, mode) = match spec.rsplit_once(':') {
        Some((rest, last)) if !last.is_empty() && !last.contains('/') => {
            let digits = last.strip_prefix("0o").unwrap_or(last);
            let mode = u32::from_str_radix(digits, 8)
                .ok()
                .filter(|m| m & !PERMISSION_BITS == 0)
                .ok_or_else(|| bad("MODE must be octal permission bits, at most 7777"))?;
            (rest, Some(mode))
        }
        _ => (spec, None),
    };
    let (host, guest) = match rest.rfind(":/") {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None if rest.contains(':') => return Err(bad("GUEST must be an absolute path")),
        None => return Err(bad("missing :GUEST")),
    };
    if host.is_empty() {
        return Err(bad("HOST is empty"));
    }
    normalize_guest_path(guest)?;
    Ok(FileSpec {
        host: PathBuf::from(host),
        guest: guest.to_owned(),
        mode,
    })
}

/// Checks a guest path and returns it as it is stored in the archive: no leading `/`, no
/// repeated or trailing `/`.
fn normalize_guest_path(path: &str) -> Result<String, InitramfsError> {
    let invalid = |reason| InitramfsError::InvalidGuestPath {
        path: path.to_owned(),
        reason,
    };
    if !path.starts_with('/') {
        return Err(InitramfsError::RelativeGuestPath {
            path: path.to_owned(),
        });
    }
    if path.contains('\0') {
        return Err(invalid("it contains a NUL byte"));
    }
    let mut components = Vec::new();
    for component in path.split('/').filter(|c| !c.is_empty()) {
        match component {
            ".." => {
                return Err(InitramfsError::ParentDirInGuestPath {
                    path: path.to_owned(),
                });
            }
            "." => return Err(invalid("it contains a `.` component")),
            c => components.push(c),
        }
    }
    if components.is_empty() {
        return Err(invalid("it is the root directory, which always exists"));
    }
    Ok(components.join("/"))
}

/// Collects the entries of an initramfs and writes it as a newc cpio archive.
#[derive(Debug, Clone, Default)]
pub struct InitramfsBuilder {
    entries: BTreeMap<String, Node>,
    module_load_list: Option<ModuleLoadList>,
}

impl InitramfsBuilder {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds what a guest's PID 1 expects to find before it mounts anything: `/dev/console`
    /// (5:1, so the kernel can open the console for init before devtmpfs), and the mount
    /// points `/dev`, `/proc`, `/sys`, `/run` and `/tmp`.
    pub fn add_base_layout(&mut self) -> Result<&mut Self, InitramfsError> {
        self.add_dir("/dev", 0o755)?
            .add_char_device("/dev/console", 5, 1, 0o600)?
            .add_dir("/proc", 0o555)?
            .add_dir("/sys", 0o555)?
            .add_dir("/run", 0o755)?
            .add_dir("/tmp", 0o1777)
    }

    /// Adds a directory.
    pub fn add_dir(&mut self, guest_path: &str, mode: u32) -> Result<&mut Self, InitramfsError> {
        let mode = check_mode(guest_path, mode)?;
        self.insert(
            guest_path,
            Node::Dir {
                mode,
                explicit: true,
            },
        )
    }

    /// Adds a regular file with the given contents.
    pub fn add_file(
        &mut self,
        guest_path: &str,
        contents: impl Into<Vec<u8>>,
        mode: u32,
    ) -> Result<&mut Self, InitramfsError> {
        let mode = check_mode(guest_path, mode)?;
        let data = contents.into();
        if u32::try_from(data.len()).is_err() {
            return Err(InitramfsError::FileTooLarge {
                path: guest_path.to_owned(),
                size: data.len(),
            });
        }
        self.insert(guest_path, Node::File { data, mode })
    }

    /// Adds a regular file with the contents of a host file.
    pub fn add_file_from_host(
        &mut self,
        host_path: impl AsRef<Path>,
        guest_path: &str,
        mode: u32,
    ) -> Result<&mut Self, InitramfsError> {
        let data = read_host_file(host_path.as_ref())?;
        self.add_file(guest_path, data, mode)
    }

    /// Adds the file a [`FileSpec`] names; without a mode, the host file's permission bits.
    pub fn add_file_spec(&mut self, spec: &FileSpec) -> Result<&mut Self, InitramfsError> {
        let mode = match spec.mode {
            Some(mode) => mode,
            None => {
                std::fs::metadata(&spec.host)
                    .map_err(|source| InitramfsError::HostFileRead {
                        path: spec.host.clone(),
                        source,
                    })?
                    .permissions()
                    .mode()
                    & PERMISSION_BITS
            }
        };
        self.add_file_from_host(&spec.host, &spec.guest, mode)
    }

    /// Adds a symbolic link to `target` (stored as given; it may be relative).
    pub fn add_symlink(
        &mut self,
        guest_path: &str,
        target: &str,
    ) -> Result<&mut Self, InitramfsError> {
        if target.is_empty() || target.contains('\0') {
            return Err(InitramfsError::InvalidGuestPath {
                path: guest_path.to_owned(),
                reason: "a symlink target must be non-empty and free of NUL bytes",
            });
        }
        self.insert(
            guest_path,
            Node::Symlink {
                target: target.to_owned(),
            },
        )
    }

    /// Adds a character device node (e.g. `/dev/console`, 5:1).
    pub fn add_char_device(
        &mut self,
        guest_path: &str,
        major: u32,
        minor: u32,
        mode: u32,
    ) -> Result<&mut Self, InitramfsError> {
        let mode = check_mode(guest_path, mode)?;
        self.insert(guest_path, Node::CharDevice { major, minor, mode })
    }

    /// Adds the named modules of `kernel` and everything they depend on under
    /// `/lib/modules/<release>/` (same relative paths as in the kernel package), and lists them,
    /// dependencies first, in `/lib/modules/<release>/thaw-modules.load`. Names may use `-` or
    /// `_`; built-in modules are skipped and reported. A compressed module is kept compressed
    /// only if the kernel can decompress it itself (`CONFIG_MODULE_DECOMPRESS` and the matching
    /// `CONFIG_MODULE_COMPRESS_*`), and is stored decompressed (as `.ko`) otherwise.
    pub fn add_kernel_modules(
        &mut self,
        kernel: &DebianKernel,
        names: &[&str],
    ) -> Result<KernelModulesAdded, InitramfsError> {
        if let Some(list) = &self.module_load_list {
            if list.release != kernel.release {
                return Err(InitramfsError::ModuleReleaseMismatch {
                    existing: list.release.clone(),
                    new: kernel.release.clone(),
                });
            }
        }
        let index = kernel.module_index().map_err(InitramfsError::Modules)?;
        let resolution = index.resolve(names).map_err(|e| match e {
            ModuleIndexError::NotFound { name, modules_dir } => {
                InitramfsError::ModuleNotFound { name, modules_dir }
            }
            other => InitramfsError::Modules(other),
        })?;
        let config = kernel.kernel_config()?;
        let base = format!("/lib/modules/{}", kernel.release);
        let mut added = Vec::with_capacity(resolution.modules.len());
        for rel in &resolution.modules {
            let host = kernel.modules_dir.join(rel);
            let data = read_host_file(&host)?;
            let compression = ModuleCompression::of_path(rel).unwrap_or(ModuleCompression::None);
            let (guest_rel, data) = if compression.kernel_can_load(config.as_ref()) {
                (rel.clone(), data)
            } else {
                debug!(module = %rel, %compression, "the kernel cannot decompress it; storing it decompressed");
                let stem = rel.strip_suffix(compression.suffix()).unwrap_or(rel);
                let data =
                    decompress_module(&host, compression, data).map_err(InitramfsError::Modules)?;
                (format!("{stem}.ko"), data)
            };
            self.add_file(&format!("{base}/{guest_rel}"), data, 0o644)?;
            added.push(guest_rel);
        }
        let list = self.module_load_list.get_or_insert_with(|| ModuleLoadList {
            release: kernel.release.clone(),
            modules: Vec::new(),
        });
        for module in &added {
            if !list.modules.contains(module) {
                list.modules.push(module.clone());
            }
        }
        info!(
            release = %kernel.release,
            modules = added.len(),
            builtin = ?resolution.builtin,
            "added kernel modules"
        );
        Ok(KernelModulesAdded {
            release: kernel.release.clone(),
            modules: added,
            builtin: resolution.builtin,
        })
    }

    /// Adds `node` at `guest_path`, creating missing parent directories. Adding the same thing
    /// twice is allowed; anything else at an existing path is an error, except that an explicit
    /// directory replaces one that was created implicitly as a parent.
    fn insert(&mut self, guest_path: &str, node: Node) -> Result<&mut Self, InitramfsError> {
        let path = normalize_guest_path(guest_path)?;
        insert_into(&mut self.entries, guest_path, path, node)?;
        Ok(self)
    }

    /// All entries, the module load list included, in archive order.
    fn all_entries(&self) -> Result<BTreeMap<String, Node>, InitramfsError> {
        let mut entries = self.entries.clone();
        if let Some(list) = &self.module_load_list {
            let guest = format!("/lib/modules/{}/{MODULES_LOAD_FILE}", list.release);
            let mut text = list.modules.join("\n");
            text.push('\n');
            let path = normalize_guest_path(&guest)?;
            let node = Node::File {
                data: text.into_bytes(),
                mode: 0o644,
            };
            insert_into(&mut entries, &guest, path, node)?;
        }
        Ok(entries)
    }

    /// The uncompressed newc cpio archive: entries sorted by path (so every directory comes
    /// before what it holds), owned by root, mtime 0, then `TRAILER!!!`.
    pub fn cpio(&self) -> Result<Vec<u8>, InitramfsError> {
        let mut out = Vec::new();
        for (index, (path, node)) in self.all_entries()?.iter().enumerate() {
            // Unique while there are fewer than 2^32 entries, far more than memory holds.
            let ino = (index as u32).wrapping_add(1);
            let header = NewcBuilder::new(path).ino(ino).uid(0).gid(0).mtime(0);
            let (header, data) = match node {
                Node::Dir { mode, .. } => (
                    header
                        .mode(*mode)
                        .set_mode_file_type(ModeFileType::Directory)
                        .nlink(2),
                    &[][..],
                ),
                Node::File { data, mode } => (
                    header
                        .mode(*mode)
                        .set_mode_file_type(ModeFileType::Regular)
                        .nlink(1),
                    data.as_slice(),
                ),
                Node::Symlink { target } => (
                    header
                        .mode(0o777)
                        .set_mode_file_type(ModeFileType::Symlink)
                        .nlink(1),
                    target.as_bytes(),
                ),
                Node::CharDevice { major, minor, mode } => (
                    header
                        .mode(*mode)
                        .set_mode_file_type(ModeFileType::Char)
                        .nlink(1)
                        .rdev_major(*major)
                        .rdev_minor(*minor),
                    &[][..],
                ),
            };
            let size = u32::try_from(data.len()).map_err(|_| InitramfsError::FileTooLarge {
                path: path.clone(),
                size: data.len(),
            })?;
            let mut writer = header.write(out, size);
            writer.write_all(data).map_err(InitramfsError::Archive)?;
            out = writer.finish().map_err(InitramfsError::Archive)?;
        }
        cpio::newc::trailer(out).map_err(InitramfsError::Archive)
    }

    /// The archive, compressed.
    pub fn build(&self, compression: Compression) -> Result<Vec<u8>, InitramfsError> {
        compression.compress(self.cpio()?)
    }

    /// Writes the archive to `path` atomically: a temporary file in the same directory, synced,
    /// then renamed over `path`.
    pub fn write_to(&self, path: &Path, compression: Compression) -> Result<(), InitramfsError> {
        let data = self.build(compression)?;
        let write_err = |source| InitramfsError::Write {
            path: path.to_owned(),
            source,
        };
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".initramfs-")
            .tempfile_in(dir)
            .map_err(write_err)?;
        tmp.write_all(&data).map_err(write_err)?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(write_err)?;
        tmp.as_file().sync_all().map_err(write_err)?;
        tmp.persist(path).map_err(|e| write_err(e.error))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write_err)?;
        info!(path = %path.display(), bytes = data.len(), %compression, "wrote initramfs");
        Ok(())
    }
}

fn check_mode(guest_path: &str, mode: u32) -> Result<u32, InitramfsError> {
    if mode & !PERMISSION_BITS == 0 {
        Ok(mode)
    } else {
        Err(InitramfsError::InvalidMode {
            path: guest_path.to_owned(),
            mode,
        })
    }
}

fn read_host_file(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    std::fs::read(path).map_err(|source| InitramfsError::HostFileRead {
        path: path.to_owned(),
        source,
    })
}

fn insert_into(
    entries: &mut BTreeMap<String, Node>,
    guest_path: &str,
    path: String,
    node: Node,
) -> Result<(), InitramfsError> {
    // Parents first, each once.
    let mut end = 0;
    while let Some(slash) = path[end..].find('/') {
        let parent = &path[..end + slash];
        match entries.get(parent) {
            Some(existing) if existing.is_dir() => {}
            Some(_) => {
                return Err(InitramfsError::ParentNotDirectory {
                    path: guest_path.to_owned(),
                    parent: format!("/{parent}"),
                });
            }
            None => {
                entries.insert(
                    parent.to_owned(),
                    Node::Dir {
                        mode: IMPLICIT_DIR_MODE,
                        explicit: false,
                    },
                );
            }
        }
        end += slash + 1;
    }
    match entries.get(&path) {
        None => {}
        Some(Node::Dir {
            explicit: false, ..
        }) if node.is_dir() => {}
        Some(existing) if *existing == node => return Ok(()),
        Some(_) => {
            return Err(InitramfsError::DuplicatePath {
                path: guest_path.to_owned(),
            });
        }
    }
    entries.insert(path, node);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::guest_image::modules::tests::fake_modules_dir;

    /// One entry read back from an archive.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Parsed {
        name: String,
        mode: u32,
        ino: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    fn parse(mut archive: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        loop {
            let mut reader = cpio::NewcReader::new(archive).unwrap();
            let entry = reader.entry().clone();
            if entry.is_trailer() {
                break;
            }
            let mut data = Vec::new();
            reader.read_to_end(&mut data).unwrap();
            assert_eq!((entry.uid(), entry.gid(), entry.mtime()), (0, 0, 0));
            out.push(Parsed {
                name: entry.name().to_owned(),
                mode: entry.mode(),
                ino: entry.ino(),
                nlink: entry.nlink(),
                rdev: (entry.rdev_major(), entry.rdev_minor()),
                data,
            });
            archive = reader.finish().unwrap();
        }
        out
    }

    fn find<'a>(entries: &'a [Parsed], name: &str) -> &'a Parsed {
        entries
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("{name} not in {:?}", names(entries)))
    }

    fn names(entries: &[Parsed]) -> Vec<&str> {
        entries.iter().map(|e| e.name.as_str()).collect()
    }

    fn sample() -> InitramfsBuilder {
        let mut b = InitramfsBuilder::new();
        b.add_base_layout().unwrap();
        b.add_file("/init", b"#!/bin/sh\necho hi\n".to_vec(), 0o755)
            .unwrap()
            .add_dir("/etc", 0o700)
            .unwrap()
            .add_file("/etc/thaw/agent.conf", "vsock_port=1024\n", 0o640)
            .unwrap()
            .add_symlink("/bin/sh", "busybox")
            .unwrap();
        b
    }

    #[test]
    fn archive_reads_back_with_names_modes_and_contents() {
        let archive = sample().cpio().unwrap();
        let entries = parse(&archive);
        assert_eq!(
            names(&entries),
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "etc",
                "etc/thaw",
                "etc/thaw/agent.conf",
                "init",
                "proc",
                "run",
                "sys",
                "tmp"
            ]
        );
        assert_eq!(find(&entries, "init").mode, 0o100755);
        assert_eq!(find(&entries, "init").data, b"#!/bin/sh\necho hi\n");
        assert_eq!(find(&entries, "etc").mode, 0o040700);
        assert_eq!(find(&entries, "etc/thaw").mode, 0o040755, "implicit parent");
        assert_eq!(find(&entries, "etc/thaw").nlink, 2);
        assert_eq!(find(&entries, "etc/thaw/agent.conf").mode, 0o100640);
        assert_eq!(find(&entries, "tmp").mode, 0o041777);
        let sh = find(&entries, "bin/sh");
        assert_eq!(
            (sh.mode, sh.data.as_slice()),
            (0o120777, b"busybox".as_slice())
        );
        let console = find(&entries, "dev/console");
        assert_eq!((console.mode, console.rdev), (0o020600, (5, 1)));
        let mut inos: Vec<u32> = entries.iter().map(|e| e.ino).collect();
        inos.dedup();
        assert_eq!(inos.len(), entries.len(), "inode numbers are unique");
    }

    #[test]
    fn archive_ends_with_trailer_and_is_deterministic() {
        let a = sample().cpio().unwrap();
        assert_eq!(a, sample().cpio().unwrap());
        // The same entries added in another order give the same bytes.
        let mut b = InitramfsBuilder::new();
        b.add_symlink("/bin/sh", "busybox")
            .unwrap()
            .add_file("/etc/thaw/agent.conf", "vsock_port=1024\n", 0o640)
            .unwrap()
            .add_dir("/etc", 0o700)
            .unwrap()
            .add_file("/init", b"#!/bin/sh\necho hi\n".to_vec(), 0o755)
            .unwrap();
        b.add_base_layout().unwrap();
        assert_eq!(a, b.cpio().unwrap());
        assert_eq!(a.len() % 4, 0);
        let trailer = b"TRAILER!!!\0";
        let at = a
            .windows(trailer.len())
            .rposition(|w| w == trailer)
            .unwrap();
        assert!(a[at + trailer.len()..].iter().all(|&b| b == 0));
    }

    #[test]
    fn gzip_and_zstd_decompress_to_the_same_cpio() {
        let builder = sample();
        let cpio = builder.cpio().unwrap();
        assert_eq!(builder.build(Compression::None).unwrap(), cpio);
        let gz = builder.build(Compression::Gzip).unwrap();
        assert_eq!(&gz[..2], [0x1f, 0x8b]);
        let mut unpacked = Vec::new();
        flate2::read::GzDecoder::new(gz.as_slice())
            .read_to_end(&mut unpacked)
            .unwrap();
        assert_eq!(unpacked, cpio);
        let zst = builder.build(Compression::Zstd).unwrap();
        assert_eq!(&zst[..4], [0x28, 0xb5, 0x2f, 0xfd]);
        assert_eq!(zstd::decode_all(zst.as_slice()).unwrap(), cpio);
        assert_eq!(
            builder.build(Compression::Gzip).unwrap(),
            gz,
            "gzip output is stable"
        );
    }

    #[test]
    fn write_to_replaces_the_file_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("initramfs.img");
        std::fs::write(&out, b"old").unwrap();
        let builder = sample();
        builder.write_to(&out, Compression::Zstd).unwrap();
        let written = std::fs::read(&out).unwrap();
        assert_eq!(
            zstd::decode_all(written.as_slice()).unwrap(),
            builder.cpio().unwrap()
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn rejects_relative_guest_path() {
        let err = InitramfsBuilder::new()
            .add_file("init", vec![], 0o755)
            .unwrap_err();
        assert!(
            matches!(err, InitramfsError::RelativeGuestPath { .. }),
            "{err}"
        );
    }

    #[test]
    fn rejects_parent_dir_in_guest_path() {
        let err = InitramfsBuilder::new()
            .add_dir("/lib/../../etc", 0o755)
            .unwrap_err();
        assert!(
            matches!(err, InitramfsError::ParentDirInGuestPath { .. }),
            "{err}"
        );
        let err = InitramfsBuilder::new().add_dir("/", 0o755).unwrap_err();
        assert!(
            matches!(err, InitramfsError::InvalidGuestPath { .. }),
            "{err}"
        );
    }

    #[test]
    fn normalizes_repeated_and_trailing_slashes() {
        assert_eq!(normalize_guest_path("//usr///bin/").unwrap(), "usr/bin");
    }

    #[test]
    fn rejects_duplicate_path_with_different_content() {
        let mut b = InitramfsBuilder::new();
        b.add_file("/init", b"a".to_vec(), 0o755).unwrap();
        // The very same entry again is fine.
        b.add_file("/init", b"a".to_vec(), 0o755).unwrap();
        for err in [
            b.clone()
                .add_file("/init", b"b".to_vec(), 0o755)
                .unwrap_err(),
            b.clone()
                .add_file("/init", b"a".to_vec(), 0o700)
                .unwrap_err(),
            b.clone().add_dir("/init", 0o755).unwrap_err(),
        ] {
            assert!(matches!(err, InitramfsError::DuplicatePath { .. }), "{err}");
        }
    }

    #[test]
    fn explicit_dir_overrides_implicit_parent_but_not_another_explicit_dir() {
        let mut b = InitramfsBuilder::new();
        b.add_file("/etc/passwd", "root:x:0:0::/:/init\n", 0o644)
            .unwrap();
        b.add_dir("/etc", 0o711).unwrap();
        b.add_file("/etc/group", "root:x:0:\n", 0o644).unwrap();
        let entries = parse(&b.cpio().unwrap());
        assert_eq!(find(&entries, "etc").mode, 0o040711);
        assert_eq!(names(&entries).iter().filter(|n| **n == "etc").count(), 1);
        let err = b.add_dir("/etc", 0o755).unwrap_err();
        assert!(matches!(err, InitramfsError::DuplicatePath { .. }), "{err}");
    }

    #[test]
    fn rejects_entry_under_a_non_directory() {
        let mut b = InitramfsBuilder::new();
        b.add_file("/init", vec![], 0o755).unwrap();
        let err = b.add_file("/init/x", vec![], 0o644).unwrap_err();
        assert!(
            matches!(err, InitramfsError::ParentNotDirectory { .. }),
            "{err}"
        );
    }

    #[test]
    fn rejects_mode_with_file_type_bits() {
        let err = InitramfsBuilder::new()
            .add_file("/init", vec![], 0o100755)
            .unwrap_err();
        assert!(matches!(err, InitramfsError::InvalidMode { .. }), "{err}");
    }

    #[test]
    fn rejects_unreadable_host_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = InitramfsBuilder::new()
            .add_file_from_host(&missing, "/init", 0o755)
            .unwrap_err();
        assert!(
            matches!(&err, InitramfsError::HostFileRead { path, .. } if *path == missing),
            "{err}"
        );
    }

    #[test]
    fn file_spec_mode_defaults_to_the_host_file_mode() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("agent");
        std::fs::write(&host, b"\x7fELF").unwrap();
        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o750)).unwrap();
        let mut b = InitramfsBuilder::new();
        b.add_file_spec(&parse_file_spec(&format!("{}:/sbin/agent", host.display())).unwrap())
            .unwrap();
        b.add_file_spec(
            &parse_file_spec(&format!("{}:/sbin/agent2:0644", host.display())).unwrap(),
        )
        .unwrap();
        let entries = parse(&b.cpio().unwrap());
        assert_eq!(find(&entries, "sbin/agent").mode, 0o100750);
        assert_eq!(find(&entries, "sbin/agent").data, b"\x7fELF");
        assert_eq!(find(&entries, "sbin/agent2").mode, 0o100644);
    }

    #[test]
    fn parses_file_specs() {
        let spec = parse_file_spec("target/agent:/sbin/thaw-agent:0755").unwrap();
        assert_eq!(
            spec,
            FileSpec {
                host: PathBuf::from("target/agent"),
                guest: "/sbin/thaw-agent".to_owned(),
                mode: Some(0o755),
            }
        );
        let spec = parse_file_spec("./init:/init").unwrap();
        assert_eq!(
            (spec.host, spec.guest, spec.mode),
            (PathBuf::from("./init"), "/init".to_owned(), None)
        );
        let spec = parse_file_spec("dir:with:colons/f:/etc/f:0o600").unwrap();
        assert_eq!(spec.host, PathBuf::from("dir:with:colons/f"));
        assert_eq!(spec.mode, Some(0o600));
    }

    #[test]
    fn rejects_bad_file_specs() {
        for bad in [
            "host-only",
            ":/init",
            "a:relative",
            "a:/init:999",
            "a:/init:17777",
            "a:/init:rwx",
        ] {
            let err = parse_file_spec(bad).unwrap_err();
            assert!(
                matches!(err, InitramfsError::FileSpec { .. }),
                "{bad}: {err}"
            );
        }
        let err = parse_file_spec("a:/x/../init").unwrap_err();
        assert!(
            matches!(err, InitramfsError::ParentDirInGuestPath { .. }),
            "{err}"
        );
    }

    #[test]
    fn parses_compression_names() {
        assert_eq!("zstd".parse::<Compression>().unwrap(), Compression::Zstd);
        assert_eq!("GZIP".parse::<Compression>().unwrap(), Compression::Gzip);
        assert_eq!("none".parse::<Compression>().unwrap(), Compression::None);
        assert!(matches!(
            "lz4".parse::<Compression>().unwrap_err(),
            InitramfsError::UnknownCompression { .. }
        ));
        for c in Compression::PREFERENCE {
            assert_eq!(c.to_string().parse::<Compression>().unwrap(), c);
        }
    }

    #[test]
    fn supported_compressions_follow_rd_options() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        std::fs::write(&config, "CONFIG_RD_GZIP=y\n# CONFIG_RD_ZSTD is not set\n").unwrap();
        assert_eq!(
            supported_compressions(&config).unwrap(),
            [Compression::Gzip, Compression::None]
        );
        std::fs::write(&config, "CONFIG_RD_GZIP=y\nCONFIG_RD_ZSTD=y\n").unwrap();
        assert_eq!(
            supported_compressions(&config).unwrap(),
            Compression::PREFERENCE
        );
        let err = supported_compressions(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, InitramfsError::KernelConfig(_)), "{err}");
    }

    const RELEASE: &str = "6.1.0-99-cloud-amd64";

    /// A fake extracted kernel with vsock/virtio modules, `virtio` built in.
    fn fake_kernel(root: &Path, config: &str, compress: Option<ModuleCompression>) -> DebianKernel {
        let modules_dir = root.join("lib/modules").join(RELEASE);
        fake_modules_dir(
            &modules_dir,
            &[
                ("kernel/drivers/virtio/virtio_ring.ko", ""),
                ("kernel/drivers/virtio/virtio_mmio.ko", "virtio_ring"),
                ("kernel/net/vmw_vsock/vsock.ko", ""),
                (
                    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
                    "vsock",
                ),
                (
                    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
                    "vmw_vsock_virtio_transport_common,virtio_ring,vsock",
                ),
            ],
            &["kernel/drivers/virtio/virtio.ko"],
            compress.is_none(),
        );
        if let Some(compression) = compress {
            // Compress every module in place (index then comes from .modinfo).
            for rel in [
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio_mmio.ko",
            ] {
                let plain = modules_dir.join(rel);
                let data = std::fs::read(&plain).unwrap();
                let packed = match compression {
                    ModuleCompression::Zstd => zstd::encode_all(data.as_slice(), 3).unwrap(),
                    _ => unreachable!(),
                };
                std::fs::remove_file(&plain).unwrap();
                std::fs::write(modules_dir.join(format!("{rel}.zst")), packed).unwrap();
            }
        }
        std::fs::create_dir_all(root.join("boot")).unwrap();
        let config_path = root.join("boot").join(format!("config-{RELEASE}"));
        std::fs::write(&config_path, config).unwrap();
        DebianKernel {
            package: format!("linux-image-{RELEASE}"),
            package_version: "6.1.999-1".to_owned(),
            release: RELEASE.to_owned(),
            root: root.to_owned(),
            bzimage: root.join("boot").join(format!("vmlinuz-{RELEASE}")),
            modules_dir,
            config: Some(config_path),
        }
    }

    #[test]
    fn adds_kernel_modules_with_dependencies_and_load_list() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = fake_kernel(dir.path(), "CONFIG_MODULE_COMPRESS_NONE=y\n", None);
        let mut b = InitramfsBuilder::new();
        let added = b
            .add_kernel_modules(
                &kernel,
                &["virtio", "virtio-mmio", "vmw_vsock_virtio_transport"],
            )
            .unwrap();
        assert_eq!(added.builtin, ["virtio"]);
        assert_eq!(
            added.modules,
            [
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio_mmio.ko",
                "kernel/net/vmw_vsock/vsock.ko",
                "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
                "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
            ]
        );
        let entries = parse(&b.cpio().unwrap());
        let base = format!("lib/modules/{RELEASE}");
        let load = find(&entries, &format!("{base}/{MODULES_LOAD_FILE}"));
        assert_eq!(
            String::from_utf8(load.data.clone()).unwrap(),
            added.modules.join("\n") + "\n"
        );
        for rel in &added.modules {
            let entry = find(&entries, &format!("{base}/{rel}"));
            assert_eq!(entry.mode, 0o100644);
            assert_eq!(
                entry.data,
                std::fs::read(kernel.modules_dir.join(rel)).unwrap()
            );
        }
        // Each parent directory appears exactly once, before its children.
        let dirs: Vec<&str> = names(&entries)
            .into_iter()
            .filter(|n| {
                n.starts_with("lib/modules") && !n.ends_with(".ko") && !n.ends_with(".load")
            })
            .collect();
        let mut unique = dirs.clone();
        unique.dedup();
        assert_eq!(dirs, unique);

        // Adding more later extends the same load list without repeating modules.
        let more = b
            .add_kernel_modules(&kernel, &["vsock", "virtio_ring"])
            .unwrap();
        assert_eq!(more.modules.len(), 2);
        let entries = parse(&b.cpio().unwrap());
        let load = find(&entries, &format!("{base}/{MODULES_LOAD_FILE}"));
        assert_eq!(load.data.iter().filter(|&&c| c == b'\n').count(), 5);
    }

    #[test]
    fn rejects_unknown_module_name() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = fake_kernel(dir.path(), "", None);
        let err = InitramfsBuilder::new()
            .add_kernel_modules(&kernel, &["vsock", "not_a_module"])
            .unwrap_err();
        assert!(
            matches!(&err, InitramfsError::ModuleNotFound { name, .. } if name == "not_a_module"),
            "{err}"
        );
    }

    #[test]
    fn decompresses_modules_the_kernel_cannot_decompress() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = fake_kernel(
            dir.path(),
            "CONFIG_MODULE_COMPRESS_ZSTD=y\n",
            Some(ModuleCompression::Zstd),
        );
        let mut b = InitramfsBuilder::new();
        let added = b.add_kernel_modules(&kernel, &["virtio_mmio"]).unwrap();
        assert_eq!(
            added.modules,
            [
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio_mmio.ko"
            ]
        );
        let entries = parse(&b.cpio().unwrap());
        let ring = find(
            &entries,
            &format!("lib/modules/{RELEASE}/kernel/drivers/virtio/virtio_ring.ko"),
        );
        assert_eq!(&ring.data[..4], b"\x7fELF");
    }

    #[test]
    fn keeps_modules_compressed_when_the_kernel_can_decompress_them() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = fake_kernel(
            dir.path(),
            "CONFIG_MODULE_DECOMPRESS=y\nCONFIG_MODULE_COMPRESS_ZSTD=y\n",
            Some(ModuleCompression::Zstd),
        );
        let mut b = InitramfsBuilder::new();
        let added = b.add_kernel_modules(&kernel, &["virtio_mmio"]).unwrap();
        assert_eq!(
            added.modules,
            [
                "kernel/drivers/virtio/virtio_ring.ko.zst",
                "kernel/drivers/virtio/virtio_mmio.ko.zst"
            ]
        );
        let entries = parse(&b.cpio().unwrap());
        let ring = find(
            &entries,
            &format!("lib/modules/{RELEASE}/kernel/drivers/virtio/virtio_ring.ko.zst"),
        );
        assert_eq!(&ring.data[..4], [0x28, 0xb5, 0x2f, 0xfd]);
    }

    #[test]
    fn rejects_modules_of_a_second_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = fake_kernel(dir.path(), "", None);
        let mut other = kernel.clone();
        other.release = "6.1.0-1-cloud-amd64".to_owned();
        let mut b = InitramfsBuilder::new();
        b.add_kernel_modules(&kernel, &["vsock"]).unwrap();
        let err = b.add_kernel_modules(&other, &["vsock"]).unwrap_err();
        assert!(
            matches!(err, InitramfsError::ModuleReleaseMismatch { .. }),
            "{err}"
        );
    }
}

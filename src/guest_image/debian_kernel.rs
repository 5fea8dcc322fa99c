//! Debian's cloud kernel (`linux-image-cloud-amd64`: a bzImage with the 8250 serial console built
//! in, virtio and vsock as modules) for Linux guests. It is resolved and downloaded with apt, so it
//! comes from whichever mirror and signing keys the host already trusts (never a hard-coded URL),
//! unpacked with `dpkg-deb`, and cached per package version under the user's cache directory.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::kconfig::{KernelConfig, KernelConfigError};
use super::modules::{MODULES_DEP, ModuleIndex, ModuleIndexError};
use crate::apt::{self, Apt, AptError};

/// The Debian metapackage that always depends on the current cloud kernel.
pub const METAPACKAGE: &str = "linux-image-cloud-amd64";
/// The manifest written (last) into a complete cached extraction.
pub const MANIFEST: &str = "thaw-kernel.json";
/// The directory under the cache directory that holds the extracted kernels.
pub const CACHE_SUBDIR: &str = "debian-kernel";
const MANIFEST_FORMAT: u32 = 1;

/// A Debian kernel package, extracted into the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebianKernel {
    /// The versioned package, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    /// Its Debian version, e.g. `6.1.192-2`.
    pub package_version: String,
    /// The kernel release (`uname -r`), e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// Where the package is extracted.
    pub root: PathBuf,
    /// `root/boot/vmlinuz-<release>`.
    pub bzimage: PathBuf,
    /// `root/lib/modules/<release>` (or `root/usr/lib/modules/<release>`).
    pub modules_dir: PathBuf,
    /// `root/boot/config-<release>`, if the package ships it.
    pub config: Option<PathBuf>,
}

impl DebianKernel {
    /// The kernel's modules, by name, with their dependencies.
    pub fn module_index(&self) -> Result<ModuleIndex, ModuleIndexError> {
        ModuleIndex::load(&self.modules_dir)
    }

    /// The kernel's build configuration, if the package ships it.
    pub fn kernel_config(&self) -> Result<Option<KernelConfig>, KernelConfigError> {
        self.config.as_deref().map(KernelConfig::load).transpose()
    }
}

/// Why the kernel could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum KernelFetchError {
    /// None of the variables that locate the cache directory is set.
    #[error("no cache directory: set THAW_CACHE_DIR, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    /// apt could not resolve, download or unpack the kernel package.
    #[error(transparent)]
    Apt(#[from] AptError),
    /// The package holds no kernel image.
    #[error("the kernel package has no kernel image at {}", path.display())]
    MissingBzImage {
        /// Where the image was expected.
        path: PathBuf,
    },
    /// The kernel image is not a bzImage.
    #[error("{} is not a bzImage (no \"HdrS\" at offset 0x202)", path.display())]
    NotABzImage {
        /// The image.
        path: PathBuf,
    },
    /// The package holds no modules for its kernel.
    #[error("the kernel package has no lib/modules/{release} under {}", root.display())]
    MissingModulesDir {
        /// The extracted package.
        root: PathBuf,
        /// The kernel release.
        release: String,
    },
    /// The modules could not be indexed (to write `modules.dep`).
    #[error("cannot index the kernel's modules")]
    ModuleIndex(#[from] ModuleIndexError),
    /// The manifest could not be written.
    #[error("cannot write the cache manifest {}", path.display())]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The cache directory for this kernel is taken by something that is not a complete kernel.
    #[error("{} is in the way and holds no complete kernel; remove it and try again", path.display())]
    CacheOccupied {
        /// The directory.
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("I/O error on {}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KernelFetchError + '_ {
    move |source| KernelFetchError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What `thaw-kernel.json` records about a complete extraction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    package: String,
    package_version: String,
    release: String,
    deb_sha256: String,
    deb_size: u64,
    fetched_at_unix: u64,
    /// Paths relative to the extraction.
    bzimage: String,
    modules_dir: String,
    config: Option<String>,
    /// Whether `modules.dep` was written by Thaw (Debian leaves it to depmod at install time).
    modules_dep_generated: bool,
}

/// Where Thaw caches things: `$THAW_CACHE_DIR`, else `$XDG_CACHE_HOME/thaw`, else
/// `$HOME/.cache/thaw`.
pub fn default_cache_dir() -> Result<PathBuf, KernelFetchError> {
    cache_dir_from(
        std::env::var_os("THAW_CACHE_DIR"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
    .ok_or(KernelFetchError::NoCacheDir)
}

fn cache_dir_from(
    thaw: Option<OsString>,
    xdg: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    snapshot::xdg::resolve(thaw, xdg, home, ".cache").map(|r| match r {
        snapshot::xdg::Resolved::Explicit(dir) | snapshot::xdg::Resolved::Dir(dir) => dir,
    })
}

/// The most recently fetched complete kernel in the cache, without asking apt (for offline
/// use).
pub fn cached(cache_dir: &Path) -> Option<DebianKernel> {
    let dir = cache_dir.join(CACHE_SUBDIR);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) => {
            debug!(dir = %dir.display(), error = %e, "no cached kernels");
            return None;
        }
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| load_complete(&e.path()))
        .max_by(|(_, a), (_, b)| {
            a.fetched_at_unix
                .cmp(&b.fetched_at_unix)
                .then_with(|| a.package.cmp(&b.package))
        })
        .map(|(kernel, _)| kernel)
}

/// Resolves `linux-image-cloud-amd64` with apt to its current versioned kernel package and returns
/// it from the cache, downloading and extracting it first if it is not there.
pub fn fetch(cache_dir: &Path) -> Result<DebianKernel, KernelFetchError> {
    let mut apt = Apt::new();
    let (package, version) = resolve(&mut apt)?;
    let kernels_dir = cache_dir.join(CACHE_SUBDIR);
    let target = kernels_dir.join(cache_entry_name(&package, &version));
    if let Some((kernel, _)) = load_complete(&target) {
        if kernel.package == package && kernel.package_version == version {
            info!(%package, %version, dir = %target.display(), "kernel already cached");
            return Ok(kernel);
        }
    }
    fs::create_dir_all(&kernels_dir).map_err(io_err(&kernels_dir))?;
    if target.exists() && load_complete(&target).is_none() {
        warn!(dir = %target.display(), "removing an incomplete kernel extraction");
        discard(&kernels_dir, &target)?;
    }
    let staging = tempfile::Builder::new()
        .prefix(".staging-")
        .tempdir_in(&kernels_dir)
        .map_err(io_err(&kernels_dir))?;
    let root = download_and_extract(staging.path(), &package, &version, &mut apt)?;
    match fs::rename(&root, &target) {
        Ok(()) => {
            sync_dir(&kernels_dir)?;
            info!(%package, %version, dir = %target.display(), "kernel cached");
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOTEMPTY)) => {
            // Another process finished first; its extraction is as good as ours.
            debug!(dir = %target.display(), "another fetch cached this kernel first");
        }
        Err(e) => return Err(io_err(&target)(e)),
    }
    load_complete(&target)
        .map(|(kernel, _)| kernel)
        .ok_or(KernelFetchError::CacheOccupied { path: target })
}

/// The cache directory name of a package version (`:` from an epoch is not wanted in a path).
fn cache_entry_name(package: &str, version: &str) -> String {
    format!("{package}_{}", version.replace(':', "%3a"))
}

/// Moves `dir` out of the way (atomically) and deletes it.
fn discard(kernels_dir: &Path, dir: &Path) -> Result<(), KernelFetchError> {
    let trash = tempfile::Builder::new()
        .prefix(".trash-")
        .tempdir_in(kernels_dir)
        .map_err(io_err(kernels_dir))?;
    let inside = trash.path().join("old");
    match fs::rename(dir, &inside) {
        Ok(()) => {}
        // Someone else already moved it.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(dir)(e)),
    }
    trash.close().map_err(io_err(kernels_dir))
}

/// A complete extraction in `dir`, with its manifest, or `None` if there is none.
fn load_complete(dir: &Path) -> Option<(DebianKernel, Manifest)> {
    let manifest_path = dir.join(MANIFEST);
    let text = fs::read(&manifest_path).ok()?;
    let manifest: Manifest = match serde_json::from_slice(&text) {
        Ok(m) => m,
        Err(e) => {
            warn!(path = %manifest_path.display(), error = %e, "unreadable kernel manifest");
            return None;
        }
    };
    if manifest.format != MANIFEST_FORMAT {
        debug!(path = %manifest_path.display(), format = manifest.format, "other manifest format");
        return None;
    }
    let inside = |rel: &str| {
        let rel = Path::new(rel);
        let plain = rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        (plain && !rel.as_os_str().is_empty()).then(|| dir.join(rel))
    };
    let bzimage = inside(&manifest.bzimage).filter(|p| p.is_file())?;
    let modules_dir = inside(&manifest.modules_dir).filter(|p| p.is_dir())?;
    let config = match &manifest.config {
        Some(rel) => Some(inside(rel).filter(|p| p.is_file())?),
        None => None,
    };
    let kernel = DebianKernel {
        package: manifest.package.clone(),
        package_version: manifest.package_version.clone(),
        release: manifest.release.clone(),
        root: dir.to_owned(),
        bzimage,
        modules_dir,
        config,
    };
    Some((kernel, manifest))
}

/// Makes a directory's entries (renames into it) durable.
fn sync_dir(dir: &Path) -> Result<(), KernelFetchError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Resolves the metapackage to `(versioned kernel package, version)`.
fn resolve(apt: &mut Apt) -> Result<(String, String), KernelFetchError> {
    let meta_version = apt.candidate(METAPACKAGE)?;
    let resolve_err = |detail: String| {
        KernelFetchError::Apt(AptError::Resolve {
            package: METAPACKAGE.to_owned(),
            detail,
        })
    };
    let spec = format!("{METAPACKAGE}={meta_version}");
    let from_show = match apt.show(&spec)? {
        Some(text) => parse_show_kernel_dependency(&text, METAPACKAGE),
        None => {
            warn!(%spec, "`apt-cache show` failed");
            None
        }
    };
    let (package, version) = match from_show {
        Some(found) => found,
        None => {
            let package = parse_depends_kernel(&apt.depends(&[METAPACKAGE])?, METAPACKAGE)
                .ok_or_else(|| resolve_err("it depends on no linux-image-* package".to_owned()))?;
            (package, None)
        }
    };
    if release_of_package(&package).is_none() {
        return Err(resolve_err(format!(
            "{package} is not a linux-image-<release> package"
        )));
    }
    let version = match version {
        Some(version) => version,
        None => apt.candidate(&package)?,
    };
    info!(metapackage = METAPACKAGE, %package, %version, "resolved Debian kernel");
    Ok((package, version))
}

/// The `linux-image-*` package (and its `=` version, if pinned) in the `Depends:` of the first
/// stanza of `apt-cache show` output.
fn parse_show_kernel_dependency(text: &str, metapackage: &str) -> Option<(String, Option<String>)> {
    let depends = apt::stanza_field(text, "Depends")?;
    depends
        .split(',')
        .flat_map(|group| group.split('|'))
        .map(str::trim)
        .find_map(|dep| {
            let (name, constraint) = match dep.split_once('(') {
                Some((name, rest)) => (name.trim(), Some(rest.trim_end_matches(')').trim())),
                None => (dep, None),
            };
            let name = name.split(':').next().unwrap_or(name).trim();
            if !name.starts_with("linux-image-") || name == metapackage {
                return None;
            }
            let version = constraint
                .and_then(|c| c.strip_prefix('='))
                .filter(|rest| !rest.starts_with(['<', '>']))
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty());
            Some((name.to_owned(), version))
        })
}

/// The first real `linux-image-*` dependency in `apt-cache depends` output.
fn parse_depends_kernel(text: &str, metapackage: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.trim().trim_start_matches('|').split_once(':'))
        .filter(|(kind, _)| kind.trim() == "Depends" || kind.trim() == "PreDepends")
        .map(|(_, name)| name.trim())
        .filter(|name| !name.starts_with('<')) // virtual packages
        .map(|name| name.split(':').next().unwrap_or(name))
        .find(|name| name.starts_with("linux-image-") && *name != metapackage)
        .map(str::to_owned)
}

/// The kernel release a `linux-image-<release>` package ships.
fn release_of_package(package: &str) -> Option<&str> {
    package
        .strip_prefix("linux-image-")
        .filter(|r| !r.is_empty() && r.starts_with(|c: char| c.is_ascii_digit()))
}

/// Downloads and extracts `package=version` inside `staging`; returns the extraction, manifest
/// written and synced, ready to be renamed into place.
fn download_and_extract(
    staging: &Path,
    package: &str,
    version: &str,
    apt: &mut Apt,
) -> Result<PathBuf, KernelFetchError> {
    let download_dir = staging.join("download");
    fs::create_dir(&download_dir).map_err(io_err(&download_dir))?;
    let deb = apt.download(package, version, &download_dir)?;
    let root = staging.join("root");
    apt::extract(&deb.deb, &root)?;
    fs::remove_file(&deb.deb).map_err(io_err(&deb.deb))?;
    let (deb_sha256, deb_size) = (deb.sha256, deb.size);

    let expected_release = release_of_package(package).unwrap_or_default();
    let (release, bzimage) = find_bzimage(&root, expected_release)?;
    if !is_bzimage(&bzimage).map_err(io_err(&bzimage))? {
        return Err(KernelFetchError::NotABzImage { path: bzimage });
    }
    let modules_dir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|base| root.join(base).join(&release))
        .find(|dir| dir.is_dir())
        .ok_or_else(|| KernelFetchError::MissingModulesDir {
            root: root.clone(),
            release: release.clone(),
        })?;
    let config = Some(root.join("boot").join(format!("config-{release}"))).filter(|p| p.is_file());

    let dep_path = modules_dir.join(MODULES_DEP);
    let modules_dep_generated = !dep_path.exists();
    if modules_dep_generated {
        let index = ModuleIndex::load(&modules_dir)?;
        info!(
            modules = index.len(),
            "the package has no modules.dep; writing one from .modinfo"
        );
        let text = index.to_modules_dep()?;
        fs::write(&dep_path, text).map_err(io_err(&dep_path))?;
    }

    let relative = |p: &Path| {
        p.strip_prefix(&root)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned()
    };
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        package: package.to_owned(),
        package_version: version.to_owned(),
        release,
        deb_sha256,
        deb_size,
        fetched_at_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        bzimage: relative(&bzimage),
        modules_dir: relative(&modules_dir),
        config: config.as_deref().map(relative),
        modules_dep_generated,
    };
    // Everything extracted reaches the disk before the manifest that vouches for it.
    let root_dir = File::open(&root).map_err(io_err(&root))?;
    nix::unistd::syncfs(&root_dir).map_err(|e| io_err(&root)(e.into()))?;
    let manifest_path = root.join(MANIFEST);
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|source| KernelFetchError::Manifest {
            path: manifest_path.clone(),
            source,
        })?;
    let mut file = File::create(&manifest_path).map_err(io_err(&manifest_path))?;
    file.write_all(&json)
        .and_then(|()| file.sync_all())
        .map_err(io_err(&manifest_path))?;
    root_dir.sync_all().map_err(io_err(&root))?;
    Ok(root)
}

/// `(release, boot/vmlinuz-<release>)`: the expected release if its image is there, else the only
/// image the package has.
fn find_bzimage(
    root: &Path,
    expected_release: &str,
) -> Result<(String, PathBuf), KernelFetchError> {
    let boot = root.join("boot");
    let expected = boot.join(format!("vmlinuz-{expected_release}"));
    if expected.is_file() {
        return Ok((expected_release.to_owned(), expected));
    }
    let images: Vec<(String, PathBuf)> = fs::read_dir(&boot)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let release = name.strip_prefix("vmlinuz-")?.to_owned();
            Some((release, e.path()))
        })
        .collect();
    match images.as_slice() {
        [(release, path)] => {
            warn!(%release, expected = %expected_release, "kernel release differs from the package name");
            Ok((release.clone(), path.clone()))
        }
        _ => Err(KernelFetchError::MissingBzImage { path: expected }),
    }
}

/// Whether `path` starts like an x86 bzImage: the boot protocol's `HdrS` magic at 0x202.
pub fn is_bzimage(path: &Path) -> io::Result<bool> {
    let mut header = [0u8; 0x206];
    match File::open(path)?.read_exact(&mut header) {
        Ok(()) => Ok(&header[0x202..] == b"HdrS"),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_image::GUEST_MODULES;

    const SHOW: &str = "Package: linux-image-cloud-amd64\nSource: linux-signed-amd64 (6.1.192+2)\n\
        Version: 6.1.192-2\nProvides: linux-latest-modules-6.1.0-56-cloud-amd64, wireguard-modules (= 1.0.0)\n\
        Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\nSHA256: 00be21c0\n\n\
        Package: linux-image-cloud-amd64\nVersion: 6.1.176-1\n\
        Depends: linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)\n\n";

    #[test]
    fn parses_pinned_kernel_dependency_from_first_show_stanza() {
        assert_eq!(
            parse_show_kernel_dependency(SHOW, METAPACKAGE),
            Some((
                "linux-image-6.1.0-56-cloud-amd64".to_owned(),
                Some("6.1.192-2".to_owned())
            ))
        );
        let folded = "Package: x\nDepends: initramfs-tools | linux-initramfs-tool,\n \
            linux-image-6.12.9-cloud-amd64:amd64 (>= 6.12.9)\n";
        assert_eq!(
            parse_show_kernel_dependency(folded, METAPACKAGE),
            Some(("linux-image-6.12.9-cloud-amd64".to_owned(), None))
        );
        assert_eq!(
            parse_show_kernel_dependency("Package: x\n", METAPACKAGE),
            None
        );
    }

    #[test]
    fn parses_kernel_from_apt_cache_depends() {
        let text = "linux-image-cloud-amd64\n  Depends: <linux-image-virtual>\n \
            |Depends: linux-image-6.1.0-56-cloud-amd64\n  Recommends: firmware\n";
        assert_eq!(
            parse_depends_kernel(text, METAPACKAGE).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(
            parse_depends_kernel("x\n  Depends: libc6\n", METAPACKAGE),
            None
        );
    }

    #[test]
    fn release_comes_from_the_package_name() {
        assert_eq!(
            release_of_package("linux-image-6.1.0-56-cloud-amd64"),
            Some("6.1.0-56-cloud-amd64")
        );
        assert_eq!(release_of_package("linux-image-cloud-amd64"), None);
        assert_eq!(
            release_of_package("linux-headers-6.1.0-56-cloud-amd64"),
            None
        );
    }

    #[test]
    fn cache_dir_prefers_thaw_then_xdg_then_home() {
        let s = |v: &str| Some(OsString::from(v));
        assert_eq!(
            cache_dir_from(s("/c/thaw-own"), s("/xdg"), s("/home/u")),
            Some(PathBuf::from("/c/thaw-own"))
        );
        assert_eq!(
            cache_dir_from(None, s("/xdg"), s("/home/u")),
            Some(PathBuf::from("/xdg/thaw"))
        );
        assert_eq!(
            cache_dir_from(s(""), s("relative"), s("/home/u")),
            Some(PathBuf::from("/home/u/.cache/thaw"))
        );
        assert_eq!(cache_dir_from(None, None, None), None);
    }

    /// Writes a fake complete extraction for `cached`/`load_complete` tests.
    fn fake_extraction(
        kernels_dir: &Path,
        package: &str,
        version: &str,
        fetched_at_unix: Option<u64>,
    ) -> PathBuf {
        let release = release_of_package(package).unwrap();
        let dir = kernels_dir.join(cache_entry_name(package, version));
        fs::create_dir_all(dir.join("boot")).unwrap();
        fs::create_dir_all(dir.join("lib/modules").join(release)).unwrap();
        let mut image = vec![0u8; 0x300];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        fs::write(dir.join("boot").join(format!("vmlinuz-{release}")), image).unwrap();
        if let Some(fetched_at_unix) = fetched_at_unix {
            let manifest = Manifest {
                format: MANIFEST_FORMAT,
                package: package.to_owned(),
                package_version: version.to_owned(),
                release: release.to_owned(),
                deb_sha256: "00".repeat(32),
                deb_size: 1,
                fetched_at_unix,
                bzimage: format!("boot/vmlinuz-{release}"),
                modules_dir: format!("lib/modules/{release}"),
                config: None,
                modules_dep_generated: true,
            };
            fs::write(dir.join(MANIFEST), serde_json::to_vec(&manifest).unwrap()).unwrap();
        }
        dir
    }

    #[test]
    fn cached_returns_the_most_recently_fetched_complete_kernel() {
        let cache = tempfile::tempdir().unwrap();
        let kernels = cache.path().join(CACHE_SUBDIR);
        assert_eq!(cached(cache.path()), None);
        fake_extraction(
            &kernels,
            "linux-image-6.1.0-50-cloud-amd64",
            "6.1.176-1",
            Some(20),
        );
        fake_extraction(
            &kernels,
            "linux-image-6.1.0-9-cloud-amd64",
            "6.1.27-1",
            Some(10),
        );
        // Fetched last, but incomplete (no manifest): ignored.
        fake_extraction(
            &kernels,
            "linux-image-6.1.0-60-cloud-amd64",
            "6.1.200-1",
            None,
        );
        let kernel = cached(cache.path()).unwrap();
        assert_eq!(kernel.package_version, "6.1.176-1");
        assert_eq!(kernel.release, "6.1.0-50-cloud-amd64");
        assert!(is_bzimage(&kernel.bzimage).unwrap());
        assert_eq!(kernel.config, None);
    }

    #[test]
    fn manifest_paths_may_not_leave_the_extraction() {
        let cache = tempfile::tempdir().unwrap();
        let dir = fake_extraction(
            cache.path(),
            "linux-image-6.1.0-1-cloud-amd64",
            "6.1.1-1",
            Some(1),
        );
        let mut manifest: Manifest =
            serde_json::from_slice(&fs::read(dir.join(MANIFEST)).unwrap()).unwrap();
        assert!(load_complete(&dir).is_some());
        manifest.bzimage = "../../etc/passwd".to_owned();
        fs::write(dir.join(MANIFEST), serde_json::to_vec(&manifest).unwrap()).unwrap();
        assert!(load_complete(&dir).is_none());
    }

    #[test]
    fn discard_removes_an_incomplete_extraction() {
        let cache = tempfile::tempdir().unwrap();
        let dir = fake_extraction(
            cache.path(),
            "linux-image-6.1.0-1-cloud-amd64",
            "6.1.1-1",
            None,
        );
        discard(cache.path(), &dir).unwrap();
        assert!(!dir.exists());
        assert_eq!(fs::read_dir(cache.path()).unwrap().count(), 0);
    }

    #[test]
    fn bzimage_check_needs_hdrs_magic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        fs::write(&path, vec![0u8; 0x300]).unwrap();
        assert!(!is_bzimage(&path).unwrap());
        fs::write(&path, b"short").unwrap();
        assert!(!is_bzimage(&path).unwrap());
    }

    /// Fetches the real kernel with apt (into `$THAW_CACHE_DIR` or the default cache, so later runs
    /// hit the cache) and checks it is a bzImage whose modules cover what a Thaw guest needs.
    #[test]
    fn fetches_debian_cloud_kernel_with_apt() {
        for tool in ["apt-get", "apt-cache", "dpkg-deb"] {
            let found = std::env::var_os("PATH")
                .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(tool).is_file()));
            assert!(
                found,
                "`{tool}` is not on PATH: this test fetches Debian's kernel with apt and needs a \
                 Debian-based machine"
            );
        }
        let cache = default_cache_dir().unwrap_or_else(|_| std::env::temp_dir().join("thaw-cache"));
        let kernel = fetch(&cache).unwrap_or_else(|e| panic!("fetch failed: {e:#?}"));
        assert!(kernel.package.starts_with("linux-image-"), "{kernel:?}");
        assert!(kernel.release.ends_with("-cloud-amd64"), "{kernel:?}");
        assert!(is_bzimage(&kernel.bzimage).unwrap(), "{kernel:?}");
        assert!(
            kernel.config.is_some(),
            "Debian ships boot/config-<release>"
        );
        assert!(kernel.modules_dir.join(MODULES_DEP).is_file());

        // A second fetch hits the cache, and `cached` agrees.
        assert_eq!(fetch(&cache).unwrap(), kernel);
        assert_eq!(cached(&cache).unwrap(), kernel);

        let index = kernel.module_index().unwrap();
        let resolution = index.resolve(GUEST_MODULES).unwrap();
        for name in GUEST_MODULES {
            let normalized = crate::guest_image::modules::normalize_module_name(name);
            let as_module = resolution
                .modules
                .iter()
                .any(|p| crate::guest_image::modules::normalize_module_name(p) == normalized);
            assert!(
                as_module || resolution.builtin.contains(&normalized),
                "{name} is neither a module nor built in"
            );
        }

        // And they go into an initramfs with their load list.
        let mut initramfs = crate::guest_image::InitramfsBuilder::new();
        let added = initramfs
            .add_kernel_modules(&kernel, GUEST_MODULES)
            .unwrap();
        assert_eq!(added.modules, resolution.modules);
        assert!(!initramfs.cpio().unwrap().is_empty());
    }
}

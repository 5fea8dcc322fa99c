//! The nested host's programs, from Debian: QEMU (`qemu-system-x86`, whose TCG emulates AMD SVM
//! with nested paging, and whose `virtiofsd` shares the host's files), SeaBIOS and busybox.
//! They are unpacked, never installed: Debian's QEMU may conflict with what the host has (a
//! backported `qemu-utils` breaks bookworm's `qemu-system-common`), so the packages and the
//! libraries they need that the host lacks are unpacked into one directory of the cache and
//! run from there with `LD_LIBRARY_PATH`.
//!
//! The cache entry is named by a digest of the package set (names and versions), so a new QEMU
//! in Debian, or a host that gained or lost a library, gets its own entry. An entry is complete
//! when its manifest exists; it is built in a staging directory and renamed into place.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::info;

use super::NestedHostError;
use crate::apt::{self, Apt};

/// What the nested host is built from; their dependencies come along.
pub const ROOT_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static"];
/// The directory under the cache directory that holds the unpacked package sets.
pub const CACHE_SUBDIR: &str = "nested-host";
/// Written last into a complete package set.
const MANIFEST: &str = "thaw-packages.json";
const MANIFEST_FORMAT: u32 = 1;

/// One unpacked package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageRecord {
    /// The package.
    pub package: String,
    /// Its version.
    pub version: String,
    /// The `.deb`'s SHA-256, as checked against apt's index.
    pub sha256: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    packages: Vec<PackageRecord>,
}

/// An unpacked, complete package set.
#[derive(Debug, Clone)]
pub struct Packages {
    /// The root the packages were unpacked into.
    pub root: PathBuf,
    /// What it holds.
    pub packages: Vec<PackageRecord>,
}

impl Packages {
    /// `qemu-system-x86_64`.
    pub fn qemu(&self) -> PathBuf {
        self.root.join("usr/bin/qemu-system-x86_64")
    }

    /// QEMU's `virtiofsd` (the C one that QEMU 7.2 still ships).
    pub fn virtiofsd(&self) -> PathBuf {
        self.root.join("usr/lib/qemu/virtiofsd")
    }

    /// The static busybox.
    pub fn busybox(&self) -> PathBuf {
        self.root.join("bin/busybox")
    }

    /// Where QEMU finds its firmware (SeaBIOS, the option ROM that loads `-kernel`).
    pub fn firmware_dirs(&self) -> [PathBuf; 2] {
        [
            self.root.join("usr/share/qemu"),
            self.root.join("usr/share/seabios"),
        ]
    }

    /// `LD_LIBRARY_PATH` for the unpacked programs: the unpacked libraries, then whatever the
    /// host's loader finds itself.
    pub fn library_path(&self) -> OsString {
        let dirs = ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"].map(|d| self.root.join(d));
        std::env::join_paths(dirs).unwrap_or_default()
    }

    /// The version of `package` in this set.
    pub fn version_of(&self, package: &str) -> Option<&str> {
        self.packages
            .iter()
            .find(|p| p.package == package)
            .map(|p| p.version.as_str())
    }

    fn check(&self) -> Result<(), NestedHostError> {
        for program in [self.qemu(), self.virtiofsd(), self.busybox()] {
            if !program.is_file() {
                return Err(NestedHostError::PackageContent { path: program });
            }
        }
        Ok(())
    }
}

/// The package set for this host, from the cache or fetched with apt into it.
pub fn fetch(cache_dir: &Path) -> Result<Packages, NestedHostError> {
    let mut apt = Apt::new();
    let wanted = apt.missing_closure(ROOT_PACKAGES)?;
    let dir = cache_dir.join(CACHE_SUBDIR);
    let target = dir.join(format!("packages-{}", set_digest(&wanted)));
    if let Some(packages) = load_complete(&target) {
        packages.check()?;
        return Ok(packages);
    }
    fs::create_dir_all(&dir).map_err(NestedHostError::io(&dir))?;
    if target.exists() {
        // An interrupted unpack: nothing vouches for it.
        fs::remove_dir_all(&target).map_err(NestedHostError::io(&target))?;
    }
    let staging = tempfile::Builder::new()
        .prefix(".staging-")
        .tempdir_in(&dir)
        .map_err(NestedHostError::io(&dir))?;
    let downloads = staging.path().join("debs");
    let root = staging.path().join("root");
    fs::create_dir_all(&downloads).map_err(NestedHostError::io(&downloads))?;
    info!(
        packages = wanted.len(),
        dir = %target.display(),
        "fetching the nested host's packages with apt"
    );
    let mut records = Vec::new();
    for (package, version) in &wanted {
        let deb = apt.download(package, version, &downloads)?;
        apt::extract(&deb.deb, &root)?;
        fs::remove_file(&deb.deb).map_err(NestedHostError::io(&deb.deb))?;
        records.push(PackageRecord {
            package: deb.package,
            version: deb.version,
            sha256: deb.sha256,
        });
    }
    let packages = Packages {
        root: root.clone(),
        packages: records,
    };
    packages.check()?;
    write_manifest(&root, &packages.packages)?;
    match fs::rename(&root, &target) {
        Ok(()) => {}
        // Another process finished first; its set is as good as ours.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOTEMPTY)) => {}
        Err(e) => return Err(NestedHostError::io(&target)(e)),
    }
    load_complete(&target).ok_or(NestedHostError::PackageContent {
        path: target.join(MANIFEST),
    })
}

/// A digest naming the set: the same packages at the same versions give the same name.
fn set_digest(wanted: &[(String, String)]) -> String {
    let text: String = wanted.iter().map(|(p, v)| format!("{p}={v}\n")).collect();
    crate::digest::sha256_hex(text.as_bytes())[..16].to_owned()
}

fn write_manifest(root: &Path, packages: &[PackageRecord]) -> Result<(), NestedHostError> {
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        packages: packages.to_vec(),
    };
    let path = root.join(MANIFEST);
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| NestedHostError::Io {
        path: path.clone(),
        source: e.into(),
    })?;
    // Everything unpacked reaches the disk before the manifest that vouches for it.
    let root_dir = fs::File::open(root).map_err(NestedHostError::io(root))?;
    nix::unistd::syncfs(&root_dir).map_err(|e| NestedHostError::io(root)(e.into()))?;
    let mut file = fs::File::create(&path).map_err(NestedHostError::io(&path))?;
    file.write_all(&json)
        .and_then(|()| file.sync_all())
        .map_err(NestedHostError::io(&path))?;
    root_dir.sync_all().map_err(NestedHostError::io(root))
}

fn load_complete(dir: &Path) -> Option<Packages> {
    let text = fs::read(dir.join(MANIFEST)).ok()?;
    let manifest: Manifest = serde_json::from_slice(&text).ok()?;
    (manifest.format == MANIFEST_FORMAT).then(|| Packages {
        root: dir.to_owned(),
        packages: manifest.packages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(p, v)| ((*p).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_set_digest_changes_with_any_package_or_version() {
        let a = set_digest(&set(&[("qemu-system-x86", "1:7.2"), ("libfdt1", "1.6")]));
        assert_eq!(a.len(), 16);
        assert_eq!(
            a,
            set_digest(&set(&[("qemu-system-x86", "1:7.2"), ("libfdt1", "1.6")]))
        );
        assert_ne!(
            a,
            set_digest(&set(&[("qemu-system-x86", "1:7.3"), ("libfdt1", "1.6")]))
        );
        assert_ne!(a, set_digest(&set(&[("qemu-system-x86", "1:7.2")])));
    }

    #[test]
    fn only_a_set_with_its_manifest_is_complete() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_complete(dir.path()).is_none());
        let records = vec![PackageRecord {
            package: "busybox-static".into(),
            version: "1:1.35".into(),
            sha256: "00".repeat(32),
        }];
        write_manifest(dir.path(), &records).unwrap();
        let packages = load_complete(dir.path()).unwrap();
        assert_eq!(packages.version_of("busybox-static"), Some("1:1.35"));
        // Complete but missing its programs: refused when used.
        assert!(matches!(
            packages.check(),
            Err(NestedHostError::PackageContent { .. })
        ));
        fs::write(dir.path().join(MANIFEST), b"{not json").unwrap();
        assert!(load_complete(dir.path()).is_none());
    }
}

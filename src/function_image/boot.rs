//! Booting a function image (`thaw snapshot create --function IMAGE_DIR`): its manifest says
//! which Debian kernel its modules were built for, and that exact release must boot it (a
//! module of another release does not load, and without virtio and vsock the agent never
//! reaches the host). The kernel comes from the cache when it matches, else from apt.

use std::path::{Path, PathBuf};

use crate::guest_image::{DebianKernel, KernelFetchError};

use super::manifest::{Manifest, ManifestError};

/// The image cannot be booted.
#[derive(Debug, thiserror::Error)]
pub enum BootImageError {
    /// Not a directory.
    #[error("--function {}: not a function image directory", path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// Its manifest or initramfs is unusable.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// No kernel matches, and fetching one failed.
    #[error(
        "the image was built for kernel {wanted}; {cached}, and fetching Debian's cloud kernel \
         failed"
    )]
    Fetch {
        /// The image's release.
        wanted: String,
        /// What the cache holds.
        cached: String,
        /// Why fetching failed (boxed: it is large, and rare).
        #[source]
        source: Box<KernelFetchError>,
    },
    /// The kernel available is another release than the image's.
    #[error(
        "the image was built for kernel {wanted} ({package} {version}), but Debian's cloud \
         kernel is now {available}; rebuild the image with `thaw function build` so its modules \
         match"
    )]
    KernelMismatch {
        /// The image's release.
        wanted: String,
        /// The image's kernel package.
        package: String,
        /// Its version.
        version: String,
        /// The release available.
        available: String,
    },
}

/// The kernel command line a function boots with unless `--cmdline` says otherwise: Thaw's
/// default for Linux, `quiet`. The console is the function's log (thawd returns it as Lambda
/// does), where kernel messages have no place, and every console byte is an exit to the VMM.
pub fn default_cmdline() -> String {
    format!("{} quiet", vmm_core::config::DEFAULT_LINUX_CMDLINE)
}

/// What booting an image needs.
#[derive(Debug, Clone)]
pub struct FunctionBoot {
    /// The image's manifest.
    pub manifest: Manifest,
    /// The kernel it was built for.
    pub kernel: DebianKernel,
    /// The image's initramfs, checked against the manifest.
    pub initrd: PathBuf,
}

/// Reads the image in `dir`, checks its initramfs, and finds its kernel in `cache_dir`
/// (fetching it with apt when the cache lacks it).
pub fn prepare(dir: &Path, cache_dir: &Path) -> Result<FunctionBoot, BootImageError> {
    if !dir.is_dir() {
        return Err(BootImageError::NotADirectory {
            path: dir.to_owned(),
        });
    }
    let manifest = Manifest::read(dir)?;
    let initrd = manifest.verified_initramfs(dir)?;
    let kernel = choose_kernel(&manifest, crate::guest_image::cached(cache_dir), || {
        crate::guest_image::fetch(cache_dir)
    })?;
    Ok(FunctionBoot {
        manifest,
        kernel,
        initrd,
    })
}

/// The cached kernel if it is the image's release, else the fetched one if it is; an error
/// naming both releases otherwise.
pub fn choose_kernel(
    manifest: &Manifest,
    cached: Option<DebianKernel>,
    fetch: impl FnOnce() -> Result<DebianKernel, KernelFetchError>,
) -> Result<DebianKernel, BootImageError> {
    let wanted = &manifest.kernel;
    if let Some(kernel) = &cached {
        if kernel.release == wanted.release {
            return Ok(kernel.clone());
        }
    }
    let kernel = fetch().map_err(|source| BootImageError::Fetch {
        source: Box::new(source),
        wanted: wanted.release.clone(),
        cached: match &cached {
            Some(k) => format!("the cache holds {}", k.release),
            None => "the kernel cache is empty".into(),
        },
    })?;
    if kernel.release != wanted.release {
        return Err(BootImageError::KernelMismatch {
            wanted: wanted.release.clone(),
            package: wanted.package.clone(),
            version: wanted.version.clone(),
            available: kernel.release,
        });
    }
    if kernel.package_version != wanted.version {
        tracing::warn!(
            image = %wanted.version,
            kernel = %kernel.package_version,
            release = %kernel.release,
            "the kernel package's version differs from the image's; same release, so its modules load"
        );
    }
    Ok(kernel)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::function_image::manifest::tests::sample;

    fn kernel(release: &str) -> DebianKernel {
        DebianKernel {
            package: format!("linux-image-{release}"),
            package_version: "6.1.192-3".into(),
            release: release.into(),
            root: "/cache".into(),
            bzimage: "/cache/vmlinuz".into(),
            modules_dir: "/cache/modules".into(),
            config: None,
        }
    }

    const RELEASE: &str = "6.1.0-57-cloud-amd64";

    #[test]
    fn a_matching_cached_kernel_is_used_without_fetching() {
        let manifest = sample(b"x");
        let got = choose_kernel(&manifest, Some(kernel(RELEASE)), || {
            panic!("must not fetch")
        })
        .unwrap();
        assert_eq!(got.release, RELEASE);
    }

    #[test]
    fn otherwise_the_fetched_kernel_must_match() {
        let manifest = sample(b"x");
        let old = Some(kernel("6.1.0-50-cloud-amd64"));
        let got = choose_kernel(&manifest, old.clone(), || Ok(kernel(RELEASE))).unwrap();
        assert_eq!(got.release, RELEASE);
        let err = choose_kernel(&manifest, old, || Ok(kernel("6.1.0-60-cloud-amd64"))).unwrap_err();
        assert!(
            matches!(err, BootImageError::KernelMismatch { .. }),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(RELEASE) && text.contains("6.1.0-60"),
            "{text}"
        );
        assert!(text.contains("thaw function build"), "{text}");
        let err = choose_kernel(&manifest, None, || Err(KernelFetchError::NoCacheDir)).unwrap_err();
        assert!(matches!(err, BootImageError::Fetch { .. }), "{err}");
    }

    #[test]
    fn a_directory_without_a_manifest_is_not_an_image() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            prepare(dir.path(), dir.path()),
            Err(BootImageError::Manifest(ManifestError::Read { .. }))
        ));
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        assert!(matches!(
            prepare(&file, dir.path()),
            Err(BootImageError::NotADirectory { .. })
        ));
    }
}

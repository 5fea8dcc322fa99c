//! `function-image.json`, the manifest that makes a directory a function image: what was built
//! (function, runtime, handler, Python and the distributions installed), for which kernel (the
//! modules inside only load on that exact release), and the initramfs with its size and SHA-256.
//! `thaw snapshot create --function` boots from it, and `thaw function build --replace` replaces
//! only directories that hold a valid one, so reading is strict: any doubt is an error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::spec::{Handler, Runtime};

/// The manifest's file name in an image directory.
pub const MANIFEST_FILE: &str = "function-image.json";
/// The manifest format this build writes and reads.
pub const FORMAT: u32 = 1;
/// The initramfs file names an image may have (by compression).
pub const INITRAMFS_FILES: &[&str] = &["initramfs.cpio.zst", "initramfs.cpio.gz", "initramfs.cpio"];

/// A manifest that cannot be read or trusted.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not the JSON a manifest is.
    #[error("{} is not a function image manifest", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A format this build does not know.
    #[error(
        "{} has format {found}; this thaw reads format {FORMAT} (rebuild the image with this \
         thaw)",
        path.display()
    )]
    Format {
        /// The file.
        path: PathBuf,
        /// The format it says.
        found: u64,
    },
    /// A field with a value no build writes.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The initramfs is not the one the manifest describes.
    #[error(
        "{} is not the initramfs this image was built with ({reason}); rebuild the image",
        path.display()
    )]
    InitramfsChanged {
        /// The file.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
}

/// The distributions an image carries: name → version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Distributions {
    /// The runtime's packages, in its site-packages under `/var/lang`.
    pub runtime: BTreeMap<String, String>,
    /// The function's requirements, in `/var/task`.
    pub function: BTreeMap<String, String>,
}

/// The Debian kernel the image's modules are for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelInfo {
    /// The versioned package (`linux-image-6.1.0-57-cloud-amd64`).
    pub package: String,
    /// Its Debian version (`6.1.192-3`).
    pub version: String,
    /// The kernel release (`6.1.0-57-cloud-amd64`).
    pub release: String,
}

/// The image's initramfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitramfsInfo {
    /// Its file name in the image directory.
    pub file: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
}

/// What `function-image.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// `thaw <version>`.
    pub built_by: String,
    /// The function's name.
    pub function_name: String,
    /// `python3.X`.
    pub runtime: String,
    /// `module.function`.
    pub handler: String,
    /// The bundled CPython's full version (`3.11.7`).
    pub python_version: String,
    /// What pip installed.
    pub distributions: Distributions,
    /// The kernel it was built for.
    pub kernel: KernelInfo,
    /// The initramfs.
    pub initramfs: InitramfsInfo,
}

impl Manifest {
    /// The manifest as written: pretty JSON with a final newline.
    pub fn to_json(&self) -> String {
        // A struct of strings, maps and numbers always serializes.
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        text
    }

    /// Reads and checks `dir/function-image.json`.
    pub fn read(dir: &Path) -> Result<Self, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read(&path).map_err(|source| ManifestError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text, &path)
    }

    /// Parses and checks a manifest's bytes (`path` is for messages).
    pub fn parse(text: &[u8], path: &Path) -> Result<Self, ManifestError> {
        // The format first, so a newer manifest says so instead of "unknown field".
        let value: serde_json::Value =
            serde_json::from_slice(text).map_err(|source| ManifestError::Parse {
                path: path.to_owned(),
                source,
            })?;
        let invalid = |reason: String| ManifestError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let format = value
            .get("format")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| invalid("it has no format number".into()))?;
        if format != u64::from(FORMAT) {
            return Err(ManifestError::Format {
                path: path.to_owned(),
                found: format,
            });
        }
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|source| ManifestError::Parse {
                path: path.to_owned(),
                source,
            })?;
        manifest
            .runtime
            .parse::<Runtime>()
            .map_err(|e| invalid(e.to_string()))?;
        manifest
            .handler
            .parse::<Handler>()
            .map_err(|e| invalid(e.to_string()))?;
        if !INITRAMFS_FILES.contains(&manifest.initramfs.file.as_str()) {
            return Err(invalid(format!(
                "initramfs file {:?} is not one of {INITRAMFS_FILES:?}",
                manifest.initramfs.file
            )));
        }
        let sha = &manifest.initramfs.sha256;
        if sha.len() != 64
            || !sha
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(invalid(format!(
                "initramfs sha256 {sha:?} is not 64 hex digits"
            )));
        }
        if manifest.kernel.release.is_empty() || manifest.kernel.release.contains('/') {
            return Err(invalid(format!(
                "kernel release {:?} is not a release",
                manifest.kernel.release
            )));
        }
        Ok(manifest)
    }

    /// The initramfs of the image in `dir`, checked against the manifest's size and SHA-256.
    pub fn verified_initramfs(&self, dir: &Path) -> Result<PathBuf, ManifestError> {
        let path = dir.join(&self.initramfs.file);
        let read_err = |source| ManifestError::Read {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(read_err)?;
        let (sha256, size) = crate::digest::sha256_of(file).map_err(read_err)?;
        let changed = |reason| ManifestError::InitramfsChanged {
            path: path.clone(),
            reason,
        };
        if size != self.initramfs.size {
            return Err(changed(format!(
                "{size} bytes, the manifest says {}",
                self.initramfs.size
            )));
        }
        if sha256 != self.initramfs.sha256 {
            return Err(changed(format!(
                "SHA-256 {sha256}, the manifest says {}",
                self.initramfs.sha256
            )));
        }
        Ok(path)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    pub(crate) fn sample(initramfs: &[u8]) -> Manifest {
        let (sha256, size) = crate::digest::sha256_of(initramfs).unwrap();
        Manifest {
            format: FORMAT,
            built_by: "thaw 0.1.0".into(),
            function_name: "hello".into(),
            runtime: "python3.11".into(),
            handler: "app.handler".into(),
            python_version: "3.11.7".into(),
            distributions: Distributions {
                runtime: [("awslambdaric".to_owned(), "4.2.2".to_owned())].into(),
                function: [("tabulate".to_owned(), "0.9.0".to_owned())].into(),
            },
            kernel: KernelInfo {
                package: "linux-image-6.1.0-57-cloud-amd64".into(),
                version: "6.1.192-3".into(),
                release: "6.1.0-57-cloud-amd64".into(),
            },
            initramfs: InitramfsInfo {
                file: "initramfs.cpio.zst".into(),
                size,
                sha256,
            },
        }
    }

    #[test]
    fn round_trips_through_json() {
        let manifest = sample(b"archive");
        let text = manifest.to_json();
        assert!(text.ends_with('\n'));
        let back = Manifest::parse(text.as_bytes(), Path::new("m.json")).unwrap();
        assert_eq!(back, manifest);
    }

    #[test]
    fn the_initramfs_is_checked_against_size_and_digest() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = sample(b"archive");
        std::fs::write(dir.path().join("initramfs.cpio.zst"), b"archive").unwrap();
        assert_eq!(
            manifest.verified_initramfs(dir.path()).unwrap(),
            dir.path().join("initramfs.cpio.zst")
        );
        std::fs::write(dir.path().join("initramfs.cpio.zst"), b"archivE").unwrap();
        let err = manifest.verified_initramfs(dir.path()).unwrap_err();
        assert!(err.to_string().contains("SHA-256"), "{err}");
        std::fs::write(dir.path().join("initramfs.cpio.zst"), b"arch").unwrap();
        let err = manifest.verified_initramfs(dir.path()).unwrap_err();
        assert!(err.to_string().contains("4 bytes"), "{err}");
        std::fs::remove_file(dir.path().join("initramfs.cpio.zst")).unwrap();
        assert!(matches!(
            manifest.verified_initramfs(dir.path()),
            Err(ManifestError::Read { .. })
        ));
    }

    #[test]
    fn bad_manifests_are_refused_with_the_reason() {
        let path = Path::new("m.json");
        let good = serde_json::to_value(sample(b"x")).unwrap();
        let with = |key: &str, value: serde_json::Value| {
            let mut v = good.clone();
            v[key] = value;
            serde_json::to_vec(&v).unwrap()
        };
        assert!(matches!(
            Manifest::parse(b"not json", path),
            Err(ManifestError::Parse { .. })
        ));
        assert!(matches!(
            Manifest::parse(b"{}", path),
            Err(ManifestError::Invalid { .. })
        ));
        assert!(matches!(
            Manifest::parse(&with("format", 2.into()), path),
            Err(ManifestError::Format { found: 2, .. })
        ));
        assert!(matches!(
            Manifest::parse(&with("runtime", "nodejs20.x".into()), path),
            Err(ManifestError::Invalid { .. })
        ));
        assert!(matches!(
            Manifest::parse(&with("handler", "nodot".into()), path),
            Err(ManifestError::Invalid { .. })
        ));
        assert!(matches!(
            Manifest::parse(&with("extra", 1.into()), path),
            Err(ManifestError::Parse { .. })
        ));
        let mut v = good.clone();
        v["initramfs"]["file"] = "../../etc/passwd".into();
        assert!(matches!(
            Manifest::parse(&serde_json::to_vec(&v).unwrap(), path),
            Err(ManifestError::Invalid { .. })
        ));
        let mut v = good.clone();
        v["initramfs"]["sha256"] = "00".into();
        assert!(matches!(
            Manifest::parse(&serde_json::to_vec(&v).unwrap(), path),
            Err(ManifestError::Invalid { .. })
        ));
        let mut v = good;
        v["kernel"]["release"] = "../x".into();
        assert!(matches!(
            Manifest::parse(&serde_json::to_vec(&v).unwrap(), path),
            Err(ManifestError::Invalid { .. })
        ));
    }
}

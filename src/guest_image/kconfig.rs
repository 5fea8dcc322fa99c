//! Reading a kernel's `.config` (Debian ships it as `/boot/config-<release>`): the guest image
//! builder asks it which initramfs compressions and module compressions the kernel can unpack.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

/// The `CONFIG_*` options of one kernel build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelConfig {
    options: BTreeMap<String, String>,
}

/// A kernel config file that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read kernel config {}", path.display())]
pub struct KernelConfigError {
    /// The config file.
    pub path: PathBuf,
    /// Why it could not be read.
    #[source]
    pub source: io::Error,
}

impl KernelConfig {
    /// Reads and parses a kernel config file.
    pub fn load(path: &Path) -> Result<Self, KernelConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| KernelConfigError {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self::parse(&text))
    }

    /// Parses the text of a kernel config. Lines that are not `CONFIG_X=value` (comments, `# CONFIG_X
    /// is not set`, blank lines) are skipped: an option that is not set is simply absent.
    pub fn parse(text: &str) -> Self {
        let options = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.split_once('='))
            .filter(|(name, _)| name.starts_with("CONFIG_"))
            .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
            .collect();
        Self { options }
    }

    /// The raw value of `name` (with the `CONFIG_` prefix), quotes included, if it is set.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.options.get(name).map(String::as_str)
    }

    /// Whether `name` is built in (`=y`).
    pub fn is_builtin(&self, name: &str) -> bool {
        self.value(name) == Some("y")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_set_options_and_skips_unset_ones() {
        let config = KernelConfig::parse(
            "# comment\nCONFIG_RD_GZIP=y\n# CONFIG_RD_ZSTD is not set\nCONFIG_VSOCKETS=m\n\
             CONFIG_MODULE_SIG_HASH=\"sha256\"\n\n",
        );
        assert!(config.is_builtin("CONFIG_RD_GZIP"));
        assert!(!config.is_builtin("CONFIG_RD_ZSTD"));
        assert_eq!(config.value("CONFIG_RD_ZSTD"), None);
        assert!(!config.is_builtin("CONFIG_VSOCKETS"));
        assert_eq!(config.value("CONFIG_VSOCKETS"), Some("m"));
        assert_eq!(config.value("CONFIG_MODULE_SIG_HASH"), Some("\"sha256\""));
    }

    #[test]
    fn missing_config_file_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config-none");
        let err = KernelConfig::load(&path).unwrap_err();
        assert_eq!(err.path, path);
        assert_eq!(err.source.kind(), io::ErrorKind::NotFound);
    }
}

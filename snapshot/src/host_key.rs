//! Which master key seals or opens a snapshot on this host: the one the user named, else the
//! host key. Snapshots are encrypted by default, so the first `thaw snapshot create` on a host
//! makes the host key (0600, atomically) and later commands (and thawd's workers) find it in
//! the same place.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::{KeyError, MasterKey, ReadError, Snapshot};

/// The host key file: `$THAW_KEY_FILE`, else `$XDG_CONFIG_HOME/thaw/host.key`, else
/// `~/.config/thaw/host.key`.
pub fn default_key_file() -> Option<PathBuf> {
    key_file_from(
        std::env::var_os("THAW_KEY_FILE"),
        std::env::var_os("XDG_CONFIG_HOME"),
        std::env::var_os("HOME"),
    )
}

fn key_file_from(
    thaw: Option<OsString>,
    xdg: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    crate::xdg::resolve(thaw, xdg, home, ".config").map(|dir_or_file| match dir_or_file {
        crate::xdg::Resolved::Explicit(file) => file,
        crate::xdg::Resolved::Dir(dir) => dir.join("host.key"),
    })
}

/// No key could be had.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    /// No `--key-file`, and neither `$XDG_CONFIG_HOME` nor `$HOME` says where the default is.
    #[error("no --key-file given and no default key location (set HOME or THAW_KEY_FILE)")]
    NoLocation,
    /// The key file is unusable.
    #[error("key file {}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: KeyError,
    },
}

fn resolve(explicit: Option<&Path>) -> Result<PathBuf, HostKeyError> {
    explicit
        .map(Path::to_path_buf)
        .or_else(default_key_file)
        .ok_or(HostKeyError::NoLocation)
}

/// The key to seal a new snapshot with: `explicit`, else the host key, created if missing.
pub fn for_sealing(explicit: Option<&Path>) -> Result<MasterKey, HostKeyError> {
    let path = resolve(explicit)?;
    let key = match explicit {
        // A key the user named must exist: a typo must not silently make a new key.
        Some(_) => MasterKey::load(&path),
        None => {
            if let Some(dir) = path.parent() {
                // Best effort: load_or_create reports the real failure.
                let _ = std::fs::create_dir_all(dir);
            }
            MasterKey::load_or_create(&path)
        }
    };
    key.map_err(|source| HostKeyError::Key { path, source })
}

/// Where the key to open a snapshot came from.
pub enum KeyChoice {
    /// `--key-file`: the snapshot must be sealed with it.
    Given(MasterKey),
    /// The host key, found in its default place: used if the snapshot is encrypted.
    HostDefault(MasterKey),
    /// No key.
    None,
}

impl KeyChoice {
    /// The key, whichever way it was chosen.
    pub fn master(&self) -> Option<&MasterKey> {
        match self {
            KeyChoice::Given(key) | KeyChoice::HostDefault(key) => Some(key),
            KeyChoice::None => None,
        }
    }

    /// [`KeyChoice::master`], by value.
    pub fn into_master(self) -> Option<MasterKey> {
        match self {
            KeyChoice::Given(key) | KeyChoice::HostDefault(key) => Some(key),
            KeyChoice::None => None,
        }
    }
}

impl Snapshot {
    /// Opens (and authenticates) the snapshot at `dir` with the key `key` names. A plaintext
    /// snapshot is refused when a key was given explicitly — the user expects an encrypted one,
    /// and a flipped protection field must not downgrade it silently — but opened without the
    /// host's default key.
    pub fn open_with(dir: &Path, key: &KeyChoice) -> Result<Snapshot, ReadError> {
        Self::open_with_observing(dir, key, &mut |_| {})
    }

    /// [`Snapshot::open_with`], telling `on_header` the machine's size once the header is
    /// authenticated (see [`Snapshot::open_observing`]).
    pub fn open_with_observing(
        dir: &Path,
        key: &KeyChoice,
        on_header: &mut dyn FnMut(crate::MachineSize),
    ) -> Result<Snapshot, ReadError> {
        match key {
            KeyChoice::Given(k) => Snapshot::open_observing(dir, Some(k), on_header),
            KeyChoice::None => Snapshot::open_observing(dir, None, on_header),
            // The first attempt is refused before its header is read, so `on_header` is still
            // called at most once.
            KeyChoice::HostDefault(k) => match Snapshot::open_observing(dir, Some(k), on_header) {
                Err(ReadError::PlaintextWithKey) => Snapshot::open_observing(dir, None, on_header),
                other => other,
            },
        }
    }
}

/// The key to open a snapshot with: `explicit`, else the host key if there is one (a plaintext
/// snapshot needs none).
pub fn for_opening(explicit: Option<&Path>) -> Result<KeyChoice, HostKeyError> {
    let load =
        |path: PathBuf| MasterKey::load(&path).map_err(|source| HostKeyError::Key { path, source });
    Ok(match explicit {
        Some(p) => KeyChoice::Given(load(p.to_path_buf())?),
        None => match default_key_file() {
            Some(p) if p.exists() => KeyChoice::HostDefault(load(p)?),
            _ => KeyChoice::None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_location_follows_xdg() {
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(
            key_file_from(os("/k"), os("/x"), os("/h")),
            Some(PathBuf::from("/k"))
        );
        assert_eq!(
            key_file_from(None, os("/x"), os("/h")),
            Some(PathBuf::from("/x/thaw/host.key"))
        );
        assert_eq!(
            key_file_from(None, os("relative"), os("/h")),
            Some(PathBuf::from("/h/.config/thaw/host.key"))
        );
        assert_eq!(key_file_from(None, None, None), None);
    }

    #[test]
    fn a_named_key_file_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.key");
        assert!(matches!(
            for_sealing(Some(&missing)),
            Err(HostKeyError::Key { .. })
        ));
        assert!(!missing.exists());
    }
}

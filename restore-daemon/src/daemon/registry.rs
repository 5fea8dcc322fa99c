//! Registering the configured functions: every snapshot is verified when thawd starts — header,
//! state and manifest authenticated, every memory chunk's tag checked, this host checked
//! against its fingerprint, its machine state decoded — and its memory size must be the one
//! configured. A function whose snapshot fails is not served, and thawd refuses to start, so a
//! tampered or foreign snapshot is found before any invocation.

use std::path::PathBuf;

use crate::decoded_copy::CopySizes;
use crate::restore::{RestoreError, open_checked};
use snapshot::KeyChoice;

use super::config::FunctionConfig;

/// A function's snapshot could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Its key file could not be loaded.
    #[error("function {function}: cannot load key file {}", path.display())]
    Key {
        /// The function.
        function: String,
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: snapshot::KeyError,
    },
    /// The snapshot was refused.
    #[error("function {function}: snapshot {} refused", path.display())]
    Snapshot {
        /// The function.
        function: String,
        /// The snapshot.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<RestoreError>,
    },
    /// The snapshot's memory size is not the configured one.
    #[error(
        "function {function}: memory_mib is {configured} but the snapshot's guest has {snapshot} MiB"
    )]
    MemorySize {
        /// The function.
        function: String,
        /// In the config.
        configured: u64,
        /// In the snapshot.
        snapshot: u64,
    },
    /// The local copy of its store snapshot holds another snapshot.
    #[error("function {function}: {} holds snapshot {held}, not {expected}", path.display())]
    CopyOfAnother {
        /// The function.
        function: String,
        /// The copy.
        path: PathBuf,
        /// The snapshot it holds.
        held: snapshot::SnapshotId,
        /// The one the config names.
        expected: snapshot::SnapshotId,
    },
    /// Its snapshot is in a store and could not be pulled.
    #[error("function {function}: cannot pull its snapshot {url}")]
    Store {
        /// The function.
        function: String,
        /// The snapshot's URL.
        url: String,
        /// Why.
        #[source]
        source: Box<store::StoreError>,
    },
    /// Its snapshot is in a store, and no master key opens it.
    #[error(
        "function {function}: its snapshot is in a store, where it is sealed: give key_file, or \
         make a host key (thaw snapshot create does)"
    )]
    NoStoreKey {
        /// The function.
        function: String,
    },
    /// The host cache of chunk objects could not be opened.
    #[error("the chunk cache (store_dir/chunks)")]
    ChunkCache(#[source] store::CacheError),
    /// The directory of store snapshots' copies could not be used.
    #[error("cannot use {} for store snapshots", path.display())]
    StoreDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What thawd knows of a registered function's snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotShape {
    /// The snapshot registered (its header's id): workers refuse any other file.
    pub id: snapshot::SnapshotId,
    /// Guest memory, bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// What a decoded copy of its memory holds at most.
    pub copy_sizes: CopySizes,
}

/// The key to open `function`'s snapshot with: its key file, else none (the caller resolves the
/// host key into `key_file` before registering, so workers get an explicit path too).
pub fn key_for(function: &FunctionConfig) -> Result<KeyChoice, RegistryError> {
    match &function.key_file {
        Some(path) => snapshot::MasterKey::load(path)
            .map(KeyChoice::Given)
            .map_err(|source| RegistryError::Key {
                function: function.name.clone(),
                path: path.clone(),
                source,
            }),
        None => Ok(KeyChoice::None),
    }
}

/// Verifies `function`'s snapshot completely (every chunk too) and returns its shape.
pub fn register(function: &FunctionConfig) -> Result<SnapshotShape, RegistryError> {
    let key = key_for(function)?;
    let refused = |source: RestoreError| RegistryError::Snapshot {
        function: function.name.clone(),
        path: function.snapshot.clone(),
        source: Box::new(source),
    };
    let (snap, state) = open_checked(&function.snapshot, &key).map_err(refused)?;
    snap.authenticate_chunks().map_err(|source| {
        refused(RestoreError::Chunk {
            path: function.snapshot.clone(),
            source,
        })
    })?;
    if let Some(url) = &function.store
        && snap.id() != url.id
    {
        return Err(RegistryError::CopyOfAnother {
            function: function.name.clone(),
            path: function.snapshot.clone(),
            held: snap.id(),
            expected: url.id,
        });
    }
    let snapshot_mib = state.mem_bytes >> 20;
    if snapshot_mib != function.memory_mib || state.mem_bytes % (1 << 20) != 0 {
        return Err(RegistryError::MemorySize {
            function: function.name.clone(),
            configured: function.memory_mib,
            snapshot: snapshot_mib,
        });
    }
    Ok(SnapshotShape {
        id: snap.id(),
        mem_bytes: state.mem_bytes,
        // A valid state has 1 to 255 vCPUs.
        vcpus: u8::try_from(state.vcpus.len()).unwrap_or(u8::MAX),
        // The snapshot authenticated and its state describes its regions, so its chunks lie in
        // them; a failure here would only cost the function its shared copy.
        copy_sizes: CopySizes::of(&snap).unwrap_or_default(),
    })
}

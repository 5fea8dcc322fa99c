//! thawd's copies of snapshots that live in an S3-compatible store (a function's
//! `snapshot = "s3://…/snapshots/<id>"`): before the function is registered, its snapshot is
//! pulled (`store::Store::pull`) into `store_dir/snapshots/<id>` unless thawd already holds it
//! there, through the host's cache of sealed chunk objects in `store_dir/chunks`, so objects
//! that another function's snapshot, an earlier pull, or an earlier thawd fetched are not
//! fetched again. From there on the function is served as one with a local snapshot: verified
//! completely at registration, opened by jailed workers (which have no network), decoded into
//! its shared copy.
//!
//! Why a local copy rather than each worker reading the store: workers run in their own network
//! namespace with nothing of the host but their snapshot's files, and registration
//! authenticates every chunk of a snapshot before thawd serves it, which needs every object
//! anyway. A snapshot id names one immutable snapshot, so a copy held is never stale; one that
//! fails verification (altered on this disk) is removed and pulled again, once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use snapshot::MasterKey;
use store::{CacheStats, ObjectCache, ObjectStats, Store, StoreOptions};

use super::config::{Config, FunctionConfig};
use super::registry::RegistryError;

/// What pulling store snapshots cost, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreTotals {
    /// Snapshots pulled, and objects fetched from a store or taken from the host cache.
    pub pulls: u64,
    pub objects: ObjectStats,
    /// The host cache after registration; `None` without one.
    pub cache: Option<CacheStats>,
}

/// The store side of registration: one client per store URL, the host cache, and what the
/// pulls cost.
pub struct StoreCopies {
    dir: PathBuf,
    cache: Option<Arc<ObjectCache>>,
    stores: HashMap<String, Store>,
    totals: StoreTotals,
}

impl StoreCopies {
    /// Opens the host cache if any function's snapshot is in a store (nothing is created
    /// otherwise).
    pub fn open(config: &Config) -> Result<StoreCopies, RegistryError> {
        let any = config.functions.values().any(|f| f.store.is_some());
        let cache = match (any, config.chunk_cache_budget) {
            (true, budget) if budget > 0 => Some(Arc::new(
                ObjectCache::open(&config.store_dir.join("chunks"), budget)
                    .map_err(RegistryError::ChunkCache)?,
            )),
            _ => None,
        };
        Ok(StoreCopies {
            dir: config.store_dir.join("snapshots"),
            cache,
            stores: HashMap::new(),
            totals: StoreTotals::default(),
        })
    }

    /// Makes sure `function`'s local copy is there, pulling it if need be; `again` removes
    /// the copy held first (it failed verification). Returns whether it pulled.
    pub fn ensure(
        &mut self,
        function: &FunctionConfig,
        master: Option<&MasterKey>,
        again: bool,
    ) -> Result<bool, RegistryError> {
        let Some(url) = &function.store else {
            return Ok(false);
        };
        let failed = |source| RegistryError::Store {
            function: function.name.clone(),
            url: url.to_string(),
            source: Box::new(source),
        };
        let local = &function.snapshot;
        if again {
            std::fs::remove_dir_all(local).map_err(|source| RegistryError::StoreDir {
                path: local.clone(),
                source,
            })?;
        } else if local.exists() {
            return Ok(false);
        }
        let master = master.ok_or_else(|| RegistryError::NoStoreKey {
            function: function.name.clone(),
        })?;
        create_private_dir(&self.dir)?;
        let store = match self.stores.entry(url.store.to_string()) {
            std::collections::hash_map::Entry::Occupied(held) => held.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                // Endpoint, region and credentials as `thaw snapshot pull` takes them.
                slot.insert(Store::connect(&url.store, &StoreOptions::default()).map_err(failed)?)
            }
        };
        let started = std::time::Instant::now();
        let pulled = store
            .pull(url.id, local, master, self.cache.clone())
            .map_err(failed)?;
        tracing::info!(function = function.name, url = %url, local = %local.display(),
            fetched = pulled.fetched.fetched, fetched_bytes = pulled.fetched.fetched_bytes,
            from_cache = pulled.fetched.cache_hits, elapsed = ?started.elapsed(),
            "snapshot pulled from the store");
        self.totals.pulls += 1;
        self.totals.objects.fetched += pulled.fetched.fetched;
        self.totals.objects.fetched_bytes += pulled.fetched.fetched_bytes;
        self.totals.objects.cache_hits += pulled.fetched.cache_hits;
        Ok(true)
    }

    /// Removes the local copies of store snapshots no configured function names (a function
    /// moved to a new snapshot, or removed), and anything else left in the copies' directory,
    /// such as an interrupted pull's temporary directory: thawd owns it.
    pub fn prune(&self, config: &Config) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return; // never made: nothing to prune
        };
        let kept: Vec<&Path> = config
            .functions
            .values()
            .filter(|f| f.store.is_some())
            .map(|f| f.snapshot.as_path())
            .collect();
        for entry in entries.flatten() {
            let path = entry.path();
            if kept.contains(&path.as_path()) {
                continue;
            }
            let removed = match entry.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
                _ => std::fs::remove_file(&path),
            };
            match removed {
                Ok(()) => tracing::info!(path = %path.display(),
                    "removed a store snapshot copy no function uses"),
                Err(e) => tracing::warn!(path = %path.display(), error = %e,
                    "cannot remove a store snapshot copy no function uses"),
            }
        }
    }

    /// What the pulls cost, and the cache now.
    pub fn totals(&self) -> StoreTotals {
        StoreTotals {
            cache: self.cache.as_ref().map(|c| c.stats()),
            ..self.totals
        }
    }
}

fn create_private_dir(dir: &Path) -> Result<(), RegistryError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| RegistryError::StoreDir {
            path: dir.to_owned(),
            source,
        })
}

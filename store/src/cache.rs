//! The host cache of sealed chunk objects: a directory of files named by their objects,
//! bounded in bytes, evicting the least recently used, shared by every snapshot of the host
//! and kept across restarts. It holds objects exactly as the store does, sealed, so what is at
//! rest on this disk is as unreadable as what is in the store, and whoever reads from it opens
//! and checks every object as if it came from the store (a copy that does not open is
//! dropped with [`ObjectCache::remove`] and fetched again).
//!
//! Writes go to a temporary file renamed into place, so a reader sees a whole object or none;
//! they are not fsynced: after a crash a torn object fails its check and is fetched again.
//! Recency is the file's modification time, set on every hit, so the order survives a
//! restart. One process's index is exact; processes sharing a directory each keep the budget
//! for what they know of, and agree again when one reopens it.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use snapshot::SnapshotId;
use snapshot::store_object::ObjectName;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot use {path} as the chunk cache")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Counts since the cache was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Objects added.
    pub inserted: u64,
    /// Objects evicted to stay within the budget.
    pub evicted: u64,
    /// Objects removed because they did not open.
    pub removed: u64,
    /// Objects held now, and their bytes.
    pub objects: u64,
    pub bytes: u64,
}

struct Entry {
    bytes: u64,
    /// Its position in `Index::recency` (larger: used more recently).
    tick: u64,
}

#[derive(Default)]
struct Index {
    entries: HashMap<ObjectName, Entry>,
    recency: BTreeMap<u64, ObjectName>,
    bytes: u64,
    next_tick: u64,
}

impl Index {
    fn touch(&mut self, name: &ObjectName) {
        let tick = self.next_tick;
        if let Some(entry) = self.entries.get_mut(name) {
            self.recency.remove(&entry.tick);
            entry.tick = tick;
            self.recency.insert(tick, *name);
            self.next_tick += 1;
        }
    }

    fn insert(&mut self, name: ObjectName, bytes: u64) {
        self.forget(&name);
        let tick = self.next_tick;
        self.next_tick += 1;
        self.entries.insert(name, Entry { bytes, tick });
        self.recency.insert(tick, name);
        self.bytes += bytes;
    }

    fn forget(&mut self, name: &ObjectName) -> bool {
        match self.entries.remove(name) {
            Some(entry) => {
                self.recency.remove(&entry.tick);
                self.bytes -= entry.bytes;
                true
            }
            None => false,
        }
    }

    /// The least recently used objects to drop for the rest to fit in `budget`.
    fn over_budget(&mut self, budget: u64) -> Vec<ObjectName> {
        let mut out = Vec::new();
        while self.bytes > budget {
            let Some((_, name)) = self.recency.pop_first() else {
                break;
            };
            if let Some(entry) = self.entries.remove(&name) {
                self.bytes -= entry.bytes;
            }
            out.push(name);
        }
        out
    }
}

/// A host's cache of sealed chunk objects (see the module docs).
pub struct ObjectCache {
    dir: PathBuf,
    budget: u64,
    index: Mutex<Index>,
    hits: AtomicU64,
    misses: AtomicU64,
    inserted: AtomicU64,
    evicted: AtomicU64,
    removed: AtomicU64,
}

impl std::fmt::Debug for ObjectCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectCache")
            .field("dir", &self.dir)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl ObjectCache {
    /// Opens (creating it, mode 0700) the cache in `dir`, holding at most `budget` bytes of
    /// objects: what an earlier process left is indexed by its modification time, leftover
    /// temporary files and files that are not objects are removed, and the least recently
    /// used objects beyond the budget are evicted.
    pub fn open(dir: &Path, budget: u64) -> Result<ObjectCache, CacheError> {
        let io = |source| CacheError::Io {
            path: dir.to_owned(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        let mut found = Vec::new();
        for entry in fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let path = entry.path();
            let name = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<ObjectName>().ok());
            let meta = entry.metadata().map_err(io)?;
            match name {
                Some(name) if meta.is_file() => {
                    let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    found.push((used, name, meta.len()));
                }
                // Temporary files of a writer that died, and anything else that is not ours.
                _ if meta.is_file() => {
                    let _ = fs::remove_file(&path);
                }
                _ => {}
            }
        }
        found.sort();
        let mut index = Index::default();
        for (_, name, bytes) in found {
            index.insert(name, bytes);
        }
        let cache = ObjectCache {
            dir: dir.to_owned(),
            budget,
            index: Mutex::new(index),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            inserted: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            removed: AtomicU64::new(0),
        };
        cache.evict();
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the sealed manifest of snapshot `id` is kept: `manifests/ID` (outside the byte
    /// budget: one small object per snapshot restored).
    fn manifest_path(&self, id: SnapshotId) -> PathBuf {
        self.dir.join("manifests").join(id.to_string())
    }

    /// The sealed manifest of snapshot `id` as fetched less than `fresh` ago, if kept. It is
    /// opened and checked like one from the store; it may be older than the store's.
    pub fn manifest(&self, id: SnapshotId, fresh: std::time::Duration) -> Option<Vec<u8>> {
        let path = self.manifest_path(id);
        let fetched = fs::metadata(&path).ok()?.modified().ok()?;
        let age = SystemTime::now()
            .duration_since(fetched)
            .unwrap_or_default();
        (age < fresh).then(|| fs::read(&path).ok()).flatten()
    }

    /// Keeps the sealed manifest of snapshot `id` (as the store holds it), replacing an older
    /// one. Failing is logged: the next restore fetches it.
    pub fn insert_manifest(&self, id: SnapshotId, sealed: &[u8]) {
        let path = self.manifest_path(id);
        let temp = self
            .dir
            .join("manifests")
            .join(format!(".tmp-{id}-{}", std::process::id()));
        let written = fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.dir.join("manifests"))
            .and_then(|()| fs::write(&temp, sealed))
            .and_then(|()| fs::rename(&temp, &path));
        if let Err(error) = written {
            let _ = fs::remove_file(&temp);
            tracing::warn!(cache = %self.dir.display(), snapshot = %id, %error, "could not keep a snapshot manifest in the cache");
        }
    }

    fn path(&self, name: &ObjectName) -> PathBuf {
        self.dir.join(name.to_string())
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        // The index is consistent at every unlock; a panic elsewhere does not break it.
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the cache holds `name` (as far as this process knows).
    pub fn contains(&self, name: &ObjectName) -> bool {
        self.index().entries.contains_key(name)
    }

    /// The object `name`, if the cache holds it; it becomes the most recently used. A file
    /// another process evicted meanwhile is a miss.
    pub fn get(&self, name: &ObjectName) -> Option<Vec<u8>> {
        if !self.contains(name) {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        match read_touching(&self.path(name)) {
            Ok(bytes) => {
                self.index().touch(name);
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(bytes)
            }
            Err(_) => {
                self.index().forget(name);
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Adds the object `name`, evicting the least recently used ones beyond the budget. An
    /// object larger than the whole budget is not kept. Failing to write is logged, not an
    /// error: the cache only saves fetches.
    pub fn insert(&self, name: &ObjectName, object: &[u8]) {
        let bytes = object.len() as u64;
        if bytes > self.budget || self.contains(name) {
            return;
        }
        let path = self.path(name);
        let temp = self.dir.join(format!(".tmp-{name}-{}", std::process::id()));
        let written = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .and_then(|mut f| {
                f.write_all(object)?;
                // The same clock as a hit's (a file's own time comes from a coarser one).
                f.set_modified(SystemTime::now())
            })
            .and_then(|()| fs::rename(&temp, &path));
        if let Err(error) = written {
            let _ = fs::remove_file(&temp);
            tracing::warn!(cache = %self.dir.display(), object = %name, %error, "could not add a chunk object to the cache");
            return;
        }
        self.index().insert(*name, bytes);
        self.inserted.fetch_add(1, Ordering::Relaxed);
        self.evict();
    }

    /// Drops the object `name` (one that did not open).
    pub fn remove(&self, name: &ObjectName) {
        if self.index().forget(name) {
            self.removed.fetch_add(1, Ordering::Relaxed);
        }
        let _ = fs::remove_file(self.path(name));
    }

    fn evict(&self) {
        let victims = self.index().over_budget(self.budget);
        for name in &victims {
            let _ = fs::remove_file(self.path(name));
        }
        self.evicted
            .fetch_add(victims.len() as u64, Ordering::Relaxed);
    }

    pub fn stats(&self) -> CacheStats {
        let (objects, bytes) = {
            let index = self.index();
            (index.entries.len() as u64, index.bytes)
        };
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            inserted: self.inserted.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            removed: self.removed.load(Ordering::Relaxed),
            objects,
            bytes,
        }
    }
}

/// A file's recency is refreshed on a hit only when it is older than this: the order across
/// a restart needs no finer grain, and a restore that reads many objects then writes no
/// metadata for most of them.
const RECENCY_GRAIN: std::time::Duration = std::time::Duration::from_secs(60);

/// Reads the file at `path` and, if it was last marked used over [`RECENCY_GRAIN`] ago, marks
/// it used now (its modification time, through the same descriptor: the owner may set it).
fn read_touching(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut file = File::open(path)?;
    let meta = file.metadata()?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut bytes)?;
    let now = SystemTime::now();
    let stale = meta.modified().map_or(true, |used| {
        now.duration_since(used).unwrap_or_default() > RECENCY_GRAIN
    });
    if stale {
        // An object whose time cannot be set is only evicted a little early.
        let _ = file.set_modified(now);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(i: u8) -> ObjectName {
        ObjectName([i; 32])
    }

    #[test]
    fn objects_come_back_after_a_restart_and_the_least_recently_used_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ObjectCache::open(dir.path(), 300).unwrap();
        for i in 0..3 {
            cache.insert(&name(i), &[i; 100]);
        }
        assert_eq!(cache.get(&name(0)), Some(vec![0; 100]));
        // 0 was just used: 1 is the least recently used and makes room for 3.
        cache.insert(&name(3), &[3; 100]);
        assert!(!cache.contains(&name(1)));
        assert!(!dir.path().join(name(1).to_string()).exists());
        assert_eq!(cache.get(&name(1)), None);
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.evicted), (1, 1, 1));
        assert_eq!((stats.objects, stats.bytes), (3, 300));
        drop(cache);

        // A new process finds them, in the same order (modification times 1 s apart, as a
        // coarse file system might keep them).
        for (i, age) in [(2u8, 30u64), (0, 20), (3, 10)] {
            let file = File::options()
                .write(true)
                .open(dir.path().join(name(i).to_string()))
                .unwrap();
            file.set_modified(SystemTime::now() - std::time::Duration::from_secs(age))
                .unwrap();
        }
        fs::write(dir.path().join(".tmp-leftover"), b"x").unwrap();
        let cache = ObjectCache::open(dir.path(), 300).unwrap();
        assert!(!dir.path().join(".tmp-leftover").exists());
        assert_eq!(cache.stats().objects, 3);
        assert_eq!(cache.get(&name(3)), Some(vec![3; 100]));
        cache.insert(&name(4), &[4; 100]);
        assert!(!cache.contains(&name(2)), "the oldest goes first");
        assert!(cache.contains(&name(0)));

        // A smaller budget at the next start evicts down to it, oldest first.
        drop(cache);
        let cache = ObjectCache::open(dir.path(), 150).unwrap();
        assert_eq!(cache.stats().objects, 1);
        assert!(cache.contains(&name(4)));

        // Manifests are kept beside the objects, outside the budget, and survive a reopen.
        let id = SnapshotId([9; 16]);
        let hour = std::time::Duration::from_secs(3600);
        assert_eq!(cache.manifest(id, hour), None);
        cache.insert_manifest(id, b"sealed v1");
        cache.insert_manifest(id, b"sealed v2");
        drop(cache);
        let cache = ObjectCache::open(dir.path(), 150).unwrap();
        assert_eq!(cache.manifest(id, hour), Some(b"sealed v2".to_vec()));
        // One fetched longer ago than the caller allows is not used.
        assert_eq!(cache.manifest(id, std::time::Duration::ZERO), None);
        assert_eq!(cache.stats().objects, 1);
    }

    #[test]
    fn a_removed_or_vanished_object_is_a_miss_and_an_oversized_one_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ObjectCache::open(&dir.path().join("cache"), 1000).unwrap();
        cache.insert(&name(1), &[1; 10]);
        cache.remove(&name(1));
        assert_eq!(cache.get(&name(1)), None);
        assert_eq!(cache.stats().removed, 1);
        cache.insert(&name(2), &[2; 10]);
        fs::remove_file(dir.path().join("cache").join(name(2).to_string())).unwrap();
        assert_eq!(cache.get(&name(2)), None);
        assert!(!cache.contains(&name(2)));
        cache.insert(&name(3), &[3; 1001]);
        assert!(!cache.contains(&name(3)));
        assert_eq!(cache.stats().bytes, 0);
    }
}

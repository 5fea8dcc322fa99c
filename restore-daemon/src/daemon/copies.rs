//! thawd's decoded copies: at most one per function, decoded in the background from its
//! snapshot (`crate::decoded_copy`), granted to that function's workers only, kept within the
//! host budget for copies and dropped when no environment maps it.
//!
//! A restore never waits for a copy. While a function's copy is being decoded, when the budget
//! has no room for it (after dropping every unused copy, least recently used first), or when
//! decoding failed, the restore takes the private path (the function's lazy restore) and the
//! metrics count why (`thawd_shared_copy_misses_total`).
//!
//! "Unused" is exact: every worker whose guest maps a copy holds a reference to it
//! ([`crate::worker::handle::Worker`] keeps its grant until it is reaped), so a copy whose only
//! reference is this cache's is mapped by no guest.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::decoded_copy::{CopyBacking, CopySizes, DecodedCopy};
use crate::worker::handle::CopyGrant;
use snapshot::KeyChoice;

use super::metrics::{CopyMiss, Metrics};

/// What decoding a function's copy needs.
#[derive(Clone)]
pub struct CopySource {
    /// The function.
    pub function: String,
    /// Its snapshot.
    pub snapshot: PathBuf,
    /// The key to open it.
    pub key: Arc<KeyChoice>,
    /// Host memory the copy will hold at most.
    pub sizes: CopySizes,
}

impl std::fmt::Debug for CopySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopySource")
            .field("function", &self.function)
            .field("snapshot", &self.snapshot)
            .field("sizes", &self.sizes)
            .finish_non_exhaustive()
    }
}

enum State {
    /// Being decoded; `reserved` bytes are held against the budget meanwhile.
    Decoding {
        reserved: u64,
    },
    Ready(Arc<DecodedCopy>),
    /// Decoding failed; not tried again (the snapshot was verified at registration, so this
    /// is a host problem, e.g. no memory for the memfd, worth a log line rather than a loop).
    Failed,
}

struct Entry {
    state: State,
    last_used: Instant,
}

impl Entry {
    /// Bytes held against the budget.
    fn held(&self) -> u64 {
        match &self.state {
            State::Decoding { reserved } => *reserved,
            State::Ready(copy) => copy.resident_bytes(),
            State::Failed => 0,
        }
    }

    fn unused(&self) -> bool {
        matches!(&self.state, State::Ready(copy) if Arc::strong_count(copy) == 1)
    }
}

/// The decoded copies of every function.
pub struct CopyCache {
    budget: u64,
    backing: CopyBacking,
    metrics: Arc<Metrics>,
    entries: Mutex<BTreeMap<String, Entry>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl CopyCache {
    /// A cache that may hold `budget` bytes of copies, on huge pages if this process may
    /// mount a tmpfs of its own ([`CopyBacking::detect`]).
    pub fn new(budget: u64, metrics: Arc<Metrics>) -> Arc<Self> {
        let backing = if budget == 0 {
            CopyBacking::Memfd
        } else {
            CopyBacking::detect(budget)
        };
        Self::with_backing(budget, backing, metrics)
    }

    /// A cache whose copies are made on `backing`.
    pub fn with_backing(budget: u64, backing: CopyBacking, metrics: Arc<Metrics>) -> Arc<Self> {
        metrics.set_copy_budget(budget);
        Arc::new(Self {
            budget,
            backing,
            metrics,
            entries: Mutex::new(BTreeMap::new()),
        })
    }

    /// The function's copy, if it is ready. Otherwise the reason the restore must go private;
    /// decoding starts here if it has not (and the budget has room).
    pub fn grant(self: &Arc<Self>, source: &CopySource) -> Result<CopyGrant, CopyMiss> {
        let mut entries = lock(&self.entries);
        if let Some(entry) = entries.get_mut(&source.function) {
            entry.last_used = Instant::now();
            return match &entry.state {
                State::Ready(copy) => Ok(CopyGrant {
                    function: source.function.clone(),
                    copy: copy.clone(),
                }),
                State::Decoding { .. } => Err(CopyMiss::Decoding),
                State::Failed => Err(CopyMiss::Failed),
            };
        }
        self.start_locked(&mut entries, source)?;
        Err(CopyMiss::Decoding)
    }

    /// Starts decoding the function's copy now (at registration), if the budget has room.
    pub fn prepare(self: &Arc<Self>, source: &CopySource) -> Result<(), CopyMiss> {
        let mut entries = lock(&self.entries);
        if entries.contains_key(&source.function) {
            return Ok(());
        }
        self.start_locked(&mut entries, source)
    }

    /// Makes room for `source`'s copy (dropping unused copies, least recently used first) and
    /// decodes it on its own thread.
    fn start_locked(
        self: &Arc<Self>,
        entries: &mut BTreeMap<String, Entry>,
        source: &CopySource,
    ) -> Result<(), CopyMiss> {
        let needed = self.backing.resident_upper_bound(source.sizes);
        if needed > self.budget {
            return Err(CopyMiss::Budget);
        }
        loop {
            let held: u64 = entries.values().map(Entry::held).sum();
            if held.saturating_add(needed) <= self.budget {
                break;
            }
            let oldest_unused = entries
                .iter()
                .filter(|(_, e)| e.unused())
                .min_by_key(|(_, e)| e.last_used)
                .map(|(name, _)| name.clone());
            match oldest_unused {
                Some(name) => self.evict_locked(entries, &name),
                None => return Err(CopyMiss::Budget),
            }
        }
        entries.insert(
            source.function.clone(),
            Entry {
                state: State::Decoding { reserved: needed },
                last_used: Instant::now(),
            },
        );
        let cache = self.clone();
        let job = source.clone();
        let spawned = std::thread::Builder::new()
            .name("thaw-decode".into())
            .spawn(move || cache.decode(&job));
        if let Err(e) = spawned {
            tracing::warn!(function = source.function, error = %e, "cannot start decoding a copy");
            entries.remove(&source.function);
            return Err(CopyMiss::Failed);
        }
        Ok(())
    }

    fn decode(&self, source: &CopySource) {
        let started = Instant::now();
        let decoded = crate::verify::open(&source.snapshot, &source.key)
            .map_err(|e| e.to_string())
            .and_then(|snap| DecodedCopy::decode(&snap, &self.backing).map_err(|e| e.to_string()));
        let mut entries = lock(&self.entries);
        let Some(entry) = entries.get_mut(&source.function) else {
            return;
        };
        match decoded {
            Ok(copy) => {
                let bytes = copy.resident_bytes();
                tracing::info!(
                    function = source.function,
                    bytes,
                    took = ?started.elapsed(),
                    "decoded copy ready"
                );
                self.metrics.set_copy_bytes(&source.function, bytes);
                entry.state = State::Ready(Arc::new(copy));
            }
            Err(error) => {
                tracing::warn!(function = source.function, %error, "cannot decode the snapshot's memory; its restores stay private");
                entry.state = State::Failed;
            }
        }
    }

    fn evict_locked(&self, entries: &mut BTreeMap<String, Entry>, function: &str) {
        if entries.remove(function).is_some() {
            tracing::info!(function, "decoded copy dropped");
            self.metrics.copy_evicted(function);
            self.metrics.set_copy_bytes(function, 0);
        }
    }

    /// Drops every copy no guest has mapped for at least `ttl`.
    pub fn evict_unused(&self, ttl: Duration) {
        let mut entries = lock(&self.entries);
        let stale: Vec<String> = entries
            .iter()
            .filter(|(_, e)| e.unused() && e.last_used.elapsed() >= ttl)
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            self.evict_locked(&mut entries, &name);
        }
    }

    /// Host memory the copies hold now (and reserve for those being decoded).
    pub fn held_bytes(&self) -> u64 {
        lock(&self.entries).values().map(Entry::held).sum()
    }

    /// Whether copies are on huge pages.
    pub fn huge_pages(&self) -> bool {
        self.backing.huge()
    }

    /// Whether the function's copy is ready.
    pub fn is_ready(&self, function: &str) -> bool {
        matches!(
            lock(&self.entries).get(function).map(|e| &e.state),
            Some(State::Ready(_))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A plaintext snapshot of 2 MiB of memory whose first `data_mib` MiB are data.
    fn snapshot(dir: &std::path::Path, name: &str, data_mib: usize) -> CopySource {
        let mut memory = vec![0u8; 2 << 20];
        memory[..data_mib << 20]
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 251) as u8 + 1);
        let path = dir.join(name);
        crate::decoded_copy::tests::plaintext_snapshot(&path, &memory);
        CopySource {
            function: name.to_owned(),
            snapshot: path,
            key: Arc::new(KeyChoice::None),
            sizes: CopySizes {
                small_pages: data_mib as u64 * MIB,
                huge_pages: data_mib.div_ceil(2) as u64 * 2 * MIB,
            },
        }
    }

    /// The budget's arithmetic is exact on 4 KiB pages.
    fn memfd_cache(budget: u64, metrics: Arc<Metrics>) -> Arc<CopyCache> {
        CopyCache::with_backing(budget, CopyBacking::Memfd, metrics)
    }

    fn wait_ready(cache: &CopyCache, function: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cache.is_ready(function) {
            assert!(
                Instant::now() < deadline,
                "{function}'s copy never became ready"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_first_restore_goes_private_while_the_copy_is_decoded_then_it_is_granted() {
        let dir = tempfile::tempdir().unwrap();
        let a = snapshot(dir.path(), "a", 1);
        let metrics = Arc::new(Metrics::new());
        let cache = memfd_cache(16 * MIB, metrics.clone());
        assert_eq!(cache.grant(&a).err(), Some(CopyMiss::Decoding));
        wait_ready(&cache, "a");
        let grant = cache.grant(&a).unwrap();
        assert_eq!(grant.function, "a");
        assert_eq!(grant.copy.resident_bytes(), MIB, "zero chunks are holes");
        assert_eq!(cache.held_bytes(), MIB);
        assert!(
            metrics
                .render()
                .contains("thawd_decoded_copy_bytes{function=\"a\"} 1048576")
        );
    }

    #[test]
    fn copies_on_huge_pages_are_granted_when_this_process_may_mount() {
        let dir = tempfile::tempdir().unwrap();
        let a = snapshot(dir.path(), "a", 1);
        let cache = CopyCache::new(16 * MIB, Arc::new(Metrics::new()));
        if !cache.huge_pages() {
            println!("no private tmpfs mount here: only memfd copies are tested");
            return;
        }
        cache.prepare(&a).unwrap();
        wait_ready(&cache, "a");
        let grant = cache.grant(&a).unwrap();
        assert!(grant.copy.huge());
        assert!(grant.copy.resident_bytes() <= 2 * MIB);
    }

    #[test]
    fn a_copy_larger_than_the_budget_is_never_made() {
        let dir = tempfile::tempdir().unwrap();
        let a = snapshot(dir.path(), "a", 2);
        let cache = memfd_cache(MIB, Arc::new(Metrics::new()));
        assert_eq!(cache.grant(&a).err(), Some(CopyMiss::Budget));
        assert_eq!(cache.grant(&a).err(), Some(CopyMiss::Budget));
        assert_eq!(cache.held_bytes(), 0);
    }

    #[test]
    fn an_unused_copy_makes_room_but_a_mapped_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (snapshot(dir.path(), "a", 1), snapshot(dir.path(), "b", 1));
        let metrics = Arc::new(Metrics::new());
        let cache = memfd_cache(MIB + MIB / 2, metrics.clone());
        cache.prepare(&a).unwrap();
        wait_ready(&cache, "a");
        let held = cache.grant(&a).unwrap();
        assert_eq!(cache.grant(&b).err(), Some(CopyMiss::Budget), "a is in use");
        assert!(cache.is_ready("a"));
        drop(held);
        assert_eq!(cache.grant(&b).err(), Some(CopyMiss::Decoding));
        assert!(!cache.is_ready("a"), "a was dropped for b");
        wait_ready(&cache, "b");
        assert!(
            metrics
                .render()
                .contains("thawd_decoded_copy_evictions_total{function=\"a\"} 1")
        );
    }

    #[test]
    fn unused_copies_expire_and_mapped_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (snapshot(dir.path(), "a", 1), snapshot(dir.path(), "b", 1));
        let cache = memfd_cache(16 * MIB, Arc::new(Metrics::new()));
        cache.prepare(&a).unwrap();
        cache.prepare(&b).unwrap();
        wait_ready(&cache, "a");
        wait_ready(&cache, "b");
        let _held = cache.grant(&a).unwrap();
        cache.evict_unused(Duration::ZERO);
        assert!(cache.is_ready("a"));
        assert!(!cache.is_ready("b"));
        assert_eq!(cache.held_bytes(), MIB);
    }

    #[test]
    fn a_snapshot_that_cannot_be_decoded_stays_private() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = snapshot(dir.path(), "a", 1);
        a.snapshot = dir.path().join("missing");
        let cache = memfd_cache(16 * MIB, Arc::new(Metrics::new()));
        assert_eq!(cache.grant(&a).err(), Some(CopyMiss::Decoding));
        let deadline = Instant::now() + Duration::from_secs(30);
        while cache.grant(&a).err() != Some(CopyMiss::Failed) {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(cache.held_bytes(), 0);
    }
}

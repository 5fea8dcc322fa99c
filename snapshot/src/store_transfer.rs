//! Moving a snapshot between its file (`snapshot.thaw`) and a content-addressed store's
//! objects (`store_object`, `store_manifest`), without the transport: `export` hands each
//! chunk object to the caller and returns the manifest, `import` asks the caller for each
//! object and writes a snapshot directory with the same id. The store client
//! (`thaw snapshot push`/`pull`) moves the bytes.
//!
//! Both ends authenticate: `export` reads every chunk through the snapshot's own checks, and
//! `import` opens every object against the name the sealed manifest gives before any of it is
//! written, then writes the snapshot atomically, so a store that alters, cuts or swaps an
//! object leaves no snapshot behind.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{ReadError, WriteError};
use crate::format::ChunkKind;
use crate::keys::MasterKey;
use crate::reader::Snapshot;
use crate::store_manifest::{ManifestError, StoreChunk, StoreManifest, StoreWorkingSet};
use crate::store_object::{OBJECT_ZSTD_LEVEL, ObjectError, ObjectName, StoreKeys};
use crate::store_snapshot::{ObjectSource, ObjectSourceError};
use crate::writer::{
    Identity, MemoryRegion, Protection, SnapshotMeta, WriteOptions, WriteSummary, write_as,
};

#[derive(Debug, thiserror::Error)]
pub enum TransferError<E: std::error::Error + 'static> {
    #[error("cannot read chunk {index} of the snapshot")]
    Read {
        index: usize,
        #[source]
        source: ReadError,
    },
    #[error("cannot make the object of chunk {index}")]
    Object {
        index: usize,
        #[source]
        source: ObjectError,
    },
    #[error("the snapshot's manifest object")]
    Manifest(#[source] ManifestError),
    #[error("the store")]
    Store(#[source] E),
    #[error("cannot write the pulled snapshot")]
    Write(#[source] WriteError),
    #[error("cannot open the pulled snapshot to add its working set")]
    Reopen(#[source] ReadError),
    #[error("the manifest lays out more memory than this host can hold in one buffer")]
    TooLarge,
}

/// An [`ObjectSource`]'s failure to give an object, as [`import`] reports it.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct SourceError(pub ObjectSourceError);

/// Every data chunk of `snap` (opened with its master key) as a store object, handed to
/// `put` as its name and bytes, in chunk order; returns the manifest naming them. `put` is
/// called once per data chunk, so a chunk that recurs (within the snapshot or in one the
/// store already holds) is the caller's to skip.
pub fn export<E: std::error::Error + 'static>(
    snap: &Snapshot,
    master: &MasterKey,
    mut put: impl FnMut(ObjectName, Vec<u8>) -> Result<(), E>,
) -> Result<StoreManifest, TransferError<E>> {
    let keys = StoreKeys::derive(master);
    let mut buf = Vec::new();
    let mut chunks = Vec::with_capacity(snap.chunks().len());
    for (index, chunk) in snap.chunks().iter().enumerate() {
        if chunk.kind == ChunkKind::Zero {
            chunks.push(StoreChunk::Zero);
            continue;
        }
        buf.resize(chunk.len as usize, 0);
        snap.read_chunk_authenticated(index, &mut buf)
            .map_err(|source| TransferError::Read { index, source })?;
        let (name, object) = keys
            .seal(&buf, OBJECT_ZSTD_LEVEL)
            .map_err(|source| TransferError::Object { index, source })?;
        put(name, object).map_err(TransferError::Store)?;
        chunks.push(StoreChunk::Data(name));
    }
    let info = snap.info();
    let manifest = StoreManifest {
        snapshot_id: snap.id(),
        created_unix_nanos: info.created_unix_nanos,
        chunk_size: snap.chunk_size(),
        vcpus: snap.vcpus(),
        regions: snap.regions().to_vec(),
        fingerprint: snap.fingerprint().clone(),
        chunks,
        state: snap.state().to_vec(),
        working_set: snap.working_set().map(StoreWorkingSet::from_working_set),
    };
    manifest.check().map_err(TransferError::Manifest)?;
    Ok(manifest)
}

/// Writes the snapshot `manifest` describes to `dir`, sealed with `master` under the same id
/// and creation time, taking each data chunk's object from `objects` (all of them asked for
/// ahead, in layout order). Every object is opened and checked against its name before
/// anything is written; a copy that does not open is reported to the source
/// ([`ObjectSource::refused`]) and asked for once more, as a restore does, since a cache's
/// copy may have rotted while the store's is sound.
pub fn import(
    dir: &Path,
    manifest: &StoreManifest,
    master: &MasterKey,
    options: &WriteOptions,
    objects: &dyn ObjectSource,
) -> Result<WriteSummary, TransferError<SourceError>> {
    manifest.check().map_err(TransferError::Manifest)?;
    let keys = StoreKeys::derive(master);
    // One buffer per region, zero until a data chunk fills part of it: zero chunks cost
    // nothing, as pages never written are never allocated.
    let mut memory: Vec<Vec<u8>> = Vec::with_capacity(manifest.regions.len());
    for region in &manifest.regions {
        let len = usize::try_from(region.size).map_err(|_| TransferError::TooLarge)?;
        memory.push(vec![0u8; len]);
    }
    let mut seen = std::collections::HashSet::new();
    let wanted: Vec<ObjectName> = manifest
        .chunks
        .iter()
        .filter_map(|c| match c {
            StoreChunk::Data(name) if seen.insert(*name) => Some(*name),
            _ => None,
        })
        .collect();
    objects.prefetch(&wanted);
    // Where each object was opened first: a chunk that recurs is copied from there, not asked
    // for again (a source would count it twice, and opening it again proves nothing new).
    let mut first: HashMap<ObjectName, (usize, usize, usize)> = HashMap::new();
    for (index, ((addr, len), entry)) in manifest.layout().enumerate() {
        let StoreChunk::Data(name) = entry else {
            continue;
        };
        let len = len as usize;
        let (region, offset) = manifest
            .regions
            .iter()
            .position(|r| addr >= r.guest_addr && addr - r.guest_addr < r.size)
            .map(|i| (i, (addr - manifest.regions[i].guest_addr) as usize))
            .ok_or(TransferError::TooLarge)?;
        if memory[region].get(offset..offset + len).is_none() {
            return Err(TransferError::TooLarge);
        }
        match first.get(&name) {
            // One name is one plaintext, so one length; a manifest that says otherwise is
            // opened the long way, and refused there.
            Some(&(from_region, from, from_len)) if from_len == len => {
                let bytes = memory[from_region][from..from + len].to_vec();
                memory[region][offset..offset + len].copy_from_slice(&bytes);
            }
            _ => {
                let out = &mut memory[region][offset..offset + len];
                open_object(&keys, objects, &name, out).map_err(|e| e.at(index))?;
                first.entry(name).or_insert((region, offset, len));
            }
        }
    }
    let regions: Vec<MemoryRegion<'_>> = manifest
        .regions
        .iter()
        .zip(&memory)
        .map(|(r, bytes)| MemoryRegion {
            guest_addr: r.guest_addr,
            bytes,
        })
        .collect();
    let meta = SnapshotMeta {
        fingerprint: manifest.fingerprint.clone(),
        vcpus: manifest.vcpus,
    };
    let options = WriteOptions {
        chunk_size: manifest.chunk_size,
        ..options.clone()
    };
    let summary = write_as(
        dir,
        Some(Identity {
            id: manifest.snapshot_id,
            created_unix_nanos: manifest.created_unix_nanos,
        }),
        &meta,
        &manifest.state,
        &regions,
        &Protection::Encrypted(master),
        &options,
    )
    .map_err(TransferError::Write)?;
    // The working set is its own file beside the snapshot's (sealed under the new file's data
    // key), so it goes in once the snapshot is there; `check` vetted its indices.
    if let Some(ws) = manifest
        .working_set
        .as_ref()
        .and_then(StoreWorkingSet::to_working_set)
    {
        Snapshot::open(dir, Some(master))
            .map_err(TransferError::Reopen)?
            .write_working_set(dir, &ws)
            .map_err(TransferError::Write)?;
    }
    Ok(summary)
}

/// Why one object could not be had, before its chunk index is known.
enum ObjectFailure {
    Source(ObjectSourceError),
    Open(ObjectError),
}

impl ObjectFailure {
    fn at(self, index: usize) -> TransferError<SourceError> {
        match self {
            ObjectFailure::Source(e) => TransferError::Store(SourceError(e)),
            ObjectFailure::Open(source) => TransferError::Object { index, source },
        }
    }
}

/// Object `name` from `objects`, opened into `out`; asked for a second time if the first copy
/// does not open.
fn open_object(
    keys: &StoreKeys,
    objects: &dyn ObjectSource,
    name: &ObjectName,
    out: &mut [u8],
) -> Result<(), ObjectFailure> {
    let mut refused = false;
    loop {
        let object = objects.object(name).map_err(ObjectFailure::Source)?;
        match keys.open(name, &object, out) {
            Ok(()) => return Ok(()),
            Err(e) if refused => return Err(ObjectFailure::Open(e)),
            Err(_) => {
                objects.refused(name);
                refused = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::PAGE_SIZE;
    use crate::fingerprint::Fingerprint;
    use crate::keys::KEY_LEN;
    use crate::writer::write;

    #[derive(Debug, thiserror::Error)]
    #[error("no object {0}")]
    struct Missing(ObjectName);

    fn master() -> MasterKey {
        MasterKey::from_bytes([9; KEY_LEN])
    }

    fn meta() -> SnapshotMeta {
        SnapshotMeta {
            fingerprint: Fingerprint::made_up(),
            vcpus: 1,
        }
    }

    const CHUNK: usize = 4 * PAGE_SIZE;

    /// Two regions; chunk `i` of the first holds `pattern(i)` unless it is a multiple of 3
    /// (zeros). `shared` chunks are the same in every snapshot, the rest depend on `seed`.
    fn memory(seed: u8) -> (Vec<u8>, Vec<u8>) {
        let mut low = vec![0u8; 12 * CHUNK];
        for (i, chunk) in low.chunks_mut(CHUNK).enumerate() {
            if i % 3 == 0 {
                continue;
            }
            let byte = if i < 6 {
                i as u8
            } else {
                seed.wrapping_add(i as u8)
            };
            chunk[..PAGE_SIZE].fill(byte);
            chunk[2 * PAGE_SIZE..2 * PAGE_SIZE + 7].copy_from_slice(b"thaw!!!");
        }
        let mut high = vec![0u8; CHUNK + PAGE_SIZE];
        high[CHUNK..].fill(seed);
        (low, high)
    }

    fn snapshot(dir: &Path, seed: u8) -> Snapshot {
        let (low, high) = memory(seed);
        written(dir, &[(0, &low), (1 << 32, &high)])
    }

    /// A snapshot of `regions` (guest address, bytes) in `CHUNK`-sized chunks, sealed with
    /// `master()`, opened.
    fn written(dir: &Path, regions: &[(u64, &[u8])]) -> Snapshot {
        let regions: Vec<MemoryRegion<'_>> = regions
            .iter()
            .map(|&(guest_addr, bytes)| MemoryRegion { guest_addr, bytes })
            .collect();
        let options = WriteOptions {
            chunk_size: CHUNK as u32,
            threads: 1,
            ..WriteOptions::default()
        };
        let key = master();
        write(
            dir,
            &meta(),
            b"state bytes",
            &regions,
            &Protection::Encrypted(&key),
            &options,
        )
        .unwrap();
        Snapshot::open(dir, Some(&key)).unwrap()
    }

    fn chunks_of(snap: &Snapshot) -> Vec<Vec<u8>> {
        (0..snap.chunks().len())
            .map(|i| {
                let mut out = vec![0u8; snap.chunks()[i].len as usize];
                snap.read_chunk_authenticated(i, &mut out).unwrap();
                out
            })
            .collect()
    }

    type Store = HashMap<ObjectName, Vec<u8>>;

    fn push(snap: &Snapshot, store: &mut Store) -> (StoreManifest, usize) {
        let mut puts = 0;
        let manifest = export(snap, &master(), |name, object| {
            puts += 1;
            store.insert(name, object);
            Ok::<_, Missing>(())
        })
        .unwrap();
        (manifest, puts)
    }

    /// A store in memory, as an object source.
    struct Held<'a>(&'a Store);

    impl ObjectSource for Held<'_> {
        fn object(&self, name: &ObjectName) -> Result<Vec<u8>, ObjectSourceError> {
            self.0
                .get(name)
                .cloned()
                .ok_or_else(|| Box::new(Missing(*name)) as ObjectSourceError)
        }
    }

    fn pull(
        dir: &Path,
        manifest: &StoreManifest,
        store: &Store,
    ) -> Result<WriteSummary, TransferError<SourceError>> {
        import(
            dir,
            manifest,
            &master(),
            &WriteOptions::default(),
            &Held(store),
        )
    }

    #[test]
    fn a_snapshot_pushed_and_pulled_is_the_same_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let original = snapshot(&dir.path().join("a"), 1);
        let mut store = Store::new();
        let (manifest, puts) = push(&original, &mut store);
        let data = original
            .chunks()
            .iter()
            .filter(|c| c.kind == ChunkKind::Data)
            .count();
        assert_eq!(puts, data, "one object per data chunk");
        // Shipped as the sealed manifest object, as a store holds it.
        let sealed = manifest.seal(&master()).unwrap();
        let manifest = StoreManifest::open(&master(), original.id(), &sealed).unwrap();
        pull(&dir.path().join("b"), &manifest, &store).unwrap();
        let pulled = Snapshot::open(&dir.path().join("b"), Some(&master())).unwrap();
        assert_eq!(pulled.id(), original.id());
        assert_eq!(
            pulled.info().created_unix_nanos,
            original.info().created_unix_nanos
        );
        assert_eq!(pulled.regions(), original.regions());
        assert_eq!(pulled.chunks(), original.chunks());
        assert_eq!(pulled.state(), original.state());
        assert_eq!(pulled.fingerprint(), original.fingerprint());
        assert_eq!(chunks_of(&pulled), chunks_of(&original));
        pulled.verify(1).unwrap();
    }

    #[test]
    fn the_recorded_working_set_travels_with_the_snapshot() {
        use crate::working_set::{RecordingEnd, WorkingSet};
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let ws = WorkingSet::new(vec![4, 1, 12, 2], 9, RecordingEnd::Timeout);
        snapshot(&a, 1).write_working_set(&a, &ws).unwrap();
        let original = Snapshot::open(&a, Some(&master())).unwrap();
        let mut store = Store::new();
        let (manifest, _) = push(&original, &mut store);
        let sealed = manifest.seal(&master()).unwrap();
        let manifest = StoreManifest::open(&master(), original.id(), &sealed).unwrap();
        pull(&dir.path().join("b"), &manifest, &store).unwrap();
        let pulled = Snapshot::open(&dir.path().join("b"), Some(&master())).unwrap();
        assert_eq!(pulled.working_set(), Some(&ws));

        // Indices the snapshot does not have are refused with the manifest.
        let mut bad = manifest.clone();
        if let Some(ws) = bad.working_set.as_mut() {
            ws.chunks.push(10_000);
        }
        assert!(matches!(
            bad.seal(&master()),
            Err(ManifestError::Invalid { .. })
        ));
    }

    #[test]
    fn two_snapshots_share_the_objects_of_the_chunks_they_share() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::new();
        let (a, _) = push(&snapshot(&dir.path().join("a"), 1), &mut store);
        let after_a = store.len();
        let (b, _) = push(&snapshot(&dir.path().join("b"), 101), &mut store);
        let names = |m: &StoreManifest| -> std::collections::HashSet<ObjectName> {
            m.chunks
                .iter()
                .filter_map(|c| match c {
                    StoreChunk::Data(n) => Some(*n),
                    StoreChunk::Zero => None,
                })
                .collect()
        };
        let shared = names(&a).intersection(&names(&b)).count();
        // Chunks 1, 2, 4 and 5 of the low region are the same in both (the seeds are far
        // enough apart that no other chunk of one matches any of the other).
        assert_eq!(shared, 4);
        assert_eq!(store.len(), after_a + names(&b).len() - shared);
    }

    #[test]
    fn a_missing_altered_or_swapped_object_leaves_no_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let original = snapshot(&dir.path().join("a"), 1);
        let mut store = Store::new();
        let (manifest, _) = push(&original, &mut store);
        let names: Vec<ObjectName> = manifest
            .chunks
            .iter()
            .filter_map(|c| match c {
                StoreChunk::Data(n) => Some(*n),
                StoreChunk::Zero => None,
            })
            .collect();
        let target = dir.path().join("b");

        let mut missing = store.clone();
        missing.remove(&names[0]);
        assert!(matches!(
            pull(&target, &manifest, &missing),
            Err(TransferError::Store(_))
        ));
        assert!(!target.exists());

        let mut altered = store.clone();
        if let Some(object) = altered.get_mut(&names[1]) {
            let last = object.len() - 1;
            object[last] ^= 1;
        }
        assert!(matches!(
            pull(&target, &manifest, &altered),
            Err(TransferError::Object {
                source: ObjectError::Unauthentic { .. },
                ..
            })
        ));
        assert!(!target.exists());

        let mut swapped = store.clone();
        let other = swapped[&names[2]].clone();
        swapped.insert(names[1], other);
        assert!(matches!(
            pull(&target, &manifest, &swapped),
            Err(TransferError::Object { .. })
        ));
        assert!(!target.exists());
        // With the right objects it works, so the failures above were the objects'.
        pull(&target, &manifest, &store).unwrap();
    }

    /// A source whose first copy of each object in `rotten` is altered, as a cache's copy
    /// that rotted on disk; it counts the copies refused.
    struct Rotting<'a> {
        store: &'a Store,
        rotten: std::sync::Mutex<std::collections::HashSet<ObjectName>>,
        refused: std::sync::atomic::AtomicUsize,
    }

    impl ObjectSource for Rotting<'_> {
        fn object(&self, name: &ObjectName) -> Result<Vec<u8>, ObjectSourceError> {
            let mut object = Held(self.store).object(name)?;
            if self.rotten.lock().unwrap().contains(name) {
                object[20] ^= 0x40;
            }
            Ok(object)
        }

        fn refused(&self, name: &ObjectName) {
            self.rotten.lock().unwrap().remove(name);
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn a_copy_that_does_not_open_is_refused_and_asked_for_again() {
        let dir = tempfile::tempdir().unwrap();
        let original = snapshot(&dir.path().join("a"), 1);
        let mut store = Store::new();
        let (manifest, _) = push(&original, &mut store);
        let rotten: std::collections::HashSet<ObjectName> = store.keys().take(2).copied().collect();
        let source = Rotting {
            store: &store,
            rotten: std::sync::Mutex::new(rotten),
            refused: Default::default(),
        };
        let target = dir.path().join("b");
        import(
            &target,
            &manifest,
            &master(),
            &WriteOptions::default(),
            &source,
        )
        .unwrap();
        assert_eq!(source.refused.load(std::sync::atomic::Ordering::Relaxed), 2);
        let pulled = Snapshot::open(&target, Some(&master())).unwrap();
        assert_eq!(chunks_of(&pulled), chunks_of(&original));
    }

    /// Counts what it is asked for.
    struct Counting<'a> {
        store: &'a Store,
        asked: std::sync::Mutex<Vec<ObjectName>>,
    }

    impl ObjectSource for Counting<'_> {
        fn object(&self, name: &ObjectName) -> Result<Vec<u8>, ObjectSourceError> {
            self.asked.lock().unwrap().push(*name);
            Held(self.store).object(name)
        }
    }

    #[test]
    fn a_chunk_that_recurs_is_asked_for_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut low = vec![0u8; 8 * CHUNK];
        for (i, chunk) in low.chunks_mut(CHUNK).enumerate() {
            // Chunks 0, 2, 4 and 6 the same; 1, 3, 5 and 7 the same.
            chunk[..PAGE_SIZE].fill(1 + (i % 2) as u8);
        }
        let original = written(&dir.path().join("a"), &[(0, &low)]);
        let mut store = Store::new();
        let (manifest, _) = push(&original, &mut store);
        assert_eq!(store.len(), 2);
        let source = Counting {
            store: &store,
            asked: Default::default(),
        };
        let target = dir.path().join("b");
        import(
            &target,
            &manifest,
            &master(),
            &WriteOptions::default(),
            &source,
        )
        .unwrap();
        assert_eq!(source.asked.lock().unwrap().len(), 2);
        let pulled = Snapshot::open(&target, Some(&master())).unwrap();
        assert_eq!(chunks_of(&pulled), chunks_of(&original));
    }

    #[test]
    fn another_master_key_cannot_pull_the_objects() {
        let dir = tempfile::tempdir().unwrap();
        let original = snapshot(&dir.path().join("a"), 1);
        let mut store = Store::new();
        let (manifest, _) = push(&original, &mut store);
        let other = MasterKey::from_bytes([10; KEY_LEN]);
        let result = import(
            &dir.path().join("b"),
            &manifest,
            &other,
            &WriteOptions::default(),
            &Held(&store),
        );
        assert!(matches!(
            result,
            Err(TransferError::Object {
                source: ObjectError::Unauthentic { .. },
                ..
            })
        ));
    }
}

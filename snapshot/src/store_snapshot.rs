//! A snapshot whose memory stays in an object store: [`Snapshot::from_store`] makes a
//! [`Snapshot`] of an opened store manifest (`store_manifest`), and each of its chunks is read
//! by fetching its object from an [`ObjectSource`] and opening it against the name the
//! manifest gives (`store_object`), so a restore pages it in lazily like a snapshot file and
//! nothing unauthenticated reaches a guest. Where the objects come from (the store, a host
//! cache of them, many requests at once) is the source's business: the `store` crate.

use std::path::PathBuf;
use std::sync::Arc;

use crate::chunk::HashCheck;
use crate::error::ReadError;
use crate::format::{ChunkInfo, ChunkKind, Header, PAGE_SIZE, SectionRef};
use crate::keys::{KeyId, MasterKey};
use crate::reader::{Memory, RemoteChunks, Snapshot};
use crate::store_manifest::{StoreChunk, StoreManifest};
use crate::store_object::{OBJECT_ZSTD_LEVEL, ObjectError, ObjectName, StoreKeys};

/// An error of an [`ObjectSource`], boxed.
pub type ObjectSourceError = Box<dyn std::error::Error + Send + Sync>;

/// Where a snapshot in a store gets its chunk objects. Called from many threads at once (a
/// restore's page server, a decoder's pool).
pub trait ObjectSource: Send + Sync {
    /// The sealed object called `name`, as the store (or a copy of it) holds it. The snapshot
    /// opens and checks it: a source need not, and must not be trusted to.
    fn object(&self, name: &ObjectName) -> Result<Vec<u8>, ObjectSourceError>;

    /// These objects will be asked for soon, in this order: a source may start fetching them.
    fn prefetch(&self, _names: &[ObjectName]) {}

    /// The object last returned for `name` did not open. A source that keeps copies drops its
    /// copy, so that the next [`ObjectSource::object`] comes from the store itself.
    fn refused(&self, _name: &ObjectName) {}
}

/// The memory of a snapshot in a store: each data chunk's object name and how to open it.
pub(crate) struct StoreMemory {
    keys: StoreKeys,
    key_id: KeyId,
    /// Per chunk, its object's name; `None` for a zero chunk.
    names: Vec<Option<ObjectName>>,
    objects: Arc<dyn ObjectSource>,
    origin: PathBuf,
}

impl Snapshot {
    /// The snapshot `manifest` describes (opened with `master`, so authenticated and checked),
    /// its chunks read from `objects`. `origin` names where it lies, for messages (say
    /// `s3://bucket/prefix/snapshots/ID`).
    pub fn from_store(
        manifest: StoreManifest,
        master: &MasterKey,
        objects: Arc<dyn ObjectSource>,
        origin: PathBuf,
    ) -> Result<Snapshot, ReadError> {
        let invalid = |e: crate::store_manifest::ManifestError| ReadError::ManifestInvalid {
            reason: e.to_string(),
        };
        manifest.check().map_err(invalid)?;
        let mut chunks = Vec::with_capacity(manifest.chunks.len());
        let mut names = Vec::with_capacity(manifest.chunks.len());
        for ((guest_addr, len), entry) in manifest.layout() {
            let (kind, name) = match entry {
                StoreChunk::Zero => (ChunkKind::Zero, None),
                StoreChunk::Data(name) => (ChunkKind::Data, Some(name)),
            };
            chunks.push(ChunkInfo {
                guest_addr,
                len,
                kind,
            });
            names.push(name);
        }
        let working_set = match &manifest.working_set {
            // `check` refused an end code this version does not know.
            Some(ws) => ws.to_working_set(),
            None => None,
        };
        let header = Header {
            snapshot_id: manifest.snapshot_id.0,
            created_unix_nanos: manifest.created_unix_nanos,
            chunk_size: manifest.chunk_size,
            page_size: PAGE_SIZE as u32,
            vcpus: manifest.vcpus,
            zstd_level: OBJECT_ZSTD_LEVEL,
            chunk_count: chunks.len() as u64,
            regions: manifest.regions,
            fingerprint: manifest.fingerprint,
            // A store has no file sections.
            chunks: SectionRef::default(),
            state: SectionRef::default(),
            manifest: SectionRef::default(),
        };
        let memory = StoreMemory {
            keys: StoreKeys::derive(master),
            key_id: master.id(),
            names,
            objects,
            origin: origin.clone(),
        };
        Ok(Snapshot::from_parts(
            origin,
            header,
            manifest.state,
            chunks,
            working_set,
            Memory::Store(Box::new(memory)),
        ))
    }
}

impl RemoteChunks for StoreMemory {
    fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// Fetches chunk `index`'s object and opens it into `out` (the chunk's length).
    fn read_chunk(&self, index: usize, out: &mut [u8], hash: HashCheck) -> Result<(), ReadError> {
        self.open_chunk(index, out, hash).map(|_| ())
    }

    /// Asks the source to fetch these chunks' objects (zero chunks and repeats left out).
    fn prefetch(&self, chunks: &[u32]) {
        let mut seen = std::collections::HashSet::new();
        let names: Vec<ObjectName> = chunks
            .iter()
            .filter_map(|&c| self.names.get(c as usize).copied().flatten())
            .filter(|name| seen.insert(*name))
            .collect();
        if !names.is_empty() {
            self.objects.prefetch(&names);
        }
    }

    /// Fetches and opens every data chunk (all of them asked for at once, then opened on all
    /// cores); the bytes of the objects opened.
    fn authenticate_all(&self, chunks: &[ChunkInfo]) -> Result<u64, ReadError> {
        use rayon::prelude::*;
        let all: Vec<u32> = (0..chunks.len())
            .filter_map(|i| u32::try_from(i).ok())
            .collect();
        self.prefetch(&all);
        chunks
            .par_iter()
            .enumerate()
            .filter(|(_, c)| c.kind == ChunkKind::Data)
            .try_fold(
                || (Vec::new(), 0u64),
                |(mut buf, total), (index, c)| {
                    buf.resize(c.len as usize, 0);
                    let len = self.open_chunk(index, &mut buf, HashCheck::No)?;
                    Ok((buf, total + len as u64))
                },
            )
            .map(|r: Result<(Vec<u8>, u64), ReadError>| r.map(|(_, total)| total))
            .try_reduce(|| 0, |a, b| Ok(a + b))
    }
}

impl StoreMemory {
    /// [`StoreMemory::read_chunk`], returning the object's size (0 for a zero chunk). A copy
    /// that does not open is reported to the source and fetched once more: a host cache's copy
    /// may have rotted on disk while the store's is sound. The second failure is the chunk's.
    fn open_chunk(
        &self,
        index: usize,
        out: &mut [u8],
        hash: HashCheck,
    ) -> Result<usize, ReadError> {
        let name = match self.names.get(index) {
            Some(Some(name)) => name,
            Some(None) => {
                out.fill(0);
                return Ok(0);
            }
            None => {
                return Err(ReadError::NoSuchChunk {
                    index,
                    count: self.names.len(),
                });
            }
        };
        let mut failure = None;
        for _ in 0..2 {
            let object =
                self.objects
                    .object(name)
                    .map_err(|source| ReadError::ObjectUnavailable {
                        index,
                        name: *name,
                        origin: self.origin.clone(),
                        source,
                    })?;
            let opened = match hash {
                HashCheck::Yes => self.keys.open(name, &object, out),
                HashCheck::No => self.keys.open_authenticated(name, &object, out),
            };
            match opened {
                Ok(()) => return Ok(object.len()),
                Err(e) => {
                    tracing::warn!(chunk = index, object = %name, origin = %self.origin.display(), error = %e, "a chunk object was refused");
                    self.objects.refused(name);
                    failure = Some(e);
                }
            }
        }
        Err(match failure {
            Some(ObjectError::Corrupt { reason, .. }) => ReadError::ChunkCorrupt { index, reason },
            _ => ReadError::ChunkTampered { index },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;
    use crate::fingerprint::Fingerprint;
    use crate::format::RegionDesc;
    use crate::keys::KEY_LEN;
    use crate::store_manifest::StoreWorkingSet;
    use crate::working_set::RecordingEnd;

    const CHUNK: usize = 4 * PAGE_SIZE;

    #[derive(Default)]
    struct Objects {
        held: Mutex<HashMap<ObjectName, Vec<u8>>>,
        /// Returned once, instead of the held object, for these names.
        rotten: Mutex<HashMap<ObjectName, Vec<u8>>>,
        fetched: Mutex<Vec<ObjectName>>,
        prefetched: Mutex<Vec<ObjectName>>,
        refused: Mutex<Vec<ObjectName>>,
    }

    impl ObjectSource for Objects {
        fn object(&self, name: &ObjectName) -> Result<Vec<u8>, ObjectSourceError> {
            self.fetched.lock().unwrap().push(*name);
            if let Some(bad) = self.rotten.lock().unwrap().remove(name) {
                return Ok(bad);
            }
            self.held
                .lock()
                .unwrap()
                .get(name)
                .cloned()
                .ok_or_else(|| format!("no object {name}").into())
        }

        fn prefetch(&self, names: &[ObjectName]) {
            self.prefetched.lock().unwrap().extend_from_slice(names);
        }

        fn refused(&self, name: &ObjectName) {
            self.refused.lock().unwrap().push(*name);
        }
    }

    fn master() -> MasterKey {
        MasterKey::from_bytes([5; KEY_LEN])
    }

    /// Six chunks: 0 and 3 zero, 1 and 4 the same, the others their own.
    fn stored() -> (StoreManifest, Arc<Objects>, Vec<Vec<u8>>) {
        let keys = StoreKeys::derive(&master());
        let objects = Arc::new(Objects::default());
        let mut plain = Vec::new();
        let mut entries = Vec::new();
        for i in 0..6u8 {
            let mut chunk = vec![0u8; CHUNK];
            if i % 3 != 0 {
                chunk[..100].fill(if i == 4 { 1 } else { i });
                let (name, object) = keys.seal(&chunk, 1).unwrap();
                objects.held.lock().unwrap().insert(name, object);
                entries.push(StoreChunk::Data(name));
            } else {
                entries.push(StoreChunk::Zero);
            }
            plain.push(chunk);
        }
        let manifest = StoreManifest {
            snapshot_id: crate::SnapshotId([3; 16]),
            created_unix_nanos: 1,
            chunk_size: CHUNK as u32,
            vcpus: 1,
            regions: vec![RegionDesc {
                guest_addr: 0,
                size: (6 * CHUNK) as u64,
            }],
            fingerprint: Fingerprint::made_up(),
            chunks: entries,
            state: b"state".to_vec(),
            working_set: Some(StoreWorkingSet {
                chunks: vec![4, 0, 2],
                recorded_unix_nanos: 2,
                faults: 3,
                ended_by: 1,
            }),
        };
        (manifest, objects, plain)
    }

    fn open(manifest: StoreManifest, objects: &Arc<Objects>) -> Snapshot {
        Snapshot::from_store(
            manifest,
            &master(),
            objects.clone(),
            PathBuf::from("s3://bucket/snapshots/x"),
        )
        .unwrap()
    }

    #[test]
    fn a_snapshot_in_a_store_reads_each_chunk_from_its_object() {
        let (manifest, objects, plain) = stored();
        let snap = open(manifest.clone(), &objects);
        assert!(snap.in_store());
        assert_eq!(snap.id(), manifest.snapshot_id);
        assert_eq!(snap.state(), b"state");
        assert_eq!(snap.regions(), manifest.regions.as_slice());
        assert_eq!(
            snap.working_set()
                .map(|ws| (ws.chunks.clone(), ws.ended_by)),
            Some((vec![4, 0, 2], RecordingEnd::FirstResponse))
        );
        let kinds: Vec<ChunkKind> = snap.chunks().iter().map(|c| c.kind).collect();
        assert_eq!(kinds[0], ChunkKind::Zero);
        assert_eq!(kinds[1], ChunkKind::Data);
        for (i, want) in plain.iter().enumerate() {
            let mut out = vec![0xffu8; CHUNK];
            snap.read_chunk_authenticated(i, &mut out).unwrap();
            assert_eq!(&out, want, "chunk {i}");
        }
        // Zero chunks fetch nothing: four data chunks, four fetches.
        assert_eq!(objects.fetched.lock().unwrap().len(), 4);
        assert_eq!(snap.verify(1).unwrap().chunks_checked, 6);
        assert!(snap.layout().is_none());
        assert_eq!(snap.info().file_bytes, 0);

        // Prefetching leaves out zero chunks and objects named twice (1 and 4 are the same).
        snap.prefetch_chunks(&[4, 0, 1, 2]);
        let names = |i: usize| match manifest.chunks[i] {
            StoreChunk::Data(name) => name,
            StoreChunk::Zero => unreachable!(),
        };
        assert_eq!(
            *objects.prefetched.lock().unwrap(),
            vec![names(4), names(2)]
        );
    }

    #[test]
    fn a_copy_that_does_not_open_is_dropped_and_fetched_again_and_a_bad_store_copy_is_refused() {
        let (manifest, objects, plain) = stored();
        let StoreChunk::Data(two) = manifest.chunks[2] else {
            unreachable!()
        };
        let StoreChunk::Data(five) = manifest.chunks[5] else {
            unreachable!()
        };
        let snap = open(manifest, &objects);
        // A rotten copy (a cache's) once: refused, reported, fetched again, and it reads.
        let mut bad = objects.held.lock().unwrap()[&two].clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        objects.rotten.lock().unwrap().insert(two, bad);
        let mut out = vec![0u8; CHUNK];
        snap.read_chunk_authenticated(2, &mut out).unwrap();
        assert_eq!(out, plain[2]);
        assert_eq!(*objects.refused.lock().unwrap(), vec![two]);

        // The store's own copy swapped for another chunk's object: refused for good.
        let swapped = objects.held.lock().unwrap()[&two].clone();
        objects.held.lock().unwrap().insert(five, swapped);
        assert!(matches!(
            snap.read_chunk_authenticated(5, &mut out),
            Err(ReadError::ChunkTampered { index: 5 })
        ));
        assert!(snap.authenticate_chunks().is_err());

        // An object the source cannot get is a clear error naming the chunk and its object.
        objects.held.lock().unwrap().remove(&five);
        let err = snap.read_chunk_authenticated(5, &mut out).unwrap_err();
        assert!(
            matches!(err, ReadError::ObjectUnavailable { index: 5, name, .. } if name == five),
            "{err}"
        );
    }

    #[test]
    fn another_master_key_reads_nothing() {
        let (manifest, objects, _) = stored();
        let other = MasterKey::from_bytes([6; KEY_LEN]);
        let snap =
            Snapshot::from_store(manifest, &other, objects, PathBuf::from("s3://b/x")).unwrap();
        let mut out = vec![0u8; CHUNK];
        assert!(matches!(
            snap.read_chunk_authenticated(1, &mut out),
            Err(ReadError::ChunkTampered { index: 1 })
        ));
    }
}

//! Push and pull against two independent S3 implementations on loopback, started here
//! (`store::test_servers`): `s3s-fs` (Rust) and `moto`'s server (Python).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapshot::{
    Fingerprint, MasterKey, MemoryRegion, Protection, Snapshot, SnapshotMeta, WriteOptions,
};
use store::test_servers::{
    ACCESS_KEY, BUCKET, SECRET_KEY, Server, chunk_files, free_port, moto, s3s_fs,
};
use store::{Credentials, ObjectCache, Secret, Store, StoreError, StoreOptions, StoreUrl};

fn connect(server: &Server, prefix: &str) -> Store {
    let url: StoreUrl = format!("s3://{BUCKET}/{prefix}").parse().unwrap();
    Store::connect(&url, &server.options()).unwrap()
}

fn master() -> MasterKey {
    MasterKey::from_bytes([0x5a; 32])
}

const CHUNK: usize = 64 << 10;

/// A snapshot of 24 chunks: a third zeros, chunks 1..8 the same whatever `seed`, the rest
/// depending on it.
fn snapshot(dir: &Path, seed: u8) -> Snapshot {
    let mut memory = vec![0u8; 24 * CHUNK];
    for (i, chunk) in memory.chunks_mut(CHUNK).enumerate() {
        if i % 3 == 0 {
            continue;
        }
        let byte = if i < 8 {
            i as u8
        } else {
            seed.wrapping_mul(31).wrapping_add(i as u8)
        };
        for (j, b) in chunk.iter_mut().enumerate().step_by(61) {
            *b = byte ^ (j as u8);
        }
    }
    let meta = SnapshotMeta {
        fingerprint: Fingerprint::made_up(),
        vcpus: 1,
    };
    let region = [MemoryRegion {
        guest_addr: 0,
        bytes: &memory,
    }];
    let options = WriteOptions {
        chunk_size: CHUNK as u32,
        threads: 1,
        ..WriteOptions::default()
    };
    let key = master();
    snapshot::write(
        dir,
        &meta,
        b"vm state",
        &region,
        &Protection::Encrypted(&key),
        &options,
    )
    .unwrap();
    Snapshot::open(dir, Some(&key)).unwrap()
}

fn memory_of(snap: &Snapshot) -> Vec<Vec<u8>> {
    (0..snap.chunks().len())
        .map(|i| {
            let mut out = vec![0u8; snap.chunks()[i].len as usize];
            snap.read_chunk_authenticated(i, &mut out).unwrap();
            out
        })
        .collect()
}

/// Push, push again (nothing new), pull, and the pulled snapshot is the pushed one.
fn push_and_pull(server: &Server) {
    let dir = tempfile::tempdir().unwrap();
    let original = snapshot(&dir.path().join("a"), 1);
    let store = connect(server, "fleet/one");
    let pushed = store.push(&dir.path().join("a"), &master()).unwrap();
    assert_eq!(pushed.snapshot_id, original.id());
    assert_eq!((pushed.chunks, pushed.data_chunks), (24, 16));
    assert_eq!(pushed.uploaded, pushed.objects);
    assert!(pushed.manifest_uploaded);
    let again = store.push(&dir.path().join("a"), &master()).unwrap();
    assert_eq!(
        (again.uploaded, again.manifest_uploaded),
        (0, false),
        "{again:?}"
    );

    store
        .pull(original.id(), &dir.path().join("b"), &master(), None)
        .unwrap();
    let pulled = Snapshot::open(&dir.path().join("b"), Some(&master())).unwrap();
    assert_eq!(pulled.id(), original.id());
    assert_eq!(pulled.state(), original.state());
    assert_eq!(memory_of(&pulled), memory_of(&original));
    pulled.verify(1).unwrap();

    // A second snapshot with chunks in common uploads only what is new.
    let other = snapshot(&dir.path().join("c"), 2);
    let second = store.push(&dir.path().join("c"), &master()).unwrap();
    assert_eq!(second.snapshot_id, other.id());
    assert_eq!(second.objects, 16);
    assert_eq!(
        second.uploaded,
        16 - 5,
        "chunks 1, 2, 4, 5 and 7 are shared: {second:?}"
    );

    let missing = store.pull(
        snapshot::SnapshotId([1; 16]),
        &dir.path().join("d"),
        &master(),
        None,
    );
    assert!(
        matches!(missing, Err(StoreError::NoSuchSnapshot { .. })),
        "{missing:?}"
    );
    assert!(!dir.path().join("d").exists());
}

#[test]
fn a_snapshot_pushed_to_s3s_fs_is_pulled_back_whole() {
    push_and_pull(&s3s_fs());
}

#[test]
fn a_snapshot_pushed_to_moto_is_pulled_back_whole() {
    push_and_pull(&moto());
}

#[test]
fn an_object_altered_or_swapped_in_the_store_is_refused_and_leaves_no_snapshot() {
    let server = s3s_fs();
    let dir = tempfile::tempdir().unwrap();
    let original = snapshot(&dir.path().join("a"), 1);
    let store = connect(&server, "tampered");
    store.push(&dir.path().join("a"), &master()).unwrap();
    let files = chunk_files(&server, "tampered");
    assert_eq!(files.len(), 16);
    let target = dir.path().join("b");

    // One bit of one object.
    let good = std::fs::read(&files[3]).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    std::fs::write(&files[3], &bad).unwrap();
    let err = store
        .pull(original.id(), &target, &master(), None)
        .unwrap_err();
    assert!(matches!(err, StoreError::Pull(_)), "{err:?}");
    assert!(!target.exists());
    std::fs::write(&files[3], &good).unwrap();

    // One object in another's place.
    let other = std::fs::read(&files[4]).unwrap();
    std::fs::write(&files[3], &other).unwrap();
    let err = store
        .pull(original.id(), &target, &master(), None)
        .unwrap_err();
    assert!(matches!(err, StoreError::Pull(_)), "{err:?}");
    assert!(!target.exists());
    std::fs::write(&files[3], &good).unwrap();

    // Another master key reads nothing.
    let err = store
        .pull(
            original.id(),
            &target,
            &MasterKey::from_bytes([1; 32]),
            None,
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::Manifest { .. }), "{err:?}");

    store.pull(original.id(), &target, &master(), None).unwrap();
}

/// A pull through the host cache keeps what it fetched, so pulling again (another thawd
/// registering the snapshot, or the same after a restart) fetches nothing; a cached copy
/// that rotted is dropped and fetched again.
#[test]
fn a_pull_through_the_host_cache_fetches_each_object_once() {
    let server = s3s_fs();
    let dir = tempfile::tempdir().unwrap();
    let original = snapshot(&dir.path().join("a"), 1);
    let store = connect(&server, "pull-cache");
    store.push(&dir.path().join("a"), &master()).unwrap();
    let cache_dir = dir.path().join("cache");
    let cache = Arc::new(ObjectCache::open(&cache_dir, 1 << 30).unwrap());
    let first = store
        .pull(
            original.id(),
            &dir.path().join("b"),
            &master(),
            Some(cache.clone()),
        )
        .unwrap();
    assert_eq!((first.fetched.fetched, first.fetched.cache_hits), (16, 0));
    drop(cache);

    // Reopened, as after a restart; one cached object rots.
    let cache = Arc::new(ObjectCache::open(&cache_dir, 1 << 30).unwrap());
    let mut cached: Vec<_> = std::fs::read_dir(&cache_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    cached.sort();
    assert_eq!(cached.len(), 16, "{cached:?}");
    let mut rotten = std::fs::read(&cached[0]).unwrap();
    rotten[30] ^= 1;
    std::fs::write(&cached[0], &rotten).unwrap();
    let second = store
        .pull(original.id(), &dir.path().join("c"), &master(), Some(cache))
        .unwrap();
    assert_eq!(
        (second.fetched.fetched, second.fetched.cache_hits),
        (1, 16),
        "the rotten copy is fetched again"
    );
    let pulled = Snapshot::open(&dir.path().join("c"), Some(&master())).unwrap();
    assert_eq!(memory_of(&pulled), memory_of(&original));
    pulled.verify(1).unwrap();
}

#[test]
fn a_store_that_is_down_is_reported_within_the_retry_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let snap = snapshot(&dir.path().join("a"), 1);
    let port = free_port(); // nothing listens there
    let url: StoreUrl = format!("s3://{BUCKET}/down").parse().unwrap();
    let store = Store::connect(
        &url,
        &StoreOptions {
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            region: Some("us-east-1".into()),
            credentials: Some(Credentials {
                access_key_id: ACCESS_KEY.into(),
                secret_access_key: Secret(SECRET_KEY.into()),
            }),
            max_retries: 2,
            retry_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(1),
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let started = Instant::now();
    let err = store.push(&dir.path().join("a"), &master()).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let text = format!("{err}: {:?}", err);
    assert!(
        text.contains(&port.to_string()) || text.contains("HEAD"),
        "{text}"
    );
    let err = store
        .pull(snap.id(), &dir.path().join("b"), &master(), None)
        .unwrap_err();
    assert!(matches!(err, StoreError::Request(_)), "{err:?}");
    assert!(!dir.path().join("b").exists());
    // The secret never shows in what a failure prints.
    assert!(!format!("{err:?} {:?}", store_options_debug()).contains(SECRET_KEY));
}

fn store_options_debug() -> StoreOptions {
    StoreOptions {
        credentials: Some(Credentials {
            access_key_id: ACCESS_KEY.into(),
            secret_access_key: Secret(SECRET_KEY.into()),
        }),
        ..StoreOptions::default()
    }
}

/// Opened where it is, a snapshot reads every chunk from the store once (however many threads
/// ask, prefetched or not), and after a restart from the host cache alone.
fn lazy_open(server: &Server) {
    let dir = tempfile::tempdir().unwrap();
    let original = snapshot(&dir.path().join("a"), 3);
    let store = connect(server, "lazy");
    let pushed = store.push(&dir.path().join("a"), &master()).unwrap();
    let cache_dir = dir.path().join("cache");
    let want = memory_of(&original);

    let cache = Arc::new(ObjectCache::open(&cache_dir, 64 << 20).unwrap());
    let (snap, objects) = store
        .open_snapshot(original.id(), &master(), Some(cache))
        .unwrap();
    assert!(snap.in_store());
    assert_eq!(snap.state(), original.state());
    snap.prefetch_chunks(&[5, 4, 2, 1]);
    let snap = Arc::new(snap);
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let snap = snap.clone();
            std::thread::spawn(move || memory_of(&snap))
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.join().unwrap(), want);
    }
    let stats = objects.stats();
    assert_eq!(
        stats.fetched as usize, pushed.objects,
        "each object once: {stats:?}"
    );
    drop(snap);

    // A new process: the cache has everything, the store is asked for the manifest only.
    let cache = Arc::new(ObjectCache::open(&cache_dir, 64 << 20).unwrap());
    assert_eq!(cache.stats().objects as usize, pushed.objects);
    let (snap, objects) = store
        .open_snapshot(original.id(), &master(), Some(cache.clone()))
        .unwrap();
    assert_eq!(memory_of(&snap), want);
    assert_eq!(objects.stats().fetched, 0);
    assert_eq!(cache.stats().misses, 0);

    // A cached copy that rotted on disk is dropped and fetched again.
    let name = cache_dir
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&name).unwrap();
    bytes[20] ^= 1;
    std::fs::write(&name, bytes).unwrap();
    assert_eq!(memory_of(&snap), want);
    assert_eq!(objects.stats().fetched, 1);
    assert_eq!(cache.stats().removed, 1);
}

#[test]
fn a_snapshot_opened_in_s3s_fs_reads_each_object_once_then_from_the_cache() {
    lazy_open(&s3s_fs());
}

#[test]
fn a_snapshot_opened_in_moto_reads_each_object_once_then_from_the_cache() {
    lazy_open(&moto());
}

#[test]
fn a_store_that_stops_answering_fails_the_chunk_within_its_deadline() {
    let server = s3s_fs();
    let dir = tempfile::tempdir().unwrap();
    let original = snapshot(&dir.path().join("a"), 4);
    let url: StoreUrl = format!("s3://{BUCKET}/silent").parse().unwrap();
    let store = Store::connect(
        &url,
        &StoreOptions {
            fetch_deadline: Duration::from_secs(2),
            ..server.options()
        },
    )
    .unwrap();
    store.push(&dir.path().join("a"), &master()).unwrap();
    let (snap, _) = store.open_snapshot(original.id(), &master(), None).unwrap();
    // The store now accepts connections and never answers.
    let port: u16 = server.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    drop(server);
    let silent = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let _held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for conn in silent.incoming().flatten() {
            open.push(conn);
        }
    });
    let started = Instant::now();
    let mut out = vec![0u8; CHUNK];
    let err = snap.read_chunk_authenticated(1, &mut out).unwrap_err();
    assert!(
        matches!(err, snapshot::ReadError::ObjectUnavailable { index: 1, .. }),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(format!("{err:?}").contains("within"), "{err:?}");
}

//! [`StoreObjects`]: where a snapshot opened from a store gets its chunk objects: the host
//! cache first, else the store, one `GET` per object with many in flight when a restore says
//! what it will need (its working set, its startup set), and every object fetched once however
//! many threads ask for it at the same time. The snapshot opens and checks each object; this
//! only moves bytes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use object_store::ObjectStore;
use snapshot::store_object::ObjectName;
use snapshot::store_snapshot::{ObjectSource, ObjectSourceError};

use crate::cache::ObjectCache;
use crate::{Client, MAX_OBJECT_LEN, StoreError, StoreUrl, get_bounded};

/// Counts of a [`StoreObjects`] since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObjectStats {
    /// Objects and bytes fetched from the store.
    pub fetched: u64,
    pub fetched_bytes: u64,
    /// Objects served from the host cache.
    pub cache_hits: u64,
}

/// One object being fetched: its result, once there, for whoever asks.
#[derive(Default)]
struct Fetch {
    done: Mutex<Option<Result<Arc<Vec<u8>>, String>>>,
    ready: Condvar,
}

impl Fetch {
    fn finish(&self, result: Result<Arc<Vec<u8>>, String>) {
        *self
            .done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(result);
        self.ready.notify_all();
    }

    fn wait(&self) -> Result<Arc<Vec<u8>>, String> {
        let mut done = self
            .done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if let Some(result) = done.as_ref() {
                return result.clone();
            }
            done = self
                .ready
                .wait(done)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

/// The chunk objects of one store, through an optional host cache (see the module docs).
pub struct StoreObjects {
    s3: Arc<Client>,
    url: StoreUrl,
    runtime: Arc<tokio::runtime::Runtime>,
    cache: Option<Arc<ObjectCache>>,
    /// Requests in flight for prefetches at most.
    limit: Arc<tokio::sync::Semaphore>,
    /// One fetch's limit, retries included: a chunk that cannot be had by then fails.
    deadline: Duration,
    /// Fetches started and not yet taken by a reader.
    fetching: Mutex<HashMap<ObjectName, Arc<Fetch>>>,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    fetched: AtomicU64,
    fetched_bytes: AtomicU64,
    cache_hits: AtomicU64,
}

impl Counts {
    /// `name` came from the store: count it and keep a copy in the cache.
    fn fetched(&self, cache: Option<&ObjectCache>, name: &ObjectName, bytes: &[u8]) {
        self.fetched.fetch_add(1, Ordering::Relaxed);
        self.fetched_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if let Some(cache) = cache {
            cache.insert(name, bytes);
        }
    }
}

impl StoreObjects {
    pub(crate) fn new(
        s3: Arc<Client>,
        url: StoreUrl,
        runtime: Arc<tokio::runtime::Runtime>,
        cache: Option<Arc<ObjectCache>>,
        concurrency: usize,
        deadline: Duration,
    ) -> StoreObjects {
        StoreObjects {
            s3,
            url,
            runtime,
            cache,
            limit: Arc::new(tokio::sync::Semaphore::new(concurrency.max(1))),
            deadline,
            fetching: Mutex::new(HashMap::new()),
            counts: Arc::default(),
        }
    }

    pub fn stats(&self) -> ObjectStats {
        ObjectStats {
            fetched: self.counts.fetched.load(Ordering::Relaxed),
            fetched_bytes: self.counts.fetched_bytes.load(Ordering::Relaxed),
            cache_hits: self.counts.cache_hits.load(Ordering::Relaxed),
        }
    }

    pub fn cache(&self) -> Option<&Arc<ObjectCache>> {
        self.cache.as_ref()
    }

    fn fetching(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectName, Arc<Fetch>>> {
        self.fetching
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Fetches `name` from the store within the deadline.
    async fn fetch(
        s3: Arc<dyn ObjectStore>,
        url: StoreUrl,
        name: ObjectName,
        deadline: Duration,
    ) -> Result<Vec<u8>, String> {
        let path = url.chunk(&name);
        match tokio::time::timeout(deadline, get_bounded(&*s3, &path, MAX_OBJECT_LEN)).await {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(e)) => Err(error_chain(&e)),
            Err(_) => Err(format!(
                "GET {path} got no whole answer within {deadline:?}"
            )),
        }
    }
}

impl ObjectSource for StoreObjects {
    fn object(&self, name: &ObjectName) -> Result<Vec<u8>, ObjectSourceError> {
        // A fetch under way (a prefetch, or another thread's): wait for it and take it.
        let started = self.fetching().get(name).cloned();
        if let Some(fetch) = started {
            return take(&self.fetching, name, &fetch);
        }
        if let Some(bytes) = self.cache.as_ref().and_then(|c| c.get(name)) {
            self.counts.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(bytes);
        }
        // Fetch it here, unless another thread started meanwhile (then wait for that one) or
        // finished (then its copy is in the cache).
        let fetch = {
            let mut fetching = self.fetching();
            if let Some(fetch) = fetching.get(name).cloned() {
                drop(fetching);
                return take(&self.fetching, name, &fetch);
            }
            if self.cache.as_ref().is_some_and(|c| c.contains(name)) {
                drop(fetching);
                return self.object(name);
            }
            let fetch = Arc::new(Fetch::default());
            fetching.insert(*name, fetch.clone());
            fetch
        };
        let result = match self.s3.get() {
            Ok(s3) => {
                self.runtime
                    .block_on(Self::fetch(s3, self.url.clone(), *name, self.deadline))
            }
            Err(e) => Err(e.to_string()),
        };
        if let Ok(bytes) = &result {
            self.counts.fetched(self.cache.as_deref(), name, bytes);
        }
        // Threads waiting on it have their handle; later ones find the cache's copy.
        self.fetching().remove(name);
        let result = result.map(Arc::new);
        fetch.finish(result.clone());
        match result {
            Ok(bytes) => Ok(Arc::try_unwrap(bytes).unwrap_or_else(|shared| (*shared).clone())),
            Err(e) => Err(e.into()),
        }
    }

    fn prefetch(&self, names: &[ObjectName]) {
        // Waits for the client only if there is something to fetch.
        let mut s3 = None;
        for name in names {
            if self.cache.as_ref().is_some_and(|c| c.contains(name)) {
                continue;
            }
            let fetch = {
                let mut fetching = self.fetching();
                if fetching.contains_key(name) {
                    continue;
                }
                let fetch = Arc::new(Fetch::default());
                fetching.insert(*name, fetch.clone());
                fetch
            };
            let client = match &s3 {
                Some(client) => Arc::clone(client),
                None => match self.s3.get() {
                    Ok(client) => {
                        s3 = Some(client.clone());
                        client
                    }
                    Err(e) => {
                        self.fetching().remove(name);
                        fetch.finish(Err(e.to_string()));
                        continue;
                    }
                },
            };
            let (s3, url, limit, deadline, name) = (
                client,
                self.url.clone(),
                self.limit.clone(),
                self.deadline,
                *name,
            );
            let (cache, counts) = (self.cache.clone(), self.counts.clone());
            self.runtime.spawn(async move {
                // Acquired in the order the names came: the semaphore is fair.
                let _permit = limit.acquire_owned().await;
                let result = Self::fetch(s3, url, name, deadline).await;
                if let Ok(bytes) = &result {
                    counts.fetched(cache.as_deref(), &name, bytes);
                }
                fetch.finish(result.map(Arc::new));
            });
        }
    }

    fn refused(&self, name: &ObjectName) {
        self.fetching().remove(name);
        if let Some(cache) = &self.cache {
            cache.remove(name);
        }
    }
}

/// Waits for `fetch` of `name` and takes its result out of `fetching`.
fn take(
    fetching: &Mutex<HashMap<ObjectName, Arc<Fetch>>>,
    name: &ObjectName,
    fetch: &Arc<Fetch>,
) -> Result<Vec<u8>, ObjectSourceError> {
    let result = fetch.wait();
    let mut fetching = fetching
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if fetching.get(name).is_some_and(|f| Arc::ptr_eq(f, fetch)) {
        fetching.remove(name);
    }
    drop(fetching);
    match result {
        Ok(bytes) => Ok((*bytes).clone()),
        Err(e) => Err(e.into()),
    }
}

/// An error and its causes on one line (object_store's errors nest the HTTP cause).
fn error_chain(e: &StoreError) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

//! Snapshots in an S3-compatible object store (docs/store.md): `push` turns a local snapshot
//! into sealed, content-addressed chunk objects and one sealed manifest object; `pull` turns
//! them back into a local snapshot with the same id. The objects are made and checked by the
//! `snapshot` crate (`store_object`, `store_manifest`, `store_transfer`); this crate moves them,
//! with `object_store`'s S3 client.
//!
//! ```text
//! s3://BUCKET/PREFIX/chunks/<name>                     one per distinct chunk of a master key
//! s3://BUCKET/PREFIX/snapshots/<snapshot id>/manifest  one per snapshot
//! ```
//!
//! Credentials, region and endpoint come from the environment as AWS's tools read them
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` or
//! `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`), then from the AWS profile (`profile`:
//! `AWS_PROFILE`, `~/.aws/credentials`, `~/.aws/config`); none of them is ever logged.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};
use snapshot::store_manifest::{MAX_MANIFEST_OBJECT_LEN, ManifestError, StoreChunk, StoreManifest};
use snapshot::store_object::{MAX_OBJECT_PLAINTEXT, OBJECT_HEADER_LEN, ObjectName};
use snapshot::store_transfer::{self, TransferError};
use snapshot::{MasterKey, ReadError, Snapshot, SnapshotId, WriteOptions, WriteSummary};

pub mod cache;
pub mod objects;
pub mod profile;
#[cfg(feature = "test-servers")]
pub mod test_servers;

pub use cache::{CacheError, CacheStats, ObjectCache};
pub use objects::{ObjectStats, StoreObjects};

/// How long a manifest kept in the host cache is used without asking the store. A snapshot's
/// memory and state never change; only its working set may be added by a later push, which a
/// restore then sees this much later at most.
pub const MANIFEST_FRESH: Duration = Duration::from_secs(600);

/// The largest chunk object a reader fetches: a raw payload of the largest chunk, its header
/// and tag.
const MAX_OBJECT_LEN: u64 = (OBJECT_HEADER_LEN + MAX_OBJECT_PLAINTEXT + 16) as u64;

/// Where a store's snapshots live: `s3://BUCKET[/PREFIX]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreUrl {
    pub bucket: String,
    /// Without leading or trailing slashes; empty for the bucket's root.
    pub prefix: String,
}

impl std::str::FromStr for StoreUrl {
    type Err = StoreError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &'static str| StoreError::Url {
            url: url.into(),
            reason,
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("it does not start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid_bucket {
            return Err(bad(
                "the bucket name must be 3-63 lowercase letters, digits, dots or hyphens",
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|part| part == "." || part == "..")
            || prefix.contains("//")
            || prefix.chars().any(char::is_control)
        {
            return Err(bad(
                "the prefix has an empty, '.' or '..' part, or a control character",
            ));
        }
        Ok(StoreUrl {
            bucket: bucket.into(),
            prefix: prefix.into(),
        })
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.prefix.as_str() {
            "" => write!(f, "s3://{}", self.bucket),
            prefix => write!(f, "s3://{}/{prefix}", self.bucket),
        }
    }
}

/// One snapshot in a store, as thawd's config names it:
/// `s3://BUCKET[/PREFIX]/snapshots/<snapshot id>` (where its manifest lies).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreSnapshotUrl {
    pub store: StoreUrl,
    pub id: SnapshotId,
}

impl std::str::FromStr for StoreSnapshotUrl {
    type Err = StoreError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &'static str| StoreError::Url {
            url: url.into(),
            reason,
        };
        let trimmed = url.trim_end_matches('/');
        let (store, id) = trimmed
            .rsplit_once('/')
            .and_then(|(rest, id)| Some((rest.strip_suffix("/snapshots")?, id)))
            .ok_or_else(|| bad("a snapshot is named s3://BUCKET[/PREFIX]/snapshots/<id>"))?;
        let id = id
            .parse()
            .map_err(|_| bad("the snapshot id must be 32 hexadecimal digits"))?;
        Ok(StoreSnapshotUrl {
            store: store.parse()?,
            id,
        })
    }
}

impl std::fmt::Display for StoreSnapshotUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/snapshots/{}", self.store, self.id)
    }
}

impl StoreUrl {
    fn path(&self, rest: &str) -> ObjectPath {
        match self.prefix.as_str() {
            "" => ObjectPath::from(rest),
            prefix => ObjectPath::from(format!("{prefix}/{rest}")),
        }
    }

    fn chunk(&self, name: &ObjectName) -> ObjectPath {
        self.path(&format!("chunks/{name}"))
    }

    fn manifest(&self, id: SnapshotId) -> ObjectPath {
        self.path(&format!("snapshots/{id}/manifest"))
    }
}

/// A secret that never reaches `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Static credentials, for when they are not in the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
}

/// How a store is reached and how hard it is tried. What is `None` here comes from the
/// environment, as AWS's tools take it.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// The S3 endpoint (`AWS_ENDPOINT_URL`; AWS's own by default).
    pub endpoint: Option<String>,
    /// The region (`AWS_REGION`, `AWS_DEFAULT_REGION`).
    pub region: Option<String>,
    /// Static credentials (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`).
    pub credentials: Option<Credentials>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Requests in flight at once for a restore's prefetch (its startup and working sets):
    /// more than for push and pull, since a guest is waiting on them in order.
    pub prefetch_concurrency: usize,
    /// Retries of a failed request (errors, timeouts, 5xx, throttling), with exponential
    /// backoff and jitter.
    pub max_retries: usize,
    /// No retry starts later than this after the first attempt.
    pub retry_timeout: Duration,
    /// One attempt's limit.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// A restore's limit for one chunk object, retries included: a chunk that cannot be had by
    /// then fails the restore (its guest is stopped) with the request that failed.
    pub fetch_deadline: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            endpoint: None,
            region: None,
            credentials: None,
            concurrency: 16,
            prefetch_concurrency: 64,
            max_retries: 6,
            retry_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            fetch_deadline: Duration::from_secs(20),
        }
    }
}

/// One request to the store that failed, after its retries.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path} failed")]
pub struct RequestError {
    pub op: &'static str,
    pub path: String,
    #[source]
    pub source: object_store::Error,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{url:?} is not a snapshot store URL: {reason}")]
    Url { url: String, reason: &'static str },
    #[error("cannot set up the S3 client for {url}: {reason}")]
    Client { url: String, reason: String },
    #[error("cannot start the store client's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot open the local snapshot")]
    Local(#[source] ReadError),
    #[error("the store request")]
    Request(#[from] RequestError),
    #[error("the AWS profile")]
    Profile(#[from] profile::ProfileError),
    #[error("moving the snapshot")]
    Transfer(#[from] TransferError<RequestError>),
    #[error("pulling the snapshot")]
    Pull(#[from] TransferError<store_transfer::SourceError>),
    #[error("{url} holds no snapshot {id}")]
    NoSuchSnapshot { url: String, id: SnapshotId },
    #[error("the store's manifest of snapshot {id}")]
    Manifest {
        id: SnapshotId,
        #[source]
        source: ManifestError,
    },
    #[error("{path} is {len} bytes, more than such an object can be ({max})")]
    Oversized { path: String, len: u64, max: u64 },
    #[error("the upload stopped before every chunk was handed to it")]
    UploadStopped,
}

/// What a push did.
#[derive(Clone, Debug)]
pub struct PushSummary {
    pub snapshot_id: SnapshotId,
    pub chunks: usize,
    pub data_chunks: usize,
    /// Distinct chunk objects this snapshot names.
    pub objects: usize,
    /// Of those, the ones the store did not hold yet.
    pub uploaded: usize,
    pub uploaded_bytes: u64,
    /// Whether the manifest was written (false: the store held this very manifest).
    pub manifest_uploaded: bool,
}

/// A connection to one store URL.
pub struct Store {
    url: StoreUrl,
    s3: Arc<Client>,
    options: StoreOptions,
    runtime: Arc<tokio::runtime::Runtime>,
}

/// The S3 client, built when the first request needs it: building it loads the system's CA
/// roots (3-4 ms of CPU here), which a restore served from the host cache never needs and
/// would otherwise share the host's cores with.
pub(crate) struct Client {
    url: String,
    built: std::sync::OnceLock<Result<Arc<dyn ObjectStore>, String>>,
    builder: std::sync::Mutex<Option<AmazonS3Builder>>,
}

impl Client {
    /// The client, once built; the builder's refusal (a bad endpoint, say) as an error.
    pub(crate) fn get(&self) -> Result<Arc<dyn ObjectStore>, StoreError> {
        let built = self.built.get_or_init(|| {
            let builder = self
                .builder
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            match builder.map(AmazonS3Builder::build) {
                Some(Ok(s3)) => Ok(Arc::new(s3) as Arc<dyn ObjectStore>),
                Some(Err(e)) => Err(e.to_string()),
                None => Err("its builder is gone".into()),
            }
        });
        built.clone().map_err(|reason| StoreError::Client {
            url: self.url.clone(),
            reason,
        })
    }
}

impl Store {
    /// A client for `url`, configured from the environment (see the crate docs). Nothing is
    /// sent yet, and the client is built by the first request: a store that is down, or a
    /// configuration the client refuses, is reported by it.
    pub fn connect(url: &StoreUrl, options: &StoreOptions) -> Result<Store, StoreError> {
        // reqwest's TLS is built without a crypto provider; `ring` is the one this workspace
        // uses (rustls deprecates it for lacking post-quantum key exchange; aws-lc-rs, which
        // has that, needs cmake to build: Cargo.toml). Installing fails harmlessly if the
        // process already has a provider.
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&url.bucket)
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: options.max_retries,
                retry_timeout: options.retry_timeout,
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(options.request_timeout)
                    .with_connect_timeout(options.connect_timeout),
            );
        // What neither the options nor the environment say comes from the AWS profile, as
        // AWS's tools take it (`profile`).
        let profile = profile::load(|name| std::env::var(name).ok())?;
        let in_env = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
        let endpoint = options
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .or(profile.endpoint_url);
        if let Some(endpoint) = &endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let region = options.region.clone().or_else(|| {
            (!in_env("AWS_REGION") && !in_env("AWS_DEFAULT_REGION"))
                .then_some(profile.region)
                .flatten()
        });
        if let Some(region) = &region {
            builder = builder.with_region(region);
        }
        if let Some(credentials) = &options.credentials {
            builder = builder
                .with_access_key_id(&credentials.access_key_id)
                .with_secret_access_key(&credentials.secret_access_key.0);
        } else if !in_env("AWS_ACCESS_KEY_ID")
            && let (Some(id), Some(secret)) = (&profile.access_key_id, &profile.secret_access_key)
        {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(&secret.0);
            if let Some(token) = &profile.session_token {
                builder = builder.with_token(&token.0);
            }
        }
        // An endpoint the operator gave as plain http (a store on loopback or in a private
        // network) is meant: allow it rather than fail every request.
        if endpoint.is_some_and(|e| e.starts_with("http://")) {
            builder = builder.with_config(
                AmazonS3ConfigKey::Client(object_store::ClientConfigKey::AllowHttp),
                "true",
            );
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("thaw-store")
            .enable_all()
            .build()
            .map_err(StoreError::Runtime)?;
        Ok(Store {
            url: url.clone(),
            s3: Arc::new(Client {
                url: url.to_string(),
                built: std::sync::OnceLock::new(),
                builder: std::sync::Mutex::new(Some(builder)),
            }),
            options: options.clone(),
            runtime: Arc::new(runtime),
        })
    }

    pub fn url(&self) -> &StoreUrl {
        &self.url
    }

    /// Pushes the snapshot at `dir` (sealed with `master`): every chunk object the store does
    /// not hold yet, then the manifest. Chunks are uploaded while later ones are still being
    /// read, with `concurrency` requests in flight.
    pub fn push(&self, dir: &Path, master: &MasterKey) -> Result<PushSummary, StoreError> {
        let snap = Snapshot::open(dir, Some(master)).map_err(StoreError::Local)?;
        let (tx, rx) =
            tokio::sync::mpsc::channel::<(ObjectName, Vec<u8>)>(self.options.concurrency * 2);
        let uploads = self.runtime.spawn(upload_all(
            self.s3.get()?,
            self.url.clone(),
            rx,
            self.options.concurrency,
        ));
        let mut seen = HashSet::new();
        let exported: Result<_, TransferError<RequestError>> =
            store_transfer::export(&snap, master, |name, object| {
                if seen.insert(name) {
                    // Only fails once the uploads stopped on an error, which the join reports.
                    tx.blocking_send((name, object)).map_err(|_| RequestError {
                        op: "upload",
                        path: self.url.chunk(&name).to_string(),
                        source: object_store::Error::Generic {
                            store: "S3",
                            source: Box::new(StoreError::UploadStopped),
                        },
                    })?;
                }
                Ok(())
            });
        drop(tx);
        let uploaded = self
            .runtime
            .block_on(uploads)
            .map_err(|e| StoreError::Runtime(std::io::Error::other(e)))??;
        let manifest = exported?;
        let id = manifest.snapshot_id;
        let sealed = manifest
            .seal(master)
            .map_err(|source| StoreError::Manifest { id, source })?;
        // The manifest is the one object written again: a snapshot pushed before its working
        // set was recorded gains it. One the store holds that opens to the same is left be;
        // one that does not open (altered) is replaced with a sound one.
        let manifest_uploaded = match self.manifest(id, master) {
            Ok(held) if held == manifest => false,
            Ok(_) | Err(StoreError::NoSuchSnapshot { .. } | StoreError::Manifest { .. }) => {
                let path = self.url.manifest(id);
                self.runtime
                    .block_on(self.s3.get()?.put(&path, PutPayload::from(sealed)))
                    .map_err(|source| RequestError {
                        op: "PUT",
                        path: path.to_string(),
                        source,
                    })?;
                true
            }
            Err(other) => return Err(other),
        };
        let data_chunks = manifest
            .chunks
            .iter()
            .filter(|c| matches!(c, StoreChunk::Data(_)))
            .count();
        tracing::info!(snapshot = %id, url = %self.url, objects = seen.len(), uploaded = uploaded.0, "snapshot pushed");
        Ok(PushSummary {
            snapshot_id: id,
            chunks: manifest.chunks.len(),
            data_chunks,
            objects: seen.len(),
            uploaded: uploaded.0,
            uploaded_bytes: uploaded.1,
            manifest_uploaded,
        })
    }

    /// Opens snapshot `id` where it is, for a lazy restore: its manifest is fetched and
    /// authenticated now; each chunk's object when it is first read (or when the restore asks
    /// for it ahead), from `cache` if it holds it, else from the store (then kept in `cache`).
    /// The [`StoreObjects`] counts what was fetched.
    pub fn open_snapshot(
        &self,
        id: SnapshotId,
        master: &MasterKey,
        cache: Option<Arc<ObjectCache>>,
    ) -> Result<(Snapshot, Arc<StoreObjects>), StoreError> {
        let manifest = self.manifest_through(id, master, cache.as_ref())?;
        let objects = Arc::new(StoreObjects::new(
            self.s3.clone(),
            self.url.clone(),
            self.runtime.clone(),
            cache,
            self.options.prefetch_concurrency,
            self.options.fetch_deadline,
        ));
        let origin = std::path::PathBuf::from(format!("{}/snapshots/{id}", self.url));
        let snap = Snapshot::from_store(manifest, master, objects.clone(), origin)
            .map_err(StoreError::Local)?;
        Ok((snap, objects))
    }

    /// The manifest of snapshot `id` from `cache` if it keeps one that opens and was fetched
    /// less than [`MANIFEST_FRESH`] ago (a round trip to a store in another zone would
    /// otherwise be most of a warm restore); else from the store, then kept.
    fn manifest_through(
        &self,
        id: SnapshotId,
        master: &MasterKey,
        cache: Option<&Arc<ObjectCache>>,
    ) -> Result<StoreManifest, StoreError> {
        let Some(cache) = cache else {
            return self.manifest(id, master);
        };
        let kept = cache
            .manifest(id, MANIFEST_FRESH)
            .and_then(|sealed| StoreManifest::open(master, id, &sealed).ok());
        if let Some(manifest) = kept {
            return Ok(manifest);
        }
        let sealed = self.sealed_manifest(id)?;
        let manifest = StoreManifest::open(master, id, &sealed)
            .map_err(|source| StoreError::Manifest { id, source })?;
        cache.insert_manifest(id, &sealed);
        Ok(manifest)
    }

    /// The manifest of snapshot `id`, fetched and opened.
    fn manifest(&self, id: SnapshotId, master: &MasterKey) -> Result<StoreManifest, StoreError> {
        let sealed = self.sealed_manifest(id)?;
        StoreManifest::open(master, id, &sealed)
            .map_err(|source| StoreError::Manifest { id, source })
    }

    /// The sealed manifest of snapshot `id` as the store holds it (refused unread above its
    /// size limit).
    fn sealed_manifest(&self, id: SnapshotId) -> Result<Vec<u8>, StoreError> {
        let path = self.url.manifest(id);
        let s3 = self.s3.get()?;
        self.runtime
            .block_on(get_bounded(&*s3, &path, MAX_MANIFEST_OBJECT_LEN as u64))
            .map_err(|e| match e {
                StoreError::Request(RequestError {
                    source: object_store::Error::NotFound { .. },
                    ..
                }) => StoreError::NoSuchSnapshot {
                    url: self.url.to_string(),
                    id,
                },
                other => other,
            })
    }

    /// Pulls snapshot `id` into a new snapshot directory `dir`, sealed with `master`: the
    /// manifest (through `cache`, as [`Store::open_snapshot`] takes it), then every chunk
    /// object it names, `concurrency` requests in flight, from `cache` where it holds them
    /// (and kept there when fetched), each opened against its name before the snapshot is
    /// written (atomically). A cached copy that does not open is dropped and fetched again.
    pub fn pull(
        &self,
        id: SnapshotId,
        dir: &Path,
        master: &MasterKey,
        cache: Option<Arc<ObjectCache>>,
    ) -> Result<PullSummary, StoreError> {
        let manifest = self.manifest_through(id, master, cache.as_ref())?;
        let objects = StoreObjects::new(
            self.s3.clone(),
            self.url.clone(),
            self.runtime.clone(),
            cache,
            self.options.concurrency,
            self.options.fetch_deadline,
        );
        let written =
            store_transfer::import(dir, &manifest, master, &WriteOptions::default(), &objects)?;
        // The caller reports it: the CLI prints it, thawd logs it with the function.
        Ok(PullSummary {
            written,
            fetched: objects.stats(),
        })
    }
}

/// What a pull did.
#[derive(Clone, Debug)]
pub struct PullSummary {
    /// The snapshot written.
    pub written: WriteSummary,
    /// Objects fetched from the store, and taken from the host cache.
    pub fetched: ObjectStats,
}

/// Uploads what `rx` brings, `concurrency` at a time, skipping objects the store holds;
/// returns how many it uploaded and their bytes. Stops at the first failure (dropping `rx`,
/// which stops the sender).
async fn upload_all(
    s3: Arc<dyn ObjectStore>,
    url: StoreUrl,
    rx: tokio::sync::mpsc::Receiver<(ObjectName, Vec<u8>)>,
    concurrency: usize,
) -> Result<(usize, u64), StoreError> {
    let incoming = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    incoming
        .map(|(name, object)| {
            let s3 = s3.clone();
            let path = url.chunk(&name);
            async move { put_if_absent(&*s3, &path, object).await }
        })
        .buffer_unordered(concurrency)
        .try_fold((0usize, 0u64), |(n, bytes), put| async move {
            Ok(match put {
                Some(len) => (n + 1, bytes + len),
                None => (n, bytes),
            })
        })
        .await
}

/// Writes `bytes` at `path` unless the store holds an object there already (objects are
/// immutable and named by their content, so one there is this one). Returns the bytes written,
/// or `None` if the object was there.
async fn put_if_absent(
    s3: &dyn ObjectStore,
    path: &ObjectPath,
    bytes: Vec<u8>,
) -> Result<Option<u64>, StoreError> {
    match s3.head(path).await {
        Ok(_) => return Ok(None),
        Err(object_store::Error::NotFound { .. }) => {}
        Err(source) => {
            return Err(RequestError {
                op: "HEAD",
                path: path.to_string(),
                source,
            }
            .into());
        }
    }
    let len = bytes.len() as u64;
    s3.put(path, PutPayload::from(bytes))
        .await
        .map_err(|source| RequestError {
            op: "PUT",
            path: path.to_string(),
            source,
        })?;
    Ok(Some(len))
}

/// The object at `path`, refused unread if the store says it is larger than `max`.
async fn get_bounded(
    s3: &dyn ObjectStore,
    path: &ObjectPath,
    max: u64,
) -> Result<Vec<u8>, StoreError> {
    let failed = |op, source| RequestError {
        op,
        path: path.to_string(),
        source,
    };
    let got = s3.get(path).await.map_err(|e| failed("GET", e))?;
    if got.meta.size > max {
        return Err(StoreError::Oversized {
            path: path.to_string(),
            len: got.meta.size,
            max,
        });
    }
    let bytes = got.bytes().await.map_err(|e| failed("GET", e))?;
    if bytes.len() as u64 > max {
        return Err(StoreError::Oversized {
            path: path.to_string(),
            len: bytes.len() as u64,
            max,
        });
    }
    Ok(bytes.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_urls_parse_and_bad_ones_are_refused() {
        let id = SnapshotId([0x1f; 16]);
        let url: StoreSnapshotUrl = format!("s3://thaw-snapshots/prod/snapshots/{id}/")
            .parse()
            .unwrap();
        assert_eq!(url.store.prefix, "prod");
        assert_eq!(url.id, id);
        assert_eq!(
            url.to_string(),
            format!("s3://thaw-snapshots/prod/snapshots/{id}")
        );
        let root: StoreSnapshotUrl = format!("s3://bucket/snapshots/{id}").parse().unwrap();
        assert_eq!(root.store.prefix, "");
        for bad in [
            format!("s3://bucket/{id}"),
            format!("s3://bucket/prod/snapshot/{id}"),
            "s3://bucket/snapshots/xyz".to_string(),
            "s3://bucket/snapshots/".to_string(),
            format!("s3://Bad/snapshots/{id}"),
            format!("/srv/snapshots/{id}"),
        ] {
            assert!(
                matches!(bad.parse::<StoreSnapshotUrl>(), Err(StoreError::Url { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn store_urls_parse_and_bad_ones_are_refused() {
        let url: StoreUrl = "s3://thaw-snapshots/prod/fns/".parse().unwrap();
        assert_eq!(url.bucket, "thaw-snapshots");
        assert_eq!(url.prefix, "prod/fns");
        assert_eq!(url.to_string(), "s3://thaw-snapshots/prod/fns");
        let id = SnapshotId([0xab; 16]);
        assert_eq!(
            url.manifest(id).to_string(),
            format!("prod/fns/snapshots/{id}/manifest")
        );
        let root: StoreUrl = "s3://bucket".parse().unwrap();
        assert_eq!(root.prefix, "");
        assert_eq!(
            root.chunk(&ObjectName([1; 32])).to_string(),
            format!("chunks/{}", ObjectName([1; 32]))
        );
        for bad in [
            "",
            "bucket/prefix",
            "http://bucket/x",
            "s3://",
            "s3://ab",
            "s3://Upper/x",
            "s3://bucket/a//b",
            "s3://bucket/a/../b",
            "s3://bucket/a\nb",
        ] {
            assert!(
                matches!(bad.parse::<StoreUrl>(), Err(StoreError::Url { .. })),
                "{bad:?}"
            );
        }
    }
}

//! The daemon put together: verified functions, the environment pool, the event queue, and the
//! HTTP server, run until a shutdown signal; then idle environments and spare workers are shut
//! down so no worker process outlives thawd.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use super::config::{Config, Listen};
use super::events::{EventDirError, EventQueue, EventSettings};
use super::front::FrontLimits;
use super::metrics::Metrics;
use super::pool::Pool;
use super::registry::{self, RegistryError, SnapshotShape};
use super::store_copies::{StoreCopies, StoreTotals};
use super::{Backend, Completed, Invocation, InvokeFailure};
use crate::worker::handle::WorkerCommand;

/// thawd could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A function's snapshot was refused.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The log directory could not be created.
    #[error("cannot create the log directory {}", path.display())]
    LogDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The dead-letter directory is unusable: failed events would be lost.
    #[error("dead_letter_dir {}: {reason}", path.display())]
    DeadLetterDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// The event directory is unusable: accepted events could not be kept.
    #[error(transparent)]
    EventDir(#[from] EventDirError),
    /// Workers cannot be jailed as the config asks.
    #[error("jail: {0}")]
    Jail(String),
    /// The connection cap does not fit in the descriptors thawd may open.
    #[error("max_connections: {0}")]
    Descriptors(String),
    /// The address could not be bound.
    #[error("cannot listen on {what}")]
    Listen {
        /// The address or socket path.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What registration found: each function's snapshot, and what pulling store snapshots cost.
#[derive(Debug)]
pub struct Registered {
    /// By function.
    pub shapes: BTreeMap<String, SnapshotShape>,
    /// Store pulls and the host cache.
    pub store: StoreTotals,
}

/// Verifies every function's snapshot (blocking: every chunk is authenticated), pulling the
/// ones in a store first (`store_copies`). Not on an async runtime: the store client runs its
/// own.
pub fn register_all(config: &Config) -> Result<Registered, RegistryError> {
    let mut stores = StoreCopies::open(config)?;
    let mut shapes = BTreeMap::new();
    for f in config.functions.values() {
        let started = std::time::Instant::now();
        let shape = match f.store {
            None => registry::register(f)?,
            Some(_) => {
                let key = registry::key_for(f)?;
                let pulled = stores.ensure(f, key.master(), false)?;
                match registry::register(f) {
                    Ok(shape) => shape,
                    // A copy held from before that no longer verifies (altered on this disk,
                    // or not the snapshot named): pulled again, once. Other refusals (a memory
                    // size the config gets wrong) would refuse a fresh copy too.
                    Err(
                        e @ (RegistryError::Snapshot { .. } | RegistryError::CopyOfAnother { .. }),
                    ) if !pulled => {
                        tracing::warn!(function = f.name, error = %crate::worker::process::chain(&e),
                            "the local copy of the store snapshot is refused; pulling it again");
                        stores.ensure(f, key.master(), true)?;
                        registry::register(f)?
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        tracing::info!(function = f.name, snapshot = %f.snapshot.display(),
            mem_mib = shape.mem_bytes >> 20, vcpus = shape.vcpus,
            elapsed = ?started.elapsed(), "function registered; snapshot verified");
        shapes.insert(f.name.clone(), shape);
    }
    stores.prune(config);
    Ok(Registered {
        shapes,
        store: stores.totals(),
    })
}

/// Creates the dead-letter directory if need be and checks that a file can be written there,
/// at start-up: a failed event found it unusable only when it had to be kept (issue 14, defect
/// 7: a regular file was accepted, and the events were lost with a log line).
pub fn check_dead_letter_dir(dir: &std::path::Path) -> Result<(), DaemonError> {
    let unusable = |reason: String| DaemonError::DeadLetterDir {
        path: dir.to_owned(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| unusable(e.to_string()))?;
    if !dir.is_dir() {
        return Err(unusable("not a directory".into()));
    }
    tempfile::Builder::new()
        .prefix(".thawd-check-")
        .tempfile_in(dir)
        .map(drop)
        .map_err(|e| unusable(format!("cannot write there: {e}")))
}

/// The [`Backend`] the HTTP layer talks to.
pub struct Thawd {
    pool: Arc<Pool>,
    events: EventQueue,
    front: FrontLimits,
}

impl Thawd {
    /// Builds the pool and the event queue and starts spare workers and the idle reaper (on
    /// the current tokio runtime).
    pub fn start(
        config: &Config,
        registered: &Registered,
        worker: WorkerCommand,
    ) -> Result<Self, DaemonError> {
        check_dead_letter_dir(&config.dead_letter_dir)?;
        let jails = match config.jail.clone() {
            Some(jail) => Some(super::jail::Jails::prepare(jail).map_err(DaemonError::Jail)?),
            None => {
                tracing::warn!(
                    "workers are not jailed (jail = false): a guest escape into a worker \
                     reaches everything thawd can"
                );
                None
            }
        };
        let metrics = Arc::new(Metrics::new());
        metrics.record_store(&registered.store);
        let pool = Arc::new(
            Pool::new(config, &registered.shapes, worker, jails, metrics).map_err(|source| {
                DaemonError::LogDir {
                    path: config.log_dir.clone(),
                    source,
                }
            })?,
        );
        pool.fill_spares();
        tokio::spawn(pool.clone().reap_idle());
        let events = EventQueue::start(
            pool.clone(),
            EventSettings {
                retry_delays: config.event_retry_delays.clone(),
                dead_letter_dir: config.dead_letter_dir.clone(),
                event_dir: config.event_dir.clone(),
                capacity: config.event_queue_capacity as usize,
                max_bytes: config.event_queue_bytes,
                runners: config.max_concurrency as usize,
            },
        )?;
        Ok(Self {
            pool,
            events,
            front: config.front.clone(),
        })
    }

    /// The pool (for status and tests).
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Lets the event attempts in hand end (the events not yet attempted stay in the event
    /// directory for the next start), then shuts down idle environments and spare workers.
    pub async fn shutdown(&self) {
        self.events.shutdown().await;
        self.pool.shutdown().await;
    }
}

impl Backend for Thawd {
    async fn invoke(&self, invocation: Invocation) -> Result<Completed, InvokeFailure> {
        self.pool.invoke(&invocation).await
    }

    fn admit(
        &self,
        function: &str,
        qualifier: Option<&str>,
        asynchronous: bool,
    ) -> Result<(), InvokeFailure> {
        let f = self.pool.function(function, qualifier)?;
        if asynchronous {
            if self.events.has_room() {
                return Ok(());
            }
            self.pool.metrics().throttle(f.name());
            return Err(InvokeFailure::Throttled {
                reason: super::ThrottleReason::EventQueueFull,
            });
        }
        self.pool.has_room(f)
    }

    async fn enqueue(&self, invocation: Invocation) -> Result<(), InvokeFailure> {
        let name = self
            .pool
            .function(&invocation.function, invocation.qualifier.as_deref())?
            .name()
            .to_owned();
        self.events.enqueue(invocation).await?;
        self.pool.metrics().async_queued(&name);
        Ok(())
    }

    fn dry_run(&self, function: &str, qualifier: Option<&str>) -> Result<(), InvokeFailure> {
        self.pool.function(function, qualifier).map(|_| ())
    }

    fn metrics_text(&self) -> String {
        self.pool.metrics().render()
    }
}

/// A bound listening socket.
pub enum Bound {
    /// TCP.
    Tcp(tokio::net::TcpListener),
    /// A Unix socket, removed when serving ends.
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

impl Bound {
    /// Where clients reach it: `http://ADDR` or the socket path.
    pub fn describe(&self) -> String {
        match self {
            Bound::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "(unknown address)".into(), |a| format!("http://{a}")),
            Bound::Unix(_, path) => path.display().to_string(),
        }
    }
}

/// Checks, before anything is verified or bound, that the descriptors thawd may open hold its
/// connection cap (raising the soft limit to the hard one).
pub fn check_descriptors(front: &FrontLimits) -> Result<u64, DaemonError> {
    super::front::ensure_descriptors(front.max_connections).map_err(DaemonError::Descriptors)
}

/// Binds `config`'s address (TCP port 0 picks a free port: see [`Bound::describe`]).
pub async fn bind(listen: &Listen) -> Result<Bound, DaemonError> {
    match listen {
        Listen::Tcp(addr) => tokio::net::TcpListener::bind(addr)
            .await
            .map(Bound::Tcp)
            .map_err(|source| DaemonError::Listen {
                what: addr.to_string(),
                source,
            }),
        Listen::Unix(path) => tokio::net::UnixListener::bind(path)
            .map(|l| Bound::Unix(l, path.clone()))
            .map_err(|source| DaemonError::Listen {
                what: path.display().to_string(),
                source,
            }),
    }
}

/// Serves `thawd` on `bound` until `shutdown` resolves, then shuts its environments down.
pub async fn serve(
    thawd: Arc<Thawd>,
    bound: Bound,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let limits = thawd.front.clone();
    let router = super::api::router_with(thawd.clone(), &limits);
    tracing::info!(
        address = bound.describe(),
        ?limits,
        "serving the Invoke API"
    );
    match bound {
        Bound::Tcp(listener) => super::front::serve(listener, router, &limits, shutdown).await,
        Bound::Unix(listener, path) => {
            super::front::serve(listener, router, &limits, shutdown).await;
            let _ = std::fs::remove_file(path);
        }
    }
    thawd.shutdown().await;
    Ok(())
}

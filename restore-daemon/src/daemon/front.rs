//! thawd's HTTP front: the accept loop and what bounds it, so that no local client can starve
//! the daemon (issue 14, defects 2 and 3).
//!
//! - **A connection cap.** At most `max_connections` connections are served at once; at the
//!   cap thawd stops accepting until one closes, and new clients wait in the kernel's listen
//!   backlog instead of taking descriptors thawd needs for its workers.
//! - **A header timeout, which is also the idle timeout.** A connection must deliver a whole
//!   request head within `header_timeout` of opening, or of the end of its previous response
//!   (a keep-alive connection waiting for its next request is waiting for a head); else it is
//!   closed. hyper runs this timer.
//! - **A body timeout.** A request's body must arrive whole within `body_timeout` of its head;
//!   else it is answered (400) and the connection closed (`api`).
//! - **A byte budget for bodies,** taken before a body is buffered: a body larger than
//!   [`UNBUDGETED_BODY`] reserves its size from `body_budget` first (its `Content-Length`, or
//!   chunk by chunk when it has none) and is refused with 429 when the budget has no room. Small
//!   bodies are not charged: what they can hold is bounded by the connection cap, and they keep
//!   working while large senders hold the budget.
//!
//! The memory the front can hold is about `max_connections × (MAX_HEAD_BUFFER +
//! UNBUDGETED_BODY) + body_budget`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// A body at most this large is not charged to the byte budget.
pub const UNBUDGETED_BODY: usize = 64 * 1024;
/// hyper's read buffer per connection at most: a request head must fit in it.
pub const MAX_HEAD_BUFFER: usize = 64 * 1024;
/// How long the accept loop pauses when the process is out of descriptors.
const DESCRIPTOR_PAUSE: Duration = Duration::from_millis(50);

/// The front's bounds (from the config's `max_connections`, `header_timeout_secs`,
/// `body_timeout_secs` and `body_budget_mib`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// From a connection's start, or the end of its last response, to a whole request head.
    pub header_timeout: Duration,
    /// From a request's head to the end of its body.
    pub body_timeout: Duration,
    /// Bytes of request bodies larger than [`UNBUDGETED_BODY`] buffered at once.
    pub body_budget: usize,
}

impl Default for FrontLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            body_budget: 64 << 20,
        }
    }
}

/// The bytes of request bodies being buffered, against [`FrontLimits::body_budget`].
#[derive(Debug)]
pub struct BodyBudget {
    limit: usize,
    used: AtomicUsize,
}

impl BodyBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// An empty reservation that [`Reservation::cover`] grows.
    pub fn reservation(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: self.clone(),
            held: 0,
        }
    }

    fn take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }
}

/// Bytes of the budget one body holds, given back when it is dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<BodyBudget>,
    held: usize,
}

impl Reservation {
    /// Makes sure a body of `size` bytes is covered: the first [`UNBUDGETED_BODY`] bytes are
    /// free, the rest is taken from the budget. `false` when the budget has no room (what was
    /// held stays held until the reservation is dropped).
    pub fn cover(&mut self, size: usize) -> bool {
        let needed = size.saturating_sub(UNBUDGETED_BODY);
        if needed <= self.held {
            return true;
        }
        let more = needed - self.held;
        if self.budget.take(more) {
            self.held = needed;
            true
        } else {
            false
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.held, Ordering::AcqRel);
    }
}

/// A listening socket the front accepts on.
pub trait Accept: Send + 'static {
    /// One accepted connection.
    type Io: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    /// The next connection.
    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        let (stream, _) = tokio::net::TcpListener::accept(self).await?;
        // Answers are written whole; Nagle would hold their last segment back.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        tokio::net::UnixListener::accept(self)
            .await
            .map(|(stream, _)| stream)
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` completes; then stops
/// accepting, closes idle connections and lets the requests under way finish (a synchronous
/// invocation holds the shutdown for as long as its function runs).
pub async fn serve<L: Accept>(
    listener: L,
    router: Router,
    limits: &FrontLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BUFFER);
    let (closing, closing_seen) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut at_cap_logged = false;
    tokio::pin!(shutdown);
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                at_cap_logged = false;
                slot
            }
            Err(_) => {
                if !at_cap_logged {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "at the connection cap: new clients wait until a connection closes"
                    );
                    at_cap_logged = true;
                }
                tokio::select! {
                    () = &mut shutdown => break,
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break, // never closed
                    },
                }
            }
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(stream) => stream,
                Err(error) => {
                    if is_out_of_descriptors(&error) {
                        tracing::warn!(%error, "cannot accept: out of descriptors; pausing");
                        tokio::time::sleep(DESCRIPTOR_PAUSE).await;
                    } else {
                        tracing::debug!(%error, "accept failed");
                    }
                    continue;
                }
            },
        };
        let connection = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let mut closing_seen = closing_seen.clone();
        connections.spawn(async move {
            let _slot = slot;
            let mut connection = std::pin::pin!(connection);
            let closing = async {
                let _ = closing_seen.wait_for(|closing| *closing).await;
            };
            let served = tokio::select! {
                served = connection.as_mut() => served,
                () = closing => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = served {
                tracing::debug!(%error, "connection ended");
            }
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = closing.send(true);
    while connections.join_next().await.is_some() {}
}

fn is_out_of_descriptors(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Descriptors thawd keeps for itself beyond its connections: workers' pipes and sockets, the
/// snapshot files, logs.
pub const RESERVED_DESCRIPTORS: u64 = 256;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, and checks that the connection cap
/// fits in it with [`RESERVED_DESCRIPTORS`] to spare: with the usual soft limit of 1024, 1,100
/// idle connections stopped thawd serving (issue 14, defect 2). Returns the limit now in force.
pub fn ensure_descriptors(max_connections: usize) -> Result<u64, String> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| e.to_string())?;
    let mut current = soft;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => current = hard,
            Err(error) => tracing::warn!(%error, "cannot raise RLIMIT_NOFILE to its hard limit"),
        }
    }
    let needed = (max_connections as u64).saturating_add(RESERVED_DESCRIPTORS);
    if current < needed {
        return Err(format!(
            "{max_connections} connections need {needed} descriptors with thawd's own, but \
             RLIMIT_NOFILE allows {current}: lower max_connections or raise the limit"
        ));
    }
    Ok(current)
}

#[cfg(test)]
#[path = "front_tests.rs"]
mod tests;

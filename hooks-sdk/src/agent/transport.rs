//! Connecting to the host: AF_VSOCK in a guest, a Unix socket in host-process mode. The choice
//! is made once at startup ([`Transport`]); both give a byte stream and everything above this
//! module is the same code. tokio has no vsock type, so a vsock socket is driven through
//! `AsyncFd` with plain `read`/`write` calls.
//!
//! Two Linux behaviours shape [`VsockStream`]. A non-blocking connect finishes with one
//! edge-triggered writable event, which must stay recorded as readiness, or the first write
//! waits for an edge that never comes. And when the host resets the vsock transport (what a
//! restore does), Linux reports it to a connected socket only as `EPOLLERR` (with `EPOLLOUT`),
//! which wakes no task waiting to read: the read side therefore also waits for errors.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, VsockAddr, getsockopt, socket, sockopt};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::UnixStream;

pub use super::config::Transport;

/// A connection to the host.
pub trait HostStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> HostStream for T {}

/// Connecting to the host failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The Unix socket could not be reached.
    #[error("cannot connect to the host's Unix socket {path}")]
    Unix {
        /// The socket path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The vsock connection failed.
    #[error("cannot connect to vsock {cid}:{port}")]
    Vsock {
        /// Context id.
        cid: u32,
        /// Port.
        port: u32,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl Transport {
    /// Opens one connection.
    pub async fn connect(&self) -> Result<Box<dyn HostStream>, TransportError> {
        match self {
            Transport::Unix(path) => UnixStream::connect(path)
                .await
                .map(|s| Box::new(s) as Box<dyn HostStream>)
                .map_err(|source| TransportError::Unix {
                    path: path.display().to_string(),
                    source,
                }),
            Transport::Vsock { cid, port } => VsockStream::connect(*cid, *port)
                .await
                .map(|s| Box::new(s) as Box<dyn HostStream>)
                .map_err(|source| TransportError::Vsock {
                    cid: *cid,
                    port: *port,
                    source,
                }),
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Unix(p) => write!(f, "unix:{}", p.display()),
            Transport::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

/// A connected, non-blocking AF_VSOCK stream socket.
pub struct VsockStream {
    fd: Arc<AsyncFd<OwnedFd>>,
    /// Resolves when the socket reports an error; `None` once it has.
    error: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl VsockStream {
    /// Connects to `cid:port` without blocking the runtime.
    pub async fn connect(cid: u32, port: u32) -> io::Result<VsockStream> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let started = nix::sys::socket::connect(fd.as_raw_fd(), &VsockAddr::new(cid, port));
        // SAFETY: `fd` is an open socket owned by the `OwnedFd` that the `AsyncFd` takes; it is
        // closed only when the `AsyncFd` drops it, and `as_raw_fd` always returns it.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        match started {
            Ok(()) => {}
            Err(Errno::EINPROGRESS) => {
                // A non-blocking connect finishes when the socket turns writable; SO_ERROR says
                // how. The readiness is kept (not cleared): that one edge is also what lets
                // the first write go out.
                fd.writable().await?.retain_ready();
                if let Some(error) = pending_error(&fd)? {
                    return Err(error);
                }
            }
            Err(e) => return Err(e.into()),
        }
        let fd = Arc::new(fd);
        let watched = fd.clone();
        let error = Box::pin(async move {
            // An error that cannot even be waited for is as final as the one awaited.
            let _ = watched.ready(Interest::ERROR).await;
        });
        Ok(VsockStream {
            fd,
            error: Some(error),
        })
    }
}

/// The socket's pending error (`SO_ERROR`), which reading also clears.
fn pending_error(fd: &AsyncFd<OwnedFd>) -> io::Result<Option<io::Error>> {
    let code = getsockopt(fd.get_ref(), sockopt::SocketError)?;
    Ok((code != 0).then(|| io::Error::from_raw_os_error(code)))
}

/// Whether the socket has reported an error (`watch` resolved); otherwise `cx` is woken when it
/// does.
fn poll_error(
    watch: &mut Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    cx: &mut Context<'_>,
) -> bool {
    let Some(error) = watch.as_mut() else {
        return true;
    };
    if error.as_mut().poll(cx).is_pending() {
        return false;
    }
    *watch = None;
    true
}

/// The error a broken connection reads as: the socket's pending error if it has one, else a
/// reset (Linux clears the pending error once any call has reported it).
fn broken(fd: &AsyncFd<OwnedFd>) -> io::Error {
    match pending_error(fd) {
        Ok(Some(error)) => error,
        _ => io::Error::new(
            io::ErrorKind::ConnectionReset,
            "the vsock connection reported an error (transport reset)",
        ),
    }
}

impl AsyncRead for VsockStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let mut guard = match this.fd.poll_read_ready(cx) {
                Poll::Ready(guard) => guard?,
                // Nothing to read: a reset would never make it readable, so its error ends
                // the wait instead (see the module's documentation).
                Poll::Pending if poll_error(&mut this.error, cx) => {
                    return Poll::Ready(Err(broken(&this.fd)));
                }
                Poll::Pending => return Poll::Pending,
            };
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from))
            {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Stream sockets have no user-space buffer to flush.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shutdown(2) on a socket this value owns; takes no pointers.
        let rc = unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) };
        if rc < 0 {
            return Poll::Ready(Err(io::Error::last_os_error()));
        }
        Poll::Ready(Ok(()))
    }
}

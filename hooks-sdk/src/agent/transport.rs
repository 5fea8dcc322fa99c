//! Connecting to the host: AF_VSOCK in a guest, a Unix socket in host-process mode. The choice
//! is made once at startup ([`Transport`]); both give a byte stream and everything above this
//! module is the same code. tokio has no vsock type, so a vsock socket is driven through
//! `AsyncFd` with plain `read`/`write` calls.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
    fd: AsyncFd<OwnedFd>,
}

impl VsockStream {
    /// Connects to `cid:port` without blocking the runtime.
    pub async fn connect(cid: u32, port: u32) -> io::Result<VsockStream> {
        // SAFETY: socket(2) takes no pointers; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_VSOCK,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a socket just created and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an all-zero sockaddr_vm is valid; the fields that matter are set below.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = cid;
        addr.svm_port = port;
        // SAFETY: `addr` is a live sockaddr_vm and the length passed is its size.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        // SAFETY: `fd` is an open socket owned by the `OwnedFd` that the `AsyncFd` takes; it is
        // closed only when the `AsyncFd` drops it, and `as_raw_fd` always returns it.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(err);
            }
            // A non-blocking connect finishes when the socket turns writable; SO_ERROR says how.
            let mut guard = fd.writable().await?;
            guard.clear_ready();
            let mut so_error: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: `so_error` and `len` are live and sized as getsockopt(SO_ERROR) expects.
            let rc = unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    (&raw mut so_error).cast::<libc::c_void>(),
                    &raw mut len,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            if so_error != 0 {
                return Err(io::Error::from_raw_os_error(so_error));
            }
        }
        Ok(VsockStream { fd })
    }
}

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
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

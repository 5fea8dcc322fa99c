//! The host side of hybrid vsock, as Firecracker defines it, on Unix sockets:
//!
//! - a guest connection to the host (CID 2) port P becomes a connection to the Unix socket
//!   `<uds_path>_P`, which a host program listens on;
//! - a host program reaches guest port P by connecting to the Unix socket `<uds_path>` (which
//!   the device listens on) and writing `CONNECT P\n`; it reads `OK <host_port>\n` once the guest
//!   accepted, and sees the socket closed if the guest refused or did not answer in time.
//!
//! Every socket here is non-blocking, connects included: a host listener with a full backlog
//! makes a guest connect fail at once instead of stalling the VMM thread.

use std::ffi::OsString;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Longest `CONNECT <port>\n` line accepted ("CONNECT 4294967295\n" is 19 bytes).
pub const MAX_CONNECT_LINE: usize = 32;

/// `<uds_path>_<port>`: where a guest connection to host port `port` goes.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = OsString::from(uds_path.as_os_str());
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Binds the non-blocking listener host programs connect to. An existing file at the path is
/// an error, not replaced: it may be another VM's socket.
pub fn listen(path: &Path) -> std::io::Result<UnixListener> {
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Connects to a Unix socket without blocking: `WouldBlock` when the listener's backlog is full.
pub fn connect(path: &Path) -> std::io::Result<UnixStream> {
    // SAFETY: an all-zero sockaddr_un is a valid (empty) address; it is plain C data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "Unix socket path is empty, has a NUL byte or does not fit sockaddr_un",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: plain syscall with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed its size (checked above).
    let rc = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(socket))
}

/// A host program that connected to `<uds_path>` and has not yet finished its `CONNECT P\n`.
pub struct Handshake {
    /// Its stream.
    pub stream: UnixStream,
    /// The line so far.
    line: Vec<u8>,
    /// When it must have finished.
    pub deadline: Instant,
}

/// What reading a handshake gave.
#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeStep {
    /// Not finished; wait for more.
    Incomplete,
    /// `CONNECT P\n`: connect to guest port P.
    Connect(u32),
    /// The program closed the socket, sent something else or too much.
    Invalid(String),
}

impl Handshake {
    /// A handshake over `stream`, which must end by `deadline`.
    pub fn new(stream: UnixStream, deadline: Instant) -> Self {
        Self {
            stream,
            line: Vec::with_capacity(MAX_CONNECT_LINE),
            deadline,
        }
    }

    /// Reads what arrived. Reads one byte at a time so that nothing after the newline is taken:
    /// that is connection data, for the guest once it accepts.
    pub fn read(&mut self) -> HandshakeStep {
        loop {
            let mut byte = [0u8];
            match self.stream.read(&mut byte) {
                Ok(0) => return HandshakeStep::Invalid("closed before CONNECT".into()),
                Ok(_) if byte[0] == b'\n' => return parse_connect(&self.line),
                Ok(_) if self.line.len() >= MAX_CONNECT_LINE => {
                    return HandshakeStep::Invalid("line too long".into());
                }
                Ok(_) => self.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return HandshakeStep::Incomplete,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return HandshakeStep::Invalid(e.to_string()),
            }
        }
    }
}

fn parse_connect(line: &[u8]) -> HandshakeStep {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches('\r');
    let port = text
        .strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse::<u32>().ok());
    match port {
        Some(port) => HandshakeStep::Connect(port),
        None => HandshakeStep::Invalid(format!("expected \"CONNECT <port>\", got {text:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn parses_connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), HandshakeStep::Connect(52));
        assert_eq!(
            parse_connect(b"CONNECT 9000\r"),
            HandshakeStep::Connect(9000)
        );
        assert!(matches!(
            parse_connect(b"CONNECT"),
            HandshakeStep::Invalid(_)
        ));
        assert!(matches!(
            parse_connect(b"CONNECT -1"),
            HandshakeStep::Invalid(_)
        ));
        assert!(matches!(
            parse_connect(b"CONNECT 4294967296"),
            HandshakeStep::Invalid(_)
        ));
        assert!(matches!(
            parse_connect(b"connect 5"),
            HandshakeStep::Invalid(_)
        ));
    }

    #[test]
    fn handshake_stops_at_newline_and_bounds_the_line() {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut h = Handshake::new(a, Instant::now());
        assert_eq!(h.read(), HandshakeStep::Incomplete);
        b.write_all(b"CONNECT 1").unwrap();
        assert_eq!(h.read(), HandshakeStep::Incomplete);
        b.write_all(b"234\nDATA").unwrap();
        assert_eq!(h.read(), HandshakeStep::Connect(1234));
        let mut rest = [0u8; 4];
        h.stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"DATA");

        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut h = Handshake::new(a, Instant::now());
        b.write_all(&[b'x'; 100]).unwrap();
        assert!(matches!(h.read(), HandshakeStep::Invalid(_)));
    }

    #[test]
    fn connect_fails_fast_without_listener_and_for_long_paths() {
        let dir = tempfile_dir();
        let err = connect(&dir.join("nobody")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        let long = dir.join("x".repeat(200));
        assert_eq!(connect(&long).unwrap_err().kind(), ErrorKind::InvalidInput);
        let listener = listen(&dir.join("l")).unwrap();
        let _client = connect(&dir.join("l")).unwrap();
        assert!(listener.accept().is_ok());
        assert_eq!(
            port_path(Path::new("/tmp/v.sock"), 52),
            Path::new("/tmp/v.sock_52")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "thaw-unix-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

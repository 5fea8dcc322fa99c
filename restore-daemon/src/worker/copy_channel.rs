//! The second stream between `thawd` and a worker, beside the request pipes: a Unix socket at
//! the worker's fd 3 that carries file descriptors, namely the sealed memfd of a decoded copy
//! (`crate::decoded_copy`) that a `Restore` maps. The daemon sends the descriptor just before
//! the request that needs it; the worker takes exactly one descriptor per such request.
//!
//! Only the worker the daemon spawned gets the other end: the daemon's end and the child's end
//! are close-on-exec, and the child's end is duplicated to fd 3 only in the child, between
//! fork and exec, so no other process thawd starts inherits it.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// The worker's fd for the channel.
pub const CHANNEL_FD: RawFd = 3;
/// How long a worker waits for a descriptor the daemon announced: it is sent before the
/// request, so it is normally there already.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A descriptor could not be passed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The worker was started without the channel.
    #[error("this worker has no descriptor channel (fd {CHANNEL_FD} is not a socket)")]
    Missing,
    /// Sending or receiving failed.
    #[error("cannot pass a descriptor to the worker")]
    Io(#[source] std::io::Error),
    /// The message carried no descriptor, or more than one.
    #[error("expected one descriptor, got {0}")]
    Count(usize),
    /// The daemon closed the channel.
    #[error("the descriptor channel was closed")]
    Closed,
}

fn io(e: nix::Error) -> ChannelError {
    ChannelError::Io(e.into())
}

/// Sends `fd` (one marker byte with the descriptor attached).
pub fn send(channel: &UnixStream, fd: BorrowedFd<'_>) -> Result<(), ChannelError> {
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(b"F")];
    let sent =
        sendmsg::<()>(channel.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).map_err(io)?;
    if sent != 1 {
        return Err(ChannelError::Io(std::io::ErrorKind::WriteZero.into()));
    }
    Ok(())
}

/// Receives one descriptor. Any others that arrive with it are closed, and the message is
/// refused.
pub fn receive(channel: &UnixStream) -> Result<OwnedFd, ChannelError> {
    channel
        .set_read_timeout(Some(RECEIVE_TIMEOUT))
        .map_err(ChannelError::Io)?;
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(
        channel.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io)?;
    let mut received: Vec<OwnedFd> = Vec::new();
    for cmsg in msg.cmsgs().map_err(io)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            // SAFETY: SCM_RIGHTS just installed these descriptors in this process; nothing else
            // knows them, so each is owned here exactly once.
            received.extend(
                fds.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg.bytes == 0 && received.is_empty() {
        return Err(ChannelError::Closed);
    }
    match received.len() {
        1 => Ok(received.remove(0)),
        n => Err(ChannelError::Count(n)),
    }
}

/// A connected pair: the daemon's end and the end for the child (both close-on-exec).
pub fn pair() -> Result<(UnixStream, OwnedFd), ChannelError> {
    let (daemon, child) = UnixStream::pair().map_err(ChannelError::Io)?;
    Ok((daemon, child.into()))
}

/// Arranges for `child_end` to be the spawned process's fd [`CHANNEL_FD`], and only its.
pub fn install(command: &mut tokio::process::Command, child_end: OwnedFd) {
    let raw = child_end.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec and calls only dup2 and
    // fcntl, which are async-signal-safe; it allocates nothing and takes no lock. `child_end`
    // is moved into the closure, so the descriptor stays open in the parent until the command
    // (and the closure) is dropped after the spawn.
    unsafe {
        command.pre_exec(move || {
            let _keep = &child_end;
            if raw == CHANNEL_FD {
                // dup2 onto itself would leave close-on-exec set.
                if libc::fcntl(raw, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, CHANNEL_FD) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The worker's end, if it was started with one: fd [`CHANNEL_FD`], if that is a socket.
/// Call once, at start.
pub fn inherited() -> Option<UnixStream> {
    // SAFETY: fd 3 is only borrowed here to look at it; it is not closed or kept.
    let borrowed = unsafe { BorrowedFd::borrow_raw(CHANNEL_FD) };
    let stat = nix::sys::stat::fstat(borrowed.as_fd()).ok()?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return None;
    }
    // SAFETY: fd 3 is open and a socket (checked above); the daemon put it there for this
    // process alone (see `install`) and nothing else in the worker owns it: this function is
    // called once, at start, before anything else could open fd 3.
    Some(unsafe { UnixStream::from_raw_fd(CHANNEL_FD) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_descriptor_goes_across_and_still_refers_to_the_same_file() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        (&file).write_all(b"hello").unwrap();
        send(&a, file.as_fd()).unwrap();
        let got = std::fs::File::from(receive(&b).unwrap());
        assert_eq!(got.metadata().unwrap().len(), 5);
    }

    #[test]
    fn a_message_without_a_descriptor_is_refused() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"F").unwrap();
        assert!(matches!(receive(&b), Err(ChannelError::Count(0))));
    }

    #[test]
    fn two_descriptors_are_refused_and_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let (x, y) = (tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap());
        let fds = [x.as_raw_fd(), y.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(b"F")],
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert!(matches!(receive(&b), Err(ChannelError::Count(2))));
    }

    #[test]
    fn a_closed_channel_is_reported() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(matches!(receive(&b), Err(ChannelError::Closed)));
    }
}

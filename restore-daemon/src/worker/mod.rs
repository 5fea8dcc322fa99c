//! Worker processes: each execution environment's VMM runs in its own process, started by
//! `thawd` (`thawd worker`), so a VMM that crashes takes down only its own environment.
//! `protocol` is what the two sides say; `process` is the worker's side (a loop over requests
//! on stdin, replies on stdout); `handle` is the daemon's side (spawn, ask, kill, reap);
//! `copy_channel` passes a decoded copy's memfd from the daemon to the worker that maps it.

pub mod copy_channel;
pub mod handle;
pub mod jail;
pub mod process;
pub mod protocol;
pub mod seccomp;
pub mod self_test;

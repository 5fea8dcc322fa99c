//! Worker processes: each execution environment's VMM runs in its own process, started by
//! `thawd` (`thawd worker`), so a VMM that crashes takes down only its own environment.
//! `protocol` is what the two sides say; `process` is the worker's side (a loop over requests
//! on stdin, replies on stdout); `handle` is the daemon's side (spawn, ask, kill, reap).

pub mod handle;
pub mod process;
pub mod protocol;

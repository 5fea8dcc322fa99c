//! Everything of Thaw that runs inside a guest (the agent, the Lambda Runtime API, the hook
//! SDK) and the one piece the host shares with it: the versioned host↔guest protocol.
//!
//! With default features off the crate is `no_std` and allocation-free, so the bare-metal test
//! guest (`test-guest/`) uses the same protocol code as the host and the Linux agent. The
//! `agent` feature (on by default) adds `thaw-init` ([`agent`]) and the Rust function SDK
//! ([`sdk`]); the `host` feature adds the host's half of the protocol ([`host`]), which
//! `thaw` and thawd's workers use.

#![cfg_attr(not(feature = "std"), no_std)]

#[cfg(feature = "agent")]
pub mod agent;
#[cfg(feature = "host")]
pub mod host;
pub mod protocol;
#[cfg(feature = "agent")]
pub mod sdk;

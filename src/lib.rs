//! The `thaw` command's library: everything the CLI, the integration tests and the benches
//! share that is not the VMM itself (`vmm-core`), the snapshot format (`snapshot`) or the
//! restore path and thawd (`restore-daemon`).
//!
//! - `commands`: the bodies of the `thaw` commands.
//! - `capture`: a paused machine into a snapshot (the one capture path) and `control_api`,
//!   the Firecracker-style control socket of `thaw run` and `thaw restore`.
//! - `guest_image`, `function_image`, `apt`, `digest`: building what a Linux guest boots
//!   (Debian's kernel, initramfs archives, function images).
//! - `nested_host`: the nested-KVM host that runs Linux-guest tests on PVM.
//! - `host_check`, `test_guest`: what this host can do; the built-in test guest.

pub mod apt;
pub mod capture;
pub mod commands;
pub mod control_api;
pub mod digest;
pub mod function_image;
pub mod guest_image;
pub mod host_check;
pub mod nested_host;
pub mod test_guest;

//! The `thaw` command's library: everything the CLI, the integration tests and the benches
//! share that is not the VMM itself (which is `vmm-core`).

pub mod guest_image;
pub mod host_check;
pub mod run;
pub mod test_guest;

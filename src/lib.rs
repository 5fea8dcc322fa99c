//! The `thaw` command's library: everything the CLI, the integration tests and the benches
//! share that is not the VMM itself (which is `vmm-core`).

pub mod agent_checkpoint;
pub mod api_server;
pub mod apt;
pub mod console_watch;
pub mod digest;
pub mod function_image;
pub mod guest_image;
pub mod host_check;
pub mod host_key;
pub mod invoke_cli;
pub mod nested_host;
pub mod record_ws;
pub mod restore_cli;
pub mod run;
pub mod snapshot_create;
pub mod test_guest;
pub mod xdg;

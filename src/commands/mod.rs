//! The bodies of `thaw`'s commands, one module per command, named after it (`thaw snapshot
//! record-ws` is `snapshot_record_ws`); `main.rs` parses the flags and calls them. Inspecting,
//! verifying and fetching are one call into the library each and stay in `main.rs`.

pub mod invoke;
pub mod restore;
pub mod run;
pub mod snapshot_create;
pub mod snapshot_record_ws;

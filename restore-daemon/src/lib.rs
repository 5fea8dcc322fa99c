//! Thaw's restore path and `thawd`, in two parts that share nothing but this crate.
//!
//! **The restore library**, used by `thaw restore`, `thaw snapshot record-ws` and thawd's
//! workers: verifying a snapshot and checking this host can run it (`verify`), rebuilding the
//! machine from it (`restore`) with memory filled eagerly or paged in lazily by the
//! userfaultfd page server (`pager`, fed by a `PageSource`), into machine shells built ahead
//! of time (`shells`), and an execution environment's lifecycle: restore, the agent's
//! after-restore step, invocations, shutdown (`environment`).
//!
//! **thawd**, the restore-on-invoke daemon: its binary (`src/bin/thawd.rs`), the daemon
//! (`daemon`: config, registry, pool, events, logs, metrics, the Invoke API) and its worker
//! processes, one per environment (`worker`), which drive the restore library.

// The restore library.
pub mod decoded_copy;
pub mod environment;
pub mod pager;
pub mod restore;
pub mod shells;
pub mod startup_set;
pub mod verify;

// thawd.
pub mod daemon;
pub mod worker;

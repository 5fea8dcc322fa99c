//! Thaw's restore path: verifying a snapshot and checking this host can run it (`verify`,
//! `state_codec`), rebuilding the machine from it (`restore`) with memory filled eagerly or
//! paged in lazily by the userfaultfd page server (`pager`), into machine shells built ahead
//! of time (`shells`); and `thawd`, the restore-on-invoke daemon (`daemon`), whose
//! environments each run in a worker process (`worker`).

pub mod daemon;
pub mod environment;
pub mod pager;
pub mod restore;
pub mod shells;
pub mod verify;
pub mod worker;

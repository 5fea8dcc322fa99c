//! The worker's side: requests on stdin, replies on stdout (to be written).

use std::process::ExitCode;

/// The worker process's entry point (`thawd worker`).
pub fn main() -> ExitCode {
    ExitCode::from(2)
}

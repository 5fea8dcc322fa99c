//! The nested-KVM host: a virtual machine with a hardware-style `/dev/kvm`, for hosts whose own
//! KVM cannot run a Linux guest's kernel at speed (PVM, where guest kernel code is emulated one
//! instruction at a time). QEMU's TCG emulates an AMD CPU with SVM and nested paging; Debian's
//! cloud kernel boots in it and loads `kvm_amd`; the host's whole file system is shared with it
//! through virtiofs; and a command runs there, as root, in a chroot of the host's files, with
//! fresh `/tmp`, `/run` and `/dev/shm`. Thaw inside it then boots real Linux guests.
//!
//! Everything comes from Debian's packages through apt (QEMU and its libraries unpacked into
//! the cache, not installed; the same cloud kernel Thaw boots as a guest). It is slow: TCG runs
//! every instruction of the outer machine in software, so the outer kernel reaches its init in
//! seconds and a Linux guest inside boots in about ten. Times measured in it are functional,
//! never performance figures. See docs/nested-host.md.

mod outer_image;
mod packages;
mod vm;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use outer_image::{INIT_SCRIPT, OUTER_MODULES};
pub use packages::{PackageRecord, Packages, ROOT_PACKAGES};
pub use vm::{NestedExit, RunOptions};

use crate::apt::AptError;
use crate::guest_image::{DebianKernel, InitramfsError, KernelFetchError};

/// Memory of the nested host unless asked otherwise: room for a few Linux guests and the
/// files the command writes to `/tmp` (which is RAM there).
pub const DEFAULT_MEM_MIB: u64 = 6 * 1024;
/// The environment variable set for the command inside the nested host.
pub const INSIDE_ENV: &str = "THAW_NESTED_HOST";

/// Why the nested host could not run a command.
#[derive(Debug, thiserror::Error)]
pub enum NestedHostError {
    /// virtiofsd needs root to share the host's files.
    #[error(
        "the nested host shares this host's file system through virtiofsd, which needs root; \
         run it as root"
    )]
    NotRoot,
    /// No command was given.
    #[error("no command to run in the nested host")]
    EmptyCommand,
    /// An option is out of range.
    #[error("{0}")]
    Option(String),
    /// Fetching a package failed.
    #[error("cannot fetch the nested host's packages")]
    Apt(#[from] AptError),
    /// Fetching the kernel failed.
    #[error("cannot fetch the nested host's kernel")]
    Kernel(#[from] KernelFetchError),
    /// Building the nested host's initramfs failed.
    #[error("cannot build the nested host's initramfs")]
    Initramfs(#[from] InitramfsError),
    /// An unpacked package set lacks a program it should have.
    #[error("the unpacked packages lack {}: remove the directory and try again", path.display())]
    PackageContent {
        /// What is missing.
        path: PathBuf,
    },
    /// A path the nested host must be given cannot be passed to it.
    #[error("{} cannot be passed to the nested host: {reason}", path.display())]
    Unshareable {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// A file operation failed.
    #[error("I/O error on {}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A program could not be started.
    #[error("cannot start {}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// virtiofsd exited or never offered its socket.
    #[error("virtiofsd did not start sharing the host's files: {log}")]
    Virtiofsd {
        /// Its output.
        log: String,
    },
    /// The machine stopped without the command's exit status.
    #[error(
        "the nested host stopped ({qemu}) without reporting the command's exit status; QEMU \
         said: {stderr}; the console ended with:\n{console_tail}"
    )]
    NoExitStatus {
        /// How QEMU exited.
        qemu: String,
        /// QEMU's stderr, warnings about unemulated CPU features left out.
        stderr: String,
        /// The last lines of the console.
        console_tail: String,
    },
    /// The command ran longer than allowed and the machine was stopped.
    #[error("the command did not finish within {after:?} in the nested host; it was stopped")]
    Timeout {
        /// The limit.
        after: Duration,
    },
}

impl NestedHostError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NestedHostError + '_ {
        move |source| NestedHostError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// A nested host ready to run commands: its packages unpacked and its kernel fetched.
#[derive(Debug, Clone)]
pub struct NestedHost {
    packages: Packages,
    kernel: DebianKernel,
    runs_dir: PathBuf,
}

impl NestedHost {
    /// Fetches (or finds in `cache_dir`) what the nested host needs. Needs root.
    pub fn prepare(cache_dir: &Path) -> Result<Self, NestedHostError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(NestedHostError::NotRoot);
        }
        let kernel = crate::guest_image::fetch(cache_dir)?;
        let packages = packages::fetch(cache_dir)?;
        Ok(Self {
            packages,
            kernel,
            runs_dir: cache_dir.join(packages::CACHE_SUBDIR).join("runs"),
        })
    }

    /// The unpacked packages.
    pub fn packages(&self) -> &Packages {
        &self.packages
    }

    /// The outer machine's kernel.
    pub fn kernel(&self) -> &DebianKernel {
        &self.kernel
    }

    /// Runs `options.command` in a new nested host, streaming its console (the command's
    /// output) to `console`, and returns its exit status.
    pub fn run(
        &self,
        options: &RunOptions,
        console: &mut dyn std::io::Write,
    ) -> Result<NestedExit, NestedHostError> {
        vm::run(self, options, console)
    }
}

/// Whether this process runs inside a nested host (so must not start another).
pub fn inside() -> bool {
    std::env::var_os(INSIDE_ENV).is_some_and(|v| v == "1")
}

//! Everything `thaw-init` does only as PID 1 in a guest, kept here so host-process mode runs
//! all the rest unchanged: mounting the API filesystems, loading the kernel modules the
//! initramfs builder listed, the privileged after-restore steps (reseeding the kernel RNG,
//! setting the wall clock) and powering off.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::errno::Errno;
use nix::kmod::{ModuleInitFlags, finit_module};
use nix::mount::{MsFlags, mount};
use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::stat::Mode;
use nix::sys::time::TimeSpec;
use nix::time::{ClockId, clock_settime};

/// The list the initramfs builder writes in `/lib/modules/<release>/`.
pub const MODULES_LOAD_FILE: &str = "thaw-modules.load";
/// `finit_module` flag: the file is compressed and the kernel decompresses it (Linux 6.0+).
const MODULE_INIT_COMPRESSED_FILE: u32 = 4;

/// A guest-only step failed.
#[derive(Debug, thiserror::Error)]
pub enum Pid1Error {
    /// Mounting an API filesystem failed.
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        /// The filesystem type.
        fstype: &'static str,
        /// The mount point.
        target: &'static str,
        /// Why.
        #[source]
        source: Errno,
    },
    /// The module list or the kernel release could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Opening /dev/random failed.
    #[error("cannot open /dev/random")]
    OpenRandom(#[source] std::io::Error),
    /// An RNG ioctl failed.
    #[error("{ioctl} on /dev/random failed")]
    Rng {
        /// Which ioctl.
        ioctl: &'static str,
        /// Why.
        #[source]
        source: Errno,
    },
    /// clock_settime failed.
    #[error("cannot set the wall clock")]
    Clock(#[source] Errno),
}

/// Mounts /proc, /sys, /dev (devtmpfs), /dev/pts, /dev/shm and /tmp. Already mounted is fine.
pub fn mount_filesystems() -> Result<(), Pid1Error> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let table: [(&'static str, &'static str, MsFlags, Option<&str>); 6] = [
        ("proc", "/proc", nodev, None),
        ("sysfs", "/sys", nodev, None),
        ("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755")),
        (
            "devpts",
            "/dev/pts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=0620,ptmxmode=0666"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None,
        ),
        (
            "tmpfs",
            "/tmp",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
    ];
    for (fstype, target, flags, data) in table {
        // The directory may be missing from a minimal initramfs.
        match nix::unistd::mkdir(target, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(source) => {
                return Err(Pid1Error::Mount {
                    fstype,
                    target,
                    source,
                });
            }
        }
        match mount(Some(fstype), target, Some(fstype), flags, data) {
            Ok(()) | Err(Errno::EBUSY) => tracing::debug!(fstype, target, "mounted"),
            Err(source) => {
                return Err(Pid1Error::Mount {
                    fstype,
                    target,
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Loads the modules listed in `/lib/modules/<release>/thaw-modules.load`, in order (the
/// builder wrote dependencies first). A kernel with everything built in has no list.
pub fn load_modules() -> Result<(), Pid1Error> {
    let release_path = "/proc/sys/kernel/osrelease";
    let release = std::fs::read_to_string(release_path).map_err(|source| Pid1Error::Read {
        path: release_path.to_owned(),
        source,
    })?;
    let dir = Path::new("/lib/modules").join(release.trim());
    let list_path = dir.join(MODULES_LOAD_FILE);
    let list = match std::fs::read_to_string(&list_path) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(path = %list_path.display(), "no module list; assuming built-in drivers");
            return Ok(());
        }
        Err(source) => {
            return Err(Pid1Error::Read {
                path: list_path.display().to_string(),
                source,
            });
        }
    };
    let empty = CString::default();
    for rel in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let path = dir.join(rel);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(module = rel, "cannot open module: {e}");
                continue;
            }
        };
        let compressed = [".ko.gz", ".ko.xz", ".ko.zst"]
            .iter()
            .any(|s| rel.ends_with(s));
        let flags = if compressed {
            ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE)
        } else {
            ModuleInitFlags::empty()
        };
        // A module that fails to load is logged, not fatal: the agent then says clearly that
        // vsock is unavailable, which is the error that matters.
        match finit_module(&file, &empty, flags) {
            Ok(()) => tracing::debug!(module = rel, "module loaded"),
            Err(Errno::EEXIST) => tracing::debug!(module = rel, "module already loaded"),
            Err(e) => tracing::warn!(module = rel, "cannot load module: {e}"),
        }
    }
    Ok(())
}

/// Mixes the host's `entropy` into the kernel's pool and forces the CRNG to reseed from it, so
/// clones restored from one snapshot stop sharing random streams.
pub fn reseed_rng(entropy: &[u8]) -> Result<(), Pid1Error> {
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/random")
        .map_err(Pid1Error::OpenRandom)?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; } in one buffer of
    // u32 words so the header and data are aligned as the kernel reads them.
    let words = entropy.len().div_ceil(4);
    let mut info = vec![0u32; 2 + words];
    info[0] = (entropy.len() * 8) as u32;
    info[1] = entropy.len() as u32;
    for (i, chunk) in entropy.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(w);
    }
    // RNDADDENTROPY = _IOW('R', 0x03, int[2]); RNDRESEEDCRNG = _IO('R', 0x07).
    let add = nix::request_code_write!(b'R', 0x03, 2 * std::mem::size_of::<libc::c_int>());
    let reseed = nix::request_code_none!(b'R', 0x07);
    // SAFETY: `info` is a live rand_pool_info whose buf_size matches the bytes that follow.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), add as _, info.as_ptr()) };
    Errno::result(rc).map_err(|source| Pid1Error::Rng {
        ioctl: "RNDADDENTROPY",
        source,
    })?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), reseed as _) };
    Errno::result(rc).map_err(|source| Pid1Error::Rng {
        ioctl: "RNDRESEEDCRNG",
        source,
    })?;
    Ok(())
}

/// Sets `CLOCK_REALTIME` to the host's time (Unix nanoseconds): the snapshot froze the clock.
pub fn set_wall_clock(unix_ns: u64) -> Result<(), Pid1Error> {
    let secs = (unix_ns / 1_000_000_000) as libc::time_t;
    let nanos = (unix_ns % 1_000_000_000) as libc::c_long;
    clock_settime(ClockId::CLOCK_REALTIME, TimeSpec::new(secs, nanos)).map_err(Pid1Error::Clock)
}

/// Flushes filesystems and powers the machine off. Never returns unless the kernel refuses.
pub fn power_off() -> Errno {
    nix::unistd::sync();
    match reboot(RebootMode::RB_POWER_OFF) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// The kernel command line (empty when /proc is not mounted).
pub fn kernel_cmdline() -> String {
    std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
}

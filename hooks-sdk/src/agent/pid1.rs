//! Everything `thaw-init` does only as PID 1 in a guest, kept here so host-process mode runs
//! all the rest unchanged: mounting the API filesystems, loading the kernel modules the
//! initramfs builder listed, bringing up the loopback interface, the privileged after-restore
//! steps (reseeding the kernel RNG, setting the wall clock) and ending the machine.

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
    /// The loopback interface could not be brought up.
    #[error("cannot bring up the loopback interface ({step})")]
    Loopback {
        /// Which call failed.
        step: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
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

/// Brings up `lo`. A fresh kernel has it down, and with it down 127.0.0.1 is unreachable
/// (connects fail with ENETUNREACH): the runtime could not reach the Runtime API. Bringing it
/// up is what gives it 127.0.0.1/8. Already up is fine.
pub fn bring_up_loopback() -> Result<(), Pid1Error> {
    let fail = |step| Pid1Error::Loopback {
        step,
        source: std::io::Error::last_os_error(),
    };
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(fail("socket"));
    }
    // SAFETY: `raw` is a socket just created and owned by nothing else.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    // SAFETY: an all-zero ifreq is valid: an empty name and zero flags.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `request` is a live ifreq naming an interface; SIOCGIFFLAGS fills its flags.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut request) } < 0 {
        return Err(fail("SIOCGIFFLAGS"));
    }
    // SAFETY: SIOCGIFFLAGS succeeded, so the union holds the interface's flags.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    request.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: `request` is a live ifreq with the interface's name and the new flags.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &raw const request) } < 0 {
        return Err(fail("SIOCSIFFLAGS"));
    }
    Ok(())
}

/// Flushes filesystems and ends the machine by restarting it. Never returns unless the kernel
/// refuses.
///
/// A restart, not a power-off: Thaw's machines (like Firecracker's) have no ACPI power-off
/// (their FADT is hardware-reduced, with no sleep registers), so Linux would turn a power-off
/// into a halt that stops the CPUs but never ends the VM. A restart with `reboot=k` (Thaw's
/// default command line) resets the machine through the i8042 controller, which the VMM takes as
/// the machine's end.
pub fn end_machine() -> Errno {
    nix::unistd::sync();
    match reboot(RebootMode::RB_AUTOBOOT) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// The kernel command line (empty when /proc is not mounted).
pub fn kernel_cmdline() -> String {
    std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a fresh network namespace `lo` is down and 127.0.0.1 unreachable, as in a freshly
    /// booted guest, until `bring_up_loopback`. The namespace belongs to one thread of the test
    /// and goes away with it; creating it needs root.
    #[test]
    fn loopback_comes_up_in_a_fresh_network_namespace() {
        let result = std::thread::spawn(|| {
            // SAFETY: unshare(2) takes no pointers; CLONE_NEWNET moves only this thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            assert!(
                std::net::TcpStream::connect(addr).is_err(),
                "lo should start down in a new network namespace"
            );
            bring_up_loopback().unwrap();
            bring_up_loopback().unwrap(); // already up is fine
            std::net::TcpStream::connect(addr).unwrap();
            Ok(())
        })
        .join()
        .unwrap();
        match result {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => println!(
                "SKIPPED loopback_comes_up_in_a_fresh_network_namespace: creating a network \
                 namespace needs root ({e})"
            ),
            Err(e) => panic!("unshare(CLONE_NEWNET): {e}"),
        }
    }
}

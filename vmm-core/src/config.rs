//! What the user asked for: memory size, vCPU count, what to boot and which devices to add.
//! Validated here, once, so the rest of the VMM can trust it.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Smallest guest memory Thaw accepts, as AWS Lambda does.
pub const MIN_MEM_MIB: u64 = 128;
/// Largest guest memory Thaw accepts, as AWS Lambda does (10 GiB).
pub const MAX_MEM_MIB: u64 = 10 * 1024;

/// Kernel command line used for Linux guests when the user gives none.
///
/// `reboot=k` makes the kernel reboot through the i8042 controller's reset line, which ends the
/// VM cleanly; `panic=1` turns a panic into such a reboot; `pci=off` because there is no PCI bus.
/// No `i8042.*` options: the ACPI tables declare no i8042, so Linux does not probe for one (and
/// `i8042.nopnp`, Firecracker's habit, would make it probe the ports and wait for answers).
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// The kernel image to boot: a file, or bytes already in memory (the built-in test guest).
#[derive(Clone)]
pub enum KernelSource {
    /// A path to an ELF `vmlinux` or a bzImage.
    Path(PathBuf),
    /// An image held in memory, with a name for messages.
    Bytes {
        /// What to call the image in errors and logs.
        name: String,
        /// The image itself.
        image: std::sync::Arc<[u8]>,
    },
}

impl std::fmt::Debug for KernelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelSource::Path(p) => write!(f, "Path({})", p.display()),
            KernelSource::Bytes { name, image } => {
                write!(f, "Bytes({name}, {} bytes)", image.len())
            }
        }
    }
}

impl std::fmt::Display for KernelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelSource::Path(p) => write!(f, "{}", p.display()),
            KernelSource::Bytes { name, .. } => write!(f, "{name}"),
        }
    }
}

/// The guest CID a vsock device gets unless told otherwise (the first one not reserved).
pub const DEFAULT_GUEST_CID: u32 = 3;
/// Longest vsock socket path: `sockaddr_un` holds 107 bytes and a NUL, and the device also
/// connects to `<path>_<port>`, up to 11 bytes longer (`_4294967295`).
pub const MAX_VSOCK_UDS_PATH: usize = 107 - 11;

/// A virtio-vsock device with Firecracker's hybrid vsock on the host side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id: 3 or more (0-2 are reserved), below `u32::MAX` (`VMADDR_CID_ANY`).
    pub guest_cid: u32,
    /// The Unix socket host programs connect to (writing `CONNECT <port>\n`) to reach a guest
    /// port. A guest connection to host port P goes to the socket `<uds_path>_P`.
    pub uds_path: PathBuf,
}

impl VsockConfig {
    /// Checks the CID and the socket path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.guest_cid < DEFAULT_GUEST_CID || self.guest_cid == u32::MAX {
            return Err(ConfigError::VsockCid {
                cid: self.guest_cid,
            });
        }
        validate_vsock_uds_path(&self.uds_path)
    }
}

/// Checks a vsock socket path: not empty, no NUL, short enough for `sockaddr_un` with a port
/// suffix, in a directory that exists. The socket itself must not exist yet.
pub fn validate_vsock_uds_path(path: &Path) -> Result<(), ConfigError> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.contains(&0) {
        return Err(ConfigError::VsockPathInvalid {
            path: path.to_path_buf(),
        });
    }
    if bytes.len() > MAX_VSOCK_UDS_PATH {
        return Err(ConfigError::VsockPathTooLong {
            path: path.to_path_buf(),
            len: bytes.len(),
        });
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if parent.is_some_and(|p| !p.is_dir()) {
        return Err(ConfigError::VsockPathNoDirectory {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Virtio-block disks a machine may have: the virtio IRQs left beside a vsock device.
pub const MAX_DISKS: usize = 8;

/// A virtio-block disk backed by a host file, read and written in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image: whole 512-byte sectors, not empty.
    pub path: PathBuf,
    /// The guest may not write it (it is told so), and the file is opened read-only.
    pub read_only: bool,
    /// The serial the guest reads (`/sys/block/vdX/serial`): at most 20 bytes, printable ASCII.
    pub id: String,
}

impl DiskConfig {
    /// Checks the id; the image is checked when it is opened.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id.len() > 20 || !self.id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::DiskId {
                id: self.id.clone(),
            });
        }
        Ok(())
    }
}

/// A machine to boot.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The kernel (or test guest) image.
    pub kernel: KernelSource,
    /// An optional initramfs.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// A virtio-vsock device, if wanted.
    pub vsock: Option<VsockConfig>,
    /// Virtio-block disks, in the order the guest finds them (`vda`, `vdb`, ...).
    pub disks: Vec<DiskConfig>,
}

/// A configuration that cannot be booted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Memory below Lambda's minimum.
    #[error("guest memory of {mib} MiB is too small: the minimum is {MIN_MEM_MIB} MiB")]
    MemoryTooSmall {
        /// What was asked for.
        mib: u64,
    },
    /// Memory above Lambda's maximum.
    #[error("guest memory of {mib} MiB is too large: the maximum is {MAX_MEM_MIB} MiB (10 GiB)")]
    MemoryTooLarge {
        /// What was asked for.
        mib: u64,
    },
    /// Zero vCPUs.
    #[error("a machine needs at least one vCPU")]
    NoVcpus,
    /// More vCPUs than the host has cores.
    #[error("{requested} vCPUs requested but this host has {host} online CPUs; use 1 to {host}")]
    TooManyVcpus {
        /// What was asked for.
        requested: u64,
        /// Online host CPUs.
        host: u64,
    },
    /// The command line does not fit the boot protocol's limit.
    #[error("the kernel command line is {len} bytes; the limit is {max} bytes")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit, without the terminating NUL.
        max: usize,
    },
    /// The command line has a NUL byte, which would end it early.
    #[error("the kernel command line contains a NUL byte")]
    CmdlineHasNul,
    /// A vsock CID that is reserved or `VMADDR_CID_ANY`.
    #[error("vsock guest CID {cid} is invalid: use 3 to 4294967294 (0-2 are reserved)")]
    VsockCid {
        /// What was asked for.
        cid: u32,
    },
    /// A vsock socket path that is empty or has a NUL byte.
    #[error("vsock socket path {path:?} is empty or contains a NUL byte")]
    VsockPathInvalid {
        /// The path.
        path: PathBuf,
    },
    /// A vsock socket path too long for `sockaddr_un` once `_<port>` is added.
    #[error(
        "vsock socket path {path:?} is {len} bytes; at most {MAX_VSOCK_UDS_PATH} fit a Unix \
         socket address with the `_<port>` suffix"
    )]
    VsockPathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// A vsock socket path whose directory does not exist.
    #[error("the directory of vsock socket path {path:?} does not exist")]
    VsockPathNoDirectory {
        /// The path.
        path: PathBuf,
    },
    /// More disks than the machine has room for.
    #[error("{count} disks: a machine has at most {MAX_DISKS}")]
    TooManyDisks {
        /// How many were asked for.
        count: usize,
    },
    /// A disk id that is too long or not printable ASCII.
    #[error("disk id {id:?} must be at most 20 printable ASCII characters without spaces")]
    DiskId {
        /// The id.
        id: String,
    },
}

/// Number of CPUs this process may run on, read once per process: the standard library reads
/// the affinity mask and the cgroup's CPU quota files on every call (28 µs here), and machine
/// creation and the page server ask on every restore.
pub fn host_cpus() -> u64 {
    static CPUS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1)
    })
}

/// Checks a requested vCPU count against the host and returns it as the machine's type.
pub fn validate_vcpus(requested: u64) -> Result<u8, ConfigError> {
    let host = host_cpus();
    if requested == 0 {
        return Err(ConfigError::NoVcpus);
    }
    if requested > host {
        return Err(ConfigError::TooManyVcpus { requested, host });
    }
    u8::try_from(requested).map_err(|_| ConfigError::TooManyVcpus { requested, host })
}

/// Checks a requested memory size.
pub fn validate_mem_mib(mib: u64) -> Result<u64, ConfigError> {
    if mib < MIN_MEM_MIB {
        return Err(ConfigError::MemoryTooSmall { mib });
    }
    if mib > MAX_MEM_MIB {
        return Err(ConfigError::MemoryTooLarge { mib });
    }
    Ok(mib)
}

impl MachineConfig {
    /// Checks every field; the VMM calls this before it creates anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_mem_mib(self.mem_mib)?;
        validate_vcpus(u64::from(self.vcpus))?;
        let max = crate::layout::CMDLINE_MAX_SIZE - 1;
        if self.cmdline.len() > max {
            return Err(ConfigError::CmdlineTooLong {
                len: self.cmdline.len(),
                max,
            });
        }
        if self.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineHasNul);
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::TooManyDisks {
                count: self.disks.len(),
            });
        }
        for disk in &self.disks {
            disk.validate()?;
        }
        Ok(())
    }

    /// Guest memory size in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MachineConfig {
        MachineConfig {
            mem_mib: 256,
            vcpus: 1,
            kernel: KernelSource::Path("/nonexistent".into()),
            initrd: None,
            cmdline: String::new(),
            vsock: None,
            disks: Vec::new(),
        }
    }

    #[test]
    fn disk_ids_and_counts_are_checked() {
        let disk = |id: &str| DiskConfig {
            path: "/srv/code.img".into(),
            read_only: true,
            id: id.into(),
        };
        let mut c = config();
        c.disks = vec![disk("code"), disk(""), disk("a-twenty-byte-serial")];
        assert_eq!(c.validate(), Ok(()));
        for bad in ["with space", "twenty-one-bytes-long", "tab\t", "é"] {
            c.disks = vec![disk(bad)];
            assert_eq!(
                c.validate(),
                Err(ConfigError::DiskId { id: bad.into() }),
                "{bad:?}"
            );
        }
        c.disks = vec![disk("d"); MAX_DISKS + 1];
        assert_eq!(
            c.validate(),
            Err(ConfigError::TooManyDisks {
                count: MAX_DISKS + 1
            })
        );
    }

    #[test]
    fn accepts_lambda_memory_range() {
        assert_eq!(validate_mem_mib(MIN_MEM_MIB), Ok(MIN_MEM_MIB));
        assert_eq!(validate_mem_mib(MAX_MEM_MIB), Ok(MAX_MEM_MIB));
    }

    #[test]
    fn rejects_memory_outside_lambda_range() {
        assert_eq!(
            validate_mem_mib(127),
            Err(ConfigError::MemoryTooSmall { mib: 127 })
        );
        assert_eq!(
            validate_mem_mib(10 * 1024 + 1),
            Err(ConfigError::MemoryTooLarge { mib: 10 * 1024 + 1 })
        );
    }

    #[test]
    fn rejects_zero_vcpus() {
        assert_eq!(validate_vcpus(0), Err(ConfigError::NoVcpus));
    }

    #[test]
    fn rejects_more_vcpus_than_host_cpus() {
        let host = host_cpus();
        assert_eq!(
            validate_vcpus(host + 1),
            Err(ConfigError::TooManyVcpus {
                requested: host + 1,
                host
            })
        );
        assert_eq!(validate_vcpus(1), Ok(1));
    }

    #[test]
    fn rejects_overlong_or_nul_cmdline() {
        let mut c = config();
        c.cmdline = "x".repeat(crate::layout::CMDLINE_MAX_SIZE);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::CmdlineTooLong { .. })
        ));
        c.cmdline = "a\0b".into();
        assert_eq!(c.validate(), Err(ConfigError::CmdlineHasNul));
        c.cmdline = "console=ttyS0".into();
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn validates_vsock_cid_and_socket_path() {
        let ok = |cid, path: &str| {
            VsockConfig {
                guest_cid: cid,
                uds_path: path.into(),
            }
            .validate()
        };
        assert_eq!(ok(3, "/tmp/v.sock"), Ok(()));
        assert_eq!(ok(u32::MAX - 1, "v.sock"), Ok(()));
        for cid in [0, 1, 2, u32::MAX] {
            assert_eq!(ok(cid, "/tmp/v.sock"), Err(ConfigError::VsockCid { cid }));
        }
        assert!(matches!(
            ok(3, ""),
            Err(ConfigError::VsockPathInvalid { .. })
        ));
        let long = format!("/tmp/{}", "x".repeat(MAX_VSOCK_UDS_PATH));
        assert!(matches!(
            ok(3, &long),
            Err(ConfigError::VsockPathTooLong { .. })
        ));
        let exact = format!("/tmp/{}", "x".repeat(MAX_VSOCK_UDS_PATH - 5));
        assert_eq!(ok(3, &exact), Ok(()));
        assert!(matches!(
            ok(3, "/nonexistent-thaw-dir/v.sock"),
            Err(ConfigError::VsockPathNoDirectory { .. })
        ));
        let mut c = config();
        c.vsock = Some(VsockConfig {
            guest_cid: 2,
            uds_path: "/tmp/v.sock".into(),
        });
        assert_eq!(c.validate(), Err(ConfigError::VsockCid { cid: 2 }));
    }
}

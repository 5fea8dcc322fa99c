//! Guest images for Linux: Debian's cloud kernel fetched with apt, and initramfs archives.
//! The functions here are what the `thaw kernel fetch` and `thaw initramfs build` commands call.

pub mod debian_kernel;
pub mod initramfs;
pub mod kconfig;
pub mod modules;

pub use debian_kernel::{DebianKernel, KernelFetchError, cached, default_cache_dir, fetch};
pub use initramfs::{
    Compression, FileSpec, INIT_PATH, InitramfsBuilder, InitramfsError, KernelModulesAdded,
    MODULES_LOAD_FILE, parse_file_spec, supported_compressions,
};
pub use kconfig::{KernelConfig, KernelConfigError};
pub use modules::{ModuleIndex, ModuleIndexError, ModuleResolution};

/// The kernel modules a Thaw guest needs: virtio over MMIO, and vsock over virtio (the agent's
/// channel to the host). On a kernel that builds some of them in, those are skipped.
pub const GUEST_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

//! The nested host's initramfs: busybox, the init script (`init.sh`), and the modules of
//! Debian's cloud kernel that make it a KVM host with the host's files (`kvm_amd`, virtio over
//! PCI, virtiofs). Small enough (about 2 MiB) to build for every run.

use std::path::Path;

use super::NestedHostError;
use crate::guest_image::{Compression, DebianKernel, INIT_PATH, InitramfsBuilder};

/// The init script.
pub const INIT_SCRIPT: &str = include_str!("init.sh");
/// Modules the nested host loads (their dependencies come along): KVM for AMD, which QEMU's TCG
/// emulates with nested paging; the PCI transport of QEMU's virtio devices; virtiofs.
pub const OUTER_MODULES: &[&str] = &["kvm_amd", "virtio_pci", "virtiofs"];

/// Writes the initramfs to `path`.
pub fn write(kernel: &DebianKernel, busybox: &Path, path: &Path) -> Result<(), NestedHostError> {
    let mut builder = InitramfsBuilder::new();
    builder.add_base_layout()?;
    builder.add_file(INIT_PATH, INIT_SCRIPT, 0o755)?;
    builder.add_file_from_host(busybox, "/bin/busybox", 0o755)?;
    builder.add_kernel_modules(kernel, OUTER_MODULES)?;
    // Debian's kernels unpack zstd, the fastest to unpack under emulation.
    builder.write_to(path, Compression::Zstd)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_init_script_reads_its_words_and_reports_its_token() {
        assert!(INIT_SCRIPT.starts_with("#!/bin/busybox sh\n"));
        for needle in [
            "thaw.nested.run=",
            "thaw.nested.tmp=",
            "thaw.nested.token=",
            "thaw-nested-host: exit $token",
            "thaw-modules.load",
            "mount -t virtiofs host /host",
            "chroot /host /bin/sh \"$run\"",
        ] {
            assert!(INIT_SCRIPT.contains(needle), "{needle}");
        }
    }
}

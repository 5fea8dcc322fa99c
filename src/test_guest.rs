//! The in-repo test guest, built by `build.rs` from `hooks-sdk/test-guest` and embedded here.

use std::sync::Arc;

use vmm_core::KernelSource;

/// The test guest's ELF image.
pub static ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test-guest.elf"));

/// The test guest as a kernel to boot.
pub fn kernel() -> KernelSource {
    KernelSource::Bytes {
        name: "built-in test guest".into(),
        image: Arc::from(ELF),
    }
}

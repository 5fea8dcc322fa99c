//! Builds the in-repo test guest (`hooks-sdk/test-guest`) and hands its ELF image to the `thaw`
//! crate, which embeds it so `thaw run` without `--kernel` boots it.
//!
//! The guest is a freestanding image with `panic = "abort"` and a linker script, so it cannot
//! be a workspace member: this script runs a nested `cargo build` for it with its own target
//! directory (see `build_support/test_guest_cargo.rs`).

use std::path::PathBuf;

include!("build_support/test_guest_cargo.rs");

fn main() {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env("OUT_DIR"));
    let guest_dir = manifest_dir.join("hooks-sdk").join("test-guest");
    for input in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "link.ld",
        ".cargo",
    ] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(input).display());
    }
    // The guest speaks the protocol defined in hooks-sdk.
    for input in [
        "hooks-sdk/src/protocol.rs",
        "hooks-sdk/src/lib.rs",
        "hooks-sdk/Cargo.toml",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            manifest_dir.join(input).display()
        );
    }
    println!("cargo:rerun-if-changed=build_support/test_guest_cargo.rs");

    let target_dir = out_dir.join("test-guest-target");
    let status = test_guest_cargo(&guest_dir)
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target_dir)
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the test guest: {e}"));
    if !status.success() {
        panic!("building the test guest in {} failed", guest_dir.display());
    }
    let image = target_dir
        .join("x86_64-unknown-linux-gnu")
        .join("release")
        .join("thaw-test-guest");
    let dest = out_dir.join("test-guest.elf");
    std::fs::copy(&image, &dest).unwrap_or_else(|e| {
        panic!(
            "cannot copy the test guest from {} to {}: {e}",
            image.display(),
            dest.display()
        )
    });
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("cargo did not set {name}"))
}

// Shared by build.rs and the tests (with `include!`): how to run `cargo` for the test guest.
//
// The guest is its own workspace (a freestanding image with `panic = "abort"` and a linker
// script), so cargo runs from its directory, where its `.cargo/config.toml` applies. Flags and
// wrappers meant for the Thaw workspace (RUSTFLAGS from the environment, clippy's wrapper,
// coverage instrumentation, a target dir or target) must not leak into it.

/// A `cargo` command that runs in the test guest's workspace at `guest_dir`.
fn test_guest_cargo(guest_dir: &std::path::Path) -> std::process::Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(guest_dir);
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_PROFILE_RELEASE_PANIC",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

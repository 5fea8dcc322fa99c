//! `scripts/build-thaw-init` produces a static ELF (no `PT_INTERP`: it needs no dynamic loader
//! in the initramfs) that runs: `--version`, and a short host-mode session (Hello, Shutdown).
//! Booting it as PID 1 in a Linux guest needs hardware KVM and is tested elsewhere.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use hooks_sdk::protocol::InitType;

const PT_INTERP: u32 = 3;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The program header types of a little-endian ELF64 x86-64 executable.
fn program_header_types(elf: &[u8]) -> Vec<u32> {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not ELF64");
    assert_eq!(elf[5], 1, "not little-endian");
    assert_eq!(u16_at(elf, 18), 62, "not x86-64");
    let phoff = u64_at(elf, 32) as usize;
    let phentsize = u16_at(elf, 54) as usize;
    let phnum = u16_at(elf, 56) as usize;
    (0..phnum)
        .map(|i| u32_at(elf, phoff + i * phentsize))
        .collect()
}

fn build() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("bash")
        .arg(root.join("scripts/build-thaw-init"))
        .arg("--quiet")
        .output()
        .expect("cannot run scripts/build-thaw-init");
    assert!(
        out.status.success(),
        "scripts/build-thaw-init failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(path.trim())
}

#[test]
fn static_thaw_init_has_no_interpreter_and_runs() {
    let exe = build();
    let elf = std::fs::read(&exe).unwrap();
    let types = program_header_types(&elf);
    assert!(!types.is_empty(), "no program headers");
    assert!(
        !types.contains(&PT_INTERP),
        "{} has PT_INTERP: it is not static",
        exe.display()
    );

    let out = Command::new(&exe).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("thaw-init {}", env!("CARGO_PKG_VERSION"))
    );

    // Without --host-mode and not PID 1 it refuses to act as init.
    let out = Command::new(&exe).output().unwrap();
    assert_eq!(out.status.code(), Some(2));

    let host = FakeHost::new();
    let agent = AgentProcess::start_exe(
        &exe,
        &host,
        &[],
        &["/bin/sh", "-c", "exec sleep 600"],
        host.dir.path(),
    );
    let mut conn = host.accept(&agent, InitType::OnDemand);
    agent.shutdown(&mut conn);
}

#[test]
fn elf_parser_finds_the_interpreter_of_a_dynamic_binary() {
    // The test binary itself is dynamically linked: the check above would catch that.
    let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    assert!(program_header_types(&me).contains(&PT_INTERP));
}

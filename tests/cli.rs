//! The `thaw` command as users run it: real binary, real KVM, and every bad input answered with
//! a clear message and a non-zero exit, never a panic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;

use std::process::Output;

use fixture::{require_kvm, thaw_bin, vm_slot};

fn thaw(args: &[&str]) -> Output {
    let _slot = vm_slot();
    thaw_bin().args(args).output().expect("run thaw")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails unless `out` is a clean, non-zero exit whose stderr mentions `needle`.
fn assert_refused(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure; stderr: {err}");
    assert!(
        out.status.code().is_some(),
        "killed by a signal: {:?}",
        out.status
    );
    assert!(!err.contains("panicked"), "thaw panicked: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
}

fn test_guest_file(dir: &std::path::Path) -> String {
    let path = dir.join("test-guest.elf");
    std::fs::write(&path, thaw::test_guest::ELF).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn run_without_kernel_boots_the_test_guest() {
    if !require_kvm("run_without_kernel_boots_the_test_guest") {
        return;
    }
    let out = thaw(&["run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("banner from CPL3"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn run_exits_with_the_guest_exit_code() {
    if !require_kvm("run_exits_with_the_guest_exit_code") {
        return;
    }
    let out = thaw(&["run", "--cmdline", "thaw.exit=9"]);
    assert_eq!(out.status.code(), Some(9), "{}", stderr(&out));
}

#[test]
fn run_boots_an_elf_kernel_from_a_file() {
    if !require_kvm("run_boots_an_elf_kernel_from_a_file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = test_guest_file(dir.path());
    let out = thaw(&["run", "--kernel", &kernel, "--cmdline", "thaw.exit=0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("banner from CPL3"));
}

#[test]
fn run_attaches_disks_and_refuses_bad_ones_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, [0u8; 1000]).unwrap();
    let missing = dir.path().join("missing.img");
    let disk = |spec: String| thaw(&["run", "--cmdline", "thaw.exit=0", "--disk", &spec]);
    for (spec, needle) in [
        ("read-only".to_string(), "has no path=FILE"),
        ("path=".to_string(), "is not a disk option"),
        (
            "path=/x,cache=none".to_string(),
            "\"cache=none\" is not a disk option",
        ),
        (
            "path=/x,id=far-too-long-for-a-serial".to_string(),
            "at most 20 printable ASCII",
        ),
    ] {
        assert_refused(&disk(spec), needle);
    }
    if !require_kvm("run_attaches_disks_and_refuses_bad_ones_clearly") {
        return;
    }
    assert_refused(
        &disk(format!("path={}", missing.display())),
        &format!("disk {}", missing.display()),
    );
    assert_refused(
        &disk(format!("path={},read-only", odd.display())),
        "not a multiple of 512",
    );
    // Sound disks are attached and the guest runs to its exit.
    let code = dir.path().join("code.img");
    std::fs::write(&code, vec![1u8; 1 << 20]).unwrap();
    let scratch = dir.path().join("tmp.img");
    std::fs::File::create(&scratch)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let out = thaw(&[
        "run",
        "--cmdline",
        "thaw.exit=0",
        "--disk",
        &format!("path={},read-only,id=code", code.display()),
        "--disk",
        &format!("path={}", scratch.display()),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn rejects_missing_kernel() {
    let out = thaw(&["run", "--kernel", "/nonexistent/vmlinux"]);
    assert_refused(&out, "cannot read kernel image /nonexistent/vmlinux");
}

#[test]
fn rejects_unreadable_kernel() {
    // Root reads any file, so "unreadable" is a directory here: open works, read fails.
    let dir = tempfile::tempdir().unwrap();
    let out = thaw(&["run", "--kernel", &dir.path().to_string_lossy()]);
    assert_refused(&out, "cannot read kernel image");
}

#[test]
fn rejects_a_file_that_is_neither_elf_nor_bzimage() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
    let out = thaw(&["run", "--kernel", &junk.to_string_lossy()]);
    assert_refused(&out, "neither an ELF vmlinux nor a bzImage");
}

#[test]
fn rejects_initramfs_larger_than_guest_memory() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = test_guest_file(dir.path());
    let initrd = dir.path().join("huge.cpio");
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(200 << 20)
        .unwrap();
    let out = thaw(&[
        "run",
        "--kernel",
        &kernel,
        "--initrd",
        &initrd.to_string_lossy(),
        "--mem-mib",
        "128",
    ]);
    assert_refused(&out, "guest memory are free for it");
}

#[test]
fn rejects_memory_outside_lambda_limits() {
    assert_refused(&thaw(&["run", "--mem-mib", "127"]), "too small");
    assert_refused(&thaw(&["run", "--mem-mib", "10241"]), "too large");
    assert_refused(&thaw(&["run", "--mem-mib", "lots"]), "is not a number");
}

#[test]
fn rejects_zero_or_too_many_vcpus() {
    assert_refused(&thaw(&["run", "--vcpus", "0"]), "at least one vCPU");
    let too_many = (vmm_core::config::host_cpus() + 1).to_string();
    assert_refused(&thaw(&["run", "--vcpus", &too_many]), "online CPUs");
}

#[test]
fn rejects_initrd_without_kernel() {
    assert_refused(&thaw(&["run", "--initrd", "/tmp/x"]), "--kernel");
}

#[test]
fn host_check_reports_kvm_and_userfaultfd() {
    if !require_kvm("host_check_reports_kvm_and_userfaultfd") {
        return;
    }
    let out = thaw(&["host-check", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["kvm_api_version"], 12);
    assert!(report["kvm_flavor"].is_string());
    assert!(report["userfaultfd"]["available"].is_boolean());
    let text = thaw(&["host-check"]);
    assert!(stdout(&text).contains("What this means"));
}

#[test]
fn restore_rejects_bad_flags_before_touching_anything() {
    assert_refused(
        &thaw(&["restore", "/nonexistent", "--memory", "fast"]),
        "unknown memory mode \"fast\": use lazy or eager",
    );
    assert_refused(
        &thaw(&["restore", "/nonexistent", "--chunk-check", "never"]),
        "unknown chunk check \"never\": use upfront, once or on-install",
    );
    assert_refused(
        &thaw(&["restore", "/nonexistent", "--after-restore-timeout", "0"]),
        "out of range",
    );
    // Your own agent host and Thaw's invocations exclude each other.
    assert_refused(
        &thaw(&[
            "restore",
            "/nonexistent",
            "--vsock-uds",
            "/tmp/v.sock",
            "--invoke",
            "x",
        ]),
        "cannot be used with",
    );
    assert_refused(
        &thaw(&["snapshot", "record-ws", "/nonexistent", "--timeout", "x"]),
        "is not a number of seconds",
    );
    // A directory that holds no snapshot: a clear error, nothing restored.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    snapshot::MasterKey::load_or_create(&key).unwrap();
    assert_refused(
        &thaw(&[
            "restore",
            dir.path().to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
        ]),
        "nothing was restored",
    );
    // A snapshot in a store: a URL, an id, and not a directory as well.
    let id = "0".repeat(32);
    assert_refused(
        &thaw(&["restore", "--store", "http://b/x", "--snapshot-id", &id]),
        "s3://",
    );
    assert_refused(
        &thaw(&[
            "restore",
            "--store",
            "s3://bucket/x",
            "--snapshot-id",
            "nope",
        ]),
        "snapshot id",
    );
    assert_refused(
        &thaw(&["restore", "--store", "s3://bucket/x"]),
        "--snapshot-id",
    );
    assert_refused(&thaw(&["restore", "--snapshot-id", &id]), "--store");
    assert_refused(
        &thaw(&[
            "restore",
            "/some/dir",
            "--store",
            "s3://bucket/x",
            "--snapshot-id",
            &id,
        ]),
        "cannot be used with",
    );
    // A store that holds no such snapshot: said so, nothing restored.
    let server = store::test_servers::s3s_fs();
    let out = thaw_bin()
        .envs(server.env())
        .args([
            "restore",
            "--store",
            &format!("s3://{}/none", store::test_servers::BUCKET),
            "--snapshot-id",
            &id,
            "--key-file",
            key.to_str().unwrap(),
            "--chunk-cache",
            dir.path().join("cache").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_refused(&out, "holds no snapshot");
    // A chunk cache that is not a directory: said so before the store is asked anything.
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let out = thaw_bin()
        .envs(server.env())
        .args([
            "restore",
            "--store",
            &format!("s3://{}/none", store::test_servers::BUCKET),
            "--snapshot-id",
            &id,
            "--key-file",
            key.to_str().unwrap(),
            "--chunk-cache",
            not_a_dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_refused(&out, "as the chunk cache");
    assert_eq!(std::fs::read(&not_a_dir).unwrap(), b"x");
    // No key anywhere: a store's objects cannot be opened, and nothing is made up.
    let keyless = dir.path().join("keyless");
    let no_key = |args: &[&str]| {
        thaw_bin()
            .envs(server.env())
            .env("THAW_KEY_FILE", &keyless)
            .args(args)
            .output()
            .unwrap()
    };
    let url = format!("s3://{}/none", store::test_servers::BUCKET);
    assert_refused(
        &no_key(&["restore", "--store", &url, "--snapshot-id", &id]),
        "no master key",
    );
    assert_refused(
        &no_key(&[
            "snapshot",
            "pull",
            &url,
            &id,
            dir.path().join("p").to_str().unwrap(),
        ]),
        "no master key",
    );
    assert!(!keyless.exists());
}

fn thawd(args: &[&str]) -> Output {
    std::process::Command::new(fixture::thawd_bin::thawd_bin())
        .args(args)
        .output()
        .expect("run thawd")
}

#[test]
fn thawd_refuses_bad_flags_and_configs_before_serving() {
    assert_refused(&thawd(&[]), "--config is required");
    assert_refused(
        &thawd(&["--config", "/nonexistent/thawd.toml"]),
        "cannot read config file /nonexistent/thawd.toml",
    );
    assert_refused(
        &thawd(&["--config", "/dev/null", "--listen", "nowhere"]),
        "invalid value 'nowhere'",
    );
    let dir = tempfile::tempdir().unwrap();
    let config = |text: &str| {
        let path = dir.path().join("thawd.toml");
        std::fs::write(&path, text).unwrap();
        thawd(&["--config", path.to_str().unwrap()])
    };
    assert_refused(&config("listen = 5\n"), "listen");
    assert_refused(&config(""), "no function is configured");
    assert_refused(
        &config("[functions.f]\nsnapshot = \"s\"\nmemory_mib = 128\ntimeout_secs = 0\n"),
        "functions.f.timeout_secs: 0 is outside 1..=900",
    );
    assert_refused(&config("[functions.f]\nsnapshot = \"s\"\n"), "memory_mib");
    // A function whose snapshot is not there stops thawd: nothing is served half-verified.
    assert_refused(
        &config("[functions.f]\nsnapshot = \"missing\"\nmemory_mib = 128\n"),
        "function f: snapshot",
    );
    let key = dir.path().join("k");
    snapshot::MasterKey::load_or_create(&key).unwrap();
    assert_refused(
        &config(&format!(
            "[functions.f]\nsnapshot = \"missing\"\nmemory_mib = 128\nkey_file = {:?}\n",
            key.display().to_string()
        )),
        "function f: snapshot",
    );
    assert_refused(
        &config("[functions.f]\nsnapshot = \"s\"\nmemory_mib = 128\nkey_file = \"nokey\"\n"),
        "cannot load key file",
    );
    // Issue 14, defect 12: not a config file at all, refused at once instead of read for ever.
    assert_refused(&thawd(&["--config", "/dev/zero"]), "a character device");
    // Issue 14, defect 7: a dead-letter "directory" that is a file is refused at start-up,
    // not found unusable when a failed event has to be kept.
    std::fs::write(dir.path().join("dl"), b"").unwrap();
    assert_refused(
        &config("dead_letter_dir = \"dl\"\n[functions.f]\nsnapshot = \"s\"\nmemory_mib = 128\n"),
        "dead_letter_dir",
    );
}

#[test]
fn thaw_invoke_refuses_bad_flags() {
    assert_refused(
        &thaw(&["invoke", "f", "--invocation-type", "later"]),
        "invalid value 'later'",
    );
    assert_refused(
        &thaw(&["invoke", "f", "--timeout", "0"]),
        "0 is not in 1..=86400",
    );
    assert_refused(
        &thaw(&["invoke", "f", "--payload-file", "/nonexistent/event.json"]),
        "cannot read /nonexistent/event.json",
    );
    assert_refused(
        &thaw(&["invoke", "f", "{}", "--endpoint", "http://127.0.0.1:9"]),
        "cannot reach thawd",
    );
}

#[test]
fn function_build_refuses_bad_flags() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("image");
    let out_dir = out_dir.to_str().unwrap();
    let code = dir.path().to_str().unwrap();
    let build = |runtime: &str, handler: &str| {
        thaw(&[
            "function",
            "build",
            "--code",
            code,
            "--out",
            out_dir,
            "--runtime",
            runtime,
            "--handler",
            handler,
        ])
    };
    // Runtimes other than python3.X, with the list of what is supported.
    for runtime in [
        "nodejs20.x",
        "java21",
        "ruby3.3",
        "provided.al2023",
        "python3",
        "garbage",
    ] {
        let out = build(runtime, "app.handler");
        assert_refused(&out, "python3.X");
        assert_eq!(out.status.code(), Some(2), "{runtime}: {}", stderr(&out));
    }
    // Handlers that are not MODULE.FUNCTION.
    for handler in [
        "app",
        "app.",
        ".handler",
        "my-app.handler",
        "app/mod.handler",
    ] {
        assert_refused(&build("python3.11", handler), "MODULE.FUNCTION");
    }
    // Required flags.
    assert_refused(
        &thaw(&[
            "function",
            "build",
            "--code",
            code,
            "--handler",
            "app.handler",
        ]),
        "--runtime",
    );
    assert!(!dir.path().join("image").exists());
    // --function replaces --kernel and --initrd; --cache-dir needs it.
    assert_refused(
        &thaw(&[
            "snapshot",
            "create",
            "--function",
            code,
            "--kernel",
            "/boot/vmlinuz",
            "--out",
            out_dir,
        ]),
        "cannot be used with",
    );
    assert_refused(
        &thaw(&["snapshot", "create", "--cache-dir", code, "--out", out_dir]),
        "--function",
    );
    let help = thaw(&["function", "build", "--help"]);
    assert!(help.status.success());
    for needle in [
        "--requirements",
        "/var/task",
        "/var/lang",
        "python3.X",
        "--replace",
    ] {
        assert!(stdout(&help).contains(needle), "--help lacks {needle}");
    }
}

#[test]
fn nested_host_run_refuses_bad_flags_before_starting_anything() {
    // Refused by the flag parser or before any package is fetched: no VM, no QEMU.
    let nested = |args: &[&str]| thaw_bin().args(args).output().expect("run thaw");
    assert_refused(&nested(&["nested-host", "run"]), "COMMAND");
    assert_refused(
        &nested(&["nested-host", "run", "--mem-mib", "100", "--", "true"]),
        "--mem-mib",
    );
    assert_refused(
        &nested(&["nested-host", "run", "--cpus", "0", "--", "true"]),
        "--cpus",
    );
    assert_refused(
        &nested(&["nested-host", "run", "--timeout", "0", "--", "true"]),
        "--timeout",
    );
    // Inside a nested host, another one is refused rather than emulated inside emulation.
    let out = thaw_bin()
        .env(thaw::nested_host::INSIDE_ENV, "1")
        .args(["nested-host", "run", "--", "true"])
        .output()
        .expect("run thaw");
    assert_refused(&out, "already runs inside a nested host");
}

/// Issue 14, defect 1: `--replace` deleted whatever was at the target. It replaces only a
/// snapshot now, and says so before anything boots.
#[test]
fn snapshot_create_replace_refuses_what_is_not_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    std::fs::write(photos.join("cat.jpg"), b"meow").unwrap();
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, b"keep me").unwrap();
    for target in [&photos, &notes] {
        let started = std::time::Instant::now();
        assert_refused(
            &thaw(&[
                "snapshot",
                "create",
                "--replace",
                "--out",
                target.to_str().unwrap(),
            ]),
            "refusing to replace",
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "refused only after booting"
        );
    }
    assert_eq!(std::fs::read(photos.join("cat.jpg")).unwrap(), b"meow");
    assert_eq!(std::fs::read(&notes).unwrap(), b"keep me");
}

/// Issue 14: `thaw snapshot create --out DIR` alone booted the test guest without its agent and
/// failed waiting for it. It snapshots the test guest's agent now, and the snapshot restores.
#[test]
fn snapshot_create_with_only_out_snapshots_the_test_guest_agent() {
    if !require_kvm("snapshot_create_with_only_out_snapshots_the_test_guest_agent") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let out = dir.path().join("snap");
    let _slot = vm_slot();
    let created = thaw_bin()
        .env("THAW_KEY_FILE", &key)
        .args(["snapshot", "create", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(created.status.success(), "{}", stderr(&created));
    let restored = thaw_bin()
        .env("THAW_KEY_FILE", &key)
        .env("XDG_STATE_HOME", dir.path())
        .args(["restore", out.to_str().unwrap(), "--invoke", "{}"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(restored.status.success(), "{}", stderr(&restored));
    assert!(
        stderr(&restored).contains("first sign of life"),
        "{}",
        stderr(&restored)
    );
}

/// A small encrypted snapshot (no VM needed: the store moves bytes) and its key file.
fn store_fixture(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let key_file = dir.join("key");
    let key = snapshot::MasterKey::load_or_create(&key_file).unwrap();
    let mut memory = vec![0u8; 16 << 20];
    for (i, b) in memory.iter_mut().enumerate().step_by(4093) {
        *b = (i % 251) as u8;
    }
    let snap = dir.join("snap");
    let meta = snapshot::SnapshotMeta {
        fingerprint: snapshot::Fingerprint::made_up(),
        vcpus: 1,
    };
    snapshot::write(
        &snap,
        &meta,
        b"state",
        &[snapshot::MemoryRegion {
            guest_addr: 0,
            bytes: &memory,
        }],
        &snapshot::Protection::Encrypted(&key),
        &snapshot::WriteOptions::default(),
    )
    .unwrap();
    (snap, key_file)
}

/// A snapshot of the test guest's agent goes to an S3 server and back, and the copy restores
/// and answers an invocation.
#[test]
fn snapshot_push_and_pull_move_a_snapshot_through_an_s3_store() {
    if !require_kvm("snapshot_push_and_pull_move_a_snapshot_through_an_s3_store") {
        return;
    }
    let server = store::test_servers::s3s_fs();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    let key = key_file.to_str().unwrap();
    let snap = dir.path().join("snap");
    let created = {
        let _slot = vm_slot();
        thaw_bin()
            .env("THAW_KEY_FILE", &key_file)
            .args(["snapshot", "create", "--out", snap.to_str().unwrap()])
            .output()
            .unwrap()
    };
    assert!(created.status.success(), "{}", stderr(&created));
    let id = snapshot::Snapshot::open(&snap, Some(&snapshot::MasterKey::load(&key_file).unwrap()))
        .unwrap()
        .id();
    let url = format!("s3://{}/cli", store::test_servers::BUCKET);
    let run = |args: &[&str]| {
        thaw_bin()
            .args(args)
            .envs(server.env())
            .env("THAW_CACHE_DIR", dir.path())
            .output()
            .expect("run thaw")
    };
    let push = [
        "snapshot",
        "push",
        snap.to_str().unwrap(),
        &url,
        "--key-file",
        key,
    ];
    let pushed = run(&push);
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    assert!(
        stdout(&pushed).contains(&id.to_string()),
        "{}",
        stdout(&pushed)
    );
    assert!(!stderr(&pushed).contains(store::test_servers::SECRET_KEY));
    // A second push finds every object and the manifest in place and uploads nothing.
    let again = run(&push);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stdout(&again).contains(" 0 new") && stdout(&again).contains("had it already"),
        "{}",
        stdout(&again)
    );
    let cache = dir.path().join("chunk-cache");
    let pull = |into: &std::path::Path| {
        run(&[
            "snapshot",
            "pull",
            &url,
            &id.to_string(),
            into.to_str().unwrap(),
            "--key-file",
            key,
            "--chunk-cache",
            cache.to_str().unwrap(),
        ])
    };
    // The first pull fetches every object; a second finds them all in the host cache.
    let pulled_dir = dir.path().join("pulled");
    let pulled = pull(&pulled_dir);
    assert!(pulled.status.success(), "{}", stderr(&pulled));
    assert!(
        stdout(&pulled).contains(", 0 from the host cache"),
        "{}",
        stdout(&pulled)
    );
    let again = pull(&dir.path().join("pulled-again"));
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stdout(&again).contains("chunk objects: 0 fetched from the store (0.0 MiB)"),
        "{}",
        stdout(&again)
    );
    let opened = snapshot::Snapshot::open(
        &pulled_dir,
        Some(&snapshot::MasterKey::load(&key_file).unwrap()),
    )
    .unwrap();
    assert_eq!(opened.id(), id);
    drop(opened);
    let restored = {
        let _slot = vm_slot();
        thaw_bin()
            .env("THAW_KEY_FILE", &key_file)
            .env("XDG_STATE_HOME", dir.path())
            .args(["restore", pulled_dir.to_str().unwrap(), "--invoke", "{}"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    assert!(restored.status.success(), "{}", stderr(&restored));
    assert!(
        stderr(&restored).contains("first sign of life"),
        "{}",
        stderr(&restored)
    );
}

/// Bad store URLs, ids and paths are refused with a clear message before anything is sent or
/// written.
#[test]
fn snapshot_push_and_pull_refuse_bad_input() {
    let server = store::test_servers::s3s_fs();
    let dir = tempfile::tempdir().unwrap();
    let (snap, key_file) = store_fixture(dir.path());
    let url = format!("s3://{}/cli", store::test_servers::BUCKET);
    let run = |args: &[&str]| {
        thaw_bin()
            .args(args)
            .envs(server.env())
            .env("THAW_CACHE_DIR", dir.path())
            .output()
            .expect("run thaw")
    };
    let key = key_file.to_str().unwrap();
    let elsewhere = dir.path().join("elsewhere");
    let elsewhere = elsewhere.to_str().unwrap();
    for (args, needle) in [
        (
            vec![
                "snapshot",
                "push",
                snap.to_str().unwrap(),
                "http://bucket/x",
                "--key-file",
                key,
            ],
            "s3://",
        ),
        (
            vec![
                "snapshot",
                "pull",
                &url,
                "not-an-id",
                elsewhere,
                "--key-file",
                key,
            ],
            "snapshot id",
        ),
        (
            vec![
                "snapshot",
                "pull",
                &url,
                &"0".repeat(32),
                elsewhere,
                "--key-file",
                key,
            ],
            "holds no snapshot",
        ),
        (
            vec![
                "snapshot",
                "push",
                "/nonexistent/snap",
                &url,
                "--key-file",
                key,
            ],
            "local snapshot",
        ),
    ] {
        let out = run(&args);
        assert_refused(&out, needle);
    }
    assert!(!std::path::Path::new(elsewhere).exists());
}

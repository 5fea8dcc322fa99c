//! `thaw function build` as users run it (the real binary) on the example function in
//! `examples/python-function`: the image's layout and manifest, `--replace`, and every bad input
//! answered with a clear message, a non-zero exit and no image directory (nor any temporary one)
//! left behind. Then `thaw snapshot create --function` refusing images it must not boot.
//! `linux_python.rs` boots the example's image, snapshots, restores and serves it.
//!
//! No VM boots here: the image is checked as files, and, as root, by running the bundled Python
//! in a chroot of the unpacked archive.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

mod fixture;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use fixture::function_image::{cpio_entries, host_runtime, read_archive, unpack_cpio};
use fixture::{output_text, static_thaw_init, thaw_bin};
use thaw::function_image::elf_deps::{ElfDeps, SYSTEM_DIRS, is_elf};
use thaw::function_image::{MANIFEST_FILE, Manifest};

/// The example function in the repository.
fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python-function")
}

/// `thaw function build` with the static thaw-init and the host's Python, plus `args`.
fn function_build(code: &Path, out: &Path, args: &[&str]) -> Output {
    let runtime = host_runtime().to_string();
    thaw_bin()
        .args(["function", "build", "--runtime", &runtime, "--code"])
        .arg(code)
        .arg("--out")
        .arg(out)
        .arg("--thaw-init")
        .arg(static_thaw_init())
        .args(args)
        .output()
        .expect("run thaw")
}

/// Fails unless `out` is a clean non-zero exit (no panic, no signal) whose stderr has `needle`.
fn assert_refused(out: &Output, needle: &str) {
    let text = output_text(out);
    assert!(!out.status.success(), "expected a failure:\n{text}");
    assert!(out.status.code().is_some(), "killed by a signal:\n{text}");
    assert!(!text.contains("panicked"), "thaw panicked:\n{text}");
    assert!(
        text.contains(needle),
        "the message lacks {needle:?}:\n{text}"
    );
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Where the bundled Python keeps packages under `/var/lang`, as the host's says.
fn guest_site_packages() -> String {
    let out = Command::new(host_runtime().host_command())
        .args([
            "-c",
            "import site; print(site.getsitepackages(['/var/lang'])[0])",
        ])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A built example image, shared by the tests that only read it.
struct Built {
    _dir: tempfile::TempDir,
    image: PathBuf,
    manifest: Manifest,
    archive: Vec<u8>,
}

fn build_example() -> Built {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    let started = Instant::now();
    let out = function_build(
        &example(),
        &image,
        &["--handler", "app.handler", "--name", "hello"],
    );
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    println!("built in {:?}:\n{text}", started.elapsed());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        image.display().to_string()
    );
    assert_eq!(names(&image), [MANIFEST_FILE, "initramfs.cpio.zst"]);
    assert_eq!(
        names(dir.path()),
        ["image"],
        "nothing else is left beside it"
    );
    let manifest = Manifest::read(&image).unwrap();
    let archive = read_archive(&image.join(&manifest.initramfs.file));
    Built {
        _dir: dir,
        image,
        manifest,
        archive,
    }
}

#[test]
fn the_example_builds_into_an_image_with_everything_the_guest_needs() {
    let built = build_example();
    let m = &built.manifest;

    // The manifest.
    assert_eq!(m.format, 1);
    assert_eq!(m.function_name, "hello");
    assert_eq!(m.runtime, host_runtime().to_string());
    assert_eq!(m.handler, "app.handler");
    assert!(
        m.python_version.starts_with(&host_runtime().version()),
        "{}",
        m.python_version
    );
    assert_eq!(m.distributions.runtime["awslambdaric"], "4.2.2");
    assert_eq!(m.distributions.runtime["snapshot-restore-py"], "1.0.0");
    assert_eq!(
        m.distributions.function.keys().collect::<Vec<_>>(),
        ["tabulate"]
    );
    let cached = thaw::guest_image::cached(&thaw::guest_image::default_cache_dir().unwrap())
        .expect("the build cached the kernel");
    assert_eq!(m.kernel.release, cached.release);
    assert_eq!(m.kernel.package, cached.package);
    m.verified_initramfs(&built.image).unwrap();

    // The archive's layout.
    let entries = cpio_entries(&built.archive);
    let site = guest_site_packages();
    for path in [
        "/init",
        "/etc/thaw/function.json",
        "/var/lang/bin/python3",
        "/var/task/app.py",
        "/var/task/requirements.txt",
        "/var/task/tabulate/__init__.py",
        &format!("{site}/awslambdaric/__init__.py"),
        &format!("{site}/snapshot_restore_py.py"),
        "/dev/console",
        "/tmp",
    ] {
        assert!(entries.contains_key(path), "{path} is missing");
    }
    // The host's own packages (pip, here) are not carried.
    let host_pip = format!("{site}/pip/__init__.py");
    assert!(!entries.contains_key(&host_pip), "{host_pip} was carried");
    assert!(
        !entries
            .keys()
            .any(|p| p.contains("__pycache__") || p.ends_with(".pyc")),
        "bytecode was carried"
    );
    // The runtime's packages are pip's, in the image's site-packages, never in /var/task.
    assert!(
        !entries
            .keys()
            .any(|p| p.starts_with("/var/task/awslambdaric"))
    );
    let load_list = format!("/lib/modules/{}/thaw-modules.load", m.kernel.release);
    assert!(entries.contains_key(&load_list), "{load_list} is missing");

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    unpack_cpio(&built.archive, root);
    assert_eq!(
        std::fs::read(root.join("init")).unwrap(),
        std::fs::read(static_thaw_init()).unwrap()
    );
    let function: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("etc/thaw/function.json")).unwrap())
            .unwrap();
    assert_eq!(
        function,
        serde_json::json!({
            "runtime": ["/var/lang/bin/python3", "-m", "awslambdaric", "app.handler"],
            "init_type": "snap-start",
            "function_name": "hello",
            "handler": "app.handler",
            "env": {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"},
        })
    );
    // Every module of the load list is in the archive, each listed once.
    let modules_dir = root.join(format!("lib/modules/{}", m.kernel.release));
    let list = std::fs::read_to_string(modules_dir.join("thaw-modules.load")).unwrap();
    let listed: Vec<&str> = list.lines().collect();
    assert!(
        listed
            .iter()
            .any(|l| l.contains("vmw_vsock_virtio_transport"))
    );
    assert_eq!(listed.iter().collect::<BTreeSet<_>>().len(), listed.len());
    for module in &listed {
        assert!(modules_dir.join(module).is_file(), "{module} is missing");
    }

    check_libraries(root);
    run_in_chroot(root);
    println!(
        "image: {} of {:.1} MiB, {:.1} MiB unpacked, {} entries",
        m.initramfs.file,
        m.initramfs.size as f64 / (1024.0 * 1024.0),
        built.archive.len() as f64 / (1024.0 * 1024.0),
        entries.len()
    );
}

/// Every `DT_NEEDED` of every ELF file in the unpacked tree is found where the guest's loader
/// looks: the object's `RUNPATH`/`RPATH` (with `$ORIGIN`), Lambda's `LD_LIBRARY_PATH` (which
/// thaw-init sets), and the system directories.
fn check_libraries(root: &Path) {
    const LD_LIBRARY_PATH: &[&str] = &[
        "/var/lang/lib",
        "/lib64",
        "/usr/lib64",
        "/var/runtime",
        "/var/runtime/lib",
        "/var/task",
        "/var/task/lib",
        "/opt/lib",
    ];
    let mut checked = 0;
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            if !meta.is_file() || !is_elf(&path) || path.starts_with(root.join("lib/modules")) {
                continue;
            }
            if path == root.join("init") {
                continue; // static
            }
            let deps = ElfDeps::read(&path).unwrap();
            let origin = Path::new("/").join(path.parent().unwrap().strip_prefix(root).unwrap());
            let own = if deps.runpath.is_empty() {
                &deps.rpath
            } else {
                &deps.runpath
            };
            for needed in &deps.needed {
                let found = own
                    .iter()
                    .map(|d| d.replace("$ORIGIN", &origin.to_string_lossy()))
                    .chain(LD_LIBRARY_PATH.iter().map(|d| (*d).to_owned()))
                    .chain(SYSTEM_DIRS.iter().map(|d| (*d).to_owned()))
                    .any(|d| {
                        let guest = Path::new(&d).join(needed);
                        root.join(guest.strip_prefix("/").unwrap()).exists()
                    });
                assert!(
                    found,
                    "{} needs {needed}, which the guest's loader would not find",
                    path.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 10, "only {checked} ELF files");
    println!("{checked} ELF files have all their libraries");
}

/// As root: the bundled interpreter, alone in the unpacked tree with the environment thaw-init
/// gives it, imports the runtime and the example, whose handler answers with its dependency.
fn run_in_chroot(root: &Path) {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED the chroot check: chroot needs root");
        return;
    }
    // awslambdaric puts the task root on sys.path the same way before importing the handler.
    let script = "import sys; sys.path.insert(0, '/var/task')\n\
                  import awslambdaric, snapshot_restore_py, ssl, json, app\n\
                  r = app.handler({'name': 'Thaw'}, type('C', (), {'aws_request_id': 'r1'})())\n\
                  print(json.dumps(r))";
    let out = Command::new("chroot")
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env(
            "LD_LIBRARY_PATH",
            "/var/lang/lib:/lib64:/usr/lib64:/var/runtime:/var/runtime/lib:/var/task:/var/task/lib:/opt/lib",
        )
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .arg(root)
        .args(["/var/lang/bin/python3", "-c", script])
        .current_dir("/")
        .output()
        .expect("run chroot");
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("app: init"), "{text}");
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned();
    let answer: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(answer["greeting"], "Hello, Thaw!");
    assert!(
        answer["dependency"].as_str().unwrap().contains("Thaw"),
        "{answer}"
    );
    assert_eq!(answer["restores"], 0);
    assert_eq!(answer["before_snapshot_ran"], false);
}

#[test]
fn replace_swaps_an_image_and_never_touches_anything_else() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    let out = function_build(&example(), &image, &["--handler", "app.handler"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let first = Manifest::read(&image).unwrap();
    assert_eq!(first.function_name, "python-function");

    // Without --replace: refused, the image untouched.
    let out = function_build(
        &example(),
        &image,
        &["--handler", "app.handler", "--name", "other"],
    );
    assert_refused(&out, "already exists");
    assert_eq!(Manifest::read(&image).unwrap(), first);

    // With it: replaced.
    let out = function_build(
        &example(),
        &image,
        &["--handler", "app.handler", "--name", "other", "--replace"],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(Manifest::read(&image).unwrap().function_name, "other");
    assert_eq!(names(&image), [MANIFEST_FILE, "initramfs.cpio.zst"]);

    // A directory that is not an image: refused, every file kept.
    let docs = dir.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    std::fs::write(docs.join("notes.txt"), "precious").unwrap();
    let out = function_build(
        &example(),
        &docs,
        &["--handler", "app.handler", "--replace"],
    );
    assert_refused(&out, "not a function image");
    assert_eq!(std::fs::read(docs.join("notes.txt")).unwrap(), b"precious");
    // An image someone put a file into: refused too.
    std::fs::write(image.join("mine.txt"), "precious").unwrap();
    let out = function_build(
        &example(),
        &image,
        &["--handler", "app.handler", "--replace"],
    );
    assert_refused(&out, "mine.txt");
    assert_eq!(std::fs::read(image.join("mine.txt")).unwrap(), b"precious");
    assert_eq!(names(dir.path()), ["docs", "image"], "no temporary left");
}

/// A code directory holding the example's app.py (and `extra` files), in a fresh parent.
fn code_dir(extra: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let code = dir.path().join("fn");
    std::fs::create_dir(&code).unwrap();
    std::fs::copy(example().join("app.py"), code.join("app.py")).unwrap();
    for (name, text) in extra {
        std::fs::write(code.join(name), text).unwrap();
    }
    (dir, code)
}

/// Runs a build expected to fail with `needle` and checks it left nothing beside the code.
fn refused_leaving_nothing(code: &Path, args: &[&str], needle: &str) {
    let parent = code.parent().unwrap();
    let out = function_build(code, &parent.join("image"), args);
    assert_refused(&out, needle);
    assert_eq!(
        names(parent),
        [code.file_name().unwrap().to_string_lossy().into_owned()],
        "the failed build left something behind"
    );
}

/// [`refused_leaving_nothing`] with `code_arg` as --code (`code` is the real directory).
fn refused_leaving_nothing_for(code_arg: &Path, code: &Path, needle: &str) {
    let parent = code.parent().unwrap();
    let out = function_build(
        code_arg,
        &parent.join("image"),
        &["--handler", "app.handler"],
    );
    assert_refused(&out, needle);
    assert_eq!(
        names(parent),
        ["fn"],
        "the failed build left something behind"
    );
}

#[test]
fn bad_inputs_are_refused_clearly_and_leave_no_image() {
    let (_dir, code) = code_dir(&[]);
    // The handler's module is not in the code.
    refused_leaving_nothing(
        &code,
        &["--handler", "missing.handler"],
        "module missing is not in the code directory",
    );
    refused_leaving_nothing(&code, &["--handler", "pkg.mod.handler"], "pkg/mod.py");
    // A reserved or malformed --env.
    refused_leaving_nothing(
        &code,
        &["--handler", "app.handler", "--env", "AWS_REGION=x"],
        "reserved by Lambda",
    );
    refused_leaving_nothing(
        &code,
        &["--handler", "app.handler", "--env", "NOVALUE"],
        "KEY=VALUE",
    );
    // A missing --requirements file.
    refused_leaving_nothing(
        &code,
        &[
            "--handler",
            "app.handler",
            "--requirements",
            "/nonexistent/req.txt",
        ],
        "no such file",
    );
    // A thaw-init that is not static.
    let runtime = host_runtime().to_string();
    let out = thaw_bin()
        .args([
            "function",
            "build",
            "--handler",
            "app.handler",
            "--runtime",
            &runtime,
        ])
        .arg("--code")
        .arg(&code)
        .arg("--out")
        .arg(code.parent().unwrap().join("image"))
        .args(["--thaw-init", "/bin/sh"])
        .output()
        .unwrap();
    assert_refused(&out, "dynamically linked");
    // No thaw-init at all: none given, none in $THAW_INIT, none beside thaw.
    let out = thaw_bin()
        .env_remove("THAW_INIT")
        .args([
            "function",
            "build",
            "--handler",
            "app.handler",
            "--runtime",
            &runtime,
        ])
        .arg("--code")
        .arg(&code)
        .arg("--out")
        .arg(code.parent().unwrap().join("image"))
        .output()
        .unwrap();
    assert_refused(&out, "scripts/build-thaw-init");
    // A Python this host does not have.
    let out = thaw_bin()
        .args(["function", "build", "--handler", "app.handler"])
        .args(["--runtime", "python3.99", "--code"])
        .arg(&code)
        .arg("--out")
        .arg(code.parent().unwrap().join("image"))
        .arg("--thaw-init")
        .arg(static_thaw_init())
        .output()
        .unwrap();
    assert_refused(&out, "needs the host's python3.99");
    assert_eq!(names(code.parent().unwrap()), ["fn"]);

    // --code that is a file, or missing.
    let file = code.join("app.py");
    refused_leaving_nothing_for(&file, &code, "not a directory");
    refused_leaving_nothing_for(&code.join("missing"), &code, "cannot read");
    // A symlink out of the code directory.
    std::os::unix::fs::symlink("/etc/passwd", code.join("leak")).unwrap();
    refused_leaving_nothing(
        &code,
        &["--handler", "app.handler"],
        "outside the code directory",
    );
    std::fs::remove_file(code.join("leak")).unwrap();
    // A --name Lambda would refuse.
    refused_leaving_nothing(
        &code,
        &["--handler", "app.handler", "--name", "no spaces"],
        "function name",
    );
}

#[test]
fn a_requirement_pip_cannot_install_leaves_no_image() {
    let (_dir, code) = code_dir(&[(
        "requirements.txt",
        "thaw-test-no-such-distribution-9f3c==1.0\n",
    )]);
    let parent = code.parent().unwrap().to_owned();
    let out = function_build(&code, &parent.join("image"), &["--handler", "app.handler"]);
    assert_refused(&out, "pip could not install the requirements");
    // The tail of pip's own output says which requirement.
    assert_refused(&out, "thaw-test-no-such-distribution-9f3c");
    assert_eq!(names(&parent), ["fn"]);
}

/// A fresh master key file.
fn write_key(path: &Path) {
    snapshot::MasterKey::load_or_create(path).expect("create a master key");
}

#[test]
fn snapshot_create_refuses_images_it_must_not_boot() {
    let built = build_example();
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("snap");
    let key = dir.path().join("key");
    let create = |image: &Path| {
        thaw_bin()
            .args(["snapshot", "create", "--function"])
            .arg(image)
            .arg("--out")
            .arg(&snapshot)
            .arg("--key-file")
            .arg(&key)
            .output()
            .unwrap()
    };
    write_key(&key);

    // Not an image.
    assert_refused(&create(dir.path()), "function-image.json");
    // An image built for another kernel release.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let file = &built.manifest.initramfs.file;
    std::fs::copy(built.image.join(file), other.join(file)).unwrap();
    let mut manifest = built.manifest.clone();
    manifest.kernel.release = "5.10.0-99-cloud-amd64".into();
    std::fs::write(other.join(MANIFEST_FILE), manifest.to_json()).unwrap();
    assert_refused(&create(&other), "built for kernel 5.10.0-99-cloud-amd64");
    // An initramfs changed after the build.
    std::fs::write(other.join(MANIFEST_FILE), built.manifest.to_json()).unwrap();
    let mut bytes = std::fs::read(other.join(file)).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(other.join(file), bytes).unwrap();
    assert_refused(
        &create(&other),
        "not the initramfs this image was built with",
    );
    assert!(!snapshot.exists(), "no snapshot may be written");
}

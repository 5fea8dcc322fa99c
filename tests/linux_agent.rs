//! `thaw-init` as a Linux guest's PID 1, serving AWS's own Python runtime client (`awslambdaric`
//! with `snapshot-restore-py`, from PyPI, unmodified) through the SnapStart scenario that
//! hooks-sdk's `python_awslambdaric.rs` runs in host-process mode: init, before-snapshot hooks
//! (reverse order), the restore, after-restore hooks (in order), three invocations, a handler
//! that raises, and an after-restore hook that raises.
//!
//! The initramfs is what `thaw function build` makes of the scenario's function module
//! (`thaw::function_image`): the static `thaw-init` as `/init`, the host's CPython with
//! `awslambdaric` and `snapshot-restore-py`, the module in `/var/task` and
//! `/etc/thaw/function.json`.
//!
//! - `python_bundle_runs_the_snapstart_scenario_in_a_chroot` (runs anywhere, as root): the
//!   archive's files, unpacked into a directory, with `thaw-init` as PID 1 of new PID, mount and
//!   network namespaces chrooted into it — the guest's code path (mounts, loopback, function
//!   file, RNG reseed, reboot), only the transport is a Unix socket instead of vsock. It proves
//!   the bundle is self-contained and the scenario passes with the files a guest gets.
//! - `linux_guest_runs_the_awslambdaric_snapstart_scenario`: Debian's cloud kernel boots that
//!   initramfs; the host drives the scenario over vsock and simulates a restore with the vsock
//!   transport reset, which the agent must notice to reconnect. It needs a KVM that boots Linux
//!   guests: on PVM it runs in the nested-KVM host (`fixture::nested`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

mod fixture;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fixture::awslambdaric::{
    APP, APP_FILE, FAIL_AFTER_ENV, FUNCTION_NAME, HANDLER, ScenarioHost, after_restore_hook_fails,
    restore_done_and_invocations, snapshot_and_restore,
};
use fixture::nested::Group;
use fixture::protocol_host::{Diagnostics, HostConn, STEP, accept_agent};
use fixture::{RunningVm, TestVm, debian_kernel};
use hooks_sdk::protocol::{InitType, Message};
use thaw::function_image::{BuiltImage, Manifest};
use thaw::guest_image::{DebianKernel, INIT_PATH, MODULES_LOAD_FILE};
use vmm_core::config::{DEFAULT_LINUX_CMDLINE, VsockConfig};
use vmm_core::{ExitReason, KernelSource, MachineConfig};

/// The function file `thaw-init` reads by default.
const FUNCTION_FILE: &str = "/etc/thaw/function.json";
/// Lambda's task root, where the function module goes.
const TASK_ROOT: &str = "/var/task";

/// The scenario's function as `thaw function build` makes it, and its archive, uncompressed.
struct FunctionImage {
    built: BuiltImage,
    archive: Vec<u8>,
    _dir: tempfile::TempDir,
}

/// Builds the scenario's function with the product: the fixture's `APP` as `app.py` in a code
/// directory, handler `app.handler`, named as the scenario expects. The image carries the
/// modules of Debian's kernel (the chroot has no use for them, but they cost little).
fn function_image() -> FunctionImage {
    let dir = tempfile::tempdir().unwrap();
    let code = dir.path().join("scenario");
    std::fs::create_dir(&code).unwrap();
    std::fs::write(code.join(APP_FILE), APP).unwrap();
    let mut spec = fixture::function_image::spec(&code, HANDLER, &dir.path().join("image"));
    spec.name = Some(FUNCTION_NAME.to_owned());
    let built = fixture::function_image::build(&spec);
    let archive =
        fixture::function_image::read_archive(&fixture::function_image::initramfs_path(&built));
    let m = &built.manifest;
    println!(
        "function image: CPython {} from {} with {:?}; {} files, {} shared libraries ({}), \
         {:.1} MiB unpacked, for kernel {}",
        m.python_version,
        built.python_executable.display(),
        m.distributions.runtime,
        built.files,
        built.libraries.len(),
        built
            .libraries
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(" "),
        archive.len() as f64 / (1024.0 * 1024.0),
        m.kernel.release
    );
    if !built.left_out.is_empty() {
        println!(
            "left out (a library they need is missing on this host too): {:?}",
            built.left_out
        );
    }
    FunctionImage {
        built,
        archive,
        _dir: dir,
    }
}

/// Checks that the archive holds what the guest needs, where `thaw-init` and the loader look.
fn check_archive(image: &FunctionImage) {
    let entries = fixture::function_image::cpio_entries(&image.archive);
    let app = format!("{TASK_ROOT}/{APP_FILE}");
    for path in [
        INIT_PATH,
        FUNCTION_FILE,
        "/var/lang/bin/python3",
        app.as_str(),
    ] {
        assert!(
            entries.contains_key(path),
            "{path} is missing from the archive"
        );
    }
    for guest in image.built.libraries.values() {
        assert!(entries.contains_key(guest), "{guest} is missing");
    }
    for name in ["awslambdaric/__init__.py", "snapshot_restore_py.py"] {
        let path = format!("{}/{name}", image.built.guest_site_packages);
        assert!(entries.contains_key(&path), "{path} is missing");
    }
    let version = &image.built.manifest.python_version;
    let minor = version
        .rsplit_once('.')
        .map_or(version.as_str(), |(v, _)| v);
    let stdlib = format!("/var/lang/lib/python{minor}");
    assert!(entries.contains_key(&format!("{stdlib}/os.py")));
    let load_list = format!(
        "/lib/modules/{}/{MODULES_LOAD_FILE}",
        image.built.manifest.kernel.release
    );
    assert!(entries.contains_key(&load_list), "{load_list} is missing");
    for skipped in ["test", "idlelib", "tkinter", "ensurepip", "__pycache__"] {
        let prefix = format!("{stdlib}/{skipped}/");
        assert!(
            !entries.keys().any(|p| p.starts_with(&prefix)),
            "{prefix} should be left out"
        );
    }
}

// ----- in a chroot, as PID 1 of new namespaces ------------------------------------------------

/// Where the host's socket and the function's event log are inside the tree (`/run` is not
/// mounted over by `thaw-init`, so the host sees both).
const CHROOT_RUN_DIR: &str = "/run/thaw";

/// The unpacked archive; removed when dropped, unless something is still mounted in it.
struct ChrootTree {
    dir: Option<tempfile::TempDir>,
}

impl ChrootTree {
    fn unpack(archive: &[u8]) -> ChrootTree {
        let dir = tempfile::tempdir().unwrap();
        fixture::function_image::unpack_cpio(archive, dir.path());
        std::fs::create_dir_all(dir.path().join(&CHROOT_RUN_DIR[1..])).unwrap();
        ChrootTree { dir: Some(dir) }
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }
}

impl Drop for ChrootTree {
    fn drop(&mut self) {
        // thaw-init mounts /proc, /sys, /dev... in its own mount namespace, with private
        // propagation; should any mount have reached this namespace, removing the tree would
        // descend into it (a devtmpfs is the host's /dev), so then the tree is left alone.
        let dir = self.dir.take().unwrap();
        let root = dir.path().to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let leaked: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&root))
            .collect();
        if leaked.is_empty() {
            drop(dir);
        } else {
            eprintln!("mounts left under {root}, not removing it: {leaked:?}");
            let _ = dir.keep();
        }
    }
}

/// `thaw-init` as PID 1 of new PID, mount, network, IPC and UTS namespaces, chrooted into the
/// tree, without `CAP_SYS_TIME` (so its wall-clock step fails instead of setting the host's
/// clock). It runs exactly as in a guest, except that it reaches the host through
/// `--agent-uds` instead of vsock.
struct ChrootAgent {
    child: Child,
    log: Arc<Mutex<String>>,
    /// The threads copying its stdout and stderr into `log`; done once it has exited.
    collectors: Vec<std::thread::JoinHandle<()>>,
    listener: UnixListener,
    events: PathBuf,
}

impl ChrootAgent {
    fn start(tree: &Path, extra_env: &[String]) -> ChrootAgent {
        let run_dir = tree.join(&CHROOT_RUN_DIR[1..]);
        let socket = run_dir.join("agent.sock");
        let events = run_dir.join("events.log");
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&events);
        let listener = UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        // Full paths: the environment is cleared below.
        let mut cmd = Command::new(host_program("unshare"));
        cmd.args([
            "--fork",
            "--kill-child",
            "--pid",
            "--mount",
            "--propagation",
            "private",
            "--net",
            "--ipc",
            "--uts",
            "--",
        ])
        .arg(host_program("setpriv"))
        .args(["--bounding-set", "-sys_time", "--"])
        .arg(host_program("chroot"))
        .arg(tree)
        .args([
            INIT_PATH,
            "--agent-uds",
            &format!("{CHROOT_RUN_DIR}/agent.sock"),
            "--env",
            &format!("THAW_TEST_LOG={CHROOT_RUN_DIR}/events.log"),
        ]);
        for e in extra_env {
            cmd.args(["--env", e]);
        }
        // The environment the kernel gives init, plus the log filter (a guest's comes from
        // `thaw.log=`); nothing of the test's (cargo's LD_LIBRARY_PATH would shadow Lambda's).
        cmd.env_clear()
            .env("HOME", "/")
            .env("TERM", "linux")
            .env("THAW_LOG", "info,hooks_sdk=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("cannot run unshare");
        let log = Arc::new(Mutex::new(String::new()));
        let collectors = vec![
            collect(child.stdout.take().unwrap(), "[chroot stdout]", log.clone()),
            collect(child.stderr.take().unwrap(), "[chroot]", log.clone()),
        ];
        ChrootAgent {
            child,
            log,
            collectors,
            listener,
            events,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends `Shutdown`, waits for the namespace's init to end, and returns how it ended with
    /// everything it logged (all of it: its output is read to the end).
    fn shutdown(mut self, mut conn: HostConn) -> (ExitStatus, String) {
        conn.send(&Message::Shutdown);
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                for collector in self.collectors.drain(..) {
                    collector.join().unwrap();
                }
                return (status, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "thaw-init did not end after Shutdown; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChrootAgent {
    fn drop(&mut self) {
        // `--kill-child`: the namespace's init, and with it everything in the namespace, dies
        // with unshare.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Diagnostics for ChrootAgent {
    fn diagnostics(&self) -> String {
        self.log()
    }
}

impl ScenarioHost for ChrootAgent {
    fn accept(&mut self, init_type: InitType) -> HostConn {
        accept_agent(&self.listener, init_type, STEP, &*self)
    }

    /// No VM: the "restore" closes the connection, and the agent reconnects.
    fn reset_channel(&mut self, conn: HostConn) {
        drop(conn);
    }

    fn output(&self) -> String {
        self.log()
    }

    /// The function appends to its log file before each step completes: exact order.
    fn events(&self, _at_least: usize) -> Vec<String> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The agent feeds this to the host kernel's RNG: real random bytes.
    fn entropy(&self) -> Vec<u8> {
        random_bytes(64)
    }
}

/// A program on the host's `PATH` (util-linux's `unshare` and `setpriv`, coreutils' `chroot`).
fn host_program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([
            "/usr/sbin".into(),
            "/usr/bin".into(),
            "/sbin".into(),
            "/bin".into(),
        ])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed (Debian: util-linux, coreutils)"))
}

fn collect(
    stream: impl Read + Send + 'static,
    prefix: &'static str,
    sink: Arc<Mutex<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            eprintln!("{prefix} {line}");
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    })
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .unwrap();
    bytes
}

/// Checks how the namespace's init ended: `thaw-init` restarts the machine, which in a PID
/// namespace kills its init with SIGHUP (a power-off would be SIGINT).
fn assert_rebooted(status: ExitStatus, log: &str) {
    assert_eq!(
        status.signal(),
        Some(libc::SIGHUP),
        "thaw-init should end the machine with a restart (SIGHUP in a PID namespace); status \
         {status}; log:\n{log}"
    );
}

/// What every run of the guest code path must have logged.
fn assert_guest_steps(log: &str, clock_can_be_set: bool) {
    assert!(
        !log.contains("cannot bring up the loopback interface"),
        "log:\n{log}"
    );
    assert!(log.contains("kernel RNG reseeded"), "log:\n{log}");
    let clock = if clock_can_be_set {
        "wall clock set"
    } else {
        "setting the wall clock failed"
    };
    assert!(log.contains(clock), "no {clock:?} in the log:\n{log}");
}

#[test]
fn python_bundle_runs_the_snapstart_scenario_in_a_chroot() {
    const TEST: &str = "python_bundle_runs_the_snapstart_scenario_in_a_chroot";
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED {TEST}: chroot and new namespaces need root");
        return;
    }
    let started = Instant::now();
    let image = function_image();
    check_archive(&image);
    let tree = ChrootTree::unpack(&image.archive);
    println!(
        "archive of {:.1} MiB built and unpacked in {:?}",
        image.archive.len() as f64 / (1024.0 * 1024.0),
        started.elapsed()
    );

    // The whole scenario, then Shutdown.
    let mut agent = ChrootAgent::start(tree.path(), &[]);
    let mut conn = snapshot_and_restore(&mut agent);
    restore_done_and_invocations(&agent, &mut conn);
    let (status, log) = agent.shutdown(conn);
    assert_guest_steps(&log, false);
    assert_rebooted(status, &log);

    // An after-restore hook that raises.
    let fail = vec![format!("{FAIL_AFTER_ENV}=1")];
    let mut agent = ChrootAgent::start(tree.path(), &fail);
    let mut conn = snapshot_and_restore(&mut agent);
    after_restore_hook_fails(&agent, &mut conn);
    let (status, log) = agent.shutdown(conn);
    assert_rebooted(status, &log);
    println!("{TEST}: both scenarios passed in {:?}", started.elapsed());
}

// ----- in a Linux guest -----------------------------------------------------------------------

/// How long the guest may take to boot and connect (on hardware KVM: a few seconds).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// A booted guest and the host's listener on `<uds>_9000`.
struct GuestAgent {
    vm: RunningVm,
    listener: UnixListener,
    connected: bool,
    _dir: tempfile::TempDir,
}

impl GuestAgent {
    fn boot(kernel: &DebianKernel, initrd: &Path, extra_cmdline: &str) -> GuestAgent {
        let dir = tempfile::tempdir().unwrap();
        let uds_path = dir.path().join("v.sock");
        let listener = UnixListener::bind(format!(
            "{}_{}",
            uds_path.display(),
            hooks_sdk::protocol::AGENT_PORT
        ))
        .unwrap();
        listener.set_nonblocking(true).unwrap();
        let config = MachineConfig {
            mem_mib: 1024,
            vcpus: 1,
            kernel: KernelSource::Path(kernel.bzimage.clone()),
            initrd: Some(initrd.to_owned()),
            cmdline: format!(
                "{DEFAULT_LINUX_CMDLINE} thaw.log=info,hooks_sdk=debug {extra_cmdline}"
            ),
            vsock: Some(VsockConfig {
                guest_cid: 3,
                uds_path,
            }),
            disks: Vec::new(),
        };
        let vm = TestVm::new(config)
            .timeout(Duration::from_secs(240))
            .start();
        GuestAgent {
            vm,
            listener,
            connected: false,
            _dir: dir,
        }
    }

    /// Sends `Shutdown` and waits for the VM to end.
    fn shutdown(self, mut conn: HostConn) -> fixture::VmRun {
        conn.send(&Message::Shutdown);
        self.vm.wait(STEP)
    }
}

impl Diagnostics for GuestAgent {
    fn diagnostics(&self) -> String {
        format!("{}\n{}", self.vm.console(), self.vm.status())
    }
}

impl ScenarioHost for GuestAgent {
    fn accept(&mut self, init_type: InitType) -> HostConn {
        let timeout = if self.connected { STEP } else { BOOT_TIMEOUT };
        let conn = accept_agent(&self.listener, init_type, timeout, &*self);
        self.connected = true;
        conn
    }

    /// What a restore does: the vsock device resets its transport, which closes every host
    /// connection and sends the guest VIRTIO_VSOCK_EVENT_TRANSPORT_RESET; the agent reconnects.
    fn reset_channel(&mut self, conn: HostConn) {
        self.vm.vsock().lock().unwrap().reset_vsock_transport();
        drop(conn);
    }

    fn output(&self) -> String {
        self.vm.console()
    }

    fn entropy(&self) -> Vec<u8> {
        random_bytes(64)
    }
}

const GUEST_TEST: &str = "linux_guest_runs_the_awslambdaric_snapstart_scenario";

/// The Linux test of this binary: booting needs a KVM that runs guest kernels.
static LINUX: Group = Group::new(&[GUEST_TEST], prepare);

/// Builds the scenario's image on the host, where the target directory keeps it for the nested
/// host; names it (and the static thaw-init) in the environment.
fn prepare() -> Vec<(String, String)> {
    let image = function_image();
    check_archive(&image);
    let kept = Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux-agent-scenario");
    let _ = std::fs::remove_dir_all(&kept);
    copy_dir(&image.built.dir, &kept);
    vec![
        (
            "THAW_INIT".into(),
            fixture::static_thaw_init().display().to_string(),
        ),
        (
            "THAW_TEST_SCENARIO_IMAGE".into(),
            kept.display().to_string(),
        ),
    ]
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn linux_guest_runs_the_awslambdaric_snapstart_scenario() {
    if !LINUX.runs_here(GUEST_TEST) {
        return;
    }
    let kernel = debian_kernel();
    // The image prepared on the host, or (on hardware KVM) one built here.
    let (dir, _built) = match std::env::var_os("THAW_TEST_SCENARIO_IMAGE") {
        Some(dir) => (PathBuf::from(dir), None),
        None => {
            let image = function_image();
            check_archive(&image);
            (image.built.dir.clone(), Some(image))
        }
    };
    let manifest = Manifest::read(&dir).unwrap();
    assert_eq!(manifest.kernel.release, kernel.release);
    // Compressed by `thaw function build` as the kernel prefers (zstd when it unpacks it).
    let initrd = manifest.verified_initramfs(&dir).unwrap();

    // The whole scenario, then Shutdown: thaw-init restarts the machine, which with reboot=k
    // is an i8042 reset, which ends the VM.
    let mut guest = GuestAgent::boot(&kernel, &initrd, "");
    let mut conn = snapshot_and_restore(&mut guest);
    restore_done_and_invocations(&guest, &mut conn);
    let run = guest.shutdown(conn);
    assert_guest_steps(&run.output, true);
    assert_eq!(run.reason, ExitReason::Reset, "console:\n{}", run.output);
    assert!(!run.timed_out, "console:\n{}", run.output);

    // An after-restore hook that raises: the same initramfs, the flag on the command line.
    let mut guest = GuestAgent::boot(&kernel, &initrd, &format!("thaw.env.{FAIL_AFTER_ENV}=1"));
    let mut conn = snapshot_and_restore(&mut guest);
    after_restore_hook_fails(&guest, &mut conn);
    let run = guest.shutdown(conn);
    assert_eq!(run.reason, ExitReason::Reset, "console:\n{}", run.output);
}

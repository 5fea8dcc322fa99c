//! The jailed worker, as Firecracker's jailer sets up its VMM: before it reads any request, a
//! worker started with a jail (thawd's default when it runs as root) moves into its own mount,
//! PID, IPC, UTS and network namespaces, into a root of its own with only what it needs, as an
//! unprivileged user with no capabilities and no way to gain any, under rlimits and a syscall
//! filter (`seccomp`), and, where cgroup v2 is available, in a cgroup of its own with
//! `memory.max` and `cpu.max`.
//!
//! The root is a private tmpfs mounted over the jail directory in the worker's own mount
//! namespace (so every worker has its own, and it vanishes with the worker) holding:
//! `/dev/kvm` and `/dev/userfaultfd` (device nodes owned by the worker's uid), `/snapshot` (an
//! empty directory: the function's snapshot and working-set files are opened before the
//! worker drops root, since they are root's with mode 0600, and found by their places there),
//! `/key` (a copy of the function's master key, readable by the worker's uid only), `/proc` (of
//! its own PID namespace, for its peak memory) and `/tmp` (its sockets). Nothing else of the
//! host is reachable: the old root is unmounted after `pivot_root`.
//!
//! A new PID namespace applies to children, so the worker forks once: the child (PID 1 of the
//! namespace) becomes the jailed worker; the parent, outside, only waits for it, removes its
//! cgroup, and ends the same way (exit code or signal), so thawd sees a jailed worker's death
//! (say, `SIGSYS`) as it would an unjailed one's. Killing the parent kills the child
//! (`PR_SET_PDEATHSIG`).

use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::CloneFlags;
use nix::sys::stat::{Mode, SFlag, mknod};
use nix::unistd::{Gid, Uid, chown};

/// Where a jailed worker finds its function's snapshot directory.
pub const SNAPSHOT_IN_JAIL: &str = "/snapshot";
/// Where a jailed worker finds its function's master key.
pub const KEY_IN_JAIL: &str = "/key";
/// The devices a worker opens, by their host paths (the same paths inside).
const DEVICES: [&str; 2] = ["/dev/kvm", "/dev/userfaultfd"];
/// Descriptors a jailed worker may hold: vCPUs, memory, its sockets, the snapshot's files.
const MAX_FILES: u64 = 1024;

/// How one worker is jailed (given to `thawd worker` as [`JailArgs`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailSpec {
    /// An existing directory the worker mounts its private root over.
    pub root: PathBuf,
    /// The unprivileged user the worker runs as.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// The function's snapshot directory on the host (its files appear in `/snapshot`).
    pub snapshot: PathBuf,
    /// The function's master key file on the host (copied to `/key`).
    pub key_file: Option<PathBuf>,
    /// The worker's cgroup v2 directory, created for it (and removed after it).
    pub cgroup: Option<PathBuf>,
    /// Its `memory.max`, bytes (with `cgroup`).
    pub memory_max: Option<u64>,
    /// Its `cpu.max` quota per 100 ms period, µs (with `cgroup`).
    pub cpu_max: Option<u64>,
}

/// `thawd worker`'s jail arguments: none (not jailed), or at least the root, the ids and the
/// snapshot.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct JailArgs {
    /// An existing directory the worker mounts its private root over.
    #[arg(long = "jail-root", value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// The unprivileged user the worker runs as.
    #[arg(long = "jail-uid", value_name = "UID")]
    pub uid: Option<u32>,
    /// Its group.
    #[arg(long = "jail-gid", value_name = "GID")]
    pub gid: Option<u32>,
    /// The function's snapshot directory on the host.
    #[arg(long = "jail-snapshot", value_name = "DIR")]
    pub snapshot: Option<PathBuf>,
    /// The function's master key file on the host.
    #[arg(long = "jail-key", value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// The worker's cgroup v2 directory.
    #[arg(long = "jail-cgroup", value_name = "DIR")]
    pub cgroup: Option<PathBuf>,
    /// Its `memory.max`, bytes.
    #[arg(long = "jail-memory-max", value_name = "BYTES")]
    pub memory_max: Option<u64>,
    /// Its `cpu.max` quota per 100 ms period, µs.
    #[arg(long = "jail-cpu-max", value_name = "MICROSECONDS")]
    pub cpu_max: Option<u64>,
}

impl JailArgs {
    /// The jail these arguments ask for; an error names what a partial jail lacks (a worker
    /// is never started unjailed by mistake).
    pub fn spec(self) -> Result<Option<JailSpec>, String> {
        let given = self.root.is_some()
            || self.uid.is_some()
            || self.gid.is_some()
            || self.snapshot.is_some()
            || self.key_file.is_some()
            || self.cgroup.is_some();
        if !given {
            return Ok(None);
        }
        let missing = |what: &str| format!("a jail needs --jail-{what}");
        if self.cgroup.is_some() && (self.memory_max.is_none() || self.cpu_max.is_none()) {
            return Err("--jail-cgroup needs --jail-memory-max and --jail-cpu-max".into());
        }
        Ok(Some(JailSpec {
            root: self.root.ok_or_else(|| missing("root"))?,
            uid: self.uid.ok_or_else(|| missing("uid"))?,
            gid: self.gid.ok_or_else(|| missing("gid"))?,
            snapshot: self.snapshot.ok_or_else(|| missing("snapshot"))?,
            key_file: self.key_file,
            cgroup: self.cgroup,
            memory_max: self.memory_max,
            cpu_max: self.cpu_max,
        }))
    }
}

impl JailSpec {
    /// The arguments that give this spec to `thawd worker`.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--jail-root".into(),
            self.root.clone().into(),
            "--jail-uid".into(),
            self.uid.to_string().into(),
            "--jail-gid".into(),
            self.gid.to_string().into(),
            "--jail-snapshot".into(),
            self.snapshot.clone().into(),
        ];
        if let Some(key) = &self.key_file {
            args.extend(["--jail-key".into(), key.clone().into()]);
        }
        if let (Some(cgroup), Some(memory), Some(cpu)) =
            (&self.cgroup, self.memory_max, self.cpu_max)
        {
            args.extend([
                "--jail-cgroup".into(),
                cgroup.clone().into(),
                "--jail-memory-max".into(),
                memory.to_string().into(),
                "--jail-cpu-max".into(),
                cpu.to_string().into(),
            ]);
        }
        args
    }
}

/// A step of the jail's set-up failed: the worker exits before it serves anything.
#[derive(Debug, thiserror::Error)]
#[error("cannot jail the worker: {step}")]
pub struct JailError {
    /// What was being done.
    pub step: String,
    /// Why it failed.
    #[source]
    pub source: std::io::Error,
}

fn failed(step: impl Into<String>) -> impl FnOnce(nix::Error) -> JailError {
    let step = step.into();
    move |errno| JailError {
        step,
        source: errno.into(),
    }
}

fn failed_io(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let step = step.into();
    move |source| JailError { step, source }
}

/// The cgroup v2 hierarchy, if this host mounts it at `/sys/fs/cgroup` (not the v1 or hybrid
/// layout).
pub fn cgroup2_root() -> Option<PathBuf> {
    let root = PathBuf::from("/sys/fs/cgroup");
    root.join("cgroup.controllers").exists().then_some(root)
}

/// Prepares `parent` (below a cgroup v2 root) to hold workers' cgroups: creates it and enables
/// the memory and cpu controllers for its children.
pub fn prepare_cgroup_parent(root: &Path, parent: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(parent)?;
    let mut dir = root.to_path_buf();
    for part in parent.strip_prefix(root).unwrap_or(parent).components() {
        std::fs::write(dir.join("cgroup.subtree_control"), "+memory +cpu")?;
        dir.push(part);
    }
    std::fs::write(parent.join("cgroup.subtree_control"), "+memory +cpu")
}

/// Creates the worker's cgroup with its limits and moves this process into it.
fn enter_cgroup(dir: &Path, memory_max: u64, cpu_max: u64) -> std::io::Result<()> {
    std::fs::create_dir(dir)?;
    std::fs::write(dir.join("memory.max"), memory_max.to_string())?;
    std::fs::write(dir.join("memory.swap.max"), "0").or_else(|e| {
        // Without swap accounting the file is absent: nothing to limit.
        if e.kind() == std::io::ErrorKind::NotFound {
            Ok(())
        } else {
            Err(e)
        }
    })?;
    std::fs::write(dir.join("cpu.max"), format!("{cpu_max} 100000"))?;
    // "0": the writing process, whatever its pid is in this PID namespace.
    std::fs::write(dir.join("cgroup.procs"), "0")
}

/// Jails this process as `spec` says. Returns in the jailed child; the parent waits for it and
/// exits the same way, never returning. Call it while the process has one thread (before the
/// runtime, the host-facts helper or anything else starts one).
pub fn enter(spec: &JailSpec) -> Result<(), JailError> {
    // What the host looks like must be read before it is out of sight.
    let _ = vmm_core::kvm::flavor();
    let key = match &spec.key_file {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(failed_io(format!("read the key file {}", path.display())))?,
        ),
        None => None,
    };
    nix::sched::unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET,
    )
    .map_err(failed("unshare the namespaces"))?;
    // SAFETY: the process has a single thread (the caller's contract), so the child starts
    // with no lock held by a thread that does not exist in it.
    match unsafe { nix::unistd::fork() }.map_err(failed("fork into the PID namespace"))? {
        nix::unistd::ForkResult::Parent { child } => wait_and_mirror(child, spec.cgroup.as_deref()),
        nix::unistd::ForkResult::Child => {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(failed("tie the worker to its parent"))?;
            // The child alone goes into the cgroup, so the parent can remove it afterwards.
            if let (Some(dir), Some(memory), Some(cpu)) =
                (&spec.cgroup, spec.memory_max, spec.cpu_max)
            {
                enter_cgroup(dir, memory, cpu)
                    .map_err(failed_io(format!("set up the cgroup {}", dir.display())))?;
            }
            build_root(spec, key.as_deref())?;
            drop_privileges(spec)
        }
    }
}

/// The parent's whole life after the fork: wait for the jailed worker, remove its cgroup, and
/// end as it ended.
fn wait_and_mirror(child: nix::unistd::Pid, cgroup: Option<&Path>) -> ! {
    use nix::sys::wait::{WaitStatus, waitpid};
    // The parent serves nothing: the worker's pipes and channel are the child's alone, so the
    // daemon sees them close when the child goes.
    for fd in [0, 1, 3] {
        // SAFETY: closing descriptors this process no longer uses; nothing else owns them.
        unsafe { libc::close(fd) };
    }
    let status = loop {
        match waitpid(child, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    if let Some(dir) = cgroup {
        let _ = std::fs::remove_dir(dir);
    }
    match status {
        Ok(WaitStatus::Exited(_, code)) => std::process::exit(code),
        Ok(WaitStatus::Signaled(_, signal, _)) => {
            // Die of the same signal, so the daemon reads the same status.
            let _ = nix::sys::prctl::set_dumpable(false);
            // SAFETY: restoring a signal's default action; no handler of ours is replaced.
            let _ =
                unsafe { nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigDfl) };
            let _ = nix::sys::signal::raise(signal);
            std::process::exit(128 + signal as i32)
        }
        _ => std::process::exit(1),
    }
}

/// Mounts the private root over `spec.root`, fills it, and pivots into it.
fn build_root(spec: &JailSpec, key: Option<&[u8]>) -> Result<(), JailError> {
    let none: Option<&str> = None;
    // Nothing mounted here may reach the host's mount namespace.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(failed("make the mounts private"))?;
    let root = &spec.root;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755,size=8m"),
    )
    .map_err(failed(format!(
        "mount the jail's root on {}",
        root.display()
    )))?;
    let (uid, gid) = (Uid::from_raw(spec.uid), Gid::from_raw(spec.gid));
    let dir = |path: &str, mode: u32, owned: bool| -> Result<(), JailError> {
        let at = root.join(path);
        std::fs::create_dir(&at).map_err(failed_io(format!("create {path}")))?;
        std::fs::set_permissions(&at, std::fs::Permissions::from_mode(mode))
            .map_err(failed_io(format!("set the mode of {path}")))?;
        if owned {
            chown(&at, Some(uid), Some(gid)).map_err(failed(format!("chown {path}")))?;
        }
        Ok(())
    };
    dir("dev", 0o755, false)?;
    for device in DEVICES {
        let Ok(meta) = std::fs::metadata(device) else {
            continue; // a host without /dev/userfaultfd: the worker falls back (and is killed)
        };
        let inside = root.join(device.trim_start_matches('/'));
        mknod(
            &inside,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            meta.rdev(),
        )
        .map_err(failed(format!("create {device}")))?;
        chown(&inside, Some(uid), Some(gid)).map_err(failed(format!("chown {device}")))?;
    }
    // The snapshot's files are opened now, while they may be (root's, mode 0600), and found
    // by their places inside; nothing else of the snapshot's directory is visible.
    dir("snapshot", 0o755, false)?;
    for name in [snapshot::SNAPSHOT_FILE, snapshot::WORKING_SET_FILE] {
        let file = match snapshot::open_regular(&spec.snapshot.join(name)) {
            Ok(file) => Some(file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(failed_io(format!("open the snapshot's {name}"))(e)),
        };
        snapshot::provide_opened(&Path::new(SNAPSHOT_IN_JAIL).join(name), file);
    }
    if let Some(key) = key {
        let at = root.join("key");
        std::fs::write(&at, key).map_err(failed_io("write the key"))?;
        std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o400))
            .map_err(failed_io("set the key's mode"))?;
        chown(&at, Some(uid), Some(gid)).map_err(failed("chown the key"))?;
    }
    dir("tmp", 0o700, true)?;
    dir("proc", 0o555, false)?;
    mount(
        Some("proc"),
        &root.join("proc"),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        none,
    )
    .map_err(failed("mount /proc"))?;
    // The old root goes on top of the new one and is detached: nothing of it is reachable.
    std::env::set_current_dir(root).map_err(failed_io("enter the jail's root"))?;
    nix::unistd::pivot_root(".", ".").map_err(failed("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(failed("detach the old root"))?;
    std::env::set_current_dir("/").map_err(failed_io("chdir /"))?;
    nix::unistd::sethostname("thaw-worker").map_err(failed("set the hostname"))?;
    // Its sockets go to its own /tmp.
    // SAFETY: the process has a single thread, so no one reads the environment concurrently.
    unsafe { std::env::set_var("TMPDIR", "/tmp") };
    Ok(())
}

/// Becomes `spec`'s user with no capabilities, no way to gain any, and bounded resources.
fn drop_privileges(spec: &JailSpec) -> Result<(), JailError> {
    use nix::sys::resource::{Resource, setrlimit};
    setrlimit(Resource::RLIMIT_NOFILE, MAX_FILES, MAX_FILES).map_err(failed("limit open files"))?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(failed("forbid core dumps"))?;
    // No capability can come back: the bounding set is emptied while CAP_SETPCAP is held.
    for cap in 0..=last_capability() {
        // SAFETY: a prctl on this process's own capability bounding set.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            return Err(JailError {
                step: format!("drop capability {cap} from the bounding set"),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    nix::unistd::setgroups(&[]).map_err(failed("clear the supplementary groups"))?;
    let (uid, gid) = (Uid::from_raw(spec.uid), Gid::from_raw(spec.gid));
    nix::unistd::setresgid(gid, gid, gid).map_err(failed("set the group"))?;
    // Leaving uid 0 for another with all three ids clears the permitted, effective and
    // ambient capabilities.
    nix::unistd::setresuid(uid, uid, uid).map_err(failed("set the user"))?;
    // SAFETY: a prctl on this process's own flag.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(JailError {
            step: "set no_new_privs".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // Not dumpable: no process of its uid may ptrace it or read its memory through /proc.
    nix::sys::prctl::set_dumpable(false).map_err(failed("make the worker undumpable"))?;
    Ok(())
}

/// The highest capability number this kernel knows.
fn last_capability() -> libc::c_ulong {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(40)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Worker {
        #[command(flatten)]
        jail: JailArgs,
    }

    fn parse<I: IntoIterator<Item = T>, T: Into<OsString> + Clone>(
        args: I,
    ) -> Result<Option<JailSpec>, String> {
        Worker::try_parse_from(args)
            .map_err(|e| e.to_string())?
            .jail
            .spec()
    }

    #[test]
    fn a_spec_goes_to_the_worker_as_arguments_and_comes_back_whole() {
        let spec = JailSpec {
            root: "/run/thawd/jail".into(),
            uid: 990,
            gid: 991,
            snapshot: "/srv/snap dir".into(),
            key_file: Some("/etc/thawd/k".into()),
            cgroup: Some("/sys/fs/cgroup/thawd-workers/f-1".into()),
            memory_max: Some(224 << 20),
            cpu_max: Some(7_235),
        };
        let mut args: Vec<OsString> = vec!["worker".into()];
        args.extend(spec.to_args());
        assert_eq!(parse(&args).unwrap(), Some(spec.clone()));
        let plain = JailSpec {
            key_file: None,
            cgroup: None,
            memory_max: None,
            cpu_max: None,
            ..spec
        };
        let mut args: Vec<OsString> = vec!["worker".into()];
        args.extend(plain.to_args());
        assert_eq!(parse(&args).unwrap(), Some(plain));
        assert_eq!(parse(["worker"]).unwrap(), None);
        // A half-given jail is refused, not run unjailed.
        let error = parse(["worker", "--jail-uid", "5"]).unwrap_err();
        assert!(error.contains("--jail-root"), "{error}");
        let error = parse(["worker", "--jail-cgroup", "/c"]).unwrap_err();
        assert!(error.contains("--jail-memory-max"), "{error}");
    }
}

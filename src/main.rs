//! `thaw`: boot microVMs on KVM and (with later commands) snapshot and restore them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use thaw::commands::run::RunOptions;

/// Guest memory when `--mem-mib` is not given (Lambda's smallest size).
const DEFAULT_MEM_MIB: u64 = 128;

/// Thaw: SnapStart-style snapshot and restore for KVM microVMs.
#[derive(Parser)]
#[command(name = "thaw", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel, or the built-in test guest, with its serial console on this terminal.
    ///
    /// Without --kernel, boots Thaw's test guest: it prints a banner from CPL3, starts every
    /// vCPU and exits. With --kernel, boots an ELF vmlinux or a bzImage the way Firecracker does
    /// (64-bit entry, zero page in rsi). The command exits with the guest's exit status: the
    /// value written to the debug-exit port 0x501, 0 when the guest resets or powers off, 125
    /// when a vCPU triple-faults and 126 when a vCPU fails.
    Run {
        #[command(flatten)]
        boot: BootArgs,
        /// Serve a control API on this Unix socket (HTTP, shaped like Firecracker's):
        /// `PATCH /vm {"state": "Paused"|"Resumed"}`, `PUT /snapshot/create {"snapshot_path":
        /// DIR}` (VM paused first), `PUT /actions {"action_type": "Stop"}`, `GET /`. See
        /// docs/api.md. The path must not exist; it is removed on exit.
        #[arg(long, value_name = "PATH")]
        api_sock: Option<PathBuf>,
        /// Master key for snapshots made through --api-sock (see `thaw snapshot create --help`)
        /// [default: the host key, created on first use].
        #[arg(
            long,
            value_name = "FILE",
            requires = "api_sock",
            conflicts_with = "insecure_plaintext"
        )]
        key_file: Option<PathBuf>,
        /// Snapshots made through --api-sock are neither encrypted nor authenticated. FOR
        /// BENCHMARKING ONLY.
        #[arg(long, requires = "api_sock")]
        insecure_plaintext: bool,
        /// A virtio-block disk, repeatable (the guest sees them in order: vda, vdb, ...):
        /// `path=FILE` (whole 512-byte sectors, used in place), `read-only` (the guest is told
        /// and cannot write), `id=NAME` (its serial, at most 20 printable characters). A machine
        /// with disks cannot be snapshotted yet.
        #[arg(long = "disk", value_name = "path=FILE[,read-only][,id=NAME]", value_parser = parse_disk)]
        disks: Vec<vmm_core::config::DiskConfig>,
    },
    /// Invoke a function served by thawd (AWS Lambda's Invoke API) and print its answer.
    ///
    /// The response payload goes to stdout. A function error (X-Amz-Function-Error) prints the
    /// error document and exits 1; an API error (unknown function, throttled, too large) prints
    /// Lambda's error type and message and exits 1.
    Invoke(InvokeCliArgs),
    /// Restore a snapshot and continue its guest.
    ///
    /// The snapshot is authenticated (header, state, manifest) and checked against this host
    /// (CPU vendor and features, KVM flavor, page size) before any guest instruction runs.
    /// Memory comes back lazily by default: guest memory starts empty, registered with
    /// userfaultfd, and each chunk is decrypted, authenticated and installed when the guest first
    /// touches it. What this host saw the guest need before its agent's Hello on earlier
    /// restores (its startup set, learned as it restores) is installed while the VM is rebuilt,
    /// before the guest runs; the snapshot's recorded working set (`thaw snapshot record-ws`)
    /// is installed next, and the rest in the background once the first burst of faults is
    /// over. With --memory eager, all of memory is decrypted on all cores before the guest
    /// runs.
    ///
    /// A guest with an agent (a vsock device) is then driven as Lambda would: its agent
    /// reconnects over the reset vsock transport, gets fresh entropy, the wall clock and a new
    /// restore id, and runs its after-restore hooks within --after-restore-timeout. Each
    /// --invoke then sends one invocation and prints its response on stdout (the guest's
    /// console goes to stderr), and the guest is shut down; without --invoke the guest keeps
    /// running. With --vsock-uds, Thaw leaves the agent to whatever listens on that socket.
    /// Exits with the guest's status, as `thaw run` does.
    Restore {
        /// The snapshot directory (none with --store).
        #[arg(required_unless_present = "store", conflicts_with = "store")]
        dir: Option<PathBuf>,
        /// Restore a snapshot from this S3-compatible store (s3://BUCKET[/PREFIX], as
        /// `thaw snapshot push` wrote it) instead of a directory: its manifest is fetched and
        /// authenticated first, then each chunk's object as the guest first touches it, and
        /// the recorded working set's ahead of it, many at once. Each is authenticated as it is
        /// installed (--chunk-check is on-install) and memory the guest never touches is never
        /// fetched (no background fill). Endpoint and credentials as for `thaw snapshot push`.
        #[arg(long, value_name = "URL", value_parser = parse_store_url, requires = "snapshot_id")]
        store: Option<store::StoreUrl>,
        /// With --store: the snapshot's id.
        #[arg(long, value_name = "ID", value_parser = parse_snapshot_id, requires = "store")]
        snapshot_id: Option<snapshot::SnapshotId>,
        /// With --store: this host's cache of chunk objects, kept sealed as the store holds
        /// them, shared by every snapshot and kept across runs [default: $THAW_CACHE_DIR, else
        /// $XDG_CACHE_HOME/thaw, else ~/.cache/thaw; then chunks/].
        #[arg(long, value_name = "DIR", requires = "store")]
        chunk_cache: Option<PathBuf>,
        /// With --store: the chunk cache's budget in MiB; the least recently used objects are
        /// evicted beyond it. 0: no cache.
        #[arg(long, value_name = "MIB", default_value_t = 4096)]
        chunk_cache_mib: u64,
        /// Master key file [default: the host key, if there is one].
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// How guest memory comes back: lazy (on first touch, through userfaultfd) or eager
        /// (all of it before the guest runs).
        #[arg(long, value_name = "MODE", default_value = "lazy")]
        memory: restore_daemon::restore::MemoryMode,
        /// Lazy only: when memory chunks are authenticated. upfront: all of them (read and
        /// decrypted, not decompressed) before the guest runs, so a tampered snapshot is refused
        /// first; once: as upfront, but skipped when this host already did so for this very
        /// file and it has not changed since (recorded under $XDG_STATE_HOME/thaw/verified,
        /// keyed with the snapshot's key; any write to the file, even one put back, means a
        /// full pass again); on-install: each only as it is installed (a tampered chunk then
        /// stops the guest mid-run; for snapshots verified beforehand). Every mode also
        /// authenticates each chunk as it is installed.
        #[arg(long, value_name = "WHEN", default_value = "once")]
        chunk_check: restore_daemon::restore::ChunkCheck,
        /// Lazy only: do not fill the rest of memory in the background; only what the guest
        /// touches is installed.
        #[arg(long)]
        no_prefetch: bool,
        /// Lazy only: ignore the snapshot's recorded working set.
        #[arg(long)]
        no_working_set: bool,
        /// Lazy only: neither install first nor learn the chunks this host saw the guest need
        /// before its agent's Hello (its startup set, kept per snapshot under
        /// $XDG_STATE_HOME/thaw/startup; a hint, never trusted: every chunk is still
        /// authenticated as it is installed).
        #[arg(long)]
        no_startup_set: bool,
        /// Host socket for the guest's vsock device; the agent is then yours to drive (see
        /// docs/guest-protocol.md).
        #[arg(long, value_name = "PATH", value_parser = parse_vsock_uds, conflicts_with_all = ["invoke", "after_restore_timeout"])]
        vsock_uds: Option<PathBuf>,
        /// Invoke the restored function with PAYLOAD (repeatable) and print each response.
        #[arg(long, value_name = "PAYLOAD")]
        invoke: Vec<String>,
        /// Seconds the after-restore hooks may take (Lambda allows 10).
        #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
        after_restore_timeout: Option<u64>,
        /// Serve the control API (pause, resume, snapshot, stop; see `thaw run --help` and
        /// docs/api.md) for the restored machine on this Unix socket. Snapshots made through it
        /// are sealed with --key-file, else the host key.
        #[arg(long, value_name = "PATH")]
        api_sock: Option<PathBuf>,
    },
    /// Create, inspect and verify snapshots.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Build function images: a Python handler, its requirements and a runtime, ready for
    /// `thaw snapshot create --function`.
    Function {
        #[command(subcommand)]
        command: FunctionCommand,
    },
    /// Fetch and cache Debian's cloud kernel (linux-image-cloud-amd64) with apt.
    Kernel {
        #[command(subcommand)]
        command: KernelCommand,
    },
    /// Build initramfs archives for Linux guests.
    Initramfs {
        #[command(subcommand)]
        command: InitramfsCommand,
    },
    /// Run commands in a nested-KVM host: for hosts whose KVM cannot boot Linux guests at speed.
    ///
    /// On a host whose KVM is PVM (see `thaw host-check`), guest kernel code is emulated one
    /// instruction at a time, so Linux guests barely boot. The nested host is a QEMU machine
    /// under software emulation (TCG) with an AMD CPU offering SVM and nested paging, running
    /// Debian's cloud kernel with kvm_amd: a /dev/kvm that behaves like hardware KVM. It sees
    /// this host's whole file system (through virtiofs), so `thaw nested-host run -- CMD` runs
    /// CMD there as root, in the current directory, with this environment and a TMPDIR of its
    /// own.
    /// QEMU, busybox and the kernel come from Debian's packages with apt (unpacked into the
    /// cache, not installed). Slow: everything in it is emulated; times measured there are
    /// functional, not performance figures. Needs root. See docs/nested-host.md.
    NestedHost {
        #[command(subcommand)]
        command: NestedHostCommand,
    },
    /// Report what this host offers Thaw: KVM (hardware or PVM), userfaultfd, and what that
    /// means for running guests here. Exits non-zero if KVM is unusable.
    HostCheck {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// What to boot: shared by `thaw run` and `thaw snapshot create`.
#[derive(Args, Clone, Debug)]
struct BootArgs {
    /// Kernel image: ELF vmlinux or bzImage. Omit to boot the built-in test guest.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs (cpio, optionally compressed) loaded at the top of low memory.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line [default for --kernel: "console=ttyS0 reboot=k panic=1 pci=off";
    /// for the test guest: empty for `run`, "thaw.agent=1 thaw.init=snap-start" (its agent)
    /// for `snapshot create`].
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Guest memory in MiB (128 to 10240, as AWS Lambda allows) [default: 128; 512 for
    /// `snapshot create --function`, whose initramfs lives in guest memory].
    #[arg(long, value_name = "N", value_parser = parse_mem_mib)]
    mem_mib: Option<u64>,
    /// Number of vCPUs (1 to this host's online CPUs).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_vcpus)]
    vcpus: u8,
    /// Add a virtio-vsock device whose host side is this Unix socket (Firecracker's hybrid
    /// vsock `uds_path`). A guest connection to host CID 2, port P is forwarded to the Unix
    /// socket PATH_P, which a host program must be listening on. A host program reaches guest
    /// port P by connecting to PATH and writing "CONNECT P\n"; it reads "OK <host_port>\n"
    /// once the guest accepted, or sees the socket closed if the guest refused. PATH must not
    /// exist (Thaw creates it and removes it on exit) and must be at most 96 bytes long.
    #[arg(long, value_name = "PATH", value_parser = parse_vsock_uds)]
    vsock_uds: Option<PathBuf>,
    /// The guest's vsock context id (3 to 4294967294).
    #[arg(long, value_name = "N", default_value_t = vmm_core::config::DEFAULT_GUEST_CID,
          requires = "vsock_uds", value_parser = parse_vsock_cid)]
    vsock_cid: u32,
}

impl BootArgs {
    fn into_run_options(self) -> RunOptions {
        RunOptions {
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline: self.cmdline,
            mem_mib: self.mem_mib.unwrap_or(DEFAULT_MEM_MIB),
            vcpus: self.vcpus,
            vsock: self
                .vsock_uds
                .map(|uds_path| vmm_core::config::VsockConfig {
                    guest_cid: self.vsock_cid,
                    uds_path,
                }),
            disks: Vec::new(),
        }
    }
}

#[derive(Args)]
struct InvokeCliArgs {
    /// The function's name.
    function: String,
    /// The event (JSON, or any bytes); empty if omitted.
    payload: Option<String>,
    /// Read the event from this file instead.
    #[arg(long, value_name = "FILE", conflicts_with = "payload")]
    payload_file: Option<PathBuf>,
    /// thawd's address.
    #[arg(
        long,
        value_name = "URL",
        env = "THAWD_ENDPOINT",
        default_value = "http://127.0.0.1:9001"
    )]
    endpoint: String,
    /// RequestResponse waits for the answer; Event queues it (202); DryRun only checks.
    #[arg(long, value_enum, default_value = "request-response")]
    invocation_type: thaw::commands::invoke::InvocationType,
    /// Print the last 4 KB of the invocation's log (START, output, END, REPORT) on stderr.
    #[arg(long)]
    tail: bool,
    /// Give up after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 960,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    timeout: u64,
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Boot a guest, wait until its runtime is ready, and write a snapshot of the whole VM.
    ///
    /// Ready means, by default, that the guest's agent (thaw-init, or the test guest with
    /// thaw.agent=1 thaw.init=snap-start) reports its runtime finished init and ran its
    /// before-checkpoint hooks: with thaw-init, the runtime is waiting in
    /// GET /runtime/restore/next. A vsock device is added for the agent if --vsock-uds is not
    /// given. With --ready-on-serial STR, ready means the guest printed STR on its console.
    ///
    /// Then every vCPU is paused and its state captured on its own thread, with the VM's and
    /// devices' state, and memory is written in zero-elided, zstd-compressed chunks sealed with
    /// AES-256-GCM under a fresh data key, itself wrapped by the master key (--key-file, else
    /// the host key, created 0600 on first use). The snapshot directory appears atomically:
    /// complete, or not at all. If init fails, times out, or a before-checkpoint hook fails,
    /// nothing is written and the error carries the runtime's message.
    ///
    /// With --function IMAGE_DIR (made by `thaw function build`), boots that function image on
    /// the Debian cloud kernel it was built for (from the kernel cache, fetched with apt if
    /// missing; an image built for another kernel release is refused), with the default Linux
    /// command line plus `quiet` (the console is the function's log) and 512 MiB of memory
    /// unless --cmdline or --mem-mib say otherwise.
    Create {
        #[command(flatten)]
        boot: BootArgs,
        /// Boot this function image (a directory written by `thaw function build`) on the kernel
        /// its manifest names, instead of --kernel and --initrd.
        #[arg(long, value_name = "IMAGE_DIR", conflicts_with_all = ["kernel", "initrd"])]
        function: Option<PathBuf>,
        /// Kernel cache directory for --function (see `thaw kernel fetch`).
        #[arg(long, value_name = "DIR", requires = "function")]
        cache_dir: Option<PathBuf>,
        /// The snapshot directory to create.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace an existing snapshot at --out (atomically: the old one stays until the new
        /// one is complete).
        #[arg(long)]
        replace: bool,
        /// Take the snapshot when the guest prints this text on its serial console, instead of
        /// waiting for the agent.
        #[arg(long, value_name = "STR", value_parser = parse_marker)]
        ready_on_serial: Option<String>,
        /// Seconds the guest's init may take before giving up (AWS Lambda allows 130).
        #[arg(long, value_name = "SECS", default_value_t = 130, value_parser = parse_seconds)]
        init_timeout: u64,
        /// Master key file (32 random bytes; see `thaw snapshot create --help`) [default:
        /// $THAW_KEY_FILE, else $XDG_CONFIG_HOME/thaw/host.key, else ~/.config/thaw/host.key,
        /// created on first use]. A file named here must exist.
        #[arg(long, value_name = "FILE", conflicts_with = "insecure_plaintext")]
        key_file: Option<PathBuf>,
        /// Do not encrypt or authenticate the snapshot. FOR BENCHMARKING ONLY: anyone who can
        /// read the file reads the guest's memory, and anyone who can write it controls the
        /// guest that is restored from it.
        #[arg(long)]
        insecure_plaintext: bool,
    },
    /// Show what a snapshot holds: format version, host fingerprint, vCPUs, memory size,
    /// stored bytes, zero-page share, compression ratio and chunks. The header, state and
    /// manifest are authenticated first (chunks are not read; see `verify`).
    Inspect {
        /// The snapshot directory.
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Master key file [default: the host key, if there is one].
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
    },
    /// Check a whole snapshot without starting a VM: the header, state and manifest are
    /// authenticated, then every chunk is decrypted, authenticated, decompressed and checked
    /// against its hash. Exits non-zero with the first problem found.
    Verify {
        /// The snapshot directory.
        dir: PathBuf,
        /// Master key file [default: the host key, if there is one].
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
    },
    /// Record the memory a function needs until it answers, so later restores fetch it first.
    ///
    /// Restores the snapshot once, lazily and without prefetching, while the page server notes
    /// the order in which the guest first touches each chunk of memory — while its agent
    /// reconnects, its after-restore hooks run, and it answers one invocation with --payload.
    /// That order (the working set, after REAP, ASPLOS'21) is stored beside the snapshot,
    /// sealed with the snapshot's key and bound to it, replacing any earlier one. Later lazy
    /// restores install it first, in that order, while the guest runs.
    RecordWs {
        /// The snapshot directory.
        dir: PathBuf,
        /// Master key file [default: the host key, if there is one].
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// The invocation's payload: what a typical request looks like.
        #[arg(long, value_name = "PAYLOAD", default_value = "{}")]
        payload: String,
        /// Seconds the invocation may take.
        #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = parse_seconds)]
        timeout: u64,
    },
    /// Copy a snapshot to an S3-compatible object store (AWS S3, MinIO, Ceph RGW, Garage).
    ///
    /// Each chunk of memory becomes one object named by a hash of its contents keyed with the
    /// master key, sealed with AES-256-GCM under a key the master key derives: identical
    /// chunks are stored once per master key (snapshots of functions on one runtime share most
    /// of theirs), and the store reads nothing. Objects it already holds are not uploaded
    /// again. Then one sealed manifest names them (s3://BUCKET/PREFIX/snapshots/ID/manifest).
    /// Every chunk is authenticated as it is read. The endpoint, region and credentials come
    /// from the environment as AWS's tools take them (AWS_ENDPOINT_URL, AWS_REGION,
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN); they are never logged.
    /// docs/store.md has the object layout.
    Push {
        /// The snapshot directory.
        dir: PathBuf,
        /// Where the store keeps snapshots: s3://BUCKET[/PREFIX].
        #[arg(value_parser = parse_store_url)]
        url: store::StoreUrl,
        /// Master key file [default: the host key].
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
    },
    /// Copy a snapshot from an S3-compatible object store into a new snapshot directory.
    ///
    /// Fetches the snapshot's sealed manifest, then every chunk object it names, many at once;
    /// each object must authenticate under the master key and hash to its name before the
    /// snapshot is written (atomically, with the same snapshot id), so a store that altered,
    /// cut or swapped an object leaves nothing behind. Endpoint and credentials as for `push`.
    Pull {
        /// Where the store keeps snapshots: s3://BUCKET[/PREFIX].
        #[arg(value_parser = parse_store_url)]
        url: store::StoreUrl,
        /// The snapshot's id (32 hex digits, as `push` and `inspect` print it).
        #[arg(value_parser = parse_snapshot_id)]
        id: snapshot::SnapshotId,
        /// The snapshot directory to create.
        dir: PathBuf,
        /// Master key file [default: the host key].
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// This host's cache of chunk objects (as for `thaw restore --store`): objects it
        /// holds are not fetched, and fetched ones are kept [default: $THAW_CACHE_DIR, else
        /// $XDG_CACHE_HOME/thaw, else ~/.cache/thaw; then chunks/].
        #[arg(long, value_name = "DIR")]
        chunk_cache: Option<PathBuf>,
        /// The chunk cache's budget in MiB; the least recently used objects are evicted beyond
        /// it. 0: no cache.
        #[arg(long, value_name = "MIB", default_value_t = 4096)]
        chunk_cache_mib: u64,
    },
}

/// The host's chunk cache and its budget in bytes, as `--chunk-cache` and `--chunk-cache-mib`
/// choose it; `None` for a budget of 0.
fn chunk_cache_choice(dir: Option<PathBuf>, mib: u64) -> anyhow::Result<Option<(PathBuf, u64)>> {
    Ok(match mib {
        0 => None,
        mib => Some((
            match dir {
                Some(dir) => dir,
                None => cache_dir_or_default(None)?.join("chunks"),
            },
            mib.saturating_mul(1 << 20),
        )),
    })
}

fn parse_store_url(s: &str) -> Result<store::StoreUrl, String> {
    s.parse().map_err(|e: store::StoreError| e.to_string())
}

fn parse_snapshot_id(s: &str) -> Result<snapshot::SnapshotId, String> {
    s.parse()
        .map_err(|e: snapshot::BadSnapshotId| e.to_string())
}

/// The master key a store's objects are sealed with: `--key-file`, else the host key. Unlike
/// `create`, nothing is made: a new key could open none of the store's objects.
fn store_key(key_file: Option<&Path>) -> anyhow::Result<snapshot::MasterKey> {
    snapshot::host_key::for_opening(key_file)?
        .into_master()
        .context(thaw::commands::restore::NO_STORE_KEY)
}

fn parse_marker(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("the marker must not be empty".into());
    }
    Ok(s.to_string())
}

fn parse_seconds(s: &str) -> Result<u64, String> {
    let secs: u64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number of seconds: {e}"))?;
    if !(1..=3600).contains(&secs) {
        return Err(format!("{secs} s is out of range (1 to 3600)"));
    }
    Ok(secs)
}

#[derive(Subcommand)]
enum FunctionCommand {
    /// Build a function image from a Python handler: the code, its requirements, the host's
    /// CPython and AWS's runtime interface client in an initramfs with thaw-init as /init.
    ///
    /// In the guest, /init is the static thaw-init, the runtime is the host's python3.X (with
    /// its standard library and the shared libraries it loads) relocated to /var/lang, with
    /// awslambdaric and snapshot-restore-py installed from PyPI into its site-packages; the
    /// code directory and its requirements (installed with the runtime's own pip, as `pip
    /// install -t .` does) are in /var/task, and /etc/thaw/function.json tells thaw-init to run
    /// `/var/lang/bin/python3 -m awslambdaric HANDLER` initialized for SnapStart. Debian's
    /// cloud kernel (fetched with apt if not cached) provides the virtio and vsock modules.
    ///
    /// IMAGE_DIR then holds initramfs.cpio.zst (or .gz) and function-image.json, the manifest
    /// (function, runtime, handler, Python version, distributions, kernel release, the
    /// initramfs's size and SHA-256); boot it with `thaw snapshot create --function IMAGE_DIR`.
    /// The directory appears atomically: any failure (a missing module, a requirement pip
    /// cannot install, code over Lambda's 250 MB) leaves nothing. See docs/functions.md.
    Build {
        /// The function's code directory. Every file goes to /var/task, except __pycache__,
        /// *.pyc and .git; symlinks must point inside it. At most 250 MB with the requirements.
        #[arg(long, value_name = "DIR")]
        code: PathBuf,
        /// The handler: MODULE.FUNCTION, the module dotted for packages (pkg.mod.handler is
        /// `handler` in pkg/mod.py). The module must be in --code.
        #[arg(long, value_name = "MODULE.FUNCTION")]
        handler: thaw::function_image::Handler,
        /// python3.X, for X a CPython minor version installed on this host: the image copies
        /// the python3.X found on PATH, and its pip installs the packages. Other Lambda
        /// runtimes (nodejs, java, ruby...) are not supported yet.
        #[arg(long, value_name = "python3.X")]
        runtime: thaw::function_image::Runtime,
        /// The image directory to create. Its parent must exist.
        #[arg(long, value_name = "IMAGE_DIR")]
        out: PathBuf,
        /// The function's name (1 to 64 letters, digits, - or _) [default: the code
        /// directory's name].
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// A pip requirements file, installed from PyPI into /var/task [default:
        /// DIR/requirements.txt if there is one].
        #[arg(long, value_name = "FILE")]
        requirements: Option<PathBuf>,
        /// A variable of the function's environment; repeatable. Lambda's reserved names
        /// (AWS_REGION, AWS_LAMBDA_*, _HANDLER, LAMBDA_TASK_ROOT...) are refused: thaw-init
        /// sets them.
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// The static thaw-init for /init [default: $THAW_INIT, else thaw-init beside the thaw
        /// executable]. `scripts/build-thaw-init` builds one and prints its path.
        #[arg(long, value_name = "PATH")]
        thaw_init: Option<PathBuf>,
        /// Replace IMAGE_DIR if it is a function image (and holds nothing else); any other
        /// existing path is never touched.
        #[arg(long)]
        replace: bool,
        /// Kernel cache directory (see `thaw kernel fetch`).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KernelCommand {
    /// Resolve linux-image-cloud-amd64 with apt, download and unpack it into the cache (once
    /// per version), and print where its bzImage and modules are. Runs `apt-get update` first
    /// if the package lists are missing and this runs as root.
    Fetch {
        /// Cache directory [default: $THAW_CACHE_DIR, else $XDG_CACHE_HOME/thaw, else
        /// ~/.cache/thaw].
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum NestedHostCommand {
    /// Fetch what the nested host needs (QEMU and its libraries, busybox, the kernel) into the
    /// cache, and say where it is.
    Fetch {
        /// Cache directory [default: $THAW_CACHE_DIR, else $XDG_CACHE_HOME/thaw, else
        /// ~/.cache/thaw].
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Run COMMAND in a new nested host and exit with its status. Its output is the nested
    /// host's console, on stdout.
    Run {
        /// The nested host's memory in MiB (its /tmp is RAM too).
        #[arg(long, value_name = "N", default_value_t = thaw::nested_host::DEFAULT_MEM_MIB,
              value_parser = clap::value_parser!(u64).range(512..=65536))]
        mem_mib: u64,
        /// Its vCPUs [default: this host's CPUs, at least 2].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=64))]
        cpus: Option<u8>,
        /// Stop it after this many seconds.
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
        timeout: Option<u64>,
        /// Cache directory (see `thaw nested-host fetch`).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, value_name = "COMMAND")]
        command: Vec<std::ffi::OsString>,
    },
}

#[derive(Subcommand)]
enum InitramfsCommand {
    /// Write a cpio (newc) archive with /dev/console, the usual mount points, an /init, extra
    /// files and kernel modules, compressed with zstd (default), gzip or nothing.
    Build {
        /// Where to write the archive (atomically).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Program to run as PID 1 (/init in the archive).
        #[arg(long, value_name = "HOST_PATH")]
        init: Option<PathBuf>,
        /// Extra file: HOST:GUEST[:MODE], MODE in octal (default: the host file's mode).
        #[arg(long = "file", value_name = "HOST:GUEST[:MODE]", value_parser = parse_file_spec)]
        files: Vec<thaw::guest_image::FileSpec>,
        /// Add the kernel modules a Thaw guest needs (virtio, virtio_ring, virtio_mmio, vsock,
        /// vmw_vsock_virtio_transport_common, vmw_vsock_virtio_transport) and their
        /// dependencies, from Debian's cloud kernel (fetched with apt if not cached).
        #[arg(long)]
        guest_modules: bool,
        /// Add another kernel module (and its dependencies) by name; repeatable.
        #[arg(long = "module", value_name = "NAME")]
        modules: Vec<String>,
        /// Compression: zstd, gzip or none.
        #[arg(long, value_name = "KIND", default_value = "zstd")]
        compress: thaw::guest_image::Compression,
        /// Kernel cache directory (see `thaw kernel fetch`).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
}

fn parse_file_spec(s: &str) -> Result<thaw::guest_image::FileSpec, String> {
    thaw::guest_image::parse_file_spec(s).map_err(|e| e.to_string())
}

fn parse_disk(s: &str) -> Result<vmm_core::config::DiskConfig, String> {
    let mut path = None;
    let mut read_only = false;
    let mut id = String::new();
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("path", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
            Some(("id", i)) => id = i.to_string(),
            None if part == "read-only" || part == "ro" => read_only = true,
            _ => {
                return Err(format!(
                    "{part:?} is not a disk option: give path=FILE, read-only or id=NAME"
                ));
            }
        }
    }
    let path = path.ok_or_else(|| format!("{s:?} has no path=FILE"))?;
    let disk = vmm_core::config::DiskConfig {
        path,
        read_only,
        id,
    };
    disk.validate().map_err(|e| e.to_string())?;
    Ok(disk)
}

fn parse_mem_mib(s: &str) -> Result<u64, String> {
    let mib: u64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    vmm_core::config::validate_mem_mib(mib).map_err(|e| e.to_string())
}

fn parse_vcpus(s: &str) -> Result<u8, String> {
    let n: u64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    vmm_core::config::validate_vcpus(n).map_err(|e| e.to_string())
}

fn parse_vsock_uds(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    vmm_core::config::validate_vsock_uds_path(&path).map_err(|e| e.to_string())?;
    Ok(path)
}

fn parse_vsock_cid(s: &str) -> Result<u32, String> {
    let cid: u32 = s.parse().map_err(|e| format!("{s:?} is not a CID: {e}"))?;
    let config = vmm_core::config::VsockConfig {
        guest_cid: cid,
        uds_path: PathBuf::from("vsock.sock"),
    };
    config.validate().map_err(|e| e.to_string())?;
    Ok(cid)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("THAW_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match execute(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("thaw: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn fetch_kernel(cache_dir: Option<PathBuf>) -> anyhow::Result<thaw::guest_image::DebianKernel> {
    let cache_dir = match cache_dir {
        Some(dir) => dir,
        None => thaw::guest_image::default_cache_dir()?,
    };
    thaw::guest_image::fetch(&cache_dir).context("cannot fetch Debian's cloud kernel")
}

fn cache_dir_or_default(cache_dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(match cache_dir {
        Some(dir) => dir,
        None => thaw::guest_image::default_cache_dir()?,
    })
}

fn nested_host_command(command: NestedHostCommand) -> anyhow::Result<ExitCode> {
    use thaw::nested_host::{NestedHost, RunOptions};
    match command {
        NestedHostCommand::Fetch { cache_dir } => {
            let host = NestedHost::prepare(&cache_dir_or_default(cache_dir)?)?;
            let packages = host.packages();
            let qemu = packages.version_of("qemu-system-x86").unwrap_or("?");
            println!("qemu:        {} ({qemu})", packages.qemu().display());
            println!("virtiofsd:   {}", packages.virtiofsd().display());
            println!("busybox:     {}", packages.busybox().display());
            println!(
                "kernel:      {} ({})",
                host.kernel().bzimage.display(),
                host.kernel().release
            );
            Ok(ExitCode::SUCCESS)
        }
        NestedHostCommand::Run {
            mem_mib,
            cpus,
            timeout,
            cache_dir,
            command,
        } => {
            if thaw::nested_host::inside() {
                anyhow::bail!("this already runs inside a nested host; run the command directly");
            }
            let host = NestedHost::prepare(&cache_dir_or_default(cache_dir)?)?;
            let mut options = RunOptions::new(command);
            options.mem_mib = mem_mib;
            if let Some(cpus) = cpus {
                options.cpus = cpus;
            }
            options.timeout = timeout.map(std::time::Duration::from_secs);
            let exit = host.run(&options, &mut std::io::stdout())?;
            eprintln!(
                "thaw: the command exited with status {} in the nested host after {:.1?}",
                exit.code, exit.elapsed
            );
            Ok(ExitCode::from(exit.code.clamp(0, 255) as u8))
        }
    }
}

fn execute(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::NestedHost { command } => nested_host_command(command),
        Command::Run {
            boot,
            api_sock,
            key_file,
            insecure_plaintext,
            disks,
        } => {
            let options = thaw::commands::run::RunOptions {
                disks,
                ..boot.into_run_options()
            };
            let api = match api_sock {
                Some(path) => Some(thaw::commands::run::ApiOptions {
                    path,
                    sealing: sealing(key_file.as_deref(), insecure_plaintext)?,
                }),
                None => None,
            };
            let reason = thaw::commands::run::run(&options, api).context("cannot run the guest")?;
            match reason.exit_code() {
                0 => tracing::info!(%reason, "guest finished"),
                _ => eprintln!("thaw: {reason}"),
            }
            Ok(ExitCode::from(reason.exit_code().clamp(0, 255) as u8))
        }
        Command::Snapshot { command } => snapshot_command(command),
        Command::Restore {
            dir,
            store,
            snapshot_id,
            chunk_cache,
            chunk_cache_mib,
            key_file,
            memory,
            chunk_check,
            no_prefetch,
            no_working_set,
            no_startup_set,
            vsock_uds,
            invoke,
            after_restore_timeout,
            api_sock,
        } => {
            let key = snapshot::host_key::for_opening(key_file.as_deref())?;
            let api = match api_sock {
                Some(path) => Some(thaw::commands::restore::RestoreApi {
                    path,
                    sealing: sealing(key_file.as_deref(), false)?,
                }),
                None => None,
            };
            let options = restore_daemon::restore::RestoreOptions {
                memory,
                chunk_check,
                verified_records: None,
                prefetch: !no_prefetch,
                use_working_set: !no_working_set,
                record_working_set: false,
                vsock_uds,
                baseline_memory_file: None,
                shells: None,
                shared_copy: None,
                expected_snapshot: None,
                startup_sets: if no_startup_set {
                    None
                } else {
                    restore_daemon::startup_set::StartupSets::default_location()
                },
            };
            let from = match (dir, store, snapshot_id) {
                (Some(dir), _, _) => thaw::commands::restore::RestoreFrom::Dir(dir),
                (None, Some(url), Some(id)) => {
                    let cache = chunk_cache_choice(chunk_cache, chunk_cache_mib)?;
                    thaw::commands::restore::RestoreFrom::Store { url, id, cache }
                }
                // clap requires a directory, or --store and --snapshot-id.
                _ => anyhow::bail!("give a snapshot directory, or --store and --snapshot-id"),
            };
            thaw::commands::restore::run(
                &from,
                &key,
                options,
                thaw::commands::restore::AgentUse {
                    invoke,
                    after_restore_timeout: after_restore_timeout
                        .map(std::time::Duration::from_secs),
                },
                api,
            )
        }
        Command::Function {
            command:
                FunctionCommand::Build {
                    code,
                    handler,
                    runtime,
                    out,
                    name,
                    requirements,
                    env,
                    thaw_init,
                    replace,
                    cache_dir,
                },
        } => {
            let spec = thaw::function_image::FunctionSpec {
                code,
                handler,
                runtime,
                out,
                name,
                requirements,
                env,
                thaw_init,
                replace,
                cache_dir,
            };
            let built = thaw::function_image::build(&spec, &mut |step| eprintln!("thaw: {step}"))
                .context("no function image was written")?;
            report_function_image(&built);
            Ok(ExitCode::SUCCESS)
        }
        Command::Kernel {
            command: KernelCommand::Fetch { cache_dir },
        } => {
            let kernel = fetch_kernel(cache_dir)?;
            println!("package:     {} {}", kernel.package, kernel.package_version);
            println!("release:     {}", kernel.release);
            println!("bzImage:     {}", kernel.bzimage.display());
            println!("modules:     {}", kernel.modules_dir.display());
            if let Some(config) = &kernel.config {
                println!("config:      {}", config.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Initramfs {
            command:
                InitramfsCommand::Build {
                    out,
                    init,
                    files,
                    guest_modules,
                    modules,
                    compress,
                    cache_dir,
                },
        } => {
            use thaw::guest_image::{GUEST_MODULES, INIT_PATH, InitramfsBuilder};
            let mut builder = InitramfsBuilder::new();
            builder.add_base_layout()?;
            if let Some(init) = init {
                builder.add_file_from_host(&init, INIT_PATH, 0o755)?;
            }
            for spec in &files {
                builder.add_file_spec(spec)?;
            }
            let mut names: Vec<&str> = modules.iter().map(String::as_str).collect();
            if guest_modules {
                names.extend_from_slice(GUEST_MODULES);
            }
            if !names.is_empty() {
                let kernel = fetch_kernel(cache_dir)?;
                let added = builder.add_kernel_modules(&kernel, &names)?;
                eprintln!(
                    "added {} modules from {} ({} built in)",
                    added.modules.len(),
                    added.release,
                    added.builtin.len()
                );
            }
            builder.write_to(&out, compress)?;
            println!("{}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Invoke(a) => {
            let payload = match (&a.payload_file, a.payload) {
                (Some(path), _) => std::fs::read(path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
                (None, Some(p)) => p.into_bytes(),
                (None, None) => Vec::new(),
            };
            let args = thaw::commands::invoke::InvokeArgs {
                endpoint: a.endpoint,
                function: a.function,
                payload,
                invocation_type: a.invocation_type,
                tail: a.tail,
                timeout: std::time::Duration::from_secs(a.timeout),
            };
            Ok(ExitCode::from(thaw::commands::invoke::run(&args)?))
        }
        Command::HostCheck { json } => {
            let report = thaw::host_check::check();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(if report.usable() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn snapshot_command(command: SnapshotCommand) -> anyhow::Result<ExitCode> {
    use thaw::commands::snapshot_create::{self, CreateOptions, Readiness};
    match command {
        SnapshotCommand::Create {
            boot,
            function,
            cache_dir,
            out,
            replace,
            ready_on_serial,
            init_timeout,
            key_file,
            insecure_plaintext,
        } => {
            let sealing = sealing(key_file.as_deref(), insecure_plaintext)?;
            let mem_given = boot.mem_mib.is_some();
            let mut run_options = boot.into_run_options();
            if let Some(image) = function {
                let cache_dir = match cache_dir {
                    Some(dir) => dir,
                    None => thaw::guest_image::default_cache_dir()?,
                };
                let boot =
                    thaw::function_image::boot::prepare(&image, &cache_dir).with_context(|| {
                        format!("cannot boot the function image {}", image.display())
                    })?;
                let m = &boot.manifest;
                eprintln!(
                    "thaw: booting function {} ({} {}) on kernel {}",
                    m.function_name, m.runtime, m.handler, boot.kernel.release
                );
                run_options.kernel = Some(boot.kernel.bzimage);
                run_options.initrd = Some(boot.initrd);
                if !mem_given {
                    run_options.mem_mib = thaw::function_image::DEFAULT_MEM_MIB;
                }
                if run_options.cmdline.is_none() {
                    run_options.cmdline = Some(thaw::function_image::boot::default_cmdline());
                }
            }
            let options = CreateOptions {
                boot: run_options,
                out,
                replace,
                ready: ready_on_serial.map_or(Readiness::Agent, Readiness::Serial),
                init_timeout: std::time::Duration::from_secs(init_timeout),
                sealing,
            };
            let created = snapshot_create::create(options, Box::new(std::io::stdout()))
                .context("no snapshot was written")?;
            let s = &created.summary;
            // Lambda logs this line at the end of a SnapStart function's init phase.
            eprintln!(
                "INIT_REPORT Init Duration: {:.2} ms\tPhase: init\tStatus: success",
                created.init.as_secs_f64() * 1e3
            );
            eprintln!(
                "thaw: snapshot {} written to {}: {} MiB of memory in {} bytes ({} zero pages); \
                 init {:.1?}, capture {:.1?}, write {:.1?}",
                s.snapshot_id,
                s.path.display(),
                s.memory_bytes >> 20,
                s.file_bytes,
                s.zero_pages,
                created.init,
                created.capture,
                s.elapsed
            );
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCommand::Inspect {
            dir,
            json,
            key_file,
        } => {
            let key = snapshot::host_key::for_opening(key_file.as_deref())?;
            let snap = restore_daemon::verify::open(&dir, &key)?;
            let info = snap.info();
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("{info}");
            }
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCommand::RecordWs {
            dir,
            key_file,
            payload,
            timeout,
        } => {
            let key = snapshot::host_key::for_opening(key_file.as_deref())?;
            let recorded = thaw::commands::snapshot_record_ws::record(
                &dir,
                &key,
                payload.as_bytes(),
                std::time::Duration::from_secs(timeout),
                Box::new(std::io::stderr()),
            )?;
            println!(
                "working set of {} recorded: {} of {} chunks ({} MiB), first answer after {:.1?} \
                 while recording",
                dir.display(),
                recorded.working_set.chunks.len(),
                recorded.chunks,
                recorded.bytes >> 20,
                recorded.first_answer
            );
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCommand::Push { dir, url, key_file } => {
            let key = store_key(key_file.as_deref())?;
            let store = store::Store::connect(&url, &store::StoreOptions::default())?;
            let pushed = store
                .push(&dir, &key)
                .with_context(|| format!("pushing {} to {url}", dir.display()))?;
            println!(
                "snapshot {} pushed to {url}: {} chunks, {} with data in {} objects, {} new \
                 ({:.1} MiB){}",
                pushed.snapshot_id,
                pushed.chunks,
                pushed.data_chunks,
                pushed.objects,
                pushed.uploaded,
                pushed.uploaded_bytes as f64 / (1024.0 * 1024.0),
                if pushed.manifest_uploaded {
                    ""
                } else {
                    "; the store had it already"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCommand::Pull {
            url,
            id,
            dir,
            key_file,
            chunk_cache,
            chunk_cache_mib,
        } => {
            let key = store_key(key_file.as_deref())?;
            let cache = match chunk_cache_choice(chunk_cache, chunk_cache_mib)? {
                Some((dir, budget)) => {
                    Some(std::sync::Arc::new(store::ObjectCache::open(&dir, budget)?))
                }
                None => None,
            };
            let store = store::Store::connect(&url, &store::StoreOptions::default())?;
            let pulled = store
                .pull(id, &dir, &key, cache)
                .with_context(|| format!("pulling snapshot {id} from {url}"))?;
            println!(
                "snapshot {id} pulled from {url} into {}: {} MiB of memory, {} chunks; \
                 chunk objects: {} fetched from the store ({:.1} MiB), {} from the host cache",
                dir.display(),
                pulled.written.memory_bytes >> 20,
                pulled.written.chunks,
                pulled.fetched.fetched,
                pulled.fetched.fetched_bytes as f64 / (1 << 20) as f64,
                pulled.fetched.cache_hits,
            );
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCommand::Verify { dir, key_file } => {
            let key = snapshot::host_key::for_opening(key_file.as_deref())?;
            let summary = restore_daemon::verify::verify(&dir, &key)?;
            println!("{summary}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What `thaw function build` made: the directory on stdout, a summary on stderr.
fn report_function_image(built: &thaw::function_image::BuiltImage) {
    let m = &built.manifest;
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let list = |d: &std::collections::BTreeMap<String, String>| {
        d.iter()
            .map(|(name, version)| format!("{name} {version}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    eprintln!(
        "thaw: function {} ({} {}, Python {}) built: {} of {:.1} MiB ({:.1} MiB unpacked, \
         {:.1} MiB of code and requirements) for kernel {}",
        m.function_name,
        m.runtime,
        m.handler,
        m.python_version,
        m.initramfs.file,
        mib(m.initramfs.size),
        mib(built.cpio_bytes),
        mib(built.task_bytes),
        m.kernel.release,
    );
    eprintln!("thaw: runtime packages: {}", list(&m.distributions.runtime));
    if !m.distributions.function.is_empty() {
        eprintln!("thaw: requirements: {}", list(&m.distributions.function));
    }
    if !built.left_out.is_empty() {
        eprintln!(
            "thaw: left out (a library they need is missing on this host too): {}",
            built
                .left_out
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!("{}", built.dir.display());
}

/// How snapshots are sealed, from `--key-file` and `--insecure-plaintext`.
fn sealing(
    key_file: Option<&std::path::Path>,
    insecure_plaintext: bool,
) -> anyhow::Result<thaw::capture::Sealing> {
    use thaw::capture::Sealing;
    if insecure_plaintext {
        eprintln!(
            "thaw: WARNING: --insecure-plaintext: snapshots are neither encrypted nor \
             authenticated; use them for benchmarks only"
        );
        return Ok(Sealing::InsecurePlaintext);
    }
    Ok(Sealing::Encrypted(snapshot::host_key::for_sealing(
        key_file,
    )?))
}

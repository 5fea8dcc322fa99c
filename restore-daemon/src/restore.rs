//! Restoring a snapshot into a new machine. Everything the snapshot says is checked before any
//! guest instruction runs: the snapshot layer authenticates header, state and manifest (and,
//! eagerly, every chunk), this host is checked against its fingerprint, and the state must
//! decode and describe the memory layout the snapshot holds. Then memory is either filled
//! completely (eager: decrypt and decompress on all cores) or handed to the userfaultfd page
//! server (lazy: chunks arrive when first touched, and in the background), and the machine is
//! rebuilt from its state (`Machine::restore_in`, in its documented order).
//!
//! Lazily restored memory stays tied to the page server: [`Restored::run`] keeps the server
//! alive for as long as the guest runs, stops the machine if the server fails (its memory would
//! no longer be the snapshot's) and reports that failure instead of the guest's exit.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use snapshot::{AuthenticatedOnce, ChunkKind, Snapshot, VerifiedRecords};
use vmm_core::devices::serial::ConsoleOutput;
use vmm_core::exit::{ExitReason, ExitSignal};
use vmm_core::machine::{
    ConsoleInput, MachineController, MachineShell, RestoreConfig, ShellMemory, ShellSpec,
    StateError,
};
use vmm_core::memory::{HostRange, MappingHold};
use vmm_core::{Machine, MachineError};

use crate::decoded_copy::{self, CopyError, DecodedCopy};
use crate::pager::{PageServer, PagerError, PagerOptions, PagerStats, SnapshotSource};
use crate::shells::ShellPool;
use crate::startup_set::{StartupLearning, StartupSets};
use crate::verify::{self, VerifyError};
use snapshot::KeyChoice;
use snapshot::state_blob::{self, StateBlobError};

/// The snapshot could not be restored, or its restored guest could not run.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot layer refused it.
    #[error(transparent)]
    Snapshot(#[from] VerifyError),
    /// This host cannot run what the guest was promised.
    #[error("snapshot {} cannot be restored on this host: {reason}", path.display())]
    IncompatibleHost {
        /// The snapshot.
        path: PathBuf,
        /// The difference.
        reason: String,
    },
    /// The file is not the snapshot that was registered (replaced since).
    #[error(
        "snapshot {} is {found}, not {registered}, the snapshot registered for it: it was replaced",
        path.display()
    )]
    Replaced {
        /// The snapshot.
        path: PathBuf,
        /// The id registered.
        registered: snapshot::SnapshotId,
        /// The id found.
        found: snapshot::SnapshotId,
    },
    /// The authenticated header and the authenticated state describe different machines.
    #[error(
        "snapshot {}: its header says {header} vCPUs, its machine state holds {state}",
        path.display()
    )]
    VcpuCount {
        /// The snapshot.
        path: PathBuf,
        /// The header's count.
        header: u8,
        /// The state's.
        state: usize,
    },
    /// The state blob is unusable.
    #[error("snapshot {}: its machine state is unusable", path.display())]
    State {
        /// The snapshot.
        path: PathBuf,
        /// Why.
        #[source]
        source: StateBlobError,
    },
    /// The state decodes but describes no machine that could run.
    #[error("snapshot {}: its machine state is invalid", path.display())]
    InvalidState {
        /// The snapshot.
        path: PathBuf,
        /// Why.
        #[source]
        source: StateError,
    },
    /// The snapshot's memory regions are not the layout of a machine of its size.
    #[error(
        "snapshot {}: memory regions {found:?} are not the layout of {mem_bytes} bytes of RAM",
        path.display()
    )]
    MemoryLayout {
        /// The snapshot.
        path: PathBuf,
        /// Its regions (start, size).
        found: Vec<(u64, u64)>,
        /// The state's memory size.
        mem_bytes: u64,
    },
    /// A chunk failed to decrypt, authenticate or decompress (eager restore).
    #[error("snapshot {}: memory could not be read", path.display())]
    Chunk {
        /// The snapshot.
        path: PathBuf,
        /// Why.
        #[source]
        source: snapshot::ReadError,
    },
    /// Guest memory could not be made or filled.
    #[error("cannot set up guest memory for the restore: {0}")]
    Memory(String),
    /// The page server could not start.
    #[error("cannot start the page server")]
    PagerStart(#[source] PagerError),
    /// The page server failed while the guest ran: the guest was stopped, since its memory is
    /// no longer the snapshot's.
    #[error("the page server failed, so the restored guest was stopped: {0}")]
    PagerFailed(String),
    /// The decoded copy given for the restore is unusable for this snapshot.
    #[error("snapshot {}: its decoded copy cannot be used", path.display())]
    SharedCopy {
        /// The snapshot.
        path: PathBuf,
        /// Why.
        #[source]
        source: CopyError,
    },
    /// The machine could not be rebuilt or run.
    #[error(transparent)]
    Machine(#[from] MachineError),
}

/// How guest memory comes back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemoryMode {
    /// All of it, decrypted and decompressed on all cores, before the guest runs.
    Eager,
    /// Registered empty with userfaultfd and installed chunk by chunk as the guest touches it.
    #[default]
    Lazy,
}

impl std::str::FromStr for MemoryMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "eager" => Ok(MemoryMode::Eager),
            "lazy" => Ok(MemoryMode::Lazy),
            other => Err(format!("unknown memory mode {other:?}: use lazy or eager")),
        }
    }
}

/// When a lazy restore authenticates the snapshot's memory chunks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChunkCheck {
    /// Every chunk's tag is checked (read and decrypted, not decompressed, on all cores) before
    /// the guest runs, so a tampered snapshot is refused before any guest instruction; each
    /// chunk is checked again as it is installed.
    #[default]
    UpFront,
    /// As `UpFront`, once per host and file: skipped when this host has a record that it
    /// already authenticated every chunk of this very file and the file is unchanged since
    /// (device, inode, size, mtime, ctime; `snapshot::verified`), made when a pass succeeds.
    /// Each chunk is still checked as it is installed. The records are in
    /// [`RestoreOptions::verified_records`], else in their default place.
    Once,
    /// Each chunk is checked only as it is installed: the guest never sees an unauthenticated
    /// byte, but a tampered chunk stops it mid-run instead of refusing it up front. For
    /// platforms that verified the snapshot when they registered it.
    OnInstall,
}

impl std::str::FromStr for ChunkCheck {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "upfront" => Ok(ChunkCheck::UpFront),
            "once" => Ok(ChunkCheck::Once),
            "on-install" => Ok(ChunkCheck::OnInstall),
            other => Err(format!(
                "unknown chunk check {other:?}: use upfront, once or on-install"
            )),
        }
    }
}

/// How to restore.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// Eager or lazy memory.
    pub memory: MemoryMode,
    /// Lazy only: when chunks are authenticated.
    pub chunk_check: ChunkCheck,
    /// With [`ChunkCheck::Once`]: where this host records the snapshot files it has
    /// authenticated in full (`None`: `VerifiedRecords::default_location`).
    pub verified_records: Option<VerifiedRecords>,
    /// Lazy only: fill the memory the guest has not touched in the background, once its first
    /// burst of faults is over.
    pub prefetch: bool,
    /// Lazy only: install the snapshot's recorded working set first, if it has one.
    pub use_working_set: bool,
    /// Lazy only: record the order in which chunks are first faulted.
    pub record_working_set: bool,
    /// The snapshot this restore is for (thawd: the one it registered): a file at the path
    /// with another id is refused before anything is built.
    pub expected_snapshot: Option<snapshot::SnapshotId>,
    /// The host socket for the guest's vsock device (required if it has one).
    pub vsock_uds: Option<PathBuf>,
    /// A benchmark baseline, not a restore mode: take guest memory from this raw, plaintext,
    /// unauthenticated memory file, mapped privately (Firecracker's `File` backend), instead
    /// of from the snapshot's chunks. `memory` and the lazy options are then ignored.
    pub baseline_memory_file: Option<PathBuf>,
    /// Machine shells built ahead of time: the restore takes one of its size if one is ready
    /// and builds its own otherwise.
    pub shells: Option<Arc<ShellPool>>,
    /// The snapshot's memory, already decoded once for this host and shared by every clone
    /// ([`DecodedCopy`]): guest memory is mapped from it copy-on-write, so nothing is decoded
    /// or paged and `memory` and the lazy options are ignored. It must have been decoded from
    /// this very snapshot (checked by id and size).
    pub shared_copy: Option<Arc<DecodedCopy>>,
    /// Lazy only: where this host keeps each snapshot's startup set (the chunks its guest
    /// needed before its first sign of life, see [`crate::startup_set`]). The page server
    /// installs the set before the guest runs, and the restore learns from what the guest
    /// still faulted on ([`Restored::startup_learning`]). `None`: neither.
    pub startup_sets: Option<StartupSets>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self {
            memory: MemoryMode::Lazy,
            chunk_check: ChunkCheck::UpFront,
            verified_records: None,
            prefetch: true,
            use_working_set: true,
            record_working_set: false,
            expected_snapshot: None,
            vsock_uds: None,
            baseline_memory_file: None,
            shells: None,
            shared_copy: None,
            startup_sets: None,
        }
    }
}

/// Where the restore's time went.
#[derive(Clone, Copy, Debug, Default)]
pub struct RestoreTimings {
    /// Opening and authenticating the snapshot, decoding the state.
    pub open: Duration,
    /// Taking a ready machine shell, or building one: a shell built while the snapshot was
    /// opened and its chunks authenticated counts only for what outlasted them, and the read
    /// of what KVM supports (for the host check, made meanwhile) counts here too.
    pub shell: Duration,
    /// Whether the shell came ready from a [`ShellPool`].
    pub shell_was_ready: bool,
    /// Lazy with [`ChunkCheck::UpFront`] or [`ChunkCheck::Once`]: authenticating every chunk,
    /// or finding this host's record that it did so before.
    pub authenticate: Duration,
    /// [`ChunkCheck::Once`]: whether the up-front pass was skipped because this host had
    /// authenticated the unchanged file before.
    pub authenticated_before: bool,
    /// Eager: decrypting and decompressing all memory. Lazy: starting the page server, unless it
    /// started while the shell was built for this restore (it then counts in `open` and
    /// `shell`).
    pub memory: Duration,
    /// The host check (the first in a process asks the shell's vCPU what the host offers),
    /// then rebuilding the VM from its state.
    pub machine_restore: Duration,
}

impl RestoreTimings {
    /// From the start of the restore until the machine can run.
    pub fn total(&self) -> Duration {
        self.open + self.shell + self.authenticate + self.memory + self.machine_restore
    }
}

/// The failure the page server reported, and the machine to stop when it does.
#[derive(Default)]
struct PagerWatch {
    controller: OnceLock<MachineController>,
    failure: Mutex<Option<String>>,
}

impl PagerWatch {
    fn failed(&self, e: &PagerError) {
        let mut failure = match self.failure.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        failure.get_or_insert_with(|| e.full_message());
        if let Some(c) = self.controller.get() {
            c.stop();
        }
    }

    fn failure(&self) -> Option<String> {
        match self.failure.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// A restored machine, not yet running.
pub struct Restored {
    machine: Machine,
    // Field order is drop order: the page server stops before the memory it serves is unmapped.
    pager: Option<Arc<PageServer>>,
    watch: Arc<PagerWatch>,
    _memory: MappingHold,
    snapshot: Arc<Snapshot>,
    startup: Option<StartupLearning>,
    /// Where the time went.
    pub timings: RestoreTimings,
}

/// How the restored guest's run ended.
#[derive(Debug)]
pub struct RunOutcome {
    /// Why the machine stopped.
    pub reason: ExitReason,
    /// What the page server did, for a lazy restore.
    pub pager: Option<PagerStats>,
}

impl Restored {
    /// The snapshot it came from.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }

    /// Controls the machine while it runs: pause (into a guard that saves it, reads its memory
    /// and resumes it) and stop.
    pub fn controller(&self) -> MachineController {
        self.machine.controller()
    }

    /// Set when the machine stops.
    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.machine.exit_signal()
    }

    /// The page server, for a lazy restore.
    pub fn pager(&self) -> Option<Arc<PageServer>> {
        self.pager.clone()
    }

    /// For a lazy restore with [`RestoreOptions::startup_sets`]: the set it was given, to
    /// learn from once the guest shows its first sign of life (give it what
    /// [`PageServer::recorded_before`] that moment).
    pub fn startup_learning(&self) -> Option<StartupLearning> {
        self.startup.clone()
    }

    /// Whether the guest has a vsock device (and so, normally, an agent).
    pub fn has_vsock(&self) -> bool {
        self.machine.has_vsock()
    }

    /// Runs the guest until its machine stops. A page-server failure stops it and is the
    /// error, whatever the guest did meanwhile.
    pub fn run(self, input: Option<ConsoleInput>) -> Result<RunOutcome, RestoreError> {
        let Restored {
            machine,
            pager,
            watch,
            _memory,
            snapshot: _,
            startup: _,
            timings: _,
        } = self;
        let reason = machine.run(input);
        let stats = pager.as_ref().map(|p| {
            // Others may hold the server; its threads stop here, before memory is unmapped.
            p.stop();
            p.stats()
        });
        drop(pager);
        if let Some(failure) = watch.failure() {
            return Err(RestoreError::PagerFailed(failure));
        }
        Ok(RunOutcome {
            reason: reason?,
            pager: stats,
        })
    }
}

/// Opens the snapshot at `dir` and checks everything a restore needs before building anything:
/// authenticity of header, state and manifest, this host against its fingerprint, and its
/// machine state (decoded, valid, matching the memory regions). `thawd` runs it when it
/// registers a function.
pub fn open_checked(
    dir: &Path,
    key: &KeyChoice,
) -> Result<(Snapshot, vmm_core::machine::MachineState), RestoreError> {
    let (snap, state) = open_authenticated(dir, key)?;
    check_host(dir, &snap)?;
    Ok((snap, state))
}

/// Whether this host can run the snapshot's guest (its CPU, its KVM, the CPUID it offers).
fn check_host(dir: &Path, snap: &Snapshot) -> Result<(), RestoreError> {
    verify::host_compatibility(snap.fingerprint()).map_err(|reason| {
        RestoreError::IncompatibleHost {
            path: dir.to_owned(),
            reason,
        }
    })
}

/// [`open_checked`] but for the host check.
fn open_authenticated(
    dir: &Path,
    key: &KeyChoice,
) -> Result<(Snapshot, vmm_core::machine::MachineState), RestoreError> {
    open_authenticated_observing(SnapshotAt::Dir(dir), key, &mut |_| {})
}

/// [`open_authenticated`], telling `on_header` the shell the snapshot needs as soon as its
/// header is authenticated (see [`Snapshot::open_observing`]).
fn open_authenticated_observing(
    at: SnapshotAt<'_>,
    key: &KeyChoice,
    on_header: &mut dyn FnMut(ShellSpec),
) -> Result<(Snapshot, vmm_core::machine::MachineState), RestoreError> {
    let (snap, dir) = match at {
        SnapshotAt::Dir(dir) => (
            verify::open_observing(dir, key, &mut |size| {
                on_header(ShellSpec {
                    mem_bytes: size.memory_bytes,
                    vcpus: size.vcpus,
                })
            })?,
            dir.to_owned(),
        ),
        SnapshotAt::Opened(snap) => {
            on_header(ShellSpec {
                mem_bytes: snap.regions().iter().map(|r| r.size).sum(),
                vcpus: snap.vcpus(),
            });
            let dir = snap.path().to_owned();
            (*snap, dir)
        }
    };
    let dir = dir.as_path();
    let state =
        state_blob::decode::<vmm_core::machine::MachineState>(snap.state()).map_err(|source| {
            RestoreError::State {
                path: dir.to_owned(),
                source,
            }
        })?;
    let layout: Vec<(u64, u64)> = vmm_core::memory::ram_ranges(state.mem_bytes)
        .into_iter()
        .map(|(start, size)| (start.0, size))
        .collect();
    let regions: Vec<(u64, u64)> = snap
        .regions()
        .iter()
        .map(|r| (r.guest_addr, r.size))
        .collect();
    // `verify` refused this; a restore must too (the header sized the machine's shell).
    let header_vcpus = snap.vcpus();
    if usize::from(header_vcpus) != state.vcpus.len() {
        return Err(RestoreError::VcpuCount {
            path: dir.to_owned(),
            header: header_vcpus,
            state: state.vcpus.len(),
        });
    }
    if regions != layout {
        return Err(RestoreError::MemoryLayout {
            path: dir.to_owned(),
            found: regions,
            mem_bytes: state.mem_bytes,
        });
    }
    state
        .validate(&layout)
        .map_err(|source| RestoreError::InvalidState {
            path: dir.to_owned(),
            source,
        })?;
    Ok((snap, state))
}

/// A shell for `spec` built now: over the baseline memory file, or fresh memory.
fn build_shell(spec: ShellSpec, options: &RestoreOptions) -> Result<MachineShell, RestoreError> {
    Ok(match &options.baseline_memory_file {
        Some(path) => {
            let file = std::fs::File::open(path)
                .map_err(|e| RestoreError::Memory(format!("{}: {e}", path.display())))?;
            MachineShell::from_file(&file, spec)?
        }
        None => MachineShell::create(spec)?,
    })
}

/// Authenticates every chunk of `snap` before a lazy restore maps any of them, unless
/// `options` say chunks are checked as they are installed (or nothing is paged); with
/// `--chunk-check once`, not even then when this host authenticated the unchanged file before.
/// How long it took, and whether the host's record made it unnecessary.
fn authenticate_chunks(
    dir: &Path,
    snap: &Snapshot,
    options: &RestoreOptions,
) -> Result<(Duration, bool), RestoreError> {
    let started = Instant::now();
    let authenticate_up_front = options.memory == MemoryMode::Lazy
        && options.chunk_check != ChunkCheck::OnInstall
        && !snap.in_store()
        && options.baseline_memory_file.is_none()
        && options.shared_copy.is_none();
    if !authenticate_up_front {
        return Ok((started.elapsed(), false));
    }
    let chunk_error = |source| RestoreError::Chunk {
        path: dir.to_owned(),
        source,
    };
    let records = match options.chunk_check {
        ChunkCheck::Once => options
            .verified_records
            .clone()
            .or_else(VerifiedRecords::default_location),
        ChunkCheck::UpFront | ChunkCheck::OnInstall => None,
    };
    let before = match &records {
        Some(records) => matches!(
            snap.authenticate_chunks_once(records)
                .map_err(chunk_error)?,
            AuthenticatedOnce::Recorded
        ),
        None => {
            snap.authenticate_chunks().map_err(chunk_error)?;
            false
        }
    };
    Ok((started.elapsed(), before))
}

/// Where a restore's snapshot comes from.
pub enum SnapshotAt<'a> {
    /// A snapshot directory on this host, opened and checked by the restore.
    Dir(&'a Path),
    /// A snapshot already opened (authenticated) elsewhere: one in an object store
    /// (`store::Store::open_snapshot`), whose chunks are fetched as they are installed. Its
    /// chunks are never authenticated up front, which would fetch all of them: each is checked
    /// as it is installed ([`ChunkCheck::OnInstall`]), so no unauthenticated byte reaches the
    /// guest, and a bad one stops it.
    Opened(Box<Snapshot>),
}

/// Restores the snapshot at `dir`: the guest's console goes to `console`.
pub fn restore(
    dir: &Path,
    key: &KeyChoice,
    options: &RestoreOptions,
    console: ConsoleOutput,
) -> Result<Restored, RestoreError> {
    restore_from(SnapshotAt::Dir(dir), key, options, console)
}

/// [`restore`] of a snapshot wherever it is.
pub fn restore_from(
    at: SnapshotAt<'_>,
    key: &KeyChoice,
    options: &RestoreOptions,
    console: ConsoleOutput,
) -> Result<Restored, RestoreError> {
    let dir: PathBuf = match &at {
        SnapshotAt::Dir(dir) => dir.to_path_buf(),
        SnapshotAt::Opened(snap) => snap.path().to_owned(),
    };
    let dir = dir.as_path();
    let started = Instant::now();
    let watch = Arc::new(PagerWatch::default());
    // Without a ready shell, building one (about 1 ms on PVM) needs only the memory size and
    // vCPU count of the authenticated header: it starts then, and runs while the state and
    // manifest are read and authenticated and (the first time a host restores a file, tens of
    // ms for a large snapshot) every chunk is. Nothing else of the snapshot reaches the shell
    // before all of that is done, and a failure of either side drops the other's work.
    //
    // A lazy restore that keeps startup sets maps the shell's memory here first, so that once
    // the snapshot is authenticated its page server registers that memory and installs the
    // startup set while the VM is still being built (`starts_pager_early`): no guest runs
    // before the shell is done, and every chunk is authenticated as it is installed.
    let (opened, open, authenticated, startup, early, supported, built, waiting) =
        std::thread::scope(|scope| {
            let mut building = None;
            let mut early_memory = None;
            let opened = open_authenticated_observing(at, key, &mut |spec| {
                let pooled = match options.baseline_memory_file {
                    None => options.shells.as_deref().and_then(|pool| pool.take(spec)),
                    Some(_) => None,
                };
                if let Some(shell) = pooled {
                    building = Some((spec, Building::Ready(shell)));
                    return;
                }
                // A mapping that fails here fails again, and is reported, on the usual path.
                let memory = starts_pager_early(options)
                    .then(|| ShellMemory::create(spec).ok())
                    .flatten();
                let thread = match memory {
                    Some(memory) => {
                        early_memory = Some((memory.host_ranges(), memory.hold_mapping()));
                        scope.spawn(move || Ok(memory.build()?))
                    }
                    None => scope.spawn(move || build_shell(spec, options)),
                };
                building = Some((spec, Building::Thread(thread)));
            });
            let opened = opened.and_then(|(snap, state)| {
                expect_snapshot(dir, &snap, options)?;
                Ok((Arc::new(snap), state))
            });
            let open = started.elapsed();
            let authenticated = match &opened {
                Ok((snap, _)) => authenticate_chunks(dir, snap, options),
                Err(_) => Ok((Duration::ZERO, false)),
            };
            let startup = match (&opened, &authenticated) {
                (Ok((snap, _)), Ok(_)) => startup_learning(snap, options),
                _ => None,
            };
            let early = match (early_memory, &opened, &authenticated) {
                (Some((ranges, hold)), Ok((snap, _)), Ok(_)) => Some(
                    start_pager(snap, ranges, options, startup.as_ref(), &watch).map(|pager| {
                        EarlyPager {
                            pager,
                            _memory: hold,
                        }
                    }),
                ),
                _ => None,
            };
            let waiting = Instant::now();
            // The host check needs what this host offers; a process that does not know yet learns
            // it from the shell's vCPU, which has not run (no scratch VM), with what KVM supports
            // read here while the shell is still being built.
            let supported = match (&opened, &authenticated) {
                (Ok(_), Ok(_)) => verify::read_for_host_facts(),
                _ => None,
            };
            let built = building.map(|(spec, building)| {
                let shell = match building {
                    Building::Ready(shell) => Ok((shell, true)),
                    Building::Thread(thread) => match thread.join() {
                        Ok(built) => built.map(|shell| (shell, false)),
                        Err(_) => Err(RestoreError::Memory(
                            "the shell-building thread panicked".into(),
                        )),
                    },
                };
                (spec, shell)
            });
            (
                opened,
                open,
                authenticated,
                startup,
                early,
                supported,
                built,
                waiting,
            )
        });
    let (snap, state) = opened?;
    let (authenticate, authenticated_before) = authenticated?;
    // Dropped on any failure below: the page server stops before the memory is unmapped.
    let early = early.transpose()?;
    let spec = ShellSpec {
        mem_bytes: state.mem_bytes,
        // validate() allows at most 255 vCPUs.
        vcpus: u8::try_from(state.vcpus.len()).unwrap_or(u8::MAX),
    };
    let (shell, shell_was_ready) = match built {
        Some((built_for, shell)) => {
            // The checks above tie the header's size to the state's; a shell of another size
            // would be refused by Machine::restore_in, this names why.
            if built_for != spec {
                return Err(RestoreError::Memory(format!(
                    "the header described {built_for:?}, the machine state {spec:?}"
                )));
            }
            shell?
        }
        // Not reached: the header callback runs whenever the snapshot opens.
        None => (build_shell(spec, options)?, false),
    };
    // Only the wait beyond the opening and authentication it overlapped adds to the restore.
    let shell_elapsed = waiting.elapsed();

    let copy_refused = |source| RestoreError::SharedCopy {
        path: dir.to_owned(),
        source,
    };
    let copy_runs = match &options.shared_copy {
        Some(copy) => {
            copy.check_matches(&snap).map_err(copy_refused)?;
            Some(decoded_copy::map_runs(&snap, copy.huge()).map_err(copy_refused)?)
        }
        None => None,
    };

    let started = Instant::now();
    let mut shell = shell;
    let shared = options.shared_copy.as_ref().zip(copy_runs.as_ref());
    let pager = match (&options.baseline_memory_file, shared, options.memory) {
        (Some(_), _, _) => None,
        // The copy was decoded from authenticated chunks (checked against this snapshot's id
        // above); mapping it is all there is to do.
        (None, Some((copy, runs)), _) => {
            shell.overlay_private(copy.file(), runs)?;
            None
        }
        (None, None, MemoryMode::Eager) => {
            decode_all_into(&snap, &mut shell).map_err(|source| RestoreError::Chunk {
                path: dir.to_owned(),
                source,
            })?;
            None
        }
        (None, None, MemoryMode::Lazy) => {
            let pager = match early {
                Some(early) => early.pager,
                None => start_pager(
                    &snap,
                    shell.host_ranges(),
                    options,
                    startup.as_ref(),
                    &watch,
                )?,
            };
            Some(Arc::new(pager))
        }
    };
    let memory = shell.hold_mapping();
    let memory_elapsed = started.elapsed();

    let started = Instant::now();
    // Checked once the shell is here: a process that does not know the host yet learns it from
    // the shell's vCPU, which has not run, instead of a scratch VM. Nothing of the machine has
    // been restored yet.
    verify::learn_host_facts_from(&shell, supported.as_ref());
    check_host(dir, &snap)?;
    let config = RestoreConfig {
        vsock_uds_path: options.vsock_uds.clone(),
        disks: Vec::new(),
    };
    let machine = Machine::restore_in(shell, config, console, &state)?;
    // A failure before this point surfaced in this thread (Machine::restore_in touches no
    // guest memory); from here on it stops the machine.
    let _ = watch.controller.set(machine.controller());
    if let Some(failure) = watch.failure() {
        return Err(RestoreError::PagerFailed(failure));
    }
    Ok(Restored {
        machine,
        pager,
        watch,
        _memory: memory,
        snapshot: snap,
        startup,
        timings: RestoreTimings {
            open,
            shell: shell_elapsed,
            shell_was_ready,
            authenticate,
            authenticated_before,
            memory: memory_elapsed,
            machine_restore: started.elapsed(),
        },
    })
}

/// The startup set to install and learn from, for a lazy restore that pages from the snapshot
/// and was given where the host keeps its sets.
fn startup_learning(snap: &Snapshot, options: &RestoreOptions) -> Option<StartupLearning> {
    let sets = options
        .startup_sets
        .clone()
        .filter(|_| pages_lazily(options))?;
    Some(StartupLearning::load(sets, snap.id(), snap.chunks().len()))
}

/// Where the shell comes from: the pool had one ready, or a thread builds it.
enum Building<'scope> {
    Ready(MachineShell),
    Thread(std::thread::ScopedJoinHandle<'scope, Result<MachineShell, RestoreError>>),
}

/// A page server started on a shell's memory while the shell was still being built, and the
/// memory it serves, kept mapped until the server has stopped (fields drop in order).
struct EarlyPager {
    pager: PageServer,
    _memory: MappingHold,
}

/// Whether the page server starts on the shell's memory while the rest of the shell is built:
/// for restores that keep startup sets, so that the set goes in before the guest runs. Not for
/// the others: there it gains little (no chunk goes in before the guest asks), and in a process
/// that restores again and again, a guest reading all of its 256 MiB was then ready later
/// (median 206 ms against 163 ms over 40 restores each, restore bench, cause not found).
fn starts_pager_early(options: &RestoreOptions) -> bool {
    pages_lazily(options) && options.startup_sets.is_some()
}

/// Whether memory comes from the snapshot's chunks through a page server.
fn pages_lazily(options: &RestoreOptions) -> bool {
    options.memory == MemoryMode::Lazy
        && options.baseline_memory_file.is_none()
        && options.shared_copy.is_none()
}

/// Refuses a snapshot whose id is not the one the caller registered
/// ([`RestoreOptions::expected_snapshot`]).
fn expect_snapshot(
    dir: &Path,
    snap: &Snapshot,
    options: &RestoreOptions,
) -> Result<(), RestoreError> {
    match options.expected_snapshot {
        Some(registered) if snap.id() != registered => Err(RestoreError::Replaced {
            path: dir.to_owned(),
            registered,
            found: snap.id(),
        }),
        _ => Ok(()),
    }
}

fn start_pager(
    snap: &Arc<Snapshot>,
    regions: Vec<HostRange>,
    options: &RestoreOptions,
    startup: Option<&StartupLearning>,
    watch: &Arc<PagerWatch>,
) -> Result<PageServer, RestoreError> {
    let working_set = match (options.use_working_set, snap.working_set()) {
        (true, Some(ws)) => ws.chunks.clone(),
        _ => Vec::new(),
    };
    let startup_set = startup.map(|s| s.known().to_vec()).unwrap_or_default();
    // A snapshot in a store starts fetching what goes in first, many objects at once, while
    // the server installs them one after another in this order.
    snap.prefetch_chunks(&[startup_set.as_slice(), working_set.as_slice()].concat());
    let on_failure = watch.clone();
    let pager_options = PagerOptions {
        prefetch: options.prefetch,
        working_set,
        startup: startup_set,
        // Recording is how a restore learns its startup set.
        record: options.record_working_set || startup.is_some(),
        on_failure: Some(Box::new(move |e: &PagerError| on_failure.failed(e))),
    };
    let source = SnapshotSource::new(snap.clone())
        .map_err(|e| RestoreError::PagerStart(PagerError::Layout(e)))?;
    PageServer::start(Arc::new(source), regions, pager_options).map_err(RestoreError::PagerStart)
}

/// Decrypts and decompresses every data chunk straight into `shell`'s guest memory, on all
/// cores: an eager restore's memory phase, public so the restore bench can time it alone (the
/// floor an eager restore cannot go below). Zero chunks are skipped: the shell's memory must
/// be fresh anonymous memory, which reads as zero. The shell has never run, which is what lets
/// its memory be written in place ([`MachineShell::ram_mut`]).
pub fn decode_all_into(
    snap: &Snapshot,
    shell: &mut MachineShell,
) -> Result<(), snapshot::ReadError> {
    let regions = shell.ram_mut();
    chunk_targets(snap, regions)?
        .into_par_iter()
        .try_for_each(|(index, out)| snap.read_chunk_authenticated(index, out))
}

/// Splits guest memory into one disjoint slice per data chunk, so the chunks can be decoded in
/// place in parallel.
fn chunk_targets<'m>(
    snap: &Snapshot,
    regions: Vec<(u64, &'m mut [u8])>,
) -> Result<Vec<(usize, &'m mut [u8])>, snapshot::ReadError> {
    let misplaced = |index: usize| snapshot::ReadError::ChunkCorrupt {
        index,
        reason: "does not fit guest memory".into(),
    };
    let chunks = snap.chunks();
    let mut targets = Vec::with_capacity(chunks.len());
    for (start, mut rest) in regions {
        let end = start + rest.len() as u64;
        let mut cursor = start;
        for (index, chunk) in chunks.iter().enumerate() {
            if chunk.kind != ChunkKind::Data || chunk.guest_addr < start || chunk.guest_addr >= end
            {
                continue;
            }
            let skip = chunk
                .guest_addr
                .checked_sub(cursor)
                .ok_or_else(|| misplaced(index))? as usize;
            let len = chunk.len as usize;
            let tail = std::mem::take(&mut rest);
            if tail.len() < skip + len {
                return Err(misplaced(index));
            }
            let (_, tail) = tail.split_at_mut(skip);
            let (this, tail) = tail.split_at_mut(len);
            targets.push((index, this));
            rest = tail;
            cursor = chunk.guest_addr + len as u64;
        }
    }
    Ok(targets)
}

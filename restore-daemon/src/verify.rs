//! `thaw snapshot verify`: everything a restore would check before a guest runs, without
//! starting one — the snapshot layer's authentication of header, state, manifest and every
//! chunk, and that the state blob is a machine state agreeing with the header.

use std::fmt;
use std::path::{Path, PathBuf};

use snapshot::{KeyChoice, Snapshot, VerifySummary};

use snapshot::state_blob::{self, StateBlobError};
use vmm_core::machine::MachineState;

/// The snapshot is not sound.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The snapshot layer refused it.
    #[error("snapshot {} is not valid", path.display())]
    Snapshot {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: snapshot::ReadError,
    },
    /// The state blob is not a machine state.
    #[error("snapshot {}: its machine state is unusable", path.display())]
    State {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: StateBlobError,
    },
    /// The state and the header disagree.
    #[error(
        "snapshot {}: the header says {header}, the machine state says {state}",
        path.display()
    )]
    Mismatch {
        /// The directory.
        path: PathBuf,
        /// The header's claim.
        header: String,
        /// The state's claim.
        state: String,
    },
}

/// A snapshot that verified.
#[derive(Debug)]
pub struct Verified {
    /// What the chunk check covered.
    pub chunks: VerifySummary,
    /// Whether this host could restore it, and if not why.
    pub host: Result<(), String>,
    /// The directory.
    pub path: PathBuf,
}

impl fmt::Display for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.chunks;
        writeln!(
            f,
            "snapshot {} is intact: header, state and manifest authenticated; {} chunks ({} with \
             data, {} MiB of memory from {} stored bytes) decrypted and checked in {:.1?}",
            self.path.display(),
            c.chunks_checked,
            c.data_chunks,
            c.memory_bytes >> 20,
            c.stored_bytes,
            c.elapsed
        )?;
        match &self.host {
            Ok(()) => write!(f, "this host can restore it"),
            Err(why) => write!(f, "this host cannot restore it: {why}"),
        }
    }
}

/// Opens (and authenticates) the snapshot at `dir` with the key `key` names.
pub fn open(dir: &Path, key: &KeyChoice) -> Result<Snapshot, VerifyError> {
    Snapshot::open_with(dir, key).map_err(|source| VerifyError::Snapshot {
        path: dir.to_owned(),
        source,
    })
}

/// [`open`], telling `on_header` the machine's size once the header is authenticated (see
/// [`Snapshot::open_observing`]).
pub fn open_observing(
    dir: &Path,
    key: &KeyChoice,
    on_header: &mut dyn FnMut(snapshot::MachineSize),
) -> Result<Snapshot, VerifyError> {
    Snapshot::open_with_observing(dir, key, on_header).map_err(|source| VerifyError::Snapshot {
        path: dir.to_owned(),
        source,
    })
}

/// Verifies the snapshot at `dir`.
pub fn verify(dir: &Path, key: &KeyChoice) -> Result<Verified, VerifyError> {
    let refused = |source| VerifyError::Snapshot {
        path: dir.to_owned(),
        source,
    };
    let snap = open(dir, key)?;
    let state: MachineState =
        state_blob::decode(snap.state()).map_err(|source| VerifyError::State {
            path: dir.to_owned(),
            source,
        })?;
    let info = snap.info();
    if state.vcpus.len() != usize::from(info.vcpus) || state.mem_bytes != info.memory_bytes {
        return Err(VerifyError::Mismatch {
            path: dir.to_owned(),
            header: format!(
                "{} vCPUs, {} bytes of memory",
                info.vcpus, info.memory_bytes
            ),
            state: format!(
                "{} vCPUs, {} bytes of memory",
                state.vcpus.len(),
                state.mem_bytes
            ),
        });
    }
    let chunks = snap.verify(0).map_err(refused)?;
    Ok(Verified {
        chunks,
        host: host_compatibility(&info.fingerprint),
        path: dir.to_owned(),
    })
}

/// What this host offers, learned once per process: finding the CPUID a vCPU really presents
/// takes a vCPU that has never run — a scratch VM (1.4–1.8 ms on PVM) unless a restore offers
/// its shell's ([`learn_host_facts_from`]) — and neither the CPU nor KVM changes under a
/// running process, so a long-lived restorer (`thawd`) pays for it once, not on every restore.
static FACTS: std::sync::OnceLock<Result<snapshot::HostFacts, String>> = std::sync::OnceLock::new();

fn host_facts() -> Result<snapshot::HostFacts, String> {
    FACTS
        .get_or_init(|| {
            let kvm = vmm_core::kvm::open().map_err(|e| e.to_string())?;
            // The CPUID this host's vCPUs really present (see `vmm_core::cpuid::effective`).
            let offered = vmm_core::cpuid::effective(&kvm).map_err(|e| e.to_string())?;
            Ok(facts(&offered))
        })
        .clone()
}

fn facts(offered: &kvm_bindings::CpuId) -> snapshot::HostFacts {
    snapshot::HostFacts::of_this_host(
        vmm_core::kvm::flavor().id(),
        offered
            .as_slice()
            .iter()
            .map(|e| snapshot::CpuidEntry::from_fields(vmm_core::cpuid::fields(e)))
            .collect(),
    )
}

/// KVM's supported CPUID, read for [`learn_host_facts_from`] unless this process knows the
/// host already. It takes no VM (a system ioctl, 0.3 ms on PVM, where each CPUID the kernel
/// runs to answer it traps), so a restore reads it while its shell is being built.
pub fn read_for_host_facts() -> Option<kvm_bindings::CpuId> {
    if FACTS.get().is_some() {
        return None;
    }
    let read = vmm_core::kvm::open()
        .map_err(|e| e.to_string())
        .and_then(|kvm| vmm_core::cpuid::supported(&kvm).map_err(|e| e.to_string()));
    match read {
        Ok(supported) => Some(supported),
        // The shell or the scratch VM will tell, or fail with its own message.
        Err(e) => {
            tracing::debug!(error = %e, "KVM's supported CPUID is read later");
            None
        }
    }
}

/// Learns this host's facts from `shell`'s never-run vCPU, unless this process knows them
/// already: a one-shot restore (`thaw restore`) then needs no scratch VM for its host check.
/// `supported` is KVM's supported CPUID if the caller read it ahead ([`read_for_host_facts`]).
pub fn learn_host_facts_from(
    shell: &vmm_core::machine::MachineShell,
    supported: Option<&kvm_bindings::CpuId>,
) {
    if FACTS.get().is_some() {
        return;
    }
    let offered = match supported {
        Some(supported) => shell.effective_cpuid_given(supported),
        None => shell.effective_cpuid(),
    };
    match offered {
        Ok(offered) => {
            // A helper thread (`learn_host_facts_ahead`) may have got there first: the same.
            let _ = FACTS.set(Ok(facts(&offered)));
        }
        // The scratch VM will tell, or fail with its own message.
        Err(e) => tracing::debug!(error = %e, "the shell could not say what the host offers"),
    }
}

/// Starts learning this host's facts on a helper thread, unless this process knows them
/// already: a process that will restore (a thawd worker waiting for its request) then finds
/// them ready.
pub fn learn_host_facts_ahead() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("thaw-host-facts".into())
            .spawn(|| {
                let _ = host_facts();
            });
        // Without the thread, the first host_compatibility learns them itself.
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "host facts are learned when first needed");
        }
    });
}

/// Whether this host could restore a snapshot with `fingerprint`.
pub fn host_compatibility(fingerprint: &snapshot::Fingerprint) -> Result<(), String> {
    let host = host_facts()?;
    fingerprint
        .check_compatible(&host)
        .map_err(|e| e.to_string())
}

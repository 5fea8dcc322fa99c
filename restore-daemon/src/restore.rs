//! Restoring a snapshot eagerly: authenticate it, check this host can run it, decrypt and
//! decompress all of its memory (both cores) into fresh guest memory, and rebuild the machine
//! from its state — all before any guest instruction runs, so a tampered, truncated or
//! wrong-key snapshot never reaches KVM. Lazy paging through userfaultfd comes with the restore
//! issue and belongs with it in `restore-daemon`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use snapshot::{ChunkKind, Snapshot};
use vm_memory::{Bytes, GuestAddress};
use vmm_core::devices::serial::ConsoleOutput;
use vmm_core::machine::RestoreConfig;
use vmm_core::{Machine, MachineError};

use crate::state_codec::{self as snapshot_state, StateCodecError};
use crate::verify::{self as snapshot_verify, KeyChoice, VerifyError};

/// The snapshot could not be restored; no guest ran.
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
    /// The state blob is unusable.
    #[error("snapshot {}: its machine state is unusable", path.display())]
    State {
        /// The snapshot.
        path: PathBuf,
        /// Why.
        #[source]
        source: StateCodecError,
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
    /// A chunk failed to decrypt, authenticate or decompress.
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
    /// The machine could not be rebuilt.
    #[error(transparent)]
    Machine(#[from] MachineError),
}

/// A restored machine, not yet running.
pub struct Restored {
    /// Call `run` to continue the guest.
    pub machine: Machine,
    /// Opening and authenticating the snapshot, and the host check.
    pub open: Duration,
    /// Decrypting and decompressing all memory.
    pub memory: Duration,
    /// Rebuilding the VM from its state.
    pub machine_restore: Duration,
}

/// Restores the snapshot at `dir`: the guest's console goes to `console`, its vsock device (if
/// it had one) gets the host socket `vsock_uds`.
pub fn restore_eager(
    dir: &Path,
    key: &KeyChoice,
    vsock_uds: Option<PathBuf>,
    console: ConsoleOutput,
) -> Result<Restored, RestoreError> {
    let started = Instant::now();
    let snap = snapshot_verify::open(dir, key)?;
    snapshot_verify::host_compatibility(snap.fingerprint()).map_err(|reason| {
        RestoreError::IncompatibleHost {
            path: dir.to_owned(),
            reason,
        }
    })?;
    let state = snapshot_state::decode(snap.state()).map_err(|source| RestoreError::State {
        path: dir.to_owned(),
        source,
    })?;
    let open = started.elapsed();

    let started = Instant::now();
    let memory = vmm_core::memory::create_guest_memory(state.mem_bytes)
        .map_err(|e| RestoreError::Memory(e.to_string()))?;
    let layout: Vec<(u64, u64)> = vmm_core::memory::ram_ranges(state.mem_bytes)
        .into_iter()
        .map(|(start, size)| (start.0, size))
        .collect();
    let regions: Vec<(u64, u64)> = snap
        .regions()
        .iter()
        .map(|r| (r.guest_addr, r.size))
        .collect();
    if regions != layout {
        return Err(RestoreError::MemoryLayout {
            path: dir.to_owned(),
            found: regions,
            mem_bytes: state.mem_bytes,
        });
    }
    fill_memory(&snap, &memory).map_err(|source| RestoreError::Chunk {
        path: dir.to_owned(),
        source,
    })?;
    let memory_elapsed = started.elapsed();

    let started = Instant::now();
    let config = RestoreConfig {
        vsock_uds_path: vsock_uds,
    };
    let machine = Machine::restore(&config, console, &state, memory)?;
    Ok(Restored {
        machine,
        open,
        memory: memory_elapsed,
        machine_restore: started.elapsed(),
    })
}

/// Decrypts every data chunk into guest memory, on all cores. Zero chunks need nothing: fresh
/// anonymous memory reads as zero.
fn fill_memory(
    snap: &Snapshot,
    memory: &vmm_core::memory::GuestMemory,
) -> Result<(), snapshot::ReadError> {
    snap.chunks()
        .par_iter()
        .enumerate()
        .filter(|(_, c)| c.kind == ChunkKind::Data)
        .try_for_each_init(Vec::new, |buf, (index, chunk)| {
            buf.resize(chunk.len as usize, 0);
            snap.read_chunk(index, buf)?;
            memory
                .write_slice(buf, GuestAddress(chunk.guest_addr))
                .map_err(|e| snapshot::ReadError::ChunkCorrupt {
                    index,
                    reason: format!("does not fit guest memory: {e}"),
                })
        })
}

//! Capturing a paused machine into a snapshot: its state (through the VMM), its memory (read
//! in place through the pause guard, which keeps the machine paused while it is borrowed), this
//! host's fingerprint, sealed and written atomically by the `snapshot` crate. The one capture
//! path: `thaw snapshot create` and the control API's `PUT /snapshot/create` both end here.

use std::path::Path;
use std::time::{Duration, Instant};

use snapshot::state_blob::{self, StateBlobError};
use snapshot::{
    CpuidEntry, Fingerprint, MasterKey, MemoryRegion, Protection, SnapshotMeta, WriteOptions,
    WriteSummary,
};
use vmm_core::machine::{ControlError, MachineState, Paused};

/// A paused machine could not be captured; nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The machine's state could not be read.
    #[error("cannot capture the machine's state")]
    Save(#[source] ControlError),
    /// The state could not be encoded.
    #[error(transparent)]
    State(#[from] StateBlobError),
    /// Writing the snapshot failed (nothing is left at the target).
    #[error(transparent)]
    Write(#[from] snapshot::WriteError),
    /// The machine has disks, whose bytes a snapshot does not hold yet: a restore could not
    /// give its guest the disks it saw.
    #[error(
        "the machine has {count} disk(s): snapshots of machines with disks are not supported yet \
         (their contents are not captured)"
    )]
    Disks {
        /// How many.
        count: usize,
    },
}

/// How the snapshot is sealed.
#[derive(Debug)]
pub enum Sealing {
    /// Encrypted and authenticated under this master key.
    Encrypted(MasterKey),
    /// Not encrypted, not authenticated: for benchmarks only.
    InsecurePlaintext,
}

/// Where and how a snapshot is written.
pub struct SnapshotTarget<'a> {
    /// The snapshot directory.
    pub out: &'a Path,
    /// Replace an existing snapshot there.
    pub replace: bool,
    /// Encryption.
    pub sealing: &'a Sealing,
}

/// Captures the paused machine's state and writes it with its memory, read in place, to
/// `target`; returns what was written and how long the capture took.
pub fn capture(
    paused: &Paused,
    target: &SnapshotTarget<'_>,
) -> Result<(WriteSummary, Duration), CaptureError> {
    let capture_start = Instant::now();
    let state = paused.save().map_err(CaptureError::Save)?;
    if !state.devices.blocks.is_empty() {
        return Err(CaptureError::Disks {
            count: state.devices.blocks.len(),
        });
    }
    let capture = capture_start.elapsed();
    let state_bytes = state_blob::encode(&state)?;
    let meta = SnapshotMeta {
        fingerprint: fingerprint(&state),
        vcpus: state.vcpus.len() as u8,
    };
    let regions = paused.memory();
    let regions: Vec<MemoryRegion<'_>> = regions
        .iter()
        .map(|(guest_addr, bytes)| MemoryRegion {
            guest_addr: *guest_addr,
            bytes,
        })
        .collect();
    let protection = match target.sealing {
        Sealing::Encrypted(key) => Protection::Encrypted(key),
        Sealing::InsecurePlaintext => Protection::InsecurePlaintext,
    };
    let write_options = WriteOptions {
        replace: target.replace,
        ..WriteOptions::default()
    };
    let summary = snapshot::write(
        target.out,
        &meta,
        &state_bytes,
        &regions,
        &protection,
        &write_options,
    )?;
    Ok((summary, capture))
}

/// This host's fingerprint, with the CPUID the saved guest's boot vCPU saw.
pub fn fingerprint(state: &MachineState) -> Fingerprint {
    let guest_cpuid = state.vcpus.first().map_or_else(Vec::new, |v| {
        v.cpuid
            .iter()
            .map(|e| CpuidEntry::from_fields(vmm_core::cpuid::fields(e)))
            .collect()
    });
    Fingerprint::of_this_host(guest_cpuid, vmm_core::kvm::flavor().id())
}

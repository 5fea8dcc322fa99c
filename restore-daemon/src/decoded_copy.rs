//! One decoded copy of a snapshot's memory, shared by every machine restored from it on this
//! host: the memory decrypted, authenticated and decompressed once into a sealed memfd (memory
//! that never touches a disk), then mapped into each clone's guest memory privately. A clone
//! reads the copy's pages in place and gets its own page only where it writes (copy-on-write),
//! so ten idle clones of one function cost one copy plus what each of them wrote.
//!
//! ```text
//!  snapshot file ──decode once──▶ memfd (sealed: no write, grow or shrink)
//!                                   │ MAP_PRIVATE over each run of data chunks
//!            ┌──────────────────────┼──────────────────────┐
//!         clone 1                clone 2                clone 3   (written pages: private)
//! ```
//!
//! Why this mechanism (measured on the project's PVM host, docs/ARCHITECTURE.md has the
//! figures): a private file mapping shares untouched pages in the page cache and KVM maps a
//! read fault to the shared page, as Firecracker's `File` backend relies on; userfaultfd's
//! minor-fault mode would need a shared, writable mapping, so a clone's writes would reach the
//! copy. Zero chunks are not mapped from the copy at all: a read fault on a hole of a memfd
//! allocates a page in it, so a clone reading zeroes would grow the shared copy towards the
//! whole guest size. They stay the shell's anonymous memory, which reads as the zero page.
//! Huge pages do not apply: shmem's transparent huge pages are off on these hosts
//! (`shmem_enabled` is `never`), and a copy-on-write of a 2 MiB page would copy 2 MiB for one
//! written byte; the copy is 4 KiB pages.
//!
//! The seals are what let a worker trust the file it is handed: once `F_SEAL_WRITE`,
//! `F_SEAL_GROW`, `F_SEAL_SHRINK` and `F_SEAL_SEAL` are set nobody, the daemon included, can
//! change its bytes or size again, and [`DecodedCopy::adopt`] refuses a file without them.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use snapshot::{ChunkKind, Snapshot};
use vmm_core::memory::FileRun;

/// The seals every decoded copy carries.
fn required_seals() -> SealFlag {
    SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL
}

/// A decoded copy could not be made, or a file handed over is not one.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The memfd could not be created, sized, written or sealed.
    #[error("cannot {step} the decoded copy")]
    Io {
        /// What failed.
        step: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A chunk failed to decrypt, authenticate or decompress.
    #[error("cannot decode the snapshot's memory")]
    Decode(#[source] snapshot::ReadError),
    /// The snapshot's chunks do not lie inside its regions (a file that authenticated but
    /// describes no memory layout).
    #[error("chunk {index} does not lie inside the snapshot's memory regions")]
    Layout {
        /// The chunk.
        index: usize,
    },
    /// The file lacks a seal, so its bytes could still change.
    #[error("the decoded copy is not sealed against changes (seals {found:#x}, need {need:#x})")]
    NotSealed {
        /// The seals it has.
        found: i32,
        /// The seals it needs.
        need: i32,
    },
    /// The file's size is not the guest memory size.
    #[error("the decoded copy holds {found} bytes, not the {expected} bytes of guest memory")]
    Size {
        /// Guest memory size.
        expected: u64,
        /// The file's.
        found: u64,
    },
    /// The copy was decoded from another snapshot.
    #[error("the decoded copy belongs to snapshot {copy}, not {snapshot}")]
    OtherSnapshot {
        /// Its snapshot.
        copy: String,
        /// The one being restored.
        snapshot: String,
    },
}

fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> CopyError {
    move |source| CopyError::Io { step, source }
}

/// What identifies a decoded copy when it is handed to another process: the snapshot it was
/// decoded from and the guest memory size. The receiver checks both against the snapshot it
/// restores, and the file's seals and size ([`DecodedCopy::adopt`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyTicket {
    /// The snapshot's id (authenticated in its header).
    pub snapshot_id: [u8; 16],
    /// Guest memory, bytes: the file's size.
    pub mem_bytes: u64,
}

/// A sealed memfd holding a snapshot's guest memory, decoded, laid out flat (region after
/// region, as the snapshot's regions are ordered). Zero chunks are holes.
#[derive(Debug)]
pub struct DecodedCopy {
    file: File,
    ticket: CopyTicket,
}

/// Where each data chunk of `snap` lies in a flat copy: `(chunk index, file offset, length)`.
fn data_chunks(snap: &Snapshot) -> Result<Vec<(usize, u64, u64)>, CopyError> {
    let mut flat_start = Vec::with_capacity(snap.regions().len());
    let mut offset = 0u64;
    for r in snap.regions() {
        flat_start.push((r.guest_addr, r.size, offset));
        offset = offset.saturating_add(r.size);
    }
    snap.chunks()
        .iter()
        .enumerate()
        .filter(|(_, c)| c.kind == ChunkKind::Data)
        .map(|(index, c)| {
            let len = u64::from(c.len);
            flat_start
                .iter()
                .find(|&&(start, size, _)| {
                    c.guest_addr >= start && c.guest_addr.saturating_add(len) <= start + size
                })
                .map(|&(start, _, flat)| (index, flat + (c.guest_addr - start), len))
                .ok_or(CopyError::Layout { index })
        })
        .collect()
}

/// The stretches of guest memory a clone takes from the copy: each run of consecutive data
/// chunks as one mapping (fewer mappings, fewer VMAs), zero chunks left out.
pub fn file_runs(snap: &Snapshot) -> Result<Vec<FileRun>, CopyError> {
    let chunks = snap.chunks();
    let mut runs: Vec<FileRun> = Vec::new();
    for (index, file_offset, len) in data_chunks(snap)? {
        let guest_addr = chunks[index].guest_addr;
        match runs.last_mut() {
            Some(last)
                if last.guest_addr + last.len == guest_addr
                    && last.file_offset + last.len == file_offset =>
            {
                last.len += len;
            }
            _ => runs.push(FileRun {
                guest_addr,
                len,
                file_offset,
            }),
        }
    }
    Ok(runs)
}

fn mem_bytes(snap: &Snapshot) -> u64 {
    snap.regions().iter().map(|r| r.size).sum()
}

impl DecodedCopy {
    /// Decodes every data chunk of `snap` (decrypting and authenticating each) into a new
    /// memfd on all cores, then seals it. `snap` must be open (its header, state and manifest
    /// authenticated); no byte reaches the copy unauthenticated.
    pub fn decode(snap: &Snapshot) -> Result<Self, CopyError> {
        let name = format!("thaw-copy-{}", snap.id());
        let fd = memfd_create(
            name.as_str(),
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(|e| CopyError::Io {
            step: "create",
            source: e.into(),
        })?;
        let file = File::from(fd);
        let mem_bytes = mem_bytes(snap);
        file.set_len(mem_bytes).map_err(io("size"))?;
        let chunk_size = snap.chunk_size() as usize;
        // pwrite rather than writing through a shared mapping: the kernel allocates each page
        // without a page fault, which on the PVM host costs about half as much.
        data_chunks(snap)?.into_par_iter().try_for_each_init(
            || vec![0u8; chunk_size],
            |buf, (index, offset, len)| {
                let out = buf
                    .get_mut(..len as usize)
                    .ok_or(CopyError::Layout { index })?;
                snap.read_chunk_authenticated(index, out)
                    .map_err(CopyError::Decode)?;
                file.write_all_at(out, offset).map_err(io("write"))
            },
        )?;
        fcntl(&file, FcntlArg::F_ADD_SEALS(required_seals())).map_err(|e| CopyError::Io {
            step: "seal",
            source: e.into(),
        })?;
        Ok(Self {
            file,
            ticket: CopyTicket {
                snapshot_id: snap.id().0,
                mem_bytes,
            },
        })
    }

    /// Takes a copy another process decoded: refused unless the file is sealed against every
    /// change and holds exactly the ticket's memory size.
    pub fn adopt(fd: OwnedFd, ticket: CopyTicket) -> Result<Self, CopyError> {
        let file = File::from(fd);
        let seals = fcntl(&file, FcntlArg::F_GET_SEALS).map_err(|e| CopyError::Io {
            step: "read the seals of",
            source: e.into(),
        })?;
        let need = required_seals().bits();
        if seals & need != need {
            return Err(CopyError::NotSealed { found: seals, need });
        }
        let found = file.metadata().map_err(io("inspect"))?.len();
        if found != ticket.mem_bytes {
            return Err(CopyError::Size {
                expected: ticket.mem_bytes,
                found,
            });
        }
        Ok(Self { file, ticket })
    }

    /// What identifies it to another process.
    pub fn ticket(&self) -> CopyTicket {
        self.ticket
    }

    /// The memfd, to map or to hand over.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The memfd's descriptor, to pass to a worker.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Host memory the copy holds: the pages written into it (its holes cost nothing).
    pub fn resident_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }

    /// Checks that the copy was decoded from `snap`, whose memory it is about to stand for.
    pub fn check_matches(&self, snap: &Snapshot) -> Result<(), CopyError> {
        if self.ticket.snapshot_id != snap.id().0 || self.ticket.mem_bytes != mem_bytes(snap) {
            return Err(CopyError::OtherSnapshot {
                copy: snapshot::SnapshotId(self.ticket.snapshot_id).to_string(),
                snapshot: snap.id().to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(len: u64) -> File {
        let fd = memfd_create("t", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
        let f = File::from(fd);
        f.set_len(len).unwrap();
        f
    }

    fn ticket(mem_bytes: u64) -> CopyTicket {
        CopyTicket {
            snapshot_id: [1; 16],
            mem_bytes,
        }
    }

    #[test]
    fn adopt_refuses_an_unsealed_file() {
        let f = memfd(4096);
        let e = DecodedCopy::adopt(f.into(), ticket(4096)).unwrap_err();
        assert!(matches!(e, CopyError::NotSealed { .. }), "{e}");
    }

    #[test]
    fn adopt_refuses_a_file_sealed_only_partly() {
        let f = memfd(4096);
        fcntl(
            &f,
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK),
        )
        .unwrap();
        let e = DecodedCopy::adopt(f.into(), ticket(4096)).unwrap_err();
        assert!(matches!(e, CopyError::NotSealed { .. }), "{e}");
    }

    #[test]
    fn adopt_refuses_a_file_of_another_size() {
        let f = memfd(8192);
        fcntl(&f, FcntlArg::F_ADD_SEALS(required_seals())).unwrap();
        let e = DecodedCopy::adopt(f.into(), ticket(4096)).unwrap_err();
        assert!(
            matches!(
                e,
                CopyError::Size {
                    expected: 4096,
                    found: 8192
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn adopt_refuses_a_file_that_is_not_a_memfd() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4096).unwrap();
        assert!(DecodedCopy::adopt(f.into(), ticket(4096)).is_err());
    }

    #[test]
    fn a_sealed_copy_cannot_be_written_or_resized() {
        let f = memfd(4096);
        fcntl(&f, FcntlArg::F_ADD_SEALS(required_seals())).unwrap();
        let copy = DecodedCopy::adopt(f.into(), ticket(4096)).unwrap();
        assert!(copy.file().write_all_at(b"x", 0).is_err());
        assert!(copy.file().set_len(8192).is_err());
        assert!(copy.file().set_len(0).is_err());
        assert_eq!(copy.ticket(), ticket(4096));
    }
}

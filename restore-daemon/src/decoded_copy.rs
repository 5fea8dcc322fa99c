//! One decoded copy of a snapshot's memory, shared by every machine restored from it on this
//! host: the memory decrypted, authenticated and decompressed once into shared memory (never a
//! disk file), then mapped into each clone's guest memory privately. A clone reads the copy's
//! pages in place and gets its own page only where it writes (copy-on-write), so ten idle
//! clones of one function cost one copy plus what each of them wrote.
//!
//! ```text
//!  snapshot file ──decode once──▶ copy (tmpfs file on huge pages, or a sealed memfd)
//!                                   │ MAP_PRIVATE over each stretch holding data
//!            ┌──────────────────────┼──────────────────────┐
//!         clone 1                clone 2                clone 3   (written pages: private)
//! ```
//!
//! Why this mechanism (measured on the project's PVM host; docs/ARCHITECTURE.md has the
//! figures): a private file mapping shares untouched pages and KVM maps a guest's read of one
//! to the shared page, as Firecracker's `File` backend relies on; userfaultfd's minor-fault
//! mode would need a shared, writable mapping, so a clone's writes would reach the copy.
//!
//! Two backings ([`CopyBacking`]), because page size decides how fast a guest reads the copy:
//!
//! - **Huge pages** (preferred): a file in a tmpfs mount of thawd's own, made with the new mount
//!   API and attached to no directory, mounted `huge=always`. Its pages are 2 MiB, a clone's
//!   read fault maps a whole 2 MiB page read-only, and KVM maps it to the guest as one large
//!   page; a write copies only the 4 KiB page written. On PVM a guest that read 64 MiB after
//!   restore was ready in 27 ms instead of 300 ms with 4 KiB pages, because KVM takes a slow path
//!   and prefetches nothing for every read-only 4 KiB page. A tmpfs file cannot be sealed, so
//!   workers get a read-only descriptor: their mappings are private, and writing the file
//!   through the descriptor is refused. Needs the right to mount (`CAP_SYS_ADMIN`).
//! - **A sealed memfd** otherwise: 4 KiB pages, since the kernel's own memfd mount follows
//!   `/sys/kernel/mm/transparent_hugepage/shmem_enabled`, which is `never` on these hosts.
//!   `F_SEAL_WRITE`, `F_SEAL_GROW`, `F_SEAL_SHRINK` and `F_SEAL_SEAL` make it unchangeable by
//!   anyone, thawd included.
//!
//! What is mapped from the copy: with huge pages, every 2 MiB block of guest memory that holds
//! any data (a huge page is mapped whole or not at all); with 4 KiB pages, every run of data
//! chunks. Blocks and chunks that are all zero stay the shell's anonymous memory, which reads
//! as the zero page: a read fault on a hole of a shmem file allocates a page in it, so a clone
//! reading zeroes would otherwise grow the shared copy towards the whole guest size.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use snapshot::{ChunkKind, Snapshot};
use vmm_core::memory::FileRun;

/// The page size of a copy on huge pages, and the block a clone maps whole from it.
pub const HUGE_BLOCK: u64 = 2 << 20;
/// `TMPFS_MAGIC`: the file system of both backings (memfds live on the kernel's own tmpfs).
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// The seals every memfd copy carries.
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
    /// The file could still be changed through the descriptor: neither sealed against writes
    /// nor opened read-only, or not shared memory at all.
    #[error("the decoded copy could be changed through its descriptor ({reason})")]
    Changeable {
        /// What was found.
        reason: String,
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

/// Where copies are made: see the module docs.
#[derive(Debug)]
pub enum CopyBacking {
    /// Files in a private tmpfs mount on 2 MiB pages; the descriptor is its root directory.
    HugeTmpfs(OwnedFd),
    /// Sealed memfds on 4 KiB pages.
    Memfd,
}

impl CopyBacking {
    /// A private tmpfs mount on huge pages, holding at most `limit` bytes (the host's budget
    /// for copies: the kernel then enforces it too), if this process may mount one; sealed
    /// memfds otherwise (logged).
    pub fn detect(limit: u64) -> Self {
        match huge_tmpfs(limit) {
            Ok(root) => CopyBacking::HugeTmpfs(root),
            Err(error) => {
                tracing::info!(
                    %error,
                    "no private tmpfs on huge pages (mounting needs CAP_SYS_ADMIN): decoded \
                     copies use memfds on 4 KiB pages, which guests read more slowly"
                );
                CopyBacking::Memfd
            }
        }
    }

    /// Whether copies are on huge pages.
    pub fn huge(&self) -> bool {
        matches!(self, CopyBacking::HugeTmpfs(_))
    }

    /// Host memory a copy of a snapshot of `sizes` holds at most with this backing.
    pub fn resident_upper_bound(&self, sizes: CopySizes) -> u64 {
        if self.huge() {
            sizes.huge_pages
        } else {
            sizes.small_pages
        }
    }

    /// A new, empty file for a copy, readable and writable.
    fn create(&self, name: &str) -> Result<File, CopyError> {
        match self {
            CopyBacking::HugeTmpfs(root) => {
                let fd = rustix::fs::openat(
                    root,
                    ".",
                    rustix::fs::OFlags::TMPFILE
                        | rustix::fs::OFlags::RDWR
                        | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::RUSR,
                )
                .map_err(|e| CopyError::Io {
                    step: "create",
                    source: e.into(),
                })?;
                Ok(File::from(fd))
            }
            CopyBacking::Memfd => {
                let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
                    .map_err(|e| CopyError::Io {
                        step: "create",
                        source: e.into(),
                    })?;
                Ok(File::from(fd))
            }
        }
    }

    /// Makes a written copy unchangeable: seals a memfd; reopens a tmpfs file read-only (the
    /// writable descriptor is closed, and only the read-only one is ever handed out).
    fn finish(&self, file: File) -> Result<File, CopyError> {
        match self {
            CopyBacking::HugeTmpfs(_) => {
                let path = format!("/proc/self/fd/{}", file.as_raw_fd());
                File::open(&path).map_err(io("reopen read-only"))
            }
            CopyBacking::Memfd => {
                fcntl(&file, FcntlArg::F_ADD_SEALS(required_seals())).map_err(|e| {
                    CopyError::Io {
                        step: "seal",
                        source: e.into(),
                    }
                })?;
                Ok(file)
            }
        }
    }
}

/// Host memory a decoded copy of one snapshot holds at most, by backing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopySizes {
    /// On 4 KiB pages: its data chunks.
    pub small_pages: u64,
    /// On huge pages: every 2 MiB block holding data.
    pub huge_pages: u64,
}

impl CopySizes {
    /// Of `snap`'s copy.
    pub fn of(snap: &Snapshot) -> Result<Self, CopyError> {
        Ok(Self {
            small_pages: data_chunks(snap)?.iter().map(|&(_, _, len)| len).sum(),
            huge_pages: map_runs(snap, true)?.iter().map(|r| r.len).sum(),
        })
    }
}

/// Mounts a tmpfs on huge pages, attached to no directory, for this process only.
fn huge_tmpfs(limit: u64) -> std::io::Result<OwnedFd> {
    use rustix::mount::{
        FsMountFlags, FsOpenFlags, MountAttrFlags, fsconfig_create, fsconfig_set_string, fsmount,
        fsopen,
    };
    let fs = fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_set_string(&fs, "huge", "always")?;
    fsconfig_set_string(&fs, "mode", "0700")?;
    let size = limit.div_ceil(HUGE_BLOCK).max(1) * HUGE_BLOCK;
    fsconfig_set_string(&fs, "size", size.to_string())?;
    fsconfig_create(&fs)?;
    let mount = fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_NOEXEC
            | MountAttrFlags::MOUNT_ATTR_NOSUID
            | MountAttrFlags::MOUNT_ATTR_NODEV,
    )?;
    Ok(mount)
}

/// A snapshot's guest memory, decoded, laid out flat (region after region, as the snapshot's
/// regions are ordered), in shared memory that cannot be changed through this descriptor.
/// Zero chunks are holes.
#[derive(Debug)]
pub struct DecodedCopy {
    file: File,
    ticket: CopyTicket,
    huge: bool,
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

/// The stretches of guest memory a clone takes from a copy: on huge pages every 2 MiB block
/// holding data, else every run of data chunks; adjacent stretches as one mapping (fewer
/// mappings, fewer VMAs). The rest is left out (see the module docs).
pub fn map_runs(snap: &Snapshot, huge: bool) -> Result<Vec<FileRun>, CopyError> {
    let chunks = snap.chunks();
    let mut runs: Vec<FileRun> = Vec::new();
    for (index, file_offset, len) in data_chunks(snap)? {
        let mut guest_addr = chunks[index].guest_addr;
        let (mut file_offset, mut len) = (file_offset, len);
        if huge {
            // Regions start and end on 2 MiB boundaries in guest memory and in the flat file
            // alike (the layout's regions are whole MiB multiples of 2), so a block is the same
            // in both.
            let start = guest_addr - guest_addr % HUGE_BLOCK;
            let end = (guest_addr + len).div_ceil(HUGE_BLOCK) * HUGE_BLOCK;
            file_offset -= guest_addr - start;
            guest_addr = start;
            len = end - start;
        }
        match runs.last_mut() {
            Some(last) if last.guest_addr + last.len >= guest_addr => {
                // Adjacent (or, with blocks, overlapping): one mapping. Contiguous in guest
                // memory within a region means contiguous in the file.
                let end = (guest_addr + len).max(last.guest_addr + last.len);
                last.len = end - last.guest_addr;
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
    /// Decodes every data chunk of `snap` (decrypting and authenticating each) into a new file
    /// of `backing` on all cores, then makes it unchangeable. `snap` must be open (its header,
    /// state and manifest authenticated); no byte reaches the copy unauthenticated.
    pub fn decode(snap: &Snapshot, backing: &CopyBacking) -> Result<Self, CopyError> {
        let file = backing.create(&format!("thaw-copy-{}", snap.id()))?;
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
        let file = backing.finish(file)?;
        Ok(Self {
            file,
            huge: backing.huge(),
            ticket: CopyTicket {
                snapshot_id: snap.id().0,
                mem_bytes,
            },
        })
    }

    /// Takes a copy another process decoded: refused unless the file is shared memory that
    /// cannot be changed through this descriptor (a memfd sealed against every change, or a
    /// tmpfs file opened read-only) and holds exactly the ticket's memory size.
    pub fn adopt(fd: OwnedFd, ticket: CopyTicket) -> Result<Self, CopyError> {
        let file = File::from(fd);
        let changeable = |reason: String| CopyError::Changeable { reason };
        let fs = rustix::fs::fstatfs(&file).map_err(|e| CopyError::Io {
            step: "inspect",
            source: e.into(),
        })?;
        // `f_type`'s integer type differs between architectures.
        #[allow(clippy::useless_conversion)]
        let fs_type = i64::from(fs.f_type);
        if fs_type != TMPFS_MAGIC {
            return Err(changeable(format!(
                "not shared memory (file system {:#x})",
                fs.f_type
            )));
        }
        let read_only = rustix::fs::fcntl_getfl(&file)
            .map(|flags| flags & rustix::fs::OFlags::RWMODE == rustix::fs::OFlags::RDONLY)
            .unwrap_or(false);
        // A file that cannot be sealed (a tmpfs file) reports its seals as F_SEAL_SEAL alone.
        let seals = fcntl(&file, FcntlArg::F_GET_SEALS).unwrap_or(0);
        let need = required_seals().bits();
        if !read_only && seals & need != need {
            return Err(changeable(format!(
                "opened for writing, seals {seals:#x} instead of {need:#x}"
            )));
        }
        let found = file.metadata().map_err(io("inspect"))?.len();
        if found != ticket.mem_bytes {
            return Err(CopyError::Size {
                expected: ticket.mem_bytes,
                found,
            });
        }
        // Only a memfd is sealed; the huge backing hands out read-only tmpfs files.
        let huge = seals & need != need;
        Ok(Self { file, ticket, huge })
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

    /// Whether it is on huge pages: a clone then maps whole 2 MiB blocks ([`map_runs`]).
    pub fn huge(&self) -> bool {
        self.huge
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
pub(crate) mod tests {
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

    fn reopen_read_only(f: &File) -> File {
        File::open(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap()
    }

    /// A plaintext snapshot at `path` of `memory` (one region at guest address 0), opened.
    pub(crate) fn plaintext_snapshot(path: &std::path::Path, memory: &[u8]) -> Snapshot {
        use snapshot::{Fingerprint, MemoryRegion, Protection, SnapshotMeta, WriteOptions};
        let meta = SnapshotMeta {
            fingerprint: Fingerprint::of_this_host(Vec::new(), "pvm"),
            vcpus: 1,
        };
        let region = [MemoryRegion {
            guest_addr: 0,
            bytes: memory,
        }];
        snapshot::write(
            path,
            &meta,
            b"state",
            &region,
            &Protection::InsecurePlaintext,
            &WriteOptions::default(),
        )
        .unwrap();
        Snapshot::open(path, None).unwrap()
    }

    /// 6 MiB of memory: MiB 0 and 5 data, the rest zero.
    fn snapshot(dir: &std::path::Path) -> Snapshot {
        let mut memory = vec![0u8; 6 << 20];
        memory[..1 << 20].fill(3);
        memory[5 << 20..].fill(5);
        plaintext_snapshot(&dir.join("snap"), &memory)
    }

    #[test]
    fn adopt_refuses_an_unsealed_writable_file() {
        let f = memfd(4096);
        let e = DecodedCopy::adopt(f.into(), ticket(4096)).unwrap_err();
        assert!(matches!(e, CopyError::Changeable { .. }), "{e}");
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
        assert!(matches!(e, CopyError::Changeable { .. }), "{e}");
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
    fn adopt_refuses_a_file_that_is_not_shared_memory() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let f = File::open(&path).unwrap();
        let fs = rustix::fs::fstatfs(&f).unwrap();
        #[allow(clippy::useless_conversion)]
        let fs_type = i64::from(fs.f_type);
        if fs_type == TMPFS_MAGIC {
            return; // the target directory is on tmpfs here: nothing to test
        }
        let e = DecodedCopy::adopt(f.into(), ticket(4096)).unwrap_err();
        assert!(matches!(e, CopyError::Changeable { .. }), "{e}");
    }

    #[test]
    fn a_read_only_descriptor_of_shared_memory_is_adopted() {
        let f = memfd(4096);
        let copy = DecodedCopy::adopt(reopen_read_only(&f).into(), ticket(4096)).unwrap();
        assert!(copy.file().write_all_at(b"x", 0).is_err());
        assert!(
            copy.huge(),
            "an unsealed read-only file is the huge backing's"
        );
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
        assert!(!copy.huge());
    }

    #[test]
    fn both_backings_hold_the_decoded_memory_and_cannot_be_written() {
        let dir = tempfile::tempdir().unwrap();
        let snap = snapshot(dir.path());
        let mut backings = vec![CopyBacking::Memfd];
        match huge_tmpfs(64 << 20) {
            Ok(root) => backings.push(CopyBacking::HugeTmpfs(root)),
            Err(e) => println!("no huge tmpfs here ({e}): testing the memfd backing only"),
        }
        for backing in &backings {
            let copy = DecodedCopy::decode(&snap, backing).unwrap();
            assert_eq!(copy.huge(), backing.huge());
            let mut bytes = vec![0u8; 6 << 20];
            copy.file().read_exact_at(&mut bytes, 0).unwrap();
            assert!(bytes[..1 << 20].iter().all(|&b| b == 3), "{backing:?}");
            assert!(
                bytes[1 << 20..5 << 20].iter().all(|&b| b == 0),
                "{backing:?}"
            );
            assert!(bytes[5 << 20..].iter().all(|&b| b == 5), "{backing:?}");
            assert!(copy.file().write_all_at(b"x", 0).is_err(), "{backing:?}");
            let bound = backing.resident_upper_bound(CopySizes::of(&snap).unwrap());
            assert!(copy.resident_bytes() <= bound, "{backing:?}");
            copy.check_matches(&snap).unwrap();
            // What a worker receives: the same descriptor, adopted.
            let fd = copy.fd().try_clone_to_owned().unwrap();
            let adopted = DecodedCopy::adopt(fd, copy.ticket()).unwrap();
            assert_eq!(adopted.huge(), backing.huge());
        }
    }

    #[test]
    fn clones_map_data_runs_or_whole_huge_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let snap = snapshot(dir.path());
        let small = map_runs(&snap, false).unwrap();
        assert_eq!(
            small,
            vec![
                FileRun {
                    guest_addr: 0,
                    len: 1 << 20,
                    file_offset: 0
                },
                FileRun {
                    guest_addr: 5 << 20,
                    len: 1 << 20,
                    file_offset: 5 << 20
                },
            ]
        );
        let huge = map_runs(&snap, true).unwrap();
        assert_eq!(
            huge,
            vec![
                FileRun {
                    guest_addr: 0,
                    len: 2 << 20,
                    file_offset: 0
                },
                FileRun {
                    guest_addr: 4 << 20,
                    len: 2 << 20,
                    file_offset: 4 << 20
                },
            ]
        );
        let sizes = CopySizes::of(&snap).unwrap();
        assert_eq!(sizes.small_pages, 2 << 20);
        assert_eq!(sizes.huge_pages, 4 << 20);
    }
}

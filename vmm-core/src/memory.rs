//! Guest RAM: anonymous, `MAP_NORESERVE` mappings laid out around the 32-bit MMIO gap, and their
//! registration as KVM memory slots.
//!
//! `MAP_NORESERVE` matters: a 10 GiB guest costs nothing until it touches its pages, which is
//! what lets a restore page memory in lazily later.
//!
//! Anonymous guest RAM is advised `MADV_HUGEPAGE` (as Cloud Hypervisor does by default): a
//! first touch then costs one fault per 2 MiB instead of 512, and KVM can map the guest with
//! large pages. On this project's PVM host a 4 KiB first-touch fault costs about 3.4 µs, so
//! filling 256 MiB page by page spends over 200 ms in faults; with huge pages about 40 ms.
//! Pages installed through userfaultfd stay 4 KiB; the advice only costs them nothing.
//!
//! This module hands out addresses ([`host_ranges`]) but no slices: reading guest RAM in place
//! is sound only while nothing writes it, which is known to a pause guard
//! ([`crate::machine::Paused::memory`]) and to a shell that has never run
//! ([`crate::machine::MachineShell::ram_mut`]), so the slices come from there.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::layout::{FIRST_ADDR_PAST_32BITS, MMIO_GAP_START};

/// The guest's physical memory as this process maps it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// Guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused the mapping.
    #[error("cannot map {size} bytes of guest memory at guest address {start:#x}")]
    Map {
        /// Guest-physical start of the region.
        start: u64,
        /// Its size.
        size: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The regions overlap or are out of order (a bug in the layout).
    #[error("invalid guest memory layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    /// A region does not fit a KVM slot's bounds.
    #[error("guest memory region at {start:#x} is not addressable by this host")]
    RegionTooLarge {
        /// Guest-physical start of the region.
        start: u64,
    },
    /// A stretch of memory to take from a file is not page-aligned or not inside one RAM region.
    #[error(
        "cannot overlay {len} bytes at guest address {guest_addr:#x} (file offset {file_offset:#x}): {reason}"
    )]
    OverlayOutside {
        /// Guest-physical start of the stretch.
        guest_addr: u64,
        /// Its length.
        len: u64,
        /// Where it starts in the file.
        file_offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The host refused to map the file over guest memory.
    #[error("cannot map the file over {len} bytes of guest memory at {guest_addr:#x}")]
    Overlay {
        /// Guest-physical start of the stretch.
        guest_addr: u64,
        /// Its length.
        len: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused a memory slot.
    #[error("KVM refused memory slot {slot} (guest {start:#x}, {size} bytes)")]
    KvmSlot {
        /// The slot.
        slot: u32,
        /// Guest-physical start.
        start: u64,
        /// Size in bytes.
        size: u64,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The guest-physical RAM ranges for a guest with `mem_bytes` of memory: everything below the
/// MMIO gap first, the rest from 4 GiB up.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    let low = mem_bytes.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if mem_bytes > low {
        ranges.push((GuestAddress(FIRST_ADDR_PAST_32BITS), mem_bytes - low));
    }
    ranges
}

/// Asks for transparent huge pages on a fresh anonymous mapping. Only advice: a host without
/// THP (or with it disabled) keeps 4 KiB pages, which is logged and otherwise fine.
fn advise_huge_pages(addr: *mut u8, len: usize) {
    // SAFETY: [addr, addr + len) is a mapping this module just created and owns; MADV_HUGEPAGE
    // changes only how the kernel backs it, never its contents or validity.
    let rc = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "MADV_HUGEPAGE refused; guest memory uses 4 KiB pages"
        );
    }
}

/// Maps every RAM range of a `mem_bytes` guest with `map(start, size, len, offset)`, where
/// `offset` is where the range starts when the ranges are laid out flat, one after another.
fn map_ram(
    mem_bytes: u64,
    mut map: impl FnMut(u64, u64, usize, u64) -> Result<vm_memory::mmap::MmapRegion, MemoryError>,
) -> Result<GuestMemory, MemoryError> {
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, size) in ram_ranges(mem_bytes) {
        let too_large = || MemoryError::RegionTooLarge {
            start: start.raw_value(),
        };
        let len = usize::try_from(size).map_err(|_| too_large())?;
        let mapping = map(start.raw_value(), size, len, offset)?;
        offset += size;
        regions.push(GuestRegionMmap::new(mapping, start).ok_or_else(too_large)?);
    }
    GuestMemory::from_regions(regions).map_err(MemoryError::Layout)
}

/// Maps anonymous, private, unreserved memory for every RAM range.
pub fn create_guest_memory(mem_bytes: u64) -> Result<GuestMemory, MemoryError> {
    map_ram(mem_bytes, |start, size, len, _| {
        let mapping = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryError::Map {
                start,
                size,
                source,
            })?;
        advise_huge_pages(mapping.as_ptr(), mapping.size());
        Ok(mapping)
    })
}

/// Maps `file` — guest memory laid out flat, region after region, as
/// [`create_guest_memory`] lays out `mem_bytes` — privately: pages are read from the file on
/// first touch and copied on first write, never written back. This is Firecracker's `File`
/// memory backend, kept as a baseline for Thaw's own restore.
pub fn map_file_private(file: &std::fs::File, mem_bytes: u64) -> Result<GuestMemory, MemoryError> {
    use vm_memory::FileOffset;
    map_ram(mem_bytes, |start, size, len, offset| {
        let map_error = |source| MemoryError::Map {
            start,
            size,
            source,
        };
        let clone = file
            .try_clone()
            .map_err(|e| map_error(vm_memory::mmap::MmapRegionError::Mmap(e)))?;
        MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::new(clone, offset))
            .build()
            .map_err(map_error)
    })
}

/// One stretch of guest RAM taken from a file: `len` bytes at guest-physical `guest_addr` read
/// from `file_offset` on. All three are multiples of the 4 KiB page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileRun {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Bytes.
    pub len: u64,
    /// Where the bytes start in the file.
    pub file_offset: u64,
}

const PAGE: u64 = 4096;

/// Where `run` lives in this process: the host address of its first byte, after checking it
/// is page-aligned and inside one region of `memory`.
fn overlay_target(memory: &GuestMemory, run: &FileRun) -> Result<*mut u8, MemoryError> {
    let refuse = |reason| MemoryError::OverlayOutside {
        guest_addr: run.guest_addr,
        len: run.len,
        file_offset: run.file_offset,
        reason,
    };
    if run.len == 0 || (run.guest_addr | run.len | run.file_offset) % PAGE != 0 {
        return Err(refuse("not whole pages"));
    }
    let end = run
        .guest_addr
        .checked_add(run.len)
        .ok_or(refuse("past the end of the address space"))?;
    raw_regions(memory)
        .find(|&(start, _, len)| run.guest_addr >= start && end <= start + len as u64)
        .map(|(start, host, _)| host.wrapping_add((run.guest_addr - start) as usize))
        .ok_or(refuse("not inside one RAM region"))
}

/// Replaces each stretch of `memory` named in `runs` by a private mapping of `file`: pages are
/// read from the file on first touch and copied on first write, and this process's writes
/// never reach the file (copy-on-write, as `MAP_PRIVATE` gives). Many machines mapping one file
/// this way share every page none of them has written. The rest of `memory` stays what it
/// was (anonymous memory reads as zero).
///
/// Only for memory nothing else holds a reference into and no vCPU has run on (the pages
/// under the runs are discarded): a shell that never ran
/// ([`crate::machine::MachineShell::overlay_private`]). The KVM memory slots stay as they are:
/// they name host addresses, and the addresses do not change.
pub(crate) fn overlay_private(
    memory: &GuestMemory,
    file: &std::fs::File,
    runs: &[FileRun],
) -> Result<(), MemoryError> {
    use std::os::fd::AsRawFd;
    let targets = runs
        .iter()
        .map(|run| overlay_target(memory, run))
        .collect::<Result<Vec<_>, _>>()?;
    for (run, host) in runs.iter().zip(targets) {
        let failed = |source| MemoryError::Overlay {
            guest_addr: run.guest_addr,
            len: run.len,
            source,
        };
        let len = usize::try_from(run.len)
            .map_err(|_| failed(std::io::ErrorKind::InvalidInput.into()))?;
        let offset = libc::off_t::try_from(run.file_offset)
            .map_err(|_| failed(std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: [host, host + len) lies inside one mapping `memory` owns (overlay_target
        // checked it against the regions), so MAP_FIXED replaces only pages of that mapping and
        // never another object's; the caller guarantees nothing references those pages (see
        // the doc comment), and the region's eventual munmap covers the new mapping too, since
        // it spans the same addresses. The file descriptor is valid for the call.
        let mapped = unsafe {
            libc::mmap(
                host.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                offset,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(failed(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Hands every region of `memory` to KVM as a memory slot, numbered in address order.
pub fn register_with_kvm(vm: &VmFd, memory: &GuestMemory) -> Result<(), MemoryError> {
    for (slot, region) in memory.iter().enumerate() {
        let start = region.start_addr().raw_value();
        let size = region.len();
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(|_| MemoryError::RegionTooLarge { start })?;
        let slot = u32::try_from(slot).map_err(|_| MemoryError::RegionTooLarge { start })?;
        let region_desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: start,
            memory_size: size,
            userspace_addr: host as u64,
        };
        // SAFETY: the host range [host, host + size) is a live mapping owned by `memory`, and the
        // caller keeps `memory` alive for as long as `vm` exists (the machine owns both and drops
        // the VM first), so KVM never sees a dangling mapping.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(|source| {
            MemoryError::KvmSlot {
                slot,
                start,
                size,
                source,
            }
        })?;
    }
    Ok(())
}

/// Total bytes of RAM in `memory`.
pub fn total_bytes(memory: &GuestMemory) -> u64 {
    memory.iter().map(|r| r.len()).sum()
}

/// The end (exclusive) of RAM below the MMIO gap.
pub fn low_ram_end(memory: &GuestMemory) -> u64 {
    memory
        .iter()
        .filter(|r| r.start_addr().raw_value() < MMIO_GAP_START)
        .map(|r| r.start_addr().raw_value() + r.len())
        .max()
        .unwrap_or(0)
}

/// Whether `[start, start + len)` is entirely RAM.
pub fn is_ram(memory: &GuestMemory, start: u64, len: u64) -> bool {
    let Some(end) = start.checked_add(len) else {
        return false;
    };
    memory.iter().any(|r| {
        let r_start = r.start_addr().raw_value();
        start >= r_start && end <= r_start + r.len()
    })
}

/// Where one RAM region lives: its guest-physical start and the host mapping that backs it.
/// Addresses only, no access: for registering the mapping with userfaultfd (a lazy restore's
/// page server) and for reporting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostRange {
    /// Guest-physical start of the region.
    pub guest_addr: u64,
    /// Host virtual address of its first byte.
    pub host_addr: usize,
    /// Its size in bytes.
    pub len: usize,
}

/// Each RAM region of `memory` as a [`HostRange`], in address order.
pub fn host_ranges(memory: &GuestMemory) -> Vec<HostRange> {
    raw_regions(memory)
        .map(|(guest_addr, host, len)| HostRange {
            guest_addr,
            host_addr: host as usize,
            len,
        })
        .collect()
}

/// Each RAM region as `(guest address, host pointer, length)`: the mapping `memory` keeps alive.
/// Turning these into slices is for the two places that know nothing else touches the bytes:
/// a pause guard ([`crate::machine::Paused::memory`]) and a shell that never ran
/// ([`crate::machine::MachineShell::ram_mut`]).
pub(crate) fn raw_regions(memory: &GuestMemory) -> impl Iterator<Item = (u64, *mut u8, usize)> {
    memory
        .iter()
        .map(|r| (r.start_addr().raw_value(), r.as_ptr(), r.size()))
}

/// Keeps guest memory mapped without giving any access to it: for code that writes the memory
/// through raw addresses (a page server, through userfaultfd) and must not see it unmapped
/// before it stops.
pub struct MappingHold {
    _memory: GuestMemory,
}

impl MappingHold {
    pub(crate) fn new(memory: GuestMemory) -> Self {
        Self { _memory: memory }
    }
}

impl std::fmt::Debug for MappingHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappingHold")
            .field("bytes", &total_bytes(&self._memory))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_low_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_guest_splits_around_mmio_gap() {
        let ten_gib = 10u64 << 30;
        let ranges = ram_ranges(ten_gib);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(ranges[1].0, GuestAddress(FIRST_ADDR_PAST_32BITS));
        assert_eq!(ranges[0].1 + ranges[1].1, ten_gib);
    }

    #[test]
    fn ten_gib_guest_maps_without_reserving() {
        let mem = create_guest_memory(10 << 30).unwrap();
        assert_eq!(total_bytes(&mem), 10 << 30);
        assert_eq!(low_ram_end(&mem), MMIO_GAP_START);
        assert!(is_ram(&mem, 0, 4096));
        assert!(!is_ram(&mem, MMIO_GAP_START, 1));
        assert!(is_ram(&mem, FIRST_ADDR_PAST_32BITS, 4096));
        assert!(!is_ram(&mem, u64::MAX, 2));
    }

    #[test]
    fn host_ranges_describe_every_region_in_order() {
        let mem = create_guest_memory(10 << 30).unwrap();
        let ranges = host_ranges(&mem);
        assert_eq!(ranges.len(), 2);
        for (range, (start, size)) in ranges.iter().zip(ram_ranges(10 << 30)) {
            assert_eq!(range.guest_addr, start.raw_value());
            assert_eq!(range.len as u64, size);
            assert_eq!(
                range.host_addr,
                mem.get_host_address(start).unwrap() as usize,
                "{range:?}"
            );
        }
        let held = MappingHold::new(mem.clone());
        drop(mem);
        assert!(format!("{held:?}").contains(&(10u64 << 30).to_string()));
    }

    fn file_of(bytes: &[u8]) -> std::fs::File {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn overlay_reads_the_file_and_keeps_writes_private() {
        use std::io::{Read, Seek};
        let mem = create_guest_memory(1 << 20).unwrap();
        let mut contents = vec![0u8; 3 * 4096];
        contents[..4096].fill(7);
        contents[4096..].fill(9);
        let mut file = file_of(&contents);
        let runs = [FileRun {
            guest_addr: 2 * 4096,
            len: 2 * 4096,
            file_offset: 4096,
        }];
        overlay_private(&mem, &file, &runs).unwrap();
        let (_, host, _) = raw_regions(&mem).next().unwrap();
        // SAFETY: the test owns `mem` and nothing else touches it.
        let ram = unsafe { std::slice::from_raw_parts_mut(host, 1 << 20) };
        assert!(ram[..2 * 4096].iter().all(|&b| b == 0), "left alone");
        assert!(
            ram[2 * 4096..4 * 4096].iter().all(|&b| b == 9),
            "from the file"
        );
        assert!(ram[4 * 4096..].iter().all(|&b| b == 0));
        ram[2 * 4096] = 1;
        assert_eq!(ram[2 * 4096], 1);
        let mut back = Vec::new();
        file.rewind().unwrap();
        file.read_to_end(&mut back).unwrap();
        assert_eq!(back, contents, "the write stayed in this mapping");
    }

    #[test]
    fn overlay_refuses_stretches_that_are_not_whole_pages_inside_ram() {
        let mem = create_guest_memory(1 << 20).unwrap();
        let file = file_of(&[1u8; 8192]);
        let bad = [
            FileRun {
                guest_addr: 100,
                len: 4096,
                file_offset: 0,
            },
            FileRun {
                guest_addr: 0,
                len: 100,
                file_offset: 0,
            },
            FileRun {
                guest_addr: 0,
                len: 4096,
                file_offset: 1,
            },
            FileRun {
                guest_addr: 0,
                len: 0,
                file_offset: 0,
            },
            FileRun {
                guest_addr: (1 << 20) - 4096,
                len: 8192,
                file_offset: 0,
            },
            FileRun {
                guest_addr: u64::MAX - 4095,
                len: 8192,
                file_offset: 0,
            },
        ];
        for run in bad {
            let e = overlay_private(&mem, &file, &[run]).unwrap_err();
            assert!(
                matches!(e, MemoryError::OverlayOutside { .. }),
                "{run:?}: {e}"
            );
        }
    }
}

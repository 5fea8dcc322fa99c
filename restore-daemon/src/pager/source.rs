//! Where the page server's bytes come from: the [`PageSource`] trait, the checked
//! [`ChunkLayout`] every source describes itself with, the sealed local snapshot
//! ([`SnapshotSource`]) and plaintext memory held in this process ([`MemorySource`]).

use std::sync::Arc;

use snapshot::{ChunkKind, Snapshot};

use super::error::{LayoutError, SourceError};

/// The granularity of userfaultfd installs and of the removed record (the format's elision page
/// and the host page are both 4 KiB).
pub(super) const PAGE: usize = 4096;

/// Where guest memory's bytes come from, one chunk at a time.
///
/// The source decides the layout (chunk size, regions, which chunks are elided zeros); the
/// page server decides when each chunk is needed. [`PageSource::fill_chunk`] is called from
/// several installer threads at once (the fault thread, the background thread, callers of
/// `install_all`), at most once per chunk over a server's life, and never for a chunk the
/// layout marks zero. It blocks its thread until the chunk is there: a guest vCPU may be
/// waiting on it. Whatever it writes is copied into guest memory as is, so a source over
/// untrusted storage must authenticate every chunk before it returns `Ok`.
pub trait PageSource: Send + Sync {
    /// The chunk layout; the same on every call.
    fn layout(&self) -> &ChunkLayout;

    /// Fills `buf` (exactly chunk `index`'s length) with the chunk's bytes, or says it is all
    /// zeros (the contents of `buf` are then ignored). `index` is below the layout's chunk
    /// count.
    fn fill_chunk(&self, index: usize, buf: &mut [u8]) -> Result<Fill, SourceError>;

    /// Allocates whatever [`PageSource::fill_chunk`] needs on the calling thread, ahead of its
    /// first chunk: each server thread calls it when it starts, before the guest runs.
    fn prepare_thread(&self) {}
}

/// What [`PageSource::fill_chunk`] delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// The buffer holds the chunk.
    Data,
    /// The chunk is all zeros; the server maps zero pages.
    Zero,
}

/// A region of guest memory as the source lays it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceRegion {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A chunk as the source lays it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceChunk {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: usize,
    /// Elided: all zeros, installed as zero pages without asking the source.
    pub zero: bool,
}

/// A source's chunk layout, checked: each region (a whole number of 4 KiB pages) is cut into
/// `chunk_size` pieces from its start, the last possibly shorter, and the chunks are listed in
/// region order. The page server relies on this to find a fault's chunk by arithmetic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkLayout {
    chunk_size: usize,
    regions: Vec<SourceRegion>,
    chunks: Vec<SourceChunk>,
}

impl ChunkLayout {
    /// Checks `chunks` against `regions` cut into `chunk_size` pieces.
    pub fn new(
        chunk_size: usize,
        regions: Vec<SourceRegion>,
        chunks: Vec<SourceChunk>,
    ) -> Result<ChunkLayout, LayoutError> {
        if chunk_size == 0 || chunk_size % PAGE != 0 {
            return Err(LayoutError::ChunkSize { chunk_size });
        }
        let mut expected = 0;
        for r in &regions {
            let bad = || LayoutError::Region {
                guest_addr: r.guest_addr,
                len: r.len,
            };
            let len = usize::try_from(r.len).map_err(|_| bad())?;
            if len % PAGE != 0 || r.guest_addr.checked_add(r.len).is_none() {
                return Err(bad());
            }
            for off in (0..len).step_by(chunk_size) {
                let index = expected;
                expected += 1;
                // `off < len`, so the address cannot overflow (checked above).
                let expected_addr = r.guest_addr + off as u64;
                let expected_len = chunk_size.min(len - off);
                let Some(c) = chunks.get(index) else {
                    continue;
                };
                if c.guest_addr != expected_addr || c.len != expected_len {
                    return Err(LayoutError::ChunkMisplaced {
                        index,
                        guest_addr: c.guest_addr,
                        len: c.len,
                        expected_addr,
                        expected_len,
                    });
                }
            }
        }
        if chunks.len() != expected {
            return Err(LayoutError::ChunkCount {
                chunks: chunks.len(),
                expected,
            });
        }
        Ok(ChunkLayout {
            chunk_size,
            regions,
            chunks,
        })
    }

    /// The layout of `regions` cut into `chunk_size` pieces, with chunk `i` elided where
    /// `zero(i)`.
    pub fn cut(
        chunk_size: usize,
        regions: Vec<SourceRegion>,
        mut zero: impl FnMut(usize) -> bool,
    ) -> Result<ChunkLayout, LayoutError> {
        let mut chunks = Vec::new();
        if chunk_size > 0 {
            for r in &regions {
                let len = usize::try_from(r.len).map_err(|_| LayoutError::Region {
                    guest_addr: r.guest_addr,
                    len: r.len,
                })?;
                for off in (0..len).step_by(chunk_size) {
                    chunks.push(SourceChunk {
                        guest_addr: r.guest_addr.wrapping_add(off as u64),
                        len: chunk_size.min(len - off),
                        zero: zero(chunks.len()),
                    });
                }
            }
        }
        // `new` checks what this could not (page multiples, overflow, the chunk size).
        ChunkLayout::new(chunk_size, regions, chunks)
    }

    /// Bytes per chunk (the last of a region may be shorter).
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// The regions, in order.
    pub fn regions(&self) -> &[SourceRegion] {
        &self.regions
    }

    /// The chunks, region by region.
    pub fn chunks(&self) -> &[SourceChunk] {
        &self.chunks
    }
}

/// A sealed local snapshot: elided chunks come from its manifest, and every other chunk is
/// read, authenticated (AEAD tag, or the plaintext mode's BLAKE3 tag) and decompressed by
/// [`Snapshot::read_chunk_authenticated`] before its bytes are handed over. Whether the
/// restore also authenticated every chunk up front (`ChunkCheck`) does not change this.
pub struct SnapshotSource {
    snapshot: Arc<Snapshot>,
    layout: ChunkLayout,
}

impl SnapshotSource {
    /// Serves `snapshot`'s memory; refuses a manifest whose chunks are not laid out as the
    /// page server needs.
    pub fn new(snapshot: Arc<Snapshot>) -> Result<SnapshotSource, LayoutError> {
        let chunk_size = snapshot.chunk_size() as usize;
        let regions = snapshot
            .regions()
            .iter()
            .map(|r| SourceRegion {
                guest_addr: r.guest_addr,
                len: r.size,
            })
            .collect();
        let chunks = snapshot
            .chunks()
            .iter()
            .map(|c| SourceChunk {
                guest_addr: c.guest_addr,
                len: c.len as usize,
                zero: c.kind == ChunkKind::Zero,
            })
            .collect();
        let layout = ChunkLayout::new(chunk_size, regions, chunks)?;
        Ok(SnapshotSource { snapshot, layout })
    }

    /// The snapshot served.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }
}

impl PageSource for SnapshotSource {
    fn layout(&self) -> &ChunkLayout {
        &self.layout
    }

    fn prepare_thread(&self) {
        self.snapshot.prepare_decoding_thread();
    }

    fn fill_chunk(&self, index: usize, buf: &mut [u8]) -> Result<Fill, SourceError> {
        if self.layout.chunks.get(index).is_some_and(|c| c.zero) {
            return Ok(Fill::Zero);
        }
        match self.snapshot.read_chunk_authenticated(index, buf) {
            Ok(()) => Ok(Fill::Data),
            Err(e @ snapshot::ReadError::ChunkTampered { .. }) => {
                Err(SourceError::Unauthentic(Box::new(e)))
            }
            Err(e) => Err(SourceError::Unavailable(Box::new(e))),
        }
    }
}

/// Plaintext guest memory held in this process (for tests, and the shape of a shared decoded
/// copy): chunks that are all zeros are elided. Nothing is authenticated, so its bytes must
/// already be trusted.
pub struct MemorySource {
    layout: ChunkLayout,
    /// Each region's bytes, in layout order.
    bytes: Vec<Vec<u8>>,
    /// For each chunk, its region and offset in it.
    at: Vec<(usize, usize)>,
}

impl MemorySource {
    /// Memory made of `regions` (guest address, bytes), cut into `chunk_size` chunks.
    pub fn new(chunk_size: usize, regions: Vec<(u64, Vec<u8>)>) -> Result<Self, LayoutError> {
        let mut at = Vec::new();
        for (r, (_, bytes)) in regions.iter().enumerate() {
            if chunk_size > 0 {
                at.extend((0..bytes.len()).step_by(chunk_size).map(|off| (r, off)));
            }
        }
        let descs = regions
            .iter()
            .map(|(guest_addr, bytes)| SourceRegion {
                guest_addr: *guest_addr,
                len: bytes.len() as u64,
            })
            .collect();
        let bytes: Vec<Vec<u8>> = regions.into_iter().map(|(_, b)| b).collect();
        let chunk = |i: usize| {
            let (r, off) = at.get(i).copied()?;
            let b = bytes.get(r)?;
            b.get(off..b.len().min(off + chunk_size))
        };
        let layout = ChunkLayout::cut(chunk_size, descs, |i| {
            chunk(i).is_some_and(snapshot::is_zero)
        })?;
        Ok(MemorySource { layout, bytes, at })
    }
}

impl PageSource for MemorySource {
    fn layout(&self) -> &ChunkLayout {
        &self.layout
    }

    fn fill_chunk(&self, index: usize, buf: &mut [u8]) -> Result<Fill, SourceError> {
        let bytes = self
            .at
            .get(index)
            .and_then(|&(r, off)| self.bytes.get(r)?.get(off..off + buf.len()));
        match bytes {
            Some(b) => {
                buf.copy_from_slice(b);
                Ok(Fill::Data)
            }
            None => Err(SourceError::Unavailable(
                format!("chunk {index} of {} bytes is not in memory", buf.len()).into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(guest_addr: u64, len: u64) -> SourceRegion {
        SourceRegion { guest_addr, len }
    }

    #[test]
    fn regions_are_cut_into_chunks_from_each_region_start() {
        let layout = ChunkLayout::cut(
            3 * PAGE,
            vec![region(0, 7 * PAGE as u64), region(1 << 32, 3 * PAGE as u64)],
            |i| i == 1,
        )
        .unwrap();
        let got: Vec<(u64, usize, bool)> = layout
            .chunks()
            .iter()
            .map(|c| (c.guest_addr, c.len, c.zero))
            .collect();
        let p = PAGE as u64;
        assert_eq!(
            got,
            vec![
                (0, 3 * PAGE, false),
                (3 * p, 3 * PAGE, true),
                (6 * p, PAGE, false),
                (1 << 32, 3 * PAGE, false),
            ]
        );
    }

    #[test]
    fn a_chunk_out_of_place_is_refused() {
        let regions = vec![region(0, 4 * PAGE as u64)];
        let chunks = vec![
            SourceChunk {
                guest_addr: 0,
                len: 2 * PAGE,
                zero: false,
            },
            SourceChunk {
                guest_addr: PAGE as u64,
                len: 2 * PAGE,
                zero: false,
            },
        ];
        match ChunkLayout::new(2 * PAGE, regions, chunks) {
            Err(LayoutError::ChunkMisplaced {
                index: 1,
                expected_addr,
                ..
            }) => assert_eq!(expected_addr, 2 * PAGE as u64),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn too_few_or_too_many_chunks_are_refused() {
        let regions = vec![region(0, 4 * PAGE as u64)];
        let one = SourceChunk {
            guest_addr: 0,
            len: 2 * PAGE,
            zero: false,
        };
        match ChunkLayout::new(2 * PAGE, regions.clone(), vec![one]) {
            Err(LayoutError::ChunkCount {
                chunks: 1,
                expected: 2,
            }) => {}
            other => panic!("{other:?}"),
        }
        let extra = SourceChunk {
            guest_addr: 4 * PAGE as u64,
            ..one
        };
        let two = SourceChunk {
            guest_addr: 2 * PAGE as u64,
            ..one
        };
        match ChunkLayout::new(2 * PAGE, regions, vec![one, two, extra]) {
            Err(LayoutError::ChunkCount {
                chunks: 3,
                expected: 2,
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn chunk_sizes_and_regions_that_are_not_whole_pages_are_refused() {
        for size in [0, PAGE + 1] {
            assert!(matches!(
                ChunkLayout::cut(size, vec![region(0, PAGE as u64)], |_| false),
                Err(LayoutError::ChunkSize { .. })
            ));
        }
        assert!(matches!(
            ChunkLayout::cut(PAGE, vec![region(0, PAGE as u64 + 1)], |_| false),
            Err(LayoutError::Region { .. })
        ));
        assert!(matches!(
            ChunkLayout::cut(PAGE, vec![region(u64::MAX - 4095, PAGE as u64)], |_| false),
            Err(LayoutError::Region { .. })
        ));
    }

    #[test]
    fn memory_elides_zero_chunks_and_fills_the_others() {
        let mut bytes = vec![0u8; 6 * PAGE];
        bytes[4 * PAGE + 7] = 9;
        let source = MemorySource::new(2 * PAGE, vec![(0x1000_0000, bytes.clone())]).unwrap();
        let zero: Vec<bool> = source.layout().chunks().iter().map(|c| c.zero).collect();
        assert_eq!(zero, vec![true, true, false]);
        let mut buf = vec![0xffu8; 2 * PAGE];
        assert_eq!(source.fill_chunk(2, &mut buf).unwrap(), Fill::Data);
        assert_eq!(buf, bytes[4 * PAGE..]);
        assert!(matches!(
            source.fill_chunk(3, &mut buf),
            Err(SourceError::Unavailable(_))
        ));
    }
}

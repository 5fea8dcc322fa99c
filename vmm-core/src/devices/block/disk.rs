//! What a block device reads and writes: a host file as it is ([`RawDisk`]), or a shared base
//! image with this environment's own writes kept apart ([`CowDisk`]), so that clones restored
//! from one snapshot share its disk and none sees another's writes, nor changes the base.
//!
//! The copy-on-write unit is [`COW_BLOCK`] (4 KiB, a guest page and the usual filesystem
//! block): the first write to a block copies it from the base into the overlay (unless the
//! write covers it whole) and marks it; reads take each block from the overlay if marked, else
//! from the base. The overlay is a sparse file of the disk's size, so a clone costs the disk
//! space of the blocks it wrote; an unnamed one (`O_TMPFILE`) vanishes with its environment.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The copy-on-write unit, bytes.
pub const COW_BLOCK: u64 = 4096;

/// A disk's bytes, at byte offsets the caller has checked against [`Disk::len`].
pub trait Disk: Send {
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes what was written durable (as far as the disk's kind promises).
    fn flush(&mut self) -> io::Result<()>;
}

/// A host file, read and written in place.
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    len: u64,
}

impl RawDisk {
    /// `file` as a disk of its current length.
    pub fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self { file, len })
    }
}

impl Disk for RawDisk {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// A base image shared read-only, and this disk's own writes in an overlay (see the module
/// docs).
#[derive(Debug)]
pub struct CowDisk {
    base: File,
    overlay: File,
    len: u64,
    /// One bit per [`COW_BLOCK`]: set once the block lives in the overlay.
    written: Vec<u64>,
    /// One block, for the copy a partial first write makes.
    scratch: Vec<u8>,
}

impl CowDisk {
    /// A disk reading `base` until it writes: `overlay` (empty, writable, private to this
    /// disk) takes its writes and is sized to `base`'s length here.
    pub fn new(base: File, overlay: File) -> io::Result<Self> {
        let len = base.metadata()?.len();
        overlay.set_len(len)?;
        let blocks = len.div_ceil(COW_BLOCK);
        Ok(Self {
            base,
            overlay,
            len,
            written: vec![0; blocks.div_ceil(64) as usize],
            scratch: vec![0; COW_BLOCK as usize],
        })
    }

    /// [`CowDisk::new`] with an unnamed overlay in `dir` (gone when the disk is dropped, or its
    /// process dies).
    pub fn with_private_overlay(base: File, dir: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let overlay = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(dir)?;
        Self::new(base, overlay)
    }

    /// Blocks written so far (each holds [`COW_BLOCK`] bytes of the overlay).
    pub fn blocks_written(&self) -> u64 {
        self.written.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    fn is_written(&self, block: u64) -> bool {
        self.written[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn mark(&mut self, block: u64) {
        self.written[(block / 64) as usize] |= 1 << (block % 64);
    }

    /// The bytes of `block` (the last one may be short).
    fn block_len(&self, block: u64) -> u64 {
        COW_BLOCK.min(self.len - block * COW_BLOCK)
    }
}

impl Disk for CowDisk {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.len, offset, buf.len())?;
        // Runs of blocks from the same side, one read each.
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let block = at / COW_BLOCK;
            let from_overlay = self.is_written(block);
            let mut end = (block + 1) * COW_BLOCK;
            while end < offset + buf.len() as u64
                && self.is_written(end / COW_BLOCK) == from_overlay
            {
                end += COW_BLOCK;
            }
            let take = (end.min(offset + buf.len() as u64) - at) as usize;
            let source = if from_overlay {
                &self.overlay
            } else {
                &self.base
            };
            source.read_exact_at(&mut buf[done..done + take], at)?;
            done += take;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(self.len, offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let first = offset / COW_BLOCK;
        let last = (offset + buf.len() as u64 - 1) / COW_BLOCK;
        // A block written for the first time and not covered whole keeps the base's other
        // bytes: copy it over first.
        for block in [first, last] {
            if self.is_written(block) {
                continue;
            }
            let start = block * COW_BLOCK;
            let block_len = self.block_len(block);
            let covered = offset <= start && offset + buf.len() as u64 >= start + block_len;
            if !covered {
                let scratch = &mut self.scratch[..block_len as usize];
                self.base.read_exact_at(scratch, start)?;
                self.overlay.write_all_at(scratch, start)?;
                self.mark(block);
            }
        }
        self.overlay.write_all_at(buf, offset)?;
        for block in first..=last {
            self.mark(block);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        // The overlay lives as long as its environment; a crash loses the environment with it,
        // so there is nothing a sync would keep. The base is never written.
        Ok(())
    }
}

fn check_range(len: u64, offset: u64, count: usize) -> io::Result<()> {
    match offset.checked_add(count as u64) {
        Some(end) if end <= len => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{count} bytes at {offset} lie outside a disk of {len} bytes"),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Write;

    use super::*;

    /// A base image of `blocks` blocks and a partial one, byte `i` of block `b` = `b`.
    fn base(blocks: u64) -> (tempfile::NamedTempFile, Vec<u8>) {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let mut bytes = Vec::new();
        for b in 0..blocks {
            bytes.extend(std::iter::repeat_n(b as u8, COW_BLOCK as usize));
        }
        bytes.extend(std::iter::repeat_n(0xee, 1536));
        file.write_all(&bytes).unwrap();
        (file, bytes)
    }

    fn cow(base: &tempfile::NamedTempFile) -> CowDisk {
        let dir = tempfile::tempdir().unwrap();
        CowDisk::with_private_overlay(File::open(base.path()).unwrap(), dir.path()).unwrap()
    }

    fn read_all(disk: &mut dyn Disk) -> Vec<u8> {
        let mut out = vec![0u8; disk.size() as usize];
        disk.read_at(&mut out, 0).unwrap();
        out
    }

    #[test]
    fn clones_see_their_own_writes_only_and_the_base_never_changes() {
        let (file, original) = base(8);
        let (mut a, mut b) = (cow(&file), cow(&file));
        assert_eq!(read_all(&mut a), original);

        // Partial writes inside a block, across a block boundary, and a whole block.
        a.write_at(b"hello", 100).unwrap();
        a.write_at(&[0xaa; 200], COW_BLOCK * 2 - 100).unwrap();
        a.write_at(&[0xbb; COW_BLOCK as usize], COW_BLOCK * 5)
            .unwrap();
        // The short last block.
        a.write_at(&[0xcc; 10], COW_BLOCK * 8 + 1000).unwrap();
        b.write_at(b"other", 100).unwrap();

        let mut want = original.clone();
        want[100..105].copy_from_slice(b"hello");
        want[(COW_BLOCK * 2 - 100) as usize..(COW_BLOCK * 2 + 100) as usize].fill(0xaa);
        want[(COW_BLOCK * 5) as usize..(COW_BLOCK * 6) as usize].fill(0xbb);
        want[(COW_BLOCK * 8 + 1000) as usize..(COW_BLOCK * 8 + 1010) as usize].fill(0xcc);
        assert_eq!(read_all(&mut a), want);
        assert_eq!(a.blocks_written(), 5);

        let mut want_b = original.clone();
        want_b[100..105].copy_from_slice(b"other");
        assert_eq!(read_all(&mut b), want_b);
        assert_eq!(b.blocks_written(), 1);

        assert_eq!(std::fs::read(file.path()).unwrap(), original);

        // Reads that start and end inside blocks, over both sides.
        let mut part = vec![0u8; 3 * COW_BLOCK as usize];
        a.read_at(&mut part, COW_BLOCK + 7).unwrap();
        assert_eq!(
            part,
            want[(COW_BLOCK + 7) as usize..(4 * COW_BLOCK + 7) as usize]
        );
    }

    #[test]
    fn a_block_written_twice_keeps_both_writes() {
        let (file, original) = base(2);
        let mut disk = cow(&file);
        disk.write_at(b"ab", 10).unwrap();
        disk.write_at(b"cd", 20).unwrap();
        let mut want = original;
        want[10..12].copy_from_slice(b"ab");
        want[20..22].copy_from_slice(b"cd");
        assert_eq!(read_all(&mut disk), want);
    }

    #[test]
    fn out_of_range_is_an_error_not_a_panic() {
        let (file, _) = base(1);
        let mut disk = cow(&file);
        let len = disk.size();
        assert!(disk.read_at(&mut [0u8; 2], len - 1).is_err());
        assert!(disk.write_at(&[0u8; 2], len - 1).is_err());
        assert!(disk.write_at(&[0u8; 1], u64::MAX).is_err());
        assert!(disk.read_at(&mut [], len).is_ok());
        let mut raw = RawDisk::new(File::open(file.path()).unwrap()).unwrap();
        assert_eq!(raw.size(), len);
        assert!(raw.read_at(&mut [0u8; 2], len - 1).is_err());
    }
}

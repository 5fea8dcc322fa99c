//! The on-disk types and constants of a Thaw snapshot: the fixed preamble, the bincode header
//! and manifest, and the one bincode configuration both sides use. Kept free of I/O and crypto
//! so the layout can be read (and pinned by tests) in one place; `docs/snapshot-format.md`
//! mirrors it.

use serde::{Deserialize, Serialize};

use crate::fingerprint::Fingerprint;
use crate::keys::KeyId;

/// The single file inside a snapshot directory. A directory (not a bare file) leaves room for
/// later sections (a working set, say) without changing how snapshots are published.
pub const SNAPSHOT_FILE: &str = "snapshot.thaw";
/// The working-set file inside a snapshot directory (`working_set`), the only other file one
/// holds.
pub const WORKING_SET_FILE: &str = "working-set.thaw";
/// First eight bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"THAWSNAP";
/// The format version this crate writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the fixed, hand-laid-out preamble in front of the bincode header.
pub const PREAMBLE_LEN: usize = 112;
/// Granularity of zero-page elision. Fixed by the format (not the host page size) so a
/// snapshot's manifest means the same thing everywhere.
pub const PAGE_SIZE: usize = 4096;
/// Memory chunk size used unless the caller asks otherwise. One constant on purpose: the
/// integrator tunes it from userfaultfd measurements (docs/BENCHMARKS.md).
pub const DEFAULT_CHUNK_SIZE: u32 = 256 * 1024;
/// Smallest chunk size the format allows (one elision page).
pub const MIN_CHUNK_SIZE: u32 = PAGE_SIZE as u32;
/// Largest chunk size the format allows; it bounds every per-chunk allocation of a reader.
pub const MAX_CHUNK_SIZE: u32 = 2 * 1024 * 1024;

/// Readers refuse files above this size before reading anything.
pub const MAX_FILE_LEN: u64 = 1 << 40;
/// Total guest memory a snapshot may describe.
pub const MAX_MEMORY_LEN: u64 = 1 << 40;
/// Caps on the sections a reader loads whole into memory; they bound allocations driven by
/// file contents before those contents are authenticated.
pub const MAX_HEADER_LEN: u32 = 1 << 20;
/// The state section's cap (the only one: `state_blob` decodes within it). A machine's state is
/// some tens of KiB per vCPU (registers, xsave, the local APIC page, a few hundred MSRs); this
/// leaves room for every vCPU Lambda allows.
pub const MAX_STATE_LEN: u64 = 16 << 20;
pub const MAX_MANIFEST_LEN: u64 = 512 << 20;
/// More regions than this is surely not a microVM.
pub const MAX_REGIONS: usize = 64;

/// Preamble `protection` values.
pub const PROTECTION_AES_256_GCM: u32 = 1;
pub const PROTECTION_INSECURE_PLAINTEXT: u32 = 2;

/// The crypto's sizes belong to the key code; the format lays them out.
pub use crate::keys::{GCM_TAG_LEN, NONCE_LEN, WRAPPED_KEY_LEN};
/// Length of the BLAKE3 digest that stands in for a GCM tag in plaintext mode.
pub const BLAKE3_TAG_LEN: usize = 32;

/// bincode 2, standard configuration with fixed-width little-endian integers: every integer
/// has its natural width, so the header's size does not depend on the offsets written into it
/// (the writer lays the header out before it knows them) and the spec stays simple.
pub(crate) fn bincode_config<const LIMIT: usize>() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Fixint,
    bincode::config::Limit<LIMIT>,
> {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<LIMIT>()
}

/// The configuration [`bincode_config`] describes, without a limit: for encoding.
pub(crate) fn encode_config()
-> bincode::config::Configuration<bincode::config::LittleEndian, bincode::config::Fixint> {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
}

/// A snapshot's random 128-bit id, shown (and serialized) as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SnapshotId(pub [u8; 16]);

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::keys::hex(&self.0))
    }
}

impl std::fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SnapshotId({self})")
    }
}

impl Serialize for SnapshotId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A snapshot id that is not 32 lowercase hex digits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a snapshot id (32 lowercase hex digits)")]
pub struct BadSnapshotId(pub String);

impl std::str::FromStr for SnapshotId {
    type Err = BadSnapshotId;

    /// 32 lowercase hex digits, as [`Display`](std::fmt::Display) writes them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::keys::unhex(s)
            .map(SnapshotId)
            .ok_or_else(|| BadSnapshotId(s.into()))
    }
}

/// The fixed 112-byte preamble. Everything a reader needs before it can authenticate the header
/// lives here, at fixed offsets, so nothing is deserialized before it is authenticated.
///
/// ```text
/// off len field
///   0   8 magic "THAWSNAP"
///   8   4 format_version      u32 LE
///  12   4 protection          u32 LE  1 = AES-256-GCM envelope, 2 = insecure plaintext
///  16   8 file_len            u64 LE  length of snapshot.thaw
///  24   4 header_len          u32 LE  bincode header bytes following the preamble
///  28   4 reserved            zero
///  32  16 key_id              master key id (zero in plaintext mode)
///  48  12 wrap_nonce          nonce of the key wrap (zero in plaintext mode)
///  60  48 wrapped_key         data key sealed by the master key (zero in plaintext mode)
/// 108   4 reserved            zero
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preamble {
    pub version: u32,
    pub protection: u32,
    pub file_len: u64,
    pub header_len: u32,
    pub key_id: KeyId,
    pub wrap_nonce: [u8; NONCE_LEN],
    pub wrapped_key: [u8; WRAPPED_KEY_LEN],
}

impl Preamble {
    pub fn to_bytes(&self) -> [u8; PREAMBLE_LEN] {
        let mut b = [0u8; PREAMBLE_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.protection.to_le_bytes());
        b[16..24].copy_from_slice(&self.file_len.to_le_bytes());
        b[24..28].copy_from_slice(&self.header_len.to_le_bytes());
        b[32..48].copy_from_slice(&self.key_id.0);
        b[48..60].copy_from_slice(&self.wrap_nonce);
        b[60..108].copy_from_slice(&self.wrapped_key);
        b
    }

    /// Parses a preamble whose magic the caller has already checked. Infallible because the
    /// input has the exact length and every field is plain bytes; meaning is checked later.
    pub fn from_bytes(b: &[u8; PREAMBLE_LEN]) -> Self {
        let (mut key_id, mut wrap_nonce, mut wrapped_key) =
            ([0u8; 16], [0u8; NONCE_LEN], [0u8; WRAPPED_KEY_LEN]);
        key_id.copy_from_slice(&b[32..48]);
        wrap_nonce.copy_from_slice(&b[48..60]);
        wrapped_key.copy_from_slice(&b[60..108]);
        Preamble {
            version: le_u32(b, 8),
            protection: le_u32(b, 12),
            file_len: le_u64(b, 16),
            header_len: le_u32(b, 24),
            key_id: KeyId(key_id),
            wrap_nonce,
            wrapped_key,
        }
    }
}

/// Little-endian u32 at `off` of a buffer known to be long enough; 0 if it is not, which the
/// callers' later checks reject.
pub(crate) fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        w.copy_from_slice(s);
    }
    u32::from_le_bytes(w)
}

pub(crate) fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        w.copy_from_slice(s);
    }
    u64::from_le_bytes(w)
}

/// A contiguous range of guest-physical memory captured in the snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionDesc {
    pub guest_addr: u64,
    pub size: u64,
}

/// Where a sealed section sits in the file; `len` includes its tag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionRef {
    pub offset: u64,
    pub len: u64,
}

impl SectionRef {
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.len)
    }
}

/// The authenticated header (bincode, see [`bincode_config`]). New fields go at the end with a
/// format version bump; readers refuse versions they do not know.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub snapshot_id: [u8; 16],
    /// Creation time, nanoseconds since the Unix epoch (UTC).
    pub created_unix_nanos: u64,
    pub chunk_size: u32,
    /// Zero-elision page size; always [`PAGE_SIZE`] in version 1.
    pub page_size: u32,
    pub vcpus: u8,
    pub zstd_level: i32,
    pub regions: Vec<RegionDesc>,
    pub fingerprint: Fingerprint,
    pub chunk_count: u64,
    /// The chunk area: from the end of the header tag to the start of the state section.
    pub chunks: SectionRef,
    pub state: SectionRef,
    pub manifest: SectionRef,
}

/// One manifest entry per chunk, in chunk order (regions in header order, ascending address).
///
/// Encoded with bincode's own derive, not serde's: the bytes are the same (pinned below), and
/// decoding is several times faster — serde visits a hash byte by byte, and a restore decodes
/// one entry per chunk of guest memory before the guest can run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub enum ChunkEntry {
    /// Every page is zero; nothing is stored.
    Zero,
    Data(DataChunk),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct DataChunk {
    /// Absolute file offset of the sealed chunk.
    pub offset: u64,
    /// Sealed length: payload plus tag.
    pub stored_len: u32,
    /// True when the payload is the packed pages as is (compression did not shrink them).
    pub raw: bool,
    /// Bit `i` (byte `i / 8`, bit `i % 8`) set when page `i` of the chunk is non-zero and
    /// therefore present, in order, in the packed payload.
    pub page_bitmap: Vec<u8>,
    /// BLAKE3 of the chunk's full plaintext (zero pages included).
    pub hash: [u8; 32],
}

/// Whether a chunk stores anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ChunkKind {
    Zero,
    Data,
}

/// A chunk as callers see it: where it goes in guest memory and whether it has data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ChunkInfo {
    pub guest_addr: u64,
    pub len: u32,
    pub kind: ChunkKind,
}

/// Splits regions into chunks: each region starts a new chunk, and its last chunk may be short.
/// `None` when the arithmetic overflows (only possible for file-derived garbage).
pub(crate) fn chunk_layout(regions: &[RegionDesc], chunk_size: u32) -> Option<Vec<(u64, u32)>> {
    let mut out = Vec::new();
    for r in regions {
        let mut off = 0u64;
        while off < r.size {
            let len = (r.size - off).min(u64::from(chunk_size));
            out.push((r.guest_addr.checked_add(off)?, u32::try_from(len).ok()?));
            off = off.checked_add(len)?;
        }
    }
    Some(out)
}

/// Number of chunks the regions need, computed without allocating.
pub(crate) fn chunk_count(regions: &[RegionDesc], chunk_size: u32) -> Option<u64> {
    regions.iter().try_fold(0u64, |acc, r| {
        acc.checked_add(r.size.div_ceil(u64::from(chunk_size)))
    })
}

/// Checks what must hold of a chunk size and a set of regions, on both the write and the read
/// side. Returns the reason it does not.
pub(crate) fn check_layout(regions: &[RegionDesc], chunk_size: u32) -> Result<u64, String> {
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(format!(
            "chunk size {chunk_size} is not a power of two in {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"
        ));
    }
    if regions.is_empty() || regions.len() > MAX_REGIONS {
        return Err(format!(
            "{} memory regions (1..={MAX_REGIONS} allowed)",
            regions.len()
        ));
    }
    let page = PAGE_SIZE as u64;
    let mut total = 0u64;
    let mut sorted: Vec<RegionDesc> = regions.to_vec();
    sorted.sort_by_key(|r| r.guest_addr);
    let mut prev_end = 0u64;
    for (i, r) in sorted.iter().enumerate() {
        if r.size == 0 || r.size % page != 0 || r.guest_addr % page != 0 {
            return Err(format!(
                "region at {:#x} of {:#x} bytes is empty or not 4 KiB aligned",
                r.guest_addr, r.size
            ));
        }
        let end = r.guest_addr.checked_add(r.size).ok_or_else(|| {
            format!(
                "region at {:#x} of {:#x} bytes overflows",
                r.guest_addr, r.size
            )
        })?;
        if i > 0 && r.guest_addr < prev_end {
            return Err(format!(
                "region at {:#x} overlaps the one before it",
                r.guest_addr
            ));
        }
        prev_end = end;
        total = total
            .checked_add(r.size)
            .filter(|t| *t <= MAX_MEMORY_LEN)
            .ok_or_else(|| format!("memory larger than {MAX_MEMORY_LEN} bytes"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    #[test]
    fn snapshot_ids_print_as_hex_and_parse_back() {
        let id = super::SnapshotId([0x3c; 16]);
        assert_eq!(id.to_string().parse::<super::SnapshotId>(), Ok(id));
        for bad in [
            "",
            "3c",
            "3C3C3C3C3C3C3C3C3C3C3C3C3C3C3C3C",
            &format!("{id}0"),
            "zz3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c",
        ] {
            assert!(bad.parse::<super::SnapshotId>().is_err(), "{bad:?}");
        }
    }

    use super::*;

    fn preamble() -> Preamble {
        Preamble {
            version: FORMAT_VERSION,
            protection: PROTECTION_AES_256_GCM,
            file_len: 0x0102_0304_0506_0708,
            header_len: 0x1122_3344,
            key_id: KeyId([0xa5; 16]),
            wrap_nonce: [0x5a; NONCE_LEN],
            wrapped_key: [0x3c; WRAPPED_KEY_LEN],
        }
    }

    /// Golden bytes: pins magic, version and every preamble offset. Changing this test means
    /// changing the format (and FORMAT_VERSION, and docs/snapshot-format.md).
    #[test]
    fn preamble_layout_is_pinned() {
        let b = preamble().to_bytes();
        assert_eq!(&b[0..8], b"THAWSNAP");
        assert_eq!(&b[8..12], &[1, 0, 0, 0]);
        assert_eq!(&b[12..16], &[1, 0, 0, 0]);
        assert_eq!(&b[16..24], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[24..28], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[28..32], &[0; 4]);
        assert_eq!(&b[32..48], &[0xa5; 16]);
        assert_eq!(&b[48..60], &[0x5a; 12]);
        assert_eq!(&b[60..108], &[0x3c; 48]);
        assert_eq!(&b[108..112], &[0; 4]);
        assert_eq!(Preamble::from_bytes(&b), preamble());
    }

    #[test]
    fn bincode_config_is_fixed_width_little_endian() {
        let s = SectionRef {
            offset: 0x0102,
            len: 3,
        };
        let bytes = bincode::serde::encode_to_vec(s, bincode_config::<64>()).unwrap_or_default();
        assert_eq!(bytes, [2, 1, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]);
    }

    /// Golden bytes of a manifest entry, as shown in docs/snapshot-format.md.
    #[test]
    fn manifest_entry_encoding_is_pinned() {
        let entries = vec![
            ChunkEntry::Zero,
            ChunkEntry::Data(DataChunk {
                offset: 0x1000,
                stored_len: 0x210,
                raw: false,
                page_bitmap: vec![0x05],
                hash: [0xee; 32],
            }),
        ];
        let bytes = bincode::encode_to_vec(&entries, encode_config()).unwrap();
        let mut expected = vec![2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        expected.extend_from_slice(&[0, 0x10, 0, 0, 0, 0, 0, 0, 0x10, 2, 0, 0, 0]);
        expected.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 5]);
        expected.extend_from_slice(&[0xee; 32]);
        assert_eq!(bytes, expected);
        let back: (Vec<ChunkEntry>, usize) =
            bincode::decode_from_slice(&bytes, bincode_config::<1024>()).unwrap();
        assert_eq!(back, (entries.clone(), bytes.len()));
        // The same bytes as serde's encoding, which version 1 files were written with.
        let by_serde = bincode::serde::encode_to_vec(&entries, encode_config()).unwrap();
        assert_eq!(by_serde, bytes);
    }

    /// The header's leading fields and its fixed size for a given content: the writer relies on
    /// the size not depending on the offsets.
    #[test]
    fn header_encoding_is_pinned_and_offset_independent() {
        use crate::fingerprint::{CpuIdentity, CpuidEntry};
        let mut h = Header {
            snapshot_id: [0xab; 16],
            created_unix_nanos: 1,
            chunk_size: DEFAULT_CHUNK_SIZE,
            page_size: 4096,
            vcpus: 2,
            zstd_level: 1,
            regions: vec![RegionDesc {
                guest_addr: 0,
                size: 1 << 20,
            }],
            fingerprint: Fingerprint {
                cpu: CpuIdentity {
                    vendor: "AuthenticAMD".into(),
                    family: 25,
                    model: 1,
                    stepping: 1,
                },
                guest_cpuid: vec![CpuidEntry {
                    function: 1,
                    index: 0,
                    flags: 0,
                    eax: 0,
                    ebx: 0,
                    ecx: 0,
                    edx: 0,
                }],
                kvm_flavor: "pvm".into(),
                host_page_size: 4096,
            },
            chunk_count: 4,
            chunks: SectionRef::default(),
            state: SectionRef::default(),
            manifest: SectionRef::default(),
        };
        let a = bincode::serde::encode_to_vec(&h, encode_config()).unwrap();
        assert_eq!(&a[..16], &[0xab; 16]);
        assert_eq!(&a[16..24], &1u64.to_le_bytes());
        assert_eq!(&a[24..28], &DEFAULT_CHUNK_SIZE.to_le_bytes());
        assert_eq!(&a[28..32], &4096u32.to_le_bytes());
        assert_eq!(a[32], 2);
        assert_eq!(&a[33..37], &1i32.to_le_bytes());
        assert_eq!(&a[37..45], &1u64.to_le_bytes());
        // 16+8+4+4+1+4 + (8+16) + (8+12+12) + (8+28) + (8+3) + 4 + 8 + 3*16
        assert_eq!(a.len(), 37 + 24 + 32 + 36 + 11 + 4 + 8 + 48);
        h.manifest = SectionRef {
            offset: u64::MAX,
            len: u64::MAX,
        };
        let b = bincode::serde::encode_to_vec(&h, encode_config()).unwrap();
        assert_eq!(a.len(), b.len());
    }

    #[test]
    fn layout_splits_regions_and_keeps_short_last_chunk() {
        let regions = [
            RegionDesc {
                guest_addr: 0,
                size: 3 * 4096,
            },
            RegionDesc {
                guest_addr: 0x10_0000,
                size: 8192,
            },
        ];
        let layout = chunk_layout(&regions, 8192);
        assert_eq!(
            layout,
            Some(vec![(0, 8192), (8192, 4096), (0x10_0000, 8192)])
        );
        assert_eq!(chunk_count(&regions, 8192), Some(3));
    }

    #[test]
    fn rejects_bad_layouts() {
        let ok = RegionDesc {
            guest_addr: 0,
            size: 4096,
        };
        assert!(check_layout(&[ok], 3 * 4096).is_err());
        assert!(check_layout(&[ok], 4 << 20).is_err());
        assert!(check_layout(&[], 4096).is_err());
        assert!(
            check_layout(
                &[RegionDesc {
                    guest_addr: 0,
                    size: 100
                }],
                4096
            )
            .is_err()
        );
        let overlap = RegionDesc {
            guest_addr: 0,
            size: 8192,
        };
        let second = RegionDesc {
            guest_addr: 4096,
            size: 4096,
        };
        assert!(check_layout(&[overlap, second], 4096).is_err());
        let wrap = RegionDesc {
            guest_addr: u64::MAX - 4095,
            size: 8192,
        };
        assert!(check_layout(&[wrap], 4096).is_err());
        assert_eq!(check_layout(&[ok], 4096), Ok(4096));
    }
}

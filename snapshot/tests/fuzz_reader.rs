//! Fuzzing the snapshot reader with proptest on the stable toolchain (docs/fuzzing.md).
//!
//! The seed corpus is valid snapshots, each with a working set: the committed goldens
//! (`tests/golden/`, encrypted and insecure-plaintext) and two written here by the writer with
//! every chunk kind (zero, compressed, raw, short last chunk). Three properties:
//!
//! - **Mutated files are refused.** Any change to `snapshot.thaw` or `working-set.thaw` (bit
//!   flips, byte runs, truncation, insertion, removal, splices from other seeds, length fields
//!   set to extreme values, appended garbage) is refused with a typed error, or — for bytes
//!   inside a data chunk only — the snapshot opens with everything it returns unchanged and the
//!   damaged chunk is refused when read. Every byte of both files is authenticated, so nothing
//!   changed is ever returned as data.
//! - **Authentic nonsense does not hurt the reader.** In insecure-plaintext mode anyone can
//!   recompute the digests, so a plaintext seed is taken apart (header, manifest, state,
//!   chunk payloads, working-set body), changed field by field or byte by byte, laid out again
//!   and resealed: the checks after authentication then see inconsistent values. Opening and
//!   reading never panic, never allocate more than [`ALLOC_LIMIT`] at once, never fail with an
//!   I/O error (the reader checked every range first), and the working set is accepted exactly
//!   when it is valid.
//! - **Unmutated seeds open**, verify, and read back as written.
//!
//! Cases per property: `PROPTEST_CASES` (default: the short CI run below).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

mod common;

use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde::{Deserialize, Serialize};
use snapshot::{
    ChunkInfo, FORMAT_VERSION, Fingerprint, MasterKey, MemoryRegion, PREAMBLE_LEN, Protection,
    ReadError, RecordingEnd, RegionDesc, SNAPSHOT_FILE, Snapshot, WORKING_SET_FILE,
    WORKING_SET_PREAMBLE_LEN, WORKING_SET_VERSION, WorkingSet, WorkingSetError, WriteOptions,
};

// ---------------------------------------------------------------------------------------------
// Allocation bound: the largest single allocation of each case is measured.

#[macro_use]
#[path = "../../tests/fuzz_harness/mod.rs"]
mod fuzz_harness;

use fuzz_harness::{label, reset_largest as reset};

/// No case may ask the allocator for more than this at once. The seeds are a few KiB to a few
/// hundred KiB; the reader legitimately allocates its header (at most 1 MiB plus a tag) and
/// one chunk (at most 2 MiB), so anything above this was sized by a field of the file.
const ALLOC_LIMIT: usize = 4 << 20;

fn assert_bounded_allocation(what: &str) {
    let largest = fuzz_harness::largest();
    assert!(
        largest <= ALLOC_LIMIT,
        "{what}: one allocation of {largest} bytes (limit {ALLOC_LIMIT})"
    );
}

/// Cases per property in the short run (`cargo test`): about a second each in a debug build.
const CASES: u32 = 1000;

// ---------------------------------------------------------------------------------------------
// The layout of the files, as docs/snapshot-format.md gives it (mirrored here, not imported).

const TAG_PLAINTEXT: usize = 32;
const GCM_TAG: usize = 16;

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Section {
    offset: u64,
    len: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Header {
    snapshot_id: [u8; 16],
    created_unix_nanos: u64,
    chunk_size: u32,
    page_size: u32,
    vcpus: u8,
    zstd_level: i32,
    regions: Vec<RegionDesc>,
    fingerprint: Fingerprint,
    chunk_count: u64,
    chunks: Section,
    state: Section,
    manifest: Section,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Entry {
    Zero,
    Data {
        offset: u64,
        stored_len: u32,
        raw: bool,
        page_bitmap: Vec<u8>,
        hash: [u8; 32],
    },
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn nonce(domain: u32, counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&domain.to_le_bytes());
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n
}

/// The insecure-plaintext tag: BLAKE3(nonce ‖ len(AAD) u64 LE ‖ AAD ‖ data).
fn digest(nonce: [u8; 12], aad: &[u8], data: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&nonce);
    h.update(&(aad.len() as u64).to_le_bytes());
    h.update(aad);
    h.update(data);
    *h.finalize().as_bytes()
}

fn labelled(label: &[u8], id: &[u8; 16]) -> Vec<u8> {
    [label, id].concat()
}

fn chunk_aad(id: &[u8; 16], index: u64, guest_addr: u64) -> Vec<u8> {
    let mut aad = id.to_vec();
    aad.extend_from_slice(&index.to_le_bytes());
    aad.extend_from_slice(&guest_addr.to_le_bytes());
    aad
}

/// Guest address of chunk `index` under `regions`, computed without building the layout (a
/// mutated header may describe 2^28 chunks).
fn chunk_addr(regions: &[RegionDesc], chunk_size: u32, index: u64) -> u64 {
    let size = u64::from(chunk_size.max(1));
    let mut left = index;
    for r in regions {
        let n = r.size.div_ceil(size);
        if left < n {
            return r.guest_addr.wrapping_add(left.wrapping_mul(size));
        }
        left -= n;
    }
    0
}

// ---------------------------------------------------------------------------------------------
// The seed corpus.

struct Seed {
    name: String,
    snap: Vec<u8>,
    ws: Vec<u8>,
    key: Option<[u8; 32]>,
    /// What the seed opens to.
    state: Vec<u8>,
    chunks: Vec<ChunkInfo>,
    regions: Vec<RegionDesc>,
    contents: Vec<Vec<u8>>,
    working_set: WorkingSet,
    /// Offsets and widths of the length and kind fields of `snapshot.thaw` (preamble and the
    /// header's section table) and of `working-set.thaw`.
    snap_fields: Vec<(usize, usize)>,
    ws_fields: Vec<(usize, usize)>,
}

impl Seed {
    fn key(&self) -> Option<MasterKey> {
        self.key.map(MasterKey::from_bytes)
    }

    fn plaintext(&self) -> bool {
        self.key.is_none()
    }
}

const GOLDEN_KEY: [u8; 32] = [0x4b; 32];
const WRITER_KEY: [u8; 32] = [0x11; 32];
const SEED_STATE: &[u8] = b"fuzz seed state: opaque to the snapshot crate";

fn golden(protection: &str) -> (Vec<u8>, Vec<u8>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!(
            "format-v{FORMAT_VERSION}-ws-v{WORKING_SET_VERSION}"
        ))
        .join(protection);
    (
        std::fs::read(dir.join(SNAPSHOT_FILE)).unwrap(),
        std::fs::read(dir.join(WORKING_SET_FILE)).unwrap(),
    )
}

/// A small snapshot written by this build's writer: 8 KiB chunks; region 0 (at 0, four
/// chunks): text (compressed), zero, random and zero pages (raw), text and random; region 1
/// (at 1 MiB, a chunk and a short one): random and zero, then text.
fn written(protection: &Protection<'_>) -> (Vec<u8>, Vec<u8>) {
    const PAGE: usize = 4096;
    let mut a = vec![0u8; 8 * PAGE];
    common::text(&mut a[..2 * PAGE]);
    common::xorshift(5, &mut a[4 * PAGE..5 * PAGE]);
    common::text(&mut a[6 * PAGE..7 * PAGE]);
    common::xorshift(6, &mut a[7 * PAGE..]);
    let mut b = vec![0u8; 3 * PAGE];
    common::xorshift(7, &mut b[..PAGE]);
    common::text(&mut b[2 * PAGE..]);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("seed");
    let memory = [
        MemoryRegion {
            guest_addr: 0,
            bytes: &a,
        },
        MemoryRegion {
            guest_addr: 0x10_0000,
            bytes: &b,
        },
    ];
    let options = WriteOptions {
        chunk_size: 2 * PAGE as u32,
        threads: 1,
        ..WriteOptions::default()
    };
    snapshot::write(
        &target,
        &common::meta(),
        SEED_STATE,
        &memory,
        protection,
        &options,
    )
    .unwrap();
    let key = match protection {
        Protection::Encrypted(k) => Some(*k),
        Protection::InsecurePlaintext => None,
    };
    let snap = Snapshot::open(&target, key).unwrap();
    let ws = WorkingSet::new(vec![3, 0, 5, 4], 9, RecordingEnd::FirstResponse);
    snap.write_working_set(&target, &ws).unwrap();
    (
        std::fs::read(target.join(SNAPSHOT_FILE)).unwrap(),
        std::fs::read(target.join(WORKING_SET_FILE)).unwrap(),
    )
}

fn seed(name: &str, (snap, ws): (Vec<u8>, Vec<u8>), key: Option<[u8; 32]>) -> Seed {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(SNAPSHOT_FILE), &snap).unwrap();
    std::fs::write(dir.path().join(WORKING_SET_FILE), &ws).unwrap();
    let master = key.map(MasterKey::from_bytes);
    let opened = Snapshot::open(dir.path(), master.as_ref())
        .unwrap_or_else(|e| panic!("seed {name} does not open: {e:?}"));
    opened.verify(1).unwrap();
    let contents = (0..opened.chunks().len())
        .map(|i| {
            let mut out = vec![0u8; opened.chunks()[i].len as usize];
            opened.read_chunk(i, &mut out).unwrap();
            out
        })
        .collect();
    // Every byte must be covered by something authenticated for the mutation property to
    // hold: the data chunks tile the chunk area.
    let layout = opened.layout().unwrap();
    let mut at = layout.chunks.start;
    for (_, range) in &layout.data_chunks {
        assert_eq!(range.start, at, "seed {name}: a gap in the chunk area");
        at = range.end;
    }
    assert_eq!(
        at, layout.chunks.end,
        "seed {name}: a gap at the chunk area's end"
    );
    let header_end = PREAMBLE_LEN + le_u32(&snap, 24) as usize;
    // chunk_count, then chunks, state and manifest {offset, len}: the header's last 56 bytes.
    let mut snap_fields = vec![(8, 4), (12, 4), (16, 8), (24, 4), (28, 4), (108, 4)];
    snap_fields.extend((0..7).map(|i| (header_end - 56 + 8 * i, 8)));
    snap_fields.push((PREAMBLE_LEN + 24, 4)); // chunk_size
    snap_fields.push((PREAMBLE_LEN + 37, 8)); // regions' count
    snap_fields.push((PREAMBLE_LEN + 53, 8)); // region 0's size
    let mut ws_fields = vec![(8, 4), (12, 4), (32, 4), (44, 4)];
    if key.is_none() {
        // The body is readable in plaintext mode: ended_by and count.
        ws_fields.extend([(48 + 16, 4), (48 + 20, 4), (48 + 24, 4)]);
    }
    Seed {
        name: name.to_owned(),
        state: opened.state().to_vec(),
        chunks: opened.chunks().to_vec(),
        regions: opened.regions().to_vec(),
        contents,
        working_set: opened.working_set().cloned().unwrap(),
        snap,
        ws,
        key,
        snap_fields,
        ws_fields,
    }
}

fn seeds() -> &'static [Seed] {
    static SEEDS: OnceLock<Vec<Seed>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let writer_key = MasterKey::from_bytes(WRITER_KEY);
        vec![
            seed("golden encrypted", golden("encrypted"), Some(GOLDEN_KEY)),
            seed("golden plaintext", golden("plaintext"), None),
            seed(
                "written encrypted",
                written(&Protection::Encrypted(&writer_key)),
                Some(WRITER_KEY),
            ),
            seed(
                "written plaintext",
                written(&Protection::InsecurePlaintext),
                None,
            ),
        ]
    })
}

fn plaintext_seeds() -> Vec<&'static Seed> {
    seeds().iter().filter(|s| s.plaintext()).collect()
}

// ---------------------------------------------------------------------------------------------
// Byte-level mutations.

#[derive(Clone, Debug)]
enum Edit {
    Flip {
        at: At,
        bit: u8,
    },
    Set {
        at: At,
        byte: u8,
    },
    Run {
        at: At,
        len: usize,
        byte: u8,
    },
    Truncate {
        to: At,
    },
    Append(Vec<u8>),
    Insert {
        at: At,
        bytes: Vec<u8>,
    },
    Remove {
        at: At,
        len: usize,
    },
    /// Bytes of another seed's file (of the same kind) copied over this one's.
    Splice {
        donor: At,
        from: At,
        at: At,
        len: usize,
    },
    /// A length or kind field set to `value` (its low bytes).
    Field {
        field: At,
        value: Value,
    },
    /// These bytes at this offset (not generated: for the fixed cases).
    Write {
        at: usize,
        bytes: Vec<u8>,
    },
}

#[derive(Clone, Debug)]
enum Value {
    Exact(u64),
    /// The field's current value plus this.
    Delta(i64),
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => prop_oneof![
            Just(0u64),
            Just(1),
            Just(u64::from(u32::MAX)),
            Just(u64::MAX),
            Just(1 << 20),
            Just((1 << 20) + 1),
            Just(1 << 40),
            Just((16 << 20) + 32),
            Just(512 << 20),
        ]
        .prop_map(Value::Exact),
        2 => any::<u64>().prop_map(Value::Exact),
        4 => (-64i64..64).prop_map(Value::Delta),
    ]
}

/// A position in something of any length: `n × (self / 2^64)`, as proptest's `Index`, but
/// constructible (0 is the first, `u64::MAX` the last).
#[derive(Clone, Copy, Debug)]
struct At(u64);

impl At {
    const FIRST: At = At(0);
    const LAST: At = At(u64::MAX);

    fn index(self, n: usize) -> usize {
        ((n as u128 * u128::from(self.0)) >> 64) as usize
    }
}

fn at() -> impl Strategy<Value = At> {
    any::<u64>().prop_map(At)
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (at(), 0u8..8).prop_map(|(at, bit)| Edit::Flip { at, bit }),
        2 => (at(), any::<u8>()).prop_map(|(at, byte)| Edit::Set { at, byte }),
        2 => (at(), 1usize..300, prop_oneof![Just(0u8), Just(0xff), any::<u8>()])
            .prop_map(|(at, len, byte)| Edit::Run { at, len, byte }),
        2 => at().prop_map(|to| Edit::Truncate { to }),
        1 => proptest::collection::vec(any::<u8>(), 1..64).prop_map(Edit::Append),
        1 => (at(), proptest::collection::vec(any::<u8>(), 1..32))
            .prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
        1 => (at(), 1usize..64).prop_map(|(at, len)| Edit::Remove { at, len }),
        2 => (at(), at(), at(), 1usize..512)
            .prop_map(|(donor, from, at, len)| Edit::Splice { donor, from, at, len }),
        3 => (at(), value()).prop_map(|(field, value)| Edit::Field { field, value }),
    ]
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    proptest::collection::vec(edit(), 1..4)
}

/// Applies `edits` to `bytes`; `donors` are files of the same kind, `fields` the seed's
/// (offset, width) fields.
fn apply(bytes: &mut Vec<u8>, edits: &[Edit], donors: &[&[u8]], fields: &[(usize, usize)]) {
    for e in edits {
        let len = bytes.len();
        match e {
            Edit::Flip { at, bit } if len > 0 => bytes[at.index(len)] ^= 1 << bit,
            Edit::Set { at, byte } if len > 0 => bytes[at.index(len)] = *byte,
            Edit::Run { at, len: n, byte } if len > 0 => {
                let start = at.index(len);
                let end = (start + n).min(len);
                bytes[start..end].fill(*byte);
            }
            Edit::Truncate { to } if len > 0 => bytes.truncate(to.index(len)),
            Edit::Append(tail) => bytes.extend_from_slice(tail),
            Edit::Insert { at, bytes: new } => {
                let at = at.index(len + 1);
                bytes.splice(at..at, new.iter().copied());
            }
            Edit::Remove { at, len: n } if len > 0 => {
                let start = at.index(len);
                bytes.drain(start..(start + n).min(len));
            }
            Edit::Splice {
                donor,
                from,
                at,
                len: n,
            } if len > 0 && !donors.is_empty() => {
                let donor = donors[donor.index(donors.len())];
                if donor.is_empty() {
                    continue;
                }
                let from = from.index(donor.len());
                let at = at.index(len);
                let n = (*n).min(donor.len() - from).min(len - at);
                bytes[at..at + n].copy_from_slice(&donor[from..from + n]);
            }
            Edit::Write { at, bytes: new } if at + new.len() <= len => {
                bytes[*at..at + new.len()].copy_from_slice(new);
            }
            Edit::Field { field, value } if !fields.is_empty() => {
                let (at, width) = fields[field.index(fields.len())];
                if at + width > len {
                    continue;
                }
                let mut word = [0u8; 8];
                word[..width].copy_from_slice(&bytes[at..at + width]);
                let current = u64::from_le_bytes(word);
                let new = match value {
                    Value::Exact(v) => *v,
                    Value::Delta(d) => current.wrapping_add_signed(*d),
                };
                bytes[at..at + width].copy_from_slice(&new.to_le_bytes()[..width]);
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checks.

/// A refusal of a damaged file: a specific reason, never an I/O failure (every range the reader
/// reads was checked against the file's length first) nor an API misuse.
fn assert_refusal(seed: &Seed, e: &ReadError) {
    let typed = match e {
        ReadError::Io { .. }
        | ReadError::UnpublishedTemp { .. }
        | ReadError::NoSuchChunk { .. }
        | ReadError::OutputLength { .. }
        | ReadError::ThreadPool { .. } => false,
        ReadError::WorkingSet { source, .. } => !matches!(source, WorkingSetError::Io(_)),
        _ => true,
    };
    assert!(typed, "{}: not a refusal of the file: {e:?}", seed.name);
}

/// Opens `dir` as `seed` would be, reading every chunk both ways if it opens; checks that the
/// reader either refused or returned only what the seed holds. Whether the file differed from
/// the seed is `changed`: a changed file that opens must then refuse one of its chunks.
fn check_damaged(seed: &Seed, dir: &Path, changed: bool) -> String {
    let key = seed.key();
    let opened = Snapshot::open(dir, key.as_ref());
    let snap = match opened {
        Err(e) => {
            assert!(
                changed,
                "{}: the unchanged seed is refused: {e:?}",
                seed.name
            );
            assert_refusal(seed, &e);
            return label(&e);
        }
        Ok(snap) => snap,
    };
    assert_eq!(snap.state(), seed.state, "{}: state", seed.name);
    assert_eq!(snap.chunks(), seed.chunks, "{}: chunks", seed.name);
    assert_eq!(snap.regions(), seed.regions, "{}: regions", seed.name);
    assert_eq!(snap.working_set(), Some(&seed.working_set), "{}", seed.name);
    let mut refused = 0;
    for (index, info) in snap.chunks().iter().enumerate() {
        let mut out = vec![0u8; info.len as usize];
        for authenticated_only in [false, true] {
            let read = if authenticated_only {
                snap.read_chunk_authenticated(index, &mut out)
            } else {
                snap.read_chunk(index, &mut out)
            };
            match read {
                Ok(()) => assert!(
                    out == seed.contents[index],
                    "{}: chunk {index} read back changed bytes",
                    seed.name
                ),
                Err(
                    ReadError::ChunkTampered { index: i }
                    | ReadError::ChunkCorrupt { index: i, .. },
                ) if i == index => refused += 1,
                Err(e) => panic!("{}: chunk {index}: {e:?}", seed.name),
            }
        }
    }
    let authenticated = snap.authenticate_chunks();
    if changed {
        assert!(
            refused > 0,
            "{}: a changed file opened and read whole",
            seed.name
        );
        assert!(
            matches!(authenticated, Err(ReadError::ChunkTampered { .. })),
            "{}: {authenticated:?}",
            seed.name
        );
    } else {
        assert_eq!(
            refused, 0,
            "{}: the unchanged seed refused a chunk",
            seed.name
        );
        authenticated.unwrap();
    }
    if refused > 0 {
        "opened; a chunk refused".to_owned()
    } else {
        "opened whole".to_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Insecure-plaintext seeds taken apart, so that changes can be resealed.

#[derive(Clone, Debug)]
struct Parts {
    preamble: [u8; PREAMBLE_LEN],
    header: Header,
    /// Chunk payloads (without their tags), in file order, with their chunk index.
    payloads: Vec<(u64, Vec<u8>)>,
    state: Vec<u8>,
    manifest: Vec<Entry>,
    ws_preamble: [u8; WORKING_SET_PREAMBLE_LEN],
    ws_body: Vec<u8>,
}

fn take_apart(seed: &Seed) -> Parts {
    let b = &seed.snap;
    let header_len = le_u32(b, 24) as usize;
    let header_bytes = &b[PREAMBLE_LEN..PREAMBLE_LEN + header_len];
    let (header, used): (Header, usize) =
        bincode::serde::decode_from_slice(header_bytes, bincode_config()).unwrap();
    assert_eq!(
        used, header_len,
        "{}: the header mirror is wrong",
        seed.name
    );
    let section = |s: Section| &b[s.offset as usize..(s.offset + s.len) as usize - TAG_PLAINTEXT];
    let (manifest, used): (Vec<Entry>, usize) =
        bincode::serde::decode_from_slice(section(header.manifest), bincode_config()).unwrap();
    assert_eq!(used, header.manifest.len as usize - TAG_PLAINTEXT);
    let payloads = manifest
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match e {
            Entry::Data {
                offset, stored_len, ..
            } => {
                let start = *offset as usize;
                let end = start + *stored_len as usize - TAG_PLAINTEXT;
                Some((i as u64, b[start..end].to_vec()))
            }
            Entry::Zero => None,
        })
        .collect();
    let ws = &seed.ws;
    Parts {
        preamble: b[..PREAMBLE_LEN].try_into().unwrap(),
        state: section(header.state).to_vec(),
        header,
        payloads,
        manifest,
        ws_preamble: ws[..WORKING_SET_PREAMBLE_LEN].try_into().unwrap(),
        ws_body: ws[WORKING_SET_PREAMBLE_LEN..ws.len() - TAG_PLAINTEXT].to_vec(),
    }
}

/// What is done to the parts before they are laid out and resealed.
#[derive(Clone, Debug)]
enum Change {
    ChunkSize(u32),
    PageSize(u32),
    RegionAddr(At, u64),
    RegionSize(At, u64),
    AddRegion(u64, u64),
    DropRegion(At),
    ChunkCount(u64),
    /// Section 0 = chunks, 1 = state, 2 = manifest; its offset (false) or length (true).
    Section(u8, bool, Value),
    Vendor(String),
    ExtraCpuid(usize),
    EntryZero(At),
    EntryOffset(At, Value),
    EntryStoredLen(At, u32),
    EntryRaw(At),
    EntryBitmap(At, Vec<u8>),
    EntryHash(At),
    AddEntry(Entry),
    DropEntry,
    State(Vec<u8>),
    Payload(At, Vec<Edit>),
    HeaderBytes(Vec<Edit>),
    ManifestBytes(Vec<Edit>),
    WsBody(Vec<Edit>),
    WsIndices(Vec<u32>),
}

fn small_or_extreme_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(4096),
        Just(1 << 20),
        Just(1 << 40),
        Just((1 << 40) + 4096),
        Just(u64::MAX - 4095),
        Just(u64::MAX),
        (0u64..64).prop_map(|p| p * 4096),
        any::<u64>(),
    ]
}

fn change() -> impl Strategy<Value = Change> {
    let entry = prop_oneof![
        Just(Entry::Zero),
        (
            any::<u64>(),
            any::<u32>(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..4)
        )
            .prop_map(|(offset, stored_len, raw, page_bitmap)| Entry::Data {
                offset,
                stored_len,
                raw,
                page_bitmap,
                hash: [0; 32],
            }),
    ];
    prop_oneof![
        2 => prop_oneof![
            Just(0u32),
            Just(4096),
            Just(8192),
            Just(3 * 4096),
            Just(2 << 20),
            Just(4 << 20),
            Just(u32::MAX),
            any::<u32>()
        ]
        .prop_map(Change::ChunkSize),
        1 => prop_oneof![Just(0u32), Just(2048), Just(8192), any::<u32>()].prop_map(Change::PageSize),
        2 => (at(), small_or_extreme_u64()).prop_map(|(i, v)| Change::RegionAddr(i, v)),
        3 => (at(), small_or_extreme_u64()).prop_map(|(i, v)| Change::RegionSize(i, v)),
        1 => (small_or_extreme_u64(), small_or_extreme_u64())
            .prop_map(|(a, s)| Change::AddRegion(a, s)),
        1 => at().prop_map(Change::DropRegion),
        2 => small_or_extreme_u64().prop_map(Change::ChunkCount),
        3 => (0u8..3, any::<bool>(), value()).prop_map(|(s, l, v)| Change::Section(s, l, v)),
        1 => prop_oneof![Just(String::new()), "[a-zA-Z]{0,40}", Just("x".repeat(70_000))]
            .prop_map(Change::Vendor),
        1 => prop_oneof![0usize..8, Just(40_000)].prop_map(Change::ExtraCpuid),
        2 => at().prop_map(Change::EntryZero),
        2 => (at(), value()).prop_map(|(i, v)| Change::EntryOffset(i, v)),
        2 => (at(), any::<u32>()).prop_map(|(i, v)| Change::EntryStoredLen(i, v)),
        2 => at().prop_map(Change::EntryRaw),
        2 => (at(), proptest::collection::vec(any::<u8>(), 0..4))
            .prop_map(|(i, b)| Change::EntryBitmap(i, b)),
        1 => at().prop_map(Change::EntryHash),
        1 => entry.prop_map(Change::AddEntry),
        1 => Just(Change::DropEntry),
        1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Change::State),
        3 => (at(), edits()).prop_map(|(i, e)| Change::Payload(i, e)),
        3 => edits().prop_map(Change::HeaderBytes),
        3 => edits().prop_map(Change::ManifestBytes),
        3 => edits().prop_map(Change::WsBody),
        2 => proptest::collection::vec(prop_oneof![0u32..12, any::<u32>()], 0..12)
            .prop_map(Change::WsIndices),
    ]
}

/// Files laid out from `parts` with `changes` applied and every digest recomputed. With
/// `fixup`, offsets and lengths (sections, data chunks, `file_len`, `header_len`,
/// `sealed_len`) are made consistent again after the changes that do not name them.
fn assemble(parts: &Parts, changes: &[Change], fixup: bool) -> (Vec<u8>, Vec<u8>) {
    let mut p = parts.clone();
    let mut header_edits = Vec::new();
    let mut manifest_edits = Vec::new();
    let mut ws_edits = Vec::new();
    let mut sections = Vec::new();
    let pick = |i: &At, n: usize| (n > 0).then(|| i.index(n));
    for c in changes {
        let h = &mut p.header;
        match c {
            Change::ChunkSize(v) => h.chunk_size = *v,
            Change::PageSize(v) => h.page_size = *v,
            Change::RegionAddr(i, v) => {
                if let Some(i) = pick(i, h.regions.len()) {
                    h.regions[i].guest_addr = *v;
                }
            }
            Change::RegionSize(i, v) => {
                if let Some(i) = pick(i, h.regions.len()) {
                    h.regions[i].size = *v;
                }
            }
            Change::AddRegion(a, s) => h.regions.push(RegionDesc {
                guest_addr: *a,
                size: *s,
            }),
            Change::DropRegion(i) => {
                if let Some(i) = pick(i, h.regions.len()) {
                    h.regions.remove(i);
                }
            }
            Change::ChunkCount(v) => h.chunk_count = *v,
            Change::Section(..) => sections.push(c.clone()),
            Change::Vendor(v) => h.fingerprint.cpu.vendor = v.clone(),
            Change::ExtraCpuid(n) => {
                let entry = h.fingerprint.guest_cpuid.first().copied();
                if let Some(entry) = entry {
                    h.fingerprint
                        .guest_cpuid
                        .extend(std::iter::repeat_n(entry, *n));
                }
            }
            Change::EntryZero(i) => {
                if let Some(i) = pick(i, p.manifest.len()) {
                    p.manifest[i] = Entry::Zero;
                }
            }
            Change::EntryOffset(i, _)
            | Change::EntryStoredLen(i, _)
            | Change::EntryRaw(i)
            | Change::EntryBitmap(i, _)
            | Change::EntryHash(i) => {
                let Some(i) = pick(i, p.manifest.len()) else {
                    continue;
                };
                let Entry::Data {
                    offset,
                    stored_len,
                    raw,
                    page_bitmap,
                    hash,
                } = &mut p.manifest[i]
                else {
                    continue;
                };
                match c {
                    Change::EntryOffset(_, Value::Exact(x)) => *offset = *x,
                    Change::EntryOffset(_, Value::Delta(d)) => {
                        *offset = offset.wrapping_add_signed(*d)
                    }
                    Change::EntryStoredLen(_, x) => *stored_len = *x,
                    Change::EntryRaw(_) => *raw = !*raw,
                    Change::EntryBitmap(_, b) => page_bitmap.clone_from(b),
                    Change::EntryHash(_) => hash[0] ^= 1,
                    _ => {}
                }
            }
            Change::AddEntry(e) => p.manifest.push(e.clone()),
            Change::DropEntry => {
                p.manifest.pop();
            }
            Change::State(s) => p.state = s.clone(),
            Change::Payload(i, e) => {
                if let Some(i) = pick(i, p.payloads.len()) {
                    apply(&mut p.payloads[i].1, e, &[], &[]);
                }
            }
            Change::HeaderBytes(e) => header_edits.extend(e.iter().cloned()),
            Change::ManifestBytes(e) => manifest_edits.extend(e.iter().cloned()),
            Change::WsBody(e) => ws_edits.extend(e.iter().cloned()),
            Change::WsIndices(list) => {
                p.ws_body.truncate(24.min(p.ws_body.len()));
                if p.ws_body.len() == 24 {
                    p.ws_body[20..24].copy_from_slice(&(list.len() as u32).to_le_bytes());
                }
                for c in list {
                    p.ws_body.extend_from_slice(&c.to_le_bytes());
                }
            }
        }
    }
    let id = p.header.snapshot_id;
    let tag = TAG_PLAINTEXT as u64;

    // The chunk area: payloads back to back (with fixup) or where the seed had them.
    let mut area = Vec::new();
    let header_len = bincode::serde::encode_to_vec(&p.header, bincode_config())
        .unwrap()
        .len();
    let chunks_start = (PREAMBLE_LEN + header_len) as u64 + tag;
    let mut placed = Vec::new();
    for (index, payload) in &p.payloads {
        let guest_addr = chunk_addr(&p.header.regions, p.header.chunk_size, *index);
        let mut sealed = payload.clone();
        sealed.extend_from_slice(&digest(
            nonce(4, *index),
            &chunk_aad(&id, *index, guest_addr),
            payload,
        ));
        placed.push((
            *index,
            chunks_start + area.len() as u64,
            sealed.len() as u32,
        ));
        area.extend_from_slice(&sealed);
    }
    if fixup {
        for (index, offset, len) in placed {
            if let Some(Entry::Data {
                offset: o,
                stored_len,
                ..
            }) = p.manifest.get_mut(index as usize)
            {
                *o = offset;
                *stored_len = len;
            }
        }
    }
    let mut manifest = bincode::serde::encode_to_vec(&p.manifest, bincode_config()).unwrap();
    apply(&mut manifest, &manifest_edits, &[], &[]);
    let mut manifest_sealed = manifest.clone();
    manifest_sealed.extend_from_slice(&digest(
        nonce(3, 0),
        &labelled(b"thaw/manifest", &id),
        &manifest,
    ));
    let mut state_sealed = p.state.clone();
    state_sealed.extend_from_slice(&digest(
        nonce(2, 0),
        &labelled(b"thaw/state", &id),
        &p.state,
    ));
    if fixup {
        let h = &mut p.header;
        h.chunks = Section {
            offset: chunks_start,
            len: area.len() as u64,
        };
        h.state = Section {
            offset: chunks_start + area.len() as u64,
            len: state_sealed.len() as u64,
        };
        h.manifest = Section {
            offset: h.state.offset + h.state.len,
            len: manifest_sealed.len() as u64,
        };
    }
    for c in &sections {
        if let Change::Section(which, is_len, v) = c {
            let s = match which {
                0 => &mut p.header.chunks,
                1 => &mut p.header.state,
                _ => &mut p.header.manifest,
            };
            let field = if *is_len { &mut s.len } else { &mut s.offset };
            *field = match v {
                Value::Exact(x) => *x,
                Value::Delta(d) => field.wrapping_add_signed(*d),
            };
        }
    }
    let mut header = bincode::serde::encode_to_vec(&p.header, bincode_config()).unwrap();
    apply(&mut header, &header_edits, &[], &[]);
    let mut preamble = p.preamble;
    let total = PREAMBLE_LEN
        + header.len()
        + TAG_PLAINTEXT
        + area.len()
        + state_sealed.len()
        + manifest_sealed.len();
    if fixup {
        preamble[16..24].copy_from_slice(&(total as u64).to_le_bytes());
        preamble[24..28].copy_from_slice(&(header.len() as u32).to_le_bytes());
    }
    let mut file = preamble.to_vec();
    file.extend_from_slice(&header);
    let header_tag = digest(nonce(1, 0), &file, &[]);
    file.extend_from_slice(&header_tag);
    file.extend_from_slice(&area);
    file.extend_from_slice(&state_sealed);
    file.extend_from_slice(&manifest_sealed);

    let mut body = p.ws_body.clone();
    apply(&mut body, &ws_edits, &[], &[]);
    let mut ws_pre = p.ws_preamble;
    if fixup {
        ws_pre[44..48].copy_from_slice(&((body.len() + TAG_PLAINTEXT) as u32).to_le_bytes());
    }
    let ws_nonce: [u8; 12] = ws_pre[32..44].try_into().unwrap();
    let mut aad = labelled(b"thaw/working-set", &id);
    aad.extend_from_slice(&ws_pre);
    let mut ws = ws_pre.to_vec();
    ws.extend_from_slice(&body);
    ws.extend_from_slice(&digest(ws_nonce, &aad, &body));
    (file, ws)
}

/// Whether a working-set body is valid for a snapshot of `count` chunks (the spec's checks 8
/// and 9), and the indices it holds.
fn ws_oracle(body: &[u8], count: u64) -> Option<Vec<u32>> {
    if body.len() < 24 {
        return None;
    }
    let n = le_u32(body, 20) as usize;
    if n.checked_mul(4) != Some(body.len() - 24) || !(1..=3).contains(&le_u32(body, 16)) {
        return None;
    }
    let list: Vec<u32> = (0..n).map(|i| le_u32(body, 24 + 4 * i)).collect();
    let mut seen = std::collections::HashSet::new();
    list.iter()
        .all(|&c| u64::from(c) < count && seen.insert(c))
        .then_some(list)
}

/// Opens an authentic (resealed) plaintext snapshot: whatever the reader decides, it does not
/// panic, fail with I/O errors or allocate past the limit; whatever it opens is consistent and
/// reads without panicking, and the working set it took is the one the file holds.
fn check_resealed(seed: &Seed, dir: &Path, ws: &[u8]) -> String {
    let opened = Snapshot::open(dir, None);
    assert_bounded_allocation("open");
    let snap = match opened {
        Err(ReadError::WorkingSet { source, .. }) => {
            assert!(!matches!(source, WorkingSetError::Io(_)), "{source:?}");
            return format!("WorkingSet::{}", label(&source));
        }
        Err(e) => {
            assert_refusal(seed, &e);
            return label(&e);
        }
        Ok(snap) => snap,
    };
    let chunks = snap.chunks();
    // What `thaw snapshot inspect` shows is consistent: the sections tile the file.
    let layout = snap.layout().unwrap();
    assert_eq!(layout.header_tag.end, layout.chunks.start);
    assert_eq!(layout.chunks.end, layout.state.start);
    assert_eq!(layout.state.end, layout.manifest.start);
    assert_eq!(layout.manifest.end, layout.file_len);
    for (_, range) in &layout.data_chunks {
        assert!(layout.chunks.start <= range.start && range.end <= layout.chunks.end);
    }
    let info = snap.info();
    assert_eq!(info.chunk_count, chunks.len() as u64);
    assert!(!info.to_string().is_empty());
    let total: u64 = snap.regions().iter().map(|r| r.size).sum();
    assert_eq!(chunks.iter().map(|c| u64::from(c.len)).sum::<u64>(), total);
    for c in chunks {
        assert!(
            c.len > 0 && c.len <= snap.chunk_size() && c.len % 4096 == 0,
            "{c:?}"
        );
    }
    let body = &ws[WORKING_SET_PREAMBLE_LEN..ws.len() - TAG_PLAINTEXT];
    assert_eq!(
        snap.working_set().map(|w| w.chunks.clone()),
        ws_oracle(body, chunks.len() as u64),
        "the working set taken is not the one the file holds"
    );
    for (index, info) in chunks.iter().enumerate() {
        let mut out = vec![0u8; info.len as usize];
        for read in [
            snap.read_chunk(index, &mut out),
            snap.read_chunk_authenticated(index, &mut out),
        ] {
            match read {
                Ok(()) => {}
                Err(
                    ReadError::ChunkTampered { index: i }
                    | ReadError::ChunkCorrupt { index: i, .. },
                ) if i == index => {}
                Err(e) => panic!("chunk {index}: {e:?}"),
            }
        }
    }
    match snap.authenticate_chunks() {
        Ok(_) | Err(ReadError::ChunkTampered { .. }) => {}
        Err(e) => panic!("authenticate_chunks: {e:?}"),
    }
    assert_bounded_allocation("reading chunks");
    "opened".to_owned()
}

/// Beside the seed's own snapshot (so the chunk count is known), a resealed working set with
/// the seed's preamble and a consistent length is accepted exactly when the spec says it is
/// valid, and holds what the file holds.
fn check_working_set_against_spec(seed: &Seed, dir: &Path, ws: &[u8]) {
    let count = seed.chunks.len() as u64;
    let body = &ws[WORKING_SET_PREAMBLE_LEN..ws.len() - TAG_PLAINTEXT];
    let max = (WORKING_SET_PREAMBLE_LEN + 24 + TAG_PLAINTEXT) as u64 + 4 * count;
    let expected = if ws.len() as u64 > max {
        None
    } else {
        ws_oracle(body, count)
    };
    match (Snapshot::open(dir, None), expected) {
        (Ok(snap), Some(list)) => {
            assert_eq!(snap.working_set().map(|w| w.chunks.clone()), Some(list))
        }
        (
            Err(ReadError::WorkingSet {
                source:
                    WorkingSetError::Malformed { .. }
                    | WorkingSetError::ChunkOutOfRange { .. }
                    | WorkingSetError::Duplicate { .. }
                    | WorkingSetError::TooLarge { .. },
                ..
            }),
            None,
        ) => {}
        (got, expected) => panic!("{}: working set {expected:?} answered {got:?}", seed.name),
    }
}

// ---------------------------------------------------------------------------------------------
// The properties.

fn write_files(dir: &Path, snap: &[u8], ws: &[u8]) {
    std::fs::write(dir.join(SNAPSHOT_FILE), snap).unwrap();
    std::fs::write(dir.join(WORKING_SET_FILE), ws).unwrap();
}

#[test]
fn unmutated_seeds_open_verify_and_read_back() {
    let _serial = fuzz_harness::exclusive();
    let dir = tempfile::tempdir().unwrap();
    for seed in seeds() {
        write_files(dir.path(), &seed.snap, &seed.ws);
        check_damaged(seed, dir.path(), false);
        let snap = Snapshot::open(dir.path(), seed.key().as_ref()).unwrap();
        snap.verify(1).unwrap();
    }
    // The plaintext seeds taken apart and laid out again are byte for byte the seeds, so the
    // resealing property starts from valid files.
    for seed in plaintext_seeds() {
        let parts = take_apart(seed);
        let (snap, ws) = assemble(&parts, &[], true);
        assert!(snap == seed.snap, "{}: reassembly differs", seed.name);
        assert!(
            ws == seed.ws,
            "{}: working-set reassembly differs",
            seed.name
        );
        let (snap, ws) = assemble(&parts, &[], false);
        assert!(snap == seed.snap && ws == seed.ws, "{}", seed.name);
    }
    assert_bounded_allocation("seeds");
}

/// Claims of absurd sizes in an authentic header, manifest or working set are refused before
/// anything of that size is allocated.
#[test]
fn huge_claims_are_refused_without_allocating_them() {
    let _serial = fuzz_harness::exclusive();
    let seed = plaintext_seeds()[1];
    let parts = take_apart(seed);
    let dir = tempfile::tempdir().unwrap();
    let exact = Value::Exact;
    let refuse = |what: &str, snap: &[u8], ws: &[u8]| -> ReadError {
        write_files(dir.path(), snap, ws);
        reset();
        let err = Snapshot::open(dir.path(), None).expect_err(what);
        assert_refusal(seed, &err);
        assert_bounded_allocation(what);
        err
    };

    // Section lengths, chunk counts and memory sizes in the header's fields.
    let cases: Vec<(&str, Vec<Change>)> = vec![
        (
            "state length 1 TiB",
            vec![Change::Section(1, true, exact(1 << 40))],
        ),
        (
            "manifest length 1 TiB",
            vec![Change::Section(2, true, exact(1 << 40))],
        ),
        ("chunk count 2^40", vec![Change::ChunkCount(1 << 40)]),
        (
            "1 TiB in 4 KiB chunks",
            vec![
                Change::RegionSize(At::FIRST, 1 << 39),
                Change::RegionSize(At::LAST, 1 << 39),
                Change::ChunkSize(4096),
                Change::ChunkCount(1 << 28),
            ],
        ),
        (
            "a region of 2^64 - 4 KiB",
            vec![Change::RegionSize(At::FIRST, u64::MAX - 4095)],
        ),
    ];
    for (what, changes) in cases {
        let (snap, ws) = assemble(&parts, &changes, true);
        let err = refuse(what, &snap, &ws);
        assert!(
            matches!(err, ReadError::HeaderInvalid { .. }),
            "{what}: {err:?}"
        );
    }

    // Lengths inside the header's and the manifest's encodings: a string, a list or a bitmap
    // claiming more than the file holds.
    let vendor_at = 45 + 16 * parts.header.regions.len();
    // The manifest: entry count (8), then entry 0 (a Data chunk): variant (4), offset (8),
    // stored_len (4), raw (1), then its bitmap's length.
    assert!(matches!(parts.manifest[0], Entry::Data { .. }));
    let bitmap_at = 8 + 4 + 8 + 4 + 1;
    for claim in [5_000_000, u64::from(u32::MAX), 400 << 20, 1 << 40, u64::MAX] {
        let bytes = claim.to_le_bytes().to_vec();
        for (what, change) in [
            (
                "a vendor string",
                Change::HeaderBytes(vec![Edit::Write {
                    at: vendor_at,
                    bytes: bytes.clone(),
                }]),
            ),
            (
                "the manifest's entry count",
                Change::ManifestBytes(vec![Edit::Write {
                    at: 0,
                    bytes: bytes.clone(),
                }]),
            ),
            (
                "a page bitmap",
                Change::ManifestBytes(vec![Edit::Write {
                    at: bitmap_at,
                    bytes: bytes.clone(),
                }]),
            ),
        ] {
            let (snap, ws) = assemble(&parts, &[change], true);
            let what = format!("{what} claiming {claim} bytes");
            let err = refuse(&what, &snap, &ws);
            assert!(
                matches!(
                    err,
                    ReadError::HeaderMalformed { .. }
                        | ReadError::HeaderInvalid { .. }
                        | ReadError::ManifestInvalid { .. }
                ),
                "{what}: {err:?}"
            );
        }
    }

    // The preamble's own lengths are checked before anything is read.
    for (at, bytes) in [
        (24, u32::MAX.to_le_bytes().to_vec()),
        (16, u64::MAX.to_le_bytes().to_vec()),
        (16, (1u64 << 40).to_le_bytes().to_vec()),
    ] {
        let mut snap = seed.snap.clone();
        apply(&mut snap, &[Edit::Write { at, bytes }], &[], &[]);
        refuse("preamble lengths", &snap, &seed.ws);
    }
    // A working set claiming 4 GiB of body, or 2^32 - 1 indices in a resealed body.
    let mut ws = seed.ws.clone();
    ws[44..48].copy_from_slice(&u32::MAX.to_le_bytes());
    let err = refuse("working-set length", &seed.snap, &ws);
    assert!(
        matches!(
            err,
            ReadError::WorkingSet {
                source: WorkingSetError::Truncated { .. },
                ..
            }
        ),
        "{err:?}"
    );
    let change = Change::WsBody(vec![Edit::Write {
        at: 20,
        bytes: u32::MAX.to_le_bytes().to_vec(),
    }]);
    let (snap, ws) = assemble(&parts, &[change], true);
    let err = refuse("working-set count", &snap, &ws);
    assert!(
        matches!(
            err,
            ReadError::WorkingSet {
                source: WorkingSetError::Malformed { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

/// Mutated `snapshot.thaw` files are refused, or open unchanged and refuse the damaged chunk.
#[test]
fn mutated_snapshot_files_are_refused() {
    fuzz!("mutated snapshot.thaw", CASES, (at(), edits()), |(
        which,
        edits,
    )| {
        reset();
        let all = seeds();
        let seed = &all[which.index(all.len())];
        let donors: Vec<&[u8]> = all.iter().map(|s| s.snap.as_slice()).collect();
        let mut bytes = seed.snap.clone();
        apply(&mut bytes, &edits, &donors, &seed.snap_fields);
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path(), &bytes, &seed.ws);
        let outcome = check_damaged(seed, dir.path(), bytes != seed.snap);
        assert_bounded_allocation("mutated snapshot");
        Ok(outcome)
    },);
}

/// Mutated `working-set.thaw` files beside an intact snapshot are refused, naming the
/// working set.
#[test]
fn mutated_working_sets_are_refused() {
    fuzz!("mutated working-set.thaw", CASES, (at(), edits()), |(
        which,
        edits,
    )| {
        reset();
        let all = seeds();
        let seed = &all[which.index(all.len())];
        let donors: Vec<&[u8]> = all.iter().map(|s| s.ws.as_slice()).collect();
        let mut bytes = seed.ws.clone();
        apply(&mut bytes, &edits, &donors, &seed.ws_fields);
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path(), &seed.snap, &bytes);
        let opened = Snapshot::open(dir.path(), seed.key().as_ref());
        let outcome = if bytes == seed.ws {
            let snap = opened.unwrap();
            prop_assert_eq!(snap.working_set(), Some(&seed.working_set));
            "unchanged".to_owned()
        } else {
            match opened {
                Err(ReadError::WorkingSet { source, .. }) => {
                    prop_assert!(!matches!(source, WorkingSetError::Io(_)), "{source:?}");
                    label(&source)
                }
                Err(e) => {
                    return Err(TestCaseError::fail(format!(
                        "{}: refused for another reason: {e:?}",
                        seed.name
                    )));
                }
                Ok(s) => {
                    return Err(TestCaseError::fail(format!(
                        "{}: changed working set accepted: {:?}",
                        seed.name,
                        s.working_set()
                    )));
                }
            }
        };
        assert_bounded_allocation("mutated working set");
        Ok(outcome)
    },);
}

/// Authentic but inconsistent plaintext snapshots and working sets: the checks after
/// authentication hold.
#[test]
fn resealed_plaintext_nonsense_is_handled() {
    let strategy = (
        at(),
        proptest::collection::vec(change(), 1..4),
        prop_oneof![3 => Just(true), 1 => Just(false)],
    );
    fuzz!("resealed plaintext snapshot", CASES, strategy, |(
        which,
        changes,
        fixup,
    )| {
        reset();
        let plain = plaintext_seeds();
        let seed = plain[which.index(plain.len())];
        let parts = take_apart(seed);
        let (snap, ws) = assemble(&parts, &changes, fixup);
        reset();
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path(), &snap, &ws);
        let outcome = check_resealed(seed, dir.path(), &ws);
        let consistent = ws.len() >= WORKING_SET_PREAMBLE_LEN + TAG_PLAINTEXT
            && ws[..44] == seed.ws[..44]
            && le_u32(&ws, 44) as usize == ws.len() - WORKING_SET_PREAMBLE_LEN;
        if snap == seed.snap && consistent {
            check_working_set_against_spec(seed, dir.path(), &ws);
        }
        Ok(outcome)
    },);
}

#[test]
fn gcm_tag_length_matches_the_spec() {
    // The encrypted seeds' working sets are preamble ‖ 24 + 4n bytes ‖ 16-byte tag.
    for seed in seeds().iter().filter(|s| !s.plaintext()) {
        let n = seed.working_set.chunks.len();
        assert_eq!(
            seed.ws.len(),
            WORKING_SET_PREAMBLE_LEN + 24 + 4 * n + GCM_TAG
        );
    }
}

//! Golden bytes of the snapshot file format: a tiny snapshot (two regions; a Data chunk with
//! zero pages, a Zero chunk and a short last chunk; a state; a manifest) and its working set,
//! written by this build's writer, encrypted and insecure-plaintext, are compared byte for byte
//! with `snapshot/tests/golden/format-v<FORMAT_VERSION>-ws-v<WORKING_SET_VERSION>/`.
//!
//! Why not a seam in the writer for fixed randomness: production code stays as it is, and the
//! test gets stronger. The writer draws five things at random or from the clock (snapshot id,
//! creation time, data key, key-wrap nonce, the working set's nonce); they sit at documented
//! places. [`restamp`] replaces them with fixed values and recomputes every seal with this
//! file's own implementation of docs/snapshot-format.md (RustCrypto's AES-GCM where the crate
//! uses ring, BLAKE3 digests for plaintext). Opening the writer's seals with the documented
//! nonces and AADs checks the writer against the spec; opening the restamped files with this
//! build's reader checks the spec implementation here; the comparison then pins every byte:
//! preamble, header, chunk payloads, state, manifest, tags and the working set. The committed
//! goldens must also still open and read back (a reader regression on version-1 files).
//!
//! Chunk data is incompressible, so payloads are stored raw and do not depend on zstd's version.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

use std::ops::Range;
use std::path::{Path, PathBuf};

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use snapshot::{
    ChunkKind, CpuIdentity, CpuidEntry, FORMAT_VERSION, Fingerprint, MasterKey, MemoryRegion,
    PREAMBLE_LEN, Protection, RecordingEnd, SNAPSHOT_FILE, Snapshot, SnapshotMeta,
    WORKING_SET_FILE, WORKING_SET_PREAMBLE_LEN, WORKING_SET_VERSION, WorkingSet, WriteOptions,
};

const PAGE: usize = 4096;
const CHUNK: usize = 4 * PAGE;
const HIGH: u64 = 0x10_0000;
const STATE: &[u8] = b"golden machine state: opaque bytes to the snapshot crate";
const MASTER: [u8; 32] = [0x4b; 32];
/// The fixed values [`restamp`] puts where the writer drew random ones or read the clock.
const ID: [u8; 16] = *b"thaw golden id v";
const CREATED: u64 = 1_767_225_600_123_456_789;
const DATA_KEY: [u8; 32] = [0xd7; 32];
const WRAP_NONCE: [u8; 12] = [0x3a; 12];
const WS_NONCE_TAIL: [u8; 8] = *b"ws-nonce";
const RULE: &str = "Within a FORMAT_VERSION (and WORKING_SET_VERSION) these bytes must not \
    change (docs/snapshot-format.md, \"Compatibility\"): a field added, removed, moved or \
    retyped, another nonce, AAD or tag rule needs a version bump, and then \
    `THAW_BLESS=1 cargo test -p snapshot --test golden_format` writes the new version's goldens.";

fn xorshift(seed: u64, out: &mut [u8]) {
    let mut x = seed | 1;
    for b in out {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 32) as u8;
    }
}

/// Region 0 (at 0, two chunks): pages data, zero, data, zero; then a zero chunk. Region 1 (at
/// 1 MiB, one short chunk): a zero page, a data page.
fn memory() -> (Vec<u8>, Vec<u8>) {
    let mut a = vec![0u8; 2 * CHUNK];
    xorshift(1, &mut a[..PAGE]);
    xorshift(2, &mut a[2 * PAGE..3 * PAGE]);
    let mut b = vec![0u8; 2 * PAGE];
    xorshift(3, &mut b[PAGE..]);
    (a, b)
}

fn meta() -> SnapshotMeta {
    let entry = |function, eax| CpuidEntry {
        function,
        index: 0,
        flags: 1,
        eax,
        ebx: 0x756e_6547,
        ecx: 0x6c65_746e,
        edx: 0x4965_6e69,
    };
    SnapshotMeta {
        fingerprint: Fingerprint {
            cpu: CpuIdentity {
                vendor: "GenuineIntel".into(),
                family: 6,
                model: 0x55,
                stepping: 7,
            },
            guest_cpuid: vec![entry(0, 0xd), entry(1, 0x5_0657)],
            kvm_flavor: "pvm".into(),
            host_page_size: 4096,
        },
        vcpus: 2,
    }
}

fn working_set() -> WorkingSet {
    WorkingSet {
        chunks: vec![2, 0],
        recorded_unix_nanos: 1_767_225_601_000_000_042,
        faults: 7,
        ended_by: RecordingEnd::Timeout,
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Plaintext,
    Encrypted,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Plaintext => "plaintext",
            Mode::Encrypted => "encrypted",
        }
    }

    fn key(self) -> Option<MasterKey> {
        (self == Mode::Encrypted).then(|| MasterKey::from_bytes(MASTER))
    }
}

/// The sealing of docs/snapshot-format.md, implemented here independently of the crate.
enum Sealer {
    Plaintext,
    Gcm(Box<Aes256Gcm>),
}

fn nonce(domain: u32, counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&domain.to_le_bytes());
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n
}

fn labelled(label: &[u8], id: &[u8], more: &[u8]) -> Vec<u8> {
    [label, id, more].concat()
}

fn chunk_aad(id: &[u8], index: u64, addr: u64) -> Vec<u8> {
    labelled(id, &index.to_le_bytes(), &addr.to_le_bytes())
}

impl Sealer {
    fn gcm(key: &[u8]) -> Self {
        Sealer::Gcm(Box::new(Aes256Gcm::new_from_slice(key).unwrap()))
    }

    fn digest(nonce: [u8; 12], aad: &[u8], data: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(&nonce);
        h.update(&(aad.len() as u64).to_le_bytes());
        h.update(aad);
        h.update(data);
        *h.finalize().as_bytes()
    }

    fn seal(&self, nonce: [u8; 12], aad: &[u8], data: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        match self {
            Sealer::Plaintext => out.extend_from_slice(&Self::digest(nonce, aad, data)),
            Sealer::Gcm(k) => k
                .encrypt_in_place(Nonce::from_slice(&nonce), aad, &mut out)
                .unwrap(),
        }
        out
    }

    fn open(&self, nonce: [u8; 12], aad: &[u8], sealed: &[u8], what: &str) -> Vec<u8> {
        let mut out = sealed.to_vec();
        let ok = match self {
            Sealer::Plaintext => {
                let tag = out.split_off(out.len() - 32);
                tag == Self::digest(nonce, aad, &out)
            }
            Sealer::Gcm(k) => k
                .decrypt_in_place(Nonce::from_slice(&nonce), aad, &mut out)
                .is_ok(),
        };
        assert!(
            ok,
            "{what}: the writer's seal does not open with the nonce and AAD \
             docs/snapshot-format.md gives\n{RULE}"
        );
        out
    }
}

fn range(r: &Range<u64>) -> Range<usize> {
    r.start as usize..r.end as usize
}

/// A snapshot and its working set as files, and where their parts lie.
struct Files {
    snapshot: Vec<u8>,
    working_set: Vec<u8>,
    layout: snapshot::FileLayout,
}

/// Writes the fixture snapshot and its working set with this build's writer.
fn write_fixture(mode: Mode, dir: &Path) -> (Files, Vec<u64>) {
    let (a, b) = memory();
    let regions = [
        MemoryRegion {
            guest_addr: 0,
            bytes: &a,
        },
        MemoryRegion {
            guest_addr: HIGH,
            bytes: &b,
        },
    ];
    let key = mode.key();
    let protection = match &key {
        Some(k) => Protection::Encrypted(k),
        None => Protection::InsecurePlaintext,
    };
    let options = WriteOptions {
        chunk_size: CHUNK as u32,
        zstd_level: 3,
        threads: 1,
        replace: false,
    };
    snapshot::write(dir, &meta(), STATE, &regions, &protection, &options).unwrap();
    let snap = Snapshot::open(dir, key.as_ref()).unwrap();
    snap.write_working_set(dir, &working_set()).unwrap();
    let addrs = snap.chunks().iter().map(|c| c.guest_addr).collect();
    let files = Files {
        snapshot: std::fs::read(dir.join(SNAPSHOT_FILE)).unwrap(),
        working_set: std::fs::read(dir.join(WORKING_SET_FILE)).unwrap(),
        layout: snap.layout().unwrap(),
    };
    (files, addrs)
}

/// Replaces what the writer drew at random or from the clock with fixed values and reseals
/// everything (see the module docs).
fn restamp(mode: Mode, files: &Files, addrs: &[u64]) -> Files {
    let (old, l) = (&files.snapshot, &files.layout);
    let old_id = old[PREAMBLE_LEN..PREAMBLE_LEN + 16].to_vec();
    let mut new = old.clone();
    new[PREAMBLE_LEN..PREAMBLE_LEN + 16].copy_from_slice(&ID);
    new[PREAMBLE_LEN + 16..PREAMBLE_LEN + 24].copy_from_slice(&CREATED.to_le_bytes());
    let (old_sealer, new_sealer) = match mode {
        Mode::Plaintext => (Sealer::Plaintext, Sealer::Plaintext),
        Mode::Encrypted => {
            let master = Sealer::gcm(&MASTER);
            let wrap_aad = labelled(b"thaw snapshot v1 data key wrap", &old[32..48], &[]);
            let wrap_nonce: [u8; 12] = old[48..60].try_into().unwrap();
            let data_key = master.open(wrap_nonce, &wrap_aad, &old[60..108], "wrapped key");
            new[48..60].copy_from_slice(&WRAP_NONCE);
            new[60..108].copy_from_slice(&master.seal(WRAP_NONCE, &wrap_aad, &DATA_KEY));
            (Sealer::gcm(&data_key), Sealer::gcm(&DATA_KEY))
        }
    };
    let mut reseal = |r: &Range<u64>, n, old_aad: Vec<u8>, new_aad: Vec<u8>, what: &str| {
        let plain = old_sealer.open(n, &old_aad, &old[range(r)], what);
        new[range(r)].copy_from_slice(&new_sealer.seal(n, &new_aad, &plain));
    };
    for (index, r) in &l.data_chunks {
        let (i, addr) = (*index as u64, addrs[*index]);
        let what = format!("chunk {i}");
        reseal(
            r,
            nonce(4, i),
            chunk_aad(&old_id, i, addr),
            chunk_aad(&ID, i, addr),
            &what,
        );
    }
    let aads = |label: &[u8]| (labelled(label, &old_id, &[]), labelled(label, &ID, &[]));
    let (old_aad, new_aad) = aads(b"thaw/state");
    reseal(&l.state, nonce(2, 0), old_aad, new_aad, "state");
    let (old_aad, new_aad) = aads(b"thaw/manifest");
    reseal(&l.manifest, nonce(3, 0), old_aad, new_aad, "manifest");
    let (front, tag) = (range(&(0..l.header.end)), range(&l.header_tag));
    old_sealer.open(
        nonce(1, 0),
        &old[front.clone()],
        &old[tag.clone()],
        "header tag",
    );
    let header_tag = new_sealer.seal(nonce(1, 0), &new[front], &[]);
    new[tag].copy_from_slice(&header_tag);

    let (ws, pre) = (&files.working_set, WORKING_SET_PREAMBLE_LEN);
    assert_eq!(ws[16..32], old_id[..], "the working set names its snapshot");
    let old_nonce: [u8; 12] = ws[32..44].try_into().unwrap();
    assert_eq!(
        old_nonce[..4],
        5u32.to_le_bytes(),
        "working-set nonce domain"
    );
    let old_aad = labelled(b"thaw/working-set", &old_id, &ws[..pre]);
    let body = old_sealer.open(old_nonce, &old_aad, &ws[pre..], "working set");
    let mut new_ws = ws[..pre].to_vec();
    new_ws[16..32].copy_from_slice(&ID);
    new_ws[36..44].copy_from_slice(&WS_NONCE_TAIL);
    let new_nonce: [u8; 12] = new_ws[32..44].try_into().unwrap();
    let new_aad = labelled(b"thaw/working-set", &ID, &new_ws);
    new_ws.extend_from_slice(&new_sealer.seal(new_nonce, &new_aad, &body));
    Files {
        snapshot: new,
        working_set: new_ws,
        layout: l.clone(),
    }
}

fn golden_dir(mode: Mode) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!(
            "format-v{FORMAT_VERSION}-ws-v{WORKING_SET_VERSION}"
        ))
        .join(mode.name())
}

/// The documented field at `offset` of a fixed-layout part, from a table of (start, len, name).
fn field_at(table: &[(usize, usize, &'static str)], offset: usize) -> Option<&'static str> {
    table
        .iter()
        .find(|(start, len, _)| (*start..start + len).contains(&offset))
        .map(|t| t.2)
}

/// Names the part of `snapshot.thaw` at `offset` (docs/snapshot-format.md's field names).
fn snapshot_part(l: &snapshot::FileLayout, offset: u64) -> String {
    const PREAMBLE: &[(usize, usize, &str)] = &[
        (0, 8, "magic"),
        (8, 4, "format_version"),
        (12, 4, "protection"),
        (16, 8, "file_len"),
        (24, 4, "header_len"),
        (28, 4, "reserved"),
        (32, 16, "key_id"),
        (48, 12, "wrap_nonce"),
        (60, 48, "wrapped_key"),
        (108, 4, "reserved"),
    ];
    const HEADER: &[(usize, usize, &str)] = &[
        (0, 16, "snapshot_id"),
        (16, 8, "created_unix_nanos"),
        (24, 4, "chunk_size"),
        (28, 4, "page_size"),
        (32, 1, "vcpus"),
        (33, 4, "zstd_level"),
        (37, 8, "regions (count)"),
    ];
    let inside = |r: &Range<u64>| r.contains(&offset).then(|| (offset - r.start) as usize);
    if let Some(at) = inside(&l.preamble) {
        return format!("preamble.{}", field_at(PREAMBLE, at).unwrap_or("?"));
    }
    if let Some(at) = inside(&l.header) {
        let field = field_at(HEADER, at).unwrap_or("regions, fingerprint, chunk_count or sections");
        return format!("header byte {at} ({field})");
    }
    if inside(&l.header_tag).is_some() {
        return "header tag".into();
    }
    for (index, r) in &l.data_chunks {
        if let Some(at) = inside(r) {
            return format!("chunk {index}, byte {at} of its payload ‖ tag");
        }
    }
    for (name, r) in [("state", &l.state), ("manifest", &l.manifest)] {
        if let Some(at) = inside(r) {
            return format!("{name} section, byte {at} (of its plaintext, or its tag)");
        }
    }
    "past the end of the file".into()
}

/// Names the part of `working-set.thaw` at `offset`.
fn working_set_part(offset: u64) -> String {
    const FIELDS: &[(usize, usize, &str)] = &[
        (0, 8, "magic"),
        (8, 4, "version"),
        (12, 4, "protection"),
        (16, 16, "snapshot_id"),
        (32, 12, "nonce"),
        (44, 4, "sealed_len"),
        (48, 8, "body.recorded_unix_nanos"),
        (56, 8, "body.faults"),
        (64, 4, "body.ended_by"),
        (68, 4, "body.count"),
    ];
    let field = field_at(FIELDS, offset as usize).unwrap_or("body.chunks or the tag");
    format!("{field} (byte {offset})")
}

/// Compares `actual` with the golden file, or writes it when blessing: `THAW_BLESS=1` writes a
/// golden that does not exist yet, `THAW_BLESS=overwrite` also replaces one (for a change to
/// this test's fixture only, never to the format within its version).
fn check_golden(path: &Path, actual: &[u8], part: impl Fn(u64) -> String) {
    let bless = std::env::var("THAW_BLESS").unwrap_or_default();
    let write = || {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, actual).unwrap();
        println!("blessed {} ({} bytes)", path.display(), actual.len());
    };
    match std::fs::read(path) {
        Ok(golden) if golden == actual => {}
        Ok(_) if bless == "overwrite" => write(),
        Ok(golden) => {
            let at = golden
                .iter()
                .zip(actual)
                .position(|(g, a)| g != a)
                .unwrap_or(golden.len().min(actual.len()));
            let window = |b: &[u8]| format!("{:02x?}", &b[at.min(b.len())..(at + 12).min(b.len())]);
            panic!(
                "{} no longer matches: golden {} bytes, now {}; first difference at byte {at} \
                 ({:#x}), in {}: golden {} vs now {}\n{RULE}",
                path.display(),
                golden.len(),
                actual.len(),
                at,
                part(at as u64),
                window(&golden),
                window(actual)
            )
        }
        Err(_) if bless == "1" || bless == "overwrite" => write(),
        Err(e) => panic!(
            "{}: {e}; run with THAW_BLESS=1 to write this version's golden",
            path.display()
        ),
    }
}

fn files_match_their_golden_bytes(mode: Mode) {
    let tmp = tempfile::tempdir().unwrap();
    let (written, addrs) = write_fixture(mode, &tmp.path().join("written"));
    let stamped = restamp(mode, &written, &addrs);
    // The restamped files are a valid snapshot for this build's reader, so the sealing above
    // is the reader's.
    let check = tmp.path().join("stamped");
    std::fs::create_dir(&check).unwrap();
    std::fs::write(check.join(SNAPSHOT_FILE), &stamped.snapshot).unwrap();
    std::fs::write(check.join(WORKING_SET_FILE), &stamped.working_set).unwrap();
    let reopened = Snapshot::open(&check, mode.key().as_ref()).unwrap();
    assert_eq!(
        reopened.id().to_string(),
        "7468617720676f6c64656e2069642076"
    );
    assert_eq!(reopened.working_set(), Some(&working_set()));

    let dir = golden_dir(mode);
    let layout = stamped.layout.clone();
    check_golden(&dir.join(SNAPSHOT_FILE), &stamped.snapshot, |at| {
        snapshot_part(&layout, at)
    });
    check_golden(
        &dir.join(WORKING_SET_FILE),
        &stamped.working_set,
        working_set_part,
    );
}

#[test]
fn plaintext_snapshot_files_match_their_golden_bytes() {
    files_match_their_golden_bytes(Mode::Plaintext);
}

#[test]
fn encrypted_snapshot_files_match_their_golden_bytes() {
    files_match_their_golden_bytes(Mode::Encrypted);
}

#[test]
fn committed_golden_snapshots_still_open_and_read_back_their_contents() {
    let (a, b) = memory();
    for mode in [Mode::Plaintext, Mode::Encrypted] {
        let dir = golden_dir(mode);
        if std::env::var_os("THAW_BLESS").is_some() && !dir.join(WORKING_SET_FILE).exists() {
            continue; // being written by the tests above
        }
        let snap = Snapshot::open(&dir, mode.key().as_ref())
            .unwrap_or_else(|e| panic!("{}: {e}\n{RULE}", dir.display()));
        let reads = |what: &str| format!("{mode:?} golden: {what} reads back otherwise\n{RULE}");
        assert_eq!(snap.state(), STATE, "{}", reads("the state"));
        assert_eq!(snap.vcpus(), 2, "{}", reads("the vCPU count"));
        assert_eq!(
            snap.chunk_size(),
            CHUNK as u32,
            "{}",
            reads("the chunk size")
        );
        assert_eq!(
            snap.fingerprint(),
            &meta().fingerprint,
            "{}",
            reads("the fingerprint")
        );
        assert_eq!(
            snap.working_set(),
            Some(&working_set()),
            "{}",
            reads("the working set")
        );
        let kinds: Vec<_> = snap.chunks().iter().map(|c| c.kind).collect();
        assert_eq!(kinds, [ChunkKind::Data, ChunkKind::Zero, ChunkKind::Data]);
        let mut memory = Vec::new();
        for (i, c) in snap.chunks().iter().enumerate() {
            let mut out = vec![0xaa; c.len as usize];
            snap.read_chunk(i, &mut out).unwrap();
            memory.extend_from_slice(&out);
        }
        assert!(
            memory == [a.clone(), b.clone()].concat(),
            "{mode:?}: memory"
        );
        snap.verify(1).unwrap();
    }
}

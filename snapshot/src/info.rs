//! `Info`: what `thaw snapshot info` shows about an opened snapshot, for people (`Display`) and
//! for scripts (`Serialize`, for `--json`). Plaintext snapshots are flagged in both.

use std::fmt;

use serde::Serialize;

use crate::fingerprint::Fingerprint;
use crate::format::{Header, PAGE_SIZE, RegionDesc, SnapshotId};
use crate::keys::KeyId;

const PLAINTEXT_WARNING: &str =
    "INSECURE PLAINTEXT SNAPSHOT: guest memory and state are NOT encrypted and NOT authenticated";

#[derive(Clone, Debug, Serialize)]
pub struct Info {
    pub format_version: u32,
    pub snapshot_id: SnapshotId,
    pub created_unix_nanos: u64,
    pub encrypted: bool,
    /// "aes-256-gcm" or "insecure-plaintext".
    pub protection: &'static str,
    /// Present (and loud) for plaintext snapshots.
    pub warning: Option<&'static str>,
    /// Id of the master key that wraps the data key (hex), for encrypted snapshots.
    pub key_id: Option<String>,
    pub fingerprint: Fingerprint,
    pub vcpus: u8,
    pub regions: Vec<RegionDesc>,
    pub memory_bytes: u64,
    pub chunk_size: u32,
    pub zstd_level: i32,
    pub chunk_count: u64,
    pub zero_chunks: u64,
    /// 4 KiB pages that are all zero (stored as nothing).
    pub zero_pages: u64,
    /// zero_pages as a share of all pages, 0..=1.
    pub zero_page_share: f64,
    /// The snapshot file's size; 0 for a snapshot read from an object store.
    pub file_bytes: u64,
    /// Sealed chunk bytes, tags included; 0 for a snapshot read from an object store (its
    /// manifest does not carry the objects' sizes).
    pub memory_payload_bytes: u64,
    /// memory_payload_bytes ÷ non-zero memory bytes; `None` when all memory is zero or the
    /// payload is not known.
    pub compression_ratio: Option<f64>,
    /// Chunks in the recorded working set; `None` when none is recorded.
    pub working_set_chunks: Option<u64>,
    /// Guest memory those chunks cover.
    pub working_set_bytes: Option<u64>,
}

/// What `Info` needs of each chunk: `None` for a zero chunk, else its non-zero pages and the
/// sealed bytes that hold it.
pub(crate) type ChunkStats = Option<(u64, u64)>;

impl Info {
    /// `key_id` is the master key's for an encrypted snapshot, `None` for a plaintext one.
    pub(crate) fn new(
        format_version: u32,
        header: &Header,
        chunks: impl Iterator<Item = ChunkStats>,
        file_bytes: u64,
        key_id: Option<KeyId>,
        working_set: Option<(u64, u64)>,
    ) -> Info {
        let encrypted = key_id.is_some();
        let memory_bytes: u64 = header.regions.iter().map(|r| r.size).sum();
        let total_pages = memory_bytes / PAGE_SIZE as u64;
        let (mut zero_chunks, mut present_pages, mut payload) = (0u64, 0u64, 0u64);
        for chunk in chunks {
            match chunk {
                None => zero_chunks += 1,
                Some((pages, stored)) => {
                    present_pages += pages;
                    payload += stored;
                }
            }
        }
        let zero_pages = total_pages.saturating_sub(present_pages);
        let nonzero_bytes = present_pages * PAGE_SIZE as u64;
        Info {
            format_version,
            snapshot_id: SnapshotId(header.snapshot_id),
            created_unix_nanos: header.created_unix_nanos,
            encrypted,
            protection: if encrypted {
                "aes-256-gcm"
            } else {
                "insecure-plaintext"
            },
            warning: (!encrypted).then_some(PLAINTEXT_WARNING),
            key_id: key_id.map(|id| id.to_string()),
            fingerprint: header.fingerprint.clone(),
            vcpus: header.vcpus,
            regions: header.regions.clone(),
            memory_bytes,
            chunk_size: header.chunk_size,
            zstd_level: header.zstd_level,
            chunk_count: header.chunk_count,
            zero_chunks,
            zero_pages,
            zero_page_share: if total_pages == 0 {
                0.0
            } else {
                zero_pages as f64 / total_pages as f64
            },
            file_bytes,
            memory_payload_bytes: payload,
            compression_ratio: (nonzero_bytes > 0 && payload > 0)
                .then(|| payload as f64 / nonzero_bytes as f64),
            working_set_chunks: working_set.map(|(chunks, _)| chunks),
            working_set_bytes: working_set.map(|(_, bytes)| bytes),
        }
    }
}

impl fmt::Display for Info {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(w) = self.warning {
            writeln!(f, "!!! {w} !!!")?;
        }
        writeln!(
            f,
            "snapshot {} (format v{})",
            self.snapshot_id, self.format_version
        )?;
        let secs = self.created_unix_nanos / 1_000_000_000;
        writeln!(f, "created: {secs} s since the Unix epoch")?;
        match &self.key_id {
            Some(id) => writeln!(f, "protection: {} (master key id {id})", self.protection)?,
            None => writeln!(f, "protection: {}", self.protection)?,
        }
        let fp = &self.fingerprint;
        writeln!(
            f,
            "host: {} family {:#x} model {:#x} stepping {}, KVM {}, {}-byte pages, {} guest CPUID entries",
            fp.cpu.vendor,
            fp.cpu.family,
            fp.cpu.model,
            fp.cpu.stepping,
            fp.kvm_flavor,
            fp.host_page_size,
            fp.guest_cpuid.len()
        )?;
        writeln!(f, "vCPUs: {}", self.vcpus)?;
        for r in &self.regions {
            writeln!(
                f,
                "region: {:#x}..{:#x} ({} MiB)",
                r.guest_addr,
                r.guest_addr + r.size,
                r.size >> 20
            )?;
        }
        writeln!(
            f,
            "memory: {} bytes in {} chunks of {} KiB ({} all-zero), zstd level {}",
            self.memory_bytes,
            self.chunk_count,
            self.chunk_size / 1024,
            self.zero_chunks,
            self.zstd_level
        )?;
        writeln!(
            f,
            "zero pages: {} ({:.1}%)",
            self.zero_pages,
            self.zero_page_share * 100.0
        )?;
        let ratio = self
            .compression_ratio
            .map_or_else(|| "n/a".to_owned(), |r| format!("{r:.3}"));
        write!(
            f,
            "stored: {} bytes on disk, {} bytes of memory payload (ratio {ratio} of non-zero memory)",
            self.file_bytes, self.memory_payload_bytes
        )?;
        match (self.working_set_chunks, self.working_set_bytes) {
            (Some(chunks), Some(bytes)) => write!(
                f,
                "\nworking set: {chunks} chunks ({} KiB of memory), installed first on restore",
                bytes / 1024
            )?,
            _ => write!(f, "\nworking set: none recorded")?,
        }
        if let Some(w) = self.warning {
            write!(f, "\n!!! {w} !!!")?;
        }
        Ok(())
    }
}

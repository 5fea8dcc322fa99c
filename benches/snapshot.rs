//! End-to-end snapshot creation bench: the test guest fills a working set of 64 MiB and of
//! 256 MiB with the mixed workload (`thaw.fill-mib`), its agent checkpoints, and
//! `thaw::commands::snapshot_create::create` pauses it, captures the state and writes the snapshot with
//! both cores. Reports the pause-to-written time, throughput in GiB/s of guest memory, and
//! stored size against guest memory, against the memory the guest touched (its non-zero pages)
//! and against the working set — encrypted, and as a
//! reference, insecure plaintext. With `--write` it replaces the snapshot-create section of
//! docs/BENCHMARKS.md.
//!
//! Run: `cargo bench --bench snapshot [-- --write] [-- --iterations N]`

#![allow(clippy::expect_used, clippy::unwrap_used)] // a bench: failing loudly is the point

use std::time::Duration;

use thaw::capture::Sealing;
use thaw::commands::run::RunOptions;
use thaw::commands::snapshot_create::{self, CreateOptions, Readiness};

mod support;
use support::{ms, stats};

/// Memory the guest keeps below its working set (image, tables) and spare above it.
const BELOW_MIB: u64 = 64;
const SPARE_MIB: u64 = 64;

struct Sample {
    /// Pause, capture and write, until the snapshot is durable.
    total: Duration,
    /// Encoding (zero scan, zstd, AES-GCM) and writing, before the fsyncs.
    encode: Duration,
    file_bytes: u64,
    memory_bytes: u64,
    zero_pages: u64,
}

fn one(working_mib: u64, encrypted: bool, dir: &std::path::Path, n: usize) -> Sample {
    let out = dir.join(format!("snap-{working_mib}-{encrypted}-{n}"));
    let sealing = if encrypted {
        Sealing::Encrypted(snapshot::MasterKey::load_or_create(&dir.join("key")).unwrap())
    } else {
        Sealing::InsecurePlaintext
    };
    let options = CreateOptions {
        boot: RunOptions {
            cmdline: Some(format!(
                "thaw.agent=1 thaw.init=snap-start thaw.fill-mib={working_mib}"
            )),
            mem_mib: BELOW_MIB + working_mib + SPARE_MIB,
            vcpus: 1,
            ..RunOptions::default()
        },
        out: out.clone(),
        replace: false,
        ready: Readiness::Agent,
        init_timeout: Duration::from_secs(120),
        sealing,
    };
    let created = snapshot_create::create(options, Box::new(std::io::sink())).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
    let s = created.summary;
    Sample {
        total: created.capture + s.elapsed,
        encode: s.encode_elapsed,
        file_bytes: s.file_bytes,
        memory_bytes: s.memory_bytes,
        zero_pages: s.zero_pages,
    }
}

fn main() {
    let args = support::args(5);
    let dir = tempfile::tempdir().unwrap();
    let mut table = String::from(
        "| working set | guest memory | sealing | pause → snapshot durable | encode + write | \
         throughput (guest memory) | stored ÷ guest memory | stored ÷ touched memory | \
         stored ÷ working set | zero pages |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for working_mib in [64u64, 256] {
        for encrypted in [true, false] {
            let samples: Vec<Sample> = (0..args.iterations)
                .map(|n| one(working_mib, encrypted, dir.path(), n))
                .collect();
            let total = stats(samples.iter().map(|s| s.total).collect());
            let encode = stats(samples.iter().map(|s| s.encode).collect());
            let first = &samples[0];
            let gib = first.memory_bytes as f64 / (1u64 << 30) as f64;
            let pages = first.memory_bytes / 4096;
            // What the guest wrote: every page that is not zero.
            let touched = (pages - first.zero_pages) * 4096;
            table.push_str(&format!(
                "| {working_mib} MiB | {} MiB | {} | {} ({}–{}) | {} ({}–{}) | {:.2} GiB/s ({:.2}–{:.2}) | {:.3} | {:.3} | {:.3} | {:.1} % |\n",
                first.memory_bytes >> 20,
                if encrypted { "AES-256-GCM" } else { "insecure plaintext" },
                ms(total.median),
                ms(total.min),
                ms(total.max),
                ms(encode.median),
                ms(encode.min),
                ms(encode.max),
                gib / total.median.as_secs_f64(),
                gib / total.max.as_secs_f64(),
                gib / total.min.as_secs_f64(),
                first.file_bytes as f64 / first.memory_bytes as f64,
                first.file_bytes as f64 / touched as f64,
                first.file_bytes as f64 / (working_mib << 20) as f64,
                100.0 * first.zero_pages as f64 / pages as f64,
            ));
        }
    }
    let body = format!(
        "{}; {} iterations each; snapshot written to {} with both cores; medians with (min–max).\n\n{table}",
        support::machine(),
        args.iterations,
        std::env::temp_dir().display()
    );
    println!("{body}");
    if args.write {
        support::write_section("snapshot-create", &body).expect("update docs/BENCHMARKS.md");
    }
}

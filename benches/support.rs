//! What the end-to-end benches share: median/min/max statistics, the `--iterations N` and
//! `--write` arguments, and writing a section of docs/BENCHMARKS.md.

#![allow(dead_code)] // each bench uses a different part

use std::time::Duration;

/// Median, min and max of a set of timings.
pub struct Stats {
    pub median: Duration,
    pub min: Duration,
    pub max: Duration,
}

/// Summarizes `samples` (at least one).
pub fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    Stats {
        median: samples[samples.len() / 2],
        min: samples[0],
        max: samples[samples.len() - 1],
    }
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Microseconds with one decimal.
pub fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// How the bench was invoked.
pub struct Args {
    /// Rewrite this bench's section of docs/BENCHMARKS.md.
    pub write: bool,
    /// Iterations asked for with `--iterations N` (default `default`); 1 when the bench runs
    /// as a smoke test under `cargo test --benches`, which does not pass `--bench`.
    pub iterations: usize,
}

/// Parses the process arguments.
pub fn args(default: usize) -> Args {
    let args: Vec<String> = std::env::args().collect();
    let iterations = args
        .iter()
        .position(|a| a == "--iterations")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(default);
    Args {
        write: args.iter().any(|a| a == "--write"),
        iterations: if args.iter().any(|a| a == "--bench") {
            iterations
        } else {
            1
        },
    }
}

/// "Machine: N CPUs (vendor), KVM flavor" for the table captions, and whether the machine hands
/// its free memory back to an outer host (see [`warm_free_memory`]).
pub fn machine() -> String {
    let host = thaw::host_check::check();
    let flavor = host
        .kvm_flavor
        .map(|f| f.to_string())
        .unwrap_or_else(|| "no KVM".into());
    let reporting = if reports_free_memory() {
        "; itself a VM whose free memory is reported to its host (virtio-balloon free page \
         reporting)"
    } else {
        ""
    };
    format!(
        "Machine: {} CPUs ({}), {flavor}{reporting}",
        host.host_cpus, host.cpu_vendor
    )
}

/// Whether a virtio balloon with free page reporting (`VIRTIO_BALLOON_F_REPORTING`, feature
/// bit 5) is bound: this machine is itself a VM that returns free memory to its host.
pub fn reports_free_memory() -> bool {
    const BALLOON: &str = "0x0005";
    const REPORTING_BIT: usize = 5;
    let Ok(devices) = std::fs::read_dir("/sys/bus/virtio/devices") else {
        return false;
    };
    devices.flatten().any(|d| {
        let path = d.path();
        let read = |name: &str| std::fs::read_to_string(path.join(name)).unwrap_or_default();
        read("device").trim() == BALLOON
            && path.join("driver").exists()
            && read("features").as_bytes().get(REPORTING_BIT) == Some(&b'1')
    })
}

/// Faults in `bytes` of anonymous memory (on huge pages where the kernel gives them) and frees
/// it again, so that the memory the next timed sample allocates is backed by the outer host.
///
/// Where the machine is itself a VM with free page reporting ([`reports_free_memory`]; these
/// PVM machines are), the kernel hands free 2 MiB blocks back to the outer host a couple of
/// seconds after they were freed, and the first write to one then waits for the outer host to
/// back it again. Measured here: making 256 MiB of fresh memory present took 22–27 ms when it
/// had been freed less than a second before and 480–510 ms after 3 s. A restore allocates all
/// of its guest's memory, so whether a sample found reported memory decided whether it took
/// 130 or 300 ms, whichever row it belonged to: noise from the outer host, which a machine on
/// bare metal does not have. The allocator hands out the blocks freed just now before those it
/// has reported (it keeps reported ones at the tail of its free lists), so the sample's
/// allocations find backed memory: with this before every sample of the restore bench, the
/// 300 ms mode was gone (docs/BENCHMARKS.md).
pub fn warm_free_memory(bytes: usize) {
    if bytes == 0 {
        return;
    }
    let len = bytes;
    // SAFETY: a fresh private anonymous mapping that nothing else knows of; unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return;
    }
    // SAFETY: [map, map + len) is the mapping just made; advice only changes how the kernel
    // backs it (MADV_POPULATE_WRITE faults every page in, as writes would).
    unsafe {
        libc::madvise(map, len, libc::MADV_HUGEPAGE);
        libc::madvise(map, len, libc::MADV_POPULATE_WRITE);
        libc::munmap(map, len);
    }
}

/// Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in
/// docs/BENCHMARKS.md (written atomically).
pub fn write_section(name: &str, body: &str) -> std::io::Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/BENCHMARKS.md");
    let text = std::fs::read_to_string(&path)?;
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let (Some(b), Some(e)) = (text.find(&begin), text.find(&end)) else {
        return Err(std::io::Error::other(format!(
            "markers for {name} not found"
        )));
    };
    let updated = format!("{}{begin}\n{body}{}", &text[..b], &text[e..]);
    let tmp = path.with_extension("md.tmp");
    std::fs::write(&tmp, updated)?;
    std::fs::rename(tmp, path)
}

/// Snapshots the test guest's agent (quiet) after it filled a `fill_mib` workload, in a guest
/// of `mem_mib`, sealed with the master key at `key` (created if missing), into
/// `dir/snap-FILL`; returns that path. Panics if it cannot: a bench has nothing to measure then.
#[allow(clippy::expect_used)]
pub fn agent_snapshot(
    dir: &std::path::Path,
    key: &std::path::Path,
    fill_mib: u64,
    mem_mib: u64,
) -> std::path::PathBuf {
    agent_snapshot_with(dir, key, fill_mib, mem_mib, "")
}

/// [`agent_snapshot`] with more of the test guest's command line (`thaw.KEY=VALUE` words).
#[allow(clippy::expect_used)]
pub fn agent_snapshot_with(
    dir: &std::path::Path,
    key: &std::path::Path,
    fill_mib: u64,
    mem_mib: u64,
    extra_cmdline: &str,
) -> std::path::PathBuf {
    use thaw::capture::Sealing;
    use thaw::commands::run::RunOptions;
    use thaw::commands::snapshot_create::{self, CreateOptions, Readiness};
    let snap = dir.join(format!("snap-{fill_mib}"));
    let options = CreateOptions {
        boot: RunOptions {
            cmdline: Some(format!(
                "thaw.agent=1 thaw.init=snap-start thaw.fill-mib={fill_mib} thaw.quiet=1 \
                 {extra_cmdline}"
            )),
            mem_mib,
            vcpus: 1,
            ..RunOptions::default()
        },
        out: snap.clone(),
        replace: false,
        ready: Readiness::Agent,
        init_timeout: Duration::from_secs(120),
        sealing: Sealing::Encrypted(snapshot::MasterKey::load_or_create(key).expect("master key")),
    };
    snapshot_create::create(options, Box::new(std::io::sink())).expect("snapshot of the agent");
    snap
}

/// The id of the snapshot at `snap` (sealed with the key file `key`), as thawd's registry
/// records it for its workers.
#[allow(dead_code, clippy::expect_used)] // not every bench restores through a worker; a bench fails loudly
pub fn snapshot_id(snap: &std::path::Path, key: &std::path::Path) -> snapshot::SnapshotId {
    let key = snapshot::MasterKey::load(key).expect("master key");
    snapshot::Snapshot::open(snap, Some(&key))
        .expect("the snapshot opens")
        .id()
}

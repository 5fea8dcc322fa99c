//! End-to-end restore bench. The test guest's agent is snapshotted (encrypted) after filling a
//! workload of 0, 64 and 256 MiB (`thaw.fill-mib`); its after-restore hook reads the whole
//! workload (a checksum), so "ready" is the time to restore and touch all of it. The guest runs
//! quietly (`thaw.quiet=1`): on PVM its console lines would cost more than the restore. Each snapshot
//! is restored with every memory mode and invoked once; the same guest booted cold, and the
//! snapshot's memory as a plain file mapped `MAP_PRIVATE` (Firecracker's File backend), are the
//! baselines. Times are from the start of the restore (or of the boot):
//!
//! - runnable: the VM is rebuilt and its vCPUs can enter KVM_RUN (the guest's first instruction
//!   follows at once);
//! - ready: the agent reconnected and its after-restore hooks finished (the workload was read);
//! - answer: the first invocation was answered.
//!
//! With `--write` it replaces the restore section of docs/BENCHMARKS.md.
//!
//! Run: `cargo bench --bench restore [-- --write] [-- --iterations N] [-- --fill MIB]...`

#![allow(clippy::expect_used, clippy::unwrap_used)] // a bench: failing loudly is the point

use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hooks_sdk::host::InvokeOutcome;
use hooks_sdk::protocol::io as frames;
use hooks_sdk::protocol::{Invoke, Kind, Message};
use restore_daemon::environment::{Environment, EnvironmentOptions};
use restore_daemon::restore::{MemoryMode, RestoreOptions};
use restore_daemon::shells::ShellPool;
use snapshot::KeyChoice;
use thaw::commands::run::RunOptions;
use vmm_core::Machine;
use vmm_core::config::VsockConfig;
use vmm_core::machine::ShellSpec;

mod support;
use support::{ms, stats};

/// Memory the guest keeps below its workload (image, tables) and spare above it.
const BELOW_MIB: u64 = 64;
const SPARE_MIB: u64 = 64;
const PAYLOAD: &[u8] = b"{\"bench\":true}";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Eager,
    EagerShell,
    Lazy,
    LazyPrefetch,
    LazyWorkingSet,
    LazyWorkingSetShell,
    SharedShell,
    MapPrivateFile,
    ColdBoot,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Eager => "eager",
            Mode::EagerShell => "eager, pre-built machine shell",
            Mode::Lazy => "lazy",
            Mode::LazyPrefetch => "lazy + prefetch",
            Mode::LazyWorkingSet => "lazy + recorded working set (+ prefetch)",
            Mode::LazyWorkingSetShell => "lazy + working set, pre-built machine shell",
            Mode::SharedShell => {
                "shared decoded copy (huge pages, decoded once per host), pre-built machine shell"
            }
            Mode::MapPrivateFile => "baseline: MAP_PRIVATE of a plain memory file",
            Mode::ColdBoot => "baseline: cold boot of the same guest",
        }
    }
}

struct Sample {
    runnable: Duration,
    ready: Duration,
    answer: Duration,
    faults: Option<u64>,
}

struct Workload {
    /// The snapshot's memory decoded once, as thawd keeps it for a function.
    copy: Arc<restore_daemon::decoded_copy::DecodedCopy>,
    fill_mib: u64,
    snap: PathBuf,
    raw: PathBuf,
}

fn request() -> Invoke<'static> {
    Invoke {
        request_id: "bench",
        deadline_ms: u64::MAX / 2,
        payload: PAYLOAD,
        ..Invoke::default()
    }
}

fn make_workload(dir: &Path, key: &Path, fill_mib: u64) -> Workload {
    let snap = support::agent_snapshot(dir, key, fill_mib, BELOW_MIB + fill_mib + SPARE_MIB);
    let key_choice = KeyChoice::Given(snapshot::MasterKey::load(key).unwrap());
    thaw::commands::snapshot_record_ws::record(
        &snap,
        &key_choice,
        PAYLOAD,
        Duration::from_secs(60),
        Box::new(std::io::sink()),
    )
    .unwrap();
    // The same memory as a flat plaintext file, regions one after another (zero chunks are
    // holes), for the MAP_PRIVATE baseline.
    let raw = dir.join(format!("mem-{fill_mib}.raw"));
    let opened = restore_daemon::verify::open(&snap, &key_choice).unwrap();
    let file = std::fs::File::create(&raw).unwrap();
    let mut flat = 0u64;
    let mut region_offsets = Vec::new();
    for r in opened.regions() {
        region_offsets.push((r.guest_addr, r.size, flat));
        flat += r.size;
    }
    file.set_len(flat).unwrap();
    let mut buf = Vec::new();
    for (index, chunk) in opened.chunks().iter().enumerate() {
        if chunk.kind != snapshot::ChunkKind::Data {
            continue;
        }
        buf.resize(chunk.len as usize, 0);
        opened.read_chunk(index, &mut buf).unwrap();
        let (start, _, base) = region_offsets
            .iter()
            .find(|(start, size, _)| chunk.guest_addr >= *start && chunk.guest_addr < start + size)
            .unwrap();
        file.write_all_at(&buf, base + chunk.guest_addr - start)
            .unwrap();
    }
    file.sync_all().unwrap();
    let backing = restore_daemon::decoded_copy::CopyBacking::detect(4 << 30);
    assert!(
        backing.huge(),
        "the restore bench needs a private tmpfs on huge pages (root)"
    );
    let copy =
        Arc::new(restore_daemon::decoded_copy::DecodedCopy::decode(&opened, &backing).unwrap());
    Workload {
        copy,
        fill_mib,
        snap,
        raw,
    }
}

/// The machine shell every restore of `w` needs.
fn shell_spec(w: &Workload) -> ShellSpec {
    ShellSpec {
        mem_bytes: (BELOW_MIB + w.fill_mib + SPARE_MIB) << 20,
        vcpus: 1,
    }
}

fn restore_once(w: &Workload, key: &KeyChoice, mode: Mode, shells: &Arc<ShellPool>) -> Sample {
    let restore = match mode {
        Mode::Eager => RestoreOptions {
            memory: MemoryMode::Eager,
            ..RestoreOptions::default()
        },
        Mode::EagerShell => RestoreOptions {
            memory: MemoryMode::Eager,
            shells: Some(shells.clone()),
            ..RestoreOptions::default()
        },
        Mode::SharedShell => RestoreOptions {
            shared_copy: Some(w.copy.clone()),
            shells: Some(shells.clone()),
            ..RestoreOptions::default()
        },
        Mode::LazyWorkingSetShell => RestoreOptions {
            shells: Some(shells.clone()),
            ..RestoreOptions::default()
        },
        Mode::Lazy => RestoreOptions {
            prefetch: false,
            use_working_set: false,
            ..RestoreOptions::default()
        },
        Mode::LazyPrefetch => RestoreOptions {
            use_working_set: false,
            ..RestoreOptions::default()
        },
        Mode::LazyWorkingSet => RestoreOptions::default(),
        Mode::MapPrivateFile => RestoreOptions {
            baseline_memory_file: Some(w.raw.clone()),
            ..RestoreOptions::default()
        },
        Mode::ColdBoot => unreachable!("not a restore"),
    };
    let options = EnvironmentOptions {
        restore,
        ..EnvironmentOptions::default()
    };
    if options.restore.shells.is_some() {
        // Built ahead, off the timed path, as thawd builds them.
        assert!(shells.wait_ready(shell_spec(w), 1, Duration::from_secs(60)));
    }
    warm_before_sample(w);
    let started = Instant::now();
    let mut env = Environment::start(&w.snap, key, &options, Box::new(std::io::sink())).unwrap();
    let answer = env.invoke(&request(), Duration::from_secs(60)).unwrap();
    let answered = started.elapsed();
    assert!(matches!(answer, InvokeOutcome::Response(_)));
    let faults = env.pager().map(|p| p.stats().faults);
    assert_eq!(
        env.timings.restore.shell_was_ready,
        matches!(
            mode,
            Mode::EagerShell | Mode::LazyWorkingSetShell | Mode::SharedShell
        )
    );
    let sample = Sample {
        runnable: env.timings.restore.total(),
        ready: env.timings.ready,
        answer: answered,
        faults,
    };
    env.kill().unwrap();
    sample
}

/// Boots the guest with its agent on-demand and the same fill, and invokes it once.
fn cold_boot_once(w: &Workload, dir: &Path) -> Sample {
    let uds = dir.join("cold.sock");
    let agent_path = PathBuf::from(format!("{}_9000", uds.display()));
    let _ = std::fs::remove_file(&agent_path);
    let listener = UnixListener::bind(&agent_path).unwrap();
    warm_before_sample(w);
    let options = RunOptions {
        cmdline: Some(format!(
            "thaw.agent=1 thaw.init=on-demand thaw.fill-mib={} thaw.quiet=1",
            w.fill_mib
        )),
        mem_mib: BELOW_MIB + w.fill_mib + SPARE_MIB,
        vcpus: 1,
        vsock: Some(VsockConfig {
            guest_cid: 3,
            uds_path: uds.clone(),
        }),
        ..RunOptions::default()
    };
    let started = Instant::now();
    let config = options.machine_config().unwrap();
    let machine = Machine::create(&config, Box::new(std::io::sink())).unwrap();
    let runnable = started.elapsed();
    let controller = machine.controller();
    let vm = std::thread::spawn(move || machine.run(None));
    let (mut s, _) = listener.accept().unwrap();
    let hello = frames::read_frame(&mut s).unwrap();
    assert_eq!(hello.kind, Kind::Hello);
    let ready = frames::read_frame(&mut s).unwrap();
    assert_eq!(ready.kind, Kind::Ready);
    let ready_at = started.elapsed();
    frames::write_message(
        &mut s,
        &Message::Invoke(Invoke {
            request_id: "bench",
            deadline_ms: u64::MAX / 2,
            function_arn: "",
            trace_id: "",
            client_context: "",
            cognito_identity: "",
            payload: PAYLOAD,
        }),
    )
    .unwrap();
    let response = frames::read_frame(&mut s).unwrap();
    assert_eq!(response.kind, Kind::Response);
    let answer = started.elapsed();
    controller.stop();
    vm.join().unwrap().unwrap();
    let _ = std::fs::remove_file(&agent_path);
    Sample {
        runnable,
        ready: ready_at,
        answer,
        faults: None,
    }
}

/// The floor an eager restore cannot go below: decrypting and decompressing every data chunk
/// into a fresh shell's guest memory on all cores, timed alone (the shell is built before the
/// clock starts; no state, no snapshot opening).
fn floor_once(w: &Workload, key: &KeyChoice) -> Duration {
    let opened = restore_daemon::verify::open(&w.snap, key).unwrap();
    let mut shell = vmm_core::machine::MachineShell::create(shell_spec(w)).unwrap();
    warm_before_sample(w);
    let started = Instant::now();
    restore_daemon::restore::decode_all_into(&opened, &mut shell).unwrap();
    started.elapsed()
}

/// Every sample that writes a workload starts on memory the outer host backs
/// (`support::warm_free_memory`): twice the workload, for the guest's copy of it and what the
/// restore allocates beside it (staging pages, buffers). Not for the empty workload, whose
/// restores write a few MiB: warming 256 MiB before each one (it evicts the CPU caches) made
/// them 1–2 ms slower.
fn warm_before_sample(w: &Workload) {
    let workload = usize::try_from(w.fill_mib << 20).unwrap_or(usize::MAX);
    support::warm_free_memory(workload.saturating_mul(2));
}

fn cell(samples: &[Sample], pick: impl Fn(&Sample) -> Duration) -> String {
    let s = stats(samples.iter().map(pick).collect());
    format!("{} ({}–{})", ms(s.median), ms(s.min), ms(s.max))
}

fn main() {
    let args = support::args(15);
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("key");
    let shells = Arc::new(ShellPool::new().unwrap());
    let modes = [
        Mode::Eager,
        Mode::EagerShell,
        Mode::Lazy,
        Mode::LazyPrefetch,
        Mode::LazyWorkingSet,
        Mode::LazyWorkingSetShell,
        Mode::SharedShell,
        Mode::MapPrivateFile,
        Mode::ColdBoot,
    ];
    let mut table = String::from(
        "| workload | mode | restore → runnable | restore → ready (hooks done, workload read) | \
         restore → first answer | answer ÷ eager | page faults |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let mut notes = String::new();
    // `--fill MIB` (repeatable) runs only those workloads, for working on one row.
    let argv: Vec<String> = std::env::args().collect();
    let picked: Vec<u64> = argv
        .windows(2)
        .filter(|w| w[0] == "--fill")
        .filter_map(|w| w[1].parse().ok())
        .collect();
    let fills: Vec<u64> = [0u64, 64, 256]
        .into_iter()
        .filter(|f| picked.is_empty() || picked.contains(f))
        .collect();
    for fill_mib in fills {
        let w = make_workload(dir.path(), &key_path, fill_mib);
        shells.keep_ready(shell_spec(&w), 1);
        let key = KeyChoice::Given(snapshot::MasterKey::load(&key_path).unwrap());
        let opened = restore_daemon::verify::open(&w.snap, &key).unwrap();
        let ws = opened.working_set().map_or(0, |ws| ws.chunks.len());
        let info = opened.info();
        notes.push_str(&format!(
            "- {fill_mib} MiB workload: {} MiB guest, {} chunks, {:.1} MiB stored, recorded \
             working set {ws} chunks\n",
            info.memory_bytes >> 20,
            info.chunk_count,
            info.file_bytes as f64 / (1 << 20) as f64,
        ));
        // The small workload's rows decide a sub-10 ms goal and are cheap: three times the
        // iterations, for steadier medians.
        let iterations = if fill_mib == 0 {
            args.iterations * 3
        } else {
            args.iterations
        };
        // Round-robin: every round samples the floor and each mode once, so that the host's
        // slow spells (this PVM host has them) fall on all of them alike, not on one row.
        let mut floor_samples = Vec::new();
        let mut by_mode: Vec<Vec<Sample>> = modes.iter().map(|_| Vec::new()).collect();
        for _ in 0..iterations {
            floor_samples.push(floor_once(&w, &key));
            for (mode, samples) in modes.iter().zip(by_mode.iter_mut()) {
                samples.push(match mode {
                    Mode::ColdBoot => cold_boot_once(&w, dir.path()),
                    other => restore_once(&w, &key, *other, &shells),
                });
            }
        }
        eprintln!("{fill_mib} MiB: done");
        let floor = stats(floor_samples);
        let mut eager_answer = None;
        let mut eager_runnable = Vec::new();
        for (mode, samples) in modes.into_iter().zip(by_mode) {
            let answer = stats(samples.iter().map(|s| s.answer).collect()).median;
            if mode == Mode::Eager {
                eager_answer = Some(answer);
            }
            if matches!(mode, Mode::Eager | Mode::EagerShell) {
                let runnable = stats(samples.iter().map(|s| s.runnable).collect()).median;
                eager_runnable.push((mode, runnable));
            }
            let ratio = eager_answer.map_or(1.0, |e| answer.as_secs_f64() / e.as_secs_f64());
            let faults = {
                let mut f: Vec<u64> = samples.iter().filter_map(|s| s.faults).collect();
                f.sort_unstable();
                f.get(f.len() / 2).map_or("—".into(), |m| m.to_string())
            };
            table.push_str(&format!(
                "| {fill_mib} MiB | {} | {} | {} | {} | {ratio:.2} | {faults} |\n",
                mode.name(),
                cell(&samples, |s| s.runnable),
                cell(&samples, |s| s.ready),
                cell(&samples, |s| s.answer),
            ));
        }
        if fill_mib > 0 {
            let ratios: Vec<String> = eager_runnable
                .iter()
                .map(|(mode, runnable)| {
                    format!(
                        "{} {:.2}×",
                        mode.name(),
                        runnable.as_secs_f64() / floor.median.as_secs_f64()
                    )
                })
                .collect();
            notes.push_str(&format!(
                "- {fill_mib} MiB floor (every data chunk decrypted and decompressed into fresh \
                 guest memory on both cores, timed alone): {} ({}–{}); restore → runnable ÷ \
                 floor: {}\n",
                ms(floor.median),
                ms(floor.min),
                ms(floor.max),
                ratios.join(", "),
            ));
        }
        shells.keep_ready(shell_spec(&w), 0);
        std::fs::remove_dir_all(&w.snap).unwrap();
        std::fs::remove_file(&w.raw).unwrap();
    }
    let body = format!(
        "{}; {} iterations (three times as many for the 0 MiB workload), each iteration one \
         sample of every row in turn, in one process; snapshots encrypted \
         (AES-256-GCM) and read from a warm page cache; samples with a workload start on free \
         memory the outer host backs (twice the workload made present and freed just before); lazy \
         modes authenticate every chunk up front; medians with (min–max).\n\n{notes}\n{table}",
        support::machine(),
        args.iterations,
    );
    println!("{body}");
    if args.write {
        support::write_section("restore", &body).expect("update docs/BENCHMARKS.md");
    }
}

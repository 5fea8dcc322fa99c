//! First sign of life: from the start of a restore until the restored guest's agent says
//! `Hello` over vsock, the moment Firecracker's figures in issue 13 were taken at (its load
//! call → `Hello`: 10.2 ms on this host, with the same test guest, a 128 MiB guest and its File
//! memory backend). Also when the machine could run and when the after-restore hooks were done
//! (the hook reads the whole workload).
//!
//! The test guest's agent with a workload of 0, 64 and 256 MiB, snapshotted encrypted. Rows:
//!
//! - **`thaw restore`**, a fresh process per sample, as a user runs it (with the host's records
//!   of the file from an earlier restore: authenticated in full, startup set learned), and the
//!   same without its startup set (`--no-startup-set`).
//! - **thawd**: a `thawd worker` process prepared as thawd prepares spare workers, timed by the
//!   worker from the `Restore` request it received: restored ahead from the function's shared
//!   decoded copy (`PrepareRestore`: the request only starts the guest), or with only its shell
//!   built and the copy sent with the request.
//! - the restore library in this process, as `thaw restore` and the worker call it: shared copy
//!   (huge pages) with a pre-built shell; lazy with a pre-built shell and chunks checked as
//!   installed (thawd's path while a copy is not ready); lazy with everything done on the path
//!   (`thaw restore`: no shell; every chunk authenticated up front, as the first restore of a
//!   file on a host does, or, as later ones do by default, found authenticated before by this
//!   host's record of the unchanged file, with the startup set it learned); eager with a
//!   pre-built shell.
//!
//! Run: `cargo bench --bench first_sign_of_life [-- --iterations N] [-- --write]`

#![allow(clippy::expect_used, clippy::unwrap_used)] // a bench: failing loudly is the point

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use restore_daemon::decoded_copy::{CopyBacking, DecodedCopy};
use restore_daemon::environment::{Environment, EnvironmentOptions};
use restore_daemon::restore::{ChunkCheck, MemoryMode, RestoreOptions};
use restore_daemon::shells::ShellPool;
use restore_daemon::startup_set::StartupSets;
use restore_daemon::worker::handle::{CopyGrant, RestoreSpec, Worker, WorkerCommand};
use restore_daemon::worker::jail::JailSpec;
use snapshot::{KeyChoice, VerifiedRecords};
use vmm_core::machine::ShellSpec;

mod support;
#[path = "../tests/fixture/thawd_bin.rs"]
mod thawd_bin;
use support::{Stats, ms, stats};

/// Firecracker v1.16.1 on this host, load call → `Hello` (issue 13), and half of it: the goal.
const FIRECRACKER_LOAD_TO_HELLO: Duration = Duration::from_micros(10_200);
/// Guest memory below the workload and above it.
const BELOW_MIB: u64 = 64;
const SPARE_MIB: u64 = 64;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Cli,
    CliNoStartupSet,
    ThawdAhead,
    Thawd,
    SharedShell,
    LazyShell,
    LazyCold,
    LazyColdOnce,
    LazyColdOnInstall,
    EagerShell,
}

impl Mode {
    const ALL: [Mode; 10] = [
        Mode::Cli,
        Mode::CliNoStartupSet,
        Mode::ThawdAhead,
        Mode::Thawd,
        Mode::SharedShell,
        Mode::LazyShell,
        Mode::LazyCold,
        Mode::LazyColdOnce,
        Mode::LazyColdOnInstall,
        Mode::EagerShell,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::Cli => {
                "`thaw restore` as a user runs it: a fresh process, nothing ahead; this host restored the unchanged file before, so it authenticated it in full and learned its startup set then (its own report, from the restore call)"
            }
            Mode::CliNoStartupSet => {
                "`thaw restore --no-startup-set`: the same, but the guest faults on every chunk it needs before `Hello`"
            }
            Mode::ThawdAhead => "thawd: jailed spare worker restored ahead from the shared copy",
            Mode::Thawd => {
                "thawd: jailed spare worker with its shell, shared copy sent with the request"
            }
            Mode::SharedShell => "shared copy (huge pages), pre-built shell",
            Mode::LazyShell => "lazy, pre-built shell, chunks checked on install",
            Mode::LazyCold => {
                "lazy, nothing ahead, every chunk authenticated up front (`thaw restore --chunk-check upfront`; what the default does the first time a host restores a file)"
            }
            Mode::LazyColdOnce => {
                "lazy, nothing ahead, this unchanged file authenticated in full and its startup set learned before on this host (the library as `thaw restore` calls it: default `--chunk-check once`, startup set)"
            }
            Mode::LazyColdOnInstall => {
                "lazy, nothing ahead, chunks checked on install (`thaw restore --chunk-check on-install`)"
            }
            Mode::EagerShell => "eager, pre-built shell",
        }
    }
}

struct Workload {
    fill_mib: u64,
    snap: PathBuf,
    copy: Arc<DecodedCopy>,
}

impl Workload {
    fn spec(&self) -> ShellSpec {
        ShellSpec {
            mem_bytes: (BELOW_MIB + self.fill_mib + SPARE_MIB) << 20,
            vcpus: 1,
        }
    }
}

#[derive(Default)]
struct Samples {
    runnable: Vec<Duration>,
    hello: Vec<Duration>,
    ready: Vec<Duration>,
}

fn make_workload(
    dir: &Path,
    key: &Path,
    fill_mib: u64,
    backing: &CopyBacking,
    records: &VerifiedRecords,
) -> Workload {
    let snap = support::agent_snapshot(dir, key, fill_mib, BELOW_MIB + fill_mib + SPARE_MIB);
    let opened = restore_daemon::verify::open(&snap, &key_choice(key)).unwrap();
    // The host's first restore of the file, off the timed path: a file is recorded only once
    // it is older than `RECENT`.
    std::thread::sleep(snapshot::verified::RECENT);
    opened.authenticate_chunks_once(records).unwrap();
    assert!(records.holds(&opened));
    let copy = Arc::new(DecodedCopy::decode(&opened, backing).unwrap());
    Workload {
        fill_mib,
        snap,
        copy,
    }
}

fn key_choice(key: &Path) -> KeyChoice {
    KeyChoice::Given(snapshot::MasterKey::load(key).unwrap())
}

fn library_once(
    w: &Workload,
    key: &Path,
    mode: Mode,
    shells: &Arc<ShellPool>,
    records: &VerifiedRecords,
    startup: &StartupSets,
    out: &mut Samples,
) {
    let restore = match mode {
        Mode::SharedShell => RestoreOptions {
            shared_copy: Some(w.copy.clone()),
            shells: Some(shells.clone()),
            ..RestoreOptions::default()
        },
        Mode::LazyShell => RestoreOptions {
            chunk_check: ChunkCheck::OnInstall,
            shells: Some(shells.clone()),
            ..RestoreOptions::default()
        },
        Mode::LazyCold => RestoreOptions::default(),
        Mode::LazyColdOnce => RestoreOptions {
            chunk_check: ChunkCheck::Once,
            verified_records: Some(records.clone()),
            startup_sets: Some(startup.clone()),
            ..RestoreOptions::default()
        },
        Mode::LazyColdOnInstall => RestoreOptions {
            chunk_check: ChunkCheck::OnInstall,
            ..RestoreOptions::default()
        },
        Mode::EagerShell => RestoreOptions {
            memory: MemoryMode::Eager,
            shells: Some(shells.clone()),
            ..RestoreOptions::default()
        },
        Mode::Cli | Mode::CliNoStartupSet | Mode::Thawd | Mode::ThawdAhead => {
            unreachable!("not in this process")
        }
    };
    let with_shell = restore.shells.is_some();
    if with_shell {
        // Built ahead, off the timed path, as thawd builds them.
        assert!(shells.wait_ready(w.spec(), 1, Duration::from_secs(60)));
    }
    let options = EnvironmentOptions {
        restore,
        ..EnvironmentOptions::default()
    };
    let env = Environment::start(
        &w.snap,
        &key_choice(key),
        &options,
        Box::new(std::io::sink()),
    )
    .unwrap();
    assert_eq!(env.timings.restore.shell_was_ready, with_shell);
    assert_eq!(
        env.timings.restore.authenticated_before,
        mode == Mode::LazyColdOnce
    );
    out.runnable.push(env.timings.restore.total());
    out.hello.push(env.timings.hello);
    out.ready.push(env.timings.ready);
    env.kill().unwrap();
}

async fn thawd_once(w: &Workload, key: &Path, ahead: bool, out: &mut Samples) {
    let command = WorkerCommand::thawd(thawd_bin::thawd_bin());
    // Jailed, as thawd runs its workers by default (as root; no cgroup v2 here).
    let jail_root = tempfile::tempdir().unwrap();
    let jail = JailSpec {
        root: jail_root.path().to_owned(),
        uid: 65534,
        gid: 65534,
        snapshot: w.snap.clone(),
        key_file: Some(key.to_owned()),
        cgroup: None,
        memory_max: None,
        cpu_max: None,
    };
    let mut worker = Worker::spawn_jailed(&command, "fsol", &jail).await.unwrap();
    let grant = CopyGrant {
        function: "fsol".into(),
        copy: w.copy.clone(),
    };
    let restore = RestoreSpec {
        snapshot: w.snap.clone(),
        key_file: Some(key.to_owned()),
        memory: MemoryMode::Lazy,
        verified: Some(support::snapshot_id(&w.snap, key)),
        after_restore_timeout: Duration::from_secs(60),
    };
    // As thawd prepares its spare workers, before any invocation.
    if ahead {
        worker
            .prepare_restore(&restore, &grant, Duration::from_secs(60))
            .await
            .unwrap();
    } else {
        let spec = w.spec();
        worker
            .prepare(spec.mem_bytes, spec.vcpus, Duration::from_secs(60))
            .await
            .unwrap();
    }
    let sent = (!ahead).then_some(&grant);
    let info = worker
        .restore(restore, sent, Duration::from_secs(60))
        .await
        .unwrap();
    // Restored ahead, the worker built its shell then, off the timed path.
    assert!(ahead || info.shell_was_ready);
    out.runnable.push(info.restore);
    out.hello.push(info.hello);
    out.ready.push(info.ready);
    worker.kill().await;
}

/// Runs `thaw restore --invoke` (with `extra` arguments) on the workload's snapshot and reads
/// its report of where the time went. Its host-wide records of authenticated files and of
/// startup sets live in `state_home`.
fn cli_once(w: &Workload, key: &Path, state_home: &Path, extra: &[&str], out: &mut Samples) {
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_thaw"))
        .arg("restore")
        .arg(&w.snap)
        .arg("--key-file")
        .arg(key)
        .args(["--invoke", "{}"])
        .args(extra)
        .env("XDG_STATE_HOME", state_home)
        .env_remove("THAW_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "thaw restore failed: {stderr}");
    let report = stderr
        .lines()
        .find(|l| l.contains("first sign of life"))
        .unwrap_or_else(|| panic!("no report in: {stderr}"));
    // "thaw: restored DIR in R: first sign of life (the agent's Hello) H and ready (...) Y
    // after start; ..."
    let after = |marker: &str| -> Duration {
        let at = report.find(marker).unwrap() + marker.len();
        let word = report[at..]
            .split([' ', ':'])
            .find(|t| !t.is_empty())
            .unwrap();
        parse_duration(word)
    };
    out.runnable.push(after(" in "));
    out.hello.push(after("(the agent's Hello) "));
    out.ready.push(after("(after-restore hooks done) "));
}

/// A `Duration`'s `Debug` form as the CLI prints it ("950.25µs", "4.93ms", "1.20s").
fn parse_duration(word: &str) -> Duration {
    let units = [("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0)];
    let (number, scale) = units
        .iter()
        .find_map(|(unit, scale)| word.strip_suffix(unit).map(|n| (n, *scale)))
        .unwrap_or_else(|| panic!("not a duration: {word}"));
    Duration::from_secs_f64(number.parse::<f64>().unwrap() * scale)
}

fn cell(s: &Stats) -> String {
    format!("{} ({}–{})", ms(s.median), ms(s.min), ms(s.max))
}

fn main() {
    let args = support::args(40);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let backing = CopyBacking::detect(4 << 30);
    let records = VerifiedRecords::new(dir.path().join("verified"));
    // The CLI's own records of authenticated files and startup sets (`$XDG_STATE_HOME/thaw`).
    let state_home = dir.path().join("state");
    let startup = StartupSets::new(dir.path().join("startup"));
    assert!(
        backing.huge(),
        "this bench needs a private tmpfs on huge pages (run it as root)"
    );
    let sizes: &[u64] = if args.iterations > 1 {
        &[0, 64, 256]
    } else {
        &[0]
    };
    let workloads: Vec<Workload> = sizes
        .iter()
        .map(|&mib| make_workload(dir.path(), &key, mib, &backing, &records))
        .collect();
    let shells = Arc::new(ShellPool::new().unwrap());
    for w in &workloads {
        shells.keep_ready(w.spec(), 1);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut table = String::from(
        "| workload | restore | restore → runnable | restore → `Hello` | `Hello` ÷ Firecracker's 10.2 ms | restore → ready (hooks done, workload read) |\n\
         |---|---|---|---|---|---|\n",
    );
    for w in &workloads {
        let mut samples: Vec<Samples> = Mode::ALL.iter().map(|_| Samples::default()).collect();
        // The CLI's first restore of the file authenticates every chunk and records it, and
        // learns the file's startup set; the library's first learns its own.
        cli_once(w, &key, &state_home, &[], &mut Samples::default());
        let warm = Mode::LazyColdOnce;
        library_once(
            w,
            &key,
            warm,
            &shells,
            &records,
            &startup,
            &mut Samples::default(),
        );
        // Round robin: the host's slow spells fall on every mode alike.
        for _ in 0..args.iterations {
            for (mode, out) in Mode::ALL.iter().zip(samples.iter_mut()) {
                match mode {
                    Mode::Cli => cli_once(w, &key, &state_home, &[], out),
                    Mode::CliNoStartupSet => {
                        cli_once(w, &key, &state_home, &["--no-startup-set"], out)
                    }
                    Mode::Thawd => runtime.block_on(thawd_once(w, &key, false, out)),
                    Mode::ThawdAhead => runtime.block_on(thawd_once(w, &key, true, out)),
                    _ => library_once(w, &key, *mode, &shells, &records, &startup, out),
                }
            }
        }
        for (mode, s) in Mode::ALL.iter().zip(samples) {
            let hello = stats(s.hello);
            table.push_str(&format!(
                "| {} MiB | {} | {} | {} | {:.2} | {} |\n",
                w.fill_mib,
                mode.name(),
                cell(&stats(s.runnable)),
                cell(&hello),
                hello.median.as_secs_f64() / FIRECRACKER_LOAD_TO_HELLO.as_secs_f64(),
                cell(&stats(s.ready)),
            ));
        }
    }
    let body = format!(
        "{}; test guest agent (quiet), 1 vCPU, guest memory 128 MiB plus the workload, \
         encrypted snapshots in a warm page cache; {} iterations, each one sample of every row \
         in turn; medians with (min–max). Firecracker v1.16.1's load call → `Hello` on this host \
         was 10.2 ms (issue 13); the goal is half of it.\n\n{table}",
        support::machine(),
        args.iterations,
    );
    println!("{body}");
    if args.write {
        support::write_section("first-sign-of-life", &body).expect("update docs/BENCHMARKS.md");
    }
}

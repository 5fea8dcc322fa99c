//! A Python function on Linux, from handler to served snapshot, the way a user runs it:
//! `thaw function build` makes an image of `examples/python-function` (AWS's unmodified
//! `awslambdaric` and `snapshot-restore-py`, one PyPI dependency, before-snapshot and
//! after-restore hooks), `thaw snapshot create --function` boots it on Debian's cloud kernel and
//! snapshots it at `restore/next`, restores (lazy and eager, and `thaw restore`) answer
//! invocations with working timers, clones differ in entropy and know the time, and `thawd`
//! serves it to boto3 through cold and warm starts, errors, timeouts and crashes.
//!
//! These need a KVM that boots Linux guests: on PVM they run in the nested-KVM host
//! (`fixture::nested`), where times are functional, not performance figures.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fixture::nested::Group;
use fixture::thawd::{Thawd, boto3};
use fixture::{
    Console, cache_key, debian_kernel, output_text, static_thaw_init, thaw_bin, vm_slot,
};
use hooks_sdk::host::{InvokeOutcome, deadline_after};
use hooks_sdk::protocol::Invoke;
use restore_daemon::environment::{Environment, EnvironmentOptions};
use restore_daemon::restore::{MemoryMode, RestoreOptions};
use serde_json::{Value, json};
use snapshot::KeyChoice;

const SNAPSHOTS: &str = "python_function_snapshots_at_restore_next";
const RESTORES: &str = "restored_python_answers_lazy_and_eager_with_working_timers";
const CLONES: &str = "clones_draw_different_entropy_and_read_the_host_clock";
const THAWD: &str = "thawd_serves_the_python_function_to_boto3";

static LINUX: Group = Group::new(&[SNAPSHOTS, RESTORES, CLONES, THAWD], prepare);

/// The guest's memory: the Python runtime's files live in its initramfs, so in RAM.
const MEM_MIB: u64 = 512;
const ARN: &str = "arn:aws:lambda:us-east-1:000000000000:function:python-function";
/// How long an invocation may take (generous: under emulation everything is slow).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Clones must be restored at least this long after the snapshot, so that a clock that was
/// not corrected would show it.
const CLONE_AGE: Duration = Duration::from_secs(10);

/// Builds, on the host, what the tests need: the static thaw-init and the function's image
/// (its PyPI packages come from the network, which the nested host does not have).
fn prepare() -> Vec<(String, String)> {
    let init = static_thaw_init();
    let image = function_image();
    vec![
        ("THAW_INIT".into(), init.display().to_string()),
        ("THAW_TEST_PYTHON_IMAGE".into(), image.display().to_string()),
    ]
}

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python-function")
}

/// The example's function image, built with `thaw function build` once per set of inputs
/// (the example's files, thaw-init, the kernel, the runtime) and kept in the target directory.
fn function_image() -> PathBuf {
    if let Some(image) = std::env::var_os("THAW_TEST_PYTHON_IMAGE") {
        return PathBuf::from(image);
    }
    let example = example_dir();
    let mut inputs: Vec<Vec<u8>> = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&example)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for file in &files {
        inputs.push(file.file_name().unwrap().as_encoded_bytes().to_vec());
        inputs.push(std::fs::read(file).unwrap());
    }
    let init = static_thaw_init();
    inputs.push(std::fs::read(&init).unwrap());
    inputs.push(debian_kernel().release.into_bytes());
    let runtime = fixture::function_image::host_runtime().to_string();
    inputs.push(runtime.clone().into_bytes());
    let parts: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
    let image = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("python-function-{}", cache_key(&parts)));
    if image.is_dir() {
        return image;
    }
    let out = thaw_bin()
        .args(["function", "build", "--handler", "app.handler", "--runtime"])
        .arg(&runtime)
        .arg("--code")
        .arg(&example)
        .arg("--thaw-init")
        .arg(&init)
        .arg("--out")
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "thaw function build failed:\n{}",
        output_text(&out)
    );
    image
}

/// The snapshot every test restores, made once per process by the first test that needs it.
struct Snapshot {
    dir: PathBuf,
    key: PathBuf,
    /// `thaw snapshot create`'s output.
    created: String,
    /// When it was taken.
    at: Instant,
}

fn snapshot() -> &'static Snapshot {
    static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let image = function_image();
        // In the target directory, not a TempDir: a static is never dropped. The next run
        // starts by clearing it.
        let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux-python");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).unwrap();
        let key = work.join("master.key");
        snapshot::MasterKey::load_or_create(&key).unwrap();
        let dir = work.join("snapshot");
        let _slot = vm_slot();
        let out = thaw_bin()
            .args(["snapshot", "create", "--function"])
            .arg(&image)
            .args(["--mem-mib", &MEM_MIB.to_string(), "--key-file"])
            .arg(&key)
            .arg("--out")
            .arg(&dir)
            .output()
            .unwrap();
        let created = output_text(&out);
        assert!(
            out.status.success(),
            "thaw snapshot create failed:\n{created}"
        );
        Snapshot {
            dir,
            key,
            created,
            at: Instant::now(),
        }
    })
}

fn key_choice(snap: &Snapshot) -> KeyChoice {
    KeyChoice::Given(snapshot::MasterKey::load(&snap.key).unwrap())
}

/// Restores the snapshot into a new environment.
fn environment(snap: &Snapshot, memory: MemoryMode, console: &Console) -> Environment {
    let options = EnvironmentOptions {
        restore: RestoreOptions {
            memory,
            ..RestoreOptions::default()
        },
        ..EnvironmentOptions::default()
    };
    Environment::start(
        &snap.dir,
        &key_choice(snap),
        &options,
        Box::new(console.clone()),
    )
    .unwrap_or_else(|e| panic!("{memory:?} restore failed: {e:#}\n{}", console.text()))
}

/// Invokes `event`; the answer as JSON, and how long it took as the host saw it.
fn invoke(env: &mut Environment, console: &Console, event: Value) -> (Value, Duration) {
    let (request_id, payload) = (format!("req-{}", unix_ns()), event.to_string());
    let request = Invoke {
        request_id: &request_id,
        deadline_ms: deadline_after(ANSWER_TIMEOUT),
        function_arn: ARN,
        payload: payload.as_bytes(),
        ..Invoke::default()
    };
    let started = Instant::now();
    let outcome = env
        .invoke(&request, ANSWER_TIMEOUT)
        .unwrap_or_else(|e| panic!("{event}: {e:#}\n{}", console.text()));
    let took = started.elapsed();
    match outcome {
        InvokeOutcome::Response(body) => (serde_json::from_slice(&body).unwrap(), took),
        InvokeOutcome::Error { error_type, body } => panic!(
            "{event}: function error {error_type}: {}\n{}",
            String::from_utf8_lossy(&body),
            console.text()
        ),
    }
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn unix_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn python_function_snapshots_at_restore_next() {
    if !LINUX.runs_here(SNAPSHOTS) {
        return;
    }
    let snap = snapshot();
    // Lambda's line for the end of a SnapStart init phase; thaw-init reported the runtime
    // waiting in `restore/next` after its before-snapshot hooks, or no snapshot was written.
    assert!(
        snap.created.contains("INIT_REPORT Init Duration: "),
        "{}",
        snap.created
    );
    assert!(snap.created.contains("Status: success"), "{}", snap.created);
    let out = thaw_bin()
        .args(["snapshot", "verify"])
        .arg(&snap.dir)
        .arg("--key-file")
        .arg(&snap.key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "verify failed:\n{}",
        output_text(&out)
    );
    let out = thaw_bin()
        .args(["snapshot", "inspect", "--json"])
        .arg(&snap.dir)
        .arg("--key-file")
        .arg(&snap.key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "inspect failed:\n{}",
        output_text(&out)
    );
    println!("{SNAPSHOTS}: {}", String::from_utf8_lossy(&out.stdout));
}

/// Sums the counts of the interrupt lines in `/proc/interrupts` whose description mentions
/// `device`.
fn interrupts_of(table: &str, device: &str) -> u64 {
    table
        .lines()
        .filter(|l| l.contains(device))
        .flat_map(|l| {
            l.split_whitespace()
                .skip(1)
                .map_while(|w| w.parse::<u64>().ok())
        })
        .sum()
}

#[test]
fn restored_python_answers_lazy_and_eager_with_working_timers() {
    if !LINUX.runs_here(RESTORES) {
        return;
    }
    let snap = snapshot();
    let _slot = vm_slot();
    for memory in [MemoryMode::Lazy, MemoryMode::Eager] {
        let console = Console::default();
        let mut env = environment(snap, memory, &console);
        let (hello, _) = invoke(&mut env, &console, json!({"name": "Thaw"}));
        assert_eq!(hello["greeting"], "Hello, Thaw!", "{memory:?}: {hello}");
        assert_eq!(hello["before_snapshot_ran"], true, "{memory:?}: {hello}");
        assert_eq!(hello["restores"], 1, "{memory:?}: {hello}");
        assert!(!hello["dependency"].is_null(), "{memory:?}: {hello}");

        // The restored guest's timers and clock run at the host's pace.
        let (slept, took) = invoke(&mut env, &console, json!({"action": "sleep", "seconds": 1}));
        let guest = slept["slept"].as_f64().unwrap();
        assert!(
            (0.8..=1.2).contains(&guest),
            "{memory:?}: the guest measured {guest} s"
        );
        assert!(
            (Duration::from_millis(800)..=Duration::from_millis(1200)).contains(&took),
            "{memory:?}: a 1 s sleep took {took:?} as the host saw it"
        );

        // The agent's vsock channel is interrupt-driven: its device's line counts.
        let (table, _) = invoke(&mut env, &console, json!({"action": "interrupts"}));
        let table = table["interrupts"].as_str().unwrap();
        assert!(
            interrupts_of(table, "LNRO0005") > 0 || interrupts_of(table, "virtio") > 0,
            "{memory:?}: no virtio interrupts delivered:\n{table}"
        );
        env.shutdown().unwrap();
        println!(
            "{RESTORES}: {memory:?}: answered; a 1 s sleep took {took:?} ({guest:.3} s inside)"
        );
    }

    // The command a user runs.
    let out = thaw_bin()
        .arg("restore")
        .arg(&snap.dir)
        .arg("--key-file")
        .arg(&snap.key)
        .args(["--invoke", r#"{"name": "CLI"}"#])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "thaw restore failed:\n{}",
        output_text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Hello, CLI!"),
        "{}",
        output_text(&out)
    );
}

#[test]
fn clones_draw_different_entropy_and_read_the_host_clock() {
    if !LINUX.runs_here(CLONES) {
        return;
    }
    let snap = snapshot();
    let age = snap.at.elapsed();
    if age < CLONE_AGE {
        std::thread::sleep(CLONE_AGE - age);
    }
    let _slots = fixture::all_vm_slots();
    let consoles = [Console::default(), Console::default()];
    let mut clones: Vec<Environment> = consoles
        .iter()
        .map(|c| environment(snap, MemoryMode::Lazy, c))
        .collect();
    let mut draws = Vec::new();
    for (env, console) in clones.iter_mut().zip(&consoles) {
        let before = unix_secs();
        let (entropy, _) = invoke(env, console, json!({"action": "entropy"}));
        let after = unix_secs();
        let time = entropy["time"].as_f64().unwrap();
        assert!(
            time > before - 1.0 && time < after + 1.0,
            "a clone reads {time}, the host {before}..{after}: its clock was not set on restore"
        );
        draws.push(entropy);
    }
    for field in ["dev_urandom", "os_urandom"] {
        let (a, b) = (&draws[0][field], &draws[1][field]);
        assert!(a.as_str().is_some_and(|s| s.len() == 64), "{field}: {a}");
        assert_ne!(a, b, "both clones drew the same {field}");
    }
    for env in clones {
        env.shutdown().unwrap();
    }
    println!(
        "{CLONES}: restored {:.1?} after the snapshot; the clones drew different values",
        snap.at.elapsed()
    );
}

#[test]
fn thawd_serves_the_python_function_to_boto3() {
    if !LINUX.runs_here(THAWD) {
        return;
    }
    let snap = snapshot();
    let _slots = fixture::all_vm_slots();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        // Under TCG a CPU does a fraction of its native work: Lambda's CPU share for 512 MB
        // (cpu.max, where the nested host has cgroup v2) would stretch every step past the
        // timeouts. The other jail layers apply.
        "max_concurrency = 2\nidle_ttl_secs = 600\nspare_workers = 0\njail_cpu_limit = false\n\
         [functions.py]\nsnapshot = {snap:?}\nmemory_mib = {MEM_MIB}\ntimeout_secs = 5\n\
         key_file = {key:?}\n",
        snap = snap.dir.display().to_string(),
        key = snap.key.display().to_string(),
    );
    let thawd = Thawd::start(dir.path(), &config);
    let out = boto3(
        &thawd.endpoint,
        r#"
def call(event, tail=False):
    kwargs = {'LogType': 'Tail'} if tail else {}
    r = client.invoke(FunctionName='py', Payload=json.dumps(event).encode(), **kwargs)
    log = base64.b64decode(r['LogResult']).decode() if tail else ''
    return r, json.loads(r['Payload'].read()), log
r, doc, log = call({'name': 'cold'}, tail=True)
print('cold', r['StatusCode'], r.get('FunctionError'), doc['greeting'], doc['restores'], 'Restore Duration' in log)
r, doc, log = call({'name': 'warm'}, tail=True)
print('warm', r['StatusCode'], r.get('FunctionError'), doc['greeting'], doc['restores'], 'Restore Duration' in log)
r, doc, _ = call({'action': 'fail'})
print('error', r['StatusCode'], r.get('FunctionError'), 'errorType' in doc and 'errorMessage' in doc)
r, doc, _ = call({'action': 'hang'})
print('timeout', r.get('FunctionError'), doc['errorType'], doc['errorMessage'].endswith('Task timed out after 5.00 seconds'))
r, doc, _ = call({'name': 'after timeout'})
print('next', r.get('FunctionError'), doc['greeting'])
r, doc, _ = call({'action': 'crash'})
print('crash', r.get('FunctionError'), doc['errorType'])
r, doc, _ = call({'name': 'after crash'})
print('next', r.get('FunctionError'), doc['greeting'])
"#,
    );
    let lines: Vec<&str> = out.lines().collect();
    // The nested host mounts cgroup v2, so each jailed worker had a cgroup of its own with
    // memory.max of its guest plus the worker's margin (gone with the worker, so the parent
    // is what is left to look at; a live worker's is checked while one is idle).
    let workers = std::path::Path::new("/sys/fs/cgroup/thawd-workers");
    if restore_daemon::worker::jail::cgroup2_root().is_some() {
        let limits: Vec<String> = std::fs::read_dir(workers)
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("memory.max")).ok())
            .collect();
        let want = ((MEM_MIB << 20) + restore_daemon::daemon::jail::WORKER_OVERHEAD).to_string();
        assert!(
            !limits.is_empty() && limits.iter().all(|l| l.trim() == want),
            "the idle environment's worker has no cgroup with memory.max {want}: {limits:?}"
        );
        println!("jailed workers' cgroups: memory.max {limits:?}");
    } else {
        println!("no cgroup v2 here: the workers' cgroups are not checked");
    }
    assert_eq!(lines[0], "cold 200 None Hello, cold! 1 True", "{out}");
    // Warm: the same environment, frozen and thawed; no restore, so no Restore Duration.
    assert_eq!(lines[1], "warm 200 None Hello, warm! 1 False", "{out}");
    assert_eq!(lines[2], "error 200 Unhandled True", "{out}");
    assert_eq!(lines[3], "timeout Unhandled Sandbox.Timedout True", "{out}");
    assert_eq!(lines[4], "next None Hello, after timeout!", "{out}");
    assert_eq!(lines[5], "crash Unhandled Runtime.ExitError", "{out}");
    assert_eq!(lines[6], "next None Hello, after crash!", "{out}");
    let log = std::fs::read_to_string(thawd.dir.join("logs/py.log")).unwrap();
    assert!(log.contains("Task timed out after 5.00 seconds"), "{log}");
    assert!(thawd.stop().success());
}

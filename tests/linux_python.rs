//! A Python function on Linux, from handler to served snapshot, the way a user runs it:
//! `thaw function build` makes an image of `examples/python-function` (AWS's unmodified
//! `awslambdaric` and `snapshot-restore-py`, one PyPI dependency, before-snapshot and
//! after-restore hooks), `thaw snapshot create --function` boots it on Debian's cloud kernel and
//! snapshots it at `restore/next`, restores (lazy and eager, and `thaw restore`) answer
//! invocations with working timers, clones differ in entropy and know the time, and `thawd`
//! serves it to boto3 through cold and warm starts, errors, timeouts and crashes. A second,
//! different function on the same runtime (`tests/fixture/python-function-b`) is snapshotted
//! too, and both are pushed to an S3 server on loopback, to measure how many of the store's
//! objects they share.
//!
//! These need a KVM that boots Linux guests: on PVM they run in the nested-KVM host
//! (`fixture::nested`), where times are functional, not performance figures.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;

use std::collections::{BTreeMap, HashMap, HashSet};
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
use snapshot::store_manifest::{StoreChunk, StoreManifest};
use snapshot::store_object::{OBJECT_ZSTD_LEVEL, ObjectName, StoreKeys};

const SNAPSHOTS: &str = "python_function_snapshots_at_restore_next";
const RESTORES: &str = "restored_python_answers_lazy_and_eager_with_working_timers";
const CLONES: &str = "clones_draw_different_entropy_and_read_the_host_clock";
const THAWD: &str = "thawd_serves_the_python_function_to_boto3";
const DEDUP: &str = "two_python_functions_share_chunk_objects_in_the_store";

static LINUX: Group = Group::new(&[SNAPSHOTS, RESTORES, CLONES, THAWD, DEDUP], prepare);

/// The guest's memory: the Python runtime's files live in its initramfs, so in RAM.
const MEM_MIB: u64 = 512;
const ARN: &str = "arn:aws:lambda:us-east-1:000000000000:function:python-function";
/// How long an invocation may take (generous: under emulation everything is slow).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Clones must be restored at least this long after the snapshot, so that a clock that was
/// not corrected would show it.
const CLONE_AGE: Duration = Duration::from_secs(10);

/// Builds, on the host, what the tests need: the static thaw-init and the two functions'
/// images (their PyPI packages come from the network, which the nested host does not have).
fn prepare() -> Vec<(String, String)> {
    let init = static_thaw_init();
    vec![
        ("THAW_INIT".into(), init.display().to_string()),
        (EXAMPLE.var.into(), function_image().display().to_string()),
        (
            SECOND.var.into(),
            second_function_image().display().to_string(),
        ),
    ]
}

/// A function's code, and the variable that names its image in the nested host.
struct Function {
    var: &'static str,
    /// Its code directory, relative to the workspace.
    code: &'static str,
    handler: &'static str,
}

/// The example every test but the dedup one snapshots.
const EXAMPLE: Function = Function {
    var: "THAW_TEST_PYTHON_IMAGE",
    code: "examples/python-function",
    handler: "app.handler",
};
/// Other code on the same runtime, for the dedup test.
const SECOND: Function = Function {
    var: "THAW_TEST_PYTHON_IMAGE_B",
    code: "tests/fixture/python-function-b",
    handler: "stats.handler",
};

fn function_image() -> PathBuf {
    image_of(&EXAMPLE)
}

fn second_function_image() -> PathBuf {
    image_of(&SECOND)
}

/// A function's image, built with `thaw function build` once per set of inputs (the code's
/// files, the handler, thaw-init, the kernel, the runtime) and kept in the target directory.
fn image_of(function: &Function) -> PathBuf {
    if let Some(image) = std::env::var_os(function.var) {
        return PathBuf::from(image);
    }
    let code = Path::new(env!("CARGO_MANIFEST_DIR")).join(function.code);
    let mut inputs: Vec<Vec<u8>> = vec![function.handler.as_bytes().to_vec()];
    let mut files: Vec<PathBuf> = std::fs::read_dir(&code)
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
    let name = code.file_name().unwrap().to_string_lossy();
    let image =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", cache_key(&parts)));
    if image.is_dir() {
        return image;
    }
    let out = thaw_bin()
        .args(["function", "build", "--handler", function.handler])
        .arg("--runtime")
        .arg(&runtime)
        .arg("--code")
        .arg(&code)
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

/// Where the snapshots are made: in the target directory, so that the host that ran the
/// nested group finds them there too (the nested host shares its files).
fn work_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux-python")
}

fn snapshot() -> &'static Snapshot {
    static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let image = function_image();
        // In the target directory, not a TempDir: a static is never dropped. The next run
        // starts by clearing it.
        let work = work_dir();
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).unwrap();
        let key = work.join("master.key");
        snapshot::MasterKey::load_or_create(&key).unwrap();
        let dir = work.join("snapshot");
        let created = create_snapshot(&image, &key, &dir);
        Snapshot {
            dir,
            key,
            created,
            at: Instant::now(),
        }
    })
}

/// `thaw snapshot create --function image` at `MEM_MIB`, sealed with `key`, into `dir`; its
/// output.
fn create_snapshot(image: &Path, key: &Path, dir: &Path) -> String {
    let _slot = vm_slot();
    let out = thaw_bin()
        .args(["snapshot", "create", "--function"])
        .arg(image)
        .args(["--mem-mib", &MEM_MIB.to_string(), "--key-file"])
        .arg(key)
        .arg("--out")
        .arg(dir)
        .output()
        .unwrap();
    let created = output_text(&out);
    assert!(
        out.status.success(),
        "thaw snapshot create failed:\n{created}"
    );
    created
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

/// What `thaw snapshot push` said it did.
struct Pushed {
    /// The distinct chunk objects the snapshot names.
    objects: usize,
    /// Of those, the ones the store did not hold yet.
    uploaded: usize,
    /// Its line.
    line: String,
}

/// `thaw snapshot push dir url --key-file key` to `server`.
fn push(server: &store::test_servers::Server, dir: &Path, url: &str, key: &Path) -> Pushed {
    let out = thaw_bin()
        .args(["snapshot", "push"])
        .arg(dir)
        .arg(url)
        .arg("--key-file")
        .arg(key)
        .envs(server.env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "thaw snapshot push failed:\n{}",
        output_text(&out)
    );
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    // "snapshot ID pushed to URL: C chunks, D with data in N objects, M new (X MiB)..."
    let words: Option<Vec<&str>> = line
        .split_once(" with data in ")
        .map(|(_, rest)| rest.split_whitespace().collect());
    let (objects, uploaded) = match words.as_deref() {
        Some([objects, "objects,", new, "new", ..]) => {
            (objects.parse().unwrap(), new.parse().unwrap())
        }
        _ => panic!("thaw snapshot push said: {line}"),
    };
    Pushed {
        objects,
        uploaded,
        line,
    }
}

/// The chunk objects that snapshot `id`'s manifest in the store names, each with its size in
/// the store (s3s-fs keeps each object as a file).
fn named_objects(
    server: &store::test_servers::Server,
    prefix: &str,
    id: snapshot::SnapshotId,
    master: &snapshot::MasterKey,
) -> BTreeMap<ObjectName, u64> {
    let sealed =
        std::fs::read(server.object_file(&format!("{prefix}/snapshots/{id}/manifest"))).unwrap();
    let manifest = StoreManifest::open(master, id, &sealed).unwrap();
    manifest
        .chunks
        .iter()
        .filter_map(|chunk| match chunk {
            StoreChunk::Data(name) => Some(*name),
            StoreChunk::Zero => None,
        })
        .map(|name| {
            let file = server.object_file(&format!("{prefix}/chunks/{name}"));
            (name, std::fs::metadata(file).unwrap().len())
        })
        .collect()
}

/// The bytes of every chunk object the store holds under `prefix`.
fn stored_bytes(server: &store::test_servers::Server, prefix: &str) -> u64 {
    store::test_servers::chunk_files(server, prefix)
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum()
}

/// Snapshots' memory cut into pieces of one size, as a snapshot with that chunk size would be
/// cut, and the non-zero pieces named and sealed as the store would name and seal them: what
/// two snapshots would share in a store at that chunk size.
struct Pieces {
    size: usize,
    /// Each distinct piece's plaintext and sealed bytes.
    bytes: HashMap<ObjectName, (u64, u64)>,
    /// The pieces each snapshot names.
    named: Vec<HashSet<ObjectName>>,
}

impl Pieces {
    /// Plaintext and sealed bytes of `names`.
    fn sum<'a>(&self, names: impl Iterator<Item = &'a ObjectName>) -> (u64, u64) {
        names.fold((0, 0), |(plain, sealed), name| {
            let (p, s) = self.bytes[name];
            (plain + p, sealed + s)
        })
    }

    /// One line of figures. The dedup ratio is of sealed bytes: what the two snapshots name
    /// separately over what the store holds.
    fn report(&self) -> String {
        let [a, b] = [&self.named[0], &self.named[1]];
        let shared: Vec<&ObjectName> = b.iter().filter(|n| a.contains(n)).collect();
        let ((a_plain, a_sealed), (b_plain, b_sealed)) = (self.sum(a.iter()), self.sum(b.iter()));
        let (shared_plain, shared_sealed) = self.sum(shared.iter().copied());
        let (all_plain, all_sealed) = self.sum(self.bytes.keys());
        let ratio = (a_sealed + b_sealed) as f64 / all_sealed as f64;
        format!(
            "{:>3} KiB chunks: first {} objects ({}), second {} ({}), shared {} ({}: {:.1} % of \
             the second's objects, {:.1} % of its bytes), store holds {} ({}); plaintext: first \
             {}, second {}, shared {}, union {}; dedup ratio {ratio:.3} (plaintext {:.3})",
            self.size >> 10,
            a.len(),
            mib(a_sealed),
            b.len(),
            mib(b_sealed),
            shared.len(),
            mib(shared_sealed),
            100.0 * shared.len() as f64 / b.len() as f64,
            100.0 * shared_sealed as f64 / b_sealed as f64,
            self.bytes.len(),
            mib(all_sealed),
            mib(a_plain),
            mib(b_plain),
            mib(shared_plain),
            mib(all_plain),
            (a_plain + b_plain) as f64 / all_plain as f64,
        )
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// Cuts every data chunk of each snapshot into pieces of each of `sizes` (from the chunk's
/// start, as a snapshot of that chunk size cuts a region; each size divides the snapshots'
/// chunk size) and names each non-zero piece, sealing each distinct one once.
fn cut(dirs: &[&Path], master: &snapshot::MasterKey, sizes: &[usize]) -> Vec<Pieces> {
    let keys = StoreKeys::derive(master);
    let mut all: Vec<Pieces> = sizes
        .iter()
        .map(|&size| Pieces {
            size,
            bytes: HashMap::new(),
            named: vec![HashSet::new(); dirs.len()],
        })
        .collect();
    let mut buf = Vec::new();
    for (s, dir) in dirs.iter().enumerate() {
        let snap = snapshot::Snapshot::open(dir, Some(master)).unwrap();
        for (index, chunk) in snap.chunks().iter().enumerate() {
            if chunk.kind == snapshot::ChunkKind::Zero {
                continue;
            }
            buf.resize(chunk.len as usize, 0);
            snap.read_chunk_authenticated(index, &mut buf).unwrap();
            for pieces in &mut all {
                assert_eq!(snap.chunk_size() as usize % pieces.size, 0);
                // A zero piece would be a zero chunk at that size: no object.
                for piece in buf.chunks(pieces.size).filter(|p| !snapshot::is_zero(p)) {
                    let name = keys.name_of(piece);
                    pieces.named[s].insert(name);
                    pieces.bytes.entry(name).or_insert_with(|| {
                        let (_, object) = keys.seal(piece, OBJECT_ZSTD_LEVEL).unwrap();
                        (piece.len() as u64, object.len() as u64)
                    });
                }
            }
        }
    }
    all
}

/// Two different functions on one runtime, snapshotted with one master key, share chunk
/// objects in the store: the second push uploads only what the first did not, and the store
/// holds less than the two snapshots name. The figures are printed (issue 15's dedup ratio,
/// at the snapshots' chunk size and at smaller ones); what is asserted is that sharing exists,
/// that push's counts agree with what the store holds, and that the second snapshot comes
/// back from the store whole.
#[test]
fn two_python_functions_share_chunk_objects_in_the_store() {
    if LINUX.runs_here(DEDUP) {
        snapshot_second_function();
        if thaw::nested_host::inside() {
            // The store's part needs no KVM, and under the nested host's emulation it took
            // three minutes (each push 40 s, the pull 50 s: the group's whole timeout with the
            // other tests); the host that ran the group does it natively, in seconds, once
            // the group passed, on the snapshots this run left in the target directory.
            return;
        }
    } else if !Path::new("/dev/kvm").exists() {
        // No KVM (THAW_SKIP_KVM): nothing ran. (With KVM, `runs_here` says no only on PVM,
        // once the group passed in the nested host; otherwise it panics.)
        return;
    }
    share_in_the_store(&work_dir());
}

/// Where Linux guests boot: snapshots the second function as `snapshot()` snapshots the
/// first (its key, its memory size), and checks that it answers as the second function.
fn snapshot_second_function() {
    let first = snapshot();
    let second = work_dir().join("snapshot-b");
    let started = Instant::now();
    let created = create_snapshot(&second_function_image(), &first.key, &second);
    assert!(created.contains("Status: success"), "{created}");
    println!("{DEDUP}: second snapshot made in {:.1?}", started.elapsed());
    let out = {
        let _slot = vm_slot();
        thaw_bin()
            .arg("restore")
            .arg(&second)
            .arg("--key-file")
            .arg(&first.key)
            .args(["--invoke", r#"{"numbers": [1, 2, 3, 4], "text": "thaw"}"#])
            .output()
            .unwrap()
    };
    assert!(
        out.status.success(),
        "restoring the second snapshot failed:\n{}",
        output_text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let answer: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no answer:\n{}", output_text(&out)));
    assert_eq!(
        (&answer["count"], &answer["mean"], &answer["median"]),
        (&json!(4), &json!(2.5), &json!(2.5)),
        "{answer}"
    );
    assert_eq!(answer["restores"], 1, "{answer}");
}

/// Pushes the two snapshots in `work` to an S3 server on loopback, one after the other, and
/// measures what the second found there; pulls the second back and checks it.
fn share_in_the_store(work: &Path) {
    let key = work.join("master.key");
    let dirs = [work.join("snapshot"), work.join("snapshot-b")];
    let master = snapshot::MasterKey::load(&key).unwrap();
    let ids: Vec<snapshot::SnapshotId> = dirs
        .iter()
        .map(|dir| snapshot::Snapshot::open(dir, Some(&master)).unwrap().id())
        .collect();

    let server = store::test_servers::s3s_fs();
    let prefix = "functions";
    let url = format!("s3://{}/{prefix}", store::test_servers::BUCKET);
    let a = push(&server, &dirs[0], &url, &key);
    println!("{DEDUP}: first push: {}", a.line);
    assert_eq!(a.uploaded, a.objects, "an empty store: {}", a.line);
    let stored_after_a = stored_bytes(&server, prefix);
    let b = push(&server, &dirs[1], &url, &key);
    println!("{DEDUP}: second push: {}", b.line);
    let stored = stored_bytes(&server, prefix);

    // What push said, against what the store holds.
    let named_a = named_objects(&server, prefix, ids[0], &master);
    let named_b = named_objects(&server, prefix, ids[1], &master);
    assert_eq!(named_a.len(), a.objects, "{}", a.line);
    assert_eq!(named_b.len(), b.objects, "{}", b.line);
    let shared: Vec<&ObjectName> = named_b.keys().filter(|n| named_a.contains_key(n)).collect();
    assert_eq!(b.objects - b.uploaded, shared.len(), "{}", b.line);
    let (bytes_a, bytes_b) = (named_a.values().sum::<u64>(), named_b.values().sum::<u64>());
    let shared_bytes: u64 = shared.iter().map(|n| named_b[*n]).sum();
    assert_eq!(stored_after_a, bytes_a);
    assert_eq!(stored, bytes_a + bytes_b - shared_bytes);
    println!(
        "{DEDUP}: the second push found {} of its {} objects in the store ({:.1} %) and \
         uploaded {} ({} of the {} it names, {:.1} %); the store holds {} for {} named \
         separately: dedup ratio {:.3}",
        shared.len(),
        b.objects,
        100.0 * shared.len() as f64 / b.objects as f64,
        b.uploaded,
        mib(stored - stored_after_a),
        mib(bytes_b),
        100.0 * (stored - stored_after_a) as f64 / bytes_b as f64,
        mib(stored),
        mib(bytes_a + bytes_b),
        (bytes_a + bytes_b) as f64 / stored as f64,
    );
    assert!(
        b.uploaded < b.objects,
        "the second function's snapshot shares no object with the first's: {}",
        b.line
    );

    // The second snapshot, back from the store, is whole: it verifies, and its memory is the
    // original's.
    let pulled = tempfile::tempdir().unwrap();
    let pulled = pulled.path().join("pulled");
    let cache = tempfile::tempdir().unwrap();
    let out = thaw_bin()
        .args(["snapshot", "pull", &url, &ids[1].to_string()])
        .arg(&pulled)
        .arg("--key-file")
        .arg(&key)
        .envs(server.env())
        // Whatever objects a pull keeps for this host go to a cache of the test's own.
        .env("THAW_CACHE_DIR", cache.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "pull failed:\n{}", output_text(&out));
    let out = thaw_bin()
        .args(["snapshot", "verify"])
        .arg(&pulled)
        .arg("--key-file")
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "verify failed:\n{}",
        output_text(&out)
    );
    let (original, copy) = (
        snapshot::Snapshot::open(&dirs[1], Some(&master)).unwrap(),
        snapshot::Snapshot::open(&pulled, Some(&master)).unwrap(),
    );
    assert_eq!(copy.id(), original.id());
    assert_eq!(copy.chunks(), original.chunks());
    let (mut want, mut got) = (Vec::new(), Vec::new());
    for (index, chunk) in original.chunks().iter().enumerate() {
        want.resize(chunk.len as usize, 0);
        got.resize(chunk.len as usize, 0);
        original.read_chunk(index, &mut want).unwrap();
        copy.read_chunk(index, &mut got).unwrap();
        assert!(want == got, "chunk {index} of the pulled copy differs");
    }

    // The same two snapshots cut at smaller chunk sizes (`thaw snapshot create` has no chunk
    // size option): pages that two boots placed at different addresses share a piece when the
    // pieces are small enough.
    let chunk_size = original.chunk_size() as usize;
    let cuts = cut(
        &[&dirs[0], &dirs[1]],
        &master,
        &[4 << 10, 64 << 10, chunk_size],
    );
    for pieces in &cuts {
        println!("{DEDUP}: {}", pieces.report());
    }
    // At the snapshots' own chunk size the cut is what the store holds, byte for byte
    // (sealing is deterministic), so the smaller sizes are measured as the store would hold
    // them.
    let native = cuts.last().unwrap();
    let store_sizes: BTreeMap<ObjectName, u64> = named_a.into_iter().chain(named_b).collect();
    let cut_sizes: BTreeMap<ObjectName, u64> = native
        .bytes
        .iter()
        .map(|(n, &(_, sealed))| (*n, sealed))
        .collect();
    assert!(store_sizes == cut_sizes, "the cut differs from the store");
}

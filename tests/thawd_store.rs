//! thawd serving a function whose snapshot is in an S3-compatible store
//! (`snapshot = "s3://…/snapshots/<id>"`), on real KVM with `s3s-fs` on loopback: the snapshot
//! is pulled through the host cache when thawd starts, kept, pulled again from the cache alone
//! after its copy is removed, pulled again when its copy was altered, and a store that is down
//! is reported at start-up, not a crash. Credentials come from an AWS profile file, as an
//! operator's would.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

mod fixture;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fixture::thawd::{Thawd, function_snapshot};
use fixture::{all_vm_slots, require_kvm};
use store::test_servers::{ACCESS_KEY, BUCKET, REGION, SECRET_KEY, s3s_fs};

/// The value of the unlabelled metric `name` on thawd's `/metrics` page.
fn metric(thawd: &Thawd, name: &str) -> u64 {
    let text = thawd.get("/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// An AWS profile `thaw-test` for the server at `endpoint`, in files of their own; the
/// environment that selects it (and no `AWS_*` credentials of its own).
fn profile_env(dir: &Path, endpoint: &str) -> Vec<(String, String)> {
    let credentials = dir.join("aws-credentials");
    let config = dir.join("aws-config");
    std::fs::write(
        &credentials,
        format!(
            "[thaw-test]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        &config,
        format!("[profile thaw-test]\nregion = {REGION}\nendpoint_url = {endpoint}\n"),
    )
    .unwrap();
    vec![
        ("AWS_PROFILE".into(), "thaw-test".into()),
        (
            "AWS_SHARED_CREDENTIALS_FILE".into(),
            credentials.display().to_string(),
        ),
        ("AWS_CONFIG_FILE".into(), config.display().to_string()),
    ]
}

#[test]
fn thawd_serves_a_snapshot_from_the_store_through_the_host_cache() {
    if !require_kvm("thawd_serves_a_snapshot_from_the_store_through_the_host_cache") {
        return;
    }
    let _slots = all_vm_slots();
    let server = s3s_fs();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    let snap = function_snapshot(dir.path(), "hello", &key_file);
    let master = snapshot::MasterKey::load(&key_file).unwrap();
    let url: store::StoreUrl = format!("s3://{BUCKET}/fns").parse().unwrap();
    let pushed = store::Store::connect(&url, &server.options())
        .unwrap()
        .push(&snap, &master)
        .unwrap();
    let id = pushed.snapshot_id;
    // Gone from this host: thawd must get it from the store.
    std::fs::remove_dir_all(&snap).unwrap();

    let store_dir = dir.path().join("store");
    let copy = store_dir.join("snapshots").join(id.to_string());
    let config = format!(
        "max_concurrency = 2\nspare_workers = 0\nstore_dir = {store:?}\nchunk_cache_mib = 256\n\
         [functions.hello]\nsnapshot = \"{url}/snapshots/{id}\"\nmemory_mib = 128\n\
         timeout_secs = 5\nkey_file = {key:?}\n",
        store = store_dir.display().to_string(),
        key = key_file.display().to_string(),
    );
    let env = profile_env(dir.path(), &server.endpoint);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    // First start: pulled from the store, every object a miss.
    let thawd = Thawd::start_with_env(dir.path(), &config, &env);
    assert_eq!(
        thawd.invoke("hello", "\"thaw:echo=from the store\""),
        "from the store\n"
    );
    assert_eq!(metric(&thawd, "thawd_store_pulls_total"), 1);
    let objects = metric(&thawd, "thawd_chunk_cache_misses_total");
    assert_eq!(objects as usize, pushed.objects, "{pushed:?}");
    assert_eq!(metric(&thawd, "thawd_chunk_cache_hits_total"), 0);
    assert_eq!(metric(&thawd, "thawd_chunk_cache_objects"), objects);
    assert!(thawd.stop().success());
    assert!(copy.join(snapshot::SNAPSHOT_FILE).is_file());

    // Restarted: the copy is kept, nothing is pulled; a copy no function names is removed.
    let stale = store_dir.join("snapshots").join("0".repeat(32));
    std::fs::create_dir_all(&stale).unwrap();
    let thawd = Thawd::start_with_env(dir.path(), &config, &env);
    assert_eq!(metric(&thawd, "thawd_store_pulls_total"), 0);
    assert!(!stale.exists());
    assert_eq!(thawd.invoke("hello", "\"thaw:echo=kept\""), "kept\n");
    assert!(thawd.stop().success());

    // The copy removed: pulled again, every object from the cache that survived the restart.
    std::fs::remove_dir_all(&copy).unwrap();
    let thawd = Thawd::start_with_env(dir.path(), &config, &env);
    assert_eq!(metric(&thawd, "thawd_store_pulls_total"), 1);
    assert_eq!(metric(&thawd, "thawd_chunk_cache_misses_total"), 0);
    assert_eq!(metric(&thawd, "thawd_chunk_cache_hits_total"), objects);
    assert!(thawd.stop().success());

    // The copy altered on this disk: refused at registration, pulled again, served.
    let file = copy.join(snapshot::SNAPSHOT_FILE);
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&file, &bytes).unwrap();
    let thawd = Thawd::start_with_env(dir.path(), &config, &env);
    assert_eq!(metric(&thawd, "thawd_store_pulls_total"), 1);
    assert_eq!(thawd.invoke("hello", "\"thaw:echo=again\""), "again\n");
    assert!(thawd.stop().success());

    // A config that is wrong about the snapshot (its memory size) is refused as it is, without
    // a pull that could not help.
    let wrong = config.replace("memory_mib = 128", "memory_mib = 256");
    let (status, err) = failed_start(dir.path(), &wrong, &env);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("memory_mib is 256"), "{err}");
    assert!(!err.contains("pulling it again"), "{err}");

    // The store down and no copy: the host cache alone has everything (the manifest fetched
    // minutes ago, every object), so thawd starts without asking the store.
    drop(server);
    std::fs::remove_dir_all(&copy).unwrap();
    let thawd = Thawd::start_with_env(dir.path(), &config, &env);
    assert_eq!(metric(&thawd, "thawd_store_pulls_total"), 1);
    assert_eq!(metric(&thawd, "thawd_chunk_cache_misses_total"), 0);
    assert_eq!(thawd.invoke("hello", "\"thaw:echo=cached\""), "cached\n");
    assert!(thawd.stop().success());

    // Nor the cache: thawd says which function and store, and exits.
    std::fs::remove_dir_all(&copy).unwrap();
    std::fs::remove_dir_all(store_dir.join("chunks")).unwrap();
    let started = Instant::now();
    let (status, err) = failed_start(dir.path(), &config, &env);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "function hello: cannot pull its snapshot {url}/snapshots/{id}"
        )),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains(SECRET_KEY), "{err}");
    assert!(!copy.exists());
    println!(
        "a store that is down was reported in {:?}",
        started.elapsed()
    );
}

/// thawd started with `config` (written to `dir/thawd.toml`) where it must not start: its exit
/// status and stderr, within two minutes.
fn failed_start(
    dir: &Path,
    config: &str,
    env: &[(&str, &str)],
) -> (std::process::ExitStatus, String) {
    let path = dir.join("thawd.toml");
    std::fs::write(&path, config).unwrap();
    let started = Instant::now();
    let mut child = Command::new(fixture::thawd_bin::thawd_bin())
        .envs(env.iter().copied())
        .arg("--config")
        .arg(&path)
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("thawd started, or did not give up, with:\n{config}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status, err)
}

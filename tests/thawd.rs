//! thawd end to end on real KVM: a snapshot of the test guest's function served by the real
//! daemon, invoked by unmodified clients (boto3 from PyPI, and `thaw invoke`), with throttling,
//! timeouts, crashes, oversized payloads, unknown functions and asynchronous retries into the
//! dead-letter directory. The test guest answers the SHA-256 of a payload, and misbehaves on
//! request (`thaw:error`, `thaw:crash`, `thaw:hang`, `thaw:sleep=MS`, `thaw:log=N`:
//! docs/test-guest.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;

use std::process::Command;
use std::time::{Duration, Instant};

use fixture::thawd::{Thawd, boto3, children, function_snapshot};
use fixture::{all_vm_slots, require_kvm};
use sha2::{Digest, Sha256};

fn config(snapshot: &std::path::Path, key: &std::path::Path, spare_workers: u32) -> String {
    format!(
        "max_concurrency = 4\nidle_ttl_secs = 30\nspare_workers = {spare_workers}\n\
         event_retry_delays_ms = [100, 200]\n\
         [functions.hello]\nsnapshot = {snap:?}\nmemory_mib = 128\ntimeout_secs = 2\n\
         key_file = {key:?}\n\
         [functions.single]\nsnapshot = {snap:?}\nmemory_mib = 128\ntimeout_secs = 1\n\
         reserved_concurrency = 1\nkey_file = {key:?}\n",
        snap = snapshot.display().to_string(),
        key = key.display().to_string(),
    )
}

/// thawd serving `hello` and `single` from one snapshot of the test guest, holding every VM
/// slot while it runs.
struct Served {
    thawd: Thawd,
    _dir: tempfile::TempDir,
    _slots: Vec<fixture::VmSlot>,
}

fn served(spare_workers: u32) -> Served {
    let slots = all_vm_slots();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let snap = function_snapshot(dir.path(), "hello", &key);
    let thawd = Thawd::start(dir.path(), &config(&snap, &key, spare_workers));
    Served {
        thawd,
        _dir: dir,
        _slots: slots,
    }
}

fn sha_hex(payload: &[u8]) -> String {
    Sha256::digest(payload)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn boto3_invokes_thawd_unmodified() {
    if !require_kvm("boto3_invokes_thawd_unmodified") {
        return;
    }
    let Served {
        thawd,
        _dir,
        _slots,
    } = served(1);
    let payload = br#"{"hello":"world"}"#;
    let out = boto3(
        &thawd.endpoint,
        r#"
r = client.invoke(FunctionName='hello', Payload=b'{"hello":"world"}')
print('ok', r['StatusCode'], r.get('FunctionError'), r['ExecutedVersion'], r['Payload'].read().hex())
r = client.invoke(FunctionName='arn:aws:lambda:us-east-1:000000000000:function:hello', Payload=b'"thaw:error"', LogType='Tail')
log = base64.b64decode(r['LogResult']).decode()
doc = json.loads(r['Payload'].read())
print('error', r['StatusCode'], r['FunctionError'], doc['errorType'])
print('log', 'START RequestId:' in log, 'END RequestId:' in log, 'REPORT RequestId:' in log)
r = client.invoke(FunctionName='hello', Payload=b'"thaw:log=3"', LogType='Tail')
log = base64.b64decode(r['LogResult']).decode()
print('lines', log.count('log line '), r['Payload'].read().decode())
r = client.invoke(FunctionName='hello', InvocationType='Event', Payload=b'{}')
print('event', r['StatusCode'])
r = client.invoke(FunctionName='hello', InvocationType='DryRun')
print('dryrun', r['StatusCode'])
try:
    client.invoke(FunctionName='nope', Payload=b'{}')
    print('missing', 'no error')
except client.exceptions.ResourceNotFoundException as e:
    print('missing', e.response['Error']['Code'], e.response['ResponseMetadata']['HTTPStatusCode'])
"#,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        format!("ok 200 None $LATEST {}", sha_hex(payload)),
        "{out}"
    );
    assert_eq!(
        lines[1], "error 200 Unhandled TestGuest.InvokeError",
        "{out}"
    );
    assert_eq!(lines[2], "log True True True", "{out}");
    assert_eq!(lines[3], "lines 3 logged 3 lines", "{out}");
    assert_eq!(lines[4], "event 202", "{out}");
    assert_eq!(lines[5], "dryrun 204", "{out}");
    assert_eq!(lines[6], "missing ResourceNotFoundException 404", "{out}");

    // `thaw invoke` is a client too.
    let out = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args([
            "invoke",
            "hello",
            "\"thaw:echo=hi\"",
            "--endpoint",
            &thawd.endpoint,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");

    // The log file has a REPORT with a Restore Duration for the first invocation.
    let log = std::fs::read_to_string(thawd.dir.join("logs/hello.log")).unwrap();
    assert!(log.contains("Restore Duration: "), "{log}");
    let metrics = thawd.get("/metrics");
    assert!(metrics.contains("thawd_invocations_total"), "{metrics}");

    let pid = thawd.pid();
    let status = thawd.stop();
    assert!(status.success(), "{status:?}");
    assert!(children(pid).is_empty());
}

#[test]
fn throttles_timeouts_crashes_and_bad_requests() {
    if !require_kvm("throttles_timeouts_crashes_and_bad_requests") {
        return;
    }
    let Served {
        thawd,
        _dir,
        _slots,
    } = served(1);
    let out = boto3(
        &thawd.endpoint,
        r#"
import threading
results = []
def slow():
    try:
        r = client.invoke(FunctionName='single', Payload=b'"thaw:sleep=700"')
        results.append(('ok', r['Payload'].read().decode()))
    except client.exceptions.TooManyRequestsException as e:
        results.append(('throttled', e.response['ResponseMetadata']['HTTPStatusCode']))
threads = [threading.Thread(target=slow) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
print('throttle', sorted(results))
r = client.invoke(FunctionName='single', Payload=b'"thaw:hang"')
doc = json.loads(r['Payload'].read())
print('timeout', r.get('FunctionError'), doc['errorType'], doc['errorMessage'].endswith('Task timed out after 1.00 seconds'))
r = client.invoke(FunctionName='single', Payload=b'"thaw:echo=after timeout"')
print('next', r.get('FunctionError'), r['Payload'].read().decode())
r = client.invoke(FunctionName='hello', Payload=b'"thaw:crash"')
doc = json.loads(r['Payload'].read())
print('crash', r.get('FunctionError'), doc['errorType'])
r = client.invoke(FunctionName='hello', Payload=b'"thaw:echo=after crash"')
print('next', r.get('FunctionError'), r['Payload'].read().decode())
try:
    client.invoke(FunctionName='hello', Payload=b'"' + b'x' * (6 * 1024 * 1024 - 1) + b'"')
    print('big', 'accepted')
except client.exceptions.RequestTooLargeException as e:
    print('big', e.response['Error']['Code'], e.response['ResponseMetadata']['HTTPStatusCode'])
r = client.invoke(FunctionName='hello', Payload=b'"' + b'x' * (6 * 1024 * 1024 - 2) + b'"')
print('limit', r['StatusCode'], len(r['Payload'].read()))
"#,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "throttle [('ok', 'slept 700 ms'), ('throttled', 429)]",
        "{out}"
    );
    assert_eq!(lines[1], "timeout Unhandled Sandbox.Timedout True", "{out}");
    assert_eq!(lines[2], "next None after timeout", "{out}");
    assert_eq!(lines[3], "crash Unhandled Runtime.ExitError", "{out}");
    assert_eq!(lines[4], "next None after crash", "{out}");
    assert_eq!(lines[5], "big RequestTooLargeException 413", "{out}");
    assert_eq!(lines[6], "limit 200 32", "{out}");
    let log = std::fs::read_to_string(thawd.dir.join("logs/single.log")).unwrap();
    assert!(log.contains("Task timed out after 1.00 seconds"), "{log}");
    assert!(thawd.stop().success());
}

#[test]
fn failed_events_are_retried_twice_then_dead_lettered() {
    if !require_kvm("failed_events_are_retried_twice_then_dead_lettered") {
        return;
    }
    let Served {
        thawd,
        _dir,
        _slots,
    } = served(1);
    let out = boto3(
        &thawd.endpoint,
        r#"
r = client.invoke(FunctionName='hello', InvocationType='Event', Payload=b'"thaw:error"')
print(r['StatusCode'], r['ResponseMetadata']['RequestId'])
r = client.invoke(FunctionName='hello', InvocationType='Event', Payload=b'"thaw:log=1"')
print(r['StatusCode'])
try:
    client.invoke(FunctionName='hello', InvocationType='Event', Payload=b'"' + b'x' * (256 * 1024 - 1) + b'"')
except client.exceptions.RequestTooLargeException as e:
    print('big', e.response['ResponseMetadata']['HTTPStatusCode'])
"#,
    );
    let lines: Vec<&str> = out.lines().collect();
    let (status, request_id) = lines[0].split_once(' ').unwrap();
    assert_eq!(status, "202");
    assert_eq!(lines[1], "202");
    assert_eq!(lines[2], "big 413");
    let dead = thawd
        .dir
        .join(format!("dead-letter/hello/{request_id}.json"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dead.exists() {
        assert!(
            Instant::now() < deadline,
            "no dead letter at {}",
            dead.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(&dead).unwrap()).unwrap();
    assert_eq!(record["approximateInvokeCount"], 3, "{record}");
    assert!(
        record["lastError"]
            .as_str()
            .unwrap()
            .contains("TestGuest.InvokeError")
    );
    // The successful event ran once and was not dead-lettered.
    let log = std::fs::read_to_string(thawd.dir.join("logs/hello.log")).unwrap();
    assert_eq!(log.matches("log line 1 of 1").count(), 1, "{log}");
    assert_eq!(
        std::fs::read_dir(thawd.dir.join("dead-letter/hello"))
            .unwrap()
            .count(),
        1
    );
    assert!(thawd.stop().success());
}

/// Issue 14, defect 4: accepted events were lost when thawd stopped. Events accepted (202)
/// and not yet run when thawd is killed (SIGKILL, as a crash) run when it starts again: each
/// has its START line in the function's log, and the event directory empties.
#[test]
fn accepted_events_run_after_thawd_crashes_and_starts_again() {
    if !require_kvm("accepted_events_run_after_thawd_crashes_and_starts_again") {
        return;
    }
    let slots = all_vm_slots();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let snap = function_snapshot(dir.path(), "hello", &key);
    // One event at a time, each a second long: most are still queued when thawd dies.
    let config = format!(
        "max_concurrency = 1\nspare_workers = 1\n\
         [functions.hello]\nsnapshot = {snap:?}\nmemory_mib = 128\ntimeout_secs = 5\n\
         key_file = {key:?}\n",
        snap = snap.display().to_string(),
        key = key.display().to_string(),
    );
    let thawd = Thawd::start(dir.path(), &config);
    let out = boto3(
        &thawd.endpoint,
        r#"
for n in range(6):
    r = client.invoke(FunctionName='hello', InvocationType='Event', Payload=b'"thaw:sleep=1000"')
    print(r['StatusCode'], r['ResponseMetadata']['RequestId'])
"#,
    );
    let pid = thawd.pid();
    thawd.kill();
    let ids: Vec<&str> = out
        .lines()
        .map(|line| line.strip_prefix("202 ").expect(line))
        .collect();
    assert_eq!(ids.len(), 6, "{out}");
    let events = dir.path().join("events");
    let kept = std::fs::read_dir(&events).unwrap().count();
    assert!(
        kept >= 3,
        "only {kept} events were still waiting when thawd died"
    );
    // Its workers die with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !children(pid).is_empty() {
        assert!(Instant::now() < deadline, "workers outlived thawd");
        std::thread::sleep(Duration::from_millis(50));
    }

    let thawd = Thawd::start(dir.path(), &config);
    let deadline = Instant::now() + Duration::from_secs(90);
    while std::fs::read_dir(&events).unwrap().count() > 0 {
        assert!(Instant::now() < deadline, "the kept events did not all run");
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(dir.path().join("logs/hello.log")).unwrap();
    for id in &ids {
        assert!(
            log.contains(&format!("START RequestId: {id}")),
            "{id} never ran: {log}"
        );
    }
    assert!(
        !dir.path().join("dead-letter/hello").exists(),
        "none failed"
    );
    assert!(thawd.stop().success());
    drop(slots);
}

/// Issue 14: a guest escape into a worker lands in a jail. With thawd's test hook on (a worker
/// then answers two payloads itself, as code running inside it would), a worker reports that
/// it runs as the unprivileged user with no capabilities, no_new_privs and a seccomp filter,
/// and cannot open a host file that exists; a forbidden syscall kills it with SIGSYS, the
/// caller gets Lambda's error, and thawd goes on serving with a fresh environment.
#[test]
fn a_jailed_worker_is_unprivileged_sees_no_host_file_and_dies_on_a_forbidden_syscall() {
    if !require_kvm(
        "a_jailed_worker_is_unprivileged_sees_no_host_file_and_dies_on_a_forbidden_syscall",
    ) {
        return;
    }
    let slots = all_vm_slots();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let snap = function_snapshot(dir.path(), "hello", &key);
    let secret = dir.path().join("host-secret.txt");
    std::fs::write(&secret, "host data").unwrap();
    // Readable by anyone on the host: only the jail keeps the worker from it.
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let config = format!(
        "max_concurrency = 2\nspare_workers = 1\njail_uid = 64000\njail_gid = 64001\n\
         [functions.hello]\nsnapshot = {snap:?}\nmemory_mib = 128\ntimeout_secs = 5\n\
         key_file = {key:?}\n",
        snap = snap.display().to_string(),
        key = key.display().to_string(),
    );
    let secret_path = secret.display().to_string();
    let thawd = Thawd::start_with_env(
        dir.path(),
        &config,
        &[
            ("THAW_WORKER_SELF_TEST", "1"),
            ("THAW_WORKER_SELF_TEST_PATH", &secret_path),
        ],
    );
    let out = boto3(
        &thawd.endpoint,
        r#"
import json
r = client.invoke(FunctionName='hello', Payload=b'"thaw:self-test=identity"')
print(r['Payload'].read().decode())
try:
    client.invoke(FunctionName='hello', Payload=b'"thaw:self-test=forbidden-syscall"')
    print('answered')
except client.exceptions.ServiceException as e:
    print(e.response['ResponseMetadata']['HTTPStatusCode'], e.response['Error']['Message'])
r = client.invoke(FunctionName='hello', Payload=b'{"after":1}')
print(r['StatusCode'], r.get('FunctionError'), len(r['Payload'].read()))
"#,
    );
    let lines: Vec<&str> = out.lines().collect();
    let identity: serde_json::Value = serde_json::from_str(lines[0]).expect(&out);
    eprintln!("jailed worker: {identity}");
    assert_eq!(identity["uid"], 64000, "{identity}");
    assert_eq!(identity["euid"], 64000, "{identity}");
    assert_eq!(identity["gid"], 64001, "{identity}");
    assert_eq!(identity["pid"], 1, "PID 1 of its own namespace: {identity}");
    assert_eq!(identity["capEff"], "0000000000000000", "{identity}");
    assert_eq!(identity["capBnd"], "0000000000000000", "{identity}");
    assert_eq!(identity["noNewPrivs"], "1", "{identity}");
    assert_eq!(
        identity["seccomp"], "2",
        "a filter is installed: {identity}"
    );
    assert_eq!(identity["probe"], secret_path.as_str());
    assert!(
        identity["probeOpen"]
            .as_str()
            .unwrap()
            .contains("No such file"),
        "the host file is out of sight: {identity}"
    );
    // Killed by SIGSYS; the caller gets Lambda's ServiceException, as for any worker death.
    assert!(lines[1].starts_with("500 "), "{out}");
    assert!(lines[1].contains("signal: 31 (SIGSYS)"), "{out}");
    // And thawd serves on, from a fresh environment (the test guest answers a SHA-256).
    assert_eq!(lines[2], "200 None 32", "{out}");
    assert!(thawd.stop().success());
    drop(slots);
}

#[test]
fn a_tampered_snapshot_stops_thawd_before_it_serves() {
    if !require_kvm("a_tampered_snapshot_stops_thawd_before_it_serves") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let snap = {
        let _slots = all_vm_slots();
        function_snapshot(dir.path(), "f", &key)
    };
    // Flip one byte near the end of the file, inside the last memory chunks.
    let file = snap.join("snapshot.thaw");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 4096;
    bytes[at] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();
    let config_path = dir.path().join("thawd.toml");
    std::fs::write(&config_path, config(&snap, &key, 1)).unwrap();
    let out = Command::new(fixture::thawd_bin::thawd_bin())
        .arg("--config")
        .arg(&config_path)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("snapshot") && err.contains("refused"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
}

#[test]
fn a_killed_worker_costs_one_environment_not_the_daemon() {
    if !require_kvm("a_killed_worker_costs_one_environment_not_the_daemon") {
        return;
    }
    // No spare workers: the frozen environment is the daemon's only child.
    let Served {
        thawd,
        _dir,
        _slots,
    } = served(0);
    let call = |payload: &str| thawd.invoke("hello", payload);
    assert_eq!(call("\"thaw:echo=one\""), "one\n");
    // The idle (frozen) environment's worker is the daemon's only child: kill it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let worker = loop {
        let kids = children(thawd.pid());
        if kids.len() == 1 {
            break kids[0];
        }
        assert!(Instant::now() < deadline, "workers: {kids:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The next invocation finds it dead, discards it and restores a fresh environment.
    assert_eq!(call("\"thaw:echo=two\""), "two\n");
    assert_eq!(call("\"thaw:echo=three\""), "three\n");
    let pid = thawd.pid();
    assert!(thawd.stop().success());
    assert!(children(pid).is_empty());
}

/// The value of the metric line that starts with `series` (e.g. `thawd_x_total{function="a"}`).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn restores_map_the_shared_copy_and_an_exhausted_budget_falls_back_to_private() {
    if !require_kvm("restores_map_the_shared_copy_and_an_exhausted_budget_falls_back_to_private") {
        return;
    }
    let slots = all_vm_slots();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let snap = function_snapshot(dir.path(), "hello", &key);
    // Every invocation restores (nothing is kept idle), so each one shows which path it took.
    let config = |budget_mib: u64| {
        format!(
            "spare_workers = 1\nmax_idle_per_function = 0\ndecoded_copy_budget_mib = {budget_mib}\n\
             [functions.hello]\nsnapshot = {snap:?}\nmemory_mib = 128\nkey_file = {key:?}\n",
            snap = snap.display().to_string(),
            key = key.display().to_string(),
        )
    };
    let invoke = |thawd: &Thawd, text: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_thaw"))
            .args([
                "invoke",
                "hello",
                &format!("\"thaw:note={text}\""),
                "--endpoint",
                &thawd.endpoint,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        // Every environment is a fresh clone: it sees the snapshot's note, never an earlier
        // clone's.
        assert_eq!(String::from_utf8_lossy(&out.stdout), "from the snapshot\n");
    };

    // With room for the copy: once it is decoded, restores map it.
    let thawd = Thawd::start(dir.path(), &config(1024));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    let text = loop {
        invoke(&thawd, &format!("clone {n}"));
        n += 1;
        let text = thawd.get("/metrics");
        if metric(
            &text,
            "thawd_shared_copy_restores_total{function=\"hello\"}",
        ) >= Some(2.0)
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no restore used the copy:\n{text}"
        );
    };
    println!("{n} invocations until two restores used the copy");
    let bytes = metric(&text, "thawd_decoded_copy_bytes{function=\"hello\"}").unwrap_or(0.0);
    assert!(bytes > 0.0, "{text}");
    assert_eq!(
        metric(
            &text,
            "thawd_shared_copy_misses_total{function=\"hello\",reason=\"budget\"}"
        ),
        None,
        "{text}"
    );
    assert!(thawd.stop().success());

    // Without room: every restore is private, still answers, and the metrics say why.
    let thawd = Thawd::start(dir.path(), &config(0));
    for n in 0..3 {
        invoke(&thawd, &format!("private {n}"));
    }
    let text = thawd.get("/metrics");
    assert_eq!(
        metric(
            &text,
            "thawd_shared_copy_misses_total{function=\"hello\",reason=\"budget\"}"
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "thawd_shared_copy_restores_total{function=\"hello\"}"
        ),
        None
    );
    assert_eq!(metric(&text, "thawd_decoded_copy_budget_bytes"), Some(0.0));
    assert!(thawd.stop().success());
    drop(slots);
}

//! thawd under hostile clients (issue 14): while idle connections, slowloris heads and
//! half-sent 6 MB bodies are held open against it, a normal client's invocations must all
//! succeed with a p99 under 3× their p99 on a quiet daemon, and thawd's resident memory must
//! stay under the bound its front limits give.
//!
//! One real `thawd` (the release binary) with the default front limits (`max_connections`
//! 1024, header timeout 10 s, body timeout 30 s, body budget 64 MiB) and `max_concurrency = 2`
//! serves the test guest's agent (128 MiB, 1 vCPU, encrypted snapshot) with its idle
//! environment kept, so a normal invocation is the front plus a warm (thawed) invocation. The
//! normal client (`thaw invoke`'s, one connection per invocation) makes N sequential
//! invocations, one every [`PACE`], on the quiet daemon, then again under attack; the test
//! guest answers the SHA-256 of each payload, which is checked. The attackers run on one
//! thread (a current-thread tokio runtime) and re-open any connection thawd closes (after
//! [`RECONNECT_DELAY`], or [`BODY_RECONNECT_DELAY`] for the bodies):
//!
//! - idle: connect and send nothing (thawd closes them after its header timeout);
//! - slowloris: an invocation's request head, one byte every [`SLOWLORIS_PERIOD`], never
//!   finished (closed after the header timeout too);
//! - half-sent bodies: an invocation's head with `content-length: 6291456` (Lambda's 6 MB
//!   limit), then all of the body but its last byte, then nothing (the body budget admits
//!   about ten, which thawd reads until its body timeout; the others are answered 429 and
//!   closed, and come back).
//!
//! thawd's RSS (its own process, not its workers) is sampled every 100 ms, with how many
//! attackers of each kind are connected and thawd's descriptors.
//!
//! Run: `cargo bench --bench thawd_hostile [-- --iterations N] [-- --write]`; as a smoke test
//! (`cargo test --release --bench thawd_hostile`) it runs a few invocations against fewer
//! attackers for a few seconds.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a bench: failing loudly is the point

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use restore_daemon::daemon::MAX_SYNC_PAYLOAD;
use restore_daemon::daemon::front::{FrontLimits, MAX_HEAD_BUFFER, UNBUDGETED_BODY};
use sha2::{Digest, Sha256};
use thaw::commands::invoke::{InvocationType, InvokeArgs, invoke};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;
#[path = "support/thawd_daemon.rs"]
mod thawd_daemon;
use support::ms;

/// The function's name in thawd's config and in the attackers' request heads.
const FUNCTION: &str = "f";
/// How long an idle or slowloris attacker waits before re-opening a connection thawd closed:
/// at once, but for a breath so that a refused connect does not spin.
const RECONNECT_DELAY: Duration = Duration::from_millis(10);
/// How long a body attacker waits before re-opening: each re-open sends 6 MB again, and
/// without a pause 60 of them would be a bandwidth flood, which no front limit is meant to
/// stop (nor could, on two cores).
const BODY_RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// A body whole but for its last byte and still unanswered this long after it was sent is
/// being read by thawd, within its budget: a refused one is answered once thawd has seen
/// nothing more for 250 ms.
const READING_AFTER: Duration = Duration::from_secs(1);
/// A slowloris attacker sends one byte of its head this often.
const SLOWLORIS_PERIOD: Duration = Duration::from_secs(1);
/// The normal client starts an invocation this long after the previous one ended, so that
/// the hostile phase spans thawd's header timeout and the attackers' reconnections.
const PACE: Duration = Duration::from_millis(50);
/// How often thawd's RSS and the attackers' census are sampled.
const SAMPLE_PERIOD: Duration = Duration::from_millis(100);
/// The longest the attackers are given to be all connected and to have sent their bodies.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// How many attackers of each kind.
#[derive(Clone, Copy, Debug)]
struct Attack {
    idle: usize,
    slowloris: usize,
    bodies: usize,
}

impl Attack {
    fn total(self) -> usize {
        self.idle + self.slowloris + self.bodies
    }
}

/// The figures.
const FULL_ATTACK: Attack = Attack {
    idle: 500,
    slowloris: 200,
    bodies: 60,
};
/// For the smoke test: still more bodies than the budget admits.
const SMOKE_ATTACK: Attack = Attack {
    idle: 50,
    slowloris: 20,
    bodies: 12,
};

// ---------------------------------------------------------------------------------------
// The attackers and their census.

/// Connections of one kind of attacker.
struct Gauges {
    /// Connected now (and not yet seen closed).
    open: AtomicUsize,
    /// Connections made in all.
    opened: AtomicUsize,
    /// Connections thawd closed.
    closed: AtomicUsize,
}

impl Gauges {
    const fn new() -> Self {
        Self {
            open: AtomicUsize::new(0),
            opened: AtomicUsize::new(0),
            closed: AtomicUsize::new(0),
        }
    }

    /// Counts a new connection, open until the guard is dropped.
    fn up(&'static self) -> Held {
        self.opened.fetch_add(1, Ordering::Relaxed);
        Held::new(&self.open)
    }
}

/// One unit of a gauge, given back when dropped.
struct Held(&'static AtomicUsize);

impl Held {
    fn new(gauge: &'static AtomicUsize) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Census {
    idle: Gauges,
    slowloris: Gauges,
    bodies: Gauges,
    /// Half-sent bodies whole but for their last byte and unanswered for [`READING_AFTER`]:
    /// thawd is reading them (and holds budget for them).
    reading: AtomicUsize,
    /// Body attackers that have sent their body (all but its last byte) at least once.
    bodies_sent: AtomicUsize,
    /// Body bytes written, all attackers together.
    body_bytes: AtomicU64,
    /// The status of each answer a body attacker received.
    answers: Mutex<BTreeMap<u16, usize>>,
}

static CENSUS: Census = Census {
    idle: Gauges::new(),
    slowloris: Gauges::new(),
    bodies: Gauges::new(),
    reading: AtomicUsize::new(0),
    bodies_sent: AtomicUsize::new(0),
    body_bytes: AtomicU64::new(0),
    answers: Mutex::new(BTreeMap::new()),
};

/// Waits until the peer closes the connection (or it fails), ignoring what it sends.
async fn until_closed(stream: &mut TcpStream) {
    let mut sink = [0u8; 1024];
    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
}

async fn idle(addr: SocketAddr) {
    loop {
        if let Ok(mut stream) = TcpStream::connect(addr).await {
            let _open = CENSUS.idle.up();
            until_closed(&mut stream).await;
            CENSUS.idle.closed.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(RECONNECT_DELAY).await;
    }
}

fn invoke_head(addr: SocketAddr) -> String {
    format!(
        "POST /2015-03-31/functions/{FUNCTION}/invocations HTTP/1.1\r\nhost: {addr}\r\n\
         content-type: application/json\r\n"
    )
}

async fn slowloris(addr: SocketAddr) {
    // A header whose value never ends: the head is never complete.
    let head = invoke_head(addr) + "x-slowloris: ";
    loop {
        if let Ok(mut stream) = TcpStream::connect(addr).await {
            let _open = CENSUS.slowloris.up();
            let mut bytes = head.bytes().chain(std::iter::repeat(b'z'));
            let mut tick = tokio::time::interval(SLOWLORIS_PERIOD);
            let mut sink = [0u8; 1024];
            loop {
                tokio::select! {
                    read = stream.read(&mut sink) => {
                        if !matches!(read, Ok(n) if n > 0) {
                            break;
                        }
                    }
                    _ = tick.tick() => {
                        let byte = [bytes.next().unwrap_or(b'z')];
                        if stream.write_all(&byte).await.is_err() {
                            break;
                        }
                    }
                }
            }
            CENSUS.slowloris.closed.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(RECONNECT_DELAY).await;
    }
}

/// Sends `head` and all of a `MAX_SYNC_PAYLOAD` body but its last byte.
async fn send_all_but_last(stream: &mut TcpStream, head: &[u8], chunk: &[u8]) -> bool {
    if stream.write_all(head).await.is_err() {
        return false;
    }
    let mut left = MAX_SYNC_PAYLOAD - 1;
    while left > 0 {
        let n = left.min(chunk.len());
        if stream.write_all(&chunk[..n]).await.is_err() {
            return false;
        }
        CENSUS.body_bytes.fetch_add(n as u64, Ordering::Relaxed);
        left -= n;
    }
    true
}

/// The status code at the start of an HTTP/1.1 answer.
fn status_of(answer: &[u8]) -> u16 {
    answer
        .strip_prefix(b"HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| std::str::from_utf8(code).ok())
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

async fn half_body(addr: SocketAddr) {
    let head = invoke_head(addr) + &format!("content-length: {MAX_SYNC_PAYLOAD}\r\n\r\n");
    let chunk = vec![b' '; 64 * 1024];
    let mut sent_once = false;
    loop {
        if let Ok(mut stream) = TcpStream::connect(addr).await {
            let _open = CENSUS.bodies.up();
            if send_all_but_last(&mut stream, head.as_bytes(), &chunk).await {
                if !sent_once {
                    CENSUS.bodies_sent.fetch_add(1, Ordering::Relaxed);
                    sent_once = true;
                }
                let mut answer = [0u8; 1024];
                let (read, reading) =
                    match tokio::time::timeout(READING_AFTER, stream.read(&mut answer)).await {
                        Ok(read) => (read, None),
                        Err(_) => {
                            let reading = Held::new(&CENSUS.reading);
                            (stream.read(&mut answer).await, Some(reading))
                        }
                    };
                drop(reading);
                if let Ok(n @ 1..) = read {
                    *CENSUS
                        .answers
                        .lock()
                        .unwrap()
                        .entry(status_of(&answer[..n]))
                        .or_default() += 1;
                    until_closed(&mut stream).await;
                }
            }
            CENSUS.bodies.closed.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(BODY_RECONNECT_DELAY).await;
    }
}

/// The attackers' thread; they stop, and their sockets close, when this is dropped.
struct Attackers {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Attackers {
    fn start(addr: SocketAddr, attack: Attack) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("attackers".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    for _ in 0..attack.bodies {
                        tokio::spawn(half_body(addr));
                    }
                    for _ in 0..attack.slowloris {
                        tokio::spawn(slowloris(addr));
                    }
                    for _ in 0..attack.idle {
                        tokio::spawn(idle(addr));
                    }
                    let _ = stopped.await;
                });
                // Dropping the runtime drops every attacker and closes its socket.
            })
            .unwrap();
        Self {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Attackers {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// thawd, the normal client and the sampler.

/// One invocation, its answer checked: how long it took, or what went wrong.
fn call(endpoint: &str, i: usize) -> Result<Duration, String> {
    let payload = format!("{{\"hostile\":{i}}}").into_bytes();
    let args = InvokeArgs {
        endpoint: endpoint.into(),
        function: FUNCTION.into(),
        payload: payload.clone(),
        invocation_type: InvocationType::RequestResponse,
        tail: false,
        timeout: Duration::from_secs(60),
    };
    let t = Instant::now();
    let r = invoke(&args).map_err(|e| format!("{e:#}"))?;
    let took = t.elapsed();
    let want: [u8; 32] = Sha256::digest(&payload).into();
    if r.status == 200 && r.function_error.is_none() && r.body == want {
        Ok(took)
    } else {
        Err(format!(
            "status {}, error type {:?}, function error {:?}, body {:?}",
            r.status,
            r.error_type,
            r.function_error,
            String::from_utf8_lossy(&r.body)
        ))
    }
}

/// Invocations `first..first + n`, one every `pace`: the latencies of those that succeeded
/// and what went wrong with the others.
fn invocations(
    endpoint: &str,
    first: usize,
    n: usize,
    pace: Duration,
) -> (Vec<Duration>, Vec<String>) {
    let mut took = Vec::with_capacity(n);
    let mut failed = Vec::new();
    for i in first..first + n {
        match call(endpoint, i) {
            Ok(d) => took.push(d),
            Err(e) => failed.push(format!("invocation {i}: {e}")),
        }
        std::thread::sleep(pace);
    }
    (took, failed)
}

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration, Duration, Duration) {
    v.sort();
    let at = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    (at(0.5), at(0.99), v[0], v[v.len() - 1])
}

/// What the sampler was told is going on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Between = 0,
    Quiet = 1,
    /// Attackers connecting, before the normal client starts.
    Settling = 2,
    /// Attackers held open, the normal client invoking.
    Hostile = 3,
    /// Attackers gone.
    After = 4,
}

/// One sample: thawd's RSS and descriptors, and the attackers connected.
#[derive(Clone, Copy, Debug)]
struct Sample {
    phase: u8,
    rss_kib: u64,
    fds: usize,
    idle: usize,
    slowloris: usize,
    bodies: usize,
    reading: usize,
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

struct Sampler {
    phase: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let phase = Arc::new(AtomicU8::new(Phase::Between as u8));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (phase, stop) = (phase.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    samples.push(Sample {
                        phase: phase.load(Ordering::Relaxed),
                        rss_kib: rss_kib(pid),
                        fds: fd_count(pid),
                        idle: CENSUS.idle.open.load(Ordering::Relaxed),
                        slowloris: CENSUS.slowloris.open.load(Ordering::Relaxed),
                        bodies: CENSUS.bodies.open.load(Ordering::Relaxed),
                        reading: CENSUS.reading.load(Ordering::Relaxed),
                    });
                    std::thread::sleep(SAMPLE_PERIOD);
                }
                samples
            })
        };
        Self {
            phase,
            stop,
            thread,
        }
    }

    fn enter(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit: the attackers hold hundreds
/// of sockets.
fn raise_descriptor_limit(needed: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    assert!(
        hard >= needed,
        "RLIMIT_NOFILE's hard limit {hard} is below the {needed} descriptors the attackers need"
    );
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// "min–max (mean)" of `f` over `samples`.
fn range(samples: &[Sample], f: impl Fn(&Sample) -> usize) -> String {
    let min = samples.iter().map(&f).min().unwrap_or(0);
    let max = samples.iter().map(&f).max().unwrap_or(0);
    let mean = samples.iter().map(&f).sum::<usize>() as f64 / samples.len().max(1) as f64;
    if min == max {
        format!("{min}")
    } else {
        format!("{min}–{max} ({mean:.0})")
    }
}

fn main() {
    let args = support::args(200);
    let full = args.iterations > 1;
    let (attack, n, pace, settle, after) = if full {
        (
            FULL_ATTACK,
            args.iterations,
            PACE,
            Duration::from_secs(5),
            Duration::from_secs(5),
        )
    } else {
        (
            SMOKE_ATTACK,
            5,
            Duration::from_millis(100),
            Duration::from_secs(2),
            Duration::from_secs(1),
        )
    };
    raise_descriptor_limit(attack.total() as u64 + 256);
    let limits = FrontLimits::default();

    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let snap = support::agent_snapshot(dir.path(), &key, 0, 128);
    // The front's limits are left at their defaults (`limits` above).
    let daemon = thawd_daemon::start(
        dir.path(),
        "thawd",
        &format!(
            "max_concurrency = 2\n[functions.{FUNCTION}]\nsnapshot = {:?}\nmemory_mib = 128\n\
             timeout_secs = 30\nkey_file = {:?}\n",
            snap.display().to_string(),
            key.display().to_string()
        ),
    );
    let addr: SocketAddr = daemon
        .endpoint
        .strip_prefix("http://")
        .unwrap()
        .parse()
        .unwrap();
    let sampler = Sampler::start(daemon.child.id());

    // The first invocation restores the environment; every later one thaws it.
    let first = call(&daemon.endpoint, 0).expect("the first invocation");

    sampler.enter(Phase::Quiet);
    let (quiet, quiet_failed) = invocations(&daemon.endpoint, 1, n, pace);
    sampler.enter(Phase::Between);
    assert!(
        quiet_failed.is_empty(),
        "invocations failed on the quiet daemon:\n{}",
        quiet_failed.join("\n")
    );

    sampler.enter(Phase::Settling);
    let attack_started = Instant::now();
    let attackers = Attackers::start(addr, attack);
    loop {
        let elapsed = attack_started.elapsed();
        let established = CENSUS.idle.open.load(Ordering::Relaxed) == attack.idle
            && CENSUS.slowloris.open.load(Ordering::Relaxed) == attack.slowloris
            && CENSUS.bodies_sent.load(Ordering::Relaxed) == attack.bodies;
        if (established && elapsed >= settle) || elapsed >= SETTLE_LIMIT {
            if !established {
                eprintln!("thawd_hostile: not every attacker is established after {elapsed:.0?}");
            }
            break;
        }
        std::thread::sleep(SAMPLE_PERIOD);
    }
    let settled = attack_started.elapsed();
    sampler.enter(Phase::Hostile);
    let hostile_started = Instant::now();
    let (hostile, hostile_failed) = invocations(&daemon.endpoint, 1 + n, n, pace);
    let hostile_took = hostile_started.elapsed();
    sampler.enter(Phase::Between);
    let attack_lasted = attack_started.elapsed();
    drop(attackers);
    let body_bytes = CENSUS.body_bytes.load(Ordering::Relaxed);

    sampler.enter(Phase::After);
    std::thread::sleep(after);
    let afterwards = call(&daemon.endpoint, 1 + 2 * n);
    let samples = sampler.finish();
    drop(daemon);

    assert!(
        hostile_failed.is_empty(),
        "{} of {n} invocations failed under attack:\n{}",
        hostile_failed.len(),
        hostile_failed.join("\n")
    );
    afterwards.expect("an invocation once the attackers left");

    let of = |phase: Phase| -> Vec<Sample> {
        samples
            .iter()
            .copied()
            .filter(|s| s.phase == phase as u8)
            .collect()
    };
    let (quiet_samples, hostile_samples, after_samples) =
        (of(Phase::Quiet), of(Phase::Hostile), of(Phase::After));
    let attacked: Vec<Sample> = samples
        .iter()
        .copied()
        .filter(|s| s.phase == Phase::Settling as u8 || s.phase == Phase::Hostile as u8)
        .collect();
    let rss_max = |s: &[Sample]| s.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let quiet_rss = rss_max(&quiet_samples);
    let hostile_rss = rss_max(&attacked);
    let after_rss = after_samples.last().map_or(0, |s| s.rss_kib);
    let front_kib = (limits.max_connections * (MAX_HEAD_BUFFER + UNBUDGETED_BODY)
        + limits.body_budget) as u64
        / 1024;
    let bound = quiet_rss + front_kib;
    let held = hostile_rss <= bound;
    let quiet_fds = quiet_samples.iter().map(|s| s.fds).max().unwrap_or(0);
    let hostile_fds = attacked.iter().map(|s| s.fds).max().unwrap_or(0);

    let (qp50, qp99, qmin, qmax) = percentiles(quiet);
    let (hp50, hp99, hmin, hmax) = percentiles(hostile);
    let ratio = hp99.as_secs_f64() / qp99.as_secs_f64();
    let answers = CENSUS
        .answers
        .lock()
        .unwrap()
        .iter()
        .map(|(status, count)| format!("{status} × {count}"))
        .collect::<Vec<_>>()
        .join(", ");
    let gauges = |g: &Gauges| {
        (
            g.opened.load(Ordering::Relaxed),
            g.closed.load(Ordering::Relaxed),
        )
    };
    let (idle_opened, idle_closed) = gauges(&CENSUS.idle);
    let (slow_opened, slow_closed) = gauges(&CENSUS.slowloris);
    let (body_opened, body_closed) = gauges(&CENSUS.bodies);

    let body = format!(
        "{}; thawd with its default front limits ({} connections, header timeout {:?}, body \
         timeout {:?}, body budget {} MiB), `max_concurrency = 2`, test guest function (128 MiB, \
         1 vCPU, encrypted snapshot) with its idle environment kept; the normal client is \
         `thaw invoke`'s (one connection per invocation, over loopback), {n} sequential warm \
         invocations one every {} after the previous answer, each answer checked; one run.\n\n\
         | phase | invocations | p50 | p99 | min | max | thawd RSS (max) | thawd descriptors (max) |\n\
         |---|---|---|---|---|---|---|---|\n\
         | quiet | {n} | {} | {} | {} | {} | {} | {quiet_fds} |\n\
         | under attack | {n}, all answered | {} | {} | {} | {} | {} | {hostile_fds} |\n\n\
         **p99 under attack ÷ quiet p99: {ratio:.2}** (goal: under 3). The first invocation \
         (restore) took {}.\n\n\
         Attackers, on one thread of the bench process, re-opening each connection thawd \
         closes after {:?} (bodies: {:?}); the attack lasted {:.1?} ({:.1?} to establish it, \
         then {:.1?} of invocations). Connected while the client invoked: min–max (mean) of \
         the samples every {:?}.\n\n\
         | attacker | held | connected while the client invoked | connections opened | closed by thawd |\n\
         |---|---|---|---|---|\n\
         | idle: connect, send nothing | {} | {} | {idle_opened} | {idle_closed} |\n\
         | slowloris: a request head, a byte every {:?} | {} | {} | {slow_opened} | {slow_closed} |\n\
         | 6 MB body sent but its last byte | {} | {}; of them unanswered over {:?} (thawd reading them, within its budget): {} | {body_opened} | {body_closed} |\n\n\
         The body attackers wrote {:.0} MiB ({:.0} MiB/s); thawd's answers to them: {}.\n\n\
         thawd's RSS: quiet {}, under attack {} (+{}), {:?} after the attackers left {}. \
         Bound: quiet RSS + {} connections × ({} KiB head buffer + {} KiB unbudgeted body) + \
         {} MiB body budget = **{}: {}**.\n",
        support::machine(),
        limits.max_connections,
        limits.header_timeout,
        limits.body_timeout,
        limits.body_budget >> 20,
        ms(pace),
        ms(qp50),
        ms(qp99),
        ms(qmin),
        ms(qmax),
        mib(quiet_rss),
        ms(hp50),
        ms(hp99),
        ms(hmin),
        ms(hmax),
        mib(hostile_rss),
        ms(first),
        RECONNECT_DELAY,
        BODY_RECONNECT_DELAY,
        attack_lasted,
        settled,
        hostile_took,
        SAMPLE_PERIOD,
        attack.idle,
        range(&hostile_samples, |s| s.idle),
        SLOWLORIS_PERIOD,
        attack.slowloris,
        range(&hostile_samples, |s| s.slowloris),
        attack.bodies,
        range(&hostile_samples, |s| s.bodies),
        READING_AFTER,
        range(&hostile_samples, |s| s.reading),
        body_bytes as f64 / f64::from(1 << 20),
        body_bytes as f64 / f64::from(1 << 20) / attack_lasted.as_secs_f64(),
        if answers.is_empty() { "none" } else { &answers },
        mib(quiet_rss),
        mib(hostile_rss),
        mib(hostile_rss.saturating_sub(quiet_rss)),
        after,
        mib(after_rss),
        limits.max_connections,
        MAX_HEAD_BUFFER / 1024,
        UNBUDGETED_BODY / 1024,
        limits.body_budget >> 20,
        mib(bound),
        if held { "held" } else { "exceeded" },
    );
    println!("{body}");
    assert!(held, "thawd's RSS exceeded its bound");
    if args.write {
        support::write_section("thawd_hostile", &body).expect("update docs/BENCHMARKS.md");
    }
}

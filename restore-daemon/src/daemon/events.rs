//! Asynchronous (`Event`) invocations: queued (202 once queued and written to the event
//! directory; a full queue, by count or by bytes, is 429), run by a few runner tasks through
//! the same pool as synchronous ones, retried after a function error or a service failure
//! (Lambda retries twice, with delays), and written to the dead-letter directory when the
//! retries are used up. A throttled attempt waits and tries again without counting as a
//! retry, until the event is older than Lambda's maximum event age (6 hours).
//!
//! Every accepted event is attempted or dead-lettered: it stays in the event directory
//! (`event_spool`) until it succeeds or has its dead letter. When thawd stops (SIGTERM) the
//! runners finish the attempts they have in hand and the rest stay there; at the next start,
//! and after a crash, thawd queues them again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;

use super::event_spool::{EventSpool, SpooledEvent};
use super::pool::Pool;
use super::{Invocation, InvokeFailure, ThrottleReason};

/// Lambda discards an event not processed within 6 hours.
const MAX_EVENT_AGE: Duration = Duration::from_secs(6 * 3600);
/// How long a throttled attempt waits before it tries again.
const THROTTLE_BACKOFF: Duration = Duration::from_millis(100);

struct Job {
    invocation: Invocation,
    /// Failed attempts so far.
    failures: u32,
    queued_at: Instant,
    queued_wall: SystemTime,
    last_error: String,
    /// Its payload's bytes in the queue's count, until the job ends.
    _charge: Charge,
}

impl Job {
    fn spooled(&self) -> SpooledEvent {
        let inv = &self.invocation;
        SpooledEvent {
            request_id: inv.request_id.clone(),
            function_name: inv.function.clone(),
            qualifier: inv.qualifier.clone(),
            payload_base64: SpooledEvent::encode_payload(&inv.payload),
            queued_at_ms: unix_ms(self.queued_wall) as u64,
            failures: self.failures,
            last_error: self.last_error.clone(),
        }
    }
}

/// Bytes of payload held by queued events, against [`EventSettings::max_bytes`].
#[derive(Debug)]
struct Charge {
    held: Arc<AtomicU64>,
    bytes: u64,
}

impl Charge {
    /// Charges `bytes` if they fit under `max` (`None`: charged anyway, for events recovered
    /// at start-up, which were accepted already).
    fn take(held: &Arc<AtomicU64>, bytes: u64, max: Option<u64>) -> Option<Self> {
        let fits = |total: u64| max.is_none_or(|max| total <= max);
        held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
            now.checked_add(bytes).filter(|&total| fits(total))
        })
        .ok()?;
        Some(Self {
            held: held.clone(),
            bytes,
        })
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Why an event went to the dead-letter directory: every attempt failed (Lambda's name).
const RETRIES_EXHAUSTED: &str = "RetriesExhausted";

/// Events waiting for their retry's delay. Kept here, not in the sleeping tasks, so that a
/// shutdown finds them.
#[derive(Default)]
struct Waiting(std::sync::Mutex<(u64, HashMap<u64, Job>)>);

impl Waiting {
    fn park(&self, job: Job) -> u64 {
        let mut w = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        w.0 += 1;
        let key = w.0;
        w.1.insert(key, job);
        key
    }

    fn take(&self, key: u64) -> Option<Job> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .remove(&key)
    }

    fn take_all(&self) -> Vec<Job> {
        let mut w = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        w.1.drain().map(|(_, job)| job).collect()
    }
}

/// The queue of asynchronous invocations and its runners.
pub struct EventQueue {
    tx: mpsc::Sender<Job>,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    ends: Arc<Ends>,
    stop: watch::Sender<bool>,
    runners: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// Payload bytes of the events not yet ended.
    bytes: Arc<AtomicU64>,
}

/// Where events end: the settings, the metrics, the retries waiting, the event directory.
struct Ends {
    pool: Arc<Pool>,
    settings: EventSettings,
    waiting: Waiting,
    spool: Arc<EventSpool>,
}

impl Ends {
    fn dead_letter(&self, job: &Job) {
        let function = &job.invocation.function;
        let request_id = &job.invocation.request_id;
        self.pool.metrics().dead_letter(function);
        match write_dead_letter(&self.settings.dead_letter_dir, job) {
            Ok(_) => self.ended(job),
            // Kept in the event directory: the next start tries it again.
            Err(e) => tracing::error!(function, request_id, error = %e,
                "cannot write a failed event to the dead-letter directory; it stays in the \
                 event directory"),
        }
    }

    /// The event succeeded or has its dead letter: it is no longer kept.
    fn ended(&self, job: &Job) {
        if let Err(e) = self.spool.remove(&job.invocation.request_id) {
            tracing::warn!(request_id = job.invocation.request_id, error = %e,
                "cannot remove an ended event's file: it will run again at the next start");
        }
    }

    /// Records a failed attempt, so that a restart does not forget it.
    fn failed(&self, job: &Job) {
        if let Err(e) = self.spool.write(&job.spooled()) {
            tracing::warn!(request_id = job.invocation.request_id, error = %e,
                "cannot record a failed attempt in the event directory");
        }
    }
}

/// Where and how events are kept and end.
#[derive(Clone, Debug)]
pub struct EventSettings {
    /// Delays before each retry; its length is the number of retries.
    pub retry_delays: Vec<Duration>,
    /// Where events whose retries are used up are written.
    pub dead_letter_dir: PathBuf,
    /// Where accepted events are kept until they end.
    pub event_dir: PathBuf,
    /// Events waiting at most.
    pub capacity: usize,
    /// Their payloads' bytes at most.
    pub max_bytes: u64,
    /// Events running at once.
    pub runners: usize,
}

/// The event directory could not be used.
#[derive(Debug, thiserror::Error)]
#[error("event_dir {}: {source}", dir.display())]
pub struct EventDirError {
    /// The directory.
    pub dir: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

impl EventQueue {
    /// Opens the event directory, queues the events kept there (oldest first), and starts
    /// `settings.runners` runner tasks on the current tokio runtime.
    pub fn start(pool: Arc<Pool>, settings: EventSettings) -> Result<Self, EventDirError> {
        let dir_error = |source| EventDirError {
            dir: settings.event_dir.clone(),
            source,
        };
        let spool = Arc::new(EventSpool::open(&settings.event_dir).map_err(dir_error)?);
        let recovered = spool.recover().map_err(dir_error)?;
        let (tx, rx) = mpsc::channel(settings.capacity.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let (stop, stopped) = watch::channel(false);
        let runners = settings.runners.max(1);
        let bytes = Arc::new(AtomicU64::new(0));
        let ends = Arc::new(Ends {
            pool,
            settings,
            waiting: Waiting::default(),
            spool,
        });
        if !recovered.events.is_empty() || !recovered.unreadable.is_empty() {
            tracing::info!(
                events = recovered.events.len(),
                unreadable = recovered.unreadable.len(),
                dir = %ends.spool.dir().display(),
                "queuing the events accepted before thawd stopped"
            );
        }
        let jobs: Vec<Job> = recovered
            .events
            .into_iter()
            .filter_map(|event| recovered_job(event, &bytes))
            .collect();
        let runners = (0..runners)
            .map(|_| {
                let runner = Runner {
                    rx: rx.clone(),
                    tx: tx.downgrade(),
                    ends: ends.clone(),
                    stopped: stopped.clone(),
                };
                tokio::spawn(runner.run())
            })
            .collect();
        // Recovered events may be more than the queue holds: they wait for room in order.
        let refill = tx.clone();
        tokio::spawn(async move {
            for job in jobs {
                if refill.send(job).await.is_err() {
                    return; // stopped again: they are still in the directory
                }
            }
        });
        Ok(Self {
            tx,
            rx,
            ends,
            stop,
            runners: std::sync::Mutex::new(runners),
            bytes,
        })
    }

    /// Stops taking events: the runners finish the attempts in hand; the events still queued
    /// or waiting for a retry stay in the event directory for the next start. Returns how
    /// many.
    pub async fn shutdown(&self) -> usize {
        let _ = self.stop.send(true);
        let runners: Vec<_> = self
            .runners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        for runner in runners {
            let _ = runner.await;
        }
        let mut left = 0;
        {
            let mut rx = self.rx.lock().await;
            rx.close();
            while rx.try_recv().is_ok() {
                left += 1;
            }
        }
        left += self.ends.waiting.take_all().len();
        if left > 0 {
            tracing::warn!(
                events = left,
                dir = %self.ends.spool.dir().display(),
                "thawd stopped with events not yet attempted (again): they run at the next start"
            );
        }
        left
    }

    /// Queues an event (the function was checked by the caller) once it is on disk.
    pub async fn enqueue(&self, invocation: Invocation) -> Result<(), InvokeFailure> {
        let full = || InvokeFailure::Throttled {
            reason: ThrottleReason::EventQueueFull,
        };
        let stopping = || InvokeFailure::Service {
            message: "thawd is shutting down".into(),
        };
        let charge = Charge::take(
            &self.bytes,
            invocation.payload.len() as u64,
            Some(self.ends.settings.max_bytes),
        )
        .ok_or_else(full)?;
        let slot = self.tx.clone().try_reserve_owned().map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => full(),
            mpsc::error::TrySendError::Closed(_) => stopping(),
        })?;
        let job = Job {
            invocation,
            failures: 0,
            queued_at: Instant::now(),
            queued_wall: SystemTime::now(),
            last_error: String::new(),
            _charge: charge,
        };
        let record = job.spooled();
        let spool = self.ends.spool.clone();
        let kept = tokio::task::spawn_blocking(move || spool.write(&record))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|written| written);
        if let Err(e) = kept {
            tracing::error!(request_id = job.invocation.request_id, error = %e,
                "cannot keep an event in the event directory: refused");
            return Err(InvokeFailure::Service {
                message: format!("cannot keep the event: {e}"),
            });
        }
        slot.send(job);
        Ok(())
    }

    /// Payload bytes of the events not yet ended.
    pub fn queued_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }

    /// Whether another event could be queued now (asked before its body is read).
    pub fn has_room(&self) -> bool {
        self.tx.capacity() > 0 && self.queued_bytes() < self.ends.settings.max_bytes
    }
}

/// A job for an event found in the event directory at start-up.
fn recovered_job(event: SpooledEvent, bytes: &Arc<AtomicU64>) -> Option<Job> {
    // The file was checked when it was read, so the payload decodes.
    let payload = event.payload().ok()?;
    let queued_wall = UNIX_EPOCH + Duration::from_millis(event.queued_at_ms);
    let age = SystemTime::now()
        .duration_since(queued_wall)
        .unwrap_or_default();
    let queued_at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
    let charge = Charge::take(bytes, payload.len() as u64, None)?;
    Some(Job {
        invocation: Invocation {
            function: event.function_name,
            qualifier: event.qualifier,
            payload: payload.into(),
            request_id: event.request_id,
            client_context: None,
            tail_logs: false,
        },
        failures: event.failures,
        queued_at,
        queued_wall,
        last_error: event.last_error,
        _charge: charge,
    })
}

struct Runner {
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    // Weak, so the queue closes when the daemon drops its `EventQueue`.
    tx: mpsc::WeakSender<Job>,
    ends: Arc<Ends>,
    stopped: watch::Receiver<bool>,
}

impl Runner {
    async fn run(mut self) {
        loop {
            let job = {
                let mut rx = self.rx.lock().await;
                tokio::select! {
                    biased;
                    _ = self.stopped.wait_for(|stop| *stop) => None,
                    job = rx.recv() => job,
                }
            };
            let Some(job) = job else { return };
            self.attempt(job).await;
        }
    }

    async fn attempt(&self, mut job: Job) {
        let function = job.invocation.function.clone();
        let pool = &self.ends.pool;
        loop {
            let error = match pool.invoke(&job.invocation).await {
                Ok(done) if !done.function_error => {
                    self.ends.ended(&job);
                    return;
                }
                Ok(done) => String::from_utf8_lossy(&done.payload).into_owned(),
                Err(InvokeFailure::Throttled { .. }) if job.queued_at.elapsed() < MAX_EVENT_AGE => {
                    tokio::time::sleep(THROTTLE_BACKOFF).await;
                    continue;
                }
                Err(e) => e.to_string(),
            };
            job.failures += 1;
            job.last_error = error;
            let retries = &self.ends.settings.retry_delays;
            let retry = job.failures as usize <= retries.len();
            if !retry || job.queued_at.elapsed() >= MAX_EVENT_AGE {
                self.ends.dead_letter(&job);
                return;
            }
            self.ends.failed(&job);
            pool.metrics().async_retry(&function);
            let delay = retries[job.failures as usize - 1];
            let tx = self.tx.clone();
            let ends = self.ends.clone();
            // The retry waits outside the runner, which goes on with other events; the event
            // itself waits in `Ends::waiting`, where a shutdown finds it.
            let key = ends.waiting.park(job);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let Some(job) = ends.waiting.take(key) else {
                    return; // thawd stopped: the event is in the event directory
                };
                if let Some(tx) = tx.upgrade() {
                    // Refused only when thawd stopped; the event stays in the directory.
                    let _ = tx.send(job).await;
                }
            });
            return;
        }
    }
}

fn unix_ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

/// Writes `job` as `<dir>/<function>/<request id>.json`, atomically (temp, fsync, rename).
fn write_dead_letter(dir: &Path, job: &Job) -> std::io::Result<PathBuf> {
    let inv = &job.invocation;
    let dir = dir.join(&inv.function);
    std::fs::create_dir_all(&dir)?;
    let record = serde_json::json!({
        "requestId": inv.request_id,
        "functionName": inv.function,
        "condition": RETRIES_EXHAUSTED,
        "approximateInvokeCount": job.failures,
        "queuedAtMs": unix_ms(job.queued_wall),
        "deadLetteredAtMs": unix_ms(SystemTime::now()),
        "lastError": job.last_error,
        "payloadBase64": base64::engine::general_purpose::STANDARD.encode(&inv.payload),
    });
    let path = dir.join(format!("{}.json", inv.request_id));
    let mut temp = tempfile::NamedTempFile::new_in(&dir)?;
    serde_json::to_writer_pretty(&mut temp, &record)?;
    temp.as_file().sync_all()?;
    temp.persist(&path).map_err(|e| e.error)?;
    std::fs::File::open(&dir)?.sync_all()?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: usize, payload: &'static [u8]) -> Invocation {
        Invocation {
            function: "f".into(),
            qualifier: None,
            payload: bytes::Bytes::from_static(payload),
            request_id: format!("e{n:04x}"),
            client_context: None,
            tail_logs: false,
        }
    }

    fn settings(root: &Path, retry_delays: Vec<Duration>) -> EventSettings {
        EventSettings {
            retry_delays,
            dead_letter_dir: root.join("dead"),
            event_dir: root.join("events"),
            capacity: 100,
            max_bytes: 1 << 20,
            runners: 1,
        }
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Issue 14, defect 4: on SIGTERM the events still queued were dropped. Every accepted
    /// event is now kept in the event directory until it ends: here the function cannot run,
    /// so the first attempts fail and their retries wait a minute, and the rest are still
    /// queued behind one runner when thawd stops. The next start attempts every one of them
    /// (once more: no retries are left) and dead-letters it.
    #[tokio::test]
    async fn every_accepted_event_is_attempted_after_thawd_stops_and_starts_again() {
        let (pool, dir) = super::super::pool::pool_for_tests(
            "[functions.f]\nsnapshot = \"s\"\nmemory_mib = 128\n",
        );
        let pool = Arc::new(pool);
        let root = dir.path();
        let queue =
            EventQueue::start(pool.clone(), settings(root, vec![Duration::from_secs(60)])).unwrap();
        let events = 20;
        for n in 0..events {
            queue.enqueue(event(n, b"{}")).await.unwrap();
        }
        let left = queue.shutdown().await;
        assert!(left > 0, "nothing was left");
        let want: Vec<String> = (0..events).map(|n| format!("e{n:04x}.json")).collect();
        assert_eq!(names_in(&root.join("events")), want, "every event is kept");
        assert!(names_in(&root.join("dead").join("f")).is_empty());
        // None is accepted any more.
        let late = queue.enqueue(event(999, b"{}")).await;
        assert!(
            matches!(late, Err(InvokeFailure::Service { .. })),
            "{late:?}"
        );
        drop(queue);

        let again = EventQueue::start(pool, settings(root, Vec::new())).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while names_in(&root.join("dead").join("f")).len() < events {
            assert!(
                Instant::now() < deadline,
                "not every event was attempted again"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(names_in(&root.join("dead").join("f")), want);
        assert!(
            names_in(&root.join("events")).is_empty(),
            "ended events are removed"
        );
        let letter: serde_json::Value = serde_json::from_slice(
            &std::fs::read(root.join("dead").join("f").join("e0000.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(letter["condition"], "RetriesExhausted");
        assert_eq!(
            letter["approximateInvokeCount"], 2,
            "the first start's failure counts"
        );
        assert_eq!(again.queued_bytes(), 0);
        again.shutdown().await;
    }

    /// Issue 14, defect 3: the default queue could hold 10,000 × 256 KB. Its payloads are now
    /// bounded in bytes too, and given back when events end.
    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes() {
        let (pool, dir) = super::super::pool::pool_for_tests(
            "[functions.f]\nsnapshot = \"s\"\nmemory_mib = 128\n",
        );
        let mut settings = settings(dir.path(), vec![Duration::from_secs(60)]);
        settings.max_bytes = 10;
        let queue = EventQueue::start(Arc::new(pool), settings).unwrap();
        queue.enqueue(event(1, b"[1,2,3]")).await.unwrap();
        assert_eq!(queue.queued_bytes(), 7);
        assert!(queue.has_room());
        let full = queue.enqueue(event(2, b"[1,2,3]")).await;
        assert_eq!(
            full,
            Err(InvokeFailure::Throttled {
                reason: ThrottleReason::EventQueueFull
            })
        );
        assert!(!dir.path().join("events").join("e0002.json").exists());
        queue.enqueue(event(3, b"[1]")).await.unwrap();
        assert!(!queue.has_room());
        queue.shutdown().await;
        drop(queue);
        // Kept events are still counted when thawd starts again, and given back as they end.
        let mut settings = self::settings(dir.path(), Vec::new());
        settings.max_bytes = 10;
        let (pool, _other) = super::super::pool::pool_for_tests(
            "[functions.f]\nsnapshot = \"s\"\nmemory_mib = 128\n",
        );
        let again = EventQueue::start(Arc::new(pool), settings).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while again.queued_bytes() > 0 {
            assert!(
                Instant::now() < deadline,
                "{} bytes still held",
                again.queued_bytes()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        again.shutdown().await;
    }

    #[test]
    fn dead_letters_are_whole_json_files() {
        let dir = tempfile::tempdir().unwrap();
        let job = Job {
            invocation: Invocation {
                function: "f".into(),
                qualifier: None,
                payload: bytes::Bytes::from_static(b"{\"a\":1}"),
                request_id: "r-1".into(),
                client_context: None,
                tail_logs: false,
            },
            failures: 3,
            queued_at: Instant::now(),
            queued_wall: SystemTime::now(),
            last_error: "{\"errorType\":\"X\"}".into(),
            _charge: Charge::take(&Arc::default(), 7, None).unwrap(),
        };
        let path = write_dead_letter(dir.path(), &job).unwrap();
        assert_eq!(path, dir.path().join("f").join("r-1.json"));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["approximateInvokeCount"], 3);
        assert_eq!(v["payloadBase64"], "eyJhIjoxfQ==");
        // Nothing else is left in the directory (no temp files).
        assert_eq!(std::fs::read_dir(dir.path().join("f")).unwrap().count(), 1);
    }
}

//! Asynchronous (`Event`) invocations: queued (202 once queued; a full queue is 429), run by a
//! few runner tasks through the same pool as synchronous ones, retried after a function error
//! or a service failure (Lambda retries twice, with delays), and written to the dead-letter
//! directory when the retries are used up. A throttled attempt waits and tries again without
//! counting as a retry, until the event is older than Lambda's maximum event age (6 hours).
//!
//! Every accepted event is attempted or dead-lettered: when thawd stops (SIGTERM), the runners
//! finish the attempts they have in hand, and the events still queued or waiting for a retry
//! are written to the dead-letter directory (`condition: DaemonStopped`) instead of dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;

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
}

/// Why an event went to the dead-letter directory.
#[derive(Clone, Copy)]
enum Condition {
    /// Every attempt failed (Lambda's condition name).
    RetriesExhausted,
    /// thawd stopped before the event could be attempted (again).
    DaemonStopped,
}

impl Condition {
    fn name(self) -> &'static str {
        match self {
            Condition::RetriesExhausted => "RetriesExhausted",
            Condition::DaemonStopped => "DaemonStopped",
        }
    }
}

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
}

/// Where events end when they are not answered: the settings, the metrics, the retries
/// waiting.
struct Ends {
    pool: Arc<Pool>,
    settings: EventSettings,
    waiting: Waiting,
}

impl Ends {
    fn dead_letter(&self, job: &Job, condition: Condition) {
        let function = &job.invocation.function;
        self.pool.metrics().dead_letter(function);
        if let Err(e) = write_dead_letter(&self.settings.dead_letter_dir, job, condition) {
            tracing::error!(function, request_id = job.invocation.request_id, error = %e,
                "cannot write a failed event to the dead-letter directory");
        }
    }
}

/// Where and how failed events end.
#[derive(Clone, Debug)]
pub struct EventSettings {
    /// Delays before each retry; its length is the number of retries.
    pub retry_delays: Vec<Duration>,
    /// Where events whose retries are used up are written.
    pub dead_letter_dir: PathBuf,
    /// Events waiting at most.
    pub capacity: usize,
    /// Events running at once.
    pub runners: usize,
}

impl EventQueue {
    /// Starts `settings.runners` runner tasks on the current tokio runtime.
    pub fn start(pool: Arc<Pool>, settings: EventSettings) -> Self {
        let (tx, rx) = mpsc::channel(settings.capacity.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let (stop, stopped) = watch::channel(false);
        let runners = settings.runners.max(1);
        let ends = Arc::new(Ends {
            pool,
            settings,
            waiting: Waiting::default(),
        });
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
        Self {
            tx,
            rx,
            ends,
            stop,
            runners: std::sync::Mutex::new(runners),
        }
    }

    /// Stops taking events: the runners finish the attempts in hand, then every event still
    /// queued or waiting for a retry is dead-lettered (`DaemonStopped`). Returns how many.
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
        let mut left = Vec::new();
        {
            let mut rx = self.rx.lock().await;
            rx.close();
            while let Ok(job) = rx.try_recv() {
                left.push(job);
            }
        }
        left.extend(self.ends.waiting.take_all());
        for job in &left {
            self.ends.dead_letter(job, Condition::DaemonStopped);
        }
        if !left.is_empty() {
            tracing::warn!(
                events = left.len(),
                dir = %self.ends.settings.dead_letter_dir.display(),
                "thawd stopped with events not yet attempted (again): dead-lettered"
            );
        }
        left.len()
    }

    /// Queues an event (the function was checked by the caller).
    pub fn enqueue(&self, invocation: Invocation) -> Result<(), InvokeFailure> {
        let job = Job {
            invocation,
            failures: 0,
            queued_at: Instant::now(),
            queued_wall: SystemTime::now(),
            last_error: String::new(),
        };
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => InvokeFailure::Throttled {
                reason: ThrottleReason::EventQueueFull,
            },
            mpsc::error::TrySendError::Closed(_) => InvokeFailure::Service {
                message: "thawd is shutting down".into(),
            },
        })
    }
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
                Ok(done) if !done.function_error => return,
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
                self.ends.dead_letter(&job, Condition::RetriesExhausted);
                return;
            }
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
                    return; // dead-lettered by a shutdown
                };
                let refused = match tx.upgrade() {
                    Some(tx) => tx.send(job).await.err().map(|e| e.0),
                    None => Some(job),
                };
                if let Some(job) = refused {
                    ends.dead_letter(&job, Condition::DaemonStopped);
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
fn write_dead_letter(dir: &Path, job: &Job, condition: Condition) -> std::io::Result<PathBuf> {
    let inv = &job.invocation;
    let dir = dir.join(&inv.function);
    std::fs::create_dir_all(&dir)?;
    let record = serde_json::json!({
        "requestId": inv.request_id,
        "functionName": inv.function,
        "condition": condition.name(),
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

    /// Issue 14, defect 4: on SIGTERM the events still queued were dropped. Every accepted
    /// event now ends attempted or dead-lettered: here the function cannot run, so the first
    /// attempts fail, their retries wait a minute, and the rest are still queued behind one
    /// runner when thawd stops.
    #[tokio::test]
    async fn every_accepted_event_is_dead_lettered_when_thawd_stops_before_it_runs() {
        let (pool, dir) = super::super::pool::pool_for_tests(
            "[functions.f]\nsnapshot = \"s\"\nmemory_mib = 128\n",
        );
        let letters = dir.path().join("dead");
        let queue = EventQueue::start(
            Arc::new(pool),
            EventSettings {
                retry_delays: vec![Duration::from_secs(60)],
                dead_letter_dir: letters.clone(),
                capacity: 100,
                runners: 1,
            },
        );
        let events = 20;
        for n in 0..events {
            queue
                .enqueue(Invocation {
                    function: "f".into(),
                    qualifier: None,
                    payload: bytes::Bytes::from_static(b"{}"),
                    request_id: format!("e-{n}"),
                    client_context: None,
                    tail_logs: false,
                })
                .unwrap();
        }
        let stopped = queue.shutdown().await;
        assert!(stopped > 0, "nothing was left to dead-letter");
        let mut names: Vec<String> = std::fs::read_dir(letters.join("f"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mut want: Vec<String> = (0..events).map(|n| format!("e-{n}.json")).collect();
        want.sort();
        assert_eq!(names, want, "every accepted event has its dead letter");
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(letters.join("f").join("e-19.json")).unwrap())
                .unwrap();
        assert_eq!(v["condition"], "DaemonStopped");
        // And none is accepted any more.
        let late = queue.enqueue(Invocation {
            function: "f".into(),
            qualifier: None,
            payload: bytes::Bytes::new(),
            request_id: "late".into(),
            client_context: None,
            tail_logs: false,
        });
        assert!(
            matches!(late, Err(InvokeFailure::Service { .. })),
            "{late:?}"
        );
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
        };
        let path = write_dead_letter(dir.path(), &job, Condition::RetriesExhausted).unwrap();
        assert_eq!(path, dir.path().join("f").join("r-1.json"));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["approximateInvokeCount"], 3);
        assert_eq!(v["payloadBase64"], "eyJhIjoxfQ==");
        // Nothing else is left in the directory (no temp files).
        assert_eq!(std::fs::read_dir(dir.path().join("f")).unwrap().count(), 1);
    }
}

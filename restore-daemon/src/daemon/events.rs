//! Asynchronous (`Event`) invocations: queued (202 once queued; a full queue is 429), run by a
//! few runner tasks through the same pool as synchronous ones, retried after a function error
//! or a service failure (Lambda retries twice, with delays), and written to the dead-letter
//! directory when the retries are used up. A throttled attempt waits and tries again without
//! counting as a retry, until the event is older than Lambda's maximum event age (6 hours).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use tokio::sync::{Mutex, mpsc};

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

/// The queue of asynchronous invocations and its runners.
pub struct EventQueue {
    tx: mpsc::Sender<Job>,
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
        let settings = Arc::new(settings);
        for _ in 0..settings.runners.max(1) {
            let runner = Runner {
                pool: pool.clone(),
                rx: rx.clone(),
                tx: tx.downgrade(),
                settings: settings.clone(),
            };
            tokio::spawn(runner.run());
        }
        Self { tx }
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
    pool: Arc<Pool>,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    // Weak, so the queue closes when the daemon drops its `EventQueue`.
    tx: mpsc::WeakSender<Job>,
    settings: Arc<EventSettings>,
}

impl Runner {
    async fn run(self) {
        loop {
            let job = { self.rx.lock().await.recv().await };
            let Some(job) = job else { return };
            self.attempt(job).await;
        }
    }

    async fn attempt(&self, mut job: Job) {
        let function = job.invocation.function.clone();
        loop {
            let error = match self.pool.invoke(&job.invocation).await {
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
            let retry = job.failures as usize <= self.settings.retry_delays.len();
            if !retry || job.queued_at.elapsed() >= MAX_EVENT_AGE {
                self.pool.metrics().dead_letter(&function);
                if let Err(e) = write_dead_letter(&self.settings.dead_letter_dir, &job) {
                    tracing::error!(function, request_id = job.invocation.request_id, error = %e,
                        "cannot write a failed event to the dead-letter directory");
                }
                return;
            }
            self.pool.metrics().async_retry(&function);
            let delay = self.settings.retry_delays[job.failures as usize - 1];
            let tx = self.tx.clone();
            // The retry waits outside the runner, which goes on with other events.
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Some(tx) = tx.upgrade() {
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
        "condition": "RetriesExhausted",
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
        let path = write_dead_letter(dir.path(), &job).unwrap();
        assert_eq!(path, dir.path().join("f").join("r-1.json"));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["approximateInvokeCount"], 3);
        assert_eq!(v["payloadBase64"], "eyJhIjoxfQ==");
        // Nothing else is left in the directory (no temp files).
        assert_eq!(std::fs::read_dir(dir.path().join("f")).unwrap().count(), 1);
    }
}

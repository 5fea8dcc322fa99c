//! Accepted asynchronous invocations kept on disk until they end, so that every event thawd
//! answered 202 is attempted even if thawd stops or crashes before running it (issue 14,
//! defect 4: Lambda's promise is that an accepted event is attempted).
//!
//! One file per event, `<event_dir>/<request id>.json`, written atomically (temp, fsync,
//! rename, fsync of the directory) before the 202; rewritten when an attempt fails (with the
//! count and the error), removed when the event succeeds or has its dead letter. At start-up
//! thawd queues every file it finds, oldest first; a file it cannot read is renamed
//! `*.unreadable` and reported, never deleted.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};

/// A spooled file is refused past this size: a payload is at most 256 KB.
const MAX_RECORD_LEN: u64 = 1 << 20;

/// One accepted event as it is kept on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpooledEvent {
    /// thawd's request id (a UUID): the file's name.
    pub request_id: String,
    /// The function.
    pub function_name: String,
    /// `?Qualifier=`, if given.
    pub qualifier: Option<String>,
    /// The payload, base64.
    pub payload_base64: String,
    /// When it was accepted, Unix milliseconds.
    pub queued_at_ms: u64,
    /// Failed attempts so far.
    pub failures: u32,
    /// The last attempt's error.
    pub last_error: String,
}

impl SpooledEvent {
    /// The payload, decoded.
    pub fn payload(&self) -> Result<Vec<u8>, base64::DecodeError> {
        base64::engine::general_purpose::STANDARD.decode(&self.payload_base64)
    }

    /// Encodes `payload`.
    pub fn encode_payload(payload: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(payload)
    }
}

/// The directory of accepted events.
#[derive(Debug)]
pub struct EventSpool {
    dir: PathBuf,
}

/// What start-up found in the spool.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The events, oldest first.
    pub events: Vec<SpooledEvent>,
    /// Files that could not be read, renamed `*.unreadable`.
    pub unreadable: Vec<PathBuf>,
}

impl EventSpool {
    /// Creates `dir` if need be and checks that an event can be written there.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        if !std::fs::metadata(dir)?.is_dir() {
            return Err(std::io::Error::other("not a directory"));
        }
        tempfile::Builder::new()
            .prefix(".thawd-check-")
            .tempfile_in(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, request_id: &str) -> std::io::Result<PathBuf> {
        if !is_request_id(request_id) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{request_id:?} is not a request id"),
            ));
        }
        Ok(self.dir.join(format!("{request_id}.json")))
    }

    /// Writes (or replaces) `event`'s file, durably, before it returns.
    pub fn write(&self, event: &SpooledEvent) -> std::io::Result<()> {
        let path = self.path(&event.request_id)?;
        let mut temp = tempfile::Builder::new()
            .prefix(".event-")
            .tempfile_in(&self.dir)?;
        serde_json::to_writer(&mut temp, event)?;
        temp.flush()?;
        temp.as_file().sync_all()?;
        temp.persist(&path).map_err(|e| e.error)?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Removes the event's file: it has ended.
    pub fn remove(&self, request_id: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(request_id)?) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            done => done,
        }
    }

    /// Every event kept, oldest first.
    pub fn recover(&self) -> std::io::Result<Recovered> {
        let mut recovered = Recovered::default();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') || !name.ends_with(".json") {
                continue; // temp files of a write cut short, and set-aside files
            }
            match read_record(&path) {
                Ok(event)
                    if path.file_stem().and_then(|s| s.to_str()) == Some(&event.request_id) =>
                {
                    recovered.events.push(event);
                }
                Ok(_) => set_aside(&path, "its name is not its request id", &mut recovered),
                Err(reason) => set_aside(&path, &reason, &mut recovered),
            }
        }
        recovered
            .events
            .sort_by(|a, b| (a.queued_at_ms, &a.request_id).cmp(&(b.queued_at_ms, &b.request_id)));
        Ok(recovered)
    }
}

fn read_record(path: &Path) -> Result<SpooledEvent, String> {
    use std::io::Read;
    let file = snapshot::open_regular(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(MAX_RECORD_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_RECORD_LEN {
        return Err(format!("larger than {} KiB", MAX_RECORD_LEN >> 10));
    }
    let event: SpooledEvent = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if !is_request_id(&event.request_id) {
        return Err(format!("{:?} is not a request id", event.request_id));
    }
    super::config::check_function_name(&event.function_name)?;
    event.payload().map_err(|e| format!("payloadBase64: {e}"))?;
    Ok(event)
}

fn set_aside(path: &Path, reason: &str, recovered: &mut Recovered) {
    let aside = path.with_extension("json.unreadable");
    tracing::error!(path = %path.display(), reason,
        "an accepted event's file cannot be read: set aside, not run");
    if let Err(error) = std::fs::rename(path, &aside) {
        tracing::error!(path = %path.display(), %error, "cannot set it aside either");
    }
    recovered.unreadable.push(aside);
}

/// thawd's request ids are UUIDs: hex digits and hyphens, which are safe as a file name.
fn is_request_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, at: u64) -> SpooledEvent {
        SpooledEvent {
            request_id: id.into(),
            function_name: "f".into(),
            qualifier: None,
            payload_base64: SpooledEvent::encode_payload(b"{\"n\":1}"),
            queued_at_ms: at,
            failures: 0,
            last_error: String::new(),
        }
    }

    #[test]
    fn events_are_kept_until_removed_and_come_back_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let spool = EventSpool::open(&dir.path().join("events")).unwrap();
        spool.write(&event("bb", 2)).unwrap();
        spool.write(&event("aa", 1)).unwrap();
        let mut failed = event("cc", 3);
        spool.write(&failed).unwrap();
        failed.failures = 1;
        failed.last_error = "boom".into();
        spool.write(&failed).unwrap();
        spool.remove("bb").unwrap();
        spool.remove("bb").unwrap();
        let found = spool.recover().unwrap();
        assert!(found.unreadable.is_empty());
        assert_eq!(found.events, vec![event("aa", 1), failed]);
        assert_eq!(found.events[0].payload().unwrap(), b"{\"n\":1}");
        // Only the two event files are left (no temp files).
        assert_eq!(std::fs::read_dir(spool.dir()).unwrap().count(), 2);
    }

    #[test]
    fn a_bad_file_is_set_aside_and_reported_not_run() {
        let dir = tempfile::tempdir().unwrap();
        let spool = EventSpool::open(dir.path()).unwrap();
        spool.write(&event("aa", 1)).unwrap();
        std::fs::write(dir.path().join("bb.json"), b"{not json").unwrap();
        // A record whose file name is not its request id.
        let misnamed = serde_json::to_vec(&event("cc", 1)).unwrap();
        std::fs::write(dir.path().join("dd.json"), misnamed).unwrap();
        let found = spool.recover().unwrap();
        assert_eq!(found.events, vec![event("aa", 1)]);
        assert_eq!(found.unreadable.len(), 2);
        assert!(dir.path().join("bb.json.unreadable").exists());
        assert!(dir.path().join("dd.json.unreadable").exists());
    }

    #[test]
    fn request_ids_cannot_name_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let spool = EventSpool::open(dir.path()).unwrap();
        for id in ["../x", "", "a/b", "x.json"] {
            assert!(spool.write(&event(id, 1)).is_err(), "{id:?}");
            assert!(spool.remove(id).is_err(), "{id:?}");
        }
    }

    #[test]
    fn a_regular_file_is_not_a_spool() {
        let file = tempfile::NamedTempFile::new().unwrap();
        assert!(EventSpool::open(file.path()).is_err());
    }
}

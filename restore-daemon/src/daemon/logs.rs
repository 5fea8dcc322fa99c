//! Per-invocation logs in Lambda's shape: `START`, the function's own output (what the guest
//! printed on its console during the invocation), `END` and `REPORT`, appended to one file per
//! function (`<log_dir>/<function>.log`); `X-Amz-Log-Type: Tail` returns the last 4 KB of an
//! invocation's lines. The `REPORT` of the first invocation after a restore carries
//! `Restore Duration`, as SnapStart's does.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// How much of an invocation's log `Tail` returns (Lambda: the last 4 KB).
pub const TAIL_BYTES: usize = 4096;

/// What a `REPORT` line says.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The invocation.
    pub request_id: String,
    /// How long the function ran.
    pub duration: Duration,
    /// The function's configured memory.
    pub memory_mib: u64,
    /// The environment's peak memory.
    pub max_memory_used_bytes: u64,
    /// For the first invocation after a restore: the restore's duration.
    pub restore: Option<Duration>,
}

fn billed_ms(d: Duration) -> u128 {
    // Lambda bills in 1 ms steps, rounding up.
    d.as_micros().div_ceil(1000).max(1)
}

/// The `START` line.
pub fn start_line(request_id: &str) -> String {
    format!("START RequestId: {request_id} Version: {}\n", super::LATEST)
}

/// The `END` line.
pub fn end_line(request_id: &str) -> String {
    format!("END RequestId: {request_id}\n")
}

/// The `REPORT` line.
pub fn report_line(r: &Report) -> String {
    let mut line = format!(
        "REPORT RequestId: {}\tDuration: {:.2} ms\tBilled Duration: {} ms\tMemory Size: {} MB\t\
         Max Memory Used: {} MB",
        r.request_id,
        r.duration.as_secs_f64() * 1e3,
        billed_ms(r.duration),
        r.memory_mib,
        r.max_memory_used_bytes.div_ceil(1 << 20),
    );
    if let Some(restore) = r.restore {
        line.push_str(&format!(
            "\tRestore Duration: {:.2} ms\tBilled Restore Duration: {} ms",
            restore.as_secs_f64() * 1e3,
            billed_ms(restore)
        ));
    }
    line.push('\n');
    line
}

/// The guest's console bytes as log text: carriage returns dropped, a final newline added.
pub fn console_text(console: &[u8]) -> String {
    let mut text: String = String::from_utf8_lossy(console)
        .chars()
        .filter(|&c| c != '\r')
        .collect();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

/// The last [`TAIL_BYTES`] of `log`, starting at a line boundary when one is in reach.
pub fn tail(log: &[u8]) -> &[u8] {
    if log.len() <= TAIL_BYTES {
        return log;
    }
    let cut = &log[log.len() - TAIL_BYTES..];
    match cut.iter().position(|&b| b == b'\n') {
        Some(i) if i + 1 < cut.len() => &cut[i + 1..],
        _ => cut,
    }
}

/// Appends invocation logs to one file per function.
pub struct LogSink {
    dir: PathBuf,
    // One writer at a time, so invocations' lines never interleave.
    lock: Mutex<()>,
}

impl LogSink {
    /// Logs go under `dir`, created if missing.
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            lock: Mutex::new(()),
        })
    }

    /// Where `function`'s log is.
    pub fn path(&self, function: &str) -> PathBuf {
        self.dir.join(format!("{function}.log"))
    }

    /// Appends one invocation's lines. A log that cannot be written is reported, not fatal: the
    /// invocation already happened.
    pub fn append(&self, function: &str, text: &[u8]) {
        let _guard = match self.lock.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(function))
            .and_then(|mut f| f.write_all(text));
        if let Err(e) = written {
            tracing::warn!(function, error = %e, "cannot append to the function's log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_look_like_lambdas() {
        assert_eq!(start_line("r1"), "START RequestId: r1 Version: $LATEST\n");
        assert_eq!(end_line("r1"), "END RequestId: r1\n");
        let mut r = Report {
            request_id: "r1".into(),
            duration: Duration::from_micros(1_234),
            memory_mib: 128,
            max_memory_used_bytes: (20 << 20) + 1,
            restore: None,
        };
        assert_eq!(
            report_line(&r),
            "REPORT RequestId: r1\tDuration: 1.23 ms\tBilled Duration: 2 ms\tMemory Size: 128 MB\t\
             Max Memory Used: 21 MB\n"
        );
        r.restore = Some(Duration::from_micros(5_500));
        assert!(
            report_line(&r)
                .ends_with("\tRestore Duration: 5.50 ms\tBilled Restore Duration: 6 ms\n")
        );
    }

    #[test]
    fn console_and_tail() {
        assert_eq!(console_text(b"a\r\nb"), "a\nb\n");
        assert_eq!(console_text(b""), "");
        let short = b"x\ny\n";
        assert_eq!(tail(short), short);
        let long: Vec<u8> = (0..1000)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        let t = tail(&long);
        assert!(t.len() <= TAIL_BYTES);
        assert!(t.starts_with(b"line "), "starts at a line");
        assert!(t.ends_with(b"line 999\n"));
    }

    #[test]
    fn appends_per_function() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LogSink::new(&dir.path().join("logs")).unwrap();
        sink.append("f", b"one\n");
        sink.append("f", b"two\n");
        sink.append("g", b"other\n");
        assert_eq!(std::fs::read(sink.path("f")).unwrap(), b"one\ntwo\n");
        assert_eq!(std::fs::read(sink.path("g")).unwrap(), b"other\n");
    }
}

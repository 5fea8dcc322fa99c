//! The guest console as `thaw snapshot create` sees it: passed through to where the user wants
//! it, while watching for the text that says the guest is ready (`--ready-on-serial`) and
//! keeping the last lines, so an init failure can be reported with what the guest said.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How much of the console's end is kept for error messages.
const TAIL_BYTES: usize = 4096;

#[derive(Default)]
struct Seen {
    marker_found: bool,
    tail: VecDeque<u8>,
}

/// Shared between the console writer (the VMM's serial device) and whoever waits.
#[derive(Default)]
struct Shared {
    seen: Mutex<Seen>,
    changed: Condvar,
}

/// The waiting side.
#[derive(Clone)]
pub struct ConsoleWatch {
    shared: Arc<Shared>,
}

/// The writing side: give it to the machine as its console output.
pub struct WatchedConsole {
    shared: Arc<Shared>,
    inner: Box<dyn Write + Send>,
    marker: Vec<u8>,
    /// How many leading bytes of `marker` the output has matched so far.
    matched: usize,
}

/// A console that forwards to `inner` and watches for `marker` (if any).
pub fn watch(inner: Box<dyn Write + Send>, marker: Option<&str>) -> (WatchedConsole, ConsoleWatch) {
    let shared = Arc::new(Shared::default());
    let console = WatchedConsole {
        shared: shared.clone(),
        inner,
        marker: marker.map(|m| m.as_bytes().to_vec()).unwrap_or_default(),
        matched: 0,
    };
    (console, ConsoleWatch { shared })
}

fn lock(m: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl WatchedConsole {
    /// Advances the marker match over `bytes`; true once the whole marker has gone by. The
    /// marker is short and typed by a user, so the restart on a mismatch rescans the matched
    /// prefix rather than building a KMP table.
    fn scan(&mut self, bytes: &[u8]) -> bool {
        if self.marker.is_empty() {
            return false;
        }
        for &b in bytes {
            loop {
                if self.marker.get(self.matched) == Some(&b) {
                    self.matched += 1;
                    break;
                }
                if self.matched == 0 {
                    break;
                }
                // Fall back to the longest proper suffix of the matched text that is a prefix
                // of the marker, then try `b` again.
                let matched = &self.marker[..self.matched];
                self.matched = (1..self.matched)
                    .rev()
                    .find(|&k| matched.ends_with(&self.marker[..k]))
                    .unwrap_or(0);
            }
            if self.matched == self.marker.len() {
                return true;
            }
        }
        false
    }
}

impl Write for WatchedConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The console is the guest's; a closed stdout must not stop the guest.
        let _ = self.inner.write_all(buf);
        let found = self.scan(buf);
        let mut seen = lock(&self.shared.seen);
        seen.tail.extend(buf);
        let excess = seen.tail.len().saturating_sub(TAIL_BYTES);
        seen.tail.drain(..excess);
        if found && !seen.marker_found {
            seen.marker_found = true;
            self.shared.changed.notify_all();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.inner.flush();
        Ok(())
    }
}

impl ConsoleWatch {
    /// Waits until the marker has appeared or `until` passes, or `give_up` says to stop
    /// waiting (checked every few milliseconds); true if the marker appeared.
    pub fn wait_for_marker(&self, until: Instant, give_up: impl Fn() -> bool) -> bool {
        let mut seen = lock(&self.shared.seen);
        loop {
            if seen.marker_found {
                return true;
            }
            let now = Instant::now();
            if now >= until || give_up() {
                return false;
            }
            let step = (until - now).min(Duration::from_millis(20));
            seen = match self.shared.changed.wait_timeout(seen, step) {
                Ok((g, _)) => g,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// The last lines the guest printed (lossily decoded).
    pub fn tail(&self) -> String {
        let seen = lock(&self.shared.seen);
        let bytes: Vec<u8> = seen.tail.iter().copied().collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(marker: &str, pieces: &[&str]) -> bool {
        let (mut console, watch) = watch(Box::new(std::io::sink()), Some(marker));
        for p in pieces {
            console.write_all(p.as_bytes()).unwrap();
        }
        watch.wait_for_marker(Instant::now(), || false)
    }

    #[test]
    fn finds_the_marker_across_writes_and_after_false_starts() {
        assert!(feed("ready", &["boot...\nrea", "dy\n"]));
        assert!(feed("ready", &["r", "e", "a", "d", "y"]));
        assert!(feed("aab", &["aaab"]));
        assert!(feed("abab", &["ababab"]));
        assert!(feed("abac", &["ababac"]));
        assert!(!feed("ready", &["read", "rady"]));
        assert!(!feed("ready", &["not yet"]));
    }

    #[test]
    fn no_marker_never_fires_and_the_tail_is_kept() {
        let (mut console, watch) = watch(Box::new(std::io::sink()), None);
        console.write_all(&vec![b'x'; TAIL_BYTES]).unwrap();
        console.write_all(b"last line\n").unwrap();
        assert!(!watch.wait_for_marker(Instant::now() + Duration::from_millis(30), || false));
        let tail = watch.tail();
        assert_eq!(tail.len(), TAIL_BYTES);
        assert!(tail.ends_with("last line\n"));
    }

    #[test]
    fn waiting_stops_when_told_to_give_up() {
        let (_console, watch) = watch(Box::new(std::io::sink()), Some("never"));
        let start = Instant::now();
        assert!(!watch.wait_for_marker(start + Duration::from_secs(10), || true));
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}

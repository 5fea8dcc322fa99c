//! A real `thawd` for a bench (`#[path]`-included by the benches that run one): started on a free local port with a config file, its address
//! read from its first line of output, stopped with SIGTERM when dropped.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

#[path = "../../tests/fixture/thawd_bin.rs"]
mod thawd_bin;

/// A running thawd.
pub struct Daemon {
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Our own child, not yet reaped: the pid is still its.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// Starts thawd with `config`, written to `dir/NAME.toml`; panics if it cannot (a bench has
/// nothing to measure then).
#[allow(clippy::unwrap_used)]
pub fn start(dir: &Path, name: &str, config: &str) -> Daemon {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(thawd_bin::thawd_bin())
        .arg("--config")
        .arg(&path)
        .args(["--listen", "127.0.0.1:0"])
        .env("THAW_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    std::thread::spawn(move || for _ in lines {});
    let endpoint = first
        .strip_prefix("thawd: listening on ")
        .unwrap()
        .to_owned();
    Daemon { child, endpoint }
}

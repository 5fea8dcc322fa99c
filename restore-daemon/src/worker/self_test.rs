//! A test hook that plays a guest escape: code running inside a jailed worker. Only when thawd
//! (and so its workers) runs with `THAW_WORKER_SELF_TEST=1` does a worker look at an
//! invocation's payload, and then only for these two, which it answers itself instead of
//! handing them to the guest:
//!
//! - `"thaw:self-test=identity"`: the worker's user, group, capabilities and whether it can
//!   open the host path in `THAW_WORKER_SELF_TEST_PATH` (a JSON object as the response);
//! - `"thaw:self-test=forbidden-syscall"`: a syscall the filter forbids (`ptrace`), which
//!   kills the worker with `SIGSYS`.
//!
//! Without the variable nothing here runs, and payloads are never looked at.

use super::protocol::{Invoke, Reply, WireOutcome};

/// The variable that turns the hook on.
pub const ENABLE: &str = "THAW_WORKER_SELF_TEST";
/// The host path the identity probe tries to open.
pub const PROBE_PATH: &str = "THAW_WORKER_SELF_TEST_PATH";

const IDENTITY: &[u8] = br#""thaw:self-test=identity""#;
const FORBIDDEN_SYSCALL: &[u8] = br#""thaw:self-test=forbidden-syscall""#;

/// Whether the hook is on for this process (read once).
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os(ENABLE).is_some_and(|v| v == "1"))
}

/// The hook's answer to `invoke`, if it is one of its payloads and the hook is on.
pub fn answer(invoke: &Invoke) -> Option<Reply> {
    if !enabled() {
        return None;
    }
    if invoke.payload == FORBIDDEN_SYSCALL {
        tracing::warn!("self-test: making a forbidden syscall");
        // SAFETY: a syscall on no memory; the filter kills the process before it runs.
        unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) };
        // Unjailed, it may just succeed or fail: say so.
        return Some(respond(serde_json::json!({ "survived": "ptrace" })));
    }
    if invoke.payload != IDENTITY {
        return None;
    }
    let probe = std::env::var(PROBE_PATH).unwrap_or_else(|_| "/etc/hostname".into());
    let opened = match std::fs::File::open(&probe) {
        Ok(_) => "opened".to_owned(),
        Err(e) => e.to_string(),
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    Some(respond(serde_json::json!({
        "uid": nix::unistd::getuid().as_raw(),
        "euid": nix::unistd::geteuid().as_raw(),
        "gid": nix::unistd::getgid().as_raw(),
        "pid": std::process::id(),
        "capEff": field("CapEff:"),
        "capBnd": field("CapBnd:"),
        "noNewPrivs": field("NoNewPrivs:"),
        "seccomp": field("Seccomp:"),
        "vmHwm": field("VmHWM:"),
        "vmRss": field("VmRSS:"),
        "rssAnon": field("RssAnon:"),
        "rssFile": field("RssFile:"),
        "rssShmem": field("RssShmem:"),
        "probe": probe,
        "probeOpen": opened,
    })))
}

fn respond(body: serde_json::Value) -> Reply {
    Reply::Invoked {
        outcome: WireOutcome::Response(body.to_string().into_bytes()),
        duration_us: 0,
        console: Vec::new(),
        max_memory_used_bytes: 0,
    }
}

//! The function's runtime as a child process: starting it in its own process group with
//! Lambda's environment, reaping children (as PID 1 every orphan in the guest becomes ours), and
//! stopping it (SIGTERM to the group, then SIGKILL after a grace period).
//!
//! Children are reaped with `waitpid(-1)` on SIGCHLD rather than through `std`'s or tokio's
//! `Child`, because PID 1 must also reap processes it never started, and a `waitpid(-1)` would
//! otherwise steal the runtime's exit status from them.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{Signal as SignalStream, SignalKind, signal};
use tokio::sync::watch;

use super::config::AgentConfig;

/// The runtime could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Installing the SIGCHLD handler failed.
    #[error("cannot watch for SIGCHLD")]
    Sigchld(#[source] std::io::Error),
    /// No runtime command was configured and no default bootstrap exists.
    #[error(
        "no runtime command: pass one after `--`, set `runtime` in the function file or \
         thaw.runtime= on the kernel command line (none of {:?} exists)",
        super::config::DEFAULT_BOOTSTRAPS
    )]
    EmptyCommand,
    /// exec failed (no such file, not executable...).
    #[error("cannot start the runtime {program:?}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Watches for SIGCHLD; create it before starting the runtime so no exit goes unseen.
pub struct Reaper {
    sigchld: SignalStream,
}

impl Reaper {
    /// Installs the SIGCHLD handler.
    pub fn new() -> Result<Reaper, ProcessError> {
        Ok(Reaper {
            sigchld: signal(SignalKind::child()).map_err(ProcessError::Sigchld)?,
        })
    }

    /// Reaps children forever; when `runtime` exits, publishes Lambda's wording of how.
    pub async fn run(mut self, runtime: Pid, exited: watch::Sender<Option<String>>) {
        loop {
            loop {
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                    Ok(status) => {
                        if status.pid() == Some(runtime) {
                            let reason = describe_exit(&status);
                            tracing::warn!(pid = %runtime, "{reason}");
                            exited.send_replace(Some(reason));
                        } else {
                            tracing::debug!(?status, "reaped a child");
                        }
                    }
                    Err(Errno::EINTR) => continue,
                    Err(e) => {
                        tracing::warn!("waitpid failed: {e}");
                        break;
                    }
                }
            }
            if self.sigchld.recv().await.is_none() {
                return;
            }
        }
    }
}

/// Lambda's wording for a runtime's exit (Go's `ProcessState` strings).
pub fn describe_exit(status: &WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, 0) => "Runtime exited without providing a reason".to_owned(),
        WaitStatus::Exited(_, code) => format!("Runtime exited with error: exit status {code}"),
        WaitStatus::Signaled(_, sig, _) => {
            let name = match sig {
                Signal::SIGKILL => "killed",
                Signal::SIGTERM => "terminated",
                Signal::SIGSEGV => "segmentation fault",
                Signal::SIGABRT => "aborted",
                Signal::SIGINT => "interrupt",
                Signal::SIGBUS => "bus error",
                other => other.as_str(),
            };
            format!("Runtime exited with error: signal: {name}")
        }
        other => format!("Runtime exited: {other:?}"),
    }
}

/// Starts the runtime with Lambda's environment; `api` is the Runtime API's address.
pub fn spawn(config: &AgentConfig, api: std::net::SocketAddr) -> Result<Pid, ProcessError> {
    let (program, args) = config
        .runtime_command
        .split_first()
        .ok_or(ProcessError::EmptyCommand)?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        // Its own process group, so stopping it reaches whatever it started too.
        .process_group(0);
    for (k, v) in &config.default_env {
        if std::env::var_os(k).is_none() {
            cmd.env(k, v);
        }
    }
    cmd.envs(config.env.iter().map(|(k, v)| (k, v)));
    cmd.env("AWS_LAMBDA_RUNTIME_API", api.to_string());
    if let Some(dir) = &config.working_dir {
        cmd.current_dir(dir);
    }
    let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        program: program.clone(),
        source,
    })?;
    let pid = Pid::from_raw(child.id() as i32);
    tracing::info!(%pid, command = ?config.runtime_command, %api, "runtime started");
    // The reaper collects its status; dropping `Child` neither waits nor kills.
    drop(child);
    Ok(pid)
}

/// Stops the runtime's process group: SIGTERM, then SIGKILL if it has not exited in `grace`.
pub async fn stop(pid: Pid, grace: Duration, exited: &mut watch::Receiver<Option<String>>) {
    if exited.borrow().is_some() {
        return;
    }
    if let Err(e) = killpg(pid, Signal::SIGTERM) {
        tracing::debug!(%pid, "SIGTERM to the runtime's group failed: {e}");
    }
    let gone = tokio::time::timeout(grace, exited.wait_for(Option::is_some))
        .await
        .is_ok_and(|r| r.is_ok());
    if !gone {
        tracing::warn!(%pid, ?grace, "runtime ignored SIGTERM; killing it");
        if let Err(e) = killpg(pid, Signal::SIGKILL) {
            tracing::debug!(%pid, "SIGKILL to the runtime's group failed: {e}");
        }
        let _ = tokio::time::timeout(grace, exited.wait_for(Option::is_some)).await;
    }
}

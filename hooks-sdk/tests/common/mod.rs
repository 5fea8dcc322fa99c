//! Test fixture shared by hooks-sdk's integration tests: a fake Thaw host (a Unix socket that
//! speaks the guest protocol with the blocking frame helpers), `thaw-init` started in host
//! mode as a child process whose log is captured, and a scripted "runtime" for tests that
//! drive the Runtime API themselves. The host's side of the protocol (`protocol_host`) and the
//! awslambdaric scenario (`awslambdaric`) are also used, as source, by the root package's tests.

#![allow(dead_code)]

pub mod awslambdaric;
pub mod protocol_host;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use hooks_sdk::protocol::{InitType, Message};

pub use protocol_host::*;

/// The fake host's listening socket.
pub struct FakeHost {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    listener: Option<UnixListener>,
}

impl FakeHost {
    pub fn new() -> FakeHost {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        FakeHost {
            dir,
            socket,
            listener: Some(listener),
        }
    }

    /// Stops listening (removes the socket): the agent's connects now fail.
    pub fn go_away(&mut self) {
        self.listener = None;
        std::fs::remove_file(&self.socket).unwrap();
    }

    /// Listens again on the same path.
    pub fn come_back(&mut self) {
        let listener = UnixListener::bind(&self.socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        self.listener = Some(listener);
    }

    /// Waits for the agent to connect; checks its Hello.
    pub fn accept(&self, agent: &AgentProcess, init_type: InitType) -> HostConn {
        let listener = self.listener.as_ref().expect("the host is away");
        accept_agent(listener, init_type, STEP, agent)
    }
}

/// `thaw-init --host-mode` as a child; killed when dropped. Its stderr is collected (and
/// echoed, so `--nocapture` shows it).
pub struct AgentProcess {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl AgentProcess {
    /// Starts the agent; `args` go before `--`, `runtime` after it.
    pub fn start(host: &FakeHost, args: &[&str], runtime: &[&str], cwd: &Path) -> AgentProcess {
        Self::start_exe(
            Path::new(env!("CARGO_BIN_EXE_thaw-init")),
            host,
            args,
            runtime,
            cwd,
        )
    }

    /// [`AgentProcess::start`] with another `thaw-init` binary.
    pub fn start_exe(
        exe: &Path,
        host: &FakeHost,
        args: &[&str],
        runtime: &[&str],
        cwd: &Path,
    ) -> AgentProcess {
        let mut cmd = Command::new(exe);
        cmd.arg("--host-mode")
            .arg("--agent-uds")
            .arg(&host.socket)
            .arg("--runtime-api")
            .arg("127.0.0.1:0")
            .args(args)
            .arg("--")
            .args(runtime)
            .current_dir(cwd)
            .env("THAW_LOG", "info,hooks_sdk=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("cannot start thaw-init");
        let log = Arc::new(Mutex::new(String::new()));
        // The runtime inherits both streams; everything is echoed to stderr (not the test's
        // stdout, where a runtime's chatter would mix with the test harness's report).
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        collect(stdout, "[thaw-init stdout]", log.clone());
        collect(stderr, "[thaw-init]", log.clone());
        AgentProcess { child, log }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + STEP;
        while !self.log().contains(needle) {
            if Instant::now() > deadline {
                panic!("agent never logged {needle:?}; log:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the agent to exit.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                panic!("agent did not exit; log:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends Shutdown on `conn` and checks the agent exits cleanly.
    pub fn shutdown(mut self, conn: &mut HostConn) {
        conn.send(&Message::Shutdown);
        let status = self.wait();
        assert!(
            status.success(),
            "agent exit status {status}; log:\n{}",
            self.log()
        );
    }
}

fn collect(
    stream: impl std::io::Read + Send + 'static,
    prefix: &'static str,
    sink: Arc<Mutex<String>>,
) {
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            eprintln!("{prefix} {line}");
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
}

impl Diagnostics for AgentProcess {
    fn diagnostics(&self) -> String {
        self.log()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A runtime command that only writes `AWS_LAMBDA_RUNTIME_API` to `file` and sleeps, for
/// tests that play the runtime themselves over HTTP.
pub fn address_writing_runtime(file: &Path) -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        "echo \"$AWS_LAMBDA_RUNTIME_API\" > \"$0.tmp\" && mv \"$0.tmp\" \"$0\" && exec sleep 600"
            .into(),
        file.display().to_string(),
    ]
}

/// Waits for the address file written by [`address_writing_runtime`].
pub fn read_address(file: &Path) -> String {
    let deadline = Instant::now() + STEP;
    loop {
        if let Ok(addr) = std::fs::read_to_string(file) {
            return addr.trim().to_owned();
        }
        if Instant::now() > deadline {
            panic!("the runtime never wrote its Runtime API address");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// An on-demand agent whose runtime is [`address_writing_runtime`], so the test plays the
/// runtime itself over HTTP: returns the agent, the host's end of its connection (after
/// `Hello`), and the Runtime API address.
pub fn agent_with_test_as_runtime(host: &FakeHost) -> (AgentProcess, HostConn, String) {
    let addr_file = host.dir.path().join("api-addr");
    let runtime = address_writing_runtime(&addr_file);
    let runtime: Vec<&str> = runtime.iter().map(String::as_str).collect();
    let agent = AgentProcess::start(host, &[], &runtime, host.dir.path());
    let conn = host.accept(&agent, InitType::OnDemand);
    let api = read_address(&addr_file);
    (agent, conn, api)
}

/// Appends `line` to the file named by `THAW_TEST_LOG`, if set: how runtimes started by the
/// agent (these test binaries, re-run as the runtime) report what their hooks did.
pub fn test_log(line: &str) {
    if let Ok(path) = std::env::var("THAW_TEST_LOG") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        writeln!(f, "{line}").unwrap();
    }
}

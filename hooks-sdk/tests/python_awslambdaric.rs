//! AWS's own Python runtime interface client, unmodified (`awslambdaric` with
//! `snapshot-restore-py`, from PyPI), against `thaw-init` in host-process mode. The test is the
//! Thaw host: it speaks the guest protocol on a Unix socket and "restores" by closing the
//! agent's connection and answering the reconnection's `Hello` with `Restored` (no VM). The
//! handler and hooks append to a log file, which is how their order is checked. The function
//! and the scenario's steps are `common/awslambdaric.rs`, which the root package's
//! `linux_agent.rs` runs in a chroot and in a Linux guest too.
//!
//! Needs `python3 -m pip install awslambdaric==4.2.2 snapshot-restore-py==1.0.0`; the tests
//! fail (they do not skip) when those are missing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::awslambdaric::*;
use common::*;
use hooks_sdk::protocol::{InitType, Message};

/// Fails with the install command when the Python packages are missing.
fn require_python_packages() {
    let check = Command::new("python3")
        .args(["-c", "import awslambdaric, snapshot_restore_py"])
        .output();
    match check {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "awslambdaric / snapshot-restore-py are not installed for python3 ({}); install them \
             with: python3 -m pip install {PIP_PACKAGES}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!("python3 is needed for this test and cannot be run: {e}"),
    }
}

struct PyFunction {
    host: FakeHost,
    agent: AgentProcess,
    log: PathBuf,
}

impl PyFunction {
    fn start(init_type: InitType, extra_env: &[&str], handler: &str) -> PyFunction {
        require_python_packages();
        let host = FakeHost::new();
        let dir = host.dir.path();
        std::fs::write(dir.join(APP_FILE), APP).unwrap();
        let log = dir.join("events.log");
        let log_env = format!("THAW_TEST_LOG={}", log.display());
        let init = match init_type {
            InitType::OnDemand => "on-demand",
            InitType::SnapStart => "snap-start",
        };
        let mut args = vec![
            "--init-type",
            init,
            "--function-name",
            FUNCTION_NAME,
            "--handler",
            handler,
            "--env",
            &log_env,
            "--env",
            "PYTHONUNBUFFERED=1",
        ];
        for e in extra_env {
            args.extend(["--env", e]);
        }
        let runtime = ["python3", "-m", "awslambdaric", handler];
        let agent = AgentProcess::start(&host, &args, &runtime, dir);
        PyFunction { host, agent, log }
    }

    fn logged_events(&self) -> Vec<String> {
        read_lines(&self.log)
    }
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

impl Diagnostics for PyFunction {
    fn diagnostics(&self) -> String {
        self.agent.log()
    }
}

impl ScenarioHost for PyFunction {
    fn accept(&mut self, init_type: InitType) -> HostConn {
        self.host.accept(&self.agent, init_type)
    }

    /// No VM here: the "restore" closes the connection, and the agent reconnects.
    fn reset_channel(&mut self, conn: HostConn) {
        drop(conn);
    }

    fn output(&self) -> String {
        self.agent.log()
    }

    /// The log file is written before each step completes: no waiting, exact order.
    fn events(&self, _at_least: usize) -> Vec<String> {
        read_lines(&self.log)
    }
}

#[test]
fn awslambdaric_snap_start_hooks_invocations_and_errors() {
    let mut f = PyFunction::start(InitType::SnapStart, &[], HANDLER);
    let mut conn = snapshot_and_restore(&mut f);
    f.agent
        .wait_for_log("host mode: skipped RNG reseed and clock set");
    restore_done_and_invocations(&f, &mut conn);
    f.agent.shutdown(&mut conn);
}

#[test]
fn awslambdaric_after_restore_hook_failure_is_restore_error() {
    let fail = format!("{FAIL_AFTER_ENV}=1");
    let mut f = PyFunction::start(InitType::SnapStart, &[&fail], HANDLER);
    let mut conn = snapshot_and_restore(&mut f);
    after_restore_hook_fails(&f, &mut conn);
    f.agent.shutdown(&mut conn);
}

#[test]
fn awslambdaric_before_snapshot_hook_failure_is_checkpoint_error() {
    let f = PyFunction::start(InitType::SnapStart, &["THAW_TEST_FAIL_BEFORE=1"], HANDLER);
    let mut conn = f.host.accept(&f.agent, InitType::SnapStart);
    conn.send(&Message::Checkpoint);
    match conn.recv(&f.agent) {
        Got::CheckpointError(error_type, body) => {
            assert_eq!(error_type, "Runtime.BeforeSnapshotError");
            assert_eq!(
                json(&body)["errorMessage"],
                "before-snapshot hook failed on purpose"
            );
        }
        other => panic!("{other:?}"),
    }
    f.agent.shutdown(&mut conn);
}

#[test]
fn awslambdaric_on_demand_import_error_is_init_error() {
    let f = PyFunction::start(InitType::OnDemand, &[], "missing_module.handler");
    let mut conn = f.host.accept(&f.agent, InitType::OnDemand);
    match conn.recv(&f.agent) {
        Got::InitError(error_type, body) => {
            assert_eq!(error_type, "Runtime.ImportModuleError");
            let doc = json(&body);
            assert_eq!(doc["errorType"], "Runtime.ImportModuleError");
            assert!(
                doc["errorMessage"]
                    .as_str()
                    .is_some_and(|m| m.contains("missing_module")),
                "{doc}"
            );
        }
        other => panic!("{other:?}"),
    }
    f.agent.shutdown(&mut conn);
}

#[test]
fn awslambdaric_on_demand_serves_invocations() {
    let f = PyFunction::start(InitType::OnDemand, &[], HANDLER);
    let mut conn = f.host.accept(&f.agent, InitType::OnDemand);
    assert_eq!(conn.recv(&f.agent), Got::Ready);
    conn.invoke("od-1", br#"{"n":1}"#);
    assert!(matches!(conn.recv(&f.agent), Got::Response(id, _) if id == "od-1"));
    assert_eq!(
        f.logged_events(),
        ["init:on-demand", "invoke:od-1"],
        "no hooks run on demand"
    );
    f.agent.shutdown(&mut conn);
}

//! A Rust function for Thaw (or Lambda) built with the hooks SDK: it greets whoever the event
//! names, and shows what SnapStart hooks are for — a value that must differ between clones
//! (regenerated after each restore) and a resource released before the snapshot.
//!
//! Build it, then run it under `thaw-init` in host mode against a Thaw host:
//!
//! ```text
//! cargo build -p hooks-sdk --example hello-function
//! thaw-init --host-mode --agent-uds /tmp/thaw.sock --init-type snap-start -- \
//!     target/debug/examples/hello-function
//! ```

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use hooks_sdk::sdk::{FunctionError, Runtime};

/// An id unique to this execution environment; after a restore every clone needs its own.
fn fresh_instance_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}-{:x}", std::process::id(), nanos)
}

fn main() -> ExitCode {
    let mut runtime = match Runtime::from_env() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hello-function: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Slow initialization would happen here, once, before the snapshot.
    let instance = Arc::new(Mutex::new(fresh_instance_id()));

    runtime.register_before_checkpoint(|| {
        eprintln!("hello-function: before checkpoint: closing connections");
        Ok(())
    });
    let id = instance.clone();
    runtime.register_after_restore(move || {
        let mut id = id
            .lock()
            .map_err(|_| FunctionError::new("Poisoned", "lock"))?;
        *id = fresh_instance_id();
        eprintln!("hello-function: after restore: instance {id}");
        Ok(())
    });

    let result = runtime.run(|invocation| {
        let event: serde_json::Value = serde_json::from_slice(&invocation.payload)?;
        let name = event
            .get("name")
            .and_then(|n| n.as_str())
            .unwrap_or("world");
        let instance = instance.lock().map(|i| i.clone()).unwrap_or_default();
        let reply = serde_json::json!({
            "greeting": format!("hello, {name}"),
            "request_id": invocation.request_id,
            "instance": instance,
        });
        Ok::<_, FunctionError>(serde_json::to_vec(&reply)?)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hello-function: {e}");
            ExitCode::FAILURE
        }
    }
}

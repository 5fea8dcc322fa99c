//! The Rust function SDK: a runtime loop for functions written in Rust and the SnapStart hook
//! registry. It speaks only Lambda's Runtime API, so a function built with it runs under
//! `thaw-init` and on Lambda alike.
//!
//! In a snap-start environment (`AWS_LAMBDA_INITIALIZATION_TYPE=snap-start`) [`Runtime::run`]
//! first runs the before-checkpoint hooks in **reverse** registration order, waits in
//! `GET /runtime/restore/next` (the snapshot is taken there), then runs the after-restore hooks
//! in registration order — Lambda's order: register foundations first, and teardown and
//! rebuild both happen in the right relative order. A failing before-hook is reported to
//! `/runtime/init/error` (`Runtime.BeforeCheckpointError`), a failing after-hook to
//! `/runtime/restore/error` (`Runtime.AfterRestoreError`); either ends the loop with an error.
//!
//! ```no_run
//! use hooks_sdk::sdk::{FunctionError, Runtime};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let mut runtime = Runtime::from_env()?;
//!     runtime.register_before_checkpoint(|| Ok(())); // e.g. close connections
//!     runtime.register_after_restore(|| Ok(()));     // e.g. reseed ids, reconnect
//!     runtime.run(|invocation| Ok::<_, FunctionError>(invocation.payload))?;
//!     Ok(())
//! }
//! ```

pub mod client;

use bytes::Bytes;
use hyper::{Method, StatusCode};

pub use self::client::{ApiClient, ClientError};

/// A function's or hook's failure: Lambda's `errorType` and `errorMessage`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionError {
    /// `errorType` (for a converted error: its type's name).
    pub error_type: String,
    /// `errorMessage`.
    pub error_message: String,
}

impl FunctionError {
    /// A failure with an explicit type.
    pub fn new(error_type: impl Into<String>, error_message: impl Into<String>) -> FunctionError {
        FunctionError {
            error_type: error_type.into(),
            error_message: error_message.into(),
        }
    }

    /// Lambda's error document for this failure.
    pub fn to_json(&self) -> Bytes {
        let doc = serde_json::json!({
            "errorMessage": self.error_message,
            "errorType": self.error_type,
            "stackTrace": [],
        });
        Bytes::from(doc.to_string())
    }
}

impl<E: std::error::Error> From<E> for FunctionError {
    fn from(e: E) -> FunctionError {
        // The short type name (`Error` of `serde_json::Error`), as Lambda's runtimes report.
        let full = std::any::type_name::<E>();
        let short = full.split('<').next().unwrap_or(full);
        let short = short.rsplit("::").next().unwrap_or(short);
        FunctionError::new(short, e.to_string())
    }
}

/// The SDK's loop could not go on.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// `AWS_LAMBDA_RUNTIME_API` is not set.
    #[error("AWS_LAMBDA_RUNTIME_API is not set: not running under a Lambda Runtime API")]
    NoRuntimeApi,
    /// Talking to the Runtime API failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The Runtime API answered with an unexpected status.
    #[error("Runtime API {path} answered {status}: {body}")]
    Status {
        /// The path.
        path: String,
        /// The status.
        status: StatusCode,
        /// The body, as text.
        body: String,
    },
    /// A before-checkpoint hook failed (reported to `/runtime/init/error`).
    #[error("before-checkpoint hook failed: {0:?}")]
    BeforeCheckpoint(FunctionError),
    /// An after-restore hook failed (reported to `/runtime/restore/error`).
    #[error("after-restore hook failed: {0:?}")]
    AfterRestore(FunctionError),
}

/// One invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    /// `Lambda-Runtime-Aws-Request-Id`.
    pub request_id: String,
    /// `Lambda-Runtime-Deadline-Ms` (Unix milliseconds; 0 when absent).
    pub deadline_ms: u64,
    /// `Lambda-Runtime-Invoked-Function-Arn`.
    pub function_arn: String,
    /// `Lambda-Runtime-Trace-Id`.
    pub trace_id: Option<String>,
    /// `Lambda-Runtime-Client-Context`.
    pub client_context: Option<String>,
    /// `Lambda-Runtime-Cognito-Identity`.
    pub cognito_identity: Option<String>,
    /// The event.
    pub payload: Vec<u8>,
}

type Hook = Box<dyn FnMut() -> Result<(), FunctionError> + Send>;

/// The runtime loop and its hooks. See the module docs.
pub struct Runtime {
    client: ApiClient,
    snap_start: bool,
    before_checkpoint: Vec<Hook>,
    after_restore: Vec<Hook>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("client", &self.client)
            .field("snap_start", &self.snap_start)
            .field("before_checkpoint", &self.before_checkpoint.len())
            .field("after_restore", &self.after_restore.len())
            .finish()
    }
}

const INIT_ERROR: &str = "/2018-06-01/runtime/init/error";
const ERROR_TYPE_HEADER: &str = "Lambda-Runtime-Function-Error-Type";

impl Runtime {
    /// A runtime configured from Lambda's environment (`AWS_LAMBDA_RUNTIME_API`,
    /// `AWS_LAMBDA_INITIALIZATION_TYPE`).
    pub fn from_env() -> Result<Runtime, SdkError> {
        let api = std::env::var("AWS_LAMBDA_RUNTIME_API").map_err(|_| SdkError::NoRuntimeApi)?;
        let snap_start =
            std::env::var("AWS_LAMBDA_INITIALIZATION_TYPE").is_ok_and(|t| t == "snap-start");
        Runtime::new(api, snap_start)
    }

    /// A runtime for the Runtime API at `api` (`host:port`).
    pub fn new(api: impl Into<String>, snap_start: bool) -> Result<Runtime, SdkError> {
        Ok(Runtime {
            client: ApiClient::new(api)?,
            snap_start,
            before_checkpoint: Vec::new(),
            after_restore: Vec::new(),
        })
    }

    /// Registers a hook run before the snapshot (hooks run in reverse registration order).
    pub fn register_before_checkpoint(
        &mut self,
        hook: impl FnMut() -> Result<(), FunctionError> + Send + 'static,
    ) -> &mut Runtime {
        self.before_checkpoint.push(Box::new(hook));
        self
    }

    /// Registers a hook run after a restore (hooks run in registration order).
    pub fn register_after_restore(
        &mut self,
        hook: impl FnMut() -> Result<(), FunctionError> + Send + 'static,
    ) -> &mut Runtime {
        self.after_restore.push(Box::new(hook));
        self
    }

    /// Reports a failed init to `/runtime/init/error` (the function should then exit).
    pub fn init_error(&mut self, error: &FunctionError) -> Result<(), SdkError> {
        let ty = if error.error_type.starts_with("Runtime.") {
            error.error_type.as_str()
        } else {
            "Runtime.InitError"
        };
        self.post(INIT_ERROR, ty, error.to_json())
    }

    fn post(&mut self, path: &str, error_type: &str, body: Bytes) -> Result<(), SdkError> {
        let resp =
            self.client
                .request(Method::POST, path, &[(ERROR_TYPE_HEADER, error_type)], body)?;
        expect(path, resp, StatusCode::ACCEPTED)
    }

    /// The SnapStart phase: before-hooks (reverse), `restore/next`, after-hooks (in order).
    fn snapshot_and_restore(&mut self) -> Result<(), SdkError> {
        let failure = self
            .before_checkpoint
            .iter_mut()
            .rev()
            .find_map(|hook| hook().err());
        if let Some(e) = failure {
            self.post(INIT_ERROR, "Runtime.BeforeCheckpointError", e.to_json())?;
            return Err(SdkError::BeforeCheckpoint(e));
        }
        let path = "/2018-06-01/runtime/restore/next";
        let resp = self.client.request(Method::GET, path, &[], Bytes::new())?;
        expect(path, resp, StatusCode::OK)?;
        // Connections opened before a snapshot are not to be trusted after it.
        self.client.reset();
        let failure = self.after_restore.iter_mut().find_map(|hook| hook().err());
        if let Some(e) = failure {
            self.post(
                "/2018-06-01/runtime/restore/error",
                "Runtime.AfterRestoreError",
                e.to_json(),
            )?;
            return Err(SdkError::AfterRestore(e));
        }
        Ok(())
    }

    /// Waits for the next invocation.
    pub fn next_invocation(&mut self) -> Result<Invocation, SdkError> {
        let path = "/2018-06-01/runtime/invocation/next";
        let resp = self.client.request(Method::GET, path, &[], Bytes::new())?;
        if resp.status != StatusCode::OK {
            return Err(status_error(path, resp));
        }
        let header = |name: &str| {
            resp.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Ok(Invocation {
            request_id: header("lambda-runtime-aws-request-id").unwrap_or_default(),
            deadline_ms: header("lambda-runtime-deadline-ms")
                .and_then(|d| d.parse().ok())
                .unwrap_or(0),
            function_arn: header("lambda-runtime-invoked-function-arn").unwrap_or_default(),
            trace_id: header("lambda-runtime-trace-id"),
            client_context: header("lambda-runtime-client-context"),
            cognito_identity: header("lambda-runtime-cognito-identity"),
            payload: resp.body.to_vec(),
        })
    }

    /// Runs the function: the SnapStart phase when snap-starting, then invocations one after
    /// another, forever. Returns only when the loop cannot go on.
    pub fn run<F, R>(mut self, mut handler: F) -> Result<(), SdkError>
    where
        F: FnMut(Invocation) -> Result<R, FunctionError>,
        R: Into<Vec<u8>>,
    {
        if self.snap_start {
            self.snapshot_and_restore()?;
        }
        loop {
            let invocation = self.next_invocation()?;
            let id = invocation.request_id.clone();
            match handler(invocation) {
                Ok(result) => {
                    let path = format!("/2018-06-01/runtime/invocation/{id}/response");
                    let resp = self.client.request(
                        Method::POST,
                        &path,
                        &[],
                        Bytes::from(result.into()),
                    )?;
                    // A response over Lambda's limit fails that invocation, not the function.
                    if resp.status == StatusCode::PAYLOAD_TOO_LARGE {
                        eprintln!(
                            "response to {id} refused: {}",
                            String::from_utf8_lossy(&resp.body)
                        );
                        continue;
                    }
                    expect(&path, resp, StatusCode::ACCEPTED)?;
                }
                Err(e) => {
                    eprintln!(
                        "invocation {id} failed: {}: {}",
                        e.error_type, e.error_message
                    );
                    let path = format!("/2018-06-01/runtime/invocation/{id}/error");
                    let error_type = e.error_type.clone();
                    self.post(&path, &error_type, e.to_json())?;
                }
            }
        }
    }
}

fn status_error(path: &str, resp: client::ApiResponse) -> SdkError {
    SdkError::Status {
        path: path.to_owned(),
        status: resp.status,
        body: String::from_utf8_lossy(&resp.body).into_owned(),
    }
}

fn expect(path: &str, resp: client::ApiResponse, want: StatusCode) -> Result<(), SdkError> {
    if resp.status == want {
        Ok(())
    } else {
        Err(status_error(path, resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converted_errors_carry_their_short_type_name() {
        let e: FunctionError = "x".parse::<u32>().unwrap_err().into();
        assert_eq!(e.error_type, "ParseIntError");
        let doc: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(doc["errorType"], "ParseIntError");
        assert_eq!(doc["stackTrace"], serde_json::json!([]));
    }
}

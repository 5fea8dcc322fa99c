//! `thawd`, the restore-on-invoke daemon: functions from a config file (`config`), execution
//! environments restored on demand, frozen while idle and reused (`pool`), each in its own
//! worker process (`crate::worker`), AWS Lambda's Invoke API over HTTP (`api`), asynchronous
//! invocations with retries and a dead-letter directory (`events`), per-invocation log lines
//! (`logs`) and Prometheus metrics (`metrics`).
//!
//! The HTTP layer talks to the rest only through [`Backend`], so it can be tested against a
//! fake one.

use std::future::Future;

use bytes::Bytes;

pub mod api;
pub mod config;
pub mod copies;
pub mod event_spool;
pub mod events;
pub mod front;
pub mod jail;
pub mod logs;
pub mod metrics;
pub mod pool;
pub mod registry;
pub mod service;
pub mod store_copies;

/// Lambda's limit on a synchronous (`RequestResponse`) invocation's payload: 6 MB.
pub const MAX_SYNC_PAYLOAD: usize = 6 * 1024 * 1024;
/// Lambda's limit on an asynchronous (`Event`) invocation's payload: 256 KB.
pub const MAX_EVENT_PAYLOAD: usize = 256 * 1024;
/// The only version thawd serves.
pub const LATEST: &str = "$LATEST";

/// One invocation as the HTTP layer hands it over.
#[derive(Clone, Debug)]
pub struct Invocation {
    /// The function's name (a full or partial ARN in the path is reduced to the name).
    pub function: String,
    /// `?Qualifier=`, if given (only `$LATEST` exists).
    pub qualifier: Option<String>,
    /// The event.
    pub payload: Bytes,
    /// The request id thawd assigned (also returned as `x-amzn-RequestId`).
    pub request_id: String,
    /// `X-Amz-Client-Context` (base64 JSON), if given.
    pub client_context: Option<String>,
    /// `X-Amz-Log-Type: Tail`: return the end of this invocation's log.
    pub tail_logs: bool,
}

/// A synchronous invocation that reached the function.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Completed {
    /// The response payload, or the function's error document.
    pub payload: Vec<u8>,
    /// The function failed (`X-Amz-Function-Error: Unhandled`): `payload` is its error
    /// document (`{"errorType": ..., "errorMessage": ...}`), including timeouts and crashes.
    pub function_error: bool,
    /// The last 4 KB of the invocation's log, when [`Invocation::tail_logs`] asked for it.
    pub log_tail: Option<Vec<u8>>,
}

/// Why thawd throttled an invocation (Lambda's `Reason` field of `TooManyRequestsException`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThrottleReason {
    /// The function's reserved concurrency is used up.
    ReservedFunctionConcurrentInvocationLimitExceeded,
    /// The daemon's global concurrency is used up.
    ConcurrentInvocationLimitExceeded,
    /// The asynchronous queue is full.
    EventQueueFull,
    /// The front's budget for request bodies being read is used up.
    BodyBudgetFull,
}

impl ThrottleReason {
    /// Lambda's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReservedFunctionConcurrentInvocationLimitExceeded => {
                "ReservedFunctionConcurrentInvocationLimitExceeded"
            }
            Self::ConcurrentInvocationLimitExceeded => "ConcurrentInvocationLimitExceeded",
            Self::EventQueueFull | Self::BodyBudgetFull => "ConcurrentInvocationLimitExceeded",
        }
    }
}

/// An invocation that did not reach the function: the HTTP layer turns each into Lambda's
/// error status, `x-amzn-ErrorType` and JSON body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvokeFailure {
    /// 404 `ResourceNotFoundException`.
    #[error("Function not found: {arn}")]
    NotFound {
        /// The function's ARN as Lambda would print it.
        arn: String,
    },
    /// 429 `TooManyRequestsException`.
    #[error("Rate Exceeded.")]
    Throttled {
        /// Why.
        reason: ThrottleReason,
    },
    /// 413 `RequestTooLargeException`.
    #[error("Request must be smaller than {limit} bytes for the {kind} operation")]
    TooLarge {
        /// The limit that applies.
        limit: usize,
        /// "InvokeFunction" or "InvokeAsync".
        kind: &'static str,
    },
    /// 400 `InvalidRequestContentException` (e.g. a bad header value).
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong.
        message: String,
    },
    /// 500 `ServiceException`: thawd itself failed (a worker could not start, a snapshot
    /// could not be restored).
    #[error("{message}")]
    Service {
        /// What failed.
        message: String,
    },
}

/// What the HTTP layer needs from the daemon.
pub trait Backend: Send + Sync + 'static {
    /// Runs a `RequestResponse` invocation to its end.
    fn invoke(
        &self,
        invocation: Invocation,
    ) -> impl Future<Output = Result<Completed, InvokeFailure>> + Send;

    /// Whether an invocation of `function` could start now (`asynchronous`: be queued), asked
    /// before its body is read: the function exists and has room. It reserves nothing (the
    /// concurrency is taken once the body is whole), so a slow sender holds none.
    fn admit(
        &self,
        function: &str,
        qualifier: Option<&str>,
        asynchronous: bool,
    ) -> Result<(), InvokeFailure> {
        let _ = (function, qualifier, asynchronous);
        Ok(())
    }

    /// Queues an `Event` invocation; it is answered 202 once queued (and, in thawd, written
    /// to disk).
    fn enqueue(
        &self,
        invocation: Invocation,
    ) -> impl Future<Output = Result<(), InvokeFailure>> + Send;

    /// `DryRun`: checks the function exists and the caller may invoke it (answered 204).
    fn dry_run(&self, function: &str, qualifier: Option<&str>) -> Result<(), InvokeFailure>;

    /// The Prometheus text exposition served at `/metrics`.
    fn metrics_text(&self) -> String;
}

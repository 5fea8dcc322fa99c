//! Lambda's vocabulary, shared by the state machine, the HTTP server and the host link: the
//! replies the Runtime API gives, the error documents Lambda writes (`{"errorMessage": ...,
//! "errorType": ...}`), how Lambda sanitizes a runtime's error type, and the frames the agent
//! sends the host. Wording follows AWS's Runtime Interface Emulator so runtimes that match on
//! messages see what they see on Lambda.

use std::sync::Arc;

use bytes::Bytes;

use crate::protocol::Invoke;

use super::invoke_frame::InvokeFrame;
use crate::protocol::{self, MAX_PAYLOAD, MAX_STRING, Message, RUNTIME_EXIT_ERROR};

/// Lambda's error type and the error document, owned (the protocol's `Failure` borrows).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// e.g. `Runtime.ExitError`.
    pub error_type: String,
    /// The error document.
    pub body: Bytes,
}

impl Failure {
    /// A failure with `error_type` (cut to the protocol's string limit) and `body`.
    pub fn new(error_type: impl Into<String>, body: Bytes) -> Failure {
        Failure {
            error_type: clamp(error_type.into()),
            body,
        }
    }

    fn as_protocol(&self) -> protocol::Failure<'_> {
        protocol::Failure {
            error_type: &self.error_type,
            body: &self.body,
        }
    }
}

/// Cuts `s` to at most `MAX_STRING` bytes on a character boundary.
fn clamp(mut s: String) -> String {
    if s.len() > MAX_STRING {
        let mut end = MAX_STRING;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// A frame for the host, owned until the link writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToHost {
    /// `Ready`.
    Ready,
    /// `SnapshotReady`.
    SnapshotReady,
    /// `RestoreDone`.
    RestoreDone,
    /// `Response`.
    Response {
        /// The invocation.
        request_id: String,
        /// Its result (at most `MAX_PAYLOAD`).
        payload: Bytes,
    },
    /// `InvokeError`.
    InvokeError {
        /// The invocation.
        request_id: String,
        /// What went wrong.
        failure: Failure,
    },
    /// `InitError`.
    InitError(Failure),
    /// `RestoreError`.
    RestoreError(Failure),
    /// `CheckpointError`.
    CheckpointError(Failure),
}

impl ToHost {
    /// The protocol message.
    pub fn message(&self) -> Message<'_> {
        match self {
            ToHost::Ready => Message::Ready,
            ToHost::SnapshotReady => Message::SnapshotReady,
            ToHost::RestoreDone => Message::RestoreDone,
            ToHost::Response {
                request_id,
                payload,
            } => Message::Response {
                request_id,
                payload,
            },
            ToHost::InvokeError {
                request_id,
                failure,
            } => Message::InvokeError {
                request_id,
                failure: failure.as_protocol(),
            },
            ToHost::InitError(f) => Message::InitError(f.as_protocol()),
            ToHost::RestoreError(f) => Message::RestoreError(f.as_protocol()),
            ToHost::CheckpointError(f) => Message::CheckpointError(f.as_protocol()),
        }
    }
}

/// A Runtime API answer, before it becomes HTTP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiReply {
    /// 200 with the invocation's event and `Lambda-Runtime-*` headers.
    Invocation(Arc<InvokeFrame>),
    /// 200, empty: `restore/next` returns after a restore.
    RestoreResumed,
    /// 202 `{"status":"OK"}`.
    Accepted,
    /// An error document with `status`.
    Error {
        /// HTTP status.
        status: u16,
        /// `errorType`.
        error_type: &'static str,
        /// `errorMessage`.
        message: String,
    },
}

impl ApiReply {
    /// 413 for a response over the payload limit.
    pub fn too_large() -> ApiReply {
        ApiReply::Error {
            status: 413,
            error_type: "RequestEntityTooLarge",
            message: format!("Exceeded maximum allowed payload size ({MAX_PAYLOAD} bytes)."),
        }
    }
}

/// Lambda's error document `{"errorMessage": message, "errorType": error_type}`.
pub fn lambda_error_body(error_type: &str, message: &str) -> Bytes {
    let doc = serde_json::json!({ "errorMessage": message, "errorType": error_type });
    Bytes::from(doc.to_string())
}

/// The host's failure for a response over the limit (Lambda's `Function.ResponseSizeTooLarge`).
pub fn response_too_large_failure(size: usize) -> Failure {
    let ty = "Function.ResponseSizeTooLarge";
    Failure::new(
        ty,
        lambda_error_body(
            ty,
            &format!(
                "Response payload size ({size} bytes) exceeded maximum allowed payload size ({MAX_PAYLOAD} bytes)."
            ),
        ),
    )
}

/// `Runtime.ExitError` for a runtime that exited during init or restore.
pub fn exit_failure(reason: &str) -> Failure {
    let ty = RUNTIME_EXIT_ERROR;
    Failure::new(ty, lambda_error_body(ty, reason))
}

/// `Runtime.ExitError` for invocation `request_id`, worded as Lambda words it.
pub fn invoke_exit_failure(request_id: &str, reason: &str) -> Failure {
    let ty = RUNTIME_EXIT_ERROR;
    Failure::new(
        ty,
        lambda_error_body(ty, &format!("RequestId: {request_id} Error: {reason}")),
    )
}

/// The error type Lambda records for a runtime's `Lambda-Runtime-Function-Error-Type`: kept when
/// it contains `Runtime.X...` or `Function.X...` (an upper-case letter, then letters), otherwise
/// `Function.Unknown` for a `Function.` prefix and `Runtime.Unknown` for anything else,
/// absence included. The runtime's own exception type stays in the error document.
pub fn valid_error_type(header: Option<&str>) -> String {
    let Some(value) = header else {
        return "Runtime.Unknown".to_owned();
    };
    let b = value.as_bytes();
    let shaped_at = |i: usize, prefix: &str| {
        let rest = &b[i..];
        rest.starts_with(prefix.as_bytes())
            && rest.get(prefix.len()).is_some_and(u8::is_ascii_uppercase)
            && rest
                .get(prefix.len() + 1)
                .is_some_and(u8::is_ascii_alphabetic)
    };
    if (0..b.len()).any(|i| shaped_at(i, "Runtime.") || shaped_at(i, "Function.")) {
        clamp(value.to_owned())
    } else if value.starts_with("Function.") {
        "Function.Unknown".to_owned()
    } else {
        "Runtime.Unknown".to_owned()
    }
}

/// The first field of `event` that cannot be an HTTP header value (control characters).
pub fn unsendable_header(event: &Invoke<'_>) -> Option<&'static str> {
    let bad = |s: &str| s.bytes().any(|c| (c < 0x20 && c != b'\t') || c == 0x7f);
    [
        ("request id", event.request_id),
        ("function ARN", event.function_arn),
        ("trace id", event.trace_id),
        ("client context", event.client_context),
        ("Cognito identity", event.cognito_identity),
    ]
    .into_iter()
    .find(|(_, v)| bad(v))
    .map(|(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_types_are_sanitized_as_lambda_does() {
        assert_eq!(valid_error_type(None), "Runtime.Unknown");
        assert_eq!(valid_error_type(Some("unhandled")), "Runtime.Unknown");
        assert_eq!(
            valid_error_type(Some("Runtime.AfterRestoreError")),
            "Runtime.AfterRestoreError"
        );
        assert_eq!(valid_error_type(Some("Function.x")), "Function.Unknown");
        assert_eq!(valid_error_type(Some("Function.Ab")), "Function.Ab");
        assert_eq!(valid_error_type(Some("My.Runtime.Err")), "My.Runtime.Err");
        assert_eq!(valid_error_type(Some("Runtime.A")), "Runtime.Unknown");
        let long = format!("Runtime.Long{}", "x".repeat(MAX_STRING));
        assert_eq!(valid_error_type(Some(&long)).len(), MAX_STRING);
    }

    #[test]
    fn error_documents_have_lambdas_shape() {
        let v: serde_json::Value =
            serde_json::from_slice(&response_too_large_failure(7_000_000).body).unwrap();
        assert_eq!(v["errorType"], "Function.ResponseSizeTooLarge");
        assert_eq!(
            v["errorMessage"],
            "Response payload size (7000000 bytes) exceeded maximum allowed payload size (6291456 bytes)."
        );
        let v: serde_json::Value = serde_json::from_slice(
            &invoke_exit_failure("r1", "Runtime exited with error: exit status 3").body,
        )
        .unwrap();
        assert_eq!(
            v["errorMessage"],
            "RequestId: r1 Error: Runtime exited with error: exit status 3"
        );
    }

    #[test]
    fn control_characters_cannot_be_headers() {
        let mut e = Invoke {
            request_id: "r",
            deadline_ms: 1,
            function_arn: "arn",
            client_context: "{\"a\":\"é\"}",
            ..Invoke::default()
        };
        assert_eq!(unsendable_header(&e), None);
        e.cognito_identity = "a\nb";
        assert_eq!(unsendable_header(&e), Some("Cognito identity"));
    }
}

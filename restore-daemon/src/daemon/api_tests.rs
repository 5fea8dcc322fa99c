//! Tests of the Invoke API over HTTP: names and ARNs, qualifiers, invocation types, headers,
//! payload limits and Lambda's errors, against a scripted backend.

use std::sync::Mutex;

use axum::http::Request as HttpRequest;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tower::ServiceExt;

use super::*;
use crate::daemon::front;

/// A backend that answers every call with one outcome and records what it was given.
struct Fake {
    outcome: Result<Completed, InvokeFailure>,
    invoked: Mutex<Vec<Invocation>>,
    queued: Mutex<Vec<Invocation>>,
    dry_runs: Mutex<Vec<(String, Option<String>)>>,
}

impl Fake {
    fn new(outcome: Result<Completed, InvokeFailure>) -> Arc<Self> {
        Arc::new(Self {
            outcome,
            invoked: Mutex::default(),
            queued: Mutex::default(),
            dry_runs: Mutex::default(),
        })
    }

    fn answering(payload: &str) -> Arc<Self> {
        Self::new(Ok(Completed {
            payload: payload.as_bytes().to_vec(),
            ..Completed::default()
        }))
    }

    fn failing(failure: InvokeFailure) -> Arc<Self> {
        Self::new(Err(failure))
    }

    fn invoked(&self) -> Vec<Invocation> {
        self.invoked.lock().unwrap().clone()
    }

    fn queued(&self) -> Vec<Invocation> {
        self.queued.lock().unwrap().clone()
    }

    fn dry_runs(&self) -> Vec<(String, Option<String>)> {
        self.dry_runs.lock().unwrap().clone()
    }

    fn calls(&self) -> usize {
        self.invoked().len() + self.queued().len() + self.dry_runs().len()
    }
}

impl Backend for Fake {
    async fn invoke(&self, invocation: Invocation) -> Result<Completed, InvokeFailure> {
        self.invoked.lock().unwrap().push(invocation);
        self.outcome.clone()
    }

    async fn enqueue(&self, invocation: Invocation) -> Result<(), InvokeFailure> {
        self.queued.lock().unwrap().push(invocation);
        self.outcome.clone().map(drop)
    }

    fn dry_run(&self, function: &str, qualifier: Option<&str>) -> Result<(), InvokeFailure> {
        let call = (function.to_owned(), qualifier.map(str::to_owned));
        self.dry_runs.lock().unwrap().push(call);
        self.outcome.clone().map(drop)
    }

    fn metrics_text(&self) -> String {
        "# EOF\n".to_owned()
    }
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|value| value.to_str().unwrap())
    }

    fn json(&self) -> serde_json::Value {
        assert_eq!(self.header("content-type"), Some("application/json"));
        serde_json::from_slice(&self.body).unwrap()
    }

    /// Checks a Lambda error answer: status, `x-amzn-ErrorType`, request id, JSON body.
    fn assert_error(&self, status: StatusCode, code: &str) -> serde_json::Value {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("x-amzn-errortype"), Some(code), "{self:?}");
        assert_request_id(self.header("x-amzn-requestid").unwrap());
        self.json()
    }
}

async fn send(backend: &Arc<Fake>, request: HttpRequest<Body>) -> Answer {
    let response = router(backend.clone()).oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

fn invoke_request(
    function: &str,
    headers: &[(&str, &str)],
    payload: impl Into<Body>,
) -> HttpRequest<Body> {
    let (name, query) = function.split_once('?').unwrap_or((function, ""));
    let mut uri = format!("/2015-03-31/functions/{name}/invocations");
    if !query.is_empty() {
        uri = format!("{uri}?{query}");
    }
    let mut builder = HttpRequest::post(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(payload.into()).unwrap()
}

async fn invoke_with(
    backend: &Arc<Fake>,
    function: &str,
    headers: &[(&str, &str)],
    payload: &str,
) -> Answer {
    send(
        backend,
        invoke_request(function, headers, payload.to_owned()),
    )
    .await
}

fn assert_request_id(id: &str) {
    assert_eq!(id.len(), 36, "{id}");
    for (index, c) in id.chars().enumerate() {
        match index {
            8 | 13 | 18 | 23 => assert_eq!(c, '-', "{id}"),
            14 => assert_eq!(c, '4', "{id}"),
            _ => assert!(c.is_ascii_hexdigit() && !c.is_ascii_uppercase(), "{id}"),
        }
    }
}

/// A JSON string of exactly `length` bytes.
fn json_of_length(length: usize) -> Vec<u8> {
    let mut payload = vec![b'a'; length];
    payload[0] = b'"';
    payload[length - 1] = b'"';
    payload
}

#[tokio::test]
async fn request_response_returns_the_payload() {
    let backend = Fake::answering(r#"{"ok":true}"#);
    let answer = invoke_with(&backend, "hello", &[], r#"{"n":1}"#).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json(), serde_json::json!({ "ok": true }));
    assert_eq!(answer.header("x-amz-executed-version"), Some("$LATEST"));
    assert_eq!(answer.header("x-amz-function-error"), None);
    assert_eq!(answer.header("x-amz-log-result"), None);

    let [invocation] = backend.invoked().try_into().unwrap();
    assert_eq!(invocation.function, "hello");
    assert_eq!(invocation.qualifier, None);
    assert_eq!(&invocation.payload[..], br#"{"n":1}"#);
    assert!(!invocation.tail_logs);
    assert_eq!(invocation.client_context, None);
    assert_eq!(
        answer.header("x-amzn-requestid"),
        Some(invocation.request_id.as_str())
    );
    assert_request_id(&invocation.request_id);
}

#[tokio::test]
async fn explicit_request_response_and_empty_payload() {
    let backend = Fake::answering("null");
    let headers = [("X-Amz-Invocation-Type", "RequestResponse")];
    let answer = invoke_with(&backend, "hello", &headers, "").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(&answer.body[..], b"null");
    assert!(backend.invoked()[0].payload.is_empty());
}

#[tokio::test]
async fn function_error_without_tail() {
    let backend = Fake::new(Ok(Completed {
        payload: br#"{"errorType":"Boom","errorMessage":"no"}"#.to_vec(),
        function_error: true,
        log_tail: None,
    }));
    let answer = invoke_with(&backend, "hello", &[], "{}").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("x-amz-function-error"), Some("Unhandled"));
    assert_eq!(answer.header("x-amz-log-result"), None);
    assert_eq!(answer.json()["errorType"], "Boom");
}

#[tokio::test]
async fn function_error_with_tail() {
    let log = b"START RequestId: x\nboom\nEND\n".to_vec();
    let backend = Fake::new(Ok(Completed {
        payload: br#"{"errorType":"Boom"}"#.to_vec(),
        function_error: true,
        log_tail: Some(log.clone()),
    }));
    let answer = invoke_with(&backend, "hello", &[("X-Amz-Log-Type", "Tail")], "{}").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("x-amz-function-error"), Some("Unhandled"));
    let tail = base64::engine::general_purpose::STANDARD
        .decode(answer.header("x-amz-log-result").unwrap())
        .unwrap();
    assert_eq!(tail, log);
    assert!(backend.invoked()[0].tail_logs);
}

#[tokio::test]
async fn tail_is_the_last_4_kb_and_only_when_asked() {
    let log: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let backend = Fake::new(Ok(Completed {
        payload: b"1".to_vec(),
        function_error: false,
        log_tail: Some(log.clone()),
    }));
    let answer = invoke_with(&backend, "f", &[("X-Amz-Log-Type", "Tail")], "1").await;
    let tail = base64::engine::general_purpose::STANDARD
        .decode(answer.header("x-amz-log-result").unwrap())
        .unwrap();
    assert_eq!(tail, &log[log.len() - 4096..]);
    assert_eq!(answer.header("x-amz-function-error"), None);

    let answer = invoke_with(&backend, "f", &[("X-Amz-Log-Type", "None")], "1").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("x-amz-log-result"), None);
}

#[tokio::test]
async fn event_is_queued_and_answered_202() {
    let backend = Fake::answering("unused");
    let context = base64::engine::general_purpose::STANDARD.encode(r#"{"custom":{}}"#);
    let headers = [
        ("X-Amz-Invocation-Type", "Event"),
        ("X-Amz-Log-Type", "Tail"),
        ("X-Amz-Client-Context", context.as_str()),
    ];
    let answer = invoke_with(&backend, "hello", &headers, r#"{"e":1}"#).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert!(answer.body.is_empty());
    assert_request_id(answer.header("x-amzn-requestid").unwrap());

    let [queued] = backend.queued().try_into().unwrap();
    assert_eq!(queued.function, "hello");
    assert_eq!(&queued.payload[..], br#"{"e":1}"#);
    assert!(!queued.tail_logs);
    assert_eq!(queued.client_context, None);
    assert_eq!(
        answer.header("x-amzn-requestid"),
        Some(queued.request_id.as_str())
    );
    assert!(backend.invoked().is_empty());
}

#[tokio::test]
async fn dry_run_is_answered_204() {
    let backend = Fake::answering("unused");
    let headers = [("X-Amz-Invocation-Type", "DryRun")];
    let answer = invoke_with(&backend, "hello?Qualifier=%24LATEST", &headers, "").await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT);
    assert!(answer.body.is_empty());
    assert_eq!(
        backend.dry_runs(),
        [("hello".to_owned(), Some("$LATEST".to_owned()))]
    );
    assert_eq!(backend.calls(), 1);
}

#[tokio::test]
async fn unknown_invocation_type_is_a_validation_error() {
    let backend = Fake::answering("unused");
    for bad in ["Sync", "event", ""] {
        let headers = [("X-Amz-Invocation-Type", bad)];
        let answer = invoke_with(&backend, "hello", &headers, "{}").await;
        let body = answer.assert_error(StatusCode::BAD_REQUEST, "ValidationException");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("invocationType"), "{message}");
        assert!(message.contains(&format!("'{bad}'")), "{message}");
    }
    let headers = [("X-Amz-Log-Type", "Head")];
    let answer = invoke_with(&backend, "hello", &headers, "{}").await;
    let body = answer.assert_error(StatusCode::BAD_REQUEST, "ValidationException");
    assert!(body["message"].as_str().unwrap().contains("logType"));
    assert_eq!(backend.calls(), 0);
}

fn failures() -> Vec<(InvokeFailure, StatusCode, &'static str, serde_json::Value)> {
    let user = |message: &str| serde_json::json!({ "Type": "User", "message": message });
    vec![
        (
            InvokeFailure::NotFound {
                arn: "arn:aws:lambda:local:000000000000:function:nope".to_owned(),
            },
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            serde_json::json!({
                "Type": "User",
                "Message": "Function not found: arn:aws:lambda:local:000000000000:function:nope",
            }),
        ),
        (
            InvokeFailure::Throttled {
                reason: ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded,
            },
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequestsException",
            serde_json::json!({
                "Type": "User",
                "message": "Rate Exceeded.",
                "Reason": "ReservedFunctionConcurrentInvocationLimitExceeded",
            }),
        ),
        (
            InvokeFailure::Throttled {
                reason: ThrottleReason::ConcurrentInvocationLimitExceeded,
            },
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequestsException",
            serde_json::json!({
                "Type": "User",
                "message": "Rate Exceeded.",
                "Reason": "ConcurrentInvocationLimitExceeded",
            }),
        ),
        (
            InvokeFailure::TooLarge {
                limit: 10,
                kind: "InvokeFunction",
            },
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLargeException",
            user("Request must be smaller than 10 bytes for the InvokeFunction operation"),
        ),
        (
            InvokeFailure::InvalidRequest {
                message: "bad header".to_owned(),
            },
            StatusCode::BAD_REQUEST,
            "InvalidRequestContentException",
            user("bad header"),
        ),
        (
            InvokeFailure::Service {
                message: "worker died".to_owned(),
            },
            StatusCode::INTERNAL_SERVER_ERROR,
            "ServiceException",
            serde_json::json!({ "Type": "Service", "Message": "worker died" }),
        ),
    ]
}

#[tokio::test]
async fn every_failure_has_its_status_code_and_body() {
    let kinds = ["RequestResponse", "Event", "DryRun"];
    for (failure, status, code, body) in failures() {
        for kind in kinds {
            let backend = Fake::failing(failure.clone());
            let headers = [("X-Amz-Invocation-Type", kind)];
            let answer = invoke_with(&backend, "hello", &headers, "{}").await;
            assert_eq!(
                answer.assert_error(status, code),
                body,
                "{failure:?} {kind}"
            );
            assert_eq!(answer.header("x-amz-function-error"), None);
            assert_eq!(backend.calls(), 1);
        }
    }
}

#[tokio::test]
async fn throttle_reasons_use_lambdas_spelling() {
    let backend = Fake::failing(InvokeFailure::Throttled {
        reason: ThrottleReason::EventQueueFull,
    });
    let answer = invoke_with(&backend, "f", &[("X-Amz-Invocation-Type", "Event")], "1").await;
    let body = answer.assert_error(StatusCode::TOO_MANY_REQUESTS, "TooManyRequestsException");
    assert_eq!(
        body["Reason"],
        ThrottleReason::EventQueueFull.as_str(),
        "{body}"
    );
}

#[tokio::test]
async fn function_names_and_arns_reduce_to_the_name() {
    let cases: [(&str, &str, Option<&str>); 12] = [
        ("my-function", "my-function", None),
        ("my_function.v2", "my_function.v2", None),
        ("my-function:prod", "my-function", Some("prod")),
        ("my-function:$LATEST", "my-function", Some("$LATEST")),
        ("123456789012:function:my-function", "my-function", None),
        (
            "123456789012:function:my-function:7",
            "my-function",
            Some("7"),
        ),
        (
            "arn:aws:lambda:us-west-2:123456789012:function:my-function",
            "my-function",
            None,
        ),
        (
            "arn:aws:lambda:us-west-2:123456789012:function:my-function:$LATEST",
            "my-function",
            Some("$LATEST"),
        ),
        (
            "arn:aws-us-gov:lambda:us-gov-west-1:123456789012:function:f:live",
            "f",
            Some("live"),
        ),
        (
            "arn%3Aaws%3Alambda%3Aeu-central-1%3A123456789012%3Afunction%3Af%3A%24LATEST",
            "f",
            Some("$LATEST"),
        ),
        ("function:f", "f", None),
        ("us-east-1", "us-east-1", None),
    ];
    for (raw, name, qualifier) in cases {
        let backend = Fake::answering("1");
        let answer = invoke_with(&backend, raw, &[], "1").await;
        assert_eq!(answer.status, StatusCode::OK, "{raw}: {answer:?}");
        let [invocation] = backend.invoked().try_into().unwrap();
        assert_eq!(invocation.function, name, "{raw}");
        assert_eq!(invocation.qualifier.as_deref(), qualifier, "{raw}");
    }
}

#[tokio::test]
async fn qualifier_query_parameter() {
    let backend = Fake::answering("1");
    let answer = invoke_with(&backend, "f?Qualifier=%24LATEST", &[], "1").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(backend.invoked()[0].qualifier.as_deref(), Some("$LATEST"));

    let backend = Fake::answering("1");
    let answer = invoke_with(&backend, "f:live?Qualifier=live", &[], "1").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(backend.invoked()[0].qualifier.as_deref(), Some("live"));

    let backend = Fake::answering("1");
    let answer = invoke_with(&backend, "f:live?Qualifier=%24LATEST", &[], "1").await;
    let body = answer.assert_error(StatusCode::BAD_REQUEST, "InvalidParameterValueException");
    assert_eq!(body["Type"], "User");
    assert!(body["message"].as_str().unwrap().contains("qualifier"));

    for bad in ["", "a.b", "has%20space"] {
        let answer = invoke_with(&backend, &format!("f?Qualifier={bad}"), &[], "1").await;
        answer.assert_error(StatusCode::BAD_REQUEST, "ValidationException");
    }
    assert_eq!(backend.calls(), 0);
}

#[tokio::test]
async fn malformed_function_names_are_validation_errors() {
    let long = "f".repeat(257);
    let bad = [
        "a%20b",
        "f:g:h",
        "arn:aws:s3:us-east-1:123456789012:function:f",
        "f:",
        "%FF",
        long.as_str(),
    ];
    let backend = Fake::answering("1");
    for raw in bad {
        let answer = invoke_with(&backend, raw, &[], "1").await;
        let body = answer.assert_error(StatusCode::BAD_REQUEST, "ValidationException");
        assert!(
            body["message"].as_str().unwrap().contains("functionName"),
            "{raw}: {body}"
        );
    }
    assert_eq!(backend.calls(), 0);
}

#[tokio::test]
async fn client_context_is_checked_and_passed_on() {
    let encoded = base64::engine::general_purpose::STANDARD
        .encode(r#"{"custom":{"k":"v"},"env":{},"client":{}}"#);
    let backend = Fake::answering("1");
    let headers = [("X-Amz-Client-Context", encoded.as_str())];
    let answer = invoke_with(&backend, "f", &headers, "1").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        backend.invoked()[0].client_context.as_deref(),
        Some(encoded.as_str())
    );

    let not_object = base64::engine::general_purpose::STANDARD.encode("[1]");
    let too_long = "A".repeat(4000);
    for bad in ["%%%not base64", not_object.as_str(), too_long.as_str()] {
        let backend = Fake::answering("1");
        let headers = [("X-Amz-Client-Context", bad)];
        let answer = invoke_with(&backend, "f", &headers, "1").await;
        let body = answer.assert_error(StatusCode::BAD_REQUEST, "InvalidRequestContentException");
        assert!(body["message"].as_str().unwrap().contains("Client context"));
        assert_eq!(backend.calls(), 0);
    }
}

#[tokio::test]
async fn payload_must_be_json() {
    let backend = Fake::answering("1");
    // The last: invalid UTF-8 inside a JSON string, answered 200 before (issue 14, defect 11).
    let bad: [&[u8]; 4] = [b"hello", b"{\"a\":", b"{} {}", b"{\"a\":\"\xff\xfe\"}"];
    for bad in bad {
        let answer = send(&backend, invoke_request("f", &[], bad.to_vec())).await;
        let body = answer.assert_error(StatusCode::BAD_REQUEST, "InvalidRequestContentException");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .starts_with("Could not parse")
        );
    }
    for good in ["\"text\"", "42", " [1, 2] \n"] {
        let answer = invoke_with(&backend, "f", &[], good).await;
        assert_eq!(answer.status, StatusCode::OK, "{good}");
    }
    assert_eq!(backend.calls(), 3);
}

#[tokio::test]
async fn sync_payload_limit_is_6_mb() {
    let backend = Fake::answering("1");
    let exact = json_of_length(MAX_SYNC_PAYLOAD);
    let answer = send(&backend, invoke_request("f", &[], exact)).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(backend.invoked()[0].payload.len(), MAX_SYNC_PAYLOAD);

    for kind in ["RequestResponse", "DryRun"] {
        let over = json_of_length(MAX_SYNC_PAYLOAD + 1);
        let length = over.len().to_string();
        // Once with the length announced, once found while reading.
        for headers in [
            vec![
                ("X-Amz-Invocation-Type", kind),
                ("content-length", length.as_str()),
            ],
            vec![("X-Amz-Invocation-Type", kind)],
        ] {
            let answer = send(&backend, invoke_request("f", &headers, over.clone())).await;
            let body =
                answer.assert_error(StatusCode::PAYLOAD_TOO_LARGE, "RequestTooLargeException");
            assert_eq!(
                body,
                serde_json::json!({
                    "Type": "User",
                    "message": "Request must be smaller than 6291456 bytes for the \
                                InvokeFunction operation",
                })
            );
        }
    }
    assert_eq!(backend.calls(), 1);
}

#[tokio::test]
async fn event_payload_limit_is_256_kb() {
    let backend = Fake::answering("1");
    let event = [("X-Amz-Invocation-Type", "Event")];
    let exact = json_of_length(MAX_EVENT_PAYLOAD);
    let answer = send(&backend, invoke_request("f", &event, exact)).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);

    let over = json_of_length(MAX_EVENT_PAYLOAD + 1);
    let answer = send(&backend, invoke_request("f", &event, over)).await;
    let body = answer.assert_error(StatusCode::PAYLOAD_TOO_LARGE, "RequestTooLargeException");
    assert_eq!(
        body["message"],
        "Request must be smaller than 262144 bytes for the InvokeAsync operation"
    );
    assert_eq!(backend.queued().len(), 1);
}

#[tokio::test]
async fn request_ids_are_fresh() {
    let backend = Fake::answering("1");
    let first = invoke_with(&backend, "f", &[], "1").await;
    let second = invoke_with(&backend, "f", &[], "1").await;
    let first = first.header("x-amzn-requestid").unwrap();
    let second = second.header("x-amzn-requestid").unwrap();
    assert_request_id(first);
    assert_request_id(second);
    assert_ne!(first, second);
}

#[tokio::test]
async fn unknown_routes_and_methods() {
    let backend = Fake::answering("1");
    for uri in [
        "/",
        "/2015-03-31/functions",
        "/2015-03-31/functions/f/invocations/extra",
        "/2014-11-13/functions/f/invoke-async/",
    ] {
        let request = HttpRequest::post(uri).body(Body::from("{}")).unwrap();
        let answer = send(&backend, request).await;
        let body = answer.assert_error(StatusCode::NOT_FOUND, "UnknownOperationException");
        assert!(body["message"].is_string());
    }

    let request = HttpRequest::get("/2015-03-31/functions/f/invocations")
        .body(Body::empty())
        .unwrap();
    let answer = send(&backend, request).await;
    answer.assert_error(StatusCode::METHOD_NOT_ALLOWED, "UnknownOperationException");
    assert_eq!(answer.header("allow"), Some("POST"));

    let request = HttpRequest::post("/metrics").body(Body::empty()).unwrap();
    let answer = send(&backend, request).await;
    answer.assert_error(StatusCode::METHOD_NOT_ALLOWED, "UnknownOperationException");
    assert_eq!(backend.calls(), 0);
}

#[tokio::test]
async fn metrics_page() {
    let backend = Fake::answering("1");
    let request = HttpRequest::get("/metrics").body(Body::empty()).unwrap();
    let answer = send(&backend, request).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("content-type"), Some(METRICS_CONTENT_TYPE));
    assert_eq!(&answer.body[..], b"# EOF\n");
    assert_request_id(answer.header("x-amzn-requestid").unwrap());
}

/// Sends one raw HTTP/1.1 request (asking the server to close afterwards) and returns the
/// whole raw answer.
async fn exchange(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    head: &str,
    body: &[u8],
) -> String {
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn over_tcp_an_oversized_body_still_gets_its_413() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let backend = Fake::answering(r#"{"ok":1}"#);
    let backend_ = backend.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let stopped = async {
            let _ = stopped.await;
        };
        front::serve(listener, router(backend_), &FrontLimits::default(), stopped).await;
    });

    // As boto3 does: the whole body is written before the answer is read.
    let over = json_of_length(MAX_SYNC_PAYLOAD + 100);
    let head = format!(
        "POST /2015-03-31/functions/f/invocations HTTP/1.1\r\nhost: x\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n",
        over.len()
    );
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let answer = exchange(stream, &head, &over).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("x-amzn-errortype: RequestTooLargeException"));
    assert!(answer.contains("x-amzn-requestid: "));

    let head = "POST /2015-03-31/functions/f/invocations HTTP/1.1\r\nhost: x\r\n\
                connection: close\r\ncontent-length: 2\r\n\r\n";
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let answer = exchange(stream, head, b"{}").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with(r#"{"ok":1}"#), "{answer}");

    stop.send(()).unwrap();
    server.await.unwrap();
    assert_eq!(backend.calls(), 1);
}

#[tokio::test]
async fn over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("thawd.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let stopped = async {
            let _ = stopped.await;
        };
        let router = router(Fake::answering("1"));
        front::serve(listener, router, &FrontLimits::default(), stopped).await;
    });

    let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    let head = "GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    let answer = exchange(stream, head, b"").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(METRICS_CONTENT_TYPE), "{answer}");

    stop.send(()).unwrap();
    server.await.unwrap();
}

#[test]
fn region_shapes() {
    for region in [
        "us-east-1",
        "us-gov-west-1",
        "us-iso-east-1",
        "us-isob-east-1",
    ] {
        assert!(is_region(region), "{region}");
    }
    for not_region in [
        "us-east",
        "use-east-1",
        "us-east-12",
        "us-isoab-east-1",
        "US-east-1",
    ] {
        assert!(!is_region(not_region), "{not_region}");
    }
}

//! Fuzzing thawd's request handling with proptest on the stable toolchain (docs/fuzzing.md):
//! the Invoke API's router (`restore_daemon::daemon::api::router`) in front of a fake
//! `Backend`, driven with `tower::ServiceExt::oneshot` (no socket: HTTP framing is hyper's).
//!
//! The seed corpus is generated: valid invocations in every form the docs give (names,
//! qualifiers, partial and full ARNs, percent-encoded or not; `?Qualifier=`; each invocation
//! and log type; client contexts; JSON payloads up to and over each limit, in one or several
//! body frames), answered by the fake backend with each outcome and failure. Arbitrary requests
//! mix those parts with garbage: any method, paths and query strings with stray and invalid
//! percent-escapes, header values that are not text, bodies that are not JSON or not UTF-8,
//! `Content-Length` values that lie, bodies that fail midway.
//!
//! Properties: no request panics the router; every answer has a status Lambda uses, a fresh
//! `x-amzn-RequestId`, and, for 4xx/5xx, `x-amzn-ErrorType` with the status it goes with and a
//! JSON body with a message; a request reaches the backend only when it is a well-formed
//! invocation, once, with exactly the payload sent; a valid invocation always reaches it and is
//! answered as the backend's outcome says (docs/thawd.md, "Invoke API"); memory held is at most
//! twice the payload limit.
//!
//! Cases per property: `PROPTEST_CASES` (default: the short CI run, [`CASES`]).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use base64::Engine as _;
use http_body_util::BodyExt;
use hyper::body::Frame;
use proptest::prelude::*;
use restore_daemon::daemon::api::router;
use restore_daemon::daemon::{
    Backend, Completed, Invocation, InvokeFailure, MAX_EVENT_PAYLOAD, MAX_SYNC_PAYLOAD,
    ThrottleReason,
};
use tower::ServiceExt;

#[macro_use]
#[path = "../../tests/fuzz_harness/mod.rs"]
mod fuzz_harness;

use fuzz_harness::Measured;

/// Cases per property in the short run (`cargo test`).
const CASES: u32 = 1000;

// ---------------------------------------------------------------------------------------------
// The fake backend.

#[derive(Clone, Debug)]
enum Call {
    Invoke(Invocation),
    Enqueue(Invocation),
    DryRun(String, Option<String>),
}

struct Fake {
    outcome: Result<Completed, InvokeFailure>,
    calls: Mutex<Vec<Call>>,
}

const METRICS: &str = "# TYPE thawd_fuzz counter\nthawd_fuzz_total 1\n# EOF\n";

impl Backend for Fake {
    async fn invoke(&self, invocation: Invocation) -> Result<Completed, InvokeFailure> {
        self.calls.lock().unwrap().push(Call::Invoke(invocation));
        self.outcome.clone()
    }

    async fn enqueue(&self, invocation: Invocation) -> Result<(), InvokeFailure> {
        self.calls.lock().unwrap().push(Call::Enqueue(invocation));
        self.outcome.clone().map(drop)
    }

    fn dry_run(&self, function: &str, qualifier: Option<&str>) -> Result<(), InvokeFailure> {
        let call = Call::DryRun(function.to_owned(), qualifier.map(str::to_owned));
        self.calls.lock().unwrap().push(call);
        self.outcome.clone().map(drop)
    }

    fn metrics_text(&self) -> String {
        METRICS.to_owned()
    }
}

fn outcome() -> impl Strategy<Value = Result<Completed, InvokeFailure>> {
    let message = prop_oneof![
        "\\PC{0,30}",
        Just("quote \" backslash \\ newline \n nul \u{0} end".to_owned()),
    ];
    let reason = prop_oneof![
        Just(ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded),
        Just(ThrottleReason::ConcurrentInvocationLimitExceeded),
        Just(ThrottleReason::EventQueueFull),
    ];
    let completed = (
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..40),
            Just(br#"{"errorType":"E","errorMessage":"m"}"#.to_vec()),
        ],
        any::<bool>(),
        proptest::option::of(prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            (4000usize..4200).prop_map(|n| (0..n).map(|i| (i % 251) as u8).collect()),
        ]),
    )
        .prop_map(|(payload, function_error, log_tail)| Completed {
            payload,
            function_error,
            log_tail,
        });
    prop_oneof![
        6 => completed.prop_map(Ok),
        1 => message.clone().prop_map(|arn| Err(InvokeFailure::NotFound { arn })),
        1 => reason.prop_map(|reason| Err(InvokeFailure::Throttled { reason })),
        1 => prop_oneof![
            Just((MAX_SYNC_PAYLOAD, "InvokeFunction")),
            Just((MAX_EVENT_PAYLOAD, "InvokeAsync"))
        ]
        .prop_map(|(limit, kind)| Err(InvokeFailure::TooLarge { limit, kind })),
        1 => message.clone().prop_map(|message| Err(InvokeFailure::InvalidRequest { message })),
        1 => message.prop_map(|message| Err(InvokeFailure::Service { message })),
    ]
}

// ---------------------------------------------------------------------------------------------
// Request bodies: in one or several frames, possibly failing midway.

struct Frames {
    chunks: VecDeque<Bytes>,
    fail: bool,
    trailers: bool,
}

impl HttpBody for Frames {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if let Some(chunk) = this.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if std::mem::take(&mut this.fail) {
            return Poll::Ready(Some(Err(std::io::Error::other("the client went away"))));
        }
        if std::mem::take(&mut this.trailers) {
            return Poll::Ready(Some(Ok(Frame::trailers(HeaderMap::new()))));
        }
        Poll::Ready(None)
    }
}

/// How a payload is sent.
#[derive(Clone, Debug)]
struct Delivery {
    /// Cut points (fractions of the payload) between body frames.
    cuts: Vec<u64>,
    /// The body fails after its data.
    fail: bool,
    trailers: bool,
    /// `Content-Length`: absent, true, or a lie.
    length: Length,
    /// `Expect: 100-continue`.
    expect: bool,
}

#[derive(Clone, Debug)]
enum Length {
    Absent,
    True,
    Claim(String),
}

fn delivery(may_fail: bool) -> impl Strategy<Value = Delivery> {
    let length = prop_oneof![
        3 => Just(Length::Absent),
        3 => Just(Length::True),
        1 => prop_oneof![
            Just(u64::MAX.to_string()),
            Just((MAX_SYNC_PAYLOAD + 1).to_string()),
            Just((MAX_EVENT_PAYLOAD + 1).to_string()),
            Just("18446744073709551616".to_owned()),
            Just("-1".to_owned()),
            Just("0".to_owned()),
            Just(" 12".to_owned()),
            (0u64..100).prop_map(|n| n.to_string()),
        ]
        .prop_map(Length::Claim),
    ];
    (
        proptest::collection::vec(any::<u64>(), 0..4),
        if may_fail {
            prop_oneof![5 => Just(false), 1 => Just(true)].boxed()
        } else {
            Just(false).boxed()
        },
        any::<bool>(),
        if may_fail {
            length.boxed()
        } else {
            prop_oneof![Just(Length::Absent), Just(Length::True)].boxed()
        },
        prop_oneof![5 => Just(false), 1 => Just(true)],
    )
        .prop_map(|(cuts, fail, trailers, length, expect)| Delivery {
            cuts,
            fail,
            trailers,
            length,
            expect,
        })
}

fn body(payload: &Bytes, delivery: &Delivery) -> Body {
    let mut cuts: Vec<usize> = delivery
        .cuts
        .iter()
        .map(|c| ((payload.len() as u128 * u128::from(*c)) >> 64) as usize)
        .collect();
    cuts.sort_unstable();
    let mut chunks = VecDeque::new();
    let mut at = 0;
    for cut in cuts.into_iter().chain([payload.len()]) {
        if cut > at || (cut == payload.len() && chunks.is_empty()) {
            chunks.push_back(payload.slice(at..cut));
            at = cut;
        }
    }
    Body::new(Frames {
        chunks,
        fail: delivery.fail,
        trailers: delivery.trailers,
    })
}

// ---------------------------------------------------------------------------------------------
// Valid invocations.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    RequestResponse,
    Event,
    DryRun,
}

impl Kind {
    fn limit(self) -> usize {
        match self {
            Kind::Event => MAX_EVENT_PAYLOAD,
            _ => MAX_SYNC_PAYLOAD,
        }
    }
}

#[derive(Clone, Debug)]
struct ValidInvocation {
    /// The `FunctionName` path segment as sent (percent-encoded in places or not).
    raw_name: String,
    function: String,
    qualifier: Option<String>,
    query: Option<String>,
    kind: Kind,
    /// Whether `X-Amz-Invocation-Type` is sent for a `RequestResponse`.
    explicit_kind: bool,
    log_type: Option<&'static str>,
    client_context: Option<String>,
    payload: Bytes,
    delivery: Delivery,
}

/// Names with an underscore, so none is also a region, an account, `arn` or `function`: the
/// oracle then knows how the name parses.
fn function_name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9.-]{0,12}_[a-zA-Z0-9_.-]{0,12}"
}

fn qualifier() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("$LATEST".to_owned()),
        Just("$LATEST.PUBLISHED".to_owned()),
        "[a-zA-Z0-9_-]{1,12}",
    ]
}

fn arn_prefix() -> impl Strategy<Value = String> {
    let partition = prop_oneof![Just(""), Just("aws"), Just("aws-cn"), Just("aws-us-gov")];
    let region = || {
        prop_oneof![
            Just("us-east-1"),
            Just("eu-west-2"),
            Just("us-gov-west-1"),
            Just("us-iso-east-1"),
            Just("us-isob-east-1"),
        ]
    };
    let account = "[0-9]{12}";
    prop_oneof![
        Just(String::new()),
        account.prop_map(|a| format!("{a}:function:")),
        account.prop_map(|a| format!("{a}:")),
        Just("function:".to_owned()),
        (partition, region(), account)
            .prop_map(|(p, r, a)| format!("arn:{p}:lambda:{r}:{a}:function:")),
        region().prop_map(|r| format!("{r}:function:")),
    ]
}

/// Percent-encodes some of the characters that may also go as they are.
fn encode_some(raw: &str, mask: u64) -> String {
    raw.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask & (1 << (i % 64)) != 0 && c.is_ascii() {
                format!("%{:02X}", c as u8)
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::String),
        Just(Value::String("\u{0}\"\\\n\u{1f600}".to_owned())),
    ];
    leaf.prop_recursive(4, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map("\\PC{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A JSON string of exactly `length` bytes.
fn json_of_length(length: usize) -> Vec<u8> {
    let mut payload = vec![b'a'; length];
    payload[0] = b'"';
    payload[length - 1] = b'"';
    payload
}

fn valid_payload() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        1 => Just(Bytes::new()),
        12 => (json_value(), any::<bool>()).prop_map(|(v, pretty)| {
            Bytes::from(if pretty {
                serde_json::to_vec_pretty(&v).unwrap()
            } else {
                serde_json::to_vec(&v).unwrap()
            })
        }),
        1 => prop_oneof![
            Just(MAX_EVENT_PAYLOAD - 1),
            Just(MAX_EVENT_PAYLOAD),
            Just(MAX_SYNC_PAYLOAD),
        ]
        .prop_map(|n| Bytes::from(json_of_length(n))),
    ]
}

fn client_context() -> impl Strategy<Value = Option<String>> {
    let object = proptest::collection::btree_map("[a-z]{1,8}", "\\PC{0,16}", 0..4).prop_map(|m| {
        let json = serde_json::to_vec(&m).unwrap();
        base64::engine::general_purpose::STANDARD.encode(json)
    });
    proptest::option::of(object)
}

fn valid_invocation() -> impl Strategy<Value = ValidInvocation> {
    let kind = prop_oneof![
        4 => Just(Kind::RequestResponse),
        2 => Just(Kind::Event),
        1 => Just(Kind::DryRun),
    ];
    (
        (
            arn_prefix(),
            function_name(),
            proptest::option::of(qualifier()),
        ),
        any::<u64>(),
        (0u8..3, qualifier()),
        (kind, any::<bool>()),
        prop_oneof![Just(None), Just(Some("None")), Just(Some("Tail"))],
        client_context(),
        valid_payload(),
        delivery(false),
    )
        .prop_map(
            |(
                (prefix, function, in_name),
                mask,
                (query_form, in_query),
                (kind, explicit_kind),
                log_type,
                client_context,
                payload,
                delivery,
            )| {
                let mut raw = format!("{prefix}{function}");
                if let Some(q) = &in_name {
                    raw = format!("{raw}:{q}");
                }
                // The query names no qualifier, the name's own, or one when the name has none.
                let query_qualifier = match (query_form, &in_name) {
                    (1, Some(q)) => Some(q.clone()),
                    (2, None) => Some(in_query),
                    _ => None,
                };
                let query = query_qualifier
                    .as_ref()
                    .map(|q| format!("Qualifier={}", encode_some(q, mask.rotate_left(7))));
                // Payloads over the limit of their kind are for the other property.
                let payload = if payload.len() > kind.limit() {
                    Bytes::from_static(b"{}")
                } else {
                    payload
                };
                ValidInvocation {
                    raw_name: encode_some(&raw, mask),
                    function,
                    qualifier: in_name.or(query_qualifier),
                    query,
                    kind,
                    explicit_kind,
                    log_type,
                    client_context,
                    payload,
                    delivery,
                }
            },
        )
}

impl ValidInvocation {
    fn request(&self) -> Request<Body> {
        let mut uri = format!("/2015-03-31/functions/{}/invocations", self.raw_name);
        if let Some(q) = &self.query {
            uri = format!("{uri}?{q}");
        }
        let mut builder = Request::post(uri);
        let kind = match self.kind {
            Kind::RequestResponse => self.explicit_kind.then_some("RequestResponse"),
            Kind::Event => Some("Event"),
            Kind::DryRun => Some("DryRun"),
        };
        if let Some(kind) = kind {
            builder = builder.header("X-Amz-Invocation-Type", kind);
        }
        if let Some(log) = self.log_type {
            builder = builder.header("X-Amz-Log-Type", log);
        }
        if let Some(context) = &self.client_context {
            builder = builder.header("X-Amz-Client-Context", context);
        }
        if matches!(self.delivery.length, Length::True) {
            builder = builder.header("Content-Length", self.payload.len());
        }
        if self.delivery.expect {
            builder = builder.header("Expect", "100-continue");
        }
        builder.body(body(&self.payload, &self.delivery)).unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// Answers.

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

fn send(backend: &Arc<Fake>, request: Request<Body>) -> Answer {
    runtime().block_on(async {
        let response = router(backend.clone()).oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    })
}

fn is_request_id(id: &str) -> bool {
    id.len() == 36
        && id.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            14 => c == '4',
            19 => matches!(c, '8' | '9' | 'a' | 'b'),
            _ => c.is_ascii_hexdigit() && !c.is_ascii_uppercase(),
        })
}

/// What every answer must be: a status Lambda uses, a request id, and for an error its code
/// (the one that goes with the status) and a JSON body with a message. Returns the code.
fn check_shape<'a>(answer: &'a Answer, method: &Method) -> Option<&'a str> {
    let id = answer
        .header("x-amzn-requestid")
        .expect("no x-amzn-RequestId");
    assert!(is_request_id(id), "request id {id:?}");
    let status = answer.status.as_u16();
    assert!(
        [200, 202, 204, 400, 404, 405, 413, 429, 500].contains(&status),
        "status {status}"
    );
    if status < 400 {
        assert!(answer.header("x-amzn-errortype").is_none(), "{answer:?}");
        return None;
    }
    let code = answer
        .header("x-amzn-errortype")
        .unwrap_or_else(|| panic!("a {status} without x-amzn-ErrorType: {answer:?}"));
    let allowed: &[&str] = match status {
        400 => &[
            "ValidationException",
            "InvalidParameterValueException",
            "InvalidRequestContentException",
        ],
        404 => &["ResourceNotFoundException", "UnknownOperationException"],
        405 => &["UnknownOperationException"],
        413 => &["RequestTooLargeException"],
        429 => &["TooManyRequestsException"],
        _ => &["ServiceException"],
    };
    assert!(allowed.contains(&code), "{status} with {code}");
    assert_eq!(answer.header("content-type"), Some("application/json"));
    if method == Method::HEAD {
        // The answer to HEAD has the headers of the one to GET, and no body.
        assert!(answer.body.is_empty(), "a body in the answer to HEAD");
        return Some(code);
    }
    let body: serde_json::Value =
        serde_json::from_slice(&answer.body).expect("an error body that is not JSON");
    let message = body
        .get("message")
        .or_else(|| body.get("Message"))
        .and_then(|m| m.as_str());
    assert!(message.is_some(), "no message in {body}");
    if status == 405 {
        assert!(answer.header("allow").is_some(), "405 without Allow");
    }
    Some(code)
}

/// The status, code and body fields an answer to a backend failure must have.
fn check_failure(answer: &Answer, failure: &InvokeFailure) {
    let (status, code) = match failure {
        InvokeFailure::NotFound { .. } => (404, "ResourceNotFoundException"),
        InvokeFailure::Throttled { .. } => (429, "TooManyRequestsException"),
        InvokeFailure::TooLarge { .. } => (413, "RequestTooLargeException"),
        InvokeFailure::InvalidRequest { .. } => (400, "InvalidRequestContentException"),
        InvokeFailure::Service { .. } => (500, "ServiceException"),
    };
    assert_eq!(answer.status.as_u16(), status, "{failure:?}: {answer:?}");
    assert_eq!(answer.header("x-amzn-errortype"), Some(code));
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    match failure {
        InvokeFailure::NotFound { arn } => {
            assert_eq!(body["Message"], format!("Function not found: {arn}"))
        }
        InvokeFailure::Service { message } => assert_eq!(body["Message"], message.as_str()),
        InvokeFailure::Throttled { reason } => assert_eq!(body["Reason"], reason.as_str()),
        InvokeFailure::InvalidRequest { message } => {
            assert_eq!(body["message"], message.as_str())
        }
        InvokeFailure::TooLarge { .. } => assert!(body["message"].is_string()),
    }
}

/// The answer to a call the backend accepted: as the backend said.
fn check_success(answer: &Answer, call: &Call, completed: &Completed, tail_logs: bool) {
    match call {
        Call::Invoke(_) => {
            assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
            assert!(
                answer.body == completed.payload,
                "the response payload changed"
            );
            assert_eq!(answer.header("content-type"), Some("application/json"));
            assert_eq!(answer.header("x-amz-executed-version"), Some("$LATEST"));
            assert_eq!(
                answer.header("x-amz-function-error"),
                completed.function_error.then_some("Unhandled")
            );
            let tail = completed.log_tail.as_ref().filter(|_| tail_logs).map(|t| {
                base64::engine::general_purpose::STANDARD.encode(&t[t.len().saturating_sub(4096)..])
            });
            assert_eq!(answer.header("x-amz-log-result"), tail.as_deref());
        }
        Call::Enqueue(_) => {
            assert_eq!(answer.status, StatusCode::ACCEPTED);
            assert!(answer.body.is_empty());
        }
        Call::DryRun(..) => {
            assert_eq!(answer.status, StatusCode::NO_CONTENT);
            assert!(answer.body.is_empty());
        }
    }
}

fn kind_label(call: &Call) -> &'static str {
    match call {
        Call::Invoke(_) => "invoke",
        Call::Enqueue(_) => "enqueue",
        Call::DryRun(..) => "dry run",
    }
}

// ---------------------------------------------------------------------------------------------
// The properties.

/// A valid invocation reaches the backend once, with exactly what was sent, and is answered as
/// the backend says.
#[test]
fn valid_invocations_reach_the_backend_with_exactly_their_payload() {
    fuzz!(
        "valid invocations",
        CASES,
        (valid_invocation(), outcome()),
        |(valid, outcome)| {
            let measured = Measured::start();
            let backend = Arc::new(Fake {
                outcome: outcome.clone(),
                calls: Mutex::default(),
            });
            let answer = send(&backend, valid.request());
            check_shape(&answer, &Method::POST);
            let calls = backend.calls.lock().unwrap().clone();
            prop_assert_eq!(calls.len(), 1, "{:?} answered {:?}", valid, answer);
            let call = &calls[0];
            let request_id = answer.header("x-amzn-requestid").unwrap();
            let tail_logs = valid.log_type == Some("Tail");
            match (call, valid.kind) {
                (Call::Invoke(i), Kind::RequestResponse) => {
                    prop_assert!(i.payload == valid.payload, "the payload changed on its way");
                    prop_assert_eq!(&i.function, &valid.function);
                    prop_assert_eq!(&i.qualifier, &valid.qualifier);
                    prop_assert_eq!(&i.request_id, request_id);
                    prop_assert_eq!(&i.client_context, &valid.client_context);
                    prop_assert_eq!(i.tail_logs, tail_logs);
                }
                (Call::Enqueue(i), Kind::Event) => {
                    prop_assert!(i.payload == valid.payload, "the payload changed on its way");
                    prop_assert_eq!(&i.function, &valid.function);
                    prop_assert_eq!(&i.qualifier, &valid.qualifier);
                    prop_assert_eq!(&i.request_id, request_id);
                    prop_assert_eq!(&i.client_context, &None);
                    prop_assert!(!i.tail_logs);
                }
                (Call::DryRun(function, qualifier), Kind::DryRun) => {
                    prop_assert_eq!(function, &valid.function);
                    prop_assert_eq!(qualifier, &valid.qualifier);
                }
                (call, kind) => prop_assert!(false, "{kind:?} became {call:?}"),
            }
            match &outcome {
                Ok(completed) => check_success(&answer, call, completed, tail_logs),
                Err(failure) => check_failure(&answer, failure),
            }
            let limit = valid.kind.limit();
            prop_assert!(
                measured.growth() <= 2 * limit + (1 << 20),
                "{} bytes held for a {}-byte payload",
                measured.growth(),
                valid.payload.len()
            );
            Ok(format!(
                "{} {}",
                kind_label(call),
                if outcome.is_ok() { "ok" } else { "failed" }
            ))
        },
    );
}

#[derive(Clone, Debug)]
struct Arbitrary {
    method: Method,
    path: String,
    headers: Vec<(&'static str, Vec<u8>)>,
    payload: Bytes,
    delivery: Delivery,
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        8 => Just(Method::POST),
        2 => Just(Method::GET),
        1 => Just(Method::HEAD),
        1 => Just(Method::PUT),
        1 => Just(Method::DELETE),
        1 => Just(Method::OPTIONS),
        1 => Just(Method::PATCH),
        1 => "[A-Z]{1,8}".prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap()),
    ]
}

/// Characters a URI path or query may hold as they are, plus `%` for escapes of any byte.
fn uri_text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            6 => "[a-zA-Z0-9:$._~!&'()*+,;=@-]",
            1 => any::<u8>().prop_map(|b| format!("%{b:02X}")),
            1 => Just("%".to_owned()),
            1 => Just("%zz".to_owned()),
            1 => Just("/".to_owned()),
        ],
        0..max,
    )
    .prop_map(|parts| parts.concat())
}

fn arbitrary_path() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        3 => (arn_prefix(), function_name(), proptest::option::of(qualifier()))
            .prop_map(|(p, n, q)| match q {
                Some(q) => format!("{p}{n}:{q}"),
                None => format!("{p}{n}"),
            }),
        3 => uri_text(20),
        1 => (257usize..300).prop_map(|n| "a".repeat(n)),
        1 => Just(String::new()),
    ];
    let query = prop_oneof![
        3 => Just(String::new()),
        2 => qualifier().prop_map(|q| format!("?Qualifier={q}")),
        2 => uri_text(16).prop_map(|q| format!("?Qualifier={q}")),
        1 => uri_text(24).prop_map(|q| format!("?{q}")),
        1 => Just("?Qualifier=a&Qualifier=b".to_owned()),
        1 => Just("?Qualifier".to_owned()),
        1 => (129usize..140).prop_map(|n| format!("?Qualifier={}", "q".repeat(n))),
    ];
    let path = prop_oneof![
        8 => name.prop_map(|n| format!("/2015-03-31/functions/{n}/invocations")),
        1 => Just("/metrics".to_owned()),
        1 => uri_text(30).prop_map(|p| format!("/{p}")),
        1 => Just("/2015-03-31/functions/f/invocations/extra".to_owned()),
        1 => Just("//2015-03-31/functions/f/invocations".to_owned()),
        1 => Just("/2015-03-31/functions//invocations".to_owned()),
    ];
    (path, query).prop_map(|(p, q)| format!("{p}{q}"))
}

fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => prop_oneof![
            Just("RequestResponse"),
            Just("Event"),
            Just("DryRun"),
            Just("None"),
            Just("Tail"),
            Just("event"),
            Just(""),
        ]
        .prop_map(|s| s.as_bytes().to_vec()),
        1 => client_context().prop_map(|c| c.unwrap_or_default().into_bytes()),
        1 => "[A-Za-z0-9+/=]{0,40}".prop_map(String::into_bytes),
        1 => proptest::collection::vec(any::<u8>(), 0..24),
        1 => (3580usize..3600).prop_map(|n| vec![b'A'; n]),
    ]
}

fn arbitrary_payload() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        6 => valid_payload(),
        2 => proptest::collection::vec(any::<u8>(), 0..48).prop_map(Bytes::from),
        1 => Just(Bytes::from_static(b"\"\xff\xfe\"")),
        1 => Just(Bytes::from_static(b"{\"a\": 1} trailing")),
        1 => Just(Bytes::from_static(b"\xef\xbb\xbf{}")),
        1 => Just(Bytes::from_static(b"1e400")),
        1 => (100usize..3000).prop_map(|n| Bytes::from(format!("{}{}", "[".repeat(n), "]".repeat(n)))),
        1 => prop_oneof![
            Just(MAX_EVENT_PAYLOAD + 1),
            Just(MAX_SYNC_PAYLOAD + 1),
        ]
        .prop_map(|n| Bytes::from(json_of_length(n))),
    ]
}

/// A change that may make a valid invocation invalid.
#[derive(Clone, Debug)]
enum Damage {
    Method(Method),
    /// The whole path and query.
    Path(String),
    /// The query string.
    Query(String),
    /// A header value: replacing the first of its name, or sent (again) after it.
    Header(&'static str, Vec<u8>, bool),
    Payload(Bytes),
    Delivery(Delivery),
}

fn damage() -> impl Strategy<Value = Damage> {
    let header_name = prop_oneof![
        Just("x-amz-invocation-type"),
        Just("x-amz-log-type"),
        Just("x-amz-client-context"),
        Just("content-type"),
    ];
    prop_oneof![
        2 => method().prop_map(Damage::Method),
        3 => arbitrary_path().prop_map(Damage::Path),
        1 => uri_text(24).prop_map(Damage::Query),
        4 => (header_name, header_value(), any::<bool>())
            .prop_map(|(n, v, replace)| Damage::Header(n, v, replace)),
        3 => arbitrary_payload().prop_map(Damage::Payload),
        2 => delivery(true).prop_map(Damage::Delivery),
    ]
}

/// A valid invocation with a few damages (none, a quarter of the time).
fn arbitrary_request() -> impl Strategy<Value = Arbitrary> {
    let damages = prop_oneof![
        1 => Just(0usize),
        2 => Just(1),
        1 => Just(2),
        1 => Just(3),
    ]
    .prop_flat_map(|n| proptest::collection::vec(damage(), n));
    (valid_invocation(), damages).prop_map(|(valid, damages)| {
        let mut path = format!("/2015-03-31/functions/{}/invocations", valid.raw_name);
        if let Some(q) = &valid.query {
            path = format!("{path}?{q}");
        }
        let mut headers = Vec::new();
        let kind = match valid.kind {
            Kind::RequestResponse => valid.explicit_kind.then_some("RequestResponse"),
            Kind::Event => Some("Event"),
            Kind::DryRun => Some("DryRun"),
        };
        if let Some(kind) = kind {
            headers.push(("x-amz-invocation-type", kind.as_bytes().to_vec()));
        }
        if let Some(log) = valid.log_type {
            headers.push(("x-amz-log-type", log.as_bytes().to_vec()));
        }
        if let Some(context) = &valid.client_context {
            headers.push(("x-amz-client-context", context.as_bytes().to_vec()));
        }
        let mut request = Arbitrary {
            method: Method::POST,
            path,
            headers,
            payload: valid.payload,
            delivery: valid.delivery,
        };
        for damage in damages {
            match damage {
                Damage::Method(m) => request.method = m,
                Damage::Path(p) => request.path = p,
                Damage::Query(q) => {
                    let base = request.path.split('?').next().unwrap_or("/").to_owned();
                    request.path = format!("{base}?{q}");
                }
                Damage::Header(name, value, replace) => {
                    match request.headers.iter_mut().find(|(n, _)| *n == name) {
                        Some(slot) if replace => slot.1 = value,
                        _ => request.headers.push((name, value)),
                    }
                }
                Damage::Payload(p) => request.payload = p,
                Damage::Delivery(d) => request.delivery = d,
            }
        }
        request
    })
}

impl Arbitrary {
    /// The request, if `http` takes its parts (a path with a bare `%` is no URI, a header
    /// value with control characters no header value).
    fn request(&self) -> Option<Request<Body>> {
        let mut builder = Request::builder().method(self.method.clone());
        builder = builder.uri(&self.path);
        for (name, value) in &self.headers {
            builder = builder.header(*name, HeaderValue::from_bytes(value).ok()?);
        }
        match &self.delivery.length {
            Length::Absent => {}
            Length::True => builder = builder.header("content-length", self.payload.len()),
            Length::Claim(claim) => builder = builder.header("content-length", claim.as_str()),
        }
        if self.delivery.expect {
            builder = builder.header("expect", "100-continue");
        }
        builder.body(body(&self.payload, &self.delivery)).ok()
    }
}

/// Whatever arrives, the answer has Lambda's shape, and the backend hears only of well-formed
/// invocations, with exactly their payload.
#[test]
fn any_request_gets_a_lambda_shaped_answer() {
    fuzz!(
        "arbitrary requests",
        CASES,
        (arbitrary_request(), outcome()),
        |(arbitrary, outcome)| {
            let Some(request) = arbitrary.request() else {
                return Ok("not an http::Request".to_owned());
            };
            let measured = Measured::start();
            let backend = Arc::new(Fake {
                outcome: outcome.clone(),
                calls: Mutex::default(),
            });
            let path = request.uri().path().to_owned();
            let answer = send(&backend, request);
            let code = check_shape(&answer, &arbitrary.method).map(str::to_owned);
            let calls = backend.calls.lock().unwrap().clone();
            prop_assert!(calls.len() <= 1, "{calls:?}");
            prop_assert!(
                measured.growth() <= 2 * MAX_SYNC_PAYLOAD + (1 << 20),
                "{} bytes held",
                measured.growth()
            );
            let Some(call) = calls.first() else {
                // Not for the backend: a refusal of the request itself, or the metrics page.
                if answer.status.is_success() {
                    prop_assert_eq!(&path, "/metrics");
                    prop_assert!(matches!(arbitrary.method, Method::GET | Method::HEAD));
                    let expected: &[u8] = if arbitrary.method == Method::HEAD {
                        b""
                    } else {
                        METRICS.as_bytes()
                    };
                    prop_assert_eq!(&answer.body[..], expected);
                    return Ok("metrics".to_owned());
                }
                let code = code.unwrap();
                prop_assert!(
                    [
                        "ValidationException",
                        "InvalidParameterValueException",
                        "InvalidRequestContentException",
                        "RequestTooLargeException",
                        "UnknownOperationException",
                    ]
                    .contains(&code.as_str()),
                    "{code} without asking the backend"
                );
                return Ok(code);
            };
            // It reached the backend: it was a POST of an invocation whose payload fits its
            // limit and is JSON (or nothing), and the backend got exactly that payload.
            prop_assert_eq!(&arbitrary.method, &Method::POST);
            prop_assert!(
                path.starts_with("/2015-03-31/functions/") && path.ends_with("/invocations")
            );
            prop_assert!(
                !arbitrary.delivery.fail,
                "a body that failed reached the backend"
            );
            // The router reads the first value of a repeated header.
            let first = |name: &str| {
                arbitrary
                    .headers
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.as_slice())
            };
            let kind_header = first("x-amz-invocation-type");
            let log_header = first("x-amz-log-type");
            let context_header = first("x-amz-client-context");
            let tail_logs = log_header == Some(b"Tail");
            let payload = match call {
                Call::Invoke(i) => {
                    prop_assert!(matches!(kind_header, None | Some(b"RequestResponse")));
                    prop_assert_eq!(i.tail_logs, tail_logs);
                    prop_assert_eq!(
                        i.client_context.as_deref().map(str::as_bytes),
                        context_header
                    );
                    Some(i)
                }
                Call::Enqueue(i) => {
                    prop_assert_eq!(kind_header, Some(&b"Event"[..]));
                    prop_assert!(!i.tail_logs && i.client_context.is_none());
                    Some(i)
                }
                Call::DryRun(..) => {
                    prop_assert_eq!(kind_header, Some(&b"DryRun"[..]));
                    None
                }
            };
            prop_assert!(matches!(log_header, None | Some(b"None") | Some(b"Tail")));
            if let Some(invocation) = payload {
                prop_assert!(
                    invocation.payload == arbitrary.payload,
                    "the payload changed"
                );
                prop_assert_eq!(
                    &invocation.request_id,
                    answer.header("x-amzn-requestid").unwrap()
                );
                prop_assert!(
                    is_function_name(&invocation.function),
                    "function {:?}",
                    invocation.function
                );
            }
            let limit = if matches!(call, Call::Enqueue(_)) {
                MAX_EVENT_PAYLOAD
            } else {
                MAX_SYNC_PAYLOAD
            };
            prop_assert!(arbitrary.payload.len() <= limit);
            let json = arbitrary.payload.is_empty()
                || std::str::from_utf8(&arbitrary.payload)
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde::de::IgnoredAny>(t).ok())
                    .is_some();
            prop_assert!(json, "a payload that is not JSON reached the backend");
            match &outcome {
                Ok(completed) => check_success(&answer, call, completed, tail_logs),
                Err(failure) => check_failure(&answer, failure),
            }
            Ok(format!("backend: {}", kind_label(call)))
        },
    );
}

fn is_function_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

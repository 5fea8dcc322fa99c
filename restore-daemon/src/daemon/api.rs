//! AWS Lambda's Invoke API over HTTP/1.1, on TCP or a Unix socket, so that unmodified clients
//! (boto3, the AWS CLI, the SDKs) can call thawd; and the Prometheus page at `/metrics`.
//!
//! Every answer, success or error, carries a fresh `x-amzn-RequestId`. Errors are shaped as
//! Lambda's rest-json errors: the code in `x-amzn-ErrorType` (where botocore reads
//! `Error.Code`), the message in the JSON body's `message` or `Message` (whichever Lambda's
//! model names for that error, so the SDKs' modeled exceptions fill it too).
//!
//! A request is admitted before its body is read: the function must exist and have room
//! (its concurrency, or the event queue), and a large body must fit in the front's byte budget
//! (`front`). The body is then read only up to the limit of the invocation type, and only
//! until the body timeout. Whatever a client sends past the limit (or after a request was
//! refused) is read and thrown away, up to a bound and the same deadline, so that a client
//! still writing its body reads the error instead of a reset; a body left unread closes the
//! connection after the answer.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use bytes::BytesMut;
use serde::Deserialize;

use super::front::{BodyBudget, FrontLimits, Reservation};
use super::metrics::CONTENT_TYPE as METRICS_CONTENT_TYPE;
use super::{
    Backend, Completed, Invocation, InvokeFailure, LATEST, MAX_EVENT_PAYLOAD, MAX_SYNC_PAYLOAD,
    ThrottleReason,
};

const INVOKE_PATH: &str = "/2015-03-31/functions/{function_name}/invocations";

const INVOCATION_TYPE: HeaderName = HeaderName::from_static("x-amz-invocation-type");
const LOG_TYPE: HeaderName = HeaderName::from_static("x-amz-log-type");
const CLIENT_CONTEXT: HeaderName = HeaderName::from_static("x-amz-client-context");
const REQUEST_ID: HeaderName = HeaderName::from_static("x-amzn-requestid");
const ERROR_TYPE: HeaderName = HeaderName::from_static("x-amzn-errortype");
const FUNCTION_ERROR: HeaderName = HeaderName::from_static("x-amz-function-error");
const LOG_RESULT: HeaderName = HeaderName::from_static("x-amz-log-result");
const EXECUTED_VERSION: HeaderName = HeaderName::from_static("x-amz-executed-version");

const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// Lambda returns at most the last 4 KB of an invocation's log.
const LOG_TAIL_LIMIT: usize = 4 * 1024;
/// Lambda's documented bound on `X-Amz-Client-Context`.
const CLIENT_CONTEXT_LIMIT: usize = 3583;
/// How much of a refused request's body is read and discarded before giving up on the
/// connection: enough for an oversized invocation a real client would send, bounded so a
/// hostile one cannot keep a task reading forever.
const DISCARD_LIMIT: usize = 4 * MAX_SYNC_PAYLOAD;
/// A refused request's body is no longer read once its client pauses this long: one still
/// writing keeps sending, one holding its body back is not waited for.
const DISCARD_PAUSE: Duration = Duration::from_millis(250);

/// Lambda's validation pattern for `FunctionName`, quoted in its `ValidationException`.
const FUNCTION_NAME_PATTERN: &str = r"(arn:(aws[a-zA-Z-]*)?:lambda:)?([a-z]{2}((-gov)|(-iso([a-z]?)))?-[a-z]+-\d{1}:)?(\d{12}:)?(function:)?([a-zA-Z0-9-_\.]+)(:(\$LATEST(\.PUBLISHED)?|[a-zA-Z0-9-_]+))?";
/// Lambda's validation pattern for `?Qualifier=`.
const QUALIFIER_PATTERN: &str = r"\$(LATEST(\.PUBLISHED)?)|[a-zA-Z0-9-_$]+";
const FUNCTION_NAME_MAX: usize = 256;
const QUALIFIER_MAX: usize = 128;

/// The Invoke API and `/metrics` in front of `backend`, with the default body timeout and
/// budget.
pub fn router<B: Backend>(backend: Arc<B>) -> Router {
    router_with(backend, &FrontLimits::default())
}

/// The Invoke API and `/metrics` in front of `backend`, reading bodies within `limits`.
pub fn router_with<B: Backend>(backend: Arc<B>, limits: &FrontLimits) -> Router {
    let rules = Arc::new(BodyRules {
        timeout: limits.body_timeout,
        budget: BodyBudget::new(limits.body_budget),
    });
    Router::new()
        .route(INVOKE_PATH, post(invoke::<B>).fallback(method_not_allowed))
        .route("/metrics", get(metrics::<B>).fallback(method_not_allowed))
        .fallback(unknown_operation)
        .layer(middleware::from_fn(assign_request_id))
        .layer(Extension(rules))
        .with_state(backend)
}

/// How request bodies are read: within a deadline, large ones against a byte budget.
#[derive(Debug)]
struct BodyRules {
    timeout: Duration,
    budget: Arc<BodyBudget>,
}

impl BodyRules {
    /// When the body of a request whose head arrived now must have arrived.
    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }
}

/// A request refused before it reached the function, as Lambda would answer it.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    /// The backend refused it, or the request's payload or headers are wrong in a way Lambda
    /// reports with the same errors.
    #[error(transparent)]
    Invoke(#[from] InvokeFailure),
    /// A parameter breaks the API model's constraints (pattern, length, enum).
    #[error("1 validation error detected: {0}")]
    Validation(String),
    /// Parameters that are each valid but do not fit together.
    #[error("{0}")]
    InvalidParameter(String),
    #[error("The requested operation is not recognized.")]
    UnknownOperation,
    #[error("The requested operation does not accept this method.")]
    MethodNotAllowed,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Invoke(failure) => match failure {
                InvokeFailure::NotFound { .. } => StatusCode::NOT_FOUND,
                InvokeFailure::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
                InvokeFailure::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                InvokeFailure::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
                InvokeFailure::Service { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            },
            Self::Validation(_) | Self::InvalidParameter(_) => StatusCode::BAD_REQUEST,
            Self::UnknownOperation => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The code botocore reports as `Error.Code`.
    fn code(&self) -> &'static str {
        match self {
            Self::Invoke(failure) => match failure {
                InvokeFailure::NotFound { .. } => "ResourceNotFoundException",
                InvokeFailure::Throttled { .. } => "TooManyRequestsException",
                InvokeFailure::TooLarge { .. } => "RequestTooLargeException",
                InvokeFailure::InvalidRequest { .. } => "InvalidRequestContentException",
                InvokeFailure::Service { .. } => "ServiceException",
            },
            Self::Validation(_) => "ValidationException",
            Self::InvalidParameter(_) => "InvalidParameterValueException",
            Self::UnknownOperation | Self::MethodNotAllowed => "UnknownOperationException",
        }
    }

    /// The JSON body: the members Lambda's model gives each error (`Type`, the message under
    /// the key the model spells, `Reason`); validation errors come from the request framework
    /// and carry only a message.
    fn body(&self) -> serde_json::Value {
        let message = self.to_string();
        match self {
            Self::Invoke(InvokeFailure::NotFound { .. }) => {
                serde_json::json!({ "Type": "User", "Message": message })
            }
            Self::Invoke(InvokeFailure::Service { .. }) => {
                serde_json::json!({ "Type": "Service", "Message": message })
            }
            Self::Invoke(InvokeFailure::Throttled { reason }) => {
                serde_json::json!({ "Type": "User", "message": message, "Reason": reason.as_str() })
            }
            Self::Validation(_) => serde_json::json!({ "message": message }),
            _ => serde_json::json!({ "Type": "User", "message": message }),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(code = self.code(), error = %self, "invoke failed");
        } else {
            tracing::debug!(code = self.code(), error = %self, "invoke refused");
        }
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, JSON);
        headers.insert(ERROR_TYPE, HeaderValue::from_static(self.code()));
        response
    }
}

/// The request id given to one request, from [`assign_request_id`] to the handlers.
#[derive(Clone, Debug)]
struct RequestId(String);

async fn assign_request_id(mut request: Request, next: Next) -> Response {
    let id = new_request_id();
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::try_from(id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// A random (version 4) UUID, as Lambda's request ids are.
fn new_request_id() -> String {
    let mut bytes = [0u8; 16];
    if let Err(error) = getrandom::fill(&mut bytes) {
        // An id only has to be unique, not secret: the clock and a counter still give that.
        tracing::warn!(%error, "no entropy for a request id");
        bytes = fallback_id_bytes();
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut id = String::with_capacity(36);
    for (index, byte) in bytes.iter().enumerate() {
        if matches!(index, 4 | 6 | 8 | 10) {
            id.push('-');
        }
        id.push(hex_digit(byte >> 4));
        id.push(hex_digit(byte & 0x0f));
    }
    id
}

fn hex_digit(nibble: u8) -> char {
    char::from_digit(u32::from(nibble), 16).unwrap_or('0')
}

fn fallback_id_bytes() -> [u8; 16] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&nanos.to_le_bytes());
    bytes[8..].copy_from_slice(&count.to_le_bytes());
    bytes
}

async fn metrics<B: Backend>(State(backend): State<Arc<B>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(METRICS_CONTENT_TYPE),
        )],
        backend.metrics_text(),
    )
        .into_response()
}

async fn unknown_operation(
    Extension(rules): Extension<Arc<BodyRules>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let answer = ApiError::UnknownOperation.into_response();
    finish(answer, body, &headers, rules.deadline()).await
}

async fn method_not_allowed(
    Extension(rules): Extension<Arc<BodyRules>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let answer = ApiError::MethodNotAllowed.into_response();
    finish(answer, body, &headers, rules.deadline()).await
}

/// Reads what is left of `body` (see [`discard_rest`]) before `answer` goes out, and closes
/// the connection after it when the body could not be read to its end.
async fn finish(
    mut answer: Response,
    mut body: Body,
    headers: &HeaderMap,
    deadline: Instant,
) -> Response {
    if !discard_rest(&mut body, headers, deadline).await {
        answer
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    answer
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InvocationType {
    RequestResponse,
    Event,
    DryRun,
}

impl InvocationType {
    fn payload_limit(self) -> usize {
        match self {
            Self::RequestResponse | Self::DryRun => MAX_SYNC_PAYLOAD,
            Self::Event => MAX_EVENT_PAYLOAD,
        }
    }

    /// The operation Lambda names in its `RequestTooLargeException` message.
    fn operation(self) -> &'static str {
        match self {
            Self::RequestResponse | Self::DryRun => "InvokeFunction",
            Self::Event => "InvokeAsync",
        }
    }
}

#[derive(Debug, Deserialize)]
struct InvokeQuery {
    #[serde(rename = "Qualifier")]
    qualifier: Option<String>,
}

async fn invoke<B: Backend>(
    State(backend): State<Arc<B>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    Extension(rules): Extension<Arc<BodyRules>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<InvokeQuery>, QueryRejection>,
    headers: HeaderMap,
    mut body: Body,
) -> Response {
    let deadline = rules.deadline();
    let outcome = match parse_request(path, query, &headers, request_id) {
        Ok((invocation, kind)) => {
            let request = RequestBody {
                headers: &headers,
                body: &mut body,
                rules: &rules,
                deadline,
            };
            run(&*backend, invocation, kind, request).await
        }
        Err(error) => Err(error),
    };
    let answer = outcome.unwrap_or_else(IntoResponse::into_response);
    finish(answer, body, &headers, deadline).await
}

/// What [`run`] reads an invocation's body from.
struct RequestBody<'r> {
    headers: &'r HeaderMap,
    body: &'r mut Body,
    rules: &'r BodyRules,
    deadline: Instant,
}

fn parse_request(
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<InvokeQuery>, QueryRejection>,
    headers: &HeaderMap,
    request_id: String,
) -> Result<(Invocation, InvocationType), ApiError> {
    let Path(raw_name) = path.map_err(|rejection| {
        ApiError::Validation(format!(
            "Value at 'functionName' failed to satisfy constraint: {}",
            rejection.body_text()
        ))
    })?;
    let Query(query) = query.map_err(|rejection| {
        ApiError::Validation(format!(
            "Query string could not be parsed: {}",
            rejection.body_text()
        ))
    })?;
    let (function, from_name) = parse_function_name(&raw_name)?;
    let qualifier = resolve_qualifier(from_name, query.qualifier)?;
    let kind = invocation_type(headers)?;
    let tail_logs = tail_logs(headers)?;
    // The payload is read once the rest of the request has been found valid.
    let invocation = Invocation {
        function: function.to_owned(),
        qualifier,
        payload: Bytes::new(),
        request_id,
        client_context: client_context(headers)?,
        tail_logs,
    };
    Ok((invocation, kind))
}

async fn run<B: Backend>(
    backend: &B,
    mut invocation: Invocation,
    kind: InvocationType,
    request: RequestBody<'_>,
) -> Result<Response, ApiError> {
    // Admission comes before the body is read, so a daemon with no room does not buffer it;
    // the concurrency itself is taken once the body is whole, so a slow sender holds none.
    if kind != InvocationType::DryRun {
        backend.admit(
            &invocation.function,
            invocation.qualifier.as_deref(),
            kind == InvocationType::Event,
        )?;
    }
    let mut reservation = request.rules.budget.reservation();
    let reading = read_payload(request.body, request.headers, kind, &mut reservation);
    invocation.payload = tokio::time::timeout_at(request.deadline, reading)
        .await
        .map_err(|_| body_timeout(request.rules.timeout))??;
    // From here the payload is bounded by the concurrency or the event queue's bytes.
    drop(reservation);
    check_json(&invocation.payload)?;
    tracing::debug!(
        request_id = %invocation.request_id,
        function = %invocation.function,
        ?kind,
        bytes = invocation.payload.len(),
        "invoke"
    );
    match kind {
        InvocationType::RequestResponse => {
            let tail_logs = invocation.tail_logs;
            let completed = backend.invoke(invocation).await?;
            Ok(completed_response(completed, tail_logs))
        }
        InvocationType::Event => {
            // Lambda gives neither a log tail nor the client context to asynchronous
            // invocations.
            invocation.tail_logs = false;
            invocation.client_context = None;
            backend.enqueue(invocation).await?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
        InvocationType::DryRun => {
            backend.dry_run(&invocation.function, invocation.qualifier.as_deref())?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
}

fn completed_response(completed: Completed, tail_logs: bool) -> Response {
    let mut response = Response::new(Body::from(completed.payload));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, JSON);
    headers.insert(EXECUTED_VERSION, HeaderValue::from_static(LATEST));
    if completed.function_error {
        headers.insert(FUNCTION_ERROR, HeaderValue::from_static("Unhandled"));
    }
    if let Some(tail) = completed.log_tail.filter(|_| tail_logs) {
        let start = tail.len().saturating_sub(LOG_TAIL_LIMIT);
        let encoded = base64::engine::general_purpose::STANDARD.encode(&tail[start..]);
        if let Ok(value) = HeaderValue::try_from(encoded) {
            headers.insert(LOG_RESULT, value);
        }
    }
    response
}

fn header_text<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<Result<&'h str, ()>> {
    headers.get(name).map(|value| value.to_str().map_err(drop))
}

fn invocation_type(headers: &HeaderMap) -> Result<InvocationType, ApiError> {
    match header_text(headers, &INVOCATION_TYPE) {
        None => Ok(InvocationType::RequestResponse),
        Some(Ok("RequestResponse")) => Ok(InvocationType::RequestResponse),
        Some(Ok("Event")) => Ok(InvocationType::Event),
        Some(Ok("DryRun")) => Ok(InvocationType::DryRun),
        Some(value) => Err(enum_violation(
            "invocationType",
            value.unwrap_or("<not text>"),
            "[Event, RequestResponse, DryRun]",
        )),
    }
}

fn tail_logs(headers: &HeaderMap) -> Result<bool, ApiError> {
    match header_text(headers, &LOG_TYPE) {
        None | Some(Ok("None")) => Ok(false),
        Some(Ok("Tail")) => Ok(true),
        Some(value) => Err(enum_violation(
            "logType",
            value.unwrap_or("<not text>"),
            "[None, Tail]",
        )),
    }
}

/// `X-Amz-Client-Context` as sent (base64), once it is known to hold a JSON object as Lambda
/// requires.
fn client_context(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = header_text(headers, &CLIENT_CONTEXT) else {
        return Ok(None);
    };
    let invalid = || {
        ApiError::from(InvokeFailure::InvalidRequest {
            message: "Client context must be a valid Base64-encoded JSON object.".to_owned(),
        })
    };
    let text = value.map_err(|()| invalid())?;
    if text.len() > CLIENT_CONTEXT_LIMIT {
        return Err(InvokeFailure::InvalidRequest {
            message: format!("Client context must be at most {CLIENT_CONTEXT_LIMIT} bytes."),
        }
        .into());
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| invalid())?;
    match serde_json::from_slice::<serde_json::Value>(&decoded) {
        Ok(serde_json::Value::Object(_)) => Ok(Some(text.to_owned())),
        _ => Err(invalid()),
    }
}

/// Reduces `FunctionName` to the function's name and the qualifier it carries, if any.
///
/// Accepts what Lambda's pattern accepts: a name, `NAME:QUALIFIER`, a partial ARN
/// (`ACCOUNT:function:NAME`) and a full one (`arn:aws:lambda:REGION:ACCOUNT:function:NAME`),
/// each with an optional `:QUALIFIER`; the region, account and partition are not checked
/// against anything, since thawd serves one account.
fn parse_function_name(raw: &str) -> Result<(&str, Option<&str>), ApiError> {
    if raw.is_empty() || raw.len() > FUNCTION_NAME_MAX {
        return Err(length_violation("functionName", raw, 1, FUNCTION_NAME_MAX));
    }
    let tokens: Vec<&str> = raw.split(':').collect();
    match_name(&tokens, 0).ok_or_else(|| {
        ApiError::Validation(format!(
            "Value '{raw}' at 'functionName' failed to satisfy constraint: Member must satisfy \
             regular expression pattern: {FUNCTION_NAME_PATTERN}"
        ))
    })
}

/// An optional prefix of a function name: how many `:`-separated tokens it takes from the
/// front, if they fit.
type NamePrefix = fn(&[&str]) -> Option<usize>;

/// The optional prefixes, in the order the pattern has them.
const NAME_PREFIXES: [NamePrefix; 4] = [arn_prefix, region_prefix, account_prefix, function_prefix];

/// Matches `tokens` against the prefixes from `stage` on, then `NAME[:QUALIFIER]`, trying each
/// optional prefix both taken and skipped, as the pattern's regular expression would.
fn match_name<'a>(tokens: &[&'a str], stage: usize) -> Option<(&'a str, Option<&'a str>)> {
    let Some(prefix) = NAME_PREFIXES.get(stage) else {
        return match tokens {
            [name] if is_function_name(name) => Some((name, None)),
            [name, qualifier] if is_function_name(name) && is_name_qualifier(qualifier) => {
                Some((name, Some(qualifier)))
            }
            _ => None,
        };
    };
    prefix(tokens)
        .and_then(|taken| tokens.get(taken..))
        .and_then(|rest| match_name(rest, stage + 1))
        .or_else(|| match_name(tokens, stage + 1))
}

fn arn_prefix(tokens: &[&str]) -> Option<usize> {
    match tokens {
        ["arn", partition, "lambda", ..] if is_partition(partition) => Some(3),
        _ => None,
    }
}

fn is_partition(partition: &str) -> bool {
    partition.is_empty()
        || partition
            .strip_prefix("aws")
            .is_some_and(|rest| rest.chars().all(|c| c.is_ascii_alphabetic() || c == '-'))
}

fn region_prefix(tokens: &[&str]) -> Option<usize> {
    tokens.first().filter(|token| is_region(token)).map(|_| 1)
}

/// `[a-z]{2}((-gov)|(-iso([a-z]?)))?-[a-z]+-\d`, e.g. `us-east-1`, `us-gov-west-1`.
fn is_region(token: &str) -> bool {
    let lower = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase());
    let Some((area, rest)) = token.split_once('-') else {
        return false;
    };
    if area.len() != 2 || !lower(area) {
        return false;
    }
    let parts: Vec<&str> = rest.split('-').collect();
    let (qualifier, place, digit) = match parts.as_slice() {
        [place, digit] => (None, *place, *digit),
        [qualifier, place, digit] => (Some(*qualifier), *place, *digit),
        _ => return false,
    };
    let qualifier_ok = qualifier.is_none_or(|q| {
        q == "gov"
            || q.strip_prefix("iso").is_some_and(|letter| {
                letter.len() <= 1 && letter.bytes().all(|b| b.is_ascii_lowercase())
            })
    });
    qualifier_ok && lower(place) && digit.len() == 1 && digit.bytes().all(|b| b.is_ascii_digit())
}

fn account_prefix(tokens: &[&str]) -> Option<usize> {
    tokens
        .first()
        .filter(|token| token.len() == 12 && token.bytes().all(|b| b.is_ascii_digit()))
        .map(|_| 1)
}

fn function_prefix(tokens: &[&str]) -> Option<usize> {
    (tokens.first() == Some(&"function")).then_some(1)
}

fn is_function_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A qualifier inside `FunctionName`: `$LATEST`, `$LATEST.PUBLISHED` or `[a-zA-Z0-9-_]+`.
fn is_name_qualifier(qualifier: &str) -> bool {
    matches!(qualifier, "$LATEST" | "$LATEST.PUBLISHED")
        || (!qualifier.is_empty()
            && qualifier
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_')))
}

/// `?Qualifier=`, checked against Lambda's constraints, and the one in `FunctionName`: Lambda
/// refuses the two when they differ.
fn resolve_qualifier(
    from_name: Option<&str>,
    from_query: Option<String>,
) -> Result<Option<String>, ApiError> {
    let Some(query) = from_query else {
        return Ok(from_name.map(str::to_owned));
    };
    if query.is_empty() || query.len() > QUALIFIER_MAX {
        return Err(length_violation("qualifier", &query, 1, QUALIFIER_MAX));
    }
    let valid = query == "$LATEST.PUBLISHED"
        || query
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'$'));
    if !valid {
        return Err(ApiError::Validation(format!(
            "Value '{query}' at 'qualifier' failed to satisfy constraint: Member must satisfy \
             regular expression pattern: {QUALIFIER_PATTERN}"
        )));
    }
    match from_name {
        Some(name_qualifier) if name_qualifier != query => Err(ApiError::InvalidParameter(
            "The derived qualifier from the function name does not match the specified \
             qualifier."
                .to_owned(),
        )),
        _ => Ok(Some(query)),
    }
}

fn enum_violation(field: &str, value: &str, allowed: &str) -> ApiError {
    ApiError::Validation(format!(
        "Value '{}' at '{field}' failed to satisfy constraint: Member must satisfy enum value \
         set: {allowed}",
        clip(value)
    ))
}

fn length_violation(field: &str, value: &str, min: usize, max: usize) -> ApiError {
    let bound = if value.len() < min {
        format!("greater than or equal to {min}")
    } else {
        format!("less than or equal to {max}")
    };
    ApiError::Validation(format!(
        "Value '{}' at '{field}' failed to satisfy constraint: Member must have length {bound}",
        clip(value)
    ))
}

/// At most the first 256 characters of a value echoed in an error message.
fn clip(value: &str) -> String {
    value.chars().take(256).collect()
}

fn declared_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The body's next frame: its data, or `None` for trailers; `None` at the end of the body.
async fn next_chunk(body: &mut Body) -> Option<Result<Option<Bytes>, axum::Error>> {
    std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx))
        .await
        .map(|frame| frame.map(|frame| frame.into_data().ok()))
}

/// Reads the payload, refusing it as soon as it is known to exceed the invocation type's
/// limit (from `Content-Length`, else while reading), so nothing past the limit is buffered.
async fn read_payload(
    body: &mut Body,
    headers: &HeaderMap,
    kind: InvocationType,
    reservation: &mut Reservation,
) -> Result<Bytes, ApiError> {
    let limit = kind.payload_limit();
    let too_large = || {
        ApiError::from(InvokeFailure::TooLarge {
            limit,
            kind: kind.operation(),
        })
    };
    let no_room = || {
        ApiError::from(InvokeFailure::Throttled {
            reason: ThrottleReason::BodyBudgetFull,
        })
    };
    if let Some(length) = declared_length(headers) {
        if length > limit {
            return Err(too_large());
        }
        if !reservation.cover(length) {
            return Err(no_room());
        }
    }
    let mut payload = BytesMut::new();
    while let Some(chunk) = next_chunk(body).await {
        let chunk = chunk.map_err(|error| InvokeFailure::InvalidRequest {
            message: format!("Could not read the request body: {error}"),
        })?;
        let Some(data) = chunk else {
            continue;
        };
        let length = payload.len().saturating_add(data.len());
        if length > limit {
            return Err(too_large());
        }
        if !reservation.cover(length) {
            return Err(no_room());
        }
        payload.extend_from_slice(&data);
    }
    Ok(payload.freeze())
}

fn body_timeout(timeout: Duration) -> ApiError {
    InvokeFailure::InvalidRequest {
        message: format!(
            "The request body did not arrive within {} s.",
            timeout.as_secs_f64()
        ),
    }
    .into()
}

/// Lambda accepts only JSON payloads (any JSON value, or nothing at all).
fn check_json(payload: &[u8]) -> Result<(), ApiError> {
    if payload.is_empty() {
        return Ok(());
    }
    // JSON is UTF-8, and skipping a string (IgnoredAny) does not check it: invalid UTF-8
    // inside one was answered 200 (issue 14, defect 11).
    let text = std::str::from_utf8(payload).map_err(|error| -> ApiError {
        InvokeFailure::InvalidRequest {
            message: format!(
                "Could not parse request body into json: Could not parse payload into json: \
                 {error}"
            ),
        }
        .into()
    })?;
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(drop)
        .map_err(|error| {
            InvokeFailure::InvalidRequest {
                message: format!(
                    "Could not parse request body into json: Could not parse payload into json: \
                     {error}"
                ),
            }
            .into()
        })
}

/// Reads and drops what is left of a request's body, so the answer reaches a client that
/// sends its whole body before reading: hyper would otherwise close the connection under it.
/// A client that waits for `100 Continue` has sent nothing yet, one that announces more than
/// [`DISCARD_LIMIT`] is not worth the wait, and none is waited for past `deadline` or while it
/// sends nothing for [`DISCARD_PAUSE`]: those get the answer and a closed connection. `true`
/// when the body was read to its end.
async fn discard_rest(body: &mut Body, headers: &HeaderMap, deadline: Instant) -> bool {
    if body.is_end_stream() {
        return true;
    }
    if headers.contains_key(header::EXPECT)
        || declared_length(headers).is_some_and(|length| length > DISCARD_LIMIT)
    {
        return false;
    }
    let drain = async {
        let mut discarded = 0usize;
        while discarded <= DISCARD_LIMIT {
            match tokio::time::timeout(DISCARD_PAUSE, next_chunk(body)).await {
                Ok(Some(Ok(data))) => discarded += data.map_or(0, |data| data.len()),
                Ok(Some(Err(_))) | Err(_) => return false,
                Ok(None) => return true,
            }
        }
        false
    };
    tokio::time::timeout_at(deadline, drain)
        .await
        .unwrap_or(false)
}

#[cfg(test)]
#[path = "api_tests.rs"]
mod tests;

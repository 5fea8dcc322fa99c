//! The Lambda Runtime API (2018-06-01) over HTTP/1.1 on the loopback address the runtime finds
//! in `AWS_LAMBDA_RUNTIME_API`: routing, reading bodies (bounded: at most the payload limit is
//! kept, the rest is read and counted so the runtime still gets its 413), and rendering the
//! state machine's replies as Lambda renders them. Unknown paths get Go's `404 page not found`
//! and known paths with the wrong method a 405 with `Allow`, as Lambda's router does.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::Agent;
use super::lambda::ApiReply;
use super::machine::{Answer, InvokeFrame, PostBody};
use crate::protocol::{InitType, MAX_PAYLOAD};

const PREFIX: &str = "/2018-06-01";
const ERROR_TYPE_HEADER: &str = "lambda-runtime-function-error-type";
const ERROR_BODY_TRAILER: &str = "lambda-runtime-function-error-body";
const RESPONSE_MODE_HEADER: &str = "lambda-runtime-function-response-mode";

type HttpResponse = Response<Full<Bytes>>;

/// Accepts Runtime API connections until the process ends.
pub async fn serve(listener: TcpListener, agent: Arc<Agent>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!("Runtime API accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(agent.clone(), req));
            // Title-case header names, as Go's server writes them, for runtimes that compare
            // names case-sensitively.
            let conn = hyper::server::conn::http1::Builder::new()
                .title_case_headers(true)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "Runtime API connection ended: {e}");
            }
        });
    }
}

/// The routes Lambda's Runtime API has.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Ping,
    Next,
    Response(&'a str),
    InvocationError(&'a str),
    InitError,
    RestoreNext,
    RestoreError,
}

impl Route<'_> {
    fn method(&self) -> Method {
        match self {
            Route::Ping | Route::Next | Route::RestoreNext => Method::GET,
            _ => Method::POST,
        }
    }
}

/// Matches `path`; the restore routes exist only in snap-start environments, as on Lambda.
fn route(path: &str, init_type: InitType) -> Option<Route<'_>> {
    let rest = path.strip_prefix(PREFIX)?;
    let snap_start = init_type == InitType::SnapStart;
    match rest {
        "/ping" => return Some(Route::Ping),
        "/runtime/invocation/next" => return Some(Route::Next),
        "/runtime/init/error" => return Some(Route::InitError),
        "/runtime/restore/next" if snap_start => return Some(Route::RestoreNext),
        "/runtime/restore/error" if snap_start => return Some(Route::RestoreError),
        _ => {}
    }
    let id_and_action = rest.strip_prefix("/runtime/invocation/")?;
    let (id, action) = id_and_action.rsplit_once('/')?;
    if id.contains('/') {
        return None;
    }
    match action {
        "response" => Some(Route::Response(id)),
        "error" => Some(Route::InvocationError(id)),
        _ => None,
    }
}

async fn handle(agent: Arc<Agent>, req: Request<Incoming>) -> Result<HttpResponse, Infallible> {
    let init_type = agent.init_type();
    let path = req.uri().path().to_owned();
    let Some(route) = route(&path, init_type) else {
        tracing::debug!(method = %req.method(), %path, "Runtime API: no such path");
        return Ok(not_found());
    };
    let allowed = route.method();
    if req.method() != allowed {
        return Ok(method_not_allowed(allowed));
    }
    tracing::debug!(?route, "Runtime API request");
    let (parts, body) = req.into_parts();
    let answer = match route {
        Route::Ping => return Ok(plain(StatusCode::OK, "pong")),
        Route::Next => agent.with_machine(|m| m.next_invocation()),
        Route::RestoreNext => agent.with_machine(|m| m.restore_next()),
        Route::Response(id) => {
            let (body, trailers) = read_body(body).await;
            let mode = header_str(&parts.headers, RESPONSE_MODE_HEADER);
            let stream_error = trailers.as_ref().and_then(|t| {
                let ty = header_str(t, ERROR_TYPE_HEADER)?;
                let doc = t.get(ERROR_BODY_TRAILER).map(|v| v.as_bytes().to_vec());
                Some((ty.to_owned(), Bytes::from(doc.unwrap_or_default())))
            });
            let reply = agent.with_machine(|m| m.invocation_response(id, mode, body, stream_error));
            Answer::Now(reply)
        }
        Route::InvocationError(id) => {
            let (body, _) = read_body(body).await;
            let ty = header_str(&parts.headers, ERROR_TYPE_HEADER);
            Answer::Now(agent.with_machine(|m| m.invocation_error(id, ty, body)))
        }
        Route::InitError => {
            let (body, _) = read_body(body).await;
            let ty = header_str(&parts.headers, ERROR_TYPE_HEADER);
            Answer::Now(agent.with_machine(|m| m.init_error(ty, body)))
        }
        Route::RestoreError => {
            let (body, _) = read_body(body).await;
            let ty = header_str(&parts.headers, ERROR_TYPE_HEADER);
            Answer::Now(agent.with_machine(|m| m.restore_error(ty, body)))
        }
    };
    let reply = match answer {
        Answer::Now(reply) => reply,
        Answer::Later(rx) => match rx.await {
            Ok(reply) => reply,
            // The runtime exited or the agent is stopping: nobody will answer.
            Err(_) => ApiReply::Error {
                status: 500,
                error_type: "InternalServerError",
                message: "Internal Server Error".to_owned(),
            },
        },
    };
    Ok(render(reply))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Reads a request body, keeping at most `MAX_PAYLOAD` bytes but counting all of them. Reading
/// to the end (instead of answering early) matters: a client still writing its body when the
/// server closes gets a broken pipe instead of Lambda's 413. A body cut short by the runtime is
/// returned as far as it got.
async fn read_body(mut body: Incoming) -> (PostBody, Option<HeaderMap>) {
    let mut kept = BytesMut::new();
    let mut total = 0usize;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("Runtime API request body ended early: {e}");
                break;
            }
        };
        match frame.into_data() {
            Ok(data) => {
                total = total.saturating_add(data.len());
                if total <= MAX_PAYLOAD {
                    kept.extend_from_slice(&data);
                } else {
                    // Over the limit: keep counting, stop keeping.
                    kept.clear();
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    let body = PostBody {
        bytes: kept.freeze(),
        total_len: total,
    };
    (body, trailers)
}

fn json(status: StatusCode, body: String) -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn plain(status: StatusCode, text: &'static str) -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn not_found() -> HttpResponse {
    let mut resp = plain(StatusCode::NOT_FOUND, "404 page not found\n");
    resp.headers_mut().insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    resp
}

fn method_not_allowed(allowed: Method) -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    let allow = if allowed == Method::GET {
        HeaderValue::from_static("GET")
    } else {
        HeaderValue::from_static("POST")
    };
    resp.headers_mut().insert(ALLOW, allow);
    resp
}

/// Renders a reply as Lambda does (JSON documents end with a newline, as Go's encoder writes).
fn render(reply: ApiReply) -> HttpResponse {
    match reply {
        ApiReply::Invocation(event) => invocation(&event),
        ApiReply::RestoreResumed => {
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::OK;
            resp
        }
        ApiReply::Accepted => json(StatusCode::ACCEPTED, "{\"status\":\"OK\"}\n".to_owned()),
        ApiReply::Error {
            status,
            error_type,
            message,
        } => {
            let doc = serde_json::json!({ "errorMessage": message, "errorType": error_type });
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            json(status, format!("{doc}\n"))
        }
    }
}

/// An invocation: the event as the body, its context in `Lambda-Runtime-*` headers (empty
/// values are left out, as Lambda does).
fn invocation(frame: &InvokeFrame) -> HttpResponse {
    let event = frame.invoke();
    let mut resp = Response::new(Full::new(frame.payload()));
    let headers = resp.headers_mut();
    let deadline = event.deadline_ms.to_string();
    let fields = [
        ("lambda-runtime-aws-request-id", event.request_id),
        ("lambda-runtime-trace-id", event.trace_id),
        ("lambda-runtime-client-context", event.client_context),
        ("lambda-runtime-cognito-identity", event.cognito_identity),
        ("lambda-runtime-invoked-function-arn", event.function_arn),
        ("lambda-runtime-deadline-ms", &deadline),
    ];
    for (name, value) in fields {
        if value.is_empty() {
            continue;
        }
        // The machine refused invocations whose fields cannot be headers.
        match HeaderValue::from_bytes(value.as_bytes()) {
            Ok(v) => {
                headers.insert(HeaderName::from_static(name), v);
            }
            Err(_) => tracing::warn!(header = name, "invocation header value dropped"),
        }
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_lambdas_paths() {
        let od = InitType::OnDemand;
        let ss = InitType::SnapStart;
        assert_eq!(
            route("/2018-06-01/runtime/invocation/next", od),
            Some(Route::Next)
        );
        assert_eq!(
            route("/2018-06-01/runtime/invocation/abc-1/response", od),
            Some(Route::Response("abc-1"))
        );
        assert_eq!(
            route("/2018-06-01/runtime/invocation/abc/error", od),
            Some(Route::InvocationError("abc"))
        );
        assert_eq!(
            route("/2018-06-01/runtime/invocation//error", od),
            Some(Route::InvocationError(""))
        );
        assert_eq!(route("/2018-06-01/runtime/invocation/a/b/error", od), None);
        assert_eq!(route("/2018-06-01/runtime/restore/next", od), None);
        assert_eq!(
            route("/2018-06-01/runtime/restore/next", ss),
            Some(Route::RestoreNext)
        );
        assert_eq!(route("/2018-06-01/runtime/invocation/next/", od), None);
        assert_eq!(route("/runtime/invocation/next", od), None);
    }
}

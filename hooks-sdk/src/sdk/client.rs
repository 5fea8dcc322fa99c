//! A small blocking client for Lambda's Runtime API (what `AWS_LAMBDA_RUNTIME_API` names): one
//! HTTP/1.1 keep-alive connection driven by a private single-thread tokio runtime, so function
//! code stays synchronous. The connection is re-opened when it breaks and dropped on request
//! (after a restore, as Lambda's own clients do).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue, USER_AGENT};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A Runtime API request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The private async runtime could not start.
    #[error("cannot start the client's async runtime")]
    Runtime(#[source] std::io::Error),
    /// Connecting to the Runtime API failed.
    #[error("cannot connect to the Runtime API at {addr}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("Runtime API request {path} failed")]
    Http {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: hyper::Error,
    },
    /// A request could not be built (an invalid request id or header).
    #[error("invalid Runtime API request {path}")]
    Request {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: hyper::http::Error,
    },
}

/// A response: status, headers, body.
#[derive(Debug)]
pub struct ApiResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

/// The client. See the module docs.
pub struct ApiClient {
    rt: tokio::runtime::Runtime,
    addr: String,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("addr", &self.addr)
            .finish()
    }
}

impl ApiClient {
    /// A client for `addr` (`host:port`); connects on first use.
    pub fn new(addr: impl Into<String>) -> Result<ApiClient, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        Ok(ApiClient {
            rt,
            addr: addr.into(),
            conn: None,
        })
    }

    /// Drops the connection; the next request opens a new one.
    pub fn reset(&mut self) {
        self.conn = None;
    }

    /// Sends one request and reads the whole response.
    pub fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<ApiResponse, ClientError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.addr.as_str())
            .header(
                USER_AGENT,
                HeaderValue::from_static(concat!("thaw-hooks-sdk/", env!("CARGO_PKG_VERSION"))),
            );
        if !body.is_empty() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let req = builder
            .body(Full::new(body))
            .map_err(|source| ClientError::Request {
                path: path.to_owned(),
                source,
            })?;
        let conn = self.conn.take();
        let addr = self.addr.clone();
        let (result, conn) = self.rt.block_on(async move {
            let mut sender = match conn {
                Some(s) if !s.is_closed() => s,
                _ => match connect(&addr).await {
                    Ok(s) => s,
                    Err(e) => return (Err(e), None),
                },
            };
            let http_err = |source| ClientError::Http {
                path: path.to_owned(),
                source,
            };
            if let Err(e) = sender.ready().await {
                return (Err(http_err(e)), None);
            }
            let resp = match sender.send_request(req).await {
                Ok(r) => r,
                Err(e) => return (Err(http_err(e)), None),
            };
            let (parts, body) = resp.into_parts();
            match body.collect().await {
                Ok(collected) => (
                    Ok(ApiResponse {
                        status: parts.status,
                        headers: parts.headers,
                        body: collected.to_bytes(),
                    }),
                    Some(sender),
                ),
                Err(e) => (Err(http_err(e)), None),
            }
        });
        self.conn = conn;
        result
    }
}

async fn connect(addr: &str) -> Result<SendRequest<Full<Bytes>>, ClientError> {
    let connect_err = |source| ClientError::Connect {
        addr: addr.to_owned(),
        source,
    };
    let stream = TcpStream::connect(addr).await.map_err(connect_err)?;
    // Requests are small and latency matters more than packet count.
    stream.set_nodelay(true).map_err(connect_err)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ClientError::Http {
            path: "(handshake)".to_owned(),
            source,
        })?;
    // Driven only while a request is in `block_on`, which is the only time it has work.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("Runtime API connection ended: {e}");
        }
    });
    Ok(sender)
}

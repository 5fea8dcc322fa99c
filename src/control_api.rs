//! The control socket of `thaw run --api-sock PATH`: HTTP/1.1 over a Unix socket, shaped like
//! Firecracker's API so its users' tools and habits carry over — pause and resume
//! (`PATCH /vm`), snapshot a paused VM (`PUT /snapshot/create`), and end it
//! (`PUT /actions`). Any guest can be snapshotted this way, agent or not. docs/api.md has the
//! requests and answers.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use vmm_core::machine::{MachineController, Paused};

use crate::capture::{Sealing, SnapshotTarget, capture};

/// Largest request body accepted: every request is a small JSON object.
const MAX_BODY: usize = 16 * 1024;

/// The control socket could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Something is already at the socket's path.
    #[error("{} already exists; remove it or choose another --api-sock path", .0.display())]
    PathExists(PathBuf),
    /// The socket could not be made.
    #[error("cannot listen on {}", path.display())]
    Listen {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What the API acts on.
pub struct ApiContext {
    /// The machine.
    pub controller: MachineController,
    /// How snapshots made through the API are sealed.
    pub sealing: Sealing,
    /// A lazily restored guest's page server. Memory it has not installed yet is not present
    /// in the mapping (and would be elided as never touched), so a snapshot first has it
    /// install everything.
    pub pager: Option<std::sync::Arc<restore_daemon::pager::PageServer>>,
}

struct Api {
    ctx: ApiContext,
    /// The machine's pause guard while the API holds it paused (`PATCH /vm` makes and consumes
    /// it, snapshots borrow it, so a resume cannot overlap a snapshot reading guest memory).
    /// Held locked for the whole of every request that changes the machine, so the reported
    /// state is the real one.
    paused: Mutex<Option<Paused>>,
}

/// The control socket, served on its own thread; removed from the filesystem when dropped.
pub struct ApiServer {
    path: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Refuses a socket path that something already occupies (checked again by [`start`]; early
/// so `thaw run` says so before it boots anything).
pub fn check_path(path: &Path) -> Result<(), ApiError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Err(ApiError::PathExists(path.to_owned())),
        Err(_) => Ok(()),
    }
}

/// Starts serving `ctx` on a new Unix socket at `path`.
pub fn start(path: &Path, ctx: ApiContext) -> Result<ApiServer, ApiError> {
    check_path(path)?;
    let listen_err = |source| ApiError::Listen {
        path: path.to_owned(),
        source,
    };
    let std_listener = std::os::unix::net::UnixListener::bind(path).map_err(listen_err)?;
    // Whoever can connect can read the guest's memory (through a snapshot) and stop it: only
    // this user may.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(listen_err)?;
    std_listener.set_nonblocking(true).map_err(listen_err)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(listen_err)?;
    let api = Arc::new(Api {
        ctx,
        paused: Mutex::new(None),
    });
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::UnixListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "API socket unusable");
                        return;
                    }
                };
                loop {
                    tokio::select! {
                        _ = &mut rx => return,
                        accepted = listener.accept() => match accepted {
                            Ok((stream, _)) => {
                                let api = api.clone();
                                tokio::spawn(async move {
                                    let service = service_fn(move |req| handle(api.clone(), req));
                                    let conn = hyper::server::conn::http1::Builder::new()
                                        .serve_connection(TokioIo::new(stream), service);
                                    if let Err(e) = conn.await {
                                        tracing::debug!("API connection ended: {e}");
                                    }
                                });
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "API accept failed");
                                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            }
                        },
                    }
                }
            });
        })
        .map_err(listen_err)?;
    Ok(ApiServer {
        path: path.to_owned(),
        shutdown: Some(tx),
        thread: Some(thread),
    })
}

type HttpResponse = Response<Full<Bytes>>;

fn json(status: StatusCode, value: &serde_json::Value) -> HttpResponse {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Firecracker's error shape.
fn fault(status: StatusCode, message: impl std::fmt::Display) -> HttpResponse {
    json(
        status,
        &serde_json::json!({ "fault_message": message.to_string() }),
    )
}

fn no_content() -> HttpResponse {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmPatch {
    state: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotCreate {
    snapshot_path: PathBuf,
    #[serde(default)]
    replace: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Action {
    action_type: String,
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes.
async fn body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, HttpResponse> {
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(fault(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {MAX_BODY} bytes"),
            ));
        }
        Err(e) => {
            return Err(fault(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            ));
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        fault(
            StatusCode::BAD_REQUEST,
            format!("invalid JSON request: {e}"),
        )
    })
}

async fn handle(api: Arc<Api>, req: Request<Incoming>) -> Result<HttpResponse, Infallible> {
    let allowed = match req.uri().path() {
        "/" => Method::GET,
        "/vm" => Method::PATCH,
        "/snapshot/create" | "/actions" => Method::PUT,
        other => {
            return Ok(fault(
                StatusCode::NOT_FOUND,
                format!("no such resource: {other}"),
            ));
        }
    };
    if req.method() != allowed {
        let mut r = fault(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} takes {allowed}", req.uri().path()),
        );
        if let Ok(v) = HeaderValue::from_str(allowed.as_str()) {
            r.headers_mut().insert(ALLOW, v);
        }
        return Ok(r);
    }
    let response = match req.uri().path() {
        "/" => info(&api),
        "/vm" => match body::<VmPatch>(req).await {
            Ok(patch) => blocking(api, move |api| patch_vm(api, &patch.state)).await,
            Err(r) => r,
        },
        "/snapshot/create" => match body::<SnapshotCreate>(req).await {
            Ok(create) => blocking(api, move |api| create_snapshot(api, &create)).await,
            Err(r) => r,
        },
        _ => match body::<Action>(req).await {
            Ok(action) => action_response(&api, &action.action_type),
            Err(r) => r,
        },
    };
    Ok(response)
}

/// Runs `f` off the async thread (pausing and writing snapshots block).
async fn blocking(
    api: Arc<Api>,
    f: impl FnOnce(&Api) -> HttpResponse + Send + 'static,
) -> HttpResponse {
    match tokio::task::spawn_blocking(move || f(&api)).await {
        Ok(r) => r,
        Err(e) => fault(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("request failed: {e}"),
        ),
    }
}

fn lock(api: &Api) -> std::sync::MutexGuard<'_, Option<Paused>> {
    match api.paused.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn info(api: &Api) -> HttpResponse {
    let state = match *lock(api) {
        None => "Running",
        Some(_) => "Paused",
    };
    json(
        StatusCode::OK,
        &serde_json::json!({
            "app_name": "thaw",
            "vmm_version": env!("CARGO_PKG_VERSION"),
            "state": state,
        }),
    )
}

fn patch_vm(api: &Api, wanted: &str) -> HttpResponse {
    let mut paused = lock(api);
    // Pausing a paused VM or resuming a running one is a no-op, but still an error once the VM
    // has exited.
    let result = match wanted {
        "Paused" => match paused.as_ref() {
            Some(_) => api.ctx.controller.check_alive(),
            None => api
                .ctx
                .controller
                .pause()
                .map(|guard| *paused = Some(guard)),
        },
        "Resumed" => match paused.take() {
            Some(guard) => guard.resume(),
            None => api.ctx.controller.check_alive(),
        },
        other => {
            return fault(
                StatusCode::BAD_REQUEST,
                format!("state must be \"Paused\" or \"Resumed\", not {other:?}"),
            );
        }
    };
    match result {
        Ok(()) => no_content(),
        Err(e) => fault(StatusCode::BAD_REQUEST, e),
    }
}

fn create_snapshot(api: &Api, request: &SnapshotCreate) -> HttpResponse {
    let held = lock(api);
    let Some(paused) = held.as_ref() else {
        return fault(
            StatusCode::BAD_REQUEST,
            "the VM must be paused first (PATCH /vm {\"state\": \"Paused\"})",
        );
    };
    if let Some(pager) = &api.ctx.pager {
        if let Err(e) = pager.install_all() {
            return fault(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the restored guest's memory could not be completed: {e}"),
            );
        }
    }
    let target = SnapshotTarget {
        out: &request.snapshot_path,
        replace: request.replace,
        sealing: &api.ctx.sealing,
    };
    match capture(paused, &target) {
        Ok((summary, capture)) => json(
            StatusCode::OK,
            &serde_json::json!({
                "snapshot_id": summary.snapshot_id.to_string(),
                "path": summary.path,
                "memory_bytes": summary.memory_bytes,
                "file_bytes": summary.file_bytes,
                "zero_pages": summary.zero_pages,
                "capture_ms": capture.as_secs_f64() * 1e3,
                "write_ms": summary.elapsed.as_secs_f64() * 1e3,
            }),
        ),
        Err(e) => fault(
            StatusCode::BAD_REQUEST,
            format!("{:#}", anyhow::Error::from(e)),
        ),
    }
}

fn action_response(api: &Api, action: &str) -> HttpResponse {
    match action {
        "Stop" => {
            api.ctx.controller.stop();
            no_content()
        }
        other => fault(
            StatusCode::BAD_REQUEST,
            format!("unknown action_type {other:?} (Thaw knows \"Stop\")"),
        ),
    }
}

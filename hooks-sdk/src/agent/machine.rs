//! The agent's state machine: Lambda's runtime states (as AWS's Runtime Interface Emulator
//! names them, since those names appear in Lambda's error messages) joined to the host
//! protocol. Every Runtime API request, host frame and runtime exit is one method call here;
//! the machine answers the HTTP request (now, or later through a channel for the blocking
//! `next` calls) and queues frames for the host. It does no I/O itself, so every transition is
//! unit-tested without sockets.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::lambda::{
    ApiReply, Failure, ToHost, exit_failure, invoke_exit_failure, lambda_error_body,
    response_too_large_failure, valid_error_type,
};
use crate::protocol::{InitType, MAX_PAYLOAD};

pub use super::invoke_frame::InvokeFrame;

/// Where the runtime is in Lambda's lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeState {
    /// Started, initializing.
    Started,
    /// Posted `/runtime/init/error` (or exited during init).
    InitError,
    /// Waiting in `/runtime/invocation/next`.
    Ready,
    /// Handed an invocation, working on it.
    Running,
    /// Waiting in `/runtime/restore/next` (the snapshot is taken here).
    RestoreReady,
    /// Restored; running its after-restore hooks.
    Restoring,
    /// Answered its invocation.
    ResponseSent,
    /// Posted `/runtime/restore/error` (or exited while restoring).
    RestoreError,
    /// The runtime process is gone.
    Exited,
}

impl RuntimeState {
    /// The name Lambda uses in `InvalidStateTransition` messages.
    pub fn name(self) -> &'static str {
        match self {
            RuntimeState::Started => "Started",
            RuntimeState::InitError => "InitError",
            RuntimeState::Ready => "Ready",
            RuntimeState::Running => "Running",
            RuntimeState::RestoreReady => "RestoreReady",
            RuntimeState::Restoring => "Restoring",
            RuntimeState::ResponseSent => "RuntimeResponseSentState",
            RuntimeState::RestoreError => "RuntimeRestoreErrorState",
            RuntimeState::Exited => "Exited",
        }
    }
}

/// A request body the Runtime API read: the bytes kept (at most [`MAX_PAYLOAD`]) and the
/// length the runtime sent.
#[derive(Clone, Debug, Default)]
pub struct PostBody {
    /// The body, when it fits.
    pub bytes: Bytes,
    /// Bytes the runtime sent in all.
    pub total_len: usize,
}

impl PostBody {
    /// A body that was read whole.
    pub fn whole(bytes: Bytes) -> PostBody {
        PostBody {
            total_len: bytes.len(),
            bytes,
        }
    }

    fn too_large(&self) -> bool {
        self.total_len > MAX_PAYLOAD
    }
}

/// How a Runtime API request is answered.
#[derive(Debug)]
pub enum Answer {
    /// At once.
    Now(ApiReply),
    /// When the machine sends on the channel (the blocking `next` calls).
    Later(oneshot::Receiver<ApiReply>),
}

/// What a `Restored` frame changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreOutcome {
    /// The runtime waiting in `restore/next` was released.
    ReleasedRestoreNext,
    /// The runtime was waiting in `invocation/next` (it has no hooks); `RestoreDone` was sent.
    ResumedNext,
    /// Nothing was waiting for a restore; the frame only refreshed entropy and clock.
    Unexpected(RuntimeState),
}

/// The state machine. See the module docs.
#[derive(Debug)]
pub struct Machine {
    init_type: InitType,
    state: RuntimeState,
    outbox: mpsc::UnboundedSender<ToHost>,
    /// The host sent `Checkpoint` (snap-start).
    checkpoint_requested: bool,
    /// Invocations may be handed out (on-demand: always; snap-start: once restored).
    serving: bool,
    /// The last invocation handed to the runtime; posts must name its id.
    current: Option<Arc<InvokeFrame>>,
    /// The invocation the host awaits an answer for.
    inflight: Option<String>,
    /// An invocation received but not yet handed out.
    queued: Option<Arc<InvokeFrame>>,
    next_waiters: VecDeque<oneshot::Sender<ApiReply>>,
    restore_waiter: Option<oneshot::Sender<ApiReply>>,
    /// What ended the environment (init or restore failure), answered to later invokes.
    fatal: Option<Failure>,
    /// Why the runtime exited.
    exit_reason: Option<String>,
}

fn invalid_transition(from: RuntimeState, to: &str) -> ApiReply {
    ApiReply::Error {
        status: 403,
        error_type: "InvalidStateTransition",
        message: format!(
            "State transition from {} to {to} failed for runtime. Error: State transition is not allowed",
            from.name()
        ),
    }
}

fn invalid_request_id() -> ApiReply {
    ApiReply::Error {
        status: 400,
        error_type: "InvalidRequestID",
        message: "Invalid request ID".to_owned(),
    }
}

impl Machine {
    /// A machine for a runtime that has just been started.
    pub fn new(init_type: InitType, outbox: mpsc::UnboundedSender<ToHost>) -> Machine {
        Machine {
            init_type,
            state: RuntimeState::Started,
            outbox,
            checkpoint_requested: false,
            serving: init_type == InitType::OnDemand,
            current: None,
            inflight: None,
            queued: None,
            next_waiters: VecDeque::new(),
            restore_waiter: None,
            fatal: None,
            exit_reason: None,
        }
    }

    /// The runtime's state.
    pub fn state(&self) -> RuntimeState {
        self.state
    }

    /// How this environment is initialized.
    pub fn init_type(&self) -> InitType {
        self.init_type
    }

    fn send(&self, frame: ToHost) {
        // The link task owns the receiver for the agent's whole life; if it is gone the agent
        // is shutting down and the frame has no one to go to.
        if self.outbox.send(frame).is_err() {
            tracing::debug!("host link gone; frame dropped");
        }
    }

    fn snapshot_ready(&self) {
        tracing::info!("runtime is waiting for the snapshot: SnapshotReady");
        self.send(ToHost::SnapshotReady);
    }

    /// Hands `event` to the first waiting `next` call still listening; false if none was.
    fn deliver(&mut self, event: Arc<InvokeFrame>) -> bool {
        while let Some(waiter) = self.next_waiters.pop_front() {
            if waiter.send(ApiReply::Invocation(event.clone())).is_ok() {
                self.state = RuntimeState::Running;
                self.current = Some(event);
                return true;
            }
        }
        false
    }

    fn park_next(&mut self) -> Answer {
        if self.serving {
            if let Some(event) = self.queued.take() {
                self.state = RuntimeState::Running;
                self.current = Some(event.clone());
                return Answer::Now(ApiReply::Invocation(event));
            }
        }
        let (tx, rx) = oneshot::channel();
        self.next_waiters.push_back(tx);
        Answer::Later(rx)
    }

    /// `GET /runtime/invocation/next`.
    pub fn next_invocation(&mut self) -> Answer {
        match self.state {
            RuntimeState::Started => {
                self.state = RuntimeState::Ready;
                match self.init_type {
                    InitType::OnDemand => {
                        tracing::info!("runtime initialized: Ready");
                        self.send(ToHost::Ready);
                    }
                    // A runtime without snapshot hooks: the snapshot is taken while it waits
                    // here, as Lambda does.
                    InitType::SnapStart if self.checkpoint_requested => self.snapshot_ready(),
                    InitType::SnapStart => {}
                }
                self.park_next()
            }
            RuntimeState::Restoring => {
                self.state = RuntimeState::Ready;
                self.serving = true;
                tracing::info!("after-restore hooks done: RestoreDone");
                self.send(ToHost::RestoreDone);
                self.park_next()
            }
            RuntimeState::ResponseSent | RuntimeState::Ready => {
                self.state = RuntimeState::Ready;
                self.park_next()
            }
            // Lambda hands a runtime that asks again mid-invocation the same invocation.
            RuntimeState::Running => match &self.current {
                Some(event) => Answer::Now(ApiReply::Invocation(event.clone())),
                None => Answer::Now(invalid_transition(self.state, "Ready")),
            },
            state => Answer::Now(invalid_transition(state, "Ready")),
        }
    }

    /// `GET /runtime/restore/next` (snap-start only; the router answers 404 otherwise).
    pub fn restore_next(&mut self) -> Answer {
        if self.state != RuntimeState::Started {
            // Lambda names the target state "Ready" here too.
            return Answer::Now(invalid_transition(self.state, "Ready"));
        }
        self.state = RuntimeState::RestoreReady;
        if self.checkpoint_requested {
            self.snapshot_ready();
        }
        let (tx, rx) = oneshot::channel();
        self.restore_waiter = Some(tx);
        Answer::Later(rx)
    }

    /// Checks that a post names the current invocation and that the runtime is working on it.
    fn check_post(&self, request_id: &str, target: &str) -> Result<String, ApiReply> {
        match &self.current {
            Some(cur) if !request_id.is_empty() && cur.invoke().request_id == request_id => {}
            _ => return Err(invalid_request_id()),
        }
        if self.state != RuntimeState::Running {
            return Err(invalid_transition(self.state, target));
        }
        Ok(request_id.to_owned())
    }

    fn finish_invocation(&mut self, frame: ToHost) {
        self.state = RuntimeState::ResponseSent;
        self.inflight = None;
        self.send(frame);
    }

    /// `POST /runtime/invocation/{id}/response`. `response_mode` is the
    /// `Lambda-Runtime-Function-Response-Mode` header; `stream_error` the error type and body
    /// from a streamed response's trailers.
    pub fn invocation_response(
        &mut self,
        request_id: &str,
        response_mode: Option<&str>,
        body: PostBody,
        stream_error: Option<(String, Bytes)>,
    ) -> ApiReply {
        let id = match self.check_post(request_id, "InvocationResponse") {
            Ok(id) => id,
            Err(reply) => return reply,
        };
        if response_mode.is_some_and(|m| m != "streaming") {
            self.finish_invocation(ToHost::InvokeError {
                request_id: id,
                failure: Failure::new("Runtime.InvalidResponseModeHeader", Bytes::new()),
            });
            return ApiReply::Error {
                status: 400,
                error_type: "InvalidFunctionResponseMode",
                message: "Invalid function response mode".to_owned(),
            };
        }
        if body.too_large() {
            tracing::warn!(request_id = %id, size = body.total_len, "response too large");
            self.finish_invocation(ToHost::InvokeError {
                request_id: id,
                failure: response_too_large_failure(body.total_len),
            });
            return ApiReply::too_large();
        }
        let frame = match stream_error {
            Some((error_type, error_body)) => ToHost::InvokeError {
                request_id: id,
                failure: Failure::new(valid_error_type(Some(&error_type)), error_body),
            },
            None => ToHost::Response {
                request_id: id,
                payload: body.bytes,
            },
        };
        self.finish_invocation(frame);
        ApiReply::Accepted
    }

    /// `POST /runtime/invocation/{id}/error`.
    pub fn invocation_error(
        &mut self,
        request_id: &str,
        error_type: Option<&str>,
        body: PostBody,
    ) -> ApiReply {
        let id = match self.check_post(request_id, "InvocationErrorResponse") {
            Ok(id) => id,
            Err(reply) => return reply,
        };
        if body.too_large() {
            self.finish_invocation(ToHost::InvokeError {
                request_id: id,
                failure: response_too_large_failure(body.total_len),
            });
            return ApiReply::too_large();
        }
        self.finish_invocation(ToHost::InvokeError {
            request_id: id,
            failure: Failure::new(valid_error_type(error_type), body.bytes),
        });
        ApiReply::Accepted
    }

    /// An init or restore error body: the runtime's, or Lambda's shape saying it was too big.
    fn error_body(error_type: &str, body: &PostBody) -> Bytes {
        if body.too_large() {
            lambda_error_body(
                error_type,
                &format!(
                    "Error body of {} bytes exceeded maximum allowed payload size ({MAX_PAYLOAD} bytes).",
                    body.total_len
                ),
            )
        } else {
            body.bytes.clone()
        }
    }

    fn reply_for(body: &PostBody) -> ApiReply {
        if body.too_large() {
            ApiReply::too_large()
        } else {
            ApiReply::Accepted
        }
    }

    /// `POST /runtime/init/error`.
    pub fn init_error(&mut self, error_type: Option<&str>, body: PostBody) -> ApiReply {
        match self.state {
            // Lambda still accepts restore-hook failures on init/error.
            RuntimeState::Restoring => self.restore_error(error_type, body),
            RuntimeState::Started => {
                let error_type = valid_error_type(error_type);
                let failure = Failure::new(&error_type, Self::error_body(&error_type, &body));
                self.state = RuntimeState::InitError;
                self.fatal = Some(failure.clone());
                tracing::warn!(error_type = %error_type, "runtime reported an init error");
                // Before-snapshot hooks fail during init; the host hears it as a checkpoint
                // failure (Python names it BeforeSnapshot, Java BeforeCheckpoint).
                if matches!(
                    error_type.as_str(),
                    "Runtime.BeforeSnapshotError" | "Runtime.BeforeCheckpointError"
                ) {
                    self.send(ToHost::CheckpointError(failure));
                } else {
                    self.send(ToHost::InitError(failure));
                }
                Self::reply_for(&body)
            }
            state => invalid_transition(state, "InitError"),
        }
    }

    /// `POST /runtime/restore/error` (snap-start only).
    pub fn restore_error(&mut self, error_type: Option<&str>, body: PostBody) -> ApiReply {
        if self.state != RuntimeState::Restoring {
            return invalid_transition(self.state, "RuntimeRestoreErrorState");
        }
        let error_type = valid_error_type(error_type);
        let failure = Failure::new(&error_type, Self::error_body(&error_type, &body));
        self.state = RuntimeState::RestoreError;
        self.fatal = Some(failure.clone());
        tracing::warn!(error_type = %error_type, "runtime reported an after-restore error");
        self.send(ToHost::RestoreError(failure));
        Self::reply_for(&body)
    }

    /// Host `Checkpoint`.
    pub fn checkpoint(&mut self) {
        let refuse = |why: String| {
            tracing::warn!("refusing Checkpoint: {why}");
            ToHost::CheckpointError(Failure::new(
                "Thaw.InvalidState",
                lambda_error_body("Thaw.InvalidState", &why),
            ))
        };
        if self.init_type != InitType::SnapStart {
            self.send(refuse("this environment is on-demand".to_owned()));
            return;
        }
        if self.serving {
            self.send(refuse("this environment was already restored".to_owned()));
            return;
        }
        match self.state {
            RuntimeState::Started => self.checkpoint_requested = true,
            // Already waiting: the snapshot can be taken now (again, if the host asks again).
            RuntimeState::RestoreReady | RuntimeState::Ready => {
                self.checkpoint_requested = true;
                self.snapshot_ready();
            }
            state => self.send(refuse(format!("the runtime is in state {}", state.name()))),
        }
    }

    /// Host `Restored`, after entropy and clock were refreshed.
    pub fn restored(&mut self) -> RestoreOutcome {
        match self.state {
            RuntimeState::RestoreReady => {
                self.state = RuntimeState::Restoring;
                if let Some(waiter) = self.restore_waiter.take() {
                    if waiter.send(ApiReply::RestoreResumed).is_err() {
                        tracing::warn!("the runtime stopped waiting in restore/next");
                    }
                }
                RestoreOutcome::ReleasedRestoreNext
            }
            RuntimeState::Ready if !self.serving => {
                self.serving = true;
                self.send(ToHost::RestoreDone);
                if let Some(event) = self.queued.take() {
                    if !self.deliver(event.clone()) {
                        self.queued = Some(event);
                    }
                }
                RestoreOutcome::ResumedNext
            }
            state => RestoreOutcome::Unexpected(state),
        }
    }

    /// Host `Invoke`.
    pub fn invoke(&mut self, event: InvokeFrame) {
        let id = event.invoke().request_id.to_owned();
        if let Some(busy) = &self.inflight {
            let msg = format!("invocation {busy} is still running; {id} refused");
            tracing::warn!("{msg}");
            self.send(ToHost::InvokeError {
                request_id: id,
                failure: Failure::new("Thaw.AgentBusy", lambda_error_body("Thaw.AgentBusy", &msg)),
            });
            return;
        }
        // An environment whose init or restore failed answers every invocation with that
        // failure; one whose runtime died later, with Lambda's exit error for this request.
        if let Some(fatal) = &self.fatal {
            self.send(ToHost::InvokeError {
                request_id: id,
                failure: fatal.clone(),
            });
            return;
        }
        if let Some(reason) = &self.exit_reason {
            self.send(ToHost::InvokeError {
                failure: invoke_exit_failure(&id, reason),
                request_id: id,
            });
            return;
        }
        if let Some(field) = super::lambda::unsendable_header(&event.invoke()) {
            let msg = format!("the invocation's {field} cannot be sent as an HTTP header");
            self.send(ToHost::InvokeError {
                request_id: id,
                failure: Failure::new(
                    "Thaw.InvalidInvoke",
                    lambda_error_body("Thaw.InvalidInvoke", &msg),
                ),
            });
            return;
        }
        self.inflight = Some(id);
        let event = Arc::new(event);
        if !(self.serving && self.state == RuntimeState::Ready && self.deliver(event.clone())) {
            // Handed out when the runtime next asks (and, in snap-start, once restored).
            self.queued = Some(event);
        }
    }

    /// The runtime process exited; `reason` is Lambda's wording ("exit status 1").
    pub fn runtime_exited(&mut self, reason: &str) {
        let state = self.state;
        match state {
            RuntimeState::Started | RuntimeState::RestoreReady => {
                self.fatal = Some(exit_failure(reason));
                self.send(ToHost::InitError(exit_failure(reason)));
            }
            RuntimeState::Ready if !self.serving => {
                self.fatal = Some(exit_failure(reason));
                self.send(ToHost::InitError(exit_failure(reason)));
            }
            RuntimeState::Restoring => {
                self.fatal = Some(exit_failure(reason));
                self.send(ToHost::RestoreError(exit_failure(reason)));
            }
            _ => {}
        }
        if let Some(id) = self.inflight.take() {
            self.send(ToHost::InvokeError {
                failure: invoke_exit_failure(&id, reason),
                request_id: id,
            });
        }
        self.state = RuntimeState::Exited;
        self.exit_reason = Some(reason.to_owned());
        self.queued = None;
        self.next_waiters.clear();
        self.restore_waiter = None;
    }

    /// The runtime could not be started at all (Lambda: `Runtime.InvalidEntrypoint`).
    pub fn runtime_failed_to_start(&mut self, why: &str) {
        let failure = Failure::new(
            "Runtime.InvalidEntrypoint",
            lambda_error_body("Runtime.InvalidEntrypoint", why),
        );
        self.state = RuntimeState::Exited;
        self.exit_reason = Some(why.to_owned());
        self.fatal = Some(failure.clone());
        self.send(ToHost::InitError(failure));
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;

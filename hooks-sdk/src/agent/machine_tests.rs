//! Unit tests of the agent's state machine: every transition the Runtime API and the host can
//! cause, checked through the replies and the frames queued for the host.

use super::*;
use crate::protocol::Invoke;

fn machine(init_type: InitType) -> (Machine, mpsc::UnboundedReceiver<ToHost>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Machine::new(init_type, tx), rx)
}

fn frames(rx: &mut mpsc::UnboundedReceiver<ToHost>) -> Vec<ToHost> {
    let mut out = Vec::new();
    while let Ok(f) = rx.try_recv() {
        out.push(f);
    }
    out
}

fn event_with(id: &str, trace_id: &str) -> InvokeFrame {
    InvokeFrame::encode(&Invoke {
        request_id: id,
        deadline_ms: 1_800_000_000_000,
        function_arn: "arn:aws:lambda:us-east-1:1:function:f",
        trace_id,
        payload: b"{}",
        ..Invoke::default()
    })
    .unwrap()
}

fn event(id: &str) -> InvokeFrame {
    event_with(id, "")
}

fn later(answer: Answer) -> oneshot::Receiver<ApiReply> {
    match answer {
        Answer::Later(rx) => rx,
        Answer::Now(reply) => panic!("expected to wait, got {reply:?}"),
    }
}

fn invocation_id(reply: ApiReply) -> String {
    match reply {
        ApiReply::Invocation(e) => e.invoke().request_id.to_owned(),
        other => panic!("expected an invocation, got {other:?}"),
    }
}

fn status(reply: &ApiReply) -> u16 {
    match reply {
        ApiReply::Invocation(_) | ApiReply::RestoreResumed => 200,
        ApiReply::Accepted => 202,
        ApiReply::Error { status, .. } => *status,
    }
}

#[test]
fn on_demand_ready_invoke_response_cycle() {
    let (mut m, mut rx) = machine(InitType::OnDemand);
    let mut waiting = later(m.next_invocation());
    assert_eq!(frames(&mut rx), [ToHost::Ready]);
    m.invoke(event("a"));
    assert_eq!(invocation_id(waiting.try_recv().unwrap()), "a");
    assert_eq!(m.state(), RuntimeState::Running);
    let reply = m.invocation_response("a", None, PostBody::whole(Bytes::from_static(b"1")), None);
    assert_eq!(reply, ApiReply::Accepted);
    assert_eq!(
        frames(&mut rx),
        [ToHost::Response {
            request_id: "a".into(),
            payload: Bytes::from_static(b"1")
        }]
    );
    // A second answer to the same invocation is a state error; another id is unknown.
    let again = m.invocation_response("a", None, PostBody::default(), None);
    assert_eq!(status(&again), 403);
    let unknown = m.invocation_error("zzz", None, PostBody::default());
    assert_eq!(status(&unknown), 400);
    // Ready is announced only once.
    waiting = later(m.next_invocation());
    assert!(frames(&mut rx).is_empty());
    m.invoke(event("b"));
    assert_eq!(invocation_id(waiting.try_recv().unwrap()), "b");
}

#[test]
fn queued_invoke_is_handed_out_on_next_and_busy_is_refused() {
    let (mut m, mut rx) = machine(InitType::OnDemand);
    m.invoke(event("early"));
    m.invoke(event("second"));
    match &frames(&mut rx)[..] {
        [
            ToHost::InvokeError {
                request_id,
                failure,
            },
        ] => {
            assert_eq!(request_id, "second");
            assert_eq!(failure.error_type, "Thaw.AgentBusy");
        }
        other => panic!("{other:?}"),
    }
    match m.next_invocation() {
        Answer::Now(reply) => assert_eq!(invocation_id(reply), "early"),
        Answer::Later(_) => panic!("the queued invocation should be handed out at once"),
    }
    // Asking again mid-invocation returns the same invocation, as Lambda does.
    match m.next_invocation() {
        Answer::Now(reply) => assert_eq!(invocation_id(reply), "early"),
        Answer::Later(_) => panic!("expected the current invocation"),
    }
}

#[test]
fn dropped_waiter_does_not_lose_the_invocation() {
    let (mut m, _rx) = machine(InitType::OnDemand);
    drop(later(m.next_invocation()));
    m.invoke(event("a"));
    match m.next_invocation() {
        Answer::Now(reply) => assert_eq!(invocation_id(reply), "a"),
        Answer::Later(_) => panic!("invocation lost"),
    }
}

#[test]
fn snap_start_checkpoint_restore_sequence() {
    let (mut m, mut rx) = machine(InitType::SnapStart);
    m.checkpoint();
    assert!(
        frames(&mut rx).is_empty(),
        "nothing until the runtime waits"
    );
    let mut restore = later(m.restore_next());
    assert_eq!(frames(&mut rx), [ToHost::SnapshotReady]);
    assert_eq!(m.state(), RuntimeState::RestoreReady);
    // invocation/next while waiting for the restore is not allowed.
    match m.next_invocation() {
        Answer::Now(reply) => assert_eq!(status(&reply), 403),
        Answer::Later(_) => panic!(),
    }
    assert_eq!(m.restored(), RestoreOutcome::ReleasedRestoreNext);
    assert_eq!(restore.try_recv().unwrap(), ApiReply::RestoreResumed);
    assert_eq!(m.state(), RuntimeState::Restoring);
    let mut waiting = later(m.next_invocation());
    assert_eq!(frames(&mut rx), [ToHost::RestoreDone]);
    m.invoke(event("x"));
    assert_eq!(invocation_id(waiting.try_recv().unwrap()), "x");
    m.checkpoint();
    match &frames(&mut rx)[..] {
        [ToHost::CheckpointError(f)] => assert_eq!(f.error_type, "Thaw.InvalidState"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn snap_start_runtime_without_hooks_is_snapshotted_in_next() {
    let (mut m, mut rx) = machine(InitType::SnapStart);
    let mut waiting = later(m.next_invocation());
    assert!(frames(&mut rx).is_empty());
    m.checkpoint();
    assert_eq!(frames(&mut rx), [ToHost::SnapshotReady]);
    // An invocation before the restore waits for it.
    m.invoke(event("x"));
    assert!(waiting.try_recv().is_err());
    assert_eq!(m.restored(), RestoreOutcome::ResumedNext);
    assert_eq!(frames(&mut rx), [ToHost::RestoreDone]);
    assert_eq!(invocation_id(waiting.try_recv().unwrap()), "x");
}

#[test]
fn restore_errors_and_init_errors_reach_the_host() {
    let (mut m, mut rx) = machine(InitType::SnapStart);
    let _restore = later(m.restore_next());
    m.restored();
    // restore/error before a restore is refused; after it, it is reported.
    let body = PostBody::whole(Bytes::from_static(b"{\"errorType\":\"E\"}"));
    assert_eq!(
        m.restore_error(Some("Runtime.AfterRestoreError"), body.clone()),
        ApiReply::Accepted
    );
    match &frames(&mut rx)[..] {
        [ToHost::RestoreError(f)] => {
            assert_eq!(f.error_type, "Runtime.AfterRestoreError");
            assert_eq!(f.body, body.bytes);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(m.state(), RuntimeState::RestoreError);
    // Later invocations get the same failure.
    m.invoke(event("x"));
    match &frames(&mut rx)[..] {
        [ToHost::InvokeError { failure, .. }] => {
            assert_eq!(failure.error_type, "Runtime.AfterRestoreError")
        }
        other => panic!("{other:?}"),
    }

    let (mut m, mut rx) = machine(InitType::SnapStart);
    assert_eq!(
        status(&m.restore_error(None, PostBody::default())),
        403,
        "restore/error before restore"
    );
    m.init_error(Some("Runtime.BeforeSnapshotError"), PostBody::default());
    assert!(matches!(&frames(&mut rx)[..], [ToHost::CheckpointError(_)]));
    assert_eq!(status(&m.init_error(None, PostBody::default())), 403);

    let (mut m, mut rx) = machine(InitType::OnDemand);
    m.init_error(Some("Runtime.ImportModuleError"), PostBody::default());
    match &frames(&mut rx)[..] {
        [ToHost::InitError(f)] => assert_eq!(f.error_type, "Runtime.ImportModuleError"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn oversized_response_is_413_and_response_size_too_large() {
    let (mut m, mut rx) = machine(InitType::OnDemand);
    let _w = m.next_invocation();
    m.invoke(event("big"));
    frames(&mut rx);
    let body = PostBody {
        bytes: Bytes::new(),
        total_len: MAX_PAYLOAD + 1,
    };
    let reply = m.invocation_response("big", None, body, None);
    assert_eq!(status(&reply), 413);
    match &frames(&mut rx)[..] {
        [
            ToHost::InvokeError {
                request_id,
                failure,
            },
        ] => {
            assert_eq!(request_id, "big");
            assert_eq!(failure.error_type, "Function.ResponseSizeTooLarge");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(m.state(), RuntimeState::ResponseSent);
}

#[test]
fn runtime_exit_is_reported_for_the_phase_it_happens_in() {
    let (mut m, mut rx) = machine(InitType::OnDemand);
    m.runtime_exited("Runtime exited with error: exit status 1");
    match &frames(&mut rx)[..] {
        [ToHost::InitError(f)] => assert_eq!(f.error_type, "Runtime.ExitError"),
        other => panic!("{other:?}"),
    }

    let (mut m, mut rx) = machine(InitType::OnDemand);
    let _w = m.next_invocation();
    m.invoke(event("r"));
    frames(&mut rx);
    m.runtime_exited("Runtime exited with error: signal: killed");
    match &frames(&mut rx)[..] {
        [
            ToHost::InvokeError {
                request_id,
                failure,
            },
        ] => {
            assert_eq!(request_id, "r");
            assert_eq!(failure.error_type, "Runtime.ExitError");
        }
        other => panic!("{other:?}"),
    }
    m.invoke(event("s"));
    assert!(matches!(&frames(&mut rx)[..], [ToHost::InvokeError { .. }]));

    let (mut m, mut rx) = machine(InitType::SnapStart);
    let _r = m.restore_next();
    m.restored();
    m.runtime_exited("Runtime exited with error: exit status 65");
    assert!(matches!(&frames(&mut rx)[..], [ToHost::RestoreError(_)]));
}

#[test]
fn invalid_response_mode_and_unsendable_headers() {
    let (mut m, mut rx) = machine(InitType::OnDemand);
    let _w = m.next_invocation();
    m.invoke(event("a"));
    assert_eq!(frames(&mut rx), [ToHost::Ready]);
    let reply = m.invocation_response("a", Some("bogus"), PostBody::default(), None);
    assert_eq!(status(&reply), 400);
    match &frames(&mut rx)[..] {
        [ToHost::InvokeError { failure, .. }] => {
            assert_eq!(failure.error_type, "Runtime.InvalidResponseModeHeader")
        }
        other => panic!("{other:?}"),
    }
    m.invoke(event_with("b", "x\r\ny"));
    match &frames(&mut rx)[..] {
        [ToHost::InvokeError { failure, .. }] => {
            assert_eq!(failure.error_type, "Thaw.InvalidInvoke")
        }
        other => panic!("{other:?}"),
    }
}

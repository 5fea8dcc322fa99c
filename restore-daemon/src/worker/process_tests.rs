//! Tests of the worker's side: requests in each state, bad input on stdin, restores that fail
//! (missing keys, decoded copies that are missing or changeable), failure kinds, the console tail.

use super::super::protocol::{encode_frame, read_frame};
use super::*;

/// Runs `serve` over `requests` (then the end of input) and returns how it ended and
/// every reply.
fn run(requests: &[Request], config: &WorkerConfig) -> (Result<Ended, ServeError>, Vec<Reply>) {
    let input: Vec<u8> = requests
        .iter()
        .flat_map(|r| encode_frame(r).unwrap())
        .collect();
    let mut output = Vec::new();
    let ended = serve(input.as_slice(), &mut output, config);
    (ended, replies(&output))
}

fn replies(mut bytes: &[u8]) -> Vec<Reply> {
    let mut all = Vec::new();
    loop {
        match read_frame(&mut bytes) {
            Ok(reply) => all.push(reply),
            Err(FrameError::Closed) => return all,
            Err(e) => panic!("the worker wrote a bad frame: {e:?}"),
        }
    }
}

fn invoke() -> Request {
    Request::Invoke(Invoke {
        request_id: "r1".into(),
        deadline_ms: 0,
        function_arn: "arn:aws:lambda:us-east-1:123456789012:function:f".into(),
        client_context: String::new(),
        payload: b"{}".to_vec(),
        timeout_ms: 1000,
    })
}

fn restore(snapshot: &Path, key_file: Option<PathBuf>) -> Request {
    Request::Restore {
        snapshot: snapshot.to_owned(),
        key_file,
        memory: WireMemoryMode::Lazy,
        after_restore_timeout_ms: 10_000,
        verified: None,
        shared_copy: None,
    }
}

fn failure_kind(reply: &Reply) -> Option<&FailureKind> {
    match reply {
        Reply::Failed { kind, .. } => Some(kind),
        _ => None,
    }
}

#[test]
fn requests_before_a_restore_are_bad_requests_and_shutdown_still_works() {
    let (ended, replies) = run(
        &[
            invoke(),
            Request::Freeze,
            Request::Thaw,
            invoke(),
            Request::Shutdown,
        ],
        &WorkerConfig::default(),
    );
    assert_eq!(ended.unwrap(), Ended::Shutdown);
    assert_eq!(replies.len(), 5, "{replies:?}");
    for reply in &replies[..4] {
        assert_eq!(
            failure_kind(reply),
            Some(&FailureKind::BadRequest),
            "{reply:?}"
        );
    }
    let Reply::Failed { message, .. } = &replies[0] else {
        unreachable!()
    };
    assert!(message.contains("nothing restored yet"), "{message}");
    assert_eq!(replies[4], Reply::ShutDown);
}

#[test]
fn requests_after_shutdown_are_not_read() {
    let (ended, replies) = run(&[Request::Shutdown, invoke()], &WorkerConfig::default());
    assert_eq!(ended.unwrap(), Ended::Shutdown);
    assert_eq!(replies, vec![Reply::ShutDown]);
}

#[test]
fn the_end_of_input_ends_the_worker_without_a_reply() {
    let (ended, replies) = run(&[], &WorkerConfig::default());
    assert_eq!(ended.unwrap(), Ended::InputClosed);
    assert!(replies.is_empty());
    let (ended, replies) = run(&[Request::Freeze], &WorkerConfig::default());
    assert_eq!(ended.unwrap(), Ended::InputClosed);
    assert_eq!(replies.len(), 1);
}

/// A reply stream the daemon closed ends the worker as the end of its input does, not as an
/// error: it is how a worker learns that a daemon which dropped it is gone.
#[test]
fn a_closed_reply_stream_ends_the_worker_quietly() {
    struct Closed;
    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let input = encode_frame(&Request::Freeze).unwrap();
    let ended = serve(&input[..], Closed, &WorkerConfig::default());
    assert_eq!(ended.unwrap(), Ended::InputClosed);
}

#[test]
fn garbage_on_stdin_ends_the_worker_with_an_error() {
    let mut output = Vec::new();
    let garbage = [0xff_u8; 64];
    let err = serve(&garbage[..], &mut output, &WorkerConfig::default()).unwrap_err();
    assert!(
        matches!(err, ServeError::Read(FrameError::TooLarge { .. })),
        "{err:?}"
    );
    // A well-framed request that is no request.
    let mut frame = 4u32.to_le_bytes().to_vec();
    frame.extend_from_slice(&99u32.to_le_bytes());
    let err = serve(frame.as_slice(), &mut output, &WorkerConfig::default()).unwrap_err();
    assert!(
        matches!(err, ServeError::Read(FrameError::Decode(_))),
        "{err:?}"
    );
    // A request cut short.
    let frame = encode_frame(&invoke()).unwrap();
    let err = serve(&frame[..10], &mut output, &WorkerConfig::default()).unwrap_err();
    assert!(
        matches!(err, ServeError::Read(FrameError::Truncated { .. })),
        "{err:?}"
    );
    assert!(output.is_empty(), "no reply to what was never a request");
}

#[test]
fn a_failed_restore_discards_the_worker_which_then_serves_only_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-snapshot");
    let (ended, replies) = run(
        &[
            restore(&missing, None),
            invoke(),
            restore(&missing, None),
            Request::Prepare {
                mem_bytes: 32 << 20,
                vcpus: 1,
            },
            Request::Freeze,
            Request::Shutdown,
        ],
        &WorkerConfig::default(),
    );
    assert_eq!(ended.unwrap(), Ended::Shutdown);
    let Reply::Failed { kind, message, .. } = &replies[0] else {
        panic!("{replies:?}")
    };
    assert_eq!(kind, &FailureKind::Restore);
    assert!(message.contains("no-such-snapshot"), "{message}");
    for reply in &replies[1..5] {
        assert_eq!(
            failure_kind(reply),
            Some(&FailureKind::BadRequest),
            "{reply:?}"
        );
    }
    assert_eq!(replies[5], Reply::ShutDown);
}

#[test]
fn a_shared_copy_without_a_descriptor_channel_fails_the_restore() {
    let mut request = restore(Path::new("/nonexistent"), None);
    if let Request::Restore { shared_copy, .. } = &mut request {
        *shared_copy = Some(CopyTicket {
            snapshot_id: [0; 16],
            mem_bytes: 128 << 20,
        });
    }
    let (ended, replies) = run(&[request], &WorkerConfig::default());
    assert_eq!(ended.unwrap(), Ended::InputClosed);
    let Reply::Failed { kind, message, .. } = &replies[0] else {
        panic!("{replies:?}");
    };
    assert_eq!(*kind, FailureKind::Restore);
    assert!(message.contains("no descriptor channel"), "{message}");
}

#[test]
fn a_shared_copy_that_is_not_sealed_fails_the_restore() {
    let (daemon, worker) = UnixStream::pair().unwrap();
    // Shared memory, but writable through this descriptor and unsealed.
    let fd = nix::sys::memfd::memfd_create("t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    let unsealed = File::from(fd);
    unsealed.set_len(128 << 20).unwrap();
    copy_channel::send(&daemon, unsealed.as_fd()).unwrap();
    let config = WorkerConfig {
        copy_channel: Some(Arc::new(worker)),
        ..WorkerConfig::default()
    };
    let mut request = restore(Path::new("/nonexistent"), None);
    if let Request::Restore { shared_copy, .. } = &mut request {
        *shared_copy = Some(CopyTicket {
            snapshot_id: [0; 16],
            mem_bytes: 128 << 20,
        });
    }
    let (_, replies) = run(&[request], &config);
    let Reply::Failed { kind, message, .. } = &replies[0] else {
        panic!("{replies:?}");
    };
    assert_eq!(*kind, FailureKind::Restore);
    assert!(message.contains("could be changed"), "{message}");
}

#[test]
fn a_missing_key_file_fails_the_restore() {
    let dir = tempfile::tempdir().unwrap();
    let (_, replies) = run(
        &[restore(dir.path(), Some(dir.path().join("no.key")))],
        &WorkerConfig::default(),
    );
    let Reply::Failed { kind, message, .. } = &replies[0] else {
        panic!("{replies:?}")
    };
    assert_eq!(kind, &FailureKind::Restore);
    assert!(message.contains("no.key"), "{message}");
}

#[test]
fn the_host_key_is_used_only_when_no_key_is_named_and_it_exists() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host.key");
    let named = dir.path().join("named.key");
    snapshot::MasterKey::load_or_create(&host).unwrap();
    snapshot::MasterKey::load_or_create(&named).unwrap();
    assert!(matches!(
        key_choice(Some(&named), Some(&host)),
        Ok(KeyChoice::Given(_))
    ));
    assert!(matches!(
        key_choice(None, Some(&host)),
        Ok(KeyChoice::HostDefault(_))
    ));
    let absent = dir.path().join("absent.key");
    assert!(matches!(
        key_choice(None, Some(&absent)),
        Ok(KeyChoice::None)
    ));
    assert!(matches!(key_choice(None, None), Ok(KeyChoice::None)));
    assert!(key_choice(Some(&absent), None).is_err());
}

#[test]
fn the_console_keeps_its_last_64_kib_and_hands_them_over_once() {
    let mut console = ConsoleTail::default();
    console.write_all(b"early").unwrap();
    console.write_all(&vec![b'x'; CONSOLE_KEEP - 2]).unwrap();
    console.write_all(b"end").unwrap();
    assert_eq!(console.tail(5), b"xxend");
    let mut want = vec![b'x'; CONSOLE_KEEP - 3];
    want.extend_from_slice(b"end");
    assert_eq!(console.take(), want, "the oldest bytes went first");
    assert!(console.take().is_empty());
    // One write larger than the buffer keeps its end.
    let big: Vec<u8> = (0..CONSOLE_KEEP + 10).map(|i| (i % 251) as u8).collect();
    console.write_all(&big).unwrap();
    assert_eq!(console.take(), &big[10..]);
}

#[test]
fn failures_map_to_their_kinds() {
    let timeout = EnvironmentError::Invoke(InvokeError::Timeout(Duration::from_secs(1)));
    assert_eq!(
        invoke_failure(&timeout, Some(ExitReason::GuestExit(3))),
        FailureKind::InvokeTimeout
    );
    let socket = EnvironmentError::Invoke(InvokeError::Socket(
        std::io::ErrorKind::UnexpectedEof.into(),
    ));
    assert_eq!(
        invoke_failure(&socket, Some(ExitReason::GuestExit(3))),
        FailureKind::GuestEnded { exit_code: Some(3) }
    );
    assert_eq!(
        invoke_failure(&socket, Some(ExitReason::TripleFault { vcpu: 0 })),
        FailureKind::GuestEnded { exit_code: None }
    );
    assert_eq!(
        invoke_failure(&socket, Some(ExitReason::Stopped)),
        FailureKind::Internal
    );
    assert_eq!(invoke_failure(&socket, None), FailureKind::Internal);
    let ended = EnvironmentError::Invoke(InvokeError::GuestEnded);
    assert_eq!(
        invoke_failure(&ended, None),
        FailureKind::GuestEnded { exit_code: None }
    );

    let hook = EnvironmentError::AfterRestore(AfterRestoreError::Hook {
        error_type: "Runtime.AfterRestoreError".into(),
        message: "no db".into(),
    });
    assert_eq!(
        restore_failure(&hook),
        FailureKind::AfterRestore {
            error_type: "Runtime.AfterRestoreError".into()
        }
    );
    let slow =
        EnvironmentError::AfterRestore(AfterRestoreError::HookTimeout(Duration::from_secs(10)));
    assert_eq!(restore_failure(&slow), FailureKind::AfterRestoreTimeout);
    assert_eq!(
        restore_failure(&EnvironmentError::NoAgent),
        FailureKind::Restore
    );
    let exited = ControlError::Exited {
        reason: Some(ExitReason::GuestExit(0)),
    };
    assert_eq!(
        control_failure(&exited),
        FailureKind::GuestEnded { exit_code: Some(0) }
    );
}

#[test]
fn peak_memory_is_read_from_proc() {
    assert!(peak_resident_bytes() > 1 << 20);
}

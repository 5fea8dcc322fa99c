//! Invocation commands: payloads starting with `thaw:` that make the agent's "function"
//! misbehave on request (fail, crash, hang, take its time, print output, echo), so a host's
//! handling of each can be tested, or keep a note in one page of guest memory, so a host can
//! tell whose writes a restored clone sees. Every other payload is answered with its SHA-256.
//!
//! This module only reads payloads and words the error documents; the agent carries them out.

use core::fmt::{self, Write};

use crate::status::STATUS_PAYLOAD;
use crate::text::{JsonEscape, JsonStr, Lossy, SliceWriter};

/// What marks a payload as a command.
pub const PREFIX: &[u8] = b"thaw:";
/// Longest `thaw:sleep=MS` (10 minutes: beyond any invocation timeout a host would set).
pub const MAX_SLEEP_MS: u32 = 600_000;
/// Most lines `thaw:log=N` prints (on PVM each console byte costs tens of µs: a line with a
/// UUID request id took about 4.4 ms, so 10,000 lines take most of a minute).
pub const MAX_LOG_LINES: u32 = 10_000;
/// Longest note `thaw:note=TEXT` keeps: small enough to fit, with its length, in the one
/// page that holds the whole note state, and in the agent's answer buffer.
pub const MAX_NOTE: usize = 1024;
/// The note before any `thaw:note`: what a clone's first `thaw:note` answers, read from the
/// snapshot's copy of the note page.
pub const INITIAL_NOTE: &[u8] = b"from the snapshot";

/// The error type of `thaw:error`.
pub const INVOKE_ERROR_TYPE: &str = "TestGuest.InvokeError";
/// The error document of `thaw:error`, as a runtime would post it to
/// `/runtime/invocation/{id}/error`.
pub const INVOKE_ERROR_BODY: &[u8] = br#"{"errorMessage":"invocation failed on purpose (thaw:error)","errorType":"TestGuest.InvokeError","stackTrace":[]}"#;
/// The error type of a malformed command.
pub const BAD_COMMAND_TYPE: &str = "TestGuest.BadCommand";
/// Room for any bad command's error document: the fixed text, plus a shown value of at most
/// `MAX_SHOWN_BYTES` bytes (each becoming at most a 3-byte U+FFFD, or 6 bytes escaped).
pub const MAX_ERROR_JSON: usize = 1024;

/// What an invocation's payload asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// No command: answer with the payload's SHA-256.
    Digest,
    /// `thaw:status`: answer with the status document.
    Status,
    /// `thaw:error`: fail the invocation with a function error.
    Error,
    /// `thaw:crash`: the runtime dies mid-invocation (the guest exits with status 1).
    Crash,
    /// `thaw:hang`: never answer.
    Hang,
    /// `thaw:sleep=MS`: busy-wait that many milliseconds, then answer.
    Sleep(u32),
    /// `thaw:log=N`: print that many lines of function output, then answer.
    Log(u32),
    /// `thaw:echo=TEXT`: answer with TEXT's bytes.
    Echo(&'a [u8]),
    /// `thaw:note=TEXT`: replace the note with TEXT (at most `MAX_NOTE` bytes), answer with
    /// the previous note's bytes.
    Note(&'a [u8]),
    /// A `thaw:` payload that is no valid command: a function error saying why.
    Bad(BadCommand<'a>),
}

impl Command<'_> {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Digest => "sha-256",
            Command::Status => "thaw:status",
            Command::Error => "thaw:error",
            Command::Crash => "thaw:crash",
            Command::Hang => "thaw:hang",
            Command::Sleep(_) => "thaw:sleep",
            Command::Log(_) => "thaw:log",
            Command::Echo(_) => "thaw:echo",
            Command::Note(_) => "thaw:note",
            Command::Bad(_) => "bad command",
        }
    }
}

/// The commands that take a decimal number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Numbered {
    /// `thaw:sleep=MS`.
    Sleep,
    /// `thaw:log=N`.
    Log,
}

impl Numbered {
    fn usage(self) -> &'static str {
        match self {
            Numbered::Sleep => "thaw:sleep=MS",
            Numbered::Log => "thaw:log=N",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Numbered::Sleep => "milliseconds",
            Numbered::Log => "lines",
        }
    }

    /// The largest value allowed.
    pub fn max(self) -> u32 {
        match self {
            Numbered::Sleep => MAX_SLEEP_MS,
            Numbered::Log => MAX_LOG_LINES,
        }
    }

    fn command(self, n: u32) -> Command<'static> {
        match self {
            Numbered::Sleep => Command::Sleep(n),
            Numbered::Log => Command::Log(n),
        }
    }
}

/// What is wrong with a `thaw:` payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadCommand<'a> {
    /// No command has this name (the bytes between `thaw:` and any `=`).
    Unknown(&'a [u8]),
    /// A command that takes no value got one (`thaw:crash=1`); its usage.
    UnexpectedValue(&'static str),
    /// `thaw:echo` or `thaw:note` without `=`; the command's name.
    WithoutText(&'static str),
    /// `thaw:note=TEXT` with a TEXT longer than `MAX_NOTE`; its length in bytes.
    NoteTooLong(usize),
    /// `thaw:sleep` or `thaw:log` without a number (no `=`, or nothing after it).
    MissingNumber(Numbered),
    /// The value is not a plain decimal number.
    NotANumber(Numbered, &'a [u8]),
    /// The number is larger than the command allows.
    OutOfRange(Numbered, &'a [u8]),
}

impl fmt::Display for BadCommand<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BadCommand::Unknown(name) => write!(
                f,
                "unknown command \"thaw:{}\" (known: thaw:status, thaw:error, thaw:crash, \
                 thaw:hang, thaw:sleep=MS, thaw:log=N, thaw:echo=TEXT, thaw:note=TEXT)",
                Lossy(name)
            ),
            BadCommand::UnexpectedValue(usage) => write!(f, "{usage} takes no value"),
            BadCommand::WithoutText(name) => {
                write!(f, "{name} needs its text after \"=\" ({name}=TEXT)")
            }
            BadCommand::NoteTooLong(len) => write!(
                f,
                "thaw:note=TEXT: a note of {len} bytes is too long (at most {MAX_NOTE} bytes)"
            ),
            BadCommand::MissingNumber(n) => write!(
                f,
                "{} needs a decimal number of {} from 0 to {}",
                n.usage(),
                n.unit(),
                n.max()
            ),
            BadCommand::NotANumber(n, value) => write!(
                f,
                "{}: \"{}\" is not a decimal number of {} (0 to {})",
                n.usage(),
                Lossy(value),
                n.unit(),
                n.max()
            ),
            BadCommand::OutOfRange(n, value) => write!(
                f,
                "{}: {} {} is out of range (0 to {})",
                n.usage(),
                Lossy(value),
                n.unit(),
                n.max()
            ),
        }
    }
}

impl BadCommand<'_> {
    /// Formats Lambda's error document for it into `out`; returns its length, or `None` if
    /// `out` is smaller than `MAX_ERROR_JSON` and too small.
    pub fn write_json(&self, out: &mut [u8]) -> Option<usize> {
        error_document(self, BAD_COMMAND_TYPE, out)
    }
}

/// Lambda's error document, `{"errorMessage":...,"errorType":...,"stackTrace":[]}`, formatted
/// into `out`; returns its length, or `None` if it does not fit.
pub fn error_document(
    message: &dyn fmt::Display,
    error_type: &str,
    out: &mut [u8],
) -> Option<usize> {
    let mut w = SliceWriter::new(out);
    w.write_str("{\"errorMessage\":\"").ok()?;
    write!(JsonEscape(&mut w), "{message}").ok()?;
    write!(
        w,
        "\",\"errorType\":\"{}\",\"stackTrace\":[]}}",
        JsonStr(error_type)
    )
    .ok()?;
    Some(w.len())
}

/// A plain decimal number (digits only, no sign) of at most `max`.
fn decimal(kind: Numbered, value: &[u8]) -> Result<u32, BadCommand<'_>> {
    if value.is_empty() {
        return Err(BadCommand::MissingNumber(kind));
    }
    if !value.iter().all(u8::is_ascii_digit) {
        return Err(BadCommand::NotANumber(kind, value));
    }
    let too_big = BadCommand::OutOfRange(kind, value);
    let mut n: u32 = 0;
    for digit in value {
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u32::from(digit - b'0')))
            .ok_or(too_big)?;
    }
    if n > kind.max() {
        return Err(too_big);
    }
    Ok(n)
}

fn numbered(kind: Numbered, value: Option<&[u8]>) -> Command<'_> {
    match decimal(kind, value.unwrap_or_default()) {
        Ok(n) => kind.command(n),
        Err(bad) => Command::Bad(bad),
    }
}

/// What `payload` asks for.
pub fn parse(payload: &[u8]) -> Command<'_> {
    // Lambda's Invoke API accepts only JSON events, so through thawd a command arrives as a
    // JSON string: `"thaw:sleep=100"` is the same command as `thaw:sleep=100`.
    let payload = match payload {
        [b'"', inner @ .., b'"'] if inner.starts_with(PREFIX) => inner,
        other => other,
    };
    if payload == STATUS_PAYLOAD {
        return Command::Status;
    }
    let Some(rest) = payload.strip_prefix(PREFIX) else {
        return Command::Digest;
    };
    let (name, value) = match rest.iter().position(|&b| b == b'=') {
        Some(eq) => (&rest[..eq], Some(&rest[eq + 1..])),
        None => (rest, None),
    };
    match (name, value) {
        (b"error", None) => Command::Error,
        (b"crash", None) => Command::Crash,
        (b"hang", None) => Command::Hang,
        (b"sleep", value) => numbered(Numbered::Sleep, value),
        (b"log", value) => numbered(Numbered::Log, value),
        (b"echo", Some(text)) => Command::Echo(text),
        (b"echo", None) => Command::Bad(BadCommand::WithoutText("thaw:echo")),
        (b"note", Some(text)) if text.len() > MAX_NOTE => {
            Command::Bad(BadCommand::NoteTooLong(text.len()))
        }
        (b"note", Some(text)) => Command::Note(text),
        (b"note", None) => Command::Bad(BadCommand::WithoutText("thaw:note")),
        (b"status", Some(_)) => Command::Bad(BadCommand::UnexpectedValue("thaw:status")),
        (b"error", Some(_)) => Command::Bad(BadCommand::UnexpectedValue("thaw:error")),
        (b"crash", Some(_)) => Command::Bad(BadCommand::UnexpectedValue("thaw:crash")),
        (b"hang", Some(_)) => Command::Bad(BadCommand::UnexpectedValue("thaw:hang")),
        (name, _) => Command::Bad(BadCommand::Unknown(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_string_carries_the_same_command() {
        assert!(matches!(parse(b"\"thaw:hang\""), Command::Hang));
        assert!(matches!(parse(b"\"thaw:status\""), Command::Status));
        assert!(matches!(parse(b"\"thaw:echo=hi\""), Command::Echo(b"hi")));
        assert!(matches!(parse(b"\"thaw:note=hi\""), Command::Note(b"hi")));
        // Other JSON strings are events like any other.
        assert!(matches!(parse(b"\"hello\""), Command::Digest));
    }

    fn bad(payload: &[u8]) -> BadCommand<'_> {
        match parse(payload) {
            Command::Bad(b) => b,
            other => panic!("{:?}: expected a bad command, got {other:?}", payload),
        }
    }

    fn json(b: &BadCommand<'_>) -> String {
        let mut buf = [0u8; MAX_ERROR_JSON];
        let n = b.write_json(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    /// The error document's `errorMessage`, as it stands in the JSON (escaped).
    fn message(payload: &[u8]) -> String {
        let doc = json(&bad(payload));
        let inner = doc.strip_prefix(r#"{"errorMessage":""#).and_then(|d| {
            d.strip_suffix(r#"","errorType":"TestGuest.BadCommand","stackTrace":[]}"#)
        });
        inner
            .unwrap_or_else(|| panic!("not an error document: {doc}"))
            .to_owned()
    }

    #[test]
    fn other_payloads_are_not_commands() {
        for payload in [
            &b""[..],
            b"hello",
            b"thaw",
            b"Thaw:error",
            b" thaw:error",
            b"thaw status",
            &[0xff, 0x00, 0x12],
        ] {
            assert_eq!(parse(payload), Command::Digest, "{payload:?}");
        }
    }

    #[test]
    fn commands_without_values() {
        assert_eq!(parse(b"thaw:status"), Command::Status);
        assert_eq!(parse(b"thaw:error"), Command::Error);
        assert_eq!(parse(b"thaw:crash"), Command::Crash);
        assert_eq!(parse(b"thaw:hang"), Command::Hang);
    }

    #[test]
    fn numbers_are_plain_decimals_up_to_the_limit() {
        assert_eq!(parse(b"thaw:sleep=0"), Command::Sleep(0));
        assert_eq!(parse(b"thaw:sleep=250"), Command::Sleep(250));
        assert_eq!(parse(b"thaw:sleep=007"), Command::Sleep(7));
        assert_eq!(parse(b"thaw:sleep=600000"), Command::Sleep(MAX_SLEEP_MS));
        assert_eq!(parse(b"thaw:log=0"), Command::Log(0));
        assert_eq!(parse(b"thaw:log=3"), Command::Log(3));
        assert_eq!(parse(b"thaw:log=10000"), Command::Log(MAX_LOG_LINES));
    }

    #[test]
    fn echo_answers_everything_after_the_equals_sign() {
        assert_eq!(parse(b"thaw:echo=hello"), Command::Echo(b"hello"));
        assert_eq!(parse(b"thaw:echo="), Command::Echo(b""));
        assert_eq!(parse(b"thaw:echo=a=b\n\xff"), Command::Echo(b"a=b\n\xff"));
        assert_eq!(parse(b"thaw:echo=thaw:crash"), Command::Echo(b"thaw:crash"));
    }

    #[test]
    fn a_note_is_everything_after_the_equals_sign_up_to_the_limit() {
        assert_eq!(parse(b"thaw:note=abc"), Command::Note(b"abc"));
        assert_eq!(parse(b"thaw:note=a=b\n\xff"), Command::Note(b"a=b\n\xff"));
        assert_eq!(parse(b"thaw:note=thaw:crash"), Command::Note(b"thaw:crash"));
        // An empty text is a note too: the empty one.
        assert_eq!(parse(b"thaw:note="), Command::Note(b""));
        let mut payload = b"thaw:note=".to_vec();
        payload.extend_from_slice(&[b'n'; MAX_NOTE]);
        assert_eq!(parse(&payload), Command::Note(&[b'n'; MAX_NOTE]));
        payload.push(b'n');
        assert_eq!(bad(&payload), BadCommand::NoteTooLong(MAX_NOTE + 1));
        // The JSON string form is measured without its quotes.
        let mut quoted = b"\"thaw:note=".to_vec();
        quoted.extend_from_slice(&[b'q'; MAX_NOTE]);
        quoted.push(b'"');
        assert_eq!(parse(&quoted), Command::Note(&[b'q'; MAX_NOTE]));
        // The note a snapshot starts with obeys the same limit.
        assert!(INITIAL_NOTE.len() <= MAX_NOTE);
    }

    #[test]
    fn a_note_too_long_says_the_limit() {
        let mut payload = b"thaw:note=".to_vec();
        payload.extend_from_slice(&[b'x'; 5000]);
        assert_eq!(
            message(&payload),
            "thaw:note=TEXT: a note of 5000 bytes is too long (at most 1024 bytes)"
        );
        assert_eq!(
            json(&bad(&payload)),
            r#"{"errorMessage":"thaw:note=TEXT: a note of 5000 bytes is too long (at most 1024 bytes)","errorType":"TestGuest.BadCommand","stackTrace":[]}"#
        );
    }

    #[test]
    fn malformed_numbers_say_what_is_wrong() {
        let sleep = Numbered::Sleep;
        assert_eq!(bad(b"thaw:sleep"), BadCommand::MissingNumber(sleep));
        assert_eq!(bad(b"thaw:sleep="), BadCommand::MissingNumber(sleep));
        for value in [
            &b"abc"[..],
            b"-1",
            b"+5",
            b"1.5",
            b" 1",
            b"1 ",
            b"0x10",
            b"\xff",
        ] {
            let mut payload = b"thaw:sleep=".to_vec();
            payload.extend_from_slice(value);
            assert_eq!(
                bad(&payload),
                BadCommand::NotANumber(sleep, value),
                "{value:?}"
            );
        }
        assert_eq!(
            bad(b"thaw:sleep=600001"),
            BadCommand::OutOfRange(sleep, b"600001")
        );
        assert_eq!(
            bad(b"thaw:sleep=99999999999999999999"),
            BadCommand::OutOfRange(sleep, b"99999999999999999999")
        );
        assert_eq!(
            bad(b"thaw:log=10001"),
            BadCommand::OutOfRange(Numbered::Log, b"10001")
        );
        assert_eq!(
            bad(b"thaw:log=x"),
            BadCommand::NotANumber(Numbered::Log, b"x")
        );
    }

    #[test]
    fn unknown_names_and_stray_values_are_bad() {
        assert_eq!(bad(b"thaw:xyz"), BadCommand::Unknown(b"xyz"));
        assert_eq!(bad(b"thaw:"), BadCommand::Unknown(b""));
        assert_eq!(bad(b"thaw:=1"), BadCommand::Unknown(b""));
        assert_eq!(bad(b"thaw:SLEEP=1"), BadCommand::Unknown(b"SLEEP"));
        assert_eq!(bad(b"thaw:status "), BadCommand::Unknown(b"status "));
        assert_eq!(bad(b"thaw:echo"), BadCommand::WithoutText("thaw:echo"));
        assert_eq!(bad(b"thaw:note"), BadCommand::WithoutText("thaw:note"));
        assert_eq!(bad(b"thaw:NOTE=x"), BadCommand::Unknown(b"NOTE"));
        for (payload, usage) in [
            (&b"thaw:status=1"[..], "thaw:status"),
            (b"thaw:error=", "thaw:error"),
            (b"thaw:crash=now", "thaw:crash"),
            (b"thaw:hang=1", "thaw:hang"),
        ] {
            assert_eq!(bad(payload), BadCommand::UnexpectedValue(usage));
        }
    }

    #[test]
    fn error_messages_name_the_problem() {
        assert_eq!(
            message(b"thaw:sleep=abc"),
            r#"thaw:sleep=MS: \"abc\" is not a decimal number of milliseconds (0 to 600000)"#
        );
        assert_eq!(
            message(b"thaw:sleep="),
            "thaw:sleep=MS needs a decimal number of milliseconds from 0 to 600000"
        );
        assert_eq!(
            message(b"thaw:log=10001"),
            "thaw:log=N: 10001 lines is out of range (0 to 10000)"
        );
        assert_eq!(
            message(b"thaw:xyz"),
            r#"unknown command \"thaw:xyz\" (known: thaw:status, thaw:error, thaw:crash, thaw:hang, thaw:sleep=MS, thaw:log=N, thaw:echo=TEXT, thaw:note=TEXT)"#
        );
        assert_eq!(message(b"thaw:crash=1"), "thaw:crash takes no value");
        assert_eq!(
            message(b"thaw:echo"),
            r#"thaw:echo needs its text after \"=\" (thaw:echo=TEXT)"#
        );
        assert_eq!(
            message(b"thaw:note"),
            r#"thaw:note needs its text after \"=\" (thaw:note=TEXT)"#
        );
    }

    #[test]
    fn error_documents_escape_whatever_the_payload_holds() {
        assert_eq!(
            message(b"thaw:sleep=\"\\\n\x01\xff"),
            format!(
                r#"thaw:sleep=MS: \"\"\\\u000a\u0001{}\" is not a decimal number of milliseconds (0 to 600000)"#,
                char::REPLACEMENT_CHARACTER
            )
        );
        // The worst case: the longest shown value, every byte escaped.
        let mut payload = b"thaw:".to_vec();
        payload.extend_from_slice(&[0x01; 4096]);
        let doc = json(&bad(&payload));
        assert!(doc.len() <= MAX_ERROR_JSON);
        assert!(message(&payload).contains("…"));
        // A buffer too small is an answer of `None`, not a cut document.
        let mut small = [0u8; 40];
        assert_eq!(bad(b"thaw:xyz").write_json(&mut small), None);
    }

    #[test]
    fn the_error_command_answers_lambdas_document() {
        let mut buf = [0u8; MAX_ERROR_JSON];
        let message = "invocation failed on purpose (thaw:error)";
        let n = error_document(&message, INVOKE_ERROR_TYPE, &mut buf).unwrap();
        assert_eq!(&buf[..n], INVOKE_ERROR_BODY);
    }
}

//! The Thaw agent (`thaw.agent=1`): speaks the host↔guest protocol of
//! `hooks_sdk::protocol` over the vsock connection to host port 9000. It says `Hello` (and
//! `Ready` when on-demand) on every connection, runs the registered hooks on `Checkpoint` and
//! `Restored`, answers each `Invoke` with the SHA-256 of its payload (or carries out the
//! invocation command the payload names: `thaw:status`, `thaw:error`, `thaw:sleep=MS`,
//! `thaw:note=TEXT`... see the library's `invoke_cmd`), and powers off on `Shutdown`. A
//! malformed frame is logged and the connection reset; then it reconnects.

use core::sync::atomic::{AtomicU32, Ordering};

use hooks_sdk::protocol::{
    AGENT_PORT, Failure, HEADER_LEN, Header, InitType, Invoke, Kind, MAX_BODY, Message,
    ProtocolError, Restored,
};
use sha2::{Digest, Sha256};
use thaw_test_guest::cmdline::{Fail, Options};
use thaw_test_guest::driver::Error;
use thaw_test_guest::hooks::{GuestState, Hooks};
use thaw_test_guest::invoke_cmd::{
    self, BAD_COMMAND_TYPE, Command, INITIAL_NOTE, INVOKE_ERROR_BODY, INVOKE_ERROR_TYPE,
    MAX_ERROR_JSON, MAX_NOTE,
};
use thaw_test_guest::status::{MAX_STATUS_JSON, Status};
use thaw_test_guest::text::format_into;

use crate::arch::Shared;
use crate::virtio_mmio::Vsock;
use crate::{clock, io, keeper_cpu, println};

/// `thaw.restore-hook-ms`, for the after-restore hook (hooks are plain functions).
static RESTORE_HOOK_MS: AtomicU32 = AtomicU32::new(0);

/// Room for a whole frame: a header and the largest body.
pub const FRAME_BUF: usize = HEADER_LEN + MAX_BODY;

/// Invocations logged on the console; later ones are not (on PVM every console byte is an
/// exit to the VMM, which would dominate a small invocation's round trip).
const LOGGED_INVOCATIONS: u64 = 8;

/// Frames received (and, in bench mode, data sent) live here, in .bss.
static FRAME: Shared<[u8; FRAME_BUF]> = Shared::new([0; FRAME_BUF]);
/// Frames sent by the agent: as large as any frame, since `thaw:echo` answers with (nearly) a
/// whole payload. Untouched pages of it cost a snapshot nothing (zero pages are elided).
static REPLY: Shared<[u8; FRAME_BUF]> = Shared::new([0; FRAME_BUF]);

/// Room for any answer the agent formats itself: a digest, a short text, the status document,
/// a bad command's error document or the previous note.
const ANSWER_BUF: usize = if MAX_STATUS_JSON > MAX_ERROR_JSON {
    MAX_STATUS_JSON
} else {
    MAX_ERROR_JSON
};
const _: () = assert!(ANSWER_BUF >= MAX_NOTE);

/// The size of the note page.
const NOTE_PAGE_BYTES: usize = 4096;
/// Room in the note page after the length.
const NOTE_ROOM: usize = NOTE_PAGE_BYTES - size_of::<u32>();

/// The whole state of `thaw:note=TEXT`, in one page: the note's length, its bytes, then fill.
/// A host test restores several clones that share one copy of the snapshot's memory
/// copy-on-write; each writes its own note to this same page and reads it back. So that the
/// test covers the note entirely, its length lives in the page too; and so that the page comes
/// from the shared copy at all, it starts non-zero (`INITIAL_NOTE`, then `.` to its end): a
/// zero page would be elided from the snapshot and restored as a fresh zero page.
#[repr(C, align(4096))]
pub struct NotePage {
    /// The note's length in bytes (at most `MAX_NOTE`).
    len: u32,
    /// The note, then whatever earlier notes or the initial fill left.
    bytes: [u8; NOTE_ROOM],
}

const _: () = assert!(size_of::<NotePage>() == NOTE_PAGE_BYTES);
const _: () = assert!(MAX_NOTE <= NOTE_ROOM && INITIAL_NOTE.len() <= MAX_NOTE);

impl NotePage {
    const fn initial() -> Self {
        let mut bytes = [b'.'; NOTE_ROOM];
        let mut i = 0;
        while i < INITIAL_NOTE.len() {
            bytes[i] = INITIAL_NOTE[i];
            i += 1;
        }
        NotePage {
            len: INITIAL_NOTE.len() as u32,
            bytes,
        }
    }
}

/// The note page, in .data (initialised, page-aligned, page-sized: no other variable shares
/// its page). Not mangled, so a host can find its guest-physical address (= virtual here) in
/// the image's symbol table.
#[unsafe(no_mangle)]
pub static THAW_NOTE_PAGE: Shared<NotePage> = Shared::new(NotePage::initial());

/// Reads the note from guest memory into `out`; returns its length. Volatile reads: the bytes
/// must come from the page as it is now (the snapshot's, or this clone's own writes), never
/// from what the compiler remembers.
fn read_note(out: &mut [u8; ANSWER_BUF]) -> usize {
    let page = THAW_NOTE_PAGE.get();
    // SAFETY: only the agent, on the boot CPU, touches the note page, one invocation at a
    // time; every pointer stays inside the page (the length is clamped to MAX_NOTE, which fits
    // in both the page and `out`).
    unsafe {
        let len = (core::ptr::read_volatile(&raw const (*page).len) as usize).min(MAX_NOTE);
        let bytes = (&raw const (*page).bytes).cast::<u8>();
        for (k, b) in out[..len].iter_mut().enumerate() {
            *b = core::ptr::read_volatile(bytes.add(k));
        }
        len
    }
}

/// Writes `text` (at most `MAX_NOTE` bytes: the parser refuses longer) as the note. Volatile
/// writes: each must really reach the page, so that it is this clone's page that changes.
fn write_note(text: &[u8]) {
    let text = &text[..text.len().min(MAX_NOTE)];
    let page = THAW_NOTE_PAGE.get();
    // SAFETY: as for `read_note`; `text` fits in the page and is not in it (it is in the frame
    // buffer).
    unsafe {
        let bytes = (&raw mut (*page).bytes).cast::<u8>();
        for (k, &b) in text.iter().enumerate() {
            core::ptr::write_volatile(bytes.add(k), b);
        }
        // MAX_NOTE fits in a u32.
        core::ptr::write_volatile(&raw mut (*page).len, text.len() as u32);
    }
}

/// The frame buffer. Only the boot CPU runs the agent or the bench, and only one of them.
pub fn frame_buffer() -> &'static mut [u8; FRAME_BUF] {
    // SAFETY: called once per boot, by whichever of the agent or the bench runs on the boot
    // CPU; no other code touches FRAME.
    unsafe { &mut *FRAME.get() }
}

fn reply_buffer() -> &'static mut [u8; FRAME_BUF] {
    // SAFETY: as for `frame_buffer`: only `run` calls this, once.
    unsafe { &mut *REPLY.get() }
}

/// Why a connection ended.
enum End {
    /// The stream failed (closed, reset, transport reset, stalled device).
    Transport(Error),
    /// The host sent something we cannot accept.
    Malformed(ProtocolError),
    /// The host sent a guest-to-host kind.
    WrongDirection(Kind),
}

impl From<Error> for End {
    fn from(e: Error) -> Self {
        End::Transport(e)
    }
}

impl From<ProtocolError> for End {
    fn from(e: ProtocolError) -> Self {
        End::Malformed(e)
    }
}

fn before_checkpoint(s: &mut GuestState) -> Result<(), &'static str> {
    s.checkpoint();
    println!(
        "hook before-checkpoint: checkpoint #{}, marker {:#018x}",
        s.checkpoints, s.marker
    );
    let keeper = keeper_cpu::report();
    if keeper.vector_bits != 0 {
        println!("hook before-checkpoint: {keeper}");
    }
    Ok(())
}

fn failing_before_checkpoint(_: &mut GuestState) -> Result<(), &'static str> {
    println!("hook before-checkpoint: failing as asked (thaw.fail=checkpoint)");
    Err("before-checkpoint hook failed on purpose (thaw.fail=checkpoint)")
}

fn failing_after_restore(_: &mut GuestState, _: &Restored) -> Result<(), &'static str> {
    println!("hook after-restore: failing as asked (thaw.fail=restore)");
    Err("after-restore hook failed on purpose (thaw.fail=restore)")
}

/// The error document a runtime posts to `/runtime/init/error`, for `thaw.fail=init`.
const INIT_ERROR_TYPE: &str = "Runtime.InitError";
const INIT_ERROR_BODY: &[u8] = br#"{"errorMessage":"init failed on purpose (thaw.fail=init)","errorType":"Runtime.InitError","stackTrace":[]}"#;

fn after_restore(s: &mut GuestState, r: &Restored) -> Result<(), &'static str> {
    s.restore(r);
    println!(
        "hook after-restore: restore id {:?}, wall clock {} ns, {} entropy bytes mixed, \
         rng now {:02x}{:02x}{:02x}{:02x}..., marker {:#018x} kept",
        r.restore_id,
        r.wall_clock_ns,
        r.entropy.len(),
        s.rng[0],
        s.rng[1],
        s.rng[2],
        s.rng[3],
        s.marker
    );
    if let Some((mib, sum)) = crate::workload_checksum() {
        println!("hook after-restore: workload of {mib} MiB has checksum {sum:#018x}");
    }
    let keeper = keeper_cpu::report();
    if keeper.vector_bits != 0 {
        println!("hook after-restore: {keeper}");
    }
    let ms = RESTORE_HOOK_MS.load(Ordering::Relaxed);
    if ms > 0 {
        println!("hook after-restore: busy-waiting {ms} ms as asked (thaw.restore-hook-ms)");
        busy_wait_ms(ms);
        println!("hook after-restore: done waiting");
    }
    Ok(())
}

/// Spins at CPL3 on the TSC clock: time a host sees passing as the function working.
fn busy_wait_ms(ms: u32) {
    let start = clock::now_ns();
    while clock::now_ns().wrapping_sub(start) < u64::from(ms) * 1_000_000 {
        core::hint::spin_loop();
    }
}

/// The `thaw:status` document, formatted into `out`; returns its length. `restored_at_ns`:
/// when the last `Restored` arrived, on the TSC's time line.
fn status(state: &mut GuestState, restored_at_ns: u64, out: &mut [u8]) -> usize {
    let keeper = keeper_cpu::report();
    let wall_clock_ns = if state.restores == 0 {
        0
    } else {
        let since = clock::now_ns().saturating_sub(restored_at_ns);
        state.wall_clock_ns.saturating_add(since)
    };
    let status = Status {
        counter: keeper.counter,
        checks: keeper.checks,
        registers: keeper.registers,
        vector_bits: keeper.vector_bits,
        random: state.draw(),
        wall_clock_ns,
        restores: state.restores,
        restore_id: state.restore_id.as_str(),
    };
    // MAX_STATUS_JSON covers the longest restore id kept, fully escaped.
    status.write_json(out).unwrap_or(0)
}

/// Reads one frame into `frame`; returns its kind and body length.
fn read_frame(v: &mut Vsock, frame: &mut [u8; FRAME_BUF]) -> Result<(Kind, usize), End> {
    let mut header = [0u8; HEADER_LEN];
    v.driver.recv_exact(&mut header)?;
    let h = Header::decode(&header)?;
    if h.kind.from_guest() {
        return Err(End::WrongDirection(h.kind));
    }
    let len = h.length as usize; // at most MAX_BODY, checked by decode
    v.driver.recv_exact(&mut frame[..len])?;
    Ok((h.kind, len))
}

/// How an invocation is answered.
enum Answer<'a> {
    Response(&'a [u8]),
    Error(Failure<'a>),
}

/// `thaw:crash`: the runtime dies mid-invocation. Its last words are function output, printed
/// even when quiet, as a host would show a crashed runtime's in its invocation logs.
fn crash(request_id: &str) -> ! {
    io::print_output(format_args!(
        "thaw:crash: the runtime dies during request {:?} as asked; exit status 1\n",
        request_id
    ));
    io::exit(1)
}

/// `thaw:log=N`: the function's output, printed even when quiet.
fn log_lines(n: u32, request_id: &str) {
    for line in 1..=n {
        io::print_output(format_args!(
            "log line {line} of {n} for request {}\n",
            request_id.escape_debug()
        ));
    }
}

struct Agent {
    init_type: InitType,
    fail: Fail,
    hooks: Hooks<GuestState>,
    state: GuestState,
    reply: &'static mut [u8; FRAME_BUF],
    invocations: u64,
    /// When the last `Restored` arrived, on the TSC's time line: the guest's wall clock is the
    /// host's from that frame plus the time since.
    restored_at_ns: u64,
}

impl Agent {
    /// Answers one `Invoke`, carrying out the command its payload names (`thaw:crash` and
    /// `thaw:hang` never answer).
    fn invoke(&mut self, v: &mut Vsock, i: &Invoke<'_>) -> Result<(), End> {
        self.invocations += 1;
        let command = invoke_cmd::parse(i.payload);
        let mut buf = [0u8; ANSWER_BUF];
        let answer = self.perform(i, command, &mut buf);
        self.log_invocation(i, command, &answer);
        let request_id = i.request_id;
        let reply = match answer {
            Answer::Response(payload) => Message::Response {
                request_id,
                payload,
            },
            Answer::Error(failure) => Message::InvokeError {
                request_id,
                failure,
            },
        };
        self.send(v, &reply)
    }

    /// Carries out `command`; answers formatted here go to `buf`.
    fn perform<'a>(
        &mut self,
        i: &Invoke<'a>,
        command: Command<'a>,
        buf: &'a mut [u8; ANSWER_BUF],
    ) -> Answer<'a> {
        let len = match command {
            Command::Digest => {
                let digest: [u8; 32] = Sha256::digest(i.payload).into();
                buf[..digest.len()].copy_from_slice(&digest);
                digest.len()
            }
            Command::Status => status(&mut self.state, self.restored_at_ns, buf),
            Command::Error => {
                return Answer::Error(Failure {
                    error_type: INVOKE_ERROR_TYPE,
                    body: INVOKE_ERROR_BODY,
                });
            }
            Command::Crash => crash(i.request_id),
            Command::Hang => {
                if self.invocations <= LOGGED_INVOCATIONS {
                    println!(
                        "agent: invoke #{} {:?}: thaw:hang, never answering",
                        self.invocations, i.request_id
                    );
                }
                loop {
                    core::hint::spin_loop();
                }
            }
            Command::Sleep(ms) => {
                busy_wait_ms(ms);
                format_into(buf, format_args!("slept {ms} ms")).unwrap_or(0)
            }
            Command::Log(n) => {
                log_lines(n, i.request_id);
                format_into(buf, format_args!("logged {n} lines")).unwrap_or(0)
            }
            Command::Echo(text) => return Answer::Response(text),
            Command::Note(text) => {
                // The previous note is read before the new one overwrites it.
                let previous = read_note(buf);
                write_note(text);
                previous
            }
            Command::Bad(bad) => {
                // ANSWER_BUF holds any bad command's document (MAX_ERROR_JSON).
                let len = bad.write_json(buf).unwrap_or(0);
                return Answer::Error(Failure {
                    error_type: BAD_COMMAND_TYPE,
                    body: &buf[..len],
                });
            }
        };
        Answer::Response(&buf[..len])
    }

    fn log_invocation(&self, i: &Invoke<'_>, command: Command<'_>, answer: &Answer<'_>) {
        let (n, id) = (self.invocations, i.request_id);
        if n == LOGGED_INVOCATIONS + 1 {
            println!("agent: further invocations are not logged");
        }
        if n > LOGGED_INVOCATIONS {
            return;
        }
        match (command, answer) {
            (Command::Status, Answer::Response(json)) => {
                println!(
                    "agent: invoke #{n} {id:?}: status, {} bytes of JSON",
                    json.len()
                );
            }
            (Command::Note(text), Answer::Response(previous)) => println!(
                "agent: invoke #{n} {id:?}: thaw:note, answered the previous note ({} bytes), \
                 kept a note of {} bytes",
                previous.len(),
                text.len()
            ),
            (Command::Digest, Answer::Response([a, b, c, d, ..])) => println!(
                "agent: invoke #{n} {id:?}: {} payload bytes, sha-256 \
                 {a:02x}{b:02x}{c:02x}{d:02x}...",
                i.payload.len()
            ),
            (_, Answer::Response(payload)) => println!(
                "agent: invoke #{n} {id:?}: {}, answered {} bytes",
                command.name(),
                payload.len()
            ),
            (_, Answer::Error(f)) => println!(
                "agent: invoke #{n} {id:?}: {}, answered {} ({} bytes)",
                command.name(),
                f.error_type,
                f.body.len()
            ),
        }
    }

    fn send(&mut self, v: &mut Vsock, m: &Message) -> Result<(), End> {
        let n = m.encode_into(self.reply)?;
        v.driver.send(&self.reply[..n])?;
        Ok(())
    }

    /// One connection, from `Hello` until it fails (a `Shutdown` never returns). Frames are
    /// read into `frame`, kept apart from the agent so that handlers may change the agent while
    /// a decoded frame borrows its bytes.
    fn session(&mut self, v: &mut Vsock, frame: &mut [u8; FRAME_BUF]) -> End {
        match self.serve(v, frame) {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    fn serve(
        &mut self,
        v: &mut Vsock,
        frame: &mut [u8; FRAME_BUF],
    ) -> Result<core::convert::Infallible, End> {
        let agent = concat!("thaw-test-guest/", env!("CARGO_PKG_VERSION"));
        let init_type = self.init_type;
        self.send(v, &Message::Hello { agent, init_type })?;
        match self.fail {
            Fail::Init => {
                println!("agent: init failing as asked (thaw.fail=init)");
                self.send(
                    v,
                    &Message::InitError(Failure {
                        error_type: INIT_ERROR_TYPE,
                        body: INIT_ERROR_BODY,
                    }),
                )?;
            }
            Fail::Exit => {
                println!("agent: the runtime exits during init as asked (thaw.fail=exit)");
                io::exit(1);
            }
            _ if init_type == InitType::OnDemand => self.send(v, &Message::Ready)?,
            _ => {}
        }
        loop {
            let (kind, len) = read_frame(v, frame)?;
            // Decoding borrows the frame buffer; answers are built in the reply buffer.
            match Message::decode(kind, &frame[..len])? {
                Message::Invoke(i) => self.invoke(v, &i)?,
                Message::Checkpoint => {
                    let reply = match self.hooks.run_before_checkpoint(&mut self.state) {
                        Ok(_) => Message::SnapshotReady,
                        Err(e) => Message::CheckpointError(Failure {
                            error_type: "Runtime.BeforeCheckpointError",
                            body: e.as_bytes(),
                        }),
                    };
                    self.send(v, &reply)?;
                }
                Message::Restored(r) => {
                    self.restored_at_ns = clock::now_ns();
                    let ran = self.hooks.run_after_restore(&mut self.state, &r);
                    let n = match ran {
                        Ok(_) => Message::RestoreDone.encode_into(self.reply)?,
                        Err(e) => Message::RestoreError(Failure {
                            error_type: "Runtime.AfterRestoreError",
                            body: e.as_bytes(),
                        })
                        .encode_into(self.reply)?,
                    };
                    v.driver.send(&self.reply[..n])?;
                }
                Message::Shutdown => {
                    println!(
                        "agent: shutdown requested after {} invocations (stray interrupts: {}, \
                         stack used: {} of {} bytes); powering off",
                        self.invocations,
                        crate::traps::STRAY_INTERRUPTS.load(core::sync::atomic::Ordering::Relaxed),
                        crate::arch::user_stack_used(0),
                        crate::arch::USER_STACK_BYTES,
                    );
                    io::exit(0);
                }
                other => return Err(End::WrongDirection(other.kind())),
            }
        }
    }
}

/// Runs the agent forever (it ends the VM on `Shutdown`).
pub fn run(vsock: &mut Vsock, options: &Options) -> ! {
    let (init_type, fail) = (options.init_type, options.fail);
    RESTORE_HOOK_MS.store(options.restore_hook_ms, Ordering::Relaxed);
    let mut hooks = Hooks::default();
    // Registration cannot fail: the registry has room for several hooks of each kind.
    let _ = hooks.before_checkpoint(match fail {
        Fail::Checkpoint => failing_before_checkpoint,
        _ => before_checkpoint,
    });
    let _ = hooks.after_restore(match fail {
        Fail::Restore => failing_after_restore,
        _ => after_restore,
    });
    println!("agent: registered 1 before-checkpoint hook and 1 after-restore hook");
    let mut agent = Agent {
        init_type,
        fail,
        hooks,
        state: GuestState::default(),
        reply: reply_buffer(),
        invocations: 0,
        restored_at_ns: 0,
    };
    let frame = frame_buffer();
    loop {
        if !vsock.connect(AGENT_PORT) {
            io::exit(crate::EXIT_VSOCK);
        }
        match agent.session(vsock, frame) {
            End::Transport(Error::Stalled) => {
                println!("agent: the vsock device stalled");
                if !vsock.reset() {
                    io::exit(crate::EXIT_VSOCK);
                }
            }
            End::Transport(e) => println!("agent: connection ended ({e:?}); reconnecting"),
            End::Malformed(e) => {
                println!("agent: malformed frame from the host: {e}; resetting the connection");
                vsock.driver.close();
            }
            End::WrongDirection(k) => {
                println!(
                    "agent: malformed frame from the host: unexpected kind {k:?}; \
                     resetting the connection"
                );
                vsock.driver.close();
            }
        }
    }
}

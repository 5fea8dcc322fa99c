//! One run of the nested host: virtiofsd shares `/`, QEMU boots the outer kernel with the
//! outer initramfs, and the init runs a command script written for this run. The console (the
//! command's output) streams to the caller; the init's last line carries the command's exit
//! status and a token only this run knows, so output of the command cannot forge it.
//!
//! Run files live in a directory under the cache, named to the init on the kernel command line:
//! the command script, and `tmp`, where the init mounts a tmpfs that becomes the command's
//! `TMPDIR` (Unix sockets do not work on virtiofs, and temporary files belong to the run).

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::{DEFAULT_MEM_MIB, INSIDE_ENV, NestedHost, NestedHostError, outer_image};

/// Variables not passed into the nested host: its temporary directory is its own.
const DROPPED_ENV: &[&str] = &["TMPDIR", "TMP", "TEMP", "TEMPDIR"];
/// A Unix socket path a test may bind in the temporary directory: what it must leave room for.
const SOCKET_ROOM: usize = 40;
/// How many console lines an error quotes.
const TAIL_LINES: usize = 40;
/// How long QEMU may take to stop after the command's status is known.
const POWER_OFF_GRACE: Duration = Duration::from_secs(30);
/// How long virtiofsd may take to offer its socket.
const VIRTIOFSD_START: Duration = Duration::from_secs(10);
/// Longest Unix socket path.
const MAX_SOCKET_PATH: usize = 107;
/// QEMU warnings that are expected and say nothing: one per CPU feature of the model that TCG
/// does not emulate, and one about the SeaBIOS setting that keeps the console clean.
const EXPECTED_WARNINGS: &[&str] = &[
    "TCG doesn't support requested feature",
    "externally provided fw_cfg item names",
];

/// What to run and on what machine.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Program and arguments.
    pub command: Vec<OsString>,
    /// The directory it starts in (a host path; the same path inside).
    pub workdir: PathBuf,
    /// Its environment ([`INSIDE_ENV`] is added).
    pub env: Vec<(OsString, OsString)>,
    /// Memory of the nested host.
    pub mem_mib: u64,
    /// Its vCPUs.
    pub cpus: u8,
    /// Stop it after this long.
    pub timeout: Option<Duration>,
}

impl RunOptions {
    /// `command` in the current directory with this process's environment (less its
    /// temporary-directory variables), on [`DEFAULT_MEM_MIB`] and as many vCPUs as this host
    /// has CPUs (at least 2), with no time limit.
    pub fn new(command: Vec<OsString>) -> Self {
        Self {
            command,
            workdir: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            env: std::env::vars_os()
                .filter(|(k, _)| !DROPPED_ENV.iter().any(|d| OsStr::new(d) == k))
                .collect(),
            mem_mib: DEFAULT_MEM_MIB,
            cpus: vmm_core::config::host_cpus().clamp(2, 64) as u8,
            timeout: None,
        }
    }
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NestedExit {
    /// Its exit status (125 if the nested host could not start it).
    pub code: i32,
    /// From starting QEMU to the status line.
    pub elapsed: Duration,
}

pub(super) fn run(
    host: &NestedHost,
    options: &RunOptions,
    console: &mut dyn Write,
) -> Result<NestedExit, NestedHostError> {
    if options.command.is_empty() {
        return Err(NestedHostError::EmptyCommand);
    }
    if !(512..=65536).contains(&options.mem_mib) || options.cpus == 0 {
        return Err(NestedHostError::Option(format!(
            "the nested host needs 512 to 65536 MiB and at least one vCPU, not {} MiB and {}",
            options.mem_mib, options.cpus
        )));
    }
    fs::create_dir_all(&host.runs_dir).map_err(NestedHostError::io(&host.runs_dir))?;
    let run_dir = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&host.runs_dir)
        .map_err(NestedHostError::io(&host.runs_dir))?;
    let files = RunFiles::new(run_dir.path())?;
    fs::create_dir(&files.tmp).map_err(NestedHostError::io(&files.tmp))?;
    fs::write(&files.script, command_script(options, &files.tmp))
        .map_err(NestedHostError::io(&files.script))?;
    outer_image::write(&host.kernel, &host.packages.busybox(), &files.initrd)?;
    let token = token()?;

    let mut virtiofsd = Virtiofsd::start(host, &files.socket, run_dir.path())?;
    let mut qemu = Command::new(host.packages.qemu());
    qemu.env("LD_LIBRARY_PATH", host.packages.library_path())
        .args(qemu_args(host, options, &files, &token))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    debug!(?qemu, "starting the nested host");
    let started = Instant::now();
    let mut child = qemu.spawn().map_err(|source| NestedHostError::Spawn {
        program: host.packages.qemu(),
        source,
    })?;
    let stderr = collect_stderr(&mut child);
    let chunks = stream_stdout(&mut child);
    let outcome = watch_console(&mut child, &chunks, console, options, &token, started);
    let _ = child.kill();
    let qemu_status = child.wait();
    virtiofsd.stop();
    let stderr = stderr.join().unwrap_or_default();
    match outcome? {
        Watched::Exited { code, elapsed } => Ok(NestedExit { code, elapsed }),
        Watched::Stopped { console_tail } => Err(NestedHostError::NoExitStatus {
            qemu: match qemu_status {
                Ok(status) => status.to_string(),
                Err(e) => e.to_string(),
            },
            stderr,
            console_tail,
        }),
    }
}

/// A run's files: where each is, checked to be passable to the nested host.
struct RunFiles {
    /// The command script.
    script: PathBuf,
    /// virtiofsd's socket.
    socket: PathBuf,
    /// The command's `TMPDIR` (a tmpfs in the nested host).
    tmp: PathBuf,
    /// The outer initramfs.
    initrd: PathBuf,
}

impl RunFiles {
    fn new(dir: &Path) -> Result<Self, NestedHostError> {
        let files = Self {
            script: dir.join("command.sh"),
            socket: dir.join("fs.sock"),
            tmp: dir.join("tmp"),
            initrd: dir.join("outer.cpio.zst"),
        };
        for path in [&files.script, &files.socket, &files.tmp] {
            check_shareable(path)?;
        }
        if files.tmp.as_os_str().len() + SOCKET_ROOM > MAX_SOCKET_PATH {
            return Err(NestedHostError::Unshareable {
                path: files.tmp,
                reason: "Unix socket paths (at most 107 bytes) must fit below it: use a cache \
                         directory with a shorter path",
            });
        }
        Ok(files)
    }
}

/// What the console showed before the machine stopped.
enum Watched {
    Exited { code: i32, elapsed: Duration },
    Stopped { console_tail: String },
}

/// Copies the console to `console` until the status line (then waits for power-off), the
/// machine stops, or the time limit passes.
fn watch_console(
    child: &mut Child,
    chunks: &mpsc::Receiver<Vec<u8>>,
    console: &mut dyn Write,
    options: &RunOptions,
    token: &str,
    started: Instant,
) -> Result<Watched, NestedHostError> {
    let deadline = options.timeout.map(|t| started + t);
    let mut lines = LineScanner::new(token);
    loop {
        let wait = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => Duration::from_secs(3600),
        };
        match chunks.recv_timeout(wait) {
            Ok(chunk) => {
                // The console is the command's output; a broken sink must not stop the run.
                let _ = console.write_all(&chunk).and_then(|()| console.flush());
                if let Some(code) = lines.feed(&chunk) {
                    let elapsed = started.elapsed();
                    wait_for_exit(child, POWER_OFF_GRACE);
                    return Ok(Watched::Exited { code, elapsed });
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(NestedHostError::Timeout {
                        after: options.timeout.unwrap_or_default(),
                    });
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Ok(Watched::Stopped {
                    console_tail: lines.tail(),
                });
            }
        }
    }
}

fn wait_for_exit(child: &mut Child, grace: Duration) {
    let until = Instant::now() + grace;
    while Instant::now() < until {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    warn!("the nested host did not power off after the command ended; stopping it");
}

/// Finds the status line in the console and keeps its last lines for errors.
struct LineScanner {
    prefix: String,
    partial: Vec<u8>,
    tail: std::collections::VecDeque<String>,
}

impl LineScanner {
    fn new(token: &str) -> Self {
        Self {
            prefix: format!("thaw-nested-host: exit {token} "),
            partial: Vec::new(),
            tail: std::collections::VecDeque::new(),
        }
    }

    /// Takes more console bytes; the command's exit status once its line is complete.
    fn feed(&mut self, chunk: &[u8]) -> Option<i32> {
        self.partial.extend_from_slice(chunk);
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            if let Some(code) = line
                .strip_prefix(&self.prefix)
                .and_then(|c| c.trim().parse().ok())
            {
                return Some(code);
            }
            if self.tail.len() == TAIL_LINES {
                self.tail.pop_front();
            }
            self.tail.push_back(line);
        }
        None
    }

    fn tail(&self) -> String {
        let mut text: Vec<&str> = self.tail.iter().map(String::as_str).collect();
        let partial = String::from_utf8_lossy(&self.partial);
        if !partial.is_empty() {
            text.push(&partial);
        }
        text.join("\n")
    }
}

/// Reads QEMU's stdout (the serial console) on a thread, in chunks as they come.
fn stream_stdout(child: &mut Child) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut out) = child.stdout.take() {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match out.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    rx
}

/// Collects QEMU's stderr, without its expected warnings.
fn collect_stderr(child: &mut Child) -> std::thread::JoinHandle<String> {
    let stderr = child.stderr.take();
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut stderr) = stderr {
            let _ = stderr.read_to_string(&mut text);
        }
        text.lines()
            .filter(|l| !EXPECTED_WARNINGS.iter().any(|w| l.contains(w)))
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// QEMU's command line: a TCG machine with an EPYC CPU offering SVM and nested paging, the
/// outer kernel and initramfs, the host's files on virtiofs (which needs shared memory), the
/// console on stdout and nothing else.
fn qemu_args(
    host: &NestedHost,
    options: &RunOptions,
    files: &RunFiles,
    token: &str,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |a: &str| args.push(a.into());
    for dir in host.packages.firmware_dirs() {
        push("-L");
        push(&dir.to_string_lossy());
    }
    let mem = options.mem_mib;
    for a in [
        "-machine",
        "pc,memory-backend=mem",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "EPYC-Rome,+svm,+npt",
        "-smp",
        &options.cpus.to_string(),
        "-m",
        &format!("{mem}M"),
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        // SeaBIOS would otherwise draw its banner, with terminal escapes, on the console.
        "-fw_cfg",
        "name=etc/sercon-port,string=0",
        "-no-reboot",
        "-chardev",
        &format!("socket,id=fs,path={}", files.socket.display()),
        "-device",
        "vhost-user-fs-pci,chardev=fs,tag=host",
        "-kernel",
    ] {
        push(a);
    }
    push(&host.kernel.bzimage.to_string_lossy());
    push("-initrd");
    push(&files.initrd.to_string_lossy());
    push("-append");
    // tsc=reliable: left to itself the outer kernel finds TCG's TSCs unsynchronized between
    // its CPUs and marks the TSC unstable; its KVM then shifts a guest's TSC each time the
    // guest's vCPU thread moves to the other CPU, and the Linux guest's kvm-clock stalls or
    // jumps (seen here as guests that hang mid-boot or time out a vsock connect at once, in
    // about one run in six). TCG's TSC is one clock for all of its CPUs, so it can be trusted;
    // the outer kernel then also keeps time with it instead of an emulated HPET.
    push(&format!(
        "console=ttyS0 quiet panic=-1 tsc=reliable thaw.nested.run={} thaw.nested.tmp={} \
         thaw.nested.token={token}",
        files.script.display(),
        files.tmp.display()
    ));
    args
}

/// The shell script the init runs in the chroot, with `tmp` as its `TMPDIR`.
fn command_script(options: &RunOptions, tmp: &Path) -> Vec<u8> {
    let mut script = b"#!/bin/sh\n# Written by Thaw's nested host for one run.\n".to_vec();
    for (key, value) in &options.env {
        let valid = !key.is_empty()
            && key
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'_')
            && !key.as_bytes()[0].is_ascii_digit();
        if valid && key != INSIDE_ENV {
            script.extend_from_slice(b"export ");
            script.extend_from_slice(key.as_bytes());
            script.push(b'=');
            script.extend_from_slice(&shell_quote(value));
            script.push(b'\n');
        }
    }
    script.extend_from_slice(format!("export {INSIDE_ENV}=1\nexport TMPDIR=").as_bytes());
    script.extend_from_slice(&shell_quote(tmp.as_os_str()));
    script.extend_from_slice(b"\ncd ");
    script.extend_from_slice(&shell_quote(options.workdir.as_os_str()));
    script.extend_from_slice(b" || exit 125\nexec");
    for word in &options.command {
        script.push(b' ');
        script.extend_from_slice(&shell_quote(word));
    }
    script.push(b'\n');
    script
}

/// `'…'`, with each `'` written as `'\''`.
fn shell_quote(word: &OsStr) -> Vec<u8> {
    let mut out = vec![b'\''];
    for &b in word.as_bytes() {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

/// Whether `path` can go on a kernel command line as one word, and in a QEMU option.
fn check_shareable(path: &Path) -> Result<(), NestedHostError> {
    let bytes = path.as_os_str().as_bytes();
    if bytes
        .iter()
        .any(|b| b.is_ascii_whitespace() || b"\",".contains(b))
        || !bytes.is_ascii()
    {
        return Err(NestedHostError::Unshareable {
            path: path.to_owned(),
            reason: "the cache directory's path must be ASCII without spaces, quotes or commas (it \
                     goes on the nested kernel's command line and in QEMU's options)",
        });
    }
    Ok(())
}

/// A fresh token for the status line.
fn token() -> Result<String, NestedHostError> {
    let path = Path::new("/dev/urandom");
    let mut bytes = [0u8; 12];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(NestedHostError::io(path))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// virtiofsd sharing `/`, stopped when dropped.
struct Virtiofsd {
    child: Option<Child>,
}

impl Virtiofsd {
    fn start(host: &NestedHost, socket: &Path, dir: &Path) -> Result<Self, NestedHostError> {
        let program = host.packages.virtiofsd();
        let log_path = dir.join("virtiofsd.log");
        let log = fs::File::create(&log_path).map_err(NestedHostError::io(&log_path))?;
        let log_err = log.try_clone().map_err(NestedHostError::io(&log_path))?;
        let mut socket_arg = OsString::from("--socket-path=");
        socket_arg.push(socket);
        let child = Command::new(&program)
            .env("LD_LIBRARY_PATH", host.packages.library_path())
            .arg(socket_arg)
            .args(["-o", "source=/", "-o", "cache=auto", "-o", "sandbox=chroot"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|source| NestedHostError::Spawn {
                program: program.clone(),
                source,
            })?;
        let mut this = Self { child: Some(child) };
        let until = Instant::now() + VIRTIOFSD_START;
        loop {
            if socket.exists() {
                return Ok(this);
            }
            let exited = this
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() >= until {
                this.stop();
                return Err(NestedHostError::Virtiofsd {
                    log: fs::read_to_string(&log_path).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_needs_this_runs_token() {
        let mut lines = LineScanner::new("abc");
        assert_eq!(
            lines.feed(b"hello\r\nthaw-nested-host: exit other 0\r\n"),
            None
        );
        assert_eq!(
            lines.feed(b"thaw-nested-host: exit abc 1"),
            None,
            "not yet whole"
        );
        assert_eq!(lines.feed(b"01\r\n"), Some(101));
        assert!(lines.tail().contains("hello"));
        assert!(lines.tail().contains("exit other 0"));
    }

    #[test]
    fn the_tail_keeps_the_last_lines() {
        let mut lines = LineScanner::new("t");
        for i in 0..100 {
            lines.feed(format!("line {i}\n").as_bytes());
        }
        lines.feed(b"partial");
        let tail = lines.tail();
        assert!(!tail.contains("line 59\n") && tail.contains("line 60"));
        assert!(tail.ends_with("line 99\npartial"));
    }

    #[test]
    fn the_script_quotes_everything_and_skips_unusable_names() {
        let options = RunOptions {
            command: vec!["/bin/echo".into(), "it's".into(), "a b".into()],
            workdir: PathBuf::from("/work/my dir"),
            env: vec![
                ("PATH".into(), "/usr/bin".into()),
                ("WEIRD".into(), "x'y\nz".into()),
                ("BAD-NAME".into(), "v".into()),
                ("1X".into(), "v".into()),
                (INSIDE_ENV.into(), "0".into()),
            ],
            mem_mib: 1024,
            cpus: 2,
            timeout: None,
        };
        let script =
            String::from_utf8(command_script(&options, Path::new("/c/run-x/tmp"))).unwrap();
        assert!(script.starts_with("#!/bin/sh\n"));
        assert!(script.contains("export PATH='/usr/bin'\n"));
        assert!(script.contains("export WEIRD='x'\\''y\nz'\n"));
        assert!(!script.contains("BAD-NAME") && !script.contains("1X="));
        assert!(script.contains(&format!("export {INSIDE_ENV}=1\n")));
        assert!(!script.contains(&format!("{INSIDE_ENV}='0'")));
        assert!(script.contains("export TMPDIR='/c/run-x/tmp'\n"));
        assert!(script.contains("cd '/work/my dir' || exit 125\n"));
        assert!(script.ends_with("exec '/bin/echo' 'it'\\''s' 'a b'\n"));
        // The shell reads it back as written.
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{}; printf '%s|' \"$WEIRD\"",
                script
                    .lines()
                    .filter(|l| l.starts_with("export WEIRD") || l.starts_with('z'))
                    .collect::<Vec<_>>()
                    .join("\n")
            ))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "x'y\nz|");
    }

    #[test]
    fn paths_for_the_kernel_command_line_are_single_words() {
        assert!(check_shareable(Path::new("/root/.cache/thaw/run-x/command.sh")).is_ok());
        for bad in ["/a b/c", "/a\"b", "/a,b", "/caf\u{e9}"] {
            assert!(matches!(
                check_shareable(Path::new(bad)),
                Err(NestedHostError::Unshareable { .. })
            ));
        }
    }

    #[test]
    fn default_options_drop_the_temporary_directory() {
        let options = RunOptions::new(vec!["true".into()]);
        assert!(options.cpus >= 2);
        assert_eq!(options.mem_mib, DEFAULT_MEM_MIB);
        assert!(
            !options
                .env
                .iter()
                .any(|(k, _)| DROPPED_ENV.iter().any(|d| OsStr::new(d) == k))
        );
    }
}

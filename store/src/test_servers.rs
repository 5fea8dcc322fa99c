//! S3 servers on loopback for tests (feature `test-servers`): two independent
//! implementations, `s3s-fs` (Rust) and `moto`'s server (Python), each started with one
//! bucket, [`BUCKET`]. `scripts/test` installs both (`scripts/deps.sh`,
//! `thaw_ensure_s3_servers`); without them a test panics and says how to get them.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test support: fail loudly

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Credentials, Secret, StoreOptions};

pub const BUCKET: &str = "thaw-test";
pub const ACCESS_KEY: &str = "thaw";
pub const SECRET_KEY: &str = "thaw-secret-key";
pub const REGION: &str = "us-east-1";

/// An S3 server on loopback, stopped when dropped.
pub struct Server {
    child: Child,
    pub endpoint: String,
    /// s3s-fs's data directory (its buckets are directories, its objects files); `None` for
    /// moto, which keeps everything in memory.
    root: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Options that reach this server with its credentials.
    pub fn options(&self) -> StoreOptions {
        StoreOptions {
            endpoint: Some(self.endpoint.clone()),
            region: Some(REGION.into()),
            credentials: Some(Credentials {
                access_key_id: ACCESS_KEY.into(),
                secret_access_key: Secret(SECRET_KEY.into()),
            }),
            ..StoreOptions::default()
        }
    }

    /// The environment AWS's tools (and `thaw snapshot push`/`pull`) read to reach it.
    pub fn env(&self) -> [(&'static str, String); 4] {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", REGION.into()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
        ]
    }

    /// Where s3s-fs keeps the object at `key` of the bucket (s3s-fs only).
    pub fn object_file(&self, key: &str) -> PathBuf {
        self.root
            .as_ref()
            .expect("only s3s-fs keeps objects in files")
            .path()
            .join(BUCKET)
            .join(key)
    }
}

/// A loopback port nothing listens on (right now).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn tool(env: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{name} is not installed: ./scripts/test installs it (scripts/deps.sh, \
             thaw_ensure_s3_servers), or set {env} to its path"
        )
    })
}

fn wait_for(port: u16, child: &mut Child, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{name} exited at start: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not listen on {port} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn quiet(command: &mut Command) -> &mut Command {
    command.stdout(Stdio::null()).stderr(Stdio::null())
}

/// `s3s-fs` (`$THAW_S3S_FS`, else on `PATH`), its data in a temporary directory.
pub fn s3s_fs() -> Server {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join(BUCKET)).unwrap();
    let port = free_port();
    let mut child = quiet(
        Command::new(tool("THAW_S3S_FS", "s3s-fs"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root.path()),
    )
    .spawn()
    .expect("start s3s-fs");
    wait_for(port, &mut child, "s3s-fs");
    Server {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
        root: Some(root),
    }
}

/// `moto`'s server (`$THAW_MOTO_SERVER`, else `moto_server` on `PATH`).
pub fn moto() -> Server {
    let port = free_port();
    let mut child = quiet(Command::new(tool("THAW_MOTO_SERVER", "moto_server")).args([
        "-H",
        "127.0.0.1",
        "-p",
        &port.to_string(),
    ]))
    .spawn()
    .expect("start moto_server");
    wait_for(port, &mut child, "moto_server");
    // moto keeps buckets in memory and takes an unsigned CreateBucket.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    Server {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
        root: None,
    }
}

/// The chunk object files s3s-fs keeps under `prefix`, sorted.
pub fn chunk_files(server: &Server, prefix: &str) -> Vec<PathBuf> {
    let dir = server.object_file(&format!("{prefix}/chunks"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.parse::<snapshot::store_object::ObjectName>().is_ok())
        })
        .collect();
    files.sort();
    files
}

/// A TCP proxy on loopback in front of an S3 server that holds every request back for a fixed
/// delay before passing it on, as a store in another zone answers later: each read from the
/// client (a request, with HTTP/1.1 keep-alive one per round trip) is forwarded `delay` after
/// it arrived. Answers pass straight through. Stops accepting when dropped.
pub struct DelayProxy {
    pub endpoint: String,
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl DelayProxy {
    /// The options and environment of `server`, pointed at this proxy.
    pub fn options(&self, server: &Server) -> StoreOptions {
        StoreOptions {
            endpoint: Some(self.endpoint.clone()),
            ..server.options()
        }
    }

    pub fn env(&self, server: &Server) -> [(&'static str, String); 4] {
        let mut env = server.env();
        env[0].1 = self.endpoint.clone();
        env
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Starts a [`DelayProxy`] in front of `server`.
pub fn delay_proxy(server: &Server, delay: Duration) -> DelayProxy {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let upstream: String = server
        .endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            if stopped.load(Ordering::SeqCst) {
                break;
            }
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (mut client_r, mut server_w) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut server_r, mut client_w) = (server, client);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match client_r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            std::thread::sleep(delay);
                            if server_w.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = server_w.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut server_r, &mut client_w);
                let _ = client_w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    DelayProxy {
        endpoint: format!("http://127.0.0.1:{port}"),
        port,
        stop,
    }
}

//! The vsock bench responder (`thaw.vsock-bench=1`): connects to host port 9000, greets, and
//! serves the commands of `thaw_test_guest::bench` (echo, upload with SHA-256, download with
//! SHA-256, quit) until told to quit. It prints nothing per command: every console byte is an
//! exit to the VMM, and the host is timing this.

use hooks_sdk::protocol::AGENT_PORT;
use sha2::{Digest, Sha256};
use thaw_test_guest::bench::{COMMAND_LEN, Command, GREETING, MAX_DOWNLOAD, MAX_ECHO, XorShift};
use thaw_test_guest::driver::Error;

use crate::virtio_mmio::Vsock;
use crate::{io, println};

/// Download data, generated once, and the hash of its first `len` bytes, once asked for.
struct Download<'a> {
    data: &'a [u8],
    digest: Option<(usize, [u8; 32])>,
}

enum End {
    Transport(Error),
    BadCommand([u8; COMMAND_LEN]),
}

impl From<Error> for End {
    fn from(e: Error) -> Self {
        End::Transport(e)
    }
}

fn serve(v: &mut Vsock, scratch: &mut [u8], down: &mut Download) -> Result<(), End> {
    v.driver.send(GREETING)?;
    loop {
        let mut cmd = [0u8; COMMAND_LEN];
        v.driver.recv_exact(&mut cmd)?;
        match Command::decode(&cmd) {
            Some(Command::Echo(n)) if n as usize <= MAX_ECHO => {
                let data = &mut scratch[..n as usize];
                v.driver.recv_exact(data)?;
                v.driver.send(data)?;
            }
            Some(Command::Upload(n)) => {
                // Hashed as it arrives, a receive buffer's worth at a time.
                let mut hasher = Sha256::new();
                let mut left = n;
                while left > 0 {
                    let want = (left as usize).min(scratch.len());
                    let got = v.driver.recv(&mut scratch[..want])?;
                    hasher.update(&scratch[..got]);
                    left -= got as u64;
                }
                let digest: [u8; 32] = hasher.finalize().into();
                v.driver.send(&digest)?;
            }
            Some(Command::Download(n)) if n as usize <= MAX_DOWNLOAD => {
                let n = n as usize;
                let digest = match down.digest {
                    Some((len, d)) if len == n => d,
                    _ => {
                        let d: [u8; 32] = Sha256::digest(&down.data[..n]).into();
                        down.digest = Some((n, d));
                        d
                    }
                };
                v.driver.send(&down.data[..n])?;
                v.driver.send(&digest)?;
            }
            Some(Command::Quit) => {
                println!("bench: quit requested; powering off");
                io::exit(0);
            }
            _ => return Err(End::BadCommand(cmd)),
        }
    }
}

/// Serves bench commands forever (it ends the VM on `Quit`).
pub fn run(vsock: &mut Vsock) -> ! {
    let (data, scratch) = crate::agent::frame_buffer().split_at_mut(MAX_DOWNLOAD);
    XorShift(0x5eed_0f7a_1c0d_e5e1).fill(data);
    let mut down = Download { data, digest: None };
    println!("bench: serving echo, upload and download on host port {AGENT_PORT}");
    loop {
        if !vsock.connect(AGENT_PORT) {
            io::exit(crate::EXIT_VSOCK);
        }
        match serve(vsock, scratch, &mut down) {
            Ok(()) => {}
            Err(End::Transport(Error::Stalled)) => {
                if !vsock.reset() {
                    io::exit(crate::EXIT_VSOCK);
                }
            }
            Err(End::Transport(e)) => println!("bench: connection ended ({e:?}); reconnecting"),
            Err(End::BadCommand(c)) => {
                println!("bench: bad command {c:02x?}; resetting the connection");
                vsock.driver.close();
            }
        }
    }
}

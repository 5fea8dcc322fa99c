//! What a userfaultfd fault costs per 4 KiB page when each fault installs a whole chunk of a
//! given size with `UFFDIO_COPY` — the measurement behind the snapshot's chunk size (a restore
//! pages memory in one chunk per fault). A thread touches every page of a fresh anonymous
//! mapping in order; a handler thread answers each fault by copying the chunk around it.
//! With `--write` it replaces the uffd-chunk section of docs/BENCHMARKS.md.
//!
//! Run: `cargo bench --bench uffd_chunk [-- --write] [-- --iterations N]`

#![allow(clippy::expect_used, clippy::unwrap_used)] // a bench: failing loudly is the point

use std::time::{Duration, Instant};

use userfaultfd::{Event, UffdBuilder};

mod support;
use support::stats;

const REGION: usize = 128 << 20;
const PAGE: usize = 4096;

/// Touches every page of a fresh uffd-registered mapping; returns the time per page.
fn touch_all(chunk: usize, source: &[u8]) -> Duration {
    // SAFETY: a fresh private anonymous mapping, unmapped below; no other code uses it.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            REGION,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    let base = base as usize;
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(false)
        .user_mode_only(true)
        .create()
        .expect("userfaultfd (is /dev/userfaultfd or vm.unprivileged_userfaultfd available?)");
    uffd.register(base as *mut libc::c_void, REGION).unwrap();
    let src = source.as_ptr() as usize;
    let handler = std::thread::spawn(move || {
        for _ in 0..REGION / chunk {
            let Some(Event::Pagefault { addr, .. }) = uffd.read_event().unwrap() else {
                panic!("unexpected userfaultfd event");
            };
            let offset = (addr as usize - base) / chunk * chunk;
            // SAFETY: source and destination are `chunk` bytes inside their mappings (REGION
            // is a multiple of every chunk size), and the destination range is registered.
            unsafe {
                uffd.copy(
                    (src + offset) as *const libc::c_void,
                    (base + offset) as *mut libc::c_void,
                    chunk,
                    true,
                )
                .unwrap();
            }
        }
    });
    let start = Instant::now();
    let mut sum = 0u64;
    for offset in (0..REGION).step_by(PAGE) {
        // SAFETY: inside the mapping; the read faults until the handler installs the chunk.
        sum += u64::from(unsafe { std::ptr::read_volatile((base + offset) as *const u8) });
    }
    let elapsed = start.elapsed();
    handler.join().unwrap();
    std::hint::black_box(sum);
    // SAFETY: unmaps exactly the mapping made above, which nothing references any more.
    unsafe { libc::munmap(base as *mut libc::c_void, REGION) };
    elapsed / (REGION / PAGE) as u32
}

fn main() {
    let args = support::args(5);
    let source: Vec<u8> = (0..REGION).map(|i| (i * 7 % 251) as u8).collect();
    let mut table = String::from(
        "| chunk per fault | per 4 KiB page | per fault | 256 MiB by faults alone |\n|---|---|---|---|\n",
    );
    for chunk in [4usize << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20] {
        let s = stats(
            (0..args.iterations)
                .map(|_| touch_all(chunk, &source))
                .collect(),
        );
        let pages = (chunk / PAGE) as f64;
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        table.push_str(&format!(
            "| {} KiB | {:.2} µs ({:.2}–{:.2}) | {:.0} µs | {:.0} ms |\n",
            chunk >> 10,
            us(s.median),
            us(s.min),
            us(s.max),
            us(s.median) * pages,
            us(s.median) * 65536.0 / 1000.0,
        ));
    }
    let body = format!(
        "{}; {} MiB touched page by page, {} iterations; medians with (min–max).\n\n{table}",
        support::machine(),
        REGION >> 20,
        args.iterations
    );
    println!("{body}");
    if args.write {
        support::write_section("uffd-chunk", &body).expect("update docs/BENCHMARKS.md");
    }
}

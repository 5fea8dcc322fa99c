//! What the fuzz targets share (docs/fuzzing.md): an allocator that measures each case's
//! memory (how much live heap it gained, and its largest single allocation), one property at a
//! time per test binary so that what is measured is the case's own, and the runner, which
//! records a failure's seed beside the target as `proptest!` does. Each target includes this
//! file with `#[path]` (`#[macro_use] mod fuzz_harness;`); the crates' test directories are
//! apart, and this is not a test of its own (Cargo builds only `tests/*.rs` and `tests/*/main.rs`).

#![allow(dead_code)] // each target uses a different part

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};

struct Tracking;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize, size: usize) {
    let live = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(live, Ordering::Relaxed);
    LARGEST.fetch_max(size, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to the system allocator; the only additions are
// atomic counters, which neither allocate nor unwind.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size(), layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size(), layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            grew(new_size - layout.size(), new_size);
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// One property at a time in a binary (its cases and their generation).
static RUN: Mutex<()> = Mutex::new(());

/// This property alone in the binary; its largest allocation measured from now.
pub fn exclusive() -> MutexGuard<'static, ()> {
    let guard = RUN.lock().unwrap_or_else(|e| e.into_inner());
    reset_largest();
    guard
}

/// A new case: its largest allocation measured from now.
pub fn reset_largest() {
    LARGEST.store(0, Ordering::Relaxed);
}

/// The largest single allocation since [`reset_largest`].
pub fn largest() -> usize {
    LARGEST.load(Ordering::Relaxed)
}

/// The live heap a case gains, from [`Measured::start`].
pub struct Measured {
    base: usize,
}

impl Measured {
    pub fn start() -> Self {
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        Measured { base }
    }

    /// The most live heap memory gained since `start`.
    pub fn growth(&self) -> usize {
        PEAK.load(Ordering::Relaxed).saturating_sub(self.base)
    }
}

/// How many cases a property gets: `(cases, share)` runs `cases` in the short run, and
/// `PROPTEST_CASES / share` when that variable sets a longer run (`share` > 1 for properties
/// whose cases are slow).
pub trait Cases {
    fn count(self) -> u32;
}

impl Cases for u32 {
    fn count(self) -> u32 {
        (self, 1).count()
    }
}

impl Cases for (u32, u32) {
    fn count(self) -> u32 {
        let (cases, share) = self;
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .map_or(cases, |n| (n / share.max(1)).max(1))
    }
}

/// `fuzz!(name, cases, strategy, property)`: [`run`] with the calling file for the seeds.
macro_rules! fuzz {
    ($name:expr, $cases:expr, $strategy:expr, $property:expr $(,)?) => {
        fuzz_harness::run($name, file!(), $cases, $strategy, $property)
    };
}

/// Runs `property` on values of `strategy`, shrinking a failure and recording its seed in
/// `<source_file minus .rs>.proptest-regressions`, as `proptest!` does; then prints how the
/// cases ended (see it with `--nocapture`). The property returns a label of its outcome.
pub fn run<S>(
    name: &str,
    source_file: &'static str,
    cases: impl Cases,
    strategy: S,
    property: impl Fn(S::Value) -> Result<String, TestCaseError>,
) where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let cases = cases.count();
    let config = Config {
        cases,
        max_shrink_iters: 4096,
        source_file: Some(source_file),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..Config::default()
    };
    let _run = exclusive();
    let mut runner = TestRunner::new(config);
    let outcomes = RefCell::new(BTreeMap::<String, u64>::new());
    let started = Instant::now();
    let result = runner.run(&strategy, |value| {
        let label = property(value)?;
        *outcomes.borrow_mut().entry(label).or_default() += 1;
        Ok(())
    });
    eprintln!(
        "{name}: {cases} cases in {:.1?}; outcomes: {:?}",
        started.elapsed(),
        outcomes.borrow()
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

/// The name of an error's variant, as an outcome label.
pub fn label(e: &impl std::fmt::Debug) -> String {
    let text = format!("{e:?}");
    let end = text.find([' ', '{', '(']).unwrap_or(text.len());
    text[..end].to_owned()
}

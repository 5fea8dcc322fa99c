//! thawd's Prometheus metrics, labelled by function and rendered in the OpenMetrics text format
//! that `prometheus-client` writes.
//!
//! Label values are the function names of the daemon's configuration: callers record metrics
//! only for functions that exist, so an attacker who invokes made-up names cannot grow the
//! number of series without bound.

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// The `Content-Type` of [`Metrics::render`]'s output, as `prometheus-client` documents for
/// its text encoder (OpenMetrics 1.0, which Prometheus scrapes natively).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the restore-duration buckets, in seconds: a 1-2.5-5 series from 1 ms (a
/// restore into a ready shell with lazy memory) to 10 s (an eager restore of a large guest).
const RESTORE_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A label value escaped for the text format, which `prometheus-client` writes verbatim: a
/// quote, backslash or newline in a name must not break the exposition.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Escaped(String);

impl Escaped {
    fn new(value: &str) -> Self {
        let mut escaped = String::with_capacity(value.len());
        for c in value.chars() {
            match c {
                '\\' => escaped.push_str("\\\\"),
                '"' => escaped.push_str("\\\""),
                '\n' => escaped.push_str("\\n"),
                c => escaped.push(c),
            }
        }
        Self(escaped)
    }
}

impl EncodeLabelValue for Escaped {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.0.as_str(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionLabels {
    function: Escaped,
}

impl FunctionLabels {
    fn new(function: &str) -> Self {
        Self {
            function: Escaped::new(function),
        }
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum EnvironmentState {
    Idle,
    Busy,
}

impl EncodeLabelValue for EnvironmentState {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let value = match self {
            Self::Idle => "idle",
            Self::Busy => "busy",
        };
        EncodeLabelValue::encode(&value, encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EnvironmentLabels {
    function: Escaped,
    state: EnvironmentState,
}

/// Why a restore of a function whose memory is `shared` did not use the decoded copy.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum CopyMiss {
    /// The copy is still being decoded.
    Decoding,
    /// The host's budget for decoded copies has no room for it.
    Budget,
    /// Decoding it failed.
    Failed,
}

impl CopyMiss {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Decoding => "decoding",
            Self::Budget => "budget",
            Self::Failed => "failed",
        }
    }
}

impl EncodeLabelValue for CopyMiss {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MissLabels {
    function: Escaped,
    reason: CopyMiss,
}

type Counters = Family<FunctionLabels, Counter>;
type Histograms = Family<FunctionLabels, Histogram, fn() -> Histogram>;

fn restore_histogram() -> Histogram {
    Histogram::new(RESTORE_BUCKETS)
}

/// thawd's metrics. Every method takes `&self` and only touches atomics (and, the first time a
/// function is seen, a lock inside its metric family), so one `Arc<Metrics>` serves every task.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    invocations: Counters,
    errors: Counters,
    throttles: Counters,
    timeouts: Counters,
    restores: Counters,
    restore_seconds: Histograms,
    warm_hits: Counters,
    environments: Family<EnvironmentLabels, Gauge>,
    async_queued: Counters,
    async_retries: Counters,
    dead_letters: Counters,
    shared_restores: Counters,
    copy_misses: Family<MissLabels, Counter>,
    copy_evictions: Counters,
    copy_bytes: Family<FunctionLabels, Gauge>,
    copy_budget: Gauge,
    store: StoreMetrics,
}

/// What registration's store pulls cost and what the host cache of chunk objects holds
/// (thawd reads the store only when it registers its functions: `store_copies`).
#[derive(Debug, Default)]
struct StoreMetrics {
    pulls: Counter,
    cache_hits: Counter,
    cache_misses: Counter,
    fetched_bytes: Counter,
    cache_evictions: Counter,
    cache_bytes: Gauge,
    cache_objects: Gauge,
}

impl StoreMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "store_pulls",
            "Store snapshots pulled into thawd's local copies at registration",
            self.pulls.clone(),
        );
        registry.register(
            "chunk_cache_hits",
            "Chunk objects of pulled snapshots taken from the host cache",
            self.cache_hits.clone(),
        );
        registry.register(
            "chunk_cache_misses",
            "Chunk objects of pulled snapshots fetched from the store",
            self.cache_misses.clone(),
        );
        registry.register_with_unit(
            "store_fetched",
            "Chunk object bytes fetched from the store",
            Unit::Bytes,
            self.fetched_bytes.clone(),
        );
        registry.register(
            "chunk_cache_evictions",
            "Chunk objects evicted from the host cache to stay within its budget",
            self.cache_evictions.clone(),
        );
        registry.register_with_unit(
            "chunk_cache",
            "Bytes of chunk objects the host cache holds",
            Unit::Bytes,
            self.cache_bytes.clone(),
        );
        registry.register(
            "chunk_cache_objects",
            "Chunk objects the host cache holds",
            self.cache_objects.clone(),
        );
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric, all empty until a function is first recorded.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("thawd");
        let mut counter = |name: &str, help: &str| {
            let family = Counters::default();
            registry.register(name, help, family.clone());
            family
        };
        let invocations = counter("invocations", "Invocations accepted, of every type");
        let errors = counter(
            "errors",
            "Invocations whose function failed, including timeouts and crashes",
        );
        let throttles = counter("throttles", "Invocations refused with 429");
        let timeouts = counter("timeouts", "Invocations that ran out of time");
        let restores = counter(
            "restores",
            "Execution environments restored from a snapshot",
        );
        let warm_hits = counter(
            "warm_hits",
            "Invocations served by an environment that was already restored",
        );
        let async_queued = counter("async_queued", "Event invocations queued");
        let async_retries = counter("async_retries", "Event invocations retried");
        let dead_letters = counter(
            "dead_letters",
            "Event invocations given up and written to the dead-letter directory",
        );

        let shared_restores = counter(
            "shared_copy_restores",
            "Environments restored with memory mapped from the function's shared decoded copy",
        );
        let copy_evictions = counter(
            "decoded_copy_evictions",
            "Decoded copies dropped because no environment used them",
        );
        let copy_misses = Family::<MissLabels, Counter>::default();
        registry.register(
            "shared_copy_misses",
            "Restores of a function with shared memory that took the private path instead, by reason",
            copy_misses.clone(),
        );
        let copy_bytes = Family::<FunctionLabels, Gauge>::default();
        registry.register_with_unit(
            "decoded_copy",
            "Host memory held by each function's decoded copy",
            Unit::Bytes,
            copy_bytes.clone(),
        );
        let copy_budget = Gauge::default();
        registry.register_with_unit(
            "decoded_copy_budget",
            "Host memory decoded copies may hold, all functions together",
            Unit::Bytes,
            copy_budget.clone(),
        );

        let store = StoreMetrics::default();
        store.register(&mut registry);

        let restore_seconds = Histograms::new_with_constructor(restore_histogram as fn() -> _);
        registry.register_with_unit(
            "restore_duration",
            "Time to restore an execution environment",
            Unit::Seconds,
            restore_seconds.clone(),
        );
        let environments = Family::<EnvironmentLabels, Gauge>::default();
        registry.register(
            "environments",
            "Execution environments by state",
            environments.clone(),
        );

        Self {
            registry,
            invocations,
            errors,
            throttles,
            timeouts,
            restores,
            restore_seconds,
            warm_hits,
            environments,
            async_queued,
            async_retries,
            dead_letters,
            shared_restores,
            copy_misses,
            copy_evictions,
            copy_bytes,
            copy_budget,
            store,
        }
    }

    /// What registration's store pulls cost, and the host cache after them.
    pub fn record_store(&self, totals: &super::store_copies::StoreTotals) {
        let m = &self.store;
        m.pulls.inc_by(totals.pulls);
        m.cache_hits.inc_by(totals.objects.cache_hits);
        m.cache_misses.inc_by(totals.objects.fetched);
        m.fetched_bytes.inc_by(totals.objects.fetched_bytes);
        if let Some(cache) = totals.cache {
            m.cache_evictions.inc_by(cache.evicted);
            m.cache_bytes
                .set(i64::try_from(cache.bytes).unwrap_or(i64::MAX));
            m.cache_objects
                .set(i64::try_from(cache.objects).unwrap_or(i64::MAX));
        }
    }

    /// An environment was restored from the function's shared decoded copy.
    pub fn shared_copy_restore(&self, function: &str) {
        inc(&self.shared_restores, function);
    }

    /// A restore that should have used the shared copy took the private path.
    pub fn shared_copy_miss(&self, function: &str, reason: CopyMiss) {
        let labels = MissLabels {
            function: Escaped::new(function),
            reason,
        };
        self.copy_misses.get_or_create(&labels).inc();
    }

    /// The function's decoded copy now holds `bytes` (0: it has none).
    pub fn set_copy_bytes(&self, function: &str, bytes: u64) {
        self.copy_bytes
            .get_or_create(&FunctionLabels::new(function))
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// A decoded copy was dropped.
    pub fn copy_evicted(&self, function: &str) {
        inc(&self.copy_evictions, function);
    }

    /// The budget for decoded copies.
    pub fn set_copy_budget(&self, bytes: u64) {
        self.copy_budget
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// An invocation was accepted.
    pub fn invocation(&self, function: &str) {
        inc(&self.invocations, function);
    }

    /// The function failed (error document, timeout or crash).
    pub fn error(&self, function: &str) {
        inc(&self.errors, function);
    }

    /// An invocation was throttled.
    pub fn throttle(&self, function: &str) {
        inc(&self.throttles, function);
    }

    /// An invocation timed out (also count it with [`Metrics::error`]).
    pub fn timeout(&self, function: &str) {
        inc(&self.timeouts, function);
    }

    /// An environment was restored, taking `duration`.
    pub fn restore(&self, function: &str, duration: Duration) {
        inc(&self.restores, function);
        self.restore_seconds
            .get_or_create(&FunctionLabels::new(function))
            .observe(duration.as_secs_f64());
    }

    /// An invocation reused a restored environment.
    pub fn warm_hit(&self, function: &str) {
        inc(&self.warm_hits, function);
    }

    /// The function now has `idle` and `busy` environments.
    pub fn set_environments(&self, function: &str, idle: i64, busy: i64) {
        for (state, count) in [
            (EnvironmentState::Idle, idle),
            (EnvironmentState::Busy, busy),
        ] {
            let labels = EnvironmentLabels {
                function: Escaped::new(function),
                state,
            };
            self.environments.get_or_create(&labels).set(count);
        }
    }

    /// An `Event` invocation was queued.
    pub fn async_queued(&self, function: &str) {
        inc(&self.async_queued, function);
    }

    /// An `Event` invocation is being retried.
    pub fn async_retry(&self, function: &str) {
        inc(&self.async_retries, function);
    }

    /// An `Event` invocation went to the dead-letter directory.
    pub fn dead_letter(&self, function: &str) {
        inc(&self.dead_letters, function);
    }

    /// The text exposition, ending with `# EOF`.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail; an encoder error would be a bug in a metric's
        // encoding, and a partial page is more useful to a scraper than none.
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(%error, "encoding metrics failed");
        }
        text
    }
}

fn inc(family: &Counters, function: &str) {
    family.get_or_create(&FunctionLabels::new(function)).inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_has(text: &str, line: &str) {
        assert!(
            text.lines().any(|l| l == line),
            "missing line {line:?} in\n{text}"
        );
    }

    #[test]
    fn render_shows_every_metric() {
        let metrics = Metrics::new();
        metrics.invocation("hello");
        metrics.invocation("hello");
        metrics.error("hello");
        metrics.throttle("hello");
        metrics.timeout("hello");
        metrics.restore("hello", Duration::from_millis(3));
        metrics.restore("hello", Duration::from_secs(20));
        metrics.warm_hit("hello");
        metrics.set_environments("hello", 2, 1);
        metrics.async_queued("events");
        metrics.async_retry("events");
        metrics.dead_letter("events");
        metrics.shared_copy_restore("hello");
        metrics.shared_copy_miss("hello", CopyMiss::Budget);
        metrics.shared_copy_miss("hello", CopyMiss::Decoding);
        metrics.copy_evicted("hello");
        metrics.set_copy_bytes("hello", 5 << 20);
        metrics.set_copy_budget(1 << 30);
        let text = metrics.render();

        assert_has(
            &text,
            "# HELP thawd_invocations Invocations accepted, of every type.",
        );
        assert_has(&text, "# TYPE thawd_invocations counter");
        assert_has(&text, "thawd_invocations_total{function=\"hello\"} 2");
        assert_has(&text, "thawd_errors_total{function=\"hello\"} 1");
        assert_has(&text, "thawd_throttles_total{function=\"hello\"} 1");
        assert_has(&text, "thawd_timeouts_total{function=\"hello\"} 1");
        assert_has(&text, "thawd_restores_total{function=\"hello\"} 2");
        assert_has(&text, "thawd_warm_hits_total{function=\"hello\"} 1");
        assert_has(&text, "thawd_async_queued_total{function=\"events\"} 1");
        assert_has(&text, "thawd_async_retries_total{function=\"events\"} 1");
        assert_has(&text, "thawd_dead_letters_total{function=\"events\"} 1");

        assert_has(&text, "# TYPE thawd_restore_duration_seconds histogram");
        assert_has(&text, "# UNIT thawd_restore_duration_seconds seconds");
        assert_has(
            &text,
            "thawd_restore_duration_seconds_bucket{le=\"0.001\",function=\"hello\"} 0",
        );
        assert_has(
            &text,
            "thawd_restore_duration_seconds_bucket{le=\"0.005\",function=\"hello\"} 1",
        );
        assert_has(
            &text,
            "thawd_restore_duration_seconds_bucket{le=\"10.0\",function=\"hello\"} 1",
        );
        assert_has(
            &text,
            "thawd_restore_duration_seconds_bucket{le=\"+Inf\",function=\"hello\"} 2",
        );
        assert_has(
            &text,
            "thawd_restore_duration_seconds_count{function=\"hello\"} 2",
        );

        assert_has(&text, "# TYPE thawd_environments gauge");
        assert_has(
            &text,
            "thawd_environments{function=\"hello\",state=\"idle\"} 2",
        );
        assert_has(
            &text,
            "thawd_environments{function=\"hello\",state=\"busy\"} 1",
        );
        assert_has(
            &text,
            "thawd_shared_copy_restores_total{function=\"hello\"} 1",
        );
        assert_has(
            &text,
            "thawd_shared_copy_misses_total{function=\"hello\",reason=\"budget\"} 1",
        );
        assert_has(
            &text,
            "thawd_shared_copy_misses_total{function=\"hello\",reason=\"decoding\"} 1",
        );
        assert_has(
            &text,
            "thawd_decoded_copy_evictions_total{function=\"hello\"} 1",
        );
        assert_has(
            &text,
            "thawd_decoded_copy_bytes{function=\"hello\"} 5242880",
        );
        assert_has(&text, "thawd_decoded_copy_budget_bytes 1073741824");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn store_pulls_and_the_chunk_cache_are_shown() {
        let metrics = Metrics::new();
        metrics.record_store(&super::super::store_copies::StoreTotals {
            pulls: 2,
            objects: store::ObjectStats {
                fetched: 7,
                fetched_bytes: 4096,
                cache_hits: 93,
            },
            cache: Some(store::CacheStats {
                evicted: 3,
                objects: 100,
                bytes: 1 << 20,
                ..Default::default()
            }),
        });
        let text = metrics.render();
        for line in [
            "thawd_store_pulls_total 2",
            "thawd_chunk_cache_hits_total 93",
            "thawd_chunk_cache_misses_total 7",
            "thawd_store_fetched_bytes_total 4096",
            "thawd_chunk_cache_evictions_total 3",
            "thawd_chunk_cache_bytes 1048576",
            "thawd_chunk_cache_objects 100",
        ] {
            assert_has(&text, line);
        }
    }

    #[test]
    fn environments_gauge_follows_the_latest_value() {
        let metrics = Metrics::new();
        metrics.set_environments("f", 3, 0);
        metrics.set_environments("f", 1, 2);
        let text = metrics.render();
        assert_has(&text, "thawd_environments{function=\"f\",state=\"idle\"} 1");
        assert_has(&text, "thawd_environments{function=\"f\",state=\"busy\"} 2");
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = Metrics::new();
        metrics.invocation("a\"b\\c\nd");
        assert_has(
            &metrics.render(),
            "thawd_invocations_total{function=\"a\\\"b\\\\c\\nd\"} 1",
        );
    }

    #[test]
    fn metrics_are_shareable() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<Metrics>();
    }
}

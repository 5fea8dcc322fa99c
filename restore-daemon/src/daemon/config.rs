//! thawd's config file (TOML): where it listens, its limits, and its functions. Everything is
//! checked here, with the offending key named, before any snapshot is opened; the snapshots
//! themselves are verified when the functions are registered (`registry`).
//!
//! ```toml
//! listen = "127.0.0.1:9001"        # TCP address; or unix_socket = "/run/thawd.sock"
//! max_concurrency = 8              # invocations running at once, all functions together
//! idle_ttl_secs = 300              # a frozen idle environment is discarded after this
//! spare_workers = 1                # per function: worker processes started ahead, shell built
//! max_idle_per_function = 4        # idle environments kept; 0: every invocation restores
//! dead_letter_dir = "/var/lib/thawd/dead-letter"  # failed asynchronous invocations
//! event_dir = "/var/lib/thawd/events"  # accepted asynchronous invocations, until they end
//! event_queue_capacity = 10000     # asynchronous invocations waiting at most
//! event_queue_mib = 128            # their payloads' bytes at most
//! max_connections = 1024           # HTTP connections served at once
//! header_timeout_secs = 10         # to a whole request head, from connect or the last answer
//! body_timeout_secs = 30           # to a whole request body, from its head
//! body_budget_mib = 64             # request bodies over 64 KiB being read at once, bytes
//! jail = true                      # default when thawd runs as root: each worker jailed
//! jail_uid = 65534                 # the unprivileged user and group workers run as
//! jail_gid = 65534
//! jail_dir = "/run/thawd/jail"     # an empty directory each worker mounts its own root over
//! jail_cpu_limit = true            # with cgroup v2: cpu.max by Lambda's ratio (1769 MB = 1 vCPU)
//! log_dir = "/var/log/thawd"       # <function>.log: START / END / REPORT and the guest's output
//! decoded_copy_budget_mib = 4096   # host memory for decoded snapshot copies (default: 1/4 of RAM)
//! store_dir = "/var/lib/thawd/store" # store snapshots' local copies and the chunk cache
//! chunk_cache_mib = 4096           # the host cache of sealed chunk objects; 0: none
//!
//! [functions.hello]
//! snapshot = "/srv/snapshots/hello"
//! memory_mib = 128                 # must be the snapshot's memory size
//! timeout_secs = 3
//! reserved_concurrency = 2         # optional
//! key_file = "/etc/thawd/hello.key" # optional: default is the host key
//! memory = "shared"                # default; or "lazy" or "eager" (private memory per clone)
//!
//! [functions.from-the-store]
//! snapshot = "s3://bucket/prefix/snapshots/0123456789abcdef0123456789abcdef"
//! memory_mib = 512
//! ```
//!
//! A `snapshot` that starts with `s3://` names a snapshot that `thaw snapshot push` wrote to an
//! S3-compatible store (docs/store.md); the endpoint, region and credentials come from thawd's
//! environment and AWS profile files, as for `thaw snapshot pull`. thawd pulls it through the
//! host's chunk cache into `store_dir/snapshots/<id>` when it is not there yet.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::front::FrontLimits;

/// Lambda's longest function timeout.
pub const MAX_TIMEOUT_SECS: u64 = 900;
/// Lambda's memory range, MiB.
pub const MEMORY_MIB_RANGE: (u64, u64) = (128, 10_240);
/// Where thawd listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9001";
/// A config file longer than this is refused unread.
pub const MAX_CONFIG_LEN: u64 = 1 << 20;
/// Invocations at once, all functions together: each is a running VM and an event runner.
pub const MAX_CONCURRENCY: u32 = 1024;
/// A day: an idle environment is not kept longer.
pub const MAX_IDLE_TTL_SECS: u64 = 86_400;
/// Worker processes started ahead, per function.
pub const MAX_SPARE_WORKERS: u32 = 16;
/// Asynchronous invocations queued at once.
pub const MAX_EVENT_QUEUE: u32 = 100_000;
/// Bounds of `event_queue_mib`: at least one event payload at Lambda's 256 KB limit.
pub const QUEUE_MIB_RANGE: (u64, u64) = (1, 16_384);
/// Bounds of `body_budget_mib`: a body at Lambda's 6 MB limit must fit.
pub const BODY_BUDGET_MIB_RANGE: (u64, u64) = (6, 16_384);
/// HTTP connections at once.
pub const MAX_CONNECTIONS: u32 = 65_536;
/// The longest header (and idle) timeout.
pub const MAX_HEADER_TIMEOUT_SECS: u64 = 300;

/// The config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It could not be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is not valid TOML or has unknown or mistyped keys.
    #[error("config file {}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with line and column.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config file {}: {key}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, e.g. `functions.hello.timeout_secs`.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// How a function's memory comes back on restore.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryChoice {
    /// Mapped copy-on-write from one decoded copy of the snapshot's memory that every
    /// environment of the function shares (`crate::decoded_copy`): the default. While the copy
    /// is being decoded, or when the host's budget for copies has no room, restores take the
    /// lazy path instead (and the metrics say so).
    #[default]
    Shared,
    /// Lazily through userfaultfd (working set first), into memory private to the clone.
    Lazy,
    /// All of it before the guest runs.
    Eager,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    unix_socket: Option<PathBuf>,
    max_concurrency: Option<u32>,
    idle_ttl_secs: Option<u64>,
    spare_workers: Option<u32>,
    max_idle_per_function: Option<u32>,
    dead_letter_dir: Option<PathBuf>,
    log_dir: Option<PathBuf>,
    event_queue_capacity: Option<u32>,
    event_queue_mib: Option<u64>,
    event_dir: Option<PathBuf>,
    max_connections: Option<u32>,
    header_timeout_secs: Option<u64>,
    body_timeout_secs: Option<u64>,
    body_budget_mib: Option<u64>,
    jail: Option<bool>,
    jail_uid: Option<u32>,
    jail_gid: Option<u32>,
    jail_dir: Option<PathBuf>,
    jail_cpu_limit: Option<bool>,
    jail_cgroups: Option<bool>,
    decoded_copy_budget_mib: Option<u64>,
    store_dir: Option<PathBuf>,
    chunk_cache_mib: Option<u64>,
    event_retry_delays_ms: Option<Vec<u64>>,
    region: Option<String>,
    account_id: Option<String>,
    #[serde(default)]
    functions: BTreeMap<String, RawFunction>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    snapshot: PathBuf,
    memory_mib: u64,
    timeout_secs: Option<u64>,
    reserved_concurrency: Option<u32>,
    key_file: Option<PathBuf>,
    #[serde(default)]
    memory: MemoryChoice,
}

/// How thawd jails its workers (`super::jail`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailConfig {
    /// The directory each worker mounts its private root over.
    pub dir: PathBuf,
    /// The unprivileged user workers run as.
    pub uid: u32,
    /// Their group.
    pub gid: u32,
    /// With cgroup v2, `cpu.max` by Lambda's ratio of CPU to memory; else no CPU limit.
    pub cpu_limit: bool,
    /// With cgroup v2, a cgroup per worker (`memory.max`, `cpu.max`).
    pub cgroups: bool,
}

/// Where thawd serves the Invoke API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

/// One function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionConfig {
    /// Its name.
    pub name: String,
    /// Its snapshot directory (for a snapshot in a store: where thawd keeps its local copy).
    pub snapshot: PathBuf,
    /// Where its snapshot comes from when it is in a store; `None`: `snapshot` is the
    /// operator's own directory.
    pub store: Option<store::StoreSnapshotUrl>,
    /// Its memory size (the snapshot's).
    pub memory_mib: u64,
    /// How long an invocation may run.
    pub timeout: Duration,
    /// At most this many of its invocations at once (`None`: only the global limit).
    pub reserved_concurrency: Option<u32>,
    /// Its master key file (`None`: the host key).
    pub key_file: Option<PathBuf>,
    /// How its memory comes back.
    pub memory: MemoryChoice,
}

/// The whole, checked config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Where to serve.
    pub listen: Listen,
    /// Invocations running at once, all functions together.
    pub max_concurrency: u32,
    /// How long a frozen idle environment is kept.
    pub idle_ttl: Duration,
    /// Worker processes started ahead per function, with a machine shell built.
    pub spare_workers: u32,
    /// Idle environments kept per function at most; 0 discards every environment after its
    /// invocation, so each invocation restores a fresh one.
    pub max_idle_per_function: u32,
    /// Where failed asynchronous invocations are written.
    pub dead_letter_dir: PathBuf,
    /// Where each function's invocation log is written (`<function>.log`).
    pub log_dir: PathBuf,
    /// Asynchronous invocations waiting at most (beyond: 429).
    pub event_queue_capacity: u32,
    /// Their payloads' bytes at most (beyond: 429).
    pub event_queue_bytes: u64,
    /// Where each accepted asynchronous invocation is kept until it ends, so that a restart
    /// attempts it.
    pub event_dir: PathBuf,
    /// The HTTP front's bounds.
    pub front: FrontLimits,
    /// How workers are jailed; `None`: they are not.
    pub jail: Option<JailConfig>,
    /// Delays before the retries of a failed asynchronous invocation (Lambda retries twice).
    pub event_retry_delays: Vec<Duration>,
    /// Host memory decoded snapshot copies may hold, all functions together, bytes; 0: no
    /// copies (every restore is private).
    pub decoded_copy_budget: u64,
    /// Where store snapshots' local copies (`snapshots/<id>`) and the chunk cache
    /// (`chunks/`) live.
    pub store_dir: PathBuf,
    /// The chunk cache's budget, bytes; 0: no cache.
    pub chunk_cache_budget: u64,
    /// The region in ARNs.
    pub region: String,
    /// The account id in ARNs.
    pub account_id: String,
    /// The functions, by name.
    pub functions: BTreeMap<String, FunctionConfig>,
}

impl Config {
    /// The ARN of function `name` as Lambda prints it.
    pub fn arn(&self, name: &str) -> String {
        format!(
            "arn:aws:lambda:{}:{}:function:{name}",
            self.region, self.account_id
        )
    }
}

/// A quarter of the host's RAM (`MemTotal`), or 1 GiB if it cannot be read.
fn default_copy_budget() -> u64 {
    let mem_total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            kib.checked_mul(1024)
        });
    mem_total.map_or(1 << 30, |bytes| bytes / 4)
}

/// Reads and checks the config file at `path`. Relative paths in it are taken relative to
/// the file's directory.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    use std::io::Read;
    let read_error = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    // A regular file, read up to a bound: `--config /dev/zero` read for ever (issue 14).
    let file = snapshot::open_regular(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_CONFIG_LEN {
        return Err(read_error(std::io::Error::other(format!(
            "larger than {} KiB",
            MAX_CONFIG_LEN >> 10
        ))));
    }
    let text = String::from_utf8(bytes)
        .map_err(|e| read_error(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, path, base)
}

/// Checks config `text`; `path` names it in errors, `base` anchors relative paths.
pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let invalid = |key: &str, reason: String| ConfigError::Invalid {
        path: path.to_owned(),
        key: key.to_owned(),
        reason,
    };
    let listen = match (raw.listen, raw.unix_socket) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "unix_socket",
                "give either listen or unix_socket, not both".into(),
            ));
        }
        (None, Some(p)) => Listen::Unix(anchor(base, p)),
        (listen, None) => {
            let text = listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
            Listen::Tcp(text.parse().map_err(|e| {
                invalid(
                    "listen",
                    format!("{text:?} is not an IP address and port: {e}"),
                )
            })?)
        }
    };
    let bounded = |key: &str, value: u64, range: std::ops::RangeInclusive<u64>| {
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(invalid(
                key,
                format!("{value} is outside {}..={}", range.start(), range.end()),
            ))
        }
    };
    // Each unit of concurrency is a running VM and an event runner: `4294967295` grew until
    // the OOM killer acted (issue 14, defect 5).
    let max_concurrency = bounded(
        "max_concurrency",
        raw.max_concurrency.unwrap_or(8).into(),
        1..=MAX_CONCURRENCY.into(),
    )? as u32;
    let idle_ttl_secs = bounded(
        "idle_ttl_secs",
        raw.idle_ttl_secs.unwrap_or(300),
        1..=MAX_IDLE_TTL_SECS,
    )?;
    let spare_workers = bounded(
        "spare_workers",
        raw.spare_workers.unwrap_or(1).into(),
        0..=MAX_SPARE_WORKERS.into(),
    )? as u32;
    let event_retry_delays_ms = raw
        .event_retry_delays_ms
        .unwrap_or_else(|| vec![1000, 2000]);
    if event_retry_delays_ms.len() > 10 || event_retry_delays_ms.iter().any(|&d| d > 3_600_000) {
        return Err(invalid(
            "event_retry_delays_ms",
            "at most 10 retries, each at most 3600000 ms".into(),
        ));
    }
    let event_queue_capacity = bounded(
        "event_queue_capacity",
        raw.event_queue_capacity.unwrap_or(10_000).into(),
        1..=MAX_EVENT_QUEUE.into(),
    )? as u32;
    let event_queue_mib = bounded(
        "event_queue_mib",
        raw.event_queue_mib.unwrap_or(128),
        QUEUE_MIB_RANGE.0..=QUEUE_MIB_RANGE.1,
    )?;
    let front = FrontLimits {
        max_connections: bounded(
            "max_connections",
            raw.max_connections.unwrap_or(1024).into(),
            1..=MAX_CONNECTIONS.into(),
        )? as usize,
        header_timeout: Duration::from_secs(bounded(
            "header_timeout_secs",
            raw.header_timeout_secs.unwrap_or(10),
            1..=MAX_HEADER_TIMEOUT_SECS,
        )?),
        body_timeout: Duration::from_secs(bounded(
            "body_timeout_secs",
            raw.body_timeout_secs.unwrap_or(30),
            1..=MAX_TIMEOUT_SECS,
        )?),
        body_budget: (bounded(
            "body_budget_mib",
            raw.body_budget_mib.unwrap_or(64),
            BODY_BUDGET_MIB_RANGE.0..=BODY_BUDGET_MIB_RANGE.1,
        )? << 20) as usize,
    };
    let jail = match raw.jail.unwrap_or_else(|| nix::unistd::geteuid().is_root()) {
        false => None,
        true => {
            let id = |key: &str, value: Option<u32>| match value.unwrap_or(65534) {
                0 => Err(invalid(
                    key,
                    "0 is root: workers must run unprivileged".into(),
                )),
                id => Ok(id),
            };
            Some(JailConfig {
                dir: anchor(base, raw.jail_dir.unwrap_or_else(|| PathBuf::from("jail"))),
                uid: id("jail_uid", raw.jail_uid)?,
                gid: id("jail_gid", raw.jail_gid)?,
                cpu_limit: raw.jail_cpu_limit.unwrap_or(true),
                cgroups: raw.jail_cgroups.unwrap_or(true),
            })
        }
    };
    let decoded_copy_budget = match raw.decoded_copy_budget_mib {
        Some(mib) => mib
            .checked_mul(1 << 20)
            .ok_or_else(|| invalid("decoded_copy_budget_mib", format!("{mib} MiB is too large")))?,
        None => default_copy_budget(),
    };
    let region = raw.region.unwrap_or_else(|| "us-east-1".into());
    if region.is_empty()
        || !region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(invalid(
            "region",
            format!("{region:?} is not a region name"),
        ));
    }
    let account_id = raw.account_id.unwrap_or_else(|| "000000000000".into());
    if account_id.len() != 12 || !account_id.chars().all(|c| c.is_ascii_digit()) {
        return Err(invalid("account_id", "must be 12 digits".into()));
    }
    let store_dir = anchor(
        base,
        raw.store_dir.unwrap_or_else(|| PathBuf::from("store")),
    );
    let chunk_cache_mib = raw.chunk_cache_mib.unwrap_or(4096);
    let chunk_cache_budget = chunk_cache_mib.checked_mul(1 << 20).ok_or_else(|| {
        invalid(
            "chunk_cache_mib",
            format!("{chunk_cache_mib} MiB is too large"),
        )
    })?;
    let mut functions = BTreeMap::new();
    for (name, f) in raw.functions {
        let key = |field: &str| format!("functions.{name}.{field}");
        check_function_name(&name)
            .map_err(|reason| invalid(&format!("functions.{name}"), reason))?;
        let (low, high) = MEMORY_MIB_RANGE;
        if !(low..=high).contains(&f.memory_mib) {
            return Err(invalid(
                &key("memory_mib"),
                format!("{} is outside {low}..={high}", f.memory_mib),
            ));
        }
        let timeout_secs = f.timeout_secs.unwrap_or(3);
        if !(1..=MAX_TIMEOUT_SECS).contains(&timeout_secs) {
            return Err(invalid(
                &key("timeout_secs"),
                format!("{timeout_secs} is outside 1..={MAX_TIMEOUT_SECS}"),
            ));
        }
        if let Some(reserved) = f.reserved_concurrency {
            bounded(
                &key("reserved_concurrency"),
                reserved.into(),
                0..=max_concurrency.into(),
            )?;
        }
        let (snapshot, store) = match f.snapshot.to_str().filter(|s| s.starts_with("s3://")) {
            Some(url) => {
                let url: store::StoreSnapshotUrl = url
                    .parse()
                    .map_err(|e: store::StoreError| invalid(&key("snapshot"), e.to_string()))?;
                (local_copy(&store_dir, url.id), Some(url))
            }
            None => (anchor(base, f.snapshot), None),
        };
        let function = FunctionConfig {
            name: name.clone(),
            snapshot,
            store,
            memory_mib: f.memory_mib,
            timeout: Duration::from_secs(timeout_secs),
            reserved_concurrency: f.reserved_concurrency,
            key_file: f.key_file.map(|k| anchor(base, k)),
            memory: f.memory,
        };
        functions.insert(name, function);
    }
    if functions.is_empty() {
        return Err(invalid("functions", "no function is configured".into()));
    }
    Ok(Config {
        listen,
        max_concurrency,
        idle_ttl: Duration::from_secs(idle_ttl_secs),
        spare_workers,
        max_idle_per_function: raw.max_idle_per_function.unwrap_or(u32::MAX),
        dead_letter_dir: anchor(
            base,
            raw.dead_letter_dir
                .unwrap_or_else(|| PathBuf::from("dead-letter")),
        ),
        log_dir: anchor(base, raw.log_dir.unwrap_or_else(|| PathBuf::from("logs"))),
        event_queue_capacity,
        event_queue_bytes: event_queue_mib << 20,
        event_dir: anchor(
            base,
            raw.event_dir.unwrap_or_else(|| PathBuf::from("events")),
        ),
        front,
        jail,
        event_retry_delays: event_retry_delays_ms
            .into_iter()
            .map(Duration::from_millis)
            .collect(),
        decoded_copy_budget,
        store_dir,
        chunk_cache_budget,
        region,
        account_id,
        functions,
    })
}

/// Lambda's rule for function names: 1 to 64 letters, digits, hyphens and underscores.
pub fn check_function_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a function name (1 to 64 letters, digits, '-' or '_')"
        ))
    }
}

/// Where thawd keeps its copy of store snapshot `id`.
pub fn local_copy(store_dir: &Path, id: snapshot::SnapshotId) -> PathBuf {
    store_dir.join("snapshots").join(id.to_string())
}

fn anchor(base: &Path, path: PathBuf) -> PathBuf {
    if path.is_absolute() {
        path
    } else {
        base.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Config {
        match parse(text, Path::new("t.toml"), Path::new("/etc/thawd")) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    fn parse_err(text: &str) -> String {
        match parse(text, Path::new("t.toml"), Path::new("/etc/thawd")) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    const ONE: &str = "[functions.hello]\nsnapshot = \"snaps/hello\"\nmemory_mib = 128\n";

    #[test]
    fn defaults_and_relative_paths() {
        let c = parse_ok(ONE);
        assert_eq!(c.listen, Listen::Tcp("127.0.0.1:9001".parse().unwrap()));
        assert_eq!(c.max_concurrency, 8);
        assert_eq!(c.idle_ttl, Duration::from_secs(300));
        assert_eq!(c.dead_letter_dir, PathBuf::from("/etc/thawd/dead-letter"));
        let f = &c.functions["hello"];
        assert_eq!(f.snapshot, PathBuf::from("/etc/thawd/snaps/hello"));
        assert_eq!(f.timeout, Duration::from_secs(3));
        assert_eq!(f.memory, MemoryChoice::Shared);
        assert!(c.decoded_copy_budget > 0, "a quarter of RAM");
        assert_eq!(c.event_dir, PathBuf::from("/etc/thawd/events"));
        assert_eq!(c.event_queue_bytes, 128 << 20);
        assert_eq!(c.front, FrontLimits::default());
        let jail = c
            .jail
            .as_ref()
            .expect("tests run as root: workers are jailed");
        assert_eq!(jail.dir, PathBuf::from("/etc/thawd/jail"));
        assert_eq!((jail.uid, jail.gid), (65534, 65534));
        assert!(parse_ok(&format!("jail = false\n{ONE}")).jail.is_none());
        assert_eq!(
            c.arn("hello"),
            "arn:aws:lambda:us-east-1:000000000000:function:hello"
        );
    }

    #[test]
    fn every_key() {
        let c = parse_ok(
            "unix_socket = \"/run/t.sock\"\nmax_concurrency = 2\nidle_ttl_secs = 1\n\
             spare_workers = 0\nmax_idle_per_function = 0\ndead_letter_dir = \"/d\"\nlog_dir = \"/l\"\nevent_queue_capacity = 5\n\
             event_retry_delays_ms = [10, 20]\nregion = \"eu-west-1\"\n\
             decoded_copy_budget_mib = 0\n\
             account_id = \"123456789012\"\n\
             [functions.a]\nsnapshot = \"/s\"\nmemory_mib = 256\ntimeout_secs = 900\n\
             reserved_concurrency = 0\nkey_file = \"k\"\nmemory = \"eager\"\n",
        );
        assert_eq!(c.listen, Listen::Unix("/run/t.sock".into()));
        assert_eq!(c.max_idle_per_function, 0);
        assert_eq!(c.decoded_copy_budget, 0);
        assert_eq!(c.event_retry_delays.len(), 2);
        let f = &c.functions["a"];
        assert_eq!(f.reserved_concurrency, Some(0));
        assert_eq!(f.key_file, Some(PathBuf::from("/etc/thawd/k")));
        assert_eq!(f.memory, MemoryChoice::Eager);
    }

    #[test]
    fn bad_configs_name_the_key() {
        for (text, wanted) in [
            ("", "no function"),
            ("listen = \"nowhere\"\n", "listen"),
            ("max_concurrency = 0\n", "max_concurrency"),
            ("unknown = 1\n", "unknown field"),
            (
                "[functions.x]\nsnapshot = \"s\"\nmemory_mib = 64\n",
                "memory_mib",
            ),
            (
                "[functions.x]\nsnapshot = \"s\"\nmemory_mib = 128\ntimeout_secs = 901\n",
                "timeout_secs",
            ),
            (
                "[functions.\"a b\"]\nsnapshot = \"s\"\nmemory_mib = 128\n",
                "not a function name",
            ),
            ("[functions.x]\nmemory_mib = 128\n", "snapshot"),
            (
                "[functions.x]\nsnapshot = \"s\"\nmemory_mib = 128\nmemory = \"fast\"\n",
                "memory",
            ),
            ("account_id = \"12\"\n", "account_id"),
            ("listen = \"127.0.0.1:1\"\nunix_socket = \"/s\"\n", "either"),
            ("max_concurrency = -1\n", "max_concurrency"),
            ("max_concurrency = \"many\"\n", "max_concurrency"),
            ("decoded_copy_budget_mib = -1\n", "decoded_copy_budget_mib"),
            (
                "decoded_copy_budget_mib = 17592186044416\n",
                "decoded_copy_budget_mib",
            ),
            // Issue 14, defect 5: every value is bounded, with the key named.
            ("max_concurrency = 4294967295\n", "max_concurrency"),
            ("max_concurrency = 1025\n", "1025 is outside 1..=1024"),
            ("idle_ttl_secs = 0\n", "idle_ttl_secs"),
            ("idle_ttl_secs = 86401\n", "idle_ttl_secs"),
            ("spare_workers = 17\n", "spare_workers"),
            ("event_queue_capacity = 0\n", "event_queue_capacity"),
            ("event_queue_capacity = 100001\n", "event_queue_capacity"),
            ("event_queue_mib = 0\n", "event_queue_mib"),
            ("event_queue_mib = 16385\n", "event_queue_mib"),
            // Issue 14, defects 2 and 3: the front's bounds are bounded too.
            ("max_connections = 0\n", "max_connections"),
            ("max_connections = 65537\n", "max_connections"),
            ("header_timeout_secs = 0\n", "header_timeout_secs"),
            ("header_timeout_secs = 301\n", "header_timeout_secs"),
            ("body_timeout_secs = 0\n", "body_timeout_secs"),
            ("body_timeout_secs = 901\n", "body_timeout_secs"),
            ("body_budget_mib = 5\n", "6..=16384"),
            ("jail_uid = 0\n", "jail_uid: 0 is root"),
            ("jail_gid = 0\n", "jail_gid: 0 is root"),
            ("jail = \"yes\"\n", "jail"),
            (
                "body_budget_mib = 18446744073709551615\n",
                "body_budget_mib",
            ),
            (
                "max_concurrency = 2\n[functions.x]\nsnapshot = \"s\"\nmemory_mib = 128\n\
                 reserved_concurrency = 3\n",
                "functions.x.reserved_concurrency",
            ),
        ] {
            let text = if text.contains("[functions") {
                text.to_owned()
            } else if text.is_empty() {
                String::new()
            } else {
                format!("{text}{ONE}")
            };
            let e = parse_err(&text);
            assert!(e.contains(wanted), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_snapshot_in_a_store_is_copied_under_the_store_dir() {
        let id = "0123456789abcdef0123456789abcdef";
        let c = parse_ok(&format!(
            "store_dir = \"/var/lib/thawd/store\"\nchunk_cache_mib = 64\n\
             [functions.s]\nsnapshot = \"s3://fns/prod/snapshots/{id}\"\nmemory_mib = 512\n\
             [functions.l]\nsnapshot = \"snaps/l\"\nmemory_mib = 128\n"
        ));
        let s = &c.functions["s"];
        let url = s.store.as_ref().unwrap();
        assert_eq!(url.to_string(), format!("s3://fns/prod/snapshots/{id}"));
        assert_eq!(
            s.snapshot,
            PathBuf::from(format!("/var/lib/thawd/store/snapshots/{id}"))
        );
        assert_eq!(c.chunk_cache_budget, 64 << 20);
        assert_eq!(c.functions["l"].store, None);
        let d = parse_ok(ONE);
        assert_eq!(d.store_dir, PathBuf::from("/etc/thawd/store"));
        assert_eq!(d.chunk_cache_budget, 4096 << 20);
        for bad in [
            "s3://fns/prod/snapshot/0123456789abcdef0123456789abcdef",
            "s3://fns/prod/snapshots/0123",
            "s3://x/snapshots/0123456789abcdef0123456789abcdef",
        ] {
            let e = parse_err(&format!(
                "[functions.s]\nsnapshot = \"{bad}\"\nmemory_mib = 128\n"
            ));
            assert!(e.contains("functions.s.snapshot"), "{e}");
        }
        let e = parse_err(&format!("chunk_cache_mib = {}\n{ONE}", u64::MAX));
        assert!(e.contains("chunk_cache_mib"), "{e}");
    }

    #[test]
    fn a_missing_file_is_a_read_error() {
        let e = load(Path::new("/nonexistent/thawd.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    }

    /// Issue 14, defect 12: `--config /dev/zero` read for ever. A device, a FIFO and a file
    /// over the bound are refused, each at once.
    #[test]
    fn only_a_regular_file_of_bounded_size_is_read() {
        let chain = |e: &ConfigError| {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        };
        let e = load(Path::new("/dev/zero")).unwrap_err();
        assert!(chain(&e).contains("a character device"), "{}", chain(&e));
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.toml");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = load(&fifo).unwrap_err();
        assert!(chain(&e).contains("a FIFO"), "{}", chain(&e));
        let big = dir.path().join("big.toml");
        let mut text = String::from(ONE);
        text.push_str(&"# padding\n".repeat((MAX_CONFIG_LEN / 10) as usize + 1));
        std::fs::write(&big, text).unwrap();
        let e = load(&big).unwrap_err();
        assert!(chain(&e).contains("larger than 1024 KiB"), "{}", chain(&e));
    }
}

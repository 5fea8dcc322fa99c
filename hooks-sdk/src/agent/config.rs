//! What `thaw-init` runs and how, resolved once at startup from three layers: the command line
//! (`--function-name`, `-- <runtime command>`...), the kernel command line (`thaw.*` words, read
//! only in guest mode) and the function file (`/etc/thaw/function.json` by default). A value
//! given in an earlier layer wins; anything unset gets Lambda's default. The result also carries
//! the environment the runtime is started with (Lambda's reserved variables).
//!
//! Kernel command-line words are used because Linux hands words with a dot (`thaw.runtime=...`)
//! to no one: they reach neither init's argv nor its environment, so they cannot clash.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::protocol::{AGENT_PORT, InitType};

/// Where the Runtime API listens unless told otherwise (what Lambda's runtimes expect).
pub const DEFAULT_RUNTIME_API: &str = "127.0.0.1:9001";
/// The function file read when no other is named.
pub const DEFAULT_FUNCTION_FILE: &str = "/etc/thaw/function.json";
/// The host's vsock CID (`VMADDR_CID_HOST`).
pub const HOST_CID: u32 = 2;
/// Runtime commands tried, in order, when none is configured (Lambda's bootstrap locations).
pub const DEFAULT_BOOTSTRAPS: [&str; 3] = [
    "/var/runtime/bootstrap",
    "/var/task/bootstrap",
    "/opt/bootstrap",
];
/// How long the runtime gets to exit after SIGTERM before SIGKILL.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Configuration that could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The function file exists but cannot be read.
    #[error("cannot read the function file {}", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The function file is not the JSON this agent understands.
    #[error("function file {} is invalid", path.display())]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// An init type other than `on-demand` or `snap-start`.
    #[error("unknown init type {0:?} (expected on-demand or snap-start)")]
    InitType(String),
    /// A `KEY=VALUE` setting without `=` or with an empty key.
    #[error("environment setting {0:?} is not KEY=VALUE")]
    EnvSetting(String),
    /// A kernel command-line value that does not parse.
    #[error("kernel command line: {key}={value:?} is invalid")]
    CmdlineValue {
        /// The word's key.
        key: String,
        /// Its value.
        value: String,
    },
    /// Host mode needs a Unix socket to reach the host.
    #[error("--host-mode needs --agent-uds PATH")]
    NoAgentSocket,
}

/// How the agent reaches the host. Chosen once at startup; the rest of the agent is the same.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// AF_VSOCK stream to `cid:port` (in a guest: the host, CID 2, port 9000).
    Vsock {
        /// Context id.
        cid: u32,
        /// Port.
        port: u32,
    },
    /// A Unix stream socket (host-process mode).
    Unix(PathBuf),
}

/// Function settings, every one optional: one layer of configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSettings {
    /// The runtime's argv (program first).
    pub runtime: Option<Vec<String>>,
    /// `on-demand` or `snap-start`.
    pub init_type: Option<String>,
    /// `AWS_LAMBDA_FUNCTION_NAME`.
    pub function_name: Option<String>,
    /// `AWS_LAMBDA_FUNCTION_VERSION`.
    pub function_version: Option<String>,
    /// `_HANDLER`.
    pub handler: Option<String>,
    /// `LAMBDA_TASK_ROOT`.
    pub task_root: Option<String>,
    /// `LAMBDA_RUNTIME_DIR`.
    pub runtime_dir: Option<String>,
    /// `AWS_LAMBDA_FUNCTION_MEMORY_SIZE` (MiB).
    pub memory_mb: Option<u32>,
    /// `AWS_REGION` and `AWS_DEFAULT_REGION`.
    pub region: Option<String>,
    /// The runtime's working directory.
    pub working_dir: Option<String>,
    /// The Runtime API's listening address.
    pub runtime_api: Option<SocketAddr>,
    /// Extra environment for the runtime; overrides everything else.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl FunctionSettings {
    /// Fills every field unset here from `lower` (a lower-priority layer).
    pub fn or(mut self, lower: FunctionSettings) -> FunctionSettings {
        self.runtime = self.runtime.or(lower.runtime);
        self.init_type = self.init_type.or(lower.init_type);
        self.function_name = self.function_name.or(lower.function_name);
        self.function_version = self.function_version.or(lower.function_version);
        self.handler = self.handler.or(lower.handler);
        self.task_root = self.task_root.or(lower.task_root);
        self.runtime_dir = self.runtime_dir.or(lower.runtime_dir);
        self.memory_mb = self.memory_mb.or(lower.memory_mb);
        self.region = self.region.or(lower.region);
        self.working_dir = self.working_dir.or(lower.working_dir);
        self.runtime_api = self.runtime_api.or(lower.runtime_api);
        for (k, v) in lower.env {
            self.env.entry(k).or_insert(v);
        }
        self
    }

    /// Reads a function file; a missing file is an empty layer.
    pub fn from_file(path: &Path) -> Result<FunctionSettings, ConfigError> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(FunctionSettings::default());
            }
            Err(source) => {
                return Err(ConfigError::ReadFile {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        serde_json::from_slice(&text).map_err(|source| ConfigError::ParseFile {
            path: path.to_owned(),
            source,
        })
    }
}

/// What the kernel command line says to `thaw-init`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cmdline {
    /// The function settings it carries.
    pub settings: FunctionSettings,
    /// `thaw.config=`: another function file.
    pub config: Option<PathBuf>,
    /// `thaw.log=`: a tracing filter.
    pub log: Option<String>,
    /// `thaw.vsock_port=`.
    pub vsock_port: Option<u32>,
}

/// Splits a kernel command line into words, honouring double quotes as the kernel does
/// (`thaw.runtime="python3 -m awslambdaric app.handler"` is one word, quotes removed).
pub fn split_cmdline(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// Parses the `thaw.*` words of a kernel command line; other words are ignored.
pub fn parse_cmdline(line: &str) -> Result<Cmdline, ConfigError> {
    let mut out = Cmdline::default();
    for word in split_cmdline(line) {
        let Some(rest) = word.strip_prefix("thaw.") else {
            continue;
        };
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        let bad = || ConfigError::CmdlineValue {
            key: format!("thaw.{key}"),
            value: value.to_owned(),
        };
        let s = &mut out.settings;
        match key {
            "runtime" => {
                s.runtime = Some(value.split_whitespace().map(str::to_owned).collect());
            }
            "init_type" => s.init_type = Some(value.to_owned()),
            "function_name" => s.function_name = Some(value.to_owned()),
            "function_version" => s.function_version = Some(value.to_owned()),
            "handler" => s.handler = Some(value.to_owned()),
            "task_root" => s.task_root = Some(value.to_owned()),
            "runtime_dir" => s.runtime_dir = Some(value.to_owned()),
            "memory_mb" => s.memory_mb = Some(value.parse().map_err(|_| bad())?),
            "region" => s.region = Some(value.to_owned()),
            "working_dir" => s.working_dir = Some(value.to_owned()),
            "runtime_api" => s.runtime_api = Some(value.parse().map_err(|_| bad())?),
            "config" => out.config = Some(PathBuf::from(value)),
            "log" => out.log = Some(value.to_owned()),
            "vsock_port" => out.vsock_port = Some(value.parse().map_err(|_| bad())?),
            _ => match key.strip_prefix("env.") {
                Some(name) if !name.is_empty() => {
                    s.env.insert(name.to_owned(), value.to_owned());
                }
                // An unknown word is more likely a typo than something to ignore silently.
                _ => tracing::warn!(word = %word, "unknown thaw.* kernel command-line word"),
            },
        }
    }
    Ok(out)
}

/// Parses `on-demand` / `snap-start` (Lambda's `AWS_LAMBDA_INITIALIZATION_TYPE` values).
pub fn parse_init_type(s: &str) -> Result<InitType, ConfigError> {
    match s {
        "on-demand" => Ok(InitType::OnDemand),
        "snap-start" => Ok(InitType::SnapStart),
        other => Err(ConfigError::InitType(other.to_owned())),
    }
}

/// The value of `AWS_LAMBDA_INITIALIZATION_TYPE` for `init_type`.
pub fn init_type_name(init_type: InitType) -> &'static str {
    match init_type {
        InitType::OnDemand => "on-demand",
        InitType::SnapStart => "snap-start",
    }
}

/// Parses `KEY=VALUE`.
pub fn parse_env_setting(s: &str) -> Result<(String, String), ConfigError> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(ConfigError::EnvSetting(s.to_owned())),
    }
}

/// Everything the agent needs, resolved.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Running as a normal host process (no PID-1 duties, no privileged after-restore steps).
    pub host_mode: bool,
    /// How to reach the host.
    pub transport: Transport,
    /// Where the Runtime API listens (port 0: any free port).
    pub runtime_api: SocketAddr,
    /// How the environment is initialized.
    pub init_type: InitType,
    /// The runtime's argv (empty when none was configured and no default bootstrap exists).
    pub runtime_command: Vec<String>,
    /// The runtime's working directory (None: inherit).
    pub working_dir: Option<PathBuf>,
    /// Variables set for the runtime on top of the inherited environment, except
    /// `AWS_LAMBDA_RUNTIME_API`, which is added once the listening address is known.
    pub env: Vec<(String, String)>,
    /// Variables set only where the inherited environment lacks them (`PATH`, `LANG`...).
    pub default_env: Vec<(String, String)>,
    /// SIGTERM-to-SIGKILL grace period when stopping the runtime.
    pub stop_timeout: Duration,
}

/// The inputs of [`AgentConfig::resolve`] besides the function settings.
#[derive(Clone, Debug)]
pub struct ResolveInput {
    /// `--host-mode`.
    pub host_mode: bool,
    /// How to reach the host (None in host mode without `--agent-uds`: an error).
    pub transport: Option<Transport>,
    /// Merged settings, highest priority first already applied.
    pub settings: FunctionSettings,
    /// SIGTERM-to-SIGKILL grace period.
    pub stop_timeout: Duration,
}

impl AgentConfig {
    /// Applies Lambda's defaults and computes the runtime's environment.
    pub fn resolve(input: ResolveInput) -> Result<AgentConfig, ConfigError> {
        let s = input.settings;
        let transport = match input.transport {
            Some(t) => t,
            None if input.host_mode => return Err(ConfigError::NoAgentSocket),
            None => Transport::Vsock {
                cid: HOST_CID,
                port: AGENT_PORT,
            },
        };
        let init_type = match &s.init_type {
            Some(t) => parse_init_type(t)?,
            None => InitType::OnDemand,
        };
        // No command at all is not a configuration error: the agent still connects and tells
        // the host (InitError, Runtime.InvalidEntrypoint), which a silent power-off would not.
        let runtime_command = match s.runtime {
            Some(cmd) if !cmd.is_empty() => cmd,
            _ => DEFAULT_BOOTSTRAPS
                .iter()
                .find(|p| Path::new(p).exists())
                .map(|p| vec![(*p).to_owned()])
                .unwrap_or_default(),
        };
        let runtime_api = match s.runtime_api {
            Some(a) => a,
            None => DEFAULT_RUNTIME_API
                .parse()
                .map_err(|_| ConfigError::CmdlineValue {
                    key: "runtime_api".into(),
                    value: DEFAULT_RUNTIME_API.into(),
                })?,
        };
        let function_name = s.function_name.unwrap_or_else(|| "function".to_owned());
        let version = s.function_version.unwrap_or_else(|| "$LATEST".to_owned());
        let task_root = s.task_root.unwrap_or_else(|| "/var/task".to_owned());
        let region = s.region.unwrap_or_else(|| "us-east-1".to_owned());
        // In a guest the runtime starts in its task root, as on Lambda; a host process keeps
        // the directory it was started in unless told otherwise.
        let working_dir = match s.working_dir {
            Some(d) => Some(PathBuf::from(d)),
            None if !input.host_mode && Path::new(&task_root).is_dir() => {
                Some(PathBuf::from(&task_root))
            }
            None => None,
        };
        let mut env = vec![
            (
                "AWS_LAMBDA_INITIALIZATION_TYPE".to_owned(),
                init_type_name(init_type).to_owned(),
            ),
            ("AWS_LAMBDA_FUNCTION_NAME".to_owned(), function_name.clone()),
            ("AWS_LAMBDA_FUNCTION_VERSION".to_owned(), version.clone()),
            (
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE".to_owned(),
                s.memory_mb.unwrap_or(128).to_string(),
            ),
            (
                "AWS_LAMBDA_LOG_GROUP_NAME".to_owned(),
                format!("/aws/lambda/{function_name}"),
            ),
            (
                "AWS_LAMBDA_LOG_STREAM_NAME".to_owned(),
                format!("thaw/[{version}]"),
            ),
            ("AWS_REGION".to_owned(), region.clone()),
            ("AWS_DEFAULT_REGION".to_owned(), region),
            ("LAMBDA_TASK_ROOT".to_owned(), task_root),
            (
                "LAMBDA_RUNTIME_DIR".to_owned(),
                s.runtime_dir.unwrap_or_else(|| "/var/runtime".to_owned()),
            ),
        ];
        if let Some(handler) = s.handler {
            env.push(("_HANDLER".to_owned(), handler));
        }
        // The user's variables come last so they override Lambda's.
        env.retain(|(k, _)| !s.env.contains_key(k));
        env.extend(s.env);
        let default_env = [
            ("PATH", "/usr/local/bin:/usr/bin:/bin:/opt/bin"),
            ("LANG", "en_US.UTF-8"),
            ("TZ", ":UTC"),
            (
                "LD_LIBRARY_PATH",
                "/var/lang/lib:/lib64:/usr/lib64:/var/runtime:/var/runtime/lib:/var/task:/var/task/lib:/opt/lib",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        Ok(AgentConfig {
            host_mode: input.host_mode,
            transport,
            runtime_api,
            init_type,
            runtime_command,
            working_dir,
            env,
            default_env,
            stop_timeout: input.stop_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_words_with_quotes_and_env() {
        let c = parse_cmdline(
            "console=ttyS0 thaw.runtime=\"python3 -m awslambdaric app.handler\" \
             thaw.init_type=snap-start thaw.env.FOO=bar=baz thaw.vsock_port=9100 quiet",
        )
        .unwrap();
        assert_eq!(
            c.settings.runtime.unwrap(),
            ["python3", "-m", "awslambdaric", "app.handler"]
        );
        assert_eq!(c.settings.init_type.as_deref(), Some("snap-start"));
        assert_eq!(c.settings.env["FOO"], "bar=baz");
        assert_eq!(c.vsock_port, Some(9100));
    }

    #[test]
    fn rejects_bad_cmdline_numbers() {
        assert!(matches!(
            parse_cmdline("thaw.memory_mb=lots"),
            Err(ConfigError::CmdlineValue { .. })
        ));
    }

    #[test]
    fn higher_layers_win_and_env_merges() {
        let high = FunctionSettings {
            handler: Some("a.b".into()),
            env: [("X".to_owned(), "1".to_owned())].into(),
            ..Default::default()
        };
        let low = FunctionSettings {
            handler: Some("c.d".into()),
            function_name: Some("f".into()),
            env: [
                ("X".to_owned(), "2".to_owned()),
                ("Y".to_owned(), "3".to_owned()),
            ]
            .into(),
            ..Default::default()
        };
        let m = high.or(low);
        assert_eq!(m.handler.as_deref(), Some("a.b"));
        assert_eq!(m.function_name.as_deref(), Some("f"));
        assert_eq!(m.env["X"], "1");
        assert_eq!(m.env["Y"], "3");
    }

    #[test]
    fn resolves_lambda_environment() {
        let cfg = AgentConfig::resolve(ResolveInput {
            host_mode: true,
            transport: Some(Transport::Unix("/tmp/x".into())),
            settings: FunctionSettings {
                runtime: Some(vec!["/bin/true".into()]),
                init_type: Some("snap-start".into()),
                handler: Some("app.handler".into()),
                env: [("AWS_REGION".to_owned(), "eu-west-1".to_owned())].into(),
                ..Default::default()
            },
            stop_timeout: DEFAULT_STOP_TIMEOUT,
        })
        .unwrap();
        let get = |k: &str| {
            cfg.env
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("AWS_LAMBDA_INITIALIZATION_TYPE"), Some("snap-start"));
        assert_eq!(get("_HANDLER"), Some("app.handler"));
        assert_eq!(get("AWS_REGION"), Some("eu-west-1"));
        assert_eq!(get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE"), Some("128"));
        assert_eq!(cfg.runtime_api.port(), 9001);
        assert_eq!(cfg.working_dir, None);
    }

    #[test]
    fn host_mode_needs_a_socket_and_file_must_parse() {
        let input = ResolveInput {
            host_mode: true,
            transport: None,
            settings: FunctionSettings {
                runtime: Some(vec!["x".into()]),
                ..Default::default()
            },
            stop_timeout: DEFAULT_STOP_TIMEOUT,
        };
        assert!(matches!(
            AgentConfig::resolve(input),
            Err(ConfigError::NoAgentSocket)
        ));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("function.json");
        std::fs::write(&path, r#"{"runtime": ["a"], "bogus": 1}"#).unwrap();
        assert!(matches!(
            FunctionSettings::from_file(&path),
            Err(ConfigError::ParseFile { .. })
        ));
        assert_eq!(
            FunctionSettings::from_file(&dir.path().join("missing.json")).unwrap(),
            FunctionSettings::default()
        );
    }
}

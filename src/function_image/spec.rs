//! What a user asks `thaw function build` for, parsed and checked before anything is built: the
//! runtime (`python3.X`), the handler (`module.function`), the function's name, its environment
//! (`KEY=VALUE`, Lambda's reserved names refused) and where its requirements file is. Each parser
//! is pure, so every rule here has a unit test and bad input fails in milliseconds, not after pip.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The runtimes `thaw function build` can bundle, for error messages and `--help`.
pub const SUPPORTED_RUNTIMES: &str = "python3.X (the host's CPython 3.X, e.g. python3.11)";

/// Lambda's limit on a function's name.
const MAX_NAME_LEN: usize = 64;

/// Variables Lambda reserves (a function cannot set them; the platform does). `thaw-init` sets
/// them from the function file, so letting `--env` override them would only hide mistakes.
pub const RESERVED_ENV: &[&str] = &[
    "_HANDLER",
    "_X_AMZN_TRACE_ID",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_LAMBDA_RUNTIME_API",
    "LAMBDA_TASK_ROOT",
    "LAMBDA_RUNTIME_DIR",
];

/// A value from the command line that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A runtime other than `python3.X`.
    #[error("runtime {given:?} is not supported; supported: {SUPPORTED_RUNTIMES}")]
    UnsupportedRuntime {
        /// What was given.
        given: String,
    },
    /// A handler that is not `module.function`.
    #[error(
        "handler {given:?} is not MODULE.FUNCTION (e.g. app.handler, or pkg.mod.handler for \
         pkg/mod.py): {reason}"
    )]
    BadHandler {
        /// What was given.
        given: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A function name Lambda would refuse.
    #[error(
        "function name {given:?} is invalid: it must be 1 to 64 letters, digits, hyphens or \
         underscores{hint}"
    )]
    BadName {
        /// The name.
        given: String,
        /// Where it came from, when it was not given explicitly.
        hint: &'static str,
    },
    /// An `--env` value that is not `KEY=VALUE`.
    #[error("--env {given:?} is not KEY=VALUE with KEY made of letters, digits and underscores")]
    BadEnv {
        /// What was given.
        given: String,
    },
    /// An `--env` key Lambda reserves.
    #[error("--env {key}: {key} is reserved by Lambda; thaw-init sets it for the runtime")]
    ReservedEnv {
        /// The key.
        key: String,
    },
    /// The same `--env` key twice.
    #[error("--env {key} is given twice")]
    DuplicateEnv {
        /// The key.
        key: String,
    },
}

/// A runtime `thaw function build` can bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// CPython 3.`minor`, copied from the host's `python3.<minor>`.
    Python {
        /// The minor version.
        minor: u32,
    },
}

impl Runtime {
    /// The command that starts this runtime's interpreter on the host (`python3.11`).
    pub fn host_command(&self) -> String {
        match self {
            Self::Python { minor } => format!("python3.{minor}"),
        }
    }

    /// `3.11`: what the interpreter reports as its major.minor version.
    pub fn version(&self) -> String {
        match self {
            Self::Python { minor } => format!("3.{minor}"),
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Python { minor } => write!(f, "python3.{minor}"),
        }
    }
}

impl FromStr for Runtime {
    type Err = SpecError;

    /// `python3.X` with X a plain number; anything else (`nodejs20.x`, `java21`, `python3`...)
    /// is refused with the list of what is supported.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unsupported = || SpecError::UnsupportedRuntime {
            given: s.to_owned(),
        };
        let minor = s.strip_prefix("python3.").ok_or_else(unsupported)?;
        if minor.is_empty() || !minor.bytes().all(|b| b.is_ascii_digit()) || minor.len() > 3 {
            return Err(unsupported());
        }
        // No leading zeros: `python3.011` is not a name any interpreter has.
        if minor.len() > 1 && minor.starts_with('0') {
            return Err(unsupported());
        }
        let minor = minor.parse().map_err(|_| unsupported())?;
        Ok(Self::Python { minor })
    }
}

/// A Python handler: `pkg.mod.handler` is the function `handler` of the module `pkg.mod`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handler {
    /// The module's dotted name.
    pub module: String,
    /// The function's name.
    pub function: String,
}

impl Handler {
    /// Where the module's source is, relative to the code directory: `pkg/mod.py`.
    pub fn module_file(&self) -> PathBuf {
        let mut path: PathBuf = self.module.split('.').collect();
        path.set_extension("py");
        path
    }

    /// Where a package of that name keeps its code: `pkg/mod/__init__.py`.
    pub fn package_file(&self) -> PathBuf {
        let mut path: PathBuf = self.module.split('.').collect();
        path.push("__init__.py");
        path
    }
}

impl fmt::Display for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.module, self.function)
    }
}

impl FromStr for Handler {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| SpecError::BadHandler {
            given: s.to_owned(),
            reason,
        };
        let (module, function) = s
            .rsplit_once('.')
            .ok_or_else(|| bad("there is no `.` between the module and the function"))?;
        if module.is_empty() {
            return Err(bad("the module name is empty"));
        }
        if !is_identifier(function) {
            return Err(bad("the function name is not a Python identifier"));
        }
        if !module.split('.').all(is_identifier) {
            return Err(bad(
                "each part of the module name must be a Python identifier",
            ));
        }
        Ok(Self {
            module: module.to_owned(),
            function: function.to_owned(),
        })
    }
}

/// A Python identifier: a letter or `_`, then letters, digits or `_` (Unicode letters count,
/// as in Python 3).
fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c == '_' || c.is_alphabetic())
        && chars.all(|c| c == '_' || c.is_alphanumeric())
}

/// The function's name: `given`, else the code directory's own name. Lambda's rule applies to
/// both: 1–64 of `[A-Za-z0-9_-]`.
pub fn function_name(given: Option<&str>, code_dir: &Path) -> Result<String, SpecError> {
    let (name, hint) = match given {
        Some(name) => (name.to_owned(), ""),
        None => (
            code_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            " (it was taken from the code directory's name; pass --name NAME)",
        ),
    };
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return Err(SpecError::BadName { given: name, hint });
    }
    Ok(name)
}

/// Parses `--env KEY=VALUE` settings: keys are shell-style names, not reserved by Lambda, and
/// given once.
pub fn parse_env(settings: &[String]) -> Result<BTreeMap<String, String>, SpecError> {
    let mut env = BTreeMap::new();
    for setting in settings {
        let bad = || SpecError::BadEnv {
            given: setting.clone(),
        };
        let (key, value) = setting.split_once('=').ok_or_else(bad)?;
        let valid_key = key
            .chars()
            .next()
            .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
            && key.chars().all(|c| c == '_' || c.is_ascii_alphanumeric());
        if !valid_key || value.contains('\0') {
            return Err(bad());
        }
        if RESERVED_ENV.contains(&key) {
            return Err(SpecError::ReservedEnv {
                key: key.to_owned(),
            });
        }
        if env.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(SpecError::DuplicateEnv {
                key: key.to_owned(),
            });
        }
    }
    Ok(env)
}

/// The requirements file to install: the one given, else `code_dir/requirements.txt` when it
/// is a file, else none.
pub fn requirements_file(given: Option<&Path>, code_dir: &Path) -> Option<PathBuf> {
    match given {
        Some(path) => Some(path.to_owned()),
        None => {
            let default = code_dir.join("requirements.txt");
            default.is_file().then_some(default)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn python_runtimes_parse() {
        assert_eq!(
            "python3.11".parse::<Runtime>().unwrap(),
            Runtime::Python { minor: 11 }
        );
        let runtime: Runtime = "python3.9".parse().unwrap();
        assert_eq!(runtime.host_command(), "python3.9");
        assert_eq!(runtime.version(), "3.9");
        assert_eq!(runtime.to_string(), "python3.9");
    }

    #[test]
    fn other_runtimes_are_refused_with_the_supported_list() {
        for given in [
            "nodejs20.x",
            "java21",
            "ruby3.3",
            "provided.al2023",
            "python3",
            "python3.",
            "python3.x",
            "python3.11.2",
            "python3.011",
            "python3.99999",
            "Python3.11",
            "",
            "garbage",
        ] {
            let err = given.parse::<Runtime>().unwrap_err();
            assert!(
                matches!(err, SpecError::UnsupportedRuntime { .. }),
                "{given}: {err}"
            );
            assert!(err.to_string().contains("python3.X"), "{err}");
        }
    }

    #[test]
    fn handlers_parse_into_module_and_function() {
        let h: Handler = "app.handler".parse().unwrap();
        assert_eq!((h.module.as_str(), h.function.as_str()), ("app", "handler"));
        assert_eq!(h.module_file(), Path::new("app.py"));
        let h: Handler = "pkg.mod.handle_event".parse().unwrap();
        assert_eq!(h.module, "pkg.mod");
        assert_eq!(h.module_file(), Path::new("pkg/mod.py"));
        assert_eq!(h.package_file(), Path::new("pkg/mod/__init__.py"));
        assert_eq!(h.to_string(), "pkg.mod.handle_event");
        assert!("_private._h1".parse::<Handler>().is_ok());
    }

    #[test]
    fn bad_handlers_are_refused() {
        for given in [
            "handler",
            ".handler",
            "app.",
            "app..handler",
            "1app.handler",
            "app.1handler",
            "app/mod.handler",
            "../app.handler",
            "app.handler()",
            "app-x.handler",
            "",
        ] {
            let err = given.parse::<Handler>().unwrap_err();
            assert!(
                matches!(err, SpecError::BadHandler { .. }),
                "{given}: {err}"
            );
        }
    }

    #[test]
    fn names_default_to_the_code_directory() {
        let dir = Path::new("/src/python-function");
        assert_eq!(function_name(None, dir).unwrap(), "python-function");
        assert_eq!(function_name(Some("other_1"), dir).unwrap(), "other_1");
        let err = function_name(None, Path::new("/src/my app")).unwrap_err();
        assert!(err.to_string().contains("--name"), "{err}");
        assert!(function_name(Some(""), dir).is_err());
        assert!(function_name(Some(&"x".repeat(65)), dir).is_err());
        assert!(function_name(Some("a.b"), dir).is_err());
        assert!(function_name(None, Path::new("/")).is_err());
    }

    #[test]
    fn env_settings_parse_and_refuse_reserved_or_repeated_keys() {
        let env = parse_env(&["A=1".into(), "B_2=x=y".into(), "EMPTY=".into()]).unwrap();
        assert_eq!(env["A"], "1");
        assert_eq!(env["B_2"], "x=y");
        assert_eq!(env["EMPTY"], "");
        for bad in ["NOEQUALS", "=x", "1A=x", "A-B=x", "A B=x"] {
            assert!(
                matches!(parse_env(&[bad.into()]), Err(SpecError::BadEnv { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_env(&["AWS_REGION=eu-west-1".into()]),
            Err(SpecError::ReservedEnv { .. })
        ));
        assert!(matches!(
            parse_env(&["A=1".into(), "A=2".into()]),
            Err(SpecError::DuplicateEnv { .. })
        ));
    }

    #[test]
    fn requirements_default_to_the_code_directory_file_when_present() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(requirements_file(None, dir.path()), None);
        let req = dir.path().join("requirements.txt");
        std::fs::write(&req, "tabulate==0.9.0\n").unwrap();
        assert_eq!(requirements_file(None, dir.path()), Some(req));
        let other = Path::new("/elsewhere/reqs.txt");
        assert_eq!(
            requirements_file(Some(other), dir.path()),
            Some(other.to_owned())
        );
        // A directory named requirements.txt is not a requirements file.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("requirements.txt")).unwrap();
        assert_eq!(requirements_file(None, dir.path()), None);
    }
}

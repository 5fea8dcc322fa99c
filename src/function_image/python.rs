//! The Python runtime of a function image: the host's CPython (`python3.X` on `PATH`, as it
//! describes itself through `sys`, `sysconfig` and `site`), relocated to Lambda's `/var/lang`
//! with its standard library and the runtime's own packages, plus every shared library they need
//! (found by [`super::elf_deps`]). Copying the host's interpreter keeps the build free of
//! downloads beyond PyPI and makes pip's wheels match it exactly; the price is that the guest
//! runs whatever CPython build the host has (see docs/functions.md).
//!
//! Guest layout (`X` is the minor version):
//!
//! - `/var/lang/bin/python3.X` (and a `python3` symlink): `realpath(sys.executable)`.
//! - `/var/lang/lib/python3.X/`: the standard library without test suites, `__pycache__`, IDLE,
//!   tkinter, ensurepip, lib2to3, pydoc's topics, the `config-*` build files, the host's own
//!   site-packages and CPython's test extension modules.
//! - the runtime's site-packages (where `site.getsitepackages(["/var/lang"])` says first:
//!   `/var/lang/lib/python3.X/site-packages` for a CPython built from source): the runtime
//!   packages pip installed into a staging directory, never the host's.
//! - the interpreter's `PT_INTERP` (`/lib64/ld-linux-x86-64.so.2`): a symlink to the loader's
//!   canonical path, which is carried.
//!
//! Standard-library extension modules whose libraries are missing on the host (so they cannot
//! be imported there either) are left out and reported; a missing library of the interpreter
//! or of a package is an error.

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use super::bundle::{Bundle, BundleError};
use super::elf_deps::{ElfDeps, ElfError, ResolveError, Resolver, Tree, is_elf};
use super::spec::Runtime;

/// Where the runtime lives in the guest, as in Lambda's images.
pub const GUEST_PREFIX: &str = "/var/lang";

/// Directories of the standard library a function does not need: test suites, the IDE, GUI
/// toolkits, pip's bootstrapper, the Python 2 converter, `help()`'s topics, bytecode caches,
/// and the host's own installed packages (the image installs its own).
const SKIPPED_STDLIB_DIRS: &[&str] = &[
    "__pycache__",
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "site-packages",
    "dist-packages",
];
/// Extension modules left out, by name prefix: CPython's own test modules, examples, tkinter.
const SKIPPED_EXTENSIONS: &[&str] = &[
    "_test",
    "_ctypes_test",
    "_xxtestfuzz",
    "_xxsubinterpreters",
    "xxlimited",
    "xxsubtype",
    "_tkinter",
];
/// How much of a failing interpreter's output an error keeps.
const OUTPUT_TAIL: usize = 2000;

/// Asks the interpreter where it lives; one JSON line on stdout.
const DESCRIBE: &str = r#"
import importlib.util, json, os, platform, site, sys, sysconfig
print(json.dumps({
    "implementation": sys.implementation.name,
    "executable": os.path.realpath(sys.executable),
    "prefix": sys.base_prefix,
    "version": "%d.%d" % sys.version_info[:2],
    "full_version": platform.python_version(),
    "stdlib": sysconfig.get_path("stdlib"),
    "dynload": sysconfig.get_config_var("DESTSHARED") or "",
    # Where this Python (Debian's patched one says dist-packages) looks under the guest prefix.
    "guest_site": site.getsitepackages([sys.argv[1]])[0],
    "pip": importlib.util.find_spec("pip") is not None,
}))
"#;

/// The host's Python cannot be bundled.
#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    /// `python3.X` is not on `PATH`, or does not run.
    #[error(
        "runtime {runtime} needs the host's {command} (the image copies the host's CPython): \
         install CPython {version} (e.g. apt-get install {command}, or pyenv) or choose the \
         runtime of an installed python3.X; {command} {detail}"
    )]
    NotInstalled {
        /// The runtime.
        runtime: String,
        /// The command.
        command: String,
        /// `3.X`.
        version: String,
        /// What happened.
        detail: String,
    },
    /// It ran, but did not describe itself as expected.
    #[error("{command} did not describe itself: {detail}")]
    Describe {
        /// The command.
        command: String,
        /// What went wrong.
        detail: String,
    },
    /// It is another Python version than its name says.
    #[error("{command} is Python {found}, not {expected}")]
    VersionMismatch {
        /// The command.
        command: String,
        /// What it says it is.
        found: String,
        /// What its name says.
        expected: String,
    },
    /// It is not CPython (PyPy...): Lambda runs CPython, and wheels differ.
    #[error("{command} is {implementation}, not CPython")]
    NotCPython {
        /// The command.
        command: String,
        /// `sys.implementation.name`.
        implementation: String,
    },
    /// pip is not installed for it.
    #[error(
        "{command} has no pip, which installs the runtime's packages and the requirements; \
         install it (Debian: apt-get install python3-pip; else {command} -m ensurepip)"
    )]
    NoPip {
        /// The command.
        command: String,
    },
    /// A directory of the installation could not be listed.
    #[error("cannot list {}", path.display())]
    List {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The interpreter is not a usable ELF file.
    #[error(transparent)]
    Elf(#[from] ElfError),
    /// A library the interpreter or a package needs.
    #[error(transparent)]
    Libraries(#[from] ResolveError),
    /// Two files for one guest path.
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

/// The host's CPython, as it describes itself.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HostPython {
    /// `sys.implementation.name` (`cpython`).
    pub implementation: String,
    /// The interpreter, symlinks resolved.
    pub executable: PathBuf,
    /// `sys.base_prefix`: what `/var/lang` stands for.
    pub prefix: PathBuf,
    /// `3.11`.
    pub version: String,
    /// `3.11.7`.
    pub full_version: String,
    /// The standard library directory.
    pub stdlib: PathBuf,
    /// Where the standard library's extension modules are (`lib-dynload`); empty if the
    /// interpreter does not say.
    pub dynload: PathBuf,
    /// The site-packages directory this Python uses under `/var/lang`.
    pub guest_site: String,
    /// Whether pip can be imported.
    pub pip: bool,
}

impl HostPython {
    /// Runs the host's `python3.X` for `runtime` and checks it can be bundled: CPython of that
    /// version, with pip.
    pub fn describe(runtime: Runtime) -> Result<Self, PythonError> {
        let command = runtime.host_command();
        let not_installed = |detail: String| PythonError::NotInstalled {
            runtime: runtime.to_string(),
            command: command.clone(),
            version: runtime.version(),
            detail,
        };
        let out = match Command::new(&command)
            .arg("-c")
            .arg(DESCRIBE)
            .arg(GUEST_PREFIX)
            .output()
        {
            Ok(out) => out,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(not_installed("is not on PATH".into()));
            }
            Err(e) => return Err(not_installed(format!("cannot be started ({e})"))),
        };
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(not_installed(format!(
                "does not run ({}): {}",
                out.status,
                tail(stderr.trim(), OUTPUT_TAIL)
            )));
        }
        let mut python: HostPython =
            serde_json::from_slice(&out.stdout).map_err(|e| PythonError::Describe {
                command: command.clone(),
                detail: format!("{e}: {}", tail(&String::from_utf8_lossy(&out.stdout), 500)),
            })?;
        if python.implementation != "cpython" {
            return Err(PythonError::NotCPython {
                command,
                implementation: python.implementation,
            });
        }
        if python.version != runtime.version() {
            return Err(PythonError::VersionMismatch {
                command,
                found: python.full_version,
                expected: runtime.version(),
            });
        }
        if !python.pip {
            return Err(PythonError::NoPip { command });
        }
        if python.dynload.as_os_str().is_empty() {
            python.dynload = python.stdlib.join("lib-dynload");
        }
        Ok(python)
    }

    /// `/var/lang/lib/python3.X`.
    pub fn guest_stdlib(&self) -> String {
        format!("{GUEST_PREFIX}/lib/python{}", self.version)
    }

    /// `/var/lang/bin/python3`.
    pub fn guest_python3(&self) -> String {
        format!("{GUEST_PREFIX}/bin/python3")
    }
}

/// The last `max` bytes of `text` (on a character boundary), for error messages.
pub fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// ELF objects of the runtime whose libraries must be resolved, and the trees they live in.
#[derive(Debug, Default)]
pub struct RuntimeObjects {
    /// Relocated host directories and their guest paths, most specific first.
    pub trees: Vec<Tree>,
    /// Standard-library extension modules (host, guest): left out if a library is missing.
    pub optional: Vec<(PathBuf, String)>,
    /// Extension modules of the runtime's packages: a missing library is an error.
    pub required: Vec<PathBuf>,
}

/// Adds the interpreter (and `python3`), the standard library and the packages pip installed
/// into `site_packages` (a staging directory, which becomes the guest's site-packages) to
/// `bundle`. Libraries are resolved afterwards, with the function's own objects, by
/// [`resolve_libraries`].
pub fn add_runtime(
    bundle: &mut Bundle,
    python: &HostPython,
    site_packages: &Path,
) -> Result<RuntimeObjects, PythonError> {
    let exe_name = format!("python{}", python.version);
    bundle.add_file(
        format!("{GUEST_PREFIX}/bin/{exe_name}"),
        python.executable.clone(),
    )?;
    bundle.add_symlink(python.guest_python3(), exe_name);

    let mut objects = RuntimeObjects {
        trees: vec![
            Tree {
                host: site_packages.to_owned(),
                guest: python.guest_site.clone(),
            },
            Tree {
                host: python.stdlib.clone(),
                guest: python.guest_stdlib(),
            },
            Tree {
                host: python.prefix.clone(),
                guest: GUEST_PREFIX.to_owned(),
            },
        ],
        ..RuntimeObjects::default()
    };
    let mut walk = StdlibWalk {
        bundle,
        extensions: &mut objects.optional,
        seen: BTreeSet::new(),
    };
    walk.dir(&python.stdlib, &python.guest_stdlib(), &python.stdlib)?;
    if !python.dynload.starts_with(&python.stdlib) {
        let guest = format!("{}/lib-dynload", python.guest_stdlib());
        walk.dir(&python.dynload, &guest, &python.dynload)?;
        objects.trees.insert(
            0,
            Tree {
                host: python.dynload.clone(),
                guest,
            },
        );
    }
    add_tree(
        bundle,
        site_packages,
        &python.guest_site,
        // pip --target puts console scripts in bin/, with the host interpreter's path in their
        // shebang: of no use in the guest's site-packages.
        &["bin"],
        &mut objects.required,
    )?;
    Ok(objects)
}

/// Adds every file under `root` to `guest_root` (no `__pycache__`, no `.pyc`; top-level
/// directories named in `skip_top` left out) and collects the ELF files among them.
pub fn add_tree(
    bundle: &mut Bundle,
    root: &Path,
    guest_root: &str,
    skip_top: &[&str],
    elf_files: &mut Vec<PathBuf>,
) -> Result<(), PythonError> {
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for path in sorted_entries(&dir)? {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let Ok(meta) = std::fs::metadata(&path) else {
                continue; // a dangling symlink: nothing to carry
            };
            if meta.is_dir() {
                let top = dir == root && skip_top.contains(&name.as_ref());
                if name != "__pycache__" && !top {
                    stack.push(path);
                }
                continue;
            }
            if name.ends_with(".pyc") {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap_or(&path);
            if is_elf(&path) {
                elf_files.push(path.clone());
            }
            bundle.add_file(format!("{guest_root}/{}", rel.display()), path)?;
        }
    }
    Ok(())
}

/// Walks the standard library, skipping what a function does not need.
struct StdlibWalk<'a> {
    bundle: &'a mut Bundle,
    extensions: &'a mut Vec<(PathBuf, String)>,
    /// Canonical directories already walked: a symlink loop ends here.
    seen: BTreeSet<PathBuf>,
}

impl StdlibWalk<'_> {
    fn dir(&mut self, root: &Path, guest_root: &str, dir: &Path) -> Result<(), PythonError> {
        if let Ok(canonical) = dir.canonicalize() {
            if !self.seen.insert(canonical) {
                return Ok(());
            }
        }
        for path in sorted_entries(dir)? {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let Ok(meta) = std::fs::metadata(&path) else {
                continue; // a dangling symlink
            };
            if meta.is_dir() {
                if !SKIPPED_STDLIB_DIRS.contains(&name.as_str()) && !name.starts_with("config-") {
                    self.dir(root, guest_root, &path)?;
                }
                continue;
            }
            if name.ends_with(".pyc") {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let guest = format!("{guest_root}/{}", rel.display());
            if is_elf(&path) {
                if SKIPPED_EXTENSIONS.iter().any(|p| name.starts_with(p)) {
                    continue;
                }
                self.extensions.push((path.clone(), guest.clone()));
            }
            self.bundle.add_file(guest, path)?;
        }
        Ok(())
    }
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, PythonError> {
    let list_err = |source| PythonError::List {
        path: dir.to_owned(),
        source,
    };
    let mut entries = std::fs::read_dir(dir)
        .map_err(list_err)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(list_err)?;
    entries.sort();
    Ok(entries)
}

/// Resolves the libraries of the interpreter, of `required` objects (a missing one is an
/// error) and of the standard library's extension modules (left out when one is missing), and
/// adds them to `bundle`. Returns what was left out: module → why.
pub fn resolve_libraries(
    bundle: &mut Bundle,
    python: &HostPython,
    trees: Vec<Tree>,
    required: &[PathBuf],
    optional: &[(PathBuf, String)],
) -> Result<BTreeMap<String, String>, PythonError> {
    let mut resolver = Resolver::new(trees);
    bundle.add_libraries(resolver.resolve(&python.executable)?)?;
    // A statically linked interpreter has no PT_INTERP, and needs no loader.
    if let Some(interp) = ElfDeps::read(&python.executable)?.interpreter {
        let canonical = interp
            .canonicalize()
            .map_err(|source| ResolveError::Canonicalize {
                path: interp.clone(),
                source,
            })?;
        if canonical != interp {
            bundle.add_symlink(
                interp.display().to_string(),
                canonical.display().to_string(),
            );
        }
        bundle.add_file(canonical.display().to_string(), canonical)?;
    }
    for object in required {
        bundle.add_libraries(resolver.resolve(object)?)?;
    }
    let mut left_out = BTreeMap::new();
    for (host, guest) in optional {
        match resolver.resolve(host) {
            Ok(libraries) => bundle.add_libraries(libraries)?,
            Err(e) => {
                bundle.remove_file(guest);
                let name = host
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                left_out.insert(name, e.to_string());
            }
        }
    }
    Ok(left_out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tail_keeps_the_end_on_a_character_boundary() {
        assert_eq!(tail("short", 10), "short");
        assert_eq!(tail("0123456789", 3), "789");
        assert_eq!(tail("aé", 1), "");
        assert_eq!(tail("aéb", 2), "b");
    }

    #[test]
    fn a_missing_interpreter_is_a_clear_error() {
        // No one has CPython 3.999.
        let err = HostPython::describe(Runtime::Python { minor: 999 }).unwrap_err();
        assert!(matches!(err, PythonError::NotInstalled { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("python3.999"), "{text}");
        assert!(text.contains("install CPython 3.999"), "{text}");
    }

    #[test]
    fn trees_skip_bytecode_and_listed_top_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["pkg/__pycache__", "bin", "pkg/bin"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in [
            "pkg/__init__.py",
            "pkg/__pycache__/x.cpython-311.pyc",
            "pkg/old.pyc",
            "bin/script",
            "pkg/bin/data",
            "top.py",
        ] {
            std::fs::write(root.join(f), "x").unwrap();
        }
        let mut bundle = Bundle::default();
        let mut elf = Vec::new();
        add_tree(&mut bundle, root, "/var/lang/site", &["bin"], &mut elf).unwrap();
        let files: Vec<&str> = bundle.files().keys().map(String::as_str).collect();
        assert_eq!(
            files,
            [
                "/var/lang/site/pkg/__init__.py",
                "/var/lang/site/pkg/bin/data",
                "/var/lang/site/top.py"
            ]
        );
        assert!(elf.is_empty());
    }
}

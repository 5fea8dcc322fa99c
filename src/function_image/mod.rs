//! `thaw function build`: a Python function's code, its requirements and a Python runtime made
//! into an image Thaw boots and snapshots — an initramfs with the static `thaw-init` as `/init`,
//! the host's CPython relocated to `/var/lang` with AWS's runtime interface client, the code and
//! its requirements in `/var/task`, the function file `thaw-init` reads, and the kernel modules
//! of the Debian kernel it is built for — plus a manifest saying what is inside
//! (docs/functions.md). The build checks every input before the slow steps, and writes the image
//! directory atomically: a failure at any step leaves nothing behind.
//!
//! One job per file: [`spec`] parses what the user asked for, [`code`] lists the code,
//! [`pip`] installs from PyPI, [`python`] bundles the interpreter, [`elf_deps`] finds the shared
//! libraries, [`bundle`] collects files by guest path, [`thaw_init`] finds `/init`,
//! [`manifest`] and [`output`] write the result, and [`boot`] reads it back for
//! `thaw snapshot create --function`.

pub mod boot;
pub mod bundle;
pub mod code;
pub mod elf_deps;
pub mod manifest;
pub mod output;
pub mod pip;
pub mod python;
pub mod spec;
pub mod thaw_init;

#[cfg(test)]
mod test_elf;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::guest_image::initramfs::supported_compressions_in;
use crate::guest_image::{
    self, Compression, DebianKernel, GUEST_MODULES, INIT_PATH, InitramfsBuilder, InitramfsError,
    KernelConfigError, KernelFetchError,
};

pub use boot::{BootImageError, FunctionBoot};
pub use manifest::{MANIFEST_FILE, Manifest, ManifestError};
pub use spec::{Handler, Runtime, SpecError};

use bundle::{Bundle, BundleError};
use code::{CodeError, TASK_ROOT};
use elf_deps::{Tree, is_elf};
use output::{OutputError, Staged};
use pip::{Install, PipError, RUNTIME_PACKAGES};
use python::{HostPython, PythonError};
use thaw_init::ThawInitError;

/// The function file `thaw-init` reads (hooks-sdk's `agent::config::DEFAULT_FUNCTION_FILE`).
pub const FUNCTION_FILE: &str = "/etc/thaw/function.json";
/// Guest memory for `thaw snapshot create --function` unless `--mem-mib` says otherwise: the
/// initramfs lives in guest RAM (packed, then unpacked), so 128 MiB does not fit a runtime;
/// the example function (66 MiB unpacked) runs its whole SnapStart cycle in 512 MiB
/// (`tests/linux_python.rs`).
pub const DEFAULT_MEM_MIB: u64 = 512;
/// Variables every Python function gets (a `--env` of the same name overrides them): output
/// unbuffered, since the console is the log, and no bytecode written into the guest's memory,
/// and so into its snapshot.
pub const DEFAULT_ENV: &[(&str, &str)] =
    &[("PYTHONUNBUFFERED", "1"), ("PYTHONDONTWRITEBYTECODE", "1")];

/// What to build.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    /// The code directory (its files go to `/var/task`).
    pub code: PathBuf,
    /// `module.function`.
    pub handler: Handler,
    /// `python3.X`.
    pub runtime: Runtime,
    /// The image directory to write.
    pub out: PathBuf,
    /// The function's name (default: the code directory's name).
    pub name: Option<String>,
    /// A requirements file (default: `code/requirements.txt` if present).
    pub requirements: Option<PathBuf>,
    /// `KEY=VALUE` settings for the function's environment.
    pub env: Vec<String>,
    /// The static `thaw-init` (default: `$THAW_INIT`, else beside `thaw`).
    pub thaw_init: Option<PathBuf>,
    /// Replace an existing function image at `out`.
    pub replace: bool,
    /// The kernel cache (default: [`guest_image::default_cache_dir`]).
    pub cache_dir: Option<PathBuf>,
}

/// An image was written.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The image directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// The host interpreter that was copied.
    pub python_executable: PathBuf,
    /// The runtime's site-packages in the guest.
    pub guest_site_packages: String,
    /// Shared libraries carried: `DT_NEEDED` name → guest path.
    pub libraries: BTreeMap<String, String>,
    /// Standard-library extension modules left out (their libraries are missing on the host
    /// too): module → why.
    pub left_out: BTreeMap<String, String>,
    /// Files from the host (runtime, code, requirements).
    pub files: usize,
    /// The code and requirements in `/var/task`, in bytes.
    pub task_bytes: u64,
    /// The uncompressed archive's size.
    pub cpio_bytes: u64,
    /// Kernel modules added, relative to `/lib/modules/<release>`, in load order.
    pub kernel_modules: Vec<String>,
}

/// No image was written.
#[derive(Debug, thiserror::Error)]
pub enum FunctionImageError {
    /// A flag's value is unusable.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The code directory cannot be packaged.
    #[error(transparent)]
    Code(#[from] CodeError),
    /// The handler's module is not in the code directory.
    #[error(
        "handler {handler}: module {module} is not in the code directory {} (looked for {} and \
         {})",
        code.display(),
        module_file.display(),
        package_file.display()
    )]
    HandlerModuleMissing {
        /// The handler.
        handler: String,
        /// Its module.
        module: String,
        /// The code directory.
        code: PathBuf,
        /// The module file looked for.
        module_file: PathBuf,
        /// The package file looked for.
        package_file: PathBuf,
    },
    /// `--requirements` names no file.
    #[error("--requirements {}: no such file", path.display())]
    RequirementsMissing {
        /// The path.
        path: PathBuf,
    },
    /// No usable `thaw-init`.
    #[error(transparent)]
    ThawInit(#[from] ThawInitError),
    /// The host's Python cannot be bundled.
    #[error(transparent)]
    Python(#[from] PythonError),
    /// pip failed.
    #[error(transparent)]
    Pip(#[from] PipError),
    /// A staging directory for pip could not be made.
    #[error("cannot create a staging directory for pip")]
    Staging(#[source] std::io::Error),
    /// No kernel cache directory.
    #[error("no kernel cache directory")]
    CacheDir(#[source] KernelFetchError),
    /// The kernel whose modules the image needs could not be had.
    #[error("cannot fetch Debian's cloud kernel, whose modules the image carries")]
    Kernel(#[source] KernelFetchError),
    /// The kernel's configuration could not be read.
    #[error(transparent)]
    KernelConfig(#[from] KernelConfigError),
    /// Two files for one guest path.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The archive could not be built.
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    /// The image directory could not be written.
    #[error(transparent)]
    Output(#[from] OutputError),
}

/// Builds the image `spec` describes; `progress` hears about each slow step.
pub fn build(
    spec: &FunctionSpec,
    progress: &mut dyn FnMut(&str),
) -> Result<BuiltImage, FunctionImageError> {
    // Every input first, cheapest first: a typo costs milliseconds, not a pip run.
    let env = function_env(&spec.env)?;
    let code_root = canonical_code_dir(&spec.code)?;
    let name = spec::function_name(spec.name.as_deref(), &code_root)?;
    check_handler_module(&code_root, &spec.handler)?;
    let requirements = spec::requirements_file(spec.requirements.as_deref(), &code_root);
    if let Some(path) = &requirements {
        if !path.is_file() {
            return Err(FunctionImageError::RequirementsMissing { path: path.clone() });
        }
    }
    output::check_target(&spec.out, spec.replace)?;
    let thaw_init = thaw_init::locate(spec.thaw_init.as_deref())?;
    let python = HostPython::describe(spec.runtime)?;
    let code = code::collect(&code_root, exclude_for(&spec.out).as_ref())?;
    tracing::info!(
        python = %python.executable.display(),
        version = %python.full_version,
        files = code.files.len(),
        "function inputs checked"
    );

    let cache_dir = match &spec.cache_dir {
        Some(dir) => dir.clone(),
        None => guest_image::default_cache_dir().map_err(FunctionImageError::CacheDir)?,
    };
    progress("fetching Debian's cloud kernel (for its modules)");
    let kernel = kernel_for_build(&cache_dir)?;

    let staging = tempfile::Builder::new()
        .prefix("thaw-function-")
        .tempdir()
        .map_err(FunctionImageError::Staging)?;
    let runtime_site = staging.path().join("runtime");
    let task_staging = staging.path().join("task");
    progress(&format!(
        "installing {} with {}",
        RUNTIME_PACKAGES.join(" "),
        spec.runtime.host_command()
    ));
    pip::install(
        &python.executable,
        &runtime_site,
        Install::Packages(RUNTIME_PACKAGES),
        &code_root,
    )?;
    if let Some(file) = &requirements {
        progress(&format!(
            "installing the requirements in {}",
            file.display()
        ));
        pip::install(
            &python.executable,
            &task_staging,
            Install::Requirements(file),
            &code_root,
        )?;
    }

    progress("bundling the runtime, the code and their shared libraries");
    let mut bundle = Bundle::default();
    let runtime = python::add_runtime(&mut bundle, &python, &runtime_site)?;
    let mut required = runtime.required;
    for (rel, host) in &code.files {
        if is_elf(host) {
            required.push(host.clone());
        }
        bundle.add_file(format!("{TASK_ROOT}/{rel}"), host.clone())?;
    }
    for (rel, target) in &code.symlinks {
        bundle.add_symlink(format!("{TASK_ROOT}/{rel}"), target.clone());
    }
    if task_staging.exists() {
        python::add_tree(&mut bundle, &task_staging, TASK_ROOT, &[], &mut required)?;
    }
    let task_bytes = task_bytes(&bundle)?;
    code::check_size(task_bytes)?;
    let mut trees = runtime.trees;
    trees.push(Tree {
        host: task_staging.clone(),
        guest: TASK_ROOT.into(),
    });
    trees.push(Tree {
        host: code_root.clone(),
        guest: TASK_ROOT.into(),
    });
    let left_out =
        python::resolve_libraries(&mut bundle, &python, trees, &required, &runtime.optional)?;
    if !left_out.is_empty() {
        tracing::warn!(
            ?left_out,
            "standard-library modules left out: their libraries are missing on this host too"
        );
    }

    progress("writing the initramfs");
    let mut builder = InitramfsBuilder::new();
    builder.add_base_layout()?;
    builder.add_file_from_host(&thaw_init, INIT_PATH, 0o755)?;
    bundle.write_into(&mut builder)?;
    builder.add_file(
        FUNCTION_FILE,
        function_file(&name, &spec.handler, &env),
        0o644,
    )?;
    let modules = builder.add_kernel_modules(&kernel, GUEST_MODULES)?;
    let compression = match kernel.kernel_config()? {
        Some(config) => supported_compressions_in(&config)
            .first()
            .copied()
            .unwrap_or(Compression::None),
        // Every kernel Thaw fetches ships its config; gzip is what kernels unpack most often.
        None => Compression::Gzip,
    };
    let cpio = builder.cpio()?;
    let cpio_bytes = cpio.len() as u64;
    drop(builder);
    let data = compression.compress(cpio)?;

    let initramfs_file = initramfs_file_name(compression);
    let manifest = Manifest {
        format: manifest::FORMAT,
        built_by: format!("thaw {}", env!("CARGO_PKG_VERSION")),
        function_name: name,
        runtime: spec.runtime.to_string(),
        handler: spec.handler.to_string(),
        python_version: python.full_version.clone(),
        distributions: manifest::Distributions {
            runtime: pip::distributions(&runtime_site)?,
            function: pip::distributions(&task_staging)?,
        },
        kernel: manifest::KernelInfo {
            package: kernel.package.clone(),
            version: kernel.package_version.clone(),
            release: kernel.release.clone(),
        },
        initramfs: manifest::InitramfsInfo {
            file: initramfs_file.to_owned(),
            size: data.len() as u64,
            sha256: crate::digest::sha256_hex(&data),
        },
    };
    let staged = Staged::new(&spec.out)?;
    staged.write_file(initramfs_file, &data)?;
    staged.write_file(MANIFEST_FILE, manifest.to_json().as_bytes())?;
    staged.publish(spec.replace)?;
    tracing::info!(out = %spec.out.display(), bytes = data.len(), "function image written");
    Ok(BuiltImage {
        dir: spec.out.clone(),
        manifest,
        python_executable: python.executable.clone(),
        guest_site_packages: python.guest_site.clone(),
        libraries: bundle.libraries().clone(),
        left_out,
        files: bundle.files().len(),
        task_bytes,
        cpio_bytes,
        kernel_modules: modules.modules,
    })
}

/// The function's environment: [`DEFAULT_ENV`], then `--env` settings.
fn function_env(settings: &[String]) -> Result<BTreeMap<String, String>, SpecError> {
    let mut env: BTreeMap<String, String> = DEFAULT_ENV
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    env.extend(spec::parse_env(settings)?);
    Ok(env)
}

/// `/etc/thaw/function.json` (hooks-sdk's `FunctionSettings`): AWS's runtime interface client
/// on the handler, initialized for SnapStart.
pub fn function_file(name: &str, handler: &Handler, env: &BTreeMap<String, String>) -> String {
    let handler = handler.to_string();
    let doc = serde_json::json!({
        "runtime": [format!("{}/bin/python3", python::GUEST_PREFIX), "-m", "awslambdaric", handler],
        "init_type": "snap-start",
        "function_name": name,
        "handler": handler,
        "env": env,
    });
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    text.push('\n');
    text
}

/// The code directory, canonical (so `--code .` has a name), checked to be a directory.
fn canonical_code_dir(dir: &Path) -> Result<PathBuf, CodeError> {
    let canonical = dir.canonicalize().map_err(|source| CodeError::Read {
        path: dir.to_owned(),
        source,
    })?;
    if !canonical.is_dir() {
        return Err(CodeError::NotADirectory {
            path: dir.to_owned(),
        });
    }
    Ok(canonical)
}

/// The handler's module must be a file (`pkg/mod.py`) or package (`pkg/mod/__init__.py`) of the
/// code directory.
fn check_handler_module(code: &Path, handler: &Handler) -> Result<(), FunctionImageError> {
    let module_file = handler.module_file();
    let package_file = handler.package_file();
    if code.join(&module_file).is_file() || code.join(&package_file).is_file() {
        return Ok(());
    }
    Err(FunctionImageError::HandlerModuleMissing {
        handler: handler.to_string(),
        module: handler.module.clone(),
        code: code.to_owned(),
        module_file,
        package_file,
    })
}

/// What to leave out of the code: the image directory (and its temporary siblings) when it is
/// inside the code directory.
fn exclude_for(out: &Path) -> Option<code::Exclude> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Some(code::Exclude {
        parent: parent.canonicalize().ok()?,
        name: out.file_name()?.to_string_lossy().into_owned(),
    })
}

/// Debian's current cloud kernel; the cached one when apt cannot be asked (offline builds).
fn kernel_for_build(cache_dir: &Path) -> Result<DebianKernel, FunctionImageError> {
    match guest_image::fetch(cache_dir) {
        Ok(kernel) => Ok(kernel),
        Err(e) => match guest_image::cached(cache_dir) {
            Some(kernel) => {
                tracing::warn!(error = %e, release = %kernel.release, "cannot ask apt for the current kernel; using the cached one");
                Ok(kernel)
            }
            None => Err(FunctionImageError::Kernel(e)),
        },
    }
}

/// The total size of the files in `/var/task`.
fn task_bytes(bundle: &Bundle) -> Result<u64, BundleError> {
    let prefix = format!("{TASK_ROOT}/");
    let mut total = 0;
    for (guest, host) in bundle.files() {
        if guest.starts_with(&prefix) {
            total += std::fs::metadata(host)
                .map_err(|source| BundleError::Read {
                    path: host.clone(),
                    source,
                })?
                .len();
        }
    }
    Ok(total)
}

/// The initramfs's file name for `compression`.
pub fn initramfs_file_name(compression: Compression) -> &'static str {
    match compression {
        Compression::Zstd => "initramfs.cpio.zst",
        Compression::Gzip => "initramfs.cpio.gz",
        Compression::None => "initramfs.cpio",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_function_file_runs_awslambdaric_for_snapstart() {
        let handler: Handler = "pkg.app.handler".parse().unwrap();
        let env = function_env(&["STAGE=prod".into(), "PYTHONUNBUFFERED=0".into()]).unwrap();
        let text = function_file("hello", &handler, &env);
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            doc["runtime"],
            serde_json::json!([
                "/var/lang/bin/python3",
                "-m",
                "awslambdaric",
                "pkg.app.handler"
            ])
        );
        assert_eq!(doc["init_type"], "snap-start");
        assert_eq!(doc["function_name"], "hello");
        assert_eq!(doc["handler"], "pkg.app.handler");
        assert_eq!(
            doc["env"],
            serde_json::json!({
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONUNBUFFERED": "0",
                "STAGE": "prod",
            })
        );
        // Only fields thaw-init's function file knows (it refuses unknown ones).
        let keys: Vec<&str> = doc
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            ["env", "function_name", "handler", "init_type", "runtime"]
        );
    }

    #[test]
    fn the_handler_module_must_be_in_the_code() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("pkg/mod")).unwrap();
        std::fs::write(d.join("app.py"), "").unwrap();
        std::fs::write(d.join("pkg/mod/__init__.py"), "").unwrap();
        std::fs::write(d.join("pkg/__init__.py"), "").unwrap();
        std::fs::write(d.join("pkg/other.py"), "").unwrap();
        for ok in [
            "app.handler",
            "pkg.mod.handler",
            "pkg.other.handler",
            "pkg.handler",
        ] {
            check_handler_module(d, &ok.parse().unwrap()).unwrap();
        }
        let err = check_handler_module(d, &"missing.handler".parse().unwrap()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("missing.py") && text.contains("missing/__init__.py"),
            "{text}"
        );
    }

    #[test]
    fn compression_names_the_file() {
        assert_eq!(initramfs_file_name(Compression::Zstd), "initramfs.cpio.zst");
        assert_eq!(initramfs_file_name(Compression::Gzip), "initramfs.cpio.gz");
        assert_eq!(initramfs_file_name(Compression::None), "initramfs.cpio");
        for c in Compression::PREFERENCE {
            assert!(manifest::INITRAMFS_FILES.contains(&initramfs_file_name(c)));
        }
    }
}

//! Installing Python distributions from PyPI with the runtime's own pip, `--target` a staging
//! directory (what Lambda users do with `pip install -t .`): the runtime's packages for its
//! site-packages, the function's requirements for `/var/task`. The interpreter that will run
//! them picks the wheels, so compiled packages match it; pip's cache makes rebuilds fast.
//! Then the distributions installed, with their versions, for the image's manifest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use super::python::tail;

/// The runtime's own packages: AWS's runtime interface client and its SnapStart hooks library.
/// `scripts/deps.sh` installs the same versions on the host for hooks-sdk's tests, and says so.
pub const RUNTIME_PACKAGES: &[&str] = &["awslambdaric==4.2.2", "snapshot-restore-py==1.0.0"];

/// How much of pip's output an error keeps.
const OUTPUT_TAIL: usize = 3000;

/// What to install.
#[derive(Debug, Clone, Copy)]
pub enum Install<'a> {
    /// Requirement specifiers (`name==version`).
    Packages(&'a [&'a str]),
    /// A requirements file (`-r FILE`).
    Requirements(&'a Path),
}

impl Install<'_> {
    fn describe(&self) -> String {
        match self {
            Self::Packages(packages) => format!("the runtime's packages ({})", packages.join(" ")),
            Self::Requirements(file) => format!("the requirements in {}", file.display()),
        }
    }
}

/// pip did not install what was asked.
#[derive(Debug, thiserror::Error)]
pub enum PipError {
    /// pip could not be started.
    #[error("cannot run {} -m pip", python.display())]
    Start {
        /// The interpreter.
        python: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// pip failed.
    #[error("pip could not install {what} ({status}); pip said:\n{output}")]
    Failed {
        /// What was being installed.
        what: String,
        /// pip's exit status.
        status: ExitStatus,
        /// The end of pip's output.
        output: String,
    },
    /// An installed distribution's metadata could not be read.
    #[error("cannot read the installed distributions in {}", path.display())]
    Metadata {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Runs `python -m pip install --target target ...` in `cwd` (so relative paths in a
/// requirements file mean what they mean when the user runs pip in the code directory).
pub fn install(
    python: &Path,
    target: &Path,
    what: Install<'_>,
    cwd: &Path,
) -> Result<(), PipError> {
    let mut cmd = Command::new(python);
    cmd.args(["-m", "pip", "install", "--target"])
        .arg(target)
        .args(["--no-compile", "--disable-pip-version-check", "--no-input"])
        .current_dir(cwd)
        // pip's advice against running as root is about the system's site-packages, which a
        // --target install never touches.
        .env("PIP_ROOT_USER_ACTION", "ignore");
    match what {
        Install::Packages(packages) => {
            cmd.args(packages);
        }
        Install::Requirements(file) => {
            cmd.arg("-r").arg(file);
        }
    }
    tracing::info!(what = %what.describe(), target = %target.display(), "pip install");
    let out = cmd.output().map_err(|source| PipError::Start {
        python: python.to_owned(),
        source,
    })?;
    if out.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Err(PipError::Failed {
        what: what.describe(),
        status: out.status,
        output: tail(text.trim_end(), OUTPUT_TAIL).to_owned(),
    })
}

/// The distributions installed in `dir` (by pip, `--target`): name → version, from each
/// `*.dist-info/METADATA`.
pub fn distributions(dir: &Path) -> Result<BTreeMap<String, String>, PipError> {
    let meta_err = |path: &Path| {
        let path = path.to_owned();
        move |source| PipError::Metadata { path, source }
    };
    let mut found = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(meta_err(dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(meta_err(dir))?.path();
        if !path.to_string_lossy().ends_with(".dist-info") {
            continue;
        }
        let metadata = path.join("METADATA");
        let text = std::fs::read_to_string(&metadata).map_err(meta_err(&metadata))?;
        if let Some((name, version)) = name_and_version(&text) {
            found.insert(name, version);
        }
    }
    Ok(found)
}

/// `Name:` and `Version:` from a core-metadata file's headers (which end at the first blank
/// line).
fn name_and_version(metadata: &str) -> Option<(String, String)> {
    let mut name = None;
    let mut version = None;
    for line in metadata.lines().take_while(|l| !l.trim().is_empty()) {
        if let Some(v) = line.strip_prefix("Name:") {
            name = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("Version:") {
            version = Some(v.trim().to_owned());
        }
    }
    Some((name?, version?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn distributions_come_from_dist_info_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("tabulate-0.9.0.dist-info")).unwrap();
        std::fs::write(
            d.join("tabulate-0.9.0.dist-info/METADATA"),
            "Metadata-Version: 2.1\nName: tabulate\nVersion: 0.9.0\n\nName: not-a-header\n",
        )
        .unwrap();
        std::fs::create_dir_all(d.join("broken-1.dist-info")).unwrap();
        std::fs::write(d.join("broken-1.dist-info/METADATA"), "Summary: x\n").unwrap();
        std::fs::create_dir_all(d.join("tabulate")).unwrap();
        let found = distributions(d).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found["tabulate"], "0.9.0");
        assert!(distributions(&d.join("missing")).unwrap().is_empty());
        std::fs::create_dir_all(d.join("nometa-1.dist-info")).unwrap();
        assert!(matches!(distributions(d), Err(PipError::Metadata { .. })));
    }

    #[test]
    fn runtime_packages_are_pinned() {
        for package in RUNTIME_PACKAGES {
            assert!(package.contains("=="), "{package} is not pinned");
        }
        // scripts/deps.sh installs the same versions on the host for hooks-sdk's tests.
        let deps = include_str!("../../scripts/deps.sh");
        for package in RUNTIME_PACKAGES {
            assert!(deps.contains(package), "scripts/deps.sh lacks {package}");
        }
    }
}

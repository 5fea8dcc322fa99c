//! Debian packages through apt, for what Thaw takes from Debian rather than from a hard-coded
//! address: the guest kernel, and the nested-KVM host's QEMU and busybox. Packages are resolved
//! and downloaded with the host's own apt (so its mirrors and signing keys), checked against
//! the SHA-256 in apt's index, and unpacked with `dpkg-deb -x` into a directory of the caller's,
//! never installed. Output of apt's tools is parsed, so they run in the C locale.
//!
//! When apt's package lists are missing or stale and Thaw runs as root, `apt-get update` runs
//! once per [`Apt`] before giving up.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};

use tracing::{debug, info};

/// How much of a failed command's stderr an error keeps.
const STDERR_LIMIT: usize = 4096;

/// Why a package could not be resolved, downloaded or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum AptError {
    /// An apt or dpkg tool is not installed.
    #[error(
        "`{program}` is not installed: Thaw takes packages from Debian with apt-get, apt-cache \
         and dpkg-deb, so it needs a Debian-based host"
    )]
    Unavailable {
        /// The missing program.
        program: &'static str,
        /// The error from starting it.
        #[source]
        source: io::Error,
    },
    /// A tool could not be started for another reason.
    #[error("cannot run `{program}`")]
    Spawn {
        /// The program.
        program: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// apt's answers did not lead to a package and version.
    #[error("apt cannot resolve {package}: {detail}")]
    Resolve {
        /// The package being resolved.
        package: String,
        /// What went wrong.
        detail: String,
    },
    /// apt's package lists are missing or stale, and Thaw is not root and so cannot update them.
    #[error(
        "apt's package lists do not offer {package}; run `apt-get update` as root and try again \
         ({detail})"
    )]
    PackageListsMissing {
        /// The package apt could not find.
        package: String,
        /// What apt said.
        detail: String,
    },
    /// `apt-get update` failed.
    #[error("`apt-get update` failed ({status}): {stderr}")]
    Update {
        /// Its exit status.
        status: ExitStatus,
        /// Its stderr.
        stderr: String,
    },
    /// `apt-get download` failed.
    #[error("`apt-get download {package}={version}` failed ({status}): {stderr}")]
    Download {
        /// The package.
        package: String,
        /// The version asked for.
        version: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its stderr.
        stderr: String,
    },
    /// `apt-get download` succeeded but the `.deb` is not to be found.
    #[error("`apt-get download {package}` left no .deb file for it in {}", dir.display())]
    DownloadMissing {
        /// The package.
        package: String,
        /// Where it ran.
        dir: PathBuf,
    },
    /// The downloaded package is not the one apt's index describes.
    #[error("{} has SHA-256 {actual}, but apt's package index says {expected}", deb.display())]
    ChecksumMismatch {
        /// The downloaded file.
        deb: PathBuf,
        /// The digest in apt's index.
        expected: String,
        /// The digest of the file.
        actual: String,
    },
    /// `dpkg-deb -x` failed.
    #[error("`dpkg-deb -x {}` failed ({status}): {stderr}", deb.display())]
    Extract {
        /// The package file.
        deb: PathBuf,
        /// Its exit status.
        status: ExitStatus,
        /// Its stderr.
        stderr: String,
    },
    /// A file operation failed.
    #[error("I/O error on {}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AptError + '_ {
    move |source| AptError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A package file apt downloaded, checked against apt's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    /// The package.
    pub package: String,
    /// Its version.
    pub version: String,
    /// The `.deb` file.
    pub deb: PathBuf,
    /// Its SHA-256, hex.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
}

/// The host's apt, remembering whether it already ran `apt-get update`.
#[derive(Debug, Default)]
pub struct Apt {
    updated: bool,
}

impl Apt {
    /// apt, with its package lists not yet updated by Thaw.
    pub fn new() -> Self {
        Self::default()
    }

    /// The version `apt-get download PACKAGE` would fetch (`apt-cache policy`'s candidate).
    pub fn candidate(&mut self, package: &str) -> Result<String, AptError> {
        let mut found = self.candidates(&[package])?;
        found.remove(package).ok_or_else(|| AptError::Resolve {
            package: package.to_owned(),
            detail: "apt-cache policy shows no candidate".to_owned(),
        })
    }

    /// `apt-cache show SPEC`'s output, or `None` if apt knows no such package (version).
    pub fn show(&self, spec: &str) -> Result<Option<String>, AptError> {
        let output = run("apt-cache", &["show", spec], None)?;
        Ok(output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned()))
    }

    /// `apt-cache depends`' output for `packages`: their direct dependencies, without
    /// recommendations, suggestions and conflicts. One call for all (apt loads its whole cache
    /// for each call, which takes about half a second).
    pub fn depends(&self, packages: &[&str]) -> Result<String, AptError> {
        let mut args = vec![
            "depends",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
        ];
        args.extend_from_slice(packages);
        apt_cache(&args, packages)
    }

    /// The candidate versions of `packages`, from one `apt-cache policy`; a package without
    /// one is an error (after an `apt-get update`, as root).
    pub fn candidates(&mut self, packages: &[&str]) -> Result<BTreeMap<String, String>, AptError> {
        loop {
            let mut args = vec!["policy"];
            args.extend_from_slice(packages);
            let found: BTreeMap<String, String> = sections(&apt_cache(&args, packages)?)
                .into_iter()
                .filter_map(|(package, body)| {
                    let package = package.trim_end_matches(':').to_owned();
                    parse_policy_candidate(&body).map(|v| (package, v))
                })
                .collect();
            match packages.iter().find(|p| !found.contains_key(**p)) {
                None => return Ok(found),
                Some(missing) => {
                    self.update_or_fail(missing, "apt-cache policy shows no candidate")?
                }
            }
        }
    }

    /// The packages `roots` need that this host has not installed (the roots themselves
    /// always), with their candidate versions, in a stable order. An alternative (`a | b`) is
    /// satisfied by any installed member, else the first is taken; virtual packages are left
    /// to whatever provides them on the host.
    pub fn missing_closure(&mut self, roots: &[&str]) -> Result<Vec<(String, String)>, AptError> {
        let installed = installed_packages()?;
        let mut wanted: BTreeSet<String> = roots.iter().map(|r| (*r).to_owned()).collect();
        let mut level: Vec<String> = wanted.iter().cloned().collect();
        // One `apt-cache depends` per level of the dependency tree.
        while !level.is_empty() {
            let names: Vec<&str> = level.iter().map(String::as_str).collect();
            let mut next = BTreeSet::new();
            for (_, body) in sections(&self.depends(&names)?) {
                for group in parse_depends_groups(&body) {
                    if group.iter().any(|alt| installed.contains(alt)) {
                        continue;
                    }
                    if let Some(first) = group.into_iter().next() {
                        if wanted.insert(first.clone()) {
                            next.insert(first);
                        }
                    }
                }
            }
            level = next.into_iter().collect();
        }
        let names: Vec<&str> = wanted.iter().map(String::as_str).collect();
        Ok(self.candidates(&names)?.into_iter().collect())
    }

    /// Downloads `package=version` into `dir` and checks it against apt's index.
    pub fn download(
        &mut self,
        package: &str,
        version: &str,
        dir: &Path,
    ) -> Result<Downloaded, AptError> {
        let spec = format!("{package}={version}");
        info!(%spec, "downloading with apt-get");
        loop {
            let output = run("apt-get", &["download", "-q", &spec], Some(dir))?;
            if output.status.success() {
                break;
            }
            let stderr = stderr_text(&output);
            if !looks_like_stale_lists(&stderr) {
                return Err(AptError::Download {
                    package: package.to_owned(),
                    version: version.to_owned(),
                    status: output.status,
                    stderr,
                });
            }
            self.update_or_fail(package, &stderr)?;
        }
        let deb = find_deb(dir, package)?;
        let (sha256, size) = File::open(&deb)
            .and_then(crate::digest::sha256_of)
            .map_err(io_err(&deb))?;
        if let Some(expected) = self.show(&spec)?.and_then(|s| stanza_field(&s, "SHA256")) {
            if !expected.eq_ignore_ascii_case(&sha256) {
                return Err(AptError::ChecksumMismatch {
                    deb,
                    expected,
                    actual: sha256,
                });
            }
        }
        Ok(Downloaded {
            package: package.to_owned(),
            version: version.to_owned(),
            deb,
            sha256,
            size,
        })
    }

    /// Runs `apt-get update` once if the lists seem missing and we are root; otherwise the error.
    fn update_or_fail(&mut self, package: &str, detail: &str) -> Result<(), AptError> {
        if self.updated || !running_as_root() {
            return Err(AptError::PackageListsMissing {
                package: package.to_owned(),
                detail: detail.to_owned(),
            });
        }
        self.updated = true;
        info!("apt's package lists are missing or stale; running `apt-get update`");
        let output = run("apt-get", &["update", "-q"], None)?;
        if output.status.success() {
            Ok(())
        } else {
            Err(AptError::Update {
                status: output.status,
                stderr: stderr_text(&output),
            })
        }
    }
}

/// `apt-cache ARGS`' output; a failure is an error about `packages`.
fn apt_cache(args: &[&str], packages: &[&str]) -> Result<String, AptError> {
    let output = run("apt-cache", args, None)?;
    if !output.status.success() {
        return Err(AptError::Resolve {
            package: packages.join(" "),
            detail: format!(
                "`apt-cache {}` failed ({}): {}",
                args.first().copied().unwrap_or_default(),
                output.status,
                stderr_text(&output)
            ),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Unpacks a package's files into `dest` (`dpkg-deb -x`: no maintainer scripts run).
pub fn extract(deb: &Path, dest: &Path) -> Result<(), AptError> {
    let output = run(
        "dpkg-deb",
        &["-x", &deb.to_string_lossy(), &dest.to_string_lossy()],
        None,
    )?;
    if output.status.success() {
        Ok(())
    } else {
        Err(AptError::Extract {
            deb: deb.to_owned(),
            status: output.status,
            stderr: stderr_text(&output),
        })
    }
}

/// The sections of `apt-cache` output for several packages: each starts with the package's
/// name at the start of a line, its details indented below.
fn sections(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if !line.starts_with([' ', '\t']) && !line.trim().is_empty() {
            out.push((line.trim().to_owned(), String::new()));
        } else if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

/// The packages dpkg has installed (`install ok installed`).
fn installed_packages() -> Result<BTreeSet<String>, AptError> {
    let output = run(
        "dpkg-query",
        &["-W", "-f", "${Package}\t${db:Status-Abbrev}\n"],
        None,
    )?;
    Ok(parse_installed(&String::from_utf8_lossy(&output.stdout)))
}

fn parse_installed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(_, status)| status.starts_with("ii"))
        .map(|(package, _)| package.to_owned())
        .collect()
}

/// The dependency groups (`Depends`/`PreDepends`) in `apt-cache depends` output: each group is
/// its alternatives in order (a line starting with `|` continues into the next), real packages
/// only (`<virtual>` names are dropped).
pub fn parse_depends_groups(text: &str) -> Vec<Vec<String>> {
    let mut groups = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut open = false;
    for line in text.lines() {
        let trimmed = line.trim();
        let (alternative, rest) = match trimmed.strip_prefix('|') {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        let Some((kind, name)) = rest.split_once(':') else {
            continue;
        };
        if !matches!(kind.trim(), "Depends" | "PreDepends") {
            continue;
        }
        let name = name.trim();
        if !name.starts_with('<') {
            current.push(name.split(':').next().unwrap_or(name).to_owned());
        }
        open = alternative;
        if !open {
            groups.push(std::mem::take(&mut current));
        }
    }
    if open {
        groups.push(current);
    }
    groups.retain(|g| !g.is_empty());
    groups
}

/// `Candidate:` from `apt-cache policy` output; `(none)` is no candidate.
pub fn parse_policy_candidate(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .find(|v| !v.is_empty())
        .filter(|v| *v != "(none)")
        .map(str::to_owned)
}

/// The value of `field` in the first stanza of `apt-cache show` output, continuation lines joined.
pub fn stanza_field(text: &str, field: &str) -> Option<String> {
    let stanza = text.split("\n\n").find(|s| !s.trim().is_empty())?;
    let mut lines = stanza.lines().peekable();
    while let Some(line) = lines.next() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if line.starts_with([' ', '\t']) || !name.eq_ignore_ascii_case(field) {
            continue;
        }
        let mut value = value.trim().to_owned();
        while let Some(next) = lines.next_if(|l| l.starts_with([' ', '\t'])) {
            value.push(' ');
            value.push_str(next.trim());
        }
        return Some(value);
    }
    None
}

/// Whether stderr from `apt-get download` means the lists do not know the package (version).
fn looks_like_stale_lists(stderr: &str) -> bool {
    [
        "Unable to locate package",
        "has no installation candidate",
        "Can't find a source to download",
        "was not found",
        "404",
    ]
    .iter()
    .any(|needle| stderr.contains(needle))
}

/// The `.deb` `apt-get download PACKAGE` left in `dir` (named `PACKAGE_VERSION_ARCH.deb`).
fn find_deb(dir: &Path, package: &str) -> Result<PathBuf, AptError> {
    let prefix = format!("{package}_");
    let mut debs: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .collect();
    debs.sort();
    debs.into_iter()
        .next()
        .ok_or_else(|| AptError::DownloadMissing {
            package: package.to_owned(),
            dir: dir.to_owned(),
        })
}

fn stderr_text(output: &Output) -> String {
    let text = String::from_utf8_lossy(&output.stderr);
    let text = text.trim();
    let mut start = text.len().saturating_sub(STDERR_LIMIT);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

/// Runs an apt or dpkg tool in the C locale (its output is parsed), with no stdin.
fn run(program: &'static str, args: &[&str], cwd: Option<&Path>) -> Result<Output, AptError> {
    debug!(program, ?args, cwd = ?cwd, "running");
    let mut command = Command::new(program);
    command
        .args(args)
        .env("LC_ALL", "C")
        .env("LANGUAGE", "C")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    command.output().map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            AptError::Unavailable { program, source }
        } else {
            AptError::Spawn { program, source }
        }
    })
}

fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "linux-image-cloud-amd64:\n  Installed: (none)\n  Candidate: 6.1.192-2\n  \
        Version table:\n     6.1.192-2 500\n        500 http://deb.debian.org/debian-security \
        bookworm-security/main amd64 Packages\n     6.1.176-1 500\n";

    #[test]
    fn parses_candidate_from_apt_cache_policy() {
        assert_eq!(parse_policy_candidate(POLICY).as_deref(), Some("6.1.192-2"));
        assert_eq!(
            parse_policy_candidate("foo:\n  Installed: (none)\n  Candidate: (none)\n"),
            None
        );
        assert_eq!(parse_policy_candidate(""), None);
    }

    #[test]
    fn stanza_fields_join_continuation_lines_and_stop_at_the_first_stanza() {
        let show = "Package: a\nDepends: b,\n c\nSHA256: 00be\n\nPackage: a\nSHA256: ff\n";
        assert_eq!(stanza_field(show, "SHA256").as_deref(), Some("00be"));
        assert_eq!(stanza_field(show, "depends").as_deref(), Some("b, c"));
        assert_eq!(stanza_field(show, "Missing"), None);
    }

    #[test]
    fn depends_groups_keep_alternatives_together_and_drop_virtual_names() {
        let text = "qemu-system-x86\n  Depends: libaio1\n |Depends: debconf\n  \
            Depends: <debconf-2.0>\n    cdebconf\n  PreDepends: libc6\n  Depends: <virt>\n  \
            Recommends: ovmf\n  Depends: libfoo:amd64\n";
        assert_eq!(
            parse_depends_groups(text),
            vec![
                vec!["libaio1".to_owned()],
                vec!["debconf".to_owned()],
                vec!["libc6".to_owned()],
                vec!["libfoo".to_owned()],
            ]
        );
        assert!(parse_depends_groups("x\n").is_empty());
    }

    #[test]
    fn output_for_several_packages_splits_into_sections() {
        let policy = "a:\n  Installed: (none)\n  Candidate: 1.0\nb:\n  Candidate: (none)\n";
        let parts = sections(policy);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].0, "a:");
        assert_eq!(parse_policy_candidate(&parts[0].1).as_deref(), Some("1.0"));
        assert_eq!(parse_policy_candidate(&parts[1].1), None);
        let depends = "a\n  Depends: c\n |Depends: d\n  Depends: e\nb\n  PreDepends: f\n";
        let parts = sections(depends);
        assert_eq!(parse_depends_groups(&parts[0].1).len(), 2);
        assert_eq!(parts[1].0, "b");
    }

    #[test]
    fn installed_means_install_ok_installed() {
        let text = "libc6\tii \nqemu-utils\tii \nold\trc \nhalf\tiU \n";
        let installed = parse_installed(text);
        assert!(installed.contains("libc6") && installed.contains("qemu-utils"));
        assert!(!installed.contains("old") && !installed.contains("half"));
    }

    #[test]
    fn stale_list_errors_are_recognized() {
        assert!(looks_like_stale_lists(
            "E: Unable to locate package linux-image-x"
        ));
        assert!(looks_like_stale_lists(
            "E: Failed to fetch http://x/pool/a.deb  404  Not Found [IP: 1.2.3.4 80]"
        ));
        assert!(!looks_like_stale_lists("E: Could not resolve host"));
    }

    #[test]
    fn finds_the_deb_of_the_package_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("libfoo_1.0_amd64.deb"), b"x").unwrap();
        fs::write(dir.path().join("foo_2.0_amd64.deb"), b"x").unwrap();
        assert_eq!(
            find_deb(dir.path(), "foo").unwrap(),
            dir.path().join("foo_2.0_amd64.deb")
        );
        assert!(matches!(
            find_deb(dir.path(), "bar"),
            Err(AptError::DownloadMissing { .. })
        ));
    }
}

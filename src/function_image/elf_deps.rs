//! The shared libraries an ELF object needs, found the way glibc's dynamic loader finds them on
//! this host, and where each must go in the guest so the guest's loader finds it too. A function
//! image has no `ld.so.cache` and no package manager: it must carry exactly the libraries its
//! interpreter and extension modules load, in directories the loader searches without a cache.
//!
//! Objects are read with the `object` crate (`PT_INTERP`, `DT_NEEDED`, `DT_RPATH`, `DT_RUNPATH`
//! with `$ORIGIN`). A library is placed by how it was found:
//!
//! - in one of the loader's system directories: the same canonical directory in the guest
//!   (`/usr/lib/x86_64-linux-gnu` with a merged `/usr`), under its `DT_NEEDED` name;
//! - through an `$ORIGIN`-relative path: at the same place relative to the object needing it,
//!   so inside one of the relocated [`Tree`]s (a wheel's bundled `.libs`);
//! - anywhere else (an absolute `RUNPATH` such as pyenv's `libpython`, an `ld.so.conf`
//!   directory): `/var/lang/lib`, which the guest's loader searches because `thaw-init` gives the
//!   runtime Lambda's `LD_LIBRARY_PATH` (it starts with `/var/lang/lib`).

use std::collections::{BTreeSet, VecDeque};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use object::elf;
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};

/// Where libraries found outside the loader's system directories go in the guest.
pub const GUEST_LIB_DIR: &str = "/var/lang/lib";

/// glibc's built-in search list on x86-64 (Debian's multiarch directories first, then
/// `/lib64` as other distributions have it).
pub const SYSTEM_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

/// How deep `include` lines of `ld.so.conf` may nest (a loop would otherwise never end).
const MAX_CONF_DEPTH: u32 = 4;

/// An ELF file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// The file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not an x86-64 ELF64 file (another format, class or architecture, or damaged).
    #[error("{} is not an x86-64 ELF file: {reason}", path.display())]
    NotX86_64 {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A needed library could not be found or placed.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// An object, or a library it needs, is not a usable ELF file.
    #[error(transparent)]
    Elf(#[from] ElfError),
    /// No directory the loader searches holds the library.
    #[error("{} needs {library}, which is not installed on this host", object.display())]
    Missing {
        /// The object needing it (perhaps itself a library of the object asked about).
        object: PathBuf,
        /// Its `DT_NEEDED` name.
        library: String,
    },
    /// An `$ORIGIN`-relative path leads outside every relocated tree, so there is no place in
    /// the guest that keeps the same relative position.
    #[error(
        "{} finds {} through $ORIGIN, outside the directories the image relocates",
        object.display(),
        library.display()
    )]
    OriginOutsideTrees {
        /// The object.
        object: PathBuf,
        /// The library found.
        library: PathBuf,
    },
    /// A library's directory could not be resolved to its canonical path.
    #[error("cannot resolve {}", path.display())]
    Canonicalize {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What the dynamic loader reads from one ELF file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ElfDeps {
    /// `DT_NEEDED` names, in order.
    pub needed: Vec<String>,
    /// `DT_RPATH` directories (used only when there is no `DT_RUNPATH`).
    pub rpath: Vec<String>,
    /// `DT_RUNPATH` directories.
    pub runpath: Vec<String>,
    /// `PT_INTERP`: the program interpreter (dynamic loader) an executable asks for.
    pub interpreter: Option<PathBuf>,
}

impl ElfDeps {
    /// Reads `path`, which must be an x86-64 ELF64 file.
    pub fn read(path: &Path) -> Result<Self, ElfError> {
        let data = std::fs::read(path).map_err(|source| ElfError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&data).map_err(|reason| ElfError::NotX86_64 {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses an x86-64 ELF64 file's `PT_INTERP` and dynamic section.
    pub fn parse(data: &[u8]) -> Result<Self, String> {
        let file = ElfFile64::<object::Endianness>::parse(data).map_err(|e| e.to_string())?;
        let endian = file.endian();
        let machine = file.elf_header().e_machine(endian);
        if machine != elf::EM_X86_64 {
            return Err(format!("its machine is {machine}, not x86-64 (62)"));
        }
        let mut deps = Self::default();
        for header in file.elf_program_headers() {
            if let Ok(Some(interp)) = header.interpreter(endian, data) {
                deps.interpreter = Some(PathBuf::from(String::from_utf8_lossy(interp).as_ref()));
            }
        }
        let table = file.elf_dynamic_table().map_err(|e| e.to_string())?;
        for entry in table.iter() {
            if !matches!(entry.tag, elf::DT_NEEDED | elf::DT_RPATH | elf::DT_RUNPATH) {
                continue;
            }
            let value = table.string(entry).map_err(|e| e.to_string())?;
            let value = String::from_utf8_lossy(value).into_owned();
            match entry.tag {
                elf::DT_NEEDED => deps.needed.push(value),
                elf::DT_RPATH => deps.rpath.extend(split_path_list(&value)),
                _ => deps.runpath.extend(split_path_list(&value)),
            }
        }
        Ok(deps)
    }
}

fn split_path_list(list: &str) -> impl Iterator<Item = String> + '_ {
    list.split(':').filter(|s| !s.is_empty()).map(str::to_owned)
}

/// Whether `path` starts with the ELF magic (so it is an executable, library or extension
/// module, whatever its name).
pub fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// A host directory that the image relocates, and where it goes in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    /// The host directory.
    pub host: PathBuf,
    /// Its guest path.
    pub guest: String,
}

/// A library to carry: found on the host, placed in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Library {
    /// Its `DT_NEEDED` name.
    pub needed: String,
    /// The host file.
    pub host: PathBuf,
    /// Where it goes in the guest.
    pub guest: String,
}

/// How a library was found, which decides where it goes in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// In one of the loader's system directories.
    System,
    /// Through an `$ORIGIN`-relative path.
    Origin,
    /// Anywhere else.
    Elsewhere,
}

/// Finds shared libraries as glibc's loader does, minus `LD_LIBRARY_PATH` (the host's is not
/// the guest's): `DT_RPATH` (when there is no `DT_RUNPATH`), `DT_RUNPATH`, the directories of
/// `/etc/ld.so.conf` (what the cache holds), then the system directories. Objects already
/// resolved are remembered, so resolving many extension modules reads each library once.
#[derive(Debug)]
pub struct Resolver {
    trees: Vec<Tree>,
    conf_dirs: Vec<PathBuf>,
    system_dirs: Vec<PathBuf>,
    done: BTreeSet<PathBuf>,
}

impl Resolver {
    /// A resolver for this host (`/etc/ld.so.conf` and glibc's system directories). `trees`
    /// are the relocated directories, most specific first.
    pub fn new(trees: Vec<Tree>) -> Self {
        let mut conf_dirs = Vec::new();
        read_ld_so_conf(Path::new("/etc/ld.so.conf"), &mut conf_dirs, 0);
        Self::with_search_dirs(
            trees,
            conf_dirs,
            SYSTEM_DIRS.iter().map(PathBuf::from).collect(),
        )
    }

    /// A resolver with its own search directories (for tests).
    pub fn with_search_dirs(
        trees: Vec<Tree>,
        conf_dirs: Vec<PathBuf>,
        system_dirs: Vec<PathBuf>,
    ) -> Self {
        Self {
            trees,
            conf_dirs,
            system_dirs,
            done: BTreeSet::new(),
        }
    }

    /// Where a host path under one of the relocated trees is in the guest.
    pub fn guest_of(&self, host: &Path) -> Option<String> {
        self.trees.iter().find_map(|tree| {
            let rel = host.strip_prefix(&tree.host).ok()?;
            Some(if rel.as_os_str().is_empty() {
                tree.guest.clone()
            } else {
                format!("{}/{}", tree.guest, rel.display())
            })
        })
    }

    /// The libraries `object` needs, transitively; the dependencies of objects an earlier call
    /// already walked are not read or returned again. All or nothing: when one is missing,
    /// nothing is remembered and the error names it.
    pub fn resolve(&mut self, object: &Path) -> Result<Vec<Library>, ResolveError> {
        let mut visited = BTreeSet::new();
        let mut found = Vec::new();
        let mut queue = VecDeque::from([object.to_owned()]);
        while let Some(current) = queue.pop_front() {
            if self.done.contains(&current) || !visited.insert(current.clone()) {
                continue;
            }
            let deps = ElfDeps::read(&current)?;
            for needed in &deps.needed {
                let (host, how) =
                    self.find(needed, &current, &deps)
                        .ok_or_else(|| ResolveError::Missing {
                            object: current.clone(),
                            library: needed.clone(),
                        })?;
                let guest = match how {
                    Found::System => {
                        let dir = host.parent().unwrap_or(Path::new("/"));
                        let dir =
                            dir.canonicalize()
                                .map_err(|source| ResolveError::Canonicalize {
                                    path: dir.to_owned(),
                                    source,
                                })?;
                        format!("{}/{needed}", dir.display())
                    }
                    Found::Origin => {
                        self.guest_of(&host)
                            .ok_or_else(|| ResolveError::OriginOutsideTrees {
                                object: current.clone(),
                                library: host.clone(),
                            })?
                    }
                    Found::Elsewhere => format!("{GUEST_LIB_DIR}/{needed}"),
                };
                found.push(Library {
                    needed: needed.clone(),
                    host: host.clone(),
                    guest,
                });
                queue.push_back(host);
            }
        }
        self.done.extend(visited);
        Ok(found)
    }

    /// The first candidate the loader would take for `needed`, and how it was found.
    fn find(&self, needed: &str, object: &Path, deps: &ElfDeps) -> Option<(PathBuf, Found)> {
        if needed.contains('/') {
            // A path is used as it is, without searching.
            let path = PathBuf::from(needed);
            return path.is_file().then_some((path, Found::Elsewhere));
        }
        let origin = object.parent().unwrap_or(Path::new("/")).to_string_lossy();
        let own = if deps.runpath.is_empty() {
            &deps.rpath
        } else {
            &deps.runpath
        };
        let own = own.iter().map(|dir| {
            let relative = dir.contains("$ORIGIN") || dir.contains("${ORIGIN}");
            let dir = dir
                .replace("${ORIGIN}", &origin)
                .replace("$ORIGIN", &origin);
            let how = if relative {
                Found::Origin
            } else {
                Found::Elsewhere
            };
            (normalize(Path::new(&dir)), how)
        });
        let conf = self.conf_dirs.iter().map(|d| (d.clone(), Found::Elsewhere));
        let system = self.system_dirs.iter().map(|d| (d.clone(), Found::System));
        own.chain(conf).chain(system).find_map(|(dir, how)| {
            let path = dir.join(needed);
            // The loader skips files of another architecture or class and keeps searching.
            if !path.is_file() || ElfDeps::read(&path).is_err() {
                return None;
            }
            // A configured directory that is also a system directory counts as the latter.
            let how = match how {
                Found::Elsewhere if self.is_system_dir(&dir) => Found::System,
                how => how,
            };
            Some((path, how))
        })
    }

    fn is_system_dir(&self, dir: &Path) -> bool {
        let Ok(dir) = dir.canonicalize() else {
            return false;
        };
        self.system_dirs
            .iter()
            .any(|s| s.canonicalize().is_ok_and(|s| s == dir))
    }
}

/// `..` and `.` removed lexically (as the loader treats `$ORIGIN/../lib`).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// The directories `ld.so.conf` at `path` lists, following `include` lines (a file, or a
/// `dir/*suffix` glob). Unreadable files are skipped: the loader's cache would lack them too.
fn read_ld_so_conf(path: &Path, out: &mut Vec<PathBuf>, depth: u32) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(pattern) = line.strip_prefix("include") {
            if depth >= MAX_CONF_DEPTH {
                continue;
            }
            let pattern = pattern.trim();
            let Some((dir, suffix)) = pattern.rsplit_once("/*") else {
                read_ld_so_conf(Path::new(pattern), out, depth + 1);
                continue;
            };
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(suffix))
                .collect();
            files.sort();
            for file in files {
                read_ld_so_conf(&file, out, depth + 1);
            }
        } else if line.starts_with('/') {
            out.push(PathBuf::from(line));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::function_image::test_elf::{TinyElf, write_elf};

    #[test]
    fn parse_reads_needed_paths_and_interpreter() {
        let data = TinyElf {
            needed: &["libfoo.so.1", "libc.so.6"],
            runpath: Some("$ORIGIN/../lib:/opt/x"),
            rpath: Some("/old"),
            interp: Some("/lib64/ld-linux-x86-64.so.2"),
            ..TinyElf::default()
        }
        .build();
        let deps = ElfDeps::parse(&data).unwrap();
        assert_eq!(deps.needed, ["libfoo.so.1", "libc.so.6"]);
        assert_eq!(deps.runpath, ["$ORIGIN/../lib", "/opt/x"]);
        assert_eq!(deps.rpath, ["/old"]);
        assert_eq!(
            deps.interpreter.as_deref(),
            Some(Path::new("/lib64/ld-linux-x86-64.so.2"))
        );
    }

    #[test]
    fn other_architectures_and_non_elf_files_are_refused() {
        let arm = TinyElf {
            machine: elf::EM_AARCH64,
            ..TinyElf::default()
        }
        .build();
        assert!(ElfDeps::parse(&arm).unwrap_err().contains("not x86-64"));
        assert!(ElfDeps::parse(b"#!/bin/sh\n").is_err());
        assert!(ElfDeps::parse(b"").is_err());
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert!(!is_elf(&script));
        assert!(matches!(
            ElfDeps::read(&script),
            Err(ElfError::NotX86_64 { .. })
        ));
        assert!(matches!(
            ElfDeps::read(&dir.path().join("missing")),
            Err(ElfError::Read { .. })
        ));
    }

    /// A fake host: system directory `sys`, a configured directory `conf`, and a relocated
    /// tree `tree` (→ `/var/lang`) holding an extension module and a bundled `.libs`.
    struct Host {
        dir: tempfile::TempDir,
    }

    impl Host {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            for sub in ["sys", "conf", "tree/ext", "tree/ext/pkg.libs", "abs"] {
                std::fs::create_dir_all(dir.path().join(sub)).unwrap();
            }
            Self { dir }
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.dir.path().join(rel)
        }

        fn elf(&self, rel: &str, spec: TinyElf<'_>) -> PathBuf {
            let path = self.path(rel);
            write_elf(&path, &spec);
            path
        }

        fn resolver(&self) -> Resolver {
            Resolver::with_search_dirs(
                vec![Tree {
                    host: self.path("tree"),
                    guest: "/var/lang".into(),
                }],
                vec![self.path("conf")],
                vec![self.path("sys")],
            )
        }
    }

    #[test]
    fn libraries_are_placed_by_how_the_loader_finds_them() {
        let host = Host::new();
        host.elf("sys/libc.so.6", TinyElf::default());
        host.elf(
            "sys/libz.so.1",
            TinyElf {
                needed: &["libc.so.6"],
                ..TinyElf::default()
            },
        );
        host.elf(
            "tree/ext/pkg.libs/libbundled.so",
            TinyElf {
                needed: &["libz.so.1"],
                ..TinyElf::default()
            },
        );
        host.elf("abs/libpython.so", TinyElf::default());
        host.elf("conf/libconf.so", TinyElf::default());
        let module = host.elf(
            "tree/ext/mod.so",
            TinyElf {
                needed: &["libbundled.so", "libpython.so", "libconf.so"],
                runpath: Some(&format!("$ORIGIN/pkg.libs:{}", host.path("abs").display())),
                ..TinyElf::default()
            },
        );
        let mut resolver = host.resolver();
        let libs = resolver.resolve(&module).unwrap();
        let placed: Vec<(&str, &str)> = libs
            .iter()
            .map(|l| (l.needed.as_str(), l.guest.as_str()))
            .collect();
        let sys = host.path("sys").canonicalize().unwrap();
        let z = format!("{}/libz.so.1", sys.display());
        let c = format!("{}/libc.so.6", sys.display());
        assert_eq!(
            placed,
            [
                ("libbundled.so", "/var/lang/ext/pkg.libs/libbundled.so"),
                ("libpython.so", "/var/lang/lib/libpython.so"),
                ("libconf.so", "/var/lang/lib/libconf.so"),
                ("libz.so.1", z.as_str()),
                ("libc.so.6", c.as_str()),
            ]
        );
        // Walked objects are remembered: a second object needing libz gets libz, not libc again.
        let other = host.elf(
            "tree/ext/other.so",
            TinyElf {
                needed: &["libz.so.1"],
                ..TinyElf::default()
            },
        );
        let again = resolver.resolve(&other).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].needed, "libz.so.1");
    }

    #[test]
    fn runpath_hides_rpath_and_wrong_architectures_are_skipped() {
        let host = Host::new();
        // Found through DT_RPATH, but DT_RUNPATH is present, so the loader never looks there.
        host.elf("abs/libx.so", TinyElf::default());
        // First in the search order, but for another architecture: skipped.
        host.elf(
            "conf/libx.so",
            TinyElf {
                machine: elf::EM_AARCH64,
                ..TinyElf::default()
            },
        );
        host.elf("sys/libx.so", TinyElf::default());
        let abs = host.path("abs");
        let module = host.elf(
            "tree/m.so",
            TinyElf {
                needed: &["libx.so"],
                rpath: Some(&abs.display().to_string()),
                runpath: Some("$ORIGIN/nowhere"),
                ..TinyElf::default()
            },
        );
        let libs = host.resolver().resolve(&module).unwrap();
        assert_eq!(libs.len(), 1);
        assert_eq!(libs[0].host, host.path("sys/libx.so"));
    }

    #[test]
    fn a_missing_library_is_named_with_the_object_needing_it() {
        let host = Host::new();
        host.elf(
            "sys/liba.so",
            TinyElf {
                needed: &["libmissing.so.3"],
                ..TinyElf::default()
            },
        );
        let module = host.elf(
            "tree/m.so",
            TinyElf {
                needed: &["liba.so"],
                ..TinyElf::default()
            },
        );
        let mut resolver = host.resolver();
        match resolver.resolve(&module) {
            Err(ResolveError::Missing { object, library }) => {
                assert_eq!(object, host.path("sys/liba.so"));
                assert_eq!(library, "libmissing.so.3");
            }
            other => panic!("{other:?}"),
        }
        // Nothing was remembered: once the library exists, resolving works.
        host.elf("sys/libmissing.so.3", TinyElf::default());
        assert_eq!(resolver.resolve(&module).unwrap().len(), 2);
    }

    #[test]
    fn origin_outside_the_trees_is_an_error() {
        let host = Host::new();
        host.elf("abs/libo.so", TinyElf::default());
        let module = host.elf(
            "tree/m.so",
            TinyElf {
                needed: &["libo.so"],
                runpath: Some("$ORIGIN/../abs"),
                ..TinyElf::default()
            },
        );
        assert!(matches!(
            host.resolver().resolve(&module),
            Err(ResolveError::OriginOutsideTrees { .. })
        ));
    }

    #[test]
    fn ld_so_conf_includes_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("conf.d")).unwrap();
        std::fs::write(
            d.join("ld.so.conf"),
            format!("# comment\ninclude {}/conf.d/*.conf\n/first\n", d.display()),
        )
        .unwrap();
        std::fs::write(d.join("conf.d/b.conf"), "/b # trailing\n").unwrap();
        std::fs::write(d.join("conf.d/a.conf"), "/a\nrelative\n").unwrap();
        std::fs::write(d.join("conf.d/ignored.txt"), "/ignored\n").unwrap();
        // An include loop ends at the depth limit.
        std::fs::write(
            d.join("conf.d/loop.conf"),
            format!("include {}/ld.so.conf\n", d.display()),
        )
        .unwrap();
        let mut out = Vec::new();
        read_ld_so_conf(&d.join("ld.so.conf"), &mut out, 0);
        assert_eq!(out[..2], [PathBuf::from("/a"), "/b".into()][..]);
        assert_eq!(out.last(), Some(&PathBuf::from("/first")));
        assert!(!out.contains(&PathBuf::from("/ignored")));
        assert!(!out.contains(&PathBuf::from("relative")));
        assert!(out.len() < 20, "{out:?}");
    }
}

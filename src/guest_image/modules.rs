//! Kernel module lookup for guest images: module names to files under `lib/modules/<release>`,
//! with their dependencies in load order. The index comes from `modules.dep` when there is one;
//! Debian's kernel packages leave `modules.dep` to `depmod` at install time and Thaw never
//! installs them (nor needs `kmod` on the host), so otherwise the same list is worked out from
//! each module's own `.modinfo` section (`depends=`, written by the kernel's `modpost`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

/// The dependency list `depmod` writes, relative to the modules directory.
pub const MODULES_DEP: &str = "modules.dep";
/// The list of modules built into the kernel image, relative to the modules directory.
pub const MODULES_BUILTIN: &str = "modules.builtin";

/// How a module file is compressed, from its name (`.ko`, `.ko.gz`, `.ko.xz`, `.ko.zst`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ModuleCompression {
    /// A plain `.ko`.
    None,
    /// `.ko.gz`.
    Gzip,
    /// `.ko.xz`.
    Xz,
    /// `.ko.zst`.
    Zstd,
}

impl ModuleCompression {
    const ALL: [Self; 4] = [Self::None, Self::Gzip, Self::Xz, Self::Zstd];

    /// The compression of a module file named `path`, or `None` if it is not a module file.
    pub fn of_path(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| path.ends_with(c.suffix()))
    }

    /// The file-name suffix of a module with this compression.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::None => ".ko",
            Self::Gzip => ".ko.gz",
            Self::Xz => ".ko.xz",
            Self::Zstd => ".ko.zst",
        }
    }

    /// The `CONFIG_MODULE_COMPRESS_*` option that selects this compression.
    fn config_option(self) -> Option<&'static str> {
        match self {
            Self::None => None,
            Self::Gzip => Some("CONFIG_MODULE_COMPRESS_GZIP"),
            Self::Xz => Some("CONFIG_MODULE_COMPRESS_XZ"),
            Self::Zstd => Some("CONFIG_MODULE_COMPRESS_ZSTD"),
        }
    }

    /// Whether a kernel with `config` can load a module file of this compression itself (through
    /// `finit_module(MODULE_INIT_COMPRESSED_FILE)`): it needs `CONFIG_MODULE_DECOMPRESS` and the
    /// kernel was built for that same compression. Without a config, only plain modules count.
    pub fn kernel_can_load(self, config: Option<&super::kconfig::KernelConfig>) -> bool {
        match (self.config_option(), config) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(option), Some(config)) => {
                config.is_builtin("CONFIG_MODULE_DECOMPRESS") && config.is_builtin(option)
            }
        }
    }
}

impl fmt::Display for ModuleCompression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Gzip => "gzip",
            Self::Xz => "xz",
            Self::Zstd => "zstd",
        })
    }
}

/// Why the modules of a kernel could not be indexed or resolved.
#[derive(Debug, thiserror::Error)]
pub enum ModuleIndexError {
    /// A file of the modules directory could not be read.
    #[error("cannot read {}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A line of `modules.dep` does not have the `path: dep dep...` shape.
    #[error("{}:{line}: {reason}", path.display())]
    MalformedModulesDep {
        /// The `modules.dep` file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A module file is not an ELF object with a `.modinfo` section.
    #[error("{} is not a loadable kernel module: {reason}", path.display())]
    BadModule {
        /// The module file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A module is compressed in a format this build cannot decompress.
    #[error(
        "{} is {compression}-compressed, which Thaw cannot decompress (it would need another crate)",
        path.display()
    )]
    UnsupportedCompression {
        /// The module file.
        path: PathBuf,
        /// Its compression.
        compression: ModuleCompression,
    },
    /// A compressed module file could not be decompressed.
    #[error("cannot decompress {}", path.display())]
    Decompress {
        /// The module file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A module depends on one that is not in the index.
    #[error("module {module} depends on {dependency}, which is not among the kernel's modules")]
    UnknownDependency {
        /// The depending module (a path or a name).
        module: String,
        /// The missing dependency.
        dependency: String,
    },
    /// A module dependency loop.
    #[error("module {module} depends on itself through its dependencies")]
    DependencyCycle {
        /// A module on the loop.
        module: String,
    },
    /// A module name that is neither a module nor built in.
    #[error("kernel module {name:?} is neither in {} nor built in", modules_dir.join(MODULES_DEP).display())]
    NotFound {
        /// The name asked for.
        name: String,
        /// The kernel's modules directory.
        modules_dir: PathBuf,
    },
}

/// Modules to load, in order, and the names asked for that the kernel has built in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleResolution {
    /// Paths relative to the modules directory, every module after all of its dependencies.
    pub modules: Vec<String>,
    /// Normalized names (`_`, not `-`) of requested modules that are built into the kernel.
    pub builtin: Vec<String>,
}

/// The modules of one kernel, by name, with their dependencies.
#[derive(Debug, Clone)]
pub struct ModuleIndex {
    modules_dir: PathBuf,
    /// Module path (relative) to the paths it depends on, as listed (direct or transitive).
    deps: BTreeMap<String, Vec<String>>,
    /// Normalized module name to module path.
    by_name: BTreeMap<String, String>,
    /// Normalized names of built-in modules.
    builtin: BTreeSet<String>,
    from_modules_dep: bool,
}

/// A module name as the kernel knows it: `-` and `_` are the same (the kernel uses `_`), and a
/// trailing `.ko` (with any compression suffix) is dropped.
pub fn normalize_module_name(name: &str) -> String {
    let base = name.rsplit('/').next().unwrap_or(name);
    let stem = ModuleCompression::of_path(base)
        .and_then(|c| base.strip_suffix(c.suffix()))
        .unwrap_or(base);
    stem.replace('-', "_")
}

/// The module name of a module file path (`kernel/drivers/char/hw_random/virtio-rng.ko` is
/// `virtio_rng`), or `None` if the path does not name a module file.
fn module_name_of_path(path: &str) -> Option<String> {
    ModuleCompression::of_path(path).map(|_| normalize_module_name(path))
}

fn valid_relative_module_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && ModuleCompression::of_path(path).is_some()
}

impl ModuleIndex {
    /// Indexes the modules under `modules_dir` (`.../lib/modules/<release>`): from `modules.dep`
    /// if it exists, else from the modules' own `.modinfo` sections.
    pub fn load(modules_dir: &Path) -> Result<Self, ModuleIndexError> {
        let builtin = read_builtin(modules_dir)?;
        let dep_path = modules_dir.join(MODULES_DEP);
        match std::fs::read_to_string(&dep_path) {
            Ok(text) => {
                let deps = parse_modules_dep(&text).map_err(|(line, reason)| {
                    ModuleIndexError::MalformedModulesDep {
                        path: dep_path.clone(),
                        line,
                        reason,
                    }
                })?;
                Ok(Self::from_parts(modules_dir, deps, builtin, true))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                debug!(dir = %modules_dir.display(), "no modules.dep; reading .modinfo of each module");
                Self::scan(modules_dir, builtin)
            }
            Err(source) => Err(ModuleIndexError::Io {
                path: dep_path,
                source,
            }),
        }
    }

    fn from_parts(
        modules_dir: &Path,
        deps: BTreeMap<String, Vec<String>>,
        builtin: BTreeSet<String>,
        from_modules_dep: bool,
    ) -> Self {
        let mut by_name = BTreeMap::new();
        for path in deps.keys() {
            if let Some(name) = module_name_of_path(path) {
                // Paths are visited in sorted order, so a duplicate name keeps the same winner.
                if let Some(first) = by_name.get(&name) {
                    warn!(%name, %first, ignored = %path, "two module files with one name");
                } else {
                    by_name.insert(name, path.clone());
                }
            }
        }
        Self {
            modules_dir: modules_dir.to_owned(),
            deps,
            by_name,
            builtin,
            from_modules_dep,
        }
    }

    /// Builds the index from each module's `.modinfo` `depends=` list.
    fn scan(modules_dir: &Path, builtin: BTreeSet<String>) -> Result<Self, ModuleIndexError> {
        let mut files = Vec::new();
        collect_module_files(modules_dir, modules_dir, &mut files)?;
        files.sort();
        let mut depends_by_path = BTreeMap::new();
        let mut by_name = BTreeMap::new();
        for rel in &files {
            let path = modules_dir.join(rel);
            let data = read_module(&path)?;
            let info = modinfo(&data).map_err(|reason| ModuleIndexError::BadModule {
                path: path.clone(),
                reason,
            })?;
            let name = info
                .iter()
                .find(|(k, _)| *k == "name")
                .map(|(_, v)| normalize_module_name(v))
                .or_else(|| module_name_of_path(rel))
                .unwrap_or_default();
            let depends: Vec<String> = info
                .iter()
                .filter(|(k, _)| *k == "depends")
                .flat_map(|(_, v)| v.split(','))
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(normalize_module_name)
                .collect();
            by_name.entry(name).or_insert_with(|| rel.clone());
            depends_by_path.insert(rel.clone(), depends);
        }
        let mut deps = BTreeMap::new();
        for (rel, depends) in depends_by_path {
            let paths = depends
                .into_iter()
                .map(|d| {
                    by_name
                        .get(&d)
                        .cloned()
                        .ok_or_else(|| ModuleIndexError::UnknownDependency {
                            module: rel.clone(),
                            dependency: d,
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            deps.insert(rel, paths);
        }
        Ok(Self::from_parts(modules_dir, deps, builtin, false))
    }

    /// The modules directory this index describes.
    pub fn modules_dir(&self) -> &Path {
        &self.modules_dir
    }

    /// Whether the index was read from `modules.dep` (rather than worked out from `.modinfo`).
    pub fn from_modules_dep(&self) -> bool {
        self.from_modules_dep
    }

    /// The number of loadable modules.
    pub fn len(&self) -> usize {
        self.deps.len()
    }

    /// Whether the kernel has no loadable modules.
    pub fn is_empty(&self) -> bool {
        self.deps.is_empty()
    }

    /// The path (relative to the modules directory) of the module called `name`.
    pub fn path_of(&self, name: &str) -> Option<&str> {
        self.by_name
            .get(&normalize_module_name(name))
            .map(String::as_str)
    }

    /// Whether the module called `name` is built into the kernel image.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize_module_name(name))
    }

    /// The modules named (and everything they depend on, transitively) in an order that loads
    /// every module after its dependencies; names of built-in modules are set aside.
    pub fn resolve(&self, names: &[&str]) -> Result<ModuleResolution, ModuleIndexError> {
        let mut resolution = ModuleResolution::default();
        let mut state = BTreeMap::new();
        for name in names {
            let normalized = normalize_module_name(name);
            if let Some(path) = self.by_name.get(&normalized) {
                self.visit(path, &mut state, &mut resolution.modules)?;
            } else if self.builtin.contains(&normalized) {
                if !resolution.builtin.contains(&normalized) {
                    resolution.builtin.push(normalized);
                }
            } else {
                return Err(ModuleIndexError::NotFound {
                    name: (*name).to_owned(),
                    modules_dir: self.modules_dir.clone(),
                });
            }
        }
        Ok(resolution)
    }

    fn visit<'a>(
        &'a self,
        path: &'a str,
        state: &mut BTreeMap<&'a str, bool>,
        order: &mut Vec<String>,
    ) -> Result<(), ModuleIndexError> {
        match state.get(path) {
            Some(true) => return Ok(()),
            Some(false) => {
                return Err(ModuleIndexError::DependencyCycle {
                    module: path.to_owned(),
                });
            }
            None => {}
        }
        state.insert(path, false);
        let deps = self.deps.get(path).map(Vec::as_slice).unwrap_or_default();
        for dep in deps {
            if !self.deps.contains_key(dep) {
                return Err(ModuleIndexError::UnknownDependency {
                    module: path.to_owned(),
                    dependency: dep.clone(),
                });
            }
            self.visit(dep, state, order)?;
        }
        state.insert(path, true);
        order.push(path.to_owned());
        Ok(())
    }

    /// The index as `modules.dep` text in `depmod`'s format: every module with all of its
    /// dependencies, transitively, the one to load last first.
    pub fn to_modules_dep(&self) -> Result<String, ModuleIndexError> {
        let mut out = String::new();
        for path in self.deps.keys() {
            let mut order = Vec::new();
            self.visit(path, &mut BTreeMap::new(), &mut order)?;
            order.pop();
            out.push_str(path);
            out.push(':');
            for dep in order.iter().rev() {
                out.push(' ');
                out.push_str(dep);
            }
            out.push('\n');
        }
        Ok(out)
    }
}

/// Parses `modules.dep`; errors are `(line number, reason)`.
fn parse_modules_dep(text: &str) -> Result<BTreeMap<String, Vec<String>>, (usize, String)> {
    let mut deps = BTreeMap::new();
    for (idx, line) in text.lines().enumerate() {
        let line_no = idx + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((module, rest)) = line.split_once(':') else {
            return Err((line_no, "no ':' after the module path".to_owned()));
        };
        let module = module.trim();
        let listed: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
        for path in std::iter::once(module).chain(listed.iter().map(String::as_str)) {
            if !valid_relative_module_path(path) {
                return Err((line_no, format!("{path:?} is not a relative module path")));
            }
        }
        if deps.insert(module.to_owned(), listed).is_some() {
            return Err((line_no, format!("{module} is listed twice")));
        }
    }
    Ok(deps)
}

fn read_builtin(modules_dir: &Path) -> Result<BTreeSet<String>, ModuleIndexError> {
    let path = modules_dir.join(MODULES_BUILTIN);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text
            .lines()
            .map(str::trim)
            .filter_map(module_name_of_path)
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(source) => Err(ModuleIndexError::Io { path, source }),
    }
}

/// Collects the paths, relative to `base`, of module files under `dir` (symlinks not followed).
fn collect_module_files(
    base: &Path,
    dir: &Path,
    out: &mut Vec<String>,
) -> Result<(), ModuleIndexError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ModuleIndexError::Io { path, source }
    };
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(io_err(&path))?;
        if file_type.is_dir() {
            collect_module_files(base, &path, out)?;
        } else if file_type.is_file() {
            let rel = path
                .strip_prefix(base)
                .ok()
                .and_then(Path::to_str)
                .filter(|rel| ModuleCompression::of_path(rel).is_some());
            if let Some(rel) = rel {
                out.push(rel.to_owned());
            }
        }
    }
    Ok(())
}

/// Reads a module file, decompressing gzip and zstd.
fn read_module(path: &Path) -> Result<Vec<u8>, ModuleIndexError> {
    let data = std::fs::read(path).map_err(|source| ModuleIndexError::Io {
        path: path.to_owned(),
        source,
    })?;
    let compression = path
        .to_str()
        .and_then(ModuleCompression::of_path)
        .unwrap_or(ModuleCompression::None);
    decompress_module(path, compression, data)
}

/// Decompresses the contents of a module file of the given compression.
pub fn decompress_module(
    path: &Path,
    compression: ModuleCompression,
    data: Vec<u8>,
) -> Result<Vec<u8>, ModuleIndexError> {
    let decompress_err = |source| ModuleIndexError::Decompress {
        path: path.to_owned(),
        source,
    };
    match compression {
        ModuleCompression::None => Ok(data),
        ModuleCompression::Gzip => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(data.as_slice())
                .read_to_end(&mut out)
                .map_err(decompress_err)?;
            Ok(out)
        }
        ModuleCompression::Zstd => zstd::decode_all(data.as_slice()).map_err(decompress_err),
        ModuleCompression::Xz => Err(ModuleIndexError::UnsupportedCompression {
            path: path.to_owned(),
            compression,
        }),
    }
}

/// The `(key, value)` pairs of a kernel module's `.modinfo` section.
fn modinfo(data: &[u8]) -> Result<Vec<(&str, &str)>, String> {
    use object::{Object, ObjectSection};
    let file = object::File::parse(data).map_err(|e| format!("not a valid ELF object: {e}"))?;
    let section = file
        .section_by_name(".modinfo")
        .ok_or_else(|| "no .modinfo section".to_string())?;
    let contents = section
        .data()
        .map_err(|e| format!(".modinfo is unreadable: {e}"))?;
    Ok(contents
        .split(|&b| b == 0)
        .filter_map(|entry| std::str::from_utf8(entry).ok())
        .filter_map(|entry| entry.split_once('='))
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 relocatable object with a `.modinfo` section holding `entries`.
    pub(crate) fn fake_module(entries: &[&str]) -> Vec<u8> {
        let mut modinfo = Vec::new();
        for entry in entries {
            modinfo.extend_from_slice(entry.as_bytes());
            modinfo.push(0);
        }
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let modinfo_off = 64;
        let shstrtab_off = modinfo_off + modinfo.len();
        let shoff = (shstrtab_off + shstrtab.len()).next_multiple_of(8);
        let mut out = vec![0u8; 64];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2; // ELFCLASS64
        out[5] = 1; // little-endian
        out[6] = 1; // EV_CURRENT
        out[0x10..0x12].copy_from_slice(&1u16.to_le_bytes()); // ET_REL
        out[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        out[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        out[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        out[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        out[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        out[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        out.extend_from_slice(&modinfo);
        out.extend_from_slice(shstrtab);
        out.resize(shoff, 0);
        let section = |name: u32, kind: u32, offset: usize, size: usize| {
            let mut sh = [0u8; 64];
            sh[0..4].copy_from_slice(&name.to_le_bytes());
            sh[4..8].copy_from_slice(&kind.to_le_bytes());
            sh[24..32].copy_from_slice(&(offset as u64).to_le_bytes());
            sh[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            sh
        };
        out.extend_from_slice(&[0u8; 64]);
        out.extend_from_slice(&section(1, 1, modinfo_off, modinfo.len()));
        out.extend_from_slice(&section(10, 3, shstrtab_off, shstrtab.len()));
        out
    }

    /// Writes a fake modules directory: `(relative path, depends)` for each module.
    pub(crate) fn fake_modules_dir(
        dir: &Path,
        modules: &[(&str, &str)],
        builtin: &[&str],
        with_modules_dep: bool,
    ) {
        let mut dep = String::new();
        for (rel, depends) in modules {
            let path = dir.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let name = normalize_module_name(rel);
            let elf = fake_module(&[&format!("name={name}"), &format!("depends={depends}")]);
            std::fs::write(&path, elf).unwrap();
            dep.push_str(rel);
            dep.push(':');
            for d in depends.split(',').filter(|d| !d.is_empty()) {
                let (dep_rel, _) = modules
                    .iter()
                    .find(|(r, _)| normalize_module_name(r) == d)
                    .unwrap();
                dep.push(' ');
                dep.push_str(dep_rel);
            }
            dep.push('\n');
        }
        if with_modules_dep {
            std::fs::write(dir.join(MODULES_DEP), dep).unwrap();
        }
        let builtin: String = builtin.iter().map(|b| format!("{b}\n")).collect();
        std::fs::write(dir.join(MODULES_BUILTIN), builtin).unwrap();
    }

    const VSOCK_MODULES: &[(&str, &str)] = &[
        ("kernel/drivers/virtio/virtio.ko", ""),
        ("kernel/drivers/virtio/virtio_ring.ko", ""),
        ("kernel/drivers/virtio/virtio_mmio.ko", "virtio,virtio_ring"),
        ("kernel/net/vmw_vsock/vsock.ko", ""),
        (
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
            "vsock",
        ),
        (
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
            "virtio,vmw_vsock_virtio_transport_common,virtio_ring,vsock",
        ),
        ("kernel/drivers/char/hw_random/virtio-rng.ko", "virtio"),
    ];

    fn assert_deps_first(order: &[String], index: &ModuleIndex) {
        for (i, module) in order.iter().enumerate() {
            for dep in &index.deps[module] {
                let at = order.iter().position(|m| m == dep).unwrap();
                assert!(at < i, "{dep} must load before {module}: {order:?}");
            }
        }
    }

    #[test]
    fn normalizes_dashes_and_module_suffixes() {
        assert_eq!(normalize_module_name("virtio-rng"), "virtio_rng");
        assert_eq!(
            normalize_module_name("kernel/drivers/char/hw_random/virtio-rng.ko.zst"),
            "virtio_rng"
        );
        assert_eq!(normalize_module_name("vsock.ko"), "vsock");
    }

    #[test]
    fn reads_modinfo_of_an_elf_module() {
        let elf = fake_module(&[
            "name=virtio_mmio",
            "depends=virtio,virtio_ring",
            "license=GPL",
        ]);
        let info = modinfo(&elf).unwrap();
        assert!(info.contains(&("depends", "virtio,virtio_ring")));
        assert!(info.contains(&("name", "virtio_mmio")));
    }

    #[test]
    fn rejects_a_module_that_is_not_elf() {
        assert!(modinfo(b"not a module").is_err());
        let mut truncated = fake_module(&["name=x"]);
        truncated.truncate(100);
        assert!(modinfo(&truncated).is_err());
    }

    #[test]
    fn resolves_dependencies_before_dependents_from_modules_dep() {
        let dir = tempfile::tempdir().unwrap();
        fake_modules_dir(dir.path(), VSOCK_MODULES, &[], true);
        let index = ModuleIndex::load(dir.path()).unwrap();
        assert!(index.from_modules_dep());
        let res = index
            .resolve(&["vmw-vsock-virtio-transport", "virtio_mmio"])
            .unwrap();
        assert_eq!(res.modules.len(), 6);
        assert_eq!(
            res.modules.last().unwrap(),
            "kernel/drivers/virtio/virtio_mmio.ko"
        );
        assert_deps_first(&res.modules, &index);
        assert!(res.builtin.is_empty());
    }

    #[test]
    fn works_out_dependencies_from_modinfo_without_modules_dep() {
        let dir = tempfile::tempdir().unwrap();
        fake_modules_dir(dir.path(), VSOCK_MODULES, &[], false);
        let index = ModuleIndex::load(dir.path()).unwrap();
        assert!(!index.from_modules_dep());
        assert_eq!(index.len(), VSOCK_MODULES.len());
        let res = index.resolve(&["vmw_vsock_virtio_transport"]).unwrap();
        assert_eq!(res.modules.len(), 5);
        assert_deps_first(&res.modules, &index);
        assert_eq!(
            index.path_of("virtio-rng"),
            Some("kernel/drivers/char/hw_random/virtio-rng.ko")
        );
    }

    #[test]
    fn generated_modules_dep_lists_transitive_dependencies_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        fake_modules_dir(dir.path(), VSOCK_MODULES, &[], false);
        let index = ModuleIndex::load(dir.path()).unwrap();
        let text = index.to_modules_dep().unwrap();
        assert!(text.contains(
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko\n"
        ));
        std::fs::write(dir.path().join(MODULES_DEP), &text).unwrap();
        let reread = ModuleIndex::load(dir.path()).unwrap();
        assert!(reread.from_modules_dep());
        let a = index.resolve(&["vmw_vsock_virtio_transport"]).unwrap();
        let b = reread.resolve(&["vmw_vsock_virtio_transport"]).unwrap();
        let (a, b): (BTreeSet<_>, BTreeSet<_>) = (
            a.modules.into_iter().collect(),
            b.modules.into_iter().collect(),
        );
        assert_eq!(a, b);
        assert_deps_first(
            &reread
                .resolve(&["vmw_vsock_virtio_transport"])
                .unwrap()
                .modules,
            &reread,
        );
    }

    #[test]
    fn sets_builtin_modules_aside() {
        let dir = tempfile::tempdir().unwrap();
        fake_modules_dir(
            dir.path(),
            &VSOCK_MODULES[3..5],
            &[
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_ring.ko",
            ],
            true,
        );
        let index = ModuleIndex::load(dir.path()).unwrap();
        let res = index
            .resolve(&["virtio", "virtio-ring", "vsock", "virtio"])
            .unwrap();
        assert_eq!(res.builtin, ["virtio", "virtio_ring"]);
        assert_eq!(res.modules, ["kernel/net/vmw_vsock/vsock.ko"]);
    }

    #[test]
    fn unknown_module_name_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        fake_modules_dir(dir.path(), VSOCK_MODULES, &[], true);
        let index = ModuleIndex::load(dir.path()).unwrap();
        let err = index.resolve(&["vsock", "no_such_module"]).unwrap_err();
        assert!(
            matches!(&err, ModuleIndexError::NotFound { name, .. } if name == "no_such_module"),
            "{err}"
        );
    }

    #[test]
    fn detects_dependency_cycles() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MODULES_DEP), "a.ko: b.ko\nb.ko: a.ko\n").unwrap();
        let index = ModuleIndex::load(dir.path()).unwrap();
        let err = index.resolve(&["a"]).unwrap_err();
        assert!(
            matches!(err, ModuleIndexError::DependencyCycle { .. }),
            "{err}"
        );
    }

    #[test]
    fn rejects_malformed_modules_dep() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            "a.ko b.ko\n",
            "../escape.ko:\n",
            "a.ko: /abs/b.ko\n",
            "a.ko:\na.ko:\n",
        ] {
            std::fs::write(dir.path().join(MODULES_DEP), bad).unwrap();
            let err = ModuleIndex::load(dir.path()).unwrap_err();
            assert!(
                matches!(
                    err,
                    ModuleIndexError::MalformedModulesDep { line: 1 | 2, .. }
                ),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn kernel_loads_compressed_modules_only_with_matching_decompression() {
        use super::super::kconfig::KernelConfig;
        let zstd =
            KernelConfig::parse("CONFIG_MODULE_DECOMPRESS=y\nCONFIG_MODULE_COMPRESS_ZSTD=y\n");
        assert!(ModuleCompression::Zstd.kernel_can_load(Some(&zstd)));
        assert!(!ModuleCompression::Xz.kernel_can_load(Some(&zstd)));
        let no_decompress = KernelConfig::parse("CONFIG_MODULE_COMPRESS_ZSTD=y\n");
        assert!(!ModuleCompression::Zstd.kernel_can_load(Some(&no_decompress)));
        assert!(!ModuleCompression::Gzip.kernel_can_load(None));
        assert!(ModuleCompression::None.kernel_can_load(None));
    }

    #[test]
    fn decompresses_gzip_and_zstd_modules_but_not_xz() {
        use std::io::Write;
        let elf = fake_module(&["name=x"]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&elf).unwrap();
        let gz = gz.finish().unwrap();
        let p = Path::new("x.ko.gz");
        assert_eq!(
            decompress_module(p, ModuleCompression::Gzip, gz).unwrap(),
            elf
        );
        let zst = zstd::encode_all(elf.as_slice(), 3).unwrap();
        assert_eq!(
            decompress_module(p, ModuleCompression::Zstd, zst).unwrap(),
            elf
        );
        let err = decompress_module(p, ModuleCompression::Xz, vec![]).unwrap_err();
        assert!(matches!(
            err,
            ModuleIndexError::UnsupportedCompression { .. }
        ));
    }
}

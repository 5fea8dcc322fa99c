//! How thawd jails its workers (`crate::worker::jail` does the jailing inside each one): what
//! it checks and prepares at start-up, and each worker's [`JailSpec`] (its function's files,
//! the unprivileged user, its cgroup and limits).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::config::{FunctionConfig, JailConfig};
use crate::worker::jail::{JailSpec, cgroup2_root, prepare_cgroup_parent};

/// Lambda gives a function one vCPU's worth of CPU time at 1,769 MB, in proportion below and
/// above.
pub const MIB_PER_VCPU: u64 = 1769;
/// The `cpu.max` period, µs.
const CPU_PERIOD_US: u64 = 100_000;
/// A worker's memory beyond its guest's: the VMM, the page server's buffers, the manifest, its
/// stacks. Measured: a jailed worker of the 128 MiB test guest peaked at 19.5 MiB resident in
/// all (10 MiB of it thawd's own mapped binary, 8 MiB guest pages, 1.3 MiB anonymous), so this
/// is a wide margin; it has not been measured with Linux guests yet.
pub const WORKER_OVERHEAD: u64 = 96 << 20;
/// The cgroup below the v2 root that holds thawd's workers' cgroups.
const CGROUP_PARENT: &str = "thawd-workers";

/// The `cpu.max` quota per 100 ms of a function of `memory_mib` (Lambda's ratio), µs.
pub fn cpu_quota_us(memory_mib: u64) -> u64 {
    (memory_mib.saturating_mul(CPU_PERIOD_US) / MIB_PER_VCPU).clamp(1_000, 64 * CPU_PERIOD_US)
}

/// The workers' jail, as the config and the host allow.
#[derive(Debug)]
pub struct Jails {
    config: JailConfig,
    /// The parent of the workers' cgroups, when the host has cgroup v2.
    cgroups: Option<PathBuf>,
    started: AtomicU64,
}

impl Jails {
    /// Checks that workers can be jailed here and prepares what they share: thawd must run as
    /// root, the jail directory exists, and with cgroup v2 the workers' parent cgroup has the
    /// memory and cpu controllers. Without cgroup v2 the workers run without memory and CPU
    /// limits, and this says so.
    pub fn prepare(config: JailConfig) -> Result<Self, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("thawd must run as root to jail its workers (or set jail = false)".into());
        }
        std::fs::create_dir_all(&config.dir)
            .map_err(|e| format!("cannot create {}: {e}", config.dir.display()))?;
        let cgroups = match cgroup2_root() {
            Some(root) if config.cgroups => {
                let parent = root.join(CGROUP_PARENT);
                prepare_cgroup_parent(&root, &parent)
                    .map_err(|e| format!("cannot prepare the cgroup {}: {e}", parent.display()))?;
                sweep_cgroups(&parent);
                Some(parent)
            }
            Some(_) => None,
            None => {
                tracing::warn!(
                    "cgroup v2 is not mounted at /sys/fs/cgroup: workers run without memory.max \
                     and cpu.max (the other jail layers apply)"
                );
                None
            }
        };
        Ok(Self {
            config,
            cgroups,
            started: AtomicU64::new(0),
        })
    }

    /// A jail for `config` as it is, checking and preparing nothing.
    #[cfg(test)]
    fn new(config: JailConfig) -> Self {
        Self {
            config,
            cgroups: None,
            started: AtomicU64::new(0),
        }
    }

    /// The jail of a new worker of `f`.
    pub fn spec_for(&self, f: &FunctionConfig) -> JailSpec {
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        let cgroup = self
            .cgroups
            .as_ref()
            .map(|parent| parent.join(format!("{}-{}-{n}", f.name, std::process::id())));
        let limits = cgroup.is_some();
        JailSpec {
            root: self.config.dir.clone(),
            uid: self.config.uid,
            gid: self.config.gid,
            snapshot: f.snapshot.clone(),
            key_file: f.key_file.clone(),
            cgroup,
            memory_max: limits.then(|| (f.memory_mib << 20) + WORKER_OVERHEAD),
            cpu_max: limits.then(|| {
                if self.config.cpu_limit {
                    cpu_quota_us(f.memory_mib)
                } else {
                    64 * CPU_PERIOD_US
                }
            }),
        }
    }

    /// Removes the cgroups of workers that are gone (a worker killed with its parent leaves its
    /// empty cgroup behind).
    pub fn sweep(&self) {
        if let Some(parent) = &self.cgroups {
            sweep_cgroups(parent);
        }
    }
}

/// Removes every empty cgroup below `parent` (a cgroup with processes cannot be removed).
fn sweep_cgroups(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn function(memory_mib: u64) -> FunctionConfig {
        FunctionConfig {
            name: "f".into(),
            snapshot: "/srv/snap".into(),
            store: None,
            memory_mib,
            timeout: Duration::from_secs(3),
            reserved_concurrency: None,
            key_file: Some("/etc/thawd/f.key".into()),
            memory: super::super::config::MemoryChoice::Shared,
        }
    }

    #[test]
    fn lambdas_cpu_ratio() {
        assert_eq!(cpu_quota_us(1769), 100_000);
        assert_eq!(cpu_quota_us(3538), 200_000);
        assert_eq!(cpu_quota_us(128), 7_235);
        assert_eq!(cpu_quota_us(1), 1_000, "never below 1% of a CPU");
    }

    #[test]
    fn each_worker_gets_its_functions_files_and_its_own_cgroup() {
        let mut jails = Jails::new(JailConfig {
            dir: "/run/thawd/jail".into(),
            uid: 990,
            gid: 991,
            cpu_limit: true,
            cgroups: true,
        });
        let spec = jails.spec_for(&function(128));
        assert_eq!(spec.uid, 990);
        assert_eq!(spec.snapshot, PathBuf::from("/srv/snap"));
        assert_eq!(spec.key_file, Some(PathBuf::from("/etc/thawd/f.key")));
        assert_eq!(spec.cgroup, None, "no cgroup v2: no limits");
        jails.cgroups = Some("/sys/fs/cgroup/thawd-workers".into());
        let a = jails.spec_for(&function(128));
        let b = jails.spec_for(&function(128));
        assert_ne!(a.cgroup, b.cgroup);
        assert_eq!(a.memory_max, Some((128 << 20) + WORKER_OVERHEAD));
        assert_eq!(a.cpu_max, Some(7_235));
        // And the worker gets them as arguments it parses back.
        let args = a.to_args();
        assert!(args.iter().any(|a| a == "--jail-cgroup"));
    }

    #[test]
    fn a_workers_cgroup_gets_its_limits_and_the_parent_its_controllers() {
        let root = tempfile::tempdir().unwrap();
        let parent = root.path().join(CGROUP_PARENT);
        prepare_cgroup_parent(root.path(), &parent).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap(),
            "+memory +cpu"
        );
        assert_eq!(
            std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap(),
            "+memory +cpu"
        );
        std::fs::create_dir(parent.join("gone")).unwrap();
        sweep_cgroups(&parent);
        assert!(!parent.join("gone").exists());
    }
}

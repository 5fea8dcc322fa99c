//! `thaw run`: boot a kernel (or the built-in test guest) with its console on this terminal,
//! like Firecracker's `--no-api --config-file`, but with flags.

use std::path::PathBuf;

use vmm_core::config::{DEFAULT_LINUX_CMDLINE, DiskConfig, KernelSource, VsockConfig};
use vmm_core::machine::ConsoleInput;
use vmm_core::{ExitReason, Machine, MachineConfig, MachineError};

use crate::capture::Sealing;
use crate::control_api::{self, ApiContext, ApiError};

/// What `thaw run` was asked to boot.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// ELF vmlinux or bzImage; `None` boots the built-in test guest.
    pub kernel: Option<PathBuf>,
    /// Initramfs for a kernel.
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `None` takes the default for the image.
    pub cmdline: Option<String>,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// A virtio-vsock device (hybrid vsock over Unix sockets).
    pub vsock: Option<VsockConfig>,
    /// Virtio-block disks, in the order the guest finds them.
    pub disks: Vec<DiskConfig>,
}

/// `thaw run` was asked for something it cannot do.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// An initrd was given for the test guest, which has no use for one.
    #[error("--initrd needs --kernel: the built-in test guest takes no initramfs")]
    InitrdWithoutKernel,
    /// The machine could not be built or run.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// The control socket could not be started.
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl RunOptions {
    /// The machine these options describe.
    pub fn machine_config(&self) -> Result<MachineConfig, RunError> {
        let (kernel, default_cmdline) = match &self.kernel {
            Some(path) => (KernelSource::Path(path.clone()), DEFAULT_LINUX_CMDLINE),
            None if self.initrd.is_some() => return Err(RunError::InitrdWithoutKernel),
            None => (crate::test_guest::kernel(), ""),
        };
        Ok(MachineConfig {
            mem_mib: self.mem_mib,
            vcpus: self.vcpus,
            kernel,
            initrd: self.initrd.clone(),
            cmdline: self
                .cmdline
                .clone()
                .unwrap_or_else(|| default_cmdline.to_string()),
            vsock: self.vsock.clone(),
            disks: self.disks.clone(),
        })
    }
}

/// The control socket `thaw run --api-sock` serves.
#[derive(Debug)]
pub struct ApiOptions {
    /// The Unix socket to create.
    pub path: PathBuf,
    /// How snapshots made through it are sealed.
    pub sealing: Sealing,
}

/// Boots and runs the machine until the guest exits; console output goes to stdout and stdin is
/// forwarded to the guest. With `api`, the control socket serves while the machine runs.
pub fn run(options: &RunOptions, api: Option<ApiOptions>) -> Result<ExitReason, RunError> {
    let config = options.machine_config()?;
    if let Some(api) = &api {
        control_api::check_path(&api.path)?;
    }
    let machine = Machine::create(&config, Box::new(std::io::stdout()))?;
    let _server = match api {
        Some(api) => Some(control_api::start(
            &api.path,
            ApiContext {
                controller: machine.controller(),
                sealing: api.sealing,
                pager: None,
            },
        )?),
        None => None,
    };
    let input: ConsoleInput = Box::new(std::io::stdin());
    Ok(machine.run(Some(input))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_guest_takes_no_initrd() {
        let options = RunOptions {
            initrd: Some("/tmp/initrd".into()),
            mem_mib: 128,
            vcpus: 1,
            ..Default::default()
        };
        assert!(matches!(
            options.machine_config(),
            Err(RunError::InitrdWithoutKernel)
        ));
    }

    #[test]
    fn kernels_get_the_linux_cmdline_by_default() {
        let options = RunOptions {
            kernel: Some("/boot/vmlinuz".into()),
            mem_mib: 256,
            vcpus: 1,
            ..Default::default()
        };
        let config = options.machine_config().unwrap();
        assert_eq!(config.cmdline, DEFAULT_LINUX_CMDLINE);
        let options = RunOptions {
            cmdline: Some("console=ttyS0".into()),
            ..options
        };
        assert_eq!(options.machine_config().unwrap().cmdline, "console=ttyS0");
    }
}

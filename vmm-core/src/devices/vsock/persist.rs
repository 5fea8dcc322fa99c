//! The vsock device's saved state: its configuration (the guest CID). Connections are host
//! sockets and cannot be saved; a restored device starts with none, and the machine then resets
//! the transport so the guest drops its side of them too.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{VsockDevice, VsockError};
use crate::persist::Persist;

/// What a vsock device carries across a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's context id.
    pub guest_cid: u64,
}

/// A vsock device could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum VsockStateError {
    /// The saved CID is reserved or too large.
    #[error("saved vsock guest CID {0} is not usable (3 to 2^32-2)")]
    InvalidCid(u64),
    /// The device could not be created.
    #[error(transparent)]
    Create(#[from] VsockError),
}

impl Persist for VsockDevice {
    type State = VsockState;
    /// The Unix socket path host programs will use with the restored machine.
    type ConstructorArgs<'a> = PathBuf;
    type Error = VsockStateError;

    fn save(&self) -> Result<VsockState, VsockStateError> {
        if self.connection_count() > 0 {
            tracing::info!(
                connections = self.connection_count(),
                "vsock: live connections are not saved; a restore resets the transport"
            );
        }
        Ok(VsockState {
            guest_cid: self.config.guest_cid,
        })
    }

    fn restore(uds_path: PathBuf, state: &VsockState) -> Result<Self, VsockStateError> {
        let cid = u32::try_from(state.guest_cid)
            .ok()
            .filter(|&c| c >= 3 && c != u32::MAX)
            .ok_or(VsockStateError::InvalidCid(state.guest_cid))?;
        Ok(VsockDevice::new(cid, uds_path)?)
    }
}

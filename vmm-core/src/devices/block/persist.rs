//! The block device's saved state: what the guest was told of its disk (size, read-only, id).
//! The disk's bytes are not device state: whoever snapshots the machine keeps the disk (a code
//! image by reference, a written disk by copy) and hands restore a [`Disk`] with the same size.

use serde::{Deserialize, Serialize};

use super::{BlockDevice, BlockError, Disk, SECTOR_SIZE};
use crate::persist::Persist;

/// What a block device carries across a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The disk's size the guest knows, in sectors.
    pub capacity_sectors: u64,
    /// Whether the guest was told the disk is read-only.
    pub read_only: bool,
    /// The serial the guest reads.
    pub id: [u8; 20],
}

/// A block device could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum BlockStateError {
    /// The disk given to restore has another size than the one the guest knows.
    #[error("the guest knows a disk of {saved} sectors, the disk given has {given} bytes")]
    DiskSize {
        /// In the state.
        saved: u64,
        /// The disk's bytes.
        given: u64,
    },
    /// The device could not be created.
    #[error(transparent)]
    Create(#[from] BlockError),
}

impl Persist for BlockDevice {
    type State = BlockState;
    /// The disk the restored device reads, as large as the saved one.
    type ConstructorArgs<'a> = Box<dyn Disk>;
    type Error = BlockStateError;

    fn save(&self) -> Result<BlockState, BlockStateError> {
        Ok(BlockState {
            capacity_sectors: self.capacity_sectors,
            read_only: self.read_only,
            id: self.id,
        })
    }

    fn restore(disk: Box<dyn Disk>, state: &BlockState) -> Result<Self, BlockStateError> {
        let given = disk.size();
        if state.capacity_sectors.checked_mul(SECTOR_SIZE) != Some(given) {
            return Err(BlockStateError::DiskSize {
                saved: state.capacity_sectors,
                given,
            });
        }
        let mut device = BlockDevice::new(disk, state.read_only, "")?;
        device.id = state.id;
        Ok(device)
    }
}

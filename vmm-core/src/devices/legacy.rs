//! The two legacy devices that end a VM: the i8042 controller (whose reset line Linux pulls on
//! `reboot` with `reboot=k`) and Thaw's debug-exit port (the guest writes its exit code).
//!
//! Debug-exit protocol: an 8-bit `out` of value N to port [`DEBUG_EXIT_PORT`] stops the VM and
//! `thaw run` exits with status N. Wider writes use their low byte.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::{I8042Device, Trigger};

use super::bus::{BusDevice, ByteRegisters};
use crate::exit::{ExitReason, ExitSignal};
use crate::persist::Persist;

/// First port of the i8042 controller (data port; the command port is at +4).
pub const I8042_BASE: u64 = 0x60;
/// Ports the i8042 occupies.
pub const I8042_LEN: u64 = 5;
/// Thaw's debug-exit port (the same port QEMU's isa-debug-exit uses by default).
pub const DEBUG_EXIT_PORT: u64 = 0x501;

/// Turns the i8042's reset line into a machine exit.
pub struct ResetTrigger(pub Arc<ExitSignal>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitReason::Reset);
        Ok(())
    }
}

/// The i8042 keyboard controller, as far as a VM needs one.
pub struct I8042(pub I8042Device<ResetTrigger>);

impl I8042 {
    /// An i8042 whose reset stops the machine through `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self(I8042Device::new(ResetTrigger(exit)))
    }
}

impl ByteRegisters for I8042 {
    fn read_register(&mut self, offset: u8) -> u8 {
        self.0.read(offset)
    }

    fn write_register(&mut self, offset: u8, value: u8) {
        // The trigger is infallible; an unknown command is simply ignored by the device.
        let _ = self.0.write(offset, value);
    }
}

/// The i8042's saved state: empty, and on purpose. vm-superio's controller keeps no registers
/// (reads return 0, only the reset command acts), so there is nothing to carry; the type still
/// exists so that the device goes through [`Persist`] like every other and a future controller
/// with state has a place for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {}

impl Persist for I8042 {
    type State = I8042State;
    type ConstructorArgs<'a> = Arc<ExitSignal>;
    type Error = std::convert::Infallible;

    fn save(&self) -> Result<I8042State, Self::Error> {
        Ok(I8042State {})
    }

    fn restore(exit: Arc<ExitSignal>, _state: &I8042State) -> Result<Self, Self::Error> {
        Ok(Self::new(exit))
    }
}

/// The debug-exit port.
pub struct DebugExit(pub Arc<ExitSignal>);

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(code) = data.first() {
            self.0.request(ExitReason::GuestExit(*code));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i8042_reset_command_stops_machine() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        BusDevice::write(&mut dev, 4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn i8042_passes_persist_conformance_and_restored_device_still_resets() {
        use crate::persist_conformance::{self, Spec};
        let exit = Arc::new(ExitSignal::new().unwrap());
        let device = I8042::new(exit.clone());
        let saved =
            persist_conformance::check::<I8042>(&device, || exit.clone(), &Spec::of::<I8042>());
        let mut restored = I8042::restore(exit.clone(), &saved).unwrap();
        BusDevice::write(&mut restored, 4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn debug_exit_reports_guest_code() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = DebugExit(exit.clone());
        dev.write(0, &[42]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestExit(42)));
    }
}

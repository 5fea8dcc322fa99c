//! The state KVM keeps for the whole VM rather than for one vCPU: the in-kernel interrupt
//! controllers (PIC master, PIC slave, IOAPIC), the PIT, and the kvmclock base.
//!
//! Save order: PIT, clock, irqchips, and only then (in `machine`) the vCPUs. The PIT and the
//! LAPIC timers keep running while vCPUs are paused, and an interrupt moves PIT → PIC/IOAPIC →
//! LAPIC. Reading each stage before the next means an interrupt in flight during the save is
//! seen twice at worst (a spurious edge the guest tolerates), never lost.
//!
//! Restore order is the reverse idea: the vCPUs (and their LAPICs) first, then these. Setting
//! the IOAPIC re-injects the interrupts its saved state holds as pending, and they must reach
//! LAPICs that are already in their saved state instead of being wiped by a later
//! `KVM_SET_LAPIC`.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data, kvm_irqchip,
    kvm_pit_state2,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::persist::Persist;

/// A VM-level KVM call failed.
#[derive(Debug, thiserror::Error)]
#[error("{step} failed")]
pub struct VmStateError {
    /// The ioctl.
    pub step: &'static str,
    /// Why.
    #[source]
    pub source: kvm_ioctls::Error,
}

fn vm_err(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError { step, source }
}

/// The VM-wide state KVM emulates in the kernel.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The PIT (`KVM_GET_PIT2`).
    pub pit: kvm_pit_state2,
    /// kvmclock's base (`KVM_GET_CLOCK`): guest nanoseconds since boot.
    pub clock: kvm_clock_data,
    /// The master 8259 (`KVM_GET_IRQCHIP`, chip 0).
    pub pic_master: kvm_irqchip,
    /// The slave 8259 (chip 1).
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC (chip 2).
    pub ioapic: kvm_irqchip,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The irqchips are unions of register dumps; their ids are what a reader needs.
        f.debug_struct("VmState")
            .field("pit", &self.pit)
            .field("clock_ns", &self.clock.clock)
            .field("clock_flags", &self.clock.flags)
            .field(
                "irqchips",
                &[
                    self.pic_master.chip_id,
                    self.pic_slave.chip_id,
                    self.ioapic.chip_id,
                ],
            )
            .finish()
    }
}

/// The in-kernel devices of one VM: its irqchip, PIT and kvmclock, reached through the VM fd.
pub struct InKernelDevices<'v>(pub &'v VmFd);

fn get_chip(vm: &VmFd, chip_id: u32, step: &'static str) -> Result<kvm_irqchip, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(vm_err(step))?;
    Ok(chip)
}

fn set_chip(
    vm: &VmFd,
    saved: &kvm_irqchip,
    chip_id: u32,
    step: &'static str,
) -> Result<(), VmStateError> {
    // The id says which chip the union holds: the one we mean, whatever the file says.
    let chip = kvm_irqchip { chip_id, ..*saved };
    vm.set_irqchip(&chip).map_err(vm_err(step))
}

impl<'v> Persist for InKernelDevices<'v> {
    type State = VmState;
    type ConstructorArgs<'a> = &'v VmFd;
    type Error = VmStateError;

    fn save(&self) -> Result<VmState, VmStateError> {
        let vm = self.0;
        let pit = vm.get_pit2().map_err(vm_err("KVM_GET_PIT2"))?;
        let clock = vm.get_clock().map_err(vm_err("KVM_GET_CLOCK"))?;
        Ok(VmState {
            pit,
            clock,
            pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
            pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
            ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
        })
    }

    /// Writes `state` into the VM's in-kernel devices, which must exist (`KVM_CREATE_IRQCHIP`,
    /// `KVM_CREATE_PIT2`); call it after the vCPUs are restored (see the module docs).
    fn restore(vm: &'v VmFd, state: &VmState) -> Result<Self, VmStateError> {
        // The PIT first: it drives IRQ 0, and the PIC/IOAPIC state written next then holds.
        vm.set_pit2(&state.pit).map_err(vm_err("KVM_SET_PIT2"))?;
        // KVM_GET_CLOCK reports flags KVM_SET_CLOCK refuses or reads differently:
        // KVM_CLOCK_TSC_STABLE (and HOST_TSC) only describe the host, and KVM_CLOCK_REALTIME
        // would make KVM advance the clock by the wall time since the save. Thaw resumes the
        // guest's clock where it stopped (after-restore hooks fix wall time inside the guest),
        // so no flag is passed.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(vm_err("KVM_SET_CLOCK"))?;
        set_chip(
            vm,
            &state.pic_master,
            KVM_IRQCHIP_PIC_MASTER,
            "KVM_SET_IRQCHIP (PIC master)",
        )?;
        set_chip(
            vm,
            &state.pic_slave,
            KVM_IRQCHIP_PIC_SLAVE,
            "KVM_SET_IRQCHIP (PIC slave)",
        )?;
        set_chip(
            vm,
            &state.ioapic,
            KVM_IRQCHIP_IOAPIC,
            "KVM_SET_IRQCHIP (IOAPIC)",
        )?;
        Ok(Self(vm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};

    fn vm_with_chips() -> VmFd {
        let vm = crate::kvm::open().unwrap().create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .unwrap();
        vm
    }

    #[test]
    fn in_kernel_devices_pass_persist_conformance() {
        use crate::persist_conformance::{self, Spec};
        if !crate::test_support::require_kvm() {
            return;
        }
        let first = vm_with_chips();
        let spares: Vec<VmFd> = (0..4).map(|_| vm_with_chips()).collect();
        let mut fresh = spares.iter();
        let spec = Spec::of::<InKernelDevices<'_>>()
            .volatile(crate::test_support::mask_vm_clock)
            .carries("an IOAPIC redirection entry", |s| {
                // SAFETY: chip 2's union member is the IOAPIC state.
                let mut ioapic = unsafe { s.ioapic.chip.ioapic };
                ioapic.redirtbl[9].bits = 0x0001_0000_0000_0039;
                s.ioapic.chip.ioapic = ioapic;
            })
            .carries("PIC masks", |s| {
                // SAFETY: chips 0 and 1 hold PIC states.
                let (mut master, mut slave) =
                    unsafe { (s.pic_master.chip.pic, s.pic_slave.chip.pic) };
                master.imr = 0xfa;
                slave.imr = 0x5f;
                s.pic_master.chip.pic = master;
                s.pic_slave.chip.pic = slave;
            })
            .carries("a PIT channel's mode and count", |s| {
                s.pit.channels[2].mode = 3;
                s.pit.channels[2].count = 0x1234;
            });
        persist_conformance::check::<InKernelDevices<'_>>(
            &InKernelDevices(&first),
            || fresh.next().expect("enough spare VMs"),
            &spec,
        );
    }

    #[test]
    fn kvmclock_continues_from_the_saved_value() {
        if !crate::test_support::require_kvm() {
            return;
        }
        let (first, second) = (vm_with_chips(), vm_with_chips());
        let mut state = InKernelDevices(&first).save().unwrap();
        state.clock.clock = 123_456_789_000;
        InKernelDevices::restore(&second, &state).unwrap();
        let again = InKernelDevices(&second).save().unwrap();
        // Ahead by the time the test took, no more.
        let elapsed = again.clock.clock - state.clock.clock;
        assert!(again.clock.clock >= 123_456_789_000);
        assert!(elapsed < 5_000_000_000, "clock jumped by {elapsed} ns");
    }
}

//! Putting a fresh vCPU into the state the 64-bit boot protocol promises: its CPUID, boot MSRs,
//! registers, FPU and local APIC wiring. Every vCPU gets the same treatment, as on Firecracker;
//! application processors then sit in wait-for-SIPI until the guest starts them, which resets
//! them to real mode anyway.

use kvm_bindings::{CpuId, Msrs, kvm_msr_entry};
use kvm_ioctls::VcpuFd;

use crate::boot::cpu;

/// Local APIC register offsets and values for the LVT LINT pins.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// A vCPU could not be put into its boot state.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A KVM ioctl failed.
    #[error("vCPU {vcpu}: {step} failed")]
    Kvm {
        /// The vCPU.
        vcpu: u8,
        /// The ioctl.
        step: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only some of the boot MSRs.
    #[error("vCPU {vcpu}: KVM accepted {set} of {wanted} boot MSRs")]
    Msrs {
        /// The vCPU.
        vcpu: u8,
        /// How many were set.
        set: usize,
        /// How many were asked for.
        wanted: usize,
    },
    /// The MSR list could not be built.
    #[error("vCPU {vcpu}: cannot build the MSR list")]
    MsrList {
        /// The vCPU.
        vcpu: u8,
    },
}

fn kvm_step(vcpu: u8, step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SetupError {
    move |source| SetupError::Kvm { vcpu, step, source }
}

/// Reads a little-endian u32 from the APIC register page.
fn apic_reg(regs: &[std::os::raw::c_char; 1024], offset: usize) -> u32 {
    let b = |i: usize| regs[offset + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_apic_reg(regs: &mut [std::os::raw::c_char; 1024], offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *byte as std::os::raw::c_char;
    }
}

/// Replaces the delivery-mode field (bits 10:8) of an LVT entry.
fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Configures `fd` (vCPU `index`) for a 64-bit entry at `entry`.
pub fn configure(fd: &VcpuFd, index: u8, cpuid: &CpuId, entry: u64) -> Result<(), SetupError> {
    fd.set_cpuid2(cpuid)
        .map_err(kvm_step(index, "KVM_SET_CPUID2"))?;

    let entries: Vec<kvm_msr_entry> = cpu::boot_msrs()
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| SetupError::MsrList { vcpu: index })?;
    let set = fd
        .set_msrs(&msrs)
        .map_err(kvm_step(index, "KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(SetupError::Msrs {
            vcpu: index,
            set,
            wanted: entries.len(),
        });
    }

    fd.set_regs(&cpu::entry_regs(entry))
        .map_err(kvm_step(index, "KVM_SET_REGS"))?;
    let mut sregs = fd.get_sregs().map_err(kvm_step(index, "KVM_GET_SREGS"))?;
    cpu::long_mode_sregs(&mut sregs);
    fd.set_sregs(&sregs)
        .map_err(kvm_step(index, "KVM_SET_SREGS"))?;
    fd.set_fpu(&cpu::boot_fpu())
        .map_err(kvm_step(index, "KVM_SET_FPU"))?;

    // LINT0 receives the PIC's ExtINT, LINT1 the NMI, as the MP table says.
    let mut lapic = fd.get_lapic().map_err(kvm_step(index, "KVM_GET_LAPIC"))?;
    let lvt0 = with_delivery_mode(apic_reg(&lapic.regs, APIC_LVT0), APIC_MODE_EXTINT);
    let lvt1 = with_delivery_mode(apic_reg(&lapic.regs, APIC_LVT1), APIC_MODE_NMI);
    set_apic_reg(&mut lapic.regs, APIC_LVT0, lvt0);
    set_apic_reg(&mut lapic.regs, APIC_LVT1, lvt1);
    fd.set_lapic(&lapic)
        .map_err(kvm_step(index, "KVM_SET_LAPIC"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_replaces_only_its_field() {
        assert_eq!(with_delivery_mode(0x0001_0700, APIC_MODE_NMI), 0x0001_0400);
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_apic_reg(&mut regs, APIC_LVT0, 0xdead_beef);
        assert_eq!(apic_reg(&regs, APIC_LVT0), 0xdead_beef);
    }
}

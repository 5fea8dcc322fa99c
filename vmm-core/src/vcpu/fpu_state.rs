//! The x87/SSE/AVX (and later) register state of a vCPU, in whichever form this host's KVM
//! offers: `KVM_GET_XSAVE2` at the size `KVM_CAP_XSAVE2` reports (kernels from 5.17, needed for
//! AMX-sized areas), the 4 KiB `KVM_GET_XSAVE`, or the legacy `KVM_GET_FPU` without XSAVE. The
//! form read is recorded, and any saved XSAVE form is written back through a buffer of the size
//! this host's KVM reads.

use kvm_bindings::{Xsave, kvm_fpu, kvm_xsave};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::{VcpuCaps, VcpuStateError, invalid, kvm_err};

/// Size of the legacy `struct kvm_xsave` region, in 32-bit words.
pub const XSAVE_LEGACY_WORDS: usize = 1024;

/// The legacy FPU state (`struct kvm_fpu`), for hosts without XSAVE.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct FpuRegs {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<kvm_fpu> for FpuRegs {
    fn from(f: kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<FpuRegs> for kvm_fpu {
    fn from(f: FpuRegs) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The x87/SSE/AVX (and later) register state, in the form it was read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FpuState {
    /// From `KVM_GET_XSAVE2`: the XSAVE area at `KVM_CAP_XSAVE2`'s size (4 KiB or more).
    Xsave2 {
        /// The area as 32-bit words.
        region: Vec<u32>,
    },
    /// From `KVM_GET_XSAVE`: the 4 KiB XSAVE area.
    Xsave {
        /// The area as 32-bit words.
        region: Vec<u32>,
    },
    /// From `KVM_GET_FPU`, when KVM has no XSAVE.
    Fpu(Box<FpuRegs>),
}

pub(super) fn read(fd: &VcpuFd, vcpu: u8, caps: &VcpuCaps) -> Result<FpuState, VcpuStateError> {
    if let Some(bytes) = caps.xsave2_bytes {
        let mut xsave = new_xsave2(vcpu, bytes)?;
        // SAFETY: `xsave` was allocated with the size KVM_CAP_XSAVE2 reports for this VM,
        // which is the most KVM_GET_XSAVE2 writes.
        unsafe { fd.get_xsave2(&mut xsave) }.map_err(kvm_err(vcpu, "KVM_GET_XSAVE2"))?;
        let fam = xsave.as_fam_struct_ref();
        let mut region = fam.xsave.region.to_vec();
        region.extend_from_slice(xsave.as_slice());
        Ok(FpuState::Xsave2 { region })
    } else if caps.xsave {
        let xsave = fd.get_xsave().map_err(kvm_err(vcpu, "KVM_GET_XSAVE"))?;
        Ok(FpuState::Xsave {
            region: xsave.region.to_vec(),
        })
    } else {
        tracing::info!(vcpu, "KVM has no XSAVE; saving the legacy FPU state only");
        let fpu = fd.get_fpu().map_err(kvm_err(vcpu, "KVM_GET_FPU"))?;
        Ok(FpuState::Fpu(Box::new(fpu.into())))
    }
}

pub(super) fn write(
    fd: &VcpuFd,
    vcpu: u8,
    caps: &VcpuCaps,
    fpu: &FpuState,
) -> Result<(), VcpuStateError> {
    match fpu {
        FpuState::Fpu(regs) => fd
            .set_fpu(&kvm_fpu::from(**regs))
            .map_err(kvm_err(vcpu, "KVM_SET_FPU")),
        FpuState::Xsave { region } | FpuState::Xsave2 { region } => {
            if let Some(bytes) = caps.xsave2_bytes {
                // KVM_SET_XSAVE reads as many bytes as KVM_CAP_XSAVE2 says, so the buffer
                // must have that size whatever form was saved.
                if region.len() * 4 > bytes {
                    return Err(invalid(
                        vcpu,
                        format!(
                            "saved XSAVE area has {} bytes, this host takes {bytes}",
                            region.len() * 4
                        ),
                    ));
                }
                let mut xsave = new_xsave2(vcpu, bytes)?;
                let (legacy, extra) = region.split_at(XSAVE_LEGACY_WORDS.min(region.len()));
                // SAFETY: only the fixed 4 KiB region is written; the length field, which
                // must match the allocation, is left alone.
                let fixed = unsafe { xsave.as_mut_fam_struct() };
                fixed.xsave.region[..legacy.len()].copy_from_slice(legacy);
                xsave.as_mut_slice()[..extra.len()].copy_from_slice(extra);
                // SAFETY: `xsave` has the size KVM_CAP_XSAVE2 reports for this VM, the most
                // KVM_SET_XSAVE reads.
                unsafe { fd.set_xsave2(&xsave) }.map_err(kvm_err(vcpu, "KVM_SET_XSAVE"))
            } else if caps.xsave && region.len() == XSAVE_LEGACY_WORDS {
                let mut xsave = kvm_xsave::default();
                xsave.region.copy_from_slice(region);
                // SAFETY: without KVM_CAP_XSAVE2 the kernel predates larger XSAVE areas and
                // reads exactly `struct kvm_xsave`'s 4 KiB.
                unsafe { fd.set_xsave(&xsave) }.map_err(kvm_err(vcpu, "KVM_SET_XSAVE"))
            } else {
                Err(invalid(
                    vcpu,
                    "saved XSAVE state but this host has no XSAVE",
                ))
            }
        }
    }
}

/// An XSAVE buffer of `bytes` (at least the legacy 4 KiB).
fn new_xsave2(vcpu: u8, bytes: usize) -> Result<Xsave, VcpuStateError> {
    let extra_words = bytes.saturating_sub(XSAVE_LEGACY_WORDS * 4).div_ceil(4);
    Xsave::new(extra_words).map_err(|_| VcpuStateError::List {
        vcpu,
        what: "XSAVE",
    })
}

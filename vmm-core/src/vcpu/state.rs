//! A vCPU's saved state: everything KVM holds for it, read in an order that does not disturb it
//! and written back in the order KVM's checks require (the order is code below, with why).
//!
//! Which forms exist depends on the host: the FPU/SSE/AVX state is read with `KVM_GET_XSAVE2`
//! when `KVM_CAP_XSAVE2` reports a size, else `KVM_GET_XSAVE`, else `KVM_GET_FPU`, and the form
//! is recorded in [`FpuState`]; XCRs, debug registers and vCPU events are `None` when KVM lacks
//! their capability (logged, never silently). Both PVM and hardware KVM offer all of them.

use std::sync::Arc;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, KVM_MAX_XCRS, KVM_MP_STATE_SUSPENDED, Msrs,
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::persist::Persist;

#[path = "fpu_state.rs"]
mod fpu;
pub use fpu::{FpuRegs, FpuState, XSAVE_LEGACY_WORDS};

/// MSRs read per `KVM_GET_MSRS` call.
const MSR_BATCH: usize = 64;
/// Most MSRs a saved vCPU may carry (KVM lists well under a hundred).
pub const MAX_SAVED_MSRS: usize = 1024;
/// Largest XSAVE area accepted from a state file (AMX needs about 11 KiB).
pub const MAX_XSAVE_BYTES: usize = 64 * 1024;

/// A vCPU state could not be read, written or accepted.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
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
    /// KVM accepted only some of the saved MSRs.
    #[error("vCPU {vcpu}: KVM_SET_MSRS refused MSR {msr:#x} ({set} of {wanted} set)")]
    SetMsrs {
        /// The vCPU.
        vcpu: u8,
        /// The first MSR KVM refused.
        msr: u32,
        /// How many were set before it.
        set: usize,
        /// How many were asked for.
        wanted: usize,
    },
    /// A KVM list structure (CPUID, MSRs, XSAVE) could not be built.
    #[error("vCPU {vcpu}: cannot build the {what} list for KVM")]
    List {
        /// The vCPU.
        vcpu: u8,
        /// Which list.
        what: &'static str,
    },
    /// The saved state is not something this host can accept.
    #[error("vCPU {vcpu}: saved state is invalid: {reason}")]
    Invalid {
        /// The vCPU.
        vcpu: u8,
        /// What is wrong.
        reason: String,
    },
}

fn kvm_err(vcpu: u8, step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { vcpu, step, source }
}

fn invalid(vcpu: u8, reason: impl Into<String>) -> VcpuStateError {
    VcpuStateError::Invalid {
        vcpu,
        reason: reason.into(),
    }
}

/// What this host's KVM offers for vCPU state, probed once per VM.
#[derive(Clone, Debug, Default)]
pub struct VcpuCaps {
    /// `KVM_CAP_XSAVE2`: the XSAVE area size in bytes, when the kernel has `KVM_GET_XSAVE2`.
    pub xsave2_bytes: Option<usize>,
    /// `KVM_CAP_XSAVE`.
    pub xsave: bool,
    /// `KVM_CAP_XCRS`.
    pub xcrs: bool,
    /// `KVM_CAP_DEBUGREGS`.
    pub debugregs: bool,
    /// `KVM_CAP_VCPU_EVENTS`.
    pub vcpu_events: bool,
    /// `KVM_CAP_GET_TSC_KHZ`.
    pub tsc_khz: bool,
    /// `KVM_GET_MSR_INDEX_LIST`: the MSRs KVM saves and restores.
    pub msr_indices: Vec<u32>,
}

impl VcpuCaps {
    /// Asks KVM (and the VM, whose answer can differ) what it supports.
    pub fn probe(kvm: &Kvm, vm: &VmFd) -> Result<Self, kvm_ioctls::Error> {
        let xsave2 = vm.check_extension_int(Cap::Xsave2);
        let caps = Self {
            xsave2_bytes: usize::try_from(xsave2).ok().filter(|&n| n > 0),
            xsave: vm.check_extension(Cap::Xsave),
            xcrs: vm.check_extension(Cap::Xcrs),
            debugregs: vm.check_extension(Cap::Debugregs),
            vcpu_events: vm.check_extension(Cap::VcpuEvents),
            tsc_khz: vm.check_extension(Cap::GetTscKhz),
            msr_indices: kvm.get_msr_index_list()?.as_slice().to_vec(),
        };
        tracing::debug!(?caps, "vCPU state capabilities");
        Ok(caps)
    }
}

/// One MSR's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    /// The MSR number.
    pub index: u32,
    /// Its value.
    pub data: u64,
}

/// Everything KVM holds for one vCPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index (and APIC id).
    pub index: u8,
    /// The CPUID KVM has for it (`KVM_GET_CPUID2`).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Guest TSC frequency, if KVM reports it.
    pub tsc_khz: Option<u32>,
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// FPU and extended state.
    pub fpu: FpuState,
    /// Extended control registers (XCR0), if KVM has `KVM_CAP_XCRS`.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers, if KVM has `KVM_CAP_DEBUGREGS`.
    pub debugregs: Option<kvm_debugregs>,
    /// The in-kernel local APIC's register page.
    pub lapic: kvm_lapic_state,
    /// Every MSR of `KVM_GET_MSR_INDEX_LIST` that could be read.
    pub msrs: Vec<MsrValue>,
    /// Pending exceptions, interrupts, NMIs and SMIs, if KVM has `KVM_CAP_VCPU_EVENTS`.
    pub vcpu_events: Option<kvm_vcpu_events>,
    /// Running, halted, waiting for SIPI, ...
    pub mp_state: kvm_mp_state,
}

impl VcpuState {
    /// Checks what a state file could get wrong before any of it reaches KVM.
    pub fn validate(&self, index: u8) -> Result<(), VcpuStateError> {
        if self.index != index {
            return Err(invalid(index, format!("saved as vCPU {}", self.index)));
        }
        if self.cpuid.is_empty() || self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(invalid(
                index,
                format!("{} CPUID entries", self.cpuid.len()),
            ));
        }
        if self.msrs.len() > MAX_SAVED_MSRS {
            return Err(invalid(index, format!("{} MSRs", self.msrs.len())));
        }
        match &self.fpu {
            FpuState::Xsave { region } if region.len() != XSAVE_LEGACY_WORDS => {
                return Err(invalid(index, "XSAVE area is not 4 KiB"));
            }
            FpuState::Xsave2 { region }
                if region.len() < XSAVE_LEGACY_WORDS || region.len() * 4 > MAX_XSAVE_BYTES =>
            {
                return Err(invalid(
                    index,
                    format!("XSAVE2 area of {} bytes", region.len() * 4),
                ));
            }
            _ => {}
        }
        if self.xcrs.is_some_and(|x| x.nr_xcrs > KVM_MAX_XCRS) {
            return Err(invalid(index, "too many XCRs"));
        }
        if self.mp_state.mp_state > KVM_MP_STATE_SUSPENDED {
            return Err(invalid(
                index,
                format!("unknown mp_state {}", self.mp_state.mp_state),
            ));
        }
        Ok(())
    }
}

/// A vCPU: its KVM file descriptor, its index, and what the host offers for its state.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    caps: Arc<VcpuCaps>,
}

/// What [`Vcpu::restore`] builds a vCPU on.
pub struct VcpuArgs {
    /// The vCPU, created (in a VM whose irqchip already exists, so it has an in-kernel LAPIC)
    /// but not yet written.
    pub fd: VcpuFd,
    /// Its index.
    pub index: u8,
    /// What KVM offers.
    pub caps: Arc<VcpuCaps>,
}

impl Vcpu {
    /// Wraps a vCPU created (and configured) elsewhere.
    pub fn new(index: u8, fd: VcpuFd, caps: Arc<VcpuCaps>) -> Self {
        Self { index, fd, caps }
    }

    /// The vCPU's index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The KVM vCPU.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The KVM vCPU, mutably (for `KVM_RUN`).
    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    fn read_msrs(&self) -> Result<Vec<MsrValue>, VcpuStateError> {
        let vcpu = self.index;
        let mut saved = Vec::with_capacity(self.caps.msr_indices.len());
        let mut pending: &[u32] = &self.caps.msr_indices;
        while !pending.is_empty() {
            let batch = &pending[..pending.len().min(MSR_BATCH)];
            let entries: Vec<kvm_msr_entry> = batch
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|_| VcpuStateError::List { vcpu, what: "MSR" })?;
            let read = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(kvm_err(vcpu, "KVM_GET_MSRS"))?;
            saved.extend(msrs.as_slice()[..read].iter().map(|e| MsrValue {
                index: e.index,
                data: e.data,
            }));
            // KVM stops at the first MSR it cannot read: drop that one and go on after it.
            let consumed = if read < batch.len() {
                tracing::debug!(
                    vcpu,
                    msr = format_args!("{:#x}", batch[read]),
                    "MSR not readable; not saved"
                );
                read + 1
            } else {
                read
            };
            pending = &pending[consumed..];
        }
        Ok(saved)
    }
}

impl Persist for Vcpu {
    type State = VcpuState;
    type ConstructorArgs<'a> = VcpuArgs;
    type Error = VcpuStateError;

    /// Reads the state; call it on the vCPU's own thread, while it is out of `KVM_RUN` with no
    /// I/O left half done (see `vcpu::park`), and with every vCPU paused.
    fn save(&self) -> Result<VcpuState, VcpuStateError> {
        let vcpu = self.index;
        let fd = &self.fd;
        // KVM_GET_MP_STATE first: it makes the LAPIC accept pending INIT/SIPI events, which can
        // change the registers and LAPIC read below, so everything after sees the settled state.
        let mp_state = fd
            .get_mp_state()
            .map_err(kvm_err(vcpu, "KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(kvm_err(vcpu, "KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm_err(vcpu, "KVM_GET_SREGS"))?;
        let fpu = fpu::read(&self.fd, vcpu, &self.caps)?;
        let xcrs = if self.caps.xcrs {
            Some(fd.get_xcrs().map_err(kvm_err(vcpu, "KVM_GET_XCRS"))?)
        } else {
            tracing::info!(vcpu, "KVM has no KVM_CAP_XCRS; XCRs not saved");
            None
        };
        let debugregs = if self.caps.debugregs {
            Some(
                fd.get_debug_regs()
                    .map_err(kvm_err(vcpu, "KVM_GET_DEBUGREGS"))?,
            )
        } else {
            tracing::info!(
                vcpu,
                "KVM has no KVM_CAP_DEBUGREGS; debug registers not saved"
            );
            None
        };
        let lapic = fd.get_lapic().map_err(kvm_err(vcpu, "KVM_GET_LAPIC"))?;
        let msrs = self.read_msrs()?;
        // Events last: reading the other state can move a pending event (an interrupt in
        // sregs' bitmap, an exception), and the event set read last is the one that holds.
        let vcpu_events = if self.caps.vcpu_events {
            Some(
                fd.get_vcpu_events()
                    .map_err(kvm_err(vcpu, "KVM_GET_VCPU_EVENTS"))?,
            )
        } else {
            tracing::info!(
                vcpu,
                "KVM has no KVM_CAP_VCPU_EVENTS; pending events not saved"
            );
            None
        };
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err(vcpu, "KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let tsc_khz = if self.caps.tsc_khz {
            Some(fd.get_tsc_khz().map_err(kvm_err(vcpu, "KVM_GET_TSC_KHZ"))?)
        } else {
            tracing::info!(
                vcpu,
                "KVM has no KVM_CAP_GET_TSC_KHZ; TSC frequency not saved"
            );
            None
        };
        Ok(VcpuState {
            index: vcpu,
            cpuid,
            tsc_khz,
            regs,
            sregs,
            fpu,
            xcrs,
            debugregs,
            lapic,
            msrs,
            vcpu_events,
            mp_state,
        })
    }

    /// Writes `state` into the fresh vCPU `args.fd`, once the state is found valid.
    fn restore(args: VcpuArgs, state: &VcpuState) -> Result<Self, VcpuStateError> {
        state.validate(args.index)?;
        let this = Self::new(args.index, args.fd, args.caps);
        this.write_state(state)?;
        Ok(this)
    }
}

impl Vcpu {
    /// Writes a validated state, in the order KVM needs.
    fn write_state(&self, state: &VcpuState) -> Result<(), VcpuStateError> {
        let vcpu = self.index;
        let fd = &self.fd;
        // 1. TSC frequency first: KVM turns a written TSC value into an offset at the current
        //    rate, so the rate must be the guest's before the TSC MSR below. Skipped when it is
        //    already right, which is also what works on hosts without TSC scaling.
        if let Some(khz) = state.tsc_khz {
            let current = fd.get_tsc_khz().map_err(kvm_err(vcpu, "KVM_GET_TSC_KHZ"))?;
            if current != khz {
                fd.set_tsc_khz(khz)
                    .map_err(kvm_err(vcpu, "KVM_SET_TSC_KHZ"))?;
            }
        }
        // 2. CPUID before anything KVM checks against the guest's features: it refuses MSRs of
        //    absent features (TSC deadline, XSS, ...), CR4 bits (OSXSAVE, FSGSBASE, PKE) in
        //    sregs, and XSAVE components and XCR0 bits the CPUID does not allow.
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuStateError::List {
            vcpu,
            what: "CPUID",
        })?;
        fd.set_cpuid2(&cpuid)
            .map_err(kvm_err(vcpu, "KVM_SET_CPUID2"))?;
        // 3. Sregs before the LAPIC: they carry the APIC base MSR, which enables the LAPIC and
        //    selects xAPIC or x2APIC mode, and KVM_SET_LAPIC reads the register page (the APIC
        //    id format) in the mode already set. EFER also comes with them.
        fd.set_sregs(&state.sregs)
            .map_err(kvm_err(vcpu, "KVM_SET_SREGS"))?;
        // 4. The LAPIC before MSRs: KVM drops a write of MSR_IA32_TSC_DEADLINE unless the LAPIC
        //    timer is already in TSC-deadline mode.
        fd.set_lapic(&state.lapic)
            .map_err(kvm_err(vcpu, "KVM_SET_LAPIC"))?;
        // 5. MSRs (TSC, kvmclock, SYSCALL, KERNEL_GS_BASE, TSC deadline, ...).
        self.write_msrs(&state.msrs)?;
        // 6. Extended state, then XCR0 (both checked against CPUID, set above).
        fpu::write(fd, vcpu, &self.caps, &state.fpu)?;
        match state.xcrs {
            Some(xcrs) if self.caps.xcrs => {
                fd.set_xcrs(&xcrs).map_err(kvm_err(vcpu, "KVM_SET_XCRS"))?
            }
            Some(_) => return Err(invalid(vcpu, "saved XCRs but this host has no XCRs")),
            None => tracing::info!(vcpu, "no XCRs saved; left at reset values"),
        }
        match state.debugregs {
            Some(dr) => fd
                .set_debug_regs(&dr)
                .map_err(kvm_err(vcpu, "KVM_SET_DEBUGREGS"))?,
            None => tracing::info!(vcpu, "no debug registers saved; left at reset values"),
        }
        // 7. General registers before events: KVM_SET_REGS discards a pending exception, so the
        //    one the events carry must be written after it.
        fd.set_regs(&state.regs)
            .map_err(kvm_err(vcpu, "KVM_SET_REGS"))?;
        // 8. Events after the LAPIC, sregs and regs: they are the authoritative pending
        //    exception/interrupt/NMI/SMI (sregs' interrupt bitmap may have queued one too), and
        //    they set the LAPIC's latched INIT, which needs the LAPIC in place.
        match state.vcpu_events {
            Some(events) => fd
                .set_vcpu_events(&events)
                .map_err(kvm_err(vcpu, "KVM_SET_VCPU_EVENTS"))?,
            None => tracing::info!(vcpu, "no vCPU events saved; nothing pending restored"),
        }
        // 9. The run state last, so that what the LAPIC and events restore could change
        //    (INIT/SIPI handling) does not override the saved halted/runnable/wait-for-SIPI.
        fd.set_mp_state(state.mp_state)
            .map_err(kvm_err(vcpu, "KVM_SET_MP_STATE"))?;
        Ok(())
    }

    fn write_msrs(&self, saved: &[MsrValue]) -> Result<(), VcpuStateError> {
        let vcpu = self.index;
        for chunk in saved.chunks(KVM_MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|m| kvm_msr_entry {
                    index: m.index,
                    data: m.data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries)
                .map_err(|_| VcpuStateError::List { vcpu, what: "MSR" })?;
            let set = self
                .fd
                .set_msrs(&msrs)
                .map_err(kvm_err(vcpu, "KVM_SET_MSRS"))?;
            if set != entries.len() {
                return Err(VcpuStateError::SetMsrs {
                    vcpu,
                    msr: entries.get(set).map_or(0, |e| e.index),
                    set,
                    wanted: entries.len(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;

//! vCPU state round trips on real KVM: save, restore into a vCPU of a fresh VM, save again.

use super::*;
use crate::test_support::require_kvm;
use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

struct TestVm {
    kvm: Kvm,
    vm: VmFd,
}

fn test_vm() -> TestVm {
    let kvm = crate::kvm::open().unwrap();
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .unwrap();
    TestVm { kvm, vm }
}

fn caps(t: &TestVm) -> Arc<VcpuCaps> {
    Arc::new(VcpuCaps::probe(&t.kvm, &t.vm).unwrap())
}

/// vCPU 0 in its boot state, with recognisable values in registers, MSRs and debug registers.
fn configured_vcpu(t: &TestVm, caps: Arc<VcpuCaps>) -> Vcpu {
    let fd = t.vm.create_vcpu(0).unwrap();
    let base = crate::cpuid::supported(&t.kvm).unwrap();
    let cpuid = crate::cpuid::for_vcpu(&base, 0, 1);
    crate::vcpu::setup::configure(&fd, 0, &cpuid, 0x10_0000).unwrap();
    let mut regs = fd.get_regs().unwrap();
    regs.rax = 0x1234_5678;
    regs.r15 = 0xdead_beef;
    fd.set_regs(&regs).unwrap();
    let msrs = [
        (MSR_STAR, 0x0023_0010_0000_0000),
        (MSR_LSTAR, 0xffff_ffff_8100_0000),
        (MSR_KERNEL_GS_BASE, 0xffff_8880_0000_0000),
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    assert_eq!(fd.set_msrs(&Msrs::from_entries(&msrs).unwrap()).unwrap(), 3);
    if caps.debugregs {
        let mut dr = fd.get_debug_regs().unwrap();
        dr.db[0] = 0x40_0000;
        fd.set_debug_regs(&dr).unwrap();
    }
    Vcpu::new(0, fd, caps)
}

fn msr(state: &VcpuState, index: u32) -> Option<u64> {
    state.msrs.iter().find(|m| m.index == index).map(|m| m.data)
}

/// Everything but the TSC, which moves on by itself.
fn assert_same_state(a: &VcpuState, b: &VcpuState) {
    assert_eq!(a.regs, b.regs);
    assert_eq!(a.sregs, b.sregs);
    assert_eq!(a.fpu, b.fpu);
    assert_eq!(a.xcrs, b.xcrs);
    assert_eq!(a.debugregs, b.debugregs);
    assert_eq!(a.lapic, b.lapic);
    assert_eq!(a.mp_state, b.mp_state);
    assert_eq!(a.vcpu_events, b.vcpu_events);
    assert_eq!(a.cpuid, b.cpuid);
    assert_eq!(a.tsc_khz, b.tsc_khz);
    let without_tsc = |s: &VcpuState| -> Vec<MsrValue> {
        s.msrs
            .iter()
            .copied()
            .filter(|m| m.index != MSR_IA32_TSC)
            .collect()
    };
    assert_eq!(without_tsc(a), without_tsc(b));
    let (ta, tb) = (msr(a, MSR_IA32_TSC), msr(b, MSR_IA32_TSC));
    if let (Some(ta), Some(tb)) = (ta, tb) {
        // Restored, then ticking: a little ahead, never behind by more than a tick.
        assert!(tb + 1000 >= ta, "TSC went back from {ta} to {tb}");
    }
}

#[test]
fn vcpu_passes_persist_conformance() {
    use crate::persist_conformance::{self, Spec};
    if !require_kvm() {
        return;
    }
    let first = test_vm();
    let caps = caps(&first);
    let vcpu = configured_vcpu(&first, caps.clone());
    let mut spares = Vec::new();
    let fresh = || {
        let vm = test_vm();
        let fd = vm.vm.create_vcpu(0).unwrap();
        spares.push(vm);
        VcpuArgs {
            fd,
            index: 0,
            caps: caps.clone(),
        }
    };
    let spec = Spec::of::<Vcpu>()
        .volatile(crate::test_support::mask_vcpu_clock)
        .carries("general registers", |s| {
            s.regs.rbx = 0x0bad_cafe;
            s.regs.rip = 0x10_2000;
        })
        .carries("an MSR", |s| {
            for m in s.msrs.iter_mut().filter(|m| m.index == MSR_LSTAR) {
                m.data = 0xffff_ffff_8200_0000;
            }
        })
        .carries("a debug register", |s| {
            if let Some(dr) = s.debugregs.as_mut() {
                dr.db[1] = 0x50_0000;
            }
        })
        // The timer's LVT entry stays masked; only its vector changes.
        .carries("the APIC timer's vector", |s| {
            s.lapic.regs[0x320] = 0xec_u8 as i8
        })
        .refuses("saved as another vCPU", |s| s.index = 3)
        .refuses("an unknown run state", |s| s.mp_state.mp_state = 99);
    let saved = persist_conformance::check::<Vcpu>(&vcpu, fresh, &spec);
    assert_eq!(saved.regs.rax, 0x1234_5678);
    assert_eq!(msr(&saved, MSR_LSTAR), Some(0xffff_ffff_8100_0000));
    assert_eq!(msr(&saved, MSR_STAR), Some(0x0023_0010_0000_0000));
    assert_eq!(msr(&saved, MSR_KERNEL_GS_BASE), Some(0xffff_8880_0000_0000));
    assert!(msr(&saved, MSR_IA32_TSC).is_some(), "the TSC is saved");
    assert_ne!(
        saved.sregs.apic_base, 0,
        "the APIC base is saved (in sregs)"
    );
}

#[test]
fn restored_tsc_continues_from_the_saved_value() {
    if !require_kvm() {
        return;
    }
    let first = test_vm();
    let caps = caps(&first);
    let saved = configured_vcpu(&first, caps.clone()).save().unwrap();
    let second = test_vm();
    let args = VcpuArgs {
        fd: second.vm.create_vcpu(0).unwrap(),
        index: 0,
        caps,
    };
    let again = Vcpu::restore(args, &saved).unwrap().save().unwrap();
    assert_same_state(&saved, &again);
}

#[test]
fn every_fpu_form_restores() {
    if !require_kvm() {
        return;
    }
    let t = test_vm();
    let host = caps(&t);
    let forms = [
        VcpuCaps {
            xsave2_bytes: None,
            ..(*host).clone()
        },
        VcpuCaps {
            xsave2_bytes: None,
            xsave: false,
            ..(*host).clone()
        },
    ];
    for (n, form) in forms.into_iter().enumerate() {
        let form = Arc::new(form);
        let vm = test_vm();
        let vcpu = configured_vcpu(&vm, form.clone());
        let saved = vcpu.save().unwrap();
        match (&saved.fpu, n) {
            (FpuState::Xsave { region }, 0) => assert_eq!(region.len(), XSAVE_LEGACY_WORDS),
            (FpuState::Fpu(_), 1) => {}
            (other, _) => panic!("form {n} saved as {other:?}"),
        }
        // Restored both with the same form and with everything this host has.
        for restore_caps in [form.clone(), host.clone()] {
            let fresh = test_vm();
            let args = VcpuArgs {
                fd: fresh.vm.create_vcpu(0).unwrap(),
                index: 0,
                caps: restore_caps,
            };
            let restored = Vcpu::restore(args, &saved).unwrap();
            let again = Vcpu::new(0, restored.fd, form.clone()).save().unwrap();
            assert_eq!(again.fpu, saved.fpu, "form {n}");
        }
    }
}

#[test]
fn restore_refuses_invalid_states_before_writing_the_vcpu() {
    if !require_kvm() {
        return;
    }
    let t = test_vm();
    let caps = caps(&t);
    let saved = configured_vcpu(&t, caps.clone()).save().unwrap();
    let mut bad = Vec::new();
    let mut s = saved.clone();
    s.index = 3;
    bad.push(s);
    let mut s = saved.clone();
    s.cpuid.clear();
    bad.push(s);
    let mut s = saved.clone();
    s.msrs = vec![MsrValue { index: 0, data: 0 }; MAX_SAVED_MSRS + 1];
    bad.push(s);
    let mut s = saved.clone();
    s.fpu = FpuState::Xsave { region: vec![0; 7] };
    bad.push(s);
    let mut s = saved.clone();
    s.fpu = FpuState::Xsave2 {
        region: vec![0; MAX_XSAVE_BYTES],
    };
    bad.push(s);
    let mut s = saved.clone();
    s.mp_state.mp_state = 99;
    bad.push(s);
    for state in bad {
        let fresh = test_vm();
        let args = VcpuArgs {
            fd: fresh.vm.create_vcpu(0).unwrap(),
            index: 0,
            caps: caps.clone(),
        };
        assert!(matches!(
            Vcpu::restore(args, &state),
            Err(VcpuStateError::Invalid { vcpu: 0, .. })
        ));
    }
}

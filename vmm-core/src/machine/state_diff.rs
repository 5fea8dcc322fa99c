//! Field-by-field comparison of two saved machines by their state-blob encodings, for test
//! failure messages: which vCPU and which of its parts, which MSR, which device differs, and at
//! which byte. The structs are destructured in full, so a field added to any of them does not
//! compile here until the comparison covers it.

use serde::Serialize;

use super::state::{DevicesState, MachineState};
use crate::persist_conformance::{encode, first_difference};
use crate::vcpu::state::{MsrValue, VcpuState};
use crate::vm_state::VmState;

/// The differences found so far, one line each.
#[derive(Default)]
struct Diff(Vec<String>);

impl Diff {
    fn field<T: Serialize>(&mut self, path: &str, a: &T, b: &T) {
        let (x, y) = (encode(a), encode(b));
        if x != y {
            self.0.push(format!("{path}: {}", first_difference(&x, &y)));
        }
    }

    /// Like [`Diff::field`], with both values shown (for small types).
    fn shown<T: Serialize + std::fmt::Debug>(&mut self, path: &str, a: &T, b: &T) {
        if encode(a) != encode(b) {
            self.0.push(format!("{path}: {a:?} vs {b:?}"));
        }
    }

    fn msrs(&mut self, path: &str, a: &[MsrValue], b: &[MsrValue]) {
        if a == b {
            return;
        }
        let find =
            |list: &[MsrValue], index| list.iter().find(|m| m.index == index).map(|m| m.data);
        for m in a.iter().chain(b) {
            let (x, y) = (find(a, m.index), find(b, m.index));
            let line = format!("{path}[{:#x}]: {x:#x?} vs {y:#x?}", m.index);
            if x != y && !self.0.contains(&line) {
                self.0.push(line);
            }
        }
        let order = |list: &[MsrValue]| list.iter().map(|m| m.index).collect::<Vec<_>>();
        if order(a) != order(b) && a.len() == b.len() {
            self.0
                .push(format!("{path}: the same MSRs in another order"));
        }
    }

    fn vcpu(&mut self, i: usize, a: &VcpuState, b: &VcpuState) {
        let VcpuState {
            index,
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
        } = a;
        let p = |field: &str| format!("vcpus[{i}].{field}");
        self.shown(&p("index"), index, &b.index);
        self.field(&p("cpuid"), cpuid, &b.cpuid);
        self.shown(&p("tsc_khz"), tsc_khz, &b.tsc_khz);
        self.shown(&p("regs"), regs, &b.regs);
        self.field(&p("sregs"), sregs, &b.sregs);
        self.field(&p("fpu"), fpu, &b.fpu);
        self.field(&p("xcrs"), xcrs, &b.xcrs);
        self.field(&p("debugregs"), debugregs, &b.debugregs);
        if let Some(at) = lapic
            .regs
            .iter()
            .zip(&b.lapic.regs)
            .position(|(x, y)| x != y)
        {
            let reg = at & !0xf;
            let (x, y) = (&lapic.regs[reg..reg + 4], &b.lapic.regs[reg..reg + 4]);
            self.0.push(format!(
                "{} register {reg:#x}: {x:02x?} vs {y:02x?}",
                p("lapic")
            ));
        }
        self.msrs(&p("msrs"), msrs, &b.msrs);
        self.field(&p("vcpu_events"), vcpu_events, &b.vcpu_events);
        self.shown(&p("mp_state"), &mp_state.mp_state, &b.mp_state.mp_state);
    }

    fn vm(&mut self, a: &VmState, b: &VmState) {
        let VmState {
            pit,
            clock,
            pic_master,
            pic_slave,
            ioapic,
        } = a;
        self.field("vm.pit", pit, &b.pit);
        self.field("vm.clock", clock, &b.clock);
        self.field("vm.pic_master", pic_master, &b.pic_master);
        self.field("vm.pic_slave", pic_slave, &b.pic_slave);
        self.field("vm.ioapic", ioapic, &b.ioapic);
    }

    fn devices(&mut self, a: &DevicesState, b: &DevicesState) {
        let DevicesState {
            serial,
            i8042,
            vsock,
            blocks,
        } = a;
        self.shown("devices.serial", serial, &b.serial);
        self.shown("devices.i8042", i8042, &b.i8042);
        self.shown("devices.vsock", vsock, &b.vsock);
        self.shown("devices.blocks", blocks, &b.blocks);
    }
}

/// Where `a` and `b` differ, one line per field; empty when their encodings are equal.
pub(crate) fn differences(a: &MachineState, b: &MachineState) -> Vec<String> {
    let MachineState {
        version,
        mem_bytes,
        boot,
        vcpu_count,
        vcpus,
        vm,
        devices,
    } = a;
    let mut d = Diff::default();
    d.shown("version", version, &b.version);
    d.shown("mem_bytes", mem_bytes, &b.mem_bytes);
    d.shown("boot", boot, &b.boot);
    d.shown("vcpu_count", vcpu_count, &b.vcpu_count);
    if vcpus.len() != b.vcpus.len() {
        d.0.push(format!(
            "vcpus: {} vs {} states",
            vcpus.len(),
            b.vcpus.len()
        ));
    }
    for (i, (x, y)) in vcpus.iter().zip(&b.vcpus).enumerate() {
        d.vcpu(i, x, y);
    }
    d.vm(vm, &b.vm);
    d.devices(devices, &b.devices);
    let (x, y) = (encode(a), encode(b));
    if d.0.is_empty() && x != y {
        d.0.push(format!(
            "the encodings differ where no field does (field order?): {}",
            first_difference(&x, &y)
        ));
    }
    d.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_vcpu_msr_and_device_that_differ() {
        let a = super::super::golden_tests::golden_state();
        let mut b = super::super::golden_tests::golden_state();
        assert!(differences(&a, &b).is_empty());
        b.vcpus[1].regs.r9 ^= 1;
        b.vcpus[0].msrs[0].data ^= 1;
        b.devices.serial.scratch ^= 1;
        b.vm.clock.clock ^= 1;
        b.vcpus[0].lapic.regs[0x361] ^= 4;
        let found = differences(&a, &b);
        let named = |prefix: &str| found.iter().any(|l| l.starts_with(prefix));
        for prefix in [
            "vcpus[1].regs",
            "vcpus[0].msrs[0x",
            "devices.serial",
            "vm.clock",
            "vcpus[0].lapic register 0x360",
        ] {
            assert!(named(prefix), "{prefix} not named in {found:#?}");
        }
        assert_eq!(found.len(), 5, "{found:#?}");
    }
}

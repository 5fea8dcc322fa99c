//! Criterion bench of building a machine (KVM VM, irqchip, PIT, memory slots, guest loaded,
//! vCPUs configured) without running it: the fixed cost every boot and every restore pays.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a bench: failing loudly is the point

use criterion::{Criterion, criterion_group, criterion_main};
use vmm_core::{Machine, MachineConfig};

fn create(c: &mut Criterion) {
    let mut group = c.benchmark_group("machine_create");
    group.sample_size(30);
    for mem_mib in [128u64, 1024] {
        let config = MachineConfig {
            mem_mib,
            vcpus: 1,
            kernel: thaw::test_guest::kernel(),
            initrd: None,
            cmdline: String::new(),
            vsock: None,
            disks: Vec::new(),
        };
        group.bench_function(format!("test_guest_{mem_mib}MiB_1vcpu"), |b| {
            // Tearing the VM down is not part of creating it: drop outside the timing.
            b.iter_with_large_drop(|| {
                Machine::create(&config, Box::new(std::io::sink())).expect("create")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, create);
criterion_main!(benches);

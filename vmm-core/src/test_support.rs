//! Helpers for unit tests that need real KVM.

/// Fails the test with a clear message if /dev/kvm is missing, unless `THAW_SKIP_KVM=1`, in
/// which case it returns false and the caller skips (printing why).
pub fn require_kvm() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("THAW_SKIP_KVM").as_deref() == Ok("1") {
        println!("SKIPPED: /dev/kvm is missing and THAW_SKIP_KVM=1");
        return false;
    }
    panic!("/dev/kvm is missing: KVM tests need real KVM (set THAW_SKIP_KVM=1 to skip them)");
}

/// A minimal x86_64 ELF executable: one PT_LOAD segment holding `code`, loaded and entered at
/// `load_addr`.
pub fn tiny_elf(load_addr: u64, code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let mut elf = vec![0u8; EHDR + PHDR];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little endian
    elf[6] = 1; // ELF version
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&load_addr.to_le_bytes()); // e_entry
    elf[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    elf[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes()); // e_ehsize
    elf[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes()); // e_phentsize
    elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = EHDR;
    elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    let offset = (EHDR + PHDR) as u64;
    elf[ph + 8..ph + 16].copy_from_slice(&offset.to_le_bytes());
    elf[ph + 16..ph + 24].copy_from_slice(&load_addr.to_le_bytes()); // p_vaddr
    elf[ph + 24..ph + 32].copy_from_slice(&load_addr.to_le_bytes()); // p_paddr
    elf[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    elf[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    elf[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    elf.extend_from_slice(code);
    elf
}

/// Console output captured in memory.
#[derive(Clone, Default)]
pub struct Capture(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Capture {
    /// Everything written so far, lossily decoded.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A 128 MiB machine booting the in-memory image `image` (see [`tiny_elf`]) on `vcpus` vCPUs.
pub fn tiny_config(image: Vec<u8>, vcpus: u8) -> crate::MachineConfig {
    crate::MachineConfig {
        mem_mib: 128,
        vcpus,
        kernel: crate::KernelSource::Bytes {
            name: "tiny".into(),
            image: image.into(),
        },
        initrd: None,
        cmdline: String::new(),
        vsock: None,
        disks: Vec::new(),
    }
}

/// `MSR_IA32_TSC`: it counts on by itself, paused or not.
pub const MSR_IA32_TSC: u32 = 0x10;

/// Masks what moves by itself in a saved vCPU between two saves, so that comparisons see only
/// what the vCPU carries: the TSC MSR.
pub fn mask_vcpu_clock(state: &mut crate::vcpu::state::VcpuState) {
    for msr in state.msrs.iter_mut().filter(|m| m.index == MSR_IA32_TSC) {
        msr.data = 0;
    }
}

/// Masks what moves by itself in a saved VM between two saves: kvmclock (guest nanoseconds,
/// and the host's wall time and TSC `KVM_GET_CLOCK` reports with them) and each PIT channel's
/// load time (a host timestamp; restore keeps the count, not the host time it was loaded at).
pub fn mask_vm_clock(state: &mut crate::vm_state::VmState) {
    state.clock.clock = 0;
    state.clock.realtime = 0;
    state.clock.host_tsc = 0;
    for channel in &mut state.pit.channels {
        channel.count_load_time = 0;
    }
}

/// Fills `shell`'s memory in place with what `mem`, laid out the same, holds; untouched
/// (all-zero) memory stays unallocated in the shell too.
pub fn fill_shell(shell: &mut crate::machine::MachineShell, mem: &crate::memory::GuestMemory) {
    use vm_memory::{Bytes, GuestAddress};
    const CHUNK: usize = 1 << 20;
    let mut chunk = vec![0u8; CHUNK];
    for (addr, bytes) in shell.ram_mut() {
        for (n, part) in bytes.chunks_mut(CHUNK).enumerate() {
            let from = &mut chunk[..part.len()];
            let at = addr + (n * CHUNK) as u64;
            mem.read_slice(from, GuestAddress(at)).unwrap();
            if from.iter().any(|&b| b != 0) {
                part.copy_from_slice(from);
            }
        }
    }
}

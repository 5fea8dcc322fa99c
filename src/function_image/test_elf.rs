//! Tiny ELF64 files for unit tests: just the parts the loader-style resolver and the `/init`
//! check read (`e_machine`, `PT_INTERP`, a `.dynamic` section with its `.dynstr`), so tests can
//! build any dependency graph without a compiler or the host's libraries.

use std::path::Path;

use object::elf;

/// What a test ELF file holds.
#[derive(Debug, Clone, Copy)]
pub struct TinyElf<'a> {
    /// `e_machine`.
    pub machine: elf::Machine,
    /// `DT_NEEDED` names.
    pub needed: &'a [&'a str],
    /// `DT_RUNPATH`, if any.
    pub runpath: Option<&'a str>,
    /// `DT_RPATH`, if any.
    pub rpath: Option<&'a str>,
    /// `PT_INTERP`, if any.
    pub interp: Option<&'a str>,
}

impl Default for TinyElf<'_> {
    fn default() -> Self {
        Self {
            machine: elf::EM_X86_64,
            needed: &[],
            runpath: None,
            rpath: None,
            interp: None,
        }
    }
}

impl TinyElf<'_> {
    /// The file's bytes (little-endian ELF64).
    pub fn build(&self) -> Vec<u8> {
        const EHDR: usize = 64;
        const PHDR: usize = 56;
        const SHDR: usize = 64;
        let phnum = usize::from(self.interp.is_some());
        let mut data = vec![0u8; EHDR + phnum * PHDR];

        let interp_off = data.len();
        if let Some(interp) = self.interp {
            data.extend_from_slice(interp.as_bytes());
            data.push(0);
        }
        let interp_len = data.len() - interp_off;

        let mut dynstr = vec![0u8];
        let mut string = |s: &str| {
            let at = dynstr.len() as u64;
            dynstr.extend_from_slice(s.as_bytes());
            dynstr.push(0);
            at
        };
        let mut entries: Vec<(elf::DynamicTag, u64)> = self
            .needed
            .iter()
            .map(|n| (elf::DT_NEEDED, string(n)))
            .collect();
        if let Some(p) = self.rpath {
            entries.push((elf::DT_RPATH, string(p)));
        }
        if let Some(p) = self.runpath {
            entries.push((elf::DT_RUNPATH, string(p)));
        }
        entries.push((elf::DT_NULL, 0));
        let dynstr_off = data.len();
        data.extend_from_slice(&dynstr);
        align8(&mut data);
        let dynamic_off = data.len();
        for (tag, value) in &entries {
            data.extend_from_slice(&tag.0.to_le_bytes());
            data.extend_from_slice(&value.to_le_bytes());
        }
        let dynamic_len = data.len() - dynamic_off;
        let shstrtab = b"\0.dynstr\0.dynamic\0.shstrtab\0";
        let shstrtab_off = data.len();
        data.extend_from_slice(shstrtab);
        align8(&mut data);

        let shoff = data.len();
        data.extend_from_slice(&[0u8; SHDR]); // the null section
        let mut section =
            |name: u32, kind: elf::SectionType, off: usize, size: usize, link: u32, ent: u64| {
                data.extend_from_slice(&name.to_le_bytes());
                data.extend_from_slice(&kind.0.to_le_bytes());
                data.extend_from_slice(&0u64.to_le_bytes()); // flags
                data.extend_from_slice(&0u64.to_le_bytes()); // addr
                data.extend_from_slice(&(off as u64).to_le_bytes());
                data.extend_from_slice(&(size as u64).to_le_bytes());
                data.extend_from_slice(&link.to_le_bytes());
                data.extend_from_slice(&0u32.to_le_bytes()); // info
                data.extend_from_slice(&1u64.to_le_bytes()); // addralign
                data.extend_from_slice(&ent.to_le_bytes());
            };
        section(1, elf::SHT_STRTAB, dynstr_off, dynstr.len(), 0, 0);
        section(9, elf::SHT_DYNAMIC, dynamic_off, dynamic_len, 1, 16);
        section(18, elf::SHT_STRTAB, shstrtab_off, shstrtab.len(), 0, 0);

        let mut header = Vec::with_capacity(EHDR);
        header.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
        header.extend_from_slice(&[0u8; 8]);
        header.extend_from_slice(&elf::ET_DYN.0.to_le_bytes());
        header.extend_from_slice(&self.machine.0.to_le_bytes());
        header.extend_from_slice(&1u32.to_le_bytes()); // version
        header.extend_from_slice(&0u64.to_le_bytes()); // entry
        let phoff = if phnum > 0 { EHDR as u64 } else { 0 };
        header.extend_from_slice(&phoff.to_le_bytes());
        header.extend_from_slice(&(shoff as u64).to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes()); // flags
        header.extend_from_slice(&(EHDR as u16).to_le_bytes());
        header.extend_from_slice(&(PHDR as u16).to_le_bytes());
        header.extend_from_slice(&(phnum as u16).to_le_bytes());
        header.extend_from_slice(&(SHDR as u16).to_le_bytes());
        header.extend_from_slice(&4u16.to_le_bytes()); // shnum
        header.extend_from_slice(&3u16.to_le_bytes()); // shstrndx
        data[..EHDR].copy_from_slice(&header);

        if self.interp.is_some() {
            let mut ph = Vec::with_capacity(PHDR);
            ph.extend_from_slice(&elf::PT_INTERP.0.to_le_bytes());
            ph.extend_from_slice(&elf::PF_R.0.to_le_bytes());
            ph.extend_from_slice(&(interp_off as u64).to_le_bytes());
            ph.extend_from_slice(&(interp_off as u64).to_le_bytes()); // vaddr
            ph.extend_from_slice(&(interp_off as u64).to_le_bytes()); // paddr
            ph.extend_from_slice(&(interp_len as u64).to_le_bytes());
            ph.extend_from_slice(&(interp_len as u64).to_le_bytes());
            ph.extend_from_slice(&1u64.to_le_bytes());
            data[EHDR..EHDR + PHDR].copy_from_slice(&ph);
        }
        data
    }
}

fn align8(data: &mut Vec<u8>) {
    while data.len() % 8 != 0 {
        data.push(0);
    }
}

/// Writes `spec` to `path`, executable.
pub fn write_elf(path: &Path, spec: &TinyElf<'_>) {
    use std::os::unix::fs::PermissionsExt;
    #[allow(clippy::unwrap_used)] // a test helper: failing loudly is the point
    {
        std::fs::write(path, spec.build()).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

//! Loading what the guest boots: an ELF `vmlinux` (entered in 64-bit mode exactly as Firecracker
//! does) or a bzImage (through linux-loader, entered at its 64-bit entry), plus the initrd, the
//! command line, the zero page with its e820 map, the MP table and the ACPI tables.

pub mod acpi;
pub mod cpu;
pub mod mptable;

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader, KernelLoaderResult, load_cmdline};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::KernelSource;
use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START, ZERO_PAGE_START,
};
use crate::memory::{self, GuestMemory};

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELF_CLASS_64: u8 = 2;
const ELF_MACHINE_X86_64: u16 = 62;
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// The 64-bit entry of a bzImage's protected-mode part is 0x200 bytes in.
const BZIMAGE_ENTRY_64_OFFSET: u64 = 0x200;
const XLF_KERNEL_64: u16 = 1 << 0;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const E820_RAM: u32 = 1;
const PAGE_SIZE: u64 = 4096;

/// What kind of image was booted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KernelFormat {
    /// An ELF `vmlinux` (or the test guest), entered at `e_entry` in 64-bit mode.
    Elf,
    /// A bzImage, entered at its 64-bit entry point.
    BzImage,
}

/// Where the loaded guest starts.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// Guest-physical (identity-mapped) entry point.
    pub entry: GuestAddress,
    /// The format that was found.
    pub format: KernelFormat,
    /// Where the initrd went, and its size.
    pub initrd: Option<(GuestAddress, u64)>,
}

/// The guest image could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel image {path}")]
    KernelRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error("{image} is neither an ELF vmlinux nor a bzImage (no ELF magic, no \"HdrS\" at 0x202)")]
    UnknownFormat {
        /// The image.
        image: String,
    },
    /// An ELF that is not a 64-bit x86 executable.
    #[error("{image} is an ELF file but not a 64-bit x86_64 executable")]
    WrongElf {
        /// The image.
        image: String,
    },
    /// A bzImage without a 64-bit entry point.
    #[error("{image} is a bzImage without a 64-bit entry point (XLF_KERNEL_64 unset)")]
    NotA64BitKernel {
        /// The image.
        image: String,
    },
    /// linux-loader refused the image (bad headers, segments outside memory...).
    #[error("cannot load kernel image {image}: {source}")]
    Load {
        /// The image.
        image: String,
        /// Why.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initrd cannot be opened or read.
    #[error("cannot read initrd {path}")]
    InitrdRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error(
        "initrd {path} is {size} bytes but only {available} bytes of guest memory are free for it \
         (give the guest more memory with --mem-mib)"
    )]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Room between the kernel's end and the highest address the initrd may use.
        available: u64,
    },
    /// The command line is invalid for the boot protocol.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures into guest memory failed.
    #[error("cannot write the zero page: {0}")]
    ZeroPage(String),
    /// The CPU tables do not fit.
    #[error(transparent)]
    Tables(#[from] cpu::TableWriteError),
    /// The MP table does not fit.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// The ACPI tables cannot be built or do not fit.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
}

/// Bytes of an image, from a file or memory, readable by linux-loader.
enum Image {
    File(File),
    Memory(Cursor<std::sync::Arc<[u8]>>),
}

impl Image {
    fn open(source: &KernelSource) -> Result<Self, BootError> {
        match source {
            KernelSource::Path(path) => {
                File::open(path)
                    .map(Image::File)
                    .map_err(|source| BootError::KernelRead {
                        path: path.clone(),
                        source,
                    })
            }
            KernelSource::Bytes { image, .. } => Ok(Image::Memory(Cursor::new(image.clone()))),
        }
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns how many were available.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let reader: &mut dyn ReadSeek = match self {
            Image::File(f) => f,
            Image::Memory(c) => c,
        };
        reader.seek(SeekFrom::Start(offset))?;
        let mut filled = 0;
        while filled < buf.len() {
            match reader.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        Ok(filled)
    }
}

trait ReadSeek: Read + Seek {}
impl<T: Read + Seek> ReadSeek for T {}

fn detect_format(image: &mut Image, name: &str) -> Result<KernelFormat, BootError> {
    let io_err = |source| BootError::KernelRead {
        path: PathBuf::from(name),
        source,
    };
    let mut ident = [0u8; 20];
    let n = image.read_at(0, &mut ident).map_err(io_err)?;
    if n >= 4 && &ident[..4] == ELF_MAGIC {
        let machine = u16::from_le_bytes([ident[18], ident[19]]);
        if n < ident.len() || ident[4] != ELF_CLASS_64 || machine != ELF_MACHINE_X86_64 {
            return Err(BootError::WrongElf {
                image: name.to_string(),
            });
        }
        return Ok(KernelFormat::Elf);
    }
    let mut magic = [0u8; 4];
    let n = image
        .read_at(BZIMAGE_MAGIC_OFFSET, &mut magic)
        .map_err(io_err)?;
    if n == 4 && u32::from_le_bytes(magic) == BZIMAGE_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnknownFormat {
        image: name.to_string(),
    })
}

fn load_kernel(
    mem: &GuestMemory,
    image: &mut Image,
    format: KernelFormat,
) -> Result<KernelLoaderResult, linux_loader::loader::Error> {
    let himem = Some(GuestAddress(HIMEM_START));
    match (format, image) {
        (KernelFormat::Elf, Image::File(f)) => Elf::load(mem, None, f, himem),
        (KernelFormat::Elf, Image::Memory(c)) => Elf::load(mem, None, c, himem),
        (KernelFormat::BzImage, Image::File(f)) => BzImage::load(mem, None, f, himem),
        (KernelFormat::BzImage, Image::Memory(c)) => BzImage::load(mem, None, c, himem),
    }
}

/// Loads the kernel, initrd and command line into `mem` and writes the zero page, the MP table,
/// the ACPI tables (describing `virtio_devices` in the DSDT) and the boot CPU tables. Nothing
/// here touches KVM. The caller puts the `virtio_mmio.device=` words on the command line.
pub fn load(
    mem: &GuestMemory,
    kernel: &KernelSource,
    initrd: Option<&Path>,
    cmdline: &str,
    vcpus: u8,
    cpu_signature: mptable::CpuSignature,
    virtio_devices: &[acpi::VirtioMmioDevice],
) -> Result<BootInfo, BootError> {
    let name = kernel.to_string();
    let mut image = Image::open(kernel)?;
    let format = detect_format(&mut image, &name)?;
    let loaded = load_kernel(mem, &mut image, format).map_err(|source| BootError::Load {
        image: name.clone(),
        source,
    })?;

    let entry = match format {
        KernelFormat::Elf => loaded.kernel_load,
        KernelFormat::BzImage => {
            let hdr = loaded.setup_header.unwrap_or_default();
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::NotA64BitKernel { image: name });
            }
            loaded
                .kernel_load
                .checked_add(BZIMAGE_ENTRY_64_OFFSET)
                .ok_or(BootError::NotA64BitKernel { image: name })?
        }
    };

    let cmdline = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes()
        .len();

    let initrd_addr_max = loaded
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|max| *max != 0)
        .unwrap_or(MMIO_GAP_START - 1);
    let initrd = match initrd {
        Some(path) => Some(load_initrd(mem, path, loaded.kernel_end, initrd_addr_max)?),
        None => None,
    };

    let rsdp = acpi::write(mem, vcpus, virtio_devices)?;
    let mut params = zero_page(mem, loaded.setup_header, cmdline_len, initrd);
    // Saves the kernel its scan of the BIOS area for the RSDP.
    params.acpi_rsdp_addr = rsdp.raw_value();
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::ZeroPage(e.to_string()))?;

    mptable::write(mem, vcpus, cpu_signature)?;
    cpu::write_boot_tables(mem)?;

    Ok(BootInfo {
        entry,
        format,
        initrd,
    })
}

/// Reads the initrd to the highest page-aligned address under both the top of low RAM and the
/// kernel's `initrd_addr_max`, above the kernel.
fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    initrd_addr_max: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let io_err = |source| BootError::InitrdRead {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let size = file.metadata().map_err(io_err)?.len();
    let top = memory::low_ram_end(mem).min(initrd_addr_max.saturating_add(1));
    let lowest = kernel_end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let available = top.saturating_sub(lowest);
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        available,
    };
    if size > available || size > u64::from(u32::MAX) {
        return Err(too_large());
    }
    let start = (top - size) & !(PAGE_SIZE - 1);
    if start < lowest {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    read_into_guest(mem, GuestAddress(start), &mut file, len).map_err(io_err)?;
    Ok((GuestAddress(start), size))
}

fn read_into_guest(
    mem: &GuestMemory,
    addr: GuestAddress,
    src: &mut File,
    len: usize,
) -> std::io::Result<()> {
    mem.read_exact_volatile_from(addr, src, len)
        .map_err(|e| std::io::Error::other(e.to_string()))
}

fn zero_page(
    mem: &GuestMemory,
    setup_header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(GuestAddress, u64)>,
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = BZIMAGE_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let mut e820 = vec![(0, EBDA_START)];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            e820.push((start, end - start));
        }
    }
    for (i, (addr, size)) in e820.into_iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: E820_RAM,
        };
        params.e820_entries = (i + 1) as u8;
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vm_memory::Bytes;

    fn bytes(name: &str, image: Vec<u8>) -> KernelSource {
        KernelSource::Bytes {
            name: name.into(),
            image: Arc::from(image),
        }
    }

    fn elf_header(class: u8, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(ELF_MAGIC);
        h[4] = class;
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h
    }

    fn mem() -> GuestMemory {
        memory::create_guest_memory(128 << 20).unwrap()
    }

    fn boot(kernel: &KernelSource) -> Result<BootInfo, BootError> {
        load(
            &mem(),
            kernel,
            None,
            "",
            1,
            mptable::CpuSignature::default(),
            &[],
        )
    }

    #[test]
    fn rejects_image_that_is_neither_elf_nor_bzimage() {
        let err = boot(&bytes("junk", vec![0x55; 4096])).unwrap_err();
        assert!(matches!(err, BootError::UnknownFormat { .. }), "{err}");
        let err = boot(&bytes("tiny", vec![1])).unwrap_err();
        assert!(matches!(err, BootError::UnknownFormat { .. }), "{err}");
    }

    #[test]
    fn rejects_32_bit_or_foreign_elf() {
        let err = boot(&bytes("elf32", elf_header(1, ELF_MACHINE_X86_64))).unwrap_err();
        assert!(matches!(err, BootError::WrongElf { .. }), "{err}");
        let err = boot(&bytes("arm", elf_header(ELF_CLASS_64, 183))).unwrap_err();
        assert!(matches!(err, BootError::WrongElf { .. }), "{err}");
    }

    #[test]
    fn rejects_truncated_elf() {
        let err = boot(&bytes("truncated", elf_header(ELF_CLASS_64, 62))).unwrap_err();
        assert!(matches!(err, BootError::Load { .. }), "{err}");
    }

    #[test]
    fn rejects_missing_kernel_file() {
        let err = boot(&KernelSource::Path("/nonexistent/vmlinux".into())).unwrap_err();
        assert!(matches!(err, BootError::KernelRead { .. }), "{err}");
    }

    #[test]
    fn rejects_bzimage_without_64_bit_entry() {
        // A minimal bzImage header: boot protocol 2.12, loaded high, but XLF_KERNEL_64 clear.
        let mut image = vec![0u8; 0x2000];
        image[0x1f1] = 1; // setup_sects
        image[0x202..0x206].copy_from_slice(&BZIMAGE_MAGIC.to_le_bytes());
        image[0x206..0x208].copy_from_slice(&0x020cu16.to_le_bytes());
        image[0x211] = 1; // loadflags: LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        let err = boot(&bytes("bz32", image)).unwrap_err();
        assert!(matches!(err, BootError::NotA64BitKernel { .. }), "{err}");
    }

    #[test]
    fn places_initrd_at_top_of_low_memory_or_refuses_it() {
        let mem = mem();
        let dir = std::env::temp_dir().join(format!("thaw-initrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let small = dir.join("small");
        std::fs::write(&small, b"initrd!").unwrap();
        let (addr, size) = load_initrd(&mem, &small, 0x20_0000, u64::MAX).unwrap();
        assert_eq!(size, 7);
        assert_eq!(addr.raw_value() % PAGE_SIZE, 0);
        assert!(addr.raw_value() + size <= 128 << 20);
        let mut back = [0u8; 7];
        mem.read_slice(&mut back, addr).unwrap();
        assert_eq!(&back, b"initrd!");

        let big = dir.join("big");
        let f = File::create(&big).unwrap();
        f.set_len(129 << 20).unwrap();
        let err = load_initrd(&mem, &big, 0x20_0000, u64::MAX).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn zero_page_has_e820_around_ebda_and_gap() {
        let mem = memory::create_guest_memory(5 << 30).unwrap();
        let p = zero_page(&mem, None, 10, Some((GuestAddress(0x100_0000), 0x1000)));
        assert_eq!(p.e820_entries, 3);
        let e = p.e820_table;
        assert_eq!((e[0].addr, e[0].size), (0, EBDA_START));
        assert_eq!(
            (e[1].addr, e[1].size),
            (HIMEM_START, MMIO_GAP_START - HIMEM_START)
        );
        assert_eq!({ e[2].addr }, 1 << 32);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x100_0000);
    }
}

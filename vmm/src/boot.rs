//! Loading a guest kernel and what it needs to start: the image itself (bzImage through the
//! 64-bit boot protocol, or an ELF vmlinux through PVH), the initrd, the command line, and the
//! boot structure that points at all of them (`boot_params` or `hvm_start_info`).
//!
//! This module writes guest memory only; vCPU registers are set in [`crate::cpu`] from the
//! [`BootInfo`] it returns.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, Cmdline, KernelLoader};
use thiserror::Error;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_HOLE_START, PVH_INFO_START,
    PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::memory::memory_map;

/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// `boot_params.hdr.boot_flag`.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `boot_params.hdr.header` ("HdrS").
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: undefined/other boot loader.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Offset of the 64-bit entry point from the start of the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Default minimum alignment of a relocatable kernel.
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// Page size, for initrd alignment.
const PAGE_SIZE: u64 = 4096;
/// Max entries in the zero page's e820 table.
const E820_MAX_ENTRIES_ZEROPAGE: usize = 128;
/// ELF magic.
const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];

/// How the boot vCPU must be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode at `entry`, RSI = zero page.
    Linux64 {
        /// 64-bit entry point.
        entry: u64,
    },
    /// 32-bit protected mode at `entry`, EBX = `hvm_start_info`.
    Pvh {
        /// PVH entry point.
        entry: u64,
    },
}

/// What [`load`] set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    /// How to enter the kernel.
    pub mode: EntryMode,
    /// Where the initrd went, and its size.
    pub initrd: Option<(u64, u64)>,
}

/// Errors while loading the guest's boot images.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file cannot be read.
    #[error("cannot read kernel image")]
    KernelFile(#[source] std::io::Error),
    /// The kernel image is not a loadable bzImage or ELF.
    #[error("cannot load kernel image")]
    KernelLoad(#[source] linux_loader::loader::Error),
    /// An ELF kernel without a PVH entry note.
    #[error("ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build it with CONFIG_PVH=y or boot the bzImage")]
    NoPvhEntry,
    /// The initrd cannot be read.
    #[error("cannot read initrd")]
    InitrdFile(#[source] std::io::Error),
    /// The initrd does not fit in guest RAM.
    #[error("initrd of {0} bytes does not fit in guest memory")]
    InitrdTooBig(u64),
    /// The command line is invalid.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write {0} into guest memory")]
    GuestWrite(&'static str),
}

/// Load the kernel, initrd and command line, and write the boot structure.
pub fn load(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp_addr: u64,
) -> Result<BootInfo, BootError> {
    let mut file = File::open(kernel).map_err(BootError::KernelFile)?;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).map_err(BootError::KernelFile)?;
    file.seek(SeekFrom::Start(0))
        .map_err(BootError::KernelFile)?;

    let cmdline = write_cmdline(mem, cmdline)?;
    let mem_size = mem.iter().map(|r| r.len()).sum::<u64>();

    if magic == ELF_MAGIC {
        let result = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(BootError::KernelLoad)?;
        let entry = match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => addr.raw_value(),
            _ => return Err(BootError::NoPvhEntry),
        };
        let initrd = match initrd {
            Some(path) => Some(load_initrd(mem, path, u64::from(u32::MAX))?),
            None => None,
        };
        write_pvh_start_info(mem, mem_size, cmdline, initrd, rsdp_addr)?;
        Ok(BootInfo {
            mode: EntryMode::Pvh { entry },
            initrd,
        })
    } else {
        let result = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(BootError::KernelLoad)?;
        let mut params = boot_params::default();
        if let Some(hdr) = result.setup_header {
            params.hdr = hdr;
        }
        let initrd_max = match params.hdr.initrd_addr_max {
            0 => 0x37ff_ffff,
            m => u64::from(m),
        };
        let initrd = match initrd {
            Some(path) => Some(load_initrd(mem, path, initrd_max)?),
            None => None,
        };
        write_zero_page(mem, &mut params, mem_size, cmdline, initrd, rsdp_addr)?;
        Ok(BootInfo {
            mode: EntryMode::Linux64 {
                entry: result.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
            },
            initrd,
        })
    }
}

/// Write the NUL-terminated command line; returns its length without the NUL.
fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, BootError> {
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    cl.insert_str(cmdline).map_err(BootError::Cmdline)?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|_| BootError::GuestWrite("command line"))?;
    Ok(cmdline.len())
}

/// Place the initrd page-aligned as high as possible below `max_addr` and the MMIO hole.
fn load_initrd(mem: &GuestMemoryMmap, path: &Path, max_addr: u64) -> Result<(u64, u64), BootError> {
    let data = std::fs::read(path).map_err(BootError::InitrdFile)?;
    let size = data.len() as u64;
    let low_end = mem
        .iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|&end| end <= MMIO_HOLE_START)
        .max()
        .unwrap_or(0);
    let top = low_end.min(max_addr.saturating_add(1));
    let addr = top
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= HIMEM_START + (16 << 20).min(low_end / 2))
        .ok_or(BootError::InitrdTooBig(size))?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|_| BootError::GuestWrite("initrd"))?;
    Ok((addr, size))
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    _cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    rsdp_addr: u64,
) -> Result<(), BootError> {
    let map = memory_map(mem_size);
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp_addr,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))
            .map_err(|_| BootError::GuestWrite("PVH memory map"))?;
    }
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(|_| BootError::GuestWrite("PVH module list"))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(|_| BootError::GuestWrite("PVH start info"))
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    params: &mut boot_params,
    mem_size: u64,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    rsdp_addr: u64,
) -> Result<(), BootError> {
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp_addr;
    let map = memory_map(mem_size);
    for (i, e) in map.iter().take(E820_MAX_ENTRIES_ZEROPAGE).enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len().min(E820_MAX_ENTRIES_ZEROPAGE) as u8;
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::GuestWrite("boot_params"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_guest_memory, E820_RAM};
    use std::io::Write;

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0xab; 10_000]).unwrap();
        let (addr, size) = load_initrd(&mem, f.path(), u64::from(u32::MAX)).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + size <= 64 << 20);
        assert!(addr + size > (64 << 20) - 2 * PAGE_SIZE);
        let b: u8 = mem.read_obj(GuestAddress(addr + 9_999)).unwrap();
        assert_eq!(b, 0xab);
    }

    #[test]
    fn initrd_too_big_is_an_error() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![0; 15 << 20]).unwrap();
        assert!(matches!(
            load_initrd(&mem, f.path(), u64::from(u32::MAX)),
            Err(BootError::InitrdTooBig(_))
        ));
    }

    #[test]
    fn zero_page_carries_e820_cmdline_and_initrd() {
        let mem = create_guest_memory(128 << 20).unwrap();
        let mut params = boot_params::default();
        write_zero_page(
            &mem,
            &mut params,
            128 << 20,
            20,
            Some((0x700_0000, 0x1000)),
            0xe0000,
        )
        .unwrap();
        let back: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ back.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ back.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ back.hdr.cmdline_size }, 21);
        assert_eq!({ back.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ back.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(back.e820_entries, 3);
        assert_eq!({ back.e820_table[2].r#type }, E820_RAM);
        assert_eq!({ back.e820_table[2].addr }, HIMEM_START);
    }

    #[test]
    fn pvh_start_info_has_magic_memmap_and_module() {
        let mem = create_guest_memory(128 << 20).unwrap();
        write_pvh_start_info(&mem, 128 << 20, 10, Some((0x700_0000, 0x2000)), 0xe0000).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((m.paddr, m.size), (0x700_0000, 0x2000));
        let e: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(
                PVH_MEMMAP_START + 2 * std::mem::size_of::<hvm_memmap_table_entry>() as u64,
            ))
            .unwrap();
        assert_eq!(e.addr, HIMEM_START);
        assert_eq!(e.addr + e.size, 128 << 20);
    }

    #[test]
    fn garbage_kernel_is_rejected() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0x11; 8192]).unwrap();
        assert!(matches!(
            load(&mem, f.path(), None, "console=ttyS0", 0),
            Err(BootError::KernelLoad(_))
        ));
    }
}

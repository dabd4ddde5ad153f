//! Guest RAM: the regions around the 32-bit MMIO hole, and the memory map (e820 / PVH) that
//! describes them to the guest.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{EBDA_START, FOUR_GIB, HIMEM_START, MMIO_HOLE_START};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One memory-map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820_RAM or E820_RESERVED.
    pub kind: u32,
}

/// The guest-physical RAM ranges for `size` bytes of RAM: below the MMIO hole, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(FOUR_GIB), (size - low) as usize));
    }
    ranges
}

/// Allocate guest RAM, backed by transparent huge pages where the host allows them.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, vm_memory::mmap::FromRangesError> {
    let mem = GuestMemoryMmap::from_ranges(&ram_ranges(size))?;
    advise_huge_pages(&mem);
    Ok(mem)
}

/// Ask for transparent huge pages on guest RAM (`MADV_HUGEPAGE`), as QEMU and Cloud
/// Hypervisor do: with the host's THP mode `madvise` (Debian's default) RAM is otherwise
/// backed by 4 KiB pages, and KVM can then map the guest's 2 MiB kernel mappings only with
/// 4 KiB entries: more faults and, with shadow paging, more work for every guest page-table
/// change (measured on `kvm_pvm`: `resources/README.md`, boot step 5). Refused advice (THP
/// off) changes nothing, so it is logged, not fatal.
fn advise_huge_pages(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        let Ok(len) = usize::try_from(region.len()) else {
            continue;
        };
        let addr = region.as_ptr().cast::<libc::c_void>();
        // SAFETY: the range is one whole anonymous mapping owned by `mem`; MADV_HUGEPAGE only
        // changes how the kernel backs it, never its contents or validity.
        if unsafe { libc::madvise(addr, len, libc::MADV_HUGEPAGE) } != 0 {
            log::debug!(
                "guest RAM: MADV_HUGEPAGE refused: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The memory map the guest sees: low RAM up to the EBDA, the BIOS area reserved (the ACPI
/// tables live there), RAM from 1 MiB to the hole, and RAM above 4 GiB.
pub fn memory_map(size: u64) -> Vec<MemoryMapEntry> {
    let low = size.min(MMIO_HOLE_START);
    let mut map = vec![
        MemoryMapEntry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        MemoryMapEntry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
        MemoryMapEntry {
            addr: HIMEM_START,
            size: low - HIMEM_START,
            kind: E820_RAM,
        },
    ];
    if size > low {
        map.push(MemoryMapEntry {
            addr: FOUR_GIB,
            size: size - low,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region_and_three_entries() {
        let size = 256 << 20;
        assert_eq!(ram_ranges(size), vec![(GuestAddress(0), size as usize)]);
        let map = memory_map(size);
        assert_eq!(map.len(), 3);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, size - (HIMEM_START - EBDA_START));
        assert_eq!(map[2].addr + map[2].size, size);
    }

    #[test]
    fn large_memory_continues_above_4g() {
        let size = 4u64 << 30;
        let ranges = ram_ranges(size);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[1].0, GuestAddress(FOUR_GIB));
        assert_eq!(ranges[1].1 as u64, size - MMIO_HOLE_START);
        let map = memory_map(size);
        assert_eq!(map.last().unwrap().addr, FOUR_GIB);
        // Entries never overlap and are sorted.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }
}

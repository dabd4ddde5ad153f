//! The x86_64 machine layout: where minivmm puts guest RAM, boot structures, ACPI tables and
//! devices. Every guest-visible address, port and interrupt number lives here, so the boot
//! code, the ACPI tables and the device wiring cannot disagree.

/// Start of the GDT the VMM builds for the boot vCPU.
pub const BOOT_GDT_START: u64 = 0x500;
/// Start of the (empty) IDT loaded at boot.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd is module 0).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux `boot_params` ("zero page") for the 64-bit bzImage entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit entry: PML4, then PDPT, then PD.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages covering the first GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted (the Linux x86 limit).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of conventional low memory (EBDA starts here).
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables: RSDP first, in the BIOS area where a kernel may also scan for it.
pub const ACPI_START: u64 = 0xe0000;
/// Upper bound of the ACPI table area.
pub const ACPI_END: u64 = 0x100000;
/// Where the kernel is loaded (and the first byte of "high" memory).
pub const HIMEM_START: u64 = 0x100000;
/// Start of the 32-bit MMIO hole below 4 GiB; RAM beyond it continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First byte above 4 GiB.
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// The IOAPIC's MMIO base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APICs' MMIO base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// First virtio-mmio slot; each device gets [`VIRTIO_MMIO_SLOT_SIZE`].
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// First GSI for virtio-mmio devices.
pub const VIRTIO_MMIO_FIRST_GSI: u32 = 5;

/// Smallest guest RAM accepted: room for the boot structures, the kernel and an initrd.
pub const MIN_MEMORY: u64 = 16 << 20;

/// The four ISA COM ports: (I/O base, IRQ).
pub const COM_PORTS: [(u16, u32); 4] = [(0x3f8, 4), (0x2f8, 3), (0x3e8, 4), (0x2e8, 3)];
/// Size of a 16550's register window.
pub const COM_PORT_SIZE: u64 = 8;

/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port (0xFE here resets the machine).
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// I/O length claimed for the i8042 (0x60..=0x64).
pub const I8042_PORT_LEN: u64 = 5;
/// The i8042's keyboard IRQ.
pub const I8042_IRQ: u32 = 1;

/// Base of the ACPI power-management ports (hardware-reduced sleep and reset registers).
pub const ACPI_PM_BASE: u16 = 0x600;
/// I/O length claimed for the power-management ports.
pub const ACPI_PM_LEN: u64 = 4;
/// The ACPI Generic Event Device's event register (one 32-bit register, read to clear), right
/// after the power-management ports.
pub const ACPI_GED_BASE: u16 = 0x604;
/// I/O length claimed for the GED register.
pub const ACPI_GED_LEN: u64 = 4;
/// The GED's interrupt (level, active high): the last IOAPIC pin, above every virtio-mmio GSI
/// ([`MAX_VIRTIO_MMIO_DEVICES`] keeps them below it).
pub const ACPI_GED_GSI: u32 = 23;
/// Most virtio-mmio devices: one GSI each from [`VIRTIO_MMIO_FIRST_GSI`] up to below
/// [`ACPI_GED_GSI`].
pub const MAX_VIRTIO_MMIO_DEVICES: usize = (ACPI_GED_GSI - VIRTIO_MMIO_FIRST_GSI) as usize;

/// The SCI interrupt declared in the FADT (unused in hardware-reduced mode, but the field is
/// read by guests).
pub const ACPI_SCI_IRQ: u16 = 9;

/// IRQ numbers of the legacy PIC/IOAPIC pins (GSI 0..=23).
pub const IOAPIC_NUM_PINS: u32 = 24;

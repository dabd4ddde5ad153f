//! The Intel MultiProcessor Specification 1.4 table: a floating pointer structure at the start
//! of the EBDA ([`EBDA_START`]) and the configuration table right after it, describing the
//! vCPUs, the ISA bus, the IOAPIC and the ISA interrupt routing.
//!
//! A Linux guest with ACPI takes its SMP and interrupt configuration from the MADT, but x86
//! Linux looks for an MP floating pointer on every boot before it reads ACPI: in the first KiB
//! of RAM, in the last KiB of base memory (here), then in the whole BIOS area 0xF0000..0xFFFFF,
//! remapping the memory for each 16-byte step. Without a table that last scan is 4096
//! remap/unmap pairs, which costs about 3.9 s of guest time on a `kvm_pvm` host (measured:
//! `resources/README.md`). With the table the scan stops at its second place. It also lets a
//! guest booted with `acpi=off` find its processors and IOAPIC, as Firecracker's table does.
//!
//! The routing matches the MADT: the IOAPIC has id 0 (what KVM's in-kernel IOAPIC reports in
//! its ID register) and IRQ n is IOAPIC pin n, no overrides, for every pin: the ISA IRQs and
//! above them the virtio-mmio devices' GSIs, which a guest without ACPI gets from its command
//! line (`virtio_mmio.device=...:GSI`) and must find routed, as in Firecracker's table.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{ACPI_START, EBDA_START, IOAPIC_ADDR, IOAPIC_NUM_PINS, LAPIC_ADDR};

/// Where the floating pointer structure goes (16-byte aligned, scanned by the guest).
pub const MPTABLE_START: u64 = EBDA_START;
/// The space both structures may use: from the EBDA up to the ACPI tables (reserved in the
/// e820 map; a table for 254 vCPUs takes 5.3 KiB).
const MPTABLE_MAX_LEN: usize = (ACPI_START - MPTABLE_START) as usize;

/// "_MP_": floating pointer signature.
const MPF_SIGNATURE: [u8; 4] = *b"_MP_";
/// "PCMP": configuration table signature.
const MPC_SIGNATURE: [u8; 4] = *b"PCMP";
/// MP specification revision 1.4.
const MP_SPEC_REV_1_4: u8 = 4;
/// Length of the floating pointer structure in 16-byte units.
const MPF_LEN_PARAGRAPHS: u8 = 1;
const MPF_SIZE: usize = 16;
const MPC_HEADER_SIZE: usize = 44;
const MPC_OEM: [u8; 8] = *b"MINIVMM ";
const MPC_PRODUCT: [u8; 12] = *b"000000000000";

/// Entry types and sizes.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_PROCESSOR_SIZE: usize = 20;
const MP_SMALL_ENTRY_SIZE: usize = 8;

/// Processor entry flags: enabled, bootstrap processor.
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Local APIC version of an integrated APIC (as KVM's reports).
const APIC_VERSION: u8 = 0x14;
/// Processor signature (family 6) and feature flags (FPU, APIC) for the processor entries.
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_FPU: u32 = 1 << 0;
const CPU_FEATURE_APIC: u32 = 1 << 9;

/// The ISA bus: id 0.
const ISA_BUS_ID: u8 = 0;
const BUS_TYPE_ISA: [u8; 6] = *b"ISA   ";
/// The IOAPIC's id and version (KVM's in-kernel IOAPIC: id register 0, version 0x11).
const IOAPIC_ID: u8 = 0;
const IOAPIC_VERSION: u8 = 0x11;
const MPC_APIC_USABLE: u8 = 1;
/// Interrupt types: vectored, NMI, external (8259).
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// Polarity and trigger "conform to the bus" (edge, active high on ISA).
const MP_IRQ_DEFAULT: u16 = 0;
/// Number of IRQs routed to IOAPIC pins of the same number: all of them.
const ROUTED_IRQS: u8 = IOAPIC_NUM_PINS as u8;
/// Destination "every local APIC" for a local interrupt entry.
const ALL_LOCAL_APICS: u8 = 0xff;
/// Local APIC pins: LINT0 takes the 8259's ExtINT, LINT1 NMI.
const LINT0: u8 = 0;
const LINT1: u8 = 1;

/// Errors while writing the MP table.
#[derive(Debug, Error)]
pub enum MptableError {
    /// More vCPUs than fit in the reserved area.
    #[error("an MP table for {0} vCPUs does not fit in {MPTABLE_MAX_LEN} bytes")]
    TooManyCpus(u8),
    /// Guest memory could not take the table.
    #[error("cannot write the MP table into guest memory")]
    GuestWrite,
}

/// Two's-complement checksum: the byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The configuration table (header and entries) for `vcpus` processors.
fn config_table(vcpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        entries.push(MP_PROCESSOR);
        entries.push(id);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_FPU | CPU_FEATURE_APIC).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
        debug_assert_eq!(entries.len(), usize::from(count) * MP_PROCESSOR_SIZE);
    }
    entries.push(MP_BUS);
    entries.push(ISA_BUS_ID);
    entries.extend_from_slice(&BUS_TYPE_ISA);
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, IOAPIC_ID, IOAPIC_VERSION, MPC_APIC_USABLE]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..ROUTED_IRQS {
        entries.push(MP_INTSRC);
        entries.push(MP_INT);
        entries.extend_from_slice(&MP_IRQ_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, irq, IOAPIC_ID, irq]);
        count += 1;
    }
    for (kind, pin) in [(MP_EXTINT, LINT0), (MP_NMI, LINT1)] {
        entries.push(MP_LINTSRC);
        entries.push(kind);
        entries.extend_from_slice(&MP_IRQ_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, 0, ALL_LOCAL_APICS, pin]);
        count += 1;
    }

    debug_assert_eq!(
        entries.len(),
        usize::from(vcpus) * MP_PROCESSOR_SIZE
            + usize::from(count - u16::from(vcpus)) * MP_SMALL_ENTRY_SIZE
    );
    let len = MPC_HEADER_SIZE + entries.len();
    let mut table = Vec::with_capacity(len);
    table.extend_from_slice(&MPC_SIGNATURE);
    // The length fits: the caller bounds the vCPU count.
    table.extend_from_slice(&(len as u16).to_le_bytes());
    table.push(MP_SPEC_REV_1_4);
    table.push(0); // checksum, below
    table.extend_from_slice(&MPC_OEM);
    table.extend_from_slice(&MPC_PRODUCT);
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes()); // its size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length, reserved
    debug_assert_eq!(table.len(), MPC_HEADER_SIZE);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// The floating pointer structure pointing at a configuration table at `config_addr`.
fn floating_pointer(config_addr: u32) -> [u8; MPF_SIZE] {
    let mut mpf = [0u8; MPF_SIZE];
    mpf[0..4].copy_from_slice(&MPF_SIGNATURE);
    mpf[4..8].copy_from_slice(&config_addr.to_le_bytes());
    mpf[8] = MPF_LEN_PARAGRAPHS;
    mpf[9] = MP_SPEC_REV_1_4;
    // mpf[11]: feature byte 1 = 0, a configuration table is present; the rest 0 (no IMCR,
    // virtual wire mode).
    mpf[10] = checksum(&mpf);
    mpf
}

/// Write the MP floating pointer and configuration table for `vcpus` processors at
/// [`MPTABLE_START`].
pub fn setup_mptable(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MptableError> {
    let table = config_table(vcpus);
    if MPF_SIZE + table.len() > MPTABLE_MAX_LEN {
        return Err(MptableError::TooManyCpus(vcpus));
    }
    let config_addr = MPTABLE_START + MPF_SIZE as u64;
    // The address is below 1 MiB.
    let mpf = floating_pointer(config_addr as u32);
    mem.write_slice(&mpf, GuestAddress(MPTABLE_START))
        .map_err(|_| MptableError::GuestWrite)?;
    mem.write_slice(&table, GuestAddress(config_addr))
        .map_err(|_| MptableError::GuestWrite)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn floating_pointer_and_table_checksum_and_link() {
        let mem = create_guest_memory(64 << 20).unwrap();
        setup_mptable(&mem, 2).unwrap();
        let mpf = read(&mem, MPTABLE_START, MPF_SIZE);
        assert_eq!(&mpf[0..4], b"_MP_");
        assert!(sums_to_zero(&mpf));
        assert_eq!(mpf[8], 1);
        assert_eq!(mpf[9], 4);
        assert_eq!(
            mpf[11], 0,
            "a configuration table, not a default configuration"
        );
        let addr = u32::from_le_bytes(mpf[4..8].try_into().unwrap()) as u64;
        assert_eq!(addr % 4, 0);
        let hdr = read(&mem, addr, MPC_HEADER_SIZE);
        assert_eq!(&hdr[0..4], b"PCMP");
        let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
        let table = read(&mem, addr, len);
        assert!(sums_to_zero(&table));
        assert_eq!(
            u32::from_le_bytes(table[36..40].try_into().unwrap()),
            LAPIC_ADDR
        );
        // 2 processors, the bus, the IOAPIC, 24 IRQ routes, 2 local interrupts.
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 2 + 1 + 1 + 24 + 2);
        assert_eq!(
            len,
            MPC_HEADER_SIZE + 2 * MP_PROCESSOR_SIZE + 28 * MP_SMALL_ENTRY_SIZE
        );
    }

    #[test]
    fn entries_describe_cpus_ioapic_and_isa_routing() {
        let table = config_table(3);
        let mut at = MPC_HEADER_SIZE;
        let mut cpus = Vec::new();
        let mut routes = Vec::new();
        let mut ioapic = None;
        let mut lints = Vec::new();
        while at < table.len() {
            let e = &table[at..];
            match e[0] {
                MP_PROCESSOR => {
                    cpus.push((e[1], e[3]));
                    at += MP_PROCESSOR_SIZE;
                    continue;
                }
                MP_BUS => assert_eq!(&e[2..8], b"ISA   "),
                MP_IOAPIC => ioapic = Some((e[1], u32::from_le_bytes(e[4..8].try_into().unwrap()))),
                MP_INTSRC => routes.push((e[1], e[5], e[6], e[7])),
                MP_LINTSRC => lints.push((e[1], e[7])),
                t => panic!("unknown entry type {t}"),
            }
            at += MP_SMALL_ENTRY_SIZE;
        }
        assert_eq!(at, table.len());
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1)], "cpu 0 is the BSP");
        assert_eq!(ioapic, Some((IOAPIC_ID, IOAPIC_ADDR)));
        assert_eq!(routes.len(), 24, "every IOAPIC pin is routed");
        for (irq, r) in routes.iter().enumerate() {
            assert_eq!(*r, (MP_INT, irq as u8, IOAPIC_ID, irq as u8));
        }
        assert_eq!(lints, vec![(MP_EXTINT, LINT0), (MP_NMI, LINT1)]);
    }

    #[test]
    fn the_largest_machine_fits_below_the_acpi_tables() {
        let mem = create_guest_memory(64 << 20).unwrap();
        setup_mptable(&mem, crate::cli::MAX_VCPUS).unwrap();
        let len = MPF_SIZE + config_table(crate::cli::MAX_VCPUS).len();
        assert!(MPTABLE_START + len as u64 <= ACPI_START);
    }
}

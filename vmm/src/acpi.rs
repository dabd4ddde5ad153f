//! ACPI tables: RSDP, XSDT, a hardware-reduced FADT (sleep control/status and reset registers
//! on port I/O), a MADT (one local APIC per vCPU and the IOAPIC) and a DSDT describing the COM
//! ports (PNP0501), the virtio-mmio devices (LNRO0005) and the power button: a Generic Event
//! Device (ACPI0013) whose `_EVT` notifies a PNP0C0C button device, so a stock kernel finds
//! every device without command-line hints.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    ACPI_END, ACPI_GED_BASE, ACPI_GED_GSI, ACPI_GED_LEN, ACPI_PM_BASE, ACPI_SCI_IRQ, ACPI_START,
    IOAPIC_ADDR, LAPIC_ADDR,
};
use devices::power::GED_EVENT_POWER_BUTTON;

/// OEM id in every table header.
pub const OEM_ID: [u8; 6] = *b"MINVMM";
/// OEM revision in every table header.
const OEM_REVISION: u32 = 1;
/// DSDT revision (2 = 64-bit integers).
const DSDT_REVISION: u8 = 2;
/// Alignment of each table in guest memory.
const TABLE_ALIGN: u64 = 16;

/// Offsets of the power-management registers from [`ACPI_PM_BASE`].
pub const PM_SLEEP_CONTROL_OFFSET: u16 = 0;
/// Sleep status register offset.
pub const PM_SLEEP_STATUS_OFFSET: u16 = 1;
/// Reset register offset.
pub const PM_RESET_OFFSET: u16 = 2;
/// Value the guest writes to the reset register.
pub const PM_RESET_VALUE: u8 = 1;
/// The S5 (soft-off) sleep type, as `_S5_` declares it.
pub const SLEEP_TYPE_S5: u8 = 5;

/// FADT IA-PC boot architecture flags: no VGA, no CMOS RTC (so the guest does not probe ports
/// nobody answers). The 8042 flag stays clear: no PS/2 devices are declared.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// The ACPI notification value "status change": for a power button, "pressed".
const NOTIFY_STATUS_CHANGE: u8 = 0x80;
/// Width in bits of the GED event register (`GDAT`).
const GED_REGISTER_BITS: usize = 32;

/// A COM port as the DSDT declares it.
#[derive(Debug, Clone, Copy)]
pub struct ComPort {
    /// 1-based port number (COM1 = 1).
    pub index: u8,
    /// I/O base.
    pub base: u16,
    /// ISA IRQ.
    pub irq: u32,
}

/// A virtio-mmio device as the DSDT declares it.
#[derive(Debug, Clone, Copy)]
pub struct VirtioMmioSlot {
    /// MMIO base.
    pub base: u64,
    /// MMIO size.
    pub size: u64,
    /// GSI.
    pub gsi: u32,
}

/// Errors while writing the tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// The tables do not fit in the area reserved for them.
    #[error("ACPI tables need {0} bytes, more than the reserved area")]
    TooBig(u64),
    /// A guest-memory write failed.
    #[error("cannot write ACPI table {0} into guest memory")]
    GuestWrite(&'static str),
}

/// Build the DSDT body.
pub fn dsdt(com_ports: &[ComPort], virtio: &[VirtioMmioSlot]) -> Vec<u8> {
    let mut body = Vec::new();
    // \_S5_: the sleep type written to the sleep control register on power-off.
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&SLEEP_TYPE_S5, &0u8]),
    )
    .to_aml_bytes(&mut body);
    for port in com_ports {
        let io = aml::IO::new(port.base, port.base, 1, 8);
        let irq = aml::Interrupt::new(true, true, false, false, port.irq);
        let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
        let hid = aml::EISAName::new("PNP0501");
        let uid = u32::from(port.index);
        let name_hid = aml::Name::new("_HID".into(), &hid);
        let name_uid = aml::Name::new("_UID".into(), &uid);
        let name_crs = aml::Name::new("_CRS".into(), &crs);
        let path = format!("_SB_.COM{}", port.index);
        aml::Device::new(path.as_str().into(), vec![&name_hid, &name_uid, &name_crs])
            .to_aml_bytes(&mut body);
    }
    for (i, slot) in virtio.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, slot.base as u32, slot.size as u32);
        // Level-triggered, active high: the transport holds its line up while InterruptStatus
        // is non-zero, and KVM's IOAPIC re-delivers after EOI while it stays up.
        let irq = aml::Interrupt::new(true, false, false, false, slot.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let hid: &'static str = "LNRO0005";
        let uid = i as u32;
        let name_hid = aml::Name::new("_HID".into(), &hid);
        let name_uid = aml::Name::new("_UID".into(), &uid);
        let name_cca = aml::Name::new("_CCA".into(), &aml::ONE);
        let name_crs = aml::Name::new("_CRS".into(), &crs);
        let path = format!("_SB_.V{i:03X}");
        aml::Device::new(
            path.as_str().into(),
            vec![&name_hid, &name_uid, &name_cca, &name_crs],
        )
        .to_aml_bytes(&mut body);
    }
    power_button(&mut body);
    let mut sdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        *b"MVMMDSDT",
        OEM_REVISION,
    );
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

/// `\_SB_.PWRB` (PNP0C0C) and `\_SB_.GED_` (ACPI0013): the GED's interrupt runs `_EVT`,
/// which reads the event register (clearing it) and notifies the button when its bit is set.
fn power_button(body: &mut Vec<u8>) {
    let hid = aml::EISAName::new("PNP0C0C");
    let uid = 0u32;
    let name_hid = aml::Name::new("_HID".into(), &hid);
    let name_uid = aml::Name::new("_UID".into(), &uid);
    aml::Device::new("_SB_.PWRB".into(), vec![&name_hid, &name_uid]).to_aml_bytes(body);

    let ged_hid: &'static str = "ACPI0013";
    let name_hid = aml::Name::new("_HID".into(), &ged_hid);
    // Level-triggered, active high: the device holds the line while events are pending.
    let irq = aml::Interrupt::new(true, false, false, false, ACPI_GED_GSI);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let name_crs = aml::Name::new("_CRS".into(), &crs);
    let base = u64::from(ACPI_GED_BASE);
    let region = aml::OpRegion::new(
        "GDST".into(),
        aml::OpRegionSpace::SystemIO,
        &base,
        &ACPI_GED_LEN,
    );
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", GED_REGISTER_BITS)],
    );
    let gdat = aml::Path::new("GDAT");
    let store = aml::Store::new(&aml::Local(0), &gdat);
    let bit = GED_EVENT_POWER_BUTTON;
    // No target (ZeroOp, the null name): only the value is used.
    let masked = aml::And::new(&aml::ZERO, &aml::Local(0), &bit);
    let pressed = aml::Equal::new(&masked, &bit);
    let button = aml::Path::new("\\_SB_.PWRB");
    let notify_value = NOTIFY_STATUS_CHANGE;
    let notify = aml::Notify::new(&button, &notify_value);
    let check = aml::If::new(&pressed, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&store, &check]);
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![&name_hid, &name_uid, &name_crs, &region, &field, &evt],
    )
    .to_aml_bytes(body);
}

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// Build the FADT pointing at the DSDT.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, *b"MVMMFACP", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_addr);
    b.sci_int = ACPI_SCI_IRQ.into();
    b.iapc_boot_arch =
        (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT).into();
    b.sleep_control_reg = io_gas(ACPI_PM_BASE + PM_SLEEP_CONTROL_OFFSET);
    b.sleep_status_reg = io_gas(ACPI_PM_BASE + PM_SLEEP_STATUS_OFFSET);
    b.reset_reg = io_gas(ACPI_PM_BASE + PM_RESET_OFFSET);
    b.reset_value = PM_RESET_VALUE;
    let mut out = Vec::new();
    b.finalize().to_aml_bytes(&mut out);
    out
}

/// Build the MADT for `vcpus` processors.
pub fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"MVMMAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    let mut out = Vec::new();
    madt.to_aml_bytes(&mut out);
    out
}

/// Write all tables into guest memory at [`ACPI_START`]; returns the RSDP address.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    com_ports: &[ComPort],
    virtio: &[VirtioMmioSlot],
) -> Result<u64, AcpiError> {
    let align = |a: u64| (a + TABLE_ALIGN - 1) & !(TABLE_ALIGN - 1);
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    // The XSDT has three entries: FADT, MADT (the DSDT hangs off the FADT).
    let xsdt_len = 36 + 2 * 8;
    let dsdt_addr = align(xsdt_addr + xsdt_len);
    let dsdt = dsdt(com_ports, virtio);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(vcpus);
    let end = madt_addr + madt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooBig(end - ACPI_START));
    }
    let mut xsdt = XSDT::new(OEM_ID, *b"MVMMXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    debug_assert_eq!(xsdt_bytes.len() as u64, xsdt_len);
    let mut rsdp_bytes = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp_bytes);

    for (name, addr, bytes) in [
        ("RSDP", rsdp_addr, &rsdp_bytes),
        ("XSDT", xsdt_addr, &xsdt_bytes),
        ("DSDT", dsdt_addr, &dsdt),
        ("FADT", fadt_addr, &fadt),
        ("MADT", madt_addr, &madt),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|_| AcpiError::GuestWrite(name))?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn table_at(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let mut hdr = [0u8; 8];
        mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        t
    }

    #[test]
    fn every_table_checksums_and_links() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let ports = [
            ComPort {
                index: 1,
                base: 0x3f8,
                irq: 4,
            },
            ComPort {
                index: 2,
                base: 0x2f8,
                irq: 3,
            },
        ];
        let slots = [VirtioMmioSlot {
            base: 0xd000_0000,
            size: 0x1000,
            gsi: 5,
        }];
        let rsdp_addr = create_acpi_tables(&mem, 2, &ports, &slots).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(rsdp_addr)).unwrap();
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]), "RSDP v1 checksum");
        assert!(checksum_ok(&rsdp), "RSDP extended checksum");
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = table_at(&mem, xsdt_addr);
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries.len(), 2);
        let fadt = table_at(&mem, entries[0]);
        assert_eq!(&fadt[0..4], b"FACP");
        assert!(checksum_ok(&fadt));
        // X_DSDT at offset 140.
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table_at(&mem, dsdt_addr);
        assert_eq!(&dsdt[0..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        let body = &dsdt[36..];
        assert!(body.windows(4).any(|w| w == b"COM1"));
        assert!(body.windows(4).any(|w| w == b"COM2"));
        assert!(body.windows(8).any(|w| w == b"LNRO0005"));
        assert!(body.windows(4).any(|w| w == b"_S5_"));
        assert!(body.windows(8).any(|w| w == b"ACPI0013"));
        assert!(body.windows(4).any(|w| w == b"_EVT"));
        assert!(body.windows(4).any(|w| w == b"PWRB"));
        let madt = table_at(&mem, entries[1]);
        assert_eq!(&madt[0..4], b"APIC");
        assert!(checksum_ok(&madt));
        // Header 44 bytes, two local APICs of 8, one IOAPIC of 12.
        assert_eq!(madt.len(), 44 + 2 * 8 + 12);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_pm_registers() {
        let f = fadt(0x1234);
        let flags = u32::from_le_bytes(f[112..116].try_into().unwrap());
        assert_ne!(flags & (Flags::HwReducedAcpi as u32), 0);
        assert_ne!(flags & (Flags::ResetRegSup as u32), 0);
        // RESET_REG GAS at 116: space id 1 (I/O), address at 120.
        assert_eq!(f[116], 1);
        let reset_port = u64::from_le_bytes(f[120..128].try_into().unwrap());
        assert_eq!(reset_port, u64::from(ACPI_PM_BASE + PM_RESET_OFFSET));
        assert_eq!(f[128], PM_RESET_VALUE);
        // SLEEP_CONTROL_REG GAS at 244.
        let sleep_port = u64::from_le_bytes(f[248..256].try_into().unwrap());
        assert_eq!(
            sleep_port,
            u64::from(ACPI_PM_BASE + PM_SLEEP_CONTROL_OFFSET)
        );
    }

    /// Run `iasl ARGS` in `dir`; returns what it printed, failing the test if it failed.
    fn iasl(dir: &std::path::Path, args: &[&str]) -> String {
        let out = std::process::Command::new("iasl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("iasl (Debian acpica-tools, see resources/deps.sh) did not run: {e}")
            });
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "iasl {args:?} failed:\n{text}");
        text
    }

    /// ASL source with comments dropped and white space collapsed to single spaces.
    fn flatten_asl(raw: &str) -> String {
        let mut asl = String::new();
        for line in raw.lines() {
            let mut line = line.split("//").next().unwrap_or("").to_string();
            while let (Some(a), Some(b)) = (line.find("/*"), line.find("*/")) {
                if b < a {
                    break;
                }
                line.replace_range(a..b + 2, "");
            }
            asl.push_str(&line);
            asl.push(' ');
        }
        asl.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// The text of `Device (NAME)` in flattened ASL, up to the next device.
    fn device_body(asl: &str, name: &str) -> String {
        let at = asl
            .find(&format!("Device ({name})"))
            .unwrap_or_else(|| panic!("no {name} in {asl}"));
        let rest = &asl[at + 1..];
        rest[..rest.find("Device (").unwrap_or(rest.len())].to_string()
    }

    /// Each COM port is a PNP0501 with its I/O range and edge IRQ.
    fn assert_com_ports(asl: &str, ports: &[ComPort]) {
        for port in ports {
            let d = device_body(asl, &format!("_SB.COM{}", port.index));
            for want in [
                "Name (_HID, EisaId (\"PNP0501\") )".to_string(),
                format!("IO (Decode16, 0x{0:04X}, 0x{0:04X}, 0x01, 0x08, )", port.base),
                format!(
                    "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {{ 0x{:08X}, }}",
                    port.irq
                ),
            ] {
                assert!(d.contains(&want), "COM{}: no {want:?} in {d}", port.index);
            }
        }
    }

    /// Each virtio-mmio slot is an LNRO0005 with its window and level GSI.
    fn assert_virtio_slots(asl: &str, slots: &[VirtioMmioSlot]) {
        for (i, slot) in slots.iter().enumerate() {
            let d = device_body(asl, &format!("_SB.V{i:03X}"));
            for want in [
                "Name (_HID, \"LNRO0005\")".to_string(),
                format!(
                    "Memory32Fixed (ReadWrite, 0x{:08X}, 0x{:08X}, )",
                    slot.base, slot.size
                ),
                format!(
                    "Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,, ) {{ 0x{:08X}, }}",
                    slot.gsi
                ),
            ] {
                assert!(d.contains(&want), "V{i:03X}: no {want:?} in {d}");
            }
        }
    }

    /// The DSDT and FADT as the ACPI reference tools read them: `iasl -d` disassembles them
    /// without errors, the DSDT recompiles, and the disassembly names what the guest must
    /// find (four PNP0501 ports with their I/O ranges and IRQs, the virtio-mmio slots, the
    /// power button and its GED). Needs `iasl` (Debian `acpica-tools`, installed by
    /// `resources/deps.sh`); fails loudly without it.
    #[test]
    fn iasl_disassembles_and_recompiles_the_tables() {
        let ports: Vec<ComPort> = [(0x3f8, 4), (0x2f8, 3), (0x3e8, 4), (0x2e8, 3)]
            .iter()
            .zip(1u8..)
            .map(|(&(base, irq), index)| ComPort { index, base, irq })
            .collect();
        // Two slots from 0xd000_0000 on GSIs 5 and 6.
        let slots: Vec<VirtioMmioSlot> = (0..2u32)
            .map(|i| VirtioMmioSlot {
                base: 0xd000_0000 + u64::from(i) * 0x1000,
                size: 0x1000,
                gsi: 5 + i,
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("dsdt.dat"), dsdt(&ports, &slots)).unwrap();
        std::fs::write(dir.path().join("fadt.dat"), fadt(0x1000)).unwrap();
        std::fs::write(dir.path().join("madt.dat"), madt(2)).unwrap();
        for table in ["dsdt", "fadt", "madt"] {
            iasl(dir.path(), &["-d", &format!("{table}.dat")]);
            let dsl = std::fs::read_to_string(dir.path().join(format!("{table}.dsl"))).unwrap();
            assert!(!dsl.contains("**** Unknown"), "{table}: {dsl}");
        }
        let raw = std::fs::read_to_string(dir.path().join("dsdt.dsl")).unwrap();
        let asl = flatten_asl(&raw);
        assert_com_ports(&asl, &ports);
        assert_virtio_slots(&asl, &slots);
        assert!(
            device_body(&asl, "_SB.PWRB").contains("EisaId (\"PNP0C0C\")"),
            "{raw}"
        );
        let ged = device_body(&asl, "_SB.GED");
        assert!(
            ged.contains("\"ACPI0013\"") && ged.contains("Method (_EVT, 1, Serialized)"),
            "{ged}"
        );
        // The disassembly compiles back to AML without errors.
        let compiled = iasl(dir.path(), &["dsdt.dsl"]);
        assert!(compiled.contains("0 Errors, 0 Warnings"), "{compiled}");
    }
}

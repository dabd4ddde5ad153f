//! vCPU set-up for the boot: CPUID, MSRs, segment and control registers, page tables, FPU
//! and local-APIC interrupt pins, for either the 64-bit Linux entry or the 32-bit PVH entry;
//! and for a machine reset, the vCPU's state as KVM created it ([`VcpuSnapshot`]), to which
//! [`reset_vcpu`] returns before configuring the boot again.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, CpuId, Msrs, KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::EntryMode;
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};

/// CPUID leaf with the APIC id in EBX[31:24] and the hypervisor bit in ECX[31].
const CPUID_LEAF_FEATURES: u32 = 1;
/// CPUID leaf of the x2APIC topology (EDX = x2APIC id).
const CPUID_LEAF_TOPOLOGY: u32 = 0xb;
/// KVM's paravirtual feature leaf.
const CPUID_LEAF_KVM_FEATURES: u32 = 0x4000_0001;
/// KVM_FEATURE_PV_SEND_IPI in leaf 0x40000001 EAX. Under kvm_pvm the hypercall livelocks an
/// SMP guest's bring-up, so it is not offered there.
const KVM_FEATURE_PV_SEND_IPI_BIT: u32 = 11;
/// ECX bit of leaf 1: running under a hypervisor.
const CPUID_HYPERVISOR_BIT: u32 = 31;
/// Shift of the initial APIC id in leaf 1 EBX.
const CPUID_APIC_ID_SHIFT: u32 = 24;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of RFLAGS is always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// Page-table entry bits: present, writable, page size (2 MiB).
const PTE_PRESENT_WRITABLE: u64 = 0x3;
const PDE_HUGE_PAGE: u64 = 0x83;
/// 2 MiB.
const HUGE_PAGE_SHIFT: u64 = 21;
/// Entries in one page-table page.
const PT_ENTRIES: u64 = 512;

/// x87 control word after FNINIT.
const FPU_DEFAULT_FCW: u16 = 0x37f;
/// MXCSR after reset.
const MXCSR_DEFAULT: u32 = 0x1f80;

/// Local APIC register offsets and values for the LINT pins.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_DELIVERY_MODE_SHIFT: u32 = 8;
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;

/// GDT access/flags words (the flags nibble and the access byte, as Linux's GDT_ENTRY).
const GDT_CODE64: u16 = 0xa09b;
const GDT_DATA64: u16 = 0xc093;
const GDT_TSS: u16 = 0x808b;
const GDT_CODE32: u16 = 0xc09b;
const GDT_DATA32: u16 = 0xc093;
const GDT_TSS32: u16 = 0x008b;

/// Errors while setting up a vCPU.
#[derive(Debug, Error)]
pub enum CpuError {
    /// A KVM vCPU ioctl failed.
    #[error("KVM {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Writing the GDT or page tables failed.
    #[error("cannot write {0} into guest memory")]
    GuestWrite(&'static str),
}

/// Whether this host's KVM is the nested `kvm_pvm` module (guest ring 0 emulated).
pub fn host_is_kvm_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Adjust KVM's supported CPUID for vCPU `id` of `count`.
pub fn filter_cpuid(cpuid: &mut CpuId, id: u8, pvm_host: bool) {
    for entry in cpuid.as_mut_slice().iter_mut() {
        match entry.function {
            CPUID_LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(id) << CPUID_APIC_ID_SHIFT);
                entry.ecx |= 1 << CPUID_HYPERVISOR_BIT;
            }
            CPUID_LEAF_TOPOLOGY => entry.edx = u32::from(id),
            CPUID_LEAF_KVM_FEATURES if pvm_host => {
                entry.eax &= !(1 << KVM_FEATURE_PV_SEND_IPI_BIT);
            }
            _ => {}
        }
    }
}

fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
}

/// A GDT entry from flags/access, base and limit (Linux's GDT_ENTRY layout).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The KVM segment a GDT entry describes, for selector index `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

/// Write the boot GDT (and an empty IDT) and point the segment registers at it.
fn setup_segments(
    mem: &GuestMemoryMmap,
    sregs: &mut kvm_bindings::kvm_sregs,
    mode: EntryMode,
) -> Result<(), CpuError> {
    let gdt: [u64; 4] = match mode {
        EntryMode::Linux64 { .. } => [
            0,
            gdt_entry(GDT_CODE64, 0, 0xfffff),
            gdt_entry(GDT_DATA64, 0, 0xfffff),
            gdt_entry(GDT_TSS, 0, 0xfffff),
        ],
        EntryMode::Pvh { .. } => [
            0,
            gdt_entry(GDT_CODE32, 0, 0xffff_ffff),
            gdt_entry(GDT_DATA32, 0, 0xffff_ffff),
            gdt_entry(GDT_TSS32, 0, 0x67),
        ],
    };
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|_| CpuError::GuestWrite("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| CpuError::GuestWrite("IDT"))?;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    Ok(())
}

/// Identity-map the first GiB with 2 MiB pages for the 64-bit entry.
fn setup_page_tables(
    mem: &GuestMemoryMmap,
    sregs: &mut kvm_bindings::kvm_sregs,
) -> Result<(), CpuError> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|_| CpuError::GuestWrite("page tables"))
    };
    w(PDPTE_START | PTE_PRESENT_WRITABLE, PML4_START)?;
    w(PDE_START | PTE_PRESENT_WRITABLE, PDPTE_START)?;
    for i in 0..PT_ENTRIES {
        w((i << HUGE_PAGE_SHIFT) | PDE_HUGE_PAGE, PDE_START + i * 8)?;
    }
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(())
}

/// Route LINT0 as ExtINT (the PIC) and LINT1 as NMI, as firmware leaves them.
fn setup_lint(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| CpuError::Kvm("KVM_GET_LAPIC", e))?;
    let set = |regs: &mut [std::os::raw::c_char], off: usize, mode: u32| {
        let mut v = [0u8; 4];
        for (i, b) in v.iter_mut().enumerate() {
            *b = regs[off + i] as u8;
        }
        let val = u32::from_le_bytes(v);
        let val = (val & !APIC_DELIVERY_MODE_MASK) | (mode << APIC_DELIVERY_MODE_SHIFT);
        for (i, b) in val.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as std::os::raw::c_char;
        }
    };
    set(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(|e| CpuError::Kvm("KVM_SET_LAPIC", e))
}

/// Give vCPU `id` its CPUID: KVM's supported leaves adjusted by [`filter_cpuid`]. Set once:
/// it is not vCPU state a reset changes (KVM keeps it, and updates the bits that follow
/// CR4, XCR0 and the APIC base itself), and KVM refuses a second one after the first run.
pub fn set_cpuid(vcpu: &VcpuFd, id: u8, cpuid: &CpuId) -> Result<(), CpuError> {
    let mut cpuid = cpuid.clone();
    filter_cpuid(&mut cpuid, id, host_is_kvm_pvm());
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| CpuError::Kvm("KVM_SET_CPUID2", e))
}

/// Configure vCPU `id`: CPUID, MSRs, FPU, LAPIC pins and, for the boot vCPU (id 0), the
/// registers of the kernel entry. Application processors wait for INIT/SIPI in the kernel.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    id: u8,
    cpuid: &CpuId,
    mem: &GuestMemoryMmap,
    mode: EntryMode,
) -> Result<(), CpuError> {
    set_cpuid(vcpu, id, cpuid)?;
    configure_boot(vcpu, id, mem, mode)
}

/// The part of [`configure_vcpu`] after CPUID: MSRs, LAPIC pins, FPU and, for the boot vCPU,
/// the entry registers with the boot GDT (and page tables) written into guest memory.
fn configure_boot(
    vcpu: &VcpuFd,
    id: u8,
    mem: &GuestMemoryMmap,
    mode: EntryMode,
) -> Result<(), CpuError> {
    let msrs = Msrs::from_entries(&boot_msrs()).map_err(|_| CpuError::GuestWrite("MSR list"))?;
    vcpu.set_msrs(&msrs)
        .map_err(|e| CpuError::Kvm("KVM_SET_MSRS", e))?;
    setup_lint(vcpu)?;
    let fpu = kvm_fpu {
        fcw: FPU_DEFAULT_FCW,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| CpuError::Kvm("KVM_SET_FPU", e))?;
    if id != 0 {
        return Ok(());
    }

    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| CpuError::Kvm("KVM_GET_SREGS", e))?;
    setup_segments(mem, &mut sregs, mode)?;
    sregs.cr0 = (sregs.cr0 & !X86_CR0_PG) | X86_CR0_PE | X86_CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    let regs = match mode {
        EntryMode::Linux64 { entry } => {
            setup_page_tables(mem, &mut sregs)?;
            kvm_regs {
                rflags: RFLAGS_RESERVED,
                rip: entry,
                rsp: BOOT_STACK_POINTER,
                rbp: BOOT_STACK_POINTER,
                rsi: ZERO_PAGE_START,
                ..Default::default()
            }
        }
        EntryMode::Pvh { entry } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
    };
    vcpu.set_sregs(&sregs)
        .map_err(|e| CpuError::Kvm("KVM_SET_SREGS", e))?;
    vcpu.set_regs(&regs)
        .map_err(|e| CpuError::Kvm("KVM_SET_REGS", e))
}

/// A vCPU's architectural state as KVM created it (after its CPUID was set, before the boot
/// configuration): what a machine reset puts back before [`configure_vcpu`] runs again, so
/// that the second boot starts from exactly the state the first one did. The MSRs are every
/// one KVM lists (`KVM_GET_MSR_INDEX_LIST`) that reads back, the paravirtual ones (kvmclock,
/// async page faults, steal time, PV EOI) included: left enabled, KVM would keep writing
/// into the memory of the next boot. The boot vCPU's multiprocessor state is runnable,
/// an application processor's waits for INIT/SIPI.
pub struct VcpuSnapshot {
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
    debugregs: kvm_debugregs,
    /// `None` where KVM has no XCRs (no XSAVE on the host).
    xcrs: Option<kvm_xcrs>,
    msrs: Vec<kvm_msr_entry>,
}

impl VcpuSnapshot {
    /// Read `vcpu`'s state, with the MSRs of `msr_indices` that KVM lets it read.
    pub fn capture(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<Self, CpuError> {
        let kvm = |what| move |e| CpuError::Kvm(what, e);
        let mut msrs = Vec::new();
        for &index in msr_indices {
            let entry = kvm_msr_entry {
                index,
                ..Default::default()
            };
            let mut one =
                Msrs::from_entries(&[entry]).map_err(|_| CpuError::GuestWrite("MSR list"))?;
            // An MSR KVM lists but does not let this vCPU read (its CPUID lacks the feature)
            // has no state to restore.
            if matches!(vcpu.get_msrs(&mut one), Ok(1)) {
                msrs.extend_from_slice(one.as_slice());
            }
        }
        Ok(VcpuSnapshot {
            regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            fpu: vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?,
            lapic: vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            xcrs: vcpu.get_xcrs().ok(),
            msrs,
        })
    }

    /// Put the state back, in the order QEMU does (registers, then MSRs, then the LAPIC, the
    /// multiprocessor state and the pending events). An MSR KVM refuses now (one it lets
    /// userspace set only before the first run, when the value differs) is skipped.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), CpuError> {
        let kvm = |what| move |e| CpuError::Kvm(what, e);
        vcpu.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        vcpu.set_fpu(&self.fpu).map_err(kvm("KVM_SET_FPU"))?;
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        }
        let mut rest = self.msrs.as_slice();
        while !rest.is_empty() {
            let batch = Msrs::from_entries(rest).map_err(|_| CpuError::GuestWrite("MSR list"))?;
            let set = vcpu.set_msrs(&batch).map_err(kvm("KVM_SET_MSRS"))?;
            let Some(refused) = rest.get(set) else { break };
            log::debug!("reset: KVM keeps MSR {:#x} as it is", refused.index);
            rest = &rest[set + 1..];
        }
        vcpu.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        let mut events = self.events;
        // Also clear a pending NMI and the SIPI vector, which KVM takes only when flagged.
        events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        vcpu.set_vcpu_events(&events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))
    }
}

/// Machine reset of vCPU `id`: back to its creation state, then configured for the boot as
/// the first time (as [`configure_vcpu`] does after CPUID, which stays: the boot vCPU at the
/// kernel entry with the boot GDT and page tables rewritten, the others waiting for
/// INIT/SIPI).
pub fn reset_vcpu(
    vcpu: &VcpuFd,
    id: u8,
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    snapshot: &VcpuSnapshot,
) -> Result<(), CpuError> {
    snapshot.restore(vcpu)?;
    configure_boot(vcpu, id, mem, mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_round_trip_into_segments() {
        let code = segment_from_gdt(gdt_entry(GDT_CODE64, 0, 0xfffff), 1);
        assert_eq!(code.selector, 8);
        assert_eq!(code.l, 1);
        assert_eq!(code.db, 0);
        assert_eq!(code.type_, 0xb);
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.present, 1);
        let code32 = segment_from_gdt(gdt_entry(GDT_CODE32, 0, 0xffff_ffff), 1);
        assert_eq!((code32.l, code32.db, code32.g), (0, 1, 1));
        assert_eq!(code32.limit, 0xffff_ffff);
        let tss = segment_from_gdt(gdt_entry(GDT_TSS32, 0, 0x67), 3);
        assert_eq!((tss.limit, tss.g, tss.type_), (0x67, 0, 0xb));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn gdt_entry_matches_the_linux_encoding() {
        // The values Linux's GDT_ENTRY macro gives for its boot code and data segments.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn cpuid_gets_apic_id_and_loses_pv_ipi_on_pvm() {
        let entries = [
            kvm_bindings::kvm_cpuid_entry2 {
                function: CPUID_LEAF_FEATURES,
                ebx: 0x0102_0304,
                ..Default::default()
            },
            kvm_bindings::kvm_cpuid_entry2 {
                function: CPUID_LEAF_KVM_FEATURES,
                eax: 0xffff,
                ..Default::default()
            },
        ];
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        filter_cpuid(&mut cpuid, 3, true);
        let s = cpuid.as_slice();
        assert_eq!(s[0].ebx, 0x0302_0304);
        assert_ne!(s[0].ecx & (1 << CPUID_HYPERVISOR_BIT), 0);
        assert_eq!(s[1].eax & (1 << KVM_FEATURE_PV_SEND_IPI_BIT), 0);
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        filter_cpuid(&mut cpuid, 0, false);
        assert_ne!(
            cpuid.as_slice()[1].eax & (1 << KVM_FEATURE_PV_SEND_IPI_BIT),
            0
        );
    }
}

//! vCPU threads: `KVM_RUN`, and the dispatch of each exit to the port-I/O or MMIO bus.
//!
//! A vCPU thread never does host I/O itself: devices it reaches queue work and wake the event
//! loop. How the guest stops (power-off, reset, triple fault, an instruction KVM cannot
//! emulate) is reported through [`VmExit`] to the main thread, which ends the process.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::bus::Bus;
use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Real-time signal used to kick a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off.
    PowerOff,
    /// The guest reset the machine.
    Reset,
    /// A host signal asked the VMM to stop.
    Signal(i32),
    /// The user quit from a console (a mux's Ctrl-A x).
    Quit,
    /// The guest crashed or KVM failed: the message says how.
    Crash(String),
}

impl VmExit {
    /// The process exit status for this exit.
    pub fn status(&self) -> i32 {
        match self {
            VmExit::PowerOff | VmExit::Reset | VmExit::Quit => 0,
            VmExit::Signal(sig) => 128 + sig,
            VmExit::Crash(_) => 1,
        }
    }
}

/// Where every thread reports the end of the VM; the first report wins.
pub struct ExitLatch {
    reason: Mutex<Option<VmExit>>,
    stopping: AtomicBool,
    event: EventFd,
}

impl ExitLatch {
    /// A latch whose event the main loop polls.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(ExitLatch {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        }))
    }

    /// Record `exit` (unless an earlier exit was recorded) and wake the main loop.
    pub fn exit(&self, exit: VmExit) {
        let mut reason = devices::bus::lock(&self.reason);
        if reason.is_none() {
            *reason = Some(exit);
        }
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.event.write(1);
    }

    /// Whether the VM is stopping.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The recorded exit.
    pub fn reason(&self) -> Option<VmExit> {
        devices::bus::lock(&self.reason).clone()
    }

    /// The eventfd written on exit.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

impl devices::power::PowerControl for ExitLatch {
    fn request(&self, event: devices::power::PowerEvent) {
        self.exit(match event {
            devices::power::PowerEvent::PowerOff => VmExit::PowerOff,
            devices::power::PowerEvent::Reset => VmExit::Reset,
        });
    }
}

/// Pausing and resuming the vCPUs (`stop` / `cont`): a vCPU parks before its next `KVM_RUN`
/// while paused; `pause` kicks each thread out of `KVM_RUN` with [`kick_signal`] until all
/// have parked.
pub struct VcpuControl {
    paused: Mutex<bool>,
    resumed: Condvar,
    parked: AtomicUsize,
    threads: Mutex<Vec<libc::pthread_t>>,
}

/// How long `pause` keeps kicking vCPUs before giving up.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Interval between kicks while pausing.
const PAUSE_KICK_INTERVAL: Duration = Duration::from_millis(5);

impl VcpuControl {
    /// Control for vCPUs not started yet.
    pub fn new() -> Arc<Self> {
        Arc::new(VcpuControl {
            paused: Mutex::new(false),
            resumed: Condvar::new(),
            parked: AtomicUsize::new(0),
            threads: Mutex::new(Vec::new()),
        })
    }

    /// Install the no-op handler for [`kick_signal`]; its only job is to make `KVM_RUN`
    /// return `EINTR`.
    pub fn install_kick_handler() -> std::io::Result<()> {
        extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn register(&self, thread: libc::pthread_t) {
        devices::bus::lock(&self.threads).push(thread);
    }

    /// Whether the vCPUs are paused (or pausing).
    pub fn is_paused(&self) -> bool {
        *devices::bus::lock(&self.paused)
    }

    /// Stop every vCPU before its next guest instruction; returns once all are parked (or
    /// after a bounded wait, with false).
    pub fn pause(&self) -> bool {
        *devices::bus::lock(&self.paused) = true;
        let threads = devices::bus::lock(&self.threads).clone();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while self.parked.load(Ordering::SeqCst) < threads.len() {
            if Instant::now() >= deadline {
                return false;
            }
            for &t in &threads {
                // SAFETY: `t` is a vCPU thread of this process that lives until exit; the
                // signal has a no-op handler installed, so delivery only interrupts KVM_RUN.
                unsafe { libc::pthread_kill(t, kick_signal()) };
            }
            std::thread::sleep(PAUSE_KICK_INTERVAL);
        }
        true
    }

    /// Let the vCPUs run again.
    pub fn resume(&self) {
        *devices::bus::lock(&self.paused) = false;
        self.resumed.notify_all();
    }

    /// Called by a vCPU thread before entering the guest: park while paused (or until the VM
    /// stops).
    fn wait_while_paused(&self, exit: &ExitLatch) {
        let mut paused = devices::bus::lock(&self.paused);
        if !*paused {
            return;
        }
        self.parked.fetch_add(1, Ordering::SeqCst);
        while *paused && !exit.stopping() {
            paused = self
                .resumed
                .wait_timeout(paused, PAUSE_TIMEOUT)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a vCPU thread needs.
pub struct VcpuContext {
    /// vCPU index.
    pub id: u8,
    /// The vCPU.
    pub fd: VcpuFd,
    /// Port-I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Guest memory, to read instruction bytes on an emulation failure.
    pub mem: GuestMemoryMmap,
    /// Where to report the end of the VM.
    pub exit: Arc<ExitLatch>,
    /// Pause/resume.
    pub control: Arc<VcpuControl>,
}

/// Start the vCPU thread.
pub fn spawn(ctx: VcpuContext) -> std::io::Result<JoinHandle<()>> {
    let control = ctx.control.clone();
    let handle = std::thread::Builder::new()
        .name(format!("vcpu{}", ctx.id))
        .spawn(move || run(ctx))?;
    control.register(handle.as_pthread_t());
    Ok(handle)
}

fn run(mut ctx: VcpuContext) {
    loop {
        ctx.control.wait_while_paused(&ctx.exit);
        if ctx.exit.stopping() {
            return;
        }
        let result = match ctx.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.pio.read(u64::from(port), data);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.pio.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ctx.mmio.read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Hlt) => None,
            Ok(VcpuExit::Shutdown) => Some(VmExit::Crash(format!(
                "vcpu{}: triple fault (KVM_EXIT_SHUTDOWN){}",
                ctx.id,
                describe_regs(&ctx)
            ))),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Some(VmExit::PowerOff),
                KVM_SYSTEM_EVENT_RESET => Some(VmExit::Reset),
                other => Some(VmExit::Crash(format!(
                    "vcpu{}: unhandled KVM system event {other}",
                    ctx.id
                ))),
            },
            Ok(VcpuExit::InternalError) => Some(VmExit::Crash(internal_error(&mut ctx))),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmExit::Crash(format!(
                "vcpu{}: KVM entry failed, hardware reason {reason:#x} on host cpu {cpu}",
                ctx.id
            ))),
            Ok(other) => {
                let what = format!("{other:?}");
                Some(VmExit::Crash(format!(
                    "vcpu{}: unexpected KVM exit {what}{}",
                    ctx.id,
                    describe_regs(&ctx)
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                ctx.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(VmExit::Crash(format!(
                "vcpu{}: KVM_RUN failed: {e}",
                ctx.id
            ))),
        };
        if let Some(exit) = result {
            ctx.exit.exit(exit);
            return;
        }
    }
}

/// KVM_INTERNAL_ERROR_EMULATION: the instruction emulator could not handle an instruction.
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
/// How many instruction bytes to show.
const INSN_BYTES_SHOWN: usize = 16;

/// Describe a KVM internal error: suberror, RIP and the instruction bytes there, which is how
/// an instruction the host's emulator lacks is found.
fn internal_error(ctx: &mut VcpuContext) -> String {
    let run = ctx.fd.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member
    // of the exit union; it is plain data.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let ndata = (internal.ndata as usize).min(internal.data.len());
    let data: Vec<String> = internal.data[..ndata]
        .iter()
        .map(|d| format!("{d:#x}"))
        .collect();
    let kind = if internal.suberror == KVM_INTERNAL_ERROR_EMULATION {
        "emulation failure"
    } else {
        "internal error"
    };
    format!(
        "vcpu{}: KVM {kind} (suberror {}, data [{}]){}",
        ctx.id,
        internal.suberror,
        data.join(", "),
        describe_regs(ctx)
    )
}

/// RIP, the instruction bytes there (through the guest's page tables when paging is on) and a
/// few registers.
fn describe_regs(ctx: &VcpuContext) -> String {
    let (Ok(regs), Ok(sregs)) = (ctx.fd.get_regs(), ctx.fd.get_sregs()) else {
        return String::new();
    };
    let linear = sregs.cs.base.wrapping_add(regs.rip);
    let bytes = translate(&ctx.mem, &sregs, linear)
        .and_then(|phys| {
            let mut b = [0u8; INSN_BYTES_SHOWN];
            ctx.mem.read_slice(&mut b, GuestAddress(phys)).ok()?;
            Some(
                b.iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            )
        })
        .unwrap_or_else(|| "unreadable".to_string());
    format!(
        "\n  rip={:#018x} rsp={:#018x} rflags={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs.sel={:#x}\n  rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x}\n  code at rip: {bytes}",
        regs.rip,
        regs.rsp,
        regs.rflags,
        sregs.cr0,
        sregs.cr3,
        sregs.cr4,
        sregs.efer,
        sregs.cs.selector,
        regs.rax,
        regs.rbx,
        regs.rcx,
        regs.rdx
    )
}

/// Page-table bits.
const PAGE_PRESENT: u64 = 1;
const PAGE_HUGE: u64 = 1 << 7;
const PAGE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LMA: u64 = 1 << 10;

/// Walk the guest's 4-level page tables (long mode) to find the physical address of `linear`.
/// Returns `linear` itself when paging is off; `None` when unmapped or not long mode.
pub fn translate(
    mem: &GuestMemoryMmap,
    sregs: &kvm_bindings::kvm_sregs,
    linear: u64,
) -> Option<u64> {
    if sregs.cr0 & CR0_PG == 0 {
        return Some(linear);
    }
    if sregs.efer & EFER_LMA == 0 || sregs.cr4 & CR4_PAE == 0 {
        return None;
    }
    let mut table = sregs.cr3 & PAGE_ADDR_MASK;
    for level in (0..4).rev() {
        let shift = 12 + 9 * level;
        let index = (linear >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PAGE_PRESENT == 0 {
            return None;
        }
        if level > 0 && level < 3 && entry & PAGE_HUGE != 0 {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & PAGE_ADDR_MASK & !page_mask) | (linear & page_mask));
        }
        table = entry & PAGE_ADDR_MASK;
    }
    Some(table | (linear & 0xfff))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn translate_walks_4k_and_2m_pages() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let w = |a: u64, v: u64| mem.write_obj(v, GuestAddress(a)).unwrap();
        // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000; PD[1] = 2 MiB page at 0x400000,
        // PD[2] -> PT 0x4000 whose entry 5 maps 0x9000.
        w(0x1000, 0x2000 | 3);
        w(0x2000, 0x3000 | 3);
        w(0x3000 + 8, 0x40_0000 | 0x83);
        w(0x3000 + 16, 0x4000 | 3);
        w(0x4000 + 5 * 8, 0x9000 | 3);
        let sregs = kvm_bindings::kvm_sregs {
            cr0: CR0_PG | 1,
            cr3: 0x1000,
            cr4: CR4_PAE,
            efer: EFER_LMA,
            ..Default::default()
        };
        assert_eq!(translate(&mem, &sregs, 0x20_1234), Some(0x40_1234));
        assert_eq!(translate(&mem, &sregs, 0x40_5abc), Some(0x9abc));
        assert_eq!(translate(&mem, &sregs, 0x60_0000), None);
        let flat = kvm_bindings::kvm_sregs::default();
        assert_eq!(translate(&mem, &flat, 0x1234), Some(0x1234));
    }

    #[test]
    fn first_exit_wins_and_sets_status() {
        let latch = ExitLatch::new().unwrap();
        assert!(!latch.stopping());
        latch.exit(VmExit::PowerOff);
        latch.exit(VmExit::Crash("later".into()));
        assert!(latch.stopping());
        assert_eq!(latch.reason(), Some(VmExit::PowerOff));
        assert_eq!(latch.event().read().unwrap(), 2);
        assert_eq!(VmExit::PowerOff.status(), 0);
        assert_eq!(VmExit::Crash(String::new()).status(), 1);
        assert_eq!(VmExit::Signal(15).status(), 143);
    }
}

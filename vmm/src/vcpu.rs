//! vCPU threads: `KVM_RUN`, and the dispatch of each exit to the port-I/O or MMIO bus.
//!
//! A vCPU thread never does host I/O itself: devices it reaches queue work and wake the event
//! loop. How the guest stops (power-off, a reset under `--no-reboot`, triple fault, an
//! instruction KVM cannot emulate) is reported through [`VmExit`] to the main thread, which
//! ends the process; a guest reset otherwise is a request on the [`ExitLatch`] that the main
//! thread carries out in process, with every vCPU parked in [`VcpuControl`] and each
//! resetting its own registers when told to.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::bus::{lock, Bus};
use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use monitor::ShutdownCause;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::EntryMode;
use crate::cpu::{self, VcpuSnapshot};

/// Real-time signal used to kick a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off.
    PowerOff,
    /// The machine was reset under `--no-reboot` (`GuestReset` or `HostQmpSystemReset`).
    Reset(ShutdownCause),
    /// A host signal asked the VMM to stop.
    Signal(i32),
    /// The user quit from a console (a mux's Ctrl-A x).
    Quit,
    /// The guest crashed or KVM failed: the message says how.
    Crash(String),
    /// A reset could not be carried out: the message says why.
    ResetFailed(String),
}

impl VmExit {
    /// The process exit status for this exit.
    pub fn status(&self) -> i32 {
        match self {
            VmExit::PowerOff | VmExit::Reset(_) | VmExit::Quit => 0,
            VmExit::Signal(sig) => 128 + sig,
            VmExit::Crash(_) | VmExit::ResetFailed(_) => 1,
        }
    }
}

/// What a machine reset does: reboot in process (the default) or end the VM (`--no-reboot`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetAction {
    /// Reset the machine and boot the kernel again.
    Reboot,
    /// End the VM with status 0, as QEMU's `-no-reboot`.
    Exit,
}

/// Where every thread reports the end of the VM (the first report wins) or asks for a reset;
/// either wakes the main loop.
pub struct ExitLatch {
    reason: Mutex<Option<VmExit>>,
    stopping: AtomicBool,
    on_reset: ResetAction,
    /// A reset asked for and not yet carried out, with its cause (the first request wins).
    reset: Mutex<Option<ShutdownCause>>,
    event: EventFd,
}

impl ExitLatch {
    /// A latch whose event the main loop polls; resets do `on_reset`.
    pub fn new(on_reset: ResetAction) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(ExitLatch {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            on_reset,
            reset: Mutex::new(None),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        }))
    }

    /// Record `exit` (unless an earlier exit was recorded) and wake the main loop.
    pub fn exit(&self, exit: VmExit) {
        let mut reason = lock(&self.reason);
        if reason.is_none() {
            *reason = Some(exit);
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Ask for a machine reset for `cause` (`GuestReset` or `HostQmpSystemReset`): under
    /// [`ResetAction::Exit`] the VM ends; otherwise the main loop resets it, and until then
    /// every vCPU parks before its next `KVM_RUN`.
    pub fn request_reset(&self, cause: ShutdownCause) {
        match self.on_reset {
            ResetAction::Exit => self.exit(VmExit::Reset(cause)),
            ResetAction::Reboot => {
                lock(&self.reset).get_or_insert(cause);
                self.wake();
            }
        }
    }

    /// The reset asked for and not carried out yet.
    pub fn pending_reset(&self) -> Option<ShutdownCause> {
        *lock(&self.reset)
    }

    /// The reset is done (or abandoned): the vCPUs may run again.
    pub fn clear_reset(&self) {
        *lock(&self.reset) = None;
    }

    fn wake(&self) {
        // A full counter (EAGAIN) has woken the loop already.
        let _ = self.event.write(1);
    }

    /// Whether the VM is stopping.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The recorded exit.
    pub fn reason(&self) -> Option<VmExit> {
        lock(&self.reason).clone()
    }

    /// The eventfd written on exit and on a reset request.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

impl devices::power::PowerControl for ExitLatch {
    fn request(&self, event: devices::power::PowerEvent) {
        match event {
            devices::power::PowerEvent::PowerOff => self.exit(VmExit::PowerOff),
            devices::power::PowerEvent::Reset => self.request_reset(ShutdownCause::GuestReset),
        }
    }
}

/// Holding the vCPUs: `stop`/`cont`, and machine resets. A vCPU parks before its next
/// `KVM_RUN` while paused, while a reset is pending on the [`ExitLatch`], and while a reset
/// order is out; [`VcpuControl::pause`] and [`VcpuControl::park_all`] kick each thread out
/// of `KVM_RUN` with [`kick_signal`] until all have parked. A parked vCPU carries out a reset
/// order ([`VcpuControl::order_reset`]) on its own thread, where its `VcpuFd` lives.
pub struct VcpuControl {
    state: Mutex<ControlState>,
    /// Signalled on every change of `state`: vCPUs and the main thread wait on it.
    changed: Condvar,
    parked: AtomicUsize,
    /// The vCPU threads: (vCPU id, thread).
    threads: Mutex<Vec<(u8, libc::pthread_t)>>,
}

#[derive(Default)]
struct ControlState {
    /// `stop` is in force.
    paused: bool,
    order: Option<ResetOrder>,
}

/// A reset the main thread has ordered: every vCPU in `pending` resets its registers for the
/// boot `mode`, and reports.
struct ResetOrder {
    mode: EntryMode,
    pending: Vec<u8>,
    errors: Vec<String>,
}

/// How long `pause` keeps kicking vCPUs before giving up.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Interval between kicks while pausing.
const PAUSE_KICK_INTERVAL: Duration = Duration::from_millis(5);
/// How long the vCPUs may take to reset their registers.
const RESET_TIMEOUT: Duration = Duration::from_secs(10);
/// How many times a vCPU re-enters KVM (with `immediate_exit`) to complete an I/O exit before
/// its reset; each completion may start another (a `rep outs`).
const RESET_IO_COMPLETIONS: usize = 16;

impl VcpuControl {
    /// Control for vCPUs not started yet.
    pub fn new() -> Arc<Self> {
        Arc::new(VcpuControl {
            state: Mutex::new(ControlState::default()),
            changed: Condvar::new(),
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

    fn register(&self, id: u8, thread: libc::pthread_t) {
        lock(&self.threads).push((id, thread));
    }

    /// Whether the vCPUs are paused (or pausing) by `stop`.
    pub fn is_paused(&self) -> bool {
        lock(&self.state).paused
    }

    /// Stop every vCPU before its next guest instruction; returns once all are parked (or
    /// after a bounded wait, with false).
    pub fn pause(&self) -> bool {
        lock(&self.state).paused = true;
        self.kick_until_parked(None)
    }

    /// Let the vCPUs run again after `stop` (those held by a reset stay parked).
    pub fn resume(&self) {
        lock(&self.state).paused = false;
        self.changed.notify_all();
    }

    /// For a reset pending on `exit`: kick every vCPU until all are parked. False after a
    /// bounded wait, or at once when the VM is stopping.
    pub fn park_all(&self, exit: &ExitLatch) -> bool {
        self.kick_until_parked(Some(exit))
    }

    fn kick_until_parked(&self, exit: Option<&ExitLatch>) -> bool {
        let threads = lock(&self.threads).clone();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while self.parked.load(Ordering::SeqCst) < threads.len() {
            if Instant::now() >= deadline || exit.is_some_and(ExitLatch::stopping) {
                return false;
            }
            for &(_, t) in &threads {
                // SAFETY: `t` is a vCPU thread of this process that lives until exit; the
                // signal has a no-op handler installed, so delivery only interrupts KVM_RUN.
                unsafe { libc::pthread_kill(t, kick_signal()) };
            }
            std::thread::sleep(PAUSE_KICK_INTERVAL);
        }
        true
    }

    /// With every vCPU parked ([`VcpuControl::park_all`]): have each reset its registers for
    /// the boot `mode`, and wait until all have. The vCPUs stay parked afterwards until the
    /// reset is cleared on `exit` and [`VcpuControl::release`] is called.
    pub fn order_reset(&self, mode: EntryMode, exit: &ExitLatch) -> Result<(), String> {
        let ids: Vec<u8> = lock(&self.threads).iter().map(|&(id, _)| id).collect();
        let mut state = lock(&self.state);
        state.order = Some(ResetOrder {
            mode,
            pending: ids,
            errors: Vec::new(),
        });
        self.changed.notify_all();
        let deadline = Instant::now() + RESET_TIMEOUT;
        loop {
            let pending = state.order.as_ref().map_or(0, |o| o.pending.len());
            let now = Instant::now();
            if pending == 0 || now >= deadline || exit.stopping() {
                break;
            }
            state = self.wait(state, deadline - now);
        }
        let order = state.order.take();
        drop(state);
        let Some(order) = order else {
            return Err("the reset order was lost".into());
        };
        if !order.errors.is_empty() {
            return Err(order.errors.join("; "));
        }
        match order.pending.first() {
            Some(id) if !exit.stopping() => Err(format!("vcpu{id} did not reset in time")),
            Some(_) => Err("the VM stopped during the reset".into()),
            None => Ok(()),
        }
    }

    /// Wake the parked vCPUs after a reset: those not held by `stop` run again.
    pub fn release(&self) {
        self.changed.notify_all();
    }

    fn wait<'a>(
        &self,
        state: MutexGuard<'a, ControlState>,
        timeout: Duration,
    ) -> MutexGuard<'a, ControlState> {
        self.changed
            .wait_timeout(state, timeout)
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0)
    }

    /// Called by vCPU `id` before entering the guest: park while paused, while a reset is
    /// pending or ordered (or until the VM stops), carrying out a reset order with `reset`.
    fn park(
        &self,
        id: u8,
        exit: &ExitLatch,
        reset: &mut dyn FnMut(EntryMode) -> Result<(), String>,
    ) {
        let held = |state: &ControlState| {
            state.paused || state.order.is_some() || exit.pending_reset().is_some()
        };
        let mut state = lock(&self.state);
        if !held(&state) {
            return;
        }
        self.parked.fetch_add(1, Ordering::SeqCst);
        while held(&state) && !exit.stopping() {
            let mode = state
                .order
                .as_ref()
                .filter(|o| o.pending.contains(&id))
                .map(|o| o.mode);
            if let Some(mode) = mode {
                drop(state);
                let result = reset(mode);
                state = lock(&self.state);
                if let Some(order) = state.order.as_mut() {
                    order.pending.retain(|&p| p != id);
                    if let Err(e) = result {
                        order.errors.push(e);
                    }
                }
                self.changed.notify_all();
                continue;
            }
            state = self.wait(state, PAUSE_TIMEOUT);
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
    /// Pause/resume and reset orders.
    pub control: Arc<VcpuControl>,
    /// The state KVM created the vCPU in, for a reset.
    pub snapshot: VcpuSnapshot,
}

/// Start the vCPU thread.
pub fn spawn(ctx: VcpuContext) -> std::io::Result<JoinHandle<()>> {
    let control = ctx.control.clone();
    let id = ctx.id;
    let handle = std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || run(ctx))?;
    control.register(id, handle.as_pthread_t());
    Ok(handle)
}

/// Reset this vCPU for a machine reset: complete the I/O exit KVM may still hold (the write
/// that asked for the reset, say) against the old state, then put the creation state back
/// and configure the boot as the first time.
fn reset(ctx: &mut VcpuContext, mode: EntryMode) -> Result<(), String> {
    ctx.fd.set_kvm_immediate_exit(1);
    let mut completed = false;
    for _ in 0..RESET_IO_COMPLETIONS {
        match ctx.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                completed = true;
                break;
            }
            Err(e) => {
                ctx.fd.set_kvm_immediate_exit(0);
                return Err(format!("vcpu{}: KVM_RUN before the reset: {e}", ctx.id));
            }
            // Another exit of the old guest's instruction: the devices were reset, drop it.
            Ok(_) => {}
        }
    }
    ctx.fd.set_kvm_immediate_exit(0);
    if !completed {
        log::warn!("vcpu{}: pending I/O not completed before the reset", ctx.id);
    }
    cpu::reset_vcpu(&ctx.fd, ctx.id, &ctx.mem, mode, &ctx.snapshot)
        .map_err(|e| format!("vcpu{}: {}", ctx.id, crate::error_chain(&e)))
}

fn run(mut ctx: VcpuContext) {
    let control = ctx.control.clone();
    let exit = ctx.exit.clone();
    loop {
        control.park(ctx.id, &exit, &mut |mode| reset(&mut ctx, mode));
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
                KVM_SYSTEM_EVENT_RESET => {
                    ctx.exit.request_reset(ShutdownCause::GuestReset);
                    None
                }
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
        let latch = ExitLatch::new(ResetAction::Exit).unwrap();
        assert!(!latch.stopping());
        latch.exit(VmExit::PowerOff);
        latch.exit(VmExit::Crash("later".into()));
        assert!(latch.stopping());
        assert_eq!(latch.reason(), Some(VmExit::PowerOff));
        assert_eq!(latch.event().read().unwrap(), 2);
        assert_eq!(VmExit::PowerOff.status(), 0);
        assert_eq!(VmExit::Crash(String::new()).status(), 1);
        assert_eq!(VmExit::Signal(15).status(), 143);
        assert_eq!(VmExit::Reset(ShutdownCause::GuestReset).status(), 0);
        assert_eq!(VmExit::ResetFailed(String::new()).status(), 1);
    }

    #[test]
    fn a_reset_request_reboots_or_exits_as_told() {
        let latch = ExitLatch::new(ResetAction::Reboot).unwrap();
        latch.request_reset(ShutdownCause::HostQmpSystemReset);
        latch.request_reset(ShutdownCause::GuestReset);
        assert!(!latch.stopping());
        assert_eq!(
            latch.pending_reset(),
            Some(ShutdownCause::HostQmpSystemReset)
        );
        assert_eq!(latch.event().read().unwrap(), 2);
        latch.clear_reset();
        assert_eq!(latch.pending_reset(), None);

        let latch = ExitLatch::new(ResetAction::Exit).unwrap();
        devices::power::PowerControl::request(&*latch, devices::power::PowerEvent::Reset);
        assert!(latch.stopping());
        assert_eq!(latch.pending_reset(), None);
        assert_eq!(
            latch.reason(),
            Some(VmExit::Reset(ShutdownCause::GuestReset))
        );
    }

    /// Two vCPU-like threads park on a reset request, each carries out the order on its own
    /// thread, and they leave only when the reset is cleared.
    #[test]
    fn reset_order_reaches_every_parked_thread() {
        VcpuControl::install_kick_handler().unwrap();
        let control = VcpuControl::new();
        let exit = ExitLatch::new(ResetAction::Reboot).unwrap();
        let done = Arc::new(Mutex::new(Vec::new()));
        exit.request_reset(ShutdownCause::GuestReset);
        let mut threads = Vec::new();
        for id in 0..2u8 {
            let (control2, exit2, done2) = (control.clone(), exit.clone(), done.clone());
            let t = std::thread::spawn(move || {
                control2.park(id, &exit2, &mut |mode| {
                    lock(&done2).push((id, mode));
                    Ok(())
                });
            });
            control.register(id, t.as_pthread_t());
            threads.push(t);
        }
        assert!(control.park_all(&exit));
        let mode = EntryMode::Pvh { entry: 0x10_0000 };
        assert_eq!(control.order_reset(mode, &exit), Ok(()));
        let mut seen = lock(&done).clone();
        seen.sort_by_key(|&(id, _)| id);
        assert_eq!(seen, vec![(0, mode), (1, mode)]);
        assert!(
            threads.iter().all(|t| !t.is_finished()),
            "held until cleared"
        );
        exit.clear_reset();
        control.release();
        for t in threads {
            t.join().unwrap();
        }
    }
}

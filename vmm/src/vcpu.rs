//! vCPU threads: `KVM_RUN`, and the dispatch of each exit to the port-I/O or MMIO bus.
//!
//! A vCPU thread never does host I/O itself: devices it reaches queue work and wake the event
//! loop. How the guest stops (power-off, a reset under `--no-reboot`, triple fault, an
//! instruction KVM cannot emulate) is reported through [`VmExit`] to the main thread, which
//! ends the process; a guest reset otherwise is a request on the [`ExitLatch`] that the main
//! thread carries out in process, with every vCPU parked in [`VcpuControl`] and each
//! resetting its own registers when told to.
//!
//! Kicks (Firecracker's design before it dropped its thread-local vCPU pointer): each vCPU
//! thread points a thread-local at its own `kvm_run` page before it first parks, and the
//! [`kick_signal`] handler sets `immediate_exit` there. A kick that lands just before
//! `KVM_RUN` is therefore not lost: `KVM_RUN` returns `EINTR` at once. The thread clears the
//! flag under the control lock, in the same critical section where it reads what it was
//! kicked for, so one kick per vCPU is always enough; the requester then waits on a condvar.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::bus::{lock, Bus};
use kvm_bindings::{kvm_run, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
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

thread_local! {
    /// The `kvm_run` page of the vCPU this thread runs, where the kick handler sets
    /// `immediate_exit`; null on every other thread, and before and after the vCPU runs.
    /// Constant-initialised and without a destructor, so reading it is a plain access to the
    /// thread's static TLS block: nothing is allocated or locked, which is what lets the
    /// signal handler read it.
    static KICK_TARGET: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

/// Write `immediate_exit` in this thread's `kvm_run`, if it has one. Async-signal-safe.
fn set_immediate_exit(value: u8) {
    let run = KICK_TARGET.with(Cell::get);
    if !run.is_null() {
        // SAFETY: a non-null target is the live `kvm_run` mapping of the `VcpuFd` this thread
        // owns ([`KickTarget`] clears it before that fd can be dropped). A volatile byte store
        // to the field is what KVM reads at its next entry, and cannot tear.
        unsafe { ptr::addr_of_mut!((*run).immediate_exit).write_volatile(value) };
    }
}

/// The handler of [`kick_signal`]: make the interrupted (or the next) `KVM_RUN` of this
/// thread's vCPU return `EINTR`.
extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    set_immediate_exit(1);
}

/// While it lives, this thread's vCPU is the target of [`kick_signal`].
struct KickTarget;

impl KickTarget {
    /// Point the kick handler of this thread at `fd`'s `kvm_run`. `fd` must outlive the
    /// guard; both must stay on this thread.
    fn install(fd: &mut VcpuFd) -> KickTarget {
        let run: *mut kvm_run = fd.get_kvm_run();
        KICK_TARGET.with(|t| t.set(run));
        KickTarget
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        KICK_TARGET.with(|t| t.set(ptr::null_mut()));
    }
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
/// of `KVM_RUN` once with [`kick_signal`] and wait until all have parked. A parked vCPU
/// carries out a reset order ([`VcpuControl::order_reset`]) on its own thread, where its
/// `VcpuFd` lives.
pub struct VcpuControl {
    state: Mutex<ControlState>,
    /// Signalled on every change of `state`: vCPUs and the main thread wait on it.
    changed: Condvar,
    /// The vCPU threads: (vCPU id, thread).
    threads: Mutex<Vec<(u8, libc::pthread_t)>>,
}

#[derive(Default)]
struct ControlState {
    /// `stop` is in force.
    paused: bool,
    order: Option<ResetOrder>,
    /// vCPU threads inside [`VcpuControl::park`]: none of them enters the guest before it has
    /// looked at this state again.
    parked: usize,
    /// vCPU threads whose run loop has ended (the VM is stopping): they never enter the guest
    /// again.
    ended: usize,
}

/// A reset the main thread has ordered: every vCPU in `pending` resets its registers for the
/// boot `mode`, and reports.
struct ResetOrder {
    mode: EntryMode,
    pending: Vec<u8>,
    errors: Vec<String>,
}

/// How long `pause` and `park_all` wait for the kicked vCPUs to park: a safety net, since a
/// kick is never lost and a vCPU parks within microseconds unless the host starves it.
const PARK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a parked vCPU sleeps before it looks at the state again without being woken.
const PARKED_RECHECK: Duration = Duration::from_secs(2);
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
            threads: Mutex::new(Vec::new()),
        })
    }

    /// Install the handler for [`kick_signal`], which sets `immediate_exit` in the kicked
    /// thread's `kvm_run` so that its `KVM_RUN` returns `EINTR`, now or at its next entry.
    pub fn install_kick_handler() -> std::io::Result<()> {
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
    /// have ended with the VM), or false after [`PARK_TIMEOUT`].
    pub fn pause(&self) -> bool {
        let started = Instant::now();
        let threads = self.thread_count();
        let mut state = lock(&self.state);
        state.paused = true;
        self.kick_all();
        let parked = self.wait_parked(state, threads, || false);
        log::debug!(
            "pause: {threads} vCPUs parked={parked} in {:?}",
            started.elapsed()
        );
        parked
    }

    /// Let the vCPUs run again after `stop` (those held by a reset stay parked).
    pub fn resume(&self) {
        lock(&self.state).paused = false;
        self.changed.notify_all();
    }

    /// For a reset pending on `exit`: kick every vCPU and wait until all are parked. False
    /// after [`PARK_TIMEOUT`], or when the VM is stopping.
    pub fn park_all(&self, exit: &ExitLatch) -> bool {
        let started = Instant::now();
        let threads = self.thread_count();
        let state = lock(&self.state);
        self.kick_all();
        let parked = self.wait_parked(state, threads, || exit.stopping()) && !exit.stopping();
        log::debug!(
            "reset: {threads} vCPUs parked={parked} in {:?}",
            started.elapsed()
        );
        parked
    }

    fn thread_count(&self) -> usize {
        lock(&self.threads).len()
    }

    /// Send one [`kick_signal`] to every vCPU thread. The caller holds the state lock and has
    /// changed what holds the vCPUs: a vCPU either reads the change in [`VcpuControl::park`]
    /// or gets the kick after it cleared `immediate_exit` there, so its next `KVM_RUN` ends
    /// at once.
    fn kick_all(&self) {
        for &(_, t) in lock(&self.threads).iter() {
            // SAFETY: `t` is a vCPU thread of this process, never joined before the process
            // exits, so the id stays valid; the kick handler is installed before any vCPU
            // thread starts and only sets a flag in that thread's own `kvm_run`.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Wait until `threads` vCPUs are parked or ended: true then; false after
    /// [`PARK_TIMEOUT`] or once `give_up` says so.
    fn wait_parked(
        &self,
        mut state: MutexGuard<'_, ControlState>,
        threads: usize,
        give_up: impl Fn() -> bool,
    ) -> bool {
        let deadline = Instant::now() + PARK_TIMEOUT;
        loop {
            if state.parked + state.ended >= threads {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || give_up() {
                return false;
            }
            state = self.wait(state, deadline - now);
        }
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
    ///
    /// Clears `immediate_exit` under the state lock, right where it reads the state: a kick
    /// that was already handled is accounted for by what is read here, and one for a later
    /// change sets the flag again after this.
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
        set_immediate_exit(0);
        if !held(&state) {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
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
            state = self.wait(state, PARKED_RECHECK);
        }
        set_immediate_exit(0);
        state.parked -= 1;
    }

    /// Called once by a vCPU thread whose run loop is over.
    fn ended(&self) {
        lock(&self.state).ended += 1;
        self.changed.notify_all();
    }
}

/// What a vCPU thread needs.
pub struct VcpuContext {
    /// vCPU index.
    pub id: u8,
    /// The filter the thread installs before it first runs the guest.
    pub seccomp: crate::seccomp::SeccompMode,
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

/// The vCPU thread's seccomp filter, named `vcpuN` in a violation's message.
fn install_filter(ctx: &VcpuContext) -> Result<(), crate::seccomp::SeccompError> {
    /// Thread names for the message (a `&'static str` is all a signal handler can read).
    const NAMES: [&str; 16] = [
        "vcpu0", "vcpu1", "vcpu2", "vcpu3", "vcpu4", "vcpu5", "vcpu6", "vcpu7", "vcpu8", "vcpu9",
        "vcpu10", "vcpu11", "vcpu12", "vcpu13", "vcpu14", "vcpu15",
    ];
    let name = NAMES.get(usize::from(ctx.id)).copied().unwrap_or("vcpu");
    crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu, ctx.seccomp, name)
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

/// The thread of one vCPU: park when told, else run the guest and dispatch its exits, until
/// the VM stops.
fn run(mut ctx: VcpuContext) {
    let control = ctx.control.clone();
    if let Err(e) = install_filter(&ctx) {
        ctx.exit.exit(VmExit::Crash(crate::error_chain(&e)));
        control.ended();
        return;
    }
    // Declared after `ctx` (a parameter), so dropped before it: the kick handler lets go of
    // the `kvm_run` page before the fd that maps it is closed.
    let _target = KickTarget::install(&mut ctx.fd);
    run_until_exit(&mut ctx);
    control.ended();
}

fn run_until_exit(ctx: &mut VcpuContext) {
    let control = ctx.control.clone();
    let exit = ctx.exit.clone();
    loop {
        control.park(ctx.id, &exit, &mut |mode| reset(ctx, mode));
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
                describe_regs(ctx)
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
            Ok(VcpuExit::InternalError) => Some(VmExit::Crash(internal_error(ctx))),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmExit::Crash(format!(
                "vcpu{}: KVM entry failed, hardware reason {reason:#x} on host cpu {cpu}",
                ctx.id
            ))),
            Ok(other) => {
                let what = format!("{other:?}");
                Some(VmExit::Crash(format!(
                    "vcpu{}: unexpected KVM exit {what}{}",
                    ctx.id,
                    describe_regs(ctx)
                )))
            }
            // A kick: `park` clears `immediate_exit` as it reads why.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
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
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{Kvm, VmFd};
    use vm_memory::GuestMemoryBackend;

    /// Guest RAM of the KVM fixtures.
    const TEST_RAM: u64 = 1 << 20;
    /// Where the fixtures' real-mode code starts.
    const CODE_ADDR: u64 = 0x1000;
    /// The dword the counting guest increments.
    const COUNTER_ADDR: u64 = 0x2000;
    /// Real mode, at `CODE_ADDR`: `inc dword [COUNTER_ADDR]; jmp CODE_ADDR`. It never exits
    /// to the VMM, so only a kick takes its vCPU out of `KVM_RUN`.
    const COUNTING_LOOP: [u8; 7] = [0x66, 0xff, 0x06, 0x00, 0x20, 0xeb, 0xf9];
    /// How long a fixture thread may wait before it is rescued by an extra kick.
    const RESCUE_AFTER: Duration = Duration::from_secs(5);
    /// stop/cont rounds in the pause test: each would take [`PARK_TIMEOUT`] and fail if a
    /// kick were lost.
    const PAUSE_ROUNDS: usize = 200;

    /// A VM whose one vCPU runs [`COUNTING_LOOP`] in real mode, with its in-kernel irqchip (a
    /// LAPIC, which the snapshot reads).
    fn counting_vcpu() -> (VmFd, VcpuFd, GuestMemoryMmap) {
        let vm = Kvm::new().unwrap().create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let mem = create_guest_memory(TEST_RAM).unwrap();
        let region = mem.iter().next().unwrap();
        let desc = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: TEST_RAM,
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is `mem`'s live mapping of `TEST_RAM` bytes, and `mem` is
        // returned with the VM and outlives every `KVM_RUN` of the tests.
        unsafe { vm.set_user_memory_region(desc) }.unwrap();
        mem.write_slice(&COUNTING_LOOP, GuestAddress(CODE_ADDR))
            .unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        sregs.ds.base = 0;
        sregs.ds.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = CODE_ADDR;
        regs.rflags = 2;
        vcpu.set_regs(&regs).unwrap();
        (vm, vcpu, mem)
    }

    fn counter(mem: &GuestMemoryMmap) -> u32 {
        mem.read_obj(GuestAddress(COUNTER_ADDR)).unwrap()
    }

    /// The race a no-op handler loses: the kick lands after the thread decided to enter the
    /// guest and before `KVM_RUN`. Here it lands on purpose right before; `KVM_RUN` must
    /// return `EINTR` without running the guest, and the flag must be what clears it.
    #[test]
    fn a_kick_before_kvm_run_is_not_lost() {
        VcpuControl::install_kick_handler().unwrap();
        let (_vm, mut vcpu, mem) = counting_vcpu();
        let rescued = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let _target = KickTarget::install(&mut vcpu);
            // SAFETY: a signal to this very thread, whose handler is installed; it is
            // delivered before pthread_kill returns.
            unsafe { libc::pthread_kill(libc::pthread_self(), kick_signal()) };
            let first = vcpu.run().map(|_| ()).map_err(|e| e.errno());
            tx.send(()).unwrap();
            set_immediate_exit(0);
            first
        });
        if rx.recv_timeout(RESCUE_AFTER).is_err() {
            rescued.store(true, Ordering::SeqCst);
            // SAFETY: the test thread is alive (it has not sent yet) and handles the kick.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
        let first = t.join().unwrap();
        assert!(!rescued.load(Ordering::SeqCst), "the kick was lost");
        assert_eq!(first, Err(libc::EINTR));
        assert_eq!(counter(&mem), 0, "the guest ran");
    }

    /// `pause` takes a vCPU that never exits on its own out of the guest with its one kick,
    /// again and again; while paused the guest does not run, after `resume` it does.
    #[test]
    fn pause_parks_a_spinning_vcpu_and_resume_runs_it() {
        VcpuControl::install_kick_handler().unwrap();
        let (_vm, vcpu, mem) = counting_vcpu();
        let kvm = Kvm::new().unwrap();
        let msrs = kvm.get_msr_index_list().unwrap();
        let snapshot = VcpuSnapshot::capture(&vcpu, msrs.as_slice()).unwrap();
        let control = VcpuControl::new();
        let exit = ExitLatch::new(ResetAction::Exit).unwrap();
        let t = spawn(VcpuContext {
            id: 0,
            seccomp: crate::seccomp::SeccompMode::Off,
            fd: vcpu,
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            mem: mem.clone(),
            exit: exit.clone(),
            control: control.clone(),
            snapshot,
        })
        .unwrap();
        let running = |from: u32| {
            let deadline = Instant::now() + RESCUE_AFTER;
            while counter(&mem) == from {
                assert!(Instant::now() < deadline, "the guest does not run");
                std::thread::yield_now();
            }
        };
        running(0);
        for round in 0..PAUSE_ROUNDS {
            assert!(control.pause(), "round {round}: the vCPU did not park");
            let stopped = counter(&mem);
            assert_eq!(lock(&control.state).parked, 1);
            std::thread::sleep(Duration::from_micros(200));
            assert_eq!(
                counter(&mem),
                stopped,
                "round {round}: the guest ran while paused"
            );
            control.resume();
            running(stopped);
        }
        exit.exit(VmExit::PowerOff);
        assert!(control.pause(), "a stopping vCPU did not end");
        t.join().unwrap();
        assert_eq!(lock(&control.state).ended, 1);
    }

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

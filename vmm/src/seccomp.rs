//! seccomp filters, one per kind of thread, as Firecracker and Cloud Hypervisor confine
//! theirs (`docs/seccomp.md` lists what each allows and how to extend it).
//!
//! minivmm has two kinds of thread once the VM runs: the **event loop** (the main thread:
//! backends, devices' queues, the monitor, vproxy, resets) and the **vCPUs** (`KVM_RUN` and
//! the device registers the guest touches). Each installs its filter itself once its set-up
//! is done: a vCPU at the top of its thread, the event loop after `Vm::new` (and the
//! `minivmm relay` loop after it opened its chardevs). From then on a thread may make only the
//! syscalls on its list, and `ioctl` only with the requests on its list.
//!
//! A forbidden syscall raises `SIGSYS` (`SECCOMP_RET_TRAP`); the handler writes one line
//! naming the thread and the syscall, puts the terminal back and ends minivmm with status
//! [`EXIT_BAD_SYSCALL`] (Firecracker's 148). `--seccomp off` installs nothing (as Firecracker's
//! `--no-seccomp`); `--seccomp log` lets forbidden syscalls through and has the kernel log
//! them (`dmesg`: `audit: type=1326 ... comm="vcpu0" ... syscall=N`), to find what a new path
//! needs.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Exit status after a forbidden syscall (Firecracker's `BadSyscall`).
pub const EXIT_BAD_SYSCALL: i32 = 148;
/// `si_code` of a `SIGSYS` raised by seccomp.
const SYS_SECCOMP: i32 = 1;
/// Index, in `i32`s, of `si_syscall` in the kernel's `siginfo_t` (after `si_signo`,
/// `si_errno`, `si_code`, padding and the 8-byte `_call_addr`).
const SI_SYSCALL_INDEX: usize = 6;
/// The `ioctl` request is its second argument.
const IOCTL_REQUEST_ARG: u8 = 1;

/// `--seccomp`: what the filters do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Forbidden syscalls stop minivmm (the default).
    #[default]
    On,
    /// No filters.
    Off,
    /// Forbidden syscalls are allowed and logged by the kernel.
    Log,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(SeccompMode::On),
            "off" => Ok(SeccompMode::Off),
            "log" => Ok(SeccompMode::Log),
            _ => Err(format!("'{s}': expected 'on', 'off' or 'log'")),
        }
    }
}

/// The kinds of thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread's event loop (also `minivmm relay`'s).
    EventLoop,
    /// A vCPU thread.
    Vcpu,
}

impl ThreadKind {
    /// The name used in messages and `docs/seccomp.md`.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::EventLoop => "event loop",
            ThreadKind::Vcpu => "vcpu",
        }
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {0} thread's seccomp filter: {1}")]
    Build(ThreadKind, seccompiler::BackendError),
    #[error("cannot install the {0} thread's seccomp filter: {1}")]
    Install(ThreadKind, seccompiler::Error),
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

thread_local! {
    /// This thread's name for the SIGSYS message (set when its filter is installed).
    static THREAD_NAME: Cell<&'static str> = const { Cell::new("unnamed") };
}

/// Install `kind`'s filter on the calling thread (nothing with `SeccompMode::Off`).
/// `thread` names it in the message a violation prints (e.g. "vcpu0").
pub fn install(
    kind: ThreadKind,
    mode: SeccompMode,
    thread: &'static str,
) -> Result<(), SeccompError> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    THREAD_NAME.with(|n| n.set(thread));
    let program = program(kind, mode)?;
    seccompiler::apply_filter(&program).map_err(|e| SeccompError::Install(kind, e))
}

/// The BPF program of `kind`'s filter.
pub fn program(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::On | SeccompMode::Off => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(
        rules(kind),
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(kind, e))?;
    filter.try_into().map_err(|e| SeccompError::Build(kind, e))
}

/// Install the `SIGSYS` handler that reports a violation (process-wide; once, before the
/// first filter).
pub fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value, then filled in.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sigemptyset on our own sigaction's mask.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // SAFETY: installs a handler that only makes async-signal-safe calls.
    let r = unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) };
    if r != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The `SIGSYS` handler: one line on stderr, the terminal put back, exit. Only
/// async-signal-safe calls (write, one ioctl, _exit), no allocation.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    if code != SYS_SECCOMP {
        return;
    }
    // SAFETY: for SYS_SECCOMP the union holds the sigsys fields; si_syscall is the int at
    // index SI_SYSCALL_INDEX of the structure, which is larger than that.
    let nr = unsafe { *(info as *const i32).add(SI_SYSCALL_INDEX) };
    let name = usize::try_from(nr)
        .ok()
        .and_then(syscalls::Sysno::new)
        .map_or("?", |s| s.name());
    let thread = THREAD_NAME.with(Cell::get);
    let mut line = LineBuf::new();
    line.push("minivmm: seccomp: thread '");
    line.push(thread);
    line.push("' made the forbidden syscall ");
    line.push(name);
    line.push(" (");
    line.push_int(nr);
    line.push("); stopping (docs/seccomp.md: --seccomp log to find what a path needs)\n");
    line.write_stderr();
    chardev::restore_terminal();
    // SAFETY: _exit ends the process at once; nothing after it runs.
    unsafe { libc::_exit(EXIT_BAD_SYSCALL) };
}

/// A fixed buffer for one line, filled without allocating (signal handler).
struct LineBuf {
    buf: [u8; 256],
    len: usize,
}

impl LineBuf {
    fn new() -> Self {
        LineBuf {
            buf: [0; 256],
            len: 0,
        }
    }

    fn push(&mut self, s: &str) {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_int(&mut self, v: i32) {
        let mut digits = [0u8; 12];
        let mut n = i64::from(v).unsigned_abs();
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        if v < 0 {
            self.push("-");
        }
        for &d in &digits[i..] {
            self.push(std::str::from_utf8(std::slice::from_ref(&d)).unwrap_or("?"));
        }
    }

    fn write_stderr(&self) {
        // SAFETY: write(2) from our buffer of self.len initialised bytes.
        unsafe { libc::write(libc::STDERR_FILENO, self.buf.as_ptr().cast(), self.len) };
    }
}

/// An `ioctl` rule per allowed request.
fn ioctls(requests: &[u64]) -> Vec<SeccompRule> {
    requests
        .iter()
        .filter_map(|&req| {
            let cond = SeccompCondition::new(
                IOCTL_REQUEST_ARG,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                req,
            )
            .ok()?;
            SeccompRule::new(vec![cond]).ok()
        })
        .collect()
}

/// `kind`'s rules: syscall number to the rules of which one must match (empty: any
/// arguments).
pub fn rules(kind: ThreadKind) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let (syscalls, requests): (&[i64], &[u64]) = match kind {
        ThreadKind::EventLoop => (lists::EVENT_LOOP, lists::EVENT_LOOP_IOCTLS),
        ThreadKind::Vcpu => (lists::VCPU, lists::VCPU_IOCTLS),
    };
    for &nr in lists::COMMON.iter().chain(syscalls) {
        map.insert(nr, Vec::new());
    }
    let requests: Vec<u64> = lists::COMMON_IOCTLS
        .iter()
        .chain(requests)
        .copied()
        .collect();
    map.insert(libc::SYS_ioctl, ioctls(&requests));
    map
}

/// The allow-lists (`docs/seccomp.md` says why each entry is there).
pub mod lists {
    use kvm_bindings::KVMIO;
    use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

    /// An ioctl request number as the kernel's `_IO*` macros build it.
    const fn req(dir: u32, ty: u32, nr: u32, size: usize) -> u64 {
        ioctl_expr(dir, ty, nr, size as u32) as u64
    }
    const fn kvm_io(nr: u32) -> u64 {
        req(_IOC_NONE, KVMIO, nr, 0)
    }
    const fn kvm_iow<T>(nr: u32) -> u64 {
        req(_IOC_WRITE, KVMIO, nr, std::mem::size_of::<T>())
    }
    const fn kvm_ior<T>(nr: u32) -> u64 {
        req(_IOC_READ, KVMIO, nr, std::mem::size_of::<T>())
    }
    const fn kvm_iowr<T>(nr: u32) -> u64 {
        req(_IOC_READ | _IOC_WRITE, KVMIO, nr, std::mem::size_of::<T>())
    }

    /// Both kinds: memory, time, locks, signals, logging, exit.
    pub const COMMON: &[i64] = &[
        libc::SYS_brk,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_close,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_futex,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_getrandom,
        libc::SYS_madvise,
        libc::SYS_mmap,
        libc::SYS_mprotect,
        libc::SYS_mremap,
        libc::SYS_munmap,
        libc::SYS_nanosleep,
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_restart_syscall,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sched_yield,
        libc::SYS_sigaltstack,
        libc::SYS_write,
        libc::SYS_writev,
        // Device models on a vCPU write to backends too (a UART's output, a socket).
        libc::SYS_sendto,
        libc::SYS_sendmsg,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_epoll_ctl,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
        libc::SYS_fcntl,
        libc::SYS_shutdown,
        libc::SYS_tgkill,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_lseek,
        libc::SYS_prctl,
        libc::SYS_sched_getaffinity,
    ];

    /// The event loop: every backend (sockets, ptys, files, ttys), the monitor (new
    /// connections, `getfd`, `chardev-add` at run time), vproxy, timers, signals, resets.
    pub const EVENT_LOOP: &[i64] = &[
        libc::SYS_accept4,
        libc::SYS_bind,
        libc::SYS_chmod,
        libc::SYS_connect,
        libc::SYS_dup,
        libc::SYS_dup3,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_wait,
        libc::SYS_eventfd2,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_ftruncate,
        libc::SYS_getpeername,
        libc::SYS_getsockname,
        libc::SYS_getsockopt,
        libc::SYS_kill,
        libc::SYS_listen,
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        libc::SYS_open,
        libc::SYS_openat,
        libc::SYS_pipe2,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_readlink,
        libc::SYS_readlinkat,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_rmdir,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigtimedwait,
        libc::SYS_setsockopt,
        libc::SYS_signalfd4,
        libc::SYS_socket,
        libc::SYS_socketpair,
        libc::SYS_statfs,
        libc::SYS_timerfd_create,
        libc::SYS_umask,
        libc::SYS_uname,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_getcwd,
        libc::SYS_getdents64,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_access,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
    ];

    // Terminal and socket requests (asm-generic values, as on x86_64).
    const TCGETS: u64 = libc::TCGETS;
    const TCSETS: u64 = libc::TCSETS;
    const TCSETSW: u64 = libc::TCSETSW;
    const TCSETSF: u64 = libc::TCSETSF;
    const TCGETS2: u64 = libc::TCGETS2;
    const TCSETS2: u64 = libc::TCSETS2;
    const TCSETSW2: u64 = libc::TCSETSW2;
    const TCSETSF2: u64 = libc::TCSETSF2;
    const TIOCGWINSZ: u64 = libc::TIOCGWINSZ;
    const TIOCSWINSZ: u64 = libc::TIOCSWINSZ;
    const TIOCMGET: u64 = libc::TIOCMGET;
    const TIOCMSET: u64 = libc::TIOCMSET;
    const TIOCMBIS: u64 = libc::TIOCMBIS;
    const TIOCMBIC: u64 = libc::TIOCMBIC;
    const TIOCSBRK: u64 = libc::TIOCSBRK;
    const TIOCCBRK: u64 = libc::TIOCCBRK;
    const TCSBRK: u64 = libc::TCSBRK;
    const TCFLSH: u64 = libc::TCFLSH;
    const TIOCGPTN: u64 = libc::TIOCGPTN;
    const TIOCSPTLCK: u64 = libc::TIOCSPTLCK;
    const TIOCGPTPEER: u64 = libc::TIOCGPTPEER;
    const TIOCOUTQ: u64 = libc::TIOCOUTQ;
    const FIONREAD: u64 = libc::FIONREAD;
    const FIONBIO: u64 = libc::FIONBIO;
    const FIOCLEX: u64 = libc::FIOCLEX;
    const FIONCLEX: u64 = libc::FIONCLEX;

    /// Both kinds: terminals (the handler's own restore, a UART's output to a tty), sockets.
    pub const COMMON_IOCTLS: &[u64] = &[
        TCGETS,
        TCSETS,
        TCSETSW,
        TCSETSF,
        TCGETS2,
        TCSETS2,
        TCSETSW2,
        TCSETSF2,
        TIOCGWINSZ,
        TIOCMGET,
        TIOCMSET,
        TIOCMBIS,
        TIOCMBIC,
        TIOCSBRK,
        TIOCCBRK,
        TCSBRK,
        TCFLSH,
        TIOCOUTQ,
        FIONREAD,
        FIONBIO,
        FIOCLEX,
        FIONCLEX,
        // Interrupt lines raised by device models (KVM_IRQ_LINE on the VM fd).
        kvm_iow::<kvm_bindings::kvm_irq_level>(0x61),
        // KVM_IRQ_LINE_STATUS
        kvm_iowr::<kvm_bindings::kvm_irq_level>(0x67),
        // KVM_IOEVENTFD: virtio slots registering their notify addresses (reset, hot add).
        kvm_iow::<kvm_bindings::kvm_ioeventfd>(0x79),
        // KVM_IRQFD
        kvm_iow::<kvm_bindings::kvm_irqfd>(0x76),
    ];

    /// The event loop: ptys for `chardev-add`, the machine reset's irqchip and PIT state.
    pub const EVENT_LOOP_IOCTLS: &[u64] = &[
        TIOCSWINSZ,
        TIOCGPTN,
        TIOCSPTLCK,
        TIOCGPTPEER,
        // KVM_GET_IRQCHIP / KVM_SET_IRQCHIP
        kvm_iowr::<kvm_bindings::kvm_irqchip>(0x62),
        kvm_ior::<kvm_bindings::kvm_irqchip>(0x63),
        // KVM_GET_PIT2 / KVM_SET_PIT2
        kvm_ior::<kvm_bindings::kvm_pit_state2>(0x9f),
        kvm_iow::<kvm_bindings::kvm_pit_state2>(0xa0),
        // KVM_GET_CLOCK / KVM_SET_CLOCK
        kvm_ior::<kvm_bindings::kvm_clock_data>(0x7c),
        kvm_iow::<kvm_bindings::kvm_clock_data>(0x7b),
    ];

    /// The vCPU: running the guest, and putting its state back on a machine reset.
    pub const VCPU: &[i64] = &[];

    /// The vCPU's requests.
    pub const VCPU_IOCTLS: &[u64] = &[
        // KVM_RUN
        kvm_io(0x80),
        // KVM_GET_REGS / KVM_SET_REGS
        kvm_ior::<kvm_bindings::kvm_regs>(0x81),
        kvm_iow::<kvm_bindings::kvm_regs>(0x82),
        // KVM_GET_SREGS / KVM_SET_SREGS
        kvm_ior::<kvm_bindings::kvm_sregs>(0x83),
        kvm_iow::<kvm_bindings::kvm_sregs>(0x84),
        // KVM_TRANSLATE (instruction bytes in a crash report)
        kvm_iowr::<kvm_bindings::kvm_translation>(0x85),
        // KVM_GET_MSRS / KVM_SET_MSRS (the header; the entries follow)
        kvm_iowr::<kvm_bindings::kvm_msrs>(0x88),
        kvm_iow::<kvm_bindings::kvm_msrs>(0x89),
        // KVM_SET_CPUID2
        kvm_iow::<kvm_bindings::kvm_cpuid2>(0x90),
        // KVM_GET_LAPIC / KVM_SET_LAPIC
        kvm_ior::<kvm_bindings::kvm_lapic_state>(0x8e),
        kvm_iow::<kvm_bindings::kvm_lapic_state>(0x8f),
        // KVM_GET_FPU / KVM_SET_FPU
        kvm_ior::<kvm_bindings::kvm_fpu>(0x8c),
        kvm_iow::<kvm_bindings::kvm_fpu>(0x8d),
        // KVM_GET_MP_STATE / KVM_SET_MP_STATE
        kvm_ior::<kvm_bindings::kvm_mp_state>(0x98),
        kvm_iow::<kvm_bindings::kvm_mp_state>(0x99),
        // KVM_GET_VCPU_EVENTS / KVM_SET_VCPU_EVENTS
        kvm_ior::<kvm_bindings::kvm_vcpu_events>(0x9f),
        kvm_iow::<kvm_bindings::kvm_vcpu_events>(0xa0),
        // KVM_GET_DEBUGREGS / KVM_SET_DEBUGREGS
        kvm_ior::<kvm_bindings::kvm_debugregs>(0xa1),
        kvm_iow::<kvm_bindings::kvm_debugregs>(0xa2),
        // KVM_GET_XSAVE / KVM_SET_XSAVE
        kvm_ior::<kvm_bindings::kvm_xsave>(0xa4),
        kvm_iow::<kvm_bindings::kvm_xsave>(0xa5),
        // KVM_GET_XCRS / KVM_SET_XCRS
        kvm_ior::<kvm_bindings::kvm_xcrs>(0xa6),
        kvm_iow::<kvm_bindings::kvm_xcrs>(0xa7),
        // KVM_KVMCLOCK_CTRL
        kvm_io(0xad),
        // KVM_SET_SIGNAL_MASK
        kvm_iow::<kvm_bindings::kvm_signal_mask>(0x8b),
        // KVM_SET_TSC_KHZ / KVM_GET_TSC_KHZ
        kvm_io(0xa2),
        kvm_io(0xa3),
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Output};

    /// Set in a child test process: which thread kind it confines before the forbidden call.
    const CHILD_KIND: &str = "MINIVMM_SECCOMP_CHILD_KIND";
    /// Set in a child test process: the `--seccomp` mode it uses.
    const CHILD_MODE: &str = "MINIVMM_SECCOMP_CHILD_MODE";
    /// A syscall no minivmm thread makes.
    const FORBIDDEN: i64 = libc::SYS_getppid;

    /// Run `child_confines_itself_then_calls_a_forbidden_syscall` in a child process of this
    /// test binary (a filter cannot be taken off again, so never in the test process).
    fn child(kind: &str, mode: &str) -> Output {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp::tests::child_confines_itself_then_calls_a_forbidden_syscall",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_KIND, kind)
            .env(CHILD_MODE, mode)
            .output()
            .unwrap()
    }

    /// Only does something in a child started by `child`.
    #[test]
    fn child_confines_itself_then_calls_a_forbidden_syscall() {
        let (Ok(kind), Ok(mode)) = (std::env::var(CHILD_KIND), std::env::var(CHILD_MODE)) else {
            return;
        };
        let (kind, name) = match kind.as_str() {
            "vcpu" => (ThreadKind::Vcpu, "vcpu0"),
            _ => (ThreadKind::EventLoop, "main"),
        };
        let mode: SeccompMode = mode.parse().unwrap();
        install_sigsys_handler().unwrap();
        install(kind, mode, name).unwrap();
        // SAFETY: a syscall without arguments or side effects.
        unsafe { libc::syscall(FORBIDDEN) };
        // Only `log` gets here; end before the harness makes calls the filter does not know.
        // SAFETY: _exit ends the process.
        unsafe { libc::_exit(0) };
    }

    #[test]
    fn a_forbidden_syscall_stops_each_thread_kind_with_one_line() {
        for (kind, thread) in [("vcpu", "vcpu0"), ("event-loop", "main")] {
            let out = child(kind, "on");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(EXIT_BAD_SYSCALL),
                "{kind}: {stderr}"
            );
            let line = format!(
                "minivmm: seccomp: thread '{thread}' made the forbidden syscall getppid ({FORBIDDEN}); stopping"
            );
            assert!(stderr.contains(&line), "{kind}: {stderr}");
            assert_eq!(stderr.matches("minivmm: seccomp:").count(), 1, "{stderr}");
        }
    }

    #[test]
    fn log_mode_lets_the_call_through() {
        let out = child("vcpu", "log");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn both_filters_build_within_the_kernel_limit() {
        for kind in [ThreadKind::EventLoop, ThreadKind::Vcpu] {
            for mode in [SeccompMode::On, SeccompMode::Log] {
                let p = program(kind, mode).unwrap();
                assert!(
                    !p.is_empty() && p.len() <= 4096,
                    "{kind}: {} instructions",
                    p.len()
                );
            }
            let r = rules(kind);
            assert!(!r.contains_key(&FORBIDDEN));
            assert!(!r.contains_key(&libc::SYS_execve), "{kind} may not exec");
            assert!(!r.contains_key(&libc::SYS_ptrace));
        }
        // The vCPU opens nothing and makes no sockets.
        let vcpu = rules(ThreadKind::Vcpu);
        for nr in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_accept4,
            libc::SYS_connect,
        ] {
            assert!(!vcpu.contains_key(&nr), "vcpu may call {nr}");
        }
    }

    #[test]
    fn modes_parse_as_the_cli_spells_them() {
        assert_eq!("on".parse::<SeccompMode>(), Ok(SeccompMode::On));
        assert_eq!("off".parse::<SeccompMode>(), Ok(SeccompMode::Off));
        assert_eq!("log".parse::<SeccompMode>(), Ok(SeccompMode::Log));
        assert!("yes"
            .parse::<SeccompMode>()
            .unwrap_err()
            .contains("'on', 'off' or 'log'"));
    }
}

//! The `serial` backend (alias `tty`): a host serial line such as `/dev/ttyS0` or a USB
//! adapter.
//!
//! The tty is opened non-blocking without becoming our controlling terminal and put in raw
//! mode at 115200 8N1 with the modem-control lines ignored (CLOCAL). When the guest programs
//! its UART, [`LineControl::set_line_params`] sets the same speed (the nearest standard rate),
//! data bits, parity (including mark and space, via CMSPAR) and stop bits on the real line. A
//! break is `TIOCSBRK`, cleared by a timer after [`BREAK_DURATION`], because `tcsendbreak`
//! would block. The original settings are restored on drop.
//!
//! Modem lines pass through where the tty has them (a pty has none): the guest's DTR and RTS
//! are raised and lowered with `TIOCMBIS`/`TIOCMBIC` ([`LineControl::set_modem_control`]), and
//! [`LineControl::modem_status`] reads DCD, DSR, CTS and RI with `TIOCMGET` for the frontend to
//! poll (the kernel has no pollable event for them; QEMU polls too).
//!
//! This module must not block.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use vmm_sys_util::timerfd::TimerFd;

use crate::backend::{Backend, Event, Interest, LineControl, LineParams, ModemStatus, Readiness};
use crate::error::{Error, Result};
use crate::fdchan::FdChannel;
use crate::poller::{FdSet, Registrar, Token};
use crate::spec::SerialSpec;
use crate::term::{self, ControlModes, RawMode, RawTerminal, Termios};

/// How long a break condition lasts.
pub const BREAK_DURATION: Duration = Duration::from_millis(250);
/// The line speed before the guest programs one.
pub const DEFAULT_BAUD: u32 = 115_200;

/// The standard rates termios knows (the `B*` speeds).
const SPEEDS: &[u32] = &[
    50, 75, 110, 134, 150, 200, 300, 600, 1200, 1800, 2400, 4800, 9600, 19200, 38400, 57600,
    115_200, 230_400, 460_800, 500_000, 576_000, 921_600, 1_000_000, 1_152_000, 1_500_000,
    2_000_000, 2_500_000, 3_000_000, 3_500_000, 4_000_000,
];

/// The standard rate nearest to `baud`.
pub fn nearest_speed(baud: u32) -> u32 {
    SPEEDS
        .iter()
        .copied()
        .min_by_key(|b| b.abs_diff(baud))
        .unwrap_or(DEFAULT_BAUD)
}

/// Apply `p` to termios `t`: the nearest standard speed, both ways, and the character format.
pub(crate) fn apply_params(t: &mut Termios, p: LineParams) -> io::Result<()> {
    t.set_speed(nearest_speed(p.baud))?;
    t.control_modes -= ControlModes::CSIZE
        | ControlModes::PARENB
        | ControlModes::PARODD
        | ControlModes::CMSPAR
        | ControlModes::CSTOPB;
    t.control_modes |= match p.data_bits {
        5 => ControlModes::CS5,
        6 => ControlModes::CS6,
        7 => ControlModes::CS7,
        _ => ControlModes::CS8,
    };
    t.control_modes |= match p.parity {
        'E' => ControlModes::PARENB,
        'O' => ControlModes::PARENB | ControlModes::PARODD,
        'M' => ControlModes::PARENB | ControlModes::PARODD | ControlModes::CMSPAR,
        'S' => ControlModes::PARENB | ControlModes::CMSPAR,
        _ => ControlModes::empty(),
    };
    if p.stop_bits == 2 {
        t.control_modes |= ControlModes::CSTOPB;
    }
    Ok(())
}

/// The `serial` backend.
#[derive(Debug)]
pub struct SerialBackend {
    /// The break timer's registration; declared first, it unregisters before `timer` closes.
    fds: FdSet,
    chan: FdChannel,
    fd: RawFd,
    /// Puts the tty's own settings back on drop, before `_tty` closes.
    _term: RawTerminal,
    timer: TimerFd,
    breaking: bool,
    /// Whether the tty has modem lines (a pty, for one, has none: TIOCMGET fails).
    has_modem_lines: bool,
    _tty: OwnedFd,
}

impl SerialBackend {
    /// Open and configure the host tty.
    pub fn open(id: &str, spec: &SerialSpec) -> Result<Self> {
        let target = spec.path.display().to_string();
        let err = |op, e| Error::io(id, op, target.clone(), e);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&spec.path)
            .map_err(|e| err("open", e))?;
        let tty: OwnedFd = f.into();
        let fd = tty.as_raw_fd();
        if !term::isatty(fd) {
            return Err(Error::Unsupported {
                id: id.to_string(),
                reason: "path is not a tty",
            });
        }
        let defaults = LineParams {
            baud: DEFAULT_BAUD,
            data_bits: 8,
            parity: 'N',
            stop_bits: 1,
        };
        let term = RawTerminal::enter_with(fd, |saved| {
            let mut raw = term::make_raw(saved, RawMode::default());
            raw.control_modes |= ControlModes::CLOCAL | ControlModes::CREAD;
            apply_params(&mut raw, defaults)?;
            Ok(raw)
        })
        .map_err(|e| err("configure", e))?;
        let timer = TimerFd::new().map_err(|e| err("create timer for", e.into()))?;
        let chan = FdChannel::new(
            "serial",
            format!("serial:{target}"),
            Some(fd),
            Some(fd),
            Vec::new(),
        )
        .map_err(|e| err("use", e))?;
        Ok(SerialBackend {
            fds: FdSet::new(),
            chan,
            fd,
            _term: term,
            timer,
            breaking: false,
            has_modem_lines: term::tiocmget(fd).is_ok(),
            _tty: tty,
        })
    }

    fn set_break(&mut self, on: bool) -> io::Result<()> {
        term::set_break(self.fd, on)
    }

    /// The tty's current termios (for tests and diagnostics).
    pub fn termios(&self) -> io::Result<Termios> {
        term::tcgetattr(self.fd)
    }
}

impl Drop for SerialBackend {
    fn drop(&mut self) {
        if self.breaking {
            let _ = self.set_break(false);
        }
        // `_term` restores the settings when it drops, next.
    }
}

impl Backend for SerialBackend {
    fn kind(&self) -> &'static str {
        "serial"
    }
    fn filename(&self) -> String {
        self.chan.filename()
    }
    fn attach(&mut self, reg: Registrar) {
        self.fds.attach(reg.clone());
        self.chan.attach(reg);
    }
    fn detach(&mut self) {
        self.fds.detach();
        self.chan.detach();
    }
    fn on_ready(&mut self, token: Token, readiness: Readiness) {
        if self.fds.fd_of(token).is_none() {
            return self.chan.on_ready(token, readiness);
        }
        let _ = self.timer.wait();
        if let Err(e) = self.set_break(false) {
            log::warn!("chardev {}: cannot end break: {e}", self.chan.filename());
        }
        self.breaking = false;
        self.fds.set(self.timer.as_raw_fd(), Interest::NONE);
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.chan.read(buf)
    }
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.chan.write(data)
    }
    fn set_input_wanted(&mut self, wanted: bool) {
        self.chan.set_input_wanted(wanted)
    }
    fn is_connected(&self) -> bool {
        true
    }
    fn take_events(&mut self) -> Vec<Event> {
        self.chan.take_events()
    }
    fn dropped_bytes(&self) -> u64 {
        self.chan.dropped_bytes()
    }
    fn line(&mut self) -> Option<&mut dyn LineControl> {
        Some(self)
    }
}

impl LineControl for SerialBackend {
    fn send_break(&mut self) {
        if self.breaking {
            return;
        }
        match self.set_break(true) {
            Ok(()) => match self.timer.reset(BREAK_DURATION, None) {
                Ok(()) => {
                    self.breaking = true;
                    self.fds.set(self.timer.as_raw_fd(), Interest::READ);
                }
                Err(e) => {
                    log::warn!("chardev {}: cannot time break: {e}", self.chan.filename());
                    let _ = self.set_break(false);
                }
            },
            Err(e) => log::debug!("chardev {}: break not supported: {e}", self.chan.filename()),
        }
    }
    fn set_line_params(&mut self, params: LineParams) {
        let r = term::tcgetattr(self.fd).and_then(|mut t| {
            apply_params(&mut t, params)?;
            term::tcsetattr(self.fd, &t)
        });
        if let Err(e) = r {
            log::warn!(
                "chardev {}: cannot set line parameters: {e}",
                self.chan.filename()
            );
        }
    }
    fn set_modem_control(&mut self, dtr: bool, rts: bool) {
        if !self.has_modem_lines {
            return;
        }
        for (bit, on) in [(libc::TIOCM_DTR, dtr), (libc::TIOCM_RTS, rts)] {
            if let Err(e) = term::tiocm_change(self.fd, bit, on) {
                log::warn!(
                    "chardev {}: cannot set modem lines: {e}",
                    self.chan.filename()
                );
                return;
            }
        }
    }
    fn modem_status(&mut self) -> Option<ModemStatus> {
        if !self.has_modem_lines {
            return None;
        }
        match term::tiocmget(self.fd) {
            Ok(bits) => Some(ModemStatus {
                dcd: bits & libc::TIOCM_CAR != 0,
                dsr: bits & libc::TIOCM_DSR != 0,
                cts: bits & libc::TIOCM_CTS != 0,
                ri: bits & libc::TIOCM_RNG != 0,
            }),
            Err(e) => {
                log::warn!(
                    "chardev {}: cannot read modem lines: {e}",
                    self.chan.filename()
                );
                self.has_modem_lines = false;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pty::open_master;
    use crate::sys;
    use crate::testutil::{read_n, tcgetattr};

    #[test]
    fn serial_on_a_pty_both_ways_and_line_params() {
        let (master, path) = open_master().unwrap();
        let mut b = SerialBackend::open("s", &SerialSpec { path: path.clone() }).unwrap();
        let t = tcgetattr(b.fd).unwrap();
        assert_eq!(t.c_lflag & (libc::ICANON | libc::ECHO), 0, "not raw");
        // SAFETY: cfgetospeed only reads the termios we own.
        assert_eq!(unsafe { libc::cfgetospeed(&t) }, libc::B115200);
        assert_eq!(b.write(b"to line").unwrap(), 7);
        let mut got = Vec::new();
        while got.len() < 7 {
            sys::poll_one(master.as_raw_fd(), libc::POLLIN, 1000).unwrap();
            let mut buf = [0u8; 16];
            let n = sys::read(master.as_raw_fd(), &mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"to line");
        sys::write(master.as_raw_fd(), b"from line").unwrap();
        assert_eq!(read_n(&mut b, 9), b"from line");

        b.set_line_params(LineParams {
            baud: 9600,
            data_bits: 7,
            parity: 'E',
            stop_bits: 2,
        });
        let t = tcgetattr(b.fd).unwrap();
        // SAFETY: cfgetospeed only reads the termios we own.
        assert_eq!(unsafe { libc::cfgetospeed(&t) }, libc::B9600);
        // (A pty forces CS8 without parity; apply_params is checked on its own below.)
        assert_ne!(t.c_cflag & libc::CSTOPB, 0);
        // A break never blocks, whether or not the line supports it.
        let start = std::time::Instant::now();
        b.send_break();
        assert!(start.elapsed() < BREAK_DURATION);
        // A pty has no modem lines: no status (the frontend falls back to the connection
        // state) and setting DTR/RTS is a quiet no-op.
        assert_eq!(b.modem_status(), None);
        b.set_modem_control(true, false);
        assert_eq!(b.write(b"!").unwrap(), 1);
    }

    #[test]
    fn line_params_to_termios() {
        let (master, _) = open_master().unwrap();
        let mut t = term::tcgetattr(master.as_raw_fd()).unwrap();
        let p = |data_bits, parity, stop_bits| LineParams {
            baud: 2400,
            data_bits,
            parity,
            stop_bits,
        };
        let bits = |t: &Termios, mask: ControlModes| t.control_modes & mask;
        let parity = ControlModes::PARENB | ControlModes::PARODD | ControlModes::CMSPAR;
        apply_params(&mut t, p(7, 'E', 2)).unwrap();
        assert_eq!(bits(&t, ControlModes::CSIZE), ControlModes::CS7);
        assert_eq!(bits(&t, parity), ControlModes::PARENB);
        assert!(t.control_modes.contains(ControlModes::CSTOPB));
        assert_eq!(t.input_speed(), 2400);
        assert_eq!(t.output_speed(), 2400);
        apply_params(&mut t, p(5, 'M', 1)).unwrap();
        assert_eq!(bits(&t, ControlModes::CSIZE), ControlModes::CS5);
        assert_eq!(bits(&t, parity), parity);
        assert!(!t.control_modes.contains(ControlModes::CSTOPB));
        apply_params(&mut t, p(8, 'N', 1)).unwrap();
        assert_eq!(bits(&t, ControlModes::CSIZE), ControlModes::CS8);
        assert!(!t.control_modes.contains(ControlModes::PARENB));
    }

    #[test]
    fn nearest_standard_speed() {
        assert_eq!(nearest_speed(115_200), 115_200);
        assert_eq!(nearest_speed(3500), 2400);
        assert_eq!(nearest_speed(9000), 9600);
        assert_eq!(nearest_speed(0), 50);
    }

    #[test]
    fn not_a_tty_is_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let e = SerialBackend::open(
            "s",
            &SerialSpec {
                path: f.path().into(),
            },
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "chardev 's': path is not a tty");
    }
}

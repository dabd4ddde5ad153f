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
use crate::sys;

/// How long a break condition lasts.
pub const BREAK_DURATION: Duration = Duration::from_millis(250);
/// The line speed before the guest programs one.
pub const DEFAULT_BAUD: u32 = 115_200;

/// The standard rates termios knows.
const SPEEDS: &[(u32, libc::speed_t)] = &[
    (50, libc::B50),
    (75, libc::B75),
    (110, libc::B110),
    (134, libc::B134),
    (150, libc::B150),
    (200, libc::B200),
    (300, libc::B300),
    (600, libc::B600),
    (1200, libc::B1200),
    (1800, libc::B1800),
    (2400, libc::B2400),
    (4800, libc::B4800),
    (9600, libc::B9600),
    (19200, libc::B19200),
    (38400, libc::B38400),
    (57600, libc::B57600),
    (115_200, libc::B115200),
    (230_400, libc::B230400),
    (460_800, libc::B460800),
    (500_000, libc::B500000),
    (576_000, libc::B576000),
    (921_600, libc::B921600),
    (1_000_000, libc::B1000000),
    (1_152_000, libc::B1152000),
    (1_500_000, libc::B1500000),
    (2_000_000, libc::B2000000),
    (2_500_000, libc::B2500000),
    (3_000_000, libc::B3000000),
    (3_500_000, libc::B3500000),
    (4_000_000, libc::B4000000),
];

/// The standard rate nearest to `baud`.
pub fn nearest_speed(baud: u32) -> (u32, libc::speed_t) {
    *SPEEDS
        .iter()
        .min_by_key(|(b, _)| b.abs_diff(baud))
        .unwrap_or(&(DEFAULT_BAUD, libc::B115200))
}

/// Set both line speeds of `t` to the standard rate `speed`, as `cfsetispeed` and
/// `cfsetospeed` do. Done by hand because the libc crate binds those to their pre-2.42 glibc
/// symbol versions, which a static (`crt-static`) link cannot resolve.
fn set_speed(t: &mut libc::termios, speed: libc::speed_t) {
    // CIBAUD zero: the input speed follows the output speed.
    t.c_cflag &= !(libc::CBAUD | libc::CBAUDEX | libc::CIBAUD);
    t.c_cflag |= speed;
    t.c_ispeed = speed;
    t.c_ospeed = speed;
}

/// Apply `p` to termios `t`.
pub(crate) fn apply_params(t: &mut libc::termios, p: LineParams) -> io::Result<()> {
    let (_, speed) = nearest_speed(p.baud);
    set_speed(t, speed);
    t.c_cflag &= !(libc::CSIZE | libc::PARENB | libc::PARODD | libc::CMSPAR | libc::CSTOPB);
    t.c_cflag |= match p.data_bits {
        5 => libc::CS5,
        6 => libc::CS6,
        7 => libc::CS7,
        _ => libc::CS8,
    };
    t.c_cflag |= match p.parity {
        'E' => libc::PARENB,
        'O' => libc::PARENB | libc::PARODD,
        'M' => libc::PARENB | libc::PARODD | libc::CMSPAR,
        'S' => libc::PARENB | libc::CMSPAR,
        _ => 0,
    };
    if p.stop_bits == 2 {
        t.c_cflag |= libc::CSTOPB;
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
    saved: libc::termios,
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
        if !sys::isatty(fd) {
            return Err(Error::Unsupported {
                id: id.to_string(),
                reason: "path is not a tty",
            });
        }
        let saved = sys::tcgetattr(fd).map_err(|e| err("configure", e))?;
        let mut raw = sys::make_raw(&saved);
        raw.c_cflag |= libc::CLOCAL | libc::CREAD;
        let defaults = LineParams {
            baud: DEFAULT_BAUD,
            data_bits: 8,
            parity: 'N',
            stop_bits: 1,
        };
        apply_params(&mut raw, defaults).map_err(|e| err("configure", e))?;
        sys::tcsetattr(fd, &raw).map_err(|e| err("configure", e))?;
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
            saved,
            timer,
            breaking: false,
            has_modem_lines: sys::tiocmget(fd).is_ok(),
            _tty: tty,
        })
    }

    fn set_break(&mut self, on: bool) -> io::Result<()> {
        let req = if on { libc::TIOCSBRK } else { libc::TIOCCBRK };
        // SAFETY: TIOCSBRK/TIOCCBRK take no argument and act on the tty we own.
        if unsafe { libc::ioctl(self.fd, req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The tty's current termios (for tests and diagnostics).
    pub fn termios(&self) -> io::Result<libc::termios> {
        sys::tcgetattr(self.fd)
    }
}

impl Drop for SerialBackend {
    fn drop(&mut self) {
        if self.breaking {
            let _ = self.set_break(false);
        }
        let _ = sys::tcsetattr(self.fd, &self.saved);
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
        let r = sys::tcgetattr(self.fd).and_then(|mut t| {
            apply_params(&mut t, params)?;
            sys::tcsetattr(self.fd, &t)
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
            if let Err(e) = sys::tiocm_change(self.fd, bit, on) {
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
        match sys::tiocmget(self.fd) {
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
    use crate::testutil::read_n;

    #[test]
    fn serial_on_a_pty_both_ways_and_line_params() {
        let (master, path) = open_master().unwrap();
        let mut b = SerialBackend::open("s", &SerialSpec { path: path.clone() }).unwrap();
        let t = b.termios().unwrap();
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
        let t = b.termios().unwrap();
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
        let mut t = sys::tcgetattr(master.as_raw_fd()).unwrap();
        let p = |data_bits, parity, stop_bits| LineParams {
            baud: 2400,
            data_bits,
            parity,
            stop_bits,
        };
        apply_params(&mut t, p(7, 'E', 2)).unwrap();
        assert_eq!(t.c_cflag & libc::CSIZE, libc::CS7);
        assert_eq!(
            t.c_cflag & (libc::PARENB | libc::PARODD | libc::CMSPAR),
            libc::PARENB
        );
        assert_ne!(t.c_cflag & libc::CSTOPB, 0);
        // SAFETY: cfgetispeed only reads the termios we own.
        assert_eq!(unsafe { libc::cfgetispeed(&t) }, libc::B2400);
        apply_params(&mut t, p(5, 'M', 1)).unwrap();
        assert_eq!(t.c_cflag & libc::CSIZE, libc::CS5);
        assert_eq!(
            t.c_cflag & (libc::PARENB | libc::PARODD | libc::CMSPAR),
            libc::PARENB | libc::PARODD | libc::CMSPAR
        );
        assert_eq!(t.c_cflag & libc::CSTOPB, 0);
        apply_params(&mut t, p(8, 'N', 1)).unwrap();
        assert_eq!(t.c_cflag & libc::CSIZE, libc::CS8);
        assert_eq!(t.c_cflag & libc::PARENB, 0);
    }

    #[test]
    fn nearest_standard_speed() {
        assert_eq!(nearest_speed(115_200).0, 115_200);
        assert_eq!(nearest_speed(3500).0, 2400);
        assert_eq!(nearest_speed(9000).0, 9600);
        assert_eq!(nearest_speed(0).0, 50);
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

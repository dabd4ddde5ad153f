//! A monitor session over any chardev backend: `--mon chardev=ID,mode=control` (QMP) or
//! `mode=readline` (the human monitor), e.g. on an inherited socket fd or on stdio.
//!
//! Like QEMU's, it serves one peer at a time: a peer connecting (the backend's `Opened`)
//! starts a new session with the greeting or banner, a peer leaving resets it. Output is
//! bounded: input is pulled only while pending output is below the high-water mark, and
//! output beyond the hard limit (events nobody reads) is dropped and counted.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;

use chardev::{Backend, Event, Readiness, Registrar, Token};

use crate::events::EventQueue;
use crate::fdstore::FdStore;
use crate::hmp::{self, LineEditor};
use crate::machine::Machine;
use crate::protocol::{self, Incoming, QmpEvent, Session};
use crate::server::{run_request, Limits, OutBuf, READS_PER_WAKEUP, READ_CHUNK};

/// What the monitor speaks (`--mon ...,mode=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitorMode {
    /// QMP.
    Control,
    /// The human monitor.
    Readline,
}

impl MonitorMode {
    /// Parse `control` / `readline`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "control" => Some(MonitorMode::Control),
            "readline" => Some(MonitorMode::Readline),
            _ => None,
        }
    }
}

/// A monitor on a chardev backend.
pub struct ChardevMonitor {
    backend: Box<dyn Backend>,
    mode: MonitorMode,
    session: Session,
    editor: LineEditor,
    out: OutBuf,
    open: bool,
    fds: FdStore,
    events: EventQueue,
    limits: Limits,
    dropped_output: u64,
    /// The backend had the input when last looked at (see [`chardev::backend::MuxControl::has_focus`]).
    focused: bool,
}

impl std::fmt::Debug for ChardevMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChardevMonitor")
            .field("mode", &self.mode)
            .field("open", &self.open)
            .finish()
    }
}

impl ChardevMonitor {
    /// A monitor speaking `mode` on `backend` (usually a registry handle, so the chardev is
    /// busy while the monitor uses it). A backend already connected (stdio, an inherited
    /// connected socket) gets its greeting at once.
    pub fn new(
        backend: Box<dyn Backend>,
        mode: MonitorMode,
        fds: FdStore,
        events: EventQueue,
        limits: Limits,
    ) -> Self {
        let mut m = ChardevMonitor {
            backend,
            mode,
            session: Session::new(limits.max_message),
            editor: LineEditor::new(),
            out: OutBuf::default(),
            open: false,
            fds,
            events,
            limits,
            dropped_output: 0,
            focused: true,
        };
        m.focused = chardev::backend::has_focus(m.backend.as_mut());
        m.backend.set_input_wanted(true);
        if m.backend.is_connected() {
            m.open_session();
        }
        m.flush();
        m
    }

    /// The mode.
    pub fn mode(&self) -> MonitorMode {
        self.mode
    }

    /// Output dropped because the peer did not read it.
    pub fn dropped_output(&self) -> u64 {
        self.dropped_output
    }

    /// Attach the backend to the event loop's `reg`.
    pub fn attach(&mut self, reg: Registrar) {
        self.backend.attach(reg);
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.out.len() + bytes.len() > self.limits.max_output {
            self.dropped_output += bytes.len() as u64;
            return;
        }
        self.out.push(bytes);
    }

    fn open_session(&mut self) {
        self.open = true;
        self.session.reset();
        self.editor.reset();
        self.out.clear();
        match self.mode {
            MonitorMode::Control => self.write(protocol::greeting().as_bytes()),
            MonitorMode::Readline => {
                let text = hmp::to_crlf(&hmp::banner()) + hmp::PROMPT;
                self.write(text.as_bytes());
            }
        }
    }

    fn close_session(&mut self) {
        self.open = false;
        self.session.reset();
        self.editor.reset();
        self.out.clear();
    }

    /// Write pending output, unless the backend is a mux frontend without the focus: a monitor
    /// sharing a mux with a console holds its output (up to the output limit) until the user
    /// switches to it, as QEMU's does.
    fn flush(&mut self) {
        while self.open && self.focused && !self.out.is_empty() {
            match self.backend.write(self.out.pending()) {
                Ok(0) => break,
                Ok(n) => self.out.consume(n),
                Err(e) => {
                    log::debug!("monitor chardev: write: {e}");
                    break;
                }
            }
        }
    }

    /// The event loop saw `readiness` on one of the backend's fds. Returns the events the
    /// commands caused (already sent here), for the caller's other monitors.
    pub fn on_ready(
        &mut self,
        token: Token,
        readiness: Readiness,
        machine: &mut dyn Machine,
    ) -> Vec<QmpEvent> {
        self.backend.on_ready(token, readiness);
        let mut emitted = Vec::new();
        self.service(machine, &mut emitted);
        emitted
    }

    /// The focus came or went (a mux's Ctrl-A c). Coming back to a human monitor whose output
    /// was all shown starts a fresh line with the prompt, as QEMU's readline restarts.
    fn track_focus(&mut self) {
        let focused = chardev::backend::has_focus(self.backend.as_mut());
        let regained = focused && !self.focused && self.open;
        if regained && self.mode == MonitorMode::Readline && self.out.is_empty() {
            self.editor.reset();
            self.write(format!("\r\n{}", hmp::PROMPT).as_bytes());
        }
        self.focused = focused;
    }

    fn service(&mut self, machine: &mut dyn Machine, emitted: &mut Vec<QmpEvent>) {
        self.track_focus();
        for ev in self.backend.take_events() {
            match ev {
                Event::Opened if !self.open => self.open_session(),
                Event::Closed => self.close_session(),
                _ => {}
            }
        }
        self.flush();
        let mut buf = [0u8; READ_CHUNK];
        for _ in 0..READS_PER_WAKEUP {
            if self.out.len() > self.limits.output_high_water {
                break;
            }
            let n = match self.backend.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("monitor chardev: read: {e}");
                    break;
                }
            };
            if !self.open {
                // Input means someone is there, even if the backend reports no `Opened`.
                self.open_session();
            }
            self.process(&buf[..n], machine, emitted);
            self.flush();
        }
        // A read may have revealed a hangup.
        for ev in self.backend.take_events() {
            if ev == Event::Closed {
                self.close_session();
            }
        }
        let wanted = self.out.len() <= self.limits.output_high_water;
        self.backend.set_input_wanted(wanted);
        // The input read may have moved a mux's focus away (Ctrl-A c).
        self.track_focus();
        self.flush();
    }

    fn process(&mut self, data: &[u8], machine: &mut dyn Machine, emitted: &mut Vec<QmpEvent>) {
        let mut no_fds: VecDeque<OwnedFd> = VecDeque::new();
        match self.mode {
            MonitorMode::Control => {
                for item in self.session.feed(data) {
                    match item {
                        Incoming::Reply(line) => self.write(line.as_bytes()),
                        Incoming::Execute(req) => {
                            let (result, events) =
                                run_request(machine, &self.fds, &self.events, &mut no_fds, &req);
                            for ev in &events {
                                self.send_event(ev);
                            }
                            emitted.extend(events);
                            let line = self.session.answer(req.id.as_ref(), &result);
                            self.write(line.as_bytes());
                        }
                    }
                }
            }
            MonitorMode::Readline => {
                let (echo, lines) = self.editor.feed(data);
                self.write(&echo);
                for line in lines {
                    let mut ctx = crate::commands::Context {
                        machine: &mut *machine,
                        fds: &self.fds,
                        passed_fds: &mut no_fds,
                    };
                    let output = hmp::execute(&mut ctx, &line);
                    let events = self.events.drain();
                    emitted.extend(events);
                    let text = hmp::to_crlf(&output) + hmp::PROMPT;
                    self.write(text.as_bytes());
                }
            }
        }
    }

    fn send_event(&mut self, event: &QmpEvent) {
        if !self.open || self.mode != MonitorMode::Control {
            return;
        }
        if let Some(line) = self.session.event_line(event) {
            self.write(line.as_bytes());
        }
    }

    /// Send an event (QMP mode, negotiated peer only).
    pub fn broadcast_event(&mut self, event: &QmpEvent) {
        self.send_event(event);
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::QmpClient;
    use crate::commands::tests::FakeMachine;
    use crate::hub::testloop::Running;
    use crate::hub::Monitor;
    use chardev::{ChardevSpec, Registry};
    use std::io::{Read, Write};
    use std::os::fd::IntoRawFd;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::{Duration, Instant};

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn monitor_on(spec: &str, mode: MonitorMode) -> (Registry, Running) {
        let mut reg = Registry::new();
        reg.add(&ChardevSpec::parse(spec).unwrap()).unwrap();
        let mut mon = Monitor::new().unwrap();
        mon.attach(reg.take("mon").unwrap(), mode);
        let mut machine = FakeMachine::new();
        machine.events = Some(mon.events());
        (reg, Running::start(mon, machine))
    }

    #[test]
    fn qmp_on_an_inherited_listening_fd() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inherited.sock");
        // What a management tool does: listen first, hand the fd over, connect once.
        let listener = UnixListener::bind(&path).unwrap();
        let fd = listener.into_raw_fd();
        let (reg, _running) = monitor_on(
            &format!("socket,id=mon,fd={fd},server=on,wait=off"),
            MonitorMode::Control,
        );
        assert!(reg.in_use("mon").unwrap());
        let mut c = QmpClient::connect(&path, TIMEOUT).unwrap();
        assert_eq!(c.greeting()["QMP"]["capabilities"], serde_json::json!([]));
        assert_eq!(
            c.execute("query-status", None).unwrap()["error"]["class"],
            "CommandNotFound"
        );
        c.negotiate().unwrap();
        let r = c.execute("stop", None).unwrap();
        assert_eq!(r["return"], serde_json::json!({}));
        assert_eq!(c.take_events()[0]["event"], "STOP");
        drop(c);
        // A new peer starts a new session.
        let mut c = QmpClient::connect(&path, TIMEOUT).unwrap();
        c.negotiate().unwrap();
        let r = c.execute("query-status", None).unwrap();
        assert_eq!(r["return"]["status"], "paused");
    }

    fn read_until(s: &mut UnixStream, marker: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        let mut got = Vec::new();
        while Instant::now() < deadline {
            let mut buf = [0u8; 256];
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            if String::from_utf8_lossy(&got).contains(marker) {
                break;
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    #[test]
    fn human_monitor_on_a_socket_chardev() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hmp.sock");
        let (_reg, running) = monitor_on(
            &format!("socket,id=mon,path={},server=on,wait=off", path.display()),
            MonitorMode::Readline,
        );
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let banner = read_until(&mut s, crate::hmp::PROMPT);
        assert!(
            banner.contains("monitor - type 'help' for more information\r\n"),
            "{banner:?}"
        );
        s.write_all(b"info status\r").unwrap();
        let out = read_until(&mut s, "(minivmm) ");
        assert!(
            out.contains("info status\r\nVM status: running\r\n(minivmm) "),
            "{out:?}"
        );
        s.write_all(b"stop\r\ninfo status\r\n").unwrap();
        let out = read_until(&mut s, "paused\r\n(minivmm) ");
        assert!(out.contains("VM status: paused"), "{out:?}");
        // HMP peers get no QMP events.
        assert!(!out.contains("STOP"));
        assert_eq!(running.machine.lock().unwrap().calls, ["stop"]);
    }

    /// `--serial mon:FORM`: a device and the human monitor on one mux. The device has the
    /// focus; the monitor holds its banner until Ctrl-A c, answers while it has the focus, and
    /// shows a fresh prompt each time it gets the focus back.
    #[test]
    fn human_monitor_behind_a_console_on_a_mux() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;

        let (mine, mut peer) = UnixStream::pair().unwrap();
        peer.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut reg = Registry::new();
        let spec = format!("socket,id=mon,fd={},mux=on", mine.into_raw_fd());
        reg.add(&ChardevSpec::parse(&spec).unwrap()).unwrap();
        let mut device = reg.take("mon").unwrap();
        let mut mon = Monitor::new().unwrap();
        mon.attach(reg.take_for_monitor("mon").unwrap(), MonitorMode::Readline);
        let _running = Running::start(mon, FakeMachine::new());
        assert!(chardev::backend::has_focus(device.as_mut()));
        device.write(b"console output").unwrap();
        // The device runs as a UART does: its event loop (it drives the mux's base fd) reads
        // its input while it has the focus.
        let focused = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, st) = (focused.clone(), stop.clone());
        let driver = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                chardev::poll_backends(&mut [&mut *device], 10).unwrap();
                while device.read(&mut [0u8; 16]).unwrap_or(0) > 0 {}
                f.store(
                    chardev::backend::has_focus(device.as_mut()),
                    Ordering::Relaxed,
                );
            }
        });
        let wait_focus = |device_has_it: bool| {
            let deadline = Instant::now() + TIMEOUT;
            while focused.load(Ordering::Relaxed) != device_has_it {
                assert!(Instant::now() < deadline, "the focus did not move");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let early = read_until(&mut peer, "console output");
        std::thread::sleep(Duration::from_millis(300));
        let mut buf = [0u8; 256];
        let held = match peer.read(&mut buf) {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).to_string(),
            Err(_) => String::new(),
        };
        assert!(
            !early.contains("monitor") && held.is_empty(),
            "the monitor spoke without the focus: {early:?} {held:?}"
        );
        peer.write_all(b"\x01c").unwrap();
        wait_focus(false);
        let banner = read_until(&mut peer, crate::hmp::PROMPT);
        assert!(banner.contains("monitor - type 'help'"), "{banner:?}");
        peer.write_all(b"info status\r").unwrap();
        let out = read_until(&mut peer, "running\r\n(minivmm) ");
        assert!(out.contains("VM status: running"), "{out:?}");
        // Back to the console, and to the monitor again: a fresh prompt.
        peer.write_all(b"\x01c").unwrap();
        wait_focus(true);
        peer.write_all(b"\x01c").unwrap();
        wait_focus(false);
        let again = read_until(&mut peer, crate::hmp::PROMPT);
        assert_eq!(again, format!("\r\n{}", crate::hmp::PROMPT));
        stop.store(true, Ordering::Relaxed);
        driver.join().unwrap();
    }
}

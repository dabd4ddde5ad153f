//! Always-connected fd backends: `file` and `pipe`, and the [`FdChannel`] engine that `stdio`
//! and `serial` build on.
//!
//! An [`FdChannel`] owns (or borrows, for stdio) an input fd and an output fd and drives them
//! with a `Stream`. Its peer is always "connected"; an output fd that fails for good (a pipe
//! whose reader left, a full disk) makes later output count as dropped instead of blocking the
//! guest forever.
//!
//! FIFOs are opened read-write so that opening never blocks or fails for want of the other end,
//! and so that a FIFO without a writer never reports a hangup that would spin the event loop.
//! This module must not block.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use crate::backend::{Backend, Event, Readiness};
use crate::buffer::{EventQueue, DEFAULT_OUTBUF_SIZE};
use crate::error::{Error, Result};
use crate::poller::{FdSet, Registrar, Token};
use crate::spec::{FileSpec, PipeSpec};
use crate::stream::{Input, Stream};

/// An always-connected stream between a frontend and one or two fds.
#[derive(Debug)]
pub struct FdChannel {
    /// Declared first: unregisters before the owned fds close.
    fds: FdSet,
    kind: &'static str,
    filename: String,
    stream: Stream,
    events: EventQueue,
    broken: bool,
    dropped: u64,
    _owned: Vec<OwnedFd>,
}

impl FdChannel {
    /// A channel reading `rfd` and writing `wfd`; `owned` are closed when it drops.
    pub(crate) fn new(
        kind: &'static str,
        filename: String,
        rfd: Option<RawFd>,
        wfd: Option<RawFd>,
        owned: Vec<OwnedFd>,
    ) -> io::Result<Self> {
        let stream = Stream::new(rfd, wfd, DEFAULT_OUTBUF_SIZE)?;
        let mut events = EventQueue::default();
        stream.announce_input(&mut events);
        Ok(FdChannel {
            fds: FdSet::new(),
            kind,
            filename,
            stream,
            events,
            broken: false,
            dropped: 0,
            _owned: owned,
        })
    }

    /// Register what the stream wants polled now (at most two fds).
    fn update_fds(&mut self) {
        let wanted = self.stream.wanted_fds();
        self.fds.sync(&wanted);
    }

    fn flush(&mut self) {
        if let Err(e) = self.stream.flush(&mut self.events) {
            log::warn!(
                "chardev {}: output failed, discarding from now on: {e}",
                self.filename
            );
            self.dropped += self.stream.take_unsent().len() as u64;
            self.broken = true;
            self.events.push(Event::Writable);
        }
    }
}

impl Backend for FdChannel {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn filename(&self) -> String {
        self.filename.clone()
    }

    fn attach(&mut self, reg: Registrar) {
        self.fds.attach(reg);
        self.update_fds();
    }

    fn detach(&mut self) {
        self.fds.detach();
    }

    fn on_ready(&mut self, token: Token, readiness: Readiness) {
        let Some(fd) = self.fds.fd_of(token) else {
            return;
        };
        if let Err(e) = self.stream.on_ready(fd, readiness, &mut self.events) {
            log::debug!("chardev {}: {e}", self.filename);
            self.flush();
        }
        self.update_fds();
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = self.stream.read(buf);
        self.update_fds();
        match r? {
            Input::Data(n) => Ok(n),
            Input::Empty | Input::Eof => Ok(0),
        }
    }

    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.broken {
            self.dropped += data.len() as u64;
            return Ok(data.len());
        }
        let n = self.stream.write(data);
        self.flush();
        self.update_fds();
        Ok(n)
    }

    fn set_input_wanted(&mut self, wanted: bool) {
        self.stream.set_input_wanted(wanted, &mut self.events);
        self.update_fds();
    }

    fn is_connected(&self) -> bool {
        true
    }

    fn take_events(&mut self) -> Vec<Event> {
        self.events.take()
    }

    fn dropped_bytes(&self) -> u64 {
        self.dropped
    }
}

/// Open `path` non-blocking: FIFOs read-write (never blocks, never hangs up), others as asked.
pub(crate) fn open_nonblocking(path: &Path, write: bool, append: bool) -> io::Result<OwnedFd> {
    let is_fifo = std::fs::metadata(path)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false);
    let mut o = OpenOptions::new();
    o.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    if is_fifo {
        o.read(true).write(true);
    } else if write {
        o.write(true).create(true).mode(FILE_MODE);
        if append {
            o.append(true);
        } else {
            o.truncate(true);
        }
    } else {
        o.read(true);
    }
    Ok(o.open(path)?.into())
}

/// Mode of files the `file` backend creates (before the umask), as QEMU does.
const FILE_MODE: u32 = 0o666;

/// `file,path=OUT[,append=on][,input-path=IN]`.
pub fn open_file(id: &str, spec: &FileSpec) -> Result<FdChannel> {
    let out = open_nonblocking(&spec.path, true, spec.append)
        .map_err(|e| Error::io(id, "open", spec.path.display().to_string(), e))?;
    let input = match &spec.input_path {
        Some(p) => Some(
            open_nonblocking(p, false, false)
                .map_err(|e| Error::io(id, "open", p.display().to_string(), e))?,
        ),
        None => None,
    };
    let wfd = out.as_raw_fd();
    let rfd = input.as_ref().map(AsRawFd::as_raw_fd);
    let mut owned = vec![out];
    owned.extend(input);
    FdChannel::new(
        "file",
        format!("file:{}", spec.path.display()),
        rfd,
        Some(wfd),
        owned,
    )
    .map_err(|e| Error::io(id, "use", spec.path.display().to_string(), e))
}

/// `pipe,path=P`: `P.in` and `P.out` if both exist, else `P` for both directions.
pub fn open_pipe(id: &str, spec: &PipeSpec) -> Result<FdChannel> {
    let with_suffix = |s: &str| {
        let mut p = spec.path.clone().into_os_string();
        p.push(s);
        std::path::PathBuf::from(p)
    };
    let (pin, pout) = (with_suffix(".in"), with_suffix(".out"));
    let open = |p: &Path| {
        open_nonblocking(p, true, true)
            .map_err(|e| Error::io(id, "open", p.display().to_string(), e))
    };
    let filename = format!("pipe:{}", spec.path.display());
    let (rfd, wfd, owned) = if pin.exists() && pout.exists() {
        let i = open(&pin)?;
        let o = open(&pout)?;
        (i.as_raw_fd(), o.as_raw_fd(), vec![i, o])
    } else {
        let f = open(&spec.path)?;
        (f.as_raw_fd(), f.as_raw_fd(), vec![f])
    };
    FdChannel::new("pipe", filename, Some(rfd), Some(wfd), owned)
        .map_err(|e| Error::io(id, "use", spec.path.display().to_string(), e))
}

/// `null`: output is discarded, there is never input.
#[derive(Debug, Default)]
pub struct NullBackend;

impl Backend for NullBackend {
    fn kind(&self) -> &'static str {
        "null"
    }
    fn filename(&self) -> String {
        "null".to_string()
    }
    fn attach(&mut self, _reg: Registrar) {}
    fn detach(&mut self) {}
    fn on_ready(&mut self, _token: Token, _readiness: Readiness) {}
    fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Ok(0)
    }
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        Ok(data.len())
    }
    fn set_input_wanted(&mut self, _wanted: bool) {}
    fn is_connected(&self) -> bool {
        true
    }
    fn take_events(&mut self) -> Vec<Event> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{mkfifo, read_n, watched};
    use std::io::{Read, Write};

    #[test]
    fn null_takes_everything_gives_nothing() {
        let mut b = NullBackend;
        assert_eq!(b.write(b"abc").unwrap(), 3);
        assert_eq!(b.read(&mut [0; 4]).unwrap(), 0);
        assert!(watched(&mut b).is_empty() && b.is_connected());
    }

    #[test]
    fn input_from_dev_null_ends_at_once_without_polling() {
        // epoll refuses /dev/null (EPERM): it is read like a regular file, so its end reaches
        // the frontend at once (a `--serial stdio` under `< /dev/null` behaves the same).
        let dir = tempfile::tempdir().unwrap();
        let spec = FileSpec {
            path: dir.path().join("out"),
            append: false,
            input_path: Some("/dev/null".into()),
        };
        let mut b = open_file("f", &spec).unwrap();
        assert!(watched(&mut b).is_empty());
        assert_eq!(b.take_events(), vec![Event::Readable]);
        assert_eq!(b.read(&mut [0u8; 16]).unwrap(), 0);
        assert_eq!(b.write(b"x").unwrap(), 1);
    }

    #[test]
    fn file_output_truncates_or_appends_and_input_is_pulled() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let inp = dir.path().join("in");
        std::fs::write(&out, b"old").unwrap();
        std::fs::write(&inp, b"typed input").unwrap();
        let spec = FileSpec {
            path: out.clone(),
            append: false,
            input_path: Some(inp),
        };
        let mut b = open_file("f", &spec).unwrap();
        // Regular files are never polled, and input is announced without polling.
        assert!(watched(&mut b).is_empty());
        assert_eq!(b.take_events(), vec![Event::Readable]);
        assert_eq!(b.write(b"hello ").unwrap(), 6);
        assert_eq!(b.write(b"world").unwrap(), 5);
        let mut got = Vec::new();
        let mut buf = [0u8; 4];
        loop {
            let n = b.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"typed input");
        assert_eq!(std::fs::read(&out).unwrap(), b"hello world");
        drop(b);
        let spec = FileSpec {
            path: out.clone(),
            append: true,
            input_path: None,
        };
        let mut b = open_file("f", &spec).unwrap();
        b.write(b"!").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"hello world!");
        assert_eq!(b.filename(), format!("file:{}", out.display()));
    }

    #[test]
    fn file_open_error_names_the_chardev_and_path() {
        let spec = FileSpec {
            path: "/nonexistent-dir/x".into(),
            append: false,
            input_path: None,
        };
        let e = open_file("f0", &spec).unwrap_err();
        assert_eq!(
            e.to_string(),
            "chardev 'f0': cannot open '/nonexistent-dir/x'"
        );
    }

    #[test]
    fn pipe_in_and_out_fifos_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("p");
        mkfifo(&dir.path().join("p.in"));
        mkfifo(&dir.path().join("p.out"));
        let mut b = open_pipe("p", &PipeSpec { path: base }).unwrap();
        // The test plays the other end.
        let mut to_vm = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("p.in"))
            .unwrap();
        let mut from_vm = std::fs::File::open(dir.path().join("p.out")).unwrap();
        assert_eq!(b.write(b"to host").unwrap(), 7);
        let mut buf = [0u8; 7];
        from_vm.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"to host");
        to_vm.write_all(b"to guest").unwrap();
        assert_eq!(read_n(&mut b, 8), b"to guest");
    }
}

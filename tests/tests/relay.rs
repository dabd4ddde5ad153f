//! The host side of vproxy at a thousand streams, through the production event loop and chardev
//! registry, with no guest: `minivmm relay` joins a `vproxy` chardev (an oforward `echo`) to a
//! unix socket chardev whose peer is `minivmm-vp` (an iforward `echo` to an echo server here),
//! as a UART or a virtio port would carry the channel.
//!
//! - Under `ulimit -n 1024`, 1000 concurrent streams echo byte-exact (minivmm raises its soft
//!   limit to the hard one, so 1024 is all it has), and the clients past what the fds allow are
//!   refused at once while the 1000 go on.
//! - With fds to spare, the stream past the engine's limit (1024) is refused cleanly.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tests::{minivmm_bin, minivmm_vp_bin, payload};

/// Bytes each stream echoes.
const STREAM_BYTES: usize = 4096;
/// The relay's vproxy stream limit (`max-streams=`; the default, 16384, would need more fds
/// than this machine's hard limit to reach).
const ENGINE_MAX_STREAMS: usize = 1024;
/// How long any one step may take.
const STEP: Duration = Duration::from_secs(60);

/// Let this process (clients and echo server: two fds per stream) open what the hard limit
/// allows.
fn raise_own_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit struct on this frame.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    assert!(
        lim.rlim_cur >= 4096,
        "this test needs a hard fd limit of 4096 or more"
    );
}

/// An echo server: one thread polling every connection.
struct Echo {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start() -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || echo_loop(listener, &stop2));
        Echo {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn echo_loop(listener: TcpListener, stop: &AtomicBool) {
    let mut conns: Vec<(TcpStream, Vec<u8>)> = Vec::new();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let mut fds = vec![libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        fds.extend(conns.iter().map(|(c, pending)| libc::pollfd {
            fd: c.as_raw_fd(),
            events: libc::POLLIN | if pending.is_empty() { 0 } else { libc::POLLOUT },
            revents: 0,
        }));
        // SAFETY: poll reads and writes fds.len() pollfds, which we own.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        while let Ok((c, _)) = listener.accept() {
            c.set_nonblocking(true).unwrap();
            conns.push((c, Vec::new()));
        }
        let mut gone = Vec::new();
        for (i, p) in fds[1..].iter().enumerate() {
            if p.revents == 0 {
                continue;
            }
            let (c, pending) = &mut conns[i];
            match c.read(&mut buf) {
                Ok(0) => gone.push(i),
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => gone.push(i),
            }
            if !pending.is_empty() {
                match c.write(pending) {
                    Ok(n) => {
                        pending.drain(..n);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => gone.push(i),
                }
            }
        }
        gone.sort_unstable();
        gone.dedup();
        for i in gone.into_iter().rev() {
            conns.swap_remove(i);
        }
    }
}

/// `minivmm relay` (under `ulimit -n LIMIT` when given) and `minivmm-vp` on its channel.
struct Relay {
    minivmm: Child,
    vp: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Relay {
    fn start(echo: &Echo, fd_limit: Option<u32>) -> Relay {
        // Found before minivmm starts: a missing endpoint must not leave a relay running.
        let vp_bin = minivmm_vp_bin();
        let dir = tempfile::tempdir().unwrap();
        let chan = dir.path().join("chan.sock");
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let relay = format!(
            "exec '{}' relay --chardev vproxy,id=vp,max-streams={ENGINE_MAX_STREAMS},\
             oforward=echo:127.0.0.1:{port} \
             --chardev socket,id=ch,path={},server=on,wait=off",
            minivmm_bin().display(),
            chan.display()
        );
        let script = match fd_limit {
            Some(n) => format!("ulimit -n {n} && {relay}"),
            None => relay,
        };
        let minivmm = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_until("the relay's channel socket", || chan.exists());
        let vp = Command::new(&vp_bin)
            .arg("--channel")
            .arg(format!("unix:{}", chan.display()))
            .arg("--iforward")
            .arg(format!("echo:127.0.0.1:{}", echo.port))
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let vp = match vp {
            Ok(vp) => vp,
            Err(e) => {
                let mut minivmm = minivmm;
                let _ = minivmm.kill();
                let _ = minivmm.wait();
                panic!("cannot start {}: {e}", vp_bin.display());
            }
        };
        let r = Relay {
            minivmm,
            vp,
            port,
            _dir: dir,
        };
        wait_until("the vproxy session", || r.echo_once(b"ping"));
        r
    }

    fn echo_once(&self, msg: &[u8]) -> bool {
        let Ok(mut c) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut got = vec![0u8; msg.len()];
        c.write_all(msg).is_ok() && c.read_exact(&mut got).is_ok() && got == msg
    }

    fn pid(&self) -> u32 {
        self.minivmm.id()
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    fn soft_fd_limit(&self) -> u64 {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid())).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        line.split_whitespace().nth(3).unwrap().parse().unwrap()
    }

    /// Stop minivmm with SIGTERM; its stderr.
    fn stop(mut self) -> String {
        // SAFETY: kill with a pid we spawned and a valid signal number.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        let out = self.minivmm.wait_with_output_ref();
        let _ = self.vp.kill();
        let _ = self.vp.wait();
        out
    }
}

impl Drop for Relay {
    /// A failed test leaves nothing running.
    fn drop(&mut self) {
        for child in [&mut self.minivmm, &mut self.vp] {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

trait WaitOutput {
    fn wait_with_output_ref(&mut self) -> String;
}

impl WaitOutput for Child {
    fn wait_with_output_ref(&mut self) -> String {
        let mut err = String::new();
        if let Some(mut e) = self.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let status = self.wait().unwrap();
        assert!(status.success(), "minivmm relay ended with {status}: {err}");
        err
    }
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let end = Instant::now() + STEP;
    while !ready() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Open `n` streams, send each its own payload, and read every echo back while all of them
/// stay open. Returns the streams.
fn echo_concurrently(port: u16, n: usize, seed: u32) -> Vec<TcpStream> {
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connect stream {i}: {e}"));
        c.write_all(&payload(seed + i as u32, STREAM_BYTES))
            .unwrap();
        c.set_nonblocking(true).unwrap();
        streams.push(c);
    }
    let mut got: HashMap<usize, Vec<u8>> = HashMap::new();
    let mut buf = vec![0u8; STREAM_BYTES];
    let end = Instant::now() + STEP;
    while got.values().filter(|g| g.len() == STREAM_BYTES).count() < n {
        assert!(
            Instant::now() < end,
            "only {} of {n} streams echoed",
            got.values().filter(|g| g.len() == STREAM_BYTES).count()
        );
        let mut fds: Vec<libc::pollfd> = streams
            .iter()
            .map(|s| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: poll reads and writes fds.len() pollfds, which we own.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        for (i, p) in fds.iter().enumerate() {
            if p.revents == 0 {
                continue;
            }
            match streams[i].read(&mut buf) {
                Ok(0) => panic!(
                    "stream {i} ended after {} bytes",
                    got.entry(i).or_default().len()
                ),
                Ok(k) => got.entry(i).or_default().extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("stream {i}: {e}"),
            }
        }
    }
    for (i, g) in &got {
        assert!(
            *g == payload(seed + *i as u32, STREAM_BYTES),
            "stream {i} came back different"
        );
    }
    streams
}

/// A client the relay must refuse: connected (the kernel's backlog), then ended by minivmm
/// with a reset or a close, never left hanging and never answered.
fn assert_refused(port: u16) {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = c.write_all(b"refuse me");
    let mut buf = [0u8; 16];
    match c.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("a client past the limit was not refused: {other:?}"),
    }
}

#[test]
fn thousand_streams_under_ulimit_1024_and_the_ones_past_it_refused() {
    raise_own_fd_limit();
    let echo = Echo::start();
    let relay = Relay::start(&echo, Some(1024));
    assert_eq!(
        relay.soft_fd_limit(),
        1024,
        "ulimit -n 1024 is all minivmm has"
    );
    let before = relay.open_fds();
    let streams = echo_concurrently(relay.port, 1000, 1);
    // One fd per stream: nothing is duplicated to watch it.
    let with = relay.open_fds();
    assert!(
        with <= before + 1000,
        "{with} fds open for 1000 streams, {before} before"
    );
    // Past the fds left: refused at once, and the event loop goes on.
    let spare = 1024 - with;
    let mut extra = Vec::new();
    for _ in 0..spare + 8 {
        let mut c = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = c.write_all(b"x");
        let mut b = [0u8; 1];
        // Either it got one of the few fds left (and is echoed), or it is refused.
        match c.read(&mut b) {
            Ok(1) => assert_eq!(&b, b"x"),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("a client past the fd limit hangs: {e}"),
        }
        extra.push(c);
    }
    assert_refused(relay.port);
    // The thousand still echo.
    for (i, mut s) in streams.into_iter().enumerate().step_by(97) {
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(STEP)).unwrap();
        s.write_all(b"again").unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b)
            .unwrap_or_else(|e| panic!("stream {i} after the refusals: {e}"));
        assert_eq!(&b, b"again");
    }
    let log = relay.stop();
    assert!(
        log.contains("refuses connections"),
        "the refusals are logged: {log}"
    );
}

/// A new stream that echoes its payload, or `None` if it was refused.
fn echoed_stream(port: u16, seed: u32) -> Option<TcpStream> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(STEP)).unwrap();
    let data = payload(seed, STREAM_BYTES);
    c.write_all(&data).ok()?;
    let mut got = vec![0u8; STREAM_BYTES];
    match c.read_exact(&mut got) {
        Ok(()) => {
            assert!(got == data, "stream {seed} came back different");
            Some(c)
        }
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof
            ) =>
        {
            None
        }
        Err(e) => panic!("stream {seed}: {e}"),
    }
}

#[test]
fn the_stream_past_the_engine_limit_is_refused() {
    raise_own_fd_limit();
    let echo = Echo::start();
    let relay = Relay::start(&echo, None);
    // Open streams one at a time until the engine's limit is reached. A refusal before that
    // is only allowed while the session check's stream is still closing (it holds its slot
    // until its end is acknowledged): then the same stream is tried again.
    let mut streams = Vec::new();
    let end = Instant::now() + STEP;
    while streams.len() < ENGINE_MAX_STREAMS {
        let i = streams.len();
        match echoed_stream(relay.port, i as u32) {
            Some(s) => streams.push(s),
            None => {
                assert!(
                    Instant::now() < end,
                    "stream {i} refused with only {i} open"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    // Stream 1025.
    assert_refused(relay.port);
    drop(streams);
    // Once streams end, new ones are taken again.
    wait_until("a stream after the others closed", || {
        relay.echo_once(b"back")
    });
    relay.stop();
}

//! vproxy end to end: a Linux guest runs `minivmm-vp` on a virtio-console port and on a paced
//! 115200-baud UART (COM2), with an echo service (busybox `nc -ll -e cat`) and a web server
//! (busybox `httpd`; the echo server's listen backlog is its number of `-l` flags, so it gets
//! 128 of them to take 100 connections at once); the host side is minivmm's `vproxy` chardev. One boot (and one reset)
//! checks, in order:
//!
//! - guest → host: the guest's `nc` reaches a host TCP service through an iforward, over
//!   virtio and over the UART;
//! - host → guest: an HTTP GET through an oforward reaches the guest's httpd;
//! - 100 concurrent echo streams over virtio, and 4 over the UART, each compared byte for
//!   byte; vproxy cuts none (damaged frames are sent again); only a stream whose guest echo
//!   service failed may be cut, and it must go through when sent again (`echo_many_ok`);
//! - forwards added and removed over QMP while running, `query-vproxy` counters;
//! - a VM reset in the middle of a transfer: the open stream ends (never silently corrupted),
//!   the guest comes back with a new session and the same host forwards work again.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::qmp::Qmp;
use tests::{
    minivmm_bin, payload, require_kvm, run64, test_cmdline, test_initrd_vp, test_kernel, Vmm,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const STEP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a stream may take end to end. The guest's echo service forks a `cat` for every
/// connection, one at a time: on this machine's emulated guest ring 0 that is seconds each,
/// and 100 at once take about six minutes (measured: 203 s to the first, 357 s to the last).
const STREAM_TIMEOUT: Duration = Duration::from_secs(900);
/// Concurrent streams over the virtio port, and bytes each sends (and gets back).
const VIRTIO_STREAMS: usize = 100;
const VIRTIO_BYTES: usize = 2048;
/// Concurrent streams over the 115200-baud UART, and bytes each.
const UART_STREAMS: usize = 4;
const UART_BYTES: usize = 1024;
/// Marker the guest prints once its endpoints and services run (each boot).
const UP: &str = "VP-UP";

/// The guest's part, run by /init at every boot.
const GUEST_SCRIPT: &str = "ip link set lo up\n\
mkdir -p /tmp/www; echo vproxy-web-ok >/tmp/www/index.html; httpd -p 127.0.0.1:80 -h /tmp/www\n\
L=; for i in $(seq 128); do L=\"$L -l\"; done; nc $L -p 7 -e cat &\n\
minivmm-vp --channel /dev/virtio-ports/org.minivmm.vproxy --iforward echo:127.0.0.1:7 --iforward web:127.0.0.1:80 --oforward hostsvc:127.0.0.1:9000 &\n\
minivmm-vp --channel tty:/dev/ttyS1,speed=115200 --iforward echo:127.0.0.1:7 --oforward hostsvc:127.0.0.1:9001 &\n\
until netstat -ltn | grep -q ':9001 '; do sleep 0.5; done\n\
echo VP-UP\n\
echo g2h-virtio=$(echo ping-v | nc 127.0.0.1 9000)\n\
echo g2h-uart=$(echo ping-u | nc 127.0.0.1 9001)\n\
while :; do sleep 1000; done\n";

/// Connect to a unix oforward, retrying while the listener is not there yet.
fn connect(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => {
                s.set_read_timeout(Some(STREAM_TIMEOUT)).unwrap();
                return s;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "connect {}: {e}", path.display());
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Send `data` through the echo service behind `path`, half-close, and return what came back.
fn echo(path: &Path, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = connect(path);
    let mut writer = s.try_clone()?;
    let data = data.to_vec();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&data)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back)?;
    sender.join().expect("sender thread")?;
    Ok(back)
}

/// How an echo stream went wrong.
#[derive(Debug)]
enum Failure {
    /// The stream ended early: what came back is a strict prefix of what was sent. This is
    /// how vproxy ends a stream one of whose frames it found damaged (`docs/vproxy.md` §6).
    Cut(usize),
    /// Bytes came back that were not sent: integrity lost, never acceptable.
    Differs(String),
}

impl Failure {
    fn describe(&self) -> String {
        match self {
            Failure::Cut(n) => format!("cut after {n} bytes"),
            Failure::Differs(what) => format!("differs: {what}"),
        }
    }
}

/// Run `streams` echo streams of `bytes` each at once through `path`; every one must come
/// back byte-identical. Returns the streams that did not (index and what happened).
fn echo_many(path: &Path, streams: usize, bytes: usize) -> Vec<(usize, Failure)> {
    let started = Instant::now();
    let workers: Vec<_> = (0..streams)
        .map(|i| {
            let path = path.to_path_buf();
            std::thread::spawn(move || -> Result<(), Failure> {
                let t0 = Instant::now();
                let data = payload(i as u32, bytes);
                match echo(&path, &data) {
                    Ok(back) if back == data => Ok(()),
                    Ok(back) if back.len() < data.len() && data.starts_with(&back) => {
                        Err(Failure::Cut(back.len()))
                    }
                    Ok(back) => {
                        let first = back.iter().zip(&data).position(|(a, b)| a != b);
                        Err(Failure::Differs(format!(
                            "{} of {} bytes back after {:?}, first difference at {first:?}",
                            back.len(),
                            data.len(),
                            t0.elapsed()
                        )))
                    }
                    // A reset connection delivered a prefix at most: a cut, with an unknown
                    // length.
                    Err(_) => Err(Failure::Cut(0)),
                }
            })
        })
        .collect();
    let failed: Vec<(usize, Failure)> = workers
        .into_iter()
        .enumerate()
        .filter_map(|(i, w)| w.join().expect("echo stream thread").err().map(|f| (i, f)))
        .collect();
    eprintln!(
        "{streams} echo streams of {bytes} bytes through {} in {:?}, {} failed",
        path.display(),
        started.elapsed(),
        failed.len()
    );
    failed
}

/// [`echo_many`], where no stream may be cut by vproxy: a damaged or lost frame is sent
/// again (`docs/vproxy.md` §7), so minivmm's log must hold no "data lost" reset (the reason
/// version 1 cut streams with, on this machine where guest user code now and then stores
/// zeros: `resources/README.md`, "Guest data corruption on kvm_pvm"). The one cut allowed is
/// the guest's own echo service failing: the guest's `minivmm-vp` then resets the stream
/// with "local socket error" (its connection to `nc`/`cat` broke), minivmm logs that reason,
/// and the stream must go through when sent again. Anything else fails the test with what
/// both vproxies and the guest reported.
fn echo_many_ok(vm: &mut Vmm, qmp: &mut Qmp, path: &Path, streams: usize, bytes: usize) {
    let failed = echo_many(path, streams, bytes);
    let log = vm.stderr_lines();
    let count = |what: &str| log.iter().filter(|l| l.contains(what)).count();
    let lost = count("reset: data lost");
    let guest_service = count("reset: local socket error");
    if failed.is_empty() && lost == 0 {
        return;
    }
    let state = qmp.ok("query-vproxy", Value::Null);
    let report = |what: &str, log: &[String]| -> String {
        format!(
            "{what}\nfailed streams:\n{}\nquery-vproxy: {state:#}\nminivmm log:\n{}",
            failed
                .iter()
                .map(|(i, f)| format!("stream {i}: {}", f.describe()))
                .collect::<Vec<_>>()
                .join("\n"),
            log.join("\n")
        )
    };
    assert!(
        lost == 0,
        "{}\n{}",
        report("vproxy cut a stream for lost data", &log),
        vm.transcript()
    );
    assert!(
        failed.iter().all(|(_, f)| matches!(f, Failure::Cut(_))),
        "{}\n{}",
        report("a stream delivered bytes that were not sent", &log),
        vm.transcript()
    );
    assert!(
        failed.len() <= guest_service,
        "{}\n{}",
        report(
            &format!(
                "{} streams cut, {guest_service} reset by the guest because its echo service \
                 failed",
                failed.len()
            ),
            &log
        ),
        vm.transcript()
    );
    for (i, _) in &failed {
        let data = payload(*i as u32, bytes);
        let again = echo(path, &data);
        assert!(
            again.as_ref().is_ok_and(|b| *b == data),
            "{}\nstream {i} sent again: {again:?}",
            report("a cut stream failed again", &log)
        );
    }
    eprintln!(
        "{} of {streams} streams cut because the guest's echo service failed (guest resets \
         \"local socket error\": {guest_service}); all went through when sent again",
        failed.len()
    );
}

/// A host TCP service: answers each connection's first line with `pong:LINE` and closes.
fn host_service() -> (u16, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_ok() {
                    let mut w = conn;
                    let _ = w.write_all(format!("pong:{line}").as_bytes());
                }
            });
        }
    });
    (port, handle)
}

fn vproxy_info(qmp: &mut Qmp, id: &str) -> Value {
    qmp.ok("query-vproxy", json!({"id": id}))[0].clone()
}

/// Wait for a console line containing `needle`; on timeout, fail with what both vproxies
/// report, which says which side of which channel stalled.
fn wait_or_dump(vm: &mut Vmm, qmp: &mut Qmp, needle: &str, timeout: Duration) -> String {
    match vm.try_wait_for(needle, timeout) {
        Some(line) => line,
        None => {
            let state = qmp.ok("query-vproxy", Value::Null);
            panic!(
                "timed out waiting for {needle:?}\nquery-vproxy: {state:#}\n{}",
                vm.transcript()
            );
        }
    }
}

#[test]
fn streams_both_ways_over_virtio_and_uart_with_forward_changes_and_a_reset() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| -> PathBuf { dir.path().join(name) };
    let (port, _service) = host_service();
    let vp0 = format!(
        "vproxy,id=vp0,oforward=echo:unix:{},oforward=web:unix:{},iforward=hostsvc:127.0.0.1:{port}",
        p("echo.sock").display(),
        p("web.sock").display()
    );
    let vp1 = format!(
        "vproxy,id=vp1,rate=11520,oforward=echo:unix:{},iforward=hostsvc:127.0.0.1:{port}",
        p("echo-uart.sock").display()
    );
    let kernel = test_kernel();
    let initrd = test_initrd_vp();
    let qmp_path = p("qmp.sock");
    let mut cmd = std::process::Command::new(minivmm_bin());
    // Why a stream was refused or reset is logged at debug level: a failure report shows it.
    cmd.env("RUST_LOG", "warn,vproxy=debug");
    cmd.args([
        // The guest's echo service forks a process per stream, 100 at once: more than the
        // default 128 MiB holds.
        "--memory",
        "256M",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--append",
        &test_cmdline(&run64(GUEST_SCRIPT)),
        "--serial",
        "stdio",
        "--chardev",
        &vp0,
        "--device",
        "virtserialport,chardev=vp0,name=org.minivmm.vproxy",
        "--chardev",
        &vp1,
        "--device",
        "isa-serial,chardev=vp1,index=1",
        "--monitor",
        qmp_path.to_str().unwrap(),
    ]);
    let mut vm = Vmm::spawn(cmd);
    let (mut qmp, _) = Qmp::connect(&qmp_path);
    qmp.ok("qmp_capabilities", Value::Null);
    vm.wait_for(UP, BOOT_TIMEOUT);

    // Guest -> host through iforwards, over both channels.
    let line = wait_or_dump(&mut vm, &mut qmp, "g2h-virtio=", STEP_TIMEOUT);
    assert!(line.contains("g2h-virtio=pong:ping-v"), "{line}");
    let line = wait_or_dump(&mut vm, &mut qmp, "g2h-uart=", STEP_TIMEOUT);
    assert!(line.contains("g2h-uart=pong:ping-u"), "{line}");

    // Host -> guest: HTTP through an oforward.
    let mut web = connect(&p("web.sock"));
    web.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut page = String::new();
    web.read_to_string(&mut page).unwrap();
    assert!(page.contains("vproxy-web-ok"), "{page}");

    // Many streams at once, checksummed, over virtio and over the paced UART.
    echo_many_ok(
        &mut vm,
        &mut qmp,
        &p("echo.sock"),
        VIRTIO_STREAMS,
        VIRTIO_BYTES,
    );
    echo_many_ok(
        &mut vm,
        &mut qmp,
        &p("echo-uart.sock"),
        UART_STREAMS,
        UART_BYTES,
    );
    let info = vproxy_info(&mut qmp, "vp0");
    assert_eq!(info["session"]["up"], true, "{info}");
    assert!(
        info["session"]["bytes-rx"].as_u64().unwrap() >= (VIRTIO_STREAMS * VIRTIO_BYTES) as u64,
        "{info}"
    );
    let uart = vproxy_info(&mut qmp, "vp1");
    assert_eq!(uart["session"]["up"], true, "{uart}");

    // Forwards change at run time.
    // A forward's name is the guest service it reaches, unique per direction: "echo" is taken.
    let extra = p("echo2.sock");
    let dup = qmp.cmd(
        "vproxy-forward-add",
        json!({"id": "vp0", "direction": "out",
               "forward": format!("echo:unix:{}", extra.display())}),
    );
    assert!(dup.get("error").is_some(), "{dup}");
    qmp.ok(
        "vproxy-forward-remove",
        json!({"id": "vp0", "direction": "out", "name": "echo"}),
    );
    assert!(
        UnixStream::connect(p("echo.sock")).is_err(),
        "removed oforward still accepts"
    );
    qmp.ok(
        "vproxy-forward-add",
        json!({"id": "vp0", "direction": "out",
               "forward": format!("echo:unix:{}", extra.display())}),
    );
    echo_many_ok(&mut vm, &mut qmp, &extra, 1, 64);
    qmp.ok(
        "vproxy-forward-add",
        json!({"id": "vp0", "direction": "in", "forward": "extra:127.0.0.1:1"}),
    );
    let info = vproxy_info(&mut qmp, "vp0");
    assert!(
        info["iforwards"]
            .as_array()
            .unwrap()
            .contains(&json!("extra:127.0.0.1:1")),
        "{info}"
    );
    qmp.ok(
        "vproxy-forward-remove",
        json!({"id": "vp0", "direction": "in", "name": "extra"}),
    );

    // A reset in the middle of a transfer: the stream ends, never silently corrupted; after
    // the guest is back, the same forwards carry new streams.
    let mut s = connect(&extra);
    let first = payload(7, 512);
    s.write_all(&first).unwrap();
    let mut got = vec![0u8; first.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, first);
    let resets_before = vproxy_info(&mut qmp, "vp0")["session"]["session-resets"]
        .as_u64()
        .unwrap();
    qmp.ok("system_reset", Value::Null);
    // Whatever was in flight: the stream ends with EOF or an error, and what it delivered is
    // a prefix of what was sent.
    let more = payload(8, 4096);
    let _ = s.write_all(&more);
    let mut tail = Vec::new();
    let _ = s.read_to_end(&mut tail);
    assert!(
        more.starts_with(&tail),
        "bytes after the reset are not what was sent"
    );
    wait_or_dump(&mut vm, &mut qmp, UP, BOOT_TIMEOUT);
    echo_many_ok(&mut vm, &mut qmp, &extra, 10, VIRTIO_BYTES);
    echo_many_ok(&mut vm, &mut qmp, &p("echo-uart.sock"), 1, UART_BYTES);
    let info = vproxy_info(&mut qmp, "vp0");
    assert!(
        info["session"]["session-resets"].as_u64().unwrap() > resets_before,
        "no new session after the reset: {info}"
    );

    qmp.ok("quit", Value::Null);
    assert_eq!(vm.wait_exit(Duration::from_secs(60)).code(), Some(0));
}

//! A Linux guest with a virtio-vsock device (`--device vsock,guest-cid=3,uds=PATH`), its host
//! side on unix sockets in Firecracker's hybrid model, driven by `minivmm-vp vsock-cat` in the
//! guest (AF_VSOCK; bytes moved by kernel copies only, see `vproxy::vsock_cat`). Two boots of
//! one VM (a `system_reset` in between) check, in order:
//!
//! 1. the guest learns which boot it is from a host listener at `PATH_7000` (a guest → host
//!    connection);
//! 2. three host clients `CONNECT` to three guest listeners at once and two guest processes
//!    connect to two host listeners (`PATH_6001`, `PATH_6002`); `query-vsock` lists the five;
//!    16 MiB go host -> guest on each of the three and 16 MiB guest -> host on each of the two
//!    (the guest sends back what two of its listeners receive, through a FIFO), all at once,
//!    checksummed on both sides (the guest's `md5sum` of what it received and sent, the
//!    host's digest of what it sent and of what came back);
//! 3. a `CONNECT` to a guest port nobody listens on is closed without `OK`, and a guest
//!    connect to a host port nobody listens on fails with a reset;
//! 4. two connections held open (one each way) show their ports and byte counts in
//!    `query-vsock`; `system_reset` closes both host sockets;
//! 5. after the reboot the guest (told so over vsock) moves 1 MiB each way again, checksummed,
//!    and `query-vsock` counts one transport reset and no malformed packet.
//!
//! `MINIVMM_VSOCK_SECCOMP` (default `on`) is passed as `--seccomp`, so the same run can be made
//! with `log` to find syscalls a filter lacks (docs/seccomp.md).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

use monitor::client::QmpClient;
use serde_json::Value;
use tests::{
    md5_hex, payload, require_kvm, run64, test_cmdline, test_initrd_vp, test_kernel, Vmm,
    EXIT_MARKER,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Bytes each bulk connection carries, each way.
const BULK: usize = 16 << 20;
/// Bytes each way after the reboot.
const AFTER_REBOOT: usize = 1 << 20;
/// Guest listeners the host connects to at once.
const GUEST_PORTS: [u32; 3] = [5001, 5002, 5003];
/// Host listeners (`PATH_P`) the guest connects to at once.
const HOST_PORTS: [u32; 2] = [6001, 6002];
/// A guest port nobody listens on.
const GUEST_PORT_CLOSED: u32 = 5999;
/// A host port nobody listens on.
const HOST_PORT_CLOSED: u32 = 6999;
/// The guest listener kept open across the reset.
const HELD_GUEST_PORT: u32 = 5004;
/// The host listener the guest keeps a connection to across the reset.
const HELD_HOST_PORT: u32 = 6003;
/// Where the guest asks which boot it is.
const PHASE_PORT: u32 = 7000;
/// Bytes the host sends on the held connection.
const HELD_BYTES: usize = 1000;
/// What the guest sends on its held connection.
const HELD_LINE: &str = "ping-6003\n";
/// How long one step of the guest may take.
const STEP: Duration = Duration::from_secs(600);
/// How long the five bulk streams may take: the guest kernel moves about 0.1 MB/s in all on
/// kvm_pvm beside other guests (80 MiB took 766 s on 2026-12-07).
const BULK_TIMEOUT: Duration = Duration::from_secs(2700);

/// What a host listener's connection brought, reported when it ended.
#[derive(Debug)]
struct Arrival {
    port: u32,
    len: usize,
    md5: String,
    /// Whether the read ended with an error (a reset) rather than end of file.
    error: bool,
}

fn path_of(uds: &Path, port: u32) -> PathBuf {
    PathBuf::from(format!("{}_{port}", uds.display()))
}

/// Accept every connection on `PATH_port` and read each to its end, reporting what came.
fn host_listener(uds: &Path, port: u32, tx: Sender<Arrival>) {
    let listener = UnixListener::bind(path_of(uds, port)).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut data = Vec::new();
                let error = conn.read_to_end(&mut data).is_err();
                let _ = tx.send(Arrival {
                    port,
                    len: data.len(),
                    md5: md5_hex(&data),
                    error,
                });
            });
        }
    });
}

/// The listener that tells the guest which boot it is: "1", then "2", ...
fn phase_listener(uds: &Path) {
    let listener = UnixListener::bind(path_of(uds, PHASE_PORT)).unwrap();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { return };
            let _ = conn.write_all(format!("{}", n + 1).as_bytes());
        }
    });
}

/// A host client through `PATH`: `CONNECT port`, then `OK <host port>`; `Err` with what came
/// instead when the connection closes first.
fn host_connect(uds: &Path, port: u32) -> Result<(UnixStream, u32), String> {
    let mut s = UnixStream::connect(uds).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        match s.read(&mut b) {
            Ok(0) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&line))),
            Ok(_) => line.push(b[0]),
            Err(e) => return Err(format!("{e} after {:?}", String::from_utf8_lossy(&line))),
        }
    }
    let text = String::from_utf8_lossy(&line);
    let host_port = text
        .strip_prefix("OK ")
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| format!("not OK: {text:?}"))?;
    s.set_read_timeout(None).unwrap();
    Ok((s, host_port))
}

fn query_vsock(qmp: &mut QmpClient) -> Value {
    let a = qmp.execute("query-vsock", None).expect("qmp");
    a.get("return")
        .unwrap_or_else(|| panic!("query-vsock: {a}"))
        .clone()
}

/// Poll `query-vsock` until `ok` holds (120 s at most); returns the last answer.
fn wait_vsock(qmp: &mut QmpClient, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = query_vsock(qmp);
        if ok(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "query-vsock never showed {what}: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn connections(v: &Value) -> Vec<Value> {
    v["connections"].as_array().cloned().unwrap_or_default()
}

/// Wait for `n` arrivals, by port.
fn arrivals(rx: &Receiver<Arrival>, n: usize, timeout: Duration) -> HashMap<u32, Arrival> {
    let deadline = Instant::now() + timeout;
    let mut got = HashMap::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let a = rx.recv_timeout(left).unwrap_or_else(|_| {
            panic!("only {} of {n} host connections ended: {got:?}", got.len())
        });
        got.insert(a.port, a);
    }
    got
}

/// The first console line since output line `since` that contains `needle`, waiting for it
/// if it has not come yet: the guest's background jobs print in any order, and
/// [`Vmm::wait_for`] passes over the lines it does not look for.
fn line_since(vm: &mut Vmm, since: usize, needle: &str, timeout: Duration) -> String {
    if let Some(l) = vm.output[since.min(vm.output.len())..]
        .iter()
        .find(|l| l.contains(needle))
    {
        return l.clone();
    }
    vm.wait_for(needle, timeout)
}

/// The digest the guest printed as `KEY=<md5>  -`.
fn guest_md5(line: &str, key: &str) -> String {
    line.split_once(&format!("{key}="))
        .map(|(_, rest)| {
            rest.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default()
}

/// Send `data` from a thread, then shut the sending side (the guest reads end of file); the
/// thread then waits for the guest to close.
fn send_from_thread(mut s: UnixStream, data: Vec<u8>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        s.write_all(&data).expect("host -> guest write");
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    })
}

/// The guest's side. Each host listener's stream carries back what one of the guest
/// listeners receives (a FIFO between `vsock-cat --tee 3 listen` and `vsock-cat connect`), so
/// all five streams run at once and every byte the guest sends was made by the host and moved
/// by the guest kernel only (making 32 MiB in the guest, from `/dev/urandom`, takes longer
/// than the transfers on kvm_pvm's emulated ring 0).
fn guest_script() -> String {
    let vp = "/bin/minivmm-vp vsock-cat";
    let [g1, g2, g3] = GUEST_PORTS;
    let [h1, h2] = HOST_PORTS;
    format!(
        "phase=$({vp} connect 2 {PHASE_PORT} </dev/null)\n\
         echo vsock-phase=$phase\n\
         if [ \"$phase\" = 1 ]; then\n\
           mkfifo /tmp/f{g1} /tmp/f{g2}\n\
           ({vp} connect 2 {h1} </tmp/f{g1} >/dev/null; echo sent-{h1}-rc=$?) &\n\
           ({vp} connect 2 {h2} </tmp/f{g2} >/dev/null; echo sent-{h2}-rc=$?) &\n\
           for p in {g1} {g2}; do (echo in-md5-$p=$({vp} --tee 3 listen $p </dev/null 3>/tmp/f$p | md5sum)) & done\n\
           (echo in-md5-{g3}=$({vp} listen {g3} </dev/null | md5sum)) &\n\
           wait; echo bulk-done\n\
           {vp} connect 2 {HOST_PORT_CLOSED} </dev/null; echo refused-rc=$?\n\
           {vp} listen {HELD_GUEST_PORT} </dev/null >/tmp/held &\n\
           (printf '{held}'; sleep 100000) | {vp} connect 2 {HELD_HOST_PORT} >/dev/null &\n\
           echo held-started; sleep 100000\n\
         else\n\
           mkfifo /tmp/f{g1}\n\
           ({vp} connect 2 {h1} </tmp/f{g1} >/dev/null; echo sent-{h1}-rc=$?) &\n\
           (echo in-md5-{g1}=$({vp} --tee 3 listen {g1} </dev/null 3>/tmp/f{g1} | md5sum)) &\n\
           wait; echo after-reboot-done\n\
         fi\n",
        held = HELD_LINE.replace('\n', "\\n"),
    )
}

#[test]
fn vsock_streams_both_ways_refusals_and_a_reboot() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let qmp_path = dir.path().join("qmp.sock");
    let (tx, rx) = channel();
    for port in HOST_PORTS.into_iter().chain([HELD_HOST_PORT]) {
        host_listener(&uds, port, tx.clone());
    }
    phase_listener(&uds);
    let seccomp = std::env::var("MINIVMM_VSOCK_SECCOMP").unwrap_or_else(|_| "on".into());
    let kernel = test_kernel();
    let initrd = test_initrd_vp();
    let device = format!("vsock,guest-cid=3,uds={}", uds.display());
    let mut vm = Vmm::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--append",
        &test_cmdline(&run64(&guest_script())),
        "--memory",
        "256M",
        "--device",
        &device,
        "--monitor",
        qmp_path.to_str().unwrap(),
        "--seccomp",
        &seccomp,
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !qmp_path.exists() || !uds.exists() {
        assert!(
            Instant::now() < deadline,
            "no QMP or vsock socket\n{}",
            vm.transcript()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut qmp = QmpClient::connect(&qmp_path, Duration::from_secs(30)).expect("qmp connect");
    qmp.negotiate().unwrap();
    let v = query_vsock(&mut qmp);
    assert_eq!(v["guest-cid"], 3, "{v}");
    assert_eq!(v["uds-path"], uds.display().to_string(), "{v}");

    // 1. First boot.
    vm.wait_for("vsock-phase=1", BOOT_TIMEOUT);
    let boot1 = vm.output.len();
    for p in GUEST_PORTS {
        line_since(&mut vm, boot1, &format!("listening on port {p}"), STEP);
    }

    // 2. Three host -> guest connections at once, and the guest's two to the host.
    let mut streams = Vec::new();
    for p in GUEST_PORTS {
        let (s, host_port) = host_connect(&uds, p).unwrap_or_else(|e| panic!("CONNECT {p}: {e}"));
        assert!(host_port >= 1 << 30, "host port {host_port}");
        streams.push((p, s, host_port));
    }
    let v = wait_vsock(&mut qmp, "five connections", |v| connections(v).len() >= 5);
    for (p, _, host_port) in &streams {
        assert!(
            connections(&v).iter().any(|c| c["peer-port"] == *p
                && c["local-port"] == *host_port
                && c["host-initiated"] == true),
            "no host-initiated {host_port} -> {p}: {v}"
        );
    }
    for p in HOST_PORTS {
        assert!(
            connections(&v)
                .iter()
                .any(|c| c["local-port"] == p && c["host-initiated"] == false),
            "no guest connection to {p}: {v}"
        );
    }
    let started = Instant::now();
    let mut expect_in = HashMap::new();
    let mut senders = Vec::new();
    for (i, (p, s, _)) in streams.into_iter().enumerate() {
        let data = payload(i as u32 + 1, BULK);
        expect_in.insert(p, md5_hex(&data));
        senders.push(send_from_thread(s, data));
    }
    // The guest's md5sum of each stream it received (what it sent back on the first two).
    for p in GUEST_PORTS {
        let line = line_since(&mut vm, boot1, &format!("in-md5-{p}="), BULK_TIMEOUT);
        assert_eq!(
            guest_md5(&line, &format!("in-md5-{p}")),
            expect_in[&p],
            "host -> guest {p}: {line}"
        );
    }
    // The host's digest of what came back: what the guest checksummed and sent.
    let got = arrivals(&rx, HOST_PORTS.len(), BULK_TIMEOUT);
    for (h, g) in HOST_PORTS.into_iter().zip(GUEST_PORTS) {
        let a = &got[&h];
        assert!(!a.error, "guest -> host {h} ended in an error");
        assert_eq!(a.len, BULK, "guest -> host {h}");
        assert_eq!(a.md5, expect_in[&g], "guest -> host {h} (from {g}): digest");
    }
    for s in senders {
        s.join().unwrap();
    }
    for p in HOST_PORTS {
        let line = line_since(&mut vm, boot1, &format!("sent-{p}-rc="), STEP);
        assert!(line.ends_with(&format!("sent-{p}-rc=0")), "{line}");
    }
    line_since(&mut vm, boot1, "bulk-done", STEP);
    eprintln!(
        "vsock: 3 x {BULK} host->guest and 2 x {BULK} guest->host at once in {:?}",
        started.elapsed()
    );

    // 3. Refusals both ways.
    let e = host_connect(&uds, GUEST_PORT_CLOSED).expect_err("CONNECT to a closed guest port");
    assert!(e.starts_with("closed") || e.contains("reset"), "{e}");
    let line = line_since(&mut vm, boot1, "vsock-cat: connect to 2:", STEP);
    assert!(
        line.contains("reset by peer") || line.contains("refused"),
        "guest connect to a closed host port: {line}"
    );
    let rc = line_since(&mut vm, boot1, "refused-rc=", STEP);
    assert!(rc.contains("refused-rc=1"), "{rc}");

    // 4. Held connections, seen in query-vsock, then reset by the reboot.
    line_since(
        &mut vm,
        boot1,
        &format!("listening on port {HELD_GUEST_PORT}"),
        STEP,
    );
    let (mut held, held_port) = host_connect(&uds, HELD_GUEST_PORT).expect("CONNECT held");
    held.write_all(&payload(9, HELD_BYTES)).unwrap();
    let v = wait_vsock(&mut qmp, "the held connections' bytes", |v| {
        let c = connections(v);
        c.iter().any(|c| {
            c["local-port"] == held_port
                && c["peer-port"] == HELD_GUEST_PORT
                && c["bytes-to-guest"] == HELD_BYTES
        }) && c.iter().any(|c| {
            c["local-port"] == HELD_HOST_PORT
                && c["host-initiated"] == false
                && c["bytes-to-host"] == HELD_LINE.len()
        })
    });
    assert_eq!(v["counters"]["malformed-packets"], 0, "{v}");
    assert!(
        v["counters"]["refused-connections"].as_u64().unwrap_or(0) >= 1,
        "the refused guest connect is counted: {v}"
    );
    let a = qmp.execute("system_reset", None).expect("qmp");
    assert!(a.get("return").is_some(), "system_reset: {a}");
    held.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut buf = [0u8; 64];
    match held.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("held host stream got {n} bytes after the reset"),
    }
    let a = arrivals(&rx, 1, Duration::from_secs(60));
    let held_in = &a[&HELD_HOST_PORT];
    assert_eq!(held_in.len, HELD_LINE.len(), "{held_in:?}");
    let v = query_vsock(&mut qmp);
    assert!(
        connections(&v).is_empty(),
        "connections after the reset: {v}"
    );

    // 5. The rebooted guest connects and listens again.
    vm.wait_for("vsock-phase=2", BOOT_TIMEOUT);
    let boot2 = vm.output.len();
    line_since(
        &mut vm,
        boot2,
        &format!("listening on port {}", GUEST_PORTS[0]),
        STEP,
    );
    let (s, _) = host_connect(&uds, GUEST_PORTS[0]).expect("CONNECT after the reboot");
    let data = payload(7, AFTER_REBOOT);
    let want_in = md5_hex(&data);
    let sender = send_from_thread(s, data);
    let got = arrivals(&rx, 1, STEP);
    let a = &got[&HOST_PORTS[0]];
    assert_eq!((a.len, a.md5.as_str()), (AFTER_REBOOT, want_in.as_str()));
    let line = line_since(&mut vm, boot2, &format!("in-md5-{}=", GUEST_PORTS[0]), STEP);
    assert_eq!(
        guest_md5(&line, &format!("in-md5-{}", GUEST_PORTS[0])),
        want_in
    );
    sender.join().unwrap();
    let line = line_since(&mut vm, boot2, &format!("sent-{}-rc=", HOST_PORTS[0]), STEP);
    assert!(
        line.ends_with(&format!("sent-{}-rc=0", HOST_PORTS[0])),
        "{line}"
    );
    line_since(&mut vm, boot2, "after-reboot-done", STEP);
    let v = query_vsock(&mut qmp);
    assert_eq!(v["counters"]["transport-resets"], 1, "{v}");
    assert_eq!(v["counters"]["malformed-packets"], 0, "{v}");

    vm.wait_for(&format!("{EXIT_MARKER} 0"), STEP);
    assert_eq!(vm.wait_exit(Duration::from_secs(60)).code(), Some(0));
    assert!(!uds.exists(), "the listener's socket is removed at exit");
}

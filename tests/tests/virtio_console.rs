//! A Linux guest with a multiport virtio-console over virtio-mmio, found through ACPI
//! (LNRO0005): a named port on a unix socket the test talks to, and a console port (hvc0) on a
//! file. One boot: the name appears as /dev/virtio-ports/NAME, data flows both ways
//! byte-identical (checksummed on both sides), and hvc0 reaches its backend.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use tests::{require_kvm, run64, test_cmdline, test_initrd, test_kernel, Vmm, EXIT_MARKER};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Bytes sent each way.
const BULK: usize = 2 << 20;

/// A deterministic, non-repeating-looking payload.
fn payload(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn md5_hex(data: &[u8]) -> String {
    let mut child = std::process::Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("md5sum");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn named_port_and_console_port_move_data_both_ways() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("port.sock");
    let hvc = dir.path().join("hvc.log");
    // The guest holds the port open (fd 3, read-write) before the host sends: Linux drops
    // what a port received when it is closed, and allows one opener at a time.
    let script = format!(
        "ls /dev/virtio-ports/\n\
         P=/dev/virtio-ports/org.minivmm.test\n\
         echo hello-virtio >$P\n\
         exec 3<>$P\n\
         echo open-$((1+1))\n\
         head -c 5 <&3; echo\n\
         echo via-hvc >/dev/hvc0\n\
         echo in-md5=$(head -c {BULK} <&3 | tee /tmp/in | md5sum)\n\
         echo sending-back; cat /tmp/in >&3\n"
    );
    let kernel = test_kernel();
    let initrd = test_initrd();
    let port_spec = format!("socket,id=vp,path={},server=on,wait=off", sock.display());
    let hvc_spec = format!("file,id=hv,path={}", hvc.display());
    let mut vm = Vmm::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--append",
        &test_cmdline(&run64(&script)),
        "--chardev",
        &port_spec,
        "--device",
        "virtserialport,chardev=vp,name=org.minivmm.test",
        "--chardev",
        &hvc_spec,
        "--device",
        "virtconsole,chardev=hv",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no port socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut port = UnixStream::connect(&sock).unwrap();
    vm.wait_for("org.minivmm.test", BOOT_TIMEOUT);

    // Guest -> host, then host -> guest on the same port.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    port.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    while !got.ends_with(b"hello-virtio\n") {
        let n = port.read(&mut buf).expect("read from the port");
        assert!(
            n > 0,
            "port closed early: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"hello-virtio\n");
    vm.wait_for("open-2", Duration::from_secs(120));
    port.write_all(b"ABCDE").unwrap();
    vm.wait_for("ABCDE", Duration::from_secs(120));

    // Bulk host -> guest, checksummed by the guest.
    let data = payload(BULK);
    let expect_in = md5_hex(&data);
    let mut writer = port.try_clone().unwrap();
    let started = Instant::now();
    let sender = std::thread::spawn(move || writer.write_all(&data));
    let line = vm.wait_for("in-md5=", Duration::from_secs(300));
    sender.join().unwrap().unwrap();
    assert!(
        line.contains(&expect_in),
        "guest saw {line}, host sent {expect_in}"
    );
    eprintln!(
        "host->guest {BULK} bytes checksummed in {:?}",
        started.elapsed()
    );

    // Bulk guest -> host: the guest sends back what it received; it arrives byte-identical.
    vm.wait_for("sending-back", Duration::from_secs(120));
    let mut received = Vec::with_capacity(BULK);
    while received.len() < BULK {
        let n = port.read(&mut buf).expect("bulk read");
        assert!(n > 0, "port closed after {} bytes", received.len());
        received.extend_from_slice(&buf[..n]);
    }
    assert_eq!(received.len(), BULK);
    assert_eq!(md5_hex(&received), expect_in, "guest->host data differs");

    vm.wait_for(&format!("{EXIT_MARKER} 0"), Duration::from_secs(120));
    assert_eq!(vm.wait_exit(Duration::from_secs(60)).code(), Some(0));
    let hvc_text = std::fs::read_to_string(&hvc).unwrap();
    assert!(
        hvc_text.contains("via-hvc"),
        "hvc0 backend got {hvc_text:?}"
    );
}

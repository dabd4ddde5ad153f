//! Tiny guest programs booted through the `minivmm` CLI under real KVM: the boot path (PVH
//! entry, start info, memory map), the COM1 16550 at register level, machine resets (a guest
//! reboot and `system_reset` in process, `--no-reboot`), and every way a VM ends (ACPI
//! power-off, a reset under `--no-reboot`, triple fault, host signals).

use std::time::Duration;

use tests::{require_kvm, Vmm};

const TIMEOUT: Duration = Duration::from_secs(60);
/// The console line of the spinning tiny guest once it runs.
const SPINNING: &str = "spinning until a signal";
/// How long a stopped VM is watched for output it must not produce.
const STOPPED_QUIET: Duration = Duration::from_millis(500);

fn boot(guest: &str, extra: &[&str]) -> Vmm {
    require_kvm();
    let mut args = vec!["--kernel", guest, "--serial", "stdio"];
    args.extend_from_slice(extra);
    Vmm::start(&args)
}

#[test]
fn hello_prints_on_com1_and_power_off_exits_zero() {
    let mut vm = boot(env!("TINY_GUEST_HELLO"), &[]);
    vm.wait_for("hello from a tiny guest", TIMEOUT);
    let status = vm.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", vm.transcript());
    // stdin is /dev/null, which epoll refuses: read to its end, not warned about.
    let err = vm.stderr_lines();
    assert!(
        !err.iter().any(|l| l.contains("cannot watch")),
        "stderr: {err:?}"
    );
}

#[test]
fn uart_registers_behave_like_a_16550a() {
    let mut vm = boot(env!("TINY_GUEST_UART_REGS"), &[]);
    vm.wait_for("DONE", TIMEOUT);
    let status = vm.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(0));
    let fails: Vec<&String> = vm.output.iter().filter(|l| l.contains("FAIL")).collect();
    let passes = vm.output.iter().filter(|l| l.starts_with("PASS")).count();
    assert!(fails.is_empty(), "register checks failed: {fails:?}");
    assert!(
        passes >= 20,
        "only {passes} checks ran:\n{}",
        vm.transcript()
    );
}

#[test]
fn pvh_start_info_carries_cmdline_rsdp_and_memory_map() {
    let mut vm = boot(
        env!("TINY_GUEST_PVH_INFO"),
        &["--memory", "64M", "--append", "hello=world quiet"],
    );
    vm.wait_for("DONE", TIMEOUT);
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    let out = vm.output.join("\n");
    assert!(out.contains("PASS start-info-magic"), "{out}");
    assert!(out.contains("cmdline=hello=world quiet"), "{out}");
    assert!(out.contains("rsdp=00000000000E0000"), "{out}");
    assert!(out.contains("memmap=3"), "{out}");
    // RAM from 1 MiB to the end of the 64 MiB: 0x3F00000 bytes, type 1.
    assert!(out.contains("0000000000100000 0000000003F00000 1"), "{out}");
}

/// The console lines of the `reset` guest: it resets twice, then powers off.
const THREE_BOOTS: [&str; 3] = [
    "boot 1: resetting through the i8042",
    "boot 2: resetting through the i8042",
    "boot 3: powering off",
];

#[test]
fn guest_reset_reboots_in_process_until_the_guest_powers_off() {
    let mut vm = boot(env!("TINY_GUEST_RESET"), &[]);
    for line in THREE_BOOTS {
        vm.wait_for(line, TIMEOUT);
    }
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0), "{}", vm.transcript());
    // Each boot found its image loaded again and a fresh PVH start info.
    assert!(
        !vm.output.iter().any(|l| l.contains("FAIL")),
        "{}",
        vm.transcript()
    );
}

#[test]
fn no_reboot_ends_the_vm_at_the_first_reset_with_status_zero() {
    let mut vm = boot(env!("TINY_GUEST_RESET"), &["--no-reboot"]);
    vm.wait_for(THREE_BOOTS[0], TIMEOUT);
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    assert!(
        !vm.output.iter().any(|l| l.contains("boot 2")),
        "{}",
        vm.transcript()
    );
}

/// Four vCPUs (three application processors back to wait-for-SIPI each time) and a COM port
/// on a unix socket: the peer that connected before the first boot reads all three boots on
/// the one connection, which ends only when the VM does.
#[test]
fn socket_peer_stays_connected_across_resets_with_four_vcpus() {
    use std::io::Read;
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("com1.sock");
    let spec = format!("unix:{},server=on,wait=on", sock.display());
    let mut vm = Vmm::start(&[
        "--kernel",
        env!("TINY_GUEST_RESET"),
        "--smp",
        "4",
        "--serial",
        &spec,
    ]);
    let mut client = connect_when_listening(&sock);
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut got = String::new();
    client.read_to_string(&mut got).unwrap();
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0), "{}", vm.transcript());
    let expected: String = THREE_BOOTS.iter().map(|l| format!("{l}\n")).collect();
    assert_eq!(got, expected);
}

/// `system_reset` reboots the running VM (RESET, no SHUTDOWN); a reset while stopped keeps it
/// stopped until `cont`; `quit` still ends it.
#[test]
fn qmp_system_reset_boots_the_guest_again_and_respects_stop() {
    use serde_json::{json, Value};
    use tests::qmp::Qmp;
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("qmp.sock");
    let mut vm = boot(
        env!("TINY_GUEST_SPIN"),
        &["--smp", "2", "--monitor", qmp.to_str().unwrap()],
    );
    vm.wait_for(SPINNING, TIMEOUT);
    let (mut q, _) = Qmp::connect(&qmp);
    q.ok("qmp_capabilities", Value::Null);

    q.ok("system_reset", Value::Null);
    let ev = q.event("RESET");
    assert_eq!(
        ev["data"],
        json!({"guest": false, "reason": "host-qmp-system-reset"}),
        "{ev}"
    );
    vm.wait_for(SPINNING, TIMEOUT);
    assert_eq!(
        q.ok("query-status", Value::Null)["status"],
        json!("running")
    );

    q.ok("stop", Value::Null);
    q.ok("system_reset", Value::Null);
    q.event("RESET");
    assert_eq!(q.ok("query-status", Value::Null)["status"], json!("paused"));
    std::thread::sleep(STOPPED_QUIET);
    let lines = vm.output.len();
    assert_eq!(
        vm.transcript().matches(SPINNING).count(),
        2,
        "a stopped VM ran after its reset"
    );
    q.ok("cont", Value::Null);
    vm.wait_for(SPINNING, TIMEOUT);
    assert!(vm.output.len() > lines);

    assert!(
        !q.events.iter().any(|e| e["event"] == json!("SHUTDOWN")),
        "a reset is no shutdown: {:?}",
        q.events
    );
    q.ok("quit", Value::Null);
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
}

#[test]
fn qmp_system_reset_under_no_reboot_shuts_down_with_status_zero() {
    use serde_json::{json, Value};
    use tests::qmp::Qmp;
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("qmp.sock");
    let mut vm = boot(
        env!("TINY_GUEST_SPIN"),
        &["--no-reboot", "--monitor", qmp.to_str().unwrap()],
    );
    vm.wait_for(SPINNING, TIMEOUT);
    let (mut q, _) = Qmp::connect(&qmp);
    q.ok("qmp_capabilities", Value::Null);
    q.ok("system_reset", Value::Null);
    let ev = q.event("SHUTDOWN");
    assert_eq!(
        ev["data"],
        json!({"guest": false, "reason": "host-qmp-system-reset"}),
        "{ev}"
    );
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
}

#[test]
fn triple_fault_is_reported_with_registers_and_fails() {
    let mut vm = boot(env!("TINY_GUEST_TRIPLE_FAULT"), &[]);
    vm.wait_for("about to triple fault", TIMEOUT);
    let status = vm.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(1));
    let err = vm.stderr_lines().join("\n");
    assert!(err.contains("triple fault"), "{err}");
    assert!(err.contains("rip=0x"), "{err}");
    // The faulting instruction is ud2 (0f 0b).
    assert!(err.contains("code at rip: 0f 0b"), "{err}");
}

#[test]
fn sigterm_and_sigint_stop_the_vm_cleanly() {
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let mut vm = boot(env!("TINY_GUEST_SPIN"), &["--smp", "2"]);
        vm.wait_for(SPINNING, TIMEOUT);
        // SAFETY: sending a signal to the child process we spawned and still own.
        let rc = unsafe { libc::kill(vm.pid() as i32, sig) };
        assert_eq!(rc, 0);
        let status = vm.wait_exit(Duration::from_secs(10));
        assert_eq!(
            status.code(),
            Some(128 + sig),
            "{name}: {}",
            vm.transcript()
        );
    }
}

#[test]
fn serial_file_backend_receives_the_console() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.log");
    let spec = format!("file:{}", path.display());
    let mut vm = Vmm::start(&["--kernel", env!("TINY_GUEST_HELLO"), "--serial", &spec]);
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, "hello from a tiny guest\n");
}

/// Four UARTs on four different backends (stdio, file, a unix socket server the boot waits
/// for, and a `--device isa-serial` on a file): each line reaches its own backend only.
#[test]
fn four_com_ports_reach_their_own_backends() {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let com2 = dir.path().join("com2.log");
    let com4 = dir.path().join("com4.log");
    let sock = dir.path().join("com3.sock");
    let com2_spec = format!("file:{}", com2.display());
    let sock_spec = format!("unix:{},server=on,wait=on", sock.display());
    let com4_dev = format!("file,id=c4,path={}", com4.display());
    let mut vm = Vmm::start(&[
        "--kernel",
        env!("TINY_GUEST_FOUR_PORTS"),
        "--serial",
        "stdio",
        "--serial",
        &com2_spec,
        "--serial",
        &sock_spec,
        "--chardev",
        &com4_dev,
        "--device",
        "isa-serial,chardev=c4,index=3",
    ]);
    // wait=on: the guest does not start before this client connects.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no socket {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let mut client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    vm.wait_for("hello from COM1", TIMEOUT);
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    let mut got = String::new();
    client.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello from COM3\n");
    assert_eq!(std::fs::read_to_string(&com2).unwrap(), "hello from COM2\n");
    assert_eq!(std::fs::read_to_string(&com4).unwrap(), "hello from COM4\n");
    assert!(!vm
        .output
        .iter()
        .any(|l| l.contains("COM2") || l.contains("COM3")));
    assert!(!sock.exists(), "socket file left behind");
}

/// Connect to the unix socket server at `path` once minivmm listens there.
fn connect_when_listening(path: &std::path::Path) -> std::os::unix::net::UnixStream {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no socket {}: {e}",
                    path.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// `--serial mon:stdio`, as QEMU's: COM1 and the human monitor share stdio. The console has
/// the input first; Ctrl-A c switches to the monitor (its banner waits until then), which
/// answers commands; Ctrl-A c switches back, and Ctrl-A x quits with status 0.
#[test]
fn mon_stdio_switches_between_console_and_monitor() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    use tests::stream::StreamReader;

    require_kvm();
    let mut child = Command::new(tests::minivmm_bin())
        .args([
            "--kernel",
            env!("TINY_GUEST_SPIN"),
            "--memory",
            "64M",
            "--serial",
            "mon:stdio",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn minivmm");
    let mut input = child.stdin.take().unwrap();
    let mut out = StreamReader::spawn(child.stdout.take().unwrap());
    let at = out.expect(0, SPINNING, TIMEOUT);
    std::thread::sleep(STOPPED_QUIET);
    out.drain();
    let shown = String::from_utf8_lossy(&out.seen).to_string();
    assert!(
        !shown.contains("monitor"),
        "the monitor spoke before Ctrl-A c: {shown:?}"
    );
    input.write_all(b"\x01c").unwrap();
    let at = out.expect(at, "(minivmm) ", TIMEOUT);
    let banner = String::from_utf8_lossy(&out.seen).to_string();
    assert!(banner.contains("monitor - type 'help'"), "{banner:?}");
    input.write_all(b"info status\n").unwrap();
    let at = out.expect(at, "VM status: running", TIMEOUT);
    input.write_all(b"stop\ninfo status\n").unwrap();
    let at = out.expect(at, "VM status: paused", TIMEOUT);
    input.write_all(b"cont\n\x01c\x01c").unwrap();
    // Back at the monitor after a round trip through the console: a fresh prompt.
    out.expect(at, "\r\n(minivmm) ", TIMEOUT);
    input.write_all(b"\x01x").unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Ctrl-A x did not quit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

//! Real Linux guests booted through the `minivmm` CLI, the way `make run` does: the project's
//! test kernel (PVH vmlinux) and busybox initramfs. Boots are expensive on a nested KVM, so
//! each test does many checks in one boot.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::stream::StreamReader;
use tests::{
    minivmm_bin, require_kvm, run64, test_cmdline, test_initrd, test_kernel, EXIT_MARKER,
    READY_MARKER,
};

/// How long a boot to the ready marker may take (a nested kvm_pvm boot takes minutes).
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long one interactive guest command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// A guest whose console is this test's pipe pair: what `make run` gives a user on a terminal.
struct Console {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    out: StreamReader,
}

impl Console {
    /// Boot the test kernel and initramfs with `cmdline_extra` and `args`.
    fn boot(cmdline_extra: &str, args: &[&str]) -> Console {
        require_kvm();
        let kernel = test_kernel();
        let initrd = test_initrd();
        let cmdline = test_cmdline(cmdline_extra);
        let mut child = Command::new(minivmm_bin())
            .args([
                "--kernel",
                kernel.to_str().unwrap(),
                "--initrd",
                initrd.to_str().unwrap(),
                "--append",
                &cmdline,
            ])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn minivmm");
        let stdin = child.stdin.take().unwrap();
        let out = StreamReader::spawn(child.stdout.take().unwrap());
        Console { child, stdin, out }
    }

    /// Wait until the console shows `needle` after position `from`; returns the end position.
    fn expect_from(&mut self, from: usize, needle: &str, timeout: Duration) -> usize {
        self.out.expect(from, needle, timeout)
    }

    fn expect(&mut self, needle: &str, timeout: Duration) -> usize {
        self.expect_from(0, needle, timeout)
    }

    /// Type a command line into the guest shell; returns the console position before it.
    fn type_line(&mut self, line: &str) -> usize {
        self.out.drain();
        let at = self.out.seen.len();
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
        at
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            self.out.drain();
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "minivmm did not exit within {timeout:?}:\n{}",
                    String::from_utf8_lossy(&self.out.seen)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `make run` experience with two vCPUs: the ready marker, an interactive shell that
/// reads what the host types (UART receive interrupts) and answers (transmit), the guest
/// seeing both CPUs and its command line, and `poweroff` ending minivmm with status 0.
#[test]
fn linux_shell_on_com1_with_two_vcpus_then_poweroff() {
    let mut c = Console::boot("minivmm.test=shell", &["--smp", "2", "--memory", "256M"]);
    let ready = c.expect(READY_MARKER, BOOT_TIMEOUT);

    let at = c.type_line("echo hello-$((6*7))");
    let at = c.expect_from(at, "hello-42", COMMAND_TIMEOUT);
    let _ = at;

    let at = c.type_line("echo cpus=$(grep -c ^processor /proc/cpuinfo)");
    c.expect_from(at, "cpus=2", COMMAND_TIMEOUT);

    let at = c.type_line("cat /proc/cmdline");
    c.expect_from(at, "minivmm.test=shell", COMMAND_TIMEOUT);

    let at = c.type_line("echo ttys=$(ls /dev/ttyS0) mem=$(grep -c MemTotal /proc/meminfo)");
    c.expect_from(at, "ttys=/dev/ttyS0 mem=1", COMMAND_TIMEOUT);

    c.type_line("poweroff");
    let status = c.wait_exit(COMMAND_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "poweroff did not end minivmm with status 0:\n{}",
        String::from_utf8_lossy(&c.out.seen[ready..])
    );
}

/// A command given on the kernel command line runs after the ready marker, its output and
/// exit status appear on the console, and the guest powers off by itself.
#[test]
fn linux_runs_a_command_from_the_command_line_and_powers_off() {
    let script = "uname -sr; echo sum=$((40+2)); read -r up _ </proc/uptime; echo up=$up; exit 3";
    let mut c = Console::boot(&run64(script), &["--memory", "128M"]);
    let ready = c.expect(READY_MARKER, BOOT_TIMEOUT);
    let at = c.expect_from(ready, "Linux 6.1", COMMAND_TIMEOUT);
    let at = c.expect_from(at, "sum=42", COMMAND_TIMEOUT);
    c.expect_from(at, &format!("{EXIT_MARKER} 3"), COMMAND_TIMEOUT);
    assert_eq!(c.wait_exit(COMMAND_TIMEOUT).code(), Some(0));
}

/// Without ACPI (`--acpi off`, for kernels built without it, as QEMU's `-M microvm,acpi=off`):
/// the guest finds no ACPI tables, COM1 at its legacy port, its processor and interrupt
/// routes in the MP table, and the virtio-mmio device through the `virtio_mmio.device=` entry
/// minivmm puts on its command line; a named port carries data to its backend; a `reboot=k`
/// reset ends the run (`--no-reboot`).
#[test]
fn linux_without_acpi_finds_virtio_through_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("port.out");
    let chardev = format!("file,id=f0,path={}", out.display());
    let script = "tr ' ' '\\n' </proc/cmdline | grep virtio_mmio.device\n\
        ls /dev/virtio-ports/\n\
        [ -e /sys/firmware/acpi/tables/DSDT ] && echo acpi-tables || echo no-acpi-tables\n\
        echo via-cmdline-virtio >/dev/virtio-ports/org.minivmm.noacpi\n\
        kill -TERM 1\n";
    let mut c = Console::boot(
        &run64(script),
        &[
            "--acpi",
            "off",
            "--no-reboot",
            "--chardev",
            &chardev,
            "--device",
            "virtserialport,chardev=f0,name=org.minivmm.noacpi",
        ],
    );
    let ready = c.expect(READY_MARKER, BOOT_TIMEOUT);
    let at = c.expect_from(ready, "virtio_mmio.device=4K@0x", COMMAND_TIMEOUT);
    let at = c.expect_from(at, "org.minivmm.noacpi", COMMAND_TIMEOUT);
    let at = c.expect_from(at, "no-acpi-tables", COMMAND_TIMEOUT);
    c.expect_from(at, &format!("{EXIT_MARKER} 0"), COMMAND_TIMEOUT);
    assert_eq!(c.wait_exit(COMMAND_TIMEOUT).code(), Some(0));
    let got = std::fs::read_to_string(&out).unwrap();
    assert_eq!(got, "via-cmdline-virtio\n");
}

/// A guest reboot restarts the VM in process, as QEMU does by default: the shell types
/// `reboot -f` (the command line has `reboot=k`, so the i8042 resets the machine), the same
/// console (stdio, the same pipes) and the same QMP client see the kernel boot to the ready
/// marker again with both vCPUs, QMP reports `RESET` from the guest and no `SHUTDOWN`, and
/// `poweroff -f` then ends minivmm with status 0.
#[test]
fn linux_reboot_restarts_the_vm_in_process_then_poweroff() {
    use serde_json::{json, Value};
    use tests::qmp::Qmp;
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("qmp.sock");
    let mut c = Console::boot(
        "",
        &[
            "--smp",
            "2",
            "--memory",
            "256M",
            "--monitor",
            qmp.to_str().unwrap(),
        ],
    );
    let ready = c.expect(READY_MARKER, BOOT_TIMEOUT);
    let (mut q, _) = Qmp::connect(&qmp);
    q.ok("qmp_capabilities", Value::Null);

    let at = c.type_line("reboot -f");
    c.expect_from(at, READY_MARKER, BOOT_TIMEOUT);
    let ev = q.event("RESET");
    assert_eq!(
        ev["data"],
        json!({"guest": true, "reason": "guest-reset"}),
        "{ev}"
    );
    assert_eq!(
        q.ok("query-status", Value::Null)["status"],
        json!("running")
    );

    let at = c.type_line("echo cpus=$(grep -c ^processor /proc/cpuinfo)");
    c.expect_from(at, "cpus=2", COMMAND_TIMEOUT);
    assert!(
        !q.events.iter().any(|e| e["event"] == json!("SHUTDOWN")),
        "a reboot is no shutdown: {:?}",
        q.events
    );

    c.type_line("poweroff -f");
    let status = c.wait_exit(COMMAND_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "poweroff after the reboot did not end minivmm with status 0:\n{}",
        String::from_utf8_lossy(&c.out.seen[ready..])
    );
}

//! Real Linux guests booted through the `minivmm` CLI, the way `make run` does: the project's
//! test kernel (PVH vmlinux) and busybox initramfs. Boots are expensive on a nested KVM, so
//! each test does many checks in one boot.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

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
    rx: std::sync::mpsc::Receiver<u8>,
    seen: Vec<u8>,
}

impl Console {
    fn boot(args: &[&str]) -> Console {
        require_kvm();
        let mut child = Command::new(minivmm_bin())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn minivmm");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match std::io::Read::read(&mut stdout, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        for b in &buf[..n] {
                            if tx.send(*b).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Console {
            child,
            stdin,
            rx,
            seen: Vec::new(),
        }
    }

    /// Wait until the console shows `needle` after position `from`; returns the end position.
    fn expect_from(&mut self, from: usize, needle: &str, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = find(&self.seen[from.min(self.seen.len())..], needle.as_bytes()) {
                return from + pos + needle.len();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let _ = self.child.kill();
                panic!(
                    "no {needle:?} on the console within {timeout:?}:\n{}",
                    String::from_utf8_lossy(&self.seen)
                );
            }
            match self.rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(b) => self.seen.push(b),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait();
                    panic!(
                        "minivmm exited ({status:?}) before {needle:?}:\n{}",
                        String::from_utf8_lossy(&self.seen)
                    );
                }
            }
        }
    }

    fn expect(&mut self, needle: &str, timeout: Duration) -> usize {
        self.expect_from(0, needle, timeout)
    }

    /// Type a command line into the guest shell; returns the console position before it.
    fn type_line(&mut self, line: &str) -> usize {
        let at = self.seen.len();
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
        at
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            while let Ok(b) = self.rx.try_recv() {
                self.seen.push(b);
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "minivmm did not exit within {timeout:?}:\n{}",
                    String::from_utf8_lossy(&self.seen)
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

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The `make run` experience with two vCPUs: the ready marker, an interactive shell that
/// reads what the host types (UART receive interrupts) and answers (transmit), the guest
/// seeing both CPUs and its command line, and `poweroff` ending minivmm with status 0.
#[test]
fn linux_shell_on_com1_with_two_vcpus_then_poweroff() {
    let kernel = test_kernel();
    let initrd = test_initrd();
    let cmdline = test_cmdline("minivmm.test=shell");
    let mut c = Console::boot(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--append",
        &cmdline,
        "--smp",
        "2",
        "--memory",
        "256M",
    ]);
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
        String::from_utf8_lossy(&c.seen[ready..])
    );
}

/// A command given on the kernel command line runs after the ready marker, its output and
/// exit status appear on the console, and the guest powers off by itself.
#[test]
fn linux_runs_a_command_from_the_command_line_and_powers_off() {
    let kernel = test_kernel();
    let initrd = test_initrd();
    let script = "uname -sr; echo sum=$((40+2)); read -r up _ </proc/uptime; echo up=$up; exit 3";
    let cmdline = test_cmdline(&run64(script));
    let mut c = Console::boot(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--append",
        &cmdline,
        "--memory",
        "128M",
    ]);
    let ready = c.expect(READY_MARKER, BOOT_TIMEOUT);
    let at = c.expect_from(ready, "Linux 6.1", COMMAND_TIMEOUT);
    let at = c.expect_from(at, "sum=42", COMMAND_TIMEOUT);
    c.expect_from(at, &format!("{EXIT_MARKER} 3"), COMMAND_TIMEOUT);
    assert_eq!(c.wait_exit(COMMAND_TIMEOUT).code(), Some(0));
}

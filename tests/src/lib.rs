//! Harness for minivmm's integration tests: find the `minivmm` binary and the guest images,
//! start a VM through the command line a user types, watch what the guest prints, and stop it.
//!
//! Every test that needs KVM calls [`require_kvm`], which fails the test loudly (never skips)
//! when `/dev/kvm` cannot be opened.

pub mod qmp;
pub mod soak;
pub mod stream;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// The line the guest's /init prints when userspace is up.
pub const READY_MARKER: &str = "MINIVMM-READY";
/// The line /init prints after running the test's command: `MINIVMM-EXIT <status>`.
pub const EXIT_MARKER: &str = "MINIVMM-EXIT";

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate sits inside the workspace")
        .to_path_buf()
}

fn from_env_or(var: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or(default)
}

/// The `minivmm` binary under test: `$MINIVMM_BIN`, else the release build, else the debug
/// build in the workspace's target directory.
pub fn minivmm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MINIVMM_BIN") {
        return PathBuf::from(p);
    }
    let target = from_env_or("CARGO_TARGET_DIR", workspace_root().join("target"));
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("minivmm");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "no minivmm binary: run `cargo build --release -p vmm` (or `make test`), or set MINIVMM_BIN"
    );
}

/// The `minivmm-vp` endpoint for host-side peers: `$MINIVMM_VP`, else the static build
/// (`make vp`), else a release or debug build in the workspace's target directory.
pub fn minivmm_vp_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MINIVMM_VP") {
        return PathBuf::from(p);
    }
    let target = from_env_or("CARGO_TARGET_DIR", workspace_root().join("target"));
    let candidates = [
        target.join("x86_64-unknown-linux-gnu/vp/minivmm-vp"),
        target.join("release/minivmm-vp"),
        target.join("debug/minivmm-vp"),
    ];
    candidates
        .into_iter()
        .find(|p| p.exists())
        .expect("no minivmm-vp binary: run `make vp` (or `make test`), or set MINIVMM_VP")
}

/// The test kernel (`$MINIVMM_KERNEL`, default `build/guest/vmlinux`).
pub fn test_kernel() -> PathBuf {
    let p = from_env_or(
        "MINIVMM_KERNEL",
        workspace_root().join("build/guest/vmlinux"),
    );
    assert!(
        p.exists(),
        "test kernel {} missing: run `make guest`",
        p.display()
    );
    p
}

/// The test initramfs (`$MINIVMM_INITRD`, default `build/initramfs.cpio`).
pub fn test_initrd() -> PathBuf {
    initrd_from("MINIVMM_INITRD", "build/initramfs.cpio")
}

/// The test initramfs with `/bin/minivmm-vp` (`$MINIVMM_INITRD_VP`, default
/// `build/initramfs-vp.cpio`).
pub fn test_initrd_vp() -> PathBuf {
    initrd_from("MINIVMM_INITRD_VP", "build/initramfs-vp.cpio")
}

fn initrd_from(var: &str, default: &str) -> PathBuf {
    let p = from_env_or(var, workspace_root().join(default));
    assert!(
        p.exists(),
        "test initramfs {} missing: run `make guest`",
        p.display()
    );
    p
}

/// Fail the calling test unless `/dev/kvm` can be opened read-write.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs KVM and /dev/kvm cannot be opened: {e}");
    }
}

/// Whether the host KVM is the nested kvm_pvm (guest ring 0 emulated, ~100x slower).
pub fn host_is_kvm_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The command line the tests boot the test kernel with (the recipe in resources/README.md).
pub fn test_cmdline(extra: &str) -> String {
    let base = "console=ttyS0 reboot=k noxsave clearcpuid=smap,popcnt rodata=off quiet";
    if extra.is_empty() {
        base.to_string()
    } else {
        format!("{base} {extra}")
    }
}

/// Encode a shell script for /init's `minivmm.run64=`.
pub fn run64(script: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = script.as_bytes();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("minivmm.run64={out}")
}

/// A running `minivmm` whose stdout (the guest console) is read line by line.
pub struct Vmm {
    child: Child,
    lines: Receiver<String>,
    /// Everything the console printed so far.
    pub output: Vec<String>,
    stderr: Receiver<String>,
}

impl Vmm {
    /// Start `minivmm` with `args`, console on stdout (`--serial stdio`, stdin a null device).
    pub fn start(args: &[&str]) -> Vmm {
        let mut cmd = Command::new(minivmm_bin());
        cmd.args(args);
        Vmm::spawn(cmd)
    }

    /// Start `cmd` (a `minivmm` command with its arguments, environment and inherited fds as
    /// the test wants them) with stdin a null device and stdout and stderr read here.
    pub fn spawn(mut cmd: Command) -> Vmm {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn minivmm");
        let lines = pump_lines(child.stdout.take().expect("stdout piped"));
        let stderr = pump_lines(child.stderr.take().expect("stderr piped"));
        Vmm {
            child,
            lines,
            output: Vec::new(),
            stderr,
        }
    }

    /// Wait until a console line contains `needle`; returns that line. Panics with the whole
    /// console (and stderr) on timeout or if the VMM exits first.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        match self.try_wait_for(needle, timeout) {
            Some(line) => line,
            None => {
                let _ = self.child.kill();
                panic!(
                    "timed out after {timeout:?} waiting for {needle:?}\n{}",
                    self.transcript()
                );
            }
        }
    }

    /// [`Vmm::wait_for`] that returns `None` on timeout, leaving the VM running so the test can
    /// gather what it needs before failing. Still panics if the VMM exits first.
    pub fn try_wait_for(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(500)))
            {
                Ok(line) => {
                    self.output.push(line.clone());
                    if line.contains(needle) {
                        return Some(line);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if Instant::now() >= deadline {
                        return None;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    panic!(
                        "minivmm exited ({status:?}) before printing {needle:?}\n{}",
                        self.transcript()
                    );
                }
            }
        }
    }

    /// Wait for the process to exit (killing it after `timeout`); returns its status and the
    /// rest of the console.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait minivmm") {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.output.push(line);
                }
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "minivmm still running after {timeout:?}\n{}",
                    self.transcript()
                );
            }
            while let Ok(line) = self.lines.try_recv() {
                self.output.push(line);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Console and stderr so far, for failure messages.
    pub fn transcript(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.output.push(line);
        }
        let mut err = Vec::new();
        while let Ok(line) = self.stderr.try_recv() {
            err.push(line);
        }
        format!(
            "--- console ---\n{}\n--- stderr ---\n{}",
            self.output.join("\n"),
            err.join("\n")
        )
    }

    /// Everything minivmm wrote to stderr so far.
    pub fn stderr_lines(&mut self) -> Vec<String> {
        let mut err = Vec::new();
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(100)) {
            err.push(line);
        }
        err
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pump_lines<R: Read + Send + 'static>(r: R) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\r', '\n'])
                        .to_string();
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Run `minivmm` with `args` to completion (for CLI errors): status and stderr.
pub fn run_to_end(args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(minivmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run minivmm");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A deterministic, non-repeating-looking payload of `n` bytes (xorshift32), different for
/// every `seed`, for transfers checked byte for byte.
pub fn payload(seed: u32, n: usize) -> Vec<u8> {
    let mut x = 0x1234_5678u32 ^ seed.wrapping_mul(0x85EB_CA6B);
    if x == 0 {
        x = 1;
    }
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The hex MD5 digest of `data`, from the host's `md5sum` (what the guests print too).
pub fn md5_hex(data: &[u8]) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run64_is_standard_base64() {
        assert_eq!(run64(""), "minivmm.run64=");
        assert_eq!(run64("f"), "minivmm.run64=Zg==");
        assert_eq!(run64("fo"), "minivmm.run64=Zm8=");
        assert_eq!(run64("foo"), "minivmm.run64=Zm9v");
        assert_eq!(run64("echo hi; ls"), "minivmm.run64=ZWNobyBoaTsgbHM=");
    }
}

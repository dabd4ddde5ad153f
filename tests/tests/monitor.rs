//! The monitor of a running VM, driven the way management tools do, against a tiny guest
//! that spins so that only the monitor changes its state: QMP on `--monitor PATH` and on an
//! inherited listening socket (`--mon`), the human monitor, instance discovery (runtime
//! directory, `minivmm list` / `qmp`, name clashes) and, through `tests/qmp_client.py`, the
//! `qemu.qmp` Python library.
//!
//! Every VM here gets its own runtime root (`MINIVMM_RUNTIME_DIR`), so tests running in
//! parallel, or other minivmm instances on the host, never see each other.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::qmp::Qmp;
use tests::{minivmm_bin, require_kvm, workspace_root, Vmm};

/// The console line of the spinning tiny guest once it runs.
const SPINNING: &str = "spinning until a signal";
/// How long a tiny guest may take to start, or a monitor to answer.
const TIMEOUT: Duration = Duration::from_secs(30);
/// The fd number a management tool hands its listening monitor socket over on.
const INHERITED_FD: i32 = 3;

/// A private runtime root for the instances of one test.
struct Runtime {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Runtime {
    fn new() -> Runtime {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("minivmm");
        Runtime { _dir: dir, root }
    }

    /// `minivmm ARGS` with this runtime root.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(minivmm_bin());
        cmd.args(args).env("MINIVMM_RUNTIME_DIR", &self.root);
        cmd
    }

    /// Start a VM with this runtime root.
    fn start(&self, args: &[&str]) -> Vmm {
        Vmm::spawn(self.command(args))
    }

    /// Run `minivmm ARGS` (a subcommand, or a VM expected to fail) to the end.
    fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run minivmm")
    }

    fn instance_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Hand `fd` to the child as fd [`INHERITED_FD`], as a management tool passes a socket.
fn inherit_as_fd3(cmd: &mut Command, fd: i32) {
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (dup2, fcntl) on fd numbers, returning an error on failure.
    unsafe {
        cmd.pre_exec(move || {
            let r = if fd == INHERITED_FD {
                // dup2 onto itself would keep close-on-exec: clear it instead.
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, INHERITED_FD)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn qmp_drives_a_running_vm() {
    require_kvm();
    let rt = Runtime::new();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.qmp");
    let mut vm = rt.start(&[
        "--kernel",
        env!("TINY_GUEST_SPIN"),
        "--monitor",
        sock.to_str().unwrap(),
        "--chardev",
        "ringbuf,id=rb0,size=1024",
        "--name",
        "qmp-test",
    ]);
    vm.wait_for(SPINNING, TIMEOUT);
    let (mut q, greeting) = Qmp::connect(&sock);
    // --monitor PATH is recorded in the instance file.
    let info: Value = serde_json::from_str(
        &std::fs::read_to_string(rt.instance_dir("qmp-test").join("instance.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(info["qmp"], json!(sock.to_str().unwrap()), "{info}");
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        greeting["QMP"]["version"]["qemu"]["major"].is_u64(),
        "{greeting}"
    );
    assert!(greeting["QMP"]["capabilities"].is_array());

    // Before negotiation only qmp_capabilities is allowed.
    let early = q.cmd("query-status", Value::Null);
    assert_eq!(early["error"]["class"], json!("CommandNotFound"), "{early}");
    q.ok("qmp_capabilities", Value::Null);

    assert_eq!(
        q.ok("query-status", Value::Null)["status"],
        json!("running")
    );
    assert_eq!(q.ok("query-name", Value::Null)["name"], json!("qmp-test"));
    assert_eq!(q.ok("query-uuid", Value::Null)["UUID"], info["uuid"]);

    // The power button: the tiny guest has no ACPI, so it only shows as the event.
    q.ok("system_powerdown", Value::Null);
    q.event("POWERDOWN");
    // A break to a chardev with a frontend, and to one without, is no error.
    q.ok("chardev-send-break", json!({"id": "serial0"}));
    q.ok("chardev-send-break", json!({"id": "rb0"}));

    // stop parks the vCPUs of a guest that never exits on its own; cont resumes them.
    q.ok("stop", Value::Null);
    q.event("STOP");
    let st = q.ok("query-status", Value::Null);
    assert_eq!(
        (st["status"].clone(), st["running"].clone()),
        (json!("paused"), json!(false))
    );
    q.ok("cont", Value::Null);
    q.event("RESUME");
    assert_eq!(
        q.ok("query-status", Value::Null)["status"],
        json!("running")
    );

    // Chardevs at run time.
    q.ok(
        "ringbuf-write",
        json!({"device": "rb0", "data": "hello ring"}),
    );
    assert_eq!(
        q.ok("ringbuf-read", json!({"device": "rb0", "size": 64}))
            .as_str()
            .unwrap(),
        "hello ring"
    );
    let added = q.ok(
        "chardev-add",
        json!({"id": "p1", "backend": {"type": "pty", "data": {}}}),
    );
    assert!(
        added["pty"].as_str().unwrap_or("").starts_with("/dev/pts/"),
        "{added}"
    );
    let list = q.ok("query-chardev", Value::Null);
    let labels: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["label"].as_str())
        .collect();
    assert!(labels.contains(&"rb0") && labels.contains(&"p1"), "{list}");
    q.ok("chardev-remove", json!({"id": "p1"}));
    let missing = q.cmd("chardev-remove", json!({"id": "p1"}));
    assert_eq!(
        missing["error"]["class"],
        json!("GenericError"),
        "{missing}"
    );

    // Bad input gets an error object and the connection lives on.
    let bad = q.send_raw("{\"execute\": bogus}\n");
    assert_eq!(bad["error"]["class"], json!("GenericError"), "{bad}");
    let unknown = q.cmd("no-such-command", Value::Null);
    assert_eq!(unknown["error"]["class"], json!("CommandNotFound"));
    let hmp = q.ok(
        "human-monitor-command",
        json!({"command-line": "info status"}),
    );
    assert!(hmp.as_str().unwrap().contains("running"), "{hmp}");

    // A second client at the same time has its own negotiation.
    let (mut q2, _) = Qmp::connect(&sock);
    q2.ok("qmp_capabilities", Value::Null);
    assert_eq!(
        q2.ok("query-status", Value::Null)["status"],
        json!("running")
    );

    q.ok("quit", Value::Null);
    let ev = q2.event("SHUTDOWN");
    assert_eq!(ev["data"]["reason"], json!("host-qmp-quit"), "{ev}");
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert!(!sock.exists(), "QMP socket left behind");
    assert!(
        !rt.instance_dir("qmp-test").exists(),
        "runtime directory left behind"
    );
}

/// Start a spinning VM named `name` whose monitor (`mode`) serves a listening socket this test
/// bound in `dir` and passed as fd 3; returns the VM and the path to connect to, once.
fn start_with_passed_monitor(rt: &Runtime, dir: &Path, mode: &str, name: &str) -> (Vmm, PathBuf) {
    let path = dir.join(format!("{mode}.sock"));
    let listener = UnixListener::bind(&path).unwrap();
    let mon = format!("chardev=mon,mode={mode}");
    let mut cmd = rt.command(&[
        "--kernel",
        env!("TINY_GUEST_SPIN"),
        "--chardev",
        "socket,fd=3,server=on,wait=off,id=mon",
        "--mon",
        &mon,
        "--name",
        name,
    ]);
    inherit_as_fd3(&mut cmd, listener.as_raw_fd());
    let vm = Vmm::spawn(cmd);
    // The child has its copy; ours would keep the socket open after minivmm exits.
    drop(listener);
    (vm, path)
}

/// The management-tool way: listen first, pass the fd, connect once. No retry loop: the
/// connection is queued on the listener before minivmm even runs its event loop.
#[test]
fn qmp_on_an_inherited_listening_socket() {
    require_kvm();
    let rt = Runtime::new();
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, path) = start_with_passed_monitor(&rt, dir.path(), "control", "inherited");
    let stream = UnixStream::connect(&path).expect("the listener queues the connection");
    let (mut q, greeting) = Qmp::on(stream);
    assert!(greeting["QMP"]["version"]["qemu"]["major"].is_u64());
    q.ok("qmp_capabilities", Value::Null);
    vm.wait_for(SPINNING, TIMEOUT);
    assert_eq!(
        q.ok("query-status", Value::Null)["status"],
        json!("running")
    );
    let chardevs = q.ok("query-chardev", Value::Null);
    let mon = chardevs
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["label"] == json!("mon"))
        .unwrap_or_else(|| panic!("no 'mon' in {chardevs}"));
    assert_eq!(mon["frontend-open"], json!(true), "{mon}");
    q.ok("stop", Value::Null);
    q.event("STOP");
    q.ok("cont", Value::Null);
    q.event("RESUME");
    q.ok("quit", Value::Null);
    q.event("SHUTDOWN");
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    assert!(!rt.instance_dir("inherited").exists());
}

/// Read from `s` until `marker` shows up; returns everything read.
fn read_until(s: &mut UnixStream, marker: &str) -> String {
    let deadline = Instant::now() + TIMEOUT;
    let mut got = Vec::new();
    while !text(&got).contains(marker) {
        assert!(
            Instant::now() < deadline,
            "no {marker:?} in {:?}",
            text(&got)
        );
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(0) => panic!("closed before {marker:?}: {:?}", text(&got)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read: {e}; so far {:?}", text(&got)),
        }
    }
    text(&got)
}

#[test]
fn human_monitor_on_a_chardev_answers() {
    require_kvm();
    let rt = Runtime::new();
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, path) = start_with_passed_monitor(&rt, dir.path(), "readline", "hmp");
    vm.wait_for(SPINNING, TIMEOUT);
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let banner = read_until(&mut s, "(minivmm) ");
    assert!(banner.contains("monitor - type 'help'"), "{banner:?}");
    s.write_all(b"info status\r").unwrap();
    let out = read_until(&mut s, "VM status: running\r\n(minivmm) ");
    assert!(out.starts_with("info status\r\n"), "{out:?}");
    s.write_all(b"stop\rinfo status\r").unwrap();
    read_until(&mut s, "VM status: paused\r\n(minivmm) ");
    s.write_all(b"quit\r").unwrap();
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
}

/// An `instance.json` for a process that is gone, as a crashed minivmm leaves it.
fn fake_stale_instance(root: &Path, name: &str) {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let dir = root.join(name);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .unwrap();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let info = json!({"pid": pid, "name": name, "uuid": "11111111-2222-4333-8444-555555555555",
                      "start_time": 0, "qmp": dir.join("qmp.sock")});
    std::fs::write(dir.join("instance.json"), info.to_string()).unwrap();
}

#[test]
fn list_and_qmp_subcommands_find_running_instances() {
    require_kvm();
    let rt = Runtime::new();
    fake_stale_instance(&rt.root, "crashed");
    let mut vm = rt.start(&[
        "--kernel",
        env!("TINY_GUEST_SPIN"),
        "--name",
        "web1",
        "--uuid",
        "6a1f0e52-0bb5-4bd6-9f51-0a8a7f4b3c21",
    ]);
    vm.wait_for(SPINNING, TIMEOUT);
    let dir = rt.instance_dir("web1");
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "runtime directory mode {mode:o}");
    assert!(dir.join("qmp.sock").exists());

    let out = rt.run(&["list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(rows[0].starts_with("NAME"), "{table}");
    assert!(rows[1].starts_with("web1 "), "{table}");
    assert!(rows[1].contains(&vm.pid().to_string()), "{table}");
    assert!(
        rows[1].contains("6a1f0e52-0bb5-4bd6-9f51-0a8a7f4b3c21"),
        "{table}"
    );
    assert!(
        !rt.instance_dir("crashed").exists(),
        "list left the stale instance"
    );

    let out = rt.run(&["qmp", "web1", "query-status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["status"], json!("running"), "{status}");
    // One connection after another: each is served.
    for _ in 0..3 {
        let out = rt.run(&["qmp", "web1", "query-uuid"]);
        let uuid: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(uuid["UUID"], json!("6a1f0e52-0bb5-4bd6-9f51-0a8a7f4b3c21"));
    }
    let out = rt.run(&["qmp", "web1", "chardev-remove", r#"{"id": "nope"}"#]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim_end(),
        "minivmm: chardev-remove: GenericError: Chardev 'nope' not found"
    );
    let out = rt.run(&["qmp", "nobody", "query-status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no running instance named 'nobody'"));

    // SIGTERM: the VM stops and its runtime directory goes with it.
    // SAFETY: kill(2) on the pid of our own child process.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) }, 0);
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(128 + libc::SIGTERM));
    assert!(!dir.exists(), "runtime directory left after SIGTERM");
    let table = text(&rt.run(&["list"]).stdout);
    assert_eq!(table.lines().count(), 1, "{table}");
}

#[test]
fn name_and_uuid_clashes_are_refused() {
    require_kvm();
    let rt = Runtime::new();
    let uuid = "0e0c8a36-63e4-4b4a-8a0e-6f3d8f0c9b11";
    let mut vm = rt.start(&[
        "--kernel",
        env!("TINY_GUEST_SPIN"),
        "--name",
        "db",
        "--uuid",
        uuid,
    ]);
    vm.wait_for(SPINNING, TIMEOUT);
    let spin = env!("TINY_GUEST_SPIN");
    let out = rt.run(&["--kernel", spin, "--name", "db"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim_end(),
        format!(
            "minivmm: --name: an instance named 'db' is already running (pid {})",
            vm.pid()
        )
    );
    let out = rt.run(&["--kernel", spin, "--name", "db2", "--uuid", uuid]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "minivmm: --uuid: uuid {uuid} is already used by instance 'db'"
        )),
        "{err}"
    );
    // The refused ones left nothing behind, and the first runs on.
    assert!(!rt.instance_dir("db2").exists());
    let st = rt.run(&["qmp", "db", "query-status"]);
    assert!(st.status.success(), "{}", text(&st.stderr));
}

#[test]
fn runtime_directory_with_wrong_mode_or_owner_is_refused() {
    let rt = Runtime::new();
    let spin = env!("TINY_GUEST_SPIN");
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&rt.root)
        .unwrap();
    std::fs::set_permissions(&rt.root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = rt.run(&["--kernel", spin, "--name", "a"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(
        err.trim_end(),
        format!(
            "minivmm: runtime directory: '{}' has mode 0755, expected 0700: refusing to use it",
            rt.root.display()
        )
    );
    // An instance directory someone loosened is refused too, and left as it is.
    std::fs::set_permissions(&rt.root, std::fs::Permissions::from_mode(0o700)).unwrap();
    let loose = rt.instance_dir("b");
    std::fs::DirBuilder::new()
        .mode(0o777)
        .create(&loose)
        .unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = rt.run(&["--kernel", spin, "--name", "b"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("has mode 0777, expected 0700"),
        "{}",
        text(&out.stderr)
    );
    assert!(loose.exists());
    // Another user's directory: only root can make one to test with.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let nobody = 65534;
        let theirs = rt.instance_dir("c");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&theirs)
            .unwrap();
        std::os::unix::fs::chown(&theirs, Some(nobody), Some(nobody)).unwrap();
        let out = rt.run(&["--kernel", spin, "--name", "c"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            text(&out.stderr).contains(&format!("is owned by uid {nobody}, not by uid 0")),
            "{}",
            text(&out.stderr)
        );
    }
}

/// `tests/qmp_client.py`: QEMU's own Python QMP library (`qemu.qmp`, installed in
/// `build/pyenv` by `make pyenv`) drives minivmm unchanged.
#[test]
fn qemu_qmp_python_library_drives_minivmm() {
    require_kvm();
    let python = std::env::var_os("MINIVMM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("build/pyenv/bin/python"));
    assert!(
        python.exists(),
        "{} missing: run `make pyenv` (make test does) to install qemu.qmp",
        python.display()
    );
    let rt = Runtime::new();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("py.qmp");
    let mut vm = rt.start(&[
        "--kernel",
        env!("TINY_GUEST_SPIN"),
        "--monitor",
        sock.to_str().unwrap(),
        "--device",
        "virtio-serial,id=vser0",
        "--name",
        "py",
    ]);
    vm.wait_for(SPINNING, TIMEOUT);
    let script = workspace_root().join("tests/qmp_client.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(&sock)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "qmp_client.py failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("qmp_client: all checks passed"));
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
}

//! The QMP monitor of a running VM (`--monitor PATH`), driven the way management tools do:
//! a plain JSON-lines client on the unix socket, against a tiny guest that spins so that only
//! the monitor changes its state.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::{require_kvm, Vmm};

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &std::path::Path) -> (Qmp, Value) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "connect {}: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            events: Vec::new(),
        };
        let greeting = q.read();
        (q, greeting)
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read QMP");
        assert!(n > 0, "QMP connection closed");
        assert!(line.ends_with("\r\n"), "QMP lines end with CRLF: {line:?}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
    }

    fn send_raw(&mut self, raw: &str) -> Value {
        self.writer.write_all(raw.as_bytes()).unwrap();
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    fn cmd(&mut self, execute: &str, arguments: Value) -> Value {
        let mut msg = json!({ "execute": execute, "id": execute });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let reply = self.send_raw(&format!("{msg}\n"));
        assert_eq!(reply["id"], json!(execute), "{reply}");
        reply
    }

    fn ok(&mut self, execute: &str, arguments: Value) -> Value {
        let reply = self.cmd(execute, arguments);
        assert!(reply.get("return").is_some(), "{execute}: {reply}");
        reply["return"].clone()
    }

    fn event(&mut self, name: &str) -> Value {
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == json!(name)) {
                return self.events.remove(i);
            }
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }
}

#[test]
fn qmp_drives_a_running_vm() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.qmp");
    let mut vm = Vmm::start(&[
        "--kernel",
        env!("TINY_GUEST_SPIN"),
        "--monitor",
        sock.to_str().unwrap(),
        "--chardev",
        "ringbuf,id=rb0,size=1024",
        "--name",
        "qmp-test",
    ]);
    vm.wait_for("spinning until a signal", Duration::from_secs(30));
    let (mut q, greeting) = Qmp::connect(&sock);
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
}

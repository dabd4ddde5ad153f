//! Writes the generated seed files of `corpus/` (`seed-*`): real inputs of each target, such
//! as a vproxy conversation as one engine sends it, QMP sessions, a guest driver's first
//! steps, valid option strings. Run from `fuzz/`: `cargo run --example seeds`. Files a
//! campaign added by hand (minimized crashes, `crash-*`) are left alone.

use std::path::Path;
use std::time::{Duration, Instant};

use monitor::commands::COMMANDS;
use vproxy::wire::{encode, Frame, FrameType, FLAG_OPENER};
use vproxy::{Engine, EngineConfig, EngineEvent};

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(format!("seed-{name}")), data).expect("seed file");
}

/// The chunk-size byte, then the bytes.
fn chunked(split: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![split];
    v.extend_from_slice(bytes);
    v
}

fn vproxy_seeds() {
    // A conversation: engine A opens a stream, sends, half-closes; what A sends B is the seed.
    let mut now = Instant::now();
    let config = EngineConfig::default();
    let mut a = Engine::new(config.clone(), 0x1111, now);
    let mut b = Engine::new(config, 0x2222, now);
    let mut a_to_b = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut opened = None;
    for round in 0..12 {
        if round == 2 {
            opened = a.open("web").ok();
        }
        if let (Some(id), 3) = (opened, round) {
            a.send(id, b"GET / HTTP/1.0\r\n\r\n");
        }
        if let (Some(id), 5) = (opened, round) {
            a.shutdown(id);
        }
        loop {
            let n = a.transmit(&mut buf);
            if n == 0 {
                break;
            }
            a_to_b.extend_from_slice(&buf[..n]);
            b.receive(&buf[..n], now);
        }
        while let Some(ev) = b.poll_event() {
            if let EngineEvent::OpenRequest { id, .. } = ev {
                b.accept(id);
                b.send(id, b"HTTP/1.0 200 OK\r\n\r\nhello");
                b.shutdown(id);
            }
        }
        loop {
            let n = b.transmit(&mut buf);
            if n == 0 {
                break;
            }
            a.receive(&buf[..n], now);
        }
        while a.poll_event().is_some() {}
        now += Duration::from_millis(300);
        a.handle_timeout(now);
        b.handle_timeout(now);
    }
    write(
        "vproxy_decode",
        "conversation-whole",
        &chunked(255, &a_to_b),
    );
    write(
        "vproxy_decode",
        "conversation-chunks-7",
        &chunked(7, &a_to_b),
    );
    // Frames one by one.
    let frames = [
        Frame::new(FrameType::Ping, 0, 0, 42),
        Frame::new(FrameType::Pong, 0, 0, 42),
        Frame::new(FrameType::Open, FLAG_OPENER, 1, 0).with_payload(b"web".to_vec()),
        Frame::new(FrameType::OpenOk, 0, 1, 0),
        Frame::new(FrameType::OpenFail, 0, 3, 0).with_payload(b"no such service".to_vec()),
        Frame::new(FrameType::Data, 0, 1, 0).with_payload(vec![0x55; 300]),
        Frame::new(FrameType::Eof, 0, 1, 300),
        Frame::new(FrameType::Reset, 0, 1, 0).with_payload(b"reset".to_vec()),
        Frame::new(FrameType::Credit, 0, 1, 4096),
        Frame::new(FrameType::Ack, 0, 0, 7).with_payload(vec![1, 0, 0, 0, 3, 0, 0, 0]),
    ];
    let mut all = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let mut one = Vec::new();
        let mut f = f.clone();
        f.seq = i as u32 + 1;
        encode(&f, &mut one);
        write(
            "vproxy_decode",
            &format!("frame-{:?}", f.kind).to_lowercase(),
            &chunked(64, &one),
        );
        all.extend_from_slice(&one);
    }
    write("vproxy_decode", "frames-all", &chunked(255, &all));
    let mut bad = all.clone();
    bad[30] ^= 0x40;
    write("vproxy_decode", "frames-corrupted", &chunked(13, &bad));
    write("vproxy_decode", "garbage-then-frames", &{
        let mut v = vec![200u8];
        v.extend_from_slice(b"\xa7\x5c\x17garbage\xa7");
        v.extend_from_slice(&all);
        v
    });
}

/// virtio-console: op codes of the target (see src/virtio_console.rs).
fn mem_write(out: &mut Vec<u8>, addr: u32, bytes: &[u8]) {
    out.push(0);
    out.extend_from_slice(&addr.to_le_bytes()[..3]);
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Vec<u8> {
    let mut d = addr.to_le_bytes().to_vec();
    d.extend_from_slice(&len.to_le_bytes());
    d.extend_from_slice(&flags.to_le_bytes());
    d.extend_from_slice(&next.to_le_bytes());
    d
}

fn reg_write32(out: &mut Vec<u8>, off: u16, value: u32) {
    out.push(17); // 17 % 5 == 2 (register write), (17 >> 3) % 4 == 2 (4 bytes)
    out.extend_from_slice(&off.to_le_bytes());
    out.extend_from_slice(&value.to_le_bytes());
}

fn virtio_console_seeds() {
    const RING_BASE: u32 = 0x1_0000;
    const STRIDE: u32 = 0x2000;
    // Queue q's descriptor 0 and avail ring entry 0 (avail idx 1), then a notify and service.
    let chain = |out: &mut Vec<u8>, q: u32, buf: u32, data: &[u8], writable: bool| {
        let base = RING_BASE + q * STRIDE;
        mem_write(out, buf, data);
        mem_write(
            out,
            base,
            &desc(
                u64::from(buf),
                data.len() as u32,
                if writable { 2 } else { 0 },
                0,
            ),
        );
        mem_write(out, base + 0x800, &[0, 0, 1, 0, 0, 0]);
        reg_write32(out, 0x50, q);
        out.push(4);
    };
    let mut v = Vec::new();
    chain(&mut v, 1, 0x8_0000, b"hello from the guest\n", false);
    write("virtio_console", "port0-transmit", &v);
    let mut v = Vec::new();
    // DEVICE_READY, then PORT_READY for port 0 and port 1, on the control transmit queue.
    chain(&mut v, 3, 0x8_0000, &[0, 0, 0, 0, 0, 0, 1, 0], false);
    write("virtio_console", "control-device-ready", &v);
    let mut v = Vec::new();
    chain(&mut v, 0, 0x8_0000, &[0; 64], true);
    chain(&mut v, 2, 0x8_1000, &[0; 64], true);
    write("virtio_console", "receive-buffers", &v);
    let mut v = Vec::new();
    reg_write32(&mut v, 0x70, 0); // status 0: reset
    v.push(0x81); // service with the driver starting over
    chain(&mut v, 1, 0x8_0000, b"again\n", false);
    write("virtio_console", "reset-and-restart", &v);
    let mut v = Vec::new();
    for off in [0x00u16, 0x04, 0x08, 0x10, 0x34, 0x60, 0x70, 0xfc, 0x100] {
        v.push(3 + 5 * 3); // 18: read, (18 >> 3) % 4 == 2 (4 bytes)
        v.extend_from_slice(&off.to_le_bytes());
    }
    write("virtio_console", "register-reads", &v);
}

fn uart_seeds() {
    let w = |reg: u8, val: u8| [reg << 3, val];
    let mut init = vec![0u8];
    for (reg, val) in [
        (3, 0x80),
        (0, 1),
        (1, 0),
        (3, 0x03),
        (2, 0xc7),
        (1, 0x0f),
        (4, 0x0b),
    ] {
        init.extend_from_slice(&w(reg, val));
    }
    write("uart", "init-8n1", &init);
    let mut v = init.clone();
    v.extend_from_slice(&[2, 5]);
    v.extend_from_slice(b"hello");
    for _ in 0..6 {
        v.extend_from_slice(&[0x29, 0x11, 0x01]); // read LSR, IIR, RBR
    }
    write("uart", "receive-and-read", &v);
    let mut v = init.clone();
    v[0] = 1; // paced
    for b in b"out\r\n" {
        v.extend_from_slice(&w(0, *b));
    }
    v.extend_from_slice(&[3, 2, 4, 10, 3, 255, 4, 255, 3, 255]);
    write("uart", "paced-transmit", &v);
    let mut v = init;
    v.extend_from_slice(&[5, 6, 0x1f, 0x31, 7, 0x87, 6, 0, 0x31]); // break, modem, MSR, reset
    write("uart", "break-modem-reset", &v);
    let mut v = vec![2u8];
    v.extend_from_slice(&w(4, 0x10)); // loopback
    v.extend_from_slice(&w(0, b'x'));
    v.extend_from_slice(&[4, 1, 0x29, 0x01]);
    write("uart", "loopback-slow-clock", &v);
}

fn qmp_session_seeds() {
    let session = |split: u8, text: &str| chunked(split, text.as_bytes());
    write(
        "qmp_session",
        "negotiate-and-query",
        &session(
            255,
            "{\"execute\": \"qmp_capabilities\"}\r\n{\"execute\": \"query-status\", \"id\": 1}\r\n",
        ),
    );
    write(
        "qmp_session",
        "before-negotiation",
        &session(5, "{\"execute\": \"query-version\"}\n{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"oob\"]}}"),
    );
    write(
        "qmp_session",
        "malformed",
        &session(
            3,
            "{\"execute\": }\n[1,2\n\"x\n{\"exec-oob\": \"x\"}\n{\"execute\": 1}\n{}\n",
        ),
    );
    write(
        "qmp_session",
        "nesting-and-escapes",
        &session(
            17,
            "{\"execute\": \"a\\u00e9\\ud83d\\ude00\", \"arguments\": {\"x\": [[[[{\"y\": -1.5e300}]]]], \"z\": null}, \"id\": [1, {\"k\": true}]}\n",
        ),
    );
    write(
        "qmp_session",
        "hmp-line-editing",
        &session(1, "info status\r\x1b[A\x1b[D\x7fx\x15quit\r\n\x03"),
    );
    write(
        "qmp_session",
        "single-quotes-and-bare",
        &session(
            9,
            "{'execute': 'qmp_capabilities'}\n  \t{\"execute\":\"x\"}garbage{\"a\":1}",
        ),
    );
}

fn header(op: u16, src_port: u32, dst_port: u32, len: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&3u64.to_le_bytes()); // src_cid
    h.extend_from_slice(&2u64.to_le_bytes()); // dst_cid
    h.extend_from_slice(&src_port.to_le_bytes());
    h.extend_from_slice(&dst_port.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes()); // stream
    h.extend_from_slice(&op.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes()); // flags
    h.extend_from_slice(&65536u32.to_le_bytes()); // buf_alloc
    h.extend_from_slice(&0u32.to_le_bytes()); // fwd_cnt
    h
}

fn vsock_seeds() {
    // A transmit packet: op 3 (73: host ports from HOST_PORT_FIRST; 3: ports 0..4).
    let packet = |out: &mut Vec<u8>, code: u8, op: u16, payload: &[u8]| {
        out.push(code);
        out.extend_from_slice(&header(op, 1, 1, payload.len() as u32));
        out.extend_from_slice(&[payload.len() as u8, 10, 30]);
        out.extend_from_slice(payload);
    };
    let rx = |out: &mut Vec<u8>| out.extend_from_slice(&[104, 0x00, 0x10]); // 4 receive buffers
    let mut v = Vec::new();
    rx(&mut v);
    v.push(16); // a host service listens at PATH_1
    packet(&mut v, 0x03, 0, &[]); // REQUEST (1 + 0 % 7)
    v.push(9);
    packet(&mut v, 0x03, 4, b"ping"); // RW
    v.push(17); // time passes
    packet(&mut v, 0x03, 3, &[]); // SHUTDOWN
    write("vsock", "guest-connects-to-host-service", &v);
    let mut v = Vec::new();
    rx(&mut v);
    v.push(0x05);
    v.push(5);
    v.extend_from_slice(b"hello");
    v.push(9);
    rx(&mut v);
    v.push(9);
    write("vsock", "host-client-connects", &v);
    let mut v = Vec::new();
    rx(&mut v);
    v.push(0x05);
    v.push(0);
    v.push(9);
    packet(&mut v, 73, 1, &[]); // RESPONSE to the host's connection
    packet(&mut v, 73, 4, b"data to the host client");
    v.push(25); // the client types
    v.push(3);
    v.extend_from_slice(b"abc");
    v.push(9);
    packet(&mut v, 73, 2, &[]); // RST
    write("vsock", "host-connection-then-data", &v);
    let mut v = Vec::new();
    rx(&mut v);
    v.extend_from_slice(&[84, 0x00, 0x01]); // event buffers
    v.push(8); // transport reset
    v.push(0xf7); // a long time passes
    v.push(18); // the driver starts over
    write("vsock", "reset-and-restart", &v);
}

fn chardev_spec_seeds() {
    let specs = [
        "socket,id=mon0,path=/tmp/mon.sock,server=on,wait=off",
        "socket,id=s1,host=127.0.0.1,port=4444,server=on,wait=off,nodelay=on",
        "socket,id=c2,host=::1,port=5555,reconnect-ms=500,backlog=4096",
        "file,id=f1,path=/tmp/out,,log,append=on,input-path=/tmp/in",
        "stdio,id=con,signal=off,mux=on,logfile=/tmp/log,logappend=on",
        "pty,id=p1,path=/tmp/pty-link",
        "ringbuf,id=rb,size=64K",
        "memory,id=m,size=1M",
        "udp,id=u1,host=127.0.0.1,port=6000,localaddr=0.0.0.0,localport=6001",
        "pipe,id=pp,path=/tmp/fifo",
        "serial,id=t,path=/dev/ttyS0",
        "mux,id=x,chardev=con",
        "null,id=n",
        "vproxy,id=vp0,chardev=ch1,oforward=web:8080,iforward=db:127.0.0.1:5432,rate=10M,window=64K,max-streams=100",
        "vproxy,id=vp1,path=/tmp/vp.sock,oforward=ssh:0.0.0.0:2222,oforward=x:unix:/tmp/x",
        // --serial forms.
        "mon:stdio",
        "tcp::4444,server=on,wait=off",
        "tcp:[::1]:4444,server,nowait",
        "unix:/tmp/s.sock,server=on",
        "udp:127.0.0.1:5000@:5001",
        "chardev:con",
        "file:/tmp/serial.log",
        "/dev/ttyUSB0",
        "none",
        // --device / device_add forms.
        "virtserialport,id=p1,name=org.x,,y,chardev=c1,bus=vser0.0,nr=2",
        "driver=virtconsole,chardev=con,nr=0x10",
        "isa-serial,chardev=s1,index=1,iobase=0x2f8,irq=3,pacing=on",
        "virtio-serial,id=vser1,max_ports=4",
        // --mon forms.
        "chardev=mon0,mode=control,pretty=on",
        // forwards.
        "web:[::1]:8080",
        "db:unix:/run/db.sock",
    ];
    for (i, s) in specs.iter().enumerate() {
        write("chardev_spec", &format!("{i:02}"), s.as_bytes());
    }
}

fn qmp_args_seeds() {
    let index = |name: &str| COMMANDS.iter().position(|c| *c == name).expect(name) as u8;
    // The raw JSON form: command byte, 0xc0 | id bit, length byte, text.
    let raw = |out: &mut Vec<u8>, name: &str, args: &str| {
        assert!(args.len() < 256, "{args}");
        out.extend_from_slice(&[index(name), 0xc1, args.len() as u8]);
        out.extend_from_slice(args.as_bytes());
    };
    let sessions: &[(&str, &[(&str, &str)])] = &[
        (
            "lifecycle",
            &[
                ("query-status", "{}"),
                ("stop", "{}"),
                ("cont", "{}"),
                ("query-name", "{}"),
                ("query-version", "{\"x\": 1}"),
                ("quit", "{}"),
                ("cont", "{}"),
            ],
        ),
        (
            "ringbuf",
            &[
                ("ringbuf-write", "{\"device\": \"r0\", \"data\": \"hello\"}"),
                ("ringbuf-write", "{\"device\": \"r0\", \"data\": \"aGk=\", \"format\": \"base64\"}"),
                ("ringbuf-read", "{\"device\": \"r0\", \"size\": 3, \"format\": \"utf8\"}"),
                ("ringbuf-read", "{\"device\": \"r0\", \"size\": 100, \"format\": \"base64\"}"),
                ("ringbuf-read", "{\"device\": \"n0\", \"size\": 0}"),
            ],
        ),
        (
            "chardevs",
            &[
                ("chardev-add", "{\"id\": \"c1\", \"backend\": {\"type\": \"ringbuf\", \"data\": {\"size\": 4096}}}"),
                ("chardev-add", "{\"id\": \"c2\", \"backend\": {\"type\": \"socket\", \"data\": {\"addr\": {\"type\": \"unix\", \"data\": {\"path\": \"/tmp/x\"}}, \"server\": true}}}"),
                ("chardev-add", "{\"id\": \"c3\", \"backend\": {\"type\": \"udp\", \"data\": {\"remote\": {\"type\": \"inet\", \"host\": \"127.0.0.1\", \"port\": \"5000\"}}}}"),
                ("chardev-add", "{\"id\": \"mx\", \"backend\": {\"type\": \"mux\", \"data\": {\"chardev\": \"c2\"}}}"),
                ("query-chardev", "{}"),
                ("chardev-change", "{\"id\": \"c1\", \"backend\": {\"type\": \"null\"}}"),
                ("chardev-send-break", "{\"id\": \"c1\"}"),
                ("chardev-remove", "{\"id\": \"c1\"}"),
                ("query-chardev-backends", "{}"),
            ],
        ),
        (
            "devices",
            &[
                ("device_add", "{\"driver\": \"virtserialport\", \"id\": \"p1\", \"chardev\": \"r0\", \"name\": \"org.x\", \"nr\": 2}"),
                ("device_add", "{\"driver\": \"virtconsole\", \"id\": \"p2\", \"chardev\": \"n0\", \"bus\": \"vser0.0\"}"),
                ("query-virtio-serial", "{}"),
                ("device_del", "{\"id\": \"p1\"}"),
                ("device_del", "{\"id\": \"p1\"}"),
                ("device_add", "{\"driver\": \"e1000\"}"),
            ],
        ),
        (
            "hmp",
            &[
                ("human-monitor-command", "{\"command-line\": \"info chardev\"}"),
                ("human-monitor-command", "{\"command-line\": \"chardev-add ringbuf,id=h1\", \"cpu-index\": 0}"),
                ("human-monitor-command", "{\"command-line\": \"ringbuf_write h1 abc\"}"),
                ("human-monitor-command", "{\"command-line\": \"ringbuf_read h1 2\"}"),
                ("human-monitor-command", "{\"command-line\": \"device_add virtconsole,id=q,chardev=h1\"}"),
                ("human-monitor-command", "{\"command-line\": \"info ports\"}"),
                ("human-monitor-command", "{\"command-line\": \"help\"}"),
            ],
        ),
        (
            "fds-and-vproxy",
            &[
                ("getfd", "{\"fdname\": \"f1\"}"),
                ("closefd", "{\"fdname\": \"f1\"}"),
                ("vproxy-forward-add", "{\"id\": \"r0\", \"direction\": \"out\", \"forward\": \"web:8080\"}"),
                ("vproxy-forward-add", "{\"id\": \"vp\", \"direction\": \"in\", \"forward\": \"db:127.0.0.1:5432\"}"),
                ("vproxy-forward-remove", "{\"id\": \"vp\", \"direction\": \"in\", \"name\": \"db\"}"),
                ("query-vproxy", "{}"),
                ("query-vproxy", "{\"id\": \"r0\"}"),
            ],
        ),
        (
            "wrong-types",
            &[
                ("ringbuf-write", "{\"device\": 1, \"data\": \"x\"}"),
                ("ringbuf-read", "{\"device\": \"r0\", \"size\": 1.5}"),
                ("chardev-add", "{\"id\": \"c\", \"backend\": []}"),
                ("chardev-add", "{\"id\": \"c\", \"backend\": {\"type\": \"socket\", \"data\": {\"addr\": {\"type\": \"inet\", \"data\": {\"host\": \"h\", \"port\": []}}}}}"),
                ("device_add", "{\"driver\": \"virtconsole\", \"nr\": {\"a\": 1}}"),
                ("vproxy-forward-add", "{\"id\": \"r0\", \"direction\": \"sideways\", \"forward\": \"x\"}"),
            ],
        ),
    ];
    for (name, commands) in sessions {
        let mut v = Vec::new();
        for (cmd, args) in commands.iter() {
            raw(&mut v, cmd, args);
        }
        write("qmp_args", name, &v);
    }
    // The structured form: command byte, how byte (no 0xc0), an object of decoded members.
    // ringbuf-write {device: "r0" (word 1), data: raw "abc"}.
    let mut v = vec![index("ringbuf-write"), 0x00, 2, 4, 6, 1, 3, 7, 0xc0, 3];
    v.extend_from_slice(b"abc");
    write("qmp_args", "structured-ringbuf-write", &v);
    // chardev-add {id: "c1", backend: {type: "ringbuf"}}.
    let v = vec![index("chardev-add"), 0x01, 2, 0, 6, 4, 1, 9, 1, 2, 6, 12];
    write("qmp_args", "structured-chardev-add", &v);
    // An unknown command name, then every known one with no arguments.
    let mut v = vec![0xf8, 0xc0, 4];
    v.extend_from_slice(b"nope");
    v.extend_from_slice(&[0, 0]);
    for i in 0..COMMANDS.len() as u8 {
        v.extend_from_slice(&[i, 0, 0]);
    }
    write("qmp_args", "every-command-empty", &v);
}

fn main() {
    vproxy_seeds();
    virtio_console_seeds();
    uart_seeds();
    qmp_session_seeds();
    vsock_seeds();
    chardev_spec_seeds();
    qmp_args_seeds();
}

//! `minivmm-vp`: the vproxy endpoint. Inside a guest it runs on the virtio port (or serial
//! line) that the host's `vproxy` chardev is attached to; on a host it runs against a chardev
//! socket, so two of them connected by a socket are a complete system.
//!
//! ```text
//! minivmm-vp --channel SPEC [--iforward NAME:HOST:PORT]... [--oforward NAME:[BIND:]PORT]... [-v]
//! minivmm-vp vsock-cat [--tee FD] listen PORT | vsock-cat [--tee FD] connect CID PORT
//! ```
//!
//! `vsock-cat` joins stdin and stdout to one AF_VSOCK stream (`vproxy::vsock_cat`).
//!
//! This file only parses arguments and sets up logging; the loop is
//! `vproxy::agent::run`. Bad arguments exit 2 with a one-line message.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use vproxy::agent::{self, AgentConfig, ChannelSpec};
use vproxy::forward::{parse_iforward, parse_oforward};
use vproxy::VproxySpec;

/// Exit status for bad arguments.
const EXIT_USAGE: u8 = 2;
/// Exit status for a failure after the arguments were accepted.
const EXIT_FAILURE: u8 = 1;

const USAGE: &str = "\
usage: minivmm-vp --channel SPEC [--iforward NAME:HOST:PORT]... [--oforward NAME:[BIND:]PORT]...
                  [--rate BYTES_PER_S] [--window SIZE] [--max-streams N] [-v]
       minivmm-vp vsock-cat [--tee FD] listen PORT | vsock-cat [--tee FD] connect CID PORT
                  stdin and stdout joined to one AF_VSOCK stream (the host is CID 2);
                  --tee FD: what the stream brings goes to fd FD too

  --channel SPEC   the channel to the other end:
                     PATH                   a char device, e.g. /dev/virtio-ports/org.minivmm.vproxy
                     tty:PATH[,speed=N]     a serial tty, set raw at N bit/s (default 115200)
                     unix:PATH | tcp:HOST:PORT   a socket to connect to (reconnects)
  --iforward NAME:HOST:PORT | NAME:unix:PATH
                   let the other end open service NAME, connected here to HOST:PORT
  --oforward NAME:[BIND:]PORT | NAME:unix:PATH
                   listen here (BIND defaults to 127.0.0.1) and carry each connection to
                   the other end's service NAME
  --rate N         the channel's speed in bytes per second: the first frames' size until
                   the channel is measured (as the vproxy chardev's rate=; a tty channel's
                   speed sets it by default)
  --window SIZE    a fixed per-stream window, 1K to 16M (as the chardev's window=; by
                   default windows start at 64K and grow with each stream's throughput)
  --max-streams N  most streams at once, 1 to 65536 (as the chardev's max-streams=;
                   default 16384); the peer's OPENs beyond it are refused
  -v, --verbose    more messages (twice: debug)
  -h, --help       this help";

/// A one-line stderr logger (the crate has no logger dependency of its own).
struct StderrLogger(log::LevelFilter);

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= self.0
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let level = record.level().as_str().to_ascii_lowercase();
            let _ = writeln!(std::io::stderr(), "minivmm-vp: {level}: {}", record.args());
        }
    }
    fn flush(&self) {}
}

/// What the command line asked for.
enum Command {
    Help,
    Run(AgentConfig, log::LevelFilter),
}

/// Parse the arguments after the program name.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut channel = None;
    let mut spec = VproxySpec {
        oforwards: Vec::new(),
        iforwards: Vec::new(),
        rate: None,
        window: None,
        max_streams: None,
    };
    let mut verbosity = 0;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("option '{flag}' needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-v" | "--verbose" => verbosity += 1,
            "-vv" => verbosity += 2,
            "--channel" => {
                if channel.is_some() {
                    return Err("option '--channel' given twice".into());
                }
                channel = Some(ChannelSpec::parse(&value()?).map_err(|e| e.to_string())?);
            }
            "--iforward" | "--oforward" => {
                let v = value()?;
                let (parse, list): (fn(&str) -> _, _) = if flag == "--iforward" {
                    (parse_iforward, &mut spec.iforwards)
                } else {
                    (parse_oforward, &mut spec.oforwards)
                };
                let f = parse(&v).map_err(|e: chardev::SpecError| e.to_string())?;
                if list.iter().any(|g| g.name == f.name) {
                    return Err(format!("{flag} '{}' given twice", f.name));
                }
                list.push(f);
            }
            "--rate" | "--window" | "--max-streams" => {
                // The same syntax and limits as the vproxy chardev's rate=, window= and
                // max-streams=.
                let key = &flag[2..];
                let option = [(key.to_string(), value()?)];
                let v = VproxySpec::from_options("minivmm-vp", &option).map_err(|e| {
                    format!(
                        "option '{flag}': {}",
                        e.to_string().replace("chardev 'minivmm-vp': ", "")
                    )
                })?;
                spec.rate = v.rate.or(spec.rate);
                spec.window = v.window.or(spec.window);
                spec.max_streams = v.max_streams.or(spec.max_streams);
            }
            other => return Err(format!("unknown argument '{}'", other.escape_debug())),
        }
    }
    let channel = channel.ok_or("missing option '--channel'")?;
    let level = match verbosity {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    Ok(Command::Run(
        AgentConfig {
            channel,
            vproxy: spec,
        },
        level,
    ))
}

/// `minivmm-vp vsock-cat ...`.
fn vsock_cat(args: &[String]) -> ExitCode {
    let cat = match vproxy::vsock_cat::VsockCat::parse(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("minivmm-vp: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cat.run() {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("minivmm-vp: vsock-cat: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("vsock-cat") {
        return vsock_cat(&args[1..]);
    }
    let (config, level) = match parse_args(args) {
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Run(config, level)) => (config, level),
        Err(e) => {
            eprintln!("minivmm-vp: {e} (try --help)");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let logger = Box::leak(Box::new(StderrLogger(level)));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
    let stop = AtomicBool::new(false);
    match agent::run(&config, &stop) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("minivmm-vp: {msg}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn arguments() {
        let Ok(Command::Run(c, level)) = parse(&[
            "--channel",
            "unix:/tmp/vp.sock",
            "--iforward=ssh:127.0.0.1:22",
            "--oforward",
            "web:8080",
            "--rate",
            "11520",
            "--window=4K",
            "--max-streams",
            "20000",
            "-v",
        ]) else {
            panic!("did not parse")
        };
        assert_eq!(c.vproxy.rate, Some(11_520));
        assert_eq!(c.vproxy.window, Some(4096));
        assert_eq!(c.vproxy.max_streams, Some(20_000));
        assert_eq!(c.channel, ChannelSpec::Unix("/tmp/vp.sock".into()));
        assert_eq!(c.vproxy.iforwards[0].to_string(), "ssh:127.0.0.1:22");
        assert_eq!(c.vproxy.oforwards[0].to_string(), "web:127.0.0.1:8080");
        assert_eq!(level, log::LevelFilter::Info);
        assert!(matches!(parse(&["-h"]), Ok(Command::Help)));
    }

    #[test]
    fn bad_arguments_are_one_line() {
        for (args, want) in [
            (&["--oforward", "web:1"][..], "missing option '--channel'"),
            (&["--channel"][..], "option '--channel' needs a value"),
            (&["--channel", "x:y"][..], "bad channel 'x:y'"),
            (
                &["--channel", "/dev/x", "--bogus"][..],
                "unknown argument '--bogus'",
            ),
            (
                &["--channel", "/dev/x", "--iforward", "ssh"][..],
                "bad iforward 'ssh'",
            ),
            (
                &[
                    "--channel",
                    "/dev/x",
                    "--oforward",
                    "a:1",
                    "--oforward",
                    "a:2",
                ][..],
                "--oforward 'a' given twice",
            ),
            (
                &["--channel", "/dev/x", "--rate", "0"][..],
                "option '--rate': bad value '0'",
            ),
            (
                &["--channel", "/dev/x", "--window", "1"][..],
                "option '--window': bad value '1'",
            ),
        ] {
            let Err(e) = parse(args) else {
                panic!("{args:?} parsed")
            };
            assert!(e.starts_with(want), "{args:?}: {e}");
            assert!(!e.contains('\n'));
        }
    }
}

//! The `minivmm` binary: parse the command line, build the VM, run it, and turn how it ended
//! into the process exit status (0 for a guest power-off or reset).

use std::process::ExitCode;

use clap::Parser;
use vmm::cli::Cli;
use vmm::vcpu::VmExit;
use vmm::vm::Vm;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let config = match cli.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("minivmm: {e}");
            return ExitCode::from(2);
        }
    };
    let status = match Vm::new(&config).and_then(Vm::run) {
        Ok(exit) => {
            chardev::restore_terminal();
            if let VmExit::Crash(msg) = &exit {
                eprintln!("minivmm: guest stopped: {msg}");
            }
            exit.status()
        }
        Err(e) => {
            chardev::restore_terminal();
            eprintln!("minivmm: {}", error_chain(&e));
            1
        }
    };
    ExitCode::from(u8::try_from(status).unwrap_or(1))
}

/// "outer: inner: innermost", the way the error chain reads best on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

//! The `minivmm` binary: parse the command line, build the VM, run it, and turn how it ended
//! into the process exit status (0 for a guest power-off, or a reset under `--no-reboot`). When the first argument is
//! `list`, `qmp` or `console`, it acts on running instances instead (`vmm::tools`). First of
//! all it raises its soft open-file limit to the hard one (`vmm::limits`).

use std::process::ExitCode;

use clap::Parser;
use vmm::cli::Cli;
use vmm::error_chain;
use vmm::tools::{ToolCli, SUBCOMMANDS};
use vmm::vcpu::VmExit;
use vmm::vm::{Vm, VmError};

/// Exit status of a failed subcommand.
const TOOL_FAILURE: u8 = 1;
/// Exit status of a rejected command line.
const USAGE_ERROR: u8 = 2;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    raise_open_file_limit();
    // The chardev kinds that live outside the chardev crate.
    vproxy::register();
    let first = std::env::args().nth(1);
    if first.as_deref().is_some_and(|a| SUBCOMMANDS.contains(&a)) {
        let tool = ToolCli::parse();
        return match vmm::tools::run(tool.command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("minivmm: {}", error_chain(&e));
                ExitCode::from(TOOL_FAILURE)
            }
        };
    }
    let cli = Cli::parse();
    let config = match cli.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("minivmm: {e}");
            return ExitCode::from(USAGE_ERROR);
        }
    };
    let status = match Vm::new(&config).and_then(Vm::run) {
        Ok(exit) => {
            chardev::restore_terminal();
            match &exit {
                VmExit::Crash(msg) => eprintln!("minivmm: guest stopped: {msg}"),
                VmExit::ResetFailed(msg) => eprintln!("minivmm: reset failed: {msg}"),
                _ => {}
            }
            exit.status()
        }
        Err(VmError::Signal(sig)) => {
            chardev::restore_terminal();
            VmExit::Signal(sig).status()
        }
        Err(e) => {
            chardev::restore_terminal();
            eprintln!("minivmm: {}", error_chain(&e));
            1
        }
    };
    ExitCode::from(u8::try_from(status).unwrap_or(1))
}

/// Let the VM open as many fds as the hard limit allows (many chardevs and monitor clients);
/// a failure only costs fds, so it is a warning.
fn raise_open_file_limit() {
    match vmm::limits::raise_open_file_limit() {
        Ok(l) => log::debug!(
            "open files: soft limit {} raised to {} (hard {})",
            l.old_soft,
            l.soft,
            l.hard
        ),
        Err(e) => log::warn!("cannot raise the open file limit: {e}"),
    }
}

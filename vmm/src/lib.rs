//! minivmm's VMM: KVM, guest memory, vCPUs, boot, machine layout, ACPI, buses, the event
//! loop and the command line. Devices live in the `devices` crate, backends in `chardev`.

pub mod acpi;
pub mod boot;
pub mod cli;
pub mod cpu;
pub mod device_manager;
pub mod device_spec;
pub mod event_loop;
pub mod irq;
pub mod layout;
pub mod limits;
pub mod machine;
pub mod memory;
pub mod mptable;
pub mod relay;
pub mod reset;
pub mod seccomp;
pub mod serial;
pub mod tools;
pub mod vcpu;
pub mod virtio;
pub mod vm;
pub mod vsock;

/// "outer: inner: innermost", the way an error chain reads best on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

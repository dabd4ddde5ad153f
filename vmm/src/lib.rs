//! minivmm's VMM: KVM, guest memory, vCPUs, boot, machine layout, ACPI, buses, the event
//! loop and the command line. Devices live in the `devices` crate, backends in `chardev`.

pub mod acpi;
pub mod boot;
pub mod cli;
pub mod cpu;
pub mod device_spec;
pub mod event_loop;
pub mod irq;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod serial;
pub mod tools;
pub mod vcpu;
pub mod virtio;
pub mod vm;

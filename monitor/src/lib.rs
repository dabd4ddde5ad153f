//! minivmm's monitor: QMP (QEMU's machine protocol) on unix sockets and chardevs, the human
//! monitor, events, fd passing and runtime-directory instance discovery.
//!
//! The monitor talks to the VM only through the [`Machine`] trait, which the VMM implements;
//! it never sees KVM, a device model or the event loop. Like a chardev backend, every
//! endpoint registers its own fds with the registrar the VMM's event loop gives it
//! ([`Monitor::register`]) and is driven through `on_ready(part, token, ..)`.
//!
//! - [`json`]: QEMU-compatible streaming JSON splitter and writer;
//! - [`protocol`]: the sans-IO QMP session (greeting, negotiation, replies, events);
//! - [`commands`]: the dispatcher of every QMP command;
//! - [`device_spec`]: device options in QEMU's syntax, the one parser of `--device` and of
//!   QMP and HMP `device_add`;
//! - [`hmp`]: the human monitor and its line editor;
//! - [`server`]: the multi-client unix-socket QMP server;
//! - [`chardev_mon`]: a QMP or HMP session on any chardev backend;
//! - [`hub`]: [`Monitor`], all of a VM's monitors behind one object;
//! - [`events`], [`fdstore`]: the event queue and the named-fd store;
//! - [`instance`]: the runtime directory, instance file, listing and stale cleanup;
//! - [`client`]: a small blocking QMP client (`minivmm qmp NAME CMD`);
//! - [`vproxy`]: the vproxy forward commands and `query-vproxy`.
//!
//! This crate depends on `chardev` only among minivmm's crates.

pub mod chardev_mon;
pub mod client;
pub mod commands;
pub mod device_spec;
pub mod events;
pub mod fdstore;
pub mod hmp;
pub mod hub;
pub mod instance;
pub mod json;
pub mod machine;
pub mod protocol;
pub mod server;
mod sys;
#[cfg(any(test, feature = "test-util"))]
pub mod testutil;
pub mod vproxy;

pub use chardev_mon::{ChardevMonitor, MonitorMode};
pub use client::{qmp_command, ClientError, QmpClient};
pub use device_spec::{DeviceDriver, DeviceProps, DeviceSpec, DeviceSpecError};
pub use events::{EventQueue, ShutdownCause};
pub use fdstore::FdStore;
pub use hub::Monitor;
pub use instance::{Instance, InstanceConfig, InstanceError, InstanceInfo};
pub use machine::{Machine, MachineError, PortInfo, RunState, VsockConnection, VsockStatus};
pub use protocol::{ErrorClass, QmpError, QmpEvent};
pub use server::{Limits, QmpServer, ServerError};

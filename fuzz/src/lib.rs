//! The bodies of minivmm's fuzz targets, one function per target, each taking the raw input
//! bytes and panicking on a failure.
//!
//! `fuzz_targets/NAME.rs` hands libFuzzer's inputs to [`NAME`](TARGETS) (nightly, `cargo fuzz`);
//! `tests/replay.rs` runs every file of `corpus/NAME/` through the same function on stable, so
//! the seed corpora (and the minimized inputs of fixed crashes kept there) are regression tests
//! in `make test`.

pub mod chardev_spec;
pub mod guest_ops;
pub mod qmp_args;
pub mod qmp_session;
pub mod uart;
pub mod virtio_console;
pub mod vproxy_decode;
pub mod vsock;

pub use chardev_spec::chardev_spec;
pub use qmp_args::qmp_args;
pub use qmp_session::qmp_session;
pub use uart::uart;
pub use virtio_console::virtio_console;
pub use vproxy_decode::vproxy_decode;
pub use vsock::vsock;

/// A target's body: one input, a panic on failure.
pub type Body = fn(&[u8]);

/// Every target: its name (the binary, the corpus directory) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("vproxy_decode", vproxy_decode),
    ("virtio_console", virtio_console),
    ("uart", uart),
    ("qmp_session", qmp_session),
    ("vsock", vsock),
    ("chardev_spec", chardev_spec),
    ("qmp_args", qmp_args),
];

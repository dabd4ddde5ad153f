//! What a virtio-console port is from the outside: its configuration, its name rules, the
//! errors of adding one, what the monitor is told about it, and the guest open/close events.
//!
//! No I/O and no queue state in here.

use thiserror::Error;

/// Longest port name accepted (the guest reads it from one control buffer).
pub const MAX_NAME_LEN: usize = 255;
/// Highest `max_ports` a device takes (QEMU's limit).
pub const MAX_PORTS_LIMIT: u32 = 511;

/// How a port is configured (`virtconsole` / `virtserialport`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    /// The device id (`id=`), reported in events and to the monitor.
    pub id: String,
    /// The name the guest sees as `/dev/virtio-ports/NAME`.
    pub name: Option<String>,
    /// A console port (hvc) rather than a plain serial port.
    pub console: bool,
    /// The port number (`nr=`); `None` takes the first free one.
    pub nr: Option<u32>,
    /// The id of the chardev behind the port, for the monitor.
    pub chardev: String,
}

/// A port as the monitor reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// Device id.
    pub id: String,
    /// Port number.
    pub nr: u32,
    /// Name, if any.
    pub name: Option<String>,
    /// Chardev id.
    pub chardev: String,
    /// A console port.
    pub console: bool,
    /// The guest has the port open.
    pub guest_open: bool,
    /// The host side has a peer.
    pub host_connected: bool,
    /// Guest output is held because the backend is full.
    pub throttled: bool,
}

/// The guest opened or closed a port (QMP `VSERPORT_CHANGE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleEvent {
    /// The port's device id.
    pub port_id: String,
    /// Opened (true) or closed.
    pub open: bool,
}

/// Errors adding, removing or configuring ports.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConsoleError {
    /// A name the guest could not use.
    #[error("invalid port name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The name is taken.
    #[error("a port already exists by name {0}")]
    NameInUse(String),
    /// The device id is taken.
    #[error("a port already exists with id {0}")]
    IdInUse(String),
    /// The port number is taken.
    #[error("a port already exists at id {0}")]
    NrInUse(u32),
    /// Port number 0 is for a console.
    #[error("port number 0 is reserved for a virtconsole")]
    NrReserved,
    /// The port number is past the device's maximum.
    #[error("out-of-range port id specified, max. allowed: {0}")]
    NrOutOfRange(u32),
    /// No free port number.
    #[error("maximum port limit for this device reached")]
    Full,
    /// `max_ports` outside 1..=511.
    #[error("max_ports {0} is outside 1..=511")]
    MaxPorts(u32),
    /// No port with that id.
    #[error("no port with id {0}")]
    NoSuchPort(String),
}

/// Check a port name: 1 to [`MAX_NAME_LEN`] printable ASCII characters, no whitespace, none of
/// `,` `=` `"` (they break option strings), no `/` and not `.` or `..` (the guest makes a file
/// name of it). Uniqueness is the caller's business.
pub fn validate_port_name(name: &str) -> Result<(), ConsoleError> {
    let bad = |reason| {
        Err(ConsoleError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 255 bytes");
    }
    if name == "." || name == ".." {
        return bad("not a file name");
    }
    for c in name.chars() {
        if c.is_whitespace() {
            return bad("contains whitespace");
        }
        if !c.is_ascii_graphic() {
            return bad("contains a character that is not printable ASCII");
        }
        if matches!(c, ',' | '=' | '"') {
            return bad("contains one of , = \"");
        }
        if c == '/' {
            return bad("contains /");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["org.qemu.guest_agent.0", "a", "vp-1_x:y", &"n".repeat(255)] {
            assert_eq!(validate_port_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "a b",
            "a\tb",
            "a,b",
            "a=b",
            "a\"b",
            "a/b",
            ".",
            "..",
            "caf\u{e9}",
            "a\0b",
            "\x7f",
            &"n".repeat(256),
        ] {
            assert!(
                matches!(
                    validate_port_name(bad),
                    Err(ConsoleError::InvalidName { .. })
                ),
                "{bad:?}"
            );
        }
        let e = validate_port_name("a b").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid port name \"a b\": contains whitespace"
        );
    }
}

//! virtio-console control messages: `struct virtio_console_control { le32 id; le16 event;
//! le16 value; }`, followed by a payload for PORT_NAME (the name and a NUL) and RESIZE.
//!
//! Pure encoding and decoding, no state: [`parse_guest_control`] takes any bytes a guest put
//! in a control transmit buffer and never panics (a fuzz target as it stands).

use thiserror::Error;

/// Bytes of the fixed part of a control message.
pub const CONTROL_MSG_LEN: usize = 8;
/// The port id of messages that concern no port (DEVICE_READY).
pub const VIRTIO_CONSOLE_BAD_ID: u32 = u32::MAX;

/// Guest → host: the driver is ready for control messages (value 1) or failed (0).
pub const VIRTIO_CONSOLE_DEVICE_READY: u16 = 0;
/// Host → guest: a port exists.
pub const VIRTIO_CONSOLE_PORT_ADD: u16 = 1;
/// Host → guest: a port is gone.
pub const VIRTIO_CONSOLE_PORT_REMOVE: u16 = 2;
/// Guest → host: the guest set the port up (value 1) or failed (0).
pub const VIRTIO_CONSOLE_PORT_READY: u16 = 3;
/// Host → guest: the port is a console (hvc).
pub const VIRTIO_CONSOLE_CONSOLE_PORT: u16 = 4;
/// Host → guest: a console port changed size.
pub const VIRTIO_CONSOLE_RESIZE: u16 = 5;
/// Both ways: the port was opened (value 1) or closed (0) on the sender's side.
pub const VIRTIO_CONSOLE_PORT_OPEN: u16 = 6;
/// Host → guest: the port's name follows the header.
pub const VIRTIO_CONSOLE_PORT_NAME: u16 = 7;

/// A control message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlHeader {
    /// Port number.
    pub id: u32,
    /// `VIRTIO_CONSOLE_*` event.
    pub event: u16,
    /// Event argument.
    pub value: u16,
}

impl ControlHeader {
    /// The 8 wire bytes.
    pub fn to_bytes(self) -> [u8; CONTROL_MSG_LEN] {
        let mut b = [0u8; CONTROL_MSG_LEN];
        b[0..4].copy_from_slice(&self.id.to_le_bytes());
        b[4..6].copy_from_slice(&self.event.to_le_bytes());
        b[6..8].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    /// Decode the start of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ControlError> {
        let b: &[u8; CONTROL_MSG_LEN] = bytes
            .get(..CONTROL_MSG_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(ControlError::Short(bytes.len()))?;
        Ok(ControlHeader {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            event: u16::from_le_bytes([b[4], b[5]]),
            value: u16::from_le_bytes([b[6], b[7]]),
        })
    }
}

/// A control message the guest may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestControl {
    /// DEVICE_READY.
    DeviceReady {
        /// Whether the driver initialised.
        ok: bool,
    },
    /// PORT_READY.
    PortReady {
        /// Port number.
        id: u32,
        /// Whether the guest set the port up.
        ok: bool,
    },
    /// PORT_OPEN.
    PortOpen {
        /// Port number.
        id: u32,
        /// Opened (true) or closed.
        open: bool,
    },
}

/// Why a guest control message was not understood.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ControlError {
    /// Fewer bytes than a header.
    #[error("control message of {0} bytes is too short")]
    Short(usize),
    /// An event only the host sends, or no event at all.
    #[error("control event {0} is not one a guest sends")]
    UnexpectedEvent(u16),
}

/// Decode a message from the guest's control transmit queue.
pub fn parse_guest_control(bytes: &[u8]) -> Result<GuestControl, ControlError> {
    let h = ControlHeader::from_bytes(bytes)?;
    match h.event {
        VIRTIO_CONSOLE_DEVICE_READY => Ok(GuestControl::DeviceReady { ok: h.value != 0 }),
        VIRTIO_CONSOLE_PORT_READY => Ok(GuestControl::PortReady {
            id: h.id,
            ok: h.value != 0,
        }),
        VIRTIO_CONSOLE_PORT_OPEN => Ok(GuestControl::PortOpen {
            id: h.id,
            open: h.value != 0,
        }),
        other => Err(ControlError::UnexpectedEvent(other)),
    }
}

/// A control message the host sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostControl {
    /// PORT_ADD.
    PortAdd(u32),
    /// PORT_REMOVE.
    PortRemove(u32),
    /// CONSOLE_PORT.
    ConsolePort(u32),
    /// RESIZE.
    Resize {
        /// Port number.
        id: u32,
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// PORT_OPEN: the host side connected or went away.
    PortOpen {
        /// Port number.
        id: u32,
        /// Connected.
        open: bool,
    },
    /// PORT_NAME.
    PortName {
        /// Port number.
        id: u32,
        /// The name (validated: no NUL).
        name: String,
    },
}

impl HostControl {
    /// The wire bytes.
    pub fn encode(&self) -> Vec<u8> {
        let header = |id, event, value| ControlHeader { id, event, value }.to_bytes();
        match self {
            HostControl::PortAdd(id) => header(*id, VIRTIO_CONSOLE_PORT_ADD, 1).to_vec(),
            HostControl::PortRemove(id) => header(*id, VIRTIO_CONSOLE_PORT_REMOVE, 1).to_vec(),
            HostControl::ConsolePort(id) => header(*id, VIRTIO_CONSOLE_CONSOLE_PORT, 1).to_vec(),
            HostControl::PortOpen { id, open } => {
                header(*id, VIRTIO_CONSOLE_PORT_OPEN, u16::from(*open)).to_vec()
            }
            HostControl::Resize { id, cols, rows } => {
                // Linux reads rows first (drivers/char/virtio_console.c), whatever the
                // spec's struct says; Linux is the guest that matters.
                let mut b = header(*id, VIRTIO_CONSOLE_RESIZE, 0).to_vec();
                b.extend_from_slice(&rows.to_le_bytes());
                b.extend_from_slice(&cols.to_le_bytes());
                b
            }
            HostControl::PortName { id, name } => {
                let mut b = header(*id, VIRTIO_CONSOLE_PORT_NAME, 1).to_vec();
                b.extend_from_slice(name.as_bytes());
                b.push(0);
                b
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_known_messages() {
        let msg = |id, event, value| ControlHeader { id, event, value }.to_bytes();
        assert_eq!(
            parse_guest_control(&msg(VIRTIO_CONSOLE_BAD_ID, 0, 1)),
            Ok(GuestControl::DeviceReady { ok: true })
        );
        assert_eq!(
            parse_guest_control(&msg(3, 3, 0)),
            Ok(GuestControl::PortReady { id: 3, ok: false })
        );
        assert_eq!(
            parse_guest_control(&msg(2, 6, 1)),
            Ok(GuestControl::PortOpen { id: 2, open: true })
        );
        assert_eq!(
            parse_guest_control(&msg(2, 7, 1)),
            Err(ControlError::UnexpectedEvent(7))
        );
        assert_eq!(parse_guest_control(&[1, 2, 3]), Err(ControlError::Short(3)));
        // Trailing bytes are ignored.
        let mut long = msg(1, 6, 0).to_vec();
        long.extend_from_slice(b"junk");
        assert_eq!(
            parse_guest_control(&long),
            Ok(GuestControl::PortOpen { id: 1, open: false })
        );
    }

    #[test]
    fn encode_host_messages() {
        assert_eq!(
            HostControl::PortName {
                id: 1,
                name: "ab".into()
            }
            .encode(),
            vec![1, 0, 0, 0, 7, 0, 1, 0, b'a', b'b', 0]
        );
        assert_eq!(
            HostControl::Resize {
                id: 0,
                cols: 80,
                rows: 25
            }
            .encode(),
            vec![0, 0, 0, 0, 5, 0, 0, 0, 25, 0, 80, 0]
        );
        assert_eq!(
            HostControl::PortOpen { id: 9, open: false }.encode(),
            vec![9, 0, 0, 0, 6, 0, 0, 0]
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            let _ = parse_guest_control(&bytes);
        }

        #[test]
        fn header_round_trip(id in any::<u32>(), event in any::<u16>(), value in any::<u16>()) {
            let h = ControlHeader { id, event, value };
            prop_assert_eq!(ControlHeader::from_bytes(&h.to_bytes()), Ok(h));
        }
    }
}

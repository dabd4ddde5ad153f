//! The virtio-vsock packet header (`struct virtio_vsock_hdr`, virtio 1.2 §5.10.6): its 44
//! little-endian bytes, the named values of its fields, and the checks a packet from the guest
//! must pass before the host acts on it.
//!
//! This module only turns bytes into values and back. It must not touch guest memory, sockets
//! or connection state, and it must never panic on what a guest wrote: every problem is a
//! [`PacketError`] that the caller counts (and may answer with an RST).

use thiserror::Error;

/// Bytes of a `virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// The host's CID: guest packets must be addressed to it.
pub const VSOCK_HOST_CID: u64 = 2;
/// The largest payload one packet may carry, either way (as Firecracker's `MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// `type`: a stream socket (the only type this device offers).
pub const VSOCK_TYPE_STREAM: u16 = 1;

/// `op`: connection request.
pub const VSOCK_OP_REQUEST: u16 = 1;
/// `op`: connection accepted.
pub const VSOCK_OP_RESPONSE: u16 = 2;
/// `op`: connection reset (refused, aborted or closed).
pub const VSOCK_OP_RST: u16 = 3;
/// `op`: one or both directions shut down (see the `flags`).
pub const VSOCK_OP_SHUTDOWN: u16 = 4;
/// `op`: data.
pub const VSOCK_OP_RW: u16 = 5;
/// `op`: the sender's buffer space, unasked.
pub const VSOCK_OP_CREDIT_UPDATE: u16 = 6;
/// `op`: please send a CREDIT_UPDATE.
pub const VSOCK_OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more data.
pub const VSOCK_FLAG_SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const VSOCK_FLAG_SHUTDOWN_SEND: u32 = 2;

/// Byte offsets of the header fields.
const OFF_SRC_CID: usize = 0;
const OFF_DST_CID: usize = 8;
const OFF_SRC_PORT: usize = 16;
const OFF_DST_PORT: usize = 20;
const OFF_LEN: usize = 24;
const OFF_TYPE: usize = 28;
const OFF_OP: usize = 30;
const OFF_FLAGS: usize = 32;
const OFF_BUF_ALLOC: usize = 36;
const OFF_FWD_CNT: usize = 40;

/// A decoded `virtio_vsock_hdr`, field for field, with no check applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload bytes after the header.
    pub len: u32,
    /// Socket type (`VSOCK_TYPE_*`).
    pub type_: u16,
    /// Operation (`VSOCK_OP_*`).
    pub op: u16,
    /// Operation flags (`VSOCK_FLAG_*` for SHUTDOWN).
    pub flags: u32,
    /// The sender's total receive buffer for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has received and passed on (freed) so far, modulo 2^32.
    pub fwd_cnt: u32,
}

fn u16_at(b: &[u8; HDR_LEN], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8; HDR_LEN], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8; HDR_LEN], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(w)
}

impl Header {
    /// Decode the 44 header bytes.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        Header {
            src_cid: u64_at(b, OFF_SRC_CID),
            dst_cid: u64_at(b, OFF_DST_CID),
            src_port: u32_at(b, OFF_SRC_PORT),
            dst_port: u32_at(b, OFF_DST_PORT),
            len: u32_at(b, OFF_LEN),
            type_: u16_at(b, OFF_TYPE),
            op: u16_at(b, OFF_OP),
            flags: u32_at(b, OFF_FLAGS),
            buf_alloc: u32_at(b, OFF_BUF_ALLOC),
            fwd_cnt: u32_at(b, OFF_FWD_CNT),
        }
    }

    /// Encode as the 44 header bytes.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[OFF_SRC_CID..OFF_SRC_CID + 8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[OFF_DST_CID..OFF_DST_CID + 8].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[OFF_SRC_PORT..OFF_SRC_PORT + 4].copy_from_slice(&self.src_port.to_le_bytes());
        b[OFF_DST_PORT..OFF_DST_PORT + 4].copy_from_slice(&self.dst_port.to_le_bytes());
        b[OFF_LEN..OFF_LEN + 4].copy_from_slice(&self.len.to_le_bytes());
        b[OFF_TYPE..OFF_TYPE + 2].copy_from_slice(&self.type_.to_le_bytes());
        b[OFF_OP..OFF_OP + 2].copy_from_slice(&self.op.to_le_bytes());
        b[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&self.flags.to_le_bytes());
        b[OFF_BUF_ALLOC..OFF_BUF_ALLOC + 4].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[OFF_FWD_CNT..OFF_FWD_CNT + 4].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The first [`HDR_LEN`] bytes of `bytes` as a header, or `None` when there are fewer.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let raw: &[u8; HDR_LEN] = bytes.get(..HDR_LEN)?.try_into().ok()?;
        Some(Header::from_bytes(raw))
    }
}

/// A known operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// [`VSOCK_OP_REQUEST`].
    Request,
    /// [`VSOCK_OP_RESPONSE`].
    Response,
    /// [`VSOCK_OP_RST`].
    Rst,
    /// [`VSOCK_OP_SHUTDOWN`].
    Shutdown,
    /// [`VSOCK_OP_RW`].
    Rw,
    /// [`VSOCK_OP_CREDIT_UPDATE`].
    CreditUpdate,
    /// [`VSOCK_OP_CREDIT_REQUEST`].
    CreditRequest,
}

impl Op {
    /// The operation with wire value `op`, if it is one.
    pub fn from_wire(op: u16) -> Option<Op> {
        Some(match op {
            VSOCK_OP_REQUEST => Op::Request,
            VSOCK_OP_RESPONSE => Op::Response,
            VSOCK_OP_RST => Op::Rst,
            VSOCK_OP_SHUTDOWN => Op::Shutdown,
            VSOCK_OP_RW => Op::Rw,
            VSOCK_OP_CREDIT_UPDATE => Op::CreditUpdate,
            VSOCK_OP_CREDIT_REQUEST => Op::CreditRequest,
            _ => return None,
        })
    }

    /// The wire value.
    pub fn wire(self) -> u16 {
        match self {
            Op::Request => VSOCK_OP_REQUEST,
            Op::Response => VSOCK_OP_RESPONSE,
            Op::Rst => VSOCK_OP_RST,
            Op::Shutdown => VSOCK_OP_SHUTDOWN,
            Op::Rw => VSOCK_OP_RW,
            Op::CreditUpdate => VSOCK_OP_CREDIT_UPDATE,
            Op::CreditRequest => VSOCK_OP_CREDIT_REQUEST,
        }
    }
}

/// What is wrong with a packet the guest sent.
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
pub enum PacketError {
    /// The chain holds fewer bytes than a header.
    #[error("descriptor chain of {0} bytes is shorter than a header")]
    ShortHeader(usize),
    /// The source CID is not the guest's.
    #[error("source cid {0} is not the guest's")]
    SrcCid(u64),
    /// The destination is not the host.
    #[error("destination cid {0} is not the host")]
    DstCid(u64),
    /// `len` over [`MAX_PAYLOAD`].
    #[error("payload length {0} over the maximum")]
    TooLong(u32),
    /// The chain holds fewer payload bytes than `len` says.
    #[error("payload length {len} but only {available} bytes in the chain")]
    ShortPayload {
        /// `len` in the header.
        len: u32,
        /// Payload bytes the chain holds.
        available: usize,
    },
    /// A socket type other than stream.
    #[error("socket type {0} is not stream")]
    Type(u16),
    /// An operation that does not exist.
    #[error("unknown operation {0}")]
    UnknownOp(u16),
}

impl PacketError {
    /// Whether the packet was addressed well enough (guest to host, ports readable) that the
    /// spec wants an RST back rather than a silent drop: an unknown type or operation.
    pub fn wants_rst(&self) -> bool {
        matches!(self, PacketError::Type(_) | PacketError::UnknownOp(_))
    }
}

/// A guest packet that passed [`parse_guest_packet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestPacket<'a> {
    /// The header as sent.
    pub hdr: Header,
    /// Its operation.
    pub op: Op,
    /// Exactly `hdr.len` payload bytes.
    pub payload: &'a [u8],
}

/// Check what a guest sent: `bytes` is the start of its transmit chain (header and payload,
/// wherever the descriptor boundaries fell). On an error the header is returned too when
/// there was one, so the caller can answer an RST ([`PacketError::wants_rst`]).
pub fn parse_guest_packet(
    bytes: &[u8],
    guest_cid: u64,
) -> Result<GuestPacket<'_>, (PacketError, Option<Header>)> {
    let hdr = Header::parse(bytes).ok_or((PacketError::ShortHeader(bytes.len()), None))?;
    let fail = |e| Err((e, Some(hdr)));
    if hdr.src_cid != guest_cid {
        return fail(PacketError::SrcCid(hdr.src_cid));
    }
    if hdr.dst_cid != VSOCK_HOST_CID {
        return fail(PacketError::DstCid(hdr.dst_cid));
    }
    if hdr.len > MAX_PAYLOAD {
        return fail(PacketError::TooLong(hdr.len));
    }
    let available = bytes.len() - HDR_LEN;
    let Some(payload) = bytes.get(HDR_LEN..HDR_LEN + hdr.len as usize) else {
        return fail(PacketError::ShortPayload {
            len: hdr.len,
            available,
        });
    };
    if hdr.type_ != VSOCK_TYPE_STREAM {
        return fail(PacketError::Type(hdr.type_));
    }
    let Some(op) = Op::from_wire(hdr.op) else {
        return fail(PacketError::UnknownOp(hdr.op));
    };
    Ok(GuestPacket { hdr, op, payload })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GUEST: u64 = 3;

    fn guest_hdr(op: u16, len: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: VSOCK_HOST_CID,
            src_port: 1234,
            dst_port: 52,
            len,
            type_: VSOCK_TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
    }

    fn bytes_of(hdr: &Header, payload: &[u8]) -> Vec<u8> {
        let mut b = hdr.to_bytes().to_vec();
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn constants_match_the_linux_headers() {
        use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
        assert_eq!(super::super::VIRTIO_ID_VSOCK, VIRTIO_ID_VSOCK);
        // include/uapi/linux/virtio_vsock.h has no bindings in virtio-bindings 0.2; these are
        // its values.
        assert_eq!(
            [
                VSOCK_OP_REQUEST,
                VSOCK_OP_RESPONSE,
                VSOCK_OP_RST,
                VSOCK_OP_SHUTDOWN
            ],
            [1, 2, 3, 4]
        );
        assert_eq!(
            [VSOCK_OP_RW, VSOCK_OP_CREDIT_UPDATE, VSOCK_OP_CREDIT_REQUEST],
            [5, 6, 7]
        );
    }

    #[test]
    fn field_offsets_are_the_specs() {
        let hdr = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xaabb_ccdd,
            dst_port: 5,
            len: 6,
            type_: 1,
            op: 5,
            flags: 3,
            buf_alloc: 0x1_0000,
            fwd_cnt: 0x11,
        };
        let b = hdr.to_bytes();
        assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(b[8], 2);
        assert_eq!(&b[16..20], &[0xdd, 0xcc, 0xbb, 0xaa]);
        assert_eq!(b[20], 5);
        assert_eq!(b[24], 6);
        assert_eq!((b[28], b[30], b[32]), (1, 5, 3));
        assert_eq!(&b[36..40], &[0, 0, 1, 0]);
        assert_eq!(b[40], 0x11);
    }

    #[test]
    fn good_packets_parse() {
        let b = bytes_of(&guest_hdr(VSOCK_OP_RW, 3), b"abcdef");
        let p = parse_guest_packet(&b, GUEST).unwrap();
        assert_eq!(p.op, Op::Rw);
        assert_eq!(p.payload, b"abc");
        let b = bytes_of(&guest_hdr(VSOCK_OP_REQUEST, 0), b"");
        assert_eq!(parse_guest_packet(&b, GUEST).unwrap().op, Op::Request);
    }

    #[test]
    fn bad_packets_are_errors() {
        let err = |b: &[u8]| parse_guest_packet(b, GUEST).unwrap_err().0;
        assert_eq!(err(&[0u8; 43]), PacketError::ShortHeader(43));
        let mut h = guest_hdr(VSOCK_OP_RW, 0);
        h.src_cid = 4;
        assert_eq!(err(&h.to_bytes()), PacketError::SrcCid(4));
        let mut h = guest_hdr(VSOCK_OP_RW, 0);
        h.dst_cid = GUEST;
        assert_eq!(err(&h.to_bytes()), PacketError::DstCid(GUEST));
        let h = guest_hdr(VSOCK_OP_RW, MAX_PAYLOAD + 1);
        assert_eq!(err(&h.to_bytes()), PacketError::TooLong(MAX_PAYLOAD + 1));
        let h = guest_hdr(VSOCK_OP_RW, 10);
        assert_eq!(
            err(&bytes_of(&h, b"12345")),
            PacketError::ShortPayload {
                len: 10,
                available: 5
            }
        );
        let mut h = guest_hdr(VSOCK_OP_RW, 0);
        h.type_ = 2;
        let e = err(&h.to_bytes());
        assert_eq!(e, PacketError::Type(2));
        assert!(e.wants_rst());
        let h = guest_hdr(8, 0);
        let e = err(&h.to_bytes());
        assert_eq!(e, PacketError::UnknownOp(8));
        assert!(e.wants_rst());
        assert!(!PacketError::SrcCid(1).wants_rst());
    }

    proptest! {
        #[test]
        fn header_round_trips(
            src_cid in any::<u64>(), dst_cid in any::<u64>(), src_port in any::<u32>(),
            dst_port in any::<u32>(), len in any::<u32>(), type_ in any::<u16>(),
            op in any::<u16>(), flags in any::<u32>(), buf_alloc in any::<u32>(),
            fwd_cnt in any::<u32>(),
        ) {
            let h = Header {
                src_cid, dst_cid, src_port, dst_port, len, type_, op, flags, buf_alloc, fwd_cnt,
            };
            prop_assert_eq!(Header::from_bytes(&h.to_bytes()), h);
            let b = h.to_bytes();
            prop_assert_eq!(Header::from_bytes(&b).to_bytes(), b);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            match parse_guest_packet(&bytes, GUEST) {
                Ok(p) => {
                    prop_assert_eq!(p.payload.len(), p.hdr.len as usize);
                    prop_assert_eq!(Some(p.op.wire()), Some(p.hdr.op));
                }
                Err((e, hdr)) => prop_assert_eq!(hdr.is_none(), e == PacketError::ShortHeader(bytes.len())),
            }
        }

        #[test]
        fn valid_guest_packets_round_trip(
            op in 1u16..=7, payload in proptest::collection::vec(any::<u8>(), 0..100),
            extra in proptest::collection::vec(any::<u8>(), 0..10),
        ) {
            let h = guest_hdr(op, payload.len() as u32);
            let mut b = bytes_of(&h, &payload);
            b.extend_from_slice(&extra);
            let p = parse_guest_packet(&b, GUEST).unwrap();
            prop_assert_eq!(p.hdr, h);
            prop_assert_eq!(p.payload, &payload[..]);
            prop_assert_eq!(Op::from_wire(op).map(Op::wire), Some(op));
        }
    }
}

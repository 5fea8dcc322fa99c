//! virtio-vsock wire format (virtio 1.2, section 5.10): the 44-byte packet header that starts
//! every packet on the rx and tx queues, its operations and flags, and the event queue's event.

/// Bytes in a packet header.
pub const HDR_LEN: usize = 44;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// `type` of a stream socket, the only type this driver speaks.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (`op`).
pub mod op {
    /// Invalid (never sent).
    pub const INVALID: u16 = 0;
    /// Open a connection.
    pub const REQUEST: u16 = 1;
    /// Accept a connection.
    pub const RESPONSE: u16 = 2;
    /// Refuse or abort a connection.
    pub const RST: u16 = 3;
    /// No more data in one or both directions (`flags`).
    pub const SHUTDOWN: u16 = 4;
    /// Stream data.
    pub const RW: u16 = 5;
    /// "Here is my buffer space" (`buf_alloc`, `fwd_cnt`).
    pub const CREDIT_UPDATE: u16 = 6;
    /// "Tell me your buffer space."
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `SHUTDOWN` flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `SHUTDOWN` flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Event queue: the transport was reset (after a snapshot restore); every connection is gone
/// and the guest CID must be read again.
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// Bytes in an event.
pub const EVENT_LEN: usize = 4;

/// A decoded packet header. All fields are little-endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// Sender's CID.
    pub src_cid: u64,
    /// Receiver's CID.
    pub dst_cid: u64,
    /// Sender's port.
    pub src_port: u32,
    /// Receiver's port.
    pub dst_port: u32,
    /// Bytes of data after the header.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub kind: u16,
    /// Operation ([`op`]).
    pub op: u16,
    /// Operation flags (`SHUTDOWN_*`).
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender's application has consumed so far (wrapping).
    pub fwd_cnt: u32,
}

impl PacketHeader {
    /// Decodes a header.
    pub fn decode(b: &[u8; HDR_LEN]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | u64::from(u32_at(i + 4)) << 32;
        PacketHeader {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes this header.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// A header answering this one with `op` (ports and CIDs swapped, no data, no credit).
    pub fn reply(&self, op: u16) -> Self {
        PacketHeader {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            kind: TYPE_STREAM,
            op,
            ..Default::default()
        }
    }
}

/// The name of an operation, for logs.
pub fn op_name(op: u16) -> &'static str {
    match op {
        op::INVALID => "INVALID",
        op::REQUEST => "REQUEST",
        op::RESPONSE => "RESPONSE",
        op::RST => "RST",
        op::SHUTDOWN => "SHUTDOWN",
        op::RW => "RW",
        op::CREDIT_UPDATE => "CREDIT_UPDATE",
        op::CREDIT_REQUEST => "CREDIT_REQUEST",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_is_the_specs() {
        let h = PacketHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234_5678,
            dst_port: 9000,
            len: 7,
            kind: TYPE_STREAM,
            op: op::RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 0x0010_0000,
            fwd_cnt: 0xdead_beef,
        };
        let b = h.encode();
        assert_eq!(&b[0..8], &[3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[8..16], &[2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[16..20], &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(&b[20..24], &9000u32.to_le_bytes());
        assert_eq!(&b[24..28], &[7, 0, 0, 0]);
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        assert_eq!(&b[32..36], &[2, 0, 0, 0]);
        assert_eq!(&b[36..40], &[0, 0, 0x10, 0]);
        assert_eq!(&b[40..44], &[0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(PacketHeader::decode(&b), h);
    }

    #[test]
    fn reply_swaps_the_ends() {
        let h = PacketHeader {
            src_cid: 2,
            dst_cid: 3,
            src_port: 9000,
            dst_port: 50000,
            op: op::RW,
            len: 5,
            ..Default::default()
        };
        let r = h.reply(op::RST);
        assert_eq!(
            (r.src_cid, r.dst_cid, r.src_port, r.dst_port),
            (3, 2, 50000, 9000)
        );
        assert_eq!((r.op, r.len, r.kind), (op::RST, 0, TYPE_STREAM));
        assert_eq!(op_name(r.op), "RST");
        assert_eq!(op_name(42), "unknown");
    }
}

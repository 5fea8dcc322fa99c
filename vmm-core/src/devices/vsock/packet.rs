//! virtio-vsock packets: the 44-byte header, and moving packets between descriptor chains and
//! host buffers. Everything the guest controls is checked here, before any other code sees it:
//! the shape of each chain (length, direction of every descriptor, that it ends, that every
//! buffer lies in guest memory) and the header's `len` (at most [`MAX_PKT_LEN`] and no more
//! than the chain holds). Descriptor walking itself is virtio-queue's, which also bounds it.
//!
//! Header layout (virtio 1.2, 5.10.6; all fields little-endian, no padding):
//!
//! ```text
//! offset  0        8        16         20         24    28     30   32      36          40        44
//!         +--------+--------+----------+----------+-----+------+----+-------+-----------+---------+
//!         | src_cid| dst_cid| src_port | dst_port | len | type | op | flags | buf_alloc | fwd_cnt |
//!         |  u64   |  u64   |   u32    |   u32    | u32 | u16  | u16|  u32  |    u32    |   u32   |
//!         +--------+--------+----------+----------+-----+------+----+-------+-----------+---------+
//! ```
//!
//! `len` bytes of payload follow the header in the same chain (Linux puts them in the same or
//! in following descriptors; both are read as one byte stream).

use virtio_queue::DescriptorChain;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemory as _};

use crate::memory::GuestMemory;

/// Size of the packet header.
pub const HDR_LEN: usize = 44;
/// Largest payload Thaw accepts from or sends to the guest: Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`.
pub const MAX_PKT_LEN: u32 = 64 * 1024;
/// Most descriptors in one chain. Linux uses one for the header and one per payload fragment
/// (at most 18 or so); anything longer is a confused or hostile driver.
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;

/// VIRTIO_VSOCK_TYPE_STREAM, the only socket type the device offers.
pub const TYPE_STREAM: u16 = 1;
/// Shutdown flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// The operation of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Open a connection.
    Request = 1,
    /// Accept a connection.
    Response = 2,
    /// Reset (refuse or abort) a connection.
    Rst = 3,
    /// Stop receiving and/or sending (flags).
    Shutdown = 4,
    /// Data.
    Rw = 5,
    /// Here is my receive credit.
    CreditUpdate = 6,
    /// Tell me your receive credit.
    CreditRequest = 7,
}

impl Op {
    /// The operation numbered `op`, if it is one.
    pub fn from_u16(op: u16) -> Option<Self> {
        Some(match op {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// A packet header, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation (see [`Op`]).
    pub op: u16,
    /// Operation flags (shutdown flags).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from this connection so far (wrapping).
    pub fwd_cnt: u32,
}

fn field<const N: usize>(bytes: &[u8; HDR_LEN], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

impl Header {
    /// Decodes the wire format.
    pub fn decode(b: &[u8; HDR_LEN]) -> Self {
        Self {
            src_cid: u64::from_le_bytes(field(b, 0)),
            dst_cid: u64::from_le_bytes(field(b, 8)),
            src_port: u32::from_le_bytes(field(b, 16)),
            dst_port: u32::from_le_bytes(field(b, 20)),
            len: u32::from_le_bytes(field(b, 24)),
            type_: u16::from_le_bytes(field(b, 28)),
            op: u16::from_le_bytes(field(b, 30)),
            flags: u32::from_le_bytes(field(b, 32)),
            buf_alloc: u32::from_le_bytes(field(b, 36)),
            fwd_cnt: u32::from_le_bytes(field(b, 40)),
        }
    }

    /// Encodes the wire format.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The operation, if known.
    pub fn op(&self) -> Option<Op> {
        Op::from_u16(self.op)
    }
}

/// Why a chain or packet from the guest was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// More descriptors than [`MAX_CHAIN_DESCRIPTORS`].
    #[error("descriptor chain longer than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    ChainTooLong,
    /// The chain does not end: a loop, a `next` outside the table, or a bad indirect table.
    #[error("descriptor chain does not end (loop, bad next index or bad indirect table)")]
    ChainNotTerminated,
    /// A descriptor the device must read is device-writable, or the other way round.
    #[error("descriptor {index} has the wrong direction (device-{found})")]
    WrongDirection {
        /// Position in the chain.
        index: usize,
        /// "writable" or "readable".
        found: &'static str,
    },
    /// A buffer outside guest memory.
    #[error("descriptor {index} points outside guest memory ({addr:#x}+{len:#x})")]
    OutsideMemory {
        /// Position in the chain.
        index: usize,
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// Fewer bytes than a header.
    #[error("buffer of {available} bytes cannot hold a {HDR_LEN}-byte header")]
    TooShort {
        /// Bytes in the chain.
        available: usize,
    },
    /// The header's `len` is over [`MAX_PKT_LEN`].
    #[error("header len {len} is over the {MAX_PKT_LEN}-byte packet limit")]
    LenTooLarge {
        /// The field.
        len: u32,
    },
    /// The header's `len` is more than the chain holds after the header.
    #[error("header len {len} but only {available} payload bytes in the buffer")]
    LenBeyondBuffer {
        /// The field.
        len: u32,
        /// Payload bytes present.
        available: usize,
    },
    /// Guest memory could not be accessed although the checks passed.
    #[error("guest memory access failed: {0}")]
    Memory(String),
}

/// A chain the device may use, with the number of bytes it holds.
fn check_chain(
    mem: &GuestMemory,
    chain: &DescriptorChain<&GuestMemory>,
    device_writes: bool,
) -> Result<usize, PacketError> {
    let mut total: usize = 0;
    let mut last: Option<Descriptor> = None;
    for (index, desc) in chain.clone().enumerate() {
        if index >= MAX_CHAIN_DESCRIPTORS {
            return Err(PacketError::ChainTooLong);
        }
        if desc.is_write_only() != device_writes {
            let found = if desc.is_write_only() {
                "writable"
            } else {
                "readable"
            };
            return Err(PacketError::WrongDirection { index, found });
        }
        if !mem.check_range(
            desc.addr(),
            desc.len() as usize,
            vm_memory::Permissions::Read,
        ) {
            return Err(PacketError::OutsideMemory {
                index,
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        total = total.saturating_add(desc.len() as usize);
        last = Some(desc);
    }
    match last {
        // The walk stopped while the chain still said "next": it loops or is broken.
        Some(desc) if desc.has_next() => Err(PacketError::ChainNotTerminated),
        None => Err(PacketError::ChainNotTerminated),
        Some(_) => Ok(total),
    }
}

/// A packet read from a TX chain whose header could at least be decoded.
#[derive(Debug)]
pub struct RejectedPacket {
    /// The header, if it could be read: the connection it names gets a reset.
    pub header: Option<Header>,
    /// Why.
    pub error: PacketError,
}

/// Reads the packet in a TX chain: returns the header and leaves the payload (exactly
/// `header.len` bytes) in `payload`.
pub fn read_tx(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    payload: &mut Vec<u8>,
) -> Result<Header, RejectedPacket> {
    payload.clear();
    let reject = |header, error| RejectedPacket { header, error };
    if let Err(error) = check_chain(mem, &chain, false) {
        return Err(reject(header_best_effort(mem, &chain), error));
    }
    let mut reader = chain
        .reader(mem)
        .map_err(|e| reject(None, PacketError::Memory(e.to_string())))?;
    let available = reader.available_bytes();
    if available < HDR_LEN {
        return Err(reject(None, PacketError::TooShort { available }));
    }
    let mut raw = [0u8; HDR_LEN];
    std::io::Read::read_exact(&mut reader, &mut raw)
        .map_err(|e| reject(None, PacketError::Memory(e.to_string())))?;
    let header = Header::decode(&raw);
    if header.len > MAX_PKT_LEN {
        return Err(reject(
            Some(header),
            PacketError::LenTooLarge { len: header.len },
        ));
    }
    let available = available - HDR_LEN;
    let len = header.len as usize;
    if len > available {
        return Err(reject(
            Some(header),
            PacketError::LenBeyondBuffer {
                len: header.len,
                available,
            },
        ));
    }
    payload.resize(len, 0);
    std::io::Read::read_exact(&mut reader, payload)
        .map_err(|e| reject(Some(header), PacketError::Memory(e.to_string())))?;
    Ok(header)
}

/// The header of a chain that failed its checks, if the first descriptor holds a readable one:
/// enough to reset the connection it belongs to.
fn header_best_effort(mem: &GuestMemory, chain: &DescriptorChain<&GuestMemory>) -> Option<Header> {
    let first = chain.clone().next()?;
    if first.is_write_only() || (first.len() as usize) < HDR_LEN {
        return None;
    }
    let mut raw = [0u8; HDR_LEN];
    mem.read_slice(&mut raw, first.addr()).ok()?;
    Some(Header::decode(&raw))
}

/// A checked RX chain, ready to receive one packet.
pub struct RxBuffer<'a> {
    writer: virtio_queue::Writer<'a>,
    capacity: usize,
}

impl<'a> RxBuffer<'a> {
    /// Checks an RX chain: every descriptor device-writable, inside guest memory, room for a
    /// header.
    pub fn new(
        mem: &'a GuestMemory,
        chain: DescriptorChain<&'a GuestMemory>,
    ) -> Result<Self, PacketError> {
        check_chain(mem, &chain, true)?;
        let writer = chain
            .writer(mem)
            .map_err(|e| PacketError::Memory(e.to_string()))?;
        let available = writer.available_bytes();
        if available < HDR_LEN {
            return Err(PacketError::TooShort { available });
        }
        Ok(Self {
            writer,
            capacity: available - HDR_LEN,
        })
    }

    /// Payload bytes the buffer can take after the header.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Writes `header` (with `len` set to the payload's length) and `payload`; returns the bytes
    /// written, for the used ring.
    pub fn write(mut self, mut header: Header, payload: &[u8]) -> Result<u32, PacketError> {
        let payload = &payload[..payload.len().min(self.capacity)];
        header.len = payload.len() as u32;
        let mem_err = |e: std::io::Error| PacketError::Memory(e.to_string());
        std::io::Write::write_all(&mut self.writer, &header.encode()).map_err(mem_err)?;
        std::io::Write::write_all(&mut self.writer, payload).map_err(mem_err)?;
        Ok((HDR_LEN + payload.len()) as u32)
    }
}

/// Writes a 4-byte event (`id`) into an event-queue chain; returns the bytes written.
pub fn write_event(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    id: u32,
) -> Result<u32, PacketError> {
    check_chain(mem, &chain, true)?;
    let mut writer = chain
        .writer(mem)
        .map_err(|e| PacketError::Memory(e.to_string()))?;
    let available = writer.available_bytes();
    if available < 4 {
        return Err(PacketError::TooShort { available });
    }
    std::io::Write::write_all(&mut writer, &id.to_le_bytes())
        .map_err(|e| PacketError::Memory(e.to_string()))?;
    Ok(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_at_the_documented_offsets() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 9000,
            len: 5,
            type_: TYPE_STREAM,
            op: Op::Rw as u16,
            flags: SHUTDOWN_SEND,
            buf_alloc: 0x4_0000,
            fwd_cnt: 0xdead_beef,
        };
        let b = h.encode();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &0x1122_3344u32.to_le_bytes());
        assert_eq!(&b[28..30], &1u16.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[40..44], &0xdead_beefu32.to_le_bytes());
        assert_eq!(Header::decode(&b), h);
        assert_eq!(h.op(), Some(Op::Rw));
        assert_eq!(Op::from_u16(0), None);
        assert_eq!(Op::from_u16(8), None);
    }
}

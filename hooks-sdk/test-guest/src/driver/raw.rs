//! Deliberately odd packets, for showing that the device survives bad input: raw headers,
//! arbitrary descriptors, and slots that may never come back.

use super::{BUF_ALLOC, Driver, Error, Slot, TX, Transport};
use crate::virtq::Desc;
use crate::vsock::{HOST_CID, PacketHeader};

impl<T: Transport> Driver<T> {
    /// A header on the open connection (for deliberately odd packets).
    pub fn conn_header(&mut self, op: u16, len: u32) -> PacketHeader {
        self.conn.header(op, len, 0)
    }

    /// A header from this guest to host port `dst_port` from `src_port`.
    pub fn raw_header(&self, src_port: u32, dst_port: u32, op: u16, len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: self.guest_cid,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            kind: crate::vsock::TYPE_STREAM,
            op,
            buf_alloc: BUF_ALLOC as u32,
            ..Default::default()
        }
    }

    /// Sends a packet exactly as given, valid or not: `h` in the slot's header buffer (or the
    /// descriptor `hdr_desc` instead), then `data` if any. Returns its slot for
    /// [`Self::raw_done`]; waits for a free slot at most `timeout_ns`.
    pub fn send_raw(
        &mut self,
        h: &PacketHeader,
        hdr_desc: Option<Desc>,
        data: Option<Desc>,
        timeout_ns: u64,
    ) -> Result<usize, Error> {
        let deadline = self.t.now_ns().saturating_add(timeout_ns);
        loop {
            if let Some(s) = self.take_slot() {
                self.fill_slot(s, h, hdr_desc, data, false);
                self.kick(TX);
                return Ok(s);
            }
            if self.t.now_ns() > deadline {
                return Err(Error::Timeout);
            }
            self.poll();
            self.t.idle();
        }
    }

    /// Whether the device returned the packet in `slot`.
    pub fn raw_done(&self, slot: usize) -> bool {
        !matches!(self.slots.get(slot), Some(Slot::Busy { .. }))
    }

    /// Stops waiting for the packet in `slot` (the device may never return it).
    pub fn abandon(&mut self, slot: usize) {
        if let Some(s @ Slot::Busy { .. }) = self.slots.get_mut(slot) {
            *s = Slot::Abandoned;
        }
    }
}

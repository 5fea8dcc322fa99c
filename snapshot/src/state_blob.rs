//! The encoding of the state section: whatever serde value the VMM saves (Thaw's is
//! `vmm_core::machine::MachineState`) as bincode with little-endian fixed-width integers, fields
//! in declaration order — so the bytes are exactly the Rust types' layout, and what may change
//! within a format version is written down in docs/snapshot-format.md ("Compatibility"). One
//! cap bounds the section: [`MAX_STATE_LEN`], which the writer enforces, the reader checks
//! before reading the section, and decoding here uses as its allocation limit.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::format::MAX_STATE_LEN;

/// A state value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum StateBlobError {
    /// Encoding failed (a bug, not bad input).
    #[error("cannot encode the VM state")]
    Encode(#[source] bincode::error::EncodeError),
    /// The bytes are not a state this build can read.
    #[error("the snapshot's VM state cannot be decoded")]
    Decode(#[source] bincode::error::DecodeError),
    /// Bytes are left over after the state.
    #[error("the snapshot's VM state has {0} trailing bytes")]
    Trailing(usize),
}

// The cap is a `u64` in the format; on 64-bit hosts (the only ones KVM/x86_64 has) it fits.
const LIMIT: usize = MAX_STATE_LEN as usize;

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<LIMIT>()
}

/// Encodes `state` as a snapshot's state section.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, StateBlobError> {
    bincode::serde::encode_to_vec(state, config()).map_err(StateBlobError::Encode)
}

/// Decodes a state section (authenticated by the reader already; still bounded), all of whose
/// bytes must be used.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StateBlobError> {
    let (state, used) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(StateBlobError::Decode)?;
    match bytes.len() - used.min(bytes.len()) {
        0 => Ok(state),
        extra => Err(StateBlobError::Trailing(extra)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        a: u32,
        b: Vec<u8>,
    }

    #[test]
    fn lays_out_fields_in_order_as_fixed_width_little_endian() {
        let bytes = encode(&Sample {
            a: 0x0403_0201,
            b: vec![9, 8],
        })
        .unwrap();
        assert_eq!(bytes, [1, 2, 3, 4, 2, 0, 0, 0, 0, 0, 0, 0, 9, 8]);
        assert_eq!(
            decode::<Sample>(&bytes).unwrap(),
            Sample {
                a: 0x0403_0201,
                b: vec![9, 8]
            }
        );
    }

    #[test]
    fn refuses_trailing_bytes_and_lengths_beyond_the_cap() {
        let mut bytes = encode(&Sample { a: 1, b: vec![] }).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(StateBlobError::Trailing(1))
        ));
        // A vector that claims more than the cap is refused before anything is allocated.
        let mut huge = 1u32.to_le_bytes().to_vec();
        huge.extend_from_slice(&(MAX_STATE_LEN + 1).to_le_bytes());
        assert!(matches!(
            decode::<Sample>(&huge),
            Err(StateBlobError::Decode(_))
        ));
    }
}

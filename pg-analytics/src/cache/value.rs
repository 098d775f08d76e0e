//! A cached dashboard as stored in Redis: a fixed header (XFetch's times,
//! then the generation it was computed at), then the JSON body, so a hit
//! hands the body out without copying it.

use bytes::{BufMut, Bytes, BytesMut};

/// Header: computed-at, compute time and expiry, in ms, as little-endian
/// u64s (bytes 0..24), then the generation as 20 ASCII digits (bytes
/// 24..44), which the store script reads with `GETRANGE` and `tonumber`.
const HEADER: usize = 44;

/// A dashboard value with what XFetch needs to decide an early refresh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct CachedValue {
    /// When it was computed (ms since the Unix epoch).
    pub(super) computed_at_ms: u64,
    /// How long computing it took (ms): XFetch's δ.
    pub(super) compute_ms: u64,
    /// When its key expires (ms since the Unix epoch).
    pub(super) expires_at_ms: u64,
    /// The plan's generation it was computed at.
    pub(super) generation: u64,
    /// The dashboard's JSON.
    pub(super) body: Bytes,
}

impl CachedValue {
    pub(super) fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER + self.body.len());
        out.put_u64_le(self.computed_at_ms);
        out.put_u64_le(self.compute_ms);
        out.put_u64_le(self.expires_at_ms);
        out.put_slice(format!("{:020}", self.generation).as_bytes());
        out.put_slice(&self.body);
        out.freeze()
    }

    /// `None` for anything shorter than the header.
    pub(super) fn decode(bytes: Bytes) -> Option<CachedValue> {
        if bytes.len() < HEADER {
            return None;
        }
        let field = |i: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_le_bytes(word)
        };
        let generation = std::str::from_utf8(&bytes[24..HEADER])
            .ok()?
            .parse::<u64>()
            .ok()?;
        Some(CachedValue {
            computed_at_ms: field(0),
            compute_ms: field(1),
            expires_at_ms: field(2),
            generation,
            body: bytes.slice(HEADER..),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_value_round_trips(a: u64, b: u64, c: u64, generation: u64, body: Vec<u8>) {
            let value = CachedValue {
                computed_at_ms: a,
                compute_ms: b,
                expires_at_ms: c,
                generation,
                body: Bytes::from(body),
            };
            prop_assert_eq!(CachedValue::decode(value.encode()), Some(value));
        }

        #[test]
        fn short_input_is_refused(bytes in proptest::collection::vec(any::<u8>(), 0..HEADER)) {
            prop_assert_eq!(CachedValue::decode(Bytes::from(bytes)), None);
        }
    }
}

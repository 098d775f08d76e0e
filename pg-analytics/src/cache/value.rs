//! A cached dashboard as stored in Redis: a fixed header for XFetch, then
//! the JSON body, so a hit hands the body out without copying it.

use bytes::{BufMut, Bytes, BytesMut};

/// Header: computed-at, compute time and expiry, in ms, little-endian u64s.
const HEADER: usize = 24;

/// A dashboard value with what XFetch needs to decide an early refresh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct CachedValue {
    /// When it was computed (ms since the Unix epoch).
    pub(super) computed_at_ms: u64,
    /// How long computing it took (ms): XFetch's δ.
    pub(super) compute_ms: u64,
    /// When its key expires (ms since the Unix epoch).
    pub(super) expires_at_ms: u64,
    /// The dashboard's JSON.
    pub(super) body: Bytes,
}

impl CachedValue {
    pub(super) fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER + self.body.len());
        out.put_u64_le(self.computed_at_ms);
        out.put_u64_le(self.compute_ms);
        out.put_u64_le(self.expires_at_ms);
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
        Some(CachedValue {
            computed_at_ms: field(0),
            compute_ms: field(1),
            expires_at_ms: field(2),
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
        fn a_value_round_trips(a: u64, b: u64, c: u64, body: Vec<u8>) {
            let value = CachedValue {
                computed_at_ms: a,
                compute_ms: b,
                expires_at_ms: c,
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

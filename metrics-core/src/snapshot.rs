//! The snapshot format: a pure codec between bytes and plain records.
//!
//! This module knows the file layout and nothing about the processor: the
//! processor builds a [`SnapshotData`] from its state and applies the one
//! [`decode`] returns (validating it against its configuration).
//!
//! Layout (little-endian):
//!
//! | bytes | field |
//! | --- | --- |
//! | 8 | magic `FKMETSNP` |
//! | 4 | format version (`2`; version `1` is still read) |
//! | 8 | body length |
//! | 4 | CRC-32 of the body |
//! | n | body: [postcard](https://docs.rs/postcard) encoding of the body |
//!
//! Floating-point fields are stored as their IEEE-754 bits, so every value
//! the processor holds (negative zero, subnormals, and sums that overflowed
//! to ±infinity) comes back bit for bit. Version 2 added the minute totals:
//! rebuilding them from the seconds would add the same values in another
//! order, which can change a sum's last bits.

use serde::{Deserialize, Serialize};

use crate::error::SnapshotError;
use crate::hll::PRECISION;
use crate::sketch::RELATIVE_ACCURACY;

const MAGIC: &[u8; 8] = b"FKMETSNP";
/// The version [`encode`] writes.
const VERSION: u32 = 2;
/// The first format: seconds only, minute totals rebuilt on load.
const VERSION_1: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;

/// Everything a snapshot holds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SnapshotData {
    /// The clock's Unix second when the snapshot was taken (informational).
    pub(crate) taken_at_unix_secs: i64,
    /// One record per event type.
    pub(crate) types: Vec<TypeRecord>,
    /// Non-zero unique-users slots as `(index, second)`.
    pub(crate) users: Vec<(u32, u32)>,
}

/// The held data of one event type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TypeRecord {
    pub(crate) name: String,
    /// Non-empty one-second cells.
    pub(crate) cells: Vec<CellRecord>,
    /// Exact statistics of minute totals (empty in version 1 files).
    pub(crate) minutes: Vec<MinuteRecord>,
}

/// One non-empty second of one type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CellRecord {
    /// Unix second.
    pub(crate) second: u64,
    pub(crate) count: u64,
    pub(crate) sum: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    /// The quantile sketch's packed entries.
    pub(crate) bins: Vec<u32>,
}

/// The exact statistics of one minute's total (its sketch is the merge of
/// its seconds', which is exact, so it is not stored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct MinuteRecord {
    /// Unix second / 60.
    pub(crate) minute: u64,
    pub(crate) count: u64,
    pub(crate) sum: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

/// The body as written (version 2).
#[derive(Serialize, Deserialize)]
struct Body {
    /// Unique-users register bits; must match this build.
    hll_precision: u32,
    /// Sketch accuracy (as bits); must match this build.
    sketch_accuracy_bits: u64,
    taken_at_unix_secs: i64,
    types: Vec<TypeRecord>,
    users: Vec<(u32, u32)>,
}

/// The version 1 body: no minute totals.
#[derive(Deserialize)]
struct BodyV1 {
    hll_precision: u32,
    sketch_accuracy_bits: u64,
    taken_at_unix_secs: i64,
    types: Vec<TypeRecordV1>,
    users: Vec<(u32, u32)>,
}

#[derive(Deserialize)]
struct TypeRecordV1 {
    name: String,
    cells: Vec<CellRecord>,
}

/// Serializes `data` with the header.
pub(crate) fn encode(data: &SnapshotData) -> Vec<u8> {
    let body = Body {
        hll_precision: PRECISION,
        sketch_accuracy_bits: RELATIVE_ACCURACY.to_bits(),
        taken_at_unix_secs: data.taken_at_unix_secs,
        types: data.types.clone(),
        users: data.users.clone(),
    };
    // postcard into a Vec fails only for types serde cannot describe
    // (none here) or on allocation failure, which aborts anyway.
    let body = postcard::to_allocvec(&body).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Checks the header, checksum and build parameters and decodes the body.
/// The records' consistency (and their fit with a configuration) is for the
/// caller to check.
pub(crate) fn decode(bytes: &[u8]) -> Result<SnapshotData, SnapshotError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::NotASnapshot);
    }
    let (Some(version), Some(len), Some(crc)) = (
        bytes.get(8..12).and_then(|b| b.try_into().ok()),
        bytes.get(12..20).and_then(|b| b.try_into().ok()),
        bytes.get(20..24).and_then(|b| b.try_into().ok()),
    ) else {
        return Err(SnapshotError::corrupt("truncated header"));
    };
    let (version, len, crc) = (
        u32::from_le_bytes(version),
        u64::from_le_bytes(len),
        u32::from_le_bytes(crc),
    );
    if version != VERSION && version != VERSION_1 {
        return Err(SnapshotError::UnsupportedVersion {
            found: version,
            supported: VERSION,
        });
    }
    let body = &bytes[HEADER_LEN..];
    if body.len() as u64 != len {
        return Err(SnapshotError::corrupt(format!(
            "body is {} bytes, header says {len}",
            body.len()
        )));
    }
    if crc32fast::hash(body) != crc {
        return Err(SnapshotError::corrupt("checksum mismatch"));
    }
    let undecodable = |e: postcard::Error| SnapshotError::Corrupt {
        detail: format!("undecodable version {version} body"),
        source: Some(Box::new(e)),
    };
    let body = if version == VERSION_1 {
        let v1: BodyV1 = postcard::from_bytes(body).map_err(undecodable)?;
        Body {
            hll_precision: v1.hll_precision,
            sketch_accuracy_bits: v1.sketch_accuracy_bits,
            taken_at_unix_secs: v1.taken_at_unix_secs,
            types: v1
                .types
                .into_iter()
                .map(|t| TypeRecord {
                    name: t.name,
                    cells: t.cells,
                    minutes: Vec::new(),
                })
                .collect(),
            users: v1.users,
        }
    } else {
        postcard::from_bytes(body).map_err(undecodable)?
    };
    if body.hll_precision != PRECISION || body.sketch_accuracy_bits != RELATIVE_ACCURACY.to_bits() {
        return Err(SnapshotError::incompatible(format!(
            "written with unique-users precision {} and sketch accuracy {}, this build uses {PRECISION} and {RELATIVE_ACCURACY}",
            body.hll_precision,
            f64::from_bits(body.sketch_accuracy_bits)
        )));
    }
    Ok(SnapshotData {
        taken_at_unix_secs: body.taken_at_unix_secs,
        types: body.types,
        users: body.users,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn finite_or_infinite() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>().prop_filter("not NaN", |v| !v.is_nan()),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(-0.0),
        ]
    }

    fn cell() -> impl Strategy<Value = CellRecord> {
        (
            any::<u64>(),
            any::<u64>(),
            finite_or_infinite(),
            finite_or_infinite(),
            finite_or_infinite(),
            prop::collection::vec(any::<u32>(), 0..8),
        )
            .prop_map(|(second, count, sum, min, max, bins)| CellRecord {
                second,
                count,
                sum,
                min,
                max,
                bins,
            })
    }

    fn data() -> impl Strategy<Value = SnapshotData> {
        let minute = (
            any::<u64>(),
            any::<u64>(),
            finite_or_infinite(),
            finite_or_infinite(),
            finite_or_infinite(),
        )
            .prop_map(|(minute, count, sum, min, max)| MinuteRecord {
                minute,
                count,
                sum,
                min,
                max,
            });
        let ty = (
            "[a-z.]{1,12}",
            prop::collection::vec(cell(), 0..6),
            prop::collection::vec(minute, 0..3),
        )
            .prop_map(|(name, cells, minutes)| TypeRecord {
                name,
                cells,
                minutes,
            });
        (
            any::<i64>(),
            prop::collection::vec(ty, 0..4),
            prop::collection::vec(any::<(u32, u32)>(), 0..10),
        )
            .prop_map(|(taken_at_unix_secs, types, users)| SnapshotData {
                taken_at_unix_secs,
                types,
                users,
            })
    }

    proptest! {
        /// The codec is lossless for any records (bits of floats included):
        /// the comparison is on the re-encoded bytes, so NaN-free bit
        /// patterns and signed zeros are compared exactly.
        #[test]
        fn encode_then_decode_is_lossless(data in data()) {
            let bytes = encode(&data);
            let back = decode(&bytes).unwrap();
            prop_assert_eq!(encode(&back), bytes);
            prop_assert_eq!(back, data);
        }

        /// Any flipped byte after the magic is an error, never a panic.
        #[test]
        fn a_flipped_byte_is_an_error(data in data(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = encode(&data);
            let at = MAGIC.len() + at.index(bytes.len() - MAGIC.len());
            bytes[at] ^= 1 << bit;
            prop_assert!(decode(&bytes).is_err());
        }
    }

    #[test]
    fn version_1_files_are_still_read() {
        #[derive(Serialize)]
        struct V1 {
            hll_precision: u32,
            sketch_accuracy_bits: u64,
            taken_at_unix_secs: i64,
            types: Vec<(String, Vec<CellRecord>)>,
            users: Vec<(u32, u32)>,
        }
        let cell = CellRecord {
            second: 60,
            count: 1,
            sum: 2.5,
            min: 2.5,
            max: 2.5,
            bins: vec![7],
        };
        let body = postcard::to_allocvec(&V1 {
            hll_precision: PRECISION,
            sketch_accuracy_bits: RELATIVE_ACCURACY.to_bits(),
            taken_at_unix_secs: 61,
            types: vec![("t".into(), vec![cell.clone()])],
            users: vec![(3, 61)],
        })
        .unwrap();
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&VERSION_1.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        let data = decode(&bytes).unwrap();
        assert_eq!(
            data.types,
            vec![TypeRecord {
                name: "t".into(),
                cells: vec![cell],
                minutes: vec![]
            }]
        );
        assert_eq!((data.taken_at_unix_secs, data.users), (61, vec![(3, 61)]));
    }
}

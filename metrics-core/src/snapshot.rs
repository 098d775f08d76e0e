//! The snapshot file: what `shutdown` writes and `restore` reads.
//!
//! Layout (little-endian):
//!
//! | bytes | field |
//! | --- | --- |
//! | 8 | magic `FKMETSNP` |
//! | 4 | format version (`1`) |
//! | 8 | body length |
//! | 4 | CRC-32 of the body |
//! | n | body: [postcard](https://docs.rs/postcard) encoding of `Body` |
//!
//! Only non-empty one-second cells are stored; minute totals are rebuilt from
//! them on load. Every field is validated on load (sorted sketch entries,
//! counts that add up, finite values, valid type names), so a damaged or
//! foreign file is an error, never a panic or a silently wrong state.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::SnapshotError;
use crate::hll::{PRECISION, SlidingHll};
use crate::processor::{MetricsProcessor, TOTAL};
use crate::sketch::{Bins, RELATIVE_ACCURACY};
use crate::window::{Cell, Exact};

const MAGIC: &[u8; 8] = b"FKMETSNP";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;

#[derive(Serialize, Deserialize)]
struct Body {
    /// Unique-users register bits; must match this build.
    hll_precision: u32,
    /// Sketch accuracy (as bits); must match this build.
    sketch_accuracy_bits: u64,
    taken_at_unix_secs: i64,
    types: Vec<TypeCells>,
    /// Non-zero unique-users slots as (index, second).
    users: Vec<(u32, u32)>,
}

#[derive(Serialize, Deserialize)]
struct TypeCells {
    name: String,
    cells: Vec<CellRecord>,
}

#[derive(Serialize, Deserialize)]
struct CellRecord {
    second: u64,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    bins: Vec<u32>,
}

/// Serializes the processor's state.
pub(crate) fn encode(processor: &MetricsProcessor) -> Vec<u8> {
    let mut types = Vec::new();
    for entry in processor.registry().entries() {
        let mut cells = Vec::new();
        entry.series.for_each_block(|minute, seconds| {
            for (offset, cell) in seconds.iter().enumerate() {
                if cell.exact.count > 0 {
                    cells.push(CellRecord {
                        second: minute * 60 + offset as u64,
                        count: cell.exact.count,
                        sum: cell.exact.sum,
                        min: cell.exact.min,
                        max: cell.exact.max,
                        bins: cell.bins.raw().to_vec(),
                    });
                }
            }
        });
        types.push(TypeCells {
            name: entry.name.to_string(),
            cells,
        });
    }
    let body = Body {
        hll_precision: PRECISION,
        sketch_accuracy_bits: RELATIVE_ACCURACY.to_bits(),
        taken_at_unix_secs: processor.now_sec(),
        types,
        users: processor.users().nonzero_slots(),
    };
    // Serializing plain structs into a Vec cannot fail.
    let body = postcard::to_allocvec(&body).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Writes `bytes` to `path` via a synced temporary file and a rename, so a
/// crash mid-write leaves the previous snapshot intact.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Validates `bytes` and loads them into a fresh `processor`. Returns the
/// number of cells loaded.
pub(crate) fn decode_into(
    bytes: &[u8],
    processor: &mut MetricsProcessor,
) -> Result<usize, SnapshotError> {
    let corrupt = |why: &str| SnapshotError::Corrupt(why.to_owned());
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::NotASnapshot);
    }
    if bytes.len() < HEADER_LEN {
        return Err(corrupt("truncated header"));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().map_err(|_| corrupt("header"))?);
    if version != VERSION {
        return Err(SnapshotError::UnsupportedVersion {
            found: version,
            supported: VERSION,
        });
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().map_err(|_| corrupt("header"))?);
    let crc = u32::from_le_bytes(bytes[20..24].try_into().map_err(|_| corrupt("header"))?);
    let body = &bytes[HEADER_LEN..];
    if body.len() as u64 != len {
        return Err(corrupt(&format!(
            "body is {} bytes, header says {len}",
            body.len()
        )));
    }
    if crc32fast::hash(body) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    let body: Body =
        postcard::from_bytes(body).map_err(|e| corrupt(&format!("undecodable body: {e}")))?;
    if body.hll_precision != PRECISION || body.sketch_accuracy_bits != RELATIVE_ACCURACY.to_bits() {
        return Err(SnapshotError::Incompatible(format!(
            "written with unique-users precision {} and sketch accuracy {}, this build uses {PRECISION} and {RELATIVE_ACCURACY}",
            body.hll_precision,
            f64::from_bits(body.sketch_accuracy_bits)
        )));
    }
    let config = processor.config();
    if body.types.len() > config.max_event_types {
        return Err(SnapshotError::Incompatible(format!(
            "{} event types exceed max_event_types = {}",
            body.types.len(),
            config.max_event_types
        )));
    }
    // Validate everything before touching the processor.
    let mut validated = Vec::with_capacity(body.types.len());
    for t in body.types {
        if t.name.is_empty() || t.name.len() > config.max_field_bytes || t.name == TOTAL {
            return Err(corrupt(&format!("invalid event type name {:?}", t.name)));
        }
        let mut cells = Vec::with_capacity(t.cells.len());
        for c in t.cells {
            let bins = Bins::from_raw(c.bins).map_err(|e| corrupt(&e))?;
            let finite = c.sum.is_finite() && c.min.is_finite() && c.max.is_finite();
            if c.count == 0 || bins.total() != c.count || !finite || c.min > c.max {
                return Err(corrupt(&format!(
                    "inconsistent cell for {:?} at second {}",
                    t.name, c.second
                )));
            }
            let cell = Cell {
                exact: Exact {
                    count: c.count,
                    sum: c.sum,
                    min: c.min,
                    max: c.max,
                },
                bins,
            };
            cells.push((c.second, cell));
        }
        validated.push((t.name, cells));
    }
    let users = SlidingHll::from_slots(&body.users).map_err(|e| corrupt(&e))?;

    let oldest = processor.now_sec() - processor.retention_secs() as i64 + 1;
    let mut loaded = 0;
    for (name, cells) in validated {
        let retained: Vec<_> = cells
            .into_iter()
            .filter(|(s, _)| *s as i64 >= oldest)
            .collect();
        if retained.is_empty() {
            continue;
        }
        loaded += retained.len();
        processor
            .registry()
            .with_entry(&name, |entry| {
                for (second, cell) in retained {
                    entry.series.load_cell(second, cell);
                }
            })
            .map_err(|_| SnapshotError::Incompatible("too many event types".into()))?;
    }
    processor.set_users(users);
    tracing::debug!(
        taken_at = body.taken_at_unix_secs,
        loaded,
        "snapshot decoded"
    );
    Ok(loaded)
}

//! Archival of old partitions to Parquet in an object store (feature `archive`).

//! # metrics_core: in-process real-time metrics aggregation
//!
//! Many threads ingest events; queries return count, sum, average, minimum,
//! maximum, p50/p90/p99 and unique users over the last N minutes, exactly at
//! one-second resolution, in bounded memory, with a lossless shutdown.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use metrics_core::{Config, Event, ManualClock, MetricsProcessor};
//!
//! let clock = ManualClock::new(SystemTime::now());
//! let processor = MetricsProcessor::new(Config::default().with_clock(clock.clone()));
//!
//! for (user, ms) in [("u1", 120.0), ("u2", 80.0), ("u1", 100.0)] {
//!     processor.process_event(Event {
//!         timestamp: clock.now().into(),
//!         user_id: user.into(),
//!         event_type: "checkout.latency_ms".into(),
//!         value: ms,
//!     })?;
//! }
//! clock.advance(Duration::from_secs(1));
//!
//! let m = processor.aggregates(5)?; // the last 5 minutes
//! assert_eq!(m["checkout.latency_ms.count"], 3.0);
//! assert_eq!(m["checkout.latency_ms.avg"], 100.0);
//! assert_eq!(m["checkout.latency_ms.max"], 120.0);
//! assert!((m["checkout.latency_ms.p50"] - 100.0).abs() <= 1.0); // within 1 %
//! assert_eq!(m["total.unique_users"], 2.0);
//!
//! processor.shutdown(Duration::from_secs(5))?;
//! # Ok::<(), metrics_core::Error>(())
//! ```
//!
//! ## What it guarantees
//!
//! * **Windows** `(now − N min, now]` at one-second resolution, for any `N` up
//!   to the retention (default 60). Late events within the retention land in
//!   their own second.
//! * **count, sum, avg, min, max** are exact; **p50/p90/p99** are within 1 %
//!   relative error of the exact quantile (a DDSketch-style log-bucket
//!   sketch); **unique users** within 2 % (a sliding HyperLogLog).
//! * **Bad input** (non-finite values, empty or oversized fields, the reserved
//!   type `total`, timestamps beyond the skew or the retention, too many event
//!   types) gets a typed [`Error`], is counted in [`Stats`], and changes
//!   nothing else.
//! * **Bounded memory**: at most `max_event_types` series of
//!   `retention + skew` minutes each, plus a fixed 12.6 MiB unique-users
//!   sketch. See `docs/metrics-core.md` for the analysis.
//! * **Shutdown** within a timeout, losing nothing that was accepted; with
//!   [`Config::snapshot_path`] the state survives a restart via
//!   [`MetricsProcessor::restore`].
//!
//! ## Features
//!
//! * `http`: the hyper 1.x adapter in the `http` module (NDJSON ingest,
//!   aggregates, Prometheus text, health).
//!
//! The design, its concurrency patterns and the accuracy proofs are in
//! `docs/metrics-core.md`.
#![forbid(unsafe_code)]

mod config;
mod durable;
mod error;
mod event;
mod hll;
mod processor;
mod registry;
mod sketch;
mod snapshot;
mod stats;
mod summary;
mod window;

#[cfg(feature = "http")]
pub mod http;

pub use config::Config;
pub use error::{Error, ErrorKind, Field, RejectReason, SnapshotError, SnapshotErrorKind};
pub use event::{Event, EventRef};
pub use processor::{MemoryUsage, MetricsProcessor, TOTAL};
pub use sketch::RELATIVE_ACCURACY;
pub use stats::Stats;
pub use summary::{TypeSummary, WindowSummary};
pub use time_kit::{Clock, ManualClock, SystemClock};

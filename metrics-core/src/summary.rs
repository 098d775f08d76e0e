//! Query results: typed summaries and the flat `"type.stat"` map.

use std::collections::{BTreeMap, HashMap};

/// The statistics of one event type over a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TypeSummary {
    /// Number of events (exact).
    pub count: u64,
    /// Sum of values (exact up to floating-point addition order).
    pub sum: f64,
    /// `sum / count`.
    pub avg: f64,
    /// Smallest value (exact).
    pub min: f64,
    /// Largest value (exact).
    pub max: f64,
    /// Median, within 1 % relative error.
    pub p50: f64,
    /// 90th percentile, within 1 % relative error.
    pub p90: f64,
    /// 99th percentile, within 1 % relative error.
    pub p99: f64,
    /// `count` divided by the window's length in seconds.
    pub rate_per_sec: f64,
}

/// Everything `aggregates` reports for one window.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowSummary {
    /// The window's length in minutes.
    pub minutes: u32,
    /// Per event type, for types with at least one event in the window.
    pub types: BTreeMap<String, TypeSummary>,
    /// Events of all types.
    pub total_count: u64,
    /// Sum of values over all types.
    pub total_sum: f64,
    /// `total_count` per second of window.
    pub total_rate_per_sec: f64,
    /// Distinct `user_id`s, within 2 % relative error (±2 below 100).
    pub unique_users: f64,
}

impl WindowSummary {
    /// The flat map: `T.count`, `T.sum`, `T.avg`, `T.min`, `T.max`, `T.p50`,
    /// `T.p90`, `T.p99`, `T.rate_per_sec` per type `T`, and `total.count`,
    /// `total.sum`, `total.rate_per_sec`, `total.unique_users`.
    pub fn to_map(&self) -> HashMap<String, f64> {
        let mut map = HashMap::with_capacity(self.types.len() * 9 + 4);
        for (name, s) in &self.types {
            let stats = [
                ("count", s.count as f64),
                ("sum", s.sum),
                ("avg", s.avg),
                ("min", s.min),
                ("max", s.max),
                ("p50", s.p50),
                ("p90", s.p90),
                ("p99", s.p99),
                ("rate_per_sec", s.rate_per_sec),
            ];
            for (stat, value) in stats {
                map.insert(format!("{name}.{stat}"), value);
            }
        }
        map.insert("total.count".into(), self.total_count as f64);
        map.insert("total.sum".into(), self.total_sum);
        map.insert("total.rate_per_sec".into(), self.total_rate_per_sec);
        map.insert("total.unique_users".into(), self.unique_users);
        map
    }
}

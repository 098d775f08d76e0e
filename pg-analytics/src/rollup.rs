//! The daily rollup's arithmetic: counts and sums per (tenant, UTC day).
//!
//! The rollup keeps sums of whole microseconds and counts, never averages,
//! so adding batches in any order, split in any way, gives the same
//! totals: an average is computed only when it is read.

use std::collections::BTreeMap;

use chrono::NaiveDate;

use crate::model::{TenantId, ValidEvent};

/// One (tenant, day) cell's totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DayTotals {
    /// Events counted.
    pub events: i64,
    /// Their processing times, summed, in microseconds.
    pub sum_processing_time_us: i64,
}

impl DayTotals {
    /// The mean processing time in milliseconds (`None` with no events).
    pub fn avg_processing_time_ms(&self) -> Option<f64> {
        (self.events > 0).then(|| self.sum_processing_time_us as f64 / self.events as f64 / 1000.0)
    }

    /// Adds `other` (saturating: a cell would need 2^63 µs to overflow).
    pub fn add(&mut self, other: DayTotals) {
        self.events = self.events.saturating_add(other.events);
        self.sum_processing_time_us = self
            .sum_processing_time_us
            .saturating_add(other.sum_processing_time_us);
    }
}

/// Totals per (tenant, day), in key order (the order rollup rows are
/// locked in, so concurrent writers never deadlock on them).
pub type DailyTotals = BTreeMap<(TenantId, NaiveDate), DayTotals>;

/// The totals of `events`.
pub fn aggregate<'a>(events: impl IntoIterator<Item = &'a ValidEvent>) -> DailyTotals {
    let mut totals = DailyTotals::new();
    for event in events {
        totals
            .entry((event.tenant_id, event.day()))
            .or_default()
            .add(DayTotals {
                events: 1,
                sum_processing_time_us: event.processing_time_us,
            });
    }
    totals
}

/// Adds `more` into `into`.
pub fn merge(into: &mut DailyTotals, more: &DailyTotals) {
    for (key, totals) in more {
        into.entry(*key).or_default().add(*totals);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use proptest::prelude::*;

    fn events() -> impl Strategy<Value = Vec<ValidEvent>> {
        prop::collection::vec((1i64..5, 0i64..(40 * 86_400), 0i64..5_000_000), 0..200).prop_map(
            |rows| {
                rows.into_iter()
                    .map(|(tenant, secs, us)| ValidEvent {
                        tenant_id: TenantId(tenant),
                        created_at: Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap(),
                        event_type: "e".into(),
                        processing_time_us: us,
                    })
                    .collect()
            },
        )
    }

    proptest! {
        /// Any split into batches, merged in any order, gives the totals of
        /// the whole: what makes the rollup exact under late, reordered and
        /// concurrent batches.
        #[test]
        fn batches_merged_in_any_order_equal_the_whole(
            events in events(),
            cuts in prop::collection::vec(0usize..200, 0..6),
            reverse in any::<bool>(),
        ) {
            let whole = aggregate(&events);
            let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c.min(events.len())).collect();
            bounds.push(0);
            bounds.push(events.len());
            bounds.sort_unstable();
            let mut batches: Vec<DailyTotals> = bounds
                .windows(2)
                .map(|w| aggregate(&events[w[0]..w[1]]))
                .collect();
            if reverse {
                batches.reverse();
            }
            let mut merged = DailyTotals::new();
            for batch in &batches {
                merge(&mut merged, batch);
            }
            prop_assert_eq!(merged, whole.clone());
            let count: i64 = whole.values().map(|t| t.events).sum();
            prop_assert_eq!(count, events.len() as i64);
        }
    }
}

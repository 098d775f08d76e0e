//! Counters of the order service, read by its metrics endpoint.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::model::CancelReason;

/// Counters since start (monotonic).
#[derive(Debug, Default)]
pub struct OrderStats {
    pub(crate) created: AtomicU64,
    pub(crate) replayed: AtomicU64,
    pub(crate) rejected_out_of_stock: AtomicU64,
    pub(crate) confirmed: AtomicU64,
    pub(crate) cancelled: [AtomicU64; CancelReason::ALL.len()],
    pub(crate) needs_attention: AtomicU64,
    pub(crate) step_retries: AtomicU64,
    pub(crate) compensation_retries: AtomicU64,
    pub(crate) leases_lost: AtomicU64,
    pub(crate) resumed: AtomicU64,
}

/// A copy of the counters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// Orders created (201).
    pub created: u64,
    /// Create requests answered from an idempotency key's stored answer.
    pub replayed: u64,
    /// Create requests refused for lack of stock.
    pub rejected_out_of_stock: u64,
    /// Sagas that reached `Confirmed`.
    pub confirmed: u64,
    /// Sagas that reached `Cancelled`, by reason (in [`CancelReason::ALL`] order).
    pub cancelled: Vec<(CancelReason, u64)>,
    /// Sagas that reached `NeedsAttention`.
    pub needs_attention: u64,
    /// Forward steps retried after a transient failure.
    pub step_retries: u64,
    /// Compensations retried.
    pub compensation_retries: u64,
    /// Sagas this instance stopped driving because another took its lease.
    pub leases_lost: u64,
    /// Sagas claimed by the poller (resumed after a crash, a retry delay or a
    /// cancel request).
    pub resumed: u64,
}

impl OrderStats {
    pub(crate) fn cancelled(&self, reason: CancelReason) {
        if let Some(i) = CancelReason::ALL.iter().position(|r| *r == reason) {
            self.cancelled[i].fetch_add(1, Relaxed);
        }
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            created: self.created.load(Relaxed),
            replayed: self.replayed.load(Relaxed),
            rejected_out_of_stock: self.rejected_out_of_stock.load(Relaxed),
            confirmed: self.confirmed.load(Relaxed),
            cancelled: CancelReason::ALL
                .iter()
                .zip(&self.cancelled)
                .map(|(reason, n)| (*reason, n.load(Relaxed)))
                .collect(),
            needs_attention: self.needs_attention.load(Relaxed),
            step_retries: self.step_retries.load(Relaxed),
            compensation_retries: self.compensation_retries.load(Relaxed),
            leases_lost: self.leases_lost.load(Relaxed),
            resumed: self.resumed.load(Relaxed),
        }
    }
}

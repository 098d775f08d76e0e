//! Acceptance and rejection counters, striped so hot-path increments from
//! different threads do not share a cache line.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

use crate::error::RejectReason;

/// Counters of accepted and rejected events since the processor started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Events accepted into the aggregates.
    pub accepted: u64,
    rejected: [u64; RejectReason::ALL.len()],
}

impl Stats {
    /// Events rejected for `reason`.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason.index()]
    }

    /// Events rejected for any reason.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().sum()
    }

    /// `(reason, count)` for every reason, zeros included.
    pub fn rejections(&self) -> impl Iterator<Item = (RejectReason, u64)> + '_ {
        RejectReason::ALL.iter().map(|&r| (r, self.rejected(r)))
    }
}

const STRIPES: usize = 32;

/// Per-thread-stripe hot counters. Calls in flight are `started − finished`
/// and events accepted are `finished − rejected`, so a call costs two atomic
/// increments on a line its thread owns.
#[derive(Debug, Default)]
pub(crate) struct Stripe {
    pub(crate) started: AtomicU64,
    pub(crate) finished: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct Counters {
    stripes: Box<[CachePadded<Stripe>]>,
    rejected: [AtomicU64; RejectReason::ALL.len()],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            stripes: (0..STRIPES)
                .map(|_| CachePadded::new(Stripe::default()))
                .collect(),
            rejected: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

thread_local! {
    static STRIPE_INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// This thread's stripe: assigned round-robin on first use, so up to
/// `STRIPES` producer threads never share one.
fn stripe_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    STRIPE_INDEX.with(|i| {
        let mut index = i.get();
        if index == usize::MAX {
            index = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
            i.set(index);
        }
        index
    })
}

impl Counters {
    pub(crate) fn stripe(&self) -> &Stripe {
        &self.stripes[stripe_index()]
    }

    pub(crate) fn reject(&self, reason: RejectReason) {
        self.rejected[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Calls in flight. Per stripe, `finished` is read before `started`, so a
    /// call that started before this read and has not finished is always
    /// counted (the result can overcount, never undercount).
    pub(crate) fn in_flight(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| {
                let finished = s.finished.load(Ordering::SeqCst);
                s.started.load(Ordering::SeqCst).saturating_sub(finished)
            })
            .sum()
    }

    /// Exact when no call is in flight; a rejection is counted before its
    /// call finishes, so `accepted` never overcounts.
    pub(crate) fn snapshot(&self) -> Stats {
        let finished: u64 = self
            .stripes
            .iter()
            .map(|s| s.finished.load(Ordering::Acquire))
            .sum();
        let rejected: [u64; RejectReason::ALL.len()] =
            std::array::from_fn(|i| self.rejected[i].load(Ordering::Acquire));
        Stats {
            accepted: finished.saturating_sub(rejected.iter().sum()),
            rejected,
        }
    }
}

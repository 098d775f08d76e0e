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

/// Per-thread-stripe hot counters: calls in flight and events accepted.
#[derive(Debug, Default)]
pub(crate) struct Stripe {
    pub(crate) in_flight: AtomicU64,
    pub(crate) accepted: AtomicU64,
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

    pub(crate) fn in_flight(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.in_flight.load(Ordering::SeqCst))
            .sum()
    }

    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            accepted: self
                .stripes
                .iter()
                .map(|s| s.accepted.load(Ordering::Relaxed))
                .sum(),
            rejected: std::array::from_fn(|i| self.rejected[i].load(Ordering::Relaxed)),
        }
    }
}

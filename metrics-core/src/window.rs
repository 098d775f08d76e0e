//! The time series of one event type: a ring of minute blocks, each holding
//! sixty one-second cells and their pre-merged minute total.
//!
//! A query for `(t0, now]` reads the minute totals of the minutes it covers
//! whole and the one-second cells of the (at most two) minutes it cuts, so
//! `aggregates(60)` reads about 120 cells per type instead of 3,600, while
//! windows stay exact at one-second resolution.
//!
//! Blocks are tagged with their minute. The ring holds enough minutes for the
//! retention plus the allowed future skew, so a block is reused only after
//! every second in it has left the retention; a writer that finds its block
//! already reused by a later minute drops the (expired) event.

use parking_lot::Mutex;

use crate::sketch::{Bins, KeyCounts};

/// Sentinel tag of a block that has never held data.
const EMPTY: u64 = u64::MAX;

/// The exact statistics of a set of values.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Exact {
    pub(crate) count: u64,
    pub(crate) sum: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

impl Exact {
    /// Adds one value.
    #[inline]
    fn record(&mut self, value: f64) {
        self.merge(&Exact {
            count: 1,
            sum: value,
            min: value,
            max: value,
        });
    }

    /// Adds another set's statistics.
    #[inline]
    pub(crate) fn merge(&mut self, other: &Exact) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            // Copied, not added to 0.0: `0.0 + -0.0` is `+0.0`, and a
            // single `-0.0` must come back as `-0.0`.
            *self = *other;
            return;
        }
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.count += other.count;
        self.sum += other.sum;
    }
}

/// Exact statistics plus bucket counts for a set of events.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Cell {
    pub(crate) exact: Exact,
    pub(crate) bins: Bins,
}

impl Cell {
    #[inline]
    fn record(&mut self, key: u32, value: f64) {
        self.exact.record(value);
        self.bins.insert(key);
    }

    fn clear(&mut self) {
        self.exact = Exact::default();
        self.bins.clear();
    }

    pub(crate) fn merge_from(&mut self, other: &Cell) {
        self.exact.merge(&other.exact);
        self.bins.merge_from(&other.bins);
    }

    fn heap_bytes(&self) -> usize {
        self.bins.heap_bytes()
    }
}

/// One minute of one event type.
#[derive(Debug)]
pub(crate) struct MinuteBlock {
    /// Minute number (Unix seconds / 60) this block holds, or `EMPTY`.
    pub(crate) minute: u64,
    /// Merge of all `seconds`, maintained on every write.
    pub(crate) total: Cell,
    /// `seconds[s]` holds second `minute * 60 + s`.
    pub(crate) seconds: Box<[Cell; 60]>,
}

impl MinuteBlock {
    fn new() -> MinuteBlock {
        MinuteBlock {
            minute: EMPTY,
            total: Cell::default(),
            seconds: Box::new(std::array::from_fn(|_| Cell::default())),
        }
    }

    fn reset(&mut self, minute: u64) {
        self.minute = minute;
        self.total.clear();
        for cell in self.seconds.iter_mut() {
            cell.clear();
        }
    }
}

/// Running totals of a query over one type.
#[derive(Debug, Default)]
pub(crate) struct WindowAccumulator {
    pub(crate) exact: Exact,
    pub(crate) keys: KeyCounts,
}

impl WindowAccumulator {
    fn add(&mut self, cell: &Cell) {
        if cell.exact.count == 0 {
            return;
        }
        self.exact.merge(&cell.exact);
        self.keys.add_bins(&cell.bins);
    }
}

/// The ring of minute blocks of one event type.
#[derive(Debug)]
pub(crate) struct Series {
    blocks: Box<[Mutex<MinuteBlock>]>,
}

impl Series {
    /// A ring of `minutes` blocks.
    pub(crate) fn new(minutes: usize) -> Series {
        Series {
            blocks: (0..minutes)
                .map(|_| Mutex::new(MinuteBlock::new()))
                .collect(),
        }
    }

    fn block(&self, minute: u64) -> &Mutex<MinuteBlock> {
        &self.blocks[(minute % self.blocks.len() as u64) as usize]
    }

    /// Records a value in its second. Returns `false` if the second's block
    /// already holds a later minute (the event expired while in flight).
    #[inline]
    pub(crate) fn record(&self, second: u64, key: u32, value: f64) -> bool {
        let minute = second / 60;
        let mut block = self.block(minute).lock();
        if block.minute != minute {
            if block.minute != EMPTY && block.minute > minute {
                return false;
            }
            block.reset(minute);
        }
        block.seconds[(second % 60) as usize].record(key, value);
        block.total.record(key, value);
        true
    }

    /// Accumulates every event whose second lies in `(after, until]`.
    pub(crate) fn accumulate(&self, after: u64, until: u64, acc: &mut WindowAccumulator) {
        if until <= after {
            return;
        }
        let first = after + 1;
        for minute in first / 60..=until / 60 {
            let block = self.block(minute).lock();
            if block.minute != minute {
                continue;
            }
            let start = minute * 60;
            let lo = first.max(start);
            let hi = until.min(start + 59);
            if lo == start && hi == start + 59 {
                acc.add(&block.total);
            } else {
                for second in lo..=hi {
                    acc.add(&block.seconds[(second - start) as usize]);
                }
            }
        }
    }

    /// Calls `f(minute, total, seconds)` for each block holding data, under
    /// its lock.
    pub(crate) fn for_each_block(&self, mut f: impl FnMut(u64, &Cell, &[Cell; 60])) {
        for block in self.blocks.iter() {
            let block = block.lock();
            if block.minute != EMPTY {
                f(block.minute, &block.total, &block.seconds);
            }
        }
    }

    /// Loads one minute from a snapshot into a fresh series: its total and
    /// its `(second of minute, cell)`s. Ignored if the ring slot already
    /// holds a later minute.
    pub(crate) fn load_minute(&self, minute: u64, total: Cell, seconds: Vec<(usize, Cell)>) {
        let mut block = self.block(minute).lock();
        if block.minute != minute {
            if block.minute != EMPTY && block.minute > minute {
                return;
            }
            block.reset(minute);
        }
        block.total = total;
        for (offset, cell) in seconds {
            if let Some(slot) = block.seconds.get_mut(offset) {
                *slot = cell;
            }
        }
    }

    /// Heap bytes held by this series (blocks, cells and bins).
    pub(crate) fn heap_bytes(&self) -> usize {
        let mut bytes = self.blocks.len()
            * (std::mem::size_of::<Mutex<MinuteBlock>>() + std::mem::size_of::<[Cell; 60]>());
        for block in self.blocks.iter() {
            let block = block.lock();
            bytes += block.total.heap_bytes();
            bytes += block.seconds.iter().map(Cell::heap_bytes).sum::<usize>();
        }
        bytes
    }
}

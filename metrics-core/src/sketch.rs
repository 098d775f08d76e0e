//! A relative-error quantile sketch in the style of DDSketch.
//!
//! Every finite value `v` maps to a *key*: `0` for zero, and for `|v| > 0`
//! the logarithmic bucket `i = ceil(log_γ |v|)` with `γ = (1 + α) / (1 − α)`,
//! laid out so that key order is value order (negative values below the zero
//! key, larger magnitudes further out). A bucket covers `(γ^(i−1), γ^i]` and
//! is represented by `2γ^i / (γ + 1)`, which is within relative error `α` of
//! every value in it. A quantile read from bucket counts is therefore the
//! representative of the bucket that holds the exact quantile's item, hence
//! within `α` of it. We use `α = 0.99 %` so that floating-point rounding at
//! bucket edges still stays inside the promised 1 %.
//!
//! The key space covers every finite `f64` (subnormals included) in 146,895
//! keys, which fits in 18 bits. A [`Bins`] stores the keys a cell has seen as
//! one sorted `Vec<u32>` of packed `key << 14 | count` entries: 4 bytes per
//! occupied bucket, no allocation once warm. A count that reaches 16,383
//! starts another entry for the same key.

/// The relative accuracy `α` of quantiles.
pub const RELATIVE_ACCURACY: f64 = 0.0099;
/// `ln γ` for `γ = (1 + α) / (1 − α)`; checked against `RELATIVE_ACCURACY` in tests.
const LN_GAMMA: f64 = 0.019_800_646_904_042_287;
/// `ln(2 / (γ + 1))`: the representative of bucket `i` is `exp(i ln γ + this)`.
const LN_REPRESENTATIVE_FACTOR: f64 = -0.009_949_330_853_668_103;
/// Lowest bucket index needed: below `log_γ` of the smallest subnormal.
const MIN_INDEX: i32 = -37_598;
/// Highest bucket index needed: above `log_γ f64::MAX`.
const MAX_INDEX: i32 = 35_848;
const SPAN: u32 = (MAX_INDEX - MIN_INDEX) as u32;
/// The key of zero; negative values have smaller keys, positive larger.
pub(crate) const ZERO_KEY: u32 = SPAN + 1;
/// One past the largest key.
pub(crate) const KEY_LIMIT: u32 = 2 * SPAN + 3;

const COUNT_BITS: u32 = 14;
const COUNT_MASK: u32 = (1 << COUNT_BITS) - 1;
const KEY_BITS: u32 = 32 - COUNT_BITS;
const _: () = assert!(KEY_LIMIT <= 1 << KEY_BITS, "keys must fit beside the count");

/// The bucket key of a finite value.
#[inline]
pub(crate) fn key_of(value: f64) -> u32 {
    if value == 0.0 {
        return ZERO_KEY;
    }
    let index = (value.abs().ln() / LN_GAMMA).ceil() as i32;
    let offset = (index.clamp(MIN_INDEX, MAX_INDEX) - MIN_INDEX) as u32;
    if value > 0.0 {
        ZERO_KEY + 1 + offset
    } else {
        ZERO_KEY - 1 - offset
    }
}

/// The representative value of a key: within `α` of every value mapping to it.
pub(crate) fn value_of(key: u32) -> f64 {
    if key == ZERO_KEY {
        return 0.0;
    }
    let (offset, sign) = if key > ZERO_KEY {
        (key - ZERO_KEY - 1, 1.0)
    } else {
        (ZERO_KEY - 1 - key, -1.0)
    };
    let index = MIN_INDEX + offset as i32;
    let magnitude = (f64::from(index) * LN_GAMMA + LN_REPRESENTATIVE_FACTOR).exp();
    sign * magnitude.min(f64::MAX)
}

/// The sparse bucket counts of one cell: sorted packed `key << 14 | count`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Bins {
    entries: Vec<u32>,
}

impl Bins {
    /// Counts one value with `key`.
    #[inline]
    pub(crate) fn insert(&mut self, key: u32) {
        let last_of_key = (key << COUNT_BITS) | COUNT_MASK;
        let at = self.entries.partition_point(|&e| e <= last_of_key);
        if at > 0 {
            let prev = &mut self.entries[at - 1];
            if *prev >> COUNT_BITS == key && *prev & COUNT_MASK < COUNT_MASK {
                *prev += 1;
                return;
            }
        }
        self.entries.insert(at, (key << COUNT_BITS) | 1);
    }

    /// Adds every count of `other` into `self` (a sorted merge).
    pub(crate) fn merge_from(&mut self, other: &Bins) {
        for (key, count) in other.iter() {
            self.add(key, count);
        }
    }

    fn add(&mut self, key: u32, mut count: u64) {
        while count > 0 {
            let last_of_key = (key << COUNT_BITS) | COUNT_MASK;
            let at = self.entries.partition_point(|&e| e <= last_of_key);
            if at > 0 {
                let prev = &mut self.entries[at - 1];
                let room = u64::from(COUNT_MASK - (*prev & COUNT_MASK));
                if *prev >> COUNT_BITS == key && room > 0 {
                    let take = room.min(count);
                    *prev += take as u32;
                    count -= take;
                    continue;
                }
            }
            let take = count.min(u64::from(COUNT_MASK));
            self.entries.insert(at, (key << COUNT_BITS) | take as u32);
            count -= take;
        }
    }

    /// Empties the bins, keeping the allocation for reuse.
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }

    /// `(key, count)` in key order; a key may appear more than once.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.entries
            .iter()
            .map(|&e| (e >> COUNT_BITS, u64::from(e & COUNT_MASK)))
    }

    /// Sum of all counts.
    pub(crate) fn total(&self) -> u64 {
        self.iter().map(|(_, c)| c).sum()
    }

    /// Heap bytes held (capacity, not length).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<u32>()
    }

    /// The packed entries, for snapshots.
    pub(crate) fn raw(&self) -> &[u32] {
        &self.entries
    }

    /// Rebuilds bins from snapshot entries, or explains why they are invalid.
    pub(crate) fn from_raw(entries: Vec<u32>) -> Result<Bins, String> {
        for pair in entries.windows(2) {
            if pair[0] > pair[1] {
                return Err("sketch entries are not sorted".into());
            }
        }
        for &e in &entries {
            if e & COUNT_MASK == 0 || e >> COUNT_BITS >= KEY_LIMIT {
                return Err(format!("invalid sketch entry {e:#x}"));
            }
        }
        Ok(Bins { entries })
    }
}

/// Bucket counts merged from many [`Bins`] for one query: a dense array over
/// the key range seen so far, grown on demand (queries merge a few hundred
/// cells whose keys cluster, so the range stays small).
#[derive(Debug, Default)]
pub(crate) struct KeyCounts {
    base: u32,
    counts: Vec<u64>,
}

impl KeyCounts {
    /// Adds every count of `bins`.
    pub(crate) fn add_bins(&mut self, bins: &Bins) {
        let (Some(first), Some(last)) = (bins.entries.first(), bins.entries.last()) else {
            return;
        };
        self.cover(first >> COUNT_BITS, last >> COUNT_BITS);
        for (key, count) in bins.iter() {
            self.counts[(key - self.base) as usize] += count;
        }
    }

    /// Grows the dense range to include `lo..=hi`.
    fn cover(&mut self, lo: u32, hi: u32) {
        if self.counts.is_empty() {
            self.base = lo;
            self.counts.resize((hi - lo + 1) as usize, 0);
            return;
        }
        let end = self.base + self.counts.len() as u32;
        if lo < self.base {
            let grow = (self.base - lo) as usize;
            self.counts.splice(0..0, std::iter::repeat_n(0, grow));
            self.base = lo;
        }
        if hi >= end.max(self.base) {
            let len = (hi - self.base + 1) as usize;
            if len > self.counts.len() {
                self.counts.resize(len, 0);
            }
        }
    }

    /// The values at the given quantiles (each in `0..=1`, ascending), using
    /// the lower rank `floor(q · (n − 1))`, clamped to `[min, max]`.
    /// Returns `None` when empty.
    pub(crate) fn quantiles<const N: usize>(
        &self,
        qs: [f64; N],
        min: f64,
        max: f64,
    ) -> Option<[f64; N]> {
        let total: u64 = self.counts.iter().sum();
        if total == 0 {
            return None;
        }
        let mut out = [0.0; N];
        let mut next = 0;
        let mut seen = 0u64;
        for (offset, &count) in self.counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            seen += count;
            while next < N && rank(qs[next], total) < seen {
                out[next] = value_of(self.base + offset as u32).clamp(min, max);
                next += 1;
            }
            if next == N {
                break;
            }
        }
        Some(out)
    }
}

/// The 0-based rank of quantile `q` among `n` sorted items: `floor(q(n − 1))`.
pub(crate) fn rank(q: f64, n: u64) -> u64 {
    ((q * (n - 1) as f64).floor() as u64).min(n - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn constants_match_the_accuracy() {
        let gamma = (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY);
        assert!((gamma.ln() - LN_GAMMA).abs() < 1e-15);
        assert!(((2.0 / (gamma + 1.0)).ln() - LN_REPRESENTATIVE_FACTOR).abs() < 1e-15);
        assert!(f64::from(MIN_INDEX) * LN_GAMMA < (5e-324f64).ln());
        assert!(f64::from(MAX_INDEX - 1) * LN_GAMMA > f64::MAX.ln());
    }

    #[test]
    fn extremes_map_inside_the_key_space() {
        for v in [
            f64::MIN_POSITIVE,
            5e-324,
            f64::MAX,
            -f64::MAX,
            -5e-324,
            1.0,
            -1.0,
        ] {
            let k = key_of(v);
            assert!(k < KEY_LIMIT, "{v} -> {k}");
            let r = value_of(k);
            assert!(((r - v) / v).abs() <= 0.01, "{v} -> {r}");
        }
        assert_eq!(key_of(0.0), ZERO_KEY);
        assert_eq!(key_of(-0.0), ZERO_KEY);
    }

    #[test]
    fn saturated_counts_spill_into_a_new_entry() {
        let mut b = Bins::default();
        for _ in 0..(COUNT_MASK as u64 * 2 + 5) {
            b.insert(42);
        }
        b.insert(7);
        assert_eq!(b.raw().len(), 4);
        assert_eq!(b.total(), COUNT_MASK as u64 * 2 + 6);
        let mut merged = Bins::default();
        merged.merge_from(&b);
        merged.merge_from(&b);
        assert_eq!(merged.total(), 2 * b.total());
    }

    proptest! {
        #[test]
        fn representative_is_within_alpha(v in prop_oneof![
            any::<f64>().prop_filter("finite", |v| v.is_finite()),
            -1e6f64..1e6,
        ]) {
            let r = value_of(key_of(v));
            if v == 0.0 {
                prop_assert_eq!(r, 0.0);
            } else {
                prop_assert!(((r - v) / v).abs() <= 0.01, "{} -> {}", v, r);
            }
        }

        #[test]
        fn key_order_is_value_order(a in any::<f64>(), b in any::<f64>()) {
            prop_assume!(a.is_finite() && b.is_finite());
            if a < b {
                prop_assert!(key_of(a) <= key_of(b));
            }
        }

        #[test]
        fn quantiles_are_within_one_percent(mut values in prop::collection::vec(-1e9f64..1e9, 1..400)) {
            let mut bins = Bins::default();
            for &v in &values {
                bins.insert(key_of(v));
            }
            let mut acc = KeyCounts::default();
            acc.add_bins(&bins);
            values.sort_by(f64::total_cmp);
            let (min, max) = (values[0], values[values.len() - 1]);
            let got = acc.quantiles([0.0, 0.5, 0.9, 0.99, 1.0], min, max).unwrap();
            for (q, g) in [0.0, 0.5, 0.9, 0.99, 1.0].into_iter().zip(got) {
                let exact = values[rank(q, values.len() as u64) as usize];
                prop_assert!((g - exact).abs() <= 0.01 * exact.abs(), "q{} exact {} got {}", q, exact, g);
            }
        }
    }
}

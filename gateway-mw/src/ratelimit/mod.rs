//! Keyed rate limiting with GCRA (the generic cell rate algorithm), exact
//! under concurrency and bounded in memory.
//!
//! A quota of `count` requests per `period` with a `burst` allows `burst`
//! requests at once and then one every `period / count`. GCRA keeps a single
//! number per key, the *theoretical arrival time* (TAT): a request at `now`
//! is allowed when `now ≥ TAT − (burst − 1)·T` (with `T = period / count`),
//! and then moves the TAT to `max(TAT, now) + T`. Over any run of length `t`
//! starting from a fresh key it allows at most `burst + ⌊t / T⌋` requests,
//! which is the exactness the tests assert with 64 concurrent tasks.
//!
//! Keys live in `SHARDS` mutex-guarded maps, so an update is one short
//! critical section on one shard. Memory is bounded by
//! [`LimiterConfig::max_keys`]: a key whose TAT has passed is
//! indistinguishable from a fresh key, so it can be dropped at no cost in
//! accuracy; a full shard first drops all such keys, and if every key is still
//! active it evicts one (which can only err in the caller's favour: the
//! evicted key starts again with a full burst). Evictions are counted.
//!
//! ```
//! use std::time::Duration;
//! use gateway_mw::ratelimit::{KeyedLimiter, LimiterConfig, Quota};
//!
//! let limiter = KeyedLimiter::new(LimiterConfig::new(Quota::per_minute(1_000)));
//! let start = limiter.now_nanos();
//! let d = limiter.check_at("user-1", start);
//! assert!(d.allowed);
//! assert_eq!(d.limit, 1_000);
//! assert_eq!(d.remaining, 999);
//! ```

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
pub use redis::{FailurePolicy, RedisCheck, RedisLimitError, RedisLimiter, RedisLimiterConfig};

const SHARDS: usize = 64;

/// A rate: `count` requests per `period`, with bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Requests per period.
    pub count: u32,
    /// The period.
    pub period: Duration,
    /// Requests allowed at once from a fresh key (at least 1).
    pub burst: u32,
}

impl Quota {
    /// `count` per minute, with a burst of `count`.
    pub fn per_minute(count: u32) -> Quota {
        Quota {
            count: count.max(1),
            period: Duration::from_secs(60),
            burst: count.max(1),
        }
    }

    /// `count` per second, with a burst of `count`.
    pub fn per_second(count: u32) -> Quota {
        Quota {
            count: count.max(1),
            period: Duration::from_secs(1),
            burst: count.max(1),
        }
    }

    /// The same rate with a different burst (at least 1).
    pub fn with_burst(mut self, burst: u32) -> Quota {
        self.burst = burst.max(1);
        self
    }

    /// Nanoseconds between requests at the sustained rate (`T`).
    pub fn emission_interval_nanos(&self) -> u64 {
        (self.period.as_nanos() / u128::from(self.count.max(1))).max(1) as u64
    }

    /// How far ahead of `now` the TAT may run (`(burst − 1)·T`).
    fn tolerance_nanos(&self) -> u64 {
        self.emission_interval_nanos()
            .saturating_mul(u64::from(self.burst.max(1) - 1))
    }
}

/// Limiter settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LimiterConfig {
    /// The quota every key gets.
    pub quota: Quota,
    /// The most keys held at once. Default 1,000,000.
    pub max_keys: usize,
}

impl LimiterConfig {
    /// `quota` for every key, holding at most 1,000,000 keys.
    pub fn new(quota: Quota) -> LimiterConfig {
        LimiterConfig {
            quota,
            max_keys: 1_000_000,
        }
    }

    /// Sets [`LimiterConfig::max_keys`].
    pub fn with_max_keys(mut self, max: usize) -> Self {
        self.max_keys = max.max(SHARDS);
        self
    }
}

/// The outcome of one check, with what the IETF `RateLimit` headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// The quota's burst (the `RateLimit` header's limit).
    pub limit: u32,
    /// Requests still allowed right now.
    pub remaining: u32,
    /// Time until the key is back to a full burst.
    pub reset_after: Duration,
    /// When denied, how long until one request would be allowed (`Retry-After`).
    pub retry_after: Option<Duration>,
}

/// A GCRA rate limiter keyed by `K` (a user id, an API key, a client IP …).
#[derive(Debug)]
pub struct KeyedLimiter<K = String> {
    quota: Quota,
    per_shard: usize,
    shards: Box<[Mutex<HashMap<K, u64>>]>,
    hasher: RandomState,
    epoch: Instant,
    evictions: AtomicU64,
    /// Keys held across the shards, kept with every insert and removal so
    /// that [`KeyedLimiter::holds_no_keys`] takes no lock.
    held: std::sync::atomic::AtomicUsize,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// A limiter with `config`.
    pub fn new(config: LimiterConfig) -> KeyedLimiter<K> {
        KeyedLimiter {
            quota: config.quota,
            per_shard: config.max_keys.max(SHARDS).div_ceil(SHARDS),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            epoch: Instant::now(),
            evictions: AtomicU64::new(0),
            held: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The limiter's clock: nanoseconds since it was created.
    pub fn now_nanos(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Checks (and on success, counts) one request for `key` now.
    pub fn check<Q>(&self, key: &Q) -> RateDecision
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized + ToOwned<Owned = K>,
    {
        self.check_at(key, self.now_nanos())
    }

    /// Checks one request for `key` at `now` (nanoseconds on the limiter's
    /// clock, see [`KeyedLimiter::now_nanos`]).
    pub fn check_at<Q>(&self, key: &Q, now: u64) -> RateDecision
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized + ToOwned<Owned = K>,
    {
        let t = self.quota.emission_interval_nanos();
        let tolerance = self.quota.tolerance_nanos();
        let shard = &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS];
        let mut map = shard.lock();
        // One lookup: a key already held (every request of an active
        // caller) is updated in place, without a copy of the key.
        let held = map.get_mut(key);
        let tat = held.as_deref().copied().unwrap_or(now).max(now);
        let allow_from = tat.saturating_sub(tolerance);
        if now < allow_from {
            return RateDecision {
                allowed: false,
                limit: self.quota.burst,
                remaining: 0,
                reset_after: Duration::from_nanos(tat - now),
                retry_after: Some(Duration::from_nanos(allow_from - now)),
            };
        }
        let new_tat = tat + t;
        match held {
            Some(held) => *held = new_tat,
            None => {
                let before = map.len();
                if before >= self.per_shard {
                    self.make_room(&mut map, now);
                }
                map.insert(key.to_owned(), new_tat);
                self.account(before, map.len());
            }
        }
        // Requests still allowed now: how many more T fit under the tolerance.
        let used = new_tat - now;
        let remaining = ((tolerance + t).saturating_sub(used) / t) as u32;
        RateDecision {
            allowed: true,
            limit: self.quota.burst,
            remaining,
            reset_after: Duration::from_nanos(used),
            retry_after: None,
        }
    }

    /// Whether one request for `key` would be allowed now, without counting
    /// it: the decision [`KeyedLimiter::check`] would return, minus its
    /// effect. Used to refuse before doing expensive work (the gateway peeks
    /// at the failed-authentication limit before verifying a signature).
    pub fn peek<Q>(&self, key: &Q) -> RateDecision
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.peek_at(key, self.now_nanos())
    }

    /// [`KeyedLimiter::peek`] at `now` (the limiter's clock).
    pub fn peek_at<Q>(&self, key: &Q, now: u64) -> RateDecision
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let t = self.quota.emission_interval_nanos();
        let tolerance = self.quota.tolerance_nanos();
        let shard = &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS];
        let tat = shard.lock().get(key).copied().unwrap_or(now).max(now);
        let allow_from = tat.saturating_sub(tolerance);
        if now < allow_from {
            return RateDecision {
                allowed: false,
                limit: self.quota.burst,
                remaining: 0,
                reset_after: Duration::from_nanos(tat - now),
                retry_after: Some(Duration::from_nanos(allow_from - now)),
            };
        }
        let ahead = tat - now;
        RateDecision {
            allowed: true,
            limit: self.quota.burst,
            remaining: ((tolerance + t).saturating_sub(ahead) / t) as u32,
            reset_after: Duration::from_nanos(ahead),
            retry_after: None,
        }
    }

    /// Drops keys whose TAT has passed (exactly equivalent to fresh keys);
    /// if none has, evicts one active key.
    fn make_room(&self, map: &mut HashMap<K, u64>, now: u64) {
        map.retain(|_, tat| *tat > now);
        if map.len() >= self.per_shard
            && let Some(victim) = map.keys().next().cloned()
        {
            map.remove(&victim);
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Keys currently held.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Active keys evicted to stay under `max_keys` since creation.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Drops every key whose TAT has passed; returns how many were dropped.
    /// Call it periodically to return memory after a flood.
    pub fn prune(&self) -> usize {
        let now = self.now_nanos();
        self.shards
            .iter()
            .map(|s| {
                let mut map = s.lock();
                let before = map.len();
                map.retain(|_, tat| *tat > now);
                self.account(before, map.len());
                before - map.len()
            })
            .sum()
    }

    /// The quota.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// Whether no key is held, without taking a lock: then every key is
    /// fresh and [`KeyedLimiter::peek`] would allow it with a full burst.
    /// A check running on another thread at the same moment may not be
    /// seen yet.
    pub fn holds_no_keys(&self) -> bool {
        self.held.load(Ordering::Acquire) == 0
    }

    /// Records that a shard went from `before` to `after` keys (called with
    /// the shard's lock held).
    fn account(&self, before: usize, after: usize) {
        if after >= before {
            self.held.fetch_add(after - before, Ordering::Release);
        } else {
            self.held.fetch_sub(before - after, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const SEC: u64 = 1_000_000_000;

    proptest::proptest! {
        /// The lock-free count of keys always matches the shards, through
        /// inserts, updates in place, evictions and pruning.
        #[test]
        fn the_held_count_matches_the_keys(
            steps in proptest::collection::vec((0u8..40, 0u64..1_000), 1..200),
        ) {
            let l: KeyedLimiter = KeyedLimiter::new(
                LimiterConfig::new(Quota::per_second(1_000)).with_max_keys(SHARDS),
            );
            proptest::prop_assert!(l.holds_no_keys());
            let mut now = 0;
            for (key, advance) in steps {
                now += advance * 100_000;
                l.check_at(&key.to_string(), now);
                proptest::prop_assert_eq!(l.held.load(Ordering::Relaxed), l.len());
                proptest::prop_assert!(!l.holds_no_keys());
            }
            l.prune();
            proptest::prop_assert_eq!(l.held.load(Ordering::Relaxed), l.len());
        }
    }

    #[test]
    fn a_fresh_key_gets_its_burst_then_the_rate() {
        let l: KeyedLimiter =
            KeyedLimiter::new(LimiterConfig::new(Quota::per_second(10).with_burst(5)));
        let allowed = (0..20).filter(|_| l.check_at("k", 0).allowed).count();
        assert_eq!(allowed, 5);
        let denied = l.check_at("k", 0);
        assert_eq!(denied.retry_after, Some(Duration::from_millis(100)));
        assert_eq!(denied.remaining, 0);
        assert!(l.check_at("k", SEC / 10).allowed);
        assert!(!l.check_at("k", SEC / 10).allowed);
        // Other keys are independent.
        assert!(l.check_at("other", 0).allowed);
    }

    #[test]
    fn peeking_reports_the_next_decision_without_counting() {
        let l: KeyedLimiter = KeyedLimiter::new(LimiterConfig::new(Quota::per_second(2)));
        for _ in 0..10 {
            assert_eq!(l.peek_at("k", 0).remaining, 2);
        }
        assert!(l.is_empty(), "a peek stores nothing");
        assert!(l.check_at("k", 0).allowed);
        assert!(l.peek_at("k", 0).allowed);
        assert!(l.check_at("k", 0).allowed);
        let peeked = l.peek_at("k", 0);
        let checked = l.check_at("k", 0);
        assert_eq!(peeked, checked);
        assert!(!peeked.allowed);
        assert_eq!(peeked.retry_after, Some(Duration::from_millis(500)));
        assert!(l.peek_at("k", SEC / 2).allowed);
    }

    #[test]
    fn remaining_counts_down_and_reset_reports_full_recovery() {
        let l: KeyedLimiter = KeyedLimiter::new(LimiterConfig::new(Quota::per_second(4)));
        let remaining: Vec<u32> = (0..4).map(|_| l.check_at("k", 0).remaining).collect();
        assert_eq!(remaining, vec![3, 2, 1, 0]);
        let d = l.check_at("k", 0);
        assert!(!d.allowed);
        assert_eq!(d.reset_after, Duration::from_secs(1));
    }

    #[test]
    fn sixty_four_tasks_on_one_key_are_exact() {
        let quota = Quota::per_second(1_000).with_burst(50);
        let l = Arc::new(KeyedLimiter::<String>::new(LimiterConfig::new(quota)));
        let handles: Vec<_> = (0..64)
            .map(|_| {
                let l = Arc::clone(&l);
                std::thread::spawn(move || {
                    let (mut allowed, mut first, mut last) = (0u64, u64::MAX, 0u64);
                    let deadline = l.now_nanos() + 300 * 1_000_000;
                    loop {
                        let now = l.now_nanos();
                        if now >= deadline {
                            break;
                        }
                        if l.check_at("hot", now).allowed {
                            allowed += 1;
                            first = first.min(now);
                            last = last.max(now);
                        }
                    }
                    (allowed, first, last)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let allowed: u64 = results.iter().map(|r| r.0).sum();
        let first = results.iter().map(|r| r.1).min().unwrap();
        let last = results.iter().map(|r| r.2).max().unwrap();
        // Saturated from the first allowed request to the last: exactly
        // burst + elapsed / T, give or take the one the last interval holds.
        let expected = 50 + (last - first) / quota.emission_interval_nanos();
        assert!(
            allowed.abs_diff(expected) <= 1,
            "allowed {allowed}, expected {expected} ± 1"
        );
        assert!(
            expected > 200,
            "the test ran too briefly to mean anything: {expected}"
        );
    }

    #[test]
    fn memory_stays_under_the_cap_and_expired_keys_go_first() {
        let l: KeyedLimiter<u64> =
            KeyedLimiter::new(LimiterConfig::new(Quota::per_second(1)).with_max_keys(1_024));
        for key in 0..100_000u64 {
            l.check_at(&key, 0);
        }
        assert!(l.len() <= 1_024, "{} keys held", l.len());
        assert!(l.evictions() > 0);
        // Once their TATs pass, new keys replace them without evicting
        // (256 keys spread over 64 shards of 16 stay far from a full shard).
        let evictions = l.evictions();
        for key in 200_000..200_256u64 {
            l.check_at(&key, 10 * SEC);
        }
        assert_eq!(l.evictions(), evictions);
        assert!(l.len() <= 1_024);
    }
}

//! The dashboard cache on Redis (feature `redis`): cache-aside, versioned by
//! generation, single-flight, probabilistic early refresh (XFetch) and TTL
//! jitter, falling through to PostgreSQL when Redis is down.
//!
//! ## Keys
//!
//! With the default prefix `analytics:`:
//!
//! | key | value |
//! | --- | --- |
//! | `analytics:gen:tenant:{id}` | the tenant's generation (an integer) |
//! | `analytics:gen:plan:{plan}` | the plan's generation |
//! | `analytics:dash:{plan}:{since}:{gen}` | a 24-byte header, then the dashboard's JSON |
//!
//! A committed batch bumps, in one script, the generation of each tenant it
//! wrote and of each of their plans (the plan's generation is the
//! aggregate of its tenants': it moves whenever one of theirs does). A
//! dashboard is read with one script that reads the plan's generation and
//! the value stored under it, so a read costs one round trip and never
//! pairs a new generation with an old value.
//!
//! ## Freshness
//!
//! [`CachedWriter::write`] acknowledges a batch only after its commit *and*
//! the bump, so a dashboard read that starts after the acknowledgement
//! reads a generation whose value was computed after the commit: nothing
//! stale is served. A bump that fails (Redis down) is counted, and this
//! process then serves dashboards from PostgreSQL until a later bump of
//! every plan succeeds; other processes may serve the old value until its
//! TTL (documented in docs/pg-analytics/DESIGN.md).
//!
//! The scripts touch keys they compute from the prefix, so they run on a
//! single Redis server (or a replica set), not across Redis Cluster slots.

mod value;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chrono::NaiveDate;
use fred::interfaces::KeysInterface;
use fred::prelude::Client;
use fred::types::scripts::Script;
use fred::types::{Expiration, Value};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use parking_lot::Mutex;
use uuid::Uuid;

use crate::model::{Event, Plan, Tenant};
use crate::postgres::{Analytics, AnalyticsError, EventWriter, IngestReport};
use value::CachedValue;

/// Reads a plan's generation and the value stored under it, in one round
/// trip. Returns `{gen}` on a miss and `{gen, value}` on a hit.
const READ_LUA: &str = r"
local gen = redis.call('GET', KEYS[1]) or '0'
local value = redis.call('GET', ARGV[1] .. gen)
if value then return {gen, value} end
return {gen}
";

/// Bumps every key given: the tenants' and their plans' generations.
const BUMP_LUA: &str = r"
for i, key in ipairs(KEYS) do redis.call('INCR', key) end
return #KEYS
";

/// How the cache behaves.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct CacheConfig {
    /// Prepended to every key (checked by `redis_kit::check_prefix`).
    /// Default `analytics:`.
    pub key_prefix: String,
    /// How long a computed dashboard is kept. Default 5 minutes.
    pub ttl: Duration,
    /// Each TTL is drawn uniformly within ± this fraction of
    /// [`CacheConfig::ttl`], so keys computed together do not expire
    /// together. Default 0.1.
    pub ttl_jitter: f64,
    /// XFetch's β: above 1 refreshes earlier, below 1 later, 0 never early.
    /// Default 1.
    pub early_refresh_beta: f64,
    /// The longest a Redis call may take before the read falls through to
    /// PostgreSQL (and is counted as a failure). Default 1 s (a dashboard
    /// value can be megabytes).
    pub redis_timeout: Duration,
}

impl Default for CacheConfig {
    fn default() -> CacheConfig {
        CacheConfig {
            key_prefix: "analytics:".into(),
            ttl: Duration::from_secs(300),
            ttl_jitter: 0.1,
            early_refresh_beta: 1.0,
            redis_timeout: Duration::from_secs(1),
        }
    }
}

impl CacheConfig {
    /// Sets [`CacheConfig::key_prefix`].
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> CacheConfig {
        self.key_prefix = prefix.into();
        self
    }

    /// Sets [`CacheConfig::ttl`] (at least 1 ms).
    pub fn with_ttl(mut self, ttl: Duration) -> CacheConfig {
        self.ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// Sets [`CacheConfig::ttl_jitter`] (clamped to 0..=0.5).
    pub fn with_ttl_jitter(mut self, fraction: f64) -> CacheConfig {
        self.ttl_jitter = if fraction.is_finite() {
            fraction.clamp(0.0, 0.5)
        } else {
            0.0
        };
        self
    }

    /// Sets [`CacheConfig::early_refresh_beta`] (0 or more).
    pub fn with_early_refresh_beta(mut self, beta: f64) -> CacheConfig {
        self.early_refresh_beta = if beta.is_finite() { beta.max(0.0) } else { 0.0 };
        self
    }

    /// Sets [`CacheConfig::redis_timeout`].
    pub fn with_redis_timeout(mut self, timeout: Duration) -> CacheConfig {
        self.redis_timeout = timeout;
        self
    }
}

/// Why a cached dashboard could not be answered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The key prefix is not allowed.
    #[error("invalid cache configuration")]
    Config(#[source] redis_kit::RedisError),
    /// PostgreSQL could not compute the dashboard (shared by every reader
    /// that waited for the same computation).
    #[error("the dashboard could not be computed")]
    Store(#[source] Arc<AnalyticsError>),
}

impl CacheError {
    /// Whether retrying later may help.
    pub fn is_transient(&self) -> bool {
        match self {
            CacheError::Config(_) => false,
            CacheError::Store(e) => e.is_transient(),
        }
    }
}

/// Counters of a [`DashboardCache`], since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Reads answered from Redis.
    pub hits: u64,
    /// Reads that found no value for the current generation.
    pub misses: u64,
    /// Dashboards computed from PostgreSQL and stored (misses and early
    /// refreshes; readers that waited for another's computation are not
    /// counted).
    pub recomputations: u64,
    /// Of those, refreshes started early by XFetch.
    pub early_refreshes: u64,
    /// Redis calls that failed or timed out (the outage counter).
    pub redis_failures: u64,
    /// Reads answered from PostgreSQL without the cache, because Redis had
    /// failed or a bump was lost.
    pub fallthroughs: u64,
    /// Batches whose generations were bumped.
    pub invalidations: u64,
    /// Bumps that failed: until a later one succeeds, this process reads
    /// through to PostgreSQL.
    pub invalidation_failures: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    recomputations: AtomicU64,
    early_refreshes: AtomicU64,
    redis_failures: AtomicU64,
    fallthroughs: AtomicU64,
    invalidations: AtomicU64,
    invalidation_failures: AtomicU64,
}

type Flight = Shared<BoxFuture<'static, Result<Bytes, Arc<AnalyticsError>>>>;

struct Inner {
    store: Analytics,
    redis: Client,
    config: CacheConfig,
    read_script: Script,
    bump_script: Script,
    /// Computations in progress, by value key: a reader of a key being
    /// computed waits for that computation instead of starting another.
    flights: Mutex<HashMap<String, Flight>>,
    /// When this process last stored each value key (pruned as entries
    /// expire): a reader that missed just before the store re-reads
    /// instead of recomputing, and XFetch does not refresh a value this
    /// process already replaced.
    stored: Mutex<HashMap<String, (u64, Instant)>>,
    /// A bump failed: generations in Redis may be behind PostgreSQL.
    bump_lost: AtomicBool,
    counters: Counters,
}

/// Dashboards cached in Redis in front of an [`Analytics`] store. Cheap to
/// clone; clones share the single-flight table and the counters.
#[derive(Clone)]
pub struct DashboardCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DashboardCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DashboardCache")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl DashboardCache {
    /// A cache of `store`'s dashboards on `redis` (a connected client, for
    /// instance from `redis_kit::RedisSetup::connect`).
    pub fn new(
        store: Analytics,
        redis: Client,
        config: CacheConfig,
    ) -> Result<DashboardCache, CacheError> {
        redis_kit::check_prefix(&config.key_prefix).map_err(CacheError::Config)?;
        Ok(DashboardCache {
            inner: Arc::new(Inner {
                store,
                redis,
                config,
                read_script: Script::from_lua(READ_LUA),
                bump_script: Script::from_lua(BUMP_LUA),
                flights: Mutex::new(HashMap::new()),
                stored: Mutex::new(HashMap::new()),
                bump_lost: AtomicBool::new(false),
                counters: Counters::default(),
            }),
        })
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Analytics {
        &self.inner.store
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// The counters so far.
    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            hits: load(&c.hits),
            misses: load(&c.misses),
            recomputations: load(&c.recomputations),
            early_refreshes: load(&c.early_refreshes),
            redis_failures: load(&c.redis_failures),
            fallthroughs: load(&c.fallthroughs),
            invalidations: load(&c.invalidations),
            invalidation_failures: load(&c.invalidation_failures),
        }
    }

    /// A writer whose batches bump the generations they change before they
    /// are acknowledged.
    pub fn writer(&self, writer: EventWriter) -> CachedWriter {
        CachedWriter {
            writer,
            cache: self.clone(),
        }
    }

    /// The dashboard of `plan` since `since`, as the JSON document
    /// [`Analytics::dashboard_json`] renders: from Redis when the plan's
    /// generation has a value, otherwise computed once (whatever the number
    /// of concurrent readers in this process) and stored. When Redis fails,
    /// the answer comes from PostgreSQL and the failure is counted.
    pub async fn dashboard_json(&self, plan: Plan, since: NaiveDate) -> Result<Bytes, CacheError> {
        let inner = &self.inner;
        if inner.bump_lost.load(Ordering::Acquire) && !self.resync().await {
            return self.fall_through(plan, since).await;
        }
        let prefix = self.value_key_prefix(plan, since);
        let (generation, cached) = match self.read(plan, &prefix).await {
            Ok(found) => found,
            Err(()) => return self.fall_through(plan, since).await,
        };
        let key = format!("{prefix}{generation}");
        if let Some(value) = cached {
            inner.counters.hits.fetch_add(1, Ordering::Relaxed);
            if self.should_refresh_early(&key, &value) {
                // The others keep reading this value while one refresh
                // runs in the background.
                let (flight, started) = self.flight(&key, plan, since, true);
                if started {
                    tokio::spawn(flight);
                }
            }
            return Ok(value.body);
        }
        inner.counters.misses.fetch_add(1, Ordering::Relaxed);
        if self.stored_recently(&key) {
            // Stored by this process after our read: read it again rather
            // than compute it a second time.
            if let Ok((g, Some(value))) = self.read(plan, &prefix).await
                && g == generation
            {
                return Ok(value.body);
            }
        }
        let (flight, _) = self.flight(&key, plan, since, false);
        flight.await.map_err(CacheError::Store)
    }

    fn value_key_prefix(&self, plan: Plan, since: NaiveDate) -> String {
        format!(
            "{}dash:{}:{}:",
            self.inner.config.key_prefix,
            plan.as_str(),
            since
        )
    }

    fn plan_generation_key(&self, plan: Plan) -> String {
        format!("{}gen:plan:{}", self.inner.config.key_prefix, plan.as_str())
    }

    fn tenant_generation_key(&self, tenant: i64) -> String {
        format!("{}gen:tenant:{tenant}", self.inner.config.key_prefix)
    }

    /// The plan's generation and the value under it, or `Err` when Redis
    /// failed (counted).
    async fn read(&self, plan: Plan, prefix: &str) -> Result<(String, Option<CachedValue>), ()> {
        let inner = &self.inner;
        let call = inner.read_script.evalsha_with_reload::<Vec<Value>, _, _>(
            &inner.redis,
            vec![self.plan_generation_key(plan)],
            vec![prefix.to_owned()],
        );
        let reply = match tokio::time::timeout(inner.config.redis_timeout, call).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => return Err(self.redis_failed("read", &e)),
            Err(_) => return Err(self.redis_failed("read", &"timed out")),
        };
        let mut reply = reply.into_iter();
        let generation = reply
            .next()
            .and_then(|v| v.as_bytes_str())
            .map(|s| s.to_string())
            .unwrap_or_else(|| "0".into());
        let value = match reply.next().and_then(Value::into_bytes) {
            Some(bytes) => match CachedValue::decode(bytes) {
                Some(v) => Some(v),
                None => {
                    tracing::warn!(prefix, "dashboard cache: an unreadable value, recomputed");
                    None
                }
            },
            None => None,
        };
        Ok((generation, value))
    }

    fn redis_failed(&self, what: &str, error: &dyn std::fmt::Display) {
        self.inner
            .counters
            .redis_failures
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%error, what, "dashboard cache: redis unavailable");
    }

    async fn fall_through(&self, plan: Plan, since: NaiveDate) -> Result<Bytes, CacheError> {
        self.inner
            .counters
            .fallthroughs
            .fetch_add(1, Ordering::Relaxed);
        self.inner
            .store
            .dashboard_json(plan, since)
            .await
            .map(Bytes::from)
            .map_err(|e| CacheError::Store(Arc::new(e)))
    }

    /// XFetch (Vattani et al., "Optimal probabilistic cache stampede
    /// prevention"): refresh when `now - δ·β·ln(u) ≥ expiry`, δ being how
    /// long the value took to compute and u uniform in (0, 1], so the
    /// chance rises as expiry nears and with the cost of recomputing.
    fn should_refresh_early(&self, key: &str, value: &CachedValue) -> bool {
        let beta = self.inner.config.early_refresh_beta;
        if beta <= 0.0 {
            return false;
        }
        let now = unix_ms(SystemTime::now()) as f64;
        let u = 1.0 - fastrand::f64(); // (0, 1]
        // δ of at least 1 ms: a value computed in under a millisecond still
        // gets a window before its expiry.
        let delta = value.compute_ms.max(1) as f64;
        let due = now - delta * beta * u.ln() >= value.expires_at_ms as f64;
        if !due {
            return false;
        }
        // Not when this process already stored a newer value for the key.
        !matches!(self.inner.stored.lock().get(key), Some((computed, _)) if *computed > value.computed_at_ms)
    }

    fn stored_recently(&self, key: &str) -> bool {
        matches!(self.inner.stored.lock().get(key), Some((_, until)) if *until > Instant::now())
    }

    /// The computation of `key` in progress, or a new one (then `true`).
    fn flight(&self, key: &str, plan: Plan, since: NaiveDate, early: bool) -> (Flight, bool) {
        let mut flights = self.inner.flights.lock();
        if let Some(flight) = flights.get(key) {
            return (flight.clone(), false);
        }
        let flight = self.compute_flight(key.to_owned(), plan, since, early);
        flights.insert(key.to_owned(), flight.clone());
        (flight, true)
    }

    fn compute_flight(&self, key: String, plan: Plan, since: NaiveDate, early: bool) -> Flight {
        let cache = self.clone();
        async move {
            let result = cache.compute_and_store(&key, plan, since, early).await;
            cache.inner.flights.lock().remove(&key);
            result
        }
        .boxed()
        .shared()
    }

    async fn compute_and_store(
        &self,
        key: &str,
        plan: Plan,
        since: NaiveDate,
        early: bool,
    ) -> Result<Bytes, Arc<AnalyticsError>> {
        let inner = &self.inner;
        let started = Instant::now();
        let body = Bytes::from(inner.store.dashboard_json(plan, since).await?);
        inner
            .counters
            .recomputations
            .fetch_add(1, Ordering::Relaxed);
        if early {
            inner
                .counters
                .early_refreshes
                .fetch_add(1, Ordering::Relaxed);
        }
        let ttl = self.jittered_ttl();
        let computed_at_ms = unix_ms(SystemTime::now());
        let value = CachedValue {
            computed_at_ms,
            compute_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            expires_at_ms: computed_at_ms + u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            body: body.clone(),
        };
        let set = inner.redis.set::<(), _, _>(
            key,
            value.encode(),
            Some(Expiration::PX(
                i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
            )),
            None,
            false,
        );
        match tokio::time::timeout(inner.config.redis_timeout, set).await {
            Ok(Ok(())) => {
                let mut stored = inner.stored.lock();
                let now = Instant::now();
                stored.retain(|_, (_, until)| *until > now);
                stored.insert(key.to_owned(), (computed_at_ms, now + ttl));
            }
            Ok(Err(e)) => self.redis_failed("store", &e),
            Err(_) => self.redis_failed("store", &"timed out"),
        }
        Ok(body)
    }

    fn jittered_ttl(&self) -> Duration {
        let config = &self.inner.config;
        jittered(config.ttl, config.ttl_jitter, fastrand::f64())
    }

    /// Bumps the generations of what `report` wrote: its tenants and their
    /// plans, or every plan for a replay (whose first attempt may have
    /// committed without its bump).
    pub async fn invalidate(&self, report: &IngestReport) {
        let plans: &[Plan] = if report.replayed {
            &Plan::ALL
        } else {
            &report.plans
        };
        let mut keys: Vec<String> = report
            .tenants
            .iter()
            .map(|t| self.tenant_generation_key(t.0))
            .collect();
        keys.extend(plans.iter().map(|p| self.plan_generation_key(*p)));
        if keys.is_empty() {
            return;
        }
        if self.bump(keys).await {
            self.inner
                .counters
                .invalidations
                .fetch_add(1, Ordering::Relaxed);
        } else {
            self.inner
                .counters
                .invalidation_failures
                .fetch_add(1, Ordering::Relaxed);
            self.inner.bump_lost.store(true, Ordering::Release);
        }
    }

    /// Registers or updates `tenant` (as [`Analytics::upsert_tenant`]),
    /// then bumps every plan's generation: a tenant that changed plan
    /// leaves one plan's dashboards and joins another's. When the bump
    /// fails, this process reads through to PostgreSQL until one succeeds.
    pub async fn upsert_tenant(&self, tenant: &Tenant) -> Result<(), AnalyticsError> {
        self.inner.store.upsert_tenant(tenant).await?;
        if !self.invalidate_all().await {
            self.inner
                .counters
                .invalidation_failures
                .fetch_add(1, Ordering::Relaxed);
            self.inner.bump_lost.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Bumps every plan's generation (after a lost bump, or when a tenant
    /// changes plan); `false` when Redis failed.
    pub async fn invalidate_all(&self) -> bool {
        let keys = Plan::ALL
            .iter()
            .map(|p| self.plan_generation_key(*p))
            .collect();
        self.bump(keys).await
    }

    async fn bump(&self, keys: Vec<String>) -> bool {
        let inner = &self.inner;
        let call = inner.bump_script.evalsha_with_reload::<i64, _, _>(
            &inner.redis,
            keys,
            Vec::<String>::new(),
        );
        match tokio::time::timeout(inner.config.redis_timeout, call).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                self.redis_failed("bump", &e);
                false
            }
            Err(_) => {
                self.redis_failed("bump", &"timed out");
                false
            }
        }
    }

    /// After a lost bump: bump every plan, and read through the cache
    /// again once that worked.
    async fn resync(&self) -> bool {
        if self.invalidate_all().await {
            self.inner.bump_lost.store(false, Ordering::Release);
            tracing::info!("dashboard cache: generations bumped after an outage");
            true
        } else {
            false
        }
    }
}

/// `ttl` spread by `jitter` (a fraction) according to `r` in [0, 1): from
/// `ttl·(1 − jitter)` to `ttl·(1 + jitter)`, and at least 1 ms.
fn jittered(ttl: Duration, jitter: f64, r: f64) -> Duration {
    let spread = jitter * (2.0 * r - 1.0);
    ttl.mul_f64((1.0 + spread).max(0.0))
        .max(Duration::from_millis(1))
}

/// An [`EventWriter`] whose batches bump the cache's generations after
/// their commit and before they are acknowledged.
#[derive(Clone, Debug)]
pub struct CachedWriter {
    writer: EventWriter,
    cache: DashboardCache,
}

impl CachedWriter {
    /// As [`EventWriter::write`], then [`DashboardCache::invalidate`].
    pub async fn write(
        &self,
        batch_id: Uuid,
        events: &[Event],
    ) -> Result<IngestReport, AnalyticsError> {
        let report = self.writer.write(batch_id, events).await?;
        self.cache.invalidate(&report).await;
        Ok(report)
    }

    /// The writer underneath.
    pub fn inner(&self) -> &EventWriter {
        &self.writer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_jittered_ttl_stays_within_its_band(
            ttl_ms in 1u64..10_000_000,
            jitter in 0.0f64..=0.5,
            r in 0.0f64..1.0,
        ) {
            let ttl = Duration::from_millis(ttl_ms);
            let got = jittered(ttl, jitter, r);
            let low = ttl.mul_f64(1.0 - jitter).max(Duration::from_millis(1));
            let high = ttl.mul_f64(1.0 + jitter).max(Duration::from_millis(1));
            // One microsecond of slack for floating-point rounding.
            prop_assert!(got + Duration::from_micros(1) >= low, "{got:?} < {low:?}");
            prop_assert!(got <= high + Duration::from_micros(1), "{got:?} > {high:?}");
        }
    }

    #[test]
    fn jitter_spreads_expiries() {
        let ttl = Duration::from_secs(300);
        let low = jittered(ttl, 0.1, 0.0);
        let high = jittered(ttl, 0.1, 0.999_999);
        assert!(low <= Duration::from_secs(271), "{low:?}");
        assert!(high >= Duration::from_secs(329), "{high:?}");
    }
}

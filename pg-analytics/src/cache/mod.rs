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
//! | `analytics:dash:{plan}:{since}` | a 44-byte header (computed at, compute time, expiry, generation), then the dashboard's JSON |
//!
//! A committed batch bumps, in one script, the generation of each tenant it
//! wrote and of every plan (a plan's generation is the aggregate of its
//! tenants': it moves whenever one of theirs does). A bump never reuses a
//! number: it takes the larger of +1 and Redis's clock in microseconds. A
//! dashboard is read with one `MGET` of the plan's generation and the
//! value: a hit is a value whose header carries that generation; anything
//! else is a miss. A value is stored by a script that refuses to replace
//! one of a newer generation.
//!
//! ## Freshness
//!
//! [`CachedWriter::write`] acknowledges a batch only after its commit *and*
//! the bump, so a dashboard read that starts after the acknowledgement
//! reads a generation whose value was computed after the commit: nothing
//! stale is served. A bump that fails (Redis down) is counted, and this
//! process then serves dashboards from PostgreSQL until a later bump of
//! every plan succeeds; other processes may serve the old value until its
//! TTL (docs/pg-analytics/API.md lists this bound, ADR 0021 the reasons).
//! A reconnection of the client is treated as a lost bump.
//!
//! The scripts touch keys they compute from the prefix, so they run on a
//! single Redis server (or a replica set), not across Redis Cluster slots.

mod value;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chrono::NaiveDate;
use fred::interfaces::{EventInterface, KeysInterface};
use fred::prelude::Client;
use fred::types::Value;
use fred::types::scripts::Script;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use parking_lot::Mutex;
use uuid::Uuid;

use crate::model::{Event, Plan, Tenant};
use crate::postgres::{Analytics, AnalyticsError, EventWriter, IngestReport};
use value::CachedValue;

/// Gives a generation that is missing (a Redis that is new, restarted
/// empty, or evicted the key) a value never used before: the server's
/// clock in microseconds; also one that is not a number. A script runs
/// alone, so concurrent readers agree on one.
const INIT_LUA: &str = r"
if tonumber(redis.call('GET', KEYS[1]) or 'none') then return 0 end
local t = redis.call('TIME')
redis.call('SET', KEYS[1], string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2])))
return 1
";

/// Stores a dashboard unless the key holds one of a newer generation (a
/// slow computation must not replace a fresher one). Reads only the
/// header's generation (`GETRANGE`), never the whole value.
const STORE_LUA: &str = r"
local stored = tonumber(redis.call('GETRANGE', KEYS[1], 24, 43))
if stored and stored > tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
";

/// Moves every key given (generations) to a value never used before:
/// one more than now, or the server's clock in microseconds if that is
/// larger. A generation that went back (a failover to a replica that missed
/// bumps, a restart from a snapshot, an evicted key) therefore never
/// returns to a number whose value is still stored.
const BUMP_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i, key in ipairs(KEYS) do
  local next = (tonumber(redis.call('GET', key) or '0') or 0) + 1
  if now > next then next = now end
  redis.call('SET', key, string.format('%d', next))
end
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
    /// After a Redis failure, how long reads skip Redis and go straight to
    /// PostgreSQL (so an outage does not cost every read a timeout).
    /// Default 2 s.
    pub outage_backoff: Duration,
    /// Dashboards computed from PostgreSQL at once by this cache (misses,
    /// early refreshes, and reads while Redis is skipped); more wait for a
    /// turn, so distinct `since` values cannot take the whole pool.
    /// Default 4.
    pub max_computations: usize,
}

impl Default for CacheConfig {
    fn default() -> CacheConfig {
        CacheConfig {
            key_prefix: "analytics:".into(),
            ttl: Duration::from_secs(300),
            ttl_jitter: 0.1,
            early_refresh_beta: 1.0,
            redis_timeout: Duration::from_secs(1),
            outage_backoff: Duration::from_secs(2),
            max_computations: 4,
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

    /// Sets [`CacheConfig::outage_backoff`].
    pub fn with_outage_backoff(mut self, backoff: Duration) -> CacheConfig {
        self.outage_backoff = backoff;
        self
    }

    /// Sets [`CacheConfig::max_computations`] (at least 1).
    pub fn with_max_computations(mut self, n: usize) -> CacheConfig {
        self.max_computations = n.max(1);
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

/// Removes a flight from the table when its task ends, however it ends.
struct LeaveTable {
    cache: DashboardCache,
    key: String,
}

impl Drop for LeaveTable {
    fn drop(&mut self) {
        self.cache.inner.flights.lock().remove(&self.key);
    }
}

/// Redis failed (and the failure was counted).
#[derive(Debug)]
struct RedisDown;

/// What one computation computes and where it stores it.
struct Target {
    /// The in-process name: value key and generation.
    key: String,
    /// The Redis key of the value.
    value_key: String,
    /// The generation the computation started at (read before it).
    generation: u64,
    plan: Plan,
    since: NaiveDate,
    /// Started early by XFetch.
    early: bool,
}

struct Inner {
    store: Analytics,
    redis: Client,
    config: CacheConfig,
    init_script: Script,
    store_script: Script,
    bump_script: Script,
    /// Computations in progress, by value key: a reader of a key being
    /// computed waits for that computation instead of starting another.
    flights: Mutex<HashMap<String, Flight>>,
    /// When this process last stored each value key (pruned as entries
    /// expire): a reader that missed just before the store re-reads
    /// instead of recomputing, and XFetch does not refresh a value this
    /// process already replaced.
    stored: Mutex<HashMap<String, (u64, Instant)>>,
    /// Bumps lost (and reconnections) so far. Generations in Redis are
    /// trusted only while `synced_epoch` has caught up with it: a resync
    /// records the count it saw before its bump, so a loss during the
    /// resync keeps Redis untrusted (no ABA on a single counter).
    lost_epoch: AtomicU64,
    /// The largest `lost_epoch` a successful bump of every plan covered.
    synced_epoch: AtomicU64,
    /// Until when (ns since `started`) reads skip Redis after a failure;
    /// monotonic, so a clock step does not stretch it.
    skip_redis_until_ns: AtomicU64,
    /// The instant the breaker measures from.
    started: Instant,
    /// Turns for computing from PostgreSQL.
    computations: tokio::sync::Semaphore,
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
    /// instance from `redis_kit::RedisSetup::connect`). Call it inside a
    /// Tokio runtime: it starts a listener for the client's reconnections.
    pub fn new(
        store: Analytics,
        redis: Client,
        config: CacheConfig,
    ) -> Result<DashboardCache, CacheError> {
        redis_kit::check_prefix(&config.key_prefix).map_err(CacheError::Config)?;
        let computations = config.max_computations.max(1);
        let cache = DashboardCache {
            inner: Arc::new(Inner {
                store,
                redis,
                config,
                init_script: Script::from_lua(INIT_LUA),
                store_script: Script::from_lua(STORE_LUA),
                bump_script: Script::from_lua(BUMP_LUA),
                flights: Mutex::new(HashMap::new()),
                stored: Mutex::new(HashMap::new()),
                lost_epoch: AtomicU64::new(0),
                synced_epoch: AtomicU64::new(0),
                skip_redis_until_ns: AtomicU64::new(0),
                started: Instant::now(),
                computations: tokio::sync::Semaphore::new(computations),
                counters: Counters::default(),
            }),
        };
        // A reconnect may reach a server that lost bumps (restarted from a
        // snapshot, or a replica promoted): resync before trusting it. The
        // listener holds the cache weakly and ends with it.
        let weak = Arc::downgrade(&cache.inner);
        let _listener = cache.inner.redis.on_reconnect(move |_server| {
            std::future::ready(match weak.upgrade() {
                Some(inner) => {
                    inner.lost_epoch.fetch_add(1, Ordering::AcqRel);
                    Ok(())
                }
                None => Err(fred::error::Error::new(
                    fred::error::ErrorKind::Canceled,
                    "dashboard cache dropped",
                )),
            })
        });
        Ok(cache)
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
        if self.skipping_redis() {
            return self.fall_through(plan, since).await;
        }
        if !self.generations_trusted() && !self.resync().await {
            return self.fall_through(plan, since).await;
        }
        let value_key = self.value_key(plan, since);
        let (generation, cached) = match self.read(plan, &value_key).await {
            Ok(found) => found,
            Err(RedisDown) => return self.fall_through(plan, since).await,
        };
        let target = |early| Target {
            // In-process name of one value: its key and generation.
            key: format!("{value_key}@{generation}"),
            value_key: value_key.clone(),
            generation,
            plan,
            since,
            early,
        };
        if let Some(value) = cached {
            inner.counters.hits.fetch_add(1, Ordering::Relaxed);
            let early = target(true);
            if self.should_refresh_early(&early.key, &value) {
                // The others keep reading this value while one refresh
                // runs in the background (a task of its own: nothing to
                // await here).
                drop(self.flight(early));
            }
            return Ok(value.body);
        }
        inner.counters.misses.fetch_add(1, Ordering::Relaxed);
        let flight = match self.flight_unless_stored(target(false)) {
            Some(flight) => flight,
            None => {
                // Stored by this process after our read: read it again
                // rather than compute it a second time.
                if let Ok((g, Some(value))) = self.read(plan, &value_key).await
                    && g == generation
                {
                    return Ok(value.body);
                }
                self.flight(target(false))
            }
        };
        flight.await.map_err(CacheError::Store)
    }

    fn value_key(&self, plan: Plan, since: NaiveDate) -> String {
        format!(
            "{}dash:{}:{}",
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

    /// The plan's generation and the value stored for `value_key` if it
    /// was computed at that generation; `Err` when Redis failed (counted).
    /// One `MGET` of both keys: a consistent pair in one round trip, with
    /// the value sent as it is stored (no script copies it).
    async fn read(
        &self,
        plan: Plan,
        value_key: &str,
    ) -> Result<(u64, Option<CachedValue>), RedisDown> {
        let inner = &self.inner;
        let generation_key = self.plan_generation_key(plan);
        for attempt in 0..2 {
            let call = inner
                .redis
                .mget::<Vec<Value>, _>(vec![generation_key.clone(), value_key.to_owned()]);
            let reply = match tokio::time::timeout(inner.config.redis_timeout, call).await {
                Ok(Ok(reply)) => reply,
                Ok(Err(e)) => return Err(self.redis_failed("read", &e)),
                Err(_) => return Err(self.redis_failed("read", &"timed out")),
            };
            let mut reply = reply.into_iter();
            let generation = reply
                .next()
                .and_then(|v| v.as_bytes_str())
                .and_then(|s| s.parse::<u64>().ok());
            let Some(generation) = generation else {
                if attempt == 0 {
                    // No generation yet: give it one, then read again.
                    let init = inner.init_script.evalsha_with_reload::<i64, _, _>(
                        &inner.redis,
                        vec![generation_key.clone()],
                        Vec::<String>::new(),
                    );
                    match tokio::time::timeout(inner.config.redis_timeout, init).await {
                        Ok(Ok(_)) => continue,
                        Ok(Err(e)) => return Err(self.redis_failed("init", &e)),
                        Err(_) => return Err(self.redis_failed("init", &"timed out")),
                    }
                }
                return Err(self.redis_failed("read", &"no generation"));
            };
            let value = match reply.next().and_then(Value::into_bytes) {
                Some(bytes) => match CachedValue::decode(bytes) {
                    Some(v) => Some(v),
                    None => {
                        tracing::warn!(
                            value_key,
                            "dashboard cache: an unreadable value, recomputed"
                        );
                        None
                    }
                },
                None => None,
            };
            // A value of another generation is a miss (an older one is
            // stale; a newer one will be read with its generation).
            return Ok((generation, value.filter(|v| v.generation == generation)));
        }
        Err(RedisDown)
    }

    fn redis_failed(&self, what: &str, error: &dyn std::fmt::Display) -> RedisDown {
        self.inner
            .counters
            .redis_failures
            .fetch_add(1, Ordering::Relaxed);
        let until = self.inner.started.elapsed() + self.inner.config.outage_backoff;
        self.inner.skip_redis_until_ns.store(
            u64::try_from(until.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Release,
        );
        tracing::warn!(%error, what, "dashboard cache: redis unavailable");
        RedisDown
    }

    /// Whether a recent failure says to leave Redis alone for now.
    fn skipping_redis(&self) -> bool {
        let now = u64::try_from(self.inner.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        now < self.inner.skip_redis_until_ns.load(Ordering::Acquire)
    }

    /// Whether every lost bump so far has been covered by a bump of every
    /// plan.
    fn generations_trusted(&self) -> bool {
        self.inner.synced_epoch.load(Ordering::Acquire)
            >= self.inner.lost_epoch.load(Ordering::Acquire)
    }

    /// The dashboard from PostgreSQL, without the cache. Each reader
    /// computes its own (sharing a computation that started before it came
    /// could miss a write acknowledged in between), a few at a time.
    async fn fall_through(&self, plan: Plan, since: NaiveDate) -> Result<Bytes, CacheError> {
        self.inner
            .counters
            .fallthroughs
            .fetch_add(1, Ordering::Relaxed);
        let _turn =
            self.inner.computations.acquire().await.map_err(|e| {
                CacheError::Store(Arc::new(AnalyticsError::Unavailable(Box::new(e))))
            })?;
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

    /// The computation of `target` in progress, or a new one.
    fn flight(&self, target: Target) -> Flight {
        let mut flights = self.inner.flights.lock();
        self.join_or_start(&mut flights, target)
    }

    /// As [`DashboardCache::flight`], unless no computation is in progress
    /// and this process stored the value since the caller read (checked
    /// under the table's lock, so a flight that ends between a reader's
    /// read and this call is seen here: it records its store before it
    /// leaves the table): then `None`, and the caller reads again.
    fn flight_unless_stored(&self, target: Target) -> Option<Flight> {
        let mut flights = self.inner.flights.lock();
        if !flights.contains_key(&target.key) && self.stored_recently(&target.key) {
            return None;
        }
        Some(self.join_or_start(&mut flights, target))
    }

    fn join_or_start(&self, flights: &mut HashMap<String, Flight>, target: Target) -> Flight {
        if let Some(flight) = flights.get(&target.key) {
            return flight.clone();
        }
        let key = target.key.clone();
        let flight = self.compute_flight(target);
        flights.insert(key, flight.clone());
        flight
    }

    /// The computation runs as its own task, so readers that give up (a
    /// client gone, a timeout) cannot leave it half-polled in the table
    /// holding a pooled connection: it finishes, stores, and leaves.
    fn compute_flight(&self, target: Target) -> Flight {
        let cache = self.clone();
        let task = tokio::spawn(async move {
            // Leaves the table however the task ends (a panic, the runtime
            // shutting down), so a failed flight is never joined again.
            let _leave = LeaveTable {
                cache: cache.clone(),
                key: target.key.clone(),
            };
            cache.compute_and_store(&target).await
        });
        async move {
            task.await
                .map_err(|e| Arc::new(AnalyticsError::Unavailable(Box::new(e))))?
        }
        .boxed()
        .shared()
    }

    async fn compute_and_store(&self, target: &Target) -> Result<Bytes, Arc<AnalyticsError>> {
        let inner = &self.inner;
        let _turn = inner
            .computations
            .acquire()
            .await
            .map_err(|e| Arc::new(AnalyticsError::Unavailable(Box::new(e))))?;
        let started = Instant::now();
        let body = Bytes::from(
            inner
                .store
                .dashboard_json(target.plan, target.since)
                .await?,
        );
        inner
            .counters
            .recomputations
            .fetch_add(1, Ordering::Relaxed);
        if target.early {
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
            expires_at_ms: computed_at_ms
                .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
            generation: target.generation,
            body: body.clone(),
        };
        let stored_it = inner.store_script.evalsha_with_reload::<i64, _, _>(
            &inner.redis,
            vec![target.value_key.clone()],
            vec![
                Value::Bytes(value.encode()),
                Value::Integer(i64::try_from(target.generation).unwrap_or(i64::MAX)),
                Value::Integer(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1)),
            ],
        );
        match tokio::time::timeout(inner.config.redis_timeout, stored_it).await {
            // Refused: a newer generation's value is there.
            Ok(Ok(0)) => {}
            Ok(Ok(_)) => {
                let mut stored = inner.stored.lock();
                let now = Instant::now();
                stored.retain(|_, (_, until)| *until > now);
                stored.insert(target.key.clone(), (computed_at_ms, now + ttl));
            }
            Ok(Err(e)) => {
                self.redis_failed("store", &e);
            }
            Err(_) => {
                self.redis_failed("store", &"timed out");
            }
        }
        Ok(body)
    }

    fn jittered_ttl(&self) -> Duration {
        let config = &self.inner.config;
        jittered(config.ttl, config.ttl_jitter, fastrand::f64())
    }

    /// Bumps the generations of what `report` wrote: its tenants', and
    /// every plan's. Every plan, because the plan a tenant is on is only
    /// known for certain inside the database (another process may have
    /// moved it a moment ago), and because a batch of a multi-tenant feed
    /// holds tenants of every plan anyway. A replay bumps them too: its
    /// first attempt may have committed without its bump.
    pub async fn invalidate(&self, report: &IngestReport) {
        let plans: &[Plan] = &Plan::ALL;
        if report.tenants.is_empty() && !report.replayed {
            // Nothing was written.
            return;
        }
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
            self.bump_lost();
        }
    }

    /// Registers or updates `tenant` (as [`Analytics::upsert_tenant`]),
    /// then bumps every plan's generation: a tenant that changed plan
    /// leaves one plan's dashboards and joins another's. When the bump
    /// fails, this process reads through to PostgreSQL until one succeeds.
    pub async fn upsert_tenant(&self, tenant: &Tenant) -> Result<(), AnalyticsError> {
        self.inner.store.upsert_tenant(tenant).await?;
        if !self.invalidate_all().await {
            self.bump_lost();
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

    /// Counts a lost bump; this process reads through to PostgreSQL until
    /// a bump of every plan succeeds.
    fn bump_lost(&self) {
        let inner = &self.inner;
        inner
            .counters
            .invalidation_failures
            .fetch_add(1, Ordering::Relaxed);
        inner.lost_epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Marks the generations as untrusted, as after a lost bump: call it
    /// when the Redis connection was re-established (the server may have
    /// restarted from a snapshot or failed over, and lost bumps).
    pub fn mark_generations_suspect(&self) {
        self.inner.lost_epoch.fetch_add(1, Ordering::AcqRel);
    }

    async fn bump(&self, keys: Vec<String>) -> bool {
        let inner = &self.inner;
        if self.skipping_redis() {
            return false;
        }
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
        // The losses this bump covers: those counted before it was sent.
        let seen = self.inner.lost_epoch.load(Ordering::Acquire);
        if self.inner.synced_epoch.load(Ordering::Acquire) >= seen {
            return true;
        }
        if !self.invalidate_all().await {
            return false;
        }
        self.inner.synced_epoch.fetch_max(seen, Ordering::AcqRel);
        tracing::info!("dashboard cache: generations bumped after an outage");
        self.generations_trusted()
    }
}

/// `ttl` spread by `jitter` (a fraction) according to `r` in [0, 1): from
/// `ttl·(1 − jitter)` to `ttl·(1 + jitter)`, and at least 1 ms.
fn jittered(ttl: Duration, jitter: f64, r: f64) -> Duration {
    // The config's fields are public: never trust them to be in range.
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 0.5)
    } else {
        0.0
    };
    let spread = jitter * (2.0 * r.clamp(0.0, 1.0) - 1.0);
    Duration::try_from_secs_f64(ttl.as_secs_f64() * (1.0 + spread))
        .unwrap_or(ttl)
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
    /// As [`EventWriter::write`], then [`DashboardCache::invalidate`]. The
    /// two run as one task of their own, so a caller that gives up (a
    /// client gone) cannot leave a commit without its bump; a write that
    /// fails bumps every plan, since its commit may have happened with its
    /// answer lost.
    ///
    /// It takes the events by value: the task that owns them outlives the
    /// caller's borrow.
    pub async fn write(
        &self,
        batch_id: Uuid,
        events: Vec<Event>,
    ) -> Result<IngestReport, AnalyticsError> {
        let (writer, cache) = (self.writer.clone(), self.cache.clone());
        let task = tokio::spawn(async move {
            match writer.write(batch_id, &events).await {
                Ok(report) => {
                    cache.invalidate(&report).await;
                    Ok(report)
                }
                Err(e) => {
                    if !cache.invalidate_all().await {
                        cache.bump_lost();
                    }
                    Err(e)
                }
            }
        });
        task.await
            .map_err(|e| AnalyticsError::Unavailable(Box::new(e)))?
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

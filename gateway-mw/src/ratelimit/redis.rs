//! Distributed GCRA on Redis (feature `redis`): several gateway instances
//! share one limit per key.
//!
//! Each check is one atomic Lua script (`EVALSHA`, reloaded on `NOSCRIPT`)
//! that reads Redis's own clock (`TIME`), so instances with skewed clocks
//! still agree. The key holds the TAT in microseconds and expires when the
//! TAT passes, so idle keys cost Redis nothing. A check that fails or takes
//! longer than [`RedisLimiterConfig::timeout`] (default 20 ms) is decided by
//! the [`FailurePolicy`]: a local limiter with the same quota (the default),
//! allow, or deny. Failures are counted for metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fred::prelude::Client;
use fred::types::scripts::Script;

use super::{KeyedLimiter, LimiterConfig, Quota, RateDecision};

/// GCRA in one round trip. KEYS[1]: the key. ARGV: emission interval and
/// tolerance in µs. Returns {allowed, now_us, tat_us} (tat after the check).
const GCRA_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if now < tat - tolerance then
  return {0, now, tat}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, now, new_tat}
"#;

/// The GCRA test of [`GCRA_LUA`] without the update: would one request be
/// allowed now? KEYS[1]: the key. ARGV[1]: tolerance in µs. Returns
/// {allowed, now_us, tat_us}.
const PEEK_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tolerance = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if now < tat - tolerance then
  return {0, now, tat}
end
return {1, now, tat}
"#;

/// What to do when Redis cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Decide with a per-instance local limiter of the same quota (with N
    /// instances the effective limit is up to N× during the outage).
    #[default]
    LocalFallback,
    /// Allow the request (availability over strictness).
    FailOpen,
    /// Deny the request (strictness over availability).
    FailClosed,
}

/// Settings of a [`RedisLimiter`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisLimiterConfig {
    /// The quota every key gets.
    pub quota: Quota,
    /// Prefix of every Redis key this limiter writes (e.g. `gw:rl:user:`).
    pub key_prefix: String,
    /// The most a check may wait for Redis. Default 20 ms.
    pub timeout: Duration,
    /// What decides when Redis fails or times out.
    pub on_failure: FailurePolicy,
}

impl RedisLimiterConfig {
    /// `quota` under `key_prefix`, 20 ms timeout, local fallback.
    pub fn new(quota: Quota, key_prefix: impl Into<String>) -> Self {
        RedisLimiterConfig {
            quota,
            key_prefix: key_prefix.into(),
            timeout: Duration::from_millis(20),
            on_failure: FailurePolicy::LocalFallback,
        }
    }

    /// Sets [`RedisLimiterConfig::timeout`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`RedisLimiterConfig::on_failure`].
    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.on_failure = policy;
        self
    }
}

/// Why a Redis check failed (the limiter itself never returns it from
/// [`RedisLimiter::check`]; it applies the failure policy instead).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisLimitError {
    /// Redis did not answer within the timeout.
    #[error("redis rate-limit check timed out after {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error or the connection failed.
    #[error("redis rate-limit check failed: {0}")]
    Redis(#[from] fred::error::Error),
    /// The script returned something unexpected.
    #[error("unexpected reply from the rate-limit script")]
    BadReply,
}

/// One check's raw result, with Redis's clock (for tests and diagnostics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisCheck {
    /// The decision.
    pub decision: RateDecision,
    /// Redis's time at the check, in µs since the epoch.
    pub now_us: u64,
}

/// A GCRA limiter whose state lives in Redis.
pub struct RedisLimiter {
    client: Client,
    script: Script,
    peek_script: Script,
    config: RedisLimiterConfig,
    fallback: KeyedLimiter<String>,
    failures: AtomicU64,
}

impl std::fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RedisLimiter {
    /// A limiter using `client` (connected, or connecting: checks time out
    /// into the failure policy until it is).
    pub fn new(client: Client, config: RedisLimiterConfig) -> RedisLimiter {
        RedisLimiter {
            fallback: KeyedLimiter::new(LimiterConfig::new(config.quota)),
            script: Script::from_lua(GCRA_LUA),
            peek_script: Script::from_lua(PEEK_LUA),
            client,
            config,
            failures: AtomicU64::new(0),
        }
    }

    /// Checks one request for `key`; on a Redis failure or timeout the
    /// failure policy decides (and the failure is counted).
    pub async fn check(&self, key: &str) -> RateDecision {
        let result = self.try_check(key).await;
        self.decide(key, result, false)
    }

    /// Whether one request for `key` would be allowed now, without counting
    /// it (see [`KeyedLimiter::peek`]); Redis failures are decided by the
    /// failure policy, as in [`RedisLimiter::check`].
    pub async fn peek(&self, key: &str) -> RateDecision {
        let result = self.try_peek(key).await;
        self.decide(key, result, true)
    }

    fn decide(
        &self,
        key: &str,
        result: Result<RedisCheck, RedisLimitError>,
        peek: bool,
    ) -> RateDecision {
        match result {
            Ok(check) => check.decision,
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, policy = ?self.config.on_failure, "rate limit: redis unavailable");
                match self.config.on_failure {
                    FailurePolicy::LocalFallback if peek => self.fallback.peek(key),
                    FailurePolicy::LocalFallback => self.fallback.check(key),
                    FailurePolicy::FailOpen => self.unlimited(),
                    FailurePolicy::FailClosed => RateDecision {
                        allowed: false,
                        limit: self.config.quota.burst,
                        remaining: 0,
                        reset_after: Duration::from_secs(1),
                        retry_after: Some(Duration::from_secs(1)),
                    },
                }
            }
        }
    }

    /// Checks one request in Redis, returning errors instead of applying the
    /// failure policy.
    pub async fn try_check(&self, key: &str) -> Result<RedisCheck, RedisLimitError> {
        self.run(&self.script, key, true).await
    }

    /// Peeks in Redis (see [`RedisLimiter::peek`]), returning errors instead
    /// of applying the failure policy.
    pub async fn try_peek(&self, key: &str) -> Result<RedisCheck, RedisLimitError> {
        self.run(&self.peek_script, key, false).await
    }

    async fn run(
        &self,
        script: &Script,
        key: &str,
        counting: bool,
    ) -> Result<RedisCheck, RedisLimitError> {
        let quota = self.config.quota;
        let interval_us = (quota.emission_interval_nanos() / 1_000).max(1);
        let tolerance_us = interval_us * u64::from(quota.burst.max(1) - 1);
        let redis_key = format!("{}{key}", self.config.key_prefix);
        let args = if counting {
            vec![interval_us as i64, tolerance_us as i64]
        } else {
            vec![tolerance_us as i64]
        };
        let call =
            script.evalsha_with_reload::<Vec<i64>, _, _>(&self.client, vec![redis_key], args);
        let reply = tokio::time::timeout(self.config.timeout, call)
            .await
            .map_err(|_| RedisLimitError::Timeout(self.config.timeout))??;
        let [allowed, now, tat] = reply.as_slice() else {
            return Err(RedisLimitError::BadReply);
        };
        let (now, tat) = (
            u64::try_from(*now).map_err(|_| RedisLimitError::BadReply)?,
            u64::try_from(*tat).map_err(|_| RedisLimitError::BadReply)?,
        );
        let ahead = tat.saturating_sub(now);
        let decision = if *allowed == 1 {
            RateDecision {
                allowed: true,
                limit: quota.burst,
                remaining: ((tolerance_us + interval_us).saturating_sub(ahead) / interval_us)
                    as u32,
                reset_after: Duration::from_micros(ahead),
                retry_after: None,
            }
        } else {
            RateDecision {
                allowed: false,
                limit: quota.burst,
                remaining: 0,
                reset_after: Duration::from_micros(ahead),
                retry_after: Some(Duration::from_micros(ahead.saturating_sub(tolerance_us))),
            }
        };
        Ok(RedisCheck {
            decision,
            now_us: now,
        })
    }

    /// The quota.
    pub fn quota(&self) -> Quota {
        self.config.quota
    }

    /// Checks that failed or timed out since creation.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    fn unlimited(&self) -> RateDecision {
        RateDecision {
            allowed: true,
            limit: self.config.quota.burst,
            remaining: self.config.quota.burst,
            reset_after: Duration::ZERO,
            retry_after: None,
        }
    }
}

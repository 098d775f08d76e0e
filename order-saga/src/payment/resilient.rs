//! [`ResilientPayments`]: any [`Payments`] provider behind a per-attempt
//! timeout, retries with full-jitter exponential backoff under the same
//! idempotency key, resolution of unknown outcomes by lookup, and a circuit
//! breaker.
//!
//! What happens to one call:
//!
//! 1. The circuit breaker ([`failsafe`]) is asked first. While it is open
//!    the call fails at once with [`PaymentError::CircuitOpen`] and the
//!    provider sees nothing.
//! 2. The attempt runs under [`ResilientConfig::attempt_timeout`]; a timeout
//!    is an [`PaymentError::OutcomeUnknown`] (the provider may have acted).
//! 3. A transient error ([`PaymentError::is_transient`]: unavailable, or
//!    outcome unknown) is retried after a full-jitter delay (uniform in
//!    `0..=min(max_delay, base_delay·2ⁿ)`, scheduled by [`backon`]) with the
//!    **same idempotency key**, up to [`ResilientConfig::max_attempts`]
//!    attempts. Every other error (a decline, a reused key, a bad state,
//!    an unknown payment, a malformed request) is a final answer: returned
//!    at once, not retried, and counted as a *success* by the breaker
//!    (the provider is healthy, it just said no).
//! 4. After an authorization whose outcome is unknown, the next attempt
//!    first **looks the payment up by its authorization key**; if the
//!    provider has it, that is the answer (a declined payment is
//!    [`PaymentError::Declined`]). Only if it has none is the authorization
//!    sent again, under the same key, so the provider's de-duplication
//!    makes even a race with a late first attempt harmless. A charge is
//!    never retried under a new key.
//! 5. If the attempts run out, or the breaker opens, after an attempt whose
//!    outcome stayed unknown, the call fails with
//!    [`PaymentError::OutcomeUnknown`] (never `CircuitOpen` or
//!    `Unavailable`), so the caller knows the provider may hold a payment
//!    and resolves it later with [`Payments::lookup`].
//!
//! Transient errors and timeouts count as failures for the breaker; it
//! opens after [`BreakerConfig::consecutive_failures`] failures in a row, or
//! when the success rate over [`BreakerConfig::success_rate_window`] falls
//! under [`BreakerConfig::min_success_rate`], stays open for
//! [`BreakerConfig::open_duration`] (doubling on each failed probe up to
//! [`BreakerConfig::max_open_duration`]), then lets calls probe the
//! provider (half-open): a success closes it, a failure opens it again.
//! The breaker reads the monotonic system clock (`std::time::Instant`),
//! not tokio's.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use failsafe::failure_policy::{
    ConsecutiveFailures, OrElse, SuccessRateOverTimeWindow, consecutive_failures,
    success_rate_over_time_window,
};
use failsafe::{FailurePolicy, Instrument, StateMachine};
use parking_lot::Mutex;

use super::{AuthorizeRequest, Payment, PaymentError, PaymentState, Payments};
use crate::BoxFuture;

/// Settings of [`ResilientPayments`]. Every field has a documented default
/// ([`ResilientConfig::default`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ResilientConfig {
    /// Bound on one attempt (and on one lookup). A timeout is an unknown
    /// outcome. Default 2 s: well above a card processor's usual p99, and
    /// equal to the HTTP client's default timeout (give the HTTP client a
    /// timeout of at least this, or its own timeout decides first).
    pub attempt_timeout: Duration,
    /// Attempts per call, the first included (lookups not counted). Default
    /// 4: with 5% transient failures, one call in 160,000 still fails.
    pub max_attempts: u32,
    /// Cap of the first retry's delay; each retry doubles it. The delay
    /// itself is drawn uniformly below the cap (full jitter). Default 25 ms.
    pub base_delay: Duration,
    /// The largest cap. Default 1 s.
    pub max_delay: Duration,
    /// Seeds the jitter, for reproducible tests. Default `None` (random).
    pub jitter_seed: Option<u64>,
    /// The circuit breaker.
    pub breaker: BreakerConfig,
}

impl Default for ResilientConfig {
    fn default() -> ResilientConfig {
        ResilientConfig {
            attempt_timeout: Duration::from_secs(2),
            max_attempts: 4,
            base_delay: Duration::from_millis(25),
            max_delay: Duration::from_secs(1),
            jitter_seed: None,
            breaker: BreakerConfig::default(),
        }
    }
}

impl ResilientConfig {
    /// Sets [`ResilientConfig::attempt_timeout`].
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> ResilientConfig {
        self.attempt_timeout = timeout;
        self
    }

    /// Sets [`ResilientConfig::max_attempts`].
    pub fn with_max_attempts(mut self, attempts: u32) -> ResilientConfig {
        self.max_attempts = attempts;
        self
    }

    /// Sets [`ResilientConfig::base_delay`] and [`ResilientConfig::max_delay`].
    pub fn with_delays(mut self, base: Duration, max: Duration) -> ResilientConfig {
        self.base_delay = base;
        self.max_delay = max;
        self
    }

    /// Sets [`ResilientConfig::jitter_seed`].
    pub fn with_jitter_seed(mut self, seed: u64) -> ResilientConfig {
        self.jitter_seed = Some(seed);
        self
    }

    /// Sets [`ResilientConfig::breaker`].
    pub fn with_breaker(mut self, breaker: BreakerConfig) -> ResilientConfig {
        self.breaker = breaker;
        self
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ResilientConfigError> {
        if self.attempt_timeout.is_zero() {
            return Err(ResilientConfigError::ZeroTimeout);
        }
        if self.max_attempts == 0 {
            return Err(ResilientConfigError::ZeroAttempts);
        }
        if self.base_delay > self.max_delay {
            return Err(ResilientConfigError::DelaysOutOfOrder {
                base: self.base_delay,
                max: self.max_delay,
            });
        }
        self.breaker.validate()
    }
}

/// Settings of the circuit breaker.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Failures in a row (transient errors and timeouts, across all calls)
    /// that open the breaker. Default 5.
    pub consecutive_failures: u32,
    /// The breaker also opens when the success rate (an exponentially
    /// weighted average over `success_rate_window`) falls below this, once
    /// `min_requests` were seen in the window and the window has passed
    /// since the breaker last closed. `0` turns this rule off. Default 0.5.
    pub min_success_rate: f64,
    /// The window of the success-rate rule, in whole seconds (at least 1).
    /// Default 30 s.
    pub success_rate_window: Duration,
    /// Requests in the window before the success-rate rule applies.
    /// Default 20.
    pub min_requests: u32,
    /// How long the breaker stays open the first time. Default 1 s.
    pub open_duration: Duration,
    /// Each failed probe doubles the open period, up to this. Default 30 s.
    pub max_open_duration: Duration,
}

impl Default for BreakerConfig {
    fn default() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 5,
            min_success_rate: 0.5,
            success_rate_window: Duration::from_secs(30),
            min_requests: 20,
            open_duration: Duration::from_secs(1),
            max_open_duration: Duration::from_secs(30),
        }
    }
}

impl BreakerConfig {
    /// Sets [`BreakerConfig::consecutive_failures`].
    pub fn with_consecutive_failures(mut self, failures: u32) -> BreakerConfig {
        self.consecutive_failures = failures;
        self
    }

    /// Sets [`BreakerConfig::min_success_rate`] (0 turns the rule off).
    pub fn with_min_success_rate(mut self, rate: f64) -> BreakerConfig {
        self.min_success_rate = rate;
        self
    }

    /// Sets [`BreakerConfig::open_duration`] and
    /// [`BreakerConfig::max_open_duration`].
    pub fn with_open_durations(mut self, first: Duration, max: Duration) -> BreakerConfig {
        self.open_duration = first;
        self.max_open_duration = max;
        self
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ResilientConfigError> {
        if self.consecutive_failures == 0 {
            return Err(ResilientConfigError::ZeroFailures);
        }
        if !(0.0..=1.0).contains(&self.min_success_rate) {
            return Err(ResilientConfigError::SuccessRate(self.min_success_rate));
        }
        if self.success_rate_window < Duration::from_secs(1) {
            return Err(ResilientConfigError::WindowTooShort(
                self.success_rate_window,
            ));
        }
        if self.open_duration.is_zero() || self.open_duration > self.max_open_duration {
            return Err(ResilientConfigError::OpenDurations {
                first: self.open_duration,
                max: self.max_open_duration,
            });
        }
        Ok(())
    }

    fn policy(&self) -> Policy {
        let backoff = OpenBackoff {
            next: self.open_duration,
            max: self.max_open_duration,
        };
        success_rate_over_time_window(
            self.min_success_rate,
            self.min_requests,
            self.success_rate_window,
            backoff.clone(),
        )
        .or_else(consecutive_failures(self.consecutive_failures, backoff))
    }
}

/// A [`ResilientConfig`] refused by its `validate`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ResilientConfigError {
    /// `attempt_timeout` is zero.
    #[error("attempt_timeout must be positive")]
    ZeroTimeout,
    /// `max_attempts` is zero.
    #[error("max_attempts must be at least 1")]
    ZeroAttempts,
    /// `base_delay` is above `max_delay`.
    #[error("base_delay ({base:?}) must not exceed max_delay ({max:?})")]
    DelaysOutOfOrder {
        /// The base delay.
        base: Duration,
        /// The cap.
        max: Duration,
    },
    /// `consecutive_failures` is zero.
    #[error("breaker consecutive_failures must be at least 1")]
    ZeroFailures,
    /// `min_success_rate` is not in `0..=1`.
    #[error("breaker min_success_rate must be between 0 and 1, got {0}")]
    SuccessRate(f64),
    /// `success_rate_window` is under a second.
    #[error("breaker success_rate_window must be at least 1 s, got {0:?}")]
    WindowTooShort(Duration),
    /// The open durations are zero or out of order.
    #[error(
        "breaker open_duration ({first:?}) must be positive and at most max_open_duration ({max:?})"
    )]
    OpenDurations {
        /// The first open period.
        first: Duration,
        /// The cap.
        max: Duration,
    },
}

/// The breaker's open periods: `open_duration`, doubling to
/// `max_open_duration`. (failsafe's own backoffs count whole seconds.)
#[derive(Debug, Clone)]
struct OpenBackoff {
    next: Duration,
    max: Duration,
}

impl Iterator for OpenBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        Some(now)
    }
}

type Policy = OrElse<SuccessRateOverTimeWindow<OpenBackoff>, ConsecutiveFailures<OpenBackoff>>;
type Breaker = StateMachine<Policy, BreakerInstrument>;

/// The circuit breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls fail fast with [`PaymentError::CircuitOpen`]. (The breaker
    /// leaves this state on the first call after its open period.)
    Open,
    /// The open period is over: calls probe the provider.
    HalfOpen,
}

impl BreakerState {
    /// The state's name: `closed`, `open`, `half_open`.
    pub const fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// As a gauge: 0 closed, 1 open, 2 half-open.
    pub const fn as_gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    fn from_u8(value: u8) -> BreakerState {
        match value {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters of a [`ResilientPayments`], since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResilienceStats {
    /// Calls made to the wrapper.
    pub calls: u64,
    /// Requests sent to the provider: attempts of the operation and the
    /// lookups that resolve unknown outcomes.
    pub attempts: u64,
    /// Retries (each after a backoff delay).
    pub retries: u64,
    /// Lookups sent to resolve an unknown outcome.
    pub lookups: u64,
    /// Unknown outcomes a lookup resolved (the provider had the payment).
    pub resolved_by_lookup: u64,
    /// Requests whose outcome was unknown (a lost reply or a timeout).
    pub unknown_outcomes: u64,
    /// Requests cut by [`ResilientConfig::attempt_timeout`].
    pub timeouts: u64,
    /// Calls that ended with their outcome still unknown.
    pub unresolved: u64,
    /// Times the breaker opened.
    pub breaker_opened: u64,
    /// Times the breaker let probes through (half-open).
    pub breaker_half_opened: u64,
    /// Times the breaker closed again after opening.
    pub breaker_closed: u64,
    /// Requests the open breaker refused.
    pub breaker_rejected: u64,
}

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    attempts: AtomicU64,
    retries: AtomicU64,
    lookups: AtomicU64,
    resolved_by_lookup: AtomicU64,
    unknown_outcomes: AtomicU64,
    timeouts: AtomicU64,
    unresolved: AtomicU64,
    breaker_opened: AtomicU64,
    breaker_half_opened: AtomicU64,
    breaker_closed: AtomicU64,
    breaker_rejected: AtomicU64,
    /// A [`BreakerState`] as `u8`.
    state: AtomicU8,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Sees the breaker's transitions (failsafe reports them here).
#[derive(Debug, Clone)]
struct BreakerInstrument(Arc<Counters>);

impl Instrument for BreakerInstrument {
    fn on_call_rejected(&self) {
        bump(&self.0.breaker_rejected);
    }

    fn on_open(&self) {
        bump(&self.0.breaker_opened);
        self.0.state.store(1, Ordering::Relaxed);
        tracing::warn!("payment provider circuit opened");
    }

    fn on_half_open(&self) {
        bump(&self.0.breaker_half_opened);
        self.0.state.store(2, Ordering::Relaxed);
        tracing::info!("payment provider circuit half-open: probing");
    }

    fn on_closed(&self) {
        // failsafe also reports the initial state as a close.
        if self.0.state.swap(0, Ordering::Relaxed) != 0 {
            bump(&self.0.breaker_closed);
            tracing::info!("payment provider circuit closed");
        }
    }
}

/// Backon's exponential schedule of caps with a uniform draw below each:
/// "full jitter". (backon's own jitter adds up to one delay *on top*.)
#[derive(Debug)]
struct FullJitter<I> {
    caps: I,
    rng: fastrand::Rng,
}

impl<I: Iterator<Item = Duration>> Iterator for FullJitter<I> {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let cap = self.caps.next()?;
        Some(cap.mul_f64(self.rng.f64()))
    }
}

/// The attempt ran past [`ResilientConfig::attempt_timeout`].
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no reply within {0:?}")]
pub struct AttemptTimedOut(pub Duration);

/// A call whose outcome stayed unknown: the provider may hold a payment.
/// The source is the last error seen.
#[derive(Debug, thiserror::Error)]
#[error("the outcome stayed unknown after retries; last error: {last}")]
pub struct StillUnknown {
    /// The last attempt's error.
    #[source]
    pub last: PaymentError,
}

/// A [`Payments`] provider made safe to call: timeouts, retries under the
/// same key, lookup of unknown outcomes, and a circuit breaker (see the
/// [module docs](self)).
pub struct ResilientPayments<P> {
    inner: P,
    config: ResilientConfig,
    breaker: Breaker,
    counters: Arc<Counters>,
    jitter: Mutex<fastrand::Rng>,
}

impl<P> fmt::Debug for ResilientPayments<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResilientPayments")
            .field("config", &self.config)
            .field("breaker", &self.breaker_state())
            .finish_non_exhaustive()
    }
}

impl<P> ResilientPayments<P> {
    /// The wrapped provider.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// The settings.
    pub fn config(&self) -> &ResilientConfig {
        &self.config
    }

    /// The breaker's state (for a gauge).
    pub fn breaker_state(&self) -> BreakerState {
        BreakerState::from_u8(self.counters.state.load(Ordering::Relaxed))
    }

    /// The counters.
    pub fn stats(&self) -> ResilienceStats {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ResilienceStats {
            calls: load(&c.calls),
            attempts: load(&c.attempts),
            retries: load(&c.retries),
            lookups: load(&c.lookups),
            resolved_by_lookup: load(&c.resolved_by_lookup),
            unknown_outcomes: load(&c.unknown_outcomes),
            timeouts: load(&c.timeouts),
            unresolved: load(&c.unresolved),
            breaker_opened: load(&c.breaker_opened),
            breaker_half_opened: load(&c.breaker_half_opened),
            breaker_closed: load(&c.breaker_closed),
            breaker_rejected: load(&c.breaker_rejected),
        }
    }
}

impl<P: Payments> ResilientPayments<P> {
    /// Wraps `inner` with `config`.
    pub fn new(
        inner: P,
        config: ResilientConfig,
    ) -> Result<ResilientPayments<P>, ResilientConfigError> {
        config.validate()?;
        let counters = Arc::new(Counters::default());
        let breaker = failsafe::Config::new()
            .failure_policy(config.breaker.policy())
            .instrument(BreakerInstrument(Arc::clone(&counters)))
            .build();
        let jitter = match config.jitter_seed {
            Some(seed) => fastrand::Rng::with_seed(seed),
            None => fastrand::Rng::new(),
        };
        Ok(ResilientPayments {
            inner,
            config,
            breaker,
            counters,
            jitter: Mutex::new(jitter),
        })
    }

    /// A fresh retry schedule for one call.
    fn backoff(&self) -> FullJitter<<ExponentialBuilder as BackoffBuilder>::Backoff> {
        let retries = self.config.max_attempts.saturating_sub(1) as usize;
        let caps = ExponentialBuilder::new()
            .with_min_delay(self.config.base_delay)
            .with_max_delay(self.config.max_delay)
            .with_factor(2.0)
            .with_max_times(retries)
            .build();
        let seed = self.jitter.lock().u64(..);
        FullJitter {
            caps,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// One request to the provider, if the breaker allows it, bounded by
    /// the attempt timeout, its result reported to the breaker.
    async fn guarded<T, F, Fut>(&self, call: F) -> Result<T, PaymentError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, PaymentError>>,
    {
        if !self.breaker.is_call_permitted() {
            return Err(PaymentError::CircuitOpen);
        }
        bump(&self.counters.attempts);
        let timeout = self.config.attempt_timeout;
        let result = match tokio::time::timeout(timeout, call()).await {
            Ok(result) => result,
            Err(_) => {
                bump(&self.counters.timeouts);
                Err(PaymentError::OutcomeUnknown(Box::new(AttemptTimedOut(
                    timeout,
                ))))
            }
        };
        match &result {
            Err(e) if e.is_transient() => {
                if matches!(e, PaymentError::OutcomeUnknown(_)) {
                    bump(&self.counters.unknown_outcomes);
                }
                self.breaker.on_error();
            }
            _ => self.breaker.on_success(),
        }
        result
    }

    /// Retries `attempt` on transient errors with full-jitter backoff.
    /// `acted` is set by an attempt whose outcome was unknown; a call that
    /// then ends on a transient error or an open breaker ends
    /// `OutcomeUnknown`.
    async fn retrying<T, F, Fut>(
        &self,
        operation: &'static str,
        acted: &AtomicBool,
        attempt: F,
    ) -> Result<T, PaymentError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, PaymentError>>,
    {
        bump(&self.counters.calls);
        let result = attempt
            .retry(self.backoff())
            .when(PaymentError::is_transient)
            .notify(|error, delay| {
                bump(&self.counters.retries);
                tracing::debug!(
                    operation,
                    code = error.code(),
                    ?delay,
                    "retrying payment call"
                );
            })
            .await;
        match result {
            Err(e @ PaymentError::OutcomeUnknown(_)) => {
                bump(&self.counters.unresolved);
                Err(e)
            }
            Err(e @ (PaymentError::Unavailable(_) | PaymentError::CircuitOpen))
                if acted.load(Ordering::Relaxed) =>
            {
                bump(&self.counters.unresolved);
                Err(PaymentError::OutcomeUnknown(Box::new(StillUnknown {
                    last: e,
                })))
            }
            other => other,
        }
    }

    /// Capture, void or refund: the same request again under the same key
    /// (the provider answers a repeated key with the first result).
    async fn change<'a, F>(
        &'a self,
        operation: &'static str,
        call: F,
    ) -> Result<Payment, PaymentError>
    where
        F: Fn() -> BoxFuture<'a, Result<Payment, PaymentError>>,
    {
        let acted = AtomicBool::new(false);
        let acted_ref = &acted;
        let call = &call;
        self.retrying(operation, acted_ref, move || async move {
            let result = self.guarded(call).await;
            if matches!(result, Err(PaymentError::OutcomeUnknown(_))) {
                acted_ref.store(true, Ordering::Relaxed);
            }
            result
        })
        .await
    }

    async fn authorize_resolving(
        &self,
        request: AuthorizeRequest,
    ) -> Result<Payment, PaymentError> {
        let acted = AtomicBool::new(false);
        let acted_ref = &acted;
        let request = &request;
        self.retrying("authorize", acted_ref, move || async move {
            if acted_ref.load(Ordering::Relaxed) {
                // Lookup before retry: the first attempt may have charged.
                bump(&self.counters.lookups);
                let key = request.idempotency_key.as_str();
                if let Some(payment) = self.guarded(|| self.inner.lookup(key)).await? {
                    bump(&self.counters.resolved_by_lookup);
                    return settle_authorization(request, payment);
                }
                // Not there (yet): send it again under the same key.
            }
            let result = self.guarded(|| self.inner.authorize(request.clone())).await;
            if matches!(result, Err(PaymentError::OutcomeUnknown(_))) {
                acted_ref.store(true, Ordering::Relaxed);
            }
            result
        })
        .await
    }
}

/// The payment a lookup found, as the authorization's answer: a declined
/// payment is a decline; one made with other parameters means the key was
/// reused.
fn settle_authorization(
    request: &AuthorizeRequest,
    payment: Payment,
) -> Result<Payment, PaymentError> {
    if payment.order_id != request.order_id
        || payment.amount_cents != request.amount_cents
        || payment.currency != request.currency
    {
        return Err(PaymentError::KeyReused(request.idempotency_key.clone()));
    }
    if payment.state == PaymentState::Declined {
        return Err(PaymentError::Declined {
            reason: payment
                .decline_reason
                .unwrap_or_else(|| "declined".to_owned()),
        });
    }
    Ok(payment)
}

impl<P: Payments> Payments for ResilientPayments<P> {
    fn authorize(&self, request: AuthorizeRequest) -> BoxFuture<'_, Result<Payment, PaymentError>> {
        Box::pin(self.authorize_resolving(request))
    }

    fn capture<'a>(
        &'a self,
        idempotency_key: &'a str,
        payment_id: &'a str,
    ) -> BoxFuture<'a, Result<Payment, PaymentError>> {
        Box::pin(self.change("capture", move || {
            self.inner.capture(idempotency_key, payment_id)
        }))
    }

    fn void<'a>(
        &'a self,
        idempotency_key: &'a str,
        payment_id: &'a str,
    ) -> BoxFuture<'a, Result<Payment, PaymentError>> {
        Box::pin(self.change("void", move || self.inner.void(idempotency_key, payment_id)))
    }

    fn refund<'a>(
        &'a self,
        idempotency_key: &'a str,
        payment_id: &'a str,
    ) -> BoxFuture<'a, Result<Payment, PaymentError>> {
        Box::pin(self.change("refund", move || {
            self.inner.refund(idempotency_key, payment_id)
        }))
    }

    fn lookup<'a>(
        &'a self,
        authorize_key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Payment>, PaymentError>> {
        Box::pin(async move {
            // A read: nothing can have been done, so nothing is unknown.
            let never = AtomicBool::new(false);
            self.retrying("lookup", &never, || {
                self.guarded(|| self.inner.lookup(authorize_key))
            })
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_stays_under_doubling_caps() {
        let config = ResilientConfig::default()
            .with_max_attempts(8)
            .with_delays(Duration::from_millis(10), Duration::from_millis(200))
            .with_jitter_seed(9);
        let wrapper = ResilientPayments::new(
            crate::payment::sim::Simulator::new(Default::default()).unwrap(),
            config,
        )
        .unwrap();
        let caps = [10u64, 20, 40, 80, 160, 200, 200];
        let mut sums = [0.0f64; 7];
        let runs = 2_000;
        for _ in 0..runs {
            let delays: Vec<Duration> = wrapper.backoff().collect();
            assert_eq!(delays.len(), caps.len(), "one delay per retry");
            for (i, (delay, cap)) in delays.iter().zip(caps).enumerate() {
                assert!(*delay <= Duration::from_millis(cap), "{delay:?} > {cap} ms");
                sums[i] += delay.as_secs_f64() * 1000.0;
            }
        }
        // Full jitter: uniform below the cap, so the mean is half the cap.
        for (sum, cap) in sums.iter().zip(caps) {
            let mean = sum / runs as f64;
            assert!(
                (mean - cap as f64 / 2.0).abs() < cap as f64 * 0.06,
                "mean {mean} for cap {cap}"
            );
        }
    }

    #[test]
    fn open_periods_double_to_the_cap() {
        let periods: Vec<_> = OpenBackoff {
            next: Duration::from_millis(300),
            max: Duration::from_secs(1),
        }
        .take(4)
        .collect();
        assert_eq!(periods, [300, 600, 1000, 1000].map(Duration::from_millis));
    }

    #[test]
    fn bad_configs_are_refused() {
        let sim = || crate::payment::sim::Simulator::new(Default::default()).unwrap();
        for (config, expected) in [
            (
                ResilientConfig::default().with_max_attempts(0),
                ResilientConfigError::ZeroAttempts,
            ),
            (
                ResilientConfig::default().with_attempt_timeout(Duration::ZERO),
                ResilientConfigError::ZeroTimeout,
            ),
            (
                ResilientConfig::default()
                    .with_delays(Duration::from_secs(2), Duration::from_secs(1)),
                ResilientConfigError::DelaysOutOfOrder {
                    base: Duration::from_secs(2),
                    max: Duration::from_secs(1),
                },
            ),
            (
                ResilientConfig::default()
                    .with_breaker(BreakerConfig::default().with_min_success_rate(1.5)),
                ResilientConfigError::SuccessRate(1.5),
            ),
            (
                ResilientConfig::default()
                    .with_breaker(BreakerConfig::default().with_consecutive_failures(0)),
                ResilientConfigError::ZeroFailures,
            ),
        ] {
            assert_eq!(ResilientPayments::new(sim(), config).unwrap_err(), expected);
        }
    }

    #[test]
    fn a_lookup_with_other_parameters_is_a_reused_key() {
        let order = crate::model::OrderId::new_at(1_800_000_000_000);
        let request = AuthorizeRequest {
            idempotency_key: "k".into(),
            order_id: order,
            amount_cents: 100,
            currency: "EUR".into(),
        };
        let payment = Payment {
            id: "pay_1".into(),
            idempotency_key: "k".into(),
            order_id: order,
            amount_cents: 200,
            currency: "EUR".into(),
            state: PaymentState::Authorized,
            decline_reason: None,
            created_at: chrono::DateTime::UNIX_EPOCH,
        };
        assert!(matches!(
            settle_authorization(&request, payment.clone()),
            Err(PaymentError::KeyReused(_))
        ));
        let declined = Payment {
            amount_cents: 100,
            state: PaymentState::Declined,
            decline_reason: Some("insufficient_funds".into()),
            ..payment
        };
        assert!(matches!(
            settle_authorization(&request, declined),
            Err(PaymentError::Declined { reason }) if reason == "insufficient_funds"
        ));
    }
}

//! The payment provider simulator: an in-process card processor with its
//! own ledger, the embedded default [`Payments`] and the core of the
//! `payment_sim` HTTP service.
//!
//! It behaves like a real processor where the saga can tell the difference:
//!
//! - **Idempotency keys with Stripe's semantics.** A key names one request:
//!   the same key with the same operation and parameters returns the stored
//!   result (a decline included) without acting again; the same key with a
//!   different operation or different parameters is
//!   [`PaymentError::KeyReused`]. Only results are stored: a request
//!   refused before acting (a fault, a bad state) stores nothing, so the
//!   same key may be sent again.
//! - **State rules.** Capture only an authorized payment, void only an
//!   authorized one, refund only a captured one; repeating a call on a
//!   payment already in the target state returns it unchanged (a void of a
//!   declined payment too), anything else is [`PaymentError::InvalidState`].
//! - **Faults**, set in [`SimConfig`] and changeable at runtime
//!   ([`Simulator::set_config`]): a log-normal latency, errors that refuse a
//!   request before it acts, replies lost or held back after it acted (an
//!   *unknown outcome* for the client), declines, and a switch that takes
//!   the whole provider down.
//! - **A ledger** that a test reconciles against: every payment with the
//!   money it moved ([`Simulator::entries`]) and running totals
//!   ([`Simulator::ledger`]), including the number of orders charged twice.
//!
//! Randomness comes from one seedable generator ([`Simulator::with_seed`]),
//! so a single-threaded run is reproducible.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use time_kit::SharedClock;

use super::{AuthorizeRequest, Payment, PaymentError, PaymentState, Payments};
use crate::BoxFuture;
use crate::model::OrderId;

/// The longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// The largest amount accepted, in cents (one billion currency units), so
/// the ledger's totals cannot overflow.
pub const MAX_AMOUNT_CENTS: i64 = 100_000_000_000;

/// The largest simulated delay accepted for a latency or a late reply.
pub const MAX_SIMULATED_DELAY: Duration = Duration::from_secs(3600);

/// The 99th percentile of the standard normal distribution.
const Z99: f64 = 2.326_347_874_040_841;

/// The largest `p99 / mean` a log-normal latency can have:
/// `exp(Z99² / 2)`, about 14.97.
pub const MAX_LATENCY_TAIL_RATIO: f64 = 14.97;

/// Reasons a simulated decline gives, drawn at random.
const DECLINE_REASONS: [&str; 3] = ["card_declined", "insufficient_funds", "do_not_honor"];

/// The simulator's fault settings. The default is a perfect provider: no
/// faults and no latency.
///
/// The rates are probabilities in `0..=1`, drawn independently per
/// request: first `error_rate` (the request fails *before* acting), then,
/// after acting, one draw decides whether the reply is lost
/// (`lost_reply_rate`), late (`timeout_rate`), or delivered; so
/// `lost_reply_rate + timeout_rate` must not exceed 1. `decline_rate`
/// applies to new authorizations only.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SimConfig {
    /// Mean latency of a request. Default zero.
    pub latency_mean: Duration,
    /// 99th percentile of the latency: with `latency_mean`, it fixes a
    /// log-normal distribution. Equal to the mean, the latency is constant.
    /// At least the mean and at most [`MAX_LATENCY_TAIL_RATIO`] times it.
    /// Default zero.
    pub latency_p99: Duration,
    /// Share of requests refused before acting (`503 provider_unavailable`,
    /// nothing changes). Default 0.
    pub error_rate: f64,
    /// Share of requests whose reply is lost after acting: in process the
    /// call fails with [`PaymentError::OutcomeUnknown`]; over HTTP the
    /// connection is dropped without a response. Default 0.
    pub lost_reply_rate: f64,
    /// Share of requests whose reply is held back for `late_reply_delay`
    /// after acting, past any sensible client timeout. Default 0.
    pub timeout_rate: f64,
    /// How long a late reply is held. Default 30 s.
    pub late_reply_delay: Duration,
    /// Share of new authorizations declined. Default 0.
    pub decline_rate: f64,
    /// Every request fails at once with `503`, before acting. Default
    /// false.
    pub down: bool,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            latency_mean: Duration::ZERO,
            latency_p99: Duration::ZERO,
            error_rate: 0.0,
            lost_reply_rate: 0.0,
            timeout_rate: 0.0,
            late_reply_delay: Duration::from_secs(30),
            decline_rate: 0.0,
            down: false,
        }
    }
}

impl SimConfig {
    /// Sets the latency's mean and 99th percentile.
    pub fn with_latency(mut self, mean: Duration, p99: Duration) -> SimConfig {
        self.latency_mean = mean;
        self.latency_p99 = p99;
        self
    }

    /// Sets [`SimConfig::error_rate`].
    pub fn with_error_rate(mut self, rate: f64) -> SimConfig {
        self.error_rate = rate;
        self
    }

    /// Sets [`SimConfig::lost_reply_rate`].
    pub fn with_lost_reply_rate(mut self, rate: f64) -> SimConfig {
        self.lost_reply_rate = rate;
        self
    }

    /// Sets [`SimConfig::timeout_rate`] and [`SimConfig::late_reply_delay`].
    pub fn with_timeouts(mut self, rate: f64, late_reply_delay: Duration) -> SimConfig {
        self.timeout_rate = rate;
        self.late_reply_delay = late_reply_delay;
        self
    }

    /// Sets [`SimConfig::decline_rate`].
    pub fn with_decline_rate(mut self, rate: f64) -> SimConfig {
        self.decline_rate = rate;
        self
    }

    /// Sets [`SimConfig::down`].
    pub fn with_down(mut self, down: bool) -> SimConfig {
        self.down = down;
        self
    }

    /// Checks the rates and delays.
    pub fn validate(&self) -> Result<(), SimConfigError> {
        for (name, value) in [
            ("error_rate", self.error_rate),
            ("lost_reply_rate", self.lost_reply_rate),
            ("timeout_rate", self.timeout_rate),
            ("decline_rate", self.decline_rate),
        ] {
            // `contains` is false for NaN too.
            if !(0.0..=1.0).contains(&value) {
                return Err(SimConfigError::RateOutOfRange { name, value });
            }
        }
        if self.lost_reply_rate + self.timeout_rate > 1.0 {
            return Err(SimConfigError::ReplyFaultsOverOne {
                lost_reply_rate: self.lost_reply_rate,
                timeout_rate: self.timeout_rate,
            });
        }
        for (name, value) in [
            ("latency_mean", self.latency_mean),
            ("latency_p99", self.latency_p99),
            ("late_reply_delay", self.late_reply_delay),
        ] {
            if value > MAX_SIMULATED_DELAY {
                return Err(SimConfigError::DelayTooLong { name, value });
            }
        }
        if self.latency_p99 < self.latency_mean {
            return Err(SimConfigError::P99BelowMean {
                mean: self.latency_mean,
                p99: self.latency_p99,
            });
        }
        if !self.latency_mean.is_zero()
            && self.latency_p99.as_secs_f64() / self.latency_mean.as_secs_f64()
                > MAX_LATENCY_TAIL_RATIO
        {
            return Err(SimConfigError::TailTooLong {
                mean: self.latency_mean,
                p99: self.latency_p99,
            });
        }
        Ok(())
    }

    /// Draws one request's latency.
    fn sample_latency(&self, rng: &mut fastrand::Rng) -> Duration {
        let mean = self.latency_mean.as_secs_f64();
        if mean <= 0.0 {
            return Duration::ZERO;
        }
        let ratio = self.latency_p99.as_secs_f64() / mean;
        if ratio <= 1.0 {
            return self.latency_mean;
        }
        // A log-normal with mean m and 99th percentile q has
        // ln(q/m) = Z99·σ − σ²/2; the smaller root keeps the tail shortest.
        let sigma = Z99 - (Z99 * Z99 - 2.0 * ratio.ln()).max(0.0).sqrt();
        let mu = mean.ln() - sigma * sigma / 2.0;
        let seconds = (mu + sigma * standard_normal(rng)).exp();
        Duration::from_secs_f64(seconds.min(MAX_SIMULATED_DELAY.as_secs_f64()))
    }
}

/// A standard normal draw (Box–Muller).
fn standard_normal(rng: &mut fastrand::Rng) -> f64 {
    let u1 = 1.0 - rng.f64(); // (0, 1]: ln is finite
    let u2 = rng.f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A [`SimConfig`] refused by [`SimConfig::validate`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SimConfigError {
    /// A rate is not a probability.
    #[error("{name} must be between 0 and 1, got {value}")]
    RateOutOfRange {
        /// The field.
        name: &'static str,
        /// Its value.
        value: f64,
    },
    /// A reply cannot be both lost and late.
    #[error(
        "lost_reply_rate + timeout_rate must not exceed 1 (got {lost_reply_rate} + {timeout_rate})"
    )]
    ReplyFaultsOverOne {
        /// The lost-reply rate.
        lost_reply_rate: f64,
        /// The late-reply rate.
        timeout_rate: f64,
    },
    /// A delay is over [`MAX_SIMULATED_DELAY`].
    #[error("{name} must be at most {MAX_SIMULATED_DELAY:?}, got {value:?}")]
    DelayTooLong {
        /// The field.
        name: &'static str,
        /// Its value.
        value: Duration,
    },
    /// The latency's 99th percentile is below its mean.
    #[error("latency_p99 ({p99:?}) must be at least latency_mean ({mean:?})")]
    P99BelowMean {
        /// The mean.
        mean: Duration,
        /// The 99th percentile.
        p99: Duration,
    },
    /// No log-normal has so long a tail for its mean.
    #[error(
        "latency_p99 ({p99:?}) must be at most {MAX_LATENCY_TAIL_RATIO} times latency_mean ({mean:?})"
    )]
    TailTooLong {
        /// The mean.
        mean: Duration,
        /// The 99th percentile.
        p99: Duration,
    },
}

/// An operation of the provider's API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Authorize (hold) an amount.
    Authorize,
    /// Capture an authorized payment.
    Capture,
    /// Void an authorized payment.
    Void,
    /// Refund a captured payment.
    Refund,
    /// Find the payment an authorization key created.
    Lookup,
    /// Read a payment by id.
    Get,
}

impl Operation {
    /// Every operation.
    pub const ALL: [Operation; 6] = [
        Operation::Authorize,
        Operation::Capture,
        Operation::Void,
        Operation::Refund,
        Operation::Lookup,
        Operation::Get,
    ];

    /// The operation's name, `snake_case`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Operation::Authorize => "authorize",
            Operation::Capture => "capture",
            Operation::Void => "void",
            Operation::Refund => "refund",
            Operation::Lookup => "lookup",
            Operation::Get => "get",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One request to the simulator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimRequest {
    /// Authorize an amount.
    Authorize(AuthorizeRequest),
    /// Capture a payment.
    Capture {
        /// The request's idempotency key.
        idempotency_key: String,
        /// The payment.
        payment_id: String,
    },
    /// Void a payment.
    Void {
        /// The request's idempotency key.
        idempotency_key: String,
        /// The payment.
        payment_id: String,
    },
    /// Refund a payment.
    Refund {
        /// The request's idempotency key.
        idempotency_key: String,
        /// The payment.
        payment_id: String,
    },
    /// The payment an authorization key created.
    Lookup {
        /// The authorization's idempotency key.
        authorize_key: String,
    },
    /// A payment by id.
    Get {
        /// The payment.
        payment_id: String,
    },
}

impl SimRequest {
    /// The request's operation.
    pub fn operation(&self) -> Operation {
        match self {
            SimRequest::Authorize(_) => Operation::Authorize,
            SimRequest::Capture { .. } => Operation::Capture,
            SimRequest::Void { .. } => Operation::Void,
            SimRequest::Refund { .. } => Operation::Refund,
            SimRequest::Lookup { .. } => Operation::Lookup,
            SimRequest::Get { .. } => Operation::Get,
        }
    }
}

/// What a request acting on the ledger answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimReply {
    /// The payment: as stored for the key on a replay, as it is now
    /// otherwise. A declined authorization is a reply whose payment is
    /// [`PaymentState::Declined`].
    pub payment: Payment,
    /// True when an idempotency key's stored result was returned and
    /// nothing was done.
    pub replayed: bool,
}

/// What happens to a reply on its way back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// It arrives.
    OnTime,
    /// It never arrives (the request acted, or tried to).
    Lost,
    /// It arrives after this delay.
    Late(Duration),
}

/// The result of [`Simulator::execute`], before delivery.
#[derive(Debug)]
pub struct SimOutcome {
    /// The answer.
    pub result: Result<SimReply, PaymentError>,
    /// Its fate on the way back.
    pub delivery: Delivery,
}

/// Why a simulated request failed without an answer from the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SimFault {
    /// The provider is down ([`SimConfig::down`]).
    #[error("the simulated provider is down")]
    Down,
    /// An injected error ([`SimConfig::error_rate`]).
    #[error("simulated provider error")]
    InjectedError,
    /// The reply was lost after the request acted
    /// ([`SimConfig::lost_reply_rate`]).
    #[error("simulated lost reply")]
    ReplyLost,
}

/// Counters of a [`Simulator`], since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// Requests received, of every operation, faulted ones included.
    pub requests: u64,
    /// Requests per operation, in [`Operation::ALL`] order.
    pub by_operation: [u64; 6],
    /// Requests refused because the provider was down.
    pub rejected_down: u64,
    /// Requests refused by an injected error.
    pub injected_errors: u64,
    /// Replies lost after acting.
    pub lost_replies: u64,
    /// Replies held back.
    pub late_replies: u64,
    /// Authorizations declined (new ones, not replays).
    pub declines: u64,
    /// Requests answered from an idempotency key's stored result.
    pub replays: u64,
}

impl SimStats {
    /// Requests of `operation`.
    pub fn operation(&self, operation: Operation) -> u64 {
        self.by_operation[operation.index()]
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    by_operation: [AtomicU64; 6],
    rejected_down: AtomicU64,
    injected_errors: AtomicU64,
    lost_replies: AtomicU64,
    late_replies: AtomicU64,
    declines: AtomicU64,
    replays: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The ledger's running totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerSummary {
    /// Payments recorded (declined ones included).
    pub payments: u64,
    /// Payments authorized and not yet captured or voided.
    pub authorized: u64,
    /// Payments captured (and not refunded).
    pub captured: u64,
    /// Payments voided.
    pub voided: u64,
    /// Payments refunded.
    pub refunded: u64,
    /// Authorizations declined.
    pub declined: u64,
    /// Orders with at least one payment.
    pub orders: u64,
    /// Orders with more than one payment that was not declined: double
    /// charges. Zero when every client kept to one authorization key per
    /// order.
    pub double_charges: u64,
    /// The amount of every authorization that was not declined.
    pub authorized_cents: i64,
    /// The amount held now: payments in state `authorized`.
    pub held_cents: i64,
    /// The amount ever captured.
    pub captured_cents: i64,
    /// The amount ever refunded.
    pub refunded_cents: i64,
    /// Idempotency keys stored.
    pub idempotency_keys: u64,
}

impl LedgerSummary {
    /// What customers paid, net of refunds.
    pub fn net_charged_cents(&self) -> i64 {
        self.captured_cents - self.refunded_cents
    }
}

/// One payment of the ledger with the money it moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The payment as it is now.
    pub payment: Payment,
    /// Cents captured over its life (never more than its amount).
    pub captured_cents: i64,
    /// Cents refunded over its life (never more than captured).
    pub refunded_cents: i64,
}

/// What an idempotency key was first used for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Keyed {
    Authorize {
        order_id: OrderId,
        amount_cents: i64,
        currency: String,
    },
    Change {
        operation: Operation,
        payment_id: String,
    },
}

#[derive(Debug)]
struct StoredKey {
    request: Keyed,
    reply: Payment,
}

#[derive(Debug, Default)]
struct Ledger {
    entries: HashMap<String, LedgerEntry>,
    /// Payment ids in creation order, for listing.
    created: Vec<String>,
    /// Authorization key → payment id.
    by_authorize_key: HashMap<String, String>,
    keys: HashMap<String, StoredKey>,
    /// Payments per order that were not declined.
    live_per_order: HashMap<OrderId, u32>,
    summary: LedgerSummary,
}

impl Ledger {
    fn count(&mut self, state: PaymentState, delta: i64) {
        let s = &mut self.summary;
        let slot = match state {
            PaymentState::Authorized => &mut s.authorized,
            PaymentState::Captured => &mut s.captured,
            PaymentState::Voided => &mut s.voided,
            PaymentState::Refunded => &mut s.refunded,
            PaymentState::Declined => &mut s.declined,
        };
        *slot = slot.saturating_add_signed(delta);
    }

    fn record(&mut self, payment: Payment, key: &str, request: Keyed) {
        let id = payment.id.clone();
        self.summary.payments += 1;
        self.count(payment.state, 1);
        // Every order with a payment has an entry; only live ones count.
        let live = self.live_per_order.entry(payment.order_id).or_insert(0);
        if payment.state != PaymentState::Declined {
            *live += 1;
            if *live == 2 {
                self.summary.double_charges += 1;
            }
            self.summary.authorized_cents += payment.amount_cents;
            self.summary.held_cents += payment.amount_cents;
        }
        self.summary.orders = self.live_per_order.len() as u64;
        self.by_authorize_key.insert(key.to_owned(), id.clone());
        self.store_key(key, request, payment.clone());
        self.created.push(id.clone());
        self.entries.insert(
            id,
            LedgerEntry {
                payment,
                captured_cents: 0,
                refunded_cents: 0,
            },
        );
    }

    fn store_key(&mut self, key: &str, request: Keyed, reply: Payment) {
        self.keys
            .insert(key.to_owned(), StoredKey { request, reply });
        self.summary.idempotency_keys = self.keys.len() as u64;
    }

    /// The stored reply for `key`, or `KeyReused` when it was used for
    /// something else; `None` for a new key.
    fn replay(&self, key: &str, request: &Keyed) -> Option<Result<SimReply, PaymentError>> {
        let stored = self.keys.get(key)?;
        Some(if stored.request == *request {
            Ok(SimReply {
                payment: stored.reply.clone(),
                replayed: true,
            })
        } else {
            Err(PaymentError::KeyReused(key.to_owned()))
        })
    }

    /// Moves a payment for `operation`, or refuses: the state rules.
    fn change(&mut self, operation: Operation, payment_id: &str) -> Result<Payment, PaymentError> {
        let entry = self
            .entries
            .get_mut(payment_id)
            .ok_or_else(|| PaymentError::NotFound(payment_id.to_owned()))?;
        let from = entry.payment.state;
        let amount = entry.payment.amount_cents;
        let to = match (operation, from) {
            (Operation::Capture, PaymentState::Authorized | PaymentState::Captured) => {
                PaymentState::Captured
            }
            (
                Operation::Void,
                PaymentState::Authorized | PaymentState::Voided | PaymentState::Declined,
            ) => {
                if from == PaymentState::Authorized {
                    PaymentState::Voided
                } else {
                    from
                }
            }
            (Operation::Refund, PaymentState::Captured | PaymentState::Refunded) => {
                PaymentState::Refunded
            }
            _ => {
                return Err(PaymentError::InvalidState {
                    id: payment_id.to_owned(),
                    state: from,
                });
            }
        };
        if to == from {
            return Ok(entry.payment.clone());
        }
        entry.payment.state = to;
        match to {
            PaymentState::Captured => {
                entry.captured_cents += amount;
                self.summary.captured_cents += amount;
                self.summary.held_cents -= amount;
            }
            PaymentState::Voided => self.summary.held_cents -= amount,
            PaymentState::Refunded => {
                entry.refunded_cents += amount;
                self.summary.refunded_cents += amount;
            }
            PaymentState::Authorized | PaymentState::Declined => {}
        }
        let payment = entry.payment.clone();
        self.count(from, -1);
        self.count(to, 1);
        Ok(payment)
    }
}

/// The in-process card processor. Share it in an `Arc`: the HTTP service,
/// a [`Payments`] user and a test reading the ledger can hold it at once.
#[derive(Debug)]
pub struct Simulator {
    config: RwLock<SimConfig>,
    rng: Mutex<fastrand::Rng>,
    ledger: Mutex<Ledger>,
    counters: Counters,
    clock: SharedClock,
}

impl Simulator {
    /// A simulator with `config`, a random seed and the system clock.
    pub fn new(config: SimConfig) -> Result<Simulator, SimConfigError> {
        Simulator::build(config, fastrand::Rng::new())
    }

    /// A simulator whose random draws (latency, faults, declines, payment
    /// ids) follow `seed`: one task sending the same requests gets the same
    /// results.
    pub fn with_seed(config: SimConfig, seed: u64) -> Result<Simulator, SimConfigError> {
        Simulator::build(config, fastrand::Rng::with_seed(seed))
    }

    fn build(config: SimConfig, rng: fastrand::Rng) -> Result<Simulator, SimConfigError> {
        config.validate()?;
        Ok(Simulator {
            config: RwLock::new(config),
            rng: Mutex::new(rng),
            ledger: Mutex::new(Ledger::default()),
            counters: Counters::default(),
            clock: time_kit::system(),
        })
    }

    /// Stamps payments with `clock`'s time instead of the system's.
    pub fn with_clock(mut self, clock: SharedClock) -> Simulator {
        self.clock = clock;
        self
    }

    /// The fault settings now.
    pub fn config(&self) -> SimConfig {
        self.config.read().clone()
    }

    /// Replaces the fault settings; requests already past a draw keep it.
    pub fn set_config(&self, config: SimConfig) -> Result<(), SimConfigError> {
        config.validate()?;
        *self.config.write() = config;
        Ok(())
    }

    /// Changes the fault settings in place (`change` runs under the
    /// settings' lock, so concurrent updates do not lose each other's
    /// fields) and returns them; refused, and nothing changed, if the
    /// result does not validate.
    pub fn update_config(
        &self,
        change: impl FnOnce(&mut SimConfig),
    ) -> Result<SimConfig, SimConfigError> {
        let mut config = self.config.write();
        let mut next = config.clone();
        change(&mut next);
        next.validate()?;
        *config = next.clone();
        Ok(next)
    }

    /// Takes the provider down (`true`) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.config.write().down = down;
    }

    /// The counters.
    pub fn stats(&self) -> SimStats {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SimStats {
            requests: load(&c.requests),
            by_operation: std::array::from_fn(|i| load(&c.by_operation[i])),
            rejected_down: load(&c.rejected_down),
            injected_errors: load(&c.injected_errors),
            lost_replies: load(&c.lost_replies),
            late_replies: load(&c.late_replies),
            declines: load(&c.declines),
            replays: load(&c.replays),
        }
    }

    /// The ledger's totals (constant time).
    pub fn ledger(&self) -> LedgerSummary {
        self.ledger.lock().summary
    }

    /// Every payment with the money it moved, oldest first.
    pub fn entries(&self) -> Vec<LedgerEntry> {
        let ledger = self.ledger.lock();
        ledger
            .created
            .iter()
            .filter_map(|id| ledger.entries.get(id).cloned())
            .collect()
    }

    /// The payments of `order`, oldest first.
    pub fn payments_for_order(&self, order: OrderId) -> Vec<Payment> {
        let ledger = self.ledger.lock();
        ledger
            .created
            .iter()
            .filter_map(|id| ledger.entries.get(id))
            .filter(|e| e.payment.order_id == order)
            .map(|e| e.payment.clone())
            .collect()
    }

    /// Authorizations of `order` that were not declined: more than one is
    /// a double charge.
    pub fn authorizations_for_order(&self, order: OrderId) -> u32 {
        self.ledger
            .lock()
            .live_per_order
            .get(&order)
            .copied()
            .unwrap_or(0)
    }

    /// A payment by id, read past every fault (for tests and operators).
    pub fn payment(&self, payment_id: &str) -> Option<Payment> {
        self.ledger
            .lock()
            .entries
            .get(payment_id)
            .map(|e| e.payment.clone())
    }

    /// Runs one request through the faults and the ledger: waits the
    /// drawn latency, refuses it if the provider is down or an error is
    /// drawn (nothing changes), otherwise acts and draws the reply's
    /// [`Delivery`]. The caller delivers the reply (or not).
    pub async fn execute(&self, request: SimRequest) -> SimOutcome {
        let operation = request.operation();
        bump(&self.counters.requests);
        bump(&self.counters.by_operation[operation.index()]);
        let config = self.config();
        if config.down {
            return self.refuse(SimFault::Down);
        }
        let (latency, fail) = {
            let mut rng = self.rng.lock();
            let latency = config.sample_latency(&mut rng);
            (latency, rng.f64() < config.error_rate)
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        // The switch may have been thrown while the request was on its way.
        if self.config.read().down {
            return self.refuse(SimFault::Down);
        }
        if fail {
            return self.refuse(SimFault::InjectedError);
        }
        let result = self.apply(&request, config.decline_rate);
        let draw = self.rng.lock().f64();
        let delivery = if draw < config.lost_reply_rate {
            bump(&self.counters.lost_replies);
            Delivery::Lost
        } else if draw < config.lost_reply_rate + config.timeout_rate {
            bump(&self.counters.late_replies);
            Delivery::Late(config.late_reply_delay)
        } else {
            Delivery::OnTime
        };
        SimOutcome { result, delivery }
    }

    fn refuse(&self, fault: SimFault) -> SimOutcome {
        bump(match fault {
            SimFault::Down => &self.counters.rejected_down,
            _ => &self.counters.injected_errors,
        });
        SimOutcome {
            result: Err(PaymentError::Unavailable(Box::new(fault))),
            delivery: Delivery::OnTime,
        }
    }

    /// Acts on the ledger: the idempotency table and the state rules.
    fn apply(&self, request: &SimRequest, decline_rate: f64) -> Result<SimReply, PaymentError> {
        let result = match request {
            SimRequest::Authorize(request) => self.authorize_now(request, decline_rate),
            SimRequest::Capture {
                idempotency_key,
                payment_id,
            } => self.change_now(Operation::Capture, idempotency_key, payment_id),
            SimRequest::Void {
                idempotency_key,
                payment_id,
            } => self.change_now(Operation::Void, idempotency_key, payment_id),
            SimRequest::Refund {
                idempotency_key,
                payment_id,
            } => self.change_now(Operation::Refund, idempotency_key, payment_id),
            SimRequest::Lookup { authorize_key } => {
                let ledger = self.ledger.lock();
                ledger
                    .by_authorize_key
                    .get(authorize_key)
                    .and_then(|id| ledger.entries.get(id))
                    .map(|e| SimReply {
                        payment: e.payment.clone(),
                        replayed: false,
                    })
                    .ok_or_else(|| PaymentError::NotFound(authorize_key.clone()))
            }
            SimRequest::Get { payment_id } => self
                .payment(payment_id)
                .map(|payment| SimReply {
                    payment,
                    replayed: false,
                })
                .ok_or_else(|| PaymentError::NotFound(payment_id.clone())),
        };
        if let Ok(reply) = &result
            && reply.replayed
        {
            bump(&self.counters.replays);
        }
        result
    }

    fn authorize_now(
        &self,
        request: &AuthorizeRequest,
        decline_rate: f64,
    ) -> Result<SimReply, PaymentError> {
        validate_key(&request.idempotency_key)?;
        if !(1..=MAX_AMOUNT_CENTS).contains(&request.amount_cents) {
            return Err(PaymentError::Invalid(format!(
                "amount_cents must be 1 to {MAX_AMOUNT_CENTS}, got {}",
                request.amount_cents
            )));
        }
        if request.currency.len() != 3 || !request.currency.bytes().all(|b| b.is_ascii_uppercase())
        {
            return Err(PaymentError::Invalid(format!(
                "currency must be an ISO 4217 code of three upper-case letters, got {:?}",
                request.currency
            )));
        }
        let keyed = Keyed::Authorize {
            order_id: request.order_id,
            amount_cents: request.amount_cents,
            currency: request.currency.clone(),
        };
        let mut ledger = self.ledger.lock();
        if let Some(replay) = ledger.replay(&request.idempotency_key, &keyed) {
            return replay;
        }
        let (id, decline) = {
            let mut rng = self.rng.lock();
            let decline = (rng.f64() < decline_rate)
                .then(|| DECLINE_REASONS[rng.usize(..DECLINE_REASONS.len())]);
            let id = loop {
                let id = format!("pay_{:016x}{:08x}", rng.u64(..), rng.u32(..));
                if !ledger.entries.contains_key(&id) {
                    break id;
                }
            };
            (id, decline)
        };
        if decline.is_some() {
            bump(&self.counters.declines);
        }
        let payment = Payment {
            id,
            idempotency_key: request.idempotency_key.clone(),
            order_id: request.order_id,
            amount_cents: request.amount_cents,
            currency: request.currency.clone(),
            state: if decline.is_some() {
                PaymentState::Declined
            } else {
                PaymentState::Authorized
            },
            decline_reason: decline.map(str::to_owned),
            created_at: DateTime::<Utc>::from(self.now()),
        };
        ledger.record(payment.clone(), &request.idempotency_key, keyed);
        Ok(SimReply {
            payment,
            replayed: false,
        })
    }

    fn change_now(
        &self,
        operation: Operation,
        key: &str,
        payment_id: &str,
    ) -> Result<SimReply, PaymentError> {
        validate_key(key)?;
        let keyed = Keyed::Change {
            operation,
            payment_id: payment_id.to_owned(),
        };
        let mut ledger = self.ledger.lock();
        if let Some(replay) = ledger.replay(key, &keyed) {
            return replay;
        }
        let payment = ledger.change(operation, payment_id)?;
        ledger.store_key(key, keyed, payment.clone());
        Ok(SimReply {
            payment,
            replayed: false,
        })
    }

    fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// Runs `request` and delivers its reply as the in-process provider:
    /// a lost reply is [`PaymentError::OutcomeUnknown`], a late one arrives
    /// after its delay.
    async fn call(&self, request: SimRequest) -> Result<SimReply, PaymentError> {
        let outcome = self.execute(request).await;
        match outcome.delivery {
            Delivery::OnTime => {}
            Delivery::Lost => {
                return Err(PaymentError::OutcomeUnknown(Box::new(SimFault::ReplyLost)));
            }
            // Simulation: the reply really is this late; a client's
            // timeout drops this future long before.
            Delivery::Late(delay) => tokio::time::sleep(delay).await,
        }
        outcome.result
    }
}

/// An idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY_LEN`] bytes of visible
/// ASCII (it travels in an HTTP header).
pub fn validate_key(key: &str) -> Result<(), PaymentError> {
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY_LEN
        || !key.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(PaymentError::Invalid(format!(
            "an idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"
        )));
    }
    Ok(())
}

/// An authorization's reply as [`Payments::authorize`] answers it.
fn authorized(payment: Payment) -> Result<Payment, PaymentError> {
    if payment.state == PaymentState::Declined {
        Err(PaymentError::Declined {
            reason: payment
                .decline_reason
                .unwrap_or_else(|| "declined".to_owned()),
        })
    } else {
        Ok(payment)
    }
}

impl Payments for Simulator {
    fn authorize(&self, request: AuthorizeRequest) -> BoxFuture<'_, Result<Payment, PaymentError>> {
        Box::pin(async move {
            let reply = self.call(SimRequest::Authorize(request)).await?;
            authorized(reply.payment)
        })
    }

    fn capture<'a>(
        &'a self,
        idempotency_key: &'a str,
        payment_id: &'a str,
    ) -> BoxFuture<'a, Result<Payment, PaymentError>> {
        Box::pin(async move {
            let request = SimRequest::Capture {
                idempotency_key: idempotency_key.to_owned(),
                payment_id: payment_id.to_owned(),
            };
            Ok(self.call(request).await?.payment)
        })
    }

    fn void<'a>(
        &'a self,
        idempotency_key: &'a str,
        payment_id: &'a str,
    ) -> BoxFuture<'a, Result<Payment, PaymentError>> {
        Box::pin(async move {
            let request = SimRequest::Void {
                idempotency_key: idempotency_key.to_owned(),
                payment_id: payment_id.to_owned(),
            };
            Ok(self.call(request).await?.payment)
        })
    }

    fn refund<'a>(
        &'a self,
        idempotency_key: &'a str,
        payment_id: &'a str,
    ) -> BoxFuture<'a, Result<Payment, PaymentError>> {
        Box::pin(async move {
            let request = SimRequest::Refund {
                idempotency_key: idempotency_key.to_owned(),
                payment_id: payment_id.to_owned(),
            };
            Ok(self.call(request).await?.payment)
        })
    }

    fn lookup<'a>(
        &'a self,
        authorize_key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Payment>, PaymentError>> {
        Box::pin(async move {
            let request = SimRequest::Lookup {
                authorize_key: authorize_key.to_owned(),
            };
            match self.call(request).await {
                Ok(reply) => Ok(Some(reply.payment)),
                Err(PaymentError::NotFound(_)) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> OrderId {
        OrderId::new_at(1_800_000_000_000)
    }

    fn request(key: &str, order_id: OrderId, amount_cents: i64) -> AuthorizeRequest {
        AuthorizeRequest {
            idempotency_key: key.to_owned(),
            order_id,
            amount_cents,
            currency: "EUR".to_owned(),
        }
    }

    #[test]
    fn the_latency_has_the_configured_mean_and_p99() {
        let config =
            SimConfig::default().with_latency(Duration::from_millis(20), Duration::from_millis(60));
        let mut rng = fastrand::Rng::with_seed(7);
        let mut samples: Vec<f64> = (0..200_000)
            .map(|_| config.sample_latency(&mut rng).as_secs_f64() * 1000.0)
            .collect();
        samples.sort_by(f64::total_cmp);
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        let p99 = samples[samples.len() * 99 / 100];
        assert!((mean - 20.0).abs() < 0.5, "mean {mean}");
        assert!((p99 - 60.0).abs() < 2.0, "p99 {p99}");
    }

    #[test]
    fn a_latency_without_tail_is_constant_and_zero_means_none() {
        let mut rng = fastrand::Rng::with_seed(1);
        let flat =
            SimConfig::default().with_latency(Duration::from_millis(5), Duration::from_millis(5));
        assert_eq!(flat.sample_latency(&mut rng), Duration::from_millis(5));
        assert_eq!(
            SimConfig::default().sample_latency(&mut rng),
            Duration::ZERO
        );
    }

    #[test]
    fn bad_configs_are_refused_with_the_field() {
        let bad = SimConfig::default().with_error_rate(1.5);
        assert!(matches!(
            bad.validate(),
            Err(SimConfigError::RateOutOfRange {
                name: "error_rate",
                ..
            })
        ));
        assert!(
            SimConfig::default()
                .with_decline_rate(f64::NAN)
                .validate()
                .is_err()
        );
        assert!(matches!(
            SimConfig::default()
                .with_lost_reply_rate(0.6)
                .with_timeouts(0.6, Duration::from_secs(1))
                .validate(),
            Err(SimConfigError::ReplyFaultsOverOne { .. })
        ));
        assert!(matches!(
            SimConfig::default()
                .with_latency(Duration::from_millis(20), Duration::from_millis(10))
                .validate(),
            Err(SimConfigError::P99BelowMean { .. })
        ));
        assert!(matches!(
            SimConfig::default()
                .with_latency(Duration::from_millis(1), Duration::from_millis(20))
                .validate(),
            Err(SimConfigError::TailTooLong { .. })
        ));
        assert!(Simulator::new(bad).is_err());
    }

    #[test]
    fn the_tail_ratio_constant_matches_its_formula() {
        assert!((MAX_LATENCY_TAIL_RATIO - (Z99 * Z99 / 2.0).exp()).abs() < 0.01);
    }

    #[tokio::test]
    async fn state_rules_follow_the_table() {
        let sim = Simulator::with_seed(SimConfig::default(), 3).unwrap();
        let p = sim.authorize(request("a", order(), 500)).await.unwrap();
        // Refund before capture: refused, and nothing is stored for the key.
        let err = sim.refund("r1", &p.id).await.unwrap_err();
        assert!(matches!(
            err,
            PaymentError::InvalidState {
                state: PaymentState::Authorized,
                ..
            }
        ));
        assert_eq!(
            sim.capture("c1", &p.id).await.unwrap().state,
            PaymentState::Captured
        );
        // A second capture under another key returns the captured payment.
        assert_eq!(
            sim.capture("c2", &p.id).await.unwrap().state,
            PaymentState::Captured
        );
        assert!(matches!(
            sim.void("v1", &p.id).await,
            Err(PaymentError::InvalidState {
                state: PaymentState::Captured,
                ..
            })
        ));
        // The key that failed before may now be used, since nothing was stored.
        assert_eq!(
            sim.refund("r1", &p.id).await.unwrap().state,
            PaymentState::Refunded
        );
        assert_eq!(
            sim.refund("r2", &p.id).await.unwrap().state,
            PaymentState::Refunded
        );
        assert!(matches!(
            sim.capture("c3", &p.id).await,
            Err(PaymentError::InvalidState { .. })
        ));
        let entry = &sim.entries()[0];
        assert_eq!(entry.captured_cents, 500);
        assert_eq!(entry.refunded_cents, 500);
        let summary = sim.ledger();
        assert_eq!(summary.refunded, 1);
        assert_eq!(summary.captured, 0);
        assert_eq!(summary.held_cents, 0);
        assert_eq!(summary.net_charged_cents(), 0);
    }

    #[tokio::test]
    async fn void_releases_the_hold_and_a_declined_payment_voids_as_is() {
        let sim = Simulator::with_seed(SimConfig::default(), 4).unwrap();
        let p = sim.authorize(request("a", order(), 700)).await.unwrap();
        assert_eq!(sim.ledger().held_cents, 700);
        assert_eq!(
            sim.void("v", &p.id).await.unwrap().state,
            PaymentState::Voided
        );
        assert_eq!(sim.ledger().held_cents, 0);
        assert!(matches!(
            sim.capture("c", &p.id).await,
            Err(PaymentError::InvalidState {
                state: PaymentState::Voided,
                ..
            })
        ));

        sim.set_config(SimConfig::default().with_decline_rate(1.0))
            .unwrap();
        let declined = sim.authorize(request("b", order(), 700)).await;
        assert!(matches!(declined, Err(PaymentError::Declined { .. })));
        let payment = sim.lookup("b").await.unwrap().unwrap();
        assert_eq!(payment.state, PaymentState::Declined);
        assert_eq!(
            sim.void("v2", &payment.id).await.unwrap().state,
            PaymentState::Declined
        );
    }

    #[tokio::test]
    async fn unknown_payments_and_bad_requests_are_typed() {
        let sim = Simulator::with_seed(SimConfig::default(), 5).unwrap();
        assert!(matches!(
            sim.capture("k", "pay_nope").await,
            Err(PaymentError::NotFound(_))
        ));
        assert_eq!(sim.lookup("never").await.unwrap(), None);
        for bad in [
            request("a", order(), 0),
            request("a", order(), MAX_AMOUNT_CENTS + 1),
            request("", order(), 1),
            request("has space", order(), 1),
            AuthorizeRequest {
                currency: "eur".into(),
                ..request("a", order(), 1)
            },
        ] {
            assert!(matches!(
                sim.authorize(bad).await,
                Err(PaymentError::Invalid(_))
            ));
        }
        assert_eq!(sim.ledger(), LedgerSummary::default());
    }
}

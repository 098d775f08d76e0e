//! Payments: the client side of an unreliable external card processor.
//!
//! The saga authorizes an order's amount, captures it when the order
//! confirms, and voids (before capture) or refunds (after) when it rolls
//! back. Every call carries an idempotency key derived from the order and
//! the step (`{order_id}:authorize`, `{order_id}:capture`, …), so a retry,
//! or the same step run again after a crash, never charges twice: the
//! provider answers a repeated key with the first result.
//!
//! A reply can be lost after the provider acted (a timeout, a dropped
//! connection): the outcome is *unknown*. It is resolved by looking the
//! payment up by its authorization key ([`Payments::lookup`]), never by
//! charging again.
//!
//! Layers, from the wire up:
//! - a raw provider: the HTTP client of `payment_sim` or any provider with
//!   the same API (feature `http`), or the in-process [`sim`] (embedded
//!   default);
//! - the resilient wrapper: per-call timeout, retries with full-jitter
//!   backoff under the same key, unknown outcomes resolved by lookup, and a
//!   circuit breaker that fails fast while the provider is down.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::BoxFuture;
use crate::model::OrderId;

#[cfg(feature = "http")]
pub mod provider;
pub mod resilient;
pub mod sim;

#[cfg(feature = "http")]
pub use provider::HttpPaymentProvider;
pub use resilient::{
    BreakerConfig, BreakerState, ResilienceStats, ResilientConfig, ResilientPayments,
};
pub use sim::{SimConfig, Simulator};

/// What to authorize.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizeRequest {
    /// The idempotency key of the authorization; it also names the payment
    /// for [`Payments::lookup`].
    pub idempotency_key: String,
    /// The order paid for.
    pub order_id: OrderId,
    /// The amount, in cents (> 0).
    pub amount_cents: i64,
    /// ISO 4217 currency.
    pub currency: String,
}

/// A payment's state at the provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentState {
    /// Funds held, not yet taken.
    Authorized,
    /// Funds taken.
    Captured,
    /// The hold released before capture.
    Voided,
    /// Funds taken, then returned.
    Refunded,
    /// The authorization was declined; nothing is held.
    Declined,
}

/// A payment as the provider records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// The provider's id for the payment.
    pub id: String,
    /// The authorization's idempotency key.
    pub idempotency_key: String,
    /// The order paid for.
    pub order_id: OrderId,
    /// The authorized amount, in cents.
    pub amount_cents: i64,
    /// The currency.
    pub currency: String,
    /// Its state.
    pub state: PaymentState,
    /// Why it was declined, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decline_reason: Option<String>,
    /// When it was authorized.
    pub created_at: DateTime<Utc>,
}

/// What a payment call refuses or fails with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PaymentError {
    /// The provider declined the authorization (a final answer: the order
    /// cancels with `payment_declined`).
    #[error("payment declined: {reason}")]
    Declined {
        /// The provider's reason.
        reason: String,
    },
    /// The call may have taken effect, but its reply was lost (a timeout or
    /// a dropped connection). Resolve with [`Payments::lookup`].
    #[error("payment outcome unknown")]
    OutcomeUnknown(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The provider refused the call and did nothing (a 5xx, a refused
    /// connection); safe to retry under the same key.
    #[error("payment provider unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The circuit breaker is open: the provider has been failing and the
    /// call was not attempted.
    #[error("payment provider circuit open")]
    CircuitOpen,
    /// No payment with this id or key.
    #[error("no payment {0}")]
    NotFound(String),
    /// The payment is in a state that forbids the call (capturing a voided
    /// payment, voiding a captured one); `state` is its state now.
    #[error("payment {id} is {state:?}")]
    InvalidState {
        /// The payment.
        id: String,
        /// Its current state.
        state: PaymentState,
    },
    /// The same idempotency key was used with different parameters.
    #[error("idempotency key {0} reused with different parameters")]
    KeyReused(String),
    /// The request was malformed (a non-positive amount, a bad currency).
    #[error("invalid payment request: {0}")]
    Invalid(String),
}

impl PaymentError {
    /// The stable machine-readable code (the HTTP error code of the simulator).
    pub fn code(&self) -> &'static str {
        match self {
            PaymentError::Declined { .. } => "payment_declined",
            PaymentError::OutcomeUnknown(_) => "outcome_unknown",
            PaymentError::Unavailable(_) => "provider_unavailable",
            PaymentError::CircuitOpen => "circuit_open",
            PaymentError::NotFound(_) => "payment_not_found",
            PaymentError::InvalidState { .. } => "invalid_payment_state",
            PaymentError::KeyReused(_) => "idempotency_key_reused",
            PaymentError::Invalid(_) => "invalid_request",
        }
    }

    /// Whether retrying the same call under the same key may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            PaymentError::OutcomeUnknown(_) | PaymentError::Unavailable(_)
        )
    }
}

/// The payment provider, as the order saga sees it.
pub trait Payments: Send + Sync + 'static {
    /// Authorizes (holds) the amount. A declined authorization is
    /// [`PaymentError::Declined`]; the same key again returns the first
    /// outcome (a decline included).
    fn authorize(&self, request: AuthorizeRequest) -> BoxFuture<'_, Result<Payment, PaymentError>>;

    /// Captures an authorized payment in full. Idempotent by `idempotency_key`;
    /// capturing a captured payment returns it.
    fn capture<'a>(
        &'a self,
        idempotency_key: &'a str,
        payment_id: &'a str,
    ) -> BoxFuture<'a, Result<Payment, PaymentError>>;

    /// Voids an authorized payment. Idempotent; voiding a voided or
    /// declined payment returns it.
    fn void<'a>(
        &'a self,
        idempotency_key: &'a str,
        payment_id: &'a str,
    ) -> BoxFuture<'a, Result<Payment, PaymentError>>;

    /// Refunds a captured payment in full. Idempotent; refunding a refunded
    /// payment returns it.
    fn refund<'a>(
        &'a self,
        idempotency_key: &'a str,
        payment_id: &'a str,
    ) -> BoxFuture<'a, Result<Payment, PaymentError>>;

    /// The payment created by the authorization with this key, if the
    /// provider has one: how an unknown outcome is resolved.
    fn lookup<'a>(
        &'a self,
        authorize_key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Payment>, PaymentError>>;
}

/// A shared provider is a provider: the simulator can be used by the saga
/// and read by a test (or served over HTTP) at once.
impl<P: Payments + ?Sized> Payments for Arc<P> {
    fn authorize(&self, request: AuthorizeRequest) -> BoxFuture<'_, Result<Payment, PaymentError>> {
        (**self).authorize(request)
    }

    fn capture<'a>(
        &'a self,
        idempotency_key: &'a str,
        payment_id: &'a str,
    ) -> BoxFuture<'a, Result<Payment, PaymentError>> {
        (**self).capture(idempotency_key, payment_id)
    }

    fn void<'a>(
        &'a self,
        idempotency_key: &'a str,
        payment_id: &'a str,
    ) -> BoxFuture<'a, Result<Payment, PaymentError>> {
        (**self).void(idempotency_key, payment_id)
    }

    fn refund<'a>(
        &'a self,
        idempotency_key: &'a str,
        payment_id: &'a str,
    ) -> BoxFuture<'a, Result<Payment, PaymentError>> {
        (**self).refund(idempotency_key, payment_id)
    }

    fn lookup<'a>(
        &'a self,
        authorize_key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Payment>, PaymentError>> {
        (**self).lookup(authorize_key)
    }
}

//! The shipping service: schedule a shipment for an order, and cancel it.
//!
//! Both calls are idempotent, keyed by the order's id: scheduling twice
//! returns the same shipment, cancelling twice changes nothing, and
//! cancelling an unknown order records a tombstone so that a schedule
//! arriving late (a retry after a crash) cannot resurrect it.
//!
//! Implementations: in memory ([`MemoryShipping`], the embedded default),
//! on PostgreSQL (`postgres::PgShipping`, feature `postgres`, schema
//! `shipping`), and an HTTP client of `shipping_service`
//! (`http::shipping::HttpShipping`, feature `http`). All three follow the
//! same rules, checked by one conformance suite (`tests/shipping.rs`):
//!
//! - the order id is the idempotency key: once an order has a record (a
//!   shipment or a tombstone), every later `schedule` for it answers from
//!   that record, whatever its body: the same shipment, or
//!   [`ShippingError::Cancelled`];
//! - a new request is checked against the [`ShippingConfig`] (the cart's
//!   rules, the address, the deliverable countries) before anything is
//!   written; a refusal is [`ShippingError::Rejected`] and writes nothing;
//! - `cancel` always succeeds (but for [`ShippingError::Unavailable`]) and
//!   leaves the order's record cancelled.
//!
//! The service's HTTP API and schema: `docs/order-saga/shipping.md`.

mod config;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::BoxFuture;
use crate::model::{Address, LineItem, OrderId, UnknownName};

pub use config::ShippingConfig;
pub use memory::MemoryShipping;
#[cfg(feature = "postgres")]
pub use postgres::PgShipping;

/// What to ship.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleShipment {
    /// The order: the idempotency key.
    pub order_id: OrderId,
    /// Where to.
    pub ship_to: Address,
    /// What.
    pub items: Vec<LineItem>,
}

/// A shipment's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShipmentState {
    /// Booked with the carrier.
    Scheduled,
    /// Cancelled before dispatch (or never scheduled: a tombstone).
    Cancelled,
}

impl ShipmentState {
    /// The state's name as stored and sent (`snake_case`).
    pub const fn as_str(self) -> &'static str {
        match self {
            ShipmentState::Scheduled => "scheduled",
            ShipmentState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for ShipmentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ShipmentState {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<ShipmentState, UnknownName> {
        match s {
            "scheduled" => Ok(ShipmentState::Scheduled),
            "cancelled" => Ok(ShipmentState::Cancelled),
            _ => Err(UnknownName(s.to_owned())),
        }
    }
}

/// A shipment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipment {
    /// The shipment's id.
    pub id: String,
    /// The order it is for.
    pub order_id: OrderId,
    /// Its state.
    pub state: ShipmentState,
    /// When it was booked (for a tombstone: when the cancel arrived).
    pub created_at: DateTime<Utc>,
}

/// What [`Shipping::schedule_with_outcome`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleOutcome {
    /// The order's shipment.
    pub shipment: Shipment,
    /// True when this call booked it; false when it was already booked.
    pub created: bool,
}

/// What the shipping service refuses or fails with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShippingError {
    /// The carrier cannot deliver to this address (the order cancels with
    /// `shipping_rejected`).
    #[error("cannot ship: {0}")]
    Rejected(String),
    /// The order's shipment was cancelled; it cannot be scheduled again.
    #[error("the shipment of order {0} was cancelled")]
    Cancelled(OrderId),
    /// The backing store or the remote service failed; safe to retry.
    #[error("shipping unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ShippingError {
    /// The stable machine-readable code (the HTTP error code).
    pub fn code(&self) -> &'static str {
        match self {
            ShippingError::Rejected(_) => "shipping_rejected",
            ShippingError::Cancelled(_) => "shipment_cancelled",
            ShippingError::Unavailable(_) => "shipping_unavailable",
        }
    }
}

/// The shipping service, as the order saga sees it.
pub trait Shipping: Send + Sync + 'static {
    /// Books a shipment; idempotent by order id.
    fn schedule(&self, request: ScheduleShipment)
    -> BoxFuture<'_, Result<Shipment, ShippingError>>;

    /// Cancels the order's shipment; idempotent; leaves a tombstone when
    /// none was scheduled. Returns the shipment as it now is.
    fn cancel(&self, order_id: OrderId) -> BoxFuture<'_, Result<Shipment, ShippingError>>;

    /// The order's shipment, if any.
    fn shipment(&self, order_id: OrderId)
    -> BoxFuture<'_, Result<Option<Shipment>, ShippingError>>;

    /// Like [`Shipping::schedule`], also saying whether this call booked the
    /// shipment (the HTTP adapter answers 201 or 200 from it).
    ///
    /// The default asks [`Shipping::shipment`] first, so two first calls
    /// racing may both say `created`; the crate's implementations override
    /// it with an exact answer.
    fn schedule_with_outcome(
        &self,
        request: ScheduleShipment,
    ) -> BoxFuture<'_, Result<ScheduleOutcome, ShippingError>> {
        Box::pin(async move {
            let before = self.shipment(request.order_id).await?;
            let shipment = self.schedule(request).await?;
            Ok(ScheduleOutcome {
                created: before.is_none(),
                shipment,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_names() {
        for state in [ShipmentState::Scheduled, ShipmentState::Cancelled] {
            assert_eq!(state.as_str().parse::<ShipmentState>(), Ok(state));
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{state}\"")
            );
        }
        assert!("booked".parse::<ShipmentState>().is_err());
    }
}

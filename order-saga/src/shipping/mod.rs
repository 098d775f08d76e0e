//! The shipping service: schedule a shipment for an order, and cancel it.
//!
//! Both calls are idempotent, keyed by the order's id: scheduling twice
//! returns the same shipment, cancelling twice changes nothing, and
//! cancelling an unknown order records a tombstone so that a schedule
//! arriving late (a retry after a crash) cannot resurrect it.
//!
//! Implementations: in memory (the embedded default), on PostgreSQL
//! (feature `postgres`, schema `shipping`), and an HTTP client of
//! `shipping_service` (feature `http`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::BoxFuture;
use crate::model::{Address, LineItem, OrderId};

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

/// A shipment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipment {
    /// The shipment's id.
    pub id: String,
    /// The order it is for.
    pub order_id: OrderId,
    /// Its state.
    pub state: ShipmentState,
    /// When it was booked.
    pub created_at: DateTime<Utc>,
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
}

//! The events the order service publishes, one per state change, each
//! written to the outbox in the same transaction as the change.
//!
//! On the wire (a Redis Streams entry's `event` field, or the in-memory
//! bus) an event is the JSON of an [`EventEnvelope`]:
//!
//! ```json
//! {"id": "0190…", "schema_version": 1, "order_id": "0190…",
//!  "occurred_at": "2026-12-01T10:00:00Z", "type": "OrderCreated",
//!  "customer": "alice", "items": [{"sku": "SKU-1", "quantity": 2}]}
//! ```
//!
//! `schema_version` changes only on a breaking change to a payload;
//! consumers must ignore fields they do not know, and refuse (dead-letter)
//! a version they do not know.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::{CancelReason, CustomerId, LineItem, OrderId, OrderLine};

/// The schema version this crate writes.
pub const SCHEMA_VERSION: u16 = 1;

/// An event with its identity: `id` is unique (UUIDv7) and is what
/// consumers de-duplicate on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    /// Unique id, the consumers' idempotency key.
    pub id: Uuid,
    /// The payload's schema version ([`SCHEMA_VERSION`]).
    pub schema_version: u16,
    /// The order it is about (the stream's ordering key).
    pub order_id: OrderId,
    /// When the state changed.
    pub occurred_at: DateTime<Utc>,
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
}

impl EventEnvelope {
    /// A new envelope with a fresh id.
    pub fn new(order_id: OrderId, occurred_at: DateTime<Utc>, event: Event) -> EventEnvelope {
        let millis = u64::try_from(occurred_at.timestamp_millis()).unwrap_or(0);
        let ts = uuid::Timestamp::from_unix(
            uuid::NoContext,
            millis / 1000,
            ((millis % 1000) * 1_000_000) as u32,
        );
        EventEnvelope {
            id: Uuid::new_v7(ts),
            schema_version: SCHEMA_VERSION,
            order_id,
            occurred_at,
            event,
        }
    }
}

/// What happened to an order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
#[non_exhaustive]
pub enum Event {
    /// The order was written (state `pending`).
    OrderCreated {
        /// Who placed it.
        customer: CustomerId,
        /// The cart.
        items: Vec<LineItem>,
    },
    /// Its stock is reserved until `expires_at`.
    StockReserved {
        /// Priced lines.
        lines: Vec<OrderLine>,
        /// The order's total, in cents.
        total_cents: i64,
        /// When the reservation lapses if the order does not complete.
        expires_at: DateTime<Utc>,
    },
    /// The payment is authorized.
    PaymentAuthorized {
        /// The provider's payment id.
        payment_id: String,
        /// The amount held, in cents.
        amount_cents: i64,
    },
    /// A shipment is booked.
    ShipmentScheduled {
        /// The shipment's id.
        shipment_id: String,
    },
    /// Stock committed, payment captured.
    OrderConfirmed {
        /// The amount captured, in cents.
        total_cents: i64,
    },
    /// A step failed or the customer cancelled: compensation begins.
    CompensationStarted {
        /// Why.
        reason: CancelReason,
    },
    /// Every step that ran is undone.
    OrderCancelled {
        /// Why.
        reason: CancelReason,
    },
    /// A compensation kept failing; an operator must look.
    OrderNeedsAttention {
        /// The compensation that failed.
        step: String,
        /// Its last error.
        error: String,
    },
}

impl Event {
    /// The event's type name, as in its JSON `type` field.
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::OrderCreated { .. } => "OrderCreated",
            Event::StockReserved { .. } => "StockReserved",
            Event::PaymentAuthorized { .. } => "PaymentAuthorized",
            Event::ShipmentScheduled { .. } => "ShipmentScheduled",
            Event::OrderConfirmed { .. } => "OrderConfirmed",
            Event::CompensationStarted { .. } => "CompensationStarted",
            Event::OrderCancelled { .. } => "OrderCancelled",
            Event::OrderNeedsAttention { .. } => "OrderNeedsAttention",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_are_flat_json_with_a_type_and_a_version() {
        let order_id = OrderId::new_at(1_700_000_000_000);
        let envelope = EventEnvelope::new(
            order_id,
            DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            Event::OrderCancelled {
                reason: CancelReason::PaymentDeclined,
            },
        );
        let json = serde_json::to_value(&envelope).unwrap();
        assert_eq!(json["type"], "OrderCancelled");
        assert_eq!(json["reason"], "payment_declined");
        assert_eq!(json["schema_version"], 1);
        assert_eq!(json["order_id"], order_id.to_string());
        let back: EventEnvelope = serde_json::from_value(json).unwrap();
        assert_eq!(back, envelope);
        assert_eq!(back.event.type_name(), "OrderCancelled");
    }
}

//! The domain: identifiers, the cart a customer submits, the order it
//! becomes and the order's states. Everything here is plain data, validated
//! at construction, and knows nothing about storage or transport.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An order's id: a UUIDv7, so ids sort by creation time (keyset pages and
/// B-tree inserts stay ordered). The saga, the stock reservation and the
/// shipment of an order are all keyed by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderId(Uuid);

impl OrderId {
    /// A new id for an order created at `time`: its UUIDv7 carries the
    /// time to the sub-millisecond (the 12 bits after the milliseconds), and
    /// ids made in this process never go backwards, so orders list in the
    /// order of their `created_at` even when several fall in one
    /// millisecond.
    pub fn new_at_time(time: DateTime<Utc>) -> OrderId {
        static CONTEXT: std::sync::Mutex<Option<uuid::ContextV7>> = std::sync::Mutex::new(None);
        let seconds = u64::try_from(time.timestamp()).unwrap_or(0);
        let nanos = time.timestamp_subsec_nanos();
        // A poisoned lock only means another thread panicked mid-id; the
        // context is still a valid counter.
        let mut context = CONTEXT.lock().unwrap_or_else(|p| p.into_inner());
        let context =
            context.get_or_insert_with(|| uuid::ContextV7::new().with_additional_precision());
        OrderId(Uuid::new_v7(uuid::Timestamp::from_unix(
            &*context, seconds, nanos,
        )))
    }

    /// A new id for an order created at `unix_millis` (UUIDv7 time prefix;
    /// ids made in the same millisecond sort at random among themselves;
    /// [`OrderId::new_at_time`] keeps them in order).
    pub fn new_at(unix_millis: i64) -> OrderId {
        let millis = u64::try_from(unix_millis).unwrap_or(0);
        let ts = uuid::Timestamp::from_unix(
            uuid::NoContext,
            millis / 1000,
            ((millis % 1000) * 1_000_000) as u32,
        );
        OrderId(Uuid::new_v7(ts))
    }

    /// Wraps an existing UUID.
    pub const fn from_uuid(id: Uuid) -> OrderId {
        OrderId(id)
    }

    /// The UUID.
    pub const fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for OrderId {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<OrderId, ValidationError> {
        Uuid::parse_str(s)
            .map(OrderId)
            .map_err(|_| ValidationError::InvalidOrderId)
    }
}

/// A stock-keeping unit: 1 to [`Sku::MAX_LEN`] ASCII letters, digits, `-`,
/// `_` or `.`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Sku(String);

impl Sku {
    /// The longest SKU accepted.
    pub const MAX_LEN: usize = 64;

    /// Validates `s` as a SKU.
    pub fn parse(s: impl Into<String>) -> Result<Sku, ValidationError> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= Sku::MAX_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok {
            Ok(Sku(s))
        } else {
            Err(ValidationError::InvalidSku)
        }
    }

    /// The SKU as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Sku {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Sku, D::Error> {
        let s = String::deserialize(d)?;
        Sku::parse(s).map_err(serde::de::Error::custom)
    }
}

/// Who placed an order: the `sub` of the caller's verified token, never a
/// field of the request body. 1 to [`CustomerId::MAX_LEN`] bytes, no
/// control characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct CustomerId(String);

impl CustomerId {
    /// The longest customer id accepted, in bytes.
    pub const MAX_LEN: usize = 128;

    /// Validates `s` as a customer id.
    pub fn parse(s: impl Into<String>) -> Result<CustomerId, ValidationError> {
        let s = s.into();
        if s.is_empty() || s.len() > CustomerId::MAX_LEN || s.chars().any(char::is_control) {
            return Err(ValidationError::InvalidCustomer);
        }
        Ok(CustomerId(s))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CustomerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for CustomerId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<CustomerId, D::Error> {
        let s = String::deserialize(d)?;
        CustomerId::parse(s).map_err(serde::de::Error::custom)
    }
}

/// One line of a cart: a SKU and how many.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineItem {
    /// What.
    pub sku: Sku,
    /// How many: 1 to [`CartLimits::max_quantity`].
    pub quantity: u32,
}

/// Where a shipment goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Address {
    /// Recipient, 1–200 bytes.
    pub name: String,
    /// Street line, 1–200 bytes.
    pub line1: String,
    /// Optional second line, at most 200 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line2: Option<String>,
    /// City, 1–100 bytes.
    pub city: String,
    /// Postal code, 1–20 bytes.
    pub postal_code: String,
    /// ISO 3166-1 alpha-2 country code, two upper-case letters.
    pub country: String,
}

impl Address {
    fn validate(&self) -> Result<(), ValidationError> {
        fn field(value: &str, max: usize, name: &'static str) -> Result<(), ValidationError> {
            if value.trim().is_empty() || value.len() > max || value.chars().any(char::is_control) {
                return Err(ValidationError::InvalidAddress { field: name });
            }
            Ok(())
        }
        field(&self.name, 200, "name")?;
        field(&self.line1, 200, "line1")?;
        if let Some(line2) = &self.line2
            && (line2.len() > 200 || line2.chars().any(char::is_control))
        {
            return Err(ValidationError::InvalidAddress { field: "line2" });
        }
        field(&self.city, 100, "city")?;
        field(&self.postal_code, 20, "postal_code")?;
        if self.country.len() != 2 || !self.country.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ValidationError::InvalidAddress { field: "country" });
        }
        Ok(())
    }
}

/// The body of a create-order request, as the client sends it. The customer
/// comes from the caller's token, prices from the inventory.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOrder {
    /// The cart: 1 to [`CartLimits::max_lines`] lines, each SKU once.
    pub items: Vec<LineItem>,
    /// The shipping address.
    pub ship_to: Address,
}

/// Limits on a cart, checked before anything is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CartLimits {
    /// Most lines in one order. Default 50.
    pub max_lines: usize,
    /// Most units of one SKU in one order. Default 100.
    pub max_quantity: u32,
}

impl Default for CartLimits {
    fn default() -> CartLimits {
        CartLimits {
            max_lines: 50,
            max_quantity: 100,
        }
    }
}

impl CreateOrder {
    /// Checks the cart and address against `limits`.
    pub fn validate(&self, limits: &CartLimits) -> Result<(), ValidationError> {
        if self.items.is_empty() {
            return Err(ValidationError::EmptyCart);
        }
        if self.items.len() > limits.max_lines {
            return Err(ValidationError::TooManyLines {
                lines: self.items.len(),
                max: limits.max_lines,
            });
        }
        let mut seen = std::collections::HashSet::with_capacity(self.items.len());
        for item in &self.items {
            if item.quantity == 0 || item.quantity > limits.max_quantity {
                return Err(ValidationError::InvalidQuantity {
                    sku: item.sku.clone(),
                    quantity: item.quantity,
                    max: limits.max_quantity,
                });
            }
            if !seen.insert(&item.sku) {
                return Err(ValidationError::DuplicateSku {
                    sku: item.sku.clone(),
                });
            }
        }
        self.ship_to.validate()
    }
}

/// Input refused before anything is written. Each variant has a stable
/// [`code`](ValidationError::code) that the HTTP adapters return.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// The cart has no lines.
    #[error("the cart is empty")]
    EmptyCart,
    /// The cart has more lines than allowed.
    #[error("the cart has {lines} lines; at most {max} are allowed")]
    TooManyLines {
        /// Lines sent.
        lines: usize,
        /// The limit.
        max: usize,
    },
    /// A quantity is 0 or over the cap.
    #[error("quantity {quantity} of {sku} is out of range 1..={max}")]
    InvalidQuantity {
        /// The line's SKU.
        sku: Sku,
        /// The quantity sent.
        quantity: u32,
        /// The cap.
        max: u32,
    },
    /// The same SKU appears on two lines.
    #[error("{sku} appears on more than one line")]
    DuplicateSku {
        /// The repeated SKU.
        sku: Sku,
    },
    /// A SKU is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error("a SKU must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-'")]
    InvalidSku,
    /// A customer id is empty, too long or has control characters.
    #[error("invalid customer id")]
    InvalidCustomer,
    /// An order id is not a UUID.
    #[error("invalid order id")]
    InvalidOrderId,
    /// An address field is empty, too long or malformed.
    #[error("invalid shipping address field {field}")]
    InvalidAddress {
        /// The field's name.
        field: &'static str,
    },
}

impl ValidationError {
    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ValidationError::EmptyCart => "empty_cart",
            ValidationError::TooManyLines { .. } => "too_many_lines",
            ValidationError::InvalidQuantity { .. } => "invalid_quantity",
            ValidationError::DuplicateSku { .. } => "duplicate_sku",
            ValidationError::InvalidSku => "invalid_sku",
            ValidationError::InvalidCustomer => "invalid_customer",
            ValidationError::InvalidOrderId => "invalid_order_id",
            ValidationError::InvalidAddress { .. } => "invalid_address",
        }
    }
}

/// Where an order is in its saga.
///
/// `Pending → StockReserved → PaymentAuthorized → ShipmentScheduled →
/// Confirmed` on success; from any non-terminal state a failure or a
/// cancellation leads through `Compensating` to `Cancelled`, or to
/// `NeedsAttention` when a compensation keeps failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderState {
    /// Written; stock not yet reserved.
    Pending,
    /// Stock reserved (until the reservation's expiry).
    StockReserved,
    /// The payment is authorized (not yet captured).
    PaymentAuthorized,
    /// A shipment is scheduled.
    ShipmentScheduled,
    /// Stock committed, payment captured: done.
    Confirmed,
    /// Undoing the steps that ran, newest first.
    Compensating,
    /// Every step that ran is undone; `cancel_reason` says why.
    Cancelled,
    /// A compensation kept failing; an operator must look. Nothing is dropped:
    /// the order keeps what is still to undo.
    NeedsAttention,
}

impl OrderState {
    /// Every state, in lifecycle order.
    pub const ALL: [OrderState; 8] = [
        OrderState::Pending,
        OrderState::StockReserved,
        OrderState::PaymentAuthorized,
        OrderState::ShipmentScheduled,
        OrderState::Confirmed,
        OrderState::Compensating,
        OrderState::Cancelled,
        OrderState::NeedsAttention,
    ];

    /// The state's name as stored and sent (`snake_case`).
    pub const fn as_str(self) -> &'static str {
        match self {
            OrderState::Pending => "pending",
            OrderState::StockReserved => "stock_reserved",
            OrderState::PaymentAuthorized => "payment_authorized",
            OrderState::ShipmentScheduled => "shipment_scheduled",
            OrderState::Confirmed => "confirmed",
            OrderState::Compensating => "compensating",
            OrderState::Cancelled => "cancelled",
            OrderState::NeedsAttention => "needs_attention",
        }
    }

    /// `Confirmed`, `Cancelled` and `NeedsAttention`: the saga does no more
    /// work on its own.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            OrderState::Confirmed | OrderState::Cancelled | OrderState::NeedsAttention
        )
    }
}

impl fmt::Display for OrderState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OrderState {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<OrderState, UnknownName> {
        OrderState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownName(s.to_owned()))
    }
}

/// A stored name (state, reason) that this version does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown name {0:?}")]
pub struct UnknownName(pub String);

/// Why an order was cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    /// A line could not be reserved: not enough stock.
    OutOfStock,
    /// The provider declined the payment.
    PaymentDeclined,
    /// The provider could not be reached (timeouts, errors, circuit open).
    PaymentUnavailable,
    /// The stock reservation expired before the order completed.
    ReservationExpired,
    /// The shipping service refused the shipment (e.g. an undeliverable address).
    ShippingRejected,
    /// The shipping service could not be reached.
    ShippingUnavailable,
    /// The customer cancelled.
    CustomerRequested,
}

impl CancelReason {
    /// Every reason.
    pub const ALL: [CancelReason; 7] = [
        CancelReason::OutOfStock,
        CancelReason::PaymentDeclined,
        CancelReason::PaymentUnavailable,
        CancelReason::ReservationExpired,
        CancelReason::ShippingRejected,
        CancelReason::ShippingUnavailable,
        CancelReason::CustomerRequested,
    ];

    /// The reason's name as stored and sent (`snake_case`).
    pub const fn as_str(self) -> &'static str {
        match self {
            CancelReason::OutOfStock => "out_of_stock",
            CancelReason::PaymentDeclined => "payment_declined",
            CancelReason::PaymentUnavailable => "payment_unavailable",
            CancelReason::ReservationExpired => "reservation_expired",
            CancelReason::ShippingRejected => "shipping_rejected",
            CancelReason::ShippingUnavailable => "shipping_unavailable",
            CancelReason::CustomerRequested => "customer_requested",
        }
    }
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CancelReason {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<CancelReason, UnknownName> {
        CancelReason::ALL
            .into_iter()
            .find(|reason| reason.as_str() == s)
            .ok_or_else(|| UnknownName(s.to_owned()))
    }
}

/// A priced order line: the quantity and the unit price the inventory
/// reserved it at.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OrderLine {
    /// What.
    pub sku: Sku,
    /// How many.
    pub quantity: u32,
    /// Price of one unit, in the smallest currency unit (cents).
    pub unit_price_cents: i64,
}

/// An order as stored and returned by `get_order`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// The id.
    pub id: OrderId,
    /// Who placed it.
    pub customer: CustomerId,
    /// Where it is in the saga.
    pub state: OrderState,
    /// The cart as sent.
    pub items: Vec<LineItem>,
    /// Priced lines, once stock is reserved.
    pub lines: Vec<OrderLine>,
    /// The total, in cents, once stock is reserved.
    pub total_cents: i64,
    /// ISO 4217 currency of the amounts.
    pub currency: String,
    /// The shipping address.
    pub ship_to: Address,
    /// Why it was cancelled (set once compensation starts).
    pub cancel_reason: Option<CancelReason>,
    /// The provider's authorization id, once authorized.
    pub payment_id: Option<String>,
    /// The shipment's id, once scheduled.
    pub shipment_id: Option<String>,
    /// When a compensation keeps failing: which one and the last error.
    pub attention: Option<String>,
    /// When the order was written.
    pub created_at: DateTime<Utc>,
    /// When its state last changed.
    pub updated_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address() -> Address {
        Address {
            name: "Ada".into(),
            line1: "1 Loop Road".into(),
            line2: None,
            city: "London".into(),
            postal_code: "N1".into(),
            country: "GB".into(),
        }
    }

    fn cart(items: &[(&str, u32)]) -> CreateOrder {
        CreateOrder {
            items: items
                .iter()
                .map(|(sku, quantity)| LineItem {
                    sku: Sku::parse(*sku).unwrap(),
                    quantity: *quantity,
                })
                .collect(),
            ship_to: address(),
        }
    }

    #[test]
    fn carts_are_checked_before_anything_is_written() {
        let limits = CartLimits::default();
        assert_eq!(cart(&[("a", 1)]).validate(&limits), Ok(()));
        assert_eq!(cart(&[]).validate(&limits), Err(ValidationError::EmptyCart));
        assert_eq!(
            cart(&[("a", 0)]).validate(&limits).unwrap_err().code(),
            "invalid_quantity"
        );
        assert_eq!(
            cart(&[("a", 101)]).validate(&limits).unwrap_err().code(),
            "invalid_quantity"
        );
        assert_eq!(
            cart(&[("a", 1), ("a", 2)])
                .validate(&limits)
                .unwrap_err()
                .code(),
            "duplicate_sku"
        );
        let many: Vec<(String, u32)> = (0..51).map(|i| (format!("s{i}"), 1)).collect();
        let many: Vec<(&str, u32)> = many.iter().map(|(s, q)| (s.as_str(), *q)).collect();
        assert_eq!(
            cart(&many).validate(&limits).unwrap_err().code(),
            "too_many_lines"
        );
        let mut bad = cart(&[("a", 1)]);
        bad.ship_to.country = "gb".into();
        assert_eq!(
            bad.validate(&limits),
            Err(ValidationError::InvalidAddress { field: "country" })
        );
    }

    #[test]
    fn skus_and_customers_are_validated_when_parsed() {
        assert!(Sku::parse("SKU-1.a_b").is_ok());
        assert!(Sku::parse("").is_err());
        assert!(Sku::parse("a b").is_err());
        assert!(Sku::parse("x".repeat(65)).is_err());
        assert!(serde_json::from_str::<Sku>("\"bad sku\"").is_err());
        assert!(CustomerId::parse("alice").is_ok());
        assert!(CustomerId::parse("").is_err());
        assert!(CustomerId::parse("a\nb").is_err());
    }

    #[test]
    fn names_round_trip() {
        for state in OrderState::ALL {
            assert_eq!(state.as_str().parse::<OrderState>(), Ok(state));
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{}\"", state.as_str())
            );
        }
        for reason in CancelReason::ALL {
            assert_eq!(reason.as_str().parse::<CancelReason>(), Ok(reason));
        }
        assert!("nope".parse::<OrderState>().is_err());
    }

    #[test]
    fn order_ids_sort_by_creation_time() {
        let a = OrderId::new_at(1_700_000_000_000);
        let b = OrderId::new_at(1_700_000_000_001);
        assert!(a < b);
        assert_eq!(a.to_string().parse::<OrderId>(), Ok(a));
    }

    /// Within one millisecond, ids follow their times (the flaky case of
    /// `lists_are_keyset_pages_newest_first`: two orders 0.9 ms apart in
    /// the same millisecond listed out of `created_at` order), and ids
    /// made for one instant still never go backwards.
    #[test]
    fn order_ids_within_a_millisecond_follow_their_times() {
        let base = DateTime::<Utc>::from_timestamp(1_800_000_000, 78_000_000).unwrap();
        let times: Vec<DateTime<Utc>> = [102_555, 986_583, 400_000, 10_000, 999_000]
            .iter()
            .map(|ns| base + chrono::Duration::nanoseconds(*ns))
            .collect();
        let mut by_time = times.clone();
        by_time.sort();
        // Made in time order (as sequential requests are), they sort so.
        let ids: Vec<OrderId> = by_time.iter().map(|t| OrderId::new_at_time(*t)).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        // One instant, many ids: strictly increasing.
        let same: Vec<OrderId> = (0..1_000).map(|_| OrderId::new_at_time(base)).collect();
        assert!(same.windows(2).all(|w| w[0] < w[1]));
    }
}

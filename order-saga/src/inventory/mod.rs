//! The inventory service: stock per SKU, reserved with a time-to-live,
//! then committed or released.
//!
//! Stock is never negative, under any interleaving: for every SKU,
//! `available + reserved + committed` equals what was ever restocked, and a
//! reservation takes stock only if all of its lines fit (all or nothing).
//!
//! Every call is idempotent, keyed by the [`ReservationId`] (an order's id):
//! reserving an id that already exists returns the existing reservation,
//! committing a committed one or releasing a released one changes nothing.
//! That is what lets the saga run a step twice after a crash.
//!
//! Implementations: [`MemoryInventory`] (the embedded default),
//! [`PgInventory`] (feature `postgres`, schema
//! `inventory`), and an HTTP client of `inventory_service`
//! (`order_saga::http::inventory::HttpInventory`, feature `http`). Every one
//! checks input against the same [`InventoryLimits`], orders a
//! reservation's lines by SKU, decides which error a failed reservation
//! gets the same way (the first line, in SKU order, that is unknown or
//! short), and reads time from an injected [`time_kit::Clock`]. A
//! [`Sweeper`] gives back expired reservations in the background.
//!
//! The HTTP API and the PostgreSQL schema: `docs/order-saga/inventory.md`.

pub mod limits;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod sweeper;

pub use limits::{InventoryLimits, MAX_UNIT_PRICE_CENTS};
pub use memory::MemoryInventory;
#[cfg(feature = "postgres")]
pub use postgres::PgInventory;
pub use sweeper::{Sweeper, SweeperConfig, SweeperStats};

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::BoxFuture;
use crate::model::{LineItem, Sku};

/// Identifies a reservation; the saga uses the order's id.
pub type ReservationId = Uuid;

/// What to reserve.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveRequest {
    /// The reservation's id (the order's id): the idempotency key.
    pub reservation_id: ReservationId,
    /// The lines, each SKU once.
    pub items: Vec<LineItem>,
    /// How long the stock is held before the sweeper releases it.
    #[serde(with = "duration_ms")]
    pub ttl: Duration,
}

/// A reservation's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationState {
    /// Holding stock until `expires_at`.
    Reserved,
    /// The stock is sold.
    Committed,
    /// Given back: released by the saga's compensation.
    Released,
    /// Given back by the sweeper after `expires_at`.
    Expired,
}

impl ReservationState {
    /// The state's name as stored and sent (`snake_case`).
    pub const fn as_str(self) -> &'static str {
        match self {
            ReservationState::Reserved => "reserved",
            ReservationState::Committed => "committed",
            ReservationState::Released => "released",
            ReservationState::Expired => "expired",
        }
    }
}

/// One reserved line, priced at the SKU's price when it was reserved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservedLine {
    /// What.
    pub sku: Sku,
    /// How many.
    pub quantity: u32,
    /// Unit price in cents at reservation time.
    pub unit_price_cents: i64,
}

/// A reservation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// Its id.
    pub id: ReservationId,
    /// Its state.
    pub state: ReservationState,
    /// The lines, priced.
    pub lines: Vec<ReservedLine>,
    /// When the sweeper gives the stock back if not committed.
    pub expires_at: DateTime<Utc>,
}

impl Reservation {
    /// The sum of quantity × unit price over the lines.
    pub fn total_cents(&self) -> i64 {
        self.lines
            .iter()
            .map(|line| i64::from(line.quantity).saturating_mul(line.unit_price_cents))
            .fold(0i64, i64::saturating_add)
    }
}

/// One SKU's stock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLevel {
    /// The SKU.
    pub sku: Sku,
    /// Units free to reserve.
    pub available: i64,
    /// Units held by open reservations.
    pub reserved: i64,
    /// Units sold.
    pub committed: i64,
    /// Current unit price in cents.
    pub unit_price_cents: i64,
}

/// Adds stock to a SKU, creating it when it is new.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restock {
    /// The SKU.
    pub sku: Sku,
    /// Units to add (0 only changes the price).
    pub quantity: u32,
    /// The new unit price in cents; required when the SKU is new.
    #[serde(default)]
    pub unit_price_cents: Option<i64>,
}

/// What the inventory refuses or fails with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InventoryError {
    /// A line asks for more than is available; nothing was reserved.
    #[error("not enough stock of {sku}: {requested} requested, {available} available")]
    OutOfStock {
        /// The first SKU short.
        sku: Sku,
        /// Units asked for.
        requested: u32,
        /// Units available.
        available: i64,
    },
    /// A SKU the inventory does not carry; nothing was reserved.
    #[error("unknown SKU {0}")]
    UnknownSku(Sku),
    /// No reservation has this id.
    #[error("no reservation {0}")]
    ReservationNotFound(ReservationId),
    /// The reservation expired (its stock went back) before it was committed.
    #[error("reservation {0} expired before it was committed")]
    ReservationExpired(ReservationId),
    /// A reservation id was reused with different lines.
    #[error("reservation {0} exists with different lines")]
    ReservationMismatch(ReservationId),
    /// Input refused: a quantity of 0 or over the cap, an empty request, a
    /// restock of a new SKU without a price, a negative price.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The backing store or the remote service failed; the call may or may
    /// not have taken effect, and is safe to retry (idempotent).
    #[error("inventory unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl InventoryError {
    /// The stable machine-readable code (the HTTP error code).
    pub fn code(&self) -> &'static str {
        match self {
            InventoryError::OutOfStock { .. } => "out_of_stock",
            InventoryError::UnknownSku(_) => "unknown_sku",
            InventoryError::ReservationNotFound(_) => "reservation_not_found",
            InventoryError::ReservationExpired(_) => "reservation_expired",
            InventoryError::ReservationMismatch(_) => "reservation_mismatch",
            InventoryError::Invalid(_) => "invalid_request",
            InventoryError::Unavailable(_) => "inventory_unavailable",
        }
    }
}

/// The inventory service, as the order saga sees it.
pub trait Inventory: Send + Sync + 'static {
    /// Reserves every line or none, for `ttl`. Idempotent by
    /// `reservation_id`: an existing reservation with the same lines is
    /// returned as it is (whatever its state); different lines give
    /// [`InventoryError::ReservationMismatch`].
    fn reserve(
        &self,
        request: ReserveRequest,
    ) -> BoxFuture<'_, Result<Reservation, InventoryError>>;

    /// Sells the reserved stock. Idempotent. A reservation already given
    /// back gives [`InventoryError::ReservationExpired`] (expired) or
    /// [`InventoryError::ReservationNotFound`] (unknown); committing a
    /// released one is refused with `ReservationExpired` too, since its stock
    /// is gone.
    fn commit(&self, id: ReservationId) -> BoxFuture<'_, Result<Reservation, InventoryError>>;

    /// Gives the stock back: a reserved reservation becomes `Released`, a
    /// committed one too (its units return to `available`: the order was
    /// rolled back after the sale). Idempotent; releasing an expired or
    /// released one changes nothing, and an unknown id is not an error
    /// (returns `None`), so compensation can always run.
    fn release(
        &self,
        id: ReservationId,
    ) -> BoxFuture<'_, Result<Option<Reservation>, InventoryError>>;

    /// A reservation by id.
    fn reservation(
        &self,
        id: ReservationId,
    ) -> BoxFuture<'_, Result<Option<Reservation>, InventoryError>>;

    /// One SKU's stock.
    fn stock<'a>(&'a self, sku: &'a Sku) -> BoxFuture<'a, Result<StockLevel, InventoryError>>;

    /// Adds stock (admin).
    fn restock(&self, restock: Restock) -> BoxFuture<'_, Result<StockLevel, InventoryError>>;

    /// Gives back the stock of up to `limit` reservations whose expiry has
    /// passed (state `Expired`); returns how many. The sweeper calls this.
    fn sweep_expired(&self, limit: usize) -> BoxFuture<'_, Result<usize, InventoryError>>;
}

/// The clock's time, truncated to whole microseconds: what PostgreSQL's
/// `timestamptz` keeps, so a reservation reads back equal to what was
/// returned whichever store holds it.
pub(crate) fn now_micros(clock: &time_kit::SharedClock) -> DateTime<Utc> {
    truncate_micros(DateTime::<Utc>::from(clock.now()))
}

/// `now + ttl`, truncated to whole microseconds. The TTL was checked
/// against [`InventoryLimits::max_ttl`], so the sum cannot overflow; if a
/// caller skipped that, the time saturates instead of panicking.
pub(crate) fn expiry(now: DateTime<Utc>, ttl: Duration) -> DateTime<Utc> {
    let ttl = chrono::TimeDelta::from_std(ttl).unwrap_or(chrono::TimeDelta::MAX);
    truncate_micros(
        now.checked_add_signed(ttl)
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
    )
}

fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// The request's lines ordered by SKU: the order every implementation
/// checks, locks and returns them in.
pub(crate) fn sorted_items(items: &[LineItem]) -> Vec<LineItem> {
    let mut items = items.to_vec();
    items.sort_unstable_by(|a, b| a.sku.cmp(&b.sku));
    items
}

/// Whether a stored reservation holds exactly `items` (in any order): the
/// test for a replayed reserve. The TTL is not compared: a replay after a
/// crash cannot know the first call's clock.
pub(crate) fn same_lines(reservation: &Reservation, items: &[LineItem]) -> bool {
    if reservation.lines.len() != items.len() {
        return false;
    }
    let mut stored: Vec<(&Sku, u32)> = reservation
        .lines
        .iter()
        .map(|l| (&l.sku, l.quantity))
        .collect();
    let mut asked: Vec<(&Sku, u32)> = items.iter().map(|l| (&l.sku, l.quantity)).collect();
    stored.sort_unstable();
    asked.sort_unstable();
    stored == asked
}

/// `Duration` as integer milliseconds in JSON.
pub(crate) mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

//! [`PgInventory`]: the inventory on PostgreSQL, in the schema `inventory`
//! (feature `postgres`).
//!
//! Stock never goes negative because every unit leaves `available` through
//! a conditional update, `UPDATE … SET available = available - q WHERE sku
//! = $1 AND available >= q`, which PostgreSQL re-evaluates on the latest
//! row version after waiting for a concurrent writer; `CHECK (available >=
//! 0)` (and the same on `reserved` and `committed`) stands behind it.
//!
//! Deadlocks are avoided by one lock order everywhere: a transaction first
//! locks reservation rows (its own new row, the one it commits or
//! releases, or the sweeper's batch taken with `SKIP LOCKED`, which never
//! waits), then SKU rows in ascending SKU order. A reservation takes its
//! lines one statement each in SKU order; commit, release and the sweeper
//! lock several SKUs with one `SELECT … ORDER BY sku FOR UPDATE` before
//! updating them together.
//!
//! Every statement is sent with its parameter types
//! ([`query_typed`](tokio_postgres::Client::query_typed)), so it costs one
//! round trip with no prepare; a one-line reservation is four round trips
//! (`BEGIN`, the reservation row, the line, `COMMIT`), and the hot SKU's row
//! stays locked only from the line's statement to `COMMIT`.
//!
//! Times come from the injected clock and are sent as parameters, never
//! `now()`, so tests drive expiry with a
//! [`ManualClock`](time_kit::ManualClock).
//!
//! The schema and why each index exists: `docs/order-saga/inventory.md`.

use chrono::{DateTime, Utc};
use time_kit::SharedClock;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Row, Transaction};
use uuid::Uuid;

use super::limits::{check_restock, new_sku_without_price, stock_overflow};
use super::{
    Inventory, InventoryError, InventoryLimits, Reservation, ReservationId, ReservationState,
    ReserveRequest, ReservedLine, Restock, StockLevel, expiry, now_micros, same_lines,
    sorted_items,
};
use crate::BoxFuture;
use crate::model::Sku;
use crate::pg::{Migration, PgError, PgPool};

/// The schema the inventory owns.
pub const SCHEMA: &str = "inventory";

/// The inventory's migrations, applied by [`PgInventory::migrate`].
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "0001_inventory.sql",
    sql: include_str!("../../migrations/inventory/0001_inventory.sql"),
}];

/// The inventory on PostgreSQL. Cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct PgInventory {
    pool: PgPool,
    clock: SharedClock,
    limits: InventoryLimits,
}

impl std::fmt::Debug for PgInventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgInventory")
            .field("pool", &self.pool.state())
            .field("clock", &self.clock)
            .field("limits", &self.limits)
            .finish()
    }
}

/// Stored rows that this version cannot read back (a SKU that does not
/// parse, a negative quantity, a state it does not know): reported as
/// [`InventoryError::Unavailable`] with this as the source.
#[derive(Debug, thiserror::Error)]
#[error("inventory data in PostgreSQL is not valid: {0}")]
pub struct CorruptData(String);

impl PgInventory {
    /// An inventory on `pool` (schema [`SCHEMA`]; run
    /// [`PgInventory::migrate`] first) that reads time from `clock`.
    pub fn new(pool: PgPool, clock: SharedClock) -> PgInventory {
        PgInventory {
            pool,
            clock,
            limits: InventoryLimits::default(),
        }
    }

    /// Checks requests against `limits` instead of the defaults.
    pub fn with_limits(mut self, limits: InventoryLimits) -> PgInventory {
        self.limits = limits;
        self
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the migrations not yet applied (see [`crate::pg::migrate`]);
    /// returns how many ran. Safe to run from several processes at once.
    pub async fn migrate(&self) -> Result<usize, PgError> {
        crate::pg::migrate(&self.pool, SCHEMA, MIGRATIONS).await
    }

    /// One `SELECT 1`: whether the database answers (the readiness probe).
    pub async fn ping(&self) -> Result<(), InventoryError> {
        let conn = self.pool.get().await.map_err(pool_error)?;
        conn.query_typed_one("SELECT 1", &[])
            .await
            .map_err(query_error)?;
        Ok(())
    }

    async fn reserve_in_db(&self, request: ReserveRequest) -> Result<Reservation, InventoryError> {
        self.limits.check_reserve(&request)?;
        let now = now_micros(&self.clock);
        let expires_at = expiry(now, request.ttl);
        let id = request.reservation_id;
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let tx = conn.transaction().await.map_err(query_error)?;
        // The row first: a concurrent reserve of the same id waits here on
        // the primary key, then finds this one, so an id is reserved once.
        let inserted = tx
            .query_typed_opt(
                "INSERT INTO inventory.reservations (id, state, expires_at, created_at, updated_at)
                 VALUES ($1, 'reserved', $2, $3, $3)
                 ON CONFLICT (id) DO NOTHING
                 RETURNING id",
                &[
                    (&id, Type::UUID),
                    (&expires_at, Type::TIMESTAMPTZ),
                    (&now, Type::TIMESTAMPTZ),
                ],
            )
            .await
            .map_err(query_error)?;
        if inserted.is_none() {
            let existing = load(&tx, id, false).await?;
            rollback(tx).await;
            return match existing {
                Some(existing) if same_lines(&existing, &request.items) => Ok(existing),
                Some(_) => Err(InventoryError::ReservationMismatch(id)),
                // Rows are never deleted, so a conflict means the row is
                // there; not seeing it is the store misbehaving.
                None => Err(corrupt(format!(
                    "reservation {id} conflicted but cannot be read"
                ))),
            };
        }
        let items = sorted_items(&request.items);
        let mut lines = Vec::with_capacity(items.len());
        for item in &items {
            let quantity = i64::from(item.quantity);
            let taken = tx
                .query_typed_opt(
                    "WITH taken AS (
                         UPDATE inventory.skus
                            SET available = available - $2,
                                reserved = reserved + $2,
                                updated_at = $4
                          WHERE sku = $1 AND available >= $2
                         RETURNING sku, unit_price_cents
                     )
                     INSERT INTO inventory.reservation_lines
                            (reservation_id, sku, quantity, unit_price_cents)
                     SELECT $3, sku, $2, unit_price_cents FROM taken
                     RETURNING unit_price_cents",
                    &[
                        (&item.sku.as_str(), Type::TEXT),
                        (&quantity, Type::INT8),
                        (&id, Type::UUID),
                        (&now, Type::TIMESTAMPTZ),
                    ],
                )
                .await
                .map_err(query_error)?;
            let Some(taken) = taken else {
                let available = tx
                    .query_typed_opt(
                        "SELECT available FROM inventory.skus WHERE sku = $1",
                        &[(&item.sku.as_str(), Type::TEXT)],
                    )
                    .await
                    .map_err(query_error)?;
                let error = match available {
                    None => InventoryError::UnknownSku(item.sku.clone()),
                    Some(row) => InventoryError::OutOfStock {
                        sku: item.sku.clone(),
                        requested: item.quantity,
                        available: row.try_get(0).map_err(query_error)?,
                    },
                };
                rollback(tx).await;
                return Err(error);
            };
            lines.push(ReservedLine {
                sku: item.sku.clone(),
                quantity: item.quantity,
                unit_price_cents: taken.try_get(0).map_err(query_error)?,
            });
        }
        tx.commit().await.map_err(query_error)?;
        Ok(Reservation {
            id,
            state: ReservationState::Reserved,
            lines,
            expires_at,
        })
    }

    async fn commit_in_db(&self, id: ReservationId) -> Result<Reservation, InventoryError> {
        let now = now_micros(&self.clock);
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let tx = conn.transaction().await.map_err(query_error)?;
        let Some(mut reservation) = load(&tx, id, true).await? else {
            rollback(tx).await;
            return Err(InventoryError::ReservationNotFound(id));
        };
        match reservation.state {
            ReservationState::Committed => {
                rollback(tx).await;
                Ok(reservation)
            }
            ReservationState::Released | ReservationState::Expired => {
                rollback(tx).await;
                Err(InventoryError::ReservationExpired(id))
            }
            ReservationState::Reserved if reservation.expires_at <= now => {
                // Past its expiry the stock is no longer promised: give it
                // back now rather than leave it to the sweeper, so the
                // outcome does not depend on when the sweeper ran.
                let deltas = deltas(&reservation.lines, |q| (q, -q, 0));
                apply_deltas(&tx, &deltas, now).await?;
                set_state(&tx, &[id], ReservationState::Expired, now).await?;
                tx.commit().await.map_err(query_error)?;
                Err(InventoryError::ReservationExpired(id))
            }
            ReservationState::Reserved => {
                let deltas = deltas(&reservation.lines, |q| (0, -q, q));
                apply_deltas(&tx, &deltas, now).await?;
                set_state(&tx, &[id], ReservationState::Committed, now).await?;
                tx.commit().await.map_err(query_error)?;
                reservation.state = ReservationState::Committed;
                Ok(reservation)
            }
        }
    }

    async fn release_in_db(
        &self,
        id: ReservationId,
    ) -> Result<Option<Reservation>, InventoryError> {
        let now = now_micros(&self.clock);
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let tx = conn.transaction().await.map_err(query_error)?;
        let Some(mut reservation) = load(&tx, id, true).await? else {
            rollback(tx).await;
            return Ok(None);
        };
        let deltas = match reservation.state {
            ReservationState::Released | ReservationState::Expired => {
                rollback(tx).await;
                return Ok(Some(reservation));
            }
            ReservationState::Reserved => deltas(&reservation.lines, |q| (q, -q, 0)),
            ReservationState::Committed => deltas(&reservation.lines, |q| (q, 0, -q)),
        };
        apply_deltas(&tx, &deltas, now).await?;
        set_state(&tx, &[id], ReservationState::Released, now).await?;
        tx.commit().await.map_err(query_error)?;
        reservation.state = ReservationState::Released;
        Ok(Some(reservation))
    }

    async fn reservation_in_db(
        &self,
        id: ReservationId,
    ) -> Result<Option<Reservation>, InventoryError> {
        let conn = self.pool.get().await.map_err(pool_error)?;
        load(&*conn, id, false).await
    }

    async fn stock_in_db(&self, sku: &Sku) -> Result<StockLevel, InventoryError> {
        let conn = self.pool.get().await.map_err(pool_error)?;
        let row = conn
            .query_typed_opt(
                "SELECT available, reserved, committed, unit_price_cents
                   FROM inventory.skus WHERE sku = $1",
                &[(&sku.as_str(), Type::TEXT)],
            )
            .await
            .map_err(query_error)?;
        match row {
            Some(row) => stock_level(sku, &row),
            None => Err(InventoryError::UnknownSku(sku.clone())),
        }
    }

    async fn restock_in_db(&self, restock: Restock) -> Result<StockLevel, InventoryError> {
        check_restock(&restock)?;
        let now = now_micros(&self.clock);
        let quantity = i64::from(restock.quantity);
        let sku = restock.sku.as_str();
        let conn = self.pool.get().await.map_err(pool_error)?;
        let row = match restock.unit_price_cents {
            Some(price) => conn
                .query_typed_opt(
                    "INSERT INTO inventory.skus AS s
                            (sku, available, unit_price_cents, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $4)
                     ON CONFLICT (sku) DO UPDATE
                        SET available = s.available + EXCLUDED.available,
                            unit_price_cents = EXCLUDED.unit_price_cents,
                            updated_at = EXCLUDED.updated_at
                     RETURNING available, reserved, committed, unit_price_cents",
                    &[
                        (&sku, Type::TEXT),
                        (&quantity, Type::INT8),
                        (&price, Type::INT8),
                        (&now, Type::TIMESTAMPTZ),
                    ],
                )
                .await
                .map_err(|e| restock_error(&restock.sku, e))?,
            None => conn
                .query_typed_opt(
                    "UPDATE inventory.skus
                        SET available = available + $2, updated_at = $3
                      WHERE sku = $1
                     RETURNING available, reserved, committed, unit_price_cents",
                    &[
                        (&sku, Type::TEXT),
                        (&quantity, Type::INT8),
                        (&now, Type::TIMESTAMPTZ),
                    ],
                )
                .await
                .map_err(|e| restock_error(&restock.sku, e))?,
        };
        match row {
            Some(row) => stock_level(&restock.sku, &row),
            None => Err(new_sku_without_price(&restock.sku)),
        }
    }

    async fn sweep_in_db(&self, limit: usize) -> Result<usize, InventoryError> {
        if limit == 0 {
            return Ok(0);
        }
        let now = now_micros(&self.clock);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let tx = conn.transaction().await.map_err(query_error)?;
        // SKIP LOCKED: several sweepers (one per instance) split the due
        // reservations between them instead of queueing on the same rows,
        // and a reservation being committed or released right now is left
        // to that transaction.
        let ids: Vec<Uuid> = tx
            .query_typed(
                "SELECT id FROM inventory.reservations
                  WHERE state = 'reserved' AND expires_at <= $1
                  ORDER BY expires_at
                  LIMIT $2
                  FOR UPDATE SKIP LOCKED",
                &[(&now, Type::TIMESTAMPTZ), (&limit, Type::INT8)],
            )
            .await
            .map_err(query_error)?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(query_error)?;
        if ids.is_empty() {
            rollback(tx).await;
            return Ok(0);
        }
        let rows = tx
            .query_typed(
                "SELECT sku, sum(quantity)::bigint FROM inventory.reservation_lines
                  WHERE reservation_id = ANY($1)
                  GROUP BY sku
                  ORDER BY sku",
                &[(&ids, Type::UUID_ARRAY)],
            )
            .await
            .map_err(query_error)?;
        let mut deltas = Vec::with_capacity(rows.len());
        for row in &rows {
            let sku: String = row.try_get(0).map_err(query_error)?;
            let quantity: i64 = row.try_get(1).map_err(query_error)?;
            deltas.push(Delta {
                sku,
                available: quantity,
                reserved: -quantity,
                committed: 0,
            });
        }
        apply_deltas(&tx, &deltas, now).await?;
        set_state(&tx, &ids, ReservationState::Expired, now).await?;
        tx.commit().await.map_err(query_error)?;
        Ok(ids.len())
    }
}

/// How one SKU's counts move.
struct Delta {
    sku: String,
    available: i64,
    reserved: i64,
    committed: i64,
}

/// One delta per line (lines come sorted by SKU), from a function of the
/// quantity giving `(available, reserved, committed)`.
fn deltas(lines: &[ReservedLine], f: impl Fn(i64) -> (i64, i64, i64)) -> Vec<Delta> {
    lines
        .iter()
        .map(|line| {
            let (available, reserved, committed) = f(i64::from(line.quantity));
            Delta {
                sku: line.sku.as_str().to_owned(),
                available,
                reserved,
                committed,
            }
        })
        .collect()
}

/// Moves SKU counts. `deltas` must be sorted by SKU, one per SKU. One SKU
/// is one statement; several are locked first in SKU order (the one lock
/// order, so two transactions cannot deadlock) and then updated together.
async fn apply_deltas(
    tx: &Transaction<'_>,
    deltas: &[Delta],
    now: DateTime<Utc>,
) -> Result<(), InventoryError> {
    let updated = match deltas {
        [] => return Ok(()),
        [one] => tx
            .execute_typed(
                "UPDATE inventory.skus
                    SET available = available + $2,
                        reserved = reserved + $3,
                        committed = committed + $4,
                        updated_at = $5
                  WHERE sku = $1",
                &[
                    (&one.sku, Type::TEXT),
                    (&one.available, Type::INT8),
                    (&one.reserved, Type::INT8),
                    (&one.committed, Type::INT8),
                    (&now, Type::TIMESTAMPTZ),
                ],
            )
            .await
            .map_err(query_error)?,
        many => {
            let skus: Vec<&str> = many.iter().map(|d| d.sku.as_str()).collect();
            let available: Vec<i64> = many.iter().map(|d| d.available).collect();
            let reserved: Vec<i64> = many.iter().map(|d| d.reserved).collect();
            let committed: Vec<i64> = many.iter().map(|d| d.committed).collect();
            tx.execute_typed(
                "SELECT 1 FROM inventory.skus WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
                &[(&skus, Type::TEXT_ARRAY)],
            )
            .await
            .map_err(query_error)?;
            tx.execute_typed(
                "UPDATE inventory.skus AS s
                    SET available = s.available + d.available,
                        reserved = s.reserved + d.reserved,
                        committed = s.committed + d.committed,
                        updated_at = $5
                   FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[])
                        AS d(sku, available, reserved, committed)
                  WHERE s.sku = d.sku",
                &[
                    (&skus, Type::TEXT_ARRAY),
                    (&available, Type::INT8_ARRAY),
                    (&reserved, Type::INT8_ARRAY),
                    (&committed, Type::INT8_ARRAY),
                    (&now, Type::TIMESTAMPTZ),
                ],
            )
            .await
            .map_err(query_error)?
        }
    };
    if updated != deltas.len() as u64 {
        // A line names a SKU row that is gone: the foreign key forbids it.
        return Err(corrupt(format!(
            "{} of {} SKU rows updated",
            updated,
            deltas.len()
        )));
    }
    Ok(())
}

async fn set_state(
    tx: &Transaction<'_>,
    ids: &[Uuid],
    state: ReservationState,
    now: DateTime<Utc>,
) -> Result<(), InventoryError> {
    tx.execute_typed(
        "UPDATE inventory.reservations SET state = $2, updated_at = $3 WHERE id = ANY($1)",
        &[
            (&ids, Type::UUID_ARRAY),
            (&state.as_str(), Type::TEXT),
            (&now, Type::TIMESTAMPTZ),
        ],
    )
    .await
    .map_err(query_error)?;
    Ok(())
}

/// A reservation and its lines (sorted by SKU); with `lock`, its row is
/// locked for the rest of the transaction.
async fn load<C: GenericClient + Sync>(
    client: &C,
    id: ReservationId,
    lock: bool,
) -> Result<Option<Reservation>, InventoryError> {
    const LOAD: &str = "SELECT r.state, r.expires_at, l.sku, l.quantity, l.unit_price_cents
                          FROM inventory.reservations r
                          LEFT JOIN inventory.reservation_lines l ON l.reservation_id = r.id
                         WHERE r.id = $1
                         ORDER BY l.sku";
    const LOAD_LOCKED: &str = "SELECT r.state, r.expires_at, l.sku, l.quantity, l.unit_price_cents
                                 FROM inventory.reservations r
                                 LEFT JOIN inventory.reservation_lines l ON l.reservation_id = r.id
                                WHERE r.id = $1
                                ORDER BY l.sku
                                  FOR UPDATE OF r";
    let rows = client
        .query_typed(if lock { LOAD_LOCKED } else { LOAD }, &[(&id, Type::UUID)])
        .await
        .map_err(query_error)?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let state: &str = first.try_get(0).map_err(query_error)?;
    let state = parse_state(state)?;
    let expires_at: DateTime<Utc> = first.try_get(1).map_err(query_error)?;
    let mut lines = Vec::with_capacity(rows.len());
    for row in &rows {
        let Some(sku) = row.try_get::<_, Option<&str>>(2).map_err(query_error)? else {
            continue;
        };
        let quantity: i64 = row.try_get(3).map_err(query_error)?;
        lines.push(ReservedLine {
            sku: Sku::parse(sku).map_err(|_| corrupt(format!("SKU {sku:?}")))?,
            quantity: u32::try_from(quantity)
                .map_err(|_| corrupt(format!("quantity {quantity} of {sku}")))?,
            unit_price_cents: row.try_get(4).map_err(query_error)?,
        });
    }
    Ok(Some(Reservation {
        id,
        state,
        lines,
        expires_at,
    }))
}

fn parse_state(state: &str) -> Result<ReservationState, InventoryError> {
    [
        ReservationState::Reserved,
        ReservationState::Committed,
        ReservationState::Released,
        ReservationState::Expired,
    ]
    .into_iter()
    .find(|s| s.as_str() == state)
    .ok_or_else(|| corrupt(format!("reservation state {state:?}")))
}

fn stock_level(sku: &Sku, row: &Row) -> Result<StockLevel, InventoryError> {
    Ok(StockLevel {
        sku: sku.clone(),
        available: row.try_get(0).map_err(query_error)?,
        reserved: row.try_get(1).map_err(query_error)?,
        committed: row.try_get(2).map_err(query_error)?,
        unit_price_cents: row.try_get(3).map_err(query_error)?,
    })
}

/// Rolls back, ignoring a failure: the outcome is already decided, and a
/// connection that failed to roll back is discarded by the pool.
async fn rollback(tx: Transaction<'_>) {
    if let Err(e) = tx.rollback().await {
        tracing::debug!(error = %e, "rollback failed");
    }
}

fn restock_error(sku: &Sku, e: tokio_postgres::Error) -> InventoryError {
    if e.code() == Some(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE) {
        stock_overflow(sku)
    } else {
        query_error(e)
    }
}

fn pool_error(e: bb8::RunError<tokio_postgres::Error>) -> InventoryError {
    InventoryError::Unavailable(Box::new(PgError::Pool(e)))
}

fn query_error(e: tokio_postgres::Error) -> InventoryError {
    InventoryError::Unavailable(Box::new(PgError::Query(e)))
}

fn corrupt(what: String) -> InventoryError {
    tracing::error!(what, "inventory data in PostgreSQL is not valid");
    InventoryError::Unavailable(Box::new(CorruptData(what)))
}

impl Inventory for PgInventory {
    fn reserve(
        &self,
        request: ReserveRequest,
    ) -> BoxFuture<'_, Result<Reservation, InventoryError>> {
        Box::pin(self.reserve_in_db(request))
    }

    fn commit(&self, id: ReservationId) -> BoxFuture<'_, Result<Reservation, InventoryError>> {
        Box::pin(self.commit_in_db(id))
    }

    fn release(
        &self,
        id: ReservationId,
    ) -> BoxFuture<'_, Result<Option<Reservation>, InventoryError>> {
        Box::pin(self.release_in_db(id))
    }

    fn reservation(
        &self,
        id: ReservationId,
    ) -> BoxFuture<'_, Result<Option<Reservation>, InventoryError>> {
        Box::pin(self.reservation_in_db(id))
    }

    fn stock<'a>(&'a self, sku: &'a Sku) -> BoxFuture<'a, Result<StockLevel, InventoryError>> {
        Box::pin(self.stock_in_db(sku))
    }

    fn restock(&self, restock: Restock) -> BoxFuture<'_, Result<StockLevel, InventoryError>> {
        Box::pin(self.restock_in_db(restock))
    }

    fn sweep_expired(&self, limit: usize) -> BoxFuture<'_, Result<usize, InventoryError>> {
        Box::pin(self.sweep_in_db(limit))
    }
}

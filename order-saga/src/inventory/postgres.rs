//! [`PgInventory`]: the inventory on PostgreSQL, in the schema `inventory`
//! (feature `postgres`).
//!
//! Stock never goes negative because every unit leaves `available` through
//! a conditional update, `UPDATE … SET available = available - q WHERE sku
//! = $1 AND available >= q`, which PostgreSQL re-evaluates on the latest
//! row version after waiting for a concurrent writer; `CHECK (available >=
//! 0)` and `CHECK (held >= 0)` stand behind it.
//!
//! A SKU row holds `available` and `held` (the units out of `available`,
//! reserved or committed). Committing a reservation changes only the
//! reservation and its lines, so an order locks its SKU rows once, when it
//! reserves; `reserved` is read as the sum of the SKU's open lines and
//! `committed` as `held - reserved`.
//!
//! **The hot SKU.** A row takes one locking transaction per commit flush,
//! so one SKU that every buyer wants would cap the whole shop. One-line
//! reservations are therefore grouped per SKU ([`BatchConfig`], on by
//! default): while one transaction for a SKU runs, the reservations of that
//! SKU that arrive wait and go together in the next, which inserts their
//! rows, takes all their units with one conditional update and writes
//! their lines, in four round trips whatever their number. When the stock
//! does not cover the whole group, the row is locked and the requests are
//! served in arrival order with what there is, exactly as if they had come
//! one by one. Figures and alternatives:
//! `docs/adr/0018-order-saga-hot-sku.md`.
//!
//! Deadlocks are avoided by one lock order everywhere: a transaction first
//! locks reservation rows (its own new rows, the one it commits or
//! releases, or the sweeper's batch taken with `SKIP LOCKED`, which never
//! waits), then SKU rows in ascending SKU order. A multi-line reservation
//! first tries one statement that locks its SKU rows with `SELECT … ORDER
//! BY sku FOR UPDATE` and writes only if every line is covered;
//! otherwise its transaction takes the lines one statement each in SKU
//! order. The single statement inserts its (new) reservation row after the
//! SKU locks, so two concurrent requests with one reservation id that take
//! different paths can deadlock; PostgreSQL aborts one within a second,
//! and its retry is answered as a replay (docs/order-saga/inventory.md). Release
//! and the sweeper lock several SKUs with one `SELECT … ORDER BY sku FOR
//! UPDATE` before updating them together. A commit of a live reservation
//! is one statement that touches no SKU row.
//!
//! Every statement is sent with its parameter types and prepared once per pooled connection and reused ([`Prepared`]),
//! so after a connection's first call it costs one round trip and no
//! parse or plan.
//!
//! Times come from the injected clock and are sent as parameters, never
//! `now()`, so tests drive expiry with a
//! [`ManualClock`](time_kit::ManualClock).
//!
//! The schema and why each index exists: `docs/order-saga/inventory.md`.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use time_kit::SharedClock;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use uuid::Uuid;

use super::limits::{check_restock, new_sku_without_price, stock_overflow};
use super::{
    Inventory, InventoryError, InventoryLimits, Reservation, ReservationId, ReservationState,
    ReserveRequest, ReservedLine, Restock, StockLevel, expiry, now_micros, same_lines,
    sorted_items,
};
use crate::BoxFuture;
use crate::combiner::{Combiner, SharedCause, fail_each};
use crate::model::Sku;
use crate::pg::{Migration, PgError, PgPool, PgTransaction, Prepared};

/// The schema the inventory owns.
pub const SCHEMA: &str = "inventory";

/// The inventory's migrations, applied by [`PgInventory::migrate`].
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "0001_inventory.sql",
    sql: include_str!("../../migrations/inventory/0001_inventory.sql"),
}];

/// How [`PgInventory`] groups concurrent one-line reservations of the
/// same SKU into one transaction, and concurrent commits into one
/// statement (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchConfig {
    /// Whether to group them (reservations and commits). Default on.
    pub enabled: bool,
    /// Most reservations in one transaction. Default 128.
    pub max_batch: usize,
}

impl Default for BatchConfig {
    fn default() -> BatchConfig {
        BatchConfig {
            enabled: true,
            max_batch: 128,
        }
    }
}

impl BatchConfig {
    /// One transaction per reservation: the plain conditional update.
    pub fn disabled() -> BatchConfig {
        BatchConfig {
            enabled: false,
            ..BatchConfig::default()
        }
    }

    /// Sets [`BatchConfig::max_batch`] (at least 1).
    pub fn with_max_batch(mut self, max: usize) -> BatchConfig {
        self.max_batch = max.max(1);
        self
    }
}

type ReserveResult = Result<Reservation, InventoryError>;

/// A grouped commit's answer: the reservation, committed now, or `None`
/// when it was not a live reservation (the caller's transaction decides).
type QuickCommit = Result<Option<Reservation>, InventoryError>;

/// How many commit statements may run at once.
const COMMIT_SHARDS: u128 = 4;

/// The inventory on PostgreSQL. Cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct PgInventory {
    pool: PgPool,
    clock: SharedClock,
    limits: InventoryLimits,
    batches: Option<Combiner<Sku, ReserveRequest, ReserveResult>>,
    commits: Option<Combiner<usize, ReservationId, QuickCommit>>,
}

impl std::fmt::Debug for PgInventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgInventory")
            .field("pool", &self.pool.state())
            .field("clock", &self.clock)
            .field("limits", &self.limits)
            .field("batches", &self.batches)
            .field("commits", &self.commits)
            .finish()
    }
}

/// A grouped reservation's outcome was lost (its group's task failed
/// before answering): the reservation may or may not exist.
#[derive(Debug, thiserror::Error)]
#[error("the reservation's batch was lost before it answered")]
pub struct BatchLost;

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
            batches: Some(Combiner::new(BatchConfig::default().max_batch)),
            commits: Some(Combiner::new(BatchConfig::default().max_batch)),
        }
    }

    /// Groups one-line reservations of a SKU as `config` says (grouping is
    /// on by default).
    pub fn with_batching(mut self, config: BatchConfig) -> PgInventory {
        self.batches = config
            .enabled
            .then(|| Combiner::new(config.max_batch.max(1)));
        self.commits = config
            .enabled
            .then(|| Combiner::new(config.max_batch.max(1)));
        self
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
        conn.query_prepared_one("SELECT 1", &[])
            .await
            .map_err(query_error)?;
        Ok(())
    }

    async fn reserve_in_db(&self, request: ReserveRequest) -> ReserveResult {
        self.limits.check_reserve(&request)?;
        match (&self.batches, request.items.as_slice()) {
            (Some(batches), [line]) => {
                let sku = line.sku.clone();
                let this = self.clone();
                batches
                    .submit(sku, request, move |sku, requests| {
                        let this = this.clone();
                        async move { this.reserve_batch(&sku, requests).await }
                    })
                    .await
                    .unwrap_or_else(|| Err(InventoryError::Unavailable(Box::new(BatchLost))))
            }
            _ => match self.reserve_at_once(&request).await? {
                Some(reservation) => Ok(reservation),
                None => self.reserve_one(request).await,
            },
        }
    }

    /// The usual multi-line reservation, all its lines there and in stock,
    /// in one autocommitted statement: lock the SKU rows in SKU order, and
    /// only if every line is covered, insert the reservation, take the
    /// units and write the lines. `None` when it wrote nothing (a line not
    /// covered, an unknown SKU, the id reserved before, repeated SKUs):
    /// [`PgInventory::reserve_one`] then decides, with the precise answer.
    async fn reserve_at_once(
        &self,
        request: &ReserveRequest,
    ) -> Result<Option<Reservation>, InventoryError> {
        let items = sorted_items(&request.items);
        if items.windows(2).any(|pair| pair[0].sku == pair[1].sku) {
            return Ok(None);
        }
        let now = now_micros(&self.clock);
        let expires_at = expiry(now, request.ttl);
        let id = request.reservation_id;
        let skus: Vec<&str> = items.iter().map(|item| item.sku.as_str()).collect();
        let quantities: Vec<i64> = items.iter().map(|item| i64::from(item.quantity)).collect();
        let conn = self.pool.get().await.map_err(pool_error)?;
        // The CHECK constraints stand behind the verdict: were it wrong,
        // the statement would fail and write nothing.
        let rows = conn
            .query_prepared(
                "WITH want AS (
                     SELECT * FROM unnest($1::text[], $2::int8[]) AS w(sku, quantity)
                 ), locked AS (
                     SELECT s.sku, s.available FROM inventory.skus s
                      WHERE s.sku = ANY($1)
                      ORDER BY s.sku
                        FOR UPDATE
                 ), verdict AS (
                     SELECT count(*) = cardinality($1::text[]) AS covered
                       FROM want w JOIN locked l ON l.sku = w.sku AND l.available >= w.quantity
                 ), reservation AS (
                     INSERT INTO inventory.reservations (id, state, expires_at, created_at, updated_at)
                     SELECT $3, 'reserved', $4, $5, $5 FROM verdict WHERE covered
                     ON CONFLICT (id) DO NOTHING
                     RETURNING id
                 ), taken AS (
                     UPDATE inventory.skus s
                        SET available = s.available - w.quantity,
                            held = s.held + w.quantity,
                            updated_at = $5
                       FROM want w
                      WHERE s.sku = w.sku AND EXISTS (SELECT 1 FROM reservation)
                     RETURNING s.sku, w.quantity, s.unit_price_cents
                 ), lines AS (
                     INSERT INTO inventory.reservation_lines
                            (reservation_id, sku, quantity, unit_price_cents)
                     SELECT $3, sku, quantity, unit_price_cents FROM taken
                     RETURNING sku, quantity, unit_price_cents
                 )
                 SELECT sku, quantity, unit_price_cents FROM lines ORDER BY sku",
                &[
                    (&skus, Type::TEXT_ARRAY),
                    (&quantities, Type::INT8_ARRAY),
                    (&id, Type::UUID),
                    (&expires_at, Type::TIMESTAMPTZ),
                    (&now, Type::TIMESTAMPTZ),
                ],
            )
            .await
            .map_err(query_error)?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut lines = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(line) = line_from(row, 0)? {
                lines.push(line);
            }
        }
        if lines.len() != items.len() {
            return Err(corrupt(format!(
                "reservation {id}: {} lines written for {} requested",
                lines.len(),
                items.len()
            )));
        }
        Ok(Some(Reservation {
            id,
            state: ReservationState::Reserved,
            lines,
            expires_at,
        }))
    }

    /// One reservation in its own transaction: one conditional update per
    /// line, in SKU order.
    async fn reserve_one(&self, request: ReserveRequest) -> ReserveResult {
        let now = now_micros(&self.clock);
        let expires_at = expiry(now, request.ttl);
        let id = request.reservation_id;
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let tx = conn.begin().await.map_err(query_error)?;
        // The row first: a concurrent reserve of the same id waits here on
        // the primary key, then finds this one, so an id is reserved once.
        let inserted = tx
            .query_prepared_opt(
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
                .query_prepared_opt(
                    "WITH taken AS (
                         UPDATE inventory.skus
                            SET available = available - $2,
                                held = held + $2,
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
                    .query_prepared_opt(
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

    /// Reserves a group of one-line requests for `sku` (checked already)
    /// and answers each, in order.
    async fn reserve_batch(&self, sku: &Sku, requests: Vec<ReserveRequest>) -> Vec<ReserveResult> {
        // Alone (the SKU was idle): the one-statement reserve, when it fits.
        if let [request] = requests.as_slice() {
            match self.reserve_at_once(request).await {
                Ok(Some(reservation)) => return vec![Ok(reservation)],
                Ok(None) => {}
                Err(e) => return vec![Err(e)],
            }
        }
        // An id twice in one group: the first goes in the batch, the
        // others run after it and find its row, as a replay does.
        let mut seen = HashSet::with_capacity(requests.len());
        let (batched, repeated): (Vec<usize>, Vec<usize>) =
            (0..requests.len()).partition(|&i| seen.insert(requests[i].reservation_id));
        let mut results: Vec<Option<ReserveResult>> = (0..requests.len()).map(|_| None).collect();
        let group: Vec<&ReserveRequest> = batched.iter().map(|&i| &requests[i]).collect();
        match self.reserve_group(sku, &group).await {
            Ok(outcomes) => {
                for (&i, outcome) in batched.iter().zip(outcomes) {
                    results[i] = Some(outcome);
                }
            }
            Err(e) => {
                // One failure for the whole group: every caller sees it.
                let cause: SharedCause = match e {
                    InventoryError::Unavailable(source) => Arc::from(source),
                    other => Arc::new(other),
                };
                let failed = fail_each(batched.len(), cause, InventoryError::Unavailable);
                for (&i, failure) in batched.iter().zip(failed) {
                    results[i] = Some(failure);
                }
            }
        }
        for i in repeated {
            results[i] = Some(self.reserve_one(requests[i].clone()).await);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(InventoryError::Unavailable(Box::new(BatchLost)))))
            .collect()
    }

    /// One transaction for a group of one-line requests of `sku` with
    /// distinct ids: the new ones take their units with one conditional
    /// update of the SKU row (all of them, in the common case), or, when
    /// the stock does not cover them all, in arrival order with what there
    /// is, as if they had come one by one.
    async fn reserve_group(
        &self,
        sku: &Sku,
        group: &[&ReserveRequest],
    ) -> Result<Vec<ReserveResult>, InventoryError> {
        let now = now_micros(&self.clock);
        let quantity = |r: &ReserveRequest| r.items.first().map_or(0, |l| l.quantity);
        let ids: Vec<Uuid> = group.iter().map(|r| r.reservation_id).collect();
        let expires: Vec<DateTime<Utc>> = group.iter().map(|r| expiry(now, r.ttl)).collect();
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let tx = conn.begin().await.map_err(query_error)?;
        let inserted: HashSet<Uuid> = tx
            .query_prepared(
                "INSERT INTO inventory.reservations (id, state, expires_at, created_at, updated_at)
                 SELECT id, 'reserved', expires_at, $3, $3
                   FROM unnest($1::uuid[], $2::timestamptz[]) AS r(id, expires_at)
                 ON CONFLICT (id) DO NOTHING
                 RETURNING id",
                &[
                    (&ids, Type::UUID_ARRAY),
                    (&expires, Type::TIMESTAMPTZ_ARRAY),
                    (&now, Type::TIMESTAMPTZ),
                ],
            )
            .await
            .map_err(query_error)?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(query_error)?;
        let mut results: Vec<Option<ReserveResult>> = (0..group.len()).map(|_| None).collect();
        let mut new = Vec::with_capacity(group.len());
        for (k, request) in group.iter().enumerate() {
            if inserted.contains(&request.reservation_id) {
                new.push(k);
                continue;
            }
            // A replay: the stored reservation answers.
            let id = request.reservation_id;
            results[k] = Some(match load(&tx, id, false).await? {
                Some(existing) if same_lines(&existing, &request.items) => Ok(existing),
                Some(_) => Err(InventoryError::ReservationMismatch(id)),
                None => Err(corrupt(format!(
                    "reservation {id} conflicted but cannot be read"
                ))),
            });
        }
        let mut granted: Vec<usize> = Vec::with_capacity(new.len());
        let mut price = 0i64;
        if !new.is_empty() {
            let new_ids: Vec<Uuid> = new.iter().map(|&k| ids[k]).collect();
            let quantities: Vec<i64> = new.iter().map(|&k| i64::from(quantity(group[k]))).collect();
            let total: i64 = quantities.iter().sum();
            let lines = tx
                .query_prepared(
                    "WITH taken AS (
                         UPDATE inventory.skus
                            SET available = available - $2,
                                held = held + $2,
                                updated_at = $5
                          WHERE sku = $1 AND available >= $2
                         RETURNING unit_price_cents
                     )
                     INSERT INTO inventory.reservation_lines
                            (reservation_id, sku, quantity, unit_price_cents)
                     SELECT r.id, $1, r.quantity, taken.unit_price_cents
                       FROM unnest($3::uuid[], $4::bigint[]) AS r(id, quantity), taken
                     RETURNING unit_price_cents",
                    &[
                        (&sku.as_str(), Type::TEXT),
                        (&total, Type::INT8),
                        (&new_ids, Type::UUID_ARRAY),
                        (&quantities, Type::INT8_ARRAY),
                        (&now, Type::TIMESTAMPTZ),
                    ],
                )
                .await
                .map_err(query_error)?;
            if let Some(first) = lines.first() {
                price = first.try_get(0).map_err(query_error)?;
                granted = new;
            } else {
                let stock = tx
                    .query_prepared_opt(
                        "SELECT available, unit_price_cents FROM inventory.skus
                          WHERE sku = $1 FOR UPDATE",
                        &[(&sku.as_str(), Type::TEXT)],
                    )
                    .await
                    .map_err(query_error)?;
                let Some(stock) = stock else {
                    for &k in &new {
                        results[k] = Some(Err(InventoryError::UnknownSku(sku.clone())));
                    }
                    rollback(tx).await;
                    return Ok(finish(results));
                };
                let mut available: i64 = stock.try_get(0).map_err(query_error)?;
                price = stock.try_get(1).map_err(query_error)?;
                let mut refused = Vec::new();
                for &k in &new {
                    let requested = quantity(group[k]);
                    if i64::from(requested) <= available {
                        available -= i64::from(requested);
                        granted.push(k);
                    } else {
                        refused.push(ids[k]);
                        results[k] = Some(Err(InventoryError::OutOfStock {
                            sku: sku.clone(),
                            requested,
                            available,
                        }));
                    }
                }
                if granted.is_empty() {
                    rollback(tx).await;
                    return Ok(finish(results));
                }
                tx.execute_prepared(
                    "DELETE FROM inventory.reservations WHERE id = ANY($1)",
                    &[(&refused, Type::UUID_ARRAY)],
                )
                .await
                .map_err(query_error)?;
                let granted_ids: Vec<Uuid> = granted.iter().map(|&k| ids[k]).collect();
                let granted_quantities: Vec<i64> = granted
                    .iter()
                    .map(|&k| i64::from(quantity(group[k])))
                    .collect();
                let total: i64 = granted_quantities.iter().sum();
                // The row is locked by the SELECT above: this cannot fail
                // the CHECK, and the lines take the price just read.
                tx.execute_prepared(
                    "WITH taken AS (
                         UPDATE inventory.skus
                            SET available = available - $2,
                                held = held + $2,
                                updated_at = $6
                          WHERE sku = $1
                         RETURNING 1
                     )
                     INSERT INTO inventory.reservation_lines
                            (reservation_id, sku, quantity, unit_price_cents)
                     SELECT r.id, $1, r.quantity, $5
                       FROM unnest($3::uuid[], $4::bigint[]) AS r(id, quantity), taken",
                    &[
                        (&sku.as_str(), Type::TEXT),
                        (&total, Type::INT8),
                        (&granted_ids, Type::UUID_ARRAY),
                        (&granted_quantities, Type::INT8_ARRAY),
                        (&price, Type::INT8),
                        (&now, Type::TIMESTAMPTZ),
                    ],
                )
                .await
                .map_err(query_error)?;
            }
        }
        tx.commit().await.map_err(query_error)?;
        for k in granted {
            results[k] = Some(Ok(Reservation {
                id: ids[k],
                state: ReservationState::Reserved,
                lines: vec![ReservedLine {
                    sku: sku.clone(),
                    quantity: quantity(group[k]),
                    unit_price_cents: price,
                }],
                expires_at: expires[k],
            }));
        }
        Ok(finish(results))
    }

    /// Commits those of `ids` that are live reservations (reserved, not
    /// past their expiry) in one autocommitted statement, and answers each
    /// id in order: committed now, or `None`.
    async fn commit_live(&self, ids: Vec<ReservationId>) -> Vec<QuickCommit> {
        let now = now_micros(&self.clock);
        let rows = match self.pool.get().await {
            Err(e) => Err(pool_error(e)),
            Ok(conn) => conn
                .query_prepared(
                    "WITH moved AS (
                         UPDATE inventory.reservations SET state = 'committed', updated_at = $2
                          WHERE id = ANY($1) AND state = 'reserved' AND expires_at > $2
                         RETURNING id, expires_at
                     ), closed AS (
                         UPDATE inventory.reservation_lines SET open = false
                          WHERE reservation_id IN (SELECT id FROM moved) AND open
                     )
                     SELECT m.id, m.expires_at, l.sku, l.quantity, l.unit_price_cents
                       FROM moved m
                       LEFT JOIN inventory.reservation_lines l ON l.reservation_id = m.id
                      ORDER BY m.id, l.sku",
                    &[(&ids, Type::UUID_ARRAY), (&now, Type::TIMESTAMPTZ)],
                )
                .await
                .map_err(query_error),
        };
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => return fail_each(ids.len(), Arc::new(e), InventoryError::Unavailable),
        };
        let mut committed: std::collections::HashMap<Uuid, Reservation> =
            std::collections::HashMap::new();
        for row in &rows {
            let decoded = (|| {
                let id: Uuid = row.try_get(0).map_err(query_error)?;
                let expires_at: DateTime<Utc> = row.try_get(1).map_err(query_error)?;
                Ok::<_, InventoryError>((id, expires_at, line_from(row, 2)?))
            })();
            match decoded {
                Ok((id, expires_at, line)) => {
                    let reservation = committed.entry(id).or_insert_with(|| Reservation {
                        id,
                        state: ReservationState::Committed,
                        lines: Vec::new(),
                        expires_at,
                    });
                    reservation.lines.extend(line);
                }
                // Written, but unreadable: every caller learns it.
                Err(e) => {
                    return fail_each(ids.len(), Arc::new(e), InventoryError::Unavailable);
                }
            }
        }
        ids.iter()
            .map(|id| Ok(committed.get(id).cloned()))
            .collect()
    }

    async fn commit_in_db(&self, id: ReservationId) -> Result<Reservation, InventoryError> {
        // The usual case, a live reservation, in one autocommitted
        // statement (grouped with concurrent commits); anything else
        // (already committed, expired, released, unknown) is sorted out by
        // the transaction below.
        let quick = match &self.commits {
            Some(commits) => {
                let this = self.clone();
                commits
                    .submit(
                        (id.as_u128() % COMMIT_SHARDS) as usize,
                        id,
                        move |_, ids| {
                            let this = this.clone();
                            async move { this.commit_live(ids).await }
                        },
                    )
                    .await
                    .unwrap_or_else(|| Err(InventoryError::Unavailable(Box::new(BatchLost))))?
            }
            None => self.commit_live(vec![id]).await.pop().unwrap_or(Ok(None))?,
        };
        if let Some(reservation) = quick {
            return Ok(reservation);
        }
        let now = now_micros(&self.clock);
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let tx = conn.begin().await.map_err(query_error)?;
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
                apply_deltas(&tx, &give_back(&reservation.lines), now).await?;
                set_state(&tx, &[id], ReservationState::Expired, now).await?;
                tx.commit().await.map_err(query_error)?;
                Err(InventoryError::ReservationExpired(id))
            }
            ReservationState::Reserved => {
                // The units stay held: only the reservation and its lines
                // change, so a commit never waits on (or locks) a SKU row.
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
        let tx = conn.begin().await.map_err(query_error)?;
        let Some(mut reservation) = load(&tx, id, true).await? else {
            rollback(tx).await;
            return Ok(None);
        };
        if matches!(
            reservation.state,
            ReservationState::Released | ReservationState::Expired
        ) {
            rollback(tx).await;
            return Ok(Some(reservation));
        }
        // Reserved or committed, the units are held: they go back.
        apply_deltas(&tx, &give_back(&reservation.lines), now).await?;
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
            .query_prepared_opt(
                "SELECT available, held, unit_price_cents,
                        (SELECT coalesce(sum(quantity), 0)::bigint
                           FROM inventory.reservation_lines
                          WHERE sku = $1 AND open)
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
                .query_prepared_opt(
                    "WITH up AS (
                         INSERT INTO inventory.skus AS s
                                (sku, available, unit_price_cents, created_at, updated_at)
                         VALUES ($1, $2, $3, $4, $4)
                         ON CONFLICT (sku) DO UPDATE
                            SET available = s.available + EXCLUDED.available,
                                unit_price_cents = EXCLUDED.unit_price_cents,
                                updated_at = EXCLUDED.updated_at
                         RETURNING available, held, unit_price_cents
                     )
                     SELECT available, held, unit_price_cents,
                            (SELECT coalesce(sum(quantity), 0)::bigint
                               FROM inventory.reservation_lines
                              WHERE sku = $1 AND open)
                       FROM up",
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
                .query_prepared_opt(
                    "WITH up AS (
                         UPDATE inventory.skus
                            SET available = available + $2, updated_at = $3
                          WHERE sku = $1
                         RETURNING available, held, unit_price_cents
                     )
                     SELECT available, held, unit_price_cents,
                            (SELECT coalesce(sum(quantity), 0)::bigint
                               FROM inventory.reservation_lines
                              WHERE sku = $1 AND open)
                       FROM up",
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
        let tx = conn.begin().await.map_err(query_error)?;
        // SKIP LOCKED: several sweepers (one per instance) split the due
        // reservations between them instead of queueing on the same rows,
        // and a reservation being committed or released right now is left
        // to that transaction.
        let ids: Vec<Uuid> = tx
            .query_prepared(
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
            .query_prepared(
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
                held: -quantity,
            });
        }
        apply_deltas(&tx, &deltas, now).await?;
        set_state(&tx, &ids, ReservationState::Expired, now).await?;
        tx.commit().await.map_err(query_error)?;
        Ok(ids.len())
    }
}

/// Every slot answered; an empty one (a bug) is reported, never a panic.
fn finish(results: Vec<Option<ReserveResult>>) -> Vec<ReserveResult> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(InventoryError::Unavailable(Box::new(BatchLost)))))
        .collect()
}

/// How one SKU's counts move.
struct Delta {
    sku: String,
    available: i64,
    held: i64,
}

/// The deltas that give a reservation's held units back to `available`,
/// one per line (lines come sorted by SKU).
fn give_back(lines: &[ReservedLine]) -> Vec<Delta> {
    lines
        .iter()
        .map(|line| {
            let quantity = i64::from(line.quantity);
            Delta {
                sku: line.sku.as_str().to_owned(),
                available: quantity,
                held: -quantity,
            }
        })
        .collect()
}

/// Moves SKU counts. `deltas` must be sorted by SKU, one per SKU. One SKU
/// is one statement; several are locked first in SKU order (the one lock
/// order, so two transactions cannot deadlock) and then updated together.
async fn apply_deltas(
    tx: &PgTransaction<'_>,
    deltas: &[Delta],
    now: DateTime<Utc>,
) -> Result<(), InventoryError> {
    let updated = match deltas {
        [] => return Ok(()),
        [one] => tx
            .execute_prepared(
                "UPDATE inventory.skus
                    SET available = available + $2,
                        held = held + $3,
                        updated_at = $4
                  WHERE sku = $1",
                &[
                    (&one.sku, Type::TEXT),
                    (&one.available, Type::INT8),
                    (&one.held, Type::INT8),
                    (&now, Type::TIMESTAMPTZ),
                ],
            )
            .await
            .map_err(query_error)?,
        many => {
            let skus: Vec<&str> = many.iter().map(|d| d.sku.as_str()).collect();
            let available: Vec<i64> = many.iter().map(|d| d.available).collect();
            let held: Vec<i64> = many.iter().map(|d| d.held).collect();
            tx.execute_prepared(
                "SELECT 1 FROM inventory.skus WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
                &[(&skus, Type::TEXT_ARRAY)],
            )
            .await
            .map_err(query_error)?;
            tx.execute_prepared(
                "UPDATE inventory.skus AS s
                    SET available = s.available + d.available,
                        held = s.held + d.held,
                        updated_at = $4
                   FROM unnest($1::text[], $2::bigint[], $3::bigint[])
                        AS d(sku, available, held)
                  WHERE s.sku = d.sku",
                &[
                    (&skus, Type::TEXT_ARRAY),
                    (&available, Type::INT8_ARRAY),
                    (&held, Type::INT8_ARRAY),
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

/// Moves reservations out of `reserved` to `state`, closing their lines.
async fn set_state(
    tx: &PgTransaction<'_>,
    ids: &[Uuid],
    state: ReservationState,
    now: DateTime<Utc>,
) -> Result<(), InventoryError> {
    tx.execute_prepared(
        "WITH moved AS (
             UPDATE inventory.reservations SET state = $2, updated_at = $3
              WHERE id = ANY($1)
             RETURNING id
         )
         UPDATE inventory.reservation_lines SET open = false
          WHERE reservation_id IN (SELECT id FROM moved) AND open",
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
async fn load<C: Prepared>(
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
        .query_prepared(if lock { LOAD_LOCKED } else { LOAD }, &[(&id, Type::UUID)])
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
        if let Some(line) = line_from(row, 2)? {
            lines.push(line);
        }
    }
    Ok(Some(Reservation {
        id,
        state,
        lines,
        expires_at,
    }))
}

/// The line in columns `at..at + 3` of `row` (SKU, quantity, unit price),
/// or `None` where a left join found none.
fn line_from(row: &Row, at: usize) -> Result<Option<ReservedLine>, InventoryError> {
    let Some(sku) = row.try_get::<_, Option<&str>>(at).map_err(query_error)? else {
        return Ok(None);
    };
    let quantity: i64 = row.try_get(at + 1).map_err(query_error)?;
    Ok(Some(ReservedLine {
        sku: Sku::parse(sku).map_err(|_| corrupt(format!("SKU {sku:?}")))?,
        quantity: u32::try_from(quantity)
            .map_err(|_| corrupt(format!("quantity {quantity} of {sku}")))?,
        unit_price_cents: row.try_get(at + 2).map_err(query_error)?,
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

/// A stock level from `(available, held, unit_price_cents, reserved)`:
/// what is held and not reserved is committed.
fn stock_level(sku: &Sku, row: &Row) -> Result<StockLevel, InventoryError> {
    let held: i64 = row.try_get(1).map_err(query_error)?;
    let reserved: i64 = row.try_get(3).map_err(query_error)?;
    if !(0..=held).contains(&reserved) {
        return Err(corrupt(format!(
            "{sku}: {reserved} units in open lines but {held} held"
        )));
    }
    Ok(StockLevel {
        sku: sku.clone(),
        available: row.try_get(0).map_err(query_error)?,
        reserved,
        committed: held - reserved,
        unit_price_cents: row.try_get(2).map_err(query_error)?,
    })
}

/// Rolls back, ignoring a failure: the outcome is already decided, and a
/// connection that failed to roll back is discarded by the pool.
async fn rollback(tx: PgTransaction<'_>) {
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

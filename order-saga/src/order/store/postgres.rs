//! Orders in PostgreSQL, schema `orders`: each saga transition is written
//! atomically, fenced by the lease token, with its events appended to the
//! outbox in the same statement.
//!
//! Transitions are group-committed: the orders are spread over a few
//! shards by id, and while one statement for a shard runs, the transitions
//! of that shard that arrive wait and go together in the next (one
//! `UPDATE … FROM unnest(…)` with the log, outbox and key writes joined on
//! its rows). A statement and its commit cost nearly the same for one row
//! as for fifty, and a profile of the load test showed PostgreSQL's
//! per-statement work (executor start-up, commit) as its largest cost once
//! statements were prepared. One order's transitions never share a
//! statement: its driver waits for each before writing the next, and when
//! two drivers of one order meet in a group (a stalled one and the one
//! that took its expired lease over), the second is written on its own.
//!
//! Leases and due times use the database's clock (`now()`), so instances
//! with skewed clocks still agree on who holds what.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

use super::{
    Created, Lease, NewOrder, OrderStore, SagaRecord, SagaUpdate, StoreError, StoredResponse,
};
use crate::BoxFuture;
use crate::combiner::{Combiner, fail_each};
use crate::messaging::outbox;
use crate::model::{CustomerId, Order, OrderId, OrderState};
use crate::pg::{Migration, PgClient, PgError, PgPool, Prepared};
use crate::saga::{Saga, SagaParts};

/// The `orders` schema's migrations: the order store's tables, then the
/// outbox and inbox.
pub const MIGRATIONS: [Migration; 2] = [
    Migration {
        version: 1,
        name: "0001_orders.sql",
        sql: include_str!("../../../migrations/orders/0001_orders.sql"),
    },
    outbox::OUTBOX_MIGRATION,
];

const COLUMNS: &str = "id, customer, state, items, lines, total_cents, currency, ship_to, cancel_reason, \
     payment_id, shipment_id, attention, saga_begun, saga_done, saga_compensated, attempts, \
     cancel_requested, idempotency_key, created_at, updated_at";

/// How many statements for saga transitions may run at once by default
/// (each on its own connection).
pub const DEFAULT_WRITE_SHARDS: usize = 4;

/// The most saga transitions one statement writes, by default.
pub const DEFAULT_MAX_BATCH: usize = 64;

/// A saga transition waiting for its shard's next statement, and what it
/// gets back: the order's `cancel_requested` flag.
type Transition = (Lease, SagaUpdate);
type TransitionResult = Result<bool, StoreError>;

/// The order store on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgOrderStore {
    pool: PgPool,
    transitions: Combiner<usize, Transition, TransitionResult>,
    shards: usize,
}

impl PgOrderStore {
    /// A store over `pool`, writing transitions with
    /// [`DEFAULT_WRITE_SHARDS`] and [`DEFAULT_MAX_BATCH`]. Call
    /// [`PgOrderStore::migrate`] once first.
    pub fn new(pool: PgPool) -> PgOrderStore {
        PgOrderStore::with_batching(pool, DEFAULT_WRITE_SHARDS, DEFAULT_MAX_BATCH)
    }

    /// A store whose transitions go out in at most `shards` concurrent
    /// statements of at most `max_batch` each (both at least 1; `1, 1`
    /// writes each transition alone).
    pub fn with_batching(pool: PgPool, shards: usize, max_batch: usize) -> PgOrderStore {
        PgOrderStore {
            pool,
            transitions: Combiner::new(max_batch),
            shards: shards.max(1),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates or upgrades the `orders` schema.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        crate::pg::migrate(&self.pool, "orders", &MIGRATIONS)
            .await
            .map_err(unavailable)
    }

    /// The saga log of one order, oldest first.
    pub async fn saga_log(&self, id: OrderId) -> Result<Vec<String>, StoreError> {
        let conn = self.pool.get().await.map_err(pool_error)?;
        let rows = conn
            .query_prepared(
                "SELECT entry FROM orders.saga_log WHERE order_id = $1 ORDER BY seq",
                &[(&id.as_uuid(), Type::UUID)],
            )
            .await
            .map_err(query_error)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

fn unavailable(e: PgError) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

fn pool_error(e: bb8::RunError<tokio_postgres::Error>) -> StoreError {
    unavailable(PgError::Pool(e))
}

fn query_error(e: tokio_postgres::Error) -> StoreError {
    unavailable(PgError::Query(e))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

fn from_json<T: serde::de::DeserializeOwned>(row: &Row, column: &str) -> Result<T, StoreError> {
    serde_json::from_value(row.get::<_, serde_json::Value>(column))
        .map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
}

fn record_from_row(row: &Row) -> Result<SagaRecord, StoreError> {
    let state: OrderState = row
        .get::<_, &str>("state")
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("state: {e}")))?;
    let cancel_reason = match row.get::<_, Option<&str>>("cancel_reason") {
        Some(reason) => Some(
            reason
                .parse()
                .map_err(|e| StoreError::Corrupt(format!("cancel_reason: {e}")))?,
        ),
        None => None,
    };
    let customer = CustomerId::parse(row.get::<_, String>("customer"))
        .map_err(|e| StoreError::Corrupt(format!("customer: {e}")))?;
    let saga = Saga::from_parts(SagaParts {
        state,
        begun: row.get::<_, i16>("saga_begun") as u8,
        done: row.get::<_, i16>("saga_done") as u8,
        compensated: row.get::<_, i16>("saga_compensated") as u8,
        reason: cancel_reason,
    });
    let order = Order {
        id: OrderId::from_uuid(row.get("id")),
        customer,
        state,
        items: from_json(row, "items")?,
        lines: from_json(row, "lines")?,
        total_cents: row.get("total_cents"),
        currency: row.get("currency"),
        ship_to: from_json(row, "ship_to")?,
        cancel_reason,
        payment_id: row.get("payment_id"),
        shipment_id: row.get("shipment_id"),
        attention: row.get("attention"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
    };
    Ok(SagaRecord {
        order,
        saga,
        attempts: u32::try_from(row.get::<_, i32>("attempts")).unwrap_or(0),
        cancel_requested: row.get("cancel_requested"),
        idempotency_key: row.get("idempotency_key"),
    })
}

const TERMINAL: &str = "('confirmed', 'cancelled', 'needs_attention')";

impl OrderStore for PgOrderStore {
    fn create(&self, new: NewOrder) -> BoxFuture<'_, Result<Created, StoreError>> {
        Box::pin(async move {
            let conn = self.pool.get().await.map_err(pool_error)?;
            let order = &new.order;
            let id = order.id.as_uuid();
            let parts = new.saga.to_parts();
            let lease_ms = millis(new.lease_for).min(i64::from(i32::MAX)) as i32;
            let claim = new.idempotency.as_ref();
            let customer = order.customer.as_str();
            let key = claim.map(|c| c.key.as_str());
            let hash: Option<&[u8]> = claim.map(|c| &c.request_hash[..]);
            let ttl_ms = claim.map_or(0.0, |c| millis(c.ttl) as f64);
            let items = json(&order.items);
            let ship_to = json(&order.ship_to);
            let begun = i16::from(parts.begun);
            let params: [(&(dyn ToSql + Sync), Type); 14] = [
                (&id, Type::UUID),
                (&customer, Type::TEXT),
                (&key, Type::TEXT),
                (&hash, Type::BYTEA),
                (&ttl_ms, Type::FLOAT8),
                (&order.state.as_str(), Type::TEXT),
                (&items, Type::JSONB),
                (&order.currency.as_str(), Type::TEXT),
                (&ship_to, Type::JSONB),
                (&begun, Type::INT2),
                (&new.owner.as_str(), Type::TEXT),
                (&lease_ms, Type::INT4),
                (&order.created_at, Type::TIMESTAMPTZ),
                (&new.log, Type::TEXT_ARRAY),
            ];
            // One autocommitted statement: claim the key (insert it, or take
            // over an expired one), and only then write the order and its
            // log. A live key claims nothing, so nothing is written; a
            // concurrent claim of the same key waits for the first
            // statement's commit and then sees its row.
            let written = conn
                .query_prepared_opt(
                    "WITH claim AS (
                        INSERT INTO orders.idempotency_keys AS k (customer, key, request_hash, order_id, expires_at)
                        SELECT $2, $3, $4, $1, now() + $5 * interval '1 millisecond'
                        WHERE $3::text IS NOT NULL
                        ON CONFLICT (customer, key) DO UPDATE
                           SET request_hash = EXCLUDED.request_hash, order_id = EXCLUDED.order_id,
                               status = NULL, response = NULL, created_at = now(), expires_at = EXCLUDED.expires_at
                           WHERE k.expires_at <= now()
                        RETURNING 1
                     ), claimed AS (
                        SELECT 1 FROM claim UNION ALL SELECT 1 WHERE $3::text IS NULL
                     ), ins AS (
                        INSERT INTO orders.orders (id, customer, state, items, currency, ship_to, saga_begun,
                                                   idempotency_key, lease_owner, lease_token, lease_until,
                                                   lease_ms, created_at, updated_at)
                        SELECT $1, $2, $6, $7, $8, $9, $10, $3, $11, nextval('orders.lease_tokens'),
                               now() + $12 * interval '1 millisecond', $12, $13, $13
                        FROM claimed
                        RETURNING lease_token
                     ), log AS (
                        INSERT INTO orders.saga_log (order_id, entry)
                        SELECT $1, t.e FROM ins, unnest($14::text[]) WITH ORDINALITY AS t(e, n)
                        ORDER BY t.n
                     )
                     SELECT lease_token FROM ins",
                    &params,
                )
                .await
                .map_err(query_error)?;
            if let Some(row) = written {
                return Ok(Created::New(Lease {
                    owner: new.owner,
                    token: row.try_get(0).map_err(query_error)?,
                }));
            }
            // The key is live: its first request answers.
            let Some(claim) = claim else {
                return Err(StoreError::Corrupt(format!(
                    "order {id} was not written and has no idempotency key"
                )));
            };
            let existing = conn
                .query_prepared_opt(
                    "SELECT request_hash, status, response FROM orders.idempotency_keys WHERE customer = $1 AND key = $2",
                    &[(&claim.customer.as_str(), Type::TEXT), (&claim.key.as_str(), Type::TEXT)],
                )
                .await
                .map_err(query_error)?;
            let Some(row) = existing else {
                // Purged between the two statements: the client retries.
                return Ok(Created::InFlight);
            };
            if row.get::<_, &[u8]>(0) != claim.request_hash {
                return Ok(Created::KeyReused);
            }
            Ok(
                match (
                    row.get::<_, Option<i16>>(1),
                    row.get::<_, Option<serde_json::Value>>(2),
                ) {
                    (Some(status), Some(body)) => Created::Replay(StoredResponse {
                        status: status as u16,
                        body,
                    }),
                    _ => Created::InFlight,
                },
            )
        })
    }

    fn abandon<'a>(
        &'a self,
        id: OrderId,
        lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut conn = self.pool.get().await.map_err(pool_error)?;
            let tx = conn.begin().await.map_err(query_error)?;
            let deleted = tx
                .query_prepared(
                    "DELETE FROM orders.orders WHERE id = $1 AND lease_token = $2 AND lease_owner = $3
                     RETURNING customer, idempotency_key",
                    &[(&id.as_uuid(), Type::UUID), (&lease.token, Type::INT8), (&lease.owner.as_str(), Type::TEXT)],
                )
                .await
                .map_err(query_error)?;
            let Some(row) = deleted.first() else {
                tx.rollback().await.map_err(query_error)?;
                return Err(StoreError::LeaseLost(id));
            };
            let customer: &str = row.get(0);
            let key: Option<&str> = row.get(1);
            tx.query_prepared(
                "DELETE FROM orders.saga_log WHERE order_id = $1",
                &[(&id.as_uuid(), Type::UUID)],
            )
            .await
            .map_err(query_error)?;
            if let Some(key) = key {
                tx.query_prepared(
                    "DELETE FROM orders.idempotency_keys WHERE customer = $1 AND key = $2 AND order_id = $3",
                    &[(&customer, Type::TEXT), (&key, Type::TEXT), (&id.as_uuid(), Type::UUID)],
                )
                .await
                .map_err(query_error)?;
            }
            tx.commit().await.map_err(query_error)?;
            Ok(())
        })
    }

    fn update<'a>(
        &'a self,
        lease: &'a Lease,
        update: SagaUpdate,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let id = update.order.id;
            let shard = (id.as_uuid().as_u128() % self.shards as u128) as usize;
            let pool = self.pool.clone();
            self.transitions
                .submit(shard, (lease.clone(), update), move |_, batch| {
                    write_transitions(pool.clone(), batch)
                })
                .await
                .unwrap_or_else(|| {
                    Err(StoreError::Unavailable(
                        format!(
                            "the write of order {id}'s transition was lost; its outcome is unknown"
                        )
                        .into(),
                    ))
                })
        })
    }

    fn claim<'a>(
        &'a self,
        owner: &'a str,
        instance_id: &'a str,
        lease_for: Duration,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(SagaRecord, Lease)>, StoreError>> {
        Box::pin(async move {
            let conn = self.pool.get().await.map_err(pool_error)?;
            let lease_ms = millis(lease_for).min(i64::from(i32::MAX)) as i32;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let sql = format!(
                "UPDATE orders.orders o SET lease_owner = $1, lease_token = nextval('orders.lease_tokens'),
                        lease_until = now() + $2 * interval '1 millisecond', lease_ms = $2
                 WHERE o.id IN (
                     SELECT id FROM orders.orders
                     WHERE state NOT IN {TERMINAL} AND next_attempt_at <= now()
                       AND (lease_until IS NULL OR lease_until <= now()
                            OR (lease_owner <> $1 AND starts_with(lease_owner, $4 || '#')))
                     ORDER BY next_attempt_at
                     LIMIT $3
                     FOR UPDATE SKIP LOCKED)
                 RETURNING {COLUMNS}, lease_token"
            );
            let rows = conn
                .query_prepared(
                    &sql,
                    &[
                        (&owner, Type::TEXT),
                        (&lease_ms, Type::INT4),
                        (&limit, Type::INT8),
                        (&instance_id, Type::TEXT),
                    ],
                )
                .await
                .map_err(query_error)?;
            rows.iter()
                .map(|row| {
                    Ok((
                        record_from_row(row)?,
                        Lease {
                            owner: owner.to_owned(),
                            token: row.get("lease_token"),
                        },
                    ))
                })
                .collect()
        })
    }

    fn claim_one<'a>(
        &'a self,
        id: OrderId,
        owner: &'a str,
        lease_for: Duration,
    ) -> BoxFuture<'a, Result<Option<(SagaRecord, Lease)>, StoreError>> {
        Box::pin(async move {
            let conn = self.pool.get().await.map_err(pool_error)?;
            let lease_ms = millis(lease_for).min(i64::from(i32::MAX)) as i32;
            let sql = format!(
                "UPDATE orders.orders SET lease_owner = $2, lease_token = nextval('orders.lease_tokens'),
                        lease_until = now() + $3 * interval '1 millisecond', lease_ms = $3
                 WHERE id = $1 AND (lease_until IS NULL OR lease_until <= now())
                 RETURNING {COLUMNS}, lease_token"
            );
            let rows = conn
                .query_prepared(
                    &sql,
                    &[
                        (&id.as_uuid(), Type::UUID),
                        (&owner, Type::TEXT),
                        (&lease_ms, Type::INT4),
                    ],
                )
                .await
                .map_err(query_error)?;
            match rows.first() {
                Some(row) => Ok(Some((
                    record_from_row(row)?,
                    Lease {
                        owner: owner.to_owned(),
                        token: row.get("lease_token"),
                    },
                ))),
                None => Ok(None),
            }
        })
    }

    fn request_cancel(&self, id: OrderId) -> BoxFuture<'_, Result<Option<SagaRecord>, StoreError>> {
        Box::pin(async move {
            let conn = self.pool.get().await.map_err(pool_error)?;
            let sql = format!(
                "UPDATE orders.orders SET
                    cancel_requested = cancel_requested OR state NOT IN {TERMINAL},
                    next_attempt_at = CASE WHEN state NOT IN {TERMINAL} THEN now() ELSE next_attempt_at END
                 WHERE id = $1
                 RETURNING {COLUMNS}"
            );
            let rows = conn
                .query_prepared(&sql, &[(&id.as_uuid(), Type::UUID)])
                .await
                .map_err(query_error)?;
            rows.first().map(record_from_row).transpose()
        })
    }

    fn load(&self, id: OrderId) -> BoxFuture<'_, Result<Option<SagaRecord>, StoreError>> {
        Box::pin(async move {
            let conn = self.pool.get().await.map_err(pool_error)?;
            let rows = conn
                .query_prepared(
                    &format!("SELECT {COLUMNS} FROM orders.orders WHERE id = $1"),
                    &[(&id.as_uuid(), Type::UUID)],
                )
                .await
                .map_err(query_error)?;
            rows.first().map(record_from_row).transpose()
        })
    }

    fn list<'a>(
        &'a self,
        customer: &'a CustomerId,
        before: Option<OrderId>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Order>, StoreError>> {
        Box::pin(async move {
            let conn = self.pool.get().await.map_err(pool_error)?;
            let before = before.map_or(uuid::Uuid::max(), |id| id.as_uuid());
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = conn
                .query_prepared(
                    &format!(
                        "SELECT {COLUMNS} FROM orders.orders WHERE customer = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
                    ),
                    &[(&customer.as_str(), Type::TEXT), (&before, Type::UUID), (&limit, Type::INT8)],
                )
                .await
                .map_err(query_error)?;
            rows.iter()
                .map(|row| record_from_row(row).map(|r| r.order))
                .collect()
        })
    }

    fn count_by_state(&self) -> BoxFuture<'_, Result<Vec<(OrderState, u64)>, StoreError>> {
        Box::pin(async move {
            let conn = self.pool.get().await.map_err(pool_error)?;
            let rows = conn
                .query_prepared(
                    "SELECT state, count(*) FROM orders.orders GROUP BY state",
                    &[],
                )
                .await
                .map_err(query_error)?;
            let mut counts: Vec<(OrderState, u64)> =
                OrderState::ALL.into_iter().map(|s| (s, 0)).collect();
            for row in &rows {
                if let Ok(state) = row.get::<_, &str>(0).parse::<OrderState>()
                    && let Some(slot) = counts.iter_mut().find(|(s, _)| *s == state)
                {
                    slot.1 = u64::try_from(row.get::<_, i64>(1)).unwrap_or(0);
                }
            }
            Ok(counts)
        })
    }

    fn purge_expired_keys(&self, limit: usize) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(async move {
            let conn = self.pool.get().await.map_err(pool_error)?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = conn
                .query_prepared(
                    "DELETE FROM orders.idempotency_keys WHERE ctid IN (
                         SELECT ctid FROM orders.idempotency_keys WHERE expires_at <= now() LIMIT $1)
                     RETURNING 1",
                    &[(&limit, Type::INT8)],
                )
                .await
                .map_err(query_error)?;
            Ok(rows.len())
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let conn = self.pool.get().await.map_err(pool_error)?;
            conn.query_prepared("SELECT 1", &[])
                .await
                .map_err(query_error)?;
            Ok(())
        })
    }
}

/// Writes a group of transitions: alone, or all in one statement. A
/// statement that fails for a reason other than the database's state (a
/// value it refuses) is retried row by row, so one bad transition does not
/// fail the others.
async fn write_transitions(pool: PgPool, batch: Vec<Transition>) -> Vec<TransitionResult> {
    if let [(lease, update)] = batch.as_slice() {
        return vec![write_one(&pool, lease, update).await];
    }
    // One order twice in a group (a stalled driver and the one that took
    // its expired lease over): the statement matches writes to rows by
    // order id, so the repeats are written after it, one by one, each
    // fenced by its own lease.
    let mut seen = std::collections::HashSet::with_capacity(batch.len());
    let repeated: Vec<usize> = (0..batch.len())
        .filter(|&i| !seen.insert(batch[i].1.order.id))
        .collect();
    if !repeated.is_empty() {
        let (mut firsts, mut repeats) = (Vec::new(), Vec::new());
        let mut positions = Vec::with_capacity(batch.len());
        for (i, transition) in batch.into_iter().enumerate() {
            if repeated.contains(&i) {
                positions.push((false, repeats.len()));
                repeats.push(transition);
            } else {
                positions.push((true, firsts.len()));
                firsts.push(transition);
            }
        }
        let mut first_results = Box::pin(write_transitions(pool.clone(), firsts)).await;
        let mut repeat_results = Vec::with_capacity(repeats.len());
        for (lease, update) in &repeats {
            repeat_results.push(write_one(&pool, lease, update).await);
        }
        let mut taken_first: Vec<Option<TransitionResult>> =
            first_results.drain(..).map(Some).collect();
        let mut taken_repeat: Vec<Option<TransitionResult>> =
            repeat_results.into_iter().map(Some).collect();
        return positions
            .into_iter()
            .map(|(first, k)| {
                let slot = if first {
                    &mut taken_first[k]
                } else {
                    &mut taken_repeat[k]
                };
                slot.take().unwrap_or_else(|| {
                    Err(StoreError::Unavailable(
                        "a transition's result went missing".into(),
                    ))
                })
            })
            .collect();
    }
    let conn = match pool.get().await {
        Ok(conn) => conn,
        Err(e) => return report_to_all(&batch, pool_error(e)),
    };
    let written = write_many(&conn, &batch).await;
    drop(conn);
    match written {
        Ok(results) => results,
        Err(e) if !crate::messaging::inbox::is_transient(&e) => {
            tracing::warn!(error = %e, transitions = batch.len(), "a group of saga transitions failed; writing them one by one");
            let mut results = Vec::with_capacity(batch.len());
            for (lease, update) in &batch {
                results.push(write_one(&pool, lease, update).await);
            }
            results
        }
        Err(e) => report_to_all(&batch, query_error(e)),
    }
}

/// `error` as the result of every transition of `batch`.
fn report_to_all(batch: &[Transition], error: StoreError) -> Vec<TransitionResult> {
    fail_each(batch.len(), Arc::new(error), StoreError::Unavailable)
}

/// One transition, one autocommitted statement.
async fn write_one(pool: &PgPool, lease: &Lease, update: &SagaUpdate) -> TransitionResult {
    let conn = pool.get().await.map_err(pool_error)?;
    let order = &update.order;
    let id = order.id.as_uuid();
    let parts = update.saga.to_parts();
    let release = update.release_after.is_some();
    let delay_ms = update.release_after.map(millis).unwrap_or(0) as f64;
    let attempts = i32::try_from(update.attempts).unwrap_or(i32::MAX);
    let reason = order.cancel_reason.map(|r| r.as_str());
    let lines = json(&order.lines);
    let (event_ids, event_orders, event_types, payloads) = outbox::columns(&update.events);
    let status = update.response.as_ref().map(|r| r.status as i16);
    let body = update.response.as_ref().map(|r| &r.body);
    // One autocommitted statement, one round trip: the fenced UPDATE,
    // and the log, outbox and key writes joined on its row, so none of
    // them happens when the lease is lost. No NOTIFY: it takes a
    // server-wide lock at every commit; the relay polls
    // (RelayConfig::poll_interval) and is busy under load anyway.
    let params: [(&(dyn ToSql + Sync), Type); 25] = [
        (&id, Type::UUID),
        (&lease.token, Type::INT8),
        (&order.state.as_str(), Type::TEXT),
        (&lines, Type::JSONB),
        (&order.total_cents, Type::INT8),
        (&reason, Type::TEXT),
        (&order.payment_id, Type::TEXT),
        (&order.shipment_id, Type::TEXT),
        (&order.attention, Type::TEXT),
        (&i16::from(parts.begun), Type::INT2),
        (&i16::from(parts.done), Type::INT2),
        (&i16::from(parts.compensated), Type::INT2),
        (&attempts, Type::INT4),
        (&order.updated_at, Type::TIMESTAMPTZ),
        (&update.cancel_applied, Type::BOOL),
        (&release, Type::BOOL),
        (&delay_ms, Type::FLOAT8),
        (&lease.owner.as_str(), Type::TEXT),
        (&update.log, Type::TEXT_ARRAY),
        (&event_ids, Type::UUID_ARRAY),
        (&event_orders, Type::UUID_ARRAY),
        (&event_types, Type::TEXT_ARRAY),
        (&payloads, Type::JSONB_ARRAY),
        (&status, Type::INT2),
        (&body, Type::JSONB),
    ];
    let rows = conn
    .query_prepared(
        "WITH upd AS (
    UPDATE orders.orders SET
        state = $3, lines = $4, total_cents = $5, cancel_reason = $6, payment_id = $7,
        shipment_id = $8, attention = $9, saga_begun = $10, saga_done = $11,
        saga_compensated = $12, attempts = $13, updated_at = $14,
        cancel_requested = cancel_requested AND NOT $15,
        lease_owner = CASE WHEN $16 THEN NULL ELSE lease_owner END,
        lease_until = CASE WHEN $16 THEN NULL ELSE now() + lease_ms * interval '1 millisecond' END,
        next_attempt_at = CASE WHEN $16 THEN now() + $17 * interval '1 millisecond' ELSE next_attempt_at END
    WHERE id = $1 AND lease_token = $2 AND lease_owner = $18
    RETURNING cancel_requested, customer, idempotency_key
         ), log AS (
    INSERT INTO orders.saga_log (order_id, entry)
    SELECT $1, t.e FROM upd, unnest($19::text[]) WITH ORDINALITY AS t(e, n)
    ORDER BY t.n
         ), events AS (
    INSERT INTO orders.outbox (event_id, order_id, event_type, payload)
    SELECT e.event_id, e.order_id, e.event_type, e.payload
    FROM upd, unnest($20::uuid[], $21::uuid[], $22::text[], $23::jsonb[])
         WITH ORDINALITY AS e(event_id, order_id, event_type, payload, n)
    ORDER BY e.n
         ), answer AS (
    UPDATE orders.idempotency_keys k SET status = $24, response = $25
    FROM upd
    WHERE $24::smallint IS NOT NULL AND k.customer = upd.customer
      AND k.key = upd.idempotency_key AND k.order_id = $1
         )
         SELECT cancel_requested FROM upd",
        &params,
    )
    .await
    .map_err(query_error)?;
    match rows.first() {
        Some(row) => Ok(row.get(0)),
        None => Err(StoreError::LeaseLost(order.id)),
    }
}

/// A group of transitions of distinct orders in one autocommitted
/// statement: the same writes as [`write_one`], set-based. Returns each
/// transition's result, in order; a row the fenced UPDATE did not match
/// lost its lease.
async fn write_many(
    conn: &PgClient,
    batch: &[Transition],
) -> Result<Vec<TransitionResult>, tokio_postgres::Error> {
    let n = batch.len();
    let mut ids = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut owners = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut lines = Vec::with_capacity(n);
    let mut totals = Vec::with_capacity(n);
    let mut reasons = Vec::with_capacity(n);
    let mut payment_ids = Vec::with_capacity(n);
    let mut shipment_ids = Vec::with_capacity(n);
    let mut attention = Vec::with_capacity(n);
    let mut begun = Vec::with_capacity(n);
    let mut done = Vec::with_capacity(n);
    let mut compensated = Vec::with_capacity(n);
    let mut attempts = Vec::with_capacity(n);
    let mut updated_at = Vec::with_capacity(n);
    let mut cancel_applied = Vec::with_capacity(n);
    let mut release = Vec::with_capacity(n);
    let mut delay_ms = Vec::with_capacity(n);
    let (mut log_orders, mut log_entries) = (Vec::new(), Vec::new());
    let (mut event_owners, mut events) = (Vec::new(), Vec::new());
    let (mut answer_orders, mut answer_statuses, mut answer_bodies) =
        (Vec::new(), Vec::new(), Vec::new());
    for (lease, update) in batch {
        let order = &update.order;
        let id = order.id.as_uuid();
        let parts = update.saga.to_parts();
        ids.push(id);
        tokens.push(lease.token);
        owners.push(lease.owner.as_str());
        states.push(order.state.as_str());
        lines.push(json(&order.lines));
        totals.push(order.total_cents);
        reasons.push(order.cancel_reason.map(|r| r.as_str()));
        payment_ids.push(order.payment_id.as_deref());
        shipment_ids.push(order.shipment_id.as_deref());
        attention.push(order.attention.as_deref());
        begun.push(i16::from(parts.begun));
        done.push(i16::from(parts.done));
        compensated.push(i16::from(parts.compensated));
        attempts.push(i32::try_from(update.attempts).unwrap_or(i32::MAX));
        updated_at.push(order.updated_at);
        cancel_applied.push(update.cancel_applied);
        release.push(update.release_after.is_some());
        delay_ms.push(update.release_after.map(millis).unwrap_or(0) as f64);
        for entry in &update.log {
            log_orders.push(id);
            log_entries.push(entry.as_str());
        }
        for event in &update.events {
            event_owners.push(id);
            events.push(event.clone());
        }
        if let Some(response) = &update.response {
            answer_orders.push(id);
            answer_statuses.push(response.status as i16);
            answer_bodies.push(&response.body);
        }
    }
    let (event_ids, event_orders, event_types, payloads) = outbox::columns(&events);
    let params: [(&(dyn ToSql + Sync), Type); 28] = [
        (&ids, Type::UUID_ARRAY),
        (&tokens, Type::INT8_ARRAY),
        (&owners, Type::TEXT_ARRAY),
        (&states, Type::TEXT_ARRAY),
        (&lines, Type::JSONB_ARRAY),
        (&totals, Type::INT8_ARRAY),
        (&reasons, Type::TEXT_ARRAY),
        (&payment_ids, Type::TEXT_ARRAY),
        (&shipment_ids, Type::TEXT_ARRAY),
        (&attention, Type::TEXT_ARRAY),
        (&begun, Type::INT2_ARRAY),
        (&done, Type::INT2_ARRAY),
        (&compensated, Type::INT2_ARRAY),
        (&attempts, Type::INT4_ARRAY),
        (&updated_at, Type::TIMESTAMPTZ_ARRAY),
        (&cancel_applied, Type::BOOL_ARRAY),
        (&release, Type::BOOL_ARRAY),
        (&delay_ms, Type::FLOAT8_ARRAY),
        (&log_orders, Type::UUID_ARRAY),
        (&log_entries, Type::TEXT_ARRAY),
        (&event_owners, Type::UUID_ARRAY),
        (&event_ids, Type::UUID_ARRAY),
        (&event_orders, Type::UUID_ARRAY),
        (&event_types, Type::TEXT_ARRAY),
        (&payloads, Type::JSONB_ARRAY),
        (&answer_orders, Type::UUID_ARRAY),
        (&answer_statuses, Type::INT2_ARRAY),
        (&answer_bodies, Type::JSONB_ARRAY),
    ];
    let rows = conn
        .query_prepared(
            "WITH input AS (
                SELECT * FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::text[], $5::jsonb[],
                                     $6::int8[], $7::text[], $8::text[], $9::text[], $10::text[],
                                     $11::int2[], $12::int2[], $13::int2[], $14::int4[],
                                     $15::timestamptz[], $16::bool[], $17::bool[], $18::float8[])
                    AS i(id, token, owner, state, lines, total_cents, cancel_reason, payment_id,
                         shipment_id, attention, begun, done, compensated, attempts, updated_at,
                         cancel_applied, release, delay_ms)
             ), upd AS (
                UPDATE orders.orders o SET
                    state = i.state, lines = i.lines, total_cents = i.total_cents,
                    cancel_reason = i.cancel_reason, payment_id = i.payment_id,
                    shipment_id = i.shipment_id, attention = i.attention, saga_begun = i.begun,
                    saga_done = i.done, saga_compensated = i.compensated, attempts = i.attempts,
                    updated_at = i.updated_at,
                    cancel_requested = o.cancel_requested AND NOT i.cancel_applied,
                    lease_owner = CASE WHEN i.release THEN NULL ELSE o.lease_owner END,
                    lease_until = CASE WHEN i.release THEN NULL
                                       ELSE now() + o.lease_ms * interval '1 millisecond' END,
                    next_attempt_at = CASE WHEN i.release THEN now() + i.delay_ms * interval '1 millisecond'
                                           ELSE o.next_attempt_at END
                FROM input i
                WHERE o.id = i.id AND o.lease_token = i.token AND o.lease_owner = i.owner
                RETURNING o.id, o.cancel_requested, o.customer, o.idempotency_key
             ), log AS (
                INSERT INTO orders.saga_log (order_id, entry)
                SELECT l.order_id, l.entry
                FROM unnest($19::uuid[], $20::text[]) WITH ORDINALITY AS l(order_id, entry, n)
                WHERE l.order_id IN (SELECT id FROM upd)
                ORDER BY l.n
             ), events AS (
                INSERT INTO orders.outbox (event_id, order_id, event_type, payload)
                SELECT e.event_id, e.order_id, e.event_type, e.payload
                FROM unnest($21::uuid[], $22::uuid[], $23::uuid[], $24::text[], $25::jsonb[])
                     WITH ORDINALITY AS e(owner, event_id, order_id, event_type, payload, n)
                WHERE e.owner IN (SELECT id FROM upd)
                ORDER BY e.n
             ), answer AS (
                UPDATE orders.idempotency_keys k SET status = a.status, response = a.body
                FROM unnest($26::uuid[], $27::int2[], $28::jsonb[]) AS a(order_id, status, body), upd
                WHERE upd.id = a.order_id AND k.customer = upd.customer
                  AND k.key = upd.idempotency_key AND k.order_id = a.order_id
             )
             SELECT id, cancel_requested FROM upd",
            &params,
        )
        .await?;
    let mut written: HashMap<uuid::Uuid, bool> = HashMap::with_capacity(rows.len());
    for row in &rows {
        written.insert(row.try_get(0)?, row.try_get(1)?);
    }
    Ok(batch
        .iter()
        .map(
            |(_, update)| match written.get(&update.order.id.as_uuid()) {
                Some(&cancel_requested) => Ok(cancel_requested),
                None => Err(StoreError::LeaseLost(update.order.id)),
            },
        )
        .collect())
}

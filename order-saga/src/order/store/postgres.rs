//! Orders in PostgreSQL, schema `orders`: one transaction per saga
//! transition, fenced by the lease token, with the transition's events
//! appended to the outbox in the same transaction.
//!
//! Leases and due times use the database's clock (`now()`), so instances
//! with skewed clocks still agree on who holds what.

use std::time::Duration;

use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

use super::{
    Created, Lease, NewOrder, OrderStore, SagaRecord, SagaUpdate, StoreError, StoredResponse,
};
use crate::BoxFuture;
use crate::messaging::outbox;
use crate::model::{CustomerId, Order, OrderId, OrderState};
use crate::pg::{Migration, PgError, PgPool};
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

/// The order store on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgOrderStore {
    pool: PgPool,
}

impl PgOrderStore {
    /// A store over `pool`. Call [`PgOrderStore::migrate`] once first.
    pub fn new(pool: PgPool) -> PgOrderStore {
        PgOrderStore { pool }
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
            .query_typed(
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
            let mut conn = self.pool.get().await.map_err(pool_error)?;
            let tx = conn.transaction().await.map_err(query_error)?;
            let id = new.order.id.as_uuid();
            if let Some(claim) = &new.idempotency {
                let hash: &[u8] = &claim.request_hash;
                // Insert the key, or take over an expired one; a live key
                // returns no row (a concurrent insert waits for the first
                // transaction, then sees its row).
                let claimed = tx
                    .query_typed(
                        "INSERT INTO orders.idempotency_keys AS k (customer, key, request_hash, order_id, expires_at)
                         VALUES ($1, $2, $3, $4, now() + $5 * interval '1 millisecond')
                         ON CONFLICT (customer, key) DO UPDATE
                            SET request_hash = EXCLUDED.request_hash, order_id = EXCLUDED.order_id,
                                status = NULL, response = NULL, created_at = now(), expires_at = EXCLUDED.expires_at
                            WHERE k.expires_at <= now()
                         RETURNING 1",
                        &[
                            (&claim.customer.as_str(), Type::TEXT),
                            (&claim.key.as_str(), Type::TEXT),
                            (&hash, Type::BYTEA),
                            (&id, Type::UUID),
                            (&(millis(claim.ttl) as f64), Type::FLOAT8),
                        ],
                    )
                    .await
                    .map_err(query_error)?;
                if claimed.is_empty() {
                    let existing = tx
                        .query_typed(
                            "SELECT request_hash, status, response FROM orders.idempotency_keys WHERE customer = $1 AND key = $2",
                            &[(&claim.customer.as_str(), Type::TEXT), (&claim.key.as_str(), Type::TEXT)],
                        )
                        .await
                        .map_err(query_error)?;
                    tx.rollback().await.map_err(query_error)?;
                    let Some(row) = existing.first() else {
                        // Purged between the two statements: the client retries.
                        return Ok(Created::InFlight);
                    };
                    if row.get::<_, &[u8]>(0) != hash {
                        return Ok(Created::KeyReused);
                    }
                    return Ok(
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
                    );
                }
            }
            let order = &new.order;
            let parts = new.saga.to_parts();
            let lease_ms = millis(new.lease_for).min(i64::from(i32::MAX)) as i32;
            let key = new.idempotency.as_ref().map(|c| c.key.as_str());
            let rows = tx
                .query_typed(
                    "INSERT INTO orders.orders (id, customer, state, items, currency, ship_to, saga_begun, idempotency_key,
                                                lease_owner, lease_token, lease_until, lease_ms, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, nextval('orders.lease_tokens'),
                             now() + $10 * interval '1 millisecond', $10, $11, $11)
                     RETURNING lease_token",
                    &[
                        (&id, Type::UUID),
                        (&order.customer.as_str(), Type::TEXT),
                        (&order.state.as_str(), Type::TEXT),
                        (&json(&order.items), Type::JSONB),
                        (&order.currency.as_str(), Type::TEXT),
                        (&json(&order.ship_to), Type::JSONB),
                        (&i16::from(parts.begun), Type::INT2),
                        (&key, Type::TEXT),
                        (&new.owner.as_str(), Type::TEXT),
                        (&lease_ms, Type::INT4),
                        (&order.created_at, Type::TIMESTAMPTZ),
                    ],
                )
                .await
                .map_err(query_error)?;
            let token: i64 = rows.first().map(|r| r.get(0)).unwrap_or_default();
            append_log(&tx, id, &new.log).await?;
            tx.commit().await.map_err(query_error)?;
            Ok(Created::New(Lease {
                owner: new.owner,
                token,
            }))
        })
    }

    fn abandon<'a>(
        &'a self,
        id: OrderId,
        lease: &'a Lease,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut conn = self.pool.get().await.map_err(pool_error)?;
            let tx = conn.transaction().await.map_err(query_error)?;
            let deleted = tx
                .query_typed(
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
            tx.query_typed(
                "DELETE FROM orders.saga_log WHERE order_id = $1",
                &[(&id.as_uuid(), Type::UUID)],
            )
            .await
            .map_err(query_error)?;
            if let Some(key) = key {
                tx.query_typed(
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
            let conn = self.pool.get().await.map_err(pool_error)?;
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
                .query_typed(
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
                .query_typed(
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
                .query_typed(
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
                .query_typed(&sql, &[(&id.as_uuid(), Type::UUID)])
                .await
                .map_err(query_error)?;
            rows.first().map(record_from_row).transpose()
        })
    }

    fn load(&self, id: OrderId) -> BoxFuture<'_, Result<Option<SagaRecord>, StoreError>> {
        Box::pin(async move {
            let conn = self.pool.get().await.map_err(pool_error)?;
            let rows = conn
                .query_typed(
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
                .query_typed(
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
                .query_typed(
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
                .query_typed(
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
            conn.query_typed("SELECT 1", &[])
                .await
                .map_err(query_error)?;
            Ok(())
        })
    }
}

async fn append_log(
    tx: &tokio_postgres::Transaction<'_>,
    id: uuid::Uuid,
    entries: &[String],
) -> Result<(), StoreError> {
    if entries.is_empty() {
        return Ok(());
    }
    let params: [(&(dyn ToSql + Sync), Type); 2] =
        [(&id, Type::UUID), (&entries, Type::TEXT_ARRAY)];
    tx.query_typed(
        "INSERT INTO orders.saga_log (order_id, entry) SELECT $1, e FROM unnest($2::text[]) WITH ORDINALITY AS t(e, n) ORDER BY n",
        &params,
    )
    .await
    .map_err(query_error)?;
    Ok(())
}

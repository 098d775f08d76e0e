//! [`PgShipping`]: the shipping service on PostgreSQL, schema `shipping`
//! (feature `postgres`).
//!
//! One row per order in `shipping.shipments` (the migration is
//! `migrations/shipping/0001_shipping.sql`). Each call is one statement, so
//! the rules of [the module](super) hold under any interleaving of any
//! number of processes without an explicit transaction:
//!
//! - schedule is `INSERT … ON CONFLICT (order_id) DO NOTHING RETURNING`;
//!   when it returns nothing, the order already has a row, which a second
//!   statement reads (it sees the conflicting row: `ON CONFLICT` waited for
//!   its transaction to commit). Concurrent schedules are group-committed:
//!   while one insert for a shard of orders runs, those that arrive wait
//!   and go together in the next (`INSERT … SELECT FROM unnest(…)`), each
//!   still answered by its own row;
//! - cancel is one upsert to `cancelled`, which inserts the tombstone when
//!   there is no row;
//! - a lookup reads by the primary key.
//!
//! Statements are sent with their parameter types and prepared once per
//! pooled connection and reused ([`Prepared`]), so each call is one round
//! trip with no parse or plan after a connection's first.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use time_kit::SharedClock;
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

use super::config::{answer_from, new_shipment_id, now};
use super::{
    ScheduleOutcome, ScheduleShipment, Shipment, ShipmentState, Shipping, ShippingConfig,
    ShippingError,
};
use crate::BoxFuture;
use crate::combiner::{Combiner, fail_each};
use crate::model::OrderId;
use crate::pg::{Migration, PgClient, PgError, PgPool, Prepared};

/// The schema the service owns.
pub const SCHEMA: &str = "shipping";

/// The schema's migrations, in order.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "0001_shipping.sql",
    sql: include_str!("../../migrations/shipping/0001_shipping.sql"),
}];

/// Schedules a group: rows for the orders that have none, returned; an
/// order with a row is left as it is.
const SCHEDULE_MANY: &str =
    "INSERT INTO shipping.shipments (order_id, id, state, address, items, created_at)
     SELECT order_id, id, 'scheduled', address, items, created_at
       FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::jsonb[], $5::timestamptz[])
            AS r(order_id, id, address, items, created_at)
      ORDER BY order_id
     ON CONFLICT (order_id) DO NOTHING
     RETURNING order_id, id, state, created_at";

/// How many schedule statements may run at once.
const SHARDS: u128 = 4;

/// The most schedules one statement writes.
const MAX_GROUP: usize = 128;

/// A shipment to insert, checked and stamped.
struct NewShipment {
    order_id: OrderId,
    id: String,
    address: serde_json::Value,
    items: serde_json::Value,
    created_at: DateTime<Utc>,
}

/// A grouped insert's answer: the shipment created now, or `None` when the
/// order already had one (the caller reads it).
type Inserted = Result<Option<Shipment>, ShippingError>;

const CANCEL: &str =
    "INSERT INTO shipping.shipments AS s (order_id, id, state, created_at, cancelled_at)
     VALUES ($1, $2, 'cancelled', $3, $3)
     ON CONFLICT (order_id) DO UPDATE
        SET state = 'cancelled', cancelled_at = COALESCE(s.cancelled_at, EXCLUDED.cancelled_at)
     RETURNING id, state, created_at";

const SHIPMENT: &str = "SELECT id, state, created_at FROM shipping.shipments WHERE order_id = $1";

/// The shipping service on PostgreSQL. Cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct PgShipping {
    pool: PgPool,
    config: ShippingConfig,
    clock: SharedClock,
    inserts: Combiner<usize, NewShipment, Inserted>,
}

impl fmt::Debug for PgShipping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgShipping")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl PgShipping {
    /// The service on `pool`, accepting what `config` allows and
    /// timestamping with `clock`. Run [`PgShipping::migrate`] once before
    /// use.
    pub fn new(pool: PgPool, config: ShippingConfig, clock: SharedClock) -> PgShipping {
        PgShipping {
            pool,
            config,
            clock,
            inserts: Combiner::new(MAX_GROUP),
        }
    }

    /// Applies the schema's migrations not yet applied (several processes
    /// may run this at once); returns how many ran.
    pub async fn migrate(&self) -> Result<usize, PgError> {
        crate::pg::migrate(&self.pool, SCHEMA, MIGRATIONS).await
    }

    /// `SELECT 1` on a pooled connection: the readiness probe.
    pub async fn ping(&self) -> Result<(), ShippingError> {
        let conn = self.pool.get().await.map_err(unavailable)?;
        conn.query_prepared_opt("SELECT 1", &[])
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// What it accepts.
    pub fn config(&self) -> &ShippingConfig {
        &self.config
    }

    async fn schedule_now(
        &self,
        request: ScheduleShipment,
    ) -> Result<ScheduleOutcome, ShippingError> {
        let order_id = request.order_id;
        let checked = self.config.check(&request);
        let conn = self.pool.get().await.map_err(unavailable)?;
        if let Err(refused) = checked {
            // A record answers before the checks (see the module's rules),
            // and a refused request writes nothing.
            return match read(&conn, order_id).await? {
                Some(existing) => answer_from(&existing),
                None => Err(refused),
            };
        }
        drop(conn);
        let shipment = NewShipment {
            order_id,
            id: new_shipment_id(self.clock.as_ref()),
            address: serde_json::to_value(&request.ship_to)
                .map_err(|e| ShippingError::Unavailable(Box::new(e)))?,
            items: serde_json::to_value(&request.items)
                .map_err(|e| ShippingError::Unavailable(Box::new(e)))?,
            created_at: now(self.clock.as_ref()),
        };
        let pool = self.pool.clone();
        let inserted = self
            .inserts
            .submit(
                (order_id.as_uuid().as_u128() % SHARDS) as usize,
                shipment,
                move |_, group| insert_shipments(pool.clone(), group),
            )
            .await
            .unwrap_or_else(|| {
                Err(ShippingError::Unavailable(
                    format!("the schedule of order {order_id} was lost; its outcome is unknown")
                        .into(),
                ))
            })?;
        if let Some(shipment) = inserted {
            tracing::debug!(%order_id, shipment_id = %shipment.id, "shipment scheduled");
            return Ok(ScheduleOutcome {
                shipment,
                created: true,
            });
        }
        let conn = self.pool.get().await.map_err(unavailable)?;
        match read(&conn, order_id).await? {
            Some(existing) => answer_from(&existing),
            // Rows are never deleted, so the row that conflicted is there.
            None => Err(ShippingError::Unavailable(
                format!("the shipment of order {order_id} conflicted but cannot be read").into(),
            )),
        }
    }

    async fn cancel_now(&self, order_id: OrderId) -> Result<Shipment, ShippingError> {
        let conn = self.pool.get().await.map_err(unavailable)?;
        let id = new_shipment_id(self.clock.as_ref());
        let at = now(self.clock.as_ref());
        let uuid = order_id.as_uuid();
        let params: [(&(dyn ToSql + Sync), Type); 3] = [
            (&uuid, Type::UUID),
            (&id, Type::TEXT),
            (&at, Type::TIMESTAMPTZ),
        ];
        let row = conn
            .query_prepared_opt(CANCEL, &params)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| {
                ShippingError::Unavailable("the cancel upsert returned no row".into())
            })?;
        let shipment = shipment_from(order_id, &row)?;
        tracing::debug!(%order_id, shipment_id = %shipment.id, "shipment cancelled");
        Ok(shipment)
    }

    async fn shipment_now(&self, order_id: OrderId) -> Result<Option<Shipment>, ShippingError> {
        let conn = self.pool.get().await.map_err(unavailable)?;
        read(&conn, order_id).await
    }
}

/// Inserts a group of shipments in one statement and answers each, in
/// order: created now, or `None` when its order already had one (also a
/// repeat of an order within the group).
async fn insert_shipments(pool: PgPool, group: Vec<NewShipment>) -> Vec<Inserted> {
    let order_ids: Vec<uuid::Uuid> = group.iter().map(|s| s.order_id.as_uuid()).collect();
    let ids: Vec<&str> = group.iter().map(|s| s.id.as_str()).collect();
    let addresses: Vec<&serde_json::Value> = group.iter().map(|s| &s.address).collect();
    let items: Vec<&serde_json::Value> = group.iter().map(|s| &s.items).collect();
    let created: Vec<DateTime<Utc>> = group.iter().map(|s| s.created_at).collect();
    let params: [(&(dyn ToSql + Sync), Type); 5] = [
        (&order_ids, Type::UUID_ARRAY),
        (&ids, Type::TEXT_ARRAY),
        (&addresses, Type::JSONB_ARRAY),
        (&items, Type::JSONB_ARRAY),
        (&created, Type::TIMESTAMPTZ_ARRAY),
    ];
    let rows = match pool.get().await {
        Err(e) => Err(unavailable(e)),
        Ok(conn) => conn
            .query_prepared(SCHEDULE_MANY, &params)
            .await
            .map_err(unavailable),
    };
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => return fail_each(group.len(), Arc::new(e), ShippingError::Unavailable),
    };
    let mut created_now: HashMap<uuid::Uuid, &Row> = HashMap::with_capacity(rows.len());
    for row in &rows {
        match row.try_get::<_, uuid::Uuid>("order_id") {
            Ok(order_id) => {
                created_now.insert(order_id, row);
            }
            Err(e) => {
                return fail_each(
                    group.len(),
                    Arc::new(unavailable(e)),
                    ShippingError::Unavailable,
                );
            }
        }
    }
    let mut answered = HashSet::with_capacity(group.len());
    group
        .iter()
        .map(|s| {
            let order_id = s.order_id.as_uuid();
            match created_now.get(&order_id) {
                Some(row) if answered.insert(order_id) => shipment_from(s.order_id, row).map(Some),
                _ => Ok(None),
            }
        })
        .collect()
}

async fn read(conn: &PgClient, order_id: OrderId) -> Result<Option<Shipment>, ShippingError> {
    let uuid = order_id.as_uuid();
    conn.query_prepared_opt(SHIPMENT, &[(&uuid, Type::UUID)])
        .await
        .map_err(unavailable)?
        .map(|row| shipment_from(order_id, &row))
        .transpose()
}

fn shipment_from(order_id: OrderId, row: &Row) -> Result<Shipment, ShippingError> {
    let state: &str = row.try_get("state").map_err(unavailable)?;
    let created_at: DateTime<Utc> = row.try_get("created_at").map_err(unavailable)?;
    Ok(Shipment {
        id: row.try_get("id").map_err(unavailable)?,
        order_id,
        // The CHECK constraint admits only known states; another one means
        // a newer schema, which this version must not guess about.
        state: state
            .parse::<ShipmentState>()
            .map_err(|e| ShippingError::Unavailable(Box::new(e)))?,
        created_at,
    })
}

fn unavailable(e: impl Into<PgError>) -> ShippingError {
    ShippingError::Unavailable(Box::new(e.into()))
}

impl Shipping for PgShipping {
    fn schedule(
        &self,
        request: ScheduleShipment,
    ) -> BoxFuture<'_, Result<Shipment, ShippingError>> {
        Box::pin(async move { self.schedule_now(request).await.map(|o| o.shipment) })
    }

    fn schedule_with_outcome(
        &self,
        request: ScheduleShipment,
    ) -> BoxFuture<'_, Result<ScheduleOutcome, ShippingError>> {
        Box::pin(self.schedule_now(request))
    }

    fn cancel(&self, order_id: OrderId) -> BoxFuture<'_, Result<Shipment, ShippingError>> {
        Box::pin(self.cancel_now(order_id))
    }

    fn shipment(
        &self,
        order_id: OrderId,
    ) -> BoxFuture<'_, Result<Option<Shipment>, ShippingError>> {
        Box::pin(self.shipment_now(order_id))
    }
}

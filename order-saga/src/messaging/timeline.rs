//! The order timeline: a consumer the order service runs, recording every
//! event of every order once, and the read side (`timeline(order_id)`)
//! the API shows.
//!
//! [`OrderTimeline`] (feature `postgres`) writes `orders.order_timeline`
//! through the [inbox](super::inbox); [`MemoryTimeline`] is the embedded
//! default. Both are [`EventHandler`]s for either bus.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use uuid::Uuid;

use super::handler::{BoxError, EventHandler, HandlerError};
use crate::BoxFuture;
use crate::events::EventEnvelope;
use crate::model::OrderId;

/// One event of an order's timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct TimelineEntry {
    /// The event's id.
    pub event_id: Uuid,
    /// Its type (`OrderCreated`, …).
    pub event_type: String,
    /// When it happened.
    pub occurred_at: DateTime<Utc>,
    /// The whole event as JSON (its [`EventEnvelope`]), kept as JSON so an
    /// entry written by a newer version still reads.
    pub payload: serde_json::Value,
}

impl TimelineEntry {
    fn from_event(event: &EventEnvelope) -> TimelineEntry {
        TimelineEntry {
            event_id: event.id,
            event_type: event.event.type_name().to_owned(),
            occurred_at: event.occurred_at,
            // An envelope always serializes (plain data, string keys).
            payload: serde_json::to_value(event).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// What reading a timeline fails with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TimelineError {
    /// The store is down.
    #[error("timeline store unavailable")]
    Unavailable(#[source] BoxError),
    /// A statement failed.
    #[error("timeline query failed")]
    Query(#[source] BoxError),
}

/// A consumer that records order timelines, and reads them back.
pub trait Timeline: EventHandler {
    /// The events of `order`, oldest first (by `occurred_at`, then by the
    /// order they were recorded in). Empty for an unknown order.
    fn timeline(&self, order: OrderId) -> BoxFuture<'_, Result<Vec<TimelineEntry>, TimelineError>>;
}

/// The in-memory timeline: an event id set as its inbox, and each order's
/// entries.
#[derive(Debug, Default)]
pub struct MemoryTimeline {
    state: Mutex<MemoryTimelineState>,
}

#[derive(Debug, Default)]
struct MemoryTimelineState {
    seen: HashSet<Uuid>,
    orders: HashMap<OrderId, Vec<TimelineEntry>>,
}

impl MemoryTimeline {
    /// An empty timeline.
    pub fn new() -> MemoryTimeline {
        MemoryTimeline::default()
    }

    /// Records `event` unless it was recorded before; returns whether it
    /// was new.
    pub fn record(&self, event: &EventEnvelope) -> bool {
        let mut state = self.state.lock();
        if !state.seen.insert(event.id) {
            return false;
        }
        let entries = state.orders.entry(event.order_id).or_default();
        let entry = TimelineEntry::from_event(event);
        // Stable: equal instants keep their recording order.
        let at = entries.partition_point(|e| e.occurred_at <= entry.occurred_at);
        entries.insert(at, entry);
        true
    }

    /// The events of `order`, oldest first.
    pub fn entries(&self, order: OrderId) -> Vec<TimelineEntry> {
        self.state
            .lock()
            .orders
            .get(&order)
            .cloned()
            .unwrap_or_default()
    }
}

impl EventHandler for MemoryTimeline {
    fn handle<'a>(&'a self, event: &'a EventEnvelope) -> BoxFuture<'a, Result<(), HandlerError>> {
        self.record(event);
        Box::pin(std::future::ready(Ok(())))
    }
}

impl Timeline for MemoryTimeline {
    fn timeline(&self, order: OrderId) -> BoxFuture<'_, Result<Vec<TimelineEntry>, TimelineError>> {
        Box::pin(std::future::ready(Ok(self.entries(order))))
    }
}

#[cfg(feature = "postgres")]
pub use postgres::OrderTimeline;

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use crate::combiner::Combiner;
    use crate::messaging::inbox::is_transient;
    use crate::pg::{PgPool, Prepared};
    use std::error::Error as _;
    use tokio_postgres::types::Type;

    /// The PostgreSQL timeline: `orders.order_timeline`, written once per
    /// event through the inbox (consumer name
    /// [`OrderTimeline::DEFAULT_CONSUMER`] unless set).
    ///
    /// Records are group-committed: while one statement for a shard of
    /// orders runs, the events of that shard that arrive wait and are
    /// written together by the next (each still claimed in the inbox on its
    /// own), so a busy consumer costs a few commits, not one per event.
    #[derive(Clone)]
    pub struct OrderTimeline {
        pool: PgPool,
        consumer: String,
        writes: Combiner<usize, TimelineRow, Result<bool, HandlerError>>,
    }

    /// An entry to record, with its order.
    struct TimelineRow {
        order_id: Uuid,
        entry: TimelineEntry,
    }

    /// How many statements recording events may run at once.
    const SHARDS: u128 = 2;

    /// The most events one statement records.
    const MAX_GROUP: usize = 128;

    impl std::fmt::Debug for OrderTimeline {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("OrderTimeline")
                .field("consumer", &self.consumer)
                .finish_non_exhaustive()
        }
    }

    fn handler_error(e: tokio_postgres::Error) -> HandlerError {
        if is_transient(&e) {
            HandlerError::Unavailable(Box::new(e))
        } else {
            HandlerError::Failed(Box::new(e))
        }
    }

    fn pool_handler_error(e: bb8::RunError<tokio_postgres::Error>) -> HandlerError {
        match e {
            bb8::RunError::User(e) => handler_error(e),
            bb8::RunError::TimedOut => {
                HandlerError::unavailable("no PostgreSQL connection in time")
            }
        }
    }

    /// Records `rows` in one statement, each claimed in the inbox as
    /// [`inbox::process_once`](crate::messaging::inbox::process_once)
    /// would; returns whether each was new (a repeat within the group is
    /// not). A statement refused for its data is retried row by row, so
    /// one bad event fails alone.
    async fn record_rows(
        pool: PgPool,
        consumer: String,
        rows: Vec<TimelineRow>,
    ) -> Vec<Result<bool, HandlerError>> {
        match insert_rows(&pool, &consumer, &rows).await {
            Ok(new) => {
                let mut seen = HashSet::new();
                rows.iter()
                    .map(|row| {
                        let id = row.entry.event_id;
                        Ok(new.contains(&id) && seen.insert(id))
                    })
                    .collect()
            }
            Err(e) if rows.len() > 1 && matches!(e, HandlerError::Failed(_)) => {
                let mut results = Vec::with_capacity(rows.len());
                for row in rows {
                    let id = row.entry.event_id;
                    results.push(
                        insert_rows(&pool, &consumer, std::slice::from_ref(&row))
                            .await
                            .map(|new| new.contains(&id)),
                    );
                }
                results
            }
            Err(e) => {
                let message = format!(
                    "{e}: {}",
                    e.source().map(|s| s.to_string()).unwrap_or_default()
                );
                rows.iter()
                    .map(|_| {
                        Err(match e {
                            HandlerError::Failed(_) => HandlerError::failed(message.clone()),
                            HandlerError::Unavailable(_) => {
                                HandlerError::unavailable(message.clone())
                            }
                        })
                    })
                    .collect()
            }
        }
    }

    /// The one statement of [`record_rows`]: returns the event ids it
    /// claimed.
    async fn insert_rows(
        pool: &PgPool,
        consumer: &str,
        rows: &[TimelineRow],
    ) -> Result<HashSet<Uuid>, HandlerError> {
        let event_ids: Vec<Uuid> = rows.iter().map(|r| r.entry.event_id).collect();
        let order_ids: Vec<Uuid> = rows.iter().map(|r| r.order_id).collect();
        let types: Vec<&str> = rows.iter().map(|r| r.entry.event_type.as_str()).collect();
        let occurred: Vec<DateTime<Utc>> = rows.iter().map(|r| r.entry.occurred_at).collect();
        let payloads: Vec<&serde_json::Value> = rows.iter().map(|r| &r.entry.payload).collect();
        let conn = pool.get().await.map_err(pool_handler_error)?;
        let claimed = conn
            .query_prepared(
                "WITH input AS (
                    SELECT * FROM unnest($2::uuid[], $3::uuid[], $4::text[], $5::timestamptz[], $6::jsonb[])
                        WITH ORDINALITY AS i(event_id, order_id, event_type, occurred_at, payload, n)
                 ), first AS (
                    INSERT INTO orders.inbox (consumer, event_id)
                    SELECT $1, event_id FROM input ORDER BY event_id
                    ON CONFLICT (consumer, event_id) DO NOTHING
                    RETURNING event_id
                 ), entry AS (
                    INSERT INTO orders.order_timeline
                        (order_id, event_id, event_type, occurred_at, payload)
                    SELECT i.order_id, i.event_id, i.event_type, i.occurred_at, i.payload
                    FROM input i JOIN first f ON f.event_id = i.event_id
                    ORDER BY i.n
                    ON CONFLICT (order_id, event_id) DO NOTHING
                 )
                 SELECT event_id FROM first",
                &[
                    (&consumer, Type::TEXT),
                    (&event_ids, Type::UUID_ARRAY),
                    (&order_ids, Type::UUID_ARRAY),
                    (&types, Type::TEXT_ARRAY),
                    (&occurred, Type::TIMESTAMPTZ_ARRAY),
                    (&payloads, Type::JSONB_ARRAY),
                ],
            )
            .await
            .map_err(handler_error)?;
        claimed
            .iter()
            .map(|row| row.try_get(0).map_err(handler_error))
            .collect()
    }

    impl OrderTimeline {
        /// The inbox consumer name used unless [`OrderTimeline::with_consumer`]
        /// sets another.
        pub const DEFAULT_CONSUMER: &'static str = "order-timeline";

        /// A timeline on `pool` (schema `orders`, migrated with
        /// [`OUTBOX_MIGRATION`](crate::messaging::outbox::OUTBOX_MIGRATION)).
        pub fn new(pool: PgPool) -> OrderTimeline {
            OrderTimeline {
                pool,
                consumer: Self::DEFAULT_CONSUMER.to_owned(),
                writes: Combiner::new(MAX_GROUP),
            }
        }

        /// Uses `consumer` as the inbox name (one per independent consumer
        /// of the same events).
        pub fn with_consumer(mut self, consumer: impl Into<String>) -> OrderTimeline {
            self.consumer = consumer.into();
            self
        }

        /// Records `event` once; returns whether it was new.
        pub async fn record(&self, event: &EventEnvelope) -> Result<bool, HandlerError> {
            let order_id = event.order_id.as_uuid();
            let row = TimelineRow {
                order_id,
                entry: TimelineEntry::from_event(event),
            };
            let (pool, consumer) = (self.pool.clone(), self.consumer.clone());
            self.writes
                .submit(
                    (order_id.as_u128() % SHARDS) as usize,
                    row,
                    move |_, rows| record_rows(pool.clone(), consumer.clone(), rows),
                )
                .await
                .unwrap_or_else(|| {
                    Err(HandlerError::unavailable(
                        "the timeline write was lost; its outcome is unknown",
                    ))
                })
        }

        /// The events of `order`, oldest first.
        pub async fn entries(&self, order: OrderId) -> Result<Vec<TimelineEntry>, TimelineError> {
            let conn = self.pool.get().await.map_err(|e| match e {
                bb8::RunError::User(e) => TimelineError::Unavailable(Box::new(e)),
                bb8::RunError::TimedOut => {
                    TimelineError::Unavailable("no PostgreSQL connection in time".into())
                }
            })?;
            let rows = conn
                .query(
                    "SELECT event_id, event_type, occurred_at, payload
                     FROM orders.order_timeline WHERE order_id = $1
                     ORDER BY occurred_at, position",
                    &[&order.as_uuid()],
                )
                .await
                .map_err(|e| {
                    if is_transient(&e) {
                        TimelineError::Unavailable(Box::new(e))
                    } else {
                        TimelineError::Query(Box::new(e))
                    }
                })?;
            Ok(rows
                .iter()
                .map(|row| TimelineEntry {
                    event_id: row.get(0),
                    event_type: row.get(1),
                    occurred_at: row.get(2),
                    payload: row.get(3),
                })
                .collect())
        }
    }

    impl EventHandler for OrderTimeline {
        fn handle<'a>(
            &'a self,
            event: &'a EventEnvelope,
        ) -> BoxFuture<'a, Result<(), HandlerError>> {
            Box::pin(async move { self.record(event).await.map(|_| ()) })
        }
    }

    impl Timeline for OrderTimeline {
        fn timeline(
            &self,
            order: OrderId,
        ) -> BoxFuture<'_, Result<Vec<TimelineEntry>, TimelineError>> {
            Box::pin(self.entries(order))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Event;
    use crate::model::CancelReason;

    #[test]
    fn memory_timeline_records_once_in_time_order() {
        let timeline = MemoryTimeline::new();
        let order = OrderId::new_at(1_800_000_000_000);
        let at = |s| DateTime::from_timestamp(s, 0).unwrap();
        let late = EventEnvelope::new(
            order,
            at(1_800_000_010),
            Event::OrderCancelled {
                reason: CancelReason::PaymentDeclined,
            },
        );
        let early = EventEnvelope::new(
            order,
            at(1_800_000_000),
            Event::CompensationStarted {
                reason: CancelReason::PaymentDeclined,
            },
        );
        assert!(timeline.record(&late));
        assert!(timeline.record(&early));
        assert!(!timeline.record(&late), "a redelivery changes nothing");
        let entries = timeline.entries(order);
        let types: Vec<_> = entries.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, ["CompensationStarted", "OrderCancelled"]);
        assert_eq!(entries[1].payload["reason"], "payment_declined");
        assert!(timeline.entries(OrderId::new_at(1)).is_empty());
    }
}

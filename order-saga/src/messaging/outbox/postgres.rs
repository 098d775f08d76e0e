//! The PostgreSQL outbox: `orders.outbox`, written by [`append`] inside the
//! order store's transaction and drained through [`PgOutboxSource`].

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, GenericClient, NoTls, Statement};

use crate::pg::{PgTransaction, Prepared};

use super::{OutboxError, OutboxRecord, OutboxSource};
use crate::BoxFuture;
use crate::events::EventEnvelope;
use crate::pg::Migration;

/// The migration that creates `orders.outbox`, `orders.inbox` and
/// `orders.order_timeline`: version 2 of the `orders` schema, applied by
/// [`crate::pg::migrate`] after the order store's version 1.
pub const OUTBOX_MIGRATION: Migration = Migration {
    version: 2,
    name: "0002_outbox_inbox.sql",
    sql: include_str!("../../../migrations/orders/0002_outbox_inbox.sql"),
};

/// The channel [`append`] notifies at commit, and the relay listens on.
pub const NOTIFY_CHANNEL: &str = "orders_outbox";

/// The advisory lock (`pg_try_advisory_lock`) the leading relay holds for
/// as long as its session lives.
pub const RELAY_LOCK_KEY: i64 = 0x6f72_6465_725f_6f62; // "order_ob"

const INSERT: &str = "INSERT INTO orders.outbox (event_id, order_id, event_type, payload)
     SELECT e.event_id, e.order_id, e.event_type, e.payload
     FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[])
          WITH ORDINALITY AS e(event_id, order_id, event_type, payload, n)
     ORDER BY e.n";

/// Appends `events`, in order, to the outbox, in the caller's transaction,
/// and notifies the relay (the notification is delivered at commit, and
/// not at all on rollback).
///
/// Call it in the same transaction as the state change the events describe,
/// **after** the statement that locks the order's row: transactions of one
/// order then take their `seq`s in commit order, which is the order the
/// relay publishes them in. Nothing is written if it fails (the caller's
/// transaction is aborted, as for any failed statement). One round trip.
pub async fn append(
    tx: &PgTransaction<'_>,
    events: &[EventEnvelope],
) -> Result<(), tokio_postgres::Error> {
    if events.is_empty() {
        return Ok(());
    }
    // A data-modifying CTE runs whether or not it is referenced; several
    // appends in one transaction notify once (PostgreSQL folds identical
    // notifications).
    let sql = format!("WITH ins AS ({INSERT}) SELECT pg_notify('{NOTIFY_CHANNEL}', '')");
    insert(tx, &sql, events).await
}

/// [`append`] without the notification, for write-heavy deployments:
/// `NOTIFY` serializes committing transactions on a server-wide lock, and a
/// busy relay does not need waking. The relay then finds the events within
/// its poll interval.
pub async fn append_without_notify(
    tx: &PgTransaction<'_>,
    events: &[EventEnvelope],
) -> Result<(), tokio_postgres::Error> {
    if events.is_empty() {
        return Ok(());
    }
    insert(tx, INSERT, events).await
}

/// The outbox columns of `events` — event ids, order ids, types, payloads
/// — as the arrays an insert unnests (`uuid[]`, `uuid[]`, `text[]`,
/// `jsonb[]`), in order.
pub(crate) type Columns = (
    Vec<uuid::Uuid>,
    Vec<uuid::Uuid>,
    Vec<&'static str>,
    Vec<serde_json::Value>,
);

/// See [`Columns`].
pub(crate) fn columns(events: &[EventEnvelope]) -> Columns {
    let mut ids = Vec::with_capacity(events.len());
    let mut orders = Vec::with_capacity(events.len());
    let mut types = Vec::with_capacity(events.len());
    let mut payloads = Vec::with_capacity(events.len());
    for event in events {
        ids.push(event.id);
        orders.push(event.order_id.as_uuid());
        types.push(event.event.type_name());
        // An envelope always serializes (plain data, string keys).
        payloads.push(serde_json::to_value(event).unwrap_or(serde_json::Value::Null));
    }
    (ids, orders, types, payloads)
}

async fn insert(
    tx: &PgTransaction<'_>,
    sql: &str,
    events: &[EventEnvelope],
) -> Result<(), tokio_postgres::Error> {
    let (ids, orders, types, payloads) = columns(events);
    let params: [(&(dyn ToSql + Sync), Type); 4] = [
        (&ids, Type::UUID_ARRAY),
        (&orders, Type::UUID_ARRAY),
        (&types, Type::TEXT_ARRAY),
        (&payloads, Type::JSONB_ARRAY),
    ];
    tx.execute_prepared(sql, &params).await.map(|_| ())
}

/// How many events wait in the outbox (for health checks and tests).
pub async fn unpublished_count(client: &impl GenericClient) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*) FROM orders.outbox WHERE published_at IS NULL",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// A relay's view of the PostgreSQL outbox, on a dedicated connection.
///
/// The connection is the relay's own (not the pool's) because it carries
/// the session state the relay depends on: `LISTEN` on
/// [`NOTIFY_CHANNEL`], and the advisory lock [`RELAY_LOCK_KEY`] that makes
/// this relay the only one publishing. Every read and write of the leader
/// goes through that same connection, so a relay whose connection died
/// (and with it, its lock) cannot keep publishing beside the new leader.
/// The connection is opened lazily and reopened after a failure, so
/// constructing a source never fails on a server that is down.
pub struct PgOutboxSource {
    config: tokio_postgres::Config,
    query_timeout: Duration,
    conn: Option<Conn>,
    leader: bool,
    appended: Arc<Notify>,
}

struct Conn {
    client: Client,
    driver: JoinHandle<()>,
    fetch: Statement,
    mark: Statement,
    lag: Statement,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Closing the socket ends the session, which releases the lock at
        // once instead of when the client's last clone goes.
        self.driver.abort();
    }
}

impl std::fmt::Debug for PgOutboxSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOutboxSource")
            .field("connected", &self.conn.is_some())
            .field("leader", &self.leader)
            .field("query_timeout", &self.query_timeout)
            .finish_non_exhaustive()
    }
}

impl PgOutboxSource {
    /// A source for the database at `config`. Each statement is bounded by
    /// 10 s (see [`PgOutboxSource::with_query_timeout`]).
    pub fn new(config: tokio_postgres::Config) -> PgOutboxSource {
        PgOutboxSource {
            config,
            query_timeout: Duration::from_secs(10),
            conn: None,
            leader: false,
            appended: Arc::new(Notify::new()),
        }
    }

    /// A source for the database at `url`
    /// (`postgres://user@host:port/db`); the connect timeout defaults to
    /// 2 s when the URL does not set one.
    pub fn from_url(url: &str) -> Result<PgOutboxSource, OutboxError> {
        let mut config =
            tokio_postgres::Config::from_str(url).map_err(|e| OutboxError::Query(Box::new(e)))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(2));
        }
        Ok(PgOutboxSource::new(config))
    }

    /// Bounds each statement (and the connect) by `timeout`; one that
    /// takes longer drops the connection, which also gives up the lead.
    pub fn with_query_timeout(mut self, timeout: Duration) -> PgOutboxSource {
        self.query_timeout = timeout;
        self
    }

    /// Whether this source holds the relay lock (as of its last statement).
    pub fn is_leader(&self) -> bool {
        self.leader
    }

    async fn connect(&mut self) -> Result<(), OutboxError> {
        if self.conn.as_ref().is_some_and(|c| !c.client.is_closed()) {
            return Ok(());
        }
        self.drop_connection();
        let (client, mut connection) = self
            .config
            .connect(NoTls)
            .await
            .map_err(|e| OutboxError::Unavailable(Box::new(e)))?;
        let appended = Arc::clone(&self.appended);
        let driver = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(_))) => appended.notify_one(),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "outbox relay connection failed");
                        break;
                    }
                    None => break,
                }
            }
        });
        let prepared = async {
            client
                .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
                .await?;
            let fetch = client
                .prepare(
                    "SELECT seq, payload FROM orders.outbox
                     WHERE published_at IS NULL ORDER BY seq LIMIT $1",
                )
                .await?;
            let mark = client
                .prepare(
                    "UPDATE orders.outbox SET published_at = now()
                     WHERE seq = ANY($1) AND published_at IS NULL",
                )
                .await?;
            let lag = client
                .prepare(
                    "SELECT extract(epoch FROM now() - created_at)::float8
                     FROM orders.outbox WHERE published_at IS NULL ORDER BY seq LIMIT 1",
                )
                .await?;
            Ok::<_, tokio_postgres::Error>((fetch, mark, lag))
        }
        .await;
        match prepared {
            Ok((fetch, mark, lag)) => {
                self.conn = Some(Conn {
                    client,
                    driver,
                    fetch,
                    mark,
                    lag,
                });
                // Something may have been appended while no one listened.
                self.appended.notify_one();
                Ok(())
            }
            Err(e) => {
                driver.abort();
                Err(self.classify(e))
            }
        }
    }

    fn drop_connection(&mut self) {
        if self.leader {
            tracing::warn!("outbox relay lost its connection and with it the lead");
        }
        self.conn = None;
        self.leader = false;
    }

    /// Maps an error; one that says the session is gone drops the
    /// connection (and the lead with it).
    fn classify(&mut self, e: tokio_postgres::Error) -> OutboxError {
        let connection_level = e.is_closed()
            || e.code().is_none()
            || e.code().is_some_and(|c| {
                let class = &c.code()[..2];
                class == "08" || class == "57" || class == "53"
            });
        if connection_level {
            self.drop_connection();
            OutboxError::Unavailable(Box::new(e))
        } else {
            OutboxError::Query(Box::new(e))
        }
    }

    fn timed_out(&mut self) -> OutboxError {
        self.drop_connection();
        OutboxError::Unavailable(
            format!("outbox statement exceeded {:?}", self.query_timeout).into(),
        )
    }

    /// Opens the connection if needed, within the query timeout.
    async fn ready(&mut self) -> Result<&Conn, OutboxError> {
        match tokio::time::timeout(self.query_timeout, self.connect()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(self.timed_out()),
        }
        self.conn
            .as_ref()
            .ok_or_else(|| OutboxError::Unavailable("no outbox connection".into()))
    }

    /// Maps the outcome of a statement run under the query timeout.
    fn finish<T>(
        &mut self,
        outcome: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
    ) -> Result<T, OutboxError> {
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.classify(e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    /// The connection, if this source leads on it. Checked after
    /// (re)connecting: a new session does not hold the lock, so a relay
    /// whose connection was replaced must take the lead again before it
    /// reads or marks anything.
    async fn leader_conn(&mut self) -> Result<&Conn, OutboxError> {
        self.ready().await?;
        match self.conn.as_ref() {
            Some(conn) if self.leader => Ok(conn),
            _ => Err(OutboxError::Unavailable(
                "this relay does not lead the outbox".into(),
            )),
        }
    }
}

impl OutboxSource for PgOutboxSource {
    fn acquire_leadership(&mut self) -> BoxFuture<'_, Result<bool, OutboxError>> {
        Box::pin(async move {
            if self.leader && self.conn.as_ref().is_some_and(|c| !c.client.is_closed()) {
                return Ok(true);
            }
            // Not leading (or the session that led is gone): take the lock
            // if it is free. `pg_try_advisory_lock` is re-entrant, so it is
            // only called while not holding it.
            let timeout = self.query_timeout;
            let conn = self.ready().await?;
            let outcome = tokio::time::timeout(
                timeout,
                conn.client
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&RELAY_LOCK_KEY]),
            )
            .await;
            let lead: bool = self.finish(outcome)?.get(0);
            if lead {
                tracing::info!("outbox relay took the lead");
            }
            self.leader = lead;
            Ok(lead)
        })
    }

    fn release_leadership(&mut self) -> BoxFuture<'_, Result<(), OutboxError>> {
        Box::pin(async move {
            if !self.leader {
                return Ok(());
            }
            self.leader = false;
            let timeout = self.query_timeout;
            let result = match self.conn.as_ref() {
                Some(conn) => {
                    let outcome = tokio::time::timeout(
                        timeout,
                        conn.client
                            .execute("SELECT pg_advisory_unlock($1)", &[&RELAY_LOCK_KEY]),
                    )
                    .await;
                    self.finish(outcome).map(|_| ())
                }
                None => Ok(()),
            };
            if result.is_err() {
                // Ending the session releases the lock as surely.
                self.conn = None;
            }
            result
        })
    }

    fn fetch_unpublished(
        &mut self,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<OutboxRecord>, OutboxError>> {
        Box::pin(async move {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let timeout = self.query_timeout;
            let conn = self.leader_conn().await?;
            let outcome =
                tokio::time::timeout(timeout, conn.client.query(&conn.fetch, &[&limit])).await;
            let rows = self.finish(outcome)?;
            rows.into_iter()
                .map(|row| {
                    let seq: i64 = row.get(0);
                    let payload: serde_json::Value = row.get(1);
                    serde_json::from_value(payload)
                        .map(|event| OutboxRecord { seq, event })
                        .map_err(|source| OutboxError::Malformed { seq, source })
                })
                .collect()
        })
    }

    fn mark_published<'a>(&'a mut self, seqs: &'a [i64]) -> BoxFuture<'a, Result<(), OutboxError>> {
        Box::pin(async move {
            let timeout = self.query_timeout;
            let conn = self.leader_conn().await?;
            let outcome =
                tokio::time::timeout(timeout, conn.client.execute(&conn.mark, &[&seqs])).await;
            self.finish(outcome).map(|_| ())
        })
    }

    fn lag(&mut self) -> BoxFuture<'_, Result<Option<Duration>, OutboxError>> {
        Box::pin(async move {
            let timeout = self.query_timeout;
            let conn = self.ready().await?;
            let outcome =
                tokio::time::timeout(timeout, conn.client.query_opt(&conn.lag, &[])).await;
            let secs = self.finish(outcome)?.map(|row| row.get::<_, f64>(0));
            Ok(secs.map(|s| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::ZERO)))
        })
    }

    fn purge_published(&mut self, older_than: Duration) -> BoxFuture<'_, Result<u64, OutboxError>> {
        Box::pin(async move {
            let secs = older_than.as_secs_f64();
            let timeout = self.query_timeout;
            // Bounded batches keep each statement (and its locks) short.
            let mut purged = 0;
            loop {
                let conn = self.leader_conn().await?;
                let outcome = tokio::time::timeout(
                    timeout,
                    conn.client.execute(
                        "DELETE FROM orders.outbox WHERE seq IN (
                             SELECT seq FROM orders.outbox
                             WHERE published_at IS NOT NULL
                               AND published_at < now() - make_interval(secs => $1)
                             LIMIT 5000)",
                        &[&secs],
                    ),
                )
                .await;
                let n = self.finish(outcome)?;
                purged += n;
                if n < 5000 {
                    return Ok(purged);
                }
            }
        })
    }

    fn wait_for_append(&mut self, timeout: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = tokio::time::timeout(timeout, self.appended.notified()).await;
        })
    }
}

//! The PostgreSQL store (tokio-postgres, on the suite's `pg_kit` pool):
//! plain-SQL migrations, one transaction per batch, per-user sequence
//! numbers under row locks. The statements of the send path run prepared,
//! from each connection's cache (`pg_kit::Prepared`): parsed and planned
//! once per connection instead of for every batch.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use pg_kit::{PgPool, PgTransaction, PoolConfig, Prepared};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, Json, Type};
use uuid::Uuid;

use super::{
    Append, Appended, Audience, BoxFuture, GroupEntry, GroupItem, HistoryItem, Membership,
    Recipient, Store, StoreError,
};
use crate::notification::{Delivery, Notification};

/// The migrations, in order. Each runs once, in a transaction, under an
/// advisory lock so several nodes can start at the same time.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/0001_init.sql")),
    (2, include_str!("../../migrations/0002_c_collation.sql")),
    (3, include_str!("../../migrations/0003_group_streams.sql")),
    (
        4,
        include_str!("../../migrations/0004_group_member_counts.sql"),
    ),
];

/// Advisory-lock key for migrations (`notify-hub` in ASCII, truncated).
const MIGRATION_LOCK: i64 = 0x6e6f_7469_6679_6875;

/// Most joins written in one statement by the membership writer.
const MAX_JOIN_BATCH: usize = 512;

/// A [`Store`] on PostgreSQL.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Group joins go through one writer that puts every join waiting at the
    /// time into one statement (group commit), so a reconnect storm of
    /// thousands of clients with a `groups` claim costs a few commits, not
    /// one each. It ends when the last clone of the store is dropped.
    joins: mpsc::Sender<JoinJob>,
}

struct JoinJob {
    group: String,
    user: String,
    reply: oneshot::Sender<Result<Option<u64>, StoreError>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("pool", &self.pool.state())
            .finish()
    }
}

/// Maps a driver or pool error of `operation` to [`StoreError::Unavailable`],
/// keeping it as the source (tokio-postgres shows only "db error" at the
/// top; PostgreSQL's message is the source below it).
fn unavailable<E>(operation: &'static str) -> impl FnOnce(E) -> StoreError
where
    E: std::error::Error + Send + Sync + 'static,
{
    move |e| StoreError::unavailable(operation, e)
}

/// A column that could not be decoded: the schema or the data is not what
/// this code expects.
#[derive(Debug)]
struct Decode {
    what: &'static str,
    source: tokio_postgres::Error,
}

impl From<Decode> for StoreError {
    fn from(e: Decode) -> Self {
        StoreError::corrupt(e.what, Some(Arc::new(e.source)))
    }
}

/// Column `idx` of `row`. `Row::get` panics on a type mismatch; a store
/// must not panic on what the database hands back, so a mismatch (schema
/// drift, a hand-edited row) is a `Corrupt` error with the decoding error
/// as its source.
fn column<'a, T: FromSql<'a>>(row: &'a Row, idx: usize, what: &'static str) -> Result<T, Decode> {
    row.try_get(idx).map_err(|source| Decode { what, source })
}

/// A stored sequence number: `int8` in the table, never negative.
fn seq_of(value: i64, what: &'static str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|e| StoreError::corrupt(what, Some(Arc::new(e))))
}

impl PgStore {
    /// Connects a pool of up to `pool_size` connections to `url`
    /// (`postgres://user@host:port/db`). Checking out a connection waits at
    /// most 2 s, so an outage surfaces as an error instead of a hang.
    ///
    /// Also spawns the task that batches group joins (see
    /// [`join_group`](Store::join_group)) on the current tokio runtime; it
    /// ends when the last clone of the store is dropped.
    pub async fn connect(url: &str, pool_size: u32) -> Result<PgStore, StoreError> {
        let config = PoolConfig {
            max_size: pool_size.max(1),
            connection_timeout: Duration::from_secs(2),
            // A connection the server has closed (a restart, a failover) is
            // replaced at checkout rather than failing a batch of sends:
            // an append is not retried after a lost session, since its
            // commit may have happened.
            test_on_check_out: true,
            ..PoolConfig::default()
        };
        let pool = pg_kit::pool(url, &config).map_err(unavailable("connect"))?;
        let (joins, jobs) = mpsc::channel(4 * MAX_JOIN_BATCH);
        tokio::spawn(join_loop(pool.clone(), jobs));
        Ok(PgStore { pool, joins })
    }

    /// Applies the migrations that have not run yet. Returns how many ran.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        let mut conn = self.pool.get().await.map_err(unavailable("migrate"))?;
        let tx = conn.transaction().await.map_err(unavailable("migrate"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(unavailable("migrate"))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS notify_schema_migrations (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(unavailable("migrate"))?;
        let done: Vec<i32> = tx
            .query("SELECT version FROM notify_schema_migrations", &[])
            .await
            .map_err(unavailable("migrate"))?
            .iter()
            .map(|r| column(r, 0, "notify_schema_migrations.version"))
            .collect::<Result<_, _>>()?;
        let mut ran = 0;
        for (version, sql) in MIGRATIONS {
            if done.contains(version) {
                continue;
            }
            tx.batch_execute(sql)
                .await
                .map_err(unavailable("migrate"))?;
            tx.execute(
                "INSERT INTO notify_schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(unavailable("migrate"))?;
            tracing::info!(version, "notify-hub migration applied");
            ran += 1;
        }
        tx.commit().await.map_err(unavailable("migrate"))?;
        Ok(ran)
    }

    async fn append_once(&self, batch: &[Append]) -> Result<Vec<Appended>, WriteError> {
        let mut conn = self.pool.get().await?;
        let tx = conn.begin().await?;
        // The batch's groups' stream heads, created if new and locked in
        // group order (a stable lock order across nodes, taken before any
        // user's seq row), before the members are read: a leave or a join
        // holds the same row, so the members read here are exactly those
        // whose interval covers the offset this send gets.
        let mut groups: Vec<&str> = batch
            .iter()
            .filter_map(|a| match &a.audience {
                Audience::Group(g) => Some(g.as_str()),
                Audience::Users(_) => None,
            })
            .collect();
        groups.sort_unstable();
        groups.dedup();
        let mut members: HashMap<String, Vec<String>> = HashMap::new();
        let mut sizes: HashMap<String, i64> = HashMap::new();
        if !groups.is_empty() {
            // The member counts come with the locks: a group whose sends
            // are not fanned out needs nothing else.
            sizes = lock_heads(&tx, &groups).await?;
            // The members of a group whose sends are fanned out, read first
            // so an oversized group's send writes nothing at all.
            let mut fanned: Vec<&str> = batch
                .iter()
                .filter_map(|a| match &a.audience {
                    Audience::Group(g) if a.fan_out => Some(g.as_str()),
                    _ => None,
                })
                .collect();
            fanned.sort_unstable();
            fanned.dedup();
            // One row per group: decoding one array is far cheaper than
            // 10,000 rows for a large group.
            if !fanned.is_empty() {
                for row in tx
                    .query_prepared(
                        "SELECT group_id, array_agg(user_id ORDER BY user_id)
                         FROM notify_group_members
                         WHERE group_id = ANY($1) GROUP BY group_id",
                        &[(&fanned, Type::TEXT_ARRAY)],
                    )
                    .await?
                {
                    let list: Vec<String> = column(&row, 1, "notify_group_members.user_id array")?;
                    let group: String = column(&row, 0, "notify_group_members.group_id")?;
                    members.insert(group, list);
                }
            }
        }
        let too_big: Vec<bool> = batch
            .iter()
            .map(|a| match &a.audience {
                Audience::Group(g) if a.fan_out => {
                    members.get(g).is_some_and(|m| m.len() > a.max_recipients)
                }
                _ => false,
            })
            .collect();

        let accepted = || {
            batch
                .iter()
                .zip(&too_big)
                .filter(|(_, big)| !**big)
                .map(|(a, _)| a)
        };
        let ids: Vec<Uuid> = accepted()
            .map(|a| a.notification.id.unwrap_or_default())
            .collect();
        let bodies: Vec<Json<&Notification>> = accepted().map(|a| Json(&*a.notification)).collect();
        let times: Vec<DateTime<Utc>> = accepted()
            .map(|a| a.notification.timestamp.unwrap_or_default())
            .collect();
        // An id that is already stored (a retried send) is skipped, not an
        // error for the whole batch; within a batch the first one wins.
        let mut inserted: HashSet<Uuid> = tx
            .query_prepared(
                "INSERT INTO notify_notifications (id, body, created_at)
                 SELECT * FROM unnest($1::uuid[], $2::jsonb[], $3::timestamptz[])
                 ON CONFLICT (id) DO NOTHING RETURNING id",
                &[
                    (&ids, Type::UUID_ARRAY),
                    (&bodies, Type::JSONB_ARRAY),
                    (&times, Type::TIMESTAMPTZ_ARRAY),
                ],
            )
            .await?
            .iter()
            .map(|r| column(r, 0, "notify_notifications.id"))
            .collect::<Result<_, _>>()?;
        let ids: Vec<Uuid> = batch
            .iter()
            .map(|a| a.notification.id.unwrap_or_default())
            .collect();
        let stored: Vec<bool> = ids
            .iter()
            .zip(&too_big)
            .map(|(id, big)| !big && inserted.remove(id))
            .collect();

        let audiences: Vec<&[String]> = batch
            .iter()
            .zip(&stored)
            .map(|(a, stored)| match &a.audience {
                _ if !stored => &[][..],
                Audience::Users(users) => users.as_slice(),
                Audience::Group(_) if !a.fan_out => &[][..],
                Audience::Group(g) => members.get(g).map_or(&[][..], Vec::as_slice),
            })
            .collect();

        // One item per stored broadcast in its group's stream, at the next
        // offsets of the heads locked above.
        let (mut item_groups, mut item_ids) = (Vec::new(), Vec::new());
        for ((append, id), stored) in batch.iter().zip(&ids).zip(&stored) {
            if let (Audience::Group(g), true) = (&append.audience, *stored) {
                item_groups.push(g.as_str());
                item_ids.push(*id);
            }
        }
        let mut offsets: HashMap<Uuid, i64> = HashMap::with_capacity(item_ids.len());
        if !item_groups.is_empty() {
            for row in tx
                .query_prepared(
                    "WITH t AS (
                     SELECT g, id, row_number() OVER (PARTITION BY g ORDER BY i) AS k
                     FROM unnest($1::text[], $2::uuid[]) WITH ORDINALITY AS t(g, id, i)),
                 n AS (SELECT g, count(*) AS n FROM t GROUP BY g),
                 h AS (UPDATE notify_group_heads h SET last_offset = h.last_offset + n.n
                       FROM n WHERE h.group_id = n.g
                       RETURNING h.group_id, h.last_offset - n.n AS before)
                 INSERT INTO notify_group_items (group_id, group_offset, notification_id)
                 SELECT t.g, h.before + t.k, t.id FROM t JOIN h ON h.group_id = t.g
                 RETURNING notification_id, group_offset",
                    &[
                        (&item_groups, Type::TEXT_ARRAY),
                        (&item_ids, Type::UUID_ARRAY),
                    ],
                )
                .await?
            {
                offsets.insert(
                    column(&row, 0, "notify_group_items.notification_id")?,
                    column(&row, 1, "notify_group_items.group_offset")?,
                );
            }
        }

        // Reserve each user's new seqs with one upsert, in user order (a
        // stable lock order across concurrent writers on other nodes).
        let mut counts: HashMap<&str, i64> = HashMap::new();
        for users in &audiences {
            for u in *users {
                *counts.entry(u.as_str()).or_default() += 1;
            }
        }
        let mut count_users: Vec<&str> = counts.keys().copied().collect();
        count_users.sort_unstable();
        let count_values: Vec<i64> = count_users.iter().map(|u| counts[u]).collect();
        let mut next: HashMap<&str, i64> = HashMap::with_capacity(count_users.len());
        if !count_users.is_empty() {
            for row in tx
                .query_prepared(
                    "INSERT INTO notify_user_seqs AS s (user_id, last_seq)
                     SELECT * FROM unnest($1::text[], $2::int8[]) AS t(user_id, n) ORDER BY user_id COLLATE \"C\"
                     ON CONFLICT (user_id) DO UPDATE SET last_seq = s.last_seq + EXCLUDED.last_seq
                     RETURNING user_id, last_seq",
                    &[
                        (&count_users, Type::TEXT_ARRAY),
                        (&count_values, Type::INT8_ARRAY),
                    ],
                )
                .await?
            {
                let user: &str = column(&row, 0, "notify_user_seqs.user_id")?;
                let last: i64 = column(&row, 1, "notify_user_seqs.last_seq")?;
                let Some((key, n)) = counts.get_key_value(user) else {
                    return Err(WriteError::Corrupt {
                        what: "sequence upsert returned another user",
                        source: None,
                    });
                };
                next.insert(key, last - n + 1);
            }
        }

        // Hand the reserved seqs out in batch order.
        let mut out = Vec::with_capacity(batch.len());
        let (mut d_users, mut d_seqs, mut d_ids) = (Vec::new(), Vec::new(), Vec::new());
        let mut d_via = Vec::new();
        for ((((users, id), stored), big), append) in audiences
            .iter()
            .zip(&ids)
            .zip(&stored)
            .zip(&too_big)
            .zip(batch)
        {
            if *big {
                out.push(Appended::TooManyRecipients);
                continue;
            }
            if !stored {
                out.push(Appended::DuplicateId);
                continue;
            }
            let mut recipients = Vec::with_capacity(users.len());
            for u in *users {
                let seq = next.get_mut(u.as_str()).map_or(0, |s| {
                    let v = *s;
                    *s += 1;
                    v
                });
                d_users.push(u.as_str());
                d_seqs.push(seq);
                d_ids.push(*id);
                d_via.push(matches!(append.audience, Audience::Group(_)));
                recipients.push(Recipient {
                    user_id: u.clone(),
                    seq: u64::try_from(seq).unwrap_or(0),
                });
            }
            out.push(match (&append.audience, offsets.get(id)) {
                (Audience::Group(g), Some(&offset)) => Appended::Broadcast {
                    recipients,
                    offset: u64::try_from(offset).unwrap_or(0),
                    members: sizes
                        .get(g)
                        .map_or(0, |n| usize::try_from(*n).unwrap_or(usize::MAX)),
                },
                _ => Appended::Stored(recipients),
            });
        }
        if !d_users.is_empty() {
            tx.execute_prepared(
                "INSERT INTO notify_deliveries (user_id, seq, notification_id, via_group)
                 SELECT * FROM unnest($1::text[], $2::int8[], $3::uuid[], $4::bool[])",
                &[
                    (&d_users, Type::TEXT_ARRAY),
                    (&d_seqs, Type::INT8_ARRAY),
                    (&d_ids, Type::UUID_ARRAY),
                    (&d_via, Type::BOOL_ARRAY),
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Removes `user` from `group` in one transaction: under the group's
    /// head lock, the membership row goes, the head moves on by one for the
    /// leave record, and the interval is kept. `None` if not a member, else
    /// the record's offset.
    async fn leave_once(&self, group: &str, user: &str) -> Result<Option<u64>, WriteError> {
        let mut conn = self.pool.get().await?;
        let tx = conn.begin().await?;
        // Every member's group has a head (the upgrade and joins create
        // them); created here too, so a member can always leave.
        lock_heads(&tx, &[group]).await?;
        let Some(member) = tx
            .query_opt(
                "DELETE FROM notify_group_members WHERE group_id = $1 AND user_id = $2
                 RETURNING joined_after, joined_at",
                &[&group, &user],
            )
            .await?
        else {
            return Ok(None);
        };
        let joined_after: i64 = column(&member, 0, "notify_group_members.joined_after")?;
        let joined_at: DateTime<Utc> = column(&member, 1, "notify_group_members.joined_at")?;
        let left = tx
            .query_one(
                "WITH h AS (UPDATE notify_group_heads SET last_offset = last_offset + 1
                            WHERE group_id = $1 RETURNING last_offset),
                 i AS (INSERT INTO notify_group_items (group_id, group_offset, left_user)
                       SELECT $1, last_offset, $2 FROM h)
                 INSERT INTO notify_group_member_intervals
                     (user_id, group_id, joined_after, left_after, joined_at, left_at)
                 SELECT $2, $1, $3, last_offset, $4, now() FROM h
                 RETURNING left_after",
                &[&group, &user, &joined_after, &joined_at],
            )
            .await?;
        let left_after: i64 = column(&left, 0, "notify_group_member_intervals.left_after")?;
        tx.commit().await?;
        Ok(u64::try_from(left_after).ok())
    }

    async fn read(
        &self,
        operation: &'static str,
        sql: &str,
        user: &str,
        a: i64,
        b: i64,
    ) -> Result<Vec<Delivery>, StoreError> {
        let conn = self.pool.get().await.map_err(unavailable(operation))?;
        let rows = if sql.contains("$3") {
            conn.query(sql, &[&user, &a, &b]).await
        } else {
            conn.query(sql, &[&user, &a]).await
        }
        .map_err(unavailable(operation))?;
        rows.iter()
            .map(|row| {
                let seq: i64 = column(row, 0, "notify_deliveries.seq")?;
                let Json(notification): Json<Notification> =
                    column(row, 1, "notify_notifications.body")?;
                let via_group: Option<bool> = column(row, 2, "notify_deliveries.via_group")?;
                Ok(Delivery::new(
                    seq_of(seq, "notify_deliveries.seq is negative")?,
                    Arc::new(notification),
                )
                .via_group(via_group.unwrap_or(false)))
            })
            .collect()
    }
}

/// How long one batch of joins may take before its callers get an error,
/// so a stalled statement cannot hold every later join on the node.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The membership writer: takes every queued join (up to
/// [`MAX_JOIN_BATCH`]) and inserts them with one statement, a single commit.
/// A pair already present, or repeated within the batch, reports `false`
/// to all but the call that inserted it.
async fn join_loop(pool: PgPool, mut jobs: mpsc::Receiver<JoinJob>) {
    let mut batch: Vec<JoinJob> = Vec::with_capacity(MAX_JOIN_BATCH);
    while jobs.recv_many(&mut batch, MAX_JOIN_BATCH).await > 0 {
        // Sorted and deduplicated: every node inserts (and so locks) pairs
        // in the same order, so two nodes' batches queue instead of deadlock.
        let mut pairs: Vec<(&str, &str)> = batch
            .iter()
            .map(|j| (j.group.as_str(), j.user.as_str()))
            .collect();
        pairs.sort_unstable();
        pairs.dedup();
        let inserted = match tokio::time::timeout(JOIN_TIMEOUT, insert_joins(&pool, &pairs)).await {
            Ok(result) => result,
            Err(elapsed) => Err(StoreError::unavailable("group joins timed out", elapsed)),
        };
        match inserted {
            Ok(mut new) => {
                for job in batch.drain(..) {
                    let fresh = new.remove(&(job.group, job.user));
                    let _ = job.reply.send(Ok(fresh));
                }
            }
            Err(e) => {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    joins = batch.len(),
                    "group joins failed"
                );
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Inserts `pairs` (sorted, distinct) in one statement; returns those that
/// were new.
async fn insert_joins(
    pool: &PgPool,
    pairs: &[(&str, &str)],
) -> Result<HashMap<(String, String), u64>, StoreError> {
    let groups: Vec<&str> = pairs.iter().map(|p| p.0).collect();
    let users: Vec<&str> = pairs.iter().map(|p| p.1).collect();
    let (groups, users) = (&groups, &users);
    retrying("group joins", || async move {
        let mut conn = pool.get().await?;
        let tx = conn.begin().await?;
        // Most joins are reconnects of current members: those are found by
        // a plain read and lock nothing, so such a batch writes nothing and
        // commits without a flush.
        let new: Vec<(String, String)> = tx
            .query(
                "SELECT t.g, t.u FROM unnest($1::text[], $2::text[]) AS t(g, u)
                 WHERE NOT EXISTS (SELECT 1 FROM notify_group_members m
                                   WHERE m.group_id = t.g AND m.user_id = t.u)",
                &[groups, users],
            )
            .await?
            .iter()
            .map(|r| Ok((column(r, 0, "group")?, column(r, 1, "user")?)))
            .collect::<Result<_, Decode>>()?;
        if new.is_empty() {
            tx.commit().await?;
            return Ok(HashMap::new());
        }
        let new_groups: Vec<&str> = new.iter().map(|p| p.0.as_str()).collect();
        let new_users: Vec<&str> = new.iter().map(|p| p.1.as_str()).collect();
        let mut heads: Vec<&str> = new_groups.clone();
        heads.sort_unstable();
        heads.dedup();
        // A new member joins at its group's head, read under the head's row
        // lock: a broadcast or a leave in progress on the group finishes
        // first, so the interval starts exactly after what that member
        // missed. Not a share lock: schema 4's trigger updates the head's
        // member count in this statement, and two batches holding share
        // locks on one head would deadlock upgrading them.
        ensure_heads(&tx, &heads).await?;
        let rows = tx
            .query(
                "WITH h AS (SELECT group_id, last_offset FROM notify_group_heads
                            WHERE group_id = ANY($3) ORDER BY group_id FOR NO KEY UPDATE)
                 INSERT INTO notify_group_members (group_id, user_id, joined_after)
                 SELECT t.g, t.u, h.last_offset
                 FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(g, u, i)
                 JOIN h ON h.group_id = t.g
                 ORDER BY t.i
                 ON CONFLICT DO NOTHING RETURNING group_id, user_id, joined_after",
                &[&new_groups, &new_users, &heads],
            )
            .await?;
        tx.commit().await?;
        rows.iter()
            .map(|r| {
                let joined_after: i64 = column(r, 2, "notify_group_members.joined_after")?;
                Ok((
                    (
                        column(r, 0, "notify_group_members.group_id")?,
                        column(r, 1, "notify_group_members.user_id")?,
                    ),
                    u64::try_from(joined_after).unwrap_or(0),
                ))
            })
            .collect()
    })
    .await
}

/// Creates the stream heads of `groups` (sorted, distinct) that do not
/// exist yet, at offset 0.
async fn ensure_heads(
    tx: &PgTransaction<'_>,
    groups: &[&str],
) -> Result<(), tokio_postgres::Error> {
    tx.execute_prepared(
        "INSERT INTO notify_group_heads (group_id, last_offset)
         SELECT g, 0 FROM unnest($1::text[]) AS g ORDER BY g COLLATE \"C\"
         ON CONFLICT DO NOTHING",
        &[(&groups, Type::TEXT_ARRAY)],
    )
    .await?;
    Ok(())
}

/// Creates (if new) and locks the stream heads of `groups` (sorted,
/// distinct), in that order, until the transaction ends. Returns each
/// group's member count, which the lock holds still (schema 4's triggers
/// update it in the transactions that insert or delete members, and those
/// lock the head first).
async fn lock_heads(
    tx: &PgTransaction<'_>,
    groups: &[&str],
) -> Result<HashMap<String, i64>, WriteError> {
    ensure_heads(tx, groups).await?;
    tx.query_prepared(
        "SELECT group_id, members FROM notify_group_heads WHERE group_id = ANY($1)
         ORDER BY group_id FOR UPDATE",
        &[(&groups, Type::TEXT_ARRAY)],
    )
    .await?
    .iter()
    .map(|row| {
        Ok((
            column(row, 0, "notify_group_heads.group_id")?,
            column(row, 1, "notify_group_heads.members")?,
        ))
    })
    .collect()
}

/// Why a write (a batch of sends or of joins) failed.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    Pg(#[from] tokio_postgres::Error),
    #[error("timed out waiting for a database connection")]
    PoolTimeout,
    #[error("{what}")]
    Corrupt {
        what: &'static str,
        #[source]
        source: Option<tokio_postgres::Error>,
    },
}

impl From<bb8::RunError<tokio_postgres::Error>> for WriteError {
    fn from(e: bb8::RunError<tokio_postgres::Error>) -> Self {
        match e {
            bb8::RunError::User(e) => WriteError::Pg(e),
            bb8::RunError::TimedOut => WriteError::PoolTimeout,
        }
    }
}

impl From<Decode> for WriteError {
    fn from(e: Decode) -> Self {
        WriteError::Corrupt {
            what: e.what,
            source: Some(e.source),
        }
    }
}

impl WriteError {
    /// The store error `operation` fails with; the driver's error stays
    /// the source.
    fn into_store_error(self, operation: &'static str) -> StoreError {
        match self {
            WriteError::Corrupt { what, source } => {
                StoreError::corrupt(what, source.map(|e| Arc::new(e) as _))
            }
            e => StoreError::unavailable(operation, e),
        }
    }
}

impl WriteError {
    /// Deadlocks (two nodes locking overlapping users) are retried.
    fn retryable(&self) -> bool {
        use tokio_postgres::error::SqlState;
        matches!(self, WriteError::Pg(e) if matches!(e.code(), Some(c)
            if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE))
    }
}

/// Runs a write, retrying a deadlock or serialization failure up to 3 times.
async fn retrying<T, F, Fut>(what: &'static str, mut write: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, WriteError>>,
{
    let mut attempt = 0;
    loop {
        match write().await {
            Err(e) if e.retryable() && attempt < 3 => {
                attempt += 1;
                tracing::debug!(
                    error = &e as &dyn std::error::Error,
                    attempt,
                    what,
                    "write retried"
                );
            }
            result => return result.map_err(|e| e.into_store_error(what)),
        }
    }
}

impl Store for PgStore {
    fn append<'a>(
        &'a self,
        batch: &'a [Append],
    ) -> BoxFuture<'a, Result<Vec<Appended>, StoreError>> {
        Box::pin(retrying("append", || self.append_once(batch)))
    }

    fn history<'a>(
        &'a self,
        user: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, StoreError>> {
        Box::pin(self.read(
            "history",
            "SELECT d.seq, n.body, d.via_group FROM notify_deliveries d
             JOIN notify_notifications n ON n.id = d.notification_id
             WHERE d.user_id = $1 ORDER BY d.seq DESC LIMIT $2",
            user,
            i64::try_from(limit).unwrap_or(i64::MAX),
            0,
        ))
    }

    fn since<'a>(
        &'a self,
        user: &'a str,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, StoreError>> {
        Box::pin(self.read(
            "since",
            // LIMIT inside, join outside: with a long history the planner
            // otherwise joins every remaining row before sorting (ADR 0010).
            "SELECT d.seq, n.body, d.via_group FROM (
                 SELECT seq, notification_id, via_group FROM notify_deliveries
                 WHERE user_id = $1 AND seq > $2 ORDER BY seq ASC LIMIT $3) d
             JOIN notify_notifications n ON n.id = d.notification_id
             ORDER BY d.seq ASC",
            user,
            i64::try_from(after).unwrap_or(i64::MAX),
            i64::try_from(limit).unwrap_or(i64::MAX),
        ))
    }

    fn last_seq<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let conn = self.pool.get().await.map_err(unavailable("last_seq"))?;
            let row = conn
                .query_opt(
                    "SELECT last_seq FROM notify_user_seqs WHERE user_id = $1",
                    &[&user],
                )
                .await
                .map_err(unavailable("last_seq"))?;
            match row {
                None => Ok(0),
                Some(row) => seq_of(
                    column(&row, 0, "notify_user_seqs.last_seq")?,
                    "notify_user_seqs.last_seq is negative",
                ),
            }
        })
    }

    fn join_group<'a>(
        &'a self,
        group: &'a str,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            let (reply, joined) = oneshot::channel();
            let job = JoinJob {
                group: group.to_owned(),
                user: user.to_owned(),
                reply,
            };
            let gone = || StoreError::Unavailable {
                operation: "join_group: the membership writer stopped".into(),
                source: None,
            };
            self.joins.send(job).await.map_err(|_| gone())?;
            joined.await.map_err(|_| gone())?
        })
    }

    fn leave_group<'a>(
        &'a self,
        group: &'a str,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(retrying("leave_group", move || {
            self.leave_once(group, user)
        }))
    }

    fn group_heads<'a>(
        &'a self,
        groups: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<u64>, StoreError>> {
        Box::pin(async move {
            let conn = self.pool.get().await.map_err(unavailable("group_heads"))?;
            let rows = conn
                .query(
                    "SELECT group_id, last_offset FROM notify_group_heads WHERE group_id = ANY($1)",
                    &[&groups],
                )
                .await
                .map_err(unavailable("group_heads"))?;
            let mut heads: HashMap<String, u64> = HashMap::with_capacity(rows.len());
            for row in &rows {
                let last: i64 = column(row, 1, "notify_group_heads.last_offset")?;
                heads.insert(
                    column(row, 0, "notify_group_heads.group_id")?,
                    seq_of(last, "notify_group_heads.last_offset is negative")?,
                );
            }
            Ok(groups
                .iter()
                .map(|g| heads.get(g).copied().unwrap_or(0))
                .collect())
        })
    }

    fn group_since<'a>(
        &'a self,
        group: &'a str,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<GroupItem>, StoreError>> {
        Box::pin(async move {
            let conn = self.pool.get().await.map_err(unavailable("group_since"))?;
            let after = i64::try_from(after).unwrap_or(i64::MAX);
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            // The LIMIT inside, on the key range, before the bodies' join.
            let rows = conn
                .query(
                    "SELECT i.group_offset, i.left_user, n.body
                     FROM (SELECT group_offset, notification_id, left_user
                           FROM notify_group_items
                           WHERE group_id = $1 AND group_offset > $2
                           ORDER BY group_offset LIMIT $3) i
                     LEFT JOIN notify_notifications n ON n.id = i.notification_id
                     ORDER BY i.group_offset",
                    &[&group, &after, &limit],
                )
                .await
                .map_err(unavailable("group_since"))?;
            rows.iter()
                .map(|row| {
                    let offset: i64 = column(row, 0, "notify_group_items.group_offset")?;
                    let left: Option<String> = column(row, 1, "notify_group_items.left_user")?;
                    let body: Option<Json<Notification>> =
                        column(row, 2, "notify_notifications.body")?;
                    let entry = match (left, body) {
                        (Some(user_id), _) => GroupEntry::Left { user_id },
                        (None, Some(Json(n))) => GroupEntry::Notification(Arc::new(n)),
                        (None, None) => {
                            return Err(StoreError::corrupt(
                                "a group item's notification is missing",
                                None,
                            ));
                        }
                    };
                    Ok(GroupItem {
                        offset: seq_of(offset, "notify_group_items.group_offset is negative")?,
                        entry,
                    })
                })
                .collect()
        })
    }

    fn memberships<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Membership>, StoreError>> {
        Box::pin(async move {
            let conn = self.pool.get().await.map_err(unavailable("memberships"))?;
            let rows = conn
                .query(
                    // One statement, one snapshot: a membership and its
                    // head agree (a leave is either in both or in neither).
                    "SELECT m.group_id, m.joined_after, m.left_after, h.last_offset
                     FROM (SELECT group_id, joined_after, NULL::int8 AS left_after
                           FROM notify_group_members WHERE user_id = $1
                           UNION ALL
                           SELECT group_id, joined_after, left_after
                           FROM notify_group_member_intervals WHERE user_id = $1) m
                     JOIN notify_group_heads h ON h.group_id = m.group_id
                     ORDER BY 1, 2",
                    &[&user],
                )
                .await
                .map_err(unavailable("memberships"))?;
            rows.iter()
                .map(|row| {
                    let joined_after: i64 = column(row, 1, "joined_after")?;
                    let left_after: Option<i64> = column(row, 2, "left_after")?;
                    let head: i64 = column(row, 3, "notify_group_heads.last_offset")?;
                    Ok(Membership {
                        head: seq_of(head, "notify_group_heads.last_offset is negative")?,
                        group: column(row, 0, "group_id")?,
                        joined_after: seq_of(joined_after, "joined_after is negative")?,
                        left_after: left_after
                            .map(|l| seq_of(l, "left_after is negative"))
                            .transpose()?,
                    })
                })
                .collect()
        })
    }

    fn stream_history<'a>(
        &'a self,
        user: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<HistoryItem>, StoreError>> {
        Box::pin(async move {
            let conn = self
                .pool
                .get()
                .await
                .map_err(unavailable("stream_history"))?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            // The newest `limit` of each stream, each by its own index range
            // (the inbox's per user, each group's inside each interval),
            // then merged by notification id, and only the page's winners
            // joined to their bodies. The interval's upper end is a
            // COALESCE, not an `IS NULL OR`, so that both ends bound the
            // primary key's range and each stream is a short backward index
            // scan (with the OR, PostgreSQL read every item of each
            // interval and sorted them: 14 ms against 0.9 ms for a user in
            // 20 groups, PERFORMANCE.md).
            let rows = conn
                .query(
                    "WITH iv AS (
                         SELECT group_id, joined_after, NULL::int8 AS left_after
                         FROM notify_group_members WHERE user_id = $1
                         UNION ALL
                         SELECT group_id, joined_after, left_after
                         FROM notify_group_member_intervals WHERE user_id = $1),
                     picked AS (
                         SELECT i.group_id, i.group_offset AS number, i.notification_id
                         FROM iv CROSS JOIN LATERAL (
                             SELECT group_id, group_offset, notification_id
                             FROM notify_group_items it
                             WHERE it.group_id = iv.group_id
                               AND it.group_offset > iv.joined_after
                               AND it.group_offset <= COALESCE(iv.left_after, 9223372036854775807)
                               AND it.notification_id IS NOT NULL
                             ORDER BY it.group_offset DESC LIMIT $2) i
                         UNION ALL
                         SELECT NULL, d.seq, d.notification_id FROM (
                             SELECT seq, notification_id FROM notify_deliveries
                             WHERE user_id = $1 AND via_group IS NOT TRUE
                             ORDER BY seq DESC LIMIT $2) d),
                     page AS (
                         SELECT * FROM picked ORDER BY notification_id DESC LIMIT $2)
                     SELECT p.group_id, p.number, n.body
                     FROM page p JOIN notify_notifications n ON n.id = p.notification_id
                     ORDER BY n.id DESC",
                    &[&user, &limit],
                )
                .await
                .map_err(unavailable("stream_history"))?;
            rows.iter()
                .map(|row| {
                    let group: Option<String> = column(row, 0, "stream_history group")?;
                    let number: i64 = column(row, 1, "stream_history number")?;
                    let Json(notification): Json<Notification> =
                        column(row, 2, "notify_notifications.body")?;
                    let number = seq_of(number, "stream_history number is negative")?;
                    let notification = Arc::new(notification);
                    Ok(match group {
                        Some(group) => HistoryItem::Group {
                            group,
                            offset: number,
                            notification,
                        },
                        None => HistoryItem::Inbox(Delivery::new(number, notification)),
                    })
                })
                .collect()
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            if self.joins.is_closed() {
                return Err(StoreError::Unavailable {
                    operation: "ping: the membership writer stopped".into(),
                    source: None,
                });
            }
            let conn = self.pool.get().await.map_err(unavailable("ping"))?;
            conn.simple_query("SELECT 1")
                .await
                .map_err(unavailable("ping"))?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("db error")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("ERROR: relation \"notify_deliveries\" does not exist")]
    struct Inner;

    #[test]
    fn store_errors_keep_the_driver_error_as_their_source() {
        let e = unavailable("append")(Outer(Inner));
        assert_eq!(e.to_string(), "store unavailable (append)");
        let source = std::error::Error::source(&e).expect("the driver error is kept");
        assert_eq!(source.to_string(), "db error");
        let below = source.source().expect("and what is below it");
        assert_eq!(
            below.to_string(),
            "ERROR: relation \"notify_deliveries\" does not exist"
        );
    }

    #[test]
    fn a_negative_seq_is_corrupt_with_its_cause() {
        let e = seq_of(-1, "notify_deliveries.seq is negative").unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }));
        assert!(std::error::Error::source(&e).is_some());
    }
}

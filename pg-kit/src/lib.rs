//! # pg_kit: the suite's shared PostgreSQL plumbing
//!
//! The connection pool and the per-schema migrator that the stores of
//! `ferrokeel-order-saga` and `ferrokeel-pg-analytics` use.
//!
//! Each store owns one schema and migrates only its own, from plain SQL
//! files, recording each applied file in `<schema>.schema_migrations`.
//! Migrators of several processes starting at once serialize on an
//! advisory lock.
//!
//! # Prepared statements
//!
//! Every pooled connection keeps the statements it has prepared, keyed by
//! their SQL text, and the stores run their statements through
//! [`Prepared`]. A load profile showed PostgreSQL spending over 40 % of its
//! CPU parsing, analysing and planning the same few statements again for
//! every call (`query_typed` sends them unnamed, so nothing is reused);
//! a named statement is parsed once per connection, and after five runs
//! PostgreSQL may keep a generic plan for it.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, GenericClient, NoTls, Row, Statement, Transaction};

/// The connection pool every PostgreSQL store uses.
pub type PgPool = bb8::Pool<PgManager>;

/// A pooled connection.
pub type PgConnection<'a> = bb8::PooledConnection<'a, PgManager>;

/// The pool's connection manager: opens [`PgClient`]s.
#[derive(Debug, Clone)]
pub struct PgManager {
    config: tokio_postgres::Config,
}

impl bb8::ManageConnection for PgManager {
    type Connection = PgClient;
    type Error = tokio_postgres::Error;

    async fn connect(&self) -> Result<PgClient, tokio_postgres::Error> {
        let (client, connection) = self.config.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "PostgreSQL connection closed");
            }
        });
        Ok(PgClient {
            client,
            statements: Mutex::default(),
            broken: AtomicBool::new(false),
        })
    }

    async fn is_valid(&self, conn: &mut PgClient) -> Result<(), tokio_postgres::Error> {
        conn.client.simple_query("").await.map(|_| ())
    }

    fn has_broken(&self, conn: &mut PgClient) -> bool {
        conn.client.is_closed() || conn.broken.load(Ordering::Relaxed)
    }
}

/// Prepared statements of one connection, by SQL text.
type StatementCache = Mutex<HashMap<String, Statement>>;

/// A connection with its cache of prepared statements. It dereferences to
/// the [`tokio_postgres::Client`] for everything else.
#[derive(Debug)]
pub struct PgClient {
    client: Client,
    statements: StatementCache,
    broken: AtomicBool,
}

/// Whether `e` says the session is gone (the server ended it, or the
/// socket closed): the connection must not go back to the pool.
pub fn ends_session(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || e.as_db_error()
            .is_some_and(|db| matches!(db.severity(), "FATAL" | "PANIC"))
        || e.code().is_some_and(|code| code.code().starts_with("08"))
}

fn mark_if_ended(broken: &AtomicBool, e: &tokio_postgres::Error) {
    if ends_session(e) {
        broken.store(true, Ordering::Relaxed);
    }
}

impl PgClient {
    /// Records that a call on this connection failed with `e`: if the
    /// session is gone ([`ends_session`]), the pool discards the connection
    /// when it comes back instead of handing it to the next caller (the
    /// client may not have noticed the closed socket yet). The
    /// [`Prepared`] methods do this themselves; call it after an error from
    /// the client used directly (`copy_in`, `batch_execute`, …).
    pub fn note_error(&self, e: &tokio_postgres::Error) {
        mark_if_ended(&self.broken, e);
    }

    /// Begins a transaction whose statements use this connection's cache.
    pub async fn begin(&mut self) -> Result<PgTransaction<'_>, tokio_postgres::Error> {
        let transaction = self
            .client
            .transaction()
            .await
            .inspect_err(|e| mark_if_ended(&self.broken, e))?;
        Ok(PgTransaction {
            transaction,
            statements: &self.statements,
            broken: &self.broken,
        })
    }
}

impl std::ops::Deref for PgClient {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for PgClient {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// A transaction on a [`PgClient`], sharing its statement cache. It
/// dereferences to the [`tokio_postgres::Transaction`]; dropping it
/// without [`commit`](PgTransaction::commit) rolls back.
pub struct PgTransaction<'a> {
    transaction: Transaction<'a>,
    statements: &'a StatementCache,
    broken: &'a AtomicBool,
}

impl std::fmt::Debug for PgTransaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTransaction").finish_non_exhaustive()
    }
}

impl PgTransaction<'_> {
    /// As [`PgClient::note_error`], for the transaction's connection.
    pub fn note_error(&self, e: &tokio_postgres::Error) {
        mark_if_ended(self.broken, e);
    }

    /// Commits. If the answer is lost with the session, the outcome is
    /// unknown (and the connection is not pooled again).
    pub async fn commit(self) -> Result<(), tokio_postgres::Error> {
        let broken = self.broken;
        self.transaction
            .commit()
            .await
            .inspect_err(|e| mark_if_ended(broken, e))
    }

    /// Rolls back.
    pub async fn rollback(self) -> Result<(), tokio_postgres::Error> {
        let broken = self.broken;
        self.transaction
            .rollback()
            .await
            .inspect_err(|e| mark_if_ended(broken, e))
    }
}

impl<'a> std::ops::Deref for PgTransaction<'a> {
    type Target = Transaction<'a>;

    fn deref(&self) -> &Transaction<'a> {
        &self.transaction
    }
}

/// Statements with typed parameters, prepared once per connection and
/// reused (see the [crate docs](crate)). The methods mirror
/// tokio-postgres's `query_typed` family.
pub trait Prepared: Sync {
    /// Runs `sql` and returns its rows.
    fn query_prepared(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send;

    /// Runs `sql` and returns its first row, if any.
    fn query_prepared_opt(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Option<Row>, tokio_postgres::Error>> + Send {
        async move { Ok(self.query_prepared(sql, params).await?.into_iter().next()) }
    }

    /// Runs `sql` and returns its one row; no row is an error.
    fn query_prepared_one(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Row, tokio_postgres::Error>> + Send;

    /// Runs `sql` and returns the number of rows it affected.
    fn execute_prepared(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<u64, tokio_postgres::Error>> + Send;
}

/// Both connection handles run [`Prepared`] calls through their
/// [`Session`]: one body for the two.
macro_rules! prepared_through_session {
    ($handle:ty) => {
        impl Prepared for $handle {
            async fn query_prepared(
                &self,
                sql: &str,
                params: &[(&(dyn ToSql + Sync), Type)],
            ) -> Result<Vec<Row>, tokio_postgres::Error> {
                self.session().query(sql, params).await
            }

            async fn query_prepared_one(
                &self,
                sql: &str,
                params: &[(&(dyn ToSql + Sync), Type)],
            ) -> Result<Row, tokio_postgres::Error> {
                self.session().query_one(sql, params).await
            }

            async fn execute_prepared(
                &self,
                sql: &str,
                params: &[(&(dyn ToSql + Sync), Type)],
            ) -> Result<u64, tokio_postgres::Error> {
                self.session().execute(sql, params).await
            }
        }
    };
}

prepared_through_session!(PgClient);
prepared_through_session!(PgTransaction<'_>);

impl PgClient {
    fn session(&self) -> Session<'_, Client> {
        Session {
            client: &self.client,
            statements: &self.statements,
            broken: &self.broken,
        }
    }
}

impl<'a> PgTransaction<'a> {
    fn session(&self) -> Session<'_, Transaction<'a>> {
        Session {
            client: &self.transaction,
            statements: self.statements,
            broken: self.broken,
        }
    }
}

/// What a [`Prepared`] call needs of a connection or a transaction: the
/// client to run on, the connection's statement cache, and its broken flag.
struct Session<'s, C> {
    client: &'s C,
    statements: &'s StatementCache,
    broken: &'s AtomicBool,
}

impl<C: GenericClient + Sync> Session<'_, C> {
    async fn query(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let statement = prepare(self.client, self.statements, self.broken, sql, params).await?;
        let result = self.client.query(&statement, &values(params)).await;
        evict_on_error(self.statements, self.broken, sql, result)
    }

    async fn query_one(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Row, tokio_postgres::Error> {
        let statement = prepare(self.client, self.statements, self.broken, sql, params).await?;
        let result = self.client.query_one(&statement, &values(params)).await;
        evict_on_error(self.statements, self.broken, sql, result)
    }

    async fn execute(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<u64, tokio_postgres::Error> {
        let statement = prepare(self.client, self.statements, self.broken, sql, params).await?;
        let result = self.client.execute(&statement, &values(params)).await;
        evict_on_error(self.statements, self.broken, sql, result)
    }
}

/// The parameters' values, without their types.
fn values<'p>(params: &[(&'p (dyn ToSql + Sync), Type)]) -> Vec<&'p (dyn ToSql + Sync)> {
    params.iter().map(|(v, _)| *v).collect()
}

/// The cached statement for `sql` with the parameters' types, preparing
/// it on a miss. A statement prepared inside a transaction outlives it:
/// named statements belong to the session, not the transaction.
async fn prepare<C: GenericClient + Sync>(
    client: &C,
    statements: &StatementCache,
    broken: &AtomicBool,
    sql: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> Result<Statement, tokio_postgres::Error> {
    let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
    if let Some(statement) = statements.lock().get(sql)
        && statement.params() == types.as_slice()
    {
        return Ok(statement.clone());
    }
    let statement = client
        .prepare_typed(sql, &types)
        .await
        .inspect_err(|e| mark_if_ended(broken, e))?;
    statements.lock().insert(sql.to_owned(), statement.clone());
    Ok(statement)
}

/// Forgets `sql`'s statement when the server says it no longer holds (a
/// migration changed a table under it), so the next call prepares it anew.
fn evict_on_error<T>(
    statements: &StatementCache,
    broken: &AtomicBool,
    sql: &str,
    result: Result<T, tokio_postgres::Error>,
) -> Result<T, tokio_postgres::Error> {
    if let Err(e) = &result {
        mark_if_ended(broken, e);
    }
    if let Err(e) = &result
        && let Some(code) = e.code()
        && (*code == tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED
            || *code == tokio_postgres::error::SqlState::INVALID_SQL_STATEMENT_NAME)
    {
        statements.lock().remove(sql);
    }
    result
}

/// What the PostgreSQL plumbing fails with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The URL could not be parsed.
    #[error("invalid PostgreSQL URL")]
    Config(#[source] tokio_postgres::Error),
    /// No connection could be had from the pool (server down, timeout).
    #[error("PostgreSQL unavailable")]
    Pool(#[source] bb8::RunError<tokio_postgres::Error>),
    /// A statement failed.
    #[error("PostgreSQL query failed")]
    Query(#[source] tokio_postgres::Error),
}

impl From<bb8::RunError<tokio_postgres::Error>> for PgError {
    fn from(e: bb8::RunError<tokio_postgres::Error>) -> PgError {
        PgError::Pool(e)
    }
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> PgError {
        PgError::Query(e)
    }
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Most open connections. Default 16.
    pub max_size: u32,
    /// How long a caller waits for a connection before failing. Default 2 s.
    pub connection_timeout: Duration,
    /// TCP connect timeout. Default 2 s.
    pub connect_timeout: Duration,
    /// Check each connection with an empty query when it is checked out,
    /// replacing it if the server has ended its session (a restart, a
    /// failover, an idle timeout), at one round trip per checkout. Default
    /// false: a dead connection then fails the first query made on it, and
    /// the pool drops it afterwards ([`ends_session`]).
    pub test_on_check_out: bool,
}

impl Default for PoolConfig {
    fn default() -> PoolConfig {
        PoolConfig {
            max_size: 16,
            connection_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            test_on_check_out: false,
        }
    }
}

/// Builds a pool for `url`. Connections are opened lazily, so this
/// succeeds while the server is down; the first query tells.
pub fn pool(url: &str, config: &PoolConfig) -> Result<PgPool, PgError> {
    let mut pg = tokio_postgres::Config::from_str(url).map_err(PgError::Config)?;
    pg.connect_timeout(config.connect_timeout);
    let manager = PgManager { config: pg };
    Ok(bb8::Pool::builder()
        .max_size(config.max_size)
        .connection_timeout(config.connection_timeout)
        // By default a broken connection fails its query, which the caller
        // reports as unavailable; testing every checkout costs a round trip
        // per transaction.
        .test_on_check_out(config.test_on_check_out)
        .build_unchecked(manager))
}

/// One SQL file of a schema's migrations.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its order (the file's number).
    pub version: i32,
    /// Its file name.
    pub name: &'static str,
    /// Its statements.
    pub sql: &'static str,
}

/// Applies the `migrations` of `schema` not yet applied, in order, each in
/// its own transaction; returns how many ran.
pub async fn migrate(
    pool: &PgPool,
    schema: &str,
    migrations: &[Migration],
) -> Result<usize, PgError> {
    let mut conn = pool.get().await?;
    // One lock per schema: two processes starting together apply each
    // file once.
    let lock_key = schema.bytes().fold(0x5a6a_i64, |h, b| {
        h.wrapping_mul(31).wrapping_add(i64::from(b))
    });
    conn.execute("SELECT pg_advisory_lock($1)", &[&lock_key])
        .await?;
    // The lock belongs to the session: should this future be dropped
    // before the unlock, the connection must be closed rather than pooled
    // with the lock still held (every later migrate would wait forever).
    conn.broken.store(true, Ordering::Relaxed);
    let result = apply(&mut conn, schema, migrations).await;
    let unlock = conn
        .execute("SELECT pg_advisory_unlock($1)", &[&lock_key])
        .await;
    if unlock.is_ok() && result.is_ok() {
        conn.broken.store(false, Ordering::Relaxed);
    }
    let applied = result?;
    unlock?;
    Ok(applied)
}

async fn apply(
    conn: &mut PgConnection<'_>,
    schema: &str,
    migrations: &[Migration],
) -> Result<usize, PgError> {
    conn.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await?;
    let done: Vec<i32> = conn
        .query(
            &format!("SELECT version FROM {schema}.schema_migrations"),
            &[],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut applied = 0;
    for migration in migrations.iter().filter(|m| !done.contains(&m.version)) {
        let tx = conn.transaction().await?;
        tx.batch_execute(migration.sql).await?;
        tx.execute(
            &format!("INSERT INTO {schema}.schema_migrations (version, name) VALUES ($1, $2)"),
            &[&migration.version, &migration.name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(
            schema,
            version = migration.version,
            name = migration.name,
            "migration applied"
        );
        applied += 1;
    }
    Ok(applied)
}

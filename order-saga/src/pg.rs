//! PostgreSQL plumbing shared by the services' stores: the connection pool
//! and the per-schema migrator.
//!
//! Each service owns one schema (`orders`, `inventory`, `shipping`) and
//! migrates only its own, from plain SQL files in `migrations/<schema>/`,
//! recording each applied file in `<schema>.schema_migrations`. Migrators
//! of several processes starting at once serialize on an advisory lock.

use std::str::FromStr;
use std::time::Duration;

use bb8_postgres::PostgresConnectionManager;
use tokio_postgres::NoTls;

/// The connection pool every PostgreSQL store uses.
pub type PgPool = bb8::Pool<PostgresConnectionManager<NoTls>>;

/// A pooled connection.
pub type PgConnection<'a> = bb8::PooledConnection<'a, PostgresConnectionManager<NoTls>>;

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
}

impl Default for PoolConfig {
    fn default() -> PoolConfig {
        PoolConfig {
            max_size: 16,
            connection_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// Builds a pool for `url`. Connections are opened lazily, so this
/// succeeds while the server is down; the first query tells.
pub fn pool(url: &str, config: &PoolConfig) -> Result<PgPool, PgError> {
    let mut pg = tokio_postgres::Config::from_str(url).map_err(PgError::Config)?;
    pg.connect_timeout(config.connect_timeout);
    let manager = PostgresConnectionManager::new(pg, NoTls);
    Ok(bb8::Pool::builder()
        .max_size(config.max_size)
        .connection_timeout(config.connection_timeout)
        // A broken connection fails its query, which the caller reports as
        // unavailable; testing every checkout would cost a round trip per
        // transaction.
        .test_on_check_out(false)
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
    let result = apply(&mut conn, schema, migrations).await;
    let unlock = conn
        .execute("SELECT pg_advisory_unlock($1)", &[&lock_key])
        .await;
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

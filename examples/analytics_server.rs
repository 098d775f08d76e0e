//! pg-analytics over HTTP: NDJSON ingest, the dashboard (cached in Redis
//! when `REDIS_URL` is set), probes and Prometheus metrics.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1/postgres \
//! REDIS_URL=redis://127.0.0.1:6379 \
//!   cargo run --release --example analytics_server
//! ```
//!
//! Environment (an empty value counts as unset):
//!
//! - `DATABASE_URL` (required): PostgreSQL; the schema `analytics` is
//!   migrated at start, and partitions are kept 3 months ahead;
//! - `REDIS_URL`: the dashboard cache (keys under `analytics:`); unset: no
//!   cache, every dashboard is read from PostgreSQL;
//! - `BIND`: listen address, default `127.0.0.1:8090`;
//! - `API_TOKEN`: when set, `POST /v1/events` and `GET /v1/dashboard`
//!   require `Authorization: Bearer <API_TOKEN>`;
//! - `POOL_SIZE`: PostgreSQL connections, default 16;
//! - `MAINTENANCE_SECS`: seconds between maintenance passes (partitions,
//!   the default partition's count), default 3600;
//! - `RUST_LOG`: log filter, default `info`.
//!
//! Without `DATABASE_URL`, or with bad configuration, it exits with status
//! 2 and one line saying why. SIGINT or SIGTERM stops accepting and lets
//! requests in flight finish. The API: docs/pg-analytics/API.md.
#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "support/env.rs"]
mod env_support;
#[path = "support/server.rs"]
mod server_support;

use std::net::SocketAddr;
use std::time::Duration;

use env_support::{env, redacted};
use pg_analytics::Analytics;
use pg_analytics::cache::{CacheConfig, DashboardCache};
use pg_analytics::http::{AnalyticsHttpConfig, AnalyticsService};

/// Exits with status 2 and one line: the configuration is wrong.
fn bad_config(message: impl std::fmt::Display) -> ! {
    eprintln!("analytics_server: {message}");
    std::process::exit(2)
}

fn number<T: std::str::FromStr>(name: &str, default: T) -> T
where
    T::Err: std::fmt::Display,
{
    match env(name) {
        None => default,
        Some(v) => v
            .parse()
            .unwrap_or_else(|e| bad_config(format!("{name} is not a number: {e}"))),
    }
}

#[tokio::main]
async fn main() {
    let Some(database_url) = env("DATABASE_URL") else {
        bad_config(
            "DATABASE_URL is required (a PostgreSQL URL, e.g. postgres://postgres@127.0.0.1/postgres)",
        );
    };
    server_support::init_tracing();
    let bind: SocketAddr = env("BIND")
        .unwrap_or_else(|| "127.0.0.1:8090".to_owned())
        .parse()
        .unwrap_or_else(|e| bad_config(format!("BIND is not an address: {e}")));
    let pool_size: u32 = number("POOL_SIZE", 16);
    let maintenance = Duration::from_secs(number("MAINTENANCE_SECS", 3600).max(1));
    let mut http_config = AnalyticsHttpConfig::default();
    if let Some(token) = env("API_TOKEN") {
        http_config = http_config.with_api_token(token);
    }

    println!("analytics_server effective configuration:");
    println!("  BIND={bind}");
    println!(
        "  DATABASE_URL={} (schema analytics, pool of {pool_size})",
        redacted(&database_url)
    );
    match env("REDIS_URL") {
        Some(url) => println!(
            "  REDIS_URL={} (dashboard cache, prefix analytics:)",
            redacted(&url)
        ),
        None => println!("  REDIS_URL unset: dashboards are not cached"),
    }
    println!(
        "  API_TOKEN={}",
        if http_config.api_token.is_some() {
            "(set)"
        } else {
            "(unset: no authentication)"
        }
    );
    println!(
        "  max body {} bytes, {} rows a batch, {} batches in flight, maintenance every {maintenance:?}",
        http_config.max_body_bytes,
        http_config.writer.max_batch_rows,
        http_config.writer.max_in_flight
    );

    let pool = pg_kit::pool(
        &database_url,
        &pg_kit::PoolConfig {
            max_size: pool_size.max(1),
            ..pg_kit::PoolConfig::default()
        },
    )
    .unwrap_or_else(|e| bad_config(format!("DATABASE_URL: {e}")));
    let store = Analytics::new(pool, time_kit::system());
    match store.migrate().await {
        Ok(ran) => tracing::info!(migrations = ran, "schema analytics ready"),
        Err(e) => {
            eprintln!("analytics_server: migrating schema analytics failed: {e}");
            std::process::exit(1);
        }
    }
    let cache = match env("REDIS_URL") {
        None => None,
        Some(url) => {
            let client = redis_kit::RedisSetup::new(url)
                .connect()
                .await
                .unwrap_or_else(|e| bad_config(format!("REDIS_URL: {e}")));
            Some(
                DashboardCache::new(store.clone(), client, CacheConfig::default())
                    .unwrap_or_else(|e| bad_config(e)),
            )
        }
    };
    let service = AnalyticsService::new(store, cache, http_config);
    if let Err(e) = service.maintain(3).await {
        eprintln!("analytics_server: creating partitions failed: {e}");
        std::process::exit(1);
    }
    let maintainer = {
        let service = service.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(maintenance);
            every.tick().await;
            loop {
                every.tick().await;
                if let Err(e) = service.maintain(3).await {
                    tracing::warn!(error = %e, "maintenance pass failed; retried next time");
                }
            }
        })
    };

    let listener = match tokio::net::TcpListener::bind(bind).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("analytics_server: cannot listen on {bind}: {e}");
            std::process::exit(1);
        }
    };
    let shutdown = http_kit::Shutdown::new();
    shutdown.trigger_on(server_support::shutdown_signal());
    tracing::info!(%bind, "analytics_server listening");
    let report = http_kit::serve(
        listener,
        service,
        http_kit::ServeConfig::default(),
        shutdown,
    )
    .await;
    maintainer.abort();
    tracing::info!(
        drained = report.drained,
        left_open = report.left_open,
        "stopped"
    );
}

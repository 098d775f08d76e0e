//! A metrics aggregation server: `metrics_core`'s HTTP service on the
//! suite's shared `http_kit::serve`.
//!
//! ```text
//! cargo run --release --example metrics_server
//! curl -s -XPOST localhost:8080/v1/events -H 'content-type: application/json' \
//!   -d "{\"timestamp\":\"$(date -u +%FT%TZ)\",\"user_id\":\"u1\",\"event_type\":\"click\",\"value\":1.5}"
//! curl -s 'localhost:8080/v1/aggregates?minutes=5'
//! ```
//!
//! Configuration (environment):
//! - `METRICS_ADDR`: listen address, default `127.0.0.1:8080`.
//! - `METRICS_SNAPSHOT_PATH`: snapshot written on shutdown and restored at
//!   start, default `metrics.snapshot`; empty disables it.
//! - `METRICS_RETENTION_MINUTES`: default 60.
//! - `METRICS_MAX_BODY_BYTES`: default 8 MiB.
//! - `METRICS_BLOCKING_INGEST_BYTES`: bodies larger than this are ingested on
//!   the blocking pool, default 64 KiB.
//!
//! The HTTP interface (routes, fields, statuses, metrics) is documented in
//! `docs/metrics-core.md`.
//!
//! SIGINT or SIGTERM stops accepting connections, lets in-flight requests
//! finish, shuts the processor down and writes the snapshot, all within 5 s.
#![allow(clippy::print_stdout)]

#[path = "support/server.rs"]
mod server_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_kit::{ServeConfig, Shutdown};
use metrics_core::http::{HttpConfig, MetricsService};
use metrics_core::{Config, MetricsProcessor};

const SHUTDOWN_BUDGET: Duration = Duration::from_secs(5);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(v) => v.parse().map_err(|_| format!("{name}={v:?} is not valid")),
        Err(_) => Ok(default),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    server_support::init_tracing();

    let addr: SocketAddr = env_or("METRICS_ADDR", "127.0.0.1:8080".parse()?)?;
    let snapshot =
        std::env::var("METRICS_SNAPSHOT_PATH").unwrap_or_else(|_| "metrics.snapshot".into());
    let mut config =
        Config::default().with_retention_minutes(env_or("METRICS_RETENTION_MINUTES", 60)?);
    if !snapshot.is_empty() {
        config = config.with_snapshot_path(&snapshot);
    }
    let http = HttpConfig::default()
        .with_max_body_bytes(env_or("METRICS_MAX_BODY_BYTES", 8 * 1024 * 1024)?)
        .with_blocking_ingest_bytes(env_or(
            "METRICS_BLOCKING_INGEST_BYTES",
            metrics_core::http::DEFAULT_BLOCKING_INGEST_BYTES,
        )?);
    println!("metrics_server effective configuration:");
    println!("  METRICS_ADDR={addr}");
    println!("  METRICS_SNAPSHOT_PATH={snapshot}");
    println!("  METRICS_RETENTION_MINUTES={}", config.retention_minutes);
    println!("  METRICS_MAX_BODY_BYTES={}", http.max_body_bytes);
    println!(
        "  METRICS_BLOCKING_INGEST_BYTES={}",
        http.blocking_ingest_bytes
    );
    println!(
        "  max_event_types={} max_future_skew={:?} max_field_bytes={}",
        config.max_event_types, config.max_future_skew, config.max_field_bytes
    );

    let processor = Arc::new(MetricsProcessor::restore(config)?);
    let service = MetricsService::new(Arc::clone(&processor), http);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "listening");

    let shutdown = Shutdown::new();
    shutdown.trigger_on(server_support::shutdown_signal());
    let started = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown.triggered().await;
            Instant::now()
        }
    });
    // Open connections get half of the budget; the processor shutdown and
    // snapshot get the rest.
    let serve = ServeConfig::default().with_drain_timeout(SHUTDOWN_BUDGET / 2);
    let report = http_kit::serve(listener, service, serve, shutdown).await;
    if !report.drained {
        tracing::warn!(
            open = report.left_open,
            "connections still open after the drain; closing them"
        );
    }
    let started = started.await?;
    let remaining = SHUTDOWN_BUDGET.saturating_sub(started.elapsed());
    tokio::task::spawn_blocking(move || processor.shutdown(remaining)).await??;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "shut down"
    );
    Ok(())
}

//! A metrics aggregation server: `metrics_core` behind its hyper adapter.
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

use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
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

    let graceful = GracefulShutdown::new();
    let shutdown = server_support::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service.clone());
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }

    let started = Instant::now();
    drop(listener);
    // Give open connections part of the budget; the processor shutdown and
    // snapshot get the rest.
    if tokio::time::timeout(SHUTDOWN_BUDGET / 2, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open after {:?}; closing them",
            SHUTDOWN_BUDGET / 2
        );
    }
    let remaining = SHUTDOWN_BUDGET.saturating_sub(started.elapsed());
    tokio::task::spawn_blocking(move || processor.shutdown(remaining)).await??;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "shut down"
    );
    Ok(())
}

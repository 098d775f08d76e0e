//! The notification server: WebSocket delivery, HTTP API, health and metrics.
//!
//! ```text
//! NOTIFY_JWT_SECRET=dev-secret-at-least-32-bytes-long!! \
//!   cargo run --release --features notify-server --example notify_server
//! ```
//!
//! Environment (an empty value counts as unset; the table with every
//! default is in docs/notify-hub/API.md):
//!
//! - `NOTIFY_ADDR`: listen address, default `127.0.0.1:8080`;
//! - `DATABASE_URL`: PostgreSQL store (pool of 16, migrated at start);
//!   unset: the in-memory store;
//! - `REDIS_URL`: Redis broker; unset: the local (single-node) broker;
//! - `NOTIFY_REDIS_PREFIX`: prefix of the Redis channel, default empty, so
//!   the channel is `notify:deliveries`; nodes that share live traffic must
//!   use the same prefix;
//! - `NOTIFY_JWT_SECRET` (HS256, at least 32 bytes) or
//!   `NOTIFY_JWT_PUBLIC_KEY` (path to an RS256 PEM): exactly one;
//! - `NOTIFY_JWT_ISSUER`, `NOTIFY_JWT_AUDIENCE`: optional;
//! - `NOTIFY_WRITE_THROUGH`: `0` queues live group items for each
//!   `notify.v2` connection's task instead of writing them through (ADR 0027);
//! - `NOTIFY_DEMO`: `0` turns off the browser demo client at `GET /demo`
//!   (on by default here; `ServerConfig::demo_page`);
//! - `NOTIFY_V1_GROUP_FANOUT`: `0` stops writing protocol v1's per-member
//!   copies of group sends (`HubConfig::v1_group_fanout`): a broadcast
//!   writes one stream item whatever the group's size and reaches only
//!   `notify.v2` connections; every node must agree;
//! - `RUST_LOG`: log filter, default `info`.
//!
//! SIGINT/SIGTERM drains gracefully: every acknowledged send is written to
//! its sockets, then they close with 1001.

#[path = "support/server.rs"]
mod server_support;

#[path = "support/fd_limit.rs"]
mod fd_limit;

use std::sync::Arc;

use jwt_kit::{JwtConfig, JwtVerifier, KeySet, VerifyingKey};
use notify_hub::server::{NotifyServer, ServerConfig};
use notify_hub::{Broker, Hub, HubConfig, LocalBroker, MemoryStore, Store};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    server_support::init_tracing();
    // Tens of thousands of sockets need as many descriptors.
    match fd_limit::raise_fd_limit(1_048_576) {
        Ok(n) => tracing::warn!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let addr = env("NOTIFY_ADDR").unwrap_or_else(|| "127.0.0.1:8080".into());

    let key = match (env("NOTIFY_JWT_SECRET"), env("NOTIFY_JWT_PUBLIC_KEY")) {
        (Some(secret), None) => VerifyingKey::hs256("default", secret.as_bytes()),
        (None, Some(path)) => VerifyingKey::rs256_pem("default", &std::fs::read(path)?)?,
        _ => return Err("set exactly one of NOTIFY_JWT_SECRET and NOTIFY_JWT_PUBLIC_KEY".into()),
    };
    let keys = KeySet::new().with_key(key)?.with_default_kid("default");
    let mut jwt = JwtConfig::default();
    if let Some(iss) = env("NOTIFY_JWT_ISSUER") {
        jwt = jwt.with_issuer(iss);
    }
    if let Some(aud) = env("NOTIFY_JWT_AUDIENCE") {
        jwt = jwt.with_audience(aud);
    }
    // One clock for the hub and the verifier, so they agree on expiry.
    let clock = time_kit::system();
    let verifier = JwtVerifier::new(keys, jwt)
        .with_cache(100_000)
        .with_clock(clock.clone());

    let store: Arc<dyn Store> = match env("DATABASE_URL") {
        Some(url) => {
            let pg = notify_hub::store::PgStore::connect(&url, 16).await?;
            let ran = pg.migrate().await?;
            tracing::info!(migrations = ran, "PostgreSQL store");
            Arc::new(pg)
        }
        None => {
            tracing::info!("in-memory store (set DATABASE_URL for PostgreSQL)");
            Arc::new(MemoryStore::new())
        }
    };
    let broker: Arc<dyn Broker> = match env("REDIS_URL") {
        Some(url) => {
            let prefix = env("NOTIFY_REDIS_PREFIX").unwrap_or_default();
            tracing::info!(channel = %format!("{prefix}notify:deliveries"), "Redis broker");
            Arc::new(notify_hub::broker::RedisBroker::connect(&url, &prefix).await?)
        }
        None => {
            tracing::info!("local broker: one node (set REDIS_URL for Redis)");
            Arc::new(LocalBroker::new())
        }
    };
    let fanout = env("NOTIFY_V1_GROUP_FANOUT").is_none_or(|v| v != "0");
    let config = HubConfig::default()
        .with_clock(clock)
        .with_v1_group_fanout(fanout);
    let hub = Hub::start(config, store, broker).await?;
    tracing::info!(v1_group_fanout = fanout, "hub started");
    let demo = env("NOTIFY_DEMO").is_none_or(|v| v != "0");
    let write_through = env("NOTIFY_WRITE_THROUGH").is_none_or(|v| v != "0");
    let config = ServerConfig::default()
        .with_demo_page(demo)
        .with_write_through(write_through);
    let server = NotifyServer::new(hub, verifier, config);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    tracing::info!(%addr, demo, "notify_server listening");
    if demo {
        tracing::info!("browser demo: http://{addr}/demo#token=<jwt>");
    }
    let report = server
        .serve(listener, server_support::shutdown_signal())
        .await;
    tracing::info!(
        drained = report.drained,
        left_open = report.left_open,
        "stopped"
    );
    Ok(())
}

//! The suite in one process: notify-hub's WebSocket server and HTTP API and
//! metrics-core's HTTP service behind gateway-mw's auth, RBAC and rate-limit
//! layers, composed with `tower::ServiceBuilder` and served by
//! `http_kit::serve`.
//!
//! ```text
//! SUITE_JWT_SECRET=a-32-byte-or-longer-shared-secret! cargo run --release --example suite
//! ```
//!
//! Tokens are HS256 JWTs signed with `SUITE_JWT_SECRET` (kid `k1`), with a
//! `roles` claim: `user` (connect to `/v1/ws`, `POST /v1/events`),
//! `analyst` (`GET /v1/aggregates`), `notifier` (`POST /v1/notifications`,
//! `GET /v1/users/{user}/notifications`). Each user may make 20 requests a
//! minute. Environment: `SUITE_ADDR` (default `127.0.0.1:8090`),
//! `SUITE_JWT_SECRET` (required, at least 32 bytes).
#![allow(clippy::print_stdout)]

#[path = "support/server.rs"]
mod server_support;
#[path = "support/suite.rs"]
mod suite;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    server_support::init_tracing();
    let addr = std::env::var("SUITE_ADDR").unwrap_or_else(|_| "127.0.0.1:8090".into());
    let secret = std::env::var("SUITE_JWT_SECRET")
        .map_err(|_| "set SUITE_JWT_SECRET (at least 32 bytes)")?;
    if secret.len() < 32 {
        return Err("SUITE_JWT_SECRET must be at least 32 bytes".into());
    }
    println!("suite effective configuration: SUITE_ADDR={addr} SUITE_JWT_SECRET=<redacted>");
    let (app, hub) = suite::app(secret.as_bytes()).await?;

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    tracing::info!(%addr, "suite listening");
    let shutdown = http_kit::Shutdown::new();
    shutdown.trigger_on(server_support::shutdown_signal());
    // On the signal: stop accepting (serve), and end the hub so open
    // WebSockets flush, close with 1001 and release the drain.
    let stopping = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.triggered().await;
            hub.shutdown(std::time::Duration::from_secs(5)).await;
        }
    };
    let serving = http_kit::serve(listener, app, http_kit::ServeConfig::default(), shutdown);
    let (report, ()) = tokio::join!(serving, stopping);
    tracing::info!(drained = report.drained, "stopped");
    Ok(())
}

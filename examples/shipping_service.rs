//! The order saga's shipping service: schedule and cancel shipments over
//! HTTP, on PostgreSQL or in memory.
//!
//! ```text
//! JWT_SECRET=dev-secret-0123456789abcdef0123456789 \
//!   cargo run --release --example shipping_service
//! ```
//!
//! Environment (an empty value counts as unset):
//!
//! - `BIND`: listen address, default `127.0.0.1:8083`;
//! - `DATABASE_URL`: PostgreSQL (schema `shipping`, migrated at start, a
//!   pool of 16); unset: in memory, nothing survives a restart;
//! - `JWT_SECRET` (required): the HS256 secret, at least 32 bytes, of the
//!   tokens callers send; they need the role `service`;
//! - `SHIPPING_COUNTRIES`: comma-separated ISO 3166-1 alpha-2 codes the
//!   carrier delivers to (`GB,FR,DE`); unset: everywhere;
//! - `RUST_LOG`: log filter, default `info`.
//!
//! Bad configuration exits with status 2 and one line saying why. SIGINT
//! or SIGTERM stops accepting and lets requests in flight finish. The API:
//! docs/order-saga/shipping.md.
#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "support/saga.rs"]
mod saga_support;
#[path = "support/server.rs"]
mod server_support;

use saga_support::{env, redacted};
use std::net::SocketAddr;
use std::sync::Arc;

use order_saga::http::shipping::{ShippingService, ShippingServiceConfig};
use order_saga::pg::PoolConfig;
use order_saga::shipping::{MemoryShipping, PgShipping, Shipping, ShippingConfig};

/// Exits with status 2 and one line: the configuration is wrong.
fn bad_config(message: impl std::fmt::Display) -> ! {
    eprintln!("shipping_service: {message}");
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    server_support::init_tracing();
    let bind: SocketAddr = env("BIND")
        .unwrap_or_else(|| "127.0.0.1:8083".to_owned())
        .parse()
        .unwrap_or_else(|e| bad_config(format!("BIND is not an address: {e}")));
    let Some(secret) = env("JWT_SECRET") else {
        bad_config("JWT_SECRET is required (the HS256 secret of callers' tokens, 32+ bytes)");
    };
    let clock = time_kit::system();
    let verifier = saga_support::hs256_verifier(&secret)
        .unwrap_or_else(|e| bad_config(format!("JWT_SECRET: {e}")))
        .with_clock(clock.clone());
    let mut config = ShippingConfig::default();
    if let Some(list) = env("SHIPPING_COUNTRIES") {
        let countries: Vec<&str> = list.split(',').map(str::trim).collect();
        if let Some(bad) = countries
            .iter()
            .find(|c| c.len() != 2 || !c.bytes().all(|b| b.is_ascii_alphabetic()))
        {
            bad_config(format!(
                "SHIPPING_COUNTRIES: {bad:?} is not an ISO 3166-1 alpha-2 code"
            ));
        }
        config = config.with_deliverable_countries(countries);
    }
    let service_config = ShippingServiceConfig::default();

    println!("shipping_service effective configuration:");
    println!("  BIND={bind}");
    match env("DATABASE_URL") {
        Some(url) => println!("  DATABASE_URL={} (schema shipping)", redacted(&url)),
        None => println!("  DATABASE_URL unset: in-memory store"),
    }
    println!(
        "  JWT_SECRET=(set, HS256; callers need role {:?})",
        service_config.role
    );
    match &config.deliverable_countries {
        Some(countries) => println!("  SHIPPING_COUNTRIES={}", countries.join(",")),
        None => println!("  SHIPPING_COUNTRIES unset: delivers everywhere"),
    }
    println!("  max body: {} bytes", service_config.max_body_bytes);

    let (shipping, probe): (Arc<dyn Shipping>, Option<PgShipping>) = match env("DATABASE_URL") {
        Some(url) => {
            let pool = order_saga::pg::pool(&url, &PoolConfig::default())
                .unwrap_or_else(|e| bad_config(format!("DATABASE_URL: {e}")));
            let pg = PgShipping::new(pool, config, clock);
            match pg.migrate().await {
                Ok(ran) => tracing::info!(migrations = ran, "PostgreSQL store ready"),
                Err(e) => {
                    eprintln!("shipping_service: migrating schema shipping failed: {e}");
                    std::process::exit(1);
                }
            }
            (Arc::new(pg.clone()), Some(pg))
        }
        None => (Arc::new(MemoryShipping::new(config, clock)), None),
    };
    let mut service = ShippingService::new(shipping, verifier, service_config);
    if let Some(pg) = probe {
        service = service.with_readiness("postgresql", move || {
            let pg = pg.clone();
            async move { pg.ping().await.is_ok() }
        });
    }

    let listener = match tokio::net::TcpListener::bind(bind).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("shipping_service: cannot listen on {bind}: {e}");
            std::process::exit(1);
        }
    };
    let shutdown = http_kit::Shutdown::new();
    shutdown.trigger_on(server_support::shutdown_signal());
    tracing::info!(%bind, "shipping_service listening");
    let report = http_kit::serve(
        listener,
        service,
        http_kit::ServeConfig::default(),
        shutdown,
    )
    .await;
    tracing::info!(
        drained = report.drained,
        left_open = report.left_open,
        "stopped"
    );
}

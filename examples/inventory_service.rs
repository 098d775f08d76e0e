//! The order saga's inventory service: stock per SKU, reserved with a TTL,
//! then committed or released, over HTTP, on PostgreSQL or in memory, with
//! the sweeper that gives back expired reservations.
//!
//! ```text
//! JWT_SECRET=dev-secret-0123456789abcdef0123456789 \
//!   cargo run --release --example inventory_service
//! ```
//!
//! Environment (an empty value counts as unset):
//!
//! - `BIND`: listen address, default `127.0.0.1:8082`;
//! - `DATABASE_URL`: PostgreSQL (schema `inventory`, migrated at start, a
//!   pool of 16); unset: in memory, nothing survives a restart;
//! - `JWT_SECRET` (required): the HS256 secret, at least 32 bytes, of the
//!   tokens callers send; the order service needs the role `service`,
//!   restocking needs `admin`;
//! - `RUST_LOG`: log filter, default `info`.
//!
//! Bad configuration exits with status 2 and one line saying why. SIGINT
//! or SIGTERM stops accepting, lets requests in flight finish, then stops
//! the sweeper. The API: docs/order-saga/inventory.md.
#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "support/saga.rs"]
mod saga_support;
#[path = "support/server.rs"]
mod server_support;

use saga_support::{env, redacted};
use std::net::SocketAddr;
use std::sync::Arc;

use order_saga::http::inventory::{InventoryHttpConfig, InventoryService, ReadyCheck};
use order_saga::inventory::{Inventory, MemoryInventory, PgInventory, Sweeper, SweeperConfig};
use order_saga::pg::PoolConfig;

/// Exits with status 2 and one line: the configuration is wrong.
fn bad_config(message: impl std::fmt::Display) -> ! {
    eprintln!("inventory_service: {message}");
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    server_support::init_tracing();
    let bind: SocketAddr = env("BIND")
        .unwrap_or_else(|| "127.0.0.1:8082".to_owned())
        .parse()
        .unwrap_or_else(|e| bad_config(format!("BIND is not an address: {e}")));
    let Some(secret) = env("JWT_SECRET") else {
        bad_config("JWT_SECRET is required (the HS256 secret of callers' tokens, 32+ bytes)");
    };
    let clock = time_kit::system();
    let verifier = saga_support::hs256_verifier(&secret)
        .unwrap_or_else(|e| bad_config(format!("JWT_SECRET: {e}")))
        .with_clock(clock.clone());
    let sweeper_config = SweeperConfig::default();
    let pool_config = PoolConfig::default();
    let mut http_config = InventoryHttpConfig::default();

    println!("inventory_service effective configuration:");
    println!("  BIND={bind}");
    match env("DATABASE_URL") {
        Some(url) => println!(
            "  DATABASE_URL={} (schema inventory, pool of {})",
            redacted(&url),
            pool_config.max_size
        ),
        None => println!("  DATABASE_URL unset: in-memory store"),
    }
    println!("  JWT_SECRET=(set, HS256; reservations need role service, restock and sweep admin)");
    println!(
        "  sweeper: every {:?}, {} reservations a batch",
        sweeper_config.interval, sweeper_config.batch
    );
    println!("  max body: {} bytes", http_config.max_body_bytes);

    let inventory: Arc<dyn Inventory> = match env("DATABASE_URL") {
        Some(url) => {
            let pool = order_saga::pg::pool(&url, &pool_config)
                .unwrap_or_else(|e| bad_config(format!("DATABASE_URL: {e}")));
            let pg = PgInventory::new(pool, clock);
            match pg.migrate().await {
                Ok(ran) => tracing::info!(migrations = ran, "PostgreSQL store ready"),
                Err(e) => {
                    eprintln!("inventory_service: migrating schema inventory failed: {e}");
                    std::process::exit(1);
                }
            }
            let probe = pg.clone();
            http_config = http_config.with_ready_check(ReadyCheck::new("postgresql", move || {
                let pg = probe.clone();
                async move { pg.ping().await }
            }));
            Arc::new(pg)
        }
        None => Arc::new(MemoryInventory::new(clock)),
    };
    let sweeper = Sweeper::spawn(Arc::clone(&inventory), sweeper_config);
    let service = InventoryService::new(
        inventory,
        verifier,
        http_config.with_sweeper(sweeper.stats().clone()),
    );

    let listener = match tokio::net::TcpListener::bind(bind).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("inventory_service: cannot listen on {bind}: {e}");
            std::process::exit(1);
        }
    };
    let shutdown = http_kit::Shutdown::new();
    shutdown.trigger_on(server_support::shutdown_signal());
    tracing::info!(%bind, "inventory_service listening");
    let report = http_kit::serve(
        listener,
        service,
        http_kit::ServeConfig::default(),
        shutdown,
    )
    .await;
    sweeper.stop().await;
    tracing::info!(
        drained = report.drained,
        left_open = report.left_open,
        "stopped"
    );
}

//! order_service: the order saga over HTTP — alone it runs all four
//! services in one process; pointed at the others, it orchestrates them.
//!
//! ```text
//! # everything in one process, in memory:
//! JWT_SECRET=dev-secret cargo run --release --example order_service -- --seed-skus 100 --seed-stock 1000
//! # durable: PostgreSQL (orders, inventory, shipping schemas) and Redis Streams:
//! DATABASE_URL=postgres://… REDIS_URL=redis://… JWT_SECRET=… cargo run --release --example order_service
//! # the other services in their own processes:
//! … order_service -- --inventory-url http://127.0.0.1:8082 --shipping-url http://127.0.0.1:8083 --payment-url http://127.0.0.1:8090
//! ```
//!
//! Environment: `BIND` (default `127.0.0.1:8081`), `JWT_SECRET` (required:
//! HS256 secret of the customers' tokens, shared with the other services),
//! `DATABASE_URL` and `REDIS_URL` (optional), `ORDER_INSTANCE_ID` (stable
//! across restarts so a restarted process resumes its sagas at once),
//! `RUST_LOG`. The API is in `docs/order-saga/API.md`.

#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "support/saga.rs"]
mod saga_support;
#[path = "support/server.rs"]
mod server_support;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use order_saga::http::shipping::HttpShipping;
use order_saga::http::{ClientConfig, HttpInventory, JsonClient, OrderHttp};
use order_saga::inventory::memory::MemoryInventory;
use order_saga::inventory::postgres::PgInventory;
use order_saga::inventory::sweeper::{Sweeper, SweeperConfig};
use order_saga::inventory::{Inventory, Restock};
use order_saga::messaging::memory::MemoryBus;
use order_saga::messaging::outbox::PgOutboxSource;
use order_saga::messaging::redis::{
    RedisStreamPublisher, StreamConsumer, StreamConsumerConfig, StreamPublisherConfig,
};
use order_saga::messaging::relay::{OutboxRelay, RelayConfig};
use order_saga::messaging::timeline::{MemoryTimeline, OrderTimeline};
use order_saga::messaging::{EventHandler, EventPublisher};
use order_saga::order::store::memory::MemoryOrderStore;
use order_saga::order::store::postgres::PgOrderStore;
use order_saga::payment::Payments;
use order_saga::payment::provider::HttpPaymentProvider;
use order_saga::payment::resilient::{ResilientConfig, ResilientPayments};
use order_saga::payment::sim::{SimConfig, Simulator};
use order_saga::pg::{PoolConfig, pool};
use order_saga::shipping::Shipping;
use order_saga::shipping::memory::MemoryShipping;
use order_saga::shipping::postgres::PgShipping;
use order_saga::{OrderConfig, OrderService, OrderStore, Services, Sku};

/// The order service.
#[derive(Debug, Parser)]
#[command(name = "order_service", version)]
struct Args {
    /// Listen address.
    #[arg(long, env = "BIND", default_value = "127.0.0.1:8081")]
    bind: SocketAddr,
    /// HS256 secret of the callers' tokens (and of the service token sent to the other services).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// PostgreSQL: orders, and the in-process inventory and shipping. In memory when unset.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Redis: the outbox relay publishes to a stream there. An in-memory bus when unset.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Key prefix of the stream in Redis.
    #[arg(long, env = "REDIS_PREFIX", default_value = "order-saga:")]
    redis_prefix: String,
    /// The inventory service; in process when unset.
    #[arg(long)]
    inventory_url: Option<String>,
    /// The shipping service; in process when unset.
    #[arg(long)]
    shipping_url: Option<String>,
    /// The payment provider (e.g. payment_sim); an in-process simulator without faults when unset.
    #[arg(long)]
    payment_url: Option<String>,
    /// This instance's id (unique among running instances; keep it across restarts).
    #[arg(long, env = "ORDER_INSTANCE_ID")]
    instance_id: Option<String>,
    /// PostgreSQL connections.
    #[arg(long, env = "ORDER_DB_POOL", default_value_t = 32)]
    db_pool: u32,
    /// Sagas driven at once. Most of a saga's time is spent waiting on the
    /// payment provider, and its transitions are group-committed, so many
    /// drivers share a few connections (docs/PERFORMANCE.md, "order-saga").
    #[arg(long, env = "ORDER_MAX_SAGAS", default_value_t = 512)]
    max_sagas: usize,
    /// Skip the order-timeline consumer (run consumers elsewhere).
    #[arg(long)]
    no_timeline: bool,
    /// How long stock is held for an unfinished order, in seconds.
    #[arg(long, default_value_t = 900)]
    reservation_ttl_secs: u64,
    /// At start, stock SKU-0 … SKU-(N-1) (development and load tests).
    #[arg(long, default_value_t = 0)]
    seed_skus: usize,
    /// Units added to each seeded SKU.
    #[arg(long, default_value_t = 1000)]
    seed_stock: u32,
}

#[tokio::main]
async fn main() -> ExitCode {
    server_support::init_tracing();
    let args = Args::parse();
    let Some(secret) = args.jwt_secret.clone().filter(|s| !s.is_empty()) else {
        eprintln!(
            "order_service: JWT_SECRET is required (the HS256 secret of the callers' tokens)"
        );
        return ExitCode::from(2);
    };
    match run(args, secret).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("order_service: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, secret: String) -> Result<(), Box<dyn std::error::Error>> {
    let clock = time_kit::system();
    let pg = match &args.database_url {
        Some(url) => Some(pool(
            url,
            &PoolConfig {
                max_size: args.db_pool,
                ..PoolConfig::default()
            },
        )?),
        None => None,
    };
    // The token this service shows the inventory and shipping services.
    let service_token = saga_support::mint_token(
        &secret,
        "order-service",
        &["service"],
        Duration::from_secs(30 * 24 * 3600),
    )?;
    let client = |url: &str| ClientConfig::new(url).with_bearer_token(service_token.clone());

    let mut background = Vec::new();
    let inventory: Arc<dyn Inventory> = match (&args.inventory_url, &pg) {
        (Some(url), _) => Arc::new(HttpInventory::new(client(url))?),
        (None, Some(pg)) => {
            let inventory = PgInventory::new(pg.clone(), clock.clone());
            inventory.migrate().await?;
            Arc::new(inventory)
        }
        (None, None) => Arc::new(MemoryInventory::new(clock.clone())),
    };
    if args.inventory_url.is_none() {
        background.push(Sweeper::spawn(inventory.clone(), SweeperConfig::default()));
    }
    let shipping: Arc<dyn Shipping> = match (&args.shipping_url, &pg) {
        (Some(url), _) => Arc::new(HttpShipping::new(JsonClient::new(client(url))?)),
        (None, Some(pg)) => {
            let shipping = PgShipping::new(pg.clone(), Default::default(), clock.clone());
            shipping.migrate().await?;
            Arc::new(shipping)
        }
        (None, None) => Arc::new(MemoryShipping::default()),
    };
    let payments: Arc<dyn Payments> = match &args.payment_url {
        Some(url) => Arc::new(ResilientPayments::new(
            HttpPaymentProvider::new(ClientConfig::new(url))?,
            ResilientConfig::default(),
        )?),
        None => Arc::new(ResilientPayments::new(
            Simulator::new(SimConfig::default())?,
            ResilientConfig::default(),
        )?),
    };

    // Orders, and the outbox relay to the bus.
    let publisher: Arc<dyn EventPublisher> = match &args.redis_url {
        Some(url) => Arc::new(
            RedisStreamPublisher::connect(
                &redis_kit::RedisSetup::new(url.clone()),
                StreamPublisherConfig::new(&args.redis_prefix)?,
            )
            .await?,
        ),
        None => Arc::new(MemoryBus::default()),
    };
    let (store, relay): (Arc<dyn OrderStore>, _) = match (&pg, &args.database_url) {
        (Some(pg), Some(url)) => {
            let store = PgOrderStore::new(pg.clone());
            store.migrate().await?;
            (
                Arc::new(store),
                OutboxRelay::new(
                    PgOutboxSource::from_url(url)?,
                    publisher.clone(),
                    // The store appends without NOTIFY: the relay polls often.
                    RelayConfig {
                        poll_interval: Duration::from_millis(50),
                        ..RelayConfig::default()
                    },
                )
                .spawn(),
            )
        }
        _ => {
            let store = MemoryOrderStore::new(clock.clone());
            let relay = OutboxRelay::new(
                store.outbox().source(),
                publisher.clone(),
                RelayConfig::default(),
            )
            .spawn();
            (Arc::new(store), relay)
        }
    };
    // The service's own consumer: every event of an order, once, in its timeline.
    let timeline: Arc<dyn EventHandler> = match &pg {
        Some(pg) => Arc::new(OrderTimeline::new(pg.clone())),
        None => Arc::new(MemoryTimeline::new()),
    };
    let consumer = match args.redis_url.as_ref().filter(|_| !args.no_timeline) {
        Some(url) => Some(
            StreamConsumer::connect(
                &redis_kit::RedisSetup::new(url.clone()),
                StreamConsumerConfig::new(&args.redis_prefix, "order-timeline")?,
                timeline,
            )
            .await?
            .spawn(),
        ),
        None => None,
    };

    let mut config = OrderConfig {
        reservation_ttl: Duration::from_secs(args.reservation_ttl_secs),
        max_concurrent_sagas: args.max_sagas,
        ..OrderConfig::default()
    };
    if let Some(id) = &args.instance_id {
        config.instance_id = id.clone();
    }
    let services = Services {
        inventory: inventory.clone(),
        payments,
        shipping,
    };
    let service = OrderService::new(store, services, config, clock);
    seed(&inventory, args.seed_skus, args.seed_stock).await?;

    println!(
        "order_service on http://{}: instance {}, orders {}, inventory {}, shipping {}, payments {}, bus {}",
        args.bind,
        service.config().instance_id,
        if pg.is_some() { "postgres" } else { "memory" },
        args.inventory_url.as_deref().unwrap_or(if pg.is_some() {
            "in process (postgres)"
        } else {
            "in process (memory)"
        }),
        args.shipping_url.as_deref().unwrap_or(if pg.is_some() {
            "in process (postgres)"
        } else {
            "in process (memory)"
        }),
        args.payment_url
            .as_deref()
            .unwrap_or("in-process simulator"),
        if args.redis_url.is_some() {
            "redis streams"
        } else {
            "memory"
        },
    );
    let running = service.start();
    let verifier = saga_support::hs256_verifier(&secret)?;
    let listener = tokio::net::TcpListener::bind(args.bind).await?;
    let shutdown = http_kit::Shutdown::new();
    shutdown.trigger_on(server_support::shutdown_signal());
    http_kit::serve(
        listener,
        OrderHttp::new(service, verifier),
        http_kit::ServeConfig::default(),
        shutdown,
    )
    .await;
    running.shutdown().await;
    relay.shutdown().await;
    if let Some(consumer) = consumer {
        consumer.shutdown().await;
    }
    drop(background);
    Ok(())
}

async fn seed(
    inventory: &Arc<dyn Inventory>,
    skus: usize,
    stock: u32,
) -> Result<(), Box<dyn std::error::Error>> {
    for i in 0..skus {
        let sku = Sku::parse(format!("SKU-{i}"))?;
        inventory
            .restock(Restock {
                sku,
                quantity: stock,
                unit_price_cents: Some(100 + (i as i64 % 50) * 25),
            })
            .await?;
    }
    Ok(())
}

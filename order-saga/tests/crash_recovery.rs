//! Crash recovery: order-service processes are killed with SIGKILL (or abort
//! themselves at a saga step chosen at random, through the fault-injection
//! hook) while they create orders and drive sagas; after every restart the
//! new process resumes what the dead one left, and at the end every saga
//! is terminal and nothing is oversold, orphaned, double-charged or
//! shipped for a cancelled order.
//!
//! The test re-runs its own binary as the child process (an environment
//! variable tells it to play the order service). `ORDER_SAGA_CRASH_RUNS`
//! sets the number of kills (default 100).
#![cfg(all(feature = "postgres", feature = "http"))]
// The run's figures go to stderr (shown with --nocapture).
#![allow(clippy::print_stderr)]

mod support;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use order_saga::http::ClientConfig;
use order_saga::http::payment_sim::PaymentSimService;
use order_saga::inventory::Inventory;
use order_saga::inventory::postgres::PgInventory;
use order_saga::order::store::postgres::PgOrderStore;
use order_saga::payment::PaymentState;
use order_saga::payment::provider::HttpPaymentProvider;
use order_saga::payment::resilient::{ResilientConfig, ResilientPayments};
use order_saga::payment::sim::{SimConfig, Simulator};
use order_saga::pg::{PoolConfig, pool};
use order_saga::shipping::postgres::PgShipping;
use order_saga::{CreateOutcome, OrderConfig, OrderService, OrderState, Services};
use serde::{Deserialize, Serialize};
use support::*;
use testkit::TestDatabase;

const CHILD_ENV: &str = "ORDER_SAGA_CRASH_CHILD";
const TEST_NAME: &str = "orders_survive_sigkill_at_random_points";
const SKUS: usize = 8;
const INITIAL_STOCK: u32 = 400;

#[derive(Serialize, Deserialize)]
struct ChildSpec {
    db_url: String,
    payment_url: String,
    run: usize,
    orders: usize,
    /// `before:<step>` / `after:<step>` and which occurrence aborts the process.
    crash_at: Option<(String, usize)>,
    /// Exit once every saga is terminal.
    finish: bool,
}

#[test]
fn orders_survive_sigkill_at_random_points() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(serde_json::from_str(&spec).expect("child spec"));
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(parent());
}

async fn parent() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let runs: usize = std::env::var("ORDER_SAGA_CRASH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    // The payment provider outlives the order service: its ledger is the truth.
    let sim = Arc::new(
        Simulator::new(
            SimConfig::default()
                .with_decline_rate(0.2)
                .with_lost_reply_rate(0.1)
                .with_latency(Duration::from_millis(3), Duration::from_millis(10)),
        )
        .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let payment_url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = http_kit::Shutdown::new();
    let server = tokio::spawn(http_kit::serve(
        listener,
        PaymentSimService::new(sim.clone()),
        http_kit::ServeConfig::default(),
        shutdown.clone(),
    ));

    let pg = pool(db.url(), &PoolConfig::default()).unwrap();
    PgOrderStore::new(pg.clone()).migrate().await.unwrap();
    let inventory = PgInventory::new(pg.clone(), time_kit::system());
    inventory.migrate().await.unwrap();
    PgShipping::new(pg.clone(), Default::default(), time_kit::system())
        .migrate()
        .await
        .unwrap();
    let inventory: Arc<dyn Inventory> = Arc::new(inventory);
    for s in 0..SKUS {
        stock(&inventory, &format!("S{s}"), INITIAL_STOCK, 100 + s as i64).await;
    }

    let points = [
        "before:reserve_stock",
        "after:reserve_stock",
        "before:authorize_payment",
        "after:authorize_payment",
        "after:schedule_shipment",
        "after:commit_stock",
        "after:capture_payment",
        "after:undo_payment",
        "after:release_stock",
    ];
    let mut aborted = 0;
    for run in 0..runs {
        let crash_at = (run % 2 == 0).then(|| {
            (
                points[fastrand::usize(..points.len())].to_owned(),
                1 + fastrand::usize(..5),
            )
        });
        let mut child = spawn_child(&ChildSpec {
            db_url: db.url().to_owned(),
            payment_url: payment_url.clone(),
            run,
            orders: 12,
            crash_at,
            finish: false,
        });
        // The kill lands at a random moment of the child's work (the sleep is
        // the fault's timing, not a synchronization).
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(30 + fastrand::u64(..300));
        loop {
            if child.try_wait().unwrap().is_some() {
                aborted += 1;
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // A last process resumes everything and exits when every saga is over.
    let mut last = spawn_child(&ChildSpec {
        db_url: db.url().to_owned(),
        payment_url: payment_url.clone(),
        run: runs,
        orders: 0,
        crash_at: None,
        finish: true,
    });
    // Every saga must end within two minutes; a hang is a failure.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = last.try_wait().unwrap() {
            break status;
        }
        if tokio::time::Instant::now() >= deadline {
            last.kill().unwrap();
            panic!("sagas still unfinished two minutes after the last restart");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "the final process failed: {status}");

    verify(&pg, &sim, &inventory).await;
    eprintln!("{runs} runs, {aborted} ended by the fault hook, the rest by SIGKILL");
    shutdown.trigger();
    let _ = server.await;
}

fn spawn_child(spec: &ChildSpec) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, serde_json::to_string(spec).unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

async fn verify(pg: &order_saga::pg::PgPool, sim: &Simulator, inventory: &Arc<dyn Inventory>) {
    let conn = pg.get().await.unwrap();
    let rows = conn
        .query(
            "SELECT id, state, total_cents, lines FROM orders.orders",
            &[],
        )
        .await
        .unwrap();
    assert!(!rows.is_empty());
    let mut sold = [0i64; SKUS];
    let mut states: HashMap<String, usize> = HashMap::new();
    let mut by_order: HashMap<order_saga::OrderId, Vec<order_saga::payment::Payment>> =
        HashMap::new();
    for entry in sim.entries() {
        by_order
            .entry(entry.payment.order_id)
            .or_default()
            .push(entry.payment);
    }
    for row in &rows {
        let id: uuid::Uuid = row.get(0);
        let id = order_saga::OrderId::from_uuid(id);
        let state: String = row.get(1);
        *states.entry(state.clone()).or_default() += 1;
        assert!(
            state == "confirmed" || state == "cancelled",
            "order {id} ended {state}"
        );
        let payments = by_order.get(&id).cloned().unwrap_or_default();
        assert!(payments.len() <= 1, "double charge for {id}: {payments:?}");
        let shipment: Option<String> = conn
            .query_opt(
                "SELECT state FROM shipping.shipments WHERE order_id = $1",
                &[&id.as_uuid()],
            )
            .await
            .unwrap()
            .map(|r| r.get(0));
        if state == "confirmed" {
            let payment = payments.first().expect("confirmed orders are paid");
            assert_eq!(payment.state, PaymentState::Captured, "{id}");
            assert_eq!(payment.amount_cents, row.get::<_, i64>(2));
            assert_eq!(shipment.as_deref(), Some("scheduled"), "{id}");
            let lines: Vec<order_saga::OrderLine> = serde_json::from_value(row.get(3)).unwrap();
            for line in lines {
                sold[line.sku.as_str()[1..].parse::<usize>().unwrap()] += i64::from(line.quantity);
            }
        } else {
            if let Some(payment) = payments.first() {
                assert!(
                    !matches!(
                        payment.state,
                        PaymentState::Authorized | PaymentState::Captured
                    ),
                    "cancelled {id} left {:?}",
                    payment.state
                );
            }
            assert!(
                shipment.is_none() || shipment.as_deref() == Some("cancelled"),
                "cancelled {id} has a live shipment"
            );
        }
    }
    let held: i64 = conn
        .query_one(
            "SELECT count(*) FROM inventory.reservations WHERE state = 'reserved'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 0, "orphaned reservations");
    for (s, sold) in sold.iter().enumerate() {
        let level = inventory.stock(&sku(&format!("S{s}"))).await.unwrap();
        assert_eq!((level.reserved, level.committed), (0, *sold), "S{s}");
        assert_eq!(
            level.available + level.committed,
            i64::from(INITIAL_STOCK),
            "S{s}"
        );
    }
    eprintln!("orders by state: {states:?}");
}

fn child(spec: ChildSpec) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let clock = time_kit::system();
        let pg = pool(
            &spec.db_url,
            &PoolConfig {
                connection_timeout: Duration::from_secs(30),
                ..PoolConfig::default()
            },
        )
        .unwrap();
        let provider = HttpPaymentProvider::new(
            ClientConfig::new(&spec.payment_url).with_timeout(Duration::from_millis(500)),
        )
        .unwrap();
        let services = Services {
            inventory: Arc::new(PgInventory::new(pg.clone(), clock.clone())),
            payments: Arc::new(
                ResilientPayments::new(provider, ResilientConfig::default()).unwrap(),
            ),
            shipping: Arc::new(PgShipping::new(
                pg.clone(),
                Default::default(),
                clock.clone(),
            )),
        };
        // One id across restarts: a new process resumes the dead one's sagas at once.
        let config = OrderConfig {
            instance_id: "crash-test".into(),
            poll_interval: Duration::from_millis(20),
            retry_base: Duration::from_millis(2),
            retry_max: Duration::from_millis(50),
            ..OrderConfig::default()
        };
        let mut service = OrderService::new(
            Arc::new(PgOrderStore::new(pg.clone())),
            services,
            config,
            clock,
        );
        if let Some((point, nth)) = spec.crash_at.clone() {
            let seen = std::sync::atomic::AtomicUsize::new(0);
            service = service.with_fault_hook(Arc::new(move |at: &str| {
                if at == point && seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == nth
                {
                    std::process::abort();
                }
            }));
        }
        let running = service.start();
        let mut tasks = Vec::new();
        for i in 0..spec.orders {
            let service = service.clone();
            let run = spec.run;
            tasks.push(tokio::spawn(async move {
                let a = format!("S{}", (run + i) % SKUS);
                let b = format!("S{}", (run * 3 + i * 5 + 1) % SKUS);
                let items: Vec<(&str, u32)> = if a == b {
                    vec![(&a, 1)]
                } else {
                    vec![(&a, 1), (&b, 1)]
                };
                let _: Option<CreateOutcome> = service
                    .create_order(
                        &customer(&format!("c{}", i % 7)),
                        cart(&items),
                        &format!("r{run}-{i}"),
                    )
                    .await
                    .ok();
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
        if spec.finish {
            loop {
                let counts = service.count_by_state().await.unwrap();
                let open: u64 = counts
                    .iter()
                    .filter(|(s, _)| !s.is_terminal())
                    .map(|(_, n)| n)
                    .sum();
                let attention = counts
                    .iter()
                    .find(|(s, _)| *s == OrderState::NeedsAttention)
                    .map_or(0, |(_, n)| *n);
                assert_eq!(attention, 0, "a saga needs attention");
                if open == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            running.shutdown().await;
        } else {
            // Work until killed.
            std::future::pending::<()>().await;
        }
    });
}

//! The PostgreSQL inventory against a real server, one fresh database per
//! test (testkit): the conformance suite, 1,000 concurrent reservations of
//! one hot SKU, multi-line reservations in opposite orders, concurrent
//! sweepers, the sweeper's 1 s promise, and an unreachable server.
#![cfg(feature = "postgres")]

mod inventory_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use inventory_support::{Harness, conformance, counts, manual_clock, new_id, request, restock};
use order_saga::inventory::postgres::BatchConfig;
use order_saga::inventory::{
    Inventory, InventoryError, PgInventory, ReservationState, Sweeper, SweeperConfig,
};
use order_saga::pg::{PoolConfig, pool};
use testkit::TestDatabase;
use time_kit::ManualClock;

/// A migrated inventory on a fresh database, with a pool of `max_size`
/// whose callers wait up to a minute for a connection (the concurrency
/// tests queue a thousand tasks on 16 connections).
async fn setup(max_size: u32) -> Option<(TestDatabase, PgInventory, ManualClock)> {
    let db = TestDatabase::create().await?;
    let config = PoolConfig {
        max_size,
        connection_timeout: Duration::from_secs(60),
        ..PoolConfig::default()
    };
    let clock = manual_clock();
    let inventory = PgInventory::new(pool(db.url(), &config).unwrap(), Arc::new(clock.clone()));
    assert_eq!(inventory.migrate().await.unwrap(), 1);
    Some((db, inventory, clock))
}

#[tokio::test]
async fn pg_inventory_conforms() {
    let Some((_db, inventory, clock)) = setup(4).await else {
        return;
    };
    conformance(&Harness {
        inventory: Arc::new(inventory),
        clock,
    })
    .await;
}

#[tokio::test]
async fn pg_inventory_conforms_without_batching() {
    let Some((_db, inventory, clock)) = setup(4).await else {
        return;
    };
    conformance(&Harness {
        inventory: Arc::new(inventory.with_batching(BatchConfig::disabled())),
        clock,
    })
    .await;
}

#[tokio::test]
async fn migrations_run_once_and_the_schema_has_the_sweeper_index() {
    let Some((db, inventory, _clock)) = setup(2).await else {
        return;
    };
    assert_eq!(inventory.migrate().await.unwrap(), 0);
    let client = db.connect().await;
    let index: String = client
        .query_one(
            "SELECT indexdef FROM pg_indexes
              WHERE schemaname = 'inventory' AND indexname = 'reservations_sweep_idx'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(index.contains("(expires_at)"), "{index}");
    assert!(
        index.contains("WHERE (state = 'reserved'::text)"),
        "{index}"
    );
    let index: String = client
        .query_one(
            "SELECT indexdef FROM pg_indexes
              WHERE schemaname = 'inventory' AND indexname = 'reservation_lines_open_idx'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        index.contains("(sku) INCLUDE (quantity) WHERE open"),
        "{index}"
    );
    // The CHECKs stand behind the conditional updates.
    let err = client
        .batch_execute(
            "INSERT INTO inventory.skus (sku, available, unit_price_cents, created_at, updated_at)
             VALUES ('x', -1, 0, now(), now())",
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION)
    );
    inventory.ping().await.unwrap();
    // Rows that contradict each other are reported, not trusted: open
    // lines holding more than the SKU's `held`.
    client
        .batch_execute(
            "INSERT INTO inventory.skus (sku, available, held, unit_price_cents, created_at, updated_at)
             VALUES ('odd', 0, 1, 0, now(), now());
             INSERT INTO inventory.reservations VALUES
                 ('00000000-0000-0000-0000-000000000001', 'reserved', now(), now(), now());
             INSERT INTO inventory.reservation_lines (reservation_id, sku, quantity, unit_price_cents)
             VALUES ('00000000-0000-0000-0000-000000000001', 'odd', 5, 0);",
        )
        .await
        .unwrap();
    let err = inventory
        .stock(&inventory_support::sku("odd"))
        .await
        .unwrap_err();
    assert!(matches!(err, InventoryError::Unavailable(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_reservations_of_stock_100_sell_exactly_100() {
    thousand_against_100(BatchConfig::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_reservations_of_stock_100_sell_exactly_100_one_by_one() {
    thousand_against_100(BatchConfig::disabled()).await;
}

async fn thousand_against_100(batching: BatchConfig) {
    let Some((db, inventory, _clock)) = setup(16).await else {
        return;
    };
    let inventory = Arc::new(inventory.with_batching(batching));
    restock(&*inventory, "hot", 100, Some(999)).await;
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let inventory = Arc::clone(&inventory);
            tokio::spawn(async move {
                inventory
                    .reserve(request(new_id(), &[("hot", 1)], Duration::from_secs(600)))
                    .await
            })
        })
        .collect();
    let (mut ok, mut out_of_stock) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.state, ReservationState::Reserved);
                ok += 1;
            }
            Err(InventoryError::OutOfStock { available, .. }) => {
                assert_eq!(available, 0);
                out_of_stock += 1;
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!((ok, out_of_stock), (100, 900));
    assert_eq!(counts(&*inventory, "hot").await, (0, 100, 0));
    // The rows agree with the counts: 100 reservations of one unit each,
    // and no line left by a refused one.
    let client = db.connect().await;
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM inventory.reservations WHERE state = 'reserved'),
                    (SELECT count(*) FROM inventory.reservations),
                    (SELECT coalesce(sum(quantity), 0)::bigint FROM inventory.reservation_lines)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2)
        ),
        (100, 100, 100)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_line_reservations_in_opposite_orders_do_not_deadlock() {
    let Some((_db, inventory, clock)) = setup(16).await else {
        return;
    };
    let inventory = Arc::new(inventory);
    for name in ["x", "y", "z"] {
        restock(&*inventory, name, 100_000, Some(5)).await;
    }
    // Reserves in both SKU orders, each then committed or released (which
    // lock several SKU rows at once), while two sweepers give back the
    // short-lived ones: every lock path runs against every other.
    let sweepers: Vec<_> = (0..2)
        .map(|_| {
            Sweeper::spawn(
                inventory.clone(),
                SweeperConfig::default()
                    .with_interval(Duration::from_millis(5))
                    .with_batch(7),
            )
        })
        .collect();
    let ticker = {
        let clock = clock.clone();
        tokio::spawn(async move {
            for _ in 0..200 {
                clock.advance(Duration::from_millis(50));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let tasks: Vec<_> = (0..400)
        .map(|n| {
            let inventory = Arc::clone(&inventory);
            tokio::spawn(async move {
                let items: &[(&str, u32)] = match n % 4 {
                    0 => &[("x", 1), ("y", 2), ("z", 3)],
                    1 => &[("z", 3), ("y", 2), ("x", 1)],
                    2 => &[("y", 1), ("x", 1)],
                    _ => &[("z", 2), ("x", 1)],
                };
                let ttl = if n % 5 == 0 {
                    Duration::from_millis(1)
                } else {
                    Duration::from_secs(3600)
                };
                let id = new_id();
                inventory.reserve(request(id, items, ttl)).await?;
                if n % 2 == 0 {
                    match inventory.commit(id).await {
                        Ok(_) | Err(InventoryError::ReservationExpired(_)) => {}
                        Err(e) => return Err(e),
                    }
                } else {
                    inventory.release(id).await?;
                }
                Ok::<_, InventoryError>(())
            })
        })
        .collect();
    for task in tasks {
        if let Err(e) = task.await.unwrap() {
            panic!("a transaction failed (a deadlock would show here): {e:?}");
        }
    }
    ticker.await.unwrap();
    clock.advance(Duration::from_secs(7200));
    while inventory.sweep_expired(1000).await.unwrap() > 0 {}
    for sweeper in sweepers {
        assert_eq!(sweeper.stats().errors(), 0);
        sweeper.stop().await;
    }
    for name in ["x", "y", "z"] {
        let (available, reserved, committed) = counts(&*inventory, name).await;
        assert_eq!(reserved, 0, "{name}");
        assert_eq!(available + committed, 100_000, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sweepers_give_each_reservation_back_once() {
    let Some((_db, inventory, clock)) = setup(8).await else {
        return;
    };
    let inventory = Arc::new(inventory);
    restock(&*inventory, "a", 1_000, Some(1)).await;
    restock(&*inventory, "b", 1_000, Some(1)).await;
    for n in 0..300u32 {
        let items: &[(&str, u32)] = if n % 2 == 0 {
            &[("a", 1), ("b", 2)]
        } else {
            &[("a", 2)]
        };
        inventory
            .reserve(request(new_id(), items, Duration::from_secs(1)))
            .await
            .unwrap();
    }
    clock.advance(Duration::from_secs(1));
    let sweeps: Vec<_> = (0..4)
        .map(|_| {
            let inventory = Arc::clone(&inventory);
            tokio::spawn(async move {
                let mut total = 0;
                loop {
                    let n = inventory.sweep_expired(10).await.unwrap();
                    if n == 0 {
                        return total;
                    }
                    total += n;
                }
            })
        })
        .collect();
    let mut total = 0;
    for sweep in sweeps {
        total += sweep.await.unwrap();
    }
    assert_eq!(total, 300);
    assert_eq!(counts(&*inventory, "a").await, (1_000, 0, 0));
    assert_eq!(counts(&*inventory, "b").await, (1_000, 0, 0));
}

#[tokio::test]
async fn the_sweeper_gives_stock_back_within_a_second_of_expiry() {
    let Some((_db, inventory, clock)) = setup(4).await else {
        return;
    };
    let inventory = Arc::new(inventory);
    restock(&*inventory, "a", 5, Some(1)).await;
    let id = new_id();
    inventory
        .reserve(request(id, &[("a", 5)], Duration::from_secs(30)))
        .await
        .unwrap();
    let sweeper = Sweeper::spawn(inventory.clone(), SweeperConfig::default());
    let mut swept = sweeper.stats().subscribe();
    clock.advance(Duration::from_millis(29_999));
    assert_eq!(inventory.sweep_expired(10).await.unwrap(), 0);
    // The reservation expires now; the sweeper must give it back within
    // a second of real time.
    clock.advance(Duration::from_millis(1));
    let expired_at = Instant::now();
    tokio::time::timeout(Duration::from_secs(1), swept.wait_for(|n| *n >= 1))
        .await
        .expect("swept within 1 s of expiry")
        .unwrap();
    assert!(expired_at.elapsed() <= Duration::from_secs(1));
    assert_eq!(
        inventory.reservation(id).await.unwrap().unwrap().state,
        ReservationState::Expired
    );
    assert_eq!(counts(&*inventory, "a").await, (5, 0, 0));
    // A payment that completes after expiry cannot commit.
    let err = inventory.commit(id).await.unwrap_err();
    assert!(
        matches!(err, InventoryError::ReservationExpired(_)),
        "{err:?}"
    );
    sweeper.stop().await;
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_with_its_cause() {
    // A port nothing listens on: connections are refused at once.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let config = PoolConfig {
        max_size: 1,
        connection_timeout: Duration::from_millis(500),
        ..PoolConfig::default()
    };
    let pool = pool(&format!("postgres://postgres@127.0.0.1:{port}/x"), &config).unwrap();
    let inventory = PgInventory::new(pool, time_kit::system());
    let err = inventory
        .reserve(request(new_id(), &[("a", 1)], Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, InventoryError::Unavailable(_)), "{err:?}");
    assert!(std::error::Error::source(&err).is_some());
    assert_eq!(err.code(), "inventory_unavailable");
    assert!(matches!(
        inventory.ping().await,
        Err(InventoryError::Unavailable(_))
    ));
    // Bad input is refused before the store is asked.
    let err = inventory
        .reserve(request(new_id(), &[("a", 0)], Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, InventoryError::Invalid(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grouped_reservations_are_served_in_turn_with_what_there_is() {
    let Some((db, inventory, _clock)) = setup(16).await else {
        return;
    };
    let inventory = Arc::new(inventory);
    restock(&*inventory, "hot", 25, Some(700)).await;
    let requests: Vec<(uuid::Uuid, u32)> = (0..300u32).map(|n| (new_id(), 1 + n % 4)).collect();
    let tasks: Vec<_> = requests
        .iter()
        .map(|&(id, quantity)| {
            let inventory = Arc::clone(&inventory);
            tokio::spawn(async move {
                inventory
                    .reserve(request(id, &[("hot", quantity)], Duration::from_secs(600)))
                    .await
            })
        })
        .collect();
    let mut granted = 0i64;
    for (task, &(id, quantity)) in tasks.into_iter().zip(&requests) {
        match task.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.id, id);
                assert_eq!(r.lines.len(), 1);
                assert_eq!(
                    (r.lines[0].quantity, r.lines[0].unit_price_cents),
                    (quantity, 700)
                );
                granted += i64::from(quantity);
                assert_eq!(inventory.reservation(id).await.unwrap(), Some(r));
            }
            Err(InventoryError::OutOfStock {
                requested,
                available,
                ..
            }) => {
                assert_eq!(requested, quantity);
                assert!(
                    available < i64::from(requested),
                    "{available} >= {requested}"
                );
                // Refused: nothing of it stays behind.
                assert_eq!(inventory.reservation(id).await.unwrap(), None);
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    // Requests of 1 unit keep coming after the bigger ones are refused, so
    // the stock ends fully sold.
    assert_eq!(granted, 25);
    assert_eq!(counts(&*inventory, "hot").await, (0, 25, 0));
    let client = db.connect().await;
    let lines: i64 = client
        .query_one(
            "SELECT coalesce(sum(quantity), 0)::bigint FROM inventory.reservation_lines",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(lines, 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_replays_of_one_id_reserve_it_once() {
    let Some((_db, inventory, _clock)) = setup(16).await else {
        return;
    };
    let inventory = Arc::new(inventory);
    restock(&*inventory, "hot", 1_000, Some(5)).await;
    let id = new_id();
    // 60 callers with the same id: 50 ask for 2 units, 10 for 3.
    let tasks: Vec<_> = (0..60u32)
        .map(|n| {
            let inventory = Arc::clone(&inventory);
            let quantity = if n % 6 == 5 { 3 } else { 2 };
            tokio::spawn(async move {
                let result = inventory
                    .reserve(request(id, &[("hot", quantity)], Duration::from_secs(600)))
                    .await;
                (quantity, result)
            })
        })
        .collect();
    let mut winners = std::collections::HashSet::new();
    let mut reservations = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (quantity, Ok(r)) => {
                winners.insert(quantity);
                reservations.push(r);
            }
            (_, Err(InventoryError::ReservationMismatch(got))) => assert_eq!(got, id),
            (_, Err(e)) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "one set of lines won");
    let winner = *winners.iter().next().unwrap();
    assert!(reservations.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(
        counts(&*inventory, "hot").await,
        (1_000 - i64::from(winner), i64::from(winner), 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_for_an_unknown_sku_writes_nothing() {
    let Some((db, inventory, _clock)) = setup(16).await else {
        return;
    };
    let inventory = Arc::new(inventory);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let inventory = Arc::clone(&inventory);
            tokio::spawn(async move {
                inventory
                    .reserve(request(new_id(), &[("ghost", 1)], Duration::from_secs(600)))
                    .await
            })
        })
        .collect();
    for task in tasks {
        let err = task.await.unwrap().unwrap_err();
        assert!(
            matches!(&err, InventoryError::UnknownSku(s) if s.as_str() == "ghost"),
            "{err:?}"
        );
    }
    let client = db.connect().await;
    let rows: i64 = client
        .query_one("SELECT count(*) FROM inventory.reservations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
}

/// The same random sequence of operations on PostgreSQL and in memory, each
/// on its own clock moved in step: every answer and every stock level must
/// be the same (the in-memory store is the model; its own property test
/// checks conservation).
#[tokio::test]
async fn pg_answers_like_the_memory_model_over_random_operations() {
    let Some((_db, pg, pg_clock)) = setup(4).await else {
        return;
    };
    let mem_clock = ManualClock::new(pg_clock.now());
    let memory = order_saga::inventory::MemoryInventory::new(Arc::new(mem_clock.clone()));
    let stores: [&dyn Inventory; 2] = [&pg, &memory];
    let skus = ["a", "b", "c", "d"];
    for (n, sku) in skus.iter().enumerate() {
        for store in stores {
            restock(store, sku, 5 + n as u32 * 3, Some(100 + n as i64)).await;
        }
    }
    let ids: Vec<uuid::Uuid> = (0..12).map(|_| new_id()).collect();
    let mut rng = fastrand::Rng::with_seed(0x1d_2024);
    for step in 0..400 {
        let id = ids[rng.usize(..ids.len())];
        let op = rng.u8(..10);
        let answers: Vec<String> = match op {
            0..=3 => {
                let lines = 1 + rng.usize(..3);
                let mut items: Vec<(&str, u32)> = Vec::new();
                for _ in 0..lines {
                    let sku = skus[rng.usize(..skus.len())];
                    if !items.iter().any(|(s, _)| *s == sku) {
                        items.push((sku, 1 + rng.u32(..4)));
                    }
                }
                if rng.u8(..20) == 0 {
                    items.push(("nope", 1));
                }
                let ttl = Duration::from_millis(1 + rng.u64(..4_000));
                let mut answers = Vec::new();
                for store in stores {
                    answers.push(format!(
                        "{:?}",
                        store.reserve(request(id, &items, ttl)).await
                    ));
                }
                answers
            }
            4 | 5 => {
                let mut answers = Vec::new();
                for store in stores {
                    answers.push(format!("{:?}", store.commit(id).await));
                }
                answers
            }
            6 => {
                let mut answers = Vec::new();
                for store in stores {
                    answers.push(format!("{:?}", store.release(id).await));
                }
                answers
            }
            7 | 8 => {
                let by = Duration::from_millis(rng.u64(..2_000));
                pg_clock.advance(by);
                mem_clock.advance(by);
                vec![String::new(); 2]
            }
            _ => {
                let limit = rng.usize(..4);
                let mut answers = Vec::new();
                for store in stores {
                    answers.push(format!("{:?}", store.sweep_expired(limit).await));
                }
                answers
            }
        };
        assert_eq!(answers[0], answers[1], "step {step}: PostgreSQL vs memory");
        for sku in skus {
            let levels = (
                pg.stock(&inventory_support::sku(sku)).await.unwrap(),
                memory.stock(&inventory_support::sku(sku)).await.unwrap(),
            );
            assert_eq!(levels.0, levels.1, "step {step}: stock of {sku}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_multi_line_reservations_never_oversell() {
    let Some((db, inventory, _clock)) = setup(16).await else {
        return;
    };
    let inventory = Arc::new(inventory);
    for name in ["x", "y", "z"] {
        restock(&*inventory, name, 100, Some(7)).await;
    }
    // Two-line carts over three SKUs of 100 units, in both line orders:
    // 1,000 carts want 2,000 units of 300.
    let tasks: Vec<_> = (0..1000)
        .map(|n| {
            let inventory = Arc::clone(&inventory);
            tokio::spawn(async move {
                let items: &[(&str, u32)] = match n % 6 {
                    0 => &[("x", 1), ("y", 1)],
                    1 => &[("y", 1), ("z", 1)],
                    2 => &[("z", 1), ("x", 1)],
                    3 => &[("y", 1), ("x", 1)],
                    4 => &[("z", 1), ("y", 1)],
                    _ => &[("x", 1), ("z", 1)],
                };
                inventory
                    .reserve(request(new_id(), items, Duration::from_secs(600)))
                    .await
            })
        })
        .collect();
    let mut reserved_carts = 0i64;
    for task in tasks {
        match task.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.lines.len(), 2);
                reserved_carts += 1;
            }
            Err(InventoryError::OutOfStock { .. }) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    let mut reserved_units = 0;
    let mut left_with_stock = 0;
    for name in ["x", "y", "z"] {
        let (available, reserved, committed) = counts(&*inventory, name).await;
        assert!(available >= 0, "{name}: {available}");
        assert_eq!(available + reserved + committed, 100, "{name}");
        reserved_units += reserved;
        if available > 0 {
            left_with_stock += 1;
        }
    }
    assert_eq!(reserved_units, 2 * reserved_carts);
    // Stock only falls, so two SKUs still in stock at the end would have
    // served every one of their pair's 333 carts: at most one is left.
    assert!(left_with_stock <= 1, "{left_with_stock} SKUs left in stock");
    // Rows agree: a refused cart left no reservation and no line.
    let client = db.connect().await;
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM inventory.reservations),
                    (SELECT count(*) FROM inventory.reservation_lines)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (reserved_carts, 2 * reserved_carts)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_replays_of_one_multi_line_id_reserve_it_once() {
    let Some((_db, inventory, _clock)) = setup(16).await else {
        return;
    };
    let inventory = Arc::new(inventory);
    restock(&*inventory, "a", 1_000, Some(5)).await;
    restock(&*inventory, "b", 1_000, Some(5)).await;
    let id = new_id();
    let tasks: Vec<_> = (0..40u32)
        .map(|n| {
            let inventory = Arc::clone(&inventory);
            tokio::spawn(async move {
                let items: &[(&str, u32)] = if n % 2 == 0 {
                    &[("a", 2), ("b", 3)]
                } else {
                    &[("b", 3), ("a", 2)]
                };
                inventory
                    .reserve(request(id, items, Duration::from_secs(600)))
                    .await
            })
        })
        .collect();
    let mut reservations = Vec::new();
    for task in tasks {
        reservations.push(task.await.unwrap().unwrap());
    }
    assert!(reservations.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(counts(&*inventory, "a").await, (998, 2, 0));
    assert_eq!(counts(&*inventory, "b").await, (997, 3, 0));
}

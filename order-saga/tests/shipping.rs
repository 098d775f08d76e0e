//! The shipping service's rules, checked the same way on every
//! implementation: in memory, on PostgreSQL, and over HTTP (the client
//! against the adapter against a store); then concurrency and outages.

mod shipping_support;

use std::sync::Arc;
use std::time::Duration;

use order_saga::model::{LineItem, Sku};
use order_saga::shipping::{
    MemoryShipping, ScheduleShipment, ShipmentState, Shipping, ShippingError,
};
use shipping_support::{clock, config, order, request};
use time_kit::{ManualClock, SharedClock};

/// Every rule of `order_saga::shipping`, on one fresh implementation whose
/// clock is `clock`.
async fn conformance(shipping: Arc<dyn Shipping>, clock: &ManualClock) {
    let expected_time = chrono::DateTime::<chrono::Utc>::from(clock.now());
    let a = order(0);

    // Nothing yet.
    assert!(shipping.shipment(a).await.unwrap().is_none());

    // A new shipment is booked once; repeats return it, whatever the body.
    let first = shipping
        .schedule_with_outcome(request(a, "GB"))
        .await
        .unwrap();
    assert!(first.created);
    let booked = first.shipment;
    assert_eq!(booked.order_id, a);
    assert_eq!(booked.state, ShipmentState::Scheduled);
    assert_eq!(booked.created_at, expected_time);
    assert!(booked.id.starts_with("shp_"), "{}", booked.id);
    clock.advance(Duration::from_secs(5));
    let again = shipping
        .schedule_with_outcome(request(a, "GB"))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.shipment, booked);
    assert_eq!(shipping.schedule(request(a, "FR")).await.unwrap(), booked);
    // A record answers before the checks: even an undeliverable body.
    assert_eq!(shipping.schedule(request(a, "JP")).await.unwrap(), booked);
    assert_eq!(shipping.shipment(a).await.unwrap(), Some(booked.clone()));

    // Cancel keeps the shipment's id and booking time; repeats change nothing.
    clock.advance(Duration::from_secs(5));
    let cancelled = shipping.cancel(a).await.unwrap();
    assert_eq!(cancelled.state, ShipmentState::Cancelled);
    assert_eq!(cancelled.id, booked.id);
    assert_eq!(cancelled.created_at, booked.created_at);
    assert_eq!(shipping.cancel(a).await.unwrap(), cancelled);
    assert_eq!(shipping.shipment(a).await.unwrap(), Some(cancelled.clone()));
    // And a cancelled shipment is never booked again.
    match shipping.schedule(request(a, "GB")).await {
        Err(ShippingError::Cancelled(o)) => assert_eq!(o, a),
        other => panic!("schedule after cancel: {other:?}"),
    }
    assert_eq!(shipping.shipment(a).await.unwrap(), Some(cancelled));

    // A cancel that arrives first leaves a tombstone: a late schedule (a
    // retry after a crash) books nothing.
    let b = order(1);
    let tombstone_time = chrono::DateTime::<chrono::Utc>::from(clock.now());
    let tombstone = shipping.cancel(b).await.unwrap();
    assert_eq!(tombstone.order_id, b);
    assert_eq!(tombstone.state, ShipmentState::Cancelled);
    assert_eq!(tombstone.created_at, tombstone_time);
    assert_ne!(tombstone.id, booked.id);
    match shipping.schedule_with_outcome(request(b, "GB")).await {
        Err(e @ ShippingError::Cancelled(_)) => assert_eq!(e.code(), "shipment_cancelled"),
        other => panic!("schedule after a tombstone: {other:?}"),
    }
    assert_eq!(shipping.shipment(b).await.unwrap(), Some(tombstone.clone()));
    assert_eq!(shipping.cancel(b).await.unwrap(), tombstone);

    // Refusals write nothing.
    let c = order(2);
    let refused: Vec<ScheduleShipment> = vec![
        request(c, "JP"),
        {
            let mut r = request(c, "GB");
            r.ship_to.name = "  ".into();
            r
        },
        {
            let mut r = request(c, "GB");
            r.items.clear();
            r
        },
        {
            let mut r = request(c, "GB");
            r.items[0].quantity = 0;
            r
        },
        {
            let mut r = request(c, "GB");
            r.items.push(LineItem {
                sku: Sku::parse("SKU-1").unwrap(),
                quantity: 1,
            });
            r
        },
    ];
    for bad in refused {
        match shipping.schedule(bad.clone()).await {
            Err(e @ ShippingError::Rejected(_)) => {
                assert_eq!(e.code(), "shipping_rejected");
                assert!(!e.to_string().is_empty());
            }
            other => panic!("{bad:?} answered {other:?}"),
        }
    }
    assert!(shipping.shipment(c).await.unwrap().is_none());
    // ... and leave the order free to be booked.
    let later = shipping.schedule(request(c, "FR")).await.unwrap();
    assert_eq!(later.state, ShipmentState::Scheduled);
    assert_ne!(later.id, booked.id);
}

/// 200 schedules of one order at once: one shipment, booked by exactly one.
async fn concurrent_schedules(shipping: Arc<dyn Shipping>) {
    let id = order(1_000);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let shipping = Arc::clone(&shipping);
        tasks.spawn(async move { shipping.schedule_with_outcome(request(id, "GB")).await });
    }
    let mut ids = std::collections::HashSet::new();
    let mut created = 0;
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.unwrap().unwrap();
        ids.insert(outcome.shipment.id);
        created += usize::from(outcome.created);
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(created, 1);
    let stored = shipping.shipment(id).await.unwrap().unwrap();
    assert!(ids.contains(&stored.id));
}

/// On each of `orders` orders a schedule and a cancel race. Once a cancel
/// returned, the order's record is cancelled for good: a schedule either
/// booked first (and its shipment is the one cancelled) or found the
/// tombstone.
async fn schedule_cancel_races(shipping: Arc<dyn Shipping>, orders: u64) {
    let mut races = Vec::new();
    for n in 0..orders {
        let id = order(2_000 + n);
        let (s1, s2) = (Arc::clone(&shipping), Arc::clone(&shipping));
        let schedule = async move { s1.schedule(request(id, "GB")).await };
        let cancel = async move {
            let cancelled = s2.cancel(id).await.unwrap();
            // Read at once, while the schedule may still be running.
            let seen = s2.shipment(id).await.unwrap();
            (cancelled, seen)
        };
        // Alternate which is spawned first, so both orders happen.
        let (schedule, cancel) = if n % 2 == 0 {
            let s = tokio::spawn(schedule);
            (s, tokio::spawn(cancel))
        } else {
            let c = tokio::spawn(cancel);
            (tokio::spawn(schedule), c)
        };
        races.push((id, schedule, cancel));
    }
    let (mut booked_first, mut tombstoned_first) = (0, 0);
    for (id, schedule, cancel) in races {
        let (cancelled, seen) = cancel.await.unwrap();
        assert_eq!(cancelled.state, ShipmentState::Cancelled);
        assert_eq!(seen.as_ref(), Some(&cancelled), "live after cancel: {id}");
        match schedule.await.unwrap() {
            Ok(shipment) => {
                assert_eq!(shipment.id, cancelled.id);
                booked_first += 1;
            }
            Err(ShippingError::Cancelled(o)) => {
                assert_eq!(o, id);
                tombstoned_first += 1;
            }
            Err(e) => panic!("{id}: {e}"),
        }
        assert_eq!(shipping.shipment(id).await.unwrap(), Some(cancelled));
        assert!(matches!(
            shipping.schedule(request(id, "GB")).await,
            Err(ShippingError::Cancelled(_))
        ));
    }
    assert_eq!(booked_first + tombstoned_first, orders);
}

fn memory(clock: &ManualClock) -> Arc<dyn Shipping> {
    Arc::new(MemoryShipping::new(config(), shared(clock)))
}

fn shared(clock: &ManualClock) -> SharedClock {
    Arc::new(clock.clone())
}

#[tokio::test]
async fn memory_follows_the_rules() {
    let clock = clock();
    conformance(memory(&clock), &clock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_books_one_shipment_under_200_concurrent_schedules() {
    concurrent_schedules(memory(&clock())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_never_keeps_a_live_shipment_after_a_cancel() {
    schedule_cancel_races(memory(&clock()), 500).await;
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use shipping_support::pg;

    #[tokio::test]
    async fn postgres_follows_the_rules() {
        let Some(db) = testkit::TestDatabase::create().await else {
            return;
        };
        let clock = clock();
        let store = pg::store(&db, config(), shared(&clock)).await;
        conformance(Arc::new(store), &clock).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_books_one_shipment_under_200_concurrent_schedules() {
        let Some(db) = testkit::TestDatabase::create().await else {
            return;
        };
        let store = pg::store(&db, config(), shared(&clock())).await;
        concurrent_schedules(Arc::new(store)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_never_keeps_a_live_shipment_after_a_cancel() {
        let Some(db) = testkit::TestDatabase::create().await else {
            return;
        };
        let store = pg::store(&db, config(), shared(&clock())).await;
        schedule_cancel_races(Arc::new(store), 200).await;
    }

    #[tokio::test]
    async fn migrating_twice_applies_once_and_the_schema_holds_its_rules() {
        let Some(db) = testkit::TestDatabase::create().await else {
            return;
        };
        let store = pg::store(&db, config(), shared(&clock())).await;
        assert_eq!(store.migrate().await.unwrap(), 0);
        let client = db.connect().await;
        let indexes: Vec<String> = client
            .query(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = 'shipping' \
                 AND tablename = 'shipments' ORDER BY indexname",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(indexes.len(), 2, "{indexes:?}");
        assert!(
            indexes
                .iter()
                .any(|d| d.contains("UNIQUE") && d.contains("(id)"))
        );
        assert!(indexes.iter().any(|d| d.contains("(order_id)")));
        // A live row without its request, or an unknown state, is refused.
        for bad in [
            "INSERT INTO shipping.shipments (order_id, id, state, created_at) \
             VALUES (gen_random_uuid(), 'x1', 'scheduled', now())",
            "INSERT INTO shipping.shipments (order_id, id, state, created_at, cancelled_at) \
             VALUES (gen_random_uuid(), 'x2', 'lost', now(), now())",
            "INSERT INTO shipping.shipments (order_id, id, state, created_at) \
             VALUES (gen_random_uuid(), 'x3', 'cancelled', now())",
        ] {
            assert!(client.batch_execute(bad).await.is_err(), "{bad}");
        }
        // The booked request is kept for the carrier.
        let id = order(1);
        store.schedule(request(id, "GB")).await.unwrap();
        let row = client
            .query_one(
                "SELECT address->>'country', jsonb_array_length(items), cancelled_at IS NULL \
                 FROM shipping.shipments WHERE order_id = $1",
                &[&id.as_uuid()],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "GB");
        assert_eq!(row.get::<_, i32>(1), 2);
        assert!(row.get::<_, bool>(2));
    }

    #[tokio::test]
    async fn an_unreachable_database_is_unavailable_and_writes_nothing() {
        let store = pg::down(shared(&clock()));
        let id = order(1);
        let errors = [
            store.schedule(request(id, "GB")).await.unwrap_err(),
            // A refused request still needs the database (a record answers first).
            store.schedule(request(id, "JP")).await.unwrap_err(),
            store.cancel(id).await.unwrap_err(),
            store.shipment(id).await.unwrap_err(),
            store.ping().await.unwrap_err(),
        ];
        for e in errors {
            assert!(matches!(e, ShippingError::Unavailable(_)), "{e:?}");
            assert_eq!(e.code(), "shipping_unavailable");
            assert!(std::error::Error::source(&e).is_some(), "the cause is kept");
        }
        assert!(store.migrate().await.is_err());
    }
}

#[cfg(feature = "http")]
mod over_http {
    use super::*;
    use shipping_support::http::{Served, service, token_signed};

    #[tokio::test]
    async fn the_http_client_follows_the_rules() {
        let clock = clock();
        let served = Served::start(service(memory(&clock))).await;
        conformance(Arc::new(served.client()), &clock).await;
        served.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn http_books_one_shipment_under_200_concurrent_schedules() {
        let served = Served::start(service(memory(&clock()))).await;
        concurrent_schedules(Arc::new(served.client())).await;
        served.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn http_never_keeps_a_live_shipment_after_a_cancel() {
        let served = Served::start(service(memory(&clock()))).await;
        schedule_cancel_races(Arc::new(served.client()), 200).await;
        served.stop().await;
    }

    #[test]
    fn the_client_never_shows_its_token() {
        let token = "secret-token-value";
        let config =
            order_saga::http::ClientConfig::new("http://127.0.0.1:1").with_bearer_token(token);
        assert!(!format!("{config:?}").contains(token), "{config:?}");
        let client = order_saga::http::shipping::HttpShipping::connect(config).unwrap();
        assert!(!format!("{client:?}").contains(token), "{client:?}");
    }

    #[tokio::test]
    async fn a_service_nobody_runs_is_unavailable() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let client = order_saga::http::shipping::HttpShipping::connect(
            order_saga::http::ClientConfig::new(format!("http://127.0.0.1:{port}"))
                .with_timeout(Duration::from_millis(500)),
        )
        .unwrap();
        let id = order(1);
        for e in [
            client.schedule(request(id, "GB")).await.unwrap_err(),
            client.cancel(id).await.unwrap_err(),
            client.shipment(id).await.unwrap_err(),
        ] {
            assert!(matches!(e, ShippingError::Unavailable(_)), "{e:?}");
            assert!(std::error::Error::source(&e).is_some());
        }
    }

    #[tokio::test]
    async fn a_wrong_token_or_url_is_unavailable_never_rejected_or_absent() {
        let served = Served::start(service(memory(&clock()))).await;
        let id = order(1);
        // The wrong key: 401 from the service.
        let forged = served.client_with(&token_signed(
            b"another-secret-that-is-32-bytes-long!!",
            &["service"],
        ));
        // The right key, the wrong role: 403.
        let customer =
            served.client_with(&token_signed(shipping_support::http::SECRET, &["customer"]));
        for client in [forged, customer] {
            for e in [
                client.schedule(request(id, "GB")).await.unwrap_err(),
                client.cancel(id).await.unwrap_err(),
                client.shipment(id).await.unwrap_err(),
            ] {
                assert!(matches!(e, ShippingError::Unavailable(_)), "{e:?}");
            }
        }
        // A base URL that is not the service: 404 `not_found`, not "no shipment".
        let wrong = order_saga::http::shipping::HttpShipping::connect(
            order_saga::http::ClientConfig::new(format!("{}/elsewhere", served.url()))
                .with_bearer_token(shipping_support::http::service_token()),
        )
        .unwrap();
        assert!(matches!(
            wrong.shipment(id).await,
            Err(ShippingError::Unavailable(_))
        ));
        // Nothing was written by any of them.
        assert!(served.client().shipment(id).await.unwrap().is_none());
        served.stop().await;
    }

    #[cfg(feature = "postgres")]
    mod with_postgres {
        use super::*;
        use shipping_support::pg;

        #[tokio::test]
        async fn the_http_client_over_postgres_follows_the_rules() {
            let Some(db) = testkit::TestDatabase::create().await else {
                return;
            };
            let clock = clock();
            let store = pg::store(&db, config(), shared(&clock)).await;
            let served = Served::start(service(Arc::new(store))).await;
            conformance(Arc::new(served.client()), &clock).await;
            served.stop().await;
        }

        #[tokio::test]
        async fn a_database_outage_is_503_over_http_and_unavailable_to_the_client() {
            let store = pg::down(shared(&clock()));
            let probe = store.clone();
            let served = Served::start(service(Arc::new(store)).with_readiness(
                "postgresql",
                move || {
                    let probe = probe.clone();
                    async move { probe.ping().await.is_ok() }
                },
            ))
            .await;
            let client = served.client();
            let id = order(1);
            for e in [
                client.schedule(request(id, "GB")).await.unwrap_err(),
                client.cancel(id).await.unwrap_err(),
                client.shipment(id).await.unwrap_err(),
            ] {
                let ShippingError::Unavailable(source) = &e else {
                    panic!("{e:?}");
                };
                let status = source
                    .downcast_ref::<order_saga::http::ClientError>()
                    .and_then(|c| match c {
                        order_saga::http::ClientError::Status { status, code, .. } => {
                            Some((status.as_u16(), code.clone()))
                        }
                        _ => None,
                    });
                assert_eq!(status, Some((503, "shipping_unavailable".to_owned())));
            }
            served.stop().await;
        }
    }
}

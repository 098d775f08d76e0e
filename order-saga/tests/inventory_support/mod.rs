//! Shared by the inventory's integration tests: the conformance suite every
//! `Inventory` implementation must pass, and small helpers.
#![allow(dead_code)] // each test crate uses a different part

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use order_saga::inventory::{
    Inventory, InventoryError, Reservation, ReservationState, ReserveRequest, Restock,
};
use order_saga::model::{LineItem, Sku};
use time_kit::ManualClock;
use uuid::Uuid;

/// An implementation under test and the clock it reads.
pub(crate) struct Harness {
    pub(crate) inventory: Arc<dyn Inventory>,
    pub(crate) clock: ManualClock,
}

/// A manual clock starting now (rounded to the millisecond).
pub(crate) fn manual_clock() -> ManualClock {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_millis(now.as_millis() as u64))
}

pub(crate) fn sku(s: &str) -> Sku {
    Sku::parse(s).unwrap()
}

pub(crate) fn request(id: Uuid, items: &[(&str, u32)], ttl: Duration) -> ReserveRequest {
    ReserveRequest {
        reservation_id: id,
        items: items
            .iter()
            .map(|(s, quantity)| LineItem {
                sku: sku(s),
                quantity: *quantity,
            })
            .collect(),
        ttl,
    }
}

pub(crate) fn new_id() -> Uuid {
    Uuid::now_v7()
}

pub(crate) async fn restock(
    inventory: &dyn Inventory,
    name: &str,
    quantity: u32,
    price: Option<i64>,
) {
    inventory
        .restock(Restock {
            sku: sku(name),
            quantity,
            unit_price_cents: price,
        })
        .await
        .unwrap();
}

/// `(available, reserved, committed)` of `name`.
pub(crate) async fn counts(inventory: &dyn Inventory, name: &str) -> (i64, i64, i64) {
    let level = inventory.stock(&sku(name)).await.unwrap();
    (level.available, level.reserved, level.committed)
}

const MINUTE: Duration = Duration::from_secs(60);

/// Everything the `Inventory` trait documents, in one pass over a fresh
/// store, so memory, PostgreSQL and HTTP are held to the same behaviour.
pub(crate) async fn conformance(h: &Harness) {
    let inv = &*h.inventory;
    let mut restocked: HashMap<&str, i64> = HashMap::new();

    // Restock: a new SKU needs a price; unknown SKUs are errors.
    let err = inv
        .restock(Restock {
            sku: sku("a"),
            quantity: 10,
            unit_price_cents: None,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, InventoryError::Invalid(_)), "{err:?}");
    let err = inv
        .restock(Restock {
            sku: sku("a"),
            quantity: 10,
            unit_price_cents: Some(-1),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, InventoryError::Invalid(_)), "{err:?}");
    assert!(matches!(
        inv.stock(&sku("a")).await,
        Err(InventoryError::UnknownSku(s)) if s == sku("a")
    ));
    restock(inv, "a", 10, Some(250)).await;
    restock(inv, "b", 5, Some(1000)).await;
    restocked.insert("a", 10);
    restocked.insert("b", 5);
    let a = inv.stock(&sku("a")).await.unwrap();
    assert_eq!(
        (a.available, a.reserved, a.committed, a.unit_price_cents),
        (10, 0, 0, 250)
    );

    // Reserve: lines sorted by SKU, priced, expiring after the TTL.
    let r1 = new_id();
    let reserved = inv
        .reserve(request(r1, &[("b", 1), ("a", 3)], MINUTE))
        .await
        .unwrap();
    assert_eq!(reserved.id, r1);
    assert_eq!(reserved.state, ReservationState::Reserved);
    let lines: Vec<(&str, u32, i64)> = reserved
        .lines
        .iter()
        .map(|l| (l.sku.as_str(), l.quantity, l.unit_price_cents))
        .collect();
    assert_eq!(lines, [("a", 3, 250), ("b", 1, 1000)]);
    assert_eq!(reserved.total_cents(), 1750);
    let now = chrono::DateTime::<chrono::Utc>::from(h.clock.now());
    assert_eq!(reserved.expires_at, now + chrono::TimeDelta::seconds(60));
    assert_eq!(counts(inv, "a").await, (7, 3, 0));
    assert_eq!(counts(inv, "b").await, (4, 1, 0));

    // Idempotent by id: the same lines (any order, any TTL) return the
    // stored reservation and take nothing; other lines are a mismatch.
    h.clock.advance(Duration::from_secs(1));
    let again = inv
        .reserve(request(r1, &[("a", 3), ("b", 1)], Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(again, reserved);
    assert_eq!(counts(inv, "a").await, (7, 3, 0));
    let err = inv
        .reserve(request(r1, &[("a", 2), ("b", 1)], MINUTE))
        .await
        .unwrap_err();
    assert!(
        matches!(err, InventoryError::ReservationMismatch(id) if id == r1),
        "{err:?}"
    );
    assert_eq!(inv.reservation(r1).await.unwrap(), Some(reserved.clone()));

    // All or nothing: a short or unknown line takes nothing, and the
    // error names the first failing line in SKU order.
    let short = new_id();
    let err = inv
        .reserve(request(short, &[("a", 8)], MINUTE))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, InventoryError::OutOfStock { sku: s, requested: 8, available: 7 } if *s == sku("a")),
        "{err:?}"
    );
    let err = inv
        .reserve(request(short, &[("zzz", 1), ("b", 1)], MINUTE))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, InventoryError::UnknownSku(s) if *s == sku("zzz")),
        "{err:?}"
    );
    let err = inv
        .reserve(request(short, &[("a", 1), ("b", 5)], MINUTE))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, InventoryError::OutOfStock { sku: s, requested: 5, available: 4 } if *s == sku("b")),
        "{err:?}"
    );
    assert_eq!(counts(inv, "a").await, (7, 3, 0));
    assert_eq!(counts(inv, "b").await, (4, 1, 0));
    assert_eq!(inv.reservation(short).await.unwrap(), None);

    // Bad input: refused, nothing written.
    let bad = new_id();
    for items in [vec![], vec![("a", 0)], vec![("a", 1), ("a", 1)]] {
        let err = inv.reserve(request(bad, &items, MINUTE)).await.unwrap_err();
        assert!(
            matches!(err, InventoryError::Invalid(_)),
            "{items:?}: {err:?}"
        );
    }
    let err = inv
        .reserve(request(bad, &[("a", 1)], Duration::ZERO))
        .await
        .unwrap_err();
    assert!(matches!(err, InventoryError::Invalid(_)), "{err:?}");
    assert_eq!(inv.reservation(bad).await.unwrap(), None);
    assert_eq!(counts(inv, "a").await, (7, 3, 0));

    // Commit: sells, idempotent.
    let committed = inv.commit(r1).await.unwrap();
    assert_eq!(committed.state, ReservationState::Committed);
    assert_eq!(committed.lines, reserved.lines);
    assert_eq!(counts(inv, "a").await, (7, 0, 3));
    assert_eq!(counts(inv, "b").await, (4, 0, 1));
    assert_eq!(inv.commit(r1).await.unwrap(), committed);
    assert_eq!(counts(inv, "a").await, (7, 0, 3));

    // Release of a committed reservation returns its units; idempotent;
    // a released reservation cannot be committed.
    let released = inv.release(r1).await.unwrap().unwrap();
    assert_eq!(released.state, ReservationState::Released);
    assert_eq!(counts(inv, "a").await, (10, 0, 0));
    assert_eq!(counts(inv, "b").await, (5, 0, 0));
    assert_eq!(inv.release(r1).await.unwrap(), Some(released));
    assert_eq!(counts(inv, "a").await, (10, 0, 0));
    let err = inv.commit(r1).await.unwrap_err();
    assert!(
        matches!(err, InventoryError::ReservationExpired(id) if id == r1),
        "{err:?}"
    );

    // Unknown ids: release is a no-op, commit is an error.
    let unknown = new_id();
    assert_eq!(inv.release(unknown).await.unwrap(), None);
    let err = inv.commit(unknown).await.unwrap_err();
    assert!(
        matches!(err, InventoryError::ReservationNotFound(id) if id == unknown),
        "{err:?}"
    );
    assert_eq!(inv.reservation(unknown).await.unwrap(), None);

    // Release of a reserved reservation returns its units.
    let r2 = new_id();
    inv.reserve(request(r2, &[("a", 2)], MINUTE)).await.unwrap();
    assert_eq!(counts(inv, "a").await, (8, 2, 0));
    let released = inv.release(r2).await.unwrap().unwrap();
    assert_eq!(released.state, ReservationState::Released);
    assert_eq!(counts(inv, "a").await, (10, 0, 0));

    // A commit after expiry is refused, and the stock goes back at once
    // even if no sweeper ran.
    let late = new_id();
    inv.reserve(request(late, &[("a", 2), ("b", 1)], Duration::from_secs(5)))
        .await
        .unwrap();
    h.clock.advance(Duration::from_secs(5));
    let err = inv.commit(late).await.unwrap_err();
    assert!(
        matches!(err, InventoryError::ReservationExpired(id) if id == late),
        "{err:?}"
    );
    assert_eq!(state_of(inv, late).await, ReservationState::Expired);
    assert_eq!(counts(inv, "a").await, (10, 0, 0));
    assert_eq!(counts(inv, "b").await, (5, 0, 0));
    assert_eq!(inv.sweep_expired(100).await.unwrap(), 0);

    // The sweep gives back only what has expired, up to its limit, oldest
    // first; releasing an expired reservation changes nothing.
    let soon = new_id();
    let sooner = new_id();
    let later = new_id();
    inv.reserve(request(soon, &[("a", 4)], Duration::from_secs(2)))
        .await
        .unwrap();
    inv.reserve(request(
        sooner,
        &[("a", 1), ("b", 1)],
        Duration::from_secs(1),
    ))
    .await
    .unwrap();
    inv.reserve(request(later, &[("b", 2)], Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(counts(inv, "a").await, (5, 5, 0));
    h.clock.advance(Duration::from_millis(999));
    assert_eq!(inv.sweep_expired(100).await.unwrap(), 0);
    h.clock.advance(Duration::from_secs(2));
    assert_eq!(inv.sweep_expired(1).await.unwrap(), 1);
    assert_eq!(state_of(inv, sooner).await, ReservationState::Expired);
    assert_eq!(state_of(inv, soon).await, ReservationState::Reserved);
    assert_eq!(inv.sweep_expired(100).await.unwrap(), 1);
    assert_eq!(state_of(inv, soon).await, ReservationState::Expired);
    assert_eq!(state_of(inv, later).await, ReservationState::Reserved);
    assert_eq!(counts(inv, "a").await, (10, 0, 0));
    assert_eq!(counts(inv, "b").await, (3, 2, 0));
    let expired = inv.release(soon).await.unwrap().unwrap();
    assert_eq!(expired.state, ReservationState::Expired);
    assert_eq!(counts(inv, "a").await, (10, 0, 0));
    // Replaying an expired reservation returns it as it is.
    let replay = inv
        .reserve(request(soon, &[("a", 4)], MINUTE))
        .await
        .unwrap();
    assert_eq!(replay, expired);
    assert_eq!(counts(inv, "a").await, (10, 0, 0));
    h.clock.advance(Duration::from_secs(10));
    assert_eq!(inv.sweep_expired(100).await.unwrap(), 1);
    assert_eq!(counts(inv, "b").await, (5, 0, 0));

    // Restock adds units and may change the price; later reservations take
    // the new price, earlier ones keep theirs.
    let level = inv
        .restock(Restock {
            sku: sku("a"),
            quantity: 5,
            unit_price_cents: Some(300),
        })
        .await
        .unwrap();
    *restocked.get_mut("a").unwrap() += 5;
    assert_eq!((level.available, level.unit_price_cents), (15, 300));
    let level = inv
        .restock(Restock {
            sku: sku("a"),
            quantity: 0,
            unit_price_cents: None,
        })
        .await
        .unwrap();
    assert_eq!((level.available, level.unit_price_cents), (15, 300));
    let r3 = new_id();
    let priced = inv.reserve(request(r3, &[("a", 1)], MINUTE)).await.unwrap();
    assert_eq!(priced.lines[0].unit_price_cents, 300);
    assert_eq!(
        inv.reservation(later).await.unwrap().unwrap().lines[0].unit_price_cents,
        1000
    );
    inv.commit(r3).await.unwrap();

    // Conservation over everything above.
    for (name, total) in restocked {
        let (available, reserved, committed) = counts(inv, name).await;
        assert!(available >= 0 && reserved >= 0 && committed >= 0);
        assert_eq!(available + reserved + committed, total, "{name}");
    }
    assert_eq!(counts(inv, "a").await, (14, 0, 1));
}

pub(crate) async fn state_of(inventory: &dyn Inventory, id: Uuid) -> ReservationState {
    inventory.reservation(id).await.unwrap().unwrap().state
}

/// The reservation a test expects to exist.
pub(crate) async fn get(inventory: &dyn Inventory, id: Uuid) -> Reservation {
    inventory.reservation(id).await.unwrap().unwrap()
}

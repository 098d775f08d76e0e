//! The in-memory inventory through the public API: the conformance suite,
//! concurrency, and the sweeper's 1 s promise.

mod inventory_support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use inventory_support::{Harness, conformance, counts, manual_clock, new_id, request, restock};
use order_saga::inventory::{
    Inventory, InventoryError, MemoryInventory, ReservationState, Sweeper, SweeperConfig,
};
use time_kit::{Clock, SharedClock};

#[tokio::test]
async fn memory_inventory_conforms() {
    let clock = manual_clock();
    let inventory = Arc::new(MemoryInventory::new(Arc::new(clock.clone())));
    conformance(&Harness { inventory, clock }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reservations_never_oversell() {
    let inventory = Arc::new(MemoryInventory::default());
    restock(&*inventory, "hot", 100, Some(1)).await;
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let inventory = Arc::clone(&inventory);
            tokio::spawn(async move {
                inventory
                    .reserve(request(new_id(), &[("hot", 1)], Duration::from_secs(60)))
                    .await
            })
        })
        .collect();
    let (mut ok, mut out_of_stock) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(InventoryError::OutOfStock { .. }) => out_of_stock += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!((ok, out_of_stock), (100, 900));
    assert_eq!(counts(&*inventory, "hot").await, (0, 100, 0));
}

/// A clock that follows tokio's (paused) time, so the sweeper's interval
/// and the reservations' expiry move together without real sleeping.
#[derive(Debug)]
struct TokioClock {
    start: SystemTime,
    origin: tokio::time::Instant,
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.start + self.origin.elapsed()
    }
}

#[tokio::test(start_paused = true)]
async fn the_sweeper_gives_stock_back_within_a_second_of_expiry() {
    let clock: SharedClock = Arc::new(TokioClock {
        start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        origin: tokio::time::Instant::now(),
    });
    let inventory = Arc::new(MemoryInventory::new(Arc::clone(&clock)));
    restock(&*inventory, "a", 10, Some(1)).await;
    let sweeper = Sweeper::spawn(inventory.clone(), SweeperConfig::default());
    let mut swept = sweeper.stats().subscribe();
    // Reservations expiring at odd offsets from the sweeper's ticks.
    let mut expiries = Vec::new();
    for ms in [1_000u64, 2_130, 2_999, 7_777] {
        let id = new_id();
        let r = inventory
            .reserve(request(id, &[("a", 1)], Duration::from_millis(ms)))
            .await
            .unwrap();
        expiries.push((id, r.expires_at));
    }
    for (n, (id, expires_at)) in expiries.iter().enumerate() {
        // Paused time jumps from timer to timer while every task waits,
        // so this wait costs no real time.
        swept.wait_for(|total| *total > n as u64).await.unwrap();
        let now = chrono::DateTime::<chrono::Utc>::from(clock.now());
        let late = now - *expires_at;
        assert!(
            late >= chrono::TimeDelta::zero() && late <= chrono::TimeDelta::seconds(1),
            "reservation {n} given back {late:?} after its expiry"
        );
        assert_eq!(
            inventory.reservation(*id).await.unwrap().unwrap().state,
            ReservationState::Expired
        );
    }
    assert_eq!(counts(&*inventory, "a").await, (10, 0, 0));
    assert_eq!(sweeper.stats().swept(), 4);
    sweeper.stop().await;
}

#[tokio::test]
async fn a_commit_after_expiry_is_refused_even_before_the_sweep() {
    let clock = manual_clock();
    let inventory = MemoryInventory::new(Arc::new(clock.clone()));
    restock(&inventory, "a", 3, Some(1)).await;
    let id = new_id();
    inventory
        .reserve(request(id, &[("a", 3)], Duration::from_secs(30)))
        .await
        .unwrap();
    clock.advance(Duration::from_millis(29_999));
    assert_eq!(
        inventory.reservation(id).await.unwrap().unwrap().state,
        ReservationState::Reserved
    );
    clock.advance(Duration::from_millis(1));
    let err = inventory.commit(id).await.unwrap_err();
    assert!(
        matches!(err, InventoryError::ReservationExpired(_)),
        "{err:?}"
    );
    assert_eq!(counts(&inventory, "a").await, (3, 0, 0));
}

//! Criterion benches of the in-memory inventory: reserve + commit and
//! reserve + release of one unit, from one thread and from several threads
//! on one hot SKU (every call takes the store's one lock).
//!
//! ```text
//! cargo bench -p ferrokeel-order-saga --bench inventory
//! ```
//!
//! The store forgets finished reservations at once here (retention 0) and
//! is swept every 1,024 operations inside the timed loop, as the sweeper
//! would: otherwise millions of iterations would keep millions of
//! reservations and the bench would measure the allocator.

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use order_saga::inventory::{MemoryInventory, ReserveRequest, Restock};
use order_saga::model::{LineItem, Sku};
use uuid::Uuid;

#[derive(Clone, Copy)]
enum Then {
    Commit,
    Release,
}

fn store(skus: &[Sku]) -> MemoryInventory {
    let inventory = MemoryInventory::default().with_retention(Duration::ZERO);
    for sku in skus {
        // u32::MAX units: more than any run commits.
        inventory
            .restock_now(&Restock {
                sku: sku.clone(),
                quantity: u32::MAX,
                unit_price_cents: Some(1_999),
            })
            .expect("restock");
    }
    inventory
}

/// `iters` reserve-then-`then` cycles on `skus[i % len]`, sweeping every
/// 1,024.
fn cycle(inventory: &MemoryInventory, skus: &[Sku], then: Then, iters: u64, seed: u64) {
    for i in 0..iters {
        let sku = &skus[(i as usize) % skus.len()];
        let id = Uuid::from_u64_pair(seed, i);
        let request = ReserveRequest {
            reservation_id: id,
            items: vec![LineItem {
                sku: sku.clone(),
                quantity: 1,
            }],
            ttl: Duration::from_secs(600),
        };
        black_box(inventory.reserve_now(&request).expect("reserve"));
        match then {
            Then::Commit => {
                black_box(inventory.commit_now(id).expect("commit"));
            }
            Then::Release => {
                black_box(inventory.release_now(id).expect("release"));
            }
        }
        if i % 1024 == 1023 {
            black_box(inventory.sweep_expired_now(usize::MAX));
        }
    }
}

fn bench_single_thread(c: &mut Criterion) {
    let skus = vec![Sku::parse("HOT-1").expect("sku")];
    let mut group = c.benchmark_group("memory_inventory_1_thread");
    for (name, then) in [
        ("reserve_commit", Then::Commit),
        ("reserve_release", Then::Release),
    ] {
        group.bench_function(name, |b| {
            let mut seed = 0u64;
            b.iter_custom(|iters| {
                seed += 1;
                let inventory = store(&skus);
                let start = Instant::now();
                cycle(&inventory, &skus, then, iters, seed);
                start.elapsed()
            });
        });
    }
    group.finish();
}

/// `threads` threads share the work of `iters` cycles on `skus`; the time
/// per cycle is wall time / iters, so perfect scaling halves it per doubling
/// of threads, and one lock keeps it flat at best.
fn contended(c: &mut Criterion, skus: &[Sku], group_name: &str) {
    let mut group = c.benchmark_group(group_name);
    for threads in [2usize, 4] {
        for (name, then) in [
            ("reserve_commit", Then::Commit),
            ("reserve_release", Then::Release),
        ] {
            group.bench_function(format!("{name}/{threads}_threads"), |b| {
                let mut seed = 0u64;
                b.iter_custom(|iters| {
                    let inventory = Arc::new(store(skus));
                    let barrier = Arc::new(Barrier::new(threads + 1));
                    let per_thread = iters.div_ceil(threads as u64);
                    let workers: Vec<_> = (0..threads)
                        .map(|_| {
                            seed += 1;
                            let (inventory, barrier, skus) =
                                (Arc::clone(&inventory), Arc::clone(&barrier), skus.to_vec());
                            let seed = seed;
                            std::thread::spawn(move || {
                                barrier.wait();
                                cycle(&inventory, &skus, then, per_thread, seed);
                            })
                        })
                        .collect();
                    barrier.wait();
                    let start = Instant::now();
                    for worker in workers {
                        worker.join().expect("worker");
                    }
                    start.elapsed()
                });
            });
        }
    }
    group.finish();
}

fn bench_contended(c: &mut Criterion) {
    let hot = vec![Sku::parse("HOT-1").expect("sku")];
    contended(c, &hot, "memory_inventory_hot_sku");
    let spread: Vec<Sku> = (0..100)
        .map(|n| Sku::parse(format!("SKU-{n}")).expect("sku"))
        .collect();
    contended(c, &spread, "memory_inventory_100_skus");
}

criterion_group!(benches, bench_single_thread, bench_contended);
criterion_main!(benches);

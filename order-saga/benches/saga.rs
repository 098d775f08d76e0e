//! Criterion benches of the pure saga state machine (`order_saga::saga`):
//! a whole happy path (five steps begun and completed), a rollback after a
//! declined payment, and the stored form's round trip. These are the
//! orchestrator's own costs per order, with no I/O; the baseline in the same
//! run is an empty loop over the same steps.
//!
//! ```text
//! cargo bench -p ferrokeel-order-saga --bench saga
//! ```

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use order_saga::CancelReason;
use order_saga::saga::{Action, Saga, Step};

fn happy_path() -> Saga {
    let mut saga = Saga::new();
    while let Action::Run(step) = saga.next() {
        saga.begin(step).expect("in order");
        saga.succeeded(step).expect("in order");
    }
    saga
}

fn declined_payment() -> Saga {
    let mut saga = Saga::new();
    saga.begin(Step::ReserveStock).expect("first");
    saga.succeeded(Step::ReserveStock).expect("first");
    saga.begin(Step::AuthorizePayment).expect("second");
    saga.fail(CancelReason::PaymentDeclined).expect("forward");
    while let Action::Compensate(c) = saga.next() {
        saga.compensated(c).expect("due");
    }
    saga
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("saga");
    group.bench_function("baseline_loop_over_steps", |b| {
        b.iter(|| {
            let mut n = 0u32;
            for step in Step::ALL {
                n = n.wrapping_add(black_box(step) as u32);
            }
            n
        })
    });
    group.bench_function("happy_path_to_confirmed", |b| {
        b.iter(|| black_box(happy_path()))
    });
    group.bench_function("declined_payment_to_cancelled", |b| {
        b.iter(|| black_box(declined_payment()))
    });
    let saga = happy_path();
    group.bench_function("parts_round_trip", |b| {
        b.iter(|| Saga::from_parts(black_box(saga).to_parts()))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! The payment provider simulator through its public API: Stripe-style
//! idempotency keys, the state rules, the faults, the ledger, and a
//! property test over random operations under random faults.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use order_saga::OrderId;
use order_saga::payment::sim::{Delivery, SimConfig, SimRequest, Simulator};
use order_saga::payment::{AuthorizeRequest, PaymentError, PaymentState, Payments};
use proptest::prelude::*;

fn order(n: u64) -> OrderId {
    OrderId::from_uuid(uuid::Uuid::from_u128(
        0x0190_0000_0000_7000_8000_0000_0000_0000 + u128::from(n),
    ))
}

fn authorize(key: &str, order_id: OrderId, amount_cents: i64) -> AuthorizeRequest {
    AuthorizeRequest {
        idempotency_key: key.to_owned(),
        order_id,
        amount_cents,
        currency: "EUR".to_owned(),
    }
}

#[tokio::test]
async fn the_same_key_and_parameters_return_the_stored_result_without_acting() {
    let sim = Simulator::with_seed(SimConfig::default(), 1).unwrap();
    let first = sim
        .authorize(authorize("o1:authorize", order(1), 1_000))
        .await
        .unwrap();
    let again = sim
        .authorize(authorize("o1:authorize", order(1), 1_000))
        .await
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(sim.ledger().payments, 1);
    assert_eq!(sim.stats().replays, 1);

    // Another amount, another order or another operation under the key: refused.
    for reused in [
        authorize("o1:authorize", order(1), 1_001),
        authorize("o1:authorize", order(2), 1_000),
    ] {
        assert!(matches!(
            sim.authorize(reused).await,
            Err(PaymentError::KeyReused(k)) if k == "o1:authorize"
        ));
    }
    assert!(matches!(
        sim.capture("o1:authorize", &first.id).await,
        Err(PaymentError::KeyReused(_))
    ));
    assert_eq!(sim.ledger().payments, 1);
    assert_eq!(sim.ledger().captured, 0);

    // The stored result is the snapshot: a capture replayed after a refund
    // still answers "captured", and moves no money.
    let captured = sim.capture("o1:capture", &first.id).await.unwrap();
    sim.refund("o1:refund", &first.id).await.unwrap();
    assert_eq!(
        sim.capture("o1:capture", &first.id).await.unwrap(),
        captured
    );
    let entry = &sim.entries()[0];
    assert_eq!((entry.captured_cents, entry.refunded_cents), (1_000, 1_000));
}

#[tokio::test]
async fn a_decline_is_stored_and_replayed_like_any_result() {
    let sim = Simulator::with_seed(SimConfig::default().with_decline_rate(1.0), 2).unwrap();
    let first = sim.authorize(authorize("k", order(1), 500)).await;
    let Err(PaymentError::Declined { reason }) = first else {
        panic!("expected a decline, got {first:?}");
    };
    // Declines off: the same key still answers the stored decline.
    sim.set_config(SimConfig::default()).unwrap();
    match sim.authorize(authorize("k", order(1), 500)).await {
        Err(PaymentError::Declined { reason: again }) => assert_eq!(again, reason),
        other => panic!("expected the stored decline, got {other:?}"),
    }
    let summary = sim.ledger();
    assert_eq!((summary.payments, summary.declined), (1, 1));
    assert_eq!(summary.authorized_cents, 0);
    assert_eq!(sim.authorizations_for_order(order(1)), 0);
    assert_eq!(sim.stats().declines, 1);
    // A new key for the same order is a new authorization.
    sim.authorize(authorize("k2", order(1), 500)).await.unwrap();
    assert_eq!(sim.authorizations_for_order(order(1)), 1);
    assert_eq!(sim.ledger().double_charges, 0);
}

#[tokio::test]
async fn errors_fail_before_acting_and_lost_replies_after() {
    let sim = Simulator::with_seed(SimConfig::default().with_error_rate(1.0), 3).unwrap();
    assert!(matches!(
        sim.authorize(authorize("k", order(1), 100)).await,
        Err(PaymentError::Unavailable(_))
    ));
    assert_eq!(sim.ledger().payments, 0, "an error changes nothing");
    assert_eq!(sim.ledger().idempotency_keys, 0);

    sim.set_config(SimConfig::default().with_lost_reply_rate(1.0))
        .unwrap();
    assert!(matches!(
        sim.authorize(authorize("k", order(1), 100)).await,
        Err(PaymentError::OutcomeUnknown(_))
    ));
    assert_eq!(sim.ledger().payments, 1, "a lost reply acted");

    sim.set_config(SimConfig::default()).unwrap();
    let found = sim.lookup("k").await.unwrap().expect("the lookup finds it");
    assert_eq!(found.state, PaymentState::Authorized);
    // Sending the same key again is safe: it answers the stored payment.
    assert_eq!(
        sim.authorize(authorize("k", order(1), 100)).await.unwrap(),
        found
    );
    assert_eq!(sim.ledger().payments, 1);

    sim.set_down(true);
    assert!(matches!(
        sim.lookup("k").await,
        Err(PaymentError::Unavailable(_))
    ));
    assert!(matches!(
        sim.capture("c", &found.id).await,
        Err(PaymentError::Unavailable(_))
    ));
    assert_eq!(sim.ledger().captured, 0);
    let stats = sim.stats();
    assert_eq!(stats.rejected_down, 2);
    assert_eq!(stats.injected_errors, 1);
    assert_eq!(stats.lost_replies, 1);
}

#[tokio::test(start_paused = true)]
async fn a_late_reply_acts_at_once_and_answers_after_its_delay() {
    let sim = Arc::new(
        Simulator::with_seed(
            SimConfig::default().with_timeouts(1.0, Duration::from_secs(30)),
            4,
        )
        .unwrap(),
    );
    let outcome = sim
        .execute(SimRequest::Authorize(authorize("k", order(1), 100)))
        .await;
    assert_eq!(outcome.delivery, Delivery::Late(Duration::from_secs(30)));
    assert!(outcome.result.is_ok());
    assert_eq!(sim.ledger().payments, 1);

    let started = tokio::time::Instant::now();
    let late = sim.authorize(authorize("k2", order(2), 100)).await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(30));
    assert_eq!(late.state, PaymentState::Authorized);
}

#[tokio::test(start_paused = true)]
async fn latency_is_simulated_with_tokio_time() {
    let config =
        SimConfig::default().with_latency(Duration::from_millis(20), Duration::from_millis(20));
    let sim = Simulator::with_seed(config, 5).unwrap();
    let started = tokio::time::Instant::now();
    sim.authorize(authorize("k", order(1), 100)).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_authorizations_under_one_key_make_one_payment() {
    let sim = Arc::new(Simulator::with_seed(SimConfig::default(), 6).unwrap());
    let mut tasks = Vec::new();
    for task in 0..64u64 {
        let sim = Arc::clone(&sim);
        tasks.push(tokio::spawn(async move {
            let order_n = task % 8;
            sim.authorize(authorize(
                &format!("o{order_n}:authorize"),
                order(order_n),
                250,
            ))
            .await
            .unwrap()
        }));
    }
    let mut ids: HashMap<OrderId, String> = HashMap::new();
    for task in tasks {
        let payment = task.await.unwrap();
        let id = ids
            .entry(payment.order_id)
            .or_insert_with(|| payment.id.clone());
        assert_eq!(*id, payment.id, "every caller of one key gets one payment");
    }
    let summary = sim.ledger();
    assert_eq!(summary.payments, 8);
    assert_eq!(summary.orders, 8);
    assert_eq!(summary.double_charges, 0);
    assert_eq!(summary.held_cents, 8 * 250);
    assert_eq!(sim.stats().replays, 64 - 8);
}

#[tokio::test]
async fn the_ledger_counts_double_charges_and_money() {
    let sim = Simulator::with_seed(SimConfig::default(), 7).unwrap();
    let a = sim.authorize(authorize("a", order(1), 300)).await.unwrap();
    // A careless client charging the same order under a second key.
    let b = sim.authorize(authorize("b", order(1), 300)).await.unwrap();
    let c = sim.authorize(authorize("c", order(2), 200)).await.unwrap();
    sim.capture("ca", &a.id).await.unwrap();
    sim.void("vb", &b.id).await.unwrap();
    sim.capture("cc", &c.id).await.unwrap();
    sim.refund("rc", &c.id).await.unwrap();
    let s = sim.ledger();
    assert_eq!(s.payments, 3);
    assert_eq!(s.orders, 2);
    assert_eq!(s.double_charges, 1);
    assert_eq!(sim.authorizations_for_order(order(1)), 2);
    assert_eq!(
        (s.captured, s.voided, s.refunded, s.authorized),
        (1, 1, 1, 0)
    );
    assert_eq!(s.authorized_cents, 800);
    assert_eq!(s.held_cents, 0);
    assert_eq!(s.captured_cents, 500);
    assert_eq!(s.refunded_cents, 200);
    assert_eq!(s.net_charged_cents(), 300);
    assert_eq!(s.idempotency_keys, 7);
    assert_eq!(sim.payments_for_order(order(1)).len(), 2);
    assert_eq!(sim.payment(&b.id).unwrap().state, PaymentState::Voided);
}

// ---------------------------------------------------------------------------
// Property: random operations under random faults.
// ---------------------------------------------------------------------------

const KEYS: usize = 6;
const ORDERS: u64 = 3;

#[derive(Debug, Clone)]
enum Op {
    Authorize {
        key: usize,
        order: u64,
        amount: i64,
    },
    Capture {
        key: usize,
        payment: usize,
    },
    Void {
        key: usize,
        payment: usize,
    },
    Refund {
        key: usize,
        payment: usize,
    },
    Lookup {
        key: usize,
    },
    Faults {
        error: f64,
        lost: f64,
        late: f64,
        decline: f64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let key = 0..KEYS;
    let payment = 0..5usize;
    prop_oneof![
        4 => (key.clone(), 0..ORDERS, prop_oneof![Just(100i64), Just(250)])
            .prop_map(|(key, order, amount)| Op::Authorize { key, order, amount }),
        3 => (key.clone(), payment.clone()).prop_map(|(key, payment)| Op::Capture { key, payment }),
        2 => (key.clone(), payment.clone()).prop_map(|(key, payment)| Op::Void { key, payment }),
        2 => (key.clone(), payment).prop_map(|(key, payment)| Op::Refund { key, payment }),
        1 => key.prop_map(|key| Op::Lookup { key }),
        1 => (0.0..0.5f64, 0.0..0.4f64, 0.0..0.3f64, 0.0..0.5f64)
            .prop_map(|(error, lost, late, decline)| Op::Faults { error, lost, late, decline }),
    ]
}

/// What the test saw a key answer, when a reply arrived.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    request: String,
    payment_id: String,
    state: PaymentState,
}

fn check_ledger(sim: &Simulator) -> Result<(), TestCaseError> {
    let entries = sim.entries();
    let summary = sim.ledger();
    let mut per_key: HashMap<&str, usize> = HashMap::new();
    let mut live_per_order: HashMap<OrderId, u64> = HashMap::new();
    let (mut held, mut captured, mut refunded) = (0i64, 0i64, 0i64);
    for e in &entries {
        let p = &e.payment;
        *per_key.entry(&p.idempotency_key).or_default() += 1;
        prop_assert!(
            e.captured_cents <= p.amount_cents,
            "captured more than authorized: {e:?}"
        );
        prop_assert!(
            e.refunded_cents <= e.captured_cents,
            "refunded more than captured: {e:?}"
        );
        let expected = match p.state {
            PaymentState::Authorized => (0, 0),
            PaymentState::Voided | PaymentState::Declined => (0, 0),
            PaymentState::Captured => (p.amount_cents, 0),
            PaymentState::Refunded => (p.amount_cents, p.amount_cents),
        };
        prop_assert_eq!((e.captured_cents, e.refunded_cents), expected, "{:?}", e);
        if p.state == PaymentState::Authorized {
            held += p.amount_cents;
        }
        if p.state != PaymentState::Declined {
            *live_per_order.entry(p.order_id).or_default() += 1;
        }
        captured += e.captured_cents;
        refunded += e.refunded_cents;
    }
    for (key, count) in per_key {
        prop_assert!(count <= 1, "authorize key {key} made {count} payments");
    }
    prop_assert_eq!(summary.payments, entries.len() as u64);
    prop_assert_eq!(summary.held_cents, held);
    prop_assert_eq!(summary.captured_cents, captured);
    prop_assert_eq!(summary.refunded_cents, refunded);
    prop_assert_eq!(
        summary.double_charges,
        live_per_order.values().filter(|n| **n > 1).count() as u64
    );
    let count = |state| entries.iter().filter(|e| e.payment.state == state).count() as u64;
    prop_assert_eq!(summary.authorized, count(PaymentState::Authorized));
    prop_assert_eq!(summary.captured, count(PaymentState::Captured));
    prop_assert_eq!(summary.voided, count(PaymentState::Voided));
    prop_assert_eq!(summary.refunded, count(PaymentState::Refunded));
    prop_assert_eq!(summary.declined, count(PaymentState::Declined));
    Ok(())
}

async fn run_ops(seed: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let sim = Simulator::with_seed(SimConfig::default(), seed).unwrap();
    // key → what it first answered with a delivered reply.
    let mut seen: HashMap<String, Seen> = HashMap::new();
    for op in ops {
        let payments: Vec<String> = sim.entries().into_iter().map(|e| e.payment.id).collect();
        let pick = |i: usize| {
            payments
                .get(i)
                .cloned()
                .unwrap_or_else(|| "pay_missing".to_owned())
        };
        let (key, request, result) = match op {
            Op::Faults {
                error,
                lost,
                late,
                decline,
            } => {
                let config = SimConfig::default()
                    .with_error_rate(error)
                    .with_lost_reply_rate(lost)
                    .with_timeouts(late, Duration::from_secs(5))
                    .with_decline_rate(decline);
                sim.set_config(config).unwrap();
                continue;
            }
            Op::Lookup { key } => {
                let key = format!("k{key}");
                if let Ok(Some(p)) = sim.lookup(&key).await {
                    prop_assert_eq!(&p.idempotency_key, &key);
                }
                continue;
            }
            Op::Authorize {
                key,
                order: o,
                amount,
            } => {
                let key = format!("k{key}");
                let request = format!("authorize {o} {amount}");
                let result = sim.authorize(authorize(&key, order(o), amount)).await;
                (key, request, result)
            }
            Op::Capture { key, payment } => {
                let key = format!("k{key}");
                let id = pick(payment);
                (
                    key.clone(),
                    format!("capture {id}"),
                    sim.capture(&key, &id).await,
                )
            }
            Op::Void { key, payment } => {
                let key = format!("k{key}");
                let id = pick(payment);
                (key.clone(), format!("void {id}"), sim.void(&key, &id).await)
            }
            Op::Refund { key, payment } => {
                let key = format!("k{key}");
                let id = pick(payment);
                (
                    key.clone(),
                    format!("refund {id}"),
                    sim.refund(&key, &id).await,
                )
            }
        };
        let answered = match &result {
            Ok(p) => Some((p.id.clone(), p.state)),
            Err(PaymentError::Declined { .. }) => sim
                .entries()
                .into_iter()
                .find(|e| e.payment.idempotency_key == key)
                .map(|e| (e.payment.id, PaymentState::Declined)),
            _ => None,
        };
        if let Some((payment_id, state)) = answered {
            let now = Seen {
                request: request.clone(),
                payment_id,
                state,
            };
            match seen.get(&key) {
                // A replay answers exactly what the key answered first.
                Some(first) => prop_assert_eq!(first, &now),
                None => {
                    seen.insert(key.clone(), now);
                }
            }
        }
        if let Err(PaymentError::KeyReused(_)) = &result
            && let Some(first) = seen.get(&key)
        {
            prop_assert_ne!(&first.request, &request, "same parameters must replay");
        }
        if let Some(first) = seen.get(&key)
            && first.request != request
        {
            prop_assert!(
                matches!(
                    result,
                    Err(PaymentError::KeyReused(_))
                        | Err(PaymentError::Unavailable(_))
                        | Err(PaymentError::OutcomeUnknown(_))
                ),
                "key {key} first used for {:?}, now {request:?}: {result:?}",
                first.request
            );
        }
        check_ledger(&sim)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_operations_under_faults_keep_the_ledger_sound(
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(run_ops(seed, ops))?;
    }
}

//! ResilientPayments over the in-process simulator: retries under the same
//! key, unknown outcomes resolved by lookup (never by a second charge),
//! declines and other final answers not retried, and the circuit breaker
//! failing fast while the provider is down and closing after it recovers.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use order_saga::BoxFuture;
use order_saga::OrderId;
use order_saga::payment::sim::{SimConfig, Simulator};
use order_saga::payment::{
    AuthorizeRequest, BreakerConfig, BreakerState, Payment, PaymentError, PaymentState, Payments,
    ResilientConfig, ResilientPayments,
};

fn order(n: u64) -> OrderId {
    OrderId::from_uuid(uuid::Uuid::from_u128(
        0x0190_0000_0000_7000_8000_0000_0000_0000 + u128::from(n),
    ))
}

fn authorize(order_id: OrderId, amount_cents: i64) -> AuthorizeRequest {
    AuthorizeRequest {
        idempotency_key: format!("{order_id}:authorize"),
        order_id,
        amount_cents,
        currency: "EUR".to_owned(),
    }
}

/// A breaker that never opens: for tests of retries alone.
fn no_breaker() -> BreakerConfig {
    BreakerConfig::default()
        .with_consecutive_failures(u32::MAX)
        .with_min_success_rate(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_authorizations_through_lost_replies_and_errors_charge_each_order_once() {
    let config = SimConfig::default()
        .with_latency(Duration::from_micros(500), Duration::from_millis(2))
        .with_error_rate(0.2)
        .with_lost_reply_rate(0.3);
    let sim = Arc::new(Simulator::with_seed(config, 42).unwrap());
    let client = Arc::new(
        ResilientPayments::new(
            Arc::clone(&sim),
            ResilientConfig::default()
                // 44% of attempts fail; 30 attempts leave one call in 10^10 unresolved.
                .with_max_attempts(30)
                .with_delays(Duration::from_millis(1), Duration::from_millis(20))
                .with_jitter_seed(7)
                .with_breaker(no_breaker()),
        )
        .unwrap(),
    );
    const ORDERS: u64 = 1_000;
    let mut tasks = Vec::new();
    for n in 0..ORDERS {
        // Every tenth order is authorized twice at once, as a saga step run
        // again after a crash would: still one payment.
        let copies = if n % 10 == 0 { 2 } else { 1 };
        for _ in 0..copies {
            let client = Arc::clone(&client);
            tasks.push(tokio::spawn(async move {
                client
                    .authorize(authorize(order(n), 1_000 + n as i64))
                    .await
            }));
        }
    }
    let mut ids: HashMap<OrderId, String> = HashMap::new();
    for task in tasks {
        let payment = task
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("every call resolves, got {e:?}"));
        assert_eq!(payment.state, PaymentState::Authorized);
        let id = ids
            .entry(payment.order_id)
            .or_insert_with(|| payment.id.clone());
        assert_eq!(
            *id, payment.id,
            "both callers of one order get its one payment"
        );
    }
    assert_eq!(ids.len() as u64, ORDERS);

    let ledger = sim.ledger();
    assert_eq!(ledger.payments, ORDERS, "exactly one payment per order");
    assert_eq!(ledger.orders, ORDERS);
    assert_eq!(ledger.double_charges, 0);
    for n in 0..ORDERS {
        assert_eq!(sim.authorizations_for_order(order(n)), 1);
    }
    // The faults really happened, and lookups resolved them.
    let faults = sim.stats();
    assert!(faults.lost_replies > 300, "{faults:?}");
    assert!(faults.injected_errors > 200, "{faults:?}");
    let stats = client.stats();
    assert_eq!(stats.calls, ORDERS + ORDERS / 10);
    assert!(stats.retries > 500, "{stats:?}");
    assert!(stats.lookups > 100, "{stats:?}");
    assert!(stats.resolved_by_lookup > 50, "{stats:?}");
    assert_eq!(stats.unresolved, 0);

    // Capture every order through the same faults: one capture each.
    let mut tasks = Vec::new();
    for (order_id, id) in ids {
        let client = Arc::clone(&client);
        tasks.push(tokio::spawn(async move {
            client
                .capture(&format!("{order_id}:capture"), &id)
                .await
                .unwrap_or_else(|e| panic!("capture resolves, got {e:?}"))
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().state, PaymentState::Captured);
    }
    let ledger = sim.ledger();
    assert_eq!(ledger.captured, ORDERS);
    assert_eq!(ledger.captured_cents, ledger.authorized_cents);
    assert!(
        sim.entries()
            .iter()
            .all(|e| e.captured_cents == e.payment.amount_cents)
    );
}

#[tokio::test]
async fn declines_and_other_final_answers_are_not_retried() {
    let sim =
        Arc::new(Simulator::with_seed(SimConfig::default().with_decline_rate(1.0), 1).unwrap());
    let client = ResilientPayments::new(Arc::clone(&sim), ResilientConfig::default()).unwrap();
    for n in 0..50 {
        assert!(matches!(
            client.authorize(authorize(order(n), 100)).await,
            Err(PaymentError::Declined { .. })
        ));
    }
    let stats = client.stats();
    assert_eq!(stats.attempts, 50, "one attempt per declined call");
    assert_eq!(stats.retries, 0);
    assert_eq!(sim.stats().requests, 50);

    sim.set_config(SimConfig::default()).unwrap();
    let payment = client.authorize(authorize(order(100), 100)).await.unwrap();
    let reused = AuthorizeRequest {
        amount_cents: 999,
        ..authorize(order(100), 100)
    };
    assert!(matches!(
        client.authorize(reused).await,
        Err(PaymentError::KeyReused(_))
    ));
    client.capture("c", &payment.id).await.unwrap();
    assert!(matches!(
        client.void("v", &payment.id).await,
        Err(PaymentError::InvalidState {
            state: PaymentState::Captured,
            ..
        })
    ));
    assert!(matches!(
        client.capture("c2", "pay_unknown").await,
        Err(PaymentError::NotFound(_))
    ));
    let bad = AuthorizeRequest {
        currency: "euro".into(),
        ..authorize(order(101), 100)
    };
    assert!(matches!(
        client.authorize(bad).await,
        Err(PaymentError::Invalid(_))
    ));
    let stats = client.stats();
    assert_eq!(stats.attempts, 56, "one attempt for each final answer");
    assert_eq!(stats.retries, 0);
    assert_eq!(client.breaker_state(), BreakerState::Closed);
    assert_eq!(stats.breaker_opened, 0);
}

/// What the first authorization of a [`Scripted`] provider does after it
/// acted.
#[derive(Clone, Copy, PartialEq)]
enum First {
    /// Its reply is lost.
    LoseReply,
    /// It never answers.
    Hang,
}

/// A simulator whose first authorization acts and then misbehaves; with
/// `then_down`, every later request (lookups included) is refused.
struct Scripted {
    sim: Simulator,
    first: First,
    then_down: bool,
    authorizations: AtomicU32,
}

impl Scripted {
    fn new(first: First, then_down: bool) -> Scripted {
        Scripted {
            sim: Simulator::with_seed(SimConfig::default(), 2).unwrap(),
            first,
            then_down,
            authorizations: AtomicU32::new(0),
        }
    }

    fn down(&self) -> bool {
        self.then_down && self.authorizations.load(Ordering::SeqCst) > 0
    }
}

fn refused() -> PaymentError {
    PaymentError::Unavailable("down".into())
}

impl Payments for Scripted {
    fn authorize(&self, request: AuthorizeRequest) -> BoxFuture<'_, Result<Payment, PaymentError>> {
        Box::pin(async move {
            if self.down() {
                return Err(refused());
            }
            let n = self.authorizations.fetch_add(1, Ordering::SeqCst);
            let result = self.sim.authorize(request).await;
            match (n, self.first) {
                (0, First::LoseReply) => Err(PaymentError::OutcomeUnknown("reply lost".into())),
                (0, First::Hang) => std::future::pending().await,
                _ => result,
            }
        })
    }
    fn capture<'a>(
        &'a self,
        k: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Payment, PaymentError>> {
        self.sim.capture(k, id)
    }
    fn void<'a>(&'a self, k: &'a str, id: &'a str) -> BoxFuture<'a, Result<Payment, PaymentError>> {
        self.sim.void(k, id)
    }
    fn refund<'a>(
        &'a self,
        k: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Payment, PaymentError>> {
        self.sim.refund(k, id)
    }
    fn lookup<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Payment>, PaymentError>> {
        Box::pin(async move {
            if self.down() {
                return Err(refused());
            }
            self.sim.lookup(key).await
        })
    }
}

#[tokio::test(start_paused = true)]
async fn an_unknown_outcome_is_resolved_by_lookup_not_by_charging_again() {
    let client = ResilientPayments::new(
        Scripted::new(First::LoseReply, false),
        ResilientConfig::default(),
    )
    .unwrap();
    let payment = client.authorize(authorize(order(1), 700)).await.unwrap();
    assert_eq!(payment.amount_cents, 700);
    assert_eq!(
        client.inner().authorizations.load(Ordering::SeqCst),
        1,
        "the lookup found the payment: no second authorization was sent"
    );
    let stats = client.stats();
    assert_eq!(
        (stats.lookups, stats.resolved_by_lookup, stats.retries),
        (1, 1, 1)
    );
    assert_eq!(client.inner().sim.ledger().payments, 1);
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_attempt_is_an_unknown_outcome_resolved_by_lookup() {
    let provider = Scripted::new(First::Hang, false);
    let timeout = Duration::from_millis(300);
    let client = ResilientPayments::new(
        provider,
        ResilientConfig::default().with_attempt_timeout(timeout),
    )
    .unwrap();
    let started = tokio::time::Instant::now();
    let payment = client.authorize(authorize(order(1), 900)).await.unwrap();
    assert!(started.elapsed() >= timeout);
    assert_eq!(payment.state, PaymentState::Authorized);
    assert_eq!(client.inner().authorizations.load(Ordering::SeqCst), 1);
    let stats = client.stats();
    assert_eq!((stats.timeouts, stats.resolved_by_lookup), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn an_outcome_still_unknown_when_attempts_run_out_is_reported_unknown() {
    // Every reply lost, lookups included: the call cannot learn the outcome.
    let sim =
        Arc::new(Simulator::with_seed(SimConfig::default().with_lost_reply_rate(1.0), 4).unwrap());
    let client = ResilientPayments::new(
        Arc::clone(&sim),
        ResilientConfig::default()
            .with_max_attempts(3)
            .with_breaker(no_breaker()),
    )
    .unwrap();
    let result = client.authorize(authorize(order(1), 100)).await;
    assert!(
        matches!(result, Err(PaymentError::OutcomeUnknown(_))),
        "{result:?}"
    );
    assert_eq!(client.stats().unresolved, 1);
    // Still one payment: every attempt used the same key.
    assert_eq!(sim.ledger().payments, 1);
}

#[tokio::test(start_paused = true)]
async fn a_call_that_may_have_acted_never_ends_unavailable_or_circuit_open() {
    // The first reply is lost, then the provider goes down: the last error
    // is "unavailable", but the first attempt may have charged, so the call
    // says "unknown" and the caller keeps the payment to resolve.
    let client = ResilientPayments::new(
        Scripted::new(First::LoseReply, true),
        ResilientConfig::default()
            .with_max_attempts(3)
            .with_breaker(no_breaker()),
    )
    .unwrap();
    let result = client.authorize(authorize(order(2), 100)).await;
    let Err(PaymentError::OutcomeUnknown(source)) = result else {
        panic!("expected an unknown outcome, got {result:?}");
    };
    assert!(source.to_string().contains("unavailable"), "{source}");
    assert_eq!(client.inner().sim.ledger().payments, 1);

    // The same when the breaker opens under the retries.
    let client = ResilientPayments::new(
        Scripted::new(First::LoseReply, true),
        ResilientConfig::default()
            .with_max_attempts(4)
            .with_breaker(BreakerConfig::default().with_consecutive_failures(2)),
    )
    .unwrap();
    let result = client.authorize(authorize(order(3), 100)).await;
    let Err(PaymentError::OutcomeUnknown(source)) = result else {
        panic!("expected an unknown outcome, got {result:?}");
    };
    assert!(source.to_string().contains("circuit open"), "{source}");
    assert_eq!(client.stats().unresolved, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_opens_while_the_provider_is_down_and_closes_after_it_recovers() {
    let sim = Arc::new(Simulator::with_seed(SimConfig::default().with_down(true), 6).unwrap());
    let open_for = Duration::from_secs(1);
    let client = ResilientPayments::new(
        Arc::clone(&sim),
        ResilientConfig::default()
            .with_max_attempts(3)
            .with_delays(Duration::from_millis(1), Duration::from_millis(5))
            .with_breaker(
                BreakerConfig::default()
                    .with_consecutive_failures(5)
                    .with_open_durations(open_for, Duration::from_secs(10)),
            ),
    )
    .unwrap();
    // Three failures, then two more: the fifth opens the breaker and the
    // second call's last attempt is refused without reaching the provider.
    assert!(matches!(
        client.authorize(authorize(order(1), 100)).await,
        Err(PaymentError::Unavailable(_))
    ));
    assert!(matches!(
        client.authorize(authorize(order(2), 100)).await,
        Err(PaymentError::CircuitOpen)
    ));
    assert_eq!(client.breaker_state(), BreakerState::Open);
    let requests = sim.stats().requests;
    assert_eq!(requests, 5);

    // While open, calls fail fast and the provider sees nothing.
    for n in 3..50 {
        assert!(matches!(
            client.authorize(authorize(order(n), 100)).await,
            Err(PaymentError::CircuitOpen)
        ));
    }
    assert_eq!(
        sim.stats().requests,
        requests,
        "no request reached the provider"
    );
    assert!(client.stats().breaker_rejected >= 47);

    // The provider recovers; the breaker stays open for its period…
    sim.set_down(false);
    assert!(matches!(
        client.capture("c", "pay_x").await,
        Err(PaymentError::CircuitOpen)
    ));
    // …which failsafe measures on the monotonic clock (std::time::Instant),
    // so the test waits that long: a duration under test, not a guess.
    tokio::time::sleep(open_for).await;
    let payment = client.authorize(authorize(order(1), 100)).await.unwrap();
    assert_eq!(payment.state, PaymentState::Authorized);
    assert_eq!(client.breaker_state(), BreakerState::Closed);
    let stats = client.stats();
    assert_eq!(
        (
            stats.breaker_opened,
            stats.breaker_half_opened,
            stats.breaker_closed
        ),
        (1, 1, 1)
    );
    assert_eq!(sim.ledger().payments, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_probe_opens_the_circuit_again() {
    let sim = Arc::new(Simulator::with_seed(SimConfig::default().with_down(true), 7).unwrap());
    let open_for = Duration::from_millis(200);
    let client = ResilientPayments::new(
        Arc::clone(&sim),
        ResilientConfig::default()
            .with_max_attempts(1)
            .with_breaker(
                BreakerConfig::default()
                    .with_consecutive_failures(2)
                    .with_open_durations(open_for, Duration::from_secs(10)),
            ),
    )
    .unwrap();
    for n in 0..2 {
        assert!(matches!(
            client.authorize(authorize(order(n), 100)).await,
            Err(PaymentError::Unavailable(_))
        ));
    }
    assert_eq!(client.breaker_state(), BreakerState::Open);
    // Still down after the open period: the probe fails and reopens it.
    tokio::time::sleep(open_for).await;
    assert!(matches!(
        client.authorize(authorize(order(9), 100)).await,
        Err(PaymentError::Unavailable(_))
    ));
    assert_eq!(client.breaker_state(), BreakerState::Open);
    let stats = client.stats();
    assert_eq!((stats.breaker_opened, stats.breaker_half_opened), (2, 1));
    assert_eq!(sim.stats().requests, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_hitting_a_dead_provider_are_mostly_refused_by_the_breaker() {
    let sim = Arc::new(Simulator::with_seed(SimConfig::default().with_down(true), 8).unwrap());
    let client = Arc::new(
        ResilientPayments::new(
            Arc::clone(&sim),
            ResilientConfig::default()
                .with_delays(Duration::from_millis(1), Duration::from_millis(5))
                .with_breaker(
                    BreakerConfig::default()
                        .with_open_durations(Duration::from_secs(60), Duration::from_secs(60)),
                ),
        )
        .unwrap(),
    );
    let mut tasks = Vec::new();
    for n in 0..500 {
        let client = Arc::clone(&client);
        tasks.push(tokio::spawn(async move {
            client.authorize(authorize(order(n), 100)).await
        }));
    }
    let mut open = 0;
    for task in tasks {
        match task.await.unwrap() {
            Err(PaymentError::CircuitOpen) => open += 1,
            Err(PaymentError::Unavailable(_)) => {}
            other => panic!("a dead provider cannot succeed: {other:?}"),
        }
    }
    assert_eq!(client.stats().breaker_opened, 1);
    // The breaker opens after 5 failures; only the calls already past it
    // reach the provider (at most one attempt each in flight).
    assert!(open >= 400, "{open} of 500 refused");
    assert!(sim.stats().requests < 200, "{:?}", sim.stats());
    assert_eq!(sim.ledger().payments, 0);
}

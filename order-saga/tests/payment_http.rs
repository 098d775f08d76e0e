//! The payment provider over HTTP: `PaymentSimService`'s every status and
//! error code, its faults on the wire (dropped connections, late replies),
//! `HttpPaymentProvider`'s mapping of each answer, the resilient client
//! reconciled against `GET /v1/ledger`, and the routes against the OpenAPI
//! document.
#![cfg(feature = "http")]

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use order_saga::OrderId;
use order_saga::http::payment_sim::{FaultsView, LedgerView, ROUTES};
use order_saga::http::{ClientConfig, ClientError, JsonClient, PaymentSimService};
use order_saga::payment::sim::{SimConfig, Simulator};
use order_saga::payment::{
    AuthorizeRequest, BreakerConfig, HttpPaymentProvider, PaymentError, PaymentState, Payments,
    ResilientConfig, ResilientPayments,
};
use serde_json::{Value, json};
use tower::ServiceExt;

fn order(n: u64) -> OrderId {
    OrderId::from_uuid(uuid::Uuid::from_u128(
        0x0190_0000_0000_7000_8000_0000_0000_0000 + u128::from(n),
    ))
}

fn sim(config: SimConfig) -> Arc<Simulator> {
    Arc::new(Simulator::with_seed(config, 11).unwrap())
}

/// One request through the service, in process.
async fn call(
    service: &PaymentSimService,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (StatusCode, http::HeaderMap, Value) {
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder
        .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
        .unwrap();
    let response: Response<_> = service
        .clone()
        .oneshot(request)
        .await
        .expect("the reply is delivered");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, value)
}

const JSON: (&str, &str) = ("content-type", "application/json");

fn authorization(order_id: OrderId, amount: i64) -> String {
    json!({"order_id": order_id, "amount_cents": amount, "currency": "EUR"}).to_string()
}

#[tokio::test]
async fn the_api_answers_every_documented_status_and_code() {
    let sim = sim(SimConfig::default());
    let service = PaymentSimService::new(Arc::clone(&sim));
    let body = authorization(order(1), 1_500);

    // 201 first, 200 replay with the header, the same payment.
    let (status, headers, created) = call(
        &service,
        Method::POST,
        "/v1/authorizations",
        &[JSON, ("idempotency-key", "o1:authorize")],
        Some(&body),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(headers.get("idempotent-replayed").is_none());
    assert_eq!(created["state"], "authorized");
    assert_eq!(created["amount_cents"], 1_500);
    let id = created["id"].as_str().unwrap().to_owned();
    let (status, headers, replay) = call(
        &service,
        Method::POST,
        "/v1/authorizations",
        &[JSON, ("idempotency-key", "o1:authorize")],
        Some(&body),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(replay, created);

    // 422: the key with another body.
    let (status, _, error) = call(
        &service,
        Method::POST,
        "/v1/authorizations",
        &[JSON, ("idempotency-key", "o1:authorize")],
        Some(&authorization(order(1), 1_600)),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error["error"], "idempotency_key_reused");

    // Lookup by key, get by id, and their 404s.
    let (status, _, found) = call(
        &service,
        Method::GET,
        "/v1/payments?authorize_key=o1%3Aauthorize",
        &[],
        None,
    )
    .await;
    assert_eq!((status, &found), (StatusCode::OK, &created));
    let (status, _, got) = call(
        &service,
        Method::GET,
        &format!("/v1/payments/{id}"),
        &[],
        None,
    )
    .await;
    assert_eq!((status, &got), (StatusCode::OK, &created));
    for uri in ["/v1/payments?authorize_key=nope", "/v1/payments/pay_nope"] {
        let (status, _, error) = call(&service, Method::GET, uri, &[], None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(error["error"], "payment_not_found");
    }
    let (status, _, error) = call(&service, Method::GET, "/v1/payments", &[], None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["error"], "missing_authorize_key");

    // Capture (200, then a replay), void refused with 409 and the state,
    // refund, capture of an unknown payment 404.
    let capture = format!("/v1/payments/{id}/capture");
    let (status, headers, captured) = call(
        &service,
        Method::POST,
        &capture,
        &[("idempotency-key", "o1:capture")],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("idempotent-replayed").is_none());
    assert_eq!(captured["state"], "captured");
    let (status, headers, again) = call(
        &service,
        Method::POST,
        &capture,
        &[JSON, ("idempotency-key", "o1:capture")],
        Some("{}"),
    )
    .await;
    assert_eq!((status, &again), (StatusCode::OK, &captured));
    assert_eq!(headers["idempotent-replayed"], "true");
    let (status, _, error) = call(
        &service,
        Method::POST,
        &format!("/v1/payments/{id}/void"),
        &[("idempotency-key", "o1:void")],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error["error"], "invalid_payment_state");
    assert_eq!(error["state"], "captured");
    assert_eq!(error["payment_id"], id.as_str());
    let (status, _, refunded) = call(
        &service,
        Method::POST,
        &format!("/v1/payments/{id}/refund"),
        &[("idempotency-key", "o1:refund")],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(refunded["state"], "refunded");
    let (status, _, error) = call(
        &service,
        Method::POST,
        "/v1/payments/pay_nope/capture",
        &[("idempotency-key", "x:capture")],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error["error"], "payment_not_found");

    // 402: a decline carries its reason and the declined payment, and is
    // replayed as a decline.
    let (status, _, _) = call(
        &service,
        Method::PUT,
        "/v1/admin/faults",
        &[JSON],
        Some(r#"{"decline_rate": 1.0}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for expect_replay in [false, true] {
        let (status, headers, error) = call(
            &service,
            Method::POST,
            "/v1/authorizations",
            &[JSON, ("idempotency-key", "o2:authorize")],
            Some(&authorization(order(2), 900)),
        )
        .await;
        assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
        assert_eq!(error["error"], "payment_declined");
        assert!(error["decline_reason"].is_string());
        assert_eq!(error["payment"]["state"], "declined");
        assert_eq!(headers.get("idempotent-replayed").is_some(), expect_replay);
    }

    // 503 while down, for every provider route; the ledger still answers.
    call(
        &service,
        Method::PUT,
        "/v1/admin/faults",
        &[JSON],
        Some(r#"{"down": true}"#),
    )
    .await;
    let (status, _, error) = call(
        &service,
        Method::POST,
        "/v1/authorizations",
        &[JSON, ("idempotency-key", "o3:authorize")],
        Some(&authorization(order(3), 100)),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error["error"], "provider_unavailable");
    let (status, _, _) = call(
        &service,
        Method::GET,
        &format!("/v1/payments/{id}"),
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _, ledger) = call(&service, Method::GET, "/v1/ledger", &[], None).await;
    assert_eq!(status, StatusCode::OK);
    let ledger: LedgerView = serde_json::from_value(ledger).unwrap();
    assert_eq!(ledger.summary.payments, 2);
    assert_eq!(ledger.summary.refunded, 1);
    assert_eq!(ledger.summary.declined, 1);
    assert_eq!(ledger.stats.rejected_down, 2);
    assert!(ledger.entries.is_none());
}

/// A request and the refusal it must get: method, URI, headers, body,
/// status and error code.
type Case<'a> = (
    Method,
    &'a str,
    Vec<(&'a str, &'a str)>,
    Option<String>,
    StatusCode,
    &'a str,
);

#[tokio::test]
async fn bad_input_is_refused_with_the_error_body_and_writes_nothing() {
    let sim = sim(SimConfig::default());
    let service = PaymentSimService::new(Arc::clone(&sim));
    let good = authorization(order(1), 100);
    let long_key = "k".repeat(256);
    let cases: Vec<Case<'_>> = vec![
        (
            Method::POST,
            "/v1/authorizations",
            vec![JSON],
            Some(good.clone()),
            StatusCode::BAD_REQUEST,
            "missing_idempotency_key",
        ),
        (
            Method::POST,
            "/v1/authorizations",
            vec![JSON, ("idempotency-key", long_key.as_str())],
            Some(good.clone()),
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
        ),
        (
            Method::POST,
            "/v1/authorizations",
            vec![JSON, ("idempotency-key", "k")],
            Some("{not json".into()),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            Method::POST,
            "/v1/authorizations",
            vec![JSON, ("idempotency-key", "k")],
            Some(r#"{"order_id":"nope","amount_cents":1,"currency":"EUR"}"#.into()),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            Method::POST,
            "/v1/authorizations",
            vec![JSON, ("idempotency-key", "k")],
            Some(format!(
                r#"{{"order_id":"{}","amount_cents":1,"currency":"EUR","extra":1}}"#,
                order(1)
            )),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            Method::POST,
            "/v1/authorizations",
            vec![("content-type", "text/plain"), ("idempotency-key", "k")],
            Some(good.clone()),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            "/v1/authorizations",
            vec![JSON, ("idempotency-key", "k")],
            Some(authorization(order(1), 0)),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/authorizations",
            vec![JSON, ("idempotency-key", "k")],
            Some(format!(
                r#"{{"order_id":"{}","amount_cents":1,"currency":"eu"}}"#,
                order(1)
            )),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/authorizations",
            vec![JSON, ("idempotency-key", "k")],
            Some("x".repeat(70_000)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            Method::POST,
            "/v1/payments/pay_1/capture",
            vec![],
            None,
            StatusCode::BAD_REQUEST,
            "missing_idempotency_key",
        ),
        (
            Method::POST,
            "/v1/payments/pay_1/void",
            vec![JSON, ("idempotency-key", "k")],
            Some(r#"{"amount": 5}"#.into()),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            Method::POST,
            "/v1/payments/%FF/refund",
            vec![("idempotency-key", "k")],
            None,
            StatusCode::BAD_REQUEST,
            "invalid_payment_id",
        ),
        (
            Method::GET,
            "/v1/ledger?order_id=nope",
            vec![],
            None,
            StatusCode::BAD_REQUEST,
            "invalid_order_id",
        ),
        (
            Method::GET,
            "/v1/ledger?entries=maybe",
            vec![],
            None,
            StatusCode::BAD_REQUEST,
            "invalid_entries",
        ),
        (
            Method::PUT,
            "/v1/admin/faults",
            vec![JSON],
            Some(r#"{"error_rate": 2}"#.into()),
            StatusCode::BAD_REQUEST,
            "invalid_faults",
        ),
        (
            Method::PUT,
            "/v1/admin/faults",
            vec![JSON],
            Some(r#"{"lost_reply_rate": 0.7, "timeout_rate": 0.7}"#.into()),
            StatusCode::BAD_REQUEST,
            "invalid_faults",
        ),
        (
            Method::PUT,
            "/v1/admin/faults",
            vec![JSON],
            Some(r#"{"latency_mean_ms": -5}"#.into()),
            StatusCode::BAD_REQUEST,
            "invalid_faults",
        ),
        (
            Method::PUT,
            "/v1/admin/faults",
            vec![JSON],
            Some(r#"{"down": true, "chaos": 1}"#.into()),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            Method::DELETE,
            "/v1/payments/pay_1",
            vec![],
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Method::GET,
            "/v1/authorizations",
            vec![],
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Method::GET,
            "/v1/payments/pay_1/explode",
            vec![],
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "/nowhere",
            vec![],
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ];
    for (method, uri, headers, body, status, code) in cases {
        let (got, _, error) = call(&service, method.clone(), uri, &headers, body.as_deref()).await;
        assert_eq!(got, status, "{method} {uri}: {error}");
        assert_eq!(error["error"], code, "{method} {uri}");
        assert!(error["message"].is_string(), "{method} {uri}");
    }
    assert_eq!(sim.ledger().payments, 0);
    assert_eq!(sim.ledger().idempotency_keys, 0);
    assert_eq!(
        sim.config(),
        SimConfig::default(),
        "refused changes change nothing"
    );
}

#[tokio::test]
async fn faults_are_read_and_changed_at_runtime() {
    let sim = sim(SimConfig::default());
    let service = PaymentSimService::new(Arc::clone(&sim));
    let (status, _, faults) = call(&service, Method::GET, "/v1/admin/faults", &[], None).await;
    assert_eq!(status, StatusCode::OK);
    let faults: FaultsView = serde_json::from_value(faults).unwrap();
    assert_eq!(faults, FaultsView::from(&SimConfig::default()));
    let (status, _, faults) = call(
        &service,
        Method::PUT,
        "/v1/admin/faults",
        &[JSON],
        Some(r#"{"error_rate": 0.05, "latency_mean_ms": 20, "latency_p99_ms": 60, "late_reply_ms": 1500}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(faults["error_rate"], 0.05);
    assert_eq!(faults["down"], false);
    let config = sim.config();
    assert_eq!(config.error_rate, 0.05);
    assert_eq!(config.latency_mean, Duration::from_millis(20));
    assert_eq!(config.latency_p99, Duration::from_millis(60));
    assert_eq!(config.late_reply_delay, Duration::from_millis(1500));
    // A later change keeps what it leaves out.
    call(
        &service,
        Method::PUT,
        "/v1/admin/faults",
        &[JSON],
        Some(r#"{"down": true}"#),
    )
    .await;
    assert!(sim.config().down);
    assert_eq!(sim.config().error_rate, 0.05);
}

#[tokio::test]
async fn probes_and_metrics_answer() {
    let sim = sim(SimConfig::default());
    let service = PaymentSimService::new(Arc::clone(&sim));
    let (status, _, body) = call(&service, Method::GET, "/healthz", &[], None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, _, body) = call(&service, Method::GET, "/readyz", &[], None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ready"))
    );
    call(
        &service,
        Method::POST,
        "/v1/authorizations",
        &[JSON, ("idempotency-key", "k")],
        Some(&authorization(order(1), 100)),
    )
    .await;
    let response = service
        .clone()
        .oneshot(
            Request::get("/metrics")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    for needle in [
        "payment_sim_requests_total{operation=\"authorize\"} 1",
        "payment_sim_faults_total{kind=\"lost_reply\"} 0",
        "payment_sim_declines_total 0",
        "payment_sim_replays_total 0",
        "payment_sim_payments{state=\"authorized\"} 1",
        "payment_sim_amount_cents{kind=\"held\"} 100",
        "payment_sim_double_charges 0",
        "payment_sim_down 0",
        "payment_sim_http_requests_total{route=\"/v1/authorizations\",status=\"201\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}

// ---------------------------------------------------------------------------
// Over TCP.
// ---------------------------------------------------------------------------

/// Serves `sim` on 127.0.0.1:0; the server stops when the shutdown is
/// triggered (or the test's runtime ends).
async fn serve(sim: Arc<Simulator>) -> (String, http_kit::Shutdown) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = http_kit::Shutdown::new();
    tokio::spawn(http_kit::serve(
        listener,
        PaymentSimService::new(sim),
        http_kit::ServeConfig::default().with_drain_timeout(Duration::from_millis(100)),
        shutdown.clone(),
    ));
    (url, shutdown)
}

fn provider(url: &str, timeout: Duration) -> HttpPaymentProvider {
    HttpPaymentProvider::new(ClientConfig::new(url).with_timeout(timeout)).unwrap()
}

fn request(order_id: OrderId, amount_cents: i64) -> AuthorizeRequest {
    AuthorizeRequest {
        idempotency_key: format!("{order_id}:authorize"),
        order_id,
        amount_cents,
        currency: "EUR".to_owned(),
    }
}

#[tokio::test]
async fn a_lost_reply_acts_and_drops_the_connection_unanswered() {
    let sim = sim(SimConfig::default().with_lost_reply_rate(1.0));
    let (url, _shutdown) = serve(Arc::clone(&sim)).await;
    let client = JsonClient::new(ClientConfig::new(&url)).unwrap();
    let body = json!({"order_id": order(1), "amount_cents": 100, "currency": "EUR"});
    let error = client
        .send(
            Method::POST,
            "/v1/authorizations",
            Some(&body),
            &[("Idempotency-Key", "k")],
        )
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::Transport(_)), "{error:?}");
    assert_eq!(sim.ledger().payments, 1, "the authorization happened");
    assert_eq!(sim.stats().lost_replies, 1);
}

#[tokio::test]
async fn the_http_provider_maps_every_answer_to_its_typed_error() {
    let sim = sim(SimConfig::default());
    let (url, _shutdown) = serve(Arc::clone(&sim)).await;
    let p = provider(&url, Duration::from_secs(2));

    let payment = p.authorize(request(order(1), 1_000)).await.unwrap();
    assert_eq!(payment.state, PaymentState::Authorized);
    assert_eq!(
        p.authorize(request(order(1), 1_000)).await.unwrap(),
        payment
    );
    assert!(matches!(
        p.authorize(request(order(1), 1_001)).await,
        Err(PaymentError::KeyReused(k)) if k == format!("{}:authorize", order(1))
    ));
    assert_eq!(
        p.lookup(&payment.idempotency_key).await.unwrap(),
        Some(payment.clone())
    );
    assert_eq!(p.lookup("no such key / at all").await.unwrap(), None);
    assert_eq!(
        p.capture("c", &payment.id).await.unwrap().state,
        PaymentState::Captured
    );
    assert!(matches!(
        p.void("v", &payment.id).await,
        Err(PaymentError::InvalidState { id, state: PaymentState::Captured }) if id == payment.id
    ));
    assert_eq!(
        p.refund("r", &payment.id).await.unwrap().state,
        PaymentState::Refunded
    );
    assert!(matches!(
        p.capture("c2", "pay_nope").await,
        Err(PaymentError::NotFound(id)) if id == "pay_nope"
    ));
    assert!(matches!(
        p.authorize(AuthorizeRequest {
            amount_cents: -5,
            ..request(order(2), 1)
        })
        .await,
        Err(PaymentError::Invalid(_))
    ));

    sim.set_config(SimConfig::default().with_decline_rate(1.0))
        .unwrap();
    assert!(matches!(
        p.authorize(request(order(3), 100)).await,
        Err(PaymentError::Declined { reason }) if !reason.is_empty()
    ));

    sim.set_config(SimConfig::default().with_down(true))
        .unwrap();
    assert!(matches!(
        p.authorize(request(order(4), 100)).await,
        Err(PaymentError::Unavailable(_))
    ));

    sim.set_config(SimConfig::default().with_lost_reply_rate(1.0))
        .unwrap();
    assert!(matches!(
        p.authorize(request(order(5), 100)).await,
        Err(PaymentError::OutcomeUnknown(_))
    ));

    sim.set_config(SimConfig::default().with_timeouts(1.0, Duration::from_secs(5)))
        .unwrap();
    let quick = provider(&url, Duration::from_millis(200));
    assert!(matches!(
        quick.authorize(request(order(6), 100)).await,
        Err(PaymentError::OutcomeUnknown(_))
    ));
    // Both unknown outcomes acted.
    assert_eq!(sim.authorizations_for_order(order(5)), 1);
    assert_eq!(sim.authorizations_for_order(order(6)), 1);

    // Nothing listening: refused before sending.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    assert!(matches!(
        provider(&dead_url, Duration::from_secs(1))
            .authorize(request(order(7), 100))
            .await,
        Err(PaymentError::Unavailable(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_resilient_http_client_through_dropped_connections_and_timeouts_never_double_charges() {
    let config = SimConfig::default()
        .with_latency(Duration::from_millis(1), Duration::from_millis(4))
        .with_error_rate(0.1)
        .with_lost_reply_rate(0.2)
        .with_timeouts(0.05, Duration::from_secs(2));
    let sim = sim(config);
    let (url, shutdown) = serve(Arc::clone(&sim)).await;
    let timeout = Duration::from_millis(250);
    let client = Arc::new(
        ResilientPayments::new(
            provider(&url, Duration::from_secs(5)),
            ResilientConfig::default()
                .with_attempt_timeout(timeout)
                .with_max_attempts(25)
                .with_delays(Duration::from_millis(2), Duration::from_millis(50))
                .with_breaker(
                    BreakerConfig::default()
                        .with_consecutive_failures(u32::MAX)
                        .with_min_success_rate(0.0),
                ),
        )
        .unwrap(),
    );
    const ORDERS: u64 = 300;
    let mut tasks = Vec::new();
    for n in 0..ORDERS {
        let client = Arc::clone(&client);
        tasks.push(tokio::spawn(async move {
            let payment = client.authorize(request(order(n), 100 + n as i64)).await?;
            // Capture half, void the rest, through the same faults.
            if n % 2 == 0 {
                client
                    .capture(&format!("{}:capture", order(n)), &payment.id)
                    .await
            } else {
                client
                    .void(&format!("{}:void", order(n)), &payment.id)
                    .await
            }
        }));
    }
    for task in tasks {
        let payment = task
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("every call resolves: {e:?}"));
        assert!(matches!(
            payment.state,
            PaymentState::Captured | PaymentState::Voided
        ));
    }
    let stats = client.stats();
    assert!(stats.timeouts > 0, "{stats:?}");
    assert!(stats.resolved_by_lookup > 0, "{stats:?}");
    assert_eq!(stats.unresolved, 0);

    // Reconcile against the provider's own ledger, over HTTP.
    let admin = JsonClient::new(ClientConfig::new(&url)).unwrap();
    let ledger: LedgerView = admin
        .call::<(), _>(Method::GET, "/v1/ledger?entries=true", None)
        .await
        .unwrap();
    assert!(ledger.stats.lost_replies > 20, "{:?}", ledger.stats);
    assert!(ledger.stats.late_replies > 0, "{:?}", ledger.stats);
    let s = ledger.summary;
    assert_eq!(s.payments, ORDERS, "one payment per order");
    assert_eq!(s.double_charges, 0);
    assert_eq!(
        (s.captured, s.voided, s.authorized),
        (ORDERS / 2, ORDERS / 2, 0)
    );
    let entries = ledger.entries.unwrap();
    let mut per_order: HashMap<OrderId, u32> = HashMap::new();
    for e in &entries {
        *per_order.entry(e.payment.order_id).or_default() += 1;
        assert!(e.captured_cents <= e.payment.amount_cents);
    }
    assert_eq!(per_order.len() as u64, ORDERS);
    assert!(per_order.values().all(|n| *n == 1));
    let expected_captured: i64 = (0..ORDERS)
        .filter(|n| n % 2 == 0)
        .map(|n| 100 + n as i64)
        .sum();
    assert_eq!(s.captured_cents, expected_captured);
    shutdown.trigger();
}

#[test]
fn the_routes_match_the_openapi_document_both_ways() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/order-saga/payment-sim.openapi.json"
    );
    let text = std::fs::read_to_string(path).expect("the OpenAPI document exists");
    let doc: Value = serde_json::from_str(&text).expect("it is JSON");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in ["get", "put", "post", "delete", "patch"] {
            if item.get(method).is_some() {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(
        served.difference(&documented).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "served but not documented"
    );
    assert_eq!(
        documented.difference(&served).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "documented but not served"
    );
    // Every error code the API answers is in the document.
    for code in [
        "payment_declined",
        "idempotency_key_reused",
        "invalid_payment_state",
        "payment_not_found",
        "provider_unavailable",
        "missing_idempotency_key",
        "invalid_idempotency_key",
        "malformed_json",
        "invalid_request",
        "missing_authorize_key",
        "invalid_payment_id",
        "invalid_faults",
        "invalid_order_id",
        "invalid_entries",
    ] {
        assert!(text.contains(code), "{code} is not in the OpenAPI document");
    }
}

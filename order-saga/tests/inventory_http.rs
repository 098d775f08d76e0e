//! The inventory over HTTP: the conformance suite through `HttpInventory`
//! and `InventoryService` on a real socket, every status and error code of
//! the API, the probes and metrics, and the OpenAPI document against the
//! routes that exist.
#![cfg(feature = "http")]

mod inventory_support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use inventory_support::{Harness, conformance, manual_clock, new_id, request, restock};
use jsonwebtoken::{EncodingKey, Header};
use jwt_kit::{JwtConfig, JwtVerifier, KeySet, VerifyingKey};
use order_saga::BoxFuture;
use order_saga::http::inventory::{InventoryHttpConfig, InventoryService, ROUTES, ReadyCheck};
use order_saga::http::{ClientConfig, HttpInventory};
use order_saga::inventory::{
    Inventory, InventoryError, MemoryInventory, Reservation, ReservationId, ReserveRequest,
    Restock, StockLevel, SweeperStats,
};
use order_saga::model::Sku;
use serde_json::{Value, json};

const SECRET: &str = "inventory-test-secret-0123456789abcdef";

fn token_with(secret: &str, roles: &[&str], exp_offset: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    jsonwebtoken::encode(
        &Header::default(),
        &json!({"sub": "order-service", "exp": now + exp_offset, "roles": roles}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn token(roles: &[&str]) -> String {
    token_with(SECRET, roles, 600)
}

fn verifier() -> JwtVerifier {
    let keys = KeySet::new()
        .with_key(VerifyingKey::hs256("k", SECRET.as_bytes()))
        .unwrap()
        .with_default_kid("k");
    JwtVerifier::new(keys, JwtConfig::default())
}

/// Serves `service` on an ephemeral port until the returned handle drops.
async fn serve(service: InventoryService) -> (SocketAddr, http_kit::Shutdown) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = http_kit::Shutdown::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        http_kit::serve(listener, service, http_kit::ServeConfig::default(), stop).await;
    });
    (addr, shutdown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_inventory_conforms() {
    let clock = manual_clock();
    let memory = Arc::new(MemoryInventory::new(Arc::new(clock.clone())));
    let service = InventoryService::new(memory, verifier(), InventoryHttpConfig::default());
    let (addr, shutdown) = serve(service).await;
    let client = HttpInventory::new(
        ClientConfig::new(format!("http://{addr}")).with_bearer_token(token(&["service", "admin"])),
    )
    .unwrap();
    conformance(&Harness {
        inventory: Arc::new(client),
        clock,
    })
    .await;
    shutdown.trigger();
}

#[tokio::test]
async fn the_client_reports_an_unreachable_or_refusing_service_as_unavailable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = listener.local_addr().unwrap();
    drop(listener);
    let client = HttpInventory::new(
        ClientConfig::new(format!("http://{dead}")).with_timeout(Duration::from_millis(500)),
    )
    .unwrap();
    let err = client
        .reserve(request(new_id(), &[("a", 1)], Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, InventoryError::Unavailable(_)), "{err:?}");

    // A token the service refuses is not the caller's input error.
    let service = InventoryService::new(
        Arc::new(MemoryInventory::default()),
        verifier(),
        InventoryHttpConfig::default(),
    );
    let (addr, shutdown) = serve(service).await;
    let client = HttpInventory::new(
        ClientConfig::new(format!("http://{addr}")).with_bearer_token(token_with(
            "another-secret-0123456789abcdef!!",
            &["service"],
            600,
        )),
    )
    .unwrap();
    let err = client.commit(new_id()).await.unwrap_err();
    assert!(matches!(err, InventoryError::Unavailable(_)), "{err:?}");
    // A token without the admin role cannot sweep.
    let client = HttpInventory::new(
        ClientConfig::new(format!("http://{addr}")).with_bearer_token(token(&["service"])),
    )
    .unwrap();
    let err = client.sweep_expired(10).await.unwrap_err();
    assert!(matches!(err, InventoryError::Unavailable(_)), "{err:?}");
    shutdown.trigger();
}

/// One request through `service.handle`: status, headers, JSON body (or
/// `Value::String` of a non-JSON body).
async fn call(
    service: &InventoryService,
    method: Method,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
) -> (StatusCode, HeaderMap, Value) {
    let mut builder = Request::builder().method(method).uri(path);
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    if let Some(content_type) = content_type {
        builder = builder.header("content-type", content_type);
    }
    let response = service
        .handle(builder.body(Full::new(body.into())).unwrap())
        .await;
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, headers, value)
}

async fn post_json(
    service: &InventoryService,
    path: &str,
    token: &str,
    body: &Value,
) -> (StatusCode, Value) {
    let (status, _, body) = call(
        service,
        Method::POST,
        path,
        Some(token),
        Some("application/json"),
        serde_json::to_vec(body).unwrap(),
    )
    .await;
    (status, body)
}

fn reserve_body(id: ReservationId, items: &[(&str, u32)]) -> Value {
    json!({
        "reservation_id": id,
        "items": items.iter().map(|(sku, q)| json!({"sku": sku, "quantity": q})).collect::<Vec<_>>(),
        "ttl": 60_000,
    })
}

fn memory_service(config: InventoryHttpConfig) -> (Arc<MemoryInventory>, InventoryService) {
    let memory = Arc::new(MemoryInventory::new(Arc::new(manual_clock())));
    let service = InventoryService::new(memory.clone(), verifier(), config);
    (memory, service)
}

#[tokio::test]
async fn reservations_answer_every_documented_status() {
    let (memory, service) = memory_service(InventoryHttpConfig::default());
    restock(&*memory, "a", 3, Some(250)).await;
    let svc = token(&["service"]);
    let id = new_id();

    let (status, body) = post_json(
        &service,
        "/v1/reservations",
        &svc,
        &reserve_body(id, &[("a", 2)]),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["id"], json!(id));
    assert_eq!(body["state"], "reserved");
    assert_eq!(body["total_cents"], 500);
    assert_eq!(
        body["lines"],
        json!([{"sku": "a", "quantity": 2, "unit_price_cents": 250}])
    );
    let (status, replay) = post_json(
        &service,
        "/v1/reservations",
        &svc,
        &reserve_body(id, &[("a", 2)]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(replay, body);

    let (status, err) = post_json(
        &service,
        "/v1/reservations",
        &svc,
        &reserve_body(id, &[("a", 1)]),
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("reservation_mismatch")
        )
    );
    assert_eq!(err["reservation_id"], json!(id));

    let (status, err) = post_json(
        &service,
        "/v1/reservations",
        &svc,
        &reserve_body(new_id(), &[("a", 2)]),
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::CONFLICT, Some("out_of_stock"))
    );
    assert_eq!(
        (
            err["sku"].as_str(),
            err["requested"].as_u64(),
            err["available"].as_i64()
        ),
        (Some("a"), Some(2), Some(1))
    );

    let (status, err) = post_json(
        &service,
        "/v1/reservations",
        &svc,
        &reserve_body(new_id(), &[("nope", 1)]),
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_sku"))
    );
    assert_eq!(err["sku"], "nope");

    let (status, err) = post_json(
        &service,
        "/v1/reservations",
        &svc,
        &reserve_body(new_id(), &[("a", 0)]),
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
    let mut no_ttl = reserve_body(new_id(), &[("a", 1)]);
    no_ttl.as_object_mut().unwrap().remove("ttl");
    let (status, err) = post_json(&service, "/v1/reservations", &svc, &no_ttl).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("malformed_json"))
    );
    let (status, err) = post_json(
        &service,
        "/v1/reservations",
        &svc,
        &reserve_body(new_id(), &[("bad sku", 1)]),
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("malformed_json"))
    );

    let (status, _, err) = call(
        &service,
        Method::POST,
        "/v1/reservations",
        Some(&svc),
        Some("application/json"),
        "{\"reservation_id\":",
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("malformed_json"))
    );
    let (status, _, err) = call(
        &service,
        Method::POST,
        "/v1/reservations",
        Some(&svc),
        Some("text/plain"),
        "{}",
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Some("unsupported_media_type")
        )
    );
    let (status, _, err) = call(
        &service,
        Method::POST,
        "/v1/reservations",
        Some(&svc),
        None,
        "{}",
    )
    .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{err}");

    // Nothing was written by the refusals.
    assert_eq!(inventory_support::counts(&*memory, "a").await, (1, 2, 0));

    // GET, commit, release.
    let path = format!("/v1/reservations/{id}");
    let (status, _, got) = call(&service, Method::GET, &path, Some(&svc), None, "").await;
    assert_eq!((status, &got), (StatusCode::OK, &body));
    let (status, _, err) = call(
        &service,
        Method::GET,
        &format!("/v1/reservations/{}", new_id()),
        Some(&svc),
        None,
        "",
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("reservation_not_found"))
    );
    let (status, _, err) = call(
        &service,
        Method::GET,
        "/v1/reservations/not-a-uuid",
        Some(&svc),
        None,
        "",
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_reservation_id"))
    );

    let (status, _, committed) = call(
        &service,
        Method::POST,
        &format!("{path}/commit"),
        Some(&svc),
        None,
        "",
    )
    .await;
    assert_eq!(
        (status, committed["state"].as_str()),
        (StatusCode::OK, Some("committed"))
    );
    let (status, _, err) = call(
        &service,
        Method::POST,
        &format!("/v1/reservations/{}/commit", new_id()),
        Some(&svc),
        None,
        "",
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("reservation_not_found"))
    );
    let (status, _, released) = call(
        &service,
        Method::POST,
        &format!("{path}/release"),
        Some(&svc),
        None,
        "",
    )
    .await;
    assert_eq!(
        (status, released["state"].as_str()),
        (StatusCode::OK, Some("released"))
    );
    let (status, _, err) = call(
        &service,
        Method::POST,
        &format!("{path}/commit"),
        Some(&svc),
        None,
        "",
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::CONFLICT, Some("reservation_expired"))
    );
    let (status, _, err) = call(
        &service,
        Method::POST,
        &format!("/v1/reservations/{}/release", new_id()),
        Some(&svc),
        None,
        "",
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("reservation_not_found"))
    );
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let (_memory, service) =
        memory_service(InventoryHttpConfig::default().with_max_body_bytes(256));
    let items: Vec<(String, u32)> = (0..40).map(|n| (format!("sku-{n}"), 1)).collect();
    let items: Vec<(&str, u32)> = items.iter().map(|(s, q)| (s.as_str(), *q)).collect();
    let (status, err) = post_json(
        &service,
        "/v1/reservations",
        &token(&["service"]),
        &reserve_body(new_id(), &items),
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large"))
    );
    assert_eq!(err["max_bytes"], 256);
}

#[tokio::test]
async fn tokens_and_roles_are_checked() {
    let (memory, service) = memory_service(InventoryHttpConfig::default());
    restock(&*memory, "a", 3, Some(250)).await;
    let body = serde_json::to_vec(&reserve_body(new_id(), &[("a", 1)])).unwrap();
    let json_type = Some("application/json");

    let (status, headers, err) = call(
        &service,
        Method::POST,
        "/v1/reservations",
        None,
        json_type,
        body.clone(),
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("missing_token"))
    );
    assert_eq!(headers["www-authenticate"], "Bearer");
    for bad in [
        "not.a.jwt".to_owned(),
        token_with("another-secret-0123456789abcdef!!", &["service"], 600),
        token_with(SECRET, &["service"], -3600),
    ] {
        let (status, _, err) = call(
            &service,
            Method::POST,
            "/v1/reservations",
            Some(&bad),
            json_type,
            body.clone(),
        )
        .await;
        assert_eq!(
            (status, err["error"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("invalid_token"))
        );
    }
    // Reservations need `service`; restock and sweep need `admin`; stock
    // needs any valid token.
    let none = token(&[]);
    let admin = token(&["admin"]);
    let svc = token(&["service"]);
    let id = new_id();
    for (method, path, who) in [
        (Method::POST, "/v1/reservations".to_owned(), &admin),
        (Method::GET, format!("/v1/reservations/{id}"), &none),
        (
            Method::POST,
            format!("/v1/reservations/{id}/commit"),
            &admin,
        ),
        (
            Method::POST,
            format!("/v1/reservations/{id}/release"),
            &none,
        ),
        (Method::POST, "/v1/inventory/a/restock".to_owned(), &svc),
        (Method::POST, "/v1/admin/sweep".to_owned(), &svc),
    ] {
        let (status, _, err) =
            call(&service, method, &path, Some(who), json_type, body.clone()).await;
        assert_eq!(
            (status, err["error"].as_str()),
            (StatusCode::FORBIDDEN, Some("forbidden")),
            "{path}"
        );
    }
    assert_eq!(inventory_support::counts(&*memory, "a").await, (3, 0, 0));
    let (status, _, level) = call(
        &service,
        Method::GET,
        "/v1/inventory/a",
        Some(&none),
        None,
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        level,
        json!({"sku": "a", "available": 3, "reserved": 0, "committed": 0, "unit_price_cents": 250})
    );
}

#[tokio::test]
async fn stock_restock_and_sweep() {
    let clock = manual_clock();
    let memory = Arc::new(MemoryInventory::new(Arc::new(clock.clone())));
    let service = InventoryService::new(memory.clone(), verifier(), InventoryHttpConfig::default());
    let admin = token(&["admin"]);
    let reader = token(&[]);

    let (status, err) = post_json(
        &service,
        "/v1/inventory/new-1/restock",
        &admin,
        &json!({"quantity": 5}),
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
    let (status, level) = post_json(
        &service,
        "/v1/inventory/new-1/restock",
        &admin,
        &json!({"quantity": 5, "unit_price_cents": 120}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        level,
        json!({"sku": "new-1", "available": 5, "reserved": 0, "committed": 0, "unit_price_cents": 120})
    );
    let (status, err) = post_json(
        &service,
        "/v1/inventory/new-1/restock",
        &admin,
        &json!({"quantity": 5, "sku": "x"}),
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("malformed_json"))
    );
    let (status, err) = post_json(
        &service,
        "/v1/inventory/new-1/restock",
        &admin,
        &json!({"quantity": -1}),
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("malformed_json"))
    );
    let (status, err) = post_json(
        &service,
        "/v1/inventory/new-1/restock",
        &admin,
        &json!({"quantity": 1, "unit_price_cents": -5}),
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
    let (status, err) = post_json(
        &service,
        "/v1/inventory/bad%20sku/restock",
        &admin,
        &json!({"quantity": 1}),
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_sku"))
    );

    let (status, _, err) = call(
        &service,
        Method::GET,
        "/v1/inventory/nope",
        Some(&reader),
        None,
        "",
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_sku"))
    );
    let (status, _, err) = call(
        &service,
        Method::GET,
        "/v1/inventory/%ff",
        Some(&reader),
        None,
        "",
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_sku"))
    );
    // A percent-encoded SKU is decoded once ("%2E%2E" is the SKU "..").
    restock(&*memory, "..", 1, Some(1)).await;
    let (status, _, level) = call(
        &service,
        Method::GET,
        "/v1/inventory/%2E%2E",
        Some(&reader),
        None,
        "",
    )
    .await;
    assert_eq!(
        (status, level["sku"].as_str()),
        (StatusCode::OK, Some(".."))
    );

    memory
        .reserve(request(new_id(), &[("new-1", 2)], Duration::from_secs(1)))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(1));
    let (status, _, err) = call(
        &service,
        Method::POST,
        "/v1/admin/sweep?limit=0",
        Some(&admin),
        None,
        "",
    )
    .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
    let (status, _, swept) = call(
        &service,
        Method::POST,
        "/v1/admin/sweep?limit=10",
        Some(&admin),
        None,
        "",
    )
    .await;
    assert_eq!((status, swept), (StatusCode::OK, json!({"swept": 1})));
    let (status, _, swept) = call(
        &service,
        Method::POST,
        "/v1/admin/sweep",
        Some(&admin),
        None,
        "",
    )
    .await;
    assert_eq!((status, swept), (StatusCode::OK, json!({"swept": 0})));
}

#[tokio::test]
async fn wrong_methods_are_405_with_allow_and_unknown_routes_404() {
    let (_memory, service) = memory_service(InventoryHttpConfig::default());
    for (method, path, allow) in [
        (Method::GET, "/v1/reservations", "POST"),
        (Method::DELETE, "/v1/reservations/x", "GET"),
        (Method::GET, "/v1/reservations/x/commit", "POST"),
        (Method::PUT, "/v1/inventory/a", "GET"),
        (Method::GET, "/v1/inventory/a/restock", "POST"),
        (Method::POST, "/healthz", "GET"),
        (Method::POST, "/metrics", "GET"),
    ] {
        let (status, headers, err) = call(&service, method, path, None, None, "").await;
        assert_eq!(
            (status, err["error"].as_str()),
            (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed")),
            "{path}"
        );
        assert_eq!(headers["allow"], allow, "{path}");
    }
    for path in [
        "/",
        "/v1/orders",
        "/v1/reservations/x/cancel",
        "/v1/inventory/",
        "/healthz/",
    ] {
        let (status, _, err) = call(&service, Method::GET, path, None, None, "").await;
        assert_eq!(
            (status, err["error"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "{path}"
        );
    }
}

/// An inventory whose store is down.
#[derive(Debug)]
struct Down;

fn down<T>() -> Result<T, InventoryError> {
    Err(InventoryError::Unavailable(
        "connection refused by 10.1.2.3".into(),
    ))
}

impl Inventory for Down {
    fn reserve(&self, _: ReserveRequest) -> BoxFuture<'_, Result<Reservation, InventoryError>> {
        Box::pin(async { down() })
    }
    fn commit(&self, _: ReservationId) -> BoxFuture<'_, Result<Reservation, InventoryError>> {
        Box::pin(async { down() })
    }
    fn release(
        &self,
        _: ReservationId,
    ) -> BoxFuture<'_, Result<Option<Reservation>, InventoryError>> {
        Box::pin(async { down() })
    }
    fn reservation(
        &self,
        _: ReservationId,
    ) -> BoxFuture<'_, Result<Option<Reservation>, InventoryError>> {
        Box::pin(async { down() })
    }
    fn stock<'a>(&'a self, _: &'a Sku) -> BoxFuture<'a, Result<StockLevel, InventoryError>> {
        Box::pin(async { down() })
    }
    fn restock(&self, _: Restock) -> BoxFuture<'_, Result<StockLevel, InventoryError>> {
        Box::pin(async { down() })
    }
    fn sweep_expired(&self, _: usize) -> BoxFuture<'_, Result<usize, InventoryError>> {
        Box::pin(async { down() })
    }
}

#[tokio::test]
async fn a_store_that_is_down_is_503_and_not_ready() {
    let check = ReadyCheck::new("postgresql", || async { Err::<(), _>("refused") });
    let service = InventoryService::new(
        Arc::new(Down),
        verifier(),
        InventoryHttpConfig::default().with_ready_check(check),
    );
    let svc = token(&["service", "admin"]);
    let id = new_id();
    for (method, path, body) in [
        (
            Method::POST,
            "/v1/reservations".to_owned(),
            serde_json::to_vec(&reserve_body(id, &[("a", 1)])).unwrap(),
        ),
        (Method::GET, format!("/v1/reservations/{id}"), vec![]),
        (
            Method::POST,
            format!("/v1/reservations/{id}/commit"),
            vec![],
        ),
        (
            Method::POST,
            format!("/v1/reservations/{id}/release"),
            vec![],
        ),
        (Method::GET, "/v1/inventory/a".to_owned(), vec![]),
        (
            Method::POST,
            "/v1/inventory/a/restock".to_owned(),
            serde_json::to_vec(&json!({"quantity": 1})).unwrap(),
        ),
        (Method::POST, "/v1/admin/sweep".to_owned(), vec![]),
    ] {
        let (status, _, err) = call(
            &service,
            method,
            &path,
            Some(&svc),
            Some("application/json"),
            body,
        )
        .await;
        assert_eq!(
            (status, err["error"].as_str()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Some("inventory_unavailable")
            ),
            "{path}"
        );
        assert!(
            !err["message"].as_str().unwrap().contains("10.1.2.3"),
            "the cause stays in the log"
        );
    }
    let (status, _, body) = call(&service, Method::GET, "/readyz", None, None, "").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("not_ready"))
    );
    assert_eq!(body["dependency"], "postgresql");
    let (status, _, body) = call(&service, Method::GET, "/healthz", None, None, "").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
}

#[tokio::test(start_paused = true)]
async fn readiness_passes_and_times_out() {
    let ready = ReadyCheck::new("postgresql", || async { Ok::<(), std::io::Error>(()) });
    let (_m, service) = memory_service(InventoryHttpConfig::default().with_ready_check(ready));
    let (status, _, body) = call(&service, Method::GET, "/readyz", None, None, "").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ready"})));
    let hangs = ReadyCheck::new("postgresql", || {
        std::future::pending::<Result<(), std::io::Error>>()
    });
    let (_m, service) = memory_service(
        InventoryHttpConfig::default()
            .with_ready_check(hangs)
            .with_ready_timeout(Duration::from_secs(2)),
    );
    let (status, _, body) = call(&service, Method::GET, "/readyz", None, None, "").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("not_ready"))
    );
    // No check configured: ready.
    let (_m, service) = memory_service(InventoryHttpConfig::default());
    let (status, _, _) = call(&service, Method::GET, "/readyz", None, None, "").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn metrics_count_outcomes_and_sweeps() {
    let clock = manual_clock();
    let memory = Arc::new(MemoryInventory::new(Arc::new(clock.clone())));
    let stats = SweeperStats::default();
    let service = InventoryService::new(
        memory.clone(),
        verifier(),
        InventoryHttpConfig::default().with_sweeper(stats),
    );
    restock(&*memory, "a", 1, Some(1)).await;
    let svc = token(&["service", "admin"]);
    let id = new_id();
    post_json(
        &service,
        "/v1/reservations",
        &svc,
        &reserve_body(id, &[("a", 1)]),
    )
    .await;
    post_json(
        &service,
        "/v1/reservations",
        &svc,
        &reserve_body(id, &[("a", 1)]),
    )
    .await;
    post_json(
        &service,
        "/v1/reservations",
        &svc,
        &reserve_body(new_id(), &[("a", 1)]),
    )
    .await;
    call(
        &service,
        Method::POST,
        &format!("/v1/reservations/{id}/commit"),
        Some(&svc),
        None,
        "",
    )
    .await;
    call(
        &service,
        Method::POST,
        &format!("/v1/reservations/{id}/release"),
        Some(&svc),
        None,
        "",
    )
    .await;
    call(
        &service,
        Method::POST,
        &format!("/v1/reservations/{}/release", new_id()),
        Some(&svc),
        None,
        "",
    )
    .await;
    memory
        .reserve(request(new_id(), &[("a", 1)], Duration::from_secs(1)))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(1));
    call(
        &service,
        Method::POST,
        "/v1/admin/sweep",
        Some(&svc),
        None,
        "",
    )
    .await;

    let (status, headers, text) = call(&service, Method::GET, "/metrics", None, None, "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = text.as_str().unwrap().to_owned();
    for line in [
        r#"order_saga_inventory_reservations_total{outcome="created"} 1"#,
        r#"order_saga_inventory_reservations_total{outcome="existing"} 1"#,
        r#"order_saga_inventory_reservations_total{outcome="out_of_stock"} 1"#,
        r#"order_saga_inventory_commits_total{outcome="committed"} 1"#,
        r#"order_saga_inventory_releases_total{outcome="released"} 1"#,
        r#"order_saga_inventory_releases_total{outcome="not_found"} 1"#,
        "order_saga_inventory_swept_total 1",
        "order_saga_inventory_sweep_errors_total 0",
        r#"order_saga_inventory_http_requests_total{route="/v1/reservations",status="201"} 1"#,
        r#"order_saga_inventory_http_requests_total{route="/v1/reservations/{id}/commit",status="200"} 1"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
}

#[test]
fn the_openapi_document_lists_exactly_the_routes() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/order-saga/inventory.openapi.json"
    );
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(doc["openapi"].as_str().map(|v| &v[..4]), Some("3.1."));
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if [
                "get", "put", "post", "delete", "patch", "head", "options", "trace",
            ]
            .contains(&method.as_str())
            {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from the OpenAPI document: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "documented routes the service does not have: {unserved:?}"
    );
    // Every documented error response refers to the shared error schema.
    assert!(doc["components"]["schemas"]["Error"].is_object());
}

//! The order service over HTTP, on a real socket: every status and error
//! code of `docs/order-saga/API.md`, the idempotency semantics, who may see
//! what, keyset pages, cancel and retry, the probes and metrics, `ROUTES`
//! against `docs/order-saga/order.openapi.json`, and a payment-provider
//! outage end to end (the simulator served over HTTP behind the resilient
//! client and its circuit breaker).
#![cfg(feature = "http")]

mod support;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use jwt_kit::{JwtConfig, JwtVerifier, KeySet, VerifyingKey};
use order_saga::http::order::{ADMIN_ROLE, IDEMPOTENCY_KEY, ROUTES};
use order_saga::http::{ClientConfig, JsonClient, OrderHttp, PaymentSimService};
use order_saga::inventory::memory::MemoryInventory;
use order_saga::inventory::{
    Inventory, InventoryError, Reservation, ReservationId, ReserveRequest, Restock, StockLevel,
};
use order_saga::order::Running;
use order_saga::order::store::memory::MemoryOrderStore;
use order_saga::payment::resilient::{BreakerConfig, BreakerState, ResilientConfig};
use order_saga::payment::sim::{SimConfig, Simulator};
use order_saga::payment::{AuthorizeRequest, HttpPaymentProvider, Payment, ResilientPayments};
use order_saga::shipping::memory::MemoryShipping;
use order_saga::shipping::{ScheduleShipment, Shipment, Shipping, ShippingError};
use order_saga::{
    BoxFuture, OrderConfig, OrderId, OrderService, PaymentError, Payments, Services, Sku,
};
use serde_json::{Value, json};
use support::{cart, sku, stock};
use tokio::sync::Semaphore;

// ---------------------------------------------------------------------------
// Tokens.
// ---------------------------------------------------------------------------

const SECRET: &[u8] = b"order-http-tests-secret-of-32-bytes-or-more";
const KID: &str = "k1";

fn verifier() -> JwtVerifier {
    let keys = KeySet::new()
        .with_key(VerifyingKey::hs256(KID, SECRET))
        .unwrap()
        .with_default_kid(KID);
    JwtVerifier::new(keys, JwtConfig::default())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A token for `sub` with `roles`, signed with `secret` and `alg`,
/// expiring `expires_in` seconds from now (negative: already expired).
fn sign(secret: &[u8], alg: Algorithm, sub: &str, roles: &[&str], expires_in: i64) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(KID.into());
    encode(
        &header,
        &json!({"sub": sub, "exp": unix_now() + expires_in, "roles": roles}),
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// A customer's token.
fn token(sub: &str) -> String {
    sign(SECRET, Algorithm::HS256, sub, &["customer"], 600)
}

/// An operator's token (`admin` role).
fn admin() -> String {
    sign(SECRET, Algorithm::HS256, "ops", &[ADMIN_ROLE], 600)
}

// ---------------------------------------------------------------------------
// The client side.
// ---------------------------------------------------------------------------

/// One answer: status, headers and the JSON body (or the text as a string).
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

fn decode(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// The suite's error body: `status`, `error` = `code`, a non-empty message,
/// JSON and `no-store`.
#[track_caller]
fn assert_error(reply: &Reply, status: u16, code: &str) {
    assert_eq!(reply.status.as_u16(), status, "{}", reply.body);
    assert_eq!(reply.body["error"], code, "{}", reply.body);
    assert!(
        reply.body["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{}",
        reply.body
    );
    assert_eq!(reply.headers["content-type"], "application/json");
}

/// The service's address, and two ways to call it over TCP: the crate's
/// `JsonClient` (JSON bodies), and a raw hyper client (any bytes, any
/// header, and the response headers).
#[derive(Clone)]
struct Api {
    url: String,
}

impl Api {
    /// `JsonClient::send`: `body` as JSON, with `Content-Type:
    /// application/json`.
    async fn send(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut config = ClientConfig::new(&self.url).with_timeout(Duration::from_secs(10));
        if let Some(token) = token {
            config = config.with_bearer_token(token);
        }
        let client = JsonClient::new(config).unwrap();
        let (status, bytes) = client.send(method, path, body, headers).await.unwrap();
        (status, decode(&bytes))
    }

    /// Any request, headers and body as given.
    async fn raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, HeaderValue)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url));
        for (name, value) in headers {
            request = request.header(*name, value.clone());
        }
        let request = request.body(Full::new(body.into())).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body: decode(&bytes),
        }
    }

    /// A request with a bearer token and, when `body` is given, a JSON body.
    async fn call(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Reply {
        self.call_with(token, method, path, body, &[]).await
    }

    async fn call_with(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<&Value>,
        extra: &[(&str, HeaderValue)],
    ) -> Reply {
        let mut headers: Vec<(&str, HeaderValue)> = Vec::new();
        if let Some(token) = token {
            headers.push((
                "authorization",
                HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
            ));
        }
        let bytes = match body {
            Some(body) => {
                headers.push(("content-type", HeaderValue::from_static("application/json")));
                Bytes::from(serde_json::to_vec(body).unwrap())
            }
            None => Bytes::new(),
        };
        headers.extend(extra.iter().cloned());
        self.raw(method, path, &headers, bytes).await
    }

    /// `POST /v1/orders` with `key`.
    async fn create(&self, token: &str, key: &str, body: &Value) -> Reply {
        self.call_with(
            Some(token),
            Method::POST,
            "/v1/orders",
            Some(body),
            &[(IDEMPOTENCY_KEY, HeaderValue::from_str(key).unwrap())],
        )
        .await
    }

    /// `POST /v1/orders` that must answer 201; returns the order.
    async fn created(&self, token: &str, key: &str, body: &Value) -> Value {
        let reply = self.create(token, key, body).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        reply.body
    }

    async fn get(&self, token: &str, id: &str) -> Reply {
        self.call(Some(token), Method::GET, &format!("/v1/orders/{id}"), None)
            .await
    }

    async fn list(&self, token: &str, query: &str) -> Reply {
        self.call(
            Some(token),
            Method::GET,
            &format!("/v1/orders{query}"),
            None,
        )
        .await
    }

    async fn cancel(&self, token: &str, id: &str) -> Reply {
        self.call(
            Some(token),
            Method::POST,
            &format!("/v1/orders/{id}/cancel"),
            None,
        )
        .await
    }

    /// Polls `GET /v1/orders/{id}` (as `token`) until the order is
    /// terminal, for at most `within`.
    async fn settled(&self, token: &str, id: &str, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let reply = self.get(token, id).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
            let state = reply.body["state"].as_str().unwrap().to_owned();
            if ["confirmed", "cancelled", "needs_attention"].contains(&state.as_str()) {
                return reply.body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "order {id} still {state} after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn metrics(&self) -> String {
        let reply = self.call(None, Method::GET, "/metrics", None).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(
            reply.headers["content-type"],
            http_kit::prometheus::CONTENT_TYPE
        );
        reply.body.as_str().unwrap().to_owned()
    }
}

fn order_body(items: &[(&str, u32)]) -> Value {
    serde_json::to_value(cart(items)).unwrap()
}

fn id_of(order: &Value) -> String {
    order["id"].as_str().unwrap().to_owned()
}

// ---------------------------------------------------------------------------
// The server side.
// ---------------------------------------------------------------------------

/// `service` on a free loopback port until the shutdown is triggered.
async fn serve<S>(service: S) -> (String, http_kit::Shutdown)
where
    S: tower::Service<Request<hyper::body::Incoming>, Response = http::Response<http_kit::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<http_kit::BoxError>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = http_kit::Shutdown::new();
    tokio::spawn(http_kit::serve(
        listener,
        service,
        http_kit::ServeConfig::default().with_drain_timeout(Duration::from_millis(200)),
        shutdown.clone(),
    ));
    (url, shutdown)
}

const WAIT: Duration = Duration::from_secs(20);

fn fast_config() -> OrderConfig {
    OrderConfig {
        poll_interval: Duration::from_millis(10),
        retry_base: Duration::from_millis(1),
        retry_max: Duration::from_millis(20),
        ..OrderConfig::default()
    }
}

/// What a world is built from; `None` takes the in-memory default.
#[derive(Default)]
struct Parts {
    inventory: Option<Arc<dyn Inventory>>,
    payments: Option<Arc<dyn Payments>>,
    shipping: Option<Arc<dyn Shipping>>,
    config: Option<OrderConfig>,
}

/// The order service, in memory, started and served over HTTP.
struct World {
    api: Api,
    service: OrderService,
    inventory: Arc<dyn Inventory>,
    /// The simulator behind the default payments.
    sim: Arc<Simulator>,
    running: Running,
    shutdown: http_kit::Shutdown,
}

impl World {
    async fn start(parts: Parts) -> World {
        let clock = time_kit::system();
        let sim = Arc::new(Simulator::with_seed(SimConfig::default(), 7).unwrap());
        let inventory = parts
            .inventory
            .unwrap_or_else(|| Arc::new(MemoryInventory::new(clock.clone())));
        let payments = parts.payments.unwrap_or_else(|| {
            Arc::new(ResilientPayments::new(sim.clone(), ResilientConfig::default()).unwrap())
        });
        let shipping = parts
            .shipping
            .unwrap_or_else(|| Arc::new(MemoryShipping::default()));
        let services = Services {
            inventory: inventory.clone(),
            payments,
            shipping,
        };
        let service = OrderService::new(
            Arc::new(MemoryOrderStore::new(clock.clone())),
            services,
            parts.config.unwrap_or_else(fast_config),
            clock,
        );
        let running = service.start();
        let (url, shutdown) = serve(OrderHttp::new(service.clone(), verifier())).await;
        World {
            api: Api { url },
            service,
            inventory,
            sim,
            running,
            shutdown,
        }
    }

    async fn default() -> World {
        World::start(Parts::default()).await
    }

    async fn level(&self, name: &str) -> (i64, i64, i64) {
        let level = self.inventory.stock(&sku(name)).await.unwrap();
        (level.available, level.reserved, level.committed)
    }

    async fn stop(self) {
        self.shutdown.trigger();
        self.running.shutdown().await;
    }
}

// ---------------------------------------------------------------------------
// Create and idempotency.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_is_201_with_the_stock_reserved_and_a_replay_is_200_with_the_same_body() {
    let w = World::default().await;
    stock(&w.inventory, "SKU-1", 10, 1250).await;
    stock(&w.inventory, "SKU-2", 10, 99).await;
    let alice = token("alice");
    let body = order_body(&[("SKU-1", 2), ("SKU-2", 1)]);
    let first = w.api.create(&alice, "key-1", &body).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert!(first.headers.get("idempotent-replayed").is_none());
    assert_eq!(first.headers["content-type"], "application/json");
    let order = &first.body;
    let fields: BTreeSet<&str> = order
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        BTreeSet::from([
            "id",
            "customer",
            "state",
            "items",
            "lines",
            "total_cents",
            "currency",
            "ship_to",
            "cancel_reason",
            "payment_id",
            "shipment_id",
            "attention",
            "created_at",
            "updated_at"
        ]),
        "the documented order object"
    );
    assert_eq!(
        order["state"], "stock_reserved",
        "201 means the stock is held"
    );
    assert_eq!(
        order["customer"], "alice",
        "the customer is the token's sub"
    );
    assert_eq!(order["total_cents"], 2 * 1250 + 99);
    assert_eq!(order["currency"], "USD");
    assert_eq!(
        order["lines"],
        json!([
            {"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1250},
            {"sku": "SKU-2", "quantity": 1, "unit_price_cents": 99}
        ])
    );
    assert_eq!(order["items"], body["items"]);
    assert_eq!(order["ship_to"], body["ship_to"]);
    assert_eq!(order["cancel_reason"], Value::Null);
    let id: OrderId = id_of(order).parse().unwrap();
    assert_eq!(id.as_uuid().get_version_num(), 7, "a UUIDv7");

    // The same key and body, re-serialized with other whitespace, field
    // order and an explicit `line2: null`: the stored answer, as 200.
    let reordered = r#"{ "ship_to": {"country":"GB","line2":null,"postal_code":"N1 9GU",
        "city":"London","line1":"12 Analytical Row","name":"Ada Lovelace"},
      "items": [{"quantity":2,"sku":"SKU-1"}, {"sku":"SKU-2","quantity":1}] }"#;
    let replay = w
        .api
        .raw(
            Method::POST,
            "/v1/orders",
            &[
                (
                    "authorization",
                    HeaderValue::from_str(&format!("Bearer {alice}")).unwrap(),
                ),
                ("content-type", HeaderValue::from_static("application/json")),
                ("idempotency-key", HeaderValue::from_static("key-1")),
            ],
            reordered,
        )
        .await;
    assert_eq!(replay.status, StatusCode::OK, "{}", replay.body);
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(replay.body, first.body, "the same body as the 201");
    // Through the crate's client too.
    let (status, again) = w
        .api
        .send(
            Some(&alice),
            Method::POST,
            "/v1/orders",
            Some(&body),
            &[("Idempotency-Key", "key-1")],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again, first.body);

    // The same key with another body: 422, nothing written.
    let reused = w
        .api
        .create(&alice, "key-1", &order_body(&[("SKU-1", 3)]))
        .await;
    assert_error(&reused, 422, "idempotency_key_reused");

    // Keys are per customer: bob's "key-1" is a new order.
    let bobs = w.api.created(&token("bob"), "key-1", &body).await;
    assert_ne!(bobs["id"], first.body["id"]);
    assert_eq!(bobs["customer"], "bob");

    let alices = w.api.list(&alice, "").await;
    assert_eq!(alices.body["orders"].as_array().unwrap().len(), 1);
    assert_eq!(alices.body["orders"][0]["id"], first.body["id"]);
    assert_eq!(w.level("SKU-1").await.0, 10 - 2 - 2, "alice's and bob's");
    let metrics = w.api.metrics().await;
    assert!(
        metrics.contains("order_saga_orders_created_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("order_saga_orders_replayed_total 2"),
        "{metrics}"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_create_requests_are_400_413_or_415_and_write_nothing() {
    let w = World::default().await;
    stock(&w.inventory, "SKU-1", 10, 100).await;
    let alice = token("alice");
    let auth = HeaderValue::from_str(&format!("Bearer {alice}")).unwrap();
    let json_type = HeaderValue::from_static("application/json");
    let good = order_body(&[("SKU-1", 1)]);

    // The key: missing, empty, too long, not visible ASCII.
    let (status, missing) = w
        .api
        .send(Some(&alice), Method::POST, "/v1/orders", Some(&good), &[])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(missing["error"], "missing_idempotency_key");
    let long = "k".repeat(256);
    for key in [
        HeaderValue::from_static(""),
        HeaderValue::from_str(&long).unwrap(),
        HeaderValue::from_static("has space"),
        HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
    ] {
        let reply = w
            .api
            .call_with(
                Some(&alice),
                Method::POST,
                "/v1/orders",
                Some(&good),
                &[(IDEMPOTENCY_KEY, key.clone())],
            )
            .await;
        assert_error(&reply, 400, "invalid_idempotency_key");
    }
    // 255 visible characters are a valid key (used below, after the refusals).
    let longest = "k".repeat(255);

    // Not JSON; JSON of the wrong shape.
    let raw_post = |body: &'static str| {
        let api = w.api.clone();
        let auth = auth.clone();
        let json_type = json_type.clone();
        async move {
            api.raw(
                Method::POST,
                "/v1/orders",
                &[
                    ("authorization", auth),
                    ("content-type", json_type),
                    (IDEMPOTENCY_KEY, HeaderValue::from_static("bad")),
                ],
                body,
            )
            .await
        }
    };
    assert_error(&raw_post("{\"items\": [").await, 400, "malformed_json");
    assert_error(&raw_post("").await, 400, "malformed_json");
    assert_error(&raw_post("[]").await, 400, "malformed_json");
    let mutate = |change: &dyn Fn(&mut Value)| {
        let mut body = good.clone();
        change(&mut body);
        body
    };
    for (what, body) in [
        (
            "an unknown field",
            mutate(&|b| b["customer"] = json!("mallory")),
        ),
        (
            "an unknown address field",
            mutate(&|b| b["ship_to"]["planet"] = json!("Mars")),
        ),
        (
            "an unknown line field",
            mutate(&|b| b["items"][0]["price"] = json!(1)),
        ),
        (
            "a malformed SKU",
            mutate(&|b| b["items"][0]["sku"] = json!("not a sku")),
        ),
        (
            "an empty SKU",
            mutate(&|b| b["items"][0]["sku"] = json!("")),
        ),
        (
            "a negative quantity",
            mutate(&|b| b["items"][0]["quantity"] = json!(-1)),
        ),
        (
            "a string quantity",
            mutate(&|b| b["items"][0]["quantity"] = json!("1")),
        ),
        (
            "no address",
            mutate(&|b| {
                b.as_object_mut().unwrap().remove("ship_to");
            }),
        ),
    ] {
        let reply = w.api.create(&alice, "bad", &body).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{what}: {}",
            reply.body
        );
        assert_eq!(
            reply.body["error"], "malformed_json",
            "{what}: {}",
            reply.body
        );
    }

    // The cart and address rules.
    let many: Vec<(String, u32)> = (0..51).map(|i| (format!("S{i}"), 1)).collect();
    let many: Vec<(&str, u32)> = many.iter().map(|(s, q)| (s.as_str(), *q)).collect();
    for (code, body) in [
        ("empty_cart", order_body(&[])),
        ("invalid_quantity", order_body(&[("SKU-1", 0)])),
        ("invalid_quantity", order_body(&[("SKU-1", 101)])),
        ("too_many_lines", order_body(&many)),
        ("duplicate_sku", order_body(&[("SKU-1", 1), ("SKU-1", 2)])),
        (
            "invalid_address",
            mutate(&|b| b["ship_to"]["country"] = json!("gb")),
        ),
        (
            "invalid_address",
            mutate(&|b| b["ship_to"]["name"] = json!("")),
        ),
        (
            "invalid_address",
            mutate(&|b| b["ship_to"]["line1"] = json!(" ")),
        ),
        (
            "invalid_address",
            mutate(&|b| b["ship_to"]["postal_code"] = json!("1".repeat(21))),
        ),
        (
            "invalid_address",
            mutate(&|b| b["ship_to"]["line2"] = json!("x".repeat(201))),
        ),
    ] {
        let reply = w.api.create(&alice, "bad", &body).await;
        assert_error(&reply, 400, code);
    }

    // Media type and size.
    let (status, no_type) = w
        .api
        .send(
            Some(&alice),
            Method::POST,
            "/v1/orders",
            None,
            &[("Idempotency-Key", "bad")],
        )
        .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(no_type["error"], "unsupported_media_type");
    let text = w
        .api
        .raw(
            Method::POST,
            "/v1/orders",
            &[
                ("authorization", auth.clone()),
                ("content-type", HeaderValue::from_static("text/plain")),
                (IDEMPOTENCY_KEY, HeaderValue::from_static("bad")),
            ],
            serde_json::to_vec(&good).unwrap(),
        )
        .await;
    assert_error(&text, 415, "unsupported_media_type");
    let huge = mutate(&|b| b["ship_to"]["name"] = json!("x".repeat(70 * 1024)));
    let too_large = w.api.create(&alice, "bad", &huge).await;
    assert_error(&too_large, 413, "body_too_large");
    assert_eq!(too_large.body["max_bytes"], 64 * 1024);

    // Nothing of it was written: no order, no stock held, and the key
    // "bad" is still free.
    let list = w.api.list(&alice, "").await;
    assert_eq!(list.body, json!({"orders": [], "next": null}));
    assert_eq!(w.level("SKU-1").await, (10, 0, 0));
    let order = w.api.created(&alice, "bad", &good).await;
    assert_eq!(order["state"], "stock_reserved");
    w.api.created(&alice, &longest, &good).await;
    let metrics = w.api.metrics().await;
    assert!(
        metrics.contains("order_saga_orders_created_total 2"),
        "{metrics}"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_sku_is_422_and_leaves_no_trace() {
    let w = World::default().await;
    stock(&w.inventory, "SKU-1", 10, 100).await;
    let alice = token("alice");
    let reply = w
        .api
        .create(&alice, "k", &order_body(&[("SKU-1", 2), ("NOPE-9", 1)]))
        .await;
    assert_error(&reply, 422, "unknown_sku");
    assert_eq!(reply.body["sku"], "NOPE-9");
    assert_eq!(
        w.api.list(&alice, "").await.body,
        json!({"orders": [], "next": null})
    );
    assert_eq!(w.level("SKU-1").await, (10, 0, 0), "nothing reserved");
    let counts = w.service.count_by_state().await.unwrap();
    assert!(counts.iter().all(|(_, n)| *n == 0), "{counts:?}");
    // The key was not kept: it works with the corrected cart.
    let order = w
        .api
        .created(&alice, "k", &order_body(&[("SKU-1", 2)]))
        .await;
    assert_eq!(order["total_cents"], 200);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_stock_is_409_with_the_cancelled_order_and_is_replayed_the_same() {
    let w = World::default().await;
    stock(&w.inventory, "SKU-1", 1, 100).await;
    stock(&w.inventory, "SKU-2", 5, 100).await;
    let alice = token("alice");
    let body = order_body(&[("SKU-2", 2), ("SKU-1", 3)]);
    let refused = w.api.create(&alice, "k", &body).await;
    assert_error(&refused, 409, "out_of_stock");
    assert!(refused.headers.get("idempotent-replayed").is_none());
    let id = refused.body["order_id"].as_str().unwrap().to_owned();
    let order = w.api.settled(&alice, &id, WAIT).await;
    assert_eq!(order["state"], "cancelled");
    assert_eq!(order["cancel_reason"], "out_of_stock");
    assert_eq!(order["payment_id"], Value::Null);
    // All or nothing: SKU-2 was not held either.
    assert_eq!(w.level("SKU-1").await, (1, 0, 0));
    assert_eq!(w.level("SKU-2").await, (5, 0, 0));
    let replay = w.api.create(&alice, "k", &body).await;
    assert_error(&replay, 409, "out_of_stock");
    assert_eq!(replay.body, refused.body, "the stored answer");
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    let listed = w.api.list(&alice, "").await;
    assert_eq!(listed.body["orders"].as_array().unwrap().len(), 1);
    assert!(w.sim.entries().is_empty(), "nothing charged");
    let metrics = w.api.metrics().await;
    for line in [
        "order_saga_orders_rejected_out_of_stock_total 1",
        "order_saga_orders_created_total 0",
        "order_saga_orders_replayed_total 1",
        "order_saga_sagas_cancelled_total{reason=\"out_of_stock\"} 1",
        "order_saga_orders{state=\"cancelled\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_never_oversell_and_one_key_makes_one_order() {
    let w = World::default().await;
    stock(&w.inventory, "HOT", 10, 100).await;
    stock(&w.inventory, "KEYED", 100, 100).await;
    // 40 customers race for 10 units, one unit each.
    let mut tasks = Vec::new();
    for n in 0..40 {
        let api = w.api.clone();
        tasks.push(tokio::spawn(async move {
            api.create(&token(&format!("c{n}")), "hot", &order_body(&[("HOT", 1)]))
                .await
        }));
    }
    let mut created = 0;
    for task in tasks {
        let reply = task.await.unwrap();
        match reply.status.as_u16() {
            201 => created += 1,
            409 => assert_eq!(reply.body["error"], "out_of_stock", "{}", reply.body),
            other => panic!("unexpected {other}: {}", reply.body),
        }
    }
    assert_eq!(created, 10, "exactly the stock");
    let (available, reserved, committed) = w.level("HOT").await;
    assert_eq!(available, 0);
    assert_eq!(reserved + committed, 10);

    // 20 requests with one key and one body: one order; every answer is
    // the 201, its replay, or "in progress" with Retry-After.
    let body = order_body(&[("KEYED", 1)]);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let api = w.api.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            api.create(&token("dora"), "same", &body).await
        }));
    }
    let mut bodies = HashSet::new();
    let mut firsts = 0;
    for task in tasks {
        let reply = task.await.unwrap();
        match reply.status.as_u16() {
            201 => {
                firsts += 1;
                bodies.insert(reply.body.to_string());
            }
            200 => {
                assert_eq!(reply.headers["idempotent-replayed"], "true");
                bodies.insert(reply.body.to_string());
            }
            409 => {
                assert_error(&reply, 409, "request_in_progress");
                assert_eq!(reply.headers["retry-after"], "1");
            }
            other => panic!("unexpected {other}: {}", reply.body),
        }
    }
    assert_eq!(firsts, 1);
    assert_eq!(bodies.len(), 1, "every answer is the same order");
    let listed = w.api.list(&token("dora"), "").await;
    assert_eq!(listed.body["orders"].as_array().unwrap().len(), 1);
    assert_eq!(w.level("KEYED").await.0, 99);
    w.stop().await;
}

// ---------------------------------------------------------------------------
// Authentication and who sees what.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_v1_route_needs_a_valid_token() {
    let w = World::default().await;
    stock(&w.inventory, "SKU-1", 10, 100).await;
    let order = w
        .api
        .created(&token("alice"), "k", &order_body(&[("SKU-1", 1)]))
        .await;
    let id = id_of(&order);
    let long_sub = "s".repeat(129);
    let bad_tokens = [
        ("garbage", "not.a.jwt".to_owned()),
        (
            "expired",
            sign(SECRET, Algorithm::HS256, "alice", &[ADMIN_ROLE], -120),
        ),
        (
            "wrong secret",
            sign(
                b"another-secret-that-is-also-32-bytes-long",
                Algorithm::HS256,
                "alice",
                &[ADMIN_ROLE],
                600,
            ),
        ),
        (
            "wrong algorithm",
            sign(SECRET, Algorithm::HS384, "alice", &[ADMIN_ROLE], 600),
        ),
    ];
    let body = order_body(&[("SKU-1", 1)]);
    for (method, path) in [
        (Method::POST, "/v1/orders".to_owned()),
        (Method::GET, "/v1/orders".to_owned()),
        (Method::GET, format!("/v1/orders/{id}")),
        (Method::POST, format!("/v1/orders/{id}/cancel")),
        (Method::POST, format!("/v1/orders/{id}/retry")),
        // A bad id is not revealed to a stranger either.
        (Method::GET, "/v1/orders/not-a-uuid".to_owned()),
    ] {
        let with_body = (method == Method::POST && path == "/v1/orders").then_some(&body);
        let key = [(IDEMPOTENCY_KEY, HeaderValue::from_static("k2"))];
        let missing = w
            .api
            .call_with(None, method.clone(), &path, with_body, &key)
            .await;
        assert_error(&missing, 401, "missing_token");
        assert_eq!(missing.headers["www-authenticate"], "Bearer");
        for (what, bad) in &bad_tokens {
            let reply = w
                .api
                .call_with(Some(bad), method.clone(), &path, with_body, &key)
                .await;
            assert_eq!(
                reply.status,
                StatusCode::UNAUTHORIZED,
                "{what} {method} {path}"
            );
            assert_error(&reply, 401, "invalid_token");
            assert_eq!(reply.headers["www-authenticate"], "Bearer");
        }
    }
    // A verified token whose sub cannot be a customer id.
    let odd = sign(SECRET, Algorithm::HS256, &long_sub, &[], 600);
    assert_error(&w.api.create(&odd, "k3", &body).await, 401, "invalid_token");
    assert_error(&w.api.list(&odd, "").await, 401, "invalid_token");
    // Nothing was written, nothing cancelled.
    let listed = w.api.list(&admin(), "?customer=alice").await;
    assert_eq!(listed.body["orders"].as_array().unwrap().len(), 1);
    assert_ne!(
        listed.body["orders"][0]["cancel_reason"],
        "customer_requested"
    );
    let counts: u64 = w
        .service
        .count_by_state()
        .await
        .unwrap()
        .iter()
        .map(|(_, n)| n)
        .sum();
    assert_eq!(counts, 1);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_see_only_their_own_orders_and_admins_see_all() {
    let w = World::default().await;
    stock(&w.inventory, "SKU-1", 10, 100).await;
    let alice = token("alice");
    let bob = token("bob");
    let order = w
        .api
        .created(&alice, "k", &order_body(&[("SKU-1", 1)]))
        .await;
    let id = id_of(&order);
    let own = w.api.get(&alice, &id).await;
    assert_eq!(own.status, StatusCode::OK);
    assert_eq!(own.body["id"], order["id"]);
    assert_eq!(own.body["customer"], "alice");
    assert_error(&w.api.get(&bob, &id).await, 404, "order_not_found");
    let as_admin = w.api.get(&admin(), &id).await;
    assert_eq!(as_admin.status, StatusCode::OK);
    assert_eq!(as_admin.body["id"], order["id"]);
    for bad in [
        "not-a-uuid".to_owned(),
        "42".to_owned(),
        OrderId::new_at(1_700_000_000_000).to_string(),
    ] {
        assert_error(&w.api.get(&alice, &bad).await, 404, "order_not_found");
        assert_error(&w.api.get(&admin(), &bad).await, 404, "order_not_found");
        assert_error(&w.api.cancel(&alice, &bad).await, 404, "order_not_found");
    }
    // Bob can neither cancel nor list alice's orders.
    assert_error(&w.api.cancel(&bob, &id).await, 404, "order_not_found");
    assert_error(&w.api.list(&bob, "?customer=alice").await, 403, "forbidden");
    let bobs = w.api.list(&bob, "").await;
    assert_eq!(bobs.body, json!({"orders": [], "next": null}));
    // Naming oneself is fine; an admin lists anyone.
    let own_list = w.api.list(&alice, "?customer=alice").await;
    assert_eq!(own_list.body["orders"][0]["id"], order["id"]);
    let admin_list = w.api.list(&admin(), "?customer=alice").await;
    assert_eq!(admin_list.status, StatusCode::OK);
    assert_eq!(admin_list.body["orders"][0]["id"], order["id"]);
    let long = "c".repeat(129);
    assert_error(
        &w.api.list(&admin(), &format!("?customer={long}")).await,
        400,
        "invalid_customer",
    );
    // Bob's refused cancel changed nothing.
    let settled = w.api.settled(&alice, &id, WAIT).await;
    assert_eq!(settled["state"], "confirmed");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_keyset_pages_newest_first() {
    let w = World::default().await;
    stock(&w.inventory, "SKU-1", 100, 100).await;
    let alice = token("alice");
    let mut ids = Vec::new();
    for n in 0..7 {
        let order = w
            .api
            .created(&alice, &format!("k{n}"), &order_body(&[("SKU-1", 1)]))
            .await;
        ids.push(id_of(&order));
    }
    w.api
        .created(&token("bob"), "k0", &order_body(&[("SKU-1", 1)]))
        .await;
    // Newest first: descending (time-ordered) ids.
    let mut expected = ids.clone();
    expected.sort_by_key(|id| std::cmp::Reverse(id.parse::<OrderId>().unwrap()));

    let all = w.api.list(&alice, "").await;
    assert_eq!(all.status, StatusCode::OK);
    assert_eq!(all.body["next"], Value::Null, "default limit 20 holds them");
    let all_ids: Vec<String> = all.body["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(all_ids, expected);
    let created_at: Vec<&str> = all.body["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["created_at"].as_str().unwrap())
        .collect();
    let mut by_time = created_at.clone();
    by_time.sort_by(|a, b| b.cmp(a));
    assert_eq!(created_at, by_time, "newest first");

    // Pages of 3, following `next`; an order added meanwhile does not
    // shift the later pages.
    let mut seen = Vec::new();
    let mut query = "?limit=3".to_owned();
    let mut pages = 0;
    loop {
        let page = w.api.list(&alice, &query).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        let orders = page.body["orders"].as_array().unwrap();
        assert!(orders.len() <= 3);
        seen.extend(orders.iter().map(id_of));
        pages += 1;
        if pages == 1 {
            w.api
                .created(&alice, "late", &order_body(&[("SKU-1", 1)]))
                .await;
        }
        match page.body["next"].as_str() {
            Some(next) => {
                assert_eq!(next, seen.last().unwrap(), "next is the page's last id");
                query = format!("?limit=3&after={next}");
            }
            None => break,
        }
    }
    assert_eq!(seen, expected, "every order once, in order");
    assert_eq!(pages, 3);
    // An exact fit: the last page says so.
    let fit = w.api.list(&alice, "?limit=8").await;
    assert_eq!(fit.body["orders"].as_array().unwrap().len(), 8);
    assert_eq!(fit.body["next"], Value::Null);
    let one = w.api.list(&alice, "?limit=1").await;
    assert_eq!(one.body["orders"].as_array().unwrap().len(), 1);
    assert!(one.body["next"].is_string());

    for limit in ["0", "101", "-1", "abc", ""] {
        assert_error(
            &w.api.list(&alice, &format!("?limit={limit}")).await,
            400,
            "invalid_limit",
        );
    }
    assert_eq!(
        w.api.list(&alice, "?limit=100").await.status,
        StatusCode::OK
    );
    for after in ["nope", "42", ""] {
        assert_error(
            &w.api.list(&alice, &format!("?after={after}")).await,
            400,
            "invalid_cursor",
        );
    }
    w.stop().await;
}

// ---------------------------------------------------------------------------
// Cancel and retry.
// ---------------------------------------------------------------------------

/// Payments whose authorizations wait until the gate opens.
struct Gated {
    inner: Arc<dyn Payments>,
    gate: Arc<Semaphore>,
}

impl Payments for Gated {
    fn authorize(&self, request: AuthorizeRequest) -> BoxFuture<'_, Result<Payment, PaymentError>> {
        Box::pin(async move {
            let _pass = self.gate.acquire().await.unwrap();
            self.inner.authorize(request).await
        })
    }
    fn capture<'a>(
        &'a self,
        key: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Payment, PaymentError>> {
        self.inner.capture(key, id)
    }
    fn void<'a>(
        &'a self,
        key: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Payment, PaymentError>> {
        self.inner.void(key, id)
    }
    fn refund<'a>(
        &'a self,
        key: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Payment, PaymentError>> {
        self.inner.refund(key, id)
    }
    fn lookup<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Payment>, PaymentError>> {
        self.inner.lookup(key)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_compensates_in_the_background_and_gives_the_stock_back() {
    let sim = Arc::new(Simulator::with_seed(SimConfig::default(), 5).unwrap());
    let gate = Arc::new(Semaphore::new(0));
    let payments = Gated {
        inner: Arc::new(ResilientPayments::new(sim.clone(), ResilientConfig::default()).unwrap()),
        gate: gate.clone(),
    };
    let w = World::start(Parts {
        payments: Some(Arc::new(payments) as Arc<dyn Payments>),
        ..Parts::default()
    })
    .await;
    stock(&w.inventory, "SKU-1", 10, 300).await;
    let alice = token("alice");
    let order = w
        .api
        .created(&alice, "k", &order_body(&[("SKU-1", 4)]))
        .await;
    let id = id_of(&order);
    assert_eq!(w.level("SKU-1").await, (6, 4, 0));
    // The authorization is under way (held at the gate): the cancel is
    // taken and applied by the saga's driver before its next step.
    let cancelled = w.api.cancel(&alice, &id).await;
    assert_eq!(cancelled.status, StatusCode::OK, "{}", cancelled.body);
    assert_eq!(cancelled.body["id"], order["id"]);
    assert_eq!(cancelled.body["state"], "compensating");
    assert_eq!(cancelled.body["cancel_reason"], "customer_requested");
    gate.add_permits(1_000);
    let done = w.api.settled(&alice, &id, WAIT).await;
    assert_eq!(done["state"], "cancelled");
    assert_eq!(done["cancel_reason"], "customer_requested");
    assert_eq!(w.level("SKU-1").await, (10, 0, 0), "the stock is back");
    let ledger = sim.ledger();
    assert_eq!(
        (ledger.voided, ledger.authorized, ledger.captured),
        (1, 0, 0)
    );
    assert_eq!(ledger.net_charged_cents(), 0);
    // Cancelling again returns it unchanged; so does an admin's cancel.
    for who in [alice.clone(), admin()] {
        let again = w.api.cancel(&who, &id).await;
        assert_eq!(again.status, StatusCode::OK);
        assert_eq!(again.body, done);
    }
    let metrics = w.api.metrics().await;
    assert!(
        metrics.contains("order_saga_sagas_cancelled_total{reason=\"customer_requested\"} 1"),
        "{metrics}"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_cancels_any_order_and_a_confirmed_one_is_409() {
    let w = World::default().await;
    stock(&w.inventory, "SKU-1", 10, 100).await;
    let alice = token("alice");
    let order = w
        .api
        .created(&alice, "k1", &order_body(&[("SKU-1", 2)]))
        .await;
    let id = id_of(&order);
    let confirmed = w.api.settled(&alice, &id, WAIT).await;
    assert_eq!(confirmed["state"], "confirmed");
    assert!(confirmed["payment_id"].is_string() && confirmed["shipment_id"].is_string());
    assert_error(&w.api.cancel(&alice, &id).await, 409, "order_confirmed");
    assert_error(&w.api.cancel(&admin(), &id).await, 409, "order_confirmed");
    assert_eq!(w.api.get(&alice, &id).await.body["state"], "confirmed");
    assert_eq!(w.level("SKU-1").await, (8, 0, 2));
    // An admin's cancel of a customer's order (it may have confirmed
    // already: then 409, else it rolls back).
    let second = w
        .api
        .created(&alice, "k2", &order_body(&[("SKU-1", 1)]))
        .await;
    let second_id = id_of(&second);
    let reply = w.api.cancel(&admin(), &second_id).await;
    let settled = w.api.settled(&alice, &second_id, WAIT).await;
    match reply.status.as_u16() {
        200 => {
            assert_eq!(reply.body["cancel_reason"], "customer_requested");
            assert_eq!(settled["state"], "cancelled");
            assert_eq!(w.level("SKU-1").await, (8, 0, 2));
        }
        409 => {
            assert_error(&reply, 409, "order_confirmed");
            assert_eq!(settled["state"], "confirmed");
        }
        other => panic!("unexpected {other}: {}", reply.body),
    }
    let metrics = w.api.metrics().await;
    assert!(
        metrics.contains("order_saga_sagas_confirmed_total "),
        "{metrics}"
    );
    w.stop().await;
}

/// Shipping that rejects every booking and, while `cancel_down`, fails
/// every cancel: a rollback that cannot finish.
struct StuckShipping {
    inner: MemoryShipping,
    cancel_down: AtomicBool,
}

impl Shipping for StuckShipping {
    fn schedule(
        &self,
        _request: ScheduleShipment,
    ) -> BoxFuture<'_, Result<Shipment, ShippingError>> {
        Box::pin(async { Err(ShippingError::Rejected("no carrier today".into())) })
    }
    fn cancel(&self, order_id: OrderId) -> BoxFuture<'_, Result<Shipment, ShippingError>> {
        Box::pin(async move {
            if self.cancel_down.load(Ordering::SeqCst) {
                return Err(ShippingError::Unavailable("carrier API down".into()));
            }
            self.inner.cancel(order_id).await
        })
    }
    fn shipment(
        &self,
        order_id: OrderId,
    ) -> BoxFuture<'_, Result<Option<Shipment>, ShippingError>> {
        self.inner.shipment(order_id)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_needs_admin_and_finishes_a_needs_attention_rollback() {
    let shipping = Arc::new(StuckShipping {
        inner: MemoryShipping::default(),
        cancel_down: AtomicBool::new(true),
    });
    let w = World::start(Parts {
        shipping: Some(shipping.clone() as Arc<dyn Shipping>),
        ..Parts::default()
    })
    .await;
    stock(&w.inventory, "SKU-1", 10, 100).await;
    let alice = token("alice");
    let order = w
        .api
        .created(&alice, "k", &order_body(&[("SKU-1", 3)]))
        .await;
    let id = id_of(&order);
    let stuck = w.api.settled(&alice, &id, WAIT).await;
    assert_eq!(stuck["state"], "needs_attention");
    assert_eq!(stuck["cancel_reason"], "shipping_rejected");
    let note = stuck["attention"].as_str().unwrap();
    assert!(note.contains("cancel_shipment"), "{note}");
    assert_eq!(
        w.level("SKU-1").await,
        (7, 3, 0),
        "nothing dropped: still held"
    );
    let metrics = w.api.metrics().await;
    for line in [
        "order_saga_sagas_needs_attention_total 1",
        "order_saga_orders{state=\"needs_attention\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    // Cancelling it changes nothing.
    let cancel = w.api.cancel(&alice, &id).await;
    assert_eq!(cancel.status, StatusCode::OK);
    assert_eq!(cancel.body["state"], "needs_attention");

    let path = format!("/v1/orders/{id}/retry");
    let forbidden = w.api.call(Some(&alice), Method::POST, &path, None).await;
    assert_error(&forbidden, 403, "forbidden");
    shipping.cancel_down.store(false, Ordering::SeqCst);
    let retried = w.api.call(Some(&admin()), Method::POST, &path, None).await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.body);
    assert_eq!(retried.body["state"], "cancelled");
    assert_eq!(retried.body["cancel_reason"], "shipping_rejected");
    assert_eq!(retried.body["attention"], Value::Null);
    assert_eq!(w.level("SKU-1").await, (10, 0, 0));
    assert_eq!(w.sim.ledger().net_charged_cents(), 0);
    assert_eq!(w.sim.ledger().authorized, 0, "the authorization was voided");
    // Other states come back unchanged; unknown ids are 404.
    let again = w.api.call(Some(&admin()), Method::POST, &path, None).await;
    assert_eq!(again.body, retried.body);
    let unknown = OrderId::new_at(1_700_000_000_000);
    assert_error(
        &w.api
            .call(
                Some(&admin()),
                Method::POST,
                &format!("/v1/orders/{unknown}/retry"),
                None,
            )
            .await,
        404,
        "order_not_found",
    );
    assert_error(
        &w.api
            .call(Some(&admin()), Method::POST, "/v1/orders/xyz/retry", None)
            .await,
        404,
        "order_not_found",
    );
    w.stop().await;
}

// ---------------------------------------------------------------------------
// The inventory down while the client waits.
// ---------------------------------------------------------------------------

/// The in-memory inventory, whose reservations fail while `down`.
struct FlakyInventory {
    inner: MemoryInventory,
    down: AtomicBool,
}

impl FlakyInventory {
    fn check(&self) -> Result<(), InventoryError> {
        if self.down.load(Ordering::SeqCst) {
            Err(InventoryError::Unavailable("inventory down".into()))
        } else {
            Ok(())
        }
    }
}

impl Inventory for FlakyInventory {
    fn reserve(
        &self,
        request: ReserveRequest,
    ) -> BoxFuture<'_, Result<Reservation, InventoryError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.reserve(request).await
        })
    }
    fn commit(&self, id: ReservationId) -> BoxFuture<'_, Result<Reservation, InventoryError>> {
        self.inner.commit(id)
    }
    fn release(
        &self,
        id: ReservationId,
    ) -> BoxFuture<'_, Result<Option<Reservation>, InventoryError>> {
        self.inner.release(id)
    }
    fn reservation(
        &self,
        id: ReservationId,
    ) -> BoxFuture<'_, Result<Option<Reservation>, InventoryError>> {
        self.inner.reservation(id)
    }
    fn stock<'a>(&'a self, sku: &'a Sku) -> BoxFuture<'a, Result<StockLevel, InventoryError>> {
        self.inner.stock(sku)
    }
    fn restock(&self, restock: Restock) -> BoxFuture<'_, Result<StockLevel, InventoryError>> {
        self.inner.restock(restock)
    }
    fn sweep_expired(&self, limit: usize) -> BoxFuture<'_, Result<usize, InventoryError>> {
        self.inner.sweep_expired(limit)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inventory_outage_is_503_and_the_key_answers_once_the_saga_knows() {
    let inventory = Arc::new(FlakyInventory {
        inner: MemoryInventory::new(time_kit::system()),
        down: AtomicBool::new(true),
    });
    // Slow retries, so the outage outlasts a few of them but not all.
    let config = OrderConfig {
        retry_base: Duration::from_millis(100),
        retry_max: Duration::from_millis(100),
        ..fast_config()
    };
    let w = World::start(Parts {
        inventory: Some(inventory.clone() as Arc<dyn Inventory>),
        config: Some(config),
        ..Parts::default()
    })
    .await;
    stock(&w.inventory, "SKU-1", 10, 100).await;
    let alice = token("alice");
    let body = order_body(&[("SKU-1", 2)]);
    let down = w.api.create(&alice, "k", &body).await;
    assert_error(&down, 503, "inventory_unavailable");
    assert_eq!(down.headers["retry-after"], "1");
    let id = down.body["order_id"].as_str().unwrap().to_owned();
    let pending = w.api.get(&alice, &id).await;
    assert_eq!(pending.body["state"], "pending");
    // Until the saga has an outcome, the key is in progress.
    let busy = w.api.create(&alice, "k", &body).await;
    assert_error(&busy, 409, "request_in_progress");
    assert_eq!(busy.headers["retry-after"], "1");
    inventory.down.store(false, Ordering::SeqCst);
    // The saga reserves on its own; then the key answers with the order.
    let deadline = tokio::time::Instant::now() + WAIT;
    let replay = loop {
        let reply = w.api.create(&alice, "k", &body).await;
        if reply.status != StatusCode::CONFLICT {
            break reply;
        }
        assert_error(&reply, 409, "request_in_progress");
        assert!(tokio::time::Instant::now() < deadline, "still in progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(replay.status, StatusCode::OK, "{}", replay.body);
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(replay.body["id"], id.as_str());
    assert_eq!(replay.body["state"], "stock_reserved");
    let done = w.api.settled(&alice, &id, WAIT).await;
    assert_eq!(done["state"], "confirmed");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inventory_that_stays_down_gets_the_key_a_final_answer() {
    let inventory = Arc::new(FlakyInventory {
        inner: MemoryInventory::new(time_kit::system()),
        down: AtomicBool::new(true),
    });
    let w = World::start(Parts {
        inventory: Some(inventory.clone() as Arc<dyn Inventory>),
        ..Parts::default()
    })
    .await;
    stock(&w.inventory, "SKU-1", 10, 100).await;
    let alice = token("alice");
    let body = order_body(&[("SKU-1", 2)]);
    let down = w.api.create(&alice, "k", &body).await;
    assert_error(&down, 503, "inventory_unavailable");
    let id = down.body["order_id"].as_str().unwrap().to_owned();
    // The saga gives the reservation up after its attempts and cancels.
    let order = w.api.settled(&alice, &id, WAIT).await;
    assert_eq!(order["state"], "cancelled");
    assert_eq!(order["cancel_reason"], "reservation_expired");
    // The key is not left "in progress" for 24 hours: it answers.
    let final_answer = w.api.create(&alice, "k", &body).await;
    assert_error(&final_answer, 409, "order_cancelled");
    assert_eq!(final_answer.body["order_id"], id.as_str());
    assert_eq!(final_answer.body["cancel_reason"], "reservation_expired");
    assert_eq!(final_answer.headers["idempotent-replayed"], "true");
    assert_eq!(w.level("SKU-1").await, (10, 0, 0));
    // A new key places the order once the inventory is back.
    inventory.down.store(false, Ordering::SeqCst);
    let order = w.api.created(&alice, "k2", &body).await;
    assert_eq!(order["state"], "stock_reserved");
    w.stop().await;
}

// ---------------------------------------------------------------------------
// Probes, metrics, routing, and the OpenAPI document.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_metrics_need_no_token() {
    let w = World::default().await;
    stock(&w.inventory, "SKU-1", 10, 100).await;
    let alice = token("alice");
    let order = w
        .api
        .created(&alice, "k", &order_body(&[("SKU-1", 1)]))
        .await;
    w.api.settled(&alice, &id_of(&order), WAIT).await;

    let health = w.api.call(None, Method::GET, "/healthz", None).await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.body, json!({"status": "ok"}));
    let ready = w.api.call(None, Method::GET, "/readyz", None).await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.body, json!({"status": "ready"}));
    let metrics = w.api.metrics().await;
    for name in [
        "order_saga_orders_created_total 1",
        "order_saga_orders_replayed_total 0",
        "order_saga_orders_rejected_out_of_stock_total 0",
        "order_saga_sagas_confirmed_total 1",
        "order_saga_sagas_needs_attention_total 0",
        "order_saga_step_retries_total",
        "order_saga_compensation_retries_total",
        "order_saga_leases_lost_total",
        "order_saga_sagas_resumed_total",
        "# TYPE order_saga_sagas_cancelled counter",
        "order_saga_orders{state=\"confirmed\"} 1",
        "# TYPE order_saga_orders gauge",
    ] {
        assert!(metrics.contains(name), "missing {name:?} in\n{metrics}");
    }
    w.stop().await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_503_and_not_ready() {
    use order_saga::order::store::postgres::PgOrderStore;
    use order_saga::pg::{PoolConfig, pool};
    // A pool pointing at a port where nothing listens.
    let dead = pool(
        "postgres://postgres@127.0.0.1:1/none",
        &PoolConfig {
            connection_timeout: Duration::from_millis(300),
            ..PoolConfig::default()
        },
    )
    .unwrap();
    let clock = time_kit::system();
    let inventory: Arc<dyn Inventory> = Arc::new(MemoryInventory::new(clock.clone()));
    stock(&inventory, "SKU-1", 5, 100).await;
    let sim = Arc::new(Simulator::new(SimConfig::default()).unwrap());
    let service = OrderService::new(
        Arc::new(PgOrderStore::new(dead)),
        Services {
            inventory: inventory.clone(),
            payments: Arc::new(
                ResilientPayments::new(sim.clone(), ResilientConfig::default()).unwrap(),
            ),
            shipping: Arc::new(MemoryShipping::default()),
        },
        fast_config(),
        clock,
    );
    let (url, shutdown) = serve(OrderHttp::new(service, verifier())).await;
    let api = Api { url };
    let alice = token("alice");
    let create = api.create(&alice, "k", &order_body(&[("SKU-1", 1)])).await;
    assert_error(&create, 503, "database_unavailable");
    assert_eq!(create.headers["retry-after"], "1");
    assert!(
        !create.body["message"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1"),
        "the cause stays in the log"
    );
    let id = OrderId::new_at(1_700_000_000_000).to_string();
    assert_error(&api.get(&alice, &id).await, 503, "database_unavailable");
    assert_error(&api.list(&alice, "").await, 503, "database_unavailable");
    assert_error(&api.cancel(&alice, &id).await, 503, "database_unavailable");
    let ready = api.call(None, Method::GET, "/readyz", None).await;
    assert_error(&ready, 503, "not_ready");
    assert_eq!(ready.body["dependency"], "database");
    let health = api.call(None, Method::GET, "/healthz", None).await;
    assert_eq!(health.status, StatusCode::OK);
    let level = inventory.stock(&sku("SKU-1")).await.unwrap();
    assert_eq!(
        (level.available, level.reserved),
        (5, 0),
        "nothing reserved"
    );
    assert!(sim.entries().is_empty(), "nothing charged");
    shutdown.trigger();
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405_with_allow() {
    let w = World::default().await;
    let id = OrderId::new_at(1_700_000_000_000);
    for (method, path, allow) in [
        (Method::PUT, "/v1/orders".to_owned(), "GET, POST"),
        (Method::DELETE, "/v1/orders".to_owned(), "GET, POST"),
        (Method::DELETE, format!("/v1/orders/{id}"), "GET"),
        (Method::POST, format!("/v1/orders/{id}"), "GET"),
        (Method::GET, format!("/v1/orders/{id}/cancel"), "POST"),
        (Method::GET, format!("/v1/orders/{id}/retry"), "POST"),
        (Method::POST, "/healthz".to_owned(), "GET"),
        (Method::POST, "/readyz".to_owned(), "GET"),
        (Method::DELETE, "/metrics".to_owned(), "GET"),
    ] {
        // No token: the method is checked first.
        let reply = w.api.call(None, method.clone(), &path, None).await;
        assert_error(&reply, 405, "method_not_allowed");
        assert_eq!(reply.headers["allow"], allow, "{method} {path}");
    }
    for path in [
        "/".to_owned(),
        "/v1".to_owned(),
        "/v2/orders".to_owned(),
        "/v1/order".to_owned(),
        "/v1/orders/".to_owned(),
        format!("/v1/orders/{id}/refund"),
        format!("/v1/orders/{id}/cancel/now"),
        "/metrics/x".to_owned(),
    ] {
        let reply = w.api.call(None, Method::GET, &path, None).await;
        assert_error(&reply, 404, "not_found");
    }
    w.stop().await;
}

fn openapi() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/order-saga/order.openapi.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn routes_match_the_openapi_document_both_ways() {
    let doc = openapi();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let mut documented = BTreeSet::new();
    for (template, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if [
                "get", "put", "post", "delete", "patch", "head", "options", "trace",
            ]
            .contains(&method.as_str())
            {
                documented.insert((method.to_uppercase(), template.clone()));
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
}

/// Every `$ref` of the document resolves, and every error code the API
/// document names is in the OpenAPI document.
#[test]
fn the_openapi_document_is_self_consistent_and_names_every_code() {
    let doc = openapi();
    fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    if k == "$ref" {
                        out.push(v.as_str().unwrap());
                    } else {
                        refs(v, out);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let pointer = r.strip_prefix('#').expect("local refs only");
        assert!(doc.pointer(pointer).is_some(), "dangling {r}");
    }
    let text = doc.to_string();
    for code in [
        "missing_token",
        "invalid_token",
        "forbidden",
        "missing_idempotency_key",
        "invalid_idempotency_key",
        "malformed_json",
        "empty_cart",
        "too_many_lines",
        "invalid_quantity",
        "duplicate_sku",
        "invalid_address",
        "out_of_stock",
        "order_cancelled",
        "request_in_progress",
        "idempotency_key_reused",
        "body_too_large",
        "unsupported_media_type",
        "unknown_sku",
        "database_unavailable",
        "inventory_unavailable",
        "order_not_found",
        "invalid_customer",
        "invalid_cursor",
        "invalid_limit",
        "order_confirmed",
        "not_ready",
        "method_not_allowed",
        "Idempotent-Replayed",
        "Retry-After",
        "WWW-Authenticate",
    ] {
        assert!(text.contains(code), "{code} is not documented");
    }
}

#[tokio::test]
async fn every_route_in_routes_is_served() {
    let w = World::default().await;
    let id = OrderId::new_at(1_700_000_000_000).to_string();
    for (method, template) in ROUTES {
        let path = template.replace("{id}", &id);
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let body =
            (method == Method::POST && path == "/v1/orders").then(|| order_body(&[("SKU-1", 1)]));
        let reply = w
            .api
            .call_with(
                Some(&admin()),
                method,
                &path,
                body.as_ref(),
                &[(IDEMPOTENCY_KEY, HeaderValue::from_static("k"))],
            )
            .await;
        // 404 only as "no such order", never "no such route"; never 405.
        assert_ne!(
            reply.body["error"], "not_found",
            "{template}: {}",
            reply.body
        );
        assert_ne!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{template}");
    }
    w.stop().await;
}

// ---------------------------------------------------------------------------
// A payment-provider outage, over HTTP.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_outage_opens_the_breaker_cancels_cleanly_and_recovers() {
    let sim = Arc::new(Simulator::with_seed(SimConfig::default(), 13).unwrap());
    let (sim_url, sim_shutdown) = serve(PaymentSimService::new(sim.clone())).await;
    let provider =
        HttpPaymentProvider::new(ClientConfig::new(&sim_url).with_timeout(Duration::from_secs(2)))
            .unwrap();
    let payments = Arc::new(
        ResilientPayments::new(
            provider,
            ResilientConfig::default()
                .with_attempt_timeout(Duration::from_secs(1))
                .with_max_attempts(2)
                .with_delays(Duration::from_millis(1), Duration::from_millis(5))
                .with_breaker(
                    BreakerConfig::default()
                        .with_consecutive_failures(3)
                        .with_open_durations(
                            Duration::from_millis(200),
                            Duration::from_millis(200),
                        ),
                ),
        )
        .unwrap(),
    );
    let w = World::start(Parts {
        payments: Some(payments.clone() as Arc<dyn Payments>),
        ..Parts::default()
    })
    .await;
    stock(&w.inventory, "SKU-1", 100, 500).await;
    let alice = token("alice");

    // Before: an order confirms.
    let before = w
        .api
        .created(&alice, "before", &order_body(&[("SKU-1", 1)]))
        .await;
    let before = w.api.settled(&alice, &id_of(&before), WAIT).await;
    assert_eq!(before["state"], "confirmed");
    assert_eq!(payments.breaker_state(), BreakerState::Closed);

    // The provider goes down. Orders are still taken (201: the stock is
    // held), then roll back with `payment_unavailable`.
    sim.set_down(true);
    let mut outage = Vec::new();
    for n in 0..8 {
        let order = w
            .api
            .created(&alice, &format!("down-{n}"), &order_body(&[("SKU-1", 2)]))
            .await;
        assert_eq!(order["state"], "stock_reserved");
        outage.push(id_of(&order));
    }
    for id in &outage {
        let order = w.api.settled(&alice, id, WAIT).await;
        assert_eq!(order["state"], "cancelled", "{order}");
        assert_eq!(order["cancel_reason"], "payment_unavailable");
        assert_eq!(order["payment_id"], Value::Null);
        let order_id: OrderId = id.parse().unwrap();
        assert_eq!(sim.authorizations_for_order(order_id), 0, "never charged");
    }
    let stats = payments.stats();
    assert!(stats.breaker_opened >= 1, "{stats:?}");
    assert!(stats.breaker_rejected >= 1, "calls failed fast: {stats:?}");
    assert_ne!(payments.breaker_state(), BreakerState::Closed);
    assert!(
        sim.stats().rejected_down < 8 * 2,
        "the breaker kept calls from the provider: {:?}",
        sim.stats()
    );
    // Nothing charged, the stock released.
    let ledger = sim.ledger();
    assert_eq!(
        (ledger.payments, ledger.captured, ledger.authorized),
        (1, 1, 0)
    );
    assert_eq!(ledger.net_charged_cents(), 500);
    assert_eq!(w.level("SKU-1").await, (99, 0, 1));
    let metrics = w.api.metrics().await;
    assert!(
        metrics.contains("order_saga_sagas_cancelled_total{reason=\"payment_unavailable\"} 8"),
        "{metrics}"
    );

    // The provider is back: once the breaker lets a probe through, orders
    // confirm again (one at a time until the first does).
    sim.set_down(false);
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut n = 0;
    loop {
        let order = w
            .api
            .created(&alice, &format!("after-{n}"), &order_body(&[("SKU-1", 1)]))
            .await;
        n += 1;
        let order = w.api.settled(&alice, &id_of(&order), WAIT).await;
        if order["state"] == "confirmed" {
            break;
        }
        assert_eq!(order["cancel_reason"], "payment_unavailable", "{order}");
        assert!(tokio::time::Instant::now() < deadline, "no recovery");
    }
    assert_eq!(payments.breaker_state(), BreakerState::Closed);
    for k in 0..3 {
        let order = w
            .api
            .created(&alice, &format!("steady-{k}"), &order_body(&[("SKU-1", 1)]))
            .await;
        let order = w.api.settled(&alice, &id_of(&order), WAIT).await;
        assert_eq!(order["state"], "confirmed");
    }
    let ledger = sim.ledger();
    assert_eq!(ledger.double_charges, 0);
    assert_eq!(ledger.captured, 1 + 1 + 3);
    assert_eq!(ledger.net_charged_cents(), 500 * 5);
    let (available, reserved, committed) = w.level("SKU-1").await;
    assert_eq!((reserved, committed), (0, 5));
    assert_eq!(available, 95);
    w.stop().await;
    sim_shutdown.trigger();
}

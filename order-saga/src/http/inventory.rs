//! The inventory service over HTTP (feature `http`).
//!
//! [`InventoryService`] is a [`tower::Service<Request<B>>`](tower::Service),
//! generic over the request body, that serves any [`Inventory`] (in memory
//! or on PostgreSQL); serve it with [`http_kit::serve()`] or mount it behind
//! other tower layers. Its client, [`HttpInventory`](super::inventory_client::HttpInventory),
//! implements [`Inventory`] again, so the order saga cannot tell a remote
//! inventory from a local one.
//!
//! | route | role | what it does |
//! | --- | --- | --- |
//! | `POST /v1/reservations` | `service` | reserve every line or none: 201 new, 200 the same request again |
//! | `GET /v1/reservations/{id}` | `service` | a reservation |
//! | `POST /v1/reservations/{id}/commit` | `service` | sell the reserved stock |
//! | `POST /v1/reservations/{id}/release` | `service` | give the stock back |
//! | `GET /v1/inventory/{sku}` | any valid token | one SKU's stock |
//! | `POST /v1/inventory/{sku}/restock` | `admin` | add stock, set the price |
//! | `POST /v1/admin/sweep?limit=N` | `admin` | give back expired reservations now |
//! | `GET /healthz`, `GET /readyz`, `GET /metrics` | none | probes and Prometheus metrics |
//!
//! Every error is the suite's one body, `{"error": "<code>", "message":
//! "<text>"}`; the codes, statuses, fields and limits are in
//! `docs/order-saga/inventory.md`, and `docs/order-saga/inventory.openapi.json`
//! describes the same routes as [`ROUTES`] (a test checks both ways).
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use std::sync::Arc;
//! use jwt_kit::{JwtConfig, JwtVerifier, KeySet, VerifyingKey};
//! use order_saga::http::inventory::{InventoryHttpConfig, InventoryService};
//! use order_saga::inventory::MemoryInventory;
//!
//! let keys = KeySet::new()
//!     .with_key(VerifyingKey::hs256("k", b"a-secret-of-at-least-32-bytes!!!!"))
//!     .expect("one key")
//!     .with_default_kid("k");
//! let verifier = JwtVerifier::new(keys, JwtConfig::default());
//! let service = InventoryService::new(
//!     Arc::new(MemoryInventory::default()),
//!     verifier,
//!     InventoryHttpConfig::default(),
//! );
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8082").await?;
//! let shutdown = http_kit::Shutdown::new();
//! http_kit::serve(listener, service, http_kit::ServeConfig::default(), shutdown).await;
//! # Ok(())
//! # }
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_kit::{ApiError, BoxError, Query};
use jwt_kit::JwtVerifier;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::support::{
    DEFAULT_MAX_BODY_BYTES, authenticate, healthz, read_json, readyz, require_role,
};
use crate::BoxFuture;
use crate::inventory::{
    Inventory, InventoryError, Reservation, ReserveRequest, Restock, SweeperStats,
};
use crate::model::Sku;

/// Every route, as `(method, path template)`; the router is driven by this
/// table, and `docs/order-saga/inventory.openapi.json` must list exactly
/// these.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/reservations"),
    ("GET", "/v1/reservations/{id}"),
    ("POST", "/v1/reservations/{id}/commit"),
    ("POST", "/v1/reservations/{id}/release"),
    ("GET", "/v1/inventory/{sku}"),
    ("POST", "/v1/inventory/{sku}/restock"),
    ("POST", "/v1/admin/sweep"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
];

/// The role the reservation routes require: the order service's token
/// carries it.
pub const SERVICE_ROLE: &str = "service";

/// The role restock and sweep require.
pub const ADMIN_ROLE: &str = "admin";

/// The default `limit` of `POST /v1/admin/sweep`.
pub const DEFAULT_SWEEP_LIMIT: usize = 500;

/// The largest `limit` of `POST /v1/admin/sweep`.
pub const MAX_SWEEP_LIMIT: usize = 10_000;

/// The body of `POST /v1/inventory/{sku}/restock`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestockBody {
    /// Units to add (0 only changes the price).
    pub quantity: u32,
    /// The new unit price in cents; required when the SKU is new.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_price_cents: Option<i64>,
}

/// The reply of `POST /v1/admin/sweep`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepReply {
    /// Reservations given back.
    pub swept: usize,
}

/// A reservation as the service sends it: its fields plus `total_cents`.
#[derive(Serialize)]
struct ReservationReply<'a> {
    #[serde(flatten)]
    reservation: &'a Reservation,
    total_cents: i64,
}

/// A readiness check for `GET /readyz`: a name for the dependency (sent to
/// the caller when it fails; never its address) and a probe, e.g.
/// [`PgInventory::ping`](crate::inventory::PgInventory::ping).
#[derive(Clone)]
pub struct ReadyCheck {
    dependency: Arc<str>,
    probe: Arc<dyn Fn() -> BoxFuture<'static, Result<(), BoxError>> + Send + Sync>,
}

impl std::fmt::Debug for ReadyCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadyCheck")
            .field("dependency", &self.dependency)
            .finish_non_exhaustive()
    }
}

impl ReadyCheck {
    /// A check of `dependency` that runs `probe` on every `GET /readyz`.
    pub fn new<F, Fut, E>(dependency: impl Into<String>, probe: F) -> ReadyCheck
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let dependency: String = dependency.into();
        ReadyCheck {
            dependency: dependency.into(),
            probe: Arc::new(move || {
                let probe = probe();
                Box::pin(async move { probe.await.map_err(Into::into) })
            }),
        }
    }

    /// The dependency's name.
    pub fn dependency(&self) -> &str {
        &self.dependency
    }
}

/// Settings of the HTTP adapter.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct InventoryHttpConfig {
    /// The largest request body accepted, in bytes. Default 64 KiB.
    pub max_body_bytes: usize,
    /// What `GET /readyz` checks; none by default (always ready).
    pub ready_check: Option<ReadyCheck>,
    /// How long `GET /readyz` waits for the check. Default 2 s.
    pub ready_timeout: Duration,
    /// The sweeper's counts, exported in `/metrics` when set.
    pub sweeper: Option<SweeperStats>,
}

impl Default for InventoryHttpConfig {
    fn default() -> InventoryHttpConfig {
        InventoryHttpConfig {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            ready_check: None,
            ready_timeout: Duration::from_secs(2),
            sweeper: None,
        }
    }
}

impl InventoryHttpConfig {
    /// Sets [`InventoryHttpConfig::max_body_bytes`].
    pub fn with_max_body_bytes(mut self, max: usize) -> InventoryHttpConfig {
        self.max_body_bytes = max;
        self
    }

    /// Sets [`InventoryHttpConfig::ready_check`].
    pub fn with_ready_check(mut self, check: ReadyCheck) -> InventoryHttpConfig {
        self.ready_check = Some(check);
        self
    }

    /// Sets [`InventoryHttpConfig::ready_timeout`].
    pub fn with_ready_timeout(mut self, timeout: Duration) -> InventoryHttpConfig {
        self.ready_timeout = timeout;
        self
    }

    /// Sets [`InventoryHttpConfig::sweeper`].
    pub fn with_sweeper(mut self, stats: SweeperStats) -> InventoryHttpConfig {
        self.sweeper = Some(stats);
        self
    }
}

/// Serves an [`Inventory`] over HTTP; cheap to clone (one per connection).
#[derive(Clone)]
pub struct InventoryService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for InventoryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InventoryService")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner {
    inventory: Arc<dyn Inventory>,
    verifier: JwtVerifier,
    config: InventoryHttpConfig,
    registry: Registry,
    metrics: Metrics,
}

type Outcomes = Family<[(&'static str, &'static str); 1], Counter>;

struct Metrics {
    requests: Family<[(&'static str, String); 2], Counter>,
    reservations: Outcomes,
    commits: Outcomes,
    releases: Outcomes,
    restocks: Outcomes,
    /// Reservations given back through `POST /v1/admin/sweep`.
    swept_on_request: Arc<AtomicU64>,
}

/// The response type of [`InventoryService`].
pub type HttpResponse = Response<http_kit::Body>;

/// A matched route: its index in [`ROUTES`] and its parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route<'a> {
    Reserve,
    Reservation(&'a str),
    Commit(&'a str),
    Release(&'a str),
    Stock(&'a str),
    Restock(&'a str),
    Sweep,
    Healthz,
    Readyz,
    Metrics,
}

impl Route<'_> {
    /// The route's row in [`ROUTES`].
    fn index(self) -> usize {
        match self {
            Route::Reserve => 0,
            Route::Reservation(_) => 1,
            Route::Commit(_) => 2,
            Route::Release(_) => 3,
            Route::Stock(_) => 4,
            Route::Restock(_) => 5,
            Route::Sweep => 6,
            Route::Healthz => 7,
            Route::Readyz => 8,
            Route::Metrics => 9,
        }
    }
}

fn match_route(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix('/')?;
    let segments: Vec<&str> = rest.split('/').collect();
    let route = match segments.as_slice() {
        ["v1", "reservations"] => Route::Reserve,
        ["v1", "reservations", id] => Route::Reservation(id),
        ["v1", "reservations", id, "commit"] => Route::Commit(id),
        ["v1", "reservations", id, "release"] => Route::Release(id),
        ["v1", "inventory", sku] => Route::Stock(sku),
        ["v1", "inventory", sku, "restock"] => Route::Restock(sku),
        ["v1", "admin", "sweep"] => Route::Sweep,
        ["healthz"] => Route::Healthz,
        ["readyz"] => Route::Readyz,
        ["metrics"] => Route::Metrics,
        _ => return None,
    };
    let empty_parameter = matches!(
        route,
        Route::Reservation("")
            | Route::Commit("")
            | Route::Release("")
            | Route::Stock("")
            | Route::Restock("")
    );
    (!empty_parameter).then_some(route)
}

impl InventoryService {
    /// A service over `inventory` that authenticates callers with
    /// `verifier`.
    pub fn new(
        inventory: Arc<dyn Inventory>,
        verifier: JwtVerifier,
        config: InventoryHttpConfig,
    ) -> InventoryService {
        let mut registry = Registry::default();
        let metrics = Metrics {
            requests: Family::default(),
            reservations: Outcomes::default(),
            commits: Outcomes::default(),
            releases: Outcomes::default(),
            restocks: Outcomes::default(),
            swept_on_request: Arc::new(AtomicU64::new(0)),
        };
        registry.register(
            "order_saga_inventory_http_requests",
            "HTTP requests served, by route template and status",
            metrics.requests.clone(),
        );
        registry.register(
            "order_saga_inventory_reservations",
            "Reserve calls, by outcome (created, existing, or the error code)",
            metrics.reservations.clone(),
        );
        registry.register(
            "order_saga_inventory_commits",
            "Commit calls, by outcome (committed, or the error code)",
            metrics.commits.clone(),
        );
        registry.register(
            "order_saga_inventory_releases",
            "Release calls, by outcome (released, not_found, or the error code)",
            metrics.releases.clone(),
        );
        registry.register(
            "order_saga_inventory_restocks",
            "Restock calls, by outcome (restocked, or the error code)",
            metrics.restocks.clone(),
        );
        registry.register_collector(Box::new(SweepCollector {
            sweeper: config.sweeper.clone(),
            swept_on_request: Arc::clone(&metrics.swept_on_request),
        }));
        InventoryService {
            inner: Arc::new(Inner {
                inventory,
                verifier,
                config,
                registry,
                metrics,
            }),
        }
    }

    /// The inventory behind this service.
    pub fn inventory(&self) -> &Arc<dyn Inventory> {
        &self.inner.inventory
    }

    /// Handles one request.
    pub async fn handle<B>(&self, request: Request<B>) -> HttpResponse
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let (template, response) = match self.route(request).await {
            Ok((template, response)) => (template, response),
            Err((template, error)) => (template, error.into_response()),
        };
        self.inner
            .metrics
            .requests
            .get_or_create(&[
                ("route", template.to_owned()),
                ("status", response.status().as_str().to_owned()),
            ])
            .inc();
        response
    }

    async fn route<B>(
        &self,
        request: Request<B>,
    ) -> Result<(&'static str, HttpResponse), (&'static str, ApiError)>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let path = request.uri().path().to_owned();
        let Some(route) = match_route(&path) else {
            return Err(("other", ApiError::not_found()));
        };
        let (method, template) = ROUTES[route.index()];
        if request.method().as_str() != method {
            return Err((template, ApiError::method_not_allowed(method)));
        }
        let response = match route {
            Route::Healthz => Ok(healthz()),
            Route::Readyz => Ok(self.readyz().await),
            Route::Metrics => Ok(http_kit::prometheus::response(&self.inner.registry)),
            Route::Reserve => self.reserve(request).await,
            Route::Reservation(id) => self.reservation(request.headers(), id).await,
            Route::Commit(id) => self.commit(request.headers(), id).await,
            Route::Release(id) => self.release(request.headers(), id).await,
            Route::Stock(sku) => self.stock(request.headers(), sku).await,
            Route::Restock(sku) => {
                let sku = parse_sku(sku);
                self.restock(request, sku).await
            }
            Route::Sweep => self.sweep(request.headers(), request.uri().query()).await,
        };
        response.map(|r| (template, r)).map_err(|e| (template, e))
    }

    fn authorize(&self, headers: &HeaderMap, role: Option<&str>) -> Result<(), ApiError> {
        let claims = authenticate(&self.inner.verifier, headers)?;
        match role {
            Some(role) => require_role(&claims, role),
            None => Ok(()),
        }
    }

    async fn reserve<B>(&self, request: Request<B>) -> Result<HttpResponse, ApiError>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        self.authorize(request.headers(), Some(SERVICE_ROLE))?;
        let body: ReserveRequest = read_json(request, self.inner.config.max_body_bytes).await?;
        let outcomes = &self.inner.metrics.reservations;
        // The trait does not say whether a reserve created the reservation;
        // one read before tells a replay (200) from a new one (201). Two
        // identical requests racing may both see 201; both get the one
        // reservation either way.
        let existed = match self.inner.inventory.reservation(body.reservation_id).await {
            Ok(existing) => existing.is_some(),
            Err(e) => return Err(count(outcomes, inventory_error(e))),
        };
        match self.inner.inventory.reserve(body).await {
            Ok(reservation) => {
                let (status, outcome) = if existed {
                    (StatusCode::OK, "existing")
                } else {
                    (StatusCode::CREATED, "created")
                };
                outcomes.get_or_create(&[("outcome", outcome)]).inc();
                Ok(reservation_reply(status, &reservation))
            }
            Err(e) => Err(count(outcomes, inventory_error(e))),
        }
    }

    async fn reservation(&self, headers: &HeaderMap, id: &str) -> Result<HttpResponse, ApiError> {
        self.authorize(headers, Some(SERVICE_ROLE))?;
        let id = parse_id(id)?;
        match self.inner.inventory.reservation(id).await {
            Ok(Some(reservation)) => Ok(reservation_reply(StatusCode::OK, &reservation)),
            Ok(None) => Err(inventory_error(InventoryError::ReservationNotFound(id))),
            Err(e) => Err(inventory_error(e)),
        }
    }

    async fn commit(&self, headers: &HeaderMap, id: &str) -> Result<HttpResponse, ApiError> {
        self.authorize(headers, Some(SERVICE_ROLE))?;
        let id = parse_id(id)?;
        let outcomes = &self.inner.metrics.commits;
        match self.inner.inventory.commit(id).await {
            Ok(reservation) => {
                outcomes.get_or_create(&[("outcome", "committed")]).inc();
                Ok(reservation_reply(StatusCode::OK, &reservation))
            }
            Err(e) => Err(count(outcomes, inventory_error(e))),
        }
    }

    async fn release(&self, headers: &HeaderMap, id: &str) -> Result<HttpResponse, ApiError> {
        self.authorize(headers, Some(SERVICE_ROLE))?;
        let id = parse_id(id)?;
        let outcomes = &self.inner.metrics.releases;
        match self.inner.inventory.release(id).await {
            Ok(Some(reservation)) => {
                outcomes.get_or_create(&[("outcome", "released")]).inc();
                Ok(reservation_reply(StatusCode::OK, &reservation))
            }
            Ok(None) => {
                outcomes.get_or_create(&[("outcome", "not_found")]).inc();
                Err(inventory_error(InventoryError::ReservationNotFound(id)))
            }
            Err(e) => Err(count(outcomes, inventory_error(e))),
        }
    }

    async fn stock(&self, headers: &HeaderMap, sku: &str) -> Result<HttpResponse, ApiError> {
        self.authorize(headers, None)?;
        let sku = parse_sku(sku)?;
        match self.inner.inventory.stock(&sku).await {
            Ok(level) => Ok(http_kit::json(StatusCode::OK, &level)),
            Err(e) => Err(inventory_error(e)),
        }
    }

    async fn restock<B>(
        &self,
        request: Request<B>,
        sku: Result<Sku, ApiError>,
    ) -> Result<HttpResponse, ApiError>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        self.authorize(request.headers(), Some(ADMIN_ROLE))?;
        let sku = sku?;
        let body: RestockBody = read_json(request, self.inner.config.max_body_bytes).await?;
        let outcomes = &self.inner.metrics.restocks;
        let restock = Restock {
            sku,
            quantity: body.quantity,
            unit_price_cents: body.unit_price_cents,
        };
        match self.inner.inventory.restock(restock).await {
            Ok(level) => {
                outcomes.get_or_create(&[("outcome", "restocked")]).inc();
                Ok(http_kit::json(StatusCode::OK, &level))
            }
            Err(e) => Err(count(outcomes, inventory_error(e))),
        }
    }

    async fn sweep(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<HttpResponse, ApiError> {
        self.authorize(headers, Some(ADMIN_ROLE))?;
        let query = Query::parse(query);
        let limit = match query.get("limit") {
            None => DEFAULT_SWEEP_LIMIT,
            Some(text) => match text.parse::<usize>() {
                Ok(limit) if (1..=MAX_SWEEP_LIMIT).contains(&limit) => limit,
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid_request",
                        format!("limit must be an integer in 1..={MAX_SWEEP_LIMIT}"),
                    ));
                }
            },
        };
        match self.inner.inventory.sweep_expired(limit).await {
            Ok(swept) => {
                self.inner
                    .metrics
                    .swept_on_request
                    .fetch_add(swept as u64, Ordering::Relaxed);
                Ok(http_kit::json(StatusCode::OK, &SweepReply { swept }))
            }
            Err(e) => Err(inventory_error(e)),
        }
    }

    async fn readyz(&self) -> HttpResponse {
        let Some(check) = &self.inner.config.ready_check else {
            return readyz(None);
        };
        match tokio::time::timeout(self.inner.config.ready_timeout, (check.probe)()).await {
            Ok(Ok(())) => readyz(None),
            Ok(Err(e)) => {
                tracing::warn!(dependency = %check.dependency, error = &*e as &dyn std::error::Error, "not ready");
                readyz(Some(&check.dependency))
            }
            Err(_) => {
                tracing::warn!(dependency = %check.dependency, timeout = ?self.inner.config.ready_timeout, "not ready: the check timed out");
                readyz(Some(&check.dependency))
            }
        }
    }
}

impl<B> tower::Service<Request<B>> for InventoryService
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let service = self.clone();
        Box::pin(async move { Ok(service.handle(request).await) })
    }
}

fn reservation_reply(status: StatusCode, reservation: &Reservation) -> HttpResponse {
    http_kit::json(
        status,
        &ReservationReply {
            reservation,
            total_cents: reservation.total_cents(),
        },
    )
}

fn count(outcomes: &Outcomes, error: ApiError) -> ApiError {
    let outcome = match error.code() {
        "out_of_stock" => "out_of_stock",
        "unknown_sku" => "unknown_sku",
        "reservation_not_found" => "reservation_not_found",
        "reservation_expired" => "reservation_expired",
        "reservation_mismatch" => "reservation_mismatch",
        "invalid_request" => "invalid_request",
        "inventory_unavailable" => "inventory_unavailable",
        _ => "other",
    };
    outcomes.get_or_create(&[("outcome", outcome)]).inc();
    error
}

fn parse_id(segment: &str) -> Result<Uuid, ApiError> {
    http_kit::path::decode_segment(segment)
        .and_then(|id| Uuid::parse_str(&id).ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_reservation_id",
                "the reservation id must be a UUID",
            )
        })
}

fn parse_sku(segment: &str) -> Result<Sku, ApiError> {
    http_kit::path::decode_segment(segment)
        .and_then(|sku| Sku::parse(sku.into_owned()).ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_sku",
                "a SKU must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-'",
            )
        })
}

/// The HTTP answer to an inventory error: the error's [`code`]
/// (`InventoryError::code`), a status, and the fields a client needs to
/// rebuild the typed error.
///
/// [`code`]: InventoryError::code
pub(crate) fn inventory_error(error: InventoryError) -> ApiError {
    let code = error.code();
    let message = error.to_string();
    match error {
        InventoryError::OutOfStock {
            sku,
            requested,
            available,
        } => ApiError::new(StatusCode::CONFLICT, code, message)
            .with_detail("sku", sku)
            .with_detail("requested", requested)
            .with_detail("available", available),
        InventoryError::UnknownSku(sku) => {
            ApiError::new(StatusCode::NOT_FOUND, code, message).with_detail("sku", sku)
        }
        InventoryError::ReservationNotFound(id) => {
            ApiError::new(StatusCode::NOT_FOUND, code, message).with_detail("reservation_id", id)
        }
        InventoryError::ReservationExpired(id) => {
            ApiError::new(StatusCode::CONFLICT, code, message).with_detail("reservation_id", id)
        }
        InventoryError::ReservationMismatch(id) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
                .with_detail("reservation_id", id)
        }
        InventoryError::Invalid(_) => ApiError::bad_request(code, message),
        InventoryError::Unavailable(source) => {
            // The cause goes to the log, not to the caller: it may name
            // hosts and users.
            tracing::warn!(
                error = &*source as &dyn std::error::Error,
                "inventory store unavailable"
            );
            ApiError::unavailable(
                code,
                "the inventory store is unavailable; the call is safe to retry",
            )
        }
    }
}

/// The sweeper's counts (and the on-request sweeps), read at scrape time.
#[derive(Debug)]
struct SweepCollector {
    sweeper: Option<SweeperStats>,
    swept_on_request: Arc<AtomicU64>,
}

impl Collector for SweepCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let background = self.sweeper.as_ref();
        let swept = background.map_or(0, SweeperStats::swept)
            + self.swept_on_request.load(Ordering::Relaxed);
        for (name, help, value) in [
            (
                "order_saga_inventory_swept",
                "Expired reservations given back, by the sweeper or POST /v1/admin/sweep",
                swept,
            ),
            (
                "order_saga_inventory_sweep_passes",
                "Passes of the background sweeper",
                background.map_or(0, SweeperStats::passes),
            ),
            (
                "order_saga_inventory_sweep_errors",
                "Background sweeps that failed (retried on the next pass)",
                background.map_or(0, SweeperStats::errors),
            ),
        ] {
            http_kit::prometheus::encode_counter(&mut encoder, name, help, value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_template_routes_to_its_own_row() {
        for (index, (_, template)) in ROUTES.iter().enumerate() {
            let path = template
                .replace("{id}", "0190a0c4-1f2e-7000-8000-000000000001")
                .replace("{sku}", "SKU-1");
            let route = match_route(&path).unwrap_or_else(|| panic!("{path} does not route"));
            assert_eq!(route.index(), index, "{path}");
        }
    }

    #[test]
    fn unknown_paths_and_empty_parameters_do_not_route() {
        for path in [
            "",
            "/",
            "/v1",
            "/v1/reservations/",
            "/v1/reservations//commit",
            "/v1/inventory/",
            "/v1/inventory/x/restock/",
            "/v1/reservations/x/cancel",
            "/healthz/",
            "//healthz",
            "/v2/reservations",
        ] {
            assert_eq!(match_route(path), None, "{path}");
        }
    }

    #[test]
    fn every_error_keeps_what_a_client_needs() {
        let sku = Sku::parse("a").unwrap();
        let id = Uuid::nil();
        let cases = [
            (
                InventoryError::OutOfStock {
                    sku: sku.clone(),
                    requested: 3,
                    available: 1,
                },
                409,
                "sku",
            ),
            (InventoryError::UnknownSku(sku), 404, "sku"),
            (
                InventoryError::ReservationNotFound(id),
                404,
                "reservation_id",
            ),
            (
                InventoryError::ReservationExpired(id),
                409,
                "reservation_id",
            ),
            (
                InventoryError::ReservationMismatch(id),
                422,
                "reservation_id",
            ),
        ];
        for (error, status, field) in cases {
            let code = error.code();
            let api = inventory_error(error);
            assert_eq!(api.status().as_u16(), status, "{code}");
            assert_eq!(api.code(), code);
            assert!(api.body().details.contains_key(field), "{code}");
        }
        let api = inventory_error(InventoryError::Unavailable("db at 10.0.0.5 down".into()));
        assert_eq!(api.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!api.message().contains("10.0.0.5"));
    }
}

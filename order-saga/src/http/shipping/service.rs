//! [`ShippingService`]: the shipping service's HTTP adapter.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_kit::{ApiError, BoxError};
use jwt_kit::JwtVerifier;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::BoxFuture;
use crate::http::support::{self, DEFAULT_MAX_BODY_BYTES};
use crate::model::OrderId;
use crate::shipping::{ScheduleShipment, Shipping, ShippingError};

/// Settings of [`ShippingService`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShippingServiceConfig {
    /// The largest request body accepted, in bytes. Default 64 KiB.
    pub max_body_bytes: usize,
    /// The role a caller's token must carry for the `/v1` routes. Default
    /// `service`.
    pub role: String,
}

impl Default for ShippingServiceConfig {
    fn default() -> ShippingServiceConfig {
        ShippingServiceConfig {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            role: "service".to_owned(),
        }
    }
}

impl ShippingServiceConfig {
    /// Sets [`ShippingServiceConfig::max_body_bytes`].
    pub fn with_max_body_bytes(mut self, max: usize) -> ShippingServiceConfig {
        self.max_body_bytes = max;
        self
    }

    /// Sets [`ShippingServiceConfig::role`].
    pub fn with_role(mut self, role: impl Into<String>) -> ShippingServiceConfig {
        self.role = role.into();
        self
    }
}

type ReadinessCheck = Box<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

/// The shipping service over HTTP: a
/// [`tower::Service<Request<B>>`](tower::Service), generic over the request
/// body, answering `Response<`[`http_kit::Body`]`>`; serve it with
/// [`http_kit::serve()`]. Cheap to clone (one per connection). The routes
/// are in [`ROUTES`](super::ROUTES) and `docs/order-saga/shipping.md`.
#[derive(Clone)]
pub struct ShippingService {
    inner: Arc<Inner>,
    readiness: Option<Arc<Readiness>>,
}

struct Inner {
    shipping: Arc<dyn Shipping>,
    verifier: JwtVerifier,
    config: ShippingServiceConfig,
    metrics: Metrics,
}

struct Readiness {
    dependency: &'static str,
    check: ReadinessCheck,
}

impl std::fmt::Debug for ShippingService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShippingService")
            .field("config", &self.inner.config)
            .field("readiness", &self.readiness.as_ref().map(|r| r.dependency))
            .finish_non_exhaustive()
    }
}

struct Metrics {
    registry: Registry,
    scheduled: Counter,
    cancelled: Counter,
    rejected: Counter,
    requests: Family<[(&'static str, String); 2], Counter>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::default();
        let scheduled = Counter::default();
        registry.register(
            "order_saga_shipping_scheduled",
            "Shipments booked (answered 201)",
            scheduled.clone(),
        );
        let cancelled = Counter::default();
        registry.register(
            "order_saga_shipping_cancelled",
            "Cancel requests that succeeded (a shipment cancelled, a tombstone written, or a repeat)",
            cancelled.clone(),
        );
        let rejected = Counter::default();
        registry.register(
            "order_saga_shipping_rejected",
            "Schedule requests refused with 422 shipping_rejected",
            rejected.clone(),
        );
        let requests = Family::default();
        registry.register(
            "order_saga_shipping_http_requests",
            "HTTP requests answered, by route template and status",
            requests.clone(),
        );
        Metrics {
            registry,
            scheduled,
            cancelled,
            rejected,
            requests,
        }
    }
}

/// Where a request goes. Order ids stay raw until the caller is
/// authenticated, so a stranger learns nothing from a 400.
enum Route {
    Schedule,
    Get(String),
    Cancel(String),
    Healthz,
    Readyz,
    Metrics,
}

impl Route {
    /// The route's template: its metrics label.
    fn template(&self) -> &'static str {
        match self {
            Route::Schedule => "/v1/shipments",
            Route::Get(_) => "/v1/shipments/{order_id}",
            Route::Cancel(_) => "/v1/shipments/{order_id}/cancel",
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
        }
    }
}

/// The route of `method path`, or 404 / 405 (with `Allow`) and the label
/// to count it under.
fn route(method: &Method, path: &str) -> Result<Route, (&'static str, ApiError)> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (route, allow) = match segments.as_slice() {
        ["v1", "shipments"] => (Route::Schedule, Method::POST),
        ["v1", "shipments", id] if !id.is_empty() => (Route::Get((*id).to_owned()), Method::GET),
        ["v1", "shipments", id, "cancel"] if !id.is_empty() => {
            (Route::Cancel((*id).to_owned()), Method::POST)
        }
        ["healthz"] => (Route::Healthz, Method::GET),
        ["readyz"] => (Route::Readyz, Method::GET),
        ["metrics"] => (Route::Metrics, Method::GET),
        _ => return Err(("other", ApiError::not_found())),
    };
    if *method == allow {
        Ok(route)
    } else {
        let allow = if allow == Method::POST { "POST" } else { "GET" };
        Err((route.template(), ApiError::method_not_allowed(allow)))
    }
}

impl ShippingService {
    /// Serves `shipping` to callers whose token `verifier` accepts.
    pub fn new(
        shipping: Arc<dyn Shipping>,
        verifier: JwtVerifier,
        config: ShippingServiceConfig,
    ) -> ShippingService {
        ShippingService {
            inner: Arc::new(Inner {
                shipping,
                verifier,
                config,
                metrics: Metrics::new(),
            }),
            readiness: None,
        }
    }

    /// Makes `GET /readyz` answer 503 `not_ready` naming `dependency`
    /// whenever `check` resolves to false (e.g. PostgreSQL's `SELECT 1`
    /// failed: `PgShipping::ping`).
    /// Without a check the service is always ready (the in-memory store).
    pub fn with_readiness<F, Fut>(mut self, dependency: &'static str, check: F) -> ShippingService
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        self.readiness = Some(Arc::new(Readiness {
            dependency,
            check: Box::new(move || Box::pin(check())),
        }));
        self
    }

    /// The store behind the service.
    pub fn shipping(&self) -> &Arc<dyn Shipping> {
        &self.inner.shipping
    }

    /// The settings.
    pub fn config(&self) -> &ShippingServiceConfig {
        &self.inner.config
    }

    /// `/metrics` as served (OpenMetrics text).
    pub fn metrics_text(&self) -> String {
        http_kit::prometheus::encode(&self.inner.metrics.registry).unwrap_or_default()
    }

    /// Answers one request.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<http_kit::Body>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let (label, response) = match route(request.method(), request.uri().path()) {
            Ok(route) => {
                let label = route.template();
                let response = self
                    .dispatch(route, request)
                    .await
                    .unwrap_or_else(ApiError::into_response);
                (label, response)
            }
            Err((label, error)) => (label, error.into_response()),
        };
        self.inner
            .metrics
            .requests
            .get_or_create(&[
                ("route", label.to_owned()),
                ("status", response.status().as_str().to_owned()),
            ])
            .inc();
        response
    }

    async fn dispatch<B>(
        &self,
        route: Route,
        request: Request<B>,
    ) -> Result<Response<http_kit::Body>, ApiError>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let shipping = &self.inner.shipping;
        let metrics = &self.inner.metrics;
        match route {
            Route::Healthz => Ok(support::healthz()),
            Route::Readyz => Ok(self.readyz().await),
            Route::Metrics => Ok(http_kit::prometheus::response(&metrics.registry)),
            Route::Schedule => {
                self.authorize(&request)?;
                let body: ScheduleShipment =
                    support::read_json(request, self.inner.config.max_body_bytes).await?;
                match shipping.schedule_with_outcome(body).await {
                    Ok(outcome) => {
                        let status = if outcome.created {
                            metrics.scheduled.inc();
                            StatusCode::CREATED
                        } else {
                            StatusCode::OK
                        };
                        Ok(http_kit::json(status, &outcome.shipment))
                    }
                    Err(e) => {
                        if matches!(e, ShippingError::Rejected(_)) {
                            metrics.rejected.inc();
                        }
                        Err(api_error(&e))
                    }
                }
            }
            Route::Get(raw) => {
                self.authorize(&request)?;
                let order_id = order_id(&raw)?;
                match shipping
                    .shipment(order_id)
                    .await
                    .map_err(|e| api_error(&e))?
                {
                    Some(shipment) => Ok(http_kit::json(StatusCode::OK, &shipment)),
                    None => Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        "shipment_not_found",
                        format!("order {order_id} has no shipment"),
                    )),
                }
            }
            Route::Cancel(raw) => {
                self.authorize(&request)?;
                let order_id = order_id(&raw)?;
                let shipment = shipping.cancel(order_id).await.map_err(|e| api_error(&e))?;
                metrics.cancelled.inc();
                Ok(http_kit::json(StatusCode::OK, &shipment))
            }
        }
    }

    /// 401 without a valid token, 403 without the role.
    fn authorize<B>(&self, request: &Request<B>) -> Result<(), ApiError> {
        let claims = support::authenticate(&self.inner.verifier, request.headers())?;
        support::require_role(&claims, &self.inner.config.role)
    }

    async fn readyz(&self) -> Response<http_kit::Body> {
        match &self.readiness {
            Some(readiness) if !(readiness.check)().await => {
                support::readyz(Some(readiness.dependency))
            }
            _ => support::readyz(None),
        }
    }
}

/// The `{order_id}` path segment: 400 `invalid_order_id` unless it is a
/// UUID.
fn order_id(segment: &str) -> Result<OrderId, ApiError> {
    http_kit::path::decode_segment(segment)
        .and_then(|s| s.parse::<OrderId>().ok())
        .ok_or_else(|| {
            ApiError::bad_request("invalid_order_id", "the order id in the path is not a UUID")
        })
}

/// The answer to a store error. An outage's cause goes to the log, never
/// to the caller.
fn api_error(error: &ShippingError) -> ApiError {
    match error {
        ShippingError::Rejected(reason) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            error.code(),
            reason.clone(),
        ),
        ShippingError::Cancelled(order_id) => {
            ApiError::new(StatusCode::CONFLICT, error.code(), error.to_string())
                .with_detail("order_id", order_id)
        }
        ShippingError::Unavailable(_) => {
            tracing::warn!(error = %chain(error), "shipping store unavailable");
            ApiError::unavailable(
                error.code(),
                "the shipping store is unavailable; retry later",
            )
        }
    }
}

/// `error` and its sources, `: `-separated.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

impl<B> tower::Service<Request<B>> for ShippingService
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<http_kit::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let service = self.clone();
        Box::pin(async move { Ok(service.handle(request).await) })
    }
}

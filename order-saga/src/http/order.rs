//! The order service's HTTP adapter: [`OrderHttp`], a
//! `tower::Service<Request<B>>` over an [`OrderService`].
//!
//! | route | who | what |
//! | --- | --- | --- |
//! | `POST /v1/orders` | any customer | create; header `Idempotency-Key` required; 201, 200 (replay), 409, 422 |
//! | `GET /v1/orders/{id}` | its customer, or `admin` | the order |
//! | `GET /v1/orders?customer=…&after=…&limit=…` | that customer, or `admin` | newest first, keyset pages |
//! | `POST /v1/orders/{id}/cancel` | its customer, or `admin` | compensate whatever has run |
//! | `POST /v1/orders/{id}/retry` | `admin` | retry the compensations of a `needs_attention` order |
//! | `GET /healthz`, `/readyz`, `/metrics` | anyone | probes and Prometheus |
//!
//! The customer is the `sub` of the caller's bearer token (verified with the
//! suite's JWT verifier), never a field of the body. Every error is the
//! suite's one body, `{"error": "<code>", "message": "<text>"}`; the codes
//! and statuses are listed in `docs/order-saga/API.md`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use http_kit::{ApiError, Body, BoxError, Query};
use jwt_kit::{Claims, JwtVerifier};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::support::{DEFAULT_MAX_BODY_BYTES, authenticate, read_json};
use crate::model::{CreateOrder, CustomerId, OrderId};
use crate::order::{CreateOutcome, OrderError, OrderService};

/// Every route, as `(method, path template)`: what the OpenAPI document
/// (`docs/order-saga/order.openapi.json`) must describe.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/orders"),
    ("GET", "/v1/orders"),
    ("GET", "/v1/orders/{id}"),
    ("POST", "/v1/orders/{id}/cancel"),
    ("POST", "/v1/orders/{id}/retry"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
];

/// The role that may read and cancel any order and retry compensations.
pub const ADMIN_ROLE: &str = "admin";

/// The header carrying a create request's idempotency key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The order service over HTTP.
#[derive(Clone, Debug)]
pub struct OrderHttp {
    inner: Arc<HttpInner>,
}

#[derive(Debug)]
struct HttpInner {
    service: OrderService,
    verifier: JwtVerifier,
    max_body_bytes: usize,
}

impl OrderHttp {
    /// Serves `service`, authenticating callers with `verifier`.
    pub fn new(service: OrderService, verifier: JwtVerifier) -> OrderHttp {
        OrderHttp {
            inner: Arc::new(HttpInner {
                service,
                verifier,
                max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            }),
        }
    }

    /// Refuses request bodies over `max` bytes (413). Default 64 KiB.
    pub fn with_max_body_bytes(mut self, max: usize) -> OrderHttp {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.max_body_bytes = max;
        }
        self
    }
}

impl<B> tower::Service<Request<B>> for OrderHttp
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            Ok(match route(&inner, request).await {
                Ok(response) => response,
                Err(error) => error.into_response(),
            })
        })
    }
}

async fn route<B>(inner: &HttpInner, request: Request<B>) -> Result<Response<Body>, ApiError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = request.method().clone();
    match segments.as_slice() {
        ["healthz"] => only(&method, Method::GET, "GET").map(|()| super::support::healthz()),
        ["readyz"] => {
            only(&method, Method::GET, "GET")?;
            let failed = inner.service.ready().await.is_err().then_some("database");
            Ok(super::support::readyz(failed))
        }
        ["metrics"] => {
            only(&method, Method::GET, "GET")?;
            Ok(metrics(inner).await)
        }
        ["v1", "orders"] => match method {
            Method::POST => create(inner, request).await,
            Method::GET => list(inner, &request.into_parts().0).await,
            _ => Err(ApiError::method_not_allowed("GET, POST")),
        },
        ["v1", "orders", id] if !id.is_empty() => {
            only(&method, Method::GET, "GET")?;
            let claims = authenticate(&inner.verifier, request.headers())?;
            let id = parse_id(id)?;
            let order = inner
                .service
                .get_order(id)
                .await
                .map_err(error)?
                .filter(|order| may_see(&claims, &order.customer))
                .ok_or_else(not_found)?;
            Ok(http_kit::json(StatusCode::OK, &order))
        }
        ["v1", "orders", id, "cancel"] if !id.is_empty() => {
            only(&method, Method::POST, "POST")?;
            let claims = authenticate(&inner.verifier, request.headers())?;
            let id = parse_id(id)?;
            let order = inner.service.get_order(id).await.map_err(error)?;
            let order = order
                .filter(|o| may_see(&claims, &o.customer))
                .ok_or_else(not_found)?;
            let order = inner
                .service
                .cancel_order(&order.customer, id)
                .await
                .map_err(error)?;
            Ok(http_kit::json(StatusCode::OK, &order))
        }
        ["v1", "orders", id, "retry"] if !id.is_empty() => {
            only(&method, Method::POST, "POST")?;
            let claims = authenticate(&inner.verifier, request.headers())?;
            super::support::require_role(&claims, ADMIN_ROLE)?;
            let id = parse_id(id)?;
            let order = inner.service.retry_compensation(id).await.map_err(error)?;
            Ok(http_kit::json(StatusCode::OK, &order))
        }
        _ => Err(ApiError::not_found()),
    }
}

fn only(method: &Method, allowed: Method, allow: &'static str) -> Result<(), ApiError> {
    if *method == allowed {
        Ok(())
    } else {
        Err(ApiError::method_not_allowed(allow))
    }
}

fn may_see(claims: &Claims, customer: &CustomerId) -> bool {
    claims.subject == customer.as_str() || claims.roles.iter().any(|r| r == ADMIN_ROLE)
}

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "order_not_found", "no such order")
}

fn parse_id(segment: &str) -> Result<OrderId, ApiError> {
    segment
        .parse()
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, "order_not_found", "no such order"))
}

fn customer_of(claims: &Claims) -> Result<CustomerId, ApiError> {
    CustomerId::parse(claims.subject.clone()).map_err(|_| {
        ApiError::unauthorized(
            "invalid_token",
            "the token's subject is not a valid customer id",
        )
    })
}

async fn create<B>(inner: &HttpInner, request: Request<B>) -> Result<Response<Body>, ApiError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let claims = authenticate(&inner.verifier, request.headers())?;
    let customer = customer_of(&claims)?;
    let key = match request.headers().get(IDEMPOTENCY_KEY) {
        None => {
            return Err(ApiError::bad_request(
                "missing_idempotency_key",
                "POST /v1/orders needs an Idempotency-Key header",
            ));
        }
        Some(value) => value
            .to_str()
            .map_err(|_| error(OrderError::InvalidIdempotencyKey))?
            .to_owned(),
    };
    let body: CreateOrder = read_json(request, inner.max_body_bytes).await?;
    match inner
        .service
        .create_order(&customer, body, &key)
        .await
        .map_err(error)?
    {
        CreateOutcome::Created(order) => Ok(http_kit::json(StatusCode::CREATED, &order)),
        CreateOutcome::OutOfStock(stored) => {
            Ok(stored_response(stored.status, &stored.body, false))
        }
        CreateOutcome::Replayed(stored) => Ok(stored_response(stored.status, &stored.body, true)),
    }
}

/// A stored answer; a replayed 201 is answered 200, with
/// `Idempotent-Replayed: true`.
fn stored_response(status: u16, body: &serde_json::Value, replay: bool) -> Response<Body> {
    let status = match StatusCode::from_u16(status) {
        Ok(StatusCode::CREATED) if replay => StatusCode::OK,
        Ok(status) => status,
        Err(_) => StatusCode::OK,
    };
    let mut response = http_kit::json(status, body);
    if replay {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

async fn list(
    inner: &HttpInner,
    request: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    let claims = authenticate(&inner.verifier, &request.headers)?;
    let query = Query::parse(request.uri.query());
    let customer = match query.get("customer") {
        Some(customer) => CustomerId::parse(customer).map_err(|_| {
            ApiError::bad_request(
                "invalid_customer",
                "customer must be 1-128 bytes without control characters",
            )
        })?,
        None => customer_of(&claims)?,
    };
    if !may_see(&claims, &customer) {
        return Err(ApiError::forbidden(
            "a customer may list only their own orders",
        ));
    }
    let after = match query.get("after") {
        Some(after) => Some(after.parse::<OrderId>().map_err(|_| {
            ApiError::bad_request(
                "invalid_cursor",
                "after must be an order id from a previous page's next",
            )
        })?),
        None => None,
    };
    let limit = match query.get("limit") {
        Some(limit) => limit
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=inner.service.config().max_page).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_limit",
                    format!("limit must be 1-{}", inner.service.config().max_page),
                )
            })?,
        None => 20,
    };
    let page = inner
        .service
        .list_orders(&customer, after, limit)
        .await
        .map_err(error)?;
    Ok(http_kit::json(
        StatusCode::OK,
        &serde_json::json!({"orders": page.orders, "next": page.next}),
    ))
}

/// The HTTP form of an [`OrderError`].
fn error(e: OrderError) -> ApiError {
    let status = match &e {
        OrderError::Invalid(_) | OrderError::InvalidIdempotencyKey => StatusCode::BAD_REQUEST,
        OrderError::KeyInFlight | OrderError::NotCancellable(_) => StatusCode::CONFLICT,
        OrderError::KeyReused | OrderError::UnknownSku(_) => StatusCode::UNPROCESSABLE_ENTITY,
        OrderError::NotFound => StatusCode::NOT_FOUND,
        OrderError::Store(_) | OrderError::InventoryUnavailable(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    if status.is_server_error() {
        tracing::warn!(error = %crate::order::error_chain(&e), "order request failed");
    }
    let mut api = ApiError::new(status, e.code(), e.to_string());
    match &e {
        OrderError::UnknownSku(sku) => api = api.with_detail("sku", sku),
        OrderError::InventoryUnavailable(id) => {
            api = api
                .with_detail("order_id", id)
                .with_header(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        OrderError::Store(_) | OrderError::KeyInFlight => {
            api = api.with_header(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        _ => {}
    }
    api
}

async fn metrics(inner: &HttpInner) -> Response<Body> {
    let stats = inner.service.stats().snapshot();
    let mut registry = Registry::with_prefix("order_saga");
    let counter = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(value);
        registry.register(name, help, c);
    };
    counter(
        &mut registry,
        "orders_created",
        "Orders created (201)",
        stats.created,
    );
    counter(
        &mut registry,
        "orders_replayed",
        "Create requests answered from an idempotency key",
        stats.replayed,
    );
    counter(
        &mut registry,
        "orders_rejected_out_of_stock",
        "Create requests refused for lack of stock",
        stats.rejected_out_of_stock,
    );
    counter(
        &mut registry,
        "sagas_confirmed",
        "Sagas that reached confirmed",
        stats.confirmed,
    );
    counter(
        &mut registry,
        "sagas_needs_attention",
        "Sagas that reached needs_attention",
        stats.needs_attention,
    );
    counter(
        &mut registry,
        "step_retries",
        "Forward steps retried after a transient failure",
        stats.step_retries,
    );
    counter(
        &mut registry,
        "compensation_retries",
        "Compensations retried",
        stats.compensation_retries,
    );
    counter(
        &mut registry,
        "leases_lost",
        "Sagas this instance stopped driving because another took the lease",
        stats.leases_lost,
    );
    counter(
        &mut registry,
        "sagas_resumed",
        "Sagas claimed by the poller (crash recovery, retries, cancels)",
        stats.resumed,
    );
    let cancelled = Family::<Vec<(String, String)>, Counter<u64>>::default();
    for (reason, n) in &stats.cancelled {
        cancelled
            .get_or_create(&vec![("reason".to_owned(), reason.as_str().to_owned())])
            .inc_by(*n);
    }
    registry.register(
        "sagas_cancelled",
        "Sagas that reached cancelled, by reason",
        cancelled,
    );
    if let Ok(counts) = inner.service.count_by_state().await {
        let orders = Family::<Vec<(String, String)>, Gauge>::default();
        for (state, n) in counts {
            orders
                .get_or_create(&vec![("state".to_owned(), state.as_str().to_owned())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        registry.register(
            "orders",
            "Orders by state (needs_attention above 0 wants an operator)",
            orders,
        );
    }
    http_kit::prometheus::response(&registry)
}

//! [`PaymentSimService`]: the payment provider simulator's HTTP API, a
//! `tower::Service<Request<B>>` over a shared [`Simulator`], served by the
//! `payment_sim` example with [`http_kit::serve()`].
//!
//! | route | what it does |
//! | --- | --- |
//! | `POST /v1/authorizations` | authorize: `201` new, `200` replay, `402` declined, `422` key reused |
//! | `GET /v1/payments?authorize_key=K` | the payment the authorization with key `K` created (lookup) |
//! | `GET /v1/payments/{id}` | a payment |
//! | `POST /v1/payments/{id}/capture` | capture (`Idempotency-Key` required) |
//! | `POST /v1/payments/{id}/void` | void (`Idempotency-Key` required) |
//! | `POST /v1/payments/{id}/refund` | refund (`Idempotency-Key` required) |
//! | `GET /v1/ledger` | the ledger's totals and counters; `?entries=true` adds every payment, `?order_id=` those of one order |
//! | `GET`, `PUT /v1/admin/faults` | read or change the fault settings at runtime |
//! | `GET /healthz`, `/readyz`, `/metrics` | probes and Prometheus metrics (`payment_sim_*`) |
//!
//! It plays an *external* card processor, so it asks for no token: the
//! suite's JWT guards the suite's own services, and a real provider would
//! authenticate with its own API key. Do not expose it beyond a test
//! network. Malformed input gets the suite's error body
//! ([`http_kit::ApiError`]) and changes nothing.
//!
//! Faults are real on the wire: a lost reply acts, then the service fails
//! the request, which makes hyper close the connection without a
//! response; a late reply is held for [`SimConfig::late_reply_delay`].
//! The admin, ledger and probe routes are never faulted. Every route,
//! field, status and metric is in `docs/order-saga/payment-sim.md`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_kit::path::decode_segment;
use http_kit::{ApiError, Body, BoxError, Query};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use super::support::{self, DEFAULT_MAX_BODY_BYTES};
use crate::model::OrderId;
use crate::payment::sim::{
    Delivery, LedgerEntry, LedgerSummary, Operation, SimConfig, SimOutcome, SimReply, SimRequest,
    SimStats, Simulator, validate_key,
};
use crate::payment::{AuthorizeRequest, PaymentError, PaymentState};

/// Every route the service answers, as `(method, path)` with path
/// parameters in braces, as in `docs/order-saga/payment-sim.openapi.json`.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/authorizations"),
    ("GET", "/v1/payments"),
    ("GET", "/v1/payments/{id}"),
    ("POST", "/v1/payments/{id}/capture"),
    ("POST", "/v1/payments/{id}/void"),
    ("POST", "/v1/payments/{id}/refund"),
    ("GET", "/v1/ledger"),
    ("GET", "/v1/admin/faults"),
    ("PUT", "/v1/admin/faults"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
];

/// The header that carries a request's idempotency key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Set to `true` on a response replayed from a stored idempotency key.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// An answer refusing a request (boxed: `ApiError` is large).
type Refusal = Box<ApiError>;

/// The error of a request whose reply the simulator deliberately lost:
/// returning it makes hyper close the connection without a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("simulated lost reply: the connection is dropped without a response")]
pub struct ReplyLost;

/// The simulator's HTTP API. Cheap to clone (one per connection).
#[derive(Clone, Debug)]
pub struct PaymentSimService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    sim: Arc<Simulator>,
    max_body_bytes: usize,
    registry: Registry,
    requests: Family<[(&'static str, String); 2], Counter>,
}

/// An authorization as the API reads it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorizeBody {
    order_id: OrderId,
    amount_cents: i64,
    currency: String,
}

/// The body of capture, void and refund: none, or an empty object.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

/// The fault settings as the API shows them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultsView {
    /// [`SimConfig::down`].
    pub down: bool,
    /// [`SimConfig::error_rate`].
    pub error_rate: f64,
    /// [`SimConfig::lost_reply_rate`].
    pub lost_reply_rate: f64,
    /// [`SimConfig::timeout_rate`].
    pub timeout_rate: f64,
    /// [`SimConfig::decline_rate`].
    pub decline_rate: f64,
    /// [`SimConfig::latency_mean`], in milliseconds.
    pub latency_mean_ms: f64,
    /// [`SimConfig::latency_p99`], in milliseconds.
    pub latency_p99_ms: f64,
    /// [`SimConfig::late_reply_delay`], in milliseconds.
    pub late_reply_ms: f64,
}

impl From<&SimConfig> for FaultsView {
    fn from(c: &SimConfig) -> FaultsView {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        FaultsView {
            down: c.down,
            error_rate: c.error_rate,
            lost_reply_rate: c.lost_reply_rate,
            timeout_rate: c.timeout_rate,
            decline_rate: c.decline_rate,
            latency_mean_ms: ms(c.latency_mean),
            latency_p99_ms: ms(c.latency_p99),
            late_reply_ms: ms(c.late_reply_delay),
        }
    }
}

/// A change of the fault settings: fields left out keep their value.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsPatch {
    down: Option<bool>,
    error_rate: Option<f64>,
    lost_reply_rate: Option<f64>,
    timeout_rate: Option<f64>,
    decline_rate: Option<f64>,
    latency_mean_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    late_reply_ms: Option<f64>,
}

impl FaultsPatch {
    fn apply(&self, c: &mut SimConfig) -> Result<(), String> {
        let duration = |name: &str, ms: f64| {
            Duration::try_from_secs_f64(ms / 1000.0)
                .map_err(|_| format!("{name} must be a non-negative number of milliseconds"))
        };
        if let Some(v) = self.down {
            c.down = v;
        }
        if let Some(v) = self.error_rate {
            c.error_rate = v;
        }
        if let Some(v) = self.lost_reply_rate {
            c.lost_reply_rate = v;
        }
        if let Some(v) = self.timeout_rate {
            c.timeout_rate = v;
        }
        if let Some(v) = self.decline_rate {
            c.decline_rate = v;
        }
        if let Some(v) = self.latency_mean_ms {
            c.latency_mean = duration("latency_mean_ms", v)?;
        }
        if let Some(v) = self.latency_p99_ms {
            c.latency_p99 = duration("latency_p99_ms", v)?;
        }
        if let Some(v) = self.late_reply_ms {
            c.late_reply_delay = duration("late_reply_ms", v)?;
        }
        Ok(())
    }
}

/// `GET /v1/ledger`'s body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerView {
    /// The totals.
    pub summary: LedgerSummary,
    /// The request counters, by name.
    pub stats: StatsView,
    /// The payments, oldest first, when asked for (`entries=true` or
    /// `order_id=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<LedgerEntry>>,
}

/// [`SimStats`] with the operations by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsView {
    /// Requests received.
    pub requests: u64,
    /// Requests per operation (`authorize`, `capture`, `void`, `refund`,
    /// `lookup`, `get`).
    pub operations: std::collections::BTreeMap<String, u64>,
    /// Requests refused while down.
    pub rejected_down: u64,
    /// Requests refused by an injected error.
    pub injected_errors: u64,
    /// Replies lost (connections dropped) after acting.
    pub lost_replies: u64,
    /// Replies held back.
    pub late_replies: u64,
    /// New authorizations declined.
    pub declines: u64,
    /// Requests answered from a stored idempotency key.
    pub replays: u64,
}

impl From<&SimStats> for StatsView {
    fn from(s: &SimStats) -> StatsView {
        StatsView {
            requests: s.requests,
            operations: Operation::ALL
                .iter()
                .map(|op| (op.as_str().to_owned(), s.operation(*op)))
                .collect(),
            rejected_down: s.rejected_down,
            injected_errors: s.injected_errors,
            lost_replies: s.lost_replies,
            late_replies: s.late_replies,
            declines: s.declines,
            replays: s.replays,
        }
    }
}

/// Which route a request is for.
enum Route<'a> {
    Authorize,
    Lookup,
    Get(&'a str),
    Change(Operation, &'a str),
    Ledger,
    GetFaults,
    PutFaults,
    Healthz,
    Readyz,
    Metrics,
}

impl Route<'_> {
    /// The route's label in metrics (its `ROUTES` path).
    fn label(&self) -> &'static str {
        match self {
            Route::Authorize => "/v1/authorizations",
            Route::Lookup => "/v1/payments",
            Route::Get(_) => "/v1/payments/{id}",
            Route::Change(Operation::Capture, _) => "/v1/payments/{id}/capture",
            Route::Change(Operation::Void, _) => "/v1/payments/{id}/void",
            Route::Change(_, _) => "/v1/payments/{id}/refund",
            Route::Ledger => "/v1/ledger",
            Route::GetFaults | Route::PutFaults => "/v1/admin/faults",
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
        }
    }
}

/// Finds the route, or the 404/405 answer.
fn route<'a>(method: &Method, path: &'a str) -> Result<Route<'a>, Refusal> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (route, allow) = match segments.as_slice() {
        ["v1", "authorizations"] => ((method == Method::POST).then_some(Route::Authorize), "POST"),
        ["v1", "payments"] => ((method == Method::GET).then_some(Route::Lookup), "GET"),
        ["v1", "payments", id] if !id.is_empty() => {
            ((method == Method::GET).then_some(Route::Get(id)), "GET")
        }
        ["v1", "payments", id, action] if !id.is_empty() => {
            let operation = match *action {
                "capture" => Operation::Capture,
                "void" => Operation::Void,
                "refund" => Operation::Refund,
                _ => return Err(Box::new(ApiError::not_found())),
            };
            (
                (method == Method::POST).then_some(Route::Change(operation, id)),
                "POST",
            )
        }
        ["v1", "ledger"] => ((method == Method::GET).then_some(Route::Ledger), "GET"),
        ["v1", "admin", "faults"] => (
            match *method {
                Method::GET => Some(Route::GetFaults),
                Method::PUT => Some(Route::PutFaults),
                _ => None,
            },
            "GET, PUT",
        ),
        ["healthz"] => ((method == Method::GET).then_some(Route::Healthz), "GET"),
        ["readyz"] => ((method == Method::GET).then_some(Route::Readyz), "GET"),
        ["metrics"] => ((method == Method::GET).then_some(Route::Metrics), "GET"),
        _ => return Err(Box::new(ApiError::not_found())),
    };
    route.ok_or_else(|| Box::new(ApiError::method_not_allowed(allow)))
}

/// The request's idempotency key: 400 `missing_idempotency_key` or
/// `invalid_idempotency_key` otherwise.
fn idempotency_key(headers: &HeaderMap) -> Result<String, Refusal> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Err(Box::new(ApiError::bad_request(
            "missing_idempotency_key",
            "an Idempotency-Key header is required",
        )));
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| validate_key(k).is_ok())
        .ok_or_else(|| {
            Box::new(ApiError::bad_request(
                "invalid_idempotency_key",
                "the Idempotency-Key must be 1 to 255 visible ASCII characters",
            ))
        })?;
    Ok(key.to_owned())
}

/// A path's payment id, percent-decoded.
fn payment_id(segment: &str) -> Result<String, Refusal> {
    decode_segment(segment)
        .map(|id| id.into_owned())
        .ok_or_else(|| {
            Box::new(ApiError::bad_request(
                "invalid_payment_id",
                "the payment id is not UTF-8",
            ))
        })
}

/// A payment error as the API answers it.
fn payment_error(error: &PaymentError) -> ApiError {
    let code = error.code();
    match error {
        PaymentError::Declined { reason } => {
            ApiError::new(StatusCode::PAYMENT_REQUIRED, code, error.to_string())
                .with_detail("decline_reason", reason)
        }
        PaymentError::Unavailable(_) => ApiError::unavailable(code, error.to_string()),
        PaymentError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, code, error.to_string()),
        PaymentError::InvalidState { id, state } => {
            ApiError::new(StatusCode::CONFLICT, code, error.to_string())
                .with_detail("payment_id", id)
                .with_detail("state", state)
        }
        PaymentError::KeyReused(_) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, error.to_string())
        }
        PaymentError::Invalid(message) => ApiError::bad_request(code, message.clone()),
        // The ledger never answers these; they belong to clients.
        PaymentError::OutcomeUnknown(_) | PaymentError::CircuitOpen => {
            tracing::error!(error = %error, "unexpected simulator error");
            ApiError::internal()
        }
    }
}

/// A reply with the payment: `created` is the status of a first answer.
fn payment_reply(reply: SimReply, created: StatusCode) -> Response<Body> {
    let status = if reply.replayed {
        StatusCode::OK
    } else {
        created
    };
    let mut response = http_kit::json(status, &reply.payment);
    if reply.replayed {
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    response
}

impl PaymentSimService {
    /// The API of `sim`, with the suite's default body limit (64 KiB).
    pub fn new(sim: Arc<Simulator>) -> PaymentSimService {
        let mut registry = Registry::default();
        let requests = Family::<[(&'static str, String); 2], Counter>::default();
        registry.register(
            "payment_sim_http_requests",
            "HTTP requests answered, by route and status (lost replies are not answered)",
            requests.clone(),
        );
        registry.register_collector(Box::new(SimCollector(Arc::clone(&sim))));
        PaymentSimService {
            inner: Arc::new(Inner {
                sim,
                max_body_bytes: DEFAULT_MAX_BODY_BYTES,
                registry,
                requests,
            }),
        }
    }

    /// The simulator behind the API.
    pub fn simulator(&self) -> &Arc<Simulator> {
        &self.inner.sim
    }

    /// Handles one request: the response, or [`ReplyLost`] when the
    /// simulator lost the reply (the connection must then close unanswered).
    pub async fn handle<B>(&self, request: Request<B>) -> Result<Response<Body>, ReplyLost>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let (label, result) = match route(&method, &path) {
            Ok(route) => (route.label(), self.dispatch(route, request).await),
            Err(e) => ("other", Ok(e.into_response())),
        };
        let status = match &result {
            Ok(response) => response.status().as_str().to_owned(),
            Err(ReplyLost) => "lost".to_owned(),
        };
        self.inner
            .requests
            .get_or_create(&[("route", label.to_owned()), ("status", status)])
            .inc();
        result
    }

    async fn dispatch<B>(
        &self,
        route: Route<'_>,
        request: Request<B>,
    ) -> Result<Response<Body>, ReplyLost>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let sim = &self.inner.sim;
        match route {
            Route::Authorize => match self.authorize_request(request).await {
                Ok(request) => {
                    let outcome = sim.execute(SimRequest::Authorize(request)).await;
                    deliver(outcome, |reply| {
                        if reply.payment.state == PaymentState::Declined {
                            let reason = reply
                                .payment
                                .decline_reason
                                .clone()
                                .unwrap_or_else(|| "declined".to_owned());
                            let mut response = payment_error(&PaymentError::Declined { reason })
                                .with_detail("payment", &reply.payment)
                                .into_response();
                            if reply.replayed {
                                response
                                    .headers_mut()
                                    .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
                            }
                            response
                        } else {
                            payment_reply(reply, StatusCode::CREATED)
                        }
                    })
                    .await
                }
                Err(e) => Ok(e.into_response()),
            },
            Route::Change(operation, segment) => {
                match self.change_request(operation, segment, request).await {
                    Ok(request) => {
                        let outcome = sim.execute(request).await;
                        deliver(outcome, |reply| payment_reply(reply, StatusCode::OK)).await
                    }
                    Err(e) => Ok(e.into_response()),
                }
            }
            Route::Lookup => {
                let query = Query::parse(request.uri().query());
                let Some(key) = query.get("authorize_key").filter(|k| !k.is_empty()) else {
                    return Ok(ApiError::bad_request(
                        "missing_authorize_key",
                        "the query parameter authorize_key is required",
                    )
                    .into_response());
                };
                let outcome = sim
                    .execute(SimRequest::Lookup {
                        authorize_key: key.to_owned(),
                    })
                    .await;
                deliver(outcome, |reply| payment_reply(reply, StatusCode::OK)).await
            }
            Route::Get(segment) => {
                let payment_id = match payment_id(segment) {
                    Ok(id) => id,
                    Err(e) => return Ok(e.into_response()),
                };
                let outcome = sim.execute(SimRequest::Get { payment_id }).await;
                deliver(outcome, |reply| payment_reply(reply, StatusCode::OK)).await
            }
            Route::Ledger => Ok(self.ledger(&Query::parse(request.uri().query()))),
            Route::GetFaults => Ok(http_kit::json(
                StatusCode::OK,
                &FaultsView::from(&sim.config()),
            )),
            Route::PutFaults => Ok(self.put_faults(request).await),
            Route::Healthz => Ok(support::healthz()),
            Route::Readyz => Ok(support::readyz(None)),
            Route::Metrics => Ok(http_kit::prometheus::response(&self.inner.registry)),
        }
    }

    async fn authorize_request<B>(&self, request: Request<B>) -> Result<AuthorizeRequest, Refusal>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let key = idempotency_key(request.headers())?;
        let body: AuthorizeBody = support::read_json(request, self.inner.max_body_bytes).await?;
        Ok(AuthorizeRequest {
            idempotency_key: key,
            order_id: body.order_id,
            amount_cents: body.amount_cents,
            currency: body.currency,
        })
    }

    async fn change_request<B>(
        &self,
        operation: Operation,
        segment: &str,
        request: Request<B>,
    ) -> Result<SimRequest, Refusal>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let idempotency_key = idempotency_key(request.headers())?;
        let payment_id = payment_id(segment)?;
        let (parts, body) = request.into_parts();
        let bytes = http_kit::collect_limited(&parts.headers, body, self.inner.max_body_bytes)
            .await
            .map_err(|e| Box::new(ApiError::from(e)))?;
        if !bytes.iter().all(u8::is_ascii_whitespace) {
            serde_json::from_slice::<NoFields>(&bytes).map_err(|e| {
                Box::new(ApiError::bad_request(
                    "malformed_json",
                    format!("the body must be empty or {{}}: {e}"),
                ))
            })?;
        }
        Ok(match operation {
            Operation::Capture => SimRequest::Capture {
                idempotency_key,
                payment_id,
            },
            Operation::Void => SimRequest::Void {
                idempotency_key,
                payment_id,
            },
            _ => SimRequest::Refund {
                idempotency_key,
                payment_id,
            },
        })
    }

    fn ledger(&self, query: &Query<'_>) -> Response<Body> {
        let sim = &self.inner.sim;
        let entries = match (query.get("order_id"), query.get("entries")) {
            (Some(order), _) => match order.parse::<OrderId>() {
                Ok(order) => Some(
                    sim.entries()
                        .into_iter()
                        .filter(|e| e.payment.order_id == order)
                        .collect(),
                ),
                Err(_) => {
                    return ApiError::bad_request("invalid_order_id", "order_id must be a UUID")
                        .into_response();
                }
            },
            (None, Some("true")) => Some(sim.entries()),
            (None, None | Some("false")) => None,
            (None, Some(_)) => {
                return ApiError::bad_request("invalid_entries", "entries must be true or false")
                    .into_response();
            }
        };
        let view = LedgerView {
            summary: sim.ledger(),
            stats: StatsView::from(&sim.stats()),
            entries,
        };
        http_kit::json(StatusCode::OK, &view)
    }

    async fn put_faults<B>(&self, request: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let patch: FaultsPatch = match support::read_json(request, self.inner.max_body_bytes).await
        {
            Ok(p) => p,
            Err(e) => return e.into_response(),
        };
        let mut bad_field = None;
        let result = self.inner.sim.update_config(|config| {
            if let Err(message) = patch.apply(config) {
                bad_field = Some(message);
            }
        });
        if let Some(message) = bad_field {
            return ApiError::bad_request("invalid_faults", message).into_response();
        }
        match result {
            Ok(config) => {
                tracing::info!(faults = ?FaultsView::from(&config), "fault settings changed");
                http_kit::json(StatusCode::OK, &FaultsView::from(&config))
            }
            Err(e) => ApiError::bad_request("invalid_faults", e.to_string()).into_response(),
        }
    }
}

/// Delivers an outcome as the simulator decided: on time, late, or not at
/// all (the caller's connection is dropped).
async fn deliver(
    outcome: SimOutcome,
    ok: impl FnOnce(SimReply) -> Response<Body>,
) -> Result<Response<Body>, ReplyLost> {
    let response = match outcome.result {
        Ok(reply) => ok(reply),
        Err(e) => payment_error(&e).into_response(),
    };
    match outcome.delivery {
        Delivery::OnTime => Ok(response),
        Delivery::Lost => Err(ReplyLost),
        // Simulation: the reply really is this late; the client has most
        // likely given up and closed the connection.
        Delivery::Late(delay) => {
            tokio::time::sleep(delay).await;
            Ok(response)
        }
    }
}

impl<B> tower::Service<Request<B>> for PaymentSimService
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = ReplyLost;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, ReplyLost>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ReplyLost>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let service = self.clone();
        Box::pin(async move { service.handle(request).await })
    }
}

/// The simulator's counters and ledger at scrape time.
#[derive(Debug)]
struct SimCollector(Arc<Simulator>);

impl Collector for SimCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let stats = self.0.stats();
        let ledger = self.0.ledger();
        let mut operations = encoder.encode_descriptor(
            "payment_sim_requests",
            "Provider API requests received, by operation (faulted ones included)",
            None,
            MetricType::Counter,
        )?;
        for op in Operation::ALL {
            ConstCounter::new(stats.operation(op))
                .encode(operations.encode_family(&[("operation", op.as_str())])?)?;
        }
        let mut faults = encoder.encode_descriptor(
            "payment_sim_faults",
            "Faults injected, by kind",
            None,
            MetricType::Counter,
        )?;
        for (kind, value) in [
            ("down", stats.rejected_down),
            ("error", stats.injected_errors),
            ("lost_reply", stats.lost_replies),
            ("late_reply", stats.late_replies),
        ] {
            ConstCounter::new(value).encode(faults.encode_family(&[("kind", kind)])?)?;
        }
        for (name, help, value) in [
            (
                "payment_sim_declines",
                "Authorizations declined",
                stats.declines,
            ),
            (
                "payment_sim_replays",
                "Requests answered from a stored idempotency key",
                stats.replays,
            ),
        ] {
            http_kit::prometheus::encode_counter(&mut encoder, name, help, value)?;
        }
        let mut payments = encoder.encode_descriptor(
            "payment_sim_payments",
            "Payments in the ledger, by state",
            None,
            MetricType::Gauge,
        )?;
        for (state, value) in [
            ("authorized", ledger.authorized),
            ("captured", ledger.captured),
            ("voided", ledger.voided),
            ("refunded", ledger.refunded),
            ("declined", ledger.declined),
        ] {
            ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
                .encode(payments.encode_family(&[("state", state)])?)?;
        }
        let mut amounts = encoder.encode_descriptor(
            "payment_sim_amount_cents",
            "Money in the ledger, in cents: authorized (ever), held (now), captured (ever), refunded (ever)",
            None,
            MetricType::Gauge,
        )?;
        for (kind, value) in [
            ("authorized", ledger.authorized_cents),
            ("held", ledger.held_cents),
            ("captured", ledger.captured_cents),
            ("refunded", ledger.refunded_cents),
        ] {
            ConstGauge::new(value).encode(amounts.encode_family(&[("kind", kind)])?)?;
        }
        let config = self.0.config();
        for (name, help, value) in [
            (
                "payment_sim_double_charges",
                "Orders with more than one authorization that was not declined",
                i64::try_from(ledger.double_charges).unwrap_or(i64::MAX),
            ),
            (
                "payment_sim_down",
                "1 while the simulated provider is down",
                i64::from(config.down),
            ),
        ] {
            http_kit::prometheus::encode_gauge(&mut encoder, name, help, value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_in_the_table_resolves_and_others_do_not() {
        for (method, path) in ROUTES {
            let method: Method = method.parse().unwrap();
            let concrete = path.replace("{id}", "pay_1");
            let route = route(&method, &concrete).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(route.label(), *path);
        }
        assert_eq!(
            route(&Method::DELETE, "/v1/payments/p")
                .err()
                .map(|e| e.status()),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(
            route(&Method::POST, "/v1/payments/p/explode")
                .err()
                .map(|e| e.status()),
            Some(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            route(&Method::GET, "/v1/payments//capture")
                .err()
                .map(|e| e.status()),
            Some(StatusCode::NOT_FOUND)
        );
    }

    #[test]
    fn a_patch_keeps_fields_it_leaves_out() {
        let mut config = SimConfig::default().with_error_rate(0.3);
        let patch = FaultsPatch {
            down: Some(true),
            latency_mean_ms: Some(20.0),
            latency_p99_ms: Some(60.0),
            ..FaultsPatch::default()
        };
        patch.apply(&mut config).unwrap();
        assert!(config.down);
        assert_eq!(config.error_rate, 0.3);
        assert_eq!(config.latency_mean, Duration::from_millis(20));
        let bad = FaultsPatch {
            late_reply_ms: Some(-1.0),
            ..FaultsPatch::default()
        };
        assert!(bad.apply(&mut config).is_err());
    }
}

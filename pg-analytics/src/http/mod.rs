//! The HTTP adapter (feature `server`): [`AnalyticsService`], a
//! [`tower::Service<Request<B>>`](tower::Service) generic over the request
//! body, on the suite's shared edge (`http_kit`); serve it with
//! [`http_kit::serve()`] or mount it behind other tower layers.
//!
//! | route | what it does |
//! | --- | --- |
//! | `POST /v1/events` | an NDJSON batch: 200 with the accepted count and the rejected lines with their codes |
//! | `GET /v1/dashboard?plan=…&since=…` | events and average processing time per tenant per UTC day, newest first |
//! | `GET /healthz`, `GET /readyz`, `GET /metrics` | probes and Prometheus metrics |
//!
//! Every error is the suite's one body, `{"error": "<code>", "message":
//! "<text>"}`. The fields, statuses, codes, limits and metric names are in
//! `docs/pg-analytics/API.md`.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use pg_analytics::Analytics;
//! use pg_analytics::http::{AnalyticsHttpConfig, AnalyticsService};
//!
//! let pool = pg_kit::pool("postgres://postgres@127.0.0.1/analytics", &Default::default())?;
//! let store = Analytics::new(pool, time_kit::system());
//! store.migrate().await?;
//! let service = AnalyticsService::new(store, None, AnalyticsHttpConfig::default());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8090").await?;
//! let shutdown = http_kit::Shutdown::new();
//! http_kit::serve(listener, service, http_kit::ServeConfig::default(), shutdown).await;
//! # Ok(())
//! # }
//! ```

// `ApiError` is the suite's one error body, built once per failed request;
// boxing it on every `?` would buy nothing.
#![allow(clippy::result_large_err)]

mod metrics;
mod ndjson;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::NaiveDate;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Request, Response, StatusCode};
use http_kit::{ApiError, BoxError, Query};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::cache::{CacheError, CachedWriter, DashboardCache};
use crate::model::Plan;
use crate::postgres::{Analytics, AnalyticsError, EventWriter, IngestReport, WriterConfig};
use metrics::Metrics;

/// Every route, as `(method, path)`.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/events"),
    ("GET", "/v1/dashboard"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
];

/// The header that names a batch, so a retry is written once.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Settings of the HTTP adapter.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AnalyticsHttpConfig {
    /// The largest `POST /v1/events` body, in bytes. Default 16 MiB.
    pub max_body_bytes: usize,
    /// The writer's settings (rows per batch: default 50,000; batches in
    /// flight: default 4).
    pub writer: WriterConfig,
    /// When set, `POST /v1/events` and `GET /v1/dashboard` require
    /// `Authorization: Bearer <token>` with this token. Default none.
    pub api_token: Option<String>,
    /// How long `GET /readyz` waits for PostgreSQL. Default 2 s.
    pub ready_timeout: Duration,
}

impl Default for AnalyticsHttpConfig {
    fn default() -> AnalyticsHttpConfig {
        AnalyticsHttpConfig {
            max_body_bytes: 16 * 1024 * 1024,
            writer: WriterConfig::default(),
            api_token: None,
            ready_timeout: Duration::from_secs(2),
        }
    }
}

impl AnalyticsHttpConfig {
    /// Sets [`AnalyticsHttpConfig::max_body_bytes`].
    pub fn with_max_body_bytes(mut self, max: usize) -> AnalyticsHttpConfig {
        self.max_body_bytes = max;
        self
    }

    /// Sets [`AnalyticsHttpConfig::writer`].
    pub fn with_writer(mut self, writer: WriterConfig) -> AnalyticsHttpConfig {
        self.writer = writer;
        self
    }

    /// Sets [`AnalyticsHttpConfig::api_token`].
    pub fn with_api_token(mut self, token: impl Into<String>) -> AnalyticsHttpConfig {
        self.api_token = Some(token.into());
        self
    }
}

/// Serves an [`Analytics`] store (and its cache, when given) over HTTP;
/// cheap to clone (one per connection).
#[derive(Clone)]
pub struct AnalyticsService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AnalyticsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnalyticsService")
            .field("max_body_bytes", &self.inner.config.max_body_bytes)
            .field("cached", &self.inner.cache.is_some())
            .finish_non_exhaustive()
    }
}

enum Writer {
    Plain(EventWriter),
    Cached(CachedWriter),
}

struct Inner {
    store: Analytics,
    cache: Option<DashboardCache>,
    writer: Writer,
    config: AnalyticsHttpConfig,
    metrics: Metrics,
}

/// The response type of [`AnalyticsService`].
pub type HttpResponse = Response<http_kit::Body>;

impl AnalyticsService {
    /// A service over `store`; dashboards are read through `cache` when
    /// given, and batches then bump its generations before they are
    /// acknowledged.
    pub fn new(
        store: Analytics,
        cache: Option<DashboardCache>,
        config: AnalyticsHttpConfig,
    ) -> AnalyticsService {
        let plain = store.writer(config.writer.clone());
        let writer = match &cache {
            Some(cache) => Writer::Cached(cache.writer(plain)),
            None => Writer::Plain(plain),
        };
        let metrics = Metrics::new(&store, cache.as_ref());
        AnalyticsService {
            inner: Arc::new(Inner {
                store,
                cache,
                writer,
                config,
                metrics,
            }),
        }
    }

    /// Records the default partition's row count for `/metrics` (the
    /// maintenance job calls this; see [`AnalyticsService::maintain`]).
    pub fn record_default_partition_rows(&self, rows: i64) {
        self.inner.metrics.default_partition_rows.set(rows);
    }

    /// One maintenance pass ([`Analytics::maintain`]), its default
    /// partition count recorded for `/metrics`.
    pub async fn maintain(&self, months_ahead: u32) -> Result<(), AnalyticsError> {
        let report = self.inner.store.maintain(months_ahead).await?;
        self.record_default_partition_rows(report.default_partition_rows);
        Ok(())
    }

    /// Handles one request.
    pub async fn handle<B>(&self, request: Request<B>) -> HttpResponse
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let path = request.uri().path().to_owned();
        let route = ROUTES.iter().position(|(_, p)| *p == path);
        let (template, response) = match route {
            None => ("other", ApiError::not_found().into_response()),
            Some(i) => {
                let (method, template) = ROUTES[i];
                let response = if request.method().as_str() != method {
                    ApiError::method_not_allowed(method).into_response()
                } else {
                    match self.route(i, request).await {
                        Ok(response) => response,
                        Err(error) => error.into_response(),
                    }
                };
                (template, response)
            }
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

    async fn route<B>(&self, route: usize, request: Request<B>) -> Result<HttpResponse, ApiError>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        match route {
            0 => self.events(request).await,
            1 => self.dashboard(request.headers(), request.uri()).await,
            2 => Ok(http_kit::json(
                StatusCode::OK,
                &serde_json::json!({"status": "ok"}),
            )),
            3 => Ok(self.readyz().await),
            _ => Ok(http_kit::prometheus::response(&self.inner.metrics.registry)),
        }
    }

    fn authorize(&self, headers: &http::HeaderMap) -> Result<(), ApiError> {
        let Some(expected) = &self.inner.config.api_token else {
            return Ok(());
        };
        match http_kit::bearer_token(headers) {
            None => Err(ApiError::unauthorized(
                "missing_token",
                "an Authorization: Bearer token is required",
            )),
            Some(token) if bool::from(token.as_bytes().ct_eq(expected.as_bytes())) => Ok(()),
            Some(_) => Err(ApiError::unauthorized(
                "invalid_token",
                "the bearer token is not valid",
            )),
        }
    }

    async fn events<B>(&self, request: Request<B>) -> Result<HttpResponse, ApiError>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        self.authorize(request.headers())?;
        let is_ndjson = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .is_some_and(|v| matches!(v.as_str(), "application/x-ndjson" | "application/jsonl"));
        if !is_ndjson {
            return Err(ApiError::unsupported_media_type(
                "Content-Type must be application/x-ndjson (one JSON event per line)",
            ));
        }
        let batch_id = match request.headers().get(IDEMPOTENCY_KEY) {
            None => Uuid::now_v7(),
            Some(value) => value
                .to_str()
                .ok()
                .and_then(|v| Uuid::parse_str(v.trim()).ok())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_idempotency_key",
                        "Idempotency-Key must be a UUID",
                    )
                })?,
        };
        let (parts, body) = request.into_parts();
        let bytes =
            http_kit::collect_limited(&parts.headers, body, self.inner.config.max_body_bytes)
                .await?;
        let parsed = ndjson::parse(&bytes);
        let max_rows = self.inner.config.writer.max_batch_rows;
        if parsed.rows() > max_rows {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_rows",
                format!(
                    "the batch has {} rows; at most {max_rows} are accepted",
                    parsed.rows()
                ),
            ));
        }
        let result = match &self.inner.writer {
            Writer::Plain(w) => w.write(batch_id, &parsed.events).await,
            Writer::Cached(w) => w.write(batch_id, parsed.events).await,
        };
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                self.inner
                    .metrics
                    .batches
                    .get_or_create(&[("outcome", "failed")])
                    .inc();
                return Err(store_error(&e));
            }
        };
        let mut rejected = parsed.malformed;
        rejected.extend(report.rejected.iter().map(|r| {
            let mut r = r.clone();
            r.index = parsed.lines[r.index];
            r
        }));
        rejected.sort_by_key(|r| r.index);
        self.inner.metrics.count_batch(&report, &rejected);
        Ok(http_kit::json(
            StatusCode::OK,
            &EventsReply::new(&report, &rejected),
        ))
    }

    async fn dashboard(
        &self,
        headers: &http::HeaderMap,
        uri: &http::Uri,
    ) -> Result<HttpResponse, ApiError> {
        self.authorize(headers)?;
        let query = Query::parse(uri.query());
        let plan: Plan = match query.get("plan") {
            None => return Err(missing("plan")),
            Some(p) => p.parse().map_err(|e: crate::model::UnknownPlan| {
                ApiError::bad_request("invalid_plan", e.to_string())
            })?,
        };
        let since = match query.get("since") {
            None => return Err(missing("since")),
            Some(s) => NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| {
                ApiError::bad_request(
                    "invalid_since",
                    format!("since must be a date as YYYY-MM-DD, not {s:?}"),
                )
            })?,
        };
        let started = Instant::now();
        let body = match &self.inner.cache {
            Some(cache) => cache
                .dashboard_json(plan, since)
                .await
                .map_err(|e| match e {
                    CacheError::Store(e) => store_error(&e),
                    other => {
                        tracing::error!(error = %other, "dashboard cache");
                        ApiError::internal()
                    }
                })?,
            None => Bytes::from(
                self.inner
                    .store
                    .dashboard_json(plan, since)
                    .await
                    .map_err(|e| store_error(&e))?,
            ),
        };
        self.inner
            .metrics
            .dashboard_seconds
            .observe(started.elapsed().as_secs_f64());
        let mut response = Response::new(http_kit::full(body));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(response)
    }

    async fn readyz(&self) -> HttpResponse {
        let ping = async {
            let conn = self
                .inner
                .store
                .pool()
                .get()
                .await
                .map_err(|e| e.to_string())?;
            conn.simple_query("SELECT 1")
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(self.inner.config.ready_timeout, ping).await {
            Ok(Ok(())) => http_kit::json(StatusCode::OK, &serde_json::json!({"status": "ready"})),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "readyz: postgres");
                not_ready()
            }
            Err(_) => not_ready(),
        }
    }
}

fn not_ready() -> HttpResponse {
    ApiError::unavailable("not_ready", "postgres is unreachable")
        .with_detail("dependency", "postgres")
        .into_response()
}

fn missing(name: &str) -> ApiError {
    ApiError::bad_request(
        "missing_parameter",
        format!("the query parameter {name:?} is required"),
    )
    .with_detail("parameter", name)
}

/// 422 `idempotency_key_reused` for a batch id reused with other events;
/// 503 `unavailable` (with `Retry-After: 1`) when a retry may help, else
/// 500 `internal` (the cause is logged, never sent).
fn store_error(e: &AnalyticsError) -> ApiError {
    if let AnalyticsError::IdempotencyKeyReused { batch_id } = e {
        return ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            format!("the Idempotency-Key {batch_id} was used before for a different batch"),
        );
    }
    if e.is_transient() {
        tracing::warn!(error = %e, "postgres unavailable");
        ApiError::unavailable("unavailable", "the database is unavailable; retry later")
            .with_header(RETRY_AFTER, HeaderValue::from_static("1"))
    } else {
        tracing::error!(error = %e, "analytics store");
        ApiError::internal()
    }
}

/// The reply of `POST /v1/events`: the report, with the rejected rows by
/// line of the body.
#[derive(serde::Serialize)]
struct EventsReply<'a> {
    batch_id: Uuid,
    accepted: usize,
    rejected: &'a [crate::postgres::Rejected],
    replayed: bool,
}

impl<'a> EventsReply<'a> {
    fn new(report: &'a IngestReport, rejected: &'a [crate::postgres::Rejected]) -> Self {
        EventsReply {
            batch_id: report.batch_id,
            accepted: report.accepted,
            rejected,
            replayed: report.replayed,
        }
    }
}

impl<B> tower::Service<Request<B>> for AnalyticsService
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

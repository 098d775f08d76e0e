//! The HTTP adapter (feature `http`).
//!
//! [`MetricsService`] is a [`tower::Service<Request<B>>`](tower::Service),
//! generic over the request body, that exposes a [`MetricsProcessor`] over
//! HTTP; serve it with [`http_kit::serve()`] or mount it behind any tower
//! layers (gateway-mw's auth, RBAC and rate limits, say):
//!
//! | route | what it does |
//! | --- | --- |
//! | `POST /v1/events` | ingest one JSON event (`application/json`) or NDJSON, one event a line (`application/x-ndjson`) |
//! | `GET /v1/aggregates?minutes=N` | the aggregate map as a JSON object |
//! | `GET /metrics` | Prometheus/OpenMetrics text: accepted and rejected events, types, memory, requests |
//! | `GET /healthz` | `200` while accepting events, `503` once shutdown began |
//!
//! Ingest replies `{"accepted":N,"rejected":[{"line":L,"reason":"…","message":"…"}]}`.
//! A body that holds no well-formed JSON event is `400` (`error` is
//! `empty_body` or `malformed_json`, beside `accepted` and `rejected`); a body over
//! [`HttpConfig::max_body_bytes`] is `413` (checked on `Content-Length` and
//! while reading chunked bodies); an unsupported content type is `415`. In an
//! NDJSON body, each malformed or invalid line is reported with its 1-based
//! line number and the others are still processed, so nothing valid is lost.
//! Lines that are not JSON events are counted in `/metrics` under
//! `metrics_events_rejected_total{reason="malformed_json"}`.
//!
//! Numbers keep full `f64` precision both ways; a sum that overflowed to
//! ±infinity is written as `null`. Bodies over
//! [`HttpConfig::blocking_ingest_bytes`] are ingested on tokio's blocking
//! pool so they do not stall the runtime thread. Every route, field, status
//! and metric is documented in `docs/metrics-core.md`.
//!
//! Every error has the suite's one body, `{"error": "<code>", "message": "<text>"}`
//! ([`http_kit::ApiError`]).
//!
//! ```no_run
//! # async fn serve() -> std::io::Result<()> {
//! use std::sync::Arc;
//! use metrics_core::{Config, MetricsProcessor, http::{HttpConfig, MetricsService}};
//!
//! let processor = Arc::new(MetricsProcessor::new(Config::default()));
//! let service = MetricsService::new(processor, HttpConfig::default());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let shutdown = http_kit::Shutdown::new();
//! shutdown.trigger_on(async { let _ = tokio::signal::ctrl_c().await; });
//! http_kit::serve(listener, service, http_kit::ServeConfig::default(), shutdown).await;
//! # Ok(())
//! # }
//! ```

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_kit::{ApiError, BoxError, Query};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::json;

use crate::{EventRef, MetricsProcessor, RejectReason};

/// The default [`HttpConfig::blocking_ingest_bytes`]: 64 KiB, about 700
/// typical events. Small bodies are the common case and a thread hand-off
/// costs microseconds, so only bodies past this size pay for one.
pub const DEFAULT_BLOCKING_INGEST_BYTES: usize = 64 * 1024;

/// The reject reason of a line that is not a JSON event object. It never
/// reaches the processor, so the adapter counts it itself.
pub const MALFORMED_JSON: &str = "malformed_json";

/// Limits of the HTTP adapter.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HttpConfig {
    /// The largest request body accepted, in bytes. Default 8 MiB.
    pub max_body_bytes: usize,
    /// Bodies larger than this many bytes are parsed and ingested on tokio's
    /// blocking pool (`spawn_blocking`) instead of the runtime thread that
    /// polls the request, so one big batch cannot stall the other
    /// connections served by that thread. Default
    /// [`DEFAULT_BLOCKING_INGEST_BYTES`] (64 KiB). Outside a tokio runtime
    /// every body is ingested inline.
    pub blocking_ingest_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: 8 * 1024 * 1024,
            blocking_ingest_bytes: DEFAULT_BLOCKING_INGEST_BYTES,
        }
    }
}

impl HttpConfig {
    /// Sets [`HttpConfig::max_body_bytes`].
    pub fn with_max_body_bytes(mut self, max: usize) -> Self {
        self.max_body_bytes = max;
        self
    }

    /// Sets [`HttpConfig::blocking_ingest_bytes`].
    pub fn with_blocking_ingest_bytes(mut self, bytes: usize) -> Self {
        self.blocking_ingest_bytes = bytes;
        self
    }
}

/// Serves a [`MetricsProcessor`] over HTTP; cheap to clone (one per connection).
#[derive(Clone, Debug)]
pub struct MetricsService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    processor: Arc<MetricsProcessor>,
    config: HttpConfig,
    registry: Registry,
    requests: Family<[(&'static str, String); 2], Counter>,
    /// Lines rejected as [`MALFORMED_JSON`], shared with the collector.
    malformed: Arc<AtomicU64>,
}

/// The response type of [`MetricsService`].
pub type HttpResponse = Response<http_kit::Body>;

impl MetricsService {
    /// A service over `processor`.
    pub fn new(processor: Arc<MetricsProcessor>, config: HttpConfig) -> MetricsService {
        let mut registry = Registry::default();
        let requests = Family::<[(&'static str, String); 2], Counter>::default();
        registry.register(
            "metrics_http_requests",
            "HTTP requests served, by route and status",
            requests.clone(),
        );
        let malformed = Arc::new(AtomicU64::new(0));
        registry.register_collector(Box::new(ProcessorCollector {
            processor: Arc::clone(&processor),
            malformed: Arc::clone(&malformed),
        }));
        MetricsService {
            inner: Arc::new(Inner {
                processor,
                config,
                registry,
                requests,
                malformed,
            }),
        }
    }

    /// The processor behind this service.
    pub fn processor(&self) -> &Arc<MetricsProcessor> {
        &self.inner.processor
    }

    /// Handles one request.
    pub async fn handle<B>(&self, request: Request<B>) -> HttpResponse
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let (route, response) = self.route(request).await;
        self.inner
            .requests
            .get_or_create(&[
                ("route", route.to_owned()),
                ("status", response.status().as_str().to_owned()),
            ])
            .inc();
        response
    }

    async fn route<B>(&self, request: Request<B>) -> (&'static str, HttpResponse)
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let path = request.uri().path();
        let method = request.method().clone();
        match (path, method) {
            ("/v1/events", Method::POST) => ("/v1/events", self.ingest(request).await),
            ("/v1/aggregates", Method::GET) => (
                "/v1/aggregates",
                self.aggregates(&Query::parse(request.uri().query())),
            ),
            ("/metrics", Method::GET) => ("/metrics", self.metrics()),
            ("/healthz", Method::GET) => ("/healthz", self.health()),
            ("/v1/events", _) => (
                "/v1/events",
                ApiError::method_not_allowed("POST").into_response(),
            ),
            ("/v1/aggregates" | "/metrics" | "/healthz", _) => {
                ("other", ApiError::method_not_allowed("GET").into_response())
            }
            _ => ("other", ApiError::not_found().into_response()),
        }
    }

    async fn ingest<B>(&self, request: Request<B>) -> HttpResponse
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let max = self.inner.config.max_body_bytes;
        let ndjson = match content_kind(request.headers().get(CONTENT_TYPE)) {
            Some(kind) => kind == BodyKind::Ndjson,
            None => {
                return ApiError::unsupported_media_type(
                    "send application/json (one event) or application/x-ndjson (one event a line)",
                )
                .into_response();
            }
        };
        let (parts, body) = request.into_parts();
        let body = match http_kit::collect_limited(&parts.headers, body, max).await {
            Ok(body) => body,
            Err(e) => return ApiError::from(e).into_response(),
        };
        let report = if body.len() > self.inner.config.blocking_ingest_bytes
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let processor = Arc::clone(&self.inner.processor);
            match runtime
                .spawn_blocking(move || ingest_body(&processor, &body, ndjson))
                .await
            {
                Ok(report) => report,
                Err(e) => {
                    // Only a panic or a runtime shutting down gets here.
                    tracing::error!(error = %e, "ingest task failed");
                    return ApiError::internal().into_response();
                }
            }
        } else {
            ingest_body(&self.inner.processor, &body, ndjson)
        };
        let malformed = report
            .rejected
            .iter()
            .filter(|r| r.reason == MALFORMED_JSON)
            .count();
        if malformed > 0 {
            self.inner
                .malformed
                .fetch_add(malformed as u64, Ordering::Relaxed);
        }
        let status = if report.well_formed == 0 {
            StatusCode::BAD_REQUEST
        } else if !ndjson && report.accepted == 0 {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::OK
        };
        let rejected: Vec<_> = report
            .rejected
            .iter()
            .map(|r| json!({"line": r.line, "reason": r.reason, "message": r.message}))
            .collect();
        if report.well_formed == 0 {
            let (code, message) = if report.lines == 0 {
                (
                    "empty_body",
                    "empty body: send one JSON event, or NDJSON with one event a line",
                )
            } else {
                (
                    MALFORMED_JSON,
                    "malformed JSON: no line holds a valid event object",
                )
            };
            return ApiError::new(status, code, message)
                .with_detail("accepted", report.accepted)
                .with_detail("rejected", rejected)
                .into_response();
        }
        http_kit::json(
            status,
            &json!({"accepted": report.accepted, "rejected": rejected}),
        )
    }

    fn aggregates(&self, query: &Query<'_>) -> HttpResponse {
        let Some(minutes) = query.get("minutes") else {
            return ApiError::bad_request(
                "invalid_window",
                "the query parameter minutes=N is required",
            )
            .into_response();
        };
        let Ok(minutes) = minutes.parse::<u32>() else {
            return ApiError::bad_request(
                "invalid_window",
                format!("minutes must be a positive integer, got {minutes:?}"),
            )
            .into_response();
        };
        match self.inner.processor.aggregates(minutes) {
            Ok(map) => {
                // Sorted keys make responses diffable and stable.
                let sorted: std::collections::BTreeMap<_, _> = map.into_iter().collect();
                http_kit::json(StatusCode::OK, &sorted)
            }
            Err(e) => ApiError::bad_request("invalid_window", e.to_string()).into_response(),
        }
    }

    fn metrics(&self) -> HttpResponse {
        http_kit::prometheus::response(&self.inner.registry)
    }

    fn health(&self) -> HttpResponse {
        if self.inner.processor.is_shutting_down() {
            http_kit::json(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "shutting_down"}),
            )
        } else {
            http_kit::json(StatusCode::OK, &json!({"status": "ok"}))
        }
    }
}

impl<B> tower::Service<Request<B>> for MetricsService
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

/// An event as it arrives on the wire: strings borrowed from the body where
/// they need no unescaping.
#[derive(Deserialize)]
struct WireEvent<'a> {
    timestamp: DateTime<Utc>,
    #[serde(borrow)]
    user_id: Cow<'a, str>,
    #[serde(borrow)]
    event_type: Cow<'a, str>,
    value: f64,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum BodyKind {
    Json,
    Ndjson,
}

/// `None` for an unsupported content type. A missing one is read as JSON.
fn content_kind(value: Option<&HeaderValue>) -> Option<BodyKind> {
    let Some(value) = value else {
        return Some(BodyKind::Json);
    };
    let mime = value
        .to_str()
        .ok()?
        .split(';')
        .next()?
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/json" => Some(BodyKind::Json),
        "application/x-ndjson"
        | "application/ndjson"
        | "application/jsonl"
        | "application/jsonlines" => Some(BodyKind::Ndjson),
        _ => None,
    }
}

struct Rejection {
    line: usize,
    reason: &'static str,
    message: String,
}

#[derive(Default)]
struct Report {
    /// Non-blank lines (or 1 for a JSON body).
    lines: usize,
    /// Lines that parsed as an event.
    well_formed: usize,
    accepted: usize,
    rejected: Vec<Rejection>,
}

impl Report {
    fn line(&mut self, processor: &MetricsProcessor, number: usize, text: &[u8]) {
        self.lines += 1;
        match serde_json::from_slice::<WireEvent<'_>>(text) {
            Ok(e) => {
                self.well_formed += 1;
                let event = EventRef {
                    timestamp: e.timestamp,
                    user_id: &e.user_id,
                    event_type: &e.event_type,
                    value: e.value,
                };
                match processor.process(event) {
                    Ok(()) => self.accepted += 1,
                    Err(err) => self.rejected.push(Rejection {
                        line: number,
                        reason: err.reject_reason().map_or("rejected", RejectReason::as_str),
                        message: err.to_string(),
                    }),
                }
            }
            Err(err) => self.rejected.push(Rejection {
                line: number,
                reason: MALFORMED_JSON,
                message: format!("malformed JSON: {err}"),
            }),
        }
    }
}

fn ingest_body(processor: &MetricsProcessor, body: &[u8], ndjson: bool) -> Report {
    if ndjson {
        ingest_lines(processor, body)
    } else {
        ingest_one(processor, body)
    }
}

fn ingest_one(processor: &MetricsProcessor, body: &[u8]) -> Report {
    let mut report = Report::default();
    if !body.iter().all(u8::is_ascii_whitespace) {
        report.line(processor, 1, body);
    }
    report
}

fn ingest_lines(processor: &MetricsProcessor, body: &[u8]) -> Report {
    let mut report = Report::default();
    for (index, line) in body.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        report.line(processor, index + 1, line);
    }
    report
}

/// Exposes the processor's counters (and the adapter's malformed-JSON
/// count) at scrape time.
#[derive(Debug)]
struct ProcessorCollector {
    processor: Arc<MetricsProcessor>,
    malformed: Arc<AtomicU64>,
}

impl Collector for ProcessorCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let stats = self.processor.stats();
        let accepted = ConstCounter::new(stats.accepted);
        accepted.encode(encoder.encode_descriptor(
            "metrics_events_accepted",
            "Events accepted into the aggregates",
            None,
            accepted.metric_type(),
        )?)?;
        let mut rejected = encoder.encode_descriptor(
            "metrics_events_rejected",
            "Events rejected, by reason",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, count) in stats.rejections() {
            ConstCounter::new(count)
                .encode(rejected.encode_family(&[("reason", reason.as_str())])?)?;
        }
        ConstCounter::new(self.malformed.load(Ordering::Relaxed))
            .encode(rejected.encode_family(&[("reason", MALFORMED_JSON)])?)?;
        let types = ConstGauge::new(self.processor.event_types() as i64);
        types.encode(encoder.encode_descriptor(
            "metrics_event_types",
            "Registered event types",
            None,
            types.metric_type(),
        )?)?;
        let memory = ConstGauge::new(self.processor.memory_usage().total_bytes() as i64);
        memory.encode(encoder.encode_descriptor(
            "metrics_heap_bytes",
            "Heap bytes held by the aggregation windows and sketches",
            None,
            memory.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;

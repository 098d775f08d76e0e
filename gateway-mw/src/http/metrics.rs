//! Prometheus metrics with OpenTelemetry semantic-convention names.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `http_server_request_duration_seconds` | histogram | `http_request_method`, `http_route`, `http_response_status_code` |
//! | `http_server_requests_total` | counter | same |
//! | `http_server_errors_total` | counter (5xx) | same |
//! | `gateway_auth_failures_total` | counter (401) | — |
//! | `gateway_rate_limited_total` | counter (429) | — |
//! | `gateway_upstream_errors_total` | counter (502, 503, 504) | — |
//! | `http_server_active_requests` | gauge | — |
//! | `gateway_audit_written_total`, `gateway_audit_dropped_total` | counters | — (when an [`AuditLog`] is attached) |
//!
//! Labels stay low-cardinality: the route is the matched template from
//! [`MatchedRoute`] (or `unmatched`), the method one of the standard ones
//! (or `_OTHER`), never the raw path.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http::{Method, Request, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::MatchedRoute;
use crate::audit::AuditLog;

type Labels = [(&'static str, String); 3];

/// One (method, status) series of a route: its duration histogram and
/// request counter (clones share the values in the families).
#[derive(Debug, Clone)]
struct Series {
    method: &'static str,
    status: u16,
    duration: Histogram,
    requests: Counter,
}

/// The gateway's metrics and their registry.
#[derive(Debug)]
pub struct GatewayMetrics {
    registry: Registry,
    duration: Family<Labels, Histogram>,
    requests: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    /// The series of each (route, method, status) seen, resolved once: a
    /// request then costs one lookup by route instead of three label
    /// strings and a hash of them per family.
    series: parking_lot::RwLock<HashMap<String, Vec<Series>, foldhash::fast::RandomState>>,
    auth_failures: Counter,
    rate_limited: Counter,
    upstream_errors: Counter,
    in_flight: Gauge,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        GatewayMetrics::new(None)
    }
}

impl GatewayMetrics {
    /// A registry with every metric; with `audit`, its written and dropped
    /// counts are exported too.
    pub fn new(audit: Option<Arc<AuditLog>>) -> GatewayMetrics {
        let mut registry = Registry::default();
        // 100 µs to ~6.5 s: a gateway's own overhead and its upstreams both fit.
        let duration = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 17))
        });
        let requests = Family::<Labels, Counter>::default();
        let errors = Family::<Labels, Counter>::default();
        let (auth_failures, rate_limited, upstream_errors, in_flight) = (
            Counter::default(),
            Counter::default(),
            Counter::default(),
            Gauge::default(),
        );
        registry.register(
            "http_server_request_duration_seconds",
            "Duration of HTTP server requests",
            duration.clone(),
        );
        registry.register(
            "http_server_requests",
            "HTTP requests served",
            requests.clone(),
        );
        registry.register(
            "http_server_errors",
            "HTTP requests answered with a 5xx status",
            errors.clone(),
        );
        registry.register(
            "gateway_auth_failures",
            "Requests refused for missing or invalid credentials (401)",
            auth_failures.clone(),
        );
        registry.register(
            "gateway_rate_limited",
            "Requests refused by a rate limit (429)",
            rate_limited.clone(),
        );
        registry.register(
            "gateway_upstream_errors",
            "Requests that failed upstream (502, 503, 504)",
            upstream_errors.clone(),
        );
        registry.register(
            "http_server_active_requests",
            "Requests in flight",
            in_flight.clone(),
        );
        if let Some(audit) = audit {
            registry.register_collector(Box::new(AuditCollector(audit)));
        }
        GatewayMetrics {
            series: parking_lot::RwLock::default(),
            registry,
            duration,
            requests,
            errors,
            auth_failures,
            rate_limited,
            upstream_errors,
            in_flight,
        }
    }

    /// The OpenMetrics text exposition, for `GET /metrics`.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        text
    }

    fn observe(&self, method: &Method, route: &str, status: u16, seconds: f64) {
        let method = method_label(method);
        let known = self.series.read().get(route).and_then(|series| {
            series
                .iter()
                .find(|s| s.method == method && s.status == status)
                .cloned()
        });
        let series = known.unwrap_or_else(|| self.resolve(method, route, status));
        series.duration.observe(seconds);
        series.requests.inc();
        if status >= 500 {
            let labels: Labels = [
                ("http_request_method", method.to_owned()),
                ("http_route", route.to_owned()),
                ("http_response_status_code", status_label(status)),
            ];
            self.errors.get_or_create(&labels).inc();
        }
        match status {
            401 => {
                self.auth_failures.inc();
            }
            429 => {
                self.rate_limited.inc();
            }
            502..=504 => {
                self.upstream_errors.inc();
            }
            _ => {}
        }
    }
}

/// The status code's digits, without the formatting machinery for the
/// codes that exist.
fn status_label(status: u16) -> String {
    http::StatusCode::from_u16(status)
        .map_or_else(|_| status.to_string(), |code| code.as_str().to_owned())
}

impl GatewayMetrics {
    /// The series of (`method`, `route`, `status`), created in the families
    /// and remembered on first use.
    fn resolve(&self, method: &'static str, route: &str, status: u16) -> Series {
        let labels: Labels = [
            ("http_request_method", method.to_owned()),
            ("http_route", route.to_owned()),
            ("http_response_status_code", status_label(status)),
        ];
        let series = Series {
            method,
            status,
            duration: self.duration.get_or_create(&labels).clone(),
            requests: self.requests.get_or_create(&labels).clone(),
        };
        let mut known = self.series.write();
        let of_route = known.entry(route.to_owned()).or_default();
        if !of_route
            .iter()
            .any(|s| s.method == method && s.status == status)
        {
            of_route.push(series.clone());
        }
        series
    }
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "_OTHER",
    }
}

#[derive(Debug)]
struct AuditCollector(Arc<AuditLog>);

impl Collector for AuditCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let stats = self.0.stats();
        let written = ConstCounter::new(stats.written);
        written.encode(encoder.encode_descriptor(
            "gateway_audit_written",
            "Audit records written",
            None,
            written.metric_type(),
        )?)?;
        let dropped = ConstCounter::new(stats.dropped);
        dropped.encode(encoder.encode_descriptor(
            "gateway_audit_dropped",
            "Audit records dropped (queue full or write failed)",
            None,
            dropped.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Records [`GatewayMetrics`] for every request; put it outermost.
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    metrics: Arc<GatewayMetrics>,
}

impl MetricsLayer {
    /// Records into `metrics`.
    pub fn new(metrics: Arc<GatewayMetrics>) -> MetricsLayer {
        MetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// The service of [`MetricsLayer`].
#[derive(Debug, Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<GatewayMetrics>,
}

/// Decrements the in-flight gauge however the request ends (even if the
/// future is dropped).
#[derive(Debug)]
struct InFlight(Arc<GatewayMetrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

impl<S, B, ResBody> tower::Service<Request<B>> for MetricsService<S>
where
    S: tower::Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let method = request.method().clone();
        self.metrics.in_flight.inc();
        let in_flight = InFlight(Arc::clone(&self.metrics));
        let started = Instant::now();
        MetricsFuture {
            future: self.inner.call(request),
            method,
            started,
            in_flight,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`MetricsService`]: observes the request when
    /// the response is ready; a request dropped before that (the client went
    /// away) leaves only the in-flight gauge, decremented.
    #[derive(Debug)]
    pub struct MetricsFuture<F> {
        #[pin]
        future: F,
        method: Method,
        started: Instant,
        in_flight: InFlight,
    }
}

impl<F, ResBody, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.future.poll(cx));
        let status = match &result {
            Ok(response) => response.status().as_u16(),
            Err(_) => 500,
        };
        let route = result
            .as_ref()
            .ok()
            .and_then(|r| r.extensions().get::<MatchedRoute>())
            .map_or("unmatched", |r| r.0.as_str());
        let metrics = &this.in_flight.0;
        metrics.observe(
            this.method,
            route,
            status,
            this.started.elapsed().as_secs_f64(),
        );
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads resolving and counting the same few series at once: every
    /// observation lands once, in its own series.
    #[test]
    fn concurrent_observations_all_land_in_their_series() {
        let metrics = Arc::new(GatewayMetrics::default());
        let (threads, each) = (4, 2_000);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                let metrics = Arc::clone(&metrics);
                scope.spawn(move || {
                    for i in 0..each {
                        let (route, status) = match i % 3 {
                            0 => ("/v1/a", 200),
                            1 => ("/v1/a", 404),
                            _ => ("/v1/b", 200),
                        };
                        metrics.observe(&Method::GET, route, status, 0.001);
                    }
                });
            }
        });
        let text = metrics.encode();
        let count = |route: &str, status: &str| -> u64 {
            text.lines()
                .find(|l| {
                    l.starts_with("http_server_requests_total{")
                        && l.contains(&format!("http_route=\"{route}\""))
                        && l.contains(&format!("http_response_status_code=\"{status}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .map_or(0, |v| v.parse().unwrap())
        };
        let per_series = |share: u64| share * threads as u64;
        assert_eq!(count("/v1/a", "200"), per_series(667), "{text}");
        assert_eq!(count("/v1/a", "404"), per_series(667), "{text}");
        assert_eq!(count("/v1/b", "200"), per_series(666), "{text}");
        assert_eq!(metrics.series.read().len(), 2);
    }
}

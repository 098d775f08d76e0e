//! Prometheus / OpenMetrics exposition of a `prometheus-client` registry.

use http::{Response, StatusCode};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::error::ApiError;
use crate::response::{Body, with_type};

/// The content type of the OpenMetrics text format that
/// [`prometheus_client::encoding::text::encode`] writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `registry` encoded as OpenMetrics text.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

/// `registry` as a `200` OpenMetrics response, or a 500 `internal` error
/// (logged) if a collector fails to encode.
pub fn response(registry: &Registry) -> Response<Body> {
    match encode(registry) {
        Ok(text) => with_type(StatusCode::OK, text, CONTENT_TYPE),
        Err(e) => {
            tracing::error!(error = %e, "encoding metrics failed");
            ApiError::internal().into_response()
        }
    }
}

/// Writes one unlabelled counter read at scrape time (for a
/// [`Collector`](prometheus_client::collector::Collector) that exports
/// counts kept elsewhere): `name` gets the `_total` suffix.
pub fn encode_counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let counter = ConstCounter::new(value);
    counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
}

/// Writes one unlabelled gauge read at scrape time (see
/// [`encode_counter`]).
pub fn encode_gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::collector::Collector;
    use prometheus_client::metrics::counter::Counter;

    #[derive(Debug)]
    struct Fixed;

    impl Collector for Fixed {
        fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
            encode_counter(&mut encoder, "demo_done", "Done", 7)?;
            encode_gauge(&mut encoder, "demo_open", "Open", -2)
        }
    }

    #[test]
    fn collected_values_encode_as_counter_and_gauge() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Fixed));
        let text = encode(&registry).unwrap();
        assert!(text.contains("# TYPE demo_done counter"), "{text}");
        assert!(text.contains("demo_done_total 7"), "{text}");
        assert!(text.contains("# TYPE demo_open gauge"), "{text}");
        assert!(text.contains("demo_open -2"), "{text}");
    }

    #[test]
    fn a_registry_encodes_with_the_openmetrics_type() {
        let mut registry = Registry::default();
        let counter = Counter::<u64>::default();
        registry.register("demo_requests", "Requests", counter.clone());
        counter.inc();
        let response = response(&registry);
        assert_eq!(response.headers()["content-type"], CONTENT_TYPE);
        let text = encode(&registry).unwrap();
        assert!(text.contains("demo_requests_total 1"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}

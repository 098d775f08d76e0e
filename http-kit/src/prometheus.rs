//! Prometheus / OpenMetrics exposition of a `prometheus-client` registry.

use http::{Response, StatusCode};
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

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

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

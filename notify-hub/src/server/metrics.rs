//! Prometheus metrics of a notify server (prometheus-client).

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::Hub;

/// The metrics `GET /metrics` serves:
///
/// | name | type | meaning |
/// |---|---|---|
/// | `notify_connections` | gauge | open WebSocket connections on this node |
/// | `notify_delivered_total` | counter | notifications handed to connections |
/// | `notify_written_through_total` | counter | of those, live group items written straight to the socket by the dispatcher (ADR 0027) |
/// | `notify_dropped_connections_total` | counter | connections closed as slow consumers |
/// | `notify_sends_total`, `notify_send_errors_total` | counters | sends stored / failed |
/// | `notify_broker_errors_total` | counter | publishes that failed after commit |
/// | `notify_store_batches_total` | counter | group-commit transactions |
/// | `notify_delivery_latency_seconds` | histogram | notification timestamp to frame written (live deliveries only) |
#[derive(Debug)]
pub struct ServerMetrics {
    registry: Registry,
    /// Delivery latency, observed when a frame has been written.
    latency: Histogram,
    /// The hub's clock, which latencies are measured by.
    clock: time_kit::SharedClock,
}

#[derive(Debug)]
struct HubCollector(Hub);

impl Collector for HubCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let stats = self.0.stats();
        http_kit::prometheus::encode_gauge(
            &mut encoder,
            "notify_connections",
            "Open WebSocket connections on this node",
            i64::try_from(stats.connections()).unwrap_or(i64::MAX),
        )?;
        for (name, help, value) in [
            (
                "notify_delivered",
                "Notifications handed to connections",
                stats.delivered(),
            ),
            (
                "notify_written_through",
                "Live group items written straight to a connection's socket by the dispatcher",
                stats.written_through(),
            ),
            (
                "notify_dropped_connections",
                "Connections closed as slow consumers",
                stats.overflowed(),
            ),
            ("notify_sends", "Sends stored", stats.sends()),
            (
                "notify_send_errors",
                "Sends that failed in the store",
                stats.send_errors(),
            ),
            (
                "notify_broker_errors",
                "Publishes that failed after commit",
                stats.broker_errors(),
            ),
            (
                "notify_store_batches",
                "Group-commit store transactions",
                stats.batches(),
            ),
        ] {
            http_kit::prometheus::encode_counter(&mut encoder, name, help, value)?;
        }
        Ok(())
    }
}

impl ServerMetrics {
    pub(crate) fn new(hub: Hub) -> Arc<ServerMetrics> {
        let mut registry = Registry::default();
        // 0.5 ms .. ~16 s.
        let latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "notify_delivery_latency_seconds",
            "From the notification's timestamp to its frame being written",
            latency.clone(),
        );
        let clock = hub.config().clock.clone();
        registry.register_collector(Box::new(HubCollector(hub)));
        Arc::new(ServerMetrics {
            registry,
            latency,
            clock,
        })
    }

    /// Observes a live delivery's latency: from the notification's
    /// timestamp to now, by the hub's clock, in integer nanoseconds
    /// (chrono's duration arithmetic showed in the fan-out's profile).
    pub(crate) fn observe_delivery(&self, timestamp: Option<chrono::DateTime<chrono::Utc>>) {
        if let Some(sent_ns) = timestamp.and_then(|ts| ts.timestamp_nanos_opt()) {
            let latency_ns = time_kit::unix_nanos(self.clock.now())
                .saturating_sub(sent_ns)
                .max(0);
            self.latency.observe(latency_ns as f64 / 1e9);
        }
    }

    /// The OpenMetrics text exposition (empty if a collector fails, logged).
    pub fn encode(&self) -> String {
        http_kit::prometheus::encode(&self.registry).unwrap_or_else(|e| {
            tracing::error!(error = %e, "encoding metrics failed");
            String::new()
        })
    }

    /// `GET /metrics`.
    pub(crate) fn response(&self) -> http::Response<http_kit::Body> {
        http_kit::prometheus::response(&self.registry)
    }
}

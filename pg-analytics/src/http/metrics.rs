//! `/metrics`: requests, ingest outcomes, dashboard latency, the cache's
//! counters, the pool and the default partition (names in
//! `docs/pg-analytics/API.md`).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::cache::DashboardCache;
use crate::postgres::{Analytics, IngestReport, Rejected};

pub(super) struct Metrics {
    pub(super) registry: Registry,
    pub(super) requests: Family<[(&'static str, String); 2], Counter>,
    pub(super) batches: Family<[(&'static str, &'static str); 1], Counter>,
    rows: Family<[(&'static str, &'static str); 1], Counter>,
    pub(super) dashboard_seconds: Histogram,
    pub(super) default_partition_rows: Gauge,
}

impl Metrics {
    pub(super) fn new(store: &Analytics, cache: Option<&DashboardCache>) -> Metrics {
        let mut registry = Registry::default();
        let metrics = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            batches: Family::default(),
            rows: Family::default(),
            dashboard_seconds: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            default_partition_rows: Gauge::default(),
        };
        registry.register(
            "pg_analytics_http_requests",
            "HTTP requests served, by route and status",
            metrics.requests.clone(),
        );
        registry.register(
            "pg_analytics_ingest_batches",
            "POST /v1/events batches, by outcome (committed, replayed, failed)",
            metrics.batches.clone(),
        );
        registry.register(
            "pg_analytics_ingest_rows",
            "Rows of committed batches, by outcome (accepted, or the rejection code)",
            metrics.rows.clone(),
        );
        registry.register(
            "pg_analytics_dashboard_seconds",
            "Time to answer GET /v1/dashboard (cache included)",
            metrics.dashboard_seconds.clone(),
        );
        registry.register(
            "pg_analytics_default_partition_rows",
            "Rows in the default partition (months without a partition), as of the last maintenance pass",
            metrics.default_partition_rows.clone(),
        );
        registry.register_collector(Box::new(StoreCollector {
            store: store.clone(),
            cache: cache.cloned(),
        }));
        Metrics {
            registry,
            ..metrics
        }
    }

    pub(super) fn count_batch(&self, report: &IngestReport, rejected: &[Rejected]) {
        let outcome = if report.replayed {
            "replayed"
        } else {
            "committed"
        };
        self.batches.get_or_create(&[("outcome", outcome)]).inc();
        if report.replayed {
            return;
        }
        self.rows
            .get_or_create(&[("outcome", "accepted")])
            .inc_by(report.accepted as u64);
        for r in rejected {
            self.rows.get_or_create(&[("outcome", r.code)]).inc();
        }
    }
}

/// Reads the pool's state and the cache's counters at scrape time.
#[derive(Debug)]
struct StoreCollector {
    store: Analytics,
    cache: Option<DashboardCache>,
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let state = self.store.pool().state();
        let stats = state.statistics;
        let gauges = [
            (
                "pg_analytics_pool_connections",
                "Connections the pool holds (idle and in use)",
                i64::from(state.connections),
            ),
            (
                "pg_analytics_pool_idle_connections",
                "Idle connections in the pool",
                i64::from(state.idle_connections),
            ),
        ];
        for (name, help, value) in gauges {
            http_kit::prometheus::encode_gauge(&mut encoder, name, help, value)?;
        }
        let mut counters = vec![
            (
                "pg_analytics_pool_gets_direct",
                "Connection checkouts served at once",
                stats.get_direct,
            ),
            (
                "pg_analytics_pool_gets_waited",
                "Connection checkouts that waited for a connection",
                stats.get_waited,
            ),
            (
                "pg_analytics_pool_gets_timed_out",
                "Connection checkouts that timed out",
                stats.get_timed_out,
            ),
            (
                "pg_analytics_pool_connections_created",
                "Connections opened",
                stats.connections_created,
            ),
            (
                "pg_analytics_pool_connections_closed_broken",
                "Connections discarded as broken",
                stats.connections_closed_broken,
            ),
        ];
        if let Some(cache) = &self.cache {
            let c = cache.stats();
            counters.extend([
                (
                    "pg_analytics_cache_hits",
                    "Dashboard reads answered from Redis",
                    c.hits,
                ),
                (
                    "pg_analytics_cache_misses",
                    "Dashboard reads with no value for the current generation",
                    c.misses,
                ),
                (
                    "pg_analytics_cache_recomputations",
                    "Dashboards computed from PostgreSQL and stored",
                    c.recomputations,
                ),
                (
                    "pg_analytics_cache_early_refreshes",
                    "Recomputations started early by XFetch",
                    c.early_refreshes,
                ),
                (
                    "pg_analytics_cache_redis_failures",
                    "Redis calls that failed or timed out (the outage counter)",
                    c.redis_failures,
                ),
                (
                    "pg_analytics_cache_fallthroughs",
                    "Dashboard reads answered from PostgreSQL because Redis failed",
                    c.fallthroughs,
                ),
                (
                    "pg_analytics_cache_invalidations",
                    "Batches whose generations were bumped",
                    c.invalidations,
                ),
                (
                    "pg_analytics_cache_invalidation_failures",
                    "Generation bumps that failed",
                    c.invalidation_failures,
                ),
            ]);
        }
        for (name, help, value) in counters {
            http_kit::prometheus::encode_counter(&mut encoder, name, help, value)?;
        }
        Ok(())
    }
}

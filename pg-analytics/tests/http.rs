//! The HTTP adapter against real PostgreSQL (and Redis for the cached
//! routes): NDJSON ingest with its refusals, idempotent retries, the
//! dashboard's parameters, probes, metrics, and a database outage.
#![cfg(feature = "server")]

mod support;

use bytes::Bytes;
use chrono::{TimeDelta, Utc};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use pg_analytics::cache::{CacheConfig, DashboardCache};
use pg_analytics::http::{AnalyticsHttpConfig, AnalyticsService};
use pg_analytics::{Analytics, Plan, WriterConfig};
use serde_json::Value;
use testkit::{TestDatabase, TestRedis};
use tower::ServiceExt;

async fn store(db: &TestDatabase) -> Analytics {
    support::with_tenants(db, &[(1, Plan::Enterprise), (2, Plan::Pro)]).await
}

fn line(tenant: i64, ms: f64) -> String {
    serde_json::json!({
        "tenant_id": tenant,
        "created_at": (Utc::now() - TimeDelta::minutes(1)).to_rfc3339(),
        "event_type": "login",
        "processing_time_ms": ms,
    })
    .to_string()
}

fn post() -> http::request::Builder {
    Request::builder()
        .method(Method::POST)
        .uri("/v1/events")
        .header("content-type", "application/x-ndjson")
}

async fn call(service: &AnalyticsService, request: Request<Full<Bytes>>) -> (StatusCode, Value) {
    let response = service.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

async fn send(service: &AnalyticsService, body: &str) -> (StatusCode, Value) {
    call(
        service,
        post()
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn a_batch_is_accepted_line_by_line_with_each_refusal_coded() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = store(&db).await;
    let service = AnalyticsService::new(store.clone(), None, AnalyticsHttpConfig::default());
    let future = serde_json::json!({
        "tenant_id": 1,
        "created_at": (Utc::now() + TimeDelta::days(2)).to_rfc3339(),
        "event_type": "login",
        "processing_time_ms": 1.0,
    })
    .to_string();
    let body = [
        line(1, 10.0),
        String::new(),
        line(99, 1.0),
        "{not json".into(),
        line(1, -5.0),
        future,
        line(2, 20.5),
    ]
    .join("\n");
    let (status, reply) = send(&service, &body).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["accepted"], 2);
    assert_eq!(reply["replayed"], false);
    let rejected: Vec<(u64, String)> = reply["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap(),
                r["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        rejected,
        vec![
            (2, "unknown_tenant".to_owned()),
            (3, "malformed_row".to_owned()),
            (4, "negative_processing_time".to_owned()),
            (5, "too_far_in_future".to_owned()),
        ]
    );
    let conn = store.pool().get().await.unwrap();
    let rows: i64 = conn
        .query_one("SELECT count(*) FROM analytics.events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 2, "only the good lines were written");
}

#[tokio::test]
async fn a_retry_with_the_same_idempotency_key_is_written_once() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = store(&db).await;
    let service = AnalyticsService::new(store.clone(), None, AnalyticsHttpConfig::default());
    let body = [line(1, 1.0), line(1, 2.0), line(2, 3.0)].join("\n");
    let key = uuid::Uuid::now_v7().to_string();
    let request = || {
        post()
            .header("idempotency-key", &key)
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap()
    };
    let (status, first) = call(&service, request()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (first["accepted"].as_u64(), first["replayed"].as_bool()),
        (Some(3), Some(false))
    );
    let (status, second) = call(&service, request()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (second["accepted"].as_u64(), second["replayed"].as_bool()),
        (Some(3), Some(true))
    );
    assert_eq!(first["batch_id"], second["batch_id"]);
    let conn = store.pool().get().await.unwrap();
    let rows: i64 = conn
        .query_one("SELECT count(*) FROM analytics.events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 3);

    let (status, reply) = call(
        &service,
        post()
            .header("idempotency-key", "not-a-uuid")
            .body(Full::new(Bytes::from(line(1, 1.0))))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(reply["error"], "invalid_idempotency_key");
}

#[tokio::test]
async fn an_idempotency_key_reused_for_another_batch_is_422() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = store(&db).await;
    let service = AnalyticsService::new(store.clone(), None, AnalyticsHttpConfig::default());
    let key = uuid::Uuid::now_v7().to_string();
    let request = |body: String| {
        post()
            .header("idempotency-key", &key)
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    let (status, _) = call(&service, request(line(1, 1.0))).await;
    assert_eq!(status, StatusCode::OK);
    let (status, reply) = call(&service, request(line(1, 2.0))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reply}");
    assert_eq!(reply["error"], "idempotency_key_reused");
    let conn = store.pool().get().await.unwrap();
    let rows: i64 = conn
        .query_one("SELECT count(*) FROM analytics.events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn bodies_that_are_not_batches_are_refused_whole() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = store(&db).await;
    let service = AnalyticsService::new(
        store.clone(),
        None,
        AnalyticsHttpConfig::default()
            .with_max_body_bytes(4_096)
            .with_writer(WriterConfig::default().with_max_batch_rows(3)),
    );
    // Wrong media type.
    let (status, reply) = call(
        &service,
        Request::post("/v1/events")
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(line(1, 1.0))))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(reply["error"], "unsupported_media_type");
    // Too large.
    let big = vec![line(1, 1.0); 100].join("\n");
    let (status, reply) = send(&service, &big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply["error"], "body_too_large");
    // Too many rows.
    let four = vec![line(1, 1.0); 4].join("\n");
    let (status, reply) = send(&service, &four).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply["error"], "too_many_rows");
    // Wrong method, unknown route.
    let (status, reply) = call(
        &service,
        Request::get("/v1/events")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply["error"], "method_not_allowed");
    let (status, _) = call(
        &service,
        Request::get("/v1/nothing")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let conn = store.pool().get().await.unwrap();
    let rows: i64 = conn
        .query_one("SELECT count(*) FROM analytics.events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "nothing of a refused body is written");
}

#[tokio::test]
async fn the_dashboard_checks_its_parameters_and_answers_from_the_cache() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let store = store(&db).await;
    let client = redis_kit::RedisSetup::new(redis.url())
        .connect()
        .await
        .unwrap();
    let cache = DashboardCache::new(
        store.clone(),
        client,
        CacheConfig::default().with_key_prefix(redis.prefix()),
    )
    .unwrap();
    let service = AnalyticsService::new(
        store.clone(),
        Some(cache.clone()),
        AnalyticsHttpConfig::default(),
    );
    let get = |uri: &str| Request::get(uri).body(Full::new(Bytes::new())).unwrap();
    for (uri, code) in [
        ("/v1/dashboard?since=2024-01-01", "missing_parameter"),
        ("/v1/dashboard?plan=enterprise", "missing_parameter"),
        ("/v1/dashboard?plan=gold&since=2024-01-01", "invalid_plan"),
        ("/v1/dashboard?plan=pro&since=2024-13-01", "invalid_since"),
        ("/v1/dashboard?plan=pro&since=yesterday", "invalid_since"),
    ] {
        let (status, reply) = call(&service, get(uri)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(reply["error"], code, "{uri}");
    }
    let (status, _) = send(&service, &[line(1, 10.0), line(1, 30.0)].join("\n")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, reply) = call(
        &service,
        get("/v1/dashboard?plan=enterprise&since=2024-01-01"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply["plan"], "enterprise");
    assert_eq!(reply["since"], "2024-01-01");
    let rows = reply["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{reply}");
    assert_eq!(rows[0]["tenant_id"], 1);
    assert_eq!(rows[0]["events"], 2);
    assert_eq!(rows[0]["sum_processing_time_us"], 40_000);
    assert_eq!(rows[0]["avg_processing_time_ms"], 20.0);
    // A write through the service is in the next read.
    send(&service, &line(1, 50.0)).await;
    let (_, reply) = call(
        &service,
        get("/v1/dashboard?plan=enterprise&since=2024-01-01"),
    )
    .await;
    assert_eq!(reply["rows"][0]["events"], 3);
    let stats = cache.stats();
    assert_eq!(stats.invalidations, 2, "{stats:?}");

    let (status, text) = call(&service, get("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str().unwrap().to_owned();
    for name in [
        "pg_analytics_http_requests_total",
        "pg_analytics_ingest_batches_total",
        "pg_analytics_ingest_rows_total",
        "pg_analytics_dashboard_seconds_bucket",
        "pg_analytics_default_partition_rows",
        "pg_analytics_pool_connections",
        "pg_analytics_pool_gets_timed_out_total",
        "pg_analytics_cache_hits_total",
        "pg_analytics_cache_redis_failures_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    assert!(
        text.contains("pg_analytics_ingest_rows_total{outcome=\"accepted\"} 3"),
        "{text}"
    );
}

#[tokio::test]
async fn a_token_is_required_when_configured() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = store(&db).await;
    let service = AnalyticsService::new(
        store,
        None,
        AnalyticsHttpConfig::default().with_api_token("s3cret-token"),
    );
    let dashboard = |auth: Option<&str>| {
        let mut r = Request::get("/v1/dashboard?plan=pro&since=2024-01-01");
        if let Some(auth) = auth {
            r = r.header("authorization", auth);
        }
        r.body(Full::new(Bytes::new())).unwrap()
    };
    let (status, reply) = call(&service, dashboard(None)).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("missing_token"))
    );
    let (status, reply) = call(&service, dashboard(Some("Bearer wrong"))).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_token"))
    );
    let (status, _) = call(&service, dashboard(Some("Bearer s3cret-token"))).await;
    assert_eq!(status, StatusCode::OK);
    // Probes need no token.
    let (status, _) = call(
        &service,
        Request::get("/healthz")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_database_outage_is_503_and_readyz_says_so() {
    // A pool on a port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let pool = pg_kit::pool(
        &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        &pg_kit::PoolConfig {
            connection_timeout: std::time::Duration::from_millis(300),
            ..pg_kit::PoolConfig::default()
        },
    )
    .unwrap();
    let store = Analytics::new(pool, time_kit::system());
    let service = AnalyticsService::new(store, None, AnalyticsHttpConfig::default());
    let (status, reply) = send(&service, &line(1, 1.0)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
    assert_eq!(reply["error"], "unavailable");
    let (status, reply) = call(
        &service,
        Request::get("/v1/dashboard?plan=pro&since=2024-01-01")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
    let (status, reply) = call(
        &service,
        Request::get("/readyz")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply["error"], "not_ready");
    assert_eq!(reply["dependency"], "postgres");
}

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tower::{Layer, ServiceExt};

use super::*;
use crate::audit::{AuditEntry, Outcome};
use crate::jwt::{JwtConfig, KeySet, VerifyingKey};
use crate::ratelimit::Quota;
use crate::rbac::{PolicyConfig, RoleDef, RouteRule};

const SECRET: &[u8] = b"http-layer-test-secret-0123456789ab";

use super::test_support::Recorder;

fn token(sub: &str, roles: &[&str]) -> String {
    super::test_support::token(SECRET, sub, roles)
}

fn parts(audit: Recorder) -> GatewayParts {
    let verifier = JwtVerifier::new(
        KeySet::new()
            .with_key(VerifyingKey::hs256("k1", SECRET))
            .unwrap(),
        JwtConfig::default(),
    );
    let policy = PolicyConfig::default()
        .role("reader", RoleDef::new(["orders:read"]))
        .role(
            "writer",
            RoleDef::new(["orders:write"]).inherits(["reader"]),
        )
        .rule(RouteRule::new("GET", "/v1/orders/{id}", "orders:read"))
        .rule(RouteRule::new("POST", "/v1/orders", "orders:write"))
        .compile()
        .unwrap();
    GatewayParts::new(verifier, policy)
        .with_api_keys(ApiKeys::new().with_key(
            "billing-service",
            "ak_live_0123456789",
            vec!["reader".into()],
        ))
        .with_limits(RateLimits::new(Quota::per_minute(3), Quota::per_minute(5)))
        .with_audit(audit)
}

/// An upstream that echoes what the layers inserted.
async fn upstream(request: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let principal = request
        .extensions()
        .get::<Principal>()
        .map(|p| p.id.clone());
    let route = request
        .extensions()
        .get::<MatchedRoute>()
        .map(|r| r.0.clone());
    let body = json!({"principal": principal, "route": route}).to_string();
    Ok(Response::new(Full::new(Bytes::from(body))))
}

async fn send(
    service: impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<GatewayBody>,
        Error = Infallible,
    >,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
) -> (StatusCode, http::HeaderMap, Value) {
    let mut request = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        request = request.header(*k, v);
    }
    let response = service
        .oneshot(request.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn bearer(t: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {t}"))
}

#[tokio::test]
async fn an_authorized_request_reaches_upstream_with_principal_and_route() {
    let gw = Gateway::new(parts(Recorder::default())).wrap(tower::service_fn(upstream));
    let (status, headers, body) = send(
        gw,
        "GET",
        "/v1/orders/42",
        &[bearer(&token("alice", &["reader"]))],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"principal": "alice", "route": "/v1/orders/{id}"})
    );
    assert_eq!(headers["ratelimit-policy"], "\"user\";q=3;w=60");
    assert_eq!(headers["ratelimit"], "\"user\";r=2;t=20");
}

#[tokio::test]
async fn missing_and_bad_credentials_are_401_with_a_challenge() {
    let audit = Recorder::default();
    let gw = Gateway::new(parts(audit.clone())).wrap(tower::service_fn(upstream));
    let (status, headers, body) = send(gw.clone(), "GET", "/v1/orders/1", &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["www-authenticate"], "Bearer");
    assert_eq!(body["error"], "missing_credentials");
    let (status, headers, body) =
        send(gw.clone(), "GET", "/v1/orders/1", &[bearer("not.a.token")]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        headers["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    assert_eq!(body["error"], "invalid_token");
    let (status, _, body) = send(gw, "GET", "/v1/orders/1", &[("x-api-key", "wrong".into())]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_api_key"))
    );
    let expected: Vec<AuditEntry> = ["missing_credentials", "invalid_token", "invalid_api_key"]
        .into_iter()
        .map(|reason| AuditEntry::new("auth.authenticate", Outcome::Failure).reason(reason))
        .collect();
    assert_eq!(*audit.0.lock(), expected);
}

#[tokio::test]
async fn a_missing_permission_is_403_and_an_unknown_route_404() {
    let audit = Recorder::default();
    let gw = Gateway::new(parts(audit.clone())).wrap(tower::service_fn(upstream));
    let reader = token("alice", &["reader"]);
    let (status, _, body) = send(
        gw.clone(),
        "POST",
        "/v1/orders",
        &[bearer(&reader), ("x-request-id", "req-7".into())],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"], "forbidden");
    assert_eq!(body["message"], "missing permission orders:write");
    let (status, _, _) = send(gw.clone(), "DELETE", "/v1/orders/1", &[bearer(&reader)]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = send(
        gw,
        "POST",
        "/v1/orders",
        &[bearer(&token("bob", &["writer"]))],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "inherited roles grant");
    let entries = audit.0.lock();
    assert_eq!(
        entries[0],
        AuditEntry::new("authz.check", Outcome::Denied)
            .who("alice")
            .reason("forbidden")
            .route("POST /v1/orders")
            .request_id("req-7")
    );
}

#[tokio::test]
async fn api_keys_authenticate_and_have_their_own_quota() {
    let gw = Gateway::new(parts(Recorder::default())).wrap(tower::service_fn(upstream));
    let key = ("x-api-key", "ak_live_0123456789".to_owned());
    let (status, headers, body) = send(gw, "GET", "/v1/orders/9", std::slice::from_ref(&key)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["principal"], "billing-service");
    assert_eq!(headers["ratelimit-policy"], "\"api_key\";q=5;w=60");
}

#[tokio::test]
async fn over_quota_is_429_with_retry_after_and_audited() {
    let audit = Recorder::default();
    let gw = Gateway::new(parts(audit.clone())).wrap(tower::service_fn(upstream));
    let t = token("carol", &["reader"]);
    for _ in 0..3 {
        assert_eq!(
            send(gw.clone(), "GET", "/v1/orders/1", &[bearer(&t)])
                .await
                .0,
            StatusCode::OK
        );
    }
    let (status, headers, body) = send(gw.clone(), "GET", "/v1/orders/1", &[bearer(&t)]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(headers["retry-after"], "20");
    assert_eq!(headers["ratelimit"], "\"user\";r=0;t=60");
    // Another user is unaffected.
    assert_eq!(
        send(
            gw,
            "GET",
            "/v1/orders/1",
            &[bearer(&token("dave", &["reader"]))]
        )
        .await
        .0,
        StatusCode::OK
    );
    let entries = audit.0.lock();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0],
        AuditEntry::new("ratelimit.check", Outcome::Denied)
            .who("carol")
            .reason("user")
            .route("/v1/orders/{id}")
    );
}

#[tokio::test]
async fn each_layer_works_alone() {
    let p = parts(Recorder::default());
    let auth_only = AuthLayer::new(Arc::clone(&p.verifier), Arc::new(NoAudit))
        .layer(tower::service_fn(upstream));
    let (status, _, body) = send(
        auth_only,
        "DELETE",
        "/anything",
        &[bearer(&token("erin", &[]))],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["principal"], "erin");
    // Authorization without authentication in front refuses rather than allows.
    let authz_only = AuthzLayer::new(Arc::clone(&p.policy), Arc::new(NoAudit))
        .layer(tower::service_fn(upstream));
    assert_eq!(
        send(authz_only, "GET", "/v1/orders/1", &[]).await.0,
        StatusCode::UNAUTHORIZED
    );
}

/// The anonymous path: client IP from the peer and trusted proxies, one quota
/// per IPv4 address or IPv6 /64.
async fn anonymous(
    service: &(
         impl tower::Service<Request<Full<Bytes>>, Response = Response<GatewayBody>, Error = Infallible>
         + Clone
     ),
    peer: &str,
    xff: Option<&str>,
) -> StatusCode {
    let mut request = Request::get("/auth/token");
    if let Some(x) = xff {
        request = request.header("x-forwarded-for", x);
    }
    let mut request = request.body(Full::new(Bytes::new())).unwrap();
    request
        .extensions_mut()
        .insert(PeerAddr(format!("{peer}:40000").parse().unwrap()));
    service.clone().oneshot(request).await.unwrap().status()
}

#[tokio::test]
async fn anonymous_requests_are_limited_per_client_ip_and_ipv6_slash_64() {
    use crate::client_ip::TrustedProxies;
    let audit = Recorder::default();
    let limits = Arc::new(RateLimits::default().with_anonymous(Quota::per_minute(2)));
    let rate =
        RateLimitLayer::new(limits, Arc::new(audit.clone())).layer(tower::service_fn(upstream));
    let service = ClientIpLayer::new(TrustedProxies::parse(["10.0.0.0/8"]).unwrap()).layer(rate);

    // Two addresses of one IPv6 /64 share a quota; another /64 has its own.
    assert_eq!(
        anonymous(&service, "[2001:db8:1:2::1]", None).await,
        StatusCode::OK
    );
    assert_eq!(
        anonymous(&service, "[2001:db8:1:2::ffff]", None).await,
        StatusCode::OK
    );
    assert_eq!(
        anonymous(&service, "[2001:db8:1:2::7]", None).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        anonymous(&service, "[2001:db8:1:3::1]", None).await,
        StatusCode::OK
    );

    // Behind a trusted proxy the forwarded client is limited, not the proxy;
    // a forged leftmost entry does not buy a fresh quota.
    for forged in ["1.1.1.1", "2.2.2.2"] {
        let xff = format!("{forged}, 198.51.100.7");
        assert_eq!(
            anonymous(&service, "10.0.0.5", Some(&xff)).await,
            StatusCode::OK
        );
    }
    assert_eq!(
        anonymous(&service, "10.0.0.5", Some("3.3.3.3, 198.51.100.7")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        anonymous(&service, "10.0.0.5", Some("198.51.100.8")).await,
        StatusCode::OK
    );
    // An untrusted peer's header is ignored: the peer itself is the client.
    assert_eq!(
        anonymous(&service, "203.0.113.1", Some("198.51.100.9")).await,
        StatusCode::OK
    );
    assert_eq!(
        anonymous(&service, "203.0.113.1", Some("198.51.100.10")).await,
        StatusCode::OK
    );
    assert_eq!(
        anonymous(&service, "203.0.113.1", Some("198.51.100.11")).await,
        StatusCode::TOO_MANY_REQUESTS
    );

    let entries = audit.0.lock();
    assert_eq!(entries.len(), 3);
    assert_eq!(
        entries[1],
        AuditEntry::new("ratelimit.check", Outcome::Denied)
            .who("198.51.100.7")
            .reason("ip")
            .client_ip("198.51.100.7")
    );
}

#[tokio::test]
async fn metrics_parse_with_an_openmetrics_parser_and_use_route_templates() {
    use openmetrics_parser::OpenMetricsValue;

    let metrics = Arc::new(GatewayMetrics::default());
    let gw = MetricsLayer::new(Arc::clone(&metrics))
        .layer(Gateway::new(parts(Recorder::default())).wrap(tower::service_fn(upstream)));
    let reader = token("alice", &["reader"]);
    for id in 1..=3 {
        assert_eq!(
            send(
                gw.clone(),
                "GET",
                &format!("/v1/orders/{id}"),
                &[bearer(&reader)]
            )
            .await
            .0,
            StatusCode::OK
        );
    }
    assert_eq!(
        send(gw.clone(), "GET", "/v1/orders/4", &[bearer(&reader)])
            .await
            .0,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        send(gw.clone(), "GET", "/v1/orders/5", &[]).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(
            gw.clone(),
            "POST",
            "/v1/orders",
            &[bearer(&token("bob", &["reader"]))]
        )
        .await
        .0,
        StatusCode::FORBIDDEN
    );

    let text = metrics.encode();
    // Parsed by an independent OpenMetrics/Prometheus text parser.
    let exposition = openmetrics_parser::openmetrics::parse_openmetrics(&text)
        .expect("a valid OpenMetrics exposition");
    let value = |family: &str, labels: &[(&str, &str)]| -> f64 {
        let Some(family) = exposition.families.get(family) else {
            return 0.0;
        };
        family
            .iter_samples()
            .filter(|s| {
                let set = s.get_labelset().unwrap();
                labels
                    .iter()
                    .all(|(k, v)| set.get_label_value(k) == Some(*v))
            })
            .map(|s| match &s.value {
                OpenMetricsValue::Counter(c) => c.value.as_f64(),
                OpenMetricsValue::Gauge(g) | OpenMetricsValue::Unknown(g) => g.as_f64(),
                _ => 0.0,
            })
            .sum()
    };
    let ok = [
        ("http_request_method", "GET"),
        ("http_route", "/v1/orders/{id}"),
        ("http_response_status_code", "200"),
    ];
    assert_eq!(value("http_server_requests", &ok), 3.0, "{text}");
    assert_eq!(value("gateway_rate_limited", &[]), 1.0);
    assert_eq!(value("gateway_auth_failures", &[]), 1.0);
    assert_eq!(
        value(
            "http_server_requests",
            &[
                ("http_route", "/v1/orders"),
                ("http_response_status_code", "403")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            "http_server_requests",
            &[
                ("http_route", "unmatched"),
                ("http_response_status_code", "401")
            ]
        ),
        1.0
    );
    assert_eq!(value("http_server_active_requests", &[]), 0.0);
    let observed: u64 = exposition.families["http_server_request_duration_seconds"]
        .iter_samples()
        .map(|s| match &s.value {
            OpenMetricsValue::Histogram(h) => h.count.unwrap_or(0),
            _ => 0,
        })
        .sum();
    assert_eq!(observed, 6, "every request is timed");
    assert!(
        !text.contains("/v1/orders/1\""),
        "raw paths never become labels"
    );
}

#[tokio::test]
async fn a_route_can_carry_its_own_quota() {
    let audit = Recorder::default();
    let limits = RateLimits::new(Quota::per_minute(100), Quota::per_minute(100)).with_route_quota(
        "post",
        "/v1/orders",
        Quota::per_minute(2),
    );
    let gw =
        Gateway::new(parts(audit.clone()).with_limits(limits)).wrap(tower::service_fn(upstream));
    let writer = token("wendy", &["writer"]);
    for _ in 0..2 {
        let (status, headers, _) = send(gw.clone(), "POST", "/v1/orders", &[bearer(&writer)]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["ratelimit-policy"], "\"route\";q=2;w=60");
    }
    assert_eq!(
        send(gw.clone(), "POST", "/v1/orders", &[bearer(&writer)])
            .await
            .0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Other routes keep the default quota.
    let (status, headers, _) = send(gw, "GET", "/v1/orders/1", &[bearer(&writer)]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["ratelimit-policy"], "\"user\";q=100;w=60");
    assert_eq!(
        audit.0.lock()[0],
        AuditEntry::new("ratelimit.check", Outcome::Denied)
            .who("wendy")
            .reason("route")
            .route("/v1/orders")
    );
}

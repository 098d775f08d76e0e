//! Request-path hardening, through the public layers: path spelling versus
//! RBAC, credential ambiguity, the Authorization scheme, failed-auth limits
//! and what reaches the audit log.

use std::convert::Infallible;

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

const SECRET: &[u8] = b"hardening-test-secret-0123456789abcdef";
const API_KEY: &str = "ak_test_0123456789";

use super::test_support::Recorder;

fn token(sub: &str, roles: &[&str]) -> String {
    super::test_support::token(SECRET, sub, roles)
}

/// The reproduction of the path-spelling bypass: a protected prefix and a
/// public catch-all.
fn parts(audit: Recorder) -> GatewayParts {
    let verifier = JwtVerifier::new(
        KeySet::new()
            .with_key(VerifyingKey::hs256("k1", SECRET))
            .unwrap(),
        JwtConfig::default(),
    );
    let policy = PolicyConfig::default()
        .role("reader", RoleDef::new(["public:read"]))
        .role("admin", RoleDef::new(["admin:read"]).inherits(["reader"]))
        .rule(RouteRule::new("GET", "/admin/*rest", "admin:read"))
        .rule(RouteRule::new("GET", "/*rest", "public:read"))
        .compile()
        .unwrap();
    GatewayParts::new(verifier, policy)
        .with_api_keys(ApiKeys::new().with_key("svc", API_KEY, vec!["reader".into()]))
        .with_limits(RateLimits::new(
            Quota::per_minute(10_000),
            Quota::per_minute(10_000),
        ))
        .with_audit(audit)
}

/// An upstream that reports the path it was sent and who it was sent for.
async fn upstream(request: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let principal = request
        .extensions()
        .get::<Principal>()
        .map(|p| p.id.clone());
    let body = json!({"path": request.uri().path(), "principal": principal}).to_string();
    Ok(Response::new(Full::new(Bytes::from(body))))
}

async fn send<S>(service: S, request: Request<Full<Bytes>>) -> (StatusCode, http::HeaderMap, Value)
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<GatewayBody>, Error = Infallible>,
{
    let response = service.oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn get(path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut request = Request::get(path);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let mut request = request.body(Full::new(Bytes::new())).unwrap();
    request
        .extensions_mut()
        .insert(PeerAddr("203.0.113.50:40000".parse().unwrap()));
    request
}

fn from_peer(mut request: Request<Full<Bytes>>, peer: &str) -> Request<Full<Bytes>> {
    request
        .extensions_mut()
        .insert(PeerAddr(format!("{peer}:40000").parse().unwrap()));
    request
}

#[tokio::test]
async fn path_spellings_of_a_protected_prefix_get_the_protected_rule() {
    let gw = Gateway::new(parts(Recorder::default())).wrap(tower::service_fn(upstream));
    let reader = format!("Bearer {}", token("rita", &["reader"]));
    let auth = [("authorization", reader.as_str())];
    for path in [
        "/admin/x",
        "/%61dmin/x",
        "/ad%6din/x",
        "/ad%6Din/x",
        "/%61%64%6d%69%6e/x",
    ] {
        let (status, _, body) = send(gw.clone(), get(path, &auth)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::FORBIDDEN, Some("forbidden")),
            "{path}"
        );
    }
    // Path parameters (Tomcat, Jetty and Spring strip `;...`) are refused.
    for path in ["/admin;/x", "/admin;jsessionid=1/x", "/public/a;b"] {
        let (status, _, body) = send(gw.clone(), get(path, &auth)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_path")),
            "{path}"
        );
    }
    // Dot segments and encoded slashes stay refused here too, without a
    // ValidationLayer in front.
    for path in ["/public/../admin/x", "/public/%2e%2e/admin/x", "/admin%2fx"] {
        let (status, _, body) = send(gw.clone(), get(path, &auth)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_path")),
            "{path}"
        );
    }
    // An administrator still gets through, on the normalized path.
    let admin = format!("Bearer {}", token("ada", &["admin"]));
    let (status, _, body) = send(gw.clone(), get("/%61dmin/x", &[("authorization", &admin)])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["path"], "/admin/x");
}

#[tokio::test]
async fn the_upstream_receives_the_normalized_path() {
    let gw = Gateway::new(parts(Recorder::default())).wrap(tower::service_fn(upstream));
    let reader = format!("Bearer {}", token("rita", &["reader"]));
    let auth = [("authorization", reader.as_str())];
    for (sent, forwarded) in [
        ("/public/%7euser", "/public/~user"),
        ("/public/a%2db", "/public/a-b"),
        ("/public/a%3ab", "/public/a%3Ab"),
        (
            "/public/a%2fb".replace("2f", "20").as_str(),
            "/public/a%20b",
        ),
        ("/public/a%c3%a9", "/public/a%C3%A9"),
        // Double encoding decodes once, to a literal `%61dmin` segment that
        // matches nothing protected, and is forwarded as sent.
        ("/%2561dmin/x", "/%2561dmin/x"),
    ] {
        let (status, _, body) = send(gw.clone(), get(sent, &auth)).await;
        assert_eq!(status, StatusCode::OK, "{sent}");
        assert_eq!(body["path"], forwarded, "{sent}");
    }
}

#[tokio::test]
async fn the_validation_layer_normalizes_before_its_own_routing() {
    let validation = ValidationLayer::new(ValidationConfig::default());
    let service = validation.layer(tower::service_fn(upstream));
    let (status, _, body) = send(service.clone(), get("/a/%7Eb/%41", &[])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["path"], "/a/~b/A");
    let (status, _, body) = send(service, get("/a;b/c", &[])).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_path"))
    );
}

#[tokio::test]
async fn an_api_key_beside_a_bearer_token_is_refused() {
    let audit = Recorder::default();
    let gw = Gateway::new(parts(audit.clone())).wrap(tower::service_fn(upstream));
    for bearer in [
        "Bearer forged.jwt.value",
        &format!("Bearer {}", token("rita", &["reader"])),
    ] {
        let (status, headers, body) = send(
            gw.clone(),
            get(
                "/public/x",
                &[("x-api-key", API_KEY), ("authorization", bearer)],
            ),
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("conflicting_credentials"))
        );
        assert!(headers.contains_key("www-authenticate"));
    }
    // Either credential alone still works.
    let (status, _, body) = send(gw.clone(), get("/public/x", &[("x-api-key", API_KEY)])).await;
    assert_eq!(
        (status, body["principal"].as_str()),
        (StatusCode::OK, Some("svc"))
    );
    assert_eq!(
        audit.0.lock()[0],
        AuditEntry::new("auth.authenticate", Outcome::Failure)
            .reason("conflicting_credentials")
            .client_ip("203.0.113.50")
    );
}

#[tokio::test]
async fn the_authorization_scheme_is_case_insensitive() {
    let gw = Gateway::new(parts(Recorder::default())).wrap(tower::service_fn(upstream));
    let t = token("rita", &["reader"]);
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let value = format!("{scheme} {t}");
        let (status, _, body) =
            send(gw.clone(), get("/public/x", &[("authorization", &value)])).await;
        assert_eq!(
            (status, body["principal"].as_str()),
            (StatusCode::OK, Some("rita")),
            "{scheme}"
        );
    }
    // Another scheme is not a bearer token.
    let (status, _, body) = send(
        gw,
        get("/public/x", &[("authorization", &format!("Basic {t}"))]),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("missing_credentials"))
    );
}

#[tokio::test]
async fn failed_authentication_is_limited_per_client_ip() {
    let audit = Recorder::default();
    let limits = RateLimits::new(Quota::per_minute(10_000), Quota::per_minute(10_000))
        .with_auth_failures(Quota::per_minute(5));
    let gw =
        Gateway::new(parts(audit.clone()).with_limits(limits)).wrap(tower::service_fn(upstream));
    let attacker = "198.51.100.66";
    for i in 0..5 {
        let bad = if i % 2 == 0 {
            ("authorization", "Bearer forged.jwt.value")
        } else {
            ("x-api-key", "wrong-key")
        };
        let (status, _, _) = send(gw.clone(), from_peer(get("/public/x", &[bad]), attacker)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "failure {i}");
    }
    let (status, headers, body) = send(
        gw.clone(),
        from_peer(
            get("/public/x", &[("authorization", "Bearer forged.jwt.value")]),
            attacker,
        ),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("auth_failures_limited"))
    );
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=12).contains(&retry), "retry-after {retry}");
    assert_eq!(headers["ratelimit-policy"], "\"auth_failures\";q=5;w=60");
    // Over the limit nothing is verified: even a valid token from that
    // address waits, so forged tokens buy no signature checks.
    let valid = format!("Bearer {}", token("rita", &["reader"]));
    let (status, _, _) = send(
        gw.clone(),
        from_peer(get("/public/x", &[("authorization", &valid)]), attacker),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // Other clients are unaffected, and successes never count.
    for _ in 0..10 {
        let (status, _, _) = send(
            gw.clone(),
            from_peer(
                get("/public/x", &[("authorization", &valid)]),
                "198.51.100.67",
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    let limited = AuditEntry::new("auth.authenticate", Outcome::Denied)
        .reason("auth_failures_limited")
        .client_ip(attacker);
    assert_eq!(audit.0.lock().iter().filter(|e| **e == limited).count(), 2);
}

#[tokio::test]
async fn an_unsafe_request_id_never_reaches_the_audit_log() {
    let audit = Recorder::default();
    let gw = Gateway::new(parts(audit.clone())).wrap(tower::service_fn(upstream));
    for id in ["a\tb", "<script>alert(1)</script>", &"x".repeat(129)] {
        let _ = send(gw.clone(), get("/public/x", &[("x-request-id", id)])).await;
    }
    let _ = send(gw, get("/public/x", &[("x-request-id", "req-1.A_b")])).await;
    let missing = AuditEntry::new("auth.authenticate", Outcome::Failure)
        .reason("missing_credentials")
        .client_ip("203.0.113.50");
    let mut expected = vec![missing.clone(); 3];
    expected.push(missing.request_id("req-1.A_b"));
    assert_eq!(*audit.0.lock(), expected);
}

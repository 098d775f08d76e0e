//! CORS and security-header cases.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::Full;
use tower::{Layer, ServiceExt};

use super::*;

const APP: &str = "https://app.example.com";

async fn cors_request(
    config: &CorsConfig,
    method: Method,
    origin: Option<&str>,
    extra: &[(&str, &str)],
) -> (StatusCode, HeaderMap) {
    let upstream = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        let mut response = Response::new(Full::new(Bytes::from("ok")));
        response
            .headers_mut()
            .insert("server", http::HeaderValue::from_static("nginx/1.2.3"));
        response
            .headers_mut()
            .insert("x-powered-by", http::HeaderValue::from_static("PHP/5"));
        Ok::<_, Infallible>(response)
    });
    let service = config.layer().unwrap().layer(upstream);
    let mut request = Request::builder().method(method).uri("/v1/orders/1");
    if let Some(o) = origin {
        request = request.header("origin", o);
    }
    for (k, v) in extra {
        request = request.header(*k, *v);
    }
    let response = service
        .oneshot(request.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    (response.status(), response.headers().clone())
}

fn config() -> CorsConfig {
    CorsConfig::default()
        .allow_origin(APP)
        .allow_origin("http://localhost:3000")
}

fn acao(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("access-control-allow-origin")
        .and_then(|v| v.to_str().ok())
}

async fn simple(origin: &str) -> Option<String> {
    let (_, h) = cors_request(&config(), Method::GET, Some(origin), &[]).await;
    acao(&h).map(str::to_owned)
}

#[tokio::test]
async fn cors_01_an_allowed_origin_is_echoed() {
    assert_eq!(simple(APP).await.as_deref(), Some(APP));
}

#[tokio::test]
async fn cors_02_a_second_allowed_origin_with_port_is_echoed() {
    assert_eq!(
        simple("http://localhost:3000").await.as_deref(),
        Some("http://localhost:3000")
    );
}

#[tokio::test]
async fn cors_03_an_unknown_origin_gets_no_cors_headers() {
    let (_, h) = cors_request(&config(), Method::GET, Some("https://evil.test"), &[]).await;
    assert!(acao(&h).is_none());
    assert!(h.get("access-control-allow-credentials").is_none());
}

#[tokio::test]
async fn cors_04_the_null_origin_is_never_allowed() {
    assert_eq!(simple("null").await, None);
}

#[tokio::test]
async fn cors_05_a_suffix_trick_does_not_match() {
    assert_eq!(simple("https://app.example.com.evil.test").await, None);
}

#[tokio::test]
async fn cors_06_a_prefix_trick_does_not_match() {
    assert_eq!(simple("https://evil-app.example.com").await, None);
    assert_eq!(simple("https://evilapp.example.com").await, None);
}

#[tokio::test]
async fn cors_07_a_subdomain_does_not_match() {
    assert_eq!(simple("https://sub.app.example.com").await, None);
}

#[tokio::test]
async fn cors_08_the_scheme_must_match() {
    assert_eq!(simple("http://app.example.com").await, None);
}

#[tokio::test]
async fn cors_09_the_port_must_match() {
    assert_eq!(simple("https://app.example.com:8443").await, None);
    assert_eq!(simple("http://localhost:3001").await, None);
}

#[tokio::test]
async fn cors_10_a_trailing_slash_or_path_does_not_match() {
    assert_eq!(simple("https://app.example.com/").await, None);
    assert_eq!(simple("https://app.example.com/path").await, None);
}

#[tokio::test]
async fn cors_11_case_variants_do_not_match() {
    assert_eq!(simple("https://APP.example.com").await, None);
}

#[tokio::test]
async fn cors_12_a_request_without_origin_gets_no_cors_headers() {
    let (status, h) = cors_request(&config(), Method::GET, None, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(acao(&h).is_none());
}

#[tokio::test]
async fn cors_13_responses_vary_on_origin() {
    let (_, h) = cors_request(&config(), Method::GET, Some(APP), &[]).await;
    let vary: Vec<&str> = h
        .get_all("vary")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert!(
        vary.iter()
            .any(|v| v.to_ascii_lowercase().contains("origin")),
        "{vary:?}"
    );
}

#[tokio::test]
async fn cors_14_a_preflight_is_answered_with_methods_headers_and_max_age() {
    let (status, h) = cors_request(
        &config(),
        Method::OPTIONS,
        Some(APP),
        &[
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization, content-type",
            ),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(acao(&h), Some(APP));
    let methods = h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_owned();
    for m in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
        assert!(methods.contains(m), "{methods}");
    }
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );
    assert_eq!(h["access-control-max-age"], "600");
}

#[tokio::test]
async fn cors_15_a_preflight_from_an_unknown_origin_gets_no_cors_headers() {
    let (_, h) = cors_request(
        &config(),
        Method::OPTIONS,
        Some("https://evil.test"),
        &[("access-control-request-method", "DELETE")],
    )
    .await;
    assert!(acao(&h).is_none());
}

#[tokio::test]
async fn cors_16_a_preflight_from_null_gets_no_cors_headers() {
    let (_, h) = cors_request(
        &config(),
        Method::OPTIONS,
        Some("null"),
        &[("access-control-request-method", "GET")],
    )
    .await;
    assert!(acao(&h).is_none());
}

#[tokio::test]
async fn cors_17_a_preflight_never_advertises_unconfigured_methods() {
    let (_, h) = cors_request(
        &config(),
        Method::OPTIONS,
        Some(APP),
        &[("access-control-request-method", "TRACE")],
    )
    .await;
    let methods = h
        .get("access-control-allow-methods")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert!(
        !methods.contains("TRACE") && !methods.contains("CONNECT"),
        "{methods}"
    );
}

#[tokio::test]
async fn cors_18_credentials_are_announced_only_when_configured() {
    let (_, h) = cors_request(&config(), Method::GET, Some(APP), &[]).await;
    assert!(h.get("access-control-allow-credentials").is_none());
    let (_, h) = cors_request(
        &config().with_credentials(true),
        Method::GET,
        Some(APP),
        &[],
    )
    .await;
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(
        acao(&h),
        Some(APP),
        "with credentials the exact origin is echoed, never *"
    );
}

#[tokio::test]
async fn cors_19_exposed_headers_include_the_rate_limit_headers() {
    let (_, h) = cors_request(&config(), Method::GET, Some(APP), &[]).await;
    let exposed = h["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for name in [
        "ratelimit",
        "ratelimit-policy",
        "retry-after",
        "x-request-id",
    ] {
        assert!(exposed.contains(name), "{exposed}");
    }
}

fn cors_header_names(h: &HeaderMap) -> Vec<&str> {
    h.keys()
        .map(|k| k.as_str())
        .filter(|k| k.starts_with("access-control-"))
        .collect()
}

#[tokio::test]
async fn cors_19a_a_request_without_origin_varies_on_origin_and_carries_no_cors_headers() {
    for method in [Method::GET, Method::POST, Method::OPTIONS] {
        let (status, h) = cors_request(&config(), method.clone(), None, &[]).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{method}: passed to the service inside"
        );
        assert_eq!(cors_header_names(&h), Vec::<&str>::new(), "{method}");
        let vary: Vec<_> = h.get_all("vary").iter().collect();
        assert_eq!(vary, ["origin"], "{method}");
    }
}

#[tokio::test]
async fn cors_19b_with_no_origin_allowed_nothing_is_added() {
    let off = CorsConfig::default();
    for origin in [None, Some(APP)] {
        let (status, h) = cors_request(&off, Method::GET, origin, &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(cors_header_names(&h), Vec::<&str>::new(), "{origin:?}");
        assert!(h.get("vary").is_none(), "{origin:?}");
    }
    // A preflight reaches the service inside, which answers it as any OPTIONS.
    let (status, h) = cors_request(
        &off,
        Method::OPTIONS,
        Some(APP),
        &[("access-control-request-method", "POST")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cors_header_names(&h), Vec::<&str>::new());
}

#[tokio::test]
async fn cors_19c_an_upstream_vary_is_kept_beside_origin() {
    let upstream = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        let mut response = Response::new(Full::new(Bytes::new()));
        response
            .headers_mut()
            .insert("vary", http::HeaderValue::from_static("accept-encoding"));
        Ok::<_, Infallible>(response)
    });
    let response = config()
        .layer()
        .unwrap()
        .layer(upstream)
        .oneshot(Request::new(Full::new(Bytes::new())))
        .await
        .unwrap();
    let vary: Vec<_> = response.headers().get_all("vary").iter().collect();
    assert_eq!(vary, ["accept-encoding", "origin"]);
}

#[tokio::test]
async fn cors_20_wildcard_without_credentials_allows_any_origin() {
    let any = CorsConfig::default().allow_origin("*");
    let (_, h) = cors_request(&any, Method::GET, Some("https://whoever.test"), &[]).await;
    assert_eq!(acao(&h), Some("*"));
}

#[test]
fn cors_21_wildcard_with_credentials_is_refused_at_start() {
    let err = CorsConfig::default()
        .allow_origin("*")
        .with_credentials(true)
        .layer()
        .unwrap_err();
    assert_eq!(err, CorsConfigError::WildcardWithCredentials);
}

#[test]
fn cors_22_allowing_null_is_refused_at_start() {
    assert_eq!(
        CorsConfig::default()
            .allow_origin("null")
            .layer()
            .unwrap_err(),
        CorsConfigError::NullOrigin
    );
    assert_eq!(
        CorsConfig::default()
            .allow_origin("NULL")
            .layer()
            .unwrap_err(),
        CorsConfigError::NullOrigin
    );
}

#[test]
fn cors_23_malformed_origins_are_refused_at_start() {
    for bad in [
        "app.example.com",
        "https://app.example.com/",
        "https://app.example.com/path",
        "ftp://app.example.com",
        "https://*.example.com",
        "https://user@app.example.com",
        "https://",
        "https://App.Example.com",
    ] {
        assert!(
            matches!(
                CorsConfig::default().allow_origin(bad).layer(),
                Err(CorsConfigError::InvalidOrigin(_))
            ),
            "{bad}"
        );
    }
}

#[test]
fn cors_24_invalid_header_names_are_refused() {
    let mut config = config();
    config.allowed_headers.push("bad header".into());
    assert!(matches!(
        config.layer(),
        Err(CorsConfigError::InvalidHeader(_))
    ));
}

// ------------------------------------------------------------ security headers

async fn with_security_headers(path: &str) -> HeaderMap {
    let upstream = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        let mut response = Response::new(Full::new(Bytes::from("ok")));
        response
            .headers_mut()
            .insert("server", http::HeaderValue::from_static("nginx/1.2.3"));
        response
            .headers_mut()
            .insert("x-powered-by", http::HeaderValue::from_static("PHP/5"));
        Ok::<_, Infallible>(response)
    });
    let service = SecurityHeadersLayer::default().layer(upstream);
    let request = Request::get(path).body(Full::new(Bytes::new())).unwrap();
    service.oneshot(request).await.unwrap().headers().clone()
}

#[tokio::test]
async fn owasp_headers_are_set_and_server_identity_is_stripped() {
    let h = with_security_headers("/v1/orders").await;
    assert_eq!(
        h["strict-transport-security"],
        "max-age=63072000; includeSubDomains"
    );
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .starts_with("default-src 'none'")
    );
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert!(
        h["permissions-policy"]
            .to_str()
            .unwrap()
            .contains("camera=()")
    );
    assert!(h.get("server").is_none());
    assert!(h.get("x-powered-by").is_none());
    assert!(
        h.get("cache-control").is_none(),
        "no-store only on auth paths"
    );
}

#[tokio::test]
async fn auth_responses_are_not_cached() {
    let h = with_security_headers("/auth/token").await;
    assert_eq!(h["cache-control"], "no-store");
}

//! Input validation before anything else runs: header, path, query and body
//! limits, per-route content types, JSON size and depth. Each failure is a
//! JSON error with its own status and code.
//!
//! | check | status | code |
//! | --- | --- | --- |
//! | more than `max_headers` headers, or over `max_header_bytes` in total | 431 | `headers_too_large` |
//! | a path with no safe normal form: `..`, `.` (also encoded, e.g. `%2e%2e`), `//` or a trailing `/`, a backslash, an encoded `/`, `\` or NUL, a malformed `%` escape, or a `;` (unless [`ValidationConfig::allow_semicolons`]) | 400 | `invalid_path` |
//! | query string over `max_query_bytes` | 414 | `query_too_long` |
//! | body over the limit (declared, or counted while reading a chunked body) | 413 | `body_too_large` |
//! | content type not allowed for the route | 415 | `unsupported_media_type` |
//! | a JSON route's body is not JSON | 400 | `malformed_json` |
//! | a JSON route's body nests deeper than `max_depth` | 400 | `json_too_deep` |
//!
//! The path is rewritten into its normal form
//! ([`crate::router::normalize_path`]: `%61` → `a`, `%3a` → `%3A`) before
//! anything routes on it, so the inner service, the route limits and the
//! upstream all see one spelling. Bodies are read into memory (bounded by the
//! limit) so the upstream sees exactly what was validated.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};

use super::{BoxError, GatewayBody, boxed, error_response};
use crate::router::{PathOptions, RouteError, Router, normalize_path};

/// Limits of one route.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RouteLimits {
    /// Allowed media types (e.g. `application/json`); empty allows any.
    pub content_types: Vec<String>,
    /// When set, the body must be JSON within these limits.
    pub json: Option<JsonLimits>,
    /// A body limit for this route, overriding the global one.
    pub max_body_bytes: Option<usize>,
}

impl RouteLimits {
    /// A route that takes a JSON body (`application/json`) within `limits`.
    pub fn json(limits: JsonLimits) -> RouteLimits {
        RouteLimits {
            content_types: vec!["application/json".into()],
            json: Some(limits),
            max_body_bytes: None,
        }
    }

    /// A route that takes any of `types`.
    pub fn content_types<I: IntoIterator<Item = S>, S: Into<String>>(types: I) -> RouteLimits {
        RouteLimits {
            content_types: types
                .into_iter()
                .map(|t| t.into().to_ascii_lowercase())
                .collect(),
            ..RouteLimits::default()
        }
    }
}

/// JSON body limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonLimits {
    /// Deepest nesting of arrays and objects. Default 32.
    pub max_depth: usize,
    /// Largest body in bytes. Default 256 KiB.
    pub max_bytes: usize,
}

impl Default for JsonLimits {
    fn default() -> Self {
        JsonLimits {
            max_depth: 32,
            max_bytes: 256 * 1024,
        }
    }
}

/// Global limits and per-route rules.
#[derive(Debug)]
#[non_exhaustive]
pub struct ValidationConfig {
    /// Largest body in bytes. Default 1 MiB.
    pub max_body_bytes: usize,
    /// Most request headers. Default 64.
    pub max_headers: usize,
    /// Most bytes of header names and values together. Default 16 KiB.
    pub max_header_bytes: usize,
    /// Longest query string. Default 2 KiB.
    pub max_query_bytes: usize,
    /// Accept `;` in path segments. Default `false`: servlet containers
    /// strip `;...` before routing, so `/admin;x/y` would reach `/admin/y`
    /// behind the gateway's back (see [`PathOptions`]).
    pub allow_semicolons: bool,
    routes: Router<RouteLimits>,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        ValidationConfig {
            max_body_bytes: 1024 * 1024,
            max_headers: 64,
            max_header_bytes: 16 * 1024,
            max_query_bytes: 2 * 1024,
            allow_semicolons: false,
            routes: Router::new(),
        }
    }
}

impl ValidationConfig {
    /// Adds the limits of `method` on `template`.
    pub fn route(
        mut self,
        method: &str,
        template: &str,
        limits: RouteLimits,
    ) -> Result<Self, RouteError> {
        self.routes.insert(method, template, limits)?;
        Ok(self)
    }

    /// Sets [`ValidationConfig::max_body_bytes`].
    pub fn with_max_body_bytes(mut self, max: usize) -> Self {
        self.max_body_bytes = max;
        self
    }

    /// Sets [`ValidationConfig::max_query_bytes`].
    pub fn with_max_query_bytes(mut self, max: usize) -> Self {
        self.max_query_bytes = max;
        self
    }

    /// Sets [`ValidationConfig::allow_semicolons`].
    pub fn with_semicolons(mut self, allow: bool) -> Self {
        self.allow_semicolons = allow;
        self
    }

    fn path_options(&self) -> PathOptions {
        PathOptions::default().with_semicolons(self.allow_semicolons)
    }
}

/// Applies a [`ValidationConfig`]; see the module docs.
#[derive(Debug, Clone)]
pub struct ValidationLayer {
    config: Arc<ValidationConfig>,
}

impl ValidationLayer {
    /// Enforces `config`.
    pub fn new(config: ValidationConfig) -> ValidationLayer {
        ValidationLayer {
            config: Arc::new(config),
        }
    }
}

impl<S> tower::Layer<S> for ValidationLayer {
    type Service = ValidationService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ValidationService {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// The service of [`ValidationLayer`]; the inner service receives the
/// validated body as `Full<Bytes>`.
#[derive(Debug, Clone)]
pub struct ValidationService<S> {
    inner: S,
    config: Arc<ValidationConfig>,
}

type Rejection = Response<GatewayBody>;

/// A failed check, turned into its JSON response by the service.
struct Invalid {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Invalid {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Invalid {
        Invalid {
            status,
            code,
            message: message.into(),
        }
    }

    fn into_response(self) -> Rejection {
        error_response(self.status, self.code, &self.message)
    }
}

/// Whether a raw path is already in the normal form
/// [`crate::router::normalize_path`] produces (with `;` refused): no dot or
/// empty segments, no backslash, no encoded `/`, `\` or NUL, no escape of
/// an unreserved character, escapes in upper case.
pub fn path_is_normalized(path: &str) -> bool {
    matches!(
        normalize_path(path, PathOptions::default()),
        Ok(std::borrow::Cow::Borrowed(_))
    )
}

/// Deepest nesting of arrays and objects in `json`, counted without
/// recursion (brackets inside strings are skipped).
fn json_depth(json: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

fn check_head<B>(
    config: &ValidationConfig,
    request: &Request<B>,
) -> Result<Option<RouteLimits>, Invalid> {
    let headers = request.headers();
    let header_bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if headers.len() > config.max_headers || header_bytes > config.max_header_bytes {
        return Err(Invalid::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            "too many or too large request headers",
        ));
    }
    let path = request.uri().path();
    if request
        .uri()
        .query()
        .is_some_and(|q| q.len() > config.max_query_bytes)
    {
        return Err(Invalid::new(
            StatusCode::URI_TOO_LONG,
            "query_too_long",
            "the query string is too long",
        ));
    }
    // A front router's match (`Routed`) is reused rather than routing again.
    let limits = match request.extensions().get::<super::Routed>() {
        Some(super::Routed(route)) => route.as_ref().and_then(|r| r.limits.clone()),
        None => config
            .routes
            .find(request.method().as_str(), path)
            .map(|r| r.value.clone()),
    };
    if let Some(limits) = &limits
        && !limits.content_types.is_empty()
    {
        let mime = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|m| m.trim().to_ascii_lowercase());
        if !mime.is_some_and(|m| limits.content_types.contains(&m)) {
            let allowed = limits.content_types.join(", ");
            return Err(Invalid::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("send one of: {allowed}"),
            ));
        }
    }
    Ok(limits)
}

fn body_limit(config: &ValidationConfig, limits: Option<&RouteLimits>) -> usize {
    let mut max = limits
        .and_then(|l| l.max_body_bytes)
        .unwrap_or(config.max_body_bytes);
    if let Some(json) = limits.and_then(|l| l.json) {
        max = max.min(json.max_bytes);
    }
    max
}

fn too_large(max: usize) -> Rejection {
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        &format!("the body exceeds {max} bytes"),
    )
}

impl<S, B, ResBody> tower::Service<Request<B>> for ValidationService<S>
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<GatewayBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if let Err(e) =
            super::path::normalize_request_path(&mut request, self.config.path_options())
        {
            let rejection = error_response(StatusCode::BAD_REQUEST, "invalid_path", &e.to_string());
            return Box::pin(async move { Ok(rejection) });
        }
        let limits = match check_head(&self.config, &request) {
            Ok(limits) => limits,
            Err(invalid) => {
                let rejection = invalid.into_response();
                return Box::pin(async move { Ok(rejection) });
            }
        };
        let max = body_limit(&self.config, limits.as_ref());
        let declared = request
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > max as u64) {
            return Box::pin(async move { Ok(too_large(max)) });
        }
        // The ready inner service is used for this call; a clone takes its
        // place for the next one (the usual tower pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes = match Limited::new(body, max).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.is::<LengthLimitError>() => return Ok(too_large(max)),
                Err(e) => {
                    return Ok(error_response(
                        StatusCode::BAD_REQUEST,
                        "bad_body",
                        &format!("could not read the body: {e}"),
                    ));
                }
            };
            if let Some(json) = limits.as_ref().and_then(|l| l.json) {
                if json_depth(&bytes) > json.max_depth {
                    return Ok(error_response(
                        StatusCode::BAD_REQUEST,
                        "json_too_deep",
                        &format!("JSON nests deeper than {}", json.max_depth),
                    ));
                }
                if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
                    return Ok(error_response(
                        StatusCode::BAD_REQUEST,
                        "malformed_json",
                        &format!("malformed JSON: {e}"),
                    ));
                }
            }
            let response = inner
                .call(Request::from_parts(parts, Full::new(bytes)))
                .await?;
            Ok(boxed(response))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::BodyExt;
    use serde_json::Value;
    use tower::{Layer, ServiceExt};

    use super::*;

    fn layer() -> ValidationLayer {
        let config = ValidationConfig::default()
            .with_max_body_bytes(4_096)
            .with_max_query_bytes(64)
            .route(
                "POST",
                "/v1/orders",
                RouteLimits::json(JsonLimits {
                    max_depth: 4,
                    max_bytes: 1_024,
                }),
            )
            .unwrap()
            .route(
                "PUT",
                "/v1/files/{name}",
                RouteLimits::content_types(["image/png", "application/pdf"]),
            )
            .unwrap();
        ValidationLayer::new(config)
    }

    async fn echo(request: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
        let body = request.into_body().collect().await.unwrap().to_bytes();
        Ok(Response::new(Full::new(body)))
    }

    async fn send<B>(request: Request<B>) -> (StatusCode, Value, Bytes)
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let response = layer()
            .layer(tower::service_fn(echo))
            .oneshot(request)
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            bytes,
        )
    }

    fn post(uri: &str, content_type: &str, body: &str) -> Request<Full<Bytes>> {
        Request::post(uri)
            .header(CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap()
    }

    #[tokio::test]
    async fn a_valid_json_body_reaches_upstream_intact() {
        let (status, _, bytes) = send(post(
            "/v1/orders",
            "application/json; charset=utf-8",
            r#"{"items":[{"sku":"a","qty":2}]}"#,
        ))
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(bytes, r#"{"items":[{"sku":"a","qty":2}]}"#);
    }

    #[tokio::test]
    async fn malformed_and_too_deep_json_are_400() {
        let (status, body, _) = send(post("/v1/orders", "application/json", "{\"a\":")).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("malformed_json"))
        );
        let (status, body, _) = send(post("/v1/orders", "application/json", "[[[[[1]]]]]")).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("json_too_deep"))
        );
        // Brackets inside strings do not count.
        let (status, _, _) = send(post(
            "/v1/orders",
            "application/json",
            r#"{"note":"[[[[[[[[["}"#,
        ))
        .await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn a_json_body_over_the_route_limit_is_413() {
        let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(2_000));
        let (status, body, _) = send(post("/v1/orders", "application/json", &big)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large"))
        );
    }

    #[tokio::test]
    async fn wrong_content_types_are_415() {
        let (status, body, _) = send(post("/v1/orders", "text/plain", "{}")).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Some("unsupported_media_type")
            )
        );
        let missing = Request::post("/v1/orders")
            .body(Full::new(Bytes::from("{}")))
            .unwrap();
        assert_eq!(send(missing).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let pdf = Request::put("/v1/files/report")
            .header(CONTENT_TYPE, "application/pdf")
            .body(Full::new(Bytes::from("%PDF")))
            .unwrap();
        assert_eq!(send(pdf).await.0, StatusCode::OK);
        let exe = Request::put("/v1/files/x")
            .header(CONTENT_TYPE, "application/x-msdownload")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(send(exe).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    /// A chunked body of `chunks` × 1 KiB, with no Content-Length.
    struct Chunked(usize);

    impl http_body::Body for Chunked {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
            if self.0 == 0 {
                return Poll::Ready(None);
            }
            self.0 -= 1;
            Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(vec![
                b'a';
                1_024
            ])))))
        }
    }

    #[tokio::test]
    async fn oversized_bodies_are_413_declared_or_chunked() {
        let declared = Request::post("/v1/other")
            .header(CONTENT_LENGTH, "5000")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(send(declared).await.0, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            send(Request::post("/v1/other").body(Chunked(5)).unwrap())
                .await
                .0,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            send(Request::post("/v1/other").body(Chunked(3)).unwrap())
                .await
                .0,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn traversal_and_unnormalized_paths_are_400() {
        for path in [
            "/v1/../admin",
            "/v1/./x",
            "/v1//x",
            "/v1/%2e%2e/admin",
            "/v1/%2E%2e/admin",
            "/v1/a%2fb",
            "/v1/a%5cb",
            "/v1/a%00b",
            "/v1/..",
        ] {
            let request = Request::get(path).body(Full::new(Bytes::new())).unwrap();
            let (status, body, _) = send(request).await;
            assert_eq!(
                (status, body["error"].as_str()),
                (StatusCode::BAD_REQUEST, Some("invalid_path")),
                "{path}"
            );
        }
        assert!(path_is_normalized("/"));
        assert!(path_is_normalized("/v1/orders/42"));
        assert!(!path_is_normalized("v1/orders"));
        assert!(!path_is_normalized("/a\\b"));
    }

    #[tokio::test]
    async fn long_queries_are_414() {
        let ok = Request::get("/v1/x?a=1")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(send(ok).await.0, StatusCode::OK);
        let long = Request::get(format!("/v1/x?q={}", "a".repeat(100)))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (status, body, _) = send(long).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::URI_TOO_LONG, Some("query_too_long"))
        );
    }

    #[tokio::test]
    async fn too_many_or_too_large_headers_are_431() {
        let mut many = Request::get("/v1/x");
        for i in 0..65 {
            many = many.header(format!("x-h{i}"), "v");
        }
        assert_eq!(
            send(many.body(Full::new(Bytes::new())).unwrap()).await.0,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        let big = Request::get("/v1/x")
            .header("x-big", "v".repeat(17_000))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (status, body, _) = send(big).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                Some("headers_too_large")
            )
        );
    }
}

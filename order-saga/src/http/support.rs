//! What the services' HTTP adapters share: authentication with the suite's
//! JWT verifier, JSON bodies, and the probe and metrics endpoints.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, Request, StatusCode};
use http_kit::{ApiError, BoxError, collect_limited};
use jwt_kit::{Claims, JwtVerifier};
use serde::de::DeserializeOwned;

/// The default request-body limit of every service: 64 KiB.
pub(crate) const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;

/// Verifies the request's bearer token: 401 `missing_token` or
/// `invalid_token` otherwise.
pub(crate) fn authenticate(
    verifier: &JwtVerifier,
    headers: &HeaderMap,
) -> Result<Claims, ApiError> {
    let Some(token) = http_kit::bearer_token(headers) else {
        return Err(ApiError::unauthorized(
            "missing_token",
            "an Authorization: Bearer token is required",
        ));
    };
    verifier.verify(token).map_err(|e| {
        tracing::debug!(error = %e, "token refused");
        ApiError::unauthorized("invalid_token", format!("token refused: {e}"))
    })
}

/// 403 unless the claims carry `role`.
pub(crate) fn require_role(claims: &Claims, role: &str) -> Result<(), ApiError> {
    if claims.roles.iter().any(|r| r == role) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "the role {role:?} is required"
        )))
    }
}

/// Reads a JSON body of at most `max_bytes`: 415 `unsupported_media_type`
/// unless `Content-Type` is `application/json`, 413 `body_too_large`, 400
/// `malformed_json` (with the parser's message) when it does not parse into
/// `T`.
pub(crate) async fn read_json<T, B>(request: Request<B>, max_bytes: usize) -> Result<T, ApiError>
where
    T: DeserializeOwned,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let is_json = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::unsupported_media_type(
            "Content-Type must be application/json",
        ));
    }
    let (parts, body) = request.into_parts();
    let bytes = collect_limited(&parts.headers, body, max_bytes).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(
            "malformed_json",
            format!("the body is not a valid request: {e}"),
        )
    })
}

/// `GET /healthz`: the process is up.
pub(crate) fn healthz() -> http::Response<http_kit::Body> {
    http_kit::json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

/// `GET /readyz`: 200 `{"status":"ready"}` when `check` passes, else 503
/// `not_ready` naming the failed dependency (never its address).
pub(crate) fn readyz(failed: Option<&str>) -> http::Response<http_kit::Body> {
    match failed {
        None => http_kit::json(StatusCode::OK, &serde_json::json!({"status": "ready"})),
        Some(dependency) => {
            ApiError::unavailable("not_ready", format!("{dependency} is unreachable"))
                .with_detail("dependency", dependency)
                .into_response()
        }
    }
}

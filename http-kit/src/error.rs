//! [`ApiError`]: the suite's one JSON error response.
//!
//! ```
//! use http::StatusCode;
//! use http_kit::ApiError;
//!
//! let response = ApiError::new(StatusCode::BAD_REQUEST, "invalid_window", "minutes must be 1..=60")
//!     .into_response();
//! assert_eq!(response.status(), StatusCode::BAD_REQUEST);
//! assert_eq!(response.headers()["content-type"], "application/json");
//! ```

use std::borrow::Cow;

use http::header::{ALLOW, HeaderName, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::response::{Body, json};

/// The JSON body of every error: `{"error": "<code>", "message": "<text>"}`,
/// plus any extra fields the error carries. Deserialize it in a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The stable machine-readable code, `snake_case`.
    pub error: String,
    /// A message for people; wording may change between releases.
    pub message: String,
    /// Extra fields (e.g. `retry_after_secs`), flattened beside the two.
    #[serde(flatten, default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// An HTTP error answer: a status, a code, a message, optional extra JSON
/// fields and headers. Turn it into a response with
/// [`ApiError::into_response`].
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    headers: HeaderMap,
}

impl ApiError {
    /// An error with `status`, machine-readable `code` and a human `message`.
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: code.into().into_owned(),
                message: message.into(),
                details: serde_json::Map::new(),
            },
            headers: HeaderMap::new(),
        }
    }

    /// 400 with `code`.
    pub fn bad_request(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401 `code`, with `WWW-Authenticate: Bearer` (RFC 6750 §3).
    pub fn unauthorized(
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, code, message)
            .with_header(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
    }

    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404 `not_found`.
    pub fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }

    /// 405 `method_not_allowed`, with `Allow: <allow>`.
    pub fn method_not_allowed(allow: &'static str) -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("allowed: {allow}"),
        )
        .with_header(ALLOW, HeaderValue::from_static(allow))
    }

    /// 413 `body_too_large`.
    pub fn body_too_large(max_bytes: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body exceeds {max_bytes} bytes"),
        )
        .with_detail("max_bytes", max_bytes)
    }

    /// 415 `unsupported_media_type`.
    pub fn unsupported_media_type(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }

    /// 429 `code`, with `Retry-After` and `retry_after_secs` (at least 1).
    pub fn too_many_requests(
        code: impl Into<Cow<'static, str>>,
        retry_after_secs: u64,
    ) -> ApiError {
        let secs = retry_after_secs.max(1);
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            code,
            format!("too many requests; retry in {secs} s"),
        )
        .with_header(RETRY_AFTER, HeaderValue::from(secs))
        .with_detail("retry_after_secs", secs)
    }

    /// 503 `code`.
    pub fn unavailable(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    /// 500 `internal`. The message is generic on purpose: details go to the
    /// log, never to the client.
    pub fn internal() -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }

    /// Adds a header to the response.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> ApiError {
        self.headers.insert(name, value);
        self
    }

    /// Adds a field beside `error` and `message`. `error` and `message`
    /// themselves cannot be replaced this way.
    pub fn with_detail(mut self, key: &str, value: impl Serialize) -> ApiError {
        if key != "error"
            && key != "message"
            && let Ok(value) = serde_json::to_value(value)
        {
            self.body.details.insert(key.to_owned(), value);
        }
        self
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The machine-readable code.
    pub fn code(&self) -> &str {
        &self.body.error
    }

    /// The human message.
    pub fn message(&self) -> &str {
        &self.body.message
    }

    /// The JSON body.
    pub fn body(&self) -> &ErrorBody {
        &self.body
    }

    /// The response: JSON body, `Content-Type: application/json`,
    /// `Cache-Control: no-store`, and the headers added.
    pub fn into_response(self) -> Response<Body> {
        let mut response = json(self.status, &self.body);
        response.headers_mut().extend(self.headers);
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.body.error,
            self.body.message
        )
    }
}

impl std::error::Error for ApiError {}

impl From<ApiError> for Response<Body> {
    fn from(error: ApiError) -> Response<Body> {
        error.into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_of(response: Response<Body>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn the_body_has_exactly_the_documented_shape() {
        let response =
            ApiError::bad_request("invalid_window", "minutes must be 1..=60").into_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.headers()["cache-control"], "no-store");
        assert_eq!(
            body_of(response).await,
            serde_json::json!({"error": "invalid_window", "message": "minutes must be 1..=60"})
        );
    }

    #[tokio::test]
    async fn details_sit_beside_and_cannot_replace_the_code() {
        let response = ApiError::too_many_requests("rate_limited", 0)
            .with_detail("error", "spoofed")
            .into_response();
        assert_eq!(response.headers()["retry-after"], "1");
        let body = body_of(response).await;
        assert_eq!(body["error"], "rate_limited");
        assert_eq!(body["retry_after_secs"], 1);
        let parsed: ErrorBody = serde_json::from_value(body).unwrap();
        assert_eq!(parsed.details.len(), 1);
    }

    #[test]
    fn helpers_set_their_headers() {
        let r = ApiError::method_not_allowed("GET, POST").into_response();
        assert_eq!(r.headers()["allow"], "GET, POST");
        let r = ApiError::unauthorized("invalid_token", "expired").into_response();
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        assert_eq!(ApiError::body_too_large(10).code(), "body_too_large");
    }
}

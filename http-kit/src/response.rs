//! Responses in the suite's one body type.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

/// Boxed errors of bodies and services.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body of every adapter in the suite: a boxed body of
/// [`Bytes`], so a layer can answer with its own JSON error or pass the
/// inner service's body through without changing the response type.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Boxes any `Bytes` body into [`Body`]. A body that already is a [`Body`]
/// is returned as it is: layers that each box their inner service's body
/// would otherwise wrap one box in another, an allocation and a dynamic
/// call per layer on every frame.
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut body = Some(body);
    if let Some(slot) = (&mut body as &mut dyn std::any::Any).downcast_mut::<Option<Body>>()
        && let Some(already) = slot.take()
    {
        return already;
    }
    match body {
        Some(body) => body.map_err(Into::into).boxed_unsync(),
        // Taken above only when it was a `Body`, which returned.
        None => full(Bytes::new()),
    }
}

/// A complete body from `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty response with `status`.
pub fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(
        Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response
}

/// `value` as a JSON response with `status`, `Content-Type:
/// application/json` and `Cache-Control: no-store` (API answers are
/// per-caller and never cacheable by intermediaries).
pub fn json<T: serde::Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => with_type(status, bytes, "application/json"),
        Err(e) => {
            // Only a Serialize impl that fails on purpose gets here (maps
            // with non-string keys, say): a bug of the caller, not of input.
            tracing::error!(error = %e, "could not serialize a JSON response");
            let body = br#"{"error":"internal","message":"could not encode the response"}"#;
            with_type(
                StatusCode::INTERNAL_SERVER_ERROR,
                &body[..],
                "application/json",
            )
        }
    }
}

/// `body` as a `text/plain; charset=utf-8` response with `status`.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    with_type(status, body, "text/plain; charset=utf-8")
}

pub(crate) fn with_type(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod boxed_tests {
    use http_body::Body as _;
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn a_body_boxed_again_keeps_its_bytes_and_size() {
        let once = full("hello");
        let twice = boxed(boxed(once));
        assert_eq!(twice.size_hint().exact(), Some(5));
        assert_eq!(twice.collect().await.unwrap().to_bytes(), "hello");
        // Any other body is boxed as before.
        let other = boxed(Full::new(Bytes::from_static(b"abc")));
        assert_eq!(other.collect().await.unwrap().to_bytes(), "abc");
    }
}

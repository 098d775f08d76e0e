//! `X-Request-Id`: one id per request, safe to log and to echo.
//!
//! A client-supplied id is kept only when it is a single header of 1 to 128
//! characters from `[A-Za-z0-9._-]`; anything else (tabs, `<script>`,
//! quotes, CR/LF look-alikes, overlong values, several headers) is replaced
//! by a fresh random id (32 hex digits). The chosen id is written back into
//! the request (so the upstream receives it), inserted as a [`RequestId`]
//! extension (the audit log reads it), and set on the response.
//!
//! ```
//! use gateway_mw::http::{RequestId, assign_request_id};
//!
//! let mut request = http::Request::get("/").header("x-request-id", "<script>").body(()).unwrap();
//! let id = assign_request_id(&mut request);
//! assert_eq!(id.as_str().len(), 32);
//! assert_eq!(request.headers()["x-request-id"], id.as_str());
//! assert_eq!(request.extensions().get::<RequestId>(), Some(&id));
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};

/// The request id header.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest client-supplied id kept.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// The request's id, as a request extension (always a safe value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// The id (only `[A-Za-z0-9._-]`, so always ASCII).
    pub fn as_str(&self) -> &str {
        // Constructed only from checked ASCII, so this never falls back.
        self.0.to_str().unwrap_or_default()
    }

    /// The id as a header value.
    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }

    /// A fresh random id: 16 random bytes in hex.
    ///
    /// The bytes come from a per-thread generator seeded once from the OS
    /// (a system call per request showed in the gateway's profile): an id
    /// needs uniqueness, not secrecy.
    pub fn generate() -> RequestId {
        thread_local! {
            static IDS: std::cell::RefCell<fastrand::Rng> = std::cell::RefCell::new(
                // Without OS randomness, fastrand's own seed (time, thread)
                // still keeps threads and processes apart.
                getrandom::u64().map_or_else(|_| fastrand::Rng::new(), fastrand::Rng::with_seed),
            );
        }
        let bytes = IDS.with(|rng| rng.borrow_mut().u128(..)).to_be_bytes();
        let mut hex = [0u8; 32];
        // 16 bytes always fit 32 hex digits, and hex digits are a valid
        // header value, so neither fallback is reachable.
        let value = hex::encode_to_slice(bytes, &mut hex)
            .ok()
            .and_then(|()| HeaderValue::from_bytes(&hex).ok())
            .unwrap_or(HeaderValue::from_static("0"));
        RequestId(value)
    }

    /// `value` as an id, if it is one the gateway accepts from a client.
    pub fn parse(value: &HeaderValue) -> Option<RequestId> {
        is_valid_request_id(value.as_bytes()).then(|| RequestId(value.clone()))
    }
}

/// Whether `id` is 1 to [`MAX_REQUEST_ID_LEN`] characters of `[A-Za-z0-9._-]`.
pub fn is_valid_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Decides the request's id (the client's, if acceptable, else a fresh
/// one), replaces every `X-Request-Id` header with it, inserts it as a
/// [`RequestId`] extension and returns it. Idempotent: a request that
/// already has a [`RequestId`] keeps it.
pub fn assign_request_id<B>(request: &mut Request<B>) -> RequestId {
    if let Some(id) = request.extensions().get::<RequestId>().cloned() {
        request
            .headers_mut()
            .insert(X_REQUEST_ID.clone(), id.0.clone());
        return id;
    }
    let mut sent = request.headers().get_all(&X_REQUEST_ID).iter();
    let id = match (sent.next(), sent.next()) {
        (Some(value), None) => RequestId::parse(value),
        _ => None,
    }
    .unwrap_or_else(RequestId::generate);
    request
        .headers_mut()
        .insert(X_REQUEST_ID.clone(), id.0.clone());
    request.extensions_mut().insert(id.clone());
    id
}

/// The request's id for the audit log: the [`RequestId`] extension, or a
/// single acceptable header when no [`RequestIdLayer`] ran.
pub(crate) fn request_id_of<B>(request: &Request<B>) -> Option<RequestId> {
    if let Some(id) = request.extensions().get::<RequestId>() {
        return Some(id.clone());
    }
    let mut sent = request.headers().get_all(&X_REQUEST_ID).iter();
    match (sent.next(), sent.next()) {
        (Some(value), None) => RequestId::parse(value),
        _ => None,
    }
}

/// Applies [`assign_request_id`] to every request and echoes the id on the
/// response. Put it outside every layer that audits.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> tower::Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

/// The service of [`RequestIdLayer`].
#[derive(Debug, Clone)]
pub struct RequestIdService<S> {
    inner: S,
}

impl<S, B, ResBody> tower::Service<Request<B>> for RequestIdService<S>
where
    S: tower::Service<Request<B>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let id = assign_request_id(&mut request);
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            response.headers_mut().insert(X_REQUEST_ID.clone(), id.0);
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tower::{Layer, ServiceExt};

    fn with_ids(ids: &[&[u8]]) -> Request<()> {
        let mut request = Request::get("/").body(()).unwrap();
        for id in ids {
            request
                .headers_mut()
                .append(X_REQUEST_ID.clone(), HeaderValue::from_bytes(id).unwrap());
        }
        request
    }

    #[test]
    fn safe_ids_are_kept_and_everything_else_is_replaced() {
        let long = "a".repeat(MAX_REQUEST_ID_LEN);
        for kept in ["req-1", "A.b_C-9", long.as_str()] {
            let mut request = with_ids(&[kept.as_bytes()]);
            assert_eq!(assign_request_id(&mut request).as_str(), kept);
        }
        let too_long = "a".repeat(MAX_REQUEST_ID_LEN + 1);
        for replaced in [
            &b"a\tb"[..],
            b"<script>alert(1)</script>",
            b"a b",
            b"\"quoted\"",
            b"caf\xc3\xa9",
            b"",
            too_long.as_bytes(),
        ] {
            let mut request = with_ids(&[replaced]);
            let id = assign_request_id(&mut request);
            assert_eq!(id.as_str().len(), 32, "{replaced:?}");
            assert!(is_valid_request_id(id.as_str().as_bytes()));
            assert_eq!(request.headers().get_all(&X_REQUEST_ID).iter().count(), 1);
            assert_eq!(request.headers()[&X_REQUEST_ID], id.as_str());
        }
        // Two ids are one too many: which would the upstream log?
        let mut request = with_ids(&[b"one", b"two"]);
        let id = assign_request_id(&mut request);
        assert_ne!(id.as_str(), "one");
        assert_eq!(request.headers().get_all(&X_REQUEST_ID).iter().count(), 1);
        // A second pass keeps the id already chosen.
        assert_eq!(assign_request_id(&mut request), id);
    }

    #[tokio::test]
    async fn the_layer_echoes_the_id_the_upstream_received() {
        let service = RequestIdLayer.layer(tower::service_fn(|request: Request<()>| async move {
            let seen = request.headers()[&X_REQUEST_ID].clone();
            let from_extension = request.extensions().get::<RequestId>().cloned();
            assert_eq!(from_extension.map(|id| id.0), Some(seen.clone()));
            Ok::<_, std::convert::Infallible>(Response::new(seen))
        }));
        let response = service.oneshot(with_ids(&[b"<script>"])).await.unwrap();
        assert_eq!(response.headers()[&X_REQUEST_ID], response.body());
    }

    proptest! {
        #[test]
        fn an_assigned_id_is_always_safe(bytes in proptest::collection::vec(0x20u8..0x7f, 0..200)) {
            let Ok(value) = HeaderValue::from_bytes(&bytes) else { return Ok(()); };
            let mut request = Request::get("/").body(()).unwrap();
            request.headers_mut().insert(X_REQUEST_ID.clone(), value);
            let id = assign_request_id(&mut request);
            prop_assert!(is_valid_request_id(id.as_str().as_bytes()));
            if is_valid_request_id(&bytes) {
                prop_assert_eq!(id.as_str().as_bytes(), &bytes[..]);
            }
        }
    }
}

//! OWASP security headers on every response, and no `Server` or
//! `X-Powered-By` leaking what runs behind the gateway.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, HeaderName, HeaderValue, REFERRER_POLICY, SERVER,
    STRICT_TRANSPORT_SECURITY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use http::{HeaderMap, Request, Response};

static PERMISSIONS_POLICY: HeaderName = HeaderName::from_static("permissions-policy");
static X_POWERED_BY: HeaderName = HeaderName::from_static("x-powered-by");
static CROSS_ORIGIN_RESOURCE_POLICY: HeaderName =
    HeaderName::from_static("cross-origin-resource-policy");

/// The headers set on every response (values are overridable).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SecurityHeaders {
    /// `Strict-Transport-Security`. Default two years, subdomains included.
    pub hsts: HeaderValue,
    /// `Content-Security-Policy`, suited to a JSON API: nothing may load, and
    /// nothing may frame the response.
    pub csp: HeaderValue,
    /// `Referrer-Policy`. Default `no-referrer`.
    pub referrer_policy: HeaderValue,
    /// `Permissions-Policy`: every powerful feature off.
    pub permissions_policy: HeaderValue,
    /// Paths (prefixes) whose responses get `Cache-Control: no-store`, e.g.
    /// token endpoints. Default `/auth/`.
    pub no_store_prefixes: Vec<String>,
}

impl Default for SecurityHeaders {
    fn default() -> Self {
        SecurityHeaders {
            hsts: HeaderValue::from_static("max-age=63072000; includeSubDomains"),
            csp: HeaderValue::from_static(
                "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            ),
            referrer_policy: HeaderValue::from_static("no-referrer"),
            permissions_policy: HeaderValue::from_static(
                "accelerometer=(), camera=(), geolocation=(), gyroscope=(), magnetometer=(), microphone=(), payment=(), usb=()",
            ),
            no_store_prefixes: vec!["/auth/".into()],
        }
    }
}

impl SecurityHeaders {
    /// Sets these headers on the response `headers` of a request for
    /// `path` (and removes `Server` and `X-Powered-By`). This is what
    /// [`SecurityHeadersLayer`] does; a server that answers some paths
    /// outside its layer stack (health checks, metrics) calls it directly so
    /// that every response carries them. Idempotent.
    pub fn apply(&self, path: &str, h: &mut HeaderMap) {
        self.apply_with(self.no_store(path), h);
    }

    /// Whether a response to `path` gets `Cache-Control: no-store`.
    fn no_store(&self, path: &str) -> bool {
        self.no_store_prefixes
            .iter()
            .any(|p| path.starts_with(p.as_str()))
    }

    fn apply_with(&self, no_store: bool, h: &mut HeaderMap) {
        h.insert(STRICT_TRANSPORT_SECURITY, self.hsts.clone());
        h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.insert(CONTENT_SECURITY_POLICY, self.csp.clone());
        h.insert(REFERRER_POLICY, self.referrer_policy.clone());
        h.insert(PERMISSIONS_POLICY.clone(), self.permissions_policy.clone());
        h.insert(
            CROSS_ORIGIN_RESOURCE_POLICY.clone(),
            HeaderValue::from_static("same-origin"),
        );
        h.remove(SERVER);
        h.remove(&X_POWERED_BY);
        if no_store {
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
    }
}

/// Sets [`SecurityHeaders`] on every response.
#[derive(Debug, Clone, Default)]
pub struct SecurityHeadersLayer {
    headers: Arc<SecurityHeaders>,
}

impl SecurityHeadersLayer {
    /// With `headers`.
    pub fn new(headers: SecurityHeaders) -> SecurityHeadersLayer {
        SecurityHeadersLayer {
            headers: Arc::new(headers),
        }
    }
}

impl<S> tower::Layer<S> for SecurityHeadersLayer {
    type Service = SecurityHeadersService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SecurityHeadersService {
            inner,
            headers: Arc::clone(&self.headers),
        }
    }
}

/// The service of [`SecurityHeadersLayer`].
#[derive(Debug, Clone)]
pub struct SecurityHeadersService<S> {
    inner: S,
    headers: Arc<SecurityHeaders>,
}

impl<S, B, ResBody> tower::Service<Request<B>> for SecurityHeadersService<S>
where
    S: tower::Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = SecurityHeadersFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // Decided now, so the path need not be kept until the response.
        let no_store = self.headers.no_store(request.uri().path());
        SecurityHeadersFuture {
            future: self.inner.call(request),
            headers: Arc::clone(&self.headers),
            no_store,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`SecurityHeadersService`].
    #[derive(Debug)]
    pub struct SecurityHeadersFuture<F> {
        #[pin]
        future: F,
        headers: Arc<SecurityHeaders>,
        no_store: bool,
    }
}

impl<F, ResBody, E> Future for SecurityHeadersFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.future.poll(cx))?;
        this.headers
            .apply_with(*this.no_store, response.headers_mut());
        Poll::Ready(Ok(response))
    }
}

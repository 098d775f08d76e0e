//! Rate limiting per user and per API key, with the IETF headers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::{Request, Response, StatusCode};

use super::{
    AuditSink, BoxError, GatewayBody, MatchedRoute, Principal, PrincipalKind, boxed,
    error_response, request_id,
};
use crate::audit::{AuditEntry, Outcome};
use crate::ratelimit::{KeyedLimiter, LimiterConfig, Quota, RateDecision};

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The limiters: one keyed by user, one keyed by API key.
#[derive(Debug)]
pub struct RateLimits {
    users: KeyedLimiter<String>,
    api_keys: KeyedLimiter<String>,
}

impl Default for RateLimits {
    /// 1,000 requests per minute per user, 10,000 per API key.
    fn default() -> Self {
        RateLimits::new(Quota::per_minute(1_000), Quota::per_minute(10_000))
    }
}

impl RateLimits {
    /// `user` per user and `api_key` per API key.
    pub fn new(user: Quota, api_key: Quota) -> RateLimits {
        RateLimits {
            users: KeyedLimiter::new(LimiterConfig::new(user)),
            api_keys: KeyedLimiter::new(LimiterConfig::new(api_key)),
        }
    }

    fn check(&self, principal: &Principal) -> (&'static str, Quota, RateDecision) {
        match principal.kind {
            PrincipalKind::User => (
                "user",
                self.users.quota(),
                self.users.check(principal.id.as_str()),
            ),
            PrincipalKind::ApiKey => (
                "api_key",
                self.api_keys.quota(),
                self.api_keys.check(principal.id.as_str()),
            ),
        }
    }
}

/// Applies [`RateLimits`] to the [`Principal`]; see the module docs.
#[derive(Clone)]
pub struct RateLimitLayer {
    limits: Arc<RateLimits>,
    audit: Arc<dyn AuditSink>,
}

impl std::fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl RateLimitLayer {
    /// Enforces `limits`.
    pub fn new(limits: Arc<RateLimits>, audit: Arc<dyn AuditSink>) -> RateLimitLayer {
        RateLimitLayer { limits, audit }
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> RateLimitService<S> {
        RateLimitService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`RateLimitLayer`].
#[derive(Clone, Debug)]
pub struct RateLimitService<S> {
    inner: S,
    layer: RateLimitLayer,
}

fn ceil_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Sets `RateLimit-Policy: "name";q=Q;w=W` and `RateLimit: "name";r=R;t=T`
/// (draft-ietf-httpapi-ratelimit-headers).
fn set_headers(
    response: &mut Response<GatewayBody>,
    name: &str,
    quota: Quota,
    decision: &RateDecision,
) {
    let policy = format!("\"{name}\";q={};w={}", quota.burst, ceil_secs(quota.period));
    let state = format!(
        "\"{name}\";r={};t={}",
        decision.remaining,
        ceil_secs(decision.reset_after)
    );
    let headers = response.headers_mut();
    if let (Ok(p), Ok(s)) = (
        HeaderValue::from_str(&policy),
        HeaderValue::from_str(&state),
    ) {
        headers.insert(RATELIMIT_POLICY.clone(), p);
        headers.insert(RATELIMIT.clone(), s);
    }
    if let Some(retry) = decision.retry_after {
        headers.insert(RETRY_AFTER, HeaderValue::from(ceil_secs(retry).max(1)));
    }
}

impl<S, B, ResBody> tower::Service<Request<B>> for RateLimitService<S>
where
    S: tower::Service<Request<B>, Response = Response<ResBody>> + Send,
    S::Future: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<GatewayBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let Some(principal) = request.extensions().get::<Principal>().cloned() else {
            let response = error_response(
                StatusCode::UNAUTHORIZED,
                "missing_credentials",
                "authentication required",
            );
            return Box::pin(async move { Ok(response) });
        };
        let (name, quota, decision) = self.layer.limits.check(&principal);
        if !decision.allowed {
            let mut entry = AuditEntry::new("ratelimit.check", Outcome::Denied)
                .who(principal.id)
                .reason(name);
            if let Some(route) = request.extensions().get::<MatchedRoute>() {
                entry = entry.route(route.0.clone());
            }
            if let Some(id) = request_id(&request) {
                entry = entry.request_id(id);
            }
            self.layer.audit.record(entry);
            let mut response = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "rate limit exceeded",
            );
            set_headers(&mut response, name, quota, &decision);
            return Box::pin(async move { Ok(response) });
        }
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = boxed(future.await?);
            set_headers(&mut response, name, quota, &decision);
            Ok(response)
        })
    }
}

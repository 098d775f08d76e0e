//! Rate limiting per user, per API key and per anonymous client IP, with the
//! IETF headers.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::{Request, Response, StatusCode};

use super::{
    AuditSink, BoxError, ClientIp, GatewayBody, MatchedRoute, Principal, PrincipalKind, boxed,
    error_response, with_request_context,
};
use crate::audit::{AuditEntry, Outcome};
use crate::client_ip::limit_key;
use crate::ratelimit::{KeyedLimiter, LimiterConfig, Quota, RateDecision};

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The limiters: keyed by user, by API key, and by client IP for requests
/// without a principal.
#[derive(Debug)]
pub struct RateLimits {
    users: KeyedLimiter<String>,
    api_keys: KeyedLimiter<String>,
    anonymous: KeyedLimiter<String>,
    /// Per-route quotas by `"METHOD template"`, keyed by caller.
    routes: HashMap<String, KeyedLimiter<String>>,
}

impl Default for RateLimits {
    /// 1,000 requests per minute per user, 10,000 per API key, 60 per
    /// anonymous client IP.
    fn default() -> Self {
        RateLimits::new(Quota::per_minute(1_000), Quota::per_minute(10_000))
    }
}

impl RateLimits {
    /// `user` per user and `api_key` per API key (60/min per anonymous IP).
    pub fn new(user: Quota, api_key: Quota) -> RateLimits {
        RateLimits {
            users: KeyedLimiter::new(LimiterConfig::new(user)),
            api_keys: KeyedLimiter::new(LimiterConfig::new(api_key)),
            anonymous: KeyedLimiter::new(LimiterConfig::new(Quota::per_minute(60))),
            routes: HashMap::new(),
        }
    }

    /// Gives `method` on the route `template` its own quota per caller (user,
    /// API key or anonymous client), replacing the default quota there.
    pub fn with_route_quota(mut self, method: &str, template: &str, quota: Quota) -> Self {
        let key = format!("{} {template}", method.to_ascii_uppercase());
        self.routes
            .insert(key, KeyedLimiter::new(LimiterConfig::new(quota)));
        self
    }

    /// Sets the quota per anonymous client IP (IPv6 clients share their /64).
    pub fn with_anonymous(mut self, quota: Quota) -> Self {
        self.anonymous = KeyedLimiter::new(LimiterConfig::new(quota));
        self
    }

    /// (policy name, subject for the audit log, quota, decision).
    fn check(
        &self,
        principal: Option<&Principal>,
        ip: Option<ClientIp>,
        route: Option<String>,
    ) -> (&'static str, String, Quota, RateDecision) {
        if let Some(limiter) = route.as_ref().and_then(|r| self.routes.get(r)) {
            let subject = match principal {
                Some(p) => p.id.clone(),
                None => ip.map_or_else(|| "unknown".to_owned(), |ClientIp(ip)| limit_key(ip)),
            };
            let decision = limiter.check(subject.as_str());
            return ("route", subject, limiter.quota(), decision);
        }
        match principal {
            Some(p) if p.kind == PrincipalKind::User => (
                "user",
                p.id.clone(),
                self.users.quota(),
                self.users.check(p.id.as_str()),
            ),
            Some(p) => (
                "api_key",
                p.id.clone(),
                self.api_keys.quota(),
                self.api_keys.check(p.id.as_str()),
            ),
            None => {
                // Without an address all anonymous traffic shares one key:
                // limiting too much beats not limiting at all.
                let key = ip.map_or_else(|| "unknown".to_owned(), |ClientIp(ip)| limit_key(ip));
                let decision = self.anonymous.check(key.as_str());
                ("ip", key, self.anonymous.quota(), decision)
            }
        }
    }
}

/// Applies [`RateLimits`]; see the module docs.
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
        let principal = request.extensions().get::<Principal>();
        let ip = request.extensions().get::<ClientIp>().copied();
        let route = request
            .extensions()
            .get::<MatchedRoute>()
            .map(|MatchedRoute(template)| format!("{} {template}", request.method()));
        let (name, subject, quota, decision) = self.layer.limits.check(principal, ip, route);
        if !decision.allowed {
            let entry = AuditEntry::new("ratelimit.check", Outcome::Denied)
                .who(subject)
                .reason(name);
            self.layer
                .audit
                .record(with_request_context(entry, &request));
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

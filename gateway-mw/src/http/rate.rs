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

/// One quota's limiter: in this process, or (feature `redis`) shared by
/// every gateway instance through Redis.
#[derive(Debug)]
enum Limiter {
    Local(KeyedLimiter<String>),
    // Boxed: the Redis limiter (client, scripts, fallback) is several times
    // the size of a local one.
    #[cfg(feature = "redis")]
    Redis(Box<crate::ratelimit::RedisLimiter>),
}

impl Limiter {
    fn local(quota: Quota) -> Limiter {
        Limiter::Local(KeyedLimiter::new(LimiterConfig::new(quota)))
    }

    fn quota(&self) -> Quota {
        match self {
            Limiter::Local(l) => l.quota(),
            #[cfg(feature = "redis")]
            Limiter::Redis(l) => l.quota(),
        }
    }

    async fn check(&self, key: &str) -> RateDecision {
        match self {
            Limiter::Local(l) => l.check(key),
            #[cfg(feature = "redis")]
            Limiter::Redis(l) => l.check(key).await,
        }
    }

    async fn peek(&self, key: &str) -> RateDecision {
        match self {
            Limiter::Local(l) => l.peek(key),
            #[cfg(feature = "redis")]
            Limiter::Redis(l) => l.peek(key).await,
        }
    }
}

/// Where shared limits live (feature `redis`).
#[cfg(feature = "redis")]
#[derive(Debug, Clone)]
pub struct RedisLimits {
    /// A connected fred client.
    pub client: fred::prelude::Client,
    /// Prefix of the limit keys, e.g. `gw:rl:`.
    pub prefix: String,
    /// Per-check timeout (default 20 ms in [`RedisLimiterConfig`](crate::ratelimit::RedisLimiterConfig)).
    pub timeout: std::time::Duration,
    /// What decides when Redis fails.
    pub on_failure: crate::ratelimit::FailurePolicy,
}

/// The limiters: keyed by user, by API key, and by client IP for requests
/// without a principal, plus optional per-route quotas and the limit on
/// failed authentications per client IP (enforced by [`AuthLayer`](super::AuthLayer)).
#[derive(Debug)]
pub struct RateLimits {
    users: Limiter,
    api_keys: Limiter,
    anonymous: Limiter,
    auth_failures: Limiter,
    /// Per-route quotas by `"METHOD template"`, keyed by caller.
    routes: HashMap<String, Limiter>,
    #[cfg(feature = "redis")]
    redis: Option<RedisLimits>,
}

/// The default limit on failed authentications per client IP (IPv6 /64):
/// 20 per minute, bursts of 20.
pub const DEFAULT_AUTH_FAILURES_PER_MINUTE: u32 = 20;

impl Default for RateLimits {
    /// 1,000 requests per minute per user, 10,000 per API key, 60 per
    /// anonymous client IP, 20 failed authentications per client IP.
    fn default() -> Self {
        RateLimits::new(Quota::per_minute(1_000), Quota::per_minute(10_000))
    }
}

impl RateLimits {
    /// `user` per user and `api_key` per API key (60/min per anonymous IP,
    /// 20 failed authentications/min per IP).
    pub fn new(user: Quota, api_key: Quota) -> RateLimits {
        RateLimits {
            users: Limiter::local(user),
            api_keys: Limiter::local(api_key),
            anonymous: Limiter::local(Quota::per_minute(60)),
            auth_failures: Limiter::local(Quota::per_minute(DEFAULT_AUTH_FAILURES_PER_MINUTE)),
            routes: HashMap::new(),
            #[cfg(feature = "redis")]
            redis: None,
        }
    }

    /// A limiter for `quota`: shared in Redis when configured, else local.
    fn limiter(&self, quota: Quota, _scope: &str) -> Limiter {
        #[cfg(feature = "redis")]
        if let Some(r) = &self.redis {
            let config =
                crate::ratelimit::RedisLimiterConfig::new(quota, format!("{}{_scope}:", r.prefix))
                    .with_timeout(r.timeout)
                    .with_failure_policy(r.on_failure);
            return Limiter::Redis(Box::new(crate::ratelimit::RedisLimiter::new(
                r.client.clone(),
                config,
            )));
        }
        Limiter::local(quota)
    }

    /// Sets the quota per anonymous client IP (IPv6 clients share their /64).
    pub fn with_anonymous(mut self, quota: Quota) -> Self {
        self.anonymous = self.limiter(quota, "ip");
        self
    }

    /// Sets the quota of failed authentications (bad or forged bearer
    /// tokens, unknown API keys, conflicting credentials) per client IP
    /// (IPv6 clients share their /64). Over it, [`AuthLayer`](super::AuthLayer)
    /// answers 429 `auth_failures_limited` to every request from that
    /// address that carries a credential, before verifying anything.
    pub fn with_auth_failures(mut self, quota: Quota) -> Self {
        self.auth_failures = self.limiter(quota, "auth_fail");
        self
    }

    /// The failed-authentication quota.
    pub fn auth_failure_quota(&self) -> Quota {
        self.auth_failures.quota()
    }

    /// Whether `ip` is over its failed-authentication limit (a peek: nothing
    /// is counted).
    pub(crate) async fn auth_failures_exceeded(
        &self,
        ip: Option<ClientIp>,
    ) -> Option<RateDecision> {
        // Nobody has failed lately (the usual case): nothing to look up,
        // and no key to build.
        if let Limiter::Local(limiter) = &self.auth_failures
            && limiter.holds_no_keys()
        {
            return None;
        }
        let decision = self.auth_failures.peek(&ip_key(ip)).await;
        (!decision.allowed).then_some(decision)
    }

    /// Counts one failed authentication from `ip`; the decision says
    /// whether it was still within the limit.
    pub(crate) async fn record_auth_failure(&self, ip: Option<ClientIp>) -> RateDecision {
        self.auth_failures.check(&ip_key(ip)).await
    }

    /// Gives `method` on the route `template` its own quota per caller (user,
    /// API key or anonymous client), replacing the default quota there.
    pub fn with_route_quota(mut self, method: &str, template: &str, quota: Quota) -> Self {
        let key = format!("{} {template}", method.to_ascii_uppercase());
        let limiter = self.limiter(quota, &format!("route:{key}"));
        self.routes.insert(key, limiter);
        self
    }

    /// Moves every limit (those set so far and those added later) into
    /// Redis, so all gateway instances share them (feature `redis`).
    #[cfg(feature = "redis")]
    pub fn with_redis(mut self, redis: RedisLimits) -> Self {
        self.redis = Some(redis);
        self.users = self.limiter(self.users.quota(), "user");
        self.api_keys = self.limiter(self.api_keys.quota(), "api_key");
        self.anonymous = self.limiter(self.anonymous.quota(), "ip");
        self.auth_failures = self.limiter(self.auth_failures.quota(), "auth_fail");
        let routes = std::mem::take(&mut self.routes);
        for (key, limiter) in routes {
            let shared = self.limiter(limiter.quota(), &format!("route:{key}"));
            self.routes.insert(key, shared);
        }
        self
    }

    /// (policy name, quota, decision). The key is the principal's id, or
    /// the client's address for anonymous requests ([`subject`]).
    async fn check(
        &self,
        principal: Option<&Principal>,
        ip: Option<ClientIp>,
        route: Option<String>,
    ) -> (&'static str, Quota, RateDecision) {
        let route = route.as_ref().and_then(|r| self.routes.get(r));
        let (name, limiter) = match (route, principal) {
            (Some(limiter), _) => ("route", limiter),
            (None, Some(p)) if p.kind == PrincipalKind::User => ("user", &self.users),
            (None, Some(_)) => ("api_key", &self.api_keys),
            // Without an address all anonymous traffic shares one key:
            // limiting too much beats not limiting at all.
            (None, None) => ("ip", &self.anonymous),
        };
        // A principal's id is the key as it is: nothing is copied for it.
        let decision = match principal {
            Some(p) => limiter.check(&p.id).await,
            None => limiter.check(&ip_key(ip)).await,
        };
        (name, limiter.quota(), decision)
    }
}

/// Whom a rate decision was about, for the audit log: the principal's id,
/// or the client's address.
fn subject(principal: Option<&Principal>, ip: Option<ClientIp>) -> String {
    principal.map_or_else(|| ip_key(ip), |p| p.id.clone())
}

/// The limit key of a client address; without an address all such traffic
/// shares one key (limiting too much beats not limiting at all).
fn ip_key(ip: Option<ClientIp>) -> String {
    ip.map_or_else(|| "unknown".to_owned(), |ClientIp(ip)| limit_key(ip))
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

/// `"name";a=A;b=B`, written without the formatting machinery: it is on
/// every response.
fn item(name: &str, a: &str, a_value: u64, b: &str, b_value: u64) -> String {
    let mut digits = itoa::Buffer::new();
    let mut out = String::with_capacity(name.len() + 32);
    out.push('"');
    out.push_str(name);
    out.push_str("\";");
    out.push_str(a);
    out.push('=');
    out.push_str(digits.format(a_value));
    out.push(';');
    out.push_str(b);
    out.push('=');
    out.push_str(digits.format(b_value));
    out
}

/// Sets `RateLimit-Policy: "name";q=Q;w=W` and `RateLimit: "name";r=R;t=T`
/// (draft-ietf-httpapi-ratelimit-headers-08, the structured-field syntax),
/// plus `Retry-After` when denied.
pub(super) fn set_headers(
    response: &mut Response<GatewayBody>,
    name: &str,
    quota: Quota,
    decision: &RateDecision,
) {
    let policy = item(
        name,
        "q",
        u64::from(quota.burst),
        "w",
        ceil_secs(quota.period),
    );
    let state = item(
        name,
        "r",
        u64::from(decision.remaining),
        "t",
        ceil_secs(decision.reset_after),
    );
    let headers = response.headers_mut();
    // The strings become the values' bytes as they are, without a copy.
    if let (Ok(p), Ok(s)) = (
        HeaderValue::from_maybe_shared(Bytes::from(policy)),
        HeaderValue::from_maybe_shared(Bytes::from(state)),
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
    S: tower::Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
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
        let layer = self.layer.clone();
        // The ready inner service serves this request; a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            // Read from the request this future owns: nothing is copied
            // out of it to be checked.
            let principal = request.extensions().get::<Principal>();
            let ip = request.extensions().get::<ClientIp>().copied();
            // The route's key is only built when there are route quotas.
            let route = request
                .extensions()
                .get::<MatchedRoute>()
                .filter(|_| !layer.limits.routes.is_empty())
                .map(|MatchedRoute(template)| format!("{} {template}", request.method()));
            let (name, quota, decision) = layer.limits.check(principal, ip, route).await;
            if !decision.allowed {
                let entry = AuditEntry::new("ratelimit.check", Outcome::Denied)
                    .who(subject(principal, ip))
                    .reason(name);
                layer.audit.record(with_request_context(entry, &request));
                let mut response = error_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "rate limit exceeded",
                );
                set_headers(&mut response, name, quota, &decision);
                return Ok(response);
            }
            let mut response = boxed(inner.call(request).await?);
            set_headers(&mut response, name, quota, &decision);
            Ok(response)
        })
    }
}

//! tower layers over hyper 1.x (feature `http`): each decision module as a
//! `Layer`, usable on its own, and [`Gateway`] to stack them.
//!
//! | layer | does | rejects with |
//! | --- | --- | --- |
//! | [`MetricsLayer`] | Prometheus metrics with OpenTelemetry names (duration histogram, requests, errors, auth failures, rate-limited, upstream errors, in flight) | — |
//! | [`ClientIpLayer`] | the client's address from the TCP peer and trusted `X-Forwarded-For` hops, as [`ClientIp`] | — |
//! | [`AuthLayer`] | verifies `Authorization: Bearer <jwt>` or `X-Api-Key`, inserts a [`Principal`] | 401 + `WWW-Authenticate` |
//! | [`AuthzLayer`] | checks the principal's roles against the [`Policy`], inserts the [`MatchedRoute`] | 403 (missing permission), 404 (no route: deny by default) |
//! | [`RateLimitLayer`] | GCRA per user, per API key, and per client IP (IPv6 /64) for anonymous requests, with the IETF `RateLimit-Policy` / `RateLimit` headers | 429 + `Retry-After` |
//! | [`CorsLayer`] (from [`CorsConfig::layer`]) | exact-origin allow-list on tower-http's `CorsLayer`, validated at start; requests without `Origin` pass with only `Vary: Origin` | no `Access-Control-Allow-Origin` for other origins |
//! | [`ValidationLayer`] | header, path, query and body limits, per-route content types, JSON size and depth | 400, 413, 414, 415, 431 |
//! | [`SecurityHeadersLayer`] | HSTS, CSP, `X-Content-Type-Options`, `X-Frame-Options`, `Referrer-Policy`, `Permissions-Policy`; strips `Server`/`X-Powered-By`; `no-store` on auth paths | — |
//!
//! Every rejection is the suite's JSON error body, `{"error": "<code>",
//! "message": "<text>"}` ([`http_kit::ApiError`]), and an
//! [`AuditEntry`] handed to the configured
//! [`AuditSink`], so security decisions are recorded off the request path.
//!
//! ```
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use gateway_mw::http::{Gateway, GatewayParts};
//! use gateway_mw::jwt::{JwtConfig, JwtVerifier, KeySet, VerifyingKey};
//! use gateway_mw::rbac::{PolicyConfig, RoleDef, RouteRule};
//!
//! let verifier = JwtVerifier::new(
//!     KeySet::new().with_key(VerifyingKey::hs256("k1", b"a-32-byte-or-longer-shared-secret!")).unwrap(),
//!     JwtConfig::default(),
//! );
//! let policy = PolicyConfig::default()
//!     .role("reader", RoleDef::new(["orders:read"]))
//!     .rule(RouteRule::new("GET", "/v1/orders/{id}", "orders:read"))
//!     .compile()
//!     .unwrap();
//! let upstream = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from("order"))))
//! });
//! let gateway = Gateway::new(GatewayParts::new(verifier, policy)).wrap(upstream);
//! # let _ = gateway;
//! ```

mod auth;
mod authz;
mod client;
mod cors;
mod forward;
mod headers;
mod metrics;
mod path;
mod rate;
mod request_id;
mod validate;

pub use auth::{ApiKeys, AuthLayer, AuthService};
pub use authz::{AuthzFuture, AuthzLayer, AuthzService};
pub use client::{ClientIp, ClientIpLayer, ClientIpService, PeerAddr};
pub use cors::{CorsConfig, CorsConfigError, CorsFuture, CorsLayer, CorsService};
pub use forward::{
    HOP_BY_HOP, OVERRIDES, PeerIsTrustedProxy, prepare_forward, sanitize_forward_headers,
    strip_response_hop_by_hop,
};
pub use headers::{
    SecurityHeaders, SecurityHeadersFuture, SecurityHeadersLayer, SecurityHeadersService,
};
pub use metrics::{GatewayMetrics, MetricsFuture, MetricsLayer, MetricsService};
#[cfg(feature = "redis")]
pub use rate::RedisLimits;
pub use rate::{DEFAULT_AUTH_FAILURES_PER_MINUTE, RateLimitLayer, RateLimitService, RateLimits};
pub use request_id::{
    MAX_REQUEST_ID_LEN, RequestId, RequestIdLayer, RequestIdService, X_REQUEST_ID,
    assign_request_id, is_valid_request_id,
};
pub use validate::{
    JsonLimits, RouteLimits, ValidationConfig, ValidationLayer, ValidationService,
    path_is_normalized,
};

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};

use crate::audit::AuditEntry;
pub use crate::audit::{AuditSink, NoAudit};
use crate::client_ip::TrustedProxies;
use crate::jwt::JwtVerifier;
use crate::rbac::Policy;

/// Boxed errors of bodies and services.
pub type BoxError = http_kit::BoxError;

/// The response body every layer produces: the inner body, or a JSON error.
pub type GatewayBody = http_kit::Body;

/// Who the request is from, inserted by [`AuthLayer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user id (`sub`) or the API key's id.
    pub id: String,
    /// Roles granted.
    pub roles: Vec<String>,
    /// How they authenticated.
    pub kind: PrincipalKind,
}

/// How a [`Principal`] authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    /// A bearer JWT.
    User,
    /// An API key.
    ApiKey,
}

/// The route template the request matched, inserted by [`AuthzLayer`]: the
/// low-cardinality label for metrics and the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchedRoute(pub String);

/// The route a front router (such as `server::GatewayServer`'s single route
/// table) already matched, as a request extension: when present,
/// [`AuthzLayer`] and [`ValidationLayer`] use it instead of matching the path
/// against their own tables again, so a request is routed once.
///
/// `Routed(None)` means the front router found no route: authorization then
/// denies it (404), as with no rule.
#[derive(Debug, Clone, Default)]
pub struct Routed(pub Option<Arc<RouteSpec>>);

/// What [`Routed`] knows about the matched route.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RouteSpec {
    /// The matched template (e.g. `/v1/orders/{id}`).
    pub template: String,
    /// The permission the route requires; `None` is denied by [`AuthzLayer`]
    /// (routes without one must not sit behind it).
    pub permission: Option<String>,
    /// The route's validation limits (`None`: only the global limits).
    pub limits: Option<RouteLimits>,
}

impl RouteSpec {
    /// A route on `template` requiring `permission`, with `limits`.
    pub fn new(
        template: impl Into<String>,
        permission: Option<String>,
        limits: Option<RouteLimits>,
    ) -> RouteSpec {
        RouteSpec {
            template: template.into(),
            permission,
            limits,
        }
    }
}

impl Routed {
    /// The authorization decision for a caller holding `roles`.
    fn decide(&self, policy: &Policy, roles: &[String]) -> crate::rbac::Decision {
        use crate::rbac::Decision;
        let Some((route, permission)) = self
            .0
            .as_deref()
            .and_then(|r| Some((r.template.clone(), r.permission.clone()?)))
        else {
            return Decision::NoRoute;
        };
        if policy.grants(roles, &permission) {
            Decision::Allow { route, permission }
        } else {
            Decision::Forbidden { route, permission }
        }
    }
}

/// Adds what a request tells about itself to an audit entry: the client IP,
/// the matched route (when authorization has run) and `X-Request-Id`.
fn with_request_context<B>(mut entry: AuditEntry, request: &http::Request<B>) -> AuditEntry {
    if let Some(ClientIp(ip)) = request.extensions().get::<ClientIp>() {
        entry = entry.client_ip(ip.to_string());
    }
    if let Some(MatchedRoute(route)) = request.extensions().get::<MatchedRoute>() {
        entry = entry.route(route.clone());
    }
    // Only an id the gateway would accept or generate is recorded: the
    // audit log must not carry a client's tabs or markup.
    if let Some(id) = request_id::request_id_of(request) {
        entry = entry.request_id(id.as_str());
    }
    entry
}

/// Maps an inner response body into [`GatewayBody`].
fn boxed<B>(response: Response<B>) -> Response<GatewayBody>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    response.map(http_kit::boxed)
}

/// A JSON error response: the suite's one error body,
/// `{"error": "<code>", "message": "<text>"}` ([`http_kit::ApiError`]).
pub(crate) fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
) -> Response<GatewayBody> {
    http_kit::ApiError::new(status, code.to_owned(), message).into_response()
}

/// What [`Gateway`] composes.
#[derive(Clone)]
pub struct GatewayParts {
    /// Bearer-token verification.
    pub verifier: Arc<JwtVerifier>,
    /// API keys (optional).
    pub api_keys: Option<Arc<ApiKeys>>,
    /// The RBAC policy.
    pub policy: Arc<Policy>,
    /// The rate limits.
    pub limits: Arc<RateLimits>,
    /// Where audit entries go.
    pub audit: Arc<dyn AuditSink>,
    /// Proxies whose `X-Forwarded-For` entries are believed.
    pub trusted_proxies: TrustedProxies,
}

impl std::fmt::Debug for GatewayParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayParts")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl GatewayParts {
    /// JWT auth and `policy`, default rate limits (1,000/min per user,
    /// 10,000/min per API key), no API keys, no audit sink.
    pub fn new(verifier: JwtVerifier, policy: Policy) -> GatewayParts {
        GatewayParts {
            verifier: Arc::new(verifier),
            api_keys: None,
            policy: Arc::new(policy),
            limits: Arc::new(RateLimits::default()),
            audit: Arc::new(NoAudit),
            trusted_proxies: TrustedProxies::none(),
        }
    }

    /// Believes `X-Forwarded-For` hops from these proxies.
    pub fn with_trusted_proxies(mut self, proxies: TrustedProxies) -> Self {
        self.trusted_proxies = proxies;
        self
    }

    /// Accepts these API keys too.
    pub fn with_api_keys(mut self, keys: ApiKeys) -> Self {
        self.api_keys = Some(Arc::new(keys));
        self
    }

    /// Uses these rate limits.
    pub fn with_limits(mut self, limits: RateLimits) -> Self {
        self.limits = Arc::new(limits);
        self
    }

    /// Sends audit entries to `sink`.
    pub fn with_audit(mut self, sink: impl AuditSink) -> Self {
        self.audit = Arc::new(sink);
        self
    }
}

/// Stacks client identification, authentication, authorization and rate
/// limiting, in that order, in front of an upstream service.
#[derive(Debug, Clone)]
pub struct Gateway {
    parts: GatewayParts,
}

/// The service [`Gateway::wrap`] returns.
pub type GatewayService<S> = ClientIpService<AuthService<AuthzService<RateLimitService<S>>>>;

impl Gateway {
    /// A gateway over `parts`.
    pub fn new(parts: GatewayParts) -> Gateway {
        Gateway { parts }
    }

    /// Wraps `upstream` in the stack.
    pub fn wrap<S>(&self, upstream: S) -> GatewayService<S> {
        use tower::Layer;
        let p = &self.parts;
        let rate = RateLimitLayer::new(Arc::clone(&p.limits), Arc::clone(&p.audit)).layer(upstream);
        let authz = AuthzLayer::new(Arc::clone(&p.policy), Arc::clone(&p.audit)).layer(rate);
        let mut auth = AuthLayer::new(Arc::clone(&p.verifier), Arc::clone(&p.audit))
            .with_limits(Arc::clone(&p.limits));
        if let Some(keys) = &p.api_keys {
            auth = auth.with_api_keys(Arc::clone(keys));
        }
        ClientIpLayer::new(p.trusted_proxies.clone()).layer(auth.layer(authz))
    }
}

#[cfg(test)]
mod cors_tests;
#[cfg(test)]
mod hardening_tests;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

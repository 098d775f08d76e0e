//! The wiring of `examples/suite.rs`, shared with its test (`tests/suite.rs`):
//! notify-hub's WebSocket server and HTTP API and metrics-core's HTTP
//! service, behind gateway-mw's client-IP, auth, RBAC and rate-limit layers,
//! composed with `tower::ServiceBuilder` into one service for
//! `http_kit::serve`.

use std::convert::Infallible;
use std::sync::Arc;

use gateway_mw::client_ip::TrustedProxies;
use gateway_mw::http::{AuthLayer, AuthzLayer, ClientIpLayer, NoAudit, RateLimitLayer, RateLimits};
use gateway_mw::ratelimit::Quota;
use gateway_mw::rbac::{PolicyConfig, RoleDef, RouteRule};
use http::{Request, Response};
use http_kit::Body;
use hyper::body::Incoming;
use jwt_kit::{JwtConfig, JwtVerifier, KeySet, VerifyingKey};
use metrics_core::http::{HttpConfig, MetricsService};
use metrics_core::{Config, MetricsProcessor};
use notify_hub::server::{NotifyServer, ServerConfig};
use notify_hub::{Hub, HubConfig, LocalBroker, MemoryStore};
use tower::{ServiceBuilder, ServiceExt};

/// Requests per minute per user (and per API key) through the gateway.
pub(crate) const USER_QUOTA_PER_MINUTE: u32 = 20;

/// The routes and who may call them. Everything else is 404 (deny by
/// default), before any backend sees it.
pub(crate) fn policy() -> PolicyConfig {
    PolicyConfig::default()
        .role("user", RoleDef::new(["notify:connect", "metrics:write"]))
        .role("analyst", RoleDef::new(["metrics:read"]))
        .role("notifier", RoleDef::new(["notify:send"]))
        .rule(RouteRule::new("GET", "/v1/ws", "notify:connect"))
        .rule(RouteRule::new("POST", "/v1/notifications", "notify:send"))
        .rule(RouteRule::new(
            "GET",
            "/v1/users/{user}/notifications",
            "notify:send",
        ))
        .rule(RouteRule::new("POST", "/v1/events", "metrics:write"))
        .rule(RouteRule::new("GET", "/v1/aggregates", "metrics:read"))
}

/// notify-hub's settings: its HTTP API admits the `notifier` role (the
/// gateway has already checked the `notify:send` permission).
pub(crate) fn notify_config() -> ServerConfig {
    let mut config = ServerConfig::default();
    config.service_role = "notifier".into();
    config
}

/// The whole suite for HS256 tokens signed with `secret` (kid `k1`): an
/// in-memory metrics processor and notification hub behind the gateway's
/// layers. The hub is returned so the caller can shut it down.
pub(crate) async fn app(
    secret: &[u8],
) -> Result<
    (
        impl tower::Service<
            Request<Incoming>,
            Response = Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static,
        Hub,
    ),
    Box<dyn std::error::Error>,
> {
    let verifier = JwtVerifier::new(
        KeySet::new().with_key(VerifyingKey::hs256("k1", secret))?,
        JwtConfig::default(),
    );
    let metrics = MetricsService::new(
        Arc::new(MetricsProcessor::new(Config::default())),
        HttpConfig::default(),
    );
    let hub = Hub::start(
        HubConfig::default(),
        Arc::new(MemoryStore::new()),
        Arc::new(LocalBroker::new()),
    )
    .await?;
    let notify = NotifyServer::new(hub.clone(), verifier.clone(), notify_config());
    Ok((stack(verifier, metrics, notify), hub))
}

/// One service: paths of the metrics API go to `metrics`, the rest to
/// `notify`, all behind the gateway's layers.
pub(crate) fn stack(
    verifier: JwtVerifier,
    metrics: MetricsService,
    notify: NotifyServer,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    let policy = Arc::new(policy().compile().expect("the example policy compiles"));
    let audit: Arc<NoAudit> = Arc::new(NoAudit);
    let limits = Arc::new(RateLimits::new(
        Quota::per_minute(USER_QUOTA_PER_MINUTE),
        Quota::per_minute(USER_QUOTA_PER_MINUTE),
    ));
    let backends = tower::service_fn(move |request: Request<Incoming>| {
        let (metrics, notify) = (metrics.clone(), notify.clone());
        async move {
            let path = request.uri().path();
            if path == "/v1/events" || path == "/v1/aggregates" {
                metrics.oneshot(request).await
            } else {
                notify.oneshot(request).await
            }
        }
    });
    ServiceBuilder::new()
        .layer(ClientIpLayer::new(TrustedProxies::none()))
        .layer(AuthLayer::new(Arc::new(verifier), audit.clone()).with_limits(Arc::clone(&limits)))
        .layer(AuthzLayer::new(policy, audit.clone()))
        .layer(RateLimitLayer::new(limits, audit))
        .service(backends)
}

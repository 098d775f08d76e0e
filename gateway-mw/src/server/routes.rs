//! The gateway's one route table: every endpoint it serves (health,
//! readiness, metrics, the token endpoints, the admin endpoint and each
//! configured `[[routes]]` entry), compiled once at build into a segment
//! trie.
//!
//! `dispatch` matches a request against it once and hands the match on as
//! request extensions: [`Routed`] for the layers of [`crate::http`]
//! (validation reads the route's limits, authorization its permission, and
//! neither routes again) and [`Matched`] for the handler at the end
//! (which upstream, or which built-in endpoint).

use std::sync::Arc;
use std::time::Duration;

use super::admin::ADMIN_REVOKE_SESSIONS;
use super::proxy::Upstream;
use crate::config::{ConfigError, GatewayConfig};
use crate::http::{JsonLimits, RouteLimits, RouteSpec, Routed};
use crate::router::{RouteError, Router};

/// Which token endpoint a `/auth/...` route is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LoginOp {
    /// `POST /auth/token`.
    Token,
    /// `POST /auth/refresh`.
    Refresh,
    /// `POST /auth/logout`.
    Logout,
    /// Any other path under `/auth/` (answered 404 after the auth stack's
    /// validation and per-IP limit, like the named ones).
    Unknown,
}

/// What a matched route leads to.
#[derive(Debug)]
pub(super) enum Handler {
    /// `GET /healthz`.
    Healthz,
    /// `GET /readyz`.
    Readyz,
    /// `GET /metrics`.
    Metrics,
    /// A token endpoint, behind validation and the per-IP limit only.
    Login(LoginOp),
    /// `POST /admin/users/{user}/revoke-sessions`, behind the full stack.
    RevokeSessions,
    /// A configured route, forwarded to its upstream behind the full stack.
    Proxy(Upstream),
}

/// One entry of the table.
#[derive(Debug)]
pub(super) struct GatewayRoute {
    pub(super) handler: Handler,
    /// What the layers need to know, shared with them as an extension.
    pub(super) routed: Routed,
}

/// The matched route, as a request extension for the handler at the end.
#[derive(Debug, Clone)]
pub(super) struct Matched(pub(super) Arc<GatewayRoute>);

/// Method + path → route.
pub(super) type RouteTable = Router<Arc<GatewayRoute>>;

/// The token endpoints' bodies are tiny JSON objects.
const LOGIN_JSON: JsonLimits = JsonLimits {
    max_depth: 4,
    max_bytes: 4_096,
};

/// Compiles the table from `config`. A `[[routes]]` entry that collides
/// with a built-in endpoint (or with another entry) is refused, naming it:
/// a second table could otherwise silently shadow it.
pub(super) fn build_table(config: &GatewayConfig) -> Result<RouteTable, ConfigError> {
    let mut table = RouteTable::new();
    let mut add = |method: &str,
                   template: &str,
                   handler: Handler,
                   permission: Option<String>,
                   limits: Option<RouteLimits>|
     -> Result<(), RouteError> {
        let routed = Routed(Some(Arc::new(RouteSpec::new(template, permission, limits))));
        table.insert(method, template, Arc::new(GatewayRoute { handler, routed }))
    };
    let builtin = |method: &str, template: &str| {
        let route = format!("built-in {method} {template}");
        move |source| ConfigError::Route { route, source }
    };
    for (template, handler) in [
        ("/healthz", Handler::Healthz),
        ("/readyz", Handler::Readyz),
        ("/metrics", Handler::Metrics),
    ] {
        add("GET", template, handler, None, None).map_err(builtin("GET", template))?;
    }
    for (path, op) in [
        ("/auth/token", LoginOp::Token),
        ("/auth/refresh", LoginOp::Refresh),
        ("/auth/logout", LoginOp::Logout),
    ] {
        let limits = Some(RouteLimits::json(LOGIN_JSON));
        add("POST", path, Handler::Login(op), None, limits).map_err(builtin("POST", path))?;
        // Other methods reach the endpoint too, which answers 405.
        add("*", path, Handler::Login(op), None, None).map_err(builtin("*", path))?;
    }
    let unknown = Handler::Login(LoginOp::Unknown);
    add("*", "/auth/*rest", unknown, None, None).map_err(builtin("*", "/auth/*rest"))?;
    add(
        "POST",
        ADMIN_REVOKE_SESSIONS,
        Handler::RevokeSessions,
        Some(config.admin.permission.clone()),
        Some(RouteLimits::content_types(Vec::<String>::new())),
    )
    .map_err(builtin("POST", ADMIN_REVOKE_SESSIONS))?;

    for route in &config.routes {
        let named = format!("[[routes]] {} {}", route.method, route.path);
        let limits = if route.json {
            RouteLimits::json(JsonLimits::default())
        } else {
            RouteLimits::content_types(route.content_types.clone())
        };
        let target = config.upstreams.get(&route.upstream).ok_or_else(|| {
            ConfigError::invalid(&named, format!("unknown upstream {:?}", route.upstream))
        })?;
        let upstream = Upstream::new(
            &target.url,
            Duration::from_millis(target.timeout_ms),
            target.http2,
        );
        add(
            &route.method,
            &route.path,
            Handler::Proxy(upstream),
            Some(route.permission.clone()),
            Some(limits),
        )
        .map_err(|source| match source {
            RouteError::Duplicate { .. } => ConfigError::invalid(
                &named,
                format!(
                    "already routed (by another [[routes]] entry or a built-in endpoint: \
                     GET /healthz, /readyz, /metrics, POST /auth/token, /auth/refresh, \
                     /auth/logout, {ADMIN_REVOKE_SESSIONS})"
                ),
            ),
            source => ConfigError::Route {
                route: named.clone(),
                source,
            },
        })?;
    }
    Ok(table)
}

//! A complete gateway built from a [`GatewayConfig`] (feature `proxy`): the
//! layers of [`crate::http`] in front of a pooled hyper client that forwards
//! to the configured upstreams, plus the demo token endpoints, health,
//! readiness and metrics. The example `gateway` is a thin `main` over this.
//!
//! Request flow for `/v1/...` routes:
//! metrics → security headers → CORS → request id → client IP → validation →
//! authentication → authorization → rate limit → proxy.
//! `/auth/token`, `/auth/refresh` and `/auth/logout` skip authentication and
//! are rate-limited per client IP instead.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tower::{Layer, ServiceExt};

use crate::audit::{AuditChain, AuditEntry, AuditLog, FileWriter, Outcome, StdoutWriter};
use crate::client_ip::TrustedProxies;
use crate::config::{ConfigError, GatewayConfig, KeyEntry};
use crate::http::{
    ApiKeys, AuthLayer, AuthzLayer, BoxError, ClientIp, ClientIpLayer, CorsConfig, GatewayBody,
    GatewayMetrics, GatewayParts, JsonLimits, MetricsLayer, PeerAddr, Principal, RateLimitLayer,
    RateLimits, RouteLimits, SecurityHeadersLayer, ValidationConfig, ValidationLayer,
};
use crate::jwt::{JwtConfig, JwtVerifier, KeySet, VerifyingKey};
use crate::ratelimit::Quota;
use crate::rbac::{PolicyConfig, RoleDef, RouteRule};
use crate::router::Router;
use crate::token::{MemoryStore, TokenConfig, TokenError, TokenService};

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A configured upstream.
#[derive(Debug, Clone)]
struct Upstream {
    base: String,
    timeout: Duration,
    http2: bool,
}

/// The token service over whichever store is configured.
enum Tokens {
    Memory(TokenService<MemoryStore>),
    #[cfg(feature = "redis")]
    Redis(TokenService<crate::token::RedisStore>),
}

impl Tokens {
    async fn issue(
        &self,
        subject: &str,
        roles: &[String],
    ) -> Result<crate::token::TokenPair, TokenError> {
        match self {
            Tokens::Memory(t) => t.issue(subject, roles).await,
            #[cfg(feature = "redis")]
            Tokens::Redis(t) => t.issue(subject, roles).await,
        }
    }

    async fn refresh(&self, token: &str) -> Result<crate::token::TokenPair, TokenError> {
        match self {
            Tokens::Memory(t) => t.refresh(token).await,
            #[cfg(feature = "redis")]
            Tokens::Redis(t) => t.refresh(token).await,
        }
    }

    async fn logout(&self, token: &str) -> Result<(), TokenError> {
        match self {
            Tokens::Memory(t) => t.logout(token).await,
            #[cfg(feature = "redis")]
            Tokens::Redis(t) => t.logout(token).await,
        }
    }

    async fn revoke_subject(&self, subject: &str) -> Result<usize, TokenError> {
        match self {
            Tokens::Memory(t) => t.revoke_subject(subject).await,
            #[cfg(feature = "redis")]
            Tokens::Redis(t) => t.revoke_subject(subject).await,
        }
    }
}

/// The administrative route; its permission comes from `[admin]`.
const ADMIN_REVOKE_SESSIONS: &str = "/admin/users/{user}/revoke-sessions";

/// Everything a request needs, shared by all connections.
struct State {
    client: Client<HttpConnector, Full<Bytes>>,
    /// For upstreams with `http2 = true`.
    client_h2: Client<HttpConnector, Full<Bytes>>,
    upstreams: Router<Upstream>,
    all_upstreams: Vec<Upstream>,
    tokens: Option<Tokens>,
    #[cfg(feature = "redis")]
    redis: Option<fred::prelude::Client>,
    users: HashMap<String, ([u8; 32], Vec<String>)>,
    audit: Arc<AuditLog>,
    metrics: Arc<GatewayMetrics>,
}

/// A gateway ready to serve.
pub struct GatewayServer {
    config: GatewayConfig,
    state: Arc<State>,
    api: BoxedService,
    auth: BoxedService,
}

impl std::fmt::Debug for GatewayServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayServer")
            .field("listen", &self.config.listen)
            .finish_non_exhaustive()
    }
}

type BoxedService =
    tower::util::BoxCloneSyncService<Request<Incoming>, Response<GatewayBody>, Infallible>;

fn key_from_entry(entry: &KeyEntry) -> Result<VerifyingKey, ConfigError> {
    let invalid =
        |why: String| ConfigError::Invalid(format!("[[jwt.keys]] {:?}: {why}", entry.kid));
    match entry.alg.as_str() {
        "HS256" => {
            let secret = match (&entry.secret, &entry.secret_env) {
                (Some(s), _) => s.clone(),
                (None, Some(var)) => std::env::var(var)
                    .map_err(|_| invalid(format!("environment variable {var} is not set")))?,
                (None, None) => return Err(invalid("HS256 needs secret or secret_env".into())),
            };
            Ok(VerifyingKey::hs256(entry.kid.clone(), secret.as_bytes()))
        }
        alg @ ("RS256" | "ES256" | "EdDSA") => {
            let path = entry
                .public_key_pem
                .as_ref()
                .ok_or_else(|| invalid(format!("{alg} needs public_key_pem")))?;
            let pem =
                std::fs::read(path).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
            let key = match alg {
                "RS256" => VerifyingKey::rs256_pem(entry.kid.clone(), &pem),
                "ES256" => VerifyingKey::es256_pem(entry.kid.clone(), &pem),
                _ => VerifyingKey::eddsa_pem(entry.kid.clone(), &pem),
            };
            key.map_err(|e| invalid(e.to_string()))
        }
        other => Err(invalid(format!("unsupported alg {other:?}"))),
    }
}

/// How `[tokens] signing_kid` signs: with its HS256 secret, or with the
/// private key in `[tokens] private_key_pem` for an asymmetric key.
fn signing_config(config: &GatewayConfig, kid: &str) -> Result<TokenConfig, ConfigError> {
    let entry = config
        .jwt
        .keys
        .iter()
        .find(|k| k.kid == kid)
        .ok_or_else(|| ConfigError::Invalid(format!("no key {kid:?}")))?;
    let issuer = config.jwt.issuer.clone().unwrap_or_default();
    let audience = config.jwt.audience.clone().unwrap_or_default();
    let alg = match entry.alg.as_str() {
        "HS256" => {
            let secret = match (&entry.secret, &entry.secret_env) {
                (Some(s), _) => s.as_bytes().to_vec(),
                (None, Some(var)) => std::env::var(var)
                    .map(String::into_bytes)
                    .map_err(|_| ConfigError::Invalid(format!("{var} is not set")))?,
                (None, None) => {
                    return Err(ConfigError::Invalid(format!("key {kid:?} has no secret")));
                }
            };
            return Ok(TokenConfig::hs256(issuer, audience, kid, &secret));
        }
        "RS256" => crate::jwt::KeyAlg::Rs256,
        "ES256" => crate::jwt::KeyAlg::Es256,
        "EdDSA" => crate::jwt::KeyAlg::EdDsa,
        other => {
            return Err(ConfigError::Invalid(format!(
                "key {kid:?}: unknown alg {other:?}"
            )));
        }
    };
    let path = config.tokens.private_key_pem.as_ref().ok_or_else(|| {
        ConfigError::Invalid(format!(
            "[tokens] signing_kid {kid:?} is {}: set [tokens] private_key_pem",
            entry.alg
        ))
    })?;
    let pem = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    TokenConfig::from_private_pem(issuer, audience, kid, alg, &pem)
        .map_err(|e| ConfigError::Invalid(format!("[tokens] private_key_pem: {e}")))
}

impl GatewayServer {
    /// Builds the gateway (keys, policy, limits, audit log, upstream client)
    /// from `config`. Fails with a clear message on any inconsistency.
    pub async fn build(config: GatewayConfig) -> Result<GatewayServer, ConfigError> {
        let invalid = |e: &dyn std::fmt::Display| ConfigError::Invalid(e.to_string());
        // Keys and verification.
        let mut keys = match &config.jwt.jwks_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                KeySet::from_jwks(&text).map_err(|e| invalid(&e))?
            }
            None => KeySet::new(),
        };
        for entry in &config.jwt.keys {
            keys = keys
                .with_key(key_from_entry(entry)?)
                .map_err(|e| invalid(&e))?;
        }
        let mut jwt = JwtConfig::default().with_leeway_secs(config.jwt.leeway_secs);
        if let Some(iss) = &config.jwt.issuer {
            jwt = jwt.with_issuer(iss.clone());
        }
        if let Some(aud) = &config.jwt.audience {
            jwt = jwt.with_audience(aud.clone());
        }
        // Verified tokens are cached (time checks still run on every use): an
        // RS256/ES256 signature costs hundreds of microseconds.
        let verifier = JwtVerifier::new(keys, jwt).with_cache(100_000);

        // Policy, validation and upstream routing from the same route list.
        let mut policy = PolicyConfig::default();
        for (name, role) in &config.roles {
            policy = policy.role(
                name.clone(),
                RoleDef::new(role.permissions.clone()).inherits(role.inherits.clone()),
            );
        }
        let mut validation = ValidationConfig::default();
        let mut upstreams = Router::new();
        for route in &config.routes {
            policy = policy.rule(RouteRule::new(
                route.method.clone(),
                route.path.clone(),
                route.permission.clone(),
            ));
            let limits = if route.json {
                RouteLimits::json(JsonLimits::default())
            } else {
                RouteLimits::content_types(route.content_types.clone())
            };
            validation = validation
                .route(&route.method, &route.path, limits)
                .map_err(|e| invalid(&e))?;
            let target = &config.upstreams[&route.upstream];
            let upstream = Upstream {
                base: target.url.trim_end_matches('/').to_owned(),
                timeout: Duration::from_millis(target.timeout_ms),
                http2: target.http2,
            };
            upstreams
                .insert(&route.method, &route.path, upstream)
                .map_err(|e| invalid(&e))?;
        }
        for method in ["POST"] {
            for path in ["/auth/token", "/auth/refresh", "/auth/logout"] {
                validation = validation
                    .route(
                        method,
                        path,
                        RouteLimits::json(JsonLimits {
                            max_depth: 4,
                            max_bytes: 4_096,
                        }),
                    )
                    .map_err(|e| invalid(&e))?;
            }
        }
        // The gateway's own admin route, behind the same auth, RBAC, limits
        // and audit as every other route.
        policy = policy.rule(RouteRule::new(
            "POST",
            ADMIN_REVOKE_SESSIONS,
            config.admin.permission.clone(),
        ));
        validation = validation
            .route(
                "POST",
                ADMIN_REVOKE_SESSIONS,
                RouteLimits::content_types(Vec::<String>::new()),
            )
            .map_err(|e| invalid(&e))?;
        let policy = policy.compile().map_err(|e| invalid(&e))?;

        // API keys, limits, proxies, CORS.
        let mut api_keys = ApiKeys::new();
        for entry in &config.api_keys {
            let key = match (&entry.key, &entry.key_env) {
                (Some(k), _) => k.clone(),
                (None, Some(var)) => std::env::var(var).map_err(|_| {
                    ConfigError::Invalid(format!("api key {:?}: {var} is not set", entry.id))
                })?,
                (None, None) => {
                    return Err(ConfigError::Invalid(format!(
                        "api key {:?} needs key or key_env",
                        entry.id
                    )));
                }
            };
            api_keys = api_keys.with_key(entry.id.clone(), &key, entry.roles.clone());
        }
        let r = &config.rate_limits;
        let limits = RateLimits::new(
            Quota::per_minute(r.per_user_per_minute),
            Quota::per_minute(r.per_api_key_per_minute),
        )
        .with_anonymous(Quota::per_minute(r.per_ip_per_minute));
        let limits =
            config
                .routes
                .iter()
                .fold(limits, |limits, route| match route.quota_per_minute {
                    Some(q) => {
                        limits.with_route_quota(&route.method, &route.path, Quota::per_minute(q))
                    }
                    None => limits,
                });
        #[cfg(feature = "redis")]
        let redis = match &config.redis {
            Some(section) => Some(connect_redis(&section.url).await?),
            None => None,
        };
        #[cfg(feature = "redis")]
        let limits = match (&redis, &config.redis) {
            (Some(client), Some(section)) => limits.with_redis(crate::http::RedisLimits {
                client: client.clone(),
                prefix: format!("{}rl:", section.prefix),
                timeout: Duration::from_millis(section.timeout_ms),
                on_failure: match section.on_failure.as_str() {
                    "open" => crate::ratelimit::FailurePolicy::FailOpen,
                    "closed" => crate::ratelimit::FailurePolicy::FailClosed,
                    _ => crate::ratelimit::FailurePolicy::LocalFallback,
                },
            }),
            _ => limits,
        };
        let limits = Arc::new(limits);
        let trusted = TrustedProxies::parse(&config.trusted_proxies).map_err(|e| invalid(&e))?;
        let mut cors = CorsConfig::default().with_credentials(config.cors.allow_credentials);
        for origin in &config.cors.allowed_origins {
            cors = cors.allow_origin(origin.clone());
        }
        let cors = cors.layer().map_err(|e| invalid(&e))?;

        // Audit log and metrics.
        let audit = if config.audit.sink == "stdout" {
            AuditLog::spawn(StdoutWriter, AuditChain::new(), config.audit.queue)
        } else {
            let path = std::path::PathBuf::from(&config.audit.sink);
            let (writer, chain) =
                FileWriter::open(&path).map_err(|source| ConfigError::Read { path, source })?;
            AuditLog::spawn(writer, chain, config.audit.queue)
        }
        .map_err(|e| invalid(&e))?;
        let audit = Arc::new(audit);
        let metrics = Arc::new(GatewayMetrics::new(Some(Arc::clone(&audit))));

        // Demo token service.
        let tokens = match &config.tokens.signing_kid {
            Some(kid) => {
                let t = &config.tokens;
                let token_config = signing_config(&config, kid)?
                    .with_reuse_grace(Duration::from_secs(t.reuse_grace_secs))
                    .with_refresh_lifetimes(
                        Duration::from_secs(t.refresh_idle_ttl_secs),
                        Duration::from_secs(t.refresh_absolute_ttl_secs),
                    );
                let token_config =
                    token_config.with_access_ttl(Duration::from_secs(t.access_ttl_secs));
                #[cfg(feature = "redis")]
                if let (Some(client), Some(section)) = (&redis, &config.redis) {
                    let store = crate::token::RedisStore::new(
                        client.clone(),
                        format!("{}tokens:", section.prefix),
                    );
                    Some(Tokens::Redis(TokenService::new(store, token_config)))
                } else {
                    Some(Tokens::Memory(TokenService::new(
                        MemoryStore::new(),
                        token_config,
                    )))
                }
                #[cfg(not(feature = "redis"))]
                Some(Tokens::Memory(TokenService::new(
                    MemoryStore::new(),
                    token_config,
                )))
            }
            None => None,
        };
        let users = config
            .users
            .iter()
            .map(|u| {
                let mut hash = [0u8; 32];
                hex::decode_to_slice(&u.password_sha256, &mut hash).map_err(|_| {
                    ConfigError::Invalid(format!(
                        "user {:?}: password_sha256 is not 64 hex digits",
                        u.name
                    ))
                })?;
                Ok((u.name.clone(), (hash, u.roles.clone())))
            })
            .collect::<Result<HashMap<_, _>, ConfigError>>()?;

        let mut all_upstreams: Vec<Upstream> = Vec::new();
        for u in config.upstreams.values() {
            all_upstreams.push(Upstream {
                base: u.url.trim_end_matches('/').to_owned(),
                timeout: Duration::from_millis(u.timeout_ms),
                http2: u.http2,
            });
        }
        // Small request/response messages: Nagle's algorithm would hold
        // them back waiting for ACKs, so both hops disable it.
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector.clone());
        let client_h2 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .http2_only(true)
            .build(connector);
        let state = Arc::new(State {
            client,
            client_h2,
            upstreams,
            all_upstreams,
            tokens,
            #[cfg(feature = "redis")]
            redis,
            users,
            audit: Arc::clone(&audit),
            metrics: Arc::clone(&metrics),
        });

        let audit_sink: Arc<dyn crate::audit::AuditSink> = audit;
        let parts = GatewayParts {
            verifier: Arc::new(verifier),
            api_keys: Some(Arc::new(api_keys)),
            policy: Arc::new(policy),
            limits: Arc::clone(&limits),
            audit: Arc::clone(&audit_sink),
            trusted_proxies: trusted.clone(),
        };
        let validation = ValidationLayer::new(validation);
        let edge = tower::ServiceBuilder::new()
            .layer(MetricsLayer::new(Arc::clone(&metrics)))
            .layer(SecurityHeadersLayer::default())
            .layer(cors);
        let proxy_state = Arc::clone(&state);
        // The Gateway stack (auth → authz → rate limit), with validation in
        // front of it and the client IP in front of that.
        let mut auth_layer = AuthLayer::new(Arc::clone(&parts.verifier), Arc::clone(&parts.audit));
        if let Some(keys) = &parts.api_keys {
            auth_layer = auth_layer.with_api_keys(Arc::clone(keys));
        }
        let guarded = auth_layer.layer(
            AuthzLayer::new(Arc::clone(&parts.policy), Arc::clone(&parts.audit)).layer(
                RateLimitLayer::new(Arc::clone(&parts.limits), Arc::clone(&parts.audit)).layer(
                    tower::service_fn(move |req: Request<Full<Bytes>>| {
                        let state = Arc::clone(&proxy_state);
                        async move {
                            if req.uri().path().starts_with("/admin/") {
                                admin_endpoint(state, req).await
                            } else {
                                proxy(state, req).await
                            }
                        }
                    }),
                ),
            ),
        );
        let api = edge.clone().service(
            ClientIpLayer::new(parts.trusted_proxies.clone())
                .layer(validation.clone().layer(guarded)),
        );
        let auth_state = Arc::clone(&state);
        let auth = edge.service(ClientIpLayer::new(trusted).layer(validation.layer(
            RateLimitLayer::new(limits, audit_sink).layer(tower::service_fn(move |req| {
                auth_endpoint(Arc::clone(&auth_state), req)
            })),
        )));
        Ok(GatewayServer {
            config,
            state,
            api: BoxedService::new(api),
            auth: BoxedService::new(auth),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// Serves on `listener` until `shutdown` completes, then stops accepting,
    /// lets in-flight requests finish for up to `shutdown_grace_secs`, and
    /// flushes the audit log.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            continue;
                        }
                    };
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "TCP_NODELAY not set");
                    }
                    let (api, auth, state) = (self.api.clone(), self.auth.clone(), Arc::clone(&self.state));
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        dispatch(api.clone(), auth.clone(), Arc::clone(&state), peer, request)
                    });
                    let connection = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    let connection = graceful.watch(connection);
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    });
                }
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        let grace = Duration::from_secs(self.config.shutdown_grace_secs);
        if tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                "in-flight requests still running after the grace period"
            );
        }
        let audit = Arc::clone(&self.state.audit);
        let _ = tokio::task::spawn_blocking(move || audit.shutdown(Duration::from_secs(5))).await;
    }
}

#[cfg(feature = "redis")]
async fn connect_redis(url: &str) -> Result<fred::prelude::Client, ConfigError> {
    use fred::prelude::{Builder, ClientLike, Config};
    let invalid = |why: String| ConfigError::Invalid(format!("[redis] {why}"));
    let config = Config::from_url(url).map_err(|e| invalid(format!("bad url: {e}")))?;
    let client = Builder::from_config(config)
        .with_connection_config(|c| c.connection_timeout = Duration::from_secs(3))
        .build()
        .map_err(|e| invalid(e.to_string()))?;
    match tokio::time::timeout(Duration::from_secs(5), client.init()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(e)) => Err(invalid(format!("cannot connect: {e}"))),
        Err(_) => Err(invalid("cannot connect: timed out".into())),
    }
}

/// Routes a request to health, metrics, the auth endpoints or the API stack,
/// after attaching the peer address and a request id.
async fn dispatch(
    api: BoxedService,
    auth: BoxedService,
    state: Arc<State>,
    peer: SocketAddr,
    mut request: Request<Incoming>,
) -> Result<Response<GatewayBody>, Infallible> {
    request.extensions_mut().insert(PeerAddr(peer));
    let request_id = match request
        .headers()
        .get(&X_REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 128)
    {
        Some(id) => id.clone(),
        None => {
            let id = HeaderValue::from_str(&new_request_id())
                .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
            request
                .headers_mut()
                .insert(X_REQUEST_ID.clone(), id.clone());
            id
        }
    };
    let path = request.uri().path().to_owned();
    let mut response = match (request.method(), path.as_str()) {
        (&Method::GET, "/healthz") => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        (&Method::GET, "/readyz") => readiness(&state).await,
        (&Method::GET, "/metrics") => {
            let mut r = text(StatusCode::OK, state.metrics.encode());
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        (_, p) if p.starts_with("/auth/") => auth.oneshot(request).await?,
        _ => api.oneshot(request).await?,
    };
    response
        .headers_mut()
        .insert(X_REQUEST_ID.clone(), request_id);
    Ok(response)
}

fn new_request_id() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        return "unavailable".into();
    }
    hex::encode(bytes)
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<GatewayBody> {
    let mut r = text(status, body.to_string());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn text(status: StatusCode, body: String) -> Response<GatewayBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r
}

/// Ready when every upstream accepts a TCP connection within 500 ms.
async fn readiness(state: &State) -> Response<GatewayBody> {
    let mut failing = Vec::new();
    for upstream in &state.all_upstreams {
        let authority = upstream
            .base
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let ok = matches!(
            tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(&authority)
            )
            .await,
            Ok(Ok(_))
        );
        if !ok {
            failing.push(upstream.base.clone());
        }
    }
    #[cfg(feature = "redis")]
    if let Some(client) = &state.redis {
        use fred::prelude::ClientLike;
        let pong =
            tokio::time::timeout(Duration::from_millis(500), client.ping::<String>(None)).await;
        if !matches!(pong, Ok(Ok(_))) {
            failing.push("redis".to_owned());
        }
    }
    if failing.is_empty() {
        json(StatusCode::OK, serde_json::json!({"status": "ready"}))
    } else {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "not_ready", "unreachable_upstreams": failing}),
        )
    }
}

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1),
/// plus the caller's credentials, which upstreams must not see.
const STRIPPED: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "authorization",
    "x-api-key",
];

async fn proxy(
    state: Arc<State>,
    request: Request<Full<Bytes>>,
) -> Result<Response<GatewayBody>, Infallible> {
    let Some(route) = state
        .upstreams
        .find(request.method().as_str(), request.uri().path())
    else {
        return Ok(crate::http::error_response(
            StatusCode::NOT_FOUND,
            "route_not_found",
            "no such route",
        ));
    };
    let upstream = route.value.clone();
    let (mut parts, body) = request.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let Ok(uri) = format!("{}{path_and_query}", upstream.base).parse::<Uri>() else {
        return Ok(crate::http::error_response(
            StatusCode::BAD_GATEWAY,
            "bad_upstream",
            "invalid upstream URL",
        ));
    };
    parts.uri = uri;
    for name in STRIPPED {
        parts.headers.remove(name);
    }
    if let Some(ClientIp(ip)) = parts.extensions.get::<ClientIp>().copied() {
        let forwarded = match parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(existing) => format!("{existing}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&forwarded) {
            parts.headers.insert("x-forwarded-for", v);
        }
    }
    if let Some(principal) = parts.extensions.get::<Principal>().cloned() {
        if let Ok(v) = HeaderValue::from_str(&principal.id) {
            parts.headers.insert("x-gateway-subject", v);
        }
        if let Ok(v) = HeaderValue::from_str(&principal.roles.join(",")) {
            parts.headers.insert("x-gateway-roles", v);
        }
    }
    let mut outgoing = Request::from_parts(parts, body);
    if upstream.http2 {
        // Hop-by-hop headers are already stripped (STRIPPED).
        *outgoing.version_mut() = http::Version::HTTP_2;
    }
    let client = if upstream.http2 {
        &state.client_h2
    } else {
        &state.client
    };
    match tokio::time::timeout(upstream.timeout, client.request(outgoing)).await {
        Ok(Ok(response)) => {
            Ok(response.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync()))
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, upstream = %upstream.base, "upstream request failed");
            Ok(crate::http::error_response(
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                "the upstream service is unavailable",
            ))
        }
        Err(_) => Ok(crate::http::error_response(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            "the upstream service timed out",
        )),
    }
}

#[derive(Deserialize)]
struct Login {
    username: String,
    password: String,
}

#[derive(Deserialize)]
struct RefreshBody {
    refresh_token: String,
}

/// `/auth/token`, `/auth/refresh`, `/auth/logout` (demo user store).
/// `POST /admin/users/{user}/revoke-sessions`: authorization already ran
/// (the route needs `[admin] permission`); this ends the user's sessions and
/// audits who did it to whom.
async fn admin_endpoint(
    state: Arc<State>,
    request: Request<Full<Bytes>>,
) -> Result<Response<GatewayBody>, Infallible> {
    let path = request.uri().path();
    let target = path
        .strip_prefix("/admin/users/")
        .and_then(|rest| rest.strip_suffix("/revoke-sessions"))
        .filter(|user| !user.is_empty() && !user.contains('/'))
        .map(str::to_owned);
    let (Some(target), Some(tokens)) = (target, state.tokens.as_ref()) else {
        return Ok(crate::http::error_response(
            StatusCode::NOT_FOUND,
            "route_not_found",
            "no such route",
        ));
    };
    let entry_for = |outcome| {
        let mut entry = AuditEntry::new("admin.revoke_sessions", outcome)
            .target(target.clone())
            .route(format!("POST {ADMIN_REVOKE_SESSIONS}"));
        if let Some(p) = request.extensions().get::<Principal>() {
            entry = entry.who(p.id.clone());
        }
        if let Some(ClientIp(ip)) = request.extensions().get::<ClientIp>() {
            entry = entry.client_ip(ip.to_string());
        }
        if let Some(id) = request
            .headers()
            .get(&X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
        {
            entry = entry.request_id(id);
        }
        entry
    };
    Ok(match tokens.revoke_subject(&target).await {
        Ok(revoked) => {
            let entry = entry_for(Outcome::Success).reason(format!("revoked={revoked}"));
            crate::audit::AuditSink::record(&*state.audit, entry);
            json(
                StatusCode::OK,
                serde_json::json!({"user": target, "revoked_sessions": revoked}),
            )
        }
        Err(e) => {
            let entry = entry_for(Outcome::Failure).reason("token_store");
            crate::audit::AuditSink::record(&*state.audit, entry);
            crate::http::error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "token_store",
                &e.to_string(),
            )
        }
    })
}

async fn auth_endpoint(
    state: Arc<State>,
    request: Request<Full<Bytes>>,
) -> Result<Response<GatewayBody>, Infallible> {
    let Some(tokens) = state.tokens.as_ref() else {
        return Ok(crate::http::error_response(
            StatusCode::NOT_FOUND,
            "route_not_found",
            "token endpoints are not configured",
        ));
    };
    let ip = request
        .extensions()
        .get::<ClientIp>()
        .map(|ClientIp(ip)| ip.to_string());
    let audit = |entry: AuditEntry| {
        let entry = match &ip {
            Some(ip) => entry.client_ip(ip.clone()),
            None => entry,
        };
        crate::audit::AuditSink::record(&*state.audit, entry);
    };
    if request.method() != Method::POST {
        return Ok(crate::http::error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use POST",
        ));
    }
    let path = request.uri().path().to_owned();
    let body = match request.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(never) => match never {},
    };
    let pair_json = |pair: crate::token::TokenPair| {
        json(
            StatusCode::OK,
            serde_json::json!({"access_token": pair.access_token, "refresh_token": pair.refresh_token, "token_type": "Bearer", "expires_in": pair.expires_in}),
        )
    };
    let unauthorized = |code: &str, message: &str| {
        crate::http::error_response(StatusCode::UNAUTHORIZED, code, message)
    };
    Ok(match path.as_str() {
        "/auth/token" => {
            let Ok(login) = serde_json::from_slice::<Login>(&body) else {
                return Ok(crate::http::error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "send {\"username\", \"password\"}",
                ));
            };
            let hash: [u8; 32] = Sha256::digest(login.password.as_bytes()).into();
            match state.users.get(&login.username) {
                Some((expected, roles)) if constant_time_eq(expected, &hash) => match tokens
                    .issue(&login.username, roles)
                    .await
                {
                    Ok(pair) => {
                        audit(AuditEntry::new("token.issue", Outcome::Success).who(login.username));
                        pair_json(pair)
                    }
                    Err(e) => crate::http::error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "token_store",
                        &e.to_string(),
                    ),
                },
                _ => {
                    audit(
                        AuditEntry::new("auth.login", Outcome::Failure)
                            .who(login.username)
                            .reason("bad_credentials"),
                    );
                    unauthorized("invalid_credentials", "invalid username or password")
                }
            }
        }
        "/auth/refresh" | "/auth/logout" => {
            let Ok(body) = serde_json::from_slice::<RefreshBody>(&body) else {
                return Ok(crate::http::error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "send {\"refresh_token\"}",
                ));
            };
            if path == "/auth/logout" {
                match tokens.logout(&body.refresh_token).await {
                    Ok(()) => {
                        audit(AuditEntry::new("token.revoke", Outcome::Success));
                        json(StatusCode::OK, serde_json::json!({"status": "logged_out"}))
                    }
                    Err(_) => unauthorized("invalid_token", "unknown refresh token"),
                }
            } else {
                match tokens.refresh(&body.refresh_token).await {
                    Ok(pair) => {
                        audit(AuditEntry::new("token.refresh", Outcome::Success));
                        pair_json(pair)
                    }
                    Err(TokenError::ReuseDetected { subject }) => {
                        audit(
                            AuditEntry::new("token.reuse_detected", Outcome::Denied)
                                .who(subject)
                                .reason("family_revoked"),
                        );
                        unauthorized(
                            "token_reused",
                            "refresh token reuse detected; the session was revoked",
                        )
                    }
                    Err(e) => {
                        audit(AuditEntry::new("token.refresh", Outcome::Failure).reason("invalid"));
                        unauthorized("invalid_token", &e.to_string())
                    }
                }
            }
        }
        _ => crate::http::error_response(StatusCode::NOT_FOUND, "route_not_found", "no such route"),
    })
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
